//! Sallyport: a secure delivery gateway. Profile updates and sidecar traffic leave only
//! through one delivery core that proves who sends (mTLS client certificate), to whom
//! (verified server, mTLS-only receivers) and records it.
//!
//! Modules read as the architecture: [`config`] (the TOML model), [`tls`] (material, facts,
//! client configs), [`delivery`] (the one client), [`pki`] (dev certificates), [`receiver`]
//! (an in-process mTLS receiver for demos and tests), [`cli`] and [`demo`].

pub mod alerts;
pub mod api;
pub mod audit;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod demo;
pub mod egress;
pub mod export;
pub mod metrics;
pub mod pki;
pub mod receiver;
pub mod serve;
pub mod sidecar;
pub mod store;
pub mod tls;
pub mod verify;
