# Shared by scripts/bench.sh and scripts/bench-cold.sh (sourced): starting and stopping the daemon
# under test, and where the binaries are. The caller sets ROOT before sourcing, and the array CMD
# (the daemon's command line) before launching.

TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
SNAPBLK="${SNAPBLK:-$TARGET/release/snapblk}"
BENCH_CLIENT="${BENCH_CLIENT:-$TARGET/release/snapblk-bench}"
SNAPBLK_PLOT="${SNAPBLK_PLOT:-$TARGET/release/snapblk-plot}"

DAEMON_PID=""

# launch_daemon SOCKET LOG: runs "${CMD[@]}" in the background (DAEMON_PID), its command line and
# output in LOG, and waits up to 10 s for SOCKET. Fails at once if the daemon exits (bad
# arguments, unsupported image).
launch_daemon() {
    local sock="$1" logf="$2" waited=0
    rm -f "$sock"
    echo "${CMD[*]}" >"$logf"
    "${CMD[@]}" >>"$logf" 2>&1 &
    DAEMON_PID=$!
    while [[ ! -S "$sock" ]] && kill -0 "$DAEMON_PID" 2>/dev/null && ((waited < 200)); do
        sleep 0.05
        waited=$((waited + 1))
    done
    kill -0 "$DAEMON_PID" 2>/dev/null
}

stop_daemon() {
    if [[ -n "$DAEMON_PID" ]]; then
        kill "$DAEMON_PID" 2>/dev/null || true
        wait "$DAEMON_PID" 2>/dev/null || true
    fi
    DAEMON_PID=""
}
