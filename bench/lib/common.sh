# shellcheck shell=bash
# Shared by bench/smtp.sh and bench/idle.sh: installing the Postfix tools,
# starting and stopping the servers under test, waiting for their ports, and
# reading CPU and memory from /proc (through mailroom-loadgen).
#
# A sourcing script sets BENCH_TMP (a scratch directory) before calling any of
# these, and calls stop_server and stop_watch from its EXIT trap.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
LOADGEN=${LOADGEN:-$ROOT/target/release/mailroom-loadgen}
BENCH_MAILROOM_BIN=${BENCH_MAILROOM_BIN:-$ROOT/target/release/mailroom}
SMTP_SOURCE=/usr/sbin/smtp-source
SMTP_SINK=/usr/sbin/smtp-sink
BENCH_LOG_LEVEL=${BENCH_LOG_LEVEL:-info}
# The server under test: kind (mailroom|sink|postfix), pid, port, log file.
SERVER_KIND="" SERVER_PID="" SERVER_PORT="" SERVER_LOG=""
# The running `mailroom-loadgen watch`, if any.
WATCH_PID="" WATCH_OUT=""
# The Postfix instance: config directory and its root (spool, data, log).
PF_ROOT="" PF_CONF=""
export LC_ALL=C

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "FATAL: $*"
    exit 1
}

# Soft RLIMIT_NOFILE up to the hard limit: smtp-sink and smtp-source inherit it.
raise_nofile() {
    local hard
    hard=$(ulimit -Hn)
    [[ $hard == unlimited ]] && hard=1048576
    ulimit -n "$hard" 2>/dev/null || log "warning: could not raise ulimit -n to $hard (now $(ulimit -n))"
}

# smtp-source, smtp-sink and postfix come with the Debian postfix package.
ensure_postfix() {
    if [[ -x $SMTP_SOURCE && -x $SMTP_SINK && -x /usr/sbin/postfix ]]; then
        return 0
    fi
    [[ $EUID -eq 0 ]] || die "postfix is not installed and installing it needs root"
    command -v apt-get >/dev/null || die "postfix is not installed and there is no apt-get; install postfix (smtp-source, smtp-sink)"
    log "installing postfix (smtp-source, smtp-sink, and the Postfix peer)"
    local apt_log="$BENCH_TMP/apt.log"
    printf '%s\n' "postfix postfix/main_mailer_type select Local only" \
        "postfix postfix/mailname string bench.test" | debconf-set-selections
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y postfix >"$apt_log" 2>&1; then
        log "apt-get install failed; running apt-get update and trying again"
        if ! { DEBIAN_FRONTEND=noninteractive apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postfix; } >>"$apt_log" 2>&1; then
            tail -n 30 "$apt_log" >&2
            die "could not install postfix"
        fi
    fi
    [[ -x $SMTP_SOURCE && -x $SMTP_SINK ]] || die "postfix installed but $SMTP_SOURCE or $SMTP_SINK is missing"
}

ensure_python() {
    command -v python3 >/dev/null && return 0
    if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
        die "python3 is needed (reporting, checking mailroom's store)"
    fi
    log "installing python3"
    DEBIAN_FRONTEND=noninteractive apt-get install -y python3 >"$BENCH_TMP/apt-python.log" 2>&1 ||
        { DEBIAN_FRONTEND=noninteractive apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3; } >>"$BENCH_TMP/apt-python.log" 2>&1 ||
        die "could not install python3"
}

# Builds the release binaries the run needs. $1: also mailroom (1) or not (0).
build() {
    local with_mailroom=$1 packages=(-p mailroom-loadgen)
    [[ $with_mailroom == 1 ]] && packages=(-p mailroom -p mailroom-loadgen)
    if [[ ${NO_BUILD:-0} == 1 ]]; then
        log "NO_BUILD=1: using the binaries in $ROOT/target/release"
    else
        log "cargo build --release ${packages[*]}"
        if ! (cd "$ROOT" && cargo build --release "${packages[@]}") >"$BENCH_TMP/build.log" 2>&1; then
            grep -E '^(error|warning: unused)' -A 5 "$BENCH_TMP/build.log" | head -n 40 >&2 || true
            tail -n 5 "$BENCH_TMP/build.log" >&2
            if [[ $with_mailroom == 1 ]]; then
                die "build failed (to measure only the peers: SERVERS='sink postfix')"
            fi
            die "build failed"
        fi
    fi
    [[ -x $LOADGEN ]] || die "$LOADGEN is missing"
    if [[ $with_mailroom == 1 ]]; then
        [[ -x $BENCH_MAILROOM_BIN ]] || die "$BENCH_MAILROOM_BIN is missing"
    fi
}

# True when nothing accepts connections on 127.0.0.1:$1.
port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# True when the process is gone or a zombie (a zombie still answers kill -0).
proc_gone() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }
    [[ ${stat:0:1} == Z ]]
}

server_died() {
    log "$SERVER_KIND (pid $SERVER_PID) is not running; last lines of $SERVER_LOG:"
    tail -n 40 "$SERVER_LOG" >&2 2>/dev/null || true
    die "$SERVER_KIND died"
}

# Waits until the server greets with 220 on $SERVER_PORT (up to $1 s, default 30),
# at ${SERVER_IP:-127.0.0.1}.
wait_greeting() {
    local deadline=$((SECONDS + ${1:-30})) line
    while ((SECONDS < deadline)); do
        proc_gone "$SERVER_PID" && server_died
        # A real SMTP exchange, not just a connect: the greeting proves the
        # server is past its start-up (database open, migrations run).
        # shellcheck disable=SC2016 # $1 and $2 are expanded by the inner bash
        if line=$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$2/$1" || exit 1
                IFS= read -r -t 2 l <&3 || exit 1
                printf "QUIT\r\n" >&3; printf "%s" "$l"' _ "$SERVER_PORT" "${SERVER_IP:-127.0.0.1}" 2>/dev/null) &&
            [[ $line == 220* ]]; then
            proc_gone "$SERVER_PID" && server_died
            return 0
        fi
        sleep 0.1
    done
    log "no 220 greeting from $SERVER_KIND on ${SERVER_IP:-127.0.0.1}:$SERVER_PORT; last lines of $SERVER_LOG:"
    tail -n 40 "$SERVER_LOG" >&2 2>/dev/null || true
    die "$SERVER_KIND did not start"
}

require_free_port() {
    port_free "$1" || die "127.0.0.1:$1 is already in use (set the PORT variables, see --help)"
}

# mailroom with a fresh data directory. $1: run directory, $2: port,
# $3: max connections (default 20000).
start_mailroom() {
    local dir=$1 port=$2 max=${3:-20000}
    require_free_port "$port"
    mkdir -p "$dir/data"
    cat >"$dir/mailroom.toml" <<EOF
hostname = "bench.test"
data_dir = "$dir/data"
local_domains = ["bench.test"]
shutdown_timeout = "5s"

[smtp]
max_connections = $max
max_connections_per_ip = $max

[[smtp.listeners]]
addr = "127.0.0.1:$port"
role = "mx"
tls = "none"

[log]
level = "$BENCH_LOG_LEVEL"
EOF
    SERVER_KIND=mailroom SERVER_PORT=$port SERVER_LOG="$dir/server.log"
    "$BENCH_MAILROOM_BIN" serve --config "$dir/mailroom.toml" >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    wait_greeting 60
}

# smtp-sink: no storage, the protocol bound for the client. $1: run
# directory, $2: port, $3: session cap (smtp-sink's default is 256).
start_sink() {
    local dir=$1 port=$2 max=${3:-1000}
    require_free_port "$port"
    SERVER_KIND=sink SERVER_PORT=$port SERVER_LOG="$dir/server.log"
    # -u nobody: it refuses to run as root. Backlog 1024, like tokio's default.
    "$SMTP_SINK" -u nobody -m "$max" "127.0.0.1:$port" 1024 >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    wait_greeting 30
}

# Writes main.cf and master.cf for a private Postfix instance under $1
# listening on 127.0.0.1:$2: discard transport for everything, nothing
# chrooted, its own queue, data directory and log file.
setup_postfix() {
    PF_ROOT=$1 PF_CONF=$1/conf
    local port=$2
    mkdir -p "$PF_CONF" "$PF_ROOT/log"
    chmod 755 "$PF_ROOT" "$PF_ROOT/log"
    cat >"$PF_CONF/main.cf" <<EOF
# A throw-away instance for bench/smtp.sh: mail for bench.test is queued
# (fsync before 250, as always) and then discarded.
compatibility_level = 3.6
queue_directory = $PF_ROOT/spool
data_directory = $PF_ROOT/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = \$myhostname
mydestination = bench.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
local_recipient_maps =
local_transport = discard
default_transport = discard
relay_transport = discard
alias_maps =
alias_database =
biff = no
maillog_file = $PF_ROOT/log/postfix.log
maillog_file_prefixes = $PF_ROOT/log
EOF
    # Services as in Debian's master.cf with chroot "n", minus the ones
    # nothing here uses (smtp client, local, virtual, pipe, tlsmgr).
    cat >"$PF_CONF/master.cf" <<EOF
127.0.0.1:$port inet n - n - - smtpd
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
EOF
}

# Starts the instance set up by setup_postfix with an empty queue.
# $1: run directory (gets the start output), $2: port.
start_postfix() {
    local dir=$1 port=$2
    require_free_port "$port"
    # Fresh queue and data directory every run. The queue directory must be
    # owned by root; postfix-script creates its subdirectories for user
    # postfix and data_directory, and checks ownership.
    rm -rf "$PF_ROOT/spool" "$PF_ROOT/data"
    mkdir -m 755 "$PF_ROOT/spool"
    : >"$PF_ROOT/log/postfix.log"
    SERVER_KIND=postfix SERVER_PORT=$port SERVER_LOG="$PF_ROOT/log/postfix.log"
    if ! /usr/sbin/postfix -c "$PF_CONF" start >"$dir/postfix-start.log" 2>&1; then
        cat "$dir/postfix-start.log" >&2
        tail -n 40 "$SERVER_LOG" >&2 || true
        die "postfix -c $PF_CONF start failed"
    fi
    SERVER_PID=$(tr -d ' \n' <"$PF_ROOT/spool/pid/master.pid" 2>/dev/null) || true
    [[ $SERVER_PID =~ ^[0-9]+$ ]] || die "no master.pid after postfix start"
    wait_greeting 30
}

# Waits until the disk has written what earlier runs left dirty. Without it
# a run starts while the previous server's files (Postfix's queue, a 100 MB
# database just removed) are still being written back and journalled, and
# pays for its predecessor: in W3 mailroom used 0.55 CPU-s after a Postfix
# run against 0.45 after its own.
settle_disk() {
    sync
    sleep "${SETTLE_SECS:-1}"
}

# $1: kind, $2: run directory, $3: port.
start_server() {
    case $1 in
    mailroom) start_mailroom "$2" "$3" ;;
    sink) start_sink "$2" "$3" "${SINK_MAX_SESSIONS:-1000}" ;;
    postfix) start_postfix "$2" "$3" ;;
    *) die "unknown server $1" ;;
    esac
}

# PID and all its descendants, one per line.
proc_tree() {
    local pids=("$1") i=0 p
    while ((i < ${#pids[@]})); do
        # shellcheck disable=SC2013 # the children files hold space-separated pids
        for p in $(cat /proc/"${pids[i]}"/task/*/children 2>/dev/null); do pids+=("$p"); done
        i=$((i + 1))
    done
    printf '%s\n' "${pids[@]}"
}

# Waits up to $1 s for every listed pid to be gone; then SIGKILLs the rest.
wait_gone_or_kill() {
    local limit=$1 deadline p left
    shift
    deadline=$((SECONDS + limit))
    while ((SECONDS < deadline)); do
        left=0
        for p in "$@"; do proc_gone "$p" || left=1; done
        ((left == 0)) && return 0
        sleep 0.1
    done
    for p in "$@"; do
        proc_gone "$p" || { log "warning: pid $p did not stop; SIGKILL"; kill -KILL "$p" 2>/dev/null || true; }
    done
}

# Stops the current server, if any, and waits until all its processes are
# gone so the next one can bind the port.
stop_server() {
    [[ -n $SERVER_KIND ]] || return 0
    local kind=$SERVER_KIND pid=$SERVER_PID pids=()
    SERVER_KIND=""
    case $kind in
    postfix)
        [[ -n $pid ]] && mapfile -t pids < <(proc_tree "$pid")
        /usr/sbin/postfix -c "$PF_CONF" stop >/dev/null 2>&1 || true
        ((${#pids[@]})) && wait_gone_or_kill 20 "${pids[@]}"
        ;;
    *)
        if [[ -n $pid ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            wait_gone_or_kill 15 "$pid"
            wait "$pid" 2>/dev/null || true
        fi
        ;;
    esac
    SERVER_PID=""
}

# Starts sampling the server's memory every 50 ms (sum over its process
# tree; PSS as well as RSS). $1: file for the per-sample lines.
start_watch() {
    WATCH_OUT="$1.summary"
    "$LOADGEN" watch --pid "$SERVER_PID" --interval "${SAMPLE_INTERVAL:-50ms}" --pss --samples "$1" >"$WATCH_OUT" 2>&1 &
    WATCH_PID=$!
    # The samples file appears once the sampler handles SIGTERM.
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -e $1 ]] && return 0
        proc_gone "$WATCH_PID" && break
        sleep 0.05
    done
    cat "$WATCH_OUT" >&2 2>/dev/null || true
    die "the memory sampler did not start"
}

# Stops the sampler; its summary line (key=value ...) goes to WATCH_RESULT.
# Not meant for $(...): the sampler is this shell's child, not a subshell's.
WATCH_RESULT=""
stop_watch() {
    WATCH_RESULT=""
    [[ -n $WATCH_PID ]] || return 0
    kill -TERM "$WATCH_PID" 2>/dev/null || true
    wait "$WATCH_PID" 2>/dev/null || true
    WATCH_PID=""
    WATCH_RESULT=$(cat "$WATCH_OUT" 2>/dev/null || true)
    [[ $WATCH_RESULT == peak_rss_kib=* ]] || log "warning: memory sampler said: ${WATCH_RESULT:-nothing}"
}

# CPU seconds (user+system) of the server's process tree so far.
server_cpu() {
    local out
    out=$("$LOADGEN" cpu --pid "$SERVER_PID" --clk-tck "$CLK_TCK") || server_died
    out=${out#cpu_secs=}
    printf '%s\n' "${out%% *}"
}

CLK_TCK=$(getconf CLK_TCK)

# User+system CPU seconds of this shell's reaped children so far, into
# CHILDREN_CPU. Not for $(...): a subshell's own children start at zero.
# shellcheck disable=SC2034 # read by the sourcing script
CHILDREN_CPU=0
children_cpu() {
    local line
    times >"$BENCH_TMP/times"
    line=$(sed -n 2p "$BENCH_TMP/times")
    # shellcheck disable=SC2034
    CHILDREN_CPU=$(awk -v t="$line" 'BEGIN {
        n = split(t, f, " "); s = 0
        for (i = 1; i <= n; i++) { split(f[i], p, "m"); sub("s", "", p[2]); s += p[1] * 60 + p[2] }
        printf "%.3f", s }')
}

# Busy clock ticks of the whole machine (user nice system irq softirq steal).
machine_busy() {
    local _cpu user nice system _idle _iowait irq softirq steal _rest
    read -r _cpu user nice system _idle _iowait irq softirq steal _rest </proc/stat
    echo $((user + nice + system + irq + softirq + steal))
}

# Value of key=... in a line of key=value pairs (0 when absent).
kv() {
    if [[ " $2 " =~ \ $1=([^ ]*) ]]; then
        printf '%s\n' "${BASH_REMATCH[1]}"
    else
        echo 0
    fi
}

# Messages in mailroom's store under data directory $1 (table `messages` of
# mailroom.db, or of the only *.db file there).
mailroom_stored() {
    local data=$1 db=${BENCH_MAILROOM_DB:-}
    if [[ -z $db ]]; then
        db="$data/mailroom.db"
        if [[ ! -f $db ]]; then
            local found=("$data"/*.db)
            [[ ${#found[@]} -eq 1 && -f ${found[0]} ]] && db=${found[0]}
        fi
    fi
    python3 - "$db" <<'EOF' 2>>"$BENCH_TMP/stored.err" || echo "?"
import sqlite3, sys
path = sys.argv[1]
# Read-only, so the check cannot disturb the server's database.
conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
print(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
EOF
}
