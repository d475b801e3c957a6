//! One client connection: HTTP/1.1 through hyper, with tidegate's own deadlines for the
//! request head (total time from its first byte) and for idle keep-alive.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
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
}

impl ConnPhase {
    fn new() -> Self {
        // A new connection is waiting for its first head: the header deadline applies.
        Self {
            phase: AtomicU8::new(HEAD),
            since_ms: AtomicU64::new(now_ms()),
            requests: AtomicU64::new(0),
            first_ambiguous: AtomicU64::new(u64::MAX),
        }
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
        self.phase.store(IDLE, Ordering::Relaxed);
    }
    fn set_head(&self) {
        self.since_ms.store(now_ms(), Ordering::Relaxed);
        self.phase.store(HEAD, Ordering::Relaxed);
    }
}

/// Wraps the client stream; while no request is being served, reads fail with `TimedOut`
/// once the keep-alive idle time (no byte yet) or the header deadline (a head started) passed.
pub struct TimedIo {
    inner: ClientStream,
    framing: FramingScanner,
    phase: Arc<ConnPhase>,
    timeouts: ListenerTimeouts,
    sleep: Pin<Box<Sleep>>,
    armed_ms: u64,
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
        }
    }

    pub fn into_inner(self) -> ClientStream {
        self.inner
    }

    /// Sets the timer to `deadline` (ms, `now_ms`), `now` being `now_ms()`.
    fn arm(&mut self, deadline: u64, now: u64) {
        self.armed_ms = deadline;
        self.sleep.as_mut().reset((Instant::now() + Duration::from_millis(deadline - now)).into());
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let phase = this.phase.phase.load(Ordering::Relaxed);
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res
            && buf.filled().len() > before
        {
            this.framing.feed(&buf.filled()[before..]);
            if let Some(first) = this.framing.first_ambiguous {
                this.phase.first_ambiguous.fetch_min(first, Ordering::Relaxed);
            }
        }
        if phase == BUSY {
            return res;
        }
        match res {
            Poll::Ready(Ok(())) => {
                if phase == IDLE && buf.filled().len() > before {
                    this.phase.set_head();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let (limit, what) = if phase == IDLE {
                    (this.timeouts.keepalive_idle, "keep-alive idle timeout")
                } else {
                    (this.timeouts.header_read, "request header timeout")
                };
                let deadline = this.phase.since_ms.load(Ordering::Relaxed) + limit.as_millis() as u64;
                let now = now_ms();
                if now >= deadline {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
                }
                // Every request moves the deadline a little later; the timer is only moved
                // earlier (a head started), and a later deadline is checked when the armed
                // one fires. That saves a timer-wheel update per request.
                if this.armed_ms == 0 || deadline < this.armed_ms {
                    this.arm(deadline, now);
                }
                while this.sleep.as_mut().poll(cx).is_ready() {
                    let now = now_ms();
                    if now >= deadline {
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
                    }
                    this.arm(deadline, now);
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
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
    builder
        .timer(TokioTimer::new())
        // Backstop only: TimedIo enforces the real head and idle deadlines.
        .header_read_timeout(timeouts.header_read + timeouts.keepalive_idle)
        .max_buf_size(MAX_HEAD)
        .max_header_size(MAX_HEAD)
        .keep_alive(true);
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
