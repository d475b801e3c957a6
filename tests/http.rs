//! HTTP/1.1 reverse-proxy behaviour over real sockets: streaming, keep-alive on both sides,
//! header rewriting, strict framing, local errors, client timeouts, balancing, failover,
//! backups, max_conns, live counts and h2c upgrade refusal.

mod support;
use support::{RawResponse as Resp, find, parse_response};

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, broadcast, mpsc};
use tokio::task::{JoinHandle, JoinSet};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type RespBody = BoxBody<Bytes, BoxError>;

/// Upper bound for anything that should happen "now".
const WAIT: Duration = Duration::from_secs(5);

async fn within<T>(what: &str, limit: Duration, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| panic!("{what}: did not happen within {limit:?}"))
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// One listener (extra keys in `listener`, extra route keys in `route`) routing to upstream
/// `app` with `servers`; `upstream` holds extra keys of `[upstream.app]` (before `servers`).
fn config(listener: &str, route: &str, servers: &[String], upstream: &str) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("  {{ {s} }},")).collect();
    format!(
        r#"shutdown_timeout = "2s"

[[listener]]
name = "test"
bind = "127.0.0.1:0"
{listener}

  [[listener.route]]
  {route}
  upstream = "app"

[upstream.app]
{upstream}
servers = [
{}
]
"#,
        servers.join("\n")
    )
}

fn srv(addr: SocketAddr) -> String {
    format!(r#"addr = "{addr}""#)
}

fn plain(servers: &[String]) -> String {
    config("", "", servers, "")
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

/// A body fed through a channel: each message is one data frame; ends when the sender drops.
struct ChanBody(mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn text(s: impl Into<Bytes>) -> Response<RespBody> {
    Response::new(Full::new(s.into()).map_err(|never| match never {}).boxed())
}

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct SeenReq {
    method: String,
    path: String,
    headers: HeaderMap,
}

impl SeenReq {
    /// Every value of header `name`, in order.
    fn values(&self, name: &str) -> Vec<String> {
        self.headers.get_all(name).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect()
    }
}

/// Signals between a test and its recording backends.
struct Ctl {
    /// `/slow` waits for one permit of this.
    gate: Semaphore,
    /// `/slow` and `/hang` add one permit here when they arrive...
    arrivals: Semaphore,
    /// ...and announce their path and query here.
    arrived: broadcast::Sender<String>,
}

impl Ctl {
    fn new() -> Arc<Ctl> {
        Arc::new(Ctl { gate: Semaphore::new(0), arrivals: Semaphore::new(0), arrived: broadcast::channel(1024).0 })
    }

    async fn arrival(&self) {
        within("a request arrives at the backend", WAIT, self.arrivals.acquire()).await.expect("semaphore open").forget();
    }
}

/// A hyper backend that records every request and counts accepted TCP connections.
///
/// - `/slow`: signals arrival, waits for `ctl.gate`, answers `slow from NAME`.
/// - `/hang`: signals arrival, never answers.
/// - `/drip`: answers 200 with one chunk `first\n`, then never ends the body.
/// - `/hop`: answers with hop-by-hop response headers.
/// - `POST`: echoes the body, streamed.
/// - anything else: `hello from NAME`.
///
/// Every response carries `x-backend: NAME`.
struct Rec {
    name: &'static str,
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    reqs: Arc<Mutex<Vec<SeenReq>>>,
    task: JoinHandle<()>,
}

impl Rec {
    fn reqs(&self) -> Vec<SeenReq> {
        self.reqs.lock().unwrap().clone()
    }
    fn count(&self) -> usize {
        self.reqs.lock().unwrap().len()
    }
    fn paths(&self) -> Vec<String> {
        self.reqs.lock().unwrap().iter().map(|r| r.path.clone()).collect()
    }
    fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
    fn hello(&self) -> String {
        format!("hello from {}\n", self.name)
    }
}

impl Drop for Rec {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn rec_backend(name: &str) -> Rec {
    rec_backend_ctl(name, Ctl::new()).await
}

async fn rec_backend_ctl(name: &str, ctl: Arc<Ctl>) -> Rec {
    rec_backend_on(name, TcpListener::bind("127.0.0.1:0").await.expect("bind"), ctl)
}

fn rec_backend_on(name: &str, listener: TcpListener, ctl: Arc<Ctl>) -> Rec {
    let name: &'static str = Box::leak(name.to_string().into_boxed_str());
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let reqs = Arc::new(Mutex::new(Vec::new()));
    let task = tokio::spawn({
        let (conns, reqs) = (conns.clone(), reqs.clone());
        async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                conns.fetch_add(1, Ordering::SeqCst);
                let (reqs, ctl) = (reqs.clone(), ctl.clone());
                let svc = service_fn(move |req| {
                    let (reqs, ctl) = (reqs.clone(), ctl.clone());
                    async move { Ok::<_, Infallible>(rec_respond(name, &ctl, &reqs, req).await) }
                });
                tokio::spawn(async move {
                    let _ = http1::Builder::new().max_headers(200).serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        }
    });
    Rec { name, addr, conns, reqs, task }
}

async fn rec_respond(name: &'static str, ctl: &Ctl, reqs: &Mutex<Vec<SeenReq>>, req: Request<Incoming>) -> Response<RespBody> {
    let path = req.uri().path_and_query().map_or_else(|| "/".to_string(), |p| p.to_string());
    reqs.lock().unwrap().push(SeenReq { method: req.method().to_string(), path: path.clone(), headers: req.headers().clone() });
    let mut resp = match req.uri().path() {
        "/slow" => {
            let _ = ctl.arrived.send(path);
            ctl.arrivals.add_permits(1);
            ctl.gate.acquire().await.expect("gate open").forget();
            text(format!("slow from {name}\n"))
        }
        "/hang" => {
            let _ = ctl.arrived.send(path);
            ctl.arrivals.add_permits(1);
            std::future::pending::<Response<RespBody>>().await
        }
        "/drip" => {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"first\n")).await;
                // Keep the body open until whoever reads it goes away.
                tx.closed().await;
            });
            Response::new(ChanBody(rx).map_err(|never| match never {}).boxed())
        }
        "/hop" => {
            let mut r = text("hop\n");
            let h = r.headers_mut();
            h.insert("connection", HeaderValue::from_static("X-Hop"));
            h.insert("x-hop", HeaderValue::from_static("secret"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert("x-normal", HeaderValue::from_static("yes"));
            r
        }
        _ if req.method() == Method::POST => Response::new(req.into_body().map_err(BoxError::from).boxed()),
        _ => text(format!("hello from {name}\n")),
    };
    resp.headers_mut().insert("x-backend", HeaderValue::from_static(name));
    resp
}

/// Accepts TCP connections, counts them, and never reads or answers.
async fn silent_backend() -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn({
        let accepted = accepted.clone();
        async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        }
    });
    (addr, accepted, task)
}

/// Server-sent events: `data: 1`, then (after `release`) `data: 2`, then the end.
async fn sse_backend(release: Arc<Notify>) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let release = release.clone();
            let svc = service_fn(move |_req: Request<Incoming>| {
                let release = release.clone();
                async move {
                    let (tx, rx) = mpsc::channel(2);
                    tokio::spawn(async move {
                        let _ = tx.send(Bytes::from_static(b"data: 1\n\n")).await;
                        release.notified().await;
                        let _ = tx.send(Bytes::from_static(b"data: 2\n\n")).await;
                    });
                    let resp = Response::builder()
                        .header("content-type", "text/event-stream")
                        .header("cache-control", "no-cache")
                        .body(ChanBody(rx))
                        .unwrap();
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(async move {
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, task)
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A hyper client connection to `addr` (one TCP connection).
async fn client<B>(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    sender
}

/// `GET path` with `Host: host` on a fresh connection: (status, body).
async fn get_host(addr: SocketAddr, path: &str, host: &str) -> (u16, String) {
    let req = Request::get(path).header("host", host).body(Full::new(Bytes::new())).unwrap();
    let (status, _, body) = support::request(addr, req).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A raw client connection with a read buffer, for exact bytes on the wire.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        Raw { s: TcpStream::connect(addr).await.expect("connect"), buf: Vec::new(), eof: false }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write request");
    }

    /// Reads more bytes; EOF and errors (reset) both end the stream.
    async fn fill(&mut self) {
        let mut chunk = [0u8; 16384];
        match self.s.read(&mut chunk).await {
            Ok(0) | Err(_) => self.eof = true,
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
        }
    }

    /// The next complete response, or None if the connection ended (or `wait` passed) first.
    async fn next_response(&mut self, wait: Duration) -> Option<Resp> {
        tokio::time::timeout(wait, async {
            loop {
                if let Some((r, n)) = parse_response(&self.buf, self.eof, false) {
                    self.buf.drain(..n);
                    return Some(r);
                }
                if self.eof {
                    return None;
                }
                self.fill().await;
            }
        })
        .await
        .ok()
        .flatten()
    }

    async fn response(&mut self) -> Resp {
        match self.next_response(WAIT).await {
            Some(r) => r,
            None => panic!("no complete response; got {:?}", String::from_utf8_lossy(&self.buf)),
        }
    }

    /// Waits up to `wait` for the peer to close (EOF or reset): how long that took.
    async fn closed_within(&mut self, wait: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        let closed = tokio::time::timeout(wait, async {
            while !self.eof {
                self.fill().await;
            }
        })
        .await;
        match closed {
            Ok(()) => Ok(start.elapsed()),
            Err(_) => Err(format!("connection still open after {wait:?} (unread: {:?})", String::from_utf8_lossy(&self.buf))),
        }
    }
}

fn get_req(path: &str, host: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
}

/// Sends `bytes` on a fresh connection and expects one response with `status`, after which
/// tidegate closes the connection.
async fn expect_rejected_and_closed(addr: SocketAddr, what: &str, bytes: &[u8], status: u16) -> Result<(), String> {
    let mut c = Raw::connect(addr).await;
    c.send(bytes).await;
    match c.next_response(WAIT).await {
        Some(r) if r.status == status => {}
        Some(r) => return Err(format!("{what}: expected {status}, got {} {:?}", r.status, r.text())),
        None => return Err(format!("{what}: expected {status}, got no response (raw {:?})", String::from_utf8_lossy(&c.buf))),
    }
    c.closed_within(Duration::from_secs(2)).await.map(|_| ()).map_err(|e| format!("{what}: {status} answered but {e}"))
}

// ---------------------------------------------------------------------------------------------
// 1. GET and POST, streaming both ways
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn get_and_post_through_tidegate() {
    let (b1, _) = support::backend("b1").await;
    let tg = support::tidegate(&plain(&[srv(b1)])).await;

    assert_eq!(support::get(tg.addr, "/any/path?x=1").await, (200, "hello from b1\n".to_string()));

    let req = Request::post("/echo").header("host", "test").body(Full::new(Bytes::from_static(b"ping body"))).unwrap();
    let (status, headers, body) = support::request(tg.addr, req).await;
    assert_eq!(status, 200);
    assert_eq!(headers.get("x-backend").map(|v| v.as_bytes()), Some(&b"b1"[..]));
    assert_eq!(&body[..], b"ping body");
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_of_5_mib_is_echoed_intact() {
    let (b1, _) = support::backend("b1").await;
    let tg = support::tidegate(&plain(&[srv(b1)])).await;

    let data: Bytes = (0..5 * 1024 * 1024u32).map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8).collect::<Vec<u8>>().into();
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let feeder = tokio::spawn({
        let data = data.clone();
        async move {
            for chunk in data.chunks(64 * 1024) {
                tx.send(data.slice_ref(chunk)).await.expect("request body is being read");
            }
        }
    });
    let mut sender = client::<ChanBody>(tg.addr).await;
    // No Content-Length: hyper sends the body chunked.
    let req = Request::post("/upload").header("host", "test").body(ChanBody(rx)).unwrap();
    let resp = within("response head", WAIT, sender.send_request(req)).await.expect("response");
    assert_eq!(resp.status(), 200);
    let got = within("echoed body", Duration::from_secs(20), resp.into_body().collect()).await.expect("body").to_bytes();
    within("upload finishes", WAIT, feeder).await.unwrap();
    assert_eq!(got.len(), data.len(), "echoed length");
    let first_diff = got.iter().zip(data.iter()).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "echoed body differs from what was sent");
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_stream_concurrently() {
    // The echo's first bytes come back while the upload is still open: neither direction is
    // buffered to its end.
    let (b1, _) = support::backend("b1").await;
    let tg = support::tidegate(&plain(&[srv(b1)])).await;

    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let mut sender = client::<ChanBody>(tg.addr).await;
    tx.send(Bytes::from_static(b"part one|")).await.unwrap();
    let req = Request::post("/duplex").header("host", "test").body(ChanBody(rx)).unwrap();
    let resp = within("response head while the upload is open", WAIT, sender.send_request(req)).await.expect("response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while got.len() < b"part one|".len() {
        let frame = within("first echoed bytes while the upload is open", WAIT, body.frame()).await.expect("a frame").expect("frame ok");
        got.extend_from_slice(&frame.into_data().unwrap_or_default());
    }
    assert_eq!(&got[..], b"part one|");
    tx.send(Bytes::from_static(b"part two")).await.unwrap();
    drop(tx);
    let rest = within("rest of the echo", WAIT, body.collect()).await.expect("body").to_bytes();
    assert_eq!(&rest[..], b"part two");
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Keep-alive, client side and upstream side
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn client_keep_alive_serves_several_requests_on_one_connection() {
    let (b1, _) = support::backend("b1").await;
    let tg = support::tidegate(&plain(&[srv(b1)])).await;

    let mut sender = client::<Full<Bytes>>(tg.addr).await;
    for i in 0..6 {
        within("connection ready for the next request", WAIT, sender.ready()).await.expect("connection still open");
        let req = if i % 2 == 0 {
            Request::get(format!("/k{i}")).header("host", "test").body(Full::new(Bytes::new())).unwrap()
        } else {
            Request::post(format!("/k{i}")).header("host", "test").body(Full::new(Bytes::from(format!("body {i}")))).unwrap()
        };
        let resp =
            within("response", WAIT, sender.send_request(req)).await.unwrap_or_else(|e| panic!("request {i} on the same connection: {e}"));
        assert_eq!(resp.status(), 200, "request {i}");
        assert!(
            resp.headers().get("connection").is_none_or(|v| !v.as_bytes().eq_ignore_ascii_case(b"close")),
            "request {i}: Connection: close"
        );
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let want = if i % 2 == 0 { "hello from b1\n".to_string() } else { format!("body {i}") };
        assert_eq!(String::from_utf8_lossy(&body), want, "request {i}");
    }
    assert!(!sender.is_closed(), "tidegate closed the keep-alive connection");
    tg.stop().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&plain(&[srv(r.addr)])).await;

    let mut c = Raw::connect(tg.addr).await;
    let mut both = get_req("/p1", "test");
    both.extend_from_slice(&get_req("/p2", "test"));
    c.send(&both).await;
    let (a, b) = (c.response().await, c.response().await);
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(r.paths(), ["/p1", "/p2"]);
    drop(c);
    tg.stop().await;
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&plain(&[srv(r.addr)])).await;

    for i in 0..20 {
        assert_eq!(support::get(tg.addr, &format!("/u{i}")).await, (200, r.hello()), "request {i}");
    }
    assert_eq!(r.count(), 20);
    assert!(r.conns() <= 2, "20 sequential requests opened {} upstream connections (want <= 2)", r.conns());
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Server-sent events are streamed
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_are_streamed_not_buffered() {
    let release = Arc::new(Notify::new());
    let (sse, _task) = sse_backend(release.clone()).await;
    let tg = support::tidegate(&plain(&[srv(sse)])).await;

    let mut sender = client::<Full<Bytes>>(tg.addr).await;
    let req = Request::get("/events").header("host", "test").header("accept", "text/event-stream").body(Full::new(Bytes::new())).unwrap();
    let resp = within("SSE response head", WAIT, sender.send_request(req)).await.expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("content-type").map(|v| v.as_bytes()), Some(&b"text/event-stream"[..]));
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while find(&got, b"data: 1\n\n").is_none() {
        let frame = within("event 1 before event 2 is released", Duration::from_secs(2), body.frame())
            .await
            .expect("stream still open")
            .expect("frame ok");
        got.extend_from_slice(&frame.into_data().unwrap_or_default());
    }
    assert_eq!(&got[..], b"data: 1\n\n");
    release.notify_one();
    let rest = within("event 2 and the end of the stream", WAIT, body.collect()).await.expect("body").to_bytes();
    assert_eq!(&rest[..], b"data: 2\n\n");
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Request and response header rewriting
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn hop_by_hop_headers_are_removed_and_forwarded_headers_set() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&plain(&[srv(r.addr)])).await;

    let mut c = Raw::connect(tg.addr).await;
    c.send(
        b"GET /hdr?q=1 HTTP/1.1\r\n\
          Host: Example.Test:8080\r\n\
          Connection: keep-alive, X-Secret\r\n\
          X-Secret: hidden\r\n\
          Keep-Alive: timeout=5\r\n\
          TE: trailers\r\n\
          Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
          X-Custom: visible\r\n\
          X-Forwarded-For: 6.6.6.6\r\n\
          X-Forwarded-Proto: https\r\n\
          X-Forwarded-Host: evil.test\r\n\
          \r\n",
    )
    .await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200, "{}", resp.text());

    let seen = r.reqs();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.path, "/hdr?q=1");
    for gone in ["x-secret", "keep-alive", "te", "proxy-authorization"] {
        assert!(s.values(gone).is_empty(), "{gone} reached the backend: {:?}", s.values(gone));
    }
    for v in s.values("connection") {
        assert!(!v.to_ascii_lowercase().contains("x-secret"), "client's Connection header reached the backend: {v:?}");
    }
    assert_eq!(s.values("x-custom"), ["visible"]);
    assert_eq!(s.values("host"), ["Example.Test:8080"], "Host must pass unchanged");
    assert_eq!(s.values("x-forwarded-for"), ["127.0.0.1"], "untrusted peer: X-Forwarded-For replaced");
    assert_eq!(s.values("x-forwarded-proto"), ["http"]);
    assert_eq!(s.values("x-forwarded-host"), ["Example.Test:8080"]);
    drop(c);
    tg.stop().await;
}

#[tokio::test]
async fn x_forwarded_for_is_appended_for_a_trusted_peer() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&config(r#"trusted_proxies = ["127.0.0.1"]"#, "", &[srv(r.addr)], "")).await;

    let mut c = Raw::connect(tg.addr).await;
    c.send(b"GET /t HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n").await;
    assert_eq!(c.response().await.status, 200);
    assert_eq!(r.reqs()[0].values("x-forwarded-for"), ["1.2.3.4, 127.0.0.1"]);
    drop(c);
    tg.stop().await;
}

#[tokio::test]
async fn x_forwarded_for_from_a_trusted_peer_keeps_every_header_line() {
    // Two X-Forwarded-For lines are one list (RFC 9110 5.3); appending must keep both.
    let r = rec_backend("r").await;
    let tg = support::tidegate(&config(r#"trusted_proxies = ["127.0.0.1"]"#, "", &[srv(r.addr)], "")).await;

    let mut c = Raw::connect(tg.addr).await;
    c.send(b"GET /t HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\n\r\n").await;
    assert_eq!(c.response().await.status, 200);
    let xff = r.reqs()[0].values("x-forwarded-for").join(", ");
    assert_eq!(xff, "1.2.3.4, 5.6.7.8, 127.0.0.1");
    drop(c);
    tg.stop().await;
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_removed() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&plain(&[srv(r.addr)])).await;

    let mut c = Raw::connect(tg.addr).await;
    c.send(&get_req("/hop", "test")).await;
    let resp = c.response().await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-normal"), Some("yes"));
    assert_eq!(resp.header("x-hop"), None, "header named in the backend's Connection reached the client");
    assert_eq!(resp.header("keep-alive"), None, "Keep-Alive reached the client");
    drop(c);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Strict framing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn content_length_with_transfer_encoding_is_rejected_and_closed() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&plain(&[srv(r.addr)])).await;

    let smuggle = "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: test\r\n\r\n";
    let cases = [
        ("CL then TE", format!("POST /cl-te HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n{smuggle}")),
        ("TE then CL", format!("POST /te-cl HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n{smuggle}")),
    ];
    let mut failures = Vec::new();
    for (what, bytes) in &cases {
        if let Err(e) = expect_rejected_and_closed(tg.addr, what, bytes.as_bytes(), 400).await {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\nbackend saw: {:?}", r.paths());
    assert_eq!(r.paths(), Vec::<String>::new(), "the backend saw requests");
    tg.stop().await;
}

#[tokio::test]
async fn malformed_content_length_is_rejected() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&plain(&[srv(r.addr)])).await;

    let cases = [
        ("two differing Content-Length", "Content-Length: 5\r\nContent-Length: 6\r\n"),
        ("Content-Length: +5", "Content-Length: +5\r\n"),
        ("Content-Length: 5, 5", "Content-Length: 5, 5\r\n"),
        ("Content-Length: abc", "Content-Length: abc\r\n"),
    ];
    let mut failures = Vec::new();
    for (what, headers) in cases {
        let bytes = format!("POST /cl HTTP/1.1\r\nHost: test\r\n{headers}\r\nhello!");
        if let Err(e) = expect_rejected_and_closed(tg.addr, what, bytes.as_bytes(), 400).await {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(r.paths(), Vec::<String>::new(), "the backend saw requests");
    tg.stop().await;
}

#[tokio::test]
async fn transfer_encoding_other_than_one_chunked_is_rejected() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&plain(&[srv(r.addr)])).await;

    let cases = [
        ("Transfer-Encoding: gzip, chunked", "Transfer-Encoding: gzip, chunked\r\n"),
        ("Transfer-Encoding: chunked twice", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
    ];
    let mut failures = Vec::new();
    for (what, headers) in cases {
        let bytes = format!("POST /te HTTP/1.1\r\nHost: test\r\n{headers}\r\n5\r\nhello\r\n0\r\n\r\n");
        if let Err(e) = expect_rejected_and_closed(tg.addr, what, bytes.as_bytes(), 400).await {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(r.paths(), Vec::<String>::new(), "the backend saw requests");
    tg.stop().await;
}

#[tokio::test]
async fn local_404_with_a_body_does_not_parse_the_body_as_a_request() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&config("", r#"host = "app.test""#, &[srv(r.addr)], "")).await;

    let hidden = "GET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n";
    let next = "GET /next HTTP/1.1\r\nHost: app.test\r\n\r\n";
    let cases = [
        ("Content-Length body", format!("POST /x HTTP/1.1\r\nHost: other.test\r\nContent-Length: {}\r\n\r\n{hidden}{next}", hidden.len())),
        (
            "chunked body",
            format!(
                "POST /x HTTP/1.1\r\nHost: other.test\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{hidden}\r\n0\r\n\r\n{next}",
                hidden.len()
            ),
        ),
    ];
    for (what, bytes) in &cases {
        let mut c = Raw::connect(tg.addr).await;
        c.send(bytes.as_bytes()).await;
        let first = c.response().await;
        assert_eq!(first.status, 404, "{what}: {}", first.text());
        // Either the connection closes, or the body was skipped and the next request is served.
        if let Some(second) = c.next_response(Duration::from_secs(2)).await {
            assert_eq!((second.status, second.text()), (200, r.hello()), "{what}: response after the 404");
            assert_eq!(r.paths().last().map(String::as_str), Some("/next"), "{what}");
        }
        assert!(!r.paths().iter().any(|p| p == "/smuggled"), "{what}: request hidden in the body reached the backend: {:?}", r.paths());
    }
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Local errors
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unmatched_host_is_404() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&config("", r#"host = "app.test""#, &[srv(r.addr)], "")).await;

    assert_eq!(get_host(tg.addr, "/", "app.test").await, (200, r.hello()));
    assert_eq!(get_host(tg.addr, "/", "other.test").await.0, 404);
    assert_eq!(r.count(), 1);
    tg.stop().await;
}

#[tokio::test]
async fn all_servers_dead_is_502_then_503_quickly() {
    let (d1, d2) = (support::dead_addr().await, support::dead_addr().await);
    let tg = support::tidegate(&plain(&[srv(d1), srv(d2)])).await;

    // The first request tries both servers and fails to connect: 502. Both are now out for
    // fail_timeout, so the next finds no server at all: 503 with Retry-After, at once.
    for (i, expected) in [(0, 502), (1, 503)] {
        let start = Instant::now();
        let req = Request::get("/").header("host", "test").body(Full::new(Bytes::new())).unwrap();
        let (status, headers, _) = within("answer for dead servers", Duration::from_secs(2), support::request(tg.addr, req)).await;
        assert_eq!(status, expected, "request {i}");
        assert_eq!(headers.contains_key("retry-after"), expected == 503, "request {i}");
        assert!(start.elapsed() < Duration::from_secs(2), "request {i} took {:?}", start.elapsed());
    }
    tg.stop().await;
}

#[tokio::test]
async fn silent_backend_is_504_after_response_header_timeout() {
    let (silent, accepted, _task) = silent_backend().await;
    let tg = support::tidegate(&config("", "", &[srv(silent)], r#"timeouts = { response_header = "300ms" }"#)).await;

    let start = Instant::now();
    let (status, _) = within("504 from the response_header timeout", Duration::from_secs(3), support::get(tg.addr, "/")).await;
    let took = start.elapsed();
    assert_eq!(status, 504);
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(2), "504 after {took:?}, want about 300ms");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the request went to the silent backend");
    tg.stop().await;
}

#[tokio::test]
async fn oversized_request_head_is_431() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&plain(&[srv(r.addr)])).await;

    // Below the limit passes...
    let ok = format!("GET /big HTTP/1.1\r\nHost: test\r\nX-Big: {}\r\n\r\n", "a".repeat(60 * 1024));
    let mut c = Raw::connect(tg.addr).await;
    c.send(ok.as_bytes()).await;
    assert_eq!(c.response().await.status, 200, "a 60 KiB head is within the limit");
    drop(c);

    // ...one header that takes the head past 64 KiB does not.
    let big = format!("GET /too-big HTTP/1.1\r\nHost: test\r\nX-Big: {}\r\n\r\n", "a".repeat(70 * 1024));
    let mut c = Raw::connect(tg.addr).await;
    // tidegate may answer and close before reading it all.
    let _ = c.s.write_all(big.as_bytes()).await;
    let resp = c.next_response(WAIT).await.map(|r| r.status);
    assert_eq!(resp, Some(431), "raw: {:?}", String::from_utf8_lossy(&c.buf));
    assert_eq!(r.paths(), ["/big"]);
    tg.stop().await;
}

#[tokio::test]
async fn more_than_100_headers_is_431() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&plain(&[srv(r.addr)])).await;

    let with_headers = |total: usize| {
        let mut s = String::from("GET /many HTTP/1.1\r\nHost: test\r\n");
        for i in 1..total {
            s.push_str(&format!("X-H{i}: {i}\r\n"));
        }
        s.push_str("\r\n");
        s
    };
    let mut c = Raw::connect(tg.addr).await;
    c.send(with_headers(100).as_bytes()).await;
    assert_eq!(c.response().await.status, 200, "100 header fields are allowed");
    drop(c);

    let mut c = Raw::connect(tg.addr).await;
    c.send(with_headers(101).as_bytes()).await;
    assert_eq!(c.response().await.status, 431, "101 header fields");
    assert_eq!(r.count(), 1);
    tg.stop().await;
}

#[tokio::test]
async fn garbage_request_line_is_400() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&plain(&[srv(r.addr)])).await;

    let mut c = Raw::connect(tg.addr).await;
    c.send(b"THIS IS NOT HTTP AT ALL\r\n\r\n").await;
    assert_eq!(c.response().await.status, 400);
    assert_eq!(r.count(), 0);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Client timeouts
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn incomplete_head_is_cut_off_after_header_read() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&config(r#"timeouts = { header_read = "300ms" }"#, "", &[srv(r.addr)], "")).await;

    let mut c = Raw::connect(tg.addr).await;
    c.send(b"GET / HTTP/1.1\r\n").await;
    let took = c.closed_within(Duration::from_secs(2)).await.expect("disconnected after header_read");
    assert!(took >= Duration::from_millis(200), "closed after {took:?}, before header_read passed");
    assert_eq!(r.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn slowly_trickled_head_is_cut_off_after_header_read() {
    // header_read bounds the whole head, not the gap between bytes.
    let r = rec_backend("r").await;
    let tg = support::tidegate(&config(r#"timeouts = { header_read = "300ms" }"#, "", &[srv(r.addr)], "")).await;

    let mut c = Raw::connect(tg.addr).await;
    c.send(b"GET / HTTP/1.1\r\nHost: test\r\n").await;
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        assert!(start.elapsed() < Duration::from_secs(2), "a head trickled for {:?} is still being read", start.elapsed());
        match tokio::time::timeout(Duration::from_millis(100), c.s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
            Err(_) => {
                if c.s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                    break;
                }
            }
        }
    }
    assert!(start.elapsed() >= Duration::from_millis(200), "closed after {:?}", start.elapsed());
    assert_eq!(r.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn keep_alive_idle_longer_than_header_read_still_works() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&config(r#"timeouts = { header_read = "300ms", keepalive_idle = "3s" }"#, "", &[srv(r.addr)], "")).await;

    let mut c = Raw::connect(tg.addr).await;
    c.send(&get_req("/one", "test")).await;
    assert_eq!(c.response().await.status, 200);
    // Idle between requests is keep-alive time, not header time.
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.send(&get_req("/two", "test")).await;
    let second = c.next_response(WAIT).await.map(|r| r.status);
    assert_eq!(second, Some(200), "second request after 600ms idle (header_read 300ms, keepalive_idle 3s)");
    assert_eq!(r.paths(), ["/one", "/two"]);
    drop(c);
    tg.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_keepalive_idle() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&config(r#"timeouts = { keepalive_idle = "300ms" }"#, "", &[srv(r.addr)], "")).await;

    let mut c = Raw::connect(tg.addr).await;
    c.send(&get_req("/one", "test")).await;
    assert_eq!(c.response().await.status, 200);
    let took = c.closed_within(Duration::from_secs(2)).await.expect("idle connection closed after keepalive_idle");
    assert!(took >= Duration::from_millis(200), "closed after {took:?}, before keepalive_idle passed");
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8-10. Balancing, failover, backups
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn weighted_round_robin_splits_1_2_3() {
    let (b1, _) = support::backend("b1").await;
    let (b2, _) = support::backend("b2").await;
    let (b3, _) = support::backend("b3").await;
    let servers = [format!("{}, weight = 1", srv(b1)), format!("{}, weight = 2", srv(b2)), format!("{}, weight = 3", srv(b3))];
    let tg = support::tidegate(&plain(&servers)).await;

    let mut counts = [0usize; 3];
    for _ in 0..60 {
        let (status, body) = support::get(tg.addr, "/").await;
        assert_eq!(status, 200);
        match body.as_str() {
            "hello from b1\n" => counts[0] += 1,
            "hello from b2\n" => counts[1] += 1,
            "hello from b3\n" => counts[2] += 1,
            other => panic!("unexpected body {other:?}"),
        }
    }
    assert_eq!(counts, [10, 20, 30]);
    tg.stop().await;
}

#[tokio::test]
async fn dead_server_is_failed_over_and_then_skipped_for_fail_timeout() {
    let a = rec_backend("a").await;
    let b = rec_backend("b").await;
    let dead = support::dead_addr().await;
    let servers = [srv(a.addr), format!(r#"{}, max_fails = 1, fail_timeout = "10s""#, srv(dead)), srv(b.addr)];
    let tg = support::tidegate(&plain(&servers)).await;

    for i in 0..30 {
        let (status, body) = support::get(tg.addr, "/").await;
        assert_eq!(status, 200, "request {i} with one dead server: {body}");
    }
    assert_eq!(a.count() + b.count(), 30);

    // The dead address comes back to life. Within fail_timeout tidegate must not try it:
    // it gets no connection at all.
    let revived = rec_backend_on("revived", TcpListener::bind(dead).await.expect("rebind the dead port"), Ctl::new());
    for i in 0..30 {
        assert_eq!(support::get(tg.addr, "/").await.0, 200, "request {i}");
    }
    assert_eq!(revived.conns(), 0, "a server that failed is retried within its fail_timeout");
    assert_eq!(a.count() + b.count(), 60);
    tg.stop().await;
}

#[tokio::test]
async fn failed_server_is_tried_again_after_fail_timeout() {
    let a = rec_backend("a").await;
    let dead = support::dead_addr().await;
    let servers = [srv(a.addr), format!(r#"{}, max_fails = 1, fail_timeout = "400ms""#, srv(dead))];
    let tg = support::tidegate(&plain(&servers)).await;

    for _ in 0..2 {
        assert_eq!(support::get(tg.addr, "/").await.0, 200);
    }
    let revived = rec_backend_on("revived", TcpListener::bind(dead).await.expect("rebind the dead port"), Ctl::new());
    // Waiting out fail_timeout is wall time by nature.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..6 {
        assert_eq!(support::get(tg.addr, "/").await.0, 200);
    }
    assert!(revived.count() >= 1, "the server was not tried again after fail_timeout (a: {}, revived: {})", a.count(), revived.count());
    tg.stop().await;
}

#[tokio::test]
async fn backup_is_used_only_when_primaries_cannot_serve() {
    let a = rec_backend("a").await;
    let b = rec_backend("b").await;
    let tg = support::tidegate(&plain(&[srv(a.addr), format!("{}, backup = true", srv(b.addr))])).await;
    for _ in 0..10 {
        assert_eq!(support::get(tg.addr, "/").await, (200, a.hello()));
    }
    assert_eq!((a.count(), b.count(), b.conns()), (10, 0, 0), "backup used while the primary works");
    tg.stop().await;

    let dead = support::dead_addr().await;
    let tg = support::tidegate(&plain(&[srv(dead), format!("{}, backup = true", srv(b.addr))])).await;
    for i in 0..10 {
        assert_eq!(support::get(tg.addr, "/").await, (200, b.hello()), "request {i} with the primary dead");
    }
    assert_eq!(b.count(), 10);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 11. max_conns
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_conns_sends_elsewhere_then_503_when_all_full() {
    let ctl = Ctl::new();
    let g1 = rec_backend_ctl("g1", ctl.clone()).await;
    let g2 = rec_backend_ctl("g2", ctl.clone()).await;
    let tg = support::tidegate(&plain(&[format!("{}, max_conns = 1", srv(g1.addr)), format!("{}, max_conns = 1", srv(g2.addr))])).await;
    let addr = tg.addr;

    let slow1 = tokio::spawn(async move { support::get(addr, "/slow").await });
    ctl.arrival().await;
    let (busy, free) = if g1.paths().contains(&"/slow".to_string()) { (&g1, &g2) } else { (&g2, &g1) };

    // While `busy` holds its one connection, everything goes to `free`.
    for i in 0..4 {
        assert_eq!(support::get(addr, "/").await, (200, free.hello()), "request {i} while {} is at max_conns", busy.name);
    }

    let slow2 = tokio::spawn(async move { support::get(addr, "/slow").await });
    ctl.arrival().await;
    assert!(free.paths().contains(&"/slow".to_string()), "second slow request went to {:?}", busy.paths());

    // Both full: 503 at once, and neither backend sees the request.
    let start = Instant::now();
    let (status, _) = within("503 when every server is full", Duration::from_secs(2), support::get(addr, "/")).await;
    assert_eq!(status, 503);
    assert!(start.elapsed() < Duration::from_secs(1), "503 took {:?}", start.elapsed());
    assert_eq!(g1.count() + g2.count(), 6);

    ctl.gate.add_permits(2);
    let one = within("slow request 1", WAIT, slow1).await.unwrap();
    let two = within("slow request 2", WAIT, slow2).await.unwrap();
    assert_eq!(one, (200, format!("slow from {}\n", busy.name)));
    assert_eq!(two, (200, format!("slow from {}\n", free.name)));
    assert_eq!(support::get(addr, "/").await.0, 200);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 12. Live counts drain
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_counts_return_to_zero_after_mixed_and_aborted_requests() {
    let ctl = Ctl::new();
    let r1 = rec_backend_ctl("r1", ctl.clone()).await;
    let r2 = rec_backend_ctl("r2", ctl.clone()).await;
    let tg = support::tidegate(&plain(&[srv(r1.addr), srv(r2.addr)])).await;
    let addr = tg.addr;

    for batch in 0..10 {
        let mut set = JoinSet::new();
        for j in 0..20 {
            let i = batch * 20 + j;
            let ctl = ctl.clone();
            set.spawn(async move {
                match i % 5 {
                    0 => assert_eq!(support::get(addr, "/").await.0, 200, "GET {i}"),
                    1 => {
                        let body = Bytes::from(vec![b'x'; 10 * 1024]);
                        let req = Request::post("/echo").header("host", "test").body(Full::new(body.clone())).unwrap();
                        let (status, _, echoed) = support::request(addr, req).await;
                        assert_eq!((status, echoed.len()), (200, body.len()), "POST {i}");
                    }
                    2 => {
                        // Abort mid-response: read the first chunk of a body that never ends.
                        let mut c = Raw::connect(addr).await;
                        c.send(&get_req("/drip", "test")).await;
                        while find(&c.buf, b"first\n").is_none() {
                            assert!(!c.eof, "drip {i}: closed before the first chunk");
                            within("first chunk of /drip", WAIT, c.fill()).await;
                        }
                    }
                    3 => {
                        // Abort while the backend has not answered yet.
                        let mut arrived = ctl.arrived.subscribe();
                        let path = format!("/hang?id={i}");
                        let mut c = Raw::connect(addr).await;
                        c.send(&get_req(&path, "test")).await;
                        within("/hang arrives at the backend", WAIT, async {
                            while arrived.recv().await.expect("arrivals channel") != path {}
                        })
                        .await;
                    }
                    _ => {
                        // Abort mid-upload, after the echo started.
                        let mut c = Raw::connect(addr).await;
                        c.send(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\n").await;
                        c.send(&[b'y'; 1000]).await;
                        while find(&c.buf, b"\r\n\r\n").is_none() {
                            assert!(!c.eof, "upload {i}: closed before the response head");
                            within("response head of the partial upload", WAIT, c.fill()).await;
                        }
                    }
                }
            });
        }
        while let Some(res) = set.join_next().await {
            res.expect("request task");
        }
    }

    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let live = (tg.live("app", r1.addr), tg.live("app", r2.addr));
        if live == (0, 0) {
            break;
        }
        assert!(Instant::now() < deadline, "live counts did not return to 0 within 3s: {live:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(support::get(addr, "/").await.0, 200);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 13. h2c is not an upgrade tidegate makes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn h2c_upgrade_is_answered_as_plain_http_1_1() {
    let r = rec_backend("r").await;
    let tg = support::tidegate(&plain(&[srv(r.addr)])).await;

    let mut c = Raw::connect(tg.addr).await;
    c.send(
        b"GET /h2c HTTP/1.1\r\nHost: test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
          HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    let first = c.response().await;
    assert_eq!((first.version.as_str(), first.status), ("HTTP/1.1", 200));
    assert_eq!(first.text(), r.hello());
    assert_eq!(first.header("upgrade"), None);

    // No tunnel: the next bytes are parsed as HTTP and answered.
    c.send(&get_req("/after", "test")).await;
    let second = c.next_response(WAIT).await.map(|r| (r.status, r.text()));
    assert_eq!(second, Some((200, r.hello())), "request after the h2c attempt");

    let seen = r.reqs();
    assert_eq!(seen.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(), ["/h2c", "/after"]);
    let h2c = &seen[0];
    assert!(h2c.values("upgrade").is_empty(), "Upgrade reached the backend: {:?}", h2c.values("upgrade"));
    assert!(h2c.values("http2-settings").is_empty(), "HTTP2-Settings reached the backend");
    for v in h2c.values("connection") {
        assert!(!v.to_ascii_lowercase().contains("upgrade"), "Connection: {v:?} reached the backend");
    }
    assert_eq!(h2c.method, "GET");
    drop(c);
    tg.stop().await;
}
