//! [`Capture`]: binds the SMTP and HTTP listeners, starts the worker pool,
//! the webhook sender and the cleanup timer, and takes them all down again.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mailroom_core::config::{CaptureConfig, Role, TlsMode};
use mailroom_smtp::{ServerSettings, SessionConfig, ShutdownHandle, SmtpServer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::attachments::AttachmentStore;
use crate::inbox::{Inbox, InboxError};
use crate::intake::CaptureIntake;
use crate::pool::{WorkerError, WorkerPool};
use crate::webhook::{Webhook, WebhookError};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create temp_dir {path}: {source}")]
    TempDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("[capture.workers]: {0}")]
    Workers(#[from] WorkerError),
    #[error("[capture.webhook]: {0}")]
    Webhook(#[from] WebhookError),
    #[error("{0}")]
    Inbox(#[from] InboxError),
}

/// A running capture server.
pub struct Capture {
    smtp_addr: SocketAddr,
    http_addr: SocketAddr,
    inbox: Arc<Inbox>,
    attachments: Arc<AttachmentStore>,
    pool: Option<WorkerPool>,
    smtp_shutdown: ShutdownHandle,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// How often expired tempfiles and inbox messages are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

impl Capture {
    pub async fn start(hostname: &str, config: &CaptureConfig) -> Result<Capture, CaptureError> {
        let smtp = TcpListener::bind(config.smtp)
            .await
            .map_err(|source| CaptureError::Listen {
                what: "SMTP",
                addr: config.smtp,
                source,
            })?;
        let http = TcpListener::bind(config.http)
            .await
            .map_err(|source| CaptureError::Listen {
                what: "HTTP",
                addr: config.http,
                source,
            })?;
        let smtp_addr = smtp.local_addr().unwrap_or(config.smtp);
        let http_addr = http.local_addr().unwrap_or(config.http);

        let temp_dir = config
            .temp_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("mailroom-capture"));
        if config.attachments == mailroom_core::config::AttachmentMode::Tempfile {
            std::fs::create_dir_all(&temp_dir).map_err(|source| CaptureError::TempDir {
                path: temp_dir.clone(),
                source,
            })?;
        }
        let attachments = Arc::new(AttachmentStore::new(
            config.attachments,
            temp_dir,
            config.cleanup_after,
        ));
        let inbox = {
            let (dir, max, age) = (config.data_dir.clone(), config.max_messages, config.max_age);
            tokio::task::spawn_blocking(move || Inbox::open(&dir, max, age))
                .await
                .map_err(|e| InboxError::Task(e.to_string()))??
        };
        let inbox = Arc::new(inbox);
        let pool = if config.workers.command.is_empty() {
            None
        } else {
            Some(WorkerPool::start(config.workers.clone()).await?)
        };
        let webhook = if config.webhook.url.is_empty() {
            None
        } else {
            Some(Webhook::start(
                &config.webhook.url,
                config.webhook.retries,
                config.webhook.timeout,
            )?)
        };
        let intake = Arc::new(CaptureIntake {
            inbox: inbox.clone(),
            attachments: attachments.clone(),
            pool: pool.clone(),
            webhook,
            include_raw: config.include_raw,
        });

        let settings = ServerSettings {
            // A developer's machine: many parallel test sessions from one
            // address are normal.
            max_connections: 4096,
            max_connections_per_ip: 4096,
            command_timeout: config.read_timeout,
            data_timeout: config.read_timeout,
            tls_handshake_timeout: config.read_timeout,
        };
        let session = Arc::new(SessionConfig {
            hostname: hostname.to_owned(),
            role: Role::Mx,
            tls_mode: TlsMode::None,
            local_domains: Vec::new(),
            max_message_size: match config.max_message_size {
                0 => usize::MAX,
                n => n,
            },
            max_recipients: config.max_recipients,
            max_line_length: 4096,
            max_errors: 20,
            allow_insecure_auth: true,
            relay_networks: Vec::new(),
            policy: None,
        });
        let (server, smtp_shutdown) =
            SmtpServer::capture(settings, intake, None, config.write_timeout);
        let mut tasks = vec![tokio::spawn(server.serve(smtp, session))];

        let (stop, mut stopped) = watch::channel(false);
        let app = crate::http::router(inbox.clone());
        let mut http_stop = stop.subscribe();
        tasks.push(tokio::spawn(async move {
            let serve = axum::serve(http, app).with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            });
            if let Err(err) = serve.await {
                warn!(error = %err, "HTTP server stopped");
            }
        }));
        let sweeper_inbox = inbox.clone();
        let sweeper_files = attachments.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(SWEEP_EVERY) => {}
                    _ = stopped.wait_for(|s| *s) => return,
                }
                if let Err(err) = sweeper_inbox
                    .expire(mailroom_core::time::now_unix_millis())
                    .await
                {
                    warn!(error = %err, "cannot expire old inbox messages");
                }
                let files = sweeper_files.clone();
                let _ = tokio::task::spawn_blocking(move || files.sweep()).await;
            }
        }));
        info!(smtp = %smtp_addr, http = %http_addr, "capture mode: accepting all mail (never expose these ports)");
        Ok(Capture {
            smtp_addr,
            http_addr,
            inbox,
            attachments,
            pool,
            smtp_shutdown,
            stop,
            tasks,
        })
    }

    pub fn smtp_addr(&self) -> SocketAddr {
        self.smtp_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn inbox(&self) -> &Arc<Inbox> {
        &self.inbox
    }

    /// Stops listening, lets open transactions finish for up to `grace`,
    /// stops the workers, closes the inbox file and deletes every tempfile
    /// attachment.
    pub async fn shutdown(self, grace: Duration) {
        let cut = self.smtp_shutdown.shutdown(grace).await;
        if cut > 0 {
            warn!(
                sessions = cut,
                "sessions closed at the end of the grace period"
            );
        }
        let _ = self.stop.send(true);
        if let Some(pool) = &self.pool {
            pool.shutdown().await;
        }
        for task in self.tasks {
            task.abort();
        }
        self.inbox.close().await;
        let files = self.attachments.clone();
        let _ = tokio::task::spawn_blocking(move || files.remove_all()).await;
        info!("capture stopped");
    }
}
