//! vhost-user glue: the [`VhostUserBackend`] implementation of the block device (features,
//! protocol features, config space, queue events).
//!
//! One [`VhostUserBlk`] lives for one frontend connection. Each request queue gets its own worker
//! thread (`queues_per_thread` puts one queue in each), and each thread has its own
//! [`RequestWorker`] buffers, so queues are served in parallel with no lock in common: a queue
//! thread holds only its own vring lock (taken for the duration of a processing pass) and its own
//! worker mutex, which is never contended. With `--max-inflight` above 1 each queue also has a
//! [`QueueRunner`]: the pass only submits requests, the runner's executors complete them to the
//! used ring (taking the vring lock briefly), and GET_VRING_BASE (`stop_vring`), a device reset
//! and the end of the connection wait until the queue has no request in flight.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{debug, error, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::BlkDevice;
use crate::inflight::{add_used_and_check, submit_queue, QueueRunner, UsedRing};
use crate::request::{process_queue, RequestWorker};

/// Guest memory as shared with the vhost-user handler.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Executors complete requests straight to the vring: the used element, then the driver's
/// notification if it asked for one.
impl UsedRing for VringRwLock {
    fn complete(&self, mem: &GuestMemoryMmap, head: u16, len: u32) {
        let notify = {
            let mut state = self.get_mut();
            add_used_and_check(state.get_queue_mut(), mem, head, len)
        };
        if notify {
            if let Err(e) = self.signal_used_queue() {
                warn!("cannot signal the driver: {e}");
            }
        }
    }
}

/// The vhost-user-blk backend of one connection.
pub struct VhostUserBlk {
    dev: Arc<BlkDevice>,
    mem: GuestMemory,
    /// Request buffers of each queue thread (used for requests the thread runs itself).
    workers: Vec<Mutex<RequestWorker>>,
    /// Each queue's executors (none with `--max-inflight 1`: the queue thread runs everything).
    runners: Vec<Option<QueueRunner<VringRwLock>>>,
    event_idx: AtomicBool,
}

impl std::fmt::Debug for VhostUserBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBlk")
            .field("dev", &self.dev)
            .finish()
    }
}

impl VhostUserBlk {
    /// A backend for `dev` whose queues read guest memory through `mem` (the same atomic the
    /// daemon is created with).
    pub fn new(dev: Arc<BlkDevice>, mem: GuestMemory) -> io::Result<Self> {
        let max_inflight = dev.config().max_inflight;
        let queues = dev.config().num_queues;
        let workers = (0..queues)
            .map(|q| Mutex::new(RequestWorker::for_queue(usize::from(q))))
            .collect();
        let runners = (0..queues)
            .map(|q| {
                (max_inflight > 1).then(|| {
                    QueueRunner::new(Arc::clone(&dev), max_inflight, &format!("snapblk-q{q}"))
                        .for_queue(usize::from(q))
                })
            })
            .collect();
        Ok(VhostUserBlk {
            dev,
            mem,
            workers,
            runners,
            event_idx: AtomicBool::new(false),
        })
    }

    /// Blocks until no queue has a request in flight: every request picked up so far is on its
    /// used ring.
    pub fn wait_idle(&self) {
        for r in self.runners.iter().flatten() {
            r.wait_idle();
        }
    }

    /// The device model.
    pub fn device(&self) -> &Arc<BlkDevice> {
        &self.dev
    }

    /// Runs processing passes on `vring` with the worker of `thread_id`.
    fn process_vring(&self, vring: &VringRwLock, thread_id: usize) -> io::Result<()> {
        let Some(worker) = self.workers.get(thread_id) else {
            return Err(io::Error::other(format!(
                "no worker for thread {thread_id}"
            )));
        };
        let mut worker = worker.lock().unwrap_or_else(|e| e.into_inner());
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let result = match self.runners.get(thread_id).and_then(Option::as_ref) {
            Some(runner) => {
                let mem = self.mem.memory().into_inner();
                submit_queue(runner, &mut worker, vring, queue, &mem)
            }
            None => process_queue(&self.dev, &mut worker, queue, &*self.mem.memory()),
        };
        let needs_signal = match result {
            Ok(n) => n,
            Err(e) => {
                // A broken ring is the driver's fault: log it and keep the thread alive.
                error!("queue {thread_id}: {e}");
                true
            }
        };
        if needs_signal {
            if let Err(e) = state.signal_used_queue() {
                warn!("queue {thread_id}: cannot signal the driver: {e}");
            }
        }
        Ok(())
    }
}

/// Checks that every file-backed region of `mem` lies inside its (regular) file.
fn check_regions_fit_their_files(mem: &GuestMemoryMmap) -> io::Result<()> {
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            continue;
        };
        let meta = fo.file().metadata()?;
        if !meta.file_type().is_file() {
            continue;
        }
        let end = fo.start().checked_add(region.len());
        if end.is_none_or(|end| end > meta.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "memory region at guest address {:#x} ({} bytes from file offset {}) reaches past the end of its {}-byte file",
                    region.start_addr().0,
                    region.len(),
                    fo.start(),
                    meta.len()
                ),
            ));
        }
    }
    Ok(())
}

impl VhostUserBackend for VhostUserBlk {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.dev.config().num_queues.into()
    }

    fn max_queue_size(&self) -> usize {
        self.dev.config().queue_size.into()
    }

    fn features(&self) -> u64 {
        self.dev.config().features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        debug!("driver acknowledged features {features:#x}");
        self.dev.set_acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn reset_device(&self) {
        debug!("device reset");
        self.wait_idle();
        self.dev.reset();
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The frontend reads the used ring once this returns: no executor may write it later.
        if let Some(Some(runner)) = self.runners.get(queue_index as usize) {
            runner.wait_idle();
        }
        Ok(())
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        debug!("GET_CONFIG offset {offset} size {size}");
        self.dev.read_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        debug!("SET_CONFIG offset {offset} data {buf:?}");
        self.dev.write_config(offset, buf);
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        // `self.mem` is the atomic the handler just updated. vm-memory maps each region as the
        // frontend describes it without comparing it with its file: a region that reaches past
        // the end of its file would SIGBUS the queue thread on first access. Refuse such a table
        // and leave no guest memory mapped, so every ring access fails cleanly instead.
        if let Err(e) = check_regions_fit_their_files(&mem.memory()) {
            match self.mem.lock() {
                Ok(guard) => guard.replace(GuestMemoryMmap::new()),
                Err(_) => error!("cannot drop the refused memory table: its lock is poisoned"),
            }
            error!("refusing the frontend's memory table: {e}");
            return Err(e);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        crate::sandbox::test_trigger_forbidden_syscall();
        if !evset.contains(EventSet::IN) {
            warn!("queue thread {thread_id}: unexpected events {evset:?}");
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::other(format!(
                "unknown device event {device_event}"
            )));
        };
        self.process_vring(vring, thread_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceConfig;
    use crate::disk::ServedDisk;
    use crate::virtio_blk::*;
    use blockdev::MemDisk;

    fn backend(num_queues: u16, read_only: bool) -> VhostUserBlk {
        let mut cfg = DeviceConfig::new(1 << 20, 512, num_queues, 128).unwrap();
        cfg.read_only = read_only;
        let dev = BlkDevice::new(
            ServedDisk::plain(Arc::new(MemDisk::new(1 << 20))),
            Arc::new(cfg),
        );
        VhostUserBlk::new(
            Arc::new(dev),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .unwrap()
    }

    #[test]
    fn each_queue_gets_its_own_worker_thread() {
        let b = backend(4, false);
        assert_eq!(b.num_queues(), 4);
        assert_eq!(b.max_queue_size(), 128);
        assert_eq!(b.queues_per_thread(), vec![1, 2, 4, 8]);
        assert!(b.exit_event(0).is_some());
    }

    #[test]
    fn offers_the_features_and_protocol_features_clients_need() {
        let b = backend(2, false);
        let f = b.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(f & feature(bit), 0, "feature bit {bit} missing");
        }
        assert_eq!(f & feature(VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        let p = b.protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(p.contains(VhostUserProtocolFeatures::MQ));
        assert!(p.contains(VhostUserProtocolFeatures::REPLY_ACK));
        assert!(p.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
        assert_ne!(backend(1, true).features() & feature(VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn config_write_of_wce_reaches_the_device() {
        let b = backend(1, false);
        b.set_config(BlkConfigSpace::WRITEBACK_OFFSET as u32, &[0])
            .unwrap();
        assert!(!b.device().writeback());
        assert_eq!(
            b.get_config(BlkConfigSpace::WRITEBACK_OFFSET as u32, 1),
            vec![0]
        );
        b.reset_device();
        assert!(b.device().writeback());
    }
}
