//! The node registry on Redis: a hash of node infos, a sorted set of heartbeats, and the reaper's
//! lock per dead node.

use async_trait::async_trait;
use fred::prelude::*;

use super::{RedisBackend, cmd};
use crate::{
    backend::{BackendError, Changed, NodeInfo, Registry},
    clock::now_ms,
};

/// A reaper holds a dead node for this long after its last step; if it dies mid-way another
/// takes over after it.
pub(super) const REAP_LOCK_MS: u64 = 30_000;

#[async_trait]
impl Registry for RedisBackend {
    async fn announce_node(&self, info: &NodeInfo) -> Result<(), BackendError> {
        self.admit("announce_node")?;
        let json =
            serde_json::to_string(info).map_err(|e| BackendError::internal("registry", e))?;
        let pipeline = self.client.pipeline();
        let _: () = pipeline
            .custom(cmd("HSET"), vec![self.keys.nodes(), info.id.clone(), json])
            .await
            .map_err(|e| Self::error("registry", e))?;
        let _: () = pipeline
            .custom(
                cmd("ZADD"),
                vec![
                    self.keys.heartbeats(),
                    info.last_heartbeat.to_string(),
                    info.id.clone(),
                ],
            )
            .await
            .map_err(|e| Self::error("registry", e))?;
        Self::count_round_trip("registry");
        let _: Vec<Value> = pipeline
            .all()
            .await
            .map_err(|e| Self::error("registry", e))?;
        Ok(())
    }

    async fn leave_node(&self, node: &str) -> Result<(), BackendError> {
        self.admit("leave_node")?;
        // The final flush removed this node's entries; reaping clears whatever a failed flush left.
        let changed = self.reap_node(node, None).await?;
        if !changed.is_empty() {
            tracing::warn!(
                users = changed.len(),
                "presence entries left at shutdown were removed"
            );
        }
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BackendError> {
        self.admit("nodes")?;
        let ids = self.live_nodes().await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec![self.keys.nodes()];
        args.extend(ids.iter().cloned());
        Self::count_round_trip("nodes");
        let infos: Vec<Option<String>> = self
            .client
            .custom(cmd("HMGET"), args)
            .await
            .map_err(|e| Self::error("nodes", e))?;
        let mut nodes: Vec<NodeInfo> = infos
            .into_iter()
            .flatten()
            .filter_map(|j| serde_json::from_str(&j).ok())
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    async fn reap_previous_run(&self, node: &str) -> Result<Vec<Changed>, BackendError> {
        self.admit("reap_previous_run")?;
        self.reap_node(node, None).await
    }

    async fn reap_dead_nodes(&self, me: &str) -> Result<Vec<Changed>, BackendError> {
        self.admit("reap_dead_nodes")?;
        let before = now_ms().saturating_sub(self.settings.node_ttl.as_millis() as u64);
        Self::count_round_trip("reap");
        let dead: Vec<String> = self
            .client
            .custom(
                cmd("ZRANGEBYSCORE"),
                vec![self.keys.heartbeats(), "-inf".into(), format!("({before}")],
            )
            .await
            .map_err(|e| Self::error("reap", e))?;
        let mut changed = Vec::new();
        for node in dead.into_iter().filter(|n| n != me) {
            // Exactly one survivor reaps each dead node: whoever sets the lock first.
            Self::count_round_trip("reap");
            let got: Option<String> = self
                .client
                .custom(
                    cmd("SET"),
                    vec![
                        self.keys.reap_lock(&node),
                        me.to_string(),
                        "NX".into(),
                        "PX".into(),
                        REAP_LOCK_MS.to_string(),
                    ],
                )
                .await
                .map_err(|e| Self::error("reap", e))?;
            if got.is_none() {
                continue;
            }
            // A large node takes many steps: the lock is kept between them, so nobody else
            // starts over while this reaper is still at it.
            let lock = self.keys.reap_lock(&node);
            let reaped = self.reap_node(&node, Some(&lock)).await?;
            tracing::info!(dead = %node, users = reaped.len(), "reaped a node that stopped heartbeating");
            changed.extend(reaped);
        }
        Ok(changed)
    }
}

impl RedisBackend {
    pub(super) async fn live_nodes(&self) -> Result<Vec<String>, BackendError> {
        let since = now_ms().saturating_sub(self.settings.node_ttl.as_millis() as u64);
        Self::count_round_trip("nodes");
        self.client
            .custom(
                cmd("ZRANGEBYSCORE"),
                vec![self.keys.heartbeats(), since.to_string(), "+inf".into()],
            )
            .await
            .map_err(|e| Self::error("nodes", e))
    }
}
