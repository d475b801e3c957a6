//! Binary-level tests: the `tidegate` executable as a user runs it (`check`, `run`, `demo`,
//! `--version`, `--help`). Every process started here is killed and reaped by `Proc`'s Drop,
//! every wait is bounded, and everything listens on 127.0.0.1.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const BIN: &str = env!("CARGO_BIN_EXE_tidegate");

/// Upper bound for a command that should finish on its own (`check`, a failing `run`).
const QUICK: Duration = Duration::from_secs(10);
/// Upper bound for a server to start accepting.
const STARTUP: Duration = Duration::from_secs(15);
/// Upper bound for one client operation (connect, request, WebSocket message).
const IO: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A child process whose output is drained by threads; Drop kills (by pid) and reaps it.
struct Proc {
    child: Child,
    what: String,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

fn drain(mut r: impl Read + Send + 'static, buf: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    })
}

impl Proc {
    /// Starts `tidegate ARGS` with logging at info and no colours.
    fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            drain(child.stdout.take().expect("piped stdout"), stdout.clone()),
            drain(child.stderr.take().expect("piped stderr"), stderr.clone()),
        ];
        Proc { child, what: format!("tidegate {}", args.join(" ")), stdout, stderr, readers }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stdout(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(&self.stdout.lock().unwrap()))
    }

    fn stderr(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(&self.stderr.lock().unwrap()))
    }

    /// Both streams, for assertions that do not care which one and for failure messages.
    fn output(&self) -> String {
        format!("--- {} stdout ---\n{}--- stderr ---\n{}", self.what, self.stdout(), self.stderr())
    }

    /// Sends `sig` (e.g. "TERM", "INT") to this child's pid with kill(1).
    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
        assert!(status.success(), "kill -{sig} {} failed: {status}", self.pid());
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// After exit: wait for the reader threads so the captured output is complete.
    fn collect_output(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// Blocks (polling) until the process exits; panics after `limit`.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                self.collect_output();
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit within {limit:?}\n{}", self.what, self.output());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like `wait`, without blocking the async runtime (the test's backends run on it).
    async fn wait_async(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                self.collect_output();
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit within {limit:?}\n{}", self.what, self.output());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `addr` accepts TCP connections; panics if the process exits first.
    async fn wait_accepting(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(status) = self.exited() {
                self.collect_output();
                panic!("{} exited ({status}) before accepting on {addr}\n{}", self.what, self.output());
            }
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await {
                return;
            }
            assert!(Instant::now() < deadline, "{} not accepting on {addr} within {STARTUP:?}\n{}", self.what, self.output());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until stdout contains `needle`; panics if the process exits first.
    async fn wait_stdout(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + STARTUP;
        loop {
            let out = self.stdout();
            if out.contains(needle) {
                return out;
            }
            if self.exited().is_some() {
                self.collect_output();
                panic!("{} exited before printing {needle:?}\n{}", self.what, self.output());
            }
            assert!(Instant::now() < deadline, "{} did not print {needle:?} within {STARTUP:?}\n{}", self.what, self.output());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Child::kill sends SIGKILL to this child's own pid.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs `tidegate ARGS` to completion (bounded): (status, stdout, stderr).
fn tidegate(args: &[&str]) -> (ExitStatus, String, String) {
    let mut p = Proc::spawn(args);
    let status = p.wait(QUICK);
    (status, p.stdout(), p.stderr())
}

/// Removes ANSI escape sequences (log lines may be coloured despite NO_COLOR).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A config file under the temp dir with a unique name, removed on drop.
struct TempConfig {
    path: PathBuf,
}

impl TempConfig {
    fn new(tag: &str, text: &str) -> TempConfig {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("tidegate-cli-{}-{n}-{nanos}-{tag}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        TempConfig { path }
    }

    fn arg(&self) -> &str {
        self.path.to_str().expect("temp path is UTF-8")
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `n` distinct free ports on 127.0.0.1: all bound at once (so distinct), then released.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")).collect();
    let ports = listeners.iter().map(|l| l.local_addr().unwrap().port()).collect();
    drop(listeners);
    ports
}

fn exit_code(status: ExitStatus) -> Option<i32> {
    status.code()
}

/// `GET path` on a fresh connection with `Connection: close`: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write request");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read response");
        String::from_utf8_lossy(&buf).into_owned()
    };
    let raw = tokio::time::timeout(IO, fut).await.unwrap_or_else(|_| panic!("GET {path} via {addr}: no complete response within {IO:?}"));
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("malformed response: {raw:?}"));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("malformed status line: {raw:?}"));
    (status, body.to_string())
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(addr: SocketAddr) -> Ws {
    let url = format!("ws://{addr}/chat");
    let (ws, resp) = tokio::time::timeout(IO, tokio_tungstenite::connect_async(url.as_str()))
        .await
        .unwrap_or_else(|_| panic!("WebSocket handshake with {url} timed out"))
        .unwrap_or_else(|e| panic!("WebSocket handshake with {url} failed: {e}"));
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

/// Next data or close message (pings and pongs skipped).
async fn ws_next(ws: &mut Ws) -> Option<Message> {
    loop {
        let msg = tokio::time::timeout(IO, ws.next()).await.unwrap_or_else(|_| panic!("no WebSocket message within {IO:?}"));
        match msg {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m)) => return Some(m),
            Some(Err(e)) => panic!("WebSocket error: {e}"),
            None => return None,
        }
    }
}

/// Sends `text` and expects it echoed back.
async fn ws_echo(ws: &mut Ws, text: &str) {
    tokio::time::timeout(IO, ws.send(Message::text(text))).await.expect("send within bound").expect("send");
    assert_eq!(ws_next(ws).await, Some(Message::text(text)));
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------
// --version, --help
// ---------------------------------------------------------------------------

#[test]
fn version_prints_name_and_version() {
    let (status, out, err) = tidegate(&["--version"]);
    assert_eq!(exit_code(status), Some(0), "stderr: {err}");
    assert_eq!(out.trim(), format!("tidegate {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn help_lists_subcommands() {
    let (status, out, err) = tidegate(&["--help"]);
    assert_eq!(exit_code(status), Some(0), "stderr: {err}");
    for cmd in ["run", "check", "demo"] {
        assert!(out.lines().any(|l| l.split_whitespace().next() == Some(cmd)), "--help does not list subcommand {cmd:?}:\n{out}");
    }
}

// ---------------------------------------------------------------------------
// check: the shipped configs
// ---------------------------------------------------------------------------

/// conf/tls.toml points at conf/tls/demo.crt and demo.key, which are not in git: make a
/// self-signed pair for localhost and *.localhost when both are missing. The key is claimed
/// first with a hard link (fails if it exists), so two concurrent runs never mix two pairs.
fn ensure_demo_tls_files() {
    let dir = manifest_dir().join("conf/tls");
    let (cert, key) = (dir.join("demo.crt"), dir.join("demo.key"));
    if !cert.exists() && !key.exists() {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "*.localhost".to_string()])
            .expect("generate self-signed certificate");
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let tag = format!("{}.{nanos}", std::process::id());
        let (cert_tmp, key_tmp) = (dir.join(format!(".demo.crt.{tag}")), dir.join(format!(".demo.key.{tag}")));
        std::fs::write(&cert_tmp, made.cert.pem()).expect("write temp certificate");
        std::fs::write(&key_tmp, made.signing_key.serialize_pem()).expect("write temp key");
        if std::fs::hard_link(&key_tmp, &key).is_ok() {
            std::fs::rename(&cert_tmp, &cert).expect("install conf/tls/demo.crt");
        }
        let _ = std::fs::remove_file(&key_tmp);
        let _ = std::fs::remove_file(&cert_tmp);
    }
    // Another run may be between writing the key and the certificate.
    let deadline = Instant::now() + QUICK;
    while !(cert.exists() && key.exists()) {
        assert!(
            Instant::now() < deadline,
            "only one of {} and {} exists; remove it so a matching pair can be generated",
            cert.display(),
            key.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn check_accepts_every_shipped_config() {
    ensure_demo_tls_files();
    let dir = manifest_dir().join("conf");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "expected at least 2 sample configs in {}, found {files:?}", dir.display());
    for f in &files {
        let path = f.to_str().expect("UTF-8 path");
        let (status, out, err) = tidegate(&["check", "-c", path]);
        assert_eq!(exit_code(status), Some(0), "check {path} failed:\nstdout:\n{out}\nstderr:\n{err}");
        assert!(out.contains("configuration OK"), "check {path}: no summary:\n{out}");
        assert!(out.contains(path), "check {path}: summary does not name the file:\n{out}");
    }
}

// ---------------------------------------------------------------------------
// check: broken configs
// ---------------------------------------------------------------------------

/// A valid config; the broken ones below change one thing in it.
const BASE: &str = r#"[[listener]]
name = "public"
bind = "127.0.0.1:18080"

  [[listener.route]]
  upstream = "app"

[upstream.app]
servers = [
  { addr = "127.0.0.1:19001" },
]
"#;

/// `FILE:LINE:COL: ` for the first occurrence of `at` on 1-based `line` of `text`.
fn location(file: &TempConfig, text: &str, line: usize, at: &str) -> String {
    let l = text.lines().nth(line - 1).unwrap_or_else(|| panic!("config has no line {line}"));
    let byte = l.find(at).unwrap_or_else(|| panic!("line {line} {l:?} has no {at:?}"));
    let col = l[..byte].chars().count() + 1;
    format!("{}:{line}:{col}: ", file.path.display())
}

/// Runs `check` on `text`: asserts exit 1 and returns stderr.
fn check_fails(tag: &str, text: &str) -> (TempConfig, String) {
    let file = TempConfig::new(tag, text);
    let (status, out, err) = tidegate(&["check", "-c", file.arg()]);
    assert_eq!(exit_code(status), Some(1), "check should fail for:\n{text}\nstdout:\n{out}\nstderr:\n{err}");
    assert!(!out.contains("configuration OK"), "a broken config must not be reported OK:\n{out}");
    (file, err)
}

/// The stderr line starting with `prefix` (`FILE:LINE:COL: `); panics if none.
fn error_line<'a>(err: &'a str, prefix: &str) -> &'a str {
    err.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no error at {prefix:?} in stderr:\n{err}"))
}

#[test]
fn check_baseline_is_valid() {
    // The broken configs below are only meaningful if the base passes.
    let file = TempConfig::new("base", BASE);
    let (status, out, err) = tidegate(&["check", "-c", file.arg()]);
    assert_eq!(exit_code(status), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("configuration OK"), "{out}");
}

#[test]
fn check_reports_toml_syntax_error_with_line() {
    let text = BASE.replace(r#"name = "public""#, r#"name "public""#);
    let (file, err) = check_fails("syntax", &text);
    let prefix = format!("{}:2:", file.path.display());
    let line = error_line(&err, &prefix);
    // FILE:2:COL: message, COL a number within the line.
    let rest = &line[prefix.len()..];
    let (col, msg) = rest.split_once(": ").unwrap_or_else(|| panic!("not FILE:LINE:COL: message: {line:?}"));
    let col: usize = col.parse().unwrap_or_else(|_| panic!("column is not a number: {line:?}"));
    assert!((1..=r#"name "public""#.len() + 1).contains(&col), "column {col} outside line 2: {line:?}");
    assert!(!msg.trim().is_empty(), "empty message: {line:?}");
    assert!(err.contains("configuration has 1 problem(s)"), "{err}");
}

#[test]
fn check_reports_unknown_server_key() {
    let text = BASE.replace(r#"{ addr = "127.0.0.1:19001" },"#, r#"{ addr = "127.0.0.1:19001", wieght = 2 },"#);
    let (file, err) = check_fails("wieght", &text);
    let prefix = location(&file, &text, 10, "wieght");
    let line = error_line(&err, &prefix);
    assert_eq!(
        &line[prefix.len()..],
        r#"unknown key "wieght" in server; expected one of: addr, weight, max_fails, fail_timeout, backup, down, max_conns"#
    );
}

#[test]
fn check_reports_route_to_undefined_upstream() {
    let text = BASE.replace(r#"upstream = "app""#, r#"upstream = "nope""#);
    let (file, err) = check_fails("undefined-upstream", &text);
    let prefix = location(&file, &text, 6, r#""nope""#);
    let line = error_line(&err, &prefix);
    assert_eq!(&line[prefix.len()..], r#"unknown upstream "nope"; defined upstreams: app"#);
}

#[test]
fn check_reports_duplicate_listener_bind() {
    let text =
        format!("{BASE}\n[[listener]]\nname = \"second\"\nbind = \"127.0.0.1:18080\"\n\n  [[listener.route]]\n  upstream = \"app\"\n");
    let (file, err) = check_fails("duplicate-bind", &text);
    // Points at the second bind (line 15), naming the first listener and its line.
    let prefix = location(&file, &text, 15, r#""127.0.0.1:18080""#);
    let line = error_line(&err, &prefix);
    let msg = &line[prefix.len()..];
    assert!(msg.starts_with("duplicate bind 127.0.0.1:18080"), "{line}");
    assert!(msg.contains(r#""public" (line 3)"#), "{line}");
}

#[test]
fn check_reports_zero_weight() {
    let text = BASE.replace(r#"{ addr = "127.0.0.1:19001" },"#, r#"{ addr = "127.0.0.1:19001", weight = 0 },"#);
    let (file, err) = check_fails("weight0", &text);
    let prefix = location(&file, &text, 10, "0 }");
    let line = error_line(&err, &prefix);
    assert_eq!(&line[prefix.len()..], "weight must be at least 1, got 0");
}

#[test]
fn check_reports_bad_duration() {
    let text = format!("shutdown_timeout = \"10 seconds\"\n{BASE}");
    let (file, err) = check_fails("duration", &text);
    let prefix = location(&file, &text, 1, r#""10 seconds""#);
    let line = error_line(&err, &prefix);
    let msg = &line[prefix.len()..];
    assert!(msg.starts_with(r#"invalid duration "10 seconds""#), "{line}");
    assert!(msg.contains("ms, s, m, h or d"), "message should say what is expected: {line}");
}

#[test]
fn check_reports_bad_address() {
    let text = BASE.replace(r#"bind = "127.0.0.1:18080""#, r#"bind = "127.0.0.1""#);
    let (file, err) = check_fails("address", &text);
    let prefix = location(&file, &text, 3, r#""127.0.0.1""#);
    let line = error_line(&err, &prefix);
    let msg = &line[prefix.len()..];
    assert!(msg.starts_with(r#"invalid address "127.0.0.1""#), "{line}");
    assert!(msg.contains("IP:PORT"), "{line}");
}

#[test]
fn check_reports_every_problem_in_one_file() {
    let text = r#"shutdown_timeout = "10 seconds"

[[listener]]
name = "public"
bind = "127.0.0.1:18080"

  [[listener.route]]
  upstream = "nope"

[[listener]]
name = "second"
bind = "127.0.0.1:18080"

  [[listener.route]]
  upstream = "app"

[upstream.app]
servers = [
  { addr = "127.0.0.1:19001", weight = 0 },
  { addr = "10.0.0.1:99999" },
]
"#;
    let (file, err) = check_fails("many", text);
    let expected = [
        (location(&file, text, 1, r#""10 seconds""#), r#"invalid duration "10 seconds""#),
        (location(&file, text, 8, r#""nope""#), r#"unknown upstream "nope""#),
        (location(&file, text, 12, r#""127.0.0.1:18080""#), "duplicate bind 127.0.0.1:18080"),
        (location(&file, text, 19, "0 }"), "weight must be at least 1, got 0"),
        (location(&file, text, 20, r#""10.0.0.1:99999""#), r#"invalid address "10.0.0.1:99999""#),
    ];
    let mut last_index = 0;
    for (prefix, msg) in &expected {
        let line = error_line(&err, prefix);
        assert!(line[prefix.len()..].starts_with(msg), "expected {msg:?} at {prefix:?}, got {line:?}");
        // Reported in file order.
        let index = err.find(line).unwrap();
        assert!(index >= last_index, "errors not in file order:\n{err}");
        last_index = index;
    }
    let located = err.lines().filter(|l| l.starts_with(&format!("{}:", file.path.display()))).count();
    // The problem lines plus the final "FILE: configuration has N problem(s)".
    assert_eq!(located, expected.len() + 1, "unexpected extra errors:\n{err}");
    assert!(err.contains(&format!("configuration has {} problem(s)", expected.len())), "{err}");
}

#[test]
fn check_missing_file_names_it() {
    let path = std::env::temp_dir().join(format!("tidegate-cli-{}-does-not-exist.toml", std::process::id()));
    let path = path.to_str().expect("UTF-8 path");
    let (status, out, err) = tidegate(&["check", "-c", path]);
    assert_eq!(exit_code(status), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains(path), "the message should name {path}:\n{err}");
    assert!(err.contains("cannot read config file"), "{err}");
}

// ---------------------------------------------------------------------------
// run: failures at start
// ---------------------------------------------------------------------------

fn one_listener_config(name: &str, port: u16, upstream_ref: &str, server: &str) -> String {
    format!(
        r#"shutdown_timeout = "5s"

[[listener]]
name = "{name}"
bind = "127.0.0.1:{port}"

  [[listener.route]]
  upstream = "{upstream_ref}"

[upstream.app]
servers = [{{ addr = "{server}" }}]
"#
    )
}

#[test]
fn run_with_invalid_config_exits_without_binding() {
    // The first listener's port is held by the test: binding it would fail with "cannot
    // bind", so a config error (and no bind message) shows nothing was bound. The second
    // listener's port is free and must still be free afterwards.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let held_port = held.local_addr().unwrap().port();
    let free = free_ports(1)[0];
    let text = format!(
        "{}\n[[listener]]\nname = \"other\"\nbind = \"127.0.0.1:{free}\"\n\n  [[listener.route]]\n  upstream = \"app\"\n",
        one_listener_config("edge", held_port, "nope", "127.0.0.1:19001")
    );
    let file = TempConfig::new("run-invalid", &text);
    let started = Instant::now();
    let mut p = Proc::spawn(&["run", "-c", file.arg()]);
    let status = p.wait(QUICK);
    let elapsed = started.elapsed();
    let all = format!("{}{}", p.stdout(), p.stderr());
    assert_eq!(exit_code(status), Some(1), "{}", p.output());
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?} to reject an invalid config");
    assert!(p.stderr().contains(&format!("{}:8:", file.path.display())), "config error not reported:\n{}", p.output());
    assert!(p.stderr().contains(r#"unknown upstream "nope""#), "{}", p.output());
    assert!(!all.contains("cannot bind"), "tried to bind with an invalid config:\n{}", p.output());
    assert!(!all.contains("listening"), "listened with an invalid config:\n{}", p.output());
    TcpListener::bind(("127.0.0.1", free)).unwrap_or_else(|e| panic!("port {free} left bound: {e}"));
    drop(held);
}

#[test]
fn run_with_taken_address_names_listener_and_address() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let held_addr = held.local_addr().unwrap();
    let free = free_ports(1)[0];
    // First listener binds fine; the second one's address is taken.
    let text = format!(
        "{}\n[[listener]]\nname = \"taken\"\nbind = \"{held_addr}\"\n\n  [[listener.route]]\n  upstream = \"app\"\n",
        one_listener_config("front", free, "app", "127.0.0.1:19001")
    );
    let file = TempConfig::new("run-taken", &text);
    let started = Instant::now();
    let mut p = Proc::spawn(&["run", "-c", file.arg()]);
    let status = p.wait(QUICK);
    assert_eq!(exit_code(status), Some(1), "{}", p.output());
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?} to fail", started.elapsed());
    let all = format!("{}{}", p.stdout(), p.stderr());
    assert!(
        all.contains(&format!(r#"listener "taken": cannot bind {held_addr}"#)),
        "the message should name listener \"taken\" and {held_addr}:\n{}",
        p.output()
    );
    assert!(!all.contains(r#"listener "front": cannot bind"#), "{}", p.output());
    // The listener that did bind was released with the process.
    TcpListener::bind(("127.0.0.1", free)).unwrap_or_else(|e| panic!("port {free} left bound: {e}"));
    drop(held);
}

// ---------------------------------------------------------------------------
// run: end to end, graceful SIGTERM
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_proxies_http_and_websocket_and_stops_on_sigterm() {
    let (backend, backend_task) = tidegate::demo::spawn_backend("b1", "127.0.0.1:0".parse().unwrap()).await.expect("backend binds");
    let port = free_ports(1)[0];
    let proxy: SocketAddr = ([127, 0, 0, 1], port).into();
    let grace = Duration::from_secs(5);
    let file = TempConfig::new("run-e2e", &one_listener_config("e2e", port, "app", &backend.to_string()));
    let mut p = Proc::spawn(&["run", "-c", file.arg()]);
    p.wait_accepting(proxy).await;

    let (status, body) = http_get(proxy, "/").await;
    assert_eq!((status, body.as_str()), (200, "hello from b1\n"), "{}", p.output());

    let mut ws = ws_connect(proxy).await;
    ws_echo(&mut ws, "hello through tidegate").await;
    tokio::time::timeout(IO, ws.send(Message::text("whoami"))).await.expect("send within bound").expect("send");
    assert_eq!(ws_next(&mut ws).await, Some(Message::text("b1")));

    // SIGTERM with the tunnel open: the client gets a 1001 close, the process exits 0.
    let sent = Instant::now();
    p.signal("TERM");
    match ws_next(&mut ws).await {
        Some(Message::Close(Some(frame))) => assert_eq!(frame.code, CloseCode::Away, "close frame: {frame:?}"),
        other => panic!("expected a Close frame with code 1001, got {other:?}\n{}", p.output()),
    }
    // Let tungstenite answer the close, see the connection end, then drop it like a
    // client would.
    let close_received = Instant::now();
    let _ = tokio::time::timeout(grace + IO, async { while let Some(Ok(_)) = ws.next().await {} }).await;
    let stream_ended_after = close_received.elapsed();
    drop(ws);
    let status = p.wait_async(grace + Duration::from_secs(10)).await;
    let took = sent.elapsed();
    assert_eq!(exit_code(status), Some(0), "exit status {status}\n{}", p.output());
    assert!(
        took < grace && !p.output().contains("grace period over"),
        "shutdown took {took:?} (grace period {grace:?}); the client's stream ended {stream_ended_after:?} \
         after the close frame\n{}",
        p.output()
    );
    backend_task.abort();
}

// ---------------------------------------------------------------------------
// demo
// ---------------------------------------------------------------------------

/// conf/demo.toml with every 127.0.0.1:PORT replaced by a free port:
/// (text, proxy address, number of servers).
fn demo_config() -> (String, SocketAddr, usize) {
    let original = std::fs::read_to_string(manifest_dir().join("conf/demo.toml")).expect("read conf/demo.toml");
    const IP: &str = "127.0.0.1:";
    let count = original.matches(IP).count();
    let mut ports = free_ports(count).into_iter();
    let mut proxy = None;
    let mut servers = 0;
    let mut out = String::new();
    for line in original.lines() {
        let mut rest = line;
        let mut new = String::new();
        while let Some(i) = rest.find(IP) {
            let after = &rest[i + IP.len()..];
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            let port = ports.next().expect("enough ports");
            new.push_str(&rest[..i + IP.len()]);
            new.push_str(&port.to_string());
            rest = &after[digits..];
            if line.trim_start().starts_with("bind") {
                proxy = Some(SocketAddr::from(([127, 0, 0, 1], port)));
            } else {
                servers += 1;
            }
        }
        new.push_str(rest);
        out.push_str(&new);
        out.push('\n');
    }
    (out, proxy.expect("demo.toml has a listener bind on 127.0.0.1"), servers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_round_robin_and_websocket_and_stops_on_sigint() {
    let (text, proxy, servers) = demo_config();
    assert_eq!(servers, 3, "conf/demo.toml should have 3 servers:\n{text}");
    let file = TempConfig::new("demo", &text);
    let mut p = Proc::spawn(&["demo", "-c", file.arg()]);

    let instructions = p.wait_stdout("curl").await;
    assert!(instructions.contains(&format!("http://{proxy}/")), "instructions should name the proxy address {proxy}:\n{instructions}");
    p.wait_accepting(proxy).await;

    let mut seen = BTreeSet::new();
    for _ in 0..servers {
        let (status, body) = http_get(proxy, "/").await;
        assert_eq!(status, 200, "{body}\n{}", p.output());
        seen.insert(body.trim().to_string());
    }
    let expected: BTreeSet<String> = (1..=servers).map(|n| format!("hello from backend-{n}")).collect();
    assert_eq!(seen, expected, "round robin over {servers} requests\n{}", p.output());

    let mut ws = ws_connect(proxy).await;
    ws_echo(&mut ws, "hello demo").await;
    tokio::time::timeout(IO, ws.close(None)).await.expect("close within bound").expect("close");
    let _ = tokio::time::timeout(IO, async { while let Some(Ok(_)) = ws.next().await {} }).await;
    drop(ws);

    p.signal("INT");
    let status = p.wait_async(Duration::from_secs(40)).await;
    assert_eq!(exit_code(status), Some(0), "exit status {status}\n{}", p.output());
}
