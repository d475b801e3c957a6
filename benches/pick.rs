//! Cost of one balancer pick, per algorithm, with 3, 100 and 1,000 servers.
//!
//!     cargo bench --bench pick
//!
//! Servers carry live load (a few open connections each) so least-connection and
//! bounded-load picks do real comparisons.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use hyper::{HeaderMap, Uri};
use tidegate::balancer::{Balancer, PickCtx};
use tidegate::config::{Balance, CookieConfig, Fallback, HashConfig, HashKey, IpHashMode, SameSite, ServerConfig, UpstreamConfig};
use tidegate::runtime::{Backend, BackendId, ConnGuard, Registry};

fn balances() -> Vec<(&'static str, Balance)> {
    vec![
        ("round_robin", Balance::RoundRobin),
        ("least_conn", Balance::LeastConn),
        ("p2c", Balance::P2c),
        ("ip_hash", Balance::IpHash(IpHashMode::Consistent)),
        ("ip_hash_nginx", Balance::IpHash(IpHashMode::Nginx)),
        (
            "cookie",
            Balance::Cookie(CookieConfig {
                name: "tg_srv".into(),
                secret: Some("0123456789abcdef0123".into()),
                max_age: None,
                path: "/".into(),
                domain: None,
                same_site: SameSite::Lax,
                fallback: Fallback::LeastConn,
            }),
        ),
        ("hash_bounded", Balance::Hash(HashConfig { key: HashKey::Header("x-user-id".into()), bounded_load: 1.25 })),
        ("hash", Balance::Hash(HashConfig { key: HashKey::Header("x-user-id".into()), bounded_load: 0.0 })),
    ]
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    group.warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    for n in [3usize, 100, 1000] {
        let reg = Registry::default();
        let backends: Vec<Backend> = (0..n)
            .map(|i| {
                let addr = SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 8000));
                Backend {
                    cfg: ServerConfig {
                        addr,
                        weight: NonZeroU32::new(1 + (i % 3) as u32).unwrap(),
                        max_fails: 1,
                        fail_timeout: Duration::from_secs(10),
                        backup: false,
                        down: false,
                        max_conns: 0,
                    },
                    state: reg.get_or_create(BackendId { upstream: "u".into(), addr }),
                }
            })
            .collect();
        let _load: Vec<ConnGuard> =
            backends.iter().enumerate().flat_map(|(i, b)| (0..(i % 5)).map(|_| b.state.try_acquire(0).unwrap())).collect();
        for (name, balance) in balances() {
            let cfg = UpstreamConfig::new("u", balance, backends.iter().map(|b| b.cfg.clone()).collect());
            let bal = Balancer::new(&cfg, &backends);
            let mut headers = HeaderMap::new();
            headers.insert("x-user-id", "user-4711".parse().unwrap());
            let sticky = tidegate::balancer::sticky_value("u", &backends[n / 2].cfg.addr.to_string(), Some("0123456789abcdef0123"));
            headers.insert("cookie", format!("a=b; tg_srv={sticky}").parse().unwrap());
            let uri = Uri::from_static("/chat?room=1");
            let mut ip = 0u32;
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    ip = ip.wrapping_add(0x9e37_79b9);
                    let cx = PickCtx {
                        client: IpAddr::from(ip.to_be_bytes()),
                        headers: &headers,
                        uri: &uri,
                        tried: &[],
                        now_ms: 0,
                        ignore_health: false,
                    };
                    std::hint::black_box(bal.pick(&backends, &cx))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
