//! The host-file abstraction the qcow2 engine does all its image-file I/O through.
//!
//! The trait is deliberately tiny so that a crash-recording or fault-injecting layer can sit
//! under the engine and see every write and every `sync_data` in order. [`FileHost`] is the real
//! file; [`MemHost`] keeps the file in memory (tests, crash simulation).
//!
//! Locking model: implementations take `&self` and must be safe to call from several threads at
//! once. `FileHost` relies on positional I/O (no shared cursor); `MemHost` uses one `RwLock`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::RwLock;

/// Positional I/O on the file that holds a qcow2 image.
#[allow(clippy::len_without_is_empty)]
pub trait HostFile: Send + Sync {
    /// Fills `buf` from `offset`; bytes past the end of the file read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Current length of the file.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// A shared host file (so a test or a recording layer can keep a handle to it).
impl<T: HostFile + ?Sized> HostFile for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        (**self).sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
}

/// A real file.
#[derive(Debug)]
pub struct FileHost {
    file: File,
}

impl FileHost {
    /// Wraps an open file.
    pub fn new(file: File) -> Self {
        FileHost { file }
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl HostFile for FileHost {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        blockdev::read_full_at(&self.file, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        // Works for block devices too (their metadata length is 0).
        blockdev::file_size(&self.file)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

/// An image file held in memory.
#[derive(Debug, Default)]
pub struct MemHost {
    data: RwLock<Vec<u8>>,
}

/// Largest in-memory file, to keep a hostile offset from allocating without bound.
const MEM_HOST_MAX: u64 = 4 << 30;

impl MemHost {
    /// A file with `data` as its content.
    pub fn new(data: Vec<u8>) -> Self {
        MemHost {
            data: RwLock::new(data),
        }
    }

    /// A copy of the content.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn mem_range(offset: u64, len: usize) -> io::Result<(usize, usize)> {
    let end = offset
        .checked_add(len as u64)
        .filter(|&e| e <= MEM_HOST_MAX)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    Ok((offset as usize, end as usize))
}

impl HostFile for MemHost {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        buf.fill(0);
        let (start, _) = mem_range(offset, buf.len())?;
        if let Some(avail) = data.get(start..) {
            let n = avail.len().min(buf.len());
            buf[..n].copy_from_slice(&avail[..n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let (start, end) = mem_range(offset, buf.len())?;
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let (_, end) = mem_range(len, 0)?;
        self.data
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(end, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_host_reads_zeros_past_end_and_grows_on_write() {
        let h = MemHost::default();
        h.write_at(&[1, 2, 3], 10).unwrap();
        assert_eq!(h.len().unwrap(), 13);
        let mut b = [9u8; 6];
        h.read_at(&mut b, 9).unwrap();
        assert_eq!(b, [0, 1, 2, 3, 0, 0]);
        assert!(h.write_at(&[1], u64::MAX).is_err());
        h.set_len(4).unwrap();
        assert_eq!(h.len().unwrap(), 4);
    }
}
