#!/usr/bin/env bash
# Latency-benchmark recipe with attribution: ping a TCG guest behind vsnoop at
# 1 Hz and at 1000 Hz, in three situations, and report where each round trip
# went (vsnoop's guest delay and backend delay for the ping flow, next to the
# RTT ping measured itself):
#
#   unloaded   the guest idles;
#   throttled  QEMU's threads in a cgroup-v1 cpu group (period 30 ms, quota
#              10 ms: a third of a core, in slices) while the guest runs a
#              CPU hog of its own (vsnoop.busy=1), like a VM sharing its core;
#   bulk       an iperf3 TCP stream host->guest on the same TAP during the pings.
#
# The pings go from the host side of the tap to the guest, so the remote end
# is the namespace itself: "outside" is then only the host's own stack, given
# as ping RTT - backend - guest (derived, medians). vsnoop runs outside the
# cgroup (it plays the host's driver domain).
#
# Everything runs inside a private network namespace (10.77.0.0/24) removed at
# the end, also on failure; only processes started here are signalled, by PID.
#
# Usage: benches/latency-attribution.sh [results-file]
# Environment: SCENARIOS="unloaded throttled bulk"  SLOW_COUNT=30 (1 Hz pings)
#              FAST_COUNT=3000 (1000 Hz pings)  VSNOOP=target/release/vsnoop
#              VSNOOP_GUEST_DIR=target/guest
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCENARIOS=${SCENARIOS:-"unloaded throttled bulk"}
SLOW_COUNT=${SLOW_COUNT:-30}
FAST_COUNT=${FAST_COUNT:-3000}
VSNOOP=${VSNOOP:-$ROOT/target/release/vsnoop}
GUEST=${VSNOOP_GUEST_DIR:-$ROOT/target/guest}
RESULTS=${1:-$ROOT/target/bench-results/latency-attribution-$(date +%Y%m%d-%H%M%S).md}
TAG="vla$$"
NS="${TAG}n"
TAP="${TAG}t"
CGROUP=/sys/fs/cgroup/cpu/vsnoop-$TAG
HOST_IP=10.77.0.1
GUEST_IP=10.77.0.2
WORK=$(mktemp -d "/tmp/vsnoop-latency.XXXXXX")
PIDFILE="$WORK/pids"
: >"$PIDFILE"

BENCH_NAME=latency
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

stop_all() {
    local pid
    if [[ -s $PIDFILE ]]; then
        while read -r pid; do stop_pid "$pid"; done <"$PIDFILE"
    fi
    : >"$PIDFILE"
    ip netns del "$NS" 2>/dev/null || true
    [[ -d $CGROUP ]] && rmdir "$CGROUP" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    stop_all
    if [[ $rc -ne 0 ]]; then log "failed (rc=$rc); logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in qemu-system-x86_64 iperf3 ip python3 busybox; do
    command -v "$tool" >/dev/null || die "required tool $tool is missing"
done
[[ -x $VSNOOP ]] || die "$VSNOOP not built (cargo build --release)"
if [[ " $SCENARIOS " == *" throttled "* && ! -d /sys/fs/cgroup/cpu ]]; then
    die "the throttled scenario needs the cgroup-v1 cpu controller at /sys/fs/cgroup/cpu"
fi
"$ROOT/scripts/build-guest.sh" >&2


guest_ready() {
    kill -0 "$QEMU_PID" 2>/dev/null || die "QEMU exited early: $(tail -5 "$WORK/qemu.stderr" 2>/dev/null)"
    grep -q VSNOOP-GUEST-READY "$WORK/console.log"
}

start() { # scenario: vsnoop with --control, then the guest
    local append="console=ttyS0 quiet loglevel=1 panic=-1 vsnoop.ip=$GUEST_IP/24"
    [[ $1 == throttled ]] && append+=" vsnoop.busy=1"
    ip netns add "$NS"
    ip netns exec "$NS" ip link set lo up
    ip netns exec "$NS" env RUST_LOG=${RUST_LOG:-info} "$VSNOOP" --socket "$WORK/vhost.sock" \
        --tap "$TAP" --control "$WORK/control.sock" 2>"$WORK/vsnoop.log" >/dev/null &
    echo $! >>"$PIDFILE"
    wait_for 20 "vsnoop 'listening on'" grep -q "listening on" "$WORK/vsnoop.log"
    ip netns exec "$NS" ip addr add "$HOST_IP/24" dev "$TAP"
    ip netns exec "$NS" ip link set "$TAP" up
    : >"$WORK/console.log"
    ip netns exec "$NS" qemu-system-x86_64 -accel tcg -nodefaults -display none -no-reboot \
        -smp 1 -m 256M -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
        -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.gz" -append "$append" \
        -serial "file:$WORK/console.log" \
        -chardev "socket,id=c0,path=$WORK/vhost.sock" -netdev vhost-user,id=n0,chardev=c0 \
        -device virtio-net-pci,netdev=n0,vectors=0,mrg_rxbuf=on,mac=52:54:00:77:00:02 \
        </dev/null >"$WORK/qemu.stdout" 2>"$WORK/qemu.stderr" &
    QEMU_PID=$!
    echo "$QEMU_PID" >>"$PIDFILE"
    wait_for 180 "the guest (VSNOOP-GUEST-READY)" guest_ready
    wait_for 60 "ping to the guest" ip netns exec "$NS" busybox ping -c 1 -W 1 "$GUEST_IP"
    case $1 in
    throttled)
        mkdir -p "$CGROUP"
        echo 30000 >"$CGROUP/cpu.cfs_period_us"
        echo 10000 >"$CGROUP/cpu.cfs_quota_us"
        local tid
        for tid in /proc/"$QEMU_PID"/task/*; do echo "${tid##*/}" >"$CGROUP/tasks"; done
        # The guest's CPU hog must keep the vCPU busy, or the quota never
        # bites and "throttled" measures an idle guest.
        sleep 3
        local periods throttled
        periods=$(awk '$1 == "nr_periods" { print $2 }' "$CGROUP/cpu.stat")
        throttled=$(awk '$1 == "nr_throttled" { print $2 }' "$CGROUP/cpu.stat")
        log "throttled: QEMU throttled in $throttled of $periods periods (3 s)"
        ((throttled * 2 >= periods && periods > 0)) ||
            die "the guest does not use its CPU quota (throttled in $throttled of $periods periods): its CPU hog (vsnoop.busy=1) is not running; rebuild the guest (scripts/build-guest.sh)"
        ;;
    bulk)
        ip netns exec "$NS" iperf3 -c "$GUEST_IP" -t 3600 >"$WORK/iperf.log" 2>&1 &
        echo $! >>"$PIDFILE"
        sleep 2
        ;;
    esac
}

# ping_row SCENARIO RATE COUNT INTERVAL: one table row
ping_row() {
    local scenario=$1 rate=$2 count=$3 interval=$4 pid
    ip netns exec "$NS" busybox ping -c "$count" -i "$interval" -W 2 "$GUEST_IP" >"$WORK/ping.txt" 2>&1 &
    pid=$!
    echo "$pid" >>"$PIDFILE"
    wait "$pid" || true
    "$VSNOOP" stats --control "$WORK/control.sock" --json >"$WORK/stats.json"
    # busybox ping uses its PID as the echo identifier.
    python3 - "$WORK/ping.txt" "$WORK/stats.json" $((pid & 0xffff)) "$scenario" "$rate" <<'PY'
import json, re, sys
ping_txt, stats_json, ident, scenario, rate = sys.argv[1:6]
rtts = sorted(float(m) for m in re.findall(r"time=([0-9.]+) ms", open(ping_txt).read()))
flows = json.load(open(stats_json))["flows"]
flow = next((f for f in flows if f["proto"] == "icmp" and f["sport"] == int(ident)), None)
def pct(v, q):
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")
if flow is None or not rtts:
    print(f"| {scenario} | {rate} | {len(rtts)} | n/a | n/a | n/a | n/a |")
    sys.exit(0)
g, b = flow["guest_delay_ms"], flow["backend_delay_ms"]
outside = pct(rtts, 0.5) - g["p50"] - b["p50"]
print(f"| {scenario} | {rate} | {len(rtts)} | {pct(rtts, 0.5):.3f} / {pct(rtts, 0.99):.3f} "
      f"| {g['p50']:.3f} / {g['p99']:.3f} | {b['p50']:.3f} / {b['p99']:.3f} | {outside:.3f} |")
PY
}

ROWS=()
for scenario in $SCENARIOS; do
    log "$scenario: starting vsnoop and the guest"
    start "$scenario"
    log "$scenario: $SLOW_COUNT pings at 1 Hz"
    ROWS+=("$(ping_row "$scenario" "1 Hz" "$SLOW_COUNT" 1)")
    log "$scenario: $FAST_COUNT pings at 1000 Hz"
    ROWS+=("$(ping_row "$scenario" "1000 Hz" "$FAST_COUNT" 0.001)")
    stop_all
done

mkdir -p "$(dirname "$RESULTS")"
{
    echo "### latency-attribution: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, $(uname -r)"
    echo
    echo "Ping from the host side of the tap to a TCG guest behind vsnoop; RTT as ping measured it, and vsnoop's split of the same flow (ms, p50 / p99)."
    echo
    echo "| scenario | rate | replies | ping RTT | guest delay | backend delay | rest (derived, p50) |"
    echo "|---|---|---:|---:|---:|---:|---:|"
    printf '%s\n' "${ROWS[@]}"
} | tee "$RESULTS"
log "results written to $RESULTS"
