#!/usr/bin/env bash
# Fuzzes the decoders: scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Installs cargo-fuzz (once), builds the targets of fuzz/ (libFuzzer with
# coverage instrumentation, debug assertions and overflow checks) on the
# stable toolchain, then runs each target (default: all) for SECONDS
# (default 20), one after the other, and prints the executions of each.
# Stable Rust has no sanitizers, so the build uses `-s none`: a crash is a
# panic (a failed check of the harness included), an abort, a timeout or
# running out of memory.
#
# Each target starts from its seeds (written by the target itself from the
# real encoders, see fuzz/src/lib.rs), the inputs kept in
# fuzz/regressions/TARGET/ (crashes found before, now fixed) and the corpus
# it grew in earlier runs (fuzz/corpus/TARGET/, not committed). The script
# fails at the first crash; the input is left in fuzz/artifacts/TARGET/.
# Reproduce it with `cargo fuzz run -s none -a TARGET FILE` (in fuzz/ or
# with --fuzz-dir fuzz), fix the decoder with a unit test in its crate, and
# keep the input in fuzz/regressions/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-20}
shift || true
if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for file in fuzz/fuzz_targets/*.rs; do
        name=${file##*/}
        targets+=("${name%.rs}")
    done
fi

version=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -qF "$version"; then
    echo "==> installing cargo-fuzz $version (once)"
    cargo install --locked --quiet cargo-fuzz --version "$version"
fi

# The instrumented build shares nothing with the workspace's (other
# compiler flags); FUZZ_TARGET_DIR may put it where it outlives a clone.
target_dir=${FUZZ_TARGET_DIR:-fuzz/target}
flags=(--fuzz-dir fuzz -s none --debug-assertions --target-dir "$target_dir")
echo "==> building the fuzz targets"
start=$SECONDS
cargo fuzz build "${flags[@]}"
echo "    built in $((SECONDS - start)) s"

# Largest input per target: the directory-shaped ones hold whole files.
max_len() {
    case $1 in
        changelog_dir | receiver_group | wire_frame | wire_receiver) echo 65536 ;;
        *) echo 8192 ;;
    esac
}

logs=$target_dir/logs
mkdir -p "$logs"
summary=()
for target in "${targets[@]}"; do
    corpus=fuzz/corpus/$target
    mkdir -p "$corpus" "fuzz/artifacts/$target"
    dirs=("$corpus")
    [ -d "fuzz/regressions/$target" ] && dirs+=("fuzz/regressions/$target")
    # Scratch space of the targets that need real files, removed after.
    scratch=$(mktemp -d)
    log=$logs/$target.log
    echo "==> fuzzing $target for ${seconds} s"
    status=0
    TIDEMARK_FUZZ_SEEDS=$corpus TMPDIR=$scratch \
        nice cargo fuzz run "${flags[@]}" "$target" "${dirs[@]}" -- \
        -max_total_time="$seconds" -max_len="$(max_len "$target")" \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$target/" >"$log" 2>&1 || status=$?
    rm -rf "$scratch"
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$log"
        echo "FAILED: $target crashed after ${runs:-?} executions; the input is in fuzz/artifacts/$target/ (log: $log)"
        exit 1
    fi
    summary+=("$(printf '%-18s %12s executions in %s s' "$target" "${runs:-?}" "$seconds")")
done
echo "==> fuzzing done, no crash"
printf '    %s\n' "${summary[@]}"
echo "fuzz: ${#summary[@]} passed, 0 failed"
