//! cargo-fuzz target `virtio_blk_chain`: see `snapblk_fuzz::chain` for the input format and the oracles.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| snapblk_fuzz::chain::run(data));
