#!/usr/bin/env bash
# Where the sidecar job's floor is on this machine: the CPU every process spends per request
# (proxy, nginx receiver, wrk) and req/s, for HAProxy, Sallyport and two bare proxies built
# from bench/floor/ (hyper alone; httparse over rustls), each on one thread:
#   wrk --(plain HTTP)--> proxy --(mTLS, client cert)--> nginx receiver (ssl_verify_client on)
# On a 2-core machine the three processes share the cores, so req/s follows the sum of their
# CPU per request: what a proxy saves shows up as throughput only as far as the sum falls.
# The bare proxies have none of Sallyport's work (routes, policy, auth, timeouts, retries,
# audit); they show what the job costs on the stack itself.
# Usage: bench/floor-sidecar.sh [get|post, default post] [seconds counted, default 5] [rounds, default 2]
# Env: SALLYPORT_BIN=path measures that build. Output: a Markdown table.
set -euo pipefail
MODE=${1:-post}
DUR=${2:-5}
ROUNDS=${3:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
bench_scratch sallyport-floor
[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
(cd "$HERE/floor" && CARGO_TARGET_DIR="$ROOT/bench/floor/target" cargo build --release --quiet)
FLOOR=$ROOT/bench/floor/target/release/sidecar-floor
bench_start_pair
floor() { exec "$FLOOR" "$1" "127.0.0.1:$2" 127.0.0.1:9443 localhost "$PKI/ca.pem" "$PKI/client.pem" "$PKI/client.key"; }
floor hyper 18191 & FH=$!; PIDS+=("$FH")
floor raw 18192 & FR=$!; PIDS+=("$FR")
bench_wait_ports 18191 18192
RX=$(pgrep -P "$(cat "$PKI/rx/nginx.pid")" | head -1)

wrk_args=(-t1 -c64)
[ "$MODE" = post ] && wrk_args+=(-s "$PKI/post.lua")
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # user + kernel, in clock ticks
hz=$(getconf CLK_TCK)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(haproxy -v | head -1 | cut -d' ' -f1-3); wrk -t1 -c64 -d${DUR}s, $MODE, $ROUNDS rounds"
echo
echo "| round | proxy | req/s | p99 | proxy µs per request | receiver | wrk | all three | req/s vs HAProxy | proxy CPU vs HAProxy |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for round in $(seq "$ROUNDS"); do
  base=""
  for p in "HAProxy $HP 18182" "Sallyport $SP 18190" "bare-hyper $FH 18191" "bare-httparse $FR 18192"; do
    read -r name pid port <<<"$p"
    wrk "${wrk_args[@]}" -d1s "http://127.0.0.1:$port/" >/dev/null
    a=$(ticks "$pid"); x=$(ticks "$RX")
    out=$( { /usr/bin/time -f "WRKTIME %U %S" wrk "${wrk_args[@]}" -d"${DUR}s" --latency "http://127.0.0.1:$port/"; } 2>&1)
    b=$(ticks "$pid"); y=$(ticks "$RX")
    row=$(python3 - "$((b - a))" "$((y - x))" "$out" "$DUR" "$hz" "${base:-}" <<'PY'
import re, sys
proxy, rx, out, dur, hz = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
n = int(re.search(r"(\d+) requests in", out).group(1))
p99 = re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1)
u, s = map(float, re.search(r"^WRKTIME ([0-9.]+) ([0-9.]+)", out, re.M).groups())
per = lambda ticks: ticks * 1e6 / hz / n
p, r, w = per(proxy), per(rx), (u + s) * 1e6 / n
rate = n / dur
base = sys.argv[6].split(",") if sys.argv[6] else [rate, p]
b_rate, b_cpu = float(base[0]), float(base[1])
print(f"{rate:,.0f} | {p99} | {p:.1f} | {r:.1f} | {w:.1f} | {p + r + w:.1f} | {rate / b_rate:.2f}× | {p / b_cpu:.2f}× |\t{rate},{p}")
PY
)
    [ -z "$base" ] && base=${row##*$'\t'}
    echo "| $round | $name | ${row%$'\t'*}"
  done
done
