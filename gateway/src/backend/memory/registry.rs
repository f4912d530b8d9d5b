//! The node registry on the embedded backend: one process holds every node, so reaping sweeps expired entries (and expired tokens).

use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::MemoryBackend;
use crate::{
    backend::{
        BackendError, Changed, NodeInfo, Registry, handover_name, sessions::REVOCATION_TTL_MS,
    },
    clock::now_ms,
};

#[async_trait]
impl Registry for MemoryBackend {
    async fn announce_node(&self, info: &NodeInfo) -> Result<(), BackendError> {
        let expires = Instant::now() + self.settings.node_ttl;
        self.lock()
            .nodes
            .insert(info.id.clone(), (info.clone(), expires));
        Ok(())
    }

    async fn leave_node(&self, node: &str) -> Result<(), BackendError> {
        // Shutdown only: a scan of the users is fine once per process.
        let now = Instant::now();
        let (changed, watched) = {
            let mut state = self.lock();
            state.nodes.remove(node);
            let users = state.users_with_entry(node);
            let mut changed = Vec::new();
            for user in users {
                state.set_entry(&user, node, None);
                changed.extend(state.recompute(&user, now));
            }
            let watched = state.watched_of(&changed);
            (changed, watched)
        };
        self.publish(&changed, watched).await;
        Ok(())
    }

    async fn hand_over(&self, node: &str, window: Duration) -> Result<usize, BackendError> {
        let until = Instant::now() + window;
        let name = handover_name(node, now_ms());
        let mut state = self.lock();
        state.nodes.remove(node);
        let users = state.users_with_entry(node);
        let count = users.len();
        for user in users {
            let entry = state
                .users
                .get_mut(&user)
                .and_then(|s| s.entries.remove(node));
            if let Some((entry, expires)) = entry {
                state.set_entry(&user, &name, Some((entry, expires.min(until))));
            }
        }
        Ok(count)
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BackendError> {
        let now = Instant::now();
        let mut nodes: Vec<NodeInfo> = self
            .lock()
            .nodes
            .values()
            .filter(|(_, expires)| *expires > now)
            .map(|(info, _)| info.clone())
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    /// The store lives and dies with the process: no earlier run left anything.
    async fn reap_previous_run(&self, _node: &str) -> Result<Vec<Changed>, BackendError> {
        Ok(Vec::new())
    }

    async fn reap_dead_nodes(&self, _me: &str) -> Result<Vec<Changed>, BackendError> {
        // One process holds every node here, so "dead" means "entries past their expiry": sweep
        // them, and expired tokens with them.
        let now = Instant::now();
        let (changed, watched) = {
            let mut state = self.lock();
            state.nodes.retain(|_, (_, expires)| *expires > now);
            let now_wall = now_ms();
            state.tokens.retain(|_, c| c.expires_at > now_wall);
            let forget_before = now_wall.saturating_sub(REVOCATION_TTL_MS);
            state.revoked.retain(|_, at| *at > forget_before);
            let changed = state.sweep(now);
            let watched = state.watched_of(&changed);
            (changed, watched)
        };
        self.publish(&changed, watched).await;
        // What reads swept since the last reap was published then; the reaper gets it now, for
        // webhooks, as a Redis reaper would.
        let mut reaped = std::mem::take(&mut self.lock().swept);
        reaped.extend(changed);
        Ok(reaped)
    }
}
