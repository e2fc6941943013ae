//! Capture-mode transcripts: AUTH is accepted and recorded whatever the
//! credentials, any recipient is taken, and the intake's receipt can close
//! the session. Driven through the sans-I/O session, no sockets.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use mailroom_core::config::{Role, TlsMode};
use mailroom_core::{AuthAttempt, Receipt};
use mailroom_smtp::{Event, Session, SessionConfig};

fn config(role: Role) -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: "capture.test".into(),
        role,
        tls_mode: TlsMode::None,
        local_domains: Vec::new(),
        max_message_size: 10_000,
        max_recipients: 100,
        max_line_length: 1000,
        max_errors: 10,
        allow_insecure_auth: false,
        relay_networks: Vec::new(),
        policy: None,
    })
}

/// Feeds `input` and answers each submission with `receipt`; returns the
/// replies written and whether the session closed.
fn run(session: &mut Session, input: &str, receipt: Receipt) -> (String, usize) {
    let bytes = input.as_bytes();
    let mut pos = 0;
    let mut submitted = 0;
    while pos < bytes.len() && !session.is_closed() {
        let (used, event) = session.feed(&bytes[pos..]);
        pos += used;
        match event {
            None if used == 0 => break,
            None => {}
            Some(Event::Submit(message)) => {
                submitted += 1;
                session.accepted(message.id, receipt);
            }
            Some(Event::Authenticate { .. }) => panic!("capture mode never asks to check AUTH"),
            Some(Event::StartTls) => panic!("no STARTTLS here"),
            Some(Event::Close) => break,
        }
    }
    let out = String::from_utf8_lossy(session.output()).into_owned();
    session.clear_output();
    (out, submitted)
}

fn capture(role: Role) -> Session {
    Session::new_capture(config(role), "127.0.0.1".parse().unwrap(), None)
}

fn b64(s: &str) -> String {
    BASE64.encode(s)
}

#[test]
fn ehlo_offers_cram_md5_without_tls_in_capture_mode_only() {
    let mut s = capture(Role::Mx);
    let (out, _) = run(&mut s, "EHLO dev\r\n", Receipt::Continue);
    assert!(out.contains("250-AUTH PLAIN LOGIN CRAM-MD5\r\n"), "{out}");

    let mut normal = Session::new(config(Role::Mx), "127.0.0.1".parse().unwrap(), None);
    let (out, _) = run(
        &mut normal,
        "EHLO dev\r\nAUTH CRAM-MD5\r\n",
        Receipt::Continue,
    );
    assert!(!out.contains("CRAM-MD5"), "{out}");
    assert!(
        out.ends_with("504 5.5.4 Unrecognized authentication type\r\n"),
        "{out}"
    );
}

#[test]
fn auth_plain_is_accepted_and_recorded() {
    let mut s = capture(Role::Submission);
    let line = format!(
        "EHLO dev\r\nAUTH PLAIN {}\r\n",
        b64("\0alice\0wrong-but-fine")
    );
    let (out, _) = run(&mut s, &line, Receipt::Continue);
    assert!(
        out.ends_with("235 2.7.0 Authentication successful\r\n"),
        "{out}"
    );
    assert_eq!(
        s.auth_attempt(),
        Some(&AuthAttempt {
            mechanism: "PLAIN".into(),
            username: "alice".into(),
            password: "wrong-but-fine".into(),
        })
    );
}

#[test]
fn auth_login_is_accepted_and_recorded() {
    let mut s = capture(Role::Mx);
    let (out, _) = run(&mut s, "EHLO dev\r\nAUTH LOGIN\r\n", Receipt::Continue);
    assert!(out.ends_with("334 VXNlcm5hbWU6\r\n"), "{out}");
    let (out, _) = run(&mut s, &format!("{}\r\n", b64("bob")), Receipt::Continue);
    assert_eq!(out, "334 UGFzc3dvcmQ6\r\n");
    let (out, _) = run(
        &mut s,
        &format!("{}\r\n", b64("hunter2")),
        Receipt::Continue,
    );
    assert_eq!(out, "235 2.7.0 Authentication successful\r\n");
    let attempt = s.auth_attempt().unwrap();
    assert_eq!(
        (attempt.mechanism.as_str(), attempt.username.as_str()),
        ("LOGIN", "bob")
    );
    assert_eq!(attempt.password, "hunter2");
}

#[test]
fn auth_cram_md5_records_username_and_digest() {
    let mut s = capture(Role::Mx);
    let (out, _) = run(&mut s, "EHLO dev\r\nAUTH CRAM-MD5\r\n", Receipt::Continue);
    let challenge = out.rsplit("334 ").next().unwrap().trim_end();
    let challenge = String::from_utf8(BASE64.decode(challenge).unwrap()).unwrap();
    assert!(
        challenge.starts_with('<') && challenge.ends_with("@capture.test>"),
        "{challenge}"
    );
    let digest = "b913a602c7eda7a495b4e6e7334d3890";
    let (out, _) = run(
        &mut s,
        &format!("{}\r\n", b64(&format!("carol {digest}"))),
        Receipt::Continue,
    );
    assert_eq!(out, "235 2.7.0 Authentication successful\r\n");
    let attempt = s.auth_attempt().unwrap();
    assert_eq!(attempt.mechanism, "CRAM-MD5");
    assert_eq!(attempt.username, "carol");
    assert_eq!(attempt.password, digest);
}

#[test]
fn any_recipient_is_accepted_without_auth() {
    let mut s = capture(Role::Submission);
    let (out, submitted) = run(
        &mut s,
        "EHLO dev\r\nMAIL FROM:<a@app.test>\r\nRCPT TO:<x@anywhere.example>\r\nDATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\n",
        Receipt::Continue,
    );
    assert_eq!(submitted, 1);
    assert!(out.contains("250 2.1.5 Recipient ok\r\n"), "{out}");
    assert!(out.contains("250 2.0.0 Ok: queued as "), "{out}");
    assert!(!s.is_closed());
}

#[test]
fn a_close_receipt_answers_250_then_221_and_closes() {
    let mut s = capture(Role::Mx);
    let (out, submitted) = run(
        &mut s,
        "EHLO dev\r\nMAIL FROM:<a@app.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\nbody\r\n.\r\nNOOP\r\n",
        Receipt::Close,
    );
    assert_eq!(submitted, 1);
    assert!(s.is_closed());
    let tail: Vec<&str> = out.trim_end().rsplit("\r\n").take(2).collect();
    assert_eq!(tail[0], "221 2.0.0 Bye", "{out}");
    assert!(tail[1].starts_with("250 2.0.0 Ok: queued as "), "{out}");
}

#[test]
fn an_unlimited_size_is_advertised_as_size_0() {
    let mut config = (*config(Role::Mx)).clone();
    config.max_message_size = usize::MAX;
    let mut s = Session::new_capture(Arc::new(config), "127.0.0.1".parse().unwrap(), None);
    let (out, _) = run(&mut s, "EHLO dev\r\n", Receipt::Continue);
    assert!(out.contains("250-SIZE 0\r\n"), "{out}");
}
