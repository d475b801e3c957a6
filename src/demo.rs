//! Demo backends: an HTTP + WebSocket echo server that says which one it is. `tidegate demo`
//! starts one per server of `conf/demo.toml`; the tests use the same server.
//!
//! - `GET` any path: `hello from NAME` (and header `x-backend: NAME`).
//! - `POST`: the body echoed back, streamed.
//! - `GET` with `Upgrade: websocket`: a WebSocket echo; the `101` carries `x-backend: NAME`,
//!   and a text message `whoami` is answered with `NAME`.
//! - `GET /healthz`: 200 with the backend's open WebSocket count in `X-Live-Connections` and
//!   as JSON `{"live": N}` (what `[upstream.NAME.health] load = ...` reads). Also on the
//!   WebSocket `101`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::ws;

type DemoBody = BoxBody<Bytes, hyper::Error>;

/// Binds `addr` (port 0 for any) and serves until the task is aborted.
pub async fn spawn_backend(name: &str, addr: SocketAddr) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let name: &'static str = Box::leak(name.to_string().into_boxed_str());
    let live: &'static AtomicU32 = Box::leak(Box::new(AtomicU32::new(0)));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(move |req| async move { Ok::<_, Infallible>(respond(name, live, req).await) });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).with_upgrades().await;
            });
        }
    });
    Ok((local, task))
}

fn full(s: impl Into<Bytes>) -> DemoBody {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

async fn respond(name: &'static str, live: &'static AtomicU32, mut req: Request<Incoming>) -> Response<DemoBody> {
    let is_ws = req.headers().get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let mut resp = if is_ws {
        let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return status(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
        };
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                live.fetch_add(1, Ordering::Relaxed);
                echo(name, WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, None).await).await;
                live.fetch_sub(1, Ordering::Relaxed);
            }
        });
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&ws::accept_key(key.as_bytes())).expect("base64 is a valid header"));
        r
    } else if req.uri().path() == "/healthz" {
        let n = live.load(Ordering::Relaxed);
        let mut r = Response::new(full(format!("{{\"live\": {n}}}\n")));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    } else if req.method() == Method::POST || req.method() == Method::PUT {
        Response::new(req.into_body().boxed())
    } else {
        Response::new(full(format!("hello from {name}\n")))
    };
    resp.headers_mut().insert("x-backend", HeaderValue::from_static(name));
    resp.headers_mut().insert("x-live-connections", HeaderValue::from(live.load(Ordering::Relaxed)));
    resp
}

fn status(code: StatusCode, msg: &'static str) -> Response<DemoBody> {
    let mut r = Response::new(full(msg));
    *r.status_mut() = code;
    r
}

async fn echo<S>(name: &str, mut ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(t) if t.as_str() == "whoami" => Message::text(name),
            Message::Text(_) | Message::Binary(_) => msg,
            // tungstenite answers pings and close frames itself.
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}
