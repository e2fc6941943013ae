//! Independent SMTP clients against the real binary over real sockets:
//! Python's smtplib, lettre, and a raw client. Every message is read back
//! from the store and compared byte for byte with what the client put on
//! the wire (after dot-unstuffing), behind exactly one `Received:` header
//! with the right RFC 3848 keyword.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::{
    LOCAL_DOMAIN, PASSWORD, Role, Server, Setup, Smtp, Tls, USER, assert_content,
    assert_tls_header, message, queued_id,
};
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Tls as LettreTls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use mailroom_core::BodyType;
use mailroom_store::{Store, StoredMessage};
use serde_json::json;

// ---------------------------------------------------------------------------
// Python smtplib
// ---------------------------------------------------------------------------

/// One smtplib conversation, driven by a JSON argument; prints the reply to
/// the end of data as JSON.
const SMTPLIB: &str = r#"
import json, smtplib, ssl, sys

cfg = json.loads(sys.argv[1])
raw = open(cfg["message"], "rb").read()
ctx = ssl._create_unverified_context()
host, port = "127.0.0.1", cfg["port"]
if cfg["tls"] == "implicit":
    s = smtplib.SMTP_SSL(host, port, local_hostname="client.test", context=ctx, timeout=20)
else:
    s = smtplib.SMTP(host, port, local_hostname="client.test", timeout=20)
code, _ = s.ehlo()
assert code == 250, code
if cfg["tls"] == "starttls":
    assert s.has_extn("starttls")
    code, resp = s.starttls(context=ctx)
    assert code == 220, (code, resp)
    s.ehlo()
if cfg.get("auth"):
    assert "PLAIN" in s.esmtp_features.get("auth", ""), s.esmtp_features
    s.user, s.password = cfg["user"], cfg["password"]
    mech = cfg["auth"]
    obj = s.auth_plain if mech == "PLAIN" else s.auth_login
    code, resp = s.auth(mech, obj, initial_response_ok=cfg.get("initial_response", True))
    assert code == 235, (code, resp)
code, resp = s.mail(cfg["from"], cfg.get("mail_options", []))
assert code == 250, (code, resp)
for rcpt in cfg["to"]:
    code, resp = s.rcpt(rcpt)
    assert code == 250, (rcpt, code, resp)
if cfg.get("bdat"):
    assert s.has_extn("chunking"), s.esmtp_features
    sizes = cfg["bdat"]
    pos = 0
    for i, n in enumerate(sizes):
        last = i == len(sizes) - 1
        chunk = raw[pos:] if last else raw[pos:pos + n]
        pos += n
        s.send(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk)
        code, resp = s.getreply()
        assert code == 250, (i, code, resp)
else:
    code, resp = s.data(raw)
    assert code == 250, (code, resp)
print(json.dumps({"code": code, "reply": resp.decode("utf-8", "replace")}))
s.quit()
"#;

/// Runs [`SMTPLIB`] with `raw` as the message; returns the queued id.
fn smtplib(server: &Server, raw: &[u8], mut cfg: serde_json::Value) -> String {
    let dir = server.dir();
    let path = dir.join(format!("message-{}.eml", rand_suffix()));
    std::fs::write(&path, raw).expect("write the message");
    cfg["message"] = json!(path.display().to_string());
    let out = common::python(dir, "smtplib_client.py", SMTPLIB, &[&cfg.to_string()]);
    let result: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON from python");
    assert_eq!(result["code"], 250, "{result}");
    queued_id(result["reply"].as_str().expect("reply text"))
}

fn rand_suffix() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// What smtplib puts between DATA and the final dot: the message, with a
/// CRLF appended when it does not end with one.
fn smtplib_data(raw: &[u8]) -> Vec<u8> {
    let mut data = raw.to_vec();
    if !data.ends_with(b"\r\n") {
        data.extend_from_slice(b"\r\n");
    }
    data
}

fn rcpt() -> String {
    format!("rcpt@{LOCAL_DOMAIN}")
}

fn assert_envelope(m: &StoredMessage, from: &str, to: &[&str]) {
    assert_eq!(
        m.envelope.reverse_path.as_ref().map(|a| a.as_str()),
        Some(from)
    );
    let stored: Vec<&str> = m
        .envelope
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(stored, to);
    assert_eq!(m.recipients.len(), to.len());
    assert_eq!(m.origin.protocol, "smtp");
    assert_eq!(m.origin.remote_ip, Some("127.0.0.1".parse().unwrap()));
}

fn assert_tls_origin(m: &StoredMessage) {
    let tls = m.origin.tls.as_deref().expect("origin records TLS");
    assert!(tls.starts_with("TLSv1.3 TLS13_"), "{tls}");
}

#[test]
fn smtplib_plain_on_mx() {
    let server = Setup::new().listener(Role::Mx, Tls::None).start();
    let raw = message("smtplib-plain", 3000);
    let id = smtplib(
        &server,
        &raw,
        json!({"port": server.port(0), "tls": "none", "from": "sender@client.test", "to": [rcpt()]}),
    );
    let m = server.message(&id);
    let header = assert_content(&m, &smtplib_data(&raw), "ESMTP");
    assert!(
        header.starts_with(
            "Received: from client.test ([127.0.0.1])\r\n\tby mx.test (mailroom) with ESMTP id "
        ),
        "{header}"
    );
    assert!(header.contains(&format!("\tfor <{}>;", rcpt())), "{header}");
    assert!(!header.contains("using"), "{header}");
    assert_envelope(&m, "sender@client.test", &[&rcpt()]);
    assert_eq!(m.origin.helo.as_deref(), Some("client.test"));
    assert_eq!(m.origin.tls, None);
    assert_eq!(m.origin.auth_user, None);
    assert_eq!(m.envelope.body_type, BodyType::SevenBit);
}

#[test]
fn smtplib_starttls() {
    let server = Setup::new().listener(Role::Mx, Tls::Starttls).start();
    let raw = message("smtplib-starttls", 2000);
    let id = smtplib(
        &server,
        &raw,
        json!({"port": server.port(0), "tls": "starttls", "from": "sender@client.test", "to": [rcpt()]}),
    );
    let m = server.message(&id);
    let header = assert_content(&m, &smtplib_data(&raw), "ESMTPS");
    assert_tls_header(&header);
    assert_tls_origin(&m);
    assert_eq!(m.origin.auth_user, None);
}

#[test]
fn smtplib_implicit_tls() {
    let server = Setup::new().listener(Role::Mx, Tls::Implicit).start();
    let raw = message("smtplib-implicit", 2000);
    let id = smtplib(
        &server,
        &raw,
        json!({"port": server.port(0), "tls": "implicit", "from": "sender@client.test", "to": [rcpt()]}),
    );
    let m = server.message(&id);
    let header = assert_content(&m, &smtplib_data(&raw), "ESMTPS");
    assert_tls_header(&header);
    assert_tls_origin(&m);
}

#[test]
fn smtplib_auth_plain_on_submission() {
    let server = Setup::new()
        .listener(Role::Submission, Tls::Starttls)
        .user()
        .start();
    let raw = message("smtplib-auth-plain", 2000);
    // Authenticated: a recipient outside local_domains is accepted.
    let id = smtplib(
        &server,
        &raw,
        json!({"port": server.port(0), "tls": "starttls", "auth": "PLAIN", "user": USER,
               "password": PASSWORD, "from": "app@client.test", "to": ["someone@elsewhere.test", rcpt()]}),
    );
    let m = server.message(&id);
    let header = assert_content(&m, &smtplib_data(&raw), "ESMTPSA");
    assert_tls_header(&header);
    // Several recipients: none is named in the trace header.
    assert!(!header.contains("for <"), "{header}");
    assert_envelope(&m, "app@client.test", &["someone@elsewhere.test", &rcpt()]);
    assert_eq!(m.origin.auth_user.as_deref(), Some(USER));
}

#[test]
fn smtplib_auth_login_on_implicit_tls() {
    let server = Setup::new()
        .listener(Role::Submission, Tls::Implicit)
        .user()
        .start();
    let raw = message("smtplib-auth-login", 2000);
    // No initial response: username and password each answer a 334.
    let id = smtplib(
        &server,
        &raw,
        json!({"port": server.port(0), "tls": "implicit", "auth": "LOGIN", "initial_response": false,
               "user": USER, "password": PASSWORD, "from": "app@client.test", "to": ["x@elsewhere.test"]}),
    );
    let m = server.message(&id);
    let header = assert_content(&m, &smtplib_data(&raw), "ESMTPSA");
    assert_tls_header(&header);
    assert_eq!(m.origin.auth_user.as_deref(), Some(USER));
}

#[test]
fn smtplib_auth_login_with_initial_response() {
    let server = Setup::new()
        .listener(Role::Submission, Tls::Starttls)
        .user()
        .start();
    let raw = message("smtplib-auth-login-ir", 500);
    let id = smtplib(
        &server,
        &raw,
        json!({"port": server.port(0), "tls": "starttls", "auth": "LOGIN", "initial_response": true,
               "user": USER, "password": PASSWORD, "from": "app@client.test", "to": ["x@elsewhere.test"]}),
    );
    let m = server.message(&id);
    assert_content(&m, &smtplib_data(&raw), "ESMTPSA");
    assert_eq!(m.origin.auth_user.as_deref(), Some(USER));
}

#[test]
fn smtplib_8bitmime() {
    let server = Setup::new().listener(Role::Mx, Tls::None).start();
    let mut raw = b"From: <sender@client.test>\r\nTo: <rcpt@example.test>\r\nSubject: 8bit\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n".to_vec();
    raw.extend_from_slice("Grüße, ça va? Ünïcödé — 日本語\r\n".as_bytes());
    // Every byte value but CR, LF and NUL, in lines of 64.
    let bytes: Vec<u8> = (1u8..=255).filter(|b| *b != b'\r' && *b != b'\n').collect();
    for line in bytes.chunks(64) {
        raw.extend_from_slice(line);
        raw.extend_from_slice(b"\r\n");
    }
    // No CRLF at the end: smtplib adds one.
    raw.extend_from_slice(b".last line \xff\xfe");
    let id = smtplib(
        &server,
        &raw,
        json!({"port": server.port(0), "tls": "none", "from": "sender@client.test", "to": [rcpt()],
               "mail_options": ["BODY=8BITMIME"]}),
    );
    let m = server.message(&id);
    let mut expected = raw.clone();
    expected.extend_from_slice(b"\r\n");
    assert_content(&m, &expected, "ESMTP");
    assert_eq!(m.envelope.body_type, BodyType::EightBitMime);
}

#[test]
fn smtplib_smtputf8() {
    let server = Setup::new().listener(Role::Mx, Tls::None).start();
    let from = "用户@例子.广告";
    let to = "josé@example.test";
    let raw = format!(
        "From: {from}\r\nTo: {to}\r\nSubject: Größe\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nÜnïcödé body\r\n.dot\r\n"
    )
    .into_bytes();
    let id = smtplib(
        &server,
        &raw,
        json!({"port": server.port(0), "tls": "none", "from": from, "to": [to],
               "mail_options": ["SMTPUTF8", "BODY=8BITMIME"]}),
    );
    let m = server.message(&id);
    let header = assert_content(&m, &raw, "UTF8SMTP");
    assert!(header.contains(&format!("for <{to}>")), "{header}");
    assert!(m.envelope.smtputf8);
    assert_envelope(&m, from, &[to]);
}

#[test]
fn smtplib_bdat_chunks() {
    let server = Setup::new().listener(Role::Mx, Tls::None).start();
    // BDAT carries the bytes as they are: no dot-stuffing, and a line
    // holding a single dot ends nothing.
    let mut raw = message("smtplib-bdat", 1500);
    raw.extend_from_slice(b".\r\n..two dots\r\nbare\nLF and bare\rCR\r\n");
    let id = smtplib(
        &server,
        &raw,
        json!({"port": server.port(0), "tls": "none", "from": "sender@client.test", "to": [rcpt()],
               "bdat": [777, 600, 0]}),
    );
    let m = server.message(&id);
    assert_content(&m, &raw, "ESMTP");
}

// ---------------------------------------------------------------------------
// Raw client
// ---------------------------------------------------------------------------

#[test]
fn raw_bdat_pipelined() {
    let server = Setup::new().listener(Role::Mx, Tls::None).start();
    let mut c = Smtp::connect(server.addr(0));
    let ehlo = c.ehlo();
    assert!(ehlo.has_line("CHUNKING") && ehlo.has_line("PIPELINING"));
    let first = b"Subject: bdat\r\n\r\n.a dot\r\nsplit in the mid";
    let second = b"dle of a line\r\n.\r\nend\r\n";
    let mut wire = format!("MAIL FROM:<a@client.test>\r\nRCPT TO:<{}>\r\n", rcpt()).into_bytes();
    wire.extend_from_slice(format!("BDAT {}\r\n", first.len()).as_bytes());
    wire.extend_from_slice(first);
    wire.extend_from_slice(format!("BDAT {} LAST\r\n", second.len()).as_bytes());
    wire.extend_from_slice(second);
    c.send(&wire);
    c.expect("250 2.1.0");
    c.expect("250 2.1.5");
    c.expect(&format!("250 2.0.0 {} octets received", first.len()));
    let id = c.expect("250 2.0.0 Ok: queued as ").queued_id();
    c.cmd("QUIT", "221 2.0.0");
    c.expect_closed();
    let m = server.message(&id);
    assert_content(&m, &[&first[..], &second[..]].concat(), "ESMTP");
}

#[test]
fn raw_helo_is_smtp_and_data_is_unstuffed() {
    let server = Setup::new().listener(Role::Mx, Tls::None).start();
    let mut c = Smtp::connect(server.addr(0));
    c.cmd("HELO old.client.test", "250 mx.test");
    let data = b"Subject: helo\r\n\r\n.\r\n..\r\n.x\r\n\r\n";
    let id = c.send_mail("", &[&rcpt()], data);
    let m = server.message(&id);
    let header = assert_content(&m, data, "SMTP");
    assert!(header.starts_with("Received: from old.client.test ([127.0.0.1])"));
    assert_eq!(m.envelope.reverse_path, None, "null reverse-path");
}

#[test]
fn raw_starttls_names_the_negotiated_cipher() {
    let server = Setup::new().listener(Role::Mx, Tls::Starttls).start();
    let mut c = Smtp::connect(server.addr(0));
    assert!(c.ehlo().has_line("STARTTLS"));
    c.cmd("STARTTLS", "220 2.0.0");
    let mut c = c.into_tls(&server);
    let (version, cipher) = c.tls_params();
    let ehlo = c.ehlo();
    assert!(
        !ehlo.has_line("STARTTLS"),
        "STARTTLS offered again over TLS"
    );
    c.cmd("STARTTLS", "503 5.5.1");
    let data = message("raw-starttls", 800);
    let id = c.send_mail("a@client.test", &[&rcpt()], &data);
    let m = server.message(&id);
    let header = assert_content(&m, &data, "ESMTPS");
    assert!(
        header.contains(&format!("\r\n\t(using {version} with cipher {cipher})\r\n")),
        "{header}"
    );
    assert_eq!(m.origin.tls, Some(format!("{version} {cipher}")));
}

// ---------------------------------------------------------------------------
// Relay rules
// ---------------------------------------------------------------------------

#[test]
fn mx_refuses_relay_for_unauthenticated_clients() {
    let server = Setup::new().listener(Role::Mx, Tls::None).start();
    let mut c = Smtp::connect(server.addr(0));
    let ehlo = c.ehlo();
    // No TLS and allow_insecure_auth = false: AUTH is not offered.
    assert!(
        !ehlo.lines.iter().any(|l| l.starts_with("AUTH")),
        "{ehlo:?}"
    );
    c.cmd("MAIL FROM:<a@client.test>", "250 2.1.0");
    c.cmd("RCPT TO:<victim@elsewhere.test>", "554 5.7.1");
    c.cmd("RCPT TO:<victim@EXAMPLE.TEST.elsewhere.test>", "554 5.7.1");
    c.cmd("DATA", "554 5.5.1");
    c.cmd("RCPT TO:<rcpt@EXAMPLE.test>", "250 2.1.5");
    c.cmd("DATA", "354");
    c.send(b"Subject: local\r\n\r\nhi\r\n.\r\n");
    let id = c.expect("250 2.0.0 Ok: queued as ").queued_id();
    let m = server.message(&id);
    assert_envelope(&m, "a@client.test", &["rcpt@EXAMPLE.test"]);
}

#[test]
fn submission_requires_auth_then_relays() {
    let server = Setup::new()
        .listener(Role::Submission, Tls::Starttls)
        .user()
        .start();
    let mut c = Smtp::connect(server.addr(0));
    let ehlo = c.ehlo();
    assert!(
        !ehlo.lines.iter().any(|l| l.starts_with("AUTH")),
        "{ehlo:?}"
    );
    c.cmd("MAIL FROM:<app@client.test>", "530 5.7.0");
    c.cmd("AUTH PLAIN AGFwcABzM2NyZXQ=", "538 5.7.11");
    c.cmd("STARTTLS", "220 2.0.0");
    let mut c = c.into_tls(&server);
    let ehlo = c.ehlo();
    assert!(ehlo.has_line("AUTH PLAIN LOGIN"), "{ehlo:?}");
    c.cmd("MAIL FROM:<app@client.test>", "530 5.7.0");
    c.cmd(&format!("AUTH PLAIN {}", plain(USER, "wrong")), "535 5.7.8");
    c.cmd(
        &format!("AUTH PLAIN {}", plain(USER, PASSWORD)),
        "235 2.7.0",
    );
    c.cmd(
        &format!("AUTH PLAIN {}", plain(USER, PASSWORD)),
        "503 5.5.1",
    );
    let data = message("submission", 600);
    let id = c.send_mail("app@client.test", &["far@elsewhere.test"], &data);
    let m = server.message(&id);
    let header = assert_content(&m, &data, "ESMTPSA");
    assert_tls_header(&header);
    assert_eq!(m.origin.auth_user.as_deref(), Some(USER));
    assert_envelope(&m, "app@client.test", &["far@elsewhere.test"]);
}

#[test]
fn mx_relays_after_auth() {
    let server = Setup::new()
        .listener(Role::Mx, Tls::Starttls)
        .user()
        .start();
    let mut c = Smtp::connect(server.addr(0));
    c.ehlo();
    c.cmd("STARTTLS", "220");
    let mut c = c.into_tls(&server);
    c.ehlo();
    c.cmd("MAIL FROM:<a@client.test>", "250");
    c.cmd("RCPT TO:<far@elsewhere.test>", "554 5.7.1");
    c.cmd("RSET", "250");
    c.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6");
    c.cmd(&b64(USER.as_bytes()), "334 UGFzc3dvcmQ6");
    c.cmd(&b64(PASSWORD.as_bytes()), "235 2.7.0");
    let data = message("mx-auth", 300);
    let id = c.send_mail("a@client.test", &["far@elsewhere.test"], &data);
    assert_content(&server.message(&id), &data, "ESMTPSA");
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn plain(user: &str, password: &str) -> String {
    b64(format!("\0{user}\0{password}").as_bytes())
}

// ---------------------------------------------------------------------------
// lettre
// ---------------------------------------------------------------------------

fn lettre_message(subject: &str) -> Message {
    Message::builder()
        .from("Sender <sender@client.test>".parse().unwrap())
        .to(format!("Rcpt <{}>", rcpt()).parse().unwrap())
        .subject(subject)
        .header(ContentType::TEXT_PLAIN)
        .body(format!(
            "Hello from lettre.\r\n.a line that starts with a dot\r\n{}\r\n",
            "x".repeat(70)
        ))
        .expect("build the message")
}

fn tls_params() -> TlsParameters {
    TlsParameters::builder("localhost".into())
        .dangerous_accept_invalid_certs(true)
        .build_rustls()
        .expect("TLS parameters")
}

fn transport(
    server: &Server,
    tls: LettreTls,
) -> lettre::transport::smtp::AsyncSmtpTransportBuilder {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(server.port(0))
        .hello_name(ClientId::Domain("client.test".into()))
        .tls(tls)
}

/// Sends through lettre and checks the stored copy; returns it.
async fn lettre_send(
    server: &Server,
    builder: lettre::transport::smtp::AsyncSmtpTransportBuilder,
    protocol: &str,
) -> StoredMessage {
    let transport: AsyncSmtpTransport<Tokio1Executor> = builder.build();
    let email = lettre_message(&format!("lettre {protocol}"));
    let response = transport.send(email.clone()).await.expect("lettre send");
    assert_eq!(u16::from(response.code()), 250);
    let text: Vec<&str> = response.message().collect();
    let id = queued_id(&text.join(" "));
    // lettre writes the formatted message, then CRLF.CRLF: the first CRLF
    // ends the last line of the data.
    let mut expected = email.formatted();
    expected.extend_from_slice(b"\r\n");
    let m = server.message(&id);
    let header = assert_content(&m, &expected, protocol);
    if protocol.starts_with("ESMTPS") {
        assert_tls_header(&header);
    }
    m
}

#[tokio::test]
async fn lettre_plain() {
    let server = Setup::new().listener(Role::Mx, Tls::None).start();
    let m = lettre_send(&server, transport(&server, LettreTls::None), "ESMTP").await;
    assert_eq!(m.origin.helo.as_deref(), Some("client.test"));
}

#[tokio::test]
async fn lettre_starttls() {
    let server = Setup::new().listener(Role::Mx, Tls::Starttls).start();
    let builder = transport(&server, LettreTls::Required(tls_params()));
    let m = lettre_send(&server, builder, "ESMTPS").await;
    assert_tls_origin(&m);
}

#[tokio::test]
async fn lettre_implicit_tls() {
    let server = Setup::new().listener(Role::Mx, Tls::Implicit).start();
    let builder = transport(&server, LettreTls::Wrapper(tls_params()));
    let m = lettre_send(&server, builder, "ESMTPS").await;
    assert_tls_origin(&m);
}

async fn lettre_auth(tls: Tls, mechanism: Mechanism) {
    let server = Setup::new().listener(Role::Submission, tls).user().start();
    let lettre_tls = match tls {
        Tls::Starttls => LettreTls::Required(tls_params()),
        Tls::Implicit => LettreTls::Wrapper(tls_params()),
        Tls::None => LettreTls::None,
    };
    let builder = transport(&server, lettre_tls)
        .credentials(Credentials::new(USER.into(), PASSWORD.into()))
        .authentication(vec![mechanism]);
    let m = lettre_send(&server, builder, "ESMTPSA").await;
    assert_eq!(m.origin.auth_user.as_deref(), Some(USER));
}

#[tokio::test]
async fn lettre_auth_plain_starttls() {
    lettre_auth(Tls::Starttls, Mechanism::Plain).await;
}

#[tokio::test]
async fn lettre_auth_login_starttls() {
    lettre_auth(Tls::Starttls, Mechanism::Login).await;
}

#[tokio::test]
async fn lettre_auth_plain_implicit_tls() {
    lettre_auth(Tls::Implicit, Mechanism::Plain).await;
}

#[tokio::test]
async fn lettre_auth_login_implicit_tls() {
    lettre_auth(Tls::Implicit, Mechanism::Login).await;
}

#[tokio::test]
async fn lettre_wrong_password_is_refused() {
    let server = Setup::new()
        .listener(Role::Submission, Tls::Starttls)
        .user()
        .start();
    let transport: AsyncSmtpTransport<Tokio1Executor> =
        transport(&server, LettreTls::Required(tls_params()))
            .credentials(Credentials::new(USER.into(), "nope".into()))
            .authentication(vec![Mechanism::Plain])
            .build();
    let err = transport
        .send(lettre_message("wrong"))
        .await
        .expect_err("bad credentials must fail");
    assert_eq!(err.status().map(u16::from), Some(535), "{err}");
    assert_eq!(
        server
            .store()
            .list(&Default::default())
            .expect("list")
            .len(),
        0
    );
}

#[tokio::test]
async fn lettre_insecure_auth_when_allowed_is_esmtpa() {
    let server = Setup::new()
        .listener(Role::Submission, Tls::None)
        .smtp("allow_insecure_auth = true")
        .user()
        .start();
    let builder = transport(&server, LettreTls::None)
        .credentials(Credentials::new(USER.into(), PASSWORD.into()))
        .authentication(vec![Mechanism::Plain]);
    let m = lettre_send(&server, builder, "ESMTPA").await;
    assert_eq!(m.origin.auth_user.as_deref(), Some(USER));
    assert_eq!(m.origin.tls, None);
}

#[test]
fn received_header_is_ascii_without_smtputf8() {
    let server = Setup::new().listener(Role::Mx, Tls::None).start();
    let mut c = Smtp::connect(server.addr(0));
    c.send("EHLO exämple.test\r\n".as_bytes());
    let reply = c.read_reply();
    if reply.code == 501 {
        // Refusing the name is a fine answer too.
        return;
    }
    assert_eq!(reply.code, 250, "{}", reply.text());
    let data = b"Subject: 7bit\r\n\r\nhi\r\n";
    let id = c.send_mail("a@client.test", &[&rcpt()], data);
    let m = server.message(&id);
    assert!(!m.envelope.smtputf8);
    let (header, _) = common::split_received(&m.content);
    assert!(
        header.is_ascii(),
        "8-bit trace header in a 7bit message:\n{header}"
    );
}

#[test]
fn raw_implicit_tls_with_a_verified_certificate() {
    // The client trusts exactly the generated certificate, issued for the
    // hostname and localhost.
    let server = Setup::new().listener(Role::Mx, Tls::Implicit).start();
    let mut c = Smtp::connect_tls(&server, 0);
    let (version, cipher) = c.tls_params();
    assert_eq!(version, "TLSv1.3");
    let ehlo = c.ehlo();
    assert!(!ehlo.has_line("STARTTLS"), "{ehlo:?}");
    let data = message("raw-implicit", 700);
    let id = c.send_mail("a@client.test", &[&rcpt()], &data);
    c.cmd("QUIT", "221");
    let header = assert_content(&server.message(&id), &data, "ESMTPS");
    assert!(
        header.contains(&format!("(using {version} with cipher {cipher})")),
        "{header}"
    );
}
