#!/usr/bin/env bash
# Boot the test guest interactively (debugging aid): busybox shell on this terminal, one
# vhost-user-blk disk per socket given. Exit the shell to power the guest off.
#
#   scripts/guest-shell.sh SOCKET [SOCKET...]
#   e.g. target/release/snapblk serve --image disk.raw --socket /tmp/vu.sock --num-queues 2 &
#        scripts/guest-shell.sh /tmp/vu.sock
# Environment: GUEST_QUEUES (default 2), GUEST_SMP (default 2), GUEST_MEM_MIB (default 512).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
(($# >= 1)) || { sed -n '2,8p' "$0"; exit 2; }
# shellcheck source=scripts/env.sh
. "$ROOT/scripts/env.sh"
[[ "$SNAPBLK_ENV_OK" == 1 ]] || { echo "missing:$SNAPBLK_ENV_MISSING (run scripts/install-deps.sh)" >&2; exit 1; }
bash "$ROOT/scripts/build-guest.sh" >&2

QUEUES="${GUEST_QUEUES:-2}"
MEM="${GUEST_MEM_MIB:-512}"
# shellcheck disable=SC2054 # commas belong to QEMU option syntax
args=(-machine q35 -accel tcg -smp "${GUEST_SMP:-2}" -m "$MEM" -nodefaults -no-reboot
    -display none -monitor none -serial stdio
    -object "memory-backend-memfd,id=mem,size=${MEM}M,share=on" -numa node,memdev=mem
    -kernel "$GUEST_DIR/vmlinuz" -initrd "$GUEST_DIR/initramfs.cpio.gz"
    -append "console=ttyS0 panic=-1 loglevel=4 no_timer_check")
i=0
for sock in "$@"; do
    [[ -S "$sock" ]] || { echo "$sock is not a socket" >&2; exit 1; }
    args+=(-chardev "socket,id=vu$i,path=$sock" -device "vhost-user-blk-pci,chardev=vu$i,num-queues=$QUEUES")
    i=$((i + 1))
done
[[ -n "$QEMU_DATADIR" ]] && args=(-L "$QEMU_DATADIR" "${args[@]}")
exec "$QEMU" "${args[@]}"
