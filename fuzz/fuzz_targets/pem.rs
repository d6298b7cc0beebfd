//! The PEM loader, key parser and certificate-facts reader on arbitrary input.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sallyport::tls::pem::fuzz_entry(data));
