//! `Retry-After` header values (delay-seconds, HTTP dates) and the retry policy given them.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sallyport::delivery::retry::fuzz_entry(data));
