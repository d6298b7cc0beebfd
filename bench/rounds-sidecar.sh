#!/usr/bin/env bash
# The sidecar target, judged round by round: Sallyport's req/s ≥ 1.1× the better of nginx and
# HAProxy, with a p99 no higher than that peer's. One run of the peer script
# (bench/run-sidecar.sh) measures each proxy once, one after another; on a shared 2-core
# machine the rate drifts by ±20% within a minute, so one run can pass or fail the target on
# drift alone. Here the three proxies run side by side all along, and are measured in short
# interleaved rounds (the order rotates each round, so no proxy always goes first). Each round
# is a verdict; the summary gives the median ratio and how many rounds met the target.
#   wrk --(plain HTTP)--> proxy --(mTLS, client cert)--> nginx receiver (ssl_verify_client on)
# Peers configured as ../shared/bench/peers/run-peers.sh configures them, one thread each;
# Sallyport with its audit log on (an audit file; SALLYPORT_AUDIT=store for the store).
# Usage: bench/rounds-sidecar.sh [get|post, default post] [seconds per round, default 3] [rounds, default 10]
# Env: SALLYPORT_BIN=path measures that build (e.g. the PGO one scripts/build-pgo.sh prints).
# Output: a Markdown table and a summary line.
set -euo pipefail
MODE=${1:-post}
DUR=${2:-3}
ROUNDS=${3:-10}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
bench_scratch sallyport-rounds
bench_start_pair
bench_proxy_conf 18181
nginx -c "$PKI/px/nginx.conf" -p "$PKI/px" & PIDS+=($!)
bench_wait_ports 18181

wrk_args=(-t1 -c64 --latency)
[ "$MODE" = post ] && wrk_args+=(-s "$PKI/post.lua")
NAMES=(HAProxy nginx Sallyport)
PORTS=(18182 18181 18190)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(haproxy -v | head -1 | cut -d' ' -f1-3); $(nginx -v 2>&1); wrk -t1 -c64 -d${DUR}s, $MODE, $ROUNDS rounds"
echo
echo "| round | HAProxy req/s, p99 | nginx req/s, p99 | Sallyport req/s, p99 | vs the better peer | target met |"
echo "| --- | --- | --- | --- | --- | --- |"
ratios=()
met=0
for round in $(seq "$ROUNDS"); do
  declare -A rps=() p99=()
  for k in 0 1 2; do
    i=$(( (k + round) % 3 ))
    url="http://127.0.0.1:${PORTS[$i]}/"
    wrk "${wrk_args[@]}" -d1s "$url" >/dev/null
    out=$(wrk "${wrk_args[@]}" -d"${DUR}s" "$url")
    rps[$i]=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p99[$i]=$(awk '$1=="99%" {print $2}' <<<"$out")
  done
  # wrk prints latencies as 812.00us, 2.31ms or 1.02s: compared in microseconds.
  verdict=$(python3 - "${rps[0]}" "${p99[0]}" "${rps[1]}" "${p99[1]}" "${rps[2]}" "${p99[2]}" <<'PY'
import sys
def us(v):
    for unit, f in (("us", 1), ("ms", 1e3), ("s", 1e6)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    raise SystemExit(f"unreadable wrk latency: {v}")
a = sys.argv[1:]
peers = [(float(a[0]), us(a[1])), (float(a[2]), us(a[3]))]
best = max(peers)
ratio = float(a[4]) / best[0]
print(f"{ratio:.2f} {'yes' if ratio >= 1.1 and us(a[5]) <= best[1] else 'no'}")
PY
)
  read -r ratio ok <<<"$verdict"
  ratios+=("$ratio")
  [ "$ok" = yes ] && met=$((met + 1))
  printf '| %s | %.0f, %s | %.0f, %s | %.0f, %s | %s× | %s |\n' "$round" "${rps[0]}" "${p99[0]}" "${rps[1]}" "${p99[1]}" "${rps[2]}" "${p99[2]}" "$ratio" "$ok"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}')
echo
echo "Sallyport vs the better peer: median ${median}×; the target (≥ 1.1×, p99 no higher) met in $met of $ROUNDS rounds."
