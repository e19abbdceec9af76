# Sourced by the qemu-*.sh scripts in this directory: machine, memory and boot
# arguments shared by all of them. Not meant to be run directly.
#
# Environment (all optional):
#   ACCEL       tcg (default) or kvm. With tcg the NIC gets vectors=0 (see README.md).
#   MEM         guest memory, default 256M. vhost-user needs it shared: memfd, share=on.
#   SMP         vCPUs, default 1 (use >= QUEUES for multi-queue).
#   QUEUES      queue pairs, default 1 (must not exceed vsnoop --queues).
#   QUEUE_SIZE  virtqueue size, default 256 (QEMU's rx/tx_queue_size).
#   MAC         guest MAC, default 52:54:00:77:00:02.
#   GUEST_IP    guest eth0 address for the test guest, default 10.77.0.2/24.
#   KERNEL, INITRD  default: the test guest from scripts/build-guest.sh
#               (${VSNOOP_GUEST_DIR:-<repo>/target/guest}/vmlinuz, initramfs.gz).
#   DISK        boot this disk image (virtio-blk) instead of KERNEL/INITRD.
#   QEMU        QEMU binary, default qemu-system-x86_64.

_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
_repo=$(cd "$_here/.." && pwd)
_guest_dir=${VSNOOP_GUEST_DIR:-$_repo/target/guest}

ACCEL=${ACCEL:-tcg}
MEM=${MEM:-256M}
SMP=${SMP:-1}
QUEUES=${QUEUES:-1}
QUEUE_SIZE=${QUEUE_SIZE:-256}
MAC=${MAC:-52:54:00:77:00:02}
GUEST_IP=${GUEST_IP:-10.77.0.2/24}
QEMU=${QEMU:-qemu-system-x86_64}

QEMU_ARGS=(
    -accel "$ACCEL" -smp "$SMP" -m "$MEM"
    # vhost-user: the backend maps guest RAM, so it must be a shareable file.
    -object "memory-backend-memfd,id=mem,size=$MEM,share=on" -numa node,memdev=mem
    -nodefaults -display none -no-reboot
    # Serial console on this terminal; Ctrl-A x quits, Ctrl-A c switches to the monitor.
    -serial mon:stdio
)

if [ -n "${DISK:-}" ]; then
    QEMU_ARGS+=(-drive "file=$DISK,if=virtio")
else
    KERNEL=${KERNEL:-$_guest_dir/vmlinuz}
    INITRD=${INITRD:-$_guest_dir/initramfs.gz}
    if [ ! -f "$KERNEL" ] || [ ! -f "$INITRD" ]; then
        echo "no guest image at $_guest_dir: run scripts/build-guest.sh (or set DISK=...)" >&2
        exit 1
    fi
    QEMU_ARGS+=(-kernel "$KERNEL" -initrd "$INITRD"
                -append "console=ttyS0 quiet panic=-1 vsnoop.ip=$GUEST_IP")
fi

# The virtio-net device. mrg_rxbuf=on: mergeable RX buffers (vsnoop supports them).
# Multi-queue needs mq=on and, with MSI-X, vectors=2*QUEUES+2.
NIC="virtio-net-pci,netdev=n0,mac=$MAC,mrg_rxbuf=on,rx_queue_size=$QUEUE_SIZE,tx_queue_size=$QUEUE_SIZE"
if [ "$QUEUES" -gt 1 ]; then
    NIC+=",mq=on"
fi
if [ "$ACCEL" = tcg ]; then
    # QEMU 7.2 + TCG + vhost-user + MSI-X = SIGSEGV (exit 139) at the guest's DRIVER_OK.
    # vectors=0 makes the device use legacy INTx interrupts. Not needed with KVM.
    NIC+=",vectors=0"
elif [ "$QUEUES" -gt 1 ]; then
    NIC+=",vectors=$((2 * QUEUES + 2))"
fi
