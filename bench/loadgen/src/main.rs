//! mailroom-loadgen: the load that `smtp-source` cannot make, and the
//! measurements the benchmark scripts need.
//!
//! - `idle`: thousands of idle SMTP sessions, then a NOOP on each.
//! - `send`: a pipelining sender with throughput and latency percentiles.
//! - `sink`: a counting SMTP sink that measures delivery latency.
//! - `dns`: an authoritative DNS server with MX records for the delivery
//!   benchmarks.
//! - `hash-password`: a cheap argon2id hash for a benchmark login.
//! - `watch` / `cpu`: memory and CPU of a server's process tree from /proc.
//!
//! This is a benchmark tool, not part of the server: it trades generality for
//! a small build and plain key=value output that shell scripts can parse.

mod args;
mod dns;
mod hash;
mod idle;
mod procstat;
mod send;
mod sink;
mod smtp;

use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::args::Args;

const USAGE: &str = "usage: mailroom-loadgen <idle|send|sink|dns|hash-password|watch|cpu> [options]   (--help after a subcommand for its options)";

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("mailroom-loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    let mut argv = std::env::args().skip(1);
    let Some(command) = argv.next() else {
        eprintln!("{USAGE}");
        return Ok(false);
    };
    let rest: Vec<String> = argv.collect();
    let usage = match command.as_str() {
        "idle" => idle::USAGE,
        "send" => send::USAGE,
        "sink" => sink::USAGE,
        "dns" => dns::USAGE,
        "hash-password" => hash::USAGE,
        "watch" => procstat::WATCH_USAGE,
        "cpu" => procstat::CPU_USAGE,
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            return Ok(true);
        }
        other => anyhow::bail!("unknown subcommand {other:?}\n{USAGE}"),
    };
    if rest.iter().any(|a| a == "-h" || a == "--help") {
        println!("{usage}");
        return Ok(true);
    }
    let flags: &[&str] = match command.as_str() {
        "send" => &["reuse", "no-pipelining", "stamp"],
        "watch" => &["pss"],
        _ => &[],
    };
    let args = Args::parse(rest, flags).map_err(|e| anyhow::anyhow!("{e}\n{usage}"))?;

    match command.as_str() {
        "cpu" => procstat::cpu(args),
        "hash-password" => hash::run(args),
        "watch" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(procstat::watch(args)),
        _ => {
            raise_nofile();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            match command.as_str() {
                "idle" => runtime.block_on(idle::run(args)),
                "sink" => runtime.block_on(sink::run(args)),
                "dns" => runtime.block_on(dns::run(args)),
                _ => runtime.block_on(send::run(args)),
            }
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: every connection is a
/// descriptor. Failure is reported, not fatal; connects will fail loudly.
fn raise_nofile() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => eprintln!("open file limit: {n}"),
        Err(e) => eprintln!("could not raise the open file limit: {e}"),
    }
}
