//! One dataflow's endpoint health: pacing (a rate limit, the in-flight cap, and the receiver's
//! `Retry-After` holding the whole dataflow), the circuit breaker, and pauses — tripped by the
//! breaker and ended by a probe, or set and ended by an operator. A pause is stored, so it
//! survives a restart and every instance on a shared store sees it; while paused, ingest keeps
//! queueing and nothing becomes a dead letter (docs/design-notes.md, "Endpoint health").

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Notify;

use super::{blocking, EngineError};
use crate::config::{BreakerSettings, HealthSettings};
use crate::delivery::{DeliveryError, FailureClass};
use crate::store::{now_ms, Pause, PauseReason};

/// What the claimer may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gate {
    /// Deliver.
    Go,
    /// Held by the receiver's `Retry-After` until this UNIX ms.
    Hold(i64),
    /// Paused; the next probe is due at this UNIX ms (`None`: paused by an operator).
    Paused(Option<i64>),
    /// Paused by the breaker, and a probe is due: deliver one item.
    Probe,
}

/// A change of pause state this instance made, to store and announce.
#[derive(Debug, Clone)]
pub(super) enum Transition {
    /// The breaker tripped.
    Paused(Pause),
    /// A probe failed: the same pause, with its next probe later.
    Probed(Pause),
    /// A probe succeeded.
    Resumed,
}

/// The data of a `dataflow.paused` or `dataflow.resumed` event: names, class and times only.
pub(super) fn event_data(dataflow: &str, t: &Transition) -> serde_json::Value {
    match t {
        Transition::Paused(p) | Transition::Probed(p) => pause_data(p),
        Transition::Resumed => resumed_data(dataflow, "probe"),
    }
}

/// The data of a `dataflow.resumed` event: who resumed it (`probe` or `operator`).
pub fn resumed_data(dataflow: &str, by: &str) -> serde_json::Value {
    serde_json::json!({ "dataflow": dataflow, "by": by })
}

/// The data of a `dataflow.paused` event.
pub fn pause_data(p: &Pause) -> serde_json::Value {
    serde_json::json!({
        "dataflow": p.dataflow,
        "reason": p.reason,
        "class": p.class,
        "message": p.message,
        "since": p.since,
        "nextProbeAt": (p.reason == PauseReason::Breaker).then_some(p.probe_at),
    })
}

pub(super) struct Health {
    name: String,
    breaker: Option<BreakerSettings>,
    limiter: Option<DefaultDirectRateLimiter>,
    pub(super) max_in_flight: usize,
    /// The receiver asked us (429/503 with `Retry-After`) to wait until this UNIX ms.
    hold_until: AtomicI64,
    state: Mutex<State>,
    /// The pause ended, or changed: the claimer waits on this while paused.
    pub(super) changed: Notify,
}

#[derive(Default)]
struct State {
    pause: Option<Pause>,
    /// Receiver-unavailable failures in a row.
    consecutive: u32,
    /// Recent attempts that count for the breaker: (UNIX ms, failed).
    window: VecDeque<(i64, bool)>,
    /// When this instance last changed the pause (UNIX ms): a stored state read before that
    /// is older than ours and is not applied.
    local_change_at: i64,
    /// Changes made here and not yet written to the store: until they are, what the store
    /// says is older than ours.
    unwritten: u32,
}

impl Health {
    pub(super) fn new(name: &str, settings: &HealthSettings, stored: Option<Pause>) -> Health {
        let limiter = settings.rate_limit.and_then(|(per_second, burst)| {
            let quota = Quota::per_second(std::num::NonZeroU32::new(per_second)?)
                .allow_burst(std::num::NonZeroU32::new(burst)?);
            Some(RateLimiter::direct(quota))
        });
        Health {
            name: name.to_owned(),
            breaker: settings.breaker,
            limiter,
            max_in_flight: settings.max_in_flight,
            hold_until: AtomicI64::new(0),
            state: Mutex::new(State {
                pause: stored,
                ..State::default()
            }),
            changed: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn gate(&self, now: i64) -> Gate {
        if let Some(p) = &self.state().pause {
            return match p.reason {
                PauseReason::Breaker if now >= p.probe_at => Gate::Probe,
                PauseReason::Breaker => Gate::Paused(Some(p.probe_at)),
                PauseReason::Manual => Gate::Paused(None),
            };
        }
        let hold = self.hold_until.load(Ordering::Relaxed);
        if hold > now {
            return Gate::Hold(hold);
        }
        Gate::Go
    }

    pub(super) fn paused(&self) -> Option<Pause> {
        self.state().pause.clone()
    }

    /// Wait for the rate limit's next slot.
    pub(super) async fn pace(&self) {
        if let Some(l) = &self.limiter {
            l.until_ready().await;
        }
    }

    /// A delivery succeeded: the run of failures ends.
    pub(super) fn succeeded(&self, now: i64) {
        let mut s = self.state();
        s.consecutive = 0;
        if let Some(b) = &self.breaker {
            push_window(&mut s.window, b, now, false);
        }
    }

    /// A delivery failed with `err`. Holds the dataflow when the receiver asked for a pause
    /// with `Retry-After`; returns the pause when this failure trips the breaker.
    pub(super) fn failed(&self, err: &DeliveryError, now: i64) -> Option<Pause> {
        if let (Some(after), Some(429 | 503)) = (err.retry_after(), err.status()) {
            let until = now.saturating_add(i64::try_from(after.as_millis()).unwrap_or(i64::MAX));
            self.hold_until.fetch_max(until, Ordering::Relaxed);
        }
        let b = self.breaker.as_ref()?;
        let class = err.class();
        let mut s = self.state();
        let trip = match class {
            // Not fixable by waiting for the next item: every delivery would fail the same way.
            FailureClass::Certificate | FailureClass::Policy => true,
            FailureClass::Unavailable => {
                s.consecutive += 1;
                push_window(&mut s.window, b, now, true);
                let failures = s.window.iter().filter(|(_, f)| *f).count();
                s.consecutive >= b.consecutive_failures
                    || (s.window.len() >= b.min_attempts as usize
                        && failures as f64 >= b.failure_ratio * s.window.len() as f64)
            }
            // A refusal is the receiver's verdict on one item, and an internal failure ours:
            // neither says the receiver is down.
            FailureClass::Refused | FailureClass::Internal => false,
        };
        if !trip || s.pause.is_some() {
            return None;
        }
        let pause = Pause {
            dataflow: self.name.clone(),
            reason: PauseReason::Breaker,
            class: Some(class.as_str().to_owned()),
            message: err.to_string(),
            since: now,
            probe_at: now + millis(b.probe_interval),
            probe_interval_ms: millis(b.probe_interval),
        };
        s.pause = Some(pause.clone());
        s.local_change_at = now;
        s.unwritten += 1;
        s.consecutive = 0;
        s.window.clear();
        Some(pause)
    }

    /// A probe failed: the next one waits twice as long, up to the cap. Returns the pause to
    /// store, unless an operator's pause replaced the breaker's meanwhile.
    pub(super) fn probe_failed(&self, err: &DeliveryError, now: i64) -> Option<Pause> {
        let cap = self.breaker.map_or(10_000, |b| millis(b.max_probe_interval));
        let mut s = self.state();
        let p = s.pause.as_mut()?;
        if p.reason != PauseReason::Breaker {
            return None;
        }
        let wait = p.probe_interval_ms.clamp(1, cap);
        p.probe_at = now + wait;
        p.probe_interval_ms = wait.saturating_mul(2).min(cap);
        p.class = Some(err.class().as_str().to_owned());
        p.message = err.to_string();
        let out = p.clone();
        s.local_change_at = now;
        s.unwritten += 1;
        Some(out)
    }

    /// What one attempt's result does to the dataflow (`probe`: it was the breaker's probe):
    /// the pause state it changed, if any, and whether the dataflow is paused now (a failed
    /// attempt then goes back in line uncounted).
    pub(super) fn observe(
        &self,
        result: Result<(), &DeliveryError>,
        probe: bool,
        now: i64,
    ) -> (Option<Transition>, bool) {
        let transition = match (result, probe) {
            (Ok(()), false) => {
                self.succeeded(now);
                None
            }
            (Ok(()), true) => {
                self.succeeded(now);
                self.probe_succeeded(now);
                Some(Transition::Resumed)
            }
            (Err(e), true) => self.probe_failed(e, now).map(Transition::Probed),
            (Err(e), false) => self.failed(e, now).map(Transition::Paused),
        };
        (transition, self.paused().is_some())
    }

    /// A probe succeeded: the pause ends here now, and in the store once written.
    pub(super) fn probe_succeeded(&self, now: i64) {
        self.set(None, now);
        self.state().unwritten += 1;
    }

    /// A change made here reached the store (or failed to): from now on, what the store says
    /// is news again.
    pub(super) fn written(&self, now: i64) {
        let mut s = self.state();
        s.unwritten = s.unwritten.saturating_sub(1);
        s.local_change_at = now;
    }

    /// Set or end the pause here (this instance made the change, and has stored it).
    pub(super) fn set(&self, pause: Option<Pause>, now: i64) {
        let mut s = self.state();
        s.pause = pause;
        s.local_change_at = now;
        s.consecutive = 0;
        s.window.clear();
        drop(s);
        self.changed.notify_one();
    }

    /// Take the stored state, read at `read_at`, unless this instance changed it since. Returns
    /// whether it changed.
    pub(super) fn sync(&self, stored: Option<&Pause>, read_at: i64) -> bool {
        let mut s = self.state();
        if s.unwritten > 0 || s.local_change_at >= read_at || s.pause.as_ref() == stored {
            return false;
        }
        // A stored breaker pause keeps our probe schedule when only that differs.
        if let (Some(ours), Some(theirs)) = (&s.pause, stored) {
            if ours.reason == theirs.reason && ours.reason == PauseReason::Breaker {
                return false;
            }
        }
        s.pause = stored.cloned();
        drop(s);
        self.changed.notify_one();
        true
    }
}

fn push_window(window: &mut VecDeque<(i64, bool)>, b: &BreakerSettings, now: i64, failed: bool) {
    let since = now - millis(b.window);
    while window.front().is_some_and(|(t, _)| *t < since) {
        window.pop_front();
    }
    // Enough to judge the ratio; older samples fall out as new ones come.
    if window.len() >= 10_000 {
        window.pop_front();
    }
    window.push_back((now, failed));
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::delivery::ErrorKind;

    fn health(consecutive: u32) -> Health {
        let settings = HealthSettings {
            rate_limit: None,
            max_in_flight: 4,
            breaker: Some(BreakerSettings {
                consecutive_failures: consecutive,
                failure_ratio: 0.5,
                min_attempts: 20,
                window: Duration::from_secs(30),
                probe_interval: Duration::from_secs(1),
                max_probe_interval: Duration::from_secs(4),
            }),
        };
        Health::new("df", &settings, None)
    }

    fn unavailable() -> DeliveryError {
        DeliveryError::new(ErrorKind::Timeout, "slow")
    }

    #[test]
    fn a_run_of_unavailable_failures_trips_and_a_success_breaks_the_run() {
        let h = health(3);
        assert!(h.failed(&unavailable(), 0).is_none());
        assert!(h.failed(&unavailable(), 1).is_none());
        h.succeeded(2);
        assert!(h.failed(&unavailable(), 3).is_none());
        assert!(h.failed(&unavailable(), 4).is_none());
        let p = h.failed(&unavailable(), 5).unwrap();
        assert_eq!(p.class.as_deref(), Some("unavailable"));
        assert_eq!(h.gate(5), Gate::Paused(Some(1005)));
        assert_eq!(h.gate(1005), Gate::Probe);
    }

    #[test]
    fn refusals_do_not_trip_and_a_rejected_client_certificate_trips_at_once() {
        let h = health(3);
        let refused = DeliveryError::new(ErrorKind::HttpStatus, "bad").with_status(400);
        for t in 0..10 {
            assert!(h.failed(&refused, t).is_none());
        }
        let rejected = DeliveryError::new(ErrorKind::ClientCertRejected, "unknown ca");
        assert_eq!(
            h.failed(&rejected, 11).unwrap().class.as_deref(),
            Some("certificate")
        );
    }

    #[test]
    fn probes_back_off_to_the_cap_and_an_operator_pause_stands() {
        let h = health(1);
        h.failed(&unavailable(), 0).unwrap();
        let waits: Vec<i64> = (0..4)
            .map(|i| {
                let now = 10_000 * (i + 1);
                h.probe_failed(&unavailable(), now).unwrap().probe_at - now
            })
            .collect();
        assert_eq!(waits, [1000, 2000, 4000, 4000]);
        let manual = Pause {
            dataflow: "df".into(),
            reason: PauseReason::Manual,
            class: None,
            message: "deploy".into(),
            since: 1,
            probe_at: 0,
            probe_interval_ms: 0,
        };
        h.set(Some(manual), 50_000);
        assert!(h.probe_failed(&unavailable(), 60_000).is_none());
        assert_eq!(h.gate(1 << 40), Gate::Paused(None));
    }

    #[test]
    fn a_stored_state_read_before_our_own_change_was_written_is_not_applied() {
        let h = health(1);
        h.failed(&unavailable(), 100).unwrap();
        assert!(!h.sync(None, 200), "not yet written: the store's answer is older");
        h.written(300);
        assert!(!h.sync(None, 250), "read before the write");
        assert!(h.sync(None, 400), "resumed elsewhere after our write");
        assert_eq!(h.gate(500), Gate::Go);
    }

    #[test]
    fn retry_after_holds_the_dataflow() {
        let h = health(100);
        let e = DeliveryError::new(ErrorKind::HttpStatus, "slow down")
            .with_status(429)
            .with_retry_after(Some(Duration::from_secs(2)));
        h.failed(&e, 1000);
        assert_eq!(h.gate(1500), Gate::Hold(3000));
        assert_eq!(h.gate(3000), Gate::Go);
    }
}

/// A dataflow's delivery state, as `dataflow status` and the admin API show it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DataflowStatus {
    pub dataflow: String,
    /// `running`, `held` (the receiver asked for a wait with `Retry-After`) or `paused`.
    pub state: &'static str,
    pub pause: Option<Pause>,
    /// UNIX ms until which the receiver asked us to wait.
    pub held_until: Option<i64>,
    /// Deliveries queued.
    pub pending: u64,
}

impl Health {
    fn status(&self, pending: u64, now: i64) -> DataflowStatus {
        let pause = self.paused();
        let hold = self.hold_until.load(Ordering::Relaxed);
        let held_until = (hold > now).then_some(hold);
        DataflowStatus {
            dataflow: self.name.clone(),
            state: match (&pause, held_until) {
                (Some(_), _) => "paused",
                (None, Some(_)) => "held",
                (None, None) => "running",
            },
            pause,
            held_until,
            pending,
        }
    }
}

impl super::Engine {
    /// Pause a dataflow by an operator's word: deliveries stop (in-flight ones finish), ingest
    /// keeps queueing, and only [`Engine::resume_dataflow`] resumes it — on every instance
    /// sharing the store.
    ///
    /// [`Engine::resume_dataflow`]: super::Engine::resume_dataflow
    pub async fn pause_dataflow(&self, name: &str, message: Option<String>) -> Result<Pause, EngineError> {
        let flow = self.flow(name)?;
        let now = now_ms();
        let pause = Pause::manual(name, message, now);
        let (s, p) = (self.inner.store.clone(), pause.clone());
        blocking(move || s.pause(&p)).await?;
        flow.health.set(Some(pause.clone()), now);
        self.inner
            .events()
            .emit(crate::events::EventType::DataflowPaused, pause_data(&pause));
        Ok(pause)
    }

    /// Resume a paused dataflow (an operator's pause or the breaker's). Returns whether it
    /// was paused.
    pub async fn resume_dataflow(&self, name: &str) -> Result<bool, EngineError> {
        let flow = self.flow(name)?;
        let (s, n) = (self.inner.store.clone(), name.to_owned());
        let was = blocking(move || s.resume(&n, false)).await? || flow.health.paused().is_some();
        flow.health.set(None, now_ms());
        flow.wake.notify_one();
        if was {
            self.inner.events().emit(
                crate::events::EventType::DataflowResumed,
                resumed_data(name, "operator"),
            );
        }
        Ok(was)
    }

    /// Every dataflow's delivery state.
    pub async fn dataflow_statuses(&self) -> Result<Vec<DataflowStatus>, EngineError> {
        let mut out = Vec::new();
        for f in self.inner.flows() {
            let (s, name) = (self.inner.store.clone(), f.spec.name.clone());
            let pending = blocking(move || s.pending(Some(&name))).await?;
            out.push(f.health.status(pending, now_ms()));
        }
        Ok(out)
    }

    /// Take pauses set or ended elsewhere (another instance, the CLI) into the running
    /// dataflows. Returns how many changed.
    pub async fn sync_pauses(&self) -> Result<usize, EngineError> {
        let read_at = now_ms();
        let s = self.inner.store.clone();
        let stored = blocking(move || s.pauses()).await?;
        let mut changed = 0;
        for f in self.inner.flows() {
            let mine = stored.iter().find(|p| p.dataflow == f.spec.name);
            if f.health.sync(mine, read_at) {
                tracing::info!(dataflow = %f.spec.name, paused = mine.is_some(), "dataflow pause changed elsewhere");
                f.wake.notify_one();
                changed += 1;
            }
        }
        Ok(changed)
    }

    fn flow(&self, name: &str) -> Result<std::sync::Arc<super::attempt::Flow>, EngineError> {
        self.inner
            .flows()
            .into_iter()
            .find(|f| f.spec.name == name)
            .ok_or_else(|| EngineError::UnknownDataflow(name.to_owned()))
    }
}
