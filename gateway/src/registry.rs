//! The node's registry heartbeat: announces this node (id, WebSocket URL, connections) every third
//! of the TTL, reaps nodes that stopped heartbeating, and refreshes the online-users gauge.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    backend::{BackendError, NodeInfo, PresenceStore, Registry},
    clock::now_ms,
    hooks::ChangeHooks,
    metrics as m,
};

/// What the heartbeat task needs of the node.
pub struct Heartbeat {
    pub registry: Arc<dyn Registry>,
    pub presence: Arc<dyn PresenceStore>,
    pub hooks: ChangeHooks,
    pub node_id: Arc<str>,
    pub ws_url: String,
    pub started_at: u64,
    /// The node's open connections, as the session tasks count them.
    pub connections: Arc<AtomicI64>,
    pub interval: Duration,
    /// Wakes the heartbeat early (after the backend lost its data).
    pub now: Arc<Notify>,
}

impl Heartbeat {
    /// Announces (or refreshes) this node in the registry.
    pub async fn announce(&self) -> Result<(), BackendError> {
        let info = NodeInfo {
            id: self.node_id.to_string(),
            ws_url: self.ws_url.clone(),
            connections: self.connections.load(Ordering::Relaxed).max(0) as u64,
            started_at: self.started_at,
            last_heartbeat: now_ms(),
        };
        self.registry.announce_node(&info).await
    }

    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut up = true;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.now.notified() => {}
                _ = stop.cancelled() => break,
            }
            let announced = self.announce().await;
            let reaped = self.registry.reap_dead_nodes(&self.node_id).await;
            let counted = self.presence.counts().await;
            match (&announced, &reaped, &counted) {
                // `Health` logs the backend coming back; this only keeps the failure below to
                // one warning per outage.
                (Ok(()), Ok(_), Ok(_)) => up = true,
                _ => {
                    if up {
                        tracing::warn!(announce = ?announced.as_ref().err(), reap = ?reaped.as_ref().err(), "registry heartbeat failed");
                    }
                    up = false;
                }
            }
            if let Ok(changes) = reaped
                && !changes.is_empty()
            {
                metrics::counter!(m::REAPED_USERS).increment(changes.len() as u64);
                self.hooks.changed(&self.node_id, changes);
            }
            if let Ok(counts) = counted {
                metrics::gauge!(m::ONLINE_USERS).set(counts.online_users as f64);
            }
        }
    }
}
