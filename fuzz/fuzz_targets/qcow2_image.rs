//! cargo-fuzz target `qcow2_image`: see `snapblk_fuzz::qcow` for the input format and the oracles.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| snapblk_fuzz::qcow::run(data));
