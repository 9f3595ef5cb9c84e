//! Shared helpers for snapblk integration, end-to-end and benchmark code.
//!
//! - [`client`]: a userspace vhost-user-blk client (the `blkio` crate), no guest needed.
//! - [`guest`]: builds and boots a real QEMU (TCG) guest against a vhost-user socket.
//! - [`nbd`]: qemu-nbd and nbdkit servers on unix sockets for the NBD-base tests.
//! - [`chaos`]: a delaying, sync-failing in-memory host file for the linearizability checks.

pub mod chaos;
pub mod client;
pub mod crashsim;
pub mod guest;
pub mod nbd;
