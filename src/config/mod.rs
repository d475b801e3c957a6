//! Configuration: the raw TOML file (`file.rs`) is parsed and validated (`validate.rs`)
//! into the types below. Nothing outside this module sees the raw `File*` types, and
//! nothing here panics: the same code runs on `tidegate check`, at start and on reload.

mod cidr;
mod duration;
mod file;
pub mod nginx;
mod summary;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cidr::Cidr;
pub use duration::parse_duration;
pub use summary::summary;

/// Loads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError { file: path.to_path_buf(), line: 0, col: 0, message: format!("cannot read config file: {e}") }])
    })?;
    load_str(&text, path)
}

/// Validates config text; `path` is only used in messages and to resolve relative paths.
pub fn load_str(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    validate::validate(text, path)
}

/// The validated configuration: every reference resolved, every value in range.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from (for messages and reload).
    pub source: PathBuf,
    /// Grace period for in-flight requests and tunnels on SIGTERM/SIGINT (`shutdown_timeout`, default 30s).
    pub shutdown_timeout: Duration,
    pub listeners: Vec<ListenerConfig>,
    /// In file order; routes refer to them by index.
    pub upstreams: Vec<UpstreamConfig>,
    /// Problems that do not stop the config from loading (a certificate near expiry,
    /// `verify = false`): printed by `check`, logged at every load.
    pub warnings: Vec<ConfigError>,
    /// Where `run` writes its pid (and `tidegate reload` finds it). Default: none.
    pub pid_file: Option<PathBuf>,
    /// Reload when the config file or a certificate/key it names changes (`reload_on_change`,
    /// default true).
    pub reload_on_change: bool,
    /// `[admin]`: metrics, JSON API and status page; off when absent.
    pub admin: Option<AdminConfig>,
    /// `[log] format`: access and event logs as text (default) or JSON lines.
    pub log_json: bool,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// Bearer token: required for every mutating call, and for everything when `bind` is not
    /// loopback (where it is mandatory).
    pub token: Option<String>,
}

impl Config {
    /// Every file whose change should trigger a reload: this config and the TLS files it names.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.source.clone()];
        for l in &self.listeners {
            for c in l.tls.iter().flat_map(|t| &t.certificates) {
                files.push(c.cert.clone());
                files.push(c.key.clone());
            }
        }
        for u in &self.upstreams {
            if let Some(ca) = u.tls.as_ref().and_then(|t| t.ca.clone()) {
                files.push(ca);
            }
        }
        files
    }
}

impl Config {
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerMode {
    /// HTTP/1.1 with WebSocket upgrades.
    Http,
    /// Layer 4: each connection is balanced and spliced to a server (`upstream = "..."`).
    Tcp,
    /// Layer 4 routed by the TLS ClientHello's SNI, without terminating TLS.
    TlsPassthrough,
}

impl ListenerMode {
    pub fn name(self) -> &'static str {
        match self {
            ListenerMode::Http => "http",
            ListenerMode::Tcp => "tcp",
            ListenerMode::TlsPassthrough => "tls_passthrough",
        }
    }
}

/// `send_proxy`: tell servers the real client address with the PROXY protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendProxy {
    V1,
    V2,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub mode: ListenerMode,
    /// First match wins.
    pub routes: Vec<RouteConfig>,
    pub timeouts: ListenerTimeouts,
    /// Peers whose `X-Forwarded-For` is appended to rather than replaced.
    pub trusted_proxies: Vec<Cidr>,
    /// TLS termination (`[listener.tls]`); plain HTTP when absent.
    pub tls: Option<ListenerTls>,
    /// Read a PROXY protocol header (v1 or v2) first; only from `trusted_proxies`.
    pub accept_proxy: bool,
    /// Most client connections open at once on this listener (0: no limit); more are closed
    /// at accept.
    pub max_connections: u32,
    /// Most client connections open at once from one client address (0: no limit).
    pub max_connections_per_client: u32,
    pub header_underscores: Underscores,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

/// `[listener.tls]`, with its certificates loaded and checked.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub certificates: Vec<TlsCert>,
    /// Default "1.2".
    pub min_version: TlsVersion,
    /// Default `["http/1.1"]`.
    pub alpn: Vec<String>,
    /// Default 10s.
    pub handshake_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct TlsCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Served when SNI matches no certificate, or is absent. Default: the first certificate.
    pub default: bool,
    pub loaded: crate::tls::LoadedCert,
}

/// `[upstream.NAME.tls]`: re-encrypt to the servers.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// Name sent as SNI and verified; default the server's IP address.
    pub sni: Option<String>,
    pub ca: Option<PathBuf>,
    pub verify: bool,
    pub client: std::sync::Arc<rustls::ClientConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerTimeouts {
    /// Whole request head must arrive within this (slowloris). Default 10s.
    pub header_read: Duration,
    /// Idle keep-alive connection is closed after this. Default 60s.
    pub keepalive_idle: Duration,
    /// A request body must advance by `body_min_rate` bytes per second, checked over windows
    /// of this length (and by at least one byte when the rate is 0); else 408. Default 30s.
    pub body: Duration,
    /// Default 64 bytes per second (a body trickled at 1 byte/s is cut).
    pub body_min_rate: u64,
    /// A response write to the client that makes no progress for this long closes the
    /// connection (a client that stopped reading). Default 60s, like nginx's send_timeout.
    pub send: Duration,
}

impl Default for ListenerTimeouts {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            keepalive_idle: Duration::from_secs(60),
            body: Duration::from_secs(30),
            body_min_rate: 64,
            send: Duration::from_secs(60),
        }
    }
}

/// What to do with request headers whose names contain `_` (many servers read them as `-`,
/// so they can smuggle a header past checks made on the dashed name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Underscores {
    /// Removed before forwarding (default; nginx's `underscores_in_headers off`).
    Drop,
    /// The request gets 400.
    Reject,
    /// Forwarded as they are.
    Allow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// Lower-cased exact name.
    Exact(String),
    /// `*.example.com` stored as `.example.com`: matches exactly one more label.
    Wildcard(String),
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub host: Option<HostMatch>,
    /// `tls_passthrough` listeners: the ClientHello's server name.
    pub sni: Option<HostMatch>,
    pub path_prefix: Option<String>,
    /// Index into `Config::upstreams`.
    pub upstream: usize,
}

/// How an upstream spreads requests and tunnels over its servers (`balance = "..."`).
#[derive(Debug, Clone, PartialEq)]
pub enum Balance {
    /// nginx's smooth weighted round-robin.
    RoundRobin,
    /// Weighted least connections (load / weight), ties broken round-robin.
    LeastConn,
    /// Power of two choices: two weighted-random servers, the less loaded wins (`random_two`).
    P2c,
    /// The client address picks the server.
    IpHash(IpHashMode),
    /// Sticky by cookie; requests without a valid cookie go through `fallback`.
    Cookie(CookieConfig),
    /// Consistent hash of a request key, with bounded load.
    Hash(HashConfig),
}

impl Balance {
    /// The name as written in the config file.
    pub fn name(&self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConn => "least_conn",
            Balance::P2c => "p2c",
            Balance::IpHash(_) => "ip_hash",
            Balance::Cookie(_) => "cookie",
            Balance::Hash(_) => "hash",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpHashMode {
    /// Consistent hash of the whole address on a ring: adding or removing one of N servers
    /// moves about 1/N of the clients.
    Consistent,
    /// nginx's `ip_hash`: the first three octets of an IPv4 address (the whole IPv6 address),
    /// nginx's hash and weighted modulo, so the same clients reach the same servers as there.
    Nginx,
}

/// The balancer a cookie-sticky upstream uses for requests without a valid cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    RoundRobin,
    LeastConn,
    P2c,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

/// `[upstream.NAME.cookie]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CookieConfig {
    /// Default `tg_srv`.
    pub name: String,
    /// When set, server ids are signed (HMAC-SHA256) so clients cannot choose a server.
    pub secret: Option<String>,
    /// `Max-Age`; a session cookie when absent.
    pub max_age: Option<Duration>,
    /// Default `/`.
    pub path: String,
    pub domain: Option<String>,
    /// Default `Lax`.
    pub same_site: SameSite,
    /// Default `least_conn`.
    pub fallback: Fallback,
}

/// Where a `hash` upstream takes its key from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A request header (lower-cased name).
    Header(String),
    Cookie(String),
    /// A query-string parameter, compared raw (not percent-decoded).
    Query(String),
    Path,
    /// The client address (as for ip_hash), hashed as its text form.
    Ip,
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashKey::Header(n) => write!(f, "header:{n}"),
            HashKey::Cookie(n) => write!(f, "cookie:{n}"),
            HashKey::Query(n) => write!(f, "query:{n}"),
            HashKey::Path => f.write_str("path"),
            HashKey::Ip => f.write_str("ip"),
        }
    }
}

/// `[upstream.NAME.hash]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HashConfig {
    pub key: HashKey,
    /// A server above `bounded_load` × the average load is passed over for the next one on the
    /// ring; 0 turns it off. Default 1.25.
    pub bounded_load: f64,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub balance: Balance,
    pub servers: Vec<ServerConfig>,
    pub timeouts: UpstreamTimeouts,
    /// Idle keep-alive connections kept per server (`keepalive`, default 32; 0 disables pooling).
    pub keepalive: usize,
    /// How many servers one request may try on connect failure (`tries`; 0, the default, means every server once).
    pub tries: usize,
    /// TLS to the servers; plain TCP when absent.
    pub tls: Option<UpstreamTls>,
    /// Active health checks (`[upstream.NAME.health]`); none when absent.
    pub health: Option<HealthConfig>,
    /// Which upstream answers count as passive failures (`fail_on`, default connect and timeout).
    pub fail_on: FailOn,
    /// When fewer than this share of servers is healthy, balance over all of them (Envoy's
    /// panic mode). None: off.
    pub panic_threshold: Option<f64>,
    pub drain: DrainConfig,
    /// PROXY protocol header sent on every new connection to a server. Pooling is off then,
    /// since a pooled connection would carry another client's address.
    pub send_proxy: Option<SendProxy>,
}

/// How tunnels to a server that was removed or set `down` are closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainConfig {
    /// Tunnels keep running this long after the server went away (`drain_timeout`, default
    /// 10m; 0s: at once).
    pub timeout: Duration,
    /// The closes are spread with jitter over this window (`drain_spread`, default 30s), so
    /// clients do not all reconnect in the same second.
    pub spread: Duration,
    /// Close code sent to the client: 1001 Going Away (default) or 1012 Service Restart.
    pub close_code: u16,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig { timeout: Duration::from_secs(600), spread: Duration::from_secs(30), close_code: 1001 }
    }
}

impl UpstreamConfig {
    /// An upstream with every optional setting at its default (for tests and tools).
    pub fn new(name: &str, balance: Balance, servers: Vec<ServerConfig>) -> Self {
        UpstreamConfig {
            name: name.to_string(),
            balance,
            servers,
            timeouts: UpstreamTimeouts::default(),
            keepalive: 32,
            tries: 0,
            tls: None,
            health: None,
            fail_on: FailOn::default(),
            panic_threshold: None,
            drain: DrainConfig::default(),
            send_proxy: None,
        }
    }
}

/// `fail_on = ["connect", "timeout", 502, 503, 504]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailOn {
    pub connect: bool,
    pub timeout: bool,
    /// Response statuses that count as failures.
    pub statuses: Vec<u16>,
}

impl Default for FailOn {
    fn default() -> Self {
        FailOn { connect: true, timeout: true, statuses: Vec::new() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthKind {
    /// Connect only.
    Tcp,
    /// `GET path`, status in `expect`.
    Http,
    /// A real WebSocket handshake on `path`, a ping, and a clean close.
    WebSocket,
}

/// Where a health answer carries the server's own live-connection count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadReport {
    /// A response header (lower-cased name) holding an integer.
    Header(String),
    /// A JSON pointer into the response body (`json:/stats/live`).
    Json(String),
    /// The whole body is an integer.
    Body,
}

/// `[upstream.NAME.health]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub kind: HealthKind,
    /// Default "/".
    pub path: String,
    /// `Host` header for http and websocket checks; default the server's address.
    pub host: Option<String>,
    /// Healthy statuses; empty means any 2xx.
    pub expect: Vec<u16>,
    /// Default 2s (with up to 10 % jitter).
    pub interval: Duration,
    /// Default 1s.
    pub timeout: Duration,
    /// Consecutive successes to become healthy. Default 2.
    pub rise: u32,
    /// Consecutive failures to become unhealthy. Default 3.
    pub fall: u32,
    pub load: Option<LoadReport>,
    /// A new server takes traffic before its first check passes. Default false.
    pub start_healthy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamTimeouts {
    /// TCP connect to a server. Default 5s.
    pub connect: Duration,
    /// From request sent to response head received. Default 60s.
    pub response_header: Duration,
    /// A tunnel with no byte in either direction for this long is closed. Default 1h.
    pub tunnel_idle: Duration,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        Self { connect: Duration::from_secs(5), response_header: Duration::from_secs(60), tunnel_idle: Duration::from_secs(3600) }
    }
}

/// One `server` of an upstream; names and defaults follow nginx's `server` directive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    /// Default 1.
    pub weight: NonZeroU32,
    /// Failures within `fail_timeout` that make the server unavailable; 0 disables. Default 1.
    pub max_fails: u32,
    /// Default 10s.
    pub fail_timeout: Duration,
    pub backup: bool,
    pub down: bool,
    /// 0 = unlimited.
    pub max_conns: u32,
}

/// One problem in a config file, located as `FILE:LINE:COL` (1-based; 0 when unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.col, self.message)
        }
    }
}

/// Every problem found in one file (validation does not stop at the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
