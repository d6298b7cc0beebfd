#!/usr/bin/env bash
# Kernel time of a loopback socket write by syscall, send against writev (the measurement
# behind the delivery connector's and the sidecar's choice of send; see
# bench/floor/src/bin/socket-writes.rs).
# Usage: bench/socket-writes.sh [writes per mode per round, default 200000] [rounds, default 3]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
(cd "$HERE/floor" && CARGO_TARGET_DIR="$HERE/floor/target" cargo build --release --quiet --bin socket-writes)
exec "$HERE/floor/target/release/socket-writes" "${1:-200000}" "${2:-3}"
