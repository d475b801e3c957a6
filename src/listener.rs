//! Listeners: bind, accept, and hand each connection to `connection::serve`.
//!
//! A listener is identified across reloads by its key (`listener_key`): its bind address,
//! or its name when it binds port 0. A reload keeps the socket of every listener whose key is
//! unchanged, so there is no moment without accept.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::config::ListenerConfig;

/// Identity of a listener across config reloads.
pub fn listener_key(cfg: &ListenerConfig) -> String {
    if cfg.bind.port() == 0 { format!("name:{}", cfg.name) } else { format!("addr:{}", cfg.bind) }
}

/// A bound listener, not yet accepting.
#[derive(Debug)]
pub struct Bound {
    pub name: String,
    pub key: String,
    pub socket: TcpListener,
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("bound socket has an address")
    }
}

pub fn bind(cfg: &ListenerConfig) -> io::Result<Bound> {
    let socket = match cfg.bind {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(cfg.bind)?;
    let socket = socket.listen(4096)?;
    Ok(Bound { name: cfg.name.clone(), key: listener_key(cfg), socket })
}

/// A running listener: its address and how to stop it (a reload that removes it).
#[derive(Debug, Clone)]
pub struct Running {
    pub name: String,
    pub addr: SocketAddr,
    pub stop: CancellationToken,
}

/// Accepts until shutdown or until this listener is removed. Accept errors (out of file
/// descriptors, say) are logged and retried after a short pause rather than spinning.
pub async fn accept_loop(bound: Bound, stop: CancellationToken, shared: Arc<Shared>) {
    let Bound { name, key, socket } = bound;
    // Open connections, for `max_connections` and `max_connections_per_client`; they live
    // with the socket, so they carry over reloads that keep the listener.
    let counts = Arc::new(Counts::default());
    loop {
        let accepted = tokio::select! {
            r = socket.accept() => r,
            _ = shared.shutdown.cancelled() => break,
            _ = stop.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let rt = shared.runtime.load();
                let Some(&index) = rt.listener_index.get(&key) else { continue };
                let setup = rt.listeners[index].setup.clone();
                setup.metrics.accepted.inc();
                let generation = rt.generation;
                drop(rt);
                let Some(slot) = counts.admit(peer.ip().to_canonical(), setup.max_connections, setup.max_connections_per_client) else {
                    // Over a limit: closed at once, never queued behind the others.
                    tracing::debug!(listener = %name, peer = %peer, "connection limit reached; closed at accept");
                    continue;
                };
                match setup.mode {
                    crate::config::ListenerMode::Http => {
                        let serve = crate::connection::serve(stream, peer, setup, generation, stop.clone(), shared.clone());
                        shared.tasks.spawn(async move {
                            serve.await;
                            drop(slot);
                        });
                    }
                    _ => {
                        let serve = crate::tcp::serve(stream, peer, setup, generation, shared.clone());
                        shared.tasks.spawn(async move {
                            serve.await;
                            drop(slot);
                        });
                    }
                }
            }
            Err(e) => {
                tracing::warn!(listener = %name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    tracing::info!(listener = %name, "listener stopped accepting");
}

/// Open connections of one listener, in total and per client address.
#[derive(Debug, Default)]
struct Counts {
    total: std::sync::atomic::AtomicU32,
    per_client: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>,
}

/// One admitted connection; released on drop.
struct Slot {
    counts: Arc<Counts>,
    client: Option<std::net::IpAddr>,
}

impl Counts {
    fn admit(self: &Arc<Self>, client: std::net::IpAddr, max: u32, per_client: u32) -> Option<Slot> {
        use std::sync::atomic::Ordering;
        let total = self.total.fetch_add(1, Ordering::AcqRel) + 1;
        if max != 0 && total > max {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        if per_client == 0 {
            return Some(Slot { counts: self.clone(), client: None });
        }
        let mut map = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(client).or_insert(0);
        if *n >= per_client {
            drop(map);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        *n += 1;
        Some(Slot { counts: self.clone(), client: Some(client) })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counts.total.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        if let Some(c) = self.client {
            let mut map = self.counts.per_client.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&c);
                }
            }
        }
    }
}
