// FORMAT-READY
//! qcow2 on-disk structures: the header (v2 and v3), header extensions, L1/L2 and refcount-table
//! entries, refcount-block entries of every width, and the cluster geometry math.
//!
//! This module owns the *wire format only*: it parses and serializes byte buffers and validates
//! them, and never does I/O. Every value read from an image is untrusted: parsing never panics,
//! all size and offset arithmetic is checked, and helpers that size an allocation from on-disk
//! values say which bound they enforce.
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

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate (no zlib header), the default.
    #[default]
    Zlib,
    /// Zstandard frames.
    Zstd,
}

impl CompressionType {
    /// The header byte value.
    pub fn to_byte(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }

    /// Parses the header byte value.
    pub fn from_byte(b: u8) -> Result<Self, DecodeError> {
        match b {
            0 => Ok(CompressionType::Zlib),
            1 => Ok(CompressionType::Zstd),
            other => Err(DecodeError::CompressionType(other)),
        }
    }
}

impl fmt::Display for CompressionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        })
    }
}

/// The fixed qcow2 header (v2 or v3), exactly as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is stored, 0 for none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// v3: incompatible feature bits (see [`incompat`]).
    pub incompatible_features: u64,
    /// v3: compatible feature bits (see [`compat`]).
    pub compatible_features: u64,
    /// v3: auto-clear feature bits (see [`autoclear`]).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 on v2).
    pub refcount_order: u32,
    /// Header length in bytes (72 on v2).
    pub header_length: u32,
    /// Raw compression-type byte (0 when absent).
    pub compression_type: u8,
    /// Header bytes after the compression-type byte up to `header_length`, preserved verbatim.
    pub unknown_fields: Vec<u8>,
}

impl Header {
    /// A fresh v3 header with QEMU's default layout fields zeroed; the caller fills the tables.
    pub fn new_v3(size: u64, cluster_bits: u32, refcount_order: u32) -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order,
            header_length: V3_HEADER_LEN,
            compression_type: 0,
            unknown_fields: vec![0; (V3_HEADER_LEN as usize) - COMPRESSION_TYPE_OFFSET - 1],
        }
    }

    /// Parses the header at the start of `buf` (normally the first cluster). Only the layout is
    /// checked here; call [`Header::validate`] before trusting any table offset or size.
    pub fn parse(buf: &[u8]) -> Result<Header, DecodeError> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(DecodeError::Truncated {
                what: "header",
                need: V2_HEADER_LEN as usize,
                have: buf.len(),
            });
        }
        let magic = be32(buf, 0);
        if magic != QCOW_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits: be32(buf, 20),
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: DEFAULT_REFCOUNT_ORDER,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            unknown_fields: Vec::new(),
        };
        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LEN as usize {
                return Err(DecodeError::Truncated {
                    what: "v3 header",
                    need: V3_MIN_HEADER_LEN as usize,
                    have: buf.len(),
                });
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            let hl = h.header_length as usize;
            if hl < V3_MIN_HEADER_LEN as usize || !hl.is_multiple_of(8) {
                return Err(DecodeError::HeaderLength(h.header_length));
            }
            if buf.len() < hl {
                return Err(DecodeError::Truncated {
                    what: "v3 header",
                    need: hl,
                    have: buf.len(),
                });
            }
            if hl > COMPRESSION_TYPE_OFFSET {
                h.compression_type = buf[COMPRESSION_TYPE_OFFSET];
                h.unknown_fields = buf[COMPRESSION_TYPE_OFFSET + 1..hl].to_vec();
            }
        }
        Ok(h)
    }

    /// Serializes the header: exactly `header_length` bytes (72 on v2).
    pub fn serialize(&self) -> Vec<u8> {
        let len = if self.version >= 3 {
            (self.header_length as usize).max(V3_MIN_HEADER_LEN as usize)
        } else {
            V2_HEADER_LEN as usize
        };
        let mut b = vec![0u8; len];
        put32(&mut b, 0, QCOW_MAGIC);
        put32(&mut b, 4, self.version);
        put64(&mut b, 8, self.backing_file_offset);
        put32(&mut b, 16, self.backing_file_size);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version >= 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, len as u32);
            if len > COMPRESSION_TYPE_OFFSET {
                b[COMPRESSION_TYPE_OFFSET] = self.compression_type;
                let tail = &mut b[COMPRESSION_TYPE_OFFSET + 1..];
                let n = tail.len().min(self.unknown_fields.len());
                tail[..n].copy_from_slice(&self.unknown_fields[..n]);
            }
        }
        b
    }

    /// The cluster geometry (valid only after [`Header::validate`] succeeded).
    pub fn geometry(&self) -> Geometry {
        Geometry {
            cluster_bits: self.cluster_bits,
            refcount_order: self.refcount_order,
            extended_l2: self.has_extended_l2(),
        }
    }

    /// Whether L2 entries are 128 bits with subcluster bitmaps (v3 incompatible bit 4).
    pub fn has_extended_l2(&self) -> bool {
        self.version >= 3 && self.incompatible_features & incompat::EXTENDED_L2 != 0
    }

    /// The compression type, honouring the incompatible bit.
    pub fn compression(&self) -> Result<CompressionType, DecodeError> {
        let t = CompressionType::from_byte(self.compression_type)?;
        let bit = self.incompatible_features & incompat::COMPRESSION_TYPE != 0;
        match (t, bit) {
            (CompressionType::Zlib, false) | (CompressionType::Zstd, true) => Ok(t),
            _ => Err(DecodeError::CompressionType(self.compression_type)),
        }
    }

    /// Where header extensions start.
    pub fn extensions_start(&self) -> u64 {
        u64::from(self.header_length)
    }

    /// Where header extensions end: the backing file name, or the end of the first cluster.
    pub fn extensions_end(&self) -> u64 {
        let cs = 1u64 << self.cluster_bits.min(MAX_CLUSTER_BITS);
        if self.backing_file_offset != 0 {
            self.backing_file_offset.min(cs)
        } else {
            cs
        }
    }

    /// Size in bytes of the active L1 table. Refuses a table above [`MAX_L1_BYTES`] (reported
    /// as `what`) or with too few entries to map the virtual size. Call only once
    /// `cluster_bits` is known to be in range.
    pub fn l1_table_bytes(&self, what: &'static str) -> Result<u64, DecodeError> {
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(DecodeError::TooLarge {
                what,
                bytes: l1_bytes,
                limit: MAX_L1_BYTES,
            });
        }
        let needed = self
            .geometry()
            .l1_entries_for(self.size)
            .ok_or(DecodeError::Overflow("virtual size"))?;
        if u64::from(self.l1_size) < needed {
            return Err(DecodeError::L1TooSmall {
                l1_size: u64::from(self.l1_size),
                needed,
            });
        }
        Ok(l1_bytes)
    }

    /// Size in bytes of the refcount table, refused above [`MAX_REFCOUNT_TABLE_BYTES`]. Call
    /// only once `cluster_bits` is known to be in range.
    pub fn refcount_table_bytes(&self) -> Result<u64, DecodeError> {
        let rt_bytes = u64::from(self.refcount_table_clusters)
            .checked_mul(self.geometry().cluster_size())
            .ok_or(DecodeError::Overflow("refcount table size"))?;
        if rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(DecodeError::TooLarge {
                what: "refcount table",
                bytes: rt_bytes,
                limit: MAX_REFCOUNT_TABLE_BYTES,
            });
        }
        Ok(rt_bytes)
    }

    /// Checks every field against the format rules and implementation limits. `file_len` is
    /// the image file's length, used to check that tables lie inside it.
    pub fn validate(&self, file_len: u64) -> Result<(), DecodeError> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(DecodeError::ClusterBits(self.cluster_bits));
        }
        let g = self.geometry();
        let cs = g.cluster_size();
        if g.extended_l2 && self.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(DecodeError::SubclusterSize(self.cluster_bits));
        }
        if self.version == 2 {
            if self.refcount_order != DEFAULT_REFCOUNT_ORDER {
                return Err(DecodeError::RefcountOrder(self.refcount_order));
            }
        } else {
            if self.refcount_order > MAX_REFCOUNT_ORDER {
                return Err(DecodeError::RefcountOrder(self.refcount_order));
            }
            if u64::from(self.header_length) > cs
                || self.header_length < V3_MIN_HEADER_LEN
                || !self.header_length.is_multiple_of(8)
            {
                return Err(DecodeError::HeaderLength(self.header_length));
            }
        }
        if self.crypt_method != 0 {
            return Err(DecodeError::Encrypted(self.crypt_method));
        }
        self.compression()?;
        if self.backing_file_offset != 0 {
            if self.backing_file_size > MAX_BACKING_FILE_NAME || self.backing_file_size == 0 {
                return Err(DecodeError::BackingName(format!(
                    "length {} out of range 1..={MAX_BACKING_FILE_NAME}",
                    self.backing_file_size
                )));
            }
            let end = self
                .backing_file_offset
                .checked_add(u64::from(self.backing_file_size))
                .ok_or(DecodeError::Overflow("backing file name offset"))?;
            if self.backing_file_offset < u64::from(self.header_length) || end > cs {
                return Err(DecodeError::BackingName(format!(
                    "name at {:#x} (+{}) is not inside the header cluster",
                    self.backing_file_offset, self.backing_file_size
                )));
            }
        }
        // L1 table.
        let l1_bytes = self.l1_table_bytes("L1 table")?;
        if self.l1_size > 0 {
            check_table("L1 table", self.l1_table_offset, l1_bytes, cs, file_len)?;
        }
        // Refcount table.
        let rt_bytes = self.refcount_table_bytes()?;
        if rt_bytes == 0 {
            return Err(DecodeError::OutOfFile {
                what: "refcount table",
                offset: self.refcount_table_offset,
                len: 0,
            });
        }
        check_table(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
        )?;
        if self.nb_snapshots > 0 {
            // Each entry is at least 40 bytes; only the start is checked here.
            let min = u64::from(self.nb_snapshots) * 40;
            check_table("snapshot table", self.snapshots_offset, min, cs, file_len)?;
        }
        Ok(())
    }
}

/// Checks that a table is cluster aligned, after the header cluster and inside the file.
pub fn check_table(
    what: &'static str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), DecodeError> {
    if !offset.is_multiple_of(cluster_size) {
        return Err(DecodeError::Misaligned { what, offset });
    }
    let end = offset.checked_add(len).ok_or(DecodeError::Overflow(what))?;
    if offset < cluster_size || end > file_len {
        return Err(DecodeError::OutOfFile { what, offset, len });
    }
    Ok(())
}

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

/// Reads refcount entry `index` of a refcount block of width `1 << order` bits.
/// Returns `None` if the index is outside the buffer or the order is invalid.
pub fn refcount_get(block: &[u8], order: u32, index: u64) -> Option<u64> {
    if order > MAX_REFCOUNT_ORDER {
        return None;
    }
    let bits = 1u64 << order;
    let bit = index.checked_mul(bits)?;
    let byte = usize::try_from(bit / 8).ok()?;
    if bits < 8 {
        let b = *block.get(byte)?;
        let shift = (bit % 8) as u32;
        let mask = ((1u16 << bits) - 1) as u8;
        Some(u64::from((b >> shift) & mask))
    } else {
        let n = (bits / 8) as usize;
        let s = block.get(byte..byte.checked_add(n)?)?;
        Some(s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }
}

/// A refcount value does not fit the entry width, or the index is outside the block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot store refcount {value} at index {index} with refcount order {order}")]
pub struct SetRefcountError {
    /// The value that was to be stored.
    pub value: u64,
    /// Entry index.
    pub index: u64,
    /// Refcount order.
    pub order: u32,
}

/// Stores refcount entry `index` in a refcount block of width `1 << order` bits.
pub fn refcount_set(
    block: &mut [u8],
    order: u32,
    index: u64,
    value: u64,
) -> Result<(), SetRefcountError> {
    let err = SetRefcountError {
        value,
        index,
        order,
    };
    if order > MAX_REFCOUNT_ORDER {
        return Err(err);
    }
    let bits = 1u64 << order;
    if bits < 64 && value >> bits != 0 {
        return Err(err);
    }
    let bit = index.checked_mul(bits).ok_or(err.clone())?;
    let byte = usize::try_from(bit / 8).map_err(|_| err.clone())?;
    if bits < 8 {
        let b = block.get_mut(byte).ok_or(err)?;
        let shift = (bit % 8) as u32;
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        *b = (*b & !mask) | (((value as u8) << shift) & mask);
    } else {
        let n = (bits / 8) as usize;
        let end = byte.checked_add(n).ok_or(err.clone())?;
        let s = block.get_mut(byte..end).ok_or(err)?;
        let bytes = value.to_be_bytes();
        s.copy_from_slice(&bytes[8 - n..]);
    }
    Ok(())
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number 0..=63.
    pub bit: u8,
    /// Name (at most 46 bytes).
    pub name: String,
}

/// Size of one feature-name-table entry.
pub const FEATURE_NAME_ENTRY_LEN: usize = 48;

/// The feature name table QEMU writes into new images.
pub fn default_feature_names() -> Vec<FeatureName> {
    let f = |kind: u8, bit: u8, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    };
    vec![
        f(0, 0, "dirty bit"),
        f(0, 1, "corrupt bit"),
        f(0, 2, "external data file"),
        f(0, 3, "compression type"),
        f(0, 4, "extended L2 entries"),
        f(1, 0, "lazy refcounts"),
        f(2, 0, "bitmaps"),
        f(2, 1, "raw external data"),
    ]
}

/// A header extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderExtension {
    /// Backing file format name (e.g. "raw", "qcow2").
    BackingFormat(String),
    /// Names of feature bits.
    FeatureNames(Vec<FeatureName>),
    /// Persistent bitmaps (refused for writing; kept verbatim).
    Bitmaps(Vec<u8>),
    /// Full disk encryption header pointer (refused; kept verbatim).
    FullDiskEncryption(Vec<u8>),
    /// External data file name (refused).
    ExternalDataFile(String),
    /// Any other extension, preserved verbatim.
    Unknown { kind: u32, data: Vec<u8> },
}

impl HeaderExtension {
    /// The extension type code.
    pub fn kind(&self) -> u32 {
        match self {
            HeaderExtension::BackingFormat(_) => ext::BACKING_FORMAT,
            HeaderExtension::FeatureNames(_) => ext::FEATURE_NAME_TABLE,
            HeaderExtension::Bitmaps(_) => ext::BITMAPS,
            HeaderExtension::FullDiskEncryption(_) => ext::FULL_DISK_ENCRYPTION,
            HeaderExtension::ExternalDataFile(_) => ext::EXTERNAL_DATA_FILE,
            HeaderExtension::Unknown { kind, .. } => *kind,
        }
    }

    fn data(&self) -> Vec<u8> {
        match self {
            HeaderExtension::BackingFormat(s) | HeaderExtension::ExternalDataFile(s) => {
                s.as_bytes().to_vec()
            }
            HeaderExtension::FeatureNames(v) => {
                let mut out = Vec::with_capacity(v.len() * FEATURE_NAME_ENTRY_LEN);
                for f in v {
                    let mut e = [0u8; FEATURE_NAME_ENTRY_LEN];
                    e[0] = f.kind;
                    e[1] = f.bit;
                    let n = f.name.len().min(FEATURE_NAME_ENTRY_LEN - 2);
                    e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                    out.extend_from_slice(&e);
                }
                out
            }
            HeaderExtension::Bitmaps(d) | HeaderExtension::FullDiskEncryption(d) => d.clone(),
            HeaderExtension::Unknown { data, .. } => data.clone(),
        }
    }
}

fn ext_string(kind: u32, data: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(data.to_vec()).map_err(|_| DecodeError::Extension {
        kind,
        reason: "string is not UTF-8".into(),
    })
}

/// Parses the header extension area `area` (the bytes from `header_length` to
/// [`Header::extensions_end`]). Stops at the end marker or the end of the area.
pub fn parse_extensions(area: &[u8]) -> Result<Vec<HeaderExtension>, DecodeError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < area.len() {
        if area.len() - pos < 8 {
            return Err(DecodeError::Extension {
                kind: 0,
                reason: "truncated extension header".into(),
            });
        }
        let kind = be32(area, pos);
        let len = be32(area, pos + 4) as usize;
        pos += 8;
        if kind == ext::END {
            break;
        }
        if len > area.len() - pos {
            return Err(DecodeError::Extension {
                kind,
                reason: format!("length {len} runs past the header area"),
            });
        }
        let data = &area[pos..pos + len];
        let e = match kind {
            ext::BACKING_FORMAT => HeaderExtension::BackingFormat(ext_string(kind, data)?),
            ext::EXTERNAL_DATA_FILE => HeaderExtension::ExternalDataFile(ext_string(kind, data)?),
            ext::FEATURE_NAME_TABLE => HeaderExtension::FeatureNames(
                data.chunks_exact(FEATURE_NAME_ENTRY_LEN)
                    .map(|c| {
                        let name = &c[2..];
                        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                        FeatureName {
                            kind: c[0],
                            bit: c[1],
                            name: String::from_utf8_lossy(&name[..end]).into_owned(),
                        }
                    })
                    .collect(),
            ),
            ext::BITMAPS => HeaderExtension::Bitmaps(data.to_vec()),
            ext::FULL_DISK_ENCRYPTION => HeaderExtension::FullDiskEncryption(data.to_vec()),
            _ => HeaderExtension::Unknown {
                kind,
                data: data.to_vec(),
            },
        };
        if out.iter().any(|o: &HeaderExtension| o.kind() == kind) {
            return Err(DecodeError::Extension {
                kind,
                reason: "appears twice".into(),
            });
        }
        out.push(e);
        pos = pos.saturating_add(len.next_multiple_of(8));
    }
    Ok(out)
}

/// Serializes extensions followed by the end marker.
pub fn serialize_extensions(exts: &[HeaderExtension]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in exts {
        let data = e.data();
        out.extend_from_slice(&e.kind().to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(&data);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out.extend_from_slice(&[0u8; 8]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_v3() -> Header {
        let mut h = Header::new_v3(1 << 30, 16, 4);
        h.l1_size = 2;
        h.l1_table_offset = 3 << 16;
        h.refcount_table_offset = 1 << 16;
        h.refcount_table_clusters = 1;
        h
    }

    #[test]
    fn v3_header_round_trips_through_bytes() {
        let mut h = sample_v3();
        h.incompatible_features = incompat::DIRTY;
        h.compatible_features = compat::LAZY_REFCOUNTS;
        h.autoclear_features = autoclear::BITMAPS;
        h.compression_type = 1;
        h.incompatible_features |= incompat::COMPRESSION_TYPE;
        let b = h.serialize();
        assert_eq!(b.len(), 112);
        assert_eq!(&b[..4], b"QFI\xfb");
        assert_eq!(b[COMPRESSION_TYPE_OFFSET], 1);
        let p = Header::parse(&b).unwrap();
        assert_eq!(p, h);
        assert_eq!(p.compression().unwrap(), CompressionType::Zstd);
        p.validate(4 << 16).unwrap();
    }

    #[test]
    fn v2_header_round_trips_and_assumes_refcount_order_4() {
        let mut h = sample_v3();
        h.version = 2;
        h.header_length = 72;
        h.unknown_fields.clear();
        let b = h.serialize();
        assert_eq!(b.len(), 72);
        let p = Header::parse(&b).unwrap();
        assert_eq!(p.refcount_order, 4);
        assert_eq!(p.header_length, 72);
        assert_eq!(p.version, 2);
        p.validate(4 << 16).unwrap();
    }

    #[test]
    fn unknown_header_fields_are_preserved() {
        let mut h = sample_v3();
        h.header_length = 128;
        h.unknown_fields = (0..23).collect();
        let p = Header::parse(&h.serialize()).unwrap();
        assert_eq!(p.unknown_fields, h.unknown_fields);
    }

    #[test]
    fn header_parse_rejects_bad_magic_version_and_truncation() {
        let b = sample_v3().serialize();
        let mut bad = b.clone();
        bad[0] = 0;
        assert!(matches!(Header::parse(&bad), Err(DecodeError::BadMagic(_))));
        let mut bad = b.clone();
        bad[7] = 4;
        assert!(matches!(
            Header::parse(&bad),
            Err(DecodeError::UnsupportedVersion(4))
        ));
        assert!(matches!(
            Header::parse(&b[..50]),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            Header::parse(&b[..100]),
            Err(DecodeError::Truncated { .. })
        ));
        let mut bad = b;
        put32(&mut bad, 100, 106);
        assert!(matches!(
            Header::parse(&bad),
            Err(DecodeError::HeaderLength(106))
        ));
    }

    #[test]
    fn validate_rejects_hostile_fields() {
        let ok = sample_v3();
        let file = 4u64 << 16;
        ok.validate(file).unwrap();
        let mut h = ok.clone();
        h.cluster_bits = 8;
        assert!(matches!(h.validate(file), Err(DecodeError::ClusterBits(8))));
        h.cluster_bits = 22;
        assert!(matches!(
            h.validate(file),
            Err(DecodeError::ClusterBits(22))
        ));
        let mut h = ok.clone();
        h.refcount_order = 7;
        assert!(matches!(
            h.validate(file),
            Err(DecodeError::RefcountOrder(7))
        ));
        let mut h = ok.clone();
        h.l1_table_offset += 512;
        assert!(matches!(
            h.validate(file),
            Err(DecodeError::Misaligned { .. })
        ));
        let mut h = ok.clone();
        h.l1_table_offset = 0;
        assert!(matches!(
            h.validate(file),
            Err(DecodeError::OutOfFile { .. })
        ));
        let mut h = ok.clone();
        h.l1_table_offset = !0xffff;
        assert!(matches!(
            h.validate(file),
            Err(DecodeError::Overflow(_)) | Err(DecodeError::OutOfFile { .. })
        ));
        let mut h = ok.clone();
        h.size = u64::MAX;
        assert!(h.validate(file).is_err());
        let mut h = ok.clone();
        h.size = 1 << 40;
        assert!(matches!(
            h.validate(file),
            Err(DecodeError::L1TooSmall { .. })
        ));
        let mut h = ok.clone();
        h.l1_size = u32::MAX;
        assert!(matches!(
            h.validate(file),
            Err(DecodeError::TooLarge { .. })
        ));
        let mut h = ok.clone();
        h.refcount_table_clusters = u32::MAX;
        assert!(matches!(
            h.validate(file),
            Err(DecodeError::TooLarge { .. })
        ));
        let mut h = ok.clone();
        h.refcount_table_clusters = 0;
        assert!(h.validate(file).is_err());
        let mut h = ok.clone();
        h.backing_file_offset = 200;
        h.backing_file_size = 2000;
        assert!(matches!(h.validate(file), Err(DecodeError::BackingName(_))));
        let mut h = ok.clone();
        h.crypt_method = 2;
        assert!(matches!(h.validate(file), Err(DecodeError::Encrypted(2))));
        let mut h = ok.clone();
        h.compression_type = 1;
        assert!(matches!(
            h.validate(file),
            Err(DecodeError::CompressionType(1))
        ));
        let mut h = ok;
        h.header_length = 1 << 17;
        assert!(h.validate(file).is_err());
    }

    #[test]
    fn geometry_math_matches_spec_examples() {
        let g = Geometry::standard(16, 4);
        assert_eq!(g.cluster_size(), 65536);
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_coverage(), 512 << 20);
        assert_eq!(g.l1_index(512 << 20), 1);
        assert_eq!(g.l2_index((512 << 20) + 3 * 65536 + 7), 3);
        assert_eq!(g.l1_entries_for(1 << 30), Some(2));
        assert_eq!(g.l1_entries_for(0), Some(0));
        assert_eq!(g.l1_entries_for(u64::MAX), None);
        assert_eq!(g.refcount_block_entries(), 32768);
        assert_eq!(g.refcount_table_index(32768 << 16), 1);
        assert_eq!(g.refcount_block_index((32769 << 16) + 5), 1);
        assert_eq!(g.align_up(1), Some(65536));
        assert_eq!(g.align_up(u64::MAX), None);
        let small = Geometry::standard(9, 6);
        assert_eq!(small.l2_entries(), 64);
        assert_eq!(small.refcount_block_entries(), 64);
        assert_eq!(small.refcount_max(), u64::MAX);
        assert_eq!(Geometry::standard(9, 0).refcount_max(), 1);
    }

    #[test]
    fn extended_l2_geometry_halves_the_entries_and_splits_clusters_in_32() {
        let g = Geometry {
            extended_l2: true,
            ..Geometry::standard(16, 4)
        };
        assert_eq!(g.l2_entry_words(), 2);
        assert_eq!(g.l2_entries(), 4096);
        assert_eq!(g.l2_coverage(), 256 << 20);
        assert_eq!(g.l1_index(256 << 20), 1);
        assert_eq!(g.l2_index((256 << 20) + 5 * 65536), 5);
        assert_eq!(g.subcluster_size(), 2048);
        assert_eq!(g.subcluster_index(65536 + 4095), 1);
        assert_eq!(subcluster_mask(0, 31), L2_BITMAP_ALL_ALLOC);
        assert_eq!(subcluster_mask(3, 4), 0b11000);
        assert_eq!(subcluster_state(0b10 | (1 << 35), 1), Subcluster::Data);
        assert_eq!(subcluster_state(0b10 | (1 << 35), 3), Subcluster::Zero);
        assert_eq!(subcluster_state(0b10, 2), Subcluster::Unallocated);
        // Bit 0 is reserved with extended L2 entries: never a zero cluster.
        assert_eq!(
            L2Entry::decode(OFLAG_COPIED | 0x30000 | 1, &g).unwrap(),
            L2Entry::Normal {
                host: 0x30000,
                copied: true
            }
        );
        let normal = L2Entry::Normal {
            host: 0x30000,
            copied: true,
        };
        assert!(check_l2_bitmap(&normal, 0x3 | (0x4 << 32)).is_ok());
        assert!(check_l2_bitmap(&normal, 0x3 | (0x2 << 32)).is_err());
        assert!(check_l2_bitmap(&L2Entry::Unallocated, L2_BITMAP_ALL_ZERO).is_ok());
        assert!(check_l2_bitmap(&L2Entry::Unallocated, 1).is_err());
        let d = CompressedDescriptor {
            host_offset: 0x30000,
            sectors: 1,
        };
        assert!(check_l2_bitmap(&L2Entry::Compressed(d), 1 << 40).is_err());
        // QEMU's limit: subclusters of at least 512 bytes.
        let mut h = Header::new_v3(1 << 20, 13, 4);
        h.incompatible_features |= incompat::EXTENDED_L2;
        h.l1_size = 1;
        h.l1_table_offset = 1 << 13;
        h.refcount_table_offset = 2 << 13;
        h.refcount_table_clusters = 1;
        assert!(matches!(
            h.validate(4 << 13),
            Err(DecodeError::SubclusterSize(13))
        ));
        h.cluster_bits = 14;
        h.l1_table_offset = 1 << 14;
        h.refcount_table_offset = 2 << 14;
        h.validate(4 << 14).unwrap();
    }

    #[test]
    fn compressed_descriptor_split_depends_on_cluster_bits() {
        for bits in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS {
            let g = Geometry::standard(bits, 4);
            let off = (5u64 << bits) + 1234;
            let len = (g.cluster_size() / 2).max(600);
            let raw = CompressedDescriptor::encode(off, len, &g).unwrap();
            assert!(raw & OFLAG_COMPRESSED != 0);
            let d = CompressedDescriptor::decode(raw, &g);
            assert_eq!(d.host_offset, off);
            assert!(d.byte_len() >= len && d.byte_len() < len + 512);
            assert_eq!(L2Entry::decode(raw, &g).unwrap(), L2Entry::Compressed(d));
            assert_eq!(L2Entry::Compressed(d).encode(&g), raw);
        }
        // 64 KiB clusters: the offset field is 54 bits wide.
        let g = Geometry::standard(16, 4);
        assert_eq!(g.compressed_sector_shift(), 54);
        let raw = OFLAG_COMPRESSED | (3u64 << 54) | 0x1_0200;
        let d = CompressedDescriptor::decode(raw, &g);
        assert_eq!(
            d,
            CompressedDescriptor {
                host_offset: 0x1_0200,
                sectors: 4
            }
        );
        assert_eq!(d.byte_len(), 2048);
        assert!(CompressedDescriptor::encode(1 << 60, 10, &g).is_none());
    }

    #[test]
    fn l2_entry_decodes_every_cluster_kind() {
        let g = Geometry::standard(16, 4);
        assert_eq!(L2Entry::decode(0, &g).unwrap(), L2Entry::Unallocated);
        assert_eq!(
            L2Entry::decode(1, &g).unwrap(),
            L2Entry::Zero { host: None }
        );
        assert_eq!(
            L2Entry::decode(OFLAG_COPIED | 0x30000 | 1, &g).unwrap(),
            L2Entry::Zero {
                host: Some(0x30000)
            }
        );
        assert_eq!(
            L2Entry::decode(OFLAG_COPIED | 0x30000, &g).unwrap(),
            L2Entry::Normal {
                host: 0x30000,
                copied: true
            }
        );
        assert_eq!(
            L2Entry::decode(0x30000, &g).unwrap(),
            L2Entry::Normal {
                host: 0x30000,
                copied: false
            }
        );
        assert!(L2Entry::decode(0x30200, &g).is_err());
        for e in [
            L2Entry::Unallocated,
            L2Entry::Zero { host: None },
            L2Entry::Normal {
                host: 0x50000,
                copied: true,
            },
        ] {
            assert_eq!(L2Entry::decode(e.encode(&g), &g).unwrap(), e);
        }
    }

    #[test]
    fn refcounts_of_every_order_round_trip_without_touching_neighbours() {
        for order in 0..=MAX_REFCOUNT_ORDER {
            let mut block = vec![0u8; 512];
            let g = Geometry::standard(9, order);
            let n = g.refcount_block_entries();
            let max = g.refcount_max();
            for i in 0..n {
                let v = if i % 3 == 0 { max } else { (i * 7) & max };
                refcount_set(&mut block, order, i, v).unwrap();
            }
            for i in 0..n {
                let v = if i % 3 == 0 { max } else { (i * 7) & max };
                assert_eq!(
                    refcount_get(&block, order, i),
                    Some(v),
                    "order {order} index {i}"
                );
            }
            assert_eq!(refcount_get(&block, order, n), None);
            assert!(refcount_set(&mut block, order, n, 1).is_err());
            if order < 6 {
                assert!(refcount_set(&mut block, order, 0, max + 1).is_err());
            }
        }
        // Sub-byte widths: bit 0 is the least significant bit.
        let mut b = [0u8; 1];
        refcount_set(&mut b, 0, 0, 1).unwrap();
        assert_eq!(b[0], 1);
        refcount_set(&mut b, 2, 1, 0xf).unwrap();
        assert_eq!(b[0], 0xf1);
        // 16-bit refcounts are big endian.
        let mut b = [0u8; 4];
        refcount_set(&mut b, 4, 1, 0x0102).unwrap();
        assert_eq!(b, [0, 0, 1, 2]);
    }

    #[test]
    fn extensions_round_trip_and_unknown_ones_are_preserved() {
        let exts = vec![
            HeaderExtension::BackingFormat("raw".into()),
            HeaderExtension::FeatureNames(default_feature_names()),
            HeaderExtension::Unknown {
                kind: 0x1234_5678,
                data: vec![1, 2, 3],
            },
        ];
        let b = serialize_extensions(&exts);
        assert_eq!(b.len() % 8, 0);
        assert_eq!(parse_extensions(&b).unwrap(), exts);
        let mut padded = b.clone();
        padded.resize(4096, 0);
        assert_eq!(parse_extensions(&padded).unwrap(), exts);
    }

    #[test]
    fn malformed_extensions_are_rejected() {
        let mut b = serialize_extensions(&[HeaderExtension::BackingFormat("qcow2".into())]);
        put32(&mut b, 4, 1000);
        assert!(parse_extensions(&b).is_err());
        let twice = serialize_extensions(&[
            HeaderExtension::BackingFormat("raw".into()),
            HeaderExtension::BackingFormat("raw".into()),
        ]);
        assert!(parse_extensions(&twice).is_err());
        assert!(parse_extensions(&[1, 2, 3]).is_err());
        assert_eq!(parse_extensions(&[]).unwrap(), vec![]);
    }

    #[test]
    fn table_entries_are_big_endian_and_bounds_checked() {
        let t = [OFLAG_COPIED | 0x10000, 0];
        let b = table_to_bytes(&t);
        assert_eq!(b[0], 0x80);
        assert_eq!(table_from_bytes(&b), t);
        assert_eq!(table_entry(&b, 0), t[0]);
        assert_eq!(table_entry(&b, 9), 0);
        let mut b2 = b.clone();
        set_table_entry(&mut b2, 1, 5);
        set_table_entry(&mut b2, 100, 5);
        assert_eq!(table_entry(&b2, 1), 5);
        assert_eq!(l1_entry_offset(OFLAG_COPIED | 0x10000), 0x10000);
        assert_eq!(reftable_entry_offset(0x20000 | 0x1ff), 0x20000);
    }
}
