//! Alert rules over what the engine observes: a dataflow's failure ratio over a sliding window,
//! dead letters appearing, and the client certificate nearing expiry (30 and 7 days by
//! default). A rule fires when it becomes true and re-arms when it clears; a firing alert is
//! logged and, when configured, POSTed as JSON through the delivery core.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method};
use serde::Serialize;

use crate::config::{parse_duration, AlertsConfig, Config};
use crate::delivery::{Core, DeliveryClient, OutboundRequest};
use crate::export::engine::OutcomeTotals;
use crate::export::Engine;

/// Outcome totals at one moment.
type Sample = (Instant, Vec<OutcomeTotals>);

/// One alert as sent to the webhook.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// `failure_ratio`, `dead_letters` or `cert_expiry`.
    pub rule: String,
    pub dataflow: Option<String>,
    /// The client identity concerned (`cert_expiry`).
    pub identity: Option<String>,
    pub value: f64,
    pub threshold: f64,
    pub message: String,
    /// UNIX ms.
    pub at: i64,
}

/// The evaluator's settings and the webhook client.
pub struct Alerts {
    rules: AlertsConfig,
    window: Duration,
    interval: Duration,
    webhook: Option<(DeliveryClient, url::Url)>,
}

impl Alerts {
    /// From a validated config; the webhook is a destination of `core`, so it presents the
    /// identity in force (rotation, renewal) like every other.
    pub fn from_config(cfg: &Config, core: &Core) -> Result<Self, String> {
        let rules = cfg.alerts.clone();
        let window = parse_duration(&rules.window)?;
        let interval = parse_duration(&rules.interval)?;
        let webhook = match cfg.alerts_destination() {
            None => None,
            Some(d) => {
                let d = d?;
                let url = d.endpoint.clone().ok_or("alerts: no webhook URL")?;
                Some((core.destination(&d)?, url))
            }
        };
        Ok(Alerts {
            rules,
            window,
            interval,
            webhook,
        })
    }

    /// Evaluate every `interval` until the task is aborted.
    pub async fn run(self, engine: Engine) {
        let mut samples: VecDeque<Sample> = VecDeque::new();
        let mut firing: HashSet<(String, String)> = HashSet::new();
        let mut tick = tokio::time::interval(self.interval);
        loop {
            tick.tick().await;
            let now = Instant::now();
            samples.push_back((now, engine.outcome_totals()));
            while samples.len() > 2
                && samples
                    .get(1)
                    .is_some_and(|(t, _)| now.duration_since(*t) >= self.window)
            {
                samples.pop_front();
            }
            for alert in self.evaluate(&samples, engine.cert_expiry_seconds(), &mut firing) {
                self.fire(alert).await;
            }
        }
    }

    /// The alerts that start firing now. `samples` are oldest first.
    fn evaluate(
        &self,
        samples: &VecDeque<Sample>,
        cert_expiry_seconds: Vec<(String, i64)>,
        firing: &mut HashSet<(String, String)>,
    ) -> Vec<Alert> {
        let mut out = Vec::new();
        let mut check = |rule: &str, scope: &str, active: bool, alert: Alert| {
            let key = (rule.to_owned(), scope.to_owned());
            if active {
                if firing.insert(key) {
                    out.push(alert);
                }
            } else {
                firing.remove(&key);
            }
        };
        let at = crate::store::now_ms();
        if let (Some((_, first)), Some((_, last))) = (samples.front(), samples.back()) {
            for now in last {
                let base = first
                    .iter()
                    .find(|f| f.dataflow == now.dataflow)
                    .cloned()
                    .unwrap_or_default();
                let name = &now.dataflow;
                let (da, df, dd) = (
                    now.attempts - base.attempts,
                    now.failures - base.failures,
                    now.dead - base.dead,
                );
                let ratio = if da == 0 { 0.0 } else { df as f64 / da as f64 };
                check(
                    "failure_ratio",
                    name,
                    da >= self.rules.min_attempts && ratio >= self.rules.failure_ratio,
                    Alert {
                        rule: "failure_ratio".into(),
                        dataflow: Some(name.clone()),
                        identity: None,
                        value: ratio,
                        threshold: self.rules.failure_ratio,
                        message: format!(
                            "{df} of {da} delivery attempts to '{name}' failed in the last {}",
                            self.rules.window
                        ),
                        at,
                    },
                );
                check(
                    "dead_letters",
                    name,
                    dd > self.rules.dead_letters,
                    Alert {
                        rule: "dead_letters".into(),
                        dataflow: Some(name.clone()),
                        identity: None,
                        value: dd as f64,
                        threshold: self.rules.dead_letters as f64,
                        message: format!(
                            "{dd} deliveries to '{name}' became dead letters in the last {}",
                            self.rules.window
                        ),
                        at,
                    },
                );
            }
        }
        for (identity, secs) in cert_expiry_seconds {
            let days = secs.div_euclid(86_400);
            // The tightest threshold reached is the one that matters.
            let mut thresholds = self.rules.cert_expiry_days.clone();
            thresholds.sort_unstable();
            if let Some(t) = thresholds.iter().find(|t| days < **t) {
                check(
                    "cert_expiry",
                    &format!("{identity}:{t}"),
                    true,
                    Alert {
                        rule: "cert_expiry".into(),
                        dataflow: None,
                        identity: Some(identity.clone()),
                        value: days as f64,
                        threshold: *t as f64,
                        message: format!("client certificate '{identity}' expires in {days} day(s)"),
                        at,
                    },
                );
            }
        }
        out
    }

    async fn fire(&self, alert: Alert) {
        tracing::warn!(rule = %alert.rule, dataflow = ?alert.dataflow, value = alert.value, "alert: {}", alert.message);
        let Some((client, url)) = &self.webhook else {
            return;
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let req = OutboundRequest {
            method: Method::POST,
            url: url.clone(),
            headers,
            body: serde_json::to_vec(&alert).unwrap_or_default().into(),
        };
        match client.send(req).await.map(|d| d.error()) {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => {
                tracing::warn!(kind = %e.kind(), "the alert webhook did not take the alert")
            }
        }
    }
}
