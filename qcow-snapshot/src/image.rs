//! The qcow2 engine: [`QcowImage`] implements [`BlockDev`] over a [`HostFile`], with a backing
//! device underneath for clusters the image does not allocate.
//!
//! # Locking model
//! - `meta: Mutex<Meta>` guards all metadata: the L1 table, the L2-table and refcount-block
//!   caches, the refcount table, the allocator and the set of guest clusters with an allocation
//!   in flight. It is held only for lookups and metadata updates (and during flushes, which do
//!   metadata I/O); guest data is read and written with the lock released.
//! - `alloc_done: Condvar` (with `meta`) wakes requests that wait for another request's
//!   allocation of the same guest cluster: the first request allocates, the second waits and
//!   then writes into the now-allocated cluster, so a cluster is never allocated twice and
//!   neither write is lost.
//! - `gate: RwLock<()>`: every data request holds it shared from the mapping lookup until its
//!   data I/O is done. Freed host clusters become reusable only inside `flush`, under the gate
//!   held exclusively, so no request can still be using a stale mapping to a reused cluster.
//!   Lock order: `gate` before `meta`; `meta` is never held while acquiring `gate`.
//!
//! # Write ordering
//! Allocating writes (COW) write the whole new cluster (guest data plus the bytes it does not
//! cover, taken from what the guest saw before) while the L2 entry still points to the old
//! state, and only then update the L2 entry *in memory*. Dirty L2 tables, refcount blocks and
//! L1/refcount-table entries stay in memory until a flush, which writes them in dependency
//! order: sync data -> refcount blocks -> sync -> refcount-table entries -> sync -> L2 tables
//! -> sync -> L1 entries -> sync. Refcount-table entries go in levels: the entry of a block
//! that counts other new blocks is durable before theirs. A refcount-table growth writes the
//! blocks and the new table, syncs, switches the header, syncs, and only then switches the
//! in-memory table, so memory never names a table the header does not. A failed sync is
//! repaired by [`ReplayHost`] or makes every later write, flush and close fail with EIO. Refcount decrements of replaced clusters are applied only
//! after the flush that made the replacing references durable, so a crash can leak clusters
//! but never leave a reference to a free or reused cluster. A bound on dirty metadata forces
//! an internal flush.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use blockdev::{check_range, BlockDev, BlockError, Result};

use crate::compress::decompress;
use crate::error::OpenImageError;
use crate::format::{
    self, check_l2_bitmap, incompat, l1_entry_offset, parse_extensions, refcount_get, refcount_set,
    reftable_entry_offset, subcluster_mask, subcluster_state, table_from_bytes, table_to_bytes,
    CompressedDescriptor, CompressionType, Geometry, Header, HeaderExtension, L2Entry, Subcluster,
    AUTOCLEAR_FEATURES_OFFSET, INCOMPATIBLE_FEATURES_OFFSET, L2_BITMAP_ALL_ALLOC,
    L2_BITMAP_ALL_ZERO, MAX_REFCOUNT_TABLE_BYTES, OFLAG_COPIED, REFCOUNT_TABLE_OFFSET_OFFSET,
};
use crate::host::{HostFile, ReplayHost};
use crate::refcount::rebuild_refcounts;

/// Highest host offset an L2 entry can address (bits 9..56).
const MAX_HOST_OFFSET: u64 = 1 << 56;

/// What I/O a guest range needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Guest bytes are at this host offset (the start of the extent).
    Data(u64),
    /// Reads as zeros.
    Zero,
    /// Not allocated in this image: the backing device (or zeros).
    Unallocated,
    /// Inside a compressed cluster.
    Compressed(CompressedDescriptor),
}

/// A contiguous guest range with one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// How the range is stored.
    pub mapping: Mapping,
}

/// The backing file an image header names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingSpec {
    /// The name as stored (may be relative to the image's directory).
    pub name: String,
    /// The backing format extension, if present.
    pub format: Option<String>,
}

/// The parsed, validated beginning of an image.
#[derive(Debug, Clone)]
pub struct ImageHeader {
    /// The fixed header.
    pub header: Header,
    /// Header extensions in file order.
    pub extensions: Vec<HeaderExtension>,
    /// Backing file, if any.
    pub backing: Option<BackingSpec>,
    /// Length of the host file.
    pub file_len: u64,
}

impl ImageHeader {
    /// Reads and validates the header, its extensions and the backing file name.
    pub fn read(host: &dyn HostFile) -> std::result::Result<ImageHeader, OpenImageError> {
        let file_len = host.len()?;
        let mut first = [0u8; format::V2_HEADER_LEN as usize];
        host.read_at(&mut first, 0)?;
        let magic = u32::from_be_bytes([first[0], first[1], first[2], first[3]]);
        if magic != format::QCOW_MAGIC {
            return Err(format::DecodeError::BadMagic(magic).into());
        }
        let bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
        if !(format::MIN_CLUSTER_BITS..=format::MAX_CLUSTER_BITS).contains(&bits) {
            return Err(format::DecodeError::ClusterBits(bits).into());
        }
        let cs = 1usize << bits;
        let mut cluster = vec![0u8; cs];
        host.read_at(&mut cluster, 0)?;
        let header = Header::parse(&cluster)?;
        header.validate(file_len)?;
        let start = header.extensions_start() as usize;
        let end = header.extensions_end() as usize;
        let extensions = if start < end {
            parse_extensions(&cluster[start..end])?
        } else {
            Vec::new()
        };
        let backing = if header.backing_file_offset != 0 {
            let s = header.backing_file_offset as usize;
            let e = s + header.backing_file_size as usize;
            let name = String::from_utf8(cluster[s..e].to_vec())
                .map_err(|_| format::DecodeError::BackingName("not UTF-8".into()))?;
            let format = extensions.iter().find_map(|x| match x {
                HeaderExtension::BackingFormat(f) => Some(f.clone()),
                _ => None,
            });
            Some(BackingSpec { name, format })
        } else {
            None
        };
        Ok(ImageHeader {
            header,
            extensions,
            backing,
            file_len,
        })
    }

    fn feature_name(&self, kind: u8, bit: u32) -> String {
        self.extensions
            .iter()
            .find_map(|x| match x {
                HeaderExtension::FeatureNames(v) => v
                    .iter()
                    .find(|f| f.kind == kind && u32::from(f.bit) == bit)
                    .map(|f| f.name.clone()),
                _ => None,
            })
            .unwrap_or_else(|| format!("unknown feature bit {bit}"))
    }

    /// Refuses features this engine cannot handle, and (for writing) features it must not
    /// modify.
    pub fn check_features(&self, read_only: bool) -> std::result::Result<(), OpenImageError> {
        let h = &self.header;
        // External data files (data_file, data_file_raw) are refused on purpose, before any
        // other feature: the header names another file by path, which would be opened and
        // written with guest data. An image from an untrusted source could so direct writes
        // into any file the daemon may open, and the write ordering that keeps images crash
        // consistent covers the one image file only.
        let data_file = self.extensions.iter().find_map(|x| match x {
            HeaderExtension::ExternalDataFile(name) => Some(name.as_str()),
            _ => None,
        });
        if data_file.is_some() || h.incompatible_features & incompat::EXTERNAL_DATA_FILE != 0 {
            return Err(OpenImageError::Unsupported(format!(
                "external data file {}(qcow2 data_file): snapblk keeps guest data inside the \
                 image file and never follows a file name from an image header to write guest \
                 data (convert the image with `qemu-img convert -O qcow2` first)",
                data_file.map(|n| format!("'{n}' ")).unwrap_or_default()
            )));
        }
        let unknown = h.incompatible_features & !incompat::SUPPORTED;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| self.feature_name(0, b))
                .collect();
            return Err(OpenImageError::Unsupported(format!(
                "incompatible features: {}",
                names.join(", ")
            )));
        }
        if self
            .extensions
            .iter()
            .any(|x| matches!(x, HeaderExtension::FullDiskEncryption(_)))
        {
            return Err(OpenImageError::Unsupported("encryption".into()));
        }
        if read_only {
            return Ok(());
        }
        if h.incompatible_features & incompat::CORRUPT != 0 {
            return Err(OpenImageError::ReadOnlyOnly(
                "the corrupt bit is set (run a check/repair)".into(),
            ));
        }
        if h.nb_snapshots != 0 {
            return Err(OpenImageError::ReadOnlyOnly(format!(
                "image has {} internal snapshots",
                h.nb_snapshots
            )));
        }
        if self
            .extensions
            .iter()
            .any(|x| matches!(x, HeaderExtension::Bitmaps(_)))
            || h.autoclear_features & format::autoclear::BITMAPS != 0
        {
            return Err(OpenImageError::ReadOnlyOnly(
                "image has persistent bitmaps".into(),
            ));
        }
        Ok(())
    }
}

struct CachedL2 {
    entries: Vec<u64>,
    dirty: bool,
    used: u64,
}

struct CachedBlock {
    data: Vec<u8>,
    dirty: bool,
    used: u64,
}

/// Everything behind the metadata lock.
struct Meta {
    geo: Geometry,
    header: Header,
    l1: Vec<u64>,
    l1_dirty: BTreeSet<usize>,
    l2: HashMap<u64, CachedL2>,
    reftable: Vec<u64>,
    reftable_dirty: BTreeSet<usize>,
    blocks: HashMap<u64, CachedBlock>,
    /// Cluster-aligned end of the allocated host area; appends go here.
    file_end: u64,
    /// No free cluster below this offset.
    free_hint: u64,
    /// Host clusters whose refcount drops by one after the next flush.
    pending_free: Vec<u64>,
    /// Guest clusters with an allocation in flight.
    inflight: HashSet<u64>,
    tick: u64,
    dirty: usize,
    l2_cap: usize,
    block_cap: usize,
    dirty_cap: usize,
}

fn corrupt(msg: String) -> BlockError {
    BlockError::Corrupt(msg)
}

fn no_space(what: &str) -> BlockError {
    BlockError::Io(io::Error::new(
        io::ErrorKind::StorageFull,
        format!("qcow2 limit reached: {what}"),
    ))
}

impl Meta {
    fn cs(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// Checks that a host cluster referenced by metadata is plausible: aligned, not the header,
    /// not one of the fixed tables, and inside the allocated area.
    fn check_host_cluster(&self, off: u64, what: &str) -> Result<()> {
        let cs = self.cs();
        let l1_start = self.header.l1_table_offset;
        let l1_end = l1_start + u64::from(self.header.l1_size) * 8;
        let rt_start = self.header.refcount_table_offset;
        let rt_end = rt_start + u64::from(self.header.refcount_table_clusters) * cs;
        let overlaps = |s: u64, e: u64| off < e && off + cs > s;
        if !self.geo.is_aligned(off)
            || off < cs
            || off >= self.file_end
            || (l1_end > l1_start && overlaps(l1_start, l1_end))
            || overlaps(rt_start, rt_end)
        {
            return Err(corrupt(format!(
                "{what} offset {off:#x} is invalid (misaligned, past EOF or over metadata)"
            )));
        }
        Ok(())
    }

    fn l2_table(&mut self, io: &dyn HostFile, off: u64) -> Result<&mut CachedL2> {
        if !self.l2.contains_key(&off) {
            self.check_host_cluster(off, "L2 table")?;
            if self.l2.len() >= self.l2_cap {
                if let Some(victim) = self
                    .l2
                    .iter()
                    .filter(|(_, t)| !t.dirty)
                    .min_by_key(|(_, t)| t.used)
                    .map(|(k, _)| *k)
                {
                    self.l2.remove(&victim);
                }
            }
            let mut buf = vec![0u8; self.cs() as usize];
            io.read_at(&mut buf, off)?;
            self.l2.insert(
                off,
                CachedL2 {
                    entries: table_from_bytes(&buf),
                    dirty: false,
                    used: 0,
                },
            );
        }
        self.tick += 1;
        let tick = self.tick;
        let t = self
            .l2
            .get_mut(&off)
            .ok_or_else(|| corrupt("L2 cache".into()))?;
        t.used = tick;
        Ok(t)
    }

    fn block(&mut self, io: &dyn HostFile, off: u64) -> Result<&mut CachedBlock> {
        if !self.blocks.contains_key(&off) {
            self.check_host_cluster(off, "refcount block")?;
            if self.blocks.len() >= self.block_cap {
                if let Some(victim) = self
                    .blocks
                    .iter()
                    .filter(|(_, t)| !t.dirty)
                    .min_by_key(|(_, t)| t.used)
                    .map(|(k, _)| *k)
                {
                    self.blocks.remove(&victim);
                }
            }
            let mut buf = vec![0u8; self.cs() as usize];
            io.read_at(&mut buf, off)?;
            self.blocks.insert(
                off,
                CachedBlock {
                    data: buf,
                    dirty: false,
                    used: 0,
                },
            );
        }
        self.tick += 1;
        let tick = self.tick;
        let b = self
            .blocks
            .get_mut(&off)
            .ok_or_else(|| corrupt("refcount cache".into()))?;
        b.used = tick;
        Ok(b)
    }

    fn refcount(&mut self, io: &dyn HostFile, host: u64) -> Result<u64> {
        let idx = self.geo.refcount_table_index(host) as usize;
        let Some(&e) = self.reftable.get(idx) else {
            return Ok(0);
        };
        let bo = reftable_entry_offset(e);
        if bo == 0 {
            return Ok(0);
        }
        let order = self.geo.refcount_order;
        let bi = self.geo.refcount_block_index(host) as u64;
        let b = self.block(io, bo)?;
        refcount_get(&b.data, order, bi).ok_or_else(|| corrupt("refcount index".into()))
    }

    fn set_refcount(&mut self, io: &dyn HostFile, host: u64, value: u64, depth: u32) -> Result<()> {
        if depth > 8 {
            return Err(corrupt(
                "refcount block allocation does not converge".into(),
            ));
        }
        let idx = self.geo.refcount_table_index(host) as usize;
        if idx >= self.reftable.len() {
            if value == 0 {
                return Ok(());
            }
            self.grow_reftable(io, idx)?;
        }
        let mut bo = self
            .reftable
            .get(idx)
            .map_or(0, |&e| reftable_entry_offset(e));
        if bo == 0 {
            if value == 0 {
                return Ok(());
            }
            // The new block is appended and counted by the block of its own index, which may
            // itself be new, and so on. If any block of that chain would be counted beyond the
            // table, grow first (the growth counts every cluster it adds) and start over, so a
            // growth never happens halfway through a chain (with a table entry naming a block
            // nothing counts yet).
            let cs = self.cs();
            let mut chain = vec![idx];
            let mut p = self.file_end;
            loop {
                let j = self.geo.refcount_table_index(p) as usize;
                if j >= self.reftable.len() {
                    self.grow_reftable(io, j)?;
                    return self.set_refcount(io, host, value, depth + 1);
                }
                if chain.contains(&j)
                    || self
                        .reftable
                        .get(j)
                        .is_some_and(|&e| reftable_entry_offset(e) != 0)
                {
                    break;
                }
                if chain.len() > 8 {
                    return Err(corrupt(
                        "refcount block allocation does not converge".into(),
                    ));
                }
                chain.push(j);
                p = p.checked_add(cs).ok_or_else(|| no_space("file size"))?;
            }
            bo = self.file_end;
            self.file_end = bo
                .checked_add(self.cs())
                .filter(|&e| e <= MAX_HOST_OFFSET)
                .ok_or_else(|| no_space("file size"))?;
            self.blocks.insert(
                bo,
                CachedBlock {
                    data: vec![0; self.cs() as usize],
                    dirty: true,
                    used: self.tick,
                },
            );
            self.dirty += 1;
            self.reftable[idx] = bo;
            let was_dirty = !self.reftable_dirty.insert(idx);
            if let Err(e) = self.set_refcount(io, bo, 1, depth + 1) {
                // Nothing counts the block: unpublish it (its cluster stays a hole below EOF).
                self.reftable[idx] = 0;
                if !was_dirty {
                    self.reftable_dirty.remove(&idx);
                }
                if self.blocks.remove(&bo).is_some() {
                    self.dirty = self.dirty.saturating_sub(1);
                }
                return Err(e);
            }
        }
        let order = self.geo.refcount_order;
        let bi = self.geo.refcount_block_index(host) as u64;
        let b = self.block(io, bo)?;
        refcount_set(&mut b.data, order, bi, value)
            .map_err(|e| corrupt(format!("refcount overflow: {e}")))?;
        if !b.dirty {
            b.dirty = true;
            self.dirty += 1;
        }
        Ok(())
    }

    /// Replaces the refcount table with a larger one covering index `need`.
    fn grow_reftable(&mut self, io: &dyn HostFile, need: usize) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let old_len = self.reftable.len();
        let mut entries = (need as u64 + 1).max(old_len as u64 * 2).max(cs / 8);
        let start = self.file_end;
        let (tclusters, missing, end) = loop {
            let tclusters = g.clusters_for(entries * 8);
            let mut nb = 0u64;
            let mut missing: Vec<u64>;
            let mut end;
            let mut rounds = 0;
            loop {
                rounds += 1;
                end = start
                    .checked_add((tclusters + nb) * cs)
                    .filter(|&e| e <= MAX_HOST_OFFSET)
                    .ok_or_else(|| no_space("file size"))?;
                let first = g.refcount_table_index(start);
                let last = g.refcount_table_index(end - 1);
                missing = (first..=last)
                    .filter(|&i| {
                        self.reftable
                            .get(i as usize)
                            .is_none_or(|&e| reftable_entry_offset(e) == 0)
                    })
                    .collect();
                if missing.len() as u64 == nb || rounds > 8 {
                    break;
                }
                nb = missing.len() as u64;
            }
            let max_idx = g.refcount_table_index(end - 1);
            if max_idx < entries && missing.len() as u64 == nb {
                break (tclusters, missing, end);
            }
            entries = entries.max(max_idx + 1) + 1;
            if entries * 8 > MAX_REFCOUNT_TABLE_BYTES {
                return Err(no_space("refcount table size"));
            }
        };
        let table_bytes = tclusters * cs;
        if table_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(no_space("refcount table size"));
        }
        let order = g.refcount_order;
        let mut table = self.reftable.clone();
        table.resize((table_bytes / 8) as usize, 0);
        // The new refcount blocks and updated copies of the existing blocks that count the new
        // clusters; nothing in `self` changes until the new table is durable and in the header.
        let mut blocks: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for (k, &i) in missing.iter().enumerate() {
            let off = start + (tclusters + k as u64) * cs;
            let slot = table
                .get_mut(i as usize)
                .ok_or_else(|| corrupt("refcount table growth: index past the table".into()))?;
            *slot = off;
            blocks.insert(off, vec![0; cs as usize]);
        }
        let mut c = start;
        while c < end {
            let idx = g.refcount_table_index(c) as usize;
            let bo = table.get(idx).map_or(0, |&e| reftable_entry_offset(e));
            if bo == 0 {
                return Err(corrupt(format!(
                    "refcount table growth left cluster {c:#x} without a refcount block"
                )));
            }
            if let std::collections::btree_map::Entry::Vacant(v) = blocks.entry(bo) {
                v.insert(self.block(io, bo)?.data.clone());
            }
            let data = blocks
                .get_mut(&bo)
                .ok_or_else(|| corrupt("refcount table growth: block copy".into()))?;
            refcount_set(data, order, g.refcount_block_index(c) as u64, 1)
                .map_err(|e| corrupt(format!("refcount overflow: {e}")))?;
            c += cs;
        }
        // Order: every refcount block (including dirty cached ones that the new table names)
        // and the new table, sync; then the header that switches to it, sync. Only then does
        // memory switch, so a failure anywhere leaves memory describing the on-disk table.
        self.write_dirty_blocks(io)?;
        for (&off, data) in &blocks {
            io.write_at(data, off)?;
        }
        io.write_at(&table_to_bytes(&table), start)?;
        io.sync_data()?;
        let mut field = [0u8; 12];
        field[..8].copy_from_slice(&start.to_be_bytes());
        field[8..].copy_from_slice(&(tclusters as u32).to_be_bytes());
        io.write_at(&field, REFCOUNT_TABLE_OFFSET_OFFSET as u64)?;
        io.sync_data()?;
        let old_off = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        self.header.refcount_table_offset = start;
        self.header.refcount_table_clusters = tclusters as u32;
        self.reftable = table;
        // Every entry of the old table is in the new one, which is on disk.
        self.reftable_dirty.clear();
        self.file_end = end;
        for (off, data) in blocks {
            // The copies are what is on disk now, and the cached originals were clean (written
            // above), so replacing them loses nothing.
            self.blocks.insert(
                off,
                CachedBlock {
                    data,
                    dirty: false,
                    used: self.tick,
                },
            );
        }
        for k in 0..old_clusters {
            self.pending_free.push(old_off + k * cs);
        }
        Ok(())
    }

    /// Allocates `n` contiguous host clusters with refcount 1.
    fn alloc(&mut self, io: &dyn HostFile, n: u64) -> Result<u64> {
        let cs = self.cs();
        if n == 1 {
            while self.free_hint < self.file_end {
                let c = self.free_hint;
                self.free_hint += cs;
                if self.refcount(io, c)? == 0 {
                    if let Err(e) = self.set_refcount(io, c, 1, 0) {
                        self.free_hint = c;
                        return Err(e);
                    }
                    return Ok(c);
                }
            }
        }
        let start = self.file_end;
        let end = n
            .checked_mul(cs)
            .and_then(|b| start.checked_add(b))
            .filter(|&e| e <= MAX_HOST_OFFSET)
            .ok_or_else(|| no_space("file size"))?;
        self.file_end = end;
        if self.free_hint == start {
            self.free_hint = end;
        }
        let mut c = start;
        while c < end {
            if let Err(e) = self.set_refcount(io, c, 1, 0) {
                // All or nothing: release what this call already counted (best effort; a
                // failure here leaks clusters, never loses a reference).
                let mut u = start;
                while u < c {
                    if self.set_refcount(io, u, 0, 0).is_err() {
                        break;
                    }
                    u += cs;
                }
                self.free_hint = self.free_hint.min(start);
                return Err(e);
            }
            c += cs;
        }
        Ok(start)
    }

    /// Drops one reference of each cluster (only called once the references are gone on disk).
    fn apply_frees(&mut self, io: &dyn HostFile, frees: Vec<u64>) -> Result<()> {
        for c in frees {
            let r = self.refcount(io, c)?;
            if r == 0 {
                return Err(corrupt(format!(
                    "refcount of in-use cluster {c:#x} is already 0"
                )));
            }
            self.set_refcount(io, c, r - 1, 0)?;
            if r == 1 && c < self.free_hint {
                self.free_hint = c;
            }
        }
        Ok(())
    }

    fn write_dirty_blocks(&mut self, io: &dyn HostFile) -> Result<()> {
        let mut wrote = false;
        for (&off, b) in self.blocks.iter_mut().filter(|(_, b)| b.dirty) {
            io.write_at(&b.data, off)?;
            b.dirty = false;
            wrote = true;
        }
        if wrote {
            io.sync_data()?;
        }
        Ok(())
    }

    /// Writes the dirty refcount-table entries (their blocks are already durable) in dependency
    /// order: an entry naming a new block is written only once the entry of the block that holds
    /// *that* block's refcount is durable, with a sync after each level. So at every sync point
    /// each refcount block reachable from the header has a nonzero refcount reachable from it.
    /// An entry is never written outside the table the on-disk header names.
    fn write_reftable_entries(&mut self, io: &dyn HostFile) -> Result<()> {
        let on_disk_entries = u64::from(self.header.refcount_table_clusters) * (self.cs() / 8);
        if self.reftable.len() as u64 != on_disk_entries {
            return Err(corrupt(format!(
                "in-memory refcount table has {} entries but the one on disk has {on_disk_entries}",
                self.reftable.len()
            )));
        }
        while !self.reftable_dirty.is_empty() {
            let ready: Vec<usize> = self
                .reftable_dirty
                .iter()
                .copied()
                .filter(|&i| {
                    let bo = self
                        .reftable
                        .get(i)
                        .map_or(0, |&e| reftable_entry_offset(e));
                    let counted_in = self.geo.refcount_table_index(bo) as usize;
                    bo == 0 || counted_in == i || !self.reftable_dirty.contains(&counted_in)
                })
                .collect();
            if ready.is_empty() {
                return Err(corrupt(
                    "new refcount blocks count each other in a cycle".into(),
                ));
            }
            for &i in &ready {
                if i as u64 >= on_disk_entries {
                    return Err(corrupt(format!(
                        "refcount table entry {i} is outside the on-disk table"
                    )));
                }
                let e = self.reftable.get(i).copied().unwrap_or(0);
                io.write_at(
                    &e.to_be_bytes(),
                    self.header.refcount_table_offset + i as u64 * 8,
                )?;
            }
            io.sync_data()?;
            for i in ready {
                self.reftable_dirty.remove(&i);
            }
        }
        Ok(())
    }

    /// Writes all dirty metadata in dependency order. Guest data written before the call is
    /// made durable first.
    fn flush_meta(&mut self, io: &dyn HostFile, data_written: bool) -> Result<()> {
        let meta_dirty =
            self.dirty > 0 || !self.l1_dirty.is_empty() || !self.reftable_dirty.is_empty();
        if !meta_dirty && !data_written {
            return Ok(());
        }
        io.sync_data()?;
        self.write_dirty_blocks(io)?;
        self.write_reftable_entries(io)?;
        let mut wrote = false;
        for (&off, t) in self.l2.iter_mut().filter(|(_, t)| t.dirty) {
            io.write_at(&table_to_bytes(&t.entries), off)?;
            t.dirty = false;
            wrote = true;
        }
        if wrote {
            io.sync_data()?;
        }
        if !self.l1_dirty.is_empty() {
            for &i in &self.l1_dirty {
                let e = self.l1.get(i).copied().unwrap_or(0);
                io.write_at(&e.to_be_bytes(), self.header.l1_table_offset + i as u64 * 8)?;
            }
            io.sync_data()?;
            self.l1_dirty.clear();
        }
        self.dirty = 0;
        Ok(())
    }

    fn maybe_flush(&mut self, io: &dyn HostFile) -> Result<()> {
        if self.dirty > self.dirty_cap {
            self.flush_meta(io, true)?;
        }
        Ok(())
    }

    /// The raw L2 entry of guest cluster `gc` and its subcluster bitmap (0 without extended L2
    /// entries); both 0 when its L2 table does not exist.
    fn raw_entry(&mut self, io: &dyn HostFile, gc: u64) -> Result<(u64, u64)> {
        let l2e = self.geo.l2_entries();
        let l1i = (gc / l2e) as usize;
        let w = self.geo.l2_entry_words();
        let l2i = (gc % l2e) as usize * w;
        let off = self.l1.get(l1i).map_or(0, |&e| l1_entry_offset(e));
        if off == 0 {
            return Ok((0, 0));
        }
        let t = self.l2_table(io, off)?;
        let raw = t.entries.get(l2i).copied().unwrap_or(0);
        let bitmap = if w == 2 {
            t.entries.get(l2i + 1).copied().unwrap_or(0)
        } else {
            0
        };
        Ok((raw, bitmap))
    }

    /// The decoded, validated L2 entry of guest cluster `gc`.
    fn entry(&mut self, io: &dyn HostFile, gc: u64) -> Result<L2Entry> {
        Ok(self.sub_entry(io, gc)?.0)
    }

    /// The decoded, validated L2 entry of guest cluster `gc` with its validated subcluster
    /// bitmap (always 0 without extended L2 entries).
    fn sub_entry(&mut self, io: &dyn HostFile, gc: u64) -> Result<(L2Entry, u64)> {
        let (raw, bitmap) = self.raw_entry(io, gc)?;
        let e = L2Entry::decode(raw, &self.geo)
            .map_err(|e| corrupt(format!("guest cluster {gc}: {e}")))?;
        if self.geo.extended_l2 {
            check_l2_bitmap(&e, bitmap)
                .map_err(|why| corrupt(format!("guest cluster {gc}: {why}")))?;
        }
        match e {
            L2Entry::Normal { host, .. } | L2Entry::Zero { host: Some(host) } => {
                self.check_host_cluster(host, "data cluster")?;
            }
            L2Entry::Compressed(d)
                if d.host_offset < self.cs() || d.host_offset >= self.file_end =>
            {
                return Err(corrupt(format!(
                    "compressed cluster at {:#x} is outside the file",
                    d.host_offset
                )));
            }
            _ => {}
        }
        Ok((e, bitmap))
    }

    /// Sets the raw L2 entry of `gc` and (with extended L2 entries) its subcluster bitmap,
    /// creating its L2 table if needed.
    fn set_entry(&mut self, io: &dyn HostFile, gc: u64, raw: u64, bitmap: u64) -> Result<()> {
        let l2e = self.geo.l2_entries();
        let l1i = (gc / l2e) as usize;
        let w = self.geo.l2_entry_words();
        let l2i = (gc % l2e) as usize * w;
        let l1e = *self
            .l1
            .get(l1i)
            .ok_or_else(|| corrupt(format!("guest cluster {gc} beyond the L1 table")))?;
        let mut off = l1_entry_offset(l1e);
        if off == 0 {
            off = self.alloc(io, 1)?;
            let entries = vec![0u64; l2e as usize * w];
            self.l2.insert(
                off,
                CachedL2 {
                    entries,
                    dirty: true,
                    used: self.tick,
                },
            );
            self.dirty += 1;
            self.l1[l1i] = off | OFLAG_COPIED;
            self.l1_dirty.insert(l1i);
        } else if l1e & OFLAG_COPIED == 0 {
            if self.refcount(io, off)? != 1 {
                return Err(BlockError::Unsupported(
                    "writing to an L2 table shared with a snapshot",
                ));
            }
            self.l1[l1i] = off | OFLAG_COPIED;
            self.l1_dirty.insert(l1i);
        }
        let t = self.l2_table(io, off)?;
        let slot = t
            .entries
            .get_mut(l2i)
            .ok_or_else(|| corrupt("L2 index".into()))?;
        *slot = raw;
        if w == 2 {
            let slot = t
                .entries
                .get_mut(l2i + 1)
                .ok_or_else(|| corrupt("L2 index".into()))?;
            *slot = bitmap;
        }
        let newly_dirty = !t.dirty;
        t.dirty = true;
        if newly_dirty {
            self.dirty += 1;
        }
        Ok(())
    }

    /// Queues the host clusters an entry owns for release after the next flush.
    fn release(&mut self, e: L2Entry, keep: Option<u64>) {
        match e {
            L2Entry::Normal { host, .. } | L2Entry::Zero { host: Some(host) } => {
                if Some(host) != keep {
                    self.pending_free.push(host);
                }
            }
            L2Entry::Compressed(d) => {
                let (first, last) = d.host_clusters(&self.geo);
                let mut c = first;
                while c <= last {
                    self.pending_free.push(c);
                    c += self.cs();
                }
            }
            L2Entry::Unallocated | L2Entry::Zero { host: None } => {}
        }
    }

    /// Maps `[off, off+len)` into extents.
    fn map(&mut self, io: &dyn HostFile, off: u64, len: u64) -> Result<Vec<Extent>> {
        let cs = self.cs();
        let cov = self.geo.l2_coverage();
        let end = off + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = off;
        while pos < end {
            let gc = pos >> self.geo.cluster_bits;
            let l1i = (gc / self.geo.l2_entries()) as usize;
            let (n, mapping) = if self.l1.get(l1i).is_none_or(|&e| l1_entry_offset(e) == 0) {
                let run_end = ((l1i as u64 + 1) * cov).min(end);
                (run_end - pos, Mapping::Unallocated)
            } else {
                let in_off = pos & (cs - 1);
                let n = (cs - in_off).min(end - pos);
                let (e, bitmap) = self.sub_entry(io, gc)?;
                if self.geo.extended_l2 && !matches!(e, L2Entry::Compressed(_)) {
                    // Runs of subclusters in the same state.
                    let host = match e {
                        L2Entry::Normal { host, .. } => host,
                        _ => 0,
                    };
                    let sb = self.geo.subcluster_bits();
                    let mut p = pos;
                    while p < pos + n {
                        let i = self.geo.subcluster_index(p);
                        let state = subcluster_state(bitmap, i);
                        let mut q = (p | ((1 << sb) - 1)) + 1;
                        while q < pos + n
                            && subcluster_state(bitmap, self.geo.subcluster_index(q)) == state
                        {
                            q += 1 << sb;
                        }
                        let q = q.min(pos + n);
                        let mapping = match state {
                            Subcluster::Data => Mapping::Data(host + (p & (cs - 1))),
                            Subcluster::Zero => Mapping::Zero,
                            Subcluster::Unallocated => Mapping::Unallocated,
                        };
                        push_extent(&mut out, p, q - p, mapping);
                        p = q;
                    }
                    pos += n;
                    continue;
                }
                let m = match e {
                    L2Entry::Unallocated => Mapping::Unallocated,
                    L2Entry::Zero { .. } => Mapping::Zero,
                    L2Entry::Normal { host, .. } => Mapping::Data(host + in_off),
                    L2Entry::Compressed(d) => Mapping::Compressed(d),
                };
                (n, m)
            };
            push_extent(&mut out, pos, n, mapping);
            pos += n;
        }
        Ok(out)
    }
}

/// Appends `[pos, pos+n)` to `out`, merging it into the last extent when contiguous.
fn push_extent(out: &mut Vec<Extent>, pos: u64, n: u64, mapping: Mapping) {
    let merged = match (out.last_mut(), mapping) {
        (Some(last), Mapping::Data(h)) => match last.mapping {
            Mapping::Data(lh) if lh + last.len == h => {
                last.len += n;
                true
            }
            _ => false,
        },
        (Some(last), Mapping::Zero) if last.mapping == Mapping::Zero => {
            last.len += n;
            true
        }
        (Some(last), Mapping::Unallocated) if last.mapping == Mapping::Unallocated => {
            last.len += n;
            true
        }
        _ => false,
    };
    if !merged {
        out.push(Extent {
            offset: pos,
            len: n,
            mapping,
        });
    }
}

/// Where the bytes of an allocating write's uncovered part come from.
#[derive(Debug, Clone, Copy)]
enum Fill {
    Backing,
    Zero,
    Compressed(CompressedDescriptor),
    Host(u64),
    /// The cluster's guest-visible content as mapped now (subclusters of a shared cluster).
    Mapped,
}

/// A write into a cluster with an extended L2 entry that allocates only the subclusters it
/// touches: guest bytes `[start, end)` (the write widened to subcluster boundaries at ends that
/// are not allocated yet) go to the same offsets of the host cluster.
#[derive(Debug, Clone, Copy)]
struct SubWrite {
    start: u64,
    end: u64,
    /// Allocation-half mask of the subclusters written.
    mask: u64,
    /// The entry's bitmap when the write was planned (stable: the cluster is in flight).
    bitmap: u64,
}

#[derive(Debug)]
enum Step {
    /// Write in place at this host offset.
    Direct { host: u64, guest: u64, len: u64 },
    /// Allocate guest cluster `gc` at `target`, filling what the write does not cover (the
    /// whole cluster, or with `sub` only the subclusters the write touches).
    Alloc {
        gc: u64,
        target: u64,
        fresh: bool,
        fill: Fill,
        guest: u64,
        len: u64,
        sub: Option<SubWrite>,
    },
    /// Another request is allocating this cluster; retry after it finishes.
    Blocked { guest: u64, len: u64 },
}

/// A qcow2 image as a block device.
pub struct QcowImage {
    io: ReplayHost<Box<dyn HostFile>>,
    geo: Geometry,
    size: u64,
    version: u32,
    read_only: bool,
    compression: CompressionType,
    backing: Option<Arc<dyn BlockDev>>,
    backing_spec: Option<BackingSpec>,
    meta: Mutex<Meta>,
    alloc_done: Condvar,
    gate: RwLock<()>,
    corrupt: AtomicBool,
    closed: AtomicBool,
    zcache: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// Guest data was written since the last flush started.
    data_written: AtomicBool,
    /// Data clusters allocated by guest writes since open (statistics only).
    clusters_allocated: AtomicU64,
}

impl std::fmt::Debug for QcowImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QcowImage")
            .field("size", &self.size)
            .field("cluster_size", &self.geo.cluster_size())
            .field("read_only", &self.read_only)
            .field("backing", &self.backing_spec)
            .finish()
    }
}

impl QcowImage {
    /// Opens an image over `io`. `backing` must be supplied iff the header names a backing
    /// file (see [`ImageHeader::read`] to learn it first). Read-write opens of a dirty image
    /// rebuild its refcounts first; read-write opens set the dirty bit until [`close`].
    ///
    /// [`close`]: QcowImage::close
    pub fn open_with(
        io: Box<dyn HostFile>,
        read_only: bool,
        backing: Option<Arc<dyn BlockDev>>,
    ) -> std::result::Result<QcowImage, OpenImageError> {
        // Every write and sync from here on goes through the replay journal.
        let io = ReplayHost::new(io);
        let ih = ImageHeader::read(&io)?;
        ih.check_features(read_only)?;
        let mut header = ih.header.clone();
        let geo = header.geometry();
        let cs = geo.cluster_size();
        if let Some(spec) = &ih.backing {
            if backing.is_none() {
                return Err(OpenImageError::MissingBacking(spec.name.clone()));
            }
        }
        let backing = if ih.backing.is_some() { backing } else { None };
        let mut l1buf = vec![0u8; header.l1_size as usize * 8];
        io.read_at(&mut l1buf, header.l1_table_offset)?;
        let l1 = table_from_bytes(&l1buf);
        let mut rtbuf = vec![0u8; (u64::from(header.refcount_table_clusters) * cs) as usize];
        io.read_at(&mut rtbuf, header.refcount_table_offset)?;
        let mut reftable = table_from_bytes(&rtbuf);
        if !read_only {
            if header.version >= 3 && header.incompatible_features & incompat::DIRTY != 0 {
                log::warn!("qcow2 image was not closed cleanly; rebuilding refcounts");
                reftable = rebuild_refcounts(&io, &mut header, &l1)?;
            }
            if header.version >= 3 {
                if header.autoclear_features != 0 {
                    header.autoclear_features = 0;
                    io.write_at(&0u64.to_be_bytes(), AUTOCLEAR_FEATURES_OFFSET as u64)?;
                }
                header.incompatible_features |= incompat::DIRTY;
                io.write_at(
                    &header.incompatible_features.to_be_bytes(),
                    INCOMPATIBLE_FEATURES_OFFSET as u64,
                )?;
                io.sync_data()?;
            }
        }
        let file_end = geo
            .align_up(io.len()?)
            .ok_or(format::DecodeError::Overflow("file size"))?;
        let l2_cap = ((32u64 << 20) / cs).clamp(16, 4096) as usize;
        let block_cap = ((8u64 << 20) / cs).clamp(8, 1024) as usize;
        let dirty_cap = ((16u64 << 20) / cs).clamp(8, 1024) as usize;
        let compression = header.compression()?;
        let meta = Meta {
            geo,
            l1,
            l1_dirty: BTreeSet::new(),
            l2: HashMap::new(),
            reftable,
            reftable_dirty: BTreeSet::new(),
            blocks: HashMap::new(),
            file_end,
            free_hint: cs,
            pending_free: Vec::new(),
            inflight: HashSet::new(),
            tick: 0,
            dirty: 0,
            l2_cap,
            block_cap,
            dirty_cap,
            header: header.clone(),
        };
        Ok(QcowImage {
            io,
            geo,
            size: header.size,
            version: header.version,
            read_only,
            compression,
            backing,
            backing_spec: ih.backing,
            meta: Mutex::new(meta),
            alloc_done: Condvar::new(),
            gate: RwLock::new(()),
            corrupt: AtomicBool::new(
                header.incompatible_features & incompat::CORRUPT != 0 && !read_only,
            ),
            closed: AtomicBool::new(false),
            zcache: Mutex::new(None),
            data_written: AtomicBool::new(false),
            clusters_allocated: AtomicU64::new(0),
        })
    }

    /// Overrides the metadata cache bounds: cached L2 tables, cached refcount blocks, and dirty
    /// tables/blocks that force an internal flush (tests use tiny values to exercise eviction).
    pub fn set_cache_limits(&self, l2_tables: usize, refcount_blocks: usize, dirty: usize) {
        let mut m = self.lock();
        m.l2_cap = l2_tables.max(1);
        m.block_cap = refcount_blocks.max(1);
        m.dirty_cap = dirty.max(1);
    }

    /// The cluster geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// A copy of the in-memory header.
    pub fn header(&self) -> Header {
        self.lock().header.clone()
    }

    /// The backing file named by the header.
    pub fn backing_spec(&self) -> Option<&BackingSpec> {
        self.backing_spec.as_ref()
    }

    /// The backing device.
    pub fn backing(&self) -> Option<&Arc<dyn BlockDev>> {
        self.backing.as_ref()
    }

    /// Data clusters allocated by guest writes (copy-on-write or first writes) since the image
    /// was opened; statistics only.
    pub fn clusters_allocated(&self) -> u64 {
        self.clusters_allocated.load(Ordering::Relaxed)
    }

    /// Whether an inconsistency was found (all I/O then fails with `BlockError::Corrupt`).
    pub fn is_corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How `[offset, offset+len)` is stored, as contiguous extents.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_usable()?;
        check_range(offset, len, self.size)?;
        let r = self.lock().map(&self.io, offset, len);
        self.finish(r)
    }

    fn check_usable(&self) -> Result<()> {
        if self.corrupt.load(Ordering::Acquire) {
            return Err(BlockError::Corrupt("image is marked corrupt".into()));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(BlockError::Unsupported("image is closed"));
        }
        self.check_usable()?;
        self.check_durable()
    }

    /// Fails with EIO once a failed sync could not be repaired (see [`ReplayHost`]): from then
    /// on no write, flush or close may succeed, and the dirty bit stays set.
    fn check_durable(&self) -> Result<()> {
        if self.io.is_poisoned() {
            return Err(BlockError::Io(io::Error::from_raw_os_error(libc::EIO)));
        }
        Ok(())
    }

    /// Whether a failed sync of the image file could not be repaired: every later write,
    /// flush and close then fails with EIO (reads still work).
    pub fn is_poisoned(&self) -> bool {
        self.io.is_poisoned()
    }

    /// Marks the image corrupt when an operation found an inconsistency.
    fn finish<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(BlockError::Corrupt(msg)) = &r {
            if !self.corrupt.swap(true, Ordering::AcqRel) {
                log::error!("qcow2 image corrupt: {msg}; further I/O is refused");
                if !self.read_only {
                    let mut m = self.lock();
                    m.header.incompatible_features |= incompat::CORRUPT;
                    let v = m.header.incompatible_features;
                    drop(m);
                    let _ = self
                        .io
                        .write_at(&v.to_be_bytes(), INCOMPATIBLE_FEATURES_OFFSET as u64);
                    let _ = self.io.sync_data();
                }
            }
        }
        r
    }

    /// Reads guest bytes `[off, off+buf.len())` of the backing device (zeros past its end).
    fn read_backing(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let avail = bsize.saturating_sub(off).min(buf.len() as u64) as usize;
        if avail > 0 {
            b.read_at(&mut buf[..avail], off).map_err(|e| match e {
                BlockError::Corrupt(m) => {
                    BlockError::Io(io::Error::other(format!("backing image corrupt: {m}")))
                }
                other => other,
            })?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    fn decompressed(&self, d: CompressedDescriptor) -> Result<Arc<Vec<u8>>> {
        let key = d.host_offset;
        if let Some((k, data)) = &*self.zcache.lock().unwrap_or_else(|e| e.into_inner()) {
            if *k == key {
                return Ok(data.clone());
            }
        }
        let mut input = vec![0u8; d.byte_len() as usize];
        self.io.read_at(&mut input, d.host_offset)?;
        let mut out = vec![0u8; self.geo.cluster_size() as usize];
        decompress(self.compression, &input, &mut out)
            .map_err(|e| corrupt(format!("compressed cluster at {:#x}: {e}", d.host_offset)))?;
        let out = Arc::new(out);
        *self.zcache.lock().unwrap_or_else(|e| e.into_inner()) = Some((key, out.clone()));
        Ok(out)
    }

    fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let extents = self.lock().map(&self.io, offset, buf.len() as u64)?;
        for e in extents {
            let s = (e.offset - offset) as usize;
            let part = &mut buf[s..s + e.len as usize];
            match e.mapping {
                Mapping::Data(h) => self.io.read_at(part, h)?,
                Mapping::Zero => part.fill(0),
                Mapping::Unallocated => self.read_backing(part, e.offset)?,
                Mapping::Compressed(d) => {
                    let data = self.decompressed(d)?;
                    let in_off = self.geo.offset_in_cluster(e.offset) as usize;
                    part.copy_from_slice(&data[in_off..in_off + part.len()]);
                }
            }
        }
        Ok(())
    }

    /// The guest-visible content of cluster `gc` before this write (`out` is one cluster).
    fn old_content(&self, gc: u64, fill: Fill, out: &mut [u8]) -> Result<()> {
        let start = gc << self.geo.cluster_bits;
        let visible = self.size.saturating_sub(start).min(out.len() as u64) as usize;
        out[visible..].fill(0);
        let vis = &mut out[..visible];
        match fill {
            Fill::Zero => vis.fill(0),
            Fill::Backing => self.read_backing(vis, start)?,
            Fill::Host(h) => self.io.read_at(vis, h)?,
            Fill::Compressed(d) => {
                let data = self.decompressed(d)?;
                vis.copy_from_slice(&data[..visible]);
            }
            Fill::Mapped => self.read_inner(vis, start)?,
        }
        Ok(())
    }

    /// Plans a write of `[pos, pos+n)` (inside guest cluster `gc`) into an image with extended
    /// L2 entries: in place when every touched subcluster is allocated, else an allocation of
    /// just the touched subclusters (in the cluster's own host cluster, or a new one), else (a
    /// compressed or shared cluster) a copy of the whole cluster.
    fn plan_subclusters(&self, m: &mut Meta, gc: u64, pos: u64, n: u64) -> Result<Step> {
        let (e, bitmap) = m.sub_entry(&self.io, gc)?;
        let g = self.geo;
        let ss = g.subcluster_size();
        let first = g.subcluster_index(pos);
        let last = g.subcluster_index(pos + n - 1);
        let mask = subcluster_mask(first, last);
        let allocated = |i: u32| subcluster_state(bitmap, i) == Subcluster::Data;
        let (target, fresh) = match e {
            L2Entry::Normal { host, copied: true } if bitmap & mask == mask => {
                return Ok(Step::Direct {
                    host: host + g.offset_in_cluster(pos),
                    guest: pos,
                    len: n,
                });
            }
            L2Entry::Normal { host, copied: true } => (host, false),
            L2Entry::Unallocated | L2Entry::Zero { host: None } => (0, true),
            other => {
                let fill = match other {
                    L2Entry::Compressed(d) => Fill::Compressed(d),
                    _ => Fill::Mapped,
                };
                return Ok(Step::Alloc {
                    gc,
                    target: 0,
                    fresh: true,
                    fill,
                    guest: pos,
                    len: n,
                    sub: None,
                });
            }
        };
        let start = if allocated(first) {
            pos
        } else {
            pos & !(ss - 1)
        };
        let end = if allocated(last) {
            pos + n
        } else {
            (pos + n).next_multiple_of(ss)
        };
        Ok(Step::Alloc {
            gc,
            target,
            fresh,
            fill: Fill::Zero,
            guest: pos,
            len: n,
            sub: Some(SubWrite {
                start,
                end,
                mask,
                bitmap,
            }),
        })
    }

    /// Fills `buf` (inside one unallocated or zero subcluster, at guest `off`) with that
    /// subcluster's guest-visible content.
    fn subcluster_fill(&self, bitmap: u64, off: u64, buf: &mut [u8]) -> Result<()> {
        match subcluster_state(bitmap, self.geo.subcluster_index(off)) {
            Subcluster::Zero => {
                buf.fill(0);
                Ok(())
            }
            _ => self.read_backing(buf, off),
        }
    }

    /// One pass of a write: plan under the lock, write data unlocked, publish under the lock.
    /// Returns the ranges that another request was allocating.
    fn write_pass(&self, buf: &[u8], offset: u64) -> Result<Vec<(u64, u64)>> {
        let cs = self.geo.cluster_size();
        let end = offset + buf.len() as u64;
        let mut steps: Vec<Step> = Vec::new();
        {
            let mut m = self.lock();
            let mut pos = offset;
            let mut fresh = 0u64;
            let plan = (|| -> Result<()> {
                while pos < end {
                    let gc = pos >> self.geo.cluster_bits;
                    let in_off = pos & (cs - 1);
                    let n = (cs - in_off).min(end - pos);
                    if m.inflight.contains(&gc) {
                        steps.push(Step::Blocked { guest: pos, len: n });
                    } else {
                        let e = m.entry(&self.io, gc)?;
                        let step = match e {
                            _ if self.geo.extended_l2 => {
                                self.plan_subclusters(&mut m, gc, pos, n)?
                            }
                            L2Entry::Normal { host, copied: true } => Step::Direct {
                                host: host + in_off,
                                guest: pos,
                                len: n,
                            },
                            L2Entry::Zero { host: Some(h) } => Step::Alloc {
                                gc,
                                target: h,
                                fresh: false,
                                fill: Fill::Zero,
                                guest: pos,
                                len: n,
                                sub: None,
                            },
                            L2Entry::Normal {
                                host,
                                copied: false,
                            } => Step::Alloc {
                                gc,
                                target: 0,
                                fresh: true,
                                fill: Fill::Host(host),
                                guest: pos,
                                len: n,
                                sub: None,
                            },
                            L2Entry::Zero { host: None } => Step::Alloc {
                                gc,
                                target: 0,
                                fresh: true,
                                fill: Fill::Zero,
                                guest: pos,
                                len: n,
                                sub: None,
                            },
                            L2Entry::Unallocated => Step::Alloc {
                                gc,
                                target: 0,
                                fresh: true,
                                fill: if self.backing.is_some() {
                                    Fill::Backing
                                } else {
                                    Fill::Zero
                                },
                                guest: pos,
                                len: n,
                                sub: None,
                            },
                            L2Entry::Compressed(d) => Step::Alloc {
                                gc,
                                target: 0,
                                fresh: true,
                                fill: Fill::Compressed(d),
                                guest: pos,
                                len: n,
                                sub: None,
                            },
                        };
                        if let Step::Alloc { fresh: f, .. } = step {
                            m.inflight.insert(gc);
                            if f {
                                fresh += 1;
                            }
                        }
                        steps.push(step);
                    }
                    pos += n;
                }
                if fresh > 0 {
                    let base = m.alloc(&self.io, fresh)?;
                    self.clusters_allocated.fetch_add(fresh, Ordering::Relaxed);
                    let mut k = 0;
                    for s in steps.iter_mut() {
                        if let Step::Alloc {
                            target,
                            fresh: true,
                            ..
                        } = s
                        {
                            *target = base + k * cs;
                            k += 1;
                        }
                    }
                }
                Ok(())
            })();
            if let Err(e) = plan {
                for s in &steps {
                    if let Step::Alloc { gc, .. } = s {
                        m.inflight.remove(gc);
                    }
                }
                drop(m);
                self.alloc_done.notify_all();
                return Err(e);
            }
        }

        let data = self.write_data(buf, offset, &steps);
        // Set only after the data writes returned: a flush that clears the flag earlier must
        // not cause a later flush to skip syncing them.
        self.data_written.store(true, Ordering::Release);

        let mut blocked = Vec::new();
        let mut m = self.lock();
        // How many allocations got their L2 entry: those clusters are referenced now and must
        // never be freed by the undo below, even if a later entry of the same write fails.
        let mut published = 0usize;
        let publish = (|| -> Result<()> {
            data?;
            for s in &steps {
                if let Step::Alloc {
                    gc, target, sub, ..
                } = *s
                {
                    let (old, old_bitmap) = m.sub_entry(&self.io, gc)?;
                    // Subcluster writes allocate what they wrote; other allocations wrote the
                    // whole cluster.
                    let bitmap = match sub {
                        Some(w) => (old_bitmap | w.mask) & !(w.mask << 32),
                        None => L2_BITMAP_ALL_ALLOC,
                    };
                    m.set_entry(&self.io, gc, target | OFLAG_COPIED, bitmap)?;
                    m.release(old, Some(target));
                    published += 1;
                }
            }
            Ok(())
        })();
        let mut undo = Vec::new();
        let mut alloc_no = 0usize;
        for s in &steps {
            match *s {
                Step::Alloc {
                    gc, target, fresh, ..
                } => {
                    m.inflight.remove(&gc);
                    if publish.is_err() && fresh && alloc_no >= published {
                        undo.push(target);
                    }
                    alloc_no += 1;
                }
                Step::Blocked { guest, len } => blocked.push((guest, len)),
                Step::Direct { .. } => {}
            }
        }
        // Clusters never referenced can be released at once (best effort on the error path).
        if !undo.is_empty() {
            let _ = m.apply_frees(&self.io, undo);
        }
        let r = publish.and_then(|()| m.maybe_flush(&self.io));
        drop(m);
        self.alloc_done.notify_all();
        r.map(|()| blocked)
    }

    fn write_data(&self, buf: &[u8], offset: u64, steps: &[Step]) -> Result<()> {
        let cs = self.geo.cluster_size();
        let slice = |guest: u64, len: u64| {
            let s = (guest - offset) as usize;
            &buf[s..s + len as usize]
        };
        let mut i = 0;
        while i < steps.len() {
            match steps[i] {
                Step::Direct { host, guest, len } => {
                    // Coalesce host- and guest-contiguous in-place writes.
                    let (mut tot, mut j) = (len, i + 1);
                    while let Some(Step::Direct {
                        host: h2,
                        guest: g2,
                        len: l2,
                    }) = steps.get(j)
                    {
                        if *h2 != host + tot || *g2 != guest + tot {
                            break;
                        }
                        tot += l2;
                        j += 1;
                    }
                    self.io.write_at(slice(guest, tot), host)?;
                    i = j;
                }
                Step::Alloc {
                    gc,
                    target,
                    fill,
                    guest,
                    len,
                    sub,
                    ..
                } => {
                    if len == cs {
                        let (mut tot, mut j) = (len, i + 1);
                        while let Some(Step::Alloc {
                            target: t2,
                            guest: g2,
                            len: l2,
                            ..
                        }) = steps.get(j)
                        {
                            if *l2 != cs || *t2 != target + tot || *g2 != guest + tot {
                                break;
                            }
                            tot += l2;
                            j += 1;
                        }
                        self.io.write_at(slice(guest, tot), target)?;
                        i = j;
                    } else if let Some(w) = sub {
                        let mut b = vec![0u8; (w.end - w.start) as usize];
                        let head = (guest - w.start) as usize;
                        self.subcluster_fill(w.bitmap, w.start, &mut b[..head])?;
                        b[head..head + len as usize].copy_from_slice(slice(guest, len));
                        let tail = guest + len;
                        self.subcluster_fill(w.bitmap, tail, &mut b[head + len as usize..])?;
                        self.io
                            .write_at(&b, target + self.geo.offset_in_cluster(w.start))?;
                        i += 1;
                    } else {
                        let mut cbuf = vec![0u8; cs as usize];
                        self.old_content(gc, fill, &mut cbuf)?;
                        let in_off = self.geo.offset_in_cluster(guest) as usize;
                        cbuf[in_off..in_off + len as usize].copy_from_slice(slice(guest, len));
                        self.io.write_at(&cbuf, target)?;
                        i += 1;
                    }
                }
                Step::Blocked { .. } => i += 1,
            }
        }
        Ok(())
    }

    /// Waits until no cluster of `[off, off+len)` has an allocation in flight.
    fn wait_inflight<'a>(
        &'a self,
        mut m: MutexGuard<'a, Meta>,
        off: u64,
        len: u64,
    ) -> MutexGuard<'a, Meta> {
        if len == 0 {
            return m;
        }
        let first = off >> self.geo.cluster_bits;
        let last = (off + len - 1) >> self.geo.cluster_bits;
        while (first..=last).any(|gc| m.inflight.contains(&gc)) {
            m = self.alloc_done.wait(m).unwrap_or_else(|e| e.into_inner());
        }
        m
    }

    fn write_inner(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut todo = vec![(offset, buf.len() as u64)];
        while let Some((off, len)) = todo.pop() {
            let s = (off - offset) as usize;
            let blocked = self.write_pass(&buf[s..s + len as usize], off)?;
            for (boff, blen) in blocked {
                drop(self.wait_inflight(self.lock(), boff, blen));
                todo.push((boff, blen));
            }
        }
        Ok(())
    }

    /// Whether guest cluster `gc` currently reads as all zeros without I/O.
    fn reads_zero(&self, m: &mut Meta, gc: u64) -> Result<bool> {
        Ok(match m.entry(&self.io, gc)? {
            L2Entry::Zero { .. } => true,
            L2Entry::Unallocated => match &self.backing {
                None => true,
                Some(b) => (gc << self.geo.cluster_bits) >= b.size(),
            },
            _ => false,
        })
    }

    /// Writes zeros over each range (each at most one cluster), with the usual COW.
    fn write_zero_ranges(&self, ranges: Vec<(u64, u64)>) -> Result<()> {
        if !ranges.is_empty() {
            let zeros = vec![0u8; self.geo.cluster_size() as usize];
            for (off, n) in ranges {
                self.write_inner(&zeros[..n as usize], off)?;
            }
        }
        Ok(())
    }

    /// Whether guest range `[off, off+len)` reads as zeros without data I/O.
    fn range_reads_zero(&self, m: &mut Meta, off: u64, len: u64) -> Result<bool> {
        let bsize = self.backing.as_ref().map_or(0, |b| b.size());
        Ok(m.map(&self.io, off, len)?.iter().all(|e| match e.mapping {
            Mapping::Zero => true,
            Mapping::Unallocated => e.offset >= bsize,
            _ => false,
        }))
    }

    /// Write-zeroes and discard with extended L2 entries: whole clusters become zero (keeping
    /// their host cluster when `!unmap` and it is writable in place), whole subclusters get
    /// their zero bit, and only the partly covered subclusters at the ends are written with
    /// zeros (unless they read as zeros already). A compressed or shared cluster is written
    /// with zeros instead.
    fn zero_subclusters(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let ss = g.subcluster_size();
        let end = offset + len;
        let mut partial: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let gc = pos >> g.cluster_bits;
            let cstart = gc << g.cluster_bits;
            let vis_end = (cstart + cs).min(self.size);
            let n = (cstart + cs).min(end) - pos;
            let mut m = self.wait_inflight(self.lock(), pos, n);
            let l1i = (gc / g.l2_entries()) as usize;
            if self.backing.is_none() && m.l1.get(l1i).is_none_or(|&e| l1_entry_offset(e) == 0) {
                // Nothing mapped by this L2 table: it all reads as zeros already.
                pos = ((l1i as u64 + 1) * g.l2_coverage()).min(end);
                continue;
            }
            let (old, bitmap) = m.sub_entry(&self.io, gc)?;
            let raw_old = old.encode(&g);
            if pos == cstart && end >= vis_end {
                let new = match old {
                    L2Entry::Normal { host, copied: true } if !unmap => host | OFLAG_COPIED,
                    _ => 0,
                };
                if (new, L2_BITMAP_ALL_ZERO) != (raw_old, bitmap) {
                    m.set_entry(&self.io, gc, new, L2_BITMAP_ALL_ZERO)?;
                    m.release(old, Some(new & format::L2E_OFFSET_MASK).filter(|&h| h != 0));
                }
            } else {
                let a = pos.next_multiple_of(ss);
                let b = (pos + n) & !(ss - 1);
                let in_place = matches!(
                    old,
                    L2Entry::Normal { copied: true, .. } | L2Entry::Unallocated
                );
                let mut edges = vec![];
                if a < b && in_place {
                    let mask = subcluster_mask(g.subcluster_index(a), g.subcluster_index(b - 1));
                    let new = (bitmap & !mask) | (mask << 32);
                    if new != bitmap {
                        m.set_entry(&self.io, gc, raw_old, new)?;
                    }
                    edges.push((pos, a - pos));
                    edges.push((b, pos + n - b));
                } else {
                    edges.push((pos, n));
                }
                for (o, l) in edges {
                    if l > 0 && !self.range_reads_zero(&mut m, o, l)? {
                        partial.push((o, l));
                    }
                }
            }
            m.maybe_flush(&self.io)?;
            pos += n;
        }
        self.write_zero_ranges(partial)
    }

    fn zero_inner(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        if self.geo.extended_l2 {
            return self.zero_subclusters(offset, len, unmap);
        }
        let cs = self.geo.cluster_size();
        let end = offset + len;
        let mut partial: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let gc = pos >> self.geo.cluster_bits;
            let cstart = gc << self.geo.cluster_bits;
            let vis_end = (cstart + cs).min(self.size);
            let n = (cstart + cs).min(end) - pos;
            let whole = pos == cstart && end >= vis_end;
            let mut m = self.wait_inflight(self.lock(), pos, n);
            if !whole {
                if !self.reads_zero(&mut m, gc)? {
                    partial.push((pos, n));
                }
                pos += n;
                continue;
            }
            // Skip an entire unmapped L2 range at once when it already reads as zeros.
            let l1i = (gc / self.geo.l2_entries()) as usize;
            if self.backing.is_none() && m.l1.get(l1i).is_none_or(|&e| l1_entry_offset(e) == 0) {
                let next = ((l1i as u64 + 1) * self.geo.l2_coverage()).min(end);
                // Only whole clusters are skipped; a trailing partial one is handled next round.
                pos = next;
                continue;
            }
            let old = m.entry(&self.io, gc)?;
            if self.version >= 3 {
                let new = match old {
                    L2Entry::Unallocated if self.backing.is_none() => None,
                    L2Entry::Zero { host: Some(_) } if !unmap => None,
                    L2Entry::Zero { host: None } => None,
                    L2Entry::Normal { host, copied: true } if !unmap => {
                        Some(L2Entry::Zero { host: Some(host) })
                    }
                    _ => Some(L2Entry::Zero { host: None }),
                };
                if let Some(new) = new {
                    let keep = match new {
                        L2Entry::Zero { host } => host,
                        _ => None,
                    };
                    m.set_entry(&self.io, gc, new.encode(&self.geo), 0)?;
                    m.release(old, keep);
                }
            } else if self.backing.is_some() {
                if !self.reads_zero(&mut m, gc)? {
                    partial.push((pos, n));
                }
            } else if old != L2Entry::Unallocated {
                m.set_entry(&self.io, gc, 0, 0)?;
                m.release(old, None);
            }
            m.maybe_flush(&self.io)?;
            pos += n;
        }
        self.write_zero_ranges(partial)
    }

    fn flush_inner(&self) -> Result<()> {
        let frees = {
            let mut m = self.lock();
            // Cleared before the sync so writes completing during it are synced next time.
            let written = self.data_written.swap(false, Ordering::AcqRel);
            m.flush_meta(&self.io, written)?;
            std::mem::take(&mut m.pending_free)
        };
        if !frees.is_empty() {
            // No request may still hold a mapping to a cluster that is about to become free.
            let _excl = self.gate.write().unwrap_or_else(|e| e.into_inner());
            self.lock().apply_frees(&self.io, frees)?;
        }
        Ok(())
    }

    /// Flushes everything, clears the dirty bit and stops accepting writes. Called by `Drop`
    /// if not called explicitly.
    pub fn close(&self) -> Result<()> {
        if self.read_only || self.closed.load(Ordering::Acquire) || self.is_corrupt() {
            return Ok(());
        }
        self.check_durable()?;
        // The second flush makes the refcount decrements of the first one durable.
        let r = self.flush_inner().and_then(|()| self.flush_inner());
        let r = self.finish(r);
        r?;
        self.closed.store(true, Ordering::Release);
        if self.version >= 3 {
            let mut m = self.lock();
            m.header.incompatible_features &= !incompat::DIRTY;
            let v = m.header.incompatible_features;
            self.io
                .write_at(&v.to_be_bytes(), INCOMPATIBLE_FEATURES_OFFSET as u64)?;
            self.io.sync_data()?;
        }
        Ok(())
    }

    /// Makes every guest cluster unallocated again (reads fall through to the backing file),
    /// freeing the data clusters, and flushes. Used after committing into the backing file.
    pub fn make_empty(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        self.check_writable()?;
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let r = (|| -> Result<()> {
            let total = self.geo.l1_entries_for(self.size).unwrap_or(0);
            let l2e = self.geo.l2_entries();
            for l1i in 0..total {
                let base = l1i * self.geo.l2_coverage();
                let span = self.geo.l2_coverage().min(self.size.saturating_sub(base));
                let mut m = self.wait_inflight(self.lock(), base, span);
                if m.l1
                    .get(l1i as usize)
                    .is_none_or(|&e| l1_entry_offset(e) == 0)
                {
                    continue;
                }
                for k in 0..l2e {
                    let gc = l1i * l2e + k;
                    if gc << self.geo.cluster_bits >= self.size {
                        break;
                    }
                    let old = m.entry(&self.io, gc)?;
                    if m.raw_entry(&self.io, gc)? != (0, 0) {
                        m.set_entry(&self.io, gc, 0, 0)?;
                        m.release(old, None);
                    }
                }
                m.maybe_flush(&self.io)?;
                drop(m);
                progress(l1i + 1, total);
            }
            Ok(())
        })();
        drop(_g);
        let r = r
            .and_then(|()| self.flush_inner())
            .and_then(|()| self.flush_inner());
        self.finish(r)
    }
}

impl BlockDev for QcowImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_usable()?;
        check_range(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let r = self.read_inner(buf, offset);
        drop(_g);
        self.finish(r)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_range(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let r = self.write_inner(buf, offset);
        drop(_g);
        self.finish(r)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // A closed image has nothing unflushed, unless durability was lost before.
        self.check_durable()?;
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.check_writable()?;
        let r = self.flush_inner();
        self.finish(r)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let r = self.zero_inner(offset, len, unmap);
        drop(_g);
        self.finish(r)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

impl Drop for QcowImage {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::error!("closing qcow2 image failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;
    use crate::create::{create_on, CreateOptions};
    use crate::host::MemHost;

    /// A file whose failed syncs drop the unsynced writes (Linux "fsyncgate"); `fail_syncs`
    /// syncs fail once armed.
    struct LossyHost {
        file: MemHost,
        synced: Mutex<Vec<u8>>,
        fail_syncs: AtomicU32,
    }

    impl HostFile for LossyHost {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.file.read_at(buf, offset)
        }

        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.file.write_at(buf, offset)
        }

        fn sync_data(&self) -> io::Result<()> {
            let mut synced = self.synced.lock().unwrap();
            if self.fail_syncs.load(Ordering::SeqCst) > 0 {
                self.fail_syncs.fetch_sub(1, Ordering::SeqCst);
                let old = synced.clone();
                self.file.set_len(0)?;
                self.file.write_at(&old, 0)?;
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            *synced = self.file.contents();
            Ok(())
        }

        fn len(&self) -> io::Result<u64> {
            self.file.len()
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            self.file.set_len(len)
        }
    }

    fn lossy_image() -> (Arc<LossyHost>, QcowImage) {
        let host = Arc::new(LossyHost {
            file: MemHost::default(),
            synced: Mutex::new(Vec::new()),
            fail_syncs: AtomicU32::new(0),
        });
        let opts = CreateOptions {
            size: 1 << 20,
            cluster_size: 4096,
            ..CreateOptions::default()
        };
        create_on(&*host, &opts).unwrap();
        host.sync_data().unwrap();
        let img = QcowImage::open_with(Box::new(host.clone()), false, None).unwrap();
        (host, img)
    }

    fn dirty_bit_on_disk(host: &LossyHost) -> bool {
        let durable = MemHost::new(host.synced.lock().unwrap().clone());
        let h = ImageHeader::read(&durable).unwrap();
        h.header.incompatible_features & incompat::DIRTY != 0
    }

    #[test]
    fn a_sync_failure_that_the_replay_cannot_repair_fails_every_later_flush_write_and_close() {
        let (host, img) = lossy_image();
        img.write_at(&[0xaa; 4096], 0).unwrap();
        img.flush().unwrap();
        img.write_at(&[0xbb; 4096], 8192).unwrap();
        // The sync fails and so does the one after the replay: the write may be lost.
        host.fail_syncs.store(2, Ordering::SeqCst);
        let e = img.flush().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(img.is_poisoned());
        // The file syncs fine again, but nothing may claim durability any more.
        for _ in 0..2 {
            assert_eq!(img.flush().unwrap_err().raw_os_error(), Some(libc::EIO));
        }
        let w = img.write_at(&[0xcc; 512], 0).unwrap_err();
        assert_eq!(w.raw_os_error(), Some(libc::EIO));
        assert_eq!(
            img.write_zeroes(0, 4096, true).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        let mut b = [0u8; 512];
        img.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0xaa; 512]);
        assert_eq!(img.close().unwrap_err().raw_os_error(), Some(libc::EIO));
        drop(img);
        assert!(dirty_bit_on_disk(&host), "the dirty bit was cleared");
    }

    #[test]
    fn a_sync_failure_repaired_by_the_replay_leaves_the_image_fully_usable() {
        let (host, img) = lossy_image();
        img.write_at(&[0xbb; 4096], 8192).unwrap();
        host.fail_syncs.store(1, Ordering::SeqCst);
        img.flush().unwrap();
        assert!(!img.is_poisoned());
        img.close().unwrap();
        assert!(!dirty_bit_on_disk(&host));
        let synced = MemHost::new(host.synced.lock().unwrap().clone());
        let img = QcowImage::open_with(Box::new(synced), true, None).unwrap();
        let mut b = [0u8; 4096];
        img.read_at(&mut b, 8192).unwrap();
        assert_eq!(b, [0xbb; 4096]);
    }
}
