//! `mailroom serve`: open the store, bind the listeners, run until SIGTERM
//! or SIGINT, then shut down without losing what was acknowledged.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mailroom_core::config::{Config, LogFormat, TlsMode};
use mailroom_core::decimal::Decimal;
use mailroom_core::{Intake, IntakeError, MessageId, NewMessage};
use mailroom_delivery::connection::ClientOptions;
use mailroom_delivery::dns::MxResolver;
use mailroom_delivery::engine::{Engine, entries_of};
use mailroom_delivery::scheduler::Scheduler;
use mailroom_smtp::{Credentials, ServerSettings, SessionConfig, SmtpServer};
use mailroom_store::{SqliteOptions, SqliteStore, Store, StoreError};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::config_file::absolute;

pub fn run(config: Config) -> anyhow::Result<()> {
    init_logging(&config)?;
    raise_open_files_limit();
    return_large_allocations();
    let workers = match config.worker_threads {
        // The store's writer thread needs a core of its own under load.
        0 => std::thread::available_parallelism()
            .map(|n| n.get().saturating_sub(1).max(1))
            .unwrap_or(1),
        n => n,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .thread_name("mailroom")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Before anything listens: a signal that arrives once clients can
    // connect must find its handler in place, or it would kill the process
    // without the graceful shutdown.
    let signals = Signals::install()?;
    let data_dir = absolute(&config.data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data_dir {}", data_dir.display()))?;
    let db = data_dir.join("mailroom.db");
    let store = SqliteStore::open(
        &db,
        SqliteOptions {
            max_batch: config.store.max_batch,
            ..SqliteOptions::default()
        },
    )
    .with_context(|| format!("cannot open the store {}", db.display()))?;

    let scheduler = Scheduler::with_rate(
        config.delivery.connection_limit,
        config.delivery.max_message_rate,
    );
    let dns = MxResolver::new(&config.dns).context("[dns]")?;
    let client = ClientOptions {
        helo_name: config.hostname.clone(),
        tls: config.delivery.tls,
        ..ClientOptions::default()
    };
    let engine = Engine::new(
        store.clone(),
        scheduler,
        dns,
        client,
        &config.delivery,
        config.hostname.clone(),
        config.local_domains.clone(),
    );
    let scheduled = engine.load().context("cannot load the queue")?;
    info!(recipients = scheduled, "queue loaded");
    let delivery = tokio::spawn(engine.clone().run());
    let engine_for_shutdown = engine.clone();
    let control_listener = crate::control::bind(&data_dir).with_context(|| {
        format!(
            "cannot create the control socket {}",
            crate::control::socket_path(&data_dir).display()
        )
    })?;
    let control = tokio::spawn(crate::control::serve(control_listener, engine.clone()));

    let needs_tls = config.smtp.listeners.iter().any(|l| l.tls != TlsMode::None);
    let tls = if !needs_tls {
        None
    } else if let Some(files) = &config.tls {
        let tls = mailroom_smtp::tls::from_files(&files.cert, &files.key).context("[tls]")?;
        info!(cert = %files.cert.display(), "TLS certificate loaded");
        Some(tls)
    } else {
        let (tls, source) =
            mailroom_smtp::tls::self_signed(&data_dir.join("tls"), &config.hostname)
                .context("self-signed TLS certificate")?;
        info!(
            ?source,
            "using a self-signed TLS certificate (set [tls] cert and key for a real one)"
        );
        Some(tls)
    };

    let mut listeners = Vec::new();
    for (i, l) in config.smtp.listeners.iter().enumerate() {
        let listener = listen(l.addr)
            .with_context(|| format!("cannot listen on {} (smtp.listeners[{i}])", l.addr))?;
        listeners.push((listener, l.clone()));
    }

    let settings = ServerSettings {
        max_connections: config.smtp.max_connections,
        max_connections_per_ip: config.smtp.max_connections_per_ip,
        command_timeout: config.smtp.command_timeout,
        data_timeout: config.smtp.data_timeout,
        tls_handshake_timeout: Duration::from_secs(30).min(config.smtp.command_timeout),
    };
    let logins = Arc::new(mailroom_smtp::auth::Logins::from_config(&config.smtp.users));
    let credentials = Credentials::with_logins(logins.clone());
    // Tenants' message events, for their webhooks. Bounded: if webhook
    // bookkeeping falls behind, delivery waits for it rather than losing
    // events.
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(4096);
    let events = config.http.addr.is_some().then_some(events_tx);
    if let Some(tx) = &events {
        engine.report_to(tx.clone());
    }
    let providers = engine.providers();
    let routing = mailroom_api::Routing::load(&store, &providers)
        .context("cannot load providers and routing rules")?;
    let intake = Arc::new(QueueIntake {
        store: store.clone(),
        engine,
        logins: logins.clone(),
        events,
        routing: routing.clone(),
    });
    let rates = Arc::new(mailroom_policy::RateLimiter::new());
    // Tenants' SMTP logins follow their account's rules; the API owns the
    // accounts, so without it only `[[smtp.users]]` logins exist.
    let mut policy: Option<Arc<dyn mailroom_core::SessionPolicy>> = None;
    let http = match config.http.addr {
        Some(addr) => {
            let listener =
                listen(addr).with_context(|| format!("cannot listen on {addr} (http.addr)"))?;
            let settings = mailroom_api::ApiSettings {
                hostname: config.hostname.clone(),
                admin_key: config.http.admin_key.clone(),
                max_body_size: config.http.max_body_size,
                max_message_size: config.smtp.max_message_size,
                max_recipients: config.smtp.max_recipients,
                cors_origins: config.http.cors_origins.clone(),
                webhooks: mailroom_api::webhooks::WebhookSettings {
                    retry_initial: config.http.webhook_retry_initial,
                    max_attempts: config.http.webhook_max_attempts,
                    timeout: config.http.webhook_timeout,
                },
            };
            let state = mailroom_api::state(
                store.clone(),
                intake.clone(),
                settings,
                rates.clone(),
                logins.clone(),
                providers.clone(),
                routing.clone(),
            )
            .context("cannot load accounts and API keys")?;
            if config.http.admin_key.is_none() {
                info!(
                    "no http.admin_key (MAILROOM_HTTP__ADMIN_KEY): only existing account keys are accepted"
                );
            }
            info!(addr = %addr, "HTTP API listening");
            tokio::spawn(mailroom_api::flush_key_use(state.clone()));
            tokio::spawn(mailroom_api::webhooks::dispatch(state.clone(), events_rx));
            policy = Some(Arc::new(mailroom_api::TenantPolicy::new(state.clone())) as _);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let app = mailroom_api::router(state);
            let task = tokio::spawn(async move {
                let result = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await;
                if let Err(e) = result {
                    warn!(error = %e, "HTTP server failed");
                }
            });
            Some((stop, task))
        }
        None => None,
    };
    let (server, shutdown) = SmtpServer::new(settings, intake, credentials, tls);
    for (listener, l) in listeners {
        let session = Arc::new(SessionConfig {
            hostname: config.hostname.clone(),
            role: l.role,
            tls_mode: l.tls,
            local_domains: config.local_domains.clone(),
            max_message_size: config.smtp.max_message_size,
            max_recipients: config.smtp.max_recipients,
            max_line_length: config.smtp.max_line_length,
            max_errors: config.smtp.max_errors,
            allow_insecure_auth: config.smtp.allow_insecure_auth,
            relay_networks: config.smtp.relay_networks.clone(),
            policy: policy.clone(),
        });
        info!(addr = %l.addr, role = ?l.role, tls = ?l.tls, "SMTP listening");
        tokio::spawn(server.clone().serve(listener, session));
    }
    info!(data_dir = %data_dir.display(), hostname = %config.hostname, "mailroom ready");

    signals.wait().await;
    info!(
        sessions = shutdown.sessions(),
        grace = ?config.shutdown_timeout,
        "shutting down: no new connections; open transactions may finish"
    );
    // The API stops taking connections with SMTP; requests in progress
    // finish (their 202s wait for the store, which is still open).
    let http_done = http.map(|(stop, task)| {
        let _ = stop.send(());
        task
    });
    let cut = shutdown.shutdown(config.shutdown_timeout).await;
    if let Some(task) = http_done
        && tokio::time::timeout(config.shutdown_timeout, task)
            .await
            .is_err()
    {
        warn!("HTTP requests still running were cut off");
    }
    if cut > 0 {
        warn!(
            sessions = cut,
            "sessions closed with 421 at the end of the grace period"
        );
    }
    // No new deliveries start; those in flight get a few seconds to finish
    // and record their results. Any cut short are still queued in the store
    // and go out again after the next start.
    delivery.abort();
    control.abort();
    let _ = std::fs::remove_file(crate::control::socket_path(&data_dir));
    if !engine_for_shutdown.drain(Duration::from_secs(10)).await {
        warn!("deliveries still in flight were cut off; they are retried at the next start");
    }
    store.close().await;
    info!("stopped");
    Ok(())
}

/// Intake for the front doors: store the message durably, then tell the
/// delivery engine about it.
struct QueueIntake {
    store: SqliteStore,
    engine: Engine<SqliteStore>,
    logins: Arc<mailroom_smtp::auth::Logins>,
    events: Option<tokio::sync::mpsc::Sender<mailroom_core::MessageEvent>>,
    routing: Arc<mailroom_api::Routing>,
}

impl QueueIntake {
    /// Stores a routed message, schedules it, and reports it queued.
    async fn queue(&self, mut message: NewMessage) -> Result<(), StoreError> {
        // Tenants' rules first: a recipient a rule sends through a provider
        // is not kept locally even if its domain is local.
        self.routing.route(&mut message);
        self.engine.route_locally(&mut message);
        let entries = entries_of(&message);
        let queued = match (&self.events, &message.meta.account) {
            (Some(tx), Some(account)) => Some((
                tx,
                mailroom_core::MessageEvent {
                    kind: mailroom_core::EventKind::Queued,
                    message_id: message.id,
                    account: account.clone(),
                    recipient: None,
                    at: message.received_at,
                    reply: None,
                    mx_host: None,
                },
            )),
            _ => None,
        };
        self.store.enqueue(message).await?;
        self.engine.schedule(entries);
        if let Some((tx, event)) = queued {
            let _ = tx.send(event).await;
        }
        Ok(())
    }
}

impl mailroom_api::Queue for QueueIntake {
    fn submit(
        &self,
        message: NewMessage,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + '_>> {
        Box::pin(self.queue(message))
    }

    fn reschedule(&self, id: &MessageId) {
        if let Err(e) = self.engine.reschedule(id) {
            warn!(message_id = %id, error = %e, "cannot reschedule");
        }
    }
}

impl Intake for QueueIntake {
    async fn submit(&self, mut message: NewMessage) -> Result<(), IntakeError> {
        // Mail from a tenant's SMTP login belongs to that account, as if it
        // had come through the API with the account's key.
        if message.meta.account.is_none()
            && let Some(user) = &message.origin.auth_user
        {
            message.meta.account = self.logins.account_of(user);
        }
        self.queue(message).await.map_err(|e| match e {
            StoreError::ShuttingDown => IntakeError::ShuttingDown,
            other => IntakeError::Store(other.to_string()),
        })
    }
}

/// The signals that stop the server.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM received"),
            _ = self.int.recv() => info!("SIGINT received"),
        }
    }
}

/// Pending connections the kernel may hold for us. tokio's default (128)
/// overflows when hundreds of clients connect at once, and with SYN
/// cookies the client then waits for a greeting that never comes.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

pub(crate) fn init_logging(config: &Config) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&config.log.level)
        .with_context(|| format!("log.level {:?} is not a valid filter", config.log.level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(LogTime)
        .with_writer(std::io::stderr);
    let result = match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        // Plain text even on a terminal: with tracing-subscriber's `ansi`
        // feature every event paid for colour wrappers, written or not,
        // about a twentieth of the CPU an SMTP message costs.
        LogFormat::Pretty => builder.try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot start logging: {e}"))
}

/// RFC 3339 UTC timestamps with microseconds, as tracing-subscriber writes
/// them, but with the date and time of day formatted once a second (per
/// thread) instead of for every line: a busy server logs a line per message.
struct LogTime;

impl tracing_subscriber::fmt::time::FormatTime for LogTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        use std::cell::RefCell;
        thread_local! {
            static SECOND: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = now.as_secs();
        SECOND.with(|second| {
            let mut second = second.borrow_mut();
            if second.0 != secs || second.1.is_empty() {
                let secs_i64 = i64::try_from(secs).unwrap_or(i64::MAX);
                *second = (
                    secs,
                    mailroom_core::time::iso_datetime(secs_i64).replacen(' ', "T", 1),
                );
            }
            w.write_str(&second.1)
        })?;
        w.write_char('.')?;
        w.write_str(Decimal::new(now.subsec_micros().into(), 6).as_str())?;
        w.write_char('Z')
    }
}

/// glibc raises its mmap threshold each time a large block is freed, after
/// which blocks of that size come from per-thread arenas and stay resident.
/// argon2 takes 19 MiB per password check on a blocking-pool thread, so
/// every AUTH would leave ~19 MiB behind (measured: 50 logins, 360 MiB).
/// A fixed threshold keeps large blocks (password checks, big messages) in
/// their own mappings, returned to the system when freed.
fn return_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_MMAP_THRESHOLD: i32 = -3;
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only changes allocator tuning; it is called before
        // any other thread exists.
        let ok = unsafe { mallopt(M_MMAP_THRESHOLD, 1024 * 1024) };
        if ok != 1 {
            warn!("cannot set the allocator's mmap threshold");
        }
    }
}

/// Thousands of idle SMTP sessions need thousands of descriptors; the soft
/// limit is often 1024 while the hard limit allows far more.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(err) => warn!(error = %err, "cannot raise the open files limit"),
    }
}
