//! What the delivery engine tests need around them: loopback addresses that
//! share one port (the engine reaches every MX host on
//! `DeliveryConfig::smtp_port`), our own SMTP server as a sink, a scripted
//! SMTP sink whose RCPT replies a test decides, an engine over a SQLite
//! store in a temporary directory, and a deadline helper to wait on the
//! store instead of sleeping.
//!
//! ```ignore
//! let mut net = Net::bind(&[2, 3], &[]).await;      // 127.0.0.2:P, 127.0.0.3:P
//! let sink = MailSink::start(net.take(2), MailSinkSetup::mx(&["dest.test"])).await;
//! let dns = TestDns::builder().mx("dest.test", 10, "mx.dest.test")
//!     .a("mx.dest.test", Net::ip(2)).start().await?;
//! let h = Harness::new(&EngineSetup::new(net.port, &dns));
//! h.run();
//! let id = h.submit(message(Some("a@sender.test"), &["b@dest.test"], &content("hi"))).await;
//! let stored = h.wait_all(id, RecipientState::Delivered).await;
//! ```
//!
//! The test crate must declare `mod dns_support;` (this module uses its
//! `TestDns`).

#![allow(dead_code)]

use crate::shared::python_json;
pub use crate::shared::{addr, after_received, timeouts};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use mailroom_core::config::{DeliveryConfig, Role, SmtpUser, TlsMode, TlsPolicy};
use mailroom_core::time::now_unix_millis;
use mailroom_core::{
    BodyType, Envelope, Intake, IntakeError, MessageId, NewMessage, Notify, Origin, Recipient,
};
use mailroom_delivery::connection::ClientOptions;
use mailroom_delivery::dns::MxResolver;
use mailroom_delivery::engine::{Engine, entries_of};
use mailroom_delivery::scheduler::Scheduler;
use mailroom_smtp::{Credentials, ServerSettings, SessionConfig, ShutdownHandle, SmtpServer};
use mailroom_store::{
    AttemptRecord, ListQuery, RecipientState, SqliteOptions, SqliteStore, Store, StoredMessage,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::dns_support::TestDns;

pub const USER: &str = "relay-user";
pub const PASSWORD: &str = "relay-s3cret";
/// The engine's `hostname`: EHLO name and DSN reporting MTA.
pub const HOSTNAME: &str = "mailroom.test";

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Polls `check` every 20 ms until it returns `Some`, or panics after
/// `limit` naming `what`.
pub async fn wait_until<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long a test waits for anything by default.
pub const PATIENCE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Addresses on one port
// ---------------------------------------------------------------------------

/// Loopback addresses `127.0.0.h` sharing one port: listeners for the
/// hosts that are up, and for hosts that are "down" a socket bound but not
/// listening, so connecting is refused and no other test can take the
/// address meanwhile.
pub struct Net {
    pub port: u16,
    listeners: HashMap<u8, TcpListener>,
    _down: Vec<TcpSocket>,
}

impl Net {
    /// `127.0.0.h`.
    pub fn ip(h: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 0, h)
    }

    pub fn addr(&self, h: u8) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Net::ip(h), self.port))
    }

    /// Binds one free port on every host of `up` (listening) and `down`
    /// (bound only). `up` must not be empty.
    pub async fn bind(up: &[u8], down: &[u8]) -> Net {
        assert!(!up.is_empty(), "at least one listening host");
        let mut last_error = None;
        'attempt: for _ in 0..50 {
            let first = TcpListener::bind((Net::ip(up[0]), 0)).await.unwrap();
            let port = first.local_addr().unwrap().port();
            let mut listeners = HashMap::from([(up[0], first)]);
            for &h in &up[1..] {
                match TcpListener::bind((Net::ip(h), port)).await {
                    Ok(l) => {
                        listeners.insert(h, l);
                    }
                    Err(e) => {
                        last_error = Some(e);
                        continue 'attempt;
                    }
                }
            }
            let mut reserved = Vec::new();
            for &h in down {
                let socket = TcpSocket::new_v4().unwrap();
                match socket.bind(SocketAddr::V4(SocketAddrV4::new(Net::ip(h), port))) {
                    Ok(()) => reserved.push(socket),
                    Err(e) => {
                        last_error = Some(e);
                        continue 'attempt;
                    }
                }
            }
            return Net {
                port,
                listeners,
                _down: reserved,
            };
        }
        panic!("no port free on all of {up:?} {down:?}: {last_error:?}");
    }

    /// The listener of host `h` (once).
    pub fn take(&mut self, h: u8) -> TcpListener {
        self.listeners
            .remove(&h)
            .unwrap_or_else(|| panic!("127.0.0.{h} is not a listening host here"))
    }
}

// ---------------------------------------------------------------------------
// mailroom's own SMTP server as a sink
// ---------------------------------------------------------------------------

/// Keeps every accepted message; refuses them (temporarily) while told to
/// fail.
#[derive(Default)]
pub struct Recorder {
    messages: Mutex<Vec<NewMessage>>,
    fail: AtomicBool,
}

impl Intake for Recorder {
    async fn submit(&self, message: NewMessage) -> Result<(), IntakeError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(IntakeError::Store("told to fail".into()));
        }
        lock(&self.messages).push(message);
        Ok(())
    }
}

/// How a [`MailSink`] listens.
#[derive(Debug, Clone)]
pub struct MailSinkSetup {
    pub role: Role,
    pub tls: TlsMode,
    pub local_domains: Vec<String>,
}

impl MailSinkSetup {
    /// An MX for `domains`, without TLS.
    pub fn mx(domains: &[&str]) -> Self {
        MailSinkSetup {
            role: Role::Mx,
            tls: TlsMode::None,
            local_domains: domains.iter().map(|d| d.to_string()).collect(),
        }
    }

    /// A submission listener (AUTH required) with STARTTLS.
    pub fn submission() -> Self {
        MailSinkSetup {
            role: Role::Submission,
            tls: TlsMode::Starttls,
            local_domains: Vec::new(),
        }
    }
}

/// A mailroom SMTP server, with a self-signed certificate and the user
/// [`USER`]/[`PASSWORD`], recording what it accepts.
pub struct MailSink {
    pub addr: SocketAddr,
    intake: Arc<Recorder>,
    shutdown: ShutdownHandle,
    _dir: tempfile::TempDir,
}

impl MailSink {
    pub async fn start(listener: TcpListener, setup: MailSinkSetup) -> MailSink {
        let dir = tempfile::tempdir().unwrap();
        let (tls, _) = mailroom_smtp::tls::self_signed(dir.path(), "localhost").unwrap();
        let users = [SmtpUser {
            username: USER.into(),
            password_hash: password_hash().to_owned(),
        }];
        let settings = ServerSettings {
            max_connections: 64,
            max_connections_per_ip: 64,
            command_timeout: Duration::from_secs(10),
            data_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(5),
        };
        let intake = Arc::new(Recorder::default());
        let (server, shutdown) = SmtpServer::new(
            settings,
            intake.clone(),
            Credentials::new(&users),
            Some(tls),
        );
        let addr = listener.local_addr().unwrap();
        let config = Arc::new(SessionConfig {
            hostname: format!("sink-{}", addr.ip()),
            role: setup.role,
            tls_mode: setup.tls,
            local_domains: setup.local_domains,
            max_message_size: 4 * 1024 * 1024,
            max_recipients: 100,
            max_line_length: 2048,
            max_errors: 10,
            allow_insecure_auth: false,
            relay_networks: Vec::new(),
            policy: None,
        });
        tokio::spawn(server.serve(listener, config));
        MailSink {
            addr,
            intake,
            shutdown,
            _dir: dir,
        }
    }

    pub fn messages(&self) -> Vec<NewMessage> {
        lock(&self.intake.messages).clone()
    }

    /// Makes the intake refuse (the client gets a 4xx) or accept again.
    pub fn set_failing(&self, fail: bool) {
        self.intake.fail.store(fail, Ordering::SeqCst);
    }

    /// Sessions open right now.
    pub fn sessions(&self) -> usize {
        self.shutdown.sessions()
    }

    /// Waits until the sink holds `n` messages; returns them.
    pub async fn wait_messages(&self, n: usize) -> Vec<NewMessage> {
        wait_until(
            &format!("{n} message(s) at the sink {}", self.addr),
            PATIENCE,
            || {
                let m = self.messages();
                (m.len() >= n).then_some(m)
            },
        )
        .await
    }
}

/// argon2 is slow on purpose: hash once per test binary.
fn password_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| mailroom_smtp::auth::hash_password(PASSWORD).unwrap())
}

// ---------------------------------------------------------------------------
// A scripted SMTP sink
// ---------------------------------------------------------------------------

/// Decides the reply line (without CRLF) to `RCPT TO:<address>`, given how
/// many times this address was asked for so far (1 the first time).
pub type RcptRule = dyn Fn(&str, usize) -> String + Send + Sync;

/// One message a [`ScriptedSink`] accepted.
#[derive(Debug, Clone)]
pub struct SinkMessage {
    pub from: String,
    pub to: Vec<String>,
    /// The content, dot-unstuffed, without the final dot line.
    pub data: Vec<u8>,
}

#[derive(Default)]
struct SinkStats {
    connections: AtomicUsize,
    active: AtomicUsize,
    max_active: AtomicUsize,
    rcpts: Mutex<HashMap<String, usize>>,
    messages: Mutex<Vec<SinkMessage>>,
}

/// A small SMTP server (EHLO without PIPELINING, MAIL, RCPT, DATA, RSET,
/// QUIT) whose RCPT replies come from a rule, counting connections and
/// the most open at once. A session counts as open from its accept until
/// its QUIT (or its end), so a client that said QUIT and went is not
/// counted while the server notices the close.
pub struct ScriptedSink {
    pub addr: SocketAddr,
    stats: Arc<SinkStats>,
    task: JoinHandle<()>,
}

impl ScriptedSink {
    /// `data_delay`: how long to think before answering the end of data
    /// (to make sessions overlap when they can).
    pub fn start(
        listener: TcpListener,
        rule: impl Fn(&str, usize) -> String + Send + Sync + 'static,
        data_delay: Duration,
    ) -> ScriptedSink {
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(SinkStats::default());
        let rule: Arc<RcptRule> = Arc::new(rule);
        let task = tokio::spawn({
            let stats = stats.clone();
            async move {
                let mut sessions = JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    stats.connections.fetch_add(1, Ordering::SeqCst);
                    let now = stats.active.fetch_add(1, Ordering::SeqCst) + 1;
                    stats.max_active.fetch_max(now, Ordering::SeqCst);
                    sessions.spawn(session(stream, stats.clone(), rule.clone(), data_delay));
                    while sessions.try_join_next().is_some() {}
                }
            }
        });
        ScriptedSink { addr, stats, task }
    }

    /// Always the same RCPT reply.
    pub fn replying(listener: TcpListener, reply: &'static str) -> ScriptedSink {
        ScriptedSink::start(listener, move |_, _| reply.to_owned(), Duration::ZERO)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.stats.connections.load(Ordering::SeqCst)
    }

    /// The most sessions open at once so far.
    pub fn max_concurrent(&self) -> usize {
        self.stats.max_active.load(Ordering::SeqCst)
    }

    /// How many times `RCPT TO:<address>` was sent.
    pub fn rcpt_count(&self, address: &str) -> usize {
        lock(&self.stats.rcpts).get(address).copied().unwrap_or(0)
    }

    pub fn messages(&self) -> Vec<SinkMessage> {
        lock(&self.stats.messages).clone()
    }
}

impl Drop for ScriptedSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn session(
    stream: TcpStream,
    stats: Arc<SinkStats>,
    rule: Arc<RcptRule>,
    data_delay: Duration,
) {
    let mut counted = true;
    let _ = converse(stream, &stats, rule.as_ref(), data_delay, &mut counted).await;
    if counted {
        stats.active.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn converse(
    stream: TcpStream,
    stats: &SinkStats,
    rule: &RcptRule,
    data_delay: Duration,
    counted: &mut bool,
) -> std::io::Result<()> {
    let (rx, mut tx) = stream.into_split();
    let mut rx = BufReader::new(rx);
    tx.write_all(b"220 scripted.sink ESMTP\r\n").await?;
    let mut from: Option<String> = None;
    let mut to: Vec<String> = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = tokio::time::timeout(Duration::from_secs(30), rx.read_until(b'\n', &mut line))
            .await
            .map_err(|_| std::io::Error::other("client silent"))??;
        if n == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        let verb = text
            .split([' ', ':'])
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let reply: String = match verb.as_str() {
            "EHLO" => "250-scripted.sink\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES".into(),
            "HELO" => "250 scripted.sink".into(),
            "MAIL" => {
                from = Some(path_of(&text));
                to.clear();
                "250 2.1.0 Sender ok".into()
            }
            "RCPT" if from.is_some() => {
                let address = path_of(&text);
                let nth = {
                    let mut rcpts = lock(&stats.rcpts);
                    let n = rcpts.entry(address.clone()).or_default();
                    *n += 1;
                    *n
                };
                let reply = rule(&address, nth);
                if reply.starts_with('2') {
                    to.push(address);
                }
                reply
            }
            "DATA" if to.is_empty() => "554 5.5.1 No valid recipients".into(),
            "DATA" => {
                tx.write_all(b"354 Go ahead\r\n").await?;
                let mut data = Vec::new();
                loop {
                    line.clear();
                    if rx.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" {
                        break;
                    }
                    let unstuffed = if line.starts_with(b"..") {
                        &line[1..]
                    } else {
                        &line[..]
                    };
                    data.extend_from_slice(unstuffed);
                }
                tokio::time::sleep(data_delay).await;
                lock(&stats.messages).push(SinkMessage {
                    from: from.take().unwrap_or_default(),
                    to: std::mem::take(&mut to),
                    data,
                });
                "250 2.0.0 Queued".into()
            }
            "RSET" => {
                from = None;
                to.clear();
                "250 2.0.0 Reset".into()
            }
            "NOOP" => "250 2.0.0 Ok".into(),
            "QUIT" => {
                stats.active.fetch_sub(1, Ordering::SeqCst);
                *counted = false;
                tx.write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(());
            }
            "RCPT" => "503 5.5.1 Need MAIL first".into(),
            _ => "502 5.5.2 Command not recognized".into(),
        };
        tx.write_all(reply.as_bytes()).await?;
        tx.write_all(b"\r\n").await?;
    }
}

/// `x@y` from `MAIL FROM:<x@y> PARAMS` / `RCPT TO:<x@y>`.
fn path_of(command: &str) -> String {
    let start = command.find('<').map_or(0, |i| i + 1);
    let end = command[start..]
        .find('>')
        .map_or(command.len(), |i| start + i);
    command[start..end].to_owned()
}

// ---------------------------------------------------------------------------
// The engine
// ---------------------------------------------------------------------------

/// What an engine under test is built from.
#[derive(Debug, Clone)]
pub struct EngineSetup {
    pub delivery: DeliveryConfig,
    pub client: ClientOptions,
    pub dns: mailroom_core::config::DnsConfig,
    pub local_domains: Vec<String>,
}

impl EngineSetup {
    /// MX delivery on `port`, DNS from `dns`, opportunistic TLS, retries
    /// after 200 ms (doubling, at most 1 s), mail kept for 60 s, 3 s
    /// client timeouts, no local domains.
    pub fn new(port: u16, dns: &TestDns) -> Self {
        EngineSetup {
            delivery: DeliveryConfig {
                smtp_port: port,
                tls: TlsPolicy::Opportunistic,
                concurrency: 16,
                connection_limit: 4,
                retry_initial: Duration::from_millis(200),
                retry_max: Duration::from_secs(1),
                max_lifetime: Duration::from_secs(60),
                routes: Vec::new(),
                ..DeliveryConfig::default()
            },
            client: ClientOptions {
                helo_name: HOSTNAME.into(),
                tls: TlsPolicy::Opportunistic,
                credentials: None,
                timeouts: timeouts(Duration::from_secs(3)),
                extra_roots: Vec::new(),
            },
            dns: dns.config(),
            local_domains: Vec::new(),
        }
    }
}

/// A store in a temporary directory and an engine over it. The engine
/// runs once [`Harness::run`] is called, until the harness is dropped.
pub struct Harness {
    pub store: SqliteStore,
    pub engine: Engine<SqliteStore>,
    pub dir: Arc<tempfile::TempDir>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Harness {
    /// A fresh store.
    pub fn new(setup: &EngineSetup) -> Harness {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        Harness::with_dir(dir, setup)
    }

    /// The store in `dir` (created, or opened again).
    pub fn with_dir(dir: Arc<tempfile::TempDir>, setup: &EngineSetup) -> Harness {
        let store = open_store(&dir);
        let engine = Engine::new(
            store.clone(),
            Scheduler::new(setup.delivery.connection_limit),
            MxResolver::new(&setup.dns).unwrap(),
            setup.client.clone(),
            &setup.delivery,
            HOSTNAME.into(),
            setup.local_domains.clone(),
        );
        Harness {
            store,
            engine,
            dir,
            task: Mutex::new(None),
        }
    }

    /// Starts delivering.
    pub fn run(&self) {
        let mut task = lock(&self.task);
        assert!(task.is_none(), "already running");
        *task = Some(tokio::spawn(self.engine.clone().run()));
    }

    /// Enqueues (durably) and schedules, as a front door does.
    pub async fn submit(&self, message: NewMessage) -> MessageId {
        let id = message.id;
        let entries = entries_of(&message);
        self.store.enqueue(message).await.unwrap();
        self.engine.schedule(entries);
        id
    }

    pub fn get(&self, id: MessageId) -> StoredMessage {
        self.store.get(&id).unwrap().expect("message is stored")
    }

    pub fn attempts(&self, id: MessageId) -> Vec<AttemptRecord> {
        self.store.attempts(&id).unwrap()
    }

    /// Polls the message until `done` holds for it.
    pub async fn wait_for(
        &self,
        id: MessageId,
        what: &str,
        done: impl Fn(&StoredMessage) -> bool,
    ) -> StoredMessage {
        let mut last = None;
        let found = wait_until_or(PATIENCE, || {
            let m = self.get(id);
            let ok = done(&m);
            last = Some(m.clone());
            ok.then_some(m)
        })
        .await;
        found
            .unwrap_or_else(|| panic!("timed out waiting for {what} of {id}; last seen: {last:#?}"))
    }

    /// Waits until every recipient of `id` is `state`.
    pub async fn wait_all(&self, id: MessageId, state: RecipientState) -> StoredMessage {
        self.wait_for(id, &format!("all recipients {state}"), |m| all_in(m, state))
            .await
    }

    /// Every stored DSN (origin protocol `dsn`), oldest first.
    pub fn bounces(&self) -> Vec<StoredMessage> {
        let mut list = self
            .store
            .list(&ListQuery {
                limit: 10_000,
                ..ListQuery::default()
            })
            .unwrap();
        list.reverse();
        list.into_iter()
            .filter(|s| s.reverse_path.is_none())
            .map(|s| self.get(s.id))
            .filter(|m| m.origin.protocol == "dsn")
            .collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

pub fn open_store(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(&dir.path().join("queue.db"), SqliteOptions::default()).unwrap()
}

/// Like [`wait_until`] but gives `None` at the deadline.
pub async fn wait_until_or<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn all_in(message: &StoredMessage, state: RecipientState) -> bool {
    message.recipients.iter().all(|r| r.state == state)
}

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

/// A message from `from` (`None`: the null reverse-path) to `to`, received
/// now, with no NOTIFY.
pub fn message(from: Option<&str>, to: &[&str], content: &[u8]) -> NewMessage {
    NewMessage {
        id: MessageId::new(),
        received_at: now_unix_millis(),
        envelope: Envelope {
            reverse_path: from.map(addr),
            recipients: to
                .iter()
                .map(|a| Recipient {
                    address: addr(a),
                    orcpt: None,
                    notify: Notify::empty(),
                })
                .collect(),
            env_id: None,
            ret: None,
            body_type: BodyType::SevenBit,
            smtputf8: false,
            priority: 0,
        },
        origin: Origin {
            protocol: "esmtp".into(),
            remote_ip: None,
            helo: Some("client.test".into()),
            auth_user: None,
            tls: None,
        },
        content: content.to_vec(),
        kept_locally: Vec::new(),
        meta: Default::default(),
    }
}

/// A small message whose subject names it.
pub fn content(subject: &str) -> Vec<u8> {
    format!(
        "From: <app@sender.test>\r\nTo: <someone@dest.test>\r\nSubject: {subject}\r\n\
         Message-ID: <{subject}@sender.test>\r\n\r\nHello.\r\n"
    )
    .into_bytes()
}

/// The value of the first header `name` in `content`'s header section.
pub fn header(content: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(content);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let prefix = format!("{}:", name.to_ascii_lowercase());
    head.split("\r\n")
        .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
        .map(|l| l[prefix.len()..].trim().to_owned())
}

// ---------------------------------------------------------------------------
// Reading a DSN the way a mail reader does
// ---------------------------------------------------------------------------

/// Parses a message with Python's `email` package and prints its report
/// structure as JSON.
const PARSE_REPORT: &str = r#"
import email, email.policy, json, sys
msg = email.message_from_bytes(sys.stdin.buffer.read(), policy=email.policy.default)
def fields(block):
    return [[k, str(v)] for k, v in block.items()]
def describe(part):
    ct = part.get_content_type()
    out = {"content_type": ct, "defects": [type(d).__name__ for d in part.defects]}
    if ct == "message/delivery-status":
        out["blocks"] = [fields(b) for b in part.get_payload()]
    elif ct == "message/rfc822":
        out["headers"] = fields(part.get_payload(0))
    elif ct == "text/rfc822-headers":
        inner = email.message_from_string(part.get_content(), policy=email.policy.default)
        out["headers"] = fields(inner)
    else:
        out["text"] = part.get_content()
    return out
print(json.dumps({
    "content_type": msg.get_content_type(),
    "report_type": msg.get_param("report-type"),
    "to": str(msg["to"]),
    "subject": str(msg["subject"]),
    "defects": [type(d).__name__ for d in msg.defects],
    "parts": [describe(p) for p in msg.iter_parts()] if msg.is_multipart() else [],
}))
"#;

/// What Python's `email` package sees in `message`.
pub fn parse_report(message: &[u8]) -> serde_json::Value {
    python_json(PARSE_REPORT, message)
}

/// A field of a parsed block (`[[name, value], ...]`), by name.
pub fn field<'a>(block: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    block.as_array()?.iter().find_map(|kv| {
        let kv = kv.as_array()?;
        kv[0]
            .as_str()?
            .eq_ignore_ascii_case(name)
            .then(|| kv[1].as_str())
            .flatten()
    })
}

// ---------------------------------------------------------------------------

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
