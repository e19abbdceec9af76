#!/usr/bin/env bash
# Builds the small test guest used by tests/guest.rs and the qemu-configs/ examples:
#   ${VSNOOP_GUEST_DIR:-<repo>/target/guest}/vmlinuz       Debian cloud kernel
#   ${VSNOOP_GUEST_DIR:-<repo>/target/guest}/initramfs.gz  busybox + iperf3 + tcpsink + virtio-net modules
#
# The result is cached: nothing is rebuilt while both files exist and the stamp of the inputs
# (this script, the image layout version, the kernel package version, the busybox-static and
# iperf3 versions, the tcpsink source and the gcc / libc6-dev versions) matches.
# Set VSNOOP_GUEST_REBUILD=1 to force a rebuild.
#
# Needs (Debian 12, after `apt-get update`):
#   apt-get install busybox-static iperf3 cpio gcc libc6-dev
# and network access to Debian's mirrors for `apt-get download` of the kernel package.
# Runs without root (dpkg -x and cpio need none); everything happens in a scratch directory.
#
# Guest /init: mounts proc/sys/devtmpfs, loads the virtio-net modules in order, configures eth0
# from the kernel command line, applies vsnoop.sysctl, starts `iperf3 -s -D` and
# `tcpsink -D -p 5001`, prints VSNOOP-GUEST-READY and runs an interactive shell on the serial
# console (ttyS0) with echo off. Kernel command line parameters:
#   vsnoop.ip=10.77.0.2/24   address of eth0 (default 10.77.0.2/24)
#   vsnoop.gw=10.77.0.1      optional default route
#   vsnoop.mtu=1500          optional MTU
#   vsnoop.iperf=0           do not start the iperf3 server
#   vsnoop.busy=1            start a CPU hog at nice 19 (a VM with its own load)
#   vsnoop.sink=0            do not start the tcpsink server on port 5001
#   vsnoop.sinkargs=A,B,...  extra tcpsink options, commas become spaces
#                            (e.g. vsnoop.sinkargs=-r,2048,-c,1)
#   vsnoop.sysctl=K=V,K=V    `sysctl -w K=V` for each pair before any service starts; a ':' in
#                            a value becomes a space (net.ipv4.tcp_rmem=4096:131072:1048576)
#
# /bin/tcpsink (source: tests/tools/guest/tcpsink.c, built here with `gcc -static -O2`): per
# connection the client sends an 8-byte big-endian length L and L bytes; the sink reads them
# all and answers one line "<L> <sha256-hex>\n", then closes. Options: -p PORT (5001),
# -r SO_RCVBUF (0 = default), -c read size (65536), -d MS sleep after every read,
# -P BYTES:MS pause once after BYTES received, -D daemonize.
set -euo pipefail

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { printf 'build-guest: ERROR: %s\n' "$*" >&2; exit 1; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
OUT=${VSNOOP_GUEST_DIR:-$REPO/target/guest}
META_PKG=${VSNOOP_GUEST_KERNEL_META:-linux-image-cloud-amd64}
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover
         net_failover virtio_net)

for tool in apt-cache apt-get dpkg dpkg-deb dpkg-query cpio gzip ldd sha256sum find; do
    command -v "$tool" >/dev/null 2>&1 || die "missing tool '$tool' (apt-get install cpio gzip dpkg apt)"
done
# The guest's tcpsink is compiled here (static, no libraries in the guest).
command -v gcc >/dev/null 2>&1 || die "missing tool 'gcc': apt-get install gcc libc6-dev (builds the guest's tcpsink)"
TCPSINK_SRC="$REPO/tests/tools/guest/tcpsink.c"
[ -f "$TCPSINK_SRC" ] || die "missing $TCPSINK_SRC"

# --- inputs -----------------------------------------------------------------------------------
BUSYBOX=""
for cand in /usr/bin/busybox /bin/busybox; do
    if [ -x "$cand" ]; then BUSYBOX=$cand; break; fi
done
[ -n "$BUSYBOX" ] || die "busybox not found: apt-get install busybox-static"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked: apt-get install busybox-static (not busybox)"
fi
IPERF3=$(command -v iperf3 || true)
[ -n "$IPERF3" ] || die "iperf3 not found: apt-get install iperf3"

pkgver() { dpkg-query -W -f '${Version}' "$1" 2>/dev/null || echo none; }

KPKG=$(apt-cache depends "$META_PKG" 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ { print $2; exit }' || true)
[ -n "$KPKG" ] || die "cannot resolve the kernel package behind $META_PKG (run apt-get update?)"
KVER_PKG=$(apt-cache policy "$KPKG" | awk '/Candidate:/ { print $2; exit }')
[ -n "$KVER_PKG" ] && [ "$KVER_PKG" != "(none)" ] || die "no installable candidate for $KPKG"

# Bump IMAGE_LAYOUT whenever the image's contents or /init change in a way the inputs below
# do not capture, so cached images are rebuilt.
IMAGE_LAYOUT=2
STAMP_TEXT=$(cat <<STAMP
layout=$IMAGE_LAYOUT
script=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)
tcpsink=$(sha256sum "$TCPSINK_SRC" | cut -d' ' -f1)
gcc=$(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion) libc6-dev=$(pkgver libc6-dev)
kernel=$KPKG=$KVER_PKG
busybox=$(pkgver busybox-static)
iperf3=$(pkgver iperf3) libiperf0=$(pkgver libiperf0)
STAMP
)

if [ "${VSNOOP_GUEST_REBUILD:-0}" != 1 ] && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initramfs.gz" ] \
    && [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$STAMP_TEXT" ]; then
    log "up to date: $OUT (kernel $KPKG $KVER_PKG)"
    exit 0
fi

log "building guest in $OUT"
log "kernel package: $KPKG $KVER_PKG"
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vsnoop-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- kernel -----------------------------------------------------------------------------------
CACHE="$OUT/cache"
mkdir -p "$CACHE"
DEB=$(find "$CACHE" -maxdepth 1 -name "${KPKG}_*.deb" | head -n1)
if [ -z "$DEB" ] || ! dpkg-deb -f "$DEB" Version | grep -qxF "$KVER_PKG"; then
    rm -f "$CACHE"/linux-image-*.deb
    log "downloading $KPKG=$KVER_PKG"
    (cd "$CACHE" && apt-get download -o APT::Sandbox::User=root "$KPKG=$KVER_PKG") \
        || die "apt-get download $KPKG failed (network to the Debian mirror? apt-get update?)"
    DEB=$(find "$CACHE" -maxdepth 1 -name "${KPKG}_*.deb" | head -n1)
    [ -n "$DEB" ] || die "downloaded package not found in $CACHE"
fi
log "extracting $(basename "$DEB")"
dpkg -x "$DEB" "$WORK/kpkg"
VMLINUZ=$(find "$WORK/kpkg/boot" -name 'vmlinuz-*' | head -n1)
[ -n "$VMLINUZ" ] || die "no vmlinuz in $DEB"
KREL=${VMLINUZ##*/vmlinuz-}
MODDIR="$WORK/kpkg/lib/modules/$KREL"
[ -d "$MODDIR" ] || MODDIR="$WORK/kpkg/usr/lib/modules/$KREL"
[ -d "$MODDIR" ] || die "no module directory for $KREL"
log "kernel release $KREL"

# --- root file system -------------------------------------------------------------------------
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,lib/modules,proc,sys,dev,tmp,etc,root}
mkdir -p "$ROOT/lib64" "$ROOT/lib/x86_64-linux-gnu"
cp "$BUSYBOX" "$ROOT/bin/busybox"
log "installing busybox applets"
for applet in $("$BUSYBOX" --list); do
    case "$applet" in busybox) continue ;; esac
    [ -e "$ROOT/bin/$applet" ] || ln -s busybox "$ROOT/bin/$applet"
done

log "copying modules: ${MODULES[*]}"
: > "$ROOT/lib/modules/order"
for m in "${MODULES[@]}"; do
    f=$(find "$MODDIR" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \
        | head -n1)
    if [ -z "$f" ]; then
        if grep -q "/$m.ko" "$MODDIR/modules.builtin" 2>/dev/null; then
            log "  $m is built in"
            continue
        fi
        die "module $m not found in $KPKG"
    fi
    case "$f" in
        *.ko.xz)  command -v xz >/dev/null || die "xz needed (apt-get install xz-utils)"
                  xz -dc "$f" > "$ROOT/lib/modules/$m.ko" ;;
        *.ko.zst) command -v zstd >/dev/null || die "zstd needed (apt-get install zstd)"
                  zstd -qdc "$f" > "$ROOT/lib/modules/$m.ko" ;;
        *.ko.gz)  gzip -dc "$f" > "$ROOT/lib/modules/$m.ko" ;;
        *)        cp "$f" "$ROOT/lib/modules/$m.ko" ;;
    esac
    echo "$m" >> "$ROOT/lib/modules/order"
done

log "copying $IPERF3 and its libraries"
cp "$IPERF3" "$ROOT/usr/bin/iperf3"
ldd "$IPERF3" | awk '/=>/ { print $3; next } /^[ \t]*\// { print $1 }' | while read -r lib; do
    [ -n "$lib" ] && [ -e "$lib" ] || continue
    dest="$ROOT$lib"
    mkdir -p "$(dirname "$dest")"
    cp -L "$lib" "$dest"
done
[ -e "$ROOT/lib64/ld-linux-x86-64.so.2" ] || die "dynamic loader not copied for iperf3"

log "compiling tcpsink (gcc -static -O2)"
gcc -static -O2 -Wall -o "$ROOT/bin/tcpsink" "$TCPSINK_SRC" \
    || die "gcc -static failed for $TCPSINK_SRC (apt-get install gcc libc6-dev)"
if ldd "$ROOT/bin/tcpsink" >/dev/null 2>&1; then
    die "tcpsink is not statically linked (libc6-dev without libc.a?)"
fi

cat > "$ROOT/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
P
cat > "$ROOT/etc/group" <<'G'
root:x:0:
G
echo "127.0.0.1 localhost" > "$ROOT/etc/hosts"
cat > "$ROOT/etc/services" <<'S'
iperf3 5201/tcp
S

cat > "$ROOT/init" <<'INIT'
#!/bin/sh
# vsnoop test guest init (generated by scripts/build-guest.sh)
export PATH=/bin:/usr/bin:/sbin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
exec </dev/console >/dev/console 2>&1
# Keep kernel messages off the console the test harness parses.
echo 1 > /proc/sys/kernel/printk

say() { echo "vsnoop-guest: $*"; }

IP=10.77.0.2/24 GW= MTU= IPERF=1 BUSY=0 SINK=1 SINKARGS= SYSCTL=
for word in $(cat /proc/cmdline); do
    case "$word" in
        vsnoop.ip=*) IP=${word#vsnoop.ip=} ;;
        vsnoop.gw=*) GW=${word#vsnoop.gw=} ;;
        vsnoop.mtu=*) MTU=${word#vsnoop.mtu=} ;;
        vsnoop.iperf=*) IPERF=${word#vsnoop.iperf=} ;;
        vsnoop.busy=*) BUSY=${word#vsnoop.busy=} ;;
        vsnoop.sink=*) SINK=${word#vsnoop.sink=} ;;
        vsnoop.sinkargs=*) SINKARGS=$(echo "${word#vsnoop.sinkargs=}" | tr ',' ' ') ;;
        vsnoop.sysctl=*) SYSCTL=$(echo "${word#vsnoop.sysctl=}" | tr ',' ' ') ;;
    esac
done

# vsnoop.sysctl=key=value,...: applied before any connection exists (':' in a value -> ' ').
for kv in $SYSCTL; do
    key=${kv%%=*} value=$(echo "${kv#*=}" | tr ':' ' ')
    if sysctl -w "$key=$value" >/dev/null 2>&1; then
        say "sysctl $key=$value"
    else
        say "ERROR: sysctl -w $key=$value failed"
    fi
done

for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m.ko || say "insmod $m failed"
done

n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    [ -n "$MTU" ] && ip link set eth0 mtu "$MTU"
    ip addr add "$IP" dev eth0
    ip link set eth0 up
    [ -n "$GW" ] && ip route add default via "$GW"
    say "eth0 $IP $(cat /sys/class/net/eth0/address)"
else
    say "ERROR: no eth0"
fi
[ "$IPERF" = 1 ] && iperf3 -s -D >/dev/null 2>&1 && say "iperf3 server started"
if [ "$SINK" = 1 ]; then
    # shellcheck disable=SC2086 # SINKARGS is a list of options
    if tcpsink -D -p 5001 $SINKARGS; then
        say "tcpsink started on 5001 $SINKARGS"
    else
        say "ERROR: tcpsink -D -p 5001 $SINKARGS failed"
    fi
fi
# vsnoop.busy=1: a CPU hog at the lowest priority, so the vCPU always has
# work (a VM sharing its core with its own load) while the network stack
# still runs first.
if [ "$BUSY" = 1 ]; then
    # busybox-static has no nice applet: the hog renices itself.
    sh -c 'renice -n 19 -p $$ >/dev/null 2>&1; while :; do :; done' >/dev/null 2>&1 &
    say "busy loop started"
fi

stty -echo 2>/dev/null
export PS1='guest# '
say "$(cat /proc/uptime | cut -d' ' -f1)s"
echo "VSNOOP-GUEST-READY"
# Interactive shell on the serial console, driven by tests/common/guest.rs.
while true; do
    setsid cttyhack sh -i
    say "shell exited, restarting"
done
INIT
chmod 0755 "$ROOT/init"

# --- pack -------------------------------------------------------------------------------------
log "packing initramfs"
(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) \
    | gzip -6 > "$WORK/initramfs.gz"
cp "$VMLINUZ" "$WORK/vmlinuz"
mv -f "$WORK/vmlinuz" "$OUT/vmlinuz"
mv -f "$WORK/initramfs.gz" "$OUT/initramfs.gz"
printf '%s' "$STAMP_TEXT" > "$OUT/stamp"
log "done: $OUT/vmlinuz ($(du -h "$OUT/vmlinuz" | cut -f1)), $OUT/initramfs.gz ($(du -h "$OUT/initramfs.gz" | cut -f1))"
