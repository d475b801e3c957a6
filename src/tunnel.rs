//! The tunnel: bytes both ways between an upgraded client and its backend.
//!
//! Idle WebSockets are the common case, so a tunnel owns no copy buffer while idle: it waits
//! for readiness, reads into a per-thread scratch buffer, writes straight on, and allocates
//! only for the bytes a blocked writer did not take. Both directions' frame headers are
//! followed (headers only) so a close frame tidegate writes lands on a frame boundary.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::runtime::DrainPlan;
use crate::ws::{CLOSE_GOING_AWAY, FrameTracker, close_frame};

const SCRATCH_LEN: usize = 16 * 1024;
/// Reads per direction per poll before yielding to other tasks.
const BUDGET: usize = 16;
/// How long a closing tunnel may take to reach frame boundaries and hear the peer's close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_LEN].into_boxed_slice());
}

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both sides closed; the client's side ended first.
    ClientClosed,
    /// Both sides closed; the server's side ended first.
    ServerClosed,
    /// A read or write failed (reset, broken pipe).
    Error,
    /// No byte either way for `tunnel_idle`.
    Idle,
    /// tidegate closed it because its backend drained.
    Drain,
    /// tidegate closed it because it is shutting down.
    Shutdown,
}

impl TunnelEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelEnd::ClientClosed => "client_closed",
            TunnelEnd::ServerClosed => "server_closed",
            TunnelEnd::Error => "error",
            TunnelEnd::Idle => "idle_timeout",
            TunnelEnd::Drain => "drain",
            TunnelEnd::Shutdown => "shutdown",
        }
    }

    /// The metrics' close reason.
    pub fn reason(self) -> crate::admin::metrics::CloseReason {
        use crate::admin::metrics::CloseReason;
        match self {
            TunnelEnd::ClientClosed => CloseReason::Client,
            TunnelEnd::ServerClosed => CloseReason::Server,
            TunnelEnd::Error => CloseReason::Error,
            TunnelEnd::Idle => CloseReason::Idle,
            TunnelEnd::Drain => CloseReason::Drain,
            TunnelEnd::Shutdown => CloseReason::Shutdown,
        }
    }
}

/// Why and how tidegate closes a tunnel itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseBy {
    pub code: u16,
    /// Its backend drained (else: shutdown).
    pub drain: bool,
}

/// Bytes moved each way and how the tunnel ended.
#[derive(Debug, Clone, Copy)]
pub struct TunnelStats {
    pub client_to_server: u64,
    pub server_to_client: u64,
    pub end: TunnelEnd,
}

/// One direction of the relay.
#[derive(Debug, Default)]
struct Half {
    /// Bytes read but not yet written: allocated only while the writer is blocked.
    pending: Vec<u8>,
    pos: usize,
    eof: bool,
    shut: bool,
    close_queued: bool,
    frames: FrameTracker,
    bytes: u64,
    /// Bytes went to a writer that may buffer them (TLS does: rustls accepts up to 64 KiB
    /// and only sends it on flush) and it has not been flushed since.
    needs_flush: bool,
}

impl Half {
    fn with_initial(bytes: Vec<u8>, websocket: bool) -> Self {
        let mut h = Half::default();
        if !websocket {
            h.frames = FrameTracker::raw();
        }
        if !bytes.is_empty() {
            h.frames.advance(&bytes);
            h.bytes = bytes.len() as u64;
            h.pending = bytes;
        }
        h
    }

    fn done(&self) -> bool {
        self.shut && self.pending.is_empty()
    }

    /// Moves bytes from `r` to `w` until both would block. `Ready(Ok)` once this direction
    /// is finished (EOF passed on, or a close frame sent while `closing`).
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        closing: Option<(u16, Option<[u8; 4]>)>,
        active: &mut bool,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        for _ in 0..BUDGET {
            while self.pos < self.pending.len() {
                match w.as_mut().poll_write(cx, &self.pending[self.pos..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        self.pos += n;
                        self.needs_flush = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if !self.pending.is_empty() {
                self.pending = Vec::new();
                self.pos = 0;
            }
            if self.shut {
                return Poll::Ready(Ok(()));
            }
            if let Some((code, mask)) = closing
                && !self.close_queued
                && (self.frames.at_boundary() || self.frames.is_lost() || self.eof)
            {
                self.close_queued = true;
                if self.frames.at_boundary() && !self.eof {
                    self.pending = close_frame(code, mask);
                }
                self.eof = true;
                continue;
            }
            if self.eof {
                match w.as_mut().poll_shutdown(cx) {
                    Poll::Ready(_) => {
                        self.shut = true;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            let step = SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                let limit = match closing {
                    Some(_) => (self.frames.bytes_to_step() as usize).clamp(1, SCRATCH_LEN),
                    None => SCRATCH_LEN,
                };
                let mut buf = ReadBuf::new(&mut s[..limit]);
                match r.as_mut().poll_read(cx, &mut buf) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = buf.filled().len();
                        if n == 0 {
                            self.eof = true;
                            return Poll::Ready(Ok(()));
                        }
                        *active = true;
                        self.bytes += n as u64;
                        self.frames.advance(&s[..n]);
                        match w.as_mut().poll_write(cx, &s[..n]) {
                            Poll::Ready(Ok(m)) if m >= n => self.needs_flush = true,
                            Poll::Ready(Ok(m)) => {
                                self.needs_flush = true;
                                self.pending = s[m..n].to_vec();
                            }
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => self.pending = s[..n].to_vec(),
                        }
                        Poll::Ready(Ok(()))
                    }
                }
            });
            match step {
                Poll::Pending => {
                    // Nothing more to read now: push out whatever the writer holds back.
                    if self.needs_flush {
                        match w.as_mut().poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.needs_flush = false,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Reads and drops what the client still sends after our close frame, until its own close
/// frame has arrived (it then waits for us to close the TCP connection, RFC 6455 §7.1.1)
/// or it closed; so closing its socket does not reset it.
fn poll_discard<R: AsyncRead + ?Sized>(cx: &mut Context<'_>, mut r: Pin<&mut R>, frames: &mut FrameTracker, closes: u32) -> Poll<()> {
    loop {
        if frames.closes_seen() > closes || frames.is_lost() {
            return Poll::Ready(());
        }
        let res = SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let mut buf = ReadBuf::new(&mut s[..]);
            match r.as_mut().poll_read(cx, &mut buf) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    frames.advance(buf.filled());
                    Poll::Ready(false)
                }
                Poll::Ready(_) => Poll::Ready(true),
            }
        });
        match res {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(true) => return Poll::Ready(()),
            Poll::Ready(false) => {}
        }
    }
}

/// Resolves with the close code when tidegate must close this tunnel: at shutdown (after a
/// random delay within `shutdown_spread`, 1001), or when its backend drains (at
/// `since + drain_timeout` plus a random share of `drain_spread`, with the drain's code).
/// A drain that is called off before its time is forgotten.
///
/// The future comes boxed, on purpose: it holds three waits at once (cancellation, a timer,
/// the drain watch), several hundred bytes, and an unboxed future passed down through
/// `relay` is stored once per async layer it crosses (an async fn keeps its by-value
/// arguments for its whole life), which made it the largest part of an idle tunnel.
pub fn close_signal(
    shutdown: CancellationToken,
    drain: tokio::sync::watch::Receiver<Option<DrainPlan>>,
    shutdown_spread: Duration,
) -> Pin<Box<dyn Future<Output = CloseBy> + Send>> {
    Box::pin(wait_for_close(shutdown, drain, shutdown_spread))
}

async fn wait_for_close(
    shutdown: CancellationToken,
    mut drain: tokio::sync::watch::Receiver<Option<DrainPlan>>,
    shutdown_spread: Duration,
) -> CloseBy {
    let on_shutdown = CloseBy { code: CLOSE_GOING_AWAY, drain: false };
    loop {
        let plan = *drain.borrow_and_update();
        let at = plan.map(|p| p.since + p.timeout + jitter(p.spread));
        tokio::select! {
            _ = shutdown.cancelled() => {
                tokio::time::sleep(jitter(shutdown_spread)).await;
                return on_shutdown;
            }
            _ = async { tokio::time::sleep_until(at.expect("guarded").into()).await }, if at.is_some() => {
                return CloseBy { code: plan.map_or(CLOSE_GOING_AWAY, |p| p.close_code), drain: true };
            }
            changed = drain.changed() => {
                if changed.is_err() {
                    // The backend state is gone; only shutdown can close us now.
                    shutdown.cancelled().await;
                    return on_shutdown;
                }
            }
        }
    }
}

/// A uniformly random delay in `[0, spread)`.
fn jitter(spread: Duration) -> Duration {
    if spread.is_zero() {
        return Duration::ZERO;
    }
    let r = (rand_mask_u64() >> 11) as f64 / (1u64 << 53) as f64;
    spread.mul_f64(r)
}

/// 64 unpredictable bits (not for cryptographic keys): std's RandomState is keyed randomly
/// per thread and differently on every call.
fn rand_mask_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// The waker the close signal is polled with: it records that the signal woke the tunnel, so
/// the signal (a select over a cancellation token, a timer and a watch, each taking a lock
/// when polled) is polled only when it has something to say, not on every message relayed.
struct CloseWaker {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for CloseWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Relays until both sides close, an error, `idle` with no byte, or until `close` resolves.
/// `client_early`/`server_early` are bytes already read from each side (owned copies, so that
/// no read buffer of the HTTP layer stays alive with the tunnel).
/// Then, for a WebSocket, both sides get a close frame with its code, on a frame boundary;
/// plain TCP (`websocket = false`) is just closed.
#[allow(clippy::too_many_arguments)]
pub async fn relay<C, S>(
    mut client: C,
    client_early: Vec<u8>,
    mut server: S,
    server_early: Vec<u8>,
    idle: Duration,
    close: impl std::future::Future<Output = CloseBy>,
    websocket: bool,
) -> TunnelStats
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut c2s = Half::with_initial(client_early, websocket);
    let mut s2c = Half::with_initial(server_early, websocket);
    let mut last = Instant::now();
    let mut closing: Option<u16> = None;
    let mut closed_for_drain = false;
    // Which side ended first, for the close reason: for a WebSocket, whoever sent the first
    // close frame (after the close handshake the server closes TCP first, RFC 6455 §7.1.1);
    // otherwise whose stream ended first. `true`: the client.
    let mut first_eof: Option<bool> = None;
    let mut first_close: Option<bool> = None;
    // Client close frames seen when we started closing: one more means the client answered.
    let mut client_closes = 0;
    let mut idle_timer = pin!(tokio::time::sleep(idle));
    let mut close = pin!(close);
    // Polled once at the start (fired), then only when its own waker fired.
    let close_wake = Arc::new(CloseWaker { fired: AtomicBool::new(true), task: AtomicWaker::new() });
    let close_waker = Waker::from(close_wake.clone());

    let end = poll_fn(|cx| {
        loop {
            if closing.is_none() {
                close_wake.task.register(cx.waker());
            }
            if closing.is_none()
                && close_wake.fired.swap(false, Ordering::AcqRel)
                && let Poll::Ready(by) = close.as_mut().poll(&mut Context::from_waker(&close_waker))
            {
                closing = Some(by.code);
                closed_for_drain = by.drain;
                client_closes = c2s.frames.closes_seen();
                idle_timer.as_mut().reset((Instant::now() + CLOSE_GRACE).into());
            }
            let mut active = false;
            let a = c2s.poll(cx, Pin::new(&mut client), Pin::new(&mut server), closing.map(|c| (c, Some(rand_mask()))), &mut active);
            let b = s2c.poll(cx, Pin::new(&mut server), Pin::new(&mut client), closing.map(|c| (c, None)), &mut active);
            if active {
                last = Instant::now();
            }
            if first_eof.is_none() && (c2s.eof || s2c.eof) {
                first_eof = Some(c2s.eof);
            }
            if first_close.is_none() && closing.is_none() && (c2s.frames.closes_seen() > 0 || s2c.frames.closes_seen() > 0) {
                first_close = Some(c2s.frames.closes_seen() > 0);
            }
            if matches!(a, Poll::Ready(Err(_))) || matches!(b, Poll::Ready(Err(_))) {
                return Poll::Ready(TunnelEnd::Error);
            }
            if c2s.done() && s2c.done() {
                return Poll::Ready(match (closing, first_close.or(first_eof)) {
                    (Some(_), _) if closed_for_drain => TunnelEnd::Drain,
                    (Some(_), _) => TunnelEnd::Shutdown,
                    (None, Some(false)) => TunnelEnd::ServerClosed,
                    (None, _) => TunnelEnd::ClientClosed,
                });
            }
            if idle_timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if closing.is_some() {
                return Poll::Ready(if closed_for_drain { TunnelEnd::Drain } else { TunnelEnd::Shutdown });
            }
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return Poll::Ready(TunnelEnd::Idle);
            }
            idle_timer.as_mut().reset(deadline.into());
        }
    })
    .await;
    if matches!(end, TunnelEnd::Shutdown | TunnelEnd::Drain) {
        // The client answers our close frame with its own; read it so our close is clean.
        let frames = &mut c2s.frames;
        let _ = tokio::time::timeout(CLOSE_GRACE, poll_fn(|cx| poll_discard(cx, Pin::new(&mut client), frames, client_closes))).await;
    }
    TunnelStats { client_to_server: c2s.bytes, server_to_client: s2c.bytes, end }
}

/// A masking key for the close frames tidegate writes toward a server. RFC 6455 §5.3 wants
/// masking keys unpredictable (they protect intermediaries on the server side from crafted
/// bytes): each comes from a freshly keyed SipHash (std's RandomState: random keys per
/// thread, a new key per call).
fn rand_mask() -> [u8; 4] {
    (rand_mask_u64() as u32).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    /// A writer that, like a TLS stream, takes bytes into its own buffer and sends them on
    /// only when flushed (or when the buffer is full).
    struct Buffering {
        inner: DuplexStream,
        buf: Vec<u8>,
    }

    impl AsyncRead for Buffering {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, b)
        }
    }

    impl AsyncWrite for Buffering {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
            if self.buf.len() >= 64 * 1024 {
                std::task::ready!(self.as_mut().poll_flush(cx))?;
            }
            self.buf.extend_from_slice(b);
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            while !self.buf.is_empty() {
                let this = &mut *self;
                let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, &this.buf))?;
                this.buf.drain(..n);
            }
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            std::task::ready!(self.as_mut().poll_flush(cx))?;
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// The server sends some bytes and goes quiet: every byte must reach the client although
    /// the client's writer buffers (the relay flushes when it has nothing more to read).
    #[tokio::test]
    async fn bytes_held_by_a_buffering_writer_are_flushed_when_the_reader_goes_quiet() {
        let (client_side, mut client) = duplex(16 * 1024);
        let (server_side, mut server) = duplex(16 * 1024);
        let relay = tokio::spawn(relay(
            Buffering { inner: client_side, buf: Vec::new() },
            Vec::new(),
            server_side,
            Vec::new(),
            Duration::from_secs(60),
            std::future::pending::<CloseBy>(),
            false,
        ));
        let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        server.write_all(&payload).await.unwrap();
        let mut got = vec![0u8; payload.len()];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut got)).await.expect("every byte arrives").unwrap();
        assert_eq!(got, payload);
        drop((client, server));
        let _ = tokio::time::timeout(Duration::from_secs(5), relay).await;
    }
}
