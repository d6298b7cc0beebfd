//! Egress: where the gateway may connect to, and from which address. Lives in the one
//! connector every outbound request uses (exports, sidecar, OAuth2 token requests, alerts,
//! `send`), so no caller can bypass it.
//!
//! Destination policy, decided on every resolved address (never on a name alone):
//! 1. an `egress.deny` rule (host name, `*.suffix`, IP or CIDR) matching the name or the
//!    address refuses it;
//! 2. an address in a special range — loopback, RFC 1918, CGNAT, link-local (cloud metadata),
//!    unique-local, multicast, unspecified, broadcast, documentation, benchmarking, discard-only,
//!    local-use NAT64, IPv4-translated, 6to4 relay anycast, and the same ranges embedded in
//!    IPv4-mapped, IPv4-translated, NAT64, 6to4 or Teredo IPv6 — is refused unless an IP/CIDR
//!    `egress.allow` rule covers the address itself (a host-name rule is not enough: that is
//!    how DNS rebinding into the private network is stopped);
//! 3. otherwise the name must match a host rule or the address an IP/CIDR rule in
//!    `egress.allow`. Nothing matches → refused (deny by default).
//!
//! The connection then goes to exactly the address that was checked, never re-resolved.
//! Source pinning: with `egress.source_ips` set, every socket is bound to one of them (round
//! robin, same family as the destination); no pinned address of that family → refused, never
//! the default route.
//!
//! Must never: connect to an address it did not check, or connect from an unpinned address
//! when pins are configured.

mod net;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

pub use net::{special_range, Cidr};

use crate::config::EgressConfig;

/// One allow/deny rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// An exact host name (lower case, no trailing dot).
    Host(String),
    /// `*.suffix`: any name ending in `.suffix` (not `suffix` itself).
    Suffix(String),
    /// An address or a CIDR block.
    Net(Cidr),
}

impl Rule {
    /// Parse one `allow`/`deny` entry.
    pub fn parse(s: &str) -> Result<Rule, String> {
        let t = s.trim();
        if let Ok(c) = t.parse::<Cidr>() {
            return Ok(Rule::Net(c));
        }
        let lower = t.trim_end_matches('.').to_ascii_lowercase();
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
        };
        if let Some(suffix) = lower.strip_prefix("*.") {
            if suffix.split('.').all(valid_label) && suffix.contains('.') {
                return Ok(Rule::Suffix(suffix.to_owned()));
            }
            return Err(format!("'{s}' is not a wildcard like *.hooks.example.com"));
        }
        if !lower.is_empty() && lower.split('.').all(valid_label) && lower.parse::<IpAddr>().is_err() {
            // All-numeric names are IP spellings (2130706433, 0x7f.1): write them as addresses.
            if lower.split('.').all(|l| l.chars().all(|c| c.is_ascii_digit())) {
                return Err(format!(
                    "'{s}' looks like a numeric IP spelling; write the address or a CIDR"
                ));
            }
            return Ok(Rule::Host(lower));
        }
        Err(format!("'{s}' is not a host name, *.suffix, IP address or CIDR"))
    }

    fn matches_host(&self, host: &str) -> bool {
        match self {
            Rule::Host(h) => h == host,
            Rule::Suffix(s) => {
                host.len() > s.len() + 1
                    && host.ends_with(s.as_str())
                    && host.as_bytes()[host.len() - s.len() - 1] == b'.'
            }
            Rule::Net(_) => false,
        }
    }

    /// A deny rule matches the address or any IPv4 address embedded in it.
    fn matches_addr(&self, addr: IpAddr) -> bool {
        matches!(self, Rule::Net(c) if net::candidates(addr).iter().any(|a| c.contains(*a)))
    }

    /// An allow rule matches the address or the IPv4 address a fixed embedding carries.
    fn allows_addr(&self, addr: IpAddr) -> bool {
        matches!(self, Rule::Net(c) if net::allow_candidates(addr).iter().any(|a| c.contains(*a)))
    }
}

/// Name resolution, replaceable for tests that must cause a fault DNS cannot be made to
/// produce on demand (a rebinding answer). The default is the system resolver.
pub trait Resolve: Send + Sync {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, std::io::Result<Vec<SocketAddr>>>;
}

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The egress policy and source pins of one gateway.
#[derive(Default)]
pub struct Egress {
    allow: Vec<(usize, Rule)>,
    deny: Vec<(usize, Rule)>,
    sources_v4: Vec<IpAddr>,
    sources_v6: Vec<IpAddr>,
    next: AtomicUsize,
    resolver: Option<std::sync::Arc<dyn Resolve>>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("allow", &self.allow)
            .field("deny", &self.deny)
            .field("source_ips", &self.source_ips())
            .finish_non_exhaustive()
    }
}

/// Why a destination was refused. Its text always says `destination denied by egress policy`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("destination denied by egress policy: {host} ({addr}): {reason}")]
pub struct Denied {
    pub host: String,
    pub addr: IpAddr,
    pub reason: String,
}

impl Egress {
    /// Deny everything (the default of a destination without configured egress).
    pub fn deny_all() -> Self {
        Egress::default()
    }

    /// From `[egress]`; entries were validated with the config.
    pub fn from_config(cfg: &EgressConfig) -> Result<Self, String> {
        let parse = |list: &[String], what: &str| {
            list.iter()
                .enumerate()
                .map(|(i, s)| {
                    Rule::parse(s)
                        .map(|r| (i, r))
                        .map_err(|e| format!("egress.{what}[{i}]: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Egress {
            allow: parse(&cfg.allow, "allow")?,
            deny: parse(&cfg.deny, "deny")?,
            sources_v4: cfg.source_ips.iter().copied().filter(IpAddr::is_ipv4).collect(),
            sources_v6: cfg.source_ips.iter().copied().filter(IpAddr::is_ipv6).collect(),
            next: AtomicUsize::new(0),
            resolver: None,
        })
    }

    /// Resolve with `r` instead of the system resolver.
    pub fn with_resolver(mut self, r: std::sync::Arc<dyn Resolve>) -> Self {
        self.resolver = Some(r);
        self
    }

    /// Resolve `host` once (an IP literal is its own answer).
    pub async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        match &self.resolver {
            Some(r) => r.resolve(host, port).await,
            None => Ok(tokio::net::lookup_host((host, port)).await?.collect()),
        }
    }

    /// Allow exactly these rules (for `send` and tests).
    pub fn allowing(rules: &[&str]) -> Result<Self, String> {
        Self::from_config(&EgressConfig {
            allow: rules.iter().map(|s| (*s).to_owned()).collect(),
            ..EgressConfig::default()
        })
    }

    /// Decide one resolved address of `host` (the URL's host, lower case).
    pub fn check(&self, host: &str, addr: IpAddr) -> Result<(), Denied> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let denied = |reason: String| Denied {
            host: host.clone(),
            addr,
            reason,
        };
        if let Some((i, _)) = self
            .deny
            .iter()
            .find(|(_, r)| r.matches_host(&host) || r.matches_addr(addr))
        {
            return Err(denied(format!("matches egress.deny[{i}]")));
        }
        let allowed_addr = self.allow.iter().find(|(_, r)| r.allows_addr(addr));
        if let Some(range) = net::candidates(addr).into_iter().find_map(special_range) {
            return match allowed_addr {
                Some(_) => Ok(()),
                None => Err(denied(format!(
                    "{range} addresses are denied unless an egress.allow IP/CIDR rule covers the address"
                ))),
            };
        }
        if allowed_addr.is_some() || self.allow.iter().any(|(_, r)| r.matches_host(&host)) {
            return Ok(());
        }
        Err(denied("not in egress.allow".into()))
    }

    /// The source address to bind for a connection to `dest`: `Ok(None)` lets the OS choose
    /// (no pins configured); an error when pins exist but none of `dest`'s family.
    pub fn source_for(&self, dest: &SocketAddr) -> Result<Option<IpAddr>, String> {
        if self.sources_v4.is_empty() && self.sources_v6.is_empty() {
            return Ok(None);
        }
        let pool = if dest.is_ipv4() {
            &self.sources_v4
        } else {
            &self.sources_v6
        };
        if pool.is_empty() {
            return Err(format!(
                "no pinned source address of the {} family for {dest}; egress.source_ips forbids the default route",
                if dest.is_ipv4() { "IPv4" } else { "IPv6" }
            ));
        }
        Ok(Some(pool[self.next.fetch_add(1, Ordering::Relaxed) % pool.len()]))
    }

    /// The pinned source addresses, for `GET /v1/egress-ips`.
    pub fn source_ips(&self) -> Vec<IpAddr> {
        self.sources_v4.iter().chain(&self.sources_v6).copied().collect()
    }
}

/// Refuse to start unless every pinned source address is assigned to a local interface
/// (binding a socket to it is the portable test).
pub fn check_source_ips(ips: &[IpAddr]) -> Result<(), String> {
    for (i, ip) in ips.iter().enumerate() {
        std::net::TcpListener::bind(SocketAddr::new(*ip, 0)).map_err(|e| {
            format!("egress.source_ips[{i}]: {ip} is not assigned to a local interface ({e})")
        })?;
    }
    Ok(())
}

/// The document `GET /v1/egress-ips` serves: the addresses receivers should allowlist.
pub fn egress_ips_document(ips: &[IpAddr]) -> serde_json::Value {
    serde_json::json!({
        "egressIps": ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "pinned": !ips.is_empty(),
    })
}

/// Entry point for the egress fuzz target: rule parsing, URL checking and a policy decision
/// on whatever host the URL names — any input gives a verdict, never a panic.
pub fn fuzz_entry(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = Rule::parse(s);
    if let Ok(url) = crate::config::check_url(s) {
        let policy = Egress::allowing(&["*.example.com", "10.0.0.0/8", "::1"]).unwrap_or_default();
        let addr = match url.host() {
            Some(url::Host::Ipv4(a)) => IpAddr::V4(a),
            Some(url::Host::Ipv6(a)) => IpAddr::V6(a),
            _ => IpAddr::from([93, 184, 216, 34]),
        };
        let _ = policy.check(url.host_str().unwrap_or_default(), addr);
    }
}
