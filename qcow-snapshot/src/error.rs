//! Error enums of the image-level operations (open, create, commit, export, ...), each named
//! after the action that failed. Block I/O itself reports `blockdev::BlockError`.
//!
//! Locking model: none; plain data.

use std::io;
use std::path::PathBuf;

use crate::format::DecodeError;
use crate::refcount::RebuildRefcountsError;

/// Why an image (or one file of its backing chain) could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenImageError {
    /// The file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The backing file of `image` could not be opened (missing, unreadable, in use).
    #[error("{} (backing file of {}): {source}", path.display(), image.display())]
    BackingIo {
        /// The backing file.
        path: PathBuf,
        /// The image whose backing file it is.
        image: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// I/O on an already open image file failed.
    #[error("I/O error: {0}")]
    HostIo(#[from] io::Error),
    /// The header or a header extension is invalid.
    #[error("invalid qcow2 image: {0}")]
    Format(#[from] DecodeError),
    /// The image uses a feature this implementation cannot handle at all.
    #[error("unsupported qcow2 feature: {0}")]
    Unsupported(String),
    /// The image can only be opened read-only.
    #[error("image cannot be opened read-write: {0}")]
    ReadOnlyOnly(String),
    /// The image declares a backing file but none was supplied.
    #[error("image has backing file {0:?} but no backing device was supplied")]
    MissingBacking(String),
    /// The backing chain refers to a file already in the chain.
    #[error("backing chain loop: {} is already part of the chain", .0.display())]
    BackingLoop(PathBuf),
    /// The backing chain is longer than the limit.
    #[error("backing chain deeper than {0} images")]
    ChainTooDeep(usize),
    /// A backing format other than raw or qcow2.
    #[error("unsupported backing file format {0:?}")]
    BackingFormat(String),
    /// Refcount repair of a dirty image failed.
    #[error("refcount repair of dirty image failed: {0}")]
    Repair(#[from] RebuildRefcountsError),
    /// The image's metadata is inconsistent.
    #[error("image is corrupt: {0}")]
    Corrupt(String),
    /// A backing file breaks the backing-file policy.
    #[error(transparent)]
    Refused(#[from] crate::policy::PolicyError),
}

/// Why an image could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateImageError {
    /// Cluster size not a power of two in 512 B..=2 MiB.
    #[error("invalid cluster size {0} (must be a power of two from 512 to 2097152)")]
    ClusterSize(u64),
    /// Extended L2 entries with a cluster size below 16 KiB (QEMU's limit).
    #[error("extended L2 entries need a cluster size of at least 16384 (got {0})")]
    ExtendedL2ClusterSize(u64),
    /// refcount_order above 6.
    #[error("invalid refcount order {0} (must be 0..=6)")]
    RefcountOrder(u32),
    /// Virtual size not a multiple of 512, or too large for the format or the cluster size.
    #[error("invalid virtual size {0} (must be a multiple of 512 that the L1 table can map)")]
    Size(u64),
    /// The backing file name is too long or not valid UTF-8.
    #[error("invalid backing file name: {0}")]
    BackingName(String),
    /// The new image would be its own backing file or a file of its backing chain.
    #[error("{}: the image would back onto itself (it is the backing file or part of its chain); refusing to overwrite it", .0.display())]
    SelfBacking(PathBuf),
    /// The backing file could not be opened to learn its size.
    #[error("cannot open backing file: {0}")]
    Backing(Box<OpenImageError>),
    /// Writing the image failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The image path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Laying out the refcount structure failed.
    #[error("{0}")]
    Layout(#[from] RebuildRefcountsError),
}

/// Why a long-running image operation (commit, export, checksum, info) failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageOpError {
    /// Opening an image failed.
    #[error(transparent)]
    Open(#[from] OpenImageError),
    /// Creating an image failed.
    #[error(transparent)]
    Create(#[from] CreateImageError),
    /// Block I/O failed.
    #[error("block I/O failed: {0}")]
    Block(#[from] blockdev::BlockError),
    /// File I/O failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The operation does not apply to this image.
    #[error("{0}")]
    Invalid(String),
}
