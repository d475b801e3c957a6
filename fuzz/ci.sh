#!/usr/bin/env bash
# Runs every cargo-fuzz target for a short while over its checked-in seeds; fails on any crash.
#
#   fuzz/ci.sh                      # 15 s per target
#   FUZZ_SECONDS=600 fuzz/ci.sh     # longer
#
# Environment:
#   FUZZ_SECONDS      seconds per target (default 15)
#   FUZZ_TOOLCHAIN    nightly | stable (default: nightly when rustup has it, else stable,
#                     meaning the default toolchain)
#   FUZZ_SANITIZER    address | none (default: address on nightly; stable can only do none)
#   FUZZ_TARGET_DIR   cargo target directory for the fuzz build (default fuzz/target)
#   FUZZ_TARGETS      space-separated subset of targets (default: all of `cargo fuzz list`)
#
# cargo-fuzz works on stable with `-s none`: its other flags (sancov passes, --cfg fuzzing)
# are stable; only `-Zsanitizer` needs nightly. AddressSanitizer makes a run about 10x
# slower here and matters only for unsafe code in dependencies (tidegate forbids unsafe).
# New corpus entries go to fuzz/corpus/NAME (gitignored); fuzz/seeds/NAME is only read.
# A crashing input is saved under fuzz/artifacts/NAME/ (cargo-fuzz prints the path).
set -euo pipefail

cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-15}
target_dir=${FUZZ_TARGET_DIR:-fuzz/target}
start=$SECONDS

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

toolchain=${FUZZ_TOOLCHAIN:-}
if [[ -z $toolchain ]]; then
    if command -v rustup >/dev/null 2>&1 && rustup run nightly rustc --version >/dev/null 2>&1; then
        toolchain=nightly
    else
        toolchain=stable
    fi
fi
case $toolchain in
    nightly) sanitizer=${FUZZ_SANITIZER:-address} ;;
    stable) sanitizer=${FUZZ_SANITIZER:-none} ;;
    *)
        echo "FUZZ_TOOLCHAIN must be nightly or stable" >&2
        exit 2
        ;;
esac
if [[ $toolchain == stable && $sanitizer != none ]]; then
    echo "a sanitizer needs nightly (FUZZ_SANITIZER=none on stable)" >&2
    exit 2
fi
flags=(-s "$sanitizer")
# Stable is the default toolchain, whatever rustup calls it on this machine ("stable",
# "1.95.0"): plain `cargo`, never `+stable`, which would try to download one.
cargo_tc=(cargo)
if [[ $toolchain == nightly ]]; then
    cargo_tc=(cargo +nightly)
fi
# Debug assertions on: overflow checks and debug_assert! are properties too.
flags+=(-a --target-dir "$target_dir")

read -r -a targets <<<"${FUZZ_TARGETS:-$("${cargo_tc[@]}" fuzz list | tr '\n' ' ')}"
echo "== $toolchain, sanitizer $sanitizer, ${#targets[@]} targets, ${seconds}s each: ${targets[*]}"

"${cargo_tc[@]}" fuzz build "${flags[@]}"
echo "== built in $((SECONDS - start))s"

failed=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    echo "== $t"
    if ! "${cargo_tc[@]}" fuzz run "${flags[@]}" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1; then
        failed+=("$t")
    fi
done

echo "== done in $((SECONDS - start))s"
if ((${#failed[@]})); then
    echo "fuzz targets that crashed: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
