//! Prometheus text for `/metrics` (admin listener): per-dataflow delivery outcomes, error
//! kinds, attempt latency histograms, retries, dead letters, queue depth, token requests, and
//! the client certificate's remaining lifetime. Rendered by hand: a few families do not need
//! a metrics framework (and metrics-exporter-prometheus' defaults would pull aws-lc-rs).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::audit::Outcome;
use crate::delivery::ErrorKind;

/// Upper bounds (seconds) of the attempt-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0];

/// Counters of one dataflow, updated as outcomes are recorded.
#[derive(Debug, Default)]
pub struct FlowCounters {
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

impl FlowCounters {
    /// Count one export attempt: its outcome (delivered, retry, dead letter), error kind and
    /// latency.
    pub fn record(&self, outcome: Outcome, error_kind: Option<ErrorKind>, latency_ms: f64) {
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
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add((latency_ms * 1000.0) as u64, Ordering::Relaxed);
    }

    /// Attempts so far and how many of them failed.
    pub fn attempts_and_failures(&self) -> (u64, u64) {
        let failed = self.retried.load(Ordering::Relaxed) + self.dead.load(Ordering::Relaxed);
        (self.delivered.load(Ordering::Relaxed) + failed, failed)
    }
}

/// What one dataflow contributes to `/metrics`.
pub struct FlowSnapshot<'a> {
    pub name: &'a str,
    pub counters: &'a FlowCounters,
    pub pending: u64,
    pub token_requests: Option<u64>,
}

/// Render the exposition text.
pub fn render(
    flows: &[FlowSnapshot<'_>],
    cert_expiry_seconds: &[(String, i64)],
    p50_s: f64,
    p99_s: f64,
) -> String {
    let mut out = String::new();
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut out,
        "sallyport_deliveries_total",
        "counter",
        "Delivery attempts by dataflow and outcome.",
    );
    for f in flows {
        for (outcome, v) in [
            ("delivered", &f.counters.delivered),
            ("retry", &f.counters.retried),
            ("dead_letter", &f.counters.dead),
        ] {
            let _ = writeln!(
                out,
                "sallyport_deliveries_total{{dataflow=\"{}\",outcome=\"{outcome}\"}} {}",
                f.name,
                v.load(Ordering::Relaxed)
            );
        }
    }
    family(
        &mut out,
        "sallyport_delivery_errors_total",
        "counter",
        "Failed attempts by error kind.",
    );
    for f in flows {
        if let Ok(e) = f.counters.errors.lock() {
            for (kind, n) in e.iter() {
                let _ = writeln!(
                    out,
                    "sallyport_delivery_errors_total{{dataflow=\"{}\",kind=\"{kind}\"}} {n}",
                    f.name
                );
            }
        }
    }
    family(
        &mut out,
        "sallyport_dead_letters_total",
        "counter",
        "Deliveries parked as dead letters.",
    );
    for f in flows {
        let _ = writeln!(
            out,
            "sallyport_dead_letters_total{{dataflow=\"{}\"}} {}",
            f.name,
            f.counters.dead.load(Ordering::Relaxed)
        );
    }
    family(
        &mut out,
        "sallyport_outbox_pending",
        "gauge",
        "Deliveries waiting in the outbox.",
    );
    for f in flows {
        let _ = writeln!(
            out,
            "sallyport_outbox_pending{{dataflow=\"{}\"}} {}",
            f.name, f.pending
        );
    }
    family(
        &mut out,
        "sallyport_delivery_attempt_seconds",
        "histogram",
        "Latency of each delivery attempt.",
    );
    for f in flows {
        let mut cumulative = 0;
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += f.counters.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "sallyport_delivery_attempt_seconds_bucket{{dataflow=\"{}\",le=\"{le}\"}} {cumulative}",
                f.name
            );
        }
        let count = f.counters.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "sallyport_delivery_attempt_seconds_bucket{{dataflow=\"{}\",le=\"+Inf\"}} {count}",
            f.name
        );
        let sum = f.counters.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "sallyport_delivery_attempt_seconds_sum{{dataflow=\"{}\"}} {sum}",
            f.name
        );
        let _ = writeln!(
            out,
            "sallyport_delivery_attempt_seconds_count{{dataflow=\"{}\"}} {count}",
            f.name
        );
    }
    family(
        &mut out,
        "sallyport_token_requests_total",
        "counter",
        "OAuth2 token requests (grants and refreshes).",
    );
    for f in flows {
        if let Some(n) = f.token_requests {
            let _ = writeln!(
                out,
                "sallyport_token_requests_total{{dataflow=\"{}\"}} {n}",
                f.name
            );
        }
    }
    family(
        &mut out,
        "sallyport_ingest_to_delivered_seconds",
        "summary",
        "Ingest-to-delivered latency quantiles.",
    );
    let _ = writeln!(
        out,
        "sallyport_ingest_to_delivered_seconds{{quantile=\"0.5\"}} {p50_s}"
    );
    let _ = writeln!(
        out,
        "sallyport_ingest_to_delivered_seconds{{quantile=\"0.99\"}} {p99_s}"
    );
    if !cert_expiry_seconds.is_empty() {
        family(
            &mut out,
            "sallyport_client_cert_expiry_seconds",
            "gauge",
            "Seconds until a client certificate expires, by identity.",
        );
        for (identity, s) in cert_expiry_seconds {
            let _ = writeln!(
                out,
                "sallyport_client_cert_expiry_seconds{{identity=\"{identity}\"}} {s}"
            );
        }
    }
    out
}
