//! Webhook forwarding: each event is POSTed as JSON to a URL, with retries
//! and a log line for every event that could not be delivered.
//!
//! The HTTP client is `mailroom-delivery`'s (`http://` and `https://`,
//! rustls with the Mozilla roots, one request per connection). Sending
//! happens off the SMTP path through a bounded queue: a slow or dead
//! webhook never holds up a client, and when the queue is full the event is
//! logged as dropped instead of piling up in memory.

use std::time::Duration;

use mailroom_delivery::http;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Events waiting for the webhook.
const QUEUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("url {url:?} {reason}")]
    Url { url: String, reason: String },
}

/// Hands events to the background sender.
#[derive(Clone)]
pub struct Webhook {
    queue: mpsc::Sender<(String, Vec<u8>)>,
}

impl Webhook {
    /// Starts the sender task for `url`.
    pub fn start(url: &str, retries: u32, timeout: Duration) -> Result<Self, WebhookError> {
        http::parse_url(url).map_err(|reason| WebhookError::Url {
            url: url.to_owned(),
            reason,
        })?;
        let url = url.to_owned();
        let (queue, mut rx) = mpsc::channel::<(String, Vec<u8>)>(QUEUE);
        tokio::spawn(async move {
            while let Some((uuid, body)) = rx.recv().await {
                // Events are serde_json output, always UTF-8.
                let body = String::from_utf8_lossy(&body);
                let mut pause = Duration::from_millis(500);
                let mut attempt = 0;
                loop {
                    match post(&url, &body, timeout).await {
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

/// One POST; a 2xx answer is success, anything else is why not.
async fn post(url: &str, body: &str, timeout: Duration) -> Result<(), String> {
    match http::post_json(url, body, &[], timeout).await? {
        status @ 200..=299 => {
            debug!(status, "webhook answered");
            Ok(())
        }
        status => Err(format!("answered {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn urls() {
        let ok = |url: &str| Webhook::start(url, 0, Duration::from_secs(1)).is_ok();
        assert!(ok("http://127.0.0.1:9000/hook?x=1"));
        assert!(ok("https://hooks.example.test/mail"));
        assert!(!ok("ftp://x"));
        assert!(!ok("http://"));
        assert!(!ok("http://user:pw@x/"));
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
