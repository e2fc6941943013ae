#!/usr/bin/env bash
# Interoperability: mailroom delivers varied messages to a real Postfix MX
# that stores them in a Maildir; every delivered message must equal what was
# sent, octet for octet, once the trace headers are removed. See
# bench/README.md ("bench/postfix-interop.sh").
#
# Usage:
#   bench/postfix-interop.sh [--no-build]
# Passes (PASSES="route mx", both by default):
#   route  a [[delivery.routes]] entry for interop.test -> 127.0.0.3:PORT,
#          tls = "none"
#   mx     DNS: d0.interop.test MX mx.interop.test A 127.0.0.3, delivery
#          to the MX port with tls = "opportunistic" (Postfix offers
#          STARTTLS with a self-signed certificate; the attempt must show TLS)
# Environment:
#   PORT_BASE=25320   mailroom 127.0.0.1:PORT_BASE, Postfix 127.0.0.3:+1,
#                     DNS 127.0.0.1:+2
#   TIMEOUT=120       seconds to wait for delivery
#   BENCH_TMPDIR NO_BUILD KEEP_TMP BENCH_LOG_LEVEL   as in bench/smtp.sh
# Exit status: 0 only when every message of every pass is identical.
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=lib/delivery.sh
source "$BENCH_DIR/lib/delivery.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

for arg in "$@"; do
    case $arg in
    --no-build) NO_BUILD=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument $arg" ;;
    esac
done

PASSES=${PASSES:-route mx}
PORT_BASE=${PORT_BASE:-25320}
PORT_MAILROOM=$PORT_BASE
PORT_POSTFIX=$((PORT_BASE + 1))
PORT_DNS=$((PORT_BASE + 2))
MX_IP=127.0.0.3
TIMEOUT=${TIMEOUT:-120}
for p in $PASSES; do [[ $p == route || $p == mx ]] || die "unknown pass $p (route, mx)"; done
[[ $EUID -eq 0 ]] || die "run as root (a private Postfix instance needs it)"

BENCH_TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/mailroom-interop.XXXXXX")
chmod 755 "$BENCH_TMP"
RUN_ID=$(date +%Y%m%d-%H%M%S)
OUT_DIR="$BENCH_DIR/out/interop-$RUN_ID"
mkdir -p "$OUT_DIR"

POSTFIX_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_server || true
    if [[ -n $POSTFIX_PID ]]; then stop_postfix_mx || true; fi
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
command -v openssl >/dev/null || die "openssl is needed for Postfix's STARTTLS certificate"
raise_nofile
build 1

MSGS="$BENCH_TMP/messages"
python3 "$BENCH_DIR/lib/interop.py" generate "$MSGS" >&2
COUNT=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$MSGS/manifest.json")

# The receiving MX: a private Postfix on 127.0.0.3 whose virtual(8) agent
# writes every recipient of interop.test and d0.interop.test into one
# Maildir, owned by nobody. STARTTLS offered (self-signed).
PF_DIR="$BENCH_TMP/postfix"
MAILDIR_BASE="$PF_DIR/mail"
mkdir -p "$PF_DIR/tls" "$MAILDIR_BASE"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=mx.interop.test" \
    -keyout "$PF_DIR/tls/key.pem" -out "$PF_DIR/tls/cert.pem" >"$BENCH_TMP/openssl.log" 2>&1 ||
    { cat "$BENCH_TMP/openssl.log" >&2; die "openssl could not make a certificate"; }
chown 65534:65534 "$MAILDIR_BASE"
setup_postfix_instance "$PF_DIR" "$MX_IP:$PORT_POSTFIX" "
myhostname = mx.interop.test
mydomain = interop.test
myorigin = \$myhostname
mydestination =
local_recipient_maps =
virtual_mailbox_domains = interop.test d0.interop.test
virtual_mailbox_base = $MAILDIR_BASE
virtual_mailbox_maps = static:inbox/
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
virtual_minimum_uid = 100
message_size_limit = 52428800
virtual_mailbox_limit = 52428800
smtputf8_enable = yes
local_header_rewrite_clients =
smtpd_tls_security_level = may
smtpd_tls_cert_file = $PF_DIR/tls/cert.pem
smtpd_tls_key_file = $PF_DIR/tls/key.pem
smtpd_tls_loglevel = 1
# Log the SMTP commands mailroom sends (not the message data), to check
# the MAIL parameters it passes on.
debug_peer_list = 127.0.0.1" "virtual    unix  - n n -     - virtual
tlsmgr     unix  - - n 1000? 1 tlsmgr"
SERVER_IP=$MX_IP
start_postfix "$BENCH_TMP" "$PORT_POSTFIX"
POSTFIX_PID=$SERVER_PID
SERVER_IP=""
# stop_server is for mailroom from here on; Postfix is stopped at the end.
SERVER_KIND=""
log "Postfix MX on $MX_IP:$PORT_POSTFIX (pid $POSTFIX_PID), Maildir $MAILDIR_BASE/inbox"

stop_postfix_mx() {
    local pids=()
    mapfile -t pids < <(proc_tree "$POSTFIX_PID")
    POSTFIX_PID=""
    /usr/sbin/postfix -c "$PF_CONF" stop >/dev/null 2>&1 || true
    wait_gone_or_kill 20 "${pids[@]}"
}

# MAIL parameters the messages are sent to mailroom with; mailroom must pass
# them on to Postfix.
WANT_8BIT=$(python3 -c 'import json,sys; print(sum("BODY=8BITMIME" in m["options"] for m in json.load(open(sys.argv[1]))))' "$MSGS/manifest.json")
WANT_UTF8=$(python3 -c 'import json,sys; print(sum("SMTPUTF8" in m["options"] for m in json.load(open(sys.argv[1]))))' "$MSGS/manifest.json")

FAILED=0
for pass in $PASSES; do
    pf_log_start=$(wc -l <"$PF_DIR/log/postfix.log")
    dir="$BENCH_TMP/$pass"
    mkdir -p "$dir"
    rm -rf "$MAILDIR_BASE/inbox"
    if [[ $pass == route ]]; then
        domain=interop.test
        write_mailroom_config "$dir" "$PORT_MAILROOM" "" 25 "tls = \"none\"

[[delivery.routes]]
domain = \"interop.test\"
relay = \"$MX_IP:$PORT_POSTFIX\"
tls = \"none\""
    else
        domain=d0.interop.test
        start_dns "$dir/dns.out" "$PORT_DNS" "$MX_IP" 1 interop.test
        write_mailroom_config "$dir" "$PORT_MAILROOM" "$PORT_DNS" "$PORT_POSTFIX" 'tls = "opportunistic"'
    fi
    start_mailroom_config "$dir" "$PORT_MAILROOM"
    log "pass $pass: sending $COUNT messages for <local>@$domain through mailroom"
    if ! python3 "$BENCH_DIR/lib/interop.py" send "$MSGS" 127.0.0.1 "$PORT_MAILROOM" \
        "$BENCH_USER" "$BENCH_PASSWORD" "$domain" "$pass" >"$dir/send.out" 2>&1; then
        cat "$dir/send.out" >&2
        tail -n 20 "$SERVER_LOG" >&2
        die "sending to mailroom failed (pass $pass)"
    fi
    # mailroom has delivered when every recipient is; Postfix has when the
    # Maildir holds them all and its queue is empty.
    deadline=$((SECONDS + TIMEOUT))
    while :; do
        states=$(store_states "$dir/data")
        files=$(find "$MAILDIR_BASE/inbox/new" -type f 2>/dev/null | wc -l)
        queued=$(find "$PF_DIR/spool/active" "$PF_DIR/spool/incoming" "$PF_DIR/spool/deferred" -type f 2>/dev/null | wc -l)
        if [[ $(kv delivered "$states") == "$COUNT" ]] && ((files >= COUNT && queued == 0)); then
            break
        fi
        if ((SECONDS >= deadline)); then
            log "pass $pass: mailroom store: $states; Maildir files: $files; Postfix queue files: $queued"
            grep -v ' INFO ' "$SERVER_LOG" | tail -n 20 >&2 || true
            grep -E 'status=(deferred|bounced)|warning|fatal|error' "$PF_DIR/log/postfix.log" | tail -n 20 >&2 || true
            FAILED=1
            break
        fi
        sleep 0.2
    done
    # How mailroom delivered: host, TLS, reply, per attempt.
    python3 - "$dir/data/mailroom.db" >"$dir/attempts.txt" <<'EOF' || true
import sqlite3, sys
c = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
for row in c.execute("SELECT outcome, mx_host, ip, tls, code, reply FROM attempts ORDER BY at"):
    print(" | ".join("" if v is None else str(v) for v in row))
EOF
    stop_server
    if [[ $pass == mx ]]; then stop_helper "$DNS_PID"; fi
    if [[ $pass == mx ]]; then
        notls=$(awk -F' [|] ' '$4 == "" { n++ } END { print n + 0 }' "$dir/attempts.txt")
        if ((notls > 0)) || [[ ! -s $dir/attempts.txt ]]; then
            log "FAIL pass mx: $notls attempt(s) without TLS, expected STARTTLS to Postfix:"
            head -n 5 "$dir/attempts.txt" >&2
            FAILED=1
        else
            log "pass mx: every attempt used TLS ($(head -n 1 "$dir/attempts.txt" | cut -d'|' -f4 | xargs))"
        fi
    fi
    # The commands Postfix's smtpd logged for this pass.
    tail -n +"$((pf_log_start + 1))" "$PF_DIR/log/postfix.log" | grep -E 'smtpd.*: < [^:]*: MAIL FROM:' >"$dir/mail-from.txt" || true
    got_8bit=$(grep -c 'BODY=8BITMIME' "$dir/mail-from.txt" || true)
    got_utf8=$(grep -c 'SMTPUTF8' "$dir/mail-from.txt" || true)
    if ((got_8bit == WANT_8BIT && got_utf8 == WANT_UTF8)); then
        log "pass $pass: Postfix saw BODY=8BITMIME on $got_8bit and SMTPUTF8 on $got_utf8 MAIL commands, as sent to mailroom"
    else
        log "FAIL pass $pass: Postfix saw BODY=8BITMIME on $got_8bit MAIL commands (want $WANT_8BIT), SMTPUTF8 on $got_utf8 (want $WANT_UTF8):"
        head -n 20 "$dir/mail-from.txt" >&2
        FAILED=1
    fi
    if ! python3 "$BENCH_DIR/lib/interop.py" compare "$MSGS" "$MAILDIR_BASE/inbox" "$pass" | tee "$dir/compare.txt"; then
        FAILED=1
        mkdir -p "$OUT_DIR/failed-$pass"
        cp -r "$MAILDIR_BASE/inbox" "$OUT_DIR/failed-$pass/maildir" 2>/dev/null || true
        cp "$SERVER_LOG" "$dir/attempts.txt" "$OUT_DIR/failed-$pass/" 2>/dev/null || true
    fi
    cp "$dir/compare.txt" "$OUT_DIR/compare-$pass.txt"
    cp "$dir/attempts.txt" "$OUT_DIR/attempts-$pass.txt"
    cp "$dir/mailroom.toml" "$OUT_DIR/mailroom-$pass.toml"
    cp "$dir/mail-from.txt" "$OUT_DIR/mail-from-$pass.txt"
done
cp "$PF_DIR/log/postfix.log" "$PF_CONF/main.cf" "$OUT_DIR/" 2>/dev/null || true

log "results: $OUT_DIR"
if ((FAILED)); then
    die "interop FAILED (see above; Maildir copies and logs in $OUT_DIR/failed-*)"
fi
log "interop PASSED: $COUNT messages x passes ($PASSES) identical after Postfix delivery"
