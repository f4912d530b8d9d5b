//! Presence on Redis: flushes and renewals through `write.lua`, record reads, the online index
//! and counts.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use fred::prelude::*;
use shared::Platform;

use super::{
    PIPELINE_USERS, RedisBackend, cmd, record,
    write::{SetUpdates, UserWrite},
};
use crate::{
    backend::{BackendError, Changed, Counts, PresenceStore, PresenceWrite, Renewal},
    clock::now_ms,
    presence::PresenceRecord,
};

#[async_trait]
impl PresenceStore for RedisBackend {
    async fn write_presence(
        &self,
        node: &str,
        writes: Vec<PresenceWrite>,
    ) -> Result<Vec<Changed>, BackendError> {
        self.admit("write_presence")?;
        let now = now_ms();
        let mut changed = Vec::new();
        for chunk in writes.chunks(PIPELINE_USERS) {
            let mut sets = SetUpdates::default();
            let users = chunk.iter().map(|w| {
                sets.entry_change(&self.keys, node, &w.user, w.before, w.entry);
                if let Some(chosen) = &w.status {
                    sets.status_change(&self.keys, &w.user, chosen.status);
                }
                UserWrite {
                    user: &w.user,
                    entry: w.entry,
                    status: w.status.as_ref(),
                    restore: None,
                    was: w.before,
                }
            });
            let calls = self.write_calls(node, now, false, users);
            changed.extend(self.write_pipeline("flush", &calls, &sets).await?);
        }
        Ok(changed)
    }

    async fn renew_presence(
        &self,
        node: &str,
        entries: Vec<Renewal>,
    ) -> Result<Vec<Changed>, BackendError> {
        self.admit("renew_presence")?;
        let now = now_ms();
        let mut changed = Vec::new();
        for chunk in entries.chunks(PIPELINE_USERS) {
            // Renewal re-adds to the sets too: after Redis lost its data, this restores them.
            let mut sets = SetUpdates::default();
            let users = chunk.iter().map(|r| {
                sets.entry_change(&self.keys, node, &r.user, None, Some(r.entry));
                UserWrite {
                    user: &r.user,
                    entry: Some(r.entry),
                    status: None,
                    restore: r.chosen.as_ref(),
                    was: None,
                }
            });
            let calls = self.write_calls(node, now, true, users);
            let restored = self.write_pipeline("renew", &calls, &sets).await?;
            // Whether a restored choice won is known only now (a newer one may be stored), so the
            // invisible set follows the records that changed, in a second round trip that only
            // renewals after a loss need.
            let mut visibility = SetUpdates::default();
            for c in restored.iter().filter(|c| c.record.platforms != 0) {
                visibility.status_change(&self.keys, &c.record.user, c.record.status);
            }
            if !visibility.is_empty() {
                self.update_sets("renew", &visibility).await?;
            }
            changed.extend(restored);
        }
        Ok(changed)
    }

    async fn presence(&self, users: &[String]) -> Result<Vec<PresenceRecord>, BackendError> {
        self.admit("presence")?;
        let now = now_ms();
        let mut records = Vec::with_capacity(users.len());
        for chunk in users.chunks(PIPELINE_USERS) {
            let pipeline = self.client.pipeline();
            for user in chunk {
                let _: () = pipeline
                    .custom(cmd("HGETALL"), vec![self.keys.user(user)])
                    .await
                    .map_err(|e| Self::error("query", e))?;
            }
            Self::count_round_trip("query");
            let hashes: Vec<HashMap<String, String>> =
                pipeline.all().await.map_err(|e| Self::error("query", e))?;
            for (user, hash) in chunk.iter().zip(hashes) {
                records.push(record::from_hash(user, &hash, now));
            }
        }
        Ok(records)
    }

    async fn online_users(
        &self,
        after: Option<&str>,
        limit: usize,
        platform: Option<Platform>,
    ) -> Result<(Vec<String>, Option<String>), BackendError> {
        self.admit("online_users")?;
        let nodes = self.live_nodes().await?;
        let sets: Vec<String> = nodes
            .iter()
            .map(|n| match platform {
                Some(p) => self.keys.node_platform(n, p),
                None => self.keys.node_users(n),
            })
            .collect();
        let mut cursor = after.map(String::from);
        let mut page = Vec::with_capacity(limit);
        // Each round reads the next `limit + 1` ids of every node's set (O(log n) each), merges
        // them, and drops invisible users; a few rounds fill a page even with many invisible users.
        for _ in 0..16 {
            let min = cursor
                .as_ref()
                .map(|c| format!("({c}"))
                .unwrap_or_else(|| "-".into());
            let pipeline = self.client.pipeline();
            for set in &sets {
                let args = vec![
                    set.clone(),
                    min.clone(),
                    "+".into(),
                    "BYLEX".into(),
                    "LIMIT".into(),
                    "0".into(),
                    (limit + 1).to_string(),
                ];
                let _: () = pipeline
                    .custom(cmd("ZRANGE"), args)
                    .await
                    .map_err(|e| Self::error("online", e))?;
            }
            Self::count_round_trip("online");
            let lists: Vec<Vec<String>> = if sets.is_empty() {
                Vec::new()
            } else {
                pipeline.all().await.map_err(|e| Self::error("online", e))?
            };
            let exhausted = lists.iter().all(|l| l.len() <= limit);
            let merged: BTreeSet<String> = lists.into_iter().flatten().collect();
            let candidates: Vec<String> = merged.into_iter().take(limit + 1).collect();
            if candidates.is_empty() {
                return Ok((page, None));
            }
            let mut args = vec![self.keys.invisible()];
            args.extend(candidates.iter().cloned());
            Self::count_round_trip("online");
            let hidden: Vec<Option<f64>> = self
                .client
                .custom(cmd("ZMSCORE"), args)
                .await
                .map_err(|e| Self::error("online", e))?;
            for (user, hidden) in candidates.iter().zip(hidden) {
                if hidden.is_some() {
                    continue;
                }
                if page.len() == limit {
                    let next = page.last().cloned();
                    return Ok((page, next));
                }
                page.push(user.clone());
            }
            if exhausted && candidates.len() <= limit {
                return Ok((page, None));
            }
            cursor = candidates.last().cloned();
        }
        let next = page.last().cloned();
        Ok((page, next))
    }

    async fn counts(&self) -> Result<Counts, BackendError> {
        self.admit("counts")?;
        let nodes = self.live_nodes().await?;
        let mut keys = vec![self.keys.scratch(), self.keys.invisible()];
        keys.extend(nodes.iter().map(|n| self.keys.node_users(n)));
        for p in shared::ids::PLATFORMS {
            keys.extend(nodes.iter().map(|n| self.keys.node_platform(n, p)));
        }
        Self::count_round_trip("counts");
        let counts: Vec<u64> = self
            .scripts
            .counts
            .evalsha_with_reload(&self.client, keys, vec![nodes.len().to_string()])
            .await
            .map_err(|e| Self::error("counts", e))?;
        let mut out = Counts {
            online_users: counts.first().copied().unwrap_or(0),
            by_platform: BTreeMap::new(),
        };
        for (p, n) in shared::ids::PLATFORMS.zip(counts.into_iter().skip(1)) {
            if n > 0 {
                out.by_platform.insert(p, n);
            }
        }
        Ok(out)
    }
}
