#!/usr/bin/env bash
# Cold and durable benchmarks: snapblk vs qemu-storage-daemon in each of its configurations vs the
# device itself, side by side in one run. Called by scripts/bench.sh (`make bench`), which appends
# the Markdown section this writes to BENCHMARKS.md; runs standalone as well.
#
# What "honest" means here:
# - cold: before every run of a cold workload the host page cache is dropped
#   (`sync; echo 3 > /proc/sys/vm/drop_caches`, needs root; without it the report says so),
#   and in a VM whose balloon reports free pages to its host, the run waits until that is quiet
#   (see settle_memory);
# - durable: write workloads end with a FLUSH and are timed until that FLUSH completes
#   (snapblk-bench --final-flush; fio --end_fsync=1 for the device);
# - qemu-storage-daemon runs in every configuration (aio=threads and aio=io_uring, cache.direct
#   off and on) and each workload is compared with its best one;
# - the device's own ceiling: the same pattern with fio, ioengine=io_uring, direct=1, on a raw file
#   on the same file system (a fresh sparse file for writes);
# - medians of BENCH_COLD_REPEAT runs per side, the order of the sides rotating between runs.
#
# Workloads (the image is a fresh qcow2 overlay over a BENCH_COLD_SIZE raw base of random data):
#   cold-randread-4k-qd32-q1   4 KiB random reads, QD32, 1 queue, BENCH_COLD_RUNTIME seconds
#   cold-randread-4k-qd32-q2   the same with QD32 on each of 2 queues (device: 2 jobs)
#   cold-randread-own-4k-qd32-q1  4 KiB random reads, QD32, 1 queue, of an overlay whose every
#                              cluster is allocated (the image's own data, as a guest reads back
#                              what it installed; the same image as rewrite-1m-q2-flush)
#   fresh-write-1m-q2-flush    the whole disk in 1 MiB writes (QD8 per queue, each queue one half)
#                              then FLUSH, 2 queues
#   rewrite-1m-q2-flush        1 MiB writes over an overlay whose every cluster is allocated
#                              (written once with qemu-io beforehand, outside the timing), QD8
#                              per queue, each queue its half over and over for
#                              BENCH_COLD_RUNTIME seconds, then FLUSH, 2 queues (device: a fully
#                              written raw file)
#   cow-4k-per-cluster-flush   one 4 KiB write into each 64 KiB cluster, QD32, 1 queue, then FLUSH
#                              (plus "device-cow": the device's ceiling for its traffic)
#   cow-4k-per-cluster-extl2-flush  the same on an overlay with extended L2 entries (subclusters)
#   hot-randread-4k-qd32       warm: 4 KiB random reads QD32 over the first 64 MiB after a warm-up,
#                              against qemu-storage-daemon's null-co driver (the protocol limit)
#
# qemu-storage-daemon's own ceiling for the cold reads: after a cold-randread workload's runs,
# side "null-device-latency" serves the same pattern from its null-co driver (in an iothread, no
# I/O at all) completing every read after exactly the device's mean latency of those runs (the
# device's queue depth over its median IOPS). What it reaches is what the peer's round trip
# (kick, request handling, completion notification, wake-ups) leaves of the device's rate on this
# machine, however fast its disk path: how far above the peer a daemon can get at all.
#
# Knobs: BENCH_QUICK=1 (1 run, 1 s reads, 256 MiB disk, 2 qsd configs: a development check, not a
#   measurement), BENCH_COLD_REPEAT=3, BENCH_COLD_RUNTIME=3, BENCH_COLD_SIZE=1G,
#   BENCH_COLD_FILTER=REGEX, BENCH_DIR=build/bench, BENCH_COLD_OUT=$BENCH_DIR/cold.md,
#   BENCH_PLOT_DIR=docs/bench (the latency plots, SVG, one per workload, linked from the report),
#   BENCH_NO_BUILD=1, SNAPBLK, BENCH_CLIENT, SNAPBLK_EXTRA_ARGS,
#   SNAPBLK_BASE=path/to/another/snapblk  adds a side "snapblk-base" (e.g. a build of the previous
#   commit) so a change is measured before/after in the same run,
#   QSD_CONFIGS="threads:off threads:on io_uring:off io_uring:on" (aio:cache.direct).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"
SNAPBLK_BASE="${SNAPBLK_BASE:-}"
BENCH_DIR="${BENCH_DIR:-$ROOT/build/bench}"
QSD="${QSD:-qemu-storage-daemon}"
SNAPBLK_EXTRA_ARGS="${SNAPBLK_EXTRA_ARGS:-}"
if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
    : "${BENCH_COLD_REPEAT:=1}" "${BENCH_COLD_RUNTIME:=1}" "${BENCH_COLD_SIZE:=256M}"
    : "${QSD_CONFIGS:=threads:off io_uring:on}"
fi
BENCH_COLD_REPEAT="${BENCH_COLD_REPEAT:-3}"
BENCH_COLD_RUNTIME="${BENCH_COLD_RUNTIME:-3}"
BENCH_COLD_SIZE="${BENCH_COLD_SIZE:-1G}"
BENCH_COLD_FILTER="${BENCH_COLD_FILTER:-.}"
QSD_CONFIGS="${QSD_CONFIGS:-threads:off threads:on io_uring:off io_uring:on}"
COLD="$BENCH_DIR/cold"
BENCH_COLD_OUT="${BENCH_COLD_OUT:-$BENCH_DIR/cold.md}"
BENCH_PLOT_DIR="${BENCH_PLOT_DIR:-$ROOT/docs/bench}"
CLUSTER=65536

log() { printf 'bench-cold: %s\n' "$*" >&2; }
die() { printf 'bench-cold: ERROR: %s\n' "$*" >&2; exit 1; }

command -v "$QSD" >/dev/null || die "qemu-storage-daemon not found (run scripts/install-deps.sh)"
command -v fio >/dev/null || die "fio not found (run scripts/install-deps.sh)"
command -v qemu-img >/dev/null || die "qemu-img not found"
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    cargo build --release -p snapblk -p snapblk-tests --bin snapblk --bin snapblk-bench \
        --bin snapblk-plot || die "cannot build snapblk / snapblk-bench / snapblk-plot"
fi
[[ -x "$SNAPBLK" && -x "$BENCH_CLIENT" ]] || die "missing $SNAPBLK or $BENCH_CLIENT"

mkdir -p "$COLD/logs"
COLD="$(cd "$COLD" && pwd)"
RESULTS="$COLD/results.jsonl"
: >"$RESULTS"
rm -f "$COLD"/logs/*.log "$COLD/full.qcow2" "$COLD/full.tmp"

SIZE_BYTES="$(numfmt --from=iec "${BENCH_COLD_SIZE%B}")"
BASE="$COLD/base.raw"
if [[ ! -f "$BASE" ]] || [[ "$(stat -c %s "$BASE")" != "$SIZE_BYTES" ]]; then
    log "creating a $BENCH_COLD_SIZE base of random data"
    head -c "$SIZE_BYTES" /dev/urandom >"$BASE.tmp"
    mv "$BASE.tmp" "$BASE"
fi

DROP_OK=1
SETTLED=0
drop_caches() {
    sync
    if ! { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
        DROP_OK=0
    fi
    settle_memory
}

# In a virtual machine whose balloon reports free pages to the host (virtio-balloon free page
# reporting), the memory dropping the cache frees goes back to the host in steps over the next
# seconds, and a page the host took back costs a fault on the host at its next first touch.
# A run that started right after the drop got host-backed pages for its first second or two
# and host-faulted ones after that, so the same run of one build measured anywhere from 5k to
# 21k standard-L2 COW first writes per second. Every cold run starts once reporting has been
# quiet for 1.5 s (at most 15 s): from the same state, all free memory handed back.
settle_memory() {
    local f=/sys/module/page_reporting/parameters/reported_kib a b i
    [[ -r "$f" ]] || return 0
    SETTLED=1
    a="$(cat "$f")"
    for ((i = 1; i <= 30; i++)); do
        sleep 0.5
        b="$(cat "$f")"
        [[ "$a" != "$b" || $i -lt 3 ]] || return 0
        a="$b"
    done
}

# --- sides -------------------------------------------------------------------------------------
SIDES=(snapblk)
[[ -z "$SNAPBLK_BASE" ]] || SIDES+=(snapblk-base)
for c in $QSD_CONFIGS; do SIDES+=("qsd-${c/:/-direct-}"); done
FIRST_QSD="qsd-$(set -- $QSD_CONFIGS; echo "${1/:/-direct-}")"
SIDES+=(device)

trap stop_daemon EXIT

# Waits (at most 30 s) until no block device has written anything for a second: the device's
# write workload leaves writeback and discards behind that would land in the next side's run.
quiesce() {
    local before after i
    for ((i = 0; i < 30; i++)); do
        before="$(awk '{w += $10} END {print w}' /proc/diskstats)"
        sleep 1
        after="$(awk '{w += $10} END {print w}' /proc/diskstats)"
        [[ "$before" != "$after" ]] || return 0
    done
}

# daemon_cmd SIDE IMAGE SOCKET QUEUES -> CMD. IMAGE "null" is qsd's null-co driver.
daemon_cmd() {
    local side="$1" img="$2" sock="$3" nq="$4" aio direct exp
    exp="type=vhost-user-blk,id=e,addr.type=unix,addr.path=$sock,writable=on,num-queues=$nq"
    case "$side" in
    snapblk | snapblk-base)
        local bin="$SNAPBLK"
        [[ "$side" == snapblk ]] || bin="$SNAPBLK_BASE"
        # shellcheck disable=SC2206 # SNAPBLK_EXTRA_ARGS is split on purpose
        CMD=("$bin" serve --image "$img" --socket "$sock" --num-queues "$nq" --cache writeback
            $SNAPBLK_EXTRA_ARGS)
        ;;
    null-device-latency)
        # IMAGE is the latency in ns. In an iothread: the main loop's timers are too coarse
        # (about 1 ms) for latency-ns.
        CMD=("$QSD" --object iothread,id=io0
            --blockdev "driver=null-co,node-name=q,size=$SIZE_BYTES,read-zeroes=on,latency-ns=$img"
            --export "$exp,node-name=q,iothread=io0")
        ;;
    qsd-*)
        aio="${side#qsd-}"
        aio="${aio%%-direct-*}"
        direct="${side##*-direct-}"
        if [[ "$img" == null ]]; then
            CMD=("$QSD" --blockdev "driver=null-co,node-name=q,size=$SIZE_BYTES,read-zeroes=on"
                --export "$exp,node-name=q")
        else
            # The base is opened explicitly so that it gets the same aio/cache options.
            CMD=("$QSD"
                --blockdev "driver=file,node-name=bf,filename=$BASE,aio=$aio,cache.direct=$direct,read-only=on"
                --blockdev "driver=file,node-name=f,filename=$img,aio=$aio,cache.direct=$direct"
                --blockdev "driver=qcow2,node-name=q,file=f,backing=bf"
                --export "$exp,node-name=q")
        fi
        ;;
    esac
}

start_daemon() {
    local side="$1" img="$2" nq="$3" logf="$4"
    SOCK="$COLD/$side.sock"
    daemon_cmd "$side" "$img" "$SOCK" "$nq"
    launch_daemon "$SOCK" "$logf"
}

# full_overlay: a copy of an overlay whose every cluster is allocated (made once per bench run
# with qemu-io; each run gets a fresh copy, so every side rewrites the same file layout).
full_overlay() {
    if [[ ! -f "$COLD/full.qcow2" ]]; then
        qemu-img create -q -f qcow2 -o cluster_size=$CLUSTER -b "$BASE" -F raw "$COLD/full.tmp"
        qemu-io -f qcow2 -c "write -q -P 0x5a 0 $SIZE_BYTES" "$COLD/full.tmp" >/dev/null
        mv "$COLD/full.tmp" "$COLD/full.qcow2"
    fi
    rm -f "$COLD/ovl.qcow2"
    cp "$COLD/full.qcow2" "$COLD/ovl.qcow2"
    sync
    echo "$COLD/ovl.qcow2"
}

fresh_overlay() {
    local ext="${1:-off}"
    rm -f "$COLD/ovl.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=$CLUSTER,extended_l2=$ext -b "$BASE" -F raw \
        "$COLD/ovl.qcow2"
    echo "$COLD/ovl.qcow2"
}

record() {
    python3 - "$@" >>"$RESULTS" <<'PY'
import json, sys
workload, side, rep, metric, out = sys.argv[1:]
d = json.loads(out) if out else {"failed": True}
d.update(workload=workload, side=side, rep=int(rep), metric=metric)
print(json.dumps(d))
PY
}

# fio_json OUT: the figures of a fio --output-format=json run, in snapblk-bench's JSON keys.
fio_summary() {
    python3 - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
jobs = d["jobs"]
# Jobs run in parallel: the run lasts as long as the longest job (job_runtime, ms, includes the
# end_fsync); I/Os and bytes add up.
rt = max(1, max(j["job_runtime"] for j in jobs)) / 1000.0
ios = sum(j[k]["total_ios"] for j in jobs for k in ("read", "write"))
byt = sum(j[k]["io_bytes"] for j in jobs for k in ("read", "write"))
j = jobs[0]
lat = j["read"] if j["read"]["total_ios"] else j["write"]
pct = lat.get("clat_ns", {}).get("percentile", {})
print(json.dumps({"iops": ios / rt, "mb_per_s": byt / rt / 1e6, "elapsed_s": rt, "ios": ios,
                  "lat_p50_us": pct.get("50.000000", 0) / 1000,
                  "lat_p99_us": pct.get("99.000000", 0) / 1000,
                  "lat_pct_us": {k: v / 1000 for k, v in pct.items()},
                  "errors": sum(j.get("error", 0) for j in jobs)}))
PY
}

# device_cow_traffic REP LOG: the device's ceiling for the traffic standard-L2 COW first writes
# make: each moves its cluster's old content from the base (a 64 KiB read) and writes the whole
# cluster (a 64 KiB write). fio reads the whole base and writes a fresh file of its size, both
# at once, in 1 MiB requests (the device's best; 64 KiB requests measured 0.7x of it), QD16
# each, O_DIRECT io_uring; recorded as side "device-cow" in clusters per second (the 4 KiB
# pattern of the "device" side moves neither).
device_cow_traffic() {
    local rep="$1" logf="$2" file="$COLD/device.raw" out=""
    rm -f "$file"
    truncate -s "$SIZE_BYTES" "$file"
    drop_caches
    # (Options before the first --name apply to both jobs.)
    if fio --ioengine=io_uring --direct=1 --bs=1M --iodepth=16 --size="$SIZE_BYTES" \
        --output-format=json --output="$COLD/fio.json" \
        --name=read --filename="$BASE" --rw=read \
        --name=write --filename="$file" --rw=write --end_fsync=1 --fallocate=none \
        >>"$logf" 2>&1; then
        # Clusters moved per second: the base's clusters over the time both jobs took.
        out="$(fio_summary "$COLD/fio.json" | python3 -c 'import json,sys; d=json.load(sys.stdin); d["iops"]='"$((SIZE_BYTES / CLUSTER))"'/d["elapsed_s"]; print(json.dumps(d))')"
        log "  cow-4k-per-cluster-flush device-cow: $(python3 -c 'import json,sys; print("%.0f clusters/s" % json.loads(sys.argv[1])["iops"])' "$out")"
    fi
    record cow-4k-per-cluster-flush device-cow "$rep" iops "$out"
    rm -f "$file"
    sync
    fstrim "$COLD" >/dev/null 2>&1 || true
    quiesce
}

# device_mean_latency_ns WORKLOAD QD: QD over the median IOPS of the device's runs of WORKLOAD
# so far, in ns (empty if it has none).
device_mean_latency_ns() {
    python3 - "$RESULTS" "$1" "$2" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
v = [r["iops"] for r in rows if r["workload"] == sys.argv[2] and r["side"] == "device"
     and not r.get("failed") and r.get("iops")]
print(round(int(sys.argv[3]) * 1e9 / statistics.median(v)) if v else "")
PY
}

# run_one WORKLOAD SIDE REP: one measured run.
RUN_NO=0
run_one() {
    local w="$1" side="$2" rep="$3" img nq args=() fio_args=() cold=1 metric=iops out="" rc=0
    local logf="$COLD/logs/$RUN_NO-$side-$w.log"
    RUN_NO=$((RUN_NO + 1))
    local rt="$BENCH_COLD_RUNTIME"
    case "$w" in
    cold-randread-4k-qd32-q1 | cold-randread-own-4k-qd32-q1)
        nq=1
        args=(--rw randread --bs 4k --iodepth 32 --runtime "$rt")
        fio_args=(--rw=randread --bs=4k --iodepth=32 --numjobs=1 --runtime="$rt" --time_based)
        ;;
    cold-randread-4k-qd32-q2)
        nq=2
        args=(--rw randread --bs 4k --iodepth 32 --runtime "$rt")
        fio_args=(--rw=randread --bs=4k --iodepth=32 --numjobs=2 --runtime="$rt" --time_based)
        ;;
    fresh-write-1m-q2-flush)
        nq=2
        metric=mb_per_s
        args=(--rw write --bs 1m --iodepth 8 --no-wrap --final-flush --runtime 600)
        fio_args=(--rw=write --bs=1m --iodepth=8 --numjobs=2 --size=$((SIZE_BYTES / 2))
            --offset_increment=$((SIZE_BYTES / 2)) --end_fsync=1 --fallocate=none)
        ;;
    rewrite-1m-q2-flush)
        nq=2
        metric=mb_per_s
        args=(--rw write --bs 1m --iodepth 8 --final-flush --runtime "$rt")
        fio_args=(--rw=write --bs=1m --iodepth=8 --numjobs=2 --size=$((SIZE_BYTES / 2))
            --offset_increment=$((SIZE_BYTES / 2)) --time_based --runtime="$rt" --end_fsync=1)
        ;;
    cow-4k-per-cluster-flush | cow-4k-per-cluster-extl2-flush)
        nq=1
        args=(--rw write --bs 4k --stride 64k --no-wrap --iodepth 32 --final-flush --runtime 600)
        fio_args=(--rw=write:$((CLUSTER - 4096)) --bs=4k --iodepth=32 --numjobs=1
            --size="$SIZE_BYTES" --io_size=$((SIZE_BYTES / (CLUSTER / 4096))) --end_fsync=1
            --fallocate=none)
        ;;
    hot-randread-4k-qd32)
        nq=1
        cold=0
        args=(--rw randread --bs 4k --iodepth 32 --size 64m --ramp 1 --runtime "$rt")
        ;;
    esac
    if [[ "$side" == device ]]; then
        [[ "$cold" == 1 ]] || return 0
        local file="$BASE"
        if [[ "$w" == rewrite-* ]]; then
            # Every block written once (not an unwritten extent), as the overlay's clusters are.
            file="$COLD/device.raw"
            rm -f "$file"
            dd if=/dev/zero of="$file" bs=1M count=$((SIZE_BYTES >> 20)) oflag=direct \
                status=none
        elif [[ "$w" != cold-* ]]; then
            file="$COLD/device.raw"
            rm -f "$file"
            truncate -s "$SIZE_BYTES" "$file"
        fi
        drop_caches
        if fio --name=device --filename="$file" --ioengine=io_uring --direct=1 \
            "${fio_args[@]}" --output-format=json --output="$COLD/fio.json" >"$logf" 2>&1; then
            out="$(fio_summary "$COLD/fio.json")"
        else
            rc=$?
        fi
        rm -f "$COLD/device.raw"
        # Deleting a 1 GiB file on a file system mounted with `discard` makes the device trim
        # it in the background; let that finish here, not inside the next side's timed run.
        sync
        fstrim "$COLD" >/dev/null 2>&1 || true
        quiesce
        if [[ "$w" == cow-4k-per-cluster-flush && -n "$out" ]]; then
            device_cow_traffic "$rep" "$logf"
        fi
    else
        if [[ "$side" == null-device-latency ]]; then
            # The "image" is the device's mean latency in this run's cold reads, in ns: its
            # queue depth over its median IOPS (Little's law, exact for a closed loop). No I/O:
            # nothing to drop.
            img="$(device_mean_latency_ns "$w" "$((32 * nq))")"
            [[ -n "$img" ]] || return 0
            cold=0
        elif [[ "$w" == hot-* && "$side" == qsd-* ]]; then
            # The protocol limit: qemu-storage-daemon's null-co driver (run once, as the first
            # configuration; aio and cache.direct do not apply to it).
            [[ "$side" == "$FIRST_QSD" ]] || return 0
            img=null
        else
            local ext=off
            [[ "$w" == *-extl2-* ]] && ext=on
            if [[ "$w" == rewrite-* || "$w" == cold-randread-own-* ]]; then
                img="$(full_overlay)"
            else
                img="$(fresh_overlay "$ext")"
            fi
        fi
        [[ "$cold" == 0 ]] || drop_caches
        if start_daemon "$side" "$img" "$nq" "$logf"; then
            out="$(timeout 900 "$BENCH_CLIENT" --socket "$SOCK" --queues "$nq" \
                --daemon-pid "$DAEMON_PID" --json --label "$side/$w" "${args[@]}" 2>>"$logf")" || rc=$?
        else
            rc=127
        fi
        stop_daemon
        if [[ "$side" == null-device-latency && -n "$out" ]]; then
            out="$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["latency_ns"]=int(sys.argv[2]); print(json.dumps(d))' "$out" "$img")"
        fi
    fi
    if [[ -z "$out" ]]; then
        log "  $w $side: FAILED (exit $rc), see $logf"
    else
        log "  $w $side: $(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print("%.0f IOPS, %.1f MB/s in %.2f s" % (d["iops"], d["mb_per_s"], d["elapsed_s"]))' "$out")"
    fi
    record "$w" "$side" "$rep" "$metric" "$out"
}

WORKLOADS=(cold-randread-4k-qd32-q1 cold-randread-4k-qd32-q2 cold-randread-own-4k-qd32-q1
    fresh-write-1m-q2-flush rewrite-1m-q2-flush cow-4k-per-cluster-flush cow-4k-per-cluster-extl2-flush hot-randread-4k-qd32)
START=$(date +%s)
k=0
for w in "${WORKLOADS[@]}"; do
    [[ "$w" =~ $BENCH_COLD_FILTER ]] || continue
    for ((rep = 0; rep < BENCH_COLD_REPEAT; rep++)); do
        # Rotate the order of the sides from one run to the next, and reverse it every other
        # run: a rotation alone keeps who follows whom, and the side that always ran right
        # after the device's 1 GiB write paid for its aftermath in every run.
        n=${#SIDES[@]}
        for ((s = 0; s < n; s++)); do
            local_i=$(((s + k) % n))
            ((k % 2 == 0)) || local_i=$(((n - 1 - s + k) % n))
            run_one "$w" "${SIDES[$local_i]}" "$rep"
        done
        k=$((k + 1))
    done
    if [[ "$w" == cold-randread-* ]]; then
        for ((rep = 0; rep < BENCH_COLD_REPEAT; rep++)); do
            run_one "$w" null-device-latency "$rep"
        done
    fi
done
ELAPSED=$(($(date +%s) - START))
log "runs took ${ELAPSED}s"

daemon_cmd snapblk IMG SOCK N
SNAPBLK_LINE="${CMD[*]}"
SNAPBLK_LINE="${SNAPBLK_LINE#"$ROOT"/}"
export DROP_OK SETTLED ELAPSED BENCH_COLD_REPEAT BENCH_COLD_RUNTIME BENCH_COLD_SIZE SNAPBLK_LINE
export SIDES_LIST="${SIDES[*]}" LOADAVG="$(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$RESULTS" >"$BENCH_COLD_OUT" <<'PY'
import json, os, statistics, sys
E = os.environ
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
sides = E["SIDES_LIST"].split()
qsd = [s for s in sides if s.startswith("qsd-")]
workloads = []
for r in rows:
    if r["workload"] not in workloads:
        workloads.append(r["workload"])

def med(w, side, key=None):
    rs = [r for r in rows if r["workload"] == w and r["side"] == side and not r.get("failed")
          and not r.get("errors")]
    if not rs:
        return None, 0
    key = key or rs[0]["metric"]
    return statistics.median(r[key] for r in rs), len(rs)

def qsd_best(w):
    """The best median of the qemu-storage-daemon configurations on `w` (None if none ran)."""
    return max((med(w, q)[0] or 0) for q in qsd) or None

def fmt(v, metric):
    if v is None:
        return "n/a"
    return f"{v:,.0f} IOPS" if metric == "iops" else f"{v:,.0f} MB/s"

def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "n/a"

out = []
p = out.append
p("## Cold and durable workloads (vs qemu-storage-daemon's best configuration and the device)")
p("")
p(f"Generated by scripts/bench-cold.sh: medians of {E['BENCH_COLD_REPEAT']} runs per side, the "
  "order of the sides rotating between runs; " + (
      "host page cache dropped before every cold run" + (
          ", each started once the machine's free page reporting to its host was quiet "
          "(the freed memory handed back)." if E["SETTLED"] == "1" else ".")
      if E["DROP_OK"] == "1" else
      "**the host page cache could NOT be dropped (not root?): these runs are not cold.**"))
p(f"Disk: {E['BENCH_COLD_SIZE']} raw base of random data under a fresh qcow2 overlay (64 KiB clusters) "
  f"per run (for rewrites, a copy of an overlay whose every cluster was written once with qemu-io); "
  f"cold reads and rewrites run {E['BENCH_COLD_RUNTIME']} s. Write workloads end with a FLUSH and are timed "
  "until it completes. The device: fio, ioengine=io_uring, direct=1, the same pattern on a raw file "
  "of the same file system (the base for reads, a fresh sparse file for writes, a fully written "
  "one for rewrites, end_fsync=1). "
  f"qemu-storage-daemon configurations (aio, cache.direct): {', '.join(q[4:] for q in qsd)}; "
  "each workload is compared with the best of them. Hot reads compare with qemu-storage-daemon's "
  "null-co driver (no I/O at all: the protocol limit).")
p(f"snapblk: `{E['SNAPBLK_LINE']}`. Runs took {E['ELAPSED']} s; load average after: {E['LOADAVG']}.")
p("")
has_base = "snapblk-base" in sides
hdr = "| workload | device | qsd best (config) | snapblk | snapblk / qsd best | snapblk / device |"
if has_base:
    hdr += " snapblk-base | base / qsd best | base / device |"
p(hdr)
p("|---" * (hdr.count("|") - 1) + "|")
for w in workloads:
    metric = next(r["metric"] for r in rows if r["workload"] == w)
    dev, _ = med(w, "device")
    best, best_cfg = None, "n/a"
    for q in qsd:
        v, _ = med(w, q)
        if v is not None and (best is None or v > best):
            best, best_cfg = v, ("null-co" if w.startswith("hot-") else q[4:])
    sb, n = med(w, "snapblk")
    line = (f"| {w} | {fmt(dev, metric)} | {fmt(best, metric)} ({best_cfg}) | {fmt(sb, metric)} | "
            f"{ratio(sb, best)} | {ratio(sb, dev)} |")
    if has_base:
        bb, _ = med(w, "snapblk-base")
        line += f" {fmt(bb, metric)} | {ratio(bb, best)} | {ratio(bb, dev)} |"
    p(line)
cow, _ = med("cow-4k-per-cluster-flush", "device-cow")
if cow:
    sb, _ = med("cow-4k-per-cluster-flush", "snapblk")
    best = qsd_best("cow-4k-per-cluster-flush")
    p("")
    p(f"The device's ceiling for standard-L2 COW first writes: each moves a 64 KiB read of the "
      f"base and a 64 KiB write, and the device moves those bytes (fio: the base read and a fresh "
      f"file written at once, 1 MiB requests, QD16 each, O_DIRECT io_uring) at {cow:,.0f} "
      f"clusters per second; snapblk reaches {ratio(sb, cow)} of it, qemu-storage-daemon's best "
      f"{ratio(best, cow)}.")
trips = []
for w in workloads:
    nl, _ = med(w, "null-device-latency")
    if nl is None:
        continue
    dev, _ = med(w, "device")
    best = qsd_best(w)
    lat, _ = med(w, "null-device-latency", "latency_ns")
    trips.append(f"{w}: {nl:,.0f} IOPS at {lat / 1000:,.0f} us, {ratio(nl, dev)} the device "
                 f"(its best real configuration: {ratio(best, dev)}; 1.4x the ceiling would be "
                 f"{ratio(1.4 * nl, dev)} the device)")
if trips:
    p("")
    p("qemu-storage-daemon's own ceiling for the cold reads: its null-co driver (in an iothread, "
      "no I/O) completing every read after exactly the device's mean latency in these runs, "
      "through the same client. What it reaches is what its round trip (kick, request handling, "
      "completion notification, wake-ups) leaves of the device's rate on this machine, however "
      "fast its disk path: " + "; ".join(trips) + ".")
p("")
p("Every side, median (p50 / p99 latency in us, daemon CPU us per I/O where measured):")
p("")
p("| workload | side | median | runs | p50 us | p99 us | CPU us/IO |")
p("|---|---|---|---|---|---|---|")
for w in workloads:
    metric = next(r["metric"] for r in rows if r["workload"] == w)
    for s in sides + ["null-device-latency"]:
        v, n = med(w, s)
        if n == 0 and not any(r["workload"] == w and r["side"] == s for r in rows):
            continue
        p50, _ = med(w, s, "lat_p50_us") if n else (None, 0)
        p99, _ = med(w, s, "lat_p99_us") if n else (None, 0)
        cpu = None
        if n and s != "device":
            try:
                cpu, _ = med(w, s, "daemon_cpu_us_per_io")
            except (KeyError, TypeError):
                cpu = None
        f = lambda x: "n/a" if x is None else f"{x:,.1f}"
        p(f"| {w} | {s} | {fmt(v, metric)} | {n} | {f(p50)} | {f(p99)} | {f(cpu)} |")
print("\n".join(out))
PY
# The latency distributions, one plot per workload, linked below the tables (paths relative to
# the repository root, where BENCHMARKS.md is).
if [[ -x "$SNAPBLK_PLOT" ]] && plots="$("$SNAPBLK_PLOT" "$RESULTS" --out-dir "$BENCH_PLOT_DIR")"; then
    {
        echo
        echo "Latency distributions (the median run of each side; x: percentile, y: latency, log):"
        echo
        while read -r svg; do
            rel="$(realpath --relative-to="$ROOT" "$svg")"
            name="$(basename "$svg" .svg)"
            echo "![${name#latency-}]($rel)"
        done <<<"$plots"
    } >>"$BENCH_COLD_OUT"
else
    log "WARNING: no latency plots ($SNAPBLK_PLOT missing or failed)"
fi
log "wrote $BENCH_COLD_OUT"
