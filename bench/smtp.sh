#!/usr/bin/env bash
# Side-by-side SMTP intake benchmark: mailroom, smtp-sink and Postfix, all
# driven by the same client (Postfix's smtp-source) on loopback.
#
# See bench/README.md for what is measured and the targets. Usage:
#   bench/smtp.sh [--quick] [--no-build]
# Environment:
#   REPS=3                      repetitions per cell (--quick: 1)
#   SERVERS="mailroom sink postfix"   which servers, in interleaving order
#   WORKLOADS="W1 W2 W3"        which workloads
#   PORT_BASE=25250             mailroom PORT_BASE, smtp-sink +1, Postfix +2
#   PORT_MAILROOM PORT_SINK PORT_POSTFIX   override single ports
#   BENCH_LOG_LEVEL=info        mailroom's [log] level (MAILROOM_* variables
#                               reach mailroom as config overrides, so the
#                               knobs here avoid that prefix)
#   BENCH_TMPDIR=/tmp           where data directories and queues live (the
#                               same disk for every server; avoid tmpfs)
#   NO_BUILD=1                  use the binaries already in target/release
#   KEEP_TMP=1                  keep the scratch directory
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

SERVERS=${SERVERS:-mailroom sink postfix}
WORKLOADS=${WORKLOADS:-W1 W2 W3}
PORT_BASE=${PORT_BASE:-25250}
declare -A PORT=(
    [mailroom]=${PORT_MAILROOM:-$PORT_BASE}
    [sink]=${PORT_SINK:-$((PORT_BASE + 1))}
    [postfix]=${PORT_POSTFIX:-$((PORT_BASE + 2))}
)
RUN_TIMEOUT=${RUN_TIMEOUT:-900}

# Workloads from the issue: body octets (smtp-source -l; its lines are 80
# octets with the newline, sent as CRLF), sessions, messages, connection reuse.
declare -A W_DESC W_SIZE W_SESSIONS W_COUNT W_REUSE
W_DESC=([W1]="1 KB, one connection per message" [W2]="1 KB, connection reuse (-d)" [W3]="100 KB, one connection per message")
W_SIZE=([W1]=1024 [W2]=1024 [W3]=102400)
W_SESSIONS=([W1]=50 [W2]=50 [W3]=10)
if ((QUICK)); then
    REPS=1
    W_COUNT=([W1]=1000 [W2]=1000 [W3]=200)
else
    REPS=${REPS:-3}
    W_COUNT=([W1]=5000 [W2]=5000 [W3]=1000)
fi
W_REUSE=([W1]=0 [W2]=1 [W3]=0)

for s in $SERVERS; do [[ -n ${PORT[$s]:-} ]] || die "unknown server $s (mailroom, sink, postfix)"; done
for w in $WORKLOADS; do [[ -n ${W_SIZE[$w]:-} ]] || die "unknown workload $w (W1, W2, W3)"; done
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "REPS must be a positive number"
[[ $EUID -eq 0 ]] || die "run as root (smtp-sink -u nobody and a private Postfix instance need it)"

BENCH_TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/mailroom-bench.XXXXXX")
# Postfix's unprivileged daemons must be able to reach their queue inside.
chmod 755 "$BENCH_TMP"
RUN_ID=$(date +%Y%m%d-%H%M%S)
OUT_DIR="$BENCH_DIR/out/smtp-$RUN_ID"
RAW="$OUT_DIR/results.tsv"
mkdir -p "$OUT_DIR/runs"
VERIFY_FAILED=0

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
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

has_server() { [[ " $SERVERS " == *" $1 "* ]]; }

ensure_postfix
ensure_python
raise_nofile
build "$(has_server mailroom && echo 1 || echo 0)"
has_server postfix && setup_postfix "$BENCH_TMP/postfix" "${PORT[postfix]}"

# Copies what explains a failed run into the output directory; then dies.
run_failed() {
    local dir=$1 what=$2 keep
    keep="$OUT_DIR/failed-$(basename "$1")"
    mkdir -p "$keep"
    # The files, not the data directory: W3 leaves 100 MB there.
    find "$dir" -maxdepth 1 -type f -exec cp {} "$keep"/ \; 2>/dev/null || true
    if [[ -n $SERVER_LOG ]]; then cp "$SERVER_LOG" "$keep/" 2>/dev/null || true; fi
    log "$what; smtp-source said:"
    tail -c 2000 "$dir/source.out" | tr '\r' '\n' | tail -n 15 >&2 || true
    if proc_gone "$SERVER_PID"; then
        server_died
    fi
    log "server log tail ($SERVER_LOG):"
    tail -n 30 "$SERVER_LOG" >&2 || true
    die "$what (logs kept in $keep)"
}

# One cell: start a fresh server, run smtp-source against it, measure, stop.
run_one() {
    local w=$1 srv=$2 rep=$3
    local size=${W_SIZE[$w]} sessions=${W_SESSIONS[$w]} count=${W_COUNT[$w]}
    local dir="$BENCH_TMP/runs/$w-$srv-$rep"
    mkdir -p "$dir"
    settle_disk
    start_server "$srv" "$dir" "${PORT[$srv]}"

    local flags=(-c -s "$sessions" -m "$count" -l "$size" -f from@bench.test -t to@bench.test -M client.bench.test)
    ((W_REUSE[$w])) && flags+=(-d)
    start_watch "$dir/memory.txt"
    local cpu0 cpu1 t0 t1 busy0 busy1 client0 client1
    cpu0=$(server_cpu)
    children_cpu
    client0=$CHILDREN_CPU
    busy0=$(machine_busy)
    t0=$EPOCHREALTIME
    if ! timeout "$RUN_TIMEOUT" "$SMTP_SOURCE" "${flags[@]}" "127.0.0.1:${PORT[$srv]}" >"$dir/source.out" 2>&1; then
        run_failed "$dir" "smtp-source failed against $srv ($w, run $rep)"
    fi
    t1=$EPOCHREALTIME
    busy1=$(machine_busy)
    children_cpu
    client1=$CHILDREN_CPU
    cpu1=$(server_cpu)
    # CPU the machine spent on anything but this server, smtp-source and the
    # memory sampler: kernel threads working for the server (journal
    # commits, softirqs) and other people's jobs. Large values: a noisy run.
    local client_cpu other_cpu sampler_cpu
    sampler_cpu=$("$LOADGEN" cpu --pid "$WATCH_PID" --clk-tck "$CLK_TCK" 2>/dev/null) || sampler_cpu=cpu_secs=0
    sampler_cpu=$(kv cpu_secs "$sampler_cpu")
    client_cpu=$(awk -v a="$client0" -v b="$client1" 'BEGIN { printf "%.3f", b - a }')
    other_cpu=$(awk -v a="$busy0" -v b="$busy1" -v hz="$CLK_TCK" -v s="$cpu0" -v e="$cpu1" -v c="$client_cpu" -v w="$sampler_cpu" \
        'BEGIN { o = (b - a) / hz - (e - s) - c - w; printf "%.2f", (o < 0 ? 0 : o) }')

    # -c prints a counter after each DATA; the last one is what completed.
    local completed stored=-
    completed=$(tr '\r' '\n' <"$dir/source.out" | grep -E '^[0-9]+$' | tail -n 1 || true)
    [[ ${completed:-0} == "$count" ]] || run_failed "$dir" "smtp-source completed ${completed:-0} of $count messages against $srv"
    if [[ $srv == mailroom ]]; then
        # Every 250 means committed: the count must match while it runs.
        stored=$(mailroom_stored "$dir/data")
        if [[ $stored != "$count" ]]; then
            log "VERIFY FAILED: mailroom stored $stored of $count messages ($w, run $rep); see $BENCH_TMP/stored.err"
            VERIFY_FAILED=1
        fi
    fi
    stop_watch
    local mem=$WATCH_RESULT
    stop_server
    if [[ $srv == postfix ]]; then
        cp "$PF_ROOT/log/postfix.log" "$dir/server.log" 2>/dev/null || true
    fi

    local rss pss hwm procs
    rss=$(kv peak_rss_kib "$mem") pss=$(kv peak_pss_kib "$mem") hwm=$(kv hwm_kib "$mem") procs=$(kv max_procs "$mem")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$w" "$srv" "$rep" "$count" "$size" "$sessions" "${W_REUSE[$w]}" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }')" \
        "$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { printf "%.3f", b - a }')" \
        "$rss" "$pss" "$hwm" "$procs" "$completed" "$stored" "$client_cpu" "$other_cpu" "$sampler_cpu" >>"$RAW"
    tail -n 1 "$RAW" | awk -F'\t' '{
        mem = ($2 == "postfix") ? $11 : $10
        kind = ($2 == "postfix") ? "PSS sum" : "RSS"
        printf "  %-3s %-8s run %s: %5d msgs in %7.3f s = %7.0f msg/s; server CPU %6.2f s (%6.0f msg/CPU-s); peak %s %.1f MiB; client CPU %.2f s, other %.2f s\n",
            $1, $2, $3, $4, $8, $4 / $8, $9, ($9 > 0 ? $4 / $9 : 0), kind, mem / 1024, $16, $17 }' >&2
    # Keep the small per-run files; data directories and queues go.
    mkdir -p "$OUT_DIR/runs/$w-$srv-$rep"
    cp "$dir/source.out" "$dir/memory.txt" "$OUT_DIR/runs/$w-$srv-$rep/" 2>/dev/null || true
    tail -n 50 "$dir/server.log" >"$OUT_DIR/runs/$w-$srv-$rep/server.log.tail" 2>/dev/null || true
    rm -rf "$dir"
}

REV=-
if has_server mailroom; then
    REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
    [[ -z $(git -C "$ROOT" status --porcelain -- crates Cargo.lock 2>/dev/null) ]] || REV+=" + uncommitted changes"
fi
{
    echo "# mailroom SMTP benchmark $RUN_ID"
    echo "# host: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f MiB", $2 / 1024 }' /proc/meminfo), kernel $(uname -r)"
    echo "# scratch filesystem: $(stat -f -c %T "$BENCH_TMP") ($BENCH_TMP)"
    echo "# client: smtp-source (postfix $(/usr/sbin/postconf -h mail_version 2>/dev/null || echo '?'))"
    echo "# mailroom: $REV"
    echo "# reps=$REPS quick=$QUICK servers=$SERVERS workloads=$WORKLOADS"
    printf 'workload\tserver\trep\tmsgs\tsize\tsessions\treuse\tsecs\tcpu_secs\tpeak_rss_kib\tpeak_pss_kib\thwm_kib\tmax_procs\tcompleted\tstored\tclient_cpu_secs\tother_cpu_secs\tsampler_cpu_secs\n'
} >"$RAW"
grep '^#' "$RAW" | sed 's/^# //' >&2
# Other work on the machine during one second (the load average also
# counts tasks waiting for the disk, so it is a poor gauge here).
busy0=$(machine_busy)
sleep 1
busy=$(awk -v a="$busy0" -v b="$(machine_busy)" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / hz }')
if awk -v b="$busy" 'BEGIN { exit !(b > 0.2) }'; then
    log "warning: the machine is busy ($busy cores in use before the benchmark); busiest processes:"
    ps -eo pid,pcpu,etime,comm --sort=-pcpu | sed -n '1,4p' >&2
fi

for w in $WORKLOADS; do
    log "$w: ${W_DESC[$w]}, ${W_SESSIONS[$w]} sessions, ${W_COUNT[$w]} messages, $REPS run(s) per server"
    for ((rep = 1; rep <= REPS; rep++)); do
        for srv in $SERVERS; do
            run_one "$w" "$srv" "$rep"
        done
    done
done

python3 "$BENCH_DIR/lib/report.py" "$RAW" | tee "$OUT_DIR/summary.txt"
log "raw results: $RAW"
log "summary:     $OUT_DIR/summary.txt"
if ((VERIFY_FAILED)); then
    die "mailroom did not store every message it acknowledged (see VERIFY FAILED above)"
fi
