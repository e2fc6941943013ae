#!/usr/bin/env bash
# Idle-connection benchmark: N SMTP sessions that read the greeting, send
# EHLO and then sit idle; the server's memory while they are held; and every
# one of them must still answer NOOP with 250 afterwards.
#
# See bench/README.md. Usage:
#   bench/idle.sh [--quick] [--no-build]
# Environment:
#   CONNECTIONS=10000   sessions to hold (--quick: 1000)
#   HOLD=10s            how long they stay idle once all are open (--quick: 3s)
#   SOURCES=50          client addresses 127.0.0.1 .. 127.0.0.SOURCES
#   IDLE_PORT=25260     the server's port
#   MAX_CONNECTIONS=20000   mailroom's smtp.max_connections and _per_ip
#   IDLE_SERVER=mailroom    or "sink" (smtp-sink) to check the harness itself
#   RSS_LIMIT_MIB=256   the target for the server's peak RSS
#   NO_BUILD=1, KEEP_TMP=1, BENCH_LOG_LEVEL=info   as for bench/smtp.sh
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
if ((QUICK)); then
    CONNECTIONS=${CONNECTIONS:-1000} HOLD=${HOLD:-3s}
fi
CONNECTIONS=${CONNECTIONS:-10000}
HOLD=${HOLD:-10s}
SOURCES=${SOURCES:-50}
IDLE_PORT=${IDLE_PORT:-25260}
MAX_CONNECTIONS=${MAX_CONNECTIONS:-20000}
IDLE_SERVER=${IDLE_SERVER:-mailroom}
RSS_LIMIT_MIB=${RSS_LIMIT_MIB:-256}
[[ $IDLE_SERVER == mailroom || $IDLE_SERVER == sink ]] || die "IDLE_SERVER must be mailroom or sink"
[[ $CONNECTIONS =~ ^[1-9][0-9]*$ ]] || die "CONNECTIONS must be a positive number"

BENCH_TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/mailroom-idle.XXXXXX")
chmod 755 "$BENCH_TMP"
RUN_ID=$(date +%Y%m%d-%H%M%S)
OUT_DIR="$BENCH_DIR/out/idle-$RUN_ID"
mkdir -p "$OUT_DIR"
LOADGEN_PID=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $LOADGEN_PID ]]; then kill -TERM "$LOADGEN_PID" 2>/dev/null || true; fi
    stop_watch || true
    stop_server || true
    if [[ ${KEEP_TMP:-0} == 1 ]]; then
        log "scratch directory kept: $BENCH_TMP"
    else
        rm -rf "$BENCH_TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

raise_nofile
# The client and the server are separate processes, each needs a descriptor
# per connection (mailroom raises its own soft limit to the hard limit).
if (($(ulimit -n) < CONNECTIONS + 100)); then
    die "open file limit $(ulimit -n) is too low for $CONNECTIONS connections (raise the hard limit: ulimit -Hn, /etc/security/limits.conf)"
fi
[[ $IDLE_SERVER == sink ]] && ensure_postfix
build "$([[ $IDLE_SERVER == mailroom ]] && echo 1 || echo 0)"

mkdir -p "$BENCH_TMP/server"
if [[ $IDLE_SERVER == mailroom ]]; then
    start_mailroom "$BENCH_TMP/server" "$IDLE_PORT" "$MAX_CONNECTIONS"
else
    start_sink "$BENCH_TMP/server" "$IDLE_PORT" "$MAX_CONNECTIONS"
fi
log "$IDLE_SERVER is up (pid $SERVER_PID) on 127.0.0.1:$IDLE_PORT"

status_kib() { awk -v k="$2" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

rss_start=$(status_kib "$SERVER_PID" VmRSS:)
start_watch "$OUT_DIR/memory.txt"

log "mailroom-loadgen idle: $CONNECTIONS connections from $SOURCES addresses, hold $HOLD"
"$LOADGEN" idle --addr "127.0.0.1:$IDLE_PORT" --connections "$CONNECTIONS" --hold "$HOLD" \
    --sources "$SOURCES" --ready-file "$BENCH_TMP/ready" >"$OUT_DIR/loadgen.out" 2>"$OUT_DIR/loadgen.err" &
LOADGEN_PID=$!

# While the connections are held: the server's RSS, descriptors and threads.
rss_held=0 fds_held=0 threads_held=0
while ! [[ -e $BENCH_TMP/ready ]]; do
    proc_gone "$LOADGEN_PID" && break
    proc_gone "$SERVER_PID" && server_died
    sleep 0.1
done
if [[ -e $BENCH_TMP/ready ]]; then
    sleep 1 # let the last sessions settle into their idle state
    if ! proc_gone "$SERVER_PID"; then
        rss_held=$(status_kib "$SERVER_PID" VmRSS:)
        threads_held=$(status_kib "$SERVER_PID" Threads:)
        fds_held=$(find "/proc/$SERVER_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    fi
fi

loadgen_rc=0
wait "$LOADGEN_PID" || loadgen_rc=$?
LOADGEN_PID=""
proc_gone "$SERVER_PID" && server_died
stop_watch
mem=$WATCH_RESULT
cp "$SERVER_LOG" "$OUT_DIR/server.log" 2>/dev/null || true
stop_server

result=$(grep '^RESULT ' "$OUT_DIR/loadgen.out" || true)
if [[ -z $result ]]; then
    cat "$OUT_DIR/loadgen.out" "$OUT_DIR/loadgen.err" >&2
    die "mailroom-loadgen idle failed (exit $loadgen_rc)"
fi
opened=$(kv opened "$result") noop_ok=$(kv noop_ok "$result") open_secs=$(kv open_secs "$result")
peak=$(kv peak_rss_kib "$mem") hwm=$(kv hwm_kib "$mem")
peak_mib=$(mib "$peak")
per_conn=$(awk -v a="$rss_start" -v b="$rss_held" -v n="$opened" 'BEGIN { if (n > 0 && b > 0) printf "%.1f", (b - a) / n; else print "?" }')
conn_ok=FAIL rss_ok=FAIL
[[ $opened == "$CONNECTIONS" && $noop_ok == "$CONNECTIONS" ]] && conn_ok=PASS
awk -v p="$peak" -v l="$RSS_LIMIT_MIB" 'BEGIN { exit !(p > 0 && p / 1024 < l) }' && rss_ok=PASS

{
    echo "idle connections benchmark $RUN_ID"
    echo "host: $(nproc) cores, kernel $(uname -r); server: $IDLE_SERVER$([[ $IDLE_SERVER == mailroom ]] && echo " $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true)")"
    echo "client: mailroom-loadgen idle --connections $CONNECTIONS --hold $HOLD --sources $SOURCES"
    echo
    echo "  opened                 $opened / $CONNECTIONS in ${open_secs} s"
    echo "  NOOP answered 250      $noop_ok / $CONNECTIONS"
    echo "  server RSS at start    $(mib "$rss_start") MiB"
    echo "  server RSS while held  $(mib "$rss_held") MiB (~$per_conn KiB per connection; $fds_held fds, $threads_held threads)"
    echo "  server peak RSS        $peak_mib MiB (sampled every 50 ms; VmHWM $(mib "$hwm") MiB)"
    echo
    echo "  all connections held and answered: $conn_ok"
    echo "  peak RSS < $RSS_LIMIT_MIB MiB: $rss_ok"
} | tee "$OUT_DIR/summary.txt"
grep -A 20 '^failures by kind' "$OUT_DIR/loadgen.out" || true
log "results: $OUT_DIR"
[[ $conn_ok == PASS && $rss_ok == PASS ]]
