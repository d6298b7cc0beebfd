#!/usr/bin/env bash
# The sidecar job, Sallyport beside nginx, HAProxy and stunnel in one run:
#   wrk --(plain HTTP)--> proxy --(mTLS, client cert)--> nginx receiver (ssl_verify_client on)
# Uses the shared peer script (../shared/bench/peers/run-peers.sh), which builds the PKI with
# the openssl CLI and starts every peer; Sallyport is started through its SIDECAR_START hook.
# Usage: bench/run-sidecar.sh [seconds per run, default 8]   Output: a Markdown table.
# Env: SALLYPORT_BIN=path measures that build (e.g. the PGO one scripts/build-pgo.sh prints)
# instead of this checkout's release build.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PEERS=${PEERS:-$ROOT/../shared/bench/peers/run-peers.sh}
[ -x "$PEERS" ] || [ -f "$PEERS" ] || { echo "peer script not found: $PEERS" >&2; exit 1; }
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
bench_sallyport_bin
export SALLYPORT_BIN=$BIN
# Written into the peer script's PKI directory at start, so it uses the same certificates.
# The audit log goes to an audit file; SALLYPORT_AUDIT=store puts it in the SQLite store.
export SALLYPORT_AUDIT=${SALLYPORT_AUDIT:-file}
export SIDECAR_START='cfg="$PKI/sallyport-sidecar.toml"
audit=""; [ "$SALLYPORT_AUDIT" = store ] || audit="audit_file = \"$PKI/sallyport-audit.jsonl\"\n"
printf "[identity]\ncert = \"%s/client.pem\"\nkey = \"%s/client.key\"\n[egress]\nallow = [\"127.0.0.0/8\"]\n[store]\nurl = \"sqlite://%s/sallyport-sidecar.db\"\n[sidecar]\nlisten = \"127.0.0.1:%s\"\n$audit[[sidecar.routes]]\nprefix = \"/\"\nupstream = \"https://localhost:9443\"\nca = \"%s/ca.pem\"\n" "$PKI" "$PKI" "$PKI" "$SIDECAR_PORT" "$PKI" > "$cfg"
exec "$SALLYPORT_BIN" sidecar --config "$cfg"'
sed 's/SIDECAR_START → mTLS receiver/Sallyport sidecar → mTLS receiver/' < <(bash "$PEERS" "${1:-8}")
