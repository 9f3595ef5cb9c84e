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

/// `peek_write` (the scheduling hint's view of a write) reads the range of a write in the usual
/// framing, up to its size limit, and nothing of any other request or framing.
#[test]
fn peek_write_reads_the_range_of_a_small_write_in_the_usual_framing_only() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let header = |i: u64, request_type: u32, sector: u64| {
        let hdr = RequestHeader {
            request_type,
            reserved: 0,
            sector,
        };
        mem.write_slice(&hdr.to_bytes(), GuestAddress(HDR + 64 * i))
            .unwrap();
    };
    header(0, VIRTIO_BLK_T_OUT, 24);
    header(1, VIRTIO_BLK_T_IN, 24);
    header(2, VIRTIO_BLK_T_OUT, u64::MAX);
    let chains = vec![
        // A write of two pieces, 4 KiB and 512 bytes, at sector 24.
        vec![
            (HDR, 16, 0),
            (DATA, 4096, 0),
            (DATA + 8192, 512, 0),
            (STATUS, 1, F_WRITE),
        ],
        // The same, one byte over the limit.
        vec![(HDR, 16, 0), (DATA, 4609, 0), (STATUS, 1, F_WRITE)],
        // A read.
        vec![
            (HDR + 64, 16, 0),
            (DATA, 4096, F_WRITE),
            (STATUS, 1, F_WRITE),
        ],
        // The header and the data in one descriptor.
        vec![(HDR, 4096 + 16, 0), (STATUS, 1, F_WRITE)],
        // The same with more data after it.
        vec![(HDR, 4096 + 16, 0), (DATA, 512, 0), (STATUS, 1, F_WRITE)],
        // A header the device would write.
        vec![(HDR, 16, F_WRITE), (DATA, 512, 0), (STATUS, 1, F_WRITE)],
        // No data.
        vec![(HDR, 16, 0), (STATUS, 1, F_WRITE)],
        // No status descriptor.
        vec![(HDR, 16, 0), (DATA, 4096, 0)],
        // A sector whose byte offset overflows.
        vec![(HDR + 128, 16, 0), (DATA, 4096, 0), (STATUS, 1, F_WRITE)],
    ];
    // One queue per chain: together they would not fit the descriptor table.
    let got: Vec<_> = chains
        .iter()
        .map(|c| {
            let mut q = queue_with_chains(&mem, std::slice::from_ref(c), 0);
            let chain = q.pop_descriptor_chain(&mem).expect("a chain");
            crate::request::peek_write(&mem, &chain, 4608)
        })
        .collect();
    let mut want = vec![None; chains.len()];
    want[0] = Some((24 * 512, 4608));
    assert_eq!(got, want);
}

#[path = "runner_tests.rs"]
mod runner;
