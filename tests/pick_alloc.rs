//! A balancer pick must not allocate: counted with a global allocator that tallies
//! allocations made by the current thread while a pick runs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use hyper::{HeaderMap, Uri};
use tidegate::balancer::{Balancer, PickCtx};
use tidegate::config::{Balance, CookieConfig, Fallback, HashConfig, HashKey, IpHashMode, SameSite, ServerConfig, UpstreamConfig};
use tidegate::runtime::{Backend, BackendId, Registry};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn picks_do_not_allocate() {
    let reg = Registry::default();
    let backends: Vec<Backend> = (0..100)
        .map(|i| {
            let addr = SocketAddr::from(([10, 0, 0, i as u8], 8000));
            Backend {
                cfg: ServerConfig {
                    addr,
                    weight: NonZeroU32::new(1 + i % 3).unwrap(),
                    max_fails: 1,
                    fail_timeout: Duration::from_secs(10),
                    backup: i >= 98,
                    down: false,
                    max_conns: 0,
                },
                state: reg.get_or_create(BackendId { upstream: "u".into(), addr }),
            }
        })
        .collect();
    let cookie = CookieConfig {
        name: "tg_srv".into(),
        secret: Some("0123456789abcdef0123".into()),
        max_age: None,
        path: "/".into(),
        domain: None,
        same_site: SameSite::Lax,
        fallback: Fallback::P2c,
    };
    let balances = [
        Balance::RoundRobin,
        Balance::LeastConn,
        Balance::P2c,
        Balance::IpHash(IpHashMode::Consistent),
        Balance::IpHash(IpHashMode::Nginx),
        Balance::Cookie(cookie),
        Balance::Hash(HashConfig { key: HashKey::Header("x-user-id".into()), bounded_load: 1.25 }),
        Balance::Hash(HashConfig { key: HashKey::Query("user".into()), bounded_load: 0.0 }),
        Balance::Hash(HashConfig { key: HashKey::Cookie("sid".into()), bounded_load: 1.5 }),
        Balance::Hash(HashConfig { key: HashKey::Ip, bounded_load: 1.25 }),
        Balance::Hash(HashConfig { key: HashKey::Path, bounded_load: 0.0 }),
    ];
    let sticky = tidegate::balancer::sticky_value("u", &backends[7].cfg.addr.to_string(), Some("0123456789abcdef0123"));
    let mut headers = HeaderMap::new();
    headers.insert("x-user-id", "user-1".parse().unwrap());
    headers.insert("cookie", format!("sid=abc; tg_srv={sticky}").parse().unwrap());
    let uri = Uri::from_static("/chat?room=1&user=u7");
    for balance in balances {
        let cfg = UpstreamConfig::new("u", balance.clone(), vec![]);
        let bal = Balancer::new(&cfg, &backends);
        // Warm thread-locals (the p2c generator) outside the counted region.
        let warm =
            PickCtx { client: IpAddr::from([1, 2, 3, 4]), headers: &headers, uri: &uri, tried: &[], now_ms: 0, ignore_health: false };
        bal.pick(&backends, &warm).unwrap();
        let tried = [3usize, 7];
        COUNTING.with(|c| c.set(true));
        for k in 0..1000u32 {
            let t: &[usize] = if k % 10 == 0 { &tried } else { &[] };
            let cx =
                PickCtx { client: IpAddr::from(k.to_be_bytes()), headers: &headers, uri: &uri, tried: t, now_ms: 0, ignore_health: false };
            std::hint::black_box(bal.pick(&backends, &cx).unwrap());
        }
        COUNTING.with(|c| c.set(false));
        let n = ALLOCS.with(|a| a.replace(0));
        assert_eq!(n, 0, "{balance:?} allocated {n} times in 1000 picks");
    }
}
