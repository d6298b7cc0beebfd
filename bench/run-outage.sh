#!/usr/bin/env bash
# Receiver outage: `sallyport serve` takes a steady 5,000 profiles/s over its HTTP ingest while
# the receiver (nginx, ssl_verify_client on) is stopped for 30 s and started again.
# Reports: profiles lost (counted at the receiver, by distinct idempotency key answered 200),
# dead letters, when the dataflow paused and resumed, seconds from the receiver's return until
# the backlog is delivered (the outbox back under its pre-outage depth), the peak outbox depth,
# and the drain rate against an nginx proxy's rate measured in the same run.
# Usage: bench/run-outage.sh [rate, default 5000] [down seconds, default 30]
set -euo pipefail
RATE=${1:-5000}
DOWN=${2:-30}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
bench_scratch sallyport-outage
bench_tools
bench_pki
bench_sallyport_bin
bench_post_lua

# The receiver logs each request's idempotency key and status, so loss is counted where it
# would be felt.
mkdir -p "$PKI/rx/logs"
cat > "$PKI/rx/nginx.conf" <<CONF
worker_processes 1; pid $PKI/rx/nginx.pid; error_log $PKI/rx/logs/error.log warn; daemon off;
events { worker_connections 8192; }
http { log_format keys '\$status \$http_idempotency_key';
  access_log $PKI/rx/logs/access.log keys buffer=256k flush=1s; keepalive_requests 1000000;
  client_body_temp_path $PKI/rx/body;
  server { listen 127.0.0.1:9443 ssl; ssl_certificate $PKI/server.pem; ssl_certificate_key $PKI/server.key;
    ssl_client_certificate $PKI/ca.pem; ssl_verify_client on; client_body_buffer_size 64k;
    location / { return 200 "ok"; } } }
CONF

bench_proxy_conf 18081
nginx -c "$PKI/px/nginx.conf" -p "$PKI/px" & PIDS+=($!)

ADMIN=18444
bench_serve_conf outage 18443 "$ADMIN"
export BENCH_ADMIN_TOKEN=bench-outage-token
"$BIN" serve --config "$PKI/outage.toml" >"$PKI/serve.log" 2>&1 & PIDS+=($!)
bench_wait_port "$ADMIN"

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); nginx $(nginx -v 2>&1 | cut -d/ -f2)" >&2
# The peer: an nginx proxy's request rate through the same receiver, before the outage run.
nginx -c "$PKI/rx/nginx.conf" -p "$PKI/rx" & RX=$!
sleep 0.5
peer=$(wrk -t1 -c64 -d8s -s "$PKI/post.lua" http://127.0.0.1:18081/ | awk '/Requests\/sec/{print $2}')
kill "$RX"; wait "$RX" 2>/dev/null || true
: > "$PKI/rx/logs/access.log"

python3 - "$PKI" "$ADMIN" "$RATE" "$DOWN" "$peer" <<'PY'
import http.client, json, os, subprocess, sys, threading, time
pki, admin, rate, down, peer = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
token = os.environ["BENCH_ADMIN_TOKEN"]
H = {"Authorization": f"Bearer {token}"}
UP_BEFORE, UP_AFTER, BATCH = 10, 20, 100

def start_rx():
    return subprocess.Popen(["nginx", "-c", f"{pki}/rx/nginx.conf", "-p", f"{pki}/rx"])

def get(path):
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    c.request("GET", path, headers=H)
    r = c.getresponse(); body = r.read(); c.close()
    return json.loads(body)

samples = []  # (t, pending, state)
stop = threading.Event()
t0 = time.monotonic()
def monitor():
    while not stop.is_set():
        try:
            s = get("/v1/status")["dataflows"][0]
            samples.append((time.monotonic() - t0, s["pending"], s["state"]))
        except Exception as e:
            samples.append((time.monotonic() - t0, None, f"error {e}"))
        time.sleep(0.1)

rx = start_rx(); time.sleep(0.5)
t0 = time.monotonic()
threading.Thread(target=monitor, daemon=True).start()
conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=30)
sent, rx_stopped_at, rx_back_at = 0, None, None
total = UP_BEFORE + down + UP_AFTER
interval = BATCH / rate
next_at = time.monotonic()
while True:
    now = time.monotonic() - t0
    if now >= total:
        break
    if rx_stopped_at is None and now >= UP_BEFORE:
        rx.terminate(); rx.wait(); rx_stopped_at = now
    if rx_back_at is None and now >= UP_BEFORE + down:
        rx = start_rx(); rx_back_at = now
    body = "".join(json.dumps({"profileId": f"p{sent + i}", "attributes": {"person": {"name": {"firstName": f"F{sent + i}"}}},
                               "segments": [{"id": "s1", "status": "realized"}]}) + "\n" for i in range(BATCH))
    conn.request("POST", "/v1/profiles", body=body, headers=H)
    r = conn.getresponse(); reply = json.loads(r.read())
    assert r.status == 200 and reply["accepted"] == BATCH, reply
    sent += BATCH
    next_at += interval
    pause = next_at - time.monotonic()
    if pause > 0:
        time.sleep(pause)
ingest_secs = time.monotonic() - t0
deadline = time.monotonic() + 300
while get("/v1/status")["dataflows"][0]["pending"] > 0 and time.monotonic() < deadline:
    time.sleep(0.1)
drained_at = time.monotonic() - t0
time.sleep(1.5)
stop.set()
dead = len(get("/v1/dead-letters?limit=10000")["deadLetters"])
rx.terminate(); rx.wait()

delivered = set()
with open(f"{pki}/rx/logs/access.log") as f:
    for line in f:
        status, _, key = line.strip().partition(" ")
        if status == "200":
            delivered.add(key)
pre = max((p for t, p, s in samples if t < rx_stopped_at and p is not None), default=0)
peak = max((p for t, p, s in samples if p is not None), default=0)
paused = [t for t, p, s in samples if s == "paused"]
backlog_done = next((t for t, p, s in samples if t > rx_back_at and p is not None and p <= max(pre, BATCH)), None)
# The drain rate once resumed: what was queued then, plus what came in until it was down.
resumed_at = next((t for t, p, s in samples if t > rx_back_at and s == "running"), None)
at_resume = next((p for t, p, s in samples if resumed_at and t >= resumed_at and p is not None), 0)
drain_secs = (backlog_done - rx_back_at) if backlog_done else None
catch_up = (backlog_done - resumed_at) if backlog_done and resumed_at else None
drain_rate = (at_resume + rate * catch_up) / catch_up if catch_up else None
print(f"| measure ({time.strftime('%Y-%m-%d')}, {rate:,}/s offered, receiver down {down} s) | value |")
print("| --- | --- |")
print(f"| profiles ingested (achieved {sent / ingest_secs:,.0f}/s) | {sent:,} |")
print(f"| profiles lost (ingested, never answered 200 at the receiver) | {max(0, sent - len(delivered)):,} |")
print(f"| dead letters | {dead} |")
print(f"| paused after the receiver stopped / resumed after it returned | {paused[0] - rx_stopped_at:.1f} s / {(paused[-1] - rx_back_at):.1f} s |" if paused else "| paused | never |")
print(f"| backlog delivered (outbox back under its pre-outage depth of {pre:,}) after the return | {drain_secs:.1f} s |" if drain_secs else "| backlog delivered | not within the run |")
print(f"| peak outbox depth | {peak:,} |")
if drain_rate:
    print(f"| drain rate from resuming until caught up ({catch_up:.1f} s) | {drain_rate:,.0f} profiles/s = {drain_rate / peer:.2f}× the nginx proxy's {peer:,.0f} req/s |")
print(f"| everything delivered, after ingest stopped | {drained_at - ingest_secs:.1f} s |")
PY
