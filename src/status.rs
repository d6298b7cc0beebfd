//! The gateway at a glance: what the status page (`/ui`), `GET /v1/overview` and
//! `sallyport status` show. One [`Overview`] is gathered from the running engine (the same
//! counters `/metrics` reads), the store (dead letters, the latest audit records) and the
//! config (egress addresses, sidecar routes).
//!
//! It must never carry a payload, a credential or a key: dead letters are listed by id and
//! metadata, audit records by their metadata fields only.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::export::Engine;
use crate::store::DeadLetterFilter;

/// Dead letters and audit records listed at most.
pub const LATEST: usize = 20;

/// Everything the status page shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Overview {
    /// UNIX ms.
    pub generated_at: i64,
    pub dataflows: Vec<FlowOverview>,
    /// Ingest-to-delivered latency over every dataflow, milliseconds.
    pub ingest_to_delivered_p50_ms: f64,
    pub ingest_to_delivered_p99_ms: f64,
    /// The oldest first, at most [`LATEST`].
    pub dead_letters: Vec<DeadLetterRow>,
    /// Dead letters in the store (all dataflows), up to the listing's limit.
    pub identities: Vec<IdentityRow>,
    pub egress_ips: Vec<String>,
    pub sidecar_routes: Vec<SidecarRouteRow>,
    /// The newest last, at most [`LATEST`].
    pub audit: Vec<AuditRow>,
}

/// One dataflow.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowOverview {
    pub name: String,
    /// `running`, `held` or `paused`.
    pub state: String,
    /// Why it is paused or held, in a sentence.
    pub why: Option<String>,
    /// `breaker` or `manual`, when paused.
    pub pause_reason: Option<String>,
    /// The failure class that tripped the breaker.
    pub pause_class: Option<String>,
    /// UNIX ms.
    pub paused_since: Option<i64>,
    pub next_probe_at: Option<i64>,
    pub held_until: Option<i64>,
    pub pending: u64,
    pub delivered: u64,
    pub retried: u64,
    pub dead: u64,
    /// Over the last minute (since the first look, at first); `None` until two looks.
    pub delivered_per_sec: Option<f64>,
    /// Attempt latency quantiles, seconds (a histogram bucket's bound).
    pub attempt_p50_s: Option<f64>,
    pub attempt_p99_s: Option<f64>,
    /// Failed attempts by error kind and by class.
    pub failures_by_kind: BTreeMap<String, u64>,
    pub failures_by_class: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterRow {
    pub id: i64,
    pub dataflow: String,
    pub profile_id: String,
    pub class: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// UNIX ms.
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityRow {
    pub name: String,
    /// `current` or `next`.
    pub role: String,
    pub cn: Option<String>,
    pub sans: Vec<String>,
    /// RFC 3339.
    pub not_after: String,
    pub fingerprint: String,
    /// For `next`: when it takes over (RFC 3339), if the config says.
    pub takes_over: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarRouteRow {
    pub listen: String,
    pub prefix: String,
    pub upstream: String,
    pub mtls: bool,
    /// Attempts through this route since the process started, and how many failed (no
    /// answer, or a 5xx).
    pub attempts: u64,
    pub failed: u64,
}

/// An audit record's metadata (never a payload: the record holds only its hash anyway).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRow {
    pub seq: i64,
    pub at: i64,
    pub dataflow: String,
    pub destination: String,
    pub outcome: String,
    pub http_status: Option<u16>,
    pub error_kind: Option<String>,
    pub attempt: u32,
    pub latency_ms: f64,
    pub trigger: Option<String>,
    pub trace_id: Option<String>,
}

/// Remembers delivered counts over the last minute, for a rate per second.
#[derive(Debug, Default)]
pub struct RateMeter {
    samples: Mutex<VecDeque<(Instant, BTreeMap<String, u64>)>>,
}

const RATE_WINDOW: Duration = Duration::from_secs(60);

impl RateMeter {
    /// Record `now`'s counts; return per dataflow the rate since the oldest sample in the
    /// window (`None` for a dataflow with no earlier sample, or a window shorter than 0.5 s).
    fn observe(&self, counts: BTreeMap<String, u64>) -> BTreeMap<String, f64> {
        let now = Instant::now();
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        while s.len() > 1
            && s.front()
                .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            s.pop_front();
        }
        let mut rates = BTreeMap::new();
        if let Some((t, old)) = s.front() {
            let secs = now.duration_since(*t).as_secs_f64();
            if secs >= 0.5 {
                for (name, n) in &counts {
                    if let Some(o) = old.get(name) {
                        rates.insert(name.clone(), n.saturating_sub(*o) as f64 / secs);
                    }
                }
            }
        }
        if s.back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_millis(500))
        {
            s.push_back((now, counts));
        }
        if s.len() > 256 {
            s.pop_front();
        }
        rates
    }
}

/// Gather the overview.
pub async fn overview(engine: &Engine, cfg: &Config, rates: &RateMeter) -> Result<Overview, String> {
    let statuses = engine.dataflow_statuses().await.map_err(|e| e.to_string())?;
    let counters = engine.flow_counters();
    let delivered: BTreeMap<String, u64> = counters.iter().map(|(n, c)| (n.clone(), c.delivered)).collect();
    let per_sec = rates.observe(delivered);
    let mut dataflows = Vec::new();
    for s in &statuses {
        let Some((_, c)) = counters.iter().find(|(n, _)| *n == s.dataflow) else {
            continue;
        };
        let failures_by_kind: BTreeMap<String, u64> = c
            .errors_by_kind
            .iter()
            .map(|(k, n)| ((*k).to_owned(), *n))
            .collect();
        let failures_by_class = c
            .failures_by_class
            .iter()
            .map(|(k, n)| ((*k).to_owned(), *n))
            .collect();
        let why = match (&s.pause, s.held_until) {
            (Some(p), _) => Some(p.message.clone()),
            (None, Some(_)) => Some("the receiver asked for a wait (Retry-After)".to_owned()),
            _ => None,
        };
        dataflows.push(FlowOverview {
            name: s.dataflow.clone(),
            state: s.state.to_owned(),
            why,
            pause_reason: s.pause.as_ref().map(|p| p.reason.as_str().to_owned()),
            pause_class: s.pause.as_ref().and_then(|p| p.class.clone()),
            paused_since: s.pause.as_ref().map(|p| p.since),
            next_probe_at: s.pause.as_ref().map(|p| p.probe_at).filter(|t| *t > 0),
            held_until: s.held_until,
            pending: s.pending,
            delivered: c.delivered,
            retried: c.retried,
            dead: c.dead,
            delivered_per_sec: per_sec.get(&s.dataflow).copied(),
            attempt_p50_s: c.attempt_p50_s,
            attempt_p99_s: c.attempt_p99_s,
            failures_by_kind,
            failures_by_class,
        });
    }
    let stats = engine.stats();
    let store = engine.store();
    let (dead_letters, audit) = tokio::task::spawn_blocking(move || {
        let filter = DeadLetterFilter {
            limit: LATEST,
            ..Default::default()
        };
        let dl = store.dead_letters_where(&filter).map_err(|e| e.to_string())?;
        let audit = latest_audit(store.as_ref(), LATEST).map_err(|e| e.to_string())?;
        Ok::<_, String>((dl, audit))
    })
    .await
    .map_err(|e| e.to_string())??;
    Ok(Overview {
        generated_at: crate::store::now_ms(),
        dataflows,
        ingest_to_delivered_p50_ms: stats.p50_ms,
        ingest_to_delivered_p99_ms: stats.p99_ms,
        dead_letters: dead_letters
            .into_iter()
            .map(|d| DeadLetterRow {
                id: d.id,
                dataflow: d.dataflow,
                profile_id: d.profile_id,
                class: d.class.as_str().to_owned(),
                attempts: d.attempts,
                last_error: d.errors.last().map(|e| e.message.clone()),
                created_at: d.created_at,
            })
            .collect(),
        identities: identities(engine, cfg),
        egress_ips: cfg.egress.source_ips.iter().map(|ip| ip.to_string()).collect(),
        sidecar_routes: sidecar_routes(cfg),
        audit,
    })
}

/// The sidecar's routes when it runs in this process (`[sidecar]` in the config `serve` read).
fn sidecar_routes(cfg: &Config) -> Vec<SidecarRouteRow> {
    let Some(sc) = &cfg.sidecar else {
        return Vec::new();
    };
    let row = |listen: String, label: &str, r: &crate::config::SidecarRoute| {
        let (attempts, failed) =
            crate::sidecar::route_counts(&format!("{label}:{}", r.prefix)).unwrap_or_default();
        SidecarRouteRow {
            listen,
            prefix: r.prefix.clone(),
            upstream: without_query(&r.upstream),
            mtls: r.mtls,
            attempts,
            failed,
        }
    };
    let main = sc
        .unix_socket
        .as_ref()
        .map_or_else(|| sc.listen.to_string(), |p| p.display().to_string());
    let mut out: Vec<_> = sc
        .routes
        .iter()
        .map(|r| row(main.clone(), "sidecar", r))
        .collect();
    for (n, l) in sc.listeners.iter().enumerate() {
        let at = l
            .unix_socket
            .as_ref()
            .map(|p| p.display().to_string())
            .or_else(|| l.listen.map(|a| a.to_string()))
            .unwrap_or_default();
        let label = format!("sidecar[{n}]");
        out.extend(l.routes.iter().map(|r| row(at.clone(), &label, r)));
    }
    out
}

/// A URL without its query and user info: query values may carry secrets.
pub fn without_query(u: &str) -> String {
    match url::Url::parse(u) {
        Ok(mut url) => {
            url.set_query(None);
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        }
        Err(_) => u.split('?').next().unwrap_or_default().to_owned(),
    }
}

fn identities(engine: &Engine, cfg: &Config) -> Vec<IdentityRow> {
    let mut out = Vec::new();
    for (name, store) in engine.identities() {
        let id_cfg = if name == crate::tls::creds::DEFAULT {
            cfg.identity.as_ref()
        } else {
            cfg.identities.get(&name)
        };
        let published = store.published();
        let current_not_after = published.first().map(|(_, i)| i.facts.not_after);
        for (role, identity) in published {
            let f = &identity.facts;
            let role = match role {
                crate::tls::creds::Role::Current => "current",
                crate::tls::creds::Role::Next => "next",
            };
            let takes_over = (role == "next")
                .then(|| id_cfg.and_then(|c| switch_time(c, current_not_after)))
                .flatten();
            let mut sans = Vec::new();
            sans.extend(f.sans.dns.iter().map(|s| format!("DNS:{s}")));
            sans.extend(f.sans.ip.iter().map(|s| format!("IP:{s}")));
            sans.extend(f.sans.uri.iter().map(|s| format!("URI:{s}")));
            sans.extend(f.sans.email.iter().map(|s| format!("email:{s}")));
            out.push(IdentityRow {
                name: name.clone(),
                role: role.to_owned(),
                cn: f.subject_cn.clone(),
                sans,
                not_after: rfc3339(f.not_after),
                fingerprint: f.sha256_fingerprint.clone(),
                takes_over,
            });
        }
    }
    out
}

/// When the configured `next` certificate takes over: `switch_at`, or `switch_before_expiry`
/// before the current one expires, whichever comes first.
fn switch_time(
    c: &crate::config::IdentityConfig,
    current_not_after: Option<time::OffsetDateTime>,
) -> Option<String> {
    let at = c
        .switch_at
        .as_deref()
        .and_then(|s| time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok());
    let before = c
        .switch_before_expiry
        .as_deref()
        .and_then(|d| humantime::parse_duration(d).ok())
        .and_then(|d| time::Duration::try_from(d).ok())
        .zip(current_not_after)
        .map(|(d, na)| na - d);
    match (at, before) {
        (Some(a), Some(b)) => Some(rfc3339(a.min(b))),
        (a, b) => a.or(b).map(rfc3339),
    }
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The newest `n` records of this process's audit chain, oldest first. The store reads a
/// chain forwards only, so the last sequence number is found by galloping then bisecting
/// (a few indexed reads), then the tail is read.
fn latest_audit(
    store: &dyn crate::store::Store,
    n: usize,
) -> Result<Vec<AuditRow>, crate::store::StoreError> {
    let exists_after = |seq: i64| store.audit_records(seq, 1).map(|r| !r.is_empty());
    if !exists_after(0)? {
        return Ok(Vec::new());
    }
    // Invariant: a record exists after `lo`, none after `hi`.
    let (mut lo, mut hi) = (0i64, 1024i64);
    while exists_after(hi)? {
        lo = hi;
        hi = hi.saturating_mul(2);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if exists_after(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let records = store.audit_records((hi - n as i64).max(0), n)?;
    Ok(records
        .into_iter()
        .filter_map(|r| {
            let v: serde_json::Value = serde_json::from_str(&r.record).ok()?;
            let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
            Some(AuditRow {
                seq: r.seq,
                at: v.get("at")?.as_i64()?,
                dataflow: s("dataflow")?,
                destination: s("destination").unwrap_or_default(),
                outcome: s("outcome").unwrap_or_default(),
                http_status: v.get("httpStatus").and_then(|x| x.as_u64()).map(|x| x as u16),
                error_kind: s("errorKind"),
                attempt: v.get("attempt").and_then(|x| x.as_u64()).unwrap_or(0) as u32,
                latency_ms: v.get("latencyMs").and_then(|x| x.as_f64()).unwrap_or(0.0),
                trigger: s("trigger"),
                trace_id: s("traceId"),
            })
        })
        .collect())
}
