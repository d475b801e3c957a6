//! Active health checks and server-reported load, black box on real sockets: tidegate on
//! 127.0.0.1 port 0 in front of controllable backends (`Ctl`: what `/healthz` answers, what load
//! it reports, what proxied requests get, all flipped through atomics) and the demo backend.
//!
//! Rise and fall are asserted by ORDER, never by wall time: the backends count the check
//! answers they gave, and a state seen in `view().health` is compared with those counts (read
//! in the order that makes the comparison sound). Every wait is bounded by `WAIT`.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tidegate::runtime::{BackendId, BackendView, Health, now_ms};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

/// Upper bound for any single wait in this file.
const WAIT: Duration = Duration::from_secs(10);
/// The RFC 6455 sample key.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// `/healthz` status meaning: never answer (the check times out).
const HANG: u16 = 0;
/// WebSocket check answer meaning: a 101 whose `Sec-WebSocket-Accept` does not match the key.
const BAD_ACCEPT: u16 = 1;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

/// Polls `cond` every 5 ms until it holds (bounded).
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// What a controllable backend reports about its own load on `/healthz`.
#[derive(Debug, Clone)]
enum Report {
    None,
    /// This text, verbatim.
    Fixed(String),
    /// Its true count of open WebSocket tunnels.
    Live,
}

/// Where the report goes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Carrier {
    /// `X-Live-Connections: N` (body `ok`).
    Header,
    /// Body `{"live": N}` (N inserted verbatim).
    Json,
    /// Body `N`.
    Body,
}

/// The switches and counters of one controllable backend.
struct CtlState {
    /// Status of `/healthz` (`HANG`: never answer).
    health: AtomicU16,
    /// When set, `/healthz` alternates 503 / 200 by arrival (odd arrivals fail).
    flap: AtomicBool,
    /// Answer to a WebSocket check: 101 (a correct handshake), `BAD_ACCEPT`, or a plain status.
    ws: AtomicU16,
    /// Status of every other (proxied) request.
    proxied_status: AtomicU16,
    report: Mutex<Report>,
    carrier: Mutex<Carrier>,
    /// `/healthz` arrivals, and how each was answered (counted before the answer leaves).
    checks: AtomicU32,
    passes: AtomicU32,
    fails: AtomicU32,
    /// Proxied requests and upgrades (anything but `/healthz`).
    proxied: AtomicU32,
    /// Open proxied WebSocket tunnels.
    tunnels: AtomicU32,
    /// The `Host` of the last `/healthz` request.
    last_host: Mutex<String>,
}

/// A controllable HTTP + WebSocket backend; every answer carries `x-backend: NAME`.
struct Ctl {
    name: &'static str,
    addr: SocketAddr,
    st: Arc<CtlState>,
    task: JoinHandle<()>,
}

impl Drop for Ctl {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Ctl {
    async fn start(name: &'static str) -> Ctl {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let addr = listener.local_addr().expect("backend addr");
        let st = Arc::new(CtlState {
            health: AtomicU16::new(200),
            flap: AtomicBool::new(false),
            ws: AtomicU16::new(101),
            proxied_status: AtomicU16::new(200),
            report: Mutex::new(Report::None),
            carrier: Mutex::new(Carrier::Header),
            checks: AtomicU32::new(0),
            passes: AtomicU32::new(0),
            fails: AtomicU32::new(0),
            proxied: AtomicU32::new(0),
            tunnels: AtomicU32::new(0),
            last_host: Mutex::new(String::new()),
        });
        let shared = st.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let st = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(ctl_serve(name, &st, req).await) }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).with_upgrades().await;
                });
            }
        });
        Ctl { name, addr, st, task }
    }

    fn set_health(&self, status: u16) {
        self.st.health.store(status, Ordering::SeqCst);
    }
    fn set_flap(&self, on: bool) {
        self.st.flap.store(on, Ordering::SeqCst);
    }
    fn set_ws(&self, answer: u16) {
        self.st.ws.store(answer, Ordering::SeqCst);
    }
    fn set_proxied_status(&self, status: u16) {
        self.st.proxied_status.store(status, Ordering::SeqCst);
    }
    fn set_report(&self, r: Report) {
        *self.st.report.lock().unwrap() = r;
    }
    fn set_carrier(&self, c: Carrier) {
        *self.st.carrier.lock().unwrap() = c;
    }
    fn checks(&self) -> u32 {
        self.st.checks.load(Ordering::SeqCst)
    }
    fn passes(&self) -> u32 {
        self.st.passes.load(Ordering::SeqCst)
    }
    fn fails(&self) -> u32 {
        self.st.fails.load(Ordering::SeqCst)
    }
    fn proxied(&self) -> u32 {
        self.st.proxied.load(Ordering::SeqCst)
    }
    fn tunnels(&self) -> u32 {
        self.st.tunnels.load(Ordering::SeqCst)
    }
    fn last_host(&self) -> String {
        self.st.last_host.lock().unwrap().clone()
    }
}

fn plain(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = hyper::StatusCode::from_u16(status).expect("valid status");
    r
}

/// A 101 to a WebSocket upgrade (with the correct accept key unless `bad_accept`); the upgraded
/// connection is served as a WebSocket (tungstenite answers pings and closes) until it ends.
fn switch(req: &mut Request<Incoming>, bad_accept: bool, count: Option<Arc<CtlState>>) -> Response<Full<Bytes>> {
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned().unwrap_or_else(|| HeaderValue::from_static(""));
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(up) = upgrade.await {
            if let Some(st) = &count {
                st.tunnels.fetch_add(1, Ordering::SeqCst);
            }
            let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, None).await;
            while let Some(Ok(_)) = ws.next().await {}
            if let Some(st) = &count {
                st.tunnels.fetch_sub(1, Ordering::SeqCst);
            }
        }
    });
    let accept = if bad_accept { "c29tZXRoaW5nIGVsc2UgZW50aXJlbHk=".to_string() } else { tidegate::ws::accept_key(key.as_bytes()) };
    let mut r = plain(101, Bytes::new());
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&accept).expect("base64 header"));
    r
}

async fn ctl_serve(name: &'static str, st: &Arc<CtlState>, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let is_ws = req.headers().get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let mut resp = if req.uri().path() == "/healthz" {
        let host = req.headers().get(header::HOST).map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned()).unwrap_or_default();
        *st.last_host.lock().unwrap() = host;
        let n = st.checks.fetch_add(1, Ordering::SeqCst) + 1;
        let status =
            if st.flap.load(Ordering::SeqCst) { if n.is_multiple_of(2) { 200 } else { 503 } } else { st.health.load(Ordering::SeqCst) };
        if status == HANG {
            sleep(Duration::from_secs(3)).await;
            return plain(503, "too late\n");
        }
        let report = match &*st.report.lock().unwrap() {
            Report::None => None,
            Report::Fixed(s) => Some(s.clone()),
            Report::Live => Some(st.tunnels.load(Ordering::SeqCst).to_string()),
        };
        let carrier = *st.carrier.lock().unwrap();
        let mut r = if is_ws {
            let answer = st.ws.load(Ordering::SeqCst);
            let ok = answer == 101 && (200..300).contains(&status);
            if ok { &st.passes } else { &st.fails }.fetch_add(1, Ordering::SeqCst);
            match answer {
                101 if ok => switch(&mut req, false, None),
                101 => plain(status, "not now\n"),
                BAD_ACCEPT => switch(&mut req, true, None),
                other => plain(other, "no WebSocket here\n"),
            }
        } else {
            if (200..300).contains(&status) { &st.passes } else { &st.fails }.fetch_add(1, Ordering::SeqCst);
            let body = match (carrier, &report) {
                (Carrier::Json, Some(v)) => format!("{{\"live\": {v}}}"),
                (Carrier::Json, None) => "{}".to_string(),
                (Carrier::Body, Some(v)) => v.clone(),
                _ => "ok\n".to_string(),
            };
            plain(status, body)
        };
        if let (Carrier::Header, Some(v)) = (carrier, report) {
            r.headers_mut().insert("x-live-connections", HeaderValue::from_str(&v).expect("report is header-safe"));
        }
        r
    } else {
        st.proxied.fetch_add(1, Ordering::SeqCst);
        if is_ws {
            switch(&mut req, false, Some(st.clone()))
        } else {
            plain(st.proxied_status.load(Ordering::SeqCst), format!("hello from {name}\n"))
        }
    };
    resp.headers_mut().insert("x-backend", HeaderValue::from_static(name));
    resp
}

/// What a test looks at in a response.
#[derive(Debug, Clone)]
struct Resp {
    status: u16,
    backend: Option<String>,
    retry_after: Option<String>,
}

impl Resp {
    fn new(status: u16, headers: impl IntoIterator<Item = (String, String)>) -> Resp {
        let mut r = Resp { status, backend: None, retry_after: None };
        for (k, v) in headers {
            match k.to_ascii_lowercase().as_str() {
                "x-backend" => r.backend = Some(v),
                "retry-after" => r.retry_after = Some(v),
                _ => {}
            }
        }
        r
    }

    /// The backend that answered (any status a backend sent).
    fn by(&self) -> &str {
        self.backend.as_deref().unwrap_or_else(|| panic!("expected a backend's answer, got {self:?}"))
    }
}

/// `GET /` with `Host: test` on a fresh connection.
async fn ask(to: SocketAddr) -> Resp {
    within("GET / through tidegate", async {
        let stream = TcpStream::connect(to).await.expect("connect");
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(conn);
        let req = Request::get("/").header("host", "test").body(Empty::<Bytes>::new()).expect("request");
        let resp = tx.send_request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        body.collect().await.expect("body");
        Resp::new(
            parts.status.as_u16(),
            parts.headers.iter().map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())),
        )
    })
    .await
}

/// Sends a WebSocket upgrade by hand and reads the response head; the socket stays open.
async fn upgrade(to: SocketAddr) -> (TcpStream, Resp) {
    within("upgrade response head", async {
        let mut s = TcpStream::connect(to).await.expect("connect");
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("send upgrade");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).await.expect("read response head");
            assert!(n > 0, "connection closed before a response head: {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
        }
        let raw = String::from_utf8_lossy(&buf).into_owned();
        let head = raw.split("\r\n\r\n").next().unwrap_or_default();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line in {head:?}"));
        let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string()));
        (s, Resp::new(status, headers))
    })
    .await
}

/// An open WebSocket tunnel: the client socket (hold it to keep the tunnel) and the backend.
async fn tunnel(to: SocketAddr) -> (TcpStream, String) {
    let (s, r) = upgrade(to).await;
    assert_eq!(r.status, 101, "upgrade not accepted: {r:?}");
    (s, r.by().to_string())
}

fn count<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in items {
        *m.entry(s.as_ref().to_string()).or_insert(0) += 1;
    }
    m
}

fn srv(addr: SocketAddr, extra: &str) -> String {
    if extra.is_empty() { format!(r#"{{ addr = "{addr}" }}"#) } else { format!(r#"{{ addr = "{addr}", {extra} }}"#) }
}

/// One listener routing everything to upstream `app`: `keys` go before `servers`, `health`
/// (the body of `[upstream.app.health]`, none when empty) after.
fn config(keys: &str, servers: &[String], health: &str) -> String {
    let health = if health.is_empty() { String::new() } else { format!("\n  [upstream.app.health]\n{health}\n") };
    format!(
        r#"shutdown_timeout = "2s"

[[listener]]
name = "test"
bind = "127.0.0.1:0"

  [[listener.route]]
  upstream = "app"

[upstream.app]
{keys}
servers = [
  {}
]
{health}"#,
        servers.join(",\n  ")
    )
}

/// HTTP checks of `/healthz` every `interval` (timeout the same), plus `extra` lines.
fn http_checks(interval: &str, extra: &str) -> String {
    format!("kind = \"http\"\npath = \"/healthz\"\ninterval = \"{interval}\"\ntimeout = \"{interval}\"\n{extra}")
}

fn parse(text: &str) -> tidegate::config::Config {
    tidegate::config::load_str(text, Path::new("test.toml")).unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{text}"))
}

fn view_in(tg: &support::Proxy, upstream: &str, addr: SocketAddr) -> BackendView {
    let rt = tg.shared.runtime.load();
    let u = rt.upstreams.iter().find(|u| u.name() == upstream).unwrap_or_else(|| panic!("no upstream {upstream}"));
    let b = u.backends.iter().find(|b| b.addr() == addr).unwrap_or_else(|| panic!("no backend {addr} in {upstream}"));
    b.state.view(now_ms())
}

/// The view of backend `addr` of upstream `app`.
fn view(tg: &support::Proxy, addr: SocketAddr) -> BackendView {
    view_in(tg, "app", addr)
}

fn health(tg: &support::Proxy, addr: SocketAddr) -> Health {
    view(tg, addr).health
}

async fn wait_health(tg: &support::Proxy, c: &Ctl, want: Health) {
    wait_until(&format!("{} becomes {}", c.name, want.as_str()), || health(tg, c.addr) == want).await;
}

fn id(upstream: &str, addr: SocketAddr) -> BackendId {
    BackendId { upstream: upstream.to_string(), addr }
}

// ---------------------------------------------------------------------------------------------
// 1. fall and rise
// ---------------------------------------------------------------------------------------------

/// a's `/healthz` starts failing: it keeps taking traffic through the first fall − 1 failed
/// checks, is taken out at the `fall`-th (never before, never later), takes nothing while out,
/// and comes back after exactly `rise` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_checks_take_a_server_out_after_fall_and_passes_bring_it_back_after_rise() {
    const RISE: u32 = 2;
    const FALL: u32 = 3;
    let a = Ctl::start("a").await;
    let b = Ctl::start("b").await;
    let text = config(
        r#"balance = "round_robin""#,
        &[srv(a.addr, ""), srv(b.addr, "")],
        &http_checks("150ms", &format!("rise = {RISE}\nfall = {FALL}")),
    );
    let tg = support::tidegate(&text).await;
    wait_health(&tg, &a, Health::Healthy).await;
    wait_health(&tg, &b, Health::Healthy).await;
    let got: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..10 {
            v.push(ask(tg.addr).await.by().to_string());
        }
        v
    };
    assert_eq!(count(&got).len(), 2, "both servers healthy, both should serve: {got:?}");

    // Fall.
    let fails0 = a.fails();
    a.set_health(503);
    let mut served_after_a_failed_check = 0;
    within("a falls", async {
        loop {
            // Counts first, then state: a state seen as healthy bounds the answers given before.
            let failed = a.fails() - fails0;
            let h = health(&tg, a.addr);
            if h == Health::Unhealthy {
                let failed = a.fails() - fails0;
                assert!(failed >= FALL, "a unhealthy after only {failed} failed checks (fall = {FALL})");
                break;
            }
            assert_eq!(h, Health::Healthy);
            assert!(failed <= FALL, "a still healthy after {failed} failed checks (fall = {FALL})");
            let before = a.proxied();
            let r = ask(tg.addr).await;
            assert_eq!(r.status, 200, "{r:?}");
            if failed >= 1 && a.proxied() > before {
                served_after_a_failed_check += 1;
            }
            sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(served_after_a_failed_check > 0, "a took no request between its first failed check and fall = {FALL}");
    let last = view(&tg, a.addr).last_check.expect("a was checked");
    assert!(!last.ok && last.reason.contains("503"), "last check of a: {last:?}");
    assert_eq!(a.last_host(), a.addr.to_string(), "default Host of a check: the server's address");

    // Out: nothing reaches a.
    let served = a.proxied();
    for i in 0..20 {
        let r = ask(tg.addr).await;
        assert_eq!(r.by(), "b", "request {i} while a is unhealthy: {r:?}");
    }
    assert_eq!(a.proxied(), served, "a received requests while unhealthy");

    // Rise.
    let passes0 = a.passes();
    a.set_health(200);
    within("a rises", async {
        loop {
            let passed = a.passes() - passes0;
            let h = health(&tg, a.addr);
            if h == Health::Healthy {
                let passed = a.passes() - passes0;
                assert!(passed >= RISE, "a healthy again after only {passed} passing checks (rise = {RISE})");
                break;
            }
            assert_eq!(h, Health::Unhealthy);
            assert!(passed <= RISE, "a still unhealthy after {passed} passing checks (rise = {RISE})");
            let before = a.proxied();
            let r = ask(tg.addr).await;
            if a.proxied() > before {
                let passed = a.passes() - passes0;
                assert!(passed >= RISE, "a served {r:?} after only {passed} passing checks (rise = {RISE})");
            }
            sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let mut got = Vec::new();
    for _ in 0..20 {
        got.push(ask(tg.addr).await.by().to_string());
    }
    let n = count(&got);
    assert!(n.get("a").copied().unwrap_or(0) >= 5, "a healthy again should take its share: {n:?}");
    tg.stop().await;
    // Shutdown stops the checks too.
    sleep(Duration::from_millis(200)).await;
    let (ac, bc) = (a.checks(), b.checks());
    sleep(Duration::from_millis(500)).await;
    assert_eq!((a.checks(), b.checks()), (ac, bc), "checks continue after tidegate stopped");
}

// ---------------------------------------------------------------------------------------------
// 2. tcp and websocket checks
// ---------------------------------------------------------------------------------------------

/// A closed port fails TCP checks and takes no traffic (`tries = 1`: a request sent its way
/// would fail instead of moving on); alone, it makes every request a 503 with Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_checks_keep_a_closed_port_out() {
    let live = Ctl::start("live").await;
    let dead = support::dead_addr().await;
    let checks = "kind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 2";
    let tg = support::tidegate(&config("balance = \"round_robin\"\ntries = 1", &[srv(dead, ""), srv(live.addr, "")], checks)).await;
    wait_health(&tg, &live, Health::Healthy).await;
    wait_until("the closed port becomes unhealthy", || health(&tg, dead) == Health::Unhealthy).await;
    let v = view(&tg, live.addr).last_check.expect("live was checked");
    assert!(v.ok && v.ping_rtt.is_none(), "{v:?}");
    let v = view(&tg, dead).last_check.expect("dead was checked");
    assert!(!v.ok, "{v:?}");
    for i in 0..20 {
        let r = ask(tg.addr).await;
        assert_eq!((r.status, r.by()), (200, "live"), "request {i}: {r:?}");
    }
    assert_eq!(live.proxied(), 20);
    tg.stop().await;

    // The closed port alone: 503 + Retry-After, before its first verdict and after.
    let tg = support::tidegate(&config("", &[srv(dead, "")], checks)).await;
    let r = ask(tg.addr).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.retry_after.is_some(), "503 without Retry-After: {r:?}");
    wait_until("the closed port becomes unhealthy", || health(&tg, dead) == Health::Unhealthy).await;
    let r = ask(tg.addr).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.retry_after.is_some(), "503 without Retry-After: {r:?}");
    tg.stop().await;
}

/// WebSocket checks: a 400, a 200 or a 101 with a wrong accept key to the handshake is a
/// failure; the demo backend's correct 101 passes, with the ping's round trip recorded and the
/// live count read from the 101's header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_checks_need_a_real_handshake() {
    let c400 = Ctl::start("c400").await;
    c400.set_ws(400);
    let c200 = Ctl::start("c200").await;
    c200.set_ws(200);
    let cbad = Ctl::start("cbad").await;
    cbad.set_ws(BAD_ACCEPT);
    let c101 = Ctl::start("c101").await;
    let (demo, demo_task) = support::backend("demo").await;
    let checks = "kind = \"websocket\"\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 2\n\
                  load = \"header:X-Live-Connections\"";
    let servers = [srv(c400.addr, ""), srv(c200.addr, ""), srv(cbad.addr, ""), srv(c101.addr, ""), srv(demo, "")];
    let tg = support::tidegate(&config(r#"balance = "round_robin""#, &servers, checks)).await;
    wait_until("the demo backend passes its WebSocket check", || health(&tg, demo) == Health::Healthy).await;
    wait_health(&tg, &c101, Health::Healthy).await;
    for (c, code) in [(&c400, "400"), (&c200, "200"), (&cbad, "")] {
        wait_health(&tg, c, Health::Unhealthy).await;
        let last = view(&tg, c.addr).last_check.expect("checked");
        assert!(!last.ok && last.ping_rtt.is_none() && last.reason.contains(code), "{}: {last:?}", c.name);
    }
    let v = view(&tg, demo);
    let last = v.last_check.clone().expect("demo was checked");
    assert!(last.ok, "{v:?}");
    assert!(last.ping_rtt.is_some(), "a passing WebSocket check should record the ping's round trip: {v:?}");
    assert!(matches!(v.reported, Some(0 | 1)), "the demo's 101 reports its live count: {v:?}");
    let last = view(&tg, c101.addr).last_check.expect("c101 was checked");
    assert!(last.ok && last.ping_rtt.is_some(), "{last:?}");

    let mut got = Vec::new();
    for _ in 0..20 {
        got.push(ask(tg.addr).await.by().to_string());
    }
    let n = count(&got);
    assert_eq!(n.keys().map(String::as_str).collect::<Vec<_>>(), ["c101", "demo"], "only the servers with a real handshake: {n:?}");
    for c in [&c400, &c200, &cbad] {
        assert_eq!(c.proxied(), 0, "{} took traffic", c.name);
    }
    tg.stop().await;
    demo_task.abort();
}

// ---------------------------------------------------------------------------------------------
// 3. reported load
// ---------------------------------------------------------------------------------------------

/// a reports 500 live connections, b and c report 0: 60 tunnels and 200 requests all avoid a.
async fn reported_load_steers(balance: &str) {
    let a = Ctl::start("a").await;
    let b = Ctl::start("b").await;
    let c = Ctl::start("c").await;
    a.set_report(Report::Fixed("500".into()));
    b.set_report(Report::Fixed("0".into()));
    c.set_report(Report::Fixed("0".into()));
    let text = config(
        &format!(r#"balance = "{balance}""#),
        &[srv(a.addr, ""), srv(b.addr, ""), srv(c.addr, "")],
        &http_checks("100ms", "load = \"header:X-Live-Connections\""),
    );
    let tg = support::tidegate(&text).await;
    wait_until("reports arrive", || {
        view(&tg, a.addr).reported == Some(500) && view(&tg, b.addr).reported == Some(0) && view(&tg, c.addr).reported == Some(0)
    })
    .await;
    for x in [&a, &b, &c] {
        assert_eq!(health(&tg, x.addr), Health::Healthy, "{}", x.name);
    }
    let to = tg.addr;
    let opened: Vec<(TcpStream, String)> = stream::iter(0..60).map(|_| tunnel(to)).buffer_unordered(8).collect().await;
    let mut got: Vec<String> = opened.iter().map(|(_, n)| n.clone()).collect();
    for _ in 0..200 {
        got.push(ask(tg.addr).await.by().to_string());
    }
    let n = count(&got);
    println!("{balance}: a reports 500, b and c report 0: 60 tunnels + 200 requests went {n:?}");
    assert_eq!(n.get("a"), None, "{balance}: a reports 500 live connections and should get nothing: {n:?}");
    assert_eq!(a.proxied(), 0);
    let v = view(&tg, a.addr);
    assert_eq!(v.reported, Some(500), "{v:?}");
    assert!(v.merged >= 500, "{v:?}");
    assert_eq!(v.local, 0, "{v:?}");
    wait_until("b and c hold the 60 tunnels", || b.tunnels() + c.tunnels() == 60).await;
    assert_eq!(a.tunnels(), 0);
    wait_until("b and c count the 60 tunnels alone", || tg.live("app", b.addr) + tg.live("app", c.addr) == 60).await;
    drop(opened);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_load_steers_least_conn() {
    reported_load_steers("least_conn").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_load_steers_p2c() {
    reported_load_steers("p2c").await;
}

/// A garbage report, a missing header and a stale report (checks time out; `fall` is high so
/// the server stays healthy) each make tidegate fall back to its own count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_missing_and_stale_reports_fall_back_to_the_local_count() {
    let a = Ctl::start("a").await;
    let b = Ctl::start("b").await;
    a.set_report(Report::Fixed("500".into()));
    b.set_report(Report::Live);
    let text = config(
        r#"balance = "least_conn""#,
        &[srv(a.addr, ""), srv(b.addr, "")],
        &http_checks("100ms", "fall = 1000\nload = \"header:X-Live-Connections\""),
    );
    let tg = support::tidegate(&text).await;
    wait_until("a's report arrives", || view(&tg, a.addr).reported == Some(500)).await;
    wait_health(&tg, &b, Health::Healthy).await;

    // Garbage.
    a.set_report(Report::Fixed("abc".into()));
    wait_until("the garbage report is dropped", || view(&tg, a.addr).reported.is_none()).await;
    assert_eq!(health(&tg, a.addr), Health::Healthy, "a garbage report is not a failed check");
    let mut held = Vec::new();
    let mut got = Vec::new();
    for _ in 0..20 {
        let (s, n) = tunnel(tg.addr).await;
        got.push(n);
        held.push(s);
    }
    let n = count(&got);
    println!("a reports \"abc\", b its true count: 20 tunnels went {n:?}");
    let na = n.get("a").copied().unwrap_or(0);
    assert!((8..=12).contains(&na), "with a's report ignored, 20 tunnels should split about evenly: {n:?}");
    let v = view(&tg, a.addr);
    assert_eq!((v.reported, v.merged), (None, v.local), "{v:?}");
    assert_eq!(v.local as usize, na, "{v:?}");

    // Missing header.
    a.set_report(Report::Fixed("500".into()));
    wait_until("a's report is back", || view(&tg, a.addr).reported == Some(500)).await;
    assert!(view(&tg, a.addr).merged >= 500);
    a.set_report(Report::None);
    wait_until("the missing report is noticed", || view(&tg, a.addr).reported.is_none()).await;
    let v = view(&tg, a.addr);
    assert_eq!(v.merged, v.local, "{v:?}");
    assert_eq!(v.health, Health::Healthy, "{v:?}");

    // Stale: the server stops answering checks (they time out and keep failing).
    a.set_report(Report::Fixed("500".into()));
    wait_until("a's report is back", || view(&tg, a.addr).reported == Some(500)).await;
    a.set_health(HANG);
    wait_until("the stale report expires", || view(&tg, a.addr).reported.is_none()).await;
    let v = view(&tg, a.addr);
    assert_eq!(v.merged, v.local, "{v:?}");
    assert_eq!(v.health, Health::Healthy, "fall = 1000: still healthy: {v:?}");
    let last = v.last_check.expect("checked");
    assert!(!last.ok, "the checks of a hanging server fail: {last:?}");
    drop(held);
    tg.stop().await;
}

/// `json:/live` and `body` read the count from the body; a non-integer there is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_body_load_sources() {
    for (load, carrier) in [("json:/live", Carrier::Json), ("body", Carrier::Body)] {
        let a = Ctl::start("a").await;
        let b = Ctl::start("b").await;
        for x in [&a, &b] {
            x.set_carrier(carrier);
        }
        a.set_report(Report::Fixed("500".into()));
        b.set_report(Report::Fixed("0".into()));
        let text =
            config(r#"balance = "least_conn""#, &[srv(a.addr, ""), srv(b.addr, "")], &http_checks("100ms", &format!("load = \"{load}\"")));
        let tg = support::tidegate(&text).await;
        wait_until(&format!("{load}: reports arrive"), || view(&tg, a.addr).reported == Some(500) && view(&tg, b.addr).reported == Some(0))
            .await;
        let v = view(&tg, a.addr);
        assert!(v.merged >= 500, "{load}: {v:?}");
        for i in 0..30 {
            let r = ask(tg.addr).await;
            assert_eq!(r.by(), "b", "{load}: request {i} went to the server reporting 500");
        }
        for garbage in ["\"abc\"", "-5", "1.5"] {
            a.set_report(Report::Fixed("500".into()));
            wait_until(&format!("{load}: report back"), || view(&tg, a.addr).reported == Some(500)).await;
            a.set_report(Report::Fixed(garbage.into()));
            wait_until(&format!("{load}: report {garbage} ignored"), || view(&tg, a.addr).reported.is_none()).await;
            let v = view(&tg, a.addr);
            assert_eq!((v.merged, v.health), (v.local, Health::Healthy), "{load} {garbage}: {v:?}");
        }
        tg.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// 4. two tidegates, one shared view
// ---------------------------------------------------------------------------------------------

/// The demo backend's own count of open WebSocket connections (its `/healthz` header).
async fn live_of(addr: SocketAddr) -> u32 {
    let req = Request::get("/healthz").header("host", "test").body(Full::new(Bytes::new())).expect("request");
    let (status, headers, _) = within("backend /healthz", support::request(addr, req)).await;
    assert_eq!(status, 200);
    headers.get("x-live-connections").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).expect("x-live-connections")
}

/// Three demo backends. Instance A (backends 1 and 2, least_conn, no checks) holds 300 tunnels;
/// then instance B (all three, least_conn, checks every 100 ms, with or without `load`) opens
/// 150 one at a time. Returns the backends' own final counts and where B's tunnels went.
async fn two_instances(with_load: bool) -> ([u32; 3], BTreeMap<String, usize>) {
    let names = ["one", "two", "three"];
    let mut addrs = Vec::new();
    let mut tasks = Vec::new();
    for n in names {
        let (addr, task) = support::backend(n).await;
        addrs.push(addr);
        tasks.push(task);
    }
    let ta = support::tidegate(&config(r#"balance = "least_conn""#, &[srv(addrs[0], ""), srv(addrs[1], "")], "")).await;
    let load = if with_load { "load = \"header:X-Live-Connections\"" } else { "" };
    let all: Vec<String> = addrs.iter().map(|a| srv(*a, "")).collect();
    let tb = support::tidegate(&config(r#"balance = "least_conn""#, &all, &http_checks("100ms", load))).await;
    wait_until("B's checks pass", || addrs.iter().all(|a| health(&tb, *a) == Health::Healthy)).await;

    let to = ta.addr;
    let through_a: Vec<(TcpStream, String)> = stream::iter(0..300).map(|_| tunnel(to)).buffer_unordered(16).collect().await;
    let mut counts = [0u32; 3];
    within("the backends count A's 300 tunnels", async {
        loop {
            for (i, a) in addrs.iter().enumerate() {
                counts[i] = live_of(*a).await;
            }
            if counts.iter().sum::<u32>() == 300 {
                break;
            }
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    println!("load={with_load}: after 300 tunnels through A the backends count {counts:?}");
    assert_eq!(counts[2], 0, "A does not know backend three");
    if with_load {
        wait_until("B's checks see A's tunnels", || (0..3).all(|i| view(&tb, addrs[i]).reported == Some(counts[i]))).await;
    }

    let mut through_b = Vec::new();
    let mut placed = Vec::new();
    for _ in 0..150 {
        let (s, n) = tunnel(tb.addr).await;
        placed.push(n);
        through_b.push(s);
    }
    let placed = count(&placed);
    within("the backends count all 450 tunnels", async {
        loop {
            for (i, a) in addrs.iter().enumerate() {
                counts[i] = live_of(*a).await;
            }
            if counts.iter().sum::<u32>() == 450 {
                break;
            }
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let views: Vec<BackendView> = addrs.iter().map(|a| view(&tb, *a)).collect();
    println!("load={with_load}: B placed its 150 tunnels {placed:?}; final per-backend counts {counts:?}");
    println!(
        "load={with_load}: B's views (reported, local, merged): {:?}",
        views.iter().map(|v| (v.reported, v.local, v.merged)).collect::<Vec<_>>()
    );
    drop(through_a);
    drop(through_b);
    ta.stop().await;
    tb.stop().await;
    for t in tasks {
        t.abort();
    }
    (counts, placed)
}

/// The key test: with `load`, B fills the backend A does not use, ending 150/150/150 (±10 %);
/// without, B balances on its own (empty) counts and ends near 200/200/50.
/// File descriptors: 450 tunnels × 4 sockets per run, well under this machine's 20,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_one_view_through_reported_load() {
    let (with, placed_with) = two_instances(true).await;
    let (without, placed_without) = two_instances(false).await;
    println!("two instances, final per-backend counts (ideal with load 150/150/150, without 200/200/50):");
    println!("  with load:    {with:?} (B placed {placed_with:?})");
    println!("  without load: {without:?} (B placed {placed_without:?})");
    for (i, n) in with.iter().enumerate() {
        assert!((135..=165).contains(n), "with load, backend {} ends at {n}, outside 150 ± 10 %: {with:?}", i + 1);
    }
    assert!(with[2] >= 140, "with load, backend three should take (almost) all of B's 150 tunnels: {with:?}");
    assert!(without[2] <= 60, "without load, B spreads evenly over its own counts, backend three near 50: {without:?}");
    assert!(without[2] >= 40, "without load, B's least_conn should still give backend three a third: {without:?}");
}

// ---------------------------------------------------------------------------------------------
// 5. nothing healthy; backup
// ---------------------------------------------------------------------------------------------

/// Every server unhealthy: 503 with Retry-After at once (median of 5 under 100 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_unhealthy_is_a_fast_503_with_retry_after() {
    let a = Ctl::start("a").await;
    let b = Ctl::start("b").await;
    a.set_health(503);
    b.set_health(503);
    let tg = support::tidegate(&config("", &[srv(a.addr, ""), srv(b.addr, "")], &http_checks("100ms", "fall = 2"))).await;
    wait_health(&tg, &a, Health::Unhealthy).await;
    wait_health(&tg, &b, Health::Unhealthy).await;
    let mut took = Vec::new();
    for i in 0..5 {
        let start = Instant::now();
        let r = ask(tg.addr).await;
        took.push(start.elapsed());
        assert_eq!(r.status, 503, "request {i}: {r:?}");
        assert_eq!(r.retry_after.as_deref(), Some("1"), "request {i}: {r:?}");
        assert_eq!(r.backend, None, "request {i}: {r:?}");
    }
    took.sort();
    println!("503 with every server unhealthy took {took:?}");
    let (_s, r) = upgrade(tg.addr).await;
    assert_eq!(r.status, 503, "WebSocket upgrade with every server unhealthy: {r:?}");
    assert_eq!(r.retry_after.as_deref(), Some("1"), "{r:?}");
    assert!(took[2] < Duration::from_millis(100), "median 503 took {:?}: {took:?}", took[2]);
    assert_eq!(a.proxied() + b.proxied(), 0);
    tg.stop().await;
}

/// The backup takes nothing while a primary is healthy, everything once both fail their checks,
/// and nothing again once they pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_takes_over_when_primaries_fail_their_checks() {
    let a = Ctl::start("a").await;
    let b = Ctl::start("b").await;
    let c = Ctl::start("c").await;
    let servers = [srv(a.addr, ""), srv(b.addr, ""), srv(c.addr, "backup = true")];
    let tg = support::tidegate(&config(r#"balance = "round_robin""#, &servers, &http_checks("100ms", "fall = 2\nrise = 2"))).await;
    for x in [&a, &b, &c] {
        wait_health(&tg, x, Health::Healthy).await;
    }
    for i in 0..20 {
        assert_ne!(ask(tg.addr).await.by(), "c", "request {i}: backup used while the primaries are healthy");
    }
    a.set_health(503);
    b.set_health(503);
    wait_health(&tg, &a, Health::Unhealthy).await;
    wait_health(&tg, &b, Health::Unhealthy).await;
    for i in 0..20 {
        assert_eq!(ask(tg.addr).await.by(), "c", "request {i}: both primaries unhealthy");
    }
    a.set_health(200);
    b.set_health(200);
    wait_health(&tg, &a, Health::Healthy).await;
    wait_health(&tg, &b, Health::Healthy).await;
    let before = c.proxied();
    for i in 0..20 {
        assert_ne!(ask(tg.addr).await.by(), "c", "request {i}: backup used after the primaries recovered");
    }
    assert_eq!(c.proxied(), before);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. flapping
// ---------------------------------------------------------------------------------------------

/// An unhealthy server that alternates fail / pass never reaches `rise = 2` consecutive passes:
/// over 15+ checks it stays unhealthy and receives no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_server_never_rises() {
    let a = Ctl::start("a").await;
    let b = Ctl::start("b").await;
    a.set_health(503);
    let tg = support::tidegate(&config(
        r#"balance = "round_robin""#,
        &[srv(a.addr, ""), srv(b.addr, "")],
        &http_checks("100ms", "rise = 2\nfall = 2"),
    ))
    .await;
    wait_health(&tg, &a, Health::Unhealthy).await;
    wait_health(&tg, &b, Health::Healthy).await;
    a.set_flap(true);
    let start = a.checks();
    let mut requests = 0;
    within("15 flapping checks", async {
        while a.checks() < start + 15 {
            assert_ne!(health(&tg, a.addr), Health::Healthy, "a flapping server became healthy after {} checks", a.checks() - start);
            assert_eq!(ask(tg.addr).await.by(), "b");
            requests += 1;
            sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(a.passes() >= 7, "the flapping server passed {} checks", a.passes());
    assert_eq!(health(&tg, a.addr), Health::Unhealthy);
    assert_eq!(a.proxied(), 0, "a flapping server received requests");
    println!("flapping: {} checks ({} passes), {requests} requests, none to a", a.checks() - start, a.passes());
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. reconcile on apply
// ---------------------------------------------------------------------------------------------

/// `app` (x, backup w) and `other` (y, reached with Host: other), both checked.
fn two_upstreams(x: SocketAddr, w: Option<SocketAddr>, y: Option<SocketAddr>, app_health: &str) -> String {
    let mut s = String::from("shutdown_timeout = \"2s\"\n\n[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\n");
    if y.is_some() {
        s.push_str("  [[listener.route]]\n  host = \"other\"\n  upstream = \"other\"\n\n");
    }
    s.push_str("  [[listener.route]]\n  upstream = \"app\"\n\n[upstream.app]\nbalance = \"least_conn\"\nservers = [\n");
    s.push_str(&format!("  {},\n", srv(x, "")));
    if let Some(w) = w {
        s.push_str(&format!("  {},\n", srv(w, "backup = true")));
    }
    s.push_str("]\n");
    if !app_health.is_empty() {
        s.push_str(&format!("\n  [upstream.app.health]\n{app_health}\n"));
    }
    if let Some(y) = y {
        s.push_str(&format!(
            "\n[upstream.other]\nservers = [ {} ]\n\n  [upstream.other.health]\n{}\n",
            srv(y, ""),
            http_checks("100ms", "")
        ));
    }
    s
}

/// Checks arriving at `c` within `window`.
async fn checks_during(c: &Ctl, window: Duration) -> u32 {
    let before = c.checks();
    sleep(window).await;
    c.checks() - before
}

/// Removing an upstream and a server stops their checks; a kept server keeps its health and
/// live count across the apply, and a changed interval restarts its check (one task, not two).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_check_task_outlives_its_server() {
    let x = Ctl::start("x").await;
    let w = Ctl::start("w").await;
    let y = Ctl::start("y").await;
    let tg = support::tidegate(&two_upstreams(x.addr, Some(w.addr), Some(y.addr), &http_checks("100ms", ""))).await;
    wait_health(&tg, &x, Health::Healthy).await;
    wait_health(&tg, &w, Health::Healthy).await;
    wait_until("y becomes healthy", || view_in(&tg, "other", y.addr).health == Health::Healthy).await;
    let mut running = tg.shared.health.running();
    running.sort_by_key(|i| (i.upstream.clone(), i.addr));
    let mut want = vec![id("app", x.addr), id("app", w.addr), id("other", y.addr)];
    want.sort_by_key(|i| (i.upstream.clone(), i.addr));
    assert_eq!(running, want);
    let mut held = Vec::new();
    for i in 0..10 {
        let (s, n) = tunnel(tg.addr).await;
        assert_eq!(n, "x", "tunnel {i}");
        held.push(s);
    }
    assert_eq!(tg.live("app", x.addr), 10);

    // Drop `other` (and y) and the backup w.
    tg.shared.apply(parse(&two_upstreams(x.addr, None, None, &http_checks("100ms", "")))).expect("apply");
    assert_eq!(tg.shared.health.running(), vec![id("app", x.addr)], "only x is still checked");
    assert_eq!(health(&tg, x.addr), Health::Healthy, "x keeps its health across the apply");
    assert_eq!(tg.live("app", x.addr), 10, "x keeps its live count across the apply");
    sleep(Duration::from_millis(300)).await;
    let (yc, wc, xc) = (y.checks(), w.checks(), x.checks());
    sleep(Duration::from_millis(700)).await;
    assert_eq!(y.checks(), yc, "the removed upstream's server is still being checked");
    assert_eq!(w.checks(), wc, "the removed server is still being checked");
    assert!(x.checks() >= xc + 3, "the kept server is no longer checked: {} checks in 700 ms", x.checks() - xc);

    // A changed interval restarts x's check: still healthy, still 10 live, one task.
    tg.shared.apply(parse(&two_upstreams(x.addr, None, None, &http_checks("200ms", "")))).expect("apply");
    assert_eq!(health(&tg, x.addr), Health::Healthy, "a restarted check keeps the verdict");
    assert_eq!(tg.live("app", x.addr), 10);
    assert_eq!(tg.shared.health.running(), vec![id("app", x.addr)]);
    sleep(Duration::from_millis(250)).await;
    let n = checks_during(&x, Duration::from_millis(1200)).await;
    // One task every 180..220 ms: at most 1200/180 + 1 = 7 checks; two tasks would be ~12+.
    assert!(n <= 8, "{n} checks in 1.2 s at interval 200ms: the old check task still runs");
    assert!(n >= 3, "{n} checks in 1.2 s at interval 200ms");

    // No [health] any more: no check runs, the server stays in service.
    tg.shared.apply(parse(&two_upstreams(x.addr, None, None, ""))).expect("apply");
    assert!(tg.shared.health.running().is_empty(), "{:?}", tg.shared.health.running());
    sleep(Duration::from_millis(300)).await;
    let xc = x.checks();
    sleep(Duration::from_millis(500)).await;
    assert_eq!(x.checks(), xc, "checks continue after [health] was removed");
    assert_eq!(health(&tg, x.addr), Health::Healthy);
    assert_eq!(tg.live("app", x.addr), 10);
    assert_eq!(ask(tg.addr).await.by(), "x");
    drop(held);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. passive + active; panic mode
// ---------------------------------------------------------------------------------------------

/// `fail_on = [502]`, `max_fails = 2`: two 502s take a out (Unhealthy) at once; it stays out past
/// `fail_timeout` while its checks fail, and comes back after `rise` passing checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_failures_take_a_server_out_until_active_checks_bring_it_back() {
    const RISE: u32 = 2;
    let a = Ctl::start("a").await;
    let b = Ctl::start("b").await;
    let text = config(
        "balance = \"round_robin\"\nfail_on = [502]",
        &[srv(a.addr, r#"max_fails = 2, fail_timeout = "300ms""#), srv(b.addr, "")],
        &http_checks("100ms", &format!("rise = {RISE}\nfall = 1000")),
    );
    let tg = support::tidegate(&text).await;
    wait_health(&tg, &a, Health::Healthy).await;
    wait_health(&tg, &b, Health::Healthy).await;
    // Checks keep failing from now on, but fall = 1000: only the passive failures count.
    a.set_health(503);
    a.set_proxied_status(502);
    within("a answers two requests", async {
        while a.proxied() < 2 {
            let r = ask(tg.addr).await;
            if r.by() == "a" {
                assert_eq!(r.status, 502, "{r:?}");
                if a.proxied() == 1 {
                    assert_eq!(health(&tg, a.addr), Health::Healthy, "one 502 of max_fails = 2 took a out");
                }
            }
        }
    })
    .await;
    assert_eq!(health(&tg, a.addr), Health::Unhealthy, "two 502s (max_fails = 2) should take a out");

    // Out well past fail_timeout: no timer brings it back.
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        let r = ask(tg.addr).await;
        assert_eq!((r.status, r.by()), (200, "b"), "{r:?}");
        sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(health(&tg, a.addr), Health::Unhealthy, "a came back without a passing check");
    assert_eq!(a.proxied(), 2);

    // Passing checks bring it back, after rise of them.
    a.set_proxied_status(200);
    let passes0 = a.passes();
    a.set_health(200);
    wait_health(&tg, &a, Health::Healthy).await;
    let passed = a.passes() - passes0;
    assert!(passed >= RISE, "a back after {passed} passing checks (rise = {RISE})");
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(ask(tg.addr).await.by().to_string());
    }
    assert!(got.iter().any(|n| n == "a"), "a healthy again takes no traffic: {got:?}");
    tg.stop().await;
}

/// `panic_threshold = 0.5`: with 1 of 3 healthy, health is disregarded and all three serve;
/// with 2 of 3 healthy it is not, and the unhealthy one serves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_threshold_spreads_over_all_servers_when_too_few_are_healthy() {
    let a = Ctl::start("a").await;
    let b = Ctl::start("b").await;
    let c = Ctl::start("c").await;
    b.set_health(503);
    c.set_health(503);
    let text = config(
        "balance = \"round_robin\"\npanic_threshold = 0.5",
        &[srv(a.addr, ""), srv(b.addr, ""), srv(c.addr, "")],
        &http_checks("100ms", "fall = 2\nrise = 2"),
    );
    let tg = support::tidegate(&text).await;
    wait_health(&tg, &a, Health::Healthy).await;
    wait_health(&tg, &b, Health::Unhealthy).await;
    wait_health(&tg, &c, Health::Unhealthy).await;
    assert!(tg.shared.runtime.load().upstreams[0].in_panic());
    let mut got = Vec::new();
    for _ in 0..30 {
        got.push(ask(tg.addr).await.by().to_string());
    }
    let n = count(&got);
    println!("panic mode, 1 of 3 healthy: {n:?}");
    for x in ["a", "b", "c"] {
        assert!(n.get(x).copied().unwrap_or(0) >= 5, "panic mode should use every server: {n:?}");
    }

    b.set_health(200);
    wait_health(&tg, &b, Health::Healthy).await;
    assert!(!tg.shared.runtime.load().upstreams[0].in_panic());
    let before = c.proxied();
    for i in 0..30 {
        assert_ne!(ask(tg.addr).await.by(), "c", "request {i}: 2 of 3 healthy is no panic; c is unhealthy");
    }
    assert_eq!(c.proxied(), before);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 9. start_healthy
// ---------------------------------------------------------------------------------------------

/// `/healthz` hangs (checks every 2 s, timeout 2 s), so no check completes during the test.
/// `start_healthy = true`: the server serves before its first check, also when added by an
/// apply. Default: it takes nothing (503 when alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_healthy_serves_before_the_first_check() {
    let a = Ctl::start("a").await;
    a.set_health(HANG);
    let slow = http_checks("2s", "start_healthy = true");
    let tg = support::tidegate(&config("", &[srv(a.addr, "")], &slow)).await;
    assert_eq!(health(&tg, a.addr), Health::Healthy);
    let r = ask(tg.addr).await;
    assert_eq!((r.status, r.by()), (200, "a"), "{r:?}");
    assert_eq!(view(&tg, a.addr).last_check, None, "served before any check completed");
    tg.stop().await;

    let default = http_checks("2s", "");
    let tg = support::tidegate(&config("", &[srv(a.addr, "")], &default)).await;
    assert_eq!(health(&tg, a.addr), Health::Unknown);
    let r = ask(tg.addr).await;
    assert_eq!(r.status, 503, "an unchecked new server takes no traffic by default: {r:?}");
    assert!(r.retry_after.is_some(), "{r:?}");
    tg.stop().await;

    // Added by an apply.
    let b = Ctl::start("b").await;
    for (checks, serves) in [(&slow, true), (&default, false)] {
        let tg = support::tidegate(&config(r#"balance = "round_robin""#, &[srv(b.addr, "")], checks)).await;
        if !serves {
            // b is new too: it needs its first pass (which b's /healthz gives at once).
            wait_health(&tg, &b, Health::Healthy).await;
        }
        let text = config(r#"balance = "round_robin""#, &[srv(b.addr, ""), srv(a.addr, "")], checks);
        tg.shared.apply(parse(&text)).expect("apply");
        let want = if serves { Health::Healthy } else { Health::Unknown };
        assert_eq!(health(&tg, a.addr), want, "start_healthy = {serves}: a added by apply");
        let before = a.proxied();
        for _ in 0..10 {
            assert_eq!(ask(tg.addr).await.status, 200);
        }
        let took = a.proxied() - before;
        if serves {
            assert!(took >= 4, "start_healthy: a added by apply should serve at once, took {took} of 10");
        } else {
            assert_eq!(took, 0, "a added by apply served before its first check");
        }
        assert_eq!(view(&tg, a.addr).last_check, None);
        tg.stop().await;
    }
}

/// Default `start_healthy = false`: a server without `/healthz` (404) never takes traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_check_never_passes_never_serves() {
    let a = Ctl::start("a").await;
    let b = Ctl::start("b").await;
    a.set_health(404);
    let tg =
        support::tidegate(&config(r#"balance = "round_robin""#, &[srv(a.addr, ""), srv(b.addr, "")], &http_checks("100ms", "fall = 2")))
            .await;
    wait_health(&tg, &b, Health::Healthy).await;
    within("10 checks of a", async {
        while a.checks() < 10 {
            assert_ne!(health(&tg, a.addr), Health::Healthy);
            assert_eq!(ask(tg.addr).await.by(), "b");
            sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(health(&tg, a.addr), Health::Unhealthy);
    let last = view(&tg, a.addr).last_check.expect("checked");
    assert!(!last.ok && last.reason.contains("404"), "{last:?}");
    assert_eq!(a.proxied(), 0);
    tg.stop().await;
}

/// `expect` lists the passing statuses (a 201 fails although it is 2xx); `host` is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_and_host_settings_are_honoured() {
    let a = Ctl::start("a").await;
    let b = Ctl::start("b").await;
    let c = Ctl::start("c").await;
    a.set_health(204);
    b.set_health(201);
    let tg = support::tidegate(&config(
        r#"balance = "round_robin""#,
        &[srv(a.addr, ""), srv(b.addr, ""), srv(c.addr, "")],
        &http_checks("100ms", "fall = 2\nexpect = [200, 204]\nhost = \"chat.internal\""),
    ))
    .await;
    wait_health(&tg, &a, Health::Healthy).await;
    wait_health(&tg, &c, Health::Healthy).await;
    wait_health(&tg, &b, Health::Unhealthy).await;
    let last = view(&tg, b.addr).last_check.expect("checked");
    assert!(!last.ok && last.reason.contains("201"), "{last:?}");
    for x in [&a, &b, &c] {
        assert_eq!(x.last_host(), "chat.internal", "{}", x.name);
    }
    let mut got = Vec::new();
    for _ in 0..20 {
        got.push(ask(tg.addr).await.by().to_string());
    }
    let n = count(&got);
    assert_eq!(n.get("b"), None, "b answers 201, not in expect: {n:?}");
    assert_eq!(n.len(), 2, "{n:?}");
    tg.stop().await;
}
