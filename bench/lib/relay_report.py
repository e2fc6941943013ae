#!/usr/bin/env python3
"""Helpers for bench/relay.sh.

  relay_report.py latency ACKS SINKLOG
      Joins the sender's acks (`seq ack_unix_ns`, from `send --acks`) with
      the sink's log (`seq arrival_unix_ns sent_unix_ns`, from `sink --log`)
      and prints `ack_n=.. ack_p50_ms=.. ack_p90_ms=.. ack_p99_ms=.. ack_max_ms=..`:
      latency from the intake's 250 to arrival at the sink.

  relay_report.py summary results.tsv
      Medians [min-max] per server, mailroom/Postfix ratio, the targets.
"""

import csv
import math
import statistics
import sys

E2E_TARGET = 3000  # msg/s, end to end, mailroom
P99_TARGET_MS = 1000  # sink-measured p99 latency, mailroom
POSTFIX_RATIO = 4.0  # mailroom end-to-end msg/s / Postfix's


def pct(sorted_values, p):
    if not sorted_values:
        return 0.0
    i = max(0, math.ceil(len(sorted_values) * p) - 1)
    return sorted_values[i]


def latency(acks_path, sink_path):
    acks = {}
    with open(acks_path) as f:
        for line in f:
            seq, at = line.split()
            acks[int(seq)] = int(at)
    lat = []
    with open(sink_path) as f:
        for line in f:
            seq, arrival, _sent = line.split()
            ack = acks.get(int(seq))
            if ack is not None:
                lat.append((int(arrival) - ack) / 1e6)
    lat.sort()
    print(
        f"ack_n={len(lat)} ack_p50_ms={pct(lat, 0.5):.3f} ack_p90_ms={pct(lat, 0.9):.3f} "
        f"ack_p99_ms={pct(lat, 0.99):.3f} ack_max_ms={pct(lat, 1.0):.3f}"
    )


def spread(values, fmt):
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med)
    return f"{fmt(med)} [{fmt(min(values))}–{fmt(max(values))}]"


def count(x):
    return f"{x:,.0f}"


def ms(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def mib(x):
    return f"{x:.1f}"


def summary(path):
    with open(path, newline="") as f:
        lines = f.readlines()
    for h in (l[2:].rstrip() for l in lines if l.startswith("#")):
        print(h)
    print()
    rows = list(csv.DictReader([l for l in lines if not l.startswith("#")], delimiter="\t"))
    if not rows:
        sys.exit(f"{path}: no results")
    servers = list(dict.fromkeys(r["server"] for r in rows))

    def col(server, key):
        return [float(r[key]) for r in rows if r["server"] == server]

    def mem(server):
        key = "peak_pss_kib" if server == "postfix" else "peak_rss_kib"
        return [v / 1024 for v in col(server, key)]

    table = [
        ("runs", lambda s: str(len(col(s, "msgs")))),
        ("messages per run", lambda s: count(col(s, "msgs")[0])),
        ("intake msg/s (sender: first MAIL to last 250)", lambda s: spread(col(s, "intake_msg_s"), count)),
        ("**end to end msg/s** (first 250 to last arrival)", lambda s: spread(col(s, "e2e_msg_s"), count)),
        ("last arrival after the last 250, ms", lambda s: spread(col(s, "drain_ms"), ms)),
        ("latency p50 ms (stamp to arrival)", lambda s: spread(col(s, "sink_p50_ms"), ms)),
        ("**latency p99 ms** (stamp to arrival)", lambda s: spread(col(s, "sink_p99_ms"), ms)),
        ("latency max ms (stamp to arrival)", lambda s: spread(col(s, "sink_max_ms"), ms)),
        ("latency p50 ms (250 to arrival)", lambda s: spread(col(s, "ack_p50_ms"), ms)),
        ("latency p99 ms (250 to arrival)", lambda s: spread(col(s, "ack_p99_ms"), ms)),
        ("server CPU s", lambda s: spread(col(s, "cpu_secs"), lambda x: f"{x:.2f}")),
        ("msg per server CPU-s", lambda s: spread(
            [m / c for m, c in zip(col(s, "msgs"), col(s, "cpu_secs")) if c > 0], count)),
        ("peak memory MiB (mailroom RSS, Postfix PSS sum)", lambda s: spread(mem(s), mib)),
        ("connections to the sink", lambda s: spread(col(s, "connections"), count)),
        ("transactions per connection", lambda s: spread(col(s, "tx_per_conn"), lambda x: f"{x:.1f}")),
        ("duplicates at the sink", lambda s: spread(col(s, "duplicates"), count)),
    ]
    print("| | " + " | ".join(servers) + " |")
    print("|---" * (len(servers) + 1) + "|")
    for name, fn in table:
        print(f"| {name} | " + " | ".join(fn(s) for s in servers) + " |")
    print()

    verdicts = []
    if "mailroom" in servers:
        e2e = statistics.median(col("mailroom", "e2e_msg_s"))
        p99 = statistics.median(col("mailroom", "sink_p99_ms"))
        verdicts.append(("mailroom end to end", f"{e2e:,.0f} msg/s", f">= {E2E_TARGET:,}", e2e >= E2E_TARGET))
        verdicts.append(("mailroom p99 latency", f"{p99:,.0f} ms", f"< {P99_TARGET_MS:,} ms", p99 < P99_TARGET_MS))
        if "postfix" in servers:
            pf = statistics.median(col("postfix", "e2e_msg_s"))
            ratio = e2e / pf if pf else float("inf")
            verdicts.append(("mailroom / Postfix end to end", f"{ratio:.2f}x", f">= {POSTFIX_RATIO}x", ratio >= POSTFIX_RATIO))
    bad_verify = [f"{r['server']} run {r['rep']}" for r in rows if r["verified"] != "ok"]
    print("| target | measured (median) | goal | |")
    print("|---|---|---|---|")
    for name, got, goal, ok in verdicts:
        print(f"| {name} | {got} | {goal} | {'met' if ok else '**missed**'} |")
    print()
    if bad_verify:
        print("VERIFY FAILED in: " + ", ".join(bad_verify))
    else:
        print("Every run delivered every message exactly as counted (sink distinct count"
              " and the server's own records).")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "latency":
        latency(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "summary":
        summary(sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
