//! `sallyport config check`: validate a config file and print every problem with its key.

use super::Failure;
use crate::config::Config;

pub(super) fn run(path: &std::path::Path) -> Result<(), Failure> {
    let cfg = Config::load(path).map_err(Failure::usage)?;
    println!(
        "{}: ok ({} dataflow(s), {} segment(s))",
        path.display(),
        cfg.dataflows.len(),
        cfg.segments.len()
    );
    Ok(())
}
