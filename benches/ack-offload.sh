#!/usr/bin/env bash
# vSnoop's experiment (Kangarlou et al., SC 2010, section V-C and Figure 5)
# replayed with a TCG guest: many successive TCP transfers from the host side
# of the tap to the guest, each on a new connection, timed from the first byte
# sent to the guest application's reply that it got every byte, with
#
#   configurations  vanilla  QEMU's own tap backend (-netdev tap,vhost=off)
#                   off      vsnoop --ack-offload off
#                   on       vsnoop --ack-offload on
#   contention      none       1/1: nothing throttled
#                   cgP/Q      QEMU's threads in a cgroup-v1 cpu group with
#                              cfs_period P ms and cfs_quota Q ms while the
#                              guest runs a busy loop of its own
#                              (vsnoop.busy=1): cg30/10 = a third of a core in
#                              slices (three busy VMs on a core), cg30/6 = the
#                              five-VMs-per-core equivalent
#                   stopR/S    QEMU stopped and continued (SIGSTOP/SIGCONT):
#                              R ms running, S ms stopped (stop10/20)
#                   rrS/N      a VM sharing a core with N busy VMs, as under
#                              Xen's credit scheduler: QEMU's vCPU thread and N
#                              busy loops on one CPU (RR_CPU), all SCHED_RR
#                              with an S ms time slice (rr30/2 = the paper's
#                              receiver beside two busy VMs). A guest that
#                              idles gives up the CPU and, when a packet wakes
#                              it, waits behind the busy loops' slices: one
#                              wait per guest turnaround, which is what early
#                              ACKs remove. QEMU's main loop (it injects the
#                              interrupts, like a hypervisor) shares RR_CPU at
#                              a higher SCHED_RR priority (RR_MAIN=1); vsnoop,
#                              the sender and QEMU's other threads are pinned
#                              to the other CPUs. RT throttling
#                              (sched_rt_runtime_us, 95 %) stays on.
#
# vsnoop (the driver domain), the sender and this script stay outside every
# throttle. With the vanilla configuration QEMU's tap backend is part of QEMU,
# so it is throttled / stopped with the guest: that is what vanilla means.
#
# The guest (scripts/build-guest.sh) runs /bin/tcpsink on port 5001: per
# connection the sender writes an 8-byte big-endian length L and L bytes; the
# sink reads them all and answers "<L> <digest>\n", then closes (DIGEST: a
# cheap Fletcher-style sum by default, SHA-256 on request). The sender here
# is a small python3 client in the namespace (a connection per transfer,
# Nagle on, header and payload in one send), which checks the length and the
# digest of every reply. Each (contention, configuration) row
# boots its own guest; rows of one contention run back to back.
#
# Also measured, unthrottled: bulk throughput host->guest (iperf3), per
# configuration (one boot each) and, on the offload-on boot, offload off/on
# alternated through the control socket (the issue's "no more than 2% loss").
#
# Outputs (OUT_DIR, default benches/results; PREFIX default ack-offload, or
# ack-offload-quick with QUICK=1):
#   PREFIX.csv        every transfer: config,contention,size_bytes,rep,seconds,mb_per_s,status
#   PREFIX.md         median / p10 / p90 MB/s per size, configuration and
#                     contention, the on/off ratio of medians, bulk throughput,
#                     and the settings of the run
#   PREFIX-cdf.svg    CDFs of the 100 KB transfers, one panel per contention
#                     (cargo run --release --example ack_cdf), like Figure 5
#   PREFIX-bulk.csv   every iperf3 run, with vsnoop's CPU time per MB received
#   PREFIX-rows/      per row: vsnoop stats (--json), cgroup cpu.stat, logs
# MB/s means 10^6 bytes per second; sizes are decimal (10K = 10 000 bytes).
#
# What dominates here (measured while building this script, offload off):
#   - With SHA-256 in the guest (DIGEST=sha256) the TCG guest's hashing
#     (~18 MB/s unthrottled) bounds every transfer of 100 KB and more, with
#     or without early ACKs; DIGEST=f64 costs a fraction of that.
#   - tcpsink forks a child per connection; under TCG the guest's accept+fork
#     costs ~5 ms of guest CPU, i.e. ~25-30 ms with a third of a core. Without
#     CONNECT_PAUSE_MS that is inside the timed window (it overlaps the data),
#     and for 10 KB it is nearly all of it: the offload cannot shorten it.
#     CONNECT_PAUSE_MS=100 takes it out (10 KB, cg30/10: ~32 ms -> ~4 ms).
#   - Back-to-back transfers lock onto the 30 ms throttle period (each starts
#     right after the guest's reply, i.e. in its run window); START_JITTER_MS
#     randomises the phase. Results on this shared 2-CPU machine are noisy.
#   - The sender is local (sub-ms RTT): within one 10 ms run window the guest
#     completes several round trips, so a transfer pays about one scheduling
#     wait per guest turnaround, not one per RTT as with Xen's dom0 on the same
#     core; the guest's 64 KB initial window bounds what can be early-ACKed
#     (GUEST_SYSCTL=net.ipv4.tcp_rmem=4096:1048576:6291456 lets it grow faster).
#
# Everything runs inside a private network namespace (10.77.0.0/24) removed
# after each row, also on failure; only processes started here are signalled,
# by PID. Each row holds the lock tests/common/guest.rs takes
# (/tmp/vsnoop-guest.lock), so the guest tests and this benchmark do not boot
# guests at the same time.
#
# Usage: benches/ack-offload.sh
# Environment (defaults in brackets):
#   CONFIGS       ["vanilla off on"]
#   CONTENTIONS   ["none cg30/10 cg30/6 stop10/20"]
#   SIZES         ["10K 100K 1M 10M"]   (K = 10^3, M = 10^6 bytes)
#   COUNT         [100]  transfers per size and row; COUNT_<size> per size, e.g.
#                        COUNT_100K=1000 (the paper's count). 10 MB transfers take
#                        0.2-0.5 s each throttled with the f64 digest: 100 in each
#                        of the 12 default rows take about 8 min
#   WARMUP        [3]    unrecorded transfers per row before the first size
#   QUICK=1       smoke run: COUNT=5, 1 bulk run of 3 s, PREFIX ack-offload-quick
#   BULK_REPS     [3]    iperf3 runs per configuration (none rows); 0 = no bulk
#   XFER_AB       [0]    also N transfers per size and offload state in pairs on
#                        the offload-on boot of every contention, the offload
#                        switched off/on through the control socket before each
#                        transfer (untimed) in ABBA order: the per-pair on/off
#                        ratio cancels the boot and the machine's drift (own
#                        table in PREFIX.md; CSV configs ab-off / ab-on, and
#                        ab@off-off / ab@off-on on the boot of configuration
#                        off when XFER_AB_OFF_BOOT=1). With COUNT=0 and
#                        CONFIGS=on only the pairs are measured
#   XFER_AB_OFF_BOOT [0] the pairs also on the boot started with --ack-offload off
#   BULK_AB       [1]    also alternate offload off/on (control socket) on the
#                        offload-on boot, BULK_REPS pairs
#   BULK_PER_BOOT [1]    0: on the boot that runs those pairs, only the pairs
#                        (the per-boot runs take a third of the time)
#   IPERF_TIME    [10]   seconds per iperf3 run
#   BULK_PERF     [0]    1: perf record -g on vsnoop during every bulk run, and
#                        split its CPU per MB into the host network stack's
#                        share (samples under tcp_v4_rcv / tcp_v6_rcv or softirq
#                        handling: the kernel runs the local sender's ACK
#                        processing, and the segments that ACK releases,
#                        inside vsnoop's tap write; column host_stack_us_per_mb)
#                        and the parts of PERF_SPLIT (column perf_us_per_mb)
#   BUSY_CG       [1]    guest busy loop (vsnoop.busy=1) in cg rows
#   BUSY_STOP     [0]    guest busy loop in stop rows
#   PIN_QEMU      [""]   CPU list for QEMU (taskset -a), e.g. 1
#   PIN_HOST      [""]   CPU list for vsnoop, the sender and iperf3, e.g. 0
#   RR_CPU        [last CPU] the CPU rr rows share between QEMU and the busy loops
#   RR_MAIN       [1]    rr rows: QEMU's main loop on RR_CPU at SCHED_RR priority 2
#                        (above the vCPU and the busy loops). With 0 it runs on the
#                        other CPUs: then the vCPU thread blocks on QEMU's big lock
#                        whenever the main loop holds it (interrupt injection,
#                        timers), and under SCHED_RR every block sends it behind
#                        the busy loops again, 60 ms each time (perf sched timehist:
#                        4-9 such waits per 100 KB transfer, which no hypervisor
#                        imposes on a guest; 100 KB medians off 0.11, on 0.21 MB/s
#                        against 0.99 and 3.1 with RR_MAIN=1)
#   GUEST_SYSCTL  [""]   space-separated KEY=VALUE sysctls for the guest (kernel
#                        cmdline vsnoop.sysctl=K=V,K=V; ':' stands for a space in a
#                        value), e.g. "net.ipv4.tcp_rmem=4096:1048576:4194304"
#   SINK_ARGS     [""]   extra tcpsink options (vsnoop.sinkargs), e.g. "-c 1048576"
#   DIGEST        [f64]  what the sink computes over the bytes and the sender checks:
#                        f64 (tcpsink -k f64, a Fletcher-style sum, cheap under TCG)
#                        or sha256 (costs the TCG guest ~50 ms of CPU per MB, which
#                        then bounds every transfer, offload or not)
#   CONNECT_PAUSE_MS [100] pause between connect() and the first byte (untimed), so
#                        the guest's accept() and per-connection fork are done
#   START_JITTER_MS [30] random untimed wait (uniform 0..J ms) before each connect,
#                        so transfers start at random phases of the throttle period
#                        (without it, back-to-back transfers lock onto the period)
#   GUEST_APPEND  [""]   more kernel command line words
#   HOST_SYSCTL   ["net.ipv4.tcp_no_metrics_save=1"] sysctls of the namespace
#                        (each transfer starts from a clean slow start)
#   SENDER_CC     [cubic] the sender's congestion control, set per socket
#                        (TCP_CONGESTION; iperf3 -C): cubic is Linux's default
#                        and what the paper's senders ran (BIC/CUBIC). A machine
#                        whose default is bbr (this one's is) would otherwise
#                        measure a pacing sender: BBR spreads its sends at a rate
#                        estimated from the guest's delayed ACKs, so the guest
#                        idles between them and waits for its CPU once per send
#   SENDER_DELAY_MS [""] one-way delay added to the sender's frames toward the
#                        guest (a remote sender across a WAN): the tap joins a bridge
#                        with tests/tools/tapnetem.py, which holds each frame this
#                        long (user space: this kernel has no sch_netem), and the
#                        host address moves to tapnetem's other tap. Adds its own
#                        lateness (printed per row); use with BULK_REPS=0
#   SENDER_INITCWND [""] initial congestion window of the sender in segments
#                        (ip route ... initcwnd N in the namespace; empty: the
#                        kernel's, 10 since Linux 2.6.39). 3 or 4 is what the
#                        paper's 2010 senders used (RFC 3390)
#   VSNOOP_ARGS   [""]   extra vsnoop arguments (e.g. a window bound option)
#   DEVICE_OPTS   [""]   extra properties of the guest's virtio-net-pci device,
#                        e.g. "guest_tso4=off,guest_tso6=off": the tap then hands
#                        over single segments, not 64 KB super-segments
#   OUT_DIR PREFIX PLOT=0 (no SVG)  LOCK=0 (no guest lock)
#   VSNOOP=target/release/vsnoop  VSNOOP_GUEST_DIR=target/guest
#   TCPSINK       [guest]  "standin": development aid only, when the guest
#                        image has no /bin/tcpsink yet: adds a busybox-shell
#                        sink on port 5001 through a second initramfs archive
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    COUNT=${COUNT:-5}
    BULK_REPS=${BULK_REPS:-1}
    IPERF_TIME=${IPERF_TIME:-3}
    WARMUP=${WARMUP:-1}
    PREFIX=${PREFIX:-ack-offload-quick}
fi
CONFIGS=${CONFIGS:-"vanilla off on"}
CONTENTIONS=${CONTENTIONS:-"none cg30/10 cg30/6 stop10/20"}
SIZES=${SIZES:-"10K 100K 1M 10M"}
COUNT=${COUNT:-100}
WARMUP=${WARMUP:-3}
BULK_REPS=${BULK_REPS:-3}
BULK_AB=${BULK_AB:-1}
BULK_PER_BOOT=${BULK_PER_BOOT:-1}
XFER_AB=${XFER_AB:-0}
XFER_AB_OFF_BOOT=${XFER_AB_OFF_BOOT:-0}
IPERF_TIME=${IPERF_TIME:-10}
BULK_PERF=${BULK_PERF:-0}
BUSY_CG=${BUSY_CG:-1}
BUSY_STOP=${BUSY_STOP:-0}
PIN_QEMU=${PIN_QEMU:-}
PIN_HOST=${PIN_HOST:-}
RR_CPU=${RR_CPU:-$(($(nproc) - 1))}
RR_MAIN=${RR_MAIN:-1}
RR_SLICE_SAVED=$(cat /proc/sys/kernel/sched_rr_timeslice_ms)
RR_HOGS=""
ROW_PIN=""
GUEST_SYSCTL=${GUEST_SYSCTL:-}
SINK_ARGS=${SINK_ARGS:-}
DIGEST=${DIGEST:-f64}
CONNECT_PAUSE_MS=${CONNECT_PAUSE_MS:-100}
START_JITTER_MS=${START_JITTER_MS:-30}
GUEST_APPEND=${GUEST_APPEND:-}
HOST_SYSCTL=${HOST_SYSCTL-net.ipv4.tcp_no_metrics_save=1}
SENDER_INITCWND=${SENDER_INITCWND:-}
SENDER_CC=${SENDER_CC:-cubic}
SENDER_DELAY_MS=${SENDER_DELAY_MS:-}
[[ -z $SENDER_DELAY_MS || $SENDER_DELAY_MS =~ ^[0-9]+(\.[0-9]+)?$ ]] \
    || { echo "SENDER_DELAY_MS must be a number of milliseconds, got '$SENDER_DELAY_MS'" >&2; exit 2; }
grep -qw -- "$SENDER_CC" /proc/sys/net/ipv4/tcp_available_congestion_control \
    || { echo "SENDER_CC=$SENDER_CC is not available here ($(cat /proc/sys/net/ipv4/tcp_available_congestion_control))" >&2; exit 2; }
[[ -z $SENDER_INITCWND || $SENDER_INITCWND =~ ^[1-9][0-9]*$ ]] \
    || { echo "SENDER_INITCWND must be a number of segments, got '$SENDER_INITCWND'" >&2; exit 2; }
VSNOOP_ARGS=${VSNOOP_ARGS:-}
DEVICE_OPTS=${DEVICE_OPTS:-}
OUT_DIR=${OUT_DIR:-$ROOT/benches/results}
PREFIX=${PREFIX:-ack-offload}
PLOT=${PLOT:-1}
LOCK=${LOCK:-1}
TCPSINK=${TCPSINK:-guest}
# the system python starts faster than a pyenv shim
PYTHON=${PYTHON:-$(command -v /usr/bin/python3 || command -v python3)}
VSNOOP=${VSNOOP:-$ROOT/target/release/vsnoop}
GUEST=${VSNOOP_GUEST_DIR:-$ROOT/target/guest}
SINK_PORT=5001
TAG="vao$$"
NS="${TAG}n"
TAP="${TAG}t"
CGROUP=/sys/fs/cgroup/cpu/vsnoop-$TAG
HOST_IP=10.77.0.1
GUEST_IP=10.77.0.2
WORK=$(mktemp -d "/tmp/vsnoop-ack-offload.XXXXXX")
PIDFILE="$WORK/pids"
: >"$PIDFILE"
CSV="$OUT_DIR/$PREFIX.csv"
BULK_CSV="$OUT_DIR/$PREFIX-bulk.csv"
MD="$OUT_DIR/$PREFIX.md"
SVG="$OUT_DIR/$PREFIX-cdf.svg"
ROWDIR="$OUT_DIR/$PREFIX-rows"

BENCH_NAME=ack-offload
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Stops this row's processes, newest first (the SIGSTOP cycler before QEMU),
# removes the namespace and the cgroup, releases the guest lock.
stop_all() {
    local pid
    if [[ -s $PIDFILE ]]; then
        for pid in $(tac "$PIDFILE"); do stop_pid "$pid"; done
    fi
    : >"$PIDFILE"
    RR_HOGS=""
    echo "$RR_SLICE_SAVED" >/proc/sys/kernel/sched_rr_timeslice_ms 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    if [[ -d $CGROUP ]]; then
        for i in $(seq 50); do rmdir "$CGROUP" 2>/dev/null && break; sleep 0.1; done
    fi
    exec 9>&-
}

cleanup() {
    local rc=$?
    stop_all
    if [[ $rc -ne 0 ]]; then log "failed (rc=$rc); logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in qemu-system-x86_64 iperf3 ip python3 busybox taskset flock; do
    command -v "$tool" >/dev/null || die "required tool $tool is missing"
done
if [[ $BULK_PERF == 1 ]]; then
    command -v perf >/dev/null || die "BULK_PERF=1 needs perf (apt-get install linux-perf)"
fi
for c in $CONFIGS; do
    case $c in vanilla | off | on) ;; *) die "unknown configuration '$c' (vanilla, off, on)" ;; esac
done
for c in $CONTENTIONS; do
    [[ $c == none || $c =~ ^(cg|stop|rr)[0-9]+/[0-9]+$ ]] \
        || die "unknown contention '$c' (none, cgP/Q, stopR/S, rrS/N; milliseconds)"
    if [[ $c == rr* ]]; then
        (($(nproc) > 1)) || die "$c needs two CPUs (one shared by QEMU and the busy loops)"
        command -v chrt >/dev/null || die "$c needs chrt (util-linux)"
    fi
    if [[ $c == cg* && ! -d /sys/fs/cgroup/cpu ]]; then
        die "$c needs the cgroup-v1 cpu controller at /sys/fs/cgroup/cpu"
    fi
done
VSNOOP_ID="not used"
if [[ " $CONFIGS " == *" off "* || " $CONFIGS " == *" on "* ]]; then
    [[ -x $VSNOOP ]] || die "$VSNOOP not built (cargo build --release)"
    # Every row runs this copy, so a rebuild during the run changes nothing.
    cp "$VSNOOP" "$WORK/vsnoop"
    VSNOOP_ID="$(sha256sum "$WORK/vsnoop" | cut -c1-12), built $(date -u -r "$VSNOOP" '+%Y-%m-%d %H:%M UTC')"
    VSNOOP="$WORK/vsnoop"
    log "vsnoop binary $VSNOOP_ID"
fi
"$ROOT/scripts/build-guest.sh" >&2

# --- the guest image and its sink ----------------------------------------------------------
INITRD="$GUEST/initramfs.gz"
SINK_APPEND=""
case $TCPSINK in
guest)
    gzip -dc "$INITRD" | cpio -t --quiet 2>/dev/null | grep -qx 'bin/tcpsink' \
        || die "the guest image has no /bin/tcpsink (scripts/build-guest.sh adds it; TCPSINK=standin is a development stand-in)"
    ;;
standin)
    # Development aid only: a second (concatenated) initramfs archive with a
    # busybox-shell sink and an rdinit that starts it, then runs the real /init.
    log "TCPSINK=standin: using a busybox-shell stand-in sink, NOT the guest's tcpsink"
    [[ $DIGEST == sha256 ]] || die "TCPSINK=standin answers SHA-256 only: set DIGEST=sha256"
    mkdir -p "$WORK/overlay/bin"
    cat >"$WORK/overlay/bin/tcpsink-standin" <<'SH'
#!/bin/sh
# one connection on stdin/stdout: 8-byte big-endian length, payload, reply
L=0
for b in $(dd bs=8 count=1 2>/dev/null | od -An -tu1); do L=$((L * 256 + b)); done
h=$(head -c "$L" | sha256sum | cut -d' ' -f1)
echo "$L $h"
SH
    cat >"$WORK/overlay/standin-init" <<SH
#!/bin/sh
/bin/busybox nc -ll -p $SINK_PORT -e /bin/tcpsink-standin </dev/null >/dev/null 2>&1 &
exec /init
SH
    chmod 0755 "$WORK/overlay/bin/tcpsink-standin" "$WORK/overlay/standin-init"
    (cd "$WORK/overlay" && find . | cpio -o -H newc --quiet -R 0:0 | gzip) >"$WORK/overlay.gz"
    cat "$INITRD" "$WORK/overlay.gz" >"$WORK/initramfs-standin.gz"
    INITRD="$WORK/initramfs-standin.gz"
    SINK_APPEND="rdinit=/standin-init"
    ;;
*) die "TCPSINK must be guest or standin" ;;
esac

# --- the plot program (built first: fail early) --------------------------------------------
size_bytes() { # 10K, 10k, 10M or 10000 -> 10000
    case $1 in
    *[kK]) echo $((${1%?} * 1000)) ;;
    *M) echo $((${1%?} * 1000000)) ;;
    *) echo "$1" ;;
    esac
}

PLOTTER=""
plot_size=0 # the plot shows the 100 KB transfers
for s in $SIZES; do
    if [[ $(size_bytes "$s") == 100000 ]]; then plot_size=1; fi
done
if [[ $PLOT == 1 && $plot_size == 0 ]]; then
    log "no 100K in SIZES: no CDF plot"
elif [[ $PLOT == 1 ]]; then
    log "building the plot program (cargo build --release --example ack_cdf)"
    if (cd "$ROOT" && cargo build --release --example ack_cdf >&2); then
        PLOTTER="$ROOT/target/release/examples/ack_cdf"
    else
        log "WARNING: cannot build examples/ack_cdf; no SVG this time (PLOT=0 to skip)"
    fi
fi

# --- python helpers --------------------------------------------------------------------------
cat >"$WORK/sender.py" <<'PY'
"""Timed transfers to the guest's tcpsink; appends one CSV line per transfer."""
import argparse, hashlib, os, random, socket, struct, subprocess, sys, time

p = argparse.ArgumentParser()
p.add_argument("--ip", required=True)
p.add_argument("--port", type=int, required=True)
p.add_argument("--csv", required=True)
p.add_argument("--config", required=True)
p.add_argument("--contention", required=True)
p.add_argument("--sizes", required=True, help="size=count,size=count,...")
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--wait", type=float, default=120, help="seconds to wait for the sink")
p.add_argument("--pause-ms", type=float, default=0, help="pause between connect and the first byte")
p.add_argument("--jitter-ms", type=float, default=0, help="random wait (0..J ms) before each connect")
p.add_argument("--seed", type=int, default=1)
p.add_argument("--digest", choices=["sha256", "f64"], default="sha256", help="what tcpsink answers")
p.add_argument("--cc", default="", help="congestion control of every connection (TCP_CONGESTION)")
p.add_argument("--ab-control", default="", help="vsnoop control socket: each rep is a pair of transfers, "
               "offload off and on (ABBA order), switched by VSNOOP ack-offload before each; "
               "config CONFIG-off / CONFIG-on")
p.add_argument("--vsnoop", default="vsnoop", help="the vsnoop binary (with --ab-control)")
a = p.parse_args()
rng = random.Random(a.seed)

def log(msg):
    print(time.strftime("[ack-offload %H:%M:%S] ") + msg, file=sys.stderr, flush=True)

def transfer(buf, size, digest, timeout):
    """Returns (seconds, status); seconds until the error for a failed transfer."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t0 = None
    try:
        if a.cc:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, a.cc.encode())
        s.settimeout(timeout)
        s.connect((a.ip, a.port))  # the handshake is not timed
        if a.pause_ms:
            time.sleep(a.pause_ms / 1e3)
        t0 = time.perf_counter()
        s.sendall(buf)  # header + payload in one write (Nagle stays on)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(512)
            if not chunk:
                break
            reply += chunk
        t1 = time.perf_counter()
    except OSError as e:
        if t0 is None:
            raise
        return time.perf_counter() - t0, "error:" + type(e).__name__
    finally:
        s.close()
    words = reply.decode(errors="replace").split()
    if len(words) != 2 or words[0] != str(size):
        return t1 - t0, "bad-reply:" + reply[:80].decode(errors="replace").strip().replace(",", ";")
    if words[1] != digest:
        return t1 - t0, "bad-hash"
    return t1 - t0, "ok"

def f64(data):
    """tcpsink's -k f64 digest: Fletcher-style sums over little-endian 64-bit words."""
    d = data + b"\0" * ((-len(data)) % 8)
    a = b = 0
    m = (1 << 64) - 1
    for w in struct.unpack(f"<{len(d) // 8}Q", d):
        a = (a + w) & m
        b = (b + a) & m
    return "f64:%016x" % (a ^ (((b << 32) | (b >> 32)) & m))

def payload(size):
    data = os.urandom(size)
    digest = f64(data) if a.digest == "f64" else hashlib.sha256(data).hexdigest()
    return struct.pack(">Q", size) + data, digest

# Wait for the sink: retry until a 1-byte transfer succeeds.
deadline = time.monotonic() + a.wait
buf, digest = payload(1)
while True:
    try:
        _, st = transfer(buf, 1, digest, 10)
        if st == "ok":
            break
        sys.exit(f"sink answers wrongly: {st}")
    except OSError as e:
        if time.monotonic() > deadline:
            sys.exit(f"sink on {a.ip}:{a.port} not answering: {e}")
        time.sleep(0.5)

plan = [(int(s), int(c)) for s, c in (w.split("=") for w in a.sizes.split(","))]
if a.warmup:
    buf, digest = payload(plan[0][0])
    for _ in range(a.warmup):
        try:
            transfer(buf, plan[0][0], digest, 60)
        except OSError:
            pass

def pct(v, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    if not v:
        return float("nan")
    k = (len(v) - 1) * q
    f = int(k)
    c = min(f + 1, len(v) - 1)
    return v[f] + (v[c] - v[f]) * (k - f)

failures = 0
with open(a.csv, "a") as out:
    for size, count in plan:
        buf, digest = payload(size)
        # generous: 20 kB/s is far below anything this setup does
        timeout = max(30.0, size / 20e3)
        rates, errors, last = {}, 0, time.monotonic()
        runs = [(rep, a.config) for rep in range(count)]
        if a.ab_control:
            # ABBA: off-on, on-off, ... so drift over the series favours neither
            runs = [(rep, f"{a.config}-{state}") for rep in range(count)
                    for state in (("off", "on") if rep % 2 == 0 else ("on", "off"))]
        for rep, config in runs:
            if a.ab_control:
                state = config.rsplit("-", 1)[1]
                subprocess.run([a.vsnoop, "ack-offload", "--control", a.ab_control, state],
                               check=True, stdout=subprocess.DEVNULL)
            if a.jitter_ms:
                # untimed: start at a random phase of the throttle's period
                time.sleep(rng.uniform(0, a.jitter_ms) / 1e3)
            try:
                secs, st = transfer(buf, size, digest, timeout)
            except OSError as e:
                secs, st = float("nan"), "error:" + type(e).__name__
            mbps = size / secs / 1e6 if st == "ok" and secs > 0 else float("nan")
            out.write(f"{config},{a.contention},{size},{rep},{secs:.6f},{mbps:.6f},{st}\n")
            if st != "ok":
                st += f" after {secs:.3f} s"
            out.flush()
            if st == "ok":
                rates.setdefault(config, []).append(mbps)
            else:
                errors += 1
                failures += 1
                log(f"    transfer {rep} of {size} B ({config}): {st}")
                if failures > 10 and failures > sum(map(len, rates.values())) // 10:
                    sys.exit(f"too many failed transfers ({failures})")
            if time.monotonic() - last > 15:
                last = time.monotonic()
                log(f"    {a.config} {a.contention} {size} B: {rep + 1}/{count}")
        for config, r in rates.items():
            r.sort()
            log(f"  {config:>7} {a.contention:<9} {size:>9} B x{len(r)}: median {pct(r, .5):8.3f} MB/s"
                f"  p10 {pct(r, .1):8.3f}  p90 {pct(r, .9):8.3f}")
        if errors:
            log(f"  {errors} transfers failed")
PY

cat >"$WORK/stopper.py" <<'PY'
"""SIGSTOP/SIGCONT cycle: run R ms, stop S ms, until SIGTERM; leaves the target running."""
import os, signal, sys, time

pid, run_ms, stop_ms = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
going = True
def end(*_):
    global going
    going = False
signal.signal(signal.SIGTERM, end)
signal.signal(signal.SIGINT, end)
t = time.monotonic()
cycles = 0
try:
    while going:
        os.kill(pid, signal.SIGCONT)
        t += run_ms / 1e3
        time.sleep(max(0.0, t - time.monotonic()))
        if not going:
            break
        os.kill(pid, signal.SIGSTOP)
        t += stop_ms / 1e3
        time.sleep(max(0.0, t - time.monotonic()))
        cycles += 1
        if t < time.monotonic() - 1:  # fell far behind (host overloaded): resynchronise
            t = time.monotonic()
except ProcessLookupError:
    pass
finally:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
print(f"stopper: {cycles} cycles", file=sys.stderr)
PY

# --- one row -------------------------------------------------------------------------------

guest_ready() {
    kill -0 "$QEMU_PID" 2>/dev/null || die "QEMU exited early: $(tail -5 "$WORK/qemu.stderr" 2>/dev/null)"
    grep -q VSNOOP-GUEST-READY "$WORK/console.log"
}

# Children never keep the guest lock (fd 9) open. Background processes are
# started directly (never through a shell function), so $! is their own PID.
host() { # runs a host-side tool in the namespace (foreground), pinned if PIN_HOST is set
    if [[ -n $ROW_PIN ]]; then
        ip netns exec "$NS" taskset -c "$ROW_PIN" "$@" 9>&-
    else
        ip netns exec "$NS" "$@" 9>&-
    fi
}

wants_busy() { # contention
    case $1 in cg*) [[ $BUSY_CG == 1 ]] ;; stop*) [[ $BUSY_STOP == 1 ]] ;; *) return 1 ;; esac
}

start_row() { # config contention
    local config=$1 contention=$2
    local append="console=ttyS0 quiet loglevel=1 panic=-1 vsnoop.ip=$GUEST_IP/24 $SINK_APPEND"
    wants_busy "$contention" && append+=" vsnoop.busy=1"
    local s
    [[ -n $GUEST_SYSCTL ]] && append+=" vsnoop.sysctl=$(tr -s ' ' ',' <<<"${GUEST_SYSCTL# }")"
    local sink_args="$SINK_ARGS"
    [[ $DIGEST == f64 ]] && sink_args+=" -k f64"
    [[ -n ${sink_args// /} ]] && append+=" vsnoop.sinkargs=$(tr -s ' ' ',' <<<"${sink_args# }")"
    append+=" $GUEST_APPEND"
    VSNOOP_PID=""
    ip netns add "$NS"
    ip netns exec "$NS" ip link set lo up
    for s in $HOST_SYSCTL; do ip netns exec "$NS" sysctl -qw "$s" >/dev/null; done
    local netdev
    case $config in
    vanilla)
        ip netns exec "$NS" ip tuntap add dev "$TAP" mode tap
        netdev=(-netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no,vhost=off")
        ;;
    off | on)
        rm -f "$WORK/vhost.sock" "$WORK/control.sock"
        : >"$WORK/vsnoop.log"
        local hpin=()
        [[ -n $ROW_PIN ]] && hpin=(taskset -c "$ROW_PIN")
        # shellcheck disable=SC2086
        ip netns exec "$NS" "${hpin[@]}" env RUST_LOG=${RUST_LOG:-info} "$VSNOOP" \
            --socket "$WORK/vhost.sock" --tap "$TAP" --control "$WORK/control.sock" \
            --ack-offload "$config" $VSNOOP_ARGS 2>"$WORK/vsnoop.log" >/dev/null 9>&- &
        VSNOOP_PID=$!
        echo "$VSNOOP_PID" >>"$PIDFILE"
        wait_for 20 "vsnoop 'listening on'" grep -q "listening on" "$WORK/vsnoop.log"
        [[ $(cat "/proc/$VSNOOP_PID/comm" 2>/dev/null) == vsnoop ]] \
            || die "PID $VSNOOP_PID is not vsnoop (internal error)"
        netdev=(-chardev "socket,id=c0,path=$WORK/vhost.sock" -netdev vhost-user,id=n0,chardev=c0)
        ;;
    esac
    local host_dev=$TAP
    if [[ -n $SENDER_DELAY_MS ]]; then
        # tap --- bridge --- tap A [tapnetem: B->A delayed] tap B (host address)
        host_dev="${TAG}b"
        : >"$WORK/tapnetem.log"
        local npin=()
        [[ -n $ROW_PIN ]] && npin=(taskset -c "$ROW_PIN")
        ip netns exec "$NS" "${npin[@]}" "$PYTHON" "$ROOT/tests/tools/tapnetem.py" --a "${TAG}a" --b "$host_dev" \
            --delay-ms "$SENDER_DELAY_MS" >"$WORK/tapnetem.log" 2>&1 9>&- &
        TAPNETEM_PID=$!
        echo "$TAPNETEM_PID" >>"$PIDFILE"
        wait_for 20 "tapnetem READY" grep -q READY "$WORK/tapnetem.log"
        ip netns exec "$NS" ip link add "${TAG}br" type bridge
        local port
        for port in "$TAP" "${TAG}a"; do
            ip netns exec "$NS" ip link set "$port" master "${TAG}br"
            ip netns exec "$NS" ip link set "$port" up
        done
        ip netns exec "$NS" ip link set "${TAG}br" up
    fi
    ip netns exec "$NS" ip addr add "$HOST_IP/24" dev "$host_dev"
    ip netns exec "$NS" ip link set "$host_dev" up
    if [[ -n $SENDER_INITCWND ]]; then
        ip netns exec "$NS" ip route replace "${HOST_IP%.*}.0/24" dev "$host_dev" \
            proto kernel scope link src "$HOST_IP" initcwnd "$SENDER_INITCWND"
    fi
    : >"$WORK/console.log"
    local pin=()
    [[ -n $PIN_QEMU ]] && pin=(taskset -c "$PIN_QEMU")
    ip netns exec "$NS" "${pin[@]}" qemu-system-x86_64 -accel tcg -name vsnoop-bench,debug-threads=on -nodefaults -display none -no-reboot \
        -smp 1 -m 256M -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
        -kernel "$GUEST/vmlinuz" -initrd "$INITRD" -append "$append" \
        -serial "file:$WORK/console.log" "${netdev[@]}" \
        -device "virtio-net-pci,netdev=n0,vectors=0,mrg_rxbuf=on,mac=52:54:00:77:00:02${DEVICE_OPTS:+,$DEVICE_OPTS}" \
        </dev/null >"$WORK/qemu.stdout" 2>"$WORK/qemu.stderr" 9>&- &
    QEMU_PID=$!
    echo "$QEMU_PID" >>"$PIDFILE"
    wait_for 240 "the guest (VSNOOP-GUEST-READY)" guest_ready
    [[ $(cat "/proc/$QEMU_PID/comm" 2>/dev/null) == qemu-system-* ]] \
        || die "PID $QEMU_PID is not QEMU (internal error)"
    wait_for 60 "ping to the guest" ip netns exec "$NS" busybox ping -c 1 -W 1 "$GUEST_IP"
}

apply_contention() { # contention
    local c=$1 tid
    case $c in
    cg*)
        local period=${c#cg} quota
        quota=${period#*/} period=${period%/*}
        mkdir -p "$CGROUP"
        echo $((period * 1000)) >"$CGROUP/cpu.cfs_period_us"
        echo $((quota * 1000)) >"$CGROUP/cpu.cfs_quota_us"
        for tid in /proc/"$QEMU_PID"/task/*; do echo "${tid##*/}" >"$CGROUP/tasks"; done
        ;;
    stop*)
        local run=${c#stop} stop
        stop=${run#*/} run=${run%/*}
        local pin=()
        [[ -n $ROW_PIN ]] && pin=(taskset -c "$ROW_PIN")
        "${pin[@]}" "$PYTHON" "$WORK/stopper.py" "$QEMU_PID" "$run" "$stop" 2>"$WORK/stopper.log" 9>&- &
        STOPPER_PID=$!
        echo "$STOPPER_PID" >>"$PIDFILE"
        ;;
    rr*)
        local slice=${c#rr} hogs i
        hogs=${slice#*/} slice=${slice%/*}
        echo "$slice" >/proc/sys/kernel/sched_rr_timeslice_ms
        # The VM is its vCPU thread(s); QEMU's other threads (main loop: device
        # emulation, interrupt injection) play the hypervisor and stay outside.
        local vcpus=0
        for tid in /proc/"$QEMU_PID"/task/*; do
            if [[ $(cat "$tid/comm") == "CPU "*/* ]]; then
                taskset -p -c "$RR_CPU" "${tid##*/}" >/dev/null
                chrt -r -p 1 "${tid##*/}"
                vcpus=$((vcpus + 1))
            elif [[ ${tid##*/} == "$QEMU_PID" && $RR_MAIN == 1 ]]; then
                taskset -p -c "$RR_CPU" "${tid##*/}" >/dev/null
                chrt -r -p 2 "${tid##*/}"
            else
                taskset -p -c "$ROW_PIN" "${tid##*/}" >/dev/null
            fi
        done
        ((vcpus > 0)) || die "no vCPU thread (comm 'CPU n/...') in QEMU $QEMU_PID"
        for ((i = 0; i < hogs; i++)); do
            taskset -c "$RR_CPU" chrt -r 1 bash -c 'while :; do :; done' 9>&- &
            echo "$!" >>"$PIDFILE"
            RR_HOGS+=" $!"
        done
        ;;
    esac
}

release_contention() { # contention
    case $1 in
    rr*)
        local pid
        for pid in $RR_HOGS; do stop_pid "$pid"; done
        RR_HOGS=""
        for tid in /proc/"$QEMU_PID"/task/*; do chrt -o -p 0 "${tid##*/}" 2>/dev/null || true; done
        echo "$RR_SLICE_SAVED" >/proc/sys/kernel/sched_rr_timeslice_ms
        ;;
    stop*)
        stop_pid "$STOPPER_PID"
        kill -CONT "$QEMU_PID" 2>/dev/null || true
        log "  $(cat "$WORK/stopper.log" 2>/dev/null)"
        ;;
    cg*)
        cp "$CGROUP/cpu.stat" "$ROW_OUT/cpu.stat" 2>/dev/null || true
        log "  cgroup: $(tr '\n' ' ' <"$CGROUP/cpu.stat" 2>/dev/null)"
        local tid
        for tid in /proc/"$QEMU_PID"/task/*; do echo "${tid##*/}" >/sys/fs/cgroup/cpu/tasks 2>/dev/null || true; done
        ;;
    esac
}

qemu_cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$QEMU_PID/stat" 2>/dev/null || echo 0; }

# CPU time (user + system, clock ticks) of vsnoop, or 0 (vanilla rows).
vsnoop_cpu_ticks() {
    [[ -n ${VSNOOP_PID:-} ]] && awk '{ print $14 + $15 }' "/proc/$VSNOOP_PID/stat" 2>/dev/null || echo 0
}

# Prints "Mbit/s,vsnoop CPU us per MB received,of which the host network stack's,
# the split,the sending iperf3's CPU us per MB" (vsnoop's CPU empty without
# vsnoop; the next two columns empty unless BULK_PERF=1; the split is
# "category=us per MB;...", see PERF_SPLIT).
iperf_once() { # label
    local t0 t1 perf_pid="" perf_data="$WORK/perf.data" split=""
    if [[ $BULK_PERF == 1 && -n ${VSNOOP_PID:-} ]]; then
        perf_begin "$VSNOOP_PID" "$perf_data" "$WORK/perf.log"
        perf_pid=$PERF_PID
    fi
    t0=$(vsnoop_cpu_ticks)
    host iperf3 -c "$GUEST_IP" -C "$SENDER_CC" -t "$IPERF_TIME" -J >"$WORK/iperf.json" 2>&1 \
        || die "iperf3 ($1) failed: $(tail -5 "$WORK/iperf.json")"
    t1=$(vsnoop_cpu_ticks)
    if [[ -n $perf_pid ]]; then
        perf_end "$perf_pid" "$perf_data" "$WORK/perf.log"
        split=$PERF_RESULT
    fi
    "$PYTHON" -c '
import json, sys
end = json.load(open(sys.argv[1]))["end"]
d = end["sum_received"]
ticks, hz = int(sys.argv[2]), int(sys.argv[3])
cpu = ticks / hz * 1e6 / (d["bytes"] / 1e6)
split = dict((k, float(v) * cpu) for k, v in (kv.split("=") for kv in sys.argv[5].split(";") if kv))
# The sending iperf3 process (user + system, softirq work in its context included).
sender = end["cpu_utilization_percent"]["host_total"] / 100 * end["sum_sent"]["seconds"] * 1e6 / (d["bytes"] / 1e6)
print("%.1f,%s,%s,%s,%.1f" % (d["bits_per_second"] / 1e6, "%.1f" % cpu if sys.argv[4] == "1" else "",
      "%.1f" % split["host_stack"] if split and sys.argv[4] == "1" else "",
      ";".join("%s=%.1f" % kv for kv in split.items()) if sys.argv[4] == "1" else "", sender))' \
        "$WORK/iperf.json" "$((t1 - t0))" "$(getconf CLK_TCK)" "$([[ -n ${VSNOOP_PID:-} ]] && echo 1 || echo 0)" "$split"
}

# sender.py in the namespace toward the guest's tcpsink, with this run's digest and
# congestion control; the rest of its arguments from the caller.
sender() {
    host "$PYTHON" "$WORK/sender.py" --ip "$GUEST_IP" --port "$SINK_PORT" --digest "$DIGEST" --cc "$SENDER_CC" "$@"
}

set_offload() { "$VSNOOP" ack-offload --control "$WORK/control.sock" "$1" >/dev/null; }

describe_bulk() { # iperf_once's line
    local mbit cpu stack _ sender
    IFS=, read -r mbit cpu stack _ sender <<<"$1"
    echo "$mbit Mbit/s, vsnoop ${cpu:--} CPU us/MB${stack:+ (host network stack $stack)}, sender $sender"
}

bulk() { # config
    local config=$1 i r order state pairs=0
    [[ $config == on && $BULK_AB == 1 ]] && pairs=1
    if [[ $pairs == 0 || $BULK_PER_BOOT == 1 ]]; then
        for i in $(seq "$BULK_REPS"); do
            r=$(iperf_once "$config")
            echo "$config,per-boot,$i,$r" >>"$BULK_CSV"
            log "  bulk $config #$i: $(describe_bulk "$r")"
        done
    fi
    if [[ $pairs == 1 ]]; then
        # Pairs in ABBA order (off-on, on-off, ...), so a drift of the
        # machine over the series does not favour either state.
        for i in $(seq "$BULK_REPS"); do
            order="off on"
            ((i % 2 == 0)) && order="on off"
            for state in $order; do
                set_offload "$state"
                r=$(iperf_once "ab-$state")
                echo "$state,alternating,$i,$r" >>"$BULK_CSV"
                log "  bulk alternating, offload $state #$i: $(describe_bulk "$r")"
            done
        done
        set_offload on
    fi
}

sizes_plan() { # [count for every size] -> size=count,...
    local out=() s bytes count var
    for s in $SIZES; do
        bytes=$(size_bytes "$s")
        var="COUNT_${s}"
        count=${1:-${!var:-$COUNT}}
        out+=("$bytes=$count")
    done
    local IFS=,
    echo "${out[*]}"
}

run_row() { # config contention
    local config=$1 contention=$2
    ROW_OUT="$ROWDIR/$config-${contention//\//-}"
    mkdir -p "$ROW_OUT"
    if [[ $LOCK == 1 ]]; then
        exec 9>"${TMPDIR:-/tmp}/vsnoop-guest.lock"
        flock -n 9 || { log "  waiting for the guest lock (a guest test is running)"; flock 9; }
    fi
    ROW_PIN=$PIN_HOST
    if [[ $contention == rr* && -z $ROW_PIN ]]; then
        # everything but the shared CPU
        ROW_PIN=$(seq -s, 0 $(($(nproc) - 1)) | tr , '\n' | grep -vx "$RR_CPU" | paste -sd,)
    fi
    log "$config / $contention: booting the guest"
    start_row "$config" "$contention"
    log "  guest up; waiting for tcpsink on port $SINK_PORT"
    # The sink check and the warm-up run unthrottled, so a slow boot does not count.
    sender --csv /dev/null --config "$config" --contention "$contention" --sizes 1=0 --warmup 0 \
        || die "tcpsink in the guest does not answer"
    apply_contention "$contention"
    local t0 c0
    t0=$(date +%s.%N) c0=$(qemu_cpu_ticks)
    log "  transfers: $(sizes_plan)"
    sender --csv "$CSV" --config "$config" --contention "$contention" --sizes "$(sizes_plan)" \
        --warmup "$WARMUP" --pause-ms "$CONNECT_PAUSE_MS" --jitter-ms "$START_JITTER_MS" --seed "$row" \
        || log "  WARNING: the sender gave up ($config / $contention); its failures are in the CSV"
    if [[ $XFER_AB -gt 0 && ($config == on || ($config == off && $XFER_AB_OFF_BOOT == 1)) ]]; then
        log "  pairs, offload off/on alternating: $(sizes_plan "$XFER_AB")"
        local label=ab
        [[ $config == off ]] && label=ab@off
        sender --csv "$CSV" --config "$label" --contention "$contention" --sizes "$(sizes_plan "$XFER_AB")" \
            --warmup 0 --pause-ms "$CONNECT_PAUSE_MS" --jitter-ms "$START_JITTER_MS" --seed "$((row + 1000))" \
            --ab-control "$WORK/control.sock" --vsnoop "$VSNOOP" \
            || log "  WARNING: the sender gave up (pairs, $contention); its failures are in the CSV"
        set_offload "$config"
    fi
    local t1 c1
    t1=$(date +%s.%N) c1=$(qemu_cpu_ticks)
    log "  QEMU used $(awk -v c=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v t0="$t0" -v t1="$t1" \
        'BEGIN { printf "%.0f%%", 100 * c / hz / (t1 - t0) }') of a CPU during the transfers"
    if [[ -n $SENDER_DELAY_MS ]]; then
        kill -USR1 "$TAPNETEM_PID" 2>/dev/null || true
        sleep 0.3
        log "  $(grep '^tapnetem ' "$WORK/tapnetem.log" | tail -1)"
    fi
    release_contention "$contention"
    if [[ $contention == none && $BULK_REPS -gt 0 ]]; then bulk "$config"; fi
    if [[ $config != vanilla ]]; then
        "$VSNOOP" stats --control "$WORK/control.sock" --json >"$ROW_OUT/stats.json" 2>/dev/null || true
        "$PYTHON" - "$ROW_OUT/stats.json" <<'PY' >&2 || true
import json, sys
def walk(v, path=""):
    if isinstance(v, dict):
        for k, x in v.items():
            yield from walk(x, f"{path}.{k}" if path else k)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from walk(x, f"{path}[{i}]")
    else:
        yield path, v
keys = ("offload",)  # the ACK-offload counters live under "offload" (and ack_offload)
# the attribution's per-interface and per-flow figures also say "ack": leave them out
# (only the non-zero ones, and the switch itself)
hits = [f"{p}={v}" for p, v in walk(json.load(open(sys.argv[1])))
        if not p.startswith(("interface", "flows")) and any(k in p.lower() for k in keys)
        and (v not in (0, 0.0, False, None) or p in ("ack_offload", "offload.enabled"))]
print("  vsnoop offload counters (non-zero): " + (", ".join(hits) if hits else "none"))
PY
    fi
    cp "$WORK/console.log" "$WORK/qemu.stderr" "$ROW_OUT/" 2>/dev/null || true
    if [[ $config != vanilla ]]; then cp "$WORK/vsnoop.log" "$ROW_OUT/" 2>/dev/null || true; fi
    stop_all
}

# --- the run -------------------------------------------------------------------------------
mkdir -p "$OUT_DIR"
rm -rf "$ROWDIR"
echo "config,contention,size_bytes,rep,seconds,mb_per_s,status" >"$CSV"
echo "config,kind,rep,mbit_per_s,vsnoop_cpu_us_per_mb,host_stack_us_per_mb,perf_us_per_mb,sender_cpu_us_per_mb" >"$BULK_CSV"
n_rows=$(($(wc -w <<<"$CONFIGS") * $(wc -w <<<"$CONTENTIONS")))
log "$n_rows rows: configurations [$CONFIGS] x contention [$CONTENTIONS]; size=count per row: $(sizes_plan)"
log "results: $CSV, $MD${PLOTTER:+, $SVG}"
START=$SECONDS
row=0
for contention in $CONTENTIONS; do
    for config in $CONFIGS; do
        row=$((row + 1))
        eta=""
        ((row > 1)) && eta=", about $(((SECONDS - START) * (n_rows - row + 1) / (row - 1) / 60 + 1)) min left"
        log "row $row/$n_rows ($((SECONDS - START)) s so far$eta)"
        run_row "$config" "$contention"
    done
done
ELAPSED=$((SECONDS - START))
log "measurements done in $ELAPSED s"

# --- the table -----------------------------------------------------------------------------
SETTINGS="transfers per row: $(sizes_plan | tr ',' ' ') (warm-up $WARMUP), guest busy loop in cg rows: $BUSY_CG, in stop rows: $BUSY_STOP"
SETTINGS+=", random wait before connect: 0-$START_JITTER_MS ms, pause after connect: $CONNECT_PAUSE_MS ms"
SETTINGS+=", vsnoop binary sha256 $VSNOOP_ID, QEMU $(qemu-system-x86_64 --version | awk 'NR == 1 { print $4 }')"
SETTINGS+=", QEMU pinned: ${PIN_QEMU:-no}, host side pinned: ${PIN_HOST:-no}"
SETTINGS+=", guest sysctls: ${GUEST_SYSCTL:-none}, tcpsink options: ${SINK_ARGS:-none}, digest: $DIGEST, namespace sysctls: ${HOST_SYSCTL:-none}, sender initcwnd: ${SENDER_INITCWND:-kernel default (10)}, sender congestion control: $SENDER_CC, added one-way delay toward the guest: ${SENDER_DELAY_MS:-0} ms"
[[ -n $GUEST_APPEND ]] && SETTINGS+=", kernel cmdline: $GUEST_APPEND"
[[ -n $VSNOOP_ARGS ]] && SETTINGS+=", vsnoop args: $VSNOOP_ARGS"
[[ $TCPSINK == standin ]] && SETTINGS+=", SINK: busybox stand-in (development only)"
"$PYTHON" - "$CSV" "$BULK_CSV" "$SETTINGS" "$ELAPSED" "$(basename "$SVG")" "$PLOTTER" <<'PY' >"$MD"
import collections, csv, datetime, os, random, statistics, sys
csv_path, bulk_path, settings, elapsed, svg, plotter = sys.argv[1:7]
rows = list(csv.DictReader(open(csv_path)))
def pct(v, q):
    if not v:
        return float("nan")
    v = sorted(v)
    k = (len(v) - 1) * q
    f = int(k); c = min(f + 1, len(v) - 1)
    return v[f] + (v[c] - v[f]) * (k - f)
data, fails = collections.defaultdict(list), collections.Counter()
order_c, order_s = [], []
for r in rows:
    key = (r["contention"], int(r["size_bytes"]), r["config"])
    if r["contention"] not in order_c: order_c.append(r["contention"])
    if int(r["size_bytes"]) not in order_s: order_s.append(int(r["size_bytes"]))
    if r["status"] == "ok":
        data[key].append(float(r["mb_per_s"]))
    else:
        fails[key] += 1
configs = [c for c in ("vanilla", "off", "on") if any(k[2] == c for k in data)]
names = {"vanilla": "QEMU tap (vanilla)", "off": "vsnoop, offload off", "on": "vsnoop, offload on"}
def cname(c):
    if c == "none": return "1/1 (none)"
    if c.startswith("cg"):
        p, q = c[2:].split("/"); return f"cgroup {q}/{p} ms"
    if c.startswith("stop"):
        r, s = c[4:].split("/"); return f"SIGSTOP run {r} / stop {s} ms"
    if c.startswith("rr"):
        t, n = c[2:].split("/"); return f"vCPU round robin, {n} busy loops, {t} ms slices"
    return c
def size_name(b):
    for unit, n in (("MB", 10**6), ("KB", 10**3)):
        if b >= n and b % n == 0: return f"{b // n} {unit}"
    return f"{b} B"
def cell(v, f):
    if not v: return "n/m"
    s = f"{pct(v, .5):.3g} ({pct(v, .1):.3g}–{pct(v, .9):.3g})"
    return s + (f" [{f} failed]" if f else "")
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
print(f"### ack-offload: {now}, {os.cpu_count()} CPUs, {os.uname().release}, TCG guest, {int(elapsed) // 60} min")
print()
print("Throughput of successive host->guest transfers (new connection each, timed from the first byte sent to the "
      "guest application's reply that it has every byte), MB/s (10^6 B/s): median (p10–p90). "
      f"Settings: {settings}.")
print()
rnd = random.Random(1)
def boot_median(r):
    """The median of r and the 95% bootstrap range of that median."""
    boot = sorted(statistics.median(rnd.choices(r, k=len(r))) for _ in range(2000))
    return statistics.median(r), boot[50], boot[1949]
if configs:
    print("| contention | size | n | " + " | ".join(names[c] for c in configs) + " | on / off (medians) |")
    print("|---|---|---:|" + "---:|" * len(configs) + "---:|")
for c in order_c:
    for s in order_s:
        if not configs:
            break
        n = max((len(data[(c, s, k)]) for k in configs), default=0)
        if n == 0 and not any(fails[(c, s, k)] for k in configs):
            continue
        cells = [cell(data[(c, s, k)], fails[(c, s, k)]) for k in configs]
        on, off = data.get((c, s, "on")), data.get((c, s, "off"))
        ratio = f"{pct(on, .5) / pct(off, .5):.2f}x" if on and off else "-"
        print(f"| {cname(c)} | {size_name(s)} | {n} | " + " | ".join(cells) + f" | {ratio} |")
# XFER_AB: pairs of transfers on the offload-on boot, offload off and on
# alternating (ABBA); the ratio within a pair cancels the boot and the drift.
ab = collections.defaultdict(lambda: collections.defaultdict(dict))
for r in rows:
    if r["config"].startswith("ab") and r["status"] == "ok":
        label, state = r["config"].rsplit("-", 1)
        boot = "off" if label.endswith("@off") else "on"
        ab[(r["contention"], int(r["size_bytes"]), boot)][r["rep"]][state] = float(r["mb_per_s"])
if ab:
    print()
    print("Pairs on one boot (`XFER_AB`): before each transfer the offload is switched off or on through "
          "the control socket, in ABBA order; the boot column says how vsnoop was started (`--ack-offload`). "
          "MB/s: median (p10–p90); the paired ratio is the median of the per-pair on/off ratios with its "
          "95% bootstrap range.")
    print()
    print("| contention | size | boot | pairs | offload off | offload on | on / off (medians) "
          "| paired on / off (95% range) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for c, s, boot in ((c, s, b) for c in order_c for s in order_s for b in ("off", "on")):
        pairs = [p for p in ab.get((c, s, boot), {}).values() if "on" in p and "off" in p]
        if not pairs:
            continue
        off = sorted(p["off"] for p in pairs)
        on = sorted(p["on"] for p in pairs)
        paired = ("-" if len(pairs) < 3 else
                  "{:.2f}x ({:.2f}–{:.2f})".format(*boot_median([p["on"] / p["off"] for p in pairs])))
        print(f"| {cname(c)} | {size_name(s)} | {boot} | {len(pairs)} | {cell(off, 0)} | {cell(on, 0)} "
              f"| {pct(on, .5) / pct(off, .5):.2f}x | {paired} |")
bulk = list(csv.DictReader(open(bulk_path)))
if bulk:
    print()
    print("Bulk throughput host->guest, unthrottled (iperf3): median (min–max) of the runs; "
          "vsnoop's CPU time (user + system) per MB received.")
    print()
    # BULK_PERF: the host network stack's share of vsnoop's CPU (the local
    # sender's ACK processing run inside vsnoop's tap writes), and the rest.
    perf = any(b.get("host_stack_us_per_mb") for b in bulk)
    if perf:
        print("With `BULK_PERF=1`: of vsnoop's CPU per MB, the host network stack's part (perf samples under "
              "`tcp_v4_rcv`/`tcp_v6_rcv` or softirq handling: the local sender's ACK processing and the "
              "segments it releases, which the kernel runs inside vsnoop's tap write) and the rest "
              "(vsnoop's own work and its I/O).")
        print()
        print("| measurement | runs | Mbit/s | vsnoop CPU us/MB | host network stack us/MB | the rest us/MB |")
        print("|---|---:|---:|---:|---:|---:|")
    else:
        print("| measurement | runs | Mbit/s | vsnoop CPU us/MB |")
        print("|---|---:|---:|---:|")
    groups = collections.defaultdict(list)
    cpu = collections.defaultdict(list)
    stack = collections.defaultdict(list)
    rest = collections.defaultdict(list)
    for b in bulk:
        groups[(b["kind"], b["config"])].append(float(b["mbit_per_s"]))
        if b.get("vsnoop_cpu_us_per_mb"):
            cpu[(b["kind"], b["config"])].append(float(b["vsnoop_cpu_us_per_mb"]))
        if b.get("host_stack_us_per_mb"):
            stack[(b["kind"], b["config"])].append(float(b["host_stack_us_per_mb"]))
            rest[(b["kind"], b["config"])].append(
                float(b["vsnoop_cpu_us_per_mb"]) - float(b["host_stack_us_per_mb"]))
    def span(v, fmt):
        return f"{statistics.median(v):{fmt}} ({min(v):{fmt}}–{max(v):{fmt}})" if v else "-"
    for (kind, cfg), v in groups.items():
        label = names.get(cfg, cfg) + (" (own boot)" if kind == "per-boot" else ", alternating on one boot")
        extra = (f" | {span(stack.get((kind, cfg), []), '.0f')} | {span(rest.get((kind, cfg), []), '.0f')}"
                 if perf else "")
        print(f"| {label} | {len(v)} | {span(v, '.1f')} | {span(cpu.get((kind, cfg), []), '.0f')}{extra} |")
    def loss(a, b):
        if groups.get(a) and groups.get(b):
            return 100 * (1 - statistics.median(groups[a]) / statistics.median(groups[b]))
    for what, a, b in (("own boots", ("per-boot", "on"), ("per-boot", "off")),
                       ("alternating on one boot", ("alternating", "on"), ("alternating", "off"))):
        l = loss(a, b)
        if l is not None:
            print(f"\nBulk loss with the offload on ({what}): {l:+.1f}% (target <= 2%; positive = slower with the offload).")
    # Pairs on one boot: the ratio within each pair cancels the boot and
    # most of the machine's drift; a bootstrap gives the median's 95% range.
    pairs = collections.defaultdict(dict)
    for b in bulk:
        if b["kind"] == "alternating":
            pairs[b["rep"]][b["config"]] = b
    pairs = [p for p in pairs.values() if "on" in p and "off" in p]
    if len(pairs) >= 3:
        def paired(field):
            r = [float(p["on"][field]) / float(p["off"][field]) for p in pairs
                 if p["on"].get(field) and p["off"].get(field) and float(p["off"][field]) > 0]
            if len(r) < 3:
                return None
            return (*boot_median(r), len(r))
        t = paired("mbit_per_s")
        c = paired("vsnoop_cpu_us_per_mb")
        if t:
            print(f"\nPaired on/off (alternating, {t[3]} pairs): throughput ratio median {t[0]:.3f} "
                  f"(95% bootstrap range of the median {t[1]:.3f}–{t[2]:.3f}), i.e. a loss of "
                  f"{100 * (1 - t[0]):+.1f}% ({100 * (1 - t[2]):+.1f}% to {100 * (1 - t[1]):+.1f}%).")
        if c:
            print(f"vsnoop CPU per MB, on/off: median {c[0]:.3f} ({c[1]:.3f}–{c[2]:.3f}).")
        def paired_diff(value, *fields):
            """Median and 95% range of value(on) - value(off) over the pairs with every field."""
            d = [value(p["on"]) - value(p["off"]) for p in pairs
                 if all(p[state].get(f) for state in ("on", "off") for f in fields)]
            return (*boot_median(d), len(d)) if len(d) >= 3 else None
        def us(d):
            return f"{d[0]:+.0f} ({d[1]:+.0f} to {d[2]:+.0f})"
        def num(f):
            return lambda b: float(b[f])
        snd = paired_diff(num("sender_cpu_us_per_mb"), "sender_cpu_us_per_mb", "vsnoop_cpu_us_per_mb")
        both = paired_diff(lambda b: num("sender_cpu_us_per_mb")(b) + num("vsnoop_cpu_us_per_mb")(b),
                           "sender_cpu_us_per_mb", "vsnoop_cpu_us_per_mb")
        if snd and both:
            print(f"The sending iperf3's CPU per MB (its own report), paired on - off: "
                  f"{snd[0]:+.0f} us ({snd[1]:+.0f} to {snd[2]:+.0f}); vsnoop and the sender together: "
                  f"{both[0]:+.0f} us ({both[1]:+.0f} to {both[2]:+.0f}).")
        if perf:
            fields = ("vsnoop_cpu_us_per_mb", "host_stack_us_per_mb")
            total = paired_diff(num("vsnoop_cpu_us_per_mb"), *fields)
            host = paired_diff(num("host_stack_us_per_mb"), *fields)
            own = paired_diff(lambda b: num(fields[0])(b) - num(fields[1])(b), *fields)
            if total and host and own:
                print(f"Paired on - off, us per MB ({total[3]} pairs, median and 95% range): vsnoop CPU "
                      f"{us(total)}, of which the host network stack {us(host)} and the rest {us(own)}.")
            def split(b):
                return dict((k, float(v)) for k, v in
                            (kv.split("=") for kv in b.get("perf_us_per_mb", "").split(";") if kv))
            cats = list(split(pairs[0]["on"]))
            if cats:
                print()
                print("Where vsnoop's CPU goes (perf, us per MB received; first matching kernel frame, else "
                      "the leaf: `PERF_SPLIT` in the script), medians of the alternating runs and of the "
                      "paired difference:")
                print()
                print("| part | offload off | offload on | on - off (95% range) |")
                print("|---|---:|---:|---:|")
                for cat in cats:
                    offs = [split(p["off"]).get(cat, 0.0) for p in pairs]
                    ons = [split(p["on"]).get(cat, 0.0) for p in pairs]
                    d = boot_median([a - b for a, b in zip(ons, offs)])
                    print(f"| {cat} | {statistics.median(offs):.0f} | {statistics.median(ons):.0f} | {us(d)} |")
if plotter:
    print()
    print(f"CDF of the 100 KB transfers: `{svg}`.")
PY
cat "$MD"

if [[ -n $PLOTTER ]]; then
    "$PLOTTER" --csv "$CSV" --size 100000 --out "$SVG" >&2 && log "plot written to $SVG" \
        || log "WARNING: the plot failed"
fi
log "done in $((SECONDS - START)) s: $CSV, $MD${PLOTTER:+, $SVG}, $BULK_CSV, $ROWDIR/"
