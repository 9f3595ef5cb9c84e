//! Header extensions and the feature name table.

use super::*;

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

pub(super) fn ext_string(kind: u32, data: &[u8]) -> Result<String, DecodeError> {
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
