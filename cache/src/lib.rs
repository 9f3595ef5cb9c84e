//! The write-back folio cache (work in progress).
