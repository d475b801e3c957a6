//! Layer 4 end to end: `tcp` listeners (plain and TLS-terminating) with every balancer that
//! works without HTTP, least_conn over long-lived connections, failover, idle timeout,
//! half-close, `tls_passthrough` routed by SNI (real rustls clients and servers), refused
//! ClientHellos, PROXY protocol sent (tcp and HTTP upstreams, v1 and v2, IPv4 and IPv6) and
//! received (trusted peers only, malformed headers refused), and live counts after churn.
//!
//! Everything listens on 127.0.0.1 (or [::1]) port 0; backends are small raw servers written
//! here; every wait is bounded.

mod support;

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{HeaderMap, Request, Response, Uri};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::ClientConfig;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tidegate::proxy_protocol::{Header, Parsed, V2_SIG};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Upper bound for any single wait in this file.
const IO: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(IO, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {IO:?}: {what}"),
    }
}

fn addr_of(tg: &support::Proxy, listener: &str) -> SocketAddr {
    tg.addrs.iter().find(|(n, _)| n == listener).unwrap_or_else(|| panic!("no listener {listener}: {:?}", tg.addrs)).1
}

fn servers(addrs: &[SocketAddr]) -> String {
    let list: Vec<String> = addrs.iter().map(|a| format!("{{ addr = \"{a}\" }}")).collect();
    format!("servers = [{}]", list.join(", "))
}

fn ipv6_available() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

/// Writes `data`, reads the same number of bytes back and checks they are the same.
async fn roundtrip(s: &mut TcpStream, data: &[u8]) {
    within("echo round trip", async {
        s.write_all(data).await.expect("write to tidegate");
        let mut back = vec![0u8; data.len()];
        s.read_exact(&mut back).await.expect("read echo back");
        assert_eq!(back, data, "echo differs");
    })
    .await
}

async fn connect(addr: SocketAddr) -> TcpStream {
    within("connect", TcpStream::connect(addr)).await.expect("connect to tidegate")
}

/// Connects from `source` (any port).
async fn connect_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    let sock = if source.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.expect("socket");
    sock.bind(SocketAddr::new(source, 0)).expect("bind client source");
    within("connect", sock.connect(addr)).await.expect("connect to tidegate")
}

/// Reads until EOF or a read error (a reset counts as closed). `Err(bytes)` when `limit`
/// passes first; `Ok((bytes, elapsed))` otherwise.
async fn read_to_close<S: AsyncRead + Unpin>(s: &mut S, limit: Duration) -> Result<(Vec<u8>, Duration), Vec<u8>> {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok((out, start.elapsed())),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return Err(out),
        }
    }
}

/// Polls `f` until it is true or `limit` passes; returns the last value.
async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The backend tidegate's own balancer picks for client `ip` (no headers; deterministic for
/// ip_hash), to check placement against.
fn predicted(tg: &support::Proxy, upstream: &str, ip: IpAddr) -> SocketAddr {
    let rt = tg.shared.runtime.load();
    let u = rt.upstreams.iter().find(|u| u.name() == upstream).expect("upstream exists");
    let headers = HeaderMap::new();
    let uri = Uri::from_static("/");
    let cx = tidegate::balancer::PickCtx {
        client: ip,
        headers: &headers,
        uri: &uri,
        tried: &[],
        now_ms: tidegate::runtime::now_ms(),
        ignore_health: false,
    };
    let i = u.balancer.pick(&u.backends, &cx).expect("a backend for the client").index;
    u.backends[i].addr()
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol reading (backends) and writing (clients)
// ---------------------------------------------------------------------------------------------

/// Reads a PROXY header off `s` (peek, parse with tidegate's parser, then consume exactly the
/// header): (raw bytes, header).
async fn read_proxy(s: &mut TcpStream) -> Result<(Vec<u8>, Header), String> {
    let deadline = Instant::now() + IO;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tokio::time::timeout(IO, s.peek(&mut buf)).await.map_err(|_| "no bytes".to_string())?.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before a PROXY header".into());
        }
        match tidegate::proxy_protocol::parse(&buf[..n]) {
            Parsed::Done(h, len) => {
                let mut raw = vec![0u8; len];
                s.read_exact(&mut raw).await.map_err(|e| e.to_string())?;
                return Ok((raw, h));
            }
            Parsed::Invalid(why) => return Err(format!("{why}: {:?}", String::from_utf8_lossy(&buf[..n.min(64)]))),
            Parsed::Incomplete if Instant::now() > deadline => return Err("PROXY header incomplete".into()),
            Parsed::Incomplete => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {proto} {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port()).into_bytes()
}

/// A v2 header: version 2 with `command` (0 LOCAL, 1 PROXY), address family byte `fam`,
/// then `body` (addresses and TLVs); the length field is `body.len()`.
fn v2_raw(command: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let mut out = V2_SIG.to_vec();
    out.push(0x20 | command);
    out.push(fam);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn v2_inet_body(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else { panic!("IPv4 only") };
    let mut b = s.octets().to_vec();
    b.extend_from_slice(&d.octets());
    b.extend_from_slice(&src.port().to_be_bytes());
    b.extend_from_slice(&dst.port().to_be_bytes());
    b
}

fn v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    v2_raw(1, 0x11, &v2_inet_body(src, dst))
}

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

/// A PROXY header a backend received: (raw bytes, parsed).
type Seen = (Vec<u8>, Header);

/// A raw TCP echo server: counts connections, keeps the first bytes of each, and optionally
/// reads (and records) a PROXY header first. At the client's EOF it echoes what is left and
/// closes its side.
struct Echo {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    /// First bytes (up to 4 KiB) each connection carried after any PROXY header.
    firsts: Arc<Mutex<Vec<Vec<u8>>>>,
    /// PROXY headers received: (raw, parsed).
    proxy: Arc<Mutex<Vec<Seen>>>,
    /// PROXY headers that failed to parse.
    proxy_errors: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
    fn headers(&self) -> Vec<Seen> {
        self.proxy.lock().unwrap().clone()
    }
}

struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn echo(expect_proxy: bool) -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo server");
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let firsts = Arc::new(Mutex::new(Vec::new()));
    let proxy = Arc::new(Mutex::new(Vec::new()));
    let proxy_errors = Arc::new(Mutex::new(Vec::new()));
    let (a, o, f, p, pe) = (accepted.clone(), open.clone(), firsts.clone(), proxy.clone(), proxy_errors.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { continue };
            a.fetch_add(1, Ordering::SeqCst);
            o.fetch_add(1, Ordering::SeqCst);
            let guard = OpenGuard(o.clone());
            let (f, p, pe) = (f.clone(), p.clone(), pe.clone());
            tokio::spawn(async move {
                let _guard = guard;
                if expect_proxy {
                    match read_proxy(&mut s).await {
                        Ok(h) => p.lock().unwrap().push(h),
                        Err(e) => {
                            pe.lock().unwrap().push(e);
                            return;
                        }
                    }
                }
                let idx = {
                    let mut f = f.lock().unwrap();
                    f.push(Vec::new());
                    f.len() - 1
                };
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => {
                            let _ = s.shutdown().await;
                            break;
                        }
                        Ok(n) => {
                            {
                                let mut f = f.lock().unwrap();
                                let first = &mut f[idx];
                                let room = 4096usize.saturating_sub(first.len()).min(n);
                                first.extend_from_slice(&buf[..room]);
                            }
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
            });
        }
    });
    Echo { addr, accepted, open, firsts, proxy, proxy_errors, task }
}

/// An HTTP/1.1 backend (hyper) answering every request with its name; records each
/// request's headers and, when `expect_proxy`, the PROXY header of each connection.
struct HttpRec {
    name: &'static str,
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    proxy: Arc<Mutex<Vec<Seen>>>,
    heads: Arc<Mutex<Vec<HeaderMap>>>,
    task: JoinHandle<()>,
}

impl Drop for HttpRec {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpRec {
    fn heads(&self) -> Vec<HeaderMap> {
        self.heads.lock().unwrap().clone()
    }
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn http_rec(name: &'static str, expect_proxy: bool) -> HttpRec {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind HTTP backend");
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let proxy = Arc::new(Mutex::new(Vec::new()));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let (a, p, h) = (accepted.clone(), proxy.clone(), heads.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { continue };
            a.fetch_add(1, Ordering::SeqCst);
            let (p, h) = (p.clone(), h.clone());
            tokio::spawn(async move {
                if expect_proxy {
                    match read_proxy(&mut s).await {
                        Ok(x) => p.lock().unwrap().push(x),
                        Err(e) => return eprintln!("{name}: bad PROXY header from tidegate: {e}"),
                    }
                }
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    h.lock().unwrap().push(req.headers().clone());
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(name.as_bytes())))) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    HttpRec { name, addr, accepted, proxy, heads, task }
}

/// Sends `prefix` then `GET / HTTP/1.1` (Connection: close, plus `extra` header lines) and
/// reads to EOF: the response text ("" when tidegate closed without answering).
async fn http_exchange(s: &mut TcpStream, prefix: &[u8], extra: &str) -> String {
    let mut msg = prefix.to_vec();
    msg.extend_from_slice(format!("GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n").as_bytes());
    let _ = s.write_all(&msg).await; // tidegate may already have closed
    match read_to_close(s, IO).await {
        Ok((b, _)) => String::from_utf8_lossy(&b).into_owned(),
        Err(b) => panic!("connection neither answered nor closed within {IO:?}; got {:?}", String::from_utf8_lossy(&b)),
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates and TLS (as in tests/tls.rs)
// ---------------------------------------------------------------------------------------------

static SEQ: AtomicUsize = AtomicUsize::new(0);
const DAY: u64 = 86_400;

struct Leaf {
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
    key_der: PrivateKeyDer<'static>,
}

struct Pki {
    dir: PathBuf,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn set_validity(params: &mut CertificateParams) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(now - DAY);
    params.not_after = epoch + Duration::from_secs(now + 365 * DAY);
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("tidegate-l4-{}-{}-{tag}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("tidegate l4 test CA {tag}"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params);
        let key = KeyPair::generate().expect("CA key");
        let ca = params.self_signed(&key).expect("CA self-signed");
        Pki { dir, ca_der: ca.der().clone(), issuer: Issuer::new(params, key) }
    }

    /// An ECDSA leaf for `names` (DNS names or IP addresses) signed by this CA.
    fn leaf(&self, stem: &str, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, names[0].clone());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params);
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let cert_path = self.dir.join(format!("{stem}.crt"));
        let key_path = self.dir.join(format!("{stem}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        let key_der = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).expect("key PEM");
        Leaf { cert: cert_path, key: key_path, der: cert.der().clone(), key_der }
    }

    /// A client trusting only this CA.
    fn client(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add root");
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(cfg)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn server_tls(leaf: &Leaf) -> Arc<rustls::ServerConfig> {
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der.clone()], leaf.key_der.clone_key())
        .expect("server cert");
    Arc::new(cfg)
}

fn dns(name: &str) -> ServerName<'static> {
    ServerName::try_from(name.to_string()).expect("valid DNS name")
}

/// The IP address as the name: rustls sends no SNI for it.
fn no_sni() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::from([127, 0, 0, 1]).into())
}

async fn tls_connect(
    addr: SocketAddr,
    name: ServerName<'static>,
    cfg: Arc<ClientConfig>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let fut = async {
        let tcp = TcpStream::connect(addr).await?;
        TlsConnector::from(cfg).connect(name, tcp).await
    };
    tokio::time::timeout(IO, fut).await.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS connect timed out"))?
}

/// A TLS server (tokio-rustls) that greets with `NAME sni=SNI\n` after the handshake, then
/// echoes.
struct TlsEcho {
    addr: SocketAddr,
    der: CertificateDer<'static>,
    handshakes: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for TlsEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tls_echo(name: &'static str, leaf: &Leaf) -> TlsEcho {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind TLS server");
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server_tls(leaf));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let h = handshakes.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let (acceptor, h) = (acceptor.clone(), h.clone());
            tokio::spawn(async move {
                let Ok(Ok(mut tls)) = tokio::time::timeout(IO, acceptor.accept(tcp)).await else { return };
                h.fetch_add(1, Ordering::SeqCst);
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_string();
                if tls.write_all(format!("{name} sni={sni}\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tls.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    TlsEcho { addr, der: leaf.der.clone(), handshakes, task }
}

/// A client stream whose first `split` bytes go out alone, 100 ms before the rest.
struct SlowStart {
    inner: TcpStream,
    split: usize,
    written: usize,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for SlowStart {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SlowStart {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.written < this.split {
            let n = buf.len().min(this.split - this.written);
            let r = std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_write(cx, &buf[..n]))?;
            this.written += r;
            if this.written >= this.split {
                this.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
            }
            return std::task::Poll::Ready(Ok(r));
        }
        if let Some(p) = this.pause.as_mut() {
            std::task::ready!(p.as_mut().poll(cx));
            this.pause = None;
        }
        std::pin::Pin::new(&mut this.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads one `\n`-terminated line.
async fn read_line<S: AsyncRead + Unpin>(s: &mut S) -> String {
    within("a line", async {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            let n = s.read(&mut b).await.expect("read line");
            assert!(n == 1, "EOF before the end of the line: {:?}", String::from_utf8_lossy(&line));
            if b[0] == b'\n' {
                return String::from_utf8(line).expect("UTF-8 line");
            }
            line.push(b[0]);
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 1. Every TCP balancer echoes (4 MiB too); HTTP-only balancers are refused on layer 4
// ---------------------------------------------------------------------------------------------

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// Sends `data` and reads the echo concurrently (so neither side's buffers fill up).
async fn big_roundtrip(addr: SocketAddr, data: Arc<Vec<u8>>) {
    let s = connect(addr).await;
    let (mut r, mut w) = s.into_split();
    let d = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&d).await.expect("write payload");
        w.shutdown().await.expect("shutdown write");
    });
    let (back, _) =
        read_to_close(&mut r, Duration::from_secs(20)).await.unwrap_or_else(|b| panic!("echo of 4 MiB incomplete: {} bytes", b.len()));
    within("writer", writer).await.expect("writer task");
    assert_eq!(back.len(), data.len(), "echoed length");
    assert!(back == *data, "echoed bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tcp_balancer_echoes_bytes_including_4_mib() {
    let big = Arc::new(pattern(4 * 1024 * 1024));
    for (balance, extra) in
        [("round_robin", ""), ("least_conn", ""), ("p2c", ""), ("ip_hash", ""), ("hash", "  [upstream.app.hash]\n  key = \"ip\"\n")]
    {
        let (a, b) = (echo(false).await, echo(false).await);
        let toml = format!(
            "shutdown_timeout = \"2s\"\n\n[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"app\"\n\n\
             [upstream.app]\nbalance = \"{balance}\"\n{}\n{extra}",
            servers(&[a.addr, b.addr])
        );
        let tg = support::tidegate(&toml).await;
        for i in 0..6 {
            let mut s = connect(tg.addr).await;
            let msg = format!("{balance} message {i} ").repeat(64);
            roundtrip(&mut s, msg.as_bytes()).await;
            roundtrip(&mut s, b"second write on the same connection").await;
        }
        big_roundtrip(tg.addr, big.clone()).await;
        let counts = [a.accepted(), b.accepted()];
        assert_eq!(counts.iter().sum::<usize>(), 7, "{balance}: every connection reached one server: {counts:?}");
        match balance {
            "round_robin" | "least_conn" => assert!(counts.iter().all(|&c| c >= 2), "{balance} spreads sequential connections: {counts:?}"),
            "ip_hash" | "hash" => assert!(counts.contains(&7), "{balance}: one client address, one server: {counts:?}"),
            _ => {}
        }
        tg.stop().await;
    }
}

#[test]
fn http_only_balancers_are_refused_on_layer_4_listeners() {
    let cases = [
        ("balance = \"cookie\"\n", "balance = \"cookie\" needs HTTP"),
        (
            "balance = \"hash\"\n  [upstream.app.hash]\n  key = \"header:x\"\n",
            "hash key \"header:x\" needs HTTP; only \"ip\" works for TCP",
        ),
    ];
    for (upstream, want) in cases {
        // On a tcp listener, on a tls_passthrough route, and (accepted) on an HTTP listener.
        let tcp = format!(
            "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"app\"\n\n[upstream.app]\nservers = [{{ addr = \"127.0.0.1:9\" }}]\n{upstream}"
        );
        let passthrough = format!(
            "[[listener]]\nname = \"p\"\nbind = \"127.0.0.1:0\"\nmode = \"tls_passthrough\"\n  [[listener.route]]\n  upstream = \"app\"\n\n\
             [upstream.app]\nservers = [{{ addr = \"127.0.0.1:9\" }}]\n{upstream}"
        );
        for (text, line) in [(&tcp, 5), (&passthrough, 6)] {
            let errors = match tidegate::config::load_str(text, Path::new("l4.toml")) {
                Ok(_) => panic!("accepted an HTTP-only balancer on a layer-4 listener:\n{text}"),
                Err(e) => e,
            };
            let msg = errors.to_string();
            assert!(
                errors.0.iter().any(|e| e.message.contains("upstream \"app\" is used by a layer-4 listener") && e.message.contains(want)),
                "{msg}"
            );
            assert!(msg.contains("use round_robin, least_conn, p2c, ip_hash or hash with key = \"ip\""), "{msg}");
            let e = errors.0.iter().find(|e| e.message.contains("layer-4")).unwrap();
            assert_eq!(e.line, line, "points at the listener's upstream reference: {msg}\n{text}");
        }
        let http = format!(
            "[[listener]]\nname = \"h\"\nbind = \"127.0.0.1:0\"\n  [[listener.route]]\n  upstream = \"app\"\n\n\
             [upstream.app]\nservers = [{{ addr = \"127.0.0.1:9\" }}]\n{upstream}"
        );
        if let Err(e) = tidegate::config::load_str(&http, Path::new("l4.toml")) {
            panic!("the same upstream behind an HTTP listener is fine, but:\n{e}\n{http}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. least_conn over long-lived connections
// ---------------------------------------------------------------------------------------------

fn lc_config(addrs: &[SocketAddr]) -> String {
    format!(
        "shutdown_timeout = \"2s\"\n\n[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"app\"\n\n\
         [upstream.app]\nbalance = \"least_conn\"\n{}\n",
        servers(addrs)
    )
}

#[tokio::test]
async fn least_conn_spreads_held_connections_evenly() {
    let echoes = [echo(false).await, echo(false).await, echo(false).await];
    let addrs: Vec<SocketAddr> = echoes.iter().map(|e| e.addr).collect();
    let tg = support::tidegate(&lc_config(&addrs)).await;
    let mut held = Vec::new();
    for i in 0..30 {
        let mut s = connect(tg.addr).await;
        roundtrip(&mut s, format!("conn {i}").as_bytes()).await;
        held.push(s);
    }
    let open: Vec<usize> = echoes.iter().map(Echo::open).collect();
    assert_eq!(open, [10, 10, 10], "connections held per server");
    let live: Vec<u32> = addrs.iter().map(|&a| tg.live("app", a)).collect();
    assert_eq!(live, [10, 10, 10], "tidegate's live counts");

    // All closed: counts back to 0, and nine more spread 3/3/3.
    let before = echoes[0].accepted();
    drop(held);
    assert!(eventually(IO, || addrs.iter().all(|&a| tg.live("app", a) == 0)).await, "live counts back to 0 after closing all");
    assert!(eventually(IO, || echoes.iter().all(|e| e.open() == 0)).await, "servers saw every close");
    let mut again = Vec::new();
    for _ in 0..9 {
        let mut s = connect(tg.addr).await;
        roundtrip(&mut s, b"x").await;
        again.push(s);
    }
    assert_eq!(echoes.iter().map(Echo::open).collect::<Vec<_>>(), [3, 3, 3]);
    assert_eq!(echoes[0].accepted(), before + 3);
    // Shutdown closes held TCP connections (plainly: no bytes added).
    let readers: Vec<_> =
        again.into_iter().map(|mut s| tokio::spawn(async move { read_to_close(&mut s, Duration::from_secs(4)).await })).collect();
    tg.stop().await;
    for r in readers {
        let (got, _) = within("reader", r).await.unwrap().expect("closed by shutdown");
        assert!(got.is_empty(), "nothing written into a TCP stream at shutdown: {got:?}");
    }
    assert!(eventually(IO, || echoes.iter().all(|e| e.open() == 0)).await);
}

#[tokio::test]
async fn least_conn_sends_new_connections_away_from_a_loaded_server() {
    let echoes = [echo(false).await, echo(false).await, echo(false).await];
    let addrs: Vec<SocketAddr> = echoes.iter().map(|e| e.addr).collect();
    // Only A at first: 20 connections pile up there.
    let tg = support::tidegate(&lc_config(&addrs[..1])).await;
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = connect(tg.addr).await;
        roundtrip(&mut s, b"on A").await;
        held.push(s);
    }
    assert_eq!(echoes[0].open(), 20);
    assert_eq!(tg.live("app", addrs[0]), 20);
    // B and C join (hot reload keeps A's live count): the next 20 go to B and C only.
    let cfg = tidegate::config::load_str(&lc_config(&addrs), Path::new("test.toml")).expect("reload config");
    tg.shared.apply(cfg).expect("reload applied");
    for i in 0..20 {
        let mut s = connect(tg.addr).await;
        roundtrip(&mut s, format!("new {i}").as_bytes()).await;
        held.push(s);
    }
    let open: Vec<usize> = echoes.iter().map(Echo::open).collect();
    assert_eq!(open, [20, 10, 10], "new connections avoid the loaded server");
    assert_eq!(addrs.iter().map(|&a| tg.live("app", a)).collect::<Vec<_>>(), [20, 10, 10]);
    // B and C catch up to 20 each; then A takes its share again.
    for _ in 0..23 {
        let mut s = connect(tg.addr).await;
        roundtrip(&mut s, b"level").await;
        held.push(s);
    }
    assert_eq!(echoes.iter().map(Echo::open).collect::<Vec<_>>(), [21, 21, 21]);
    drop(held);
    assert!(eventually(IO, || addrs.iter().all(|&a| tg.live("app", a) == 0)).await);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Failover on a refused connect
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn failover_when_a_server_refuses() {
    let live = echo(false).await;
    for order in ["dead first", "live first"] {
        let dead = support::dead_addr().await;
        let list = if order == "dead first" { [dead, live.addr] } else { [live.addr, dead] };
        for balance in ["round_robin", "least_conn"] {
            let toml = format!(
                "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"app\"\n\n\
                 [upstream.app]\nbalance = \"{balance}\"\n{}\n  [upstream.app.timeouts]\n  connect = \"1s\"\n",
                servers(&list)
            );
            let tg = support::tidegate(&toml).await;
            for i in 0..10 {
                let mut s = connect(tg.addr).await;
                roundtrip(&mut s, format!("{order} {balance} {i}").as_bytes()).await;
            }
            tg.stop().await;
        }
    }
    assert_eq!(live.accepted(), 40);

    // Nothing alive: the client is closed, promptly.
    let (d1, d2) = (support::dead_addr().await, support::dead_addr().await);
    let toml = format!(
        "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"app\"\n\n[upstream.app]\n{}\n",
        servers(&[d1, d2])
    );
    let tg = support::tidegate(&toml).await;
    let mut s = connect(tg.addr).await;
    let _ = s.write_all(b"anyone?").await;
    let (got, _) = read_to_close(&mut s, Duration::from_secs(3)).await.expect("closed when no server accepts");
    assert!(got.is_empty());
    assert_eq!((tg.live("app", d1), tg.live("app", d2)), (0, 0), "failed connects hold no live count");
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Idle timeout
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn idle_tcp_connection_is_closed_active_one_stays() {
    let e = echo(false).await;
    let toml = format!(
        "shutdown_timeout = \"2s\"\n[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"app\"\n\n\
         [upstream.app]\n{}\n  [upstream.app.timeouts]\n  connect = \"1s\"\n  tunnel_idle = \"300ms\"\n",
        servers(&[e.addr])
    );
    let tg = support::tidegate(&toml).await;

    let mut idle = connect(tg.addr).await;
    roundtrip(&mut idle, b"then silence").await;
    let mut active = connect(tg.addr).await;
    roundtrip(&mut active, b"chatty").await;

    let idle_task = tokio::spawn(async move { read_to_close(&mut idle, Duration::from_secs(2)).await });
    // The active one sends a byte every 100 ms for 1.5 s (five idle periods) and hears it back.
    for i in 0..15u8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        roundtrip(&mut active, &[b'a' + i]).await;
    }
    let (bytes, after) = within("idle task", idle_task).await.expect("task").expect("idle connection closed by tidegate within 2 s");
    assert!(bytes.is_empty(), "no bytes on the idle connection: {bytes:?}");
    assert!(after >= Duration::from_millis(250), "closed only after tunnel_idle (took {after:?})");
    // Still open: one more exchange works.
    roundtrip(&mut active, b"still here").await;
    // Now it goes quiet and is closed too.
    let (_, after) = read_to_close(&mut active, Duration::from_secs(2)).await.expect("closed once idle");
    assert!(after >= Duration::from_millis(250), "{after:?}");
    assert!(eventually(IO, || e.open() == 0 && tg.live("app", e.addr) == 0).await, "server side closed as well");
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Half-close
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn half_close_passes_through_both_ways() {
    // Server: reads to EOF, then answers with what it counted and closes.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let counter = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read to EOF");
        s.write_all(format!("got {} bytes", got.len()).as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(b"; bye").await.unwrap();
        s.shutdown().await.unwrap();
        got
    });
    // Server that half-closes first: a banner then EOF, then reads what the client still sends.
    let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let banner = l2.local_addr().unwrap();
    let server2 = tokio::spawn(async move {
        let (mut s, _) = l2.accept().await.unwrap();
        s.write_all(b"banner").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read to EOF");
        got
    });
    let toml = format!(
        "shutdown_timeout = \"2s\"\n\
         [[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"counter\"\n\
         [[listener]]\nname = \"b\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"banner\"\n\n\
         [upstream.counter]\n{}\n[upstream.banner]\n{}\n",
        servers(&[counter]),
        servers(&[banner])
    );
    let tg = support::tidegate(&toml).await;

    let mut s = connect(addr_of(&tg, "a")).await;
    let payload = pattern(100 * 1024);
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.expect("client shuts down its write side");
    let (reply, _) = read_to_close(&mut s, IO).await.expect("reply then EOF");
    assert_eq!(String::from_utf8_lossy(&reply), "got 102400 bytes; bye");
    let got = within("server", server).await.unwrap();
    assert!(got == payload, "server got the payload intact");

    let mut s = connect(addr_of(&tg, "b")).await;
    let mut buf = [0u8; 6];
    within("banner", s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"banner");
    let mut more = [0u8; 1];
    assert_eq!(within("EOF after banner", s.read(&mut more)).await.unwrap(), 0, "server's EOF reaches the client");
    s.write_all(b"after your EOF").await.expect("client can still write");
    s.shutdown().await.unwrap();
    assert_eq!(within("server2", server2).await.unwrap(), b"after your EOF");
    assert!(eventually(IO, || tg.live("counter", counter) == 0 && tg.live("banner", banner) == 0).await);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. TLS terminated on a tcp listener
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn tls_terminated_on_tcp_listener_backend_gets_plaintext() {
    let pki = Pki::new("term");
    let leaf = pki.leaf("localhost", &["localhost"]);
    let e = echo(false).await;
    let toml = format!(
        "shutdown_timeout = \"2s\"\n[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"app\"\n\
         \x20 [listener.tls]\n  certificates = [{{ cert = '{}', key = '{}' }}]\n\n[upstream.app]\n{}\n",
        leaf.cert.display(),
        leaf.key.display(),
        servers(&[e.addr])
    );
    let tg = support::tidegate(&toml).await;
    let mut tls = tls_connect(tg.addr, dns("localhost"), pki.client()).await.expect("TLS handshake with tidegate");
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap()[0], leaf.der, "tidegate's certificate");
    let hello = b"plaintext behind TLS\n";
    within("write", tls.write_all(hello)).await.unwrap();
    let mut back = vec![0u8; hello.len()];
    within("echo", tls.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, hello);
    // A bigger exchange, read while writing.
    let data = pattern(256 * 1024);
    let (mut r, mut w) = tokio::io::split(tls);
    let d = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&d).await.unwrap();
        w.shutdown().await.unwrap(); // close_notify, then the server side sees EOF
    });
    let (rest, _) = read_to_close(&mut r, IO).await.expect("echo then EOF");
    within("writer", writer).await.unwrap();
    assert!(rest == data, "256 KiB echoed through TLS ({} bytes back)", rest.len());
    let firsts = e.firsts.lock().unwrap().clone();
    assert_eq!(firsts.len(), 1);
    assert!(firsts[0].starts_with(hello), "backend got plaintext, not TLS records: {:?}", &firsts[0][..16.min(firsts[0].len())]);
    assert!(eventually(IO, || e.open() == 0).await, "backend saw EOF after close_notify");
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. tls_passthrough routed by SNI
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sni_passthrough_reaches_each_servers_own_certificate() {
    let pki = Pki::new("sni");
    let chat = pki.leaf("chat", &["chat.example.com"]);
    let api = pki.leaf("api", &["api.example.com", "mail.example.com"]);
    let dflt = pki.leaf("default", &["default.test", "unknown.test", "deep.api.example.com", "127.0.0.1"]);
    let (up1, up2, up3) = (tls_echo("up1", &chat).await, tls_echo("up2", &api).await, tls_echo("up3", &dflt).await);
    let routes = "  [[listener.route]]\n  sni = \"chat.example.com\"\n  upstream = \"up1\"\n\
                  \x20 [[listener.route]]\n  sni = \"*.example.com\"\n  upstream = \"up2\"\n\
                  \x20 [[listener.route]]\n  upstream = \"up3\"\n";
    let toml = format!(
        "shutdown_timeout = \"2s\"\n[[listener]]\nname = \"p\"\nbind = \"127.0.0.1:0\"\nmode = \"tls_passthrough\"\n{routes}\
         [[listener]]\nname = \"pp\"\nbind = \"127.0.0.1:0\"\nmode = \"tls_passthrough\"\naccept_proxy = true\n\
         trusted_proxies = [\"127.0.0.1\"]\n{routes}\n\
         [upstream.up1]\n{}\n[upstream.up2]\n{}\n[upstream.up3]\n{}\n",
        servers(&[up1.addr]),
        servers(&[up2.addr]),
        servers(&[up3.addr])
    );
    let tg = support::tidegate(&toml).await;
    let cases: [(ServerName<'static>, &TlsEcho, &str, &str); 7] = [
        (dns("chat.example.com"), &up1, "up1", "chat.example.com"),
        (dns("Chat.Example.COM"), &up1, "up1", "chat.example.com"),
        (dns("api.example.com"), &up2, "up2", "api.example.com"),
        (dns("mail.example.com"), &up2, "up2", "mail.example.com"),
        (dns("unknown.test"), &up3, "up3", "unknown.test"),
        (dns("deep.api.example.com"), &up3, "up3", "deep.api.example.com"),
        (no_sni(), &up3, "up3", "-"),
    ];
    for (name, server, want, want_sni) in cases {
        let what = format!("{name:?}");
        let mut tls = tls_connect(tg.addr, name, pki.client()).await.unwrap_or_else(|e| panic!("handshake for {what}: {e}"));
        let cert = tls.get_ref().1.peer_certificates().expect("server certificates")[0].clone();
        assert!(cert == server.der, "{what}: got the certificate of the wrong server");
        let greeting = read_line(&mut tls).await;
        assert_eq!(greeting.split(' ').next(), Some(want), "{what}: {greeting}");
        assert!(greeting.eq_ignore_ascii_case(&format!("{want} sni={want_sni}")), "{what}: server saw {greeting:?}");
        let msg = format!("data for {what}");
        within("write", tls.write_all(msg.as_bytes())).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        within("echo", tls.read_exact(&mut back)).await.unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    // A ClientHello arriving in two TCP segments 100 ms apart is waited for, then routed.
    let tcp = connect(tg.addr).await;
    let slow = SlowStart { inner: tcp, split: 40, written: 0, pause: None };
    let mut tls = within("TLS over a slow start", TlsConnector::from(pki.client()).connect(dns("chat.example.com"), slow))
        .await
        .expect("handshake with a split ClientHello");
    assert!(tls.get_ref().1.peer_certificates().unwrap()[0] == up1.der);
    assert_eq!(read_line(&mut tls).await, "up1 sni=chat.example.com");
    // Behind a trusted balancer: a PROXY header, then the ClientHello.
    let pp = addr_of(&tg, "pp");
    for (name, server, want) in [("api.example.com", &up2, "up2"), ("chat.example.com", &up1, "up1")] {
        let mut tcp = connect(pp).await;
        tcp.write_all(&v2(SocketAddr::new(IpAddr::from([203, 0, 113, 9]), 4000), pp)).await.unwrap();
        let mut tls = within("TLS after a PROXY header", TlsConnector::from(pki.client()).connect(dns(name), tcp))
            .await
            .unwrap_or_else(|e| panic!("{name} after a PROXY header: {e}"));
        assert!(tls.get_ref().1.peer_certificates().unwrap()[0] == server.der, "{name}");
        assert_eq!(read_line(&mut tls).await, format!("{want} sni={name}"));
    }
    let hs = [&up1, &up2, &up3].map(|s| s.handshakes.load(Ordering::SeqCst));
    assert_eq!(hs, [4, 3, 3]);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Bad or missing ClientHello
// ---------------------------------------------------------------------------------------------

/// A ClientHello declaring `hs_len` bytes of body, cut into records of at most `record`
/// bytes, padded with zeros up to `total` bytes on the wire.
fn fake_hello(hs_len: u32, record: usize, total: usize) -> Vec<u8> {
    let mut msg = vec![0x01];
    msg.extend_from_slice(&hs_len.to_be_bytes()[1..]);
    msg.extend_from_slice(&[0x03, 0x03]);
    let mut out = Vec::new();
    let mut pos = 0;
    while out.len() < total {
        let body = record.min(total - out.len()).saturating_sub(5).max(1);
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(body as u16).to_be_bytes());
        for k in 0..body {
            out.push(msg.get(pos + k).copied().unwrap_or(0));
        }
        pos += body;
    }
    out
}

#[tokio::test]
async fn bad_or_missing_client_hello_is_closed() {
    let pki = Pki::new("bad-hello");
    let leaf = pki.leaf("good", &["good.test"]);
    let server = tls_echo("good", &leaf).await;
    let toml = format!(
        "shutdown_timeout = \"2s\"\n[[listener]]\nname = \"p\"\nbind = \"127.0.0.1:0\"\nmode = \"tls_passthrough\"\n\
         \x20 [listener.timeouts]\n  header_read = \"300ms\"\n\
         \x20 [[listener.route]]\n  upstream = \"up\"\n\
         [[listener]]\nname = \"slow\"\nbind = \"127.0.0.1:0\"\nmode = \"tls_passthrough\"\n\
         \x20 [listener.timeouts]\n  header_read = \"10s\"\n\
         \x20 [[listener.route]]\n  upstream = \"up\"\n\n[upstream.up]\n{}\n",
        servers(&[server.addr])
    );
    let tg = support::tidegate(&toml).await;

    let mut n = 0;
    let good = async |n: usize| {
        let mut tls = tls_connect(tg.addr, dns("good.test"), pki.client()).await.expect("a good client still gets through");
        assert!(read_line(&mut tls).await.starts_with("good "));
        assert_eq!(server.handshakes.load(Ordering::SeqCst), n);
    };
    n += 1;
    good(n).await;

    let mut record_too_long = vec![0x16, 0x03, 0x01, 0x48, 0x01, 0x01, 0x00, 0x48, 0x00];
    record_too_long.resize(2000, 0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\x01\x02 this is not TLS at all \xff\xfe".to_vec()),
        ("plaintext HTTP", b"GET / HTTP/1.1\r\nHost: good.test\r\n\r\n".to_vec()),
        ("declared hello length 20 KiB", fake_hello(20 * 1024, 16 * 1024 + 5, 16 * 1024 + 5)),
        ("declared hello length 16 MiB", fake_hello(0xff_ffff, 1000, 1000)),
        ("record longer than TLS allows", record_too_long),
        ("hello that does not fit 16 KiB with its record headers", fake_hello(16_300, 105, 17 * 1024)),
        ("TLS alert instead of a hello", vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]),
        ("handshake that is not a ClientHello", vec![0x16, 0x03, 0x03, 0x00, 0x08, 0x02, 0x00, 0x00, 0x04, 0x03, 0x03, 0x00, 0x00]),
    ];
    // On a listener with header_read = 10s: refused as soon as seen, not by the deadline.
    let slow = addr_of(&tg, "slow");
    for (what, bytes) in cases {
        let mut s = connect(slow).await;
        let _ = s.write_all(&bytes).await;
        let res = read_to_close(&mut s, Duration::from_secs(2)).await;
        let (got, _) = res.unwrap_or_else(|b| panic!("{what}: not refused within 2 s ({} bytes back)", b.len()));
        assert!(got.is_empty(), "{what}: nothing comes back");
        n += 1;
        good(n).await;
    }

    // Nothing at all, and a hello cut short: closed after header_read (300 ms).
    let hello = {
        let mut c = rustls::ClientConnection::new(pki.client(), dns("good.test")).unwrap();
        let mut out = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut out).unwrap();
        }
        out
    };
    for (what, bytes) in [("silent client", Vec::new()), ("half a ClientHello", hello[..hello.len() / 2].to_vec())] {
        let mut s = connect(tg.addr).await;
        s.write_all(&bytes).await.unwrap();
        let (got, after) = read_to_close(&mut s, Duration::from_secs(2)).await.unwrap_or_else(|_| panic!("{what}: not closed within 2 s"));
        assert!(got.is_empty());
        assert!(after >= Duration::from_millis(250), "{what}: closed after header_read, not before ({after:?})");
    }
    n += 1;
    good(n).await;
    assert!(eventually(IO, || tg.live("up", server.addr) == 0).await);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 9. PROXY protocol sent to servers
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn proxy_protocol_sent_to_tcp_and_http_servers() {
    let v6 = ipv6_available();
    if !v6 {
        println!("note: [::1] cannot bind here; IPv6 PROXY headers not tested");
    }
    let (t1, t2) = (echo(true).await, echo(true).await);
    let (h1, h2) = (http_rec("h1", true).await, http_rec("h2", true).await);
    let mut listeners = String::new();
    let binds: &[&str] = if v6 { &["127.0.0.1:0", "[::1]:0"] } else { &["127.0.0.1:0"] };
    for (fam, bind) in binds.iter().enumerate() {
        for up in ["t1", "t2"] {
            listeners.push_str(&format!("[[listener]]\nname = \"{up}-{fam}\"\nbind = \"{bind}\"\nmode = \"tcp\"\nupstream = \"{up}\"\n"));
        }
        for up in ["h1", "h2"] {
            listeners.push_str(&format!(
                "[[listener]]\nname = \"{up}-{fam}\"\nbind = \"{bind}\"\n  [[listener.route]]\n  upstream = \"{up}\"\n"
            ));
        }
    }
    let toml = format!(
        "shutdown_timeout = \"2s\"\n{listeners}\n\
         [upstream.t1]\nsend_proxy = \"v1\"\n{}\n[upstream.t2]\nsend_proxy = \"v2\"\n{}\n\
         [upstream.h1]\nsend_proxy = \"v1\"\n{}\n[upstream.h2]\nsend_proxy = \"v2\"\n{}\n",
        servers(&[t1.addr]),
        servers(&[t2.addr]),
        servers(&[h1.addr]),
        servers(&[h2.addr])
    );
    let tg = support::tidegate(&toml).await;

    let check = |raw: &[u8], h: &Header, version: u8, client: SocketAddr, listener: SocketAddr, what: &str| {
        assert_eq!(*h, Header::Proxied { source: client, destination: listener }, "{what}");
        if version == 1 {
            assert_eq!(raw, v1(client, listener), "{what}: v1 line as HAProxy writes it");
        } else {
            assert_eq!(&raw[..12], &V2_SIG, "{what}");
            let (fam, len) = if client.is_ipv4() { (0x11, 12) } else { (0x21, 36) };
            assert_eq!(&raw[12..16], &[0x21, fam, 0, len], "{what}: version 2 PROXY, TCP over the client's family");
            assert_eq!(raw.len(), 16 + len as usize, "{what}");
        }
    };

    for fam in 0..binds.len() {
        for (up, version, server) in [("t1", 1, &t1), ("t2", 2, &t2)] {
            let listener = addr_of(&tg, &format!("{up}-{fam}"));
            for _ in 0..2 {
                let mut s = connect(listener).await;
                let client = s.local_addr().unwrap();
                roundtrip(&mut s, b"payload after the header").await;
                let hs = server.headers();
                let mine: Vec<_> = hs.iter().filter(|(_, h)| matches!(h, Header::Proxied { source, .. } if *source == client)).collect();
                assert_eq!(mine.len(), 1, "{up}: one header from {client}; all: {hs:?}");
                check(&mine[0].0, &mine[0].1, version, client, listener, up);
            }
        }
        for (up, version, server) in [("h1", 1, &h1), ("h2", 2, &h2)] {
            let listener = addr_of(&tg, &format!("{up}-{fam}"));
            for _ in 0..2 {
                let mut s = connect(listener).await;
                let client = s.local_addr().unwrap();
                let resp = http_exchange(&mut s, b"", "").await;
                assert!(resp.starts_with("HTTP/1.1 200"), "{up}: {resp}");
                assert!(resp.ends_with(server.name), "{up}: {resp}");
                let hs = server.proxy.lock().unwrap().clone();
                let mine: Vec<_> = hs.iter().filter(|(_, h)| matches!(h, Header::Proxied { source, .. } if *source == client)).collect();
                assert_eq!(mine.len(), 1, "{up}: one header from {client}; all: {hs:?}");
                check(&mine[0].0, &mine[0].1, version, client, listener, up);
            }
        }
    }
    assert!(t1.proxy_errors.lock().unwrap().is_empty() && t2.proxy_errors.lock().unwrap().is_empty());
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 10. PROXY protocol received from trusted balancers
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn proxy_protocol_received_from_trusted_peers_only() {
    let http = [http_rec("ha", false).await, http_rec("hb", false).await, http_rec("hc", false).await];
    let tcp = [echo(true).await, echo(true).await, echo(true).await];
    let haddrs: Vec<SocketAddr> = http.iter().map(|h| h.addr).collect();
    let taddrs: Vec<SocketAddr> = tcp.iter().map(|e| e.addr).collect();
    let toml = format!(
        "shutdown_timeout = \"2s\"\n\
         [[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\naccept_proxy = true\ntrusted_proxies = [\"127.0.0.1\"]\n\
         \x20 [listener.timeouts]\n  header_read = \"300ms\"\n  [[listener.route]]\n  upstream = \"web\"\n\
         [[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"raw\"\naccept_proxy = true\ntrusted_proxies = [\"127.0.0.1\"]\n\
         \x20 [listener.timeouts]\n  header_read = \"300ms\"\n\
         [[listener]]\nname = \"http-slow\"\nbind = \"127.0.0.1:0\"\naccept_proxy = true\ntrusted_proxies = [\"127.0.0.1\"]\n\
         \x20 [listener.timeouts]\n  header_read = \"10s\"\n  [[listener.route]]\n  upstream = \"web\"\n\
         [[listener]]\nname = \"tcp-slow\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"raw\"\naccept_proxy = true\ntrusted_proxies = [\"127.0.0.1\"]\n\
         \x20 [listener.timeouts]\n  header_read = \"10s\"\n\
         [[listener]]\nname = \"http-untrusted\"\nbind = \"127.0.0.1:0\"\naccept_proxy = true\ntrusted_proxies = [\"127.0.0.2\"]\n\
         \x20 [[listener.route]]\n  upstream = \"web\"\n\
         [[listener]]\nname = \"tcp-untrusted\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"raw\"\naccept_proxy = true\ntrusted_proxies = [\"127.0.0.2\"]\n\n\
         [upstream.web]\nbalance = \"ip_hash\"\n{}\n\
         [upstream.raw]\nbalance = \"ip_hash\"\nsend_proxy = \"v1\"\n{}\n",
        servers(&haddrs),
        servers(&taddrs)
    );
    let tg = support::tidegate(&toml).await;
    let (http_l, tcp_l) = (addr_of(&tg, "http"), addr_of(&tg, "tcp"));
    let name_at = |a: SocketAddr| http.iter().find(|h| h.addr == a).unwrap().name;
    let total_http = || http.iter().map(HttpRec::accepted).sum::<usize>();
    let total_tcp = || tcp.iter().map(Echo::accepted).sum::<usize>();
    let client = IpAddr::from([203, 0, 113, 9]);
    let want_http = name_at(predicted(&tg, "web", client));
    let want_tcp = predicted(&tg, "raw", client);

    // HTTP: v1, v2, v1 in two pieces, and a client-supplied X-Forwarded-For that must not count.
    let src = |port: u16| SocketAddr::new(client, port);
    let v1_split = v1(src(40002), http_l);
    let good_http: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        ("v1", vec![v1(src(40000), http_l)], ""),
        ("v2", vec![v2(src(40001), http_l)], ""),
        ("v1 in two writes", vec![v1_split[..20].to_vec(), v1_split[20..].to_vec()], ""),
        ("v1 with a spoofed X-Forwarded-For", vec![v1(src(40003), http_l)], "X-Forwarded-For: 6.6.6.6\r\n"),
        ("v2 with TLVs up to the length cap", vec![v2_at_cap(src(40004), http_l)], ""),
    ];
    for (what, pieces, extra) in good_http {
        let mut s = connect(http_l).await;
        let (last, first) = pieces.split_last().unwrap();
        for p in first {
            s.write_all(p).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let resp = http_exchange(&mut s, last, extra).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{what}: {resp:?}");
        assert!(resp.ends_with(want_http), "{what}: ip_hash placement follows 203.0.113.9 to {want_http}: {resp:?}");
        let h = http.iter().find(|h| h.name == want_http).unwrap().heads();
        let xff: Vec<_> = h.last().unwrap().get_all("x-forwarded-for").iter().map(|v| v.to_str().unwrap().to_string()).collect();
        assert_eq!(xff, ["203.0.113.9"], "{what}");
    }
    // A LOCAL header (the balancer's own health check): the socket's peer is the client.
    let mut s = connect(http_l).await;
    let resp = http_exchange(&mut s, &v2_raw(0, 0x00, &[]), "").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "LOCAL: {resp:?}");
    let all: Vec<HeaderMap> = http.iter().flat_map(HttpRec::heads).collect();
    assert!(all.iter().any(|h| h.get("x-forwarded-for").is_some_and(|v| v == "127.0.0.1")), "LOCAL uses the socket peer");
    // v1 UNKNOWN: the socket's peer too; v1 TCP6: the IPv6 client.
    let before = http.iter().map(|h| h.heads().len()).sum::<usize>();
    let mut s = connect(http_l).await;
    let resp = http_exchange(&mut s, b"PROXY UNKNOWN\r\n", "").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "UNKNOWN: {resp:?}");
    let six: SocketAddr = "[2001:db8::9]:40005".parse().unwrap();
    let mut s = connect(http_l).await;
    let resp = http_exchange(&mut s, &v1(six, "[2001:db8::1]:80".parse().unwrap()), "").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "TCP6: {resp:?}");
    let want6 = name_at(predicted(&tg, "web", six.ip()));
    assert!(resp.ends_with(want6), "TCP6 placement follows 2001:db8::9 to {want6}: {resp:?}");
    let all: Vec<HeaderMap> = http.iter().flat_map(HttpRec::heads).collect();
    assert_eq!(all.len(), before + 2);
    let xffs: Vec<&str> = all.iter().filter_map(|h| h.get("x-forwarded-for")?.to_str().ok()).collect();
    assert!(xffs.contains(&"2001:db8::9"), "{xffs:?}");
    assert_eq!(xffs.iter().filter(|v| **v == "127.0.0.1").count(), 2, "LOCAL and UNKNOWN: {xffs:?}");

    // TCP: v1 and v2 from 203.0.113.9; the server's own PROXY header carries that source.
    for (what, header, port) in [("v1", v1(src(5555), tcp_l), 5555), ("v2", v2(src(6666), tcp_l), 6666)] {
        for _ in 0..3 {
            let mut s = connect(tcp_l).await;
            s.write_all(&header).await.unwrap();
            roundtrip(&mut s, b"after the header").await;
            let server = tcp.iter().find(|e| e.addr == want_tcp).unwrap();
            let (_, h) = server.headers().last().cloned().expect("server got a header");
            assert_eq!(h, Header::Proxied { source: src(port), destination: tcp_l }, "{what}");
        }
    }
    assert_eq!(tcp.iter().find(|e| e.addr == want_tcp).unwrap().accepted(), 6, "placement follows 203.0.113.9");
    // Other sources spread over the servers (placement is not by the socket peer).
    let mut used = std::collections::BTreeSet::new();
    for k in 1..=16u8 {
        let ip = IpAddr::V4(Ipv4Addr::new(198, 51, 100, k));
        let mut s = connect(tcp_l).await;
        s.write_all(&v1(SocketAddr::new(ip, 1000), tcp_l)).await.unwrap();
        roundtrip(&mut s, b"x").await;
        let want = predicted(&tg, "raw", ip);
        let server = tcp.iter().find(|e| e.addr == want).unwrap();
        assert!(matches!(server.headers().last(), Some((_, Header::Proxied { source, .. })) if source.ip() == ip), "{ip} went to {want}");
        used.insert(want);
    }
    assert!(used.len() >= 2, "16 client addresses all on one server: {used:?}");

    // Untrusted peer: closed at once, nothing reaches a backend; from the trusted 127.0.0.2 it works.
    let (before_h, before_t) = (total_http(), total_tcp());
    for name in ["http-untrusted", "tcp-untrusted"] {
        let l = addr_of(&tg, name);
        let mut s = connect(l).await;
        let resp = http_exchange(&mut s, &v1(src(1234), l), "").await;
        assert_eq!(resp, "", "{name}: a PROXY header from an untrusted peer is refused");
        let mut s = connect(l).await;
        let resp = http_exchange(&mut s, b"", "").await;
        assert_eq!(resp, "", "{name}: and so is no header");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!((total_http(), total_tcp()), (before_h, before_t), "nothing reached a backend");
    let l = addr_of(&tg, "http-untrusted");
    let mut s = connect_from(IpAddr::from([127, 0, 0, 2]), l).await;
    let resp = http_exchange(&mut s, &v1(src(1235), l), "").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "127.0.0.2 is trusted there: {resp:?}");

    // Malformed headers: refused, no panic, nothing forwarded.
    let (before_h, before_t) = (total_http(), total_tcp());
    let mut long_v1 = b"PROXY TCP4 203.0.113.9 127.0.0.1 1 2".to_vec();
    long_v1.resize(110, b' ');
    long_v1.extend_from_slice(b"\r\n");
    let mut bad_sig = v2(src(1), http_l);
    bad_sig[11] = 0x0B;
    let mut past_cap = v2(src(1), http_l);
    past_cap[14..16].copy_from_slice(&1025u16.to_be_bytes());
    past_cap.resize(16 + 1025, 0);
    let mut max_len = v2(src(1), http_l);
    max_len[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    let mut bad_version = v2(src(1), http_l);
    bad_version[12] = 0x11;
    let mut no_crlf = b"PROXY ".to_vec();
    no_crlf.resize(200, b'1');
    let bad: Vec<(&str, Vec<u8>, bool)> = vec![
        ("truncated v1, then EOF", b"PROXY TCP4 203.0.113.9 ".to_vec(), true),
        ("truncated v2, then EOF", v2(src(1), http_l)[..20].to_vec(), true),
        ("v1 line over 107 bytes", long_v1, false),
        ("v1 without CRLF, 200 bytes", no_crlf, false),
        ("v1 with LF only", b"PROXY TCP4 203.0.113.9 127.0.0.1 1 2\n".to_vec(), false),
        ("v1 with a bad address", b"PROXY TCP4 203.0.113.999 127.0.0.1 1 2\r\n".to_vec(), false),
        ("bad v2 signature", bad_sig, false),
        ("v2 length past the cap", past_cap, false),
        ("v2 length 65535", max_len, false),
        ("v2 bad version", bad_version, false),
        ("v2 truncated addresses", v2_raw(1, 0x11, &[203, 0, 113, 9]), false),
        ("no header, plain HTTP", Vec::new(), false),
    ];
    // Truncated ones wait for header_read (300 ms); the rest go to listeners with
    // header_read = 10s and must be refused as soon as they are seen.
    for (short, slow) in [(http_l, addr_of(&tg, "http-slow")), (tcp_l, addr_of(&tg, "tcp-slow"))] {
        for (what, bytes, then_eof) in &bad {
            let l = if *then_eof { short } else { slow };
            let mut s = connect(l).await;
            let _ = s.write_all(bytes).await;
            if *then_eof {
                s.shutdown().await.unwrap();
            } else {
                let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n").await;
            }
            let (got, after) = read_to_close(&mut s, Duration::from_secs(2))
                .await
                .unwrap_or_else(|b| panic!("{what} on {l}: not closed within 2 s; got {:?}", String::from_utf8_lossy(&b)));
            assert_eq!(String::from_utf8_lossy(&got), "", "{what} on {l}: refused");
            if *then_eof {
                assert!(after >= Duration::from_millis(250), "{what}: closed by header_read ({after:?})");
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!((total_http(), total_tcp()), (before_h, before_t), "nothing forwarded for a bad header");
    // Still serving.
    let mut s = connect(http_l).await;
    let resp = http_exchange(&mut s, &v1(src(40100), http_l), "").await;
    assert!(resp.starts_with("HTTP/1.1 200") && resp.ends_with(want_http), "{resp:?}");
    let mut s = connect(tcp_l).await;
    s.write_all(&v2(src(40101), tcp_l)).await.unwrap();
    roundtrip(&mut s, b"still serving").await;
    drop(s);
    tg.stop().await;
}

/// A v2 PROXY header from `src` padded with a NOOP TLV to the largest length accepted.
fn v2_at_cap(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut body = v2_inet_body(src, dst);
    let room = tidegate::proxy_protocol::V2_MAX - 16 - body.len() - 3;
    body.push(0x04); // PP2_TYPE_NOOP
    body.extend_from_slice(&(room as u16).to_be_bytes());
    body.resize(body.len() + room, 0);
    let out = v2_raw(1, 0x11, &body);
    assert_eq!(out.len(), tidegate::proxy_protocol::V2_MAX);
    out
}

// ---------------------------------------------------------------------------------------------
// 11. Live counts after churn
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_counts_return_to_zero_after_mixed_closes() {
    let echoes = [echo(false).await, echo(false).await, echo(false).await];
    let addrs: Vec<SocketAddr> = echoes.iter().map(|e| e.addr).collect();
    let toml = format!(
        "shutdown_timeout = \"2s\"\n[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nupstream = \"app\"\n\n\
         [upstream.app]\nbalance = \"least_conn\"\n{}\n  [upstream.app.timeouts]\n  tunnel_idle = \"300ms\"\n",
        servers(&addrs)
    );
    let tg = support::tidegate(&toml).await;
    let addr = tg.addr;
    let mut set = JoinSet::new();
    for i in 0..200usize {
        set.spawn(async move {
            let mut s = connect(addr).await;
            if i % 4 != 3 {
                roundtrip(&mut s, format!("conn {i}").as_bytes()).await;
            }
            match i % 4 {
                0 => {
                    s.shutdown().await.unwrap();
                    read_to_close(&mut s, IO).await.expect("clean close");
                }
                // After a round trip (1) or before any byte (3): reset.
                1 | 3 => {
                    s.set_zero_linger().unwrap();
                    drop(s);
                }
                _ => {
                    let (_, after) = read_to_close(&mut s, Duration::from_secs(3)).await.expect("idle timeout closes it");
                    assert!(after >= Duration::from_millis(250), "{after:?}");
                }
            }
        });
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    while let Some(r) = within("client tasks", set.join_next()).await {
        r.expect("client task");
    }
    let zero = eventually(IO, || addrs.iter().all(|&a| tg.live("app", a) == 0)).await;
    let live: Vec<u32> = addrs.iter().map(|&a| tg.live("app", a)).collect();
    assert!(zero, "live counts after 200 connections: {live:?}");
    assert!(eventually(IO, || echoes.iter().all(|e| e.open() == 0)).await, "every server connection closed");
    let accepted: usize = echoes.iter().map(Echo::accepted).sum();
    assert!((150..=200).contains(&accepted), "150 with bytes, up to 50 resets before the connect: {accepted}");
    // And it still serves.
    let mut s = connect(tg.addr).await;
    roundtrip(&mut s, b"after churn").await;
    drop(s);
    tg.stop().await;
}
