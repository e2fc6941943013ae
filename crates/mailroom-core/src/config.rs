//! The configuration: one struct per section, with its defaults and its
//! validation. Reading files and the environment is the binary's job; this
//! module only says what a valid configuration is.
//!
//! Every section denies unknown keys, so a typo stops the start instead of
//! being silently ignored.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// EHLO name, Received headers, and later the DSN reporting MTA.
    pub hostname: String,
    /// Where the database and the generated certificate live.
    pub data_dir: PathBuf,
    /// Mail for these domains is accepted from anyone (the MX role).
    pub local_domains: Vec<String>,
    /// How long open transactions may run on after SIGTERM/SIGINT.
    #[serde(with = "crate::duration")]
    pub shutdown_timeout: Duration,
    /// Threads running SMTP sessions and HTTP requests; 0: one per CPU but
    /// one (left to the store's writer), at least one.
    pub worker_threads: usize,
    pub smtp: SmtpConfig,
    /// Absent: a self-signed certificate is generated in `data_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    pub store: StoreConfig,
    pub dns: DnsConfig,
    pub delivery: DeliveryConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    /// `mailroom capture`, the developer's mail catcher; `serve` ignores it.
    pub capture: CaptureConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: "localhost".into(),
            data_dir: PathBuf::from("./mailroom-data"),
            local_domains: vec!["localhost".into()],
            shutdown_timeout: Duration::from_secs(30),
            worker_threads: 0,
            smtp: SmtpConfig::default(),
            tls: None,
            store: StoreConfig::default(),
            dns: DnsConfig::default(),
            delivery: DeliveryConfig::default(),
            http: HttpConfig::default(),
            log: LogConfig::default(),
            capture: CaptureConfig::default(),
        }
    }
}

/// What a listener is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Accepts mail for local domains from anyone; relays only for
    /// authenticated clients.
    Mx,
    /// AUTH is required before MAIL.
    Submission,
}

/// How a listener uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    Starttls,
    Implicit,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    pub role: Role,
    #[serde(default = "default_tls_mode")]
    pub tls: TlsMode,
}

fn default_tls_mode() -> TlsMode {
    TlsMode::Starttls
}

/// A login accepted by SMTP AUTH (the tenancy work moves these to the store).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpUser {
    pub username: String,
    /// An argon2 PHC string, as printed by `mailroom hash-password`.
    pub password_hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    pub listeners: Vec<ListenerConfig>,
    /// Largest message accepted, in octets (advertised with SIZE).
    pub max_message_size: usize,
    /// Recipients per transaction; more get `452 4.5.3`.
    pub max_recipients: usize,
    /// Longest command line, CRLF included.
    pub max_line_length: usize,
    /// Failed commands before the session is closed with `421`.
    pub max_errors: u32,
    /// Concurrent sessions over all listeners.
    pub max_connections: usize,
    /// Concurrent sessions from one client IP address.
    pub max_connections_per_ip: usize,
    /// Waiting for the next command (RFC 5321 §4.5.3.2.7: at least 5 min).
    #[serde(with = "crate::duration")]
    pub command_timeout: Duration,
    /// Waiting for the next piece of message data.
    #[serde(with = "crate::duration")]
    pub data_timeout: Duration,
    /// Offer AUTH on connections without TLS.
    pub allow_insecure_auth: bool,
    /// Clients in these networks (`"10.0.0.0/8"`, `"::1/128"`) may relay
    /// to any domain on `mx` listeners without AUTH, like Postfix's
    /// `mynetworks`. Empty by default: never an open relay.
    pub relay_networks: Vec<Cidr>,
    pub users: Vec<SmtpUser>,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        let listener = |addr: &str, role, tls| ListenerConfig {
            addr: addr.parse().expect("literal socket address"),
            role,
            tls,
        };
        SmtpConfig {
            listeners: vec![
                listener("127.0.0.1:2525", Role::Mx, TlsMode::Starttls),
                listener("127.0.0.1:2587", Role::Submission, TlsMode::Starttls),
                listener("127.0.0.1:2465", Role::Submission, TlsMode::Implicit),
            ],
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_line_length: 2048,
            max_errors: 10,
            max_connections: 1024,
            max_connections_per_ip: 256,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            allow_insecure_auth: false,
            relay_networks: Vec::new(),
            users: Vec::new(),
        }
    }
}

/// An IP network, `address/prefix-length`; a bare address is a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an IP network like \"10.0.0.0/8\""))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }

    /// True when `ip` is in this network (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Cidr::parse(&value)
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> Self {
        format!("{}/{}", c.addr, c.prefix)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; relative paths are read from the working directory.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// Connection URL (postgres only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Most messages committed in one group commit.
    pub max_batch: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Sqlite,
            url: None,
            max_batch: 512,
        }
    }
}

/// The HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Where the API listens; absent: no HTTP API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<SocketAddr>,
    /// The operator's key: manages every account. Absent: only existing
    /// account keys work, so no account can be created (`mailroom account
    /// create` uses this key too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_key: Option<String>,
    /// Largest request body in octets (a 25 MiB message is ~34 MiB in base64).
    pub max_body_size: usize,
    /// Origins a browser may call the API from (`*` for any); empty: no CORS.
    pub cors_origins: Vec<String>,
    /// Wait before a failed webhook call is tried again; doubles each time,
    /// up to an hour.
    #[serde(with = "crate::duration")]
    pub webhook_retry_initial: Duration,
    /// Calls of a webhook for one event before it is logged as failed.
    pub webhook_max_attempts: u32,
    /// One webhook call's time limit.
    #[serde(with = "crate::duration")]
    pub webhook_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            admin_key: None,
            max_body_size: 40 * 1024 * 1024,
            cors_origins: Vec::new(),
            webhook_retry_initial: Duration::from_secs(10),
            webhook_max_attempts: 12,
            webhook_timeout: Duration::from_secs(10),
        }
    }
}

/// How DNS lookups for delivery are made.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// DNS servers to ask (`"127.0.0.1:5353"`); empty: the system resolver
    /// (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// One query's time limit.
    #[serde(with = "crate::duration")]
    pub timeout: Duration,
    /// Answers are cached at least this long, whatever their TTL says.
    #[serde(with = "crate::duration")]
    pub min_ttl: Duration,
    /// ... and at most this long.
    #[serde(with = "crate::duration")]
    pub max_ttl: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(5),
            min_ttl: Duration::from_secs(5 * 60),
            max_ttl: Duration::from_secs(15 * 60),
        }
    }
}

/// When the SMTP client uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    /// Never, even when offered.
    None,
    /// STARTTLS when the server offers it, without checking its certificate
    /// (what most MX-to-MX mail does); plaintext otherwise.
    #[default]
    Opportunistic,
    /// STARTTLS or fail (temporarily); the certificate is not checked.
    Required,
    /// STARTTLS with a certificate valid for the host name, or fail.
    Verify,
}

/// Outbound delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// The port MX hosts are reached on (25; tests use another).
    pub smtp_port: u16,
    /// TLS for MX delivery.
    pub tls: TlsPolicy,
    /// Deliveries in flight over all destinations.
    pub concurrency: usize,
    /// Deliveries in flight to one destination domain, and connections to
    /// one MX host (shared by the domains it serves).
    pub connection_limit: usize,
    /// Messages per second started towards one destination domain; 0: no
    /// limit.
    pub max_message_rate: f64,
    /// Transactions one connection carries before it is closed.
    pub max_messages_per_connection: u32,
    /// How long an idle connection is kept for the next message.
    #[serde(with = "crate::duration")]
    pub idle_timeout: Duration,
    /// First retry delay; doubles per attempt.
    #[serde(with = "crate::duration")]
    pub retry_initial: Duration,
    /// Longest retry delay.
    #[serde(with = "crate::duration")]
    pub retry_max: Duration,
    /// After this long in the queue a recipient is bounced.
    #[serde(with = "crate::duration")]
    pub max_lifetime: Duration,
    /// Send one "delayed" DSN (to recipients whose NOTIFY allows it) once a
    /// recipient has been deferred this long; absent: never.
    #[serde(
        default,
        with = "crate::duration::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub delay_warning: Option<Duration>,
    /// Static routes by recipient domain, first match wins; domains that
    /// match none go to their MX hosts.
    pub routes: Vec<RouteConfig>,
}

/// Mail for matching recipient domains goes through a smarthost (an
/// upstream relay or an email provider's SMTP endpoint) instead of MX.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `example.com`, `*.example.com` (subdomains only) or `*` (everything).
    pub domain: String,
    /// `host:port` of the relay.
    pub relay: String,
    /// TLS towards the relay; default `required`.
    #[serde(default = "default_relay_tls")]
    pub tls: TlsPolicy,
    /// AUTH PLAIN/LOGIN credentials, when the relay wants them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

fn default_relay_tls() -> TlsPolicy {
    TlsPolicy::Required
}

impl RouteConfig {
    /// True when this route applies to `domain` (lowercase).
    pub fn matches(&self, domain: &str) -> bool {
        let pattern = self.domain.to_ascii_lowercase();
        if pattern == "*" {
            true
        } else if let Some(parent) = pattern.strip_prefix("*.") {
            domain.len() > parent.len() + 1
                && domain.ends_with(parent)
                && domain.as_bytes()[domain.len() - parent.len() - 1] == b'.'
        } else {
            domain.eq_ignore_ascii_case(&pattern)
        }
    }

    /// The relay's host and port.
    pub fn relay_host_port(&self) -> Option<(&str, u16)> {
        let (host, port) = self.relay.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Some((host, port.parse().ok()?))
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            smtp_port: 25,
            tls: TlsPolicy::Opportunistic,
            concurrency: 100,
            connection_limit: 10,
            max_message_rate: 0.0,
            max_messages_per_connection: 100,
            idle_timeout: Duration::from_secs(5),
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            max_lifetime: Duration::from_secs(5 * 86_400),
            delay_warning: None,
            routes: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `info`, `mailroom_smtp=debug,info`, ...
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Pretty,
        }
    }
}

/// `[capture]`: everything `mailroom capture` uses besides `hostname`.
/// Capture mode accepts any mail and any login: it must never face the
/// internet, hence loopback addresses by default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureConfig {
    /// SMTP listener (`--smtp`).
    pub smtp: SocketAddr,
    /// Web UI and JSON API (`--http`).
    pub http: SocketAddr,
    /// Largest message accepted, in octets; 0 means no limit.
    pub max_message_size: usize,
    pub max_recipients: usize,
    /// Waiting for the client's next command or piece of message data.
    #[serde(with = "crate::duration")]
    pub read_timeout: Duration,
    /// Waiting for the client to take our replies.
    #[serde(with = "crate::duration")]
    pub write_timeout: Duration,
    /// Put the whole message in the event's `message.raw`.
    pub include_raw: bool,
    /// `memory` (base64 in the event) or `tempfile` (a path in the event).
    pub attachments: AttachmentMode,
    /// Where `tempfile` attachments go; absent: the system temp directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temp_dir: Option<PathBuf>,
    /// How long `tempfile` attachments live.
    #[serde(with = "crate::duration")]
    pub cleanup_after: Duration,
    /// Where the inbox file (`inbox.sqlite3`) lives; created if missing.
    pub data_dir: PathBuf,
    /// Messages kept in the inbox; the oldest go first.
    pub max_messages: usize,
    /// Messages older than this leave the inbox; 0s keeps them.
    #[serde(with = "crate::duration")]
    pub max_age: Duration,
    pub workers: CaptureWorkers,
    pub webhook: CaptureWebhook,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            smtp: SocketAddr::from(([127, 0, 0, 1], 1025)),
            http: SocketAddr::from(([127, 0, 0, 1], 8025)),
            max_message_size: 10 * 1024 * 1024,
            max_recipients: 100,
            read_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
            include_raw: false,
            attachments: AttachmentMode::Memory,
            temp_dir: None,
            cleanup_after: Duration::from_secs(3600),
            data_dir: PathBuf::from("./mailroom-capture-data"),
            max_messages: 10_000,
            max_age: Duration::ZERO,
            workers: CaptureWorkers::default(),
            webhook: CaptureWebhook::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachmentMode {
    Memory,
    Tempfile,
}

/// How events travel to and from a worker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerCodec {
    /// One JSON event per line in; `CONTINUE` or `CLOSE` per line back.
    Jsonl,
    /// RoadRunner's goridge frames, so a RoadRunner PHP worker serves it.
    Goridge,
}

/// `[capture.workers]`: a pool of processes that each message is handed to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureWorkers {
    /// Program and arguments; empty: no workers.
    pub command: Vec<String>,
    pub codec: WorkerCodec,
    pub num_workers: usize,
    /// Messages a worker handles before it is replaced; 0: never.
    pub max_jobs: u64,
    /// Longest an SMTP session waits for a free worker (or a new one to
    /// start) before it gets `451`.
    #[serde(with = "crate::duration")]
    pub allocate_timeout: Duration,
    /// Longest a worker is given to stop before it is killed.
    #[serde(with = "crate::duration")]
    pub destroy_timeout: Duration,
    /// Longest a worker may take over one message.
    #[serde(with = "crate::duration")]
    pub exec_timeout: Duration,
}

impl Default for CaptureWorkers {
    fn default() -> Self {
        CaptureWorkers {
            command: Vec::new(),
            codec: WorkerCodec::Jsonl,
            num_workers: 2,
            max_jobs: 0,
            allocate_timeout: Duration::from_secs(60),
            destroy_timeout: Duration::from_secs(5),
            exec_timeout: Duration::from_secs(30),
        }
    }
}

/// `[capture.webhook]`: POST each event to a URL.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureWebhook {
    /// `http://` or `https://` URL; empty: no webhook.
    pub url: String,
    /// Further tries after a failed POST, with doubling pauses.
    pub retries: u32,
    #[serde(with = "crate::duration")]
    pub timeout: Duration,
}

impl Default for CaptureWebhook {
    fn default() -> Self {
        CaptureWebhook {
            url: String::new(),
            retries: 3,
            timeout: Duration::from_secs(10),
        }
    }
}

impl CaptureConfig {
    /// What serde cannot check about `[capture]`.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.smtp == self.http {
            return Err(invalid("capture.http", "must differ from capture.smtp"));
        }
        for (key, value) in [
            ("capture.max_recipients", self.max_recipients),
            ("capture.max_messages", self.max_messages),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        for (key, value) in [
            ("capture.read_timeout", self.read_timeout),
            ("capture.write_timeout", self.write_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than 0s"));
            }
        }
        let w = &self.workers;
        if !w.command.is_empty() {
            if w.command[0].is_empty() {
                return Err(invalid("capture.workers.command", "the program is empty"));
            }
            if w.num_workers == 0 {
                return Err(invalid(
                    "capture.workers.num_workers",
                    "must be greater than 0",
                ));
            }
            for (key, value) in [
                ("capture.workers.allocate_timeout", w.allocate_timeout),
                ("capture.workers.exec_timeout", w.exec_timeout),
            ] {
                if value.is_zero() {
                    return Err(invalid(key, "must be longer than 0s"));
                }
            }
        }
        let url = &self.webhook.url;
        if !url.is_empty() && !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(invalid(
                "capture.webhook.url",
                "must be an http:// or https:// URL",
            ));
        }
        Ok(())
    }
}

/// A configuration that parsed but makes no sense, naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct InvalidConfig {
    pub key: String,
    pub message: String,
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> InvalidConfig {
    InvalidConfig {
        key: key.into(),
        message: message.into(),
    }
}

impl Config {
    /// Checks what serde cannot: relations between keys and ranges.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.hostname.is_empty() || self.hostname.contains(char::is_whitespace) {
            return Err(invalid("hostname", "must be a non-empty host name"));
        }
        for (i, d) in self.local_domains.iter().enumerate() {
            if d.is_empty() || d.contains(['@', ' ']) {
                return Err(invalid(
                    format!("local_domains[{i}]"),
                    format!("{d:?} is not a domain"),
                ));
            }
        }
        let smtp = &self.smtp;
        if smtp.listeners.is_empty() {
            return Err(invalid("smtp.listeners", "at least one listener is needed"));
        }
        let mut seen = HashSet::new();
        for (i, l) in smtp.listeners.iter().enumerate() {
            if !seen.insert(l.addr) {
                return Err(invalid(
                    format!("smtp.listeners[{i}].addr"),
                    format!("{} is used by another listener", l.addr),
                ));
            }
        }
        let positive = [
            ("smtp.max_message_size", smtp.max_message_size),
            ("smtp.max_recipients", smtp.max_recipients),
            ("smtp.max_connections", smtp.max_connections),
            ("smtp.max_connections_per_ip", smtp.max_connections_per_ip),
            ("store.max_batch", self.store.max_batch),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if smtp.max_line_length < 512 {
            return Err(invalid(
                "smtp.max_line_length",
                "must be at least 512 (RFC 5321 §4.5.3.1.4)",
            ));
        }
        if smtp.max_errors == 0 {
            return Err(invalid("smtp.max_errors", "must be greater than 0"));
        }
        for (key, value) in [
            ("smtp.command_timeout", smtp.command_timeout),
            ("smtp.data_timeout", smtp.data_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than 0s"));
            }
        }
        for (i, u) in smtp.users.iter().enumerate() {
            if u.username.is_empty() {
                return Err(invalid(format!("smtp.users[{i}].username"), "is empty"));
            }
            if !u.password_hash.starts_with("$argon2") {
                return Err(invalid(
                    format!("smtp.users[{i}].password_hash"),
                    "must be an argon2 hash (see `mailroom hash-password`)",
                ));
            }
        }
        if self.http.webhook_max_attempts == 0 || self.http.webhook_timeout.is_zero() {
            return Err(invalid(
                "http.webhook_max_attempts",
                "webhook_max_attempts and webhook_timeout must be above 0",
            ));
        }
        if self.http.max_body_size == 0 {
            return Err(invalid("http.max_body_size", "must be greater than 0"));
        }
        if let Some(key) = &self.http.admin_key
            && key.len() < 16
        {
            return Err(invalid(
                "http.admin_key",
                "must be at least 16 characters (it guards every account)",
            ));
        }
        if self.dns.timeout.is_zero() {
            return Err(invalid("dns.timeout", "must be longer than 0s"));
        }
        if self.dns.min_ttl > self.dns.max_ttl {
            return Err(invalid(
                "dns.min_ttl",
                "must not be longer than dns.max_ttl",
            ));
        }
        for (key, value) in [
            ("delivery.concurrency", self.delivery.concurrency),
            ("delivery.connection_limit", self.delivery.connection_limit),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if !(self.delivery.max_message_rate >= 0.0 && self.delivery.max_message_rate.is_finite()) {
            return Err(invalid("delivery.max_message_rate", "must be 0 or more"));
        }
        if self.delivery.retry_initial.is_zero()
            || self.delivery.retry_initial > self.delivery.retry_max
        {
            return Err(invalid(
                "delivery.retry_initial",
                "must be longer than 0s and not longer than delivery.retry_max",
            ));
        }
        for (i, r) in self.delivery.routes.iter().enumerate() {
            if r.domain.is_empty() || r.domain.contains('@') {
                return Err(invalid(
                    format!("delivery.routes[{i}].domain"),
                    "must be a domain, `*.domain` or `*`",
                ));
            }
            if r.relay_host_port()
                .is_none_or(|(h, p)| h.is_empty() || p == 0)
            {
                return Err(invalid(
                    format!("delivery.routes[{i}].relay"),
                    format!("{:?} is not host:port", r.relay),
                ));
            }
            if r.username.is_some() != r.password.is_some() {
                return Err(invalid(
                    format!("delivery.routes[{i}].password"),
                    "username and password go together",
                ));
            }
        }
        if self.delivery.smtp_port == 0 {
            return Err(invalid("delivery.smtp_port", "must be a port number"));
        }
        match self.store.backend {
            StoreBackend::Sqlite => {}
            StoreBackend::Postgres => {
                return Err(invalid(
                    "store.backend",
                    "postgres is not available in this build yet; use \"sqlite\"",
                ));
            }
        }
        self.capture.validate()?;
        Ok(())
    }

    /// True when `domain` is one of `local_domains` (case-insensitive).
    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.local_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn networks() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let host = Cidr::parse("::1").unwrap();
        assert!(host.contains("::1".parse().unwrap()));
        assert!(!host.contains("::2".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("example.com/8").is_err());
        assert_eq!(String::from(net), "10.1.0.0/16");
    }

    #[test]
    fn route_patterns() {
        let route = |domain: &str| RouteConfig {
            domain: domain.into(),
            relay: "smtp.provider.test:587".into(),
            tls: TlsPolicy::Required,
            username: None,
            password: None,
        };
        assert!(route("example.com").matches("example.com"));
        assert!(!route("example.com").matches("sub.example.com"));
        assert!(route("*.example.com").matches("sub.example.com"));
        assert!(!route("*.example.com").matches("example.com"));
        assert!(!route("*.example.com").matches("badexample.com"));
        assert!(route("*").matches("anything.test"));
        assert_eq!(
            route("x").relay_host_port(),
            Some(("smtp.provider.test", 587))
        );
    }

    #[test]
    fn names_the_key() {
        let mut c = Config::default();
        c.smtp.max_recipients = 0;
        assert_eq!(c.validate().unwrap_err().key, "smtp.max_recipients");
        let mut c = Config::default();
        c.smtp.listeners.push(c.smtp.listeners[0].clone());
        assert_eq!(c.validate().unwrap_err().key, "smtp.listeners[3].addr");
    }
}
