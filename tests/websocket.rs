//! WebSocket tunnelling through tidegate: echo, refused and forged upgrades, early bytes,
//! half-close, idle timeout, live counts, graceful shutdown and balancing.
//!
//! Everything runs on real sockets on 127.0.0.1 port 0; custom backends live in this file.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::client::Response as WsResponse;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Upper bound for any single wait in this file.
const WAIT: Duration = Duration::from_secs(5);
/// The RFC 6455 sample key; its accept value is `s3pPLMBiTxaQ9kYGzzhZRbK+xOo=`.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

type Ws = WebSocketStream<TcpStream>;

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

/// `Sec-WebSocket-Accept` for `key`, computed here rather than with tidegate's own helper.
fn accept_for(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A header's value in an HTTP head (first line skipped), name case-insensitive.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

fn one_backend(addr: SocketAddr, extra: &str) -> String {
    support::simple_config(&[format!(r#"addr = "{addr}""#)], extra)
}

/// A WebSocket upgrade request with the fixed `KEY`.
fn upgrade_req(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    )
}

/// One WebSocket frame; `mask` is required client→server.
fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![(u8::from(fin) << 7) | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        f.push(m | len as u8);
    } else if len <= 0xffff {
        f.push(m | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(m | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(fin, opcode, payload, Some(MASK))
}

/// Waits (bounded) until every backend of upstream `app` has a live count of 0.
async fn wait_live_zero(tg: &support::Proxy, backends: &[SocketAddr]) {
    let all_zero = timeout(WAIT, async {
        while backends.iter().any(|b| tg.live("app", *b) != 0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    if all_zero.is_err() {
        let counts: Vec<(SocketAddr, u32)> = backends.iter().map(|b| (*b, tg.live("app", *b))).collect();
        panic!("live counts did not return to 0 within {WAIT:?}: {counts:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// A raw client connection with a read buffer
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        header(&self.head, name)
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let s = within("connect", TcpStream::connect(addr)).await.expect("connect");
        Raw { s, buf: Vec::new() }
    }

    /// Connects and completes a WebSocket handshake by hand, checking the 101.
    async fn handshake(addr: SocketAddr, path: &str) -> (Raw, Resp) {
        let mut c = Raw::connect(addr).await;
        c.send(upgrade_req(path).as_bytes()).await;
        let r = c.response().await;
        assert_eq!(r.status, 101, "handshake through tidegate: {}", r.head);
        assert_eq!(r.header("sec-websocket-accept"), Some(accept_for(KEY).as_str()), "{}", r.head);
        assert!(r.header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")), "{}", r.head);
        (c, r)
    }

    async fn send(&mut self, bytes: &[u8]) {
        within("write", self.s.write_all(bytes)).await.expect("write");
    }

    /// One read into the buffer; 0 at EOF. Panics on error or timeout.
    async fn fill(&mut self) -> usize {
        let mut tmp = [0u8; 16 * 1024];
        let n = within("read", self.s.read(&mut tmp)).await.expect("read");
        self.buf.extend_from_slice(&tmp[..n]);
        n
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            if self.fill().await == 0 {
                panic!("EOF with {} of {n} bytes; have {:?}", self.buf.len(), String::from_utf8_lossy(&self.buf));
            }
        }
        self.buf.drain(..n).collect()
    }

    async fn until(&mut self, delim: &[u8]) -> Vec<u8> {
        loop {
            if let Some(p) = find(&self.buf, delim) {
                return self.buf.drain(..p + delim.len()).collect();
            }
            if self.fill().await == 0 {
                panic!("EOF before {delim:?}; have {:?}", String::from_utf8_lossy(&self.buf));
            }
        }
    }

    /// One HTTP/1.1 response (Content-Length, chunked, or no body for 1xx/204/304).
    async fn response(&mut self) -> Resp {
        let head = String::from_utf8_lossy(&self.until(b"\r\n\r\n").await).into_owned();
        let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
        assert!(head.starts_with("HTTP/1.1 ") || head.starts_with("HTTP/1.0 "), "not an HTTP/1.x response: {head:?}");
        let mut body = Vec::new();
        if (100..200).contains(&status) || status == 204 || status == 304 {
        } else if let Some(cl) = header(&head, "content-length") {
            body = self.take(cl.parse().expect("numeric content-length")).await;
        } else if header(&head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let line = String::from_utf8_lossy(&self.until(b"\r\n").await).into_owned();
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("").trim(), 16).expect("chunk size");
                if size == 0 {
                    while self.until(b"\r\n").await.len() > 2 {}
                    break;
                }
                body.extend(self.take(size).await);
                self.take(2).await;
            }
        } else {
            body = self.rest().await.expect("body until EOF");
        }
        Resp { status, head, body }
    }

    /// One WebSocket frame: (fin, opcode, unmasked payload).
    async fn frame(&mut self) -> (bool, u8, Vec<u8>) {
        let h = self.take(2).await;
        let (fin, op, masked) = (h[0] & 0x80 != 0, h[0] & 0x0f, h[1] & 0x80 != 0);
        let len = match h[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes(self.take(2).await.try_into().unwrap())),
            127 => u64::from_be_bytes(self.take(8).await.try_into().unwrap()),
            n => u64::from(n),
        };
        let key = if masked { Some(self.take(4).await) } else { None };
        let mut p = self.take(len as usize).await;
        if let Some(k) = key {
            p.iter_mut().enumerate().for_each(|(i, b)| *b ^= k[i % 4]);
        }
        (fin, op, p)
    }

    /// Everything until EOF (Ok) or a read error (Err), bounded by `WAIT`.
    async fn rest(&mut self) -> std::io::Result<Vec<u8>> {
        let mut out = std::mem::take(&mut self.buf);
        let mut tmp = [0u8; 16 * 1024];
        loop {
            match within("read until EOF", self.s.read(&mut tmp)).await {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend_from_slice(&tmp[..n]),
                Err(e) => return Err(e),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A recording backend: raw TCP, answers per request kind, reports every byte it receives
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// `200` with body `answered REQUEST-LINE\n`.
    Ok200,
    /// `403` with body `forbidden\n`.
    Forbidden403,
    /// A correct `101` for the request's key; then records tunnel bytes.
    Switch101,
    /// `101` with a `Sec-WebSocket-Accept` computed for another key.
    WrongAccept101,
    /// `101` with the right accept value but no `Upgrade` header.
    NoUpgrade101,
    /// `101` with `Upgrade: websocket` and no accept value (for requests without a key).
    Bare101,
    /// A correct `101` and, in the same write, a text frame (`EARLY_FROM_BACKEND`).
    Switch101WithFrame,
}

const EARLY_FROM_BACKEND: &[u8] = b"sent in the same write as the 101";

#[derive(Debug)]
enum Ev {
    /// A request head, and the bytes that arrived after it before the backend answered.
    Req { conn: usize, head: String, early: Vec<u8> },
    /// Bytes received after the backend sent a `101`.
    Data { conn: usize, bytes: Vec<u8> },
    /// The connection was closed by the peer (EOF or error).
    Eof { conn: usize },
}

struct Recorder {
    addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Ev>,
}

impl Recorder {
    /// `settle`: how long to keep listening after a request head before answering, so that
    /// bytes forwarded too early would be seen.
    async fn start(on_upgrade: Answer, on_plain: Answer, settle: Duration) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let ids = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let conn = ids.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(record_conn(s, conn, tx.clone(), on_upgrade, on_plain, settle));
            }
        });
        Recorder { addr, rx }
    }

    async fn next(&mut self) -> Ev {
        within("backend event", self.rx.recv()).await.expect("recorder alive")
    }

    /// The next request head (EOFs skipped; tunnel data is a failure here).
    async fn next_req(&mut self) -> (usize, String, Vec<u8>) {
        loop {
            match self.next().await {
                Ev::Req { conn, head, early } => return (conn, head, early),
                Ev::Eof { .. } => {}
                Ev::Data { conn, bytes } => {
                    panic!("backend connection {conn} received tunnel bytes: {:?}", String::from_utf8_lossy(&bytes))
                }
            }
        }
    }

    /// Events already reported, without waiting.
    fn drain(&mut self) -> Vec<Ev> {
        let mut v = Vec::new();
        while let Ok(e) = self.rx.try_recv() {
            v.push(e);
        }
        v
    }
}

async fn record_conn(mut s: TcpStream, conn: usize, tx: mpsc::UnboundedSender<Ev>, up: Answer, plain: Answer, settle: Duration) {
    let mut buf = Vec::new();
    let mut tmp = vec![0u8; 16 * 1024];
    loop {
        let end = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Ev::Eof { conn });
                    return;
                }
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        if !settle.is_zero() {
            let deadline = tokio::time::Instant::now() + settle;
            while let Ok(r) = tokio::time::timeout_at(deadline, s.read(&mut tmp)).await {
                match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            }
        }
        let answer = if header(&head, "upgrade").is_some() { up } else { plain };
        let key = header(&head, "sec-websocket-key").unwrap_or("").to_string();
        let request_line = head.split("\r\n").next().unwrap_or("").to_string();
        let _ = tx.send(Ev::Req { conn, head, early: buf.clone() });
        let resp = match answer {
            Answer::Ok200 => {
                let body = format!("answered {request_line}\n");
                format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}", body.len())
            }
            Answer::Forbidden403 => {
                "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 10\r\n\r\nforbidden\n".to_string()
            }
            Answer::Switch101 | Answer::Switch101WithFrame => format!(
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
                accept_for(&key)
            ),
            Answer::WrongAccept101 => format!(
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
                accept_for("AAAAAAAAAAAAAAAAAAAAAA==")
            ),
            Answer::NoUpgrade101 => {
                format!("HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nsec-websocket-accept: {}\r\n\r\n", accept_for(&key))
            }
            Answer::Bare101 => "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n".to_string(),
        };
        let mut resp = resp.into_bytes();
        if answer == Answer::Switch101WithFrame {
            resp.extend(frame(true, OP_TEXT, EARLY_FROM_BACKEND, None));
        }
        if s.write_all(&resp).await.is_err() {
            let _ = tx.send(Ev::Eof { conn });
            return;
        }
        if answer != Answer::Ok200 && answer != Answer::Forbidden403 {
            // After a 101 everything is tunnel data. Bytes that came before the 101 were
            // reported as `early` with the request.
            loop {
                match s.read(&mut tmp).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Ev::Eof { conn });
                        return;
                    }
                    Ok(n) => {
                        let _ = tx.send(Ev::Data { conn, bytes: tmp[..n].to_vec() });
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// tokio-tungstenite client helpers
// ---------------------------------------------------------------------------------------------

async fn ws_connect(addr: SocketAddr, path: &str) -> (Ws, WsResponse) {
    let tcp = within("connect", TcpStream::connect(addr)).await.expect("connect");
    within("websocket handshake", tokio_tungstenite::client_async(format!("ws://{addr}{path}"), tcp)).await.expect("websocket handshake")
}

async fn next_msg(ws: &mut Ws) -> Message {
    match within("next websocket message", ws.next()).await {
        Some(Ok(m)) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

async fn send(ws: &mut Ws, m: Message) {
    within("websocket send", ws.send(m)).await.expect("websocket send");
}

/// Sends `m` and expects it echoed unchanged.
async fn roundtrip(ws: &mut Ws, m: Message) {
    send(ws, m.clone()).await;
    let got = next_msg(ws).await;
    assert!(got == m, "echo differs: sent {} bytes, got {got:?}", m.len());
}

/// Waits for the stream to end: EOF or error; a close frame first is allowed.
async fn expect_end(ws: &mut Ws, what: &str) {
    loop {
        match within(what, ws.next()).await {
            None | Some(Err(_)) => return,
            Some(Ok(Message::Close(_))) => {}
            Some(Ok(m)) => panic!("{what}: expected the stream to end, got {m:?}"),
        }
    }
}

/// Close 1000 from the client, close 1000 back, stream ends; then the client drops its
/// socket, as RFC 6455 7.1.1 has it (the tunnel relays half-closes, so it waits for that).
async fn clean_close(mut ws: Ws) {
    let ws = &mut ws;
    within("send close", ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }))).await.expect("send close");
    match next_msg(ws).await {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
        other => panic!("expected close 1000 back, got {other:?}"),
    }
    match within("stream end after close", ws.next()).await {
        None => {}
        other => panic!("expected the stream to end after the close handshake, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Echo through tidegate
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn echo_text_and_binary() {
    let (b, _) = support::backend("e1").await;
    let tg = support::tidegate(&one_backend(b, "")).await;
    let (mut ws, resp) = ws_connect(tg.addr, "/chat").await;
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers().get("x-backend").map(|v| v.as_bytes()), Some(&b"e1"[..]));
    roundtrip(&mut ws, Message::text("hello through tidegate")).await;
    roundtrip(&mut ws, Message::binary(vec![0u8, 1, 2, 0xfe, 0xff])).await;
    send(&mut ws, Message::text("whoami")).await;
    assert_eq!(next_msg(&mut ws).await, Message::text("e1"));
    clean_close(ws).await;
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_one_mebibyte_binary() {
    let (b, _) = support::backend("e1").await;
    let tg = support::tidegate(&one_backend(b, "")).await;
    let (mut ws, _) = ws_connect(tg.addr, "/").await;
    let big: Vec<u8> = (0..1usize << 20).map(|i| (i.wrapping_mul(31) ^ (i >> 11)) as u8).collect();
    send(&mut ws, Message::binary(big.clone())).await;
    match next_msg(&mut ws).await {
        Message::Binary(got) => {
            assert_eq!(got.len(), big.len());
            assert!(got[..] == big[..], "1 MiB echo differs");
        }
        other => panic!("expected binary, got {other:?}"),
    }
    clean_close(ws).await;
    tg.stop().await;
}

#[tokio::test]
async fn ping_is_answered_with_pong_carrying_the_same_payload() {
    let (b, _) = support::backend("e1").await;
    let tg = support::tidegate(&one_backend(b, "")).await;
    let (mut ws, _) = ws_connect(tg.addr, "/").await;
    send(&mut ws, Message::Ping(Bytes::from_static(b"tide-ping-42"))).await;
    assert_eq!(next_msg(&mut ws).await, Message::Pong(Bytes::from_static(b"tide-ping-42")));
    clean_close(ws).await;
    tg.stop().await;
}

#[tokio::test]
async fn close_handshake_completes_and_stream_ends() {
    let (b, _) = support::backend("e1").await;
    let tg = support::tidegate(&one_backend(b, "")).await;
    let (mut ws, _) = ws_connect(tg.addr, "/").await;
    roundtrip(&mut ws, Message::text("before close")).await;
    clean_close(ws).await;
    wait_live_zero(&tg, &[b]).await;
    tg.stop().await;
}

#[tokio::test]
async fn fragmented_message_is_reassembled_by_backend_and_echoed() {
    let (b, _) = support::backend("e1").await;
    let tg = support::tidegate(&one_backend(b, "")).await;
    let (mut c, _) = Raw::handshake(tg.addr, "/frag").await;
    // FIN=0 text, a ping between fragments (allowed for control frames), two continuations.
    let mut bytes = client_frame(false, OP_TEXT, b"Hello, ");
    bytes.extend(client_frame(false, OP_CONT, b"fragmented "));
    bytes.extend(client_frame(true, OP_PING, b"mid"));
    bytes.extend(client_frame(true, OP_CONT, b"world"));
    c.send(&bytes).await;
    let (mut text, mut pong) = (None, None);
    while text.is_none() || pong.is_none() {
        let (fin, op, payload) = c.frame().await;
        match op {
            OP_TEXT => {
                assert!(fin, "the echo comes as one frame");
                text = Some(payload);
            }
            OP_PONG => pong = Some(payload),
            _ => panic!("unexpected frame opcode {op:#x}: {:?}", String::from_utf8_lossy(&payload)),
        }
    }
    assert_eq!(text.unwrap(), b"Hello, fragmented world");
    assert_eq!(pong.unwrap(), b"mid");
    // Close 1000 by hand: the backend answers with 1000 and the stream ends.
    c.send(&client_frame(true, OP_CLOSE, &1000u16.to_be_bytes())).await;
    let (_, op, payload) = c.frame().await;
    assert_eq!(op, OP_CLOSE);
    assert_eq!(payload[..2], 1000u16.to_be_bytes());
    assert_eq!(c.rest().await.expect("clean EOF after close"), b"");
    drop(c);
    wait_live_zero(&tg, &[b]).await;
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Upgrade refused by the backend: the connection stays HTTP
// ---------------------------------------------------------------------------------------------

async fn refused_upgrade_keeps_connection_http(answer: Answer, status: u16, body: &str) {
    let mut rec = Recorder::start(answer, Answer::Ok200, Duration::ZERO).await;
    let tg = support::tidegate(&one_backend(rec.addr, "")).await;
    let mut c = Raw::connect(tg.addr).await;
    c.send(upgrade_req("/ws").as_bytes()).await;
    let r = c.response().await;
    assert_eq!(r.status, status, "{}", r.head);
    assert_eq!(r.text(), body);
    assert!(r.header("upgrade").is_none(), "a refused upgrade must not carry Upgrade: {}", r.head);

    // Same client connection: an ordinary request is parsed by tidegate as HTTP.
    c.send(b"GET /second HTTP/1.1\r\nHost: test\r\n\r\n").await;
    let r2 = c.response().await;
    assert_eq!(r2.status, 200, "{}", r2.head);
    assert_eq!(r2.text(), "answered GET /second HTTP/1.1\n");

    let (_, head1, early1) = rec.next_req().await;
    assert!(head1.starts_with("GET /ws HTTP/1.1\r\n"), "{head1}");
    assert_eq!(header(&head1, "upgrade"), Some("websocket"), "{head1}");
    assert!(early1.is_empty(), "bytes before the answer: {:?}", String::from_utf8_lossy(&early1));
    let (_, head2, early2) = rec.next_req().await;
    assert!(head2.starts_with("GET /second HTTP/1.1\r\n"), "second request not seen as its own request: {head2:?}");
    // tidegate re-made the request (raw pass-through would lack these).
    assert_eq!(header(&head2, "x-forwarded-for"), Some("127.0.0.1"), "{head2}");
    assert!(header(&head2, "upgrade").is_none(), "{head2}");
    assert!(early2.is_empty(), "{:?}", String::from_utf8_lossy(&early2));
    for e in rec.drain() {
        assert!(!matches!(e, Ev::Data { .. } | Ev::Req { .. }), "unexpected backend event {e:?}");
    }
    wait_live_zero(&tg, &[rec.addr]).await;
    tg.stop().await;
}

#[tokio::test]
async fn upgrade_answered_403_is_not_a_tunnel() {
    refused_upgrade_keeps_connection_http(Answer::Forbidden403, 403, "forbidden\n").await;
}

#[tokio::test]
async fn upgrade_answered_200_is_not_a_tunnel() {
    refused_upgrade_keeps_connection_http(Answer::Ok200, 200, "answered GET /ws HTTP/1.1\n").await;
}

// ---------------------------------------------------------------------------------------------
// 3. Bytes pipelined after the upgrade request never reach the backend before its 101
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn pipelined_request_after_refused_upgrade_is_not_forwarded_raw() {
    let mut rec = Recorder::start(Answer::Forbidden403, Answer::Ok200, Duration::from_millis(300)).await;
    let tg = support::tidegate(&one_backend(rec.addr, "")).await;
    let mut c = Raw::connect(tg.addr).await;
    let mut bytes = upgrade_req("/ws").into_bytes();
    bytes.extend_from_slice(b"GET /smuggled HTTP/1.1\r\nHost: test\r\n\r\n");
    c.send(&bytes).await;

    let (conn1, head1, early1) = rec.next_req().await;
    assert!(head1.starts_with("GET /ws HTTP/1.1\r\n"), "{head1}");
    assert!(!head1.contains("smuggled"), "{head1}");
    assert!(
        early1.is_empty(),
        "backend connection {conn1} received bytes after the upgrade request, before answering it: {:?}",
        String::from_utf8_lossy(&early1)
    );
    let r = c.response().await;
    assert_eq!(r.status, 403, "{}", r.head);
    // The pipelined request is a request of its own, parsed and re-made by tidegate.
    let r2 = c.response().await;
    assert_eq!(r2.status, 200, "{}", r2.head);
    assert_eq!(r2.text(), "answered GET /smuggled HTTP/1.1\n");
    let (_, head2, early2) = rec.next_req().await;
    assert!(head2.starts_with("GET /smuggled HTTP/1.1\r\n"), "{head2}");
    assert_eq!(header(&head2, "x-forwarded-for"), Some("127.0.0.1"), "smuggled bytes passed on raw: {head2}");
    assert!(early2.is_empty());
    tg.stop().await;
}

#[tokio::test]
async fn pipelined_bytes_after_upgrade_arrive_after_the_101_as_tunnel_data() {
    let mut rec = Recorder::start(Answer::Switch101, Answer::Ok200, Duration::from_millis(300)).await;
    let tg = support::tidegate(&one_backend(rec.addr, "")).await;
    let mut c = Raw::connect(tg.addr).await;
    let mut early = client_frame(true, OP_TEXT, b"early bird");
    early.extend_from_slice(b"GET /smuggled HTTP/1.1\r\nHost: test\r\n\r\n");
    let mut bytes = upgrade_req("/ws").into_bytes();
    bytes.extend_from_slice(&early);
    c.send(&bytes).await;

    let (conn, head, before) = rec.next_req().await;
    assert!(head.starts_with("GET /ws HTTP/1.1\r\n"), "{head}");
    assert!(before.is_empty(), "backend received pipelined bytes before its 101: {:?}", String::from_utf8_lossy(&before));
    let r = c.response().await;
    assert_eq!(r.status, 101, "{}", r.head);
    assert_eq!(r.header("sec-websocket-accept"), Some(accept_for(KEY).as_str()));

    let mut after = Vec::new();
    while after.len() < early.len() {
        match rec.next().await {
            Ev::Data { conn: c2, bytes } if c2 == conn => after.extend(bytes),
            e => panic!("expected tunnel data on connection {conn}, got {e:?}"),
        }
    }
    assert_eq!(after, early, "early bytes must reach the backend unchanged, after the 101");
    // Closing the client ends the tunnel (the backend sees EOF).
    drop(c);
    match rec.next().await {
        Ev::Eof { conn: c2 } if c2 == conn => {}
        e => panic!("expected EOF on connection {conn}, got {e:?}"),
    }
    wait_live_zero(&tg, &[rec.addr]).await;
    tg.stop().await;
}

#[tokio::test]
async fn pipelined_frame_after_refused_upgrade_never_reaches_the_backend() {
    let mut rec = Recorder::start(Answer::Forbidden403, Answer::Ok200, Duration::from_millis(300)).await;
    let tg = support::tidegate(&one_backend(rec.addr, "")).await;
    let mut c = Raw::connect(tg.addr).await;
    let early = client_frame(true, OP_TEXT, b"frame sent before any 101");
    let mut bytes = upgrade_req("/ws").into_bytes();
    bytes.extend_from_slice(&early);
    c.send(&bytes).await;
    let (conn, head, before) = rec.next_req().await;
    assert!(head.starts_with("GET /ws HTTP/1.1\r\n"), "{head}");
    assert!(before.is_empty(), "backend connection {conn} received the pipelined frame before answering: {before:?}");
    let r = c.response().await;
    assert_eq!(r.status, 403, "{}", r.head);
    // The frame is not HTTP: tidegate may answer it with an error or close, but it must not
    // pass it on. Whatever follows on the client connection is tidegate's, not the backend's.
    let rest = c.rest().await.unwrap_or_default();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.is_empty() || rest.starts_with("HTTP/1.1 4"), "after the 403: {rest:?}");
    assert!(!rest.contains("answered"), "the backend answered the pipelined frame: {rest:?}");
    for e in rec.drain() {
        assert!(matches!(e, Ev::Eof { .. }), "backend saw more after refusing the upgrade: {e:?}");
    }
    tg.stop().await;
}

#[tokio::test]
async fn backend_bytes_sent_with_the_101_reach_the_client() {
    let rec = Recorder::start(Answer::Switch101WithFrame, Answer::Ok200, Duration::ZERO).await;
    let tg = support::tidegate(&one_backend(rec.addr, "")).await;
    let (mut c, _) = Raw::handshake(tg.addr, "/ws").await;
    let (fin, op, payload) = c.frame().await;
    assert!(fin && op == OP_TEXT, "fin {fin} opcode {op:#x}");
    assert_eq!(payload, EARLY_FROM_BACKEND);
    drop(c);
    wait_live_zero(&tg, &[rec.addr]).await;
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Forged or unasked-for 101s become 502
// ---------------------------------------------------------------------------------------------

/// Sends `first` (expects 502), then a plain GET on the same connection (expects the backend's
/// 200); the backend connection that sent the bad 101 gets no byte and is closed.
async fn bad_101_is_502(on_upgrade: Answer, on_plain: Answer, first: &str, then_plain: bool) {
    let mut rec = Recorder::start(on_upgrade, on_plain, Duration::ZERO).await;
    let tg = support::tidegate(&one_backend(rec.addr, "")).await;
    let mut c = Raw::connect(tg.addr).await;
    c.send(first.as_bytes()).await;
    let r = c.response().await;
    assert_eq!(r.status, 502, "{}\n{}", r.head, r.text());
    assert!(r.header("upgrade").is_none(), "{}", r.head);

    let (bad_conn, _, _) = rec.next_req().await;
    if then_plain {
        c.send(b"GET /after HTTP/1.1\r\nHost: test\r\n\r\n").await;
        let r2 = c.response().await;
        assert_eq!(r2.status, 200, "{}", r2.head);
        assert_eq!(r2.text(), "answered GET /after HTTP/1.1\n");
    }
    // The backend side of the refused 101 is closed without relaying anything.
    let mut saw_after = !then_plain;
    let mut closed = false;
    while !(closed && saw_after) {
        match rec.next().await {
            Ev::Eof { conn } if conn == bad_conn => closed = true,
            Ev::Eof { .. } => {}
            Ev::Req { head, .. } if head.starts_with("GET /after ") => saw_after = true,
            e => panic!("unexpected backend event after a rejected 101: {e:?}"),
        }
    }
    wait_live_zero(&tg, &[rec.addr]).await;
    tg.stop().await;
}

#[tokio::test]
async fn upgrade_101_with_wrong_accept_is_502() {
    bad_101_is_502(Answer::WrongAccept101, Answer::Ok200, &upgrade_req("/ws"), true).await;
}

#[tokio::test]
async fn upgrade_101_without_upgrade_header_is_502() {
    bad_101_is_502(Answer::NoUpgrade101, Answer::Ok200, &upgrade_req("/ws"), true).await;
}

#[tokio::test]
async fn switching_protocols_to_a_plain_get_is_502() {
    bad_101_is_502(Answer::Switch101, Answer::Bare101, "GET /plain HTTP/1.1\r\nHost: test\r\n\r\n", false).await;
}

// ---------------------------------------------------------------------------------------------
// 5. Invalid client upgrades
// ---------------------------------------------------------------------------------------------

fn ws_req(method: &str, version: &str, key: Option<&str>, ws_version: Option<&str>) -> String {
    let mut r = format!("{method} /ws {version}\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n");
    if let Some(k) = key {
        r.push_str(&format!("Sec-WebSocket-Key: {k}\r\n"));
    }
    if let Some(v) = ws_version {
        r.push_str(&format!("Sec-WebSocket-Version: {v}\r\n"));
    }
    if method == "POST" {
        r.push_str("Content-Length: 0\r\n");
    }
    r.push_str("\r\n");
    r
}

#[tokio::test]
async fn invalid_client_upgrades_are_400_and_never_reach_the_backend() {
    let mut rec = Recorder::start(Answer::Switch101, Answer::Ok200, Duration::ZERO).await;
    let tg = support::tidegate(&one_backend(rec.addr, "")).await;
    let cases = [
        ("POST", ws_req("POST", "HTTP/1.1", Some(KEY), Some("13"))),
        ("missing key", ws_req("GET", "HTTP/1.1", None, Some("13"))),
        ("key of 5 bytes", ws_req("GET", "HTTP/1.1", Some("c2hvcnQ="), Some("13"))),
        ("key not base64", ws_req("GET", "HTTP/1.1", Some("!!!!!!!!!!!!!!!!!!!!!!=="), Some("13"))),
        ("version 8", ws_req("GET", "HTTP/1.1", Some(KEY), Some("8"))),
        ("no version", ws_req("GET", "HTTP/1.1", Some(KEY), None)),
        ("HTTP/1.0", ws_req("GET", "HTTP/1.0", Some(KEY), Some("13"))),
    ];
    for (what, req) in cases {
        let mut c = Raw::connect(tg.addr).await;
        c.send(req.as_bytes()).await;
        let r = c.response().await;
        if what == "version 8" {
            // RFC 6455 §4.4: an unsupported version is answered 426 naming the one we speak.
            assert_eq!(r.status, 426, "{what}: {}", r.head);
            assert!(r.head.to_ascii_lowercase().contains("sec-websocket-version: 13"), "{what}: {}", r.head);
        } else {
            assert_eq!(r.status, 400, "{what}: {}", r.head);
        }
        // Had tidegate forwarded it, the backend reports the head before answering.
        let seen = rec.drain();
        assert!(seen.is_empty(), "{what}: the backend saw {seen:?}");
    }
    tg.stop().await;
}

#[tokio::test]
async fn h2c_upgrade_is_plain_http_and_upgrade_is_stripped() {
    let mut rec = Recorder::start(Answer::Bare101, Answer::Ok200, Duration::ZERO).await;
    let tg = support::tidegate(&one_backend(rec.addr, "")).await;
    let mut c = Raw::connect(tg.addr).await;
    c.send(
        b"GET /h2c HTTP/1.1\r\nHost: test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
          HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), "answered GET /h2c HTTP/1.1\n");
    let (_, head, _) = rec.next_req().await;
    assert!(header(&head, "upgrade").is_none(), "backend saw Upgrade: {head}");
    assert!(header(&head, "http2-settings").is_none(), "backend saw HTTP2-Settings: {head}");
    assert!(!header(&head, "connection").unwrap_or("").to_ascii_lowercase().contains("upgrade"), "{head}");
    // Still HTTP on the same connection.
    c.send(b"GET /next HTTP/1.1\r\nHost: test\r\n\r\n").await;
    let r2 = c.response().await;
    assert_eq!(r2.text(), "answered GET /next HTTP/1.1\n");
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Half-close
// ---------------------------------------------------------------------------------------------

/// A raw WebSocket backend for one connection: handshake, read until EOF (reported), then
/// send one text frame and close.
async fn half_close_backend(reply: Vec<u8>) -> (SocketAddr, oneshot::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        let end = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            let n = s.read(&mut tmp).await.unwrap();
            assert!(n > 0, "EOF before the upgrade head");
            buf.extend_from_slice(&tmp[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let key = header(&head, "sec-websocket-key").unwrap_or("");
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
            accept_for(key)
        );
        s.write_all(resp.as_bytes()).await.unwrap();
        loop {
            match s.read(&mut tmp).await {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                Err(e) => panic!("backend read failed instead of EOF: {e}"),
            }
        }
        let _ = tx.send(buf);
        // Only now, after the client's EOF, the backend writes more and closes.
        s.write_all(&reply).await.unwrap();
        s.shutdown().await.unwrap();
    });
    (addr, rx)
}

#[tokio::test]
async fn half_close_client_eof_reaches_backend_and_backend_data_still_reaches_client() {
    let reply = frame(true, OP_TEXT, b"sent after your EOF", None);
    let (b, saw_eof) = half_close_backend(reply.clone()).await;
    let tg = support::tidegate(&one_backend(b, "")).await;
    let (mut c, _) = Raw::handshake(tg.addr, "/half").await;
    let hello = client_frame(true, OP_TEXT, b"hello then EOF");
    c.send(&hello).await;
    within("client shutdown", c.s.shutdown()).await.expect("shutdown write side");
    let received = within("backend sees EOF", saw_eof).await.expect("backend reports EOF");
    assert_eq!(received, hello);
    let rest = c.rest().await.expect("client reads the backend's data then a clean EOF (no reset)");
    assert_eq!(rest, reply);
    wait_live_zero(&tg, &[b]).await;
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Live counts after 1,000 mixed operations
// ---------------------------------------------------------------------------------------------

/// Two upstreams over the same two backends: `app` (default timeouts) for HTTP and for the
/// tunnels closed by the client, `idle` (`tunnel_idle = "300ms"`, routed by `/idle`) for the
/// tunnels tidegate times out. Separate so that a loaded machine cannot idle out a tunnel
/// that was meant to be closed by its client.
fn mixed_config(b1: SocketAddr, b2: SocketAddr) -> String {
    format!(
        r#"shutdown_timeout = "5s"

[[listener]]
name = "test"
bind = "127.0.0.1:0"

  [[listener.route]]
  path_prefix = "/idle"
  upstream = "idle"

  [[listener.route]]
  upstream = "app"

[upstream.app]
servers = [ {{ addr = "{b1}" }}, {{ addr = "{b2}" }} ]

[upstream.idle]
servers = [ {{ addr = "{b1}" }}, {{ addr = "{b2}" }} ]

  [upstream.idle.timeouts]
  tunnel_idle = "300ms"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_counts_return_to_zero_after_mixed_http_and_tunnels() {
    let (b1, _) = support::backend("m1").await;
    let (b2, _) = support::backend("m2").await;
    let tg = support::tidegate(&mixed_config(b1, b2)).await;
    let addr = tg.addr;
    let sem = Arc::new(Semaphore::new(50));
    let mut set = JoinSet::new();
    let started = Instant::now();
    for i in 0..1000usize {
        let permit = sem.clone().acquire_owned().await.unwrap();
        set.spawn(async move {
            let _permit = permit;
            let op = async move {
                if i % 2 == 0 {
                    let (status, body) = support::get(addr, "/").await;
                    assert_eq!(status, 200);
                    assert!(body.starts_with("hello from m"), "{body}");
                    return;
                }
                let j = i / 2;
                if j % 3 == 2 {
                    // Idle: open, never send; tidegate closes it after 300ms.
                    let (mut ws, _) = ws_connect(addr, "/idle").await;
                    expect_end(&mut ws, "idle tunnel closed by tidegate").await;
                    return;
                }
                let (mut ws, _) = ws_connect(addr, "/").await;
                roundtrip(&mut ws, Message::text(format!("n{j}"))).await;
                if j % 3 == 0 {
                    clean_close(ws).await;
                } else {
                    if j % 2 == 0 {
                        // Reset: SO_LINGER 0, then drop.
                        ws.get_ref().set_zero_linger().expect("linger");
                    }
                    drop(ws);
                }
            };
            timeout(Duration::from_secs(10), op).await.unwrap_or_else(|_| panic!("operation {i} timed out"));
        });
    }
    let mut peak = 0;
    while let Some(r) = within("operations finish", set.join_next()).await {
        r.expect("operation succeeded");
        peak = peak.max([b1, b2].iter().map(|b| tg.live("app", *b) + tg.live("idle", *b)).sum::<u32>());
    }
    assert!(peak > 0, "live counts never rose: the check below would prove nothing");
    let all_zero = timeout(WAIT, async {
        while [b1, b2].iter().any(|b| tg.live("app", *b) != 0 || tg.live("idle", *b) != 0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let counts: Vec<(SocketAddr, u32, u32)> = [b1, b2].iter().map(|b| (*b, tg.live("app", *b), tg.live("idle", *b))).collect();
    assert!(all_zero.is_ok(), "live counts (backend, app, idle) not back to 0 within {WAIT:?}: {counts:?}");
    eprintln!("1,000 operations in {:?}", started.elapsed());
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Tunnel idle timeout
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnel_is_closed_while_active_tunnel_stays_open() {
    let (b, _) = support::backend("i1").await;
    let tg = support::tidegate(&one_backend(b, r#"timeouts = { tunnel_idle = "300ms" }"#)).await;
    let addr = tg.addr;
    let idle = async move {
        let (mut ws, _) = ws_connect(addr, "/idle").await;
        let t0 = Instant::now();
        match timeout(Duration::from_secs(2), ws.next()).await {
            Ok(None | Some(Err(_))) => {}
            Ok(Some(Ok(Message::Close(_)))) => expect_end(&mut ws, "idle tunnel after close").await,
            Ok(Some(Ok(m))) => panic!("idle tunnel: unexpected {m:?}"),
            Err(_) => panic!("idle tunnel still open 2s after its handshake (tunnel_idle = 300ms)"),
        }
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(250), "idle tunnel closed too early: {took:?}");
    };
    let active = async move {
        // A message every 100ms for 1s. If this client itself stalls for more than 250ms (an
        // overloaded machine), the attempt proves nothing about tidegate and is repeated.
        for attempt in 1..=3 {
            let (mut ws, _) = ws_connect(addr, "/active").await;
            let t0 = Instant::now();
            let mut last_send = Instant::now();
            let mut max_gap = Duration::ZERO;
            let mut n = 0;
            let mut closed = None;
            while closed.is_none() && t0.elapsed() < Duration::from_millis(1100) {
                let now = Instant::now();
                max_gap = max_gap.max(now - last_send);
                last_send = now;
                let m = Message::text(format!("tick {n}"));
                if ws.send(m.clone()).await.is_err() {
                    closed = Some("send failed".to_string());
                    break;
                }
                match within("echo on the active tunnel", ws.next()).await {
                    Some(Ok(got)) => assert_eq!(got, m),
                    other => closed = Some(format!("{other:?}")),
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            match closed {
                None => {
                    assert!(n >= 5, "only {n} exchanges in 1.1s");
                    clean_close(ws).await;
                    return;
                }
                Some(how) => {
                    assert!(
                        max_gap > Duration::from_millis(250),
                        "active tunnel closed after {:?} and {n} exchanges ({how}) although no gap between messages \
                         exceeded {max_gap:?} (tunnel_idle = 300ms)",
                        t0.elapsed()
                    );
                    eprintln!("active tunnel attempt {attempt} void: the client stalled {max_gap:?}");
                }
            }
        }
        panic!("three attempts void: this machine stalls the test client for more than 250ms");
    };
    tokio::join!(idle, active);
    wait_live_zero(&tg, &[b]).await;
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 9. Graceful shutdown with open tunnels
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_close_1001_to_every_open_tunnel() {
    let (b, _) = support::backend("s1").await;
    let tg = support::tidegate(&one_backend(b, "")).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        let (mut ws, _) = ws_connect(tg.addr, "/").await;
        roundtrip(&mut ws, Message::text(format!("client {i}"))).await;
        clients.push(ws);
    }
    let stop = tokio::spawn(tg.stop());
    let mut set = JoinSet::new();
    for (i, mut ws) in clients.into_iter().enumerate() {
        set.spawn(async move {
            match next_msg(&mut ws).await {
                Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Away, "client {i}: close code"),
                other => panic!("client {i}: expected Close 1001, got {other:?}"),
            }
            match within("stream end after close 1001", ws.next()).await {
                None => {}
                other => panic!("client {i}: expected the stream to end, got {other:?}"),
            }
        });
    }
    while let Some(r) = within("clients see close", set.join_next()).await {
        r.expect("client saw close 1001 then end");
    }
    timeout(Duration::from_secs(10), stop).await.expect("stop() completes").expect("stop() did not panic");
}

fn big_frame(seq: u64) -> Vec<u8> {
    let mut v = vec![(seq % 251) as u8; 64 * 1024];
    v[..8].copy_from_slice(&seq.to_be_bytes());
    v
}

/// A WebSocket server that streams 64 KiB binary frames (sequence-numbered) as fast as it can.
async fn streaming_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else { return };
                let mut seq = 0u64;
                while ws.send(Message::binary(big_frame(seq))).await.is_ok() {
                    seq += 1;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_stream_closes_on_a_frame_boundary() {
    let b = streaming_backend().await;
    let tg = support::tidegate(&one_backend(b, "")).await;
    let (mut ws, _) = ws_connect(tg.addr, "/stream").await;
    let mut expected = 0u64;
    let check = |m: Message, expected: &mut u64| match m {
        Message::Binary(got) => {
            assert!(got[..] == big_frame(*expected)[..], "frame {expected} corrupted (len {})", got.len());
            *expected += 1;
            false
        }
        Message::Close(Some(f)) => {
            assert_eq!(f.code, CloseCode::Away, "close code");
            true
        }
        other => panic!("unexpected {other:?} after {expected} frames"),
    };
    while expected < 8 {
        assert!(!check(next_msg(&mut ws).await, &mut expected), "closed before shutdown");
    }
    let stop = tokio::spawn(tg.stop());
    let closed = timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(m)) => {
                    if check(m, &mut expected) {
                        return;
                    }
                }
                other => panic!("stream ended without a clean Close 1001 after {expected} whole frames: {other:?}"),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "no Close 1001 within 10s of shutdown ({expected} frames read)");
    match within("stream end after close", ws.next()).await {
        None => {}
        other => panic!("expected the stream to end after Close 1001, got {other:?}"),
    }
    timeout(Duration::from_secs(10), stop).await.expect("stop() completes").expect("stop() did not panic");
}

// ---------------------------------------------------------------------------------------------
// 10. Round-robin across three backends
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn round_robin_spreads_websockets_evenly() {
    let mut addrs = Vec::new();
    for name in ["r1", "r2", "r3"] {
        addrs.push(support::backend(name).await.0);
    }
    let servers: Vec<String> = addrs.iter().map(|a| format!(r#"addr = "{a}""#)).collect();
    let tg = support::tidegate(&support::simple_config(&servers, r#"balance = "round_robin""#)).await;
    let mut counts = std::collections::BTreeMap::new();
    let mut open = Vec::new();
    for _ in 0..30 {
        let (ws, resp) = ws_connect(tg.addr, "/").await;
        let name = resp.headers().get("x-backend").expect("x-backend on the 101").to_str().unwrap().to_string();
        *counts.entry(name).or_insert(0) += 1;
        open.push(ws);
    }
    let expected: std::collections::BTreeMap<String, i32> = ["r1", "r2", "r3"].iter().map(|n| (n.to_string(), 10)).collect();
    assert_eq!(counts, expected);
    for ws in open {
        clean_close(ws).await;
    }
    wait_live_zero(&tg, &addrs).await;
    tg.stop().await;
}
