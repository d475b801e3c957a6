#!/usr/bin/env bash
# Benchmarks tidegate against nginx, HAProxy and no proxy ("direct") on this machine, in one run.
#
#   bash benches/compare.sh            # full run (3 repetitions, 5 s runs); report on stdout
#   bash benches/compare.sh --write    # the same, and the report goes to BENCHMARKS.md
#   bash benches/compare.sh --quick    # smoke run: 1 repetition, 2 s runs, 1,000 idle only
#   bash benches/compare.sh --keep     # keep the temp dir (configs, certs, proxy and loadgen logs)
#
# Scenarios: HTTP, WebSocket (echo, connect, bulk, idle), TLS 1.3 (full handshakes with ECDSA
# P-256 and RSA 2048 certificates, wss:// echo) and layer 4 (TCP relay throughput, idle TCP).
# Every proxy is pinned to CPU 0 (one worker: nginx `worker_processes 1`, HAProxy `nbthread 1`,
# tidegate's tokio runtime sizes itself from its CPU affinity), the load generator and the
# backends to CPU 1. Scenarios run target after target (direct, tidegate, nginx, haproxy),
# repeated, and the report gives medians. Proxy CPU time comes from /proc/PID/stat and memory
# from /proc/PID/status, summed over the proxy's processes (nginx's master and worker).
# Everything listens on and connects to 127.0.0.0/8; every process started here is stopped on
# exit by its pid. Needs root for apt-get (if nginx, its stream module, haproxy or openssl are
# missing) and runs nginx as root. Test certificates are made with openssl in the temp dir.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }

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
TLS_C=20 TCP_BULK_BYTES=536870912
TCP_BULK_CONNS=(1 4)
KEY_TYPES=(ecdsa rsa)
declare -A KEY_DESC=([ecdsa]="ECDSA P-256" [rsa]="RSA 2048")
SOURCES=127.0.0.2-127.0.0.50
BACKEND1=19101 BACKEND2=19102 BACKEND_TCP1=19111 BACKEND_TCP2=19112
declare -A PORT=([tidegate]=18080 [nginx]=18081 [haproxy]=18082 [direct]=$BACKEND1)
declare -A TLS_PORT=([tidegate]=18443 [nginx]=18444 [haproxy]=18445)
declare -A TCP_PORT=([tidegate]=18090 [nginx]=18091 [haproxy]=18092 [direct]=$BACKEND_TCP1)
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
command -v openssl >/dev/null || missing+=(openssl)
APT_UPDATED=0
apt_install() {
    ((APT_UPDATED)) || { apt-get update -q >&2 && APT_UPDATED=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2
}
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    if ! apt_install "${missing[@]}"; then
        # nginx-light is a transitional package on newer Debian; plain nginx then.
        apt_install "${missing[@]/nginx-light/nginx}"
    fi
fi
command -v nginx >/dev/null || die "nginx not found"
command -v haproxy >/dev/null || die "haproxy not found"
command -v openssl >/dev/null || die "openssl not found"

# nginx's layer 4 (stream {}): built in, or a dynamic module (Debian: libnginx-mod-stream)
# loaded by our nginx.conf. Without it nginx sits out the TCP scenarios.
NGINX_V=$(nginx -V 2>&1)
NGINX_STREAM=1 NGINX_STREAM_LOAD=""
if grep -q -- '--with-stream=dynamic' <<<"$NGINX_V"; then
    NGINX_MODULES=$(sed -n 's/.*--modules-path=\([^ ]*\).*/\1/p' <<<"$NGINX_V")
    NGINX_STREAM_LOAD=${NGINX_MODULES:-/usr/lib/nginx/modules}/ngx_stream_module.so
    if [[ ! -f $NGINX_STREAM_LOAD ]]; then
        log "installing libnginx-mod-stream (nginx's stream module, for the TCP scenarios)"
        apt_install libnginx-mod-stream || true
    fi
    [[ -f $NGINX_STREAM_LOAD ]] || { NGINX_STREAM=0 NGINX_STREAM_LOAD=""; }
elif ! grep -q -- '--with-stream\b' <<<"$NGINX_V"; then
    NGINX_STREAM=0
fi
((NGINX_STREAM)) || log "warning: nginx has no stream module; nginx sits out the TCP scenarios"
grep -q -- '--with-http_ssl_module' <<<"$NGINX_V" || die "nginx has no http_ssl_module"
HAPROXY_TLS=1
haproxy -vv 2>/dev/null | grep -q '^Built with OpenSSL' || { HAPROXY_TLS=0; log "warning: haproxy without OpenSSL; it sits out the TLS scenarios"; }

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
    if ((2 * n + 200 <= FDS)); then RUN_IDLE+=("$n"); else log "skipping ws-idle and tcp-idle $n: needs $((2 * n + 200)) fds, limit $FDS"; fi
done

for p in $BACKEND1 $BACKEND2 $BACKEND_TCP1 $BACKEND_TCP2 "${PORT[@]}" "${TLS_PORT[@]}" "${TCP_PORT[@]}"; do
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
for port in $BACKEND1 $BACKEND2 $BACKEND_TCP1 $BACKEND_TCP2; do
    kind=backend
    [[ $port == "$BACKEND_TCP1" || $port == "$BACKEND_TCP2" ]] && kind=backend-tcp
    taskset -c "$LOAD_CPU" "$LOADGEN" "$kind" --addr "127.0.0.1:$port" 2>>"$TMP/backend-$port.log" &
    BACKEND_PIDS+=($!)
    wait_port "$port" $! || die "$kind on $port did not start (see $TMP/backend-$port.log)"
done
log "backends on 127.0.0.1:$BACKEND1 and :$BACKEND2, TCP echo backends on :$BACKEND_TCP1 and :$BACKEND_TCP2 (CPU $LOAD_CPU)"

# Self-signed test certificates, one per key type; the name picks the certificate (SNI).
mkdir -p "$TMP/tls"
declare -A NEWKEY=([ecdsa]="-newkey ec -pkeyopt ec_paramgen_curve:P-256" [rsa]="-newkey rsa:2048")
CERT_CMDS=""
for key in "${KEY_TYPES[@]}"; do
    # shellcheck disable=SC2206 # NEWKEY holds words
    newkey=(${NEWKEY[$key]})
    cmd=(openssl req -x509 "${newkey[@]}" -nodes -days 30 -subj "/CN=$key.bench.test"
        -addext "subjectAltName=DNS:$key.bench.test" -keyout "$TMP/tls/$key.key" -out "$TMP/tls/$key.crt")
    "${cmd[@]}" 2>>"$TMP/openssl.log" || die "openssl could not make the $key certificate (see $TMP/openssl.log)"
    # HAProxy wants the certificate and its key in one file.
    cat "$TMP/tls/$key.crt" "$TMP/tls/$key.key" >"$TMP/tls/$key.pem"
    CERT_CMDS+="${cmd[*]}"$'\n'
done
CERT_CMDS=${CERT_CMDS//"$TMP"\//}
CERT_CMDS=${CERT_CMDS%$'\n'}

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

# TLS 1.3 in front of the same backends: the certificate is picked by SNI (ECDSA by default).
# Session resumption (tickets and cache) is always on in tidegate; the bench client never
# resumes, so every handshake is a full one.
[[listener]]
name = "bench-tls"
bind = "127.0.0.1:${TLS_PORT[tidegate]}"
mode = "http"

  [listener.tls]
  certificates = [
    { cert = "tls/ecdsa.crt", key = "tls/ecdsa.key", default = true },
    { cert = "tls/rsa.crt", key = "tls/rsa.key" },
  ]
  min_version = "1.3"

  [[listener.route]]
  upstream = "backends"

# Layer 4: every connection balanced to a TCP echo backend, bytes relayed both ways.
[[listener]]
name = "bench-tcp"
bind = "127.0.0.1:${TCP_PORT[tidegate]}"
mode = "tcp"
upstream = "tcp-backends"

[upstream.backends]
balance = "least_conn"
keepalive = 32
servers = [
  { addr = "127.0.0.1:$BACKEND1" },
  { addr = "127.0.0.1:$BACKEND2" },
]
  [upstream.backends.timeouts]
  tunnel_idle = "1h"

[upstream.tcp-backends]
balance = "least_conn"
servers = [
  { addr = "127.0.0.1:$BACKEND_TCP1" },
  { addr = "127.0.0.1:$BACKEND_TCP2" },
]
  [upstream.tcp-backends.timeouts]
  tunnel_idle = "1h"
EOF

NGINX_LOAD_STREAM=""
[[ -n $NGINX_STREAM_LOAD ]] && NGINX_LOAD_STREAM="load_module $NGINX_STREAM_LOAD;"
cat >"$TMP/nginx/nginx.conf" <<EOF
# One worker (it gets one CPU), run by compare.sh in the foreground.
$NGINX_LOAD_STREAM
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
        include $TMP/nginx/proxy.conf;
    }

    # TLS 1.3, a certificate per server name (SNI), ECDSA the default. No session cache; the
    # bench client never resumes anyway, so every handshake is a full one. Session tickets
    # stay on (the default), as in tidegate.
    ssl_protocols TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets on;

    server {
        listen 127.0.0.1:${TLS_PORT[nginx]} ssl backlog=4096 default_server;
        server_name ecdsa.bench.test;
        ssl_certificate $TMP/tls/ecdsa.crt;
        ssl_certificate_key $TMP/tls/ecdsa.key;
        include $TMP/nginx/proxy.conf;
    }

    server {
        listen 127.0.0.1:${TLS_PORT[nginx]} ssl; # socket options go on the default_server's listen
        server_name rsa.bench.test;
        ssl_certificate $TMP/tls/rsa.crt;
        ssl_certificate_key $TMP/tls/rsa.key;
        include $TMP/nginx/proxy.conf;
    }
}
EOF
if ((NGINX_STREAM)); then
    cat >>"$TMP/nginx/nginx.conf" <<EOF

# Layer 4: every connection balanced to a TCP echo backend.
stream {
    upstream tcp_backends {
        least_conn;
        server 127.0.0.1:$BACKEND_TCP1;
        server 127.0.0.1:$BACKEND_TCP2;
    }

    server {
        listen 127.0.0.1:${TCP_PORT[nginx]} backlog=4096;
        proxy_pass tcp_backends;
        proxy_connect_timeout 5s;
        proxy_timeout 1h;
    }
}
EOF
fi

cat >"$TMP/nginx/proxy.conf" <<EOF
# Included by every http server block.
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
if ((HAPROXY_TLS)); then
    cat >>"$TMP/haproxy.cfg" <<EOF

# TLS 1.3, the certificate picked by SNI (the first is the default); session tickets and
# cache at their defaults (the bench client never resumes).
frontend bench_tls
    bind 127.0.0.1:${TLS_PORT[haproxy]} ssl crt $TMP/tls/ecdsa.pem crt $TMP/tls/rsa.pem ssl-min-ver TLSv1.3 alpn http/1.1
    default_backend backends
EOF
fi
cat >>"$TMP/haproxy.cfg" <<EOF

# Layer 4: every connection balanced to a TCP echo backend (no splicing: the default).
defaults l4
    mode tcp
    maxconn $HAPROXY_MAXCONN
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend bench_tcp
    bind 127.0.0.1:${TCP_PORT[haproxy]}
    default_backend tcp_backends

backend tcp_backends
    balance leastconn
    server t1 127.0.0.1:$BACKEND_TCP1
    server t2 127.0.0.1:$BACKEND_TCP2
EOF

"$TIDEGATE" check -c "$TMP/tidegate.toml" >"$TMP/tidegate-check.log" 2>&1 || die "tidegate check failed: $(cat "$TMP/tidegate-check.log")"
nginx -t -q -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf" 2>"$TMP/nginx-check.log" || die "nginx -t failed: $(cat "$TMP/nginx-check.log")"
haproxy -c -q -f "$TMP/haproxy.cfg" >"$TMP/haproxy-check.log" 2>&1 || die "haproxy -c failed: $(cat "$TMP/haproxy-check.log")"

# Whether TARGET takes part in the scenario family (http, tls, tcp).
runs() {
    case "$1:$2" in
        tls:direct) return 1 ;; # no TLS backend: TLS is measured proxy against proxy
        tls:haproxy) ((HAPROXY_TLS)) ;;
        tcp:nginx) ((NGINX_STREAM)) ;;
        *) return 0 ;;
    esac
}

start_proxy() {
    local name=$1 pid
    case "$name" in
        tidegate) RUST_LOG=warn taskset -c "$PROXY_CPU" "$TIDEGATE" run -c "$TMP/tidegate.toml" 2>>"$TMP/tidegate.log" & ;;
        nginx) taskset -c "$PROXY_CPU" nginx -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf" 2>>"$TMP/nginx/stderr.log" & ;;
        haproxy) taskset -c "$PROXY_CPU" haproxy -db -f "$TMP/haproxy.cfg" >>"$TMP/haproxy.log" 2>&1 & ;;
    esac
    pid=$!
    PROXY_PID[$name]=$pid
    local port
    for port in "${PORT[$name]}" $(runs tls "$name" && echo "${TLS_PORT[$name]}") $(runs tcp "$name" && echo "${TCP_PORT[$name]}"); do
        wait_port "$port" "$pid" || die "$name did not start on port $port (logs in $TMP)"
    done
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
log "  TLS on :${TLS_PORT[tidegate]}, :${TLS_PORT[nginx]}, :${TLS_PORT[haproxy]}; TCP on :${TCP_PORT[tidegate]}, :${TCP_PORT[nginx]}, :${TCP_PORT[haproxy]}"

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
# A string from it.
jstr() { sed -n "s/.*\"$2\":\"\([^\"]*\)\".*/\1/p" <<<"$1"; }

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
    if [[ $target != direct ]]; then
        # How busy the proxy's CPU was over the run, in %: near 100, the proxy is the limit.
        record "$scen" "$target" busy "$(awk -v t=$((c1 - c0)) -v hz="$CLK_TCK" -v s="$(jget "$json" secs)" 'BEGIN {if (s > 0) printf "%.0f", t * 100 / hz / s}')"
    fi
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

scenario_tls_handshake() {
    local key=$1 target=$2 scen=tls-hs-$1 json m
    json=$(timed_run "$scen" "$target" handshakes 1 tls-handshake --addr "127.0.0.1:${TLS_PORT[$target]}" \
        -c $TLS_C -d $DUR --sni "$key.bench.test" --sources $SOURCES)
    for m in handshakes_per_s p50_us p99_us errors full full_hrr resumed tickets_per_handshake different_params; do
        record "$scen" "$target" $m "$(jget "$json" $m)"
    done
    # What was negotiated (text, not a metric: kept apart from the results).
    echo "$(jstr "$json" version) $(jstr "$json" cipher) $(jstr "$json" kx) $(jstr "$json" sig) ALPN $(jstr "$json" alpn)" >>"$TMP/params.$scen.$target"
    if [[ $(jget "$json" resumed) != 0 || $(jget "$json" full_hrr) != 0 || $(jget "$json" different_params) != 0 ]]; then
        log "warning: $scen against $target: not every handshake was the same plain full one: $json"
    fi
}

scenario_wss() {
    local json m
    json=$(timed_run wss-echo "$1" messages 1 ws-echo --url "wss://127.0.0.1:${TLS_PORT[$1]}/" --sni ecdsa.bench.test \
        -c $ECHO_C -s $ECHO_SIZE -d $DUR)
    for m in msgs_per_s p50_us p99_us p999_us errors; do record wss-echo "$1" $m "$(jget "$json" $m)"; done
}

# Relay throughput: TCP_BULK_BYTES in all over C connections, each echoed back.
scenario_tcp_bulk() {
    local c=$1 target=$2 scen=tcp-bulk-$1 json m
    json=$(timed_run "$scen" "$target" bytes 0.000001 tcp-bulk --addr "127.0.0.1:${TCP_PORT[$target]}" -c "$c" -b $((TCP_BULK_BYTES / c)))
    for m in mb_per_s secs errors; do record "$scen" "$target" $m "$(jget "$json" $m)"; done
}

# Idle connections (ws or tcp): a freshly started proxy, RSS before opening and while all are
# held.
scenario_idle() {
    local kind=$1 target=$2 n=$3 scen=$1-idle-$3 before=0 held=0 i json args
    [[ $target != direct ]] && restart_proxy "$target" && before=$(rss_kb "$target")
    if [[ $kind == ws ]]; then
        args=(ws-idle --url "$(url ws "$target")" -n "$n" --hold "$HOLD" --sources "$SOURCES")
    else
        args=(tcp-idle --addr "127.0.0.1:${TCP_PORT[$target]}" -n "$n" --hold "$HOLD" --sources "$SOURCES")
    fi
    note_cmd "$scen.$target" "$LOADGEN" "${args[@]}"
    : >"$TMP/idle.err"
    taskset -c "$LOAD_CPU" "$LOADGEN" "${args[@]}" >"$TMP/idle.out" 2>"$TMP/idle.err" &
    BG_PID=$!
    for ((i = 0; i < 1200; i++)); do
        grep -q '^READY$' "$TMP/idle.err" && break
        kill -0 "$BG_PID" 2>/dev/null || break
        sleep 0.1
    done
    grep -q '^READY$' "$TMP/idle.err" || die "$kind-idle against $target never got READY: $(tail -3 "$TMP/idle.err")"
    sleep 1 # let the proxy finish settling its side of the last handshakes
    [[ $target != direct ]] && held=$(rss_kb "$target")
    wait "$BG_PID" || die "$kind-idle against $target failed: $(tail -3 "$TMP/idle.err")"
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
for key in "${KEY_TYPES[@]}"; do SCENARIOS+=("tls-hs-$key"); done
SCENARIOS+=(wss-echo)
for c in "${TCP_BULK_CONNS[@]}"; do SCENARIOS+=("tcp-bulk-$c"); done
for n in "${RUN_IDLE[@]}"; do SCENARIOS+=("tcp-idle-$n"); done

# The family a scenario belongs to, for runs().
family() {
    case "$1" in
        tls-* | wss-*) echo tls ;;
        tcp-*) echo tcp ;;
        *) echo http ;;
    esac
}

for scen in "${SCENARIOS[@]}"; do
    for ((rep = 1; rep <= REPS; rep++)); do
        for target in "${TARGETS[@]}"; do
            runs "$(family "$scen")" "$target" || continue
            log "$scen, repetition $rep/$REPS: $target"
            case "$scen" in
                http) scenario_http "$target" ;;
                ws-echo) scenario_echo "$target" ;;
                ws-connect) scenario_connect "$target" ;;
                ws-bulk) scenario_bulk "$target" ;;
                ws-idle-*) scenario_idle ws "$target" "${scen#ws-idle-}" ;;
                tls-hs-*) scenario_tls_handshake "${scen#tls-hs-}" "$target" ;;
                wss-echo) scenario_wss "$target" ;;
                tcp-bulk-*) scenario_tcp_bulk "${scen#tcp-bulk-}" "$target" ;;
                tcp-idle-*) scenario_idle tcp "$target" "${scen#tcp-idle-}" ;;
            esac
            sleep 0.5
        done
    done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# Anything the proxies, the load generator or the backends complained about, for whoever runs this.
NOT_COMPLAINTS='^loadgen: (opening|held|[0-9]+ open)|^READY$|^loadgen (TCP echo )?backend listening'
for f in "$TMP/tidegate.log" "$TMP/nginx/error.log" "$TMP/nginx/stderr.log" "$TMP/haproxy.log" "$TMP/loadgen.log" "$TMP"/backend-*.log; do
    n=$(grep -cvE "$NOT_COMPLAINTS" "$f" 2>/dev/null || true)
    if ((${n:-0} > 0)); then
        log "${f#"$TMP"/}: $n line(s), the last ones:"
        grep -vE "$NOT_COMPLAINTS" "$f" | tail -3 | sed 's/^/    /' >&2
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

# table SCENARIO "metric:Header:decimals:agg" ... ; the first metric gets a spread column. agg is
# med (median, with ratios), info (median, no ratio) or sum.
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
        compgen -G "$RES/$scen.$t.*" >/dev/null || continue # not run against this target
        row="| $t |"
        for spec in "${specs[@]}"; do
            IFS=: read -r m h d a <<<"$spec"
            row+=" $(fmt "$(agg "$scen" "$t" "$m" "$a")" "$d") |"
            if [[ $spec == "${specs[0]}" && $REPS -gt 1 ]]; then row+=" $(spread "$scen" "$t" "$m") |"; fi
        done
        echo "$row"
    done
    for other in nginx haproxy; do
        compgen -G "$RES/$scen.$other.*" >/dev/null || continue
        compgen -G "$RES/$scen.tidegate.*" >/dev/null || continue
        row="| **tidegate / $other** |"
        for spec in "${specs[@]}"; do
            IFS=: read -r m h d a <<<"$spec"
            if [[ $a == sum || $a == info ]]; then row+=" – |"; else row+=" **$(ratio "$(agg "$scen" tidegate "$m" med)" "$(agg "$scen" "$other" "$m" med)")** |"; fi
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
- TLS: tidegate rustls $(sed -n '/^name = "rustls"$/{n;s/^version = "\(.*\)"/\1/p;}' "$ROOT/Cargo.lock" | head -1) (aws-lc-rs); nginx $(sed -n 's/^built with \(OpenSSL [^ ]*\).*/\1/p' <<<"$NGINX_V"); HAProxy $(haproxy -vv 2>/dev/null | sed -n 's/^Running on \(OpenSSL\) version : \(OpenSSL \)\{0,1\}\([^ ]*\).*/\1 \3/p'); OS \`openssl\` $(openssl version | awk '{print $2}')
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

TLS: each proxy has a second HTTP listener that terminates TLS 1.3 only (tidegate
\`min_version = "1.3"\`, nginx \`ssl_protocols TLSv1.3\`, HAProxy \`ssl-min-ver TLSv1.3\`) with two
self-signed certificates made by \`openssl\` for this run, ECDSA P-256 and RSA 2048, picked by
the server name (SNI; ECDSA is the default), and proxies to the same two backends in plain
text. The client is rustls in the load generator: TLS 1.3 only, X25519 the one key-exchange
group offered (so no proxy can pick a different one), AES-GCM and ChaCha20 suites in rustls'
order, ALPN \`http/1.1\`, any certificate accepted (the handshake signature is still checked),
and **no resumption** (\`Resumption::disabled()\`): every handshake is a full one. What was
negotiated is listed under each handshake table. Layer 4: each proxy has a TCP listener
(tidegate \`mode = "tcp"\`, nginx \`stream {}\`${NGINX_STREAM_LOAD:+ from the dynamic module}, HAProxy \`mode tcp\`) that balances
connections by least connections over two raw TCP echo backends (\`loadgen backend-tcp\`, on
CPU $LOAD_CPU too) with a 1 h idle timeout.

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
    local key c t
    for key in "${KEY_TYPES[@]}"; do
        cat <<EOF
## TLS 1.3 full handshakes, ${KEY_DESC[$key]} certificate: $TLS_C concurrent loops

Each loop: TCP connect, a full handshake (SNI \`$key.bench.test\`), then the client's
close_notify and reading until the proxy closes; no request. Latency is TCP connect +
handshake. "resumed" counts handshakes the client saw resumed (it never offers a session, so
0). "tickets / hs" is session tickets the proxy sent per handshake (work for resumptions that
never come). "proxy CPU busy %" is the proxy's CPU time over the run's wall time: well below
100, the client (full handshakes cost the client about as much as the server, and it shares
CPU $LOAD_CPU with the backends) is the limit, and proxy CPU per handshake is the figure that
compares the proxies. No "direct" row: there is no TLS backend. Client sources spread over
$SOURCES.

EOF
        table "tls-hs-$key" "handshakes_per_s:handshakes/s:0:med" "p50_us:p50 µs:0:med" "p99_us:p99 µs:0:med" "cpu:proxy CPU µs/handshake:1:med" "busy:proxy CPU busy %:0:info" "tickets_per_handshake:tickets / hs:1:info" "resumed:resumed (sum):0:sum" "errors:errors (sum):0:sum"
        echo "Negotiated:"
        echo
        for t in "${PROXIES[@]}"; do
            [[ -s $TMP/params.tls-hs-$key.$t ]] && echo "- $t: $(sort -u "$TMP/params.tls-hs-$key.$t" | paste -sd ';' | sed 's/;/; /g')"
        done
        echo
    done
    cat <<EOF
## wss:// echo: $ECHO_SIZE-byte messages, $ECHO_C connections over TLS 1.3, one message in flight each

The WebSocket echo above, over TLS (ECDSA P-256, X25519): the proxy decrypts, forwards in
plain text to the same backends and encrypts the echo. No "direct" row.

EOF
    table wss-echo "msgs_per_s:msg/s:0:med" "p50_us:p50 µs:0:med" "p99_us:p99 µs:0:med" "p999_us:p99.9 µs:0:med" "cpu:proxy CPU µs/msg:2:med" "busy:proxy CPU busy %:0:info" "errors:errors (sum):0:sum"
    local tls_cost=""
    for t in "${PROXIES[@]}"; do
        local a b
        a=$(agg wss-echo "$t" cpu med) b=$(agg ws-echo "$t" cpu med)
        [[ -n $a && -n $b ]] && tls_cost+="${tls_cost:+, }$t $(awk -v a="$a" -v b="$b" 'BEGIN {printf "%+.2f", a - b}') µs"
    done
    [[ -n $tls_cost ]] && printf 'TLS cost per message (proxy CPU µs/msg, wss − ws): %s.\n\n' "$tls_cost"
    for c in "${TCP_BULK_CONNS[@]}"; do
        cat <<EOF
## TCP relay throughput: $((TCP_BULK_BYTES / 1048576)) MiB echoed over $c connection(s)

Layer 4. Each connection sends its $((TCP_BULK_BYTES / c / 1048576)) MiB in 64 KiB writes while reading the echo back
(checked byte for byte); MB/s is 10⁶ bytes echoed per second of wall time, each byte
crossing the proxy twice; proxy CPU is per MB echoed.

EOF
        table "tcp-bulk-$c" "mb_per_s:MB/s:1:med" "secs:seconds:2:med" "cpu:proxy CPU µs/MB:1:med" "busy:proxy CPU busy %:0:info" "errors:errors (sum):0:sum"
    done
    for n in "${RUN_IDLE[@]}"; do
        cat <<EOF
## Idle TCP connections: $n held ${HOLD} s

Layer 4. Each connection echoes 4 bytes once (so the proxy has connected it to a backend and
relayed both ways), then sits. Sources spread over $SOURCES. RSS in MiB.

EOF
        table "tcp-idle-$n" "per_conn:bytes / conn:0:med" "rss_before:RSS before:1:med" "rss_held:RSS held:1:med" "opened:opened:0:med" "failed:failed (sum):0:sum" "dropped:dropped (sum):0:sum"
    done
    cat <<EOF
## Commands

Built with \`cargo build --release --bin tidegate --example loadgen\`. The proxies:

\`\`\`sh
RUST_LOG=warn taskset -c $PROXY_CPU target/release/tidegate run -c tidegate.toml
taskset -c $PROXY_CPU nginx -e error.log -c nginx.conf     # daemon off; worker_processes 1
taskset -c $PROXY_CPU haproxy -db -f haproxy.cfg
taskset -c $LOAD_CPU target/release/examples/loadgen backend --addr 127.0.0.1:$BACKEND1   # and :$BACKEND2
taskset -c $LOAD_CPU target/release/examples/loadgen backend-tcp --addr 127.0.0.1:$BACKEND_TCP1   # and :$BACKEND_TCP2
\`\`\`

The test certificates (\`tls/KEY.pem\`, certificate then key, for HAProxy):

\`\`\`sh
$CERT_CMDS
\`\`\`

The load, in the order run (each scenario: direct, tidegate, nginx, haproxy, then again; no
direct for TLS):

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

proxy.conf:

\`\`\`nginx
$(cat "$TMP/nginx/proxy.conf")
\`\`\`
</details>

<details><summary>haproxy.cfg</summary>

\`\`\`
$(sed "s|$TMP|/tmp/bench|g" "$TMP/haproxy.cfg")
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
Through a proxy, the load CPU also does the kernel's loopback work for the proxy's sockets
(the sender's CPU carries it), so TCP relay MB/s through any proxy stays well below "direct";
the "proxy CPU busy %" columns of the TLS and TCP tables show which side was the limit.
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
