//! The admin listener (`[admin] bind`): Prometheus metrics, a JSON API to see and steer the
//! servers, and a live status page.
//!
//! - `GET /metrics`: Prometheus text format.
//! - `GET /api/v1/status`: every upstream and server (health, weights, local / reported /
//!   merged load, tunnels, drain state) and the config (file, generation, reloads).
//! - `POST /api/v1/upstreams/{u}/servers/{addr}/{drain,undrain,down,up}`: runtime overrides.
//!   `drain`: no new connections, open tunnels stay. `down`: no new connections, and open
//!   tunnels close as in a config drain (`drain_timeout`, `drain_spread`). They live in the
//!   server's state, so they survive a reload that keeps the server, and show in `status`.
//! - `POST /api/v1/reload`: reload the config file, as SIGHUP does.
//! - `GET /status`: one self-contained HTML page refreshing from the API.
//!
//! With a `token`, mutating calls need `Authorization: Bearer TOKEN`; on a non-loopback bind
//! every call does (and `check` refuses such a bind without a token). Errors are JSON.

pub mod metrics;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::Shared;
use crate::runtime::{AdminFlags, DrainPlan, Health, now_ms};

const PAGE: &str = include_str!("status.html");

/// Serves the admin listener until shutdown.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = shared.shutdown.cancelled() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, peer, &shared).await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let text = serde_json::to_string_pretty(body).unwrap_or_else(|e| format!("{{\"error\":\"cannot encode: {e}\"}}"));
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    #[derive(Serialize)]
    struct E {
        error: String,
    }
    json(status, &E { error: message.into() })
}

fn authorized(req: &Request<Incoming>, token: Option<&str>) -> bool {
    let Some(token) = token else { return true };
    let Some(given) = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")) else {
        return false;
    };
    // Constant time: the comparison does not stop at the first differing byte.
    given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn handle(req: Request<Incoming>, peer: SocketAddr, shared: &Arc<Shared>) -> Response<Full<Bytes>> {
    let (token, open_reads) = {
        let rt = shared.runtime.load();
        let admin = rt.config.admin.clone();
        let token = admin.as_ref().and_then(|a| a.token.clone());
        (token, admin.is_none_or(|a| a.bind.ip().is_loopback()))
    };
    let mutating = req.method() == Method::POST;
    // The page itself holds no data (it asks for the token and sends it with its API calls).
    let page = req.method() == Method::GET && matches!(req.uri().path(), "/status" | "/");
    if (mutating || !(open_reads || page)) && !authorized(&req, token.as_deref()) {
        tracing::warn!(peer = %peer, method = %req.method(), path = %req.uri().path(), "admin call without a valid token");
        let mut r = error(StatusCode::UNAUTHORIZED, "this call needs Authorization: Bearer <admin token>");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["metrics"]) => {
            let rt = shared.runtime.load();
            let text = shared.registry.metrics.render(
                &rt,
                shared.reloads.ok.load(std::sync::atomic::Ordering::Relaxed),
                shared.reloads.failed.load(std::sync::atomic::Ordering::Relaxed),
            );
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            r
        }
        (Method::GET, ["status"]) | (Method::GET, [""]) => {
            let mut r = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            r
        }
        (Method::GET, ["api", "v1", "status"]) => json(StatusCode::OK, &status(shared)),
        (Method::POST, ["api", "v1", "reload"]) => {
            let source = shared.runtime.load().config.source.clone();
            let shared2 = shared.clone();
            let result = tokio::task::spawn_blocking(move || crate::reload::reload_file(&shared2, &source)).await;
            crate::reload::write_status(shared);
            match result {
                Ok(Ok(generation)) => json(StatusCode::OK, &serde_json::json!({ "ok": true, "generation": generation })),
                Ok(Err(message)) => error(StatusCode::UNPROCESSABLE_ENTITY, message),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("reload task failed: {e}")),
            }
        }
        (Method::POST, ["api", "v1", "upstreams", upstream, "servers", addr, action]) => steer(shared, upstream, addr, action),
        (_, ["metrics"] | ["status"] | [""] | ["api", "v1", "status"]) => not_allowed("GET"),
        (_, ["api", "v1", "reload"] | ["api", "v1", "upstreams", _, "servers", _, _]) => not_allowed("POST"),
        _ => error(StatusCode::NOT_FOUND, format!("no such admin endpoint: {path}")),
    }
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut r = error(StatusCode::METHOD_NOT_ALLOWED, format!("method not allowed here; use {allow}"));
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

fn steer(shared: &Shared, upstream: &str, addr: &str, action: &str) -> Response<Full<Bytes>> {
    let rt = shared.runtime.load();
    let Some(u) = rt.upstreams.iter().find(|u| u.name() == upstream) else {
        return error(StatusCode::NOT_FOUND, format!("no upstream {upstream:?}"));
    };
    let Some(b) = u.backends.iter().find(|b| b.addr().to_string() == addr) else {
        return error(StatusCode::NOT_FOUND, format!("no server {addr} in upstream {upstream:?}"));
    };
    let mut flags = b.state.admin();
    match action {
        "drain" => flags.drain = true,
        "undrain" => flags.drain = false,
        "down" => flags.down = true,
        "up" => flags.down = false,
        other => return error(StatusCode::NOT_FOUND, format!("unknown action {other:?}; expected drain, undrain, down or up")),
    }
    b.state.set_admin(flags);
    if action == "down" {
        let d = u.cfg.drain;
        b.state.start_drain(DrainPlan { since: Instant::now(), timeout: d.timeout, spread: d.spread, close_code: d.close_code });
    } else if action == "up" && !b.cfg.down {
        b.state.stop_drain();
    }
    tracing::info!(upstream = %upstream, server = %addr, action, "admin API: server {action}");
    json(StatusCode::OK, &server_view(u, b, now_ms()))
}

#[derive(Serialize)]
struct Status {
    config_file: String,
    generation: u64,
    /// Seconds since the Unix epoch of the last applied reload (or start).
    loaded_at: Option<u64>,
    reloads: Reloads,
    upstreams: Vec<UpstreamView>,
}

#[derive(Serialize)]
struct Reloads {
    ok: u64,
    failed: u64,
    history: Vec<ReloadView>,
}

#[derive(Serialize)]
struct ReloadView {
    attempt: u64,
    at: u64,
    ok: bool,
    generation: u64,
    message: String,
    took_ms: f64,
}

#[derive(Serialize)]
struct UpstreamView {
    name: String,
    balance: &'static str,
    health_checks: bool,
    servers: Vec<ServerView>,
}

#[derive(Serialize)]
struct ServerView {
    addr: String,
    weight: u32,
    backup: bool,
    /// `down` in the config file.
    down: bool,
    /// unknown, healthy, unhealthy ("healthy" when not checked and not failed).
    health: &'static str,
    /// Passive failures took it out for fail_timeout.
    failed: bool,
    last_check: Option<CheckView>,
    local: u32,
    reported: Option<u32>,
    merged: u32,
    /// Picks so far (requests and tunnels sent to it).
    picks: u64,
    tunnels: i64,
    /// Closing its tunnels (removed, down in the file, or `down` through the API).
    draining: bool,
    admin: AdminView,
}

#[derive(Serialize)]
struct AdminView {
    drain: bool,
    down: bool,
}

#[derive(Serialize)]
struct CheckView {
    ok: bool,
    reason: String,
    latency_ms: f64,
    ping_rtt_ms: Option<f64>,
    age_ms: u64,
}

fn server_view(u: &crate::runtime::Upstream, b: &crate::runtime::Backend, now: u64) -> ServerView {
    let v = b.state.view(now);
    let AdminFlags { drain, down } = b.state.admin();
    ServerView {
        addr: b.addr().to_string(),
        weight: b.cfg.weight.get(),
        backup: b.cfg.backup,
        down: b.cfg.down,
        health: if u.cfg.health.is_some() { v.health.as_str() } else { Health::Healthy.as_str() },
        failed: !b.state.is_available(now),
        last_check: v.last_check.map(|c| CheckView {
            ok: c.ok,
            reason: c.reason,
            latency_ms: c.latency.as_secs_f64() * 1000.0,
            ping_rtt_ms: c.ping_rtt.map(|d| d.as_secs_f64() * 1000.0),
            age_ms: now.saturating_sub(c.at_ms),
        }),
        local: v.local,
        reported: v.reported,
        merged: v.merged,
        picks: b.state.metrics.picks.get(),
        tunnels: b.state.metrics.tunnels_open.get(),
        draining: b.state.is_draining(),
        admin: AdminView { drain, down },
    }
}

fn status(shared: &Shared) -> Status {
    let rt = shared.runtime.load();
    let now = now_ms();
    let history: Vec<ReloadView> = shared
        .reloads
        .history()
        .into_iter()
        .map(|o| ReloadView {
            attempt: o.attempt,
            at: o.at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            ok: o.ok,
            generation: o.generation,
            message: o.message,
            took_ms: o.took.as_secs_f64() * 1000.0,
        })
        .collect();
    Status {
        config_file: rt.config.source.display().to_string(),
        generation: rt.generation,
        loaded_at: Some(rt.loaded_at),
        reloads: Reloads {
            ok: shared.reloads.ok.load(std::sync::atomic::Ordering::Relaxed),
            failed: shared.reloads.failed.load(std::sync::atomic::Ordering::Relaxed),
            history,
        },
        upstreams: rt
            .upstreams
            .iter()
            .map(|u| UpstreamView {
                name: u.name().to_string(),
                balance: u.cfg.balance.name(),
                health_checks: u.cfg.health.is_some(),
                servers: u.backends.iter().map(|b| server_view(u, b, now)).collect(),
            })
            .collect(),
    }
}
