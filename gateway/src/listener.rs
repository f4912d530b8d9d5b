//! The accept loop: every socket of the node comes through here. It bounds what a client can hold
//! before it is anybody: request headers must arrive within `PRESENCE_HEADER_TIMEOUT_MS` (a silent
//! or slowloris socket is closed), the sockets open at once are capped with room kept for the
//! health, metrics and REST endpoints, and, when configured, each address may open only so many
//! connections per second. axum's own `serve` has no header timeout, so the loop drives hyper
//! directly, as axum does inside. HTTP/1.1 only: hyper's HTTP/1 header timer runs from the first
//! moment a connection waits for a request, while the version sniffing of an HTTP/1-or-2 server
//! would wait for bytes without a deadline (WebSockets and the REST API need nothing else).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, extract::ConnectInfo};
use hyper::{Request, body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::metrics as m;

/// Sockets kept free beyond `max_connections` WebSocket sessions: probes, scrapes and the app
/// backend's REST calls still get in when the sessions are at their limit.
pub const HEADROOM_SOCKETS: usize = 512;
/// Addresses the per-address connect rate remembers; beyond it, the table starts over (an attack
/// from more addresses than this is not one a per-address limit can stop).
const RATE_TABLE: usize = 65_536;

/// What the accept loop enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A request's headers must arrive within this (slowloris, silent sockets).
    pub header_timeout: Duration,
    /// WebSocket sessions at most; sockets at most this plus [`HEADROOM_SOCKETS`].
    pub max_connections: usize,
    /// New connections per second from one address (0: no limit). Behind a load balancer every
    /// client may share one address: set it only where the node sees clients' own addresses.
    pub connect_rate_per_ip: u32,
}

/// Serves `router` on `listener` until `stop`, then waits (at most `drain`) for requests in
/// flight. Upgraded WebSockets are not waited for here: their sessions have their own drain.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    sessions: Arc<AtomicI64>,
    stop: CancellationToken,
    drain: Duration,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let tracker = TaskTracker::new();
    let open = Arc::new(AtomicUsize::new(0));
    let mut rates = RateTable::new(limits.connect_rate_per_ip);
    let max_sockets = limits.max_connections + HEADROOM_SOCKETS;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, most likely: give closing sockets a moment.
                metrics::counter!(m::ACCEPT_REFUSED, "reason" => "accept_error").increment(1);
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let held = open.load(Ordering::Relaxed) + sessions.load(Ordering::Relaxed).max(0) as usize;
        if held >= max_sockets {
            metrics::counter!(m::ACCEPT_REFUSED, "reason" => "sockets").increment(1);
            continue;
        }
        if !rates.allow(peer.ip(), Instant::now()) {
            metrics::counter!(m::ACCEPT_REFUSED, "reason" => "rate").increment(1);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            router.clone().oneshot(req)
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let open = open.clone();
        let stop = stop.clone();
        open.fetch_add(1, Ordering::Relaxed);
        tracker.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    // Finish the request in flight, then close; an idle connection closes now.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!("HTTP requests still running at the end of the drain");
    }
}

/// Token buckets per address, `rate` per second with bursts of `rate`.
struct RateTable {
    rate: f64,
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl RateTable {
    fn new(rate: u32) -> Self {
        RateTable {
            rate: f64::from(rate),
            buckets: HashMap::new(),
        }
    }

    fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let buckets = &mut self.buckets;
        if buckets.len() >= RATE_TABLE && !buckets.contains_key(&ip) {
            buckets.clear();
        }
        let (tokens, last) = buckets.entry(ip).or_insert((self.rate, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connect_rate_is_per_address() {
        let mut table = RateTable::new(2);
        let a = IpAddr::from([10, 0, 0, 1]);
        let b = IpAddr::from([10, 0, 0, 2]);
        let t = Instant::now();
        assert!(table.allow(a, t) && table.allow(a, t));
        assert!(!table.allow(a, t), "a third within the same instant");
        assert!(table.allow(b, t), "another address has its own budget");
        assert!(table.allow(a, t + Duration::from_millis(600)), "refilled");
        let mut off = RateTable::new(0);
        assert!((0..1000).all(|_| off.allow(a, t)));
    }
}
