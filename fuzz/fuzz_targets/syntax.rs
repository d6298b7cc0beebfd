//! The compact header (`h1:v1,h2:v2`) and query (`p1=v1&p2=v2`) syntaxes on arbitrary input.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sallyport::config::syntax_fuzz_entry(data));
