#!/usr/bin/env python3
"""Summarises a bench/smtp.sh results.tsv: medians [min-max] per workload and
server, mailroom's ratios to smtp-sink and Postfix, and the targets.

Usage: python3 bench/lib/report.py bench/out/smtp-<run>/results.tsv
"""

import csv
import statistics
import sys

# Targets from the issue: throughput ratios of medians, and mailroom's memory.
TARGETS = {
    "W1": {"sink": 0.8, "postfix": 5.0},
    "W2": {"sink": 0.5, "postfix": 10.0},
    "W3": {"postfix": 3.0},
}
RSS_LIMIT_MIB = 64
NAMES = {"mailroom": "mailroom", "sink": "smtp-sink", "postfix": "postfix"}


def spread(values, fmt):
    """median [min-max]"""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med)
    return f"{fmt(med)} [{fmt(min(values))}–{fmt(max(values))}]"


def count(x):
    return f"{x:,.0f}"


def mib(x):
    return f"{x:.1f}"


def memory_kib(row):
    """Postfix: sum of PSS over its processes (RSS would charge every one of
    ~60 processes for the shared libraries). One-process servers: peak VmRSS."""
    if row["server"] == "postfix":
        return float(row["peak_pss_kib"])
    return float(row["peak_rss_kib"])


def main(path):
    with open(path, newline="") as f:
        lines = f.readlines()
    header = [l[2:].rstrip() for l in lines if l.startswith("#")]
    rows = list(csv.DictReader([l for l in lines if not l.startswith("#")], delimiter="\t"))
    if not rows:
        sys.exit(f"{path}: no results")
    for h in header:
        print(h)
    print()

    failed = []
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    for w in workloads:
        wrows = [r for r in rows if r["workload"] == w]
        r0 = wrows[0]
        size = int(r0["size"])
        size_text = f"{size // 1024} KB" if size % 1024 == 0 else f"{size} B"
        how = "connection reuse (smtp-source -d)" if r0["reuse"] == "1" else "one connection per message"
        servers = list(dict.fromkeys(r["server"] for r in wrows))
        runs = max(sum(1 for r in wrows if r["server"] == s) for s in servers)
        print(f"{w}: {size_text} body, {r0['sessions']} sessions, {r0['msgs']} messages, {how}"
              f" — median [min–max] of {runs} run(s)")
        print(f"  {'server':<10} {'msg/s':<24} {'msg/server-CPU-s':<24} {'server CPU s':<19} "
              f"{'client CPU s':<19} {'other CPU s':<17} {'peak memory MiB':<34} stored")
        med_rate, med_cpu_rate, peak_mem = {}, {}, {}
        for s in servers:
            srows = [r for r in wrows if r["server"] == s]
            rate = [int(r["msgs"]) / float(r["secs"]) for r in srows]
            cpu = [float(r["cpu_secs"]) for r in srows]
            client = [float(r.get("client_cpu_secs") or 0) for r in srows]
            other = [float(r.get("other_cpu_secs") or 0) for r in srows]
            cpu_rate = [int(r["msgs"]) / c for r, c in zip(srows, cpu) if c > 0]
            mem = [memory_kib(r) / 1024 for r in srows]
            med_rate[s] = statistics.median(rate)
            med_cpu_rate[s] = statistics.median(cpu_rate) if cpu_rate else 0
            peak_mem[s] = max(mem)
            if s == "postfix":
                procs = max(int(r["max_procs"]) for r in srows)
                kind = f"PSS sum, ≤{procs} procs"
            else:
                kind = "VmRSS"
            stored = "-"
            if s == "mailroom":
                ok = sum(1 for r in srows if r["stored"] == r["msgs"])
                stored = f"{ok}/{len(srows)} runs exact"
                if ok != len(srows):
                    failed.append(f"{w}: mailroom stored count differs from messages sent")
            secs = lambda x: f"{x:.2f}"
            print(f"  {NAMES.get(s, s):<10} {spread(rate, count):<24} {spread(cpu_rate, count):<24} "
                  f"{spread(cpu, secs):<19} {spread(client, secs):<19} {spread(other, secs):<17} "
                  f"{spread(mem, mib) + ' ' + kind:<34} {stored}")
        if "mailroom" in med_rate:
            for peer, target in TARGETS.get(w, {}).items():
                if peer not in med_rate:
                    continue
                ratio = med_rate["mailroom"] / med_rate[peer]
                cpu_ratio = (med_cpu_rate["mailroom"] / med_cpu_rate[peer]
                             if med_cpu_rate[peer] else 0)
                verdict = "PASS" if ratio >= target else "FAIL"
                if verdict == "FAIL":
                    failed.append(f"{w}: mailroom/{NAMES[peer]} {ratio:.2f}× < {target}×")
                print(f"  mailroom/{NAMES[peer]:<9} throughput {ratio:6.2f}×  (target ≥ {target}×: {verdict});"
                      f"  per server CPU-s {cpu_ratio:.2f}×")
            for peer in ("sink", "postfix"):
                if peer in med_rate and peer not in TARGETS.get(w, {}):
                    print(f"  mailroom/{NAMES[peer]:<9} throughput {med_rate['mailroom'] / med_rate[peer]:6.2f}×  (no target)")
            verdict = "PASS" if peak_mem["mailroom"] < RSS_LIMIT_MIB else "FAIL"
            if verdict == "FAIL":
                failed.append(f"{w}: mailroom peak RSS {peak_mem['mailroom']:.1f} MiB")
            print(f"  mailroom peak RSS {peak_mem['mailroom']:.1f} MiB (target < {RSS_LIMIT_MIB} MiB: {verdict})")
        print()
    print("client CPU: smtp-source's user+system time. other CPU: what else the machine ran during\n"
          "the run, minus the memory sampler: kernel threads working for the server (ext4 journal,\n"
          "softirqs; large for Postfix's file-per-message queue) and other jobs (noise).\n")
    if failed:
        print("targets missed:")
        for f in failed:
            print(f"  {f}")
    elif any(r["server"] == "mailroom" for r in rows):
        print("all targets met")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
