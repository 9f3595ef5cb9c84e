//! L1, L2 (standard and extended, with subcluster bitmaps) and refcount-table entries, and
//! compressed-cluster descriptors.

use super::*;

/// A compressed cluster's location in the host file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host byte offset of the compressed data (not aligned).
    pub host_offset: u64,
    /// Number of 512-byte sectors the data spans, counting the one holding `host_offset`.
    pub sectors: u64,
}

impl CompressedDescriptor {
    /// Bytes to read: from `host_offset` to the end of the last sector.
    pub fn byte_len(&self) -> u64 {
        self.sectors * COMPRESSED_SECTOR_SIZE - (self.host_offset % COMPRESSED_SECTOR_SIZE)
    }

    /// Decodes a compressed L2 entry (bit 62 set).
    pub fn decode(raw: u64, g: &Geometry) -> CompressedDescriptor {
        let host_offset = raw & g.compressed_offset_mask();
        let extra = (raw >> g.compressed_sector_shift()) & g.compressed_sectors_mask();
        CompressedDescriptor {
            host_offset,
            sectors: extra + 1,
        }
    }

    /// Encodes a descriptor for `compressed_len` bytes at `host_offset`; `None` if it does not
    /// fit the field widths.
    pub fn encode(host_offset: u64, compressed_len: u64, g: &Geometry) -> Option<u64> {
        if compressed_len == 0 || host_offset > g.compressed_offset_mask() {
            return None;
        }
        let last = host_offset.checked_add(compressed_len - 1)?;
        let extra = (last / COMPRESSED_SECTOR_SIZE) - (host_offset / COMPRESSED_SECTOR_SIZE);
        if extra > g.compressed_sectors_mask() {
            return None;
        }
        Some(OFLAG_COMPRESSED | (extra << g.compressed_sector_shift()) | host_offset)
    }

    /// The host clusters this compressed data touches (first, last), by cluster start offset.
    pub fn host_clusters(&self, g: &Geometry) -> (u64, u64) {
        let last = self
            .host_offset
            .saturating_add(self.byte_len().saturating_sub(1));
        (g.cluster_start(self.host_offset), g.cluster_start(last))
    }
}

/// What a standard or compressed L2 entry says about a guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated: read from the backing file (or zeros).
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster still owned by the entry, if any.
    Zero { host: Option<u64> },
    /// Data at `host`; `copied` means refcount is exactly one (writable in place).
    Normal { host: u64, copied: bool },
    /// Compressed data.
    Compressed(CompressedDescriptor),
}

impl L2Entry {
    /// Decodes a raw L2 entry. Fails only for an allocated, misaligned host offset.
    pub fn decode(raw: u64, g: &Geometry) -> Result<L2Entry, DecodeError> {
        if raw & OFLAG_COMPRESSED != 0 {
            return Ok(L2Entry::Compressed(CompressedDescriptor::decode(raw, g)));
        }
        let host = raw & L2E_OFFSET_MASK;
        if host != 0 && !g.is_aligned(host) {
            return Err(DecodeError::Misaligned {
                what: "data cluster",
                offset: host,
            });
        }
        // With extended L2 entries bit 0 is reserved: zeros are in the subcluster bitmap.
        if raw & OFLAG_ZERO != 0 && !g.extended_l2 {
            return Ok(L2Entry::Zero {
                host: (host != 0).then_some(host),
            });
        }
        if host == 0 {
            return Ok(L2Entry::Unallocated);
        }
        Ok(L2Entry::Normal {
            host,
            copied: raw & OFLAG_COPIED != 0,
        })
    }

    /// Encodes this entry.
    pub fn encode(&self, g: &Geometry) -> u64 {
        match *self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero { host: None } => OFLAG_ZERO,
            L2Entry::Zero { host: Some(h) } => (h & L2E_OFFSET_MASK) | OFLAG_ZERO | OFLAG_COPIED,
            L2Entry::Normal { host, copied } => {
                (host & L2E_OFFSET_MASK) | if copied { OFLAG_COPIED } else { 0 }
            }
            L2Entry::Compressed(d) => {
                CompressedDescriptor::encode(d.host_offset, d.byte_len(), g).unwrap_or(0)
            }
        }
    }
}

/// What one subcluster of a standard cluster with an extended L2 entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subcluster {
    /// Allocated: the data is at the same offset inside the entry's host cluster.
    Data,
    /// Reads as zeros.
    Zero,
    /// Not allocated: read from the backing file (or zeros).
    Unallocated,
}

/// The state of subcluster `index` (0..32) per a bitmap [`check_l2_bitmap`] accepted.
pub fn subcluster_state(bitmap: u64, index: u32) -> Subcluster {
    if bitmap & (1u64 << (32 + index)) != 0 {
        Subcluster::Zero
    } else if bitmap & (1u64 << index) != 0 {
        Subcluster::Data
    } else {
        Subcluster::Unallocated
    }
}

/// Allocation-half mask of subclusters `first..=last` (shift left by 32 for the zero half).
pub fn subcluster_mask(first: u32, last: u32) -> u64 {
    let n = last.saturating_sub(first) + 1;
    let ones = if n >= 32 {
        L2_BITMAP_ALL_ALLOC
    } else {
        (1u64 << n) - 1
    };
    (ones << first) & L2_BITMAP_ALL_ALLOC
}

/// Checks an extended L2 entry's subcluster bitmap against its entry, with the rules (and the
/// words) of `qemu-img check`: a compressed cluster has no bitmap, an unallocated cluster
/// allocates no subcluster, and no subcluster is both allocated and zero.
pub fn check_l2_bitmap(e: &L2Entry, bitmap: u64) -> Result<(), &'static str> {
    match e {
        L2Entry::Compressed(_) if bitmap != 0 => {
            Err("compressed cluster with non-zero subcluster allocation bitmap")
        }
        L2Entry::Normal { .. } | L2Entry::Zero { host: Some(_) }
            if (bitmap >> 32) & bitmap != 0 =>
        {
            Err("allocated cluster has corrupted subcluster allocation bitmap")
        }
        L2Entry::Unallocated | L2Entry::Zero { host: None }
            if bitmap & L2_BITMAP_ALL_ALLOC != 0 =>
        {
            Err("unallocated cluster has non-zero subcluster allocation map")
        }
        _ => Ok(()),
    }
}

/// Host offset of the L2 table an L1 entry points to (0 = none).
pub fn l1_entry_offset(raw: u64) -> u64 {
    raw & L1E_OFFSET_MASK
}

/// Host offset of the refcount block a refcount-table entry points to (0 = none).
pub fn reftable_entry_offset(raw: u64) -> u64 {
    raw & REFT_OFFSET_MASK
}
