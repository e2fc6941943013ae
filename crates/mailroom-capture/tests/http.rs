//! The JSON API, the Mailpit-compatible subset and the live event stream,
//! over a real socket, after real mail from smtplib.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use mailroom_capture::Capture;
use mailroom_core::config::CaptureConfig;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Response {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Response {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = headers[9..12].parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = input.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&input[..line_end]).unwrap().trim(), 16)
                .unwrap();
        if size == 0 {
            return out;
        }
        let start = line_end + 2;
        out.extend_from_slice(&input[start..start + size]);
        input = &input[start + size + 2..];
    }
}

async fn send(capture: &Capture, subject: &str) {
    let addr = capture.smtp_addr();
    let out = tokio::process::Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/send.py"))
        .args([
            addr.ip().to_string(),
            addr.port().to_string(),
            "PLAIN".into(),
            "user".into(),
            "pw".into(),
            subject.into(),
        ])
        .output()
        .await
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn start(data_dir: &Path) -> Capture {
    let config = CaptureConfig {
        data_dir: data_dir.to_owned(),
        smtp: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        ..CaptureConfig::default()
    };
    Capture::start("capture.test", &config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_lists_shows_searches_downloads_and_deletes() {
    let data = tempfile::tempdir().unwrap();
    let capture = start(data.path()).await;
    let http = capture.http_addr();
    send(&capture, "First invoice").await;
    send(&capture, "Second note").await;

    let list = request(http, "GET", "/api/messages", "").await.json();
    assert_eq!(list["total"], 2);
    assert_eq!(list["unread"], 2);
    assert_eq!(
        list["messages"][0]["subject"], "Second note",
        "newest first"
    );
    let id = list["messages"][1]["id"].as_str().unwrap().to_owned();

    let found = request(http, "GET", "/api/messages?query=subject:invoice", "")
        .await
        .json();
    assert_eq!(found["total"], 1);
    assert_eq!(found["messages"][0]["id"], id.as_str());
    let by_text = request(
        http,
        "GET",
        "/api/messages?query=fa%C3%A7ade%20from:juergen",
        "",
    )
    .await
    .json();
    assert_eq!(by_text["total"], 2);
    let by_to = request(http, "GET", "/api/messages?query=to:nobody", "")
        .await
        .json();
    assert_eq!(by_to["total"], 0);

    let detail = request(http, "GET", &format!("/api/messages/{id}"), "")
        .await
        .json();
    assert_eq!(detail["summary"]["subject"], "First invoice");
    assert_eq!(detail["authentication"]["username"], "user");
    assert!(detail["text"].as_str().unwrap().starts_with("Café crème"));
    assert_eq!(detail["attachments"][1]["filename"], "report.pdf");
    let unread = request(http, "GET", "/api/messages", "").await.json();
    assert_eq!(unread["unread"], 1, "opening a message marks it read");

    let pdf = request(http, "GET", &format!("/api/messages/{id}/parts/1"), "").await;
    assert_eq!(pdf.status, 200);
    assert!(pdf.body.starts_with(b"%PDF-1.4\n"));
    assert_eq!(pdf.body.len(), 9 + 256);
    assert!(
        pdf.headers
            .contains("attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"),
        "{}",
        pdf.headers
    );

    let logo = request(
        http,
        "GET",
        &format!("/api/messages/{id}/cid/logo@mailroom.test"),
        "",
    )
    .await;
    assert_eq!(logo.status, 200);
    assert!(logo.body.starts_with(b"\x89PNG"));

    let html = request(http, "GET", &format!("/api/messages/{id}/html"), "").await;
    let csp = html
        .headers
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("content-security-policy:")
        })
        .expect("a CSP");
    assert!(
        csp.contains("default-src 'none'") && !csp.contains("img-src *"),
        "{csp}"
    );
    let body = String::from_utf8(html.body).unwrap();
    assert!(
        body.contains(&format!(
            "src=\"/api/messages/{id}/cid/logo@mailroom.test\""
        )),
        "{body}"
    );
    let remote = request(
        http,
        "GET",
        &format!("/api/messages/{id}/html?remote=true"),
        "",
    )
    .await;
    assert!(remote.headers.contains("img-src * data:"));

    let raw = request(http, "GET", &format!("/api/messages/{id}/raw"), "").await;
    let raw = String::from_utf8(raw.body).unwrap();
    assert!(
        raw.starts_with("Received: from client.example.test"),
        "{raw}"
    );
    assert!(raw.contains("Subject: First invoice"));

    let read = request(
        http,
        "POST",
        &format!("/api/messages/{id}/read"),
        r#"{"read":false}"#,
    )
    .await;
    assert_eq!(read.status, 204);
    assert_eq!(
        request(http, "GET", "/api/messages", "").await.json()["unread"],
        2
    );

    assert_eq!(
        request(http, "DELETE", &format!("/api/messages/{id}"), "")
            .await
            .status,
        204
    );
    assert_eq!(
        request(http, "GET", &format!("/api/messages/{id}"), "")
            .await
            .status,
        404
    );
    assert_eq!(
        request(http, "GET", "/api/messages/not-an-id", "")
            .await
            .status,
        404
    );
    assert_eq!(
        request(http, "DELETE", "/api/messages", "").await.status,
        204
    );
    assert_eq!(
        request(http, "GET", "/api/messages", "").await.json()["total"],
        0
    );
    capture.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailpit_subset_uses_mailpits_paths_and_names() {
    let data = tempfile::tempdir().unwrap();
    let capture = start(data.path()).await;
    let http = capture.http_addr();
    send(&capture, "Mailpit ✓").await;

    let list = request(http, "GET", "/api/v1/messages", "").await.json();
    assert_eq!(list["total"], 1);
    assert_eq!(list["messages_count"], 1);
    let m = &list["messages"][0];
    for key in [
        "ID",
        "MessageID",
        "Read",
        "From",
        "To",
        "Cc",
        "Bcc",
        "ReplyTo",
        "Subject",
        "Created",
        "Tags",
        "Size",
        "Attachments",
        "Snippet",
    ] {
        assert!(m.get(key).is_some(), "summary lacks {key}: {m}");
    }
    assert_eq!(m["From"]["Address"], "juergen@example.test");
    assert_eq!(m["From"]["Name"], "Jürgen Müller");
    assert_eq!(m["To"][0]["Address"], "dev@example.test");
    assert_eq!(m["Subject"], "Mailpit ✓");
    assert_eq!(m["Attachments"], 2);
    let id = m["ID"].as_str().unwrap().to_owned();

    let one = request(http, "GET", &format!("/api/v1/message/{id}"), "")
        .await
        .json();
    assert_eq!(one["ID"], id.as_str());
    assert_eq!(one["Subject"], "Mailpit ✓");
    assert!(
        one["HTML"]
            .as_str()
            .unwrap()
            .contains("cid:logo@mailroom.test")
    );
    assert!(one["Text"].as_str().unwrap().starts_with("Café"));
    assert_eq!(one["Inline"][0]["ContentID"], "logo@mailroom.test");
    assert_eq!(one["Attachments"][0]["FileName"], "report.pdf");
    let part = one["Attachments"][0]["PartID"].as_str().unwrap();
    let pdf = request(
        http,
        "GET",
        &format!("/api/v1/message/{id}/part/{part}"),
        "",
    )
    .await;
    assert!(pdf.body.starts_with(b"%PDF"));

    let raw = request(http, "GET", &format!("/api/v1/message/{id}/raw"), "").await;
    assert!(String::from_utf8_lossy(&raw.body).contains("report.pdf"));

    let search = request(http, "GET", "/api/v1/search?query=subject%3Amailpit", "")
        .await
        .json();
    assert_eq!(search["messages_count"], 1);
    let none = request(http, "GET", "/api/v1/search?query=nothing-like-this", "")
        .await
        .json();
    assert_eq!(none["messages_count"], 0);

    let deleted = request(
        http,
        "DELETE",
        "/api/v1/messages",
        &format!(r#"{{"IDs":["{id}"]}}"#),
    )
    .await;
    assert_eq!(deleted.status, 200);
    assert_eq!(
        request(http, "GET", "/api/v1/messages", "").await.json()["total"],
        0
    );
    send(&capture, "again").await;
    assert_eq!(
        request(http, "DELETE", "/api/v1/messages", "").await.status,
        200
    );
    assert_eq!(
        request(http, "GET", "/api/v1/messages", "").await.json()["total"],
        0
    );
    capture.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_announces_new_mail() {
    let data = tempfile::tempdir().unwrap();
    let capture = start(data.path()).await;
    let mut stream = TcpStream::connect(capture.http_addr()).await.unwrap();
    stream
        .write_all(b"GET /api/events HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    // The subscription exists once the response head is out.
    loop {
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
    }
    send(&capture, "Live ✓").await;
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            line.clear();
            if reader.read_line(&mut line).await.unwrap() == 0 {
                return None;
            }
            if line.starts_with("data:") && line.contains("\"type\":\"new\"") {
                return Some(line.clone());
            }
        }
    })
    .await
    .expect("an event within 10s")
    .expect("the stream stays open");
    assert!(found.contains("Live ✓"), "{found}");
    capture.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_receives_the_event() {
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = CaptureConfig {
        data_dir: data.path().to_owned(),
        smtp: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        webhook: mailroom_core::config::CaptureWebhook {
            url: format!("http://{}/mail", hook.local_addr().unwrap()),
            ..Default::default()
        },
        ..CaptureConfig::default()
    };
    let capture = Capture::start("capture.test", &config).await.unwrap();
    send(&capture, "Hooked ✓").await;
    let (stream, _) = tokio::time::timeout(Duration::from_secs(10), hook.accept())
        .await
        .expect("the webhook is called")
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await.unwrap();
    assert_eq!(line, "POST /mail HTTP/1.1\r\n");
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.unwrap();
    reader
        .get_mut()
        .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        .await
        .unwrap();
    let event: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(event["event"], "EMAIL_RECEIVED");
    assert_eq!(event["message"]["subject"], "Hooked ✓");
    assert_eq!(event["authentication"]["mechanism"], "PLAIN");
    assert_eq!(event["attachments"][1]["filename"], "report.pdf");
    capture.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_cut_off_after_read_timeout() {
    let data = tempfile::tempdir().unwrap();
    let config = CaptureConfig {
        data_dir: data.path().to_owned(),
        smtp: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        read_timeout: Duration::from_millis(300),
        ..CaptureConfig::default()
    };
    let capture = Capture::start("capture.test", &config).await.unwrap();
    let stream = TcpStream::connect(capture.smtp_addr()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut greeting = String::new();
    reader.read_line(&mut greeting).await.unwrap();
    assert!(greeting.starts_with("220 "), "{greeting}");
    let mut rest = String::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_to_string(&mut rest))
        .await
        .expect("the server closes the connection")
        .unwrap();
    assert!(rest.starts_with("421 4.4.2 "), "{rest}");
    capture.shutdown(Duration::from_secs(5)).await;
}

/// The inbox is a file: a restarted server shows the same messages (read
/// flags included), searches them, and prunes to a lowered `max_messages`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_a_restart_and_retention_still_prunes() {
    let data = tempfile::tempdir().unwrap();
    let capture = start(data.path()).await;
    for subject in ["Alpha invoice", "Beta note", "Gamma invoice"] {
        send(&capture, subject).await;
    }
    let http = capture.http_addr();
    let list = request(http, "GET", "/api/messages", "").await.json();
    let beta = list["messages"][1]["id"].as_str().unwrap().to_owned();
    request(http, "GET", &format!("/api/messages/{beta}"), "").await;
    capture.shutdown(Duration::from_secs(5)).await;
    assert!(data.path().join("inbox.sqlite3").exists());

    let capture = start(data.path()).await;
    let http = capture.http_addr();
    let list = request(http, "GET", "/api/messages", "").await.json();
    assert_eq!(
        (list["total"].as_u64(), list["unread"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(
        list["messages"][0]["subject"], "Gamma invoice",
        "newest first"
    );
    assert_eq!(list["messages"][1]["read"], true);
    let found = request(http, "GET", "/api/messages?query=subject:invoice", "")
        .await
        .json();
    assert_eq!(found["total"], 2);
    let raw = request(http, "GET", &format!("/api/messages/{beta}/raw"), "").await;
    assert!(String::from_utf8_lossy(&raw.body).contains("Subject: Beta note"));
    capture.shutdown(Duration::from_secs(5)).await;

    let config = CaptureConfig {
        data_dir: data.path().to_owned(),
        smtp: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        max_messages: 2,
        ..CaptureConfig::default()
    };
    let capture = Capture::start("capture.test", &config).await.unwrap();
    assert_eq!(capture.inbox().len(), 2, "pruned to max_messages on start");
    send(&capture, "Delta").await;
    let list = request(capture.http_addr(), "GET", "/api/v1/messages", "")
        .await
        .json();
    let subjects: Vec<&str> = list["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["Subject"].as_str().unwrap())
        .collect();
    assert_eq!(subjects, ["Delta", "Gamma invoice"]);
    capture.shutdown(Duration::from_secs(5)).await;
}
