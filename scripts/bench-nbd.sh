#!/usr/bin/env bash
# NBD bases (issue 16), informational: cold and warm 4 KiB random reads and a sequential read of a
# qcow2 overlay whose raw base is
#   snapblk-nbd   served by qemu-nbd on a unix socket (backing name nbd+unix:///base?socket=...)
#   snapblk-local the same base as a local file
#   qsd-nbd       qemu-storage-daemon with the same NBD backing (driver=nbd), aio=threads
# side by side, through snapblk-bench (no guest). Writes a Markdown table to BENCH_NBD_OUT and
# prints it; `make bench-nbd` runs it.
#
# Workloads (a fresh overlay for every run; the host page cache is dropped before cold runs, needs
# root; qemu-nbd itself reads the base file through the host page cache):
#   cold-randread-4k-qd32   4 KiB random reads over the whole disk, QD32, 1 queue
#   warm-randread-4k-qd32   the same over the first 64 MiB, after one unmeasured sequential pass
#                           over that range (hot base data is then in the daemon's cache)
#   cold-seqread-128k-qd8   sequential 128 KiB reads from the start, QD8, 1 queue
#
# Knobs: BENCH_QUICK=1 (256 MiB base, 2 s runs; the default here too), BENCH_NBD_SIZE=256M,
#   BENCH_NBD_RUNTIME=2, BENCH_NBD_REPEAT=1, BENCH_DIR=build/bench, BENCH_NBD_OUT=$BENCH_DIR/nbd.md,
#   BENCH_NO_BUILD=1, SNAPBLK, BENCH_CLIENT, SNAPBLK_EXTRA_ARGS (e.g. "--nbd-connections 16"),
#   BENCH_NBD_SIDES="snapblk-nbd snapblk-local qsd-nbd".
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"
BENCH_DIR="${BENCH_DIR:-$ROOT/build/bench}"
QSD="${QSD:-qemu-storage-daemon}"
BENCH_NBD_SIZE="${BENCH_NBD_SIZE:-256M}"
BENCH_NBD_RUNTIME="${BENCH_NBD_RUNTIME:-2}"
BENCH_NBD_REPEAT="${BENCH_NBD_REPEAT:-1}"
BENCH_NBD_OUT="${BENCH_NBD_OUT:-$BENCH_DIR/nbd.md}"
SNAPBLK_EXTRA_ARGS="${SNAPBLK_EXTRA_ARGS:-}"

log() { printf 'bench-nbd: %s\n' "$*" >&2; }
die() { printf 'bench-nbd: ERROR: %s\n' "$*" >&2; exit 1; }

for t in "$QSD" qemu-nbd qemu-img python3; do
    command -v "$t" >/dev/null || die "$t not found (run scripts/install-deps.sh)"
done
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    cargo build --release -p snapblk -p snapblk-tests --bin snapblk --bin snapblk-bench ||
        die "cannot build snapblk / snapblk-bench"
fi
[[ -x "$SNAPBLK" && -x "$BENCH_CLIENT" ]] || die "missing $SNAPBLK or $BENCH_CLIENT"

W="$BENCH_DIR/nbd"
mkdir -p "$W/logs"
W="$(cd "$W" && pwd)"
RESULTS="$W/results.jsonl"
: >"$RESULTS"
SIZE_BYTES="$(numfmt --from=iec "${BENCH_NBD_SIZE%B}")"
BASE="$W/base.raw"
if [[ ! -f "$BASE" ]] || [[ "$(stat -c %s "$BASE")" != "$SIZE_BYTES" ]]; then
    log "creating a $BENCH_NBD_SIZE base of random data"
    head -c "$SIZE_BYTES" /dev/urandom >"$BASE.tmp"
    mv "$BASE.tmp" "$BASE"
fi
NBD_SOCK="$W/nbd.sock"
URI="nbd+unix:///base?socket=$NBD_SOCK"
NBD_PID=""
cleanup() {
    stop_daemon
    [[ -z "$NBD_PID" ]] || { kill "$NBD_PID" 2>/dev/null || true; wait "$NBD_PID" 2>/dev/null || true; }
}
trap cleanup EXIT
rm -f "$NBD_SOCK"
qemu-nbd --shared=0 -r -t -f raw -x base -k "$NBD_SOCK" "$BASE" >"$W/logs/qemu-nbd.log" 2>&1 &
NBD_PID=$!
for _ in $(seq 100); do [[ -S "$NBD_SOCK" ]] && break; sleep 0.05; done
[[ -S "$NBD_SOCK" ]] || die "qemu-nbd did not start"

DROP_OK=1
drop_caches() {
    sync
    { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || DROP_OK=0
}

fresh_overlay() { # SIDE -> path
    local img="$W/ovl.qcow2" backing="$URI"
    [[ "$1" == snapblk-local ]] && backing="$BASE"
    rm -f "$img"
    qemu-img create -q -f qcow2 -b "$backing" -F raw "$img"
    echo "$img"
}

daemon_cmd() { # SIDE IMAGE SOCKET
    local side="$1" img="$2" sock="$3"
    case "$side" in
    snapblk-*)
        # shellcheck disable=SC2206 # SNAPBLK_EXTRA_ARGS is split on purpose
        CMD=("$SNAPBLK" serve --image "$img" --socket "$sock" --num-queues 1 $SNAPBLK_EXTRA_ARGS)
        ;;
    qsd-nbd)
        CMD=("$QSD"
            --blockdev "driver=nbd,node-name=bf,server.type=unix,server.path=$NBD_SOCK,export=base,read-only=on"
            --blockdev "driver=file,node-name=f,filename=$img,aio=threads"
            --blockdev "driver=qcow2,node-name=q,file=f,backing=bf"
            --export "type=vhost-user-blk,id=e,addr.type=unix,addr.path=$sock,writable=on,num-queues=1,node-name=q")
        ;;
    esac
}

record() {
    python3 - "$@" >>"$RESULTS" <<'PY'
import json, sys
workload, side, rep, out = sys.argv[1:]
d = json.loads(out) if out else {"failed": True}
d.update(workload=workload, side=side, rep=int(rep))
print(json.dumps(d))
PY
}

RUN_NO=0
run_one() { # WORKLOAD SIDE REP
    local w="$1" side="$2" rep="$3" img args=() out="" sock="$W/vu.sock"
    local logf="$W/logs/$RUN_NO-$side-$w.log"
    RUN_NO=$((RUN_NO + 1))
    local rt="$BENCH_NBD_RUNTIME"
    case "$w" in
    cold-randread-4k-qd32) args=(--rw randread --bs 4k --iodepth 32 --runtime "$rt") ;;
    warm-randread-4k-qd32) args=(--rw randread --bs 4k --iodepth 32 --size 64m --runtime "$rt") ;;
    cold-seqread-128k-qd8) args=(--rw read --bs 128k --iodepth 8 --runtime "$rt") ;;
    esac
    img="$(fresh_overlay "$side")"
    [[ "$w" == warm-* ]] || drop_caches
    daemon_cmd "$side" "$img" "$sock"
    launch_daemon "$sock" "$logf" || { log "$side failed to start (see $logf)"; record "$w" "$side" "$rep" ""; return; }
    if [[ "$w" == warm-* ]]; then
        # Warm-up: one sequential pass over the measured range (unmeasured).
        "$BENCH_CLIENT" --socket "$sock" --queues 1 --rw read --bs 64k --iodepth 8 --size 64m \
            --no-wrap --runtime 120 >>"$logf" 2>&1 || true
    fi
    out="$("$BENCH_CLIENT" --socket "$sock" --queues 1 --json --daemon-pid "$DAEMON_PID" \
        --label "$side" "${args[@]}" 2>>"$logf")" || out=""
    stop_daemon
    record "$w" "$side" "$rep" "$out"
}

read -r -a SIDES <<<"${BENCH_NBD_SIDES:-snapblk-nbd snapblk-local qsd-nbd}"
WORKLOADS=(cold-randread-4k-qd32 warm-randread-4k-qd32 cold-seqread-128k-qd8)
for w in "${WORKLOADS[@]}"; do
    for rep in $(seq "$BENCH_NBD_REPEAT"); do
        for side in "${SIDES[@]}"; do
            log "$w $side run $rep"
            run_one "$w" "$side" "$rep"
        done
    done
done

python3 - "$RESULTS" "$DROP_OK" "$BENCH_NBD_SIZE" "$BENCH_NBD_RUNTIME" "$BENCH_NBD_REPEAT" >"$BENCH_NBD_OUT" <<'PY'
import json, statistics, sys
path, drop_ok, size, rt, rep = sys.argv[1:]
rows = [json.loads(l) for l in open(path)]
sides = ["snapblk-nbd", "snapblk-local", "qsd-nbd"]
print(f"Base {size} of random data, qcow2 overlay, 1 queue, {rt} s per run, median of {rep}; "
      f"page cache dropped before cold runs: {'yes' if drop_ok == '1' else 'NO (not root)'}.\n")
print("| workload | side | IOPS | MB/s | p50 us | p99 us |")
print("|---|---|---:|---:|---:|---:|")
for w in ["cold-randread-4k-qd32", "warm-randread-4k-qd32", "cold-seqread-128k-qd8"]:
    for s in sides:
        rs = [r for r in rows if r["workload"] == w and r["side"] == s and not r.get("failed")]
        if not rs:
            print(f"| {w} | {s} | failed | | | |")
            continue
        med = lambda k: statistics.median(r.get(k, 0) for r in rs)
        print(f"| {w} | {s} | {med('iops'):.0f} | {med('mb_per_s'):.1f} | "
              f"{med('lat_p50_us'):.0f} | {med('lat_p99_us'):.0f} |")
PY
cat "$BENCH_NBD_OUT"
