//! The TOML config parser and validator on arbitrary input.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sallyport::config::fuzz_entry(data));
