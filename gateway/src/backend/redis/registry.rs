//! The node registry on Redis: a hash of node infos, a sorted set of heartbeats, and the reaper's
//! lock per dead node.

use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;

use super::{PIPELINE_USERS, RedisBackend, cmd};
use crate::{
    backend::{BackendError, Changed, NodeInfo, Registry, handover_name},
    clock::now_ms,
};

/// A reaper holds a dead node for this long; if it dies mid-way another takes over after it.
const REAP_LOCK_MS: u64 = 30_000;
/// Users per `handover.lua` call on one Redis, as for `write.lua`.
const HANDOVER_USERS_PER_CALL: usize = 50;

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
        let changed = self.reap_node(node).await?;
        if !changed.is_empty() {
            tracing::warn!(
                users = changed.len(),
                "presence entries left at shutdown were removed"
            );
        }
        Ok(())
    }

    async fn hand_over(&self, node: &str, window: Duration) -> Result<usize, BackendError> {
        self.admit("hand_over")?;
        let now = now_ms();
        let name = handover_name(node, now);
        let latest = now + window.as_millis() as u64;
        let users_key = self.keys.node_users(node);
        let per_call = if self.cluster {
            1
        } else {
            HANDOVER_USERS_PER_CALL
        };
        let args: Vec<Value> = vec![node.into(), name.clone().into(), latest.to_string().into()];
        // The set is read page by page and left as it is: it is renamed below, in one step.
        let mut handed = 0;
        loop {
            let users = self
                .node_users_page("hand_over", &users_key, handed)
                .await?;
            if users.is_empty() {
                break;
            }
            let calls: Vec<_> = users
                .chunks(per_call)
                .map(|chunk| {
                    let keys = chunk.iter().map(|u| self.keys.user(u).into()).collect();
                    (&self.scripts.handover, keys, args.clone())
                })
                .collect();
            self.run_scripts("hand_over", &calls).await?;
            handed += users.len();
            if users.len() < PIPELINE_USERS {
                break;
            }
        }
        let mut keys: Vec<Value> = Vec::with_capacity(20);
        for id in [node, name.as_str()] {
            keys.push(self.keys.node_users(id).into());
            keys.extend(
                shared::ids::PLATFORMS.map(|p| Value::from(self.keys.node_platform(id, p))),
            );
        }
        keys.push(self.keys.heartbeats().into());
        keys.push(self.keys.nodes().into());
        // Dead (older than the node TTL) once the window is over: reaped as a node that died then.
        let heartbeat = latest.saturating_sub(self.settings.node_ttl.as_millis() as u64);
        let call = (
            &self.scripts.handover_node,
            keys,
            vec![node.into(), name.into(), heartbeat.to_string().into()],
        );
        self.run_scripts("hand_over", &[call]).await?;
        Ok(handed)
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
        self.reap_node(node).await
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
            let reaped = self.reap_node(&node).await?;
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
