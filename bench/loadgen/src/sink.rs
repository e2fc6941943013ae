//! `sink`: a counting SMTP sink that measures delivery latency.
//!
//! It speaks just enough ESMTP for an MTA's client (greeting, EHLO with
//! PIPELINING, 8BITMIME and SIZE, HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT),
//! keeps nothing, and counts messages. Replies to pipelined commands are
//! buffered and written once the input buffer is empty.
//!
//! Each message may carry the headers that `mailroom-loadgen send --stamp`
//! writes: `X-Bench-Seq: <n>` (to count distinct messages and duplicates)
//! and `X-Bench-Sent: <unix nanoseconds>` (taken by the sender just before
//! it wrote the message content, i.e. before the intake server's `250`).
//! Latency is the time from that stamp to the final dot arriving here, so it
//! includes the intake server's commit (its fsync) as well as the relaying.
//!
//! With `--expect N` it reports once N distinct messages have arrived,
//! lingers a little (so the last `250`s reach the client and late duplicates
//! are counted), reports again and exits. SIGINT/SIGTERM report and exit.

use std::collections::HashSet;
use std::fs;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;

use crate::args::Args;

pub const USAGE: &str = "\
mailroom-loadgen sink --listen IP:PORT [options]
  --expect N          report and exit once N distinct stamped messages
                      arrived (0: run until SIGINT/SIGTERM; default 0)
  --linger DURATION   after N: keep serving this long, then exit (default 2s)
  --data-reply CODE   reply to the final dot with this code (default 250;
                      451 makes every delivery a temporary failure)
  --log FILE          one line per message: seq arrival_unix_ns sent_unix_ns
                      (-1 when a header is missing), written at exit
  --progress DURATION print a progress line this often (default: never)
  --hostname NAME     name in the greeting and EHLO reply (default sink.bench.test)
Prints `sink: listening on ADDR` when ready, then at the end one
`RESULT count=.. unique=.. duplicates=.. ... p99_ms=.. first_ns=.. last_ns=..` line.
Latency = arrival at the sink - X-Bench-Sent (the sender's clock just before
it sent the message content, so it includes the intake's commit).";

/// Longest line the sink reads (RFC 5321 allows 1000 octets; be lenient).
const MAX_LINE: u64 = 1 << 20;

#[derive(Default)]
struct Stats {
    /// Every completed DATA transaction.
    transactions: u64,
    connections: u64,
    max_tx_per_conn: u64,
    seen: HashSet<u64>,
    duplicates: u64,
    unstamped: u64,
    /// Nanoseconds from X-Bench-Sent to arrival, first arrival of each seq.
    latencies: Vec<i64>,
    first_ns: Option<i64>,
    last_ns: i64,
    /// (seq, arrival, sent) of each distinct message, for --log.
    log: Vec<(i64, i64, i64)>,
    keep_log: bool,
}

struct Shared {
    stats: Mutex<Stats>,
    expect: u64,
    done: Notify,
    data_reply: u16,
    hostname: String,
}

impl Shared {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

pub async fn run(mut args: Args) -> Result<bool> {
    let listen: SocketAddr = args.required("listen")?;
    let expect: u64 = args.get("expect", 0)?;
    let linger = args.duration("linger", Duration::from_secs(2))?;
    let data_reply: u16 = args.get("data-reply", 250)?;
    let log_path = args.optional("log");
    let progress = args.optional("progress");
    let hostname: String = args.get("hostname", "sink.bench.test".to_string())?;
    args.finish()?;
    if !(200..600).contains(&data_reply) {
        bail!("--data-reply must be an SMTP reply code");
    }
    let progress = progress
        .map(|p| crate::args::parse_duration(&p))
        .transpose()
        .context("--progress")?;

    let shared = Arc::new(Shared {
        stats: Mutex::new(Stats {
            keep_log: log_path.is_some(),
            ..Stats::default()
        }),
        expect,
        done: Notify::new(),
        data_reply,
        hostname,
    });
    let socket = match listen {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .context("socket")?;
    socket.set_reuseaddr(true).context("SO_REUSEADDR")?;
    socket
        .bind(listen)
        .with_context(|| format!("binding {listen}"))?;
    // A large backlog: an MTA opening 100 connections at once must not
    // overflow the accept queue (see bench/README.md, "Listen backlog").
    let listener = socket.listen(4096).context("listen")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    println!("sink: listening on {listen}, expecting {expect} messages");

    let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
    if let Some(every) = progress {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let s = shared.stats();
                eprintln!(
                    "sink: {} unique, {} transactions, {} connections",
                    s.seen.len(),
                    s.transactions,
                    s.connections
                );
            }
        });
    }

    let reached = async {
        if expect == 0 {
            std::future::pending::<()>().await;
        }
        shared.done.notified().await;
    };
    let mut signalled = false;
    tokio::select! {
        _ = reached => {
            report(&shared, "reached");
            tokio::select! {
                _ = tokio::time::sleep(linger) => {}
                _ = term.recv() => signalled = true,
                _ = int.recv() => signalled = true,
            }
        }
        _ = term.recv() => signalled = true,
        _ = int.recv() => signalled = true,
        joined = accept => {
            match joined {
                Ok(Err(e)) => return Err(e),
                _ => bail!("the accept loop ended"),
            }
        }
    }
    let ok = report(&shared, if signalled { "signal" } else { "final" });
    if let Some(path) = log_path {
        let s = shared.stats();
        let mut out =
            BufWriter::new(fs::File::create(&path).with_context(|| format!("creating {path}"))?);
        for (seq, arrival, sent) in &s.log {
            writeln!(out, "{seq} {arrival} {sent}")?;
        }
        out.flush()?;
    }
    Ok(ok)
}

/// Prints a summary and the RESULT line; true when --expect was met.
fn report(shared: &Shared, when: &str) -> bool {
    let s = shared.stats();
    let unique = s.seen.len() as u64;
    let mut lat = s.latencies.clone();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        let i = ((lat.len() as f64 * p).ceil() as usize).saturating_sub(1);
        lat.get(i).map_or(0.0, |ns| *ns as f64 / 1e6)
    };
    let first = s.first_ns.unwrap_or(0);
    let secs = (s.last_ns - first).max(0) as f64 / 1e9;
    let rate = if secs > 0.0 {
        s.transactions as f64 / secs
    } else {
        0.0
    };
    let per_conn = if s.connections > 0 {
        s.transactions as f64 / s.connections as f64
    } else {
        0.0
    };
    println!(
        "sink ({when}): {} messages ({unique} distinct, {} duplicates, {} unstamped) in {secs:.3} s \
         from first to last arrival = {rate:.0} msg/s; latency ms p50 {:.1} p90 {:.1} p99 {:.1} max {:.1}; \
         {} connections, {per_conn:.1} transactions per connection (max {})",
        s.transactions,
        s.duplicates,
        s.unstamped,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0),
        s.connections,
        s.max_tx_per_conn,
    );
    println!(
        "RESULT when={when} count={} unique={unique} duplicates={} unstamped={} secs={secs:.3} \
         msg_per_sec={rate:.1} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} max_ms={:.3} connections={} \
         tx_per_conn={per_conn:.2} max_tx_per_conn={} first_ns={first} last_ns={}",
        s.transactions,
        s.duplicates,
        s.unstamped,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0),
        s.connections,
        s.max_tx_per_conn,
        s.last_ns,
    );
    let _ = std::io::stdout().flush();
    shared.expect == 0 || unique >= shared.expect
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) -> Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("sink: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        shared.stats().connections += 1;
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            // A client that goes away mid-session is normal; the counts say
            // what was completed.
            let _ = session(stream, &shared).await;
        });
    }
}

/// What one message's headers said.
#[derive(Default)]
struct Stamp {
    seq: Option<u64>,
    sent_ns: Option<i64>,
}

async fn session(stream: TcpStream, shared: &Shared) -> Result<()> {
    let mut transactions = 0u64;
    stream.set_nodelay(true)?;
    let mut io = BufReader::with_capacity(64 * 1024, stream);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    out.extend_from_slice(format!("220 {} ESMTP loadgen sink\r\n", shared.hostname).as_bytes());
    io.get_mut().write_all(&out).await?;
    out.clear();
    let mut line = Vec::with_capacity(1024);
    let (mut have_mail, mut rcpts) = (false, 0u32);
    loop {
        line.clear();
        let n = (&mut io)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let verb: Vec<u8> = line
            .iter()
            .take_while(|b| b.is_ascii_alphabetic())
            .map(u8::to_ascii_uppercase)
            .collect();
        let mut quit = false;
        match verb.as_slice() {
            b"EHLO" => out.extend_from_slice(
                format!(
                    "250-{}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250 ENHANCEDSTATUSCODES\r\n",
                    shared.hostname
                )
                .as_bytes(),
            ),
            b"HELO" => out.extend_from_slice(format!("250 {}\r\n", shared.hostname).as_bytes()),
            b"MAIL" => {
                have_mail = true;
                rcpts = 0;
                out.extend_from_slice(b"250 2.1.0 Ok\r\n");
            }
            b"RCPT" if have_mail => {
                rcpts += 1;
                out.extend_from_slice(b"250 2.1.5 Ok\r\n");
            }
            b"RCPT" => out.extend_from_slice(b"503 5.5.1 MAIL first\r\n"),
            b"DATA" if rcpts > 0 => {
                out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                io.get_mut().write_all(&out).await?;
                out.clear();
                let stamp = read_data(&mut io, &mut line).await?;
                let arrival = now_ns();
                have_mail = false;
                rcpts = 0;
                transactions += 1;
                record(shared, stamp, arrival, transactions);
                let code = shared.data_reply;
                let text = if code == 250 {
                    "250 2.0.0 Ok: queued\r\n".to_string()
                } else {
                    format!("{code} {}.0.0 Sink says {code}\r\n", code / 100)
                };
                out.extend_from_slice(text.as_bytes());
            }
            b"DATA" => out.extend_from_slice(b"554 5.5.1 No valid recipients\r\n"),
            b"RSET" => {
                have_mail = false;
                rcpts = 0;
                out.extend_from_slice(b"250 2.0.0 Ok\r\n");
            }
            b"NOOP" => out.extend_from_slice(b"250 2.0.0 Ok\r\n"),
            b"QUIT" => {
                out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                quit = true;
            }
            _ => out.extend_from_slice(b"502 5.5.2 Command not recognized\r\n"),
        }
        // Pipelining: answer once everything the client sent is handled.
        if quit || io.buffer().is_empty() {
            io.get_mut().write_all(&out).await?;
            out.clear();
        }
        if quit {
            let _ = io.get_mut().shutdown().await;
            return Ok(());
        }
    }
}

/// Reads message content up to the final dot; returns the bench headers.
async fn read_data(io: &mut BufReader<TcpStream>, line: &mut Vec<u8>) -> Result<Stamp> {
    let mut stamp = Stamp::default();
    let mut in_header = true;
    loop {
        line.clear();
        let n = (&mut *io).take(MAX_LINE).read_until(b'\n', line).await?;
        if n == 0 {
            bail!("connection closed in DATA");
        }
        if line.as_slice() == b".\r\n" || line.as_slice() == b".\n" {
            return Ok(stamp);
        }
        if in_header {
            if line.as_slice() == b"\r\n" || line.as_slice() == b"\n" {
                in_header = false;
            } else if let Some(v) = header_value(line, b"x-bench-seq:") {
                stamp.seq = v.parse().ok();
            } else if let Some(v) = header_value(line, b"x-bench-sent:") {
                stamp.sent_ns = v.parse().ok();
            }
        }
    }
}

fn header_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a str> {
    let head = line.get(..name.len())?;
    if !head.eq_ignore_ascii_case(name) {
        return None;
    }
    std::str::from_utf8(&line[name.len()..]).ok().map(str::trim)
}

/// Counts one message; `on_conn`: transactions on its connection so far.
fn record(shared: &Shared, stamp: Stamp, arrival: i64, on_conn: u64) {
    let mut s = shared.stats();
    s.transactions += 1;
    s.max_tx_per_conn = s.max_tx_per_conn.max(on_conn);
    if s.first_ns.is_none() {
        s.first_ns = Some(arrival);
    }
    s.last_ns = arrival;
    let Some(seq) = stamp.seq else {
        s.unstamped += 1;
        return;
    };
    if !s.seen.insert(seq) {
        s.duplicates += 1;
        return;
    }
    if let Some(sent) = stamp.sent_ns {
        s.latencies.push(arrival - sent);
    }
    if s.keep_log {
        s.log
            .push((seq as i64, arrival, stamp.sent_ns.unwrap_or(-1)));
    }
    if shared.expect > 0 && s.seen.len() as u64 == shared.expect {
        shared.done.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values() {
        assert_eq!(
            header_value(b"X-Bench-Seq: 42\r\n", b"x-bench-seq:"),
            Some("42")
        );
        assert_eq!(
            header_value(b"x-bench-sent:17\r\n", b"x-bench-sent:"),
            Some("17")
        );
        assert_eq!(header_value(b"X-Bench: 1\r\n", b"x-bench-seq:"), None);
    }
}
