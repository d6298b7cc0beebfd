//! Identities from the SPIFFE Workload API: a local agent (SPIRE or any other
//! implementation) streams X.509-SVIDs and trust bundles over a Unix socket
//! (`FetchX509SVID`, a server stream), pushing a new message whenever either rotates.
//!
//! One feed per identity runs on a thread of its own with a one-thread runtime, so it does
//! not depend on the runtime (or the lack of one) of whoever built the registry. At start the
//! first SVID must arrive, or the identity is refused with the reason (agent unreachable, no
//! SVID for this workload, the wanted SPIFFE ID not served). Afterwards every SVID pushed is
//! checked as a file identity is (key matches the leaf, valid now) and handed to the
//! registry; a broken stream is logged and reconnected with backoff while the last SVID
//! stays in use.
//!
//! Must never: log or print key material; connect anywhere but a local Unix socket.

use std::sync::mpsc;
use std::time::Duration;

use futures_util::StreamExt as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::{WorkloadApiClient, X509Context};

use super::Identity;

/// How long start-up waits for the agent's first SVID.
pub const FIRST_SVID_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnection backoff after a broken stream: from this, doubling…
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// …up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where the agent listens and which SVID to present.
#[derive(Debug, Clone)]
pub struct Source {
    /// `unix:///path` (checked by [`check_socket`]).
    pub socket: String,
    /// The SPIFFE ID to present; `None`: the agent's default (first) SVID.
    pub spiffe_id: Option<String>,
}

/// One X.509-SVID as the agent pushed it, checked.
#[derive(Clone)]
pub struct Svid {
    /// The chain (leaf first) and key, validated like a file identity.
    pub identity: Identity,
    /// The SVID's SPIFFE ID (`spiffe://…`).
    pub spiffe_id: String,
    /// The X.509 authorities of the SVID's trust domain, as the agent last sent them.
    pub bundle: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("identity", &self.identity)
            .field("bundle_authorities", &self.bundle.len())
            .finish()
    }
}

/// What the feed calls with every SVID after the first; `false` ends the feed (its
/// identity is gone).
pub type OnSvid = Box<dyn Fn(Svid) -> bool + Send>;

/// A running feed. Dropping it stops the feed's thread.
#[derive(Debug)]
pub struct Feed {
    /// Dropped with the feed: the thread sees the channel close and ends.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The socket must be `unix://` + an absolute path (or `unix:/path`): the Workload API is
/// local and unauthenticated by design; a TCP endpoint would carry private keys in clear.
pub fn check_socket(socket: &str) -> Result<(), String> {
    let Some(rest) = socket.strip_prefix("unix:") else {
        return Err(format!(
            "'{socket}' must be unix:///absolute/path (the Workload API is a local Unix socket)"
        ));
    };
    let path = rest.strip_prefix("//").unwrap_or(rest);
    if !path.starts_with('/') {
        return Err(format!(
            "'{socket}' must name an absolute path: unix:///absolute/path"
        ));
    }
    spiffe::transport::Endpoint::parse(socket)
        .map(|_| ())
        .map_err(|e| format!("'{socket}': {e}"))
}

/// A SPIFFE ID as the spec has it: `spiffe://trust-domain/path`.
pub fn check_spiffe_id(id: &str) -> Result<(), String> {
    spiffe::SpiffeId::new(id)
        .map(|_| ())
        .map_err(|e| format!("'{id}' is not a SPIFFE ID: {e}"))
}

/// Connect to the agent and wait (up to `wait`) for the first SVID. On success the feed
/// keeps running: call [`Pending::attach`] with where to send later SVIDs.
pub fn start(source: &Source, wait: Duration) -> Result<(Svid, Pending), String> {
    check_socket(&source.socket)?;
    let (first_tx, first_rx) = mpsc::sync_channel(1);
    let (attach_tx, attach_rx) = tokio::sync::oneshot::channel::<OnSvid>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("SPIFFE feed runtime: {e}"))?;
    let feed_source = source.clone();
    std::thread::Builder::new()
        .name("spiffe-workload-api".into())
        .spawn(move || runtime.block_on(run(feed_source, first_tx, attach_rx, stop_rx)))
        .map_err(|e| format!("SPIFFE feed thread: {e}"))?;
    let first = match first_rx.recv_timeout(wait) {
        Ok(result) => result?,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            return Err(format!(
                "no X.509-SVID from the SPIFFE Workload API at {} within {} s",
                source.socket,
                wait.as_secs()
            ))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            return Err(format!("the SPIFFE feed for {} ended at start", source.socket))
        }
    };
    Ok((
        first,
        Pending {
            attach: attach_tx,
            stop: stop_tx,
        },
    ))
}

/// A feed that delivered its first SVID and waits to learn where the next ones go.
pub struct Pending {
    attach: tokio::sync::oneshot::Sender<OnSvid>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").finish_non_exhaustive()
    }
}

impl Pending {
    /// Send every later SVID to `on_svid`; the feed runs until the returned [`Feed`] is
    /// dropped or `on_svid` returns `false`.
    pub fn attach(self, on_svid: OnSvid) -> Feed {
        // A feed that already ended (its thread gone) has nothing to attach to; the identity
        // keeps its first SVID, as after a stream that never comes back.
        let _ = self.attach.send(on_svid);
        Feed { _stop: self.stop }
    }
}

/// The feed: connect, stream, hand each SVID on; on a broken stream keep the last SVID,
/// log, and reconnect with backoff. Before the first SVID any failure ends the feed and is
/// reported to `start`.
async fn run(
    source: Source,
    first_tx: mpsc::SyncSender<Result<Svid, String>>,
    attach_rx: tokio::sync::oneshot::Receiver<OnSvid>,
    mut stop_rx: tokio::sync::oneshot::Receiver<()>,
) {
    let mut first_tx = Some(first_tx);
    let mut attach_rx = Some(attach_rx);
    let mut on_svid: Option<OnSvid> = None;
    let mut backoff = BACKOFF_MIN;
    let mut last_expiry = None;
    loop {
        let stream = tokio::select! {
            _ = &mut stop_rx => return,
            s = open_stream(&source.socket) => s,
        };
        let failure = match stream {
            Err(e) => e,
            Ok(mut stream) => loop {
                let item = tokio::select! {
                    _ = &mut stop_rx => return,
                    item = stream.next() => item,
                };
                let svid = match item {
                    None => break "the agent ended the stream".to_owned(),
                    Some(Err(e)) => break error_chain(&e),
                    Some(Ok(ctx)) => select_svid(&source, &ctx),
                };
                let svid = match svid {
                    Ok(svid) => svid,
                    Err(e) => {
                        // A message we cannot use: refused, the last good SVID stays. The
                        // agent pushes again on its next rotation.
                        if first_tx.is_none() {
                            tracing::error!(socket = %source.socket, error = %e,
                                "refused an X.509-SVID from the SPIFFE Workload API; the previous one stays in use");
                            continue;
                        }
                        break e;
                    }
                };
                backoff = BACKOFF_MIN;
                last_expiry = Some(svid.identity.facts.not_after);
                if let Some(tx) = first_tx.take() {
                    let _ = tx.send(Ok(svid));
                    // Wait for the registry to say where later SVIDs go; it gives up (drops
                    // the sender) if it could not be built.
                    let attach = attach_rx.take();
                    let attached = match attach {
                        Some(rx) => tokio::select! {
                            _ = &mut stop_rx => return,
                            r = rx => r.ok(),
                        },
                        None => None,
                    };
                    match attached {
                        Some(f) => on_svid = Some(f),
                        None => return,
                    }
                    continue;
                }
                if let Some(f) = &on_svid {
                    if !f(svid) {
                        return;
                    }
                }
            },
        };
        if let Some(tx) = first_tx.take() {
            let _ = tx.send(Err(format!(
                "SPIFFE Workload API at {}: {failure}",
                source.socket
            )));
            return;
        }
        tracing::error!(
            socket = %source.socket,
            error = %failure,
            retry_in_ms = backoff.as_millis() as u64,
            svid_not_after = ?last_expiry,
            "SPIFFE Workload API stream lost; the last X.509-SVID stays in use while reconnecting"
        );
        tokio::select! {
            _ = &mut stop_rx => return,
            _ = tokio::time::sleep(backoff) => {},
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

type ContextStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<X509Context, spiffe::WorkloadApiError>> + Send>>;

/// Connect and start `FetchX509SVID`. The client sends the `workload.spiffe.io: true`
/// metadata the Workload API requires on every call.
async fn open_stream(socket: &str) -> Result<ContextStream, String> {
    let client = WorkloadApiClient::connect_to(socket)
        .await
        .map_err(|e| format!("cannot reach the agent: {}", error_chain(&e)))?;
    let stream = client
        .stream_x509_contexts()
        .await
        .map_err(|e| format!("FetchX509SVID refused: {}", error_chain(&e)))?;
    Ok(Box::pin(stream))
}

/// The SVID to present from one Workload API message, checked as an identity.
fn select_svid(source: &Source, ctx: &X509Context) -> Result<Svid, String> {
    let svid = match &source.spiffe_id {
        Some(wanted) => ctx
            .svids()
            .iter()
            .find(|s| s.spiffe_id().to_string() == *wanted)
            .ok_or_else(|| {
                let served: Vec<String> = ctx.svids().iter().map(|s| s.spiffe_id().to_string()).collect();
                format!(
                    "the agent serves no X.509-SVID for {wanted} (it serves: {})",
                    if served.is_empty() {
                        "none".to_owned()
                    } else {
                        served.join(", ")
                    }
                )
            })?,
        None => ctx
            .default_svid()
            .ok_or_else(|| "the agent sent no X.509-SVID".to_owned())?,
    };
    let spiffe_id = svid.spiffe_id().to_string();
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    if chain.is_empty() {
        return Err(format!("the X.509-SVID for {spiffe_id} has no certificate"));
    }
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.private_key().as_bytes().to_vec()));
    let origin = std::path::PathBuf::from(format!("{}#{spiffe_id}", source.socket));
    let identity = Identity::from_svid(&origin, chain, key).map_err(|e| e.to_string())?;
    let bundle = ctx
        .bundle_set()
        .get(svid.spiffe_id().trust_domain())
        .map(|b| {
            b.authorities()
                .iter()
                .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    Ok(Svid {
        identity,
        spiffe_id,
        bundle,
    })
}

/// An error and its causes on one line (the transport's reason is usually a source or two
/// down: "No such file or directory", "Connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_must_be_local_absolute_paths() {
        assert!(check_socket("unix:///run/spire/agent.sock").is_ok());
        assert!(check_socket("unix:/run/spire/agent.sock").is_ok());
        for bad in [
            "tcp://127.0.0.1:8081",
            "unix://relative.sock",
            "/run/spire/agent.sock",
            "",
        ] {
            assert!(check_socket(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spiffe_ids_are_checked() {
        assert!(check_spiffe_id("spiffe://example.org/gateway").is_ok());
        assert!(check_spiffe_id("https://example.org/gateway").is_err());
        assert!(check_spiffe_id("spiffe://").is_err());
    }
}
