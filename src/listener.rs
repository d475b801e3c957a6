//! Listeners: bind, accept, and hand each connection to `connection::serve`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::Shared;
use crate::config::ListenerConfig;

/// A bound listener, not yet accepting.
#[derive(Debug)]
pub struct Bound {
    pub name: String,
    pub index: usize,
    pub socket: TcpListener,
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("bound socket has an address")
    }
}

pub fn bind(index: usize, cfg: &ListenerConfig) -> io::Result<Bound> {
    let socket = match cfg.bind {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(cfg.bind)?;
    let socket = socket.listen(4096)?;
    Ok(Bound { name: cfg.name.clone(), index, socket })
}

/// Accepts until shutdown. Accept errors (out of file descriptors, say) are logged and
/// retried after a short pause rather than spinning or ending the listener.
pub async fn accept_loop(bound: Bound, shared: Arc<Shared>) {
    let Bound { name, index, socket } = bound;
    loop {
        let accepted = tokio::select! {
            r = socket.accept() => r,
            _ = shared.shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let setup = shared.runtime.load().listeners[index].setup.clone();
                shared.tasks.spawn(crate::connection::serve(stream, peer, setup, shared.clone()));
            }
            Err(e) => {
                tracing::warn!(listener = %name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    tracing::info!(listener = %name, "listener stopped accepting");
}
