#!/usr/bin/env bash
# A real (TCG) guest behind vsnoop versus behind QEMU's own tap backend
# (-netdev tap,vhost=off), in the same run: iperf3 host->guest and
# guest->host (TCP) and ping RTT from the host side of the tap.
#
# The guest is the one scripts/build-guest.sh builds (target/guest/vmlinuz and
# initramfs.gz): it configures eth0 from vsnoop.ip=10.77.0.2/24, runs
# `iperf3 -s -D` and prints VSNOOP-GUEST-READY on ttyS0. QEMU uses exactly
# the same machine and NIC options for both backends (1 vCPU, 256 MiB memfd
# guest memory, virtio-net-pci with vectors=0 and mrg_rxbuf=on); only -netdev
# differs. Nothing is pinned: QEMU (TCG vCPU + main loop), the backend and the
# iperf3 client share the 2 CPUs as the scheduler sees fit.
#
# Everything runs inside a private network namespace (10.77.0.0/24) that is
# removed at the end, also on failure; only processes started here are
# signalled, by PID.
#
# Usage: benches/guest-iperf.sh [results-file]
# Environment: BACKENDS="vsnoop qemu-tap"  IPERF_TIME=10  PINGS=30
#              VSNOOP=target/release/vsnoop  VSNOOP_GUEST_DIR=target/guest
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BACKENDS=${BACKENDS:-"vsnoop qemu-tap"}
IPERF_TIME=${IPERF_TIME:-10}
PINGS=${PINGS:-30}
VSNOOP=${VSNOOP:-$ROOT/target/release/vsnoop}
GUEST=${VSNOOP_GUEST_DIR:-$ROOT/target/guest}
RESULTS=${1:-$ROOT/target/bench-results/guest-iperf-$(date +%Y%m%d-%H%M%S).md}
TAG="vgi$$"
NS="${TAG}n"
TAP="${TAG}t"
HOST_IP=10.77.0.1
GUEST_IP=10.77.0.2
WORK=$(mktemp -d "/tmp/vsnoop-guest-iperf.XXXXXX")
PIDFILE="$WORK/pids"
: >"$PIDFILE"

BENCH_NAME=guest-iperf
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

stop_all() {
    local pid
    if [[ -s $PIDFILE ]]; then
        while read -r pid; do stop_pid "$pid"; done <"$PIDFILE"
    fi
    : >"$PIDFILE"
    ip netns del "$NS" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    stop_all
    if [[ $rc -ne 0 ]]; then log "failed (rc=$rc); logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in qemu-system-x86_64 iperf3 ip python3; do
    command -v "$tool" >/dev/null || die "required tool $tool is missing"
done
# iputils ping if installed, else busybox's (same -c/-i/-q/-W options; its
# summary reads "round-trip min/avg/max = a/b/c ms").
if command -v ping >/dev/null; then PING=(ping); elif command -v busybox >/dev/null; then PING=(busybox ping); else
    die "required tool ping (iputils-ping or busybox) is missing"
fi
if [[ ! -f $GUEST/vmlinuz || ! -f $GUEST/initramfs.gz ]]; then
    log "building the guest image (scripts/build-guest.sh)"
    "$ROOT/scripts/build-guest.sh" >&2
fi


qemu_alive() { kill -0 "$QEMU_PID" 2>/dev/null; }
guest_ready() {
    qemu_alive || die "QEMU exited early: $(tail -5 "$WORK/qemu.stderr" 2>/dev/null)"
    grep -q VSNOOP-GUEST-READY "$WORK/console.log"
}

start_qemu() { # backend
    local netdev
    case $1 in
    vsnoop) netdev=(-chardev "socket,id=c0,path=$WORK/vhost.sock" -netdev vhost-user,id=n0,chardev=c0) ;;
    qemu-tap) netdev=(-netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no,vhost=off") ;;
    esac
    ip netns exec "$NS" qemu-system-x86_64 -accel tcg -nodefaults -display none -no-reboot \
        -smp 1 -m 256M -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
        -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.gz" \
        -append "console=ttyS0 quiet loglevel=1 panic=-1 vsnoop.ip=$GUEST_IP/24" \
        -serial "file:$WORK/console.log" "${netdev[@]}" \
        -device virtio-net-pci,netdev=n0,vectors=0,mrg_rxbuf=on,mac=52:54:00:77:00:02 \
        </dev/null >"$WORK/qemu.stdout" 2>"$WORK/qemu.stderr" &
    QEMU_PID=$!
    echo "$QEMU_PID" >>"$PIDFILE"
}

iperf_mbps() { # extra iperf3 args...; prints receiver-side Mbit/s
    ip netns exec "$NS" iperf3 -c "$GUEST_IP" -t "$IPERF_TIME" -J "$@" >"$WORK/iperf.json" \
        || die "iperf3 $* failed: $(tail -5 "$WORK/iperf.json")"
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%.1f" % (d["end"]["sum_received"]["bits_per_second"] / 1e6))' \
        "$WORK/iperf.json"
}

run_backend() { # backend; prints "h2g g2h rtt_min rtt_avg rtt_max"
    local backend=$1
    ip netns add "$NS"
    ip netns exec "$NS" ip link set lo up
    case $backend in
    vsnoop)
        [[ -x $VSNOOP ]] || die "$VSNOOP not built (cargo build --release)"
        ip netns exec "$NS" env RUST_LOG=${RUST_LOG:-info} "$VSNOOP" \
            --socket "$WORK/vhost.sock" --tap "$TAP" 2>"$WORK/vsnoop.log" >/dev/null &
        echo $! >>"$PIDFILE"
        wait_for 20 "vsnoop 'listening on'" grep -q "listening on" "$WORK/vsnoop.log"
        ;;
    qemu-tap)
        ip netns exec "$NS" ip tuntap add dev "$TAP" mode tap
        ;;
    esac
    ip netns exec "$NS" ip addr add "$HOST_IP/24" dev "$TAP"
    ip netns exec "$NS" ip link set "$TAP" up
    : >"$WORK/console.log"
    start_qemu "$backend"
    log "  $backend: booting the guest"
    wait_for 180 "the guest (VSNOOP-GUEST-READY)" guest_ready
    wait_for 60 "ping to the guest" ip netns exec "$NS" "${PING[@]}" -c 1 -W 1 "$GUEST_IP"
    log "  $backend: ping x$PINGS"
    local rtt
    rtt=$(ip netns exec "$NS" "${PING[@]}" -q -c "$PINGS" -i 0.2 "$GUEST_IP" \
        | awk -F' = ' '/^rtt|^round-trip/ { split($2, v, "/"); print v[1] + 0, v[2] + 0, v[3] + 0 }')
    [[ -n $rtt ]] || die "no ping summary"
    log "  $backend: iperf3 host->guest ${IPERF_TIME}s"
    local h2g g2h
    h2g=$(iperf_mbps)
    log "  $backend: iperf3 guest->host ${IPERF_TIME}s"
    g2h=$(iperf_mbps -R)
    if [[ $backend == vsnoop ]]; then
        local pid
        pid=$(head -1 "$PIDFILE")
        kill -USR1 "$pid" 2>/dev/null || true
        sleep 0.5
        log "  vsnoop counters: $(grep 'vsnoop-stats queue' "$WORK/vsnoop.log" | tail -1 | cut -c1-200)"
    fi
    stop_all
    echo "$h2g $g2h $rtt"
}

mkdir -p "$(dirname "$RESULTS")"
declare -A R
for backend in $BACKENDS; do
    log "running $backend"
    set +e
    (
        set -e
        trap stop_all EXIT
        trap 'exit 130' INT TERM
        run_backend "$backend" >"$WORK/result"
    )
    rc=$?
    set -e
    ((rc == 130)) && exit 130
    if ((rc == 0)); then
        read -r h2g g2h rmin ravg rmax <"$WORK/result"
        R[$backend,h2g]=$h2g R[$backend,g2h]=$g2h R[$backend,rmin]=$rmin R[$backend,ravg]=$ravg R[$backend,rmax]=$rmax
        log "  -> host->guest $h2g Mbit/s, guest->host $g2h Mbit/s, ping min/avg/max $rmin/$ravg/$rmax ms"
    else
        keep="${RESULTS%.md}-logs/$backend"
        mkdir -p "$keep"
        cp "$WORK"/*.log "$WORK"/*.stderr "$keep"/ 2>/dev/null || true
        log "  -> FAILED ($backend); logs in $keep"
    fi
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else print "-" }'; }
row() { # label key unit
    local v=${R[vsnoop,$2]:-n/m} q=${R[qemu-tap,$2]:-n/m}
    echo "| $1 | $v | $q | $(ratio "$v" "$q") |"
}
{
    echo "### guest-iperf: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, $(uname -r), TCG guest, iperf3 ${IPERF_TIME}s, $PINGS pings"
    echo
    echo "| metric | vsnoop | QEMU tap (vhost=off) | vsnoop/QEMU |"
    echo "|---|---:|---:|---:|"
    row "iperf3 host->guest (Mbit/s)" h2g
    row "iperf3 guest->host (Mbit/s)" g2h
    row "ping RTT min (ms)" rmin
    row "ping RTT avg (ms)" ravg
    row "ping RTT max (ms)" rmax
} | tee "$RESULTS"
log "results written to $RESULTS"
