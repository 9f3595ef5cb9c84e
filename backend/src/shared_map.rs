//! A shared (`MAP_SHARED`), read-write mapping of a range of a file, unmapped on drop: the
//! frontend's in-flight buffer ([`crate::reconnect`]) and the crash journal
//! ([`crate::journal`]). It gives out a raw pointer only; how the memory is accessed (atomics,
//! copies under a lock), and so whether its owner may be sent or shared between threads, is
//! for the owner to say.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// See the module documentation.
pub struct SharedMap {
    ptr: NonNull<u8>,
    len: usize,
}

impl SharedMap {
    /// Maps `len` bytes of `file` from `offset` (a page multiple) for reading and writing.
    pub fn new(file: &File, offset: u64, len: usize) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        // SAFETY: a fresh shared mapping of a descriptor the caller owns; the kernel picks the
        // address; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("null mapping"))?;
        Ok(SharedMap { ptr, len })
    }

    /// The first byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped exactly once here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
