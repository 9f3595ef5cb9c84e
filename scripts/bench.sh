#!/usr/bin/env bash
# `make bench`: snapblk against qemu-storage-daemon (the reference vhost-user-blk peer) on
# identical images, with the same client (target/release/snapblk-bench, libblkio), then writes
# BENCHMARKS.md.
#
# For every image kind (raw; qcow2 overlay with every cluster allocated over a raw base; an empty
# qcow2 overlay for the copy-on-write workload), for 1 and 2 queues, and for every workload, it
# starts a fresh daemon on that side's own copy of the image, runs snapblk-bench against it with
# --daemon-pid (CPU time per I/O and peak RSS from /proc), stops the daemon, and alternates which
# side goes first from one workload to the next. It also records the physical ceiling (memory
# copy bandwidth, 4 KiB pwrite+fdatasync latency on the images' file system).
#
# Knobs (environment):
#   BENCH_RUNTIME=5      measured seconds per run        BENCH_RAMP=0.5  unmeasured warm-up seconds
#   BENCH_IMAGE_SIZE=1G  disk size                       BENCH_QUEUES="1 2"
#   BENCH_DIR=build/bench  images, sockets, logs, results.jsonl (keep it on a real disk, not tmpfs)
#   BENCH_OUT=BENCHMARKS.md                              BENCH_FILTER=REGEX  only matching workloads
#   BENCH_SIDES="qsd snapblk"                            BENCH_NO_BUILD=1  use existing binaries
#   BENCH_REPEAT=1       runs per side and workload; the report shows the median-IOPS run
#   SNAPBLK=path/to/snapblk  BENCH_CLIENT=path/to/snapblk-bench  SNAPBLK_EXTRA_ARGS="..."
#   BENCH_QUICK=1        a short development run (1 s runs, 256 MiB disk, 1 queue; cold part
#                        with 1 run per side), not a measurement
#   BENCH_SKIP_COLD=1    skip the cold/durable part (scripts/bench-cold.sh, its own knobs there;
#                        SNAPBLK_BASE=path/to/old/snapblk adds a before/after column)
# After the warm runs, scripts/bench-cold.sh runs in the same invocation (page cache dropped before
# each run, writes timed to a final FLUSH, every qemu-storage-daemon configuration, the device's
# own ceiling through fio) and its section is appended to the report.
# The snapblk command line lives in one place: snapblk_cmd() below.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"
if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
    : "${BENCH_RUNTIME:=1}" "${BENCH_RAMP:=0.2}" "${BENCH_IMAGE_SIZE:=256M}" "${BENCH_QUEUES:=1}"
fi
BENCH_RUNTIME="${BENCH_RUNTIME:-5}"
BENCH_RAMP="${BENCH_RAMP:-0.5}"
BENCH_IMAGE_SIZE="${BENCH_IMAGE_SIZE:-1G}"
BENCH_QUEUES="${BENCH_QUEUES:-1 2}"
BENCH_DIR="${BENCH_DIR:-$ROOT/build/bench}"
BENCH_OUT="${BENCH_OUT:-$ROOT/BENCHMARKS.md}"
BENCH_FILTER="${BENCH_FILTER:-.}"
BENCH_SIDES="${BENCH_SIDES:-qsd snapblk}"
BENCH_REPEAT="${BENCH_REPEAT:-1}"
SNAPBLK_EXTRA_ARGS="${SNAPBLK_EXTRA_ARGS:-}"
QSD="${QSD:-qemu-storage-daemon}"
CLUSTER=65536 # qcow2 cluster size of the overlays (qemu-img default)

log() { printf 'bench: %s\n' "$*" >&2; }
die() { printf 'bench: ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# The daemon command lines. Edit snapblk_cmd when snapblk grows options (--cache-size, overlay
# flags); it is the only place the benchmark spells the snapblk command line.
#   $1 image file   $2 socket   $3 number of queues   $4 image kind: raw | qcow2 | cow
# Each sets the global array CMD.
snapblk_cmd() {
    # shellcheck disable=SC2206 # SNAPBLK_EXTRA_ARGS is split on purpose
    CMD=("$SNAPBLK" serve --image "$1" --socket "$2" --num-queues "$3" --cache writeback
        $SNAPBLK_EXTRA_ARGS)
}
qsd_cmd() {
    # cache.direct=off: the file node goes through the host page cache, i.e. writeback;
    # a guest flush becomes fdatasync(). The qcow2 node opens the raw backing file itself.
    if [[ "$4" == raw ]]; then
        CMD=("$QSD" --blockdev "driver=file,node-name=f,filename=$1,cache.direct=off"
            --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$2,writable=on,num-queues=$3")
    else
        CMD=("$QSD" --blockdev "driver=file,node-name=f,filename=$1,cache.direct=off"
            --blockdev "driver=qcow2,node-name=q,file=f"
            --export "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path=$2,writable=on,num-queues=$3")
    fi
}

# Workloads: name | snapblk-bench arguments | image kinds it runs on.
WORKLOADS=(
    "randread-4k-qd1|--rw randread --bs 4k --iodepth 1|raw qcow2"
    "randread-4k-qd32|--rw randread --bs 4k --iodepth 32|raw qcow2"
    "randwrite-4k-qd1|--rw randwrite --bs 4k --iodepth 1|raw qcow2"
    "randwrite-4k-qd32|--rw randwrite --bs 4k --iodepth 32|raw qcow2"
    "seqread-128k-qd8|--rw read --bs 128k --iodepth 8|raw qcow2"
    "seqwrite-128k-qd8|--rw write --bs 128k --iodepth 8|raw qcow2"
    "randwrite-4k-qd32-flush32|--rw randwrite --bs 4k --iodepth 32 --flush-every 32|raw qcow2"
    # One 4 KiB write per 64 KiB cluster, never wrapping: every write allocates a cluster and
    # copies the rest of it from the base (the run ends early if the overlay fills up).
    "cow-firstwrite-4k-qd32|--rw write --bs 4k --stride $CLUSTER --no-wrap --iodepth 32|cow"
)

# ---------------------------------------------------------------------------------------------
trap stop_daemon EXIT

command -v "$QSD" >/dev/null || die "qemu-storage-daemon not found (run scripts/install-deps.sh)"
command -v qemu-img >/dev/null || die "qemu-img not found"
command -v python3 >/dev/null || die "python3 not found (needed to write the report)"

if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    log "building release binaries"
    cargo build --release -p snapblk-tests --bin snapblk-bench --bin snapblk-plot ||
        die "cannot build snapblk-bench / snapblk-plot"
    if ! cargo build --release -p snapblk; then
        log "WARNING: snapblk does not build; benchmarking qemu-storage-daemon only"
    fi
fi
[[ -x "$BENCH_CLIENT" ]] || die "no benchmark client at $BENCH_CLIENT"

SIDES=()
for s in $BENCH_SIDES; do
    if [[ "$s" == snapblk ]] && ! { [[ -x "$SNAPBLK" ]] && "$SNAPBLK" serve --help >/dev/null 2>&1; }; then
        log "WARNING: $SNAPBLK has no working 'serve'; skipping the snapblk side"
        continue
    fi
    SIDES+=("$s")
done
((${#SIDES[@]} > 0)) || die "no side to benchmark"

mkdir -p "$BENCH_DIR"
BENCH_DIR="$(cd "$BENCH_DIR" && pwd)"
RESULTS="$BENCH_DIR/results.jsonl"
: >"$RESULTS"

# --- images ----------------------------------------------------------------------------------
SIZE_BYTES="$(numfmt --from=iec "${BENCH_IMAGE_SIZE%B}")"
log "preparing $BENCH_IMAGE_SIZE images in $BENCH_DIR"
rm -f "$BENCH_DIR"/*.raw "$BENCH_DIR"/*.qcow2 "$BENCH_DIR"/*.sock
# The base: incompressible data, so COW copies and reads of it move real bytes.
head -c "$SIZE_BYTES" /dev/urandom >"$BENCH_DIR/base.raw"
# A fully allocated overlay (steady state): every cluster written once through qemu-io.
qemu-img create -q -f qcow2 -o cluster_size=$CLUSTER -b base.raw -F raw "$BENCH_DIR/alloc.qcow2"
qemu-io -f qcow2 -c "write -q -P 0x5a 0 $SIZE_BYTES" "$BENCH_DIR/alloc.qcow2" >/dev/null
for s in "${SIDES[@]}"; do
    cp "$BENCH_DIR/base.raw" "$BENCH_DIR/$s-disk.raw"
    cp "$BENCH_DIR/alloc.qcow2" "$BENCH_DIR/$s-alloc.qcow2"
done
sync

# image_for SIDE KIND -> path; a COW run always gets a fresh, empty overlay.
image_for() {
    case "$2" in
    raw) echo "$BENCH_DIR/$1-disk.raw" ;;
    qcow2) echo "$BENCH_DIR/$1-alloc.qcow2" ;;
    cow)
        rm -f "$BENCH_DIR/$1-cow.qcow2"
        qemu-img create -q -f qcow2 -o cluster_size=$CLUSTER -b base.raw -F raw "$BENCH_DIR/$1-cow.qcow2"
        echo "$BENCH_DIR/$1-cow.qcow2"
        ;;
    esac
}

# start_daemon SIDE KIND QUEUES IMAGE LOG: starts the daemon (DAEMON_PID) and waits for its socket
# (SOCK). Fails at once if the daemon exits (bad arguments, unsupported image).
start_daemon() {
    local side="$1" kind="$2" nq="$3" img="$4" logf="$5"
    SOCK="$BENCH_DIR/$side.sock"
    if [[ "$side" == qsd ]]; then qsd_cmd "$img" "$SOCK" "$nq" "$kind"; else snapblk_cmd "$img" "$SOCK" "$nq" "$kind"; fi
    launch_daemon "$SOCK" "$logf"
}

# record SIDE KIND QUEUES WORKLOAD ARGS JSON: one line of results.jsonl.
record() {
    python3 - "$@" >>"$RESULTS" <<'PY'
import json, sys
side, kind, nq, name, args, out = sys.argv[1:]
d = json.loads(out)
d.update(side=side, kind=kind, queues_run=int(nq), workload=name, args=args,
         loadavg_1min=float(open("/proc/loadavg").read().split()[0]))
print(json.dumps(d))
PY
}

json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }

# verify SIDE KIND REFERENCE: before any benchmark, the daemon must show exactly the expected
# disk (capacity and sampled contents); otherwise that side/kind is not benchmarked (a daemon that
# serves a qcow2 file as raw, or returns wrong bytes, would produce meaningless figures).
declare -A INVALID=()
verify() {
    local side="$1" kind="$2" ref="$3" img logf out rc=0
    img="$(image_for "$side" "$kind")"
    logf="$BENCH_DIR/logs/verify-$side-$kind.log"
    if start_daemon "$side" "$kind" 1 "$img" "$logf"; then
        out="$("$BENCH_CLIENT" --socket "$SOCK" --verify-file "$ref" --json 2>>"$logf")" || rc=$?
    else
        rc=127
        out=""
    fi
    stop_daemon
    if [[ "$rc" == 0 ]]; then
        log "  $side $kind: contents verified"
        return
    fi
    local why
    why="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get("problem",""))' "$out" 2>/dev/null || true)"
    [[ -n "$why" ]] || why="daemon or client failed (exit $rc), see $logf"
    INVALID["$side/$kind"]="$why"
    log "  $side $kind: NOT BENCHMARKED: $why"
}

# run_one SIDE KIND QUEUES WORKLOAD-NAME ARGS...: one measured run, one JSON line in results.
RUN_NO=0
run_one() {
    local side="$1" kind="$2" nq="$3" name="$4"
    shift 4
    local img logf out rc=0 ramp="$BENCH_RAMP"
    if [[ -n "${INVALID[$side/$kind]:-}" ]]; then
        record "$side" "$kind" "$nq" "$name" "$*" \
            "{\"failed\":true,\"skipped\":true,\"reason\":$(json_str "${INVALID[$side/$kind]}")}"
        return
    fi
    img="$(image_for "$side" "$kind")"
    logf="$BENCH_DIR/logs/$RUN_NO-$side-$kind-q$nq-$name.log"
    RUN_NO=$((RUN_NO + 1))
    [[ "$kind" != cow ]] || ramp=0
    # Same page-cache state for both sides: what earlier runs wrote is on the disk (a run that
    # follows a heavy-write workload would otherwise compete with the host writing it out), and
    # the image (and base) is read once before the run.
    sync
    cat "$img" >/dev/null
    [[ "$kind" == raw ]] || cat "$BENCH_DIR/base.raw" >/dev/null
    if start_daemon "$side" "$kind" "$nq" "$img" "$logf"; then
        out="$(timeout $((${BENCH_RUNTIME%.*} + 60)) "$BENCH_CLIENT" --socket "$SOCK" \
            --queues "$nq" --runtime "$BENCH_RUNTIME" --ramp "$ramp" --daemon-pid "$DAEMON_PID" \
            --json --label "$side/$kind/q$nq/$name" "$@" 2>>"$logf")" || rc=$?
    else
        rc=127
        out=""
    fi
    stop_daemon
    if [[ -z "$out" ]]; then
        log "  $side $kind q$nq $name: FAILED (exit $rc), see $logf"
        out="{\"failed\":true,\"exit\":$rc,\"reason\":$(json_str "run failed (exit $rc), log $logf")}"
    else
        log "  $side $kind q$nq $name: $(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print("%.0f IOPS, %.1f MB/s, p99 %.0f us, errors %d" % (d["iops"], d["mb_per_s"], d["lat_p99_us"], d["errors"]))' "$out")"
    fi
    record "$side" "$kind" "$nq" "$name" "$*" "$out"
}

mkdir -p "$BENCH_DIR/logs"
rm -f "$BENCH_DIR"/logs/*.log
log "physical ceiling"
"$BENCH_CLIENT" --ceiling-dir "$BENCH_DIR" --runtime 2 --json >"$BENCH_DIR/ceiling.json"

log "checking that every daemon shows the expected disk"
# The allocated overlay's expected contents, as qemu-img sees them.
qemu-img convert -O raw "$BENCH_DIR/alloc.qcow2" "$BENCH_DIR/alloc-ref.raw"
for s in "${SIDES[@]}"; do
    verify "$s" raw "$BENCH_DIR/base.raw"
    verify "$s" qcow2 "$BENCH_DIR/alloc-ref.raw"
    verify "$s" cow "$BENCH_DIR/base.raw"
done
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"

START=$(date +%s)
i=0
for nq in $BENCH_QUEUES; do
    for w in "${WORKLOADS[@]}"; do
        IFS='|' read -r name wargs kinds <<<"$w"
        [[ "$name" =~ $BENCH_FILTER ]] || continue
        for kind in $kinds; do
            # Alternate which side runs first, so drift (page cache, thermal) hits both.
            if ((i % 2 == 0)); then
                order=("${SIDES[@]}")
            else
                mapfile -t order < <(printf '%s\n' "${SIDES[@]}" | tac)
            fi
            i=$((i + 1))
            for ((rep = 0; rep < BENCH_REPEAT; rep++)); do
                for side in "${order[@]}"; do
                    # shellcheck disable=SC2086 # workload arguments are split on purpose
                    run_one "$side" "$kind" "$nq" "$name" $wargs
                done
                # Next repetition starts with the other side.
                mapfile -t order < <(printf '%s\n' "${order[@]}" | tac)
            done
        done
    done
done
ELAPSED=$(($(date +%s) - START))
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"
log "runs took ${ELAPSED}s"

COLD_MD="$BENCH_DIR/cold.md"
rm -f "$COLD_MD"
if [[ "${BENCH_SKIP_COLD:-0}" != 1 ]]; then
    log "cold and durable workloads (scripts/bench-cold.sh)"
    if ! BENCH_NO_BUILD=1 BENCH_DIR="$BENCH_DIR" BENCH_COLD_OUT="$COLD_MD" SNAPBLK="$SNAPBLK" \
        BENCH_CLIENT="$BENCH_CLIENT" bash "$ROOT/scripts/bench-cold.sh"; then
        log "WARNING: the cold/durable part failed; the report has no such section"
        rm -f "$COLD_MD"
    fi
fi
export COLD_MD

# --- report ----------------------------------------------------------------------------------
FS_TYPE="$(df -T "$BENCH_DIR" | awk 'NR==2 {print $2}')"
FS_DEV="$(df -T "$BENCH_DIR" | awk 'NR==2 {print $1}')"
QSD_VERSION="$("$QSD" --version | head -1)"
GIT_REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
GIT_DIRTY=""
if git -C "$ROOT" status --porcelain 2>/dev/null | grep -q .; then
    GIT_DIRTY=" (with uncommitted changes)"
fi
snapblk_cmd IMG SOCK N raw
SNAPBLK_LINE="${CMD[*]}"
SNAPBLK_LINE="${SNAPBLK_LINE#"$ROOT"/}"
qsd_cmd IMG SOCK N raw
QSD_RAW_LINE="${CMD[*]}"
qsd_cmd OVERLAY SOCK N qcow2
QSD_QCOW_LINE="${CMD[*]}"

export BENCH_REPEAT LOAD_BEFORE LOAD_AFTER BENCH_RUNTIME BENCH_RAMP BENCH_IMAGE_SIZE BENCH_DIR ELAPSED FS_TYPE FS_DEV QSD_VERSION \
    GIT_REV GIT_DIRTY SNAPBLK_LINE QSD_RAW_LINE QSD_QCOW_LINE CLUSTER
SIDES_LIST="${SIDES[*]}"
CPU_MODEL="$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
CPU_COUNT="$(nproc)"
MEM_TOTAL="$(free -h | awk '/^Mem:/ {print $2}')"
KERNEL_REL="$(uname -r)"
RUSTC_VERSION="$(rustc --version 2>/dev/null || echo unknown)"
WORKLOAD_LINES="$(printf '%s\n' "${WORKLOADS[@]}")"
RUN_DATE="$(date -u '+%Y-%m-%d %H:%M UTC')"
export SIDES_LIST CPU_MODEL CPU_COUNT MEM_TOTAL KERNEL_REL RUSTC_VERSION WORKLOAD_LINES RUN_DATE ROOT

python3 - "$RESULTS" "$BENCH_DIR/ceiling.json" >"$BENCH_OUT" <<'PY'
import json, os, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ceil = json.load(open(sys.argv[2]))
E = os.environ
sides = E["SIDES_LIST"].split()
repeat = int(E["BENCH_REPEAT"])
both = "qsd" in sides and "snapblk" in sides

def fmt(v, unit=""):
    if v is None:
        return "n/a"
    if v >= 100:
        return f"{v:,.0f}{unit}"
    if v >= 10:
        return f"{v:.1f}{unit}"
    return f"{v:.2f}{unit}"

def median_run(runs):
    """The run with the median IOPS (failed runs only if nothing else is there)."""
    good = sorted((r for r in runs if not r.get("failed")), key=lambda r: r["iops"])
    if good:
        return good[(len(good) - 1) // 2]
    return runs[0] if runs else None

def spread(runs):
    v = [r["iops"] for r in runs if not r.get("failed")]
    return f"{min(v):,.0f}-{max(v):,.0f}" if v else "n/a"

def cell(a, b, key, scale=1.0):
    va = a.get(key) if a and not a.get("failed") else None
    vb = b.get(key) if b and not b.get("failed") else None
    va = None if va is None else va * scale
    vb = None if vb is None else vb * scale
    if not both:
        return fmt(va if "qsd" in sides else vb)
    r = f" ({vb / va:.2f}x)" if va and vb is not None else ""
    return f"{fmt(va)} / {fmt(vb)}{r}"

out = []
p = out.append
p("# snapblk benchmarks")
p("")
p(f"Generated by `make bench` (scripts/bench.sh) on {E['RUN_DATE']}, snapblk at `{E['GIT_REV']}`{E['GIT_DIRTY']}.")
p("Do not edit by hand; rerun `make bench` (knobs: `BENCH_RUNTIME`, `BENCH_RAMP`, `BENCH_IMAGE_SIZE`,")
p("`BENCH_QUEUES`, `BENCH_FILTER`, `SNAPBLK_EXTRA_ARGS`; see the script's header).")
p("")
if not both:
    missing = "snapblk" if "snapblk" not in sides else "qemu-storage-daemon"
    p(f"**Only {', '.join(sides)} was measured in this run: {missing} was not available "
      "(see the script's log). The tables show that side's figures alone.**")
    p("")
p("## Machine")
p("")
p(f"- CPU: {E['CPU_MODEL']}, {E['CPU_COUNT']} cores (shared by daemon and benchmark client)")
p(f"- Memory: {E['MEM_TOTAL']}")
p(f"- Kernel: {E['KERNEL_REL']}")
p(f"- File system of the images: {E['FS_TYPE']} on {E['FS_DEV']}")
p(f"- {E['QSD_VERSION']}; {E['RUSTC_VERSION']}")
p("")
p("## Physical ceiling")
p("")
p(f"- Memory copy bandwidth (64 MiB buffers, one thread): **{ceil['memcpy_gb_per_s']:.1f} GB/s**")
p(f"- 4 KiB `pwrite` + `fdatasync` on the images' file system: mean **{ceil['fdatasync_mean_us']:.0f} us**, "
  f"p50 {ceil['fdatasync_p50_us']:.0f} us, p99 {ceil['fdatasync_p99_us']:.0f} us "
  f"({ceil['fdatasync_samples']} samples). This bounds what a flush can cost.")
p("")
p("## Method")
p("")
p(f"- Same client for both sides: `snapblk-bench` (libblkio `virtio-blk-vhost-user` driver, one thread "
  f"per queue, `--iodepth` per queue), {E['BENCH_RUNTIME']} s measured after a {E['BENCH_RAMP']} s ramp "
  "(no ramp for the COW run), a fresh daemon process per run, sides alternating which goes first.")
p(f"- Disk: {E['BENCH_IMAGE_SIZE']}. `raw`: a raw file holding random data. `qcow2`: a qcow2 overlay "
  f"({int(E['CLUSTER']) // 1024} KiB clusters) over that raw base with every cluster already allocated "
  "(written once with `qemu-io`), i.e. steady state. `cow`: a fresh, empty overlay over the same base for "
  "every run. Each side has its own identical copy; the base is only read.")
p("- Before each run `sync` writes out what earlier runs left dirty in the host page cache (so no run "
  "competes with the write-out of the one before), then the image (and base) is read once so both sides "
  "start with it in the host page cache.")
p("- Cache modes: **qemu-storage-daemon** runs its file node with `cache.direct=off`, its default: I/O goes "
  "through the host page cache, so it is a write-back cache (a guest flush becomes `fdatasync`). "
  "**snapblk** runs with `--cache writeback` (its own folio cache; flush writes back and syncs). "
  "Writeback vs writeback.")
wce = {}
for r in rows:
    if not r.get("failed") and "device_writeback" in r:
        wce.setdefault(r["side"], set()).add(r["device_writeback"])
if wce:
    seen = "; ".join(f"{sd}: " + "/".join("on" if v else "off" for v in sorted(vals))
                     for sd, vals in sorted(wce.items()))
    p(f"- Write-cache flag the client saw in the virtio-blk config (`writeback` field): {seen}. "
      "The benchmark sends its flushes regardless of that flag (a Linux guest would send none to a "
      "device that reports it off).")
p("- CPU per I/O: the daemon's utime+stime (`/proc/PID/stat`, all threads) over the window divided by "
  "the I/Os completed in it; peak RSS: `VmHWM` of `/proc/PID/status` at the end of the run.")
p("- Latency: submission to completion as seen by the client, including client-side overhead.")
p("")
p("Commands (IMG, SOCK, N filled in per run):")
p("")
p("```")
p(E["QSD_RAW_LINE"])
p(E["QSD_QCOW_LINE"])
p(E["SNAPBLK_LINE"])
p("snapblk-bench --socket SOCK --queues N --runtime " + E["BENCH_RUNTIME"] + " --ramp " + E["BENCH_RAMP"]
  + " --daemon-pid PID --json <workload arguments>")
p("```")
p("")
p("| workload | snapblk-bench arguments | images |")
p("|---|---|---|")
for line in E["WORKLOAD_LINES"].splitlines():
    name, args, kinds = line.split("|")
    p(f"| {name} | `{args}` | {kinds} |")
p("")
p("## Results")
p("")
if both:
    p("Every cell: **qemu-storage-daemon / snapblk (ratio snapblk/qsd)**. Higher is better for IOPS and "
      "MB/s, lower for latency, CPU and memory.")
else:
    p(f"Every cell: the {sides[0]} figure.")
if repeat > 1:
    p("")
    p(f"Each side ran every workload {repeat} times (alternating which side went first); the figures "
      "are those of the run with the median IOPS.")
p("")
order = []
for r in rows:
    if r["workload"] not in order:
        order.append(r["workload"])
for w in order:
    rs = [r for r in rows if r["workload"] == w]
    p(f"### {w}")
    p("")
    flush = any(r.get("flushes") for r in rs)
    hdr = "| image | queues | IOPS | MB/s | mean lat us | p99 lat us | daemon CPU us/IO | daemon peak RSS MiB |"
    if flush:
        hdr += " flush mean us |"
    if repeat > 1:
        hdr += f" IOPS range of {repeat} runs |"
    p(hdr)
    p("|---" * (hdr.count("|") - 1) + "|")
    keys = []
    for r in rs:
        k = (r["kind"], r["queues_run"])
        if k not in keys:
            keys.append(k)
    for kind, nq in keys:
        a = median_run([r for r in rs if r["kind"] == kind and r["queues_run"] == nq and r["side"] == "qsd"])
        b = median_run([r for r in rs if r["kind"] == kind and r["queues_run"] == nq and r["side"] == "snapblk"])
        line = (f"| {kind} | {nq} | {cell(a, b, 'iops')} | {cell(a, b, 'mb_per_s')} | "
                f"{cell(a, b, 'lat_mean_us')} | {cell(a, b, 'lat_p99_us')} | "
                f"{cell(a, b, 'daemon_cpu_us_per_io')} | {cell(a, b, 'daemon_vmhwm_kib', 1 / 1024)} |")
        if flush:
            line += f" {cell(a, b, 'flush_lat_mean_us')} |"
        if repeat > 1:
            sel = lambda side: [r for r in rs if r["kind"] == kind and r["queues_run"] == nq and r["side"] == side]
            line += " " + " / ".join(spread(sel(sd)) for sd in sides) + " |"
        p(line)
    fails = [r for r in rs if r.get("failed") or r.get("errors")]
    seen = set()
    for r in fails:
        msg = (f"not measured: {r.get('reason')}" if r.get("failed")
               else f"{r['errors']} I/O errors, first: {r.get('first_error')}")
        key = (r["side"], r["kind"], msg if r.get("skipped") else r["queues_run"])
        if key in seen:
            continue
        seen.add(key)
        p("")
        qs = "" if r.get("skipped") else f" q{r['queues_run']}"
        p(f"- {r['side']} {r['kind']}{qs}: {msg}")
    short = [r for r in rs if not r.get("failed") and not r.get("wrap", True)
             and r.get("elapsed_s", 0) + 0.05 < float(E["BENCH_RUNTIME"])]
    if short:
        p("")
        p("- Every cluster was written before the run time was up; rates are over the time it took: "
          + ", ".join(f"{r['side']} q{r['queues_run']} {r['elapsed_s']:.2f} s" for r in short) + ".")
    p("")
p("## Notes")
p("")
p(f"- Runs took {E['ELAPSED']} s in total; load average (1/5/15 min) {E['LOAD_BEFORE']} before, "
  f"{E['LOAD_AFTER']} after (anything else running on the 2 cores skews single runs).")
p(f"- Before the runs, each daemon had to show exactly the expected disk (capacity and "
  f"{2048 + 2} sampled 4 KiB blocks against a raw reference); a side/image that failed that check "
  "is listed under its workloads as not measured.")
rel = os.path.relpath(E['BENCH_DIR'], E['ROOT']) if E['BENCH_DIR'].startswith(E['ROOT']) else E['BENCH_DIR']
p(f"- Raw per-run JSON: `{rel}/results.jsonl`; daemon logs: `{rel}/logs/`.")
p("- With only 2 cores, the client's submission threads and the daemon's queue threads compete for "
  "the same CPUs; QD32 and 2-queue figures are CPU-bound on this machine, not storage-bound.")
p("- Peak RSS: snapblk's includes its own folio cache (`--cache-size`, 256 MiB by default, counted "
  "as it is touched); qemu-storage-daemon caches in the kernel page cache, which its RSS does not count.")
p("- The COW workload writes one 4 KiB block into each 64 KiB cluster of an empty overlay and stops "
  "when every cluster has been written once (16384 writes per GiB of disk), so its window can be "
  "shorter than the others; raise `BENCH_IMAGE_SIZE` to lengthen it.")
p("- The working set fits in memory: qemu-storage-daemon (cache.direct=off) keeps all of it in the "
  "host page cache, and so do snapblk's reads. snapblk's writes mostly stay there too: the crash "
  "journal (on unless `--crash-journal none`) records every write and trims each 64 MiB segment "
  "by writing the cache back into the image file (over qcow2 with the metadata, syncing only "
  "where its crash-consistent order needs it: not at all for the allocated `qcow2` image). But "
  "writebacks of 256 KiB and more into a qcow2 image go to the device with O_DIRECT (`--direct "
  "auto`), so sequential write streams of smaller requests that never FLUSH are paced by the "
  "device on snapblk's side and by memory on qemu-storage-daemon's. Reads of 128 KiB and more "
  "go around the folio cache, writes from 256 KiB on. The writeback of a FLUSH into a qcow2 "
  "image goes to the device with O_DIRECT at every size (its fdatasync would write it out "
  "of the page cache at once).")
if os.path.exists(E["COLD_MD"]):
    p("")
    p(open(E["COLD_MD"]).read().rstrip())
analysis = os.path.join(E['ROOT'], 'scripts', 'bench-analysis.md')
if os.path.exists(analysis):
    p("")
    p(open(analysis).read().rstrip())
print("\n".join(out))
PY
log "wrote $BENCH_OUT"
