# shellcheck shell=bash disable=SC2034 # SERVER_* and PF_* belong to common.sh
# Shared by bench/relay.sh and bench/postfix-interop.sh, on top of
# lib/common.sh: helper processes (DNS server, sink) on other loopback
# addresses, mailroom configured to deliver, and reading its store.
#
# The sourcing script sets BENCH_TMP and calls stop_helpers (and
# stop_server, stop_watch from common.sh) from its EXIT trap.

# Helper processes started with start_helper: pid -> name.
declare -A HELPER_NAME=()
# The password the benchmark user logs in with (AUTH PLAIN, no TLS on
# loopback): relaying through mailroom needs an authenticated client.
BENCH_USER=bench
BENCH_PASSWORD=bench-password-not-secret
BENCH_HASH=""

# Starts "$@" in the background, output to $LOG_FILE; pid in HELPER_PID.
# $1: a name for messages, $2: the output file, then the command.
HELPER_PID=""
start_helper() {
    local name=$1 out=$2
    shift 2
    "$@" >"$out" 2>&1 &
    HELPER_PID=$!
    HELPER_NAME[$HELPER_PID]=$name
}

# Stops one helper (SIGTERM, then SIGKILL after $2 s, default 10) and reaps it.
stop_helper() {
    local pid=$1
    [[ -n ${HELPER_NAME[$pid]:-} ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    wait_gone_or_kill "${2:-10}" "$pid"
    wait "$pid" 2>/dev/null || true
    unset "HELPER_NAME[$pid]"
}

stop_helpers() {
    local pid
    for pid in "${!HELPER_NAME[@]}"; do stop_helper "$pid" 5; done
}

# True when something accepts TCP connections on $1:$2.
port_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# Waits up to $4 s (default 30) until $1:$2 accepts connections; dies with
# the helper's output when pid $3 exits first. $5: its output file.
wait_listen() {
    local ip=$1 port=$2 pid=$3 limit=${4:-30} out=${5:-}
    local deadline=$((SECONDS + limit))
    while ((SECONDS < deadline)); do
        if proc_gone "$pid"; then
            [[ -n $out ]] && tail -n 20 "$out" >&2
            die "${HELPER_NAME[$pid]:-pid $pid} exited before listening on $ip:$port"
        fi
        port_open "$ip" "$port" && return 0
        sleep 0.05
    done
    [[ -n $out ]] && tail -n 20 "$out" >&2
    die "nothing listens on $ip:$port after ${limit}s"
}

# Dies when $1:$2 is taken already.
require_free() {
    ! port_open "$1" "$2" || die "$1:$2 is already in use (set PORT_BASE, see --help)"
}

# The DNS server for the delivery benchmarks: MX d0..d{N-1}.SUFFIX ->
# mx.SUFFIX A $3. $1: output file, $2: port on 127.0.0.1, $3: MX address,
# $4: domains, $5: suffix. Sets DNS_PID.
DNS_PID=""
start_dns() {
    local out=$1 port=$2 mx=$3 domains=$4 suffix=$5
    require_free 127.0.0.1 "$port"
    start_helper dns "$out" "$LOADGEN" dns --listen "127.0.0.1:$port" \
        --domains "$domains" --suffix "$suffix" --mx "$mx"
    DNS_PID=$HELPER_PID
    # TCP and UDP are bound together, before the TCP port answers.
    wait_listen 127.0.0.1 "$port" "$DNS_PID" 30 "$out"
}

# An argon2 hash of BENCH_PASSWORD, made once. BENCH_AUTH_HASH=mailroom
# (default): by `mailroom hash-password`, argon2's default costs (19 MiB per
# check), what an operator gets. BENCH_AUTH_HASH=cheap: 64 KiB, 1 pass, from
# `mailroom-loadgen hash-password`, to see relaying without what argon2
# leaves in the allocator after many logins.
BENCH_AUTH_HASH=${BENCH_AUTH_HASH:-mailroom}
make_hash() {
    if [[ -n $BENCH_HASH ]]; then return 0; fi
    case $BENCH_AUTH_HASH in
    mailroom)
        BENCH_HASH=$(printf '%s\n' "$BENCH_PASSWORD" | "$BENCH_MAILROOM_BIN" hash-password) ||
            die "mailroom hash-password failed"
        ;;
    cheap)
        BENCH_HASH=$(printf '%s\n' "$BENCH_PASSWORD" | "$LOADGEN" hash-password --m-cost 64 --t-cost 1) ||
            die "mailroom-loadgen hash-password failed"
        ;;
    *) die "BENCH_AUTH_HASH must be mailroom or cheap" ;;
    esac
}

# Writes a mailroom config for delivery benchmarks to $1/mailroom.toml:
# a submission listener without TLS on 127.0.0.1:$2 that takes AUTH PLAIN
# from BENCH_USER, DNS at 127.0.0.1:$3 (or none when empty), MX port $4,
# then any extra TOML in $5 (routes, delivery keys).
write_mailroom_config() {
    local dir=$1 port=$2 dns_port=$3 mx_port=$4 extra=${5:-}
    make_hash
    mkdir -p "$dir/data"
    {
        cat <<EOF
hostname = "relay.bench.test"
data_dir = "$dir/data"
local_domains = ["relay.bench.test"]
shutdown_timeout = "5s"

[smtp]
max_connections = 20000
max_connections_per_ip = 20000
allow_insecure_auth = true

[[smtp.users]]
username = "$BENCH_USER"
password_hash = "$BENCH_HASH"

[[smtp.listeners]]
addr = "127.0.0.1:$port"
role = "submission"
tls = "none"

[log]
level = "$BENCH_LOG_LEVEL"
EOF
        if [[ -n $dns_port ]]; then
            printf '\n[dns]\nnameservers = ["127.0.0.1:%s"]\n' "$dns_port"
        fi
        printf '\n[delivery]\nsmtp_port = %s\n' "$mx_port"
        printf '%s\n' "$extra"
    } >"$dir/mailroom.toml"
    "$BENCH_MAILROOM_BIN" config check "$dir/mailroom.toml" >"$dir/config-check.txt" 2>&1 ||
        { cat "$dir/config-check.txt" >&2; die "mailroom refused the generated config $dir/mailroom.toml"; }
}

# Starts mailroom on the config in $1 (written by write_mailroom_config) and
# waits for its greeting on 127.0.0.1:$2. Sets SERVER_* (common.sh).
start_mailroom_config() {
    local dir=$1 port=$2
    require_free_port "$port"
    SERVER_KIND=mailroom SERVER_PORT=$port SERVER_LOG="$dir/server.log"
    "$BENCH_MAILROOM_BIN" serve --config "$dir/mailroom.toml" >>"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    wait_greeting 60
}

# Recipient states in mailroom's store, read-only while it runs:
# "queued=.. deferred=.. delivered=.. failed=.. held=.. total=..".
store_states() {
    python3 - "$1/mailroom.db" <<'EOF' 2>>"$BENCH_TMP/store.err" || echo "error=1"
import sqlite3, sys
conn = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=30)
counts = dict(conn.execute("SELECT state, count(*) FROM recipients GROUP BY state").fetchall())
states = ["queued", "deferred", "delivered", "failed", "held"]
out = [f"{s}={counts.get(s, 0)}" for s in states]
out += [f"{s}={n}" for s, n in counts.items() if s not in states]
out.append(f"total={sum(counts.values())}")
print(" ".join(out))
EOF
}

# VmRSS of pid $1 in KiB (0 when gone).
rss_kib() {
    awk '/^VmRSS:/ { print $2; found = 1 } END { if (!found) print 0 }' "/proc/$1/status" 2>/dev/null || echo 0
}

# The private Postfix instance's main.cf and master.cf (common.sh keeps the
# paths in PF_ROOT and PF_CONF; start_postfix and stop_server work on it).
# $1: root directory, $2: listen address (IP:port), $3: extra main.cf lines,
# $4: extra master.cf lines.
setup_postfix_instance() {
    PF_ROOT=$1 PF_CONF=$1/conf
    local listen=$2 extra_main=$3 extra_master=$4
    mkdir -p "$PF_CONF" "$PF_ROOT/log"
    chmod 755 "$PF_ROOT" "$PF_ROOT/log"
    cat >"$PF_CONF/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $PF_ROOT/spool
data_directory = $PF_ROOT/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
# Postfix refuses addresses that no interface carries (127.0.0.3 is routed
# to lo but not configured on it); master.cf binds the listener itself.
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
biff = no
maillog_file = $PF_ROOT/log/postfix.log
maillog_file_prefixes = $PF_ROOT/log
$extra_main
EOF
    cat >"$PF_CONF/master.cf" <<EOF
$listen inet n - n - - smtpd
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
$extra_master
EOF
}
