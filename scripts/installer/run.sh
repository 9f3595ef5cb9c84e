#!/usr/bin/env bash
# Installer demo (issue 7): build an installer image inside a real Linux guest
# whose root disk and output disk are both served over vhost-user-blk.
#
#   1. base:     cached Debian minbase ext4 image (build-base.sh, no mounting)
#   2. initramfs: the test guest's initramfs + our /init (switch_root) and
#                guest-build.sh (build-initramfs.sh)
#   3. daemons:  root disk = base image with a throwaway snapshot overlay,
#                output disk = empty 1 GiB qcow2; 2 queues, write-back cache
#   4. boot:     QEMU (TCG) until the guest build starts
#   5. build:    the guest generates a tree, mksquashfs, xorriso, dd to /dev/vdb,
#                prints "RESULT sha256=.. len=.."
#   6. shutdown: guest powers off, QEMU exits, daemons stop
#   7. verify:   the sha256 of the first len bytes of the output qcow2 (exported
#                to raw) equals the guest's; the length header at the end of the
#                disk agrees; the base image is bit-identical; `qemu-img check`
#                passes on the output qcow2 and on the kept snapshot overlay;
#                e2fsck is clean on the root filesystem the guest left; the
#                ISO is readable on the host and its squashfs is byte-identical
#                to one the host builds from the same generated tree.
# Prints the wall time of each phase and "INSTALLER-DEMO OK" on success; exits
# non-zero with "INSTALLER-DEMO FAILED: why" otherwise.
#
# Options (defaults are the full demo; the e2e test passes smaller ones):
#   --files N --kb K --bigevery N --bigmb M   tree shape (see guest-build.sh)
#   --jobs J       parallel writers / mksquashfs processors / dd streams (4)
#   --seed S       content seed (7)
#   --smp N --mem MiB   guest CPUs (2) and RAM (1024)
#   --queues Q     virtqueues per disk (2)
#   --out-size SZ  output disk size (1G)
#   --work DIR     keep all files there (default build/installer/run, wiped)
#   --daemon D     snapblk | qsd | snapblk-raw | auto
#                  snapblk: snapblk serves both disks (needs `serve --snapshot`
#                    and qcow2 images); qsd: qemu-storage-daemon stands in;
#                  snapblk-raw: snapblk on raw files only (root = sparse copy
#                    of the base, output = raw file), for a snapblk without
#                    qcow2/snapshot support; no qcow2 checks then.
#                  auto: snapblk if it offers `serve --snapshot`, else qsd.
#   --timeout S    give up on the guest after S seconds (3600)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=../env.sh
. "$repo/scripts/env.sh"

files=4000 kb=12 bigevery=250 bigmb=4 jobs=4 seed=7
smp=2 mem=1024 queues=2 out_size=1G timeout=3600
work="$repo/build/installer/run"
daemon="${INSTALLER_DAEMON:-auto}"
SNAPBLK="${SNAPBLK:-$repo/target/release/snapblk}"

while (($#)); do
    case "$1" in
    --files) files="$2"; shift 2 ;;
    --kb) kb="$2"; shift 2 ;;
    --bigevery) bigevery="$2"; shift 2 ;;
    --bigmb) bigmb="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --smp) smp="$2"; shift 2 ;;
    --mem) mem="$2"; shift 2 ;;
    --queues) queues="$2"; shift 2 ;;
    --out-size) out_size="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --daemon) daemon="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for v in "$files" "$kb" "$bigevery" "$bigmb" "$jobs" "$seed" "$smp" "$mem" "$queues" "$timeout"; do
    [[ "$v" =~ ^[0-9]+$ ]] || { echo "not a number: $v" >&2; exit 2; }
done

log() { echo "[installer] $*"; }
fail() {
    echo "INSTALLER-DEMO FAILED: $*"
    exit 1
}
now() { date +%s.%N; }
phase_names=()
phase_secs=()
phase_start=""
begin() {
    phase_start=$(now)
    log "== $1"
}
end() {
    phase_names+=("$1")
    phase_secs+=("$(awk -v a="$phase_start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')")
}
report_phases() {
    local i total=0
    echo "Phase timings (wall clock, seconds):"
    for i in "${!phase_names[@]}"; do
        printf '  %-10s %8s\n' "${phase_names[$i]}" "${phase_secs[$i]}"
        total=$(awk -v a="$total" -v b="${phase_secs[$i]}" 'BEGIN { printf "%.1f", a + b }')
    done
    printf '  %-10s %8s\n' total "$total"
}

[[ "$SNAPBLK_ENV_OK" == 1 ]] || fail "missing:$SNAPBLK_ENV_MISSING (run scripts/install-deps.sh)"

# Processes we started, by pid; stopped on every exit path.
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    pids=()
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# ---------------------------------------------------------------------------
# The daemon: the ONE place that knows how to create, serve and export disks.
# ---------------------------------------------------------------------------
snapblk_can() { [[ -x "$SNAPBLK" ]] && "$SNAPBLK" "$1" --help 2>/dev/null | grep -q -- "$2"; }
if [[ "$daemon" == auto ]]; then
    if snapblk_can serve --snapshot && snapblk_can serve --keep-overlay; then daemon=snapblk; else daemon=qsd; fi
fi
case "$daemon" in
snapblk) snapblk_can serve --snapshot || fail "$SNAPBLK has no 'serve --snapshot' (cargo build --release -p snapblk)" ;;
snapblk-raw) snapblk_can serve --image || fail "$SNAPBLK cannot serve (cargo build --release -p snapblk)" ;;
qsd) command -v qemu-storage-daemon >/dev/null || fail "qemu-storage-daemon not found" ;;
*) fail "--daemon must be snapblk, qsd, snapblk-raw or auto" ;;
esac
# Disk image format behind the daemon.
if [[ "$daemon" == snapblk-raw ]]; then fmt=raw ext=img; else fmt=qcow2 ext=qcow2; fi

# create_disk PATH SIZE: an empty disk ($fmt).
create_disk() {
    if [[ "$fmt" == raw ]]; then
        truncate -s "$2" "$1"
    elif [[ "$daemon" == snapblk ]] && snapblk_can create --size; then
        "$SNAPBLK" create --size "$2" "$1" >/dev/null
    else
        qemu-img create -q -f qcow2 "$1" "$2"
    fi
}
# start_daemon NAME IMAGE SOCKET MODE [OVERLAY]: serve IMAGE on SOCKET in the
# background. MODE=snapshot: IMAGE stays untouched, writes go to OVERLAY (a
# qcow2 kept after exit for checking; for snapblk-raw a sparse copy of IMAGE).
# MODE=rw: IMAGE itself takes the writes.
start_daemon() {
    local name="$1" img="$2" sock="$3" mode="$4" ovl="${5:-}"
    local -a cmd
    rm -f "$sock"
    if [[ "$daemon" == snapblk-raw ]]; then
        [[ "$mode" == snapshot ]] && { cp --sparse=always "$img" "$ovl"; img="$ovl"; }
        cmd=("$SNAPBLK" serve --image "$img" --socket "$sock" --num-queues "$queues" --cache writeback)
    elif [[ "$daemon" == snapblk ]]; then
        cmd=("$SNAPBLK" serve --image "$img" --socket "$sock" --num-queues "$queues" --cache writeback)
        [[ "$mode" == snapshot ]] && cmd+=(--snapshot --keep-overlay "$ovl")
    else
        local file="$img"
        if [[ "$mode" == snapshot ]]; then
            qemu-img create -q -f qcow2 -b "$img" -F raw "$ovl"
            file="$ovl"
        fi
        cmd=(qemu-storage-daemon
            --blockdev "driver=file,node-name=${name}-file,filename=$file,cache.direct=off"
            --blockdev "driver=qcow2,node-name=$name,file=${name}-file"
            --export "type=vhost-user-blk,id=${name}-exp,node-name=$name,addr.type=unix,addr.path=$sock,writable=on,num-queues=$queues")
    fi
    echo "${cmd[*]}" >"$work/$name.cmdline"
    "${cmd[@]}" >"$work/$name.log" 2>&1 &
    pids+=($!)
    last_pid=$!
}
# export_raw DISK RAW: the guest-visible bytes of DISK as a raw file.
export_raw() {
    if [[ "$fmt" == raw ]]; then
        cp --sparse=always "$1" "$2"
    elif [[ "$daemon" == snapblk ]] && snapblk_can export "Usage:"; then
        "$SNAPBLK" export "$1" "$2"
    else
        qemu-img convert -f qcow2 -O raw "$1" "$2"
    fi
}
# ---------------------------------------------------------------------------

mkdir -p "$(dirname "$work")"
rm -rf "$work"
mkdir -p "$work"
log "work dir $work; daemon: $daemon; tree files=$files kb=$kb bigevery=$bigevery bigmb=$bigmb jobs=$jobs; guest smp=$smp mem=${mem}M queues=$queues"

begin base
base="$("$here/build-base.sh")"
base_sha_before="$(cat "$base.sha256")"
initrd="$("$here/build-initramfs.sh")"
# For tests that re-check the result on their own.
printf 'BASE=%s\nBASE_SHA256=%s\nDAEMON=%s\nFORMAT=%s\nFILES=%s\n' "$base" "$base_sha_before" "$daemon" "$fmt" "$files" >"$work/run.env"
end base

begin daemons
root_sock="$work/root.sock" out_sock="$work/out.sock"
root_ovl="$work/root-overlay.$ext" out_img="$work/out.$ext"
create_disk "$out_img" "$out_size"
start_daemon root "$base" "$root_sock" snapshot "$root_ovl"
root_pid=$last_pid
start_daemon out "$out_img" "$out_sock" rw
out_pid=$last_pid
for _ in $(seq 300); do
    [[ -S "$root_sock" && -S "$out_sock" ]] && break
    kill -0 "$root_pid" 2>/dev/null || { cat "$work/root.log"; fail "root daemon exited"; }
    kill -0 "$out_pid" 2>/dev/null || { cat "$work/out.log"; fail "output daemon exited"; }
    sleep 0.1
done
[[ -S "$root_sock" && -S "$out_sock" ]] || fail "daemon sockets did not appear in 30 s"
end daemons

begin boot
serial="$work/serial.log"
append="console=ttyS0 panic=-1 loglevel=4 no_timer_check inst.files=$files inst.kb=$kb inst.bigevery=$bigevery"
append+=" inst.bigmb=$bigmb inst.jobs=$jobs inst.seed=$seed"
qemu_cmd=("$QEMU")
[[ -n "$QEMU_DATADIR" ]] && qemu_cmd+=(-L "$QEMU_DATADIR")
qemu_cmd+=(-machine "q35,accel=tcg" -cpu max -smp "$smp" -m "${mem}M"
    -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -numa "node,memdev=mem"
    -kernel "$KERNEL" -initrd "$initrd" -append "$append"
    -chardev "socket,id=root,path=$root_sock" -device "vhost-user-blk-pci,chardev=root,num-queues=$queues,bootindex=1"
    -chardev "socket,id=out,path=$out_sock" -device "vhost-user-blk-pci,chardev=out,num-queues=$queues"
    -display none -monitor none -serial "file:$serial" -nic none -no-reboot)
echo "${qemu_cmd[*]}" >"$work/qemu.cmdline"
"${qemu_cmd[@]}" >"$work/qemu.log" 2>&1 &
qemu_pid=$!
pids+=("$qemu_pid")
deadline=$(($(date +%s) + timeout))
shown=0
# wait_for PATTERN: follow the console until PATTERN shows up; fail early on a
# guest failure, on QEMU exiting or on the deadline. Echoes installer lines.
wait_for() {
    while :; do
        if [[ -f "$serial" ]]; then
            local n
            n=$(wc -l <"$serial")
            if ((n > shown)); then
                sed -n "$((shown + 1)),${n}p" "$serial" | grep -a -E '^(INSTALLER|RESULT)' | sed 's/^/  guest: /' || true
                shown=$n
            fi
            grep -a -q '^INSTALLER-FAIL' "$serial" && fail "guest: $(grep -a -m1 '^INSTALLER-FAIL' "$serial")"
            grep -a -q -E "$1" "$serial" && return 0
        fi
        if ! kill -0 "$qemu_pid" 2>/dev/null; then
            [[ "$1" == EXITED ]] && return 0
            tail -n 40 "$serial" 2>/dev/null || true
            cat "$work/qemu.log"
            fail "QEMU exited before '$1'"
        fi
        (($(date +%s) < deadline)) || { tail -n 40 "$serial" || true; fail "timeout (${timeout}s) waiting for '$1'"; }
        sleep 0.2
    done
}
wait_for '^INSTALLER-STAGE start'
end boot

begin build
wait_for '^RESULT sha256='
end build

begin shutdown
wait_for EXITED
qemu_rc=0
wait "$qemu_pid" || qemu_rc=$?
pids=("${pids[@]/$qemu_pid/}")
((qemu_rc == 0)) || fail "QEMU exit status $qemu_rc"
grep -a -q '^INSTALLER-STAGE done' "$serial" || fail "guest did not finish cleanly"
# Stop the daemons (SIGTERM) and wait: they must flush and close their images.
for p in "$root_pid" "$out_pid"; do
    kill -TERM "$p" 2>/dev/null || true
done
for p in "$root_pid" "$out_pid"; do
    rc=0
    wait "$p" || rc=$?
    ((rc == 0 || rc == 143)) || fail "daemon $p exited with $rc"
done
pids=()
end shutdown

# host_squashfs DIR OUT: the guest's tree and squashfs, rebuilt on the host with
# the same generator and mksquashfs options as guest-build.sh.
host_squashfs() (
    umask 022
    rm -rf "$1"
    mkdir -p "$1"
    local -a gen=()
    for ((k = 0; k < jobs; k++)); do
        perl "$here/gen-tree.pl" "$1" "$files" "$kb" "$bigevery" "$bigmb" "$seed" "$jobs" "$k" &
        gen+=($!)
    done
    for p in "${gen[@]}"; do wait "$p" || exit 1; done
    mksquashfs "$1" "$2" -noappend -comp gzip -mkfs-time 0 -all-time 0 -all-root \
        -no-progress -quiet >/dev/null || exit 1
)

begin verify
result="$(grep -a '^RESULT sha256=' "$serial" | tail -n1 | tr -d '\r')"
g_sha="$(sed -n 's/.*sha256=\([0-9a-f]\{64\}\).*/\1/p' <<<"$result")"
g_len="$(sed -n 's/.* len=\([0-9]\+\).*/\1/p' <<<"$result")"
[[ -n "$g_sha" && -n "$g_len" ]] || fail "cannot parse '$result'"
export_raw "$out_img" "$work/out.raw"
h_sha="$(head -c "$g_len" "$work/out.raw" | sha256sum | cut -d' ' -f1)"
log "output: guest sha256=$g_sha len=$g_len; host (exported) sha256=$h_sha"
[[ "$h_sha" == "$g_sha" ]] || fail "output sha256 differs: guest $g_sha host $h_sha"
hdr="$(tail -c 4096 "$work/out.raw" | tr -d '\0' | sed -n 1p)"
[[ "$hdr" == "SNAPBLK-INSTALLER v1 len=$g_len sha256=$g_sha" ]] || fail "length header at the end of the disk is '$hdr'"
base_sha_after="$(sha256sum "$base" | cut -d' ' -f1)"
log "base image sha256 before=$base_sha_before after=$base_sha_after"
[[ "$base_sha_after" == "$base_sha_before" ]] || fail "base image changed"
[[ -f "$root_ovl" ]] || fail "snapshot overlay $root_ovl was not kept"
for q in "$out_img" "$root_ovl"; do
    [[ "$fmt" == qcow2 ]] || { log "$(basename "$q") is raw: no qemu-img check"; continue; }
    qemu-img check -q "$q" >"$work/check.log" 2>&1 || { cat "$work/check.log"; fail "qemu-img check $q"; }
    log "qemu-img check $(basename "$q"): clean, $(du -k "$q" | cut -f1) KiB allocated"
done
# The root filesystem the guest left behind (unmounted cleanly: remount ro
# before poweroff) must be consistent: fsck its guest-visible bytes.
if [[ "$fmt" == raw ]]; then
    rootfs_img="$root_ovl"
else
    rootfs_img="$work/root-view.raw"
    qemu-img convert -f qcow2 -O raw "$root_ovl" "$rootfs_img"
fi
e2fsck -fn "$rootfs_img" >"$work/fsck.log" 2>&1 || { cat "$work/fsck.log"; fail "e2fsck of the guest's root filesystem"; }
log "guest root filesystem: e2fsck -fn clean ($(tail -n1 "$work/fsck.log"))"
[[ "$fmt" == raw ]] || rm -f "$rootfs_img"
if command -v xorriso >/dev/null && command -v unsquashfs >/dev/null; then
    head -c "$g_len" "$work/out.raw" >"$work/out.iso"
    rm -f "$work/filesystem.squashfs" "$work/SHA256SUMS"
    xorriso -osirrox on -indev "$work/out.iso" -extract /live/filesystem.squashfs "$work/filesystem.squashfs" \
        -extract /SHA256SUMS "$work/SHA256SUMS" >"$work/xorriso.log" 2>&1 || { cat "$work/xorriso.log"; fail "xorriso cannot read the ISO"; }
    (cd "$work" && sed 's# live/# #' SHA256SUMS | sha256sum -c --quiet -) || fail "squashfs in the ISO does not match its SHA256SUMS"
    # Rebuild tree and squashfs on the host with the same generator and
    # options as guest-build.sh: the guest's squashfs must be byte-identical.
    # This also covers the root-disk path (tree written to, and read back
    # from, the snapshot disk by mksquashfs).
    g_ver="$(grep -a '^INSTALLER mksquashfs-version' "$serial" | awk '{ print $3 }' | tr -d '\r')"
    h_ver="$(mksquashfs -version 2>&1 | awk 'NR == 1 { print $3 }')"
    if [[ "$g_ver" == "$h_ver" ]]; then
        host_squashfs "$work/host-tree" "$work/host.squashfs" || fail "host rebuild of the tree/squashfs"
        cmp -s "$work/host.squashfs" "$work/filesystem.squashfs" ||
            fail "guest squashfs differs from the host rebuild of the same tree"
        rm -rf "$work/host-tree" "$work/host.squashfs"
        log "guest squashfs is byte-identical to the host rebuild ($(sha256sum "$work/filesystem.squashfs" | cut -c1-16)...)"
    else
        log "host mksquashfs $h_ver != guest $g_ver: byte-identical squashfs check skipped"
    fi
    inodes="$(unsquashfs -s "$work/filesystem.squashfs" | sed -n 's/^Number of inodes \([0-9]*\).*/\1/p')"
    # files + their directories + the root
    want=$((files + (files + 99) / 100 + 1))
    [[ "$inodes" == "$want" ]] || fail "squashfs has $inodes inodes, expected $want"
    log "ISO readable; squashfs matches SHA256SUMS, $inodes inodes"
    rm -f "$work/out.iso" "$work/filesystem.squashfs"
else
    log "xorriso/unsquashfs not on the host: ISO content check skipped"
fi
rm -f "$work/out.raw"
end verify

grep -a -E '^INSTALLER (tree|squashfs|iso)' "$serial" | sed 's/^/  guest: /' || true
echo "Guest stages (guest uptime; each line runs until the next stage starts):"
grep -a '^INSTALLER-STAGE' "$serial" | tr -d '\r' |
    awk 'BEGIN { p = "kernel"; t = 0 } { sub("t=", "", $3); printf "  %-13s %7.1f\n", p, $3 - t; p = $2; t = $3 }'
report_phases
log "daemon: $daemon ($(cut -d' ' -f1 "$work/root.cmdline"))"
echo "INSTALLER-DEMO OK sha256=$g_sha len=$g_len"
