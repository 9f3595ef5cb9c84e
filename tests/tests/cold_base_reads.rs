//! Cold random reads of a raw base through a real daemon: `snapblk serve` on a qcow2 overlay
//! whose raw base the host page cache does not hold. The reads go on the queue's io_uring
//! through the base's O_DIRECT description (ARCHITECTURE.md, "Copies per byte"): every block
//! comes back with the base's bytes, the blocks read once or twice are still not in the host
//! page cache afterwards (they bypassed it), and a block's third read goes through the page
//! cache, so a working set read over and over ends up in memory. An image's own data clusters
//! (a qcow2 image with every cluster allocated, read cold) are planned too, pinned against
//! reuse, and come back with the image's bytes.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use snapblk_tests::client::{Client, ClientConfig, Op};

const BASE_SIZE: u64 = 32 << 20;
const BLOCK: u64 = 4096;
const DEPTH: usize = 32;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The base's bytes: each 4 KiB block tagged with its number, the rest a cheap pattern.
fn base_bytes() -> Vec<u8> {
    let mut v: Vec<u8> = (0..BASE_SIZE).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    for (n, block) in v.chunks_mut(BLOCK as usize).enumerate() {
        block[..8].copy_from_slice(&(n as u64).to_le_bytes());
    }
    v
}

/// Drops `path`'s clean pages from the host page cache.
fn drop_from_page_cache(path: &Path) {
    let f = File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: posix_fadvise on an open descriptor, integer arguments.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
}

/// Reads every block of `blocks` (byte offsets) at queue depth [`DEPTH`], checking each
/// against `base`.
fn read_all(c: &Client, blocks: &[u64], base: &[u8]) {
    let mut q = c.queue(0).unwrap();
    let mut next = 0usize;
    let mut done = Vec::new();
    let mut checked = 0usize;
    let mut slot_of = vec![0u64; DEPTH];
    let mut free: Vec<usize> = (0..DEPTH).collect();
    while checked < blocks.len() {
        while next < blocks.len() {
            let Some(slot) = free.pop() else { break };
            slot_of[slot] = blocks[next];
            q.submit(
                Op::Read {
                    slot,
                    offset: blocks[next],
                    len: BLOCK as usize,
                },
                slot as u64,
            )
            .unwrap();
            next += 1;
        }
        done.clear();
        q.wait(1, &mut done).unwrap();
        for comp in &done {
            comp.result.as_ref().expect("read failed");
            let slot = comp.tag as usize;
            let off = slot_of[slot] as usize;
            assert!(
                q.slot(slot).unwrap()[..BLOCK as usize] == base[off..off + BLOCK as usize],
                "block at {off} differs from the base"
            );
            free.push(slot);
            checked += 1;
        }
    }
}

/// How many of `blocks` the host page cache holds.
fn held(base: &File, blocks: &[u64]) -> usize {
    blocks
        .iter()
        .filter(|&&b| blockdev::page_cache_holds(base, b, BLOCK) == Some(true))
        .count()
}

/// `qemu-img ARGS SRC DST` must succeed.
fn qemu_img(args: &[&str], src: &Path, dst: &Path) {
    let st = Command::new("qemu-img")
        .args(args)
        .arg(src)
        .arg(dst)
        .status()
        .expect("qemu-img");
    assert!(st.success());
}

/// `snapblk serve` of `image` with one queue (its output in `dir/daemon.log`), and a client
/// connected to it with [`DEPTH`] slots of a block.
fn serve(program: &Path, dir: &Path, image: &Path, socket: &Path) -> (Daemon, Client) {
    let log = File::create(dir.join("daemon.log")).unwrap();
    let d = Daemon(
        Command::new(program)
            .args([
                "serve",
                "--num-queues",
                "1",
                "--cache",
                "writeback",
                "--image",
            ])
            .arg(image)
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let mut cfg = ClientConfig::new(1);
    cfg.slots_per_queue = DEPTH;
    cfg.slot_size = BLOCK as usize;
    let c = Client::connect_retry(socket, &cfg, Duration::from_secs(15)).unwrap();
    (d, c)
}

/// 2048 distinct blocks of the disk in a scattered order (no two consecutive, no read-ahead
/// stream).
fn scattered_blocks() -> Vec<u64> {
    let n = BASE_SIZE / BLOCK;
    let blocks: Vec<u64> = (0..2048u64).map(|i| (i * 2654435761 % n) * BLOCK).collect();
    let mut distinct = blocks.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), blocks.len());
    blocks
}

/// What both tests start from: the daemon's binary, a directory, a raw file `raw_name` in it
/// holding [`base_bytes`] (returned too), and the socket's path; `None` (skip) without the
/// binary.
struct SetUp {
    program: PathBuf,
    dir: tempfile::TempDir,
    raw: PathBuf,
    socket: PathBuf,
    data: Vec<u8>,
}

fn set_up(raw_name: &str) -> Option<SetUp> {
    let Ok(program) = snapblk_tests::guest::snapblk_binary() else {
        snapblk_tests::client::daemon_missing("snapblk binary not available; skipping");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join(raw_name);
    let socket = dir.path().join("vhost.sock");
    let data = base_bytes();
    std::fs::write(&raw, &data).unwrap();
    Some(SetUp {
        program,
        dir,
        raw,
        socket,
        data,
    })
}

#[test]
fn cold_random_reads_of_an_image_s_own_clusters_return_its_bytes() {
    let Some(SetUp {
        program,
        dir,
        raw,
        socket,
        data,
    }) = set_up("data.raw")
    else {
        return;
    };
    let image = dir.path().join("image.qcow2");
    qemu_img(&["convert", "-q", "-O", "qcow2"], &raw, &image);
    drop_from_page_cache(&image);
    let (_d, c) = serve(&program, dir.path(), &image, &socket);
    let blocks = scattered_blocks();
    // Cold (direct), then from the host page cache or the folio cache.
    read_all(&c, &blocks, &data);
    read_all(&c, &blocks, &data);
}

#[test]
fn cold_random_reads_of_a_raw_base_bypass_the_page_cache_until_read_a_third_time() {
    let Some(SetUp {
        program,
        dir,
        raw: base_path,
        socket,
        data: base,
    }) = set_up("base.raw")
    else {
        return;
    };
    let overlay = dir.path().join("overlay.qcow2");
    qemu_img(
        &["create", "-q", "-f", "qcow2", "-F", "raw", "-b"],
        &base_path,
        &overlay,
    );
    drop_from_page_cache(&base_path);
    let base_file = File::open(&base_path).unwrap();
    assert_eq!(
        blockdev::page_cache_holds(&base_file, 0, BASE_SIZE),
        Some(false),
        "cachestat (Linux 6.5) is needed to tell which reads bypassed the page cache"
    );
    let (_d, c) = serve(&program, dir.path(), &overlay, &socket);
    let blocks = scattered_blocks();

    read_all(&c, &blocks, &base);
    // The queue runs its first reads through its thread (the folio cache fills from the
    // buffered description) until it sees they wait for the disk; the rest go direct.
    let after_one = held(&base_file, &blocks);
    assert!(
        after_one < blocks.len() / 4,
        "{after_one} of {} blocks read once are in the host page cache: the cold reads did \
         not bypass it",
        blocks.len()
    );
    // A second read of each block still goes direct (the folio cache may serve some).
    read_all(&c, &blocks, &base);
    let after_two = held(&base_file, &blocks);
    assert!(
        after_two < blocks.len() / 4,
        "{after_two} held after two reads"
    );
    // The third goes through the page cache (or is served from the folio cache, which the
    // queue fills once reads complete at once).
    read_all(&c, &blocks, &base);
    let after_three = held(&base_file, &blocks);
    assert!(
        after_three > blocks.len() / 2,
        "only {after_three} of {} blocks in the page cache after three reads",
        blocks.len()
    );
    read_all(&c, &blocks, &base);
}
