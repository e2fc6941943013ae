//! What the SMTP client tests need around them: our own SMTP server on a
//! free port with an intake that records messages, scripted fake servers
//! that play a canned conversation, and a proxy that rewrites the server's
//! words.

pub use crate::shared::{addr, after_received, timeouts};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use mailroom_core::config::{Role, SmtpUser, TlsMode, TlsPolicy};
use mailroom_core::{Address, BodyType, Intake, IntakeError, NewMessage, Notify, Recipient};
use mailroom_delivery::connection::{ClientOptions, OutboundEnvelope};
use mailroom_smtp::{Credentials, ServerSettings, SessionConfig, ShutdownHandle, SmtpServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;

pub const USER: &str = "app";
pub const PASSWORD: &str = "s3cret";
pub const LOCAL_DOMAIN: &str = "example.test";

// ---------------------------------------------------------------------------
// Our own server
// ---------------------------------------------------------------------------

/// Keeps every accepted message.
#[derive(Default)]
pub struct Recorder {
    messages: Mutex<Vec<NewMessage>>,
}

impl Intake for Recorder {
    async fn submit(&self, message: NewMessage) -> Result<(), IntakeError> {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(message);
        Ok(())
    }
}

/// How the server under test listens.
#[derive(Debug, Clone, Copy)]
pub struct ServerSetup {
    pub role: Role,
    pub tls: TlsMode,
    pub max_recipients: usize,
    pub allow_insecure_auth: bool,
}

impl Default for ServerSetup {
    fn default() -> Self {
        ServerSetup {
            role: Role::Mx,
            tls: TlsMode::None,
            max_recipients: 10,
            allow_insecure_auth: false,
        }
    }
}

/// A mailroom SMTP server on 127.0.0.1 with a generated certificate for
/// `localhost`.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The server's certificate, to trust it under `TlsPolicy::Verify`.
    pub cert: CertificateDer<'static>,
    intake: Arc<Recorder>,
    shutdown: ShutdownHandle,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start(setup: ServerSetup) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let (tls, _) = mailroom_smtp::tls::self_signed(dir.path(), "localhost").unwrap();
        let cert = CertificateDer::from_pem_file(dir.path().join("cert.pem")).unwrap();
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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Arc::new(SessionConfig {
            hostname: "mx.test".into(),
            role: setup.role,
            tls_mode: setup.tls,
            local_domains: vec![LOCAL_DOMAIN.into()],
            max_message_size: 4 * 1024 * 1024,
            max_recipients: setup.max_recipients,
            max_line_length: 2048,
            max_errors: 10,
            allow_insecure_auth: setup.allow_insecure_auth,
            relay_networks: Vec::new(),
            policy: None,
        });
        tokio::spawn(server.serve(listener, config));
        TestServer {
            addr,
            cert,
            intake,
            shutdown,
            _dir: dir,
        }
    }

    pub fn messages(&self) -> Vec<NewMessage> {
        self.intake
            .messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sessions open right now.
    pub fn sessions(&self) -> usize {
        self.shutdown.sessions()
    }

    /// Waits (briefly) until no session is open.
    pub async fn wait_idle(&self) {
        for _ in 0..200 {
            if self.sessions() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("sessions still open: {}", self.sessions());
    }
}

/// argon2 is slow on purpose: hash once per test binary.
fn password_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| mailroom_smtp::auth::hash_password(PASSWORD).unwrap())
}

/// The Received header itself.
pub fn received_header(content: &[u8]) -> String {
    let rest = after_received(content).len();
    String::from_utf8_lossy(&content[..content.len() - rest]).into_owned()
}

// ---------------------------------------------------------------------------
// Client side helpers
// ---------------------------------------------------------------------------

pub fn options(tls: TlsPolicy) -> ClientOptions {
    ClientOptions {
        helo_name: "client.test".into(),
        tls,
        credentials: None,
        timeouts: timeouts(Duration::from_secs(5)),
        extra_roots: Vec::new(),
    }
}

pub fn with_login(mut options: ClientOptions, password: &str) -> ClientOptions {
    options.credentials = Some((USER.into(), password.into()));
    options
}

pub fn rcpts(addresses: &[&str]) -> Vec<Recipient> {
    addresses
        .iter()
        .map(|a| Recipient {
            address: addr(a),
            orcpt: None,
            notify: Notify::empty(),
        })
        .collect()
}

pub fn envelope<'a>(from: Option<&'a Address>, to: &'a [Recipient]) -> OutboundEnvelope<'a> {
    OutboundEnvelope {
        reverse_path: from,
        recipients: to,
        env_id: None,
        ret: None,
        body_type: BodyType::SevenBit,
        smtputf8: false,
    }
}

// ---------------------------------------------------------------------------
// Scripted fake servers
// ---------------------------------------------------------------------------

/// One step of a fake server's script.
#[derive(Debug, Clone)]
pub enum Step {
    /// Send these bytes in one write.
    S(&'static str),
    /// Send these bytes one at a time, pausing between them, so the client
    /// sees replies split anywhere.
    Trickle(&'static str),
    /// Read one command line.
    C,
    /// Read this many command lines, counting the reads they took (one
    /// read means one pipelined group).
    Group(usize),
    /// Read message data up to the final dot.
    Data,
    /// Say nothing for this long.
    Pause(Duration),
}

/// What a fake server received.
#[derive(Debug, Default)]
pub struct Transcript {
    /// Command lines, without CRLF.
    pub lines: Vec<String>,
    /// Each DATA's bytes as received, final dot included.
    pub data: Vec<Vec<u8>>,
    /// Reads each `Group` took.
    pub group_reads: Vec<usize>,
}

/// A fake SMTP server that plays one script for one connection.
pub struct Fake {
    pub addr: SocketAddr,
    task: JoinHandle<Transcript>,
}

impl Fake {
    pub async fn start(script: Vec<Step>) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            play(stream, script).await
        });
        Fake { addr, task }
    }

    /// Waits for the script to end and the client to hang up, then returns
    /// what the server received.
    pub async fn transcript(mut self) -> Transcript {
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("fake server finished")
            .expect("fake server did not panic")
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct LineReader {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl LineReader {
    /// Reads until `buf` holds `n` lines; returns how many reads it took,
    /// or `None` at end of stream.
    async fn fill_lines(&mut self, n: usize) -> Option<usize> {
        let mut reads = 0;
        while self.buf.iter().filter(|&&b| b == b'\n').count() < n {
            let mut chunk = [0u8; 4096];
            let got = self.stream.read(&mut chunk).await.ok()?;
            if got == 0 {
                return None;
            }
            reads += 1;
            self.buf.extend_from_slice(&chunk[..got]);
        }
        Some(reads)
    }

    fn take_line(&mut self) -> String {
        let end = self.buf.iter().position(|&b| b == b'\n').unwrap() + 1;
        let line: Vec<u8> = self.buf.drain(..end).collect();
        String::from_utf8_lossy(&line).trim_end().to_owned()
    }

    async fn data(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(end) = self
                .buf
                .windows(5)
                .position(|w| w == b"\r\n.\r\n")
                .map(|i| i + 5)
                .or_else(|| self.buf.starts_with(b".\r\n").then_some(3))
            {
                return Some(self.buf.drain(..end).collect());
            }
            let mut chunk = [0u8; 65536];
            let got = self.stream.read(&mut chunk).await.ok()?;
            if got == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..got]);
        }
    }
}

async fn play(stream: TcpStream, script: Vec<Step>) -> Transcript {
    let mut reader = LineReader {
        stream,
        buf: Vec::new(),
    };
    let mut t = Transcript::default();
    for step in script {
        match step {
            Step::S(text) => {
                if reader.stream.write_all(text.as_bytes()).await.is_err() {
                    return t;
                }
            }
            Step::Trickle(text) => {
                for b in text.as_bytes() {
                    if reader.stream.write_all(&[*b]).await.is_err() {
                        return t;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Step::C => {
                if reader.fill_lines(1).await.is_none() {
                    return t;
                }
                t.lines.push(reader.take_line());
            }
            Step::Group(n) => {
                let Some(reads) = reader.fill_lines(n).await else {
                    return t;
                };
                t.group_reads.push(reads);
                for _ in 0..n {
                    t.lines.push(reader.take_line());
                }
            }
            Step::Data => match reader.data().await {
                Some(data) => t.data.push(data),
                None => return t,
            },
            Step::Pause(d) => tokio::time::sleep(d).await,
        }
    }
    // Whatever the client says after the script, until it hangs up.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), reader.fill_lines(1)).await
    {
        t.lines.push(reader.take_line());
    }
    t
}

// ---------------------------------------------------------------------------
// A rewriting proxy
// ---------------------------------------------------------------------------

/// A proxy for one connection to `upstream` that replaces `from` with `to`
/// in what the server says (so a test can take an offer away), and records
/// what the client says.
pub async fn rewriting_proxy(
    upstream: SocketAddr,
    from: &'static str,
    to: &'static str,
) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let said = Arc::new(Mutex::new(Vec::new()));
    let record = said.clone();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = TcpStream::connect(upstream).await.unwrap();
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut server_rx, mut server_tx) = server.into_split();
        let up = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = client_rx.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                record.lock().unwrap().extend_from_slice(&buf[..n]);
                if server_tx.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = server_tx.shutdown().await;
        });
        let mut buf = [0u8; 4096];
        while let Ok(n) = server_rx.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&buf[..n]).replace(from, to);
            if client_tx.write_all(text.as_bytes()).await.is_err() {
                break;
            }
        }
        let _ = client_tx.shutdown().await;
        let _ = up.await;
    });
    (addr, said)
}
