//! Which files a backing chain may name, and how a backing file without a recorded format is
//! opened: the rules that keep an image (and so a guest that can write one, or whoever made a
//! downloaded image) from reaching any other host file.
//!
//! Rules, checked on every backing file of a chain (the top image is the file the user named and
//! is not subject to them; neither are files the caller marks as trusted, such as the base of a
//! `serve --snapshot` overlay):
//! 1. The name is resolved (relative names against the naming image's directory) and the file is
//!    looked up with `O_PATH` (following symlinks, without opening a device or blocking on a
//!    FIFO). Its real path is read back from `/proc/self/fd`, so every symlink is resolved.
//! 2. A real path under `/proc` or `/sys` is refused.
//! 3. Anything but a regular file (block or character device, FIFO, socket, directory) is refused.
//! 4. With `--allow-backing DIR` (repeatable), the real path must lie inside one of those trees.
//!
//! The admitted file is then opened through `/proc/self/fd/N` of the checked `O_PATH`
//! descriptor, so the file that is opened is exactly the one that was checked (no window in
//! which a symlink or directory can be swapped).
//!
//! A backing file whose format the overlay does not record is opened as raw, never probed,
//! unless [`BackingPolicy::probe_unrecorded`] was set (an explicit command-line choice).
//!
//! NBD backing names (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`, see
//! [`crate::nbd`]) name no host file, so rules 1-3 do not apply to them; instead
//! ([`BackingPolicy::admit_nbd`]):
//! 5. Without `--allow-backing`, any NBD server may be named (like any regular file).
//! 6. With `--allow-backing DIR` (a confined chain), a unix socket must be a socket whose real
//!    path lies inside one of those trees (and not under `/proc` or `/sys`), and a TCP server
//!    must be listed with `--allow-nbd HOST:PORT` (compared as written in the name, port
//!    defaulted to 10809). The `serve --snapshot` base named on the command line is trusted.
//! 7. An NBD export is raw unless the overlay records its format; it is never probed.
//!
//! Locking model: none; a policy is immutable once built and admitted files own their descriptor.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::api::{resolve_backing_path, Format, MAX_CHAIN_DEPTH};
use crate::error::OpenImageError;
use crate::image::ImageHeader;

/// Trees no chain may name, whatever their file type.
const FORBIDDEN_TREES: [&str; 2] = ["/proc", "/sys"];

/// Why a backing file was refused: one line naming the file and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backing file {} refused: {rule}", shown(.path, .real))]
pub struct PolicyError {
    /// The backing file as resolved from the overlay's name.
    pub path: PathBuf,
    /// Its real path after resolving every symlink, when known.
    pub real: Option<PathBuf>,
    /// The rule it breaks.
    pub rule: String,
}

fn shown(path: &Path, real: &Option<PathBuf>) -> String {
    match real {
        Some(r) if r != path => format!("{} (resolves to {})", path.display(), r.display()),
        _ => path.display().to_string(),
    }
}

/// The backing-file policy of one open (see the module documentation for the rules).
#[derive(Debug, Clone, Default)]
pub struct BackingPolicy {
    allow: Vec<PathBuf>,
    trusted: Vec<PathBuf>,
    probe_unrecorded: bool,
    allow_nbd: Vec<String>,
    trusted_nbd: Vec<String>,
}

/// A backing file that passed the policy, held by an `O_PATH` descriptor.
#[derive(Debug)]
pub struct Admitted {
    fd: OwnedFd,
    real: PathBuf,
}

impl Admitted {
    /// The path that opens exactly the checked file (`/proc/self/fd/N`).
    pub fn open_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// The file's real path.
    pub fn real_path(&self) -> &Path {
        &self.real
    }
}

fn file_kind(ft: std::fs::FileType) -> &'static str {
    if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Looks `path` up with `O_PATH | O_CLOEXEC` (follows symlinks; opens no device, never blocks).
fn open_o_path(path: &Path) -> io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl BackingPolicy {
    /// The default policy: regular files anywhere except `/proc` and `/sys`; format-less backing
    /// files opened as raw.
    pub fn new() -> Self {
        Self::default()
    }

    /// Confines every backing file to the tree under `dir` (and the other allowed trees).
    pub fn allow_dir(&mut self, dir: &Path) -> io::Result<()> {
        let real = std::fs::canonicalize(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        if !real.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", dir.display()),
            ));
        }
        self.allow.push(real);
        Ok(())
    }

    /// Admits `path` (a file the user named on the command line, or an NBD name) without the
    /// rules.
    pub fn trust(&mut self, path: &Path) -> io::Result<()> {
        if let Some(name) = path.to_str().filter(|n| crate::nbd::is_nbd_name(n)) {
            self.trusted_nbd.push(name.to_string());
            return Ok(());
        }
        self.trusted.push(
            std::fs::canonicalize(path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
        );
        Ok(())
    }

    /// Probe the format of backing files whose overlay records none (qcow2 magic or raw), instead
    /// of opening them as raw.
    pub fn probe_unrecorded(mut self, probe: bool) -> Self {
        self.probe_unrecorded = probe;
        self
    }

    /// Allows the NBD server `HOST:PORT` (TCP) in a confined chain (rule 6).
    pub fn allow_nbd_server(&mut self, spec: &str) -> io::Result<()> {
        let (host, port) = spec.rsplit_once(':').ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("--allow-nbd {spec}: expected HOST:PORT"),
            )
        })?;
        let port: u16 = port.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("--allow-nbd {spec}: bad port"),
            )
        })?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.allow_nbd.push(format!("{host}:{port}"));
        Ok(())
    }

    /// Checks an NBD backing name against rules 5 and 6.
    pub fn admit_nbd(&self, uri: &nbd_client::NbdUri) -> Result<(), OpenImageError> {
        if self.trusted_nbd.contains(&uri.text) || self.allow.is_empty() {
            return Ok(());
        }
        let refuse = |real: Option<PathBuf>, rule: String| {
            OpenImageError::Refused(PolicyError {
                path: PathBuf::from(&uri.text),
                real,
                rule,
            })
        };
        match &uri.transport {
            nbd_client::Transport::Tcp { host, port } => {
                if self.allow_nbd.contains(&format!("{host}:{port}")) {
                    Ok(())
                } else {
                    Err(refuse(
                        None,
                        format!(
                            "NBD server {host}:{port} is not allowed (--allow-nbd {host}:{port} \
                             allows it next to --allow-backing)"
                        ),
                    ))
                }
            }
            nbd_client::Transport::Unix(sock) => {
                let real = std::fs::canonicalize(sock).map_err(|e| OpenImageError::Io {
                    path: PathBuf::from(&uri.text),
                    source: io::Error::new(e.kind(), format!("{}: {e}", sock.display())),
                })?;
                let md = std::fs::metadata(&real).map_err(|e| OpenImageError::Io {
                    path: PathBuf::from(&uri.text),
                    source: e,
                })?;
                if FORBIDDEN_TREES.iter().any(|t| real.starts_with(t))
                    || !md.file_type().is_socket()
                {
                    return Err(refuse(
                        Some(real),
                        "an NBD socket must be a unix socket outside /proc and /sys".into(),
                    ));
                }
                if !self.allow.iter().any(|d| real.starts_with(d)) {
                    return Err(refuse(
                        Some(real),
                        format!(
                            "its socket is outside the --allow-backing directories ({})",
                            DirList(&self.allow)
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The allowed trees (empty: anywhere).
    pub fn allowed_dirs(&self) -> &[PathBuf] {
        &self.allow
    }

    /// The format to open a backing file with when its overlay records none: `None` means probe.
    pub fn unrecorded_format(&self) -> Option<Format> {
        (!self.probe_unrecorded).then_some(Format::Raw)
    }

    /// Checks the backing file at `path` against the rules.
    pub fn admit(&self, path: &Path) -> Result<Admitted, OpenImageError> {
        let refuse = |real: Option<PathBuf>, rule: String| {
            OpenImageError::Refused(PolicyError {
                path: path.to_path_buf(),
                real,
                rule,
            })
        };
        let io_err = |source| OpenImageError::Io {
            path: path.to_path_buf(),
            source,
        };
        let fd = open_o_path(path).map_err(io_err)?;
        let real =
            std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|e| {
                refuse(
                    None,
                    format!("its real path cannot be verified through /proc/self/fd ({e})"),
                )
            })?;
        let admitted = Admitted { fd, real };
        if self.trusted.contains(&admitted.real) {
            return Ok(admitted);
        }
        let real = Some(admitted.real.clone());
        if let Some(tree) = FORBIDDEN_TREES
            .iter()
            .find(|t| admitted.real.starts_with(t))
        {
            return Err(refuse(
                real,
                format!("a backing chain may not name files under {tree}"),
            ));
        }
        // fstat works on an O_PATH descriptor (it never opens the device or FIFO itself).
        let md = {
            let f = File::from(admitted.fd.try_clone().map_err(io_err)?);
            f.metadata().map_err(io_err)?
        };
        if !md.file_type().is_file() {
            return Err(refuse(
                real,
                format!(
                    "it is {}; a backing chain may only name regular files",
                    file_kind(md.file_type())
                ),
            ));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|d| admitted.real.starts_with(d)) {
            return Err(refuse(
                real,
                format!(
                    "it is outside the --allow-backing directories ({})",
                    DirList(&self.allow)
                ),
            ));
        }
        Ok(admitted)
    }
}

/// The chain entry of an NBD backing name (the walk does not descend into the export).
fn describe_nbd(name: &str, format: Option<&str>, policy: &BackingPolicy) -> ChainEntry {
    let mut entry = ChainEntry {
        name: name.to_string(),
        resolved: PathBuf::from(name),
        real: None,
        format: None,
        format_recorded: format.is_some(),
        refused: None,
    };
    match crate::nbd::parse(name).and_then(|u| policy.admit_nbd(&u)) {
        Err(e) => entry.refused = Some(e.to_string()),
        Ok(()) => match format {
            None => entry.format = Some(Format::Raw),
            Some(f) => match f.parse::<Format>() {
                Ok(f) => entry.format = Some(f),
                Err(_) => entry.refused = Some(format!("unsupported backing format {f:?}")),
            },
        },
    }
    entry
}

struct DirList<'a>(&'a [PathBuf]);

impl fmt::Display for DirList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", d.display())?;
        }
        Ok(())
    }
}

/// One backing file of a chain, as `info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainEntry {
    /// The name stored in the overlay.
    pub name: String,
    /// The name resolved against the overlay's directory.
    pub resolved: PathBuf,
    /// The real path after resolving symlinks (when the policy admitted the file).
    pub real: Option<PathBuf>,
    /// The format the chain opens it with (when admitted).
    pub format: Option<Format>,
    /// Whether the overlay records the format (otherwise it is opened as raw, or probed).
    pub format_recorded: bool,
    /// Why the file is refused (the walk stops there).
    pub refused: Option<String>,
}

impl fmt::Display for ChainEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.resolved.display())?;
        if let Some(r) = self.real.as_ref().filter(|r| **r != self.resolved) {
            write!(f, " -> {}", r.display())?;
        }
        if let Some(fmt_) = self.format {
            write!(
                f,
                " ({fmt_}{})",
                if self.format_recorded {
                    ""
                } else if fmt_ == Format::Raw {
                    ", format not recorded: opened as raw"
                } else {
                    ", format not recorded: probed"
                }
            )?;
        }
        if let Some(r) = &self.refused {
            write!(f, " REFUSED: {r}")?;
        }
        Ok(())
    }
}

/// Walks the backing chain of the qcow2 image at `path` under `policy` without opening any data
/// (headers only), for `info`. Stops at the first refused or unreadable file (reported in its
/// entry) and after [`MAX_CHAIN_DEPTH`] backing files.
pub fn describe_chain(path: &Path, policy: &BackingPolicy) -> Vec<ChainEntry> {
    let mut out = Vec::new();
    let mut current = path.to_path_buf();
    let mut open_path = path.to_path_buf();
    let mut _hold: Option<Admitted> = None;
    while out.len() < MAX_CHAIN_DEPTH {
        let header = match File::open(&open_path)
            .map_err(OpenImageError::HostIo)
            .and_then(|f| {
                ImageHeader::read(&crate::host::FileHost::new(f) as &dyn crate::host::HostFile)
            }) {
            Ok(h) => h,
            Err(_) => break,
        };
        let Some(spec) = header.backing else { break };
        let resolved = resolve_backing_path(&current, &spec.name);
        if crate::nbd::is_nbd_name(&spec.name) {
            out.push(describe_nbd(&spec.name, spec.format.as_deref(), policy));
            break;
        }
        let mut entry = ChainEntry {
            name: spec.name.clone(),
            resolved: resolved.clone(),
            real: None,
            format: None,
            format_recorded: spec.format.is_some(),
            refused: None,
        };
        let admitted = match policy.admit(&resolved) {
            Ok(a) => a,
            Err(e) => {
                entry.refused = Some(e.to_string());
                out.push(entry);
                break;
            }
        };
        entry.real = Some(admitted.real_path().to_path_buf());
        let fmt_ = match &spec.format {
            Some(f) => f.parse::<Format>().ok(),
            None => match policy.unrecorded_format() {
                Some(f) => Some(f),
                None => crate::api::probe_format(&admitted.open_path()).ok(),
            },
        };
        entry.format = fmt_;
        if fmt_.is_none() {
            entry.refused = Some(format!(
                "unsupported backing format {:?}",
                spec.format.unwrap_or_default()
            ));
        }
        out.push(entry);
        if fmt_ != Some(Format::Qcow2) {
            break;
        }
        current = resolved;
        open_path = admitted.open_path();
        _hold = Some(admitted);
    }
    out
}
