#!/usr/bin/env bash
# Memory of `serve` as a user runs it: RSS idle, at the peak and after N profiles have gone
# through its HTTP ingest to an nginx receiver (ssl_verify_client on) and been delivered, on
# default settings. Read from /proc/PID/status (VmRSS, VmHWM).
# Then a fresh `serve` takes one large request (BIG profiles in one body, ~190 bytes each) and
# its peak RSS and the request's time are reported.
# Usage: bench/run-memory.sh [profiles, default 1000000] [profiles in the large body, default 200000]
set -euo pipefail
N=${1:-1000000}
BIG=${2:-200000}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
bench_scratch sallyport-memory
bench_tools
bench_pki
bench_sallyport_bin
bench_receiver
export BENCH_ADMIN_TOKEN=bench-memory-token
ADMIN=18644
bench_serve_conf memory 18643 "$ADMIN"
"$BIN" serve --config "$PKI/memory.toml" >"$PKI/serve.log" 2>&1 & PID=$!; PIDS+=($PID)
bench_wait_port "$ADMIN"
sleep 1
rss() { awk -v k="$1:" '$1==k{print int($2/1024)}' "/proc/$PID/status"; }
idle=$(rss VmRSS)
cat > "$PKI/common.py" <<'PY'
import http.client, json, os
H = {"Authorization": "Bearer " + os.environ["BENCH_ADMIN_TOKEN"]}
def batch(start, count):
    return "".join(json.dumps({"profileId": f"p{i}", "attributes": {"person": {"name": {"firstName": f"F{i}"}}},
                               "identityMap": {"email": [{"id": f"u{i}@example.com"}]},
                               "segments": [{"id": "s1", "status": "realized"}]}) + "\n" for i in range(start, start + count))
PY
PYTHONPATH=$PKI python3 - "$ADMIN" "$N" <<'PY'
import http.client, json, sys, threading, time
from common import H, batch
admin, n = int(sys.argv[1]), int(sys.argv[2])
def work(k, workers=4, size=1000):
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=60)
    for i in range(k * size, n, workers * size):
        c.request("POST", "/v1/profiles", body=batch(i, min(size, n - i)), headers=H)
        r = c.getresponse(); r.read(); assert r.status == 200
ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
def pending():
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=30); c.request("GET", "/v1/status", headers=H)
    r = c.getresponse(); v = json.loads(r.read()); c.close(); return v["dataflows"][0]["pending"]
while pending() > 0:
    time.sleep(0.2)
PY
after=$(rss VmRSS); peak=$(rss VmHWM)
sleep 10
settled=$(rss VmRSS)
echo "| measure ($(date +%F), $N profiles, default settings) | MiB |"
echo "| --- | --- |"
echo "| RSS idle | $idle |"
echo "| RSS peak (VmHWM) | $peak |"
echo "| RSS when the last profile was delivered | $after |"
echo "| RSS 10 s later | $settled |"
kill "$PID"; wait "$PID" 2>/dev/null || true

# One large request on a fresh process.
bench_serve_conf big 18643 "$ADMIN"
"$BIN" serve --config "$PKI/big.toml" >"$PKI/big.log" 2>&1 & PID=$!; PIDS+=($PID)
bench_wait_port "$ADMIN"
sleep 1
secs_mib=$(PYTHONPATH=$PKI python3 - "$ADMIN" "$BIG" <<'PY'
import http.client, json, sys, time
from common import H, batch
admin, n = int(sys.argv[1]), int(sys.argv[2])
body = batch(0, n).encode()
t0 = time.monotonic()
c = http.client.HTTPConnection("127.0.0.1", admin, timeout=300)
c.request("POST", "/v1/profiles", body=body, headers=H); r = c.getresponse(); r.read(); assert r.status == 200
answered = time.monotonic() - t0
def pending():
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=30); c.request("GET", "/v1/status", headers=H)
    r = c.getresponse(); v = json.loads(r.read()); c.close(); return v["dataflows"][0]["pending"]
while pending() > 0:
    time.sleep(0.05)
print(f"{answered:.2f} {time.monotonic() - t0:.2f} {len(body) / 1048576:.0f}")
PY
)
read -r secs delivered mib <<<"$secs_mib"
echo "| one request of $BIG profiles ($mib MiB): RSS peak (VmHWM); answered after $secs s, all delivered after $delivered s | $(rss VmHWM) |"
