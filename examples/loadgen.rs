//! Load generator and bench backends for `benches/compare.sh`, in one binary.
//!
//!     cargo run --release --example loadgen -- backend --addr 127.0.0.1:19101
//!     cargo run --release --example loadgen -- http --url http://127.0.0.1:8080/ -c 50 -d 5
//!     cargo run --release --example loadgen -- ws-echo --url ws://127.0.0.1:8080/ -c 50 -s 64 -d 5
//!     cargo run --release --example loadgen -- ws-connect --url ws://127.0.0.1:8080/ -c 20 -d 5
//!     cargo run --release --example loadgen -- ws-bulk --url ws://127.0.0.1:8080/ -s 16777216 -n 4
//!     cargo run --release --example loadgen -- ws-idle --url ws://127.0.0.1:8080/ -n 1000 --hold 10 \
//!         --sources 127.0.0.2-127.0.0.50
//!
//! Every load mode is bounded in count and time, stops by itself, and prints exactly one JSON
//! line on stdout (progress and errors go to stderr). `backend` (aliases `backend-http`,
//! `backend-ws`) answers every plain request with a 64-byte body and echoes WebSocket
//! messages; it runs until killed. Targets and source addresses must be in 127.0.0.0/8.
//!
//! The runtime gets one worker per CPU this process may run on (`taskset` is honoured); with
//! one CPU it is a current-thread runtime.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// The body every plain HTTP request gets from the backend: 64 bytes.
const BODY_64: &[u8; 64] = b"tidegate bench backend: sixty-four bytes of response body......\n";
/// One request, one echo, one connect + handshake: longer than this is an error.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// After the run's end, how long stragglers get before the process gives up on them.
const GRACE: Duration = Duration::from_secs(30);
/// Largest WebSocket message/frame accepted by either side (bulk sends 16 MiB).
const MAX_WS_MESSAGE: usize = 256 << 20;
/// Errors printed to stderr per run (the rest are only counted).
const ERRORS_SHOWN: u64 = 5;

#[derive(Parser)]
#[command(about = "tidegate bench load generator and backends (loopback only)")]
struct Cli {
    /// Runtime worker threads (default: the CPUs this process may run on).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// HTTP/1.1 keep-alive server (64-byte body) and WebSocket echo; runs until killed.
    #[command(alias = "backend-http", alias = "backend-ws")]
    Backend {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// C keep-alive connections issuing GETs back to back for D seconds.
    Http {
        #[arg(long)]
        url: String,
        #[arg(short = 'c', default_value_t = 50)]
        conns: usize,
        #[arg(short = 'd', default_value_t = 5.0)]
        secs: f64,
        /// Client source addresses, `127.0.0.2-127.0.0.50` or one address.
        #[arg(long)]
        sources: Option<String>,
    },
    /// C WebSocket connections each sending a message and awaiting its echo, back to back.
    WsEcho {
        #[arg(long)]
        url: String,
        #[arg(short = 'c', default_value_t = 50)]
        conns: usize,
        #[arg(short = 's', default_value_t = 64)]
        size: usize,
        #[arg(short = 'd', default_value_t = 5.0)]
        secs: f64,
        #[arg(long)]
        sources: Option<String>,
    },
    /// N idle WebSocket connections held for SECS; `READY` on stderr once all are open.
    WsIdle {
        #[arg(long)]
        url: String,
        #[arg(short = 'n', default_value_t = 1000)]
        conns: usize,
        #[arg(long, default_value_t = 10.0)]
        hold: f64,
        #[arg(long)]
        sources: Option<String>,
        /// Handshakes in flight at once while opening.
        #[arg(long, default_value_t = 64)]
        parallel: usize,
    },
    /// C loops of connect, WebSocket handshake, close, for D seconds.
    WsConnect {
        #[arg(long)]
        url: String,
        #[arg(short = 'c', default_value_t = 20)]
        conns: usize,
        #[arg(short = 'd', default_value_t = 5.0)]
        secs: f64,
        #[arg(long)]
        sources: Option<String>,
    },
    /// COUNT binary messages of BYTES each on one connection, each awaiting its echo.
    WsBulk {
        #[arg(long)]
        url: String,
        #[arg(short = 's', default_value_t = 16 << 20)]
        size: usize,
        #[arg(short = 'n', default_value_t = 4)]
        count: usize,
    },
}

fn main() {
    let cli = Cli::parse();
    let threads = cli.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => fail(&format!("cannot start the runtime: {e}")),
    };
    let line = rt.block_on(async move {
        match cli.mode {
            Mode::Backend { addr } => backend(addr).await,
            Mode::Http { url, conns, secs, sources } => http(Target::parse(&url), conns.max(1), run_time(secs), sources_arg(sources)).await,
            Mode::WsEcho { url, conns, size, secs, sources } => {
                ws_echo(Target::parse(&url), conns.max(1), size, run_time(secs), sources_arg(sources)).await
            }
            Mode::WsIdle { url, conns, hold, sources, parallel } => {
                ws_idle(Target::parse(&url), conns, run_time(hold), sources_arg(sources), parallel.max(1)).await
            }
            Mode::WsConnect { url, conns, secs, sources } => {
                ws_connect(Target::parse(&url), conns.max(1), run_time(secs), sources_arg(sources)).await
            }
            Mode::WsBulk { url, size, count } => ws_bulk(Target::parse(&url), size, count).await,
        }
    });
    println!("{line}");
    // Stragglers (connections still closing) must not keep a finished run alive.
    rt.shutdown_timeout(Duration::from_secs(1));
}

fn fail(msg: &str) -> ! {
    eprintln!("loadgen: {msg}");
    std::process::exit(2)
}

fn run_time(secs: f64) -> Duration {
    if !secs.is_finite() || !(0.0..=3600.0).contains(&secs) {
        fail("durations must be between 0 and 3600 seconds");
    }
    Duration::from_secs_f64(secs)
}

// ---------------------------------------------------------------------------------------------
// Targets, sources, connecting
// ---------------------------------------------------------------------------------------------

/// Where load goes: a loopback address, and what to ask for.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    /// `host:port` as written, for `Host`.
    authority: HeaderValue,
    path: String,
    /// The URL as given, for the WebSocket handshake.
    url: String,
}

impl Target {
    fn parse(url: &str) -> Target {
        let uri: hyper::Uri = url.parse().unwrap_or_else(|e| fail(&format!("bad url {url:?}: {e}")));
        let scheme = uri.scheme_str().unwrap_or("");
        let default_port = match scheme {
            "http" | "ws" => 80,
            _ => fail(&format!("url {url:?}: scheme must be http or ws (no TLS here)")),
        };
        let host = uri.host().unwrap_or_else(|| fail(&format!("url {url:?} has no host")));
        let ip: IpAddr = match host {
            "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            h => h
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .unwrap_or_else(|_| fail(&format!("url {url:?}: host must be an IP"))),
        };
        if !ip.is_loopback() {
            fail(&format!("url {url:?}: load goes to loopback (127.0.0.0/8) only"));
        }
        let addr = SocketAddr::new(ip, uri.port_u16().unwrap_or(default_port));
        let authority = uri.authority().map_or_else(|| addr.to_string(), |a| a.to_string());
        let path = uri.path_and_query().map_or_else(|| "/".to_string(), |p| p.to_string());
        Target { addr, authority: HeaderValue::from_str(&authority).unwrap_or_else(|_| fail("bad authority")), path, url: url.to_string() }
    }
}

/// `127.0.0.2-127.0.0.50` (inclusive) or one address; loopback only.
fn sources_arg(arg: Option<String>) -> Arc<Vec<IpAddr>> {
    let Some(arg) = arg else { return Arc::new(Vec::new()) };
    let (a, b) = arg.split_once('-').unwrap_or((&arg, &arg));
    let parse = |s: &str| -> Ipv4Addr { s.trim().parse().unwrap_or_else(|_| fail(&format!("bad source address {s:?}"))) };
    let (a, b) = (u32::from(parse(a)), u32::from(parse(b)));
    if a > b || b - a > 65_535 {
        fail(&format!("bad source range {arg:?}"));
    }
    let ips: Vec<IpAddr> = (a..=b).map(|n| IpAddr::V4(Ipv4Addr::from(n))).collect();
    if ips.iter().any(|ip| !ip.is_loopback()) {
        fail("source addresses must be in 127.0.0.0/8");
    }
    Arc::new(ips)
}

fn pick_source(sources: &[IpAddr], i: usize) -> Option<IpAddr> {
    (!sources.is_empty()).then(|| sources[i % sources.len()])
}

/// Connects to `addr`, from `src` (port chosen by the kernel) when given.
async fn tcp_connect(addr: SocketAddr, src: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(ip) = src {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = tokio::time::timeout(OP_TIMEOUT, sock.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(MAX_WS_MESSAGE)).max_frame_size(Some(MAX_WS_MESSAGE))
}

/// TCP connect and WebSocket handshake, within `OP_TIMEOUT`.
async fn ws_open(t: &Target, src: Option<IpAddr>, cfg: WebSocketConfig) -> Result<WebSocketStream<TcpStream>, String> {
    let open = async {
        let stream = tcp_connect(t.addr, src).await.map_err(|e| format!("connect {}: {e}", t.addr))?;
        let (ws, _) = tokio_tungstenite::client_async_with_config(t.url.as_str(), stream, Some(cfg))
            .await
            .map_err(|e| format!("handshake {}: {e}", t.url))?;
        Ok(ws)
    };
    tokio::time::timeout(OP_TIMEOUT, open).await.unwrap_or_else(|_| Err(format!("handshake {}: timed out", t.url)))
}

/// Sends a close frame and waits (briefly) for the server's close and EOF.
async fn ws_close(mut ws: WebSocketStream<TcpStream>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

static ERRORS_PRINTED: AtomicU64 = AtomicU64::new(0);

fn report_error(msg: &str) {
    let n = ERRORS_PRINTED.fetch_add(1, Ordering::Relaxed);
    if n < ERRORS_SHOWN {
        eprintln!("loadgen: error: {msg}");
    } else if n == ERRORS_SHOWN {
        eprintln!("loadgen: (further errors only counted)");
    }
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

/// What one load task did.
#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    /// Latencies in µs of the successful operations.
    lat: Vec<u32>,
}

impl Tally {
    fn record(&mut self, since: Instant) {
        self.ok += 1;
        self.lat.push(since.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    fn error(&mut self, msg: &str) {
        self.errors += 1;
        report_error(msg);
    }
    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.lat.extend(other.lat);
    }
}

/// Waits for every task until `deadline + GRACE`; tasks still running then are aborted and
/// counted as one error each.
async fn collect(mut set: JoinSet<Tally>, deadline: Instant) -> Tally {
    let mut total = Tally::default();
    let hard = tokio::time::Instant::from_std(deadline + GRACE);
    loop {
        match tokio::time::timeout_at(hard, set.join_next()).await {
            Ok(Some(Ok(t))) => total.merge(t),
            Ok(Some(Err(e))) => total.error(&format!("task failed: {e}")),
            Ok(None) => break,
            Err(_) => {
                let left = set.len() as u64;
                set.abort_all();
                total.errors += left;
                eprintln!("loadgen: {left} task(s) still running {GRACE:?} after the end; aborted");
                break;
            }
        }
    }
    total
}

/// p50/p99/p999 (µs) of `lat`, sorted in place.
fn percentiles(lat: &mut [u32]) -> [u32; 3] {
    lat.sort_unstable();
    let at = |p: f64| -> u32 {
        if lat.is_empty() {
            return 0;
        }
        let rank = (p * lat.len() as f64).ceil() as usize;
        lat[rank.clamp(1, lat.len()) - 1]
    };
    [at(0.50), at(0.99), at(0.999)]
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

// ---------------------------------------------------------------------------------------------
// http
// ---------------------------------------------------------------------------------------------

async fn http(t: Target, conns: usize, dur: Duration, sources: Arc<Vec<IpAddr>>) -> String {
    let start = Instant::now();
    let deadline = start + dur;
    let t = Arc::new(t);
    let mut set = JoinSet::new();
    for i in 0..conns {
        set.spawn(http_worker(t.clone(), pick_source(&sources, i), deadline));
    }
    let mut total = collect(set, deadline).await;
    let secs = start.elapsed().as_secs_f64();
    let [p50, p99, p999] = percentiles(&mut total.lat);
    format!(
        "{{\"mode\":\"http\",\"conns\":{conns},\"secs\":{secs:.3},\"requests\":{},\"rps\":{:.1},\"p50_us\":{p50},\"p99_us\":{p99},\"p999_us\":{p999},\"errors\":{}}}",
        total.ok,
        rate(total.ok, secs),
        total.errors
    )
}

type HttpSender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn http_conn(t: &Target, src: Option<IpAddr>) -> Result<HttpSender, String> {
    let stream = tcp_connect(t.addr, src).await.map_err(|e| format!("connect {}: {e}", t.addr))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn http_worker(t: Arc<Target>, src: Option<IpAddr>, deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    'connect: while Instant::now() < deadline {
        let mut sender = match http_conn(&t, src).await {
            Ok(s) => s,
            Err(e) => {
                tally.error(&e);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while Instant::now() < deadline {
            // A connection the server closed (keep-alive limit, idle) is replaced, not an error.
            match tokio::time::timeout(OP_TIMEOUT, sender.ready()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => continue 'connect,
                Err(_) => {
                    tally.error("connection not ready in time");
                    continue 'connect;
                }
            }
            let req = Request::get(t.path.as_str()).header(header::HOST, t.authority.clone()).body(Empty::<Bytes>::new());
            let Ok(req) = req else {
                tally.error("cannot build the request");
                return tally;
            };
            let t0 = Instant::now();
            let exchange = async {
                let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
                let status = resp.status();
                let body = resp.into_body().collect().await.map_err(|e| format!("response body: {e}"))?;
                Ok::<_, String>((status, body.to_bytes().len()))
            };
            match tokio::time::timeout(OP_TIMEOUT, exchange).await {
                Ok(Ok((StatusCode::OK, _))) => tally.record(t0),
                Ok(Ok((status, _))) => tally.error(&format!("status {status}")),
                Ok(Err(e)) => {
                    tally.error(&e);
                    continue 'connect;
                }
                Err(_) => {
                    tally.error("request timed out");
                    continue 'connect;
                }
            }
        }
    }
    tally
}

// ---------------------------------------------------------------------------------------------
// ws-echo
// ---------------------------------------------------------------------------------------------

async fn ws_echo(t: Target, conns: usize, size: usize, dur: Duration, sources: Arc<Vec<IpAddr>>) -> String {
    let start = Instant::now();
    let deadline = start + dur;
    let t = Arc::new(t);
    let payload = Bytes::from(vec![b'x'; size]);
    let mut set = JoinSet::new();
    for i in 0..conns {
        set.spawn(ws_echo_worker(t.clone(), pick_source(&sources, i), deadline, payload.clone()));
    }
    let mut total = collect(set, deadline).await;
    let secs = start.elapsed().as_secs_f64();
    let [p50, p99, p999] = percentiles(&mut total.lat);
    format!(
        "{{\"mode\":\"ws-echo\",\"conns\":{conns},\"size\":{size},\"secs\":{secs:.3},\"messages\":{},\"msgs_per_s\":{:.1},\"p50_us\":{p50},\"p99_us\":{p99},\"p999_us\":{p999},\"errors\":{}}}",
        total.ok,
        rate(total.ok, secs),
        total.errors
    )
}

/// Sends `msg` and waits for a data message of the same length.
async fn echo_once(ws: &mut WebSocketStream<TcpStream>, msg: Message, len: usize) -> Result<(), String> {
    ws.send(msg).await.map_err(|e| format!("send: {e}"))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if b.len() == len => return Ok(()),
            Some(Ok(Message::Text(s))) if s.len() == len => return Ok(()),
            Some(Ok(Message::Binary(_) | Message::Text(_))) => return Err("echo of the wrong length".into()),
            Some(Ok(Message::Close(f))) => return Err(format!("closed by the server: {f:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("receive: {e}")),
            None => return Err("connection closed".into()),
        }
    }
}

async fn ws_echo_worker(t: Arc<Target>, src: Option<IpAddr>, deadline: Instant, payload: Bytes) -> Tally {
    let mut tally = Tally::default();
    'connect: while Instant::now() < deadline {
        let mut ws = match ws_open(&t, src, ws_config()).await {
            Ok(ws) => ws,
            Err(e) => {
                tally.error(&e);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while Instant::now() < deadline {
            let t0 = Instant::now();
            match tokio::time::timeout(OP_TIMEOUT, echo_once(&mut ws, Message::Binary(payload.clone()), payload.len())).await {
                Ok(Ok(())) => tally.record(t0),
                Ok(Err(e)) => {
                    tally.error(&e);
                    continue 'connect;
                }
                Err(_) => {
                    tally.error("echo timed out");
                    continue 'connect;
                }
            }
        }
        ws_close(ws).await;
    }
    tally
}

// ---------------------------------------------------------------------------------------------
// ws-connect
// ---------------------------------------------------------------------------------------------

async fn ws_connect(t: Target, conns: usize, dur: Duration, sources: Arc<Vec<IpAddr>>) -> String {
    let start = Instant::now();
    let deadline = start + dur;
    let t = Arc::new(t);
    let mut set = JoinSet::new();
    for i in 0..conns {
        set.spawn(ws_connect_worker(t.clone(), sources.clone(), i, conns, deadline));
    }
    let mut total = collect(set, deadline).await;
    let secs = start.elapsed().as_secs_f64();
    let [p50, p99, p999] = percentiles(&mut total.lat);
    format!(
        "{{\"mode\":\"ws-connect\",\"conns\":{conns},\"secs\":{secs:.3},\"handshakes\":{},\"handshakes_per_s\":{:.1},\"p50_us\":{p50},\"p99_us\":{p99},\"p999_us\":{p999},\"errors\":{}}}",
        total.ok,
        rate(total.ok, secs),
        total.errors
    )
}

/// Connect, handshake (timed), close with a close handshake; again until `deadline`.
async fn ws_connect_worker(t: Arc<Target>, sources: Arc<Vec<IpAddr>>, i: usize, stride: usize, deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut n = i;
    while Instant::now() < deadline {
        let t0 = Instant::now();
        match ws_open(&t, pick_source(&sources, n), ws_config()).await {
            Ok(ws) => {
                tally.record(t0);
                ws_close(ws).await;
            }
            Err(e) => {
                tally.error(&e);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        n += stride;
    }
    tally
}

// ---------------------------------------------------------------------------------------------
// ws-bulk
// ---------------------------------------------------------------------------------------------

async fn ws_bulk(t: Target, size: usize, count: usize) -> String {
    let start = Instant::now();
    // Bounded: every message within OP_TIMEOUT scaled by size (at least 10 MB/s).
    let per_msg = OP_TIMEOUT + Duration::from_secs_f64(size as f64 / 10e6);
    let mut tally = Tally::default();
    match ws_open(&t, None, ws_config()).await {
        Ok(mut ws) => {
            let payload = Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
            for _ in 0..count {
                let t0 = Instant::now();
                match tokio::time::timeout(per_msg, echo_once(&mut ws, Message::Binary(payload.clone()), size)).await {
                    Ok(Ok(())) => tally.record(t0),
                    Ok(Err(e)) => {
                        tally.error(&e);
                        break;
                    }
                    Err(_) => {
                        tally.error("bulk echo timed out");
                        break;
                    }
                }
            }
            ws_close(ws).await;
        }
        Err(e) => tally.error(&e),
    }
    let secs: f64 = tally.lat.iter().map(|&us| us as f64 / 1e6).sum();
    let bytes = tally.ok * size as u64;
    let mb_per_s = if secs > 0.0 { bytes as f64 / secs / 1e6 } else { 0.0 };
    let [p50, _, _] = percentiles(&mut tally.lat);
    let max = tally.lat.last().copied().unwrap_or(0);
    format!(
        "{{\"mode\":\"ws-bulk\",\"size\":{size},\"messages\":{},\"bytes\":{bytes},\"secs\":{secs:.3},\"wall_secs\":{:.3},\"mb_per_s\":{mb_per_s:.1},\"p50_us\":{p50},\"max_us\":{max},\"errors\":{}}}",
        tally.ok,
        start.elapsed().as_secs_f64(),
        tally.errors
    )
}

// ---------------------------------------------------------------------------------------------
// ws-idle
// ---------------------------------------------------------------------------------------------

async fn ws_idle(t: Target, conns: usize, hold: Duration, sources: Arc<Vec<IpAddr>>, parallel: usize) -> String {
    let start = Instant::now();
    let t = Arc::new(t);
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let dropped = Arc::new(AtomicU64::new(0));
    // Small buffers: these connections only sit there.
    let cfg = ws_config().read_buffer_size(4096).write_buffer_size(0);
    let mut set = JoinSet::new();
    for i in 0..conns {
        let (t, gate, opened_tx, mut release_rx, dropped) =
            (t.clone(), gate.clone(), opened_tx.clone(), release_rx.clone(), dropped.clone());
        let src = pick_source(&sources, i);
        set.spawn(async move {
            let ws = {
                let Ok(_permit) = gate.acquire().await else { return };
                ws_open(&t, src, cfg).await
            };
            let mut ws = match ws {
                Ok(ws) => {
                    let _ = opened_tx.send(true);
                    ws
                }
                Err(e) => {
                    report_error(&e);
                    let _ = opened_tx.send(false);
                    return;
                }
            };
            drop(opened_tx);
            loop {
                tokio::select! {
                    _ = release_rx.changed() => return,
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                        Some(Ok(Message::Binary(_) | Message::Text(_))) => {}
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    },
                }
            }
        });
    }
    drop(opened_tx);

    // Opening: bounded by a generous per-connection budget.
    let open_deadline = tokio::time::Instant::now() + OP_TIMEOUT + Duration::from_millis(20 * conns as u64);
    let (mut opened, mut failed) = (0u64, 0u64);
    let mut last_progress = Instant::now();
    while opened + failed < conns as u64 {
        match tokio::time::timeout_at(open_deadline, opened_rx.recv()).await {
            Ok(Some(true)) => opened += 1,
            Ok(Some(false)) => failed += 1,
            Ok(None) => break,
            Err(_) => {
                eprintln!("loadgen: opening took too long; holding what is open");
                break;
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            eprintln!("loadgen: opening: {opened} open, {failed} failed of {conns}");
        }
    }
    let not_attempted = conns as u64 - opened - failed;
    let open_secs = start.elapsed().as_secs_f64();
    eprintln!("loadgen: {opened} open, {failed} failed in {open_secs:.2}s; holding for {:.0}s", hold.as_secs_f64());
    eprintln!("READY");

    let hold_start = Instant::now();
    while hold_start.elapsed() < hold {
        let step = (hold - hold_start.elapsed()).min(Duration::from_secs(1));
        tokio::time::sleep(step).await;
        eprintln!(
            "loadgen: held {:.0}/{:.0}s: {} open",
            hold_start.elapsed().as_secs_f64(),
            hold.as_secs_f64(),
            opened - dropped.load(Ordering::Relaxed)
        );
    }
    let dropped_n = dropped.load(Ordering::Relaxed);
    let _ = release_tx.send(true);
    // Holders return at once on release; anything stuck opening is aborted.
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while set.join_next().await.is_some() {} }).await;
    set.abort_all();
    format!(
        "{{\"mode\":\"ws-idle\",\"conns\":{conns},\"opened\":{opened},\"failed\":{},\"dropped\":{dropped_n},\"open_secs\":{open_secs:.3},\"hold_secs\":{:.1}}}",
        failed + not_attempted,
        hold.as_secs_f64()
    )
}

// ---------------------------------------------------------------------------------------------
// backend
// ---------------------------------------------------------------------------------------------

async fn backend(addr: SocketAddr) -> String {
    if !addr.ip().is_loopback() {
        fail("the backend binds loopback addresses only");
    }
    let sock = match if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() } {
        Ok(s) => s,
        Err(e) => fail(&format!("socket: {e}")),
    };
    let _ = sock.set_reuseaddr(true);
    if let Err(e) = sock.bind(addr) {
        fail(&format!("cannot bind {addr}: {e}"));
    }
    let listener = sock.listen(4096).unwrap_or_else(|e| fail(&format!("cannot listen on {addr}: {e}")));
    eprintln!("loadgen backend listening on {addr}");
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of file descriptors, say: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req| async move { Ok::<_, Infallible>(backend_respond(req)) });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

fn backend_respond(mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let is_ws = req.headers().get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if !is_ws {
        return Response::new(Full::new(Bytes::from_static(BODY_64)));
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"missing Sec-WebSocket-Key\n")));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let accept = derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(up) = upgrade.await else { return };
        let ws = match up.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                WebSocketStream::from_partially_read(parts.io.into_inner(), parts.read_buf.to_vec(), Role::Server, Some(ws_config())).await
            }
            Err(_) => return,
        };
        backend_echo(ws).await;
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

async fn backend_echo(mut ws: WebSocketStream<TcpStream>) {
    while let Some(Ok(msg)) = ws.next().await {
        // tungstenite answers pings and close frames itself.
        let echo = matches!(msg, Message::Binary(_) | Message::Text(_));
        if echo && ws.send(msg).await.is_err() {
            break;
        }
    }
}
