//! [`SwitchDev`]: a pass-through layer whose lower device can be replaced atomically while the
//! layers above keep their handle to it.
//!
//! The daemon puts it between the folio cache and the image, so a live snapshot can put a new
//! qcow2 overlay on top of the image without the cache noticing (the guest-visible disk does not
//! change at a snapshot, so everything cached stays valid).
//!
//! Locking model: one `RwLock` around the current lower device. Every operation holds it shared
//! for its whole duration (including the lower I/O), so [`SwitchDev::replace`], which takes it
//! exclusively, waits until no operation is inside the old device and no operation can reach the
//! old device afterwards. Nothing is called upward, so the lock never nests with a lock above.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::{BlockDev, BlockError, ReadPlan, Result};

/// A [`BlockDev`] forwarding to a lower device that can be swapped at run time.
pub struct SwitchDev {
    lower: RwLock<Arc<dyn BlockDev>>,
    size: u64,
}

impl std::fmt::Debug for SwitchDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchDev")
            .field("size", &self.size)
            .finish()
    }
}

/// Exclusive access to a [`SwitchDev`]'s lower device: no operation runs while it is held.
pub struct SwitchGuard<'a> {
    lower: RwLockWriteGuard<'a, Arc<dyn BlockDev>>,
    size: u64,
}

impl std::fmt::Debug for SwitchGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchGuard").finish()
    }
}

impl SwitchGuard<'_> {
    /// The current lower device.
    pub fn current(&self) -> &Arc<dyn BlockDev> {
        &self.lower
    }

    /// Replaces the lower device and returns the old one. Refuses a device of another size (the
    /// layers above sized themselves from the first one).
    pub fn replace(&mut self, new: Arc<dyn BlockDev>) -> Result<Arc<dyn BlockDev>> {
        if new.size() != self.size {
            return Err(BlockError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "replacement device has {} bytes, the switch serves {}",
                    new.size(),
                    self.size
                ),
            )));
        }
        Ok(std::mem::replace(&mut *self.lower, new))
    }
}

impl SwitchDev {
    /// A switch serving `lower`.
    pub fn new(lower: Arc<dyn BlockDev>) -> Self {
        SwitchDev {
            size: lower.size(),
            lower: RwLock::new(lower),
        }
    }

    fn get(&self) -> RwLockReadGuard<'_, Arc<dyn BlockDev>> {
        self.lower.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The current lower device (a clone of the handle; it may be replaced right after).
    pub fn current(&self) -> Arc<dyn BlockDev> {
        Arc::clone(&self.get())
    }

    /// Waits until no operation is running and blocks new ones until the guard is dropped.
    pub fn lock(&self) -> SwitchGuard<'_> {
        SwitchGuard {
            lower: self.lower.write().unwrap_or_else(|e| e.into_inner()),
            size: self.size,
        }
    }

    /// Replaces the lower device (see [`SwitchGuard::replace`]).
    pub fn replace(&self, new: Arc<dyn BlockDev>) -> Result<Arc<dyn BlockDev>> {
        self.lock().replace(new)
    }
}

impl BlockDev for SwitchDev {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.get().read_at(buf, offset)
    }

    fn read_into(&self, dst: &dyn crate::ReadSink, offset: u64) -> Result<()> {
        self.get().read_into(dst, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.get().write_at(buf, offset)
    }

    fn write_uncached_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.get().write_uncached_at(buf, offset)
    }

    fn write_batch(&self, writes: &[(&[u8], u64)]) -> Vec<Result<()>> {
        self.get().write_batch(writes)
    }

    fn write_batch_to_sync(&self, writes: &[(&[u8], u64)]) -> Vec<Result<()>> {
        self.get().write_batch_to_sync(writes)
    }

    fn flush(&self) -> Result<()> {
        self.get().flush()
    }

    fn write_back(&self) -> Result<()> {
        self.get().write_back()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.get().discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.get().write_zeroes(offset, len, unmap)
    }

    fn is_read_only(&self) -> bool {
        self.get().is_read_only()
    }

    fn rewrites_in_page_cache(&self, offset: u64, len: u64) -> bool {
        self.get().rewrites_in_page_cache(offset, len)
    }

    fn persists_in_place(&self, offset: u64, len: u64) -> bool {
        self.get().persists_in_place(offset, len)
    }

    fn write_in_place_persisted(&self, buf: &[u8], offset: u64) -> Result<bool> {
        self.get().write_in_place_persisted(buf, offset)
    }

    fn plan_read(&self, offset: u64, len: u64) -> Option<ReadPlan> {
        // The plan holds the files it names open: a later replacement cannot close them under
        // a read in flight, and the replaced device's data does not change (it becomes the new
        // device's read-only backing).
        self.get().plan_read(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDisk;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    /// A lower device whose writes stop in the middle until released.
    struct Stalling {
        inner: MemDisk,
        entered: mpsc::SyncSender<()>,
        release: std::sync::Mutex<mpsc::Receiver<()>>,
        done: AtomicBool,
    }

    impl BlockDev for Stalling {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.inner.write_at(buf, offset)?;
            self.entered.send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
            self.done.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn discard(&self, o: u64, l: u64) -> Result<()> {
            self.inner.discard(o, l)
        }
        fn write_zeroes(&self, o: u64, l: u64, u: bool) -> Result<()> {
            self.inner.write_zeroes(o, l, u)
        }
    }

    #[test]
    fn the_in_place_answer_is_the_current_lower_device_s() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(1 << 20).unwrap();
        let raw = Arc::new(crate::RawFile::open(tmp.path(), false).unwrap());
        let sw = SwitchDev::new(raw);
        assert!(sw.rewrites_in_page_cache(0, 128 << 10));
        assert!(sw.persists_in_place(0, 128 << 10));
        assert!(sw.write_in_place_persisted(&[7; 4096], 0).unwrap());
        sw.replace(Arc::new(MemDisk::new(1 << 20))).unwrap();
        assert!(!sw.rewrites_in_page_cache(0, 128 << 10));
        assert!(!sw.persists_in_place(0, 128 << 10));
        assert!(!sw.write_in_place_persisted(&[8; 4096], 0).unwrap());
        let mut b = [0u8; 4096];
        sw.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0; 4096], "a refused write changes nothing");
    }

    #[test]
    fn replace_waits_for_operations_inside_the_old_device() {
        let (etx, erx) = mpsc::sync_channel(1);
        let (rtx, rrx) = mpsc::channel();
        let old = Arc::new(Stalling {
            inner: MemDisk::new(4096),
            entered: etx,
            release: std::sync::Mutex::new(rrx),
            done: AtomicBool::new(false),
        });
        let sw = Arc::new(SwitchDev::new(old.clone()));
        let writer = {
            let sw = sw.clone();
            std::thread::spawn(move || sw.write_at(&[1; 512], 0).unwrap())
        };
        // The write is inside the old device (after its I/O, before it returns).
        erx.recv().unwrap();
        let (stx, srx) = mpsc::channel();
        let swapper = {
            let sw = sw.clone();
            std::thread::spawn(move || {
                sw.replace(Arc::new(MemDisk::new(4096))).unwrap();
                stx.send(()).unwrap();
            })
        };
        assert!(
            srx.recv_timeout(Duration::from_millis(200)).is_err(),
            "replace returned while a write was inside the old device"
        );
        rtx.send(()).unwrap();
        srx.recv().unwrap();
        assert!(old.done.load(Ordering::SeqCst));
        writer.join().unwrap();
        swapper.join().unwrap();
        let mut b = [9u8; 512];
        sw.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0; 512], "reads go to the new device");
    }

    #[test]
    fn replace_refuses_a_device_of_another_size() {
        let sw = SwitchDev::new(Arc::new(MemDisk::new(4096)));
        assert!(sw.replace(Arc::new(MemDisk::new(8192))).is_err());
        assert_eq!(sw.size(), 4096);
    }
}
