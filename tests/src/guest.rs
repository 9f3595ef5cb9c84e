//! QEMU guest harness (in progress).
