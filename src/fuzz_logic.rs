//! The logic of every fuzz target, one `pub fn NAME(data: &[u8])` per target in
//! `fuzz/fuzz_targets/NAME.rs`; each target is a one-line wrapper over its function.
//!
//! Why here and always compiled (not `#[cfg(fuzzing)]`): the same properties then run under
//! libFuzzer (`cargo +nightly fuzz run NAME`, or `fuzz/ci.sh`) and under plain `cargo test`
//! on stable, where `tests/fuzz_replay.rs` replays each target's checked-in seeds
//! (`fuzz/seeds/NAME/`) plus deterministic mutations of them. Every function panics when a
//! property fails, which is how either driver learns of a bug. Not API: hidden from the docs.

#![doc(hidden)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Uri, Version};

use crate::balancer::{self, Balancer, PickCtx, Picked};
use crate::config::{Balance, CookieConfig, Fallback, SameSite, ServerConfig, UpstreamConfig};
use crate::framing::FramingScanner;
use crate::proxy_protocol::{self, Parsed};
use crate::runtime::{Backend, BackendId, Registry};
use crate::sni::{self, Hello};

/// A target's logic.
pub type Target = fn(&[u8]);

/// Every target by name, for drivers that run them all.
pub const TARGETS: &[(&str, Target)] = &[
    ("config", config),
    ("proxy_protocol", proxy_protocol),
    ("sni", sni),
    ("framing", framing),
    ("nginx", nginx),
    ("sticky_cookie", sticky_cookie),
    ("request_head", request_head),
];

/// The config loader never panics on any UTF-8 text, and every error renders to a non-empty
/// message. (Non-UTF-8 input is skipped, as libFuzzer's `&str` targets do.)
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(errors) = crate::config::load_str(text, Path::new("fuzz.toml")) {
        assert!(!errors.0.is_empty());
        for e in &errors.0 {
            assert!(!e.to_string().is_empty());
            assert!(!e.message.is_empty());
        }
        assert!(!errors.to_string().is_empty());
    }
}

/// The PROXY protocol parser never panics, never claims more bytes than it was given, agrees
/// with itself on every prefix (a verdict, once reached, never changes as more bytes arrive;
/// a header is not complete before its last byte), and never waits for more than `V2_MAX`.
pub fn proxy_protocol(data: &[u8]) {
    let verdict = proxy_protocol::parse(data);
    match verdict {
        Parsed::Done(header, len) => {
            assert!(len <= data.len());
            assert_eq!(proxy_protocol::parse(&data[..len]), Parsed::Done(header, len));
            if len > 0 {
                assert_eq!(proxy_protocol::parse(&data[..len - 1]), Parsed::Incomplete);
            }
        }
        Parsed::Incomplete => assert!(data.len() < proxy_protocol::V2_MAX, "still incomplete after {} bytes", data.len()),
        Parsed::Invalid(why) => assert!(!why.is_empty()),
    }
    for cut in [data.len() / 2, data.len().saturating_sub(1), 16.min(data.len())] {
        match proxy_protocol::parse(&data[..cut]) {
            Parsed::Incomplete => {}
            early => assert_eq!(early, verdict, "the verdict on {cut} bytes changed with more bytes"),
        }
    }
}

/// The ClientHello SNI peek never panics on any bytes, a name it returns is lower-case
/// hostname characters without a trailing dot, and more bytes after a complete ClientHello
/// do not change the answer.
pub fn sni(data: &[u8]) {
    let verdict = sni::parse(data);
    match &verdict {
        Hello::Done(Some(name)) => {
            assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'), "{name:?}");
            assert!(!name.ends_with('.'), "{name:?}");
        }
        Hello::Done(None) | Hello::Incomplete => {}
        Hello::Invalid(why) => assert!(!why.is_empty()),
    }
    if matches!(verdict, Hello::Done(_)) {
        let mut more = data.to_vec();
        more.extend_from_slice(b"\x16\x03\x01\x00\x05trailing");
        assert_eq!(sni::parse(&more), verdict);
    }
}

/// The raw request-framing scanner accepts any byte stream, in any chunking, and reaches the
/// same verdict whether fed at once, byte by byte, or in two pieces.
pub fn framing(data: &[u8]) {
    let mut whole = FramingScanner::default();
    whole.feed(data);
    let mut bytes = FramingScanner::default();
    for b in data {
        bytes.feed(std::slice::from_ref(b));
    }
    assert_eq!(whole.first_ambiguous, bytes.first_ambiguous);
    let cut = data.first().map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let mut halves = FramingScanner::default();
    halves.feed(&data[..cut]);
    halves.feed(&data[cut..]);
    assert_eq!(whole.first_ambiguous, halves.first_ambiguous);
}

/// The nginx config parser and `import-nginx`'s converter (the text also stands as an include
/// file) never panic on any UTF-8 text, and every error and report renders.
pub fn nginx(data: &[u8]) {
    use crate::config::nginx;
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = nginx::parse(text, Path::new("fuzz.conf")) {
        assert!(!e.message.is_empty());
        assert!(!e.to_string().is_empty());
    }
    let fs = nginx::MemFs::new().with("/fuzz/inc.conf", text).with("/fuzz/conf.d/a.conf", text);
    match nginx::import_str(text, Path::new("/fuzz/nginx.conf"), &fs) {
        Ok(import) => {
            let _ = import.report();
            let _ = import.complete();
            assert!(import.toml.starts_with('#'));
        }
        Err(e) => assert!(!e.message.is_empty()),
    }
}

// ---------------------------------------------------------------------------------------
// sticky_cookie

/// One cookie-sticky upstream, built once.
pub struct StickyFixture {
    pub upstream: &'static str,
    pub cookie_name: &'static str,
    pub secret: Option<&'static str>,
    pub backends: Vec<Backend>,
    pub balancer: Balancer,
    /// The cookie value the balancer issues for each backend (from its own `Set-Cookie`).
    pub issued: Vec<String>,
}

/// Two upstreams: signed ids (least_conn fallback) and unsigned ids (round-robin fallback),
/// each with three primaries (one IPv6) and a backup.
pub fn sticky_fixtures() -> &'static [StickyFixture] {
    static FIXTURES: OnceLock<Vec<StickyFixture>> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let registry = Registry::default();
        vec![
            sticky_fixture(&registry, "chat", "tg_srv", Some("0123456789abcdef-fuzz-secret"), Fallback::LeastConn),
            sticky_fixture(&registry, "plain", "sid", None, Fallback::RoundRobin),
        ]
    })
}

fn sticky_fixture(
    registry: &Registry,
    upstream: &'static str,
    cookie_name: &'static str,
    secret: Option<&'static str>,
    fallback: Fallback,
) -> StickyFixture {
    let servers = [("127.0.0.1:9000", 1, false), ("127.0.0.1:9001", 2, false), ("[::1]:9002", 1, false), ("127.0.0.1:9003", 1, true)];
    let backends: Vec<Backend> = servers
        .iter()
        .map(|&(addr, weight, backup)| {
            let addr: SocketAddr = addr.parse().expect("fixture address");
            Backend {
                cfg: ServerConfig {
                    addr,
                    weight: NonZeroU32::new(weight).expect("non-zero weight"),
                    max_fails: 1,
                    fail_timeout: Duration::from_secs(10),
                    backup,
                    down: false,
                    max_conns: 0,
                },
                state: registry.get_or_create(BackendId { upstream: upstream.into(), addr }),
            }
        })
        .collect();
    let cookie = CookieConfig {
        name: cookie_name.into(),
        secret: secret.map(Into::into),
        max_age: Some(Duration::from_secs(3600)),
        path: "/".into(),
        domain: None,
        same_site: SameSite::Lax,
        fallback,
    };
    let balancer = Balancer::new(&UpstreamConfig::new(upstream, Balance::Cookie(cookie), vec![]), &backends);
    let issued: Vec<String> = (0..backends.len())
        .map(|i| {
            let plain = balancer.set_cookie(i, false).expect("cookie-sticky balancer").to_str().expect("ASCII Set-Cookie");
            let secure = balancer.set_cookie(i, true).expect("cookie-sticky balancer").to_str().expect("ASCII Set-Cookie");
            assert!(secure.starts_with(plain) && secure.ends_with("; Secure"), "{secure:?}");
            let pair = plain.split(';').next().unwrap_or_default();
            let value = pair.strip_prefix(cookie_name).and_then(|v| v.strip_prefix('=')).expect("Set-Cookie names the cookie");
            assert_eq!(value, balancer::sticky_value(upstream, &backends[i].cfg.addr.to_string(), secret));
            value.to_string()
        })
        .collect();
    let mut distinct = issued.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), issued.len(), "every backend has its own cookie value");
    StickyFixture { upstream, cookie_name, secret, backends, balancer, issued }
}

/// The cookie-sticky balancer's cookie check, over arbitrary `Cookie` headers (the input split
/// at `\n` into several headers) and over arbitrary bytes as the cookie's value alone. It never
/// panics; a request sticks (no new cookie) only to the backend whose issued value is the first
/// cookie of that name, and only if that backend is a primary (all are up here); anything else
/// — a forged, altered, truncated or unsigned id, a backup's id — gets a fallback pick among
/// the primaries with `set_cookie`. A value sticks only if it is, quotes aside, exactly an
/// issued value: with a secret, nobody can name a server the proxy did not sign.
pub fn sticky_cookie(data: &[u8]) {
    for fx in sticky_fixtures() {
        let mut whole = HeaderMap::new();
        for piece in data.split(|&b| b == b'\n') {
            if let Ok(v) = HeaderValue::from_bytes(piece) {
                whole.append(header::COOKIE, v);
            }
        }
        check_sticky(fx, &whole);
        let mut alone = HeaderMap::new();
        let mut pair = format!("{}=", fx.cookie_name).into_bytes();
        pair.extend_from_slice(data);
        if let Ok(v) = HeaderValue::from_bytes(&pair) {
            alone.insert(header::COOKIE, v);
            check_sticky(fx, &alone);
        }
    }
}

fn check_sticky(fx: &StickyFixture, headers: &HeaderMap) {
    static URI: OnceLock<Uri> = OnceLock::new();
    let uri = URI.get_or_init(|| Uri::from_static("/chat"));
    let cx = PickCtx { client: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), headers, uri, tried: &[], now_ms: 0, ignore_health: false };
    let picked = fx.balancer.pick(&fx.backends, &cx).expect("every backend is up");
    assert!(picked.index < fx.backends.len());
    let named = balancer::cookie_value(headers, fx.cookie_name).and_then(|v| fx.issued.iter().position(|x| x == v));
    match named {
        Some(i) if !fx.backends[i].cfg.backup => {
            assert_eq!(picked, Picked { index: i, set_cookie: false }, "{}: an issued cookie must stick", fx.upstream);
        }
        _ => {
            assert!(picked.set_cookie, "{}: {named:?} must not stick, got {picked:?}", fx.upstream);
            assert!(!fx.backends[picked.index].cfg.backup, "{}: a backup picked while primaries are up", fx.upstream);
        }
    }
    if !picked.set_cookie {
        // Forging is impossible: some `name=value` pair carries the issued value (quotes aside).
        let issued = fx.issued[picked.index].as_str();
        let carried = headers
            .get_all(header::COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
            .filter_map(|pair| {
                let pair = pair.trim_ascii();
                let eq = pair.iter().position(|&b| b == b'=')?;
                Some((&pair[..eq], &pair[eq + 1..]))
            })
            .any(|(k, v)| k == fx.cookie_name.as_bytes() && trim_quotes(v) == issued.as_bytes());
        assert!(carried, "{}: stuck to {} without its issued cookie {issued:?}", fx.upstream, picked.index);
        if let Some(secret) = fx.secret {
            // Checked here with the hmac crate directly, not through the balancer's signing code.
            use hmac::{KeyInit, Mac};
            let (id, tag) = issued.split_once('.').expect("a signed id has a tag");
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
            mac.update(id.as_bytes());
            let expected = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&mac.finalize().into_bytes()[..16]);
            assert_eq!(tag, expected, "{}: stuck to a cookie whose tag is not the HMAC of its id", fx.upstream);
        }
    }
}

/// One pair of surrounding double quotes goes (RFC 6265 cookie-value).
fn trim_quotes(v: &[u8]) -> &[u8] {
    match v {
        [b'"', inner @ .., b'"'] => inner,
        v => v,
    }
}

// ---------------------------------------------------------------------------------------
// request_head

/// A request head parsed from `data`: the first request of a connection.
pub struct ParsedHead {
    /// Every header as sent, in order (what a lenient parser in front of us would pass on).
    pub raw: Parts,
    /// The `Parts` hyper's HTTP/1 server (as tidegate configures it) hands the service, or
    /// `None` when hyper refuses the head (400 or 431 before our code runs).
    pub hyper: Option<Parts>,
    /// Bytes of the head, the blank line included.
    pub len: usize,
}

/// Parses the first request head in `data` as hyper 1.x's server does: `httparse` with the
/// default parser config and `MAX_HEADERS` header slots, a head of at most `MAX_HEAD` bytes,
/// then hyper's framing normalisation (a `Content-Length` next to `Transfer-Encoding` is
/// dropped, equal duplicate lengths are merged, a final encoding other than chunked and
/// `Transfer-Encoding` in HTTP/1.0 are refused). `None` when `httparse` does not complete or
/// `http` cannot represent the head.
pub fn parse_head(data: &[u8]) -> Option<ParsedHead> {
    let mut slots = [httparse::EMPTY_HEADER; crate::connection::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let httparse::Status::Complete(len) = req.parse(data).ok()? else { return None };
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    let path = req.path?;
    let uri = Uri::from_maybe_shared(bytes::Bytes::copy_from_slice(path.as_bytes())).ok()?;
    let version = if req.version? == 1 { Version::HTTP_11 } else { Version::HTTP_10 };
    // In wire order: hyper's normalisation depends on it.
    let mut wire = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        // hyper builds values unchecked; an `http` value refused here is not representable.
        wire.push((HeaderName::from_bytes(h.name.as_bytes()).ok()?, HeaderValue::from_bytes(h.value).ok()?));
    }
    let (mut raw, ()) = Request::builder().method(method).uri(uri).version(version).body(()).ok()?.into_parts();
    let hyper = hyper_normalise(&raw, &wire, len, path.len());
    for (name, value) in wire {
        raw.headers.append(name, value);
    }
    Some(ParsedHead { raw, hyper, len })
}

/// hyper's `Server::parse` after `httparse` (hyper 1.x, `proto/h1/role.rs`), over the headers
/// in wire order.
fn hyper_normalise(line: &Parts, wire: &[(HeaderName, HeaderValue)], len: usize, uri_len: usize) -> Option<Parts> {
    if len > crate::connection::MAX_HEAD || uri_len > usize::from(u16::MAX - 1) {
        return None;
    }
    let is_http_11 = line.version == Version::HTTP_11;
    let mut headers = HeaderMap::new();
    let (mut is_te, mut is_te_chunked, mut is_cl, mut con_len) = (false, false, false, None::<u64>);
    for (name, value) in wire {
        if name == header::TRANSFER_ENCODING {
            if !is_http_11 {
                return None;
            }
            is_te = true;
            if is_cl && con_len.take().is_some() {
                headers.remove(header::CONTENT_LENGTH);
            }
            is_te_chunked =
                value.to_str().ok().and_then(|s| s.rsplit(',').next()).is_some_and(|e| e.trim().eq_ignore_ascii_case("chunked"));
        } else if name == header::CONTENT_LENGTH {
            is_cl = true;
            if is_te {
                continue;
            }
            let n = from_digits(value.as_bytes())?;
            if let Some(prev) = con_len {
                if prev != n {
                    return None;
                }
                continue;
            }
            if n > u64::MAX - 2 {
                return None;
            }
            con_len = Some(n);
        }
        headers.append(name.clone(), value.clone());
    }
    if is_te && !is_te_chunked {
        return None;
    }
    let (mut parts, ()) =
        Request::builder().method(line.method.clone()).uri(line.uri.clone()).version(line.version).body(()).ok()?.into_parts();
    parts.headers = headers;
    Some(parts)
}

/// hyper's Content-Length digits: no sign, no blanks, no overflow.
fn from_digits(b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return None;
    }
    b.iter().try_fold(0u64, |n, &d| if d.is_ascii_digit() { n.checked_mul(10)?.checked_add(u64::from(d - b'0')) } else { None })
}

/// The request-head policy (`proxy::check_request_head`) on the first request head of `data`,
/// both as hyper hands it over and with every header as sent. Never panics; when it accepts a
/// head: exactly one visible-ASCII Host, not both Content-Length and Transfer-Encoding, a
/// Transfer-Encoding only as one `chunked` (case-insensitive), all Content-Length values the
/// same plain digits, no CONNECT, `*` only for OPTIONS, an absolute-form authority equal to
/// the Host; when it says WebSocket: a GET over HTTP/1.1 with one `Upgrade: websocket`,
/// `Connection: upgrade`, one `Sec-WebSocket-Key` that decodes to 16 bytes and one
/// `Sec-WebSocket-Version: 13`; when it says plain HTTP, the head asked for no WebSocket
/// upgrade; every refusal is a 400 or 426 that closes the connection. Across the layers: the
/// framing scanner flags the head exactly when it carried both Content-Length and
/// Transfer-Encoding (what hyper drops silently), so no such head is ever routed.
pub fn request_head(data: &[u8]) {
    let mut scanner = FramingScanner::default();
    scanner.feed(data);
    let Some(head) = parse_head(data) else { return };
    let both = head.raw.headers.contains_key(header::CONTENT_LENGTH) && head.raw.headers.contains_key(header::TRANSFER_ENCODING);
    assert_eq!(scanner.is_ambiguous(0), both, "the framing scanner and httparse disagree on CL+TE in the first head");

    let raw_verdict = check_head(&head.raw);
    if let Some(hyper) = &head.hyper {
        let verdict = check_head(hyper);
        let routed = verdict.is_ok() && !scanner.is_ambiguous(0);
        assert!(!(routed && both), "a head with both Content-Length and Transfer-Encoding would be routed");
        if let Ok(ws) = raw_verdict {
            // hyper only removes duplicate or conflicting lengths; a head fine as sent stays fine.
            assert_eq!(verdict.ok(), Some(ws), "hyper's normalisation changed an accepted head's verdict");
        }
    }
}

/// Runs the policy on `req` and checks its verdict; `Ok(websocket)` or `Err(())`.
fn check_head(req: &Parts) -> Result<bool, ()> {
    let verdict = crate::proxy::check_request_head(req);
    let h = &req.headers;
    let count = |name: HeaderName| h.get_all(name).iter().count();
    let asks_websocket = count(header::UPGRADE) == 1
        && h.get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    match verdict {
        Ok(websocket) => {
            assert_eq!(count(header::HOST), 1, "accepted without exactly one Host");
            let host = h.get(header::HOST).and_then(|v| v.to_str().ok()).expect("accepted a Host that is not visible ASCII");
            let (cl, te): (Vec<&HeaderValue>, Vec<&HeaderValue>) =
                (h.get_all(header::CONTENT_LENGTH).iter().collect(), h.get_all(header::TRANSFER_ENCODING).iter().collect());
            assert!(cl.is_empty() || te.is_empty(), "accepted both Content-Length and Transfer-Encoding");
            assert!(te.len() <= 1 && te.iter().all(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked")), "accepted Transfer-Encoding {te:?}");
            assert!(cl.iter().all(|v| !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit)), "accepted Content-Length {cl:?}");
            assert!(cl.windows(2).all(|w| w[0] == w[1]), "accepted differing Content-Length {cl:?}");
            assert_ne!(req.method, Method::CONNECT, "accepted CONNECT");
            match req.uri.authority() {
                Some(a) => assert!(a.as_str().eq_ignore_ascii_case(host), "accepted authority {a} for Host {host}"),
                None if req.uri.path() == "*" => assert_eq!(req.method, Method::OPTIONS, "accepted * for {}", req.method),
                None => {}
            }
            if websocket {
                assert!(asks_websocket, "WebSocket without Upgrade: websocket and Connection: upgrade");
                assert_eq!(req.method, Method::GET, "WebSocket upgrade by {}", req.method);
                assert_eq!(req.version, Version::HTTP_11, "WebSocket upgrade over {:?}", req.version);
                let keys: Vec<&HeaderValue> = h.get_all(header::SEC_WEBSOCKET_KEY).iter().collect();
                assert_eq!(keys.len(), 1, "WebSocket upgrade with {} keys", keys.len());
                let decoded = base64::engine::general_purpose::STANDARD.decode(keys[0].as_bytes());
                assert!(decoded.is_ok_and(|k| k.len() == 16), "WebSocket key {:?} is not 16 bytes of base64", keys[0]);
                let versions: Vec<&HeaderValue> = h.get_all(header::SEC_WEBSOCKET_VERSION).iter().collect();
                assert!(versions.len() == 1 && versions[0] == "13", "WebSocket versions {versions:?}");
            } else {
                assert!(!asks_websocket, "a WebSocket upgrade request accepted as plain HTTP");
            }
            Ok(websocket)
        }
        Err(e) => {
            let status = e.status().as_u16();
            assert!(status == 400 || status == 426, "head refused with {status}: {e}");
            assert!(status == 400 || asks_websocket, "426 for a request that asked no WebSocket upgrade");
            assert!(e.closes_connection(), "{e}");
            assert!(!e.to_string().is_empty());
            Err(())
        }
    }
}
