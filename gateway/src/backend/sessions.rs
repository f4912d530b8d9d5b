//! The sessions role: what a connection needs before its welcome, and the app backend's control
//! over live connections on every node (disconnect, revoke).

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shared::{Message, Platform};

use super::BackendError;

/// Connections, seen across nodes.
///
/// - `control` reaches every node holding a connection of the user (those that watch the user's
///   inbox, [`super::Topic::Inbox`]) as [`super::BackendEvent::Control`], at most once (pub/sub);
///   it answers how many nodes it reached.
/// - `login` numbers a user's logins per scope in the order the backend saw them (across nodes)
///   and tells every node ([`Control::Replace`]), so each closes the older ones: the latest
///   login in a scope is the one that survives.
/// - `connections` asks every node holding the user's connections ([`Control::List`]) and
///   gathers their answers (`answer_list`) for at most [`LIST_WAIT`].
/// - After `revoke(user, at)` returns, `connect_state` of that user on any node reports `at`, for
///   30 days (longer than any token this gateway issues lives); tokens issued before it must be
///   refused by the caller.
#[async_trait]
pub trait Sessions: Send + Sync + 'static {
    /// What a new connection needs before its welcome, in one round trip on Redis.
    async fn connect_state(&self, user: &str) -> ConnectState;
    async fn control(&self, user: &str, control: &Control) -> Result<u64, BackendError>;
    /// Records that tokens of `user` issued before `at` (ms) are void, and tells every node.
    async fn revoke(&self, user: &str, at: u64) -> Result<u64, BackendError>;
    /// A new login of `user` in `scope` (a platform, or `None` for all): its sequence number,
    /// after every node has been told to close the user's older logins in that scope.
    async fn login(&self, user: &str, scope: Option<Platform>) -> Result<u64, BackendError>;
    /// The sequence number of the user's latest login in `scope` (0: none).
    async fn latest_login(&self, user: &str, scope: Option<Platform>) -> Result<u64, BackendError>;
    /// Every live connection of `user`, on every node.
    async fn connections(&self, user: &str) -> Result<Vec<ConnectionInfo>, BackendError>;
    /// This node's answer to [`Control::List`].
    async fn answer_list(
        &self,
        user: &str,
        reply: &str,
        node: &str,
        connections: Vec<ConnectionInfo>,
    ) -> Result<(), BackendError>;
}

/// How long `connections` waits for the nodes' answers.
pub const LIST_WAIT: Duration = Duration::from_secs(1);

/// One live connection, as `GET /v1/users/{user}/connections` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub conn_id: String,
    pub node: String,
    pub platform: Platform,
    pub connected_at: u64,
    pub remote_addr: String,
    pub user_agent: Option<String>,
    pub rtt_ms: Option<u64>,
}

/// The reads a connection waits for before its welcome; each may fail on its own.
pub struct ConnectState {
    pub groups: Result<Vec<String>, BackendError>,
    pub offline: Result<Vec<Message>, BackendError>,
    /// Tokens of the user issued before this (ms) are revoked.
    pub revoked_at: Result<Option<u64>, BackendError>,
}

impl ConnectState {
    /// Nothing could be read.
    pub fn failed(e: BackendError) -> Self {
        ConnectState {
            groups: Err(e.clone()),
            offline: Err(e.clone()),
            revoked_at: Err(e),
        }
    }

    /// Everything was read.
    pub fn is_complete(&self) -> bool {
        self.groups.is_ok() && self.offline.is_ok() && self.revoked_at.is_ok()
    }
}

/// What the app backend asks of a user's live connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Control {
    /// Close the user's connections (only those on `platforms`, when given) with 4003.
    Disconnect {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        platforms: Vec<Platform>,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// Close the user's connections whose token was issued before `before` (ms) with 4001.
    Revoke { before: u64 },
    /// A newer login (sequence `seq`) replaces the user's older ones on `platform` (or on every
    /// platform): close those with 4011.
    Replace {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        platform: Option<Platform>,
        seq: u64,
    },
    /// Answer with this node's connections of the user ([`Sessions::answer_list`]).
    List { reply: String },
}

impl Control {
    /// For metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Control::Disconnect { .. } => "disconnect",
            Control::Revoke { .. } => "revoke",
            Control::Replace { .. } => "replaced",
            Control::List { .. } => "list",
        }
    }
}

/// How long a revocation is remembered: longer than the longest token `POST /v1/tokens` issues.
pub const REVOCATION_TTL_MS: u64 = 31 * 86_400 * 1000;
