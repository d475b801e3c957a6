//! Access log: one line per request and per tunnel, at target `access`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hyper::Method;

use crate::tunnel::TunnelStats;

/// What one access-log line says; built only when the `access` target is enabled.
#[derive(Debug)]
pub struct AccessLog {
    pub client: SocketAddr,
    pub method: Method,
    pub path: String,
    pub status: u16,
    pub upstream: String,
    pub backend: SocketAddr,
    pub start: Instant,
    pub bytes_in: Arc<crate::upstream::ReqProgress>,
}

pub fn enabled() -> bool {
    tracing::enabled!(target: "access", tracing::Level::INFO)
}

impl AccessLog {
    pub fn emit_response(self, bytes_out: u64, complete: bool) {
        tracing::info!(
            target: "access",
            client = %self.client,
            method = %self.method,
            path = %self.path,
            status = self.status,
            upstream = %self.upstream,
            backend = %self.backend,
            bytes_in = self.bytes_in.bytes.load(Ordering::Relaxed),
            bytes_out,
            ms = self.start.elapsed().as_millis() as u64,
            complete,
            "request"
        );
    }

    pub fn emit_tunnel(self, stats: &TunnelStats) {
        tracing::info!(
            target: "access",
            client = %self.client,
            method = %self.method,
            path = %self.path,
            status = self.status,
            upstream = %self.upstream,
            backend = %self.backend,
            bytes_in = stats.client_to_server,
            bytes_out = stats.server_to_client,
            ms = self.start.elapsed().as_millis() as u64,
            end = stats.end.as_str(),
            "tunnel"
        );
    }
}

/// A response tidegate answered itself.
pub fn emit_local(client: SocketAddr, method: &Method, path: &str, status: u16, reason: &dyn std::fmt::Display) {
    tracing::info!(target: "access", client = %client, method = %method, path = %path, status, error = %reason, "local");
}
