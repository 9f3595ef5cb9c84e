#!/bin/bash
# Guest side of the installer demo. Runs as PID 1 in the Debian root (the
# snapshot disk /dev/vda, mounted rw by the initramfs) and builds an installer
# image onto /dev/vdb:
#   1. generate a tree (inst.files files, avg inst.kb KiB, every inst.bigevery-th
#      file inst.bigmb MiB on average) of pseudo-random but reproducible bytes
#      (gen-tree.pl) with inst.jobs parallel writers (buffered writes through the page cache
#      of the ext4 root, i.e. into the daemon's snapshot overlay);
#   2. mksquashfs it with inst.jobs processors;
#   3. wrap the squashfs in an ISO 9660 image (xorriso -as mkisofs, no El Torito);
#   4. write the ISO to /dev/vdb from offset 0 with inst.jobs parallel buffered
#      dd streams + fsync, and a 4 KiB header "SNAPBLK-INSTALLER v1 len= sha256="
#      in the last 4 KiB of the disk;
#   5. read it back with O_DIRECT and print
#      "RESULT sha256=<sha of the ISO> len=<bytes> readback=<sha read back>";
#   6. remount / read-only (flushes the ext4 journal) and power off.
# Console markers: "INSTALLER-STAGE <name> t=<guest seconds>", "RESULT ...",
# "INSTALLER-FAIL <why>" on any error.
set -eEuo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C
umask 022
BB=/run/installer/busybox

off() {
    sync
    mount -o remount,ro / 2>/dev/null || echo "INSTALLER-WARN remount ro failed"
    "$BB" poweroff -f
    sleep 60
}
# To the console explicitly: the trap also fires inside $(...) subshells.
trap 'echo "INSTALLER-FAIL line $LINENO: $BASH_COMMAND" >/dev/console; off' ERR

stage() { echo "INSTALLER-STAGE $1 t=$(cut -d' ' -f1 /proc/uptime)"; }

files=2000 kb=16 bigevery=250 bigmb=2 jobs=4 seed=7
read -ra cmdline </proc/cmdline
for a in "${cmdline[@]}"; do
    case "$a" in
    inst.files=*) files="${a#*=}" ;;
    inst.kb=*) kb="${a#*=}" ;;
    inst.bigevery=*) bigevery="${a#*=}" ;;
    inst.bigmb=*) bigmb="${a#*=}" ;;
    inst.jobs=*) jobs="${a#*=}" ;;
    inst.seed=*) seed="${a#*=}" ;;
    esac
done
for v in "$files" "$kb" "$bigevery" "$bigmb" "$jobs" "$seed"; do
    [[ "$v" =~ ^[0-9]+$ ]] || { echo "INSTALLER-FAIL bad parameter '$v'"; off; }
done
((jobs >= 1)) || jobs=1
stage start
echo "INSTALLER params files=$files kb=$kb bigevery=$bigevery bigmb=$bigmb jobs=$jobs seed=$seed cpus=$(nproc)"

w=/var/tmp/inst
rm -rf "$w"
mkdir -p "$w/tree" "$w/iso/live" "$w/iso/.disk"

stage tree
pids=()
for ((k = 0; k < jobs; k++)); do
    perl /run/installer/gen-tree.pl "$w/tree" "$files" "$kb" "$bigevery" "$bigmb" "$seed" "$jobs" "$k" &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
nfiles=$(find "$w/tree" -type f | wc -l)
treebytes=$(du -sb "$w/tree" | cut -f1)
echo "INSTALLER tree files=$nfiles bytes=$treebytes"
[[ "$nfiles" == "$files" ]] || { echo "INSTALLER-FAIL expected $files files, found $nfiles"; off; }

stage squashfs
# Reproducible: fixed times and owner, so the host can rebuild the same bytes.
mksquashfs "$w/tree" "$w/iso/live/filesystem.squashfs" -noappend -comp gzip \
    -processors "$jobs" -mkfs-time 0 -all-time 0 -all-root -no-progress -quiet
echo "INSTALLER mksquashfs-version $(mksquashfs -version 2>&1 | awk 'NR == 1 { print $3 }')"
echo "INSTALLER squashfs bytes=$(stat -c %s "$w/iso/live/filesystem.squashfs")"

stage iso
echo "snapblk installer demo seed=$seed files=$files" >"$w/iso/.disk/info"
(cd "$w/iso" && sha256sum live/filesystem.squashfs >SHA256SUMS)
xorriso -as mkisofs -quiet -o "$w/installer.iso" -V SNAPBLK_INSTALLER -r -J "$w/iso" 2>&1 |
    grep -v '^xorriso : UPDATE' || true
len=$(stat -c %s "$w/installer.iso")
sha=$(sha256sum "$w/installer.iso" | cut -d' ' -f1)
echo "INSTALLER iso bytes=$len"

stage write
disk=$(blockdev --getsize64 /dev/vdb)
((len + 4096 <= disk)) || { echo "INSTALLER-FAIL iso ($len) does not fit /dev/vdb ($disk)"; off; }
mib=$(((len + (1 << 20) - 1) >> 20))
chunk=$(((mib + jobs - 1) / jobs))
pids=()
for ((k = 0; k < jobs; k++)); do
    s=$((k * chunk))
    ((s < mib)) || break
    dd if="$w/installer.iso" of=/dev/vdb bs=1M skip="$s" seek="$s" count="$chunk" \
        conv=notrunc,fsync status=none &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
# Length header in the last 4 KiB of the disk, so the host can find the
# image without the console.
head -c 4096 /dev/zero >"$w/header"
printf 'SNAPBLK-INSTALLER v1 len=%s sha256=%s\n' "$len" "$sha" | dd of="$w/header" conv=notrunc status=none
dd if="$w/header" of=/dev/vdb bs=4096 seek=$((disk / 4096 - 1)) count=1 conv=notrunc,fsync status=none
sync
blockdev --flushbufs /dev/vdb

stage readback
rb=$(dd if=/dev/vdb bs=1M count="$len" iflag=direct,count_bytes status=none | sha256sum | cut -d' ' -f1)
echo "RESULT sha256=$sha len=$len readback=$rb"
[[ "$rb" == "$sha" ]] || { echo "INSTALLER-FAIL readback mismatch"; off; }

stage "done"
off
