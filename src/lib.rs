//! tidegate: an edge proxy for WebSocket clusters.
//!
//! Data flows `listener → connection → proxy (route → balancer → upstream) → tunnel`.
//! `main.rs` only parses the CLI; tests and examples start the same `Server`.

#![forbid(unsafe_code)]

pub mod access;
pub mod balancer;
pub mod body;
pub mod config;
pub mod connection;
pub mod demo;
pub mod error;
pub mod framing;
pub mod health;
pub mod listener;
pub mod proxy;
pub mod route;
pub mod runtime;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
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
}

impl Shared {
    /// Builds a snapshot from `config` and makes it current; per-backend state (live counts,
    /// health, failures, pools) carries over by identity, and health checks follow the new
    /// config (started, restarted or stopped). Listeners are not rebound here: a config whose
    /// listeners differ is refused.
    pub fn apply(&self, config: Config) -> Result<(), String> {
        {
            let current = self.runtime.load();
            let old: Vec<(&str, SocketAddr)> = current.config.listeners.iter().map(|l| (l.name.as_str(), l.bind)).collect();
            let new: Vec<(&str, SocketAddr)> = config.listeners.iter().map(|l| (l.name.as_str(), l.bind)).collect();
            if old != new {
                return Err("listeners changed (name or bind); that needs a restart".into());
            }
        }
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let runtime = Runtime::build(config, &self.registry)?;
        self.health.reconcile(&runtime);
        self.runtime.store(Arc::new(runtime));
        Ok(())
    }
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
}

impl Server {
    /// Binds every listener of `config`; nothing is accepted until `run`.
    pub fn bind(config: Config) -> Result<Server, StartError> {
        let mut bound = Vec::new();
        for (i, l) in config.listeners.iter().enumerate() {
            let b = listener::bind(i, l).map_err(|source| StartError::Bind { name: l.name.clone(), addr: l.bind, source })?;
            bound.push(b);
        }
        let registry = Registry::default();
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let runtime = Runtime::build(config, &registry).map_err(StartError::Setup)?;
        let health = health::HealthChecks::default();
        health.reconcile(&runtime);
        let shared = Arc::new(Shared {
            runtime: ArcSwap::from_pointee(runtime),
            registry,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            health,
        });
        Ok(Server { shared, bound })
    }

    /// Actual addresses by listener name (port 0 binds resolved).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.bound.iter().map(|b| (b.name.clone(), b.local_addr())).collect()
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
        let Server { shared, bound } = self;
        for b in bound {
            tracing::info!(listener = %b.name, addr = %b.local_addr(), "listening");
            tokio::spawn(listener::accept_loop(b, shared.clone()));
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
