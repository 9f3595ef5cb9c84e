//! Creation of new qcow2 v3 images (compat=1.1), laid out the way `qemu-img create -f qcow2`
//! lays them out: header cluster (header, backing-format extension, feature-name table when it
//! fits, backing file name), the L1 table, then the refcount table and blocks.
//!
//! Locking model: none; a new image belongs to its creator until the function returns.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::CreateImageError;
use crate::format::{
    default_feature_names, incompat, serialize_extensions, Geometry, Header, HeaderExtension,
    DEFAULT_CLUSTER_BITS, DEFAULT_REFCOUNT_ORDER, MAX_BACKING_FILE_NAME, MAX_CLUSTER_BITS,
    MAX_L1_BYTES, MAX_REFCOUNT_ORDER, MIN_CLUSTER_BITS, MIN_EXTENDED_L2_CLUSTER_BITS,
};
use crate::host::{FileHost, HostFile};
use crate::refcount::{build_layout, write_layout};
use crate::Format;

/// Parameters of a new image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes; 0 with a backing file means "the backing file's size".
    pub size: u64,
    /// Cluster size in bytes (power of two, 512 B..=2 MiB).
    pub cluster_size: u64,
    /// Backing file name as it will be stored (relative names are relative to the new image's
    /// directory) and its format.
    pub backing: Option<(String, Format)>,
    /// log2 of the refcount width (0..=6).
    pub refcount_order: u32,
    /// 128-bit L2 entries with 32 subclusters per cluster (`extended_l2=on`); needs a
    /// cluster size of at least 16 KiB, as in QEMU.
    pub extended_l2: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 1 << DEFAULT_CLUSTER_BITS,
            backing: None,
            refcount_order: DEFAULT_REFCOUNT_ORDER,
            extended_l2: false,
        }
    }
}

/// Creates a new image file at `path` (truncating any existing file).
///
/// Refuses, leaving every file untouched, when `path` is the backing file or any file of the
/// backing chain (compared by device and inode) or when another process has `path` locked. The
/// backing chain is opened force-shared, like `qemu-img create` does, to learn its size and
/// files; when it cannot be opened but a size was given, only the named backing file itself is
/// compared.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<(), CreateImageError> {
    let io_err = |source| CreateImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = opts.clone();
    let mut chain = Vec::new();
    // Kept open until the new image is written, so the compared files cannot be replaced.
    let mut _backing_dev = None;
    if let Some((name, fmt)) = &opts.backing {
        let base = crate::api::resolve_backing_path(path, name);
        if crate::nbd::is_nbd_name(name) {
            // A name that is no valid NBD URI could never be opened: refuse it even with a size.
            crate::nbd::parse(name).map_err(|e| CreateImageError::Backing(Box::new(e)))?;
        }
        let opened = if crate::nbd::is_nbd_name(name) {
            // An NBD base: its size comes from the server; it is no file `path` could be.
            let mut seen = Vec::new();
            crate::nbd::open_backing(name, Some(*fmt), 1, &mut seen, &Default::default())
                .map(|dev| (dev, Vec::new()))
        } else {
            blockdev::lock::with_force_share(|| {
                crate::api::open_image_chain(&base, Some(*fmt), true)
            })
        };
        match opened {
            Ok((dev, ids)) => {
                if opts.size == 0 {
                    opts.size = dev.size();
                }
                chain = ids;
                _backing_dev = Some(dev);
            }
            Err(e) if opts.size == 0 => return Err(CreateImageError::Backing(Box::new(e))),
            Err(_) => {
                if let Ok(md) = std::fs::metadata(&base) {
                    chain.push((md.dev(), md.ino()));
                }
            }
        }
    }
    if let Ok(md) = std::fs::metadata(path) {
        if chain.contains(&(md.dev(), md.ino())) {
            return Err(CreateImageError::SelfBacking(path.to_path_buf()));
        }
    }
    // Options that cannot make an image are refused before the target is touched.
    validate(&opts)?;
    // Open without truncating, lock as a writer, and only then empty the file: an image another
    // process uses is refused intact.
    let file = crate::output::open_target(path).map_err(io_err)?;
    let md = file.metadata().map_err(io_err)?;
    if chain.contains(&(md.dev(), md.ino())) {
        return Err(CreateImageError::SelfBacking(path.to_path_buf()));
    }
    file.set_len(0).map_err(io_err)?;
    let host = FileHost::new(file);
    create_on(&host, &opts).map_err(|e| match e {
        CreateImageError::Io { source, .. } => io_err(source),
        other => other,
    })
}

/// Checks `opts` the way the image would be laid out: cluster size, refcount order, extended-L2
/// cluster size and the virtual size. Returns the geometry and the L1 table's entry count.
fn validate(opts: &CreateOptions) -> Result<(Geometry, u64), CreateImageError> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two()
        || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cs.trailing_zeros())
    {
        return Err(CreateImageError::ClusterSize(cs));
    }
    if opts.refcount_order > MAX_REFCOUNT_ORDER {
        return Err(CreateImageError::RefcountOrder(opts.refcount_order));
    }
    if opts.extended_l2 && cs.trailing_zeros() < MIN_EXTENDED_L2_CLUSTER_BITS {
        return Err(CreateImageError::ExtendedL2ClusterSize(cs));
    }
    let g = Geometry {
        extended_l2: opts.extended_l2,
        ..Geometry::standard(cs.trailing_zeros(), opts.refcount_order)
    };
    let l1_size = g
        .l1_entries_for(opts.size)
        .ok_or(CreateImageError::Size(opts.size))?;
    if l1_size * 8 > MAX_L1_BYTES || opts.size > i64::MAX as u64 || !opts.size.is_multiple_of(512) {
        return Err(CreateImageError::Size(opts.size));
    }
    Ok((g, l1_size))
}

/// Writes a new image onto an empty host file.
pub fn create_on(host: &dyn HostFile, opts: &CreateOptions) -> Result<(), CreateImageError> {
    let io_err = |source| CreateImageError::Io {
        path: Default::default(),
        source,
    };
    let (g, l1_size) = validate(opts)?;
    let cs = opts.cluster_size;
    let mut h = Header::new_v3(opts.size, g.cluster_bits, opts.refcount_order);
    h.l1_size = l1_size as u32;
    if opts.extended_l2 {
        h.incompatible_features |= incompat::EXTENDED_L2;
    }
    let l1_clusters = g.clusters_for(l1_size * 8).max(1);
    h.l1_table_offset = cs;

    // Header cluster: header, extensions, backing name.
    let mut exts = Vec::new();
    let mut name = None;
    if let Some((n, fmt)) = &opts.backing {
        if n.is_empty() || n.len() > MAX_BACKING_FILE_NAME as usize {
            return Err(CreateImageError::BackingName(format!(
                "length {} not in 1..=1023",
                n.len()
            )));
        }
        exts.push(HeaderExtension::BackingFormat(fmt.to_string()));
        name = Some(n.as_bytes());
    }
    let name_len = name.map_or(0, |n| n.len());
    let with_table = {
        let mut e = exts.clone();
        e.push(HeaderExtension::FeatureNames(default_feature_names()));
        e
    };
    let hl = h.header_length as usize;
    let area = if hl + serialize_extensions(&with_table).len() + name_len <= cs as usize {
        serialize_extensions(&with_table)
    } else {
        serialize_extensions(&exts)
    };
    if hl + area.len() + name_len > cs as usize {
        return Err(CreateImageError::BackingName(
            "does not fit in the header cluster".into(),
        ));
    }
    if let Some(n) = name {
        h.backing_file_offset = (hl + area.len()) as u64;
        h.backing_file_size = n.len() as u32;
    }

    // Refcounts: header cluster and L1 clusters are in use; the structure goes after them.
    let counts = vec![1u32; 1 + l1_clusters as usize];
    let layout = build_layout(&g, &counts, 1 + l1_clusters)?;
    h.refcount_table_offset = layout.table_offset;
    h.refcount_table_clusters = layout.table_clusters as u32;

    let mut first = h.serialize();
    first.extend_from_slice(&area);
    if let Some(n) = name {
        first.extend_from_slice(n);
    }
    host.set_len(0).map_err(io_err)?;
    host.set_len(layout.end).map_err(io_err)?;
    write_layout(host, &layout).map_err(io_err)?;
    host.write_at(&first, 0).map_err(io_err)?;
    host.sync_data().map_err(io_err)?;
    Ok(())
}
