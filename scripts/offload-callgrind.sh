#!/bin/bash
# Instructions per packet of the ACK offload engine at 1k flows, counted by
# callgrind (repeatable on a loaded machine, unlike the criterion times).
# Usage: scripts/offload-callgrind.sh [tag]  (after
#   CARGO_BUILD_JOBS=1 cargo bench --bench offload --no-run)
# Prints, per packet, the inclusive Ir of Bench::data (rx + early ACK) plus
# Bench::flush (the early ACKs that waited for the end of the batch, rule
# 12) for case 0 (one segment per flow in a batch) and case 4 (two in a
# row), and of Bench::guest_ack for case 1 (suppressed) and 2 (rewritten).
# The profiles stay in /tmp/offload-callgrind.<tag>.<case>.out.
set -euo pipefail
tag=${1:-now}
bin=${OFFLOAD_BENCH_BIN:-$(ls -t target/release/deps/offload-* | grep -v "\.d$" | head -1)}
for c in 0 4 1 2; do
    f=/tmp/offload-callgrind.$tag.$c.out
    OFFLOAD_BENCH_FIXED=1000,20000,$c valgrind --tool=callgrind --callgrind-out-file="$f" "$bin" >/dev/null 2>&1
    case $c in 0|4) fns='offload::Bench::data offload::Bench::flush' ;; *) fns='offload::Bench::guest_ack' ;; esac
    callgrind_annotate --inclusive=yes --tree=caller "$f" 2>/dev/null | FNS="$fns" CASE=$c python3 -c "
import os, sys, re
lines = sys.stdin.read().split('\n')
fns = os.environ['FNS'].split()
total, packets = 0, 0
for i, l in enumerate(lines):
    for k, fn in enumerate(fns):
        if re.search(r'\*  \S+:' + re.escape(fn) + r' \[', l):
            total += int(l.split()[0].replace(',', ''))
            if k == 0:
                j = i - 1
                while j >= 0 and '<' in lines[j]:
                    packets += int(re.search(r'\(([0-9,]+)x\)', lines[j]).group(1).replace(',', ''))
                    j -= 1
print('case %s: %d Ir / %d packets = %.0f Ir per packet' % (os.environ['CASE'], total, packets, total / packets))
"
done
