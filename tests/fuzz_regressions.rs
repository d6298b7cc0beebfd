//! Every seed and every input a fuzzer ever crashed on goes through the fuzz entry points on
//! each test run (stable toolchain; the fuzzers themselves live in fuzz/).

use std::path::Path;

fn run_dir(dir: &str, entry: fn(&[u8])) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(Path::new("tests/fuzz-inputs").join(dir)).expect("inputs dir") {
        let p = e.expect("entry").path();
        let data = std::fs::read(&p).expect("readable input");
        entry(&data);
        // Truncations of each input reach the parsers' partial-input paths.
        for cut in [1, data.len() / 2, data.len().saturating_sub(1)] {
            entry(&data[..cut.min(data.len())]);
        }
        n += 1;
    }
    n
}

#[test]
fn config_inputs_do_not_panic() {
    assert!(run_dir("config", sallyport::config::fuzz_entry) >= 3);
}

#[test]
fn pem_inputs_do_not_panic() {
    assert!(run_dir("pem", sallyport::tls::pem::fuzz_entry) >= 3);
}

#[test]
fn egress_inputs_do_not_panic() {
    assert!(run_dir("egress", sallyport::egress::fuzz_entry) >= 3);
}
