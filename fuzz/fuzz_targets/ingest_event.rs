//! cargo-fuzz target: the `ingest_event` property of crates/fluxa-fuzz for arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluxa_fuzz::ingest_event(data));
