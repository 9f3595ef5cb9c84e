//! Guards for commands that write a file (`export`, `create`, ...): an output is never one of
//! the command's inputs, never a file another process has locked, and never visible half-written.
//!
//! Inputs are compared by (device, inode), so a second name, a `./` prefix or a symlink for the
//! same file is caught. Outputs of `export` are written under a temporary name in the target's
//! directory and renamed over the target after they are synced ([`TempOutput`]).
//!
//! Locking model: none in memory. The target's lock state is tested with
//! `blockdev::lock::check_conflict` right before writing; the temporary file is private to the
//! writer until it is renamed.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use blockdev::lock::{self, Perms};

use crate::error::ImageOpError;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageOpError + '_ {
    move |source| ImageOpError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Refuses `out` if it is `source` or a file of its backing chain (`chain`: device and inode of
/// every file, from `open_image_chain`), if it exists but is not a regular file, or if another
/// process holds a lock on it that a writer would conflict with. Returns the target's metadata
/// when it exists.
pub fn check_output(
    out: &Path,
    source: &Path,
    chain: &[(u64, u64)],
) -> Result<Option<Metadata>, ImageOpError> {
    let md = match std::fs::metadata(out) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(out)(e)),
    };
    if chain.contains(&(md.dev(), md.ino())) {
        return Err(ImageOpError::Invalid(format!(
            "{}: is {} or a file of its backing chain; refusing to overwrite an input",
            out.display(),
            source.display()
        )));
    }
    if !md.is_file() {
        return Err(ImageOpError::Invalid(format!(
            "{}: exists and is not a regular file",
            out.display()
        )));
    }
    let f = File::open(out).map_err(io_err(out))?;
    if let Some(c) = lock::check_conflict(&f, Perms::WRITER).map_err(io_err(out))? {
        return Err(io_err(out)(io::Error::new(io::ErrorKind::WouldBlock, c)));
    }
    Ok(Some(md))
}

/// Opens the file a command is about to overwrite (creating it, never truncating it) and locks
/// it as a writer, so an image another process uses is refused intact. The caller empties it.
pub fn open_target(path: &Path) -> io::Result<File> {
    // Readable too: the shared (read) lock bytes need a descriptor open for reading.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    lock::lock_image(&file, Perms::WRITER)?;
    Ok(file)
}

/// A new file under a temporary name next to its final path; removed on drop unless committed.
#[derive(Debug)]
pub struct TempOutput {
    file: File,
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl TempOutput {
    /// Creates the temporary file in `target`'s directory, with `existing`'s permission bits
    /// when the target already exists.
    pub fn create(target: &Path, existing: Option<&Metadata>) -> Result<Self, ImageOpError> {
        let name = target.file_name().ok_or_else(|| {
            ImageOpError::Invalid(format!("{}: not a file name", target.display()))
        })?;
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        for attempt in 0..100u32 {
            let mut tmp_name = std::ffi::OsString::from(".");
            tmp_name.push(name);
            tmp_name.push(format!(".snapblk-{}-{attempt}.tmp", std::process::id()));
            let tmp = dir.join(tmp_name);
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(file) => {
                    let out = TempOutput {
                        file,
                        tmp,
                        target: target.to_path_buf(),
                        committed: false,
                    };
                    if let Some(md) = existing {
                        let mode =
                            std::fs::Permissions::from_mode(md.permissions().mode() & 0o7777);
                        out.file.set_permissions(mode).map_err(io_err(&out.tmp))?;
                    }
                    return Ok(out);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&tmp)(e)),
            }
        }
        Err(ImageOpError::Invalid(format!(
            "cannot find a free temporary name next to {}",
            target.display()
        )))
    }

    /// The open temporary file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The temporary path.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Syncs the file, renames it over the target and syncs the directory.
    pub fn commit(mut self) -> Result<(), ImageOpError> {
        self.file.sync_all().map_err(io_err(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.target).map_err(io_err(&self.target))?;
        self.committed = true;
        let dir = match self.target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_that_is_an_input_by_another_name_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.raw");
        std::fs::write(&input, b"precious").unwrap();
        let alias = dir.path().join("alias.raw");
        std::fs::hard_link(&input, &alias).unwrap();
        let md = std::fs::metadata(&input).unwrap();
        let e = check_output(&alias, &input, &[(md.dev(), md.ino())]).unwrap_err();
        assert!(
            e.to_string().contains("refusing to overwrite an input"),
            "{e}"
        );
        assert_eq!(std::fs::read(&input).unwrap(), b"precious");
    }

    #[test]
    fn an_uncommitted_temporary_output_disappears_and_the_target_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.raw");
        std::fs::write(&target, b"old").unwrap();
        let t = TempOutput::create(&target, None).unwrap();
        let tmp = t.path().to_path_buf();
        std::os::unix::fs::FileExt::write_all_at(t.file(), b"half", 0).unwrap();
        drop(t);
        assert!(!tmp.exists());
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        let t = TempOutput::create(&target, None).unwrap();
        std::os::unix::fs::FileExt::write_all_at(t.file(), b"new", 0).unwrap();
        t.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
    }
}
