#!/bin/bash
# Instructions per packet of the ACK offload engine at 1k flows, counted by
# callgrind (repeatable on a loaded machine, unlike the criterion times).
# Usage: scripts/offload-callgrind.sh [tag]  (after
#   CARGO_BUILD_JOBS=1 cargo bench --bench offload --no-run)
# Prints the inclusive Ir of Bench::data (rx + early ACK) and
# Bench::guest_ack (case 1 suppressed, case 2 rewritten) per call; the
# profiles stay in /tmp/offload-callgrind.<tag>.<case>.out.
set -euo pipefail
tag=${1:-now}
bin=${OFFLOAD_BENCH_BIN:-$(ls -t target/release/deps/offload-* | grep -v "\.d$" | head -1)}
for c in 0 1 2; do
    f=/tmp/offload-callgrind.$tag.$c.out
    OFFLOAD_BENCH_FIXED=1000,20000,$c valgrind --tool=callgrind --callgrind-out-file="$f" "$bin" >/dev/null 2>&1
    fn=$([ $c = 0 ] && echo 'offload::Bench::data' || echo 'offload::Bench::guest_ack')
    callgrind_annotate --inclusive=yes --tree=caller "$f" 2>/dev/null | python3 -c "
import sys, re
lines = sys.stdin.read().split('\n')
for i, l in enumerate(lines):
    if re.search(r'\*  \S+:$fn \[', l):
        tot = int(l.split()[0].replace(',', ''))
        calls, j = 0, i - 1
        while j >= 0 and '<' in lines[j]:
            calls += int(re.search(r'\(([0-9,]+)x\)', lines[j]).group(1).replace(',', ''))
            j -= 1
        print('case $c: %d Ir / %d calls = %.0f Ir per packet' % (tot, calls, tot / calls))
"
done
