#!/usr/bin/env bash
# The one test command (README.md names it; .ci/run runs it). Installs what the tests need
# when missing, then: format check, clippy with warnings as errors, every test.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
# Headless Chromium for the status page's browser test (tests/observe.rs).
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts the packaged nginx on :80; the tests run their own instances.
  as_root service nginx stop >/dev/null 2>&1 || true
fi
export PATH="$PATH:/usr/sbin"

# A real OAuth2 server for the auth tests (oauth2-mock-server, pinned by tests/oauth/package-lock.json).
if [ ! -d tests/oauth/node_modules/oauth2-mock-server ]; then
  (cd tests/oauth && npm ci --no-audit --no-fund --silent)
fi

# playwright-core (pinned by tests/browser/package-lock.json) drives that Chromium.
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  (cd tests/browser && npm ci --no-audit --no-fund --silent)
fi

# The Standard Webhooks reference library (PyPI `standardwebhooks`), in a venv under target/:
# tests/events.rs verifies our event signatures with it.
scripts/standardwebhooks.sh >/dev/null
# prometheus_client (reads /metrics) and opentelemetry-proto (decodes our OTLP traces), in a
# venv under target/: tests/observe.rs and tests/telemetry.rs check us against them.
scripts/observe-tools.sh >/dev/null

# grpcio and grpcio-tools (PyPI), in a venv under target/, with the Workload API stubs compiled
# from the published workload.proto: tests/spiffe.rs runs our minimal Workload API server on it.
scripts/spiffe-workload-api.sh >/dev/null

# The PostgreSQL store's tests need a server: the machine's (127.0.0.1:5432, database test) or
# SALLYPORT_TEST_PG. Say so plainly instead of failing forty tests with connection errors.
pg_url=${SALLYPORT_TEST_PG:-postgres://postgres@127.0.0.1:5432/test}
if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -d "$pg_url"; then
  echo "PostgreSQL is not answering at $pg_url (set SALLYPORT_TEST_PG); the store tests need it" >&2
  exit 1
fi

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast
  cargo test --locked --doc
else
  cargo test --locked --no-fail-fast
fi
