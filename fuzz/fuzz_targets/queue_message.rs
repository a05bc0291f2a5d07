//! cargo-fuzz target: the `queue_message` property of crates/fluxa-fuzz for arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluxa_fuzz::queue_message(data));
