//! One client connection: HTTP/1.1 through hyper, with tidegate's own deadlines for the
//! request head (total time from its first byte), for idle keep-alive and for response
//! writes that make no progress (a client that stopped reading).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::Shared;
use crate::config::ListenerTimeouts;
use crate::framing::FramingScanner;
use crate::runtime::now_ms;

/// Largest request head accepted (request line and headers); larger gets 431.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields accepted in one request; more gets 431.
pub const MAX_HEADERS: usize = 100;

pub use crate::stream::ClientStream;

const IDLE: u8 = 0;
const HEAD: u8 = 1;
const BUSY: u8 = 2;

/// Where a client connection is between requests, shared by the request handler (which knows
/// when a request starts and its response ends) and the I/O wrapper (which enforces deadlines).
#[derive(Debug)]
pub struct ConnPhase {
    phase: AtomicU8,
    since_ms: AtomicU64,
    /// Requests started on this connection.
    requests: AtomicU64,
    /// Ordinal of the first request whose raw head had both Content-Length and
    /// Transfer-Encoding (`u64::MAX`: none), published by the I/O wrapper's scanner.
    first_ambiguous: AtomicU64,
    /// Bytes written to the client socket so far.
    written: AtomicU64,
    /// A response body waits for earlier bytes to reach the socket (see [`Self::written_up_to`]).
    write_waiter: AtomicBool,
    /// The connection's task, while its read waits with no deadline (a request is served).
    read_waker: AtomicWaker,
}

impl ConnPhase {
    fn new() -> Self {
        // A new connection is waiting for its first head: the header deadline applies.
        Self {
            phase: AtomicU8::new(HEAD),
            since_ms: AtomicU64::new(now_ms()),
            requests: AtomicU64::new(0),
            first_ambiguous: AtomicU64::new(u64::MAX),
            written: AtomicU64::new(0),
            write_waiter: AtomicBool::new(false),
            read_waker: AtomicWaker::new(),
        }
    }
    /// Bytes written to the client so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }
    /// Whether `target` bytes have been written to the client. When not, the next write wakes
    /// the connection's task (which also polls the response body: both run in hyper's
    /// connection task), so the caller can return `Pending` and be polled again.
    pub fn written_up_to(&self, target: u64) -> bool {
        if self.written.load(Ordering::Acquire) >= target {
            return true;
        }
        self.write_waiter.store(true, Ordering::SeqCst);
        // A write may have landed between the load and the store.
        if self.written.load(Ordering::SeqCst) >= target {
            self.write_waiter.store(false, Ordering::Relaxed);
            return true;
        }
        false
    }
    /// A request starts; returns its ordinal on this connection.
    pub fn set_busy(&self) -> u64 {
        self.phase.store(BUSY, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed)
    }
    /// Whether request `ordinal` came with both Content-Length and Transfer-Encoding.
    pub fn is_ambiguous(&self, ordinal: u64) -> bool {
        ordinal >= self.first_ambiguous.load(Ordering::Relaxed)
    }
    pub fn set_idle(&self) {
        self.since_ms.store(now_ms(), Ordering::Relaxed);
        self.phase.store(IDLE, Ordering::Release);
        self.read_waker.wake();
    }
    fn set_head(&self) {
        self.since_ms.store(now_ms(), Ordering::Relaxed);
        self.phase.store(HEAD, Ordering::Relaxed);
    }
}

/// Wraps the client stream and enforces the connection's deadlines with one timer: while no
/// request is being served, reads fail with `TimedOut` once the keep-alive idle time (no byte
/// yet) or the header deadline (a head started) passed; a write that makes no progress for
/// the `send` timeout fails the same way. Counts bytes written for response back-pressure.
pub struct TimedIo {
    inner: ClientStream,
    framing: FramingScanner,
    phase: Arc<ConnPhase>,
    timeouts: ListenerTimeouts,
    sleep: Pin<Box<Sleep>>,
    armed_ms: u64,
    /// The last read returned `Pending`.
    read_waiting: bool,
    /// Since when writes have been blocked (0: they are not).
    write_blocked_ms: u64,
}

fn timed_out(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

impl TimedIo {
    fn new(inner: ClientStream, phase: Arc<ConnPhase>, timeouts: ListenerTimeouts) -> Self {
        Self {
            inner,
            framing: FramingScanner::default(),
            phase,
            timeouts,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed_ms: 0,
            read_waiting: false,
            write_blocked_ms: 0,
        }
    }

    pub fn into_inner(self) -> ClientStream {
        self.inner
    }

    /// The earliest deadline in force (in `now_ms` time), and what it is for.
    fn next_deadline(&self) -> Option<(u64, &'static str)> {
        let mut next = None;
        if self.read_waiting {
            let phase = self.phase.phase.load(Ordering::Relaxed);
            if phase != BUSY {
                let (limit, what) = if phase == IDLE {
                    (self.timeouts.keepalive_idle, "keep-alive idle timeout")
                } else {
                    (self.timeouts.header_read, "request header timeout")
                };
                next = Some((self.phase.since_ms.load(Ordering::Relaxed) + limit.as_millis() as u64, what));
            }
        }
        if self.write_blocked_ms != 0 {
            let at = self.write_blocked_ms + self.timeouts.send.as_millis() as u64;
            if next.is_none_or(|(d, _)| at < d) {
                next = Some((at, "response send timeout"));
            }
        }
        next
    }

    /// Arms the timer for the earliest deadline; `Ready` with the error once one has passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some((deadline, what)) = self.next_deadline() else { return Poll::Pending };
        let now = now_ms();
        if now >= deadline {
            return Poll::Ready(timed_out(what));
        }
        // Every response moves the keep-alive deadline a little later: the timer is only
        // moved earlier, and a later deadline is re-armed when the armed one fires. That
        // saves a timer-wheel update per request.
        if self.armed_ms == 0 || deadline < self.armed_ms {
            self.arm(deadline, now);
        }
        while self.sleep.as_mut().poll(cx).is_ready() {
            let now = now_ms();
            if now >= deadline {
                return Poll::Ready(timed_out(what));
            }
            self.arm(deadline, now);
        }
        Poll::Pending
    }

    /// Sets the timer to `deadline` (ms, `now_ms`), `now` being `now_ms()`.
    fn arm(&mut self, deadline: u64, now: u64) {
        self.armed_ms = deadline;
        self.sleep.as_mut().reset((Instant::now() + Duration::from_millis(deadline - now)).into());
    }

    /// Bookkeeping after a write, flush or shutdown: completion resets the send deadline and wakes a response body
    /// waiting for it; no progress starts (or checks) the send deadline.
    fn wrote<T>(&mut self, cx: &mut Context<'_>, res: Poll<io::Result<T>>, n: impl Fn(&T) -> usize) -> Poll<io::Result<T>> {
        match res {
            Poll::Ready(Ok(v)) => {
                self.write_blocked_ms = 0;
                let n = n(&v);
                if n > 0 {
                    self.phase.written.fetch_add(n as u64, Ordering::Release);
                    if self.phase.write_waiter.swap(false, Ordering::SeqCst) {
                        cx.waker().wake_by_ref();
                    }
                }
                Poll::Ready(Ok(v))
            }
            Poll::Pending => {
                if self.write_blocked_ms == 0 {
                    self.write_blocked_ms = now_ms().max(1);
                }
                match self.poll_deadline(cx) {
                    Poll::Ready(e) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(res) => {
                this.read_waiting = false;
                let got = buf.filled().len() - before;
                if got > 0 {
                    this.framing.feed(&buf.filled()[before..]);
                    if let Some(first) = this.framing.first_ambiguous {
                        this.phase.first_ambiguous.fetch_min(first, Ordering::Relaxed);
                    }
                    if this.phase.phase.load(Ordering::Relaxed) == IDLE {
                        this.phase.set_head();
                    }
                }
                Poll::Ready(res)
            }
            Poll::Pending => {
                this.read_waiting = true;
                if this.phase.phase.load(Ordering::Relaxed) == BUSY {
                    // No read deadline while a request is served; `set_idle` wakes us to arm
                    // the keep-alive one (hyper does not read again by itself).
                    this.phase.read_waker.register(cx.waker());
                }
                match this.poll_deadline(cx) {
                    Poll::Ready(e) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(cx, res, |n| *n)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_flush(cx);
        this.wrote(cx, res, |_| 0)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.wrote(cx, res, |_| 0)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(cx, res, |n| *n)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The type hyper's upgrade hands back, to be unwrapped into the raw client stream.
pub type UpgradedIo = TokioIo<TimedIo>;

/// What the request handler knows about its connection.
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    /// Index of the listener in the snapshot of `generation`; after a reload, found by key.
    pub listener: usize,
    pub listener_key: Arc<str>,
    pub generation: u64,
    /// The client: the socket's peer, or the address from a trusted PROXY header.
    pub peer: SocketAddr,
    /// The address the client connected to (for PROXY headers sent upstream).
    pub local: SocketAddr,
    pub timeouts: ListenerTimeouts,
    pub tls: bool,
    pub phase: Arc<ConnPhase>,
    /// `peer` as an `X-Forwarded-For` entry (`proxy::forwarded_for`).
    pub forwarded_for: hyper::header::HeaderValue,
}

/// What a listener hands each accepted connection.
#[derive(Clone)]
pub struct ListenerSetup {
    pub index: usize,
    /// `listener::listener_key`: finds this listener again in a newer snapshot.
    pub key: Arc<str>,
    pub timeouts: ListenerTimeouts,
    pub tls: Option<(tokio_rustls::TlsAcceptor, Duration)>,
    pub mode: crate::config::ListenerMode,
    /// Read a PROXY header first, from these peers only.
    pub accept_proxy: bool,
    pub trusted: Arc<[crate::config::Cidr]>,
    pub metrics: Arc<crate::admin::metrics::ListenerMetrics>,
    pub max_connections: u32,
    pub max_connections_per_client: u32,
}

/// With `accept_proxy`: the client address from the PROXY header, read within the header
/// deadline from a trusted peer. `Err` means the connection must be closed.
pub async fn proxied_client(stream: &mut TcpStream, peer: SocketAddr, setup: &ListenerSetup) -> Result<SocketAddr, String> {
    if !setup.accept_proxy {
        return Ok(peer);
    }
    let ip = peer.ip().to_canonical();
    if !setup.trusted.iter().any(|c| c.contains(ip)) {
        return Err(format!("PROXY header from {peer}, which is not in trusted_proxies"));
    }
    match tokio::time::timeout(setup.timeouts.header_read, crate::proxy_protocol::read_header(stream)).await {
        Ok(Ok(crate::proxy_protocol::Header::Proxied { source, .. })) => Ok(source),
        Ok(Ok(_)) => Ok(peer),
        Ok(Err(e)) => Err(format!("bad PROXY header from {peer}: {e}")),
        Err(_) => Err(format!("no PROXY header from {peer} within {:?}", setup.timeouts.header_read)),
    }
}

/// Serves one accepted client connection until it closes or shutdown finishes it.
pub async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    setup: ListenerSetup,
    generation: u64,
    listener_stop: tokio_util::sync::CancellationToken,
    shared: Arc<Shared>,
) {
    let peer = match proxied_client(&mut stream, peer, &setup).await {
        Ok(p) => p,
        Err(e) => return tracing::debug!("{e}; connection closed"),
    };
    let local = stream.local_addr().unwrap_or(peer);
    let _open = crate::admin::metrics::GaugeGuard::new(&setup.metrics.open);
    let lm = setup.metrics.clone();
    let ListenerSetup { index: listener, key: listener_key, timeouts, tls, .. } = setup;
    let phase = Arc::new(ConnPhase::new());
    let stream = match tls {
        None => ClientStream::Tcp(stream),
        Some((acceptor, deadline)) => match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
            Ok(Ok(s)) => {
                lm.tls_ok.inc();
                ClientStream::Tls(Box::new(s))
            }
            Ok(Err(e)) => {
                lm.tls_failed.inc();
                return tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
            }
            Err(_) => {
                lm.tls_failed.inc();
                return tracing::debug!(peer = %peer, "TLS handshake timed out");
            }
        },
    };
    let is_tls = matches!(stream, ClientStream::Tls(_));
    let io = TimedIo::new(stream, phase.clone(), timeouts);
    let shutdown = shared.shutdown.clone();
    let forwarded_for = crate::proxy::forwarded_for(peer.ip());
    let cx = Arc::new(ConnCtx { shared, listener, listener_key, generation, peer, local, timeouts, tls: is_tls, phase, forwarded_for });
    let service = service_fn(move |req| {
        let cx = cx.clone();
        async move { Ok::<_, Infallible>(crate::proxy::handle(req, cx).await) }
    });
    let mut builder = http1::Builder::new();
    // No hyper timer: TimedIo enforces the head, keep-alive and send deadlines with one timer
    // per connection; hyper's header_read_timeout would add a boxed timer and a timer-wheel
    // insert and removal per request.
    builder.header_read_timeout(None).max_buf_size(MAX_HEAD).max_header_size(MAX_HEAD).keep_alive(true);
    // MAX_HEADERS is hyper's default limit, so it is left at the default rather than set:
    // an explicit `max_headers` makes hyper build two 100-slot header arrays element by
    // element for every request head (about 1,700 instructions a request), the default uses
    // them uninitialised on the stack. The limit is the same (tests/http.rs checks 431).
    const _: () = assert!(MAX_HEADERS == 100, "set http1::Builder::max_headers when MAX_HEADERS is not hyper's default");
    let conn = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    let mut conn = pin!(conn);
    // Shutdown, or a reload that removed this listener: finish the request in flight, then
    // close (idle keep-alive connections close at once).
    let res = tokio::select! {
        res = conn.as_mut() => res,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        _ = listener_stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        tracing::debug!(peer = %peer, error = %e, "client connection ended with error");
    }
}
