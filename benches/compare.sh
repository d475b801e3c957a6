#!/usr/bin/env bash
# Benchmarks tidegate against nginx, HAProxy and no proxy ("direct") on this machine, in one run.
#
#   bash benches/compare.sh            # full run (3 repetitions, 5 s runs); report on stdout
#   bash benches/compare.sh --write    # the same, and the report goes to BENCHMARKS.md
#   bash benches/compare.sh --quick    # smoke run: 1 repetition, 2 s runs, 1,000 idle only
#   bash benches/compare.sh --keep     # keep the temp dir (configs, proxy and loadgen logs)
#
# Every proxy is pinned to CPU 0 (one worker: nginx `worker_processes 1`, HAProxy `nbthread 1`,
# tidegate's tokio runtime sizes itself from its CPU affinity), the load generator and both
# backends to CPU 1. Scenarios run target after target (direct, tidegate, nginx, haproxy),
# repeated, and the report gives medians. Proxy CPU time comes from /proc/PID/stat and memory
# from /proc/PID/status, summed over the proxy's processes (nginx's master and worker).
# Everything listens on and connects to 127.0.0.0/8; every process started here is stopped on
# exit by its pid. Needs root for apt-get (if nginx/haproxy are missing) and runs nginx as root.
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }

QUICK=0
WRITE=0
KEEP=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        --write) WRITE=1 ;;
        --keep) KEEP=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "compare.sh: unknown argument $arg" >&2; usage >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if ((QUICK)); then
    REPS=1 DUR=2 HOLD=3 BULK_N=2
    IDLE_COUNTS=(1000)
else
    REPS=3 DUR=5 HOLD=5 BULK_N=4
    IDLE_COUNTS=(1000 9000)
fi
HTTP_C=50 ECHO_C=50 ECHO_SIZE=64 CONNECT_C=20 BULK_SIZE=16777216
SOURCES=127.0.0.2-127.0.0.50
BACKEND1=19101 BACKEND2=19102
declare -A PORT=([tidegate]=18080 [nginx]=18081 [haproxy]=18082 [direct]=$BACKEND1)
TARGETS=(direct tidegate nginx haproxy)
PROXIES=(tidegate nginx haproxy)

log() { printf '[compare %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- CPUs ------------------------------------------------------------------------------------
NCPU=$(nproc --all)
if ((NCPU >= 2)); then
    PROXY_CPU=0 LOAD_CPU=1
else
    PROXY_CPU=0 LOAD_CPU=0
    log "warning: one CPU only; proxies, load generator and backends share it"
fi

# --- processes we start, stopped on exit -------------------------------------------------------
TMP=$(mktemp -d /tmp/tidegate-bench.XXXXXX)
RES=$TMP/results
mkdir -p "$RES"
declare -A PROXY_PID=()
BACKEND_PIDS=()
BG_PID=""

children() { pgrep -P "$1" 2>/dev/null || true; }

# Stops one process we started (and the children it has now), TERM then KILL after 5 s.
stop_pid() {
    local pid=$1 kids i
    kill -0 "$pid" 2>/dev/null || return 0
    kids=$(children "$pid")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    for k in $kids; do
        if kill -0 "$k" 2>/dev/null; then kill -KILL "$k" 2>/dev/null || true; fi
    done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -n $BG_PID ]] && stop_pid "$BG_PID"
    local name
    for name in "${!PROXY_PID[@]}"; do
        stop_pid "${PROXY_PID[$name]}"
    done
    for pid in "${BACKEND_PIDS[@]}"; do
        stop_pid "$pid"
    done
    if ((rc == 0 && !KEEP)); then
        rm -rf "$TMP"
    elif ((rc == 0)); then
        log "configs and logs kept in $TMP"
    else
        log "failed (exit $rc); logs and configs kept in $TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. install and build ----------------------------------------------------------------------
export PATH=$PATH:/usr/sbin:/sbin
missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v haproxy >/dev/null || missing+=(haproxy)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -q >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2; then
        # nginx-light is a transitional package on newer Debian; plain nginx then.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]/nginx-light/nginx}" >&2
    fi
fi
command -v nginx >/dev/null || die "nginx not found"
command -v haproxy >/dev/null || die "haproxy not found"

log "building tidegate and loadgen (release)"
cargo build --release --quiet --bin tidegate --example loadgen >&2
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps 2>/dev/null | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
TARGET_DIR=${TARGET_DIR:-$ROOT/target}
TIDEGATE=$TARGET_DIR/release/tidegate
LOADGEN=$TARGET_DIR/release/examples/loadgen
[[ -x $TIDEGATE && -x $LOADGEN ]] || die "built binaries not found under $TARGET_DIR/release"

# --- file descriptors --------------------------------------------------------------------------
HARD=$(ulimit -Hn)
[[ $HARD == unlimited ]] && HARD=1048576
ulimit -n "$HARD"
FDS=$(ulimit -n)
log "ulimit -n $FDS"
# Each proxied idle connection takes two descriptors in the proxy.
RUN_IDLE=()
for n in "${IDLE_COUNTS[@]}"; do
    if ((2 * n + 200 <= FDS)); then RUN_IDLE+=("$n"); else log "skipping ws-idle $n: needs $((2 * n + 200)) fds, limit $FDS"; fi
done

for p in $BACKEND1 $BACKEND2 "${PORT[tidegate]}" "${PORT[nginx]}" "${PORT[haproxy]}"; do
    if ss -Hltn "sport = :$p" | grep -q .; then die "port $p is already in use"; fi
done

wait_port() {
    local port=$1 pid=$2 i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

# --- 2. backends and proxy configs -------------------------------------------------------------
for port in $BACKEND1 $BACKEND2; do
    taskset -c "$LOAD_CPU" "$LOADGEN" backend --addr "127.0.0.1:$port" 2>>"$TMP/backend-$port.log" &
    BACKEND_PIDS+=($!)
    wait_port "$port" $! || die "backend on $port did not start (see $TMP/backend-$port.log)"
done
log "backends on 127.0.0.1:$BACKEND1 and :$BACKEND2 (CPU $LOAD_CPU)"

HAPROXY_MAXCONN=$(((FDS - 200) / 2))
mkdir -p "$TMP/nginx"

cat >"$TMP/tidegate.toml" <<EOF
shutdown_timeout = "2s"

[[listener]]
name = "bench"
bind = "127.0.0.1:${PORT[tidegate]}"
mode = "http"

  [[listener.route]]
  upstream = "backends"

[upstream.backends]
balance = "least_conn"
keepalive = 32
servers = [
  { addr = "127.0.0.1:$BACKEND1" },
  { addr = "127.0.0.1:$BACKEND2" },
]
  [upstream.backends.timeouts]
  tunnel_idle = "1h"
EOF

cat >"$TMP/nginx/nginx.conf" <<EOF
# One worker (it gets one CPU), run by compare.sh in the foreground.
worker_processes 1;
worker_rlimit_nofile $FDS;
daemon off;
master_process on;
user root;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;

events {
    worker_connections $FDS;
}

http {
    access_log off;
    client_body_temp_path $TMP/nginx/client_body;
    proxy_temp_path $TMP/nginx/proxy;
    keepalive_requests 1000000;   # default 1000 would close client connections mid-run
    keepalive_timeout 60s;

    upstream backends {
        least_conn;
        server 127.0.0.1:$BACKEND1;
        server 127.0.0.1:$BACKEND2;
        keepalive 32;
        keepalive_requests 1000000;
    }

    # The WebSocket idiom; "Connection: ''" keeps upstream keep-alive for plain requests.
    map \$http_upgrade \$connection_upgrade {
        default upgrade;
        ''      '';
    }

    server {
        listen 127.0.0.1:${PORT[nginx]} backlog=4096;
        location / {
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Host \$http_host;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$http_host;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }
    }
}
EOF

cat >"$TMP/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $HAPROXY_MAXCONN
    # no log lines: no logging

defaults
    mode http
    maxconn $HAPROXY_MAXCONN
    option forwardfor
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s
    timeout tunnel 1h

frontend bench
    bind 127.0.0.1:${PORT[haproxy]}
    default_backend backends

backend backends
    balance leastconn
    server b1 127.0.0.1:$BACKEND1
    server b2 127.0.0.1:$BACKEND2
EOF

"$TIDEGATE" check -c "$TMP/tidegate.toml" >"$TMP/tidegate-check.log" 2>&1 || die "tidegate check failed: $(cat "$TMP/tidegate-check.log")"
nginx -t -q -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf" 2>"$TMP/nginx-check.log" || die "nginx -t failed: $(cat "$TMP/nginx-check.log")"
haproxy -c -q -f "$TMP/haproxy.cfg" >"$TMP/haproxy-check.log" 2>&1 || die "haproxy -c failed: $(cat "$TMP/haproxy-check.log")"

start_proxy() {
    local name=$1 pid
    case "$name" in
        tidegate) RUST_LOG=warn taskset -c "$PROXY_CPU" "$TIDEGATE" run -c "$TMP/tidegate.toml" 2>>"$TMP/tidegate.log" & ;;
        nginx) taskset -c "$PROXY_CPU" nginx -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf" 2>>"$TMP/nginx/stderr.log" & ;;
        haproxy) taskset -c "$PROXY_CPU" haproxy -db -f "$TMP/haproxy.cfg" >>"$TMP/haproxy.log" 2>&1 & ;;
    esac
    pid=$!
    PROXY_PID[$name]=$pid
    wait_port "${PORT[$name]}" "$pid" || die "$name did not start (logs in $TMP)"
}

stop_proxy() {
    local name=$1
    [[ -n ${PROXY_PID[$name]:-} ]] || return 0
    stop_pid "${PROXY_PID[$name]}"
    unset "PROXY_PID[$name]"
}

restart_proxy() {
    stop_proxy "$1"
    start_proxy "$1"
    sleep 0.3
}

for p in "${PROXIES[@]}"; do start_proxy "$p"; done
log "proxies on CPU $PROXY_CPU: tidegate :${PORT[tidegate]}, nginx :${PORT[nginx]}, haproxy :${PORT[haproxy]}"

# How many tokio workers tidegate started under its affinity.
TIDEGATE_WORKERS=$(cat /proc/"${PROXY_PID[tidegate]}"/task/*/comm 2>/dev/null | grep -c '^tokio-rt-worker' || true)
log "tidegate runs $TIDEGATE_WORKERS tokio worker thread(s) pinned to CPU $PROXY_CPU"

# --- measuring ---------------------------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)

# The proxy's processes: the one we started and its children (nginx's worker).
proxy_pids() {
    local pid=${PROXY_PID[$1]}
    echo "$pid"
    children "$pid"
}

# utime + stime in clock ticks, summed over the proxy's processes.
cpu_ticks() {
    local total=0 p t
    for p in $(proxy_pids "$1"); do
        t=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || t=0
        total=$((total + ${t:-0}))
    done
    echo "$total"
}

# VmRSS in kB, summed over the proxy's processes.
rss_kb() {
    local total=0 p r
    for p in $(proxy_pids "$1"); do
        r=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null) || r=0
        total=$((total + ${r:-0}))
    done
    echo "$total"
}

# A number from our flat one-line JSON.
jget() { sed -n "s/.*\"$2\":\(-\{0,1\}[0-9.eE+]*\).*/\1/p" <<<"$1"; }

record() { echo "$4" >>"$RES/$1.$2.$3"; }

# Writes the loadgen command (as run) once per scenario/target to the report's command list.
note_cmd() {
    local key=$1
    shift
    if ! grep -qxF "$key" "$TMP/cmd-keys" 2>/dev/null; then
        echo "$key" >>"$TMP/cmd-keys"
        echo "taskset -c $LOAD_CPU $*" | sed -e "s|$TARGET_DIR/release/|target/release/|g" -e "s|$ROOT/||g" >>"$TMP/commands"
    fi
}

loadgen() { taskset -c "$LOAD_CPU" "$LOADGEN" "$@" 2>>"$TMP/loadgen.log"; }

url() { echo "$1://127.0.0.1:${PORT[$2]}/"; }

# Runs one timed scenario against one target; CPU per operation for proxies.
# args: scenario target ops-field cpu-metric-scale(1 = per op) loadgen args...
timed_run() {
    local scen=$1 target=$2 ops_field=$3 per=$4
    shift 4
    note_cmd "$scen.$target" "$LOADGEN" "$@"
    local c0=0 c1=0 json ops
    [[ $target != direct ]] && c0=$(cpu_ticks "$target")
    json=$(loadgen "$@") || die "loadgen $* failed (see $TMP/loadgen.log)"
    [[ $target != direct ]] && c1=$(cpu_ticks "$target")
    echo "$json" >>"$TMP/raw.jsonl"
    ops=$(jget "$json" "$ops_field")
    if [[ $target != direct && ${ops%.*} =~ ^[0-9]+$ ]] && ((${ops%.*} > 0)); then
        # µs of proxy CPU per operation (per MB for bulk: $per is the op size in MB).
        record "$scen" "$target" cpu "$(awk -v t=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$ops" -v per="$per" 'BEGIN {printf "%.3f", t * 1e6 / hz / (n * per)}')"
    fi
    echo "$json"
}

scenario_http() {
    local json
    json=$(timed_run http "$1" requests 1 http --url "$(url http "$1")" -c $HTTP_C -d $DUR)
    for m in rps p50_us p99_us p999_us errors; do record http "$1" $m "$(jget "$json" $m)"; done
}

scenario_echo() {
    local json
    json=$(timed_run ws-echo "$1" messages 1 ws-echo --url "$(url ws "$1")" -c $ECHO_C -s $ECHO_SIZE -d $DUR)
    for m in msgs_per_s p50_us p99_us p999_us errors; do record ws-echo "$1" $m "$(jget "$json" $m)"; done
}

scenario_connect() {
    local json
    json=$(timed_run ws-connect "$1" handshakes 1 ws-connect --url "$(url ws "$1")" -c $CONNECT_C -d $DUR --sources $SOURCES)
    for m in handshakes_per_s p50_us p99_us errors; do record ws-connect "$1" $m "$(jget "$json" $m)"; done
}

scenario_bulk() {
    local json mb
    mb=$(awk -v s=$BULK_SIZE 'BEGIN {print s / 1e6}')
    json=$(timed_run ws-bulk "$1" messages "$mb" ws-bulk --url "$(url ws "$1")" -s $BULK_SIZE -n $BULK_N)
    for m in mb_per_s p50_us errors; do record ws-bulk "$1" $m "$(jget "$json" $m)"; done
}

# Idle connections: a freshly started proxy, RSS before opening and while all are held.
scenario_idle() {
    local target=$1 n=$2 scen=ws-idle-$2 before=0 held=0 i json
    [[ $target != direct ]] && restart_proxy "$target" && before=$(rss_kb "$target")
    local args=(ws-idle --url "$(url ws "$target")" -n "$n" --hold "$HOLD" --sources "$SOURCES")
    note_cmd "$scen.$target" "$LOADGEN" "${args[@]}"
    : >"$TMP/idle.err"
    taskset -c "$LOAD_CPU" "$LOADGEN" "${args[@]}" >"$TMP/idle.out" 2>"$TMP/idle.err" &
    BG_PID=$!
    for ((i = 0; i < 1200; i++)); do
        grep -q '^READY$' "$TMP/idle.err" && break
        kill -0 "$BG_PID" 2>/dev/null || break
        sleep 0.1
    done
    grep -q '^READY$' "$TMP/idle.err" || die "ws-idle against $target never got READY: $(tail -3 "$TMP/idle.err")"
    sleep 1 # let the proxy finish settling its side of the last handshakes
    [[ $target != direct ]] && held=$(rss_kb "$target")
    wait "$BG_PID" || die "ws-idle against $target failed: $(tail -3 "$TMP/idle.err")"
    BG_PID=""
    cat "$TMP/idle.err" >>"$TMP/loadgen.log"
    json=$(cat "$TMP/idle.out")
    echo "$json" >>"$TMP/raw.jsonl"
    for m in opened failed dropped; do record "$scen" "$target" $m "$(jget "$json" $m)"; done
    if [[ $target != direct ]]; then
        local opened
        opened=$(jget "$json" opened)
        record "$scen" "$target" rss_before "$(awk -v k="$before" 'BEGIN {printf "%.1f", k / 1024}')"
        record "$scen" "$target" rss_held "$(awk -v k="$held" 'BEGIN {printf "%.1f", k / 1024}')"
        ((opened > 0)) && record "$scen" "$target" per_conn "$(awk -v b="$before" -v h="$held" -v n="$opened" 'BEGIN {printf "%.0f", (h - b) * 1024 / n}')"
    fi
    return 0
}

# --- 3./4./5. the runs -------------------------------------------------------------------------
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
START_TS=$(date -u '+%Y-%m-%d %H:%M UTC')
SCENARIOS=(http ws-echo ws-connect ws-bulk)
for n in "${RUN_IDLE[@]}"; do SCENARIOS+=("ws-idle-$n"); done

for scen in "${SCENARIOS[@]}"; do
    for ((rep = 1; rep <= REPS; rep++)); do
        for target in "${TARGETS[@]}"; do
            log "$scen, repetition $rep/$REPS: $target"
            case "$scen" in
                http) scenario_http "$target" ;;
                ws-echo) scenario_echo "$target" ;;
                ws-connect) scenario_connect "$target" ;;
                ws-bulk) scenario_bulk "$target" ;;
                ws-idle-*) scenario_idle "$target" "${scen#ws-idle-}" ;;
            esac
            sleep 0.5
        done
    done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# Anything the proxies or the load generator complained about, for whoever runs this.
for f in "$TMP/tidegate.log" "$TMP/nginx/error.log" "$TMP/nginx/stderr.log" "$TMP/haproxy.log" "$TMP/loadgen.log"; do
    n=$(grep -cvE '^loadgen: (opening|held|[0-9]+ open)|^READY$' "$f" 2>/dev/null || true)
    if ((${n:-0} > 0)); then
        log "${f#"$TMP"/}: $n line(s), the last ones:"
        grep -vE '^loadgen: (opening|held|[0-9]+ open)|^READY$' "$f" | tail -3 | sed 's/^/    /' >&2
    fi
done

# --- 6. the report -----------------------------------------------------------------------------
# Median (or sum) of a metric's values; empty when there are none.
agg() {
    local f=$RES/$1.$2.$3
    [[ -s $f ]] || return 0
    if [[ $4 == sum ]]; then
        awk '{s += $1} END {print s}' "$f"
    else
        sort -g "$f" | awk '{a[NR] = $1} END {if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'
    fi
}

# Spread of a metric over repetitions, as (max - min) / median in %.
spread() {
    local f=$RES/$1.$2.$3 med
    [[ -s $f ]] || return 0
    med=$(agg "$1" "$2" "$3" med)
    sort -g "$f" | awk -v m="$med" 'NR == 1 {lo = $1} {hi = $1} END {if (m > 0 && NR > 1) printf "±%.0f%%", (hi - lo) / m * 50}'
}

fmt() { [[ -n $1 ]] && awk -v v="$1" -v d="$2" 'BEGIN {printf "%.*f", d, v}' || echo "–"; }

ratio() {
    if [[ -z $1 || -z $2 ]] || awk -v b="$2" 'BEGIN {exit !(b == 0)}'; then
        echo "–"
    else
        awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f×", a / b}'
    fi
}

# table SCENARIO "metric:Header:decimals:agg" ... ; the first metric gets a spread column.
table() {
    local scen=$1
    shift
    local specs=("$@") spec m h d a header="| target |" rule="|---|" row t
    if ! compgen -G "$RES/$scen.*" >/dev/null; then
        printf 'Not run.\n\n'
        return 0
    fi
    for spec in "${specs[@]}"; do
        IFS=: read -r m h d a <<<"$spec"
        header+=" $h |"
        rule+="---:|"
        if [[ $spec == "${specs[0]}" && $REPS -gt 1 ]]; then header+=" spread |"; rule+="---:|"; fi
    done
    echo "$header"
    echo "$rule"
    for t in "${TARGETS[@]}"; do
        row="| $t |"
        for spec in "${specs[@]}"; do
            IFS=: read -r m h d a <<<"$spec"
            row+=" $(fmt "$(agg "$scen" "$t" "$m" "$a")" "$d") |"
            if [[ $spec == "${specs[0]}" && $REPS -gt 1 ]]; then row+=" $(spread "$scen" "$t" "$m") |"; fi
        done
        echo "$row"
    done
    for other in nginx haproxy; do
        row="| **tidegate / $other** |"
        for spec in "${specs[@]}"; do
            IFS=: read -r m h d a <<<"$spec"
            if [[ $a == sum ]]; then row+=" – |"; else row+=" **$(ratio "$(agg "$scen" tidegate "$m" med)" "$(agg "$scen" "$other" "$m" med)")** |"; fi
            if [[ $spec == "${specs[0]}" && $REPS -gt 1 ]]; then row+=" |"; fi
        done
        echo "$row"
    done
    echo
}

report() {
    local reps_word="median of $REPS repetitions"
    ((REPS == 1)) && reps_word="one repetition (--quick: a smoke run, not a result)"
    cat <<EOF
# Benchmarks: tidegate, nginx, HAProxy

Generated by \`bash benches/compare.sh${*:+ $*}\` on $START_TS; $reps_word, ${DUR} s per timed run.

- Machine: $NCPU × $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) RAM, Linux $(uname -r)
- Versions: tidegate $("$TIDEGATE" --version | awk '{print $2}') ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ", with uncommitted changes")), $(rustc -V), $(nginx -v 2>&1 | sed 's/^nginx version: //'), $(haproxy -v | head -1 | awk '{print "HAProxy " $3}')
- Load average (1/5/15 min) at start: $LOAD_START; at end: $LOAD_END

## Setup

Each proxy runs on CPU $PROXY_CPU alone (\`taskset -c $PROXY_CPU\`) with one worker: nginx
\`worker_processes 1\`, HAProxy \`nbthread 1\`, and tidegate's tokio runtime, which sizes itself
from the CPUs it may run on: it started **$TIDEGATE_WORKERS worker thread(s)** here (plus the
main thread, which only waits for the shutdown signal). The load generator
(\`examples/loadgen.rs\`) and two backends (the same binary's \`backend\` mode: a 64-byte body
for every request, WebSocket echo) share CPU $LOAD_CPU. Every proxy balances the two backends
by least connections, keeps 32 idle upstream connections per backend, sends no access log,
and has a 1 h idle timeout on WebSocket tunnels. "direct" is the load generator talking to one
backend with no proxy in between: the ceiling of the load side, not a proxy.

Proxy CPU is utime + stime from \`/proc/PID/stat\` (summed over the proxy's processes: nginx's
master and worker) before and after each run, divided by the operations the load generator
completed; clock-tick resolution is $((1000 / CLK_TCK)) ms, so the bulk figure (about ten
ticks per run) is the coarsest. Memory is \`VmRSS\` from
\`/proc/PID/status\`, summed the same way, of a freshly started proxy before the idle
connections open and while they are all held; "bytes / conn" is the difference over the
connections opened. nginx allocates its connection table (\`worker_connections\`) at start, so
part of its per-connection memory is in its baseline, not in the difference.

\`ulimit -n\` was $FDS (each proxied connection takes two descriptors in the proxy); HAProxy's
\`maxconn\` is $HAPROXY_MAXCONN, nginx's \`worker_connections\` $FDS.

Ratios are tidegate's median over the other proxy's: above 1× is better for throughput,
below 1× is better for latency, CPU and memory. "spread" is ±half the range over repetitions,
relative to the median, for the first column.

## HTTP: GET, 64-byte response, $HTTP_C keep-alive connections

EOF
    table http "rps:req/s:0:med" "p50_us:p50 µs:0:med" "p99_us:p99 µs:0:med" "p999_us:p99.9 µs:0:med" "cpu:proxy CPU µs/req:2:med" "errors:errors (sum):0:sum"
    cat <<EOF
## WebSocket echo: $ECHO_SIZE-byte messages, $ECHO_C connections, one message in flight each

EOF
    table ws-echo "msgs_per_s:msg/s:0:med" "p50_us:p50 µs:0:med" "p99_us:p99 µs:0:med" "p999_us:p99.9 µs:0:med" "cpu:proxy CPU µs/msg:2:med" "errors:errors (sum):0:sum"
    cat <<EOF
## WebSocket connect: connect, handshake, close; $CONNECT_C concurrent loops

Latency is TCP connect + upgrade handshake. Client source addresses spread over $SOURCES.

EOF
    table ws-connect "handshakes_per_s:handshakes/s:0:med" "p50_us:p50 µs:0:med" "p99_us:p99 µs:0:med" "cpu:proxy CPU µs/handshake:1:med" "errors:errors (sum):0:sum"
    cat <<EOF
## WebSocket bulk: $BULK_N binary messages of $((BULK_SIZE / 1048576)) MiB on one connection, each awaiting its echo

MB/s is 10⁶ bytes of payload echoed per second (each byte crosses the proxy twice).

EOF
    table ws-bulk "mb_per_s:MB/s:1:med" "p50_us:p50 µs/message:0:med" "cpu:proxy CPU µs/MB:1:med" "errors:errors (sum):0:sum"
    local n
    for n in "${RUN_IDLE[@]}"; do
        cat <<EOF
## Idle WebSockets: $n connections held ${HOLD} s

Sources spread over $SOURCES. RSS in MiB.

EOF
        table "ws-idle-$n" "per_conn:bytes / conn:0:med" "rss_before:RSS before:1:med" "rss_held:RSS held:1:med" "opened:opened:0:med" "failed:failed (sum):0:sum" "dropped:dropped (sum):0:sum"
    done
    cat <<EOF
## Commands

Built with \`cargo build --release --bin tidegate --example loadgen\`. The proxies:

\`\`\`sh
RUST_LOG=warn taskset -c $PROXY_CPU target/release/tidegate run -c tidegate.toml
taskset -c $PROXY_CPU nginx -e error.log -c nginx.conf     # daemon off; worker_processes 1
taskset -c $PROXY_CPU haproxy -db -f haproxy.cfg
taskset -c $LOAD_CPU target/release/examples/loadgen backend --addr 127.0.0.1:$BACKEND1   # and :$BACKEND2
\`\`\`

The load, in the order run (each scenario: direct, tidegate, nginx, haproxy, then again):

\`\`\`sh
$(cat "$TMP/commands")
\`\`\`

<details><summary>tidegate.toml</summary>

\`\`\`toml
$(cat "$TMP/tidegate.toml")
\`\`\`
</details>

<details><summary>nginx.conf</summary>

\`\`\`nginx
$(sed "s|$TMP|/tmp/bench|g" "$TMP/nginx/nginx.conf")
\`\`\`
</details>

<details><summary>haproxy.cfg</summary>

\`\`\`
$(cat "$TMP/haproxy.cfg")
\`\`\`
</details>

## Noise

Two CPUs: the proxy has one to itself, but the load generator and both backends share the
other, so the load side, not the proxy, often limits throughput (compare with "direct"); the
proxy CPU columns say more about efficiency than req/s does. Loopback only: no NIC, no
network latency, and kernel TCP costs are charged to whichever CPU runs the socket call.
Runs are short (${DUR} s) and interleaved so that drift hits every proxy alike; the spread
column shows how much repetitions disagreed. Anything else running on the machine (see the
load average above) shows up as noise, mostly in the p99 and p99.9 columns.
EOF
}

if ((WRITE)); then
    args=()
    ((QUICK)) && args+=(--quick)
    args+=(--write)
    report "${args[@]}" >"$ROOT/BENCHMARKS.md"
    log "wrote BENCHMARKS.md"
else
    args=()
    ((QUICK)) && args+=(--quick)
    report "${args[@]}"
fi
