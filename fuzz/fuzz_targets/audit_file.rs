//! Audit-file lines: the reader, chain verification and the writer's resume point.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sallyport::audit::file::fuzz_entry(data));
