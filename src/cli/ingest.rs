//! `sallyport ingest`: load an NDJSON file of profile updates into the store (offline).

use super::{Failure, IngestArgs};
use crate::config::Config;

pub(super) async fn run(args: IngestArgs) -> Result<(), Failure> {
    let cfg = Config::load(&args.config).map_err(Failure::usage)?;
    let engine = crate::export::Engine::open(&cfg).await.map_err(Failure::failed)?;
    // Read and stored in groups as it is parsed, so a file of any size takes one group's memory.
    let mut input: Box<dyn tokio::io::AsyncRead + Unpin> = if args.file.as_os_str() == "-" {
        Box::new(tokio::io::stdin())
    } else {
        Box::new(
            tokio::fs::File::open(&args.file)
                .await
                .map_err(|e| Failure::usage(format!("{}: {e}", args.file.display())))?,
        )
    };
    let partly = |p: crate::export::engine::PartlyStored| {
        Failure::failed(format!(
            "{} (the first {} accepted updates were stored; running the same file again is safe)",
            p.error, p.stored
        ))
    };
    let mut session = engine.ingest_session();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = tokio::io::AsyncReadExt::read(&mut input, &mut buf)
            .await
            .map_err(|e| Failure::failed(format!("{}: {e}", args.file.display())))?;
        if n == 0 {
            break;
        }
        session.feed(&buf[..n]).await.map_err(partly)?;
    }
    let report = session.finish().await.map_err(partly)?;
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
