//! virtio-blk wire formats (virtio 1.2, section 5.2): request types, status codes, feature bits,
//! the request header, discard/write-zeroes segments and the device configuration space.
//!
//! This module only encodes and decodes bytes; it holds no state and takes no locks. Everything is
//! little-endian on the wire and decoded field by field, so no layout or alignment assumption about
//! guest memory is made.

/// Size in bytes of the unit of the `sector` field of a request and of `capacity`, whatever the
/// logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

/// Request type: read from the device.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write to the device.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: make completed writes durable.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: return the device identifier (serial).
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Request type: return device lifetime (not supported).
pub const VIRTIO_BLK_T_GET_LIFETIME: u32 = 10;
/// Request type: discard ranges.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Request type: write zeroes to ranges.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// Request type: secure erase (not supported).
pub const VIRTIO_BLK_T_SECURE_ERASE: u32 = 14;

/// Request status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Request status: I/O or request error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Request status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the GET_ID answer.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// Flag of a write-zeroes segment: the device may deallocate the range.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Feature: `size_max` is valid.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// Feature: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// Feature: the device is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Feature: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// Feature: FLUSH requests are supported.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// Feature: `topology` is valid.
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
/// Feature: the driver may switch the write cache with the `writeback` config field.
pub const VIRTIO_BLK_F_CONFIG_WCE: u32 = 11;
/// Feature: `num_queues` is valid; several request queues.
pub const VIRTIO_BLK_F_MQ: u32 = 12;
/// Feature: DISCARD requests are supported.
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
/// Feature: WRITE_ZEROES requests are supported.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
/// Transport feature: indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Transport feature: `used_event` / `avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// Transport feature: virtio 1.x device.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// The bit mask of feature number `bit`.
pub const fn feature(bit: u32) -> u64 {
    1u64 << bit
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(src) = b.get(at..at + 4) {
        v.copy_from_slice(src);
    }
    u32::from_le_bytes(v)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(src) = b.get(at..at + 8) {
        v.copy_from_slice(src);
    }
    u64::from_le_bytes(v)
}

/// `struct virtio_blk_outhdr`: the first, driver-readable 16 bytes of every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// One of the `VIRTIO_BLK_T_*` values.
    pub request_type: u32,
    /// Reserved (was `ioprio`).
    pub reserved: u32,
    /// Start of the request in 512-byte units.
    pub sector: u64,
}

impl RequestHeader {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Decodes a header.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        RequestHeader {
            request_type: le_u32(b, 0),
            reserved: le_u32(b, 4),
            sector: le_u64(b, 8),
        }
    }

    /// Encodes a header (used by tests and clients).
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.request_type.to_le_bytes());
        b[4..8].copy_from_slice(&self.reserved.to_le_bytes());
        b[8..16].copy_from_slice(&self.sector.to_le_bytes());
        b
    }
}

/// `struct virtio_blk_discard_write_zeroes`: one range of a DISCARD or WRITE_ZEROES request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardWriteZeroesSegment {
    /// Start of the range in 512-byte units.
    pub sector: u64,
    /// Length of the range in 512-byte units.
    pub num_sectors: u32,
    /// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP` or 0; other bits are reserved.
    pub flags: u32,
}

impl DiscardWriteZeroesSegment {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Decodes a segment.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        DiscardWriteZeroesSegment {
            sector: le_u64(b, 0),
            num_sectors: le_u32(b, 8),
            flags: le_u32(b, 12),
        }
    }

    /// Encodes a segment (used by tests and clients).
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// `struct virtio_blk_config` up to and including the write-zeroes fields.
///
/// Fields not listed (geometry, secure erase, zoned) encode as zeros.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfigSpace {
    /// Device size in 512-byte units.
    pub capacity: u64,
    /// Largest single data descriptor in bytes.
    pub size_max: u32,
    /// Largest number of data descriptors per request.
    pub seg_max: u32,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// log2(physical block size / logical block size).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in logical blocks.
    pub min_io_size: u16,
    /// Optimal sustained I/O size in logical blocks.
    pub opt_io_size: u32,
    /// 1 = write-back cache, 0 = write-through.
    pub writeback: u8,
    /// Number of request queues.
    pub num_queues: u16,
    /// Largest discard range in 512-byte units.
    pub max_discard_sectors: u32,
    /// Largest number of segments of a DISCARD request.
    pub max_discard_seg: u32,
    /// Alignment of discard ranges in 512-byte units.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes range in 512-byte units.
    pub max_write_zeroes_sectors: u32,
    /// Largest number of segments of a WRITE_ZEROES request.
    pub max_write_zeroes_seg: u32,
    /// 1 if the unmap flag of write-zeroes may deallocate.
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfigSpace {
    /// Encoded size (through the padding after `write_zeroes_may_unmap`).
    pub const SIZE: usize = 60;
    /// Offset of the driver-writable `writeback` byte.
    pub const WRITEBACK_OFFSET: usize = 32;

    /// Encodes the configuration space.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16..20: geometry, unused.
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        b[25] = self.alignment_offset;
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[Self::WRITEBACK_OFFSET] = self.writeback;
        // 33: unused0.
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        b
    }

    /// Decodes a configuration space (used by tests and clients).
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        let le_u16 = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        BlkConfigSpace {
            capacity: le_u64(b, 0),
            size_max: le_u32(b, 8),
            seg_max: le_u32(b, 12),
            blk_size: le_u32(b, 20),
            physical_block_exp: b[24],
            alignment_offset: b[25],
            min_io_size: le_u16(26),
            opt_io_size: le_u32(b, 28),
            writeback: b[Self::WRITEBACK_OFFSET],
            num_queues: le_u16(34),
            max_discard_sectors: le_u32(b, 36),
            max_discard_seg: le_u32(b, 40),
            discard_sector_alignment: le_u32(b, 44),
            max_write_zeroes_sectors: le_u32(b, 48),
            max_write_zeroes_seg: le_u32(b, 52),
            write_zeroes_may_unmap: b[56],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_encodes_fields_at_spec_offsets() {
        let cfg = BlkConfigSpace {
            capacity: 0x0102_0304_0506_0708,
            size_max: 0x10,
            seg_max: 0x20,
            blk_size: 4096,
            physical_block_exp: 3,
            alignment_offset: 0,
            min_io_size: 8,
            opt_io_size: 0x30,
            writeback: 1,
            num_queues: 4,
            max_discard_sectors: 0x40,
            max_discard_seg: 0x50,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 0x60,
            max_write_zeroes_seg: 0x70,
            write_zeroes_may_unmap: 1,
        };
        let b = cfg.to_bytes();
        assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[20..24], &4096u32.to_le_bytes());
        assert_eq!(b[24], 3);
        assert_eq!(b[32], 1);
        assert_eq!(&b[34..36], &4u16.to_le_bytes());
        assert_eq!(&b[44..48], &8u32.to_le_bytes());
        assert_eq!(b[56], 1);
        assert_eq!(BlkConfigSpace::from_bytes(&b), cfg);
    }

    #[test]
    fn header_and_segment_round_trip_little_endian() {
        let h = RequestHeader {
            request_type: VIRTIO_BLK_T_OUT,
            reserved: 0,
            sector: 0x1122,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..4], &[1, 0, 0, 0]);
        assert_eq!(RequestHeader::from_bytes(&b), h);
        let s = DiscardWriteZeroesSegment {
            sector: 9,
            num_sectors: 8,
            flags: 1,
        };
        assert_eq!(DiscardWriteZeroesSegment::from_bytes(&s.to_bytes()), s);
    }
}
