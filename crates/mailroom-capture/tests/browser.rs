//! The web UI in a real browser: headless Chromium driven through
//! chromedriver's W3C WebDriver API (plain HTTP, so no client library).
//! A message sent over SMTP must appear in the open page without a reload;
//! its HTML view must render inside the sandboxed iframe; the PDF
//! attachment must download with the bytes that were sent. The test saves
//! a screenshot to `$CARGO_TARGET_TMPDIR/capture-ui.png`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use mailroom_capture::Capture;
use mailroom_core::config::CaptureConfig;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn need(tool: &str, package: &str) {
    let found = |t: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !found(tool) {
        let _ = std::process::Command::new("apt-get")
            .args(["install", "-y", "-qq", package])
            .status();
    }
    assert!(
        found(tool),
        "{tool} is needed by this test and `apt-get install -y {package}` did not provide it"
    );
}

/// One WebDriver command; returns the response's `value`.
async fn wd(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Value {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = TcpStream::connect(addr).await.expect("chromedriver is up");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // chromedriver may keep the connection open: read the head, then
    // exactly Content-Length bytes.
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    let mut length = 0;
    loop {
        line.clear();
        if reader.read_line(&mut line).await.unwrap() == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.unwrap();
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    parsed["value"].clone()
}

struct Browser {
    driver: tokio::process::Child,
    addr: SocketAddr,
    session: String,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn start(downloads: &Path) -> Browser {
        need("chromium", "chromium");
        need("chromedriver", "chromium-driver");
        let mut driver = tokio::process::Command::new("chromedriver")
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
        let port = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(p) = line.split("started successfully on port ").nth(1) {
                    return p.trim_end_matches('.').trim().parse::<u16>().ok();
                }
            }
            None
        })
        .await
        .expect("chromedriver reports its port")
        .expect("a port number");
        // Keep draining its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"],
                "prefs": {
                    "download.default_directory": downloads.display().to_string(),
                    "download.prompt_for_download": false,
                }
            }
        }}});
        let value = wd(addr, "POST", "/session", Some(caps)).await;
        let session = value["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {value}"))
            .to_owned();
        Browser {
            driver,
            addr,
            session,
        }
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        wd(
            self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
        .await
    }

    async fn find(&self, css: &str) -> Option<String> {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().map(str::to_owned)
    }

    /// Waits (up to 15 s) for `css` to exist and its text to satisfy `ok`.
    async fn wait_text(&self, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(el) = self.find(css).await {
                let text = self.cmd("GET", &format!("/element/{el}/text"), None).await;
                if let Some(text) = text.as_str()
                    && ok(text)
                {
                    return text.to_owned();
                }
            }
            assert!(Instant::now() < deadline, "timed out waiting for {css}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&self, css: &str) {
        let el = self.find(css).await.unwrap_or_else(|| panic!("no {css}"));
        self.cmd("POST", &format!("/element/{el}/click"), Some(json!({})))
            .await;
    }

    async fn quit(mut self) {
        self.cmd("DELETE", "", None).await;
        let _ = self.driver.kill().await;
    }
}

async fn send(capture: &Capture, subject: &str) {
    let addr = capture.smtp_addr();
    let out = tokio::process::Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/send.py"))
        .args([
            addr.ip().to_string(),
            addr.port().to_string(),
            "NONE".into(),
            String::new(),
            String::new(),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_mail_appears_live_and_its_html_and_attachment_work() {
    need("python3", "python3");
    let downloads = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = CaptureConfig {
        data_dir: data.path().to_owned(),
        smtp: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        ..CaptureConfig::default()
    };
    let capture = Capture::start("capture.test", &config).await.unwrap();
    let browser = Browser::start(downloads.path()).await;
    browser
        .cmd(
            "POST",
            "/url",
            Some(json!({"url": format!("http://{}/", capture.http_addr())})),
        )
        .await;
    // The event stream is connected before the mail is sent.
    browser.wait_text("#status", |t| t == "live").await;
    browser
        .wait_text("#list", |t| t.contains("No messages"))
        .await;

    send(&capture, "Browser ✓ test").await;
    browser
        .wait_text("#list li .subject", |t| t == "Browser ✓ test")
        .await;

    browser.click("#list li").await;
    browser
        .wait_text("#detail h2", |t| t == "Browser ✓ test")
        .await;
    let frame = browser.find("#detail iframe").await.expect("the HTML view");
    browser
        .cmd("POST", "/frame", Some(json!({"id": {ELEMENT: frame}})))
        .await;
    let body = browser.wait_text("body", |t| t.contains("Hello")).await;
    assert_eq!(body.trim(), "Hello capture");
    let bold = browser.wait_text("b", |t| !t.is_empty()).await;
    assert_eq!(bold, "capture", "the HTML is rendered, not shown as text");
    // The inline image comes from the message by its Content-ID, through
    // the iframe's sandbox and Content-Security-Policy.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let width = browser
            .cmd(
                "POST",
                "/execute/sync",
                Some(json!({"script": "const i = document.images[0]; return i && i.complete ? i.naturalWidth : -1;", "args": []})),
            )
            .await;
        if width == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cid: image did not load: {width}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    browser.cmd("POST", "/frame/parent", Some(json!({}))).await;

    // "Load remote content" reloads the frame with the relaxed policy.
    browser.click("#detail .actions button:nth-child(3)").await;
    browser
        .wait_text("#detail .actions button:nth-child(3)", |t| {
            t == "Block remote content"
        })
        .await;
    let src = browser
        .cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": "return document.querySelector('#detail iframe').getAttribute('src');", "args": []})),
        )
        .await;
    assert!(
        src.as_str()
            .is_some_and(|s| s.ends_with("/html?remote=true")),
        "{src}"
    );

    let shot = browser.cmd("GET", "/screenshot", None).await;
    let png = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        shot.as_str().expect("a screenshot"),
    )
    .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("capture-ui.png");
    std::fs::write(&path, &png).unwrap();
    eprintln!("screenshot: {}", path.display());

    browser.click("button[data-tab=attachments]").await;
    browser
        .wait_text("#detail .pane", |t| t.contains("report.pdf"))
        .await;
    browser
        .click("#detail .pane a[download='report.pdf']")
        .await;
    let file = downloads.path().join("report.pdf");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !file.exists() {
        assert!(Instant::now() < deadline, "report.pdf was not downloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut expected = b"%PDF-1.4\n".to_vec();
    expected.extend(0..=255u8);
    // Chromium writes to a .crdownload file and renames it when done, so
    // the file is complete once it exists under its own name.
    assert_eq!(std::fs::read(&file).unwrap(), expected);

    browser.quit().await;
    capture.shutdown(Duration::from_secs(5)).await;
}
