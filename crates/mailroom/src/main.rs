//! The `mailroom` binary: command line, wiring and signal handling. Thin by
//! design: the work happens in the library crates.

mod api_client;
mod capture;
mod config_file;
mod control;
mod queue;
mod serve;

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mailroom_core::config::Config;

#[derive(Parser)]
#[command(name = "mailroom", version, about = "A mail server for applications")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (embedded defaults when no config file is given).
    Serve {
        /// TOML, YAML or JSON config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run capture mode: a mail catcher for development that accepts every
    /// message, shows it in a web UI and hands it to workers. Never expose
    /// it to the internet.
    Capture {
        /// TOML, YAML or JSON config file (its `[capture]` section).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// SMTP address (default 127.0.0.1:1025).
        #[arg(long)]
        smtp: Option<std::net::SocketAddr>,
        /// Web UI and API address (default 127.0.0.1:8025).
        #[arg(long)]
        http: Option<std::net::SocketAddr>,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print an argon2 hash of a password read from standard input, for
    /// `[[smtp.users]] password_hash`.
    HashPassword,
    /// Manage accounts (tenants) through the HTTP API, with the admin key.
    Account {
        #[command(flatten)]
        target: ApiTarget,
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// Manage an account's API keys through the HTTP API.
    Key {
        #[command(flatten)]
        target: ApiTarget,
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Send a message through the HTTP API.
    Send {
        #[command(flatten)]
        target: ApiTarget,
        #[command(flatten)]
        args: SendArgs,
    },
    /// Look into the queue.
    Queue {
        /// The server's config file (to find its data directory).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: QueueCommand,
    },
}

/// Which API to talk to, and as whom.
#[derive(clap::Args)]
struct ApiTarget {
    /// The server's config file: its `http.addr` and `http.admin_key`.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// The API's base URL, e.g. http://127.0.0.1:8080 (default: from the config).
    #[arg(long, global = true)]
    url: Option<String>,
    /// The Bearer key (default: the config's http.admin_key).
    #[arg(long, global = true)]
    key: Option<String>,
}

#[derive(Subcommand)]
enum AccountCommand {
    /// Create an account.
    Create {
        name: String,
        #[arg(long)]
        contact: Option<String>,
        /// A domain the account may send from (repeat for more; none: any).
        #[arg(long)]
        domain: Vec<String>,
        #[arg(long)]
        messages_per_minute: Option<u32>,
        #[arg(long)]
        recipients_per_day: Option<u32>,
    },
    /// List accounts.
    List,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create an API key for an account; its secret is printed once.
    Create {
        /// The account id.
        account: String,
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Revoke an API key.
    Revoke {
        /// The account id.
        account: String,
        /// The key id (from `key create` or the API's key list).
        #[arg(value_name = "KEY_ID")]
        key_id: String,
    },
}

#[derive(clap::Args)]
struct SendArgs {
    #[arg(long)]
    from: String,
    /// A recipient (repeat for more).
    #[arg(long, required = true)]
    to: Vec<String>,
    #[arg(long)]
    cc: Vec<String>,
    #[arg(long)]
    bcc: Vec<String>,
    #[arg(long)]
    subject: Option<String>,
    /// The text body.
    #[arg(long, conflicts_with = "text_file")]
    text: Option<String>,
    /// Read the text body from a file.
    #[arg(long)]
    text_file: Option<PathBuf>,
    /// Read an HTML body from a file.
    #[arg(long)]
    html_file: Option<PathBuf>,
    /// A tag (repeat for more).
    #[arg(long)]
    tag: Vec<String>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file and print the effective configuration with
    /// secrets masked.
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// List messages, newest first.
    List {
        /// Only messages in this state: queued, deferred, held, delivered, failed.
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one message: envelope, recipients and their states, attempts,
    /// headers.
    Show {
        id: String,
        /// Print the whole message, not just its headers.
        #[arg(long)]
        content: bool,
    },
    /// Try queued and deferred recipients again now.
    Retry {
        /// The message; or --all.
        id: Option<String>,
        /// Every message with recipients still to deliver.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Hold a message's undelivered recipients until released.
    Hold { id: String },
    /// Release held recipients: they are tried at once.
    Release { id: String },
    /// Delete a message (undelivered recipients are dropped, no bounce).
    Delete { id: String },
    /// Fail a message's undelivered recipients now and bounce them to the
    /// sender.
    Bounce { id: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => load(config.as_deref()).and_then(serve::run),
        Command::Capture { config, smtp, http } => {
            load(config.as_deref()).and_then(|config| capture::run(config, smtp, http))
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => config_check(&file),
        Command::HashPassword => hash_password(),
        Command::Account { target, command } => load(target.config.as_deref())
            .and_then(|config| api_client::account(&config, &target, command)),
        Command::Key { target, command } => load(target.config.as_deref())
            .and_then(|config| api_client::key(&config, &target, command)),
        Command::Send { target, args } => load(target.config.as_deref())
            .and_then(|config| api_client::send(&config, &target, args)),
        Command::Queue { config, command } => {
            load(config.as_deref()).and_then(|config| queue::run(&config, command))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mailroom: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    Ok(config_file::load(path, std::env::vars())?)
}

fn config_check(file: &Path) -> anyhow::Result<()> {
    let config = config_file::load(Some(file), std::env::vars())?;
    let text = config_file::render_masked(&config)
        .map_err(|e| anyhow::anyhow!("cannot render the configuration: {e}"))?;
    println!(
        "# {}: valid; effective configuration (secrets masked):",
        file.display()
    );
    print!("{text}");
    Ok(())
}

fn hash_password() -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprint!("Password: ");
        std::io::stderr().flush().ok();
        set_echo(false);
    }
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if interactive {
        set_echo(true);
        eprintln!();
    }
    read.context("cannot read the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(!password.is_empty(), "the password is empty");
    let hash = mailroom_smtp::auth::hash_password(password)
        .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?;
    println!("{hash}");
    Ok(())
}

/// Turns terminal echo off while a password is typed (best effort: without
/// `stty` the password is simply visible).
fn set_echo(on: bool) {
    let _ = std::process::Command::new("stty")
        .arg(if on { "echo" } else { "-echo" })
        .stdin(std::process::Stdio::inherit())
        .status();
}
