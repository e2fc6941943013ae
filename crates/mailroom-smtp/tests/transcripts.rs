//! Conversation tests: each reads like an SMTP transcript (`C:` what the
//! client sends, `S:` the reply expected), driven through the sans-I/O
//! session with no sockets.

use std::sync::Arc;

use mailroom_core::config::{Role, TlsMode};
use mailroom_core::{NewMessage, Notify, Ret};
use mailroom_smtp::{Event, Session, SessionConfig, TlsInfo};

const USER: &str = "app";
const PASSWORD: &str = "s3cret";

fn config(role: Role, tls_mode: TlsMode) -> SessionConfig {
    SessionConfig {
        hostname: "mx.test".into(),
        role,
        tls_mode,
        local_domains: vec!["example.test".into()],
        max_message_size: 1000,
        max_recipients: 3,
        max_line_length: 512,
        max_errors: 10,
        allow_insecure_auth: false,
        relay_networks: Vec::new(),
        policy: None,
    }
}

/// A session plus the driver's side of the events, answered in-line.
struct Client {
    session: Session,
    pending: Vec<u8>,
    submitted: Vec<NewMessage>,
    closed: bool,
    /// Bytes the session left unread when it asked for STARTTLS.
    discarded_at_tls: Option<usize>,
}

impl Client {
    fn new(config: SessionConfig) -> Self {
        Self::with_tls(config, None)
    }

    fn with_tls(config: SessionConfig, tls: Option<TlsInfo>) -> Self {
        let session = Session::new(Arc::new(config), "192.0.2.7".parse().unwrap(), tls);
        let mut client = Client {
            session,
            pending: Vec::new(),
            submitted: Vec::new(),
            closed: false,
            discarded_at_tls: None,
        };
        client.take_output();
        client.expect("220 mx.test ESMTP");
        client
    }

    fn implicit_tls(config: SessionConfig) -> Self {
        Self::with_tls(config, Some(tls_info()))
    }

    /// Sends raw bytes, handling events the way the driver does.
    fn send(&mut self, bytes: &[u8]) {
        let mut pos = 0;
        while pos < bytes.len() && !self.closed {
            let (used, event) = self.session.feed(&bytes[pos..]);
            pos += used;
            match event {
                None => {
                    if used == 0 {
                        break;
                    }
                }
                Some(Event::Authenticate { username, password }) => {
                    self.session
                        .auth_result(username == USER && password == PASSWORD);
                }
                Some(Event::Submit(message)) => {
                    let id = message.id;
                    self.submitted.push(*message);
                    self.session.queued(id, Ok(()));
                }
                Some(Event::StartTls) => {
                    self.discarded_at_tls = Some(bytes.len() - pos);
                    pos = bytes.len();
                    self.take_output();
                    self.session.tls_started(tls_info());
                }
                Some(Event::Close) => self.closed = true,
            }
        }
        self.take_output();
    }

    fn take_output(&mut self) {
        self.pending.extend_from_slice(self.session.output());
        self.session.clear_output();
    }

    /// `C:` a line; CRLF is added.
    fn c(&mut self, line: &str) -> &mut Self {
        let mut bytes = line.as_bytes().to_vec();
        bytes.extend_from_slice(b"\r\n");
        self.send(&bytes);
        self
    }

    /// The next whole reply (all its lines).
    fn next_reply(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        let mut end = 0;
        for line in text.split_inclusive("\r\n") {
            end += line.len();
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                break;
            }
        }
        assert!(end > 0, "expected a reply, got nothing");
        self.pending.drain(..end);
        text[..end].to_owned()
    }

    /// `S:` the next reply's last line starts with `expected`.
    fn s(&mut self, expected: &str) -> &mut Self {
        self.expect(expected);
        self
    }

    fn expect(&mut self, expected: &str) -> String {
        let reply = self.next_reply();
        let last = reply.trim_end().rsplit("\r\n").next().unwrap_or("");
        assert!(
            last.starts_with(expected),
            "expected reply {expected:?}, got {reply:?}"
        );
        reply
    }

    fn no_more_replies(&self) {
        assert!(
            self.pending.is_empty(),
            "unexpected replies: {:?}",
            String::from_utf8_lossy(&self.pending)
        );
    }

    fn ehlo(&mut self) -> String {
        self.c("EHLO client.test");
        self.expect("250 HELP")
    }
}

fn tls_info() -> TlsInfo {
    TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
    }
}

fn mx() -> Client {
    Client::new(config(Role::Mx, TlsMode::Starttls))
}

fn plain_b64(user: &str, pass: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"))
}

fn b64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[test]
fn a_plain_transaction() {
    let mut c = mx();
    let ehlo = c.ehlo();
    for ext in [
        "PIPELINING",
        "SIZE 1000",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "STARTTLS",
        "DSN",
        "MT-PRIORITY MIXER",
    ] {
        assert!(ehlo.contains(&format!("250-{ext}\r\n")), "{ext} in {ehlo}");
    }
    assert!(!ehlo.contains("AUTH"), "AUTH only after TLS: {ehlo}");
    c.c("MAIL FROM:<sender@remote.test>").s("250 2.1.0");
    c.c("RCPT TO:<user@example.test>").s("250 2.1.5");
    c.c("DATA").s("354");
    c.c("Subject: hi").c("").c("..dot stuffed").c("body").c(".");
    let queued = c.expect("250 2.0.0 Ok: queued as ");
    c.c("QUIT").s("221 2.0.0");
    assert!(c.closed);
    c.no_more_replies();

    let m = &c.submitted[0];
    assert!(queued.contains(&m.id.to_string()));
    let content = String::from_utf8(m.content.clone()).unwrap();
    assert!(content.starts_with(
        "Received: from client.test ([192.0.2.7])\r\n\tby mx.test (mailroom) with ESMTP id "
    ));
    assert!(
        content.ends_with("\r\nSubject: hi\r\n\r\n.dot stuffed\r\nbody\r\n"),
        "{content:?}"
    );
    assert_eq!(
        m.envelope.reverse_path.as_ref().unwrap().as_str(),
        "sender@remote.test"
    );
    assert_eq!(
        m.envelope.recipients[0].address.as_str(),
        "user@example.test"
    );
    assert_eq!(m.origin.helo.as_deref(), Some("client.test"));
}

#[test]
fn pipelined_commands_are_answered_in_order() {
    let mut c = mx();
    c.ehlo();
    c.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<b@example.test>\r\nRCPT TO:<c@elsewhere.test>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n");
    c.s("250 2.1.0")
        .s("250 2.1.5")
        .s("554 5.7.1")
        .s("354")
        .s("250 2.0.0")
        .s("221 2.0.0");
    c.no_more_replies();
    assert_eq!(c.submitted.len(), 1);
    assert_eq!(c.submitted[0].envelope.recipients.len(), 1);
}

#[test]
fn empty_message_and_leading_dot() {
    let mut c = mx();
    c.ehlo();
    c.send(b"MAIL FROM:<>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n.\r\n");
    c.s("250").s("250").s("354").s("250 2.0.0");
    let m = &c.submitted[0];
    assert!(m.envelope.reverse_path.is_none());
    assert!(m.content.ends_with(b"+0000\r\n"), "only the trace header");
    c.send(b"MAIL FROM:<>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n..leading\r\n.\r\n");
    c.s("250").s("250").s("354").s("250 2.0.0");
    assert!(c.submitted[1].content.ends_with(b"+0000\r\n.leading\r\n"));
}

#[test]
fn bad_sequence_is_503() {
    let mut c = mx();
    c.c("MAIL FROM:<a@remote.test>").s("503 5.5.1");
    c.ehlo();
    c.c("RCPT TO:<b@example.test>").s("503 5.5.1");
    c.c("DATA").s("503 5.5.1");
    c.c("MAIL FROM:<a@remote.test>").s("250");
    c.c("MAIL FROM:<a@remote.test>").s("503 5.5.1");
    c.c("DATA").s("554 5.5.1");
    c.c("RSET").s("250 2.0.0");
    c.c("DATA").s("503 5.5.1");
}

#[test]
fn syntax_errors_are_500_and_501() {
    let mut c = mx();
    c.c("FROB").s("500 5.5.1");
    c.c("EHLO").s("501 5.5.2");
    c.c("HELO").s("501 5.5.2");
    c.ehlo();
    c.c("MAIL FROM:<no-at-sign>").s("501 5.1.7");
    c.c("MAIL TO:<a@b.test>").s("501 5.5.2");
    c.c("MAIL FROM:<a@remote.test> BODY=9BIT").s("501 5.5.4");
    c.c("MAIL FROM:<a@remote.test> FROB=1").s("555 5.5.4");
    c.c("MAIL FROM:<a@remote.test>").s("250");
    c.c("RCPT TO:<>").s("501 5.1.3");
    c.c("RCPT TO:<a..b@example.test>").s("501 5.1.3");
    c.c("RCPT TO:<Postmaster>").s("250 2.1.5");
}

#[test]
fn simple_commands() {
    let mut c = mx();
    c.c("NOOP").s("250 2.0.0");
    c.c("HELP").s("214 2.0.0");
    c.c("VRFY someone").s("252 2.5.0");
    c.c("EXPN list").s("502 5.5.1");
    c.c("HELO client.test").s("250 mx.test");
    c.c("RSET").s("250 2.0.0");
}

#[test]
fn too_many_recipients_is_452() {
    let mut c = mx();
    c.ehlo();
    c.c("MAIL FROM:<a@remote.test>").s("250");
    for i in 0..3 {
        c.c(&format!("RCPT TO:<u{i}@example.test>")).s("250 2.1.5");
    }
    c.c("RCPT TO:<u4@example.test>").s("452 4.5.3");
}

#[test]
fn overlong_lines_are_refused_and_skipped() {
    let mut c = mx();
    c.ehlo();
    let long = format!("NOOP {}", "x".repeat(600));
    c.c(&long).s("500 5.5.2");
    // The same, arriving in pieces with no newline for a while.
    c.send(b"NOOP ");
    c.send("y".repeat(700).as_bytes());
    c.s("500 5.5.2");
    c.send(b"yyy\r\nNOOP\r\n");
    c.s("250 2.0.0");
    c.no_more_replies();
}

#[test]
fn non_ascii_needs_smtputf8() {
    let mut c = mx();
    c.ehlo();
    c.c("MAIL FROM:<jörg@remote.test>").s("553 5.6.7");
    c.c("MAIL FROM:<a@remote.test>").s("250");
    c.c("RCPT TO:<jörg@example.test>").s("553 5.6.7");
    c.c("RSET").s("250");
    c.c("MAIL FROM:<jörg@remote.test> SMTPUTF8").s("250");
    c.c("RCPT TO:<δοκιμή@example.test>").s("250");
    c.c("DATA").s("354");
    c.c("Subject: ünïcode").c(".").s("250 2.0.0");
    let m = &c.submitted[0];
    assert!(m.envelope.smtputf8);
    assert_eq!(
        m.envelope.recipients[0].address.as_str(),
        "δοκιμή@example.test"
    );
}

#[test]
fn oversized_data_is_552_after_the_end() {
    let mut c = mx();
    c.ehlo();
    c.c("MAIL FROM:<a@remote.test> SIZE=5000").s("552 5.3.4");
    c.c("MAIL FROM:<a@remote.test> SIZE=500").s("250");
    c.c("RCPT TO:<b@example.test>").s("250");
    c.c("DATA").s("354");
    for _ in 0..200 {
        c.send(&[b'x'; 1000]);
        c.send(b"\r\n");
        c.no_more_replies();
    }
    c.c(".").s("552 5.3.4");
    c.c("NOOP").s("250");
    assert!(c.submitted.is_empty());
}

#[test]
fn bdat_chunks() {
    let mut c = mx();
    c.ehlo();
    c.send(b"MAIL FROM:<a@remote.test> BODY=8BITMIME\r\nRCPT TO:<b@example.test>\r\nBDAT 6\r\nHello\nBDAT 7 LAST\r\n world\n");
    c.s("250")
        .s("250")
        .s("250 2.0.0 6 octets")
        .s("250 2.0.0 Ok: queued");
    let m = &c.submitted[0];
    assert!(m.content.ends_with(b"Hello\n world\n"));
    assert_eq!(m.envelope.body_type, mailroom_core::BodyType::EightBitMime);

    // BDAT 0 LAST ends a message; DATA cannot follow BDAT.
    c.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<b@example.test>\r\nBDAT 3\r\nabcDATA\r\nBDAT 0 LAST\r\n");
    c.s("250")
        .s("250")
        .s("250 2.0.0 3 octets")
        .s("503 5.5.1")
        .s("250 2.0.0 Ok: queued");
    assert!(c.submitted[1].content.ends_with(b"abc"));
}

#[test]
fn bdat_without_transaction_skips_the_chunk() {
    let mut c = mx();
    c.ehlo();
    // The chunk looks like commands; it must not be run as such.
    c.send(b"BDAT 12\r\nQUIT\r\nQUIT\r\nNOOP\r\n");
    c.s("503 5.5.1").s("250 2.0.0");
    assert!(!c.closed);
    c.no_more_replies();
}

#[test]
fn bdat_over_the_limit_is_552() {
    let mut c = mx();
    c.ehlo();
    c.c("MAIL FROM:<a@remote.test>").s("250");
    c.c("RCPT TO:<b@example.test>").s("250");
    let mut chunk = b"BDAT 2000 LAST\r\n".to_vec();
    chunk.extend_from_slice(&[b'z'; 2000]);
    c.send(&chunk);
    c.s("552 5.3.4");
    c.c("NOOP").s("250");
    assert!(c.submitted.is_empty());
}

#[test]
fn mt_priority_is_kept() {
    let mut c = mx();
    c.ehlo();
    c.c("MAIL FROM:<a@remote.test> MT-PRIORITY=4").s("250");
    c.c("RCPT TO:<b@example.test>").s("250");
    c.c("DATA").s("354");
    c.c("x").c(".").s("250");
    assert_eq!(c.submitted[0].envelope.priority, 4);
}

#[test]
fn dsn_parameters_are_kept() {
    let mut c = mx();
    c.ehlo();
    c.c("MAIL FROM:<a@remote.test> RET=HDRS ENVID=QQ314159")
        .s("250");
    c.c("RCPT TO:<b@example.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b@example.test")
        .s("250");
    c.c("RCPT TO:<c@example.test> NOTIFY=NEVER").s("250");
    c.c("DATA").s("354");
    c.c("x").c(".").s("250");
    let e = &c.submitted[0].envelope;
    assert_eq!(e.ret, Some(Ret::Hdrs));
    assert_eq!(e.env_id.as_deref(), Some("QQ314159"));
    assert!(e.recipients[0].notify.contains(Notify::SUCCESS));
    assert!(e.recipients[0].notify.contains(Notify::DELAY));
    assert!(!e.recipients[0].notify.contains(Notify::FAILURE));
    assert_eq!(
        e.recipients[0].orcpt.as_deref(),
        Some("rfc822;b@example.test")
    );
    assert!(e.recipients[1].notify.contains(Notify::NEVER));
}

#[test]
fn relaying_needs_authentication() {
    let mut c = Client::implicit_tls(config(Role::Mx, TlsMode::Implicit));
    let ehlo = c.ehlo();
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN\r\n"));
    assert!(!ehlo.contains("STARTTLS"));
    c.c("MAIL FROM:<a@remote.test>").s("250");
    c.c("RCPT TO:<b@elsewhere.test>").s("554 5.7.1");
    c.c("RSET").s("250");
    c.c(&format!("AUTH PLAIN {}", plain_b64(USER, PASSWORD)))
        .s("235 2.7.0");
    c.c("MAIL FROM:<a@remote.test>").s("250");
    c.c("RCPT TO:<b@elsewhere.test>").s("250 2.1.5");
    c.c("DATA").s("354");
    c.c("hi").c(".").s("250");
    let m = &c.submitted[0];
    assert_eq!(m.origin.auth_user.as_deref(), Some(USER));
    let content = String::from_utf8_lossy(&m.content);
    assert!(content.contains("with ESMTPSA id"), "{content}");
    assert!(content.contains("(using TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256)"));
}

#[test]
fn relay_networks_may_relay_without_auth() {
    use mailroom_core::config::Cidr;
    // The test client is 192.0.2.7.
    let mut trusted = config(Role::Mx, TlsMode::None);
    trusted.relay_networks = vec![Cidr::parse("192.0.2.0/24").unwrap()];
    let mut c = Client::new(trusted);
    c.ehlo();
    c.c("MAIL FROM:<app@example.test>").s("250");
    c.c("RCPT TO:<someone@elsewhere.test>").s("250 2.1.5");

    let mut other = config(Role::Mx, TlsMode::None);
    other.relay_networks = vec![Cidr::parse("10.0.0.0/8").unwrap()];
    let mut c = Client::new(other);
    c.ehlo();
    c.c("MAIL FROM:<app@example.test>").s("250");
    c.c("RCPT TO:<someone@elsewhere.test>").s("554 5.7.1");

    // Submission still wants AUTH, whatever the network.
    let mut submission = config(Role::Submission, TlsMode::None);
    submission.relay_networks = vec![Cidr::parse("0.0.0.0/0").unwrap()];
    let mut c = Client::new(submission);
    c.ehlo();
    c.c("MAIL FROM:<app@example.test>").s("530 5.7.0");
}

#[test]
fn submission_requires_auth() {
    let mut c = Client::implicit_tls(config(Role::Submission, TlsMode::Implicit));
    c.ehlo();
    c.c("MAIL FROM:<a@remote.test>").s("530 5.7.0");
    c.c(&format!("AUTH PLAIN {}", plain_b64(USER, "wrong")))
        .s("535 5.7.8");
    c.c("AUTH LOGIN").s("334 VXNlcm5hbWU6");
    c.c(&b64(USER)).s("334 UGFzc3dvcmQ6");
    c.c(&b64(PASSWORD)).s("235 2.7.0");
    c.c("AUTH LOGIN").s("503 5.5.1");
    c.c("MAIL FROM:<a@remote.test>").s("250");
}

#[test]
fn auth_dialogues() {
    let mut c = Client::implicit_tls(config(Role::Submission, TlsMode::Implicit));
    c.ehlo();
    c.c("AUTH PLAIN").s("334");
    c.c("*").s("501 5.0.0");
    c.c("AUTH PLAIN").s("334");
    c.c("!!!not base64!!!").s("501 5.5.2");
    c.c("AUTH PLAIN ###").s("501 5.5.2");
    c.c("AUTH CRAM-MD5").s("504 5.5.4");
    c.c("AUTH FANCY").s("504 5.5.4");
    c.c(&format!("AUTH LOGIN {}", b64(USER)))
        .s("334 UGFzc3dvcmQ6");
    c.c("*").s("501 5.0.0");
    c.c("AUTH PLAIN").s("334");
    c.c(&plain_b64(USER, PASSWORD)).s("235 2.7.0");
}

#[test]
fn auth_needs_tls_unless_allowed() {
    let mut c = mx();
    c.ehlo();
    c.c(&format!("AUTH PLAIN {}", plain_b64(USER, PASSWORD)))
        .s("538 5.7.11");

    let mut insecure = config(Role::Mx, TlsMode::None);
    insecure.allow_insecure_auth = true;
    let mut c = Client::new(insecure);
    let ehlo = c.ehlo();
    assert!(ehlo.contains("AUTH PLAIN LOGIN"));
    assert!(!ehlo.contains("STARTTLS"));
    c.c("STARTTLS").s("502 5.5.1");
    c.c(&format!("AUTH PLAIN {}", plain_b64(USER, PASSWORD)))
        .s("235 2.7.0");
}

#[test]
fn starttls_discards_pipelined_plaintext() {
    let mut c = mx();
    c.ehlo();
    // CVE-2011-0411: a command injected after STARTTLS in the clear must not
    // be executed inside the TLS session.
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@remote.test>\r\n");
    c.s("220 2.0.0");
    c.no_more_replies();
    assert_eq!(
        c.discarded_at_tls,
        Some(b"MAIL FROM:<evil@remote.test>\r\n".len())
    );
    // The session starts over: EHLO again, and now AUTH is offered.
    c.c("MAIL FROM:<a@remote.test>").s("503 5.5.1");
    let ehlo = c.ehlo();
    assert!(ehlo.contains("AUTH PLAIN LOGIN"));
    assert!(!ehlo.contains("STARTTLS"));
    c.c("STARTTLS").s("503 5.5.1");
}

#[test]
fn too_many_errors_close_the_session() {
    let mut c = mx();
    for _ in 0..9 {
        c.c("FROB").s("500 5.5.1");
    }
    c.c("FROB").s("500 5.5.1").s("421 4.7.0");
    assert!(c.closed);
}

#[test]
fn greeting_and_shutdown_replies() {
    let mut c = mx();
    c.session.shutdown();
    c.take_output();
    c.s("421 4.3.2");
    assert!(c.session.is_closed());
    let mut c = mx();
    c.session.timeout();
    c.take_output();
    c.s("421 4.4.2");
}
