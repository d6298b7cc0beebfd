//! `sallyport audit verify|export`: walk the audit log's hash chains, checking or exporting them.

use super::{AuditCommand, Failure};
use crate::config::Config;

pub(super) fn run(cmd: AuditCommand) -> Result<(), Failure> {
    let (config, since) = match &cmd {
        AuditCommand::Verify { config } => (config, None),
        AuditCommand::Export { config, since } => (config, since.as_deref()),
    };
    let since_ms = match since {
        Some(s) => Some(
            crate::profile::update::rfc3339_to_unix_ms(s)
                .ok_or_else(|| Failure::usage(format!("--since: '{s}' is not an RFC 3339 time")))?,
        ),
        None => None,
    };
    let cfg = Config::load(config).map_err(Failure::usage)?;
    let store = crate::store::open(&cfg).map_err(Failure::failed)?;
    let chain = crate::store::audit_chain(&cfg).map_err(Failure::failed)?;
    let keyed = cfg.audit.key_env.is_some() || cfg.audit.key_file.is_some();
    let export = matches!(cmd, AuditCommand::Export { .. });
    let mut out = std::io::stdout().lock();
    let mut total = 0;
    let chains = store.audit_chains().map_err(Failure::failed)?;
    for name in &chains {
        // One chain at a time, page by page: memory stays bounded by a page.
        let mut pass = AuditPass::new(name, &chain, export, since_ms);
        let mut after = 0;
        loop {
            let page = store
                .audit_chain_records(name, after, 10_000)
                .map_err(Failure::failed)?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for r in page {
                pass.record(r, &mut out)?;
            }
        }
        total += pass.verifier.verified();
    }
    // The sidecar's audit file, when it has one, is one more chain.
    let file = cfg
        .sidecar
        .as_ref()
        .and_then(|s| s.audit_file.as_ref())
        .map(|p| cfg.path(p));
    if let Some(path) = &file {
        let name = format!("file:{}", path.display());
        let mut pass = AuditPass::new(&name, &chain, export, since_ms);
        let mut first = true;
        crate::audit::file::read_chain(path, |r| {
            if std::mem::take(&mut first) && r.seq > 1 {
                // Earlier segments were archived: the chain is checked from the first one kept.
                if !export {
                    println!(
                        "chain '{name}' starts at record {} here (earlier segments archived or removed)",
                        r.seq
                    );
                }
                pass.verifier = crate::audit::Verifier::resume(&chain, r.seq - 1, &r.prev);
            }
            pass.record(r, &mut out)
        })?;
        total += pass.verifier.verified();
    }
    if !export {
        println!(
            "audit log intact: {total} record(s) verified in {} chain(s){}",
            chains.len() + usize::from(file.is_some()),
            if keyed {
                " (hash chain and HMAC)"
            } else {
                " (hash chain)"
            }
        );
    }
    Ok(())
}

/// One chain's walk for `audit verify` (each record checked in order) or `audit export` (each
/// record printed as a JSON line, from `since` on).
struct AuditPass<'a> {
    name: &'a str,
    verifier: crate::audit::Verifier<'a>,
    /// `Some(since)` when exporting.
    export: Option<Option<i64>>,
}

impl<'a> AuditPass<'a> {
    fn new(name: &'a str, chain: &'a crate::audit::Chain, export: bool, since_ms: Option<i64>) -> Self {
        AuditPass {
            name,
            verifier: crate::audit::Verifier::new(chain),
            export: export.then_some(since_ms),
        }
    }

    fn record(
        &mut self,
        r: crate::audit::ChainedRecord,
        out: &mut impl std::io::Write,
    ) -> Result<(), Failure> {
        let Some(since_ms) = self.export else {
            return self.verifier.push(&r).map_err(|b| {
                Failure::failed(format!(
                    "audit log broken at record {} of chain '{}': {}",
                    b.seq, self.name, b.reason
                ))
            });
        };
        let rec: serde_json::Value = serde_json::from_str(&r.record).map_err(Failure::failed)?;
        if since_ms.is_some_and(|s| rec["at"].as_i64().unwrap_or(0) < s) {
            return Ok(());
        }
        let line = serde_json::json!({"chain": self.name, "seq": r.seq, "hash": r.hash, "prev": r.prev, "record": rec});
        writeln!(out, "{line}").map_err(Failure::failed)
    }
}
