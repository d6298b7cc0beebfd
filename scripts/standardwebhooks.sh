#!/usr/bin/env bash
# A Python with the `standardwebhooks` package (the Standard Webhooks reference library, from
# PyPI), in a venv under target/, for tests that verify our signatures with an implementation
# we did not write. Creates it when missing; prints the interpreter's path.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/standardwebhooks-venv
if ! "$venv/bin/python" -c "import standardwebhooks" >/dev/null 2>&1; then
  if ! python3 -m venv --clear "$venv" >&2; then
    # Debian's python3 keeps venv in a package of its own.
    as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends python3-venv >&2
    python3 -m venv --clear "$venv" >&2
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check "standardwebhooks==1.*" >&2
fi
echo "$PWD/$venv/bin/python"
