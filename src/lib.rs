//! Sallyport: a secure delivery gateway. Profile updates and sidecar traffic leave only
//! through one delivery core that proves who sends (mTLS client certificate), to whom
//! (verified server, mTLS-only receivers) and records it.
//!
//! Modules read as the architecture:
//! - [`config`]: the TOML model, its validation, and each receiver as a `DestinationConfig`;
//! - [`tls`]: PEM, certificate facts, the identity registry (rotation, reload), client configs;
//! - [`egress`]: the destination policy and source-address pins;
//! - [`delivery`]: the one core every outbound connection goes through (connector, pools,
//!   sessions, auth, retry, signing, errors);
//! - [`profile`]: the profile model (updates, merged state, triggers, batch planning);
//! - [`export`]: trigger rules, payloads and the export engine;
//! - [`store`]: SQLite and PostgreSQL (outbox, leases, dead letters, audit chain);
//! - [`audit`]: the hash-chained audit log and its file form;
//! - [`api`]: the public and admin listeners; [`serve`]: the composition root of `serve`;
//! - [`listener`]: how every listener accepts and holds connections (cap, timeouts, back-off);
//! - [`sidecar`]: plain HTTP in on loopback, out through the core;
//! - [`verify`]: receiver readiness checks; [`alerts`]: alert rules and the webhook;
//! - [`metrics`]: Prometheus/OpenMetrics text; [`telemetry`]: OpenTelemetry traces over OTLP;
//!   [`status`]: the overview the status page and `sallyport status` show; [`signals`]:
//!   SIGINT/SIGTERM/SIGHUP;
//! - [`pki`]: dev certificates; [`receiver`]: an in-process mTLS receiver for demos and tests;
//! - [`cli`] and [`demo`]: the command line.

pub mod alerts;
pub mod api;
pub mod audit;
mod batch;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod demo;
pub mod egress;
pub mod events;
pub mod export;
pub mod listener;
pub mod metrics;
pub mod pki;
pub mod profile;
pub mod receiver;
pub mod serve;
pub mod sidecar;
pub mod signals;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod verify;

/// Turn transparent huge pages off for this process (Linux; elsewhere a no-op). Call it first
/// thing in `main`.
///
/// mimalloc marks its arenas `MADV_HUGEPAGE`, so each first touch of allocator memory gets a
/// 2 MiB page zeroed on the spot, a real cost for the export pipeline's steady allocation
/// (bench/RESULTS.md, "Export pipeline changes, measured"). The flag is the process's own
/// (`PR_SET_THP_DISABLE`), read at every fault, so it also covers memory mapped before the
/// call; the system-wide setting is not touched.
pub fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        // Not fatal, only slower. Logging is not set up yet: say it on stderr.
        eprintln!("sallyport: could not turn transparent huge pages off ({e}); running with them");
    }
}
