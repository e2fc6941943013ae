//! The SMTP server session (RFC 5321) as a sans-I/O state machine.
//!
//! Bytes go in through [`Session::feed`]; replies accumulate in an output
//! buffer the driver flushes when it runs out of input (which is what makes
//! PIPELINING, RFC 2920, cheap). Whenever the session needs the outside world
//! (checking a password, making a message durable, starting TLS, closing) it
//! stops consuming input and returns an [`Event`]; the driver acts on it and
//! reports back through the matching method. No sockets, no clock beyond the
//! timestamp taken when a message is completed, so tests and the fuzz target
//! drive it with plain byte strings.

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use mailroom_core::config::{Cidr, Role, TlsMode};
use mailroom_core::reply::{self, Enhanced, Reply};
use mailroom_core::{
    Address, AuthAttempt, BodyType, Envelope, MessageId, NewMessage, Notify, Origin, Receipt,
    Recipient, Ret, SessionPolicy,
};
use smtp_proto::request::receiver::{BdatReceiver, DataReceiver, DummyDataReceiver};
use smtp_proto::{Error as ParseError, MailFrom, RcptTo, Request};

use crate::received;
use mailroom_core::time::now_unix_millis;

/// What a session needs to know about its listener and the server's limits.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub role: Role,
    /// The listener's TLS mode; STARTTLS is offered for `Starttls` until
    /// TLS is active.
    pub tls_mode: TlsMode,
    pub local_domains: Vec<String>,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_line_length: usize,
    pub max_errors: u32,
    pub allow_insecure_auth: bool,
    /// Clients allowed to relay without AUTH (`mx` listeners).
    pub relay_networks: Vec<Cidr>,
    /// Rules for authenticated clients (tenants' sender domains and rate
    /// limits); `None`: authenticated clients may send anything.
    pub policy: Option<Arc<dyn SessionPolicy>>,
}

impl SessionConfig {
    fn is_local_domain(&self, domain: &str) -> bool {
        self.local_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain))
    }
}

/// The TLS parameters of a session, for the Received header and the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

/// Something the driver must do before the session can go on.
#[derive(Debug)]
pub enum Event {
    /// Check these credentials, then call [`Session::auth_result`].
    Authenticate { username: String, password: String },
    /// Make this message durable, then call [`Session::queued`].
    Submit(Box<NewMessage>),
    /// Flush the output, discard every byte of input not yet fed (plaintext
    /// pipelined after STARTTLS must never be read as if it came over TLS),
    /// run the handshake, then call [`Session::tls_started`].
    StartTls,
    /// Flush the output and close the connection.
    Close,
}

/// What the session is waiting for, which decides the read timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    Command,
    Data,
}

/// A mail transaction in progress (RFC 5321 §3.3).
#[derive(Debug)]
struct Transaction {
    id: MessageId,
    reverse_path: Option<Address>,
    recipients: Vec<Recipient>,
    env_id: Option<String>,
    ret: Option<Ret>,
    body_type: BodyType,
    smtputf8: bool,
    priority: i8,
    /// Set once BDAT was used, so DATA is refused in the same transaction.
    chunking: bool,
    /// Trace header followed by the message data received so far.
    content: Vec<u8>,
    /// Length of the trace header at the start of `content`.
    header_len: usize,
    /// The data went over the size limit and is being discarded.
    oversized: bool,
}

impl Transaction {
    fn data_len(&self) -> usize {
        self.content.len() - self.header_len
    }
}

#[derive(Debug)]
enum AuthStep {
    /// `AUTH PLAIN` without initial response; waiting for it.
    Plain,
    /// `AUTH LOGIN`; waiting for the username.
    LoginUser,
    /// `AUTH LOGIN`; waiting for the password.
    LoginPassword { username: String },
    /// `AUTH CRAM-MD5` (capture mode only); waiting for `user digest`.
    CramMd5,
}

enum State {
    /// Reading command lines.
    Command,
    /// Discarding the rest of an overlong command line.
    SkipLine,
    /// Reading SASL responses.
    Auth(AuthStep),
    /// Reading DATA up to `<CRLF>.<CRLF>`.
    Data(DataReceiver),
    /// Discarding DATA past the size limit, still looking for the end.
    DataDiscard(DummyDataReceiver),
    /// Reading a BDAT chunk.
    Bdat(BdatReceiver),
    /// Discarding a BDAT chunk that will be refused.
    BdatDiscard {
        receiver: DummyDataReceiver,
        reply: Reply,
    },
    /// An event is out; input is not consumed until the driver answers.
    Pending(PendingKind),
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingKind {
    Auth,
    Queue,
    Tls,
}

/// One SMTP server session.
pub struct Session {
    config: Arc<SessionConfig>,
    state: State,
    remote_ip: IpAddr,
    /// EHLO/HELO name, and whether it was EHLO.
    helo: Option<(String, bool)>,
    tls: Option<TlsInfo>,
    auth_user: Option<String>,
    /// The username of an AUTH exchange whose verdict is pending.
    auth_candidate: Option<String>,
    transaction: Option<Transaction>,
    errors: u32,
    output: Vec<u8>,
    /// A command line split across reads.
    line: Vec<u8>,
    /// Capture mode: every AUTH succeeds and is recorded, any recipient is
    /// accepted (a developer's mail catcher, never facing the internet).
    capture: bool,
    /// The last AUTH exchange, kept in capture mode only.
    auth_attempt: Option<AuthAttempt>,
}

impl Session {
    /// Starts a session; the greeting is already in the output. `tls` is
    /// set for implicit-TLS listeners, where the handshake came first.
    pub fn new(config: Arc<SessionConfig>, remote_ip: IpAddr, tls: Option<TlsInfo>) -> Self {
        let mut session = Session {
            state: State::Command,
            remote_ip,
            helo: None,
            tls,
            auth_user: None,
            auth_candidate: None,
            transaction: None,
            errors: 0,
            output: Vec::with_capacity(256),
            line: Vec::new(),
            capture: false,
            auth_attempt: None,
            config,
        };
        let greeting = format!("{} ESMTP mailroom", session.config.hostname);
        session.reply(Reply::plain(220, greeting));
        session
    }

    /// A capture-mode session: AUTH PLAIN, LOGIN and CRAM-MD5 always
    /// answer `235` without an [`Event::Authenticate`] and are recorded
    /// (see [`Session::auth_attempt`]); no relay checks, no AUTH required.
    pub fn new_capture(
        config: Arc<SessionConfig>,
        remote_ip: IpAddr,
        tls: Option<TlsInfo>,
    ) -> Self {
        let mut session = Session::new(config, remote_ip, tls);
        session.capture = true;
        session
    }

    /// The last AUTH exchange of a capture-mode session.
    pub fn auth_attempt(&self) -> Option<&AuthAttempt> {
        self.auth_attempt.as_ref()
    }

    /// Replies not yet written to the client.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// Forgets the output once the driver has written it.
    pub fn clear_output(&mut self) {
        self.output.clear();
        if self.output.capacity() > 16 * 1024 {
            self.output.shrink_to(256);
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// A transaction has started (MAIL accepted) and is not finished.
    pub fn in_transaction(&self) -> bool {
        self.transaction.is_some() || matches!(self.state, State::Pending(PendingKind::Queue))
    }

    pub fn waiting(&self) -> Waiting {
        match self.state {
            State::Data(_) | State::DataDiscard(_) | State::Bdat(_) | State::BdatDiscard { .. } => {
                Waiting::Data
            }
            _ => Waiting::Command,
        }
    }

    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    pub fn authenticated_user(&self) -> Option<&str> {
        self.auth_user.as_deref()
    }

    /// Consumes input until it is used up or an event is needed. Returns how
    /// many bytes were consumed; call again with the rest after handling the
    /// event.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<Event>) {
        let mut pos = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            let (used, event) = match &mut self.state {
                State::Pending(_) | State::Closed => return (pos, None),
                State::Command | State::Auth(_) => self.feed_line(rest),
                State::SkipLine => match memchr(b'\n', rest) {
                    Some(i) => {
                        self.state = State::Command;
                        (i + 1, None)
                    }
                    None => (rest.len(), None),
                },
                State::Data(receiver) => {
                    let mut iter = rest.iter();
                    let Some(tx) = self.transaction.as_mut() else {
                        self.state = State::Command;
                        continue;
                    };
                    let done = receiver.ingest(&mut iter, &mut tx.content);
                    let used = rest.len() - iter.len();
                    if done {
                        (used, self.data_complete())
                    } else {
                        if tx.data_len() > self.config.max_message_size {
                            tx.oversized = true;
                            tx.content.clear();
                            tx.content.shrink_to_fit();
                            tx.header_len = 0;
                            self.state = State::DataDiscard(DummyDataReceiver::new_data(receiver));
                        }
                        (used, None)
                    }
                }
                State::DataDiscard(receiver) => {
                    let mut iter = rest.iter();
                    let done = receiver.ingest(&mut iter);
                    let used = rest.len() - iter.len();
                    if done {
                        self.state = State::Command;
                        self.transaction = None;
                        self.reply(reply::SIZE_EXCEEDED);
                    }
                    (used, None)
                }
                State::Bdat(receiver) => {
                    let mut iter = rest.iter();
                    let Some(tx) = self.transaction.as_mut() else {
                        self.state = State::Command;
                        continue;
                    };
                    let done = receiver.ingest(&mut iter, &mut tx.content);
                    let used = rest.len() - iter.len();
                    if !done {
                        (used, None)
                    } else if receiver.is_last {
                        (used, self.data_complete())
                    } else {
                        let len = tx.data_len();
                        self.state = State::Command;
                        self.reply(Reply::owned(
                            250,
                            Enhanced(2, 0, 0),
                            format!("{len} octets received"),
                        ));
                        (used, None)
                    }
                }
                State::BdatDiscard { receiver, reply } => {
                    let mut iter = rest.iter();
                    let done = receiver.ingest(&mut iter);
                    let used = rest.len() - iter.len();
                    if done {
                        let reply = reply.clone();
                        self.state = State::Command;
                        self.reply(reply);
                    }
                    (used, None)
                }
            };
            pos += used;
            if self.errors >= self.config.max_errors && !self.is_closed() {
                self.reply(reply::TOO_MANY_ERRORS);
                self.state = State::Closed;
                return (pos, Some(Event::Close));
            }
            if event.is_some() {
                return (pos, event);
            }
        }
        (pos, None)
    }

    /// Frames one line (or part of one) and handles it when complete.
    fn feed_line(&mut self, rest: &[u8]) -> (usize, Option<Event>) {
        let max = self.config.max_line_length;
        match memchr(b'\n', rest) {
            Some(i) => {
                let used = i + 1;
                if self.line.len() + used > max {
                    self.line.clear();
                    self.reply(reply::LINE_TOO_LONG);
                    return (used, None);
                }
                let event = if self.line.is_empty() {
                    self.handle_line(&rest[..used])
                } else {
                    let mut line = std::mem::take(&mut self.line);
                    line.extend_from_slice(&rest[..used]);
                    let event = self.handle_line(&line);
                    line.clear();
                    if line.capacity() <= 4096 {
                        self.line = line;
                    }
                    event
                };
                (used, event)
            }
            None => {
                if self.line.len() + rest.len() > max {
                    self.line = Vec::new();
                    self.reply(reply::LINE_TOO_LONG);
                    self.state = State::SkipLine;
                } else {
                    self.line.extend_from_slice(rest);
                }
                (rest.len(), None)
            }
        }
    }

    fn handle_line(&mut self, line: &[u8]) -> Option<Event> {
        if let State::Auth(_) = self.state {
            let State::Auth(step) = std::mem::replace(&mut self.state, State::Command) else {
                return None;
            };
            return self.auth_response(step, line);
        }
        match Request::parse(&mut line.iter()) {
            Ok(request) => self.handle_request(request, line),
            Err(err) => {
                self.parse_error(err, line);
                None
            }
        }
    }

    fn parse_error(&mut self, err: ParseError, line: &[u8]) {
        let reply = match err {
            ParseError::UnknownCommand | ParseError::NeedsMoreData { .. } => reply::UNKNOWN_COMMAND,
            ParseError::InvalidSenderAddress => reply::BAD_SENDER,
            ParseError::InvalidRecipientAddress => reply::BAD_RECIPIENT,
            ParseError::SyntaxError { syntax } if syntax.starts_with("AUTH") => {
                // A mechanism smtp-proto does not know is not a syntax error.
                if line.len() > 5 && line[..5].eq_ignore_ascii_case(b"AUTH ") {
                    reply::AUTH_UNSUPPORTED
                } else {
                    Reply::owned(501, Enhanced(5, 5, 2), format!("Syntax: {syntax}"))
                }
            }
            ParseError::SyntaxError { syntax } => {
                Reply::owned(501, Enhanced(5, 5, 2), format!("Syntax: {syntax}"))
            }
            ParseError::InvalidParameter { param } => Reply::owned(
                501,
                Enhanced(5, 5, 4),
                format!("Invalid value for parameter {param}"),
            ),
            ParseError::UnsupportedParameter { param } => {
                let param: String = param.chars().take(32).collect();
                Reply::owned(
                    555,
                    Enhanced(5, 5, 4),
                    format!("Unsupported parameter {param:?}"),
                )
            }
            ParseError::ResponseTooLong => reply::LINE_TOO_LONG,
            ParseError::InvalidResponse { .. } => reply::UNKNOWN_COMMAND,
        };
        self.reply(reply);
    }

    fn handle_request(
        &mut self,
        request: Request<std::borrow::Cow<'_, str>>,
        line: &[u8],
    ) -> Option<Event> {
        match request {
            Request::Ehlo { host } => {
                self.transaction = None;
                self.helo = Some((host.into_owned(), true));
                let ehlo = self.ehlo_reply();
                self.reply(ehlo);
            }
            Request::Helo { host } => {
                self.transaction = None;
                self.helo = Some((host.into_owned(), false));
                let text = self.config.hostname.clone();
                self.reply(Reply::plain(250, text));
            }
            Request::Lhlo { .. } => self.reply(reply::UNKNOWN_COMMAND),
            Request::Mail { from } => self.mail(from),
            Request::Rcpt { to } => self.rcpt(to, line),
            Request::Data => return self.data(),
            Request::Bdat {
                chunk_size,
                is_last,
            } => return self.bdat(chunk_size, is_last),
            Request::Auth {
                mechanism,
                initial_response,
            } => return self.auth(mechanism, &initial_response),
            Request::StartTls => return self.starttls(),
            Request::Rset => {
                self.transaction = None;
                self.reply(reply::RESET_OK);
            }
            Request::Noop { .. } => self.reply(reply::NOOP_OK),
            Request::Vrfy { .. } => self.reply(reply::VRFY_CANNOT),
            Request::Help { .. } => self.reply(reply::HELP),
            Request::Quit => {
                self.reply(reply::BYE);
                self.state = State::Closed;
                return Some(Event::Close);
            }
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.reply(Reply::new(
                502,
                Enhanced(5, 5, 1),
                "Command not implemented",
            )),
        }
        None
    }

    fn starttls_offered(&self) -> bool {
        self.config.tls_mode == TlsMode::Starttls && self.tls.is_none()
    }

    fn auth_offered(&self) -> bool {
        self.auth_user.is_none()
            && (self.tls.is_some() || self.config.allow_insecure_auth || self.capture)
    }

    fn ehlo_reply(&self) -> Reply {
        // `SIZE 0` is RFC 1870's "no fixed limit" (capture mode's 0 = unlimited).
        let size = match self.config.max_message_size {
            usize::MAX => 0,
            n => n,
        };
        let mut text = format!(
            "{} Hello {}\nPIPELINING\nSIZE {size}\n8BITMIME\nSMTPUTF8\nENHANCEDSTATUSCODES\nCHUNKING\nDSN\nMT-PRIORITY MIXER",
            self.config.hostname, self.remote_ip
        );
        if self.starttls_offered() {
            text.push_str("\nSTARTTLS");
        }
        if self.auth_offered() && self.capture {
            text.push_str("\nAUTH PLAIN LOGIN CRAM-MD5");
        } else if self.auth_offered() {
            text.push_str("\nAUTH PLAIN LOGIN");
        }
        text.push_str("\nHELP");
        Reply::plain(250, text)
    }

    fn mail(&mut self, from: MailFrom<std::borrow::Cow<'_, str>>) {
        if self.helo.is_none() {
            return self.reply(reply::NEED_EHLO);
        }
        if self.transaction.is_some() {
            return self.reply(reply::NESTED_MAIL);
        }
        if self.config.role == Role::Submission && self.auth_user.is_none() && !self.capture {
            return self.reply(reply::AUTH_REQUIRED);
        }
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        let reverse_path = if from.address.is_empty() {
            None
        } else {
            match Address::parse(&from.address) {
                Ok(a) => Some(a),
                Err(_) => return self.reply(reply::BAD_SENDER),
            }
        };
        if let Some(a) = &reverse_path
            && !a.is_ascii()
            && !smtputf8
        {
            return self.reply(reply::UTF8_SENDER);
        }
        if from.size > self.config.max_message_size {
            return self.reply(reply::SIZE_EXCEEDED);
        }
        if let (Some(policy), Some(user)) = (&self.config.policy, &self.auth_user)
            && let Err(refusal) = policy.mail(user, reverse_path.as_ref())
        {
            return self.reply(refusal);
        }
        let body_type = if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            BodyType::BinaryMime
        } else if from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0 {
            BodyType::EightBitMime
        } else {
            BodyType::SevenBit
        };
        if body_type == BodyType::BinaryMime {
            return self.reply(Reply::new(
                555,
                Enhanced(5, 5, 4),
                "BODY=BINARYMIME is not supported",
            ));
        }
        let ret = if from.flags & smtp_proto::MAIL_RET_FULL != 0 {
            Some(Ret::Full)
        } else if from.flags & smtp_proto::MAIL_RET_HDRS != 0 {
            Some(Ret::Hdrs)
        } else {
            None
        };
        if from.env_id.as_ref().is_some_and(|e| e.len() > 100) {
            return self.reply(Reply::new(
                501,
                Enhanced(5, 5, 4),
                "ENVID longer than 100 characters",
            ));
        }
        self.transaction = Some(Transaction {
            id: MessageId::new(),
            reverse_path,
            recipients: Vec::new(),
            env_id: from.env_id.map(|e| e.into_owned()),
            ret,
            body_type,
            smtputf8,
            priority: from.mt_priority.clamp(-9, 9) as i8,
            chunking: false,
            content: Vec::new(),
            header_len: 0,
            oversized: false,
        });
        self.reply(reply::SENDER_OK);
    }

    fn rcpt(&mut self, to: RcptTo<std::borrow::Cow<'_, str>>, line: &[u8]) {
        let is_local_or_authed = |config: &SessionConfig, auth: bool, domain: &str| {
            auth || config.is_local_domain(domain)
        };
        let Some(tx) = self.transaction.as_ref() else {
            return self.reply(reply::NEED_MAIL);
        };
        if tx.chunking {
            return self.reply(reply::BAD_SEQUENCE);
        }
        let address = if to.address.is_empty() {
            // smtp-proto folds `<Postmaster>` (RFC 5321 §4.5.1) into "".
            if contains_ignore_case(line, b"<postmaster>") {
                let domain = self
                    .config
                    .local_domains
                    .first()
                    .unwrap_or(&self.config.hostname);
                Address::parse(&format!("postmaster@{domain}"))
            } else {
                return self.reply(reply::BAD_RECIPIENT);
            }
        } else {
            Address::parse(&to.address)
        };
        let Ok(address) = address else {
            return self.reply(reply::BAD_RECIPIENT);
        };
        if !address.is_ascii() && !tx.smtputf8 {
            return self.reply(reply::UTF8_RECIPIENT);
        }
        let trusted = self.capture
            || self.auth_user.is_some()
            || self
                .config
                .relay_networks
                .iter()
                .any(|net| net.contains(self.remote_ip));
        if !is_local_or_authed(&self.config, trusted, address.domain()) {
            return self.reply(reply::RELAY_DENIED);
        }
        if tx.recipients.len() >= self.config.max_recipients {
            return self.reply(reply::TOO_MANY_RECIPIENTS);
        }
        if let (Some(policy), Some(user)) = (&self.config.policy, &self.auth_user)
            && let Err(refusal) = policy.rcpt(user)
        {
            return self.reply(refusal);
        }
        let mut notify = Notify::empty();
        for (flag, bit) in [
            (smtp_proto::RCPT_NOTIFY_SUCCESS, Notify::SUCCESS),
            (smtp_proto::RCPT_NOTIFY_FAILURE, Notify::FAILURE),
            (smtp_proto::RCPT_NOTIFY_DELAY, Notify::DELAY),
            (smtp_proto::RCPT_NOTIFY_NEVER, Notify::NEVER),
        ] {
            if to.flags & flag != 0 {
                notify = notify.with(bit);
            }
        }
        let recipient = Recipient {
            address,
            orcpt: to.orcpt.map(|o| format!("rfc822;{o}")),
            notify,
        };
        if let Some(tx) = self.transaction.as_mut() {
            tx.recipients.push(recipient);
        }
        self.reply(reply::RECIPIENT_OK);
    }

    /// Checks that a transaction can take data; on success the trace
    /// header is in place and the caller may start reading the content.
    fn begin_content(&mut self) -> Result<(), Reply> {
        let Some(tx) = self.transaction.as_mut() else {
            return Err(reply::BAD_SEQUENCE);
        };
        if tx.recipients.is_empty() {
            return Err(reply::NO_VALID_RECIPIENTS);
        }
        if tx.header_len == 0 && tx.content.is_empty() {
            let header = received::header(&received::Trace {
                helo: self.helo.as_ref().map(|(h, _)| h.as_str()),
                esmtp: self.helo.as_ref().is_some_and(|(_, e)| *e),
                smtputf8: tx.smtputf8,
                remote_ip: self.remote_ip,
                hostname: &self.config.hostname,
                tls: self.tls.as_ref(),
                authenticated: self.auth_user.is_some(),
                id: &tx.id,
                recipient: (tx.recipients.len() == 1).then(|| &tx.recipients[0].address),
                unix_time: now_unix_millis() / 1000,
            });
            tx.content.reserve(header.len() + 4096);
            tx.content.extend_from_slice(header.as_bytes());
            tx.header_len = header.len();
        }
        Ok(())
    }

    fn data(&mut self) -> Option<Event> {
        if self.transaction.as_ref().is_some_and(|tx| tx.chunking) {
            self.reply(reply::BDAT_AFTER_DATA_MIX);
            return None;
        }
        if let Err(reply) = self.begin_content() {
            self.reply(reply);
            return None;
        }
        let mut receiver = DataReceiver::new();
        // The 354 reply ends a line, so the data starts "after CRLF": prime
        // the receiver so that a leading "." (an empty message, or a
        // dot-stuffed first line) is recognised.
        let mut scratch = Vec::new();
        receiver.ingest(&mut b"\r\n".iter(), &mut scratch);
        self.state = State::Data(receiver);
        self.reply(reply::START_DATA);
        None
    }

    fn bdat(&mut self, chunk_size: usize, is_last: bool) -> Option<Event> {
        let refuse = |reply: Reply| State::BdatDiscard {
            receiver: DummyDataReceiver::new_bdat(chunk_size),
            reply,
        };
        if let Err(reply) = self.begin_content() {
            // The chunk follows the command whatever we answer; it must be
            // skipped, never parsed as commands.
            self.state = refuse(reply);
            return self.finish_empty_chunk();
        }
        let tx = self.transaction.as_mut()?;
        tx.chunking = true;
        if tx.data_len().saturating_add(chunk_size) > self.config.max_message_size {
            self.transaction = None;
            self.state = refuse(reply::SIZE_EXCEEDED);
            return self.finish_empty_chunk();
        }
        tx.content.reserve(chunk_size.min(1024 * 1024));
        self.state = State::Bdat(BdatReceiver::new(chunk_size, is_last));
        if chunk_size == 0 {
            if is_last {
                return self.data_complete();
            }
            self.state = State::Command;
            let len = tx.data_len();
            self.reply(Reply::owned(
                250,
                Enhanced(2, 0, 0),
                format!("{len} octets received"),
            ));
        }
        None
    }

    /// A zero-length refused chunk has nothing to skip: answer at once.
    fn finish_empty_chunk(&mut self) -> Option<Event> {
        if let State::BdatDiscard { receiver, reply } = &mut self.state {
            let mut empty = [].iter();
            if receiver.ingest(&mut empty) {
                let reply = reply.clone();
                self.state = State::Command;
                self.reply(reply);
            }
        }
        None
    }

    fn data_complete(&mut self) -> Option<Event> {
        let Some(tx) = self.transaction.take() else {
            self.state = State::Command;
            return None;
        };
        if tx.oversized || tx.data_len() > self.config.max_message_size {
            self.state = State::Command;
            self.reply(reply::SIZE_EXCEEDED);
            return None;
        }
        if let (Some(policy), Some(user)) = (&self.config.policy, &self.auth_user)
            && let Err(refusal) = policy.content(user, &tx.content[tx.header_len..])
        {
            self.state = State::Command;
            self.reply(refusal);
            return None;
        }
        let message = NewMessage {
            id: tx.id,
            received_at: now_unix_millis(),
            envelope: Envelope {
                reverse_path: tx.reverse_path,
                recipients: tx.recipients,
                env_id: tx.env_id,
                ret: tx.ret,
                body_type: tx.body_type,
                smtputf8: tx.smtputf8,
                priority: tx.priority,
            },
            origin: Origin {
                protocol: "smtp".into(),
                remote_ip: Some(self.remote_ip),
                helo: self.helo.as_ref().map(|(h, _)| h.clone()),
                auth_user: self.auth_user.clone(),
                tls: self
                    .tls
                    .as_ref()
                    .map(|t| format!("{} {}", t.version, t.cipher)),
            },
            content: tx.content,
            kept_locally: Vec::new(),
            meta: Default::default(),
        };
        self.state = State::Pending(PendingKind::Queue);
        Some(Event::Submit(Box::new(message)))
    }

    /// The driver's answer to [`Event::Submit`] when the intake gave a
    /// [`Receipt`]: `Close` answers `250`, then `221`, and ends the session.
    pub fn accepted(&mut self, id: MessageId, receipt: Receipt) {
        if !matches!(self.state, State::Pending(PendingKind::Queue)) {
            return;
        }
        self.queued(id, Ok(()));
        if receipt == Receipt::Close {
            self.reply(reply::BYE);
            self.state = State::Closed;
        }
    }

    /// The driver's answer to [`Event::Submit`].
    pub fn queued(&mut self, id: MessageId, result: Result<(), ()>) {
        if !matches!(self.state, State::Pending(PendingKind::Queue)) {
            return;
        }
        self.state = State::Command;
        match result {
            Ok(()) => self.reply(Reply::owned(
                250,
                Enhanced(2, 0, 0),
                format!("Ok: queued as {id}"),
            )),
            Err(()) => self.reply(reply::QUEUE_FAILED),
        }
    }

    fn starttls(&mut self) -> Option<Event> {
        if self.tls.is_some() {
            self.reply(reply::ALREADY_TLS);
            return None;
        }
        if !self.starttls_offered() {
            self.reply(Reply::new(502, Enhanced(5, 5, 1), "STARTTLS not offered"));
            return None;
        }
        if self.transaction.is_some() {
            self.reply(reply::BAD_SEQUENCE);
            return None;
        }
        self.reply(reply::READY_TLS);
        self.state = State::Pending(PendingKind::Tls);
        Some(Event::StartTls)
    }

    /// The driver's answer to [`Event::StartTls`]: the session starts over
    /// (RFC 3207 §4.2), forgetting EHLO, AUTH and any partial line.
    pub fn tls_started(&mut self, info: TlsInfo) {
        self.tls = Some(info);
        self.helo = None;
        self.auth_user = None;
        self.auth_attempt = None;
        self.transaction = None;
        self.line.clear();
        self.state = State::Command;
    }

    fn auth(&mut self, mechanism: u64, initial: &str) -> Option<Event> {
        if self.auth_user.is_some() {
            self.reply(reply::ALREADY_AUTH);
            return None;
        }
        if self.helo.is_none() {
            self.reply(reply::NEED_EHLO);
            return None;
        }
        if self.transaction.is_some() {
            self.reply(reply::AUTH_IN_TRANSACTION);
            return None;
        }
        let cram = mechanism == smtp_proto::AUTH_CRAM_MD5 && self.capture;
        if mechanism != smtp_proto::AUTH_PLAIN && mechanism != smtp_proto::AUTH_LOGIN && !cram {
            self.reply(reply::AUTH_UNSUPPORTED);
            return None;
        }
        if !self.auth_offered() {
            self.reply(reply::ENCRYPTION_REQUIRED);
            return None;
        }
        if cram {
            // RFC 2195: the challenge is a unique msg-id-like string. Its
            // uniqueness is all that matters here, since capture mode
            // records the digest without checking it.
            let challenge = format!(
                "<{}@{}>",
                MessageId::new().as_uuid().simple(),
                self.config.hostname
            );
            self.reply(Reply::plain(334, BASE64.encode(challenge)));
            self.state = State::Auth(AuthStep::CramMd5);
            return None;
        }
        let plain = mechanism == smtp_proto::AUTH_PLAIN;
        match (plain, initial) {
            (true, "") => {
                self.reply(Reply::plain(334, ""));
                self.state = State::Auth(AuthStep::Plain);
                None
            }
            (true, initial) => self.auth_plain(initial.as_bytes()),
            (false, "") => {
                self.reply(Reply::plain(334, "VXNlcm5hbWU6"));
                self.state = State::Auth(AuthStep::LoginUser);
                None
            }
            (false, initial) => self.auth_response(AuthStep::LoginUser, initial.as_bytes()),
        }
    }

    fn auth_response(&mut self, step: AuthStep, line: &[u8]) -> Option<Event> {
        let line = trim_crlf(line);
        if line == b"*" {
            self.reply(reply::AUTH_CANCELLED);
            return None;
        }
        match step {
            AuthStep::Plain => self.auth_plain(line),
            AuthStep::LoginUser => match decode_base64(line) {
                Some(user) => match String::from_utf8(user) {
                    Ok(username) => {
                        self.reply(Reply::plain(334, "UGFzc3dvcmQ6"));
                        self.state = State::Auth(AuthStep::LoginPassword { username });
                        None
                    }
                    Err(_) => {
                        self.reply(reply::AUTH_FAILED);
                        None
                    }
                },
                None => {
                    self.reply(reply::BAD_BASE64);
                    None
                }
            },
            AuthStep::CramMd5 => {
                let Some(decoded) = decode_base64(line) else {
                    self.reply(reply::BAD_BASE64);
                    return None;
                };
                // `username SP digest`; the username may itself hold spaces.
                let text = String::from_utf8_lossy(&decoded).into_owned();
                match text.rsplit_once(' ') {
                    Some((user, digest)) if !user.is_empty() => {
                        self.authenticate("CRAM-MD5", user.to_owned(), digest.to_owned())
                    }
                    _ => {
                        self.reply(reply::AUTH_FAILED);
                        None
                    }
                }
            }
            AuthStep::LoginPassword { username } => match decode_base64(line) {
                Some(password) => match String::from_utf8(password) {
                    Ok(password) => self.authenticate("LOGIN", username, password),
                    Err(_) => {
                        self.reply(reply::AUTH_FAILED);
                        None
                    }
                },
                None => {
                    self.reply(reply::BAD_BASE64);
                    None
                }
            },
        }
    }

    /// RFC 4616: `[authzid] NUL authcid NUL passwd`.
    fn auth_plain(&mut self, response: &[u8]) -> Option<Event> {
        let response = trim_crlf(response);
        let decoded = if response == b"=" {
            Some(Vec::new())
        } else {
            decode_base64(response)
        };
        let Some(decoded) = decoded else {
            self.reply(reply::BAD_BASE64);
            return None;
        };
        let mut parts = decoded.split(|&b| b == 0);
        let (Some(authzid), Some(authcid), Some(passwd), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            self.reply(reply::AUTH_FAILED);
            return None;
        };
        // Acting as another identity (authzid) is not supported.
        if !authzid.is_empty() && authzid != authcid {
            self.reply(reply::AUTH_FAILED);
            return None;
        }
        match (
            String::from_utf8(authcid.to_vec()),
            String::from_utf8(passwd.to_vec()),
        ) {
            (Ok(username), Ok(password)) => self.authenticate("PLAIN", username, password),
            _ => {
                self.reply(reply::AUTH_FAILED);
                None
            }
        }
    }

    fn authenticate(
        &mut self,
        mechanism: &'static str,
        username: String,
        password: String,
    ) -> Option<Event> {
        if self.capture {
            // Recorded, never checked: the client under test gets the
            // answer a correct login would get.
            self.auth_user = Some(username.clone());
            self.auth_attempt = Some(AuthAttempt {
                mechanism: mechanism.into(),
                username,
                password,
            });
            self.reply(reply::AUTH_OK);
            return None;
        }
        self.auth_candidate = Some(username.clone());
        self.state = State::Pending(PendingKind::Auth);
        Some(Event::Authenticate { username, password })
    }

    /// The driver's answer to [`Event::Authenticate`].
    pub fn auth_result(&mut self, ok: bool) {
        if !matches!(self.state, State::Pending(PendingKind::Auth)) {
            return;
        }
        self.state = State::Command;
        let candidate = self.auth_candidate.take();
        if ok {
            self.auth_user = candidate;
            self.reply(reply::AUTH_OK);
        } else {
            self.reply(reply::AUTH_FAILED);
        }
    }

    /// The client went quiet for too long.
    pub fn timeout(&mut self) {
        self.reply(reply::TIMEOUT);
        self.state = State::Closed;
    }

    /// The server is going down: tell the client and close.
    pub fn shutdown(&mut self) {
        self.reply(reply::SHUTTING_DOWN);
        self.state = State::Closed;
    }

    fn reply(&mut self, reply: Reply) {
        if reply.code >= 400 {
            self.errors += 1;
        }
        reply.write_to(&mut self.output);
    }
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

fn trim_crlf(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.trim_ascii()
}

fn decode_base64(text: &[u8]) -> Option<Vec<u8>> {
    BASE64.decode(text.trim_ascii()).ok()
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}
