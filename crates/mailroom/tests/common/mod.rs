//! Test support for the integration tests: start the real `mailroom` binary
//! on free loopback ports with a config written into a temporary directory,
//! stop it (SIGTERM) or crash it (SIGKILL), read its store, and talk to it
//! with a tiny raw SMTP client (plain or TLS) whose helpers read like a
//! transcript.
//!
//! Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use mailroom_core::MessageId;
use mailroom_store::{SqliteOptions, SqliteStore, Store, StoredMessage};
use tokio_rustls::rustls;

pub const HOSTNAME: &str = "mx.test";
pub const LOCAL_DOMAIN: &str = "example.test";
pub const USER: &str = "app";
pub const PASSWORD: &str = "s3cret";
/// The operator key every test server is configured with.
pub const ADMIN_KEY: &str = "admin-key-for-tests-0123456789";

/// How long a reply may take before a test fails.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the server may take to start or to stop.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Mx,
    Submission,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    None,
    Starttls,
    Implicit,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Mx => "mx",
            Role::Submission => "submission",
        }
    }
}

impl Tls {
    fn as_str(self) -> &'static str {
        match self {
            Tls::None => "none",
            Tls::Starttls => "starttls",
            Tls::Implicit => "implicit",
        }
    }
}

/// One argon2 hash of [`PASSWORD`] per test binary (hashing is slow-ish).
pub fn password_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| mailroom_smtp::auth::hash_password(PASSWORD).expect("hash the password"))
}

/// What to start: listeners and config lines beyond the defaults below.
#[derive(Debug, Clone)]
pub struct Setup {
    listeners: Vec<(Role, Tls)>,
    smtp: Vec<String>,
    extra: Vec<String>,
    http: Vec<String>,
    local_domain: String,
    user: bool,
    shutdown_timeout: String,
}

impl Default for Setup {
    fn default() -> Self {
        Self::new()
    }
}

impl Setup {
    pub fn new() -> Self {
        Setup {
            listeners: Vec::new(),
            smtp: Vec::new(),
            extra: Vec::new(),
            http: Vec::new(),
            local_domain: LOCAL_DOMAIN.to_owned(),
            user: false,
            shutdown_timeout: "10s".into(),
        }
    }

    /// Adds a listener; its port is `server.port(i)` in the order added.
    pub fn listener(mut self, role: Role, tls: Tls) -> Self {
        self.listeners.push((role, tls));
        self
    }

    /// A `key = value` line in `[smtp]`.
    pub fn smtp(mut self, line: &str) -> Self {
        self.smtp.push(line.to_owned());
        self
    }

    /// TOML appended to the config as is (whole tables, e.g. a route).
    pub fn toml(mut self, text: &str) -> Self {
        self.extra.push(text.to_owned());
        self
    }

    pub fn shutdown_timeout(mut self, value: &str) -> Self {
        self.shutdown_timeout = value.to_owned();
        self
    }

    /// A `key = value` line in `[http]` (which always has `addr` and
    /// `admin_key` = [`ADMIN_KEY`]).
    pub fn http(mut self, line: &str) -> Self {
        self.http.push(line.to_owned());
        self
    }

    /// Replaces [`LOCAL_DOMAIN`] as the server's one local domain.
    pub fn local_domain(mut self, domain: &str) -> Self {
        self.local_domain = domain.to_owned();
        self
    }

    /// Adds the SMTP login [`USER`] / [`PASSWORD`].
    pub fn user(mut self) -> Self {
        self.user = true;
        self
    }

    fn render(&self, data_dir: &Path, ports: &[u16], http_port: u16) -> String {
        let mut c = String::new();
        let _ = writeln!(c, "hostname = \"{HOSTNAME}\"");
        let _ = writeln!(c, "data_dir = {:?}", data_dir.display().to_string());
        let _ = writeln!(c, "local_domains = [\"{}\"]", self.local_domain);
        let _ = writeln!(c, "shutdown_timeout = \"{}\"", self.shutdown_timeout);
        let _ = writeln!(c, "\n[log]\nlevel = \"debug\"\n\n[smtp]");
        for line in &self.smtp {
            let _ = writeln!(c, "{line}");
        }
        if self.user {
            let _ = writeln!(
                c,
                "\n[[smtp.users]]\nusername = \"{USER}\"\npassword_hash = \"{}\"",
                password_hash()
            );
        }
        for ((role, tls), port) in self.listeners.iter().zip(ports) {
            let _ = writeln!(
                c,
                "\n[[smtp.listeners]]\naddr = \"127.0.0.1:{port}\"\nrole = \"{}\"\ntls = \"{}\"",
                role.as_str(),
                tls.as_str()
            );
        }
        let _ = writeln!(
            c,
            "\n[http]\naddr = \"127.0.0.1:{http_port}\"\nadmin_key = \"{ADMIN_KEY}\""
        );
        for line in &self.http {
            let _ = writeln!(c, "{line}");
        }
        for text in &self.extra {
            let _ = writeln!(c, "\n{text}");
        }
        c
    }

    /// Writes the config and starts the server; returns once every
    /// listener accepts connections.
    pub fn start(self) -> Server {
        let mut server = self.new_server();
        // A free port found by binding port 0 may be taken by someone else
        // before the server binds it: pick new ports and try again.
        for attempt in 1..=3 {
            self.write_config(&mut server);
            server.spawn();
            match server.wait_ready(true) {
                Ok(()) => return server,
                Err(log) if attempt < 3 && log.contains("cannot listen") => {
                    eprintln!("port taken, retrying with other ports");
                }
                Err(log) => panic!("the server did not start:\n{log}"),
            }
        }
        unreachable!()
    }

    /// Writes the config and spawns the server without waiting for it:
    /// see [`Server::wait_accepting`].
    pub fn spawn(self) -> Server {
        let mut server = self.new_server();
        self.write_config(&mut server);
        server.spawn();
        server
    }

    fn new_server(&self) -> Server {
        assert!(!self.listeners.is_empty(), "a server needs a listener");
        let dir = tempfile::Builder::new()
            .prefix("mailroom-it-")
            .tempdir()
            .expect("create a temporary directory");
        Server {
            config_path: dir.path().join("mailroom.toml"),
            data_dir: dir.path().join("data"),
            ports: Vec::new(),
            http_port: 0,
            tls: self.listeners.iter().map(|(_, t)| *t).collect(),
            child: None,
            logs: Vec::new(),
            dir,
        }
    }

    fn write_config(&self, server: &mut Server) {
        let mut ports = free_ports(self.listeners.len() + 1);
        server.http_port = ports.pop().expect("a port for HTTP");
        server.ports = ports;
        fs::write(
            &server.config_path,
            self.render(&server.data_dir, &server.ports, server.http_port),
        )
        .expect("write the config");
    }
}

/// `n` distinct ports that were free a moment ago.
fn free_ports(n: usize) -> Vec<u16> {
    let sockets: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind port 0"))
        .collect();
    sockets
        .iter()
        .map(|s| s.local_addr().expect("local addr").port())
        .collect()
}

/// A running (or stopped) `mailroom serve` with its own directory.
pub struct Server {
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    ports: Vec<u16>,
    http_port: u16,
    tls: Vec<Tls>,
    child: Option<Child>,
    /// One stderr log file per start.
    logs: Vec<PathBuf>,
    dir: tempfile::TempDir,
}

impl Server {
    /// The temporary directory holding config, data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn port(&self, listener: usize) -> u16 {
        self.ports[listener]
    }

    pub fn addr(&self, listener: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[listener]))
    }

    /// `http://127.0.0.1:PORT`, the API's base URL.
    pub fn http_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    fn spawn(&mut self) {
        let log_path = self
            .dir
            .path()
            .join(format!("server-{}.log", self.logs.len() + 1));
        let log = fs::File::create(&log_path).expect("create the log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_mailroom"));
        command
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        clear_mailroom_env(&mut command);
        self.child = Some(command.spawn().expect("spawn mailroom serve"));
        self.logs.push(log_path);
    }

    /// Waits until every listener accepts; on failure returns the log.
    /// With `probe`, each first connection is a short session that ends
    /// before this returns; without it, it is dropped at once and polling
    /// is as tight as it gets.
    fn wait_ready(&mut self, probe: bool) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut ready = vec![false; self.ports.len()];
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("exited early with {status}\n{}", self.log()));
            }
            for (i, done) in ready.iter_mut().enumerate() {
                if !*done {
                    *done = if probe {
                        self.probe(i)
                    } else {
                        TcpStream::connect(self.addr(i)).is_ok()
                    };
                }
            }
            if ready.iter().all(|r| *r) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "listeners not accepting after {START_TIMEOUT:?}\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(if probe { 20 } else { 1 }));
        }
    }

    /// After [`Setup::spawn`]: returns as soon as every listener accepts a
    /// TCP connection, which is the moment the server counts as ready.
    pub fn wait_accepting(&mut self) {
        if let Err(log) = self.wait_ready(false) {
            panic!("the server did not start:\n{log}");
        }
    }

    /// Connects once; on a plaintext listener also says QUIT and waits for
    /// the close, so the probe's session is over (it counts against the
    /// connection limits while it lives).
    fn probe(&self, listener: usize) -> bool {
        let Ok(mut stream) =
            TcpStream::connect_timeout(&self.addr(listener), Duration::from_millis(200))
        else {
            return false;
        };
        if self.tls[listener] != Tls::Implicit {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 512];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"QUIT\r\n");
            while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        }
        true
    }

    /// Starts the server again on the same config, data and ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server before restarting it");
        self.spawn();
        if let Err(log) = self.wait_ready(true) {
            panic!("the server did not restart:\n{log}");
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Sends SIGTERM or SIGINT once the server has installed its handlers
    /// for both. The server accepts connections a moment before it does
    /// (see `shutdown.rs`, `sigterm_as_soon_as_the_port_accepts`); tests of
    /// what a shutdown does must not depend on winning that race.
    pub fn signal(&self, name: &str) {
        if name == "TERM" || name == "INT" {
            let caught = poll(START_TIMEOUT, || self.handles_term_and_int().then_some(()));
            assert!(
                caught.is_some(),
                "the server never installed its SIGTERM/SIGINT handlers\n{}",
                self.log()
            );
            // The handlers are installed a few instructions before tokio
            // subscribes its listener for the signal.
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal_now(name);
    }

    /// True once the process catches both SIGINT (2) and SIGTERM (15),
    /// from the `SigCgt` mask in /proc (Linux).
    fn handles_term_and_int(&self) -> bool {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .unwrap_or(0);
        let bit = |signal: u32| 1u64 << (signal - 1);
        caught & bit(2) != 0 && caught & bit(15) != 0
    }

    /// Sends a signal right away (`TERM`, `INT`, `KILL`, ...).
    pub fn signal_now(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Waits for the process to end; `None` if it is still running after
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("server started");
        loop {
            if let Some(status) = child.try_wait().expect("wait for the server") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.sigterm();
        match self.wait_exit(STOP_TIMEOUT) {
            Some(status) => status,
            None => panic!(
                "the server did not stop within {STOP_TIMEOUT:?} of SIGTERM\n{}",
                self.log()
            ),
        }
    }

    /// SIGTERM and expects a clean exit (status 0).
    pub fn stop_ok(&mut self) {
        let status = self.stop();
        assert!(
            status.success(),
            "exit status {status} after SIGTERM\n{}",
            self.log()
        );
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill9(&mut self) {
        self.signal("KILL");
        if self.wait_exit(STOP_TIMEOUT).is_none() {
            panic!("the server survived SIGKILL");
        }
    }

    /// Everything the server wrote to stderr, over all its starts.
    pub fn log(&self) -> String {
        let mut out = String::new();
        for (i, path) in self.logs.iter().enumerate() {
            let _ = writeln!(out, "--- server log, start {} ---", i + 1);
            out.push_str(&fs::read_to_string(path).unwrap_or_default());
        }
        out
    }

    /// Opens the store (fine while the server runs: WAL).
    pub fn store(&self) -> SqliteStore {
        SqliteStore::open(&self.data_dir.join("mailroom.db"), SqliteOptions::default())
            .expect("open the store")
    }

    /// The stored message with this id; fails the test if it is missing.
    pub fn message(&self, id: &str) -> StoredMessage {
        let id: MessageId = id.parse().expect("a message id");
        self.store()
            .get(&id)
            .expect("read the store")
            .unwrap_or_else(|| panic!("message {id} is not in the store"))
    }

    /// The generated self-signed certificate (PEM).
    pub fn cert_pem(&self) -> Vec<u8> {
        fs::read(self.data_dir.join("tls/cert.pem")).expect("read the generated certificate")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log());
        }
    }
}

/// Removes `MAILROOM_*` variables so the caller's environment cannot change
/// a test's configuration.
fn clear_mailroom_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MAILROOM_") {
            command.env_remove(key);
        }
    }
}

/// Runs `mailroom args...` with extra environment and optional stdin.
pub fn cli(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mailroom"));
    command.args(args);
    clear_mailroom_env(&mut command);
    command.envs(env.iter().copied());
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn mailroom");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        pipe.write_all(input).expect("write stdin");
    }
    child.wait_with_output().expect("wait for mailroom")
}

/// Runs a Python script (written into `dir`) with `args`; fails the test
/// with the script's stderr if it fails. Returns its stdout.
pub fn python(dir: &Path, name: &str, script: &str, args: &[&str]) -> String {
    let path = dir.join(name);
    fs::write(&path, script).expect("write the python script");
    let output = Command::new("python3")
        .arg(&path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "python3 {name} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("python output is UTF-8")
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// The stored message and its trace header
// ---------------------------------------------------------------------------

/// Splits stored content into its `Received:` header (folded, CRLF line
/// ends, continuation lines starting with a TAB) and the rest.
pub fn split_received(content: &[u8]) -> (&str, &[u8]) {
    assert!(
        content.starts_with(b"Received: from "),
        "stored content does not start with a Received header: {:?}",
        String::from_utf8_lossy(&content[..content.len().min(200)])
    );
    let mut end = 0;
    loop {
        let crlf = content[end..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("the Received header ends with CRLF");
        let line = &content[end..end + crlf];
        assert!(
            !line.contains(&b'\n') && !line.contains(&b'\r'),
            "bare CR or LF in the Received header"
        );
        end += crlf + 2;
        if content.get(end) != Some(&b'\t') {
            break;
        }
    }
    let header = std::str::from_utf8(&content[..end]).expect("Received header is UTF-8");
    (header, &content[end..])
}

/// Checks that the stored content is exactly one `Received:` header (naming
/// `protocol` and the message id) followed by `expected`; returns the header.
pub fn assert_content(message: &StoredMessage, expected: &[u8], protocol: &str) -> String {
    let (header, rest) = split_received(&message.content);
    assert_bytes_eq(rest, expected);
    assert!(
        !rest.starts_with(b"Received:") || expected.starts_with(b"Received:"),
        "more than one Received header was added"
    );
    let with = format!(" with {protocol} id {}", message.id);
    assert!(
        header.contains(&with),
        "Received header lacks {with:?}:\n{header}"
    );
    assert!(header.contains(&format!("by {HOSTNAME} ")), "{header}");
    assert_eq!(message.size, message.content.len() as u64);
    header.to_owned()
}

/// Asserts that the header says TLS 1.3 and names the cipher suite.
pub fn assert_tls_header(header: &str) {
    assert!(
        header.contains("(using TLSv1.3 with cipher TLS13_"),
        "Received header lacks the TLS clause:\n{header}"
    );
}

/// Byte-for-byte comparison with a readable failure.
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8]) {
    if actual == expected {
        return;
    }
    let first_diff = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(actual.len().min(expected.len()));
    let from = first_diff.saturating_sub(40);
    panic!(
        "content differs at offset {first_diff} (stored {} bytes, expected {}):\n stored:   {:?}\n expected: {:?}",
        actual.len(),
        expected.len(),
        String::from_utf8_lossy(&actual[from..actual.len().min(first_diff + 40)]),
        String::from_utf8_lossy(&expected[from..expected.len().min(first_diff + 40)]),
    );
}

/// The id in `... queued as <id>`.
pub fn queued_id(text: &str) -> String {
    let at = text
        .find("queued as ")
        .unwrap_or_else(|| panic!("no 'queued as' in {text:?}"));
    let id = text[at + "queued as ".len()..]
        .split_whitespace()
        .next()
        .unwrap_or("");
    assert!(
        id.parse::<MessageId>().is_ok(),
        "{id:?} is not a message id (in {text:?})"
    );
    id.to_owned()
}

/// Dot-stuffs message data for DATA (RFC 5321 §4.5.2).
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    let mut line_start = true;
    for &b in data {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    out
}

// ---------------------------------------------------------------------------
// A raw SMTP client
// ---------------------------------------------------------------------------

/// One reply: its code and the text of each line (after `ddd-` / `ddd `).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// The first line as sent, e.g. `250 2.0.0 Ok`.
    pub fn first(&self) -> String {
        format!("{} {}", self.code, self.lines[0])
    }

    /// Every line as sent.
    pub fn text(&self) -> String {
        let n = self.lines.len();
        self.lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{}{}{l}", self.code, if i + 1 < n { '-' } else { ' ' }))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn queued_id(&self) -> String {
        queued_id(&self.text())
    }

    pub fn has_line(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }
}

/// A blocking SMTP client over any stream: plain TCP or TLS.
pub struct Smtp<S = TcpStream> {
    pub stream: S,
    /// Bytes read but not yet parsed into a reply.
    buf: Vec<u8>,
}

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

impl Smtp<TcpStream> {
    /// Connects and expects the `220` greeting.
    pub fn connect(addr: SocketAddr) -> Self {
        let mut smtp = Self::connect_raw(addr);
        smtp.expect("220 mx.test ESMTP");
        smtp
    }

    /// Connects without reading anything.
    pub fn connect_raw(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        Self::from_connected(stream)
    }

    /// Connects from a chosen local address (e.g. 127.0.0.2), without
    /// reading anything.
    pub fn connect_from(local: IpAddr, addr: SocketAddr) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        let stream = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .bind(SocketAddr::new(local, 0))
                .unwrap_or_else(|e| panic!("bind {local}: {e}"));
            socket
                .connect(addr)
                .await
                .unwrap_or_else(|e| panic!("connect {addr} from {local}: {e}"))
                .into_std()
                .expect("into std")
        });
        stream.set_nonblocking(false).expect("blocking socket");
        Self::from_connected(stream)
    }

    /// Wraps a connected stream, without reading anything.
    pub fn from_connected(stream: TcpStream) -> Self {
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .expect("read timeout");
        let _ = stream.set_nodelay(true);
        Smtp {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn set_read_timeout(&self, timeout: Duration) {
        self.stream
            .set_read_timeout(Some(timeout))
            .expect("read timeout");
    }

    /// Asserts that nothing arrives for `wait`.
    pub fn expect_silence(&mut self, wait: Duration) {
        assert!(
            self.buf.is_empty(),
            "unexpected bytes: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.set_read_timeout(wait);
        let mut chunk = [0u8; 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => panic!("the server closed the connection"),
            Ok(n) => panic!(
                "unexpected bytes: {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "read failed: {e}"
            ),
        }
        self.set_read_timeout(REPLY_TIMEOUT);
    }

    /// Upgrades to TLS after a `220` to STARTTLS (or right after connecting
    /// to an implicit-TLS listener), trusting the server's generated
    /// certificate. Fails if the server sent anything past the last reply
    /// in the clear.
    pub fn into_tls(self, server: &Server) -> Smtp<TlsStream> {
        assert!(
            self.buf.is_empty(),
            "plaintext after the last reply: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let mut stream = tls_connect(server, self.stream);
        stream
            .conn
            .complete_io(&mut stream.sock)
            .expect("TLS handshake");
        Smtp {
            stream,
            buf: Vec::new(),
        }
    }
}

impl Smtp<TlsStream> {
    /// Connects to an implicit-TLS listener and expects the greeting.
    pub fn connect_tls(server: &Server, listener: usize) -> Self {
        let mut smtp = Smtp::connect_raw(server.addr(listener)).into_tls(server);
        smtp.expect("220 mx.test ESMTP");
        smtp
    }

    /// `TLSv1.3` / `TLS13_AES_256_GCM_SHA384`, as the server names them.
    pub fn tls_params(&self) -> (String, String) {
        let version = match self.stream.conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
            other => format!("{other:?}"),
        };
        let cipher = self
            .stream
            .conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default();
        (version, cipher)
    }
}

impl<S: Read + Write> Smtp<S> {
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to the server");
        self.stream.flush().expect("flush");
    }

    /// Sends one command line (CRLF added).
    pub fn line(&mut self, line: &str) {
        self.send(format!("{line}\r\n").as_bytes());
    }

    /// Reads one full reply; `Ok(None)` on a clean close.
    pub fn try_read_reply(&mut self) -> io::Result<Option<Reply>> {
        let mut lines = Vec::new();
        let mut code = 0;
        loop {
            while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.buf.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\r', '\n']);
                assert!(
                    line.len() >= 3 && line.as_bytes()[..3].iter().all(u8::is_ascii_digit),
                    "malformed reply line {line:?}"
                );
                let this: u16 = line[..3].parse().expect("three digits");
                if !lines.is_empty() {
                    assert_eq!(this, code, "reply code changed inside a reply: {line:?}");
                }
                code = this;
                let sep = line.as_bytes().get(3).copied().unwrap_or(b' ');
                lines.push(line.get(4..).unwrap_or("").to_owned());
                if sep != b'-' {
                    return Ok(Some(Reply { code, lines }));
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                if self.buf.is_empty() && lines.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed inside a reply: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads one full reply; fails the test on EOF, error or timeout.
    pub fn read_reply(&mut self) -> Reply {
        match self.try_read_reply() {
            Ok(Some(reply)) => reply,
            Ok(None) => panic!("the server closed the connection instead of replying"),
            Err(e) => panic!("no reply: {e}"),
        }
    }

    /// Reads a reply whose first line starts with `prefix`.
    pub fn expect(&mut self, prefix: &str) -> Reply {
        let reply = self.read_reply();
        assert!(
            reply.first().starts_with(prefix),
            "expected {prefix:?}, got:\n{}",
            reply.text()
        );
        reply
    }

    /// C: `line` / S: `prefix...`
    pub fn cmd(&mut self, line: &str, prefix: &str) -> Reply {
        self.line(line);
        self.expect(prefix)
    }

    pub fn ehlo(&mut self) -> Reply {
        let reply = self.cmd("EHLO client.test", "250");
        assert!(
            reply.lines[0].starts_with(&format!("{HOSTNAME} Hello 127.0.0.")),
            "{}",
            reply.text()
        );
        reply
    }

    /// Expects the server to close the connection (after any replies
    /// already read).
    pub fn expect_closed(&mut self) {
        match self.try_read_reply() {
            Ok(None) => {}
            Ok(Some(reply)) => panic!("expected the connection to close, got:\n{}", reply.text()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected the connection to close: {e}"),
        }
    }

    /// One transaction with DATA: `data` is the message as the client means
    /// it (dot-stuffed here); it must end with CRLF. Returns the queued id.
    pub fn send_mail(&mut self, from: &str, to: &[&str], data: &[u8]) -> String {
        assert!(data.ends_with(b"\r\n"));
        self.cmd(&format!("MAIL FROM:<{from}>"), "250 2.1.0");
        for rcpt in to {
            self.cmd(&format!("RCPT TO:<{rcpt}>"), "250 2.1.5");
        }
        self.cmd("DATA", "354");
        let mut wire = dot_stuff(data);
        wire.extend_from_slice(b".\r\n");
        self.send(&wire);
        self.expect("250 2.0.0 Ok: queued as ").queued_id()
    }
}

/// A TLS client that trusts exactly the server's generated certificate.
pub fn tls_client_config(server: &Server) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&server.cert_pem()) {
        roots
            .add(cert.expect("PEM certificate"))
            .expect("trust the certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

fn tls_connect(server: &Server, tcp: TcpStream) -> TlsStream {
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let conn = rustls::ClientConnection::new(tls_client_config(server), name)
        .expect("TLS client connection");
    rustls::StreamOwned::new(conn, tcp)
}

/// A message body of about `size` bytes with CRLF line ends, including a
/// line that starts with a dot.
pub fn message(subject: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: <sender@client.test>\r\nTo: <rcpt@{LOCAL_DOMAIN}>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\r\n.a line that starts with a dot\r\n"
    )
    .into_bytes();
    let mut i = 0;
    while m.len() < size {
        let _ = write!(
            m,
            "line {i:05} abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789\r\n"
        );
        i += 1;
    }
    m
}

/// An HTTP response as the tests read it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `error.code` of a JSON error body, checking its shape.
    pub fn error_code(&self) -> String {
        let v = self.json();
        let code = v["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error.code: {v}"));
        assert!(v["error"]["message"].is_string(), "no error.message: {v}");
        code.to_owned()
    }
}

/// One HTTP/1.1 request on a fresh connection, written by hand so tests can
/// also send what a library would refuse to.
pub fn http(
    base: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&serde_json::Value>,
) -> HttpResponse {
    let mut headers = Vec::new();
    if let Some(key) = key {
        headers.push(("Authorization".to_owned(), format!("Bearer {key}")));
    }
    let body = body.map(|b| b.to_string().into_bytes());
    if body.is_some() {
        headers.push(("Content-Type".to_owned(), "application/json".to_owned()));
    }
    http_request(base, method, path, &headers, body.as_deref())
}

pub fn http_request(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
) -> HttpResponse {
    try_http_request(base, method, path, headers, body)
        .unwrap_or_else(|| panic!("no HTTP answer from {base} to {method} {path}"))
}

/// As [`http_request`]; `None` when there is no answer (the server is gone).
pub fn try_http_request(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
) -> Option<HttpResponse> {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).ok()?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() || method != "GET" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    // The server may answer (413) before reading a large body and close.
    let _ = stream.write_all(&bytes);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse_http_response(&raw)
}

fn parse_http_response(raw: &[u8]) -> Option<HttpResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok())?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(pos) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&rest[..pos])
                    .split(';')
                    .next()
                    .unwrap_or("0")
                    .trim(),
                16,
            )
            .expect("chunk size");
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[pos + 2..pos + 2 + size]);
            rest = &rest[pos + 2 + size + 2..];
        }
        body = out;
    }
    Some(HttpResponse {
        status,
        headers,
        body,
    })
}
