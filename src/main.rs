// glibc malloc showed as ~25% of the export pipeline's profile (allocation-heavy JSON and
// TLS buffers across tokio worker threads); mimalloc cuts that (bench/RESULTS.md, "Export throughput").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    sallyport::disable_transparent_huge_pages();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("SALLYPORT_LOG").unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    let cli = sallyport::cli::Cli::parse();
    sallyport::cli::main(cli)
}
