//! Layer 4: a `tcp` listener balances each connection to a server of its upstream and splices
//! the bytes (optionally terminating TLS first); a `tls_passthrough` listener reads the
//! ClientHello's server name without terminating TLS, routes by it, and forwards every byte
//! untouched. Same balancing, live counts, health, max_conns, backup, failover on connect
//! failure, drain and timeouts as HTTP; the relay is the tunnel's.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use hyper::{HeaderMap, Uri};
use tokio::net::TcpStream;

use crate::Shared;
use crate::balancer::{NoPick, PickCtx};
use crate::config::ListenerMode;
use crate::connection::{ClientStream, ListenerSetup, proxied_client};
use crate::error::ProxyError;
use crate::runtime::{ConnGuard, Runtime, now_ms};
use crate::sni::{Hello, MAX_HELLO};
use crate::upstream::{UpstreamStream, connect_stream};

fn empty_headers() -> &'static HeaderMap {
    static H: OnceLock<HeaderMap> = OnceLock::new();
    H.get_or_init(HeaderMap::new)
}

fn root_uri() -> &'static Uri {
    static U: OnceLock<Uri> = OnceLock::new();
    U.get_or_init(|| Uri::from_static("/"))
}

/// Serves one accepted connection on a `tcp` or `tls_passthrough` listener.
pub async fn serve(mut stream: TcpStream, peer: SocketAddr, setup: ListenerSetup, generation: u64, shared: Arc<Shared>) {
    let start = Instant::now();
    let client = match proxied_client(&mut stream, peer, &setup).await {
        Ok(c) => c,
        Err(e) => return tracing::debug!("{e}; connection closed"),
    };
    let local = stream.local_addr().unwrap_or(peer);
    let _open = crate::admin::metrics::GaugeGuard::new(&setup.metrics.open);
    let rt = shared.runtime.load_full();
    let li = if rt.generation == generation { Some(setup.index) } else { rt.listener_index.get(&*setup.key).copied() };
    let Some(li) = li else { return };
    let listener = &rt.listeners[li];

    let (client_io, upstream_idx, sni) = match setup.mode {
        ListenerMode::TlsPassthrough => {
            let sni = match tokio::time::timeout(setup.timeouts.header_read, peek_hello(&stream)).await {
                Ok(Ok(sni)) => sni,
                Ok(Err(why)) => return tracing::debug!(client = %client, problem = why, "ClientHello refused; connection closed"),
                Err(_) => return tracing::debug!(client = %client, "no ClientHello in time; connection closed"),
            };
            let Some(u) = listener.router.find_sni(sni.as_deref()) else {
                return tracing::debug!(client = %client, sni = ?sni, "no route for this server name; connection closed");
            };
            (ClientStream::Tcp(stream), u, sni)
        }
        _ => {
            let io = match &setup.tls {
                None => ClientStream::Tcp(stream),
                Some((acceptor, deadline)) => match tokio::time::timeout(*deadline, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => {
                        setup.metrics.tls_ok.inc();
                        ClientStream::Tls(Box::new(s))
                    }
                    Ok(Err(e)) => {
                        setup.metrics.tls_failed.inc();
                        return tracing::debug!(client = %client, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        setup.metrics.tls_failed.inc();
                        return tracing::debug!(client = %client, "TLS handshake timed out");
                    }
                },
            };
            let Some(u) = listener.router.find_sni(None) else { return };
            (io, u, None)
        }
    };

    let (server, guard, addr) = match connect(&rt, upstream_idx, client, local).await {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(client = %client, upstream = %rt.upstreams[upstream_idx].name(), error = %e, "no server for TCP connection; closed");
            return;
        }
    };
    let upstream = &rt.upstreams[upstream_idx];
    let idle = upstream.cfg.timeouts.tunnel_idle;
    let spread = upstream.cfg.drain.spread.min(rt.shutdown_timeout / 2);
    let close = crate::tunnel::close_signal(shared.shutdown.clone(), guard.backend().drain_watch(), spread);
    let name = upstream.name().to_string();
    let um = upstream.metrics.clone();
    drop(rt);
    let bm = guard.backend().metrics.clone();
    bm.tunnels_opened.inc();
    let open = crate::admin::metrics::GaugeGuard::new(&bm.tunnels_open);
    let stats = crate::tunnel::relay(client_io, Vec::new(), server, Vec::new(), idle, close, false).await;
    drop(open);
    bm.tunnels_closed[stats.end.reason() as usize].inc();
    um.bytes_in.inc_by(stats.client_to_server);
    um.bytes_out.inc_by(stats.server_to_client);
    drop(guard);
    tracing::info!(
        target: "access",
        client = %client,
        sni = sni.as_deref().unwrap_or("-"),
        upstream = %name,
        backend = %addr,
        bytes_in = stats.client_to_server,
        bytes_out = stats.server_to_client,
        ms = start.elapsed().as_millis() as u64,
        end = stats.end.as_str(),
        "tcp"
    );
}

/// Waits for a whole ClientHello without consuming it (it is forwarded as it came).
async fn peek_hello(stream: &TcpStream) -> Result<Option<String>, &'static str> {
    let mut buf = vec![0u8; MAX_HELLO];
    let mut last = 0;
    loop {
        let n = stream.peek(&mut buf).await.map_err(|_| "read error")?;
        if n == 0 {
            return Err("closed before a ClientHello");
        }
        match crate::sni::parse(&buf[..n]) {
            Hello::Done(sni) => return Ok(sni),
            Hello::Invalid(why) => return Err(why),
            Hello::Incomplete if n == last => tokio::time::sleep(std::time::Duration::from_millis(2)).await,
            Hello::Incomplete => last = n,
        }
    }
}

/// Picks and connects, moving to the next server on a failed connect.
async fn connect(
    rt: &Runtime,
    idx: usize,
    client: SocketAddr,
    local: SocketAddr,
) -> Result<(UpstreamStream, ConnGuard, SocketAddr), ProxyError> {
    let upstream = &rt.upstreams[idx];
    let tries = if upstream.cfg.tries == 0 { upstream.backends.len() } else { upstream.cfg.tries };
    let preamble = upstream.cfg.send_proxy.map(|v| crate::proxy_protocol::encode(v, client, local));
    let ignore_health = upstream.in_panic();
    let mut tried: Vec<usize> = Vec::new();
    let mut last_err = None;
    while tried.len() < tries {
        let cx = PickCtx { client: client.ip(), headers: empty_headers(), uri: root_uri(), tried: &tried, now_ms: now_ms(), ignore_health };
        let i = match upstream.balancer.pick(&upstream.backends, &cx) {
            Ok(p) => p.index,
            Err(NoPick::Full) if last_err.is_none() => return Err(ProxyError::AllFull { upstream: upstream.name().to_string() }),
            Err(_) => break,
        };
        tried.push(i);
        let backend = &upstream.backends[i];
        let Some(guard) = backend.state.try_acquire(backend.cfg.max_conns) else { continue };
        backend.state.metrics.picks.inc();
        let started = Instant::now();
        match connect_stream(backend.addr(), upstream.cfg.timeouts.connect, upstream.cfg.tls.as_ref(), preamble.as_deref()).await {
            Ok(s) => {
                upstream.metrics.connect_seconds.observe(started.elapsed().as_secs_f64());
                backend.state.record_success();
                return Ok((s, guard, backend.addr()));
            }
            Err(e) => {
                let counts = if matches!(e, ProxyError::ConnectTimeout { .. }) {
                    upstream.cfg.fail_on.timeout
                } else {
                    upstream.cfg.fail_on.connect
                };
                if counts {
                    upstream.passive_failure(i);
                }
                tracing::warn!(upstream = %upstream.name(), backend = %backend.addr(), error = %e, "connect failed, trying next server");
                last_err = Some(e);
            }
        }
    }
    Err(last_err.unwrap_or_else(|| ProxyError::NoServer { upstream: upstream.name().to_string() }))
}
