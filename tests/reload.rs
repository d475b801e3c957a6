//! Hot reload and draining, black box: reloads applied in process (`Shared::apply`,
//! `reload::reload_file`) and through the binary (file change, `tidegate reload`, SIGHUP),
//! with real WebSocket tunnels and HTTP requests on 127.0.0.1 flowing the whole time.
//!
//! The reload storm is the heaviest test and runs alone (it takes `HEAVY` for writing, every
//! other test takes it for reading), so its figures and the drain timings of the other tests
//! are not skewed by each other on a small CI machine. Every wait is bounded.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, stream};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{RwLock, RwLockReadGuard};
use tokio::task::JoinHandle;
use tokio::time::{MissedTickBehavior, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

/// Upper bound for any single client operation (connect, handshake, echo, request).
const WAIT: Duration = Duration::from_secs(10);
/// Upper bound for waiting for the storm to finish before another test starts.
const LOCK_WAIT: Duration = Duration::from_secs(120);

/// The storm: tunnels held open, each echoing a numbered message every `STORM_PING`.
const STORM_TUNNELS: usize = 1000;
const STORM_PING: Duration = Duration::from_millis(100);
const STORM_RELOADS: usize = 50;
const STORM_RELOAD_EVERY: Duration = Duration::from_millis(300);
/// HTTP GET loops during the storm: half on keep-alive connections, half on fresh ones.
const STORM_HTTP_LOOPS: usize = 4;
const STORM_HTTP_PACE: Duration = Duration::from_millis(5);

/// Written by the storm, read by everything else: the storm runs alone.
static HEAVY: RwLock<()> = RwLock::const_new(());

async fn not_during_storm() -> RwLockReadGuard<'static, ()> {
    timeout(LOCK_WAIT, HEAVY.read()).await.expect("the storm test finishes within its bound")
}

// ---------------------------------------------------------------------------------------------
// Backends, configs, reloads
// ---------------------------------------------------------------------------------------------

/// Demo backends by name (HTTP + WebSocket echo, `x-backend: NAME`); aborted on drop.
struct Backends {
    list: Vec<(String, SocketAddr, JoinHandle<()>)>,
}

impl Backends {
    async fn start(names: &[&str]) -> Backends {
        let mut list = Vec::new();
        for n in names {
            let (addr, task) = support::backend(n).await;
            list.push((n.to_string(), addr, task));
        }
        Backends { list }
    }

    fn addr(&self, name: &str) -> SocketAddr {
        self.list.iter().find(|(n, _, _)| n == name).unwrap_or_else(|| panic!("no backend {name}")).1
    }

    /// `servers` entries for `names`, `extra` (inline-table keys) added to each.
    fn servers(&self, names: &[&str], extra: &str) -> Vec<String> {
        names.iter().map(|n| srv(self.addr(n), extra)).collect()
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for (_, _, t) in &self.list {
            t.abort();
        }
    }
}

fn srv(addr: SocketAddr, extra: &str) -> String {
    if extra.is_empty() { format!(r#"{{ addr = "{addr}" }}"#) } else { format!(r#"{{ addr = "{addr}", {extra} }}"#) }
}

/// `drain_timeout` and `drain_spread` keys for an upstream table.
fn drain(timeout: &str, spread: &str) -> String {
    format!("drain_timeout = \"{timeout}\"\ndrain_spread = \"{spread}\"")
}

/// One listener "test" on 127.0.0.1:0 routing everything to upstream `app`.
fn app_config(servers: &[String], upstream_keys: &str) -> String {
    listener_config(&[("test", "127.0.0.1:0")], servers, upstream_keys)
}

/// Listeners `(name, bind)`, each routing everything to upstream `app`.
fn listener_config(listeners: &[(&str, &str)], servers: &[String], upstream_keys: &str) -> String {
    let mut out = String::from("shutdown_timeout = \"5s\"\n");
    for (name, bind) in listeners {
        out.push_str(&format!("\n[[listener]]\nname = \"{name}\"\nbind = \"{bind}\"\n\n  [[listener.route]]\n  upstream = \"app\"\n"));
    }
    out.push_str(&format!("\n[upstream.app]\n{upstream_keys}\nservers = [\n  {}\n]\n", servers.join(",\n  ")));
    out
}

fn parse(toml: &str) -> tidegate::config::Config {
    tidegate::config::load_str(toml, Path::new("test.toml")).unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{toml}"))
}

fn apply(tg: &support::Proxy, toml: &str) -> Result<u64, String> {
    tg.shared.apply(parse(toml))
}

fn generation(tg: &support::Proxy) -> u64 {
    tg.shared.runtime.load().generation
}

/// The state of backend `addr` of upstream `upstream` (found by identity, as a reload does).
fn backend_state(tg: &support::Proxy, upstream: &str, addr: SocketAddr) -> Arc<tidegate::runtime::BackendState> {
    tg.shared.registry.get_or_create(tidegate::runtime::BackendId { upstream: upstream.to_string(), addr })
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// A directory under the temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("tidegate-reload-{}-{n}-{nanos}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// 1-based number of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle:?} not in:\n{text}")) + 1
}

// ---------------------------------------------------------------------------------------------
// HTTP clients
// ---------------------------------------------------------------------------------------------

/// `GET /` on a fresh connection: the answering backend (`x-backend` of a 200), or why not.
async fn try_get(to: SocketAddr) -> Result<String, String> {
    let mut c = http_connect(to).await?;
    http_get(&mut c).await
}

async fn http_connect(to: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let fut = async {
        let s = TcpStream::connect(to).await.map_err(|e| format!("connect {to}: {e}"))?;
        let _ = s.set_nodelay(true);
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(tx)
    };
    timeout(WAIT, fut).await.unwrap_or_else(|_| Err(format!("connect {to}: timed out")))
}

/// `GET /` on `c` (kept alive): the answering backend, or why not.
async fn http_get(c: &mut SendRequest<Full<Bytes>>) -> Result<String, String> {
    let fut = async {
        c.ready().await.map_err(|e| format!("connection not usable: {e}"))?;
        let req = Request::get("/").header("host", "test").body(Full::new(Bytes::new())).expect("request");
        let resp = c.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        let backend = parts.headers.get("x-backend").and_then(|v| v.to_str().ok()).map(str::to_string);
        match (parts.status.as_u16(), backend) {
            (200, Some(b)) => Ok(b),
            (status, b) => Err(format!("status {status} from {b:?}: {}", String::from_utf8_lossy(&body))),
        }
    };
    timeout(WAIT, fut).await.unwrap_or_else(|_| Err("no response within the bound".to_string()))
}

/// The backend answering `GET /` now; panics on any failure.
async fn get(to: SocketAddr) -> String {
    try_get(to).await.unwrap_or_else(|e| panic!("GET / via {to}: {e}"))
}

#[derive(Default)]
struct HttpStats {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
    by_backend: Mutex<BTreeMap<String, u64>>,
}

/// GETs until `stop`, on one keep-alive connection (reconnecting only after a failure) or on a
/// fresh connection each time.
async fn http_loop(to: SocketAddr, keep_alive: bool, stop: CancellationToken, stats: Arc<HttpStats>) {
    let mut conn: Option<SendRequest<Full<Bytes>>> = None;
    while !stop.is_cancelled() {
        let result = async {
            if conn.is_none() || !keep_alive {
                conn = Some(http_connect(to).await?);
            }
            http_get(conn.as_mut().expect("connected")).await
        }
        .await;
        match result {
            Ok(b) => {
                stats.ok.fetch_add(1, Ordering::Relaxed);
                *stats.by_backend.lock().unwrap().entry(b).or_insert(0) += 1;
            }
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                let mut errors = stats.errors.lock().unwrap();
                if errors.len() < 10 {
                    errors.push(format!("{} connection: {e}", if keep_alive { "keep-alive" } else { "fresh" }));
                }
                conn = None;
            }
        }
        tokio::time::sleep(STORM_HTTP_PACE).await;
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket tunnels that echo numbered messages
// ---------------------------------------------------------------------------------------------

type Ws = WebSocketStream<TcpStream>;

/// Opens a WebSocket through tidegate: the stream and the backend named in the 101.
async fn try_ws(to: SocketAddr, path: &str) -> Result<(Ws, String), String> {
    let fut = async {
        let s = TcpStream::connect(to).await.map_err(|e| format!("connect {to}: {e}"))?;
        let _ = s.set_nodelay(true);
        let (ws, resp) = tokio_tungstenite::client_async(format!("ws://test{path}"), s).await.map_err(|e| format!("handshake: {e}"))?;
        let backend = resp.headers().get("x-backend").and_then(|v| v.to_str().ok()).ok_or("101 without x-backend")?.to_string();
        Ok((ws, backend))
    };
    timeout(WAIT, fut).await.unwrap_or_else(|_| Err(format!("WebSocket via {to}: timed out")))
}

async fn ws(to: SocketAddr, path: &str) -> (Ws, String) {
    try_ws(to, path).await.unwrap_or_else(|e| panic!("WebSocket {path} via {to}: {e}"))
}

/// How an echoing tunnel ended.
#[derive(Debug, Clone)]
enum End {
    /// Stopped by the test while open and echoing.
    Stopped,
    /// tidegate sent a close frame (received at `at`).
    Closed { code: Option<CloseCode>, at: Instant },
    /// Anything else: a missing, wrong or reordered echo, an error, an end without close frame.
    Failed(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Stopped => f.write_str("still open"),
            End::Closed { code, .. } => write!(f, "closed by tidegate with {code:?}"),
            End::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// A tunnel sending message `1`, `2`, ... every `period` and checking each echo is exactly the
/// number just sent.
struct Tunnel {
    backend: String,
    echoed: Arc<AtomicU64>,
    end: Arc<Mutex<Option<End>>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Tunnel {
    fn spawn(ws: Ws, backend: String, period: Duration, offset: Duration) -> Tunnel {
        let echoed = Arc::new(AtomicU64::new(0));
        let end = Arc::new(Mutex::new(None));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (echoed, end, stop) = (echoed.clone(), end.clone(), stop.clone());
            async move {
                let e = echo_loop(ws, period, offset, stop, echoed).await;
                *end.lock().unwrap() = Some(e);
            }
        });
        Tunnel { backend, echoed, end, stop, task }
    }

    async fn open(to: SocketAddr, path: &str, period: Duration) -> Tunnel {
        let (w, b) = ws(to, path).await;
        Tunnel::spawn(w, b, period, Duration::ZERO)
    }

    fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    /// How it ended, if it did.
    fn ended(&self) -> Option<End> {
        self.end.lock().unwrap().clone()
    }

    /// Stops it (if still running) and returns how it ended.
    async fn finish(self) -> End {
        self.stop.cancel();
        timeout(WAIT + WAIT, self.task).await.expect("tunnel task ends").expect("tunnel task did not panic");
        self.end.lock().unwrap().clone().expect("set when the task ends")
    }
}

/// Stops every tunnel at once; for each: (backend, messages echoed when stopped, how it ended).
async fn finish_all(ts: Vec<Tunnel>) -> Vec<(String, u64, End)> {
    let echoed: Vec<u64> = ts.iter().map(Tunnel::echoed).collect();
    for t in &ts {
        t.stop.cancel();
    }
    let mut out = Vec::with_capacity(ts.len());
    for (t, n) in ts.into_iter().zip(echoed) {
        let backend = t.backend.clone();
        out.push((backend, n, t.finish().await));
    }
    out
}

async fn echo_loop(mut ws: Ws, period: Duration, offset: Duration, stop: CancellationToken, echoed: Arc<AtomicU64>) -> End {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        // Idle: a close frame may arrive at any time; note it at once.
        let unsolicited = tokio::select! {
            biased;
            _ = stop.cancelled() => return End::Stopped,
            m = ws.next() => Some(m),
            _ = tick.tick() => None,
        };
        if let Some(m) = unsolicited {
            match m {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return end_of(&mut ws, other, n, None).await,
            }
        }
        n += 1;
        match timeout(WAIT, ws.send(Message::text(n.to_string()))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return End::Failed(format!("send of message {n} failed: {e}")),
            Err(_) => return End::Failed(format!("send of message {n} timed out")),
        }
        loop {
            let Ok(m) = timeout(WAIT, ws.next()).await else {
                return End::Failed(format!("no echo of message {n} within {WAIT:?}"));
            };
            match m {
                Some(Ok(Message::Text(t))) if t.as_str() == n.to_string() => break,
                Some(Ok(Message::Text(t))) => return End::Failed(format!("sent message {n}, the echo was {:?}", t.as_str())),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return end_of(&mut ws, other, n - 1, Some(n)).await,
            }
        }
        echoed.store(n, Ordering::Relaxed);
    }
}

/// A tunnel got something other than an echo: a close frame (answered, then read to the end)
/// or a failure.
async fn end_of(ws: &mut Ws, m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>, echoed: u64, waiting: Option<u64>) -> End {
    let at = Instant::now();
    let state = match waiting {
        Some(n) => format!("waiting for the echo of message {n}"),
        None => format!("idle after {echoed} echoes"),
    };
    match m {
        Some(Ok(Message::Close(frame))) => {
            // Let tungstenite answer the close and see the connection end, like a client would.
            let _ = timeout(Duration::from_secs(5), async { while let Some(Ok(_)) = ws.next().await {} }).await;
            End::Closed { code: frame.map(|f| f.code), at }
        }
        Some(Ok(other)) => End::Failed(format!("unexpected {other:?} while {state}")),
        Some(Err(e)) => End::Failed(format!("error while {state}: {e}")),
        None => End::Failed(format!("connection ended without a close frame while {state}")),
    }
}

/// Waits until every tunnel in `ts` has ended, or until `deadline`.
async fn wait_ended(ts: &[&Tunnel], deadline: Instant) {
    while Instant::now() < deadline && ts.iter().any(|t| t.ended().is_none()) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Opens `n` tunnels (at most 50 handshakes at a time), echoing every `period`, their first
/// messages staggered over one period.
async fn open_tunnels(to: SocketAddr, path: &str, n: usize, period: Duration) -> Vec<Tunnel> {
    let path = path.to_string();
    let opened: Vec<(Ws, String)> = stream::iter(0..n).map(|_| ws(to, &path)).buffered(50).collect().await;
    opened.into_iter().enumerate().map(|(i, (w, b))| Tunnel::spawn(w, b, period, period.mul_f64(i as f64 / n as f64))).collect()
}

fn by_backend<'a>(ts: impl IntoIterator<Item = &'a Tunnel>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for t in ts {
        *m.entry(t.backend.clone()).or_insert(0) += 1;
    }
    m
}

/// Stops every tunnel and checks that those on `drained_backend` received a close frame with
/// `code` between `earliest` and `latest` after `t0`, and that every other one was still open
/// and had echoed at least `min_more` messages beyond `before` (indexed like `all`). Returns
/// the close times, sorted.
async fn check_drained(
    all: Vec<Tunnel>,
    drained_backend: &str,
    code: CloseCode,
    t0: Instant,
    (earliest, latest): (Duration, Duration),
    before: &[u64],
    min_more: u64,
) -> Vec<Duration> {
    let mut problems = Vec::new();
    let mut times = Vec::new();
    for (i, (backend, echoed, end)) in finish_all(all).await.into_iter().enumerate() {
        let more = echoed.saturating_sub(before[i]);
        if backend == drained_backend {
            match end {
                End::Closed { code: Some(c), at } if c == code => {
                    let after = at.saturating_duration_since(t0);
                    if after < earliest || after > latest {
                        problems.push(format!("tunnel {i} on {backend}: closed {after:?} after the reload"));
                    }
                    times.push(after);
                }
                other => problems.push(format!("tunnel {i} on {backend}: expected close {code:?}, got: {other}")),
            }
        } else {
            match end {
                End::Stopped if more >= min_more => {}
                End::Stopped => problems.push(format!("tunnel {i} on {backend}: echoed only {more} message(s) after the reload")),
                other => problems.push(format!("tunnel {i} on {backend}: should stay open, got: {other}")),
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) (bounds {earliest:?}..={latest:?}){}:\n{}",
        problems.len(),
        if problems.len() > 20 { ", the first 20" } else { "" },
        problems[..problems.len().min(20)].join("\n")
    );
    times.sort();
    times
}

// ---------------------------------------------------------------------------------------------
// 1. Reload storm
// ---------------------------------------------------------------------------------------------

/// 1,000 tunnels to A, B, C echoing every 100 ms and 4 HTTP loops, while 50 reloads alternate
/// between {A, B, C} and {A, B, D} (C drains for 60 s each time, so is never cut, and comes
/// back): nothing fails, nothing is lost or reordered. Then a config without C, with
/// `drain_timeout = "0s"` and `drain_spread = "1s"`, closes exactly C's tunnels with 1001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_storm_loses_nothing_then_removing_c_closes_only_its_tunnels() {
    let _alone = timeout(LOCK_WAIT, HEAVY.write()).await.expect("other tests finish within their bound");
    let b = Backends::start(&["a", "b", "c", "d"]).await;
    let keys = drain("60s", "1s");
    let x = app_config(&b.servers(&["a", "b", "c"], ""), &keys);
    let y = app_config(&b.servers(&["a", "b", "d"], ""), &keys);
    let tg = support::tidegate(&x).await;

    let opening = Instant::now();
    let tunnels = open_tunnels(tg.addr, "/ws", STORM_TUNNELS, STORM_PING).await;
    let placed = by_backend(&tunnels);
    println!("storm: {} tunnels opened in {:?}: {placed:?}", tunnels.len(), opening.elapsed());
    assert_eq!(placed.keys().map(String::as_str).collect::<Vec<_>>(), ["a", "b", "c"], "round robin over a, b, c");

    let http = Arc::new(HttpStats::default());
    let http_stop = CancellationToken::new();
    let loops: Vec<JoinHandle<()>> =
        (0..STORM_HTTP_LOOPS).map(|i| tokio::spawn(http_loop(tg.addr, i % 2 == 0, http_stop.clone(), http.clone()))).collect();

    let (ok0, failed0) = (tg.shared.reloads.ok.load(Ordering::Relaxed), tg.shared.reloads.failed.load(Ordering::Relaxed));
    let gen0 = generation(&tg);
    let started = Instant::now();
    let mut outcomes = Vec::new();
    let mut apply_times = Vec::new();
    for i in 0..STORM_RELOADS {
        tokio::time::sleep(STORM_RELOAD_EVERY).await;
        let text = if i % 2 == 0 { &y } else { &x };
        let parsed = parse(text);
        let t = Instant::now();
        outcomes.push(tg.shared.apply(parsed));
        apply_times.push(t.elapsed());
    }
    // The last reload (back to {A, B, C}) also gets a second of traffic.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let storm = started.elapsed();
    http_stop.cancel();
    for l in loops {
        timeout(WAIT + WAIT, l).await.expect("HTTP loop stops").expect("HTTP loop did not panic");
    }

    let echoes: u64 = tunnels.iter().map(Tunnel::echoed).sum();
    let min_echoed = tunnels.iter().map(Tunnel::echoed).min().unwrap_or(0);
    let (http_ok, http_failed) = (http.ok.load(Ordering::Relaxed), http.failed.load(Ordering::Relaxed));
    apply_times.sort();
    println!(
        "storm: {STORM_RELOADS} reloads in {storm:?} (apply p50 {:?}, max {:?}); {echoes} echoes over {} tunnels ({:.1}/s each, fewest {min_echoed}); \
         HTTP {http_ok} ok, {http_failed} failed, by backend {:?}",
        apply_times[apply_times.len() / 2],
        apply_times[apply_times.len() - 1],
        tunnels.len(),
        echoes as f64 / tunnels.len() as f64 / storm.as_secs_f64(),
        http.by_backend.lock().unwrap()
    );

    let refused: Vec<String> =
        outcomes.iter().enumerate().filter_map(|(i, r)| r.as_ref().err().map(|e| format!("reload {i}: {e}"))).collect();
    assert!(refused.is_empty(), "every reload must apply:\n{}", refused.join("\n"));
    assert_eq!(tg.shared.reloads.ok.load(Ordering::Relaxed) - ok0, STORM_RELOADS as u64, "reloads.ok must grow by {STORM_RELOADS}");
    assert_eq!(tg.shared.reloads.failed.load(Ordering::Relaxed), failed0, "no reload may fail");
    assert_eq!(generation(&tg), gen0 + STORM_RELOADS as u64);
    let cut: Vec<String> =
        tunnels.iter().enumerate().filter_map(|(i, t)| t.ended().map(|e| format!("tunnel {i} on {}: {e}", t.backend))).collect();
    assert!(cut.is_empty(), "{} tunnel(s) cut or lost messages during the storm:\n{}", cut.len(), cut.join("\n"));
    assert_eq!(http_failed, 0, "failed HTTP requests during the storm: {:?}", http.errors.lock().unwrap());
    {
        let served = http.by_backend.lock().unwrap();
        for name in ["a", "b", "c", "d"] {
            assert!(served.get(name).is_some_and(|&n| n > 0), "{name} served no request during the storm: {served:?}");
        }
    }
    // Every tunnel kept echoing all along: at one message per 100 ms a tunnel echoes up to 10 a
    // second; a busy 2-core machine lags well behind that, but a stalled tunnel shows here.
    let floor = storm.as_secs();
    assert!(min_echoed >= floor, "a tunnel echoed only {min_echoed} messages in {storm:?} (expected at least {floor})");

    // Remove C with drain_timeout 0s, drain_spread 1s: exactly its tunnels get 1001 within ~3 s.
    let before: Vec<u64> = tunnels.iter().map(Tunnel::echoed).collect();
    let z = app_config(&b.servers(&["a", "b"], ""), &drain("0s", "1s"));
    let t0 = Instant::now();
    apply(&tg, &z).expect("config without C applies");
    let on_c: Vec<&Tunnel> = tunnels.iter().filter(|t| t.backend == "c").collect();
    wait_ended(&on_c, t0 + Duration::from_secs(3)).await;
    // Give the others time to show they keep echoing.
    tokio::time::sleep((t0 + Duration::from_millis(3500)).saturating_duration_since(Instant::now())).await;
    let times = check_drained(tunnels, "c", CloseCode::Away, t0, (Duration::ZERO, Duration::from_secs(3)), &before, 2).await;
    println!("storm: removing c closed {} tunnels {:?}..{:?} after the reload", times.len(), times.first(), times.last());
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Invalid configs are refused
// ---------------------------------------------------------------------------------------------

/// Each broken config would move traffic from A to B; each is refused with the file and line
/// (or file and cause), counted as failed, leaves the generation alone, and A keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configs_are_refused_and_the_old_config_keeps_serving() {
    let _shared = not_during_storm().await;
    let b = Backends::start(&["a", "b"]).await;
    let tg = support::tidegate(&app_config(&b.servers(&["a"], ""), "")).await;
    assert_eq!(get(tg.addr).await, "a");
    let dir = TempDir::new("invalid");
    let to_b = app_config(&b.servers(&["b"], ""), "");

    // A port held by the test, and one that is free: the refused config lists the free one
    // first, so it is bound (fresh) before the taken one fails.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let taken = held.local_addr().unwrap();
    let fresh_port = free_port();

    let syntax = to_b.replace("name = \"test\"", "name = \"test");
    let unknown = to_b.replace("  upstream = \"app\"", "  upstream = \"nope\"");
    let tls = format!(
        "{to_b}\n[[listener]]\nname = \"secure\"\nbind = \"127.0.0.1:0\"\n\n  [listener.tls]\n  certificates = [{{ cert = \"missing.crt\", key = \"missing.key\" }}]\n\n  [[listener.route]]\n  upstream = \"app\"\n"
    );
    let bind = listener_config(
        &[("test", "127.0.0.1:0"), ("fresh", &format!("127.0.0.1:{fresh_port}")), ("taken", &taken.to_string())],
        &b.servers(&["b"], ""),
        "",
    );
    let missing_cert = dir.path("missing.crt");
    let cases: Vec<(&str, String, Option<usize>, Vec<String>)> = vec![
        ("syntax", syntax.clone(), Some(line_of(&syntax, "name = \"test")), vec![]),
        ("unknown-upstream", unknown.clone(), Some(line_of(&unknown, "\"nope\"")), vec![r#"unknown upstream "nope""#.to_string()]),
        (
            "missing-cert",
            tls.clone(),
            Some(line_of(&tls, "missing.crt")),
            vec![format!("cannot read certificate {}", missing_cert.display())],
        ),
        ("bind-in-use", bind, None, vec![format!(r#"listener "taken": cannot bind {taken}"#)]),
    ];
    for (tag, text, line, wants) in cases {
        let path = dir.write(&format!("{tag}.toml"), &text);
        let (gen0, ok0, failed0) =
            (generation(&tg), tg.shared.reloads.ok.load(Ordering::Relaxed), tg.shared.reloads.failed.load(Ordering::Relaxed));
        let err = match tidegate::reload::reload_file(&tg.shared, &path) {
            Ok(g) => panic!("{tag}: the broken config was applied (generation {g}):\n{text}"),
            Err(e) => e,
        };
        println!("{tag}: {err}");
        let at = match line {
            Some(l) => format!("{}:{l}:", path.display()),
            None => format!("{}:", path.display()),
        };
        assert!(err.contains(&at), "{tag}: the error should name {at:?}:\n{err}");
        for w in &wants {
            assert!(err.contains(w.as_str()), "{tag}: the error should say {w:?}:\n{err}");
        }
        assert_eq!(tg.shared.reloads.failed.load(Ordering::Relaxed), failed0 + 1, "{tag}: reloads.failed");
        assert_eq!(tg.shared.reloads.ok.load(Ordering::Relaxed), ok0, "{tag}: reloads.ok");
        assert_eq!(generation(&tg), gen0, "{tag}: generation changed");
        let last = tg.shared.reloads.history().pop().expect("the attempt is recorded");
        assert!(!last.ok && last.message == err && last.generation == gen0, "{tag}: history says {last:?}");
        for _ in 0..5 {
            assert_eq!(get(tg.addr).await, "a", "{tag}: the old routing must stay in force");
        }
    }
    // Nothing of the refused bind config was left behind: its fresh listener is not accepting.
    let fresh: SocketAddr = ([127, 0, 0, 1], fresh_port).into();
    assert!(
        timeout(WAIT, TcpStream::connect(fresh)).await.expect("connect is answered").is_err(),
        "the refused config's listener on {fresh} accepts connections"
    );
    assert!(tg.shared.listener_addrs().iter().all(|(n, _)| n == "test"), "listeners: {:?}", tg.shared.listener_addrs());
    drop(held);
    // And the proxy still reloads fine afterwards.
    let g = generation(&tg);
    assert_eq!(apply(&tg, &to_b), Ok(g + 1));
    assert_eq!(get(tg.addr).await, "b");
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Live counts survive a reload
// ---------------------------------------------------------------------------------------------

/// least_conn: 100 tunnels on A under {A}; after the reload to {A, B} A still counts 100 and
/// the next 50 tunnels all go to the added B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_live_counts_survive_a_reload_and_the_added_server_fills_first() {
    let _shared = not_during_storm().await;
    let b = Backends::start(&["a", "b"]).await;
    let keys = r#"balance = "least_conn""#;
    let tg = support::tidegate(&app_config(&b.servers(&["a"], ""), keys)).await;
    let mut held = Vec::new();
    for i in 0..100 {
        let (w, name) = ws(tg.addr, "/ws").await;
        assert_eq!(name, "a", "tunnel {i} under {{A}}");
        held.push(w);
    }
    assert_eq!(tg.live("app", b.addr("a")), 100);
    apply(&tg, &app_config(&b.servers(&["a", "b"], ""), keys)).expect("reload to {A, B}");
    assert_eq!(tg.live("app", b.addr("a")), 100, "A's live count right after the reload");
    assert_eq!(tg.live("app", b.addr("b")), 0);
    let mut got = Vec::new();
    for _ in 0..50 {
        let (w, name) = ws(tg.addr, "/ws").await;
        got.push(name);
        held.push(w);
    }
    let on_b = got.iter().filter(|n| *n == "b").count();
    assert_eq!(on_b, 50, "the next 50 tunnels should all go to B, the emptier server: {got:?}");
    assert_eq!((tg.live("app", b.addr("a")), tg.live("app", b.addr("b"))), (100, 50));
    drop(held);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Draining
// ---------------------------------------------------------------------------------------------

/// 400 tunnels over {A, C}; C removed with `drain_timeout = "1s"`, `drain_spread = "2s"`: its
/// 200 tunnels close with 1001 between 1 s and 3 s after the reload, spread out; A's stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_server_tunnels_close_after_drain_timeout_spread_over_drain_spread() {
    let _shared = not_during_storm().await;
    let b = Backends::start(&["a", "c"]).await;
    let keys = drain("1s", "2s");
    let tg = support::tidegate(&app_config(&b.servers(&["a", "c"], ""), &keys)).await;
    let tunnels = open_tunnels(tg.addr, "/ws", 400, Duration::from_millis(500)).await;
    assert_eq!(by_backend(&tunnels), BTreeMap::from([("a".to_string(), 200), ("c".to_string(), 200)]));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before: Vec<u64> = tunnels.iter().map(Tunnel::echoed).collect();

    let t0 = Instant::now();
    apply(&tg, &app_config(&b.servers(&["a"], ""), &keys)).expect("reload without C");
    assert!(backend_state(&tg, "app", b.addr("c")).is_draining(), "C drains");
    let on_c: Vec<&Tunnel> = tunnels.iter().filter(|t| t.backend == "c").collect();
    wait_ended(&on_c, t0 + Duration::from_secs(5)).await;
    let window = (Duration::from_millis(950), Duration::from_millis(3500));
    let times = check_drained(tunnels, "c", CloseCode::Away, t0, window, &before, 2).await;
    let (min, max) = (times[0], times[times.len() - 1]);
    println!(
        "drain 1s + spread 2s: {} closes from {min:?} to {max:?} (p25 {:?}, p50 {:?}, p75 {:?})",
        times.len(),
        times[times.len() / 4],
        times[times.len() / 2],
        times[times.len() * 3 / 4]
    );
    assert_eq!(times.len(), 200);
    assert!(max - min > Duration::from_millis(200), "closes not spread: all within {min:?}..{max:?}");
    tg.stop().await;
}

/// `drain_close_code = 1012` closes a removed server's tunnels with Service Restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_close_code_1012_sends_service_restart() {
    let _shared = not_during_storm().await;
    let b = Backends::start(&["a", "c"]).await;
    let keys = format!("{}\ndrain_close_code = 1012", drain("0s", "300ms"));
    let tg = support::tidegate(&app_config(&b.servers(&["a", "c"], ""), &keys)).await;
    let tunnels = open_tunnels(tg.addr, "/ws", 10, Duration::from_millis(200)).await;
    assert_eq!(by_backend(&tunnels).get("c"), Some(&5));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before: Vec<u64> = tunnels.iter().map(Tunnel::echoed).collect();
    let t0 = Instant::now();
    apply(&tg, &app_config(&b.servers(&["a"], ""), &keys)).expect("reload without C");
    let on_c: Vec<&Tunnel> = tunnels.iter().filter(|t| t.backend == "c").collect();
    wait_ended(&on_c, t0 + Duration::from_secs(2)).await;
    tokio::time::sleep((t0 + Duration::from_secs(1)).saturating_duration_since(Instant::now())).await;
    check_drained(tunnels, "c", CloseCode::Restart, t0, (Duration::ZERO, Duration::from_millis(1300)), &before, 2).await;
    tg.stop().await;
}

/// A server set `down = true` (still listed) drains like a removed one and takes no new tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_set_down_drains_like_a_removed_one() {
    let _shared = not_during_storm().await;
    let b = Backends::start(&["a", "c"]).await;
    let keys = drain("1s", "1s");
    let tg = support::tidegate(&app_config(&b.servers(&["a", "c"], ""), &keys)).await;
    let tunnels = open_tunnels(tg.addr, "/ws", 20, Duration::from_millis(200)).await;
    assert_eq!(by_backend(&tunnels).get("c"), Some(&10));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before: Vec<u64> = tunnels.iter().map(Tunnel::echoed).collect();
    let down = app_config(&[srv(b.addr("a"), ""), srv(b.addr("c"), "down = true")], &keys);
    let t0 = Instant::now();
    apply(&tg, &down).expect("reload with C down");
    assert!(backend_state(&tg, "app", b.addr("c")).is_draining(), "C drains");
    for _ in 0..4 {
        let (_w, name) = ws(tg.addr, "/ws").await;
        assert_eq!(name, "a", "a down server takes no new tunnel");
    }
    let on_c: Vec<&Tunnel> = tunnels.iter().filter(|t| t.backend == "c").collect();
    wait_ended(&on_c, t0 + Duration::from_secs(4)).await;
    let times =
        check_drained(tunnels, "c", CloseCode::Away, t0, (Duration::from_millis(950), Duration::from_millis(2500)), &before, 2).await;
    println!("down = true, drain 1s + spread 1s: closes {:?}..{:?}", times.first(), times.last());
    tg.stop().await;
}

/// Tunnels of upstream U2 stay open and echoing through 5 reloads that only change U1 (with
/// `drain_timeout = "0s"`, so a wrong drain would show at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_that_does_not_touch_an_upstream_leaves_its_tunnels_alone() {
    let _shared = not_during_storm().await;
    let b = Backends::start(&["a", "b", "c"]).await;
    let config = |u1: &str| {
        format!(
            r#"shutdown_timeout = "5s"

[[listener]]
name = "test"
bind = "127.0.0.1:0"

  [[listener.route]]
  path_prefix = "/u2"
  upstream = "u2"

  [[listener.route]]
  upstream = "u1"

[upstream.u1]
{keys}
servers = [{{ addr = "{u1}" }}]

[upstream.u2]
{keys}
servers = [{{ addr = "{u2}" }}]
"#,
            keys = drain("0s", "0s"),
            u1 = b.addr(u1),
            u2 = b.addr("b"),
        )
    };
    let tg = support::tidegate(&config("a")).await;
    let mut tunnels = Vec::new();
    for _ in 0..10 {
        tunnels.push(Tunnel::open(tg.addr, "/u2/ws", Duration::from_millis(100)).await);
    }
    assert_eq!(by_backend(&tunnels), BTreeMap::from([("b".to_string(), 10)]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before: Vec<u64> = tunnels.iter().map(Tunnel::echoed).collect();
    for i in 0..5 {
        let u1 = if i % 2 == 0 { "c" } else { "a" };
        apply(&tg, &config(u1)).unwrap_or_else(|e| panic!("reload {i}: {e}"));
        assert_eq!(get(tg.addr).await, u1, "reload {i} changed U1");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut problems = Vec::new();
    for (i, (_, echoed, end)) in finish_all(tunnels).await.into_iter().enumerate() {
        let more = echoed - before[i];
        match end {
            End::Stopped if more >= 3 => {}
            other => problems.push(format!("U2 tunnel {i}: {other} after {more} more echoes")),
        }
    }
    assert!(problems.is_empty(), "U2's tunnels must not be touched:\n{}", problems.join("\n"));
    tg.stop().await;
}

/// C removed with `drain_timeout = "1s"`, re-added 300 ms later: the drain is called off and its
/// tunnels stay open and echoing well past the original deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_adding_a_draining_server_cancels_its_drain() {
    let _shared = not_during_storm().await;
    let b = Backends::start(&["a", "c"]).await;
    let keys = drain("1s", "0s");
    let both = app_config(&b.servers(&["a", "c"], ""), &keys);
    let tg = support::tidegate(&both).await;
    let tunnels = open_tunnels(tg.addr, "/ws", 10, Duration::from_millis(100)).await;
    assert_eq!(by_backend(&tunnels).get("c"), Some(&5));
    let c = backend_state(&tg, "app", b.addr("c"));
    let t0 = Instant::now();
    apply(&tg, &app_config(&b.servers(&["a"], ""), &keys)).expect("reload without C");
    assert!(c.is_draining(), "C drains after its removal");
    tokio::time::sleep(Duration::from_millis(300)).await;
    apply(&tg, &both).expect("reload with C again");
    assert!(!c.is_draining(), "re-adding C calls its drain off");
    tokio::time::sleep((t0 + Duration::from_millis(1500)).saturating_duration_since(Instant::now())).await;
    let past_deadline: Vec<u64> = tunnels.iter().map(Tunnel::echoed).collect();
    tokio::time::sleep((t0 + Duration::from_millis(2500)).saturating_duration_since(Instant::now())).await;
    let mut problems = Vec::new();
    for (i, (backend, echoed, end)) in finish_all(tunnels).await.into_iter().enumerate() {
        let more = echoed - past_deadline[i];
        match end {
            End::Stopped if more >= 3 => {}
            other => problems.push(format!("tunnel {i} on {backend}: {other}, {more} echoes after the original deadline")),
        }
    }
    assert!(problems.is_empty(), "every tunnel should outlive the called-off drain:\n{}", problems.join("\n"));
    tg.stop().await;
}

/// The drain settings of the config that removes a server apply: removed from an upstream
/// that had `drain_timeout = "60s"` by a config that says `"0s"`, its tunnels close at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_server_uses_the_new_configs_drain_settings() {
    let _shared = not_during_storm().await;
    let b = Backends::start(&["a", "c"]).await;
    let tg = support::tidegate(&app_config(&b.servers(&["a", "c"], ""), &drain("60s", "0s"))).await;
    let tunnels = open_tunnels(tg.addr, "/ws", 4, Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before: Vec<u64> = tunnels.iter().map(Tunnel::echoed).collect();
    let t0 = Instant::now();
    apply(&tg, &app_config(&b.servers(&["a"], ""), &drain("0s", "0s"))).expect("reload without C");
    let on_c: Vec<&Tunnel> = tunnels.iter().filter(|t| t.backend == "c").collect();
    wait_ended(&on_c, t0 + Duration::from_millis(1500)).await;
    // Time for the others to show they keep echoing.
    tokio::time::sleep((t0 + Duration::from_millis(1500)).saturating_duration_since(Instant::now())).await;
    check_drained(tunnels, "c", CloseCode::Away, t0, (Duration::ZERO, Duration::from_millis(1500)), &before, 2).await;
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Listeners
// ---------------------------------------------------------------------------------------------

/// A listener on a fixed port keeps its socket through 10 reloads: connects in a loop all
/// succeed, and each reload's routing is in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_listener_keeps_its_socket_through_10_reloads() {
    let _shared = not_during_storm().await;
    let b = Backends::start(&["a", "b"]).await;
    let bind = format!("127.0.0.1:{}", free_port());
    let config = |name: &str| listener_config(&[("edge", &bind)], &b.servers(&[name], ""), "");
    let tg = support::tidegate(&config("a")).await;
    let addr = tg.addr;
    let stop = CancellationToken::new();
    let connector = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.is_cancelled() {
                match timeout(WAIT, TcpStream::connect(addr)).await {
                    Ok(Ok(_)) => ok += 1,
                    Ok(Err(e)) => failed.push(e.to_string()),
                    Err(_) => failed.push("timed out".to_string()),
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (ok, failed)
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..10 {
        let name = if i % 2 == 0 { "b" } else { "a" };
        apply(&tg, &config(name)).unwrap_or_else(|e| panic!("reload {i}: {e}"));
        assert_eq!(get(addr).await, name, "reload {i}");
        assert_eq!(tg.shared.listener_addrs(), vec![("edge".to_string(), addr)]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let (ok, failed) = timeout(WAIT + WAIT, connector).await.expect("connector stops").expect("connector did not panic");
    println!("listener kept: {ok} connects during 10 reloads, {} failed", failed.len());
    assert!(failed.is_empty(), "{} of {} connects failed: {:?}", failed.len(), ok + failed.len() as u64, &failed[..failed.len().min(5)]);
    assert!(ok > 100, "only {ok} connects");
    tg.stop().await;
}

/// A reload that adds a listener starts accepting on it; the reload that removes it stops
/// accepting there (connect refused), while a tunnel opened through it keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_listener_accepts_and_removed_listener_stops_while_its_tunnel_lives() {
    let _shared = not_during_storm().await;
    let b = Backends::start(&["a"]).await;
    let base = app_config(&b.servers(&["a"], ""), "");
    let tg = support::tidegate(&base).await;
    let port = free_port();
    let extra: SocketAddr = ([127, 0, 0, 1], port).into();
    assert!(TcpStream::connect(extra).await.is_err(), "nothing listens on {extra} yet");

    let with_extra = listener_config(&[("test", "127.0.0.1:0"), ("extra", &extra.to_string())], &b.servers(&["a"], ""), "");
    apply(&tg, &with_extra).expect("reload adding a listener");
    assert_eq!(get(extra).await, "a", "the added listener serves");
    assert!(tg.shared.listener_addrs().contains(&("extra".to_string(), extra)), "{:?}", tg.shared.listener_addrs());
    let tunnel = Tunnel::open(extra, "/ws", Duration::from_millis(100)).await;
    assert_eq!(get(tg.addr).await, "a", "the first listener still serves");

    apply(&tg, &base).expect("reload removing the listener");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match timeout(WAIT, TcpStream::connect(extra)).await.expect("connect is answered") {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            other => assert!(Instant::now() < deadline, "{extra} still accepts 2s after its listener was removed: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..5 {
        let r = timeout(WAIT, TcpStream::connect(extra)).await.expect("connect is answered");
        assert!(r.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused), "{extra} accepted again: {r:?}");
    }
    assert!(!tg.shared.listener_addrs().iter().any(|(n, _)| n == "extra"), "{:?}", tg.shared.listener_addrs());
    assert_eq!(get(tg.addr).await, "a", "the remaining listener serves");
    let before = tunnel.echoed();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let more = tunnel.echoed() - before;
    match tunnel.finish().await {
        End::Stopped if more >= 3 => {}
        other => panic!("the tunnel on the removed listener should keep working: {other} after {more} more echoes"),
    }
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Triggers through the binary
// ---------------------------------------------------------------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_tidegate");

/// `tidegate run -c CONFIG` with RUST_LOG=info, stderr captured to a file; killed (by its pid)
/// and reaped on drop.
struct Daemon {
    child: std::process::Child,
    log: PathBuf,
    addr: SocketAddr,
}

impl Daemon {
    async fn start(dir: &TempDir, config: &Path, addr: SocketAddr) -> Daemon {
        let log = dir.path("tidegate.log");
        let child = std::process::Command::new(BIN)
            .arg("run")
            .arg("-c")
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path("stdout.log")).expect("create stdout log"))
            .stderr(std::fs::File::create(&log).expect("create stderr log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let mut d = Daemon { child, log, addr };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = d.child.try_wait().expect("try_wait") {
                panic!("tidegate exited ({status}) before accepting on {addr}\n{}", d.log());
            }
            if let Ok(Ok(_)) = timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
                break;
            }
            assert!(Instant::now() < deadline, "tidegate not accepting on {addr} within 15s\n{}", d.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        d
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines of the log containing `needle`.
    fn count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Polls `GET /` until `backend` answers; panics after `limit`. Returns how long it took.
    async fn wait_backend(&self, backend: &str, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let got = raw_get(self.addr).await;
            if got.as_deref() == Ok(backend) {
                return started.elapsed();
            }
            assert!(started.elapsed() < limit, "{backend} did not answer within {limit:?} (last: {got:?})\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /` answers `backend` several times in a row.
    async fn assert_backend(&self, backend: &str, why: &str) {
        for _ in 0..3 {
            assert_eq!(raw_get(self.addr).await.as_deref(), Ok(backend), "{why}\n{}", self.log());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// `GET /` with `Connection: close`: the name in the demo backend's body, or why not.
async fn raw_get(addr: SocketAddr) -> Result<String, String> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").await.map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
        body.strip_prefix("hello from ").map(|n| n.trim().to_string()).ok_or_else(|| format!("unexpected response: {text:?}"))
    };
    timeout(WAIT, fut).await.unwrap_or_else(|_| Err("timed out".to_string()))
}

/// A config for the binary: listener "edge" on `port` to upstream `app` = {`server`}.
fn daemon_config(port: u16, server: SocketAddr, pid_file: &Path, top: &str) -> String {
    format!(
        r#"shutdown_timeout = "2s"
pid_file = "{}"
{top}

[[listener]]
name = "edge"
bind = "127.0.0.1:{port}"

  [[listener.route]]
  upstream = "app"

[upstream.app]
servers = [{{ addr = "{server}" }}]
"#,
        pid_file.display()
    )
}

/// Runs `tidegate ARGS` to completion (bounded): (exit code, stdout, stderr).
async fn tidegate_cmd(args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = timeout(Duration::from_secs(15), out).await.expect("tidegate command finishes within 15s").expect("tidegate command runs");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// (a) Editing the config file (upstream one → two) is in force within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reloads_on_config_file_change_within_2s() {
    let _shared = not_during_storm().await;
    let b = Backends::start(&["one", "two"]).await;
    let dir = TempDir::new("file-change");
    let port = free_port();
    let pid_file = dir.path("tidegate.pid");
    let config = dir.write("tidegate.toml", &daemon_config(port, b.addr("one"), &pid_file, ""));
    let d = Daemon::start(&dir, &config, ([127, 0, 0, 1], port).into()).await;
    d.assert_backend("one", "before the edit").await;
    let pid: i32 = std::fs::read_to_string(&pid_file).expect("pid file written").trim().parse().expect("pid file holds a pid");
    assert_eq!(pid, d.pid());

    dir.write("tidegate.toml", &daemon_config(port, b.addr("two"), &pid_file, ""));
    let took = d.wait_backend("two", Duration::from_secs(2)).await;
    println!("file change in force after {took:?}");
    d.assert_backend("two", "after the file change").await;
    assert_eq!(d.count("reload applied"), 1, "{}", d.log());
}

/// (b) `tidegate reload` after an edit prints `reload applied` and exits 0; with a broken
/// file it exits 1 with the FILE:LINE error, and the running config stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reload_command_reports_applied_and_refused() {
    let _shared = not_during_storm().await;
    let b = Backends::start(&["one", "two"]).await;
    let dir = TempDir::new("reload-cmd");
    let port = free_port();
    let pid_file = dir.path("tidegate.pid");
    // No file watching: the reload comes from the command alone.
    let top = "reload_on_change = false";
    let config = dir.write("tidegate.toml", &daemon_config(port, b.addr("one"), &pid_file, top));
    let arg = config.to_str().expect("UTF-8 temp path");
    let d = Daemon::start(&dir, &config, ([127, 0, 0, 1], port).into()).await;
    d.assert_backend("one", "at start").await;

    dir.write("tidegate.toml", &daemon_config(port, b.addr("two"), &pid_file, top));
    let (code, out, err) = tidegate_cmd(&["reload", "-c", arg]).await;
    assert_eq!(code, Some(0), "tidegate reload:\n{out}\n{err}\n{}", d.log());
    assert!(out.contains("reload applied"), "stdout should say `reload applied`:\n{out}\n{err}");
    d.assert_backend("two", "right after `tidegate reload` returned").await;

    let broken = daemon_config(port, b.addr("one"), &pid_file, top).replace("name = \"edge\"", "name = \"edge");
    let line = line_of(&broken, "name = \"edge");
    dir.write("tidegate.toml", &broken);
    let (code, out, err) = tidegate_cmd(&["reload", "-c", arg]).await;
    assert_eq!(code, Some(1), "tidegate reload of a broken file:\n{out}\n{err}");
    let at = format!("{}:{line}:", config.display());
    assert!(err.contains(&at), "stderr should name {at}:\n{err}");
    assert!(!out.contains("reload applied"), "{out}");
    d.assert_backend("two", "after a refused reload").await;
}

/// (c) 10 saves within ~300 ms (alternating one/two, the last one three) make 1 or 2 reloads,
/// not 10, and the last content is in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_burst_of_saves_reloads_once_or_twice() {
    let _shared = not_during_storm().await;
    let b = Backends::start(&["one", "two", "three"]).await;
    let dir = TempDir::new("burst");
    let port = free_port();
    let pid_file = dir.path("tidegate.pid");
    let config = dir.write("tidegate.toml", &daemon_config(port, b.addr("one"), &pid_file, ""));
    let d = Daemon::start(&dir, &config, ([127, 0, 0, 1], port).into()).await;
    d.assert_backend("one", "at start").await;
    // Let the watcher take its first fingerprint well before the burst.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let count = |d: &Daemon| d.count("reload applied") + d.count("reload refused");
    assert_eq!(count(&d), 0, "{}", d.log());

    let started = Instant::now();
    for i in 0..10 {
        let name = if i == 9 {
            "three"
        } else if i % 2 == 0 {
            "two"
        } else {
            "one"
        };
        dir.write("tidegate.toml", &daemon_config(port, b.addr(name), &pid_file, ""));
        if i < 9 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    let burst = started.elapsed();
    let took = d.wait_backend("three", Duration::from_secs(3)).await;
    // Three more watcher ticks: no late reload may follow.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = count(&d);
    println!("burst of 10 saves in {burst:?}: {n} reload(s), last content in force {took:?} after the burst");
    assert!((1..=2).contains(&n), "{n} reloads for one burst of saves\n{}", d.log());
    assert_eq!(d.count("reload refused"), 0, "{}", d.log());
    d.assert_backend("three", "the last save is in force").await;
}

/// (d) SIGHUP reloads (with file watching off, so the signal is the trigger).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reloads_on_sighup() {
    let _shared = not_during_storm().await;
    let b = Backends::start(&["one", "two"]).await;
    let dir = TempDir::new("sighup");
    let port = free_port();
    let pid_file = dir.path("tidegate.pid");
    let top = "reload_on_change = false";
    let config = dir.write("tidegate.toml", &daemon_config(port, b.addr("one"), &pid_file, top));
    let d = Daemon::start(&dir, &config, ([127, 0, 0, 1], port).into()).await;
    d.assert_backend("one", "at start").await;

    dir.write("tidegate.toml", &daemon_config(port, b.addr("two"), &pid_file, top));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    d.assert_backend("one", "reload_on_change = false: an edit alone does not reload").await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.pid()), nix::sys::signal::Signal::SIGHUP).expect("send SIGHUP");
    let took = d.wait_backend("two", Duration::from_secs(2)).await;
    println!("SIGHUP reload in force after {took:?}");
    assert!(d.log().contains("SIGHUP received"), "{}", d.log());
    assert_eq!(d.count("reload applied"), 1, "{}", d.log());
}
