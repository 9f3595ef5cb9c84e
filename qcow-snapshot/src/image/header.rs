//! The image header as [`QcowImage`] opens it: [`ImageHeader`] parses and validates the
//! beginning of an image (header, extensions, backing file name as [`BackingSpec`]) and checks
//! its feature bits against what this engine supports.
//!
//! Locking: none; a header is parsed before the image (and its `meta` lock) exists.

use super::*;

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
