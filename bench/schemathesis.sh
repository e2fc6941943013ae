#!/usr/bin/env bash
# Fuzzes mailroom's HTTP API with Schemathesis, driven by the OpenAPI 3.1
# document the server itself serves at /api/v1/openapi.json.
#
# What it does:
#   1. installs Schemathesis from PyPI into a venv (bench/out/schemathesis-venv)
#      unless the venv, or ST_BIN, already has it;
#   2. builds mailroom (cargo build --release -p mailroom) into
#      $CARGO_TARGET_DIR (default: the workspace's own target/);
#   3. starts `mailroom serve` on free loopback ports in a temporary directory
#      with an admin key, an MX listener and outbound mail parked (every
#      domain routed to 127.0.0.1:1, first retry in an hour), then creates an
#      account and an API key for it through the API;
#   4. runs `schemathesis run` twice, as the tenant (the account's key) and
#      as the operator (the admin key), with the checks not_a_server_error
#      (no 5xx), status_code_conformance, content_type_conformance,
#      response_headers_conformance and response_schema_conformance;
#   5. stops the server with SIGTERM (also on Ctrl-C or a failure), prints a
#      summary and exits 1 when Schemathesis found failures (2 on a setup
#      error). Reports (JUnit, NDJSON, pytest repros), Schemathesis' output
#      and the server log go to bench/out/schemathesis-<time>/.
#
# Usage:
#   bench/schemathesis.sh [--quick] [--no-build] [--keep-tmp]
#   CARGO_TARGET_DIR=/work/target-schema bench/schemathesis.sh
#   ST_RUNS=account ST_MAX_TIME=60 bench/schemathesis.sh --no-build
#
# Options:
#   --quick          ST_MAX_EXAMPLES=10, ST_MAX_TIME=45 (a smoke test)
#   --no-build       use the binary already built ($BENCH_MAILROOM_BIN)
#   --keep-tmp       keep the server's temporary directory (also KEEP_TMP=1)
# Environment:
#   CARGO_TARGET_DIR     cargo's target directory (default: <workspace>/target)
#   BENCH_MAILROOM_BIN   the binary (default: $CARGO_TARGET_DIR/release/mailroom)
#   ST_RUNS="account admin"   which identities to run as, in this order
#   ST_MAX_EXAMPLES=50   --max-examples: test cases per operation and phase
#   ST_MAX_TIME=150      --max-time: seconds per run (each of ST_RUNS)
#   ST_WORKERS=2         --workers
#   ST_SEED              --seed, for a reproducible run (default: random)
#   ST_CHECKS            override the comma-separated list of checks
#   ST_PHASES            --phases (default: all: examples,coverage,fuzzing,stateful)
#   ST_EXTRA_ARGS        more arguments for `schemathesis run`, word-split
#   ST_VERSION           pin the version pip installs (e.g. 4.32.5)
#   ST_VENV              the venv (default: bench/out/schemathesis-venv)
#   ST_BIN               a schemathesis executable to use instead of the venv
#   BENCH_TMPDIR=/tmp    where the temporary server directory is made
#   BENCH_LOG_LEVEL=info the server's [log] level
# (Variables named MAILROOM_* reach mailroom as config overrides, which is why
# the knobs here use other prefixes.)
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
export LC_ALL=C

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "FATAL: $*"
    exit 2
}

QUICK=0 NO_BUILD=${NO_BUILD:-0} KEEP_TMP=${KEEP_TMP:-0}
for arg in "$@"; do
    case $arg in
    --quick) QUICK=1 ;;
    --no-build) NO_BUILD=1 ;;
    --keep-tmp) KEEP_TMP=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument $arg" ;;
    esac
done

if ((QUICK)); then
    ST_MAX_EXAMPLES=${ST_MAX_EXAMPLES:-10}
    ST_MAX_TIME=${ST_MAX_TIME:-45}
fi
ST_MAX_EXAMPLES=${ST_MAX_EXAMPLES:-50}
ST_MAX_TIME=${ST_MAX_TIME:-150}
ST_WORKERS=${ST_WORKERS:-2}
ST_RUNS=${ST_RUNS:-account admin}
ST_CHECKS=${ST_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance}
ST_VENV=${ST_VENV:-$BENCH_DIR/out/schemathesis-venv}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
MAILROOM_BIN_PATH=${BENCH_MAILROOM_BIN:-$TARGET_DIR/release/mailroom}
ADMIN_KEY="schemathesis-admin-key-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"

for v in ST_MAX_EXAMPLES ST_MAX_TIME ST_WORKERS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive number"
done
for r in $ST_RUNS; do
    [[ $r == admin || $r == account ]] || die "ST_RUNS: unknown identity $r (admin, account)"
done
command -v python3 >/dev/null || die "python3 is needed (Schemathesis is a Python tool)"
command -v curl >/dev/null || die "curl is needed"

RUN_ID=$(date +%Y%m%d-%H%M%S)
OUT_DIR="$BENCH_DIR/out/schemathesis-$RUN_ID"
mkdir -p "$OUT_DIR"
# What was tested: the tree may hold uncommitted work.
{ git -C "$ROOT" rev-parse HEAD && git -C "$ROOT" status --short; } >"$OUT_DIR/source.txt" 2>/dev/null || true
TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/mailroom-schemathesis.XXXXXX")
SERVER_PID=""

stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    local pid=$SERVER_PID i
    SERVER_PID=""
    kill -0 "$pid" 2>/dev/null || return 0
    log "stopping mailroom (pid $pid, SIGTERM)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "mailroom did not stop within 20 s; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_server || true
    [[ -f $TMP/server.log ]] && cp "$TMP/server.log" "$OUT_DIR/server.log" 2>/dev/null
    if ((KEEP_TMP)); then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 1. Schemathesis --------------------------------------------------------
if [[ -n ${ST_BIN:-} ]]; then
    [[ -x $ST_BIN ]] || die "ST_BIN=$ST_BIN is not executable"
    SCHEMATHESIS=$ST_BIN
else
    SCHEMATHESIS=$ST_VENV/bin/schemathesis
    if [[ ! -x $SCHEMATHESIS ]]; then
        log "installing schemathesis${ST_VERSION:+==$ST_VERSION} from PyPI into $ST_VENV"
        python3 -m venv "$ST_VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
        "$ST_VENV/bin/pip" install --quiet --upgrade pip >"$OUT_DIR/pip.log" 2>&1 || true
        if ! "$ST_VENV/bin/pip" install "schemathesis${ST_VERSION:+==$ST_VERSION}" >>"$OUT_DIR/pip.log" 2>&1; then
            tail -n 20 "$OUT_DIR/pip.log" >&2
            die "pip install schemathesis failed"
        fi
    fi
fi
ST_VERSION_FOUND=$("$SCHEMATHESIS" --version 2>/dev/null | awk '{print $NF}')
log "schemathesis $ST_VERSION_FOUND"
case $ST_VERSION_FOUND in
4.* | [5-9].*) ;;
*) die "schemathesis $ST_VERSION_FOUND is too old: this script uses the 4.x command line" ;;
esac
# Every check named must exist in this version (they were renamed across
# majors); `run --help` lists the ones it knows.
ST_HELP=$("$SCHEMATHESIS" run --help)
for c in ${ST_CHECKS//,/ }; do
    grep -qw -- "$c" <<<"$ST_HELP" || die "this schemathesis has no check named $c (see: $SCHEMATHESIS run --help)"
done

# --- 2. Build ---------------------------------------------------------------
if ((NO_BUILD)); then
    log "--no-build: using $MAILROOM_BIN_PATH"
else
    log "cargo build --release -p mailroom (CARGO_TARGET_DIR=$TARGET_DIR; waits for cargo's lock if another build holds it)"
    if ! (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p mailroom) >"$OUT_DIR/build.log" 2>&1; then
        grep -E '^error' -A 8 "$OUT_DIR/build.log" | head -n 40 >&2 || true
        tail -n 5 "$OUT_DIR/build.log" >&2
        die "build failed (log: $OUT_DIR/build.log)"
    fi
fi
[[ -x $MAILROOM_BIN_PATH ]] || die "$MAILROOM_BIN_PATH is missing (build it, or set BENCH_MAILROOM_BIN)"

# --- 3. Server --------------------------------------------------------------
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

write_config() {
    cat >"$TMP/mailroom.toml" <<EOF
hostname = "mx.schemathesis.test"
data_dir = "$TMP/data"
local_domains = ["schemathesis.test"]
shutdown_timeout = "5s"

[log]
level = "${BENCH_LOG_LEVEL:-info}"

[[smtp.listeners]]
addr = "127.0.0.1:$SMTP_PORT"
role = "mx"
tls = "none"

[http]
addr = "127.0.0.1:$HTTP_PORT"
admin_key = "$ADMIN_KEY"

# Nothing is meant to leave: every domain goes to a closed port, and the
# first retry is an hour away.
[delivery]
retry_initial = "1h"
retry_max = "1h"

[[delivery.routes]]
domain = "*"
relay = "127.0.0.1:1"
tls = "none"
EOF
}

# Starts the server and waits for /healthz; returns 1 when it exited early
# (most likely: a port taken between picking it and binding it).
start_server() {
    write_config
    # MAILROOM_* variables in the caller's environment reach the server as
    # config overrides (on purpose: MAILROOM_HTTP__MAX_BODY_SIZE=...).
    "$MAILROOM_BIN_PATH" serve --config "$TMP/mailroom.toml" >"$TMP/server.log" 2>&1 &
    SERVER_PID=$!
    local deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            wait "$SERVER_PID" 2>/dev/null || true
            SERVER_PID=""
            return 1
        fi
        if curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$HTTP_PORT/healthz" 2>/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    tail -n 30 "$TMP/server.log" >&2
    die "mailroom did not answer /healthz within 30 s"
}

for attempt in 1 2 3; do
    read -r SMTP_PORT HTTP_PORT < <(free_ports 2)
    if start_server; then break; fi
    if ((attempt == 3)) || ! grep -qi "listen\|address in use" "$TMP/server.log"; then
        tail -n 30 "$TMP/server.log" >&2
        die "mailroom exited at start"
    fi
    log "a port was taken; retrying with other ports"
done
BASE="http://127.0.0.1:$HTTP_PORT"
log "mailroom (pid $SERVER_PID) serves the API on $BASE, SMTP on 127.0.0.1:$SMTP_PORT"

# An API call as the admin; prints the body, fails unless the status is $1.
api() {
    local want=$1 method=$2 path=$3 body=${4:-} out status
    out=$(curl -sS --max-time 10 -X "$method" -H "Authorization: Bearer $ADMIN_KEY" \
        ${body:+-H "Content-Type: application/json" --data "$body"} \
        -w '\n%{http_code}' "$BASE$path") || die "$method $path: curl failed"
    status=${out##*$'\n'}
    out=${out%$'\n'*}
    [[ $status == "$want" ]] || die "$method $path answered $status, not $want: $out"
    printf '%s' "$out"
}
json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

curl -fsS --max-time 10 "$BASE/api/v1/openapi.json" -o "$OUT_DIR/openapi.json" || die "cannot fetch the OpenAPI document"
ACCOUNT_ID=$(api 201 POST /api/v1/accounts '{"name":"schemathesis","allowed_sender_domains":[]}' | json_field id)
ACCOUNT_KEY=$(api 201 POST "/api/v1/accounts/$ACCOUNT_ID/keys" '{"name":"schemathesis"}' | json_field secret)
log "account $ACCOUNT_ID with key ${ACCOUNT_KEY:0:11}..."

# The account key must still work before its run: the admin run may, in
# principle, revoke it or suspend the account. Mint a fresh one if so.
fresh_account_key() {
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 \
        -H "Authorization: Bearer $ACCOUNT_KEY" "$BASE/api/v1/messages?limit=1")
    [[ $code == 200 ]] && return 0
    log "the account key answers $code now; making a new account and key"
    ACCOUNT_ID=$(api 201 POST /api/v1/accounts "{\"name\":\"schemathesis-$RANDOM$RANDOM\"}" | json_field id)
    ACCOUNT_KEY=$(api 201 POST "/api/v1/accounts/$ACCOUNT_ID/keys" '{"name":"schemathesis"}' | json_field secret)
}

# --- 4. Schemathesis runs ---------------------------------------------------
declare -A RC
for who in $ST_RUNS; do
    if [[ $who == account ]]; then
        fresh_account_key
        key=$ACCOUNT_KEY
    else
        key=$ADMIN_KEY
    fi
    dir="$OUT_DIR/$who"
    mkdir -p "$dir"
    args=(
        run "$BASE/api/v1/openapi.json"
        --url "$BASE"
        -H "Authorization: Bearer $key"
        --generation-with-security-parameters false
        --checks "$ST_CHECKS"
        --max-examples "$ST_MAX_EXAMPLES"
        --max-time "$ST_MAX_TIME"
        --workers "$ST_WORKERS"
        --request-timeout 30
        --continue-on-failure
        --no-color
        --report junit,ndjson,pytest
        --report-junit-path "$dir/junit.xml"
        --report-ndjson-path "$dir/events.ndjson"
        --report-pytest-path "$dir/test_repro.py"
    )
    # A tenant may revoke and rotate its own keys, and Schemathesis finds
    # their ids (GET .../keys): once it rotates the key it runs with, every
    # later request is a 401. The admin run covers these two operations.
    [[ $who == account ]] && args+=(
        --exclude-name "DELETE /api/v1/accounts/{id}/keys/{key_id}"
        --exclude-name "POST /api/v1/accounts/{id}/keys/{key_id}/rotate"
    )
    [[ -n ${ST_SEED:-} ]] && args+=(--seed "$ST_SEED")
    [[ -n ${ST_PHASES:-} ]] && args+=(--phases "$ST_PHASES")
    # shellcheck disable=SC2206 # word splitting is the point
    [[ -n ${ST_EXTRA_ARGS:-} ]] && args+=($ST_EXTRA_ARGS)
    log "schemathesis as $who: --max-examples $ST_MAX_EXAMPLES --max-time $ST_MAX_TIME, checks $ST_CHECKS"
    set +e
    # Keep the key out of the saved command line.
    printf '%q ' "$SCHEMATHESIS" "${args[@]}" | sed "s/$key/<$who key>/g" >"$dir/command.txt"
    # From bench/out, so its example database (.schemathesis/) lands there.
    (cd "$BENCH_DIR/out" && "$SCHEMATHESIS" "${args[@]}") 2>&1 | tee "$dir/output.txt"
    RC[$who]=${PIPESTATUS[0]}
    set -e
    kill -0 "$SERVER_PID" 2>/dev/null || {
        tail -n 40 "$TMP/server.log" >&2
        die "mailroom died during the $who run"
    }
done

# --- 5. Stop and summarize --------------------------------------------------
stop_server
cp "$TMP/server.log" "$OUT_DIR/server.log"
PANICS=$(grep -c "panicked" "$OUT_DIR/server.log" || true)
ERRORS=$(grep -c " ERROR " "$OUT_DIR/server.log" || true)

echo
echo "== schemathesis $ST_VERSION_FOUND against mailroom: summary =="
failed=0
for who in $ST_RUNS; do
    # Schemathesis' own SUMMARY block holds the totals.
    out="$OUT_DIR/$who/output.txt"
    final=$(grep -E '^=+ .* in [0-9.]+s =+$' "$out" | tail -n 1 | tr -d '=' | tr -s ' ' || true)
    tested=$(sed -n '/= SUMMARY =/,$ s/^ *Tested: *//p' "$out" | head -n 1)
    cases=$(sed -n '/^Test cases:/{n;s/^ *//;p}' "$out" | head -n 1)
    printf '%-8s exit %s, operations tested: %s, test cases: %s;%s\n' \
        "$who" "${RC[$who]}" "${tested:-?}" "${cases:-?}" "${final:- no summary (see $out)}"
    sed -n '/= SUMMARY =/,$ {/^Failures:/,/^$/{/^Failures:/d;/^$/d;s/^ */         /;p}}' "$out"
    # One line per failing test case (operation, check, status, error code)
    # from the JUnit report; output.txt has the curl command for each.
    python3 - "$OUT_DIR/$who/junit.xml" <<'EOF' || true
import re, sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    sys.exit(0)
for case in root.iter("testcase"):
    for f in list(case.iter("failure")) + list(case.iter("error")):
        for block in re.split(r"\n(?=\d+\. Test Case ID)", f.text or f.get("message") or ""):
            checks = ", ".join(re.findall(r"^- (.+)$", block, re.M)) or f.get("message") or "?"
            status = re.search(r"Received: (\d+)|^\[(\d+)\]", block, re.M)
            code = re.search(r'"code":"([^"]+)"', block)
            print(f"         FAIL {case.get('name')}: {checks}"
                  + (f", got {status.group(1) or status.group(2)}" if status else "")
                  + (f" {code.group(1)}" if code else ""))
EOF
    [[ ${RC[$who]} == 0 ]] || failed=1
done
echo "server log: $ERRORS ERROR lines, $PANICS panics ($OUT_DIR/server.log)"
echo "reports, repro commands and output: $OUT_DIR"
exit "$failed"
