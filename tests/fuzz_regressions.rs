//! Every seed and every input a fuzzer ever crashed on goes through the fuzz entry points on
//! each test run (stable toolchain; the fuzzers themselves live in fuzz/, `scripts/fuzz.sh` runs
//! them all). One directory of tests/fuzz-inputs per target, named as the target.

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

#[test]
fn ndjson_inputs_do_not_panic() {
    assert!(run_dir("ndjson", sallyport::profile::update::fuzz_entry) >= 3);
}

#[test]
fn header_and_query_syntax_inputs_do_not_panic() {
    assert!(run_dir("syntax", sallyport::config::syntax_fuzz_entry) >= 3);
}

#[test]
fn retry_after_inputs_do_not_panic() {
    assert!(run_dir("retry_after", sallyport::delivery::retry::fuzz_entry) >= 3);
}

#[test]
fn audit_file_inputs_do_not_panic() {
    assert!(run_dir("audit_file", sallyport::audit::file::fuzz_entry) >= 3);
}

#[test]
fn oauth_token_response_inputs_do_not_panic() {
    assert!(run_dir("oauth_token", sallyport::delivery::auth::fuzz_entry) >= 3);
}

#[test]
fn sidecar_path_inputs_stay_under_the_base_path() {
    assert!(run_dir("sidecar_path", sallyport::sidecar::path::fuzz_entry) >= 3);
}

/// Each fuzz target's inputs are replayed here: a target added to fuzz/fuzz_targets needs its
/// directory in tests/fuzz-inputs and a `run_dir` test above.
#[test]
fn every_fuzz_target_has_its_inputs_replayed() {
    let this = std::fs::read_to_string("tests/fuzz_regressions.rs").expect("this file");
    for e in std::fs::read_dir("fuzz/fuzz_targets").expect("fuzz targets") {
        let p = e.expect("entry").path();
        let Some(name) = p.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        assert!(
            Path::new("tests/fuzz-inputs").join(name).is_dir(),
            "fuzz target {name} has no tests/fuzz-inputs/{name}/"
        );
        assert!(
            this.contains(&format!("run_dir(\"{name}\"")),
            "fuzz target {name} is not replayed by tests/fuzz_regressions.rs"
        );
    }
}
