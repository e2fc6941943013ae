//! Capture mode end to end: real SMTP clients (Python's smtplib, lettre)
//! send multipart mail to a capture server whose workers are the example
//! workers in `examples/workers/` (a Python jsonl worker, a PHP goridge
//! worker); each test checks the event the worker received, field by field,
//! against what was sent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use mailroom_capture::{Capture, CaptureEvent};
use mailroom_core::config::{AttachmentMode, CaptureConfig, WorkerCodec};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tool must be there: install it with apt-get if it is not, and fail
/// loudly if that does not work (a skipped test would prove nothing).
fn need(tool: &str, package: &str) {
    let found = |t: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if found(tool) {
        return;
    }
    let _ = std::process::Command::new("apt-get")
        .args(["install", "-y", "-qq", package])
        .status();
    assert!(
        found(tool),
        "{tool} is needed by this test and `apt-get install -y {package}` did not provide it"
    );
}

fn config(dir: &Path, codec: WorkerCodec, command: Vec<String>) -> CaptureConfig {
    let mut c = CaptureConfig {
        smtp: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        temp_dir: Some(dir.join("attachments")),
        data_dir: dir.join("inbox"),
        ..CaptureConfig::default()
    };
    c.workers.command = command;
    c.workers.codec = codec;
    c.workers.num_workers = 2;
    c.workers.exec_timeout = Duration::from_secs(20);
    c
}

fn python_worker(out: &Path) -> Vec<String> {
    need("python3", "python3");
    vec![
        "python3".into(),
        root()
            .join("examples/workers/jsonl_worker.py")
            .display()
            .to_string(),
        out.display().to_string(),
    ]
}

fn php_worker(out: &Path) -> Vec<String> {
    need("php", "php-cli");
    vec![
        "php".into(),
        root()
            .join("examples/workers/goridge_worker.php")
            .display()
            .to_string(),
        out.display().to_string(),
    ]
}

/// Runs tests/fixtures/send.py; returns its JSON report.
async fn smtplib(
    capture: &Capture,
    mechanism: &str,
    user: &str,
    password: &str,
    subject: &str,
    count: usize,
) -> Value {
    need("python3", "python3");
    let addr = capture.smtp_addr();
    let out = tokio::process::Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/send.py"))
        .args([
            addr.ip().to_string(),
            addr.port().to_string(),
            mechanism.into(),
            user.into(),
            password.into(),
            subject.into(),
            count.to_string(),
        ])
        .output()
        .await
        .expect("run send.py");
    assert!(
        out.status.success(),
        "send.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("send.py prints JSON")
}

fn events(path: &Path) -> Vec<CaptureEvent> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("an event per line"))
        .collect()
}

const PDF_HEAD: &[u8] = b"%PDF-1.4\n";
const SUBJECT: &str = "Grüße ✓ Rechnung";

fn pdf() -> Vec<u8> {
    let mut v = PDF_HEAD.to_vec();
    v.extend(0..=255u8);
    v
}

/// The 1x1 PNG send.py attaches.
fn png() -> Vec<u8> {
    BASE64
        .decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
        .unwrap()
}

fn attachment_bytes(a: &mailroom_capture::event::EventAttachment) -> Vec<u8> {
    match (&a.content, &a.path) {
        (Some(b64), _) => BASE64.decode(b64).expect("base64 content"),
        (None, Some(path)) => std::fs::read(path).expect("attachment file"),
        (None, None) => panic!("attachment without content or path"),
    }
}

/// The event for send.py's message, field by field.
fn check_smtplib_event(e: &CaptureEvent, subject: &str, auth: Option<(&str, &str, &str)>) {
    assert_eq!(e.event, "EMAIL_RECEIVED");
    assert_eq!(e.uuid.len(), 36);
    assert!(e.remote_addr.starts_with("127.0.0.1:"), "{}", e.remote_addr);
    assert!(e.received_at.ends_with('Z') && e.received_at.contains('T'));
    assert_eq!(e.envelope.from, "bounce@example.test");
    assert_eq!(e.envelope.to, ["dev@example.test", "ops@elsewhere.test"]);
    assert_eq!(e.envelope.helo, "client.example.test");
    match auth {
        Some((mechanism, user, password)) => {
            assert!(e.authentication.attempted);
            assert_eq!(e.authentication.mechanism.as_deref(), Some(mechanism));
            assert_eq!(e.authentication.username.as_deref(), Some(user));
            if mechanism == "CRAM-MD5" {
                let digest = e.authentication.password.as_deref().unwrap_or_default();
                assert_eq!(digest.len(), 32, "an HMAC-MD5 hex digest: {digest}");
                assert!(digest.chars().all(|c| c.is_ascii_hexdigit()));
            } else {
                assert_eq!(e.authentication.password.as_deref(), Some(password));
            }
        }
        None => assert!(!e.authentication.attempted),
    }
    let m = &e.message;
    assert_eq!(m.subject.as_deref(), Some(subject));
    assert_eq!(m.headers["Subject"], [subject]);
    assert_eq!(m.headers["From"], ["Jürgen Müller <juergen@example.test>"]);
    assert_eq!(
        m.headers["To"],
        ["Dev <dev@example.test>, ops@example.test"]
    );
    let text = m.text.as_deref().unwrap_or_default().replace("\r\n", "\n");
    assert_eq!(
        text,
        "Café crème, naïve façade: ISO-8859-1 and quoted-printable.\n"
    );
    let html = m.html.as_deref().unwrap_or_default().replace("\r\n", "\n");
    assert_eq!(
        html,
        "<p>Hello <b>capture</b> <img src=\"cid:logo@mailroom.test\"></p>\n"
    );
    assert!(m.raw.is_none(), "raw only with include_raw");
    assert_eq!(e.attachments.len(), 2, "{:?}", e.attachments);
    let logo = e
        .attachments
        .iter()
        .find(|a| a.content_id.is_some())
        .expect("the inline image");
    assert_eq!(logo.content_id.as_deref(), Some("logo@mailroom.test"));
    assert_eq!(logo.content_type, "image/png");
    assert_eq!(logo.filename.as_deref(), Some("logo.png"));
    assert_eq!(logo.size, png().len());
    assert_eq!(attachment_bytes(logo), png());
    let report = e
        .attachments
        .iter()
        .find(|a| a.filename.as_deref() == Some("report.pdf"))
        .expect("the PDF");
    assert_eq!(report.content_type, "application/pdf");
    assert_eq!(report.content_id, None);
    assert_eq!(report.size, pdf().len());
    assert_eq!(attachment_bytes(report), pdf());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_jsonl_worker_gets_the_smtplib_message_field_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    let capture = Capture::start(
        "capture.test",
        &config(dir.path(), WorkerCodec::Jsonl, python_worker(&out)),
    )
    .await
    .unwrap();
    for (mechanism, user, password) in [
        ("PLAIN", "alice", "pa ss:w0rd!"),
        ("LOGIN", "bob", "hunter2"),
        ("CRAM-MD5", "carol", "secret"),
    ] {
        let report = smtplib(&capture, mechanism, user, password, SUBJECT, 1).await;
        assert_eq!(report["auth"], 235, "{report}");
        assert_eq!(report["sent"], serde_json::json!([0]), "{report}");
        assert_eq!(report["open_after"], true, "{report}");
        let all = events(&out);
        let event = all.last().expect("the worker wrote the event");
        check_smtplib_event(event, SUBJECT, Some((mechanism, user, password)));
    }
    assert_eq!(events(&out).len(), 3);
    assert_eq!(capture.inbox().len(), 3);
    capture.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_goridge_worker_gets_the_smtplib_message_field_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    let capture = Capture::start(
        "capture.test",
        &config(dir.path(), WorkerCodec::Goridge, php_worker(&out)),
    )
    .await
    .unwrap();
    let report = smtplib(&capture, "CRAM-MD5", "dave", "pw", SUBJECT, 2).await;
    assert_eq!(report["sent"], serde_json::json!([0, 0]), "{report}");
    let all = events(&out);
    assert_eq!(all.len(), 2);
    for event in &all {
        check_smtplib_event(event, SUBJECT, Some(("CRAM-MD5", "dave", "")));
    }
    assert_ne!(all[0].uuid, all[1].uuid);
    capture.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_from_a_worker_ends_the_session_after_250() {
    let dir = tempfile::tempdir().unwrap();
    for codec in [WorkerCodec::Jsonl, WorkerCodec::Goridge] {
        let out = dir.path().join(format!("{codec:?}.jsonl"));
        let command = match codec {
            WorkerCodec::Jsonl => python_worker(&out),
            WorkerCodec::Goridge => php_worker(&out),
        };
        let capture = Capture::start("capture.test", &config(dir.path(), codec, command))
            .await
            .unwrap();
        let report = smtplib(&capture, "NONE", "", "", "Bye [close]", 2).await;
        // The first message gets 250, then 221 and the connection closes:
        // the second message never gets through.
        assert_eq!(
            report["sent"],
            serde_json::json!([0]),
            "{codec:?}: {report}"
        );
        assert_eq!(report["open_after"], false, "{codec:?}: {report}");
        assert_eq!(events(&out).len(), 1);
        capture.shutdown(Duration::from_secs(5)).await;
    }
}

/// A worker that SIGKILLs itself on the message whose subject says so.
const CRASHING_WORKER: &str = r#"
import os, sys, json
for line in sys.stdin:
    if "die" in (json.loads(line)["message"]["subject"] or ""):
        os.kill(os.getpid(), 9)
    sys.stdout.write("CONTINUE\n"); sys.stdout.flush()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_message_gives_451_then_the_next_message_succeeds() {
    need("python3", "python3");
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(
        dir.path(),
        WorkerCodec::Jsonl,
        vec!["python3".into(), "-c".into(), CRASHING_WORKER.into()],
    );
    c.workers.num_workers = 1;
    c.attachments = AttachmentMode::Tempfile;
    let capture = Capture::start("capture.test", &c).await.unwrap();
    let report = smtplib(&capture, "NONE", "", "", "please die", 1).await;
    let error = &report["errors"][0];
    assert_eq!(error[0], 451, "{report}");
    assert!(error[1].as_str().unwrap().starts_with("4.3.0"), "{report}");
    assert_eq!(capture.inbox().len(), 0, "a refused message is not kept");
    let left = std::fs::read_dir(dir.path().join("attachments"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "the refused message's attachment files are gone");
    let report = smtplib(&capture, "NONE", "", "", "fine", 1).await;
    assert_eq!(report["sent"], serde_json::json!([0]), "{report}");
    assert_eq!(capture.inbox().len(), 1);
    capture.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_over_exec_timeout_gives_451_and_is_replaced() {
    need("python3", "python3");
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import sys, json, time
for line in sys.stdin:
    if "slow" in (json.loads(line)["message"]["subject"] or ""):
        time.sleep(60)
    sys.stdout.write("CONTINUE\n"); sys.stdout.flush()
"#;
    let mut c = config(
        dir.path(),
        WorkerCodec::Jsonl,
        vec!["python3".into(), "-c".into(), script.into()],
    );
    c.workers.num_workers = 1;
    c.workers.exec_timeout = Duration::from_millis(500);
    let capture = Capture::start("capture.test", &c).await.unwrap();
    let report = smtplib(&capture, "NONE", "", "", "slow one", 1).await;
    assert_eq!(report["errors"][0][0], 451, "{report}");
    let report = smtplib(&capture, "NONE", "", "", "quick one", 1).await;
    assert_eq!(report["sent"], serde_json::json!([0]), "{report}");
    capture.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tempfile_attachments_are_paths_and_are_removed_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    let mut c = config(dir.path(), WorkerCodec::Jsonl, python_worker(&out));
    c.attachments = AttachmentMode::Tempfile;
    c.include_raw = true;
    let capture = Capture::start("capture.test", &c).await.unwrap();
    smtplib(&capture, "NONE", "", "", SUBJECT, 1).await;
    let event = events(&out).pop().expect("an event");
    let paths: Vec<PathBuf> = event
        .attachments
        .iter()
        .map(|a| {
            assert!(a.content.is_none());
            PathBuf::from(a.path.as_ref().expect("a path"))
        })
        .collect();
    assert_eq!(paths.len(), 2);
    for p in &paths {
        assert!(
            p.starts_with(dir.path().join("attachments")),
            "{}",
            p.display()
        );
        assert!(p.exists());
    }
    let raw = event.message.raw.as_deref().expect("include_raw");
    assert!(raw.contains("Content-Type: multipart/mixed"));
    capture.shutdown(Duration::from_secs(5)).await;
    for p in &paths {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lettre_multipart_with_auth_login_reaches_the_worker() {
    use lettre::message::header::ContentType;
    use lettre::message::{Attachment, MultiPart, SinglePart};
    use lettre::transport::smtp::authentication::{Credentials, Mechanism};
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    let capture = Capture::start(
        "capture.test",
        &config(dir.path(), WorkerCodec::Jsonl, python_worker(&out)),
    )
    .await
    .unwrap();
    let email = Message::builder()
        .from("Zoë <zoe@example.test>".parse().unwrap())
        .to("dev@example.test".parse().unwrap())
        .subject("Lettre ✓ über alles")
        .multipart(
            MultiPart::mixed()
                .multipart(
                    MultiPart::related()
                        .singlepart(SinglePart::html(
                            "<p>Hi <img src=\"cid:chart@lettre\"></p>".to_owned(),
                        ))
                        .singlepart(
                            Attachment::new_inline("chart@lettre".into())
                                .body(png(), "image/png".parse().unwrap()),
                        ),
                )
                .singlepart(
                    Attachment::new("invoice.pdf".into())
                        .body(pdf(), ContentType::parse("application/pdf").unwrap()),
                ),
        )
        .unwrap();
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(
        capture.smtp_addr().ip().to_string(),
    )
    .port(capture.smtp_addr().port())
    .credentials(Credentials::new("erin".into(), "letmein".into()))
    .authentication(vec![Mechanism::Login])
    .build();
    mailer.send(email).await.expect("lettre sends");

    let event = events(&out).pop().expect("an event");
    assert_eq!(event.envelope.from, "zoe@example.test");
    assert_eq!(event.envelope.to, ["dev@example.test"]);
    assert_eq!(event.authentication.mechanism.as_deref(), Some("LOGIN"));
    assert_eq!(event.authentication.username.as_deref(), Some("erin"));
    assert_eq!(event.authentication.password.as_deref(), Some("letmein"));
    assert_eq!(
        event.message.subject.as_deref(),
        Some("Lettre ✓ über alles")
    );
    assert_eq!(event.message.headers["From"], ["Zoë <zoe@example.test>"]);
    assert_eq!(
        event.message.html.as_deref().map(str::trim),
        Some("<p>Hi <img src=\"cid:chart@lettre\"></p>")
    );
    let chart = event
        .attachments
        .iter()
        .find(|a| a.content_id.as_deref() == Some("chart@lettre"))
        .expect("inline image with its Content-ID");
    assert_eq!(attachment_bytes(chart), png());
    let invoice = event
        .attachments
        .iter()
        .find(|a| a.filename.as_deref() == Some("invoice.pdf"))
        .expect("the PDF");
    assert_eq!(invoice.content_type, "application/pdf");
    assert_eq!(attachment_bytes(invoice), pdf());
    capture.shutdown(Duration::from_secs(5)).await;
}

/// One worker that takes 300 ms per message: parallel sessions queue up
/// behind it (each waits its turn and gets 250) rather than failing; with
/// an allocate_timeout shorter than the wait, the late ones get 451.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_workers_make_sessions_wait_not_fail() {
    need("python3", "python3");
    let script = r#"
import sys, time
for line in sys.stdin:
    time.sleep(0.3)
    sys.stdout.write("CONTINUE\n"); sys.stdout.flush()
"#;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(
        dir.path(),
        WorkerCodec::Jsonl,
        vec!["python3".into(), "-c".into(), script.into()],
    );
    c.workers.num_workers = 1;
    let capture = Capture::start("capture.test", &c).await.unwrap();
    let started = std::time::Instant::now();
    let subjects: Vec<String> = (0..3).map(|i| format!("wait {i}")).collect();
    let reports = futures_util::future::join_all(
        subjects
            .iter()
            .map(|s| smtplib(&capture, "NONE", "", "", s, 1)),
    )
    .await;
    for r in &reports {
        assert_eq!(r["sent"], serde_json::json!([0]), "{r}");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "one at a time"
    );
    capture.shutdown(Duration::from_secs(5)).await;

    // Now a worker that is busy for 3 s and says when it starts: a second
    // session arriving meanwhile waits allocate_timeout (100 ms), then 451.
    let busy = dir.path().join("busy");
    let script = r#"
import pathlib, sys, time
for line in sys.stdin:
    pathlib.Path(sys.argv[1]).write_text("busy")
    time.sleep(3)
    sys.stdout.write("CONTINUE\n"); sys.stdout.flush()
"#;
    c.workers.command = vec![
        "python3".into(),
        "-c".into(),
        script.into(),
        busy.display().to_string(),
    ];
    c.workers.allocate_timeout = Duration::from_millis(100);
    c.workers.exec_timeout = Duration::from_secs(20);
    let capture = Capture::start("capture.test", &c).await.unwrap();
    let first = smtplib(&capture, "NONE", "", "", "first", 1);
    let second = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !busy.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the worker never started"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        smtplib(&capture, "NONE", "", "", "second", 1).await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first["sent"], serde_json::json!([0]), "{first}");
    assert_eq!(second["errors"][0][0], 451, "{second}");
    capture.shutdown(Duration::from_secs(5)).await;
}

/// A worker that answers something other than CONTINUE or CLOSE: the
/// message was received, so the client gets 250 and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_reply_from_a_worker_still_gives_250() {
    need("python3", "python3");
    let script = r#"
import sys
for line in sys.stdin:
    sys.stdout.write("ERROR cannot handle this\n"); sys.stdout.flush()
"#;
    let dir = tempfile::tempdir().unwrap();
    let c = config(
        dir.path(),
        WorkerCodec::Jsonl,
        vec!["python3".into(), "-c".into(), script.into()],
    );
    let capture = Capture::start("capture.test", &c).await.unwrap();
    let report = smtplib(&capture, "NONE", "", "", "odd reply", 2).await;
    assert_eq!(report["sent"], serde_json::json!([0, 0]), "{report}");
    assert_eq!(report["open_after"], true, "{report}");
    assert_eq!(capture.inbox().len(), 2);
    capture.shutdown(Duration::from_secs(5)).await;
}

/// With max_jobs = 1 every message gets a fresh PHP worker: the spent one
/// is sent RoadRunner's stop frame and a new one does the pid handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goridge_workers_are_replaced_after_max_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    let mut c = config(dir.path(), WorkerCodec::Goridge, php_worker(&out));
    c.workers.num_workers = 1;
    c.workers.max_jobs = 1;
    let capture = Capture::start("capture.test", &c).await.unwrap();
    let report = smtplib(&capture, "NONE", "", "", SUBJECT, 3).await;
    assert_eq!(report["sent"], serde_json::json!([0, 0, 0]), "{report}");
    assert_eq!(events(&out).len(), 3);
    capture.shutdown(Duration::from_secs(5)).await;
}

/// A goridge worker (here a few lines of Python) that answers every
/// message with an ERROR frame: 250 all the same, and a log line.
const GORIDGE_ERROR_WORKER: &str = r#"
import json, os, struct, sys, zlib
inp, out = sys.stdin.buffer, sys.stdout.buffer
def read(n):
    b = b""
    while len(b) < n:
        c = inp.read(n - len(b))
        if not c: sys.exit(0)
        b += c
    return b
def send(flags, payload, options=()):
    head = bytes([0x10 | (3 + len(options)), flags]) + struct.pack("<I", len(payload))
    head += struct.pack("<I", zlib.crc32(head)) + b"\0\0"
    out.write(head + b"".join(struct.pack("<I", o) for o in options) + payload); out.flush()
while True:
    h = read(12)
    opts = read(((h[0] & 15) - 3) * 4)
    payload = read(struct.unpack("<I", h[2:6])[0])
    if h[1] & 1:
        if json.loads(payload).get("pid"): send(1, json.dumps({"pid": os.getpid()}).encode())
        else: sys.exit(0)
    else:
        send(0x40, b"cannot handle this message")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goridge_error_frame_still_gives_250() {
    need("python3", "python3");
    let dir = tempfile::tempdir().unwrap();
    let c = config(
        dir.path(),
        WorkerCodec::Goridge,
        vec!["python3".into(), "-c".into(), GORIDGE_ERROR_WORKER.into()],
    );
    let capture = Capture::start("capture.test", &c).await.unwrap();
    let report = smtplib(&capture, "NONE", "", "", "error frame", 2).await;
    assert_eq!(report["sent"], serde_json::json!([0, 0]), "{report}");
    assert_eq!(capture.inbox().len(), 2);
    capture.shutdown(Duration::from_secs(5)).await;
}
