//! The sidecar's path mapping: a mapped path never leaves the route's base path.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sallyport::sidecar::path::fuzz_entry(data));
