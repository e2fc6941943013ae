//! The SMTP client over real sockets on 127.0.0.1: against our own server
//! (mailroom-smtp) for the ordinary paths, and against scripted fake
//! servers for what a real server rarely does (refusing EHLO, lacking
//! extensions, splitting replies, talking garbage, going silent).

mod client_support;
mod shared;

use std::time::{Duration, Instant};

use client_support::{
    Fake, LOCAL_DOMAIN, PASSWORD, ServerSetup, Step, TestServer, addr, after_received, envelope,
    options, rcpts, received_header, rewriting_proxy, timeouts, with_login,
};
use mailroom_core::config::{Role, TlsMode, TlsPolicy};
use mailroom_core::reply::Enhanced;
use mailroom_delivery::client::DataEncoder;
use mailroom_delivery::connection::{RecipientOutcome, SmtpConnection, Stage};

use Step::{C, Data, Group, Pause, S, Trickle};

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

fn local(user: &str) -> String {
    format!("{user}@{LOCAL_DOMAIN}")
}

// ---------------------------------------------------------------------------
// Against mailroom's own server
// ---------------------------------------------------------------------------

#[tokio::test]
async fn plain_delivery_to_several_recipients() {
    let server = TestServer::start(ServerSetup::default()).await;
    let mut conn = SmtpConnection::connect(server.addr, "localhost", &options(TlsPolicy::None))
        .await
        .unwrap();
    assert!(conn.capabilities().pipelining());
    assert!(conn.tls().is_none());
    assert_eq!(conn.server_name(), "localhost");
    assert_eq!(conn.peer(), server.addr);

    let from = addr("sender@sender.test");
    let to = rcpts(&[&local("a"), &local("b"), &local("c")]);
    // Lines that need dot-stuffing, a lone dot, and no final CRLF.
    let content = b"From: sender@sender.test\r\nSubject: dots\r\n\r\n.leading dot\r\n\
                    ..two dots\r\n.\r\nmiddle\r\n. \r\nlast line without CRLF";
    let outcomes = conn
        .send(&envelope(Some(&from), &to), content)
        .await
        .unwrap();
    assert_eq!(codes(&outcomes), [('D', 250), ('D', 250), ('D', 250)]);
    assert!(outcomes[0].reply().text.contains("queued as"));
    conn.quit().await;

    let messages = server.messages();
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    let got: Vec<&str> = message
        .envelope
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(got, [local("a"), local("b"), local("c")]);
    assert_eq!(message.envelope.reverse_path, Some(from));
    assert_eq!(message.origin.helo.as_deref(), Some("client.test"));
    let mut expected = content.to_vec();
    expected.extend_from_slice(b"\r\n");
    assert_eq!(
        String::from_utf8_lossy(after_received(&message.content)),
        String::from_utf8_lossy(&expected)
    );
}

#[tokio::test]
async fn large_message_crosses_write_blocks_intact() {
    let server = TestServer::start(ServerSetup::default()).await;
    let mut conn = SmtpConnection::connect(server.addr, "localhost", &options(TlsPolicy::None))
        .await
        .unwrap();
    let mut content = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0;
    while content.len() < 600 * 1024 {
        let line = if i % 3 == 0 {
            format!(".line {i} starts with a dot\r\n")
        } else {
            format!("line {i} {}\r\n", "x".repeat(i % 97))
        };
        content.extend_from_slice(line.as_bytes());
        i += 1;
    }
    let to = rcpts(&[&local("big")]);
    let outcomes = conn.send(&envelope(None, &to), &content).await.unwrap();
    assert_eq!(codes(&outcomes), [('D', 250)]);
    conn.quit().await;
    let messages = server.messages();
    assert!(after_received(&messages[0].content) == content.as_slice());
}

#[tokio::test]
async fn connection_reuse_with_reset() {
    let server = TestServer::start(ServerSetup::default()).await;
    let mut conn = SmtpConnection::connect(server.addr, "localhost", &options(TlsPolicy::None))
        .await
        .unwrap();
    for n in 0..5 {
        let to = rcpts(&[&local(&format!("user{n}"))]);
        let content = format!("Subject: message {n}\r\n\r\nbody {n}\r\n");
        let outcomes = conn
            .send(&envelope(None, &to), content.as_bytes())
            .await
            .unwrap();
        assert_eq!(codes(&outcomes), [('D', 250)], "message {n}");
        conn.reset().await.unwrap();
        assert!(conn.is_usable());
    }
    assert_eq!(conn.transactions(), 5);
    assert_eq!(server.sessions(), 1, "all five over one connection");
    conn.quit().await;
    server.wait_idle().await;

    let messages = server.messages();
    assert_eq!(messages.len(), 5);
    for (n, message) in messages.iter().enumerate() {
        let expected = format!("Subject: message {n}\r\n\r\nbody {n}\r\n");
        assert_eq!(after_received(&message.content), expected.as_bytes());
    }
}

#[tokio::test]
async fn starttls_opportunistic() {
    let server = TestServer::start(ServerSetup {
        tls: TlsMode::Starttls,
        ..ServerSetup::default()
    })
    .await;
    let mut conn =
        SmtpConnection::connect(server.addr, "localhost", &options(TlsPolicy::Opportunistic))
            .await
            .unwrap();
    let tls = conn.tls().expect("TLS was started").clone();
    assert_eq!(tls.version, "TLSv1.3");
    assert!(!tls.cipher.is_empty());
    assert!(
        !conn.capabilities().starttls(),
        "EHLO was said again over TLS"
    );

    let to = rcpts(&[&local("a")]);
    let outcomes = conn
        .send(&envelope(None, &to), b"Subject: tls\r\n\r\nhi\r\n")
        .await
        .unwrap();
    assert_eq!(codes(&outcomes), [('D', 250)]);
    conn.quit().await;
    let message = &server.messages()[0];
    assert!(received_header(&message.content).contains("with ESMTPS"));
    assert!(
        message
            .origin
            .tls
            .as_deref()
            .unwrap()
            .starts_with("TLSv1.3")
    );
}

#[tokio::test]
async fn tls_required_but_not_offered() {
    let server = TestServer::start(ServerSetup::default()).await;
    let err = SmtpConnection::connect(server.addr, "localhost", &options(TlsPolicy::Required))
        .await
        .unwrap_err();
    assert!(!err.is_permanent());
    assert_eq!(err.stage(), Stage::StartTls);
    assert_eq!(
        err.to_string(),
        "4.7.4 STARTTLS required but not offered by localhost"
    );
    // The client said QUIT and went.
    server.wait_idle().await;
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn tls_verify_checks_the_certificate() {
    let server = TestServer::start(ServerSetup {
        tls: TlsMode::Starttls,
        ..ServerSetup::default()
    })
    .await;
    let mut verify = options(TlsPolicy::Verify);
    verify.extra_roots = vec![server.cert.clone()];

    let conn = SmtpConnection::connect(server.addr, "localhost", &verify)
        .await
        .unwrap();
    assert!(conn.tls().is_some());
    conn.quit().await;

    let err = SmtpConnection::connect(server.addr, "wrong.test", &verify)
        .await
        .unwrap_err();
    assert!(!err.is_permanent());
    assert_eq!(err.stage(), Stage::StartTls);
    assert!(
        err.to_string()
            .contains("TLS handshake with wrong.test failed"),
        "{err}"
    );

    // Without the certificate among the trusted ones.
    let err = SmtpConnection::connect(server.addr, "localhost", &options(TlsPolicy::Verify))
        .await
        .unwrap_err();
    assert_eq!(err.stage(), Stage::StartTls);
    assert!(!err.is_permanent());
}

#[tokio::test]
async fn auth_plain_on_submission() {
    let server = TestServer::start(ServerSetup {
        role: Role::Submission,
        tls: TlsMode::Starttls,
        ..ServerSetup::default()
    })
    .await;
    let client = with_login(options(TlsPolicy::Required), PASSWORD);
    let mut conn = SmtpConnection::connect(server.addr, "localhost", &client)
        .await
        .unwrap();
    // Authenticated: relaying to another domain is allowed.
    let to = rcpts(&["someone@elsewhere.test"]);
    let from = addr("app@sender.test");
    let outcomes = conn
        .send(
            &envelope(Some(&from), &to),
            b"Subject: relayed\r\n\r\nhi\r\n",
        )
        .await
        .unwrap();
    assert_eq!(codes(&outcomes), [('D', 250)]);
    conn.quit().await;
    let message = &server.messages()[0];
    assert_eq!(message.origin.auth_user.as_deref(), Some("app"));
    assert!(received_header(&message.content).contains("with ESMTPSA"));
}

#[tokio::test]
async fn auth_login_when_plain_is_not_offered() {
    let server = TestServer::start(ServerSetup {
        role: Role::Submission,
        tls: TlsMode::None,
        allow_insecure_auth: true,
        ..ServerSetup::default()
    })
    .await;
    // Take PLAIN out of the offer on the way.
    let (proxy, said) = rewriting_proxy(server.addr, "AUTH PLAIN LOGIN", "AUTH LOGIN").await;
    // No TLS on this path, so credentials in the clear need `tls = none`.
    let client = with_login(options(TlsPolicy::None), PASSWORD);
    let mut conn = SmtpConnection::connect(proxy, "localhost", &client)
        .await
        .unwrap();
    let to = rcpts(&["someone@elsewhere.test"]);
    let outcomes = conn
        .send(&envelope(None, &to), b"Subject: login\r\n\r\nhi\r\n")
        .await
        .unwrap();
    assert_eq!(codes(&outcomes), [('D', 250)]);
    conn.quit().await;
    let said = String::from_utf8_lossy(&said.lock().unwrap()).into_owned();
    assert!(said.contains("AUTH LOGIN\r\n"), "{said}");
    assert!(!said.contains("AUTH PLAIN"), "{said}");
    assert_eq!(
        server.messages()[0].origin.auth_user.as_deref(),
        Some("app")
    );
}

#[tokio::test]
async fn wrong_password_is_permanent() {
    let server = TestServer::start(ServerSetup {
        role: Role::Submission,
        tls: TlsMode::Starttls,
        ..ServerSetup::default()
    })
    .await;
    let client = with_login(options(TlsPolicy::Opportunistic), "not the password");
    let err = SmtpConnection::connect(server.addr, "localhost", &client)
        .await
        .unwrap_err();
    assert!(err.is_permanent());
    assert_eq!(err.stage(), Stage::Auth);
    assert_eq!(err.reply().map(|r| r.code), Some(535));
    assert_eq!(err.enhanced(), Enhanced(5, 7, 8));
    assert!(!err.to_string().contains("not the password"));
    server.wait_idle().await;
}

#[tokio::test]
async fn relay_denied_for_one_recipient() {
    let server = TestServer::start(ServerSetup::default()).await;
    let mut conn = SmtpConnection::connect(server.addr, "localhost", &options(TlsPolicy::None))
        .await
        .unwrap();
    let to = rcpts(&[&local("here"), "there@elsewhere.test"]);
    let outcomes = conn
        .send(&envelope(None, &to), b"Subject: x\r\n\r\nx\r\n")
        .await
        .unwrap();
    assert_eq!(codes(&outcomes), [('D', 250), ('F', 554)]);
    assert_eq!(outcomes[1].reply().enhanced, Some(Enhanced(5, 7, 1)));
    conn.quit().await;
    let messages = server.messages();
    assert_eq!(messages[0].envelope.recipients.len(), 1);
    assert_eq!(
        messages[0].envelope.recipients[0].address.as_str(),
        local("here")
    );
}

#[tokio::test]
async fn too_many_recipients_are_deferred() {
    let server = TestServer::start(ServerSetup {
        max_recipients: 2,
        ..ServerSetup::default()
    })
    .await;
    let mut conn = SmtpConnection::connect(server.addr, "localhost", &options(TlsPolicy::None))
        .await
        .unwrap();
    let to = rcpts(&[&local("a"), &local("b"), &local("c"), &local("d")]);
    let outcomes = conn
        .send(&envelope(None, &to), b"Subject: x\r\n\r\nx\r\n")
        .await
        .unwrap();
    assert_eq!(
        codes(&outcomes),
        [('D', 250), ('D', 250), ('T', 452), ('T', 452)]
    );
    assert_eq!(outcomes[2].reply().enhanced, Some(Enhanced(4, 5, 3)));
    // The deferred ones go in a second transaction on the same connection.
    conn.reset().await.unwrap();
    let outcomes = conn
        .send(&envelope(None, &to[2..]), b"Subject: x\r\n\r\nx\r\n")
        .await
        .unwrap();
    assert_eq!(codes(&outcomes), [('D', 250), ('D', 250)]);
    conn.quit().await;
    assert_eq!(server.messages().len(), 2);
}

#[tokio::test]
async fn connection_refused_is_temporary() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = SmtpConnection::connect(addr, "gone.test", &options(TlsPolicy::None))
        .await
        .unwrap_err();
    assert!(!err.is_permanent());
    assert_eq!(err.stage(), Stage::Connect);
    assert!(
        err.to_string().contains("cannot connect to gone.test"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// Against scripted fake servers
// ---------------------------------------------------------------------------

const GREETING: Step = S("220 fake.test ESMTP\r\n");
const BYE: Step = S("221 bye\r\n");

#[tokio::test]
async fn pipelining_sends_one_group() {
    let fake = Fake::start(vec![
        GREETING,
        C,
        S("250-fake.test\r\n250 PIPELINING\r\n"),
        // A client that waited for each reply would stall here.
        Group(4),
        S("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n"),
        Data,
        S("250 queued\r\n"),
        C,
        BYE,
    ])
    .await;
    let mut conn = SmtpConnection::connect(fake.addr, "fake.test", &options(TlsPolicy::None))
        .await
        .unwrap();
    let from = addr("a@sender.test");
    let to = rcpts(&["x@fake.test", "y@fake.test"]);
    let outcomes = conn
        .send(&envelope(Some(&from), &to), b"hello\r\n")
        .await
        .unwrap();
    assert_eq!(codes(&outcomes), [('D', 250), ('D', 250)]);
    conn.quit().await;
    let t = fake.transcript().await;
    assert_eq!(t.group_reads, [1], "MAIL, RCPTs and DATA in one write");
    assert_eq!(
        t.lines,
        [
            "EHLO client.test",
            "MAIL FROM:<a@sender.test>",
            "RCPT TO:<x@fake.test>",
            "RCPT TO:<y@fake.test>",
            "DATA",
            "QUIT"
        ]
    );
    assert_eq!(t.data, [b"hello\r\n.\r\n".to_vec()]);
}

#[tokio::test]
async fn temporary_greeting_refusal() {
    let fake = Fake::start(vec![S("450 4.3.2 Too busy, try later\r\n"), C, BYE]).await;
    let err = SmtpConnection::connect(fake.addr, "fake.test", &options(TlsPolicy::None))
        .await
        .unwrap_err();
    assert!(!err.is_permanent());
    assert_eq!(err.stage(), Stage::Greeting);
    assert_eq!(err.reply().map(|r| r.code), Some(450));
    assert!(err.to_string().contains("fake.test"), "{err}");
    assert_eq!(fake.transcript().await.lines, ["QUIT"]);
}

#[tokio::test]
async fn helo_fallback_when_ehlo_is_refused() {
    let fake = Fake::start(vec![
        GREETING,
        C,
        S("502 5.5.1 Command not implemented\r\n"),
        C,
        S("250 fake.test\r\n"),
        C,
        S("250 ok\r\n"),
        C,
        S("250 ok\r\n"),
        C,
        S("354 go\r\n"),
        Data,
        S("250 queued\r\n"),
        C,
        BYE,
    ])
    .await;
    let mut conn =
        SmtpConnection::connect(fake.addr, "fake.test", &options(TlsPolicy::Opportunistic))
            .await
            .unwrap();
    assert!(!conn.capabilities().is_esmtp());
    let to = rcpts(&["x@fake.test"]);
    let content = b"Subject: old\r\n\r\n.dot\r\n";
    let outcomes = conn.send(&envelope(None, &to), content).await.unwrap();
    assert_eq!(codes(&outcomes), [('D', 250)]);
    conn.quit().await;
    let t = fake.transcript().await;
    assert_eq!(
        t.lines,
        [
            "EHLO client.test",
            "HELO client.test",
            "MAIL FROM:<>",
            "RCPT TO:<x@fake.test>",
            "DATA",
            "QUIT"
        ]
    );
    assert_eq!(t.data, [DataEncoder::encode_all(content)]);
    assert!(t.data[0].starts_with(b"Subject: old\r\n\r\n..dot\r\n"));
}

/// A server with only these extensions, which the client must refuse to
/// use for the message: nothing is said after EHLO but QUIT.
async fn refused_before_mail(
    extensions: &'static str,
    to: &[&str],
    content: &[u8],
) -> mailroom_delivery::connection::DeliveryError {
    let fake = Fake::start(vec![GREETING, C, S(extensions), C, BYE]).await;
    let mut conn = SmtpConnection::connect(fake.addr, "fake.test", &options(TlsPolicy::None))
        .await
        .unwrap();
    let to = rcpts(to);
    let err = conn.send(&envelope(None, &to), content).await.unwrap_err();
    assert!(conn.is_usable(), "nothing was sent; the connection is fine");
    conn.quit().await;
    assert_eq!(fake.transcript().await.lines, ["EHLO client.test", "QUIT"]);
    err
}

#[tokio::test]
async fn eight_bit_body_without_8bitmime() {
    let err = refused_before_mail(
        "250-fake.test\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n",
        &["x@fake.test"],
        "Subject: caf\u{e9}\r\n\r\nna\u{ef}ve\r\n".as_bytes(),
    )
    .await;
    assert!(err.is_permanent());
    assert_eq!(err.stage(), Stage::Policy);
    assert_eq!(err.enhanced(), Enhanced(5, 6, 3));
    assert_eq!(
        err.to_string(),
        "5.6.3 8-bit content not supported by the receiving server fake.test"
    );
}

#[tokio::test]
async fn utf8_address_without_smtputf8() {
    let err = refused_before_mail(
        "250-fake.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
        &["j\u{f6}rg@fake.test"],
        b"Subject: x\r\n\r\nx\r\n",
    )
    .await;
    assert!(err.is_permanent());
    assert_eq!(err.enhanced(), Enhanced(5, 6, 7));
    assert!(err.to_string().contains("SMTPUTF8"), "{err}");
}

#[tokio::test]
async fn message_over_the_advertised_size() {
    let err = refused_before_mail(
        "250-fake.test\r\n250-PIPELINING\r\n250 SIZE 100\r\n",
        &["x@fake.test"],
        &[b'a'; 200],
    )
    .await;
    assert!(err.is_permanent());
    assert_eq!(err.enhanced(), Enhanced(5, 3, 4));
}

#[tokio::test]
async fn closing_421_mid_session() {
    let fake = Fake::start(vec![
        GREETING,
        C,
        S("250 fake.test\r\n"),
        C,
        S("250 ok\r\n"),
        C,
        S("421 4.3.2 Shutting down\r\n"),
    ])
    .await;
    let mut conn = SmtpConnection::connect(fake.addr, "fake.test", &options(TlsPolicy::None))
        .await
        .unwrap();
    let to = rcpts(&["x@fake.test", "y@fake.test"]);
    let err = conn.send(&envelope(None, &to), b"x\r\n").await.unwrap_err();
    assert!(!err.is_permanent());
    assert_eq!(err.stage(), Stage::Rcpt);
    assert_eq!(err.reply().map(|r| r.code), Some(421));
    assert!(!conn.is_usable());
    conn.quit().await;
    let t = fake.transcript().await;
    assert_eq!(
        t.lines,
        ["EHLO client.test", "MAIL FROM:<>", "RCPT TO:<x@fake.test>"],
        "no QUIT to a server that said 421"
    );
}

#[tokio::test]
async fn replies_split_byte_by_byte() {
    let fake = Fake::start(vec![
        Trickle("220-fake.test ESMTP\r\n220 second line\r\n"),
        C,
        Trickle("250-fake.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"),
        Group(3),
        Trickle("250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n"),
        Data,
        Trickle("250-2.0.0 queued\r\n250 2.0.0 as 12345\r\n"),
        C,
        BYE,
    ])
    .await;
    let mut conn = SmtpConnection::connect(fake.addr, "fake.test", &options(TlsPolicy::None))
        .await
        .unwrap();
    assert!(conn.capabilities().eight_bit_mime());
    let to = rcpts(&["x@fake.test"]);
    let outcomes = conn
        .send(&envelope(None, &to), "8-bit: \u{e9}\r\n".as_bytes())
        .await
        .unwrap();
    assert_eq!(codes(&outcomes), [('D', 250)]);
    let reply = outcomes[0].reply();
    assert_eq!(reply.enhanced, Some(Enhanced(2, 0, 0)));
    assert_eq!(reply.text, "queued\nas 12345");
    conn.quit().await;
    let t = fake.transcript().await;
    assert_eq!(t.lines[1], "MAIL FROM:<> BODY=8BITMIME");
}

#[tokio::test]
async fn garbage_reply_is_temporary() {
    let fake = Fake::start(vec![
        GREETING,
        C,
        S("\u{0}\u{1} this is not SMTP at all\r\n"),
    ])
    .await;
    let err = SmtpConnection::connect(fake.addr, "fake.test", &options(TlsPolicy::None))
        .await
        .unwrap_err();
    assert!(!err.is_permanent());
    assert_eq!(err.stage(), Stage::Ehlo);
    assert!(
        err.to_string().contains("invalid response from fake.test"),
        "{err}"
    );
    assert_eq!(fake.transcript().await.lines, ["EHLO client.test"]);
}

#[tokio::test]
async fn silent_server_times_out() {
    let fake = Fake::start(vec![GREETING, C, Pause(Duration::from_secs(30))]).await;
    let mut client = options(TlsPolicy::None);
    client.timeouts = timeouts(Duration::from_millis(300));
    let started = Instant::now();
    let err = SmtpConnection::connect(fake.addr, "fake.test", &client)
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!err.is_permanent());
    assert_eq!(err.stage(), Stage::Timeout);
    assert!(
        err.to_string()
            .contains("waiting for the reply to EHLO/HELO from fake.test"),
        "{err}"
    );
}
