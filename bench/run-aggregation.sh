#!/usr/bin/env bash
# Aggregation, end to end through `serve` and its HTTP ingest: the same profiles delivered one
# per request (the HTTP API destination's way) and ten per request (best-effort aggregation),
# to an nginx receiver with ssl_verify_client on, with an nginx proxy's request rate through the
# same receiver measured in the same run. Then the latency at a steady rate: p99
# ingest→delivered (the engine's own histogram, from /metrics) with aggregation on.
# Usage: bench/run-aggregation.sh [profiles, default 200000] [steady rate/s, default 10000]
set -euo pipefail
N=${1:-200000}
RATE=${2:-10000}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
bench_scratch sallyport-aggregation
bench_tools
bench_pki
bench_sallyport_bin
bench_post_lua
bench_receiver
bench_proxy_conf 18081
nginx -c "$PKI/px/nginx.conf" -p "$PKI/px" & PIDS+=($!)
sleep 0.5
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); nginx $(nginx -v 2>&1 | cut -d/ -f2)" >&2
peer_rate() { wrk -t1 -c64 -d8s -s "$PKI/post.lua" http://127.0.0.1:18081/ | awk '/Requests\/sec/{print $2}'; }

export BENCH_ADMIN_TOKEN=bench-aggregation-token
ADMIN=18544
# A config for one run: $1 names it, $2 is the dataflow's aggregation line.
conf() { bench_serve_conf "$1" 18543 "$ADMIN" "$2"; }
# Run serve on config $1 and the Python phase $2 against it; prints the phase's JSON line.
run() {
  "$BIN" serve --config "$PKI/$1.toml" >"$PKI/$1.log" 2>&1 & local pid=$!
  bench_wait_port "$ADMIN"
  python3 "$PKI/drive.py" "$2" "$ADMIN" "$N" "$RATE"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
cat > "$PKI/drive.py" <<'PY'
import http.client, json, os, sys, threading, time
phase, admin, n, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
H = {"Authorization": "Bearer " + os.environ["BENCH_ADMIN_TOKEN"]}
def batch(start, count):
    return "".join(json.dumps({"profileId": f"p{i}", "attributes": {"person": {"name": {"firstName": f"F{i}"}}},
                               "identityMap": {"email": [{"id": f"u{i}@example.com"}]},
                               "segments": [{"id": "s1", "status": "realized"}]}) + "\n" for i in range(start, start + count))
def post(conn, body):
    conn.request("POST", "/v1/profiles", body=body, headers=H)
    r = conn.getresponse(); r.read(); assert r.status == 200
def get(path):
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=30); c.request("GET", path, headers=H)
    r = c.getresponse(); b = r.read(); c.close(); return b.decode()
def pending():
    return json.loads(get("/v1/status"))["dataflows"][0]["pending"]
def p99():
    for l in get("/metrics").splitlines():
        if l.startswith('sallyport_ingest_to_delivered_seconds{quantile="0.99"}'):
            return float(l.split()[-1]) * 1000
    return None
if phase == "throughput":
    size, workers = 1000, 4
    bodies = [batch(i, size) for i in range(0, n, size)]
    t0 = time.monotonic()
    def work(k):
        c = http.client.HTTPConnection("127.0.0.1", admin, timeout=60)
        for b in bodies[k::workers]:
            post(c, b)
    ts = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    [t.start() for t in ts]; [t.join() for t in ts]
    ingested = time.monotonic() - t0
    while pending() > 0:
        time.sleep(0.05)
    total = time.monotonic() - t0
    print(json.dumps({"profiles": n, "ingestSecs": ingested, "secs": total, "perSec": n / total}))
elif phase == "drain":
    # Delivery alone: queue everything while the dataflow is paused, then resume.
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=60)
    c.request("POST", "/v1/dataflows/rx/pause", body=b"", headers=H); r = c.getresponse(); r.read(); assert r.status == 200
    for i in range(0, n, 1000):
        post(c, batch(i, 1000))
    time.sleep(1.5)
    t0 = time.monotonic()
    c.request("POST", "/v1/dataflows/rx/resume", body=b"", headers=H); r = c.getresponse(); r.read(); assert r.status == 200
    while pending() > 0:
        time.sleep(0.05)
    secs = time.monotonic() - t0
    print(json.dumps({"profiles": n, "secs": secs, "perSec": n / secs}))
else:
    # A steady rate for 10 s (after 1 s of warm-up, not counted: a fresh process per phase).
    per, tick = max(1, rate // 100), 0.01
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=60)
    warm = batch(10_000_000, per)
    post(c, warm); time.sleep(1)
    sent, t0 = 0, time.monotonic()
    nxt = t0
    while time.monotonic() - t0 < 10:
        post(c, batch(sent, per)); sent += per
        nxt += tick
        d = nxt - time.monotonic()
        if d > 0: time.sleep(d)
    achieved = sent / (time.monotonic() - t0)
    while pending() > 0:
        time.sleep(0.05)
    print(json.dumps({"achievedPerSec": achieved, "p99Ms": p99()}))
PY
conf none ""
conf best 'aggregation = { kind = "best_effort", max_users_per_request = 10 }'
peer1=$(peer_rate)
none=$(run none throughput)
best=$(run best throughput)
conf none3 ""
conf best3 'aggregation = { kind = "best_effort", max_users_per_request = 10 }'
drain_none=$(run none3 drain)
drain_best=$(run best3 drain)
conf none2 ""
conf best2 'aggregation = { kind = "best_effort", max_users_per_request = 10 }'
steady_none=$(run none2 steady)
steady_best=$(run best2 steady)
peer2=$(peer_rate)
python3 - "$peer1" "$peer2" "$none" "$best" "$steady_none" "$steady_best" "$N" "$RATE" "$drain_none" "$drain_best" <<'PY'
import json, sys, time
p1, p2 = float(sys.argv[1]), float(sys.argv[2]); peer = (p1 + p2) / 2
none, best, sn, sb = (json.loads(a) for a in sys.argv[3:7]); n, rate = int(sys.argv[7]), int(sys.argv[8])
dn, db = json.loads(sys.argv[9]), json.loads(sys.argv[10])
print(f"| measure ({time.strftime('%Y-%m-%d')}, {n:,} profiles) | one per request | ten per request (best effort) | ratio |")
print("| --- | --- | --- | --- |")
print(f"| end-to-end profiles/s through serve's HTTP ingest | {none['perSec']:,.0f} ({none['perSec']/peer:.2f}× nginx proxy) | {best['perSec']:,.0f} ({best['perSec']/peer:.2f}× nginx proxy) | {best['perSec']/none['perSec']:.2f}× |")
print(f"| delivery alone: a queue of {n:,} drained, profiles/s | {dn['perSec']:,.0f} ({dn['perSec']/peer:.2f}× nginx proxy) | {db['perSec']:,.0f} ({db['perSec']/peer:.2f}× nginx proxy) | {db['perSec']/dn['perSec']:.2f}× |")
print(f"| ingest alone, s | {none['ingestSecs']:.1f} | {best['ingestSecs']:.1f} | |")
print(f"| p99 ingest→delivered at a steady {rate:,}/s (achieved {sn['achievedPerSec']:,.0f} / {sb['achievedPerSec']:,.0f}) | {sn['p99Ms']:.1f} ms | {sb['p99Ms']:.1f} ms | |")
print(f"\nnginx proxy peer: {p1:,.0f} req/s before, {p2:,.0f} after")
PY
