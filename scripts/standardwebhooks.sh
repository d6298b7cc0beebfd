#!/usr/bin/env bash
# A Python with the `standardwebhooks` package (the Standard Webhooks reference library, from
# PyPI), in a venv under target/, for tests that verify our signatures with an implementation
# we did not write. Creates it when missing; prints the interpreter's path.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/standardwebhooks-venv
if ! "$venv/bin/python" -c "import standardwebhooks" >/dev/null 2>&1; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "standardwebhooks==1.*" >&2
fi
echo "$PWD/$venv/bin/python"
