//! OAuth2 token endpoint responses: parsed, and their lifetime clamped, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sallyport::delivery::auth::fuzz_entry(data));
