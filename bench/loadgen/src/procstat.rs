//! `watch` and `cpu`: what a server process tree costs, read from /proc.
//!
//! A server is a process and its descendants: one process for mailroom and
//! smtp-sink, a master and ~60 children for Postfix. Memory is sampled as
//! the sum of VmRSS (and optionally of PSS, which splits shared pages fairly
//! between processes, so a forking server is not charged 60 times for its
//! shared libraries). CPU is utime+stime of every live process plus
//! cutime+cstime, which holds the CPU of children already reaped.
//!
//! Linux only. Processes that vanish between listing and reading are
//! skipped: that is a normal race, not an error.

use std::collections::HashSet;
use std::fs;
use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::signal::unix::{SignalKind, signal};

use crate::args::Args;

pub const WATCH_USAGE: &str = "\
mailroom-loadgen watch --pid PID [--interval 50ms] [--pss] [--pss-every 20] [--samples FILE]
  Samples the memory of PID and its descendants until SIGTERM/SIGINT or
  until PID exits, then prints one line:
    peak_rss_kib=.. peak_pss_kib=.. hwm_kib=.. samples=.. max_procs=..
  peak_rss_kib: highest sum of VmRSS; peak_pss_kib: highest sum of Pss
  (only with --pss, from smaps_rollup, read every --pss-every samples and at
  the end because it costs ~0.3 ms per process; else 0); hwm_kib: VmHWM of PID itself at the
  end (its own peak RSS, exact for a one-process server).
  --samples FILE writes one line per sample: ms rss_kib pss_kib procs";

pub const CPU_USAGE: &str = "\
mailroom-loadgen cpu --pid PID [--clk-tck 100]
  Prints cpu_secs=.. procs=..: user+system CPU of PID and its descendants,
  including children they have already reaped. Take it before and after.
  --clk-tck: the kernel's USER_HZ (getconf CLK_TCK; 100 on Linux).";

/// Memory of a process tree at one moment.
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    rss_kib: u64,
    pss_kib: u64,
    procs: usize,
}

pub async fn watch(mut args: Args) -> Result<bool> {
    let pid: u32 = args.required("pid")?;
    let interval = args.duration("interval", Duration::from_millis(50))?;
    let with_pss = args.flag("pss");
    let pss_every: u64 = args.get("pss-every", 20)?;
    let samples_path = args.optional("samples");
    args.finish()?;
    if interval.is_zero() || pss_every == 0 {
        bail!("--interval and --pss-every must be greater than 0");
    }
    let page_kib = page_kib();
    if !alive(pid) {
        bail!("process {pid} does not exist");
    }

    // Handlers first, then the samples file: a script that waits for the
    // file knows SIGTERM will now end the watch with a summary.
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut out = match &samples_path {
        None => None,
        Some(p) => Some(BufWriter::new(
            fs::File::create(p).with_context(|| format!("creating {p}"))?,
        )),
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

    let started = Instant::now();
    let (mut peak, mut count, mut hwm_kib) = (Sample::default(), 0u64, 0u64);
    loop {
        let last = tokio::select! {
            _ = term.recv() => true,
            _ = int.recv() => true,
            _ = tick.tick() => false,
        };
        // The last sample, taken when told to stop, always includes PSS:
        // the server is still running then and has seen the whole load.
        let pss = with_pss && (last || count % pss_every == 0);
        let Some(s) = sample(pid, page_kib, pss) else {
            break;
        };
        // Read every time: once PID has exited its VmHWM is gone.
        hwm_kib = status_kib(pid, "VmHWM:").unwrap_or(hwm_kib);
        count += 1;
        peak.rss_kib = peak.rss_kib.max(s.rss_kib);
        peak.pss_kib = peak.pss_kib.max(s.pss_kib);
        peak.procs = peak.procs.max(s.procs);
        if let Some(out) = out.as_mut() {
            let ms = started.elapsed().as_millis();
            writeln!(out, "{ms} {} {} {}", s.rss_kib, s.pss_kib, s.procs)
                .context("writing samples")?;
        }
        if last {
            break;
        }
    }
    if let Some(mut out) = out {
        out.flush().context("writing samples")?;
    }
    hwm_kib = status_kib(pid, "VmHWM:").unwrap_or(hwm_kib);
    println!(
        "peak_rss_kib={} peak_pss_kib={} hwm_kib={hwm_kib} samples={count} max_procs={}",
        peak.rss_kib, peak.pss_kib, peak.procs
    );
    Ok(true)
}

pub fn cpu(mut args: Args) -> Result<bool> {
    let pid: u32 = args.required("pid")?;
    let clk_tck: u64 = args.get("clk-tck", 100)?;
    args.finish()?;
    if clk_tck == 0 {
        bail!("--clk-tck must be greater than 0");
    }
    if !alive(pid) {
        bail!("process {pid} does not exist");
    }
    let pids = tree(pid);
    let ticks: u64 = pids.iter().filter_map(|&p| cpu_ticks(p)).sum();
    println!(
        "cpu_secs={:.3} procs={}",
        ticks as f64 / clk_tck as f64,
        pids.len()
    );
    Ok(true)
}

fn alive(pid: u32) -> bool {
    fs::metadata(format!("/proc/{pid}/stat")).is_ok()
}

/// Memory of `root` and its descendants; `None` once `root` is gone.
fn sample(root: u32, page_kib: u64, with_pss: bool) -> Option<Sample> {
    if !alive(root) {
        return None;
    }
    let mut s = Sample::default();
    for pid in tree(root) {
        let Some(pages) = resident_pages(pid) else {
            continue;
        };
        s.rss_kib += pages * page_kib;
        s.procs += 1;
        if with_pss {
            s.pss_kib += rollup_kib(pid, "Pss:").unwrap_or(0);
        }
    }
    Some(s)
}

/// `root` and all its descendants (breadth first).
fn tree(root: u32) -> Vec<u32> {
    let mut out = vec![root];
    let mut seen = HashSet::from([root]);
    let mut i = 0;
    while let Some(&pid) = out.get(i) {
        i += 1;
        for child in children(pid) {
            if seen.insert(child) {
                out.push(child);
            }
        }
    }
    out
}

/// Children of every thread of `pid`, from /proc/PID/task/TID/children when
/// the kernel has it (CONFIG_PROC_CHILDREN), else by scanning all of /proc.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let path = task.path().join("children");
        match fs::read_to_string(&path) {
            Ok(text) => out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return children_by_scan(pid),
            Err(_) => {}
        }
    }
    out
}

fn children_by_scan(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| stat_fields(p).and_then(|f| field(&f, 4)) == Some(u64::from(parent)))
        .collect()
}

/// The fields of /proc/PID/stat after the command name, which may itself
/// contain spaces and parentheses; element 0 is field 3 (state).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Field `n` of /proc/PID/stat, numbered as in proc(5) (pid is 1).
fn field(fields: &[String], n: usize) -> Option<u64> {
    fields.get(n.checked_sub(3)?)?.parse().ok()
}

/// utime + stime + cutime + cstime (fields 14..=17), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    (14..=17).map(|n| field(&f, n)).sum()
}

/// Resident pages (the second field of /proc/PID/statm): the same number as
/// VmRSS, several times cheaper to read than /proc/PID/status.
fn resident_pages(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The page size in KiB, from this process's own smaps (4 unless the
/// kernel uses larger pages).
fn page_kib() -> u64 {
    fs::read_to_string("/proc/self/smaps")
        .ok()
        .and_then(|t| kib_line(&t, "KernelPageSize:"))
        .unwrap_or(4)
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    kib_line(
        &fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        key,
    )
}

fn rollup_kib(pid: u32, key: &str) -> Option<u64> {
    kib_line(
        &fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?,
        key,
    )
}

/// The number on the line `key   1234 kB`.
fn kib_line(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(status_kib(me, "VmRSS:").is_some_and(|k| k > 0));
        assert!(cpu_ticks(me).is_some());
        assert_eq!(tree(me)[0], me);
        let f = stat_fields(me).expect("own stat");
        assert!(field(&f, 3).is_none(), "state is a letter");
        assert!(field(&f, 4).is_some(), "ppid");
        let statm = resident_pages(me).expect("own statm") * page_kib();
        let status = status_kib(me, "VmRSS:").expect("own VmRSS");
        assert!(
            statm.abs_diff(status) < 1024,
            "statm {statm} vs status {status}"
        );
    }

    #[test]
    fn kib_lines() {
        let text = "Name:\tx\nVmHWM:\t   2048 kB\nVmRSS:\t   1024 kB\n";
        assert_eq!(kib_line(text, "VmRSS:"), Some(1024));
        assert_eq!(kib_line(text, "VmHWM:"), Some(2048));
        assert_eq!(kib_line(text, "Pss:"), None);
    }
}
