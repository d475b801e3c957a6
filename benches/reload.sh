#!/usr/bin/env bash
# Reload latency under load: tidegate with 100 upstreams and N open WebSocket tunnels (default
# 9,000: a process may hold 20,000 files here and each tunnel takes two), reloaded R times by
# SIGHUP while an HTTP load runs. Reports how long each reload took to apply (from tidegate's
# own "reload applied" log line) and the HTTP latency percentiles with and without reloads.
#
#     bash benches/reload.sh [TUNNELS] [RELOADS]
#
# Loopback only; every load step is bounded in time; everything started is stopped by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
TUNNELS=${1:-9000}
RELOADS=${2:-20}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release --quiet --bin tidegate --example loadgen
TG=target/release/tidegate
LG=target/release/examples/loadgen
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
B1=$(free_port); B2=$(free_port); P=$(free_port)
"$LG" backend --addr "127.0.0.1:$B1" & pids+=($!)
"$LG" backend --addr "127.0.0.1:$B2" & pids+=($!)

write_config() { # $1: extra server in upstream u50 (0 or 1)
  {
    echo "reload_on_change = false"
    echo "[[listener]]"; echo "name = \"p\""; echo "bind = \"127.0.0.1:$P\""
    echo "  [[listener.route]]"; echo "  upstream = \"u0\""
    for i in $(seq 0 99); do
      echo "[upstream.u$i]"
      echo "balance = \"least_conn\""
      if [ "$i" = 50 ] && [ "$1" = 1 ]; then
        echo "servers = [{ addr = \"127.0.0.1:$B1\" }, { addr = \"127.0.0.1:$B2\" }, { addr = \"127.0.0.1:9\" }]"
      else
        echo "servers = [{ addr = \"127.0.0.1:$B1\" }, { addr = \"127.0.0.1:$B2\" }]"
      fi
    done
  } > "$tmp/tg.toml"
}
write_config 0
RUST_LOG=info,access=off "$TG" run -c "$tmp/tg.toml" 2> "$tmp/tg.log" & TGPID=$!; pids+=($TGPID)
for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$P") 2>/dev/null && break; sleep 0.05; done

HOLD=$((RELOADS / 2 + 40))
"$LG" ws-idle --url "ws://127.0.0.1:$P/" -n "$TUNNELS" --hold "$HOLD" --sources 127.0.0.2-127.0.0.60 > "$tmp/idle.json" 2> "$tmp/idle.err" & IDLE=$!; pids+=($IDLE)
for _ in $(seq 600); do grep -q READY "$tmp/idle.err" && break; sleep 0.1; done
echo "tunnels open: $(grep -c . "$tmp/idle.err" >/dev/null; tail -1 "$tmp/idle.err")"

echo "== HTTP latency, no reloads (8 s)"
"$LG" http --url "http://127.0.0.1:$P/" -c 20 -d 8 | tee "$tmp/base.json"
echo "== HTTP latency with $RELOADS reloads (one every 400 ms)"
"$LG" http --url "http://127.0.0.1:$P/" -c 20 -d $((RELOADS * 4 / 10 + 2)) > "$tmp/during.json" & H=$!
for r in $(seq "$RELOADS"); do
  write_config $((r % 2)); kill -HUP "$TGPID"; sleep 0.4
done
wait "$H"; cat "$tmp/during.json"
echo "== reload latency, SIGHUP received -> new config serving (tidegate's own measure, µs):"
grep -o 'total_us=[0-9]*' "$tmp/tg.log" | cut -d= -f2 | sort -n | awk '{a[NR]=$1} END {print "n="NR, "p50="a[int(NR*0.5)+1], "p99="a[int(NR*0.99)+1], "max="a[NR]}'
grep -c "reload refused" "$tmp/tg.log" | sed 's/^/refused: /'
