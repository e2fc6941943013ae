//! `mailroom capture`: the same SMTP server as a developer's mail catcher,
//! with the web UI and workers of `mailroom-capture`. This module only
//! applies the command-line flags, starts it and waits for a signal.

use std::net::SocketAddr;

use anyhow::Context;
use mailroom_capture::Capture;
use mailroom_core::config::Config;
use tracing::{info, warn};

pub fn run(
    mut config: Config,
    smtp: Option<SocketAddr>,
    http: Option<SocketAddr>,
) -> anyhow::Result<()> {
    if let Some(addr) = smtp {
        config.capture.smtp = addr;
    }
    if let Some(addr) = http {
        config.capture.http = addr;
    }
    config
        .capture
        .validate()
        .context("invalid capture settings")?;
    crate::serve::init_logging(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mailroom-capture")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    for (what, addr) in [("smtp", config.capture.smtp), ("http", config.capture.http)] {
        if !addr.ip().is_loopback() {
            warn!(%addr, "capture {what} is not on a loopback address: anyone who can reach it can send mail and read every captured message");
        }
    }
    let capture = Capture::start(&config.hostname, &config.capture)
        .await
        .context("cannot start capture mode")?;
    info!(
        smtp = %capture.smtp_addr(),
        web = %format!("http://{}/", capture.http_addr()),
        "mailroom capture ready"
    );
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    capture.shutdown(config.shutdown_timeout).await;
    Ok(())
}
