//! The I/O around [`Session`]: listeners, connection limits, timeouts, TLS
//! upgrades and graceful shutdown. Everything about SMTP itself lives in
//! the session; this module only moves bytes and waits.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use mailroom_core::config::TlsMode;
use mailroom_core::{Intake, SessionFacts};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::auth::Credentials;
use crate::session::{Event, Session, SessionConfig, TlsInfo, Waiting};

/// Limits and timeouts shared by every listener.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    /// Longest a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
}

/// Where the server is in its life; sessions watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Stop accepting; idle sessions close now, open transactions finish.
    Draining,
    /// Everyone still connected gets `421` and is closed.
    Closing,
}

/// The SMTP server: cheap to clone, one clone per listener.
pub struct SmtpServer<I> {
    shared: Arc<Shared<I>>,
}

impl<I> Clone for SmtpServer<I> {
    fn clone(&self) -> Self {
        SmtpServer {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<I> {
    settings: ServerSettings,
    intake: Arc<I>,
    credentials: Credentials,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
    phase: watch::Receiver<Phase>,
    sessions: SessionCount,
    next_session_id: AtomicU64,
    /// Capture mode: sessions record AUTH instead of checking it.
    capture: bool,
    /// Longest a write of replies may take (`command_timeout` unless the
    /// capture constructor was given its own).
    write_timeout: Duration,
}

/// Drives the server's shutdown from the binary.
pub struct ShutdownHandle {
    phase: watch::Sender<Phase>,
    sessions: SessionCount,
}

impl<I: Intake> SmtpServer<I> {
    pub fn new(
        settings: ServerSettings,
        intake: Arc<I>,
        credentials: Credentials,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> (Self, ShutdownHandle) {
        let write_timeout = settings.command_timeout;
        Self::build(settings, intake, credentials, tls, false, write_timeout)
    }

    /// A server for `mailroom capture`: every AUTH is accepted and recorded
    /// (see [`Session::new_capture`]) and handed to the intake with the
    /// message. Replies must be taken by the client within `write_timeout`.
    pub fn capture(
        settings: ServerSettings,
        intake: Arc<I>,
        tls: Option<Arc<rustls::ServerConfig>>,
        write_timeout: Duration,
    ) -> (Self, ShutdownHandle) {
        Self::build(
            settings,
            intake,
            Credentials::new(&[]),
            tls,
            true,
            write_timeout,
        )
    }

    fn build(
        settings: ServerSettings,
        intake: Arc<I>,
        credentials: Credentials,
        tls: Option<Arc<rustls::ServerConfig>>,
        capture: bool,
        write_timeout: Duration,
    ) -> (Self, ShutdownHandle) {
        let (phase_tx, phase_rx) = watch::channel(Phase::Running);
        let sessions = SessionCount::default();
        let limits =
            ConnectionLimits::new(settings.max_connections, settings.max_connections_per_ip);
        let server = SmtpServer {
            shared: Arc::new(Shared {
                settings,
                intake,
                credentials,
                tls: tls.map(TlsAcceptor::from),
                limits,
                phase: phase_rx,
                sessions: sessions.clone(),
                next_session_id: AtomicU64::new(1),
                capture,
                write_timeout,
            }),
        };
        (
            server,
            ShutdownHandle {
                phase: phase_tx,
                sessions,
            },
        )
    }

    /// Accepts connections on `listener` until shutdown begins.
    pub async fn serve(self, listener: TcpListener, config: Arc<SessionConfig>) {
        let shared = self.shared;
        let mut phase = shared.phase.clone();
        let local = listener.local_addr().ok();
        loop {
            if *phase.borrow() != Phase::Running {
                break;
            }
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => accept(&shared, stream, peer, &config),
                    Err(err) => {
                        // Usually EMFILE: back off instead of spinning.
                        warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                changed = phase.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
        }
        debug!(listener = ?local, "listener closed");
    }
}

fn accept<I: Intake>(
    shared: &Arc<Shared<I>>,
    stream: TcpStream,
    peer: SocketAddr,
    config: &Arc<SessionConfig>,
) {
    let Some(guard) = shared.limits.acquire(peer.ip()) else {
        // Best effort and without waiting: a flood must not tie up tasks.
        let mut out = Vec::new();
        mailroom_core::reply::TOO_MANY_CONNECTIONS.write_to(&mut out);
        let _ = stream.try_write(&out);
        debug!(%peer, "connection refused: limit reached");
        return;
    };
    let id = shared.next_session_id.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("session", session_id = id, %peer);
    let shared = shared.clone();
    let config = config.clone();
    let alive = shared.sessions.enter();
    tokio::spawn(
        async move {
            let _guard = guard;
            let _alive = alive;
            // Boxed: the session's state is several KiB, and an unboxed task
            // would have it copied whole as it is spawned and finished.
            if let Err(err) = Box::pin(connection(&shared, stream, peer, config)).await {
                debug!(error = %err, "session ended with an I/O error");
            }
        }
        .instrument(span),
    );
}

async fn connection<I: Intake>(
    shared: &Shared<I>,
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<SessionConfig>,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (conn, tls) = if config.tls_mode == TlsMode::Implicit {
        let Some(acceptor) = &shared.tls else {
            return Err(io::Error::other(
                "implicit TLS listener without a certificate",
            ));
        };
        let (tls, info) =
            handshake(acceptor, stream, shared.settings.tls_handshake_timeout).await?;
        (Conn::Tls(Box::new(tls)), Some(info))
    } else {
        (Conn::Plain(stream), None)
    };
    debug!("connected");
    let session = if shared.capture {
        Session::new_capture(config, peer.ip(), tls)
    } else {
        Session::new(config, peer.ip(), tls)
    };
    drive(shared, conn, session, peer).await
}

async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    limit: Duration,
) -> io::Result<(tokio_rustls::server::TlsStream<TcpStream>, TlsInfo)> {
    let tls = tokio::time::timeout(limit, acceptor.accept(stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let info = crate::tls::info(tls.get_ref().1);
    debug!(version = %info.version, cipher = %info.cipher, "TLS established");
    Ok((tls, info))
}

/// Room kept free in the read buffer: small while commands trickle in (so
/// thousands of idle sessions stay cheap), large while message data flows.
const COMMAND_READ: usize = 1024;
const DATA_READ: usize = 64 * 1024;

async fn drive<I: Intake>(
    shared: &Shared<I>,
    mut conn: Conn,
    mut session: Session,
    peer: SocketAddr,
) -> io::Result<()> {
    let mut phase = shared.phase.clone();
    let mut input: Vec<u8> = Vec::new();
    // One timer for the whole session, moved only when it fires early:
    // arming a fresh timeout for every read cost more than parsing the
    // command. `due` is when the current wait for the client times out.
    let mut due: Option<Instant> = None;
    let mut armed = Instant::now() + shared.settings.command_timeout;
    let idle = tokio::time::sleep_until(armed);
    tokio::pin!(idle);
    loop {
        let mut pos = 0;
        while pos < input.len() && !session.is_closed() {
            let (used, event) = session.feed(&input[pos..]);
            pos += used;
            match event {
                None if used == 0 => break,
                None => {}
                Some(Event::Authenticate { username, password }) => {
                    let ok = shared.credentials.verify(username.clone(), password).await;
                    if ok {
                        info!(user = %username, "authenticated");
                    } else {
                        warn!(user = %username, "authentication failed");
                    }
                    session.auth_result(ok);
                }
                Some(Event::Submit(message)) => {
                    let id = message.id;
                    let recipients = message.envelope.recipients.len();
                    let size = message.content.len();
                    let facts = SessionFacts {
                        remote_addr: Some(peer),
                        auth_attempt: session.auth_attempt().cloned(),
                    };
                    match shared.intake.accept(*message, facts).await {
                        Ok(receipt) => {
                            info!(message_id = %id, recipients, size, "queued");
                            session.accepted(id, receipt);
                        }
                        Err(err) => {
                            warn!(message_id = %id, error = %err, "not queued");
                            session.queued(id, Err(()));
                        }
                    }
                }
                Some(Event::StartTls) => {
                    write_output(&mut conn, &mut session, shared.write_timeout).await?;
                    // Whatever the client sent after STARTTLS in the clear is
                    // dropped here (CVE-2011-0411).
                    pos = input.len();
                    let Some(acceptor) = &shared.tls else {
                        return Err(io::Error::other("STARTTLS without a certificate"));
                    };
                    let Conn::Plain(tcp) = conn else {
                        return Err(io::Error::other("STARTTLS on a TLS connection"));
                    };
                    let (tls, info) =
                        handshake(acceptor, tcp, shared.settings.tls_handshake_timeout).await?;
                    conn = Conn::Tls(Box::new(tls));
                    session.tls_started(info);
                }
                Some(Event::Close) => break,
            }
        }
        input.clear();
        if session.is_closed() {
            write_output(&mut conn, &mut session, shared.write_timeout).await?;
            // TLS needs its close_notify; a plain socket is closed by the
            // drop, which saves a shutdown(2) per session.
            if let Conn::Tls(_) = conn {
                let _ = conn.shutdown().await;
            }
            debug!("closed");
            return Ok(());
        }

        let current = *phase.borrow_and_update();
        if current == Phase::Closing || (current == Phase::Draining && !session.in_transaction()) {
            session.shutdown();
            continue;
        }
        write_output(&mut conn, &mut session, shared.write_timeout).await?;

        let (want, limit) = match session.waiting() {
            Waiting::Command => (COMMAND_READ, shared.settings.command_timeout),
            Waiting::Data => (DATA_READ, shared.settings.data_timeout),
        };
        if input.capacity() > DATA_READ && want == COMMAND_READ {
            input = Vec::new();
        }
        if input.capacity() - input.len() < want / 2 {
            input.reserve(want);
        }
        let wait_until = *due.get_or_insert_with(|| Instant::now() + limit);
        if wait_until < armed {
            idle.as_mut().reset(wait_until);
            armed = wait_until;
        }
        tokio::select! {
            read = conn.read_buf(&mut input) => match read {
                Ok(0) => {
                    debug!("client closed the connection");
                    return Ok(());
                }
                Ok(_) => due = None,
                Err(err) => return Err(err),
            },
            () = &mut idle => {
                if Instant::now() >= wait_until {
                    debug!("timeout");
                    session.timeout();
                } else {
                    idle.as_mut().reset(wait_until);
                    armed = wait_until;
                }
            },
            changed = phase.changed() => {
                if changed.is_err() {
                    session.shutdown();
                }
            }
        }
    }
}

async fn write_output(conn: &mut Conn, session: &mut Session, limit: Duration) -> io::Result<()> {
    if session.output().is_empty() {
        return Ok(());
    }
    let write = async {
        conn.write_all(session.output()).await?;
        conn.flush().await
    };
    tokio::pin!(write);
    // Replies nearly always fit the socket buffer at once; a timer is armed
    // only for a client that is not reading.
    let done = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    match done {
        Poll::Ready(result) => result?,
        Poll::Pending => tokio::time::timeout(limit, write)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "write timed out"))??,
    }
    session.clear_output();
    Ok(())
}

impl ShutdownHandle {
    /// Stops accepting, lets open transactions finish for up to `grace`,
    /// then sends `421 4.3.2` to every session left and waits briefly for
    /// them to go. Returns how many sessions had to be cut off.
    pub async fn shutdown(self, grace: Duration) -> usize {
        let _ = self.phase.send(Phase::Draining);
        if self.sessions.wait_idle(grace).await {
            return 0;
        }
        let left = self.sessions.count();
        let _ = self.phase.send(Phase::Closing);
        self.sessions.wait_idle(Duration::from_secs(5)).await;
        left
    }

    /// Sessions currently open.
    pub fn sessions(&self) -> usize {
        self.sessions.count()
    }
}

/// Counts live sessions so shutdown can wait for them.
#[derive(Clone, Default)]
struct SessionCount {
    inner: Arc<(AtomicUsize, Notify)>,
}

struct SessionAlive {
    inner: Arc<(AtomicUsize, Notify)>,
}

impl SessionCount {
    fn enter(&self) -> SessionAlive {
        self.inner.0.fetch_add(1, Ordering::SeqCst);
        SessionAlive {
            inner: self.inner.clone(),
        }
    }

    fn count(&self) -> usize {
        self.inner.0.load(Ordering::SeqCst)
    }

    /// True when no session is left before `limit` passes.
    async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.inner.1.notified();
            if self.count() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.count() == 0;
            }
        }
    }
}

impl Drop for SessionAlive {
    fn drop(&mut self) {
        if self.inner.0.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.1.notify_waiters();
        }
    }
}

/// Concurrent sessions, in total and per client address.
struct ConnectionLimits {
    inner: Arc<LimitsInner>,
}

struct LimitsInner {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

struct ConnectionGuard {
    inner: Arc<LimitsInner>,
    ip: IpAddr,
}

impl ConnectionLimits {
    fn new(max_total: usize, max_per_ip: usize) -> Self {
        ConnectionLimits {
            inner: Arc::new(LimitsInner {
                max_total,
                max_per_ip,
                total: AtomicUsize::new(0),
                per_ip: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn acquire(&self, ip: IpAddr) -> Option<ConnectionGuard> {
        let inner = &self.inner;
        let mut per_ip = inner.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if inner.total.load(Ordering::Relaxed) >= inner.max_total {
            return None;
        }
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= inner.max_per_ip {
            return None;
        }
        *count += 1;
        inner.total.fetch_add(1, Ordering::Relaxed);
        Some(ConnectionGuard {
            inner: inner.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut per_ip = self.inner.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
        self.inner.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client connection, before or after TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_total_and_per_ip() {
        let limits = ConnectionLimits::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let g1 = limits.acquire(a).unwrap();
        let _g2 = limits.acquire(a).unwrap();
        assert!(limits.acquire(a).is_none(), "per-IP limit");
        let _g3 = limits.acquire(b).unwrap();
        assert!(limits.acquire(b).is_none(), "total limit");
        drop(g1);
        assert!(limits.acquire(a).is_some());
    }
}
