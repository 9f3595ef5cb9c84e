//! `virtio_blk_chain`: a hostile driver's split virtqueue fed to the backend's request executor.
//!
//! Guest memory has two regions with a hole between them ([`REGION_A`], [`REGION_B`]); the queue's
//! rings sit at guest address 0. The input is a program for a driver: write descriptors (any
//! address, length, flags and `next`), patch guest memory (request headers, discard segments,
//! indirect tables), push heads onto the avail ring (valid or not), move the avail index, poke
//! the config space, and run processing passes ([`snapblk::request::process_queue`]). The disk is
//! a [`blockdev::MemDisk`].
//!
//! Oracles: no panic; every processing pass returns (libFuzzer's `-timeout` catches a hang); on a
//! read-only device the disk content never changes; the disk size never changes.
//!
//! Input format (all little-endian, missing bytes are zeros):
//! `cfg:u8 feat:u8` then ops `op:u8 ...` (see [`Op`]); at the end one more processing pass runs.

use std::sync::Arc;

use blockdev::{BlockDev, MemDisk};
use snapblk::device::{BlkDevice, DeviceConfig};
use snapblk::disk::ServedDisk;
use snapblk::request::{process_queue, RequestWorker};
use snapblk::virtio_blk::*;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{Reader, Writer};

/// First guest RAM region: rings at 0, then data.
pub const REGION_A: (u64, usize) = (0, 0x1_0000);
/// Second guest RAM region, after a hole.
pub const REGION_B: (u64, usize) = (0x2_0000, 0x1_0000);
/// Addresses drawn "near memory" fall below this (covers both regions and the hole).
pub const NEAR_LIMIT: u64 = 0x3_1000;
/// Size of the served disk.
pub const DISK_SIZE: usize = 64 << 10;
/// Largest queue size the harness builds (log2).
const MAX_QUEUE_LOG2: u8 = 7;
/// Most ops executed per input.
const MAX_OPS: usize = 512;

/// Descriptor flag: another descriptor follows.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: indirect table.
pub const F_INDIRECT: u16 = 4;

/// Op codes of the input program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// `idx:u16 addr len:u32 flags:u16 next:u16`: store a descriptor (idx modulo queue size).
    Desc = 0,
    /// `addr:u32 n:u8 bytes[n]`: patch guest memory (address modulo [`NEAR_LIMIT`]).
    Poke = 1,
    /// `addr:u32 type:u32 sector:u64`: write a request header.
    Header = 2,
    /// `head:u16`: push a head onto the avail ring.
    Push = 3,
    /// Run one processing pass.
    Process = 4,
    /// `idx:u16`: set the avail index to any value.
    AvailIdx = 5,
    /// `offset:u32 size:u32 woff:u32 n:u8 bytes[n]`: read, then write, the config space.
    Config = 6,
    /// `used_event:u16`: set the used_event field (EVENT_IDX notification threshold).
    UsedEvent = 7,
}

const OPS: u8 = 8;

/// Decodes an address: high bit of the mode byte selects a raw 64-bit address.
fn addr(r: &mut Reader<'_>) -> u64 {
    if r.u8() & 0x80 != 0 {
        r.u64()
    } else {
        u64::from(r.u32()) % NEAR_LIMIT
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    run_outcome(data);
}

/// What one input did (for the harness's own tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainOutcome {
    /// Entries the device put on the used ring.
    pub used: u16,
    /// Whether the disk content changed.
    pub disk_changed: bool,
}

/// Runs one input and says what it did.
pub fn run_outcome(data: &[u8]) -> ChainOutcome {
    let mut r = Reader::new(data);
    let cfg_byte = r.u8();
    let feat = r.u8();
    let qsize: u16 = 1 << (cfg_byte & 7).min(MAX_QUEUE_LOG2);
    let event_idx = cfg_byte & 8 != 0;
    let read_only = cfg_byte & 0x10 != 0;
    let writethrough = cfg_byte & 0x20 != 0;
    let lbs = 512u32 << ((cfg_byte >> 6) & 3);

    let nothing = ChainOutcome {
        used: 0,
        disk_changed: false,
    };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(REGION_A.0), REGION_A.1),
        (GuestAddress(REGION_B.0), REGION_B.1),
    ]) else {
        return nothing;
    };
    let content: Vec<u8> = (0..DISK_SIZE).map(|i| (i / 512) as u8 ^ i as u8).collect();
    let disk = Arc::new(MemDisk::from_vec(content.clone()));
    let Ok(mut cfg) = DeviceConfig::new(DISK_SIZE as u64, lbs, 1, 1 << MAX_QUEUE_LOG2) else {
        return nothing;
    };
    cfg.read_only = read_only;
    cfg.writeback_default = !writethrough;
    cfg.set_serial(b"snapblk-fuzz");
    let dev = BlkDevice::new(ServedDisk::plain(disk.clone()), Arc::new(cfg));
    let mut acked = dev.config().features();
    for (bit, f) in [
        (0, VIRTIO_BLK_F_DISCARD),
        (1, VIRTIO_BLK_F_WRITE_ZEROES),
        (2, VIRTIO_BLK_F_FLUSH),
        (3, VIRTIO_RING_F_EVENT_IDX),
    ] {
        if feat & (1 << bit) != 0 {
            acked &= !feature(f);
        }
    }
    dev.set_acked_features(acked);

    let mq = MockSplitQueue::create(&mem, GuestAddress(0), qsize);
    let Ok(mut queue) = mq.create_queue::<Queue>() else {
        return nothing;
    };
    queue.set_event_idx(event_idx);
    let avail = mq.avail_addr();
    let avail_idx_addr = GuestAddress(avail.0 + 2);
    let used_event_addr = GuestAddress(avail.0 + 4 + 2 * u64::from(qsize));
    let mut worker = RequestWorker::new();

    let mut ops = 0;
    while !r.is_empty() && ops < MAX_OPS {
        ops += 1;
        match r.u8() % OPS {
            0 => {
                let idx = r.u16() % qsize;
                let a = addr(&mut r);
                let len = r.u32();
                let flags = r.u16();
                let next = r.u16();
                let desc = RawDescriptor::from(SplitDescriptor::new(a, len, flags, next));
                let _ = mq.desc_table().store(idx, desc);
            }
            1 => {
                let a = u64::from(r.u32()) % NEAR_LIMIT;
                let n = usize::from(r.u8());
                let _ = mem.write_slice(r.bytes(n), GuestAddress(a));
            }
            2 => {
                let a = u64::from(r.u32()) % NEAR_LIMIT;
                let hdr = RequestHeader {
                    request_type: r.u32(),
                    reserved: 0,
                    sector: r.u64(),
                };
                let _ = mem.write_slice(&hdr.to_bytes(), GuestAddress(a));
            }
            3 => {
                let head = r.u16();
                let idx: u16 = mem.read_obj(avail_idx_addr).unwrap_or(0);
                let slot = GuestAddress(avail.0 + 4 + 2 * u64::from(idx % qsize));
                let _ = mem.write_obj(head, slot);
                let _ = mem.write_obj(idx.wrapping_add(1), avail_idx_addr);
            }
            4 => {
                let _ = process_queue(&dev, &mut worker, &mut queue, &mem);
            }
            5 => {
                let _ = mem.write_obj(r.u16(), avail_idx_addr);
            }
            6 => {
                let off = r.u32();
                let size = r.u32();
                let cfg_bytes = dev.read_config(off, size);
                // The answer is bounded by vhost-user's config size whatever the driver asks.
                assert!(
                    cfg_bytes.len() <= 4096 && cfg_bytes.len() <= size as usize,
                    "config read of {} bytes for {size} asked",
                    cfg_bytes.len()
                );
                let woff = r.u32();
                let n = usize::from(r.u8() % 64);
                dev.write_config(woff, r.bytes(n));
            }
            _ => {
                let _ = mem.write_obj(r.u16(), used_event_addr);
            }
        }
    }
    let _ = process_queue(&dev, &mut worker, &mut queue, &mem);

    assert_eq!(disk.size(), DISK_SIZE as u64, "disk size changed");
    let disk_changed = disk.snapshot() != content;
    assert!(
        !(read_only && disk_changed),
        "a read-only device's disk was modified"
    );
    ChainOutcome {
        used: mq.used().idx().load(),
        disk_changed,
    }
}

/// Builds inputs for [`run`] (seed corpus and tests).
#[derive(Debug, Default, Clone)]
pub struct ChainInput {
    w: Writer,
}

impl ChainInput {
    /// A program for a queue of `1 << qlog2` entries with config byte bits `cfg` (bits 3..7) and
    /// feature-clearing bits `feat`.
    pub fn new(qlog2: u8, cfg: u8, feat: u8) -> Self {
        let mut w = Writer::default();
        w.u8((qlog2 & 7) | (cfg & !7)).u8(feat);
        ChainInput { w }
    }

    /// Stores descriptor `idx` with a near-memory address.
    pub fn desc(&mut self, idx: u16, addr: u32, len: u32, flags: u16, next: u16) -> &mut Self {
        self.w.u8(Op::Desc as u8).u16(idx).u8(0).u32(addr).u32(len);
        self.w.u16(flags).u16(next);
        self
    }

    /// Patches guest memory.
    pub fn poke(&mut self, addr: u32, bytes: &[u8]) -> &mut Self {
        for (i, chunk) in bytes.chunks(255).enumerate() {
            let a = addr + 255 * i as u32;
            self.w.u8(Op::Poke as u8).u32(a).u8(chunk.len() as u8);
            self.w.bytes(chunk);
        }
        self
    }

    /// Writes a request header.
    pub fn header(&mut self, addr: u32, request_type: u32, sector: u64) -> &mut Self {
        self.w.u8(Op::Header as u8).u32(addr).u32(request_type);
        self.w.u64(sector);
        self
    }

    /// Pushes a head onto the avail ring.
    pub fn push(&mut self, head: u16) -> &mut Self {
        self.w.u8(Op::Push as u8).u16(head);
        self
    }

    /// Runs a processing pass.
    pub fn process(&mut self) -> &mut Self {
        self.w.u8(Op::Process as u8);
        self
    }

    /// Sets the avail index.
    pub fn avail_idx(&mut self, idx: u16) -> &mut Self {
        self.w.u8(Op::AvailIdx as u8).u16(idx);
        self
    }

    /// Reads and writes the config space.
    pub fn config(&mut self, off: u32, size: u32, woff: u32, bytes: &[u8]) -> &mut Self {
        self.w.u8(Op::Config as u8).u32(off).u32(size).u32(woff);
        self.w.u8(bytes.len() as u8).bytes(bytes);
        self
    }

    /// Sets used_event.
    pub fn used_event(&mut self, v: u16) -> &mut Self {
        self.w.u8(Op::UsedEvent as u8).u16(v);
        self
    }

    /// The encoded program.
    pub fn build(&self) -> Vec<u8> {
        self.w.out.clone()
    }
}

/// Guest address of request headers in the seeds.
pub const SEED_HDR: u32 = 0x4000;
/// Guest address of data buffers in the seeds (second region).
pub const SEED_DATA: u32 = 0x2_0000;
/// Guest address of the status byte in the seeds.
pub const SEED_STATUS: u32 = 0x5000;

/// A few valid request chains (and one hostile one) as seed inputs, with names.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // READ 2 sectors at sector 4 into two descriptors, one crossing into the second region.
    let mut s = ChainInput::new(4, 0, 0);
    s.header(SEED_HDR, VIRTIO_BLK_T_IN, 4)
        .desc(0, SEED_HDR, 16, F_NEXT, 1)
        .desc(1, SEED_DATA, 512, F_NEXT | F_WRITE, 2)
        .desc(2, 0x6000, 512, F_NEXT | F_WRITE, 3)
        .desc(3, SEED_STATUS, 1, F_WRITE, 0)
        .push(0)
        .process();
    out.push(("read_two_sectors", s.build()));
    // WRITE one 4 KiB block (EVENT_IDX on), then FLUSH.
    let mut s = ChainInput::new(4, 8, 0);
    s.header(SEED_HDR, VIRTIO_BLK_T_OUT, 8)
        .poke(SEED_DATA, &[0x5a; 300])
        .desc(0, SEED_HDR, 16, F_NEXT, 1)
        .desc(1, SEED_DATA, 4096, F_NEXT, 2)
        .desc(2, SEED_STATUS, 1, F_WRITE, 0)
        .push(0)
        .header(SEED_HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0)
        .desc(3, SEED_HDR + 0x100, 16, F_NEXT, 4)
        .desc(4, SEED_STATUS + 1, 1, F_WRITE, 0)
        .push(3)
        .used_event(0)
        .process();
    out.push(("write_then_flush_event_idx", s.build()));
    // DISCARD and WRITE_ZEROES with two segments each.
    let mut seg = Vec::new();
    for (sector, n, flags) in [(0u64, 8u32, 0u32), (16, 8, 0)] {
        seg.extend_from_slice(
            &DiscardWriteZeroesSegment {
                sector,
                num_sectors: n,
                flags,
            }
            .to_bytes(),
        );
    }
    let mut s = ChainInput::new(3, 0, 0);
    s.header(SEED_HDR, VIRTIO_BLK_T_DISCARD, 0)
        .poke(SEED_HDR + 16, &seg)
        .desc(0, SEED_HDR, 48, F_NEXT, 1)
        .desc(1, SEED_STATUS, 1, F_WRITE, 0)
        .push(0)
        .header(SEED_HDR + 0x200, VIRTIO_BLK_T_WRITE_ZEROES, 0)
        .poke(SEED_HDR + 0x210, &seg)
        .desc(2, SEED_HDR + 0x200, 48, F_NEXT, 3)
        .desc(3, SEED_STATUS + 1, 1, F_WRITE, 0)
        .push(2)
        .process();
    out.push(("discard_and_write_zeroes", s.build()));
    // GET_ID through an indirect table, on a read-only device.
    let mut table = Vec::new();
    for d in [
        SplitDescriptor::new(u64::from(SEED_HDR), 16, F_NEXT, 1),
        SplitDescriptor::new(u64::from(SEED_DATA), 20, F_NEXT | F_WRITE, 2),
        SplitDescriptor::new(u64::from(SEED_STATUS), 1, F_WRITE, 0),
    ] {
        table.extend_from_slice(&d.addr().0.to_le_bytes());
        table.extend_from_slice(&d.len().to_le_bytes());
        table.extend_from_slice(&d.flags().to_le_bytes());
        table.extend_from_slice(&d.next().to_le_bytes());
    }
    let mut s = ChainInput::new(2, 0x10, 0);
    s.header(SEED_HDR, VIRTIO_BLK_T_GET_ID, 0)
        .poke(0x8000, &table)
        .desc(0, 0x8000, 48, F_INDIRECT, 0)
        .push(0)
        .config(0, 60, 32, &[0])
        .process();
    out.push(("get_id_indirect_read_only", s.build()));
    // A descriptor loop and an out-of-range head, then a good read, 4 KiB blocks.
    let mut s = ChainInput::new(3, 0x40 | 0xc0, 0);
    s.header(SEED_HDR, VIRTIO_BLK_T_IN, 0)
        .desc(0, SEED_HDR, 16, F_NEXT, 1)
        .desc(1, SEED_DATA, 4096, F_NEXT | F_WRITE, 0)
        .push(0)
        .push(200)
        .desc(2, SEED_HDR, 16, F_NEXT, 3)
        .desc(3, SEED_DATA, 4096, F_NEXT | F_WRITE, 4)
        .desc(4, SEED_STATUS, 1, F_WRITE, 0)
        .push(2)
        .process();
    out.push(("loop_bad_head_then_read_4k", s.build()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeds really execute requests: each completes its chains, the writing ones change
    /// the disk and the others do not.
    #[test]
    fn seeds_complete_their_requests_and_only_writers_change_the_disk() {
        let expect = [
            ("read_two_sectors", 1, false),
            ("write_then_flush_event_idx", 2, true),
            ("discard_and_write_zeroes", 2, true),
            ("get_id_indirect_read_only", 1, false),
            // The looping chain and the bad head are returned too (the bad head may not be).
            ("loop_bad_head_then_read_4k", 2, false),
        ];
        let seeds = seeds();
        assert_eq!(seeds.len(), expect.len());
        for ((name, input), (ename, min_used, changes)) in seeds.iter().zip(expect) {
            assert_eq!(*name, ename);
            let out = run_outcome(input);
            assert!(
                out.used >= min_used,
                "{name}: only {} used entries",
                out.used
            );
            assert_eq!(out.disk_changed, changes, "{name}: disk changed?");
        }
    }

    /// Runs `input` on another thread; fails if it does not finish within 10 s.
    fn finishes(input: Vec<u8>) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            run_outcome(&input);
            let _ = tx.send(());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok()
    }

    /// A driver that moves the avail index more than a queue size ahead of the device (with
    /// EVENT_IDX negotiated) must not make a processing pass spin forever.
    #[test]
    fn avail_index_jump_with_event_idx_does_not_hang_the_queue() {
        let mut s = ChainInput::new(4, 8, 0);
        s.avail_idx(100).process();
        assert!(
            finishes(s.build()),
            "process_queue did not return after the avail index jumped past the queue size"
        );
    }
}
