//! Shared helpers for snapblk integration tests.
