//! The qcow2 engine and copy-on-write overlays of snapblk.
//!
//! - [`format`]: on-disk structures, no I/O.
//! - [`host`]: the tiny [`HostFile`] trait all image-file I/O goes through.
//! - [`direct`]: O_DIRECT reads and writes with alignment, bounce buffers and short completions.
//! - [`image`]: [`QcowImage`], the engine, a [`blockdev::BlockDev`].
//! - [`create`]: new v3 images. [`refcount`]: refcount layout and dirty-bit repair.
//! - [`policy`]: which files a backing chain may name; format-less backing files are raw.
//! - [`nbd`]: backing images on NBD servers (NBD URIs as backing names).
//! - [`api`]: path-level operations (open with backing chain, info, commit, export, checksum,
//!   snapshot overlays).
//!
//! Locking model: see [`image`]; the other modules are lock-free.

pub mod api;
pub mod check;
pub mod compress;
pub mod convert;
pub mod create;
pub mod direct;
pub mod error;
pub mod format;
pub mod host;
pub mod image;
pub mod info;
pub mod nbd;
pub mod output;
pub mod policy;
pub mod refcount;

pub use api::{
    checksum, checksum_dev, commit, create_snapshot_overlay, export, info, info_chain, info_with,
    open_image, open_image_chain, open_image_with, open_qcow2, open_qcow2_with, probe_bytes,
    probe_format, resolve_backing_path, Format, ImageInfo,
};
pub use create::{create, create_on, CreateOptions};
pub use error::{CreateImageError, ImageOpError, OpenImageError};
pub use host::{FileHost, HostFile, MemHost, GROW_AHEAD};
pub use image::{BackingSpec, Extent, ImageHeader, Mapping, QcowImage};
pub use policy::{BackingPolicy, PolicyError};
