//! tidegate: an edge proxy for WebSocket clusters.
//!
//! Data flows `listener → connection → proxy (route → balancer → upstream) → tunnel`.
//! `main.rs` only parses the CLI; tests and examples start the same `Server`.

#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod balancer;
pub mod body;
pub mod config;
pub mod connection;
pub mod demo;
pub mod error;
pub mod framing;
pub mod fuzz_logic;
pub mod health;
pub mod listener;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod route;
pub mod runtime;
pub mod sni;
pub mod stream;
pub mod tcp;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod ws;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::runtime::{Registry, Runtime};

/// What every connection shares: the current snapshot, backend state, and the shutdown signal.
pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
    pub registry: Registry,
    /// Cancelled once: stop accepting, finish requests, close tunnels with a close frame.
    pub shutdown: CancellationToken,
    /// Every connection and tunnel task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Active health-check tasks, one per checked backend.
    pub health: health::HealthChecks,
    /// Accepting listeners by `listener::listener_key`.
    pub listeners: Mutex<HashMap<String, listener::Running>>,
    /// Reload attempts and their outcome.
    pub reloads: reload::ReloadStats,
    /// One reload at a time.
    reload_lock: Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Setup(String),
    #[error("listener {name:?}: cannot bind {addr}")]
    Bind {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A proxy with its listeners bound, ready to run.
pub struct Server {
    shared: Arc<Shared>,
    bound: Vec<listener::Bound>,
    admin: Option<tokio::net::TcpListener>,
}

impl Server {
    /// Binds every listener of `config`; nothing is accepted until `run`. Call within a
    /// tokio runtime (health checks start here).
    pub fn bind(config: Config) -> Result<Server, StartError> {
        let mut bound = Vec::new();
        for l in &config.listeners {
            let b = listener::bind(l).map_err(|source| StartError::Bind { name: l.name.clone(), addr: l.bind, source })?;
            bound.push(b);
        }
        let admin = match &config.admin {
            None => None,
            Some(a) => {
                let l = std::net::TcpListener::bind(a.bind)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .and_then(tokio::net::TcpListener::from_std)
                    .map_err(|source| StartError::Bind { name: "admin".into(), addr: a.bind, source })?;
                Some(l)
            }
        };
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let registry = Registry::default();
        let runtime = Runtime::build(config, &registry, 1).map_err(StartError::Setup)?;
        let health = health::HealthChecks::default();
        health.reconcile(&runtime);
        let shared = Arc::new(Shared {
            runtime: ArcSwap::from_pointee(runtime),
            registry,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            health,
            listeners: Mutex::new(HashMap::new()),
            reloads: reload::ReloadStats::default(),
            reload_lock: Mutex::new(()),
        });
        Ok(Server { shared, bound, admin })
    }

    /// Actual addresses by listener name (port 0 binds resolved).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.bound.iter().map(|b| (b.name.clone(), b.local_addr())).collect()
    }

    /// The admin listener's address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// The first listener's address; convenient for tests with one listener.
    pub fn local_addr(&self) -> SocketAddr {
        self.bound[0].local_addr()
    }

    /// Triggers graceful shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Accepts until the shutdown token is cancelled, then lets requests and tunnels finish
    /// (tunnels get a close frame) for up to `shutdown_timeout`.
    pub async fn run(self) {
        let Server { shared, bound, admin } = self;
        for b in bound {
            shared.start_listener(b);
        }
        if let Some(a) = admin {
            if let Ok(addr) = a.local_addr() {
                tracing::info!(addr = %addr, "admin listening: /metrics, /api/v1/status, /status");
            }
            tokio::spawn(admin::serve(a, shared.clone()));
        }
        shared.shutdown.cancelled().await;
        shared.health.stop_all();
        let grace = shared.runtime.load().shutdown_timeout;
        tracing::info!(grace = ?grace, "shutting down: finishing requests and closing tunnels");
        shared.tasks.close();
        if tokio::time::timeout(grace, shared.tasks.wait()).await.is_err() {
            tracing::warn!(remaining = shared.tasks.len(), "shutdown grace period over; closing what is left");
        }
        // Give sockets a moment to flush their last bytes.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Shared {
    fn start_listener(self: &Arc<Self>, b: listener::Bound) {
        let stop = CancellationToken::new();
        let running = listener::Running { name: b.name.clone(), addr: b.local_addr(), stop: stop.clone() };
        tracing::info!(listener = %b.name, addr = %running.addr, "listening");
        self.listeners.lock().unwrap_or_else(|e| e.into_inner()).insert(b.key.clone(), running);
        tokio::spawn(listener::accept_loop(b, stop, self.clone()));
    }

    /// Addresses of the listeners accepting now, by name.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner()).values().map(|r| (r.name.clone(), r.addr)).collect()
    }

    /// Applies `config` as a reload (see `reload::apply`).
    pub fn apply(self: &Arc<Self>, config: Config) -> Result<u64, String> {
        reload::apply(self, config)
    }
}

/// Runs `config` until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<(), StartError> {
    let server = Server::bind(config)?;
    let token = server.shutdown_token();
    let run = tokio::spawn(server.run());
    shutdown.await;
    token.cancel();
    let _ = run.await;
    Ok(())
}
