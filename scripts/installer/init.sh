#!/bin/busybox sh
# /init of the installer initramfs. It is appended over the test guest's
# initramfs (scripts/build-guest.sh: busybox with applet links, /dev/console,
# the virtio modules in /lib/modules) and replaces its /init. Loads the
# virtio-blk and ext4 modules, mounts /dev/vda (the snapshot root served by the vhost-user daemon)
# read-write, hands the guest build script in on a tmpfs at /run/installer and
# switch_roots into the Debian userland to run it as PID 1.
# Any failure prints "INSTALLER-FAIL <why>" on the console and powers off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

fail() {
    echo "INSTALLER-FAIL initramfs: $*"
    sync
    poweroff -f
}

mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"

# Order matters: each module's dependencies come first (no modprobe here).
while read -r m; do
    insmod "/lib/modules/$m.ko" || fail "insmod $m"
done </installer/modules.order

i=0
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do
    i=$((i + 1))
    [ $i -gt 300 ] && fail "no /dev/vda and /dev/vdb after 30s"
    sleep 0.1
done

mkdir -p /newroot
mount -t ext4 -o rw /dev/vda /newroot || fail "mount /dev/vda"
mount -t tmpfs -o mode=0755,size=64m tmpfs /newroot/run || fail "tmpfs on /newroot/run"
mkdir -p /newroot/run/installer
cp /installer/guest-build.sh /installer/gen-tree.pl /bin/busybox /newroot/run/installer/ || fail "copy build script"
echo "INSTALLER-STAGE root-mounted t=$(cut -d' ' -f1 /proc/uptime)"
mount --move /dev /newroot/dev || fail "move /dev"
mount --move /proc /newroot/proc || fail "move /proc"
mount --move /sys /newroot/sys || fail "move /sys"
# shellcheck disable=SC2093 # exec only returns when switch_root fails
exec switch_root /newroot /bin/bash /run/installer/guest-build.sh
fail "switch_root"
