//! The admin listener, black box: `/metrics` scraped and parsed while tunnels are open, the
//! JSON API steering servers (drain, undrain, down, up) and reloading the config file, the
//! token rules, `check` on admin binds, the status page rendered by a real headless Chromium,
//! and JSON log lines from the binary. Everything listens on 127.0.0.1 (one test binds the
//! admin listener on 0.0.0.0, token-protected, to see the non-loopback rule at work), every
//! wait is bounded, and every child process is killed by its pid (or process group) and reaped.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_tidegate");
/// Upper bound for any single wait on the proxy or a client.
const WAIT: Duration = Duration::from_secs(10);
const TOKEN: &str = "admin-token-0123456789abcdef";
const WRONG_TOKEN: &str = "admin-token-0123456789abcdeX";

// ---------------------------------------------------------------------------------------------
// Helpers: tidegate with an admin listener
// ---------------------------------------------------------------------------------------------

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

/// A running tidegate (in this process) with its proxy and admin addresses.
struct Gate {
    proxy: SocketAddr,
    admin: SocketAddr,
    shared: Arc<tidegate::Shared>,
    token: CancellationToken,
    task: JoinHandle<()>,
}

impl Gate {
    async fn start_text(toml: &str) -> Gate {
        let config =
            tidegate::config::load_str(toml, Path::new("admin-test.toml")).unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{toml}"));
        Gate::start(config)
    }

    fn start(config: tidegate::config::Config) -> Gate {
        let server = tidegate::Server::bind(config).expect("bind");
        let proxy = server.local_addr();
        let admin = server.admin_addr().expect("the config has an [admin] listener");
        // A 0.0.0.0 bind is reached through loopback.
        let admin = if admin.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], admin.port())) } else { admin };
        let shared = server.shared();
        let token = server.shutdown_token();
        let task = tokio::spawn(server.run());
        Gate { proxy, admin, shared, token, task }
    }

    async fn stop(self) {
        self.token.cancel();
        timeout(Duration::from_secs(30), self.task).await.expect("tidegate stops within 30s").expect("tidegate task did not panic");
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, HeaderMap, String) {
        http(self.admin, Method::GET, path, "127.0.0.1", token).await
    }

    async fn post(&self, path: &str, token: Option<&str>) -> (u16, HeaderMap, String) {
        http(self.admin, Method::POST, path, "127.0.0.1", token).await
    }

    /// `GET /api/v1/status` (without a token: loopback binds serve reads openly).
    async fn status(&self) -> Value {
        let (code, headers, body) = self.get("/api/v1/status", None).await;
        assert_eq!(code, 200, "GET /api/v1/status: {body}");
        assert_eq!(content_type(&headers), "application/json");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("status is not JSON ({e}): {body}"))
    }

    /// `POST .../servers/{addr}/{action}` with the token; expects 200 and returns the server view.
    async fn steer(&self, upstream: &str, server: SocketAddr, action: &str) -> Value {
        let path = format!("/api/v1/upstreams/{upstream}/servers/{server}/{action}");
        let (code, headers, body) = self.post(&path, Some(TOKEN)).await;
        assert_eq!(code, 200, "POST {path}: {body}");
        assert_eq!(content_type(&headers), "application/json");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("POST {path}: not JSON ({e}): {body}"))
    }

    async fn metrics(&self) -> Metrics {
        let (code, headers, body) = self.get("/metrics", None).await;
        assert_eq!(code, 200, "GET /metrics: {body}");
        assert!(content_type(&headers).starts_with("text/plain"), "metrics content type: {headers:?}");
        Metrics::parse(&body)
    }
}

fn content_type(h: &HeaderMap) -> &str {
    h.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// One request on a fresh connection: (status, headers, body as text).
async fn http(addr: SocketAddr, method: Method, path: &str, host: &str, token: Option<&str>) -> (u16, HeaderMap, String) {
    let mut req = Request::builder().method(method.clone()).uri(path).header("host", host);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(Full::new(Bytes::new())).expect("request");
    let (code, headers, body) = raw_http(addr, req).await;
    (code, headers, String::from_utf8_lossy(&body).into_owned())
}

async fn raw_http(addr: SocketAddr, req: Request<Full<Bytes>>) -> (u16, HeaderMap, Bytes) {
    let what = format!("{} {} via {addr}", req.method(), req.uri());
    within(&what, async {
        let stream = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("{what}: connect: {e}"));
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(conn);
        let resp = tx.send_request(req).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (parts.status.as_u16(), parts.headers, body)
    })
    .await
}

/// A proxied `GET path` with `Host: host` on a fresh connection: (status, x-backend, the
/// client's local port).
async fn proxied_get(proxy: SocketAddr, path: &str, host: &str) -> (u16, Option<String>, u16) {
    within(&format!("GET {path} (Host: {host}) via {proxy}"), async {
        let stream = TcpStream::connect(proxy).await.expect("connect to the proxy");
        let port = stream.local_addr().expect("local addr").port();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(conn);
        let req = Request::get(path).header("host", host).body(Full::new(Bytes::new())).expect("request");
        let resp = tx.send_request(req).await.expect("response");
        let backend = resp.headers().get("x-backend").map(|v| v.to_str().expect("ascii").to_string());
        let status = resp.status().as_u16();
        resp.into_body().collect().await.expect("body");
        (status, backend, port)
    })
    .await
}

/// `n` proxied GETs, each on a fresh connection; every one must be answered 200 by a
/// backend. Returns the backends in order and the client ports used.
async fn gets(proxy: SocketAddr, n: usize) -> (Vec<String>, Vec<u16>) {
    let (mut backends, mut ports) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (status, backend, port) = proxied_get(proxy, &format!("/req/{i}"), "test").await;
        assert_eq!(status, 200, "request {i}: expected a backend's 200");
        backends.push(backend.unwrap_or_else(|| panic!("request {i}: 200 without x-backend")));
        ports.push(port);
    }
    (backends, ports)
}

fn count<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in items {
        *m.entry(s.as_ref().to_string()).or_insert(0) += 1;
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Helpers: WebSocket tunnels through the proxy
// ---------------------------------------------------------------------------------------------

/// An open tunnel: the client stream, the backend that accepted it, the client's local port.
struct Tunnel {
    ws: WebSocketStream<TcpStream>,
    backend: String,
    port: u16,
}

impl Tunnel {
    /// Upgrades through the proxy and checks the relay runs (a `whoami` round trip), so the
    /// tunnel is counted by the time this returns.
    async fn open(proxy: SocketAddr) -> Tunnel {
        let (ws, backend, port) = within("WebSocket handshake through the proxy", async {
            let tcp = TcpStream::connect(proxy).await.expect("connect to the proxy");
            let port = tcp.local_addr().expect("local addr").port();
            let (ws, resp) = tokio_tungstenite::client_async("ws://test/ws", tcp).await.expect("WebSocket handshake");
            assert_eq!(resp.status().as_u16(), 101);
            let backend = resp.headers().get("x-backend").expect("101 names its backend").to_str().expect("ascii").to_string();
            (ws, backend, port)
        })
        .await;
        let mut t = Tunnel { ws, backend, port };
        t.whoami().await;
        t
    }

    /// `whoami` is answered by the backend's name, which must be the one that accepted.
    async fn whoami(&mut self) {
        let expected = self.backend.clone();
        within("send whoami", self.ws.send(Message::text("whoami"))).await.expect("send whoami");
        match self.next().await {
            Some(Message::Text(t)) => assert_eq!(t.as_str(), expected, "tunnel answered by another backend"),
            other => panic!("tunnel to {expected}: expected its name, got {other:?}"),
        }
    }

    /// Next data or close message (pings skipped); None once the stream ended.
    async fn next(&mut self) -> Option<Message> {
        loop {
            match within("next WebSocket message", self.ws.next()).await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return Some(m),
                Some(Err(e)) => panic!("WebSocket error on the tunnel to {}: {e}", self.backend),
                None => return None,
            }
        }
    }

    /// The client closes the way a browser's `ws.close()` does (RFC 6455 §7.1.1): a Close
    /// frame, then it waits for the server's Close and for the TCP connection to end (the
    /// server closes it first), then lets go.
    async fn close(mut self) {
        within("send close", self.ws.close(None)).await.expect("send close");
        let mut replied = false;
        loop {
            match within("close reply and end of stream", self.ws.next()).await {
                Some(Ok(Message::Close(_))) => replied = true,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("tunnel to {}: error during the close handshake: {e}", self.backend),
                None => break,
            }
        }
        assert!(replied, "tunnel to {}: the stream ended without a Close reply", self.backend);
    }

    /// Expects tidegate to close this tunnel with `code`, then the stream to end.
    async fn expect_closed_by_proxy(mut self, code: CloseCode) {
        match self.next().await {
            Some(Message::Close(Some(f))) => assert_eq!(f.code, code, "close code on the tunnel to {}", self.backend),
            other => panic!("tunnel to {}: expected Close {code:?}, got {other:?}", self.backend),
        }
        match timeout(WAIT, self.ws.next()).await {
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => {}
            Ok(Some(Ok(m))) => panic!("tunnel to {}: data after Close: {m:?}", self.backend),
            Err(_) => panic!("tunnel to {}: stream did not end within {WAIT:?} after Close", self.backend),
        }
    }
}

/// Opens `n` tunnels; returns them with the count per backend.
async fn open_tunnels(proxy: SocketAddr, n: usize) -> Vec<Tunnel> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(Tunnel::open(proxy).await);
    }
    v
}

fn per_backend(tunnels: &[Tunnel]) -> BTreeMap<String, usize> {
    count(tunnels.iter().map(|t| t.backend.as_str()))
}

/// Demo backends by name, aborted when dropped.
struct Backends {
    by_name: BTreeMap<String, SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Backends {
    async fn start(names: &[&str]) -> Backends {
        let mut b = Backends { by_name: BTreeMap::new(), tasks: Vec::new() };
        for n in names {
            let (addr, task) = support::backend(n).await;
            b.by_name.insert(n.to_string(), addr);
            b.tasks.push(task);
        }
        b
    }

    fn addr(&self, name: &str) -> SocketAddr {
        self.by_name[name]
    }

    fn name_of(&self, addr: &str) -> String {
        self.by_name.iter().find(|(_, a)| a.to_string() == addr).map(|(n, _)| n.clone()).unwrap_or_else(|| panic!("no backend at {addr}"))
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Config text: an admin listener on 127.0.0.1:0 with the token, a listener on 127.0.0.1:0
/// routing `Host: test` to upstream `app` with `servers` as (addr, weight), and `extra`
/// lines inside `[upstream.app]`.
fn config(servers: &[(SocketAddr, u32)], extra: &str) -> String {
    config_with(servers, extra, "")
}

/// Like `config`, plus `more` appended at the end (e.g. another upstream).
fn config_with(servers: &[(SocketAddr, u32)], extra: &str, more: &str) -> String {
    let servers: Vec<String> = servers.iter().map(|(a, w)| format!("  {{ addr = \"{a}\", weight = {w} }},")).collect();
    format!(
        r#"shutdown_timeout = "5s"

[admin]
bind = "127.0.0.1:0"
token = "{TOKEN}"

[[listener]]
name = "web"
bind = "127.0.0.1:0"

  [[listener.route]]
  host = "test"
  upstream = "app"

[upstream.app]
balance = "round_robin"
{extra}
servers = [
{}
]
{more}
"#,
        servers.join("\n")
    )
}

/// The view of `addr` in upstream `upstream` in a status document.
fn server_in<'a>(status: &'a Value, upstream: &str, addr: SocketAddr) -> &'a Value {
    let u = status["upstreams"]
        .as_array()
        .expect("upstreams is a list")
        .iter()
        .find(|u| u["name"] == upstream)
        .unwrap_or_else(|| panic!("upstream {upstream} not in status: {status:#}"));
    u["servers"]
        .as_array()
        .expect("servers is a list")
        .iter()
        .find(|s| s["addr"] == addr.to_string())
        .unwrap_or_else(|| panic!("server {addr} not in upstream {upstream}: {u:#}"))
}

/// Polls `check` on fresh status documents until it holds (or panics after `WAIT`).
async fn eventually_status(gate: &Gate, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = gate.status().await;
        if check(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: not so within {WAIT:?}; last status:\n{s:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` on fresh scrapes until it holds (or panics after `WAIT`).
async fn eventually_metrics(gate: &Gate, what: &str, check: impl Fn(&Metrics) -> bool) -> Metrics {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = gate.metrics().await;
        if check(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what}: not so within {WAIT:?}; last scrape:\n{}", m.text);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers: parsed Prometheus text
// ---------------------------------------------------------------------------------------------

struct Metrics {
    text: String,
    scrape: prometheus_parse::Scrape,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("metrics parse");
        assert!(!scrape.samples.is_empty(), "no samples in:\n{text}");
        Metrics { text: text.to_string(), scrape }
    }

    fn value(v: &prometheus_parse::Value) -> f64 {
        match v {
            prometheus_parse::Value::Counter(x) | prometheus_parse::Value::Gauge(x) | prometheus_parse::Value::Untyped(x) => *x,
            other => panic!("not a single value: {other:?}"),
        }
    }

    /// Samples of `name` whose labels include every pair of `labels`.
    fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = &'a prometheus_parse::Sample> {
        self.scrape.samples.iter().filter(move |s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
    }

    /// The one sample of `name` with `labels`; panics when there is none or several.
    fn one(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = self.matching(name, labels).collect();
        assert_eq!(found.len(), 1, "expected exactly one {name}{labels:?}, found {found:?} in:\n{}", self.text);
        Metrics::value(&found[0].value)
    }

    /// The sample's value, 0 when absent (a labelled counter not yet created).
    fn or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = self.matching(name, labels).collect();
        assert!(found.len() <= 1, "several {name}{labels:?}: {found:?}");
        found.first().map_or(0.0, |s| Metrics::value(&s.value))
    }

    /// Sum over every sample of `name` with `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| Metrics::value(&s.value)).sum()
    }
}

/// True when `text` contains `127.0.0.1:PORT` not followed by another digit.
fn names_port(text: &str, port: u16) -> bool {
    let needle = format!("127.0.0.1:{port}");
    text.match_indices(&needle).any(|(i, _)| !text[i + needle.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

// ---------------------------------------------------------------------------------------------
// 1. /metrics
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_tunnels_requests_and_local_responses() {
    let b = Backends::start(&["a", "b"]).await;
    let (a, bb) = (b.addr("a"), b.addr("b"));
    let gate = Gate::start_text(&config(&[(a, 3), (bb, 5)], "")).await;
    let (sa, sb) = (a.to_string(), bb.to_string());
    let app = ("upstream", "app");

    // Weighted round robin, 3:5, over one cycle of 8: 3 tunnels on a, 5 on b.
    let tunnels = open_tunnels(gate.proxy, 8).await;
    assert_eq!(per_backend(&tunnels), count(["a", "a", "a", "b", "b", "b", "b", "b"]), "round robin 3:5 over 8 tunnels");
    let mut client_ports: Vec<u16> = tunnels.iter().map(|t| t.port).collect();

    let m = gate.metrics().await;
    assert_eq!(m.one("tidegate_tunnels_open", &[app, ("server", &sa)]), 3.0);
    assert_eq!(m.one("tidegate_tunnels_open", &[app, ("server", &sb)]), 5.0);
    assert_eq!(m.one("tidegate_tunnels_opened_total", &[app, ("server", &sa)]), 3.0);
    assert_eq!(m.one("tidegate_tunnels_opened_total", &[app, ("server", &sb)]), 5.0);
    assert_eq!(m.one("tidegate_picks_total", &[app, ("server", &sa)]), 3.0);
    assert_eq!(m.one("tidegate_picks_total", &[app, ("server", &sb)]), 5.0);
    assert_eq!(m.one("tidegate_server_load", &[app, ("server", &sa), ("kind", "local")]), 3.0);
    assert_eq!(m.one("tidegate_server_load", &[app, ("server", &sb), ("kind", "local")]), 5.0);
    assert_eq!(m.one("tidegate_config_generation", &[]), 1.0);
    let s = gate.status().await;
    assert_eq!(server_in(&s, "app", a)["tunnels"], 3);
    assert_eq!(server_in(&s, "app", bb)["tunnels"], 5);

    // Requests: 2xx and picks move by exactly the requests sent, per server as answered.
    let before = gate.metrics().await;
    let (answered, ports) = gets(gate.proxy, 7).await;
    client_ports.extend(ports);
    let by = count(&answered);
    let after = gate.metrics().await;
    let delta = |name: &str, labels: &[(&str, &str)]| after.or_zero(name, labels) - before.or_zero(name, labels);
    assert_eq!(delta("tidegate_requests_total", &[app, ("class", "2xx")]), 7.0, "2xx requests moved by the 7 sent");
    assert_eq!(after.sum("tidegate_picks_total", &[app]) - before.sum("tidegate_picks_total", &[app]), 7.0, "picks moved by the 7 sent");
    for (name, addr) in [("a", &sa), ("b", &sb)] {
        let want = by.get(name).copied().unwrap_or(0) as f64;
        assert_eq!(delta("tidegate_picks_total", &[app, ("server", addr)]), want, "picks of {name} = requests it answered");
    }
    for class in ["1xx", "3xx", "4xx", "5xx"] {
        assert_eq!(delta("tidegate_requests_total", &[app, ("class", class)]), 0.0, "no {class} from plain GETs");
    }

    // A route miss is answered by tidegate itself: 404, counted by status.
    let secret_path = "/private/secret-path-7f3a";
    let (status, backend, port) = proxied_get(gate.proxy, secret_path, "nope.invalid").await;
    assert_eq!((status, backend), (404, None), "no route for Host: nope.invalid");
    client_ports.push(port);
    let m = gate.metrics().await;
    assert_eq!(
        m.or_zero("tidegate_local_responses_total", &[("status", "404")])
            - before.or_zero("tidegate_local_responses_total", &[("status", "404")]),
        1.0
    );
    assert_eq!(
        m.or_zero("tidegate_requests_total", &[app, ("class", "2xx")]),
        after.or_zero("tidegate_requests_total", &[app, ("class", "2xx")])
    );
    // 8 tunnels + 7 requests + 1 miss, each on its own connection.
    assert_eq!(m.one("tidegate_connections_accepted_total", &[("listener", "web")]), 16.0);

    // Labels are bounded: no client address, no path, no host.
    for sample in &m.scrape.samples {
        for (k, v) in sample.labels.iter() {
            assert!(!["path", "client", "peer", "host", "uri"].contains(&k.as_str()), "unbounded label {k}={v:?} on {}", sample.metric);
            for p in &client_ports {
                assert!(!names_port(v, *p), "label {k}={v:?} on {} names the client 127.0.0.1:{p}", sample.metric);
            }
        }
    }
    for p in &client_ports {
        assert!(!names_port(&m.text, *p), "the scrape names client port {p}:\n{}", m.text);
    }
    assert!(!m.text.contains(secret_path) && !m.text.contains("/req/"), "a request path leaks into metrics:\n{}", m.text);
    assert!(!m.text.contains("nope.invalid"), "a Host leaks into metrics:\n{}", m.text);

    // Closing every tunnel from the client side: back to 0, counted as reason="client".
    for t in tunnels {
        t.close().await;
    }
    let m = eventually_metrics(&gate, "tunnels_open back to 0", |m| m.sum("tidegate_tunnels_open", &[app]) == 0.0).await;
    assert_eq!(m.one("tidegate_tunnels_open", &[app, ("server", &sa)]), 0.0);
    assert_eq!(m.one("tidegate_tunnels_open", &[app, ("server", &sb)]), 0.0);
    let m = eventually_metrics(&gate, "8 tunnels counted closed", |m| m.sum("tidegate_tunnels_closed_total", &[app]) == 8.0).await;
    let s = gate.status().await;
    assert_eq!(server_in(&s, "app", a)["tunnels"], 0);
    assert_eq!(server_in(&s, "app", bb)["tunnels"], 0);
    for reason in ["idle", "drain", "shutdown", "error"] {
        assert_eq!(m.sum("tidegate_tunnels_closed_total", &[app, ("reason", reason)]), 0.0, "no tunnel closed for {reason}:\n{}", m.text);
    }
    // The client started every close handshake, so every close is the client's.
    let closed = |server: &str| -> BTreeMap<String, f64> {
        m.matching("tidegate_tunnels_closed_total", &[app, ("server", server)])
            .map(|s| (s.labels.get("reason").unwrap_or("?").to_string(), Metrics::value(&s.value)))
            .filter(|(_, v)| *v > 0.0)
            .collect()
    };
    assert_eq!(closed(&sa), BTreeMap::from([("client".to_string(), 3.0)]), "a's 3 tunnels, closed by the client, by reason");
    assert_eq!(closed(&sb), BTreeMap::from([("client".to_string(), 5.0)]), "b's 5 tunnels, closed by the client, by reason");
    assert_eq!(m.one("tidegate_tunnels_closed_total", &[app, ("server", &sa), ("reason", "client")]), 3.0);
    assert_eq!(m.one("tidegate_tunnels_closed_total", &[app, ("server", &sb), ("reason", "client")]), 5.0);
    gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. JSON API
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_every_upstream_and_server() {
    let b = Backends::start(&["a", "b", "c"]).await;
    let (a, bb, c) = (b.addr("a"), b.addr("b"), b.addr("c"));
    let other = format!(
        r#"
[upstream.other]
balance = "least_conn"
servers = [ {{ addr = "{c}", weight = 7 }} ]
"#
    );
    let gate = Gate::start_text(&config_with(&[(a, 2), (bb, 3)], "", &other)).await;
    let tunnels = open_tunnels(gate.proxy, 5).await;
    let per = per_backend(&tunnels);

    let s = gate.status().await;
    assert_eq!(s["generation"], 1);
    assert_eq!(s["config_file"], "admin-test.toml");
    assert_eq!(s["reloads"]["ok"], 0);
    assert_eq!(s["reloads"]["failed"], 0);
    let names: Vec<&str> = s["upstreams"].as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["app", "other"], "every upstream, in file order");
    let app = &s["upstreams"][0];
    assert_eq!(app["balance"], "round_robin");
    assert_eq!(app["health_checks"], false);
    let addrs: Vec<&str> = app["servers"].as_array().unwrap().iter().map(|x| x["addr"].as_str().unwrap()).collect();
    assert_eq!(addrs, [a.to_string(), bb.to_string()]);
    for (name, addr, weight) in [("a", a, 2), ("b", bb, 3)] {
        let v = server_in(&s, "app", addr);
        let n = per.get(name).copied().unwrap_or(0);
        assert_eq!(v["weight"], weight, "{name}: {v:#}");
        assert_eq!(v["health"], "healthy", "{name}: not checked, so healthy");
        assert_eq!(v["tunnels"], n, "{name}: {v:#}");
        assert_eq!(v["local"], n, "{name}: local load is its open tunnels: {v:#}");
        assert_eq!(v["merged"], n, "{name}: nothing reported, so merged = local: {v:#}");
        assert_eq!(v["reported"], Value::Null, "{name}: {v:#}");
        assert_eq!(v["picks"], n, "{name}: {v:#}");
        assert_eq!(v["backup"], false);
        assert_eq!(v["down"], false);
        assert_eq!(v["failed"], false);
        assert_eq!(v["draining"], false);
        assert_eq!(v["admin"]["drain"], false);
        assert_eq!(v["admin"]["down"], false);
    }
    assert_eq!(per.values().sum::<usize>(), 5);
    let o = &s["upstreams"][1];
    assert_eq!(o["balance"], "least_conn");
    let v = server_in(&s, "other", c);
    assert_eq!((v["weight"].clone(), v["tunnels"].clone(), v["local"].clone()), (7.into(), 0.into(), 0.into()));

    // Reads need no token on a loopback bind, even with a token configured.
    for path in ["/api/v1/status", "/metrics", "/status", "/"] {
        let (code, _, body) = gate.get(path, None).await;
        assert_eq!(code, 200, "GET {path} without a token on a loopback bind: {body}");
    }
    let (code, headers, body) = gate.get("/status", None).await;
    assert_eq!(code, 200);
    assert!(content_type(&headers).starts_with("text/html"), "{headers:?}");
    assert!(body.contains("data-tunnels") && body.contains("/api/v1/status"), "the status page: {body}");

    for t in tunnels {
        t.close().await;
    }
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_open_tunnels_and_undrain_restores() {
    let b = Backends::start(&["a", "b"]).await;
    let (a, bb) = (b.addr("a"), b.addr("b"));
    let gate = Gate::start_text(&config(&[(a, 1), (bb, 1)], "")).await;
    let mut tunnels = open_tunnels(gate.proxy, 4).await;
    assert_eq!(per_backend(&tunnels), count(["a", "a", "b", "b"]), "round robin over 4 tunnels");

    let v = gate.steer("app", a, "drain").await;
    assert_eq!(v["addr"], a.to_string());
    assert_eq!(v["admin"]["drain"], true, "{v:#}");
    assert_eq!(v["admin"]["down"], false, "{v:#}");

    let s = gate.status().await;
    let va = server_in(&s, "app", a);
    assert_eq!(va["admin"]["drain"], true, "{va:#}");
    assert_eq!(va["tunnels"], 2, "a drained server keeps its tunnels: {va:#}");
    assert_eq!(va["draining"], false, "drain closes nothing: {va:#}");
    assert_eq!(server_in(&s, "app", bb)["admin"]["drain"], false);
    let m = gate.metrics().await;
    assert_eq!(m.one("tidegate_server_draining", &[("upstream", "app"), ("server", &a.to_string())]), 1.0);
    assert_eq!(m.one("tidegate_server_draining", &[("upstream", "app"), ("server", &bb.to_string())]), 0.0);

    // New connections avoid a: requests and tunnels.
    let (answered, _) = gets(gate.proxy, 6).await;
    assert_eq!(count(&answered), count(["b"; 6]), "requests while a is drained");
    let fresh = open_tunnels(gate.proxy, 2).await;
    assert_eq!(per_backend(&fresh), count(["b", "b"]), "tunnels while a is drained");
    // a's open tunnels stay open and keep echoing.
    for t in tunnels.iter_mut() {
        t.whoami().await;
    }
    let s = gate.status().await;
    assert_eq!(server_in(&s, "app", a)["tunnels"], 2);
    assert_eq!(server_in(&s, "app", bb)["tunnels"], 4);

    let v = gate.steer("app", a, "undrain").await;
    assert_eq!(v["admin"]["drain"], false, "{v:#}");
    let s = gate.status().await;
    assert_eq!(server_in(&s, "app", a)["admin"]["drain"], false);
    let (answered, _) = gets(gate.proxy, 6).await;
    assert!(count(&answered).contains_key("a"), "a takes new connections again after undrain: {answered:?}");
    for t in tunnels.iter_mut() {
        t.whoami().await;
    }
    let m = gate.metrics().await;
    assert_eq!(m.one("tidegate_server_draining", &[("upstream", "app"), ("server", &a.to_string())]), 0.0);

    for t in tunnels.into_iter().chain(fresh) {
        t.close().await;
    }
    gate.stop().await;
}

/// Opens `n` tunnels all on `target`, steering with the admin API (the others drained
/// meanwhile, then undrained).
async fn tunnels_on(gate: &Gate, b: &Backends, target: &str, n: usize) -> Vec<Tunnel> {
    let status = gate.status().await;
    let target_addr = b.addr(target).to_string();
    let others: Vec<SocketAddr> = status["upstreams"][0]["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|s| s["addr"].as_str().expect("addr").to_string())
        .filter(|a| *a != target_addr)
        .map(|a| a.parse().expect("an address"))
        .collect();
    for o in &others {
        gate.steer("app", *o, "drain").await;
    }
    let t = open_tunnels(gate.proxy, n).await;
    assert_eq!(per_backend(&t), count(vec![target; n]), "every tunnel on {target} while the others are drained");
    for o in &others {
        gate.steer("app", *o, "undrain").await;
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_closes_tunnels_with_1001_and_up_restores() {
    let b = Backends::start(&["a", "b"]).await;
    let (a, bb) = (b.addr("a"), b.addr("b"));
    let gate = Gate::start_text(&config(&[(a, 1), (bb, 1)], "drain_timeout = \"0s\"\ndrain_spread = \"0s\"")).await;
    let on_a = tunnels_on(&gate, &b, "a", 3).await;
    let mut on_b = tunnels_on(&gate, &b, "b", 1).await;

    let started = Instant::now();
    let v = gate.steer("app", a, "down").await;
    assert_eq!(v["admin"]["down"], true, "{v:#}");
    assert_eq!(v["draining"], true, "down closes the tunnels as a drain does: {v:#}");
    for t in on_a {
        t.expect_closed_by_proxy(CloseCode::Away).await;
    }
    assert!(started.elapsed() < Duration::from_secs(3), "drain_timeout and drain_spread are 0s, closing took {:?}", started.elapsed());
    // b's tunnel is untouched.
    on_b[0].whoami().await;

    let s = eventually_status(&gate, "a's tunnels gone", |s| server_in(s, "app", a)["tunnels"] == 0).await;
    let va = server_in(&s, "app", a);
    assert_eq!(va["admin"]["down"], true, "{va:#}");
    assert_eq!(va["admin"]["drain"], false, "{va:#}");
    assert_eq!(va["draining"], true, "{va:#}");
    let m = eventually_metrics(&gate, "3 drain closes on a", |m| {
        m.or_zero("tidegate_tunnels_closed_total", &[("server", &a.to_string()), ("reason", "drain")]) == 3.0
    })
    .await;
    assert_eq!(m.one("tidegate_tunnels_open", &[("upstream", "app"), ("server", &a.to_string())]), 0.0);
    assert_eq!(m.one("tidegate_tunnels_open", &[("upstream", "app"), ("server", &bb.to_string())]), 1.0);
    assert_eq!(m.one("tidegate_server_draining", &[("upstream", "app"), ("server", &a.to_string())]), 1.0);

    let (answered, _) = gets(gate.proxy, 6).await;
    assert_eq!(count(&answered), count(["b"; 6]), "requests while a is down");
    let fresh = open_tunnels(gate.proxy, 2).await;
    assert_eq!(per_backend(&fresh), count(["b", "b"]), "tunnels while a is down");

    let v = gate.steer("app", a, "up").await;
    assert_eq!(v["admin"]["down"], false, "{v:#}");
    assert_eq!(v["draining"], false, "up ends the drain: {v:#}");
    let (answered, _) = gets(gate.proxy, 6).await;
    assert!(count(&answered).contains_key("a"), "a takes new connections again after up: {answered:?}");
    let mut again = tunnels_on(&gate, &b, "a", 1).await;
    // A tunnel opened after `up` is not closed by the old drain.
    tokio::time::sleep(Duration::from_millis(300)).await;
    again[0].whoami().await;
    on_b[0].whoami().await;
    let m = gate.metrics().await;
    assert_eq!(m.one("tidegate_server_draining", &[("upstream", "app"), ("server", &a.to_string())]), 0.0);

    for t in on_b.into_iter().chain(fresh).chain(again) {
        t.close().await;
    }
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_calls_need_the_token() {
    let b = Backends::start(&["a", "b"]).await;
    let (a, bb) = (b.addr("a"), b.addr("b"));
    let gate = Gate::start_text(&config(&[(a, 1), (bb, 1)], "")).await;
    let drain = format!("/api/v1/upstreams/app/servers/{a}/drain");
    let down = format!("/api/v1/upstreams/app/servers/{a}/down");
    for path in [drain.as_str(), down.as_str(), "/api/v1/reload"] {
        for (what, token) in
            [("no token", None), ("a wrong token", Some(WRONG_TOKEN)), ("a short token", Some("admin")), ("an empty token", Some(""))]
        {
            let (code, headers, body) = gate.post(path, token).await;
            assert_eq!(code, 401, "POST {path} with {what}: {body}");
            assert_eq!(content_type(&headers), "application/json", "POST {path} with {what}");
            assert_eq!(headers.get("www-authenticate").map(|v| v.as_bytes()), Some(&b"Bearer"[..]));
            let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("401 body is not JSON ({e}): {body}"));
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "401 names the problem: {body}");
        }
        // Another scheme with the right token is not a bearer token.
        let req = Request::post(path)
            .header("host", "127.0.0.1")
            .header("authorization", format!("Basic {TOKEN}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let (code, _, _) = raw_http(gate.admin, req).await;
        assert_eq!(code, 401, "POST {path} with Authorization: Basic <token>");
    }
    // Nothing changed.
    let s = gate.status().await;
    let va = server_in(&s, "app", a);
    assert_eq!(
        (va["admin"]["drain"].clone(), va["admin"]["down"].clone(), va["draining"].clone()),
        (false.into(), false.into(), false.into())
    );
    assert_eq!(s["reloads"]["ok"].as_u64().unwrap() + s["reloads"]["failed"].as_u64().unwrap(), 0, "no reload ran");
    let (answered, _) = gets(gate.proxy, 4).await;
    assert!(count(&answered).contains_key("a"));

    // With the token it works.
    let v = gate.steer("app", a, "drain").await;
    assert_eq!(v["admin"]["drain"], true);
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_upstream_server_or_action_is_404_json() {
    let b = Backends::start(&["a"]).await;
    let a = b.addr("a");
    let gate = Gate::start_text(&config(&[(a, 1)], "")).await;
    let missing = support::dead_addr().await;
    for (path, mentions) in [
        (format!("/api/v1/upstreams/nope/servers/{a}/drain"), "nope".to_string()),
        (format!("/api/v1/upstreams/app/servers/{missing}/drain"), missing.to_string()),
        (format!("/api/v1/upstreams/app/servers/{missing}/down"), missing.to_string()),
        ("/api/v1/upstreams/app/servers/not-an-address/up".to_string(), "not-an-address".to_string()),
        (format!("/api/v1/upstreams/app/servers/{a}/explode"), "explode".to_string()),
    ] {
        let (code, headers, body) = gate.post(&path, Some(TOKEN)).await;
        assert_eq!(code, 404, "POST {path}: {body}");
        assert_eq!(content_type(&headers), "application/json", "POST {path}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("POST {path}: 404 body is not JSON ({e}): {body}"));
        let e = v["error"].as_str().unwrap_or_else(|| panic!("POST {path}: no error field: {body}"));
        assert!(e.contains(&mentions), "POST {path}: the error names {mentions:?}: {e}");
    }
    let s = gate.status().await;
    assert_eq!(server_in(&s, "app", a)["admin"]["drain"], false, "nothing changed");
    gate.stop().await;
}

/// A path the admin listener does not serve is 404 (JSON), whatever the method; a known
/// endpoint called with the wrong method is 405 with `Allow` (RFC 9110 §15.5.6: MUST).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_admin_paths_are_404_and_wrong_methods_405() {
    let b = Backends::start(&["a"]).await;
    let gate = Gate::start_text(&config(&[(b.addr("a"), 1)], "")).await;
    for (method, path) in [(Method::GET, "/nothing-here"), (Method::GET, "/api/v1/nothing-here"), (Method::POST, "/api/v2/reload")] {
        let (code, headers, body) = http(gate.admin, method.clone(), path, "127.0.0.1", Some(TOKEN)).await;
        assert_eq!(code, 404, "{method} {path}: {body}");
        assert_eq!(content_type(&headers), "application/json", "{method} {path}");
        serde_json::from_str::<Value>(&body).unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {body}"));
    }
    for (method, path, allow) in
        [(Method::GET, "/api/v1/reload", "POST"), (Method::POST, "/metrics", "GET"), (Method::POST, "/api/v1/status", "GET")]
    {
        let (code, headers, body) = http(gate.admin, method.clone(), path, "127.0.0.1", Some(TOKEN)).await;
        assert_eq!(code, 405, "{method} {path}: {body}");
        assert_eq!(content_type(&headers), "application/json", "{method} {path}");
        let got = headers.get("allow").and_then(|v| v.to_str().ok());
        assert!(got.is_some_and(|v| v.contains(allow)), "{method} {path}: 405 without Allow: {allow} (got {got:?})");
    }
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_drain_survives_a_reload_that_keeps_the_server() {
    let b = Backends::start(&["a", "b", "c"]).await;
    let (a, bb, c) = (b.addr("a"), b.addr("b"), b.addr("c"));
    let gate = Gate::start_text(&config(&[(a, 1), (bb, 1)], "")).await;
    let mut on_a = tunnels_on(&gate, &b, "a", 2).await;
    gate.steer("app", a, "drain").await;

    // A reload that keeps a (same address), changes b's weight and adds c.
    let next = tidegate::config::load_str(&config(&[(a, 1), (bb, 2), (c, 1)], ""), Path::new("admin-test.toml")).expect("valid");
    assert_eq!(gate.shared.apply(next), Ok(2));

    let s = gate.status().await;
    assert_eq!(s["generation"], 2);
    assert_eq!(s["reloads"]["ok"], 1);
    let va = server_in(&s, "app", a);
    assert_eq!(va["admin"]["drain"], true, "the runtime drain survives the reload: {va:#}");
    assert_eq!(va["tunnels"], 2, "{va:#}");
    assert_eq!(server_in(&s, "app", bb)["weight"], 2);
    assert_eq!(server_in(&s, "app", c)["admin"]["drain"], false);
    let (answered, _) = gets(gate.proxy, 9).await;
    let by = count(&answered);
    assert!(!by.contains_key("a"), "a is still drained after the reload: {answered:?}");
    assert!(by.contains_key("b") && by.contains_key("c"), "b and c serve: {answered:?}");
    for t in on_a.iter_mut() {
        t.whoami().await;
    }
    let m = gate.metrics().await;
    assert_eq!(m.one("tidegate_config_generation", &[]), 2.0);
    assert_eq!(m.one("tidegate_server_draining", &[("upstream", "app"), ("server", &a.to_string())]), 1.0);

    gate.steer("app", a, "undrain").await;
    let (answered, _) = gets(gate.proxy, 8).await;
    assert!(count(&answered).contains_key("a"), "a serves again after undrain: {answered:?}");
    for t in on_a {
        t.close().await;
    }
    gate.stop().await;
}

/// `down` is a runtime override like `drain`: a reload that keeps the server must not call off
/// the closing of its tunnels (admin/mod.rs: "They live in the server's state, so they survive
/// a reload that keeps the server").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_down_survives_a_reload_that_keeps_the_server() {
    let b = Backends::start(&["a", "b"]).await;
    let (a, bb) = (b.addr("a"), b.addr("b"));
    let text = config(&[(a, 1), (bb, 1)], "drain_timeout = \"2s\"\ndrain_spread = \"0s\"");
    let gate = Gate::start_text(&text).await;
    let on_a = tunnels_on(&gate, &b, "a", 2).await;
    let started = Instant::now();
    gate.steer("app", a, "down").await;
    // Reload the same config at once, while a's tunnels wait out drain_timeout.
    let same = tidegate::config::load_str(&text, Path::new("admin-test.toml")).expect("valid");
    assert_eq!(gate.shared.apply(same), Ok(2));
    let s = gate.status().await;
    let va = server_in(&s, "app", a);
    assert_eq!(va["admin"]["down"], true, "the runtime down survives the reload: {va:#}");
    assert_eq!(va["draining"], true, "a is still closing its tunnels after the reload: {va:#}");
    for t in on_a {
        t.expect_closed_by_proxy(CloseCode::Away).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(1900), "closed before drain_timeout: {:?}", started.elapsed());
    gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2b. POST /api/v1/reload
// ---------------------------------------------------------------------------------------------

/// A file under the temp dir with a unique name, removed on drop.
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    fn new(tag: &str, ext: &str, text: &str) -> TempFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("tidegate-admin-{}-{n}-{nanos}-{tag}.{ext}", std::process::id()));
        let f = TempFile { path };
        f.write(text);
        f
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", self.path.display()));
    }

    fn arg(&self) -> &str {
        self.path.to_str().expect("temp path is UTF-8")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle:?} not in:\n{text}")) + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_endpoint_reloads_the_config_file() {
    let b = Backends::start(&["a", "b"]).await;
    let (a, bb) = (b.addr("a"), b.addr("b"));
    let file = TempFile::new("reload", "toml", &config(&[(a, 1)], ""));
    let loaded = tidegate::config::load(&file.path).expect("valid config file");
    let gate = Gate::start(loaded);
    let s = gate.status().await;
    assert_eq!(s["generation"], 1);
    assert_eq!(s["config_file"], file.arg());
    let (answered, _) = gets(gate.proxy, 3).await;
    assert_eq!(count(&answered), count(["a"; 3]));

    // Edit the file: add b. POST reload applies it.
    file.write(&config(&[(a, 1), (bb, 1)], ""));
    let (code, headers, body) = gate.post("/api/v1/reload", Some(TOKEN)).await;
    assert_eq!(code, 200, "reload: {body}");
    assert_eq!(content_type(&headers), "application/json");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["ok"], true, "{body}");
    assert_eq!(v["generation"], 2, "{body}");
    let s = gate.status().await;
    assert_eq!(s["generation"], 2);
    assert_eq!(s["reloads"]["ok"], 1);
    assert_eq!(s["reloads"]["failed"], 0);
    let last = s["reloads"]["history"].as_array().expect("history").last().expect("one entry").clone();
    assert_eq!((last["ok"].clone(), last["generation"].clone()), (true.into(), 2.into()), "{last:#}");
    server_in(&s, "app", bb);
    let (answered, _) = gets(gate.proxy, 4).await;
    assert_eq!(count(&answered), count(["a", "a", "b", "b"]), "b serves after the reload");
    let m = gate.metrics().await;
    assert_eq!(m.one("tidegate_config_generation", &[]), 2.0);
    assert_eq!(m.one("tidegate_reloads_total", &[("result", "ok")]), 1.0);
    assert_eq!(m.one("tidegate_reloads_total", &[("result", "failed")]), 0.0);

    // A broken file (a value out of range): 422 naming FILE:LINE, generation unchanged.
    let broken = config(&[(a, 1), (bb, 0)], "");
    let line = line_of(&broken, "weight = 0");
    file.write(&broken);
    let (code, headers, body) = gate.post("/api/v1/reload", Some(TOKEN)).await;
    assert_eq!(code, 422, "reload of a broken file: {body}");
    assert_eq!(content_type(&headers), "application/json");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    let e = v["error"].as_str().unwrap_or_else(|| panic!("no error field: {body}"));
    assert!(e.contains(&format!("{}:{line}:", file.arg())), "the error names {}:{line}: {e}", file.arg());
    assert!(e.contains("weight"), "{e}");

    // A TOML syntax error: the same.
    let syntax = config(&[(a, 1), (bb, 1)], "").replace("[upstream.app]", "[upstream.app");
    let line = line_of(&syntax, "[upstream.app");
    file.write(&syntax);
    let (code, _, body) = gate.post("/api/v1/reload", Some(TOKEN)).await;
    assert_eq!(code, 422, "reload of a file with a syntax error: {body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    let e = v["error"].as_str().unwrap_or_else(|| panic!("no error field: {body}"));
    assert!(e.contains(&format!("{}:{line}:", file.arg())), "the error names {}:{line}: {e}", file.arg());

    let s = gate.status().await;
    assert_eq!(s["generation"], 2, "a refused reload changes nothing");
    assert_eq!(s["reloads"]["ok"], 1);
    assert_eq!(s["reloads"]["failed"], 2);
    let last = s["reloads"]["history"].as_array().expect("history").last().expect("entries").clone();
    assert_eq!(last["ok"], false, "{last:#}");
    assert_eq!(last["generation"], 2, "{last:#}");
    let m = gate.metrics().await;
    assert_eq!(m.one("tidegate_config_generation", &[]), 2.0);
    assert_eq!(m.one("tidegate_reloads_total", &[("result", "failed")]), 2.0);
    let (answered, _) = gets(gate.proxy, 4).await;
    assert_eq!(count(&answered), count(["a", "a", "b", "b"]), "the previous config stays in force");
    gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Token rules for non-loopback binds: `check`, and a 0.0.0.0 bind at runtime
// ---------------------------------------------------------------------------------------------

/// Runs `tidegate ARGS` to completion (bounded): (status, stdout, stderr).
fn run_bin(args: &[&str]) -> (ExitStatus, String, String) {
    let mut p = Proc::spawn(Command::new(BIN).args(args).env("NO_COLOR", "1"), &format!("tidegate {}", args.join(" ")));
    let status = p.wait(Duration::from_secs(10));
    (status, p.stdout(), p.stderr())
}

fn admin_only_config(admin: &str) -> String {
    format!(
        r#"{admin}

[[listener]]
name = "web"
bind = "127.0.0.1:18080"

  [[listener.route]]
  upstream = "app"

[upstream.app]
servers = [ {{ addr = "127.0.0.1:19000" }} ]
"#
    )
}

#[test]
fn check_refuses_a_non_loopback_admin_bind_without_a_token() {
    let text = admin_only_config("[admin]\nbind = \"0.0.0.0:9901\"");
    let f = TempFile::new("admin-open", "toml", &text);
    let (status, out, err) = run_bin(&["check", "-c", f.arg()]);
    assert_eq!(status.code(), Some(1), "check must refuse it\nstdout:\n{out}\nstderr:\n{err}");
    let line = line_of(&text, "bind = \"0.0.0.0:9901\"");
    assert!(err.contains(&format!("{}:{line}:", f.arg())), "the message names {}:{line}:\n{err}", f.arg());
    assert!(err.contains("not loopback") && err.contains("token"), "the message says why:\n{err}");

    // The same rule in the library.
    let e = tidegate::config::load_str(&text, Path::new("x.toml")).expect_err("refused");
    assert!(e.to_string().contains("token"), "{e}");
}

#[test]
fn check_accepts_a_non_loopback_admin_bind_with_a_token() {
    let text = admin_only_config(&format!("[admin]\nbind = \"0.0.0.0:9901\"\ntoken = \"{TOKEN}\""));
    let f = TempFile::new("admin-token", "toml", &text);
    let (status, out, err) = run_bin(&["check", "-c", f.arg()]);
    assert!(status.success(), "check must accept it\nstdout:\n{out}\nstderr:\n{err}");
    let c = tidegate::config::load_str(&text, Path::new("x.toml")).expect("valid");
    let admin = c.admin.expect("[admin]");
    assert_eq!(admin.bind, "0.0.0.0:9901".parse().unwrap());
    assert_eq!(admin.token.as_deref(), Some(TOKEN));

    // Too short a token is refused; a loopback bind (127.0.0.2 too) needs none.
    let short = admin_only_config("[admin]\nbind = \"0.0.0.0:9901\"\ntoken = \"short\"");
    let f = TempFile::new("admin-short", "toml", &short);
    let (status, _, err) = run_bin(&["check", "-c", f.arg()]);
    assert_eq!(status.code(), Some(1), "a 5-character token is refused:\n{err}");
    assert!(err.contains("at least 16"), "{err}");
    for bind in ["127.0.0.1:9901", "127.0.0.2:9901"] {
        let text = admin_only_config(&format!("[admin]\nbind = \"{bind}\""));
        let f = TempFile::new("admin-lo", "toml", &text);
        let (status, out, err) = run_bin(&["check", "-c", f.arg()]);
        assert!(status.success(), "{bind} without a token is fine\nstdout:\n{out}\nstderr:\n{err}");
    }
}

/// With a non-loopback bind (0.0.0.0, reached here through 127.0.0.1) every data call needs
/// the token, reads included; the status page itself (no data: it asks for the token and
/// sends it with its API calls) opens without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_loopback_bind_needs_the_token_for_reads_too() {
    let b = Backends::start(&["a"]).await;
    let text = config(&[(b.addr("a"), 1)], "").replace("bind = \"127.0.0.1:0\"\ntoken", "bind = \"0.0.0.0:0\"\ntoken");
    assert!(text.contains("bind = \"0.0.0.0:0\""));
    let gate = Gate::start_text(&text).await;
    let (code, headers, body) = gate.get("/status", None).await;
    assert_eq!(code, 200, "the page opens without a token: {body}");
    assert!(content_type(&headers).starts_with("text/html"));
    assert!(!body.contains(&b.addr("a").to_string()), "the page carries no data");
    for path in ["/api/v1/status", "/metrics"] {
        let (code, headers, body) = gate.get(path, None).await;
        assert_eq!(code, 401, "GET {path} without a token on a 0.0.0.0 bind: {body}");
        assert_eq!(content_type(&headers), "application/json");
        serde_json::from_str::<Value>(&body).expect("401 body is JSON");
        let (code, _, _) = gate.get(path, Some(WRONG_TOKEN)).await;
        assert_eq!(code, 401, "GET {path} with a wrong token");
        let (code, _, body) = gate.get(path, Some(TOKEN)).await;
        assert_eq!(code, 200, "GET {path} with the token: {body}");
    }
    gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Child processes: output drained by threads, killed by pid (or process group) when overrun
// ---------------------------------------------------------------------------------------------

struct Proc {
    child: Child,
    what: String,
    /// Killed as a group (the child leads its own process group).
    group: bool,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

fn drain_into(mut r: impl Read + Send + 'static, buf: Arc<Mutex<Vec<u8>>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    })
}

impl Proc {
    fn spawn(cmd: &mut Command, what: &str) -> Proc {
        Proc::start(cmd, what, false)
    }

    /// Starts the child as the leader of a new process group, so helpers it forks (Chromium's
    /// renderer, zygote, GPU processes) are killed with it.
    fn spawn_group(cmd: &mut Command, what: &str) -> Proc {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        Proc::start(cmd, what, true)
    }

    fn start(cmd: &mut Command, what: &str, group: bool) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            drain_into(child.stdout.take().expect("piped stdout"), stdout.clone()),
            drain_into(child.stderr.take().expect("piped stderr"), stderr.clone()),
        ];
        Proc { child, what: what.to_string(), group, stdout, stderr, readers }
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// SIGKILL to the child's pid, or to its process group (the id is the child's pid).
    fn kill(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if self.group {
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        } else if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
    }

    fn finish(&mut self) {
        if self.group {
            // Helpers the leader left behind go with the group.
            self.kill();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// Waits (polling) for the exit; panics after `limit`, killing the child first.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        match self.wait_or_kill(limit) {
            Some(s) => s,
            None => panic!("{} did not exit within {limit:?} (killed)\nstdout:\n{}\nstderr:\n{}", self.what, self.stdout(), self.stderr()),
        }
    }

    /// Waits (polling) for the exit; None (after killing it) when it overran `limit`.
    fn wait_or_kill(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.finish();
                return Some(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                let _ = self.child.wait();
                self.finish();
                return None;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
        let _ = self.child.wait();
        if self.group {
            self.kill();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. The status page in a real browser
// ---------------------------------------------------------------------------------------------

fn in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn find_chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser"].iter().find_map(|n| in_path(n))
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Chromium, installed with apt (Debian's `chromium`) when absent and we are root.
fn chromium() -> Result<PathBuf, String> {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _one = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = find_chromium() {
        return Ok(p);
    }
    if !is_root() {
        return Err("chromium is not installed and we are not root, so it cannot be installed".into());
    }
    if in_path("apt-get").is_none() {
        return Err("chromium is not installed and there is no apt-get".into());
    }
    for (args, limit) in [(&["update", "-qq"][..], 600), (&["install", "-y", "-qq", "--no-install-recommends", "chromium"][..], 1500)] {
        eprintln!("admin test: apt-get {} (up to {limit}s)", args.join(" "));
        let what = format!("apt-get {}", args.join(" "));
        let mut p = Proc::spawn(Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive"), &what);
        match p.wait_or_kill(Duration::from_secs(limit)) {
            Some(s) if s.success() => {}
            Some(s) => return Err(format!("{what} failed ({s}):\n{}", tail(&p.stderr(), 30))),
            None => return Err(format!("{what} did not finish within {limit}s (killed):\n{}", tail(&p.stderr(), 30))),
        }
    }
    find_chromium().ok_or_else(|| "apt-get install chromium succeeded but no chromium binary is in PATH".to_string())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A fresh directory under the temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("tidegate-admin-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs headless Chromium on `url` with `extra` arguments (bounded, in its own process group,
/// with a fresh profile): (stdout, stderr).
async fn run_chromium(bin: &Path, url: &str, extra: &[String]) -> (String, String) {
    const LIMIT: Duration = Duration::from_secs(90);
    let profile = TempDir::new("chromium-profile");
    let mut args: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--user-data-dir={}", profile.0.display()));
    args.push("--virtual-time-budget=4000".into());
    args.extend(extra.iter().cloned());
    args.push(url.to_string());
    let bin = bin.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let what = format!("{} {}", bin.display(), args.join(" "));
        let mut p = Proc::spawn_group(Command::new(&bin).args(&args).env("HOME", &profile.0), &what);
        let status = p.wait(LIMIT);
        assert!(status.success(), "{what}: {status}\nstderr:\n{}", tail(&p.stderr(), 40));
        let out = (p.stdout(), p.stderr());
        drop(p);
        drop(profile);
        out
    })
    .await
    .expect("chromium runner did not panic")
}

/// A start tag found in HTML: its name, attributes, and where it ends.
#[derive(Debug)]
struct Tag {
    name: String,
    attrs: HashMap<String, String>,
    end: usize,
}

fn decode_entities(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// Every start tag in `html` (a small scanner: enough for Chromium's serialized DOM).
fn start_tags(html: &str) -> Vec<Tag> {
    let bytes = html.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = html[i..].find('<') {
        let start = i + off + 1;
        i = start;
        if start >= bytes.len() || !bytes[start].is_ascii_alphabetic() {
            continue;
        }
        let mut j = start;
        while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'-') {
            j += 1;
        }
        let name = html[start..j].to_ascii_lowercase();
        let mut attrs = HashMap::new();
        loop {
            while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                j += 1;
            }
            if j >= bytes.len() {
                break;
            }
            if bytes[j] == b'>' {
                j += 1;
                break;
            }
            if bytes[j] == b'/' {
                j += 1;
                continue;
            }
            let k0 = j;
            while j < bytes.len() && !bytes[j].is_ascii_whitespace() && !matches!(bytes[j], b'=' | b'>' | b'/') {
                j += 1;
            }
            let key = html[k0..j].to_ascii_lowercase();
            let mut value = String::new();
            if j < bytes.len() && bytes[j] == b'=' {
                j += 1;
                if j < bytes.len() && (bytes[j] == b'"' || bytes[j] == b'\'') {
                    let q = bytes[j] as char;
                    let v0 = j + 1;
                    let v1 = html[v0..].find(q).map_or(bytes.len(), |e| v0 + e);
                    value = decode_entities(&html[v0..v1]);
                    j = (v1 + 1).min(bytes.len());
                } else {
                    let v0 = j;
                    while j < bytes.len() && !bytes[j].is_ascii_whitespace() && bytes[j] != b'>' {
                        j += 1;
                    }
                    value = decode_entities(&html[v0..j]);
                }
            }
            attrs.insert(key, value);
        }
        out.push(Tag { name, attrs, end: j });
        i = j;
    }
    out
}

/// One rendered row of the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    upstream: String,
    server: String,
    /// `td.tunnels[data-tunnels]`, and the cell's text.
    tunnels: String,
    text: String,
    /// The row's whole markup (tags shown on the row: "drain", "down (api)"...).
    html: String,
}

/// Rows `tr[data-server][data-upstream]` with their `td.tunnels[data-tunnels]` cell.
fn rows(dom: &str) -> Vec<Row> {
    let tags = start_tags(dom);
    let mut out = Vec::new();
    for (i, t) in tags.iter().enumerate() {
        if t.name != "tr" {
            continue;
        }
        let (Some(server), Some(upstream)) = (t.attrs.get("data-server"), t.attrs.get("data-upstream")) else { continue };
        let row_end = dom[t.end..].find("</tr>").map_or(dom.len(), |e| t.end + e);
        let cell = tags[i + 1..].iter().take_while(|c| c.end <= row_end).find(|c| {
            c.name == "td"
                && c.attrs.get("class").is_some_and(|cl| cl.split_whitespace().any(|x| x == "tunnels"))
                && c.attrs.contains_key("data-tunnels")
        });
        let cell = cell.unwrap_or_else(|| panic!("row {server} has no td.tunnels[data-tunnels]:\n{}", &dom[t.end..row_end]));
        let text_end = dom[cell.end..].find('<').map_or(dom.len(), |e| cell.end + e);
        out.push(Row {
            upstream: upstream.clone(),
            server: server.clone(),
            tunnels: cell.attrs["data-tunnels"].clone(),
            text: decode_entities(dom[cell.end..text_end].trim()),
            html: dom[t.end..row_end].to_string(),
        });
    }
    out
}

/// The rendered rows, by server address.
async fn rendered(bin: &Path, url: &str) -> (BTreeMap<String, Row>, String) {
    let (dom, stderr) = run_chromium(bin, url, &["--dump-dom".to_string()]).await;
    assert!(dom.contains("</html>"), "no DOM dumped\nstdout:\n{dom}\nstderr:\n{}", tail(&stderr, 40));
    let rows = rows(&dom);
    let mut by = BTreeMap::new();
    for r in rows {
        assert!(by.insert(r.server.clone(), r.clone()).is_none(), "server {} rendered twice", r.server);
    }
    (by, dom)
}

/// Texts of the `tag` elements (with `class` among their classes, when not empty) in `html`.
fn texts_of(html: &str, tag: &str, class: &str) -> Vec<String> {
    start_tags(html)
        .into_iter()
        .filter(|t| t.name == tag && (class.is_empty() || t.attrs.get("class").is_some_and(|c| c.split_whitespace().any(|x| x == class))))
        .map(|t| {
            let end = html[t.end..].find('<').map_or(html.len(), |e| t.end + e);
            decode_entities(html[t.end..end].trim())
        })
        .collect()
}

fn text_of_id(dom: &str, id: &str) -> String {
    let tags = start_tags(dom);
    let t = tags.iter().find(|t| t.attrs.get("id").is_some_and(|v| v == id)).unwrap_or_else(|| panic!("no #{id} in the DOM"));
    let end = dom[t.end..].find('<').map_or(dom.len(), |e| t.end + e);
    decode_entities(dom[t.end..end].trim())
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// Where the screenshot goes: `target/admin-status.png` (the target dir is found from this
/// crate's binary, so CARGO_TARGET_DIR is honoured).
fn screenshot_path() -> PathBuf {
    let bin = Path::new(BIN);
    let target = bin.parent().and_then(Path::parent).unwrap_or_else(|| Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/target")));
    target.join("admin-status.png")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_servers_and_tunnels_in_chromium() {
    let bin = match tokio::task::spawn_blocking(chromium).await.expect("installer did not panic") {
        Ok(b) => b,
        Err(why) if ci() => panic!("CI is set and Chromium is unavailable: {why}"),
        Err(why) => {
            eprintln!("SKIP status_page_renders_servers_and_tunnels_in_chromium: {why}");
            return;
        }
    };
    let b = Backends::start(&["a", "b"]).await;
    let (a, bb) = (b.addr("a"), b.addr("b"));
    let gate = Gate::start_text(&config(&[(a, 1), (bb, 1)], "")).await;
    let url = format!("http://{}/status", gate.admin);

    let mut tunnels = open_tunnels(gate.proxy, 3).await;
    let expected = |tunnels: &[Tunnel]| -> BTreeMap<String, String> {
        let per = per_backend(tunnels);
        b.by_name.iter().map(|(n, addr)| (addr.to_string(), per.get(n).copied().unwrap_or(0).to_string())).collect()
    };
    let want = expected(&tunnels);
    assert_eq!(want.values().map(|v| v.parse::<usize>().unwrap()).sum::<usize>(), 3);

    let (rows, dom) = rendered(&bin, &url).await;
    assert_eq!(rows.keys().cloned().collect::<BTreeSet<_>>(), want.keys().cloned().collect::<BTreeSet<_>>(), "one row per server:\n{dom}");
    for (server, n) in &want {
        let r = &rows[server];
        assert_eq!(r.upstream, "app", "{r:?}");
        assert_eq!(&r.tunnels, n, "data-tunnels of {} ({server})", b.name_of(server));
        assert_eq!(&r.text, n, "the tunnels cell's text of {server}");
    }
    assert_eq!(text_of_id(&dom, "err"), "", "the page shows an error");
    assert!(text_of_id(&dom, "meta").contains("generation 1"), "meta line: {}", text_of_id(&dom, "meta"));

    // More tunnels, and a drained server: the page follows.
    tunnels.extend(open_tunnels(gate.proxy, 3).await);
    gate.steer("app", bb, "drain").await;
    let want2 = expected(&tunnels);
    assert_ne!(want, want2);
    let (rows, dom) = rendered(&bin, &url).await;
    for (server, n) in &want2 {
        assert_eq!(&rows[server].tunnels, n, "data-tunnels of {server} after opening 3 more:\n{dom}");
    }
    let status = gate.status().await;
    for (server, n) in &want2 {
        let addr: SocketAddr = server.parse().unwrap();
        assert_eq!(server_in(&status, "app", addr)["tunnels"].to_string(), *n, "the API agrees");
    }
    let (ra, rb) = (&rows[&a.to_string()], &rows[&bb.to_string()]);
    assert_eq!(texts_of(&rb.html, "span", "tag"), ["drain"], "the drained server is tagged: {}", rb.html);
    assert_eq!(texts_of(&rb.html, "button", ""), ["undrain", "down"], "its button offers undrain: {}", rb.html);
    assert!(texts_of(&ra.html, "span", "tag").is_empty(), "{}", ra.html);
    assert_eq!(texts_of(&ra.html, "button", ""), ["drain", "down"], "{}", ra.html);

    // A screenshot a person can look at.
    let shot = screenshot_path();
    std::fs::create_dir_all(shot.parent().unwrap()).expect("create the screenshot's directory");
    let _ = std::fs::remove_file(&shot);
    run_chromium(&bin, &url, &[format!("--screenshot={}", shot.display()), "--window-size=1280,900".into()]).await;
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", shot.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 2000, "{} is not a plausible PNG ({} bytes)", shot.display(), png.len());
    eprintln!("status page screenshot: {}", shot.display());

    for t in tunnels {
        t.close().await;
    }
    gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. JSON logs from the binary
// ---------------------------------------------------------------------------------------------

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_json_lines_with_the_request() {
    let b = Backends::start(&["a"]).await;
    let a = b.addr("a");
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let text = format!(
        r#"shutdown_timeout = "2s"

[log]
format = "json"

[[listener]]
name = "web"
bind = "{listen}"

  [[listener.route]]
  upstream = "app"

[upstream.app]
servers = [ {{ addr = "{a}" }} ]
"#
    );
    let f = TempFile::new("json-logs", "toml", &text);
    let mut p = Proc::spawn(
        Command::new(BIN).args(["run", "-c", f.arg()]).env("RUST_LOG", "info").env("NO_COLOR", "1"),
        &format!("tidegate run -c {}", f.arg()),
    );
    // Wait until it accepts.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(s) = p.child.try_wait().expect("try_wait") {
            p.finish();
            panic!("tidegate exited ({s}) before accepting\nstderr:\n{}", p.stderr());
        }
        if let Ok(Ok(_)) = timeout(Duration::from_secs(1), TcpStream::connect(listen)).await {
            break;
        }
        assert!(Instant::now() < deadline, "tidegate not accepting on {listen}\nstderr:\n{}", p.stderr());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (status, backend, client_port) = proxied_get(listen, "/hello?x=1", "test").await;
    assert_eq!((status, backend.as_deref()), (200, Some("a")));
    let deadline = Instant::now() + WAIT;
    while !p.stderr().contains("\"request\"") {
        assert!(Instant::now() < deadline, "no request log line within {WAIT:?}\nstderr:\n{}", p.stderr());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.child.id() as i32), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM tidegate");
    let exit = tokio::task::spawn_blocking(move || {
        let s = p.wait(Duration::from_secs(15));
        (s, p.stderr())
    })
    .await
    .expect("waiter did not panic");
    let (status, stderr) = exit;
    assert!(status.success(), "tidegate exit after SIGTERM: {status}\nstderr:\n{stderr}");

    let lines: Vec<Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("a stderr line is not JSON ({e}): {l:?}\nall:\n{stderr}")))
        .collect();
    assert!(lines.len() >= 2, "expected start-up and request lines:\n{stderr}");
    for v in &lines {
        assert!(
            v["timestamp"].is_string() && v["level"].is_string() && v["target"].is_string(),
            "a line without timestamp/level/target: {v}"
        );
        assert!(v["fields"]["message"].is_string(), "a line without fields.message: {v}");
    }
    let req: Vec<&Value> = lines.iter().filter(|v| v["fields"]["message"] == "request").collect();
    assert_eq!(req.len(), 1, "one request line:\n{stderr}");
    let r = req[0];
    assert_eq!(r["level"], "INFO", "{r}");
    assert_eq!(r["target"], "access", "{r}");
    let f = &r["fields"];
    assert_eq!(f["status"], 200, "status is a JSON number: {r}");
    assert_eq!(f["method"], "GET", "{r}");
    assert_eq!(f["path"], "/hello", "{r}");
    assert_eq!(f["upstream"], "app", "{r}");
    assert_eq!(f["backend"], a.to_string(), "{r}");
    assert_eq!(f["client"], format!("127.0.0.1:{client_port}"), "{r}");
    assert!(f["ms"].is_u64() && f["bytes_out"].is_u64(), "{r}");
    assert!(
        lines.iter().any(|v| v["fields"]["message"] == "listening" && v["fields"]["addr"] == listen.to_string()),
        "a start-up line with the listener's address:\n{stderr}"
    );
}
