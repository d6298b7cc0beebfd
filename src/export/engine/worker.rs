//! One dataflow's pipeline: the claimer leases due rows, couriers deliver them (each over a
//! connection of its own), and the completer records outcomes in batches.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::attempt::{deliver, Flow};
use super::{blocking, EngineError, Inner, Stats};
use crate::audit::AuditRecord;
use crate::delivery::Session;
use crate::store::{now_ms, Completion, OutboxItem};

/// Rows claimed per round trip to the store.
const BATCH: usize = 512;

/// Deliveries in flight per dataflow: that many couriers, each sending one at a time over a
/// connection of its own, as a proxy's keep-alive pool would hold them.
const IN_FLIGHT: usize = 64;

/// Outcomes recorded per store transaction, at most: outcomes get the writer only between
/// ingest batches, and smaller transactions fell behind the deliveries, leaving leased rows
/// for every claim to step over (docs/design-notes.md, "Export pipeline on the embedded store").
const OUTCOME_BATCH: usize = 8192;

/// One dataflow's pipeline: a claimer leases due rows and hands each to a courier, which
/// delivers it; a completer records outcomes in batches. A row stays leased from claim to
/// completion, so a profile never has two deliveries in flight. The couriers stop when the
/// claimer does, after the delivery each holds.
pub(super) async fn worker(inner: Arc<Inner>, flow: Arc<Flow>) {
    let (done_tx, done_rx) =
        tokio::sync::mpsc::channel::<(Completion, AuditRecord<'static>)>(OUTCOME_BATCH * 2);
    let completer = tokio::spawn(complete_loop(inner.clone(), flow.clone(), done_rx));
    let mut couriers = Couriers {
        queues: Vec::new(),
        idle: Arc::default(),
        freed: Arc::default(),
        inner: inner.clone(),
        flow: flow.clone(),
        done: done_tx,
    };
    let lease_ms = i64::try_from(inner.cfg.store.lease().as_millis()).unwrap_or(30_000);
    let claim = || {
        let (s, name) = (inner.store.clone(), flow.spec.name.clone());
        tokio::task::spawn_blocking(move || s.claim(&name, BATCH, now_ms(), lease_ms))
    };
    // The claim of the next batch, started while the current one's last deliveries go out.
    let mut next = None;
    loop {
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
        // A full batch means more are probably due. Claim them while the last IN_FLIGHT of
        // this one go out, so the connections are not left idle during the claim (which
        // takes about as long as a round of deliveries). Claimed rows stay leased, so the
        // early claim never returns a row of this batch; it is at most IN_FLIGHT deliveries
        // ahead, far inside the lease.
        let prefetch_at = if items.len() == BATCH {
            Some(items.len().saturating_sub(IN_FLIGHT))
        } else {
            None
        };
        for (i, item) in items.into_iter().enumerate() {
            if Some(i) == prefetch_at {
                next = Some(claim());
            }
            if !couriers.dispatch(item).await {
                return;
            }
        }
        if completer.is_finished() {
            tracing::error!(dataflow = %flow.spec.name, "completion writer stopped");
            return;
        }
    }
}

/// A dataflow's couriers: up to [`IN_FLIGHT`] tasks, each delivering one item at a time over
/// a connection of its own (a lane, driven in the courier's task). They start as the load
/// needs them, and the one idle most recently gets the next item, so a light load keeps
/// using the same few connections.
struct Couriers {
    /// Each courier's queue (one item at most).
    queues: Vec<tokio::sync::mpsc::Sender<OutboxItem>>,
    /// Idle couriers, the most recently idle last.
    idle: Arc<Mutex<Vec<usize>>>,
    /// A courier became idle.
    freed: Arc<Notify>,
    inner: Arc<Inner>,
    flow: Arc<Flow>,
    done: tokio::sync::mpsc::Sender<(Completion, AuditRecord<'static>)>,
}

impl Couriers {
    /// Hand `item` to an idle courier, starting one when none is idle and fewer than
    /// [`IN_FLIGHT`] run, or else waiting for one. `false` when the couriers have stopped
    /// (the completer is gone).
    async fn dispatch(&mut self, mut item: OutboxItem) -> bool {
        loop {
            let notify = self.freed.clone();
            let freed = notify.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let courier = match idle {
                Some(i) => i,
                None if self.queues.len() < IN_FLIGHT => self.start(None),
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
    mut work: tokio::sync::mpsc::Receiver<OutboxItem>,
    idle: Arc<Mutex<Vec<usize>>>,
    freed: Arc<Notify>,
    inner: Arc<Inner>,
    flow: Arc<Flow>,
    done: tokio::sync::mpsc::Sender<(Completion, AuditRecord<'static>)>,
) {
    let session = Session::new();
    let run = async {
        while let Some(item) = work.recv().await {
            let enqueued_at = item.enqueued_at;
            let (c, audit) = deliver(&flow, &inner.catalog, item, &session).await;
            // Latency ends when the receiver answered, not when the outcome is committed.
            inner.stats.record(&c, enqueued_at);
            if done.send((c, audit)).await.is_err() {
                return;
            }
            idle.lock().unwrap_or_else(|p| p.into_inner()).push(index);
            freed.notify_one();
        }
    };
    session.run(run).await;
}

async fn complete_loop(
    inner: Arc<Inner>,
    flow: Arc<Flow>,
    mut rx: tokio::sync::mpsc::Receiver<(Completion, AuditRecord<'static>)>,
) {
    let mut buf = Vec::with_capacity(OUTCOME_BATCH);
    // Rows stay leased while their outcomes gather.
    while crate::batch::recv_batch(&mut rx, &mut buf, OUTCOME_BATCH).await > 0 {
        let mut results = Vec::with_capacity(buf.len());
        let mut audit = Vec::with_capacity(buf.len());
        let events = inner.events();
        for (c, a) in buf.drain(..) {
            flow.counters.record(a.outcome, a.error_kind, a.latency_ms);
            if let Completion::Dead {
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
            audit.push(a);
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
