//! O_DIRECT I/O for an image file: the host page cache is off the data path.
//!
//! [`DirectIo`] does positional reads and writes on a file opened (or switched) with
//! `O_DIRECT`, whose requests must have their offset and length aligned to the file's direct-I/O
//! offset alignment and their memory aligned to its memory alignment (both from `statx`
//! `STATX_DIOALIGN`, or 4096 when the kernel does not say).
//! - An aligned request on aligned memory goes straight between the caller's buffer and the
//!   device (zero copy).
//! - Anything else goes through a bounce buffer aligned to a page (ext4 takes its inode lock
//!   exclusively, and waits for all direct I/O in flight, for a write whose memory is not
//!   aligned to its block size, even when the device would accept it). A write that covers a
//!   block only partly first reads that block (read-modify-write).
//! - Short completions are continued: a read that stops inside the file is retried from its
//!   last aligned position; a short read at the end of the file reads zeros past it (like
//!   [`blockdev::read_full_at`]); a short write is continued from its last aligned position.
//!   A zero-byte write is an error (EIO), never a success.
//!
//! Locking: the layers above serialize writes whose *bytes* overlap (see
//! [`crate::host::ReplayHost`]), but two partial writes of different bytes of the same block
//! would race in their read-modify-write. Every partial-block write therefore holds the stripe
//! locks of its first and last block (taken in block order, never nested with anything else).
//! Whole-block writes need no lock: any other write into their blocks overlaps their bytes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard};

use blockdev::AlignedBuf;

/// Positional I/O on a file, one system call per method (so tests can inject short and failed
/// completions below [`DirectIo`]).
pub trait PosIo: Send + Sync {
    /// One `pread`: how many bytes it read (0 at the end of the file).
    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// One `pwrite`: how many bytes it wrote.
    fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// The file's length.
    fn file_len(&self) -> io::Result<u64>;
}

impl PosIo for File {
    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.read_at(buf, offset)
    }

    fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.write_at(buf, offset)
    }

    fn file_len(&self) -> io::Result<u64> {
        blockdev::file_size(self)
    }
}

const STRIPES: usize = 64;

/// Alignments and locks of direct I/O on one file (see the module documentation).
#[derive(Debug)]
pub struct DirectIo {
    /// Offset and length alignment (a power of two).
    block: u64,
    /// Memory alignment (a power of two).
    mem: usize,
    stripes: Box<[Mutex<()>]>,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// Calls without progress after which a short-completion loop gives up with EIO.
const MAX_STALLS: u32 = 16;

impl DirectIo {
    /// Direct I/O with the given alignments (powers of two).
    pub fn with_alignment(block: u64, mem: usize) -> DirectIo {
        let block = block.max(1).next_power_of_two();
        let mem = mem.max(1).next_power_of_two();
        DirectIo {
            block,
            mem,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// The alignments `file` needs for direct I/O (`statx` `STATX_DIOALIGN`; 4096 for both when
    /// the kernel or file system does not report them).
    pub fn for_file(file: &File) -> DirectIo {
        let (block, mem) = blockdev::dio_alignment(file);
        DirectIo::with_alignment(block, mem)
    }

    /// Offset and length alignment.
    pub fn block(&self) -> u64 {
        self.block
    }

    /// Whether `buf` at `offset` goes to the file as it is (aligned offset, length and
    /// memory: no bounce buffer).
    pub fn takes_as_is(&self, buf: &[u8], offset: u64) -> bool {
        offset.is_multiple_of(self.block)
            && (buf.len() as u64).is_multiple_of(self.block)
            && (buf.as_ptr() as usize).is_multiple_of(self.mem)
    }

    fn stripe(&self, block_no: u64) -> usize {
        (block_no % STRIPES as u64) as usize
    }

    /// Fills `buf` (aligned memory, offset and length) from `offset`, continuing short reads;
    /// bytes past the end of the file read as zeros.
    fn read_aligned(&self, f: &dyn PosIo, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (mut done, mut stalls) = (0usize, 0u32);
        while done < buf.len() {
            let before = done;
            match f.pread(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => {
                    done += n;
                    if done < buf.len() && !(done as u64).is_multiple_of(self.block) {
                        // A short read inside a block: the end of the file, or an interrupted
                        // request to continue from its last aligned position.
                        if offset + done as u64 >= f.file_len()? {
                            buf[done..].fill(0);
                            return Ok(());
                        }
                        done -= (done as u64 % self.block) as usize;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            stalls = if done > before { 0 } else { stalls + 1 };
            if stalls > MAX_STALLS {
                return Err(eio());
            }
        }
        Ok(())
    }

    /// Writes all of `buf` (aligned memory, offset and length), continuing short writes.
    fn write_aligned(&self, f: &dyn PosIo, buf: &[u8], offset: u64) -> io::Result<()> {
        let (mut done, mut stalls) = (0usize, 0u32);
        while done < buf.len() {
            let before = done;
            match f.pwrite(&buf[done..], offset + done as u64) {
                Ok(0) => return Err(eio()),
                Ok(n) => {
                    done += n;
                    done -= (done as u64 % self.block) as usize;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            stalls = if done > before { 0 } else { stalls + 1 };
            if stalls > MAX_STALLS {
                return Err(eio());
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros.
    pub fn read_at(&self, f: &dyn PosIo, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if self.takes_as_is(buf, offset) {
            return self.read_aligned(f, buf, offset);
        }
        let start = offset - offset % self.block;
        let end = (offset + buf.len() as u64).next_multiple_of(self.block);
        let mut b = AlignedBuf::zeroed_aligned((end - start) as usize, self.mem);
        self.read_aligned(f, &mut b, start)?;
        let s = (offset - start) as usize;
        buf.copy_from_slice(&b[s..s + buf.len()]);
        Ok(())
    }

    /// Writes all of `buf` at `offset`, reading the blocks it covers only partly first.
    pub fn write_at(&self, f: &dyn PosIo, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if self.takes_as_is(buf, offset) {
            return self.write_aligned(f, buf, offset);
        }
        let end_byte = offset + buf.len() as u64;
        let start = offset - offset % self.block;
        let end = end_byte.next_multiple_of(self.block);
        let first = start / self.block;
        let last = end / self.block - 1;
        let head_partial = offset != start;
        let tail_partial = end_byte != end;
        // Stripe locks of the partly covered end blocks, in block order.
        let mut locks: Vec<usize> = Vec::with_capacity(2);
        if head_partial || (tail_partial && first == last) {
            locks.push(self.stripe(first));
        }
        if tail_partial && last != first {
            let s = self.stripe(last);
            if !locks.contains(&s) {
                locks.push(s);
            }
        }
        locks.sort_unstable();
        let _held: Vec<MutexGuard<'_, ()>> = locks
            .iter()
            .map(|&s| self.stripes[s].lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let mut b = AlignedBuf::zeroed_aligned((end - start) as usize, self.mem);
        let bs = self.block as usize;
        let bytes = &mut b[..];
        if head_partial {
            self.read_aligned(f, &mut bytes[..bs], start)?;
        }
        if tail_partial && (last != first || !head_partial) {
            let n = bytes.len();
            self.read_aligned(f, &mut bytes[n - bs..], end - self.block)?;
        }
        let s = (offset - start) as usize;
        bytes[s..s + buf.len()].copy_from_slice(buf);
        self.write_aligned(f, bytes, start)
    }
}

pub use blockdev::reopen_direct;

/// Switches `file` to O_DIRECT (`on`) or back to buffered I/O.
pub fn set_o_direct(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on a valid fd has no memory effects.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let want = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: F_SETFL with an int argument on a valid fd has no memory effects.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, want) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use blockdev::BlockDev;

    use super::*;
    use crate::create::{create_on, CreateOptions};
    use crate::host::HostFile;
    use crate::image::QcowImage;

    /// What the next matching call of a [`Faulty`] file does.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Fault {
        None,
        /// Completes only this many bytes (a short completion).
        Short(usize),
        /// Fails with EIO.
        Eio,
    }

    /// A real O_DIRECT file whose `n`-th read or write (counted from arming) is short or fails.
    struct Faulty {
        file: File,
        read_fault: Mutex<(u32, Fault)>,
        write_fault: Mutex<(u32, Fault)>,
        short_done: AtomicU32,
    }

    impl Faulty {
        fn open(dir: &tempfile::TempDir) -> Option<Faulty> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_DIRECT)
                .open(dir.path().join("direct.img"))
                .ok()?;
            Some(Faulty {
                file,
                read_fault: Mutex::new((0, Fault::None)),
                write_fault: Mutex::new((0, Fault::None)),
                short_done: AtomicU32::new(0),
            })
        }

        fn fault(&self, slot: &Mutex<(u32, Fault)>) -> Fault {
            let mut s = slot.lock().unwrap();
            match s.1 {
                Fault::None => Fault::None,
                f if s.0 == 0 => {
                    s.1 = Fault::None;
                    f
                }
                _ => {
                    s.0 -= 1;
                    Fault::None
                }
            }
        }
    }

    impl PosIo for Faulty {
        fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            match self.fault(&self.read_fault) {
                Fault::Eio => Err(eio()),
                Fault::Short(n) if n < buf.len() => {
                    // The device delivered only part; what it did not deliver is garbage.
                    let got = self.file.read_at(buf, offset)?.min(n);
                    buf[got..].fill(0xee);
                    self.short_done.fetch_add(1, Ordering::SeqCst);
                    Ok(got)
                }
                _ => self.file.read_at(buf, offset),
            }
        }

        fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
            match self.fault(&self.write_fault) {
                Fault::Eio => Err(eio()),
                Fault::Short(n) if n < buf.len() => {
                    self.short_done.fetch_add(1, Ordering::SeqCst);
                    // Only whole blocks can reach an O_DIRECT file.
                    let n = n - n % 512;
                    if n == 0 {
                        return Ok(0);
                    }
                    self.file.write_at(&buf[..n], offset)
                }
                _ => self.file.write_at(buf, offset),
            }
        }

        fn file_len(&self) -> io::Result<u64> {
            self.file.file_len()
        }
    }

    /// A qcow2 host file over [`DirectIo`] on a [`Faulty`] file.
    struct DirectHost {
        f: Arc<Faulty>,
        d: DirectIo,
    }

    impl HostFile for DirectHost {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.d.read_at(&*self.f, buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.d.write_at(&*self.f, buf, offset)
        }
        fn sync_data(&self) -> io::Result<()> {
            self.f.file.sync_data()
        }
        fn len(&self) -> io::Result<u64> {
            self.f.file_len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.f.file.set_len(len)
        }
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
            .collect()
    }

    #[test]
    fn direct_io_continues_short_completions_and_bounces_unaligned_requests() {
        let dir = tempfile::tempdir().unwrap();
        let Some(f) = Faulty::open(&dir) else {
            eprintln!("skipped: the temp file system cannot do O_DIRECT");
            return;
        };
        let d = DirectIo::for_file(&f.file);
        // Unaligned offset, length and memory: a read-modify-write of two partial blocks.
        let data = pattern(1, 10_000);
        *f.write_fault.lock().unwrap() = (0, Fault::Short(4096 + 100));
        d.write_at(&f, &data[1..], 777).unwrap();
        let mut back = vec![0u8; 9_999];
        *f.read_fault.lock().unwrap() = (0, Fault::Short(1000));
        d.read_at(&f, &mut back, 777).unwrap();
        assert_eq!(back, data[1..]);
        assert_eq!(
            f.short_done.load(Ordering::SeqCst),
            2,
            "no short completion ran"
        );
        // A short read at the end of the file reads zeros past it.
        let mut tail = vec![9u8; 8192];
        d.read_at(&f, &mut tail, 8192).unwrap();
        let end = 777 + 9_999 - 8192;
        assert_eq!(tail[..end], data[1 + 8192 - 777..]);
        assert!(tail[end..].iter().all(|&b| b == 0));
        // A failed completion is an error, and the bytes around the range are untouched.
        *f.write_fault.lock().unwrap() = (0, Fault::Eio);
        let e = d.write_at(&f, &[5u8; 100], 1000).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        *f.read_fault.lock().unwrap() = (0, Fault::Eio);
        assert!(d.read_at(&f, &mut back, 777).is_err());
        d.read_at(&f, &mut back, 777).unwrap();
        assert_eq!(back, data[1..]);
        // A device that never makes progress is an error, not a hang.
        *f.write_fault.lock().unwrap() = (0, Fault::Short(0));
        assert!(d.write_at(&f, &[1u8; 4096], 0).is_err());
    }

    #[test]
    fn partial_block_writes_of_different_bytes_of_one_block_never_lose_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let Some(f) = Faulty::open(&dir) else {
            eprintln!("skipped: the temp file system cannot do O_DIRECT");
            return;
        };
        let f = Arc::new(f);
        let d = Arc::new(DirectIo::for_file(&f.file));
        d.write_at(&*f, &[0u8; 4096], 0).unwrap();
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let (f, d) = (f.clone(), d.clone());
                std::thread::spawn(move || {
                    for round in 1..=50u8 {
                        d.write_at(&*f, &[round; 16], u64::from(t) * 16).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut b = [0u8; 64];
        d.read_at(&*f, &mut b, 0).unwrap();
        assert_eq!(
            b, [50u8; 64],
            "a read-modify-write lost a neighbour's bytes"
        );
    }

    #[test]
    fn a_qcow2_image_over_direct_io_keeps_flushed_data_across_failed_and_short_writes() {
        let dir = tempfile::tempdir().unwrap();
        let Some(f) = Faulty::open(&dir) else {
            eprintln!("skipped: the temp file system cannot do O_DIRECT");
            return;
        };
        let f = Arc::new(f);
        let host = DirectHost {
            f: f.clone(),
            d: DirectIo::for_file(&f.file),
        };
        let opts = CreateOptions {
            size: 4 << 20,
            cluster_size: 65536,
            ..CreateOptions::default()
        };
        create_on(&host, &opts).unwrap();
        let img = QcowImage::open_with(Box::new(host), false, None).unwrap();
        let a = pattern(2, 70_000);
        img.write_at(&a, 512).unwrap();
        img.flush().unwrap();
        // A failed data write: the request fails, flushed data stays.
        *f.write_fault.lock().unwrap() = (0, Fault::Eio);
        assert!(img.write_at(&pattern(3, 4096), 512).is_err());
        // Short completions of data and metadata writes are continued.
        *f.write_fault.lock().unwrap() = (0, Fault::Short(1536));
        let b = pattern(4, 5000);
        img.write_at(&b, 1 << 20).unwrap();
        img.flush().unwrap();
        img.close().unwrap();
        drop(img);
        assert!(f.short_done.load(Ordering::SeqCst) >= 1);
        // Read back through a buffered open of the same file.
        let reopened = crate::host::FileHost::new(
            OpenOptions::new()
                .read(true)
                .open(dir.path().join("direct.img"))
                .unwrap(),
        );
        let img = QcowImage::open_with(Box::new(reopened), true, None).unwrap();
        let mut got = vec![0u8; a.len()];
        img.read_at(&mut got, 512).unwrap();
        // The failed write may have changed its own range (a torn write), nothing else.
        assert_eq!(got[4096..], a[4096..]);
        let mut got = vec![0u8; b.len()];
        img.read_at(&mut got, 1 << 20).unwrap();
        assert_eq!(got, b);
    }
}
