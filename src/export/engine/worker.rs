//! One dataflow's pipeline: the claimer leases due rows, couriers deliver them (each over a
//! connection of its own), and the completer records outcomes in batches.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::attempt::{deliver, Flow};
use super::health::{Gate, Transition};
use super::{blocking, EngineError, Inner, Stats};
use crate::audit::AuditRecord;
use crate::delivery::Session;
use crate::store::{now_ms, Completion, OutboxItem};

/// An outcome for the completer: what to record (a row's completion, a batch's dead letter)
/// and an attempt's audit record; either may be absent (an item handed back unsent has no
/// attempt; a request's attempt is recorded apart from its rows' completions).
pub(super) type Done = (Option<Completion>, Option<AuditRecord<'static>>);

/// What a courier delivers: one profile as its payload, or a shaped request.
enum Work {
    One(OutboxItem),
    Shaped(super::shaped::Request),
}

/// Rows claimed per round trip to the store.
const BATCH: usize = 512;

/// Outcomes recorded per store transaction, at most: outcomes get the writer only between
/// ingest batches, and smaller transactions fell behind the deliveries, leaving leased rows
/// for every claim to step over (docs/design-notes.md, "Export pipeline on the embedded store").
const OUTCOME_BATCH: usize = 8192;

/// One dataflow's pipeline: a claimer leases due rows and hands each to a courier, which
/// delivers it; a completer records outcomes in batches. A row stays leased from claim to
/// completion, so a profile never has two deliveries in flight. The couriers stop when the
/// claimer does, after the delivery each holds.
pub(super) async fn worker(inner: Arc<Inner>, flow: Arc<Flow>) {
    let (done_tx, done_rx) = tokio::sync::mpsc::channel::<Done>(OUTCOME_BATCH * 2);
    let completer = tokio::spawn(complete_loop(inner.clone(), flow.clone(), done_rx));
    let mut couriers = Couriers {
        queues: Vec::new(),
        idle: Arc::default(),
        freed: Arc::default(),
        inner: inner.clone(),
        flow: flow.clone(),
        done: done_tx.clone(),
    };
    let in_flight = flow.health.max_in_flight;
    let lease_ms = i64::try_from(inner.cfg.store.lease().as_millis()).unwrap_or(30_000);
    let limit = flow
        .shaping
        .as_ref()
        .and_then(|s| s.configurable)
        .map_or(BATCH, |(_, n)| n.max(BATCH));
    let claim = || {
        let (s, name) = (inner.store.clone(), flow.spec.name.clone());
        tokio::task::spawn_blocking(move || s.claim(&name, limit, now_ms(), lease_ms))
    };
    // The claim of the next batch, started while the current one's last deliveries go out.
    let mut next: Option<tokio::task::JoinHandle<Result<Vec<OutboxItem>, crate::store::StoreError>>> = None;
    loop {
        let gate = flow.health.gate(now_ms());
        if gate != Gate::Go {
            // The early claim of the last batch goes back in line unsent.
            if let Some(early) = next.take() {
                if let Ok(Ok(items)) = early.await {
                    release(&done_tx, items, gate).await;
                }
            }
            match gate {
                Gate::Probe => probe(&inner, &flow, &done_tx, lease_ms).await,
                _ => wait_at(&flow, gate).await,
            }
            continue;
        }
        if let Some((age, events)) = flow.shaping.as_ref().and_then(|s| s.configurable) {
            // Configurable aggregation: claim once a batch is full or its oldest has waited
            // max_batch_age (docs/design-notes.md, "Aggregation and templates").
            if let Some(wait) = batch_wait(&inner, &flow, age, events).await {
                tokio::select! {
                    _ = flow.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
        }
        let claimed = match next.take() {
            Some(handle) => handle.await,
            None => claim().await,
        };
        let items = match claimed.map_err(EngineError::from).and_then(|r| Ok(r?)) {
            Ok(items) => items,
            Err(e) => {
                tracing::error!(dataflow = %flow.spec.name, error = %e, "claiming deliveries failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if items.is_empty() {
            tokio::select! {
                _ = flow.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            continue;
        }
        // Shaped dataflows send requests planned over the whole round (no early claim: a
        // request may hold rows from anywhere in the batch).
        if let Some(shaping) = &flow.shaping {
            let requests = super::shaped::plan_round(&inner, &flow, shaping, items, &done_tx).await;
            for r in requests {
                // A pause or a hold stops the round: the rest goes back in line unsent.
                match flow.health.gate(now_ms()) {
                    Gate::Go => {}
                    Gate::Hold(until) => {
                        super::shaped::release(r, until).await;
                        continue;
                    }
                    _ => {
                        super::shaped::release(r, now_ms()).await;
                        continue;
                    }
                }
                flow.health.pace().await;
                if !couriers.dispatch(Work::Shaped(r)).await {
                    return;
                }
            }
            continue;
        }
        // A full batch means more are probably due. Claim them while the last in-flight
        // round of this one goes out, so the connections are not left idle during the claim
        // (which takes about as long as a round of deliveries). Claimed rows stay leased, so
        // the early claim never returns a row of this batch; it is at most one round of
        // deliveries ahead, far inside the lease.
        let prefetch_at = if items.len() == BATCH {
            Some(items.len().saturating_sub(in_flight))
        } else {
            None
        };
        let mut items = items.into_iter().enumerate();
        while let Some((i, item)) = items.next() {
            // A pause or a receiver's Retry-After stops the batch: the rest goes back in line
            // unsent, so no row stays leased while the dataflow waits.
            let gate = flow.health.gate(now_ms());
            if gate != Gate::Go {
                let rest = std::iter::once(item).chain(items.map(|(_, it)| it)).collect();
                release(&done_tx, rest, gate).await;
                break;
            }
            flow.health.pace().await;
            if Some(i) == prefetch_at {
                next = Some(claim());
            }
            if !couriers.dispatch(Work::One(item)).await {
                return;
            }
        }
        if completer.is_finished() {
            tracing::error!(dataflow = %flow.spec.name, "completion writer stopped");
            return;
        }
    }
}

/// Hand claimed `items` back unsent: due again when the gate opens (at once for a pause, so
/// the probe takes the head of the line).
async fn release(done: &tokio::sync::mpsc::Sender<Done>, items: Vec<OutboxItem>, gate: Gate) {
    let retry_at = match gate {
        Gate::Hold(until) => until,
        _ => now_ms(),
    };
    for item in items {
        if done
            .send((
                Some(Completion::Requeue {
                    id: item.id,
                    retry_at,
                }),
                None,
            ))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Wait while the gate is shut: until a hold or the next probe is due, or the pause changes
/// (checked at least every second, for changes made by other processes).
async fn wait_at(flow: &Flow, gate: Gate) {
    let max = Duration::from_secs(1);
    let wait = match gate {
        Gate::Hold(until) | Gate::Paused(Some(until)) => {
            Duration::from_millis(u64::try_from(until - now_ms()).unwrap_or(0)).min(max)
        }
        _ => max,
    };
    tokio::select! {
        _ = flow.health.changed.notified() => {}
        _ = tokio::time::sleep(wait) => {}
    }
}

/// While paused by the breaker: deliver the head of the line as a probe. It succeeds: the
/// dataflow resumes. It fails: it goes back in line, uncounted, and the next probe waits longer.
async fn probe(inner: &Arc<Inner>, flow: &Arc<Flow>, done: &tokio::sync::mpsc::Sender<Done>, lease_ms: i64) {
    let (s, name) = (inner.store.clone(), flow.spec.name.clone());
    let item = match blocking(move || s.claim(&name, 1, now_ms(), lease_ms)).await {
        Ok(mut items) => items.pop(),
        Err(e) => {
            tracing::error!(dataflow = %flow.spec.name, error = %e, "claiming a probe failed");
            None
        }
    };
    let Some(item) = item else {
        // Nothing queued to probe with: wait for ingest (or a resume).
        wait_at(flow, Gate::Paused(None)).await;
        return;
    };
    let session = Session::new();
    if let Some(shaping) = &flow.shaping {
        let requests = super::shaped::plan_round(inner, flow, shaping, vec![item], done).await;
        for r in requests {
            let t = session
                .run(super::shaped::deliver(flow, shaping, r, &session, true))
                .await;
            if let Some(t) = t {
                announce(inner, flow, t);
            }
        }
        return;
    }
    let (c, audit, transition) = session
        .run(deliver(flow, &inner.catalog, item, &session, true))
        .await;
    if let Some(t) = transition {
        announce(inner, flow, t);
    }
    let _ = done.send((Some(c), Some(audit))).await;
}

/// Under configurable aggregation: how long to wait before the next claim, or `None` to claim
/// now (a full batch is queued, or the oldest queued row has waited `age`).
async fn batch_wait(inner: &Arc<Inner>, flow: &Flow, age: Duration, events: usize) -> Option<Duration> {
    let (s, name) = (inner.store.clone(), flow.spec.name.clone());
    let now = now_ms();
    let head = blocking(move || s.queue_head(&name, now, events)).await;
    let (count, oldest) = match head {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(dataflow = %flow.spec.name, error = %e, "reading the queue failed");
            return Some(Duration::from_secs(1));
        }
    };
    // Nothing due: look again soon (ingest wakes the worker too).
    let Some(oldest) = oldest else {
        return Some(Duration::from_millis(250));
    };
    let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
    if count >= events || now - oldest >= age_ms {
        return None;
    }
    let until_aged = Duration::from_millis(u64::try_from(oldest + age_ms - now).unwrap_or(0));
    // Looked at again at least every 250 ms, for rows that fill the batch.
    Some(until_aged.min(Duration::from_millis(250)))
}

/// Store a pause state this instance changed, and tell the operators. The store keeps an
/// operator's pause over the breaker's: when it refuses ours, the next sync brings it back.
pub(super) fn announce(inner: &Arc<Inner>, flow: &Arc<Flow>, t: Transition) {
    let (inner, flow, name) = (inner.clone(), flow.clone(), flow.spec.name.clone());
    tokio::spawn(async move {
        let s = inner.store.clone();
        let (event, stored) = match &t {
            Transition::Paused(p) | Transition::Probed(p) => {
                let p2 = p.clone();
                let r = blocking(move || s.pause(&p2)).await;
                (
                    matches!(t, Transition::Paused(_)).then_some(crate::events::EventType::DataflowPaused),
                    r,
                )
            }
            Transition::Resumed => {
                let n = name.clone();
                let r = blocking(move || s.resume(&n, true)).await;
                (Some(crate::events::EventType::DataflowResumed), r)
            }
        };
        flow.health.written(now_ms());
        match stored {
            Ok(true) => {
                if let Some(kind) = event {
                    inner.events().emit(kind, super::health::event_data(&name, &t));
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(dataflow = %name, error = %e, "storing the dataflow's pause state failed")
            }
        }
    });
}

/// A dataflow's couriers: up to `max_in_flight` tasks, each delivering one item at a time over
/// a connection of its own (a lane, driven in the courier's task). They start as the load
/// needs them, and the one idle most recently gets the next item, so a light load keeps
/// using the same few connections.
struct Couriers {
    /// Each courier's queue (one item at most).
    queues: Vec<tokio::sync::mpsc::Sender<Work>>,
    /// Idle couriers, the most recently idle last.
    idle: Arc<Mutex<Vec<usize>>>,
    /// A courier became idle.
    freed: Arc<Notify>,
    inner: Arc<Inner>,
    flow: Arc<Flow>,
    done: tokio::sync::mpsc::Sender<Done>,
}

impl Couriers {
    /// Hand `item` to an idle courier, starting one when none is idle and fewer than
    /// `max_in_flight` run, or else waiting for one. `false` when the couriers have stopped
    /// (the completer is gone).
    async fn dispatch(&mut self, mut item: Work) -> bool {
        loop {
            let notify = self.freed.clone();
            let freed = notify.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let courier = match idle {
                Some(i) => i,
                None if self.queues.len() < self.flow.health.max_in_flight => self.start(None),
                // A courier that ended early (it cannot, short of a panic) is replaced, so
                // the dataflow never runs out of couriers and waits forever.
                None => match self.queues.iter().position(|q| q.is_closed()) {
                    Some(dead) => self.start(Some(dead)),
                    None => {
                        freed.await;
                        continue;
                    }
                },
            };
            // An idle courier's queue is empty; a closed one has stopped for good.
            match self.queues[courier].try_send(item) {
                Ok(()) => return true,
                Err(tokio::sync::mpsc::error::TrySendError::Full(back)) => item = back,
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
    }

    /// Start a courier, new or in place of the one at `replace`.
    fn start(&mut self, replace: Option<usize>) -> usize {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let index = match replace {
            Some(i) => {
                self.queues[i] = tx;
                i
            }
            None => {
                self.queues.push(tx);
                self.queues.len() - 1
            }
        };
        tokio::spawn(courier(
            index,
            rx,
            self.idle.clone(),
            self.freed.clone(),
            self.inner.clone(),
            self.flow.clone(),
            self.done.clone(),
        ));
        index
    }
}

/// Deliver the items handed to courier `index`, one at a time, over its own connection
/// (driven in this task); after each, report idle. Stops when its queue closes.
async fn courier(
    index: usize,
    mut work: tokio::sync::mpsc::Receiver<Work>,
    idle: Arc<Mutex<Vec<usize>>>,
    freed: Arc<Notify>,
    inner: Arc<Inner>,
    flow: Arc<Flow>,
    done: tokio::sync::mpsc::Sender<Done>,
) {
    let session = Session::new();
    let run = async {
        while let Some(w) = work.recv().await {
            match w {
                Work::One(item) => {
                    let enqueued_at = item.enqueued_at;
                    let (c, audit, transition) = deliver(&flow, &inner.catalog, item, &session, false).await;
                    if let Some(t) = transition {
                        announce(&inner, &flow, t);
                    }
                    // Latency ends when the receiver answered, not when the outcome is committed.
                    inner.stats.record(&c, enqueued_at);
                    if done.send((Some(c), Some(audit))).await.is_err() {
                        return;
                    }
                }
                Work::Shaped(req) => {
                    let Some(shaping) = &flow.shaping else { continue };
                    if let Some(t) = super::shaped::deliver(&flow, shaping, req, &session, false).await {
                        announce(&inner, &flow, t);
                    }
                }
            }
            idle.lock().unwrap_or_else(|p| p.into_inner()).push(index);
            freed.notify_one();
        }
    };
    session.run(run).await;
}

async fn complete_loop(inner: Arc<Inner>, flow: Arc<Flow>, mut rx: tokio::sync::mpsc::Receiver<Done>) {
    let mut buf = Vec::with_capacity(OUTCOME_BATCH);
    // Rows stay leased while their outcomes gather.
    while crate::batch::recv_batch(&mut rx, &mut buf, OUTCOME_BATCH).await > 0 {
        let mut results = Vec::with_capacity(buf.len());
        let mut audit = Vec::with_capacity(buf.len());
        let events = inner.events();
        for (c, a) in buf.drain(..) {
            if let Some(a) = a {
                flow.counters.record_attempt(&a);
                audit.push(a);
            }
            let Some(c) = c else { continue };
            if let Completion::Dead {
                idempotency_key,
                error,
                ..
            }
            | Completion::DeadBatch {
                idempotency_key,
                error,
                ..
            } = &c
            {
                events.emit(
                    crate::events::EventType::DeliveryDeadLettered,
                    serde_json::json!({
                        "dataflow": flow.spec.name,
                        "idempotencyKey": idempotency_key,
                        "class": error.class(),
                        "kind": error.kind,
                        "status": error.status,
                        "attempts": error.attempt,
                    }),
                );
            }
            results.push(c);
        }
        let s = inner.store.clone();
        if let Err(e) = blocking(move || s.complete(&results, &audit)).await {
            // The leases expire and the rows are claimed again: at-least-once, never lost.
            tracing::error!(dataflow = %flow.spec.name, error = %e, "recording outcomes failed");
        }
    }
}

impl Stats {
    /// Outcome counts live per dataflow (`Flow::counters`); this keeps the latency.
    pub(super) fn record(&self, c: &Completion, enqueued_at: i64) {
        if let Completion::Delivered { .. } = c {
            let us = ((now_ms() - enqueued_at).max(0) as u64)
                .saturating_mul(1000)
                .max(1);
            if let Ok(mut h) = self.latency_us.lock() {
                h.saturating_record(us);
            }
        }
    }
}
