//! Test helpers: backends and tidegate itself on 127.0.0.1 port 0, plus small clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running tidegate started from TOML text in this process.
pub struct Proxy {
    pub addr: SocketAddr,
    pub addrs: Vec<(String, SocketAddr)>,
    pub shared: std::sync::Arc<tidegate::Shared>,
    token: CancellationToken,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Graceful shutdown; waits for it to finish (panics in the server surface here).
    pub async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("tidegate stops within 30s")
            .expect("tidegate task did not panic");
    }

    /// Live count of the backend at `addr` in upstream `upstream`.
    pub fn live(&self, upstream: &str, addr: SocketAddr) -> u32 {
        let rt = self.shared.runtime.load();
        let u = rt.upstreams.iter().find(|u| u.name() == upstream).expect("upstream exists");
        u.backends.iter().find(|b| b.addr() == addr).expect("backend exists").state.active()
    }
}

/// Starts tidegate from `toml` (listener binds should use `127.0.0.1:0`).
pub async fn tidegate(toml: &str) -> Proxy {
    let config = tidegate::config::load_str(toml, Path::new("test.toml")).unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{toml}"));
    let server = tidegate::Server::bind(config).expect("bind");
    let addr = server.local_addr();
    let addrs = server.local_addrs();
    let shared = server.shared();
    let token = server.shutdown_token();
    let task = tokio::spawn(server.run());
    Proxy { addr, addrs, shared, token, task }
}

/// Config text: one listener on port 0 routing everything to upstream `app` with `servers`
/// (each a TOML inline table body, e.g. `addr = "127.0.0.1:1", weight = 2`), plus `extra`
/// lines appended inside `[upstream.app]`.
pub fn simple_config(servers: &[String], extra: &str) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("  {{ {s} }},")).collect();
    format!(
        r#"shutdown_timeout = "5s"

[[listener]]
name = "test"
bind = "127.0.0.1:0"

  [[listener.route]]
  upstream = "app"

[upstream.app]
{extra}
servers = [
{}
]
"#,
        servers.join("\n")
    )
}

/// A demo backend (HTTP + WebSocket echo that names itself) on 127.0.0.1:0.
pub async fn backend(name: &str) -> (SocketAddr, JoinHandle<()>) {
    tidegate::demo::spawn_backend(name, "127.0.0.1:0".parse().unwrap()).await.expect("backend binds")
}

/// An address on which nothing listens (bound then closed).
pub async fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// Sends raw bytes and reads until the server closes or `wait` passes with no more bytes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    read_for(&mut s, wait).await
}

/// Reads whatever arrives until EOF or `wait` without a byte.
pub async fn read_for(s: &mut TcpStream, wait: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One request on a fresh connection with hyper's client: (status, headers, body).
pub async fn request(addr: SocketAddr, req: Request<Full<Bytes>>) -> (u16, hyper::HeaderMap, Bytes) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status.as_u16(), parts.headers, body)
}

/// `GET path` with `Host: test`: (status, body as text).
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let req = Request::get(path).header("host", "test").body(Full::new(Bytes::new())).unwrap();
    let (status, _, body) = request(addr, req).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A response read off a raw socket (tests that must see the exact bytes use no client library).
#[derive(Debug)]
pub struct RawResponse {
    pub version: String,
    pub status: u16,
    /// The head as text, without the blank line.
    pub head: String,
    /// Lower-cased names, trimmed values, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One complete response from the front of `buf`: (response, bytes used); `None` until it is
/// all there. `eof`: the peer closed (a body without length ends there). `head_req`: the
/// request was HEAD, so there is no body whatever the headers say (nor on 1xx, 204, 304).
pub fn parse_response(buf: &[u8], eof: bool, head_req: bool) -> Option<(RawResponse, usize)> {
    let end = find(buf, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut status_line = lines.next()?.splitn(3, ' ');
    let version = status_line.next()?.to_string();
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = status_line.next()?.parse().ok()?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    let mut resp = RawResponse { version, status, head: head.clone(), headers, body: Vec::new() };
    let rest = &buf[end + 4..];
    if head_req || status < 200 || status == 204 || status == 304 {
        return Some((resp, end + 4));
    }
    if resp.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        let mut pos = 0;
        loop {
            let line_end = pos + find(&rest[pos..], b"\r\n")?;
            let size_text = String::from_utf8_lossy(&rest[pos..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            pos = line_end + 2;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    let l = pos + find(&rest[pos..], b"\r\n")?;
                    let empty = l == pos;
                    pos = l + 2;
                    if empty {
                        return Some((resp, end + 4 + pos));
                    }
                }
            }
            if rest.len() < pos + size + 2 {
                return None;
            }
            resp.body.extend_from_slice(&rest[pos..pos + size]);
            pos += size + 2;
        }
    } else if let Some(cl) = resp.header("content-length") {
        let cl: usize = cl.parse().ok()?;
        if rest.len() < cl {
            return None;
        }
        resp.body = rest[..cl].to_vec();
        Some((resp, end + 4 + cl))
    } else if eof {
        resp.body = rest.to_vec();
        Some((resp, buf.len()))
    } else {
        None
    }
}
