//! Lanes: a task that sends one request at a time (a sidecar app connection, an export
//! courier) gets a connection of its own per destination, driven in that same task.
//!
//! Such a task's own connection is always free when its next request comes. Carrying the
//! request there skips what the shared pool costs each request: a checkout and return under a
//! lock, a task per connection woken from the sender's task (often on the other worker
//! thread) and back, and a task spawned to return each connection whose response body is
//! still streaming. The connection is made by the destination's own connector, so it passes
//! the same egress policy, source-address binding, trust and mTLS-only check as a pooled one.
//!
//! When the task ends, its idle lanes are parked with their destination (a [`Parked`]) for
//! the next task to take (each then driven by a task of its own), so a sidecar app that opens
//! a connection per request still reuses upstream connections, as with a pool.
//!
//! Requests that cannot use a lane (HTTP/2 from a sidecar app, whose streams run
//! concurrently, or CONNECT) go through the destination's pool.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::HOST;
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::mpsc;

use super::{Body, BoxError, DeliveryClient, DeliveryError, PeerInfo};

/// A connection's driver: polled by the task that opened it until the connection ends.
type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Free for a request now (an HTTP/1 connection is not while an exchange is under way).
    fn is_ready(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }
}

/// One upstream connection, with the identity generation it was made under.
struct Lane {
    sender: Sender,
    peer: Arc<PeerInfo>,
    generation: u64,
    /// The `Host` header of the last HTTP/1 request, by the authority it was made from
    /// (a lane's requests go to one destination, so it is made once).
    host: Option<(http::uri::Authority, HeaderValue)>,
    _open: Open,
}

/// How many idle lanes a route keeps for app connections to come, and for how long (as the
/// delivery pool keeps idle connections).
const PARKED_MAX: usize = 256;
const PARKED_FOR: Duration = Duration::from_secs(60);
/// How many lanes a route opens, about (checked before a request, not locked through it).
/// An app that holds more connections than this (a large idle client pool, say) has the rest
/// of its requests carried by the route's shared pool, so upstream connections do not grow
/// with the app's.
const OPEN_MAX: usize = 256;

/// Counts a route's open lanes while it lives.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A route's lanes left by app connections that closed, and the count of its open lanes.
#[derive(Default)]
pub(crate) struct Parked {
    idle: Mutex<Vec<(Instant, Lane)>>,
    open: Arc<AtomicUsize>,
}

impl Parked {
    /// The most recently parked lane that is free, unexpired, and of `generation`. Closed,
    /// expired and outdated lanes are let go; busy ones (an exchange cut off by its app still
    /// finishing) stay for later.
    fn take(&self, generation: u64) -> Option<Lane> {
        let mut parked = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        parked.retain(|(at, lane)| {
            at.elapsed() < PARKED_FOR && lane.generation == generation && !lane.sender.is_closed()
        });
        let free = parked.iter().rposition(|(_, lane)| lane.sender.is_ready())?;
        Some(parked.remove(free).1)
    }

    fn put(&self, lane: Lane) {
        let mut parked = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if parked.len() < PARKED_MAX {
            parked.push((Instant::now(), lane));
        }
    }
}

/// The lanes of one app connection, each with the parking of its route.
pub(crate) struct Lanes {
    idle: Mutex<Vec<(Arc<Parked>, Lane)>>,
    drivers: mpsc::UnboundedSender<Driver>,
    /// The receiving end of `drivers`, until [`drive`] takes it: lanes are only opened while
    /// something polls their drivers.
    driven: Mutex<Option<mpsc::UnboundedReceiver<Driver>>>,
    /// [`drive`] is running (read on every request, so not behind the mutex).
    running: AtomicBool,
    /// The timer of the task's exchanges (see [`Lanes::within`]); made at the first.
    timer: Mutex<Option<Pin<Box<tokio::time::Sleep>>>>,
}

impl Lanes {
    /// Lanes, not yet driven (see [`drive`]).
    pub(crate) fn new() -> Arc<Lanes> {
        let (tx, rx) = mpsc::unbounded_channel();
        Arc::new(Lanes {
            idle: Mutex::new(Vec::new()),
            drivers: tx,
            driven: Mutex::new(Some(rx)),
            running: AtomicBool::new(false),
            timer: Mutex::new(None),
        })
    }

    /// Whether [`drive`] is polling these lanes' connections.
    pub(crate) fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// `exchange`, or `None` once `limit` has passed. For the exchanges of this task, which
    /// come one at a time (an HTTP/1 app connection's requests, a courier's deliveries).
    ///
    /// They share one timer, moved only when it would fire too late for the exchange under
    /// way, because setting a fresh timer per exchange wakes the runtime's driver with a
    /// syscall (bench/RESULTS.md, "Timers"). When it fires for an earlier exchange's deadline
    /// it is moved to the current one's: an exchange is never cut off before its own
    /// `limit`, nor let run past it.
    ///
    /// `exchange` comes pinned by the caller: moved in by value, it would be stored twice in
    /// this future, and hyper moves the whole request future once per request.
    pub(crate) async fn within<F: Future>(
        &self,
        limit: Duration,
        mut exchange: Pin<&mut F>,
    ) -> Option<F::Output> {
        let deadline = tokio::time::Instant::now() + limit;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = exchange.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            let mut timer = self.timer.lock().unwrap_or_else(|p| p.into_inner());
            let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.deadline() > deadline {
                timer.as_mut().reset(deadline);
            }
            while timer.as_mut().poll(cx).is_ready() {
                if tokio::time::Instant::now() >= deadline {
                    return Poll::Ready(None);
                }
                // It fired for an earlier exchange's deadline.
                timer.as_mut().reset(deadline);
            }
            Poll::Pending
        })
        .await
    }

    /// Whether a request to `route` can go on a lane now: this app connection has one, or
    /// the route has one parked, or fewer than [`OPEN_MAX`] are open.
    pub(crate) fn available(&self, route: &Arc<Parked>) -> bool {
        let own = self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(r, _)| Arc::ptr_eq(r, route));
        own || route.open.load(Ordering::Relaxed) < OPEN_MAX
            || !route.idle.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Send `req` on route `route`'s lane (opened now if there is none, or it closed, or the
    /// identity changed since it was made). The caller applies the timeout.
    pub(crate) async fn send(
        &self,
        route: &Arc<Parked>,
        client: &DeliveryClient,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, DeliveryError> {
        let generation = client.identity_generation();
        let reused = self
            .take(route)
            .filter(|l| l.generation == generation)
            .or_else(|| route.take(generation));
        let mut fresh = reused.is_none();
        let lane = match reused {
            Some(l) => l,
            // Boxed: the handshake futures are large, and this one is rare.
            None => Box::pin(self.open(route, client, req.uri(), generation)).await?,
        };
        // If this future is dropped mid-exchange (the app hung up, or the timeout), the lane
        // is parked: its connection finishes the exchange and serves another app connection.
        let mut lane = InUse(Some(lane), route);
        let uri = req.uri().clone();
        loop {
            let Some(current) = lane.0.as_mut() else {
                return Err(client.send_error(boxed_str("the upstream connection was lost")));
            };
            match current.send(req).await {
                Ok(mut res) => {
                    res.extensions_mut().insert(current.peer.clone());
                    if let Some(l) = lane.0.take() {
                        self.put(route, l);
                    }
                    return Ok(res);
                }
                // A kept connection the receiver closed before the request went out (idle
                // timeout, keep-alive limit): nothing was sent, so once more on a new one.
                Err(Unsent(Some(back), _)) if !fresh => {
                    req = back;
                    *req.uri_mut() = uri.clone();
                    // The closed one is let go, not parked, even if opening fails.
                    lane.0 = None;
                    lane.0 = Some(Box::pin(self.open(route, client, &uri, generation)).await?);
                    fresh = true;
                }
                Err(Unsent(_, e)) => {
                    // Failed mid-exchange: the connection is not worth keeping.
                    lane.0 = None;
                    return Err(client.send_error(e));
                }
            }
        }
    }

    fn take(&self, route: &Arc<Parked>) -> Option<Lane> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let at = idle.iter().position(|(r, _)| Arc::ptr_eq(r, route))?;
        Some(idle.swap_remove(at).1)
    }

    fn put(&self, route: &Arc<Parked>, lane: Lane) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((route.clone(), lane));
    }

    /// The app connection ended: its idle lanes go to their routes for others to take.
    fn park(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        for (route, lane) in idle {
            route.put(lane);
        }
    }

    async fn open(
        &self,
        route: &Parked,
        client: &DeliveryClient,
        uri: &Uri,
        generation: u64,
    ) -> Result<Lane, DeliveryError> {
        tracing::debug!(destination = %uri.authority().map_or("", |a| a.as_str()), "opening a lane");
        let conn = client.connector().connect(uri).await?;
        let peer = conn.peer_shared();
        let sender = if conn.is_h2() {
            let (sender, driver) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(conn)
                .await
                .map_err(|e| client.send_error(boxed(e)))?;
            self.start(async move {
                let _ = driver.await;
            });
            Sender::H2(sender)
        } else {
            let (sender, driver) = http1::handshake(conn)
                .await
                .map_err(|e| client.send_error(boxed(e)))?;
            self.start(async move {
                let _ = driver.await;
            });
            Sender::H1(sender)
        };
        route.open.fetch_add(1, Ordering::Relaxed);
        Ok(Lane {
            sender,
            peer,
            generation,
            host: None,
            _open: Open(route.open.clone()),
        })
    }

    fn start(&self, driver: impl Future<Output = ()> + Send + 'static) {
        // The receiver lives as long as the app connection's task, which owns `self` too.
        let _ = self.drivers.send(Box::pin(driver));
    }
}

/// A lane taken for one exchange; parked with its route if the exchange is cut off.
struct InUse<'a>(Option<Lane>, &'a Arc<Parked>);

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        if let Some(lane) = self.0.take() {
            self.1.put(lane);
        }
    }
}

fn boxed_str(s: &'static str) -> BoxError {
    s.into()
}

/// A failed send: the request back when it was never written, and why.
struct Unsent(Option<Request<Body>>, BoxError);

impl Lane {
    async fn send(&mut self, mut req: Request<Body>) -> Result<Response<Incoming>, Unsent> {
        match &mut self.sender {
            Sender::H1(s) => {
                // As hyper-util's client does for HTTP/1: origin-form target, Host header.
                let uri = req.uri().clone();
                if let Some(v) = host_header(&mut self.host, &uri) {
                    req.headers_mut().entry(HOST).or_insert(v);
                }
                if let Some(pq) = uri.path_and_query() {
                    if let Ok(origin) = Uri::builder().path_and_query(pq.clone()).build() {
                        *req.uri_mut() = origin;
                    }
                }
                if let Err(e) = s.ready().await {
                    return Err(Unsent(Some(req), boxed(e)));
                }
                s.try_send_request(req).await.map_err(unsent)
            }
            Sender::H2(s) => {
                if let Err(e) = s.ready().await {
                    return Err(Unsent(Some(req), boxed(e)));
                }
                s.try_send_request(req).await.map_err(unsent)
            }
        }
    }
}

/// The `Host` header for `uri` (its port left out when it is 443), from `cache` when it was
/// made for the same authority.
fn host_header(cache: &mut Option<(http::uri::Authority, HeaderValue)>, uri: &Uri) -> Option<HeaderValue> {
    let authority = uri.authority()?;
    if let Some((_, v)) = cache.as_ref().filter(|(a, _)| a == authority) {
        return Some(v.clone());
    }
    let host = authority.host();
    let value = match authority.port_u16().filter(|p| *p != 443) {
        Some(port) => HeaderValue::from_str(&format!("{host}:{port}")),
        None => HeaderValue::from_str(host),
    }
    .ok()?;
    *cache = Some((authority.clone(), value.clone()));
    Some(value)
}

fn unsent(mut e: hyper::client::conn::TrySendError<Request<Body>>) -> Unsent {
    let req = e.take_message();
    Unsent(req, boxed(e.into_error()))
}

fn boxed(e: hyper::Error) -> BoxError {
    Box::new(e)
}

/// Run `server` (the app connection) and every lane it opens in this one task, until the
/// app connection ends. Then its idle lanes are parked with their routes, and each of its
/// connections still open goes on in a task of its own.
pub(crate) async fn drive<F: Future>(server: F, lanes: &Lanes) -> F::Output {
    let taken = lanes.driven.lock().unwrap_or_else(|p| p.into_inner()).take();
    let Some(mut drivers) = taken else {
        // Already driven elsewhere: its requests went through the pools meanwhile.
        return server.await;
    };
    lanes.running.store(true, Ordering::Relaxed);
    let mut server = std::pin::pin!(server);
    let mut running: Vec<Driver> = Vec::new();
    let out = std::future::poll_fn(|cx: &mut Context<'_>| {
        while let Poll::Ready(Some(d)) = drivers.poll_recv(cx) {
            running.push(d);
        }
        running.retain_mut(|d| d.as_mut().poll(cx).is_pending());
        server.as_mut().poll(cx)
    })
    .await;
    while let Ok(d) = drivers.try_recv() {
        running.push(d);
    }
    // A connection whose lane is not parked (its request was cut off) ends by itself once
    // its sender is gone.
    for d in running {
        tokio::spawn(d);
    }
    // Nothing drives new lanes any more: later requests (there should be none) use the pool.
    lanes.running.store(false, Ordering::Relaxed);
    *lanes.driven.lock().unwrap_or_else(|p| p.into_inner()) = Some(drivers);
    lanes.park();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_header_names_the_port_unless_443_and_follows_the_authority() {
        let mut cache = None;
        let host = |cache: &mut _, u: &str| {
            host_header(cache, &u.parse().expect("a valid URI")).expect("a URI with an authority")
        };
        assert_eq!(host(&mut cache, "https://rx.example:9443/a"), "rx.example:9443");
        assert_eq!(
            host(&mut cache, "https://rx.example:9443/b?q=1"),
            "rx.example:9443"
        );
        assert_eq!(host(&mut cache, "https://other.example/c"), "other.example");
        assert_eq!(host(&mut cache, "https://[::1]:443/"), "[::1]");
        assert_eq!(host(&mut cache, "https://[::1]:8443/"), "[::1]:8443");
        assert_eq!(host_header(&mut cache, &Uri::from_static("/origin-form")), None);
    }
}
