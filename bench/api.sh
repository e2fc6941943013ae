#!/usr/bin/env bash
# HTTP API benchmark: durable sends per second and latency with 64
# concurrent clients (wrk), then GET /api/v1/messages/{id} latency.
# See bench/README.md ("bench/api.sh").
#
# Usage:
#   bench/api.sh [--quick] [--no-build]
# Environment:
#   REPS=3            runs per measurement (--quick: 1)
#   DURATION=20s      each wrk run (--quick: 5s)
#   CONNECTIONS=64    concurrent clients; THREADS=2 wrk threads
#   SIZE=1024         octets of text body per message
#   PORT=28080        the API's port (SMTP listens on PORT+1)
#   BENCH_TMPDIR=/tmp scratch (data directory); a real disk, not tmpfs
#   BENCH_LOG_LEVEL=info, NO_BUILD=1, KEEP_TMP=1 as in bench/smtp.sh
# Messages go to the server's local domain, so they are stored and marked
# delivered at intake: the run measures the API and the durable commit, not
# outbound delivery (bench/relay.sh covers that).
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
if ((QUICK)); then REPS=1 DURATION=${DURATION:-5s}; else REPS=${REPS:-3} DURATION=${DURATION:-20s}; fi
CONNECTIONS=${CONNECTIONS:-64} THREADS=${THREADS:-2} SIZE=${SIZE:-1024} PORT=${PORT:-28080}
ADMIN_KEY=bench-admin-key-0123456789abcdef

command -v wrk >/dev/null || { log "installing wrk"; apt-get install -y -qq wrk >/dev/null; }
raise_nofile
BENCH_TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/mailroom-api-bench.XXXXXX")
OUT="$BENCH_DIR/out/api-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
cleanup() {
    stop_watch
    stop_server
    [[ ${KEEP_TMP:-0} == 1 ]] || rm -rf "$BENCH_TMP"
}
trap cleanup EXIT
build 1

mkdir -p "$BENCH_TMP/data"
cat >"$BENCH_TMP/mailroom.toml" <<CONF
hostname = "bench.test"
data_dir = "$BENCH_TMP/data"
local_domains = ["bench.test"]
shutdown_timeout = "5s"

[[smtp.listeners]]
addr = "127.0.0.1:$((PORT + 1))"
role = "mx"
tls = "none"

[http]
addr = "127.0.0.1:$PORT"
admin_key = "$ADMIN_KEY"

[log]
level = "$BENCH_LOG_LEVEL"
CONF
SERVER_KIND=mailroom SERVER_PORT=$((PORT + 1)) SERVER_LOG="$BENCH_TMP/server.log"
"$BENCH_MAILROOM_BIN" serve --config "$BENCH_TMP/mailroom.toml" >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!
wait_greeting 60
BASE="http://127.0.0.1:$PORT"

# An account and its key: the benchmark sends as a tenant, as apps do.
KEY=$(python3 - "$BASE" "$ADMIN_KEY" <<'PY'
import json, sys, urllib.request
base, admin = sys.argv[1], sys.argv[2]
def call(method, path, body, key):
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))
account = call("POST", "/api/v1/accounts", {"name": "bench"}, admin)
print(call("POST", f"/api/v1/accounts/{account['id']}/keys", {"name": "bench"}, admin)["secret"])
PY
)
TEXT=$(python3 -c "print('x' * $SIZE)")
cat >"$BENCH_TMP/send.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"from":"app@bench.test","to":"user@bench.test","subject":"bench","text":"$TEXT"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
LUA
ID=$(curl -sf -X POST -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    -d '{"from":"app@bench.test","to":"user@bench.test","subject":"get","text":"x"}' \
    "$BASE/api/v1/messages" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
cat >"$BENCH_TMP/get.lua" <<LUA
wrk.headers["Authorization"] = "Bearer $KEY"
LUA

# wrk's latency table in microseconds: p50 p90 p99.
percentiles() {
    python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def us(v, unit):
    return float(v) * {"us": 1, "ms": 1000, "s": 1e6}[unit]
want = {}
for p, v, unit in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
    want[p] = us(v, unit)
rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
errors = re.search(r"Socket errors:.*", text)
print(f"rps={float(rps.group(1)):.0f} p50_ms={want['50']/1000:.2f} p90_ms={want['90']/1000:.2f} "
      f"p99_ms={want['99']/1000:.2f} non2xx={bad.group(1) if bad else 0} "
      f"socket_errors={'yes' if errors else 'no'}")
PY
}

run() {
    local what=$1 script=$2 url=$3 rep=$4 file="$OUT/$1-$4.txt"
    start_watch "$OUT/$what-$rep.mem"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$script" "$url" >"$file"
    stop_watch
    printf '%-5s run %d: %s %s\n' "$what" "$rep" "$(percentiles "$file")" "$WATCH_RESULT" | tee -a "$OUT/summary.txt"
}

log "sending as a tenant: $CONNECTIONS connections, $DURATION per run, $SIZE-octet text"
for ((r = 1; r <= REPS; r++)); do
    run send "$BENCH_TMP/send.lua" "$BASE/api/v1/messages" "$r"
    run get "$BENCH_TMP/get.lua" "$BASE/api/v1/messages/$ID" "$r"
done
stored=$(curl -sf -H "Authorization: Bearer $ADMIN_KEY" "$BASE/api/v1/stats" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["accepted"]["24h"])')
answered=$(python3 - "$OUT" <<'PY'
import glob, re, sys
total = 1  # the message the GET runs read
for path in glob.glob(sys.argv[1] + "/send-*.txt"):
    text = open(path).read()
    done = int(re.search(r"(\d+) requests in", text).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    total += done - (int(bad.group(1)) if bad else 0)
print(total)
PY
)
# wrk counts a request when its answer arrived: every 202 it saw must be in
# the store (a few more may be stored: answers cut off at the end of a run).
log "202 answers seen: $answered; messages stored: $stored"
((stored >= answered)) || die "fewer messages stored than acknowledged"
log "results in $OUT/summary.txt"
python3 - "$OUT/summary.txt" <<'PY'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    kind = line.split()[0]
    vals = dict(re.findall(r"(\w+)=([\d.]+)", line))
    rows.setdefault(kind, []).append(vals)
for kind, runs in rows.items():
    med = lambda k: statistics.median(float(r[k]) for r in runs)
    print(f"{kind:5s} median of {len(runs)}: {med('rps'):.0f} req/s, p50 {med('p50_ms'):.2f} ms, "
          f"p99 {med('p99_ms'):.2f} ms, peak RSS {med('peak_rss_kib')/1024:.1f} MiB")
PY
