//! Which block device the daemon serves: the single place that turns `serve` arguments into the
//! layer stack behind the virtio-blk front end.
//!
//! Today that is a plain [`blockdev::RawFile`]. When the qcow2 overlay and the folio cache are
//! wired in, only [`open_disk`] changes: it returns the top layer and, if that layer owns a write
//! cache, a [`WriteCacheControl`] for it.
//!
//! Locking model: none here; the returned layers do their own locking.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use blockdev::{BlockDev, RawFile};

use crate::cli::ServeArgs;

/// Switch between write-back and write-through for a layer that owns a write cache.
///
/// The front end calls it when the driver writes the `writeback` field of the config space (and
/// once per connection with the initial mode). If a disk comes with a `WriteCacheControl`, the
/// front end relies on the layer to make writes durable before they complete in write-through
/// mode; without one, the front end issues a `flush()` after every write-type request instead.
pub trait WriteCacheControl: Send + Sync {
    /// `true`: write-back (writes are durable at the next flush). `false`: write-through.
    fn set_writeback(&self, writeback: bool);
}

/// The disk stack the front end serves.
#[derive(Clone)]
pub struct ServedDisk {
    /// The top layer every request goes through.
    pub dev: Arc<dyn BlockDev>,
    /// The write-cache switch of the top layer, if it has a cache of its own.
    pub cache_control: Option<Arc<dyn WriteCacheControl>>,
}

impl std::fmt::Debug for ServedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedDisk")
            .field("size", &self.dev.size())
            .field("read_only", &self.dev.is_read_only())
            .field("cache_control", &self.cache_control.is_some())
            .finish()
    }
}

impl ServedDisk {
    /// A disk without a cache layer of its own.
    pub fn plain(dev: Arc<dyn BlockDev>) -> Self {
        ServedDisk {
            dev,
            cache_control: None,
        }
    }
}

/// Why the image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenDiskError {
    /// The image file could not be opened or sized.
    #[error("cannot open image {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Opens the block device stack that `serve` exposes for `args`.
pub fn open_disk(args: &ServeArgs) -> Result<ServedDisk, OpenDiskError> {
    let raw = RawFile::open(&args.image, args.readonly).map_err(|source| OpenDiskError::Open {
        path: args.image.clone(),
        source,
    })?;
    Ok(ServedDisk::plain(Arc::new(raw)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_disk_serves_the_raw_file_with_its_size_and_mode() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(3 << 20).unwrap();
        let mut args = ServeArgs::with_defaults(tmp.path().to_path_buf(), "unused".into());
        let disk = open_disk(&args).unwrap();
        assert_eq!(disk.dev.size(), 3 << 20);
        assert!(!disk.dev.is_read_only());
        assert!(disk.cache_control.is_none());
        args.readonly = true;
        assert!(open_disk(&args).unwrap().dev.is_read_only());
    }

    #[test]
    fn open_disk_reports_missing_image() {
        let args = ServeArgs::with_defaults("/nonexistent/snapblk.img".into(), "unused".into());
        let err = open_disk(&args).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/snapblk.img"));
    }
}
