//! NDJSON profile-update ingest (parse, counts, error cap, batch planning) on arbitrary input.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sallyport::profile::update::fuzz_entry(data));
