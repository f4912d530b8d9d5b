//! The embedded backend: every role in this process, for one node with nothing to install. It
//! keeps the same contracts as Redis, expiry included, so one suite per role runs against both.
//! This file holds the state; each role's `impl` is in the file named after it.

mod dedupe;
mod events;
mod groups;
mod messages;
mod presence;
mod registry;
mod sessions;
mod tokens;
mod webhooks;

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    sync::Mutex,
};

use shared::Message;
use tokio::time::Instant;

use super::{
    BackendEvent, BackendSettings, Changed, EventSink, JoinPolicy, NodeInfo, TokenClaims, Topic,
    WebhookWritten,
};
use crate::{
    clock::now_ms,
    presence::{
        ChosenStatus, NodeEntry, PresenceRecord, fold_entries, next_record, visibly_online,
    },
};

/// In-process backend. The lock is held only for map updates, never across an await.
pub struct MemoryBackend {
    settings: BackendSettings,
    state: Mutex<State>,
    events: EventSink,
    /// Apart from `state`: webhook traffic never waits on presence work, nor the reverse.
    webhooks: Mutex<webhooks::WebhookState>,
}

struct State {
    users: HashMap<String, UserState>,
    /// Visibly online users, ordered for cursor pagination.
    online: BTreeSet<String>,
    /// `online` counted, overall and per platform, as users enter, change and leave it.
    counts: super::Counts,
    tokens: HashMap<String, TokenClaims>,
    nodes: HashMap<String, (NodeInfo, Instant)>,
    /// Topics someone on the node listens to, so events go only there, as with Redis; a user
    /// whose inbox nobody listens to gets private messages stored instead.
    listening: HashSet<Topic>,
    /// Every entry's expiry, oldest first, so reads sweep what expired without a scan. An item
    /// may be stale (its entry renewed or removed since): sweeping it just recomputes the user.
    expiries: BTreeSet<(Instant, String)>,
    /// Changes that reads swept, kept for the next `reap_dead_nodes` (its caller sends the
    /// webhooks); at most one per user whose entry expired.
    swept: Vec<Changed>,
    groups: HashMap<String, GroupState>,
    user_groups: HashMap<String, BTreeSet<String>>,
    stored: HashMap<String, Inbox>,
    read_positions: HashMap<String, HashMap<String, String>>,
    /// Per user, when their tokens were last revoked (ms); swept with expired tokens.
    revoked: HashMap<String, u64>,
    /// Per (user, scope), the sequence of the latest login (multi-login policy).
    logins: HashMap<(String, Option<shared::Platform>), u64>,
    /// Answers to `connections` requests, until collected.
    list_replies: HashMap<String, Vec<super::ConnectionInfo>>,
    /// Sends by `client_msg_id`, so a client's retry is not sent twice.
    remembered: dedupe::Remembered,
}

impl State {
    fn new(settings: &BackendSettings) -> Self {
        let messages = &settings.messages;
        State {
            users: HashMap::new(),
            online: BTreeSet::new(),
            counts: super::Counts::default(),
            tokens: HashMap::new(),
            nodes: HashMap::new(),
            listening: HashSet::new(),
            expiries: BTreeSet::new(),
            swept: Vec::new(),
            groups: HashMap::new(),
            user_groups: HashMap::new(),
            stored: HashMap::new(),
            read_positions: HashMap::new(),
            revoked: HashMap::new(),
            logins: HashMap::new(),
            list_replies: HashMap::new(),
            remembered: dedupe::Remembered::new(messages.dedupe_window, messages.dedupe_max),
        }
    }
}

#[derive(Default)]
struct GroupState {
    join: JoinPolicy,
    /// Ms of the newest message sent to the group.
    last_message_at: Option<u64>,
    members: BTreeSet<String>,
    history: VecDeque<Message>,
    seq: u64,
}

#[derive(Default)]
struct Inbox {
    messages: VecDeque<Message>,
    seq: u64,
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
            state: Mutex::new(State::new(&settings)),
            settings,
            events,
            webhooks: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // more than losing the node, so a poisoned lock is taken over as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies entry expiry up to now, publishing what it changed: every read sees what Redis
    /// would (an entry past its expiry counts for nothing).
    async fn sweep(&self) -> Vec<Changed> {
        let (changed, watched) = {
            let mut state = self.lock();
            let changed = state.sweep(Instant::now());
            let watched = state.watched_of(&changed);
            state.swept.extend(changed.iter().cloned());
            (changed, watched)
        };
        self.publish(&changed, watched).await;
        changed
    }

    async fn publish(&self, changed: &[Changed], watched: Vec<bool>) {
        for (change, watched) in changed.iter().zip(watched) {
            if watched {
                // The node is shutting down when the sink is closed; nobody is left to tell.
                let _ = self
                    .events
                    .send(BackendEvent::Presence {
                        record: change.record.clone(),
                        public_changed: change.public_changed,
                    })
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
        let (mask, idle) = fold_entries(state.entries.values().map(|(e, _)| *e));
        let next = next_record(&state.record, mask, idle, &state.chosen, now_ms());
        let public_changed = next
            .as_ref()
            .is_some_and(|next| next.public_changed_from(&state.record));
        if let Some(next) = &next {
            let counted = |r: &PresenceRecord| visibly_online(r.status).then_some(r.platforms);
            self.counts.moved(counted(&state.record), counted(next));
            state.record = next.clone();
            if visibly_online(next.status) {
                self.online.insert(user.to_string());
            } else {
                self.online.remove(user);
            }
        }
        next.map(|record| Changed {
            before_platforms,
            record,
            public_changed,
            webhook: WebhookWritten::NotQueued,
        })
    }

    /// Sets (`Some`) or removes `node`'s entry of `user`, keeping the expiry index.
    fn set_entry(&mut self, user: &str, node: &str, entry: Option<(NodeEntry, Instant)>) {
        let slot = self
            .users
            .entry(user.to_string())
            .or_insert_with(|| UserState::new(user));
        match entry {
            Some((entry, expires)) => {
                slot.entries.insert(node.to_string(), (entry, expires));
                self.expiries.insert((expires, user.to_string()));
            }
            None => {
                slot.entries.remove(node);
            }
        }
    }

    /// Users with an entry of `node`. A scan of every user: for shutdown only, once per process.
    fn users_with_entry(&self, node: &str) -> Vec<String> {
        self.users
            .iter()
            .filter(|(_, s)| s.entries.contains_key(node))
            .map(|(u, _)| u.clone())
            .collect()
    }

    /// Recomputes every user with an entry that expired by `now`.
    fn sweep(&mut self, now: Instant) -> Vec<Changed> {
        let mut changed = Vec::new();
        while let Some((expires, _)) = self.expiries.first()
            && *expires <= now
        {
            let Some((_, user)) = self.expiries.pop_first() else {
                break;
            };
            changed.extend(self.recompute(&user, now));
        }
        changed
    }

    fn watched_of(&self, changed: &[Changed]) -> Vec<bool> {
        changed
            .iter()
            .map(|c| self.listens(Topic::Presence(c.record.user.clone())))
            .collect()
    }

    pub(super) fn listens(&self, topic: Topic) -> bool {
        self.listening.contains(&topic)
    }
}

impl super::Backend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    /// In the process: never away.
    fn health(&self) -> super::Health {
        super::Health::new()
    }
}
