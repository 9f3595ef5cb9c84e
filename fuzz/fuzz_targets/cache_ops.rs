//! cargo-fuzz target `cache_ops`: see `snapblk_fuzz::cacheops` for the input format and the oracles.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| snapblk_fuzz::cacheops::run(data));
