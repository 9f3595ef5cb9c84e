//! The io_uring read path ([`crate::uring`]) over real files and real rings: reads land in the
//! guest's buffers from the planned files, complete as they finish, and every failed or short
//! completion is executed again through the synchronous path, which reports its own result.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

use blockdev::{PlanSource, ReadPlan};

use super::*;

/// What [`PlannedDisk::plan_read`] answers for a range starting at a byte offset.
type PlanFn = dyn Fn(u64, u64) -> Option<ReadPlan> + Send + Sync;

/// A disk whose synchronous reads come from `sync` and whose read plans come from the test.
struct PlannedDisk {
    sync: MemDisk,
    plan: Box<PlanFn>,
    sync_reads: AtomicUsize,
    /// Synchronous reads fail with EIO.
    sync_fails: std::sync::atomic::AtomicBool,
}

impl BlockDev for PlannedDisk {
    fn size(&self) -> u64 {
        self.sync.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        self.sync_reads.fetch_add(1, Ordering::SeqCst);
        if self.sync_fails.load(Ordering::SeqCst) {
            return Err(blockdev::BlockError::Io(std::io::Error::from_raw_os_error(
                libc::EIO,
            )));
        }
        self.sync.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        self.sync.write_at(buf, offset)
    }
    fn flush(&self) -> blockdev::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.sync.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> blockdev::Result<()> {
        self.sync.write_zeroes(offset, len, unmap)
    }
    fn plan_read(&self, offset: u64, len: u64) -> Option<ReadPlan> {
        (self.plan)(offset, len)
    }
}

/// A temporary file holding `data`.
fn file_with(data: &[u8]) -> Arc<File> {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(data).unwrap();
    Arc::new(f)
}

/// The plan of a read of `[offset, offset + len)` from the same bytes of `file`.
fn file_plan(file: &Arc<File>, offset: u64, len: u64) -> Option<ReadPlan> {
    Some(ReadPlan::one(
        len,
        PlanSource::file(Arc::clone(file), offset),
    ))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
        .collect()
}

struct Rig {
    mem: Arc<GuestMemoryMmap>,
    disk: Arc<PlannedDisk>,
    runner: crate::inflight::QueueRunner<TestRing>,
}

impl Rig {
    /// A queue runner with the io_uring path over a disk whose synchronous content is `sync`
    /// (byte values) and whose plans `plan` gives.
    fn new(sync: u8, plan: Box<PlanFn>) -> Rig {
        Self::with_entries(sync, plan, None)
    }

    /// [`Self::new`] with a ring of `entries`.
    fn with_entries(sync: u8, plan: Box<PlanFn>, entries: Option<u32>) -> Rig {
        Self::build(sync, plan, entries, 8)
    }

    /// [`Self::with_entries`] with `--max-inflight max_inflight`.
    fn build(sync: u8, plan: Box<PlanFn>, entries: Option<u32>, max_inflight: usize) -> Rig {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let disk = Arc::new(PlannedDisk {
            sync: MemDisk::from_vec(vec![sync; DISK_SIZE]),
            plan,
            sync_reads: AtomicUsize::new(0),
            sync_fails: std::sync::atomic::AtomicBool::new(false),
        });
        let dev = BlkDevice::new(
            ServedDisk::plain(disk.clone()),
            Arc::new(DeviceConfig::new(DISK_SIZE as u64, 512, 1, QSIZE).unwrap()),
        );
        dev.set_acked_features(dev.config().features());
        let runner = crate::inflight::QueueRunner::new(Arc::new(dev), max_inflight, "uring-test");
        let entries = entries
            .unwrap_or_else(|| crate::uring::UringReads::<TestRing>::entries_for(max_inflight));
        let runner = runner.with_uring_entries(true, entries);
        Rig {
            mem: Arc::new(mem),
            disk,
            runner,
        }
    }

    /// Offers `chains` on a fresh ring and runs one pass of the queue thread over it.
    fn pass(&self, chains: &[Vec<(u64, u32, u16)>]) -> TestRing {
        let ring = TestRing::new(queue_with_chains(&self.mem, chains, 0));
        ring.pass(&self.runner, &mut RequestWorker::new(), &self.mem);
        ring
    }

    fn uring(&self) -> &crate::uring::UringReads<TestRing> {
        self.runner.uring().expect("io_uring is available here")
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn status(&self, i: u64) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS + i)).unwrap()
    }

    /// Request 0 (`len` bytes) was executed again through the synchronous path: its buffer
    /// holds the disk's synchronous bytes `sync`, its status is OK, and the disk has served
    /// `reads` synchronous reads so far.
    fn assert_read_again(&self, len: usize, sync: u8, reads: usize) {
        assert_eq!(
            self.guest(DATA, len),
            vec![sync; len],
            "the synchronous path's bytes"
        );
        assert_eq!(self.status(0), VIRTIO_BLK_S_OK);
        assert_eq!(self.disk.sync_reads.load(Ordering::SeqCst), reads);
    }
}

/// A read of `len` bytes at `sector` whose data is split over descriptors of `split` bytes
/// (the rest in a last one), header at `HDR + 64 * i`, data at `DATA + 0x10000 * i`.
fn read_chain(
    mem: &GuestMemoryMmap,
    i: u64,
    sector: u64,
    len: u32,
    split: &[u32],
) -> Vec<(u64, u32, u16)> {
    let hdr = RequestHeader {
        request_type: VIRTIO_BLK_T_IN,
        reserved: 0,
        sector,
    };
    mem.write_slice(&hdr.to_bytes(), GuestAddress(HDR + 64 * i))
        .unwrap();
    mem.write_slice(&vec![0xee; len as usize], GuestAddress(DATA + 0x10000 * i))
        .unwrap();
    let mut descs = vec![(HDR + 64 * i, 16, 0)];
    let mut at = 0u32;
    for &n in split
        .iter()
        .chain(std::iter::once(&(len - split.iter().sum::<u32>())))
    {
        descs.push((DATA + 0x10000 * i + u64::from(at), n, F_WRITE));
        at += n;
    }
    descs.push((STATUS + i, 1, F_WRITE));
    descs
}

/// A 4 KiB read at `sector` in two descriptors: the header, and one for the data (at
/// `DATA + 0x10000 * i`) followed by the status byte, so that eight fit the test queue.
fn compact_read_chain(mem: &GuestMemoryMmap, i: u64, sector: u64) -> Vec<(u64, u32, u16)> {
    let mut c = read_chain(mem, i, sector, 4096, &[]);
    c.truncate(1);
    c.push((DATA + 0x10000 * i, 4097, F_WRITE));
    c
}

#[test]
fn uring_read_goes_from_the_planned_file_into_the_guest_buffers_with_zero_pieces_filled() {
    let content = pattern(3, 8192);
    let file = file_with(&content);
    let plan_file = Arc::clone(&file);
    // 2 KiB from the file at byte 100, then 1 KiB of zeros, then 1 KiB from byte 5000: pieces
    // that do not line up with the guest's descriptors (3000 + 1096 bytes).
    let rig = Rig::new(
        0x55,
        Box::new(move |_, len| {
            assert_eq!(len, 4096);
            let f = |offset| PlanSource::file(Arc::clone(&plan_file), offset);
            Some(ReadPlan {
                pieces: vec![(2048, f(100)), (1024, PlanSource::Zero), (1024, f(5000))],
                holds: Vec::new(),
            })
        }),
    );
    rig.pass(&[read_chain(&rig.mem, 0, 0, 4096, &[3000])]);
    rig.runner.wait_idle();
    let mut want = content[100..2148].to_vec();
    want.extend_from_slice(&[0; 1024]);
    want.extend_from_slice(&content[5000..6024]);
    assert_eq!(rig.guest(DATA, 4096), want);
    assert_eq!(rig.status(0), VIRTIO_BLK_S_OK);
    assert_eq!(used_idx(&rig.mem), 1);
    assert_eq!(used_elem(&rig.mem, 0), (0, 4097));
    assert_eq!(
        rig.disk.sync_reads.load(Ordering::SeqCst),
        0,
        "not read through read_at"
    );
}

#[test]
fn uring_short_read_is_executed_again_through_the_synchronous_path() {
    // The planned file ends 1 KiB into the read: the ring returns 1024 of 4096 bytes.
    let file = file_with(&pattern(5, 1024));
    let rig = Rig::new(0x66, Box::new(move |_, len| file_plan(&file, 0, len)));
    rig.pass(&[read_chain(&rig.mem, 0, 8, 4096, &[])]);
    rig.runner.wait_idle();
    rig.assert_read_again(4096, 0x66, 1);
}

#[test]
fn uring_failed_read_reports_the_error_of_the_synchronous_path() {
    // A write-only descriptor: the ring's read fails (EBADF); the synchronous read, which the
    // request is executed again with, fails too (EIO).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wo");
    std::fs::write(&path, vec![1u8; 8192]).unwrap();
    let wo = Arc::new(std::fs::OpenOptions::new().write(true).open(&path).unwrap());
    let rig = Rig::new(0, Box::new(move |offset, len| file_plan(&wo, offset, len)));
    rig.disk.sync_fails.store(true, Ordering::SeqCst);
    assert!(rig.runner.uring().is_some());
    rig.pass(&[read_chain(&rig.mem, 0, 0, 4096, &[])]);
    rig.runner.wait_idle();
    assert_eq!(rig.status(0), VIRTIO_BLK_S_IOERR);
    assert_eq!(used_idx(&rig.mem), 1);
    assert_eq!(
        rig.disk.sync_reads.load(Ordering::SeqCst),
        1,
        "executed again once"
    );
}

#[test]
fn uring_reads_complete_as_they_finish_and_wait_idle_waits_for_the_last_one() {
    // Request 0 reads from a pipe, which answers only when the test writes to it; request 1
    // reads a regular file and must complete first. Stopping the queue then waits for 0.
    let (rx, tx) = std::io::pipe().unwrap();
    let pipe = Arc::new(File::from(std::os::fd::OwnedFd::from(rx)));
    let file = file_with(&pattern(9, 8192));
    let rig = Rig::new(
        0x77,
        Box::new(move |offset, len| {
            let file = if offset == 0 {
                Arc::clone(&pipe)
            } else {
                Arc::clone(&file)
            };
            Some(ReadPlan::one(len, PlanSource::file(file, 0)))
        }),
    );
    let chains = [
        read_chain(&rig.mem, 0, 0, 4096, &[]),
        read_chain(&rig.mem, 1, 8, 4096, &[]),
    ];
    // The pipe is written when the test says so, or when it fails (the sender is dropped), so
    // that a failure cannot leave the runner waiting for the pipe forever.
    let (go, went) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        let _ = went.recv();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut tx = tx;
        tx.write_all(&[0x42; 4096]).unwrap();
    });
    let _ring = rig.pass(&chains);
    wait_until("the file read completes", || {
        rig.uring().complete_ready();
        used_idx(&rig.mem) == 1
    });
    // Heads: request 0 is descriptors 0-2, request 1 starts at descriptor 3.
    assert_eq!(
        used_elem(&rig.mem, 0),
        (3, 4097),
        "the file read completes first"
    );
    assert_eq!(rig.uring().inflight(), 1);
    go.send(()).unwrap();
    let waited = std::time::Instant::now();
    rig.runner.wait_idle();
    assert!(waited.elapsed() >= std::time::Duration::from_millis(40));
    writer.join().unwrap();
    assert_eq!(used_idx(&rig.mem), 2);
    assert_eq!(used_elem(&rig.mem, 1), (0, 4097));
    assert_eq!(rig.guest(DATA, 4096), vec![0x42; 4096]);
    assert_eq!(rig.guest(DATA + 0x10000, 4096), pattern(9, 4096));
    assert_eq!(rig.disk.sync_reads.load(Ordering::SeqCst), 0);
}

#[test]
fn a_queue_whose_ring_cannot_be_created_serves_reads_on_the_executors() {
    let file = file_with(&pattern(1, 8192));
    let plans = Arc::new(Mutex::new(0usize));
    let counted = Arc::clone(&plans);
    // A ring of 0 entries: io_uring_setup refuses it, as an old kernel or a filter would.
    let rig = Rig::with_entries(
        0x33,
        Box::new(move |offset, len| {
            *counted.lock().unwrap() += 1;
            file_plan(&file, offset, len)
        }),
        Some(0),
    );
    assert!(rig.runner.uring().is_none());
    let chains: Vec<_> = (0..4)
        .map(|i| read_chain(&rig.mem, i, 8 * i, 4096, &[]))
        .collect();
    rig.pass(&chains);
    rig.runner.wait_idle();
    assert_eq!(used_idx(&rig.mem), 4);
    for i in 0..4 {
        assert_eq!(rig.status(i), VIRTIO_BLK_S_OK);
        assert_eq!(rig.guest(DATA + 0x10000 * i, 4096), vec![0x33; 4096]);
    }
    assert_eq!(rig.disk.sync_reads.load(Ordering::SeqCst), 4);
    assert_eq!(
        *plans.lock().unwrap(),
        0,
        "no plan asked for without a ring"
    );
}

#[test]
fn reads_the_host_page_cache_answers_at_submission_move_the_queue_to_the_folio_cache_path() {
    // The planned file is in the host page cache: the ring completes every read within the
    // submission, the queue learns that its reads are fast, and the next pass serves them on
    // the queue thread through the disk stack (whose folio cache then keeps them).
    let file = file_with(&pattern(2, 64 << 10));
    let rig = Rig::new(
        0x44,
        Box::new(move |offset, len| file_plan(&file, offset, len)),
    );
    let chains: Vec<_> = (0..8)
        .map(|i| compact_read_chain(&rig.mem, i, 8 * i))
        .collect();
    rig.pass(&chains);
    rig.runner.wait_idle();
    assert_eq!(
        rig.disk.sync_reads.load(Ordering::SeqCst),
        0,
        "first pass on the ring"
    );
    assert_eq!(
        rig.guest(DATA + 0x10000 * 3, 4096),
        pattern(2, 16384)[12288..]
    );
    // Eight hits weigh less than a slow read: a cold queue whose pass meets a few pages the
    // host page cache holds stays on the ring (the queue thread would otherwise stop for the
    // next miss).
    rig.pass(&chains);
    rig.runner.wait_idle();
    assert_eq!(
        rig.disk.sync_reads.load(Ordering::SeqCst),
        0,
        "second pass still on the ring after eight hits"
    );
    rig.pass(&chains);
    rig.runner.wait_idle();
    // (A request that happens to take longer than the slow threshold hands the rest of the
    // pass back to the ring, so only the first one is certain to run inline.)
    assert!(
        rig.disk.sync_reads.load(Ordering::SeqCst) >= 1,
        "third pass on the queue thread"
    );
    for i in 0..8 {
        assert_eq!(rig.guest(DATA + 0x10000 * i + 4096, 1), [VIRTIO_BLK_S_OK]);
    }
}

/// Whether `fd` becomes readable within `ms` milliseconds.
fn readable_within(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd that outlives the call.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

#[test]
fn a_read_a_pass_leaves_in_flight_wakes_the_queue_thread_when_it_completes() {
    // The pass ends with the read still in flight (a pipe nobody has written yet): the ring's
    // eventfd, which the queue thread sleeps on, must fire when the read completes and not
    // before, or the guest would wait for a completion nobody collects.
    let (rx, tx) = std::io::pipe().unwrap();
    let pipe = Arc::new(File::from(std::os::fd::OwnedFd::from(rx)));
    let rig = Rig::new(0x11, Box::new(move |_, len| file_plan(&pipe, 0, len)));
    let (go, went) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        let _ = went.recv();
        let mut tx = tx;
        tx.write_all(&[0x5a; 4096]).unwrap();
    });
    let _ring = rig.pass(&[read_chain(&rig.mem, 0, 0, 4096, &[])]);
    let fd = rig.uring().event_fd();
    assert_eq!(rig.uring().inflight(), 1);
    assert!(
        !readable_within(fd, 100),
        "the eventfd fired with nothing completed"
    );
    go.send(()).unwrap();
    assert!(
        readable_within(fd, 5000),
        "a completion did not wake the queue thread"
    );
    rig.uring().complete_ready();
    assert_eq!(used_idx(&rig.mem), 1);
    assert_eq!(rig.guest(DATA, 4096), vec![0x5a; 4096]);
    writer.join().unwrap();
}

#[test]
fn the_ring_holds_at_most_max_inflight_reads_and_the_rest_take_the_executors() {
    // Five reads of a pipe nobody has written yet, with `--max-inflight 3`: three wait on the
    // ring, the other two are executed on the executors (from the disk's synchronous bytes).
    let (rx, tx) = std::io::pipe().unwrap();
    let pipe = Arc::new(File::from(std::os::fd::OwnedFd::from(rx)));
    let rig = Rig::build(
        0x22,
        Box::new(move |_, len| file_plan(&pipe, 0, len)),
        None,
        3,
    );
    let (go, went) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        let _ = went.recv();
        let mut tx = tx;
        tx.write_all(&[0x5a; 3 * 4096]).unwrap();
    });
    let chains: Vec<_> = (0..5)
        .map(|i| read_chain(&rig.mem, i, 8 * i, 4096, &[]))
        .collect();
    let _ring = rig.pass(&chains);
    wait_until("the two reads beyond the bound complete", || {
        rig.disk.sync_reads.load(Ordering::SeqCst) == 2 && used_idx(&rig.mem) == 2
    });
    assert_eq!(rig.uring().inflight(), 3);
    go.send(()).unwrap();
    rig.runner.wait_idle();
    assert_eq!(used_idx(&rig.mem), 5);
    for i in 0..5 {
        assert_eq!(rig.status(i), VIRTIO_BLK_S_OK);
    }
    writer.join().unwrap();
}

#[test]
fn a_deep_pass_hands_its_first_reads_to_the_kernel_before_it_ends() {
    // A file the host page cache holds: a read the kernel receives completes within the
    // submission, straight into the guest buffer. While a pass puts `SUBMIT_EVERY` reads on
    // the ring, none reaches the kernel until the group is complete, and then all of them do,
    // before the pass ends.
    let file = file_with(&pattern(6, 64 << 10));
    let rig = Rig::build(
        0x55,
        Box::new(move |offset, len| file_plan(&file, offset, len)),
        None,
        64,
    );
    let n = crate::uring::SUBMIT_EVERY as u64;
    let data = |i: u64| DATA + 0x10000 * i;
    let chains: Vec<_> = (0..n)
        .map(|i| compact_read_chain(&rig.mem, i, 8 * i))
        .collect();
    let ring = TestRing::new(queue_with_chains(&rig.mem, &chains, 0));
    let mut worker = RequestWorker::new();
    // Popped up front: the queue's lock is not held while the test asserts (a failure would
    // poison it for the ring's completions at the end).
    let popped: Vec<_> = {
        let mut q = ring.queue.lock().unwrap();
        (0..n)
            .map(|_| q.pop_descriptor_chain(Arc::clone(&rig.mem)).unwrap())
            .collect()
    };
    let u = rig.uring();
    let expect = |i: u64| pattern(6, 4096 * (i as usize + 1))[4096 * i as usize..].to_vec();
    for (i, chain) in (0..n).zip(popped) {
        let submitted = u.try_submit(&mut worker, &ring, &rig.mem, chain);
        assert!(matches!(submitted, Ok(None)), "read {i} goes on the ring");
        if i + 1 < n {
            assert_eq!(rig.guest(data(0), 4096), vec![0xee; 4096], "after {i}");
        }
    }
    for i in 0..n {
        assert_eq!(rig.guest(data(i), 4096), expect(i), "read {i} is done");
    }
    let done = u.end_pass();
    assert_eq!(done.len(), n as usize, "all completed at their submission");
    for d in done {
        let (r, m, head, len) = u.finish(d);
        crate::inflight::UsedRing::complete(&r, &m, head, len);
    }
    assert_eq!(used_idx(&rig.mem), n as u16);
    for i in 0..n {
        assert_eq!(rig.guest(data(i) + 4096, 1), vec![VIRTIO_BLK_S_OK]);
    }
}

/// A queue over plans that name a buffered file holding pattern 7 (64 KiB) and offer an
/// O_DIRECT description claiming alignments `(block, mem)`, of another file holding pattern 9
/// (`direct_len` bytes, on the temporary directory's file system), so the guest's bytes tell
/// which one the ring read. `at` maps a request's byte offset to the planned file offset; the
/// disk's synchronous reads return `sync`.
fn direct_rig(
    sync: u8,
    direct_len: usize,
    (block, mem): (u64, usize),
    at: fn(u64) -> u64,
) -> (Rig, Arc<blockdev::DirectReads>, tempfile::TempDir) {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("direct");
    std::fs::write(&path, pattern(9, direct_len)).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("the temporary directory takes O_DIRECT");
    let direct = Arc::new(blockdev::DirectReads::with_alignment(f, block, mem));
    let buffered = file_with(&pattern(7, 64 << 10));
    let d = Arc::clone(&direct);
    let rig = Rig::new(
        sync,
        Box::new(move |offset, len| {
            Some(ReadPlan::one(
                len,
                PlanSource::File {
                    file: Arc::clone(&buffered),
                    offset: at(offset),
                    direct: Some(Arc::clone(&d)),
                },
            ))
        }),
    );
    (rig, direct, dir)
}

#[test]
fn a_plan_s_direct_description_is_read_where_the_guest_buffers_meet_its_alignment() {
    let (rig, direct, _dir) = direct_rig(0x11, 64 << 10, (4096, 4096), |o| o);
    // Request 0: 4 KiB at byte 8192 into one page-aligned buffer: direct. Request 1: the same
    // bytes in descriptors of 1000 and 3096 bytes (not multiples of the block): buffered.
    rig.pass(&[
        read_chain(&rig.mem, 0, 16, 4096, &[]),
        read_chain(&rig.mem, 1, 16, 4096, &[1000]),
    ]);
    rig.runner.wait_idle();
    assert_eq!(rig.guest(DATA, 4096), pattern(9, 12288)[8192..]);
    assert_eq!(rig.guest(DATA + 0x10000, 4096), pattern(7, 12288)[8192..]);
    assert_eq!(
        (rig.status(0), rig.status(1)),
        (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK)
    );
    assert_eq!(rig.disk.sync_reads.load(Ordering::SeqCst), 0);
    assert!(direct.usable());
}

#[test]
fn a_direct_read_the_kernel_refuses_is_executed_again_and_later_reads_go_buffered() {
    // The description claims byte alignment; the kernel refuses a read at byte 100 of an
    // O_DIRECT file (EINVAL). The request is executed again through the synchronous path, and
    // from then on reads of that file take the buffered description.
    let (rig, direct, _dir) = direct_rig(0x22, 64 << 10, (1, 1), |o| if o == 0 { 100 } else { o });
    rig.pass(&[read_chain(&rig.mem, 0, 0, 4096, &[])]);
    rig.runner.wait_idle();
    rig.assert_read_again(4096, 0x22, 1);
    assert!(!direct.usable(), "refused, still offered");
    rig.pass(&[read_chain(&rig.mem, 1, 16, 4096, &[])]);
    rig.runner.wait_idle();
    assert_eq!(
        rig.guest(DATA + 0x10000, 4096),
        pattern(7, 12288)[8192..],
        "read through the buffered description"
    );
    assert_eq!(rig.disk.sync_reads.load(Ordering::SeqCst), 1);
}

#[test]
fn a_short_direct_read_is_executed_again_through_the_synchronous_path() {
    // The O_DIRECT file ends 4 KiB before the buffered one: a direct read of its last 8 KiB
    // returns 4 KiB; the request is executed again and the description stays usable (a short
    // read is no refusal).
    let (rig, direct, _dir) = direct_rig(0x33, 60 << 10, (4096, 4096), |_| 56 << 10);
    rig.pass(&[read_chain(&rig.mem, 0, 0, 8192, &[])]);
    rig.runner.wait_idle();
    rig.assert_read_again(8192, 0x33, 1);
    assert!(direct.usable());
}
