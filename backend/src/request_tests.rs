//! Unit tests of request parsing and execution over a mock split virtqueue in real guest memory
//! (`GuestMemoryMmap`) and an in-memory disk.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use blockdev::{BlockDev, MemDisk};
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::device::DeviceConfig;
use crate::disk::ServedDisk;

const MEM_SIZE: usize = 16 << 20;
const DISK_SIZE: usize = 8 << 20;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x1f_f000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// A disk that counts flushes, over a `MemDisk`; with `gathers` it keeps a copy of its own of
/// every write's data (like the crash journal's record) and takes writes with
/// `write_gathered`, counted in `gathered`.
struct CountingDisk {
    inner: MemDisk,
    flushes: AtomicUsize,
    gathers: bool,
    gathered: AtomicUsize,
}

impl BlockDev for CountingDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn gathers_writes(&self) -> bool {
        self.gathers
    }
    fn write_gathered(
        &self,
        offset: u64,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> blockdev::Result<()>,
    ) -> blockdev::Result<()> {
        self.gathered.fetch_add(1, Ordering::SeqCst);
        let mut own = vec![0xee; len];
        fill(&mut own)?;
        self.inner.write_at(&own, offset)
    }
    fn flush(&self) -> blockdev::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> blockdev::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
}

struct Harness {
    mem: GuestMemoryMmap,
    disk: Arc<CountingDisk>,
    dev: BlkDevice,
    worker: RequestWorker,
}

impl Harness {
    fn with_config(f: impl FnOnce(&mut DeviceConfig)) -> Self {
        Self::build(f, false)
    }

    /// Over a disk that keeps its own copy of written data (see [`CountingDisk`]).
    fn gathering() -> Self {
        Self::build(|_| {}, true)
    }

    fn build(f: impl FnOnce(&mut DeviceConfig), gathers: bool) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        // Recognisable disk content: byte i holds (i / 512) as u8 ^ (i as u8).
        let content: Vec<u8> = (0..DISK_SIZE)
            .map(|i| ((i / 512) as u8) ^ (i as u8))
            .collect();
        let disk = Arc::new(CountingDisk {
            inner: MemDisk::from_vec(content),
            flushes: AtomicUsize::new(0),
            gathers,
            gathered: AtomicUsize::new(0),
        });
        let mut cfg = DeviceConfig::new(DISK_SIZE as u64, 512, 1, 16).unwrap();
        cfg.set_serial(b"snapblk-serial");
        f(&mut cfg);
        let dev = BlkDevice::new(ServedDisk::plain(disk.clone()), Arc::new(cfg));
        dev.set_acked_features(dev.config().features());
        Harness {
            mem,
            disk,
            dev,
            worker: RequestWorker::new(),
        }
    }

    fn new() -> Self {
        Self::with_config(|_| {})
    }

    fn header(&self, request_type: u32, sector: u64) {
        let h = RequestHeader {
            request_type,
            reserved: 0,
            sector,
        };
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(HDR))
            .unwrap();
    }

    /// Runs one chain made of `descs` (addr, len, flags; NEXT is set by the mock) and returns the
    /// used length and the status byte at `STATUS`.
    fn run(&mut self, descs: &[(u64, u32, u16)]) -> (u32, u8) {
        self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let mq = MockSplitQueue::new(&self.mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0)))
            .collect();
        let chain = mq.build_desc_chain(&raw).unwrap();
        let used = self.worker.process_chain(&self.dev, &self.mem, chain);
        (used, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn disk_bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        self.disk.inner.snapshot()[offset..offset + len].to_vec()
    }

    fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn segments(&self, segs: &[DiscardWriteZeroesSegment]) -> u32 {
        for (i, s) in segs.iter().enumerate() {
            self.mem
                .write_slice(&s.to_bytes(), GuestAddress(DATA + 16 * i as u64))
                .unwrap();
        }
        16 * segs.len() as u32
    }
}

fn status_desc() -> (u64, u32, u16) {
    (STATUS, 1, F_WRITE)
}

#[test]
fn read_copies_disk_bytes_into_guest_and_reports_data_plus_status_length() {
    let mut h = Harness::new();
    h.header(VIRTIO_BLK_T_IN, 3);
    let (used, status) = h.run(&[
        (HDR, 16, 0),
        (DATA, 1024, F_WRITE),
        (DATA + 4096, 512, F_WRITE),
        status_desc(),
    ]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(used, 1536 + 1);
    assert_eq!(h.guest_bytes(DATA, 1024), h.disk_bytes(3 * 512, 1024));
    assert_eq!(h.guest_bytes(DATA + 4096, 512), h.disk_bytes(5 * 512, 512));
}

#[test]
fn a_read_served_by_folio_cache_hits_lands_in_every_descriptor_and_a_bad_one_is_ioerr() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let content: Vec<u8> = (0..DISK_SIZE).map(|i| (i % 251) as u8).collect();
    let lower: Arc<dyn BlockDev> = Arc::new(MemDisk::from_vec(content.clone()));
    let cfg = cache::CacheConfig {
        folio_size: 4096,
        ..cache::CacheConfig::default()
    };
    let cache = cache::FolioCache::new(lower, cfg).unwrap();
    let dev_cfg = DeviceConfig::new(DISK_SIZE as u64, 512, 1, 16).unwrap();
    let dev = BlkDevice::new(
        ServedDisk::plain(cache.clone() as Arc<dyn BlockDev>),
        Arc::new(dev_cfg),
    );
    dev.set_acked_features(dev.config().features());
    let mut worker = RequestWorker::new();
    let mut run = |descs: &[(u64, u32, u16)]| {
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        mem.write_slice(&[0xaa; 8192], GuestAddress(DATA)).unwrap();
        let h = RequestHeader {
            request_type: VIRTIO_BLK_T_IN,
            reserved: 0,
            sector: 7,
        };
        mem.write_slice(&h.to_bytes(), GuestAddress(HDR)).unwrap();
        let mq = MockSplitQueue::new(&mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0)))
            .collect();
        let chain = mq.build_desc_chain(&raw).unwrap();
        let used = worker.process_chain(&dev, &mem, chain);
        (used, mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    };
    // 5 KiB from sector 7: three folios, split over three descriptors at other boundaries.
    let descs = [
        (HDR, 16, 0),
        (DATA, 1000, F_WRITE),
        (DATA + 1000, 3000, F_WRITE),
        (DATA + 4000, 1120, F_WRITE),
        status_desc(),
    ];
    for round in ["fills the folios", "is served from them"] {
        let (used, status) = run(&descs);
        assert_eq!((used, status), (5120 + 1, VIRTIO_BLK_S_OK), "{round}");
        let mut got = vec![0u8; 5120];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, content[3584..3584 + 5120], "the read that {round}");
    }
    assert!(cache.stats().read_hits >= 3, "{:?}", cache.stats());
    // A hit whose last descriptor runs past guest memory: IOERR, no panic.
    let (used, status) = run(&[
        (HDR, 16, 0),
        (DATA, 4096, F_WRITE),
        (MEM_SIZE as u64 - 512, 1024, F_WRITE),
        status_desc(),
    ]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    assert!(used >= 1);
}

#[test]
fn write_lands_on_disk_whatever_the_descriptor_framing() {
    framed_write_lands(&mut Harness::new());
}

/// A 1 KiB write at sector 8 whose header and first data bytes share a descriptor (the header
/// itself split in two) lands, and its neighbours are untouched.
fn framed_write_lands(h: &mut Harness) {
    h.header(VIRTIO_BLK_T_OUT, 8);
    h.mem
        .write_slice(&[0xab; 1024], GuestAddress(HDR + 16))
        .unwrap();
    let (used, status) = h.run(&[(HDR, 10, 0), (HDR + 10, 6 + 1024, 0), status_desc()]);
    assert_eq!((used, status), (1, VIRTIO_BLK_S_OK));
    assert_eq!(h.disk_bytes(8 * 512, 1024), vec![0xab; 1024]);
    // Neighbours untouched.
    assert_eq!(
        h.disk_bytes(7 * 512, 512),
        Harness::new().disk_bytes(7 * 512, 512)
    );
    assert_eq!(
        h.disk_bytes(10 * 512, 512),
        Harness::new().disk_bytes(10 * 512, 512)
    );
}

/// A disk that keeps its own copy of written data (the crash journal) gets the guest's pieces
/// gathered straight into it, one call per write, whatever the framing; writes larger than
/// the gather limit go through the request's buffer.
#[test]
fn writes_into_a_disk_with_a_copy_of_its_own_are_gathered_into_it_up_to_the_limit() {
    let mut h = Harness::gathering();
    framed_write_lands(&mut h);
    assert_eq!(h.disk.gathered.load(Ordering::SeqCst), 1);
    // The last, short piece of a write larger than the bounce chunk is gathered too.
    for (len, gathered) in [
        (WRITE_GATHER_MAX, 2),
        (WRITE_GATHER_MAX + 4096, 2),
        (CHUNK_BYTES + 8192, 3),
    ] {
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        h.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        h.header(VIRTIO_BLK_T_OUT, 64);
        let half = (len / 2) as u32;
        let (used, status) = h.run(&[
            (HDR, 16, 0),
            (DATA, half, 0),
            (DATA + u64::from(half), len as u32 - half, 0),
            status_desc(),
        ]);
        assert_eq!((used, status), (1, VIRTIO_BLK_S_OK));
        assert_eq!(h.disk_bytes(64 * 512, len), data, "len {len}");
        assert_eq!(
            h.disk.gathered.load(Ordering::SeqCst),
            gathered,
            "len {len}"
        );
    }
}

/// A guest buffer that cannot be read fails a gathered write before the disk took anything:
/// the disk's copy is filled first, and a failed fill writes nothing.
#[test]
fn a_gathered_write_with_data_outside_guest_memory_fails_without_touching_the_disk() {
    let mut h = Harness::gathering();
    let before = h.disk_bytes(0, DISK_SIZE);
    h.header(VIRTIO_BLK_T_OUT, 0);
    let (used, status) = h.run(&[
        (HDR, 16, 0),
        (DATA, 4096 - 512, 0),
        (MEM_SIZE as u64 - 256, 512, 0),
        status_desc(),
    ]);
    assert_eq!((used, status), (1, VIRTIO_BLK_S_IOERR));
    assert_eq!(h.disk.gathered.load(Ordering::SeqCst), 1);
    assert_eq!(h.disk_bytes(0, DISK_SIZE), before);
}

#[test]
fn zero_length_descriptors_are_ignored() {
    let mut h = Harness::new();
    h.header(VIRTIO_BLK_T_OUT, 0);
    h.mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
    let (used, status) = h.run(&[
        (HDR, 16, 0),
        (0, 0, 0),
        (DATA, 512, 0),
        (0, 0, F_WRITE),
        status_desc(),
    ]);
    assert_eq!((used, status), (1, VIRTIO_BLK_S_OK));
    assert_eq!(h.disk_bytes(0, 512), vec![0x11; 512]);
}

#[test]
fn request_larger_than_the_bounce_chunk_round_trips() {
    let mut h = Harness::new();
    let len = CHUNK_BYTES + 8192;
    let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    h.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    h.header(VIRTIO_BLK_T_OUT, 16);
    let half = (len / 2) as u32;
    let (used, status) = h.run(&[
        (HDR, 16, 0),
        (DATA, half, 0),
        (DATA + u64::from(half), half, 0),
        status_desc(),
    ]);
    assert_eq!((used, status), (1, VIRTIO_BLK_S_OK));
    assert_eq!(h.disk_bytes(16 * 512, len), pattern);

    h.mem
        .write_slice(&vec![0; len], GuestAddress(DATA))
        .unwrap();
    h.header(VIRTIO_BLK_T_IN, 16);
    let (used, status) = h.run(&[(HDR, 16, 0), (DATA, len as u32, F_WRITE), status_desc()]);
    assert_eq!((used, status), (len as u32 + 1, VIRTIO_BLK_S_OK));
    assert_eq!(h.guest_bytes(DATA, len), pattern);
    assert!(h.worker.buf.len() <= CHUNK_BYTES);
}

#[test]
fn write_with_data_outside_guest_memory_fails_without_touching_the_disk() {
    for len in [4096u32, (CHUNK_BYTES + 4096) as u32] {
        let mut h = Harness::new();
        let before = h.disk_bytes(0, DISK_SIZE);
        h.header(VIRTIO_BLK_T_OUT, 0);
        // The second data descriptor points past the end of guest RAM.
        let (used, status) = h.run(&[
            (HDR, 16, 0),
            (DATA, len - 512, 0),
            (MEM_SIZE as u64 - 256, 512, 0),
            status_desc(),
        ]);
        assert_eq!((used, status), (1, VIRTIO_BLK_S_IOERR));
        assert_eq!(h.disk_bytes(0, DISK_SIZE), before, "len {len}");
    }
}

#[test]
fn out_of_range_and_overflowing_sectors_are_ioerr() {
    let mut h = Harness::new();
    let last = (DISK_SIZE / 512) as u64;
    for (sector, len) in [
        (last, 512u32),
        (last - 1, 1024),
        (u64::MAX, 512),
        (u64::MAX / 512, 512),
    ] {
        h.header(VIRTIO_BLK_T_IN, sector);
        let (used, status) = h.run(&[(HDR, 16, 0), (DATA, len, F_WRITE), status_desc()]);
        assert_eq!((used, status), (1, VIRTIO_BLK_S_IOERR), "sector {sector}");
        h.header(VIRTIO_BLK_T_OUT, sector);
        let (used, status) = h.run(&[(HDR, 16, 0), (DATA, len, 0), status_desc()]);
        assert_eq!((used, status), (1, VIRTIO_BLK_S_IOERR), "sector {sector}");
    }
    // The very last block is fine.
    h.header(VIRTIO_BLK_T_IN, last - 1);
    let (_, status) = h.run(&[(HDR, 16, 0), (DATA, 512, F_WRITE), status_desc()]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
}

#[test]
fn requests_not_aligned_to_the_logical_block_are_ioerr() {
    let mut h = Harness::with_config(|c| {
        *c = DeviceConfig::new(DISK_SIZE as u64, 4096, 1, 16).unwrap();
    });
    let before = h.disk_bytes(0, 16384);
    for (sector, len) in [(1u64, 4096u32), (8, 512), (8, 4096 + 512)] {
        h.header(VIRTIO_BLK_T_OUT, sector);
        let (used, status) = h.run(&[(HDR, 16, 0), (DATA, len, 0), status_desc()]);
        assert_eq!(
            (used, status),
            (1, VIRTIO_BLK_S_IOERR),
            "sector {sector} len {len}"
        );
        h.header(VIRTIO_BLK_T_IN, sector);
        let (_, status) = h.run(&[(HDR, 16, 0), (DATA, len, F_WRITE), status_desc()]);
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
    }
    assert_eq!(h.disk_bytes(0, 16384), before);
    h.header(VIRTIO_BLK_T_OUT, 8);
    let (_, status) = h.run(&[(HDR, 16, 0), (DATA, 4096, 0), status_desc()]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
}

#[test]
fn unknown_and_unimplemented_request_types_are_unsupp() {
    let mut h = Harness::new();
    for t in [
        2u32,
        3,
        VIRTIO_BLK_T_GET_LIFETIME,
        VIRTIO_BLK_T_SECURE_ERASE,
        0xffff_ffff,
    ] {
        h.header(t, 0);
        let (used, status) = h.run(&[(HDR, 16, 0), (DATA, 512, F_WRITE), status_desc()]);
        assert_eq!((used, status), (1, VIRTIO_BLK_S_UNSUPP), "type {t}");
    }
}

#[test]
fn get_id_returns_the_zero_padded_serial() {
    let mut h = Harness::new();
    h.mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    h.header(VIRTIO_BLK_T_GET_ID, 0);
    let (used, status) = h.run(&[(HDR, 16, 0), (DATA, 20, F_WRITE), status_desc()]);
    assert_eq!((used, status), (21, VIRTIO_BLK_S_OK));
    let mut expected = b"snapblk-serial".to_vec();
    expected.resize(20, 0);
    assert_eq!(h.guest_bytes(DATA, 20), expected);
    // A shorter buffer gets a prefix, never more than it holds.
    h.mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    let (used, status) = h.run(&[(HDR, 16, 0), (DATA, 4, F_WRITE), status_desc()]);
    assert_eq!((used, status), (5, VIRTIO_BLK_S_OK));
    assert_eq!(h.guest_bytes(DATA, 5), b"snap\xff");
}

#[test]
fn flush_request_flushes_the_disk() {
    let mut h = Harness::new();
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    let (used, status) = h.run(&[(HDR, 16, 0), status_desc()]);
    assert_eq!((used, status), (1, VIRTIO_BLK_S_OK));
    assert_eq!(h.disk.flushes.load(Ordering::SeqCst), 1);
}

#[test]
fn write_through_mode_makes_each_write_durable_before_completion() {
    let mut h = Harness::with_config(|c| c.writeback_default = false);
    h.header(VIRTIO_BLK_T_OUT, 0);
    let (_, status) = h.run(&[(HDR, 16, 0), (DATA, 512, 0), status_desc()]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(h.disk.flushes.load(Ordering::SeqCst), 1);
    // Switching to write-back at run time stops the per-write flushes.
    h.dev.write_config(
        crate::virtio_blk::BlkConfigSpace::WRITEBACK_OFFSET as u32,
        &[1],
    );
    let (_, status) = h.run(&[(HDR, 16, 0), (DATA, 512, 0), status_desc()]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(h.disk.flushes.load(Ordering::SeqCst), 1);
    // Switching back flushes once, then every write flushes again.
    h.dev.write_config(
        crate::virtio_blk::BlkConfigSpace::WRITEBACK_OFFSET as u32,
        &[0],
    );
    assert_eq!(h.disk.flushes.load(Ordering::SeqCst), 2);
    let n = h.segments(&[DiscardWriteZeroesSegment {
        sector: 0,
        num_sectors: 1,
        flags: 0,
    }]);
    h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let (_, status) = h.run(&[(HDR, 16, 0), (DATA, n, 0), status_desc()]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(h.disk.flushes.load(Ordering::SeqCst), 3);
}

#[test]
fn read_only_device_refuses_every_write_type_request_with_ioerr() {
    let mut h = Harness::with_config(|c| c.read_only = true);
    // A driver that ignores RO and sends DISCARD/WRITE_ZEROES anyway.
    h.dev.set_acked_features(
        h.dev.config().features()
            | crate::virtio_blk::feature(VIRTIO_BLK_F_DISCARD)
            | crate::virtio_blk::feature(VIRTIO_BLK_F_WRITE_ZEROES),
    );
    let before = h.disk_bytes(0, DISK_SIZE);
    h.header(VIRTIO_BLK_T_OUT, 0);
    let (used, status) = h.run(&[(HDR, 16, 0), (DATA, 512, 0), status_desc()]);
    assert_eq!((used, status), (1, VIRTIO_BLK_S_IOERR));
    let n = h.segments(&[DiscardWriteZeroesSegment {
        sector: 0,
        num_sectors: 8,
        flags: 0,
    }]);
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        h.header(t, 0);
        let (_, status) = h.run(&[(HDR, 16, 0), (DATA, n, 0), status_desc()]);
        assert_eq!(status, VIRTIO_BLK_S_IOERR, "type {t}");
    }
    assert_eq!(h.disk_bytes(0, DISK_SIZE), before);
    // Reads and flushes still work.
    h.header(VIRTIO_BLK_T_IN, 0);
    let (_, status) = h.run(&[(HDR, 16, 0), (DATA, 512, F_WRITE), status_desc()]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    let (_, status) = h.run(&[(HDR, 16, 0), status_desc()]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
}

#[test]
fn discard_and_write_zeroes_zero_every_segment() {
    let mut h = Harness::new();
    let n = h.segments(&[
        DiscardWriteZeroesSegment {
            sector: 0,
            num_sectors: 2,
            flags: 0,
        },
        DiscardWriteZeroesSegment {
            sector: 10,
            num_sectors: 1,
            flags: 0,
        },
    ]);
    h.header(VIRTIO_BLK_T_DISCARD, 0);
    let (used, status) = h.run(&[(HDR, 16, 0), (DATA, n, 0), status_desc()]);
    assert_eq!((used, status), (1, VIRTIO_BLK_S_OK));
    assert_eq!(h.disk_bytes(0, 1024), vec![0; 1024]);
    assert_ne!(h.disk_bytes(1024, 512), vec![0; 512]);
    assert_eq!(h.disk_bytes(10 * 512, 512), vec![0; 512]);

    let n = h.segments(&[DiscardWriteZeroesSegment {
        sector: 100,
        num_sectors: 3,
        flags: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    }]);
    h.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let (_, status) = h.run(&[(HDR, 16, 0), (DATA, n, 0), status_desc()]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(h.disk_bytes(100 * 512, 1536), vec![0; 1536]);
    assert_ne!(h.disk_bytes(103 * 512, 512), vec![0; 512]);
}

#[test]
fn one_bad_segment_fails_the_request_before_any_segment_is_applied() {
    let mut h = Harness::new();
    let before = h.disk_bytes(0, DISK_SIZE);
    let last = (DISK_SIZE / 512) as u64;
    let cases: Vec<(u32, DiscardWriteZeroesSegment, u8)> = vec![
        // Past the end.
        (
            VIRTIO_BLK_T_DISCARD,
            DiscardWriteZeroesSegment {
                sector: last - 1,
                num_sectors: 2,
                flags: 0,
            },
            VIRTIO_BLK_S_IOERR,
        ),
        // Overflowing sector.
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            DiscardWriteZeroesSegment {
                sector: u64::MAX,
                num_sectors: 1,
                flags: 0,
            },
            VIRTIO_BLK_S_IOERR,
        ),
        // Larger than max_discard_sectors.
        (
            VIRTIO_BLK_T_DISCARD,
            DiscardWriteZeroesSegment {
                sector: 0,
                num_sectors: u32::MAX,
                flags: 0,
            },
            VIRTIO_BLK_S_IOERR,
        ),
        // Discard must not carry the unmap flag.
        (
            VIRTIO_BLK_T_DISCARD,
            DiscardWriteZeroesSegment {
                sector: 0,
                num_sectors: 1,
                flags: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            },
            VIRTIO_BLK_S_UNSUPP,
        ),
        // Reserved flag bits.
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            DiscardWriteZeroesSegment {
                sector: 0,
                num_sectors: 1,
                flags: 2,
            },
            VIRTIO_BLK_S_UNSUPP,
        ),
    ];
    for (t, bad, expected) in cases {
        let good = DiscardWriteZeroesSegment {
            sector: 0,
            num_sectors: 8,
            flags: 0,
        };
        let n = h.segments(&[good, bad]);
        h.header(t, 0);
        let (used, status) = h.run(&[(HDR, 16, 0), (DATA, n, 0), status_desc()]);
        assert_eq!((used, status), (1, expected), "{bad:?}");
        assert_eq!(h.disk_bytes(0, DISK_SIZE), before, "{bad:?}");
    }
}

#[test]
fn discard_segment_count_and_array_length_are_validated() {
    let mut h = Harness::new();
    let max = h.dev.config().max_discard_seg as usize;
    let seg = DiscardWriteZeroesSegment {
        sector: 0,
        num_sectors: 1,
        flags: 0,
    };
    let n = h.segments(&vec![seg; max + 1]);
    h.header(VIRTIO_BLK_T_DISCARD, 0);
    let (_, status) = h.run(&[(HDR, 16, 0), (DATA, n, 0), status_desc()]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    for len in [0u32, 8, 24] {
        let mut descs = vec![(HDR, 16, 0)];
        if len > 0 {
            descs.push((DATA, len, 0));
        }
        descs.push(status_desc());
        let (_, status) = h.run(&descs);
        assert_eq!(status, VIRTIO_BLK_S_IOERR, "array of {len} bytes");
    }
    let n = h.segments(&vec![seg; max]);
    let (_, status) = h.run(&[(HDR, 16, 0), (DATA, n, 0), status_desc()]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
}

#[test]
fn discard_must_respect_the_discard_alignment() {
    let mut h = Harness::with_config(|c| c.discard_sector_alignment = 8);
    let n = h.segments(&[DiscardWriteZeroesSegment {
        sector: 4,
        num_sectors: 8,
        flags: 0,
    }]);
    h.header(VIRTIO_BLK_T_DISCARD, 0);
    let (_, status) = h.run(&[(HDR, 16, 0), (DATA, n, 0), status_desc()]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    let n = h.segments(&[DiscardWriteZeroesSegment {
        sector: 8,
        num_sectors: 8,
        flags: 0,
    }]);
    let (_, status) = h.run(&[(HDR, 16, 0), (DATA, n, 0), status_desc()]);
    assert_eq!(status, VIRTIO_BLK_S_OK);
}

#[test]
fn discard_without_the_negotiated_feature_is_unsupp() {
    let mut h = Harness::new();
    h.dev
        .set_acked_features(h.dev.config().features() & !feature(VIRTIO_BLK_F_DISCARD));
    let n = h.segments(&[DiscardWriteZeroesSegment {
        sector: 0,
        num_sectors: 1,
        flags: 0,
    }]);
    h.header(VIRTIO_BLK_T_DISCARD, 0);
    let (_, status) = h.run(&[(HDR, 16, 0), (DATA, n, 0), status_desc()]);
    assert_eq!(status, VIRTIO_BLK_S_UNSUPP);
}

#[test]
fn malformed_chains_get_ioerr_when_a_status_byte_exists() {
    let mut h = Harness::new();
    let before = h.disk_bytes(0, DISK_SIZE);
    h.header(VIRTIO_BLK_T_OUT, 0);
    let cases: Vec<Vec<(u64, u32, u16)>> = vec![
        // Header too short.
        vec![(HDR, 8, 0), status_desc()],
        // No header at all.
        vec![status_desc()],
        // Driver-readable data after device-writable data.
        vec![
            (HDR, 16, 0),
            (DATA, 512, F_WRITE),
            (DATA + 4096, 512, 0),
            status_desc(),
        ],
        // OUT with device-writable data.
        vec![
            (HDR, 16, 0),
            (DATA, 512, 0),
            (DATA + 4096, 512, F_WRITE),
            status_desc(),
        ],
        // Header outside guest memory.
        vec![(MEM_SIZE as u64 + 4096, 16, 0), status_desc()],
    ];
    for descs in cases {
        let (used, status) = h.run(&descs);
        assert_eq!((used, status), (1, VIRTIO_BLK_S_IOERR), "{descs:?}");
    }
    h.header(VIRTIO_BLK_T_IN, 0);
    // IN with driver-readable data after the header.
    let (used, status) = h.run(&[(HDR, 16, 0), (DATA, 512, 0), status_desc()]);
    assert_eq!((used, status), (1, VIRTIO_BLK_S_IOERR));
    // FLUSH with data.
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    let (used, status) = h.run(&[(HDR, 16, 0), (DATA, 512, 0), status_desc()]);
    assert_eq!((used, status), (1, VIRTIO_BLK_S_IOERR));
    assert_eq!(h.disk_bytes(0, DISK_SIZE), before);
}

#[test]
fn chains_without_a_usable_status_byte_are_returned_with_zero_length() {
    let mut h = Harness::new();
    let before = h.disk_bytes(0, DISK_SIZE);
    h.header(VIRTIO_BLK_T_OUT, 0);
    // All driver-readable: nowhere to put the status.
    let (used, status) = h.run(&[(HDR, 16, 0), (DATA, 512, 0)]);
    assert_eq!((used, status), (0, 0xee));
    // Status descriptor outside guest memory.
    let (used, status) = h.run(&[(HDR, 16, 0), (DATA, 512, 0), (MEM_SIZE as u64, 1, F_WRITE)]);
    // The request was valid and executed, but the status could not be reported.
    assert_eq!(used, 0);
    assert_eq!(status, 0xee);
    assert_eq!(h.disk_bytes(0, 512), h.guest_bytes(DATA, 512));
    // Status descriptor whose end overflows the address space.
    let (used, _) = h.run(&[(HDR, 16, 0), (u64::MAX, 2, F_WRITE)]);
    assert_eq!(used, 0);
    // IN whose data descriptor lies outside guest memory: IOERR, nothing counted as written.
    h.header(VIRTIO_BLK_T_IN, 0);
    let (used, status) = h.run(&[
        (HDR, 16, 0),
        (MEM_SIZE as u64 - 512, 1024, F_WRITE),
        status_desc(),
    ]);
    assert_eq!((used, status), (1, VIRTIO_BLK_S_IOERR));
    assert_eq!(h.disk_bytes(512, DISK_SIZE - 512), before[512..].to_vec());
}

#[test]
fn indirect_descriptor_tables_are_followed() {
    let mut h = Harness::new();
    let table = 0x30_0000u64;
    let entries = [
        SplitDescriptor::new(HDR, 16, F_NEXT, 1),
        SplitDescriptor::new(DATA, 512, F_NEXT | F_WRITE, 2),
        SplitDescriptor::new(STATUS, 1, F_WRITE, 0),
    ];
    for (i, d) in entries.iter().enumerate() {
        h.mem
            .write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    h.header(VIRTIO_BLK_T_IN, 1);
    let (used, status) = h.run(&[(table, 48, F_INDIRECT)]);
    assert_eq!((used, status), (513, VIRTIO_BLK_S_OK));
    assert_eq!(h.guest_bytes(DATA, 512), h.disk_bytes(512, 512));
}

const QSIZE: u16 = 16;
const DESC_TABLE: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

/// A ready split queue of size 16 whose descriptor table holds `list` back to back (with NEXT
/// links) and whose avail ring offers every chain, with `used_event` as the driver's event index.
fn queue_with_chains(
    mem: &GuestMemoryMmap,
    list: &[Vec<(u64, u32, u16)>],
    used_event: u16,
) -> Queue {
    let mut idx = 0u16;
    let mut heads = Vec::new();
    for chain in list {
        heads.push(idx);
        for (i, &(a, l, f)) in chain.iter().enumerate() {
            let (flags, next) = if i + 1 < chain.len() {
                (f | F_NEXT, idx + 1)
            } else {
                (f, 0)
            };
            let d = RawDescriptor::from(SplitDescriptor::new(a, l, flags, next));
            mem.write_obj(d, GuestAddress(DESC_TABLE + 16 * u64::from(idx)))
                .unwrap();
            idx += 1;
        }
    }
    for (i, head) in heads.iter().enumerate() {
        mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * i as u64))
            .unwrap();
    }
    mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
    mem.write_obj((heads.len() as u16).to_le(), GuestAddress(AVAIL + 2))
        .unwrap();
    mem.write_obj(
        used_event.to_le(),
        GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE)),
    )
    .unwrap();
    ready_queue(AVAIL)
}

/// A ready split queue of size 16 with the test's descriptor table and used ring and its avail
/// ring at `avail`.
fn ready_queue(avail: u64) -> Queue {
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .unwrap();
    q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    q.set_ready(true);
    q
}

fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).unwrap()
}

fn used_elem(mem: &GuestMemoryMmap, i: u64) -> (u32, u32) {
    let e: VirtqUsedElem = mem.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap();
    (e.id(), e.len())
}

#[test]
fn every_chain_goes_back_to_the_used_ring_even_when_malformed() {
    let mut h = Harness::new();
    // Chain 1: a good read. Chain 2: only driver-readable (no status). Chain 3: unknown type.
    h.header(VIRTIO_BLK_T_IN, 0);
    let bad_hdr = RequestHeader {
        request_type: 77,
        reserved: 0,
        sector: 0,
    };
    h.mem
        .write_slice(&bad_hdr.to_bytes(), GuestAddress(HDR + 64))
        .unwrap();
    let list = [
        vec![(HDR, 16, 0), (DATA, 512, F_WRITE), (STATUS, 1, F_WRITE)],
        vec![(HDR, 16, 0), (DATA + 4096, 512, 0)],
        vec![(HDR + 64, 16, 0), (STATUS + 8, 1, F_WRITE)],
    ];
    let mut q = queue_with_chains(&h.mem, &list, 0);
    let notify = process_queue(&h.dev, &mut h.worker, &mut q, &h.mem).unwrap();
    assert!(notify);
    assert_eq!(used_idx(&h.mem), 3);
    assert_eq!(used_elem(&h.mem, 0), (0, 513));
    assert_eq!(used_elem(&h.mem, 1), (3, 0));
    assert_eq!(used_elem(&h.mem, 2), (5, 1));
    assert_eq!(
        h.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        h.mem.read_obj::<u8>(GuestAddress(STATUS + 8)).unwrap(),
        VIRTIO_BLK_S_UNSUPP
    );
    // Nothing left: a second pass completes nothing and asks for no notification.
    assert!(!process_queue(&h.dev, &mut h.worker, &mut q, &h.mem).unwrap());
}

#[test]
fn event_idx_pass_completes_everything_and_notifies_only_when_the_driver_asked() {
    for (used_event, expect_notify) in [(0u16, true), (3, true), (4, false), (100, false)] {
        let mut h = Harness::new();
        h.header(VIRTIO_BLK_T_IN, 0);
        let list: Vec<Vec<(u64, u32, u16)>> = (0..4)
            .map(|i| {
                vec![
                    (HDR, 16, 0),
                    (DATA + 4096 * i, 512, F_WRITE),
                    (STATUS + i, 1, F_WRITE),
                ]
            })
            .collect();
        let mut q = queue_with_chains(&h.mem, &list, used_event);
        q.set_event_idx(true);
        let notify = process_queue(&h.dev, &mut h.worker, &mut q, &h.mem).unwrap();
        assert_eq!(notify, expect_notify, "used_event {used_event}");
        assert_eq!(used_idx(&h.mem), 4);
        for i in 0..4 {
            assert_eq!(h.guest_bytes(DATA + 4096 * i, 512), h.disk_bytes(0, 512));
        }
        // avail_event was advanced so the driver knows when to kick next.
        let avail_event = GuestAddress(USED + 4 + 8 * u64::from(QSIZE));
        assert_eq!(h.mem.read_obj::<u16>(avail_event).unwrap(), 4);
    }
}

#[test]
fn garbage_avail_ring_entries_do_not_panic_or_hang() {
    let mut h = Harness::new();
    let mut q = queue_with_chains(&h.mem, &[], 0);
    // The driver claims 5 new entries whose heads are out of range or loop onto themselves.
    for (i, head) in [200u16, 15, 0xffff, 15, 3].iter().enumerate() {
        h.mem
            .write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * i as u64))
            .unwrap();
    }
    // Descriptor 15 points to itself with NEXT set; descriptor 3 is an indirect table of size 0.
    let looping = RawDescriptor::from(SplitDescriptor::new(HDR, 16, F_NEXT, 15));
    h.mem
        .write_obj(looping, GuestAddress(DESC_TABLE + 16 * 15))
        .unwrap();
    let bad_indirect = RawDescriptor::from(SplitDescriptor::new(0x30_0000, 0, F_INDIRECT, 0));
    h.mem
        .write_obj(bad_indirect, GuestAddress(DESC_TABLE + 16 * 3))
        .unwrap();
    h.mem
        .write_obj(5u16.to_le(), GuestAddress(AVAIL + 2))
        .unwrap();
    process_queue(&h.dev, &mut h.worker, &mut q, &h.mem).unwrap();
    // Out-of-range heads cannot go to the used ring; the others do, with length 0.
    assert_eq!(used_idx(&h.mem), 3);
    // An avail index far ahead of what the ring can hold is refused without processing.
    h.mem
        .write_obj(1000u16.to_le(), GuestAddress(AVAIL + 2))
        .unwrap();
    assert!(process_queue(&h.dev, &mut h.worker, &mut q, &h.mem).is_err());
    assert_eq!(used_idx(&h.mem), 3);
}

#[test]
fn corrupt_avail_index_with_event_idx_fails_the_pass_instead_of_spinning() {
    // With EVENT_IDX, `enable_notification` reports "more work" whenever the driver's avail
    // index differs from ours; a corrupt index that can never be popped used to make the queue
    // thread loop (and log) forever. The pass must end with an error instead.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut h = Harness::new();
        let mut q = queue_with_chains(&h.mem, &[], 0);
        q.set_event_idx(true);
        h.mem
            .write_obj(1000u16.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
        let r = process_queue(&h.dev, &mut h.worker, &mut q, &h.mem);
        let _ = tx.send(r.is_err());
    });
    let failed = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("process_queue spun on a corrupt avail index");
    assert!(failed, "a corrupt avail index must fail the pass");
}

#[test]
fn random_hostile_chains_never_panic_and_always_return_to_the_used_ring() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut h = Harness::new();
    let types = [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        VIRTIO_BLK_T_SECURE_ERASE,
        0xdead_beef,
    ];
    let mut expected_used = 0u16;
    for _ in 0..400 {
        // Random header and random discard segments in guest memory.
        let t = types[rng.random_range(0..types.len())];
        let sector = match rng.random_range(0..4) {
            0 => rng.random_range(0..(DISK_SIZE as u64 / 512)),
            1 => rng.random(),
            2 => (DISK_SIZE as u64 / 512) - rng.random_range(0..4),
            _ => u64::MAX - rng.random_range(0..4),
        };
        h.header(t, sector);
        for i in 0..4u64 {
            let seg = DiscardWriteZeroesSegment {
                sector: rng.random_range(0..(DISK_SIZE as u64 / 256)),
                num_sectors: if rng.random() {
                    rng.random_range(0..64)
                } else {
                    rng.random()
                },
                flags: rng.random_range(0..3),
            };
            h.mem
                .write_slice(&seg.to_bytes(), GuestAddress(DATA + 16 * i))
                .unwrap();
        }
        let mut list = Vec::new();
        let mut total = 0;
        while total < QSIZE as usize - 6 && list.len() < 3 {
            let n = rng.random_range(1..=6usize);
            let chain: Vec<(u64, u32, u16)> = (0..n)
                .map(|_| {
                    let addr = match rng.random_range(0..6) {
                        0 => HDR,
                        1 => DATA + 512 * rng.random_range(0..8),
                        2 => STATUS,
                        3 => MEM_SIZE as u64 - rng.random_range(0..64),
                        4 => u64::MAX - rng.random_range(0..64),
                        _ => rng.random_range(0..MEM_SIZE as u64),
                    };
                    let len = match rng.random_range(0..6) {
                        0 => 0,
                        1 => 1,
                        2 => 16,
                        3 => 512 * rng.random_range(1..16),
                        4 => u32::MAX - rng.random_range(0..16),
                        _ => rng.random_range(0..70_000),
                    };
                    let flags = match rng.random_range(0..10) {
                        0 => F_INDIRECT,
                        1..=4 => F_WRITE,
                        _ => 0,
                    };
                    (addr, len, flags)
                })
                .collect();
            total += chain.len();
            list.push(chain);
        }
        let mut q = queue_with_chains(&h.mem, &list, rng.random());
        // Continue from where the previous pass left the used ring.
        q.set_next_used(expected_used);
        q.set_event_idx(rng.random());
        process_queue(&h.dev, &mut h.worker, &mut q, &h.mem).unwrap();
        expected_used = expected_used.wrapping_add(list.len() as u16);
        assert_eq!(used_idx(&h.mem), expected_used);
        // Reset the avail ring for the next round.
        h.mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    }
}

/// The used ring of a test queue shared by the "queue thread" and the executors, like a vring.
#[derive(Clone)]
struct TestRing {
    queue: Arc<std::sync::Mutex<Queue>>,
    notifications: Arc<AtomicUsize>,
}

impl TestRing {
    fn new(q: Queue) -> Self {
        TestRing {
            queue: Arc::new(std::sync::Mutex::new(q)),
            notifications: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// One processing pass as the queue thread runs it.
    fn pass(
        &self,
        runner: &crate::inflight::QueueRunner<TestRing>,
        worker: &mut RequestWorker,
        mem: &Arc<GuestMemoryMmap>,
    ) {
        let mut q = self.queue.lock().unwrap();
        let notifications = Arc::clone(&self.notifications);
        let mut signal = || {
            notifications.fetch_add(1, Ordering::SeqCst);
            true
        };
        if crate::inflight::submit_queue(runner, worker, self, &mut q, mem, &mut signal).unwrap() {
            self.notifications.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl crate::inflight::UsedRing for TestRing {
    fn complete(&self, mem: &GuestMemoryMmap, head: u16, len: u32) {
        let mut q = self.queue.lock().unwrap();
        if crate::inflight::add_used_and_check(&mut q, mem, head, len) {
            self.notifications.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A disk over a `MemDisk` whose reads and writes can be held at a gate, and that records how
/// many operations ran at once.
struct GateDisk {
    inner: CountingDisk,
    /// Operations at this byte offset wait while the gate is closed (u64::MAX: every offset).
    gated_offset: u64,
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    running: AtomicUsize,
    max_running: AtomicUsize,
    /// Operations at this byte offset take this long (a request that waits for the disk).
    delay: Option<(u64, std::time::Duration)>,
    /// Threads that executed an operation.
    threads: std::sync::Mutex<Vec<std::thread::ThreadId>>,
    /// Operations at this byte offset fail with EIO.
    fail_at: Option<u64>,
    /// Each flush takes this long, and the threads that ran one.
    flush_delay: Option<std::time::Duration>,
    flush_threads: std::sync::Mutex<Vec<std::thread::ThreadId>>,
}

impl GateDisk {
    fn new(gated_offset: u64) -> Self {
        GateDisk {
            inner: CountingDisk {
                inner: MemDisk::new(DISK_SIZE),
                flushes: AtomicUsize::new(0),
                gathers: false,
                gathered: AtomicUsize::new(0),
            },
            gated_offset,
            open: std::sync::Mutex::new(false),
            opened: std::sync::Condvar::new(),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
            delay: None,
            threads: std::sync::Mutex::new(Vec::new()),
            fail_at: None,
            flush_delay: None,
            flush_threads: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn enter(&self, offset: u64) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        self.threads
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        if let Some((at, d)) = self.delay {
            if at == offset {
                std::thread::sleep(d);
            }
        }
        if self.gated_offset == u64::MAX || self.gated_offset == offset {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }
    }

    fn leave(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
    }

    fn open_gate(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl BlockDev for GateDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        self.enter(offset);
        let r = if self.fail_at == Some(offset) {
            Err(std::io::Error::from_raw_os_error(libc::EIO).into())
        } else {
            self.inner.read_at(buf, offset)
        };
        self.leave();
        r
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        self.enter(offset);
        let r = if self.fail_at == Some(offset) {
            Err(std::io::Error::from_raw_os_error(libc::EIO).into())
        } else {
            self.inner.write_at(buf, offset)
        };
        self.leave();
        r
    }
    fn flush(&self) -> blockdev::Result<()> {
        self.flush_threads
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        if let Some(d) = self.flush_delay {
            std::thread::sleep(d);
        }
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> blockdev::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
}

fn gated_device(disk: Arc<GateDisk>) -> Arc<BlkDevice> {
    let dev = BlkDevice::new(
        ServedDisk::plain(disk),
        Arc::new(DeviceConfig::new(DISK_SIZE as u64, 512, 1, QSIZE).unwrap()),
    );
    dev.set_acked_features(dev.config().features());
    Arc::new(dev)
}

/// `n` chains: chain i reads (or writes) 4 KiB at byte 4096 * i, status at STATUS + i.
fn io_chains(mem: &GuestMemoryMmap, n: u64, request_type: u32) -> Vec<Vec<(u64, u32, u16)>> {
    (0..n)
        .map(|i| {
            let hdr = RequestHeader {
                request_type,
                reserved: 0,
                sector: 8 * i,
            };
            mem.write_slice(&hdr.to_bytes(), GuestAddress(HDR + 64 * i))
                .unwrap();
            let data_flags = if request_type == VIRTIO_BLK_T_IN {
                F_WRITE
            } else {
                mem.write_slice(&[i as u8 + 1; 4096], GuestAddress(DATA + 4096 * i))
                    .unwrap();
                0
            };
            vec![
                (HDR + 64 * i, 16, 0),
                (DATA + 4096 * i, 4096, data_flags),
                (STATUS + i, 1, F_WRITE),
            ]
        })
        .collect()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Guest memory, a runner of `max_inflight` over `disk`, and a ring offering `n` 4 KiB requests
/// of `request_type` (see `io_chains`), after one processing pass of the queue thread.
fn runner_after_one_pass(
    disk: &Arc<GateDisk>,
    max_inflight: usize,
    n: u64,
    request_type: u32,
) -> (
    Arc<GuestMemoryMmap>,
    crate::inflight::QueueRunner<TestRing>,
    TestRing,
) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let runner =
        crate::inflight::QueueRunner::new(gated_device(disk.clone()), max_inflight, "test");
    let ring = TestRing::new(queue_with_chains(
        &mem,
        &io_chains(&mem, n, request_type),
        0,
    ));
    let mem = Arc::new(mem);
    ring.pass(&runner, &mut RequestWorker::new(), &mem);
    (mem, runner, ring)
}

#[test]
fn runner_completes_each_request_as_it_finishes_not_behind_a_slow_one() {
    // The first request (byte 0) is held at the disk; the other four must complete meanwhile.
    let disk = Arc::new(GateDisk::new(0));
    let (mem, runner, ring) = runner_after_one_pass(&disk, 8, 5, VIRTIO_BLK_T_OUT);
    wait_until("four fast writes on the used ring", || used_idx(&mem) == 4);
    let done: Vec<u32> = (0..4).map(|i| used_elem(&mem, i).0).collect();
    assert!(!done.contains(&0), "the held request completed: {done:?}");
    assert_eq!(runner.inflight(), 1);
    assert!(ring.notifications.load(Ordering::SeqCst) > 0);
    disk.open_gate();
    runner.wait_idle();
    assert_eq!(used_idx(&mem), 5);
    assert_eq!(used_elem(&mem, 4), (0, 1));
    for i in 0..5u64 {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(
            disk.inner.inner.snapshot()[4096 * i as usize..4096 * (i as usize + 1)],
            vec![i as u8 + 1; 4096]
        );
    }
}

#[test]
fn runner_keeps_exactly_the_bound_of_requests_in_flight_at_the_disk() {
    let disk = Arc::new(GateDisk::new(u64::MAX));
    // The queue thread returns at once: it never waits for a request.
    let (mem, runner, _ring) = runner_after_one_pass(&disk, 3, 5, VIRTIO_BLK_T_IN);
    assert_eq!(runner.inflight(), 5);
    wait_until("three reads at the disk", || {
        disk.running.load(Ordering::SeqCst) == 3
    });
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(disk.max_running.load(Ordering::SeqCst), 3);
    assert_eq!(runner.threads(), 3);
    assert_eq!(used_idx(&mem), 0);
    disk.open_gate();
    runner.wait_idle();
    assert_eq!(used_idx(&mem), 5);
    for i in 0..5u64 {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }
    assert_eq!(runner.threads(), 3);
}

#[test]
fn runner_runs_a_lone_request_inline_and_a_batch_on_executors() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let disk = Arc::new(GateDisk::new(u64::MAX));
    disk.open_gate();
    let dev = gated_device(disk.clone());
    let runner = crate::inflight::QueueRunner::new(dev, 4, "test");
    let mut list = io_chains(&mem, 1, VIRTIO_BLK_T_OUT);
    let ring = TestRing::new(queue_with_chains(&mem, &list, 0));
    let mem = Arc::new(mem);
    let mut worker = RequestWorker::new();
    ring.pass(&runner, &mut worker, &mem);
    // Nothing was in flight: the queue thread ran the write itself, no executor was started.
    assert_eq!(runner.threads(), 0);
    assert_eq!(used_idx(&mem), 1);
    assert_eq!(ring.notifications.load(Ordering::SeqCst), 1);
    // Four writes and a flush in one pass, on executors.
    list = io_chains(&mem, 4, VIRTIO_BLK_T_OUT);
    let flush = RequestHeader {
        request_type: VIRTIO_BLK_T_FLUSH,
        reserved: 0,
        sector: 0,
    };
    mem.write_slice(&flush.to_bytes(), GuestAddress(HDR + 64 * 8))
        .unwrap();
    list.push(vec![(HDR + 64 * 8, 16, 0), (STATUS + 8, 1, F_WRITE)]);
    let mut q = queue_with_chains(&mem, &list, 0);
    q.set_next_used(1);
    *ring.queue.lock().unwrap() = q;
    ring.pass(&runner, &mut worker, &mem);
    runner.wait_idle();
    assert_eq!(used_idx(&mem), 6);
    assert!(runner.threads() >= 1 && runner.threads() <= 4);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS + 8)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(disk.inner.flushes.load(Ordering::SeqCst), 1);
    drop(runner);
}

#[test]
fn runner_runs_fast_requests_on_the_queue_thread_and_hands_off_after_a_slow_one() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut disk = GateDisk::new(u64::MAX);
    disk.open_gate();
    // The second request of the second pass (byte 4096) takes far longer than the threshold.
    disk.delay = Some((4096, std::time::Duration::from_millis(300)));
    let disk = Arc::new(disk);
    let dev = gated_device(disk.clone());
    let slow = std::time::Duration::from_millis(60);
    let runner = crate::inflight::QueueRunner::with_slow_threshold(dev, 8, "test", slow);
    let mem = Arc::new(mem);
    let mut worker = RequestWorker::new();
    // First pass: the runner assumes slow requests until it has measured fast ones.
    // Reads far from the slow offset: fast.
    let far = |mem: &GuestMemoryMmap, n: u64, first_sector: u64| {
        let chains = io_chains(mem, n, VIRTIO_BLK_T_IN);
        for i in 0..n {
            let hdr = RequestHeader {
                request_type: VIRTIO_BLK_T_IN,
                reserved: 0,
                sector: first_sector + 8 * i,
            };
            mem.write_slice(&hdr.to_bytes(), GuestAddress(HDR + 64 * i))
                .unwrap();
        }
        chains
    };
    let ring = TestRing::new(queue_with_chains(&mem, &far(&mem, 4, 1024), 0));
    ring.pass(&runner, &mut worker, &mem);
    runner.wait_idle();
    assert_eq!(used_idx(&mem), 4);
    assert!(
        runner.threads() >= 1,
        "a fresh runner starts on its executors"
    );
    // Fast requests brought the average down: a batch of fast reads runs on the queue thread.
    for _ in 0..8 {
        let mut q = queue_with_chains(&mem, &far(&mem, 4, 1024), 0);
        let next = ring.queue.lock().unwrap().next_used();
        q.set_next_used(next);
        *ring.queue.lock().unwrap() = q;
        disk.threads.lock().unwrap().clear();
        ring.pass(&runner, &mut worker, &mem);
        runner.wait_idle();
    }
    let me = std::thread::current().id();
    assert!(
        disk.threads.lock().unwrap().iter().all(|t| *t == me),
        "fast requests left the queue thread"
    );
    // Now a pass whose second request is slow: the first two run inline, the other two on
    // executors.
    let mut q = queue_with_chains(&mem, &io_chains(&mem, 4, VIRTIO_BLK_T_IN), 0);
    let next = ring.queue.lock().unwrap().next_used();
    q.set_next_used(next);
    *ring.queue.lock().unwrap() = q;
    disk.threads.lock().unwrap().clear();
    ring.pass(&runner, &mut worker, &mem);
    runner.wait_idle();
    let threads = disk.threads.lock().unwrap().clone();
    assert_eq!(threads.len(), 4);
    assert_eq!(&threads[..2], &[me, me]);
    assert!(threads[2..].iter().all(|t| *t != me), "{threads:?}");
    for i in 0..4u64 {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }
}

#[test]
fn a_flush_in_a_fast_pass_goes_to_an_executor_and_the_writes_around_it_stay_inline() {
    // A FLUSH waits for the disk whatever the caches hold: run inline, its fdatasync stopped
    // the queue thread, sent the rest of the pass to the executors, and its time made the
    // following passes slow too (with a FLUSH every 32 writes, every write paid a hand-off).
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut disk = GateDisk::new(u64::MAX);
    disk.open_gate();
    disk.flush_delay = Some(std::time::Duration::from_millis(300));
    let disk = Arc::new(disk);
    let slow = std::time::Duration::from_millis(60);
    let runner =
        crate::inflight::QueueRunner::with_slow_threshold(gated_device(disk.clone()), 8, "t", slow);
    runner.set_speed_for_test(true);
    let flush = RequestHeader {
        request_type: VIRTIO_BLK_T_FLUSH,
        reserved: 0,
        sector: 0,
    };
    let chains = |mem: &GuestMemoryMmap, with_flush: bool| {
        let mut list = io_chains(mem, 5, VIRTIO_BLK_T_OUT);
        if with_flush {
            mem.write_slice(&flush.to_bytes(), GuestAddress(HDR + 64 * 2))
                .unwrap();
            list[2] = vec![(HDR + 64 * 2, 16, 0), (STATUS + 2, 1, F_WRITE)];
        }
        list
    };
    let ring = TestRing::new(queue_with_chains(&mem, &chains(&mem, true), 0));
    let mem = Arc::new(mem);
    let mut worker = RequestWorker::new();
    ring.pass(&runner, &mut worker, &mem);
    // The pass did not wait for the flush: the four writes are on the used ring, run by the
    // queue thread itself; the flush is still at the disk, on an executor.
    assert_eq!(used_idx(&mem), 4, "the pass waited for the flush");
    let me = std::thread::current().id();
    let threads = disk.threads.lock().unwrap().clone();
    assert_eq!(threads, vec![me; 4], "a write left the queue thread");
    runner.wait_idle();
    assert_eq!(used_idx(&mem), 5);
    assert!(disk.flush_threads.lock().unwrap().iter().all(|t| *t != me));
    // Its 300 ms did not count as a request's time: the next pass runs inline too.
    let mut q = queue_with_chains(&mem, &chains(&mem, false), 0);
    q.set_next_used(5);
    *ring.queue.lock().unwrap() = q;
    disk.threads.lock().unwrap().clear();
    ring.pass(&runner, &mut worker, &mem);
    runner.wait_idle();
    assert_eq!(
        disk.threads.lock().unwrap().clone(),
        vec![me; 5],
        "the flush's time sent the next pass to the executors"
    );
    for i in 0..5u64 {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }
}

#[test]
fn runner_fails_only_the_request_whose_disk_operation_failed() {
    let mut disk = GateDisk::new(u64::MAX);
    disk.fail_at = Some(2 * 4096);
    let disk = Arc::new(disk);
    let (mem, runner, _ring) = runner_after_one_pass(&disk, 8, 5, VIRTIO_BLK_T_OUT);
    // All five are at the disk (executors) before any of them finishes.
    wait_until("five writes at the disk", || {
        disk.running.load(Ordering::SeqCst) == 5
    });
    disk.open_gate();
    runner.wait_idle();
    assert_eq!(used_idx(&mem), 5);
    for i in 0..5u64 {
        let want = if i == 2 {
            VIRTIO_BLK_S_IOERR
        } else {
            VIRTIO_BLK_S_OK
        };
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(), want);
    }
    assert_eq!(
        disk.inner.inner.snapshot()[2 * 4096..3 * 4096],
        vec![0u8; 4096]
    );
}

#[test]
fn stop_vring_returns_only_when_no_request_of_the_queue_is_in_flight() {
    use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
    use vm_memory::GuestMemoryAtomic;
    use vmm_sys_util::epoll::EventSet;

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let disk = Arc::new(GateDisk::new(u64::MAX));
    let mut cfg = DeviceConfig::new(DISK_SIZE as u64, 512, 1, QSIZE).unwrap();
    cfg.max_inflight = 8;
    let dev = BlkDevice::new(ServedDisk::plain(disk.clone()), Arc::new(cfg));
    dev.set_acked_features(dev.config().features());
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let backend =
        Arc::new(crate::vhu_blk::VhostUserBlk::new(Arc::new(dev), atomic.clone()).unwrap());
    let vring = VringRwLock::new(atomic, QSIZE).unwrap();
    *vring.get_mut().get_queue_mut() =
        queue_with_chains(&mem, &io_chains(&mem, 4, VIRTIO_BLK_T_OUT), 0);
    // A kick: the queue thread submits the four writes and returns while they wait at the disk.
    backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
        .unwrap();
    wait_until("four writes at the disk", || {
        disk.running.load(Ordering::SeqCst) == 4
    });
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopper = {
        let (backend, stopped) = (backend.clone(), stopped.clone());
        std::thread::spawn(move || {
            backend.stop_vring(0).unwrap();
            stopped.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    let returned_early = stopped.load(Ordering::SeqCst);
    let used_early = used_idx(&mem);
    // Release the disk before asserting, so a failure does not leave requests blocked forever.
    disk.open_gate();
    stopper.join().unwrap();
    assert!(
        !returned_early,
        "GET_VRING_BASE returned with requests in flight"
    );
    assert_eq!(used_early, 0);
    // Once it returned, every request is on the used ring: the frontend reads a final state.
    assert_eq!(used_idx(&mem), 4);
    for i in 0..4u64 {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }
}

#[path = "uring_tests.rs"]
mod uring_tests;

/// A pass that runs its requests on the queue thread tells the driver every `SIGNAL_EVERY`
/// completions, not only at its end: the driver reaps and refills the ring meanwhile (one
/// notification per pass made the two take turns). What remains unsignalled at the end is
/// left to the caller's end-of-pass notification.
#[test]
fn an_inline_pass_notifies_the_driver_every_few_completions_not_only_at_its_end() {
    use crate::inflight::SIGNAL_EVERY;
    const { assert!(SIGNAL_EVERY < 5, "the test's queue holds five requests") };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let disk = Arc::new(GateDisk::new(u64::MAX));
    disk.open_gate();
    let runner = crate::inflight::QueueRunner::with_slow_threshold(
        gated_device(disk.clone()),
        8,
        "test",
        std::time::Duration::from_secs(5),
    );
    let mem = Arc::new(mem);
    let mut worker = RequestWorker::new();
    let ring = TestRing::new(queue_with_chains(&mem, &[], 0));
    let me = std::thread::current().id();
    // A fresh runner assumes slow requests (its executors complete to `ring`): fast passes
    // bring its estimate down first.
    let mut signalled_at = Vec::new();
    let mut owed = false;
    for _ in 0..10 {
        let mut q = ring.queue.lock().unwrap();
        let first = q.next_used();
        *q = queue_with_chains(&mem, &io_chains(&mem, 5, VIRTIO_BLK_T_IN), 0);
        q.set_next_used(first);
        disk.threads.lock().unwrap().clear();
        signalled_at.clear();
        let mut signal = || {
            signalled_at.push(used_idx(&mem).wrapping_sub(first));
            true
        };
        owed =
            crate::inflight::submit_queue(&runner, &mut worker, &ring, &mut q, &mem, &mut signal)
                .unwrap();
        drop(q);
        runner.wait_idle();
        assert_eq!(used_idx(&mem), first.wrapping_add(5));
    }
    assert!(
        disk.threads.lock().unwrap().iter().all(|t| *t == me),
        "the last pass ran on the queue thread"
    );
    assert_eq!(
        signalled_at,
        vec![SIGNAL_EVERY as u16],
        "one notification once SIGNAL_EVERY requests were on the used ring"
    );
    assert!(
        owed,
        "the fifth completion is left to the end-of-pass notification"
    );
}

/// A driver may publish chains after a pass's last pop and before the pass re-enables
/// notifications; with EVENT_IDX it does not kick for them, so the pass must take them. A
/// round that popped nothing (here: the kick's chains were taken by an earlier pass) and then
/// sees chains at the re-check used to end the pass as "stalled", leaving the published chains
/// unserved until some later kick (seen in benchmark logs under load). The hook publishes a
/// chain exactly in that window.
#[test]
fn a_pass_that_popped_nothing_takes_the_chains_published_before_its_re_check() {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
    let disk = Arc::new(GateDisk::new(u64::MAX));
    disk.open_gate();
    let runner = crate::inflight::QueueRunner::new(gated_device(disk), 8, "test");
    // One read chain in the descriptor table and the avail ring, not yet published.
    let mut q = queue_with_chains(&mem, &io_chains(&mem, 1, VIRTIO_BLK_T_IN), 0);
    q.set_event_idx(true);
    mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    let published = Arc::new(AtomicUsize::new(0));
    {
        let mem = Arc::clone(&mem);
        let published = Arc::clone(&published);
        *runner.after_pops.lock().unwrap() = Some(Box::new(move |popped| {
            if popped == 0 && published.fetch_add(1, Ordering::SeqCst) == 0 {
                mem.write_obj(1u16.to_le(), GuestAddress(AVAIL + 2))
                    .unwrap();
            }
        }));
    }
    let ring = TestRing::new(q);
    let mut worker = RequestWorker::new();
    let r = {
        let mut q = ring.queue.lock().unwrap();
        let mut signal = || true;
        crate::inflight::submit_queue(&runner, &mut worker, &ring, &mut q, &mem, &mut signal)
    };
    assert!(r.is_ok(), "the pass ended with {r:?}");
    assert_eq!(published.load(Ordering::SeqCst), 1, "the hook did not run");
    runner.wait_idle();
    assert_eq!(
        used_idx(&mem),
        1,
        "the chain published in the window was not served"
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK
    );
}

/// The other side of the same check: a ring whose index announces a chain that cannot be
/// popped (its avail ring ends at the end of guest memory, so the entry is unreadable) ends
/// the pass with an error on both paths instead of spinning.
#[test]
fn a_ring_announcing_a_chain_it_cannot_hold_ends_the_pass_on_both_paths() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ring_at = MEM_SIZE as u64 - 4;
        let unpoppable = |mem: &GuestMemoryMmap| {
            let mut q = ready_queue(ring_at);
            q.set_event_idx(true);
            mem.write_obj(0u16, GuestAddress(ring_at)).unwrap();
            mem.write_obj(1u16.to_le(), GuestAddress(ring_at + 2))
                .unwrap();
            q
        };
        let mut h = Harness::new();
        let mut q = unpoppable(&h.mem);
        let plain = process_queue(&h.dev, &mut h.worker, &mut q, &h.mem);
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        let disk = Arc::new(GateDisk::new(u64::MAX));
        disk.open_gate();
        let runner = crate::inflight::QueueRunner::new(gated_device(disk), 8, "test");
        let ring = TestRing::new(unpoppable(&mem));
        let mut worker = RequestWorker::new();
        let runner_result = {
            let mut q = ring.queue.lock().unwrap();
            let mut signal = || true;
            crate::inflight::submit_queue(&runner, &mut worker, &ring, &mut q, &mem, &mut signal)
        };
        let _ = tx.send((
            matches!(plain, Err(ProcessQueueError::Stalled)),
            matches!(runner_result, Err(ProcessQueueError::Stalled)),
        ));
    });
    let (plain, runner) = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("a pass spun on a ring announcing a chain it cannot hold");
    assert!(plain, "process_queue did not report the stalled ring");
    assert!(runner, "submit_queue did not report the stalled ring");
}
