//! One request: check its framing, route it, pick a backend (with failover on connect
//! failure), forward it with hop-by-hop headers replaced, and either stream the response back
//! or, on a valid `101` to a WebSocket upgrade, hand both sockets to a tunnel.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};

use crate::access::{self, AccessLog};
use crate::balancer::{NoPick, PickCtx};
use crate::body::ProxyBody;
use crate::config::Cidr;
use crate::config::Underscores;
use crate::connection::{ConnCtx, UpgradedIo};
use crate::error::ProxyError;
use crate::route::host_without_port;
use crate::runtime::{ConnGuard, Runtime, Upstream, now_ms};
use crate::upstream::{self, ReqBody, ReqProgress, Sender};
use crate::ws;

pub async fn handle(req: Request<Incoming>, cx: Arc<ConnCtx>) -> Response<ProxyBody> {
    let ordinal = cx.phase.set_busy();
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    let body_present = has_body(&parts.headers);
    if cx.phase.is_ambiguous(ordinal) {
        // hyper dropped the Content-Length; the raw head had both.
        return local_error(&parts, true, &cx, ProxyError::BadRequest("both Content-Length and Transfer-Encoding"));
    }
    let rt = cx.shared.runtime.load_full();
    match forward(&mut parts, body, &cx, &rt, start).await {
        Ok(resp) => resp,
        Err(e) => local_error(&parts, body_present, &cx, e),
    }
}

fn local_error(req: &Parts, body_present: bool, cx: &ConnCtx, e: ProxyError) -> Response<ProxyBody> {
    let status = e.status();
    match &e {
        ProxyError::BadRequest(_) | ProxyError::NoRoute { .. } => tracing::debug!(peer = %cx.peer, error = %e, "request refused"),
        _ => tracing::warn!(peer = %cx.peer, error = %display_chain(&e), "request failed"),
    }
    access::emit_local(cx.peer, &req.method, req.uri.path(), status.as_u16(), &e);
    cx.shared.registry.metrics.local_response(status.as_u16());
    let mut resp = Response::new(ProxyBody::local(
        format!("{} {}\n", status.as_u16(), status.canonical_reason().unwrap_or("")),
        Some(cx.phase.clone()),
    ));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    // A request whose body we did not read, or whose framing we distrust, must not leave
    // bytes behind that the next request would be parsed from.
    if e.closes_connection() || body_present {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if status == StatusCode::UPGRADE_REQUIRED {
        h.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    resp
}

fn display_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn has_body(h: &HeaderMap) -> bool {
    h.contains_key(header::TRANSFER_ENCODING) || h.get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0")
}

/// Rejects framing that a server behind us might read differently (request smuggling).
fn check_framing(h: &HeaderMap) -> Result<(), ProxyError> {
    let te: Vec<&HeaderValue> = h.get_all(header::TRANSFER_ENCODING).iter().collect();
    let mut cl = h.get_all(header::CONTENT_LENGTH).iter();
    let first_cl = cl.next();
    if !te.is_empty() && first_cl.is_some() {
        return Err(ProxyError::BadRequest("both Content-Length and Transfer-Encoding"));
    }
    if let Some(first) = first_cl {
        if first.is_empty() || !first.as_bytes().iter().all(u8::is_ascii_digit) {
            return Err(ProxyError::BadRequest("malformed Content-Length"));
        }
        if cl.any(|v| v != first) {
            return Err(ProxyError::BadRequest("differing Content-Length headers"));
        }
    }
    match te.as_slice() {
        [] => {}
        [one] if one.as_bytes().eq_ignore_ascii_case(b"chunked") => {}
        _ => return Err(ProxyError::BadRequest("Transfer-Encoding other than a single chunked")),
    }
    Ok(())
}

/// Request targets a reverse proxy serves: origin-form; `*` only for OPTIONS; absolute-form
/// only when its authority is the Host; never CONNECT.
fn check_target(req: &Parts, host: &str) -> Result<(), ProxyError> {
    if req.method == Method::CONNECT {
        return Err(ProxyError::BadRequest("CONNECT is not proxied"));
    }
    if req.uri.path() == "*" && req.uri.authority().is_none() {
        return if req.method == Method::OPTIONS { Ok(()) } else { Err(ProxyError::BadRequest("request target * is only for OPTIONS")) };
    }
    if let Some(authority) = req.uri.authority()
        && !authority.as_str().eq_ignore_ascii_case(host)
    {
        return Err(ProxyError::BadRequest("absolute-form target whose authority is not the Host"));
    }
    Ok(())
}

/// The request-head policy, before routing: framing, exactly one visible-ASCII `Host`, the
/// request target, and the upgrade rules. Returns the Host and what the client asked to
/// upgrade to.
fn head_policy(req: &Parts) -> Result<(HeaderValue, Upgrade), ProxyError> {
    check_framing(&req.headers)?;
    let mut hosts = req.headers.get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(h), None) => h.clone(),
        _ => return Err(ProxyError::BadRequest("request needs exactly one Host header")),
    };
    let host_text = host.to_str().map_err(|_| ProxyError::BadRequest("Host is not visible ASCII"))?;
    check_target(req, host_text)?;
    Ok((host, classify_upgrade(req)?))
}

/// [`head_policy`] for fuzzing and tests: `Ok` when the head would be routed, with whether it
/// asks for a WebSocket tunnel.
pub fn check_request_head(req: &Parts) -> Result<bool, ProxyError> {
    head_policy(req).map(|(_, up)| matches!(up, Upgrade::WebSocket { .. }))
}

/// Does a comma-separated header contain `token` (case-insensitive)?
fn has_token(h: &HeaderMap, name: HeaderName, token: &str) -> bool {
    h.get_all(name).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// What the client asked to upgrade to.
enum Upgrade {
    None,
    WebSocket { key: HeaderValue },
}

fn classify_upgrade(req: &Parts) -> Result<Upgrade, ProxyError> {
    let h = &req.headers;
    let Some(up) = h.get(header::UPGRADE) else { return Ok(Upgrade::None) };
    let is_ws = up.as_bytes().eq_ignore_ascii_case(b"websocket") && h.get_all(header::UPGRADE).iter().count() == 1;
    if !is_ws || !has_token(h, header::CONNECTION, "upgrade") {
        // h2c and any other protocol: the upgrade headers are stripped and the request goes
        // on as plain HTTP/1.1, never as a tunnel.
        return Ok(Upgrade::None);
    }
    if req.method != Method::GET || req.version != Version::HTTP_11 {
        return Err(ProxyError::BadRequest("WebSocket upgrade must be a GET over HTTP/1.1"));
    }
    let mut keys = h.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) if ws::valid_key(k.as_bytes()) => k.clone(),
        _ => return Err(ProxyError::BadRequest("WebSocket upgrade without exactly one valid Sec-WebSocket-Key")),
    };
    let mut versions = h.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.as_bytes() == b"13" => {}
        (None, _) => return Err(ProxyError::BadRequest("WebSocket upgrade without Sec-WebSocket-Version: 13")),
        _ => return Err(ProxyError::WebSocketVersion),
    }
    Ok(Upgrade::WebSocket { key })
}

/// Headers that belong to one hop and never travel on: the fixed list, `proxy-*`, and those
/// the `Connection` header names.
///
/// One pass over the names finds them, and only names actually present are removed: most
/// messages carry none, and every `HeaderMap::remove`, even of an absent name, hashes it.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let doomed: Vec<HeaderName> = h.keys().filter(|k| is_hop_by_hop(k) || named.contains(k)).cloned().collect();
    for name in doomed {
        h.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    [header::CONNECTION, header::TE, header::TRAILER, header::TRANSFER_ENCODING, header::UPGRADE].contains(name)
        || name == "keep-alive"
        || name.as_str().starts_with("proxy-")
}

fn is_trusted(list: &[Cidr], ip: IpAddr) -> bool {
    list.iter().any(|c| c.contains(ip))
}

/// Behind trusted proxies, the client is the right-most `X-Forwarded-For` address that is
/// not itself a trusted proxy.
fn client_behind_proxies(h: &HeaderMap, trusted: &[Cidr]) -> Option<IpAddr> {
    let mut last = None;
    for v in h.get_all(&X_FORWARDED_FOR).iter().rev() {
        for part in v.to_str().ok()?.rsplit(',') {
            let ip: IpAddr = part.trim().parse().ok()?;
            let ip = ip.to_canonical();
            if !is_trusted(trusted, ip) {
                return Some(ip);
            }
            last = Some(ip);
        }
    }
    last
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The client's address as an `X-Forwarded-For` entry; made once per connection (formatting
/// an address and copying it into a header value costs more than the rest of the headers).
pub fn forwarded_for(ip: IpAddr) -> HeaderValue {
    HeaderValue::try_from(ip.to_canonical().to_string()).expect("an IP address is a valid header value")
}

/// `client` is `forwarded_for(peer)`.
fn set_forwarded(h: &mut HeaderMap, client: &HeaderValue, trusted: bool, tls: bool, host: Option<HeaderValue>) {
    let mut xff = Some(client.clone());
    if trusted {
        let mut chain = String::new();
        for prev in h.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty()) {
            chain.push_str(prev);
            chain.push_str(", ");
        }
        if !chain.is_empty() {
            chain.push_str(client.to_str().unwrap_or_default());
            xff = HeaderValue::from_str(&chain).ok();
        }
    }
    match xff {
        Some(v) => h.insert(X_FORWARDED_FOR.clone(), v),
        None => h.remove(&X_FORWARDED_FOR),
    };
    if !(trusted && h.contains_key(&X_FORWARDED_PROTO)) {
        h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(if tls { "https" } else { "http" }));
    }
    if !(trusted && h.contains_key(&X_FORWARDED_HOST))
        && let Some(host) = host
    {
        h.insert(X_FORWARDED_HOST.clone(), host);
    }
}

/// What the `X-Forwarded-*` headers say about the client's hop.
pub struct Forwarded {
    /// The client's own `X-Forwarded-For` entry ([`forwarded_for`]).
    pub client: HeaderValue,
    /// The peer is a trusted proxy: its `X-Forwarded-*` headers are kept and appended to.
    pub trusted: bool,
    pub tls: bool,
    pub host: HeaderValue,
}

/// Re-makes a request's headers for the server: hop-by-hop headers go, `Expect` is answered
/// here, header names with `_` follow `underscores`, `X-Forwarded-*` are set, and a WebSocket
/// upgrade gets its `Connection`/`Upgrade` back.
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    underscores: Underscores,
    fwd: Forwarded,
    websocket: bool,
) -> Result<(), ProxyError> {
    strip_hop_by_hop(headers);
    // 100-continue is answered here (hyper sends it when the body is first read); the server
    // never gets to answer early to a body we already promised to take.
    headers.remove(header::EXPECT);
    match underscores {
        Underscores::Allow => {}
        policy => {
            let odd: Vec<HeaderName> = headers.keys().filter(|k| k.as_str().contains('_')).cloned().collect();
            if !odd.is_empty() && policy == Underscores::Reject {
                return Err(ProxyError::BadRequest("header name with an underscore"));
            }
            for name in odd {
                headers.remove(name);
            }
        }
    }
    set_forwarded(headers, &fwd.client, fwd.trusted, fwd.tls, Some(fwd.host));
    if websocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    Ok(())
}

async fn forward(
    req: &mut Parts,
    body: Incoming,
    cx: &Arc<ConnCtx>,
    rt: &Arc<Runtime>,
    start: Instant,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (host_value, upgrade) = head_policy(req)?;
    let host = host_without_port(host_value.to_str().unwrap_or_default());
    let path = req.uri.path();
    // The connection's listener in this snapshot: by index while nothing was reloaded since
    // the accept, else by key.
    let li = if rt.generation == cx.generation { Some(cx.listener) } else { rt.listener_index.get(&*cx.listener_key).copied() };
    let Some(li) = li else { return Err(ProxyError::ListenerGone) };
    let listener_cfg = &rt.config.listeners[li];
    let Some(up_idx) = rt.listeners[li].router.find(host, path) else {
        return Err(ProxyError::NoRoute { host: host.to_string(), path: path.to_string() });
    };
    let upstream = &rt.upstreams[up_idx];
    let client_upgrade = match upgrade {
        Upgrade::WebSocket { .. } => req.extensions.remove::<OnUpgrade>(),
        Upgrade::None => None,
    };

    // The request that goes upstream: same method, origin-form target, headers re-made.
    let trusted = is_trusted(&listener_cfg.trusted_proxies, cx.peer.ip().to_canonical());
    let client_ip = if trusted { client_behind_proxies(&req.headers, &listener_cfg.trusted_proxies) } else { None }.unwrap_or(cx.peer.ip());
    let bytes_in = Arc::new(ReqProgress::default());
    let mut out = Request::new(ReqBody::new(body, bytes_in.clone(), cx.timeouts.body, cx.timeouts.body_min_rate));
    *out.method_mut() = req.method.clone();
    *out.uri_mut() = req.uri.path_and_query().map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    let mut headers = std::mem::take(&mut req.headers);
    let forwarded = Forwarded { client: cx.forwarded_for.clone(), trusted, tls: cx.tls, host: host_value };
    rewrite_request_headers(&mut headers, listener_cfg.header_underscores, forwarded, matches!(upgrade, Upgrade::WebSocket { .. }))?;
    *out.headers_mut() = headers;

    let (mut resp, guard, mut sender, backend_addr, set_cookie) = match dispatch(upstream, out, cx, client_ip).await {
        Err(_) if bytes_in.too_slow.load(std::sync::atomic::Ordering::Relaxed) => return Err(ProxyError::BodyTooSlow),
        Err(_) if bytes_in.client_error.load(std::sync::atomic::Ordering::Relaxed) => {
            return Err(ProxyError::BadRequest("malformed or incomplete request body"));
        }
        other => other?,
    };
    // A server whose answer ends before it has the whole body gets no more of it: it would
    // read the rest as a next request. The upload is cut (closing that connection) when the
    // response ends, or this exchange fails.
    let upload = upstream::UploadEnd(bytes_in.clone());
    let bad_response = |reason| ProxyError::BadResponse { addr: backend_addr, reason };
    // Dropping the response and its connection here closes that connection.
    check_response_framing(&resp).map_err(bad_response)?;
    upstream.metrics.requests[usize::from(resp.status().as_u16() / 100).clamp(1, 5) - 1].inc();
    if let Some(cookie) = set_cookie {
        resp.headers_mut().append(header::SET_COOKIE, cookie);
    }

    let log = access::enabled().then(|| AccessLog {
        client: cx.peer,
        method: req.method.clone(),
        path: req.uri.path().to_string(),
        status: resp.status().as_u16(),
        upstream: upstream.name().to_string(),
        backend: backend_addr,
        start,
        bytes_in: bytes_in.clone(),
    });

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let (Upgrade::WebSocket { key }, Some(client_upgrade)) = (upgrade, client_upgrade) else {
            return Err(ProxyError::BadUpgrade { addr: backend_addr, reason: "101 to a request that did not ask to upgrade" });
        };
        return start_tunnel(resp, &key, client_upgrade, guard, log, upstream, backend_addr, cx);
    }

    let mut max_idle = if upstream.cfg.send_proxy.is_some() { 0 } else { upstream.cfg.keepalive };
    let mut first = None;
    if http_body::Body::is_end_stream(resp.body()) {
        if bytes_in.is_done() {
            // Stray bytes right behind a response without a body (a body sent after a HEAD
            // answer, a 204 or a 304) break the connection: hyper has seen them by the time the
            // connection would be idle again.
            match tokio::time::timeout(SETTLE, sender.settled()).await {
                Ok(true) => {}
                Ok(false) if sender.is_broken() => return Err(bad_response("bytes after a response without a body")),
                _ => max_idle = 0,
            }
        }
    } else if resp.headers().contains_key(header::TRANSFER_ENCODING) {
        first = first_chunk(resp.body_mut()).await.map_err(|_| bad_response("malformed chunked body"))?;
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if !bytes_in.is_done() {
        // The server answered before the whole request body arrived: whatever the client still
        // sends of it must not be read as a next request.
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let body = ProxyBody::upstream(
        (body, first),
        Some((sender, max_idle)),
        guard,
        log,
        Some(cx.phase.clone()),
        (upstream.metrics.clone(), upload),
    );
    Ok(Response::from_parts(parts, body))
}

/// How long a connection may take to be ready again after a response without a body.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// How long the head of a chunked response waits for its first chunk, so that a malformed
/// one (usually in the same packet as the head) is answered 502 instead of cutting a response
/// already under way.
const FIRST_CHUNK_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Refuses a response whose framing a client (or a cache between) might read differently
/// than hyper did: `Content-Length` with `Transfer-Encoding`, a transfer coding other than
/// plain `chunked` (anything else runs to the connection's end), or framing headers on a 1xx
/// or 204, which never have a body (RFC 9112 §6.1, 6.2; HEAD and 304 answers may carry them).
fn check_response_framing(resp: &Response<Incoming>) -> Result<(), &'static str> {
    let h = resp.headers();
    let status = resp.status();
    let te: Vec<&HeaderValue> = h.get_all(header::TRANSFER_ENCODING).iter().collect();
    let cl = h.get(header::CONTENT_LENGTH);
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(());
    }
    if !te.is_empty() && cl.is_some() {
        return Err("both Content-Length and Transfer-Encoding");
    }
    let never_body = status.is_informational() || status == StatusCode::NO_CONTENT;
    if !te.is_empty() {
        if never_body {
            return Err("Transfer-Encoding on a 1xx or 204");
        }
        match te.as_slice() {
            [one] if one.as_bytes().eq_ignore_ascii_case(b"chunked") => {}
            _ => return Err("Transfer-Encoding other than a single chunked"),
        }
    }
    if never_body && cl.is_some_and(|v| v.as_bytes() != b"0") {
        return Err("Content-Length on a 1xx or 204");
    }
    Ok(())
}

/// Waits up to [`FIRST_CHUNK_WAIT`] for the first frame of a chunked body.
async fn first_chunk(body: &mut Incoming) -> Result<Option<hyper::body::Frame<bytes::Bytes>>, hyper::Error> {
    use http_body_util::BodyExt;
    match tokio::time::timeout(FIRST_CHUNK_WAIT, body.frame()).await {
        Ok(Some(frame)) => frame.map(Some),
        Ok(None) | Err(_) => Ok(None),
    }
}

/// Runs `f`, returning its output and how long it took, in seconds.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, f64) {
    let started = Instant::now();
    let out = f.await;
    (out, started.elapsed().as_secs_f64())
}

/// Picks backends until one accepts the request: connect failures move on to the next
/// backend before any byte of the request left; anything later is final.
async fn dispatch(
    upstream: &Upstream,
    mut req: Request<ReqBody>,
    cx: &Arc<ConnCtx>,
    client: IpAddr,
) -> Result<(Response<Incoming>, ConnGuard, Sender, SocketAddr, Option<HeaderValue>), ProxyError> {
    let tries = if upstream.cfg.tries == 0 { upstream.backends.len() } else { upstream.cfg.tries };
    // Inline for the usual one or few tries: no allocation per request.
    let mut tried: smallvec::SmallVec<[usize; 4]> = smallvec::SmallVec::new();
    let mut last_err: Option<ProxyError> = None;
    let timeouts = upstream.cfg.timeouts;
    let fail_on = &upstream.cfg.fail_on;
    let ignore_health = upstream.in_panic();
    while tried.len() < tries {
        let now = now_ms();
        let pick_cx = PickCtx { client, headers: req.headers(), uri: req.uri(), tried: &tried, now_ms: now, ignore_health };
        let picked = match upstream.balancer.pick(&upstream.backends, &pick_cx) {
            Ok(p) => p,
            Err(NoPick::Full) if last_err.is_none() => return Err(ProxyError::AllFull { upstream: upstream.name().to_string() }),
            Err(_) => break,
        };
        let i = picked.index;
        upstream.backends[i].state.metrics.picks.inc();
        tried.push(i);
        let backend = &upstream.backends[i];
        let Some(guard) = backend.state.try_acquire(backend.cfg.max_conns) else { continue };
        let addr = backend.addr();
        // A pooled connection first; if it turns out dead, a fresh one (not a failure).
        // With send_proxy every connection carries one client's address: no pooling.
        let preamble = upstream.cfg.send_proxy.map(|v| crate::proxy_protocol::encode(v, cx.peer, cx.local));
        let mut sender = if preamble.is_some() { None } else { backend.state.pool.take() };
        loop {
            let mut s = match sender.take() {
                Some(s) => s,
                None => match timed(upstream::connect(addr, timeouts.connect, upstream.cfg.tls.as_ref(), preamble.as_deref())).await {
                    (Ok(s), took) => {
                        upstream.metrics.connect_seconds.observe(took);
                        s
                    }
                    (Err(e), _) => {
                        let counts = if matches!(e, ProxyError::ConnectTimeout { .. }) { fail_on.timeout } else { fail_on.connect };
                        if counts {
                            upstream.passive_failure(i);
                        }
                        tracing::warn!(upstream = %upstream.name(), backend = %addr, error = %display_chain(&e), "connect failed, trying next server");
                        last_err = Some(e);
                        break;
                    }
                },
            };
            let sent = Instant::now();
            let result = upstream::send(&mut s, req, addr, timeouts.response_header).await;
            upstream.metrics.request_seconds.observe(sent.elapsed().as_secs_f64());
            match result {
                Ok(resp) => {
                    if fail_on.statuses.contains(&resp.status().as_u16()) {
                        upstream.passive_failure(i);
                    } else {
                        backend.state.record_success();
                    }
                    let cookie = if picked.set_cookie { upstream.balancer.set_cookie(i, cx.tls).cloned() } else { None };
                    return Ok((resp, guard, s, addr, cookie));
                }
                Err(Ok(back)) => {
                    // The pooled connection was closed under us; the request never left.
                    req = back;
                    sender = if preamble.is_some() { None } else { backend.state.pool.take() };
                }
                Err(Err(e)) => {
                    if matches!(e, ProxyError::ResponseTimeout { .. }) && fail_on.timeout {
                        upstream.passive_failure(i);
                    }
                    return Err(e);
                }
            }
        }
    }
    Err(last_err.unwrap_or_else(|| ProxyError::NoServer { upstream: upstream.name().to_string() }))
}

#[allow(clippy::too_many_arguments)]
fn start_tunnel(
    mut resp: Response<Incoming>,
    key: &HeaderValue,
    client_upgrade: OnUpgrade,
    guard: ConnGuard,
    log: Option<AccessLog>,
    upstream: &Upstream,
    addr: SocketAddr,
    cx: &Arc<ConnCtx>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let h = resp.headers();
    if !h.get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket")) {
        return Err(ProxyError::BadUpgrade { addr, reason: "101 without Upgrade: websocket" });
    }
    let expected = ws::accept_key(key.as_bytes());
    if h.get(header::SEC_WEBSOCKET_ACCEPT).is_none_or(|v| v.as_bytes() != expected.as_bytes()) {
        return Err(ProxyError::BadUpgrade { addr, reason: "Sec-WebSocket-Accept does not match the client's key" });
    }
    let server_upgrade = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));

    let idle = upstream.cfg.timeouts.tunnel_idle;
    // Shutdown closes tunnels spread over up to half the grace period, so that clients do
    // not all reconnect elsewhere in the same second, yet all are closed in time.
    let shutdown_spread = upstream.cfg.drain.spread.min(cx.shared.runtime.load().shutdown_timeout / 2);
    let close = crate::tunnel::close_signal(cx.shared.shutdown.clone(), guard.backend().drain_watch(), shutdown_spread);
    let um = upstream.metrics.clone();
    let peer = cx.peer;
    // Boxed: the log line is ~170 bytes that every idle tunnel would otherwise carry inline,
    // access log on or off.
    let log = log.map(Box::new);
    cx.shared.tasks.spawn(async move {
        let (client, server) = match tokio::try_join!(client_upgrade, server_upgrade) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(peer = %peer, backend = %addr, error = %e, "upgrade did not complete");
                return;
            }
        };
        // Copy out the few early bytes (usually none) so hyper's read buffers are freed now
        // rather than pinned for the tunnel's whole life.
        let (client, client_early) = match client.downcast::<UpgradedIo>() {
            Ok(p) => (p.io.into_inner().into_inner(), p.read_buf.to_vec()),
            Err(_) => return tracing::error!("client upgrade is not a tidegate stream"),
        };
        let (server, server_early) = match server.downcast::<upstream::UpgradedUpstream>() {
            Ok(p) => (p.io.into_inner(), p.read_buf.to_vec()),
            Err(_) => return tracing::error!("server upgrade is not a tidegate upstream stream"),
        };
        let bm = guard.backend().metrics.clone();
        bm.tunnels_opened.inc();
        let open = crate::admin::metrics::GaugeGuard::new(&bm.tunnels_open);
        let stats = crate::tunnel::relay(client, client_early, server, server_early, idle, close, true).await;
        drop(open);
        bm.tunnels_closed[stats.end.reason() as usize].inc();
        um.bytes_in.inc_by(stats.client_to_server);
        um.bytes_out.inc_by(stats.server_to_client);
        drop(guard);
        if let Some(log) = log {
            log.emit_tunnel(&stats);
        }
    });
    // The 101 carries no body; the connection is the tunnel's from here on.
    Ok(Response::from_parts(parts, ProxyBody::local(bytes::Bytes::new(), None)))
}
