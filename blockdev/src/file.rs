//! The raw-file layer: a virtual disk that is a plain host file (or block device), byte for byte.
//!
//! Locking model: none. Positional `pread`/`pwrite` are thread-safe on a shared descriptor, so
//! requests from every queue go straight to the kernel in parallel.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use crate::{
    check_range, open_file, read_full_at, BlockDev, BlockError, PlanSource, ReadPlan, Result,
};

/// A raw image file.
#[derive(Debug)]
pub struct RawFile {
    file: Arc<File>,
    size: u64,
    read_only: bool,
}

impl RawFile {
    /// Opens a raw image. Its size is the file's size at open time.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = open_file(path, read_only)?;
        Self::from_file(file, read_only)
    }

    /// Wraps an open file.
    pub fn from_file(file: File, read_only: bool) -> io::Result<Self> {
        let size = file_size(&file)?;
        Ok(RawFile {
            file: Arc::new(file),
            size,
            read_only,
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let arg = |v: u64| {
            libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
        };
        let (offset, len) = (arg(offset)?, arg(len)?);
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by `self.file`
        // and stays open for the duration of the call.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.file
                .write_all_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
}

/// The size of a regular file or of a block device.
pub fn file_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::End(0))
}

impl BlockDev for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        read_full_at(&self.file, buf, offset)?;
        Ok(())
    }

    fn plan_read(&self, offset: u64, len: u64) -> Option<ReadPlan> {
        check_range(offset, len, self.size).ok()?;
        Some(ReadPlan::one(
            len,
            PlanSource::File {
                file: Arc::clone(&self.file),
                offset,
            },
        ))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_range(offset, buf.len() as u64, self.size)?;
        self.file.write_all_at(buf, offset)?;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()?;
        Ok(())
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
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(()),
            // Block devices and some file systems lack these modes: write zeros instead.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENODEV)
                ) =>
            {
                self.write_zero_bytes(offset, len)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_file_round_trips_and_zeroes_without_touching_neighbours() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(1 << 20).unwrap();
        let dev = RawFile::open(tmp.path(), false).unwrap();
        assert_eq!(dev.size(), 1 << 20);
        dev.write_at(&[0xaa; 8192], 4096).unwrap();
        dev.write_zeroes(8192, 512, false).unwrap();
        dev.discard(4096, 4096).unwrap();
        let mut b = vec![0u8; 12288];
        dev.read_at(&mut b, 0).unwrap();
        assert!(b[..8192].iter().all(|&x| x == 0));
        assert!(b[8192..8704].iter().all(|&x| x == 0));
        assert!(b[8704..12288].iter().all(|&x| x == 0xaa));
        dev.flush().unwrap();
    }

    #[test]
    fn raw_file_read_only_refuses_writes() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(4096).unwrap();
        let dev = RawFile::open(tmp.path(), true).unwrap();
        assert!(matches!(dev.write_at(&[1], 0), Err(BlockError::ReadOnly)));
        assert!(matches!(
            dev.write_zeroes(0, 1, false),
            Err(BlockError::ReadOnly)
        ));
    }
}
