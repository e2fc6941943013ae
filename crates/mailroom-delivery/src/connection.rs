//! The tokio driver around [`crate::client::Client`]: TCP connect, reads and
//! writes with RFC 5321 §4.5.3.2 timeouts, the TLS upgrade, and connection
//! reuse. Everything about SMTP itself is decided by the client state
//! machine; this module only moves bytes and waits.
//!
//! TLS follows [`TlsPolicy`]: `Opportunistic` and `Required` do the
//! handshake without checking the certificate (what most MX-to-MX mail
//! does: an MX certificate rarely matches the MX name, and refusing would
//! only push the mail to plaintext or delay it); `Verify` checks it against
//! the server name with the system's trust store
//! (`/etc/ssl/certs/ca-certificates.crt` and its usual siblings) plus
//! [`ClientOptions::extra_roots`].

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mailroom_core::config::TlsPolicy;
use mailroom_core::reply::Enhanced;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{self, CryptoProvider, WebPkiSupportedAlgorithms};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    self, ClientConfig as TlsClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tracing::debug;

pub use crate::client::{
    Capabilities, DeliveryError, ErrorKind, OutboundEnvelope, RecipientOutcome, Stage,
};
use crate::client::{Client, ClientConfig, DataEncoder, Event, Waiting};

/// How to talk to a server.
#[derive(Clone)]
pub struct ClientOptions {
    /// Our name in EHLO/HELO (the configured `hostname`).
    pub helo_name: String,
    pub tls: TlsPolicy,
    /// `(username, password)` for AUTH, for relays that ask for it. Sent
    /// only over TLS unless `tls` is `None`.
    pub credentials: Option<(String, String)>,
    pub timeouts: Timeouts,
    /// Trust anchors added to the system's for [`TlsPolicy::Verify`]: a
    /// private CA, or a test's self-signed certificate.
    pub extra_roots: Vec<CertificateDer<'static>>,
}

impl ClientOptions {
    /// Opportunistic TLS, no credentials, RFC timeouts.
    pub fn new(helo_name: impl Into<String>) -> Self {
        ClientOptions {
            helo_name: helo_name.into(),
            tls: TlsPolicy::Opportunistic,
            credentials: None,
            timeouts: Timeouts::default(),
            extra_roots: Vec::new(),
        }
    }
}

impl Default for ClientOptions {
    /// `localhost` as EHLO name; set `helo_name` to the configured hostname.
    fn default() -> Self {
        ClientOptions::new("localhost")
    }
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("helo_name", &self.helo_name)
            .field("tls", &self.tls)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(u, _)| (u, "***")),
            )
            .field("timeouts", &self.timeouts)
            .field("extra_roots", &self.extra_roots.len())
            .finish()
    }
}

/// How long to wait at each step. The defaults are RFC 5321 §4.5.3.2's
/// where it gives one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect (not in the RFC; Postfix's 30 s).
    pub connect: Duration,
    /// The `220` greeting: 5 min.
    pub greeting: Duration,
    /// EHLO/HELO (5 min); also STARTTLS with its handshake, and AUTH.
    pub ehlo: Duration,
    /// MAIL: 5 min.
    pub mail: Duration,
    /// Each RCPT: 5 min.
    pub rcpt: Duration,
    /// The `354` to DATA: 2 min.
    pub data_init: Duration,
    /// Writing each block of content: 3 min.
    pub data_block: Duration,
    /// The reply to the end of data: 10 min (the server may be checking
    /// the message meanwhile; giving up early risks duplicates).
    pub data_done: Duration,
    /// RSET (not in the RFC; Postfix's 20 s).
    pub rset: Duration,
    /// QUIT (not in the RFC): short, since nothing depends on the answer.
    pub quit: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let min = |m: u64| Duration::from_secs(m * 60);
        Timeouts {
            connect: Duration::from_secs(30),
            greeting: min(5),
            ehlo: min(5),
            mail: min(5),
            rcpt: min(5),
            data_init: min(2),
            data_block: min(3),
            data_done: min(10),
            rset: Duration::from_secs(20),
            quit: Duration::from_secs(20),
        }
    }
}

impl Timeouts {
    fn waiting(&self, waiting: Waiting) -> Duration {
        match waiting {
            Waiting::Greeting => self.greeting,
            Waiting::Ehlo | Waiting::StartTls | Waiting::Auth => self.ehlo,
            Waiting::Mail => self.mail,
            Waiting::Rcpt => self.rcpt,
            Waiting::DataInit => self.data_init,
            Waiting::DataDone => self.data_done,
            Waiting::Rset => self.rset,
            Waiting::Quit => self.quit,
        }
    }
}

/// The TLS parameters of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.3`, `TLSv1.2`.
    pub version: String,
    /// e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
}

impl fmt::Display for TlsInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.version, self.cipher)
    }
}

/// Bytes asked of the socket per read: replies are small.
const READ_SIZE: usize = 4096;
/// Content is encoded and written in blocks of this size, each under the
/// `data_block` timeout.
const DATA_BLOCK: usize = 64 * 1024;

/// An SMTP client connection, ready for transactions after
/// [`SmtpConnection::connect`].
pub struct SmtpConnection {
    stream: Stream,
    client: Client,
    /// Server bytes read but not yet fed.
    input: Vec<u8>,
    peer: SocketAddr,
    server_name: String,
    timeouts: Timeouts,
    tls: Option<TlsInfo>,
}

impl SmtpConnection {
    /// Connects to `addr`, reads the greeting, says EHLO (or HELO), starts
    /// TLS per `options.tls` and authenticates when credentials are given.
    /// `server_name` is the host's name: for the TLS certificate check
    /// (SNI too) and in error messages.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        options: &ClientOptions,
    ) -> Result<SmtpConnection, DeliveryError> {
        if options.helo_name.is_empty()
            || options
                .helo_name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(DeliveryError::new(
                ErrorKind::Temporary,
                Stage::Policy,
                server_name,
                Enhanced(4, 3, 5),
                format!(
                    "helo_name {:?} is not a usable EHLO name (connecting to {server_name})",
                    options.helo_name
                ),
            ));
        }
        let tcp =
            match tokio::time::timeout(options.timeouts.connect, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(err)) => {
                    return Err(DeliveryError::new(
                        ErrorKind::Temporary,
                        Stage::Connect,
                        server_name,
                        Enhanced(4, 4, 1),
                        format!("cannot connect to {server_name} ({addr}): {err}"),
                    ));
                }
                Err(_) => {
                    return Err(DeliveryError::new(
                        ErrorKind::Temporary,
                        Stage::Timeout,
                        server_name,
                        Enhanced(4, 4, 1),
                        format!(
                            "timed out after {:?} connecting to {server_name} ({addr})",
                            options.timeouts.connect
                        ),
                    ));
                }
            };
        let _ = tcp.set_nodelay(true);
        debug!(host = server_name, %addr, "connected");
        let client = Client::new(ClientConfig {
            helo_name: options.helo_name.clone(),
            server_name: server_name.to_owned(),
            tls: options.tls,
            credentials: options.credentials.clone(),
        });
        let mut conn = SmtpConnection {
            stream: Stream::Plain(tcp),
            client,
            input: Vec::new(),
            peer: addr,
            server_name: server_name.to_owned(),
            timeouts: options.timeouts,
            tls: None,
        };
        loop {
            match conn.next_event().await {
                Ok(Event::Ready) => break,
                Ok(Event::StartTls) => {
                    // Plaintext the server sent after its 220 must never be
                    // read as if it came over TLS.
                    conn.input.clear();
                    if let Err(err) = conn.start_tls(options).await {
                        conn.client.abort();
                        return Err(err);
                    }
                    conn.client.tls_started();
                }
                Ok(other) => {
                    conn.client.abort();
                    return Err(conn.out_of_step(Stage::Ehlo, &other));
                }
                Err(err) => {
                    debug!(host = server_name, error = %err, "session set-up failed");
                    conn.close().await;
                    return Err(err);
                }
            }
        }
        debug!(
            host = server_name,
            tls = ?conn.tls,
            pipelining = conn.client.capabilities().pipelining(),
            "ready"
        );
        Ok(conn)
    }

    /// One transaction. Returns one outcome per recipient, in the order of
    /// `envelope.recipients`; an `Err` is a failure of the whole
    /// transaction (MAIL refused, connection lost, message refused before
    /// sending...). Follow with [`SmtpConnection::reset`] to reuse the
    /// connection.
    pub async fn send(
        &mut self,
        envelope: &OutboundEnvelope<'_>,
        content: &[u8],
    ) -> Result<Vec<RecipientOutcome>, DeliveryError> {
        self.take_stray_input()?;
        self.client.send(envelope, content)?;
        loop {
            match self.next_event().await? {
                Event::SendData => {
                    self.write_data(content).await?;
                    self.client.data_sent();
                }
                Event::Sent(outcomes) => return Ok(outcomes),
                other => {
                    self.client.abort();
                    return Err(self.out_of_step(Stage::Data, &other));
                }
            }
        }
    }

    /// RSET, so the next transaction starts clean.
    pub async fn reset(&mut self) -> Result<(), DeliveryError> {
        self.take_stray_input()?;
        self.client.reset()?;
        match self.next_event().await? {
            Event::Reset => Ok(()),
            other => {
                self.client.abort();
                Err(self.out_of_step(Stage::Reset, &other))
            }
        }
    }

    /// QUIT (best effort: the answer is waited for at most `quit`), then
    /// close.
    pub async fn quit(mut self) {
        self.close().await;
    }

    /// The TLS parameters, when STARTTLS was done.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// What the server offered in its last EHLO.
    pub fn capabilities(&self) -> &Capabilities {
        self.client.capabilities()
    }

    /// Transactions begun on this connection.
    pub fn transactions(&self) -> u32 {
        self.client.transactions()
    }

    /// Ready for another transaction (nothing broke and the server did not
    /// close).
    pub fn is_usable(&self) -> bool {
        self.client.is_usable() && !matches!(self.stream, Stream::Closed)
    }

    // -- I/O ----------------------------------------------------------------

    /// Feeds what was read and reads more until the conversation has an
    /// event; [`Event::Failed`] comes back as `Err`.
    async fn next_event(&mut self) -> Result<Event, DeliveryError> {
        loop {
            let (used, event) = self.client.feed(&self.input);
            self.input.drain(..used);
            match event {
                Some(Event::Failed(err)) => {
                    if !self.client.can_quit() {
                        self.stream = Stream::Closed;
                    }
                    return Err(err);
                }
                Some(event) => return Ok(event),
                None => {}
            }
            let Some(waiting) = self.client.waiting() else {
                self.client.abort();
                return Err(self.error(
                    Stage::Io,
                    Enhanced(4, 3, 0),
                    format!(
                        "SMTP client with {} stopped without a result",
                        self.server_name
                    ),
                ));
            };
            let limit = self.timeouts.waiting(waiting);
            self.flush(limit, waiting).await?;
            self.read(limit, waiting).await?;
        }
    }

    async fn flush(&mut self, limit: Duration, waiting: Waiting) -> Result<(), DeliveryError> {
        if self.client.output().is_empty() {
            return Ok(());
        }
        // One write per group: with PIPELINING, MAIL, the RCPTs and DATA
        // leave in one segment.
        let result = tokio::time::timeout(limit, self.stream.write_all(self.client.output())).await;
        self.client.clear_output();
        self.io_result(result, limit, waiting.stage(), "writing to")
    }

    async fn read(&mut self, limit: Duration, waiting: Waiting) -> Result<(), DeliveryError> {
        self.input.reserve(READ_SIZE);
        let result = tokio::time::timeout(limit, self.stream.read(&mut self.input)).await;
        match result {
            Ok(Ok(0)) => {
                self.fail_io();
                Err(self.error(
                    Stage::Io,
                    Enhanced(4, 4, 2),
                    format!(
                        "{} closed the connection while we waited for {}",
                        self.server_name,
                        waiting.describe()
                    ),
                ))
            }
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => {
                self.fail_io();
                Err(self.error(
                    Stage::Io,
                    Enhanced(4, 4, 2),
                    format!(
                        "reading from {} failed while we waited for {}: {err}",
                        self.server_name,
                        waiting.describe()
                    ),
                ))
            }
            Err(_) => {
                self.fail_io();
                Err(self.error(
                    Stage::Timeout,
                    Enhanced(4, 4, 2),
                    format!(
                        "timed out after {limit:?} waiting for {} from {}",
                        waiting.describe(),
                        self.server_name
                    ),
                ))
            }
        }
    }

    /// Writes the content as DATA's wire form, block by block.
    async fn write_data(&mut self, content: &[u8]) -> Result<(), DeliveryError> {
        let limit = self.timeouts.data_block;
        let mut encoder = DataEncoder::new();
        let mut block = Vec::with_capacity(DATA_BLOCK.min(content.len()) + 1024);
        let mut chunks = content.chunks(DATA_BLOCK).peekable();
        loop {
            block.clear();
            if let Some(chunk) = chunks.next() {
                encoder.encode(chunk, &mut block);
            }
            // The last block carries the final dot.
            let last = chunks.peek().is_none();
            if last {
                encoder.finish(&mut block);
            }
            let result = tokio::time::timeout(limit, self.stream.write_all(&block)).await;
            self.io_result(result, limit, Stage::Data, "sending the message to")?;
            if last {
                return Ok(());
            }
        }
    }

    fn io_result(
        &mut self,
        result: Result<io::Result<()>, tokio::time::error::Elapsed>,
        limit: Duration,
        stage: Stage,
        doing: &str,
    ) -> Result<(), DeliveryError> {
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => {
                self.fail_io();
                Err(self.error(
                    Stage::Io,
                    Enhanced(4, 4, 2),
                    format!("{doing} {} failed ({stage:?}): {err}", self.server_name),
                ))
            }
            Err(_) => {
                self.fail_io();
                Err(self.error(
                    Stage::Timeout,
                    Enhanced(4, 4, 2),
                    format!(
                        "timed out after {limit:?} {doing} {} ({stage:?})",
                        self.server_name
                    ),
                ))
            }
        }
    }

    /// Bytes that arrived between operations are a server speaking out of
    /// turn (often a `421` before it hangs up): let the conversation judge.
    fn take_stray_input(&mut self) -> Result<(), DeliveryError> {
        if self.input.is_empty() {
            return Ok(());
        }
        let (used, event) = self.client.feed(&self.input);
        self.input.drain(..used);
        match event {
            Some(Event::Failed(err)) => {
                self.stream = Stream::Closed;
                Err(err)
            }
            _ => Ok(()),
        }
    }

    async fn start_tls(&mut self, options: &ClientOptions) -> Result<(), DeliveryError> {
        let stage_error = |message: String| {
            DeliveryError::new(
                ErrorKind::Temporary,
                Stage::StartTls,
                &self.server_name,
                Enhanced(4, 7, 5),
                message,
            )
        };
        let config = tls_config(options.tls, &options.extra_roots).map_err(&stage_error)?;
        let name = match ServerName::try_from(self.server_name.clone()) {
            Ok(name) => name,
            Err(_) if options.tls != TlsPolicy::Verify => ServerName::from(self.peer.ip()),
            Err(_) => {
                return Err(stage_error(format!(
                    "{:?} is not a name a certificate can be checked against",
                    self.server_name
                )));
            }
        };
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Closed) else {
            return Err(stage_error(format!(
                "STARTTLS with {} on a connection that is not plaintext",
                self.server_name
            )));
        };
        let limit = self.timeouts.ehlo;
        let handshake = TlsConnector::from(config).connect(name, tcp);
        let tls = match tokio::time::timeout(limit, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => {
                return Err(stage_error(format!(
                    "TLS handshake with {} failed: {err}",
                    self.server_name
                )));
            }
            Err(_) => {
                return Err(stage_error(format!(
                    "TLS handshake with {} timed out after {limit:?}",
                    self.server_name
                )));
            }
        };
        let info = tls_info(tls.get_ref().1);
        debug!(host = %self.server_name, tls = %info, "TLS established");
        self.tls = Some(info);
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    /// QUIT when the server can still read it, then close.
    async fn close(&mut self) {
        if !matches!(self.stream, Stream::Closed) && self.client.quit() {
            let limit = self.timeouts.quit;
            let result = tokio::time::timeout(limit, async {
                self.stream.write_all(self.client.output()).await?;
                self.client.clear_output();
                loop {
                    let (used, event) = self.client.feed(&self.input);
                    self.input.drain(..used);
                    if event.is_some() || self.client.waiting().is_none() {
                        return Ok::<_, io::Error>(());
                    }
                    self.input.reserve(READ_SIZE);
                    if self.stream.read(&mut self.input).await? == 0 {
                        return Ok(());
                    }
                }
            })
            .await;
            if let Ok(Err(err)) | Err(err) = result.map_err(io::Error::other) {
                debug!(host = %self.server_name, error = %err, "QUIT not answered");
            }
        }
        self.client.abort();
        if let Stream::Tls(tls) = &mut self.stream {
            // close_notify, so the server sees a clean end.
            let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
        }
        self.stream = Stream::Closed;
    }

    fn fail_io(&mut self) {
        self.client.abort();
        self.stream = Stream::Closed;
    }

    fn error(&self, stage: Stage, enhanced: Enhanced, message: String) -> DeliveryError {
        DeliveryError::new(
            ErrorKind::Temporary,
            stage,
            &self.server_name,
            enhanced,
            message,
        )
    }

    fn out_of_step(&self, stage: Stage, event: &Event) -> DeliveryError {
        self.error(
            stage,
            Enhanced(4, 3, 0),
            format!(
                "SMTP client with {} out of step: unexpected {event:?}",
                self.server_name
            ),
        )
    }
}

impl fmt::Debug for SmtpConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConnection")
            .field("server_name", &self.server_name)
            .field("peer", &self.peer)
            .field("tls", &self.tls)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// The socket, before or after TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Gone (failed, closed, or mid-upgrade).
    Closed,
}

impl Stream {
    async fn read(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read_buf(buf).await,
            Stream::Tls(s) => s.read_buf(buf).await,
            Stream::Closed => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(bytes).await,
            Stream::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
            Stream::Closed => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

fn tls_info(conn: &rustls::ClientConnection) -> TlsInfo {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(other) => format!("{other:?}"),
        None => "TLS".to_owned(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_else(|| "unknown".into());
    TlsInfo { version, cipher }
}

// ---------------------------------------------------------------------------
// TLS configuration
// ---------------------------------------------------------------------------

/// Where Debian/Ubuntu, Fedora/RHEL and Alpine keep the system's CA bundle.
const CA_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(crypto::ring::default_provider()))
        .clone()
}

/// The system's trust anchors, read once per process.
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        if let Some(path) = CA_BUNDLES.iter().find(|p| std::path::Path::new(p).exists()) {
            match CertificateDer::pem_file_iter(path) {
                Ok(certs) => {
                    let (added, ignored) =
                        roots.add_parsable_certificates(certs.filter_map(Result::ok));
                    debug!(path, added, ignored, "system trust anchors loaded");
                }
                Err(err) => debug!(path, error = %err, "cannot read the system CA bundle"),
            }
        }
        roots
    })
}

/// The rustls configuration for a policy; cached except when extra roots
/// make it particular.
fn tls_config(
    policy: TlsPolicy,
    extra_roots: &[CertificateDer<'static>],
) -> Result<Arc<TlsClientConfig>, String> {
    static UNVERIFIED: OnceLock<Arc<TlsClientConfig>> = OnceLock::new();
    static SYSTEM: OnceLock<Arc<TlsClientConfig>> = OnceLock::new();
    let builder = || {
        TlsClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration rejected: {e}"))
    };
    if policy != TlsPolicy::Verify {
        if let Some(config) = UNVERIFIED.get() {
            return Ok(config.clone());
        }
        let verifier = Arc::new(AnyCertificate {
            algorithms: provider().signature_verification_algorithms,
        });
        let config = builder()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        return Ok(UNVERIFIED.get_or_init(|| Arc::new(config)).clone());
    }
    if extra_roots.is_empty()
        && let Some(config) = SYSTEM.get()
    {
        return Ok(config.clone());
    }
    let mut roots = system_roots().clone();
    for (i, cert) in extra_roots.iter().enumerate() {
        roots
            .add(cert.clone())
            .map_err(|e| format!("extra_roots[{i}] is not a usable trust anchor: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "no trusted certificates to verify against (none of {} exists)",
            CA_BUNDLES.join(", ")
        ));
    }
    let config = Arc::new(
        builder()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    if extra_roots.is_empty() {
        return Ok(SYSTEM.get_or_init(|| config).clone());
    }
    Ok(config)
}

/// Accepts any certificate (opportunistic TLS protects against passive
/// eavesdropping only), but still checks the handshake signatures, so the
/// server must hold the key of the certificate it shows.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_timeouts_follow_rfc_5321() {
        let t = Timeouts::default();
        assert_eq!(t.greeting, Duration::from_secs(300));
        assert_eq!(t.mail, Duration::from_secs(300));
        assert_eq!(t.rcpt, Duration::from_secs(300));
        assert_eq!(t.data_init, Duration::from_secs(120));
        assert_eq!(t.data_block, Duration::from_secs(180));
        assert_eq!(t.data_done, Duration::from_secs(600));
    }

    #[test]
    fn options_debug_hides_the_password() {
        let mut options = ClientOptions::new("mx.test");
        options.credentials = Some(("app".into(), "s3cret".into()));
        let text = format!("{options:?}");
        assert!(text.contains("app") && !text.contains("s3cret"), "{text}");
    }

    #[test]
    fn tls_configs_build() {
        assert!(tls_config(TlsPolicy::Opportunistic, &[]).is_ok());
        assert!(
            tls_config(TlsPolicy::Verify, &[CertificateDer::from(vec![1, 2, 3])]).is_err(),
            "garbage is not a trust anchor"
        );
    }
}
