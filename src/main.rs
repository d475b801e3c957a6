//! The `tidegate` command: parses the CLI and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

const LONG_ABOUT: &str = "tidegate: an edge proxy for WebSocket clusters.

Routes HTTP/1.1 requests by host and path to named upstreams, balances each upstream's
servers (nginx's server parameters: weight, max_fails, fail_timeout, backup, down,
max_conns), and turns a WebSocket upgrade into a tunnel once the server answers 101.

Logging: RUST_LOG (e.g. RUST_LOG=info, RUST_LOG=tidegate=debug,access=off).";

#[derive(Parser)]
#[command(name = "tidegate", version, about = "An edge proxy for WebSocket clusters", long_about = LONG_ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in the foreground (SIGTERM/SIGINT: graceful shutdown).
    Run {
        /// Config file.
        #[arg(short, long, default_value = "conf/tidegate.toml")]
        config: PathBuf,
    },
    /// Load and validate a config file (like `nginx -t`); exit 1 on any problem.
    Check {
        /// Config file.
        #[arg(short, long, default_value = "conf/tidegate.toml")]
        config: PathBuf,
    },
    /// Ask the running tidegate (found through `pid_file`) to reload, and report the outcome.
    Reload {
        /// Config file (validated here first; the running instance reloads its own path).
        #[arg(short, long, default_value = "conf/tidegate.toml")]
        config: PathBuf,
    },
    /// Start demo backends for every server of the demo config, and tidegate in front of them.
    Demo {
        /// Config file whose servers get a demo backend each.
        #[arg(short, long, default_value = "conf/demo.toml")]
        config: PathBuf,
    },
    /// Convert an nginx config (includes followed) to tidegate TOML; what cannot be carried
    /// over is printed to stderr. Exit 0 when everything affecting routing or balancing was
    /// converted, else 1 (and nothing is written unless --lenient).
    ImportNginx {
        /// The nginx config file, e.g. /etc/nginx/nginx.conf.
        file: PathBuf,
        /// Write the TOML here instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Write the TOML even when some routing or balancing could not be converted (the exit status stays 1).
        #[arg(long)]
        lenient: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => with_runtime(run(config)),
        Command::Reload { config } => reload(&config),
        Command::Demo { config } => with_runtime(demo(config)),
        Command::ImportNginx { file, output, lenient } => import_nginx(&file, output.as_deref(), lenient),
    }
}

/// Logs to stderr: text, or JSON lines with `[log] format = "json"` (for log shippers).
fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_target(true).with_writer(std::io::stderr);
    if json {
        fmt.json().with_current_span(false).init();
    } else {
        fmt.with_ansi(ansi).init();
    }
}

fn load(path: &std::path::Path) -> Option<tidegate::config::Config> {
    match tidegate::config::load(path) {
        Ok(c) => Some(c),
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{}: configuration has {} problem(s)", path.display(), errors.0.len());
            None
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match load(path) {
        Some(c) => {
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", tidegate::config::summary(&c));
            ExitCode::SUCCESS
        }
        None => ExitCode::FAILURE,
    }
}

/// `import-nginx`: converts, reports to stderr, validates the result like `check`, writes it.
fn import_nginx(file: &std::path::Path, output: Option<&std::path::Path>, lenient: bool) -> ExitCode {
    let import = match tidegate::config::nginx::import(file) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    eprint!("{}", import.report());
    // Relative paths in the output resolve against the output file's directory.
    let check_path = output.map_or_else(|| std::path::PathBuf::from("tidegate.toml"), std::path::Path::to_path_buf);
    let valid = match tidegate::config::load_str(&import.toml, &check_path) {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            true
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("the converted configuration does not pass `tidegate check` ({} problem(s))", errors.0.len());
            false
        }
    };
    let complete = import.complete() && valid;
    if !complete && !lenient {
        eprintln!(
            "{}: not everything that affects routing or balancing could be converted; nothing written (use --lenient to write it anyway)",
            file.display()
        );
        return ExitCode::FAILURE;
    }
    let written = match output {
        Some(path) => std::fs::write(path, &import.toml).map_err(|e| format!("cannot write {}: {e}", path.display())),
        None => {
            use std::io::Write;
            std::io::stdout().write_all(import.toml.as_bytes()).map_err(|e| format!("cannot write to stdout: {e}"))
        }
    };
    if let Err(e) = written {
        eprintln!("{e}");
        return ExitCode::FAILURE;
    }
    if complete {
        eprintln!("{}: converted", file.display());
        ExitCode::SUCCESS
    } else {
        eprintln!("{}: written with the problems above (--lenient)", file.display());
        ExitCode::FAILURE
    }
}

fn with_runtime(f: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

async fn run(path: PathBuf) -> ExitCode {
    let Some(config) = load(&path) else { return ExitCode::FAILURE };
    init_logging(config.log_json);
    let server = match tidegate::Server::bind(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tidegate: cannot start: {e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
            return ExitCode::FAILURE;
        }
    };
    serve(server, path).await
}

/// Runs a bound server with reload triggers and the pid file until SIGTERM/SIGINT.
async fn serve(server: tidegate::Server, path: PathBuf) -> ExitCode {
    let shared = server.shared();
    let hup = tidegate::reload::sighup();
    let pid_file = shared.runtime.load().config.pid_file.clone();
    if let Some(p) = &pid_file
        && let Err(e) = std::fs::write(p, format!("{}\n", std::process::id()))
    {
        eprintln!("tidegate: cannot write pid file {}: {e}", p.display());
        return ExitCode::FAILURE;
    }
    tokio::spawn(tidegate::reload::watch(shared.clone(), path, hup));
    let token = server.shutdown_token();
    let run = tokio::spawn(server.run());
    shutdown_signal().await;
    token.cancel();
    let _ = run.await;
    if let Some(p) = &pid_file {
        let _ = std::fs::remove_file(p);
        let _ = std::fs::remove_file(tidegate::reload::status_path(p));
    }
    ExitCode::SUCCESS
}

fn reload(path: &std::path::Path) -> ExitCode {
    let Some(config) = load(path) else { return ExitCode::FAILURE };
    let Some(pid_file) = config.pid_file else {
        eprintln!("{}: no pid_file set, so the running tidegate cannot be found; add pid_file = \"...\" or send it SIGHUP", path.display());
        return ExitCode::FAILURE;
    };
    let pid: i32 = match std::fs::read_to_string(&pid_file).map(|s| s.trim().parse()) {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => {
            eprintln!("pid file {} does not hold a pid", pid_file.display());
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("cannot read pid file {}: {e} (is tidegate running?)", pid_file.display());
            return ExitCode::FAILURE;
        }
    };
    let before = tidegate::reload::read_status(&pid_file).map_or(0, |s| s.0);
    if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP) {
        eprintln!("cannot signal tidegate (pid {pid}): {e}");
        return ExitCode::FAILURE;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Some((attempt, ok, message)) = tidegate::reload::read_status(&pid_file)
            && attempt > before
        {
            return if ok {
                println!("reload applied ({})", message.trim());
                ExitCode::SUCCESS
            } else {
                eprintln!("{message}");
                eprintln!("reload refused; the previous config stays in force");
                ExitCode::FAILURE
            };
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    eprintln!("tidegate (pid {pid}) did not report a reload within 10s");
    ExitCode::FAILURE
}

async fn demo(path: PathBuf) -> ExitCode {
    let Some(config) = load(&path) else { return ExitCode::FAILURE };
    init_logging(config.log_json);
    let mut n = 0;
    for upstream in &config.upstreams {
        for server in &upstream.servers {
            n += 1;
            let name = format!("backend-{n}");
            match tidegate::demo::spawn_backend(&name, server.addr).await {
                Ok((addr, _)) => tracing::info!(backend = %name, addr = %addr, "demo backend started"),
                Err(e) => {
                    eprintln!("cannot start demo backend on {}: {e}", server.addr);
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let server = match tidegate::Server::bind(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
            return ExitCode::FAILURE;
        }
    };
    let addr = server.local_addr();
    println!(
        "\ntidegate demo: proxy on http://{addr} in front of {n} demo backends.\n\n\
         Try, in another terminal:\n\
         \x20 curl -s http://{addr}/            # run it a few times: round-robin across the backends\n\
         \x20 cargo run --release --example ws_client -- ws://{addr}/chat   # WebSocket echo through tidegate\n\n\
         Stop with Ctrl-C.\n"
    );
    serve(server, path).await
}
