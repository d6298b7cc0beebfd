//! How every listener the gateway opens — public, admin, and each sidecar listener, on TCP or
//! a Unix socket — accepts and holds connections, in one place: the accept loop (with the
//! connection cap and back-off on accept errors), each connection's watchdog (TLS handshake,
//! request head, keep-alive idleness) and the hyper settings they share.
//!
//! The watchdog, per connection, while no request is in flight:
//! - a new connection must finish its TLS handshake (when the listener serves TLS) within
//!   `tls_handshake_timeout`, and then send a complete first request head within
//!   `header_read_timeout`;
//! - after an exchange (the response's last byte handed to the connection), an HTTP/1.1
//!   connection must start its next request within `idle_timeout`, and complete that head
//!   within `header_read_timeout` of its first byte; an HTTP/2 connection must open a new
//!   stream within `idle_timeout`, whatever else it sends (pings, settings) meanwhile.
//!
//! A connection past its deadline is closed; one with a request in flight is never closed by
//! the watchdog (bodies and handlers have limits of their own). hyper's own HTTP/1
//! `header_read_timeout` is not used: it restarts when an exchange ends, so it would bound
//! the keep-alive wait and the head together with one value, and HTTP/2 has none
//! (docs/design-notes.md, "Why not hyper's `header_read_timeout`").
//!
//! At `max_connections`, a new connection makes room by closing the connection that has
//! waited longest without a request in flight (as nginx reuses idle keep-alive connections),
//! so connections that send nothing cannot lock anyone out; when every connection has a
//! request in flight, the new one is closed at once. An accept error that means the process
//! or host is out of something (file descriptors, buffers, memory) closes the longest-idle
//! connection and waits [`ACCEPT_BACKOFF`] before the next accept, logged once per burst; one
//! that only concerns the connection (aborted, reset) is skipped.
//!
//! Must never: spin on an accept error, close a connection with a request in flight (except
//! when the connection itself fails), or let connections that send nothing lock out new ones.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// How long the accept loop waits after an accept error such as EMFILE before it accepts
/// again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// An HTTP/2 connection is pinged this often; one whose peer does not answer within
/// [`H2_PING_TIMEOUT`] is closed (a peer that vanished mid-stream).
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
/// See [`H2_PING_INTERVAL`].
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Repeated warnings (connections refused at the cap, accept errors) are logged at most this
/// often per listener, with the number left out.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// A listener's limits (`max_connections`, `header_read_timeout`, `idle_timeout`,
/// `tls_handshake_timeout` in its config section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections held at once.
    pub max_connections: usize,
    /// From the end of the TLS handshake (or accept) to a complete first request head, and
    /// from the first byte of each later HTTP/1.1 request head to its end.
    pub header_read_timeout: Duration,
    /// From the end of an exchange to the next request's first byte (HTTP/1.1), or to the
    /// next stream (HTTP/2).
    pub idle_timeout: Duration,
    /// From accept to the end of the TLS handshake, on a listener that serves TLS.
    pub tls_handshake_timeout: Duration,
}

/// The hyper server settings every listener uses: HTTP/1.1 and HTTP/2 (by ALPN, or HTTP/2
/// prior knowledge), HTTP/2 keep-alive pings. Header and idle timeouts are the watchdog's
/// ([`Conn::run`]), so hyper's HTTP/1 header timer is off.
pub fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    builder
}

/// A listening socket the accept loop can take connections from.
pub trait Accept: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection, and the peer's address when it has one.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, Option<IpAddr>)>> + Send;
    /// Where it listens, for log lines.
    fn local(&self) -> String;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<(Self::Io, Option<IpAddr>)> {
        let (tcp, peer) = tokio::net::TcpListener::accept(self).await?;
        Ok((tcp, Some(peer.ip())))
    }
    fn local(&self) -> String {
        self.local_addr().map_or_else(|_| "?".into(), |a| a.to_string())
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<(Self::Io, Option<IpAddr>)> {
        let (stream, _) = tokio::net::UnixListener::accept(self).await?;
        Ok((stream, None))
    }
    fn local(&self) -> String {
        let path = self
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.display().to_string()));
        format!("unix:{}", path.unwrap_or_else(|| "?".into()))
    }
}

/// Accept connections on `listener` until `stop` completes, handing each one admitted to
/// `on_conn` in a task of its own (with its [`Conn`], to be [run](Conn::run) around the
/// connection's work). `what` names the listener in log lines.
pub async fn serve<L, F, Fut>(
    what: &str,
    listener: L,
    limits: Limits,
    stop: impl Future<Output = ()>,
    mut on_conn: F,
) where
    L: Accept,
    F: FnMut(L::Io, Option<IpAddr>, Conn) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Slots {
        name: format!("{what} listener {}", listener.local()),
        limits,
        conns: Mutex::new(Registry::default()),
        at_cap: Burst::default(),
        refused: Burst::default(),
        failed: Burst::default(),
    });
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut stop => return,
        };
        match accepted {
            Ok((io, peer)) => match Slots::admit(&slots) {
                Some(conn) => {
                    tokio::spawn(on_conn(io, peer, conn));
                }
                // Closed at once: the peer sees its connection end rather than hang.
                None => drop(io),
            },
            Err(e) if concerns_one_connection(&e) => {}
            Err(e) => {
                if let Some(more) = slots.failed.hit() {
                    tracing::warn!(
                        "{}: accepting a connection failed: {e}; closing the longest-idle connection and \
                         waiting {} ms before accepting again{}",
                        slots.name,
                        ACCEPT_BACKOFF.as_millis(),
                        more_since(more)
                    );
                }
                slots.evict_longest_idle();
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    () = &mut stop => return,
                }
            }
        }
    }
}

/// An accept error about the one connection that failed (the next accept may well succeed),
/// not about the process or host (EMFILE, ENFILE, ENOBUFS, ENOMEM, and any error not known
/// to be harmless: those wait [`ACCEPT_BACKOFF`]).
fn concerns_one_connection(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    // EPERM: a firewall rule refused this connection (Linux accept(2)).
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | PermissionDenied
    )
}

fn more_since(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more since the last report)")
    }
}

/// One listener's connections.
struct Slots {
    name: String,
    limits: Limits,
    conns: Mutex<Registry>,
    at_cap: Burst,
    refused: Burst,
    failed: Burst,
}

#[derive(Default)]
struct Registry {
    next: u64,
    /// Each connection's state, and the way to close it.
    open: HashMap<u64, (Arc<Watch>, oneshot::Sender<()>)>,
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for a new connection: free, or made by closing the longest-idle one. None when
    /// the listener is at its cap and every connection has a request in flight.
    fn admit(slots: &Arc<Slots>) -> Option<Conn> {
        let mut reg = slots.lock();
        if reg.open.len() >= slots.limits.max_connections {
            if Slots::evict(&mut reg) {
                if let Some(more) = slots.at_cap.hit() {
                    tracing::warn!(
                        "{}: at its cap of {} connections; closing the longest-idle ones to make room{}",
                        slots.name,
                        slots.limits.max_connections,
                        more_since(more)
                    );
                }
            } else {
                drop(reg);
                if let Some(more) = slots.refused.hit() {
                    tracing::warn!(
                        "{}: at its cap of {} connections, each with a request in flight; closing new ones{}",
                        slots.name,
                        slots.limits.max_connections,
                        more_since(more)
                    );
                }
                return None;
            }
        }
        let id = reg.next;
        reg.next += 1;
        let watch = Arc::new(Watch::new());
        let (close, closed) = oneshot::channel();
        reg.open.insert(id, (watch.clone(), close));
        drop(reg);
        Some(Conn {
            slots: slots.clone(),
            id,
            watch,
            closed: Some(closed),
        })
    }

    fn evict_longest_idle(&self) {
        Slots::evict(&mut self.lock());
    }

    /// Close the connection that has waited longest with no request in flight. False if
    /// there is none.
    fn evict(reg: &mut Registry) -> bool {
        let victim = reg
            .open
            .iter()
            .filter(|(_, (w, _))| w.in_flight.load(Relaxed) == 0)
            .min_by_key(|(_, (w, _))| unpack(w.state.load(Relaxed)).0)
            .map(|(id, _)| *id);
        match victim.and_then(|id| reg.open.remove(&id)) {
            Some((_, close)) => {
                let _ = close.send(());
                true
            }
            None => false,
        }
    }
}

/// Logs a repeated event once, then at most once per [`REPORT_EVERY`] with a count.
#[derive(Default)]
struct Burst {
    /// [`now_ms`] + 1 when last logged; 0: never.
    last: AtomicU64,
    more: AtomicU64,
}

impl Burst {
    /// Some(events left out since the last report) when this one should be logged.
    fn hit(&self) -> Option<u64> {
        self.hit_at(now_ms() + 1)
    }

    fn hit_at(&self, now: u64) -> Option<u64> {
        let last = self.last.load(Relaxed);
        if last != 0 && now < last + REPORT_EVERY.as_millis() as u64 {
            self.more.fetch_add(1, Relaxed);
            return None;
        }
        self.last.store(now, Relaxed);
        Some(self.more.swap(0, Relaxed))
    }
}

/// The zero of [`now_ms`].
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Milliseconds on the process's monotonic clock.
fn now_ms() -> u64 {
    base().elapsed().as_millis() as u64
}

/// The instant `ms` (on [`now_ms`]'s clock) names.
fn instant_at(ms: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(base() + Duration::from_millis(ms))
}

/// What a connection with no request in flight is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The end of its TLS handshake.
    Handshake = 0,
    /// A complete first request head.
    FirstHead = 1,
    /// The first byte of its next request (HTTP/1.1), or its next stream (HTTP/2).
    Idle = 2,
    /// The end of a request head it has begun (HTTP/1.1).
    Head = 3,
}

fn pack(since_ms: u64, wait: Wait) -> u64 {
    since_ms << 2 | wait as u64
}

fn unpack(state: u64) -> (u64, Wait) {
    let wait = match state & 3 {
        0 => Wait::Handshake,
        1 => Wait::FirstHead,
        2 => Wait::Idle,
        _ => Wait::Head,
    };
    (state >> 2, wait)
}

/// One connection's state, shared by its IO (which sees bytes arrive), its service (which
/// sees requests begin and responses end) and its watchdog.
struct Watch {
    in_flight: AtomicU32,
    /// [`pack`]ed: since when (ms), waiting for what.
    state: AtomicU64,
    /// The connection speaks HTTP/2: bytes between streams do not start a request head.
    h2: AtomicBool,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            in_flight: AtomicU32::new(0),
            state: AtomicU64::new(pack(now_ms(), Wait::FirstHead)),
            h2: AtomicBool::new(false),
        }
    }

    fn wait(&self, wait: Wait) {
        self.state.store(pack(now_ms(), wait), Relaxed);
    }

    /// Bytes arrived: on an idle HTTP/1.1 connection, a request head has begun.
    #[inline]
    fn read(&self) {
        if unpack(self.state.load(Relaxed)).1 == Wait::Idle
            && self.in_flight.load(Relaxed) == 0
            && !self.h2.load(Relaxed)
        {
            self.wait(Wait::Head);
        }
    }

    /// When the connection must be closed if nothing changes; None with a request in flight.
    fn deadline(&self, limits: &Limits) -> Option<u64> {
        if self.in_flight.load(Relaxed) > 0 {
            return None;
        }
        let (since, wait) = unpack(self.state.load(Relaxed));
        let allowed = match wait {
            Wait::Handshake => limits.tls_handshake_timeout,
            Wait::FirstHead | Wait::Head => limits.header_read_timeout,
            Wait::Idle => limits.idle_timeout,
        };
        Some(since + allowed.as_millis() as u64)
    }
}

/// An admitted connection: keeps its place under the cap until dropped.
pub struct Conn {
    slots: Arc<Slots>,
    id: u64,
    watch: Arc<Watch>,
    /// Fires when the connection is evicted; taken by [`Conn::run`].
    closed: Option<oneshot::Receiver<()>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.slots.lock().open.remove(&self.id);
    }
}

impl Conn {
    /// What the connection's IO and service report to its watchdog.
    pub fn tracker(&self) -> Tracker {
        Tracker(self.watch.clone())
    }

    /// Run `work` — serving this connection — until it ends, or until the watchdog closes
    /// the connection (None: `work` is dropped, and the socket it owns closed).
    pub async fn run<F: Future>(mut self, work: F) -> Option<F::Output> {
        let closed = self.closed.take()?;
        let tick = self
            .slots
            .limits
            .header_read_timeout
            .min(self.slots.limits.idle_timeout)
            .min(self.slots.limits.tls_handshake_timeout);
        let mut dog = Watchdog {
            watch: self.watch.clone(),
            limits: self.slots.limits,
            tick,
            sleep: Box::pin(tokio::time::sleep_until(
                instant_at(unpack(self.watch.state.load(Relaxed)).0) + tick,
            )),
            closed,
        };
        tokio::pin!(work);
        // The watchdog is polled only when its own timer or eviction woke the task, not on
        // every wake the connection's work causes (several per request): it gets a waker of
        // its own that raises a flag and passes the wake on (bench/RESULTS.md, "Refactors
        // measured").
        let flag = Arc::new(DogWake {
            fired: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        let dog_waker = std::task::Waker::from(flag.clone());
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            if !flag.fired.swap(false, Relaxed) {
                return Poll::Pending;
            }
            if let Ok(mut task) = flag.task.lock() {
                if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *task = Some(cx.waker().clone());
                }
            }
            match Pin::new(&mut dog).poll(&mut Context::from_waker(&dog_waker)) {
                Poll::Ready(()) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }
}

/// The watchdog's own waker: marks that the watchdog has something to look at, then wakes the
/// connection's task.
struct DogWake {
    fired: AtomicBool,
    task: Mutex<Option<std::task::Waker>>,
}

impl std::task::Wake for DogWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Relaxed);
        if let Ok(task) = self.task.lock() {
            if let Some(w) = task.as_ref() {
                w.wake_by_ref();
            }
        }
    }
}

/// Closes a connection past its deadline, or evicted to make room: completes then.
///
/// It looks at the connection only when its timer fires (every `tick`, the shortest of the
/// limits, or at a deadline sooner than that), and is polled only then (see [`DogWake`]);
/// its timer only ever moves later (cheap in tokio). A deadline is met within a few milliseconds:
/// `tick` is never longer than the time any state allows.
struct Watchdog {
    watch: Arc<Watch>,
    limits: Limits,
    tick: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    closed: oneshot::Receiver<()>,
}

impl Future for Watchdog {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        // Evicted (or, never in practice, the listener's registry gone).
        if Pin::new(&mut this.closed).poll(cx).is_ready() {
            return Poll::Ready(());
        }
        loop {
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = now_ms();
            let next = match this.watch.deadline(&this.limits) {
                Some(deadline) if deadline <= now => return Poll::Ready(()),
                Some(deadline) => deadline.min(now + this.tick.as_millis() as u64),
                None => now + this.tick.as_millis() as u64,
            };
            this.sleep.as_mut().reset(instant_at(next));
        }
    }
}

/// A connection's reports to its watchdog: the IO wrapper and the request guard.
#[derive(Clone)]
pub struct Tracker(Arc<Watch>);

impl Tracker {
    /// `io`, telling the watchdog when bytes arrive. Wrap the stream hyper reads (inside
    /// TLS, so that only request bytes count).
    pub fn io<S>(&self, io: S) -> Watched<S> {
        Watched {
            io,
            watch: self.0.clone(),
        }
    }

    /// Await a TLS handshake under `tls_handshake_timeout`; the first request head's time
    /// counts from its end.
    pub async fn handshake<F: Future>(&self, handshake: F) -> F::Output {
        self.0.wait(Wait::Handshake);
        let out = handshake.await;
        self.0.wait(Wait::FirstHead);
        out
    }

    /// A request has begun: in flight until the returned guard is dropped — give it to the
    /// response body ([`InFlight::body`]) so that it ends when the response has been sent.
    pub fn request<B>(&self, req: &http::Request<B>) -> InFlight {
        let w = &self.0;
        w.in_flight.fetch_add(1, Relaxed);
        if req.version() == http::Version::HTTP_2 && !w.h2.load(Relaxed) {
            w.h2.store(true, Relaxed);
        }
        InFlight(w.clone())
    }
}

/// A request in flight on its connection (see [`Tracker::request`]).
pub struct InFlight(Arc<Watch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Relaxed) == 1 {
            self.0.wait(Wait::Idle);
        }
    }
}

impl InFlight {
    /// The response, its request in flight until its body has been sent (or dropped).
    pub fn body<B>(self, res: http::Response<B>) -> http::Response<Tracked<B>> {
        res.map(|body| Tracked {
            body,
            _in_flight: self,
        })
    }
}

/// A response body that keeps its request in flight.
pub struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection's stream, telling its watchdog when bytes arrive.
pub struct Watched<S> {
    io: S,
    watch: Arc<Watch>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    #[inline]
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.watch.read();
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    #[inline]
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_packs_and_unpacks() {
        for wait in [Wait::Handshake, Wait::FirstHead, Wait::Idle, Wait::Head] {
            assert_eq!(unpack(pack(123_456, wait)), (123_456, wait));
        }
    }

    #[test]
    fn only_connection_level_accept_errors_are_skipped_without_a_pause() {
        for kind in [io::ErrorKind::ConnectionAborted, io::ErrorKind::ConnectionReset] {
            assert!(concerns_one_connection(&io::Error::from(kind)));
        }
        // EMFILE, ENFILE, ENOBUFS, ENOMEM (Linux numbers), and the unknown: back off.
        for errno in [24, 23, 105, 12] {
            assert!(!concerns_one_connection(&io::Error::from_raw_os_error(errno)));
        }
        assert!(!concerns_one_connection(&io::Error::other("unknown")));
    }

    #[test]
    fn a_burst_is_reported_once_with_its_count_later() {
        let b = Burst::default();
        assert_eq!(b.hit_at(1_000), Some(0));
        assert_eq!(b.hit_at(1_001), None);
        assert_eq!(b.hit_at(10_999), None);
        assert_eq!(b.hit_at(11_000), Some(2));
        assert_eq!(b.hit_at(11_001), None);
    }

    #[test]
    fn an_idle_http1_connection_that_sends_a_byte_is_reading_a_head_and_http2_is_not() {
        let limits = Limits {
            max_connections: 1,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            tls_handshake_timeout: Duration::from_secs(5),
        };
        let w = Watch::new();
        let since = unpack(w.state.load(Relaxed)).0;
        assert_eq!(w.deadline(&limits), Some(since + 10_000), "first head");
        w.read();
        assert_eq!(unpack(w.state.load(Relaxed)).1, Wait::FirstHead);
        w.in_flight.fetch_add(1, Relaxed);
        assert_eq!(w.deadline(&limits), None, "in flight");
        w.in_flight.fetch_sub(1, Relaxed);
        w.wait(Wait::Idle);
        let idle = unpack(w.state.load(Relaxed)).0;
        assert_eq!(w.deadline(&limits), Some(idle + 60_000), "keep-alive idle");
        w.read();
        assert_eq!(unpack(w.state.load(Relaxed)).1, Wait::Head);
        w.wait(Wait::Idle);
        w.h2.store(true, Relaxed);
        w.read();
        assert_eq!(
            unpack(w.state.load(Relaxed)).1,
            Wait::Idle,
            "HTTP/2 pings are not a head"
        );
    }
}
