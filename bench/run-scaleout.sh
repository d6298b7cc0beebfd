#!/usr/bin/env bash
# Scale-out benchmark: deliveries/s draining N queued deliveries with 1 instance on SQLite,
# 1 instance on PostgreSQL and 2 instances on PostgreSQL, all to the same nginx receiver
# (ssl_verify_client on) in the same run. Compare the ratios, not the absolute figures.
# Each case: fresh store, N profiles queued with `sallyport ingest` (timed apart), then the
# `sallyport serve` processes start and the clock runs until the outbox is empty.
# Usage: bench/run-scaleout.sh [N, default 100000] [PostgreSQL URL, default the local server]
set -euo pipefail
N=${1:-100000}
PG=${2:-postgres://postgres@127.0.0.1:5432/test}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SCHEMA=bench_scaleout_$$
bench_extra_cleanup() { psql "$PG" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true; }
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
bench_scratch sallyport-scaleout
bench_tools
bench_pki
bench_receiver
(cd "$ROOT" && cargo build --release --quiet)
BIN="$ROOT/target/release/sallyport"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(psql "$PG" -Atc 'SHOW server_version' | sed 's/^/PostgreSQL /')" >&2

python3 - "$N" > "$PKI/profiles.ndjson" <<'PY'
import json, sys
for i in range(int(sys.argv[1])):
    print(json.dumps({"profileId": f"p{i}", "identityMap": {"email": [{"id": f"user{i}@example.com"}]},
                      "attributes": {"person": {"name": {"firstName": f"First{i}"}}},
                      "segments": [{"id": "s1", "status": "realized"}]}))
PY

# config STORE_LINES INSTANCE → path
config() {
  local f="$PKI/$2.toml"
  cat > "$f" <<CONF
[egress]
allow = ["127.0.0.0/8"]
[identity]
cert = "$PKI/client.pem"
key = "$PKI/client.key"
[public]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[store]
$1
instance = "$2"
$(bench_rx_dataflow)
CONF
  echo "$f"
}

pending() { # STORE_KIND
  if [ "$1" = sqlite ]; then
    python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from outbox').fetchone()[0])" "$PKI/bench.db"
  else
    psql "$PG" -Atc "SELECT count(*) FROM $SCHEMA.outbox"
  fi
}

now() { date +%s.%N; }
# "busy total" jiffies of the whole machine, from /proc/stat.
jiffies() { awk '/^cpu /{t=0; for(i=2;i<=NF;i++) t+=$i; print t-$5-$6, t}' /proc/stat; }

# run KIND INSTANCES → "ingest_s drain_s cpu_busy_percent_during_drain"
run() {
  local kind=$1 k=$2 lines
  if [ "$kind" = sqlite ]; then
    rm -f "$PKI"/bench.db*; lines="url = \"sqlite://$PKI/bench.db\""
  else
    psql "$PG" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null; lines="url = \"$PG\"
schema = \"$SCHEMA\""
  fi
  local t0 t1 t2 started=()
  t0=$(now)
  "$BIN" ingest --config "$(config "$lines" ingest)" "$PKI/profiles.ndjson" >/dev/null
  t1=$(now)
  read -r b0 a0 <<<"$(jiffies)"
  for i in $(seq 1 "$k"); do
    "$BIN" serve --config "$(config "$lines" "i$i")" 2>"$PKI/serve-$kind-$k-$i.log" & started+=($!); PIDS+=($!)
  done
  while [ "$(pending "$kind")" != 0 ]; do sleep 0.05; done
  t2=$(now)
  read -r b1 a1 <<<"$(jiffies)"
  for p in "${started[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  python3 -c "print(f'{$t1-$t0:.2f} {$t2-$t1:.2f} {100*($b1-$b0)/max(1,$a1-$a0):.0f}')"
}

read -r si sd sc <<<"$(run sqlite 1)"
read -r p1i p1d p1c <<<"$(run postgres 1)"
read -r p2i p2d p2c <<<"$(run postgres 2)"
python3 - "$N" "$si" "$sd" "$sc" "$p1i" "$p1d" "$p1c" "$p2i" "$p2d" "$p2c" <<'PY'
import sys
n = int(sys.argv[1]); si, sd, sc, p1i, p1d, p1c, p2i, p2d, p2c = map(float, sys.argv[2:])
base = n / sd
print(f"| store | instances | ingest {n:,} (s) | drain {n:,} deliveries (s) | deliveries/s | vs SQLite ×1 | machine CPU busy while draining |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name, k, i, d, c in [("SQLite", 1, si, sd, sc), ("PostgreSQL", 1, p1i, p1d, p1c), ("PostgreSQL", 2, p2i, p2d, p2c)]:
    print(f"| {name} | {k} | {i:.1f} | {d:.1f} | {n/d:,.0f} | {n/d/base:.2f}× | {c:.0f}% |")
PY
