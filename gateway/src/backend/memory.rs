//! The embedded backend: presence, tokens and the registry in this process, for one node with
//! nothing to install. It keeps the same contract as Redis, expiry included, so the behavioural
//! suite runs against both.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::Mutex,
};

use async_trait::async_trait;
use shared::{Destination, Message, Platform, RouteResult};
use tokio::time::Instant;

use super::{
    Audience, Backend, BackendError, BackendEvent, BackendSettings, Changed, Counts, Delivery,
    EventSink, NodeInfo, Outgoing, PresenceWrite, Renewal, SendOutcome, SendRefused, TokenClaims,
    msg_id, parse_msg_id,
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
    /// Users with connections here: their private messages are delivered, not stored.
    inboxes: HashMap<String, usize>,
    /// Groups with member connections here.
    watched_groups: HashMap<String, usize>,
    groups: HashMap<String, GroupState>,
    user_groups: HashMap<String, BTreeSet<String>>,
    stored: HashMap<String, Inbox>,
    read_positions: HashMap<String, HashMap<String, String>>,
}

#[derive(Default)]
struct GroupState {
    members: BTreeSet<String>,
    history: VecDeque<Message>,
    seq: u64,
}

#[derive(Default)]
struct Inbox {
    messages: VecDeque<Message>,
    seq: u64,
}

fn count_in(map: &mut HashMap<String, usize>, keys: Vec<String>, delta: i64) {
    for key in keys {
        let n = map.entry(key.clone()).or_default();
        *n = (*n as i64 + delta).max(0) as usize;
        if *n == 0 {
            map.remove(&key);
        }
    }
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

impl MemoryBackend {
    async fn membership_event(&self, user: &str, group: &str, joined: bool) {
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

fn message_of(out: &Outgoing, msg_id: String) -> Message {
    Message {
        msg_id,
        from: out.from.clone(),
        to: out.to.clone(),
        body: out.body.clone(),
        sent_at: out.sent_at,
        offline: None,
    }
}

fn delivery(audience: Audience, message: &Message, out: &Outgoing) -> BackendEvent {
    BackendEvent::Message(Delivery {
        audience,
        message: message.clone(),
        origin: out.origin.clone(),
    })
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

    fn watch_inboxes(&self, users: Vec<String>) {
        count_in(&mut self.lock().inboxes, users, 1);
    }

    fn unwatch_inboxes(&self, users: Vec<String>) {
        count_in(&mut self.lock().inboxes, users, -1);
    }

    fn watch_groups(&self, groups: Vec<String>) {
        count_in(&mut self.lock().watched_groups, groups, 1);
    }

    fn unwatch_groups(&self, groups: Vec<String>) {
        count_in(&mut self.lock().watched_groups, groups, -1);
    }

    async fn add_member(&self, group: &str, user: &str) -> Result<(), BackendError> {
        let added = {
            let mut state = self.lock();
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
        Ok(())
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

    async fn user_groups(&self, user: &str) -> Result<Vec<String>, BackendError> {
        Ok(self
            .lock()
            .user_groups
            .get(user)
            .map(|g| g.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn send(
        &self,
        messages: Vec<Outgoing>,
    ) -> Result<Vec<Result<SendOutcome, SendRefused>>, BackendError> {
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut events = Vec::new();
        {
            let mut state = self.lock();
            let now = now_ms();
            let limits = &self.settings.messages;
            for out in messages {
                let outcome = match &out.to {
                    Destination::User { user } => {
                        let inbox = state.stored.entry(user.clone()).or_default();
                        inbox.seq += 1;
                        let message = message_of(&out, msg_id(now, inbox.seq));
                        let online = state.inboxes.contains_key(user);
                        let outcome = if online {
                            events.push(delivery(Audience::User(user.clone()), &message, &out));
                            SendOutcome::new(message.msg_id.clone(), RouteResult::Delivered, 1, 0)
                        } else {
                            let inbox = state.stored.entry(user.clone()).or_default();
                            inbox.messages.push_back(message.clone());
                            while inbox.messages.len() > limits.offline_cap {
                                inbox.messages.pop_front();
                            }
                            SendOutcome::new(message.msg_id.clone(), RouteResult::Stored, 0, 1)
                        };
                        if out.from != *user && state.inboxes.contains_key(&out.from) {
                            events.push(delivery(Audience::User(out.from.clone()), &message, &out));
                        }
                        Ok(outcome)
                    }
                    Destination::Group { group } => {
                        let is_member = state
                            .groups
                            .get(group)
                            .is_some_and(|g| g.members.contains(&out.from));
                        if out.check_membership && !is_member {
                            Err(SendRefused::NotMember)
                        } else {
                            let live = state.watched_groups.contains_key(group);
                            let g = state.groups.entry(group.clone()).or_default();
                            g.seq += 1;
                            let message = message_of(&out, msg_id(now, g.seq));
                            g.history.push_back(message.clone());
                            let oldest = now.saturating_sub(limits.history_age.as_millis() as u64);
                            while g.history.len() > limits.history_cap
                                || g.history.front().is_some_and(|m| m.sent_at < oldest)
                            {
                                g.history.pop_front();
                            }
                            let others = g.members.iter().filter(|m| **m != out.from).count();
                            events.push(delivery(Audience::Group(group.clone()), &message, &out));
                            let result = match (others, live) {
                                (0, _) => RouteResult::NoRecipients,
                                (_, true) => RouteResult::Delivered,
                                (_, false) => RouteResult::Stored,
                            };
                            Ok(SendOutcome::new(message.msg_id, result, u64::from(live), 0))
                        }
                    }
                    Destination::All { .. } => {
                        let message = message_of(&out, msg_id(now, 0));
                        events.push(delivery(Audience::All, &message, &out));
                        Ok(SendOutcome::new(
                            message.msg_id,
                            RouteResult::Delivered,
                            1,
                            0,
                        ))
                    }
                };
                outcomes.push(outcome);
            }
        }
        for event in events {
            let _ = self.events.send(event).await;
        }
        Ok(outcomes)
    }

    async fn offline_messages(&self, user: &str) -> Result<Vec<Message>, BackendError> {
        Ok(self
            .lock()
            .stored
            .get(user)
            .map(|i| {
                i.messages
                    .iter()
                    .cloned()
                    .map(|mut m| {
                        m.offline = Some(true);
                        m
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn ack_offline(&self, user: &str, up_to: &str) -> Result<(), BackendError> {
        if let Some(inbox) = self.lock().stored.get_mut(user) {
            inbox.messages.retain(|m| m.msg_id.as_str() > up_to);
        }
        Ok(())
    }

    async fn history(
        &self,
        group: &str,
        since: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Message>, bool), BackendError> {
        let state = self.lock();
        let oldest = now_ms().saturating_sub(self.settings.messages.history_age.as_millis() as u64);
        let Some(g) = state.groups.get(group) else {
            return Ok((Vec::new(), false));
        };
        let mut page: Vec<Message> = g
            .history
            .iter()
            .filter(|m| m.sent_at >= oldest)
            .filter(|m| since.is_none_or(|s| m.msg_id.as_str() > s))
            .take(limit + 1)
            .cloned()
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        Ok((page, more))
    }

    async fn read_position(&self, user: &str, group: &str) -> Result<Option<String>, BackendError> {
        Ok(self
            .lock()
            .read_positions
            .get(user)
            .and_then(|p| p.get(group))
            .cloned())
    }

    async fn set_read_position(
        &self,
        user: &str,
        group: &str,
        up_to: &str,
    ) -> Result<(), BackendError> {
        let mut state = self.lock();
        let positions = state.read_positions.entry(user.to_string()).or_default();
        let current = positions.entry(group.to_string()).or_default();
        if up_to > current.as_str() {
            *current = up_to.to_string();
        }
        Ok(())
    }

    async fn unread(&self, user: &str) -> Result<BTreeMap<String, u64>, BackendError> {
        let state = self.lock();
        let mut counts = BTreeMap::new();
        for group in state.user_groups.get(user).into_iter().flatten() {
            let Some(g) = state.groups.get(group) else {
                continue;
            };
            let read_seq = state
                .read_positions
                .get(user)
                .and_then(|p| p.get(group))
                .and_then(|id| parse_msg_id(id))
                .map(|(_, seq)| seq)
                .unwrap_or(0);
            let unread = g.seq.saturating_sub(read_seq).min(g.history.len() as u64);
            counts.insert(group.clone(), unread);
        }
        Ok(counts)
    }
}
