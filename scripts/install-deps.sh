#!/usr/bin/env bash
# Install everything the QEMU guest tests and the demo need, idempotently.
#
# What it does (each step is skipped when already satisfied):
#   1. apt-get install the QEMU runtime libraries, firmware, a guest kernel and busybox-static.
#      `apt-get update` runs only when a package is missing. A simulated install is checked
#      first: if apt would REMOVE anything (e.g. qemu-utils 10), the script aborts instead.
#   2. Provide qemu-system-x86_64: use the one on PATH if there is one; otherwise
#      `apt-get download qemu-system-x86` and unpack it with `dpkg-deb -x` into build/qemu/
#      (installing Debian's qemu-system-x86 7.2 would remove qemu-utils 10), plus the
#      accel-tcg modules of the same version's qemu-system-common into
#      build/qemu/usr/lib/x86_64-linux-gnu/qemu (used through QEMU_MODULE_DIR).
#   3. Build a firmware search dir build/qemu/share (symlinks to /usr/share/seabios and
#      /usr/share/qemu) for `-L`, because the BIOS symlinks normally shipped by
#      qemu-system-common are absent.
#   4. Check that qemu-storage-daemon, qemu-img, qemu-nbd and cargo exist.
#
# NBD bases (issue 16): libnbd-dev is the NBD client library snapblk links (crate nbd-client);
# nbdkit (with its built-in file plugin and error/delay filters) and qemu-nbd (qemu-utils) are
# the servers the NBD tests and `make bench-nbd` run.
#
# Usage: scripts/install-deps.sh [--check]   (--check: report only, change nothing, exit 1 if
# something is missing). Must run as root unless everything is already present.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QEMU_DIR="$ROOT/build/qemu"
CHECK_ONLY=0
[[ "${1:-}" == "--check" ]] && CHECK_ONLY=1

log() { printf 'install-deps: %s\n' "$*"; }
die() { printf 'install-deps: ERROR: %s\n' "$*" >&2; exit 1; }

PKGS=(
    qemu-system-data seabios ipxe-qemu libaio1 libbpf1 libcapstone4 libfdt1 libfuse3-3
    libglib2.0-0 libgmp10 libgnutls30 libibverbs1 libjpeg62-turbo libnuma1 libpixman-1-0
    libpmem1 libpng16-16 librdmacm1 libsasl2-2 libseccomp2 libslirp0 liburing2 libvdeplug2
    linux-image-amd64 busybox-static cpio gzip fio
    libnbd-dev nbdkit
)

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

need_root() {
    if [[ "$(id -u)" != 0 ]]; then
        die "$1 (needs root; re-run as root)"
    fi
}

apt_updated=0
apt_update_once() {
    if [[ $apt_updated == 0 ]]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
}

# ---- 1. Debian packages -------------------------------------------------------------------
missing=()
for p in "${PKGS[@]}"; do
    installed "$p" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
    log "packages: all ${#PKGS[@]} present"
else
    log "packages missing: ${missing[*]}"
    [[ $CHECK_ONLY == 1 ]] && exit 1
    need_root "cannot install packages"
    apt_update_once
    sim="$(DEBIAN_FRONTEND=noninteractive apt-get install -s -y --no-install-recommends "${missing[@]}")"
    if grep -q '^Remv' <<<"$sim"; then
        grep '^Remv' <<<"$sim" >&2
        die "apt would remove the packages above; refusing"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    log "packages: installed ${missing[*]}"
fi

# ---- 1b. a machine with no qemu-utils at all ---------------------------------------------------
# Nothing newer to protect: install Debian's qemu-system-x86 together with qemu-utils in one call
# (qemu-img, qemu-io, qemu-storage-daemon and the guest's QEMU of one consistent version).
if ! command -v qemu-img >/dev/null 2>&1 && ! installed qemu-utils; then
    [[ $CHECK_ONLY == 1 ]] && { log "qemu-utils missing"; exit 1; }
    need_root "cannot install qemu-utils"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86 qemu-utils
    log "packages: installed qemu-system-x86 and qemu-utils together"
fi

# ---- 2. qemu-system-x86_64 -------------------------------------------------------------------
# "Works" means: starts a TCG machine and quits (catches a missing accel-tcg module).
qemu_works() {
    local moddir="${2:-}"
    echo quit | QEMU_MODULE_DIR="$moddir" timeout 30 "$1" -machine none -accel tcg -nodefaults \
        -display none -monitor stdio >/dev/null 2>&1
}
MOD_DIR="$QEMU_DIR/usr/lib/x86_64-linux-gnu/qemu"

download_deb() { # $1 = package[=version]; prints the .deb path
    if ! (cd "$tmp" && apt-get download "$1" >/dev/null 2>&1); then
        apt_update_once >&2
        (cd "$tmp" && apt-get download "$1" >&2) || die "apt-get download $1 failed"
    fi
    ls "$tmp"/"${1%%=*}"_*.deb
}

if command -v qemu-system-x86_64 >/dev/null 2>&1 && qemu_works "$(command -v qemu-system-x86_64)"; then
    log "qemu-system-x86_64: using $(command -v qemu-system-x86_64) from PATH"
elif [[ -x "$QEMU_DIR/usr/bin/qemu-system-x86_64" ]] && qemu_works "$QEMU_DIR/usr/bin/qemu-system-x86_64" "$MOD_DIR"; then
    log "qemu-system-x86_64: already extracted in $QEMU_DIR"
else
    [[ $CHECK_ONLY == 1 ]] && { log "qemu-system-x86_64 missing"; exit 1; }
    need_root "cannot fetch qemu-system-x86"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    chmod 755 "$tmp" # lets apt's _apt user write there (no "unsandboxed" warning)
    deb="$(download_deb qemu-system-x86)"
    ver="$(dpkg-deb -f "$deb" Version)"
    # The TCG accelerator is a loadable module shipped in qemu-system-common, which cannot be
    # installed (it Breaks qemu-utils 10 via its version); take only the accel-tcg modules
    # from the exact same version (QEMU refuses modules from another build).
    common="$(download_deb "qemu-system-common=$ver")"
    rm -rf "${QEMU_DIR:?}/usr"
    mkdir -p "$QEMU_DIR" "$tmp/common" "$MOD_DIR"
    dpkg-deb -x "$deb" "$QEMU_DIR"
    dpkg-deb -x "$common" "$tmp/common"
    cp "$tmp"/common/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-*.so "$MOD_DIR"/
    if ldd "$QEMU_DIR/usr/bin/qemu-system-x86_64" "$MOD_DIR"/*.so | grep 'not found'; then
        die "qemu-system-x86_64 has unresolved libraries (listed above)"
    fi
    qemu_works "$QEMU_DIR/usr/bin/qemu-system-x86_64" "$MOD_DIR" ||
        die "extracted qemu-system-x86_64 cannot start a TCG machine"
    log "qemu-system-x86_64: extracted qemu-system-x86 $ver (+ accel-tcg modules of qemu-system-common) into $QEMU_DIR"
fi

# ---- 3. firmware search dir for -L -----------------------------------------------------------
share="$QEMU_DIR/share"
if [[ -e "$share/bios-256k.bin" && -e "$share/linuxboot_dma.bin" ]]; then
    log "firmware dir: $share present"
else
    [[ $CHECK_ONLY == 1 ]] && { log "firmware dir missing"; exit 1; }
    mkdir -p "$share"
    for d in /usr/share/qemu /usr/share/seabios; do
        [[ -d $d ]] || die "$d missing (packages qemu-system-data / seabios)"
        for f in "$d"/*; do
            name="$(basename "$f")"
            [[ -e "$share/$name" ]] || ln -s "$f" "$share/$name"
        done
    done
    [[ -e "$share/bios-256k.bin" ]] || die "no bios-256k.bin in /usr/share/seabios"
    log "firmware dir: created $share"
fi

# ---- 4. other tools ----------------------------------------------------------------------------
for tool in qemu-storage-daemon qemu-img qemu-nbd nbdkit cargo; do
    if command -v "$tool" >/dev/null 2>&1; then
        log "$tool: $(command -v "$tool")"
    else
        die "$tool not found on PATH (qemu-utils >= 10 / rustup must be preinstalled)"
    fi
done
log "done"
