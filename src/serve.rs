//! `sallyport serve`: the composition root. Loads and validates the config, opens the store
//! and the export engine (backfilling newly mapped segments), starts one delivery worker per
//! dataflow, the public listener and the admin listener (and the trace exporter when
//! `[telemetry]` is set), and runs until SIGINT or SIGTERM.

use std::sync::Arc;

use tokio::sync::watch;

use crate::api::{self, admin::TokenCheck};
use crate::config::Config;
use crate::delivery::Core;
use crate::export::Engine;

/// Run the gateway until a shutdown signal. Errors are start-up errors, for the operator.
pub async fn run(cfg: Config) -> Result<(), String> {
    let cfg = Arc::new(cfg);
    let token = match cfg.secret_source(
        cfg.admin.token_env.as_ref(),
        cfg.admin.token_file.as_ref(),
        "token",
    ) {
        Ok(src) => Some(src.read().map_err(|e| format!("admin.token: {e}"))?),
        Err(_) => {
            tracing::warn!("no admin token configured: the admin API refuses every request");
            None
        }
    };
    let tokens = Arc::new(TokenCheck::new(token.as_ref())?);
    // Traces when [telemetry] names a collector; flushed after the listeners stop.
    let telemetry = crate::telemetry::Telemetry::start(&cfg)?;
    crate::egress::check_source_ips(&cfg.egress.source_ips)?;
    // One delivery core for the whole process: exports, sidecar and alerts present the same
    // identities, rotated by one watcher.
    let core = Core::from_config(&cfg)?;
    let engine = Engine::open_with(&cfg, core.clone())
        .await
        .map_err(|e| e.to_string())?;
    let public = api::bind("public", cfg.public.listen).await?;
    let public_tls = match (&cfg.public.tls_cert, &cfg.public.tls_key) {
        (Some(c), Some(k)) => {
            Some(api::tls_acceptor(&cfg.path(c), &cfg.path(k)).map_err(|e| format!("public.tls_cert: {e}"))?)
        }
        _ => None,
    };
    let admin = api::bind("admin", cfg.admin.listen).await?;
    // Checked when the config was loaded; still reported rather than unwrapped.
    let public_limits = cfg
        .public
        .limits()
        .map_err(|e| crate::config::limit_errors("public", e))?;
    let admin_limits = cfg
        .admin
        .limits()
        .map_err(|e| crate::config::limit_errors("admin", e))?;
    let alerts = crate::alerts::Alerts::from_config(&cfg, &core)?;
    // Operational events: logged, and sent to the [events] webhook when one is configured.
    let (events, sender) = crate::events::Events::from_config(&cfg, &core)?;
    engine.set_events(events.clone());
    let mut workers = engine.spawn_workers();
    workers.extend(sender);
    workers.push(events.watch_certificates(
        core.identities(),
        crate::events::cert_expiry_days(&cfg),
        crate::events::CERT_CHECK_INTERVAL,
    ));
    workers.push(tokio::spawn(core.clone().watch(crate::sidecar::IDENTITY_POLL)));
    workers.push(tokio::spawn(alerts.run(engine.clone())));
    if cfg.sidecar.is_some() {
        // The engine's store: one chain head for the engine's and the sidecar's records.
        workers.extend(crate::sidecar::start_with_store(&cfg, &core, Some(engine.store())).await?);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let servers = [
        tokio::spawn(api::serve(
            "public",
            public,
            api::public::handler(engine.clone(), cfg.egress.source_ips.clone()),
            public_tls,
            public_limits,
            stop_rx.clone(),
        )),
        tokio::spawn(api::serve(
            "admin",
            admin,
            api::admin::handler(engine.clone(), cfg.clone(), tokens),
            None,
            admin_limits,
            stop_rx,
        )),
    ];
    eprintln!(
        "sallyport: serving (public {}, admin {}, {} dataflow(s))",
        cfg.public.listen,
        cfg.admin.listen,
        cfg.dataflows.len()
    );
    crate::signals::shutdown().await;
    eprintln!("sallyport: shutting down");
    let _ = stop_tx.send(true);
    for w in workers {
        w.abort();
    }
    for s in servers {
        let _ = s.await;
    }
    if let Some(t) = telemetry {
        t.shutdown().await;
    }
    Ok(())
}
