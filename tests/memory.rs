//! Bodies are streamed, never buffered whole: a 100 MB upload and a 100 MB download pass
//! through the tidegate binary while its resident memory stays flat (measured from
//! /proc/PID/status while the transfer runs).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

const TOTAL: u64 = 100 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;
/// Growth of tidegate's RSS allowed while 100 MB pass: far below the body, above noise.
const MAX_GROWTH: u64 = 24 * 1024 * 1024;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn chunks() -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    stream::iter((0..TOTAL / CHUNK as u64).map(move |_| Ok(Frame::data(chunk.clone()))))
}

/// POST: counts the body and answers the count. GET: streams TOTAL bytes.
async fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { continue };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let body: BoxBody<Bytes, Infallible> = if req.method() == hyper::Method::POST {
                        let mut n = 0u64;
                        let mut b = req.into_body();
                        while let Some(Ok(f)) = b.frame().await {
                            n += f.data_ref().map_or(0, |d| d.len() as u64);
                        }
                        Full::new(Bytes::from(n.to_string())).boxed()
                    } else {
                        StreamBody::new(chunks()).boxed()
                    };
                    Ok::<_, Infallible>(Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    addr
}

async fn start_tidegate(backend: SocketAddr) -> (Kill, SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("tidegate-memory-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("tg.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[listener]]\nname = \"m\"\nbind = \"127.0.0.1:{port}\"\n  [[listener.route]]\n  upstream = \"b\"\n[upstream.b]\nservers = [{{ addr = \"{backend}\" }}]\n"
        ),
    )
    .unwrap();
    let child = Kill(
        Command::new(env!("CARGO_BIN_EXE_tidegate"))
            .args(["run", "-c", cfg.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return (child, addr);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("tidegate did not start");
}

/// Samples `pid`'s RSS until `stop`; returns the peak.
fn sample(pid: u32, stop: Arc<AtomicBool>, peak: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            peak.fetch_max(rss(pid), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

async fn send(addr: SocketAddr, req: Request<BoxBody<Bytes, Infallible>>) -> (u16, u64, Bytes) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let mut n = 0u64;
    let mut last = Bytes::new();
    let mut body = resp.into_body();
    while let Some(f) = body.frame().await {
        if let Some(d) = f.unwrap().data_ref() {
            n += d.len() as u64;
            last = d.clone();
        }
    }
    (status, n, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_each_way_with_flat_memory() {
    let b = backend().await;
    let (tg, addr) = start_tidegate(b).await;
    let pid = tg.0.id();
    // Warm up (first connections, pools, allocator arenas), then take the baseline.
    for _ in 0..3 {
        let req = Request::get("/").header("host", "m").body(Full::new(Bytes::new()).boxed()).unwrap();
        let (status, n, _) = send(addr, req).await;
        assert_eq!((status, n), (200, TOTAL));
    }
    let baseline = rss(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = sample(pid, stop.clone(), peak.clone());
    let upload = Request::post("/").header("host", "m").body(StreamBody::new(chunks()).boxed()).unwrap();
    let (status, _, count) = tokio::time::timeout(Duration::from_secs(120), send(addr, upload)).await.expect("upload finishes");
    assert_eq!(status, 200);
    assert_eq!(count, Bytes::from(TOTAL.to_string()), "the backend received every byte");
    let download = Request::get("/").header("host", "m").body(Full::new(Bytes::new()).boxed()).unwrap();
    let (status, n, _) = tokio::time::timeout(Duration::from_secs(120), send(addr, download)).await.expect("download finishes");
    assert_eq!((status, n), (200, TOTAL));
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();

    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    println!(
        "tidegate RSS: baseline {} KiB, peak {} KiB, growth {} KiB over 2 x 100 MiB",
        baseline / 1024,
        peak.load(Ordering::Relaxed) / 1024,
        growth / 1024
    );
    assert!(growth < MAX_GROWTH, "RSS grew by {growth} bytes while streaming 100 MiB each way");
}
