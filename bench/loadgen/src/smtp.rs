//! The client side of an SMTP conversation, as much as a load generator needs:
//! connect (optionally from a chosen source address), send lines, read
//! possibly multi-line replies with a bound on their size.
//!
//! Failures are [`Failure`]s: a step name and a short cause without
//! per-connection detail, so thousands of them can be counted by kind.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

/// RFC 5321 §4.5.3.1.5 allows 512 octets per reply line; leave room.
const MAX_REPLY_LINE: u64 = 2048;
/// More continuation lines than any EHLO reply needs.
const MAX_REPLY_LINES: usize = 64;

/// Why one step of one connection failed, grouped for counting.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Failure {
    pub step: &'static str,
    pub cause: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.cause)
    }
}

impl std::error::Error for Failure {}

impl Failure {
    pub fn new(step: &'static str, cause: impl Into<String>) -> Failure {
        Failure {
            step,
            cause: cause.into(),
        }
    }

    fn io(step: &'static str, e: &io::Error) -> Failure {
        // The kind, not the message: messages can carry addresses.
        Failure::new(step, format!("{:?}", e.kind()))
    }
}

/// One reply: its code and the text of its lines (without the code).
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// True when the line-oriented keyword (e.g. `PIPELINING`) is advertised
    /// in an EHLO reply.
    pub fn has_keyword(&self, keyword: &str) -> bool {
        self.lines.iter().skip(1).any(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
        })
    }
}

/// A client connection: a buffered reader over the socket (writes go
/// straight to the socket, so only reads are buffered).
pub struct Conn {
    io: BufReader<TcpStream>,
    limit: Duration,
}

impl Conn {
    /// Connects to `addr`, binding to `source` first when given, so that
    /// connections can come from many loopback addresses.
    pub async fn connect(
        addr: SocketAddr,
        source: Option<IpAddr>,
        limit: Duration,
    ) -> Result<Conn, Failure> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| Failure::io("socket", &e))?;
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| Failure::io("bind", &e))?;
        }
        let stream = match timeout(limit, socket.connect(addr)).await {
            Err(_) => return Err(Failure::new("connect", "timeout")),
            Ok(Err(e)) => return Err(Failure::io("connect", &e)),
            Ok(Ok(s)) => s,
        };
        // Small commands; waiting for the server's ACK would add latency.
        stream
            .set_nodelay(true)
            .map_err(|e| Failure::io("connect", &e))?;
        Ok(Conn {
            // Replies are short; a small buffer keeps 10,000 idle
            // connections cheap on the client side.
            io: BufReader::with_capacity(1024, stream),
            limit,
        })
    }

    /// Writes bytes as they are (a command line must end in CRLF).
    pub async fn send(&mut self, step: &'static str, bytes: &[u8]) -> Result<(), Failure> {
        match timeout(self.limit, self.io.get_mut().write_all(bytes)).await {
            Err(_) => Err(Failure::new(step, "write timeout")),
            Ok(Err(e)) => Err(Failure::io(step, &e)),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Reads one reply, all its lines.
    pub async fn reply(&mut self, step: &'static str) -> Result<Reply, Failure> {
        match timeout(self.limit, self.read_reply(step)).await {
            Err(_) => Err(Failure::new(step, "timeout")),
            Ok(r) => r,
        }
    }

    /// Reads one reply and checks its code.
    pub async fn expect(&mut self, step: &'static str, code: u16) -> Result<Reply, Failure> {
        let reply = self.reply(step).await?;
        if reply.code == code {
            Ok(reply)
        } else {
            Err(Failure::new(step, format!("reply {}", reply.code)))
        }
    }

    /// Sends a command line (CRLF added) and reads the reply, which must
    /// carry `code`.
    pub async fn command(
        &mut self,
        step: &'static str,
        line: &str,
        code: u16,
    ) -> Result<Reply, Failure> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.send(step, &bytes).await?;
        self.expect(step, code).await
    }

    async fn read_reply(&mut self, step: &'static str) -> Result<Reply, Failure> {
        let mut lines = Vec::new();
        let mut first = None;
        let mut line = Vec::with_capacity(128);
        loop {
            line.clear();
            let n = (&mut self.io)
                .take(MAX_REPLY_LINE)
                .read_until(b'\n', &mut line)
                .await
                .map_err(|e| Failure::io(step, &e))?;
            if n == 0 {
                return Err(Failure::new(step, "connection closed by server"));
            }
            if line.last() != Some(&b'\n') {
                return Err(Failure::new(step, "reply line too long or cut"));
            }
            let (code, last, text) =
                parse_line(&line).ok_or_else(|| Failure::new(step, "malformed reply line"))?;
            match first {
                None => first = Some(code),
                Some(f) if f != code => {
                    return Err(Failure::new(step, "reply code changed between lines"));
                }
                Some(_) => {}
            }
            lines.push(text);
            if last {
                return Ok(Reply { code, lines });
            }
            if lines.len() >= MAX_REPLY_LINES {
                return Err(Failure::new(step, "too many reply lines"));
            }
        }
    }
}

/// Splits `250-text\r\n` into (250, false, "text"); `250 text` is the last line.
fn parse_line(line: &[u8]) -> Option<(u16, bool, String)> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code = digits
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    let last = match line.get(3) {
        None | Some(b' ') => true,
        Some(b'-') => false,
        Some(_) => return None,
    };
    let text = line.get(4..).unwrap_or_default();
    Some((code, last, String::from_utf8_lossy(text).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines() {
        assert_eq!(
            parse_line(b"250-PIPELINING\r\n"),
            Some((250, false, "PIPELINING".into()))
        );
        assert_eq!(parse_line(b"220 hi\r\n"), Some((220, true, "hi".into())));
        assert_eq!(parse_line(b"250\r\n"), Some((250, true, String::new())));
        assert_eq!(parse_line(b"25x ok\r\n"), None);
        assert_eq!(parse_line(b"250+ok\r\n"), None);
        assert_eq!(parse_line(b"2\r\n"), None);
    }

    #[test]
    fn keywords() {
        let r = Reply {
            code: 250,
            lines: vec!["host".into(), "PIPELINING".into(), "SIZE 100".into()],
        };
        assert!(r.has_keyword("pipelining"));
        assert!(r.has_keyword("SIZE"));
        assert!(!r.has_keyword("host"));
    }
}
