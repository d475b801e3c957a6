//! Load balancing, black box: for every algorithm, which backend answers (`x-backend`) on real
//! sockets. tidegate listens on 127.0.0.1 port 0; clients also connect from 127.0.0.2,
//! 127.0.0.3, ... where the source address matters (ip_hash). WebSocket tunnels are held open
//! to load servers: an open tunnel is one live connection on its server until it is closed.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{HeaderMap, Request};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Upper bound for any single wait in this file.
const WAIT: Duration = Duration::from_secs(10);
/// The RFC 6455 sample key.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// Client connections kept in flight at once where many clients are simulated.
const PARALLEL: usize = 16;
const SECRET: &str = "tidegate-test-secret-0123456789";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

/// 127.0.0.0 + n: `lo(2)` is 127.0.0.2, `lo(256 + 1)` is 127.0.1.1.
fn lo(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x7f00_0000 + n))
}

/// Connects to `to`, from source address `from` (any port) when given.
async fn connect_from(to: SocketAddr, from: Option<IpAddr>) -> TcpStream {
    within("connect", async {
        match from {
            None => TcpStream::connect(to).await,
            Some(ip) => {
                let s = TcpSocket::new_v4()?;
                s.set_reuseaddr(true)?;
                s.bind(SocketAddr::new(ip, 0))?;
                s.connect(to).await
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("connect to {to} from {from:?}: {e}"))
}

/// What a test looks at in a response.
#[derive(Debug, Clone)]
struct Resp {
    status: u16,
    backend: Option<String>,
    set_cookie: Vec<String>,
}

impl Resp {
    fn new(status: u16, headers: impl IntoIterator<Item = (String, String)>) -> Resp {
        let mut r = Resp { status, backend: None, set_cookie: Vec::new() };
        for (k, v) in headers {
            match k.to_ascii_lowercase().as_str() {
                "x-backend" => r.backend = Some(v),
                "set-cookie" => r.set_cookie.push(v),
                _ => {}
            }
        }
        r
    }

    fn from_map(status: u16, h: &HeaderMap) -> Resp {
        Resp::new(status, h.iter().map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())))
    }

    /// The backend that answered; panics unless a backend answered (200 or 101).
    fn ok(&self) -> &str {
        assert!(self.status == 200 || self.status == 101, "expected a backend's answer, got {self:?}");
        self.backend.as_deref().unwrap_or_else(|| panic!("answer without x-backend: {self:?}"))
    }

    /// The value a `Set-Cookie` gives cookie `name`, if one does.
    fn cookie(&self, name: &str) -> Option<String> {
        self.set_cookie.iter().find_map(|c| c.split(';').next()?.trim().strip_prefix(name)?.strip_prefix('=').map(str::to_string))
    }
}

/// A keep-alive HTTP/1.1 client connection (hyper's).
struct Http(SendRequest<Full<Bytes>>);

impl Http {
    async fn connect(to: SocketAddr, from: Option<IpAddr>) -> Http {
        let stream = connect_from(to, from).await;
        let (tx, conn) = within("client handshake", hyper::client::conn::http1::handshake(TokioIo::new(stream))).await.expect("handshake");
        tokio::spawn(conn);
        Http(tx)
    }

    /// `GET path` with `Host: test` and `headers`; the body is read to the end.
    async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Resp {
        let mut req = Request::get(path).header("host", "test");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::new())).expect("request");
        within(&format!("response to GET {path}"), async {
            self.0.ready().await.expect("connection still usable");
            let resp = self.0.send_request(req).await.expect("response");
            let (parts, body) = resp.into_parts();
            body.collect().await.expect("response body");
            Resp::from_map(parts.status.as_u16(), &parts.headers)
        })
        .await
    }
}

/// One `GET` on a fresh connection from `from`.
async fn get_once(to: SocketAddr, from: Option<IpAddr>, path: &str, headers: &[(&str, &str)]) -> Resp {
    Http::connect(to, from).await.get(path, headers).await
}

/// Sends a WebSocket upgrade by hand and reads the response head; the socket stays open.
async fn upgrade(to: SocketAddr, from: Option<IpAddr>, headers: &[(&str, &str)]) -> (TcpStream, Resp) {
    let mut s = connect_from(to, from).await;
    let mut req = format!(
        "GET /ws HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let raw = within("upgrade response head", async {
        s.write_all(req.as_bytes()).await.expect("send upgrade");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).await.expect("read response head");
            assert!(n > 0, "connection closed before a response head: {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
    .await;
    let head = raw.split("\r\n\r\n").next().unwrap_or_default();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string()));
    (s, Resp::new(status, headers))
}

/// An open WebSocket tunnel: the client socket (hold it to keep the tunnel) and the 101.
async fn tunnel(to: SocketAddr, from: Option<IpAddr>, headers: &[(&str, &str)]) -> (TcpStream, Resp) {
    let (s, r) = upgrade(to, from, headers).await;
    assert_eq!(r.status, 101, "upgrade not accepted: {r:?}");
    r.ok();
    (s, r)
}

fn count<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in items {
        *m.entry(s.as_ref().to_string()).or_insert(0) += 1;
    }
    m
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Demo backends by name; aborted when dropped.
struct Backends {
    names: Vec<String>,
    addrs: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Backends {
    async fn start(names: &[&str]) -> Backends {
        let mut b = Backends { names: Vec::new(), addrs: Vec::new(), tasks: Vec::new() };
        for n in names {
            let (addr, task) = support::backend(n).await;
            b.names.push(n.to_string());
            b.addrs.push(addr);
            b.tasks.push(task);
        }
        b
    }

    fn addr(&self, name: &str) -> SocketAddr {
        self.addrs[self.names.iter().position(|n| n == name).expect("known backend")]
    }

    /// `servers` entries for every backend, `extra` (TOML inline-table keys) added to each.
    fn servers(&self, extra: &str) -> Vec<String> {
        self.names.iter().map(|n| srv(self.addr(n), extra)).collect()
    }

    /// Stops backend `name`: it no longer accepts connections once this returns.
    async fn kill(&mut self, name: &str) {
        let i = self.names.iter().position(|n| n == name).expect("known backend");
        self.tasks[i].abort();
        let _ = within("backend task ends", &mut self.tasks[i]).await;
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A port that refuses connections (bound, not listening) until `wake` starts a backend on it.
struct Parked {
    addr: SocketAddr,
    sock: TcpSocket,
}

impl Parked {
    fn new() -> Parked {
        let sock = TcpSocket::new_v4().expect("socket");
        sock.set_reuseaddr(true).expect("reuseaddr");
        sock.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        Parked { addr: sock.local_addr().expect("local addr"), sock }
    }

    /// Starts demo backend `name` on this port (listening before the placeholder goes away).
    async fn wake(self, name: &str, into: &mut Backends) {
        let (addr, task) = tidegate::demo::spawn_backend(name, self.addr).await.expect("backend binds the parked port");
        assert_eq!(addr, self.addr);
        drop(self.sock);
        into.names.push(name.to_string());
        into.addrs.push(addr);
        into.tasks.push(task);
    }
}

fn srv(addr: SocketAddr, extra: &str) -> String {
    if extra.is_empty() { format!(r#"{{ addr = "{addr}" }}"#) } else { format!(r#"{{ addr = "{addr}", {extra} }}"#) }
}

/// A config with one listener (plus `listener_extra` keys) routing everything to upstream
/// `app`: `upstream_keys` go before `servers`, `tables` (e.g. `[upstream.app.hash]`) after.
fn config(listener_extra: &str, upstream_keys: &str, servers: &[String], tables: &str) -> String {
    format!(
        r#"shutdown_timeout = "5s"

[[listener]]
name = "test"
bind = "127.0.0.1:0"
{listener_extra}

  [[listener.route]]
  upstream = "app"

[upstream.app]
{upstream_keys}
servers = [
  {}
]

{tables}
"#,
        servers.join(",\n  ")
    )
}

/// Waits (bounded) until `tg` counts no live connection on any of `addrs`.
async fn wait_idle(tg: &support::Proxy, addrs: &[SocketAddr]) {
    within("live counts return to 0", async {
        while addrs.iter().any(|a| tg.live("app", *a) != 0) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Where each client `127.0.0.0 + n` lands, `per_client` requests each on fresh connections.
async fn placements(to: SocketAddr, clients: impl IntoIterator<Item = u32>, per_client: usize) -> BTreeMap<u32, Vec<String>> {
    stream::iter(clients)
        .map(|n| async move {
            let mut v = Vec::new();
            for _ in 0..per_client {
                v.push(get_once(to, Some(lo(n)), "/", &[]).await.ok().to_string());
            }
            (n, v)
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await
}

/// The single placement of each client, checking every client always reached the same server.
fn sticky_placements(p: &BTreeMap<u32, Vec<String>>) -> BTreeMap<u32, String> {
    p.iter()
        .map(|(n, v)| {
            assert!(v.iter().all(|s| s == &v[0]), "client {} reached different servers: {v:?}", lo(*n));
            (*n, v[0].clone())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// round_robin
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_weights_1_2_3_give_exact_counts() {
    let b = Backends::start(&["a", "b", "c"]).await;
    let servers = [srv(b.addr("a"), "weight = 1"), srv(b.addr("b"), "weight = 2"), srv(b.addr("c"), "weight = 3")];
    let tg = support::tidegate(&config("", r#"balance = "round_robin""#, &servers, "")).await;
    // Four keep-alive connections of 15 requests each, in parallel: the schedule is shared, so
    // the counts are exact whatever the interleaving.
    let to = tg.addr;
    let answers: Vec<Vec<String>> = stream::iter(0..4)
        .map(|_| async move {
            let mut c = Http::connect(to, None).await;
            let mut v = Vec::new();
            for _ in 0..15 {
                v.push(c.get("/", &[]).await.ok().to_string());
            }
            v
        })
        .buffer_unordered(4)
        .collect()
        .await;
    assert_eq!(count(answers.concat()), counts(&[("a", 10), ("b", 20), ("c", 30)]));
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// least_conn
// ---------------------------------------------------------------------------------------------

/// 100 tunnels held on A while B and C refuse connections (`max_fails = 0`: skipped per
/// request, never marked failed); then B and C come alive on the same ports and the next 100
/// tunnels must all go to them, evenly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_empty_servers_take_new_tunnels_until_they_catch_up() {
    let mut b = Backends::start(&["a"]).await;
    let (pb, pc) = (Parked::new(), Parked::new());
    let servers = [srv(b.addr("a"), ""), srv(pb.addr, "max_fails = 0"), srv(pc.addr, "max_fails = 0")];
    let tg = support::tidegate(&config("", r#"balance = "least_conn""#, &servers, "")).await;
    let mut held = Vec::new();
    for i in 0..100 {
        let (s, r) = tunnel(tg.addr, None, &[]).await;
        assert_eq!(r.ok(), "a", "tunnel {i} while only a is up");
        held.push(s);
    }
    pb.wake("b", &mut b).await;
    pc.wake("c", &mut b).await;
    let mut got = Vec::new();
    for _ in 0..100 {
        let (s, r) = tunnel(tg.addr, None, &[]).await;
        got.push(r.ok().to_string());
        held.push(s);
    }
    let n = count(&got);
    println!("least_conn after a holds 100: {n:?}");
    assert_eq!(n.get("a"), None, "a already holds 100 tunnels: {n:?}");
    let nb = n.get("b").copied().unwrap_or(0);
    assert!((48..=52).contains(&nb), "b and c should split 100 new tunnels evenly: {n:?}");
    assert_eq!(tg.live("app", b.addr("a")), 100);
    drop(held);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_weights_2_1_split_300_open_tunnels_200_100() {
    let b = Backends::start(&["a", "b"]).await;
    let servers = [srv(b.addr("a"), "weight = 2"), srv(b.addr("b"), "weight = 1")];
    let tg = support::tidegate(&config("", r#"balance = "least_conn""#, &servers, "")).await;
    let mut held = Vec::new();
    let mut got = Vec::new();
    for _ in 0..300 {
        let (s, r) = tunnel(tg.addr, None, &[]).await;
        got.push(r.ok().to_string());
        held.push(s);
    }
    let n = count(&got);
    println!("least_conn weights 2:1, 300 open tunnels: {n:?}");
    let na = n.get("a").copied().unwrap_or(0);
    assert!((198..=202).contains(&na), "weights 2:1 should split 300 open tunnels 200/100 (±2): {n:?}");
    drop(held);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// p2c / random_two
// ---------------------------------------------------------------------------------------------

/// A holds 50 tunnels (B and C refused connections meanwhile), then 100 new tunnels over
/// A, B, C. Two random servers are compared, so a server that is strictly more loaded than
/// both others can never win; A can only win a draw against a server exactly as loaded as it
/// (possible in the last few picks, when B or C reaches 50), so every pick is checked against
/// the live loads at that moment.
async fn p2c_avoids_the_loaded_server(balance: &str) {
    let mut b = Backends::start(&["a"]).await;
    let (pb, pc) = (Parked::new(), Parked::new());
    let servers = [srv(b.addr("a"), ""), srv(pb.addr, "max_fails = 0"), srv(pc.addr, "max_fails = 0")];
    let tg = support::tidegate(&config("", &format!(r#"balance = "{balance}""#), &servers, "")).await;
    let mut held = Vec::new();
    for i in 0..50 {
        let (s, r) = tunnel(tg.addr, None, &[]).await;
        assert_eq!(r.ok(), "a", "tunnel {i} while only a is up");
        held.push(s);
    }
    pb.wake("b", &mut b).await;
    pc.wake("c", &mut b).await;
    let mut load = counts(&[("a", 50), ("b", 0), ("c", 0)]);
    for i in 0..100 {
        let (s, r) = tunnel(tg.addr, None, &[]).await;
        let who = r.ok().to_string();
        let others_max = load.iter().filter(|(k, _)| **k != who).map(|(_, v)| *v).max().unwrap();
        assert!(load[&who] <= others_max, "new tunnel {i} went to {who}, strictly the most loaded server: {load:?}");
        *load.get_mut(&who).unwrap() += 1;
        held.push(s);
    }
    println!("{balance}: a held 50, after 100 new tunnels: {load:?}");
    assert!(load["b"] >= 45 && load["c"] >= 45, "b and c should take the new tunnels about evenly: {load:?}");
    drop(held);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_avoids_the_loaded_server_with_open_tunnels() {
    p2c_avoids_the_loaded_server("p2c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_two_alias_avoids_the_loaded_server_with_open_tunnels() {
    p2c_avoids_the_loaded_server("random_two").await;
}

/// 3,000 sequential requests over 3 equal servers. With equal (zero) loads the pick is uniform,
/// so each count is Binomial(3000, 1/3): mean 1000, standard deviation ≈ 25.8. The bound
/// 850..=1150 is ±150 ≈ 5.8 standard deviations (false-failure odds below 1e-8); a p2c that
/// favours a server (e.g. always the first draw's index 0) fails it.
async fn p2c_spreads_sequential_requests_evenly(balance: &str) {
    let b = Backends::start(&["a", "b", "c"]).await;
    let tg = support::tidegate(&config("", &format!(r#"balance = "{balance}""#), &b.servers(""), "")).await;
    let mut c = Http::connect(tg.addr, None).await;
    let mut got = Vec::with_capacity(3000);
    for _ in 0..3000 {
        got.push(c.get("/", &[]).await.ok().to_string());
    }
    let n = count(&got);
    println!("{balance}: 3000 sequential requests: {n:?}");
    assert_eq!(n.len(), 3, "{n:?}");
    for (s, k) in &n {
        assert!((850..=1150).contains(k), "{s} got {k} of 3000 requests, outside 850..=1150: {n:?}");
    }
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_spreads_3000_requests_evenly() {
    p2c_spreads_sequential_requests_evenly("p2c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_two_alias_spreads_3000_requests_evenly() {
    p2c_spreads_sequential_requests_evenly("random_two").await;
}

// ---------------------------------------------------------------------------------------------
// ip_hash
// ---------------------------------------------------------------------------------------------

/// 200 clients (127.0.0.2 ... 127.0.0.201), 3 requests each on fresh connections, always reach
/// the same server; a second tidegate with 3 of the same 4 backends moves only the clients of
/// the removed server. The removed server is the one with the fewest clients: which server
/// owns how much of the ring depends on the (random) backend ports, and with 160 points per
/// server a server's share varies by about ±2 % around 25 % (plus ±3 % sampling 200 clients),
/// so removing an arbitrary server would exceed 30 % in roughly one run in twenty. What is
/// tested is the consistent-hash property itself: nobody else moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_clients_stick_and_removing_a_server_moves_only_its_clients() {
    let b = Backends::start(&["a", "b", "c", "d"]).await;
    let tg1 = support::tidegate(&config("", r#"balance = "ip_hash""#, &b.servers(""), "")).await;
    let first = sticky_placements(&placements(tg1.addr, 2..=201, 3).await);
    let per_server = count(first.values());
    println!("ip_hash: 200 clients over 4 servers: {per_server:?}");
    assert_eq!(per_server.len(), 4, "200 clients should reach all 4 servers: {per_server:?}");
    assert!(per_server.values().all(|&k| k >= 10), "a very uneven spread: {per_server:?}");

    let removed = per_server.iter().min_by_key(|(_, k)| **k).map(|(s, _)| s.clone()).unwrap();
    let kept: Vec<String> = b.names.iter().filter(|n| **n != removed).map(|n| srv(b.addr(n), "")).collect();
    let tg2 = support::tidegate(&config("", r#"balance = "ip_hash""#, &kept, "")).await;
    let second = sticky_placements(&placements(tg2.addr, 2..=201, 1).await);
    let moved: Vec<u32> = first.iter().filter(|(n, s)| second[n] != **s).map(|(n, _)| *n).collect();
    for n in &moved {
        assert_eq!(first[n], removed, "client {} moved from {} to {} though {} is still there", lo(*n), first[n], second[n], first[n]);
    }
    let frac = moved.len() as f64 / first.len() as f64;
    println!("ip_hash: removed {removed}; moved {} of {} clients ({:.1} %)", moved.len(), first.len(), frac * 100.0);
    assert!(frac <= 0.30, "removing 1 of 4 servers moved {:.1} % of clients (> 25 % + 5 %)", frac * 100.0);
    tg1.stop().await;
    tg2.stop().await;
}

/// nginx's ip_hash hashes the first three octets: every 127.0.0.x client lands on one server,
/// while clients from other /24 networks spread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_nginx_mode_puts_a_whole_slash_24_on_one_server() {
    let b = Backends::start(&["a", "b", "c", "d"]).await;
    let keys = "balance = \"ip_hash\"\nip_hash = { mode = \"nginx\" }";
    let tg = support::tidegate(&config("", keys, &b.servers(""), "")).await;
    let same_net = sticky_placements(&placements(tg.addr, 2..=201, 1).await);
    let n = count(same_net.values());
    println!("ip_hash nginx mode, 127.0.0.2..201: {n:?}");
    assert_eq!(n.len(), 1, "every 127.0.0.x client should reach the same server: {n:?}");
    // 127.0.N.1 for N = 1..=20: twenty different /24 networks.
    let nets = sticky_placements(&placements(tg.addr, (1..=20).map(|n| n * 256 + 1), 2).await);
    let spread = count(nets.values());
    println!("ip_hash nginx mode, 127.0.1.1 .. 127.0.20.1: {spread:?}");
    assert!(spread.len() > 1, "twenty /24 networks all on one server: {spread:?}");
    tg.stop().await;
}

/// Behind a trusted proxy the client is the right-most X-Forwarded-For address that is not a
/// trusted proxy; from anyone else X-Forwarded-For is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_uses_forwarded_client_only_behind_trusted_proxy() {
    let b = Backends::start(&["a", "b", "c", "d"]).await;
    let cfg = config(r#"trusted_proxies = ["127.0.0.1"]"#, r#"balance = "ip_hash""#, &b.servers(""), "");
    let tg = support::tidegate(&cfg).await;
    // Where untrusted clients 127.0.0.2 ... 127.0.0.101 land on their own.
    let direct = sticky_placements(&placements(tg.addr, 2..=101, 2).await);
    assert!(count(direct.values()).len() > 1, "100 clients on one server; the checks below would prove nothing");

    // 203.0.113.7 behind the trusted 127.0.0.1, with and without the proxy itself in the list.
    let mut seen = Vec::new();
    for xff in ["203.0.113.7", "203.0.113.7, 127.0.0.1", "203.0.113.7", "203.0.113.7, 127.0.0.1"] {
        for _ in 0..3 {
            seen.push(get_once(tg.addr, None, "/", &[("x-forwarded-for", xff)]).await.ok().to_string());
        }
    }
    assert!(seen.iter().all(|s| *s == seen[0]), "203.0.113.7 behind a trusted proxy reached different servers: {seen:?}");

    // The forwarded address is what places the request: the same server as that client
    // connecting directly (and these spread, so the peer 127.0.0.1 is not what decides).
    for n in 2..=41 {
        let ip = lo(n).to_string();
        for xff in [ip.clone(), format!("{ip}, 127.0.0.1")] {
            let got = get_once(tg.addr, None, "/", &[("x-forwarded-for", &xff)]).await.ok().to_string();
            assert_eq!(got, direct[&n], "trusted peer with X-Forwarded-For: {xff} should be placed as {ip}");
        }
    }

    // From an untrusted peer X-Forwarded-For is ignored: the peer address places the request.
    let mut discriminating = 0;
    for n in 2..=51 {
        let m = n + 50;
        let xff = lo(m).to_string();
        let got = get_once(tg.addr, Some(lo(n)), "/", &[("x-forwarded-for", &xff)]).await.ok().to_string();
        assert_eq!(got, direct[&n], "untrusted {} sending X-Forwarded-For: {xff} must be placed by its own address", lo(n));
        if direct[&n] != direct[&m] {
            discriminating += 1;
        }
    }
    assert!(discriminating > 0, "no client/XFF pair mapped to different servers; the untrusted check proved nothing");
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// cookie
// ---------------------------------------------------------------------------------------------

fn cookie_config(b: &Backends, extra_keys: &str, cookie_table: &str) -> String {
    let keys = format!("balance = \"cookie\"\n{extra_keys}");
    let tables = if cookie_table.is_empty() { String::new() } else { format!("[upstream.app.cookie]\n{cookie_table}") };
    config("", &keys, &b.servers(""), &tables)
}

/// Requests without a cookie until every backend has set its cookie once: backend → value.
async fn learn_cookies(to: SocketAddr, names: &[String]) -> BTreeMap<String, String> {
    let mut c = Http::connect(to, None).await;
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for _ in 0..30 {
        let r = c.get("/", &[]).await;
        let who = r.ok().to_string();
        let v = r.cookie("tg_srv").unwrap_or_else(|| panic!("a response to a request without a cookie has no tg_srv Set-Cookie: {r:?}"));
        if let Some(prev) = map.insert(who.clone(), v.clone()) {
            assert_eq!(prev, v, "{who} was named by two different cookie values");
        }
        if map.len() == names.len() {
            break;
        }
    }
    assert_eq!(map.len(), names.len(), "not every backend was reached by the fallback: {map:?}");
    let distinct: BTreeSet<&String> = map.values().collect();
    assert_eq!(distinct.len(), map.len(), "two backends share a cookie value: {map:?}");
    map
}

fn assert_opaque(value: &str, b: &Backends) {
    for a in &b.addrs {
        let (ip, port) = (a.ip().to_string(), a.port().to_string());
        assert!(!value.contains(&port) && !value.contains(&ip), "cookie value {value:?} reveals backend {a}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_is_set_opaque_and_sticks_for_requests_and_websockets() {
    let b = Backends::start(&["a", "b", "c"]).await;
    let tg = support::tidegate(&cookie_config(&b, "", "")).await;

    let first = get_once(tg.addr, None, "/", &[]).await;
    first.ok();
    assert_eq!(first.set_cookie.len(), 1, "{first:?}");
    let mut parts = first.set_cookie[0].split("; ");
    let nv = parts.next().unwrap();
    let attrs: BTreeSet<&str> = parts.collect();
    let value = nv.strip_prefix("tg_srv=").unwrap_or_else(|| panic!("cookie is not tg_srv: {nv:?}"));
    assert!(!value.is_empty());
    assert_eq!(attrs, BTreeSet::from(["Path=/", "HttpOnly", "SameSite=Lax"]), "Set-Cookie: {}", first.set_cookie[0]);
    assert_opaque(value, &b);

    let cookies = learn_cookies(tg.addr, &b.names).await;
    println!("cookie values: {cookies:?}");
    for v in cookies.values() {
        assert_opaque(v, &b);
    }
    assert_eq!(cookies[first.ok()], value, "the first response's cookie names another server");

    // 20 later requests with a server's cookie all reach it.
    for (server, v) in &cookies {
        let mut c = Http::connect(tg.addr, None).await;
        let header = format!("tg_srv={v}");
        for i in 0..20 {
            let r = c.get(&format!("/page/{i}"), &[("cookie", &header)]).await;
            assert_eq!(r.ok(), server, "request {i} with {server}'s cookie");
        }
    }

    // A WebSocket upgrade with the cookie sticks too.
    let mut held = Vec::new();
    for (server, v) in &cookies {
        for _ in 0..3 {
            let (s, r) = tunnel(tg.addr, None, &[("cookie", &format!("theme=dark; tg_srv={v}"))]).await;
            assert_eq!(r.ok(), server, "WebSocket upgrade with {server}'s cookie");
            held.push(s);
        }
    }
    // Without a cookie the 101 sets one, naming the server that answered it.
    for _ in 0..3 {
        let (s, r) = tunnel(tg.addr, None, &[]).await;
        let v = r.cookie("tg_srv").unwrap_or_else(|| panic!("101 without a tg_srv Set-Cookie: {r:?}"));
        assert_eq!(cookies[r.ok()], v, "the 101's cookie names another server than the one that answered");
        held.push(s);
    }
    drop(held);
    tg.stop().await;
}

fn alter(s: &str, i: usize) -> String {
    let mut v = s.as_bytes().to_vec();
    v[i] = if v[i] == b'0' { b'1' } else { b'0' };
    String::from_utf8(v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_signed_forged_values_are_rebalanced_and_reset() {
    let b = Backends::start(&["a", "b", "c"]).await;
    let tg = support::tidegate(&cookie_config(&b, "", &format!("secret = \"{SECRET}\""))).await;
    let cookies = learn_cookies(tg.addr, &b.names).await;
    println!("signed cookie values: {cookies:?}");
    for v in cookies.values() {
        assert_opaque(v, &b);
    }
    let valid = cookies["a"].clone();
    let dot = valid.find('.').expect("a signed value has an id and a tag separated by '.'");
    let forged = [
        ("random", "0123456789abcdef.AAAAAAAAAAAAAAAAAAAAAA".to_string()),
        ("id changed", alter(&valid, 3)),
        ("tag changed", alter(&valid, dot + 5)),
        ("tag dropped", valid[..dot].to_string()),
    ];
    // The valid value sticks.
    for _ in 0..5 {
        assert_eq!(get_once(tg.addr, None, "/", &[("cookie", &format!("tg_srv={valid}"))]).await.ok(), "a");
    }
    let mut c = Http::connect(tg.addr, None).await;
    for (what, f) in &forged {
        assert_ne!(f, &valid);
        let header = format!("tg_srv={f}");
        let mut reached = BTreeSet::new();
        for _ in 0..9 {
            let r = c.get("/", &[("cookie", &header)]).await;
            let who = r.ok().to_string();
            let reset = r.cookie("tg_srv").unwrap_or_else(|| panic!("forged cookie ({what}) {f:?}: no new Set-Cookie: {r:?}"));
            assert_eq!(reset, cookies[&who], "forged cookie ({what}): the new cookie is not {who}'s valid one");
            reached.insert(who);
        }
        assert!(reached.len() > 1, "forged cookie ({what}) {f:?} was honoured: every request went to {reached:?}");
    }
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_for_a_dead_server_is_rebalanced_and_reset() {
    let mut b = Backends::start(&["a", "b", "c"]).await;
    // No pooled connections: a killed backend must not keep answering over an old one.
    let cfg = config("", "balance = \"cookie\"\nkeepalive = 0", &b.servers("max_fails = 1"), "");
    let tg = support::tidegate(&cfg).await;
    let cookies = learn_cookies(tg.addr, &b.names).await;
    b.kill("b").await;
    let header = format!("tg_srv={}", cookies["b"]);
    for i in 0..4 {
        let r = get_once(tg.addr, None, "/", &[("cookie", &header)]).await;
        let who = r.ok().to_string();
        assert_ne!(who, "b");
        let reset = r.cookie("tg_srv").unwrap_or_else(|| panic!("request {i} with the dead server's cookie: no new Set-Cookie: {r:?}"));
        assert_eq!(reset, cookies[&who], "request {i}: the new cookie does not name {who}, which answered");
    }
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_maps_to_the_same_server_in_two_instances() {
    let b = Backends::start(&["a", "b", "c"]).await;
    let cfg = cookie_config(&b, "", &format!("secret = \"{SECRET}\""));
    let tg1 = support::tidegate(&cfg).await;
    let tg2 = support::tidegate(&cfg).await;
    let from1 = learn_cookies(tg1.addr, &b.names).await;
    let from2 = learn_cookies(tg2.addr, &b.names).await;
    assert_eq!(from1, from2, "two instances with the same config name servers differently");
    for (server, v) in &from1 {
        for _ in 0..3 {
            let r = get_once(tg2.addr, None, "/", &[("cookie", &format!("tg_srv={v}"))]).await;
            assert_eq!(r.ok(), server, "instance 2 with instance 1's cookie for {server}");
        }
    }
    tg1.stop().await;
    tg2.stop().await;
}

// ---------------------------------------------------------------------------------------------
// hash
// ---------------------------------------------------------------------------------------------

fn hash_config(b: &Backends, key: &str, bounded_load: Option<f64>) -> String {
    let mut table = format!("[upstream.app.hash]\nkey = \"{key}\"\n");
    if let Some(c) = bounded_load {
        table.push_str(&format!("bounded_load = {c:?}\n"));
    }
    config("", r#"balance = "hash""#, &b.servers(""), &table)
}

type KeyedReq = fn(&str, usize) -> (String, Vec<(&'static str, String)>);

/// 20 keys × 20 rounds: every key always reaches the same server, the keys use more than one
/// server; requests without the key (`keyless`) are still served.
async fn hash_key_sticks(key: &str, keyed: KeyedReq, keyless: &[(&str, &[(&str, &str)])]) {
    let b = Backends::start(&["a", "b", "c"]).await;
    let tg = support::tidegate(&hash_config(&b, key, None)).await;
    let keys: Vec<String> = (0..20).map(|i| format!("user-{i}")).collect();
    let mut c = Http::connect(tg.addr, None).await;
    let mut placed: BTreeMap<String, String> = BTreeMap::new();
    for round in 0..20 {
        for k in &keys {
            let (path, headers) = keyed(k, round);
            let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let who = c.get(&path, &headers).await.ok().to_string();
            let first = placed.entry(k.clone()).or_insert_with(|| who.clone());
            assert_eq!(*first, who, "{key}: key {k} moved in round {round} ({path} {headers:?})");
        }
    }
    let spread = count(placed.values());
    println!("hash {key}: 20 keys over 3 servers: {spread:?}");
    assert!(spread.len() > 1, "{key}: 20 different keys all on one server: {spread:?}");
    for (path, headers) in keyless {
        for _ in 0..3 {
            let r = c.get(path, headers).await;
            assert_eq!(r.status, 200, "{key}: a request without the key ({path} {headers:?}) should fall back: {r:?}");
            r.ok();
        }
    }
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_by_header_sticks_and_spreads() {
    fn keyed(k: &str, round: usize) -> (String, Vec<(&'static str, String)>) {
        (format!("/round/{round}"), vec![("x-user-id", k.to_string())])
    }
    hash_key_sticks("header:X-User-Id", keyed, &[("/", &[]), ("/", &[("x-other-id", "user-1")])]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_by_cookie_sticks_and_spreads() {
    fn keyed(k: &str, round: usize) -> (String, Vec<(&'static str, String)>) {
        let cookie = if round.is_multiple_of(2) { format!("sid={k}") } else { format!("theme=dark; sid={k}; lang=en") };
        (format!("/round/{round}"), vec![("cookie", cookie)])
    }
    hash_key_sticks("cookie:sid", keyed, &[("/", &[]), ("/", &[("cookie", "theme=dark; sidx=user-1")])]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_by_query_sticks_and_spreads() {
    fn keyed(k: &str, round: usize) -> (String, Vec<(&'static str, String)>) {
        let path = if round.is_multiple_of(2) { format!("/?user={k}") } else { format!("/items/{round}?page={round}&user={k}&x=1") };
        (path, vec![])
    }
    hash_key_sticks("query:user", keyed, &[("/", &[]), ("/?users=user-1&page=2", &[]), ("/items?other=1", &[])]).await;
}

/// 120 tunnels, 90 % of them with the same key. Bounded loads keep every server at or below
/// ceil(1.25 × 120 / 3) = 50 open tunnels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_bounded_load_caps_a_skewed_key_set() {
    let b = Backends::start(&["a", "b", "c"]).await;
    let tg = support::tidegate(&hash_config(&b, "header:X-User-Id", Some(1.25))).await;
    let mut held = Vec::new();
    let mut got = Vec::new();
    for i in 0..120 {
        let key = if i % 10 == 9 { format!("cold-{i}") } else { "hot".to_string() };
        let (s, r) = tunnel(tg.addr, None, &[("x-user-id", &key)]).await;
        got.push(r.ok().to_string());
        held.push(s);
    }
    let n = count(&got);
    let cap = (1.25f64 * 120.0 / 3.0).ceil() as usize;
    println!("hash bounded_load 1.25, 120 tunnels (108 one key): {n:?}, cap {cap}");
    for (s, k) in &n {
        assert!(*k <= cap, "{s} holds {k} tunnels, above ceil(1.25 × average) = {cap}: {n:?}");
        assert_eq!(tg.live("app", b.addr(s)) as usize, *k, "live count of {s}");
    }
    drop(held);
    tg.stop().await;
}

/// The same skewed set without bounded loads: the hot key's 108 tunnels all land on one
/// server (so the bound above is what spreads them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_without_bounded_load_puts_a_hot_key_on_one_server() {
    let b = Backends::start(&["a", "b", "c"]).await;
    let tg = support::tidegate(&hash_config(&b, "header:X-User-Id", Some(0.0))).await;
    let mut held = Vec::new();
    let mut hot = Vec::new();
    for i in 0..120 {
        let key = if i % 10 == 9 { format!("cold-{i}") } else { "hot".to_string() };
        let (s, r) = tunnel(tg.addr, None, &[("x-user-id", &key)]).await;
        if key == "hot" {
            hot.push(r.ok().to_string());
        }
        held.push(s);
    }
    let n = count(&hot);
    println!("hash bounded_load 0, hot key's 108 tunnels: {n:?}");
    assert_eq!(n.len(), 1, "without bounded loads one key must reach one server: {n:?}");
    drop(held);
    tg.stop().await;
}

/// 400 keys over 4 servers, then a second instance with 3 of them: only the removed server's
/// keys move. As for ip_hash, the removed server is the one with the fewest keys, since which
/// server owns how much of the ring depends on the random backend ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_removing_one_of_four_servers_moves_only_its_keys() {
    let b = Backends::start(&["a", "b", "c", "d"]).await;
    let tg1 = support::tidegate(&hash_config(&b, "header:X-User-Id", Some(0.0))).await;
    let keys: Vec<String> = (0..400).map(|i| format!("user-{i}")).collect();
    async fn place(to: SocketAddr, keys: &[String]) -> Vec<String> {
        let mut c = Http::connect(to, None).await;
        let mut v = Vec::new();
        for k in keys {
            v.push(c.get("/", &[("x-user-id", k)]).await.ok().to_string());
        }
        v
    }
    let first = place(tg1.addr, &keys).await;
    let per_server = count(&first);
    println!("hash: 400 keys over 4 servers: {per_server:?}");
    assert_eq!(per_server.len(), 4, "{per_server:?}");
    assert!(per_server.values().all(|&k| k >= 40), "a very uneven spread: {per_server:?}");
    let removed = per_server.iter().min_by_key(|(_, k)| **k).map(|(s, _)| s.clone()).unwrap();
    let kept: Vec<String> = b.names.iter().filter(|n| **n != removed).map(|n| srv(b.addr(n), "")).collect();
    let table = "[upstream.app.hash]\nkey = \"header:X-User-Id\"\nbounded_load = 0.0\n";
    let tg2 = support::tidegate(&config("", r#"balance = "hash""#, &kept, table)).await;
    let second = place(tg2.addr, &keys).await;
    let mut moved = 0;
    for (i, k) in keys.iter().enumerate() {
        if first[i] != second[i] {
            assert_eq!(first[i], removed, "key {k} moved from {} to {} though {} is still there", first[i], second[i], first[i]);
            moved += 1;
        }
    }
    let frac = f64::from(moved) / 400.0;
    println!("hash: removed {removed}; moved {moved} of 400 keys ({:.1} %)", frac * 100.0);
    assert!(frac <= 0.30, "removing 1 of 4 servers moved {:.1} % of keys (> 25 % + 5 %)", frac * 100.0);
    tg1.stop().await;
    tg2.stop().await;
}

// ---------------------------------------------------------------------------------------------
// max_conns, 503, backup
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_skips_a_server_at_max_conns() {
    let b = Backends::start(&["a", "b", "c"]).await;
    let servers = [srv(b.addr("a"), "max_conns = 1"), srv(b.addr("b"), ""), srv(b.addr("c"), "")];
    let tg = support::tidegate(&config("", r#"balance = "round_robin""#, &servers, "")).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let (s, r) = tunnel(tg.addr, None, &[]).await;
        let on_a = r.ok() == "a";
        held.push(s);
        if on_a {
            break;
        }
    }
    assert_eq!(tg.live("app", b.addr("a")), 1, "round-robin never put a tunnel on a in 3 tries");
    let mut c = Http::connect(tg.addr, None).await;
    let mut got = Vec::new();
    for _ in 0..30 {
        got.push(c.get("/", &[]).await.ok().to_string());
    }
    for _ in 0..5 {
        let (s, r) = tunnel(tg.addr, None, &[]).await;
        got.push(r.ok().to_string());
        held.push(s);
    }
    let n = count(&got);
    assert_eq!(n.get("a"), None, "a is at max_conns = 1 but was picked: {n:?}");
    drop(held);
    tg.stop().await;
}

/// With bounded loads off, a key whose server is full moves to the next server on the ring,
/// the same one every time, and comes back once the server has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_skips_a_server_at_max_conns() {
    let b = Backends::start(&["a", "b", "c"]).await;
    let servers = [srv(b.addr("a"), "max_conns = 1"), srv(b.addr("b"), ""), srv(b.addr("c"), "")];
    let table = "[upstream.app.hash]\nkey = \"header:X-User-Id\"\nbounded_load = 0.0\n";
    let tg = support::tidegate(&config("", r#"balance = "hash""#, &servers, table)).await;
    let mut c = Http::connect(tg.addr, None).await;
    let mut key = None;
    for i in 0..100 {
        let k = format!("user-{i}");
        if c.get("/", &[("x-user-id", &k)]).await.ok() == "a" {
            key = Some(k);
            break;
        }
    }
    let key = key.expect("no key out of 100 hashes to a");
    let (held, r) = tunnel(tg.addr, None, &[("x-user-id", &key)]).await;
    assert_eq!(r.ok(), "a", "key {key} should reach a while it has room");
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(c.get("/", &[("x-user-id", &key)]).await.ok().to_string());
    }
    let n = count(&got);
    assert_eq!(n.get("a"), None, "a is at max_conns = 1 but was picked: {n:?}");
    assert_eq!(n.len(), 1, "a full server's key should move to one next server: {n:?}");
    drop(held);
    wait_idle(&tg, &[b.addr("a")]).await;
    assert_eq!(c.get("/", &[("x-user-id", &key)]).await.ok(), "a", "key {key} should return to a once it has room");
    tg.stop().await;
}

/// One balancer's TOML: keys before `servers`, and the tables after.
#[derive(Clone, Copy)]
struct Kind {
    name: &'static str,
    keys: &'static str,
    tables: &'static str,
}

const ROUND_ROBIN: Kind = Kind { name: "round_robin", keys: r#"balance = "round_robin""#, tables: "" };
const LEAST_CONN: Kind = Kind { name: "least_conn", keys: r#"balance = "least_conn""#, tables: "" };
const P2C: Kind = Kind { name: "p2c", keys: r#"balance = "p2c""#, tables: "" };
const IP_HASH: Kind = Kind { name: "ip_hash", keys: r#"balance = "ip_hash""#, tables: "" };
const HASH: Kind = Kind { name: "hash", keys: r#"balance = "hash""#, tables: "[upstream.app.hash]\nkey = \"header:X-User-Id\"\n" };
const COOKIE: Kind = Kind { name: "cookie", keys: r#"balance = "cookie""#, tables: "" };

/// Every server at max_conns = 1 holds a tunnel: a new request or upgrade gets 503 at once.
async fn all_full_is_503_at_once(kind: Kind) {
    let b = Backends::start(&["a", "b"]).await;
    let tg = support::tidegate(&config("", kind.keys, &b.servers("max_conns = 1"), kind.tables)).await;
    let (s1, r1) = tunnel(tg.addr, None, &[("x-user-id", "hold")]).await;
    let (s2, r2) = tunnel(tg.addr, None, &[("x-user-id", "hold")]).await;
    assert_ne!(r1.ok(), r2.ok(), "{}: the second tunnel went to the full server", kind.name);
    let start = Instant::now();
    let r = get_once(tg.addr, None, "/", &[("x-user-id", "user-1")]).await;
    let took = start.elapsed();
    assert_eq!(r.status, 503, "{}: every server full: {r:?}", kind.name);
    assert!(took < Duration::from_secs(1), "{}: 503 took {took:?}", kind.name);
    let start = Instant::now();
    let (_s, r) = upgrade(tg.addr, None, &[("x-user-id", "user-2")]).await;
    let took = start.elapsed();
    assert_eq!(r.status, 503, "{}: upgrade with every server full: {r:?}", kind.name);
    assert!(took < Duration::from_secs(1), "{}: 503 to an upgrade took {took:?}", kind.name);
    drop((s1, s2));
    tg.stop().await;
}

/// Primaries a and b (max_conns = 1), backup c. The backup takes nothing while a primary can
/// serve; everything once both primaries are full; nothing again once they have room; and
/// everything once both primaries are dead.
async fn backup_only_when_primaries_unavailable(kind: Kind) {
    let mut b = Backends::start(&["a", "b", "c"]).await;
    let servers = [srv(b.addr("a"), "max_conns = 1"), srv(b.addr("b"), "max_conns = 1"), srv(b.addr("c"), "backup = true")];
    // No pooled connections: killed backends must not keep answering over an old one.
    let keys = format!("{}\nkeepalive = 0", kind.keys);
    let tg = support::tidegate(&config("", &keys, &servers, kind.tables)).await;
    let name = kind.name;
    let to = tg.addr;
    // Each request from its own client address and with its own key (ip_hash and hash).
    let ask = |i: u32| async move { get_once(to, Some(lo(2 + i)), "/", &[("x-user-id", &format!("user-{i}"))]).await };

    let mut got = Vec::new();
    for i in 0..20 {
        got.push(ask(i).await.ok().to_string());
    }
    let n = count(&got);
    assert_eq!(n.get("c"), None, "{name}: backup used while both primaries are available: {n:?}");

    // Both primaries full.
    let (s1, r1) = tunnel(tg.addr, None, &[("x-user-id", "hold")]).await;
    let (s2, r2) = tunnel(tg.addr, None, &[("x-user-id", "hold")]).await;
    let primaries = BTreeSet::from([r1.ok().to_string(), r2.ok().to_string()]);
    assert_eq!(primaries, BTreeSet::from(["a".to_string(), "b".to_string()]), "{name}: two tunnels should fill both primaries");
    let mut backup_cookie = None;
    for i in 20..30 {
        let r = ask(i).await;
        assert_eq!(r.ok(), "c", "{name}: both primaries full, request {i} should go to the backup");
        backup_cookie = backup_cookie.or(r.cookie("tg_srv"));
    }

    // Room again on the primaries: the backup is left alone.
    drop((s1, s2));
    wait_idle(&tg, &[b.addr("a"), b.addr("b")]).await;
    let mut got = Vec::new();
    for i in 30..50 {
        got.push(ask(i).await.ok().to_string());
    }
    let n = count(&got);
    assert_eq!(n.get("c"), None, "{name}: backup used after the primaries had room again: {n:?}");
    if let Some(v) = backup_cookie {
        // A cookie naming the backup is not honoured while a primary can serve.
        for _ in 0..4 {
            let r = get_once(tg.addr, None, "/", &[("cookie", &format!("tg_srv={v}"))]).await;
            assert_ne!(r.ok(), "c", "{name}: the backup's cookie was honoured while primaries are available");
            assert!(r.cookie("tg_srv").is_some(), "{name}: a rebalanced backup cookie should be re-set: {r:?}");
        }
    }

    // Both primaries dead.
    b.kill("a").await;
    b.kill("b").await;
    for i in 50..60 {
        assert_eq!(ask(i).await.ok(), "c", "{name}: both primaries dead, request {i} should go to the backup");
    }
    tg.stop().await;
}

macro_rules! per_balancer {
    ($helper:ident: $($test:ident => $kind:expr),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                $helper($kind).await;
            }
        )*
    };
}

per_balancer!(all_full_is_503_at_once:
    all_full_503_round_robin => ROUND_ROBIN,
    all_full_503_least_conn => LEAST_CONN,
    all_full_503_p2c => P2C,
    all_full_503_ip_hash => IP_HASH,
    all_full_503_hash => HASH,
    all_full_503_cookie => COOKIE,
);

per_balancer!(backup_only_when_primaries_unavailable:
    backup_round_robin => ROUND_ROBIN,
    backup_least_conn => LEAST_CONN,
    backup_p2c => P2C,
    backup_ip_hash => IP_HASH,
    backup_hash => HASH,
    backup_cookie => COOKIE,
);
