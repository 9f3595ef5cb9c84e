//! Loading: the header, the tables and the snapshot and bitmap directories as `check` reads them
//! straight from the file, validated like QEMU validates them at open.

use super::*;

/// One snapshot table entry (only what the check needs).
#[derive(Debug, Clone)]
pub(super) struct Snapshot {
    pub(super) l1_table_offset: u64,
    pub(super) l1_size: u32,
    pub(super) id: String,
    pub(super) name: String,
}

/// A bitmap directory entry (only what the check needs).
#[derive(Debug, Clone)]
pub(super) struct BitmapTable {
    pub(super) offset: u64,
    pub(super) entries: u32,
}

/// The image as the check sees it: file, header and the tables loaded at open.
pub(super) struct Image {
    pub(super) file: File,
    pub(super) len: u64,
    pub(super) header: Header,
    pub(super) g: Geometry,
    pub(super) cs: u64,
    pub(super) l1: Vec<u64>,
    pub(super) reftable: Vec<u64>,
    pub(super) snapshots: Vec<Snapshot>,
    pub(super) snapshots_size: u64,
    /// v3 snapshot table entries without the mandatory extra data.
    pub(super) incomplete_snapshots: Vec<u32>,
    /// Bitmap directory (offset, size) and its entries, when the bitmaps feature is in use.
    pub(super) bitmaps: Option<(u64, u64, Vec<BitmapTable>)>,
}

impl Image {
    /// Reads `buf.len()` bytes at `off`; the part past the end of the file reads as zeros.
    pub(super) fn read_padded(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        if off >= self.len {
            return Ok(());
        }
        let avail = usize::try_from(self.len - off)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        self.file.read_exact_at(&mut buf[..avail], off)
    }

    pub(super) fn read_table(&self, off: u64, entries: u64) -> io::Result<Vec<u64>> {
        let bytes = usize::try_from(entries.saturating_mul(8))
            .map_err(|_| io::Error::other("table too large"))?;
        let mut buf = vec![0u8; bytes];
        self.read_padded(off, &mut buf)?;
        Ok(format::table_from_bytes(&buf))
    }

    pub(super) fn clusters(&self) -> u64 {
        self.len.div_ceil(self.cs)
    }
}

pub(super) fn invalid(msg: impl Into<String>) -> CheckError {
    CheckError::Invalid(msg.into())
}

/// Opens and validates the image like QEMU does when `qemu-img check` opens it: tables must
/// be aligned and within QEMU's size limits, but may lie past the end of the file.
///
/// The file is locked like `qemu-img check` locks it (a repair as a writer, a plain check as a
/// reader, or force-shared inside `blockdev::lock::with_force_share`).
pub(super) fn load(path: &Path, writable: bool) -> Result<Image, CheckError> {
    let file = blockdev::open_file(path, !writable).map_err(|source| CheckError::Open {
        path: path.display().to_string(),
        source,
    })?;
    load_file(path, file)
}

/// [`load`] on an already open (and locked) file.
pub(super) fn load_file(path: &Path, file: File) -> Result<Image, CheckError> {
    let len = file
        .metadata()
        .map_err(|source| CheckError::Open {
            path: path.display().to_string(),
            source,
        })?
        .len();
    let probe = Image {
        file,
        len,
        header: Header::new_v3(0, 16, 4),
        g: Geometry::standard(16, 4),
        cs: 1 << 16,
        l1: Vec::new(),
        reftable: Vec::new(),
        snapshots: Vec::new(),
        snapshots_size: 0,
        incomplete_snapshots: Vec::new(),
        bitmaps: None,
    };
    let mut first = [0u8; 512];
    probe.read_padded(0, &mut first)?;
    if len < u64::from(format::V2_HEADER_LEN) {
        return Err(DecodeError::Truncated {
            what: "header",
            need: format::V2_HEADER_LEN as usize,
            have: usize::try_from(len).unwrap_or(0),
        }
        .into());
    }
    let cluster_bits = be32(&first, 20);
    // Magic and version first, so a non-qcow2 file gets the right error; a v3 header longer
    // than this probe is parsed again below from the whole first cluster.
    match Header::parse(&first) {
        Ok(_) | Err(DecodeError::Truncated { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(DecodeError::ClusterBits(cluster_bits).into());
    }
    let cs = 1u64 << cluster_bits;
    let mut head = vec![0u8; cs as usize];
    probe.read_padded(0, &mut head)?;
    let header = Header::parse(&head)?;
    let g = header.geometry();
    if header.refcount_order > MAX_REFCOUNT_ORDER {
        return Err(DecodeError::RefcountOrder(header.refcount_order).into());
    }
    if header.version == 3 && u64::from(header.header_length) > cs {
        return Err(DecodeError::HeaderLength(header.header_length).into());
    }
    let unknown = header.incompatible_features & !incompat::KNOWN;
    if unknown != 0 {
        return Err(CheckError::Unsupported(format!(
            "unknown incompatible feature bits {unknown:#x}"
        )));
    }
    if header.incompatible_features & incompat::EXTERNAL_DATA_FILE != 0 {
        return Err(CheckError::Unsupported("external data file".into()));
    }
    if g.extended_l2 && cluster_bits < format::MIN_EXTENDED_L2_CLUSTER_BITS {
        return Err(DecodeError::SubclusterSize(cluster_bits).into());
    }
    if header.crypt_method != 0 {
        return Err(DecodeError::Encrypted(header.crypt_method).into());
    }
    header.compression()?;
    if header.backing_file_offset != 0 {
        if header.backing_file_offset > cs {
            return Err(DecodeError::BackingName("invalid backing file offset".into()).into());
        }
        let room = (cs - header.backing_file_offset).min(u64::from(format::MAX_BACKING_FILE_NAME));
        if u64::from(header.backing_file_size) > room {
            return Err(DecodeError::BackingName("backing file name too long".into()).into());
        }
    }
    // Active L1 table.
    let l1_bytes = header.l1_table_bytes("active L1 table")?;
    validate_table_offset("L1 table", header.l1_table_offset, l1_bytes, &g)?;
    // Refcount table.
    let rt_bytes = header.refcount_table_bytes()?;
    validate_table_offset("refcount table", header.refcount_table_offset, rt_bytes, &g)?;
    // Snapshot table location.
    if header.nb_snapshots > MAX_SNAPSHOTS {
        return Err(invalid(format!(
            "too many snapshots ({})",
            header.nb_snapshots
        )));
    }
    validate_table_offset(
        "snapshot table",
        header.snapshots_offset,
        u64::from(header.nb_snapshots) * SNAPSHOT_HEADER_LEN,
        &g,
    )?;
    // Header extensions.
    let ext_start = usize::try_from(header.extensions_start()).unwrap_or(usize::MAX);
    let ext_end = usize::try_from(header.extensions_end())
        .unwrap_or(0)
        .min(head.len());
    let exts = match head.get(ext_start..ext_end) {
        Some(area) => format::parse_extensions(area)?,
        None => Vec::new(),
    };
    let mut img = probe;
    img.header = header;
    img.g = g;
    img.cs = cs;
    if img.header.autoclear_features & format::autoclear::BITMAPS != 0 {
        if let Some(HeaderExtension::Bitmaps(data)) = exts
            .iter()
            .find(|e| matches!(e, HeaderExtension::Bitmaps(_)))
        {
            img.bitmaps = Some(load_bitmaps(&img, data)?);
        }
    }
    img.l1 = img.read_table(img.header.l1_table_offset, img.header.l1_size.into())?;
    img.reftable = img.read_table(img.header.refcount_table_offset, rt_bytes / 8)?;
    load_snapshots(&mut img)?;
    Ok(img)
}

/// QEMU's `qcow2_validate_table`: aligned and `offset + size` fits in an `i64`; the table may
/// lie past the end of the file (it then reads as zeros).
pub(super) fn validate_table_offset(
    what: &'static str,
    offset: u64,
    bytes: u64,
    g: &Geometry,
) -> Result<(), DecodeError> {
    // Like QEMU, this applies even to empty tables.
    if offset
        .checked_add(bytes)
        .is_none_or(|end| end > i64::MAX as u64)
    {
        return Err(DecodeError::Overflow(what));
    }
    if !g.is_aligned(offset) {
        return Err(DecodeError::Misaligned { what, offset });
    }
    Ok(())
}

pub(super) fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

pub(super) fn be16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_be_bytes([s[0], s[1]]))
}

pub(super) fn be64(b: &[u8], at: usize) -> u64 {
    table_entry(b.get(at..).unwrap_or(&[]), 0)
}

/// Reads the snapshot table entries (headers, ids and names; extra data is skipped).
pub(super) fn load_snapshots(img: &mut Image) -> Result<(), CheckError> {
    let start = img.header.snapshots_offset;
    let mut off = start;
    for i in 0..img.header.nb_snapshots {
        // Every entry starts 8-byte aligned; the table ends where the last entry ends.
        off = off
            .checked_next_multiple_of(8)
            .ok_or(DecodeError::Overflow("snapshot table"))?;
        let mut h = [0u8; SNAPSHOT_HEADER_LEN as usize];
        img.read_padded(off, &mut h)?;
        let l1_table_offset = be64(&h, 0);
        let l1_size = be32(&h, 8);
        let id_len = u64::from(be16(&h, 12));
        let name_len = u64::from(be16(&h, 14));
        let extra = u64::from(be32(&h, 36));
        if extra > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(invalid(format!(
                "snapshot {i}: extra data too large ({extra} bytes)"
            )));
        }
        let strings_at = off.saturating_add(SNAPSHOT_HEADER_LEN + extra);
        let mut strings = vec![0u8; (id_len + name_len) as usize];
        img.read_padded(strings_at, &mut strings)?;
        let (id, name) = strings.split_at(id_len as usize);
        let entry = SNAPSHOT_HEADER_LEN + extra + id_len + name_len;
        off = off
            .checked_add(entry)
            .ok_or(DecodeError::Overflow("snapshot table"))?;
        if off - start > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(invalid("snapshot table too large"));
        }
        // QEMU: every v3 entry needs the 16 bytes of extra data holding the large VM state
        // size and the disk size.
        if img.header.version >= 3 && extra < 16 {
            img.incomplete_snapshots.push(i);
        }
        img.snapshots.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
        });
    }
    img.snapshots_size = off - start;
    Ok(())
}

/// Parses the bitmaps header extension and the bitmap directory it points to.
pub(super) fn load_bitmaps(
    img: &Image,
    ext: &[u8],
) -> Result<(u64, u64, Vec<BitmapTable>), CheckError> {
    if ext.len() < 24 {
        return Err(invalid("bitmaps extension too short"));
    }
    let nb = be32(ext, 0);
    let dir_size = be64(ext, 8);
    let dir_off = be64(ext, 16);
    if nb > 65535 || dir_size > 64 << 20 || !img.g.is_aligned(dir_off) {
        return Err(invalid("invalid bitmaps extension"));
    }
    let mut dir = vec![0u8; dir_size as usize];
    img.read_padded(dir_off, &mut dir)?;
    let mut tables = Vec::new();
    let mut pos = 0usize;
    for _ in 0..nb {
        let e = dir.get(pos..).unwrap_or(&[]);
        if e.len() < 24 {
            return Err(invalid("bitmap directory truncated"));
        }
        let name_size = usize::from(be16(e, 14));
        let extra = be32(e, 16) as usize;
        tables.push(BitmapTable {
            offset: be64(e, 0),
            entries: be32(e, 8),
        });
        pos = pos
            .checked_add((24 + extra + name_size).next_multiple_of(8))
            .ok_or_else(|| invalid("bitmap directory overflow"))?;
    }
    Ok((dir_off, dir_size, tables))
}
