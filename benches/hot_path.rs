//! Per-request hot-path pieces, each on its own: routing a request, the request-head policy,
//! re-making the headers for the server, and following the raw request framing.
//!
//!     cargo bench --bench hot_path
//!
//! The balancer pick has its own bench (`benches/pick.rs`). Inputs are a typical browser
//! request (a dozen headers) and a listener with 20 routes, the matching one near the end.

use std::net::SocketAddr;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use hyper::header::HeaderValue;
use hyper::{HeaderMap, Request};
use tidegate::config::{HostMatch, RouteConfig, Underscores};
use tidegate::framing::FramingScanner;
use tidegate::proxy::{Forwarded, check_request_head, forwarded_for, rewrite_request_headers};
use tidegate::route::Router;

const HEAD: &[u8] = b"GET /api/v1/rooms/42/messages?since=1700000000 HTTP/1.1\r\n\
Host: chat.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: application/json\r\n\
Accept-Language: en-US,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Referer: https://chat.example.com/rooms/42\r\n\
Cookie: session=0123456789abcdef0123456789abcdef; tg_srv=1a2b3c4d5e6f7a8b.0011223344556677\r\n\
Connection: keep-alive\r\n\
X-Forwarded-For: 198.51.100.7\r\n\
Sec-Fetch-Dest: empty\r\n\
Sec-Fetch-Mode: cors\r\n\
Sec-Fetch-Site: same-origin\r\n\r\n";

/// The head above as hyper hands it to the proxy.
fn parts() -> hyper::http::request::Parts {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(HEAD).expect("bench head parses");
    let mut b = Request::builder().method(req.method.unwrap()).uri(req.path.unwrap());
    for h in req.headers.iter() {
        b = b.header(h.name, h.value);
    }
    b.body(()).unwrap().into_parts().0
}

fn routes() -> Router {
    let mut routes: Vec<RouteConfig> = (0..18)
        .map(|i| RouteConfig {
            host: Some(HostMatch::Exact(format!("app{i}.example.com"))),
            sni: None,
            path_prefix: Some(format!("/svc{i}")),
            upstream: i,
        })
        .collect();
    routes.push(RouteConfig {
        host: Some(HostMatch::Wildcard(".example.com".into())),
        sni: None,
        path_prefix: Some("/api".into()),
        upstream: 18,
    });
    routes.push(RouteConfig { host: None, sni: None, path_prefix: None, upstream: 19 });
    Router::new(&routes)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("hot_path");
    group.warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));

    let router = routes();
    group.bench_function("route_20", |b| b.iter(|| router.find(std::hint::black_box("chat.example.com"), "/api/v1/rooms/42")));

    let req = parts();
    group.bench_function("head_policy", |b| b.iter(|| check_request_head(std::hint::black_box(&req)).is_ok()));

    let peer: SocketAddr = "203.0.113.9:51234".parse().unwrap();
    let client = forwarded_for(peer.ip());
    let host = HeaderValue::from_static("chat.example.com");
    group.bench_function("clone_headers_only", |b| b.iter(|| std::hint::black_box(req.headers.clone())));
    group.bench_function("rewrite_headers", |b| {
        b.iter_batched(
            || req.headers.clone(),
            |mut h: HeaderMap| {
                let fwd = Forwarded { client: client.clone(), trusted: false, tls: true, host: host.clone() };
                rewrite_request_headers(&mut h, Underscores::Drop, fwd, false).unwrap();
                h
            },
            BatchSize::SmallInput,
        )
    });

    group.bench_function("framing_scan", |b| {
        b.iter(|| {
            let mut s = FramingScanner::default();
            s.feed(std::hint::black_box(HEAD));
            s.first_ambiguous
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
