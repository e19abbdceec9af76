#!/usr/bin/env bash
# Runs every cargo-fuzz target for FUZZ_SECONDS (default 20) each.
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 enables them on the
# stable toolchain this project builds with.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || { echo "fuzz.sh: cargo-fuzz missing: cargo install cargo-fuzz --locked" >&2; exit 1; }
seconds=${FUZZ_SECONDS:-20}
export RUSTC_BOOTSTRAP=1
for target in $(cargo fuzz list); do
    echo "== fuzzing $target for ${seconds}s"
    log=$(mktemp)
    status=0
    # -s none: AddressSanitizer needs -Zsanitizer, which cargo-fuzz 0.13 cannot
    # get past stable rustc even with RUSTC_BOOTSTRAP; the targets are safe
    # Rust and check panics, overflows (-a) and their own invariants.
    cargo fuzz run -O -a -s none "$target" -- -max_total_time="$seconds" >"$log" 2>&1 || status=$?
    grep -E "^Done" "$log" || true
    if [ "$status" != 0 ]; then
        tail -n 60 "$log"
        rm -f "$log"
        echo "fuzz.sh: $target failed (exit $status): a build error above, or a crash whose input is under fuzz/artifacts/$target/" >&2
        exit 1
    fi
    rm -f "$log"
done
