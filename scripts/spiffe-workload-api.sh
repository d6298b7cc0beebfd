#!/usr/bin/env bash
# A Python with grpcio and the SPIFFE Workload API stubs compiled by grpcio-tools (both from
# PyPI) from the published workload.proto (tests/spiffe/workload.proto), in a venv under
# target/: tests/spiffe.rs runs tests/spiffe/workload_api_server.py, a minimal Workload API
# server, with it. Creates it when missing; prints the interpreter's path. The stubs are
# written beside the server's import path (target/spiffe-venv/stubs).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/spiffe-venv
stubs=$venv/stubs
if ! "$venv/bin/python" -c "import grpc, grpc_tools" >/dev/null 2>&1; then
  if ! python3 -m venv --clear "$venv" >&2; then
    # Debian's python3 keeps venv in a package of its own.
    as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends python3-venv >&2
    python3 -m venv --clear "$venv" >&2
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check "grpcio==1.*" "grpcio-tools==1.*" >&2
fi
if [ ! -f "$stubs/workload_pb2_grpc.py" ] || [ tests/spiffe/workload.proto -nt "$stubs/workload_pb2_grpc.py" ]; then
  mkdir -p "$stubs"
  "$venv/bin/python" -m grpc_tools.protoc -I tests/spiffe --python_out="$stubs" \
    --grpc_python_out="$stubs" tests/spiffe/workload.proto >&2
fi
echo "$PWD/$venv/bin/python"
