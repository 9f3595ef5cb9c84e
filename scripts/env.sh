# shellcheck shell=bash
# Source this file: `. scripts/env.sh`. It only looks things up; it installs nothing
# (run scripts/install-deps.sh first). Exports:
#   SNAPBLK_ROOT   the workspace root
#   QEMU           path of qemu-system-x86_64 (PATH first, else build/qemu/usr/bin/)
#   QEMU_DATADIR   the directory to pass as `-L` (empty when QEMU from PATH knows its own)
#   QEMU_MODULE_DIR  where the extracted QEMU finds accel-tcg-x86_64.so (unset for PATH QEMU)
#   KERNEL_VER     the guest kernel version (newest /boot/vmlinuz-* that has virtio_blk)
#   KERNEL         /boot/vmlinuz-$KERNEL_VER
#   MODULES        /lib/modules/$KERNEL_VER
#   GUEST_DIR      build/guest (output of scripts/build-guest.sh)
# Every variable already set in the environment is kept as is (override hook).
# SNAPBLK_ENV_OK=1 when all of QEMU, KERNEL and MODULES were found, else 0 and
# SNAPBLK_ENV_MISSING lists what is missing.

SNAPBLK_ROOT="${SNAPBLK_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export SNAPBLK_ROOT
SNAPBLK_ENV_MISSING=""

if [[ -z "${QEMU:-}" ]]; then
    if command -v qemu-system-x86_64 >/dev/null 2>&1; then
        QEMU="$(command -v qemu-system-x86_64)"
        QEMU_DATADIR="${QEMU_DATADIR:-}"
    elif [[ -x "$SNAPBLK_ROOT/build/qemu/usr/bin/qemu-system-x86_64" ]]; then
        QEMU="$SNAPBLK_ROOT/build/qemu/usr/bin/qemu-system-x86_64"
        QEMU_DATADIR="${QEMU_DATADIR:-$SNAPBLK_ROOT/build/qemu/share}"
        QEMU_MODULE_DIR="${QEMU_MODULE_DIR:-$SNAPBLK_ROOT/build/qemu/usr/lib/x86_64-linux-gnu/qemu}"
    else
        QEMU=""
        SNAPBLK_ENV_MISSING+=" qemu-system-x86_64"
    fi
fi
QEMU_DATADIR="${QEMU_DATADIR:-}"
QEMU_MODULE_DIR="${QEMU_MODULE_DIR:-}"
export QEMU QEMU_DATADIR
# QEMU reads QEMU_MODULE_DIR itself; export it only when set (an empty value would be used).
if [[ -n "$QEMU_MODULE_DIR" ]]; then export QEMU_MODULE_DIR; else unset QEMU_MODULE_DIR; fi

if [[ -z "${KERNEL_VER:-}" ]]; then
    KERNEL_VER=""
    # Newest first (version sort), keep the first one whose modules include virtio_blk.
    for k in $(find /boot -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null | sort -V -r); do
        v="${k#/boot/vmlinuz-}"
        if compgen -G "/lib/modules/$v/kernel/drivers/block/virtio_blk.ko*" >/dev/null; then
            KERNEL_VER="$v"
            break
        fi
    done
    unset k v
fi
if [[ -n "$KERNEL_VER" ]]; then
    KERNEL="${KERNEL:-/boot/vmlinuz-$KERNEL_VER}"
    MODULES="${MODULES:-/lib/modules/$KERNEL_VER}"
else
    KERNEL="${KERNEL:-}"
    MODULES="${MODULES:-}"
    SNAPBLK_ENV_MISSING+=" kernel(linux-image-amd64)"
fi
export KERNEL_VER KERNEL MODULES

GUEST_DIR="${GUEST_DIR:-$SNAPBLK_ROOT/build/guest}"
export GUEST_DIR

if [[ -z "$SNAPBLK_ENV_MISSING" ]]; then SNAPBLK_ENV_OK=1; else SNAPBLK_ENV_OK=0; fi
export SNAPBLK_ENV_OK SNAPBLK_ENV_MISSING
