//! The live snapshot: the validated config turned into what the data path reads, plus the
//! per-backend state that outlives any one snapshot.
//!
//! `Runtime` is immutable and sits in an `ArcSwap`; handlers `load_full()` it once per request.
//! Per-backend state (live count, passive failures, connection pool) lives in `BackendState`,
//! found by identity (upstream name + address) in the `Registry` when a snapshot is built, so
//! a future reload keeps it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

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
}

impl BackendState {
    fn new(id: BackendId) -> Self {
        Self {
            id,
            active: AtomicU32::new(0),
            fails: AtomicU32::new(0),
            fail_window_start: AtomicU64::new(0),
            down_until: AtomicU64::new(0),
            pool: Pool::default(),
        }
    }

    /// Live connections: the one accessor balancers read load through.
    pub fn load(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
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

    /// A connect error or timeout (nginx's `error` and `timeout`).
    pub fn record_failure(&self, cfg: &ServerConfig, now: u64) -> bool {
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
            self.down_until.store(now + window, Ordering::Relaxed);
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
/// connection ends.
#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<HashMap<BackendId, Weak<BackendState>>>,
}

impl Registry {
    pub fn get_or_create(&self, id: BackendId) -> Arc<BackendState> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = map.get(&id).and_then(Weak::upgrade) {
            return state;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let state = Arc::new(BackendState::new(id.clone()));
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
}

impl Upstream {
    pub fn name(&self) -> &str {
        &self.cfg.name
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
    pub upstreams: Vec<Upstream>,
    pub shutdown_timeout: Duration,
}

impl Runtime {
    pub fn build(config: Config, registry: &Registry) -> Result<Runtime, String> {
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
                Upstream { cfg: u.clone(), backends, balancer }
            })
            .collect();
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for (index, l) in config.listeners.iter().enumerate() {
            let tls = match &l.tls {
                None => None,
                Some(t) => {
                    let server = crate::tls::server_config(t).map_err(|e| format!("listener {:?}: {e}", l.name))?;
                    Some((tokio_rustls::TlsAcceptor::from(server), t.handshake_timeout))
                }
            };
            listeners.push(ListenerRuntime { router: Router::new(&l.routes), setup: ListenerSetup { index, timeouts: l.timeouts, tls } });
        }
        Ok(Runtime { shutdown_timeout: config.shutdown_timeout, config: Arc::new(config), listeners, upstreams })
    }
}
