//! Cluster, subcluster and refcount geometry derived from the header.

/// Cluster and refcount geometry derived from `cluster_bits` and `refcount_order`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// log2 of the refcount width (0..=6).
    pub refcount_order: u32,
    /// L2 entries are 128 bits: the standard entry plus a subcluster bitmap (32 subclusters per
    /// cluster, each with an "allocated" and a "reads as zeros" bit).
    pub extended_l2: bool,
}

impl Geometry {
    /// Geometry of standard (64-bit) L2 entries.
    pub fn standard(cluster_bits: u32, refcount_order: u32) -> Geometry {
        Geometry {
            cluster_bits,
            refcount_order,
            extended_l2: false,
        }
    }

    /// 64-bit words per L2 entry: 2 with extended L2 entries, else 1.
    pub fn l2_entry_words(&self) -> usize {
        if self.extended_l2 {
            2
        } else {
            1
        }
    }

    /// log2 of the allocation granularity: the subcluster size with extended L2 entries, the
    /// cluster size without.
    pub fn subcluster_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits.saturating_sub(5)
        } else {
            self.cluster_bits
        }
    }

    /// Allocation granularity in bytes (see [`Geometry::subcluster_bits`]).
    pub fn subcluster_size(&self) -> u64 {
        1 << self.subcluster_bits()
    }

    /// Index of the subcluster holding guest offset `off` inside its cluster.
    pub fn subcluster_index(&self, off: u64) -> u32 {
        (self.offset_in_cluster(off) >> self.subcluster_bits()) as u32
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Offset inside a cluster.
    pub fn offset_in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }

    /// Start of the cluster containing `off`.
    pub fn cluster_start(&self, off: u64) -> u64 {
        off & !(self.cluster_size() - 1)
    }

    /// Whether `off` is cluster aligned.
    pub fn is_aligned(&self, off: u64) -> bool {
        self.offset_in_cluster(off) == 0
    }

    /// `off` rounded up to a cluster boundary, `None` on overflow.
    pub fn align_up(&self, off: u64) -> Option<u64> {
        let mask = self.cluster_size() - 1;
        off.checked_add(mask).map(|v| v & !mask)
    }

    /// Number of clusters needed to hold `bytes`.
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }

    /// Entries per L2 table (64 or 128 bits each).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / (8 * self.l2_entry_words() as u64)
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        self.cluster_size() * self.l2_entries()
    }

    /// L1 index of a guest offset.
    pub fn l1_index(&self, guest_off: u64) -> u64 {
        guest_off >> (self.cluster_bits + self.l2_entries().trailing_zeros())
    }

    /// L2 index of a guest offset.
    pub fn l2_index(&self, guest_off: u64) -> usize {
        ((guest_off >> self.cluster_bits) & (self.l2_entries() - 1)) as usize
    }

    /// L1 entries needed to map a virtual disk of `size` bytes, `None` on overflow.
    pub fn l1_entries_for(&self, size: u64) -> Option<u64> {
        let cov = self.l2_coverage();
        Some(size.checked_add(cov - 1)? / cov)
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u64 {
        1 << self.refcount_order
    }

    /// Largest refcount value an entry can hold.
    pub fn refcount_max(&self) -> u64 {
        if self.refcount_order >= 6 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits()) - 1
        }
    }

    /// Entries per refcount block.
    pub fn refcount_block_entries(&self) -> u64 {
        self.cluster_size() * 8 / self.refcount_bits()
    }

    /// Refcount-table index for a host offset.
    pub fn refcount_table_index(&self, host_off: u64) -> u64 {
        (host_off >> self.cluster_bits) / self.refcount_block_entries()
    }

    /// Index inside a refcount block for a host offset.
    pub fn refcount_block_index(&self, host_off: u64) -> usize {
        ((host_off >> self.cluster_bits) % self.refcount_block_entries()) as usize
    }

    /// Host bytes one refcount block covers.
    pub fn refcount_block_coverage(&self) -> u64 {
        self.cluster_size() * self.refcount_block_entries()
    }

    /// Shift of the compressed descriptor's sector count field.
    pub fn compressed_sector_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// Mask of the compressed descriptor's host offset field.
    pub fn compressed_offset_mask(&self) -> u64 {
        (1u64 << self.compressed_sector_shift()) - 1
    }

    /// Mask (after shifting) of the compressed descriptor's additional-sectors field.
    pub fn compressed_sectors_mask(&self) -> u64 {
        (1u64 << (self.cluster_bits - 8)) - 1
    }
}
