#!/usr/bin/env bash
# Build (once) the installer base image: an ext4 filesystem holding a small
# Debian userland made with debootstrap, created without mounting
# (mkfs.ext4 -d). The image is cached under build/installer/ and keyed by a
# hash of every input (suite, mirror, package list, size, this script), so a
# second call is instant.
#
# Usage: scripts/installer/build-base.sh        -> prints the image path on stdout
# Env:   INSTALLER_BUILD_DIR (default <repo>/build/installer)
#        INSTALLER_SUITE (bookworm), INSTALLER_MIRROR (http://deb.debian.org/debian)
#        INSTALLER_BASE_SIZE (1G)
# Needs root (debootstrap). Progress goes to stderr, the path to stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build_dir="${INSTALLER_BUILD_DIR:-$repo/build/installer}"
suite="${INSTALLER_SUITE:-bookworm}"
mirror="${INSTALLER_MIRROR:-http://deb.debian.org/debian}"
size="${INSTALLER_BASE_SIZE:-1G}"
# Tools the guest build script uses beyond minbase (coreutils, perl-base,
# util-linux and dd are already essential).
packages="e2fsprogs,squashfs-tools,xorriso,coreutils"

log() { echo "[build-base] $*" >&2; }

# debootstrap + mke2fs build the image; xorriso + unsquashfs let run.sh
# check the guest's ISO on the host.
host_tools=(debootstrap:debootstrap mkfs.ext4:e2fsprogs xorriso:xorriso unsquashfs:squashfs-tools)
missing=()
for t in "${host_tools[@]}"; do
    command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}")
done
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2 || {
        DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
    }
fi

key="$( { echo "$suite $mirror $size $packages"; cat "${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-16)"
img="$build_dir/base-$key.img"
if [[ -s "$img" && -s "$img.sha256" ]]; then
    log "cached: $img"
    echo "$img"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    log "debootstrap needs root"
    exit 1
fi

mkdir -p "$build_dir"
work="$(mktemp -d "$build_dir/base-work.XXXXXX")"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

start=$(date +%s)
log "debootstrap --variant=minbase $suite into $work/root (mirror $mirror)"
debootstrap --variant=minbase --include="$packages" "$suite" "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    log "debootstrap failed"
    exit 1
}
# Trim what the guest never needs; keeps the image (and mkfs time) small.
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"* \
    "$work/root/usr/share/doc/"* "$work/root/usr/share/man/"* "$work/root/usr/share/locale/"*
mkdir -p "$work/root/var/tmp" "$work/root/run" "$work/root/proc" "$work/root/sys" "$work/root/dev"
echo "snapblk-installer-base $suite $key" >"$work/root/etc/snapblk-installer-base"
log "debootstrap done in $(( $(date +%s) - start ))s; $(du -sh "$work/root" | cut -f1) userland"

t=$(date +%s)
# No mounting: mke2fs copies the tree itself. Fixed UUID/hash seed so the same
# tree gives the same image; no journal-less tricks, the guest mounts it rw
# (through the snapshot overlay).
mkfs.ext4 -q -F -L snapblk-root -U 2f1c3e6a-5b7d-4c1e-9a2b-0123456789ab \
    -E hash_seed=6c0d5e7a-1b2c-4d3e-8f40-abcdefabcdef \
    -d "$work/root" "$work/base.img" "$size" >&2
e2fsck -fn "$work/base.img" >&2
sha256sum "$work/base.img" | cut -d' ' -f1 >"$work/base.img.sha256"
mv "$work/base.img.sha256" "$img.sha256"
mv "$work/base.img" "$img"
# Older images (other keys) are dead weight now.
for old in "$build_dir"/base-*.img; do
    [[ "$old" == "$img" ]] || rm -f "$old" "$old.sha256"
done
log "mkfs.ext4 -d + fsck in $(( $(date +%s) - t ))s; total $(( $(date +%s) - start ))s -> $img"
echo "$img"
