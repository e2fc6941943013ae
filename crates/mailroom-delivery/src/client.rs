//! The SMTP client conversation (RFC 5321, client side) as a sans-I/O state
//! machine.
//!
//! Server bytes go in through [`Client::feed`]; commands to write pile up in
//! [`Client::output`]; whenever the conversation reaches a point the driver
//! must act on (the connection is ready, a TLS handshake is due, the message
//! content must be written, a transaction is over, something failed) `feed`
//! returns an [`Event`]. No sockets and no clock: [`crate::connection`] does
//! the I/O and the timeouts, tests drive this with byte strings.
//!
//! What it refuses to do, because it would change the message on the way:
//! send a message that needs SMTPUTF8 (RFC 6531) to a server without it
//! (`5.6.7`), send 8-bit content to a server without 8BITMIME (`5.6.3`; we
//! do not downgrade to quoted-printable), or send a message larger than the
//! server's advertised SIZE (`5.3.4`). Those fail before MAIL, and the
//! connection stays usable for other messages.
//!
//! Replies are framed here rather than by smtp-proto's `ResponseReceiver`:
//! that caps a reply's text at 4 KiB and accepts a multi-line reply whose
//! lines carry different codes (a `250-` line followed by `550 ` would read
//! as success). EHLO keywords are matched here too, into smtp-proto's
//! `EXT_*`/`AUTH_*` bits: its `EhloResponse` parser misreads an overlong SIZE
//! value as a small limit, and a misread limit would bounce mail for good.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use mailroom_core::config::TlsPolicy;
use mailroom_core::reply::{Enhanced, Reply};
use mailroom_core::{Address, BodyType, Envelope, Notify, Recipient, Ret};
use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, EXT_8BIT_MIME, EXT_AUTH, EXT_BINARY_MIME, EXT_CHUNKING, EXT_DSN,
    EXT_ENHANCED_STATUS_CODES, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8, EXT_START_TLS,
};

/// The most bytes one reply (all its lines) may take; a server sending more
/// is treated as broken.
pub const MAX_REPLY_SIZE: usize = 64 * 1024;

// ---------------------------------------------------------------------------
// What goes in and out
// ---------------------------------------------------------------------------

/// How a conversation is set up.
#[derive(Clone)]
pub struct ClientConfig {
    /// Our name in EHLO/HELO.
    pub helo_name: String,
    /// The server's host name, for error messages.
    pub server_name: String,
    pub tls: TlsPolicy,
    /// `(username, password)` for AUTH PLAIN or LOGIN.
    pub credentials: Option<(String, String)>,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("helo_name", &self.helo_name)
            .field("server_name", &self.server_name)
            .field("tls", &self.tls)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(u, _)| (u, "***")),
            )
            .finish()
    }
}

/// One transaction's envelope, as the delivery side hands it over: usually
/// the recipients of one message that go to the same destination.
#[derive(Debug, Clone, Copy)]
pub struct OutboundEnvelope<'a> {
    /// `None` is the null reverse-path `<>` (bounces).
    pub reverse_path: Option<&'a Address>,
    pub recipients: &'a [Recipient],
    /// `ENVID=` (RFC 3461), sent when the server offers DSN.
    pub env_id: Option<&'a str>,
    /// `RET=` (RFC 3461), sent when the server offers DSN.
    pub ret: Option<Ret>,
    pub body_type: BodyType,
    /// The submitter asked for SMTPUTF8.
    pub smtputf8: bool,
}

impl<'a> OutboundEnvelope<'a> {
    /// The whole envelope of a received message, all recipients included.
    pub fn from_envelope(envelope: &'a Envelope) -> Self {
        OutboundEnvelope {
            reverse_path: envelope.reverse_path.as_ref(),
            recipients: &envelope.recipients,
            env_id: envelope.env_id.as_deref(),
            ret: envelope.ret,
            body_type: envelope.body_type,
            smtputf8: envelope.smtputf8,
        }
    }
}

/// What became of one recipient of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientOutcome {
    /// The server took responsibility for the message (2xx after the data).
    Delivered(Reply),
    /// Try again later (4xx to RCPT, DATA or the end of data).
    Deferred(Reply),
    /// Never try again (5xx).
    Failed(Reply),
}

impl RecipientOutcome {
    /// The reply that decided the outcome.
    pub fn reply(&self) -> &Reply {
        match self {
            RecipientOutcome::Delivered(r)
            | RecipientOutcome::Deferred(r)
            | RecipientOutcome::Failed(r) => r,
        }
    }

    /// Deferred or failed, by the reply's class.
    fn refused(reply: Reply) -> Self {
        if reply.code >= 500 {
            RecipientOutcome::Failed(reply)
        } else {
            RecipientOutcome::Deferred(reply)
        }
    }
}

/// Whether a failure is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Temporary,
    Permanent,
}

/// Where a conversation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Greeting,
    /// EHLO or HELO.
    Ehlo,
    /// The STARTTLS command or the TLS handshake.
    StartTls,
    Auth,
    Mail,
    Rcpt,
    /// DATA, the content, or the reply to the end of data.
    Data,
    Reset,
    Quit,
    /// The connection broke (reset, closed by the server mid-reply).
    Io,
    /// The server did not answer, or not read, in time.
    Timeout,
    /// We refused before asking the server (the message needs something the
    /// server lacks, or the configuration forbids what would be needed).
    Policy,
}

/// A failure of a whole transaction or of the connection: every recipient
/// of the transaction shares it. Failures of single recipients are
/// [`RecipientOutcome`]s instead.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", self.describe())]
pub struct DeliveryError {
    kind: ErrorKind,
    stage: Stage,
    host: String,
    reply: Option<Reply>,
    enhanced: Enhanced,
    message: String,
}

impl DeliveryError {
    /// A failure we decided on ourselves; `message` should name `host`.
    pub fn new(
        kind: ErrorKind,
        stage: Stage,
        host: &str,
        enhanced: Enhanced,
        message: impl Into<String>,
    ) -> Self {
        DeliveryError {
            kind,
            stage,
            host: host.to_owned(),
            reply: None,
            enhanced,
            message: message.into(),
        }
    }

    /// A failure the server replied; temporary or permanent by the reply's
    /// class. `message` says what the reply was to, naming `host`.
    pub fn from_reply(stage: Stage, host: &str, reply: Reply, message: impl Into<String>) -> Self {
        let permanent = reply.code >= 500;
        let class = if permanent { 5 } else { 4 };
        DeliveryError {
            kind: if permanent {
                ErrorKind::Permanent
            } else {
                ErrorKind::Temporary
            },
            stage,
            host: host.to_owned(),
            enhanced: reply.enhanced.unwrap_or(Enhanced(class, 0, 0)),
            reply: Some(reply),
            message: message.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn is_permanent(&self) -> bool {
        self.kind == ErrorKind::Permanent
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The server this happened with.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The server's reply, when the server said no (as opposed to not
    /// answering, or us refusing).
    pub fn reply(&self) -> Option<&Reply> {
        self.reply.as_ref()
    }

    /// The status code for a DSN: the server's enhanced code when it gave
    /// one, else one chosen here.
    pub fn enhanced(&self) -> Enhanced {
        self.enhanced
    }

    /// What happened, without the server's reply.
    pub fn message(&self) -> &str {
        &self.message
    }

    fn describe(&self) -> String {
        match &self.reply {
            Some(reply) => format!("{}: {}", self.message, one_line(reply)),
            None => {
                let Enhanced(c, s, d) = self.enhanced;
                format!("{c}.{s}.{d} {}", self.message)
            }
        }
    }
}

/// A reply on one line, for messages and logs.
fn one_line(reply: &Reply) -> String {
    let mut out = reply.code.to_string();
    if let Some(Enhanced(c, s, d)) = reply.enhanced {
        out.push_str(&format!(" {c}.{s}.{d}"));
    }
    for line in reply.text.split('\n') {
        out.push(' ');
        out.push_str(line);
    }
    out.truncate(out.trim_end().len());
    out
}

/// What the conversation needs from its driver.
#[derive(Debug)]
pub enum Event {
    /// Greeting, EHLO, STARTTLS and AUTH are done: ready for a transaction.
    Ready,
    /// Write the output, discard every byte of input not yet fed (anything
    /// the server sent after its `220` came in plaintext and must not be
    /// read as if it came over TLS), do the handshake, then call
    /// [`Client::tls_started`].
    StartTls,
    /// The server said `354`: write the output, then the content through a
    /// [`DataEncoder`], then call [`Client::data_sent`].
    SendData,
    /// The transaction is over; one outcome per recipient, in order.
    Sent(Vec<RecipientOutcome>),
    /// `RSET` was accepted.
    Reset,
    /// `QUIT` was answered.
    Closed,
    /// The step in progress failed; see [`Client::is_usable`] for whether
    /// the connection can go on.
    Failed(DeliveryError),
}

/// The reply the conversation waits for, which decides the read timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    Greeting,
    /// EHLO or HELO.
    Ehlo,
    StartTls,
    Auth,
    Mail,
    Rcpt,
    /// The `354` to DATA.
    DataInit,
    /// The reply to the end of data.
    DataDone,
    Rset,
    Quit,
}

impl Waiting {
    /// For messages: "the reply to RCPT TO", ...
    pub fn describe(self) -> &'static str {
        match self {
            Waiting::Greeting => "the greeting",
            Waiting::Ehlo => "the reply to EHLO/HELO",
            Waiting::StartTls => "the reply to STARTTLS",
            Waiting::Auth => "the reply to AUTH",
            Waiting::Mail => "the reply to MAIL FROM",
            Waiting::Rcpt => "the reply to RCPT TO",
            Waiting::DataInit => "the reply to DATA",
            Waiting::DataDone => "the reply to the end of data",
            Waiting::Rset => "the reply to RSET",
            Waiting::Quit => "the reply to QUIT",
        }
    }

    /// Where a failure while waiting for this belongs.
    pub fn stage(self) -> Stage {
        match self {
            Waiting::Greeting => Stage::Greeting,
            Waiting::Ehlo => Stage::Ehlo,
            Waiting::StartTls => Stage::StartTls,
            Waiting::Auth => Stage::Auth,
            Waiting::Mail => Stage::Mail,
            Waiting::Rcpt => Stage::Rcpt,
            Waiting::DataInit | Waiting::DataDone => Stage::Data,
            Waiting::Rset => Stage::Reset,
            Waiting::Quit => Stage::Quit,
        }
    }
}

// ---------------------------------------------------------------------------
// Capabilities
// ---------------------------------------------------------------------------

/// What the server said it supports in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    esmtp: bool,
    /// smtp-proto's `EXT_*` bits.
    extensions: u32,
    /// smtp-proto's `AUTH_*` bits (only PLAIN and LOGIN are looked for).
    auth: u64,
    size: Option<u64>,
}

impl Capabilities {
    /// Reads an EHLO reply: the first line is the server's name, each
    /// further line one keyword with its parameters.
    pub fn from_ehlo(reply: &Reply) -> Self {
        let mut caps = Capabilities {
            esmtp: true,
            ..Capabilities::default()
        };
        for line in reply.text.split('\n').skip(1) {
            // `AUTH=LOGIN PLAIN` is an old spelling some servers still use.
            let mut words = line.split([' ', '=']).filter(|w| !w.is_empty());
            let Some(keyword) = words.next() else {
                continue;
            };
            let bit = match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => EXT_PIPELINING,
                "SIZE" => {
                    // `SIZE` alone or `SIZE 0` means no fixed limit (RFC 1870
                    // §4); an unreadable limit is treated the same, since
                    // the server still enforces its own.
                    caps.size = words
                        .next()
                        .and_then(|w| w.parse::<u64>().ok())
                        .filter(|&n| n > 0);
                    EXT_SIZE
                }
                "8BITMIME" => EXT_8BIT_MIME,
                "SMTPUTF8" => EXT_SMTP_UTF8,
                "STARTTLS" => EXT_START_TLS,
                "CHUNKING" => EXT_CHUNKING,
                "BINARYMIME" => EXT_BINARY_MIME,
                "DSN" => EXT_DSN,
                "ENHANCEDSTATUSCODES" => EXT_ENHANCED_STATUS_CODES,
                "AUTH" => {
                    for mechanism in words {
                        caps.auth |= match mechanism.to_ascii_uppercase().as_str() {
                            "PLAIN" => AUTH_PLAIN,
                            "LOGIN" => AUTH_LOGIN,
                            _ => 0,
                        };
                    }
                    EXT_AUTH
                }
                _ => 0,
            };
            caps.extensions |= bit;
        }
        caps
    }

    /// The server answered EHLO (not only HELO).
    pub fn is_esmtp(&self) -> bool {
        self.esmtp
    }

    /// Whether an `EXT_*` bit of smtp-proto is set.
    pub fn has(&self, extension: u32) -> bool {
        self.extensions & extension != 0
    }

    pub fn pipelining(&self) -> bool {
        self.has(EXT_PIPELINING)
    }

    pub fn starttls(&self) -> bool {
        self.has(EXT_START_TLS)
    }

    pub fn eight_bit_mime(&self) -> bool {
        self.has(EXT_8BIT_MIME)
    }

    pub fn smtputf8(&self) -> bool {
        self.has(EXT_SMTP_UTF8)
    }

    pub fn dsn(&self) -> bool {
        self.has(EXT_DSN)
    }

    /// The advertised fixed size limit; `None` when SIZE is not offered or
    /// offered without a limit.
    pub fn size_limit(&self) -> Option<u64> {
        self.size
    }

    pub fn auth_plain(&self) -> bool {
        self.has(EXT_AUTH) && self.auth & AUTH_PLAIN != 0
    }

    pub fn auth_login(&self) -> bool {
        self.has(EXT_AUTH) && self.auth & AUTH_LOGIN != 0
    }
}

// ---------------------------------------------------------------------------
// The conversation
// ---------------------------------------------------------------------------

enum State {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    /// [`Event::StartTls`] is out; nothing is read until the handshake.
    TlsPending,
    Auth(AuthStep),
    /// Ready for a transaction, RSET or QUIT.
    Idle,
    Transaction(Box<Transaction>),
    /// [`Event::SendData`] is out; waiting for the driver to write it.
    DataPending(Box<Transaction>),
    /// The content is written; waiting for the final reply.
    DataDone(Box<Transaction>),
    /// RSET is out; with outcomes when it ends a transaction that did not
    /// reach the end of data.
    Rset(Option<Vec<RecipientOutcome>>),
    Quit,
    /// Still in step with the server, but only QUIT makes sense (the
    /// greeting, EHLO, STARTTLS, AUTH or RSET was refused).
    Broken,
    /// Nothing more can be said on this connection.
    Closed,
}

#[derive(Clone, Copy)]
enum AuthStep {
    /// `AUTH PLAIN <response>` is out; `resent` once the response was sent
    /// again after an empty `334`.
    Plain {
        resent: bool,
    },
    LoginUser,
    LoginPassword,
    LoginDone,
}

#[derive(Debug, Clone, Copy)]
enum Command {
    Mail,
    Rcpt(usize),
    Data,
}

struct Transaction {
    /// Commands written whose replies have not come yet, oldest first.
    awaiting: VecDeque<Command>,
    /// Commands still to write: without PIPELINING, one per reply.
    unsent: VecDeque<(Command, Vec<u8>)>,
    outcomes: Vec<Option<RecipientOutcome>>,
    /// Recipients the server accepted at RCPT.
    accepted: Vec<usize>,
    mail_refused: Option<Reply>,
}

impl Transaction {
    fn into_outcomes(self) -> Vec<RecipientOutcome> {
        self.outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    RecipientOutcome::Deferred(Reply::new(
                        451,
                        Enhanced(4, 4, 0),
                        "No reply to RCPT for this recipient",
                    ))
                })
            })
            .collect()
    }
}

/// One SMTP client conversation.
pub struct Client {
    config: ClientConfig,
    state: State,
    output: Vec<u8>,
    reader: ReplyReader,
    capabilities: Capabilities,
    tls: bool,
    authenticated: bool,
    transactions: u32,
    /// An event that needs no reply (a transaction whose recipients were
    /// all refused before anything was sent); `feed` returns it first.
    ready: Option<Event>,
}

impl Client {
    /// Starts a conversation on a new connection; the server speaks first.
    pub fn new(config: ClientConfig) -> Self {
        Client {
            config,
            state: State::Greeting,
            output: Vec::with_capacity(256),
            reader: ReplyReader::default(),
            capabilities: Capabilities::default(),
            tls: false,
            authenticated: false,
            transactions: 0,
            ready: None,
        }
    }

    /// Commands not yet written to the server.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// Forgets the output once the driver has written it.
    pub fn clear_output(&mut self) {
        self.output.clear();
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// TLS was started (the driver reported the handshake done).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// Transactions begun (MAIL sent) on this connection.
    pub fn transactions(&self) -> u32 {
        self.transactions
    }

    /// Ready for [`Client::send`].
    pub fn is_usable(&self) -> bool {
        matches!(self.state, State::Idle) && self.ready.is_none()
    }

    /// The server may still read a QUIT.
    pub fn can_quit(&self) -> bool {
        matches!(self.state, State::Idle | State::Broken)
    }

    /// The reply being waited for; `None` when none is (idle, closed, or an
    /// event is with the driver).
    pub fn waiting(&self) -> Option<Waiting> {
        Some(match &self.state {
            State::Greeting => Waiting::Greeting,
            State::Ehlo | State::Helo => Waiting::Ehlo,
            State::StartTls => Waiting::StartTls,
            State::Auth(_) => Waiting::Auth,
            State::Transaction(tx) => match tx.awaiting.front() {
                Some(Command::Mail) => Waiting::Mail,
                Some(Command::Rcpt(_)) => Waiting::Rcpt,
                Some(Command::Data) => Waiting::DataInit,
                None => return None,
            },
            State::DataDone(_) => Waiting::DataDone,
            State::Rset(_) => Waiting::Rset,
            State::Quit => Waiting::Quit,
            State::TlsPending
            | State::DataPending(_)
            | State::Idle
            | State::Broken
            | State::Closed => return None,
        })
    }

    /// The connection broke (I/O error, timeout, failed handshake): nothing
    /// more will be said.
    pub fn abort(&mut self) {
        self.state = State::Closed;
        self.ready = None;
    }

    /// Consumes server bytes until they are used up or an event is due.
    /// Returns how many bytes were consumed; after an event, feed the rest
    /// again (except after [`Event::StartTls`], which discards it).
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<Event>) {
        if let Some(event) = self.ready.take() {
            return (0, Some(event));
        }
        let mut pos = 0;
        while pos < input.len() {
            match self.state {
                State::TlsPending | State::DataPending(_) => return (pos, None),
                State::Closed => return (input.len(), None),
                _ => {}
            }
            let (used, reply) = self.reader.feed(&input[pos..]);
            pos += used;
            match reply {
                None => {}
                Some(Err(err)) => {
                    let stage = self.waiting().map_or(Stage::Io, Waiting::stage);
                    let message = match err {
                        ReplyError::Invalid => {
                            format!("invalid response from {}", self.config.server_name)
                        }
                        ReplyError::TooLong => format!(
                            "response from {} longer than {MAX_REPLY_SIZE} bytes",
                            self.config.server_name
                        ),
                    };
                    let error = self.temporary(stage, Enhanced(4, 5, 0), message);
                    return (input.len(), Some(self.fail_closed(error)));
                }
                Some(Ok(reply)) => {
                    if let Some(event) = self.on_reply(reply) {
                        return (pos, Some(event));
                    }
                }
            }
        }
        (pos, None)
    }

    /// The driver's answer to [`Event::StartTls`]: the conversation starts
    /// over with EHLO (RFC 3207 §4.2), forgetting what it knew.
    pub fn tls_started(&mut self) {
        if !matches!(self.state, State::TlsPending) {
            return;
        }
        self.tls = true;
        self.capabilities = Capabilities::default();
        self.reader = ReplyReader::default();
        self.ehlo();
    }

    /// The driver's answer to [`Event::SendData`].
    pub fn data_sent(&mut self) {
        if let State::DataPending(tx) = std::mem::replace(&mut self.state, State::Closed) {
            self.state = State::DataDone(tx);
        }
    }

    /// Begins a transaction: MAIL, RCPTs and DATA (in one group with
    /// PIPELINING). Fails at once, with nothing sent and the connection
    /// still usable, when the message cannot be sent to this server
    /// without changing it.
    pub fn send(
        &mut self,
        envelope: &OutboundEnvelope<'_>,
        content: &[u8],
    ) -> Result<(), DeliveryError> {
        if !self.is_usable() {
            return Err(self.temporary(
                Stage::Mail,
                Enhanced(4, 4, 2),
                format!(
                    "the connection to {} is not ready for a transaction",
                    self.config.server_name
                ),
            ));
        }
        let host = self.config.server_name.as_str();
        let caps = &self.capabilities;
        let needs_utf8 = envelope.smtputf8
            || envelope.reverse_path.is_some_and(|a| !a.is_ascii())
            || envelope.recipients.iter().any(|r| !r.address.is_ascii());
        if needs_utf8 && !caps.smtputf8() {
            return Err(self.permanent(
                Stage::Policy,
                Enhanced(5, 6, 7),
                format!(
                    "the message needs SMTPUTF8 (a non-ASCII address, or the sender asked for it) \
                     but {host} does not offer it"
                ),
            ));
        }
        // The declared body type alone does not decide: 7-bit content sent
        // as it is cannot be damaged, whatever the submitter declared.
        let eight_bit = !content.is_ascii();
        if eight_bit && !caps.eight_bit_mime() {
            return Err(self.permanent(
                Stage::Policy,
                Enhanced(5, 6, 3),
                format!("8-bit content not supported by the receiving server {host}"),
            ));
        }
        let size = content.len() as u64 + if content.ends_with(b"\r\n") { 0 } else { 2 };
        if let Some(limit) = caps.size_limit()
            && size > limit
        {
            return Err(self.permanent(
                Stage::Policy,
                Enhanced(5, 3, 4),
                format!(
                    "message size {size} exceeds the fixed maximum message size \
                     {limit} advertised by {host}"
                ),
            ));
        }
        if envelope
            .reverse_path
            .is_some_and(|a| has_control(a.as_str()))
        {
            return Err(self.permanent(
                Stage::Policy,
                Enhanced(5, 1, 7),
                "the sender address contains control characters".to_owned(),
            ));
        }

        let mut mail = format!(
            "MAIL FROM:<{}>",
            envelope.reverse_path.map_or("", |a| a.as_str())
        );
        if caps.has(EXT_SIZE) {
            mail.push_str(&format!(" SIZE={size}"));
        }
        if caps.eight_bit_mime() && (eight_bit || envelope.body_type != BodyType::SevenBit) {
            mail.push_str(" BODY=8BITMIME");
        }
        if needs_utf8 {
            mail.push_str(" SMTPUTF8");
        }
        if caps.dsn() {
            if let Some(ret) = envelope.ret {
                mail.push_str(match ret {
                    Ret::Full => " RET=FULL",
                    Ret::Hdrs => " RET=HDRS",
                });
            }
            if let Some(env_id) = envelope.env_id {
                mail.push_str(" ENVID=");
                mail.push_str(&xtext(env_id));
            }
        }
        mail.push_str("\r\n");

        let mut outcomes = Vec::with_capacity(envelope.recipients.len());
        let mut unsent = VecDeque::with_capacity(envelope.recipients.len() + 2);
        unsent.push_back((Command::Mail, mail.into_bytes()));
        for (i, rcpt) in envelope.recipients.iter().enumerate() {
            if has_control(rcpt.address.as_str()) {
                outcomes.push(Some(RecipientOutcome::Failed(Reply::new(
                    501,
                    Enhanced(5, 1, 3),
                    "Recipient address contains control characters; not sent",
                ))));
                continue;
            }
            outcomes.push(None);
            unsent.push_back((Command::Rcpt(i), rcpt_line(rcpt, caps.dsn())));
        }
        if unsent.len() == 1 {
            self.ready = Some(Event::Sent(outcomes.into_iter().flatten().collect()));
            return Ok(());
        }
        unsent.push_back((Command::Data, b"DATA\r\n".to_vec()));

        let mut tx = Box::new(Transaction {
            awaiting: VecDeque::with_capacity(unsent.len()),
            unsent,
            outcomes,
            accepted: Vec::new(),
            mail_refused: None,
        });
        if caps.pipelining() {
            // RFC 2920 §3.1: MAIL, the RCPTs and DATA go as one group.
            while let Some((command, line)) = tx.unsent.pop_front() {
                self.output.extend_from_slice(&line);
                tx.awaiting.push_back(command);
            }
        } else {
            self.write_next(&mut tx);
        }
        self.transactions += 1;
        self.state = State::Transaction(tx);
        Ok(())
    }

    /// Sends RSET, for the next transaction on this connection.
    pub fn reset(&mut self) -> Result<(), DeliveryError> {
        if !self.is_usable() {
            return Err(self.temporary(
                Stage::Reset,
                Enhanced(4, 4, 2),
                format!(
                    "the connection to {} is not usable",
                    self.config.server_name
                ),
            ));
        }
        self.output.extend_from_slice(b"RSET\r\n");
        self.state = State::Rset(None);
        Ok(())
    }

    /// Sends QUIT when the server can still read it; returns whether a
    /// reply is worth waiting for.
    pub fn quit(&mut self) -> bool {
        if self.can_quit() {
            self.output.extend_from_slice(b"QUIT\r\n");
            self.state = State::Quit;
            true
        } else {
            self.state = State::Closed;
            false
        }
    }

    // -- replies ------------------------------------------------------------

    fn on_reply(&mut self, reply: Reply) -> Option<Event> {
        let state = std::mem::replace(&mut self.state, State::Closed);
        let host = self.config.server_name.clone();
        // 421 is the server closing the connection, whatever it was asked
        // (RFC 5321 §3.8).
        if reply.code == 421 && !matches!(state, State::Quit) {
            let stage = stage_of(&state);
            return Some(Event::Failed(DeliveryError::from_reply(
                stage,
                &host,
                reply,
                format!("{host} is closing the connection"),
            )));
        }
        match state {
            State::Greeting => match class(&reply) {
                2 => {
                    self.ehlo();
                    None
                }
                4 | 5 => Some(self.refused(Stage::Greeting, reply, "greeting")),
                _ => Some(self.unexpected(Stage::Greeting, &reply)),
            },
            State::Ehlo => match class(&reply) {
                2 => {
                    self.capabilities = Capabilities::from_ehlo(&reply);
                    self.after_ehlo()
                }
                // RFC 5321 §3.2: a server that does not know EHLO says so
                // with one of these; HELO may still work.
                5 if matches!(reply.code, 500 | 501 | 502 | 504 | 550) => {
                    let line = format!("HELO {}\r\n", self.config.helo_name);
                    self.output.extend_from_slice(line.as_bytes());
                    self.state = State::Helo;
                    None
                }
                4 | 5 => Some(self.refused(Stage::Ehlo, reply, "EHLO")),
                _ => Some(self.unexpected(Stage::Ehlo, &reply)),
            },
            State::Helo => match class(&reply) {
                2 => {
                    self.capabilities = Capabilities::default();
                    self.after_ehlo()
                }
                4 | 5 => Some(self.refused(Stage::Ehlo, reply, "HELO")),
                _ => Some(self.unexpected(Stage::Ehlo, &reply)),
            },
            State::StartTls => match class(&reply) {
                2 => {
                    self.state = State::TlsPending;
                    Some(Event::StartTls)
                }
                4 | 5 if self.tls_required() => {
                    self.state = State::Broken;
                    let mut error = DeliveryError::from_reply(
                        Stage::StartTls,
                        &host,
                        reply,
                        format!("{host} refused STARTTLS, which is required"),
                    );
                    // Retrying may find the server willing again.
                    error.kind = ErrorKind::Temporary;
                    Some(Event::Failed(error))
                }
                // Opportunistic: go on in plaintext.
                4 | 5 => self.start_auth(),
                _ => Some(self.unexpected(Stage::StartTls, &reply)),
            },
            State::Auth(step) => self.on_auth_reply(step, reply),
            State::Transaction(tx) => self.on_transaction_reply(tx, reply),
            State::DataDone(tx) => {
                let mut tx = tx;
                let outcome = match class(&reply) {
                    2 => RecipientOutcome::Delivered,
                    4 => RecipientOutcome::Deferred,
                    5 => RecipientOutcome::Failed,
                    _ => return Some(self.unexpected(Stage::Data, &reply)),
                };
                for &i in &tx.accepted {
                    tx.outcomes[i] = Some(outcome(reply.clone()));
                }
                self.state = State::Idle;
                Some(Event::Sent(tx.into_outcomes()))
            }
            State::Rset(then) => match (class(&reply), then) {
                (2, Some(outcomes)) => {
                    self.state = State::Idle;
                    Some(Event::Sent(outcomes))
                }
                (2, None) => {
                    self.state = State::Idle;
                    Some(Event::Reset)
                }
                (4 | 5, Some(outcomes)) => {
                    self.state = State::Broken;
                    Some(Event::Sent(outcomes))
                }
                (4 | 5, None) => Some(self.refused(Stage::Reset, reply, "RSET")),
                _ => Some(self.unexpected(Stage::Reset, &reply)),
            },
            State::Quit => Some(Event::Closed),
            State::Idle | State::Broken => {
                let error = self.temporary(
                    Stage::Io,
                    Enhanced(4, 5, 0),
                    format!("{host} sent a reply nobody asked for: {}", one_line(&reply)),
                );
                Some(Event::Failed(error))
            }
            State::TlsPending | State::DataPending(_) | State::Closed => None,
        }
    }

    fn ehlo(&mut self) {
        let line = format!("EHLO {}\r\n", self.config.helo_name);
        self.output.extend_from_slice(line.as_bytes());
        self.state = State::Ehlo;
    }

    fn tls_required(&self) -> bool {
        matches!(self.config.tls, TlsPolicy::Required | TlsPolicy::Verify)
    }

    fn after_ehlo(&mut self) -> Option<Event> {
        if !self.tls && self.config.tls != TlsPolicy::None {
            if self.capabilities.starttls() {
                self.output.extend_from_slice(b"STARTTLS\r\n");
                self.state = State::StartTls;
                return None;
            }
            if self.tls_required() {
                let host = &self.config.server_name;
                let error = self.temporary(
                    Stage::StartTls,
                    Enhanced(4, 7, 4),
                    format!("STARTTLS required but not offered by {host}"),
                );
                self.state = State::Broken;
                return Some(Event::Failed(error));
            }
        }
        self.start_auth()
    }

    fn start_auth(&mut self) -> Option<Event> {
        let Some((username, password)) = &self.config.credentials else {
            self.state = State::Idle;
            return Some(Event::Ready);
        };
        let host = &self.config.server_name;
        // Credentials travel in the clear only when the operator turned TLS
        // off for this destination; under the other policies a missing or
        // refused STARTTLS must not leak the password.
        let refusal = if !self.tls && self.config.tls != TlsPolicy::None {
            Some(format!(
                "not sending credentials to {host} without TLS \
                 (STARTTLS was not offered or was refused)"
            ))
        } else if !self.capabilities.has(EXT_AUTH) {
            // Temporary, not permanent: a relay that does not offer AUTH is
            // usually a configuration matter (wrong port, AUTH only after
            // STARTTLS) that an operator can fix before the mail expires.
            Some(format!(
                "{host} does not offer AUTH, but credentials are configured for it"
            ))
        } else if !self.capabilities.auth_plain() && !self.capabilities.auth_login() {
            Some(format!(
                "{host} offers no AUTH mechanism we support (PLAIN, LOGIN)"
            ))
        } else {
            None
        };
        if let Some(message) = refusal {
            let error = self.temporary(Stage::Auth, Enhanced(4, 7, 0), message);
            self.state = State::Broken;
            return Some(Event::Failed(error));
        }
        if self.capabilities.auth_plain() {
            let response = plain_response(username, password);
            self.output.extend_from_slice(b"AUTH PLAIN ");
            self.output.extend_from_slice(response.as_bytes());
            self.output.extend_from_slice(b"\r\n");
            self.state = State::Auth(AuthStep::Plain { resent: false });
        } else {
            self.output.extend_from_slice(b"AUTH LOGIN\r\n");
            self.state = State::Auth(AuthStep::LoginUser);
        }
        None
    }

    fn on_auth_reply(&mut self, step: AuthStep, reply: Reply) -> Option<Event> {
        match class(&reply) {
            2 => {
                self.authenticated = true;
                self.state = State::Idle;
                return Some(Event::Ready);
            }
            4 | 5 => return Some(self.refused(Stage::Auth, reply, "AUTH")),
            3 => {}
            _ => return Some(self.unexpected(Stage::Auth, &reply)),
        }
        let Some((username, password)) = &self.config.credentials else {
            return Some(self.unexpected(Stage::Auth, &reply));
        };
        let (response, next) = match step {
            // RFC 4954 §4: an empty challenge asks for the initial response.
            AuthStep::Plain { resent: false } => (
                plain_response(username, password),
                AuthStep::Plain { resent: true },
            ),
            AuthStep::LoginUser => (BASE64.encode(username), AuthStep::LoginPassword),
            AuthStep::LoginPassword => (BASE64.encode(password), AuthStep::LoginDone),
            AuthStep::Plain { resent: true } | AuthStep::LoginDone => {
                return Some(self.unexpected(Stage::Auth, &reply));
            }
        };
        self.output.extend_from_slice(response.as_bytes());
        self.output.extend_from_slice(b"\r\n");
        self.state = State::Auth(next);
        None
    }

    fn on_transaction_reply(&mut self, mut tx: Box<Transaction>, reply: Reply) -> Option<Event> {
        let host = self.config.server_name.clone();
        let Some(command) = tx.awaiting.pop_front() else {
            return Some(self.unexpected(Stage::Mail, &reply));
        };
        match command {
            Command::Mail => match class(&reply) {
                2 => {}
                4 | 5 => tx.mail_refused = Some(reply),
                _ => return Some(self.unexpected(Stage::Mail, &reply)),
            },
            // After a refused MAIL the RCPT replies are only `503`s.
            Command::Rcpt(_) if tx.mail_refused.is_some() => {}
            Command::Rcpt(i) => match class(&reply) {
                2 => tx.accepted.push(i),
                4 | 5 => tx.outcomes[i] = Some(RecipientOutcome::refused(reply)),
                _ => return Some(self.unexpected(Stage::Rcpt, &reply)),
            },
            Command::Data => {
                if reply.code == 354 {
                    if let Some(refused) = tx.mail_refused {
                        // RFC 2920 §3.1 says DATA must fail when MAIL or
                        // every RCPT did; a server that says 354 anyway
                        // would take whatever follows as a message. Drop
                        // the connection rather than send even the dot.
                        return Some(Event::Failed(DeliveryError::from_reply(
                            Stage::Mail,
                            &host,
                            refused,
                            format!("{host} refused MAIL FROM"),
                        )));
                    }
                    if tx.accepted.is_empty() {
                        return Some(Event::Sent(tx.into_outcomes()));
                    }
                    self.state = State::DataPending(tx);
                    return Some(Event::SendData);
                }
                if let Some(refused) = tx.mail_refused {
                    self.state = State::Idle;
                    return Some(Event::Failed(DeliveryError::from_reply(
                        Stage::Mail,
                        &host,
                        refused,
                        format!("{host} refused MAIL FROM"),
                    )));
                }
                if !matches!(class(&reply), 4 | 5) {
                    return Some(self.unexpected(Stage::Data, &reply));
                }
                // Recipients accepted at RCPT share DATA's verdict.
                for &i in &tx.accepted {
                    tx.outcomes[i] = Some(RecipientOutcome::refused(reply.clone()));
                }
                return self.finish_with_rset(tx.into_outcomes());
            }
        }
        if tx.awaiting.is_empty() {
            if let Some(refused) = tx.mail_refused {
                self.state = State::Idle;
                return Some(Event::Failed(DeliveryError::from_reply(
                    Stage::Mail,
                    &host,
                    refused,
                    format!("{host} refused MAIL FROM"),
                )));
            }
            if matches!(tx.unsent.front(), Some((Command::Data, _))) && tx.accepted.is_empty() {
                return self.finish_with_rset(tx.into_outcomes());
            }
            if !self.write_next(&mut tx) {
                // Unreachable: DATA is always the last command and its
                // reply returns above. Give up the connection rather than
                // guess.
                let error = self.temporary(
                    Stage::Data,
                    Enhanced(4, 3, 0),
                    format!("SMTP client with {host} out of step: nothing left to send"),
                );
                return Some(self.fail_closed(error));
            }
        }
        self.state = State::Transaction(tx);
        None
    }

    /// Writes the next unsent command; false when there is none.
    fn write_next(&mut self, tx: &mut Transaction) -> bool {
        match tx.unsent.pop_front() {
            Some((command, line)) => {
                self.output.extend_from_slice(&line);
                tx.awaiting.push_back(command);
                true
            }
            None => false,
        }
    }

    /// Ends a transaction that did not reach the data: the server still
    /// holds it open, so RSET before reporting.
    fn finish_with_rset(&mut self, outcomes: Vec<RecipientOutcome>) -> Option<Event> {
        self.output.extend_from_slice(b"RSET\r\n");
        self.state = State::Rset(Some(outcomes));
        None
    }

    // -- failures -----------------------------------------------------------

    fn temporary(&self, stage: Stage, enhanced: Enhanced, message: String) -> DeliveryError {
        DeliveryError::new(
            ErrorKind::Temporary,
            stage,
            &self.config.server_name,
            enhanced,
            message,
        )
    }

    fn permanent(&self, stage: Stage, enhanced: Enhanced, message: String) -> DeliveryError {
        DeliveryError::new(
            ErrorKind::Permanent,
            stage,
            &self.config.server_name,
            enhanced,
            message,
        )
    }

    /// The server said no to a step of the session set-up; it is still in
    /// step and may read a QUIT.
    fn refused(&mut self, stage: Stage, reply: Reply, what: &str) -> Event {
        self.state = State::Broken;
        let host = &self.config.server_name;
        let message = if what == "greeting" {
            format!("{host} refused the connection in its greeting")
        } else {
            format!("{host} refused {what}")
        };
        Event::Failed(DeliveryError::from_reply(stage, host, reply, message))
    }

    /// A reply that makes no sense where it came: the conversation is out
    /// of step, so the connection is given up.
    fn unexpected(&mut self, stage: Stage, reply: &Reply) -> Event {
        let host = &self.config.server_name;
        let error = self.temporary(
            stage,
            Enhanced(4, 5, 0),
            format!("unexpected reply from {host}: {}", one_line(reply)),
        );
        self.fail_closed(error)
    }

    fn fail_closed(&mut self, error: DeliveryError) -> Event {
        self.state = State::Closed;
        Event::Failed(error)
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.config)
            .field("waiting", &self.waiting())
            .field("usable", &self.is_usable())
            .field("tls", &self.tls)
            .field("transactions", &self.transactions)
            .finish_non_exhaustive()
    }
}

fn stage_of(state: &State) -> Stage {
    match state {
        State::Greeting => Stage::Greeting,
        State::Ehlo | State::Helo => Stage::Ehlo,
        State::StartTls | State::TlsPending => Stage::StartTls,
        State::Auth(_) => Stage::Auth,
        State::Transaction(tx) => match tx.awaiting.front() {
            Some(Command::Rcpt(_)) => Stage::Rcpt,
            Some(Command::Data) => Stage::Data,
            Some(Command::Mail) | None => Stage::Mail,
        },
        State::DataPending(_) | State::DataDone(_) => Stage::Data,
        State::Rset(_) => Stage::Reset,
        State::Quit => Stage::Quit,
        State::Idle | State::Broken | State::Closed => Stage::Io,
    }
}

/// The first digit of the reply code.
fn class(reply: &Reply) -> u16 {
    reply.code / 100
}

/// RFC 4616: `authzid NUL authcid NUL passwd`, with an empty authzid.
fn plain_response(username: &str, password: &str) -> String {
    let mut raw = Vec::with_capacity(username.len() + password.len() + 2);
    raw.push(0);
    raw.extend_from_slice(username.as_bytes());
    raw.push(0);
    raw.extend_from_slice(password.as_bytes());
    BASE64.encode(raw)
}

/// Control characters in an address would end the command line early
/// and let the rest be read as another command.
fn has_control(text: &str) -> bool {
    text.chars().any(char::is_control)
}

fn rcpt_line(rcpt: &Recipient, dsn: bool) -> Vec<u8> {
    let mut line = format!("RCPT TO:<{}>", rcpt.address);
    if dsn {
        let notify = rcpt.notify;
        if notify.contains(Notify::NEVER) {
            line.push_str(" NOTIFY=NEVER");
        } else if !notify.is_empty() {
            let names: Vec<&str> = [
                (Notify::SUCCESS, "SUCCESS"),
                (Notify::FAILURE, "FAILURE"),
                (Notify::DELAY, "DELAY"),
            ]
            .into_iter()
            .filter(|(bit, _)| notify.contains(*bit))
            .map(|(_, name)| name)
            .collect();
            if !names.is_empty() {
                line.push_str(" NOTIFY=");
                line.push_str(&names.join(","));
            }
        }
        if let Some(orcpt) = &rcpt.orcpt {
            // Kept decoded as `type;address`. A non-ASCII original address
            // would need RFC 6533's utf-8-addr-xtext; it is left out.
            let (kind, address) = orcpt.split_once(';').unwrap_or(("rfc822", orcpt));
            if !kind.is_empty()
                && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !address.is_empty()
                && address.is_ascii()
            {
                line.push_str(&format!(" ORCPT={kind};{}", xtext(address)));
            }
        }
    }
    line.push_str("\r\n");
    line.into_bytes()
}

/// RFC 3461 §4: xtext, `+HH` for anything outside `!`..`~` and for `+`/`=`.
fn xtext(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyError {
    Invalid,
    TooLong,
}

/// Frames replies out of server bytes: lines `ddd-text` ... `ddd text`,
/// every line with the same code, all of it within [`MAX_REPLY_SIZE`].
#[derive(Default)]
struct ReplyReader {
    /// The reply so far, raw.
    buf: Vec<u8>,
    /// Where the current (unfinished) line starts in `buf`.
    line_start: usize,
    code: Option<u16>,
}

impl ReplyReader {
    /// Consumes bytes up to the end of one reply; returns how many and the
    /// reply once complete.
    fn feed(&mut self, input: &[u8]) -> (usize, Option<Result<Reply, ReplyError>>) {
        let mut pos = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            let (take, line_done) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (rest.len(), false),
            };
            if self.buf.len() + take > MAX_REPLY_SIZE {
                self.reset();
                return (pos + take, Some(Err(ReplyError::TooLong)));
            }
            self.buf.extend_from_slice(&rest[..take]);
            pos += take;
            let line = trim_eol(&self.buf[self.line_start..]);
            if !line_done {
                // Refuse garbage now rather than wait for a line end that
                // may never come.
                if !plausible_head(line) {
                    self.reset();
                    return (pos, Some(Err(ReplyError::Invalid)));
                }
                break;
            }
            let head = parse_head(line);
            let Some((code, last)) =
                head.filter(|(code, _)| *self.code.get_or_insert(*code) == *code)
            else {
                self.reset();
                return (pos, Some(Err(ReplyError::Invalid)));
            };
            self.line_start = self.buf.len();
            if last {
                let reply = build_reply(code, &self.buf);
                self.reset();
                return (pos, Some(Ok(reply)));
            }
        }
        (pos, None)
    }

    fn reset(&mut self) {
        self.buf.clear();
        if self.buf.capacity() > 4096 {
            self.buf.shrink_to(1024);
        }
        self.line_start = 0;
        self.code = None;
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `ddd` followed by end of line, space or hyphen; the code 200 to 599.
fn parse_head(line: &[u8]) -> Option<(u16, bool)> {
    let [a, b, c, rest @ ..] = line else {
        return None;
    };
    if !(b'2'..=b'5').contains(a) || !b.is_ascii_digit() || !c.is_ascii_digit() {
        return None;
    }
    let code = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
    match rest.first() {
        None | Some(b' ') => Some((code, true)),
        Some(b'-') => Some((code, false)),
        Some(_) => None,
    }
}

/// Whether an unfinished line can still become a reply line.
fn plausible_head(partial: &[u8]) -> bool {
    partial.iter().take(4).enumerate().all(|(i, &b)| match i {
        0 => (b'2'..=b'5').contains(&b),
        1 | 2 => b.is_ascii_digit(),
        _ => matches!(b, b' ' | b'-' | b'\r'),
    })
}

fn build_reply(code: u16, raw: &[u8]) -> Reply {
    let lines: Vec<&[u8]> = raw
        .split_inclusive(|&b| b == b'\n')
        .map(|l| trim_eol(l).get(4..).unwrap_or_default())
        .collect();
    // RFC 3463 / RFC 2034: the enhanced code starts each line's text; its
    // class must match the reply's.
    let enhanced = lines
        .first()
        .and_then(|first| parse_enhanced(first))
        .filter(|(e, _)| u16::from(e.0) == code / 100);
    let mut text = String::new();
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            text.push('\n');
        }
        let line = match enhanced {
            Some((_, prefix))
                if line.starts_with(&lines[0][..prefix])
                    && matches!(line.get(prefix), None | Some(b' ')) =>
            {
                line[prefix..].trim_ascii_start()
            }
            _ => line,
        };
        text.push_str(&String::from_utf8_lossy(line));
    }
    Reply {
        code,
        enhanced: enhanced.map(|(e, _)| e),
        text: Cow::Owned(text),
    }
}

/// `c.sss.ddd` at the start of a line's text, and its length.
fn parse_enhanced(text: &[u8]) -> Option<(Enhanced, usize)> {
    let mut parts = [0u16; 3];
    let mut pos = 0;
    for (i, part) in parts.iter_mut().enumerate() {
        let digits = text[pos..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let max = if i == 0 { 1 } else { 3 };
        if digits == 0 || digits > max {
            return None;
        }
        for &d in &text[pos..pos + digits] {
            *part = *part * 10 + u16::from(d - b'0');
        }
        pos += digits;
        if i < 2 {
            if text.get(pos) != Some(&b'.') {
                return None;
            }
            pos += 1;
        }
    }
    if !matches!(text.get(pos), None | Some(b' ')) {
        return None;
    }
    let class = u8::try_from(parts[0]).ok()?;
    Some((Enhanced(class, parts[1], parts[2]), pos))
}

// ---------------------------------------------------------------------------
// The content
// ---------------------------------------------------------------------------

/// Turns message content into DATA's wire form, block by block: CRLF line
/// ends, a dot doubled at the start of a line (RFC 5321 §4.5.2), and the
/// final `CRLF . CRLF`.
///
/// A bare LF or bare CR becomes CRLF. RFC 5321 §2.3.8 forbids sending them,
/// and passing them on is how "SMTP smuggling" works: a receiver that takes
/// `LF . LF` as the end of data would read what follows as new commands.
#[derive(Debug, Clone)]
pub struct DataEncoder {
    line_start: bool,
    /// The previous block ended in CR; whether it is CRLF depends on the
    /// next byte.
    pending_cr: bool,
}

impl Default for DataEncoder {
    fn default() -> Self {
        DataEncoder::new()
    }
}

impl DataEncoder {
    pub fn new() -> Self {
        DataEncoder {
            line_start: true,
            pending_cr: false,
        }
    }

    /// Appends the wire form of the next block of content to `out`.
    pub fn encode(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + input.len() / 64 + 8);
        while !input.is_empty() {
            if self.pending_cr {
                self.pending_cr = false;
                out.extend_from_slice(b"\r\n");
                self.line_start = true;
                if input[0] == b'\n' {
                    input = &input[1..];
                    continue;
                }
            }
            if self.line_start && input[0] == b'.' {
                out.push(b'.');
            }
            let end = input
                .iter()
                .position(|&b| b == b'\r' || b == b'\n')
                .unwrap_or(input.len());
            if end > 0 {
                out.extend_from_slice(&input[..end]);
                self.line_start = false;
            }
            match input.get(end) {
                Some(b'\n') => {
                    out.extend_from_slice(b"\r\n");
                    self.line_start = true;
                }
                Some(_) => self.pending_cr = true,
                None => {}
            }
            input = input.get(end + 1..).unwrap_or_default();
        }
    }

    /// Ends the data: a CRLF when the content did not end with one, then
    /// `.` CRLF.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.pending_cr || !self.line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        *self = DataEncoder::new();
    }

    /// The whole content in wire form, for small messages and tests.
    pub fn encode_all(content: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(content.len() + 16);
        let mut encoder = DataEncoder::new();
        encoder.encode(content, &mut out);
        encoder.finish(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "mx.test";

    fn config(tls: TlsPolicy, credentials: Option<(&str, &str)>) -> ClientConfig {
        ClientConfig {
            helo_name: "client.test".into(),
            server_name: HOST.into(),
            tls,
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
        }
    }

    fn addr(s: &str) -> Address {
        Address::parse(s).unwrap()
    }

    fn rcpt(s: &str) -> Recipient {
        Recipient {
            address: addr(s),
            orcpt: None,
            notify: Notify::empty(),
        }
    }

    /// A client plus the transcript helpers: `s()` feeds server bytes and
    /// returns the event, `c()` takes what the client wrote.
    struct T {
        client: Client,
    }

    impl T {
        fn new(config: ClientConfig) -> Self {
            T {
                client: Client::new(config),
            }
        }

        fn s(&mut self, bytes: &str) -> Option<Event> {
            self.s_bytes(bytes.as_bytes())
        }

        fn s_bytes(&mut self, bytes: &[u8]) -> Option<Event> {
            let (used, event) = self.client.feed(bytes);
            if event.is_none() {
                assert_eq!(used, bytes.len(), "input left unread without an event");
            }
            event
        }

        fn c(&mut self) -> String {
            let out = String::from_utf8(self.client.output().to_vec()).unwrap();
            self.client.clear_output();
            out
        }

        /// Greeting and EHLO with these extension lines, up to Ready.
        fn ready(config: ClientConfig, extensions: &[&str]) -> Self {
            let mut t = T::new(config);
            assert!(t.s("220 mx.test ESMTP\r\n").is_none());
            assert_eq!(t.c(), "EHLO client.test\r\n");
            let event = t.s(&ehlo(extensions));
            assert!(matches!(event, Some(Event::Ready)), "{event:?}");
            t
        }
    }

    fn ehlo(extensions: &[&str]) -> String {
        let mut lines = vec!["mx.test Hello".to_owned()];
        lines.extend(extensions.iter().map(|e| e.to_string()));
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.push_str(&format!("250{sep}{line}\r\n"));
        }
        out
    }

    fn failed(event: Option<Event>) -> DeliveryError {
        match event {
            Some(Event::Failed(err)) => err,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    fn sent(event: Option<Event>) -> Vec<RecipientOutcome> {
        match event {
            Some(Event::Sent(outcomes)) => outcomes,
            other => panic!("expected outcomes, got {other:?}"),
        }
    }

    fn codes(outcomes: &[RecipientOutcome]) -> Vec<(char, u16)> {
        outcomes
            .iter()
            .map(|o| match o {
                RecipientOutcome::Delivered(r) => ('D', r.code),
                RecipientOutcome::Deferred(r) => ('T', r.code),
                RecipientOutcome::Failed(r) => ('F', r.code),
            })
            .collect()
    }

    fn envelope<'a>(from: Option<&'a Address>, to: &'a [Recipient]) -> OutboundEnvelope<'a> {
        OutboundEnvelope {
            reverse_path: from,
            recipients: to,
            env_id: None,
            ret: None,
            body_type: BodyType::SevenBit,
            smtputf8: false,
        }
    }

    #[test]
    fn greeting_ehlo_ready() {
        let t = T::ready(
            config(TlsPolicy::None, None),
            &["PIPELINING", "SIZE 1000", "8BITMIME", "AUTH PLAIN LOGIN"],
        );
        let caps = t.client.capabilities();
        assert!(caps.is_esmtp() && caps.pipelining() && caps.eight_bit_mime());
        assert!(caps.auth_plain() && caps.auth_login() && !caps.starttls());
        assert_eq!(caps.size_limit(), Some(1000));
        assert!(t.client.is_usable());
    }

    #[test]
    fn refused_greeting() {
        let mut t = T::new(config(TlsPolicy::None, None));
        let err = failed(t.s("450 4.3.2 Too busy\r\n"));
        assert!(!err.is_permanent());
        assert_eq!(err.stage(), Stage::Greeting);
        assert_eq!(err.reply().unwrap().code, 450);
        assert!(t.client.can_quit());
        assert!(t.client.quit());
        assert_eq!(t.c(), "QUIT\r\n");

        let mut t = T::new(config(TlsPolicy::None, None));
        let err = failed(t.s("554 No SMTP service here\r\n"));
        assert!(err.is_permanent());
        assert_eq!(err.enhanced(), Enhanced(5, 0, 0));
        assert_eq!(
            err.to_string(),
            "mx.test refused the connection in its greeting: 554 No SMTP service here"
        );

        // 421 means the server is gone: no QUIT.
        let mut t = T::new(config(TlsPolicy::None, None));
        let err = failed(t.s("421 4.3.2 Shutting down\r\n"));
        assert!(!err.is_permanent());
        assert!(!t.client.can_quit());
    }

    #[test]
    fn helo_fallback() {
        let mut t = T::new(config(TlsPolicy::Opportunistic, None));
        t.s("220 old.test\r\n");
        assert_eq!(t.c(), "EHLO client.test\r\n");
        assert!(t.s("502 Command not implemented\r\n").is_none());
        assert_eq!(t.c(), "HELO client.test\r\n");
        assert!(matches!(t.s("250 old.test\r\n"), Some(Event::Ready)));
        assert!(!t.client.capabilities().is_esmtp());

        let to = [rcpt("b@old.test")];
        t.client.send(&envelope(None, &to), b"x\r\n").unwrap();
        assert_eq!(t.c(), "MAIL FROM:<>\r\n", "no ESMTP parameters after HELO");
        assert!(t.s("250 ok\r\n").is_none());
        assert_eq!(t.c(), "RCPT TO:<b@old.test>\r\n");
        assert!(t.s("250 ok\r\n").is_none());
        assert_eq!(t.c(), "DATA\r\n");
        assert!(matches!(t.s("354 go\r\n"), Some(Event::SendData)));
        t.client.data_sent();
        assert_eq!(codes(&sent(t.s("250 done\r\n"))), [('D', 250)]);
    }

    #[test]
    fn starttls_then_auth_plain() {
        let mut t = T::new(config(TlsPolicy::Opportunistic, Some(("app", "s3cret"))));
        t.s("220 mx.test\r\n");
        t.c();
        assert!(t.s(&ehlo(&["STARTTLS", "PIPELINING"])).is_none());
        assert_eq!(t.c(), "STARTTLS\r\n");
        // Bytes after the 220 are left for the driver to throw away.
        let (used, event) = t.client.feed(b"220 Go ahead\r\n250 injected\r\n");
        assert_eq!(used, "220 Go ahead\r\n".len());
        assert!(matches!(event, Some(Event::StartTls)));
        assert_eq!(t.client.waiting(), None);
        t.client.tls_started();
        assert!(t.client.is_tls());
        assert_eq!(t.c(), "EHLO client.test\r\n");
        assert!(t.s(&ehlo(&["AUTH PLAIN LOGIN"])).is_none());
        assert_eq!(t.c(), "AUTH PLAIN AGFwcABzM2NyZXQ=\r\n");
        assert!(matches!(
            t.s("235 2.7.0 Authentication successful\r\n"),
            Some(Event::Ready)
        ));
        assert!(t.client.is_authenticated());
    }

    #[test]
    fn auth_login_and_failure() {
        let mut t = T::new(config(TlsPolicy::None, Some(("app", "s3cret"))));
        t.s("220 mx.test\r\n");
        t.c();
        assert!(t.s(&ehlo(&["AUTH LOGIN"])).is_none());
        assert_eq!(t.c(), "AUTH LOGIN\r\n");
        assert!(t.s("334 VXNlcm5hbWU6\r\n").is_none());
        assert_eq!(t.c(), "YXBw\r\n");
        assert!(t.s("334 UGFzc3dvcmQ6\r\n").is_none());
        assert_eq!(t.c(), "czNjcmV0\r\n");
        let err = failed(t.s("535 5.7.8 Authentication credentials invalid\r\n"));
        assert!(err.is_permanent());
        assert_eq!(err.stage(), Stage::Auth);
        assert_eq!(err.enhanced(), Enhanced(5, 7, 8));
        assert!(!err.to_string().contains("s3cret"));
        assert!(!format!("{:?}", t.client).contains("s3cret"));
        assert!(t.client.can_quit() && !t.client.is_usable());
    }

    #[test]
    fn auth_needs_tls_and_an_offer() {
        // Opportunistic, no STARTTLS offered: the password stays home.
        let mut t = T::new(config(TlsPolicy::Opportunistic, Some(("app", "pw"))));
        t.s("220 mx.test\r\n");
        t.c();
        let err = failed(t.s(&ehlo(&["AUTH PLAIN"])));
        assert!(!err.is_permanent());
        assert!(err.to_string().contains("without TLS"), "{err}");
        assert_eq!(t.c(), "");

        // No AUTH at all: temporary 4.7.0.
        let mut t = T::new(config(TlsPolicy::None, Some(("app", "pw"))));
        t.s("220 mx.test\r\n");
        t.c();
        let err = failed(t.s(&ehlo(&["PIPELINING"])));
        assert!(!err.is_permanent());
        assert_eq!(err.enhanced(), Enhanced(4, 7, 0));
        assert_eq!(err.stage(), Stage::Auth);
        assert!(
            err.to_string().contains("mx.test does not offer AUTH"),
            "{err}"
        );
    }

    #[test]
    fn tls_required_but_not_offered() {
        for policy in [TlsPolicy::Required, TlsPolicy::Verify] {
            let mut t = T::new(config(policy, None));
            t.s("220 mx.test\r\n");
            t.c();
            let err = failed(t.s(&ehlo(&["PIPELINING"])));
            assert!(!err.is_permanent());
            assert_eq!(err.stage(), Stage::StartTls);
            assert_eq!(
                err.to_string(),
                "4.7.4 STARTTLS required but not offered by mx.test"
            );
        }
        // Refused STARTTLS: required fails, opportunistic goes on.
        let mut t = T::new(config(TlsPolicy::Required, None));
        t.s("220 mx.test\r\n");
        t.c();
        t.s(&ehlo(&["STARTTLS"]));
        assert_eq!(t.c(), "STARTTLS\r\n");
        let err = failed(t.s("554 5.7.0 No TLS for you\r\n"));
        assert!(!err.is_permanent());
        let mut t = T::new(config(TlsPolicy::Opportunistic, None));
        t.s("220 mx.test\r\n");
        t.c();
        t.s(&ehlo(&["STARTTLS"]));
        t.c();
        assert!(matches!(
            t.s("454 4.7.0 TLS not available\r\n"),
            Some(Event::Ready)
        ));
        assert!(!t.client.is_tls());
    }

    #[test]
    fn pipelined_transaction() {
        let mut t = T::ready(
            config(TlsPolicy::None, None),
            &["PIPELINING", "SIZE", "8BITMIME", "DSN"],
        );
        let from = addr("a@sender.test");
        let to = [rcpt("b@mx.test"), rcpt("c@mx.test"), rcpt("d@mx.test")];
        t.client
            .send(&envelope(Some(&from), &to), b"Subject: x\r\n\r\nhi\r\n")
            .unwrap();
        assert_eq!(
            t.c(),
            "MAIL FROM:<a@sender.test> SIZE=18\r\nRCPT TO:<b@mx.test>\r\n\
             RCPT TO:<c@mx.test>\r\nRCPT TO:<d@mx.test>\r\nDATA\r\n"
        );
        assert_eq!(t.client.waiting(), Some(Waiting::Mail));
        let event = t.s(concat!(
            "250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 No such user\r\n",
            "452 4.5.3 Too many recipients\r\n354 go\r\n"
        ));
        assert!(matches!(event, Some(Event::SendData)));
        assert_eq!(t.c(), "");
        t.client.data_sent();
        assert_eq!(t.client.waiting(), Some(Waiting::DataDone));
        let outcomes = sent(t.s("250 2.0.0 queued\r\n"));
        assert_eq!(codes(&outcomes), [('D', 250), ('F', 550), ('T', 452)]);
        assert_eq!(outcomes[1].reply().enhanced, Some(Enhanced(5, 1, 1)));
        assert_eq!(outcomes[1].reply().text, "No such user");
        assert!(t.client.is_usable());
        assert_eq!(t.client.transactions(), 1);

        t.client.reset().unwrap();
        assert_eq!(t.c(), "RSET\r\n");
        assert!(matches!(t.s("250 ok\r\n"), Some(Event::Reset)));
        assert!(t.client.quit());
        assert_eq!(t.c(), "QUIT\r\n");
        assert!(matches!(t.s("221 bye\r\n"), Some(Event::Closed)));
    }

    #[test]
    fn pipelined_no_recipient_accepted_resets() {
        let mut t = T::ready(config(TlsPolicy::None, None), &["PIPELINING"]);
        let to = [rcpt("b@mx.test"), rcpt("c@mx.test")];
        t.client.send(&envelope(None, &to), b"x\r\n").unwrap();
        t.c();
        let event = t.s(concat!(
            "250 ok\r\n550 5.1.1 no\r\n450 4.2.1 later\r\n",
            "554 5.5.1 No valid recipients\r\n"
        ));
        assert!(event.is_none());
        assert_eq!(t.c(), "RSET\r\n");
        let outcomes = sent(t.s("250 2.0.0 Reset\r\n"));
        assert_eq!(codes(&outcomes), [('F', 550), ('T', 450)]);
        assert!(t.client.is_usable());
    }

    #[test]
    fn pipelined_mail_refused() {
        let mut t = T::ready(config(TlsPolicy::None, None), &["PIPELINING"]);
        let from = addr("spam@sender.test");
        let to = [rcpt("b@mx.test")];
        t.client.send(&envelope(Some(&from), &to), b"x").unwrap();
        t.c();
        assert!(t.s("550 5.7.1 Sender denied\r\n").is_none());
        let err = failed(t.s("503 5.5.1 need MAIL\r\n503 5.5.1 need RCPT\r\n"));
        assert!(err.is_permanent());
        assert_eq!(err.stage(), Stage::Mail);
        assert_eq!(
            err.to_string(),
            "mx.test refused MAIL FROM: 550 5.7.1 Sender denied"
        );
        assert!(t.client.is_usable(), "nothing is open at the server");
        assert_eq!(t.c(), "");
    }

    #[test]
    fn pipelined_354_without_recipients_drops_the_connection() {
        let mut t = T::ready(config(TlsPolicy::None, None), &["PIPELINING"]);
        let to = [rcpt("b@mx.test")];
        t.client.send(&envelope(None, &to), b"x").unwrap();
        t.c();
        let outcomes = sent(t.s("250 ok\r\n550 no\r\n354 go on\r\n"));
        assert_eq!(codes(&outcomes), [('F', 550)]);
        assert_eq!(t.c(), "", "not even the dot");
        assert!(!t.client.is_usable() && !t.client.can_quit());
    }

    #[test]
    fn sequential_without_pipelining() {
        let mut t = T::ready(config(TlsPolicy::None, None), &["8BITMIME"]);
        let to = [rcpt("b@mx.test"), rcpt("c@mx.test")];
        t.client.send(&envelope(None, &to), b"x").unwrap();
        assert_eq!(t.c(), "MAIL FROM:<>\r\n");
        assert_eq!(t.client.waiting(), Some(Waiting::Mail));
        assert!(t.s("250 ok\r\n").is_none());
        assert_eq!(t.c(), "RCPT TO:<b@mx.test>\r\n");
        assert_eq!(t.client.waiting(), Some(Waiting::Rcpt));
        assert!(t.s("550 no\r\n").is_none());
        assert_eq!(t.c(), "RCPT TO:<c@mx.test>\r\n");
        assert!(t.s("550 no\r\n").is_none());
        // Nobody accepted: no DATA, just RSET.
        assert_eq!(t.c(), "RSET\r\n");
        assert_eq!(codes(&sent(t.s("250 ok\r\n"))), [('F', 550), ('F', 550)]);

        // MAIL refused: stop there.
        t.client.send(&envelope(None, &to), b"x").unwrap();
        assert_eq!(t.c(), "MAIL FROM:<>\r\n");
        let err = failed(t.s("451 4.3.0 try later\r\n"));
        assert!(!err.is_permanent());
        assert_eq!(t.c(), "");
        assert!(t.client.is_usable());
    }

    #[test]
    fn data_refusals_go_to_accepted_recipients() {
        let mut t = T::ready(config(TlsPolicy::None, None), &["PIPELINING"]);
        let to = [rcpt("b@mx.test"), rcpt("c@mx.test")];
        // DATA itself refused.
        t.client.send(&envelope(None, &to), b"x").unwrap();
        t.c();
        assert!(
            t.s("250 ok\r\n250 ok\r\n550 no\r\n451 4.3.0 not now\r\n")
                .is_none()
        );
        assert_eq!(t.c(), "RSET\r\n");
        assert_eq!(codes(&sent(t.s("250 ok\r\n"))), [('T', 451), ('F', 550)]);
        // The end of data refused.
        t.client.send(&envelope(None, &to), b"x").unwrap();
        t.c();
        assert!(matches!(
            t.s("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n"),
            Some(Event::SendData)
        ));
        t.client.data_sent();
        let outcomes = sent(t.s("554 5.7.1 Message rejected as spam\r\n"));
        assert_eq!(codes(&outcomes), [('F', 554), ('F', 554)]);
        assert_eq!(t.client.transactions(), 2);
    }

    #[test]
    fn refuses_what_would_change_the_message() {
        let mut t = T::ready(config(TlsPolicy::None, None), &["PIPELINING", "SIZE 100"]);
        let to = [rcpt("b@mx.test")];
        let err = t
            .client
            .send(&envelope(None, &to), "Subject: caf\u{e9}\r\n".as_bytes())
            .unwrap_err();
        assert!(err.is_permanent());
        assert_eq!(err.stage(), Stage::Policy);
        assert_eq!(err.enhanced(), Enhanced(5, 6, 3));
        assert!(err.to_string().contains("8-bit content not supported"));

        let utf8_to = [rcpt("j\u{f6}rg@mx.test")];
        let err = t.client.send(&envelope(None, &utf8_to), b"x").unwrap_err();
        assert_eq!(err.enhanced(), Enhanced(5, 6, 7));
        let mut asked = envelope(None, &to);
        asked.smtputf8 = true;
        assert_eq!(
            t.client.send(&asked, b"x").unwrap_err().enhanced(),
            Enhanced(5, 6, 7)
        );

        let err = t
            .client
            .send(&envelope(None, &to), &[b'a'; 99])
            .unwrap_err();
        assert_eq!(err.enhanced(), Enhanced(5, 3, 4));
        assert!(err.to_string().contains("101"), "{err}");

        // Declared 8BITMIME but 7-bit content: nothing to damage.
        let mut declared = envelope(None, &to);
        declared.body_type = BodyType::EightBitMime;
        t.client.send(&declared, b"plain\r\n").unwrap();
        assert_eq!(
            t.c(),
            "MAIL FROM:<> SIZE=7\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n"
        );
    }

    #[test]
    fn esmtp_parameters() {
        let mut t = T::ready(
            config(TlsPolicy::None, None),
            &["PIPELINING", "8BITMIME", "SMTPUTF8", "DSN"],
        );
        let from = addr("j\u{f6}rg@sender.test");
        let to = [
            Recipient {
                address: addr("b@mx.test"),
                orcpt: Some("rfc822;B+x=y@orig.test".into()),
                notify: Notify::SUCCESS.with(Notify::FAILURE),
            },
            Recipient {
                address: addr("c@mx.test"),
                orcpt: None,
                notify: Notify::NEVER,
            },
        ];
        let env = OutboundEnvelope {
            reverse_path: Some(&from),
            recipients: &to,
            env_id: Some("id 1+2"),
            ret: Some(Ret::Hdrs),
            body_type: BodyType::SevenBit,
            smtputf8: false,
        };
        t.client.send(&env, "caf\u{e9}".as_bytes()).unwrap();
        assert_eq!(
            t.c(),
            "MAIL FROM:<j\u{f6}rg@sender.test> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id+201+2B2\r\n\
             RCPT TO:<b@mx.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B+2Bx+3Dy@orig.test\r\n\
             RCPT TO:<c@mx.test> NOTIFY=NEVER\r\n\
             DATA\r\n"
        );
    }

    #[test]
    fn control_characters_never_reach_the_wire() {
        let mut t = T::ready(config(TlsPolicy::None, None), &["PIPELINING"]);
        let evil = Recipient {
            address: addr("x@y\r\nRCPT TO:<victim@else.test>"),
            orcpt: None,
            notify: Notify::empty(),
        };
        let to = [evil.clone(), rcpt("b@mx.test")];
        t.client.send(&envelope(None, &to), b"x").unwrap();
        assert_eq!(t.c(), "MAIL FROM:<>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n");
        assert!(matches!(
            t.s("250 ok\r\n250 ok\r\n354 go\r\n"),
            Some(Event::SendData)
        ));
        t.client.data_sent();
        assert_eq!(codes(&sent(t.s("250 ok\r\n"))), [('F', 501), ('D', 250)]);

        // Only bad recipients: nothing is sent, the outcome is at once.
        let only = [evil];
        t.client.send(&envelope(None, &only), b"x").unwrap();
        assert_eq!(t.c(), "");
        assert_eq!(codes(&sent(t.s(""))), [('F', 501)]);
        assert!(t.client.is_usable());
        assert_eq!(t.client.transactions(), 1);
    }

    #[test]
    fn replies_split_anywhere() {
        let mut t = T::new(config(TlsPolicy::None, None));
        let script = format!(
            "220-mx.test ESMTP\r\n220 second line\r\n{}",
            ehlo(&["PIPELINING", "SIZE 5000"])
        );
        let mut events = Vec::new();
        for b in script.as_bytes() {
            if let Some(event) = t.s_bytes(std::slice::from_ref(b)) {
                events.push(event);
            }
        }
        assert!(matches!(events.as_slice(), [Event::Ready]), "{events:?}");
        assert_eq!(t.c(), "EHLO client.test\r\n");
        assert_eq!(t.client.capabilities().size_limit(), Some(5000));
    }

    #[test]
    fn multi_line_reply_text_and_codes() {
        let (used, reply) = ReplyReader::default()
            .feed(b"550-5.1.1 first\r\n550-5.1.1 second\r\n550 5.1.1 third\r\nrest");
        assert_eq!(used, 52);
        let reply = reply.unwrap().unwrap();
        assert_eq!(reply.code, 550);
        assert_eq!(reply.enhanced, Some(Enhanced(5, 1, 1)));
        assert_eq!(reply.text, "first\nsecond\nthird");

        let (_, reply) = ReplyReader::default().feed(b"250\r\n");
        assert_eq!(reply.unwrap().unwrap().text, "");
        // The enhanced class must match the reply's.
        let (_, reply) = ReplyReader::default().feed(b"250 5.1.1 odd\n");
        let reply = reply.unwrap().unwrap();
        assert_eq!(reply.enhanced, None);
        assert_eq!(reply.text, "5.1.1 odd");
        // Lines with different codes are not one reply.
        let (_, reply) = ReplyReader::default().feed(b"250-ok\r\n550 no\r\n");
        assert_eq!(reply.unwrap().unwrap_err(), ReplyError::Invalid);
    }

    #[test]
    fn garbage_and_floods_fail_without_panic() {
        for garbage in [
            &b"HTTP/1.1 400 Bad Request\r\n"[..],
            b"\x00\xff\xfe",
            b"2",
            b"25x",
            b"600 what\r\n",
            b"250x\r\n",
            b"\r\n",
        ] {
            let mut t = T::new(config(TlsPolicy::None, None));
            let event = t.s_bytes(garbage);
            if garbage == b"2" {
                assert!(event.is_none(), "a plausible start waits for more");
                continue;
            }
            let err = failed(event);
            assert!(!err.is_permanent());
            assert!(err.to_string().contains("invalid response"), "{err}");
            assert!(!t.client.can_quit());
        }
        let mut t = T::new(config(TlsPolicy::None, None));
        let mut flood = Vec::new();
        while flood.len() <= MAX_REPLY_SIZE {
            flood.extend_from_slice(b"220-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let err = failed(t.s_bytes(&flood));
        assert!(err.to_string().contains("longer than"), "{err}");
    }

    #[test]
    fn closing_421_mid_transaction() {
        let mut t = T::ready(config(TlsPolicy::None, None), &[]);
        let to = [rcpt("b@mx.test"), rcpt("c@mx.test")];
        t.client.send(&envelope(None, &to), b"x").unwrap();
        t.c();
        assert!(t.s("250 ok\r\n").is_none());
        t.c();
        let err = failed(t.s("421 4.3.2 Shutting down\r\n"));
        assert!(!err.is_permanent());
        assert_eq!(err.stage(), Stage::Rcpt);
        assert_eq!(err.reply().unwrap().code, 421);
        assert!(!t.client.is_usable() && !t.client.can_quit());
        assert!(!t.client.quit());
    }

    #[test]
    fn unsolicited_reply_while_idle() {
        let mut t = T::ready(config(TlsPolicy::None, None), &[]);
        let err = failed(t.s("250 surprise\r\n"));
        assert!(!err.is_permanent());
        assert!(!t.client.is_usable());
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let pieces: [&[u8]; 10] = [
            b"250 ok\r\n",
            b"250-",
            b"354 go\r\n",
            b"334 \r\n",
            b"220 hi\r\n",
            b"550 no\r\n",
            b"421 bye\r\n",
            b"\r\n",
            b"\xff",
            b"250-STARTTLS\r\n250-AUTH PLAIN\r\n250 PIPELINING\r\n",
        ];
        for _ in 0..2000 {
            let policy =
                [TlsPolicy::None, TlsPolicy::Opportunistic, TlsPolicy::Verify][rng.gen_range(0..3)];
            let mut client = Client::new(config(policy, Some(("u", "p"))));
            let to = [rcpt("b@mx.test")];
            for _ in 0..rng.gen_range(1..30) {
                let mut input = Vec::new();
                for _ in 0..rng.gen_range(1..4) {
                    input.extend_from_slice(pieces[rng.gen_range(0..pieces.len())]);
                }
                let (_, event) = client.feed(&input);
                match event {
                    Some(Event::StartTls) => client.tls_started(),
                    Some(Event::SendData) => client.data_sent(),
                    _ => {}
                }
                client.clear_output();
                if client.is_usable() {
                    let _ = client.send(&envelope(None, &to), b"x");
                }
            }
        }
    }

    #[test]
    fn capabilities_are_read_leniently() {
        let reply = |text: &str| Reply::plain(250, text.to_owned());
        let caps = Capabilities::from_ehlo(&reply(
            "mx\nauth=login plain\nsize 99999999999999999999999\n8bitmime \nX-UNKNOWN 1\n\npipelining",
        ));
        assert!(caps.auth_plain() && caps.auth_login());
        assert!(caps.has(EXT_SIZE));
        assert_eq!(caps.size_limit(), None, "unreadable limit: none");
        assert!(caps.eight_bit_mime() && caps.pipelining());
        let caps = Capabilities::from_ehlo(&reply("mx.example.com"));
        assert!(caps.is_esmtp() && !caps.pipelining());
        assert_eq!(
            Capabilities::from_ehlo(&reply("mx\nSIZE 0")).size_limit(),
            None
        );
    }

    #[test]
    fn data_encoding() {
        let enc = |s: &[u8]| String::from_utf8(DataEncoder::encode_all(s)).unwrap();
        assert_eq!(enc(b""), ".\r\n");
        assert_eq!(enc(b"a\r\n"), "a\r\n.\r\n");
        assert_eq!(enc(b"a"), "a\r\n.\r\n");
        assert_eq!(enc(b".\r\n"), "..\r\n.\r\n");
        assert_eq!(
            enc(b".a\r\n..b\r\nc.\r\n.\r\n.d"),
            "..a\r\n...b\r\nc.\r\n..\r\n..d\r\n.\r\n"
        );
        // Bare LF and CR become CRLF, so `LF . LF` cannot end the data early.
        assert_eq!(enc(b"a\n.\nb\r.\rc\r"), "a\r\n..\r\nb\r\n..\r\nc\r\n.\r\n");
        assert_eq!(enc(b"a\r\r\nb"), "a\r\n\r\nb\r\n.\r\n");

        // Block boundaries anywhere give the same bytes.
        let content = b"x\r\n.y\r\n\r\n..z\r\n.\n\r.w";
        let whole = DataEncoder::encode_all(content);
        for size in 1..content.len() {
            let mut encoder = DataEncoder::new();
            let mut out = Vec::new();
            for chunk in content.chunks(size) {
                encoder.encode(chunk, &mut out);
            }
            encoder.finish(&mut out);
            assert_eq!(out, whole, "block size {size}");
        }
    }

    #[test]
    fn xtext_encoding() {
        assert_eq!(xtext("abc"), "abc");
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(xtext("\u{e9}"), "+C3+A9");
    }
}
