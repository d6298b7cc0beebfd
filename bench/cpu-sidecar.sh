#!/usr/bin/env bash
# The sidecar job's native CPU cost per request, user and kernel apart, Sallyport beside
# HAProxy (one thread, configured as ../shared/bench/peers/run-peers.sh does):
#   wrk --(plain HTTP)--> proxy --(mTLS, client cert)--> nginx receiver (ssl_verify_client on)
# Each proxy gets the same wrk load in turn (2 s warm-up, then the counted run); its CPU time
# is read from /proc/PID/stat before and after. Unlike callgrind-sidecar.sh this runs at full
# speed with the CPU's own crypto instructions and counts the kernel's work (sockets,
# wake-ups, context switches); unlike req/s it does not depend on how the 2 cores are shared.
# The audit writer's thread (sallyport-audit) is also read apart: its share of the total.
# Usage: bench/cpu-sidecar.sh [get|post, default post] [seconds counted, default 5] [rounds, default 2]
# Env: SALLYPORT_BIN=path measures that build. Output: a Markdown table.
set -euo pipefail
MODE=${1:-post}
DUR=${2:-5}
ROUNDS=${3:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
bench_scratch sallyport-cpu
bench_start_pair

wrk_args=(-t1 -c64)
[ "$MODE" = post ] && wrk_args+=(-s "$PKI/post.lua")
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }   # utime, stime in clock ticks
# user + kernel ticks of $1's thread named $2 (0 when it has none): Sallyport's audit writer.
thread_ticks() {
  local t
  for t in /proc/"$1"/task/*; do
    [ "$(cat "$t/comm")" = "$2" ] && { awk '{print $14 + $15}' "$t/stat"; return; }
  done
  echo 0
}
hz=$(getconf CLK_TCK)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(haproxy -v | head -1 | cut -d' ' -f1-3); wrk -t1 -c64 -d${DUR}s, $MODE, $ROUNDS rounds"
echo
echo "| round | proxy | req/s | user µs per request | kernel µs per request | total | of which the audit writer | vs HAProxy |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for round in $(seq "$ROUNDS"); do
  base=""
  for p in "HAProxy $HP 18182" "Sallyport $SP 18190"; do
    read -r name pid port <<<"$p"
    wrk "${wrk_args[@]}" -d2s "http://127.0.0.1:$port/" >/dev/null
    a=$(ticks "$pid"); wa=$(thread_ticks "$pid" sallyport-audit)
    out=$(wrk "${wrk_args[@]}" -d"${DUR}s" "http://127.0.0.1:$port/")
    b=$(ticks "$pid"); wb=$(thread_ticks "$pid" sallyport-audit)
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    row=$(python3 - "$a" "$b" "$n" "$DUR" "$hz" "${base:-0}" "$((wb - wa))" <<'PY'
import sys
a, b = map(int, sys.argv[1].split()), map(int, sys.argv[2].split())
(ua, sa), (ub, sb) = list(a), list(b)
n, dur, hz, base = int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
u, s = (ub - ua) * 1e6 / hz / n, (sb - sa) * 1e6 / hz / n
w = int(sys.argv[7]) * 1e6 / hz / n
audit = f"{w:.1f}" if w else "—"
print(f"{n / dur:,.0f} | {u:.1f} | {s:.1f} | {u + s:.1f} | {audit} | {(u + s) / base if base else 1:.2f}× |\t{u + s}")
PY
)
    total=${row##*$'\t'}; row=${row%$'\t'*}
    [ -z "$base" ] && base=$total
    echo "| $round | $name | $row"
  done
done
