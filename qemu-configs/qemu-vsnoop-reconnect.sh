#!/usr/bin/env bash
# QEMU as the vhost-user frontend (socket client) with reconnect=1: when vsnoop exits
# or crashes, QEMU keeps the guest running, retries the socket every second and, once a
# new vsnoop listens on the same path, replays the whole setup (features, memory table,
# ring addresses and ring positions) so traffic resumes. The guest sees the link go
# down and up (VIRTIO_NET_S_LINK_UP), nothing else.
#
#   1. vsnoop --socket /tmp/vsnoop.sock --tap vsnoop0
#   2. VSNOOP_SOCK=/tmp/vsnoop.sock qemu-configs/qemu-vsnoop-reconnect.sh
#   3. kill -TERM <vsnoop pid>; vsnoop --socket /tmp/vsnoop.sock --tap vsnoop0
#      (re-add the tap's address: the tap is recreated)
#
# QEMU 7.2 spells the option reconnect=SECONDS; QEMU >= 9.2 prefers reconnect-ms=MS.
# Other settings: see guest-common.sh.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/guest-common.sh"

SOCK=${VSNOOP_SOCK:-/tmp/vsnoop.sock}
if [ ! -S "$SOCK" ]; then
    # QEMU would wait for it anyway (retrying every second), but say so.
    echo "note: no socket at $SOCK yet; QEMU waits until vsnoop listens there" >&2
fi

exec "$QEMU" "${QEMU_ARGS[@]}" \
    -chardev "socket,id=c0,path=$SOCK,reconnect=1" \
    -netdev "vhost-user,id=n0,chardev=c0,queues=$QUEUES" \
    -device "$NIC" \
    "$@"
