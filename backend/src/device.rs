//! The virtio-blk device model shared by every queue of one frontend connection: the static
//! configuration derived from the command line and the disk ([`DeviceConfig`]), and the run-time
//! state the driver can change ([`BlkDevice`]: negotiated features, the write-cache mode).
//!
//! Locking model: `DeviceConfig` is immutable and shared by `Arc`. `BlkDevice` keeps its mutable
//! state in atomics, so queue worker threads read it without locks while the vhost-user message
//! thread updates it (SET_FEATURES, SET_CONFIG, RESET).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use blockdev::BlockDev;
use log::{debug, info, warn};

use crate::cli::{CacheMode, ServeArgs};
use crate::disk::{ServedDisk, WriteCacheControl};
use crate::virtio_blk::*;

/// Largest discard range of one segment, in 512-byte sectors (1 GiB).
pub const DEFAULT_MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Largest write-zeroes range of one segment, in 512-byte sectors (1 GiB).
pub const DEFAULT_MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 21;
/// Largest number of segments of a DISCARD or WRITE_ZEROES request.
pub const DEFAULT_MAX_DISCARD_SEGMENTS: u32 = 16;
/// Largest single data descriptor announced in `size_max`.
pub const DEFAULT_SIZE_MAX: u32 = 4 << 20;
/// Physical block size reported when the logical block size is smaller.
pub const DEFAULT_PHYSICAL_BLOCK_SIZE: u32 = 4096;

/// Why the device could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum ConfigureDeviceError {
    /// The disk does not hold a single logical block.
    #[error("disk of {size} bytes is smaller than one {block}-byte logical block")]
    DiskTooSmall {
        /// Disk size in bytes.
        size: u64,
        /// Logical block size.
        block: u32,
    },
    /// A value that must be a power of two in a range is not.
    #[error("invalid {what}: {value}")]
    Invalid {
        /// The option.
        what: &'static str,
        /// Its value.
        value: u64,
    },
}

/// Static description of the device shown to the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Bytes visible to the guest: the disk size rounded down to the logical block size.
    pub size_bytes: u64,
    /// Logical block size (alignment unit of every request).
    pub logical_block_size: u32,
    /// Physical block size reported through the topology fields.
    pub physical_block_size: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// Maximum virtqueue size.
    pub queue_size: u16,
    /// Largest data descriptor in bytes.
    pub size_max: u32,
    /// Largest number of data descriptors per request.
    pub seg_max: u32,
    /// Write-type requests are refused.
    pub read_only: bool,
    /// GET_ID answer, zero-padded.
    pub serial: [u8; VIRTIO_BLK_ID_BYTES],
    /// Write-cache mode at connection start.
    pub writeback_default: bool,
    /// Largest discard segment in sectors.
    pub max_discard_sectors: u32,
    /// Largest number of discard segments.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes segment in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Largest number of write-zeroes segments.
    pub max_write_zeroes_seg: u32,
    /// Host-side tuning, not shown to the driver: requests of one queue executing at once (1: the
    /// queue thread executes them one by one; above 1: executor threads, see `inflight`).
    pub max_inflight: usize,
    /// Host-side: reads that miss the cache go on a per-queue io_uring (`--aio io_uring`; only
    /// with `max_inflight` above 1, see `uring`).
    pub io_uring: bool,
}

impl DeviceConfig {
    /// A configuration with default limits for a disk of `disk_size` bytes.
    pub fn new(
        disk_size: u64,
        logical_block_size: u32,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, ConfigureDeviceError> {
        if !logical_block_size.is_power_of_two() || !(512..=4096).contains(&logical_block_size) {
            return Err(ConfigureDeviceError::Invalid {
                what: "logical block size",
                value: logical_block_size.into(),
            });
        }
        if num_queues == 0 {
            return Err(ConfigureDeviceError::Invalid {
                what: "number of queues",
                value: 0,
            });
        }
        if !queue_size.is_power_of_two() || queue_size < 4 {
            return Err(ConfigureDeviceError::Invalid {
                what: "queue size",
                value: queue_size.into(),
            });
        }
        let lbs = u64::from(logical_block_size);
        let size_bytes = disk_size - disk_size % lbs;
        if size_bytes == 0 {
            return Err(ConfigureDeviceError::DiskTooSmall {
                size: disk_size,
                block: logical_block_size,
            });
        }
        if size_bytes != disk_size {
            warn!(
                "disk size {disk_size} is not a multiple of the {logical_block_size}-byte block; \
                 the last {} bytes are not visible",
                disk_size - size_bytes
            );
        }
        Ok(DeviceConfig {
            size_bytes,
            logical_block_size,
            physical_block_size: logical_block_size.max(DEFAULT_PHYSICAL_BLOCK_SIZE),
            num_queues,
            queue_size,
            size_max: DEFAULT_SIZE_MAX,
            seg_max: u32::from(queue_size) - 2,
            read_only: false,
            serial: [0; VIRTIO_BLK_ID_BYTES],
            writeback_default: true,
            max_discard_sectors: DEFAULT_MAX_DISCARD_SECTORS,
            max_discard_seg: DEFAULT_MAX_DISCARD_SEGMENTS,
            discard_sector_alignment: logical_block_size >> SECTOR_SHIFT,
            max_write_zeroes_sectors: DEFAULT_MAX_WRITE_ZEROES_SECTORS,
            max_write_zeroes_seg: DEFAULT_MAX_DISCARD_SEGMENTS,
            max_inflight: 1,
            io_uring: true,
        })
    }

    /// The configuration for `snapblk serve` with `args` over `disk`.
    pub fn from_args(args: &ServeArgs, disk: &dyn BlockDev) -> Result<Self, ConfigureDeviceError> {
        let mut cfg = Self::new(
            disk.size(),
            args.logical_block_size,
            args.num_queues,
            args.queue_size,
        )?;
        cfg.read_only = args.readonly || disk.is_read_only();
        cfg.writeback_default = args.cache == CacheMode::Writeback;
        cfg.max_inflight = args.effective_max_inflight();
        cfg.io_uring = args.aio == crate::cli::AioMode::IoUring;
        if let Some(serial) = &args.serial {
            cfg.set_serial(serial.as_bytes());
        }
        Ok(cfg)
    }

    /// Sets the GET_ID answer (truncated to 20 bytes, zero-padded).
    pub fn set_serial(&mut self, serial: &[u8]) {
        self.serial = [0; VIRTIO_BLK_ID_BYTES];
        let n = serial.len().min(VIRTIO_BLK_ID_BYTES);
        self.serial[..n].copy_from_slice(&serial[..n]);
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.size_bytes >> SECTOR_SHIFT
    }

    /// The virtio feature bits the device offers (without the vhost-user protocol bit).
    pub fn features(&self) -> u64 {
        let mut f = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_BLK_F_SIZE_MAX)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE)
            | feature(VIRTIO_BLK_F_TOPOLOGY)
            | feature(VIRTIO_BLK_F_MQ)
            | feature(VIRTIO_BLK_F_FLUSH)
            | feature(VIRTIO_BLK_F_CONFIG_WCE);
        if self.read_only {
            f |= feature(VIRTIO_BLK_F_RO);
        } else {
            f |= feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// The configuration space with the given write-cache mode.
    pub fn config_space(&self, writeback: bool) -> BlkConfigSpace {
        let exp = (self.physical_block_size / self.logical_block_size).trailing_zeros();
        BlkConfigSpace {
            capacity: self.capacity_sectors(),
            size_max: self.size_max,
            seg_max: self.seg_max,
            blk_size: self.logical_block_size,
            physical_block_exp: u8::try_from(exp).unwrap_or(0),
            alignment_offset: 0,
            min_io_size: u16::try_from(1u32 << exp).unwrap_or(1),
            opt_io_size: 0,
            writeback: u8::from(writeback),
            num_queues: self.num_queues,
            max_discard_sectors: self.max_discard_sectors,
            max_discard_seg: self.max_discard_seg,
            discard_sector_alignment: self.discard_sector_alignment,
            max_write_zeroes_sectors: self.max_write_zeroes_sectors,
            max_write_zeroes_seg: self.max_write_zeroes_seg,
            write_zeroes_may_unmap: 1,
        }
    }
}

/// The device state of one frontend connection: the disk, its configuration, the negotiated
/// features and the current write-cache mode.
pub struct BlkDevice {
    disk: Arc<dyn BlockDev>,
    live: Arc<crate::live::Live>,
    cache_control: Option<Arc<dyn WriteCacheControl>>,
    cfg: Arc<DeviceConfig>,
    writeback: AtomicBool,
    /// The `writeback` byte of the config space: the driver's choice (CONFIG_WCE), or the
    /// configured default. It is what the driver reads even while the effective mode is
    /// write-through for lack of a negotiated FLUSH, because frontends such as QEMU read and cache
    /// the config space once, before the driver negotiates features.
    wce_field: AtomicBool,
    acked_features: AtomicU64,
}

impl std::fmt::Debug for BlkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDevice")
            .field("cfg", &self.cfg)
            .field("writeback", &self.writeback())
            .field("acked_features", &self.acked_features())
            .finish()
    }
}

impl BlkDevice {
    /// A device over `disk`, in its default write-cache mode.
    pub fn new(disk: ServedDisk, cfg: Arc<DeviceConfig>) -> Self {
        let dev = BlkDevice {
            disk: disk.dev,
            live: disk.live,
            cache_control: disk.cache_control,
            writeback: AtomicBool::new(cfg.writeback_default),
            wce_field: AtomicBool::new(cfg.writeback_default),
            acked_features: AtomicU64::new(0),
            cfg,
        };
        if let Some(cc) = &dev.cache_control {
            cc.set_writeback(dev.cfg.writeback_default);
        }
        dev
    }

    /// A 1 MiB device of one queue of `queue_size` over `disk` (no cache layer), every feature
    /// acknowledged, executing up to `max_inflight` requests at once: the device of the
    /// backend's own queue tests.
    #[cfg(test)]
    pub(crate) fn for_tests(disk: Arc<dyn BlockDev>, queue_size: u16, max_inflight: usize) -> Self {
        let mut cfg = DeviceConfig::new(1 << 20, 512, 1, queue_size).expect("a valid test config");
        cfg.max_inflight = max_inflight;
        let dev = BlkDevice::new(ServedDisk::plain(disk), Arc::new(cfg));
        dev.set_acked_features(dev.config().features());
        dev
    }

    /// The static configuration.
    pub fn config(&self) -> &DeviceConfig {
        &self.cfg
    }

    /// The disk every request goes to.
    pub fn disk(&self) -> &dyn BlockDev {
        self.disk.as_ref()
    }

    /// The pause gate and statistics every request goes through.
    pub fn live(&self) -> &crate::live::Live {
        &self.live
    }

    /// The current write-cache mode.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Acquire)
    }

    /// Whether the front end must flush after each write-type request: write-through mode and no
    /// cache layer that takes care of it.
    pub fn flush_after_write(&self) -> bool {
        self.cache_control.is_none() && !self.writeback()
    }

    /// Whether a write of `[offset, offset + len)` would complete from memory now (see
    /// [`BlockDev::writes_in_memory`]): never on a read-only device or where the front end
    /// flushes after each write. A hint for scheduling.
    pub fn write_in_memory(&self, offset: u64, len: u64) -> bool {
        !self.cfg.read_only && !self.flush_after_write() && self.disk.writes_in_memory(offset, len)
    }

    /// Switches the write-cache mode. Going to write-through first flushes, so that writes that
    /// completed in write-back mode are durable as well.
    pub fn set_writeback(&self, writeback: bool) {
        let old = self.writeback.swap(writeback, Ordering::AcqRel);
        if old == writeback {
            return;
        }
        info!(
            "write cache switched to {}",
            if writeback {
                "write-back"
            } else {
                "write-through"
            }
        );
        if let Some(cc) = &self.cache_control {
            cc.set_writeback(writeback);
        }
        if !writeback && !self.cfg.read_only {
            if let Err(e) = self.disk.flush() {
                log::error!("flush when switching to write-through failed: {e}");
            }
        }
    }

    /// The features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features.load(Ordering::Acquire)
    }

    /// Whether feature `bit` was negotiated.
    pub fn has_feature(&self, bit: u32) -> bool {
        self.acked_features() & feature(bit) != 0
    }

    /// Records the negotiated features. A driver without FLUSH gets a write-through device; when
    /// FLUSH becomes negotiated (frontends may send a preliminary SET_FEATURES without it), the
    /// default mode applies. A repeated SET_FEATURES that keeps FLUSH keeps the driver's choice.
    pub fn set_acked_features(&self, features: u64) {
        let flush = feature(VIRTIO_BLK_F_FLUSH);
        let old = self.acked_features.swap(features, Ordering::AcqRel);
        if features & flush == 0 {
            debug!("driver did not negotiate FLUSH: write-through");
            self.set_writeback(false);
        } else if old & flush == 0 {
            self.set_writeback(self.wce_field.load(Ordering::Acquire));
        }
    }

    /// Device reset: default write-cache mode, no features.
    pub fn reset(&self) {
        self.acked_features.store(0, Ordering::Release);
        self.wce_field
            .store(self.cfg.writeback_default, Ordering::Release);
        self.set_writeback(self.cfg.writeback_default);
    }

    /// `size` bytes of the configuration space starting at `offset`; bytes past its end read as 0.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self
            .cfg
            .config_space(self.wce_field.load(Ordering::Acquire))
            .to_bytes();
        let size = size.min(vhost::vhost_user::message::VHOST_USER_CONFIG_SIZE) as usize;
        let mut out = vec![0u8; size];
        let start = offset as usize;
        if let Some(src) = space.get(start..) {
            let n = src.len().min(size);
            out[..n].copy_from_slice(&src[..n]);
        }
        out
    }

    /// Applies a driver write to the configuration space. Only `writeback` is writable; writes to
    /// other fields are ignored, as the spec requires of read-only fields.
    pub fn write_config(&self, offset: u32, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            match (offset as usize).checked_add(i) {
                Some(BlkConfigSpace::WRITEBACK_OFFSET) => {
                    self.wce_field.store(*byte != 0, Ordering::Release);
                    self.set_writeback(*byte != 0);
                }
                Some(pos) => debug!("ignoring driver write to read-only config byte {pos}"),
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::MemDisk;
    use std::sync::Mutex;

    struct RecordingCache(Mutex<Vec<bool>>);
    impl WriteCacheControl for RecordingCache {
        fn set_writeback(&self, writeback: bool) {
            self.0.lock().unwrap().push(writeback);
        }
    }

    fn device(cfg: DeviceConfig) -> BlkDevice {
        BlkDevice::new(
            ServedDisk::plain(Arc::new(MemDisk::new(1 << 20))),
            Arc::new(cfg),
        )
    }

    #[test]
    fn capacity_is_rounded_down_to_the_logical_block() {
        let cfg = DeviceConfig::new(10_000, 4096, 1, 256).unwrap();
        assert_eq!(cfg.size_bytes, 8192);
        assert_eq!(cfg.capacity_sectors(), 16);
        assert_eq!(cfg.discard_sector_alignment, 8);
        assert!(DeviceConfig::new(4095, 4096, 1, 256).is_err());
        assert!(DeviceConfig::new(1 << 20, 1000, 1, 256).is_err());
        assert!(DeviceConfig::new(1 << 20, 512, 0, 256).is_err());
    }

    #[test]
    fn read_only_device_offers_ro_and_no_discard() {
        let mut cfg = DeviceConfig::new(1 << 20, 512, 2, 256).unwrap();
        let rw = cfg.features();
        assert_eq!(rw & feature(VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw & feature(VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(rw & feature(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        cfg.read_only = true;
        let ro = cfg.features();
        assert_ne!(ro & feature(VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            ro & (feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES)),
            0
        );
    }

    #[test]
    fn config_space_reports_topology_queues_and_writeback() {
        let mut cfg = DeviceConfig::new(1 << 30, 512, 4, 128).unwrap();
        cfg.writeback_default = false;
        let dev = device(cfg);
        let b = dev.read_config(0, BlkConfigSpace::SIZE as u32);
        let space = BlkConfigSpace::from_bytes(&b.clone().try_into().unwrap());
        assert_eq!(space.capacity, (1 << 30) / 512);
        assert_eq!(space.blk_size, 512);
        assert_eq!(space.physical_block_exp, 3);
        assert_eq!(space.min_io_size, 8);
        assert_eq!(space.seg_max, 126);
        assert_eq!(space.num_queues, 4);
        assert_eq!(space.writeback, 0);
        // Partial reads and reads past the end.
        assert_eq!(dev.read_config(34, 2), 4u16.to_le_bytes().to_vec());
        assert_eq!(dev.read_config(60, 36), vec![0; 36]);
        assert_eq!(dev.read_config(5000, 4), vec![0; 4]);
    }

    #[test]
    fn driver_can_toggle_writeback_but_not_other_fields() {
        let dev = device(DeviceConfig::new(1 << 20, 512, 1, 256).unwrap());
        assert!(dev.writeback());
        dev.write_config(BlkConfigSpace::WRITEBACK_OFFSET as u32, &[0]);
        assert!(!dev.writeback());
        assert!(dev.flush_after_write());
        dev.write_config(0, &[0xff; 8]);
        assert_eq!(
            dev.read_config(0, 8),
            ((1u64 << 20) / 512).to_le_bytes().to_vec()
        );
        dev.write_config(30, &[0, 0, 1, 0]);
        assert!(dev.writeback());
        dev.write_config(u32::MAX, &[0, 0]);
        assert!(dev.writeback());
    }

    #[test]
    fn cache_layer_is_told_the_mode_and_frontend_does_not_flush_for_it() {
        let rec = Arc::new(RecordingCache(Mutex::new(Vec::new())));
        let disk = ServedDisk::with_cache_control(Arc::new(MemDisk::new(1 << 20)), rec.clone());
        let dev = BlkDevice::new(
            disk,
            Arc::new(DeviceConfig::new(1 << 20, 512, 1, 256).unwrap()),
        );
        dev.set_writeback(false);
        assert!(!dev.flush_after_write());
        dev.reset();
        assert_eq!(*rec.0.lock().unwrap(), vec![true, false, true]);
    }

    #[test]
    fn driver_without_flush_feature_gets_write_through() {
        let dev = device(DeviceConfig::new(1 << 20, 512, 1, 256).unwrap());
        dev.set_acked_features(feature(VIRTIO_F_VERSION_1));
        assert!(!dev.writeback());
        dev.reset();
        assert!(dev.writeback());
        dev.set_acked_features(feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_BLK_F_FLUSH));
        assert!(dev.writeback());
    }

    #[test]
    fn config_reports_the_configured_cache_mode_before_flush_is_negotiated() {
        // QEMU reads the config space once, at connect, before the driver negotiates FLUSH. It
        // must see write-back then, or the guest believes the disk has no cache and never sends
        // FLUSH (its fsync would not make anything durable).
        let dev = device(DeviceConfig::new(1 << 20, 512, 1, 256).unwrap());
        dev.set_acked_features(feature(VIRTIO_F_VERSION_1));
        assert!(
            !dev.writeback(),
            "without FLUSH the device is write-through"
        );
        let off = BlkConfigSpace::WRITEBACK_OFFSET as u32;
        assert_eq!(dev.read_config(off, 1), vec![1]);
        // The driver turns the cache off before FLUSH is negotiated: its choice sticks.
        dev.write_config(off, &[0]);
        dev.set_acked_features(feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_BLK_F_FLUSH));
        assert!(!dev.writeback());
        assert_eq!(dev.read_config(off, 1), vec![0]);
    }
}
