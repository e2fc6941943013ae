#!/usr/bin/env bash
# End-to-end relay benchmark: mail accepted over SMTP, delivered through DNS
# MX lookups to a counting sink; mailroom against a Postfix instance that
# relays to the same sink. See bench/README.md ("bench/relay.sh").
#
# Usage:
#   bench/relay.sh [--quick] [--no-build]     relay benchmark (mailroom, Postfix)
#   bench/relay.sh --deferred [--quick]       mailroom's memory with 100,000
#                                             deferred recipients queued
# Environment:
#   REPS=3                 runs per server, interleaved (--quick: 1)
#   SERVERS="mailroom postfix"
#   MESSAGES=20000         messages per run (--quick: 2000), one recipient each
#   DOMAINS=100            recipient domains d0..d99.bench.test, round robin
#   SESSIONS=50 SIZE=1024  sender sessions (connection reuse, pipelining), body octets
#   DEFERRED_MESSAGES=100000  for --deferred (--quick: 10000)
#   DEFERRED_HOW=refuse    refuse: the MX address refuses connections;
#                          451: the sink answers 451 after the data
#   HOLD=10                --deferred: seconds to keep watching once all are deferred
#   PORT_BASE=25300        mailroom intake PORT_BASE, Postfix intake +1,
#                          sink 127.0.0.2:+2, DNS 127.0.0.1:+3 (UDP and TCP)
#   DELIVERY_TIMEOUT=600   seconds to wait for the sink to see every message
#   BENCH_LOG_LEVEL=info   mailroom's [log] level
#   BENCH_AUTH_HASH=mailroom  the sender logs in (AUTH PLAIN) to relay through
#                          mailroom; mailroom: the user's hash comes from
#                          `mailroom hash-password` (argon2 defaults, 19 MiB
#                          per check); cheap: 64 KiB, 1 pass (see README)
#   BENCH_TMPDIR=/tmp      scratch (data directories, Postfix queue); not tmpfs
#   NO_BUILD=1 KEEP_TMP=1  as in bench/smtp.sh
# Variables named MAILROOM_* reach mailroom as config overrides, e.g.
#   MAILROOM_DELIVERY__CONCURRENCY=200 bench/relay.sh
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=lib/delivery.sh
source "$BENCH_DIR/lib/delivery.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

QUICK=0 MODE=relay
for arg in "$@"; do
    case $arg in
    --quick) QUICK=1 ;;
    --deferred) MODE=deferred ;;
    --no-build) NO_BUILD=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument $arg" ;;
    esac
done

SERVERS=${SERVERS:-mailroom postfix}
if ((QUICK)); then
    REPS=1
    MESSAGES=${MESSAGES:-2000}
    DEFERRED_MESSAGES=${DEFERRED_MESSAGES:-10000}
else
    REPS=${REPS:-3}
    MESSAGES=${MESSAGES:-20000}
    DEFERRED_MESSAGES=${DEFERRED_MESSAGES:-100000}
fi
DOMAINS=${DOMAINS:-100}
SESSIONS=${SESSIONS:-50}
SIZE=${SIZE:-1024}
DEFERRED_HOW=${DEFERRED_HOW:-refuse}
HOLD=${HOLD:-10}
PORT_BASE=${PORT_BASE:-25300}
PORT_MAILROOM=$PORT_BASE
PORT_POSTFIX=$((PORT_BASE + 1))
PORT_SINK=$((PORT_BASE + 2))
PORT_DNS=$((PORT_BASE + 3))
SINK_IP=127.0.0.2
REFUSE_IP=127.0.0.9
SUFFIX=bench.test
DELIVERY_TIMEOUT=${DELIVERY_TIMEOUT:-600}

for s in $SERVERS; do [[ $s == mailroom || $s == postfix ]] || die "unknown server $s (mailroom, postfix)"; done
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "REPS must be a positive number"
[[ $DEFERRED_HOW == refuse || $DEFERRED_HOW == 451 ]] || die "DEFERRED_HOW must be refuse or 451"
[[ $EUID -eq 0 ]] || die "run as root (a private Postfix instance needs it)"

BENCH_TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/mailroom-relay.XXXXXX")
chmod 755 "$BENCH_TMP"
RUN_ID=$(date +%Y%m%d-%H%M%S)
OUT_DIR="$BENCH_DIR/out/relay-$MODE-$RUN_ID"
mkdir -p "$OUT_DIR/runs"
SINK_PID=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_watch || true
    stop_server || true
    stop_helpers || true
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

ensure_postfix
ensure_python
raise_nofile
build 1

# Keeps what explains a failure in the output directory, then dies.
fail_run() {
    local dir=$1 what=$2 keep
    keep="$OUT_DIR/failed-$(basename "$dir")"
    mkdir -p "$keep"
    find "$dir" -maxdepth 1 -type f -exec cp {} "$keep"/ \; 2>/dev/null || true
    if [[ -n $SERVER_LOG ]]; then cp "$SERVER_LOG" "$keep/" 2>/dev/null || true; fi
    for f in send.out sink.out; do
        if [[ -f $dir/$f ]]; then
            log "$f:"
            tail -n 15 "$dir/$f" >&2
        fi
    done
    if [[ -n $SERVER_KIND && -n $SERVER_LOG ]]; then
        log "$SERVER_KIND log tail ($SERVER_LOG):"
        grep -v ' INFO ' "$SERVER_LOG" | tail -n 30 >&2 || true
    fi
    die "$what (logs kept in $keep)"
}

# Starts the sink on SINK_IP:PORT_SINK. $1: run dir, then sink options.
start_sink_helper() {
    local dir=$1
    shift
    require_free "$SINK_IP" "$PORT_SINK"
    start_helper sink "$dir/sink.out" "$LOADGEN" sink --listen "$SINK_IP:$PORT_SINK" "$@"
    SINK_PID=$HELPER_PID
    wait_listen "$SINK_IP" "$PORT_SINK" "$SINK_PID" 30 "$dir/sink.out"
}

# Waits until the sink has seen every message and exited; on timeout it
# is told to report (SIGINT) and the run fails.
wait_sink() {
    local dir=$1 deadline=$((SECONDS + DELIVERY_TIMEOUT))
    while ! proc_gone "$SINK_PID"; do
        if ((SECONDS >= deadline)); then
            kill -INT "$SINK_PID" 2>/dev/null || true
            sleep 1
            stop_helper "$SINK_PID"
            if [[ $SERVER_KIND == mailroom ]]; then log "mailroom's store: $(store_states "$dir/data")"; fi
            fail_run "$dir" "the sink did not receive all $MESSAGES messages within ${DELIVERY_TIMEOUT}s"
        fi
        if [[ -n $SERVER_KIND ]] && proc_gone "$SERVER_PID"; then
            fail_run "$dir" "$SERVER_KIND died while delivering"
        fi
        sleep 0.05
    done
    local rc=0
    wait "$SINK_PID" || rc=$?
    unset "HELPER_NAME[$SINK_PID]"
    ((rc == 0)) || fail_run "$dir" "the sink exited with status $rc"
}

# The Postfix relay: smtpd on 127.0.0.1:PORT_POSTFIX for mynetworks, every
# recipient to the sink as relayhost, no TLS, queue fsync as always.
setup_postfix_relay() {
    setup_postfix_instance "$BENCH_TMP/postfix" "127.0.0.1:$PORT_POSTFIX" "
myhostname = postfix.relay.bench.test
mydomain = relay.bench.test
myorigin = \$myhostname
mydestination =
local_recipient_maps =
relayhost = [$SINK_IP]:$PORT_SINK
default_transport = smtp
relay_transport = relay
smtp_tls_security_level = none
smtpd_tls_security_level = none
smtp_dns_support_level = disabled" "smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp"
}

RAW="$OUT_DIR/results.tsv"

# One relay run against $1 (mailroom|postfix), repetition $2.
relay_one() {
    local srv=$1 rep=$2 dir="$BENCH_TMP/runs/$1-$2"
    mkdir -p "$dir"
    start_sink_helper "$dir" --expect "$MESSAGES" --log "$dir/sink.log" --linger 2s
    local send_opts=(--addr "127.0.0.1:$PORT_MAILROOM")
    if [[ $srv == mailroom ]]; then
        write_mailroom_config "$dir" "$PORT_MAILROOM" "$PORT_DNS" "$PORT_SINK" 'tls = "none"'
        start_mailroom_config "$dir" "$PORT_MAILROOM"
        send_opts+=(--auth "$BENCH_USER:$BENCH_PASSWORD")
    else
        start_postfix "$dir" "$PORT_POSTFIX"
        send_opts=(--addr "127.0.0.1:$PORT_POSTFIX")
    fi
    start_watch "$dir/memory.txt"
    local cpu0 cpu1 rss0
    rss0=$(rss_kib "$SERVER_PID")
    cpu0=$(server_cpu)
    if ! "$LOADGEN" send "${send_opts[@]}" --sessions "$SESSIONS" --messages "$MESSAGES" --size "$SIZE" \
        --reuse --to-domains "$DOMAINS" --to-suffix "$SUFFIX" --stamp --acks "$dir/acks.txt" \
        >"$dir/send.out" 2>&1; then
        fail_run "$dir" "the sender failed against $srv"
    fi
    wait_sink "$dir"
    cpu1=$(server_cpu)

    # The server's own account: every recipient delivered (mailroom's
    # store, once the results are recorded; Postfix's log).
    local verified=ok states="" sent_lines
    if [[ $srv == mailroom ]]; then
        local deadline=$((SECONDS + 60))
        while :; do
            states=$(store_states "$dir/data")
            [[ $(kv delivered "$states") == "$MESSAGES" && $(kv total "$states") == "$MESSAGES" ]] && break
            if ((SECONDS >= deadline)); then
                log "VERIFY FAILED: mailroom's store says $states (expected delivered=$MESSAGES)"
                verified=store
                break
            fi
            sleep 0.2
        done
    else
        local deadline=$((SECONDS + 60))
        while :; do
            sent_lines=$(grep -c 'status=sent' "$SERVER_LOG" || true)
            ((sent_lines >= MESSAGES)) && break
            if ((SECONDS >= deadline)); then
                log "VERIFY FAILED: Postfix logged $sent_lines status=sent of $MESSAGES"
                verified=log
                break
            fi
            sleep 0.2
        done
        states="status_sent=$sent_lines"
    fi
    stop_watch
    local mem=$WATCH_RESULT
    stop_server
    if [[ $srv == postfix ]]; then cp "$PF_ROOT/log/postfix.log" "$dir/server.log"; fi

    local send_res sink_res ack_res
    send_res=$(grep '^RESULT' "$dir/send.out" | tail -n 1)
    sink_res=$(grep '^RESULT when=reached' "$dir/sink.out" | tail -n 1)
    local final_res
    final_res=$(grep '^RESULT when=' "$dir/sink.out" | tail -n 1)
    ack_res=$(python3 "$BENCH_DIR/lib/relay_report.py" latency "$dir/acks.txt" "$dir/sink.log")
    [[ $(kv unique "$sink_res") == "$MESSAGES" ]] || { log "VERIFY FAILED: sink saw $(kv unique "$sink_res") distinct messages"; verified=sink; }
    local dups
    dups=$(kv duplicates "$final_res")
    ((dups == 0)) || log "warning: $dups duplicate deliveries at the sink ($srv run $rep)"

    local first_ack last_ack last_arrival e2e_secs drain_ms
    first_ack=$(kv first_ack_ns "$send_res")
    last_ack=$(kv last_ack_ns "$send_res")
    last_arrival=$(kv last_ns "$sink_res")
    e2e_secs=$(awk -v a="$first_ack" -v b="$last_arrival" 'BEGIN { printf "%.4f", (b - a) / 1e9 }')
    # How long after the last 250 the last message reached the sink.
    drain_ms=$(awk -v a="$last_ack" -v b="$last_arrival" 'BEGIN { printf "%.1f", (b - a) / 1e6 }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$srv" "$rep" "$MESSAGES" "$(kv secs "$send_res")" "$(kv msg_per_sec "$send_res")" \
        "$e2e_secs" "$(awk -v n="$MESSAGES" -v s="$e2e_secs" 'BEGIN { printf "%.1f", (s > 0 ? n / s : 0) }')" \
        "$(kv p50_ms "$sink_res")" "$(kv p90_ms "$sink_res")" "$(kv p99_ms "$sink_res")" "$(kv max_ms "$sink_res")" \
        "$(kv ack_p50_ms "$ack_res")" "$(kv ack_p99_ms "$ack_res")" \
        "$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { printf "%.3f", b - a }')" \
        "$(kv peak_rss_kib "$mem")" "$(kv peak_pss_kib "$mem")" "$rss0" \
        "$(kv unique "$sink_res")" "$dups" "$(kv connections "$final_res")" "$(kv tx_per_conn "$final_res")" \
        "$verified" "${states// /,}" "$drain_ms" >>"$RAW"
    tail -n 1 "$RAW" | awk -F'\t' '{
        mem = ($1 == "postfix") ? $16 : $15
        printf "  %-8s run %s: %d msgs; intake %.0f msg/s; end to end %.3f s = %.0f msg/s (last arrival %.0f ms after the last 250); latency p50 %.0f ms p99 %.0f ms (from 250: p50 %.0f p99 %.0f); CPU %.2f s; peak %s %.1f MiB; %s connections, %s tx/conn; %s\n",
            $1, $2, $3, $5, $6, $7, $24, $8, $10, $12, $13, $14, ($1 == "postfix" ? "PSS" : "RSS"), mem / 1024, $20, $21, $22 }' >&2
    mkdir -p "$OUT_DIR/runs/$srv-$rep"
    cp "$dir/send.out" "$dir/sink.out" "$dir/memory.txt" "$OUT_DIR/runs/$srv-$rep/" 2>/dev/null || true
    if [[ -f $dir/mailroom.toml ]]; then cp "$dir/mailroom.toml" "$OUT_DIR/runs/$srv-$rep/"; fi
    grep -v ' INFO ' "$dir/server.log" 2>/dev/null | tail -n 50 >"$OUT_DIR/runs/$srv-$rep/server.log.notinfo" || true
    rm -rf "$dir"
}

# --deferred: DEFERRED_MESSAGES to DOMAINS domains whose MX refuses
# connections (or answers 451), then mailroom's memory with all of them
# deferred, and again after a restart that loads them from the store.
deferred_run() {
    local dir="$BENCH_TMP/runs/deferred" mx=$REFUSE_IP
    mkdir -p "$dir"
    if [[ $DEFERRED_HOW == 451 ]]; then
        mx=$SINK_IP
        start_sink_helper "$dir" --data-reply 451
    else
        ! port_open "$REFUSE_IP" "$PORT_SINK" || die "$REFUSE_IP:$PORT_SINK must refuse connections but something listens there"
    fi
    start_dns "$dir/dns.out" "$PORT_DNS" "$mx" "$DOMAINS" "$SUFFIX"
    write_mailroom_config "$dir" "$PORT_MAILROOM" "$PORT_DNS" "$PORT_SINK" 'tls = "none"'
    start_mailroom_config "$dir" "$PORT_MAILROOM"
    local rss_start
    rss_start=$(rss_kib "$SERVER_PID")
    start_watch "$dir/memory.txt"
    log "deferred: sending $DEFERRED_MESSAGES messages to $DOMAINS domains whose MX ($mx) $([[ $DEFERRED_HOW == 451 ]] && echo 'answers 451' || echo 'refuses connections')"
    local t0=$SECONDS
    if ! "$LOADGEN" send --addr "127.0.0.1:$PORT_MAILROOM" --auth "$BENCH_USER:$BENCH_PASSWORD" \
        --sessions "$SESSIONS" --messages "$DEFERRED_MESSAGES" --size "$SIZE" --reuse \
        --to-domains "$DOMAINS" --to-suffix "$SUFFIX" --stamp >"$dir/send.out" 2>&1; then
        fail_run "$dir" "the sender failed"
    fi
    log "  $(grep '^sent:' "$dir/send.out")"
    local rss_intake states deadline=$((SECONDS + DELIVERY_TIMEOUT)) last=""
    rss_intake=$(rss_kib "$SERVER_PID")
    # Every recipient has had its first attempt when none is still queued.
    while :; do
        proc_gone "$SERVER_PID" && server_died
        states=$(store_states "$dir/data")
        if [[ $(kv queued "$states") == 0 && $(kv total "$states") == "$DEFERRED_MESSAGES" ]]; then
            break
        fi
        if ((SECONDS >= deadline)); then
            fail_run "$dir" "not every recipient was attempted within ${DELIVERY_TIMEOUT}s: $states"
        fi
        if [[ $states != "$last" && $((SECONDS % 5)) == 0 ]]; then
            log "  store: $states; RSS $(($(rss_kib "$SERVER_PID") / 1024)) MiB"
            last=$states
        fi
        sleep 1
    done
    local t_all=$((SECONDS - t0)) rss_all rss_held
    rss_all=$(rss_kib "$SERVER_PID")
    log "  all attempted after ${t_all}s: $states; RSS $((rss_all / 1024)) MiB; holding ${HOLD}s"
    sleep "$HOLD"
    rss_held=$(rss_kib "$SERVER_PID")
    local states_held cpu_total
    states_held=$(store_states "$dir/data")
    cpu_total=$(server_cpu)
    stop_watch
    local mem=$WATCH_RESULT
    stop_server
    local db_mib
    db_mib=$(du -sm "$dir/data" | cut -f1)

    # Restart: the scheduler loads every pending recipient from the store.
    log "  restarting mailroom on the same data ($DEFERRED_MESSAGES recipients pending)"
    : >"$dir/server.log"
    local t_restart=$EPOCHREALTIME
    start_mailroom_config "$dir" "$PORT_MAILROOM"
    local ready_secs
    ready_secs=$(awk -v a="$t_restart" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
    start_watch "$dir/memory-restart.txt"
    sleep "$HOLD"
    local rss_restart loaded
    rss_restart=$(rss_kib "$SERVER_PID")
    loaded=$(grep -o 'queue loaded recipients=[0-9]*' "$dir/server.log" | head -n 1 || true)
    stop_watch
    local mem_restart=$WATCH_RESULT
    stop_server

    cp "$dir/send.out" "$dir/memory.txt" "$dir/memory-restart.txt" "$dir/mailroom.toml" "$OUT_DIR/" 2>/dev/null || true
    grep -v ' INFO ' "$dir/server.log" | tail -n 50 >"$OUT_DIR/server.log.notinfo" || true
    {
        echo "# mailroom deferred-queue memory $RUN_ID"
        echo "# host: $(nproc) cores, kernel $(uname -r); mailroom $REV; BENCH_AUTH_HASH=$BENCH_AUTH_HASH"
        echo "messages: $DEFERRED_MESSAGES to $DOMAINS domains, MX $([[ $DEFERRED_HOW == 451 ]] && echo 'answers 451 after DATA' || echo 'refuses connections')"
        echo "intake: $(grep '^sent:' "$dir/send.out")"
        echo "every recipient attempted (none queued) after: ${t_all} s from the start of sending"
        echo "store then: $states"
        echo "store after ${HOLD}s more: $states_held"
        echo "data directory: ${db_mib} MiB"
        echo "mailroom CPU for the whole run: ${cpu_total} s"
        printf 'RSS at start: %.1f MiB\n' "$(awk -v k="$rss_start" 'BEGIN { print k / 1024 }')"
        printf 'RSS after intake: %.1f MiB\n' "$(awk -v k="$rss_intake" 'BEGIN { print k / 1024 }')"
        printf 'RSS with all %s deferred: %.1f MiB (target < 100 MiB)\n' "$DEFERRED_MESSAGES" "$(awk -v k="$rss_all" 'BEGIN { print k / 1024 }')"
        printf 'RSS %ss later: %.1f MiB\n' "$HOLD" "$(awk -v k="$rss_held" 'BEGIN { print k / 1024 }')"
        printf 'peak RSS during the run: %.1f MiB (VmHWM %.1f MiB)\n' \
            "$(awk -v k="$(kv peak_rss_kib "$mem")" 'BEGIN { print k / 1024 }')" "$(awk -v k="$(kv hwm_kib "$mem")" 'BEGIN { print k / 1024 }')"
        echo "restart: ready (220) after ${ready_secs} s; ${loaded:-no 'queue loaded' line}"
        printf 'RSS %ss after the restart: %.1f MiB; peak %.1f MiB\n' "$HOLD" \
            "$(awk -v k="$rss_restart" 'BEGIN { print k / 1024 }')" "$(awk -v k="$(kv peak_rss_kib "$mem_restart")" 'BEGIN { print k / 1024 }')"
        local peak=$(( $(kv peak_rss_kib "$mem") > rss_restart ? $(kv peak_rss_kib "$mem") : rss_restart ))
        if ((rss_all < 100 * 1024 && peak < 100 * 1024)); then
            echo "target (< 100 MiB with $DEFERRED_MESSAGES deferred): met"
        else
            echo "target (< 100 MiB with $DEFERRED_MESSAGES deferred): **missed**"
        fi
    } | tee "$OUT_DIR/summary.txt"
}

REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
[[ -z $(git -C "$ROOT" status --porcelain -- crates Cargo.lock 2>/dev/null) ]] || REV+=" + uncommitted changes"

if [[ $MODE == deferred ]]; then
    deferred_run
    log "output: $OUT_DIR"
    exit 0
fi

{
    echo "# mailroom relay benchmark $RUN_ID"
    echo "# host: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f MiB", $2 / 1024 }' /proc/meminfo), kernel $(uname -r)"
    echo "# scratch filesystem: $(stat -f -c %T "$BENCH_TMP") ($BENCH_TMP)"
    echo "# mailroom AUTH hash: BENCH_AUTH_HASH=$BENCH_AUTH_HASH"
    echo "# mailroom: $REV; Postfix $(/usr/sbin/postconf -h mail_version 2>/dev/null || echo '?')"
    echo "# $MESSAGES messages of $SIZE body octets per run, one recipient each, $DOMAINS domains; sender: $SESSIONS sessions, connection reuse, pipelining; reps=$REPS"
    printf 'server\trep\tmsgs\tintake_secs\tintake_msg_s\te2e_secs\te2e_msg_s\tsink_p50_ms\tsink_p90_ms\tsink_p99_ms\tsink_max_ms\tack_p50_ms\tack_p99_ms\tcpu_secs\tpeak_rss_kib\tpeak_pss_kib\tstart_rss_kib\tunique\tduplicates\tconnections\ttx_per_conn\tverified\tstates\tdrain_ms\n'
} >"$RAW"
grep '^#' "$RAW" | sed 's/^# //' >&2

start_dns "$BENCH_TMP/dns.out" "$PORT_DNS" "$SINK_IP" "$DOMAINS" "$SUFFIX"
if [[ " $SERVERS " == *" postfix "* ]]; then setup_postfix_relay; fi
for ((rep = 1; rep <= REPS; rep++)); do
    for srv in $SERVERS; do
        log "$srv run $rep/$REPS: $MESSAGES messages"
        relay_one "$srv" "$rep"
    done
done

python3 "$BENCH_DIR/lib/relay_report.py" summary "$RAW" | tee "$OUT_DIR/summary.txt"
log "raw results: $RAW"
if grep -q '^VERIFY FAILED' "$OUT_DIR/summary.txt"; then
    die "not every message was delivered (see above)"
fi
