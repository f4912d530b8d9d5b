//! Group membership on the embedded backend: members per group and groups per user.

use async_trait::async_trait;

use super::MemoryBackend;
use crate::backend::{Added, BackendError, BackendEvent, GroupInfo, Groups, JoinPolicy, Topic};

#[async_trait]
impl Groups for MemoryBackend {
    async fn add_member(&self, group: &str, user: &str) -> Result<Added, BackendError> {
        let added = {
            let mut state = self.lock();
            let mine = state.user_groups.get(user);
            if mine
                .is_some_and(|g| !g.contains(group) && g.len() >= self.settings.max_groups_per_user)
            {
                return Ok(Added::TooManyGroups);
            }
            let added = state
                .groups
                .entry(group.to_string())
                .or_default()
                .members
                .insert(user.to_string());
            state
                .user_groups
                .entry(user.to_string())
                .or_default()
                .insert(group.to_string());
            added
        };
        if added {
            self.membership_event(user, group, true).await;
        }
        Ok(Added::Member)
    }

    async fn remove_member(&self, group: &str, user: &str) -> Result<(), BackendError> {
        let removed = {
            let mut state = self.lock();
            let removed = state
                .groups
                .get_mut(group)
                .is_some_and(|g| g.members.remove(user));
            if let Some(groups) = state.user_groups.get_mut(user) {
                groups.remove(group);
            }
            removed
        };
        if removed {
            self.membership_event(user, group, false).await;
        }
        Ok(())
    }

    async fn members(
        &self,
        group: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<String>), BackendError> {
        let state = self.lock();
        let Some(g) = state.groups.get(group) else {
            return Ok((Vec::new(), None));
        };
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(a.to_string()),
            None => std::ops::Bound::Unbounded,
        };
        let mut page: Vec<String> = g
            .members
            .range((start, std::ops::Bound::Unbounded))
            .take(limit + 1)
            .cloned()
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        let next = if more { page.last().cloned() } else { None };
        Ok((page, next))
    }

    async fn is_member(&self, group: &str, user: &str) -> Result<bool, BackendError> {
        Ok(self
            .lock()
            .groups
            .get(group)
            .is_some_and(|g| g.members.contains(user)))
    }

    async fn set_join_policy(&self, group: &str, join: JoinPolicy) -> Result<(), BackendError> {
        self.lock()
            .groups
            .entry(group.to_string())
            .or_default()
            .join = join;
        Ok(())
    }

    async fn join_policy(&self, group: &str) -> Result<JoinPolicy, BackendError> {
        Ok(self
            .lock()
            .groups
            .get(group)
            .map(|g| g.join)
            .unwrap_or_default())
    }

    async fn group_info(&self, group: &str) -> Result<GroupInfo, BackendError> {
        Ok(self
            .lock()
            .groups
            .get(group)
            .map(|g| GroupInfo {
                join: g.join,
                members: g.members.len() as u64,
                last_message_at: g.last_message_at,
            })
            .unwrap_or_default())
    }

    async fn user_groups(&self, user: &str) -> Result<Vec<String>, BackendError> {
        Ok(self
            .lock()
            .user_groups
            .get(user)
            .map(|g| g.iter().cloned().collect())
            .unwrap_or_default())
    }
}

impl MemoryBackend {
    async fn membership_event(&self, user: &str, group: &str, joined: bool) {
        if !self.lock().listens(Topic::Inbox(user.to_string())) {
            return;
        }
        let _ = self
            .events
            .send(BackendEvent::Membership {
                user: user.to_string(),
                group: group.to_string(),
                joined,
            })
            .await;
    }
}
