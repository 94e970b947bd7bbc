#!/usr/bin/env bash
# Fuzz smoke test for CI: builds every cargo-fuzz target, replays the saved regression inputs
# (fuzz/regressions/<target>/*) and the seeds, then fuzzes each target for a few seconds.
# Exits non-zero on any crash, timeout (hang) or out-of-memory. See docs/FUZZING.md.
#
#   fuzz/smoke.sh                 # all targets, FUZZ_SECONDS (default 20) each
#   FUZZ_SECONDS=5 fuzz/smoke.sh virtio_blk vhost_user
#
# Only the stable toolchain is needed: cargo-fuzz's nightly-only flags (-Zsanitizer=address)
# are allowed through RUSTC_BOOTSTRAP=1. Build output and scratch corpora go to fuzz/target/.
set -euo pipefail

cd "$(dirname "$0")"
FUZZ_DIR=$PWD
SECONDS_PER_TARGET=${FUZZ_SECONDS:-20}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "smoke: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list --fuzz-dir "$FUZZ_DIR")
fi

echo "smoke: building ${targets[*]}"
cargo fuzz build --fuzz-dir "$FUZZ_DIR"

# Common libFuzzer options: a hang is any input that runs for 10 s; cap memory at 4 GiB.
opts=(-timeout=10 -rss_limit_mb=4096)
failed=()
for t in "${targets[@]}"; do
    mapfile -t regressions < <(find "regressions/$t" -type f ! -name '.*' 2>/dev/null | sort)
    if [ ${#regressions[@]} -gt 0 ]; then
        echo "smoke: $t: replaying ${#regressions[@]} regression input(s)"
        if ! cargo fuzz run --fuzz-dir "$FUZZ_DIR" "$t" "${regressions[@]}" -- "${opts[@]}" \
            >"target/smoke-$t-regressions.log" 2>&1; then
            echo "smoke: $t: a regression input FAILED (see fuzz/target/smoke-$t-regressions.log):"
            grep -E "panicked at|BUG|ERROR: libFuzzer|ALARM|Running:" \
                "target/smoke-$t-regressions.log" | head -n 20 || true
            failed+=("$t(regressions)")
            continue
        fi
    fi
    corpus="target/corpus/$t"
    mkdir -p "$corpus" "artifacts/$t"
    echo "smoke: $t: fuzzing for ${SECONDS_PER_TARGET}s from seeds/$t"
    if ! cargo fuzz run --fuzz-dir "$FUZZ_DIR" "$t" "$corpus" "seeds/$t" -- "${opts[@]}" \
        -max_total_time="$SECONDS_PER_TARGET" >"target/smoke-$t.log" 2>&1; then
        echo "smoke: $t: FAILED (see fuzz/target/smoke-$t.log; input saved under fuzz/artifacts/$t/):"
        grep -E "panicked at|BUG|ERROR: libFuzzer|ALARM|Test unit written" \
            "target/smoke-$t.log" | head -n 20 || true
        failed+=("$t")
        continue
    fi
    grep -E "^#[0-9]+.*DONE" "target/smoke-$t.log" | tail -n 1 | sed "s/^/smoke: $t: /" || true
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "smoke: FAILED: ${failed[*]}"
    exit 1
fi
echo "smoke: all ${#targets[@]} targets passed"
