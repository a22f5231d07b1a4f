#!/usr/bin/env bash
# build-guest-image.sh OUTDIR
#
# Builds the small Linux test guest that Hangar's QEMU driver tests (crates/hangar-qemu)
# boot under QEMU/TCG, from Debian packages only. Also installs the host side: QEMU
# (qemu-system-x86 + qemu-utils, named together in one apt-get, see below).
#
# Layout of OUTDIR when done:
#   vmlinuz        the Debian kernel (linux-image-amd64), copied from /boot
#   initrd.img     gzip'd cpio initramfs, the guest's root filesystem (in RAM):
#                    /init -> busybox (busybox-static, every applet as a symlink)
#                    /etc/inittab, /etc/init.d/rcS (boot), /etc/init.d/rcK (shutdown)
#                    /lib/modules/<kver>/...  virtio (pci, net, blk, console), ext4 and its
#                                   helpers, ACPI button, evdev; modules.dep from depmod
#                    /usr/bin/qemu-ga + the shared libraries ldd lists for it
#                                   (from `apt-get download qemu-guest-agent`, never installed)
#                    /sbin/shutdown  a tiny script so qemu-ga's guest-shutdown works
#                  At boot rcS loads the modules, brings eth0 up with DHCP (udhcpc), mounts
#                  the data disk /dev/vda on /data, starts qemu-ga on the virtio-serial port
#                  named org.qemu.guest_agent.0, an HTTP server (busybox httpd, port 8080,
#                  serving /www; GET /index.html answers "hello-from-guest"), a TCP echo
#                  service (busybox nc -ll -e cat, port 7777), a watcher that powers off on
#                  the ACPI power button, and prints HANGAR-GUEST-READY on the serial console.
#   disk.qcow2     256 MiB qcow2 holding an ext4 filesystem (label hangar-data) that the
#                  guest mounts read-write on /data. It holds /data/golden ("golden-v1").
#                  VMs use it as a read-only base under their own overlay.
#   image.json     descriptor the driver reads: {"disk","kernel","initrd","append","os",
#                  "architecture","memory_mb"} (paths relative to OUTDIR).
#   .build-hash    sha256 of this script; when it matches, the script does nothing.
#
# Boot it by hand:
#   qemu-system-x86_64 -accel tcg -m 128 -display none -serial stdio \
#     -kernel OUTDIR/vmlinuz -initrd OUTDIR/initrd.img -append "console=ttyS0 panic=-1 quiet" \
#     -drive file=overlay.qcow2,if=virtio,format=qcow2 -netdev user,id=n0,restrict=on \
#     -device virtio-net-pci,netdev=n0 -device virtio-serial-pci \
#     -chardev socket,path=qga.sock,server=on,wait=off,id=qga0 \
#     -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0
#
# Idempotent: re-running with the same script version and an intact OUTDIR is a no-op.
# Needs root (apt-get). Only Debian's package mirror is contacted.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi

START=$(date +%s.%N)
SCRIPT_PATH=$(readlink -f "$0")
OUTDIR=$1
mkdir -p "$OUTDIR"
OUTDIR=$(readlink -f "$OUTDIR")
HASH=$(sha256sum "$SCRIPT_PATH" | cut -d' ' -f1)

elapsed() { awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

have_host_tools() {
    command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null &&
        qemu-img --help >/dev/null 2>&1
}

if [ -f "$OUTDIR/.build-hash" ] && [ "$(cat "$OUTDIR/.build-hash")" = "$HASH" ] &&
    [ -s "$OUTDIR/vmlinuz" ] && [ -s "$OUTDIR/initrd.img" ] && [ -s "$OUTDIR/disk.qcow2" ] &&
    [ -s "$OUTDIR/image.json" ] && have_host_tools; then
    echo "build-guest-image: $OUTDIR is up to date (script $HASH); nothing to do ($(elapsed) s)"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Host packages. qemu-system-x86 and qemu-utils must be named in ONE apt-get: the machine
# image may carry a newer qemu-utils from backports that conflicts with bookworm's system
# emulator, and apt would otherwise drop qemu-img. `qemu-utils/bookworm` with
# --allow-downgrades pins the matching 7.2 build.
PKGS="qemu-system-x86 qemu-utils linux-image-amd64 busybox-static cpio e2fsprogs kmod libc-bin
      libglib2.0-0 libnuma1 libudev1 liburing2"
need_install=0
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_install=1
done
have_host_tools || need_install=1
if [ "$need_install" = 1 ]; then
    echo "build-guest-image: installing host packages"
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends --allow-downgrades \
        qemu-system-x86 qemu-utils/bookworm linux-image-amd64 busybox-static cpio e2fsprogs kmod \
        libc-bin libglib2.0-0 libnuma1 libudev1 liburing2 >/dev/null
fi
have_host_tools || { echo "build-guest-image: qemu-img or qemu-system-x86_64 missing after install" >&2; exit 1; }

KERNEL=$(find /boot -maxdepth 1 -name 'vmlinuz-*-amd64' | sort -V | tail -n1)
[ -n "$KERNEL" ] || { echo "build-guest-image: no /boot/vmlinuz-*-amd64" >&2; exit 1; }
KV=${KERNEL#/boot/vmlinuz-}
[ -d "/lib/modules/$KV" ] || { echo "build-guest-image: no /lib/modules/$KV" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hangar-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc/init.d,proc,sys,dev,tmp,run,var/run,data,www,root,lib64}

# --- busybox ---------------------------------------------------------------------------
cp /bin/busybox "$ROOT/bin/busybox"
for applet in $(/bin/busybox --list-full); do
    [ -e "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
done
ln -sf /bin/busybox "$ROOT/init"

# --- kernel modules --------------------------------------------------------------------
MODS="virtio_pci virtio_net virtio_blk virtio_console crc32c_generic ext4 button evdev"
for m in $MODS; do
    modprobe --show-depends --set-version="$KV" "$m" | awk '$1 == "insmod" { print $2 }'
done | sort -u | while read -r ko; do
    mkdir -p "$ROOT$(dirname "$ko")"
    cp "$ko" "$ROOT$ko"
done
for f in modules.builtin modules.builtin.modinfo modules.order; do
    [ -e "/lib/modules/$KV/$f" ] && cp "/lib/modules/$KV/$f" "$ROOT/lib/modules/$KV/"
done
depmod -b "$ROOT" "$KV"

# --- qemu-guest-agent and its libraries -------------------------------------------------
# apt drops privileges to _apt for downloads: give it a directory it can write.
mkdir -p "$WORK/dl" && chmod 0777 "$WORK/dl" && chmod 0755 "$WORK"
(cd "$WORK/dl" && apt-get download -qq qemu-guest-agent >/dev/null)
dpkg-deb -x "$WORK"/dl/qemu-guest-agent_*.deb "$WORK/qga"
QGA=$WORK/qga/usr/sbin/qemu-ga
[ -x "$QGA" ] || { echo "build-guest-image: qemu-ga not found in the package" >&2; exit 1; }
cp "$QGA" "$ROOT/usr/bin/qemu-ga"
if ldd "$QGA" | grep -q 'not found'; then
    echo "build-guest-image: qemu-ga needs libraries the host lacks:" >&2
    ldd "$QGA" | grep 'not found' >&2
    exit 1
fi
for lib in $(ldd "$QGA" | awk '/=>/ { print $3 } !/=>/ && $1 ~ /^\// { print $1 }'); do
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
done

# --- configuration and init scripts ---------------------------------------------------
echo 'root:x:0:0:root:/root:/bin/sh' >"$ROOT/etc/passwd"
echo 'root:x:0:' >"$ROOT/etc/group"
echo 'hangar-guest' >"$ROOT/etc/hostname"
echo 'hello-from-guest' >"$ROOT/www/index.html"

cat >"$ROOT/etc/inittab" <<'EOF'
::sysinit:/etc/init.d/rcS
::shutdown:/etc/init.d/rcK
EOF

cat >"$ROOT/etc/init.d/rcS" <<'EOF'
#!/bin/sh
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /run /var/run /tmp
mount -t tmpfs tmpfs /tmp
hostname -F /etc/hostname
for m in virtio_pci virtio_net virtio_blk virtio_console crc32c_generic ext4 button evdev; do
    modprobe "$m" 2>/dev/null
done
ip link set lo up
# Wait briefly for the devices the modules create.
i=0
while [ $i -lt 50 ] && ! [ -e /sys/class/net/eth0 ]; do usleep 100000; i=$((i+1)); done
ip link set eth0 up 2>/dev/null
udhcpc -b -q -t 20 -T 1 -i eth0 -s /etc/udhcpc.script >/dev/null 2>&1 &
i=0
while [ $i -lt 50 ] && ! [ -b /dev/vda ]; do usleep 100000; i=$((i+1)); done
if [ -b /dev/vda ]; then
    mount -t ext4 /dev/vda /data || echo "rcS: cannot mount /dev/vda" >/dev/console
fi
for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] || continue
    if [ "$(cat "$p/name")" = org.qemu.guest_agent.0 ]; then
        qemu-ga -m virtio-serial -p "/dev/$(basename "$p")" -d -f /run/qemu-ga.pid
    fi
done
httpd -p 8080 -h /www
nc -ll -p 7777 -e /bin/cat &
for e in /sys/class/input/event*; do
    [ -e "$e/device/name" ] || continue
    if [ "$(cat "$e/device/name")" = "Power Button" ]; then
        (head -c 24 "/dev/input/$(basename "$e")" >/dev/null && poweroff) &
    fi
done
echo HANGAR-GUEST-READY >/dev/console
EOF

cat >"$ROOT/etc/init.d/rcK" <<'EOF'
#!/bin/sh
sync
umount /data 2>/dev/null
EOF

cat >"$ROOT/etc/udhcpc.script" <<'EOF'
#!/bin/sh
case "$1" in
    deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        for r in $router; do ip route add default via "$r" dev "$interface"; break; done
        : >/etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done ;;
esac
exit 0
EOF

cat >"$ROOT/sbin/shutdown" <<'EOF'
#!/bin/sh
# qemu-ga runs `shutdown -P|-r|-H +0`; busybox has no shutdown applet.
case "$*" in
    *-r*) exec reboot ;;
    *-H*) exec halt ;;
    *) exec poweroff ;;
esac
EOF
chmod 0755 "$ROOT/etc/init.d/rcS" "$ROOT/etc/init.d/rcK" "$ROOT/etc/udhcpc.script" "$ROOT/sbin/shutdown"

(cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -1) >"$WORK/initrd.img"

# --- data disk -------------------------------------------------------------------------
mkdir -p "$WORK/data"
echo 'golden-v1' >"$WORK/data/golden"
truncate -s 256M "$WORK/data.raw"
mkfs.ext4 -q -F -L hangar-data -d "$WORK/data" "$WORK/data.raw"
qemu-img convert -q -f raw -O qcow2 "$WORK/data.raw" "$WORK/disk.qcow2"

cat >"$WORK/image.json" <<EOF
{
  "disk": "disk.qcow2",
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "append": "console=ttyS0 panic=-1 quiet",
  "os": "linux",
  "architecture": "x86_64",
  "memory_mb": 128,
  "kernel_version": "$KV"
}
EOF

# Install into OUTDIR; the hash goes last so an interrupted run is never taken as done.
rm -f "$OUTDIR/.build-hash"
cp "$KERNEL" "$OUTDIR/vmlinuz"
cp "$WORK/initrd.img" "$WORK/disk.qcow2" "$WORK/image.json" "$OUTDIR/"
chmod 0444 "$OUTDIR/disk.qcow2"
echo "$HASH" >"$OUTDIR/.build-hash"

echo "build-guest-image: built in $OUTDIR ($(elapsed) s):"
echo "  kernel  vmlinuz     $KV, $(du -h "$OUTDIR/vmlinuz" | cut -f1)"
echo "  initrd  initrd.img  busybox + qemu-ga + modules, $(du -h "$OUTDIR/initrd.img" | cut -f1)"
echo "  disk    disk.qcow2  256 MiB ext4 data disk (/data), $(du -h "$OUTDIR/disk.qcow2" | cut -f1) allocated"
