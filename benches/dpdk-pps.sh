#!/usr/bin/env bash
# Packet-rate benchmark of a vhost-user net backend driven by DPDK virtio-user,
# vsnoop side by side with DPDK's own vhost backend (net_vhost <-> net_tap, io
# forwarding) on the same TAP path, in the same run.
#
#   guest->TAP (g2t): testpmd A (net_virtio_user, txonly) -> backend -> TAP.
#                     Rate = the TAP's kernel RX counters (frames the backend
#                     wrote into the tap) over a fixed window.
#   TAP->guest (t2g): testpmd C (net_af_packet on the TAP, txonly) -> TAP ->
#                     backend -> testpmd A (net_virtio_user, rxonly).
#                     Rate = testpmd A's RX counters over a fixed window.
#
# CPU placement (2 cores): the backend's data path owns CPU 1 (vsnoop is pinned
# there as a whole; DPDK's backend has its forwarding lcore on CPU 1 and its
# idle main lcore on CPU 0). testpmd A's forwarding lcore (and C's) run on
# CPU 0, their idle main lcores on CPU 1.
#
# Everything runs inside a private network namespace that is removed at the
# end, also on failure. Only processes this script started are signalled.
#
# Usage: benches/dpdk-pps.sh [results-file]
# Environment: BACKENDS="dpdk vsnoop" (add vsnoop-capture for the capture overhead,
#              vsnoop-notiming for the cost of timestamps and attribution: a build
#              with `--no-default-features`, made on first use in target/notiming)
#              DIRS="g2t t2g"  SIZES="64 1500 65280"
#              DURATION=5 (seconds measured)  WARMUP=2  VSNOOP=target/release/vsnoop
#              VSNOOP_NOTIMING=target/notiming/release/vsnoop
#              REPEAT=3 (rounds; each round measures every backend once, back to
#              back, and the table reports the median round per cell)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BACKENDS=${BACKENDS:-"dpdk vsnoop"}
DIRS=${DIRS:-"g2t t2g"}
SIZES=${SIZES:-"64 1500 65280"}
DURATION=${DURATION:-5}
REPEAT=${REPEAT:-3}
WARMUP=${WARMUP:-2}
VSNOOP=${VSNOOP:-$ROOT/target/release/vsnoop}
VSNOOP_NOTIMING=${VSNOOP_NOTIMING:-$ROOT/target/notiming/release/vsnoop}
RESULTS=${1:-$ROOT/target/bench-results/dpdk-pps-$(date +%Y%m%d-%H%M%S).md}
TAG="vsb$$"
WORK=$(mktemp -d "/tmp/vsnoop-dpdk-pps.XXXXXX")
NS="${TAG}n"
TAP="${TAG}t"
PIDFILE="$WORK/pids"
: >"$PIDFILE"

BENCH_NAME=dpdk-pps
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Stops every process this script started (their PIDs are in $PIDFILE), then
# removes the namespace and DPDK's runtime directories for our file prefixes.
stop_all() {
    local pid
    if [[ -s $PIDFILE ]]; then
        while read -r pid; do stop_pid "$pid"; done <"$PIDFILE"
    fi
    : >"$PIDFILE"
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "/var/run/dpdk/${TAG}A" "/var/run/dpdk/${TAG}B" "/var/run/dpdk/${TAG}C"
}

cleanup() {
    local rc=$?
    stop_all
    if [[ $rc -ne 0 ]]; then
        log "failed (rc=$rc); logs kept in $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in dpdk-testpmd ip taskset stdbuf awk; do
    command -v "$tool" >/dev/null || die "required tool $tool is missing"
done

# testpmd NAME MAIN_CPU FWD_CPU EAL-ARGS... -- APP-ARGS...
# Runs testpmd non-interactively (auto-start, 1 s periodic stats) inside $NS
# with line-buffered output in $WORK/NAME.log; the PID goes to $PIDFILE.
testpmd() {
    local name=$1 main=$2 fwd=$3; shift 3
    local prefix="$TAG$name"
    ip netns exec "$NS" stdbuf -oL dpdk-testpmd --no-pci --no-huge -m 1024 \
        --file-prefix "$prefix" --lcores "0@$main,1@$fwd" --log-level=user1,info "$@" \
        </dev/null >"$WORK/$name.log" 2>&1 &
    echo $! >>"$PIDFILE"
    eval "PID_$name=$!"
}

nsread() { ip netns exec "$NS" cat "/sys/class/net/$1/statistics/$2"; }


# Latest cumulative "RX-packets"/"RX-bytes" (or TX-) of port 0 from testpmd A's
# periodic statistics.
pmd_counter() { # logfile RX|TX packets|bytes
    awk -v want="$2-$3:" '
        /NIC statistics for port 0|Port statistics/ { inport = 1 }
        /NIC statistics for port 1/ { inport = 0 }
        inport { for (i = 1; i < NF; i++) if ($i == want) v = $(i + 1) }
        END { printf "%.0f\n", v + 0 }' "$1"
}

now() { date +%s.%N; }

# CPU time (user + system, all threads, in clock ticks) of a process so far.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }

# Predicates for wait_for (evaluated afresh on every poll).
tap_rx_over() { (($(nsread "$TAP" rx_packets) > $1)); }
pmd_rx_over() { (($(pmd_counter "$WORK/A.log" RX packets) > $1)); }
ticks_at_least() { (($(grep -c "Port statistics" "$WORK/A.log") >= $1)); }

txpkts_arg() { # frame size -> --txpkts segments (<= 2040 B each)
    local size=$1 segs=() left=$1
    while ((left > 2040)); do segs+=(2040); left=$((left - 2040)); done
    segs+=("$left")
    local IFS=,
    echo "--txpkts=${segs[*]}"
}

start_backend() { # backend size
    local backend=$1 size=$2
    local sock="$WORK/vhost.sock"
    rm -f "$sock"
    case $backend in
    dpdk)
        testpmd B 0 1 --vdev "net_vhost0,iface=$sock,queues=1" --vdev "net_tap0,iface=$TAP" \
            -- --forward-mode=io --auto-start --stats-period 1 --total-num-mbufs=32768
        wait_for 30 "DPDK vhost socket" test -S "$sock"
        ;;
    vsnoop | vsnoop-capture | vsnoop-notiming)
        local bin=$VSNOOP capture=()
        [[ $backend == vsnoop-notiming ]] && bin=$VSNOOP_NOTIMING
        [[ -x $bin ]] || die "$bin not built (cargo build --release)"
        if [[ $backend == vsnoop-capture ]]; then
            # pcapng capture at both vantage points, 128 bytes per frame
            capture=(--capture "$WORK/capture.pcapng" --capture-snaplen 128)
        fi
        rm -f "$WORK/capture.pcapng"
        ip netns exec "$NS" env RUST_LOG=${RUST_LOG:-info} taskset -c 1 "$bin" \
            --socket "$sock" --tap "$TAP" "${capture[@]}" >"$WORK/vsnoop.out" 2>"$WORK/vsnoop.log" &
        echo $! >>"$PIDFILE"
        PID_V=$!
        wait_for 30 "vsnoop 'listening on'" grep -q "listening on" "$WORK/vsnoop.log"
        ;;
    esac
    wait_for 30 "tap $TAP" ip netns exec "$NS" ip link show "$TAP"
    ip netns exec "$NS" ip link set "$TAP" up
    if ((size > 1500)); then ip netns exec "$NS" ip link set "$TAP" mtu 65521; fi
}

backend_ready() { # backend
    case $1 in
    dpdk) grep -q "virtio is now ready for processing" "$WORK/B.log" ;;
    vsnoop*) grep -q "frontend connected" "$WORK/vsnoop.log" ;;
    esac
}

vsnoop_stats() { # -> prints summed key=value pairs
    [[ -n ${PID_V:-} ]] || return 0
    local before
    before=$(grep -c "vsnoop-stats-end" "$WORK/vsnoop.log" || true)
    kill -USR1 "$PID_V" 2>/dev/null || return 0
    local i
    for i in $(seq 50); do
        (($(grep -c "vsnoop-stats-end" "$WORK/vsnoop.log" || true) > before)) && break
        sleep 0.1
    done
    awk '/vsnoop-stats-begin/ { delete s } /vsnoop-stats / {
            for (i = 1; i <= NF; i++) if ($i ~ /^[a-z_]+=[0-9]+$/) { split($i, kv, "="); if (kv[1] != "queue") s[kv[1]] += kv[2] } }
         END { for (k in s) printf "%s=%.0f ", k, s[k]; print "" }' "$WORK/vsnoop.log"
}

# One measurement; prints "Mpps Gbit/s frames cpu" (Gbit/s on the Ethernet
# frame bytes; cpu: vsnoop's CPU time per frame in the window, in
# microseconds, user + system over all its threads, "-" for DPDK). On a
# shared machine the CPU time per frame is steadier than the rate: it does
# not count the time vsnoop waited for a CPU.
run_case() { # backend dir size
    local backend=$1 dir=$2 size=$3
    PID_V=""
    ip netns add "$NS"
    ip netns exec "$NS" ip link set lo up
    start_backend "$backend" "$size"
    local vu="net_virtio_user0,path=$WORK/vhost.sock,queues=1,mrg_rxbuf=1"
    # Frames above 1500 B: testpmd A receives them scattered over 2 KiB mbufs
    # (virtio's largest --max-pkt-len is 9728, but with mergeable buffers the
    # PMD does not check it on receive); generator C needs mbufs and
    # PACKET_MMAP frames that hold a whole frame.
    local big=() gen=(--total-num-mbufs=32768 "$(txpkts_arg "$size")")
    if ((size > 1500)); then
        big=(--enable-scatter --max-pkt-len=9728)
        gen=(--mbuf-size=65535 --total-num-mbufs=2048 "--txpkts=$size")
    fi
    local p0 p1 b0 b1 t0 t1 c0=0 c1=0
    if [[ $dir == g2t ]]; then
        testpmd A 1 0 --vdev "$vu" -- --forward-mode=txonly --auto-start --stats-period 1 \
            --total-num-mbufs=32768 "$(txpkts_arg "$size")"
        wait_for 60 "backend ready" backend_ready "$backend"
        wait_for 60 "frames on the tap" tap_rx_over 1000
        sleep "$WARMUP"
        [[ -n $PID_V ]] && c0=$(cpu_ticks "$PID_V")
        t0=$(now); p0=$(nsread "$TAP" rx_packets); b0=$(nsread "$TAP" rx_bytes)
        sleep "$DURATION"
        t1=$(now); p1=$(nsread "$TAP" rx_packets); b1=$(nsread "$TAP" rx_bytes)
        [[ -n $PID_V ]] && c1=$(cpu_ticks "$PID_V")
    else
        testpmd A 1 0 --vdev "$vu" -- --forward-mode=rxonly --auto-start --stats-period 1 \
            --total-num-mbufs=32768 "${big[@]}"
        wait_for 60 "backend ready" backend_ready "$backend"
        local afp="net_af_packet0,iface=$TAP,qpairs=1"
        ((size > 1500)) && afp+=",blocksz=65536,framesz=65424,framecnt=64"
        testpmd C 1 0 --vdev "$afp" -- --forward-mode=txonly --auto-start --stats-period 1 "${gen[@]}"
        wait_for 30 "frames at testpmd A" pmd_rx_over 1000
        sleep "$WARMUP"
        # The periodic statistics tick once per second: sample right after a tick.
        local n0
        n0=$(grep -c "Port statistics" "$WORK/A.log" || true)
        wait_for 5 "stats tick" ticks_at_least $((n0 + 1))
        sleep 0.05
        [[ -n $PID_V ]] && c0=$(cpu_ticks "$PID_V")
        t0=$(now); p0=$(pmd_counter "$WORK/A.log" RX packets); b0=$(pmd_counter "$WORK/A.log" RX bytes)
        n0=$(grep -c "Port statistics" "$WORK/A.log" || true)
        wait_for $((DURATION + 5)) "stats tick" ticks_at_least $((n0 + DURATION))
        sleep 0.05
        t1=$(now); p1=$(pmd_counter "$WORK/A.log" RX packets); b1=$(pmd_counter "$WORK/A.log" RX bytes)
        [[ -n $PID_V ]] && c1=$(cpu_ticks "$PID_V")
        # the periodic stats are exact 1 s ticks: use the tick count as the window
        t1=$(awk -v a="$t0" -v d="$DURATION" 'BEGIN { printf "%.6f", a + d }')
    fi
    local extra=""
    if [[ $backend == vsnoop* ]]; then extra=$(vsnoop_stats); fi
    local tapinfo
    tapinfo="tap rx=$(nsread "$TAP" rx_packets) tx=$(nsread "$TAP" tx_packets) tx_dropped=$(nsread "$TAP" tx_dropped)"
    stop_all
    if [[ -n ${KEEP_LOGS:-} ]]; then
        mkdir -p "$KEEP_LOGS/$backend-$dir-$size"
        cp "$WORK"/*.log "$KEEP_LOGS/$backend-$dir-$size/"
    fi
    log "  $backend $dir $size: $((p1 - p0)) frames in window; $tapinfo ${extra}"
    awk -v p="$((p1 - p0))" -v b="$((b1 - b0))" -v t0="$t0" -v t1="$t1" \
        -v c="$((c1 - c0))" -v hz="$(getconf CLK_TCK)" -v v="${PID_V:-}" \
        'BEGIN { dt = t1 - t0; printf "%.4f %.4f %d %s\n", p / dt / 1e6, b * 8 / dt / 1e9, p,
                 (v != "" && p > 0) ? sprintf("%.3f", c / hz * 1e6 / p) : "-" }'
}

mkdir -p "$(dirname "$RESULTS")"
if [[ " $BACKENDS " == *" vsnoop-notiming "* && ! -x $VSNOOP_NOTIMING ]]; then
    log "building vsnoop without the timing feature into target/notiming"
    (cd "$ROOT" && cargo build --release --no-default-features --target-dir target/notiming) >&2
fi
declare -A MPPS GBPS RUNS FAILED CPUS CPU

median() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }

for dir in $DIRS; do
    for size in $SIZES; do
        for round in $(seq "$REPEAT"); do
            for backend in $BACKENDS; do
                key="$backend,$dir,$size"
                if [[ $backend == dpdk ]] && ((size > 1522)); then
                    # net_tap's largest frame is 1522 B (it refuses --max-pkt-len
                    # above that and drops longer frames on TX): not measurable.
                    FAILED[$key]="n/a"
                    ((round == 1)) && log "skipping dpdk $dir $size B: DPDK's net_tap carries frames of at most 1522 B"
                    continue
                fi
                [[ -n ${FAILED[$key]:-} ]] && continue
                log "round $round/$REPEAT: $backend $dir ${size} B (warm-up ${WARMUP}s, window ${DURATION}s)"
                # Each case runs in a subshell with its own cleanup so that a
                # failing backend still lets the other rows be measured.
                set +e
                (
                    set -e
                    trap stop_all EXIT
                    trap 'exit 130' INT TERM
                    run_case "$backend" "$dir" "$size" >"$WORK/result"
                )
                rc=$?
                set -e
                ((rc == 130)) && exit 130
                if ((rc == 0)); then
                    read -r mpps gbps _ cpu <"$WORK/result"
                    RUNS[$key]+="$mpps/$gbps "
                    [[ $cpu != - ]] && CPUS[$key]+="$cpu "
                    log "  -> $mpps Mpps, $gbps Gbit/s, CPU ${cpu} us/frame"
                else
                    FAILED[$key]="failed"
                    keep="${RESULTS%.md}-logs/$backend-$dir-$size"
                    mkdir -p "$keep"
                    cp "$WORK"/*.log "$keep"/ 2>/dev/null || true
                    log "  -> FAILED ($backend $dir $size); logs in $keep"
                fi
            done
        done
        for backend in $BACKENDS; do
            key="$backend,$dir,$size"
            if [[ -n ${FAILED[$key]:-} ]]; then
                MPPS[$key]=${FAILED[$key]}; GBPS[$key]=${FAILED[$key]}
            elif [[ -n ${RUNS[$key]:-} ]]; then
                # the median round by packet rate, and that round's Gbit/s
                MPPS[$key]=$(echo "${RUNS[$key]}" | tr ' ' '\n' | cut -d/ -f1 | tr '\n' ' ' | median)
                GBPS[$key]=$(echo "${RUNS[$key]}" | tr ' ' '\n' | awk -F/ -v m="${MPPS[$key]}" '$1 == m { print $2; exit }')
                CPU[$key]=$(echo "${CPUS[$key]:-}" | median)
                log "$key rounds (Mpps/Gbit/s): ${RUNS[$key]}; CPU us/frame: ${CPUS[$key]:-}"
            fi
        done
    done
done

dirname_of() { [[ $1 == g2t ]] && echo "guest->TAP" || echo "TAP->guest"; }

# overhead_table WITH WITHOUT TITLE: the packet rate with a feature (backend
# WITH) over the rate without it (backend WITHOUT), when both were measured;
# and vsnoop's CPU time per frame (median round) without and with it.
overhead_table() {
    local with=$1 without=$2 title=$3 dir size w o ratio cw co cratio
    [[ " $BACKENDS " == *" $with "* && " $BACKENDS " == *" $without "* ]] || return 0
    echo
    echo "$title:"
    echo
    echo "| direction | frame (B) | $without Mpps | $with Mpps | with/without | $without CPU us/frame | $with CPU us/frame | CPU without/with |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    for dir in $DIRS; do
        for size in $SIZES; do
            w=${MPPS[$with,$dir,$size]:-n/m}; o=${MPPS[$without,$dir,$size]:-n/m}
            ratio=$(awk -v w="$w" -v o="$o" 'BEGIN { if (w + 0 > 0 && o + 0 > 0) printf "%.3f", w / o; else print "-" }')
            cw=${CPU[$with,$dir,$size]:-n/m}; co=${CPU[$without,$dir,$size]:-n/m}
            cratio=$(awk -v w="$cw" -v o="$co" 'BEGIN { if (w + 0 > 0 && o + 0 > 0) printf "%.3f", o / w; else print "-" }')
            echo "| $(dirname_of "$dir") | $size | $o | $w | $ratio | $co | $cw | $cratio |"
        done
    done
}
{
    echo "### dpdk-pps: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, $(uname -r), window ${DURATION}s, median of $REPEAT rounds"
    echo
    echo "| direction | frame (B) | vsnoop Mpps | vsnoop Gbit/s | DPDK vhost Mpps | DPDK vhost Gbit/s | vsnoop/DPDK |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for dir in $DIRS; do
        for size in $SIZES; do
            v=${MPPS[vsnoop,$dir,$size]:-n/m}; vg=${GBPS[vsnoop,$dir,$size]:-n/m}
            d=${MPPS[dpdk,$dir,$size]:-n/m}; dg=${GBPS[dpdk,$dir,$size]:-n/m}
            ratio=$(awk -v v="$v" -v d="$d" 'BEGIN { if (v + 0 > 0 && d + 0 > 0) printf "%.2f", v / d; else print "-" }')
            echo "| $(dirname_of "$dir") | $size | $v | $vg | $d | $dg | $ratio |"
        done
    done
    overhead_table vsnoop-capture vsnoop "Capture overhead (\`--capture FILE --capture-snaplen 128\`, both vantage points)"
    overhead_table vsnoop vsnoop-notiming "Timing overhead (default build, timestamps and attribution on, vs \`--no-default-features\`: compiled out)"
    echo
    echo "Rounds (Mpps/Gbit/s; vsnoop's CPU us/frame):"
    for key in "${!RUNS[@]}"; do echo "- $key: ${RUNS[$key]}${CPUS[$key]:+; CPU ${CPUS[$key]}}"; done | sort
} | tee "$RESULTS"
log "results written to $RESULTS"
