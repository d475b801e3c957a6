//! Balancing: given an upstream's backends and a request's view, pick one backend.
//!
//! Every algorithm is a variant of `Balancer`, built when the snapshot is built; a pick reads
//! atomics and does not allocate. Eligibility (down, failed, full, backup tiers) is decided
//! here once, the same way for every algorithm.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use hyper::HeaderMap;

use crate::config::{Balance, UpstreamConfig};
use crate::runtime::Backend;

/// What a balancer may look at for one request.
pub struct PickCtx<'a> {
    pub client: IpAddr,
    pub headers: &'a HeaderMap,
    /// Backends this request already tried (failover); usually empty.
    pub tried: &'a [usize],
    pub now_ms: u64,
}

/// Why no backend could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPick {
    /// Every backend is down, failed, or already tried.
    Unavailable,
    /// Some backend would be available but every such one is at `max_conns`.
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eligibility {
    Yes,
    Unavailable,
    Full,
}

fn eligibility(b: &Backend, i: usize, cx: &PickCtx<'_>) -> Eligibility {
    if b.cfg.down || cx.tried.contains(&i) || !b.state.is_available(cx.now_ms) {
        Eligibility::Unavailable
    } else if b.cfg.max_conns != 0 && b.state.load() >= b.cfg.max_conns {
        Eligibility::Full
    } else {
        Eligibility::Yes
    }
}

#[derive(Debug)]
pub enum Balancer {
    RoundRobin { primary: Schedule, backup: Schedule },
}

impl Balancer {
    pub fn new(cfg: &UpstreamConfig, backends: &[Backend]) -> Self {
        match cfg.balance {
            Balance::RoundRobin => Balancer::RoundRobin {
                primary: Schedule::smooth_weighted(backends, |b| !b.cfg.backup),
                backup: Schedule::smooth_weighted(backends, |b| b.cfg.backup),
            },
        }
    }

    /// Picks a backend index. Backups are considered only when no primary can serve.
    pub fn pick(&self, backends: &[Backend], cx: &PickCtx<'_>) -> Result<usize, NoPick> {
        match self {
            Balancer::RoundRobin { primary, backup } => {
                let mut full = false;
                for schedule in [primary, backup] {
                    match schedule.next(backends, cx) {
                        Ok(i) => return Ok(i),
                        Err(NoPick::Full) => full = true,
                        Err(NoPick::Unavailable) => {}
                    }
                }
                Err(if full { NoPick::Full } else { NoPick::Unavailable })
            }
        }
    }
}

/// nginx's smooth weighted round-robin, precomputed: one period of the sequence nginx would
/// produce with every server up, walked by an atomic cursor. Lock-free, and identical to
/// nginx's order while all servers are eligible; an ineligible entry is skipped by advancing
/// the shared cursor, which spreads its share over the others in proportion to their weight.
#[derive(Debug)]
pub struct Schedule {
    order: Vec<u32>,
    /// Backends in this tier, for the slow path.
    members: Vec<u32>,
    cursor: AtomicUsize,
}

/// Longest precomputed period; larger total weights are reduced by their gcd, then capped.
const MAX_PERIOD: u64 = 1 << 16;

impl Schedule {
    fn smooth_weighted(backends: &[Backend], in_tier: impl Fn(&Backend) -> bool) -> Self {
        let members: Vec<u32> = (0..backends.len() as u32).filter(|&i| in_tier(&backends[i as usize])).collect();
        let mut weights: Vec<u64> = members.iter().map(|&i| u64::from(backends[i as usize].cfg.weight.get())).collect();
        let g = weights.iter().copied().fold(0, gcd);
        if g > 1 {
            weights.iter_mut().for_each(|w| *w /= g);
        }
        let total: u64 = weights.iter().sum();
        let period = total.min(MAX_PERIOD);
        let mut current = vec![0i64; weights.len()];
        let mut order = Vec::with_capacity(period as usize);
        for _ in 0..period {
            let mut best = 0;
            for (k, w) in weights.iter().enumerate() {
                current[k] += *w as i64;
                if current[k] > current[best] {
                    best = k;
                }
            }
            current[best] -= total as i64;
            order.push(members[best]);
        }
        Schedule { order, members, cursor: AtomicUsize::new(0) }
    }

    fn next(&self, backends: &[Backend], cx: &PickCtx<'_>) -> Result<usize, NoPick> {
        if self.order.is_empty() {
            return Err(NoPick::Unavailable);
        }
        let mut full = false;
        for _ in 0..self.order.len() {
            let pos = self.cursor.fetch_add(1, Ordering::Relaxed) % self.order.len();
            let i = self.order[pos] as usize;
            match eligibility(&backends[i], i, cx) {
                Eligibility::Yes => return Ok(i),
                Eligibility::Full => full = true,
                Eligibility::Unavailable => {}
            }
        }
        // Every step of a whole period was ineligible while we walked it; look once more
        // directly, since counts move under us.
        for &i in &self.members {
            match eligibility(&backends[i as usize], i as usize, cx) {
                Eligibility::Yes => return Ok(i as usize),
                Eligibility::Full => full = true,
                Eligibility::Unavailable => {}
            }
        }
        Err(if full { NoPick::Full } else { NoPick::Unavailable })
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;
    use crate::runtime::{BackendId, Registry};
    use std::net::{Ipv4Addr, SocketAddr};
    use std::num::NonZeroU32;
    use std::time::Duration;

    fn backends(spec: &[(u32, bool)]) -> Vec<Backend> {
        let reg = Registry::default();
        spec.iter()
            .enumerate()
            .map(|(i, &(w, backup))| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16));
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

    fn upstream_cfg() -> UpstreamConfig {
        UpstreamConfig {
            name: "u".into(),
            balance: Balance::RoundRobin,
            servers: vec![],
            timeouts: Default::default(),
            keepalive: 0,
            tries: 0,
        }
    }

    fn cx<'a>(h: &'a HeaderMap, tried: &'a [usize]) -> PickCtx<'a> {
        PickCtx { client: Ipv4Addr::LOCALHOST.into(), headers: h, tried, now_ms: 0 }
    }

    #[test]
    fn smooth_weighted_matches_nginx_order() {
        // nginx's documented example: weights 5, 1, 1 give a a b a c a a.
        let b = backends(&[(5, false), (1, false), (1, false)]);
        let bal = Balancer::new(&upstream_cfg(), &b);
        let h = HeaderMap::new();
        let seq: Vec<usize> = (0..7).map(|_| bal.pick(&b, &cx(&h, &[])).unwrap()).collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn backups_only_when_primaries_cannot_serve() {
        let b = backends(&[(1, false), (1, true)]);
        let bal = Balancer::new(&upstream_cfg(), &b);
        let h = HeaderMap::new();
        for _ in 0..5 {
            assert_eq!(bal.pick(&b, &cx(&h, &[])), Ok(0));
        }
        assert_eq!(bal.pick(&b, &cx(&h, &[0])), Ok(1));
        assert_eq!(bal.pick(&b, &cx(&h, &[0, 1])), Err(NoPick::Unavailable));
    }

    #[test]
    fn full_servers_are_skipped_and_reported() {
        let mut b = backends(&[(1, false), (1, false)]);
        b[0].cfg.max_conns = 1;
        b[1].cfg.max_conns = 1;
        let bal = Balancer::new(&upstream_cfg(), &b);
        let h = HeaderMap::new();
        let g0 = b[0].state.try_acquire(1).unwrap();
        assert_eq!(bal.pick(&b, &cx(&h, &[])), Ok(1));
        let g1 = b[1].state.try_acquire(1).unwrap();
        assert_eq!(bal.pick(&b, &cx(&h, &[])), Err(NoPick::Full));
        drop((g0, g1));
        assert!(bal.pick(&b, &cx(&h, &[])).is_ok());
    }
}
