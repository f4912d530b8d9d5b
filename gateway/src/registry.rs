//! The node's registry heartbeat: announces this node (id, WebSocket URL, connections) every third
//! of the TTL, reaps nodes that stopped heartbeating, and refreshes the online-users gauge.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::{app::App, backend::NodeInfo, clock::now_ms, hooks::ChangeHooks, metrics as m};

/// Announces (or refreshes) this node in the registry.
pub async fn announce(app: &App) -> Result<(), crate::backend::BackendError> {
    let info = NodeInfo {
        id: app.node_id.to_string(),
        ws_url: app.ws_url.clone(),
        connections: app.connections(),
        started_at: app.started_at,
        last_heartbeat: now_ms(),
    };
    app.backend.announce_node(&info).await
}

pub async fn run(app: Arc<App>, hooks: ChangeHooks, stop: CancellationToken) {
    let mut tick = tokio::time::interval(app.config.renew_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut up = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = app.announce_now.notified() => {}
            _ = stop.cancelled() => break,
        }
        let announced = announce(&app).await;
        let reaped = app.backend.reap_dead_nodes(&app.node_id).await;
        let counted = app.backend.counts().await;
        match (&announced, &reaped, &counted) {
            (Ok(()), Ok(_), Ok(_)) => {
                if !up {
                    tracing::info!("backend reachable again");
                }
                up = true;
            }
            _ => {
                if up {
                    tracing::warn!(announce = ?announced.as_ref().err(), reap = ?reaped.as_ref().err(), "registry heartbeat failed");
                }
                up = false;
            }
        }
        metrics::gauge!(m::BACKEND_UP).set(if up { 1.0 } else { 0.0 });
        if let Ok(changes) = reaped
            && !changes.is_empty()
        {
            metrics::counter!(m::REAPED_USERS).increment(changes.len() as u64);
            hooks.changed(&app.node_id, changes);
        }
        if let Ok(counts) = counted {
            metrics::gauge!(m::ONLINE_USERS).set(counts.online_users as f64);
        }
    }
}
