//! Presence on the embedded backend: entries with an expiry per (user, node), kept in `State`.

use async_trait::async_trait;
use shared::Platform;
use tokio::time::Instant;

use super::MemoryBackend;
use crate::{
    backend::{BackendError, Changed, Counts, IndexRepair, PresenceStore, PresenceWrite, Renewal},
    presence::{PresenceRecord, platform_bit},
};

#[async_trait]
impl PresenceStore for MemoryBackend {
    async fn write_presence(
        &self,
        node: &str,
        writes: Vec<PresenceWrite>,
    ) -> Result<Vec<Changed>, BackendError> {
        let now = Instant::now();
        let expires = now + self.settings.presence_ttl;
        let (changed, watched) = {
            let mut state = self.lock();
            let mut changed = Vec::new();
            for write in writes {
                state.set_entry(&write.user, node, write.entry.map(|e| (e, expires)));
                if let Some(status) = write.status
                    && let Some(user) = state.users.get_mut(&write.user)
                {
                    user.chosen = status;
                }
                changed.extend(state.recompute(&write.user, now));
            }
            let watched = state.watched_of(&changed);
            (changed, watched)
        };
        self.publish(&changed, watched).await;
        Ok(changed)
    }

    async fn renew_presence(
        &self,
        node: &str,
        entries: Vec<Renewal>,
    ) -> Result<Vec<Changed>, BackendError> {
        let writes = entries
            .into_iter()
            .map(|r| PresenceWrite {
                user: r.user,
                entry: Some(r.entry),
                before: Some(r.entry),
                status: None,
            })
            .collect();
        self.write_presence(node, writes).await
    }

    async fn presence(&self, users: &[String]) -> Result<Vec<PresenceRecord>, BackendError> {
        self.sweep().await;
        let state = self.lock();
        Ok(users
            .iter()
            .map(|u| match state.users.get(u) {
                Some(s) => s.record.clone(),
                None => PresenceRecord::unknown(u),
            })
            .collect())
    }

    async fn online_users(
        &self,
        after: Option<&str>,
        limit: usize,
        platform: Option<Platform>,
    ) -> Result<(Vec<String>, Option<String>), BackendError> {
        self.sweep().await;
        let state = self.lock();
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(a.to_string()),
            None => std::ops::Bound::Unbounded,
        };
        let mut page = Vec::with_capacity(limit.min(1024));
        let mut more = false;
        for user in state.online.range((start, std::ops::Bound::Unbounded)) {
            let on_platform = platform.is_none_or(|p| {
                state
                    .users
                    .get(user)
                    .is_some_and(|s| s.record.platforms & platform_bit(p) != 0)
            });
            if !on_platform {
                continue;
            }
            if page.len() == limit {
                more = true;
                break;
            }
            page.push(user.clone());
        }
        let next = if more { page.last().cloned() } else { None };
        Ok((page, next))
    }

    async fn counts(&self) -> Result<Counts, BackendError> {
        self.sweep().await;
        Ok(self.lock().counts.clone())
    }

    /// The index is the state itself, updated under the same lock: nothing to repair.
    async fn repair_index(&self) -> Result<IndexRepair, BackendError> {
        Ok(IndexRepair {
            pass_done: true,
            ..IndexRepair::default()
        })
    }
}
