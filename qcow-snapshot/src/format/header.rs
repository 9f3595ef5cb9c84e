//! The image header (v2 and v3) and its compression type: parsing, validation against the
//! file, serialization.

use super::*;

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
