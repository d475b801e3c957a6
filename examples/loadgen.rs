//! Load generator and bench backends for `benches/compare.sh`, in one binary.
//!
//!     cargo run --release --example loadgen -- backend --addr 127.0.0.1:19101
//!     cargo run --release --example loadgen -- backend-tcp --addr 127.0.0.1:19111
//!     cargo run --release --example loadgen -- http --url http://127.0.0.1:8080/ -c 50 -d 5
//!     cargo run --release --example loadgen -- http --url http://127.0.0.1:8080/ -c 10 -d 300 --count 20000
//!     cargo run --release --example loadgen -- ws-echo --url ws://127.0.0.1:8080/ -c 50 -s 64 -d 5
//!     cargo run --release --example loadgen -- ws-echo --url wss://127.0.0.1:8443/ -c 50 -s 64 -d 5
//!     cargo run --release --example loadgen -- ws-connect --url ws://127.0.0.1:8080/ -c 20 -d 5
//!     cargo run --release --example loadgen -- ws-bulk --url ws://127.0.0.1:8080/ -s 16777216 -n 4
//!     cargo run --release --example loadgen -- ws-idle --url ws://127.0.0.1:8080/ -n 1000 --hold 10 \
//!         --sources 127.0.0.2-127.0.0.50
//!     cargo run --release --example loadgen -- tls-handshake --addr 127.0.0.1:8443 -c 20 -d 5 \
//!         --sni ecdsa.bench.test
//!     cargo run --release --example loadgen -- tcp-bulk --addr 127.0.0.1:8090 -c 1 -b 268435456
//!     cargo run --release --example loadgen -- tcp-idle --addr 127.0.0.1:8090 -n 1000 --hold 10 \
//!         --sources 127.0.0.2-127.0.0.50
//!
//! Every load mode is bounded in count and time, stops by itself, and prints exactly one JSON
//! line on stdout (progress and errors go to stderr). `backend` (aliases `backend-http`,
//! `backend-ws`) answers every plain request with a 64-byte body and echoes WebSocket
//! messages; `backend-tcp` echoes raw TCP bytes; both run until killed. Targets and source
//! addresses must be in 127.0.0.0/8.
//!
//! TLS (`https://`, `wss://`, `tls-handshake`) is TLS 1.3 only, never resumes a session, offers
//! one key-exchange group (`--kx`, X25519 by default, so that every server negotiates the
//! same one) and accepts any server certificate: this is a bench tool pointed at self-signed
//! test certificates. The handshake signature is still verified, so the server does its whole
//! part of a full handshake. `--sni` sets the server name sent (default: none for an IP).
//!
//! The runtime gets one worker per CPU this process may run on (`taskset` is honoured); with
//! one CPU it is a current-thread runtime.

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
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
/// Read and write size of the raw TCP modes and of the TCP echo backend.
const TCP_CHUNK: usize = 64 << 10;
/// The bytes sent (and expected back) by each `tcp-idle` connection before it goes idle.
const TCP_PROBE: &[u8; 4] = b"ping";

#[derive(Parser)]
#[command(about = "tidegate bench load generator and backends (loopback only)")]
struct Cli {
    /// Runtime worker threads (default: the CPUs this process may run on).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// TLS: the server name to send (SNI); default none when the target is an IP address.
    #[arg(long, global = true)]
    sni: Option<String>,
    /// TLS: the one key-exchange group offered.
    #[arg(long, global = true, value_enum, default_value_t = Kx::X25519)]
    kx: Kx,
    #[command(subcommand)]
    mode: Mode,
}

/// The key-exchange group a TLS client offers (one, so every server agrees on the same).
#[derive(Clone, Copy, ValueEnum)]
enum Kx {
    X25519,
    P256,
    /// X25519MLKEM768 (post-quantum hybrid; OpenSSL before 3.5 does not have it).
    X25519mlkem768,
}

#[derive(Subcommand)]
enum Mode {
    /// HTTP/1.1 keep-alive server (64-byte body) and WebSocket echo; runs until killed.
    #[command(alias = "backend-http", alias = "backend-ws")]
    Backend {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// Raw TCP echo server (every byte back, EOF passed on); runs until killed.
    BackendTcp {
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
        /// Stop after this many operations in all (D still bounds the run).
        #[arg(long)]
        count: Option<u64>,
        /// Client source addresses, `127.0.0.2-127.0.0.50` or one address.
        #[arg(long)]
        sources: Option<String>,
    },
    /// C WebSocket connections (ws:// or wss://) each sending a message and awaiting its
    /// echo, back to back.
    WsEcho {
        #[arg(long)]
        url: String,
        #[arg(short = 'c', default_value_t = 50)]
        conns: usize,
        #[arg(short = 's', default_value_t = 64)]
        size: usize,
        #[arg(short = 'd', default_value_t = 5.0)]
        secs: f64,
        /// Stop after this many operations in all (D still bounds the run).
        #[arg(long)]
        count: Option<u64>,
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
        /// Stop after this many operations in all (D still bounds the run).
        #[arg(long)]
        count: Option<u64>,
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
    /// C loops of TCP connect, full TLS 1.3 handshake (never resumed), close, for D seconds.
    TlsHandshake {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(short = 'c', default_value_t = 20)]
        conns: usize,
        #[arg(short = 'd', default_value_t = 5.0)]
        secs: f64,
        #[arg(long)]
        sources: Option<String>,
    },
    /// C raw TCP connections each sending BYTES and reading their echo back, concurrently.
    TcpBulk {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(short = 'c', default_value_t = 1)]
        conns: usize,
        #[arg(short = 'b', default_value_t = 256 << 20)]
        bytes: u64,
        #[arg(long)]
        sources: Option<String>,
    },
    /// N idle TCP connections (each echoes 4 bytes once) held for SECS; `READY` on stderr
    /// once all are open.
    TcpIdle {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(short = 'n', default_value_t = 1000)]
        conns: usize,
        #[arg(long, default_value_t = 10.0)]
        hold: f64,
        #[arg(long)]
        sources: Option<String>,
        /// Connections being opened at once.
        #[arg(long, default_value_t = 64)]
        parallel: usize,
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
    let tls = TlsOpts { sni: cli.sni, kx: cli.kx };
    let line = rt.block_on(async move {
        match cli.mode {
            Mode::Backend { addr } => backend(addr).await,
            Mode::BackendTcp { addr } => backend_tcp(addr).await,
            Mode::Http { url, conns, secs, count, sources } => {
                http(Target::parse(&url, &tls), conns.max(1), run_time(secs), Quota::new(count), sources_arg(sources)).await
            }
            Mode::WsEcho { url, conns, size, secs, count, sources } => {
                ws_echo(Target::parse(&url, &tls), conns.max(1), size, run_time(secs), Quota::new(count), sources_arg(sources)).await
            }
            Mode::WsIdle { url, conns, hold, sources, parallel } => {
                ws_idle(Target::parse(&url, &tls), conns, run_time(hold), sources_arg(sources), parallel.max(1)).await
            }
            Mode::WsConnect { url, conns, secs, count, sources } => {
                ws_connect(Target::parse(&url, &tls), conns.max(1), run_time(secs), Quota::new(count), sources_arg(sources)).await
            }
            Mode::WsBulk { url, size, count } => ws_bulk(Target::parse(&url, &tls), size, count).await,
            Mode::TlsHandshake { addr, conns, secs, sources } => {
                tls_handshake(loopback(addr), &tls, conns.max(1), run_time(secs), sources_arg(sources)).await
            }
            Mode::TcpBulk { addr, conns, bytes, sources } => tcp_bulk(loopback(addr), conns.max(1), bytes, sources_arg(sources)).await,
            Mode::TcpIdle { addr, conns, hold, sources, parallel } => {
                tcp_idle(loopback(addr), conns, run_time(hold), sources_arg(sources), parallel.max(1)).await
            }
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
    /// `https://`, `wss://`: TLS first.
    tls: Option<TlsClient>,
}

impl Target {
    fn parse(url: &str, tls: &TlsOpts) -> Target {
        let uri: hyper::Uri = url.parse().unwrap_or_else(|e| fail(&format!("bad url {url:?}: {e}")));
        let scheme = uri.scheme_str().unwrap_or("");
        let (default_port, secure) = match scheme {
            "http" | "ws" => (80, false),
            "https" | "wss" => (443, true),
            _ => fail(&format!("url {url:?}: scheme must be http, https, ws or wss")),
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
        let addr = loopback(SocketAddr::new(ip, uri.port_u16().unwrap_or(default_port)));
        let authority = uri.authority().map_or_else(|| addr.to_string(), |a| a.to_string());
        let path = uri.path_and_query().map_or_else(|| "/".to_string(), |p| p.to_string());
        Target {
            addr,
            authority: HeaderValue::from_str(&authority).unwrap_or_else(|_| fail("bad authority")),
            path,
            url: url.to_string(),
            tls: secure.then(|| TlsClient::new(tls, addr.ip())),
        }
    }
}

/// Refuses anything outside 127.0.0.0/8 (and ::1).
fn loopback(addr: SocketAddr) -> SocketAddr {
    if !addr.ip().is_loopback() {
        fail(&format!("{addr}: load goes to loopback (127.0.0.0/8) only"));
    }
    addr
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

/// TCP connect, then the TLS handshake when the target has TLS.
async fn connect(t: &Target, src: Option<IpAddr>) -> Result<Conn, String> {
    let stream = tcp_connect(t.addr, src).await.map_err(|e| format!("connect {}: {e}", t.addr))?;
    match &t.tls {
        None => Ok(Conn::Tcp(stream)),
        Some(tls) => {
            let s = tls.connector.connect(tls.name.clone(), stream).await.map_err(|e| format!("TLS handshake {}: {e}", t.addr))?;
            Ok(Conn::Tls(Box::new(s)))
        }
    }
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(MAX_WS_MESSAGE)).max_frame_size(Some(MAX_WS_MESSAGE))
}

/// TCP connect (and TLS) and WebSocket handshake, within `OP_TIMEOUT`.
async fn ws_open(t: &Target, src: Option<IpAddr>, cfg: WebSocketConfig) -> Result<WebSocketStream<Conn>, String> {
    let open = async {
        let stream = connect(t, src).await?;
        let (ws, _) = tokio_tungstenite::client_async_with_config(t.url.as_str(), stream, Some(cfg))
            .await
            .map_err(|e| format!("handshake {}: {e}", t.url))?;
        Ok(ws)
    };
    tokio::time::timeout(OP_TIMEOUT, open).await.unwrap_or_else(|_| Err(format!("handshake {}: timed out", t.url)))
}

/// Sends a close frame and waits (briefly) for the server's close and EOF.
async fn ws_close(mut ws: WebSocketStream<Conn>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// TLS client
// ---------------------------------------------------------------------------------------------

/// The TLS options shared by every mode (`--sni`, `--kx`).
struct TlsOpts {
    sni: Option<String>,
    kx: Kx,
}

/// A TLS client for one target: the connector and the name it presents.
#[derive(Clone)]
struct TlsClient {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl TlsClient {
    fn new(opts: &TlsOpts, ip: IpAddr) -> TlsClient {
        let name = match &opts.sni {
            Some(s) => ServerName::try_from(s.clone()).unwrap_or_else(|e| fail(&format!("bad --sni {s:?}: {e}"))),
            None => ServerName::IpAddress(ip.into()),
        };
        TlsClient { connector: TlsConnector::from(tls_client_config(opts.kx)), name }
    }
}

/// TLS 1.3 only, one key-exchange group, no session resumption, ALPN `http/1.1`, any
/// certificate accepted (its handshake signature is still checked).
fn tls_client_config(kx: Kx) -> Arc<ClientConfig> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![match kx {
        Kx::X25519 => rustls::crypto::aws_lc_rs::kx_group::X25519,
        Kx::P256 => rustls::crypto::aws_lc_rs::kx_group::SECP256R1,
        Kx::X25519mlkem768 => rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768,
    }];
    let provider = Arc::new(provider);
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap_or_else(|e| fail(&format!("TLS client: {e}")))
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    cfg.resumption = Resumption::disabled();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// The signature scheme of the first server handshake signature seen (which key type the
/// server used), for the report.
static SIG_SCHEME: OnceLock<SignatureScheme> = OnceLock::new();

/// Accepts any server certificate (self-signed test certificates); the handshake signature
/// is verified as usual. The pattern of tidegate's `tls::NoVerify`.
struct AcceptAnyCert(Arc<CryptoProvider>);

impl fmt::Debug for AcceptAnyCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AcceptAnyCert")
    }
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let _ = SIG_SCHEME.set(d.scheme);
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let _ = SIG_SCHEME.set(d.scheme);
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client connection: plain TCP or TLS over TCP.
enum Conn {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tcp(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
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

/// Operations left to start with `--count` (shared by every worker of a run); unlimited
/// without it. A fixed count makes runs under a profiler comparable.
#[derive(Clone)]
struct Quota(Option<Arc<AtomicU64>>);

impl Quota {
    fn new(count: Option<u64>) -> Quota {
        Quota(count.map(|n| Arc::new(AtomicU64::new(n))))
    }
    /// Claims one operation; false once the count is used up.
    fn take(&self) -> bool {
        self.0.as_ref().is_none_or(|left| left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok())
    }
}

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

async fn http(t: Target, conns: usize, dur: Duration, quota: Quota, sources: Arc<Vec<IpAddr>>) -> String {
    let start = Instant::now();
    let deadline = start + dur;
    let t = Arc::new(t);
    let mut set = JoinSet::new();
    for i in 0..conns {
        set.spawn(http_worker(t.clone(), pick_source(&sources, i), deadline, quota.clone()));
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
    let stream = tokio::time::timeout(OP_TIMEOUT, connect(t, src)).await.map_err(|_| format!("connect {}: timed out", t.addr))??;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn http_worker(t: Arc<Target>, src: Option<IpAddr>, deadline: Instant, quota: Quota) -> Tally {
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
            if !quota.take() {
                return tally;
            }
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

async fn ws_echo(t: Target, conns: usize, size: usize, dur: Duration, quota: Quota, sources: Arc<Vec<IpAddr>>) -> String {
    let start = Instant::now();
    let deadline = start + dur;
    let t = Arc::new(t);
    let payload = Bytes::from(vec![b'x'; size]);
    let mut set = JoinSet::new();
    for i in 0..conns {
        set.spawn(ws_echo_worker(t.clone(), pick_source(&sources, i), deadline, payload.clone(), quota.clone()));
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
async fn echo_once(ws: &mut WebSocketStream<Conn>, msg: Message, len: usize) -> Result<(), String> {
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

async fn ws_echo_worker(t: Arc<Target>, src: Option<IpAddr>, deadline: Instant, payload: Bytes, quota: Quota) -> Tally {
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
            if !quota.take() {
                ws_close(ws).await;
                return tally;
            }
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

async fn ws_connect(t: Target, conns: usize, dur: Duration, quota: Quota, sources: Arc<Vec<IpAddr>>) -> String {
    let start = Instant::now();
    let deadline = start + dur;
    let t = Arc::new(t);
    let mut set = JoinSet::new();
    for i in 0..conns {
        set.spawn(ws_connect_worker(t.clone(), sources.clone(), i, conns, deadline, quota.clone()));
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
async fn ws_connect_worker(t: Arc<Target>, sources: Arc<Vec<IpAddr>>, i: usize, stride: usize, deadline: Instant, quota: Quota) -> Tally {
    let mut tally = Tally::default();
    let mut n = i;
    while Instant::now() < deadline && quota.take() {
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
// ws-idle, tcp-idle
// ---------------------------------------------------------------------------------------------

async fn ws_idle(t: Target, conns: usize, hold: Duration, sources: Arc<Vec<IpAddr>>, parallel: usize) -> String {
    let t = Arc::new(t);
    // Small buffers: these connections only sit there.
    let cfg = ws_config().read_buffer_size(4096).write_buffer_size(0);
    hold_idle("ws-idle", conns, hold, parallel, move |i| {
        let (t, src) = (t.clone(), pick_source(&sources, i));
        async move {
            let mut ws = ws_open(&t, src, cfg).await?;
            // Resolves when the connection ends; pings and data are ignored.
            Ok(async move {
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                        Some(Ok(_)) => {}
                    }
                }
            })
        }
    })
    .await
}

async fn tcp_idle(addr: SocketAddr, conns: usize, hold: Duration, sources: Arc<Vec<IpAddr>>, parallel: usize) -> String {
    hold_idle("tcp-idle", conns, hold, parallel, move |i| {
        let src = pick_source(&sources, i);
        async move {
            // Connected through the proxy only once bytes came back: echo 4 bytes once.
            let probe = async {
                let mut s = tcp_connect(addr, src).await.map_err(|e| format!("connect {addr}: {e}"))?;
                s.write_all(TCP_PROBE).await.map_err(|e| format!("probe write {addr}: {e}"))?;
                let mut back = [0u8; TCP_PROBE.len()];
                s.read_exact(&mut back).await.map_err(|e| format!("probe echo {addr}: {e}"))?;
                if &back != TCP_PROBE {
                    return Err(format!("probe echo {addr}: different bytes came back"));
                }
                Ok(s)
            };
            let mut s = tokio::time::timeout(OP_TIMEOUT, probe).await.unwrap_or_else(|_| Err(format!("probe echo {addr}: timed out")))?;
            Ok(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                }
            })
        }
    })
    .await
}

/// Opens `conns` connections with `open(i)` (at most `parallel` at once) and holds them for
/// `hold`; `READY` goes to stderr once all are open (or failed). `open` yields a future that
/// resolves when its connection ends: that is a drop, unless the hold is over.
async fn hold_idle<F, Fut, W>(mode: &str, conns: usize, hold: Duration, parallel: usize, open: F) -> String
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<W, String>> + Send + 'static,
    W: std::future::Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let dropped = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for i in 0..conns {
        let (gate, opened_tx, mut release_rx, dropped) = (gate.clone(), opened_tx.clone(), release_rx.clone(), dropped.clone());
        let opening = open(i);
        set.spawn(async move {
            let conn = {
                let Ok(_permit) = gate.acquire().await else { return };
                opening.await
            };
            let ended = match conn {
                Ok(ended) => {
                    let _ = opened_tx.send(true);
                    ended
                }
                Err(e) => {
                    report_error(&e);
                    let _ = opened_tx.send(false);
                    return;
                }
            };
            drop(opened_tx);
            tokio::select! {
                _ = release_rx.changed() => {}
                _ = ended => {
                    dropped.fetch_add(1, Ordering::Relaxed);
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
        "{{\"mode\":\"{mode}\",\"conns\":{conns},\"opened\":{opened},\"failed\":{},\"dropped\":{dropped_n},\"open_secs\":{open_secs:.3},\"hold_secs\":{:.1}}}",
        failed + not_attempted,
        hold.as_secs_f64()
    )
}

// ---------------------------------------------------------------------------------------------
// tls-handshake
// ---------------------------------------------------------------------------------------------

/// What the handshakes negotiated, over all of them.
struct TlsSeen {
    full: AtomicU64,
    retried: AtomicU64,
    resumed: AtomicU64,
    tickets: AtomicU64,
    /// Handshakes whose version, suite, group or ALPN differ from the first one's.
    different: AtomicU64,
    /// The first handshake's `"version":..,"cipher":..,"kx":..,"alpn":..` JSON fields.
    first: OnceLock<String>,
}

static TLS_SEEN: TlsSeen = TlsSeen {
    full: AtomicU64::new(0),
    retried: AtomicU64::new(0),
    resumed: AtomicU64::new(0),
    tickets: AtomicU64::new(0),
    different: AtomicU64::new(0),
    first: OnceLock::new(),
};

impl TlsSeen {
    fn note(&self, c: &rustls::ClientConnection) {
        let kind = match c.handshake_kind() {
            Some(HandshakeKind::Full) => &self.full,
            Some(HandshakeKind::FullWithHelloRetryRequest) => &self.retried,
            _ => &self.resumed,
        };
        kind.fetch_add(1, Ordering::Relaxed);
        let params = format!(
            "\"version\":\"{}\",\"cipher\":\"{}\",\"kx\":\"{}\",\"alpn\":\"{}\"",
            c.protocol_version().map_or_else(|| "?".into(), |v| format!("{v:?}")),
            c.negotiated_cipher_suite().map_or_else(|| "?".into(), |s| format!("{:?}", s.suite())),
            c.negotiated_key_exchange_group().map_or_else(|| "?".into(), |g| format!("{:?}", g.name())),
            c.alpn_protocol().map_or_else(|| "-".into(), |p| String::from_utf8_lossy(p).into_owned()),
        );
        if *self.first.get_or_init(|| params.clone()) != params {
            self.different.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn tls_handshake(addr: SocketAddr, opts: &TlsOpts, conns: usize, dur: Duration, sources: Arc<Vec<IpAddr>>) -> String {
    let tls = TlsClient::new(opts, addr.ip());
    let start = Instant::now();
    let deadline = start + dur;
    let mut set = JoinSet::new();
    for i in 0..conns {
        set.spawn(tls_handshake_worker(addr, tls.clone(), sources.clone(), i, conns, deadline));
    }
    let mut total = collect(set, deadline).await;
    let secs = start.elapsed().as_secs_f64();
    let [p50, p99, p999] = percentiles(&mut total.lat);
    let s = &TLS_SEEN;
    let tickets = s.tickets.load(Ordering::Relaxed);
    format!(
        "{{\"mode\":\"tls-handshake\",\"conns\":{conns},\"secs\":{secs:.3},\"handshakes\":{},\"handshakes_per_s\":{:.1},\"p50_us\":{p50},\"p99_us\":{p99},\"p999_us\":{p999},\"full\":{},\"full_hrr\":{},\"resumed\":{},\"tickets_per_handshake\":{:.2},\"different_params\":{},{},\"sig\":\"{}\",\"errors\":{}}}",
        total.ok,
        rate(total.ok, secs),
        s.full.load(Ordering::Relaxed),
        s.retried.load(Ordering::Relaxed),
        s.resumed.load(Ordering::Relaxed),
        if total.ok > 0 { tickets as f64 / total.ok as f64 } else { 0.0 },
        s.different.load(Ordering::Relaxed),
        s.first.get().map_or("\"version\":\"-\"", |f| f.as_str()),
        SIG_SCHEME.get().map_or_else(|| "-".into(), |s| format!("{s:?}")),
        total.errors
    )
}

/// Connect, full handshake (timed), close; again until `deadline`.
async fn tls_handshake_worker(
    addr: SocketAddr,
    tls: TlsClient,
    sources: Arc<Vec<IpAddr>>,
    i: usize,
    stride: usize,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut n = i;
    while Instant::now() < deadline {
        let src = pick_source(&sources, n);
        n += stride;
        let t0 = Instant::now();
        let handshake = async {
            let stream = tcp_connect(addr, src).await.map_err(|e| format!("connect {addr}: {e}"))?;
            tls.connector.connect(tls.name.clone(), stream).await.map_err(|e| format!("TLS handshake {addr}: {e}"))
        };
        match tokio::time::timeout(OP_TIMEOUT, handshake).await {
            Ok(Ok(mut s)) => {
                tally.record(t0);
                TLS_SEEN.note(s.get_ref().1);
                // close_notify, then read until the server closes: its session tickets are
                // read (and counted) there, and neither side ends with a reset.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    let _ = s.shutdown().await;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
                .await;
                TLS_SEEN.tickets.fetch_add(u64::from(s.get_ref().1.tls13_tickets_received()), Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                tally.error(&e);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => {
                tally.error(&format!("TLS handshake {addr}: timed out"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tally
}

// ---------------------------------------------------------------------------------------------
// tcp-bulk
// ---------------------------------------------------------------------------------------------

async fn tcp_bulk(addr: SocketAddr, conns: usize, bytes: u64, sources: Arc<Vec<IpAddr>>) -> String {
    // Bytes i of every stream is i % 251: checked on the way back at memcmp speed.
    let pattern: Arc<Vec<u8>> = Arc::new((0..TCP_CHUNK + 251).map(|i| (i % 251) as u8).collect());
    // Bounded: every connection within OP_TIMEOUT plus its bytes at 10 MB/s.
    let budget = OP_TIMEOUT + Duration::from_secs_f64(bytes as f64 / 10e6);
    let start = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..conns {
        let (src, pattern) = (pick_source(&sources, i), pattern.clone());
        set.spawn(async move {
            tokio::time::timeout(budget, tcp_bulk_conn(addr, src, bytes, pattern))
                .await
                .unwrap_or_else(|_| Err(format!("tcp-bulk {addr}: not echoed within {budget:?}")))
        });
    }
    let (mut echoed, mut errors) = (0u64, 0u64);
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(n)) => echoed += n,
            Ok(Err(e)) => {
                errors += 1;
                report_error(&e);
            }
            Err(e) => {
                errors += 1;
                report_error(&format!("task failed: {e}"));
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let mb_per_s = if secs > 0.0 { echoed as f64 / secs / 1e6 } else { 0.0 };
    format!(
        "{{\"mode\":\"tcp-bulk\",\"conns\":{conns},\"bytes_per_conn\":{bytes},\"bytes\":{echoed},\"secs\":{secs:.3},\"mb_per_s\":{mb_per_s:.1},\"errors\":{errors}}}"
    )
}

/// Sends `bytes` and reads them back at the same time; Ok(bytes) once all came back intact.
async fn tcp_bulk_conn(addr: SocketAddr, src: Option<IpAddr>, bytes: u64, pattern: Arc<Vec<u8>>) -> Result<u64, String> {
    let mut stream = tcp_connect(addr, src).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut r, mut w) = stream.split();
    let writer = async {
        let mut sent = 0u64;
        while sent < bytes {
            let off = (sent % 251) as usize;
            let n = (bytes - sent).min(TCP_CHUNK as u64) as usize;
            w.write_all(&pattern[off..off + n]).await.map_err(|e| format!("send {addr}: {e}"))?;
            sent += n as u64;
        }
        Ok::<_, String>(())
    };
    let reader = async {
        let mut buf = vec![0u8; TCP_CHUNK];
        let mut got = 0u64;
        while got < bytes {
            let want = (bytes - got).min(TCP_CHUNK as u64) as usize;
            let n = r.read(&mut buf[..want]).await.map_err(|e| format!("receive {addr}: {e}"))?;
            if n == 0 {
                return Err(format!("{addr} closed after {got} of {bytes} bytes"));
            }
            let off = (got % 251) as usize;
            if buf[..n] != pattern[off..off + n] {
                return Err(format!("{addr}: the echo differs from what was sent at byte {got}"));
            }
            got += n as u64;
        }
        Ok(got)
    };
    let (sent, got) = tokio::join!(writer, reader);
    sent?;
    got
}

// ---------------------------------------------------------------------------------------------
// backend
// ---------------------------------------------------------------------------------------------

/// A listening socket on a loopback address (or the process exits).
fn listen(addr: SocketAddr) -> TcpListener {
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
    sock.listen(4096).unwrap_or_else(|e| fail(&format!("cannot listen on {addr}: {e}")))
}

/// The next connection; out of file descriptors, say, backs off rather than spins.
async fn accept(listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                return s;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn backend_tcp(addr: SocketAddr) -> String {
    let listener = listen(addr);
    eprintln!("loadgen TCP echo backend listening on {addr}");
    loop {
        let stream = accept(&listener).await;
        tokio::spawn(tcp_echo(stream));
    }
}

/// Echoes every byte; EOF is passed on. The buffer exists only while bytes flow, so that
/// thousands of idle connections hold none.
async fn tcp_echo(mut s: TcpStream) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if s.readable().await.is_err() {
            return;
        }
        if buf.capacity() == 0 {
            buf = Vec::with_capacity(TCP_CHUNK);
        }
        match s.try_read_buf(&mut buf) {
            Ok(0) => {
                let _ = s.shutdown().await;
                return;
            }
            Ok(_) => {
                if s.write_all(&buf).await.is_err() {
                    return;
                }
                buf.clear();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf = Vec::new(),
            Err(_) => return,
        }
    }
}

async fn backend(addr: SocketAddr) -> String {
    let listener = listen(addr);
    eprintln!("loadgen backend listening on {addr}");
    loop {
        let stream = accept(&listener).await;
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
