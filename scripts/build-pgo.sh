#!/usr/bin/env bash
# Build sallyport with profile-guided optimisation (PGO) and print the binary's path on stdout.
#
#   1. An instrumented release build (-Cprofile-generate) in target/pgo-gen.
#   2. Training, on this machine: the demo (the export engine end to end, 20,000 profiles), and
#      the sidecar under wrk load (GET, then a 1 KB POST, 64 connections) through an nginx
#      receiver that requires a client certificate, with the audit log on.
#   3. llvm-profdata merges what the run counted (rustup's llvm-tools component, added if missing).
#   4. The release build again with those counts (-Cprofile-use), in target/pgo.
#
# The counts tell the compiler which branches are taken and which code is hot, so it lays the
# hot paths out together and inlines along them. The code is the same; only its layout and
# inlining differ. Takes two full release builds, ~15 min on 2 cores.
# Usage: scripts/build-pgo.sh   (progress on stderr; the binary's path on stdout)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
say() { echo "build-pgo: $*" >&2; }

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
  say "adding rustup's llvm-tools component (llvm-profdata)"
  rustup component add llvm-tools >&2
fi

# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
bench_scratch sallyport-pgo
# A fixed path: it is built into the instrumented binary, so a new one would rebuild it all.
DATA=$ROOT/target/pgo-gen/profiles

say "1/4 instrumented build (target/pgo-gen)"
(cd "$ROOT" && CARGO_TARGET_DIR="$ROOT/target/pgo-gen" RUSTFLAGS="-Cprofile-generate=$DATA" \
  cargo build --release --quiet) >&2
# Build scripts ran instrumented too; only the gateway's own run is to count.
rm -rf "$DATA"
GEN=$ROOT/target/pgo-gen/release/sallyport

say "2/4 training: the demo"
(cd "$PKI" && "$GEN" demo --profiles 20000 >/dev/null 2>&1) || { say "the instrumented demo failed"; exit 1; }

say "2/4 training: the sidecar under load"
bench_tools
bench_pki
bench_receiver
bench_post_lua
bench_sidecar_conf 18195
"$GEN" sidecar --config "$PKI/sidecar.toml" 2>/dev/null & SP=$!; PIDS+=("$SP")
bench_wait_ports 18195
# Through the sidecar to the receiver, or stop: a training run of error paths would build a
# binary optimised for failing.
curl -fsS http://127.0.0.1:18195/ | grep -q '^ok$' || { say "the instrumented sidecar does not reach the receiver"; exit 1; }
wrk -t1 -c64 -d8s http://127.0.0.1:18195/ >/dev/null
wrk -t1 -c64 -d8s -s "$PKI/post.lua" http://127.0.0.1:18195/ >/dev/null
# A clean stop writes the counts (at exit).
kill -TERM "$SP"
wait "$SP" 2>/dev/null || true

say "3/4 merging $(find "$DATA" -name '*.profraw' | wc -l) profiles"
"$profdata" merge -o "$PKI/merged.profdata" "$DATA"

say "4/4 optimised build (target/pgo)"
# Functions the training never ran have no counts; that is expected, not worth a warning each.
(cd "$ROOT" && CARGO_TARGET_DIR="$ROOT/target/pgo" \
  RUSTFLAGS="-Cprofile-use=$PKI/merged.profdata -Cllvm-args=-pgo-warn-missing-function=false" \
  cargo build --release --quiet) >&2
echo "$ROOT/target/pgo/release/sallyport"
