//! Byte buffers aligned for direct I/O.
//!
//! An O_DIRECT file accepts a buffer as it is only when its memory address is a multiple of
//! the file's direct-I/O memory alignment (512 bytes on a typical virtio disk, 4096 on some);
//! any other buffer costs a copy into an aligned bounce buffer below (see
//! `qcow_snapshot::direct`). The scratch buffers the data path hands down (the request
//! buffer, the folio cache's writeback and fill buffers) are therefore [`AlignedBuf`]s: their
//! start is aligned to [`IO_ALIGN`], so a slice of one that starts at a multiple of the file's
//! alignment goes to the device without a copy.
//!
//! Locking model: none; an `AlignedBuf` is owned like a `Vec<u8>`.

use std::alloc::{handle_alloc_error, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of an [`AlignedBuf`]'s start: a page, enough for every direct-I/O memory
/// alignment Linux reports for disks with up to 4 KiB logical blocks.
pub const IO_ALIGN: usize = 4096;

/// A zero-initialised byte buffer whose start is aligned to [`IO_ALIGN`].
pub struct AlignedBuf {
    /// What `calloc` returned (`None` for an empty buffer).
    raw: Option<NonNull<u8>>,
    /// The aligned start inside it.
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: an `AlignedBuf` owns its allocation exclusively, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer (no allocation).
    pub const fn new() -> Self {
        AlignedBuf {
            raw: None,
            ptr: NonNull::dangling(),
            len: 0,
        }
    }

    /// A buffer of `len` zero bytes. Allocated with `calloc` and aligned inside: a large one
    /// comes as fresh pages the kernel zeroes on first touch, so nothing is written until it is
    /// used (a scratch buffer of 1 MiB per flush thread would otherwise be zeroed by hand).
    pub fn zeroed(len: usize) -> Self {
        Self::zeroed_aligned(len, IO_ALIGN)
    }

    /// [`Self::zeroed`] with its start aligned to `align` too (rounded up to a power of two;
    /// never less than [`IO_ALIGN`]).
    pub fn zeroed_aligned(len: usize, align: usize) -> Self {
        let align = align.max(IO_ALIGN).next_power_of_two();
        if len == 0 {
            return Self::new();
        }
        let Some(total) = len.checked_add(align) else {
            handle_alloc_error(Layout::new::<[u8; IO_ALIGN]>());
        };
        // SAFETY: calloc with a non-zero size; the result is checked for null.
        let raw = unsafe { libc::calloc(1, total) }.cast::<u8>();
        let Some(raw) = NonNull::new(raw) else {
            handle_alloc_error(Layout::from_size_align(total, 1).unwrap_or(Layout::new::<u8>()));
        };
        let off = raw.as_ptr().align_offset(align);
        // SAFETY: `off < align`, so `raw + off .. raw + off + len` lies inside the allocation.
        let ptr = unsafe { raw.add(off) };
        AlignedBuf {
            raw: Some(raw),
            ptr,
            len,
        }
    }

    /// This buffer if it holds at least `len` bytes, else a fresh zeroed one of `len` bytes
    /// (scratch contents never matter to the callers, so nothing is copied over).
    pub fn at_least(self, len: usize) -> Self {
        if self.len >= len {
            self
        } else {
            Self::zeroed(len)
        }
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(raw) = self.raw {
            // SAFETY: `raw` came from calloc and is freed once.
            unsafe { libc::free(raw.as_ptr().cast()) };
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised bytes (or dangling with `len` 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_starts_page_aligned_zeroed_and_is_reused_only_when_large_enough() {
        for len in [1usize, 511, 4096, 65_537, 1 << 20] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0, "len {len}");
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
        }
        let mut b = AlignedBuf::zeroed(8192);
        b[100] = 7;
        let p = b.as_ptr();
        let b = b.at_least(4096);
        assert_eq!(
            (b.as_ptr(), b[100]),
            (p, 7),
            "a large enough buffer was replaced"
        );
        let b = b.at_least(8193);
        assert_eq!(b.len(), 8193);
        assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
        let big = AlignedBuf::zeroed_aligned(100, 3 * IO_ALIGN);
        assert_eq!(big.as_ptr() as usize % (4 * IO_ALIGN), 0);
        assert!(AlignedBuf::new().is_empty());
        assert!(AlignedBuf::zeroed(0).is_empty());
    }
}
