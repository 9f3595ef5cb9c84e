//! Backing images on NBD servers: a backing name that is an NBD URI (as QEMU accepts it, see
//! [`nbd_client::uri`]) opens an [`nbd_client::NbdDev`] instead of a host file.
//!
//! Rules:
//! - The export is opened read-only and only ever read.
//! - Its format is the one the overlay records (`-F`); without one it is **raw**, never probed
//!   (also with `--probe-backing-format`: an export is not a host file whose first bytes the
//!   user controls).
//! - A qcow2 image on an export is read through [`NbdHost`] (read-only); its own backing name
//!   must be absolute or another NBD name (an export has no directory, as in QEMU).
//! - No file locks apply (an export is not a host file; the server decides who may use it).
//! - Whether the name may be used at all is the [`BackingPolicy`]'s decision
//!   ([`BackingPolicy::admit_nbd`]).
//! - Loops: each export gets a pseudo file identity (`u64::MAX`, hash of the server and
//!   export) in the chain's `seen` list, so an image naming an export twice is a loop.
//!
//! Locking model: none here; `NbdDev` does its own (see its docs).

use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockdev::BlockDev;
use nbd_client::{NbdDev, NbdUri};

use crate::api::{Format, MAX_CHAIN_DEPTH};
use crate::error::OpenImageError;
use crate::host::HostFile;
use crate::image::{ImageHeader, QcowImage};
use crate::policy::BackingPolicy;

/// Whether a backing name is an NBD name.
pub fn is_nbd_name(name: &str) -> bool {
    nbd_client::is_nbd_name(name)
}

fn io_err(name: &str, source: io::Error) -> OpenImageError {
    OpenImageError::Io {
        path: PathBuf::from(name),
        source,
    }
}

/// Parses an NBD backing name into a URI, as an open error on failure.
pub fn parse(name: &str) -> Result<NbdUri, OpenImageError> {
    nbd_client::parse_uri(name)
        .map_err(|e| io_err(name, io::Error::new(io::ErrorKind::InvalidInput, e.reason)))
}

/// The pseudo identity of an export in a chain's `seen` list.
fn pseudo_id(uri: &NbdUri) -> (u64, u64) {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{:?}", uri.transport).hash(&mut h);
    uri.export.hash(&mut h);
    (u64::MAX, h.finish())
}

/// Opens the NBD backing image `name` (format `format`, raw when the overlay records none) at
/// chain depth `depth`, under `policy`.
pub(crate) fn open_backing(
    name: &str,
    format: Option<Format>,
    depth: usize,
    seen: &mut Vec<(u64, u64)>,
    policy: &BackingPolicy,
) -> Result<Arc<dyn BlockDev>, OpenImageError> {
    if depth > MAX_CHAIN_DEPTH {
        return Err(OpenImageError::ChainTooDeep(MAX_CHAIN_DEPTH));
    }
    let uri = parse(name)?;
    policy.admit_nbd(&uri)?;
    let id = pseudo_id(&uri);
    if seen.contains(&id) {
        return Err(OpenImageError::BackingLoop(PathBuf::from(name)));
    }
    seen.push(id);
    let dev = Arc::new(NbdDev::open(&uri).map_err(|e| io_err(name, e))?);
    match format.unwrap_or(Format::Raw) {
        Format::Raw => Ok(dev),
        Format::Qcow2 => {
            let host = NbdHost(dev);
            let ih = ImageHeader::read(&host)?;
            ih.check_features(true)?;
            let backing = match &ih.backing {
                None => None,
                Some(spec) => {
                    let bfmt = match &spec.format {
                        Some(f) => Some(f.parse::<Format>()?),
                        None => None,
                    };
                    let below = if is_nbd_name(&spec.name) {
                        open_backing(&spec.name, bfmt, depth + 1, seen, policy)
                    } else if Path::new(&spec.name).is_absolute() {
                        let bpath = PathBuf::from(&spec.name);
                        let admitted = policy.admit(&bpath)?;
                        let bfmt = bfmt.or(policy.unrecorded_format());
                        crate::api::open_chain_entry(
                            &bpath,
                            &admitted.open_path(),
                            bfmt,
                            depth + 1,
                            seen,
                            policy,
                        )
                    } else {
                        Err(io_err(
                            &spec.name,
                            io::Error::new(
                                io::ErrorKind::InvalidInput,
                                format!(
                                    "relative backing name in the image on NBD export {name}: \
                                     an export has no directory to resolve it against"
                                ),
                            ),
                        ))
                    };
                    Some(below.map_err(|e| crate::api::backing_of_name(name, e))?)
                }
            };
            Ok(Arc::new(QcowImage::open_with(
                Box::new(host),
                true,
                backing,
            )?))
        }
    }
}

/// A qcow2 image file on an NBD export, read-only.
pub struct NbdHost(pub Arc<NbdDev>);

fn read_only_export() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "an NBD backing image is only ever read",
    )
}

impl HostFile for NbdHost {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Bytes past the end read as zeros (HostFile's contract).
        let size = self.0.size();
        let n = (size.saturating_sub(offset)).min(buf.len() as u64) as usize;
        buf[n..].fill(0);
        if n == 0 {
            return Ok(());
        }
        self.0.read_at(&mut buf[..n], offset).map_err(|e| match e {
            blockdev::BlockError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        })
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(read_only_export())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.size())
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(read_only_export())
    }
}
