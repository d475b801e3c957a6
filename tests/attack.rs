//! Raw-socket attack suite: request smuggling and the request-head policy, `Expect:
//! 100-continue`, the upgrade policy, response-side framing attacks, and timeouts and limits.
//!
//! Clients are raw `TcpStream`s writing exact bytes, never an HTTP client library. The backend
//! is a raw TCP server in this file: it records every request head it reads (connection
//! number, method, target, headers, body) and every connection tidegate closes, and answers
//! `200 ok <target>` or, for `/resp/...` paths, bytes scripted here. Each case checks the
//! client's exact answer and whether its connection closes, that the backend saw exactly the
//! expected requests (never `/smuggled`), a follow-up on the same connection where it stays
//! open, and that a fresh connection still gets a `200` afterwards.

mod support;
use support::{RawResponse as Resp, find, parse_response};

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;

/// Upper bound for anything that should happen "now".
const WAIT: Duration = Duration::from_secs(3);
/// The RFC 6455 sample key.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// A request hidden in places where it must never be read as a request.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: test\r\n\r\n";
/// Upgrade headers of a valid WebSocket handshake (with `KEY`).
const WS: &str =
    "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
/// Size of the `/resp/big` response.
const BIG: u64 = 64 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// Bytes for an error message: escaped, and cut to a readable length.
fn show(b: &[u8]) -> String {
    let s = format!("{:?}", String::from_utf8_lossy(b));
    if s.len() > 400 { format!("{}…({} bytes)", &s[..s.char_indices().nth(400).map_or(s.len(), |(i, _)| i)], b.len()) } else { s }
}

/// `Sec-WebSocket-Accept` for `key`, computed here rather than with tidegate's own helper.
fn accept_for(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A masked client text frame.
fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    assert!(payload.len() < 126);
    let mut f = vec![0x81, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").into_bytes()
}

/// No request with "smuggled" in its target ever reached the backend.
fn no_smuggled(be: &Backend) -> Result<(), String> {
    let s = be.smuggled();
    if s.is_empty() { Ok(()) } else { Err(format!("smuggled requests reached the backend: {s:?}")) }
}

/// Collects the failures of many cases so one report lists them all.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, r: Result<(), String>) {
        if let Err(e) = r {
            self.0.push(e);
        }
    }
    fn assert_none(self, checks: usize) {
        assert!(self.0.is_empty(), "{} of {checks} checks failed:\n- {}", self.0.len(), self.0.join("\n- "));
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!("{prefix}/{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

// ---------------------------------------------------------------------------------------------
// The recording backend
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Seen {
    /// Backend connection number, in accept order from 0.
    conn: usize,
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// The whole body (by its framing) arrived.
    body_complete: bool,
}

impl Seen {
    fn values(&self, name: &str) -> Vec<String> {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| String::from_utf8_lossy(v).into_owned()).collect()
    }
    fn line(&self) -> String {
        format!("{} {}", self.method, self.target)
    }
}

#[derive(Debug, Clone)]
enum Event {
    Request(Seen),
    /// Bytes read after a `101` (tunnel mode), or bytes that did not parse as a request.
    Raw {
        conn: usize,
        bytes: Vec<u8>,
    },
    /// The connection ended (EOF or error) on tidegate's side.
    Closed {
        conn: usize,
    },
}

#[derive(Default)]
struct Log {
    events: Mutex<Vec<Event>>,
    changed: Notify,
    /// Bytes of `/resp/big` that the kernel accepted from the backend.
    streamed: AtomicU64,
}

impl Log {
    fn push(&self, e: Event) -> usize {
        let i = {
            let mut ev = self.events.lock().unwrap();
            ev.push(e);
            ev.len() - 1
        };
        self.changed.notify_waiters();
        i
    }

    fn set_body(&self, i: usize, body: Vec<u8>, complete: bool) {
        if let Some(Event::Request(s)) = self.events.lock().unwrap().get_mut(i) {
            s.body = body;
            s.body_complete = complete;
        }
        self.changed.notify_waiters();
    }
}

/// What the backend does with one request.
enum Script {
    /// Reads the body, answers `200 ok <target>` (keep-alive).
    Ok,
    /// Writes these bytes without reading any body, then reads the next request.
    Bytes(Vec<u8>),
    /// Writes the first bytes, waits 200 ms, writes the second, then reads the next request.
    Pause(Vec<u8>, Vec<u8>),
    /// Writes these bytes, then records everything it reads as raw bytes until EOF.
    Tunnel(Vec<u8>),
    /// A `200` with a `BIG`-byte body written in 64 KiB pieces, counted in `Log::streamed`.
    Stream,
}

fn script_for(seen: &Seen) -> Script {
    let path = seen.target.split('?').next().unwrap_or_default();
    let b = |s: &str| s.as_bytes().to_vec();
    let accept = seen.values("sec-websocket-key").first().map(|k| accept_for(k)).unwrap_or_default();
    match path {
        "/resp/cl-te" => Script::Bytes(b("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")),
        "/resp/te-cl" => Script::Bytes(b("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n")),
        "/resp/cl-cl" => Script::Bytes(b("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!")),
        "/resp/cl-nan" => Script::Bytes(b("HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\nok")),
        "/resp/cl-plus" => Script::Bytes(b("HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok")),
        "/resp/te-gzip" => Script::Bytes(b("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok")),
        "/resp/te-chunked-gzip" => Script::Bytes(b("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n2\r\nok\r\n0\r\n\r\n")),
        "/resp/bad-chunk" => Script::Bytes(b("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")),
        "/resp/204-body" => Script::Bytes(b("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello")),
        "/resp/304-body" => Script::Bytes(b("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello")),
        "/resp/head-body" => Script::Bytes(b("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")),
        "/resp/extra" => {
            Script::Bytes(b("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"))
        }
        "/resp/mid-chunk" => {
            Script::Pause(b("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"), b("zz\r\nbad\r\n0\r\n\r\n"))
        }
        "/resp/early-413" => Script::Bytes(b("HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")),
        "/resp/early-200" => Script::Bytes(b("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")),
        "/resp/101-bad-accept" => Script::Tunnel(b("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n")),
        "/resp/101-no-upgrade" => {
            Script::Tunnel(b(&format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n")))
        }
        "/resp/101-plain" => Script::Tunnel(b("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")),
        "/resp/big" => Script::Stream,
        p if p.starts_with("/ws/") => {
            // The 101 and a first server frame ("hi") in one write.
            let mut v = b(&format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            ));
            v.extend_from_slice(b"\x81\x02hi");
            Script::Tunnel(v)
        }
        _ => Script::Ok,
    }
}

/// Reads more bytes into `buf`; false at EOF or on an error.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    buf.reserve(64 * 1024);
    matches!(s.read_buf(buf).await, Ok(n) if n > 0)
}

/// Takes everything up to and including `delim` out of `buf`, reading as needed.
async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, delim: &[u8]) -> Option<Vec<u8>> {
    loop {
        if let Some(p) = find(buf, delim) {
            return Some(buf.drain(..p + delim.len()).collect());
        }
        if !fill(s, buf).await {
            return None;
        }
    }
}

fn parse_request_head(head: &[u8]) -> Option<Seen> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.trim_end_matches("\r\n").split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target, version) = (first.next()?, first.next()?, first.next()?);
    let mut headers = Vec::new();
    for l in lines {
        let (n, v) = l.split_once(':')?;
        headers.push((n.to_ascii_lowercase(), v.trim().as_bytes().to_vec()));
    }
    Some(Seen {
        conn: 0,
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers,
        body: Vec::new(),
        body_complete: false,
    })
}

/// Reads a request body framed by Content-Length or chunked: (body, complete).
async fn read_body(s: &mut TcpStream, buf: &mut Vec<u8>, seen: &Seen) -> (Vec<u8>, bool) {
    if seen.values("transfer-encoding").iter().any(|v| v.to_ascii_lowercase().contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let Some(line) = read_until(s, buf, b"\r\n").await else { return (body, false) };
            let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
            let Ok(size) = usize::from_str_radix(text.split(';').next().unwrap_or_default().trim(), 16) else { return (body, false) };
            if size == 0 {
                loop {
                    match read_until(s, buf, b"\r\n").await {
                        None => return (body, false),
                        Some(l) if l.len() == 2 => return (body, true),
                        Some(_) => {}
                    }
                }
            }
            while buf.len() < size + 2 {
                if !fill(s, buf).await {
                    body.append(buf);
                    return (body, false);
                }
            }
            body.extend(buf.drain(..size));
            buf.drain(..2);
        }
    }
    let n = seen.values("content-length").first().and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or(0);
    while buf.len() < n {
        if !fill(s, buf).await {
            return (std::mem::take(buf), false);
        }
    }
    (buf.drain(..n).collect(), true)
}

async fn serve_backend_conn(conn: usize, mut s: TcpStream, log: Arc<Log>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let Some(head) = read_until(&mut s, &mut buf, b"\r\n\r\n").await else {
            if !buf.is_empty() {
                log.push(Event::Raw { conn, bytes: std::mem::take(&mut buf) });
            }
            break;
        };
        let Some(mut seen) = parse_request_head(&head) else {
            log.push(Event::Raw { conn, bytes: head });
            break;
        };
        seen.conn = conn;
        let script = script_for(&seen);
        let idx = log.push(Event::Request(seen.clone()));
        match script {
            Script::Ok => {
                let (body, complete) = read_body(&mut s, &mut buf, &seen).await;
                log.set_body(idx, body, complete);
                if !complete {
                    break;
                }
                let text = format!("ok {}", seen.target);
                let mut resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Conn: {conn}\r\n\r\n", text.len());
                if seen.method != "HEAD" {
                    resp.push_str(&text);
                }
                if s.write_all(resp.as_bytes()).await.is_err() {
                    break;
                }
            }
            Script::Bytes(b) => {
                if s.write_all(&b).await.is_err() {
                    break;
                }
            }
            Script::Pause(a, b) => {
                if s.write_all(&a).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                if s.write_all(&b).await.is_err() {
                    break;
                }
            }
            Script::Tunnel(b) => {
                if s.write_all(&b).await.is_err() {
                    break;
                }
                if !buf.is_empty() {
                    log.push(Event::Raw { conn, bytes: std::mem::take(&mut buf) });
                }
                while fill(&mut s, &mut buf).await {
                    log.push(Event::Raw { conn, bytes: std::mem::take(&mut buf) });
                }
                break;
            }
            Script::Stream => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n");
                if s.write_all(head.as_bytes()).await.is_err() {
                    break;
                }
                let piece = vec![b'x'; 64 * 1024];
                let mut ok = true;
                for _ in 0..BIG / piece.len() as u64 {
                    if s.write_all(&piece).await.is_err() {
                        ok = false;
                        break;
                    }
                    log.streamed.fetch_add(piece.len() as u64, Ordering::Relaxed);
                }
                if !ok {
                    break;
                }
            }
        }
    }
    log.push(Event::Closed { conn });
}

struct Backend {
    addr: SocketAddr,
    log: Arc<Log>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("backend binds");
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Log::default());
        let l = log.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            let mut n = 0;
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((s, _)) = accepted else { continue };
                        let _ = s.set_nodelay(true);
                        conns.spawn(serve_backend_conn(n, s, l.clone()));
                        n += 1;
                    }
                    Some(_) = conns.join_next() => {}
                }
            }
        });
        Backend { addr, log, task }
    }

    fn events(&self) -> Vec<Event> {
        self.log.events.lock().unwrap().clone()
    }

    /// A position in the event log, to look at what happened after it.
    fn mark(&self) -> usize {
        self.log.events.lock().unwrap().len()
    }

    fn requests_since(&self, mark: usize) -> Vec<Seen> {
        self.events()
            .into_iter()
            .skip(mark)
            .filter_map(|e| match e {
                Event::Request(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// `METHOD target` of every request since `mark`, in arrival order.
    fn lines_since(&self, mark: usize) -> Vec<String> {
        self.requests_since(mark).iter().map(Seen::line).collect()
    }

    fn request(&self, mark: usize, target: &str) -> Option<Seen> {
        self.requests_since(mark).into_iter().find(|s| s.target == target)
    }

    /// Raw bytes read on `conn` (after a 101, or unparsable).
    fn raw_on(&self, conn: usize) -> Vec<u8> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Raw { conn: c, bytes } if c == conn => Some(bytes),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Every request ever seen whose target mentions "smuggled".
    fn smuggled(&self) -> Vec<String> {
        self.requests_since(0).iter().filter(|s| s.target.contains("smuggled")).map(|s| format!("{} (conn {})", s.line(), s.conn)).collect()
    }

    fn describe(&self) -> String {
        let lines: Vec<String> = self
            .events()
            .iter()
            .map(|e| match e {
                Event::Request(s) => format!("conn {}: {} ({} body bytes, complete {})", s.conn, s.line(), s.body.len(), s.body_complete),
                Event::Raw { conn, bytes } => format!("conn {conn}: raw {}", show(bytes)),
                Event::Closed { conn } => format!("conn {conn}: closed"),
            })
            .collect();
        lines.join("; ")
    }

    /// Waits until `f` finds something in the log.
    async fn wait_for<T>(&self, what: &str, limit: Duration, f: impl Fn(&[Event]) -> Option<T>) -> Result<T, String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.log.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let found = f(&self.log.events.lock().unwrap());
            if let Some(v) = found {
                return Ok(v);
            }
            if timeout(deadline.saturating_duration_since(tokio::time::Instant::now()), notified).await.is_err() {
                return Err(format!("{what}: not within {limit:?}; backend log: {}", self.describe()));
            }
        }
    }

    /// Waits for a request for `target` recorded after `mark`.
    async fn wait_request(&self, mark: usize, target: &str) -> Result<Seen, String> {
        self.wait_for(&format!("{target} reaches the backend"), WAIT, |ev| {
            ev.iter().skip(mark).find_map(|e| match e {
                Event::Request(s) if s.target == target => Some(s.clone()),
                _ => None,
            })
        })
        .await
    }

    /// Waits for tidegate to close backend connection `conn`.
    async fn wait_closed(&self, conn: usize, limit: Duration) -> Result<(), String> {
        self.wait_for(&format!("tidegate closes backend connection {conn}"), limit, |ev| {
            ev.iter().any(|e| matches!(e, Event::Closed { conn: c } if *c == conn)).then_some(())
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// The raw client
// ---------------------------------------------------------------------------------------------

impl Resp {
    fn closes(&self) -> bool {
        self.header("connection").is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
    fn describe(&self) -> String {
        format!("{} {}", show(self.head.as_bytes()), show(&self.body))
    }
}

struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let s = timeout(WAIT, TcpStream::connect(addr)).await.expect("connect in time").expect("connect");
        Client { s, buf: Vec::new(), eof: false }
    }

    /// Connects from source address `ip` (any 127.0.0.0/8 address works on loopback).
    async fn connect_from(ip: IpAddr, addr: SocketAddr) -> Client {
        let sock = TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::new(ip, 0)).expect("bind the client's source address");
        let s = timeout(WAIT, sock.connect(addr)).await.expect("connect in time").expect("connect");
        Client { s, buf: Vec::new(), eof: false }
    }

    /// Writes `bytes`; false when the peer closed first (tidegate may refuse before reading all).
    async fn send(&mut self, bytes: &[u8]) -> bool {
        matches!(timeout(WAIT, self.s.write_all(bytes)).await, Ok(Ok(())))
    }

    /// One read into the buffer; EOF and errors (a reset) both end the stream.
    async fn fill(&mut self) {
        self.buf.reserve(64 * 1024);
        match self.s.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => self.eof = true,
            Ok(_) => {}
        }
    }

    /// The next complete response within `WAIT`.
    async fn next(&mut self, head_req: bool) -> Result<Resp, String> {
        let got = timeout(WAIT, async {
            loop {
                if let Some((r, n)) = parse_response(&self.buf, self.eof, head_req) {
                    self.buf.drain(..n);
                    return Some(r);
                }
                if self.eof {
                    return None;
                }
                self.fill().await;
            }
        })
        .await;
        match got {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(format!("connection closed without a complete response; got {}", show(&self.buf))),
            Err(_) => Err(format!("no complete response within {WAIT:?}; got {}", show(&self.buf))),
        }
    }

    async fn response(&mut self) -> Result<Resp, String> {
        self.next(false).await
    }

    /// The next final (non-1xx) response, with the statuses of any interim ones before it.
    async fn final_response(&mut self) -> Result<(Vec<u16>, Resp), String> {
        let mut interim = Vec::new();
        loop {
            let r = self.response().await?;
            if r.status >= 200 {
                return Ok((interim, r));
            }
            interim.push(r.status);
        }
    }

    /// Waits up to `wait` for the peer to close; bytes read meanwhile stay in `buf`.
    async fn closed(&mut self, wait: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        let done = timeout(wait, async {
            while !self.eof {
                self.fill().await;
            }
        })
        .await;
        match done {
            Ok(()) => Ok(start.elapsed()),
            Err(_) => Err(format!("connection still open after {wait:?} (unread: {})", show(&self.buf))),
        }
    }

    /// Like `closed`, and nothing more may arrive before the close.
    async fn closed_clean(&mut self, wait: Duration) -> Result<Duration, String> {
        let took = self.closed(wait).await?;
        if self.buf.is_empty() { Ok(took) } else { Err(format!("bytes after the answer: {}", show(&self.buf))) }
    }
}

// ---------------------------------------------------------------------------------------------
// tidegate in front of one recording backend
// ---------------------------------------------------------------------------------------------

const TIMEOUTS: &str = "header_read = \"1s\"\n  keepalive_idle = \"5s\"";

/// One listener (`listener`: extra keys; `timeouts`: the `[listener.timeouts]` body) routing
/// everything to the backend.
fn config(backend: SocketAddr, listener: &str, timeouts: &str) -> String {
    format!(
        r#"shutdown_timeout = "1s"

[[listener]]
name = "attack"
bind = "127.0.0.1:0"
{listener}

  [listener.timeouts]
  {timeouts}

  [[listener.route]]
  upstream = "app"

[upstream.app]
keepalive = 8
servers = [ {{ addr = "{backend}", max_fails = 0 }} ]

  [upstream.app.timeouts]
  connect = "1s"
  response_header = "2s"
"#
    )
}

async fn setup(listener: &str, timeouts: &str) -> (Backend, support::Proxy) {
    let be = Backend::start().await;
    let tg = support::tidegate(&config(be.addr, listener, timeouts)).await;
    (be, tg)
}

/// `GET /health/N` on a fresh connection must be answered `200 ok /health/N` by the backend.
async fn healthy(tg: SocketAddr, be: &Backend) -> Result<Seen, String> {
    let path = unique("/health");
    let mark = be.mark();
    let mut c = Client::connect(tg).await;
    c.send(&get(&path)).await;
    let r = c.response().await.map_err(|e| format!("fresh request {path} afterwards: {e}"))?;
    if (r.status, r.text()) != (200, format!("ok {path}")) {
        return Err(format!("fresh request {path} afterwards: got {}", r.describe()));
    }
    be.request(mark, &path).ok_or_else(|| format!("{path} answered but not recorded"))
}

/// `GET /after/N` on the client's connection must get its own `200 ok /after/N`.
async fn follow_up(c: &mut Client, be: &Backend) -> Result<Seen, String> {
    let path = unique("/after");
    let mark = be.mark();
    if !c.send(&get(&path)).await {
        return Err(format!("follow-up {path}: the connection was closed"));
    }
    let r = c.response().await.map_err(|e| format!("follow-up {path} on the same connection: {e}"))?;
    if (r.status, r.text()) != (200, format!("ok {path}")) {
        return Err(format!("follow-up {path} on the same connection: got {}", r.describe()));
    }
    be.request(mark, &path).ok_or_else(|| format!("{path} answered but not recorded"))
}

/// Sends `bytes` on a fresh connection: the one answer must be `status`, then the connection
/// closes with nothing more written; the backend sees no request; a fresh request then works.
async fn expect_refused(tg: SocketAddr, be: &Backend, what: &str, bytes: &[u8], status: u16) -> Result<(), String> {
    let mark = be.mark();
    let mut c = Client::connect(tg).await;
    c.send(bytes).await;
    let r = c.response().await.map_err(|e| format!("{what}: expected {status}: {e}"))?;
    if r.status != status {
        // Let whatever else this case causes happen now, so it is reported here and not
        // blamed on the next case.
        let _ = c.closed(Duration::from_secs(1)).await;
        return Err(format!(
            "{what}: expected {status}, got {}; then on the connection {}; backend saw {:?}",
            r.describe(),
            show(&c.buf),
            be.lines_since(mark)
        ));
    }
    c.closed_clean(Duration::from_secs(2)).await.map_err(|e| format!("{what}: {status} answered, but {e}"))?;
    let h = healthy(tg, be).await.map_err(|e| format!("{what}: {e}"))?;
    let lines = be.lines_since(mark);
    if lines != [h.line()] {
        return Err(format!("{what}: backend saw {lines:?}, want only the fresh request {:?}", h.line()));
    }
    Ok(())
}

/// Sends `bytes` on a fresh connection: it must reach the backend as `want` (`METHOD target`)
/// and be answered with the backend's `200`; the connection stays open for a follow-up.
async fn expect_forwarded(tg: SocketAddr, be: &Backend, what: &str, bytes: &[u8], want: &str) -> Result<Seen, String> {
    let mark = be.mark();
    let mut c = Client::connect(tg).await;
    c.send(bytes).await;
    let r = c.response().await.map_err(|e| format!("{what}: {e}"))?;
    let target = want.split_once(' ').map_or("", |(_, t)| t);
    if (r.status, r.text()) != (200, format!("ok {target}")) {
        return Err(format!("{what}: expected the backend's 200 for {want:?}, got {}", r.describe()));
    }
    let seen = be.requests_since(mark).into_iter().next().ok_or_else(|| format!("{what}: nothing recorded"))?;
    if seen.version != "HTTP/1.1" {
        return Err(format!("{what}: forwarded as {}", seen.version));
    }
    let after = follow_up(&mut c, be).await.map_err(|e| format!("{what}: {e}"))?;
    let h = healthy(tg, be).await.map_err(|e| format!("{what}: {e}"))?;
    let lines = be.lines_since(mark);
    if lines != [want.to_string(), after.line(), h.line()] {
        return Err(format!("{what}: backend saw {lines:?}, want {:?}", [want.to_string(), after.line(), h.line()]));
    }
    Ok(seen)
}

// ---------------------------------------------------------------------------------------------
// 1. Request head policy
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn content_length_with_transfer_encoding_is_400_and_closed() {
    let (be, tg) = setup("", TIMEOUTS).await;
    // CL.TE: the whole thing by Content-Length, a smuggled request after the last chunk by TE.
    let cl_te = format!("0\r\n\r\n{SMUGGLED}");
    // TE.CL: a chunk holding a request, which Content-Length: 3 would leave behind.
    let te_cl = format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len());
    let n = cl_te.len();
    let cases: Vec<(&str, String)> = vec![
        ("CL then TE", format!("POST /a HTTP/1.1\r\nHost: test\r\nContent-Length: {n}\r\nTransfer-Encoding: chunked\r\n\r\n{cl_te}")),
        ("TE then CL", format!("POST /a HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n{te_cl}")),
        (
            "TE as the first header line",
            format!("POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nHost: test\r\nX-A: 1\r\nContent-Length: {n}\r\n\r\n{cl_te}"),
        ),
        (
            "TE as the last header line",
            format!("POST /a HTTP/1.1\r\nContent-Length: 3\r\nHost: test\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n{te_cl}"),
        ),
        (
            "TE: ChUnKeD with CL",
            format!("POST /a HTTP/1.1\r\nHost: test\r\nContent-Length: {n}\r\nTransfer-Encoding: ChUnKeD\r\n\r\n{cl_te}"),
        ),
        (
            "lower-case names, no spaces",
            format!("POST /a HTTP/1.1\r\nhost:test\r\ntransfer-encoding:CHUNKED\r\ncontent-length:3\r\n\r\n{te_cl}"),
        ),
        ("TE with CL: 0", format!("POST /a HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n{te_cl}")),
    ];
    let mut f = Failures::default();
    for (what, bytes) in &cases {
        f.check(expect_refused(tg.addr, &be, what, bytes.as_bytes(), 400).await);
    }
    f.check(no_smuggled(&be));
    f.assert_none(cases.len() + 1);
    tg.stop().await;
}

#[tokio::test]
async fn transfer_encoding_other_than_one_final_chunked_is_400_and_closed() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let body = format!("5\r\nhello\r\n0\r\n\r\n{SMUGGLED}");
    let cases = [
        ("gzip, chunked", "Transfer-Encoding: gzip, chunked\r\n"),
        ("chunked, identity", "Transfer-Encoding: chunked, identity\r\n"),
        ("identity", "Transfer-Encoding: identity\r\n"),
        ("gzip", "Transfer-Encoding: gzip\r\n"),
        ("two TE headers: chunked, chunked", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
        ("two TE headers: gzip, chunked", "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"),
        ("chunked listed twice", "Transfer-Encoding: chunked, chunked\r\n"),
        ("xchunked", "Transfer-Encoding: xchunked\r\n"),
    ];
    let mut f = Failures::default();
    for (what, te) in cases {
        let bytes = format!("POST /te HTTP/1.1\r\nHost: test\r\n{te}\r\n{body}");
        f.check(expect_refused(tg.addr, &be, what, bytes.as_bytes(), 400).await);
    }
    f.check(no_smuggled(&be));
    f.assert_none(cases.len() + 1);
    tg.stop().await;
}

#[tokio::test]
async fn content_length_that_is_not_plain_digits_is_400_and_closed() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let cases = [
        ("+5", "Content-Length: +5\r\n"),
        ("' 0x5'", "Content-Length:  0x5\r\n"),
        ("1,1", "Content-Length: 1,1\r\n"),
        ("5, 5", "Content-Length: 5, 5\r\n"),
        ("-5", "Content-Length: -5\r\n"),
        ("5.0", "Content-Length: 5.0\r\n"),
        ("empty", "Content-Length: \r\n"),
        ("abc", "Content-Length: abc\r\n"),
        ("2^64 + 5", "Content-Length: 18446744073709551621\r\n"),
        ("repeated, different", "Content-Length: 5\r\nContent-Length: 6\r\n"),
        ("repeated, different, apart", "Content-Length: 5\r\nX-A: 1\r\ncontent-length: 45\r\n"),
    ];
    let mut f = Failures::default();
    for (what, cl) in cases {
        let bytes = format!("POST /cl HTTP/1.1\r\nHost: test\r\n{cl}\r\nhello{SMUGGLED}");
        f.check(expect_refused(tg.addr, &be, &format!("Content-Length {what}"), bytes.as_bytes(), 400).await);
    }
    f.check(no_smuggled(&be));
    f.assert_none(cases.len() + 1);
    tg.stop().await;
}

/// Whitespace around a field value is not part of it (RFC 9110 §5.5): `Content-Length: 5 `
/// is 5, read the same way by tidegate's parser and its raw framing scanner, and forwarded
/// re-serialised as `5`.
#[tokio::test]
async fn content_length_with_surrounding_whitespace_is_its_digits() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let mut f = Failures::default();
    for cl in ["Content-Length: 5 \r\n", "Content-Length:\t5\t\r\n"] {
        let bytes = format!("POST /cl HTTP/1.1\r\nHost: test\r\n{cl}\r\nhello");
        match expect_forwarded(tg.addr, &be, &format!("{cl:?}"), bytes.as_bytes(), "POST /cl").await {
            Ok(seen) if seen.values("content-length") == ["5"] && seen.body == b"hello" && seen.body_complete => f.check(Ok(())),
            Ok(seen) => f.check(Err(format!("{cl:?}: backend saw {:?} with body {:?}", seen.values("content-length"), show(&seen.body)))),
            Err(e) => f.check(Err(e)),
        }
    }
    f.assert_none(2);
    tg.stop().await;
}

#[tokio::test]
async fn malformed_header_lines_are_400_and_closed() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("obs-fold with a space", b"GET /a HTTP/1.1\r\nHost: test\r\nX-A: a\r\n b\r\n\r\n".to_vec()),
        ("obs-fold with a tab", b"GET /a HTTP/1.1\r\nHost: test\r\nX-A: a\r\n\tb\r\n\r\n".to_vec()),
        ("obs-fold hiding Transfer-Encoding", b"GET /a HTTP/1.1\r\nHost: test\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n\r\n".to_vec()),
        ("space before the colon (Host : test)", b"GET /a HTTP/1.1\r\nHost : test\r\n\r\n".to_vec()),
        (
            "Transfer-Encoding : chunked",
            b"POST /a HTTP/1.1\r\nHost: test\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n".to_vec(),
        ),
        ("tab before the colon", b"GET /a HTTP/1.1\r\nHost: test\r\nX-A\t: 1\r\n\r\n".to_vec()),
        ("bare CR inside a value", b"GET /a HTTP/1.1\r\nHost: test\r\nX-A: a\rb\r\n\r\n".to_vec()),
        ("bare CR as a line end", b"GET /a HTTP/1.1\r\nHost: test\r\nX-A: a\rTransfer-Encoding: chunked\r\n\r\n".to_vec()),
        ("control byte 0x01 in a name", b"GET /a HTTP/1.1\r\nHost: test\r\nX\x01A: 1\r\n\r\n".to_vec()),
        ("byte 0xff in a name", b"GET /a HTTP/1.1\r\nHost: test\r\nX\xffA: 1\r\n\r\n".to_vec()),
        ("byte 0x80 in a name", b"GET /a HTTP/1.1\r\nHost: test\r\n\x80X-A: 1\r\n\r\n".to_vec()),
        ("space inside a name", b"GET /a HTTP/1.1\r\nHost: test\r\nX A: 1\r\n\r\n".to_vec()),
        ("empty name", b"GET /a HTTP/1.1\r\nHost: test\r\n: 1\r\n\r\n".to_vec()),
        ("NUL in a value", b"GET /a HTTP/1.1\r\nHost: test\r\nX-A: a\x00b\r\n\r\n".to_vec()),
        ("bare LF inside a value", b"GET /a HTTP/1.1\r\nHost: test\r\nX-A: a\nb\r\n\r\n".to_vec()),
        ("NUL in the Host value", b"GET /a HTTP/1.1\r\nHost: te\x00st\r\n\r\n".to_vec()),
        (
            "Transfer-Encoding on HTTP/1.0",
            format!("POST /a HTTP/1.0\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{SMUGGLED}").into_bytes(),
        ),
        ("HTTP/0.9 request line", b"GET /\r\n".to_vec()),
        ("HTTP/0.9 request line, blank line after", b"GET /smuggled\r\n\r\n".to_vec()),
    ];
    let mut f = Failures::default();
    for (what, bytes) in &cases {
        f.check(expect_refused(tg.addr, &be, what, bytes, 400).await);
    }
    f.check(no_smuggled(&be));
    f.assert_none(cases.len() + 1);
    tg.stop().await;
}

#[tokio::test]
async fn request_targets_and_host_headers() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let refused: Vec<(&str, &[u8])> = vec![
        ("GET *", b"GET * HTTP/1.1\r\nHost: test\r\n\r\n"),
        ("CONNECT host:443", b"CONNECT test:443 HTTP/1.1\r\nHost: test:443\r\n\r\n"),
        ("absolute-form whose authority is not the Host", b"GET http://other.example/ HTTP/1.1\r\nHost: test\r\n\r\n"),
        ("absolute-form with userinfo naming the Host", b"GET http://test@other.example/ HTTP/1.1\r\nHost: test\r\n\r\n"),
        ("absolute-form /smuggled to another authority", b"GET http://other.example/smuggled HTTP/1.1\r\nHost: test\r\n\r\n"),
        ("no Host", b"GET /a HTTP/1.1\r\n\r\n"),
        ("two equal Host headers", b"GET /a HTTP/1.1\r\nHost: test\r\nHost: test\r\n\r\n"),
        ("two different Host headers", b"GET /a HTTP/1.1\r\nHost: test\r\nhost: other.example\r\n\r\n"),
    ];
    let mut f = Failures::default();
    for (what, bytes) in &refused {
        f.check(expect_refused(tg.addr, &be, what, bytes, 400).await);
    }
    f.check(expect_forwarded(tg.addr, &be, "OPTIONS *", b"OPTIONS * HTTP/1.1\r\nHost: test\r\n\r\n", "OPTIONS *").await.map(drop));
    let agrees = expect_forwarded(
        tg.addr,
        &be,
        "absolute-form that agrees with Host",
        b"GET http://test/abs?q=1 HTTP/1.1\r\nHost: test\r\n\r\n",
        "GET /abs?q=1",
    )
    .await;
    f.check(agrees.and_then(|s| {
        if s.values("host") == ["test"] { Ok(()) } else { Err(format!("absolute-form: backend got Host {:?}", s.values("host"))) }
    }));
    f.check(
        expect_forwarded(
            tg.addr,
            &be,
            "absolute-form, authority in upper case",
            b"GET http://TEST/abs2 HTTP/1.1\r\nHost: test\r\n\r\n",
            "GET /abs2",
        )
        .await
        .map(drop),
    );
    f.check(no_smuggled(&be));
    f.assert_none(refused.len() + 3 + 1);
    tg.stop().await;
}

const UNDERSCORES: &[u8] =
    b"GET /u HTTP/1.1\r\nHost: test\r\nX_Forwarded_For: 6.6.6.6\r\nX-Real_IP: 7.7.7.7\r\nTransfer_Encoding: chunked\r\n\
Content_Length: 40\r\nX-Ok: 1\r\n\r\n";

#[tokio::test]
async fn underscore_headers_are_dropped_by_default() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let seen = expect_forwarded(tg.addr, &be, "underscored names", UNDERSCORES, "GET /u").await.unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = seen.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(!names.iter().any(|n| n.contains('_')), "underscored names reached the backend: {names:?}");
    assert_eq!(seen.values("x-ok"), ["1"], "other headers pass: {names:?}");
    assert_eq!(seen.values("x-forwarded-for"), ["127.0.0.1"], "X-Forwarded-For is the client's address only");
    assert!(seen.values("transfer-encoding").is_empty() && seen.values("content-length").is_empty(), "{:?}", seen.headers);
    tg.stop().await;
}

#[tokio::test]
async fn underscore_headers_are_400_with_reject() {
    let (be, tg) = setup("header_underscores = \"reject\"", TIMEOUTS).await;
    let mut f = Failures::default();
    f.check(expect_refused(tg.addr, &be, "underscored names with reject", UNDERSCORES, 400).await);
    f.check(
        expect_refused(tg.addr, &be, "one underscored name with reject", b"GET /u HTTP/1.1\r\nHost: test\r\nX_A: 1\r\n\r\n", 400).await,
    );
    f.assert_none(2);
    tg.stop().await;
}

#[tokio::test]
async fn a_request_inside_a_body_is_never_a_request() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let mut f = Failures::default();

    // Valid bodies that hold a request: forwarded as bodies, and the pipelined request after
    // them is answered on its own.
    let n = SMUGGLED.len();
    let bodies = [
        ("Content-Length body", format!("POST /p HTTP/1.1\r\nHost: test\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}")),
        ("chunked body", format!("POST /p HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n{n:x}\r\n{SMUGGLED}\r\n0\r\n\r\n")),
        (
            "chunked body, the request split over chunks",
            format!(
                "POST /p HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
                &SMUGGLED[..5],
                n - 5,
                &SMUGGLED[5..]
            ),
        ),
        (
            "chunked body with a chunk extension",
            format!("POST /p HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n{n:x};x=\"y\"\r\n{SMUGGLED}\r\n0\r\n\r\n"),
        ),
        (
            "chunked body with a trailer",
            format!("POST /p HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n{n:x}\r\n{SMUGGLED}\r\n0\r\nX-Trailer: 1\r\n\r\n"),
        ),
        ("head and body in separate writes", format!("POST /p HTTP/1.1\r\nHost: test\r\nContent-Length: {n}\r\n\r\n")),
    ];
    for (what, req) in &bodies {
        let r: Result<(), String> = async {
            let mark = be.mark();
            let next = unique("/next");
            let mut c = Client::connect(tg.addr).await;
            let mut bytes = req.clone().into_bytes();
            if what.contains("separate writes") {
                // The body only once the head has reached the backend.
                c.send(&bytes).await;
                be.wait_request(mark, "/p").await.map_err(|e| format!("{what}: {e}"))?;
                bytes = SMUGGLED.as_bytes().to_vec();
            }
            bytes.extend_from_slice(&get(&next));
            c.send(&bytes).await;
            let first = c.response().await.map_err(|e| format!("{what}: {e}"))?;
            if (first.status, first.text()) != (200, "ok /p".to_string()) || first.closes() {
                return Err(format!("{what}: expected the backend's 200, keep-alive; got {}", first.describe()));
            }
            let second =
                c.response().await.map_err(|e| format!("{what}: pipelined request: {e}; backend saw {:?}", be.lines_since(mark)))?;
            if (second.status, second.text()) != (200, format!("ok {next}")) {
                return Err(format!("{what}: pipelined request got {}", second.describe()));
            }
            let after = follow_up(&mut c, &be).await.map_err(|e| format!("{what}: {e}"))?;
            let h = healthy(tg.addr, &be).await.map_err(|e| format!("{what}: {e}"))?;
            let seen = be.requests_since(mark);
            let lines: Vec<String> = seen.iter().map(Seen::line).collect();
            let want = ["POST /p".to_string(), format!("GET {next}"), after.line(), h.line()];
            if lines != want {
                return Err(format!("{what}: backend saw {lines:?}, want {want:?}"));
            }
            if seen[0].body != SMUGGLED.as_bytes() || !seen[0].body_complete {
                return Err(format!("{what}: the backend got body {} (complete {})", show(&seen[0].body), seen[0].body_complete));
            }
            Ok(())
        }
        .await;
        f.check(r);
    }

    // Broken chunked framing around a hidden request: the client's fault, so 400 and the
    // connection closed; the backend never sees the request, and any forwarded part of the
    // body is never completed on a connection that stays open.
    let broken = [
        ("invalid chunk size", format!("POST /p HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{SMUGGLED}")),
        (
            "chunk longer than its size",
            format!("POST /p HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "chunk size overflowing 64 bits",
            format!("POST /p HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000a\r\n{SMUGGLED}\r\n0\r\n\r\n"),
        ),
        (
            "chunk size with a sign",
            format!("POST /p HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n{SMUGGLED}"),
        ),
    ];
    for (what, req) in &broken {
        let r: Result<(), String> = async {
            let mark = be.mark();
            let mut c = Client::connect(tg.addr).await;
            c.send(req.as_bytes()).await;
            let resp = c.response().await.map_err(|e| format!("{what}: expected 400: {e}"))?;
            if resp.status != 400 {
                return Err(format!("{what}: expected 400, got {}", resp.describe()));
            }
            c.closed_clean(Duration::from_secs(2)).await.map_err(|e| format!("{what}: 400 answered, but {e}"))?;
            let h = healthy(tg.addr, &be).await.map_err(|e| format!("{what}: {e}"))?;
            for s in be.requests_since(mark) {
                if s.target == "/p" {
                    if s.body_complete {
                        return Err(format!("{what}: the backend got a complete body {}", show(&s.body)));
                    }
                    be.wait_closed(s.conn, WAIT).await.map_err(|e| format!("{what}: the half-sent request's connection: {e}"))?;
                } else if s.target != h.target {
                    return Err(format!("{what}: backend saw {}", s.line()));
                }
            }
            Ok(())
        }
        .await;
        f.check(r);
    }
    f.check(no_smuggled(&be));
    f.assert_none(bodies.len() + broken.len() + 1);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Expect: 100-continue
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn expect_100_continue_is_answered_by_tidegate() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let mut f = Failures::default();
    let cases = [
        ("Content-Length", "Content-Length: 5\r\n", "hello".to_string()),
        ("chunked", "Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n".to_string()),
    ];
    for (what, framing, body) in &cases {
        let r: Result<(), String> = async {
            let mark = be.mark();
            let mut c = Client::connect(tg.addr).await;
            c.send(format!("POST /upload HTTP/1.1\r\nHost: test\r\n{framing}Expect: 100-continue\r\n\r\n").as_bytes()).await;
            let cont = c.response().await.map_err(|e| format!("{what}: waiting for 100 Continue: {e}"))?;
            if cont.status != 100 {
                return Err(format!("{what}: expected 100 Continue before the body, got {}", cont.describe()));
            }
            c.send(body.as_bytes()).await;
            let r = c.response().await.map_err(|e| format!("{what}: {e}"))?;
            if (r.status, r.text()) != (200, "ok /upload".to_string()) {
                return Err(format!("{what}: got {}", r.describe()));
            }
            let after = follow_up(&mut c, &be).await.map_err(|e| format!("{what}: {e}"))?;
            let seen = be.requests_since(mark);
            let lines: Vec<String> = seen.iter().map(Seen::line).collect();
            if lines != ["POST /upload".to_string(), after.line()] {
                return Err(format!("{what}: backend saw {lines:?}"));
            }
            if !seen[0].values("expect").is_empty() {
                return Err(format!("{what}: the backend got Expect: {:?}", seen[0].values("expect")));
            }
            if (seen[0].body.as_slice(), seen[0].body_complete) != (b"hello".as_slice(), true) {
                return Err(format!("{what}: the backend got body {}", show(&seen[0].body)));
            }
            healthy(tg.addr, &be).await.map(drop).map_err(|e| format!("{what}: {e}"))
        }
        .await;
        f.check(r);
    }
    f.assert_none(cases.len());
    tg.stop().await;
}

#[tokio::test]
async fn backend_answering_before_the_body_closes_both_connections() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let mut f = Failures::default();
    let n = SMUGGLED.len();
    let chunked_body = format!("{n:x}\r\n{SMUGGLED}\r\n0\r\n\r\n");
    // (what, path, framing headers, Expect, body sent after the answer, status, body)
    let cases = [
        ("413 before the body, with Expect", "/resp/early-413", format!("Content-Length: {n}\r\n"), true, SMUGGLED.to_string(), 413, ""),
        ("200 before the body, with Expect", "/resp/early-200", format!("Content-Length: {n}\r\n"), true, SMUGGLED.to_string(), 200, "ok"),
        ("200 before the body, no Expect", "/resp/early-200", format!("Content-Length: {n}\r\n"), false, SMUGGLED.to_string(), 200, "ok"),
        (
            "413 before a chunked body, no Expect",
            "/resp/early-413",
            "Transfer-Encoding: chunked\r\n".to_string(),
            false,
            chunked_body.clone(),
            413,
            "",
        ),
    ];
    for (what, path, framing, expect, body, status, text) in &cases {
        let r: Result<(), String> = async {
            let mark = be.mark();
            let mut c = Client::connect(tg.addr).await;
            let expect = if *expect { "Expect: 100-continue\r\n" } else { "" };
            c.send(format!("POST {path} HTTP/1.1\r\nHost: test\r\n{framing}{expect}\r\n").as_bytes()).await;
            let mut errs = Vec::new();
            let (interim, r) = c.final_response().await.map_err(|e| format!("{what}: {e}"))?;
            eprintln!("{what}: interim {interim:?}, final {}", r.describe());
            if (r.status, r.text()) != (*status, text.to_string()) {
                errs.push(format!("expected {status} {text:?}, got {}", r.describe()));
            }
            if !r.closes() {
                errs.push(format!("the answer lacks Connection: close: {}", show(r.head.as_bytes())));
            }
            // The client now sends the body the server never read: a hidden request.
            c.send(body.as_bytes()).await;
            if let Err(e) = c.closed_clean(Duration::from_secs(2)).await {
                errs.push(format!("client connection: {e}"));
            }
            let early = be.request(mark, path).ok_or_else(|| format!("{what}: the request never reached the backend"))?;
            match healthy(tg.addr, &be).await {
                Ok(h) if h.conn == early.conn => errs.push(format!("the next request reused backend connection {}", h.conn)),
                Ok(_) => {}
                Err(e) => errs.push(e),
            }
            if let Err(e) = be.wait_closed(early.conn, WAIT).await {
                errs.push(e);
            }
            let raw = be.raw_on(early.conn);
            if !raw.is_empty() {
                errs.push(format!("the unread body reached the backend after its answer, read as a request head: {}", show(&raw)));
            }
            let lines = be.lines_since(mark);
            if lines.len() != 2 || lines[0] != format!("POST {path}") {
                errs.push(format!("backend saw {lines:?}, want the POST and the fresh request only"));
            }
            if errs.is_empty() { Ok(()) } else { Err(format!("{what}: {}", errs.join("; "))) }
        }
        .await;
        f.check(r);
    }
    f.check(no_smuggled(&be));
    f.assert_none(cases.len() + 1);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Upgrade policy
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_websocket_upgrades_are_refused() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let up = "Connection: Upgrade\r\nUpgrade: websocket\r\n";
    let v13 = "Sec-WebSocket-Version: 13\r\n";
    let cases: Vec<(&str, String, u16)> = vec![
        ("POST with upgrade headers", format!("POST /ws/x HTTP/1.1\r\nHost: test\r\n{WS}Content-Length: 0\r\n\r\n"), 400),
        ("HTTP/1.0 upgrade", format!("GET /ws/x HTTP/1.0\r\nHost: test\r\n{WS}\r\n"), 400),
        ("missing Sec-WebSocket-Key", format!("GET /ws/x HTTP/1.1\r\nHost: test\r\n{up}{v13}\r\n"), 400),
        ("two Sec-WebSocket-Key", format!("GET /ws/x HTTP/1.1\r\nHost: test\r\n{up}{key}{key}{v13}\r\n"), 400),
        (
            "Sec-WebSocket-Key not base64",
            format!("GET /ws/x HTTP/1.1\r\nHost: test\r\n{up}Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==\r\n{v13}\r\n"),
            400,
        ),
        (
            "Sec-WebSocket-Key of 15 bytes",
            format!("GET /ws/x HTTP/1.1\r\nHost: test\r\n{up}Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA\r\n{v13}\r\n"),
            400,
        ),
        (
            "Sec-WebSocket-Key of 17 bytes",
            format!("GET /ws/x HTTP/1.1\r\nHost: test\r\n{up}Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAA=\r\n{v13}\r\n"),
            400,
        ),
        ("Sec-WebSocket-Key 'abc'", format!("GET /ws/x HTTP/1.1\r\nHost: test\r\n{up}Sec-WebSocket-Key: abc\r\n{v13}\r\n"), 400),
        ("missing Sec-WebSocket-Version", format!("GET /ws/x HTTP/1.1\r\nHost: test\r\n{up}{key}\r\n"), 400),
    ];
    let mut f = Failures::default();
    for (what, bytes, status) in &cases {
        f.check(expect_refused(tg.addr, &be, what, bytes.as_bytes(), *status).await);
    }

    // Version 8: 426 naming the version tidegate speaks.
    let r: Result<(), String> = async {
        let mark = be.mark();
        let mut c = Client::connect(tg.addr).await;
        c.send(format!("GET /ws/x HTTP/1.1\r\nHost: test\r\n{up}{key}Sec-WebSocket-Version: 8\r\n\r\n").as_bytes()).await;
        let r = c.response().await.map_err(|e| format!("version 8: {e}"))?;
        if r.status != 426 || r.header("sec-websocket-version") != Some("13") {
            return Err(format!("version 8: expected 426 with Sec-WebSocket-Version: 13, got {}", r.describe()));
        }
        c.closed_clean(Duration::from_secs(2)).await.map_err(|e| format!("version 8: 426 answered, but {e}"))?;
        let h = healthy(tg.addr, &be).await?;
        let lines = be.lines_since(mark);
        if lines != [h.line()] { Err(format!("version 8: backend saw {lines:?}")) } else { Ok(()) }
    }
    .await;
    f.check(r);
    f.assert_none(cases.len() + 1);
    tg.stop().await;
}

#[tokio::test]
async fn bad_101_from_the_backend_is_502_and_never_a_tunnel() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let frame = masked_text(b"raw-bytes-after-502");
    let mut f = Failures::default();
    let cases = [
        (
            "101 with a wrong Sec-WebSocket-Accept",
            format!("GET /resp/101-bad-accept HTTP/1.1\r\nHost: test\r\n{WS}\r\n"),
            "/resp/101-bad-accept",
        ),
        ("101 without Upgrade: websocket", format!("GET /resp/101-no-upgrade HTTP/1.1\r\nHost: test\r\n{WS}\r\n"), "/resp/101-no-upgrade"),
        (
            "101 to a request that did not ask to upgrade",
            "GET /resp/101-plain HTTP/1.1\r\nHost: test\r\n\r\n".to_string(),
            "/resp/101-plain",
        ),
    ];
    for (what, req, path) in &cases {
        let r: Result<(), String> = async {
            let mark = be.mark();
            let mut c = Client::connect(tg.addr).await;
            c.send(req.as_bytes()).await;
            let r = c.response().await.map_err(|e| format!("{what}: {e}"))?;
            if r.status != 502 {
                return Err(format!("{what}: expected 502, got {}", r.describe()));
            }
            let bad = be.request(mark, path).ok_or_else(|| format!("{what}: not recorded"))?;
            // Still HTTP: the next request on this connection gets its own answer, from
            // another backend connection.
            let after = follow_up(&mut c, &be).await.map_err(|e| format!("{what}: {e}"))?;
            let mut errs = Vec::new();
            if after.conn == bad.conn {
                errs.push(format!("the follow-up went over backend connection {} that answered 101", bad.conn));
            }
            if let Err(e) = be.wait_closed(bad.conn, WAIT).await {
                errs.push(e);
            }
            let raw = be.raw_on(bad.conn);
            if !raw.is_empty() {
                errs.push(format!("bytes relayed raw to the backend: {}", show(&raw)));
            }
            match healthy(tg.addr, &be).await {
                Ok(h) => {
                    let lines = be.lines_since(mark);
                    if lines != [format!("GET {path}"), after.line(), h.line()] {
                        errs.push(format!("backend saw {lines:?}"));
                    }
                }
                Err(e) => errs.push(e),
            }
            if errs.is_empty() { Ok(()) } else { Err(format!("{what}: {}", errs.join("; "))) }
        }
        .await;
        f.check(r);
    }

    // A WebSocket frame pipelined right behind the upgrade request is never relayed raw: the
    // upgrade fails with 502, then the frame is not HTTP (400, closed).
    let r: Result<(), String> = async {
        let what = "frame pipelined after an upgrade answered by a bad 101";
        let mark = be.mark();
        let mut c = Client::connect(tg.addr).await;
        let mut bytes = format!("GET /resp/101-bad-accept HTTP/1.1\r\nHost: test\r\n{WS}\r\n").into_bytes();
        bytes.extend_from_slice(&frame);
        c.send(&bytes).await;
        let r = c.response().await.map_err(|e| format!("{what}: {e}"))?;
        if r.status != 502 {
            return Err(format!("{what}: expected 502, got {}", r.describe()));
        }
        let second = c.response().await.map_err(|e| format!("{what}: the frame as HTTP: {e}"))?;
        if second.status != 400 {
            return Err(format!("{what}: the frame bytes as the next request: expected 400, got {}", second.describe()));
        }
        c.closed_clean(Duration::from_secs(2)).await.map_err(|e| format!("{what}: {e}"))?;
        let bad = be.request(mark, "/resp/101-bad-accept").ok_or_else(|| format!("{what}: not recorded"))?;
        be.wait_closed(bad.conn, WAIT).await.map_err(|e| format!("{what}: {e}"))?;
        let raw = be.raw_on(bad.conn);
        if !raw.is_empty() {
            return Err(format!("{what}: bytes relayed raw to the backend: {}", show(&raw)));
        }
        let h = healthy(tg.addr, &be).await?;
        let lines = be.lines_since(mark);
        if lines != ["GET /resp/101-bad-accept".to_string(), h.line()] { Err(format!("{what}: backend saw {lines:?}")) } else { Ok(()) }
    }
    .await;
    f.check(r);
    f.assert_none(cases.len() + 1);
    tg.stop().await;
}

#[tokio::test]
async fn h2c_upgrades_are_forwarded_as_plain_http() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let cases = [
        (
            "Upgrade: h2c",
            "GET /h2c HTTP/1.1\r\nHost: test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
                .to_string(),
        ),
        (
            "Upgrade: websocket, h2c",
            "GET /h2c HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket, h2c\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
                .to_string(),
        ),
        ("Upgrade: h2c, websocket", format!("GET /h2c HTTP/1.1\r\nHost: test\r\n{}", WS.replace("Upgrade: websocket", "Upgrade: h2c, websocket") + "\r\n")),
    ];
    let mut f = Failures::default();
    for (what, req) in &cases {
        let r = expect_forwarded(tg.addr, &be, what, req.as_bytes(), "GET /h2c").await.and_then(|seen| {
            let up = seen.values("upgrade");
            let conn: Vec<String> = seen.values("connection").into_iter().filter(|v| v.to_ascii_lowercase().contains("upgrade")).collect();
            let settings = seen.values("http2-settings");
            if up.is_empty() && conn.is_empty() && settings.is_empty() {
                Ok(())
            } else {
                Err(format!("{what}: the backend got Upgrade {up:?}, Connection {conn:?}, HTTP2-Settings {settings:?}"))
            }
        });
        f.check(r);
    }
    f.assert_none(cases.len());
    tg.stop().await;
}

#[tokio::test]
async fn valid_upgrade_with_a_correct_101_becomes_a_tunnel() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let mark = be.mark();
    let mut c = Client::connect(tg.addr).await;
    c.send(format!("GET /ws/echo HTTP/1.1\r\nHost: test\r\n{WS}\r\n").as_bytes()).await;
    let r = c.response().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 101, "{}", r.describe());
    assert_eq!(r.header("sec-websocket-accept"), Some(accept_for(KEY).as_str()), "{}", r.describe());
    // The server's first frame, written with the 101, arrives as raw bytes.
    timeout(WAIT, async {
        while c.buf.len() < 4 && !c.eof {
            c.fill().await;
        }
    })
    .await
    .expect("server frame in time");
    assert_eq!(c.buf, b"\x81\x02hi", "bytes after the 101");
    let seen = be.request(mark, "/ws/echo").expect("recorded");
    assert_eq!(seen.values("upgrade"), ["websocket"]);
    assert_eq!(seen.values("sec-websocket-key"), [KEY]);

    let frame = masked_text(b"hello through the tunnel");
    assert!(c.send(&frame).await);
    let got = be
        .wait_for("the frame reaches the backend", WAIT, |ev| {
            let raw: Vec<u8> = ev
                .iter()
                .filter_map(|e| match e {
                    Event::Raw { conn, bytes } if *conn == seen.conn => Some(bytes.clone()),
                    _ => None,
                })
                .flatten()
                .collect();
            (raw.len() >= frame.len()).then_some(raw)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got, frame, "the tunnel relays the client's bytes exactly");
    drop(c);
    be.wait_closed(seen.conn, WAIT).await.unwrap_or_else(|e| panic!("tunnel end: {e}"));
    healthy(tg.addr, &be).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(be.lines_since(mark).len(), 2, "{:?}", be.lines_since(mark));
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Response side
// ---------------------------------------------------------------------------------------------

/// `METHOD path` whose scripted response is malformed: 502 for it, the connection that sent
/// it closed, and the follow-up on the same client connection served by another one.
async fn expect_bad_gateway(tg: SocketAddr, be: &Backend, method: &str, path: &str) -> Result<(), String> {
    let what = format!("{method} {path}");
    let mark = be.mark();
    let mut c = Client::connect(tg).await;
    c.send(format!("{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes()).await;
    let r = c.next(method == "HEAD").await.map_err(|e| format!("{what}: expected 502: {e}"))?;
    let mut errs = Vec::new();
    if r.status != 502 {
        errs.push(format!("expected 502, got {}", r.describe()));
    }
    let bad = be.request(mark, path).ok_or_else(|| format!("{what}: not recorded"))?;
    match follow_up(&mut c, be).await {
        Ok(after) if after.conn == bad.conn => errs.push(format!("the follow-up reused backend connection {}", bad.conn)),
        Ok(_) => {}
        Err(e) => errs.push(e),
    }
    if let Err(e) = be.wait_closed(bad.conn, WAIT).await {
        errs.push(e);
    }
    match healthy(tg, be).await {
        Ok(h) if h.conn == bad.conn => errs.push(format!("the fresh request reused backend connection {}", bad.conn)),
        Ok(_) => {}
        Err(e) => errs.push(e),
    }
    let lines = be.lines_since(mark);
    if lines.len() != 3 || lines[0] != what {
        errs.push(format!("backend saw {lines:?}"));
    }
    if errs.is_empty() { Ok(()) } else { Err(format!("{what}: {}", errs.join("; "))) }
}

#[tokio::test]
async fn malformed_response_framing_is_502_and_the_upstream_connection_closed() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let paths = [
        "/resp/cl-te",
        "/resp/te-cl",
        "/resp/cl-cl",
        "/resp/cl-nan",
        "/resp/cl-plus",
        "/resp/te-gzip",
        "/resp/te-chunked-gzip",
        "/resp/bad-chunk",
    ];
    let mut f = Failures::default();
    for path in paths {
        f.check(expect_bad_gateway(tg.addr, &be, "GET", path).await);
    }
    f.assert_none(paths.len());
    tg.stop().await;
}

#[tokio::test]
async fn body_on_a_bodiless_response_is_502_and_the_upstream_connection_closed() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let cases = [("GET", "/resp/204-body"), ("GET", "/resp/304-body"), ("HEAD", "/resp/head-body")];
    let mut f = Failures::default();
    for (method, path) in cases {
        f.check(expect_bad_gateway(tg.addr, &be, method, path).await);
    }
    f.assert_none(cases.len());
    tg.stop().await;
}

#[tokio::test]
async fn bytes_after_a_complete_response_never_answer_a_later_request() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let mut f = Failures::default();
    for pipelined in [false, true] {
        let r: Result<(), String> = async {
            let what = if pipelined { "extra response bytes, next request pipelined" } else { "extra response bytes" };
            let mark = be.mark();
            let next = unique("/after");
            let mut c = Client::connect(tg.addr).await;
            let mut bytes = get("/resp/extra");
            if pipelined {
                bytes.extend_from_slice(&get(&next));
            }
            c.send(&bytes).await;
            let first = c.response().await.map_err(|e| format!("{what}: {e}"))?;
            if (first.status, first.text()) != (200, "ok".to_string()) {
                return Err(format!("{what}: the first response: {}", first.describe()));
            }
            if !pipelined {
                c.send(&get(&next)).await;
            }
            let mut errs = Vec::new();
            match c.response().await {
                Ok(r) if (r.status, r.text()) == (200, format!("ok {next}")) => {}
                Ok(r) => errs.push(format!("the next request on the connection got {}", r.describe())),
                Err(e) => errs.push(format!("the next request on the connection: {e}")),
            }
            let bad = be.request(mark, "/resp/extra").ok_or_else(|| format!("{what}: not recorded"))?;
            match be.request(mark, &next) {
                Some(s) if s.conn == bad.conn => errs.push(format!("{next} went over the same backend connection {}", bad.conn)),
                Some(_) => {}
                None => errs.push(format!("{next} never reached the backend")),
            }
            if let Err(e) = be.wait_closed(bad.conn, WAIT).await {
                errs.push(e);
            }
            for _ in 0..3 {
                match healthy(tg.addr, &be).await {
                    Ok(h) if h.conn == bad.conn => errs.push(format!("a fresh request reused backend connection {}", bad.conn)),
                    Ok(_) => {}
                    Err(e) => errs.push(e),
                }
            }
            if errs.is_empty() { Ok(()) } else { Err(format!("{what}: {}", errs.join("; "))) }
        }
        .await;
        f.check(r);
    }
    f.assert_none(2);
    tg.stop().await;
}

#[tokio::test]
async fn invalid_chunk_mid_stream_cuts_the_client_without_a_last_chunk() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let mark = be.mark();
    let mut c = Client::connect(tg.addr).await;
    c.send(&get("/resp/mid-chunk")).await;
    let took = c.closed(WAIT).await.unwrap_or_else(|e| panic!("the client connection is closed: {e}"));
    let got = c.buf.clone();
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", show(&got));
    assert!(find(&got, b"first").is_some(), "the valid first chunk is relayed: {}", show(&got));
    assert!(
        find(&got, b"\r\n0\r\n\r\n").is_none() && parse_response(&got, false, false).is_none(),
        "the body was ended cleanly: {}",
        show(&got)
    );
    assert!(find(&got, b"bad").is_none(), "bytes of the invalid chunk reached the client: {}", show(&got));
    assert!(took < Duration::from_secs(2), "closed after {took:?}");
    let bad = be.request(mark, "/resp/mid-chunk").expect("recorded");
    be.wait_closed(bad.conn, WAIT).await.unwrap_or_else(|e| panic!("{e}"));
    let h = healthy(tg.addr, &be).await.unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(h.conn, bad.conn, "the next request came on the misbehaving connection");
    assert_eq!(be.lines_since(mark), ["GET /resp/mid-chunk".to_string(), h.line()]);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Timeouts and limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn header_deadline_is_total_time_not_inactivity() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let mut c = Client::connect(tg.addr).await;
    let start = Instant::now();
    let head = b"GET /trickle HTTP/1.1\r\nHost: test\r\nX-Slow: ";
    let mut i = 0;
    // One byte every 100 ms, never finishing the head; stop at the close.
    let closed_after = loop {
        assert!(start.elapsed() < Duration::from_secs(4), "a head trickled for {:?} is still being read", start.elapsed());
        let byte = head.get(i).copied().unwrap_or(b'a');
        i += 1;
        if !c.send(&[byte]).await {
            break start.elapsed();
        }
        if let Ok(()) = timeout(Duration::from_millis(100), c.fill()).await
            && c.eof
        {
            break start.elapsed();
        }
    };
    assert!(
        closed_after >= Duration::from_millis(800) && closed_after <= Duration::from_secs(3),
        "closed after {closed_after:?}, want about header_read = 1s"
    );
    eprintln!("trickled head: closed after {closed_after:?}, {i} bytes sent, answer {}", show(&c.buf));
    // Either a bare close or a 408, nothing else.
    if !c.buf.is_empty() {
        let r = parse_response(&c.buf, true, false).map(|(r, _)| r.status);
        assert_eq!(r, Some(408), "answer to the trickled head: {}", show(&c.buf));
    }
    assert!(be.requests_since(0).is_empty(), "{}", be.describe());
    healthy(tg.addr, &be).await.unwrap_or_else(|e| panic!("{e}"));
    tg.stop().await;
}

#[tokio::test]
async fn trickled_request_body_is_408_and_closed() {
    let (be, tg) = setup("", "header_read = \"1s\"\n  body = \"1s\"\n  body_min_rate = 64").await;
    let mark = be.mark();
    let mut c = Client::connect(tg.addr).await;
    let start = Instant::now();
    c.send(b"POST /slow-body HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n").await;
    // One byte every 200 ms until tidegate answers.
    let answered = loop {
        assert!(start.elapsed() < Duration::from_secs(4), "a body trickled for {:?} is still being read", start.elapsed());
        if let Some((r, n)) = parse_response(&c.buf, c.eof, false) {
            c.buf.drain(..n);
            break Ok(r);
        }
        if c.eof {
            break Err(format!("closed without an answer; got {}", show(&c.buf)));
        }
        if !c.send(b"x").await {
            break Err("the connection was closed while the body was sent".to_string());
        }
        let _ = timeout(Duration::from_millis(200), c.fill()).await;
    };
    let took = start.elapsed();
    let r = answered.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 408, "{}", r.describe());
    assert!(took >= Duration::from_millis(800) && took <= Duration::from_secs(3), "answered after {took:?}, want about body = 1s");
    c.closed_clean(Duration::from_secs(2)).await.unwrap_or_else(|e| panic!("after the 408: {e}"));
    let seen = be.requests_since(mark);
    assert_eq!(seen.iter().map(Seen::line).collect::<Vec<_>>(), ["POST /slow-body"], "{}", be.describe());
    assert!(!seen[0].body_complete, "the backend got the whole body");
    be.wait_closed(seen[0].conn, WAIT).await.unwrap_or_else(|e| panic!("the half-sent request's upstream connection: {e}"));
    let h = healthy(tg.addr, &be).await.unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(h.conn, seen[0].conn);
    tg.stop().await;
}

#[tokio::test]
async fn response_write_timeout_closes_a_client_that_never_reads() {
    let (be, tg) = setup("", "header_read = \"1s\"\n  send = \"1s\"").await;
    let mark = be.mark();
    let mut c = Client::connect(tg.addr).await;
    let start = Instant::now();
    c.send(&get("/resp/big")).await;
    // The client never reads. tidegate must give up on it and drop the upstream response.
    let seen = be.wait_request(mark, "/resp/big").await.unwrap_or_else(|e| panic!("{e}"));
    let closed = be.wait_closed(seen.conn, Duration::from_secs(8)).await;
    let streamed = be.log.streamed.load(Ordering::Relaxed);
    closed.unwrap_or_else(|e| panic!("after {:?}, {streamed} bytes accepted from the backend: {e}", start.elapsed()));
    let took = start.elapsed();
    assert!(streamed < 16 * 1024 * 1024, "the backend could write {streamed} bytes for a client that never reads");
    // The client connection is closed: what is buffered drains, then EOF.
    let mut drained = 0usize;
    let end = timeout(Duration::from_secs(3), async {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match c.s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the client connection is still open after the backend's was closed ({drained} bytes read)");
    assert!((drained as u64) < BIG, "the whole response was delivered");
    eprintln!("send timeout: backend connection closed after {took:?}; backend wrote {streamed} bytes; client drained {drained} bytes");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    healthy(tg.addr, &be).await.unwrap_or_else(|e| panic!("{e}"));
    tg.stop().await;
}

#[tokio::test]
async fn oversized_heads_are_refused() {
    let (be, tg) = setup("", TIMEOUTS).await;
    let with_headers = |total: usize| {
        let mut s = String::from("GET /many HTTP/1.1\r\nHost: test\r\n");
        for i in 1..total {
            s.push_str(&format!("X-H{i}: {i}\r\n"));
        }
        s + "\r\n"
    };
    let mut f = Failures::default();
    // The limits themselves pass.
    f.check(expect_forwarded(tg.addr, &be, "100 header fields", with_headers(100).as_bytes(), "GET /many").await.map(drop));
    let near = format!("GET /near HTTP/1.1\r\nHost: test\r\nX-Big: {}\r\n\r\n", "a".repeat(63 * 1024));
    f.check(expect_forwarded(tg.addr, &be, "a 63 KiB head", near.as_bytes(), "GET /near").await.map(drop));
    let cases: Vec<(&str, String)> = vec![
        ("101 header fields", with_headers(101)),
        ("1000 header fields", with_headers(1000)),
        ("one 70 KiB header", format!("GET /big HTTP/1.1\r\nHost: test\r\nX-Big: {}\r\n\r\n", "a".repeat(70 * 1024))),
        ("80 headers of 1 KiB", {
            let mut s = String::from("GET /big HTTP/1.1\r\nHost: test\r\n");
            for i in 0..80 {
                s.push_str(&format!("X-H{i}: {}\r\n", "b".repeat(1024)));
            }
            s + "\r\n"
        }),
        ("70 KiB request target", format!("GET /{} HTTP/1.1\r\nHost: test\r\n\r\n", "c".repeat(70 * 1024))),
    ];
    for (what, bytes) in &cases {
        f.check(expect_refused(tg.addr, &be, what, bytes.as_bytes(), 431).await);
    }
    f.assert_none(cases.len() + 2);
    tg.stop().await;
}

#[tokio::test]
async fn connection_limits_per_listener_and_per_client() {
    let (be, tg) = setup("max_connections = 2\nmax_connections_per_client = 1", TIMEOUTS).await;
    let ip = |last: u8| IpAddr::from([127, 0, 0, last]);

    /// A connection that is admitted: a request on it is answered.
    async fn admitted(c: &mut Client, who: &str) {
        assert!(c.send(&get(&unique("/limit"))).await, "{who}: write");
        let r = c.response().await.unwrap_or_else(|e| panic!("{who}: {e}"));
        assert_eq!(r.status, 200, "{who}: {}", r.describe());
    }
    /// A connection over a limit: closed at once, with no answer.
    async fn refused(c: &mut Client, who: &str) {
        c.send(&get("/over-limit")).await;
        let took = c.closed(Duration::from_secs(1)).await.unwrap_or_else(|e| panic!("{who}: not closed within 1s: {e}"));
        assert!(c.buf.is_empty(), "{who}: closed after {took:?} but answered {}", show(&c.buf));
    }

    let mut a = Client::connect_from(ip(2), tg.addr).await;
    admitted(&mut a, "first from 127.0.0.2").await;
    let mut a2 = Client::connect_from(ip(2), tg.addr).await;
    refused(&mut a2, "second from 127.0.0.2 (per-client limit 1)").await;
    let mut b = Client::connect_from(ip(3), tg.addr).await;
    admitted(&mut b, "first from 127.0.0.3 (counted separately)").await;
    let mut c = Client::connect_from(ip(4), tg.addr).await;
    refused(&mut c, "first from 127.0.0.4 (listener limit 2)").await;
    // The held connections still work.
    admitted(&mut a, "127.0.0.2 again on its connection").await;
    admitted(&mut b, "127.0.0.3 again on its connection").await;
    // Once 127.0.0.2 closes its connection (and tidegate has closed its side), it may connect again.
    a.s.shutdown().await.expect("half-close");
    a.closed(WAIT).await.unwrap_or_else(|e| panic!("tidegate closes after the client's FIN: {e}"));
    let mut a3 = Client::connect_from(ip(2), tg.addr).await;
    admitted(&mut a3, "127.0.0.2 after its first connection closed").await;
    // Free one more slot for the usual fresh request from 127.0.0.1.
    b.s.shutdown().await.expect("half-close");
    b.closed(WAIT).await.unwrap_or_else(|e| panic!("tidegate closes after the client's FIN: {e}"));
    healthy(tg.addr, &be).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(!be.lines_since(0).iter().any(|l| l.contains("over-limit")), "{:?}", be.lines_since(0));
    tg.stop().await;
}
