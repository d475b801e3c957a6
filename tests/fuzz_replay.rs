//! The fuzz targets' logic on stable Rust: each target's checked-in seeds (`fuzz/seeds/NAME/`)
//! and then deterministic mutations of them (bit flips, byte edits, inserts, deletes, splices
//! between seeds, target-specific tokens) go through `tidegate::fuzz_logic::NAME`, the same
//! function the cargo-fuzz target calls. A property that fails panics there and fails the test;
//! the input is written to `target/tmp/fuzz_replay/NAME-failure` for `cargo fuzz run NAME FILE`.
//!
//! Per target: at most `FUZZ_REPLAY_INPUTS` inputs (default 20,000) and `FUZZ_REPLAY_SECS`
//! seconds (default 5). The input sequence is the same on every run; only how far a run gets
//! within the time bound varies.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tidegate::fuzz_logic;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("seed directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files.iter().map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).collect()
}

/// xorshift64*: deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn new(target: &str) -> Self {
        // FNV-1a of the name, so each target gets its own sequence.
        let h = target.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        Rng(h | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}

/// Bytes parsers care about.
const INTERESTING: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, b'\r', b'\n', b' ', b'\t', b':', b';', b'=', b',', b'"', b'.', b'0', b'9', b'a', b'Z'];

/// Tokens worth inserting, per target.
fn dictionary(target: &str) -> &'static [&'static [u8]] {
    match target {
        "request_head" | "framing" => &[
            b"\r\n",
            b"\r\n\r\n",
            b"Host: example.com\r\n",
            b"Content-Length: 5\r\n",
            b"Content-Length: ",
            b"Transfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: ",
            b"chunked",
            b"Upgrade: websocket\r\n",
            b"Connection: upgrade\r\n",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            b"Sec-WebSocket-Version: 13\r\n",
            b"GET ",
            b"CONNECT ",
            b"OPTIONS * ",
            b"http://example.com/",
            b" HTTP/1.1\r\n",
            b" HTTP/1.0\r\n",
            b"0\r\n\r\n",
        ],
        "sticky_cookie" => &[b"tg_srv=", b"sid=", b"; ", b"\"", b".", b"\n", b"=="],
        "proxy_protocol" => {
            &[b"PROXY ", b"TCP4 ", b"TCP6 ", b"UNKNOWN", b"\r\n", b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a", b"\x21\x11"]
        }
        "sni" => &[b"\x16\x03\x01", b"\x00\x00", b"\x01\x00", b".example.com"],
        "config" => &[b"[[listener]]\n", b"[upstream.a]\n", b"balance = \"cookie\"\n", b" = ", b"\"", b"[", b"]", b"{", b"}", b"\n"],
        "nginx" => {
            &[b"http {", b"server {", b"upstream a {", b"location / {", b"}", b";", b"include ", b"proxy_pass http://a;", b"\n", b"\""]
        }
        _ => &[],
    }
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, seeds: &[Vec<u8>], dict: &[&[u8]]) {
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            3 => {
                let at = rng.below(len + 1);
                let b = INTERESTING[rng.below(INTERESTING.len())];
                input.insert(at, b);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(16));
                input.drain(at..at + n);
            }
            5 if len > 0 => {
                // Duplicate a range.
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(32));
                let copy = input[at..at + n].to_vec();
                let to = rng.below(len + 1);
                input.splice(to..to, copy);
            }
            6 => {
                // Splice: our head, another seed's tail.
                let other = &seeds[rng.below(seeds.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            7 if !dict.is_empty() => {
                let token = dict[rng.below(dict.len())];
                let at = rng.below(len + 1);
                input.splice(at..at, token.iter().copied());
            }
            8 if len > 1 => {
                let at = rng.below(len);
                input.truncate(at);
            }
            _ => input.push(rng.next() as u8),
        }
    }
    input.truncate(64 * 1024);
}

fn run_one(target: &str, logic: fn(&[u8]), input: &[u8]) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| logic(input))) {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz_replay");
        let file = dir.join(format!("{target}-failure"));
        let saved = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&file, input));
        eprintln!(
            "fuzz_replay {target}: property failed on {} bytes (saved: {:?}): {:?}",
            input.len(),
            saved.map(|()| file),
            String::from_utf8_lossy(&input[..input.len().min(512)])
        );
        resume_unwind(panic);
    }
}

/// Replays seeds, then mutations, through `target`'s logic; returns how many inputs ran.
fn replay(target: &str) -> u64 {
    let logic = fuzz_logic::TARGETS.iter().find(|(n, _)| *n == target).unwrap_or_else(|| panic!("no fuzz logic {target}")).1;
    let seeds = seeds(target);
    let max_inputs = env_or("FUZZ_REPLAY_INPUTS", 20_000);
    let deadline = Instant::now() + Duration::from_secs(env_or("FUZZ_REPLAY_SECS", 5));
    let dict = dictionary(target);
    let mut rng = Rng::new(target);
    let mut ran = 0;
    for s in &seeds {
        run_one(target, logic, s);
        ran += 1;
    }
    // A small pool of recent mutants, so mutations stack on mutations as well as on seeds.
    let mut pool: Vec<Vec<u8>> = Vec::new();
    while ran < max_inputs && Instant::now() < deadline {
        let mut input =
            if pool.is_empty() || rng.below(2) == 0 { seeds[rng.below(seeds.len())].clone() } else { pool[rng.below(pool.len())].clone() };
        mutate(&mut rng, &mut input, &seeds, dict);
        run_one(target, logic, &input);
        ran += 1;
        if pool.len() < 256 {
            pool.push(input);
        } else {
            let i = rng.below(pool.len());
            pool[i] = input;
        }
    }
    eprintln!("fuzz_replay {target}: {ran} inputs ({} seeds)", seeds.len());
    ran
}

#[test]
fn every_target_is_replayed() {
    let names: Vec<&str> = fuzz_logic::TARGETS.iter().map(|(n, _)| *n).collect();
    let mut bins: Vec<String> = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets"))
        .expect("fuzz/fuzz_targets")
        .filter_map(|e| e.ok()?.path().file_stem()?.to_str().map(String::from))
        .collect();
    bins.sort();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(bins, sorted, "every fuzz target has fuzz logic, seeds and a #[test] here");
}

#[test]
fn config() {
    replay("config");
}

#[test]
fn proxy_protocol() {
    replay("proxy_protocol");
}

#[test]
fn sni() {
    replay("sni");
}

#[test]
fn framing() {
    replay("framing");
}

#[test]
fn nginx() {
    replay("nginx");
}

#[test]
fn sticky_cookie() {
    replay("sticky_cookie");
    // The seeds stay relevant: each issued cookie value is among them.
    let seeds = seeds("sticky_cookie");
    for fx in fuzz_logic::sticky_fixtures() {
        for value in &fx.issued {
            assert!(seeds.iter().any(|s| s.windows(value.len()).any(|w| w == value.as_bytes())), "no seed carries {value:?}");
        }
    }
}

#[test]
fn request_head() {
    replay("request_head");
    // The seeds reach both verdicts of the policy.
    let (mut websocket, mut plain) = (false, false);
    for s in seeds("request_head") {
        if let Some(head) = fuzz_logic::parse_head(&s).and_then(|h| h.hyper) {
            match tidegate::proxy::check_request_head(&head) {
                Ok(true) => websocket = true,
                Ok(false) => plain = true,
                Err(_) => {}
            }
        }
    }
    assert!(websocket && plain);
}

/// `fuzz_logic::parse_head` emulates hyper's HTTP/1 server; this holds it to the real one (as
/// `connection.rs` configures it) on the seeds and some mutations, so a hyper upgrade that
/// changes the parse shows up here rather than as a silently wrong fuzz target.
#[test]
fn request_head_emulates_hyper() {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let real = |input: &[u8]| -> Option<hyper::http::request::Parts> {
        rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(256 * 1024);
            let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
            let record = seen.clone();
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let mut slot = record.lock().unwrap();
                if slot.is_none() {
                    *slot = Some(req.into_parts().0);
                }
                async { Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Empty::<bytes::Bytes>::new())) }
            });
            let mut builder = http1::Builder::new();
            builder
                .max_buf_size(tidegate::connection::MAX_HEAD)
                .max_header_size(tidegate::connection::MAX_HEAD)
                .max_headers(tidegate::connection::MAX_HEADERS);
            let conn = builder.serve_connection(TokioIo::new(server), service);
            let io = async {
                let _ = client.write_all(input).await;
                let _ = client.shutdown().await;
                let mut sink = Vec::new();
                let _ = client.read_to_end(&mut sink).await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(conn, io) }).await;
            seen.lock().unwrap().take()
        })
    };
    let seeds = seeds("request_head");
    let mut rng = Rng::new("request_head_emulates_hyper");
    let dict = dictionary("request_head");
    let mut inputs = seeds.clone();
    for _ in 0..20_000 {
        let mut input = seeds[rng.below(seeds.len())].clone();
        mutate(&mut rng, &mut input, &seeds, dict);
        inputs.push(input);
    }
    let (mut compared, mut accepted) = (0, 0);
    for input in &inputs {
        let Some(head) = fuzz_logic::parse_head(input) else { continue };
        let ours = head.hyper;
        let theirs = real(input);
        let show = String::from_utf8_lossy(input);
        match (&ours, &theirs) {
            (Some(a), Some(b)) => {
                assert_eq!((&a.method, &a.uri, a.version), (&b.method, &b.uri, b.version), "{show:?}");
                assert_eq!(a.headers, b.headers, "{show:?}");
                accepted += 1;
            }
            (None, None) => {}
            _ => panic!("emulation {} but hyper {}: {show:?}", ours.is_some(), theirs.is_some()),
        }
        compared += 1;
    }
    eprintln!("request_head_emulates_hyper: {compared} heads compared, {accepted} accepted by hyper");
    assert!(accepted > 20);
}
