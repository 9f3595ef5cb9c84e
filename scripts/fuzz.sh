#!/usr/bin/env bash
# `make fuzz`: builds snapblk's cargo-fuzz targets (fuzz/, its own cargo workspace) and runs each
# for a bounded time.
#
#   FUZZ_SECS=60            seconds per target
#   FUZZ_TARGETS="..."      which targets (default: all three)
#   FUZZ_JOBS=1             parallel libFuzzer jobs per target
#   FUZZ_SANITIZER=address  cargo fuzz --sanitizer (address, none, ...)
#   FUZZ_TARGET_DIR=...     cargo target dir (default target/fuzz)
#
# Only a stable toolchain is needed: cargo fuzz passes -Z flags (sanitizer, coverage), which
# stable rustc accepts with RUSTC_BOOTSTRAP=1. New corpus entries go to target/fuzz-corpus/<t>
# (the committed seeds in fuzz/corpus/<t> are read, never written); crashes, leaks, timeouts and
# out-of-memory inputs go to fuzz/artifacts/<t>/. Limits: 512 MiB RSS and 512 MiB per malloc,
# 10 s per input (30 s for qcow2_image). Exits non-zero if any target found something.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

FUZZ_SECS=${FUZZ_SECS:-60}
FUZZ_TARGETS=${FUZZ_TARGETS:-"virtio_blk_chain qcow2_image cache_ops"}
FUZZ_JOBS=${FUZZ_JOBS:-1}
FUZZ_SANITIZER=${FUZZ_SANITIZER:-address}
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$ROOT/target/fuzz}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz from crates.io"
    cargo install cargo-fuzz --locked
fi

cd "$ROOT/fuzz"
echo "fuzz.sh: building targets (sanitizer: $FUZZ_SANITIZER)"
cargo fuzz build --release --sanitizer "$FUZZ_SANITIZER"
host=$(rustc -vV | sed -n 's/^host: //p')
bin_dir="$CARGO_TARGET_DIR/$host/release"

failed=()
for t in $FUZZ_TARGETS; do
    work="$ROOT/target/fuzz-corpus/$t"
    mkdir -p "$work" "artifacts/$t"
    # The checker's refcount comparison on a hostile image can take several seconds under
    # ASan (bounded, see fuzz/findings/); give qcow2_image more time per input.
    case $t in
        qcow2_image) per_input=30 ;;
        *) per_input=10 ;;
    esac
    args=("$work" "corpus/$t" -max_total_time="$FUZZ_SECS" -rss_limit_mb=512 \
        -malloc_limit_mb=512 -timeout="$per_input" -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/")
    if ((FUZZ_JOBS > 1)); then
        args+=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS")
    fi
    echo "fuzz.sh: $t for ${FUZZ_SECS}s"
    # The binary built above is run directly (`cargo fuzz run` would rebuild first).
    if ! "$bin_dir/$t" "${args[@]}"; then
        failed+=("$t")
    fi
done

if ((${#failed[@]})); then
    echo "fuzz.sh: findings in: ${failed[*]} (inputs under fuzz/artifacts/; reproduce with"
    echo "  $bin_dir/<target> <artifact>, from fuzz/)"
    exit 1
fi
echo "fuzz.sh: no findings"
