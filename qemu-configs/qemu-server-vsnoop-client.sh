#!/usr/bin/env bash
# QEMU owns the socket (server=on,wait=off) and vsnoop connects to it (--client).
#
# Use this when the VMM's lifecycle comes first (e.g. libvirt mode='server', or
# restarting the backend without QEMU's reconnect option): QEMU keeps listening, and
# a restarted `vsnoop --client` connects again.
#
#   1. VSNOOP_SOCK=/tmp/qemu-vhost.sock qemu-configs/qemu-server-vsnoop-client.sh
#      QEMU creates the socket and then WAITS before starting the guest: the vhost-user
#      netdev needs its backend during initialisation, whatever wait=off says.
#   2. vsnoop --client --socket /tmp/qemu-vhost.sock --tap vsnoop0
#      ip addr add 10.77.0.1/24 dev vsnoop0; ip link set vsnoop0 up
#
# Other settings: see guest-common.sh.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/guest-common.sh"

SOCK=${VSNOOP_SOCK:-/tmp/qemu-vhost.sock}
[ -S "$SOCK" ] && rm -f "$SOCK"   # a stale socket file would make the bind fail
echo "QEMU listens on $SOCK; now run: vsnoop --client --socket $SOCK --tap TAP" >&2

exec "$QEMU" "${QEMU_ARGS[@]}" \
    -chardev "socket,id=c0,path=$SOCK,server=on,wait=off" \
    -netdev "vhost-user,id=n0,chardev=c0,queues=$QUEUES" \
    -device "$NIC" \
    "$@"
