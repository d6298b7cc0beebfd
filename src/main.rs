// mimalloc: the export pipeline allocates JSON and TLS buffers across worker threads, where
// glibc malloc stood out in profiles (bench/RESULTS.md, "Export throughput").
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
