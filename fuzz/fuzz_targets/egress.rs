//! The egress rule parser, URL check and policy decision on arbitrary input.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sallyport::egress::fuzz_entry(data));
