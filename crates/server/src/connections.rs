//! The gRPC listener's connections, bounded: at most `max_connections` at once, each closed once
//! it has been idle (no request in flight) for `idle_timeout`, or when it has not finished its
//! handshake (TLS, then the HTTP/2 preface or a first HTTP/1.1 request) within `handshake_timeout`. When every place is taken,
//! a new connection takes the place of the connection idle the longest, so a crowd of idle or
//! half-open connections cannot lock out health probes and real clients; when none is idle, the
//! new one is refused and the refusal logged.
//!
//! Written here because tonic and hyper bound none of this: tonic's `max_connection_age` closes
//! busy connections too, and nothing caps how many are accepted. The pieces are [`incoming`]
//! (the accept loop, TLS included, yielding [`Connection`]s to tonic), [`Connection`] (the stream,
//! which reads end-of-file once its connection is to close), and [`CountRequests`] (the tower
//! layer that tells a connection when it has requests in flight).

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::{Instant, Sleep},
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::{throttle::LogThrottle, tls::TlsAcceptor};

/// What bounds the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// The TLS handshake and the HTTP/2 preface (or a first HTTP/1.1 request) must be done
    /// within this.
    pub handshake_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1000,
            idle_timeout: Duration::from_secs(300),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The client's HTTP/2 preface (24 bytes) and the header of its first SETTINGS frame (9): read
/// them and the HTTP/2 handshake is under way.
const HANDSHAKE_BYTES: u64 = 24 + 9;

/// One connection's state, shared by its stream, its requests and the registry.
#[derive(Debug)]
pub struct ConnectionState {
    id: u64,
    /// Requests whose response has not ended (a stream open).
    in_flight: AtomicUsize,
    /// Set by the first request: an HTTP/1.1 request may be shorter than the HTTP/2 handshake.
    requested: AtomicBool,
    /// When the last request ended, or the connection opened.
    idle_since: Mutex<Instant>,
    /// Cancelled to close the connection: its stream then reads end-of-file.
    close: CancellationToken,
}

impl ConnectionState {
    fn idle_since(&self) -> Option<Instant> {
        (self.in_flight.load(Ordering::SeqCst) == 0).then(|| *lock(&self.idle_since))
    }
}

/// Every open connection, and the counts the metrics and logs show.
#[derive(Debug, Default)]
pub struct Registry {
    open: Mutex<HashMap<u64, Arc<ConnectionState>>>,
    next_id: AtomicU64,
    /// A flood of connections logs the cap once every [`LOG_EVERY`], not once each.
    cap_log: LogThrottle,
}

/// How often the connection cap, and `accept` failing, are logged at most.
const LOG_EVERY: Duration = Duration::from_secs(10);

impl Registry {
    /// A place for a new connection: a free one, or the place of the connection idle the
    /// longest (closed now). `None` when every place is held by a connection with requests in
    /// flight.
    fn admit(&self, max: usize) -> Option<Arc<ConnectionState>> {
        let mut open = lock(&self.open);
        if open.len() >= max {
            let longest_idle = open.values().filter_map(|c| Some((c.idle_since()?, c.id))).min().map(|(_, id)| id);
            let victim = open.remove(&longest_idle?)?;
            victim.close.cancel();
            tracing::info!(
                open = open.len() + 1,
                max,
                "connection limit reached: closing the connection idle the longest"
            );
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnectionState {
            id,
            in_flight: AtomicUsize::new(0),
            requested: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            close: CancellationToken::new(),
        });
        open.insert(id, state.clone());
        crate::metrics::set_open_connections(open.len());
        Some(state)
    }

    fn remove(&self, id: u64) {
        let mut open = lock(&self.open);
        open.remove(&id);
        crate::metrics::set_open_connections(open.len());
    }

    /// Whether to log the cap now (not within [`LOG_EVERY`] of the last time).
    fn log_now(&self) -> bool {
        self.cap_log.allow(LOG_EVERY)
    }

    /// How many connections are open.
    pub fn open(&self) -> usize {
        lock(&self.open).len()
    }
}

/// Accepts connections on `listener` until `stop`, within `limits`, each through TLS when
/// `tls` is given; handshakes run concurrently, so a slow one holds up no other.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    registry: Arc<Registry>,
    stop: CancellationToken,
) -> ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let accept_log = LogThrottle::default();
        loop {
            let (socket, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, or the peer gave up before accept: wait a
                        // little rather than spin, and go on (logged once every LOG_EVERY).
                        if accept_log.allow(LOG_EVERY) {
                            tracing::warn!(error = %e, "accepting a connection failed");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = stop.cancelled() => return,
            };
            let Some(state) = registry.admit(limits.max_connections) else {
                metrics::counter!("model_loader_connections_refused_total").increment(1);
                if !registry.log_now() {
                    continue;
                }
                tracing::warn!(
                    %peer,
                    max = limits.max_connections,
                    "connection limit reached and no connection is idle: refusing a connection"
                );
                continue;
            };
            // TCP_NODELAY: progress messages and stream ends are small writes; with Nagle's
            // algorithm each could wait ~40 ms for the client's delayed ACK.
            let _ = socket.set_nodelay(true);
            let guard = Guard { registry: registry.clone(), state: state.clone() };
            let (tx, tls) = (tx.clone(), tls.clone());
            tokio::spawn(async move {
                let stream = match tls {
                    None => Stream::Plain(socket),
                    Some(tls) => {
                        let handshake = tokio::time::timeout(limits.handshake_timeout, tls.accept(socket));
                        match tokio::select! { done = handshake => done, () = state.close.cancelled() => return } {
                            Ok(Ok(stream)) => Stream::Tls(Box::new(stream)),
                            Ok(Err(e)) => return tracing::info!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => return tracing::info!(%peer, "TLS handshake timed out"),
                        }
                    }
                };
                let connection = Connection::new(stream, peer, guard, limits);
                let _ = tx.send(Ok(connection)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Takes the connection out of the registry when its stream is dropped.
#[derive(Debug)]
struct Guard {
    registry: Arc<Registry>,
    state: Arc<ConnectionState>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.registry.remove(self.state.id);
    }
}

#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One accepted connection as tonic reads and writes it. It reads end-of-file (and hyper closes
/// it) once it is to close: evicted, idle past the timeout, or its handshake unfinished.
pub struct Connection {
    stream: Stream,
    info: ConnectionInfo,
    guard: Guard,
    limits: ConnectionLimits,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    /// When to look again whether the connection is idle past the timeout (or its handshake
    /// late).
    check: Pin<Box<Sleep>>,
    read: u64,
}

impl Connection {
    fn new(stream: Stream, peer: SocketAddr, guard: Guard, limits: ConnectionLimits) -> Self {
        let info = ConnectionInfo { peer, state: guard.state.clone() };
        let closed = Box::pin(guard.state.close.clone().cancelled_owned());
        let check = Box::pin(tokio::time::sleep(limits.handshake_timeout.min(limits.idle_timeout)));
        Self { stream, info, guard, limits, closed, check, read: 0 }
    }

    /// Whether the connection is to close now; if not, the check is set for when it might be.
    fn poll_due(&mut self, cx: &mut Context<'_>) -> bool {
        if self.closed.as_mut().poll(cx).is_ready() {
            return true;
        }
        while self.check.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let handshaken = self.read >= HANDSHAKE_BYTES || self.guard.state.requested.load(Ordering::SeqCst);
            let next = if !handshaken {
                tracing::info!(peer = %self.info.peer, "closing a connection that did not finish its handshake");
                None
            } else {
                match self.guard.state.idle_since() {
                    Some(since) if now >= since + self.limits.idle_timeout => {
                        tracing::debug!(peer = %self.info.peer, "closing an idle connection");
                        None
                    }
                    Some(since) => Some(since + self.limits.idle_timeout),
                    // Busy: look again a timeout from now (the last request's end resets it).
                    None => Some(now + self.limits.idle_timeout),
                }
            };
            let Some(next) = next else {
                self.guard.state.close.cancel();
                return true;
            };
            self.check.as_mut().reset(next);
        }
        false
    }
}

impl AsyncRead for Connection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.poll_due(cx) {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match &mut this.stream {
            Stream::Plain(s) => ready!(Pin::new(s).poll_read(cx, buf))?,
            Stream::Tls(s) => ready!(Pin::new(s.as_mut()).poll_read(cx, buf))?,
        }
        this.read += (buf.filled().len() - before) as u64;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, data),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What tonic puts in every request's extensions: the peer and the connection's state.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub peer: SocketAddr,
    state: Arc<ConnectionState>,
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

/// The tower layer that counts each connection's requests in flight, from the request to the
/// end of its response body (a stream's last message), so idle means no stream open.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountRequests;

impl<S> tower::Layer<S> for CountRequests {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted(inner)
    }
}

/// A service whose requests [`CountRequests`] counts.
#[derive(Debug, Clone)]
pub struct Counted<S>(S);

impl<S, B, R> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<InFlight<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let held = request.extensions().get::<ConnectionInfo>().map(|info| RequestHeld::new(info.state.clone()));
        let response = self.0.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| InFlight { body, _held: held }))
        })
    }
}

/// A request in flight on its connection, until dropped.
#[derive(Debug)]
struct RequestHeld(Arc<ConnectionState>);

impl RequestHeld {
    fn new(state: Arc<ConnectionState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        state.requested.store(true, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for RequestHeld {
    fn drop(&mut self) {
        *lock(&self.0.idle_since) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that holds its request in flight until it is dropped.
#[derive(Debug)]
pub struct InFlight<B> {
    body: B,
    _held: Option<RequestHeld>,
}

impl<B: http_body::Body + Unpin> http_body::Body for InFlight<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A poisoned lock's data is still consistent here: each update under it is one assignment,
/// insert or remove.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
