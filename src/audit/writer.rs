//! The audit writer thread: appends records handed over by a hot path (the sidecar's proxy)
//! in batches, below the hot path's priority, to the store's chain or an audit file. A record
//! is never dropped to keep pace: when the writer falls behind, its queue fills and senders
//! wait for room.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::AuditRecord;
use crate::batch::{recv_batch_blocking, WRITE_BATCH};
use crate::config::Config;

/// What a sender queues: facts it already holds, from which the writer makes the record, so
/// the sending thread allocates nothing for the audit log.
pub trait Record: Send + 'static {
    /// The audit record, borrowing what the item holds.
    fn as_record(&self) -> AuditRecord<'_>;
}

/// Where records go: the store's chain, or an audit file of its own.
pub enum Sink {
    Store(Arc<dyn crate::store::Store>),
    File(Box<super::file::AuditFile>),
}

impl Sink {
    /// The sidecar's sink: `[sidecar] audit_file` when set, else the config's store.
    pub fn open_for_sidecar(cfg: &Config) -> Result<Self, String> {
        let sidecar = cfg.sidecar.as_ref();
        match sidecar.and_then(|s| s.audit_file.as_ref().map(|f| (f, s.audit_file_rotate_bytes))) {
            Some((path, rotate_at)) => {
                let chain = crate::store::audit_chain(cfg).map_err(|e| e.to_string())?;
                super::file::AuditFile::open(&cfg.path(path), chain, rotate_at)
                    .map(|f| Sink::File(Box::new(f)))
            }
            None => crate::store::open(cfg)
                .map(Sink::Store)
                .map_err(|e| e.to_string()),
        }
    }

    fn append<T: Record>(&mut self, batch: &[T]) -> Result<(), String> {
        // Serialised straight from what the sender queued: no owned copy of the record.
        let records: Vec<AuditRecord<'_>> = batch.iter().map(Record::as_record).collect();
        match self {
            Sink::Store(store) => store.append_audit(&records).map_err(|e| e.to_string()),
            Sink::File(file) => file.append(&records).map_err(|e| e.to_string()),
        }
    }
}

/// Start the thread that appends what `rx` delivers to `sink`, in batches (one transaction
/// or one write per burst, not per record). It runs at a lower priority than the senders (nice
/// 10): on a busy host the appends fill the gaps instead of preempting requests in flight. The
/// thread ends once every sender is gone and the queue drained; [`finish`] waits for that.
pub fn start<T: Record>(mut sink: Sink, mut rx: mpsc::Receiver<T>) -> Result<(), String> {
    let writer = std::thread::Builder::new()
        .name("sallyport-audit".into())
        .spawn(move || {
            lower_priority();
            let mut batch = Vec::with_capacity(WRITE_BATCH);
            while recv_batch_blocking(&mut rx, &mut batch, WRITE_BATCH) > 0 {
                if let Err(error) = sink.append(&batch) {
                    tracing::error!(%error, "audit records could not be written");
                }
                batch.clear();
            }
        })
        .map_err(|e| format!("could not start the audit writer: {e}"))?;
    WRITERS.lock().unwrap_or_else(|p| p.into_inner()).push(writer);
    Ok(())
}

/// The writer threads started in this process, for [`finish`].
static WRITERS: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>> = std::sync::Mutex::new(Vec::new());

/// Wait (at most `limit`) for every writer to write what is still queued and stop. Call once
/// the runtime whose tasks held the queues' senders is gone: a writer stops when the last one
/// is dropped. Without this a clean shutdown would lose the records of the last moments.
pub fn finish(limit: Duration) {
    let writers = std::mem::take(&mut *WRITERS.lock().unwrap_or_else(|p| p.into_inner()));
    let deadline = Instant::now() + limit;
    for w in writers {
        while !w.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if w.is_finished() {
            let _ = w.join();
        } else {
            tracing::error!("an audit writer did not finish in time; records still queued were not written");
        }
    }
}

/// Nice 10 for the calling thread (Linux keeps a nice value per thread). Raising one's own
/// nice value needs no privilege; if it fails, the thread runs at the usual priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10) {
        tracing::debug!(error = %e, "the audit writer runs at the usual priority");
    }
}
