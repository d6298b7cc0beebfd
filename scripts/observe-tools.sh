#!/usr/bin/env bash
# A Python with the packages the observability tests check us against, in a venv under target/:
# `prometheus_client` (its text and OpenMetrics parsers read our /metrics) and
# `opentelemetry-proto` (decodes the OTLP/HTTP protobuf our traces arrive as). Creates it when
# missing; prints the interpreter's path.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/observe-venv
if ! "$venv/bin/python" -c "import prometheus_client, opentelemetry.proto" >/dev/null 2>&1; then
  if ! python3 -m venv --clear "$venv" >&2; then
    # Debian's python3 keeps venv in a package of its own.
    as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends python3-venv >&2
    python3 -m venv --clear "$venv" >&2
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check "prometheus_client==0.*" "opentelemetry-proto==1.*" >&2
fi
echo "$PWD/$venv/bin/python"
