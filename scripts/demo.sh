#!/usr/bin/env bash
# The main job (`make run`): a real QEMU guest uses snapblk as its disk, writes and verifies
# data, prints the checksums of its /dev/vda and powers off; then the daemon is stopped with
# SIGTERM and the host checks that the image holds exactly what the guest saw.
#
#   scripts/demo.sh [--overlay] [--size MIB] [--cache writeback|writethrough] [--keep]
#   DEMO_OVERLAY=1 scripts/demo.sh          (same as --overlay)
#
# Raw mode:     serve a random raw image; guest md5 of /dev/vda == host md5 of the file.
# Overlay mode: serve a qcow2 overlay (`snapblk create --backing base.raw --backing-format raw`)
#               over a random raw base; guest sha256 == `snapblk checksum overlay.qcow2`,
#               guest md5 == md5 of `qemu-img convert -O raw overlay.qcow2`, base md5
#               unchanged, `qemu-img check overlay.qcow2` exits 0.
# Exit status: 0 when everything matches, 1 on any mismatch or failure.
# Files go to build/demo/ (deleted at the end unless --keep or a failure).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OVERLAY="${DEMO_OVERLAY:-0}"
SIZE_MIB="${DEMO_SIZE_MIB:-256}"
CACHE="${DEMO_CACHE:-writeback}"
KEEP=0
while (($#)); do
    case "$1" in
    --overlay) OVERLAY=1 ;;
    --size) SIZE_MIB="$2"; shift ;;
    --cache) CACHE="$2"; shift ;;
    --keep) KEEP=1 ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "demo: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if ! [[ "$SIZE_MIB" =~ ^[0-9]+$ ]] || ((SIZE_MIB < 64)); then
    echo "demo: --size must be >= 64 (MiB)" >&2
    exit 2
fi

WORK="${DEMO_DIR:-$ROOT/build/demo}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
SNAPBLK="${SNAPBLK_BIN:-$TARGET_DIR/release/snapblk}"
GUEST_TIMEOUT="${DEMO_GUEST_TIMEOUT:-300}"

declare -a PHASES=()
phase_t0=0
phase_name=""
phase() { # start a new phase (ends the previous one)
    phase_end
    phase_name="$1"
    phase_t0=$(date +%s.%N)
    printf '\n==> %s\n' "$1"
}
phase_end() {
    if [[ -n "$phase_name" ]]; then
        local t
        t=$(awk -v a="$phase_t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
        PHASES+=("$(printf '%-34s %7s s' "$phase_name" "$t")")
        phase_name=""
    fi
}
die() { printf 'demo: ERROR: %s\n' "$*" >&2; exit 1; }

DAEMON_PID=""
QEMU_PID=""
FAILED=1
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local rc=$?
    [[ -n "$QEMU_PID" ]] && kill -KILL "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null
    [[ -n "$DAEMON_PID" ]] && kill -KILL "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null
    if [[ $KEEP == 0 && $FAILED == 0 ]]; then
        rm -rf "$WORK"
    elif [[ -d "$WORK" ]]; then
        echo "demo: files kept in $WORK (daemon.log, serial.log, images)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

T_START=$(date +%s.%N)

# ---- 1. dependencies ---------------------------------------------------------------------------
phase "install dependencies"
if [[ "$(id -u)" == 0 ]]; then
    bash "$ROOT/scripts/install-deps.sh"
else
    bash "$ROOT/scripts/install-deps.sh" --check || die "dependencies missing; run scripts/install-deps.sh as root"
fi
# shellcheck source=scripts/env.sh
. "$ROOT/scripts/env.sh"
[[ "$SNAPBLK_ENV_OK" == 1 ]] || die "missing:$SNAPBLK_ENV_MISSING"

# ---- 2. build ----------------------------------------------------------------------------------
phase "cargo build --release -p snapblk"
if [[ -n "${SNAPBLK_BIN:-}" ]]; then
    echo "using SNAPBLK_BIN=$SNAPBLK_BIN"
else
    (cd "$ROOT" && cargo build --release -p snapblk)
fi
[[ -x "$SNAPBLK" ]] || die "$SNAPBLK not built"

phase "build guest kernel + initramfs"
bash "$ROOT/scripts/build-guest.sh"

# ---- 3. images ---------------------------------------------------------------------------------
phase "create ${SIZE_MIB} MiB demo image"
rm -rf "$WORK"
mkdir -p "$WORK"
if [[ $OVERLAY == 1 ]]; then
    head -c "$((SIZE_MIB * 1048576))" /dev/urandom >"$WORK/base.raw"
    BASE_MD5_BEFORE=$(md5sum <"$WORK/base.raw" | cut -d' ' -f1)
    "$SNAPBLK" create --backing "$WORK/base.raw" --backing-format raw "$WORK/overlay.qcow2" ||
        die "snapblk create failed"
    IMAGE="$WORK/overlay.qcow2"
    echo "base.raw md5 $BASE_MD5_BEFORE; overlay: $(qemu-img info "$IMAGE" | tr '\n' ' ')"
else
    head -c "$((SIZE_MIB * 1048576))" /dev/urandom >"$WORK/disk.raw"
    IMAGE="$WORK/disk.raw"
    echo "disk.raw: $(stat -c %s "$IMAGE") bytes of random data"
fi

# ---- 4. daemon ---------------------------------------------------------------------------------
phase "start snapblk serve"
SOCK="$WORK/vhost-user-blk.sock"
RUST_LOG="${RUST_LOG:-info}" "$SNAPBLK" serve --image "$IMAGE" --socket "$SOCK" --num-queues 2 \
    --cache "$CACHE" >"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 1 200); do
    [[ -S "$SOCK" ]] && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK/daemon.log" >&2; DAEMON_PID=""; die "snapblk serve exited"; }
    sleep 0.05
done
[[ -S "$SOCK" ]] || { cat "$WORK/daemon.log" >&2; die "no socket $SOCK after 10 s"; }
sleep 0.1
echo "snapblk serve pid $DAEMON_PID on $SOCK (2 queues, cache $CACHE)"

# ---- 5. guest ----------------------------------------------------------------------------------
phase "boot guest, write + verify data"
mkdir -p "$WORK/extra"
cat >"$WORK/extra/test.sh" <<'EOF'
# demo workload: concurrent writers (O_DIRECT and buffered+fsync), small and unaligned-to-cluster
# writes, read-back verification through the daemon, checksums of the whole disk.
MiB=1048576
fail=0
size=$(blockdev --getsize64 /dev/vda)
mib=$((size / MiB))
echo "demo-guest: /dev/vda is $mib MiB, $(ls /sys/block/vda/mq | wc -l) queues"
if [ "$mib" -lt 64 ]; then echo "demo-guest: /dev/vda is too small ($size bytes)"; exit 1; fi
t0=$(date +%s)
dd if=/dev/urandom of=/tmp/p1 bs=1M count=16 status=none
dd if=/dev/urandom of=/tmp/p2 bs=1M count=16 status=none
dd if=/dev/urandom of=/tmp/p3 bs=1M count=8 status=none
dd if=/dev/urandom of=/tmp/p4 bs=512 count=9 status=none
# writer 1: O_DIRECT 64k at 16 MiB; writer 2: buffered 1M at mib/2 then fsync;
# writer 3: O_DIRECT 4k at the last 8 MiB; writer 4: 512-byte writes straddling 64k clusters.
( dd if=/tmp/p1 of=/dev/vda bs=64k seek=$((16 * MiB)) oflag=direct,seek_bytes conv=notrunc status=none ) & w1=$!
( dd if=/tmp/p2 of=/dev/vda bs=1M seek=$((mib / 2 * MiB)) oflag=seek_bytes conv=notrunc status=none && sync /dev/vda ) & w2=$!
( dd if=/tmp/p3 of=/dev/vda bs=4k seek=$(((mib - 8) * MiB)) oflag=direct,seek_bytes conv=notrunc status=none ) & w3=$!
( dd if=/tmp/p4 of=/dev/vda bs=512 seek=$((4 * MiB + 65536 - 2048)) oflag=direct,seek_bytes conv=notrunc status=none ) & w4=$!
for w in $w1 $w2 $w3 $w4; do wait $w || { echo "demo-guest: writer $w FAILED"; fail=1; }; done
sync /dev/vda
echo "demo-guest: wrote 40 MiB + 4.5 KiB in $(( $(date +%s) - t0 )) s; verifying"
echo 3 > /proc/sys/vm/drop_caches
check() { # name off_bytes len_bytes file
    got=$(dd if=/dev/vda bs=512 skip=$2 count=$3 iflag=direct,skip_bytes,count_bytes status=none | md5sum | cut -d' ' -f1)
    want=$(md5sum < $4 | cut -d' ' -f1)
    if [ "$got" = "$want" ]; then echo "demo-guest: $1 OK"; else echo "demo-guest: $1 MISMATCH"; fail=1; fi
}
check writer1 $((16 * MiB)) $((16 * MiB)) /tmp/p1
check writer2 $((mib / 2 * MiB)) $((16 * MiB)) /tmp/p2
check writer3 $(((mib - 8) * MiB)) $((8 * MiB)) /tmp/p3
check writer4 $((4 * MiB + 65536 - 2048)) 4608 /tmp/p4
echo 3 > /proc/sys/vm/drop_caches
echo "RESULT disk_md5=$(md5sum < /dev/vda | cut -d' ' -f1)"
echo "RESULT disk_sha256=$(sha256sum < /dev/vda | cut -d' ' -f1)"
echo "RESULT verify_fail=$fail"
exit $fail
EOF
(cd "$WORK/extra" && echo test.sh | cpio -o -H newc --quiet -R 0:0) >"$WORK/test.cpio"
cat "$GUEST_DIR/initramfs.cpio.gz" "$WORK/test.cpio" >"$WORK/initrd"
# shellcheck disable=SC2054 # commas belong to QEMU option syntax
QEMU_ARGS=(-machine q35 -accel tcg -smp 2 -m 512 -nodefaults -no-reboot -display none
    -monitor none -serial stdio
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem
    -chardev "socket,id=vu0,path=$SOCK" -device vhost-user-blk-pci,chardev=vu0,num-queues=2
    -kernel "$GUEST_DIR/vmlinuz" -initrd "$WORK/initrd" -append "console=ttyS0 panic=-1 loglevel=4 no_timer_check")
[[ -n "$QEMU_DATADIR" ]] && QEMU_ARGS=(-L "$QEMU_DATADIR" "${QEMU_ARGS[@]}")
echo "$QEMU ${QEMU_ARGS[*]}"
# Serial goes to serial.log; the guest's own lines are echoed here (escape codes stripped).
"$QEMU" "${QEMU_ARGS[@]}" </dev/null >"$WORK/serial.log" 2>&1 &
QEMU_PID=$!
tail -n +1 -f --pid="$QEMU_PID" "$WORK/serial.log" 2>/dev/null |
    sed -u -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\r//g' |
    grep --line-buffered -E '^(snapblk-init|demo-guest|RESULT)|Kernel panic|BUG|error' |
    sed -u 's/^/    guest| /' &
TAIL_PID=$!
qemu_rc=0
deadline=$((SECONDS + GUEST_TIMEOUT))
while kill -0 "$QEMU_PID" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
        echo "demo: guest timed out after $GUEST_TIMEOUT s; killing QEMU" >&2
        kill -KILL "$QEMU_PID" 2>/dev/null || true
        break
    fi
    sleep 0.2
done
wait "$QEMU_PID" || qemu_rc=$?
QEMU_PID=""
wait "$TAIL_PID" 2>/dev/null || true
((qemu_rc == 0)) || { tail -n 40 "$WORK/serial.log" >&2; die "QEMU exited with status $qemu_rc"; }

result() { tr -d '\r' <"$WORK/serial.log" | sed -n "s/.*RESULT $1=\([^ ]*\).*/\1/p" | tail -n 1; }
GUEST_MD5=$(result disk_md5)
GUEST_SHA=$(result disk_sha256)
GUEST_FAIL=$(result verify_fail)
TEST_EXIT=$(result init_test_exit)
[[ -n "$GUEST_MD5" ]] || { tail -n 40 "$WORK/serial.log" >&2; die "guest printed no checksum"; }

# ---- 6. stop daemon ----------------------------------------------------------------------------
phase "stop snapblk (SIGTERM)"
kill -TERM "$DAEMON_PID"
daemon_rc=0
for _ in $(seq 1 600); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$DAEMON_PID" 2>/dev/null; then
    echo "demo: snapblk still running 60 s after SIGTERM; killing" >&2
    kill -KILL "$DAEMON_PID"
fi
wait "$DAEMON_PID" || daemon_rc=$?
DAEMON_PID=""
echo "snapblk exited with status $daemon_rc"

# ---- 7. compare --------------------------------------------------------------------------------
phase "host checksums"
ok=1
verdict() { # label guest host
    if [[ -n "$2" && "$2" == "$3" ]]; then
        printf '  %-40s MATCH     %s\n' "$1" "$2"
    else
        printf '  %-40s MISMATCH  guest=%s host=%s\n' "$1" "${2:-?}" "${3:-?}"
        ok=0
    fi
}
summary=()
if [[ $OVERLAY == 1 ]]; then
    CHECKSUM_OUT=$("$SNAPBLK" checksum "$IMAGE" 2>&1) || { echo "$CHECKSUM_OUT"; CHECKSUM_OUT=""; }
    HOST_SHA=$(grep -oE '[0-9a-f]{64}' <<<"$CHECKSUM_OUT" | head -n 1 || true)
    qemu-img convert -O raw "$IMAGE" "$WORK/converted.raw"
    HOST_MD5=$(md5sum <"$WORK/converted.raw" | cut -d' ' -f1)
    BASE_MD5_AFTER=$(md5sum <"$WORK/base.raw" | cut -d' ' -f1)
    check_rc=0
    qemu-img check "$IMAGE" >"$WORK/qemu-img-check.txt" 2>&1 || check_rc=$?
    summary+=("$(verdict "guest sha256 vs snapblk checksum" "$GUEST_SHA" "$HOST_SHA")")
    summary+=("$(verdict "guest md5 vs qemu-img convert -O raw" "$GUEST_MD5" "$HOST_MD5")")
    summary+=("$(verdict "base.raw md5 before vs after" "$BASE_MD5_BEFORE" "$BASE_MD5_AFTER")")
    summary+=("$(verdict "qemu-img check exit status" 0 "$check_rc")")
else
    HOST_MD5=$(md5sum <"$IMAGE" | cut -d' ' -f1)
    HOST_SHA=$(sha256sum <"$IMAGE" | cut -d' ' -f1)
    summary+=("$(verdict "guest md5 vs host md5 of disk.raw" "$GUEST_MD5" "$HOST_MD5")")
    summary+=("$(verdict "guest sha256 vs host sha256" "$GUEST_SHA" "$HOST_SHA")")
fi
summary+=("$(verdict "in-guest read-back verification" 0 "$GUEST_FAIL")")
summary+=("$(verdict "guest test script exit status" 0 "$TEST_EXIT")")
summary+=("$(verdict "snapblk exit status after SIGTERM" 0 "$daemon_rc")")
for line in "${summary[@]}"; do grep -q MISMATCH <<<"$line" && ok=0; done
phase_end

# ---- 8. report -----------------------------------------------------------------------------------
echo
echo "==> timings"
printf '  %s\n' "${PHASES[@]}"
printf '  %-34s %7s s\n' "total" "$(awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
echo
echo "==> result ($([[ $OVERLAY == 1 ]] && echo "qcow2 overlay over raw base" || echo "raw image"), ${SIZE_MIB} MiB, cache $CACHE)"
echo "  guest md5 of /dev/vda:  $GUEST_MD5"
echo "  host md5 of the image:  $HOST_MD5"
printf '%s\n' "${summary[@]}"
if [[ $ok == 1 ]]; then
    FAILED=0
    echo "MATCH"
    exit 0
else
    [[ $OVERLAY == 1 && -s "$WORK/qemu-img-check.txt" ]] && cat "$WORK/qemu-img-check.txt"
    echo "MISMATCH"
    exit 1
fi
