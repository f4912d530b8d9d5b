//! The embedded backend: presence, tokens and the registry in this process, for one node with
//! nothing to install. It keeps the same contract as Redis, expiry included, so the behavioural
//! suite runs against both.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Mutex,
};

use async_trait::async_trait;
use shared::Platform;
use tokio::time::Instant;

use super::{
    Backend, BackendError, BackendEvent, BackendSettings, Changed, Counts, EventSink, NodeInfo,
    PresenceWrite, Renewal, TokenClaims,
};
use crate::{
    clock::now_ms,
    presence::{self, ChosenStatus, NodeEntry, PresenceRecord, platform_bit},
};

/// In-process backend. The lock is held only for map updates, never across an await.
pub struct MemoryBackend {
    settings: BackendSettings,
    state: Mutex<State>,
    events: EventSink,
}

#[derive(Default)]
struct State {
    users: HashMap<String, UserState>,
    /// Visibly online users, ordered for cursor pagination.
    online: BTreeSet<String>,
    tokens: HashMap<String, TokenClaims>,
    nodes: HashMap<String, (NodeInfo, Instant)>,
    /// Users with at least one watching connection on the node (one node: a set, not a count per
    /// node), so events go only where someone listens, as with Redis.
    watched: HashMap<String, usize>,
}

struct UserState {
    entries: HashMap<String, (NodeEntry, Instant)>,
    chosen: ChosenStatus,
    record: PresenceRecord,
}

impl UserState {
    fn new(user: &str) -> Self {
        UserState {
            entries: HashMap::new(),
            chosen: ChosenStatus::default(),
            record: PresenceRecord::unknown(user),
        }
    }
}

impl MemoryBackend {
    pub fn new(settings: BackendSettings, events: EventSink) -> Self {
        MemoryBackend {
            settings,
            state: Mutex::new(State::default()),
            events,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // more than losing the node, so a poisoned lock is taken over as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn publish(&self, changed: &[Changed], watched: Vec<bool>) {
        for (change, watched) in changed.iter().zip(watched) {
            if watched {
                // The node is shutting down when the sink is closed; nobody is left to tell.
                let _ = self
                    .events
                    .send(BackendEvent::Presence(change.record.clone()))
                    .await;
            }
        }
    }
}

impl State {
    /// Drops expired entries of `user` and recomputes the record; returns it when it changed.
    fn recompute(&mut self, user: &str, now: Instant) -> Option<Changed> {
        let state = self.users.get_mut(user)?;
        let before_platforms = state.record.platforms;
        state.entries.retain(|_, (_, expires)| *expires > now);
        let (mask, idle) = presence::fold_entries(state.entries.values().map(|(e, _)| *e));
        let next = presence::next_record(&state.record, mask, idle, &state.chosen, now_ms());
        if let Some(next) = &next {
            state.record = next.clone();
            if presence::visibly_online(next.status) {
                self.online.insert(user.to_string());
            } else {
                self.online.remove(user);
            }
        }
        next.map(|record| Changed {
            before_platforms,
            record,
        })
    }

    fn is_watched(&self, user: &str) -> bool {
        self.watched.get(user).is_some_and(|n| *n > 0)
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "embedded"
    }

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
                let user = state
                    .users
                    .entry(write.user.clone())
                    .or_insert_with(|| UserState::new(&write.user));
                match write.entry {
                    Some(entry) => {
                        user.entries.insert(node.to_string(), (entry, expires));
                    }
                    None => {
                        user.entries.remove(node);
                    }
                }
                if let Some(status) = write.status {
                    user.chosen = status;
                }
                changed.extend(state.recompute(&write.user, now));
            }
            let watched = changed
                .iter()
                .map(|c| state.is_watched(&c.record.user))
                .collect();
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
        let state = self.lock();
        let mut counts = Counts {
            online_users: state.online.len() as u64,
            ..Counts::default()
        };
        for user in &state.online {
            if let Some(s) = state.users.get(user) {
                for p in presence::platforms_of(s.record.platforms) {
                    *counts.by_platform.entry(p).or_default() += 1;
                }
            }
        }
        Ok(counts)
    }

    fn watch(&self, users: Vec<String>) {
        let mut state = self.lock();
        for user in users {
            *state.watched.entry(user).or_default() += 1;
        }
    }

    fn unwatch(&self, users: Vec<String>) {
        let mut state = self.lock();
        for user in users {
            if let Some(n) = state.watched.get_mut(&user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    state.watched.remove(&user);
                }
            }
        }
    }

    async fn put_token(&self, token: &str, claims: &TokenClaims) -> Result<(), BackendError> {
        self.lock().tokens.insert(token.to_string(), claims.clone());
        Ok(())
    }

    async fn get_token(&self, token: &str) -> Result<Option<TokenClaims>, BackendError> {
        let mut state = self.lock();
        let live = state
            .tokens
            .get(token)
            .filter(|c| c.expires_at > now_ms())
            .cloned();
        if live.is_none() {
            state.tokens.remove(token);
        }
        Ok(live)
    }

    async fn announce_node(&self, info: &NodeInfo) -> Result<(), BackendError> {
        let expires = Instant::now() + self.settings.node_ttl;
        self.lock()
            .nodes
            .insert(info.id.clone(), (info.clone(), expires));
        Ok(())
    }

    async fn leave_node(&self, node: &str) -> Result<(), BackendError> {
        self.lock().nodes.remove(node);
        Ok(())
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

    async fn reap_dead_nodes(&self, _me: &str) -> Result<Vec<Changed>, BackendError> {
        // One process holds every node here, so "dead" means "entries past their expiry": sweep
        // them, and expired tokens with them.
        let now = Instant::now();
        let (changed, watched) = {
            let mut state = self.lock();
            state.nodes.retain(|_, (_, expires)| *expires > now);
            let now_wall = now_ms();
            state.tokens.retain(|_, c| c.expires_at > now_wall);
            let expired: Vec<String> = state
                .users
                .iter()
                .filter(|(_, s)| s.entries.values().any(|(_, e)| *e <= now))
                .map(|(u, _)| u.clone())
                .collect();
            let mut changed = Vec::new();
            for user in expired {
                changed.extend(state.recompute(&user, now));
            }
            let watched = changed
                .iter()
                .map(|c| state.is_watched(&c.record.user))
                .collect();
            (changed, watched)
        };
        self.publish(&changed, watched).await;
        Ok(changed)
    }
}
