//! `idle`: open many SMTP sessions, leave them idle, then check that every
//! one still answers.
//!
//! Each connection reads the greeting and sends `EHLO`, then does nothing
//! for the hold time. Afterwards every connection sends `NOOP` (all must get
//! `250`) and `QUIT`. Connections are spread over several loopback source
//! addresses so that neither a per-IP limit nor the ephemeral port range is
//! what is being measured.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::args::Args;
use crate::smtp::{Conn, Failure};

pub const USAGE: &str = "\
mailroom-loadgen idle --addr HOST:PORT [options]
  --connections N     sessions to open (default 10000)
  --hold DURATION     how long to keep them idle once all are open (default 10s)
  --sources N         spread over 127.0.0.1 .. 127.0.0.N (default 50; 0 = no bind)
  --first-source IP   first source address (default 127.0.0.1)
  --concurrency N     connection attempts in flight at once (default 100: stay
                      under a listen backlog of 128, see README)
  --timeout DURATION  limit for each connect and each reply (default 30s)
  --ehlo NAME         EHLO argument (default loadgen.test)
  --ready-file PATH   created once all connections are open (for samplers)
Exit status 0 only when all N opened and all N answered NOOP with 250.";

struct Options {
    addr: SocketAddr,
    connections: usize,
    hold: Duration,
    sources: u32,
    first_source: Ipv4Addr,
    concurrency: usize,
    timeout: Duration,
    ehlo: String,
    ready_file: Option<PathBuf>,
}

impl Options {
    fn from_args(mut args: Args) -> Result<Options> {
        let o = Options {
            addr: args.required("addr")?,
            connections: args.get("connections", 10_000)?,
            hold: args.duration("hold", Duration::from_secs(10))?,
            sources: args.get("sources", 50)?,
            first_source: args.get("first-source", Ipv4Addr::new(127, 0, 0, 1))?,
            concurrency: args.get("concurrency", 100)?,
            timeout: args.duration("timeout", Duration::from_secs(30))?,
            ehlo: args.get("ehlo", "loadgen.test".to_string())?,
            ready_file: args.optional("ready-file").map(PathBuf::from),
        };
        args.finish()?;
        if o.connections == 0 || o.concurrency == 0 {
            bail!("--connections and --concurrency must be greater than 0");
        }
        if o.sources > 0 && !o.addr.is_ipv4() {
            bail!("--sources needs an IPv4 --addr; use --sources 0 for IPv6");
        }
        if u32::from(o.first_source).checked_add(o.sources).is_none() {
            bail!("--first-source + --sources runs past 255.255.255.255");
        }
        Ok(o)
    }

    /// The source address for connection `i`, round-robin over the range.
    fn source(&self, i: usize) -> Option<IpAddr> {
        if self.sources == 0 {
            return None;
        }
        // Cannot wrap: checked in from_args, and i % sources < sources.
        let offset = (i % self.sources as usize) as u32;
        Some(IpAddr::V4(Ipv4Addr::from(
            u32::from(self.first_source) + offset,
        )))
    }
}

/// Counts failures by kind; prints the kinds once at the end.
#[derive(Default)]
struct Failures(BTreeMap<Failure, usize>);

impl Failures {
    fn add(&mut self, f: Failure) {
        *self.0.entry(f).or_default() += 1;
    }

    fn print(&self) {
        for (f, n) in &self.0 {
            println!("  {n} x {f}");
        }
    }
}

pub async fn run(args: Args) -> Result<bool> {
    let o = Arc::new(Options::from_args(args)?);
    let n = o.connections;
    match o.sources {
        0 => println!("idle: {n} connections to {}", o.addr),
        s => println!(
            "idle: {n} connections to {} from {} .. {}",
            o.addr,
            o.first_source,
            o.source(s as usize - 1)
                .map_or_else(String::new, |ip| ip.to_string()),
        ),
    }
    let mut failures = Failures::default();

    // Open: greeting and EHLO on every connection, a bounded number at once
    // so the server's listen backlog is not what fails.
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(o.concurrency));
    let mut opening = JoinSet::new();
    for i in 0..n {
        let (o, gate) = (Arc::clone(&o), Arc::clone(&gate));
        opening.spawn(async move {
            let _permit = gate
                .acquire_owned()
                .await
                .map_err(|_| Failure::new("open", "semaphore closed"))?;
            open(&o, i).await
        });
    }
    let mut conns = Vec::with_capacity(n);
    let mut progress = tokio::time::interval(Duration::from_secs(1));
    progress.tick().await;
    loop {
        tokio::select! {
            joined = opening.join_next() => match joined {
                None => break,
                Some(Ok(Ok(conn))) => conns.push(conn),
                Some(Ok(Err(f))) => failures.add(f),
                Some(Err(e)) => failures.add(Failure::new("open", format!("task: {e}"))),
            },
            _ = progress.tick() => eprintln!(
                "  ... {} open, {} failed, {:.1} s",
                conns.len(),
                n - conns.len() - opening.len(),
                started.elapsed().as_secs_f64()
            ),
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    let opened = conns.len();
    println!(
        "open: {opened} ok, {} failed in {open_secs:.2} s ({:.0}/s)",
        n - opened,
        opened as f64 / open_secs.max(1e-9)
    );

    if let Some(path) = &o.ready_file {
        std::fs::write(path, format!("{opened}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("hold: {} connections idle for {:?}", opened, o.hold);
    tokio::time::sleep(o.hold).await;

    // NOOP on every connection at once: an idle server must still answer all.
    let started = Instant::now();
    let (conns, noop_ok) = on_all(conns, &mut failures, |mut c| async move {
        let r = c.command("noop", "NOOP", 250).await;
        (c, r.map(|_| ()))
    })
    .await;
    println!(
        "noop: {noop_ok}/{n} answered 250 in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let (_, quit_ok) = on_all(conns, &mut failures, |mut c| async move {
        let r = c.command("quit", "QUIT", 221).await;
        (c, r.map(|_| ()))
    })
    .await;
    println!("quit: {quit_ok}/{n} answered 221");

    if !failures.0.is_empty() {
        println!("failures by kind:");
        failures.print();
    }
    println!(
        "RESULT connections={n} opened={opened} noop_ok={noop_ok} quit_ok={quit_ok} open_secs={open_secs:.3}"
    );
    Ok(opened == n && noop_ok == n)
}

async fn open(o: &Options, i: usize) -> Result<Conn, Failure> {
    let mut conn = Conn::connect(o.addr, o.source(i), o.timeout).await?;
    conn.expect("greeting", 220).await?;
    conn.command("ehlo", &format!("EHLO {}", o.ehlo), 250)
        .await?;
    Ok(conn)
}

/// Runs `step` on every connection concurrently; returns the connections
/// whose step succeeded and how many they were.
async fn on_all<F, Fut>(conns: Vec<Conn>, failures: &mut Failures, step: F) -> (Vec<Conn>, usize)
where
    F: Fn(Conn) -> Fut,
    Fut: Future<Output = (Conn, Result<(), Failure>)> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    for c in conns {
        tasks.spawn(step(c));
    }
    let mut alive = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((c, Ok(()))) => alive.push(c),
            Ok((_, Err(f))) => failures.add(f),
            Err(e) => failures.add(Failure::new("task", e.to_string())),
        }
    }
    let ok = alive.len();
    (alive, ok)
}
