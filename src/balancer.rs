//! Balancing: given an upstream's backends and a request's view, pick one backend.
//!
//! Every algorithm is a variant of `Balancer`, built when the snapshot is built (schedules,
//! hash rings, sticky ids); a pick reads atomics and does not allocate. Eligibility (down,
//! failed, tried, full) and the backup tier are decided the same way for every algorithm:
//! backups are considered only when no primary can serve.
//!
//! Load is read through one accessor, `BackendState::load`, so a server's self-reported
//! count can be merged in later without touching the algorithms.

use std::cell::Cell;
use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use hyper::header::{COOKIE, HeaderValue};
use hyper::{HeaderMap, Uri};

use crate::config::{Balance, CookieConfig, Fallback, HashConfig, HashKey, IpHashMode, SameSite, UpstreamConfig};
use crate::runtime::Backend;

/// What a balancer may look at for one request.
pub struct PickCtx<'a> {
    /// The client address: the peer, or from `X-Forwarded-For` behind a trusted proxy.
    pub client: IpAddr,
    pub headers: &'a HeaderMap,
    pub uri: &'a Uri,
    /// Backends this request already tried (failover); usually empty.
    pub tried: &'a [usize],
    pub now_ms: u64,
    /// Panic mode: too few servers are healthy, so active health is disregarded.
    pub ignore_health: bool,
}

/// The chosen backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Picked {
    pub index: usize,
    /// Cookie-sticky: the response must (re)set the cookie naming this backend.
    pub set_cookie: bool,
}

impl Picked {
    fn plain(index: usize) -> Self {
        Picked { index, set_cookie: false }
    }
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
    if b.cfg.down
        || cx.tried.contains(&i)
        || b.state.admin_blocked()
        || !b.state.is_available(cx.now_ms)
        || !(cx.ignore_health || b.state.is_healthy())
    {
        Eligibility::Unavailable
    } else if b.cfg.max_conns != 0 && b.state.active() >= b.cfg.max_conns {
        Eligibility::Full
    } else {
        Eligibility::Yes
    }
}

/// Collects whether any skipped backend was full, to tell 503 from 502.
#[derive(Default)]
struct Outcome {
    full: bool,
}

impl Outcome {
    fn check(&mut self, backends: &[Backend], i: usize, cx: &PickCtx<'_>) -> bool {
        match eligibility(&backends[i], i, cx) {
            Eligibility::Yes => true,
            Eligibility::Full => {
                self.full = true;
                false
            }
            Eligibility::Unavailable => false,
        }
    }
    fn fail(&self) -> NoPick {
        if self.full { NoPick::Full } else { NoPick::Unavailable }
    }
}

/// Primary and backup members of an upstream, as backend indexes.
#[derive(Debug, Clone)]
struct Tiers {
    primary: Vec<u32>,
    backup: Vec<u32>,
}

impl Tiers {
    fn new(backends: &[Backend]) -> Self {
        let (backup, primary): (Vec<u32>, Vec<u32>) = (0..backends.len() as u32).partition(|&i| backends[i as usize].cfg.backup);
        Tiers { primary, backup }
    }
}

#[derive(Debug)]
pub enum Balancer {
    RoundRobin { primary: Schedule, backup: Schedule },
    LeastConn(LeastConn),
    P2c(P2c),
    IpHash { mode: IpHashMode, ring: Ring, nginx: NginxIpHash, backup: LeastConn },
    Cookie(Box<Sticky>),
    Hash { key: HashKey, bounded_load: f64, ring: Ring, fallback: LeastConn },
}

impl Balancer {
    pub fn new(cfg: &UpstreamConfig, backends: &[Backend]) -> Self {
        let tiers = Tiers::new(backends);
        match &cfg.balance {
            Balance::RoundRobin => round_robin(backends, &tiers),
            Balance::LeastConn => Balancer::LeastConn(LeastConn::new(&tiers)),
            Balance::P2c => Balancer::P2c(P2c::new(backends, &tiers)),
            Balance::IpHash(mode) => Balancer::IpHash {
                mode: *mode,
                ring: Ring::new(backends, &tiers.primary),
                nginx: NginxIpHash::new(backends, &tiers.primary),
                backup: LeastConn::new(&Tiers { primary: tiers.backup.clone(), backup: vec![] }),
            },
            Balance::Cookie(c) => Balancer::Cookie(Box::new(Sticky::new(&cfg.name, c, backends, &tiers))),
            Balance::Hash(HashConfig { key, bounded_load }) => Balancer::Hash {
                key: key.clone(),
                bounded_load: *bounded_load,
                ring: Ring::new(backends, &tiers.primary),
                fallback: LeastConn::new(&tiers),
            },
        }
    }

    /// Picks a backend.
    pub fn pick(&self, backends: &[Backend], cx: &PickCtx<'_>) -> Result<Picked, NoPick> {
        match self {
            Balancer::RoundRobin { primary, backup } => {
                let mut out = Outcome::default();
                for schedule in [primary, backup] {
                    if let Some(i) = schedule.next(backends, cx, &mut out) {
                        return Ok(Picked::plain(i));
                    }
                }
                Err(out.fail())
            }
            Balancer::LeastConn(lc) => lc.pick(backends, cx).map(Picked::plain),
            Balancer::P2c(p) => p.pick(backends, cx).map(Picked::plain),
            Balancer::IpHash { mode, ring, nginx, backup } => {
                let mut out = Outcome::default();
                let found = match mode {
                    IpHashMode::Consistent => ring.walk(ip_key_hash(cx.client), backends, cx, &mut out, |_| true),
                    IpHashMode::Nginx => nginx.pick(cx.client, backends, cx, &mut out),
                };
                match found {
                    Some(i) => Ok(Picked::plain(i)),
                    None => backup.pick(backends, cx).map(Picked::plain).map_err(|e| if out.full { NoPick::Full } else { e }),
                }
            }
            Balancer::Cookie(s) => s.pick(backends, cx),
            Balancer::Hash { key, bounded_load, ring, fallback } => {
                let Some(h) = request_key_hash(key, cx) else { return fallback.pick(backends, cx).map(Picked::plain) };
                let mut out = Outcome::default();
                let found = if *bounded_load > 0.0 {
                    let caps = BoundedLoad::new(*bounded_load, backends, &ring.members, cx);
                    ring.walk(h, backends, cx, &mut out, |i| caps.has_room(backends, i))
                        // Everyone over the bound (only when loads moved under us): plain ring.
                        .or_else(|| ring.walk(h, backends, cx, &mut out, |_| true))
                } else {
                    ring.walk(h, backends, cx, &mut out, |_| true)
                };
                match found {
                    Some(i) => Ok(Picked::plain(i)),
                    None => fallback.pick(backends, cx).map(Picked::plain).map_err(|e| if out.full { NoPick::Full } else { e }),
                }
            }
        }
    }

    /// The `Set-Cookie` value naming backend `index` (cookie-sticky upstreams only).
    pub fn set_cookie(&self, index: usize, tls: bool) -> Option<&HeaderValue> {
        match self {
            Balancer::Cookie(s) => s.set_cookie.get(index).map(|(plain, secure)| if tls { secure } else { plain }),
            _ => None,
        }
    }
}

fn round_robin(backends: &[Backend], tiers: &Tiers) -> Balancer {
    Balancer::RoundRobin {
        primary: Schedule::smooth_weighted(backends, &tiers.primary),
        backup: Schedule::smooth_weighted(backends, &tiers.backup),
    }
}

// ---------------------------------------------------------------------------------------
// Round-robin

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
    fn smooth_weighted(backends: &[Backend], members: &[u32]) -> Self {
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
        Schedule { order, members: members.to_vec(), cursor: AtomicUsize::new(0) }
    }

    fn next(&self, backends: &[Backend], cx: &PickCtx<'_>, out: &mut Outcome) -> Option<usize> {
        if self.order.is_empty() {
            return None;
        }
        for _ in 0..self.order.len().min(2 * self.members.len() + 8) {
            let pos = self.cursor.fetch_add(1, Ordering::Relaxed) % self.order.len();
            let i = self.order[pos] as usize;
            if out.check(backends, i, cx) {
                return Some(i);
            }
        }
        // Many ineligible entries in a row: look at every member once, from a rotating start.
        let start = self.cursor.load(Ordering::Relaxed);
        (0..self.members.len()).map(|k| self.members[(start + k) % self.members.len()] as usize).find(|&i| out.check(backends, i, cx))
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

// ---------------------------------------------------------------------------------------
// Least connections

/// Weighted least connections: the lowest load/weight wins; the scan starts at a rotating
/// offset so ties go round-robin rather than always to the first server.
#[derive(Debug)]
pub struct LeastConn {
    tiers: Tiers,
    cursor: AtomicUsize,
}

impl LeastConn {
    fn new(tiers: &Tiers) -> Self {
        LeastConn { tiers: tiers.clone(), cursor: AtomicUsize::new(0) }
    }

    pub fn pick(&self, backends: &[Backend], cx: &PickCtx<'_>) -> Result<usize, NoPick> {
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let mut out = Outcome::default();
        for members in [&self.tiers.primary, &self.tiers.backup] {
            if let Some(i) = least_loaded(members, start, backends, cx, &mut out) {
                return Ok(i);
            }
        }
        Err(out.fail())
    }
}

/// `a` is less loaded than `b` relative to weight: load_a / w_a < load_b / w_b.
fn lighter(backends: &[Backend], a: usize, b: usize, now: u64) -> bool {
    let (la, wa) = (u64::from(backends[a].state.load(now)), u64::from(backends[a].cfg.weight.get()));
    let (lb, wb) = (u64::from(backends[b].state.load(now)), u64::from(backends[b].cfg.weight.get()));
    la * wb < lb * wa
}

fn least_loaded(members: &[u32], start: usize, backends: &[Backend], cx: &PickCtx<'_>, out: &mut Outcome) -> Option<usize> {
    let n = members.len();
    // (index, load, weight) of the lightest so far; each server's load is read once.
    let mut best: Option<(usize, u64, u64)> = None;
    let (mut k, mut i) = (0, start % n.max(1));
    while k < n {
        let idx = members[i] as usize;
        if out.check(backends, idx, cx) {
            let b = &backends[idx];
            let (load, weight) = (u64::from(b.state.load(cx.now_ms)), u64::from(b.cfg.weight.get()));
            if best.is_none_or(|(_, bl, bw)| load * bw < bl * weight) {
                best = Some((idx, load, weight));
            }
        }
        k += 1;
        i += 1;
        if i == n {
            i = 0;
        }
    }
    best.map(|(idx, _, _)| idx)
}

// ---------------------------------------------------------------------------------------
// Power of two choices

/// Two distinct servers drawn at random in proportion to weight; the lighter one wins.
/// Lock-free: a thread-local generator and atomic loads.
#[derive(Debug)]
pub struct P2c {
    primary: Sampler,
    /// Decides when the draws found nothing: most primaries ineligible, or backups' turn.
    fallback: LeastConn,
}

#[derive(Debug)]
struct Sampler {
    members: Vec<u32>,
    /// Running sum of weights, for a binary search on a random number below the total.
    cumulative: Vec<u64>,
}

impl Sampler {
    fn new(backends: &[Backend], members: &[u32]) -> Self {
        let mut sum = 0;
        let cumulative = members
            .iter()
            .map(|&i| {
                sum += u64::from(backends[i as usize].cfg.weight.get());
                sum
            })
            .collect();
        Sampler { members: members.to_vec(), cumulative }
    }

    /// Position in `members` of a weighted random draw.
    fn draw(&self) -> usize {
        let total = *self.cumulative.last().expect("sampler has members");
        let r = rand_below(total);
        self.cumulative.partition_point(|&c| c <= r)
    }

    fn pick(&self, backends: &[Backend], cx: &PickCtx<'_>, out: &mut Outcome) -> Option<usize> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            let i = self.members[0] as usize;
            return out.check(backends, i, cx).then_some(i);
        }
        for _ in 0..4 {
            let a = self.draw();
            let mut b = self.draw();
            if b == a {
                b = self.draw();
                if b == a {
                    b = (a + 1 + rand_below(n as u64 - 1) as usize) % n;
                }
            }
            let (ia, ib) = (self.members[a] as usize, self.members[b] as usize);
            match (out.check(backends, ia, cx), out.check(backends, ib, cx)) {
                (true, true) => return Some(if lighter(backends, ib, ia, cx.now_ms) { ib } else { ia }),
                (true, false) => return Some(ia),
                (false, true) => return Some(ib),
                (false, false) => {}
            }
        }
        None
    }
}

impl P2c {
    fn new(backends: &[Backend], tiers: &Tiers) -> Self {
        P2c { primary: Sampler::new(backends, &tiers.primary), fallback: LeastConn::new(tiers) }
    }

    fn pick(&self, backends: &[Backend], cx: &PickCtx<'_>) -> Result<usize, NoPick> {
        let mut out = Outcome::default();
        if let Some(i) = self.primary.pick(backends, cx, &mut out) {
            return Ok(i);
        }
        // Most primaries ineligible (or unlucky draws): a full scan decides, backups included.
        self.fallback.pick(backends, cx)
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let local = 0u8;
    mix64(t ^ (&local as *const u8 as u64).rotate_left(32)) | 1
}

/// xorshift64* from a per-thread state: fast, not for secrets.
fn rand_u64() -> u64 {
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

fn rand_below(n: u64) -> u64 {
    ((u128::from(rand_u64()) * u128::from(n)) >> 64) as u64
}

/// Murmur3's 64-bit finaliser: a fixed, well-mixing hash for fixed-size keys.
fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

// ---------------------------------------------------------------------------------------
// Consistent hashing

/// A ketama ring built exactly as nginx's `hash ... consistent` builds it: for each server,
/// 160 × weight points, each the CRC32 of `host\0port` continued with the previous point.
/// Removing one of N servers only moves the keys that were on its points (about 1/N), and a
/// key whose server is unavailable moves to the next distinct server clockwise, the same one
/// every time.
#[derive(Debug)]
pub struct Ring {
    /// (point, backend index), sorted by point.
    points: Vec<(u32, u32)>,
    members: Vec<u32>,
}

impl Ring {
    fn new(backends: &[Backend], members: &[u32]) -> Self {
        let mut points = Vec::new();
        for &i in members {
            let b = &backends[i as usize];
            let server = b.cfg.addr.to_string();
            let (host, port) = server.rsplit_once(':').unwrap_or((server.as_str(), ""));
            let mut base = crc32fast::Hasher::new();
            base.update(host.as_bytes());
            base.update(b"\0");
            base.update(port.as_bytes());
            let mut prev: u32 = 0;
            for _ in 0..160 * b.cfg.weight.get() {
                let mut h = base.clone();
                h.update(&prev.to_le_bytes());
                let point = h.finalize();
                points.push((point, i));
                prev = point;
            }
        }
        points.sort_unstable();
        points.dedup_by_key(|p| p.0);
        Ring { points, members: members.to_vec() }
    }

    /// From the first point at or after `hash`, the first backend that is eligible and `ok`.
    fn walk(&self, hash: u32, backends: &[Backend], cx: &PickCtx<'_>, out: &mut Outcome, ok: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|p| p.0 < hash);
        let n = self.points.len();
        let mut last = u32::MAX;
        // Visiting every point is bounded by 160 × total weight; stop early once each member
        // has been seen (tracked cheaply by counting distinct runs).
        let mut distinct = 0;
        for k in 0..n {
            let i = self.points[(start + k) % n].1;
            if i == last {
                continue;
            }
            last = i;
            distinct += 1;
            let i = i as usize;
            if out.check(backends, i, cx) && ok(i) {
                return Some(i);
            }
            if distinct > 4 * self.members.len() + 16 {
                break;
            }
        }
        None
    }
}

/// Capacities for Consistent Hashing with Bounded Loads (Mirrokni, Thorup, Zadimoghaddam):
/// a server may take one more connection while its load stays within
/// `c × (total + 1) × weight / total_weight`, rounded up.
struct BoundedLoad {
    c: f64,
    now: u64,
    total_load: u64,
    total_weight: u64,
}

impl BoundedLoad {
    fn new(c: f64, backends: &[Backend], members: &[u32], cx: &PickCtx<'_>) -> Self {
        let (mut total_load, mut total_weight) = (0u64, 0u64);
        for &i in members {
            let b = &backends[i as usize];
            if eligibility(b, i as usize, cx) != Eligibility::Unavailable {
                total_load += u64::from(b.state.load(cx.now_ms));
                total_weight += u64::from(b.cfg.weight.get());
            }
        }
        BoundedLoad { c, now: cx.now_ms, total_load, total_weight: total_weight.max(1) }
    }

    fn has_room(&self, backends: &[Backend], i: usize) -> bool {
        let b = &backends[i];
        let cap = (self.c * (self.total_load + 1) as f64 * f64::from(b.cfg.weight.get()) / self.total_weight as f64).ceil();
        f64::from(b.state.load(self.now)) + 1.0 <= cap
    }
}

/// The hash of a client address on the ring (tidegate's ip_hash: the whole address).
fn ip_key_hash(ip: IpAddr) -> u32 {
    let x = match ip.to_canonical() {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let n = u128::from(v6);
            (n as u64) ^ mix64((n >> 64) as u64)
        }
    };
    (mix64(x) >> 32) as u32
}

/// The CRC32 of the request's key (nginx's `hash $key consistent` hashes the same way), or
/// `None` when the request has no such key.
fn request_key_hash(key: &HashKey, cx: &PickCtx<'_>) -> Option<u32> {
    match key {
        // An empty value is no key (nginx balances empty keys instead of hashing them all to
        // one server): the request goes to the fallback.
        HashKey::Header(name) => cx.headers.get(name.as_str()).filter(|v| !v.is_empty()).map(|v| crc32fast::hash(v.as_bytes())),
        HashKey::Cookie(name) => cookie_value(cx.headers, name).filter(|v| !v.is_empty()).map(|v| crc32fast::hash(v.as_bytes())),
        HashKey::Query(name) => query_value(cx.uri.query()?, name).filter(|v| !v.is_empty()).map(|v| crc32fast::hash(v.as_bytes())),
        HashKey::Path => Some(crc32fast::hash(cx.uri.path().as_bytes())),
        HashKey::Ip => {
            let mut buf = [0u8; 48];
            let mut w = &mut buf[..];
            let _ = write!(w, "{}", cx.client.to_canonical());
            let len = 48 - w.len();
            Some(crc32fast::hash(&buf[..len]))
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    // Byte-wise: one cookie with non-ASCII bytes (a UTF-8 value set by a script, say) must not
    // hide the others in the same header.
    let value = headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .filter_map(|pair| {
            // `name=value` with no space around `=` (RFC 6265), spaces around the pair.
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            Some((&pair[..eq], &pair[eq + 1..]))
        })
        .find(|(k, _)| *k == name.as_bytes())?
        .1;
    // RFC 6265: a value may be wrapped in one pair of double quotes.
    let value = match value {
        [b'"', inner @ .., b'"'] => inner,
        v => v,
    };
    std::str::from_utf8(value).ok()
}

fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').filter_map(|p| p.split_once('=').or(Some((p, "")))).find(|(k, _)| *k == name).map(|(_, v)| v)
}

// ---------------------------------------------------------------------------------------
// nginx's ip_hash

/// nginx's `ip_hash`, reproduced: hash = (hash × 113 + octet) mod 6271 over the first three
/// octets of an IPv4 address (all 16 bytes of IPv6), starting from 89, then a weighted modulo
/// over the primary servers; an unavailable pick re-hashes, up to 20 times, then round-robin.
#[derive(Debug)]
pub struct NginxIpHash {
    members: Vec<u32>,
    total_weight: u64,
    fallback: Schedule,
}

impl NginxIpHash {
    fn new(backends: &[Backend], members: &[u32]) -> Self {
        let total_weight = members.iter().map(|&i| u64::from(backends[i as usize].cfg.weight.get())).sum();
        NginxIpHash { members: members.to_vec(), total_weight, fallback: Schedule::smooth_weighted(backends, members) }
    }

    fn pick(&self, ip: IpAddr, backends: &[Backend], cx: &PickCtx<'_>, out: &mut Outcome) -> Option<usize> {
        if self.total_weight == 0 {
            return None;
        }
        let v6;
        let v4;
        let addr: &[u8] = match ip.to_canonical() {
            IpAddr::V4(a) => {
                v4 = a.octets();
                &v4[..3]
            }
            IpAddr::V6(a) => {
                v6 = a.octets();
                &v6[..]
            }
        };
        let mut hash: u64 = 89;
        for _ in 0..20 {
            for &b in addr {
                hash = (hash * 113 + u64::from(b)) % 6271;
            }
            let mut w = hash % self.total_weight;
            let mut p = 0;
            loop {
                let weight = u64::from(backends[self.members[p] as usize].cfg.weight.get());
                if w < weight {
                    break;
                }
                w -= weight;
                p += 1;
            }
            let i = self.members[p] as usize;
            if out.check(backends, i, cx) {
                return Some(i);
            }
        }
        self.fallback.next(backends, cx, out)
    }
}

// ---------------------------------------------------------------------------------------
// Cookie-sticky

/// Sticky by cookie. Each backend has an opaque id derived from the upstream name and its
/// address (the same in every tidegate instance with the same config, never the address
/// itself); with a secret the id carries an HMAC-SHA256 tag, so a forged or altered cookie
/// matches no backend and is rebalanced.
#[derive(Debug)]
pub struct Sticky {
    cookie_name: String,
    /// Cookie value → backend index.
    ids: HashMap<String, usize>,
    /// `Set-Cookie` per backend: (plain, with `Secure`).
    set_cookie: Vec<(HeaderValue, HeaderValue)>,
    fallback: Box<Balancer>,
    has_backup: bool,
}

impl Sticky {
    fn new(upstream: &str, c: &CookieConfig, backends: &[Backend], tiers: &Tiers) -> Self {
        let mut ids = HashMap::new();
        let mut set_cookie = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            let value = sticky_value(upstream, &b.cfg.addr.to_string(), c.secret.as_deref());
            let mut attrs = format!("{}={}; Path={}", c.name, value, c.path);
            if let Some(d) = &c.domain {
                attrs.push_str("; Domain=");
                attrs.push_str(d);
            }
            if let Some(age) = c.max_age {
                attrs.push_str(&format!("; Max-Age={}", age.as_secs()));
            }
            attrs.push_str("; HttpOnly; SameSite=");
            attrs.push_str(match c.same_site {
                SameSite::Lax => "Lax",
                SameSite::Strict => "Strict",
                SameSite::None => "None",
            });
            let plain = HeaderValue::from_str(&attrs).expect("validated cookie attributes");
            let secure = HeaderValue::from_str(&format!("{attrs}; Secure")).expect("validated cookie attributes");
            set_cookie.push((plain, secure));
            ids.insert(value, i);
        }
        let fallback = Box::new(match c.fallback {
            Fallback::RoundRobin => round_robin(backends, tiers),
            Fallback::LeastConn => Balancer::LeastConn(LeastConn::new(tiers)),
            Fallback::P2c => Balancer::P2c(P2c::new(backends, tiers)),
        });
        Sticky { cookie_name: c.name.clone(), ids, set_cookie, fallback, has_backup: !tiers.backup.is_empty() }
    }

    fn pick(&self, backends: &[Backend], cx: &PickCtx<'_>) -> Result<Picked, NoPick> {
        if let Some(&i) = cookie_value(cx.headers, &self.cookie_name).and_then(|v| self.ids.get(v))
            && eligibility(&backends[i], i, cx) == Eligibility::Yes
            && (!backends[i].cfg.backup || !self.any_primary(backends, cx))
        {
            return Ok(Picked::plain(i));
        }
        let p = self.fallback.pick(backends, cx)?;
        Ok(Picked { index: p.index, set_cookie: true })
    }

    fn any_primary(&self, backends: &[Backend], cx: &PickCtx<'_>) -> bool {
        self.has_backup && backends.iter().enumerate().any(|(i, b)| !b.cfg.backup && eligibility(b, i, cx) == Eligibility::Yes)
    }
}

/// The cookie value for one backend: 16 hex digits of a fixed hash of upstream and address,
/// then, with a secret, `.` and 22 base64url characters of HMAC-SHA256 over that id.
pub fn sticky_value(upstream: &str, addr: &str, secret: Option<&str>) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in upstream.bytes().chain([0]).chain(addr.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    let id = format!("{:016x}", mix64(h));
    match secret {
        None => id,
        Some(secret) => {
            use base64::Engine;
            use hmac::{KeyInit, Mac};
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
            mac.update(id.as_bytes());
            let tag = mac.finalize().into_bytes();
            format!("{id}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag[..16]))
        }
    }
}

#[cfg(test)]
mod tests;
