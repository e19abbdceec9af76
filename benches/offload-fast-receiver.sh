#!/usr/bin/env bash
# Bulk throughput with the ACK offload on and off when the receiver is fast:
# no TCG guest in the way, so vsnoop's own cost shows.
#
#   sender ns A:  iperf3 -c -> tap vt0 -> vsnoop (--ack-offload on)
#   receiver ns B: dpdk-testpmd (net_virtio_user on vsnoop's socket, io
#                  forwarding to net_tap dt0) -> the kernel's TCP stack ->
#                  iperf3 -s
#
# The "guest" is DPDK's virtio-user driver handing frames to a real Linux
# TCP receiver through a tap, so a flow has a real handshake and real ACKs,
# and the offload acts on it as on a guest's. testpmd's forwarding lcore
# busy-polls one CPU (FWD_CPU); vsnoop, both iperf3 ends and their kernel
# work share the other (CPU, with PIN=1), so any CPU the offload adds costs
# throughput: a worst case for the offload, where a TCG guest (the other
# benchmarks) hides it.
#
# One vsnoop and one testpmd for the whole run; the offload is switched
# through the control socket before each iperf3 run (a new connection each
# time), in ABBA pairs, so the per-pair ratio cancels the machine's drift.
#
# Settings (environment):
#   PAIRS       [6]      ABBA pairs of runs (on, off, off, on, ...)
#   IPERF_TIME  [5]      seconds per iperf3 run
#   SENDER_CC   [cubic]  the sender's congestion control
#   CPU         [0]      the CPU of vsnoop, iperf3 and testpmd's main lcore
#   FWD_CPU     [1]      the CPU of testpmd's forwarding lcore
#   PIN         [1]      pin vsnoop and iperf3 to CPU (0: leave them free)
#   CSUM        [0]      1: the frontend negotiates checksum offload, as a Linux
#                        guest does (testpmd --rx-offloads=0x8, csum forwarding
#                        with the tap port's TCP checksum offload): vsnoop gets
#                        the tap's partial checksums and verifies nothing; 0:
#                        no checksum offload, vsnoop verifies every segment
#   PERF        [0]      1: perf record on vsnoop during every run (call graphs:
#                        PERF_CALLGRAPH, fp or dwarf, see benches/lib.sh); the table
#                        then splits vsnoop's CPU per MB into parts (PERF_SPLIT
#                        in benches/lib.sh), and the last run of each state
#                        stays in target/bench-results/PREFIX-perf-STATE.data
#   VSNOOP      [target/release/vsnoop]  the binary (built if missing)
#   PREFIX      [offload-fast-receiver]  results in benches/results/PREFIX.{md,csv}
# Needs root, dpdk-testpmd (apt dpdk-dev), iperf3, iproute2, python3.
# Everything runs in two namespaces of its own (10.77.0.0/24), removed at
# exit; only processes this script started are ended.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=offload-fast-receiver
. benches/lib.sh

PAIRS=${PAIRS:-6}
IPERF_TIME=${IPERF_TIME:-5}
SENDER_CC=${SENDER_CC:-cubic}
CPU=${CPU:-0}
FWD_CPU=${FWD_CPU:-1}
PIN=${PIN:-1}
VSNOOP=${VSNOOP:-target/release/vsnoop}
PREFIX=${PREFIX:-offload-fast-receiver}
PERF=${PERF:-0}
CSUM=${CSUM:-0}

[ "$(id -u)" = 0 ] || die "run as root (network namespaces, taps)"
for tool in dpdk-testpmd iperf3 ip python3 taskset; do
    command -v "$tool" >/dev/null || die "missing $tool"
done
if [[ $PERF == 1 ]]; then
    command -v perf >/dev/null || die "PERF=1 needs perf (apt-get install linux-perf)"
fi
[[ $PAIRS =~ ^[1-9][0-9]*$ ]] || die "PAIRS must be a positive integer"
if [ ! -x "$VSNOOP" ]; then
    log "building $VSNOOP"
    cargo build --release --quiet
fi
VSNOOP=$(realpath "$VSNOOP")

WORK=$(mktemp -d /tmp/vsnoop-fast-rx.XXXXXX)
NS_A=vfrA$$
NS_B=vfrB$$
PIDS=()
cleanup() {
    local rc=$? pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    if ((rc != 0)); then
        mkdir -p "target/bench-results/$PREFIX-logs"
        cp "$WORK"/*.log "target/bench-results/$PREFIX-logs/" 2>/dev/null || true
        log "logs kept in target/bench-results/$PREFIX-logs"
    fi
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

ip netns add "$NS_A"
ip netns add "$NS_B"
ip -n "$NS_A" link set lo up
ip -n "$NS_B" link set lo up

log "vsnoop on tap vt0 in $NS_A"
ip netns exec "$NS_A" "$(command -v taskset)" -c "$CPU" "$VSNOOP" --socket "$WORK/vhost.sock" \
    --tap vt0 --ack-offload on --control "$WORK/control.sock" >"$WORK/vsnoop.log" 2>&1 &
PIDS+=($!)
VSNOOP_PID=$!
[ "$PIN" = 1 ] || taskset -pc 0-1023 "$VSNOOP_PID" >/dev/null
wait_for 20 "vsnoop's socket" test -S "$WORK/vhost.sock"

log "testpmd (virtio-user -> net_tap dt0) in $NS_B, forwarding lcore on CPU $FWD_CPU"
ip -n "$NS_A" link set vt0 address 02:77:00:00:00:01
FWD=(--forward-mode=io)
if [[ $CSUM == 1 ]]; then
    # The tap port (1) computes the TCP checksums of what the virtio port
    # received with a partial one (net_tap does it in software, on testpmd's CPU).
    printf '%s\n' "port stop all" "csum set tcp hw 1" "port start all" >"$WORK/testpmd.cmds"
    # csum forwarding also rewrites the Ethernet addresses (to the peer's and
    # the port's own), so the peers are the two kernel ends, whose MACs are set.
    FWD=(--rx-offloads=0x8 --forward-mode=csum --cmdline-file="$WORK/testpmd.cmds"
        --eth-peer=0,02:77:00:00:00:01 --eth-peer=1,02:77:00:00:00:02)
fi
ip netns exec "$NS_B" dpdk-testpmd --no-pci --no-huge -m 1024 --file-prefix "vfr$$" \
    --lcores "0@$CPU,1@$FWD_CPU" --vdev "net_virtio_user0,path=$WORK/vhost.sock,queues=1" \
    --vdev "net_tap0,iface=dt0,mac=02:77:00:00:00:02" -- "${FWD[@]}" --auto-start --stats-period 60 \
    </dev/null >"$WORK/testpmd.log" 2>&1 &
PIDS+=($!)
wait_for 60 "testpmd's tap dt0" ip -n "$NS_B" link show dt0

ip -n "$NS_A" addr add 10.77.0.1/24 dev vt0
ip -n "$NS_A" link set vt0 up
ip -n "$NS_B" addr add 10.77.0.2/24 dev dt0
ip -n "$NS_B" link set dt0 up
wait_for 30 "a ping through vsnoop and testpmd" ip netns exec "$NS_A" busybox ping -c 1 -W 1 10.77.0.2

ip netns exec "$NS_B" "$(command -v taskset)" -c "$CPU" iperf3 -s -B 10.77.0.2 >"$WORK/iperf3-server.log" 2>&1 &
PIDS+=($!)
[ "$PIN" = 1 ] || taskset -pc 0-1023 "$!" >/dev/null
wait_for 10 "iperf3 -s" ip netns exec "$NS_B" ss -ltn 'sport = :5201'

stats() { "$VSNOOP" stats --control "$WORK/control.sock" --json; }
# "early ACKs,guest ACKs suppressed,window updates deferred (of those suppressed),
# guest ACKs rewritten,RX frames,RX batches" so far.
offload_counts() {
    stats | python3 -c 'import json,sys; j = json.load(sys.stdin); o = j["offload"]
q = [sum(x[k] for x in j["queues"]) for k in ("rx_packets", "rx_batches")]
print("%d,%d,%d,%d,%d,%d" % (o["early_acks"], o["guest_acks_suppressed"], o.get("window_updates_deferred", 0), o["guest_acks_rewritten"], *q))'
}
CSV=benches/results/$PREFIX.csv
mkdir -p benches/results
echo "pair,offload,mbit_s,retransmits,vsnoop_cpu_us_per_mb,early_acks,guest_acks_suppressed,window_updates_deferred,guest_acks_rewritten,rx_frames,rx_batches,perf_split" >"$CSV"

run() { # pair state
    local pair=$1 state=$2 t0 t1 e0 e1 out split=""
    "$VSNOOP" ack-offload --control "$WORK/control.sock" "$state" >/dev/null
    e0=$(offload_counts)
    [[ $PERF == 1 ]] && perf_begin "$VSNOOP_PID" "$WORK/perf.data" "$WORK/perf.log"
    t0=$(cpu_ticks "$VSNOOP_PID")
    out=$(ip netns exec "$NS_A" bash -c "$( [ "$PIN" = 1 ] && echo "taskset -c $CPU" ) iperf3 -c 10.77.0.2 -t $IPERF_TIME -C $SENDER_CC -J") ||
        die "iperf3 failed ($state, pair $pair): $(tail -c 400 <<<"$out")"
    t1=$(cpu_ticks "$VSNOOP_PID")
    if [[ $PERF == 1 ]]; then
        perf_end "$PERF_PID" "$WORK/perf.data" "$WORK/perf.log"
        split=$PERF_RESULT
        mkdir -p target/bench-results
        cp "$WORK/perf.data" "target/bench-results/$PREFIX-perf-$state.data"
    fi
    e1=$(offload_counts)
    printf '%s' "$out" >"$WORK/iperf3.json"
    python3 - "$WORK/iperf3.json" "$pair" "$state" "$((t1 - t0))" "$e0" "$e1" "$(getconf CLK_TCK)" "$split" >>"$CSV" <<'EOF'
import json, sys
pair, state, ticks, hz = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[7])
# Early ACKs, guest ACKs suppressed (window updates deferred among them) and
# rewritten, RX frames and batches during the run.
counts = [b - a for a, b in zip(map(int, sys.argv[5].split(",")), map(int, sys.argv[6].split(",")))]
# perf's shares of the samples, as us of vsnoop's CPU per MB.
r = json.load(open(sys.argv[1]))["end"]
recv = r["sum_received"]
mb = recv["bytes"] / 1e6
cpu = ticks / hz * 1e6 / mb
split = ";".join(f"{k}={float(v) * cpu:.1f}" for k, v in (kv.split("=") for kv in sys.argv[8].split(";") if kv))
print(f"{pair},{state},{recv['bits_per_second'] / 1e6:.1f},{r['sum_sent'].get('retransmits', 0)},"
      f"{cpu:.1f},{','.join(map(str, counts))},{split}")
EOF
    log "pair $pair offload $state: $(tail -1 "$CSV" | cut -d, -f3) Mbit/s"
}

log "warm-up run (offload on, not counted)"
"$VSNOOP" ack-offload --control "$WORK/control.sock" on >/dev/null
ip netns exec "$NS_A" iperf3 -c 10.77.0.2 -t 2 -C "$SENDER_CC" >/dev/null
for pair in $(seq "$PAIRS"); do
    if ((pair % 2)); then order="on off"; else order="off on"; fi
    for state in $order; do run "$pair" "$state"; done
done

python3 - "$CSV" "$PREFIX" "$PAIRS" "$IPERF_TIME" "$SENDER_CC" "$PIN" "$("$VSNOOP" --version)" >"benches/results/$PREFIX.md" <<'EOF'
import csv, random, statistics, sys
path, prefix, pairs, secs, cc, pin, version = sys.argv[1:]
rows = list(csv.DictReader(open(path)))
by = {}
for r in rows:
    by.setdefault(r["pair"], {})[r["offload"]] = r
def med(xs): return statistics.median(xs)
def boot(xs, n=2000):
    rnd = random.Random(1)
    ms = sorted(med([rnd.choice(xs) for _ in xs]) for _ in range(n))
    return ms[int(0.025 * n)], ms[int(0.975 * n) - 1]
ratio = [float(p["on"]["mbit_s"]) / float(p["off"]["mbit_s"]) for p in by.values() if "on" in p and "off" in p]
cpu = [float(p["on"]["vsnoop_cpu_us_per_mb"]) / float(p["off"]["vsnoop_cpu_us_per_mb"]) for p in by.values() if "on" in p and "off" in p]
print(f"# {prefix}\n\n{version}; {pairs} ABBA pairs of {secs} s iperf3 runs, sender {cc}, "
      f"{'vsnoop and iperf3 pinned to one CPU' if pin == '1' else 'vsnoop and iperf3 unpinned'}, "
      "testpmd's forwarding lcore on the other.\n")
print("| offload | runs | Mbit/s median (min-max) | vsnoop CPU us/MB | sender retransmits | early ACKs per run | guest ACKs suppressed (window updates deferred) / rewritten per run | RX frames per batch |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for state in ("off", "on"):
    rs = [r for r in rows if r["offload"] == state]
    mbit = [float(r["mbit_s"]) for r in rs]
    print(f"| {state} | {len(rs)} | {med(mbit):.0f} ({min(mbit):.0f}-{max(mbit):.0f}) | "
          f"{med([float(r['vsnoop_cpu_us_per_mb']) for r in rs]):.0f} | "
          f"{med([int(r['retransmits']) for r in rs]):.0f} | {med([int(r['early_acks']) for r in rs]):.0f} | "
          f"{med([int(r['guest_acks_suppressed']) for r in rs]):.0f} "
          f"({med([int(r['window_updates_deferred']) for r in rs]):.0f}) / {med([int(r['guest_acks_rewritten']) for r in rs]):.0f} | "
          f"{med([int(r['rx_frames']) / max(1, int(r['rx_batches'])) for r in rs]):.1f} |")
lo, hi = boot(ratio)
clo, chi = boot(cpu)
print(f"\nPaired on/off: throughput {med(ratio):.3f} (95 % bootstrap range of the median {lo:.3f}-{hi:.3f}); "
      f"vsnoop CPU per MB {med(cpu):.3f} ({clo:.3f}-{chi:.3f}).")
def parts(r): return {k: float(v) for k, v in (kv.split("=") for kv in r["perf_split"].split(";") if kv)}
if any(r["perf_split"] for r in rows):
    print("\nWhere vsnoop's CPU went (perf samples, `PERF_SPLIT` in benches/lib.sh), us per MB received, "
          "medians, and the median of the per-pair differences:\n")
    print("| part | off | on | on - off (95 % range) |")
    print("|---|---:|---:|---:|")
    pairs_ = [p for p in by.values() if "on" in p and "off" in p]
    for k in parts(rows[0]):
        d = [parts(p["on"])[k] - parts(p["off"])[k] for p in pairs_]
        lo, hi = boot(d)
        print(f"| {k} | {med([parts(r)[k] for r in rows if r['offload'] == 'off']):.0f} | "
              f"{med([parts(r)[k] for r in rows if r['offload'] == 'on']):.0f} | {med(d):+.0f} ({lo:+.0f} to {hi:+.0f}) |")
EOF
cat "benches/results/$PREFIX.md"
