use super::*;
use crate::config::ServerConfig;
use crate::runtime::{BackendId, ConnGuard, Registry};
use proptest::prelude::*;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

fn backends_on(reg: &Registry, spec: &[(u32, bool)], base_port: u16) -> Vec<Backend> {
    spec.iter()
        .enumerate()
        .map(|(i, &(w, backup))| {
            let addr = SocketAddr::from(([127, 0, 0, 1], base_port + i as u16));
            Backend {
                cfg: ServerConfig {
                    addr,
                    weight: NonZeroU32::new(w).unwrap(),
                    max_fails: 1,
                    fail_timeout: Duration::from_secs(10),
                    backup,
                    down: false,
                    max_conns: 0,
                },
                state: reg.get_or_create(BackendId { upstream: "u".into(), addr }),
            }
        })
        .collect()
}

fn backends(spec: &[(u32, bool)]) -> Vec<Backend> {
    backends_on(&Registry::default(), spec, 9000)
}

fn cfg(balance: Balance) -> UpstreamConfig {
    UpstreamConfig::new("u", balance, vec![])
}

fn uri() -> &'static Uri {
    static U: std::sync::OnceLock<Uri> = std::sync::OnceLock::new();
    U.get_or_init(|| Uri::from_static("/"))
}

fn cx<'a>(h: &'a HeaderMap, tried: &'a [usize]) -> PickCtx<'a> {
    PickCtx { client: Ipv4Addr::LOCALHOST.into(), headers: h, uri: uri(), tried, now_ms: 0, ignore_health: false }
}

fn pick(bal: &Balancer, b: &[Backend], h: &HeaderMap, tried: &[usize]) -> Result<usize, NoPick> {
    bal.pick(b, &cx(h, tried)).map(|p| p.index)
}

fn all_balances() -> Vec<Balance> {
    vec![
        Balance::RoundRobin,
        Balance::LeastConn,
        Balance::P2c,
        Balance::IpHash(IpHashMode::Consistent),
        Balance::IpHash(IpHashMode::Nginx),
        Balance::Cookie(CookieConfig {
            name: "tg".into(),
            secret: Some("0123456789abcdef".into()),
            max_age: None,
            path: "/".into(),
            domain: None,
            same_site: SameSite::Lax,
            fallback: Fallback::LeastConn,
        }),
        Balance::Hash(HashConfig { key: HashKey::Ip, bounded_load: 1.25 }),
        Balance::Hash(HashConfig { key: HashKey::Header("x-user".into()), bounded_load: 0.0 }),
    ]
}

#[test]
fn smooth_weighted_matches_nginx_order() {
    // nginx's documented example: weights 5, 1, 1 give a a b a c a a.
    let b = backends(&[(5, false), (1, false), (1, false)]);
    let bal = Balancer::new(&cfg(Balance::RoundRobin), &b);
    let h = HeaderMap::new();
    let seq: Vec<usize> = (0..7).map(|_| pick(&bal, &b, &h, &[]).unwrap()).collect();
    assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
}

#[test]
fn backups_only_when_primaries_cannot_serve() {
    for balance in all_balances() {
        let b = backends(&[(1, false), (1, true)]);
        let bal = Balancer::new(&cfg(balance.clone()), &b);
        let h = HeaderMap::new();
        for _ in 0..5 {
            assert_eq!(pick(&bal, &b, &h, &[]), Ok(0), "{balance:?}");
        }
        assert_eq!(pick(&bal, &b, &h, &[0]), Ok(1), "{balance:?}");
        assert_eq!(pick(&bal, &b, &h, &[0, 1]), Err(NoPick::Unavailable), "{balance:?}");
    }
}

#[test]
fn full_servers_are_skipped_and_reported() {
    for balance in all_balances() {
        let mut b = backends(&[(1, false), (1, false)]);
        b[0].cfg.max_conns = 1;
        b[1].cfg.max_conns = 1;
        let bal = Balancer::new(&cfg(balance.clone()), &b);
        let h = HeaderMap::new();
        let g0 = b[0].state.try_acquire(1).unwrap();
        assert_eq!(pick(&bal, &b, &h, &[]), Ok(1), "{balance:?}");
        let g1 = b[1].state.try_acquire(1).unwrap();
        assert_eq!(pick(&bal, &b, &h, &[]), Err(NoPick::Full), "{balance:?}");
        drop((g0, g1));
        assert!(pick(&bal, &b, &h, &[]).is_ok());
    }
}

#[test]
fn least_conn_prefers_lighter_relative_to_weight_and_rotates_ties() {
    let b = backends(&[(1, false), (2, false), (1, false)]);
    let bal = Balancer::new(&cfg(Balance::LeastConn), &b);
    let h = HeaderMap::new();
    let mut guards: Vec<ConnGuard> = Vec::new();
    for _ in 0..400 {
        let i = pick(&bal, &b, &h, &[]).unwrap();
        guards.push(b[i].state.try_acquire(0).unwrap());
    }
    assert_eq!((b[0].state.active(), b[1].state.active(), b[2].state.active()), (100, 200, 100));
    drop(guards);
    // All idle: ties rotate, so three picks reach three servers.
    let picks: std::collections::BTreeSet<usize> = (0..3).map(|_| pick(&bal, &b, &h, &[]).unwrap()).collect();
    assert_eq!(picks.len(), 3);
}

#[test]
fn p2c_avoids_the_loaded_server() {
    let b = backends(&[(1, false), (1, false), (1, false)]);
    let bal = Balancer::new(&cfg(Balance::P2c), &b);
    let h = HeaderMap::new();
    let _hold: Vec<ConnGuard> = (0..50).map(|_| b[0].state.try_acquire(0).unwrap()).collect();
    for _ in 0..1000 {
        assert_ne!(pick(&bal, &b, &h, &[]), Ok(0));
    }
}

#[test]
fn nginx_ip_hash_groups_by_first_three_octets() {
    let b = backends(&[(1, false), (1, false), (1, false), (1, false)]);
    let bal = Balancer::new(&cfg(Balance::IpHash(IpHashMode::Nginx)), &b);
    let h = HeaderMap::new();
    let at = |ip: [u8; 4]| {
        bal.pick(&b, &PickCtx { client: IpAddr::from(ip), headers: &h, uri: uri(), tried: &[], now_ms: 0, ignore_health: false })
            .unwrap()
            .index
    };
    let first = at([10, 1, 2, 3]);
    for last in 0..=255 {
        assert_eq!(at([10, 1, 2, last]), first);
    }
    // nginx: hash = 89, then (h * 113 + octet) % 6271 over 10, 1, 2: 3796, 2521, 2680; 2680 % 4 = 0.
    assert_eq!(first, 0);
}

#[test]
fn sticky_values_are_opaque_stable_and_signed() {
    let a = sticky_value("chat", "127.0.0.1:9001", None);
    assert_eq!(a, sticky_value("chat", "127.0.0.1:9001", None));
    assert!(!a.contains("127.0.0.1") && !a.contains("9001"));
    assert_ne!(a, sticky_value("chat", "127.0.0.1:9002", None));
    let s = sticky_value("chat", "127.0.0.1:9001", Some("0123456789abcdef"));
    assert!(s.starts_with(&a) && s.len() == a.len() + 23);
    assert_ne!(s, sticky_value("chat", "127.0.0.1:9001", Some("fedcba9876543210")));
}

#[test]
fn ring_moves_about_one_nth_when_a_server_leaves() {
    let reg = Registry::default();
    let four = backends_on(&reg, &[(1, false); 4], 9000);
    let three = backends_on(&reg, &[(1, false); 3], 9000);
    let r4 = Balancer::new(&cfg(Balance::IpHash(IpHashMode::Consistent)), &four);
    let r3 = Balancer::new(&cfg(Balance::IpHash(IpHashMode::Consistent)), &three);
    let h = HeaderMap::new();
    let mut moved = 0;
    let n = 4000;
    for k in 0..n {
        let ip = IpAddr::from([10, (k >> 16) as u8, (k >> 8) as u8, k as u8]);
        let c = PickCtx { client: ip, headers: &h, uri: uri(), tried: &[], now_ms: 0, ignore_health: false };
        let before = four[r4.pick(&four, &c).unwrap().index].addr();
        let after = three[r3.pick(&three, &c).unwrap().index].addr();
        if before != after {
            moved += 1;
            // Only clients of the removed server move.
            assert_eq!(before.port(), 9003);
        }
    }
    assert!(moved as f64 / n as f64 <= 0.25 + 0.05, "moved {moved} of {n}");
}

#[test]
fn empty_hash_keys_are_balanced_not_hashed_to_one_server() {
    let b = backends(&[(1, false), (1, false), (1, false)]);
    let bal = Balancer::new(&cfg(Balance::Hash(HashConfig { key: HashKey::Header("x-user".into()), bounded_load: 0.0 })), &b);
    let mut h = HeaderMap::new();
    h.insert("x-user", HeaderValue::from_static(""));
    let picks: std::collections::BTreeSet<usize> = (0..6).map(|_| pick(&bal, &b, &h, &[]).unwrap()).collect();
    assert_eq!(picks.len(), 3, "empty keys go to least_conn, which rotates over idle servers");
}

proptest! {
    /// Whatever is down, failed, tried or full, no algorithm picks an ineligible backend
    /// while an eligible one exists, and none reports failure when one exists.
    #[test]
    fn never_picks_ineligible_when_eligible_exists(
        spec in prop::collection::vec((1u32..5, any::<bool>(), any::<bool>(), 0u8..3), 1..12),
        tried_mask in any::<u16>(),
        ip in any::<u32>(),
        key in "[a-z]{0,6}",
        which in 0usize..8,
    ) {
        let reg = Registry::default();
        let mut b = backends_on(&reg, &spec.iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(), 20000);
        let mut guards = Vec::new();
        for (i, s) in spec.iter().enumerate() {
            b[i].cfg.down = s.2;
            if s.3 == 1 {
                b[i].cfg.max_conns = 1;
                guards.push(b[i].state.try_acquire(0).unwrap());
            }
            if s.3 == 2 {
                b[i].state.record_failure(&b[i].cfg, 0, false);
            }
        }
        if !b.iter().any(|x| !x.cfg.backup) {
            b[0].cfg.backup = false;
        }
        let tried: Vec<usize> = (0..b.len()).filter(|i| tried_mask & (1 << i) != 0).collect();
        let balance = all_balances().swap_remove(which);
        let bal = Balancer::new(&cfg(balance), &b);
        let mut h = HeaderMap::new();
        if !key.is_empty() {
            h.insert("x-user", HeaderValue::from_str(&key).unwrap());
        }
        let c = PickCtx { client: IpAddr::from(ip.to_be_bytes()), headers: &h, uri: uri(), tried: &tried, now_ms: 1, ignore_health: false };
        let eligible: Vec<usize> = (0..b.len()).filter(|&i| eligibility(&b[i], i, &c) == Eligibility::Yes).collect();
        let primary_eligible = eligible.iter().any(|&i| !b[i].cfg.backup);
        match bal.pick(&b, &c) {
            Ok(p) => {
                prop_assert!(eligible.contains(&p.index));
                prop_assert!(!b[p.index].cfg.backup || !primary_eligible, "backup picked while a primary was eligible");
            }
            Err(_) => prop_assert!(eligible.is_empty()),
        }
    }

    /// Hash-based picks are deterministic: the same input gives the same backend, in this
    /// balancer and in another built from the same config (another tidegate instance).
    #[test]
    fn hashing_is_deterministic(ip in any::<u32>(), key in "[a-z0-9]{1,12}", n in 1usize..20, which in 0usize..3) {
        let balance = [
            Balance::IpHash(IpHashMode::Consistent),
            Balance::IpHash(IpHashMode::Nginx),
            Balance::Hash(HashConfig { key: HashKey::Header("x-user".into()), bounded_load: 0.0 }),
        ][which].clone();
        let spec = vec![(1, false); n];
        let (r1, r2) = (Registry::default(), Registry::default());
        let (b1, b2) = (backends_on(&r1, &spec, 30000), backends_on(&r2, &spec, 30000));
        let (x, y) = (Balancer::new(&cfg(balance.clone()), &b1), Balancer::new(&cfg(balance), &b2));
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_str(&key).unwrap());
        let c = PickCtx { client: IpAddr::from(ip.to_be_bytes()), headers: &h, uri: uri(), tried: &[], now_ms: 0, ignore_health: false };
        let first = x.pick(&b1, &c).unwrap().index;
        prop_assert_eq!(x.pick(&b1, &c).unwrap().index, first);
        prop_assert_eq!(y.pick(&b2, &c).unwrap().index, first);
        // With the chosen one unavailable, the fallback is deterministic too.
        if n > 1 {
            let tried = [first];
            let c2 = PickCtx { tried: &tried, ..c };
            let next = x.pick(&b1, &c2).unwrap().index;
            prop_assert_eq!(y.pick(&b2, &c2).unwrap().index, next);
            prop_assert_eq!(x.pick(&b1, &c2).unwrap().index, next);
        }
    }
}

#[test]
fn cookie_value_is_found_next_to_non_ascii_cookies_and_unquoted_once() {
    let mut h = HeaderMap::new();
    h.append(COOKIE, HeaderValue::from_bytes("pref=café; tg_srv=abc123".as_bytes()).unwrap());
    assert_eq!(cookie_value(&h, "tg_srv"), Some("abc123"), "a UTF-8 cookie elsewhere in the header");
    assert_eq!(cookie_value(&h, "pref"), Some("café"));
    assert_eq!(cookie_value(&h, "other"), None);

    let mut h = HeaderMap::new();
    h.append(COOKIE, HeaderValue::from_static("a=1"));
    h.append(COOKIE, HeaderValue::from_static("  tg_srv=\"abc\" ; b=2"));
    assert_eq!(cookie_value(&h, "tg_srv"), Some("abc"), "second header, spaces, one pair of quotes");
    let mut h = HeaderMap::new();
    h.append(COOKIE, HeaderValue::from_static("tg_srv =abc"));
    assert_eq!(cookie_value(&h, "tg_srv"), None, "no space before `=`");

    let mut h = HeaderMap::new();
    h.append(COOKIE, HeaderValue::from_static("tg_srv=\"\"\"abc"));
    assert_eq!(cookie_value(&h, "tg_srv"), Some("\"\"\"abc"), "only a matching pair of quotes is removed");
    let mut h = HeaderMap::new();
    h.append(COOKIE, HeaderValue::from_bytes(b"tg_srv=\xff\xfe").unwrap());
    assert_eq!(cookie_value(&h, "tg_srv"), None, "a value that is not UTF-8 is no value");
}
