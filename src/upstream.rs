//! Connections to backends: connect with a deadline, a bounded keep-alive pool per backend,
//! and sending one request with the response-header deadline.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::UpstreamTls;

use crate::error::ProxyError;

/// One HTTP/1.1 connection to a backend: hyper's request sender, and whether the connection
/// ended on an error (bad framing, or bytes after the end of a response). Such a connection
/// is never reused, and a response that turns out to have been followed by stray bytes is
/// answered 502.
#[derive(Debug)]
pub struct Sender {
    inner: http1::SendRequest<ReqBody>,
    broken: Arc<AtomicBool>,
}

impl Sender {
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Waits until the connection is idle and could carry another request; `false` when it
    /// closed instead. Only for a connection whose last request and response are complete.
    pub async fn settled(&mut self) -> bool {
        self.inner.ready().await.is_ok()
    }

    /// The connection ended on a protocol error (hyper saw bytes it could not frame).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }
}

/// Largest response head, and largest body chunk read at once from a backend: what one
/// response can hold in memory while the client is slow to read it.
pub const MAX_BUF: usize = 64 * 1024;

/// Pooled connections idle longer than this are dropped rather than reused (nginx's
/// `keepalive_timeout` default for upstreams is 60s).
const POOL_IDLE: Duration = Duration::from_secs(60);

/// Idle keep-alive connections to one backend.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Vec<(Sender, Instant)>>,
}

impl Pool {
    /// The most recently used open connection, if any.
    pub fn take(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((s, since)) = idle.pop() {
            if !s.is_closed() && since.elapsed() < POOL_IDLE {
                return Some(s);
            }
        }
        None
    }

    pub fn put(&self, s: Sender, max_idle: usize) {
        if max_idle == 0 || s.is_closed() || s.is_broken() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() >= max_idle {
            idle.remove(0);
        }
        idle.push((s, Instant::now()));
    }

    /// Drops every idle connection (the backend is draining).
    pub fn clear(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn len(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub use crate::stream::UpstreamStream;

/// The type hyper's client upgrade hands back.
pub type UpgradedUpstream = TokioIo<UpstreamStream>;

/// Opens a new HTTP/1.1 connection to `addr` (TLS when `tls` is set), all within `timeout`.
/// The connection task is spawned; upgrades are on so a `101` hands the socket to the tunnel.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&UpstreamTls>,
    preamble: Option<&[u8]>,
) -> Result<Sender, ProxyError> {
    let stream = connect_stream(addr, timeout, tls, preamble).await?;
    let (inner, conn) = http1::Builder::new()
        .max_buf_size(MAX_BUF)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ProxyError::Handshake { addr, source })?;
    let broken = Arc::new(AtomicBool::new(false));
    let flag = broken.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            flag.store(true, Ordering::Relaxed);
            tracing::debug!(backend = %addr, error = %e, "upstream connection ended with error");
        }
    });
    Ok(Sender { inner, broken })
}

/// A TCP connection to `addr` within `timeout`: `preamble` (a PROXY protocol header) is
/// written first, then the upstream's TLS is set up on top when configured.
pub async fn connect_stream(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&UpstreamTls>,
    preamble: Option<&[u8]>,
) -> Result<UpstreamStream, ProxyError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(ProxyError::Connect { addr, source }),
        Err(_) => return Err(ProxyError::ConnectTimeout { addr }),
    };
    let _ = stream.set_nodelay(true);
    let mut stream = stream;
    if let Some(p) = preamble {
        use tokio::io::AsyncWriteExt;
        match tokio::time::timeout_at(deadline, stream.write_all(p)).await {
            Ok(Ok(())) => {}
            Ok(Err(source)) => return Err(ProxyError::Connect { addr, source }),
            Err(_) => return Err(ProxyError::ConnectTimeout { addr }),
        }
    }
    let stream = match tls {
        None => UpstreamStream::Tcp(stream),
        Some(t) => {
            let connector = tokio_rustls::TlsConnector::from(t.client.clone());
            let name = crate::tls::server_name(t.sni.as_deref(), addr);
            match tokio::time::timeout_at(deadline, connector.connect(name, stream)).await {
                Ok(Ok(s)) => UpstreamStream::Tls(Box::new(s)),
                Ok(Err(source)) => return Err(ProxyError::UpstreamTls { addr, source }),
                Err(_) => return Err(ProxyError::ConnectTimeout { addr }),
            }
        }
    };
    Ok(stream)
}

/// Sends `req` on `sender`; when the pooled connection turned out to be dead before the
/// request left, the request comes back in `Err(Ok(req))` so it can go on a fresh one.
pub async fn send(
    sender: &mut Sender,
    req: Request<ReqBody>,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Response<Incoming>, Result<Request<ReqBody>, ProxyError>> {
    // One timer for the whole exchange (it is registered only if the response head is not
    // there at the first poll).
    let exchange = async {
        if sender.inner.ready().await.is_err() {
            return Err(Ok(req));
        }
        match sender.inner.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                Some(req) => Err(Ok(req)),
                None => Err(Err(ProxyError::Upstream { addr, source: e.into_error() })),
            },
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(Err(ProxyError::ResponseTimeout { addr })),
    }
}

/// How far a request body got: bytes, whether it ended, whether it was cut for being too
/// slow or for being malformed, and whether the upload may go on.
#[derive(Debug, Default)]
pub struct ReqProgress {
    pub bytes: AtomicU64,
    pub done: AtomicBool,
    pub too_slow: AtomicBool,
    /// The client's body was malformed or cut off (its fault: a 400, not a 502).
    pub client_error: AtomicBool,
    /// The exchange ended before the body was sent whole: the upload fails.
    cut: AtomicBool,
    /// The upload, woken when it is cut.
    waker: AtomicWaker,
}

impl ReqProgress {
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Relaxed)
    }

    /// The response is over (or abandoned) while the request body is not: nothing more of it
    /// goes to the server, which would read it as a next request; the upload fails, which
    /// closes that connection. While a response still streams, the upload goes on (a server
    /// may stream both ways, an echo say).
    pub fn cut(&self) {
        if !self.is_done() {
            self.cut.store(true, Ordering::Release);
            self.waker.wake();
        }
    }
}

/// Cuts an unfinished upload when dropped (with the response body, or on an early error).
#[derive(Debug)]
pub struct UploadEnd(pub Arc<ReqProgress>);

impl Drop for UploadEnd {
    fn drop(&mut self) {
        self.0.cut();
    }
}

/// The server's answer ended before the request body was sent whole.
#[derive(Debug, thiserror::Error)]
#[error("the server's answer ended before the request body was sent whole; the rest is not sent")]
pub struct AnsweredEarly;

/// A request body too slow for `body_min_rate`.
#[derive(Debug, thiserror::Error)]
#[error("request body too slow: under {min_rate} bytes/s over {window:?}")]
pub struct BodyTooSlow {
    pub min_rate: u64,
    pub window: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body sent upstream: the client's body, streamed, counted, and cut when it
/// advances by less than `min_rate` bytes per second over a `window` (a trickling client
/// must not hold a connection to the server forever).
#[derive(Debug)]
pub struct ReqBody {
    inner: Option<Incoming>,
    progress: Arc<ReqProgress>,
    window: Duration,
    min_rate: u64,
    /// Bytes at the start of the current window, and its deadline.
    window_start_bytes: u64,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl ReqBody {
    pub fn new(inner: Incoming, progress: Arc<ReqProgress>, window: Duration, min_rate: u64) -> Self {
        let done = inner.is_end_stream();
        progress.done.store(done, Ordering::Relaxed);
        Self { inner: Some(inner), progress, window, min_rate, window_start_bytes: 0, timer: None }
    }

    pub fn empty() -> Self {
        let progress = Arc::new(ReqProgress::default());
        progress.done.store(true, Ordering::Relaxed);
        Self { inner: None, progress, window: Duration::from_secs(30), min_rate: 0, window_start_bytes: 0, timer: None }
    }

    /// Checks the rate when the window ends; `Err` when the body is too slow.
    fn poll_window(&mut self, cx: &mut Context<'_>) -> Result<(), BodyTooSlow> {
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(self.window)));
        while timer.as_mut().poll(cx).is_ready() {
            let now = self.progress.bytes.load(Ordering::Relaxed);
            let needed = (self.min_rate.saturating_mul(self.window.as_secs().max(1))).max(1);
            if now - self.window_start_bytes < needed {
                self.progress.too_slow.store(true, Ordering::Relaxed);
                return Err(BodyTooSlow { min_rate: self.min_rate, window: self.window });
            }
            self.window_start_bytes = now;
            timer.as_mut().reset(tokio::time::Instant::now() + self.window);
        }
        Ok(())
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        this.progress.waker.register(cx.waker());
        if this.progress.cut.load(Ordering::Acquire) {
            return Poll::Ready(Some(Err(Box::new(AnsweredEarly))));
        }
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.progress.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                // Trailers are always the last frame.
                if frame.is_trailers() || this.inner.as_ref().is_some_and(Body::is_end_stream) {
                    this.progress.done.store(true, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.progress.client_error.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                this.progress.done.store(true, Ordering::Relaxed);
                Poll::Ready(None)
            }
            Poll::Pending => match this.poll_window(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
