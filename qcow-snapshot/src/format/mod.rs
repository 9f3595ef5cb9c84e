//! qcow2 on-disk structures: the header (v2 and v3), header extensions, L1/L2 and refcount-table
//! entries, refcount-block entries of every width, and the cluster geometry math.
//!
//! This module owns the *wire format only*: it parses and serializes byte buffers and validates
//! them, and never does I/O. Every value read from an image is untrusted: parsing never panics,
//! all size and offset arithmetic is checked, and helpers that size an allocation from on-disk
//! values say which bound they enforce.
//!
//! Modules: `header` (the header and its validation against the file), `geometry` (cluster,
//! subcluster and refcount math), `entries` (L1/L2/refcount-table entries, subcluster bitmaps,
//! compressed descriptors), `refcount` (refcount-block entries), `extensions` (header
//! extensions, feature names); this file holds the constants, feature bits, decode errors and
//! the byte-order and table helpers they share.
//!
//! Locking model: none; everything here is plain data and pure functions.
//!
//! Reference: QEMU `docs/interop/qcow2.txt`. All numbers are big endian.

use std::fmt;

/// `QFI\xfb`.
pub const QCOW_MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header (and of the common prefix of every header).
pub const V2_HEADER_LEN: u32 = 72;
/// Minimum length of a version 3 header.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Header length QEMU writes for new v3 images (with the compression-type byte and padding).
pub const V3_HEADER_LEN: u32 = 112;
/// Byte offset of the compression-type field in a v3 header.
pub const COMPRESSION_TYPE_OFFSET: usize = 104;
/// Smallest supported cluster size, as bits (512 bytes).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest supported cluster size, as bits (2 MiB, QEMU's limit).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Default cluster size, as bits (64 KiB).
pub const DEFAULT_CLUSTER_BITS: u32 = 16;
/// Largest refcount order (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Refcount order of every v2 image and default for new images (16-bit refcounts).
pub const DEFAULT_REFCOUNT_ORDER: u32 = 4;
/// Longest backing file name the format allows.
pub const MAX_BACKING_FILE_NAME: u32 = 1023;
/// Largest L1 table we accept, in bytes (QEMU's limit).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table we accept, in bytes (QEMU's limit).
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// Offset of the `size` field (virtual disk size).
pub const SIZE_OFFSET: usize = 24;
/// Offset of the `l1_size` field.
pub const L1_SIZE_OFFSET: usize = 36;
/// Offset of the `l1_table_offset` field.
pub const L1_TABLE_OFFSET_OFFSET: usize = 40;
/// Offset of the `refcount_table_offset` field (followed by `refcount_table_clusters`).
pub const REFCOUNT_TABLE_OFFSET_OFFSET: usize = 48;
/// Offset of the `incompatible_features` field.
pub const INCOMPATIBLE_FEATURES_OFFSET: usize = 72;
/// Offset of the `autoclear_features` field.
pub const AUTOCLEAR_FEATURES_OFFSET: usize = 88;
/// Smallest cluster size, as bits, of an image with extended L2 entries (16 KiB: QEMU refuses
/// subclusters smaller than 512 bytes).
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS_PER_CLUSTER: u32 = 32;
/// Allocation half of an extended L2 entry's subcluster bitmap (bit x: subcluster x allocated).
pub const L2_BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
/// Zero half of an extended L2 entry's subcluster bitmap (bit 32+x: subcluster x reads as zeros).
pub const L2_BITMAP_ALL_ZERO: u64 = 0xffff_ffff << 32;
/// Size of a compressed-data sector (the unit of the compressed descriptor's length).
pub const COMPRESSED_SECTOR_SIZE: u64 = 512;

/// Incompatible feature bits (header bytes 72..80).
pub mod incompat {
    /// Refcounts may be inconsistent; repair before use.
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata may be corrupt; never write.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest clusters live in an external data file.
    pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    /// `compression_type` is present and non-zero.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// L2 entries are 128 bits with subcluster bitmaps.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this implementation knows the meaning of.
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;
    /// Bits this implementation can open an image with.
    pub const SUPPORTED: u64 = DIRTY | CORRUPT | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Compatible feature bits (header bytes 80..88).
pub mod compat {
    /// Lazy refcount updates may be used.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Auto-clear feature bits (header bytes 88..96).
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a consistent raw image.
    pub const RAW_EXTERNAL_DATA: u64 = 1 << 1;
}

/// Header extension type codes.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_NAME_TABLE: u32 = 0x6803_f857;
    /// Persistent dirty bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
    /// External data file name.
    pub const EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
}

/// Bits 9..56 of an L1 entry: the L2 table's host offset.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry.
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Bits 9..56 of a standard L2 entry: the data cluster's host offset.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a standard L2 entry.
pub const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Bits 9..64 of a refcount-table entry: the refcount block's host offset.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reserved bits of a refcount-table entry.
pub const REFT_RESERVED_MASK: u64 = 0x1ff;
/// L1/L2 bit 63: the table or cluster has refcount exactly one and may be written in place.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 bit 62: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 bit 0 (standard clusters, v3): the cluster reads as zeros.
pub const OFLAG_ZERO: u64 = 1;

/// What is wrong with an on-disk structure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer is shorter than the structure.
    #[error("{what} is truncated: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    /// Not a qcow2 image.
    #[error("not a qcow2 image (bad magic {0:#010x})")]
    BadMagic(u32),
    /// Version other than 2 or 3.
    #[error("unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// cluster_bits outside 9..=21.
    #[error("unsupported cluster_bits {0} (must be 9..=21)")]
    ClusterBits(u32),
    /// Bad header_length.
    #[error("invalid header length {0}")]
    HeaderLength(u32),
    /// refcount_order above 6, or not 4 on v2.
    #[error("invalid refcount order {0}")]
    RefcountOrder(u32),
    /// An offset that must be cluster aligned is not.
    #[error("{what} offset {offset:#x} is not aligned to the cluster size")]
    Misaligned { what: &'static str, offset: u64 },
    /// A table lies (partly) outside the image file or over the header.
    #[error("{what} at {offset:#x} (+{len} bytes) lies outside the image file or over the header")]
    OutOfFile {
        what: &'static str,
        offset: u64,
        len: u64,
    },
    /// The L1 table cannot map the whole virtual disk.
    #[error("L1 table has {l1_size} entries, {needed} needed for the virtual size")]
    L1TooSmall { l1_size: u64, needed: u64 },
    /// A table larger than the implementation limit.
    #[error("{what} is too large ({bytes} bytes, limit {limit})")]
    TooLarge {
        what: &'static str,
        bytes: u64,
        limit: u64,
    },
    /// Arithmetic on on-disk values overflowed.
    #[error("{0} overflows")]
    Overflow(&'static str),
    /// The backing file name is invalid.
    #[error("invalid backing file name: {0}")]
    BackingName(String),
    /// A header extension is malformed.
    #[error("invalid header extension {kind:#010x}: {reason}")]
    Extension { kind: u32, reason: String },
    /// An unknown compression type.
    #[error("unknown compression type {0}")]
    CompressionType(u8),
    /// Extended L2 entries with a cluster size below 16 KiB (subclusters below 512 bytes).
    #[error("extended L2 entries need a cluster size of at least 16 KiB (cluster_bits {0})")]
    SubclusterSize(u32),
    /// Encryption is not supported.
    #[error("encrypted images (crypt_method {0}) are not supported")]
    Encrypted(u32),
}

fn be32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = buf.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    u32::from_be_bytes(b)
}

fn be64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = buf.get(at..at + 8) {
        b.copy_from_slice(s);
    }
    u64::from_be_bytes(b)
}

fn put32(buf: &mut [u8], at: usize, v: u32) {
    if let Some(s) = buf.get_mut(at..at + 4) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

fn put64(buf: &mut [u8], at: usize, v: u64) {
    if let Some(s) = buf.get_mut(at..at + 8) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Reads a big-endian u64 table entry `index` from `buf` (0 past the end).
pub fn table_entry(buf: &[u8], index: usize) -> u64 {
    index.checked_mul(8).map_or(0, |at| be64(buf, at))
}

/// Writes a big-endian u64 table entry `index` into `buf` (ignored past the end).
pub fn set_table_entry(buf: &mut [u8], index: usize, value: u64) {
    if let Some(at) = index.checked_mul(8) {
        put64(buf, at, value);
    }
}

/// Serializes a table of u64 entries to big-endian bytes.
pub fn table_to_bytes(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// Parses big-endian u64 entries (a trailing partial entry is ignored).
pub fn table_from_bytes(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

mod entries;
mod extensions;
mod geometry;
mod header;
mod refcount;
#[cfg(test)]
mod tests;

pub use entries::{
    check_l2_bitmap, l1_entry_offset, reftable_entry_offset, subcluster_mask, subcluster_state,
    CompressedDescriptor, L2Entry, Subcluster,
};
pub use extensions::{
    default_feature_names, parse_extensions, serialize_extensions, FeatureName, HeaderExtension,
    FEATURE_NAME_ENTRY_LEN,
};
pub use geometry::Geometry;
pub use header::{check_table, CompressionType, Header};
pub use refcount::{refcount_get, refcount_set, SetRefcountError};
