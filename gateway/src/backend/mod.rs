//! The backend: where presence, tokens and the node registry live, and how events reach every node.
//! Two implementations: [`MemoryBackend`] (embedded, one node, nothing to install) and
//! `RedisBackend` (many nodes on Redis or Redis Cluster). One is picked in `app.rs` by config.

pub mod memory;
pub mod redis;

use std::{collections::BTreeMap, time::Duration};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shared::{Body, Destination, Message, Platform, RouteResult};
use tokio::sync::mpsc;

pub use memory::MemoryBackend;
pub use redis::{RedisBackend, RedisTarget};

use crate::presence::{ChosenStatus, NodeEntry, PresenceRecord};

/// What the backend tells the node, in the order it happened per user.
#[derive(Debug, Clone)]
pub enum BackendEvent {
    /// A watched user's presence changed (visibly: status, platforms or text).
    Presence(PresenceRecord),
    /// The backend lost, or may have lost, what this node wrote (Redis came back after an outage,
    /// possibly empty): every shard must rewrite its local presence at once.
    Resync,
    /// A message for local connections: of `user` (private messages and the sender's copies), of
    /// members of `group`, or of everyone.
    Message(Delivery),
    /// `user` joined or left `group`: their connections here start or stop getting its messages.
    Membership {
        user: String,
        group: String,
        joined: bool,
    },
}

/// Who a delivered message is for on this node.
#[derive(Debug, Clone, PartialEq)]
pub enum Audience {
    User(String),
    Group(String),
    All,
}

/// A message on its way to local connections.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub audience: Audience,
    pub message: Message,
    /// The connection that sent it (it gets an `ack` instead of a copy).
    pub origin: Option<Origin>,
}

/// A connection, named across nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub node: String,
    pub conn: u64,
}

/// A message to route, from a client (`send`) or the app backend (`POST /v1/messages`).
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub from: String,
    pub to: Destination,
    pub body: Body,
    pub sent_at: u64,
    pub origin: Option<Origin>,
    /// Client sends to a group must come from a member; the app backend may send anywhere.
    pub check_membership: bool,
}

/// How one message was routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOutcome {
    pub msg_id: String,
    pub result: RouteResult,
    /// Private: nodes holding a connection of the recipient that got it live. Group and broadcast:
    /// nodes it was published to.
    pub delivered: u64,
    /// Recipients it was stored for (offline private message: 1).
    pub stored: u64,
}

impl SendOutcome {
    pub fn new(msg_id: String, result: RouteResult, delivered: u64, stored: u64) -> Self {
        SendOutcome {
            msg_id,
            result,
            delivered,
            stored,
        }
    }
}

/// Why a message was not routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendRefused {
    #[error("only members may send to this group")]
    NotMember,
}

/// Limits of stored messages.
#[derive(Debug, Clone)]
pub struct MessageSettings {
    /// Private messages kept per offline user.
    pub offline_cap: usize,
    /// Messages kept per group.
    pub history_cap: usize,
    /// Oldest message kept per group.
    pub history_age: Duration,
}

/// Where a backend sends its events. The node routes them to the shard owning each user.
pub type EventSink = mpsc::Sender<BackendEvent>;

/// One user's change in one shard's batch.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceWrite {
    pub user: String,
    /// This node's entry for the user after the batch; `None` removes it (no local connection left).
    pub entry: Option<NodeEntry>,
    /// The entry the backend held from this node before (as last acknowledged), so indexes can be
    /// updated without reading it back.
    pub before: Option<NodeEntry>,
    /// A new chosen status, when the user set one in this batch.
    pub status: Option<ChosenStatus>,
}

/// The reads a connection waits for before its welcome; each may fail on its own.
pub struct ConnectState {
    pub groups: Result<Vec<String>, BackendError>,
    pub offline: Result<Vec<Message>, BackendError>,
}

/// One user's entry to renew.
#[derive(Debug, Clone, PartialEq)]
pub struct Renewal {
    pub user: String,
    pub entry: NodeEntry,
    /// The status last chosen through this node, restored only if the backend lost the user's
    /// record (so an invisible user stays invisible after Redis comes back empty).
    pub chosen: Option<ChosenStatus>,
}

/// What an opaque token stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    pub user: String,
    pub platform: Platform,
    /// Ms since the epoch.
    pub expires_at: u64,
}

/// A node as the registry shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    pub ws_url: String,
    pub connections: u64,
    pub started_at: u64,
    pub last_heartbeat: u64,
}

/// One record change, with what came before it where a transition matters (webhooks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// Platform mask before the change: 0 means the user had no connection anywhere.
    pub before_platforms: u16,
    pub record: PresenceRecord,
}

impl Changed {
    /// `Some(true)` when the user just connected somewhere, `Some(false)` when their last
    /// connection anywhere went away.
    pub fn transition(&self) -> Option<bool> {
        match (self.before_platforms != 0, self.record.platforms != 0) {
            (false, true) => Some(true),
            (true, false) => Some(false),
            _ => None,
        }
    }
}

/// Online users overall and per platform (users with a connection on that platform).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub online_users: u64,
    pub by_platform: BTreeMap<Platform, u64>,
}

/// Why a backend call failed. Callers keep their work and retry: nothing here is fatal.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("backend error: {0}")]
    Internal(String),
}

/// Settings every backend needs.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    /// Expiry of a node's presence entries; the node renews them every third of it.
    pub presence_ttl: Duration,
    /// Expiry of a node's registry entry without heartbeats; after it, the node counts as dead.
    pub node_ttl: Duration,
    pub messages: MessageSettings,
}

/// The contract both backends keep, tested by one suite run against each.
///
/// - Presence is kept per (user, node) entry, and every entry expires `presence_ttl` after it was
///   last written or renewed, so a crashed node's users stop counting by themselves.
/// - A user's record changes only when their visible presence does (status, platform set, text);
///   each change gets a version above every earlier one of that user, even after data loss.
/// - Every record change is published exactly once, to every node that watches the user, in version
///   order per user. A node receives events only for users it watches.
/// - Token, registry and query calls may fail with [`BackendError`]; writes that fail changed nothing
///   the caller relies on, and the caller retries them.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// `embedded` or `redis`, for logs and metrics.
    fn kind(&self) -> &'static str;

    /// Writes one shard's batch of this node's entries and status changes, and publishes the
    /// resulting record changes. Returns the changed records (for webhooks and metrics).
    async fn write_presence(
        &self,
        node: &str,
        writes: Vec<PresenceWrite>,
    ) -> Result<Vec<Changed>, BackendError>;

    /// Renews this node's entries, re-creating those that are missing (the backend lost them), and
    /// publishes whatever that changed.
    async fn renew_presence(
        &self,
        node: &str,
        entries: Vec<Renewal>,
    ) -> Result<Vec<Changed>, BackendError>;

    /// Current records, in the order asked; unknown users come back offline with version 0.
    async fn presence(&self, users: &[String]) -> Result<Vec<PresenceRecord>, BackendError>;

    /// Visibly online users in id order, after `after`, at most `limit`, optionally only those on
    /// `platform`. Returns the page and the cursor of the next one (`None` at the end).
    async fn online_users(
        &self,
        after: Option<&str>,
        limit: usize,
        platform: Option<Platform>,
    ) -> Result<(Vec<String>, Option<String>), BackendError>;

    /// Visibly online users overall and per platform.
    async fn counts(&self) -> Result<Counts, BackendError>;

    /// Starts delivering these users' presence events to this node. Never blocks: the backend
    /// queues the subscription work.
    fn watch(&self, users: Vec<String>);

    /// Stops delivering these users' presence events to this node.
    fn unwatch(&self, users: Vec<String>);

    /// Stores an opaque token until its `expires_at`.
    async fn put_token(&self, token: &str, claims: &TokenClaims) -> Result<(), BackendError>;

    /// The claims of a live token.
    async fn get_token(&self, token: &str) -> Result<Option<TokenClaims>, BackendError>;

    /// Announces or refreshes this node in the registry.
    async fn announce_node(&self, info: &NodeInfo) -> Result<(), BackendError>;

    /// Removes this node from the registry (graceful shutdown).
    async fn leave_node(&self, node: &str) -> Result<(), BackendError>;

    /// Every live node.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, BackendError>;

    /// Finds nodes that stopped heartbeating, removes their presence entries and publishes the
    /// resulting changes. Exactly one caller across all nodes reaps a given dead node; the records
    /// it changed are returned to that caller only (for webhooks).
    async fn reap_dead_nodes(&self, me: &str) -> Result<Vec<Changed>, BackendError>;

    // --- Messaging. Group messages are published once per message on the group's channel and
    // written once to its history; private messages are published once on the recipient's inbox
    // channel (and once on the sender's, for their other devices), or stored when the recipient is
    // offline. Message ids grow per destination and sort as strings.

    /// Starts delivering messages for these users (they have connections here).
    fn watch_inboxes(&self, users: Vec<String>);
    fn unwatch_inboxes(&self, users: Vec<String>);
    /// Starts delivering these groups' messages (members are connected here).
    fn watch_groups(&self, groups: Vec<String>);
    fn unwatch_groups(&self, groups: Vec<String>);

    /// Adds a member and tells every node holding the user's connections.
    async fn add_member(&self, group: &str, user: &str) -> Result<(), BackendError>;
    async fn remove_member(&self, group: &str, user: &str) -> Result<(), BackendError>;
    /// Members in id order after `after`, at most `limit`, and the next cursor.
    async fn members(
        &self,
        group: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<String>), BackendError>;
    async fn is_member(&self, group: &str, user: &str) -> Result<bool, BackendError>;
    async fn user_groups(&self, user: &str) -> Result<Vec<String>, BackendError>;

    /// Routes messages in the order given (callers keep one sender's messages in one call or in
    /// successive calls, so they stay in order).
    async fn send(
        &self,
        messages: Vec<Outgoing>,
    ) -> Result<Vec<Result<SendOutcome, SendRefused>>, BackendError>;

    /// Stored private messages of `user`, oldest first, marked `offline`.
    async fn offline_messages(&self, user: &str) -> Result<Vec<Message>, BackendError>;

    /// What a new connection needs before its welcome: the user's groups and stored messages.
    /// (The Redis backend reads both in one round trip.)
    async fn connect_state(&self, user: &str) -> ConnectState {
        let (groups, offline) = tokio::join!(self.user_groups(user), self.offline_messages(user));
        ConnectState { groups, offline }
    }
    /// Drops stored private messages up to and including `up_to`.
    async fn ack_offline(&self, user: &str, up_to: &str) -> Result<(), BackendError>;

    /// A group's messages after `since` (or from the oldest kept), at most `limit`, oldest first;
    /// true when more follow.
    async fn history(
        &self,
        group: &str,
        since: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Message>, bool), BackendError>;
    async fn read_position(&self, user: &str, group: &str) -> Result<Option<String>, BackendError>;
    /// Moves the read position forward (never back).
    async fn set_read_position(
        &self,
        user: &str,
        group: &str,
        up_to: &str,
    ) -> Result<(), BackendError>;
    /// Messages after the read position, per group of the user.
    async fn unread(&self, user: &str) -> Result<BTreeMap<String, u64>, BackendError>;
}

/// Message ids: `<ms, 13 digits>-<sequence per destination, 10 digits>`. They sort as strings in
/// send order, read back as Redis stream ids, and the sequence counts messages, so unread counts
/// need no scan.
pub fn msg_id(ms: u64, seq: u64) -> String {
    format!("{ms:013}-{seq:010}")
}

/// The (ms, seq) of a message id; `None` for anything else.
pub fn parse_msg_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    if ms.is_empty() || seq.is_empty() || ms.len() > 20 || seq.len() > 20 {
        return None;
    }
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_ids_sort_as_strings_in_send_order() {
        let ids = [
            msg_id(5, 9),
            msg_id(5, 10),
            msg_id(6, 11),
            msg_id(1_700_000_000_000, 12),
        ];
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert_eq!(parse_msg_id(&ids[1]), Some((5, 10)));
        assert_eq!(
            parse_msg_id("1700000000000-3"),
            Some((1_700_000_000_000, 3))
        );
        assert_eq!(parse_msg_id("nope"), None);
        assert_eq!(parse_msg_id("-1"), None);
    }
}
