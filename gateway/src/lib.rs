//! The presence gateway as a library: [`serve`] runs one node on a listener from [`bind`] until a
//! shutdown token is cancelled. `main` calls it after parsing flags and binding; the integration
//! tests (`tests/it/`) run that binary as processes, and also call [`serve`] directly, in-process
//! (`inproc.rs`), where they need no process of their own. `tests/it/shard.rs` starts shard workers
//! alone ([`shard::Shards::spawn`]) on a paused clock.

pub mod api;
pub mod api_error;
pub mod app;
pub mod auth;
pub mod authz;
pub mod backend;
pub mod clock;
pub mod config;
pub mod conn;
pub mod conn_handle;
pub mod drain;
pub mod frame;
pub mod hooks;
pub mod index_repair;
pub mod listener;
pub mod metrics;
pub mod presence;
pub mod registry;
pub mod router;
pub mod shard;

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Pending connections the kernel queues for accept. Tokio's default (1024) overflowed during
/// connect bursts in `make bench` (`TcpExtListenOverflows` rose, clients waited for their 1 s SYN
/// retry); the kernel caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 8192;

/// Binds the node's listener with [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Runs a node on `listener` until `shutdown` is cancelled, then drains it within the grace period.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if let Err(problems) = config.validate() {
        anyhow::bail!("invalid configuration:\n  {}", problems.join("\n  "));
    }
    let bound = listener.local_addr().context("listener has no address")?;
    let running = app::build(config, bound).await?;
    let app = running.app.clone();
    tracing::info!(
        node = %app.node_id,
        addr = %bound,
        ws_url = %app.ws_url,
        backend = app.backend.kind,
        shards = app.shards.count(),
        "listening"
    );
    let router = api::router(app.clone());
    let limits = listener::Limits {
        header_timeout: Duration::from_millis(app.config.header_timeout_ms),
        max_connections: app.config.max_connections,
        connect_rate_per_ip: app.config.connect_rate_per_ip,
    };
    let server = tokio::spawn(listener::serve(
        listener,
        router,
        limits,
        app.connection_counter(),
        running.stop_accepting(),
        Duration::from_secs(1),
    ));
    shutdown.cancelled().await;
    tracing::info!("shutting down: draining");
    running.shutdown().await;
    match tokio::time::timeout(Duration::from_secs(2), server).await {
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server task failed"),
        Err(_) => tracing::warn!("HTTP server still draining"),
        Ok(Ok(())) => {}
    }
    Ok(())
}
