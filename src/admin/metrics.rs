//! Prometheus metrics through `prometheus-client`. Labels are bounded: listener, upstream,
//! server (and a status class, a close reason, a direction) — never client addresses or
//! paths. The data path holds pre-resolved handles (`ListenerMetrics`, `UpstreamMetrics`,
//! `BackendMetrics`), so counting costs an atomic add, not a label lookup; per-server state
//! (health, loads) is read from the live snapshot at scrape time.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::runtime::{Health, Runtime, now_ms};

type Labels = Vec<(&'static str, String)>;

fn histogram() -> Histogram {
    // 100 µs … ~100 s
    Histogram::new(exponential_buckets(0.0001, 4.0, 11))
}

/// Every metric family tidegate exports.
pub struct Metrics {
    registry: Registry,
    conns_accepted: Family<Labels, Counter>,
    conns_open: Family<Labels, Gauge>,
    tls_handshakes: Family<Labels, Counter>,
    requests: Family<Labels, Counter>,
    local_responses: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    connect_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    request_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    picks: Family<Labels, Counter>,
    tunnels_open: Family<Labels, Gauge>,
    tunnels_opened: Family<Labels, Counter>,
    tunnels_closed: Family<Labels, Counter>,
    // Read from the snapshot at scrape time.
    server_health: Family<Labels, Gauge>,
    server_check_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    server_load: Family<Labels, Gauge>,
    server_draining: Family<Labels, Gauge>,
    reloads: Family<Labels, Counter>,
    generation: Gauge,
    drains: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tidegate");
        let m = Metrics {
            conns_accepted: Family::default(),
            conns_open: Family::default(),
            tls_handshakes: Family::default(),
            requests: Family::default(),
            local_responses: Family::default(),
            bytes: Family::default(),
            connect_seconds: Family::new_with_constructor(histogram),
            request_seconds: Family::new_with_constructor(histogram),
            picks: Family::default(),
            tunnels_open: Family::default(),
            tunnels_opened: Family::default(),
            tunnels_closed: Family::default(),
            server_health: Family::default(),
            server_check_seconds: Family::default(),
            server_load: Family::default(),
            server_draining: Family::default(),
            reloads: Family::default(),
            generation: Gauge::default(),
            drains: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("connections_accepted", "Client connections accepted, per listener", m.conns_accepted.clone());
        registry.register("connections_open", "Client connections open, per listener", m.conns_open.clone());
        registry.register("tls_handshakes", "TLS handshakes on listeners, by result (ok, failed)", m.tls_handshakes.clone());
        registry.register("requests", "Proxied requests, per upstream and response status class", m.requests.clone());
        registry.register("local_responses", "Responses tidegate answered itself (404, 502, 503...), by status", m.local_responses.clone());
        registry.register("bytes", "Body and tunnel bytes per upstream, by direction (in: client to server)", m.bytes.clone());
        registry.register("upstream_connect_seconds", "Time to connect to a server (TCP and TLS), per upstream", m.connect_seconds.clone());
        registry.register("request_duration_seconds", "Request sent to response head received, per upstream", m.request_seconds.clone());
        registry.register("picks", "Times the balancer chose each server", m.picks.clone());
        registry.register("tunnels_open", "Open tunnels (WebSocket and TCP), per server", m.tunnels_open.clone());
        registry.register("tunnels_opened", "Tunnels opened, per server", m.tunnels_opened.clone());
        registry.register(
            "tunnels_closed",
            "Tunnels closed, per server and reason (client, server, idle, drain, shutdown, error)",
            m.tunnels_closed.clone(),
        );
        registry.register(
            "server_health",
            "Active health: 1 healthy, 0 unhealthy, -1 unknown (checked servers only)",
            m.server_health.clone(),
        );
        registry.register("server_check_latency_seconds", "Duration of the last active health check", m.server_check_seconds.clone());
        registry.register(
            "server_load",
            "Live connections per server: local, reported (by the server) and merged (what balancers use)",
            m.server_load.clone(),
        );
        registry.register(
            "server_draining",
            "1 while a server drains (removed, down, or drained through the admin API)",
            m.server_draining.clone(),
        );
        registry.register("reloads", "Config reloads, by result (ok, failed)", m.reloads.clone());
        registry.register(
            "config_generation",
            "Generation of the config in force (1 at start, +1 per applied reload)",
            m.generation.clone(),
        );
        registry.register("drains_in_progress", "Servers draining now", m.drains.clone());
        Metrics { registry, ..m }
    }
}

/// Counting handles for one listener.
#[derive(Debug, Clone, Default)]
pub struct ListenerMetrics {
    pub accepted: Counter,
    pub open: Gauge,
    pub tls_ok: Counter,
    pub tls_failed: Counter,
}

/// Counting handles for one upstream.
#[derive(Debug, Clone)]
pub struct UpstreamMetrics {
    /// By status class: 1xx … 5xx.
    pub requests: [Counter; 5],
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub connect_seconds: Histogram,
    pub request_seconds: Histogram,
}

/// Counting handles for one server.
#[derive(Debug, Clone, Default)]
pub struct BackendMetrics {
    pub picks: Counter,
    pub tunnels_open: Gauge,
    pub tunnels_opened: Counter,
    /// By `CloseReason as usize`.
    pub tunnels_closed: [Counter; 6],
}

/// Why a tunnel closed, for `tunnels_closed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Client = 0,
    Server = 1,
    Idle = 2,
    Drain = 3,
    Shutdown = 4,
    Error = 5,
}

const REASONS: [&str; 6] = ["client", "server", "idle", "drain", "shutdown", "error"];

impl Metrics {
    pub fn listener(&self, name: &str) -> ListenerMetrics {
        let l = vec![("listener", name.to_string())];
        let tls = |r: &str| {
            let mut l = l.clone();
            l.push(("result", r.to_string()));
            self.tls_handshakes.get_or_create_owned(&l)
        };
        ListenerMetrics {
            accepted: self.conns_accepted.get_or_create_owned(&l),
            open: self.conns_open.get_or_create_owned(&l),
            tls_ok: tls("ok"),
            tls_failed: tls("failed"),
        }
    }

    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        let l = vec![("upstream", name.to_string())];
        let with = |k: &'static str, v: &str| {
            let mut l = l.clone();
            l.push((k, v.to_string()));
            l
        };
        UpstreamMetrics {
            requests: ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|c| self.requests.get_or_create_owned(&with("class", c))),
            bytes_in: self.bytes.get_or_create_owned(&with("direction", "in")),
            bytes_out: self.bytes.get_or_create_owned(&with("direction", "out")),
            connect_seconds: self.connect_seconds.get_or_create_owned(&l),
            request_seconds: self.request_seconds.get_or_create_owned(&l),
        }
    }

    pub fn backend(&self, upstream: &str, server: &str) -> BackendMetrics {
        let l = vec![("upstream", upstream.to_string()), ("server", server.to_string())];
        BackendMetrics {
            picks: self.picks.get_or_create_owned(&l),
            tunnels_open: self.tunnels_open.get_or_create_owned(&l),
            tunnels_opened: self.tunnels_opened.get_or_create_owned(&l),
            tunnels_closed: REASONS.map(|r| {
                let mut l = l.clone();
                l.push(("reason", r.to_string()));
                self.tunnels_closed.get_or_create_owned(&l)
            }),
        }
    }

    pub fn local_response(&self, status: u16) {
        self.local_responses.get_or_create(&vec![("status", status.to_string())]).inc();
    }

    /// The text exposition, with per-server gauges read from `rt` now.
    pub fn render(&self, rt: &Runtime, reloads_ok: u64, reloads_failed: u64) -> String {
        let now = now_ms();
        self.server_health.clear();
        self.server_check_seconds.clear();
        self.server_load.clear();
        self.server_draining.clear();
        let mut drains = 0;
        for u in &rt.upstreams {
            for b in &u.backends {
                let l = vec![("upstream", u.name().to_string()), ("server", b.addr().to_string())];
                let v = b.state.view(now);
                if u.cfg.health.is_some() {
                    let h = match v.health {
                        Health::Healthy => 1,
                        Health::Unhealthy => 0,
                        Health::Unknown => -1,
                    };
                    self.server_health.get_or_create(&l).set(h);
                    if let Some(c) = &v.last_check {
                        self.server_check_seconds.get_or_create(&l).set(c.latency.as_secs_f64());
                    }
                }
                for (kind, value) in [("local", Some(v.local)), ("reported", v.reported), ("merged", Some(v.merged))] {
                    if let Some(value) = value {
                        let mut l = l.clone();
                        l.push(("kind", kind.to_string()));
                        self.server_load.get_or_create(&l).set(i64::from(value));
                    }
                }
                let draining = b.state.is_draining() || b.state.admin().drain;
                drains += i64::from(draining);
                self.server_draining.get_or_create(&l).set(i64::from(draining));
            }
        }
        self.drains.set(drains);
        self.generation.set(rt.generation as i64);
        set_counter(&self.reloads.get_or_create_owned(&vec![("result", "ok".into())]), reloads_ok);
        set_counter(&self.reloads.get_or_create_owned(&vec![("result", "failed".into())]), reloads_failed);
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Brings a counter up to `value` (reload counts live in `ReloadStats`).
fn set_counter(c: &Counter, value: u64) {
    let cur = c.get();
    if value > cur {
        c.inc_by(value - cur);
    }
}

/// Holds one unit of a gauge (open connections, open tunnels) until dropped.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(g: &Gauge) -> Self {
        g.inc();
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
