//! The node registry on Redis: a hash of node infos, a sorted set of heartbeats, and the reaper's
//! lock per dead node.

use std::{collections::BTreeMap, time::Duration};

use async_trait::async_trait;
use fred::prelude::*;

use super::{RedisBackend, cmd, keys::BUCKETS, write::REAP_STEP};
use crate::{
    backend::{BackendError, Changed, NodeInfo, Registry, handover_name},
    clock::now_ms,
};

/// A reaper holds a dead node for this long after its last step; if it dies mid-way another
/// takes over after it.
pub(super) const REAP_LOCK_MS: u64 = 30_000;
/// Users per `handover.lua` call on one Redis: a user costs an HGET, an HSET and an HDEL (about
/// 10 µs of Redis), so a call stays well under 1 ms.
const HANDOVER_USERS_PER_CALL: usize = 32;
/// Buckets per `handover_sets.lua` call on one Redis: a RENAME each, a few µs.
const RENAMES_PER_CALL: usize = 32;

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

    async fn hand_over(&self, node: &str, window: Duration) -> Result<usize, BackendError> {
        self.admit("hand_over")?;
        let now = now_ms();
        let name = handover_name(node, now);
        let latest = now + window.as_millis() as u64;
        let per_call = if self.cluster {
            1
        } else {
            HANDOVER_USERS_PER_CALL
        };
        let args: Vec<Value> = vec![node.into(), name.clone().into(), latest.to_string().into()];
        // Each bucket's set is read page by page and left as it is (it is renamed below), so the
        // next page of a full one starts after what was read.
        let mut handed = 0;
        let mut pages = self
            .node_pages("hand_over", node, (0..BUCKETS).map(|b| (b, 0)))
            .await?;
        let mut read: BTreeMap<usize, usize> = BTreeMap::new();
        while !pages.is_empty() {
            let mut again = Vec::new();
            for (bucket, users) in pages {
                let calls: Vec<_> = users
                    .chunks(per_call)
                    .map(|chunk| {
                        let keys = chunk.iter().map(|u| self.keys.user(u).into()).collect();
                        (&self.scripts.handover, keys, args.clone())
                    })
                    .collect();
                self.run_scripts("hand_over", &calls).await?;
                handed += users.len();
                let seen = read.entry(bucket).or_default();
                *seen += users.len();
                if users.len() == REAP_STEP {
                    again.push((bucket, *seen));
                }
            }
            pages = self.node_pages("hand_over", node, again).await?;
        }
        let held: Vec<usize> = read.into_keys().collect();
        // Each bucket's set becomes the handover name's (RENAME, O(1): the name is new, so there
        // is nothing to overwrite). The two share the bucket's hash tag, so one call may rename
        // several buckets on one Redis; on a cluster each call holds one bucket.
        let per_rename = if self.cluster { 1 } else { RENAMES_PER_CALL };
        let renames: Vec<_> = held
            .chunks(per_rename)
            .map(|buckets| {
                let keys = buckets
                    .iter()
                    .flat_map(|&b| {
                        [
                            self.keys.node_users(b, node),
                            self.keys.node_users(b, &name),
                        ]
                    })
                    .map(Value::from)
                    .collect();
                (&self.scripts.handover_sets, keys, Vec::new())
            })
            .collect();
        if !renames.is_empty() {
            self.run_scripts("hand_over", &renames).await?;
        }
        // Dead (older than the node TTL) once the window is over: reaped as a node that died then.
        // A name that holds nobody gets no heartbeat (nothing to reap).
        let heartbeat = latest.saturating_sub(self.settings.node_ttl.as_millis() as u64);
        let call = (
            &self.scripts.handover_node,
            vec![self.keys.heartbeats().into(), self.keys.nodes().into()],
            vec![
                node.into(),
                name.into(),
                heartbeat.to_string().into(),
                if held.is_empty() { "" } else { "1" }.into(),
            ],
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
                // Held: by another survivor, or by this node itself when its reap of that node
                // failed part-way (Redis went away): then it takes up where it stopped now,
                // rather than leaving the dead node's users online until the lock expires.
                Self::count_round_trip("reap");
                let holder: Option<String> = self
                    .client
                    .custom(cmd("GET"), vec![self.keys.reap_lock(&node)])
                    .await
                    .map_err(|e| Self::error("reap", e))?;
                if holder.as_deref() != Some(me) {
                    continue;
                }
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
