//! cargo-fuzz target: the `cursor` property of crates/fluxa-fuzz for arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluxa_fuzz::cursor(data));
