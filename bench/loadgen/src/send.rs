//! `send`: a pipelining SMTP sender that reports throughput and latency.
//!
//! smtp-source does not pipeline and reports no latencies; this sends
//! `MAIL`, `RCPT` and `DATA` in one write when the server offers
//! PIPELINING (RFC 2920) and times each transaction from `MAIL` to the `250`
//! after the final dot: the time a client waits for mail to become durable.
//!
//! For the delivery benchmarks (`bench/relay.sh`) it can also spread the
//! recipients over many domains (`--to-domains`), log in (`--auth`, AUTH
//! PLAIN, which relaying through mailroom needs), and stamp each message with
//! `X-Bench-Seq` and `X-Bench-Sent` headers (`--stamp`) that
//! `mailroom-loadgen sink` reads at the far end. `X-Bench-Sent` is the
//! sender's clock (unix nanoseconds) just before it writes the content and
//! final dot, so the sink's latency includes the intake's commit; `--acks`
//! records when each `250` came back, for latency measured from the `250`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use tokio::task::JoinSet;

use crate::args::Args;
use crate::smtp::{Conn, Failure};

pub const USAGE: &str = "\
mailroom-loadgen send --addr HOST:PORT [options]
  --sessions N        concurrent sessions (default 10)
  --messages N        messages in all (default 1000)
  --size BYTES        body size, CRLFs included (default 1024)
  --reuse             send every message of a session over one connection
                      (default: one connection per message, like smtp-source)
  --no-pipelining     wait for each reply even when PIPELINING is offered
  --from ADDR         reverse-path (default from@bench.test)
  --to ADDR           forward-path (default to@bench.test)
  --to-domains N      instead of --to: message i goes to LOCAL@d{i mod N}.SUFFIX
  --to-suffix SUFFIX  with --to-domains (default bench.test)
  --to-local LOCAL    with --to-domains (default user)
  --auth USER:PASS    AUTH PLAIN after EHLO (the server must offer AUTH)
  --stamp             add X-Bench-Seq: i and X-Bench-Sent: <unix ns just
                      before the content is written> headers (for `sink`)
  --acks FILE         write `seq ack_unix_ns` per accepted message at the end
  --source IP         bind to this source address before connecting
  --timeout DURATION  limit for each connect and each reply (default 30s)
Exit status 0 only when every message got 250.";

/// A session gives up after this many failures in a row (a dead server
/// should end the run, not spin).
const MAX_FAILURES_IN_A_ROW: usize = 10;

struct Options {
    addr: SocketAddr,
    sessions: usize,
    messages: usize,
    reuse: bool,
    pipelining: bool,
    from: String,
    to: String,
    to_domains: usize,
    to_suffix: String,
    to_local: String,
    auth: Option<String>,
    stamp: bool,
    acks: Option<String>,
    source: Option<IpAddr>,
    timeout: Duration,
    /// The whole message when not stamping; else the headers after the
    /// per-message ones, the body and the final dot.
    body: Vec<u8>,
}

impl Options {
    fn from_args(mut args: Args) -> Result<Options> {
        let size: usize = args.get("size", 1024)?;
        let from: String = args.get("from", "from@bench.test".to_string())?;
        let to: String = args.get("to", "to@bench.test".to_string())?;
        let to_domains: usize = args.get("to-domains", 0)?;
        let to_suffix: String = args.get("to-suffix", "bench.test".to_string())?;
        let to_local: String = args.get("to-local", "user".to_string())?;
        let stamp = args.flag("stamp");
        let auth = args.optional("auth").map(|creds| {
            let (user, pass) = creds.split_once(':').unwrap_or((&creds, ""));
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"))
        });
        let o = Options {
            addr: args.required("addr")?,
            sessions: args.get("sessions", 10)?,
            messages: args.get("messages", 1000)?,
            reuse: args.flag("reuse"),
            pipelining: !args.flag("no-pipelining"),
            source: args
                .optional("source")
                .map(|s| s.parse::<Ipv4Addr>())
                .transpose()?
                .map(IpAddr::V4),
            timeout: args.duration("timeout", Duration::from_secs(30))?,
            body: if stamp || to_domains > 0 {
                message_tail(&from, size)
            } else {
                message(&from, &to, size)
            },
            from,
            to,
            to_domains,
            to_suffix,
            to_local,
            auth,
            stamp,
            acks: args.optional("acks"),
        };
        args.finish()?;
        if o.sessions == 0 {
            bail!("--sessions must be greater than 0");
        }
        Ok(o)
    }
}

/// Headers and `size` octets of body in 80-octet lines, then the final dot.
/// No line starts with '.', so no dot-stuffing is needed.
fn message(from: &str, to: &str, size: usize) -> Vec<u8> {
    let mut m = format!("To: <{to}>\r\n").into_bytes();
    m.extend_from_slice(&message_tail(from, size));
    m
}

/// [`message`] without the To header, which varies per message when
/// stamping or spreading over domains.
fn message_tail(from: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: <{from}>\r\nSubject: loadgen\r\n\
         Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n\
         Message-Id: <loadgen@loadgen.test>\r\n\r\n"
    )
    .into_bytes();
    let mut left = size;
    while left > 0 {
        let line = left.min(80);
        if line <= 2 {
            m.extend(std::iter::repeat_n(b'X', line));
            left = 0;
        } else {
            m.extend(std::iter::repeat_n(b'X', line - 2));
            m.extend_from_slice(b"\r\n");
            left -= line;
        }
    }
    if !m.ends_with(b"\r\n") {
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(b".\r\n");
    m
}

impl Options {
    /// The forward-path of message `seq`.
    fn rcpt(&self, seq: usize) -> String {
        if self.to_domains > 0 {
            format!(
                "{}@d{}.{}",
                self.to_local,
                seq % self.to_domains,
                self.to_suffix
            )
        } else {
            self.to.clone()
        }
    }
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    failures: BTreeMap<Failure, usize>,
    /// (seq, unix ns of the 250 after the final dot).
    acks: Vec<(usize, i64)>,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

pub async fn run(args: Args) -> Result<bool> {
    let o = Arc::new(Options::from_args(args)?);
    println!(
        "send: {} messages of {} octets{} to {} over {} sessions, {}, {}",
        o.messages,
        o.body.len(),
        if o.to_domains > 0 {
            format!(" for {} domains", o.to_domains)
        } else {
            String::new()
        },
        o.addr,
        o.sessions,
        if o.reuse {
            "connection reuse"
        } else {
            "one connection per message"
        },
        if o.pipelining {
            "pipelining when offered"
        } else {
            "no pipelining"
        },
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut sessions = JoinSet::new();
    for _ in 0..o.sessions {
        let (o, next) = (Arc::clone(&o), Arc::clone(&next));
        sessions.spawn(async move { session(&o, &next).await });
    }
    let mut all = Tally::default();
    while let Some(joined) = sessions.join_next().await {
        match joined {
            Ok(t) => {
                all.latencies.extend(t.latencies);
                all.acks.extend(t.acks);
                for (f, n) in t.failures {
                    *all.failures.entry(f).or_default() += n;
                }
            }
            Err(e) => {
                *all.failures
                    .entry(Failure::new("task", e.to_string()))
                    .or_default() += 1
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let sent = all.latencies.len();
    all.latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        let i = ((all.latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
        all.latencies
            .get(i)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "sent: {sent}/{} in {secs:.3} s = {:.0} msg/s; latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
        o.messages,
        sent as f64 / secs.max(1e-9),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0)
    );
    if !all.failures.is_empty() {
        println!("failures by kind:");
        for (f, n) in &all.failures {
            println!("  {n} x {f}");
        }
    }
    let first_ack = all.acks.iter().map(|a| a.1).min().unwrap_or(0);
    let last_ack = all.acks.iter().map(|a| a.1).max().unwrap_or(0);
    println!(
        "RESULT sent={sent} failed={} secs={secs:.3} msg_per_sec={:.1} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} max_ms={:.3} first_ack_ns={first_ack} last_ack_ns={last_ack}",
        o.messages - sent,
        sent as f64 / secs.max(1e-9),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0)
    );
    if let Some(path) = &o.acks {
        all.acks.sort_unstable();
        let mut out =
            BufWriter::new(fs::File::create(path).with_context(|| format!("creating {path}"))?);
        for (seq, at) in &all.acks {
            writeln!(out, "{seq} {at}")?;
        }
        out.flush()?;
    }
    Ok(sent == o.messages)
}

/// One session: takes message numbers until none are left.
async fn session(o: &Options, next: &AtomicUsize) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<(Conn, bool)> = None;
    let mut in_a_row = 0;
    loop {
        let seq = next.fetch_add(1, Ordering::Relaxed);
        if seq >= o.messages {
            break;
        }
        let result = async {
            let (c, pipelining) = match conn.take() {
                Some(open) => open,
                None => open(o).await?,
            };
            let mut c = c;
            let latency = transaction(o, &mut c, pipelining, seq).await?;
            if o.reuse {
                conn = Some((c, pipelining));
            } else {
                c.command("quit", "QUIT", 221).await?;
            }
            Ok::<_, Failure>(latency)
        }
        .await;
        match result {
            Ok(latency) => {
                tally.latencies.push(latency);
                tally.acks.push((seq, now_ns()));
                in_a_row = 0;
            }
            Err(f) => {
                *tally.failures.entry(f).or_default() += 1;
                in_a_row += 1;
                if in_a_row >= MAX_FAILURES_IN_A_ROW {
                    let f = Failure::new("session", "gave up after 10 failures in a row");
                    *tally.failures.entry(f).or_default() += 1;
                    break;
                }
            }
        }
    }
    if let Some((mut c, _)) = conn {
        // The messages are counted already; a failed QUIT changes nothing.
        let _ = c.command("quit", "QUIT", 221).await;
    }
    tally
}

async fn open(o: &Options) -> Result<(Conn, bool), Failure> {
    let mut c = Conn::connect(o.addr, o.source, o.timeout).await?;
    c.expect("greeting", 220).await?;
    let ehlo = c.command("ehlo", "EHLO loadgen.test", 250).await?;
    if let Some(token) = &o.auth {
        if !ehlo.has_keyword("AUTH") {
            return Err(Failure::new("auth", "AUTH not offered"));
        }
        c.command("auth", &format!("AUTH PLAIN {token}"), 235)
            .await?;
    }
    Ok((c, o.pipelining && ehlo.has_keyword("PIPELINING")))
}

/// MAIL, RCPT, DATA, body; returns the time from MAIL to the final 250.
async fn transaction(
    o: &Options,
    c: &mut Conn,
    pipelining: bool,
    seq: usize,
) -> Result<Duration, Failure> {
    let started = Instant::now();
    let to = o.rcpt(seq);
    let mail = format!("MAIL FROM:<{}>\r\n", o.from);
    let rcpt = format!("RCPT TO:<{to}>\r\n");
    if pipelining {
        c.send("mail", format!("{mail}{rcpt}DATA\r\n").as_bytes())
            .await?;
        c.expect("mail", 250).await?;
        c.expect("rcpt", 250).await?;
        c.expect("data", 354).await?;
    } else {
        c.send("mail", mail.as_bytes()).await?;
        c.expect("mail", 250).await?;
        c.send("rcpt", rcpt.as_bytes()).await?;
        c.expect("rcpt", 250).await?;
        c.command("data", "DATA", 354).await?;
    }
    if o.stamp || o.to_domains > 0 {
        let mut content = Vec::with_capacity(o.body.len() + 128);
        if o.stamp {
            content.extend_from_slice(
                format!("X-Bench-Seq: {seq}\r\nX-Bench-Sent: {}\r\n", now_ns()).as_bytes(),
            );
        }
        content.extend_from_slice(format!("To: <{to}>\r\n").as_bytes());
        content.extend_from_slice(&o.body);
        c.send("body", &content).await?;
    } else {
        c.send("body", &o.body).await?;
    }
    c.expect("end of data", 250).await?;
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_size_and_shape() {
        for size in [0, 1, 2, 3, 79, 80, 81, 1024, 102_400] {
            let m = message("a@b", "c@d", size);
            let text = String::from_utf8(m).expect("ascii");
            let (_, body) = text.split_once("\r\n\r\n").expect("header end");
            let body = body.strip_suffix(".\r\n").expect("final dot");
            assert!(
                body.len() >= size && body.len() <= size + 2,
                "{size}: {}",
                body.len()
            );
            assert!(body.lines().all(|l| !l.starts_with('.') && l.len() <= 80));
        }
    }
}
