//! A processing pass that runs across a guest memory table update ([`VhostUserBlk`]).
//!
//! The vhost-user handler thread applies the frontend's ADD_MEM_REG (or SET_MEM_TABLE) by
//! replacing the table in the [`GuestMemory`] atomic the queue threads share, and acknowledges
//! it; the driver may then at once publish a chain whose buffers lie in the new memory. A queue
//! thread can be in the middle of a pass meanwhile (the pass that `vring_started`'s own kick
//! starts, preempted on a busy host, right when a client such as libblkio registers its
//! payload region after starting its queues), and that pass pops the new chain. It must read
//! that chain over the table it was published against, not over the one the pass found when
//! it began, whose view of guest memory has no such address (the request failed with
//! `VIRTIO_BLK_S_IOERR`, "invalid guest address").
//!
//! The interleaving is made deterministic with a disk whose first write, executed by the pass
//! itself, does what the handler thread and the driver do in between: add a region to the
//! table, then publish a chain whose data lies in it.

use std::sync::Mutex;

use blockdev::{BlockDev, MemDisk};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestRegionMmap};

use super::*;
use crate::virtio_blk::{RequestHeader, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};

const QSIZE: u16 = 16;
/// The memory the rings live in (the table the pass starts with).
const MEM: usize = 0x10000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Where each request keeps its header (and, 0x400 further, its status byte).
const SLOTS: u64 = 0x4000;
const SLOT: u64 = 0x800;
/// The region the frontend adds while the pass runs (a client's payload region).
const ADDED: u64 = 0x10_0000;
const ADDED_LEN: usize = 0x1000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

type Action = Box<dyn FnOnce() + Send>;

/// A disk over a `MemDisk` that runs an action once, at its first write, before writing.
struct HookedDisk {
    inner: MemDisk,
    on_first_write: Mutex<Option<Action>>,
}

impl BlockDev for HookedDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        let action = self.on_first_write.lock().unwrap().take();
        if let Some(a) = action {
            a();
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> blockdev::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> blockdev::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
}

/// The driver: writes a one-sector write of `fill` bytes to `sector` as the chain
/// `head`, `head + 1`, `head + 2` (header, data at `data`, status) and publishes it as the
/// `nth` chain of the available ring. Header and status sit in the ring memory, like a
/// client's per-request data; the data sits wherever the driver says.
fn publish(mem: &GuestMemory, head: u16, nth: u16, sector: u64, data: u64, fill: u8) {
    let m = mem.memory();
    let slot = SLOTS + SLOT * u64::from(head);
    let hdr = RequestHeader {
        request_type: VIRTIO_BLK_T_OUT,
        reserved: 0,
        sector,
    };
    m.write_slice(&hdr.to_bytes(), GuestAddress(slot)).unwrap();
    m.write_slice(&[fill; 512], GuestAddress(data)).unwrap();
    // Not a status the device writes: a status byte left alone shows.
    m.write_slice(&[0xee], GuestAddress(slot + 0x400)).unwrap();
    let descs = [
        SplitDescriptor::new(slot, 16, F_NEXT, head + 1),
        SplitDescriptor::new(data, 512, F_NEXT, head + 2),
        SplitDescriptor::new(slot + 0x400, 1, F_WRITE, 0),
    ];
    for (i, d) in (head..).zip(descs) {
        m.write_obj(
            RawDescriptor::from(d),
            GuestAddress(DESC + 16 * u64::from(i)),
        )
        .unwrap();
    }
    let pos = u64::from(nth % QSIZE);
    m.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * pos))
        .unwrap();
    m.store(
        nth.wrapping_add(1).to_le(),
        GuestAddress(AVAIL + 2),
        Ordering::Release,
    )
    .unwrap();
}

fn status(mem: &GuestMemory, head: u16) -> u8 {
    let slot = SLOTS + SLOT * u64::from(head);
    mem.memory().read_obj(GuestAddress(slot + 0x400)).unwrap()
}

/// `max_inflight` 1 is the serial pass; above 1 the pass of a queue with executors.
fn run_pass_across_a_table_update(max_inflight: usize) {
    let mem: GuestMemory =
        GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap());
    let disk = Arc::new(HookedDisk {
        inner: MemDisk::new(1 << 20),
        on_first_write: Mutex::new(None),
    });
    let dev = BlkDevice::for_tests(Arc::clone(&disk) as Arc<dyn BlockDev>, QSIZE, max_inflight);
    let backend = VhostUserBlk::new(Arc::new(dev), mem.clone()).unwrap();
    let vring = VringRwLock::new(mem.clone(), QSIZE).unwrap();
    vring.set_queue_size(QSIZE);
    vring.set_queue_info(DESC, AVAIL, USED).unwrap();
    vring.set_queue_event_idx(true);
    vring.set_queue_ready(true);
    vring.set_enabled(true);

    // While the pass executes the first request, the frontend adds a region (the handler
    // thread replaces the table, as on ADD_MEM_REG) and, once that is acknowledged, the driver
    // publishes a write whose data lies in the new region.
    let update = {
        let mem = mem.clone();
        move || {
            let added = GuestRegionMmap::from_range(GuestAddress(ADDED), ADDED_LEN, None).unwrap();
            let table = mem.memory().insert_region(Arc::new(added)).unwrap();
            mem.lock().unwrap().replace(table);
            publish(&mem, 3, 1, 2, ADDED, 0x22);
        }
    };
    *disk.on_first_write.lock().unwrap() = Some(Box::new(update));
    publish(&mem, 0, 0, 1, SLOTS + 0x10, 0x11);

    backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
        .unwrap();
    backend.wait_idle();

    let used: u16 = mem.memory().read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(
        used, 2,
        "max_inflight {max_inflight}: both requests are on the used ring"
    );
    assert_eq!(
        status(&mem, 0),
        VIRTIO_BLK_S_OK,
        "max_inflight {max_inflight}: the request before the update"
    );
    assert_eq!(
        status(&mem, 3),
        VIRTIO_BLK_S_OK,
        "max_inflight {max_inflight}: the request published after the update was read over \
         the table the pass began with"
    );
    let mut sectors = [0u8; 1024];
    disk.inner.read_at(&mut sectors, 512).unwrap();
    assert!(
        sectors[..512].iter().all(|&b| b == 0x11),
        "max_inflight {max_inflight}: first write's data"
    );
    assert!(
        sectors[512..].iter().all(|&b| b == 0x22),
        "max_inflight {max_inflight}: the data from the added region reached the disk"
    );
}

#[test]
fn a_chain_published_after_a_memory_table_update_mid_pass_is_read_over_the_new_table() {
    for max_inflight in [1, 8] {
        run_pass_across_a_table_update(max_inflight);
    }
}
