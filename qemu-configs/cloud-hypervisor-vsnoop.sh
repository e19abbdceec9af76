#!/usr/bin/env bash
# cloud-hypervisor with its virtio-net device served by vsnoop (vhost-user).
# KVM only: cloud-hypervisor has no software emulation, so this is documented but
# not run on the TCG-only CI machines.
#
#   1. vsnoop --socket /tmp/vsnoop.sock --tap vsnoop0 --queues 1
#      ip addr add 10.77.0.1/24 dev vsnoop0; ip link set vsnoop0 up
#   2. VSNOOP_SOCK=/tmp/vsnoop.sock qemu-configs/cloud-hypervisor-vsnoop.sh
#
# Notes:
#   * --memory ...,shared=on is required: the backend maps guest RAM.
#   * num_queues counts virtqueues, not pairs: 2 per queue pair (num_queues=2 for one
#     pair; cloud-hypervisor rejects 1). It must not exceed 2 * vsnoop --queues.
#   * vhost_mode=client (the default): cloud-hypervisor connects to vsnoop's socket.
#     vhost_mode=server: cloud-hypervisor listens; run `vsnoop --client --socket PATH`.
#   * cloud-hypervisor boots a PVH-capable uncompressed kernel (vmlinux) or a firmware
#     (hypervisor-fw / CLOUDHV.fd) with a disk; the bzImage from scripts/build-guest.sh
#     works with recent releases (bzImage support) together with --initramfs.
#   * Unlike QEMU 7.2, cloud-hypervisor sends SET_FEATURES before SET_VRING_ENABLE, and
#     uses MSI-X with KVM irqfds (the QEMU 7.2 TCG vectors=0 issue does not arise).
#
# Environment: VSNOOP_SOCK, CH (binary), KERNEL, INITRD, MEM (default 512M), CPUS,
# QUEUE_PAIRS (default 1), QUEUE_SIZE (default 256), MAC, GUEST_IP.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
guest_dir=${VSNOOP_GUEST_DIR:-$here/../target/guest}
SOCK=${VSNOOP_SOCK:-/tmp/vsnoop.sock}
CH=${CH:-cloud-hypervisor}
KERNEL=${KERNEL:-$guest_dir/vmlinuz}
INITRD=${INITRD:-$guest_dir/initramfs.gz}
MEM=${MEM:-512M}
CPUS=${CPUS:-1}
QUEUE_PAIRS=${QUEUE_PAIRS:-1}
QUEUE_SIZE=${QUEUE_SIZE:-256}
MAC=${MAC:-52:54:00:77:00:02}
GUEST_IP=${GUEST_IP:-10.77.0.2/24}

[ -w /dev/kvm ] || { echo "cloud-hypervisor needs KVM (/dev/kvm)" >&2; exit 1; }
command -v "$CH" >/dev/null || { echo "$CH not found" >&2; exit 1; }
[ -S "$SOCK" ] || { echo "start vsnoop --socket $SOCK --tap TAP first" >&2; exit 1; }

exec "$CH" \
    --cpus "boot=$CPUS" \
    --memory "size=$MEM,shared=on" \
    --kernel "$KERNEL" \
    --initramfs "$INITRD" \
    --cmdline "console=ttyS0 quiet panic=-1 vsnoop.ip=$GUEST_IP" \
    --serial tty --console off \
    --net "mac=$MAC,vhost_user=true,socket=$SOCK,num_queues=$((2 * QUEUE_PAIRS)),queue_size=$QUEUE_SIZE,vhost_mode=client" \
    "$@"
