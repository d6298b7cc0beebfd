//! `sallyport ingest`: load an NDJSON file of profile updates into the store (offline).

use super::{Failure, IngestArgs};
use crate::config::Config;

pub(super) async fn run(args: IngestArgs) -> Result<(), Failure> {
    let cfg = Config::load(&args.config).map_err(Failure::usage)?;
    let bytes = if args.file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buf).map_err(Failure::usage)?;
        buf
    } else {
        std::fs::read(&args.file).map_err(|e| Failure::usage(format!("{}: {e}", args.file.display())))?
    };
    let engine = crate::export::Engine::open(&cfg).await.map_err(Failure::failed)?;
    let report = engine.ingest(&bytes).await.map_err(Failure::failed)?;
    let pending = engine.pending().await.map_err(Failure::failed)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"accepted": report.accepted, "rejected": report.rejected,
            "errors": report.errors, "errorsOmitted": report.errors_omitted,
            "pendingDeliveries": pending})
        );
    } else {
        println!(
            "accepted {} update(s), rejected {}; {pending} deliveries pending",
            report.accepted, report.rejected
        );
        for e in &report.errors {
            eprintln!("{}:{}: {}", args.file.display(), e.line, e.reason);
        }
        if report.errors_omitted > 0 {
            eprintln!(
                "{}: {} more rejected line(s) not listed (the first {} are)",
                args.file.display(),
                report.errors_omitted,
                report.errors.len()
            );
        }
    }
    if report.rejected > 0 {
        return Err(Failure::failed(format!("{} line(s) rejected", report.rejected)));
    }
    Ok(())
}
