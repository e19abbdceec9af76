#!/usr/bin/env bash
# Try vsnoop with a real guest, safely: everything runs in a fresh network namespace
# (10.77.0.0/24 only), which is deleted on exit together with the processes started here.
#
#   qemu-configs/run-in-netns.sh [server|reconnect|client]    (default: server)
#
#   server     vsnoop --socket S --tap T          + qemu-vsnoop-server.sh
#   reconnect  vsnoop --socket S --tap T          + qemu-vsnoop-reconnect.sh
#   client     qemu-server-vsnoop-client.sh       + vsnoop --client --socket S --tap T
#
# The guest console is this terminal (Ctrl-A x quits QEMU). In the guest:
#   ping 10.77.0.1; iperf3 -c 10.77.0.1   (after `ip netns exec NS iperf3 -s` on the host)
# From another terminal: ip netns exec vsnoop-demo-<pid> iperf3 -c 10.77.0.2
# Needs root, target/release/vsnoop (cargo build --release) and scripts/build-guest.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
mode=${1:-server}
VSNOOP=${VSNOOP:-$repo/target/release/vsnoop}
NS=vsnoop-demo-$$
TAP=vsdemo$$
TAP=${TAP:0:15}
DIR=$(mktemp -d /tmp/vsnoop-demo.XXXXXX)
SOCK=$DIR/vhost.sock
VSNOOP_PID=

[ -x "$VSNOOP" ] || { echo "no $VSNOOP: cargo build --release" >&2; exit 1; }
"$repo/scripts/build-guest.sh"

cleanup() {
    [ -n "$VSNOOP_PID" ] && kill "$VSNOOP_PID" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    echo "vsnoop log: $DIR/vsnoop.log" >&2
}
trap cleanup EXIT
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up

configure_tap() {
    for _ in $(seq 300); do
        ip netns exec "$NS" ip link show "$TAP" >/dev/null 2>&1 && break
        sleep 0.1
    done
    ip netns exec "$NS" ip addr add 10.77.0.1/24 dev "$TAP"
    ip netns exec "$NS" ip link set "$TAP" up
    echo "host side: $TAP 10.77.0.1/24 in namespace $NS" >&2
}

case "$mode" in
server|reconnect)
    ip netns exec "$NS" "$VSNOOP" --socket "$SOCK" --tap "$TAP" 2>"$DIR/vsnoop.log" &
    VSNOOP_PID=$!
    for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
    configure_tap
    script=qemu-vsnoop-server.sh
    [ "$mode" = reconnect ] && script=qemu-vsnoop-reconnect.sh
    VSNOOP_SOCK=$SOCK ip netns exec "$NS" "$here/$script"
    ;;
client)
    # QEMU must listen first; vsnoop connects once the socket exists.
    (
        for _ in $(seq 300); do [ -S "$SOCK" ] && break; sleep 0.1; done
        exec ip netns exec "$NS" "$VSNOOP" --client --socket "$SOCK" --tap "$TAP" 2>"$DIR/vsnoop.log"
    ) &
    VSNOOP_PID=$!
    ( configure_tap ) &
    VSNOOP_SOCK=$SOCK ip netns exec "$NS" "$here/qemu-server-vsnoop-client.sh"
    ;;
*)
    echo "usage: $0 [server|reconnect|client]" >&2
    exit 2
    ;;
esac
