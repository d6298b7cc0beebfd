//! `[egress]`: the source addresses outbound connections use, and where they may go.

use std::net::IpAddr;

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// Static source addresses outbound connections bind to. Default: none (OS chooses).
    #[serde(default)]
    pub source_ips: Vec<IpAddr>,
    /// Destinations allowed: host names, `*.suffix` wildcards, CIDRs. Default: none.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Destinations denied even if allowed. Default: none.
    #[serde(default)]
    pub deny: Vec<String>,
}
