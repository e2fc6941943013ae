#!/usr/bin/env bash
# Capture-mode benchmark: `mailroom capture` (with a no-op jsonl worker pool)
# against maildev (npm) and mailcrab, on the same machine, same client.
#
# See bench/README.md. Usage:
#   bench/capture.sh [--quick] [--no-build]
# Environment:
#   SERVERS="mailroom maildev mailcrab"   which servers to measure
#   REPS=3              runs per workload and server (--quick: 1)
#   PORT_BASE=27000     mailroom 27000/27001, maildev 27010/27011, mailcrab 27020/27021
#   MAILDEV_BIN, MAILCRAB_BIN   the peers' executables (default: found in PATH;
#                       maildev is installed with `npm install -g maildev@$MAILDEV_VERSION`
#                       when missing; mailcrab with `cargo install mailcrab`)
#   MAILDEV_VERSION=2.2.1   (3.0.0 needs a mailsplit release our npm mirror lacks)
#   NUM_WORKERS=4       mailroom's workers.num_workers
#   NO_BUILD=1, KEEP_TMP=1   as for bench/smtp.sh
# Workloads (client: mailroom-loadgen send, one connection per message):
#   C1: 1 KB bodies, 50 sessions, 5000 messages (--quick: 1000)
#   C2: 100 KB bodies, 10 sessions, 1000 messages (--quick: 200)
#   C3: 1 KB bodies, 100 concurrent sessions, 2000 messages: must have no error
# Memory: RSS 2 s after start (idle) and the peak during each run (load), of
# the server process itself (VmHWM) and of its whole tree (mailroom's
# workers are child processes; maildev and mailcrab have none).
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

QUICK=0
for arg in "$@"; do
    case $arg in
    --quick) QUICK=1 ;;
    --no-build) NO_BUILD=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument $arg" ;;
    esac
done
SERVERS=${SERVERS:-mailroom maildev mailcrab}
PORT_BASE=${PORT_BASE:-27000}
NUM_WORKERS=${NUM_WORKERS:-4}
if ((QUICK)); then REPS=${REPS:-1} C1_MESSAGES=1000 C2_MESSAGES=200; fi
REPS=${REPS:-3}
C1_MESSAGES=${C1_MESSAGES:-5000}
C2_MESSAGES=${C2_MESSAGES:-1000}

BENCH_TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/mailroom-capture-bench.XXXXXX")
OUT=$ROOT/bench/out/capture-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
cleanup() {
    stop_watch
    stop_server
    if [[ ${KEEP_TMP:-0} == 1 ]]; then log "scratch kept in $BENCH_TMP"; else rm -rf "$BENCH_TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

raise_nofile
ensure_python
build 1

MAILDEV_BIN=${MAILDEV_BIN:-$(command -v maildev || true)}
MAILCRAB_BIN=${MAILCRAB_BIN:-$(command -v mailcrab || true)}
if [[ " $SERVERS " == *" maildev "* && -z $MAILDEV_BIN ]]; then
    log "npm install -g maildev@${MAILDEV_VERSION:-2.2.1}"
    npm install -g "maildev@${MAILDEV_VERSION:-2.2.1}" >"$BENCH_TMP/npm.log" 2>&1 || { tail -n 20 "$BENCH_TMP/npm.log" >&2; die "cannot install maildev"; }
    MAILDEV_BIN=$(command -v maildev)
fi

# The no-op worker: answers CONTINUE to every event.
cat >"$BENCH_TMP/noop_worker.py" <<'PY'
import sys
for line in sys.stdin:
    sys.stdout.write("CONTINUE\n")
    sys.stdout.flush()
PY

start_capture_server() {
    local kind=$1 dir=$BENCH_TMP/$1-$2
    mkdir -p "$dir"
    SERVER_KIND=$kind SERVER_LOG=$dir/server.log
    case $kind in
    mailroom)
        SERVER_PORT=$PORT_BASE
        cat >"$dir/capture.toml" <<TOML
[log]
level = "warn"

[capture]
smtp = "127.0.0.1:$PORT_BASE"
http = "127.0.0.1:$((PORT_BASE + 1))"
data_dir = "$dir/inbox"

[capture.workers]
command = ["python3", "$BENCH_TMP/noop_worker.py"]
codec = "jsonl"
num_workers = $NUM_WORKERS
TOML
        "$BENCH_MAILROOM_BIN" capture --config "$dir/capture.toml" >"$SERVER_LOG" 2>&1 &
        ;;
    maildev)
        [[ -n $MAILDEV_BIN ]] || die "maildev is not installed"
        SERVER_PORT=$((PORT_BASE + 10))
        "$MAILDEV_BIN" --ip 127.0.0.1 --smtp "$SERVER_PORT" --web "$((PORT_BASE + 11))" \
            --mail-directory "$dir/mail" --silent >"$SERVER_LOG" 2>&1 &
        ;;
    mailcrab)
        [[ -n $MAILCRAB_BIN ]] || die "mailcrab is not installed (cargo install mailcrab, or MAILCRAB_BIN=...)"
        SERVER_PORT=$((PORT_BASE + 20))
        SMTP_PORT=$SERVER_PORT HTTP_PORT=$((PORT_BASE + 21)) HTTP_HOST=127.0.0.1 \
            "$MAILCRAB_BIN" >"$SERVER_LOG" 2>&1 &
        ;;
    esac
    SERVER_PID=$!
    wait_greeting 30
}

# One line per run.
RESULTS=$OUT/results.tsv
printf 'server\tworkload\trep\tmsg_per_sec\tfailed\tidle_rss_kib\tpeak_rss_kib\tidle_tree_kib\tpeak_tree_kib\n' >"$RESULTS"

run_cell() {
    local server=$1 workload=$2 rep=$3 sessions messages size
    case $workload in
    C1) sessions=50 messages=$C1_MESSAGES size=1024 ;;
    C2) sessions=10 messages=$C2_MESSAGES size=102400 ;;
    C3) sessions=100 messages=2000 size=1024 ;;
    esac
    start_capture_server "$server" "$workload-$rep"
    sleep 2
    start_watch "$OUT/$server-$workload-$rep.idle"
    sleep 1
    stop_watch
    local idle idle_tree
    idle=$(kv hwm_kib "$WATCH_RESULT")
    idle_tree=$(kv peak_rss_kib "$WATCH_RESULT")
    start_watch "$OUT/$server-$workload-$rep.load"
    local send_out=$OUT/$server-$workload-$rep.send status=0
    "$LOADGEN" send --addr "127.0.0.1:$SERVER_PORT" --sessions "$sessions" --messages "$messages" \
        --size "$size" --from from@bench.test --to to@bench.test >"$send_out" 2>&1 || status=$?
    stop_watch
    local peak peak_tree result rate failed
    peak=$(kv hwm_kib "$WATCH_RESULT")
    peak_tree=$(kv peak_rss_kib "$WATCH_RESULT")
    result=$(grep '^RESULT' "$send_out" || true)
    rate=$(kv msg_per_sec "$result")
    failed=$(kv failed "$result")
    [[ -n $result ]] || failed=$messages
    ((status == 0)) || log "warning: $server $workload: the client reported failures (see $send_out)"
    tail -n 30 "$SERVER_LOG" >"$OUT/$server-$workload-$rep.log" 2>/dev/null || true
    stop_server
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$server" "$workload" "$rep" "$rate" "$failed" \
        "$idle" "$peak" "$idle_tree" "$peak_tree" >>"$RESULTS"
    log "$server $workload #$rep: $rate msg/s, failed $failed, RSS idle $((idle / 1024)) MiB, peak $((peak / 1024)) MiB (with workers: $((idle_tree / 1024)) / $((peak_tree / 1024)) MiB)"
}

for workload in C1 C2 C3; do
    for ((rep = 1; rep <= REPS; rep++)); do
        for server in $SERVERS; do
            run_cell "$server" "$workload" "$rep"
        done
    done
done

python3 - "$RESULTS" <<'PY' | tee "$OUT/summary.txt"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
cells = {}
for r in rows:
    cells.setdefault((r["workload"], r["server"]), []).append(r)
def med(rs, k):
    return statistics.median(float(r[k] or 0) for r in rs)
def mib(rs, k):
    return max(float(r[k] or 0) for r in rs) / 1024
print(f"{'workload':8} {'server':9} {'msg/s median':>12} {'[min-max]':>13} {'failed':>6} "
      f"{'idle MiB':>8} {'peak MiB':>8} {'tree idle':>9} {'tree peak':>9}")
for (w, s), rs in sorted(cells.items()):
    rates = sorted(float(r["msg_per_sec"] or 0) for r in rs)
    print(f"{w:8} {s:9} {med(rs, 'msg_per_sec'):12.0f} {f'[{rates[0]:.0f}-{rates[-1]:.0f}]':>13} "
          f"{int(sum(float(r['failed'] or 0) for r in rs)):6d} {mib(rs, 'idle_rss_kib'):8.1f} {mib(rs, 'peak_rss_kib'):8.1f} "
          f"{mib(rs, 'idle_tree_kib'):9.1f} {mib(rs, 'peak_tree_kib'):9.1f}")
for w in ("C1", "C2"):
    m, d = cells.get((w, "mailroom")), cells.get((w, "maildev"))
    if m and d and med(d, "msg_per_sec") > 0:
        print(f"{w}: mailroom / maildev = {med(m, 'msg_per_sec') / med(d, 'msg_per_sec'):.1f}x (target >= 10x)")
    c = cells.get((w, "mailcrab"))
    if m and c and med(c, "msg_per_sec") > 0:
        print(f"{w}: mailroom / mailcrab = {med(m, 'msg_per_sec') / med(c, 'msg_per_sec'):.1f}x")
PY
log "results in $OUT"
