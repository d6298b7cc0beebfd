#!/usr/bin/env bash
# Export benchmark, with its peer in the same run (machines are shared and noisy: compare
# ratios, not absolute figures).
#   Sallyport: ingest → trigger → payload → durable outbox → mTLS delivery → nginx receiver
#   Peer:      wrk → nginx proxy (keep-alive, client cert) → the same nginx receiver, same body size
# The receiver is nginx with ssl_verify_client on, one worker, certificates from the openssl CLI
# (as ../shared/bench/peers/run-peers.sh does).
# Usage: bench/run-export.sh [N profiles, default 200000] [backfill N, default 1000000]
set -euo pipefail
N=${1:-200000}
BACKFILL=${2:-1000000}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
bench_scratch sallyport-bench
bench_tools
bench_pki
cd "$PKI"
# A body the size of a Sallyport payload in this benchmark (~450 bytes).
python3 -c "import json;print(json.dumps({'firstName':'First1','identityMap':{'ecid':[{'id':'0'*38}],'email_lc_sha256':[{'id':'0'*64}]},'person':{'email':'user1@example.com'},'segmentMembership':{'ups':{'5b998cb9-9488-4ec3-8d95-fa8338ced490':{'lastQualificationTime':'2026-11-25T10:00:00Z','name':'First name equals John','status':'realized'}}}}),end='')" > body.json
printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nlocal f = io.open("%s/body.json"); wrk.body = f:read("*a"); f:close()\n' "$PKI" > post.lua

bench_receiver
bench_proxy_conf 18081
nginx -c "$PKI/px/nginx.conf" -p "$PKI/px" & PIDS+=($!)
sleep 0.5

cd "$ROOT"
cargo bench --bench export --no-run >/dev/null 2>&1
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); nginx $(nginx -v 2>&1 | cut -d/ -f2)" >&2

# The peer runs before and after Sallyport; the ratio uses the mean (the machine drifts).
peer_rate() { wrk -t1 -c64 -d8s -s "$PKI/post.lua" http://127.0.0.1:18081/ | awk '/Requests\/sec/{print $2}'; }
peer1=$(peer_rate)
ours=$(cargo bench --bench export -- "https://localhost:9443/profiles" "$PKI/ca.pem" "$PKI/client.pem" "$PKI/client.key" "$N" "$BACKFILL")
echo "$ours" >&2
peer2=$(peer_rate)
echo "peer before: $peer1 req/s, after: $peer2 req/s" >&2
python3 - "$(python3 -c "print(($peer1 + $peer2) / 2)")" "$ours" <<'PY'
import json, sys
peer = float(sys.argv[1]); phases = {}
for l in sys.argv[2].splitlines():
    if l.startswith('{'):
        d = json.loads(l); phases[d['phase']] = d
t = phases['throughput']; l = phases['latency-10k']; b = phases.get('backfill')
print("| measure | Sallyport | peer (nginx proxy, same run) | ratio |")
print("| --- | --- | --- | --- |")
print(f"| end-to-end profiles/s ({t['profiles']:,} profiles, durable) | {t['profilesPerSec']:,.0f} | {peer:,.0f} req/s | {t['profilesPerSec']/peer:.2f}× |")
print(f"| ingest only (parse + trigger + SQLite commit) profiles/s | {t['ingestOnlyPerSec']:,.0f} | | |")
print(f"| CPU per 1,000 profiles end to end (gateway process) | {t['cpuMsPerThousand']:,.0f} ms | | |")
print(f"| ingest-to-delivered p50 / p99 at a steady 10k/s (10 s after 1 s of warm-up) | {l['p50Ms']:.1f} ms / {l['p99Ms']:.1f} ms | | |")
print(f"| the same in the warm-up second (delivery connections opening) | {l['warmupP50Ms']:.1f} ms / {l['warmupP99Ms']:.1f} ms | | |")
if b:
    print(f"| backfill {b['profiles']:,} profiles: enqueue / all delivered | {b['enqueueSeconds']:.1f} s / {b['deliveredSeconds']:.1f} s ({b['profilesPerSec']:,.0f}/s) | | |")
print(f"\nfailed deliveries: throughput {t['failed']}, latency {l['failed']}" + (f", backfill {b['failed']}" if b else ""))
PY
