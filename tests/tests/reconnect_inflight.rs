//! Requests in flight when the daemon dies are done exactly once by the next daemon.
//!
//! A minimal vhost-user frontend (the vhost crate's `Frontend`, rings laid out by hand in a
//! memfd "guest memory") does what QEMU does with `reconnect=1`: it negotiates
//! INFLIGHT_SHMFD, keeps the in-flight buffer and guest memory across connections, and after
//! the backend dies restores the ring base from the used index and hands the same buffer to the
//! next backend. The first `snapblk serve` aborts (SIGABRT: no unwinding, no flush, like
//! SIGKILL) through its test hook `SNAPBLK_TEST_ABORT_AT` while a request is at one stage:
//! `popped` (marked in flight, not executed), `executing` (its write is in the crash journal,
//! not yet below it), `executed` (disk operation done, not on the used ring) or `published`
//! (on the used ring, its in-flight mark not cleared). A second daemon on the same socket and
//! image must then complete every request exactly once: each head appears exactly once in the
//! used ring, with status OK, without the frontend kicking again, and after a clean stop every
//! write's data is in the image.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 8 << 20;
const QSIZE: u16 = 32;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x10000;
const STATUS: u64 = 0x20000;
const DATA: u64 = 0x100000;
const REQ_BYTES: usize = 16 << 10;
const NREQ: u16 = 8;
const DISK: u64 = 16 << 20;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// VIRTIO_BLK_F_FLUSH: the driver sends FLUSHes, so the device runs in write-back mode.
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Guest memory: a memfd mapped in this process.
struct GuestMem {
    file: File,
    ptr: *mut u8,
}

impl GuestMem {
    fn new() -> GuestMem {
        // SAFETY: valid name and flags.
        let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(MEM as u64).unwrap();
        // SAFETY: shared mapping of the whole (sized) file.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        GuestMem {
            file,
            ptr: ptr.cast(),
        }
    }
    fn write(&self, gpa: u64, b: &[u8]) {
        assert!(gpa as usize + b.len() <= MEM);
        // SAFETY: in bounds of the mapping; volatile enough for a test (the daemon reads after
        // the kick / the ring index store below).
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.add(gpa as usize), b.len()) };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let mut v = vec![0; len];
        // SAFETY: in bounds of the mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(gpa as usize), v.as_mut_ptr(), len) };
        v
    }
    fn u16_at(&self, gpa: u64) -> u16 {
        u16::from_le_bytes(self.read(gpa, 2).try_into().unwrap())
    }
    fn used_idx(&self) -> u16 {
        self.u16_at(USED + 2)
    }
}

/// Bytes of request `i`, `len` of them.
fn pattern(i: u16, len: usize) -> Vec<u8> {
    (0..len)
        .map(|b| (b as u8).wrapping_mul(31) ^ (i as u8).wrapping_add(1))
        .collect()
}

/// Where request `i` of `len` bytes writes: 32 KiB apart, or `len` apart if larger.
fn request_offset(i: u16, len: usize) -> u64 {
    u64::from(i) * len.max(32 << 10) as u64
}

/// Lays out `NREQ` write requests of `len` bytes (3 descriptors each) and publishes them in the
/// avail ring.
fn submit_requests(m: &GuestMem, len: usize) {
    for i in 0..NREQ {
        let head = 3 * i;
        let hdr = HDR + u64::from(i) * 64;
        let data = DATA + u64::from(i) * len as u64;
        let status = STATUS + u64::from(i);
        let mut h = Vec::new();
        h.extend_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&(request_offset(i, len) / 512).to_le_bytes()); // sector
        m.write(hdr, &h);
        m.write(data, &pattern(i, len));
        m.write(status, &[0xff]);
        let desc = |idx: u16, addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = Vec::new();
            d.extend_from_slice(&addr.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&next.to_le_bytes());
            m.write(DESC + u64::from(idx) * 16, &d);
        };
        desc(head, hdr, 16, 1, head + 1);
        desc(head + 1, data, len as u32, 1, head + 2);
        desc(head + 2, status, 1, 2, 0);
        m.write(AVAIL + 4 + u64::from(i) * 2, &head.to_le_bytes());
    }
    m.write(AVAIL + 2, &NREQ.to_le_bytes());
}

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_daemon(image: &Path, socket: &Path, log: &Path, abort_at: Option<&str>) -> Daemon {
    let bin = snapblk_tests::guest::snapblk_binary().expect("snapblk binary");
    let _ = std::fs::remove_file(socket);
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--image")
        .arg(image)
        .arg("--format")
        .arg("raw")
        .arg("--socket")
        .arg(socket)
        .args([
            "--num-queues",
            "1",
            "--queue-size",
            "32",
            "--cache",
            "writeback",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    if let Some(a) = abort_at {
        cmd.env("SNAPBLK_TEST_ABORT_AT", a);
    }
    let child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon {
        child,
        log: log.to_path_buf(),
    }
}

/// One frontend connection set up as QEMU does after (re)connecting; `inflight` is fetched
/// from the backend the first time and handed back on every later connection. With
/// `write_back` the driver acknowledges VIRTIO_BLK_F_FLUSH (else the device is write-through).
fn connect(
    socket: &Path,
    m: &GuestMem,
    inflight: &mut Option<(VhostUserInflight, File)>,
    base: u16,
    write_back: bool,
) -> (Frontend, EventFd, EventFd) {
    let mut fe = Frontend::connect(socket, 1).expect("connect");
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    assert_ne!(features & F_PROTOCOL_FEATURES, 0);
    let flush = if write_back { VIRTIO_BLK_F_FLUSH } else { 0 };
    fe.set_features(VIRTIO_F_VERSION_1 | F_PROTOCOL_FEATURES | flush)
        .unwrap();
    let pf = fe.get_protocol_features().unwrap();
    assert!(
        pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        "snapblk must offer INFLIGHT_SHMFD"
    );
    fe.set_protocol_features(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        .unwrap();
    if inflight.is_none() {
        let (desc, file) = fe
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE))
            .unwrap();
        *inflight = Some((desc, file));
    }
    let (desc, file) = inflight.as_ref().unwrap();
    fe.set_inflight_fd(desc, file.as_raw_fd()).unwrap();
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: m.ptr as u64,
        mmap_offset: 0,
        mmap_handle: m.file.as_raw_fd(),
    };
    fe.set_mem_table(&[region]).unwrap();
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_base(0, base).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: m.ptr as u64 + DESC,
            used_ring_addr: m.ptr as u64 + USED,
            avail_ring_addr: m.ptr as u64 + AVAIL,
            log_addr: None,
        },
    )
    .unwrap();
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    (fe, kick, call)
}

fn wait_exit(d: &mut Daemon, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = d.child.try_wait().unwrap() {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "daemon did not die at its abort point\n{}",
            std::fs::read_to_string(&d.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn die_at_and_recover(stage: &str, nth: usize) {
    die_at_and_recover_with(stage, nth, REQ_BYTES, false);
}

/// [`die_at_and_recover`] with requests of `len` bytes, in write-back mode if `write_back`.
fn die_at_and_recover_with(stage: &str, nth: usize, len: usize, write_back: bool) {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    File::create(&image).unwrap().set_len(DISK).unwrap();
    let socket = dir.path().join("vu.sock");
    let log = dir.path().join("daemon.log");
    let m = GuestMem::new();
    let mut inflight = None;

    let mut first = start_daemon(&image, &socket, &log, Some(&format!("{stage}:{nth}")));
    let (fe, kick, _call) = connect(&socket, &m, &mut inflight, 0, write_back);
    submit_requests(&m, len);
    kick.write(1).unwrap();
    let st = wait_exit(&mut first, Duration::from_secs(20));
    assert_eq!(
        st.signal(),
        Some(libc::SIGABRT),
        "the daemon must die at its abort point ({stage}:{nth}), not {st}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    drop(fe);
    let used_at_death = m.used_idx();
    assert!(
        used_at_death < NREQ,
        "{stage}:{nth}: everything completed before the abort"
    );

    // QEMU restores the ring base from the used index after losing the backend.
    let mut second = start_daemon(&image, &socket, &log, None);
    let (fe, _kick, _call) = connect(&socket, &m, &mut inflight, used_at_death, write_back);
    // No kick: the guest is waiting for completions and would not send one.
    let deadline = Instant::now() + Duration::from_secs(20);
    while m.used_idx() < NREQ {
        assert!(
            Instant::now() < deadline,
            "{stage}:{nth}: only {} of {NREQ} requests completed after the restart (used index {used_at_death} at death)\n{}",
            m.used_idx(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        m.used_idx(),
        NREQ,
        "{stage}:{nth}: a request completed twice"
    );
    let mut seen = vec![0u32; usize::from(NREQ)];
    for k in 0..NREQ {
        let id = u32::from_le_bytes(m.read(USED + 4 + u64::from(k) * 8, 4).try_into().unwrap());
        assert!(id % 3 == 0 && id / 3 < u32::from(NREQ), "bad used id {id}");
        seen[(id / 3) as usize] += 1;
    }
    assert!(
        seen.iter().all(|&n| n == 1),
        "{stage}:{nth}: each request must be on the used ring exactly once: {seen:?}"
    );
    for i in 0..NREQ {
        assert_eq!(
            m.read(STATUS + u64::from(i), 1),
            vec![0],
            "{stage}:{nth}: request {i} status"
        );
    }
    drop(fe);
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(
            libc::pid_t::try_from(second.child.id()).unwrap(),
            libc::SIGTERM,
        )
    };
    let st = wait_exit(&mut second, Duration::from_secs(20));
    assert!(st.success(), "second daemon: {st}");
    let img = File::open(&image).unwrap();
    for i in 0..NREQ {
        let mut b = vec![0; len];
        img.read_exact_at(&mut b, request_offset(i, len)).unwrap();
        assert!(
            b == pattern(i, len),
            "{stage}:{nth}: request {i}'s data is not in the image"
        );
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!(
        "{stage}:{nth}: used index {used_at_death} at death; {}",
        text.lines()
            .filter(|l| l.contains("resubmitting") || l.contains("replayed"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
}

#[test]
fn a_request_popped_but_not_executed_is_done_exactly_once_after_a_crash() {
    die_at_and_recover("popped", 3);
}

#[test]
fn a_write_in_the_journal_but_not_below_it_is_done_exactly_once_after_a_crash() {
    die_at_and_recover("executing", 4);
}

/// A 128 KiB write of a raw image in write-back mode is persisted in place (the crash journal
/// records a marker after it): the daemon dies with the fourth one in the file and no marker
/// yet.
#[test]
fn a_write_in_place_but_not_yet_marked_in_the_journal_is_done_exactly_once_after_a_crash() {
    die_at_and_recover_with("persisted", 4, 128 << 10, true);
}

#[test]
fn a_request_executed_but_not_on_the_used_ring_is_done_exactly_once_after_a_crash() {
    die_at_and_recover("executed", 2);
}

#[test]
fn a_request_on_the_used_ring_but_still_marked_in_flight_is_not_done_again() {
    die_at_and_recover("published", 5);
}
