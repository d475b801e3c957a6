//! The response body tidegate sends a client: a local answer, or the backend's body streamed
//! frame by frame. The upstream body carries the backend's live-count guard, returns the
//! keep-alive connection to its pool once the body ended cleanly, and writes the access-log
//! line when it is dropped (end of stream, client gone, or error alike).
//!
//! Back-pressure: the next chunk is handed to hyper only once the previous ones reached the
//! client socket, so a client that stops reading stops tidegate reading the backend, and a
//! connection holds at most one chunk (at most `upstream::MAX_BUF`) of its response.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::access::AccessLog;
use crate::admin::metrics::UpstreamMetrics;
use crate::connection::ConnPhase;
use crate::runtime::ConnGuard;
use crate::upstream::{Sender, UploadEnd};

pub struct ProxyBody {
    kind: Kind,
    /// Tells the client connection it is idle again once this body is done.
    phase: Option<Arc<ConnPhase>>,
}

enum Kind {
    Local(Option<Bytes>),
    Upstream(Box<UpstreamBody>),
}

struct UpstreamBody {
    inner: Incoming,
    /// A first frame read before the head was answered (see `proxy::first_chunk`).
    first: Option<Frame<Bytes>>,
    /// The client connection's written-byte count when this response began.
    written_base: u64,
    /// The connection the body came on, returned to the pool at a clean end of stream.
    conn: Option<(Sender, usize)>,
    guard: ConnGuard,
    log: Option<AccessLog>,
    sent: u64,
    complete: bool,
    metrics: Arc<UpstreamMetrics>,
    /// The request body's progress, as the upstream connection reads it; an upload still
    /// unfinished when this body goes is cut.
    received: UploadEnd,
}

impl UpstreamBody {
    fn finish(&mut self) {
        self.complete = true;
        // The response is over: an upload still unfinished stops here, and that connection is
        // not reused (the server would read the rest of the body as a next request).
        self.received.0.cut();
        if let Some((sender, max_idle)) = self.conn.take()
            && !self.guard.backend().is_draining()
            && self.received.0.is_done()
        {
            self.guard.backend().pool.put(sender, max_idle);
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        self.metrics.bytes_out.inc_by(self.sent);
        self.metrics.bytes_in.inc_by(self.received.0.bytes.load(Ordering::Relaxed));
        if let Some(log) = self.log.take() {
            log.emit_response(self.sent, self.complete);
        }
    }
}

impl ProxyBody {
    pub fn local(bytes: impl Into<Bytes>, phase: Option<Arc<ConnPhase>>) -> Self {
        let b: Bytes = bytes.into();
        Self { kind: Kind::Local(if b.is_empty() { None } else { Some(b) }), phase }
    }

    pub fn upstream(
        (inner, first): (Incoming, Option<Frame<Bytes>>),
        conn: Option<(Sender, usize)>,
        guard: ConnGuard,
        log: Option<AccessLog>,
        phase: Option<Arc<ConnPhase>>,
        (metrics, received): (Arc<UpstreamMetrics>, UploadEnd),
    ) -> Self {
        let written_base = phase.as_ref().map_or(0, |p| p.written());
        let mut body = UpstreamBody { inner, first, written_base, conn, guard, log, sent: 0, complete: false, metrics, received };
        if body.first.is_none() && body.inner.is_end_stream() {
            body.finish();
        }
        Self { kind: Kind::Upstream(Box::new(body)), phase }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Some(phase) = self.phase.take() {
            phase.set_idle();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(u) => {
                if let Some(phase) = &this.phase
                    && !phase.written_up_to(u.written_base + u.sent)
                {
                    return Poll::Pending;
                }
                let res = match u.first.take() {
                    Some(frame) => Poll::Ready(Some(Ok(frame))),
                    None => Pin::new(&mut u.inner).poll_frame(cx),
                };
                match &res {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(d) = frame.data_ref() {
                            u.sent += d.len() as u64;
                        }
                        if u.inner.is_end_stream() {
                            u.finish();
                        }
                    }
                    Poll::Ready(None) => u.finish(),
                    Poll::Ready(Some(Err(_))) => u.conn = None,
                    Poll::Pending => {}
                }
                res
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Local(b) => b.is_none(),
            Kind::Upstream(u) => u.first.is_none() && u.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(u) => match &u.first {
                None => u.inner.size_hint(),
                // hyper frames the response by the head's Content-Length or chunked, not by this.
                Some(_) => SizeHint::default(),
            },
        }
    }
}
