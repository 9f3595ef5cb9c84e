#!/usr/bin/env bash
# Build the installer initramfs on top of the test guest's one
# (build/guest/initramfs.cpio.gz from scripts/build-guest.sh: static busybox,
# /dev/console, the six virtio modules): append a second cpio holding
#   /init                       init.sh (mount /dev/vda, switch_root)
#   /installer/guest-build.sh   the build run as PID 1 in the Debian root
#   /installer/gen-tree.pl      its tree generator
#   /installer/modules.order    insmod order (virtio chain, then ext4 and deps)
#   /lib/modules/*.ko           ext4 and its dependencies for the guest kernel
# The kernel unpacks concatenated archives in order, so our /init wins.
# Cached under build/installer/, keyed by a hash of the inputs.
#
# Usage: scripts/installer/build-initramfs.sh   -> prints the path on stdout
# Needs scripts/install-deps.sh to have run (build-guest.sh needs root).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=../env.sh
. "$repo/scripts/env.sh"
build_dir="${INSTALLER_BUILD_DIR:-$repo/build/installer}"

log() { echo "[build-initramfs] $*" >&2; }

bash "$repo/scripts/build-guest.sh" >&2
base="$GUEST_DIR/initramfs.cpio.gz"
[[ -s "$base" ]] || { log "$base missing after build-guest.sh"; exit 1; }

# Loaded in this order; the six virtio ones are already in the base archive.
virtio="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk"
# ext4 asks for crc32c through the crypto API (which would need modprobe), so
# crc32c_generic is loaded up front.
ext4="crc16 mbcache jbd2 crc32c_generic ext4"

key="$( { echo "$KERNEL_VER"; sha256sum "$base" "$here/init.sh" "$here/guest-build.sh" "$here/gen-tree.pl" "${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-16)"
out="$build_dir/initramfs-$key.cpio.gz"
if [[ -s "$out" ]]; then
    echo "$out"
    exit 0
fi

mkdir -p "$build_dir"
work="$(mktemp -d "$build_dir/initramfs-work.XXXXXX")"
trap 'rm -rf "$work"' EXIT
tree="$work/tree"
mkdir -p "$tree/installer" "$tree/lib/modules"
order=()
for m in $virtio; do order+=("$m"); done
for m in $ext4; do
    if grep -q "/$m\.ko" "$MODULES/modules.builtin" 2>/dev/null; then
        continue # built into this kernel: nothing to load
    fi
    rel="$(grep -m1 -E "(^|/)$m\.ko(\.[a-z]+)?:" "$MODULES/modules.dep" | cut -d: -f1 || true)"
    [[ -n "$rel" ]] || { log "module $m not found for $KERNEL_VER"; exit 1; }
    dst="$tree/lib/modules/$m.ko"
    case "$rel" in
    *.ko) cp "$MODULES/$rel" "$dst" ;;
    *.ko.xz) xz -dc "$MODULES/$rel" >"$dst" ;;
    *.ko.zst) zstd -qdc "$MODULES/$rel" >"$dst" ;;
    *.ko.gz) gzip -dc "$MODULES/$rel" >"$dst" ;;
    *) log "unknown module format $rel"; exit 1 ;;
    esac
    order+=("$m")
done
printf '%s\n' "${order[@]}" >"$tree/installer/modules.order"
install -m 0755 "$here/init.sh" "$tree/init"
install -m 0755 "$here/guest-build.sh" "$tree/installer/guest-build.sh"
install -m 0644 "$here/gen-tree.pl" "$tree/installer/gen-tree.pl"

cp "$base" "$work/initramfs.cpio.gz"
(cd "$tree" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >>"$work/initramfs.cpio.gz"
mv "$work/initramfs.cpio.gz" "$out"
for old in "$build_dir"/initramfs-*.cpio.gz; do
    [[ "$old" == "$out" ]] || rm -f "$old"
done
log "built $out ($(stat -c %s "$out") bytes; modules: ${order[*]})"
echo "$out"
