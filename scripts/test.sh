#!/usr/bin/env bash
# The whole test suite: unit tests, vhost-user protocol tests, DPDK
# virtio-user tests and real QEMU guest tests. Needs root (network
# namespaces, taps) and the tools .ci/run installs. Nothing is skipped: a
# missing tool fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/test.sh: run as root (tests create network namespaces)" >&2; exit 1; }
echo "== building the test guest (cached in target/guest)"
scripts/build-guest.sh
echo "== cargo test (release)"
# One test at a time: the guest and DPDK tests each need the machine's CPUs.
cargo test --release -- --test-threads=1 "$@"
echo "== fuzzing (scripts/fuzz.sh)"
scripts/fuzz.sh
