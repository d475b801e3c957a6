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
    /// Start demo backends for every server of the demo config, and tidegate in front of them.
    Demo {
        /// Config file whose servers get a demo backend each.
        #[arg(short, long, default_value = "conf/demo.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => with_runtime(run(config)),
        Command::Demo { config } => with_runtime(demo(config)),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_target(true).with_writer(std::io::stderr).with_ansi(ansi).init();
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
    init_logging();
    let Some(config) = load(&path) else { return ExitCode::FAILURE };
    match tidegate::run(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidegate: cannot start: {e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
            ExitCode::FAILURE
        }
    }
}

async fn demo(path: PathBuf) -> ExitCode {
    init_logging();
    let Some(config) = load(&path) else { return ExitCode::FAILURE };
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
    let token = server.shutdown_token();
    let run = tokio::spawn(server.run());
    shutdown_signal().await;
    token.cancel();
    let _ = run.await;
    ExitCode::SUCCESS
}
