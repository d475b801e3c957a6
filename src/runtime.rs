//! The live snapshot: the validated config turned into what the data path reads, plus the
//! per-backend state that outlives any one snapshot.
//!
//! `Runtime` is immutable and sits in an `ArcSwap`; handlers `load_full()` it once per request.
//! Per-backend state (live count, passive failures, connection pool) lives in `BackendState`,
//! found by identity (upstream name + address) in the `Registry` when a snapshot is built, so
//! a future reload keeps it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::admin::metrics::{BackendMetrics, Metrics, UpstreamMetrics};
use crate::balancer::Balancer;
use crate::config::{Config, ServerConfig, UpstreamConfig};
use crate::connection::ListenerSetup;
use crate::route::Router;
use crate::upstream::Pool;

/// Milliseconds since the process started; what failure windows are measured in.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A backend's identity across snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendId {
    pub upstream: String,
    pub addr: SocketAddr,
}

/// State of one backend that must survive config reloads.
#[derive(Debug)]
pub struct BackendState {
    pub id: BackendId,
    /// In-flight requests plus open tunnels through this process.
    active: AtomicU32,
    /// Passive failures counted in the current `fail_timeout` window.
    fails: AtomicU32,
    /// When the current failure window started (ms, `now_ms`).
    fail_window_start: AtomicU64,
    /// Unavailable until this time (ms) after `max_fails` failures.
    down_until: AtomicU64,
    /// Idle keep-alive connections to this backend.
    pub pool: Pool,
    /// `Health` as u8; `Healthy` unless active checks say otherwise.
    health: AtomicU8,
    /// The server's own live-connection count from its last health answer…
    reported: AtomicU32,
    /// …our local count when that answer came…
    reported_base: AtomicU32,
    /// …and when (ms, `now_ms`; 0 = no usable report).
    reported_at: AtomicU64,
    /// A report older than this (ms) is ignored: 3 check intervals.
    report_ttl: AtomicU64,
    /// The last active check, for observation.
    last_check: Mutex<Option<CheckResult>>,
    /// Set while the backend drains (a reload removed it or set it `down`); tunnels watch it.
    drain: tokio::sync::watch::Sender<Option<DrainPlan>>,
    /// Runtime overrides from the admin API (`ADMIN_DRAIN`, `ADMIN_DOWN`); they survive
    /// reloads of an unchanged server.
    admin: AtomicU8,
    pub metrics: BackendMetrics,
    /// Set once the backend has been part of a published snapshot: adding health checks to a
    /// server that already serves keeps it serving, only new servers wait for a first pass.
    in_service: std::sync::atomic::AtomicBool,
}

const ADMIN_DRAIN: u8 = 1;
const ADMIN_DOWN: u8 = 2;

/// Runtime overrides set through the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdminFlags {
    /// No new connections; open tunnels stay.
    pub drain: bool,
    /// No new connections; open tunnels are closed as in a config drain.
    pub down: bool,
}

/// When and how a draining backend's tunnels are closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPlan {
    pub since: Instant,
    pub timeout: Duration,
    pub spread: Duration,
    pub close_code: u16,
}

/// Active health state of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Checked, but no verdict yet: takes no traffic.
    Unknown = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            0 => Health::Unknown,
            1 => Health::Healthy,
            _ => Health::Unhealthy,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// The outcome of one active check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckResult {
    pub ok: bool,
    /// "200", "status 503", "timeout", "connection refused"...
    pub reason: String,
    pub latency: Duration,
    /// WebSocket checks: the ping's round trip.
    pub ping_rtt: Option<Duration>,
    pub at_ms: u64,
}

/// What the admin API and logs show about one backend.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendView {
    pub health: Health,
    pub last_check: Option<CheckResult>,
    /// The server's own count when fresh.
    pub reported: Option<u32>,
    pub local: u32,
    /// What balancers use.
    pub merged: u32,
}

impl BackendState {
    fn new(id: BackendId, metrics: BackendMetrics) -> Self {
        Self {
            id,
            active: AtomicU32::new(0),
            fails: AtomicU32::new(0),
            fail_window_start: AtomicU64::new(0),
            down_until: AtomicU64::new(0),
            pool: Pool::default(),
            health: AtomicU8::new(Health::Healthy as u8),
            reported: AtomicU32::new(0),
            reported_base: AtomicU32::new(0),
            reported_at: AtomicU64::new(0),
            report_ttl: AtomicU64::new(0),
            last_check: Mutex::new(None),
            drain: tokio::sync::watch::Sender::new(None),
            admin: AtomicU8::new(0),
            metrics,
            in_service: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Marks the backend as serving; returns whether it already was.
    pub fn enter_service(&self) -> bool {
        self.in_service.swap(true, Ordering::Relaxed)
    }

    pub fn admin(&self) -> AdminFlags {
        let v = self.admin.load(Ordering::Relaxed);
        AdminFlags { drain: v & ADMIN_DRAIN != 0, down: v & ADMIN_DOWN != 0 }
    }

    /// True when the admin API took the server out of balancing.
    pub fn admin_blocked(&self) -> bool {
        self.admin.load(Ordering::Relaxed) != 0
    }

    pub fn set_admin(&self, flags: AdminFlags) {
        let v = if flags.drain { ADMIN_DRAIN } else { 0 } | if flags.down { ADMIN_DOWN } else { 0 };
        self.admin.store(v, Ordering::Relaxed);
    }

    /// Starts draining (no-op when already draining): idle pooled connections are closed
    /// now, tunnels close per the plan.
    pub fn start_drain(&self, plan: DrainPlan) {
        let started = self.drain.send_if_modified(|p| {
            if p.is_none() {
                *p = Some(plan);
                true
            } else {
                false
            }
        });
        if started {
            self.pool.clear();
            tracing::info!(upstream = %self.id.upstream, backend = %self.id.addr, drain_timeout = ?plan.timeout, drain_spread = ?plan.spread, tunnels = self.active(), "backend draining");
        }
    }

    /// The backend is back (re-added, or no longer down): pending tunnel closes are called off.
    pub fn stop_drain(&self) {
        if self.drain.send_if_modified(|p| p.take().is_some()) {
            tracing::info!(upstream = %self.id.upstream, backend = %self.id.addr, "backend drain cancelled");
        }
    }

    pub fn is_draining(&self) -> bool {
        self.drain.borrow().is_some()
    }

    pub fn drain_watch(&self) -> tokio::sync::watch::Receiver<Option<DrainPlan>> {
        self.drain.subscribe()
    }

    /// In-flight requests plus open tunnels through this process.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// The load balancers see, the one accessor they read it through: the server's own count
    /// from its last fresh health answer plus what this process added or removed since, or
    /// else the local count.
    pub fn load(&self, now_ms: u64) -> u32 {
        let local = self.active.load(Ordering::Relaxed);
        let at = self.reported_at.load(Ordering::Relaxed);
        if at == 0 || now_ms.saturating_sub(at) > self.report_ttl.load(Ordering::Relaxed) {
            return local;
        }
        let reported = i64::from(self.reported.load(Ordering::Relaxed));
        let base = i64::from(self.reported_base.load(Ordering::Relaxed));
        (reported + i64::from(local) - base).clamp(0, i64::from(u32::MAX)) as u32
    }

    /// Records the server's own live count from a health answer.
    pub fn set_reported(&self, count: u32, ttl: Duration, now_ms: u64) {
        self.reported.store(count, Ordering::Relaxed);
        self.reported_base.store(self.active.load(Ordering::Relaxed), Ordering::Relaxed);
        self.report_ttl.store(ttl.as_millis() as u64, Ordering::Relaxed);
        self.reported_at.store(now_ms.max(1), Ordering::Relaxed);
    }

    /// Drops the server's report; the local count is used.
    pub fn clear_reported(&self) {
        self.reported_at.store(0, Ordering::Relaxed);
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    pub fn set_health(&self, h: Health) {
        self.health.store(h as u8, Ordering::Relaxed);
    }

    pub fn is_healthy(&self) -> bool {
        self.health.load(Ordering::Relaxed) == Health::Healthy as u8
    }

    pub fn set_last_check(&self, r: CheckResult) {
        *self.last_check.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }

    pub fn view(&self, now_ms: u64) -> BackendView {
        let at = self.reported_at.load(Ordering::Relaxed);
        let fresh = at != 0 && now_ms.saturating_sub(at) <= self.report_ttl.load(Ordering::Relaxed);
        BackendView {
            health: self.health(),
            last_check: self.last_check.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            reported: fresh.then(|| self.reported.load(Ordering::Relaxed)),
            local: self.active(),
            merged: self.load(now_ms),
        }
    }

    /// Counts one more live connection unless that would pass `max_conns` (0 = unlimited).
    pub fn try_acquire(self: &Arc<Self>, max_conns: u32) -> Option<ConnGuard> {
        let mut cur = self.active.load(Ordering::Relaxed);
        loop {
            if max_conns != 0 && cur >= max_conns {
                return None;
            }
            match self.active.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(ConnGuard(self.clone())),
                Err(now) => cur = now,
            }
        }
    }

    /// False while the backend sits out `fail_timeout` after `max_fails` failures.
    pub fn is_available(&self, now: u64) -> bool {
        self.down_until.load(Ordering::Relaxed) <= now
    }

    /// A passive failure (by default a connect error or timeout, nginx's `error` and
    /// `timeout`). After `max_fails` within `fail_timeout` the backend sits out: for
    /// `fail_timeout`, or, when active checks run (`checked`), until they bring it back.
    /// Returns true when this failure took the backend out.
    pub fn record_failure(&self, cfg: &ServerConfig, now: u64, checked: bool) -> bool {
        if cfg.max_fails == 0 {
            return false;
        }
        let window = cfg.fail_timeout.as_millis() as u64;
        if now.saturating_sub(self.fail_window_start.load(Ordering::Relaxed)) >= window {
            self.fail_window_start.store(now, Ordering::Relaxed);
            self.fails.store(0, Ordering::Relaxed);
        }
        let fails = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if fails >= cfg.max_fails {
            if checked {
                self.set_health(Health::Unhealthy);
            } else {
                self.down_until.store(now + window, Ordering::Relaxed);
            }
            self.fails.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    pub fn record_success(&self) {
        if self.fails.load(Ordering::Relaxed) != 0 {
            self.fails.store(0, Ordering::Relaxed);
        }
    }
}

/// Holds one unit of a backend's live count; released on every exit path by `Drop`.
#[derive(Debug)]
pub struct ConnGuard(Arc<BackendState>);

impl ConnGuard {
    pub fn backend(&self) -> &Arc<BackendState> {
        &self.0
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Finds a backend's state by identity; weak so removed backends are freed when their last
/// connection ends. Also owns the metrics every snapshot's handles come from.
#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<HashMap<BackendId, Weak<BackendState>>>,
    pub metrics: Arc<Metrics>,
}

impl Registry {
    pub fn get_or_create(&self, id: BackendId) -> Arc<BackendState> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = map.get(&id).and_then(Weak::upgrade) {
            return state;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let metrics = self.metrics.backend(&id.upstream, &id.addr.to_string());
        let state = Arc::new(BackendState::new(id.clone(), metrics));
        map.insert(id, Arc::downgrade(&state));
        state
    }
}

/// One server of an upstream as the data path sees it.
#[derive(Debug)]
pub struct Backend {
    pub cfg: ServerConfig,
    pub state: Arc<BackendState>,
}

impl Backend {
    pub fn addr(&self) -> SocketAddr {
        self.cfg.addr
    }
}

#[derive(Debug)]
pub struct Upstream {
    pub cfg: UpstreamConfig,
    pub backends: Vec<Backend>,
    pub balancer: Balancer,
    pub metrics: Arc<UpstreamMetrics>,
}

impl Upstream {
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Counts a passive failure of backend `i`, and says so when it takes the backend out.
    pub fn passive_failure(&self, i: usize) {
        let backend = &self.backends[i];
        let checked = self.cfg.health.is_some();
        if backend.state.record_failure(&backend.cfg, now_ms(), checked) {
            if checked {
                tracing::warn!(upstream = %self.name(), backend = %backend.addr(), max_fails = backend.cfg.max_fails, "backend unhealthy after max_fails passive failures; active checks bring it back");
            } else {
                tracing::warn!(upstream = %self.name(), backend = %backend.addr(), max_fails = backend.cfg.max_fails, fail_timeout = ?backend.cfg.fail_timeout, "backend unavailable for fail_timeout after max_fails failures");
            }
        }
    }

    /// Envoy's panic mode: with active checks and `panic_threshold` set, when fewer than that
    /// share of the primary servers is healthy, health is disregarded so the few healthy ones
    /// are not overwhelmed.
    pub fn in_panic(&self) -> bool {
        let Some(threshold) = self.cfg.panic_threshold else { return false };
        if self.cfg.health.is_none() {
            return false;
        }
        let (mut total, mut healthy) = (0u32, 0u32);
        for b in self.backends.iter().filter(|b| !b.cfg.down && !b.cfg.backup) {
            total += 1;
            healthy += u32::from(b.state.is_healthy());
        }
        total > 0 && f64::from(healthy) < threshold * f64::from(total)
    }
}

pub struct ListenerRuntime {
    pub router: Router,
    /// What each accepted connection needs: timeouts and the TLS acceptor.
    pub setup: ListenerSetup,
}

impl std::fmt::Debug for ListenerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerRuntime").field("router", &self.router).field("tls", &self.setup.tls.is_some()).finish()
    }
}

/// An immutable snapshot built from one validated config.
#[derive(Debug)]
pub struct Runtime {
    pub config: Arc<Config>,
    pub listeners: Vec<ListenerRuntime>,
    /// `listener::listener_key` → index in `listeners`.
    pub listener_index: HashMap<String, usize>,
    pub upstreams: Vec<Upstream>,
    pub shutdown_timeout: Duration,
    /// Counts applied configs: 1 at start, +1 per successful reload.
    pub generation: u64,
    /// When this snapshot was built, in seconds since the Unix epoch.
    pub loaded_at: u64,
}

impl Runtime {
    pub fn build(config: Config, registry: &Registry, generation: u64) -> Result<Runtime, String> {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                let backends: Vec<Backend> = u
                    .servers
                    .iter()
                    .map(|s| Backend {
                        cfg: s.clone(),
                        state: registry.get_or_create(BackendId { upstream: u.name.clone(), addr: s.addr }),
                    })
                    .collect();
                let balancer = Balancer::new(u, &backends);
                let metrics = Arc::new(registry.metrics.upstream(&u.name));
                Upstream { cfg: u.clone(), backends, balancer, metrics }
            })
            .collect();
        let mut listeners = Vec::with_capacity(config.listeners.len());
        let mut listener_index = HashMap::new();
        for (index, l) in config.listeners.iter().enumerate() {
            let tls = match &l.tls {
                None => None,
                Some(t) => {
                    let server = crate::tls::server_config(t).map_err(|e| format!("listener {:?}: {e}", l.name))?;
                    Some((tokio_rustls::TlsAcceptor::from(server), t.handshake_timeout))
                }
            };
            let key = crate::listener::listener_key(l);
            listener_index.insert(key.clone(), index);
            listeners.push(ListenerRuntime {
                router: Router::new(&l.routes),
                setup: ListenerSetup {
                    index,
                    key: key.into(),
                    timeouts: l.timeouts,
                    tls,
                    mode: l.mode,
                    accept_proxy: l.accept_proxy,
                    trusted: l.trusted_proxies.clone().into(),
                    metrics: Arc::new(registry.metrics.listener(&l.name)),
                    max_connections: l.max_connections,
                    max_connections_per_client: l.max_connections_per_client,
                },
            });
        }
        Ok(Runtime {
            shutdown_timeout: config.shutdown_timeout,
            config: Arc::new(config),
            listeners,
            listener_index,
            upstreams,
            generation,
            loaded_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        })
    }
}
