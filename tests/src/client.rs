//! Userspace vhost-user-blk client (in progress).
