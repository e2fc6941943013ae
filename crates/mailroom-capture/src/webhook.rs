//! Webhook forwarding: each event is POSTed as JSON to a URL, with retries
//! and a log line for every event that could not be delivered.
//!
//! Capture mode talks to services on the developer's machine, so this is a
//! deliberately small HTTP/1.1 client for `http://` URLs. Sending happens
//! off the SMTP path through a bounded queue: a slow or dead webhook never
//! holds up a client, and when the queue is full the event is logged as
//! dropped instead of piling up in memory.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Events waiting for the webhook.
const QUEUE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// `host:port` to connect to.
    authority: String,
    host_header: String,
    path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("not an http:// URL: {0}")]
    Url(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("answered {0}")]
    Status(String),
}

/// Hands events to the background sender.
#[derive(Clone)]
pub struct Webhook {
    queue: mpsc::Sender<(String, Vec<u8>)>,
}

impl Webhook {
    /// Starts the sender task for `url`.
    pub fn start(url: &str, retries: u32, timeout: Duration) -> Result<Self, WebhookError> {
        let target = parse_url(url)?;
        let (queue, mut rx) = mpsc::channel::<(String, Vec<u8>)>(QUEUE);
        tokio::spawn(async move {
            while let Some((uuid, body)) = rx.recv().await {
                let mut pause = Duration::from_millis(500);
                let mut attempt = 0;
                loop {
                    match post(&target, &body, timeout).await {
                        Ok(()) => {
                            debug!(%uuid, "webhook delivered");
                            break;
                        }
                        Err(err) if attempt < retries => {
                            debug!(%uuid, error = %err, attempt, "webhook failed; retrying");
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_secs(30));
                            attempt += 1;
                        }
                        Err(err) => {
                            warn!(%uuid, error = %err, attempts = attempt + 1, "webhook gave up on event");
                            break;
                        }
                    }
                }
            }
        });
        Ok(Webhook { queue })
    }

    /// Queues an event; never waits.
    pub fn send(&self, uuid: String, body: Vec<u8>) {
        if let Err(err) = self.queue.try_send((uuid, body)) {
            let uuid = match err {
                mpsc::error::TrySendError::Full((uuid, _))
                | mpsc::error::TrySendError::Closed((uuid, _)) => uuid,
            };
            warn!(%uuid, "webhook queue full; event dropped");
        }
    }
}

fn parse_url(url: &str) -> Result<Target, WebhookError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| WebhookError::Url(url.into()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains(['@', ' ']) {
        return Err(WebhookError::Url(url.into()));
    }
    let connect = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok(Target {
        authority: connect,
        host_header: authority.to_owned(),
        path: path.to_owned(),
    })
}

async fn post(target: &Target, body: &[u8], timeout: Duration) -> Result<(), WebhookError> {
    let exchange = async {
        let mut stream = TcpStream::connect(&target.authority).await?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: mailroom-capture\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            target.path,
            target.host_header,
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.flush().await?;
        // The status line is all we need; a short read cap keeps a
        // misbehaving server from feeding us forever.
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        while !buf.contains(&b'\n') && buf.len() < 4096 {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&buf);
        let status = line.lines().next().unwrap_or_default().to_owned();
        match status.split_whitespace().nth(1) {
            Some(code) if code.starts_with('2') => Ok(()),
            _ => Err(WebhookError::Status(status)),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| WebhookError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn urls() {
        let t = parse_url("http://127.0.0.1:9000/hook?x=1").unwrap();
        assert_eq!(t.authority, "127.0.0.1:9000");
        assert_eq!(t.path, "/hook?x=1");
        let t = parse_url("http://localhost").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("localhost:80", "/")
        );
        assert!(parse_url("https://x").is_err());
        assert!(parse_url("http://").is_err());
    }

    /// A server that fails the first request and accepts the second sees
    /// the same body twice.
    #[tokio::test]
    async fn retries_until_accepted() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for status in ["500 Oops", "204 No Content"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    req.extend_from_slice(&buf[..n]);
                    if n == 0 || req.ends_with(b"{\"ok\":1}") {
                        break;
                    }
                }
                s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                tx.send(String::from_utf8_lossy(&req).into_owned())
                    .await
                    .unwrap();
            }
        });
        let hook = Webhook::start(&url, 3, Duration::from_secs(5)).unwrap();
        hook.send("u1".into(), br#"{"ok":1}"#.to_vec());
        for _ in 0..2 {
            let req = rx.recv().await.unwrap();
            assert!(req.starts_with("POST /events HTTP/1.1\r\n"), "{req}");
            assert!(req.contains("Content-Type: application/json\r\n"));
            assert!(req.ends_with(r#"{"ok":1}"#));
        }
    }
}
