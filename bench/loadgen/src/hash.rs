//! `hash-password`: an argon2id PHC string with chosen (small) costs.
//!
//! mailroom verifies SMTP AUTH passwords against whatever parameters the
//! stored PHC string names. `mailroom hash-password` uses argon2's defaults
//! (19 MiB, 2 passes), which is right for production; a benchmark that wants
//! to see what relaying costs, without the memory argon2 leaves behind after
//! 50 logins, can give its benchmark user a cheap hash instead.

use std::io::BufRead;

use anyhow::{Context, Result, anyhow, bail};
use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::args::Args;

pub const USAGE: &str = "\
mailroom-loadgen hash-password [--m-cost KIB] [--t-cost N]  < password
  Prints an argon2id PHC string for the password on standard input.
  --m-cost  memory in KiB (default 64; argon2's default is 19456)
  --t-cost  passes (default 1; argon2's default is 2)
  For benchmarks only: such a hash is cheap to brute-force.";

pub fn run(mut args: Args) -> Result<bool> {
    let m_cost: u32 = args.get("m-cost", 64)?;
    let t_cost: u32 = args.get("t-cost", 1)?;
    args.finish()?;
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        bail!("the password is empty");
    }
    let params = Params::new(m_cost, t_cost, 1, None).map_err(|e| anyhow!("argon2 costs: {e}"))?;
    let salt = SaltString::encode_b64(b"mailroom-loadgen").map_err(|e| anyhow!("salt: {e}"))?;
    let hash = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow!("hashing: {e}"))?;
    println!("{hash}");
    Ok(true)
}
