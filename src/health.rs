//! Active health checks, and the live count each server reports about itself.
//!
//! One task per checked backend, straight to the server (never through the balancer). The
//! task owns its consecutive pass/fail counters (`Counter`, a pure state machine) and
//! publishes only the verdict and the reported load into the backend's shared state, which
//! survives reloads. `HealthChecks::reconcile` runs whenever a snapshot is built: it starts
//! checks for new backends, restarts those whose settings changed, and stops the checks of
//! backends that are gone, so no check task outlives its server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::config::{HealthConfig, HealthKind, LoadReport, UpstreamTls};
use crate::runtime::{BackendId, BackendState, CheckResult, Health, Runtime, now_ms};
use crate::upstream::connect_stream;

/// Largest health response body read (for `json:` and `body` load reports).
const MAX_BODY: usize = 64 * 1024;

/// Consecutive-result bookkeeping: `rise` passes to become healthy, `fall` failures to become
/// unhealthy; an `Unknown` server becomes healthy at its first pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub state: Health,
    oks: u32,
    fails: u32,
}

impl Counter {
    pub fn new(state: Health) -> Self {
        Counter { state, oks: 0, fails: 0 }
    }

    /// Applies one result; returns the new state when it changed.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Health> {
        let before = self.state;
        if ok {
            self.fails = 0;
            self.oks += 1;
            match self.state {
                Health::Unknown => self.state = Health::Healthy,
                Health::Unhealthy if self.oks >= rise => self.state = Health::Healthy,
                _ => {}
            }
        } else {
            self.oks = 0;
            self.fails += 1;
            if self.state != Health::Unhealthy && self.fails >= fall {
                self.state = Health::Unhealthy;
            }
        }
        (self.state != before).then_some(self.state)
    }

    /// Passive checks took the server out: from now on only `rise` passes bring it back.
    pub fn force_unhealthy(&mut self) {
        self.state = Health::Unhealthy;
        self.oks = 0;
    }
}

/// The settings a check task runs with; a change restarts the task.
#[derive(Debug, Clone, PartialEq)]
struct TaskKey {
    cfg: HealthConfig,
    sni: Option<String>,
    tls: bool,
}

/// The running check tasks, by backend.
#[derive(Debug, Default)]
pub struct HealthChecks {
    tasks: Mutex<HashMap<BackendId, (TaskKey, AbortHandle)>>,
}

impl HealthChecks {
    /// Makes the running checks match `rt`. Call before `rt` is published: new backends get
    /// their initial state (`unknown`, or healthy with `start_healthy`) first.
    pub fn reconcile(&self, rt: &Runtime) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let mut wanted: HashMap<BackendId, ()> = HashMap::new();
        for u in &rt.upstreams {
            let Some(cfg) = &u.cfg.health else {
                // Not checked (any more): healthy unless passive failures say otherwise.
                for b in &u.backends {
                    if tasks.contains_key(&b.state.id) || b.state.health() != Health::Healthy {
                        b.state.set_health(Health::Healthy);
                    }
                }
                continue;
            };
            for b in u.backends.iter().filter(|b| !b.cfg.down) {
                let key = TaskKey { cfg: cfg.clone(), sni: u.cfg.tls.as_ref().and_then(|t| t.sni.clone()), tls: u.cfg.tls.is_some() };
                wanted.insert(b.state.id.clone(), ());
                if let Some((old, _)) = tasks.get(&b.state.id)
                    && *old == key
                {
                    continue;
                }
                // Only a server that never served waits for a first pass; one that already
                // serves keeps its state when checks are added or changed.
                let fresh = !tasks.contains_key(&b.state.id) && b.state.view(now_ms()).last_check.is_none() && !b.state.enter_service();
                if let Some((_, handle)) = tasks.remove(&b.state.id) {
                    handle.abort();
                }
                if fresh {
                    b.state.set_health(if cfg.start_healthy { Health::Healthy } else { Health::Unknown });
                }
                let task = tokio::spawn(run(b.state.clone(), b.cfg.addr, cfg.clone(), u.cfg.tls.clone(), u.name().to_string()));
                tasks.insert(b.state.id.clone(), (key, task.abort_handle()));
            }
        }
        for b in rt.upstreams.iter().flat_map(|u| &u.backends) {
            b.state.enter_service();
        }
        tasks.retain(|id, (_, handle)| {
            let keep = wanted.contains_key(id);
            if !keep {
                handle.abort();
                tracing::info!(upstream = %id.upstream, backend = %id.addr, "health checks stopped");
            }
            keep
        });
    }

    /// Backends with a running check task (for tests and the admin API).
    pub fn running(&self) -> Vec<BackendId> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }

    /// Stops every check (shutdown).
    pub fn stop_all(&self) {
        for (_, (_, h)) in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            h.abort();
        }
    }
}

/// Interval with up to ±10 % jitter, so checks of many servers do not synchronise.
fn jittered(interval: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let spread = interval.as_millis() as u64 / 5;
    let offset = if spread == 0 { 0 } else { u64::from(nanos) % spread };
    interval - interval / 10 + Duration::from_millis(offset)
}

async fn run(state: Arc<BackendState>, addr: SocketAddr, cfg: HealthConfig, tls: Option<UpstreamTls>, upstream: String) {
    let mut counter = Counter::new(state.health());
    let mut report_warned = false;
    let ttl = cfg.interval * 3;
    loop {
        // Passive failures may have taken the server out since the last check.
        if state.health() == Health::Unhealthy && counter.state != Health::Unhealthy {
            counter.force_unhealthy();
        }
        let started = Instant::now();
        let outcome = match tokio::time::timeout(cfg.timeout, check(addr, &cfg, tls.as_ref())).await {
            Ok(o) => o,
            Err(_) => Outcome::fail("timeout"),
        };
        let latency = started.elapsed();
        let now = now_ms();
        match (&cfg.load, &outcome.load) {
            (Some(_), Some(Ok(n))) if outcome.ok => {
                state.set_reported(*n, ttl, now);
                report_warned = false;
            }
            (Some(_), Some(Err(why))) => {
                state.clear_reported();
                if !report_warned {
                    tracing::warn!(upstream = %upstream, backend = %addr, problem = %why, "load report ignored; using the local count");
                    report_warned = true;
                }
            }
            _ => {}
        }
        state.set_last_check(CheckResult {
            ok: outcome.ok,
            reason: outcome.reason.clone(),
            latency,
            ping_rtt: outcome.ping_rtt,
            at_ms: now,
        });
        let before = counter.state;
        if let Some(new) = counter.record(outcome.ok, cfg.rise, cfg.fall) {
            state.set_health(new);
            tracing::info!(
                upstream = %upstream,
                backend = %addr,
                from = before.as_str(),
                to = new.as_str(),
                reason = %outcome.reason,
                latency_ms = latency.as_millis() as u64,
                "backend health changed"
            );
        }
        tokio::time::sleep(jittered(cfg.interval)).await;
    }
}

struct Outcome {
    ok: bool,
    reason: String,
    load: Option<Result<u32, String>>,
    ping_rtt: Option<Duration>,
}

impl Outcome {
    fn fail(reason: impl Into<String>) -> Self {
        Outcome { ok: false, reason: reason.into(), load: None, ping_rtt: None }
    }
}

fn describe(e: &crate::error::ProxyError) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s = format!("{s}: {c}");
        cur = c.source();
    }
    s
}

fn status_ok(cfg: &HealthConfig, status: StatusCode) -> bool {
    if cfg.expect.is_empty() { status.is_success() } else { cfg.expect.contains(&status.as_u16()) }
}

fn host_header(cfg: &HealthConfig, addr: SocketAddr) -> String {
    cfg.host.clone().unwrap_or_else(|| addr.to_string())
}

fn parse_count(s: &str) -> Result<u32, String> {
    s.trim().parse::<u32>().map_err(|_| format!("not a non-negative integer: {:?}", s.chars().take(40).collect::<String>()))
}

fn load_from_headers(name: &str, h: &HeaderMap) -> Result<u32, String> {
    let v = h.get(name).ok_or_else(|| format!("no {name} header"))?;
    parse_count(v.to_str().map_err(|_| format!("{name} is not text"))?)
}

async fn check(addr: SocketAddr, cfg: &HealthConfig, tls: Option<&UpstreamTls>) -> Outcome {
    let stream = match connect_stream(addr, cfg.timeout, tls, None).await {
        Ok(s) => s,
        Err(e) => return Outcome::fail(describe(&e)),
    };
    match cfg.kind {
        HealthKind::Tcp => Outcome { ok: true, reason: "connected".into(), load: None, ping_rtt: None },
        HealthKind::Http => http_check(stream, addr, cfg).await,
        HealthKind::WebSocket => ws_check(stream, addr, cfg).await,
    }
}

async fn http_check(stream: crate::upstream::UpstreamStream, addr: SocketAddr, cfg: &HealthConfig) -> Outcome {
    let (mut sender, conn) = match hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await {
        Ok(p) => p,
        Err(e) => return Outcome::fail(format!("handshake: {e}")),
    };
    tokio::spawn(conn);
    let req = Request::get(cfg.path.as_str())
        .header(header::HOST, host_header(cfg, addr))
        .header(header::USER_AGENT, "tidegate-health")
        .header(header::CONNECTION, "close")
        .body(Empty::new());
    let req = match req {
        Ok(r) => r,
        Err(e) => return Outcome::fail(format!("bad request: {e}")),
    };
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return Outcome::fail(format!("request failed: {e}")),
    };
    let status = resp.status();
    let ok = status_ok(cfg, status);
    let reason = if ok { status.as_u16().to_string() } else { format!("status {}", status.as_u16()) };
    let load = match &cfg.load {
        None => None,
        Some(LoadReport::Header(name)) => Some(load_from_headers(name, resp.headers())),
        Some(LoadReport::Json(pointer)) => Some(read_body(resp).await.and_then(|b| {
            let v: serde_json::Value = serde_json::from_slice(&b).map_err(|e| format!("body is not JSON: {e}"))?;
            let n = v.pointer(pointer).ok_or_else(|| format!("no value at JSON pointer {pointer}"))?;
            n.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| format!("value at {pointer} is not a non-negative integer"))
        })),
        Some(LoadReport::Body) => Some(read_body(resp).await.and_then(|b| parse_count(&String::from_utf8_lossy(&b)))),
    };
    Outcome { ok, reason, load, ping_rtt: None }
}

async fn read_body(resp: hyper::Response<hyper::body::Incoming>) -> Result<Bytes, String> {
    Limited::new(resp.into_body(), MAX_BODY).collect().await.map(|b| b.to_bytes()).map_err(|e| format!("body: {e}"))
}

/// A real WebSocket handshake (tungstenite checks `Sec-WebSocket-Accept`), a ping whose pong
/// gives the round-trip time, and a clean close with 1000.
async fn ws_check(stream: crate::upstream::UpstreamStream, addr: SocketAddr, cfg: &HealthConfig) -> Outcome {
    let scheme = "ws";
    let uri = format!("{scheme}://{}{}", host_header(cfg, addr), cfg.path);
    let mut req = match tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(uri.as_str()) {
        Ok(r) => r,
        Err(e) => return Outcome::fail(format!("bad request: {e}")),
    };
    req.headers_mut().insert(header::USER_AGENT, HeaderValue::from_static("tidegate-health"));
    let (mut ws, resp) = match tokio_tungstenite::client_async(req, stream).await {
        Ok(p) => p,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            return Outcome::fail(format!("status {} to the WebSocket handshake", resp.status().as_u16()));
        }
        Err(e) => return Outcome::fail(format!("WebSocket handshake failed: {e}")),
    };
    let load = match &cfg.load {
        Some(LoadReport::Header(name)) => Some(load_from_headers(name, resp.headers())),
        _ => None,
    };
    let sent = Instant::now();
    if let Err(e) = ws.send(Message::Ping(Bytes::from_static(b"tidegate"))).await {
        return Outcome::fail(format!("ping failed: {e}"));
    }
    let rtt = loop {
        match ws.next().await {
            Some(Ok(Message::Pong(p))) if p.as_ref() == b"tidegate" => break sent.elapsed(),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Outcome::fail(format!("no pong: {e}")),
            None => return Outcome::fail("closed before pong"),
        }
    };
    let _ = ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() })).await;
    while let Some(Ok(_)) = ws.next().await {}
    Outcome { ok: true, reason: "101".into(), load, ping_rtt: Some(rtt) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_becomes_healthy_at_first_pass() {
        let mut c = Counter::new(Health::Unknown);
        assert_eq!(c.record(true, 2, 3), Some(Health::Healthy));
    }

    #[test]
    fn fall_and_rise_count_consecutive_results() {
        let mut c = Counter::new(Health::Healthy);
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), Some(Health::Unhealthy));
        assert_eq!(c.record(true, 2, 3), None);
        assert_eq!(c.record(true, 2, 3), Some(Health::Healthy));
        // A pass in between resets the failures.
        c.record(false, 2, 3);
        c.record(false, 2, 3);
        c.record(true, 2, 3);
        assert_eq!(c.record(false, 2, 3), None);
    }

    #[test]
    fn flapping_server_never_rises() {
        let mut c = Counter::new(Health::Unhealthy);
        for i in 0..100 {
            assert_eq!(c.record(i % 2 == 0, 2, 3), None);
            assert_eq!(c.state, Health::Unhealthy);
        }
    }

    #[test]
    fn unknown_falls_after_fall_failures() {
        let mut c = Counter::new(Health::Unknown);
        assert_eq!(c.record(false, 2, 2), None);
        assert_eq!(c.record(false, 2, 2), Some(Health::Unhealthy));
    }

    #[test]
    fn passive_trip_needs_rise_passes() {
        let mut c = Counter::new(Health::Healthy);
        c.force_unhealthy();
        assert_eq!(c.record(true, 3, 3), None);
        assert_eq!(c.record(true, 3, 3), None);
        assert_eq!(c.record(true, 3, 3), Some(Health::Healthy));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..100 {
            let j = jittered(Duration::from_secs(2));
            assert!(j >= Duration::from_millis(1800) && j <= Duration::from_millis(2200), "{j:?}");
        }
    }
}
