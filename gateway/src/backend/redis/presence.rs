//! Presence on Redis: flushes and renewals through `write.lua` (write.rs), record reads; the
//! online index, counts and their repair are in index.rs.

use std::collections::HashMap;

use async_trait::async_trait;
use fred::prelude::*;
use shared::Platform;

use super::{PIPELINE_USERS, RedisBackend, cmd, record, write::UserWrite};
use crate::{
    backend::{BackendError, Changed, Counts, IndexRepair, PresenceStore, PresenceWrite, Renewal},
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
            let users: Vec<UserWrite> = chunk
                .iter()
                .map(|w| UserWrite {
                    user: &w.user,
                    entry: w.entry,
                    status: w.status.as_ref(),
                    restore: None,
                    was: w.before,
                    joins: w.before.is_none() && w.entry.is_some(),
                })
                .collect();
            changed.extend(self.write_users("flush", node, now, false, &users).await?);
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
            // Renewal re-adds to the node's sets and restates the index too: after Redis lost
            // its data, or a write whose index step never ran, this puts them right.
            let users: Vec<UserWrite> = chunk
                .iter()
                .map(|r| UserWrite {
                    user: &r.user,
                    entry: Some(r.entry),
                    status: None,
                    restore: r.chosen.as_ref(),
                    was: None,
                    joins: true,
                })
                .collect();
            changed.extend(self.write_users("renew", node, now, true, &users).await?);
        }
        Ok(changed)
    }

    async fn presence(&self, users: &[String]) -> Result<Vec<PresenceRecord>, BackendError> {
        self.admit("presence")?;
        let now = now_ms();
        let hashes = self.user_hashes("query", users).await?;
        Ok(users
            .iter()
            .zip(hashes)
            .map(|(user, hash)| record::from_hash(user, &hash, now))
            .collect())
    }

    async fn online_users(
        &self,
        after: Option<&str>,
        limit: usize,
        platform: Option<Platform>,
    ) -> Result<(Vec<String>, Option<String>), BackendError> {
        self.admit("online_users")?;
        self.online_page(after, limit, platform).await
    }

    async fn counts(&self) -> Result<Counts, BackendError> {
        self.admit("counts")?;
        self.index_counts().await
    }

    async fn repair_index(&self) -> Result<IndexRepair, BackendError> {
        self.admit("repair_index")?;
        self.repair_step().await
    }
}

impl RedisBackend {
    /// Users' hashes in one round trip per [`PIPELINE_USERS`].
    pub(super) async fn user_hashes(
        &self,
        op: &'static str,
        users: &[String],
    ) -> Result<Vec<HashMap<String, String>>, BackendError> {
        let mut hashes = Vec::with_capacity(users.len());
        for chunk in users.chunks(PIPELINE_USERS) {
            let pipeline = self.client.pipeline();
            for user in chunk {
                let _: () = pipeline
                    .custom(cmd("HGETALL"), vec![self.keys.user(user)])
                    .await
                    .map_err(|e| Self::error(op, e))?;
            }
            Self::count_round_trip(op);
            let part: Vec<HashMap<String, String>> =
                pipeline.all().await.map_err(|e| Self::error(op, e))?;
            hashes.extend(part);
        }
        Ok(hashes)
    }
}
