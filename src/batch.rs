//! Batching writers: a writer that takes items from a channel (delivery outcomes, audit
//! records) writes them in batches, one transaction or one write per burst, not per item.

/// Items written per transaction, at most, by the batching writers (delivery outcomes, the
/// sidecar's audit records).
pub(crate) const WRITE_BATCH: usize = 1024;
/// How long a batching writer waits for more items when only a few are ready.
const WRITE_GATHER: std::time::Duration = std::time::Duration::from_millis(2);

/// Wait for the next items of a batching writer, up to `max` of them, into `buf`. A store
/// transaction costs more than the few rows it would hold (each rewrites the same last pages),
/// so when items trickle in, a couple of milliseconds' worth gather first. Returns 0 once the
/// channel is closed and empty.
pub(crate) async fn recv_batch<T>(
    rx: &mut tokio::sync::mpsc::Receiver<T>,
    buf: &mut Vec<T>,
    max: usize,
) -> usize {
    if rx.recv_many(buf, max).await == 0 {
        return 0;
    }
    if buf.len() < WRITE_BATCH / 4 {
        tokio::time::sleep(WRITE_GATHER).await;
        gather(rx, buf, max);
    }
    buf.len()
}

/// [`recv_batch`] for a writer on a thread of its own.
pub(crate) fn recv_batch_blocking<T>(
    rx: &mut tokio::sync::mpsc::Receiver<T>,
    buf: &mut Vec<T>,
    max: usize,
) -> usize {
    if rx.blocking_recv_many(buf, max) == 0 {
        return 0;
    }
    if buf.len() < WRITE_BATCH / 4 {
        std::thread::sleep(WRITE_GATHER);
        gather(rx, buf, max);
    }
    buf.len()
}

/// Take what is ready now, up to `max` in `buf`.
fn gather<T>(rx: &mut tokio::sync::mpsc::Receiver<T>, buf: &mut Vec<T>, max: usize) {
    while buf.len() < max {
        match rx.try_recv() {
            Ok(x) => buf.push(x),
            Err(_) => break,
        }
    }
}
