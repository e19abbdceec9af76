#!/usr/bin/env bash
# QEMU as the vhost-user frontend (socket client), vsnoop as the server.
#
# The usual setup: vsnoop owns the socket and the tap and outlives guests; a new QEMU
# can connect to the same running vsnoop after the previous one quit.
#
#   1. vsnoop --socket /tmp/vsnoop.sock --tap vsnoop0 [--queues N]   # prints "listening on"
#      ip addr add 10.77.0.1/24 dev vsnoop0; ip link set vsnoop0 up
#   2. VSNOOP_SOCK=/tmp/vsnoop.sock qemu-configs/qemu-vsnoop-server.sh
#      (the test guest comes up with 10.77.0.2/24 and an iperf3 server)
#
# On a shared or test machine run both inside a network namespace
# (see qemu-configs/run-in-netns.sh). Other settings: see guest-common.sh.
# If vsnoop may restart while the guest runs, use qemu-vsnoop-reconnect.sh instead.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/guest-common.sh"

SOCK=${VSNOOP_SOCK:-/tmp/vsnoop.sock}
if [ ! -S "$SOCK" ]; then
    echo "no vhost-user socket at $SOCK: start 'vsnoop --socket $SOCK --tap TAP' first" >&2
    exit 1
fi

exec "$QEMU" "${QEMU_ARGS[@]}" \
    -chardev "socket,id=c0,path=$SOCK" \
    -netdev "vhost-user,id=n0,chardev=c0,queues=$QUEUES" \
    -device "$NIC" \
    "$@"
