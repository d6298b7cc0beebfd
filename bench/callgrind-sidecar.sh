#!/usr/bin/env bash
# The sidecar job counted in instructions, not seconds: each proxy runs under valgrind's
# callgrind, is warmed up, then counts the user-space instructions it executes for a fixed
# wrk run. Instructions per request do not depend on what else the shared machine is doing
# (req/s does, by ±15% or more), so this is the figure to compare two builds with, and the
# ratio to the peers is stable from run to run. Kernel work (sockets, loopback TCP) is not
# counted: it is about the same for every proxy doing the same syscalls.
#   wrk --(plain HTTP)--> proxy --(mTLS, client cert)--> nginx receiver (ssl_verify_client on)
# Peers: HAProxy and nginx, one thread each, configured as ../shared/bench/peers/run-peers.sh
# configures them. Sallyport runs with its audit log on, as in production.
# Usage: bench/callgrind-sidecar.sh [get|post, default post] [seconds counted, default 10]
# Env: SALLYPORT_BIN=path measures that build instead of target/release/sallyport (A/B two
# builds); CALLGRIND_KEEP=dir keeps each proxy's callgrind output there for callgrind_annotate.
# Output: a Markdown table. valgrind slows each proxy ~50x; the run takes about 2 minutes.
set -euo pipefail
MODE=${1:-post}
DUR=${2:-10}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
bench_scratch sallyport-cg
bench_tools
command -v haproxy >/dev/null && command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq haproxy valgrind >/dev/null; }
bench_pki
bench_receiver
bench_sallyport_bin
bench_post_lua

bench_haproxy_conf 18182
bench_proxy_conf 18181 "master_process off; "
bench_sidecar_conf 18190

wrk_args=(-t1 -c16)
[ "$MODE" = post ] && wrk_args+=(-s "$PKI/post.lua")

count() { # name port command... → prints a table row
  local name=$1 port=$2; shift 2
  local out="$PKI/cg.$port"
  valgrind --tool=callgrind --callgrind-out-file="$out.%p" "$@" >/dev/null 2>&1 &
  local vp=$!; PIDS+=("$vp")
  for _ in $(seq 120); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.5; done
  wrk "${wrk_args[@]}" -d3s "http://127.0.0.1:$port/" >/dev/null   # warm-up: connections, caches
  sleep 1; callgrind_control -z "$vp" >/dev/null 2>&1
  local res; res=$(wrk "${wrk_args[@]}" -d"${DUR}s" "http://127.0.0.1:$port/")
  sleep 1.5; callgrind_control -d "$vp" >/dev/null 2>&1; sleep 1
  local reqs ir
  reqs=$(awk '/requests in/ {print $1}' <<<"$res")
  ir=$(grep -h '^summary:\|^totals:' "$out".*.1 | head -1 | awk '{print $2}')
  kill "$vp" 2>/dev/null; wait "$vp" 2>/dev/null || true
  if [ -n "${CALLGRIND_KEEP:-}" ]; then mkdir -p "$CALLGRIND_KEEP"; cp "$out".*.1 "$CALLGRIND_KEEP/$name.callgrind"; fi
  echo "$name|$reqs|$ir"
}
rows=()
rows+=("$(count HAProxy 18182 haproxy -f "$PKI/haproxy.cfg" -db)")
rows+=("$(count nginx 18181 nginx -c "$PKI/px/nginx.conf" -p "$PKI/px")")
rows+=("$(count Sallyport 18190 "$BIN" sidecar --config "$PKI/sidecar.toml")")

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(haproxy -v | head -1 | cut -d' ' -f1-3); $(nginx -v 2>&1); wrk -t1 -c16 -d${DUR}s, $MODE"
echo
echo "| proxy | requests counted | user-space instructions per request | vs HAProxy |"
echo "| --- | --- | --- | --- |"
base=""
for r in "${rows[@]}"; do
  IFS='|' read -r name reqs ir <<<"$r"
  per=$((ir / reqs)); [ -z "$base" ] && base=$per
  echo "| $name | $reqs | $per | $(python3 -c "print(f'{$per/$base:.2f}×')") |"
done
