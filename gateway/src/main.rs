//! `presence-gateway`: config, logging, listener, then serve until SIGTERM or SIGINT.

use anyhow::Context;

/// mimalloc returns memory freed after connect bursts to the system and keeps per-connection
/// allocations compact; with glibc malloc a node held ~22 KiB per connection after a 10,000/s ramp
/// (docs/benchmarks.md). Built with `no_thp` (Cargo.toml): with transparent huge pages a connect
/// burst spent a third of the gateway's CPU in the kernel zeroing fresh 2 MiB pages that the
/// allocator kept giving back and faulting in again (`perf record`: `clear_page_erms` under
/// `do_huge_pmd_anonymous_page`), and idle connections cost ~1 KiB more.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::Parser;
use gateway::{Config, config::LogFormat};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_logging(&config);
    if let Err(problems) = config.validate() {
        for p in &problems {
            eprintln!("error: {p}");
        }
        std::process::exit(2);
    }
    let listener = gateway::bind(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    if config.dev {
        print_dev_banner(&config, listener.local_addr()?);
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    gateway::serve(config, listener, shutdown).await
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: escape codes in a log file or a collector are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    if config.log_format == LogFormat::Json && !config.dev {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers; stop the node with SIGKILL");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    shutdown.cancel();
}

fn print_dev_banner(config: &Config, bound: std::net::SocketAddr) {
    let http = format!("http://127.0.0.1:{}", bound.port());
    let backend = match config.backend() {
        gateway::config::BackendChoice::Embedded => "embedded (in-process, one node)",
        _ => "redis",
    };
    println!(
        "\npresence-gateway (dev mode) on {http}, backend: {backend}\n\
         API key: dev\n\n\
         Get a token:\n  curl -s -X POST {http}/v1/tokens -H 'Authorization: Bearer dev' \\\n    \
         -H 'content-type: application/json' -d '{{\"user\":\"alice\",\"platform\":5}}'\n\n\
         Connect (JSON frames):\n  websocat 'ws://127.0.0.1:{port}/ws?format=json&token=<token>'\n  \
         then send {{\"type\":\"subscribe\",\"id\":1,\"users\":[\"bob\"]}}\n",
        port = bound.port()
    );
}
