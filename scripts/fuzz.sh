#!/usr/bin/env bash
# Run every cargo-fuzz target in fuzz/fuzz_targets, one after the other, for N seconds each
# (default 60), and print per target: time taken, corpus size (files in fuzz/corpus/TARGET)
# and whether it crashed. Exits non-zero if any target crashed, timed out, ran out of memory
# or could not be built.
#
#   scripts/fuzz.sh            # 60 s per target
#   scripts/fuzz.sh 600        # the longer campaign
#
# Every file fuzz/fuzz_targets/NAME.rs is a target (it needs its [[bin]] entry in
# fuzz/Cargo.toml; one without is reported as a failure, never skipped). The seeds and past
# crashes in tests/fuzz-inputs/NAME/ are read as a second corpus; new inputs go to
# fuzz/corpus/NAME (not in git). A crash leaves its input in fuzz/artifacts/NAME/: copy it to
# tests/fuzz-inputs/NAME/ so tests/fuzz_regressions.rs replays it on every test run.
# Stable toolchain: cargo-fuzz's nightly flags are allowed through RUSTC_BOOTSTRAP=1.
# FUZZ_TIMEOUT (default 10) is how many seconds one input may take before it counts as a hang.
# FUZZ_TARGETS="a b" runs only those targets (e.g. to run groups side by side on more cores).
set -uo pipefail

secs=${1:-60}
if ! [[ $secs =~ ^[0-9]+$ ]] || ((secs < 1)); then
    echo "usage: $0 [seconds per target, default 60]" >&2
    exit 2
fi
per_input=${FUZZ_TIMEOUT:-10}

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz" || exit 2

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: installing it (cargo install cargo-fuzz)" >&2
    cargo install cargo-fuzz --locked || exit 2
fi
export RUSTC_BOOTSTRAP=1

shopt -s nullglob
targets=()
for f in fuzz_targets/*.rs; do
    targets+=("$(basename "$f" .rs)")
done
if [[ -n ${FUZZ_TARGETS:-} ]]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
fi
if ((${#targets[@]} == 0)); then
    echo "no fuzz targets in fuzz/fuzz_targets" >&2
    exit 2
fi
registered=$(cargo fuzz list 2>/dev/null)

echo "building ${#targets[@]} fuzz targets (address sanitizer)…" >&2
build_failed=0
cargo fuzz build >&2 || build_failed=1

mkdir -p logs
failed=0
results=()
for t in "${targets[@]}"; do
    if ! grep -qx -- "$t" <<<"$registered"; then
        results+=("$(printf '%-16s %8s %8s  %s' "$t" - - "FAILED: no [[bin]] \"$t\" in fuzz/Cargo.toml")")
        failed=1
        continue
    fi
    mkdir -p "corpus/$t" "artifacts/$t"
    seeds=()
    [[ -d ../tests/fuzz-inputs/$t ]] && seeds=("../tests/fuzz-inputs/$t")
    before=$(ls "artifacts/$t")
    log="logs/$t.log"
    echo "fuzzing $t for ${secs}s (log: fuzz/$log)…" >&2
    start=$(date +%s)
    cargo fuzz run "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -timeout="$per_input" >"$log" 2>&1
    rc=$?
    took=$(($(date +%s) - start))
    corpus=$(find "corpus/$t" -type f | wc -l)
    new=$(comm -13 <(echo "$before") <(ls "artifacts/$t") | sed "s|^|fuzz/artifacts/$t/|" | tr '\n' ' ' | sed 's/ $//')
    if ((rc == 0)) && [[ -z $new ]]; then
        status="ok"
    else
        failed=1
        if [[ -n $new ]]; then
            status="CRASH: $new"
        elif ((build_failed)); then
            status="FAILED (exit $rc; the build failed, see fuzz/$log)"
        else
            status="FAILED (exit $rc, see fuzz/$log)"
        fi
        tail -n 30 "$log" >&2
    fi
    results+=("$(printf '%-16s %7ss %8s  %s' "$t" "$took" "$corpus" "$status")")
done

echo
printf '%-16s %8s %8s  %s\n' target time corpus status
printf '%s\n' "${results[@]}"
if ((failed)); then
    echo
    echo "a fuzz target failed: copy each crash input to tests/fuzz-inputs/<target>/, fix, and rerun" >&2
    exit 1
fi
