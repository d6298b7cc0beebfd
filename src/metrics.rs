//! `/metrics` (admin listener) through `prometheus-client`: per-dataflow delivery outcomes,
//! error kinds, attempt latency histograms (with trace-id exemplars when traces are on),
//! retries, dead letters, queue depth, pause state, token requests, and the client
//! certificates' remaining lifetime. OpenMetrics text when the scraper asks for it, the
//! Prometheus text format otherwise; the series names are the same in both.
//!
//! The live numbers stay in [`FlowCounters`] (atomics, updated on the delivery path); a
//! scrape copies them into a [`Collector`] for that one encoding. This module never sees a
//! payload or a secret, only names and numbers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::audit::Outcome;
use crate::delivery::ErrorKind;

/// Upper bounds (seconds) of the attempt-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0];

/// The exemplar label set of an attempt: its trace id.
pub type TraceExemplar = Vec<(&'static str, String)>;

/// `Content-Type` of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Counters of one dataflow, updated as outcomes are recorded.
#[derive(Debug)]
pub struct FlowCounters {
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Failed attempts by failure class.
    classes: Mutex<BTreeMap<&'static str, u64>>,
    /// Bucket counts (not cumulative) for the status page's quantiles; the last is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency: HistogramWithExemplars<TraceExemplar>,
}

impl Default for FlowCounters {
    fn default() -> Self {
        FlowCounters {
            delivered: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            classes: Mutex::new(BTreeMap::new()),
            buckets: Default::default(),
            latency: HistogramWithExemplars::new(LATENCY_BUCKETS.into_iter()),
        }
    }
}

impl FlowCounters {
    /// Count one export attempt: its outcome (delivered, retry, dead letter), error kind and
    /// latency.
    pub fn record(&self, outcome: Outcome, error_kind: Option<ErrorKind>, latency_ms: f64) {
        self.record_traced(outcome, error_kind, latency_ms, None)
    }

    /// Count one attempt from its audit record (its HTTP status tells a refusal from an
    /// outage; its trace id becomes the latency bucket's exemplar).
    pub fn record_attempt(&self, a: &crate::audit::AuditRecord<'_>) {
        if let Some(k) = a.error_kind {
            if let Ok(mut c) = self.classes.lock() {
                *c.entry(crate::delivery::FailureClass::of(k, a.http_status).as_str())
                    .or_default() += 1;
            }
        }
        self.record_traced(a.outcome, a.error_kind, a.latency_ms, a.trace_id.as_deref());
    }

    /// Failed attempts by failure class (counted by [`FlowCounters::record_attempt`]).
    pub fn failures_by_class(&self) -> Vec<(&'static str, u64)> {
        self.classes
            .lock()
            .map(|e| e.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }

    /// [`FlowCounters::record`], keeping `trace_id` as the latency bucket's exemplar.
    pub fn record_traced(
        &self,
        outcome: Outcome,
        error_kind: Option<ErrorKind>,
        latency_ms: f64,
        trace_id: Option<&str>,
    ) {
        match outcome {
            Outcome::Delivered | Outcome::ReplayDelivered | Outcome::Proxied => &self.delivered,
            Outcome::Retry => &self.retried,
            Outcome::DeadLetter | Outcome::ReplayFailed | Outcome::Failed => &self.dead,
        }
        .fetch_add(1, Ordering::Relaxed);
        if let Some(k) = error_kind {
            if let Ok(mut e) = self.errors.lock() {
                *e.entry(k.as_str()).or_default() += 1;
            }
        }
        let secs = latency_ms / 1000.0;
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.latency
            .observe(secs, trace_id.map(|t| vec![("trace_id", t.to_owned())]), None);
    }

    /// Attempts so far and how many of them failed.
    pub fn attempts_and_failures(&self) -> (u64, u64) {
        let failed = self.retried.load(Ordering::Relaxed) + self.dead.load(Ordering::Relaxed);
        (self.delivered.load(Ordering::Relaxed) + failed, failed)
    }

    /// Failed attempts by error kind.
    pub fn errors_by_kind(&self) -> Vec<(&'static str, u64)> {
        self.errors
            .lock()
            .map(|e| e.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }

    /// The attempt latency (seconds) below which a fraction `q` of attempts fell, read from
    /// the histogram's buckets (so it is a bucket's upper bound); `None` before any attempt,
    /// infinite when the quantile is past the last bound.
    pub fn attempt_quantile(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }
}

/// A copy of one dataflow's counters, for the status page.
#[derive(Debug, Clone, Default)]
pub struct CountersSnapshot {
    pub delivered: u64,
    pub retried: u64,
    pub dead: u64,
    pub errors_by_kind: Vec<(&'static str, u64)>,
    pub failures_by_class: Vec<(&'static str, u64)>,
    /// Attempt latency quantiles, seconds (see [`FlowCounters::attempt_quantile`]).
    pub attempt_p50_s: Option<f64>,
    pub attempt_p99_s: Option<f64>,
}

impl FlowCounters {
    /// Copy the counters now.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            delivered: self.delivered.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead: self.dead.load(Ordering::Relaxed),
            errors_by_kind: self.errors_by_kind(),
            failures_by_class: self.failures_by_class(),
            attempt_p50_s: self.attempt_quantile(0.5),
            attempt_p99_s: self.attempt_quantile(0.99),
        }
    }
}

/// What one dataflow contributes to `/metrics`.
pub struct FlowSnapshot<'a> {
    pub name: &'a str,
    pub counters: &'a FlowCounters,
    pub pending: u64,
    pub token_requests: Option<u64>,
    /// `running`, `held` or `paused`, when known.
    pub state: Option<&'static str>,
}

/// Which text the scraper gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (exemplars included, `# EOF` at the end).
    OpenMetrics,
    /// The Prometheus text format 0.0.4.
    Prometheus,
}

impl Format {
    /// OpenMetrics when the `Accept` header names it, else the Prometheus text format.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::Prometheus => PROMETHEUS_CONTENT_TYPE,
        }
    }
}

/// One dataflow's numbers, copied at scrape time.
#[derive(Debug)]
struct FlowValues {
    name: String,
    delivered: u64,
    retried: u64,
    dead: u64,
    errors: Vec<(&'static str, u64)>,
    latency: HistogramWithExemplars<TraceExemplar>,
    pending: u64,
    token_requests: Option<u64>,
    state: Option<&'static str>,
}

/// Everything one scrape encodes.
#[derive(Debug)]
struct Scrape {
    flows: Vec<FlowValues>,
    cert_expiry_seconds: Vec<(String, i64)>,
    p50_s: f64,
    p99_s: f64,
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn df(f: &FlowValues) -> Labels<'_> {
    vec![("dataflow", f.name.as_str())]
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Counters: the library adds `_total` to the family name.
        {
            let mut m = enc.encode_descriptor(
                "sallyport_deliveries",
                "Delivery attempts by dataflow and outcome.",
                None,
                MetricType::Counter,
            )?;
            for f in &self.flows {
                for (outcome, v) in [
                    ("delivered", f.delivered),
                    ("retry", f.retried),
                    ("dead_letter", f.dead),
                ] {
                    let labels: Labels<'_> = vec![("dataflow", f.name.as_str()), ("outcome", outcome)];
                    m.encode_family(&labels)?
                        .encode_counter::<TraceExemplar, _, u64>(&v, None)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "sallyport_delivery_errors",
                "Failed attempts by error kind.",
                None,
                MetricType::Counter,
            )?;
            for f in &self.flows {
                for (kind, n) in &f.errors {
                    let labels: Labels<'_> = vec![("dataflow", f.name.as_str()), ("kind", kind)];
                    m.encode_family(&labels)?
                        .encode_counter::<TraceExemplar, _, u64>(n, None)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "sallyport_dead_letters",
                "Deliveries parked as dead letters.",
                None,
                MetricType::Counter,
            )?;
            for f in &self.flows {
                m.encode_family(&df(f))?
                    .encode_counter::<TraceExemplar, _, u64>(&f.dead, None)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "sallyport_outbox_pending",
                "Deliveries waiting in the outbox.",
                None,
                MetricType::Gauge,
            )?;
            for f in &self.flows {
                m.encode_family(&df(f))?.encode_gauge(&(f.pending as i64))?;
            }
        }
        if self.flows.iter().any(|f| f.state.is_some()) {
            for (name, help, state) in [
                (
                    "sallyport_dataflow_paused",
                    "1 while a dataflow is paused (by its breaker or an operator), else 0.",
                    "paused",
                ),
                (
                    "sallyport_dataflow_held",
                    "1 while a receiver's Retry-After holds a dataflow, else 0.",
                    "held",
                ),
            ] {
                let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
                for f in &self.flows {
                    if let Some(s) = f.state {
                        m.encode_family(&df(f))?.encode_gauge(&i64::from(s == state))?;
                    }
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "sallyport_delivery_attempt_seconds",
                "Latency of each delivery attempt.",
                None,
                MetricType::Histogram,
            )?;
            for f in &self.flows {
                f.latency.encode(m.encode_family(&df(f))?)?;
            }
        }
        if self.flows.iter().any(|f| f.token_requests.is_some()) {
            let mut m = enc.encode_descriptor(
                "sallyport_token_requests",
                "OAuth2 token requests (grants and refreshes).",
                None,
                MetricType::Counter,
            )?;
            for f in &self.flows {
                if let Some(n) = f.token_requests {
                    m.encode_family(&df(f))?
                        .encode_counter::<TraceExemplar, _, u64>(&n, None)?;
                }
            }
        }
        {
            // prometheus-client has no summary type: the two quantiles are a gauge family
            // with a `quantile` label, so the series names are the ones a summary has.
            let mut m = enc.encode_descriptor(
                "sallyport_ingest_to_delivered_seconds",
                "Ingest-to-delivered latency quantiles.",
                None,
                MetricType::Gauge,
            )?;
            for (q, v) in [("0.5", self.p50_s), ("0.99", self.p99_s)] {
                let labels: Labels<'_> = vec![("quantile", q)];
                m.encode_family(&labels)?.encode_gauge(&v)?;
            }
        }
        if !self.cert_expiry_seconds.is_empty() {
            let mut m = enc.encode_descriptor(
                "sallyport_client_cert_expiry_seconds",
                "Seconds until a client certificate expires, by identity.",
                None,
                MetricType::Gauge,
            )?;
            for (identity, s) in &self.cert_expiry_seconds {
                let labels: Labels<'_> = vec![("identity", identity.as_str())];
                m.encode_family(&labels)?.encode_gauge(s)?;
            }
        }
        Ok(())
    }
}

/// Render the exposition text (the Prometheus text format).
pub fn render(
    flows: &[FlowSnapshot<'_>],
    cert_expiry_seconds: &[(String, i64)],
    p50_s: f64,
    p99_s: f64,
) -> String {
    render_as(Format::Prometheus, flows, cert_expiry_seconds, p50_s, p99_s)
}

/// Render the exposition text in `format`.
pub fn render_as(
    format: Format,
    flows: &[FlowSnapshot<'_>],
    cert_expiry_seconds: &[(String, i64)],
    p50_s: f64,
    p99_s: f64,
) -> String {
    let scrape = Scrape {
        flows: flows
            .iter()
            .map(|f| FlowValues {
                name: f.name.to_owned(),
                delivered: f.counters.delivered.load(Ordering::Relaxed),
                retried: f.counters.retried.load(Ordering::Relaxed),
                dead: f.counters.dead.load(Ordering::Relaxed),
                errors: f.counters.errors_by_kind(),
                latency: f.counters.latency.clone(),
                pending: f.pending,
                token_requests: f.token_requests,
                state: f.state,
            })
            .collect(),
        cert_expiry_seconds: cert_expiry_seconds.to_vec(),
        p50_s,
        p99_s,
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::new();
    let done = match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
        Format::Prometheus => prometheus_client::encoding::prometheus_text::encode(&mut out, &registry),
    };
    if done.is_err() {
        // Writing to a String fails only on an encoder bug: say so rather than serve half.
        tracing::error!("encoding /metrics failed");
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_buckets() {
        let c = FlowCounters::default();
        assert_eq!(c.attempt_quantile(0.5), None);
        for _ in 0..98 {
            c.record(Outcome::Delivered, None, 3.0);
        }
        c.record(Outcome::Retry, Some(ErrorKind::Timeout), 2500.0);
        c.record(Outcome::Retry, Some(ErrorKind::Timeout), 9000.0);
        assert_eq!(c.attempt_quantile(0.5), Some(0.005));
        assert_eq!(c.attempt_quantile(0.99), Some(5.0));
        assert_eq!(c.attempt_quantile(1.0), Some(f64::INFINITY));
        assert_eq!(c.errors_by_kind(), vec![("timeout", 2)]);
    }

    #[test]
    fn both_formats_keep_the_series_names() {
        let c = FlowCounters::default();
        c.record_traced(
            Outcome::Delivered,
            None,
            12.0,
            Some("0af7651916cd43dd8448eb211c80319c"),
        );
        let flows = [FlowSnapshot {
            name: "crm",
            counters: &c,
            pending: 3,
            token_requests: None,
            state: Some("paused"),
        }];
        let p = render_as(Format::Prometheus, &flows, &[("default".into(), 99)], 0.1, 0.2);
        assert!(
            p.contains("sallyport_deliveries_total{dataflow=\"crm\",outcome=\"delivered\"} 1"),
            "{p}"
        );
        assert!(p.contains("sallyport_dataflow_paused{dataflow=\"crm\"} 1"), "{p}");
        assert!(
            p.contains("sallyport_ingest_to_delivered_seconds{quantile=\"0.99\"} 0.2"),
            "{p}"
        );
        let o = render_as(Format::OpenMetrics, &flows, &[], 0.1, 0.2);
        assert!(o.ends_with("# EOF\n"), "{o}");
        assert!(o.contains("trace_id=\"0af7651916cd43dd8448eb211c80319c\""), "{o}");
    }
}
