//! The messaging role: routing a message, storing it for offline users and in group history, and
//! each user's read positions.

use std::{collections::BTreeMap, time::Duration};

use async_trait::async_trait;
use shared::{Body, Destination, Message, RouteResult};

use super::BackendError;
use super::events::Origin;

/// Messages and what is kept of them.
///
/// - A group message is published once on the group's topic and written once to its history
///   (capped by count and age); a private message is published once on the recipient's inbox
///   (and on the sender's, for their other devices), or stored when the recipient has no
///   connection anywhere (capped per user) until `ack_offline`.
/// - Message ids grow per destination and sort as strings ([`super::msg_id`]); one `send` call
///   keeps its messages in order, and callers keep one sender's messages in one call or in
///   successive calls.
/// - Live delivery is at most once (pub/sub); history and stored messages are what a client
///   catches up from.
/// - A message with a [`Dedupe`] id already sent by the same sender to the same destination within
///   the id's window is not sent again: its outcome is the first one's (same `msg_id`). The check
///   and the send are one step, so two copies racing on two nodes send once.
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Routes messages in the order given.
    async fn send(
        &self,
        messages: Vec<Outgoing>,
    ) -> Result<Vec<Result<SendOutcome, SendRefused>>, BackendError>;

    /// Stored private messages of `user`, oldest first, marked `offline`.
    async fn offline_messages(&self, user: &str) -> Result<Vec<Message>, BackendError>;
    /// Drops stored private messages up to and including `up_to`.
    async fn ack_offline(&self, user: &str, up_to: &str) -> Result<(), BackendError>;

    /// A group's messages after `since` (or from the oldest kept), at most `limit`, oldest
    /// first; true when more follow.
    async fn history(
        &self,
        group: &str,
        since: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Message>, bool), BackendError>;
    async fn read_position(&self, user: &str, group: &str) -> Result<Option<String>, BackendError>;
    /// Moves the read position forward (never back), and never past the group's last message:
    /// an id later than it (in time or in sequence) sets the position to the last message, and
    /// in a group with no message yet nothing is set. The position is kept in canonical form.
    async fn set_read_position(
        &self,
        user: &str,
        group: &str,
        up_to: &str,
    ) -> Result<(), BackendError>;
    /// Messages after the read position, per group of the user.
    async fn unread(&self, user: &str) -> Result<BTreeMap<String, u64>, BackendError>;
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
    /// Whether a private message may be stored for a recipient with no connection. The router
    /// says no once the sender spent their stored-message budget: such a send is refused
    /// instead of stored.
    pub may_store: bool,
    /// What makes a repeat of this message recognisable; `None` sends it whatever came before.
    pub dedupe: Option<Dedupe>,
}

/// The id under which a send is remembered, per sender and destination: a repeat within the
/// window is not sent again and gets the first one's outcome. A send that was refused is not
/// remembered (nothing went out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dedupe {
    /// The sender's `client_msg_id`, remembered for [`MessageSettings::dedupe_window`].
    Client(String),
    /// The router's own id for a message that has none, so that its retries of a batch whose
    /// outcome it could not learn never send a message twice. Remembered for [`RETRY_DEDUPE`];
    /// a backend whose sends cannot fail may ignore it.
    Retry(String),
}

/// How long a router id is remembered. The router retries within `PRESENCE_SEND_RETRY_MS`, and a
/// lost attempt that still runs later does so right before the retries queued behind it (one
/// connection, in order) or when the client replays it after reconnecting, seconds later; the
/// window counts from when the first copy runs. Short, because every message without a
/// `client_msg_id` leaves one key behind for this long: 197 bytes of Redis memory each, and the
/// key's GET and SET cost `private_send.lua` 9-12 us more per call (18.6-23.6 -> 27.8-31.3 us,
/// `redis-benchmark -P 16` of EVALSHA on one redis-server, on a busy 2-core machine).
pub const RETRY_DEDUPE: Duration = Duration::from_secs(30);

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
    /// True when this is an earlier send's outcome (same [`Dedupe`] id): nothing was sent now.
    pub duplicate: bool,
}

impl SendOutcome {
    pub fn new(msg_id: String, result: RouteResult, delivered: u64, stored: u64) -> Self {
        SendOutcome {
            msg_id,
            result,
            delivered,
            stored,
            duplicate: false,
        }
    }

    /// The outcome of a repeat: the first send's, marked as a duplicate.
    pub fn repeated(self) -> Self {
        SendOutcome {
            duplicate: true,
            ..self
        }
    }
}

/// Why a message was not routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendRefused {
    #[error("only members may send to this group")]
    NotMember,
    #[error("over the budget of messages stored for offline users; try again later")]
    StoreQuota,
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
    /// How long a stored private message waits for its recipient.
    pub offline_ttl: Duration,
    /// How long a `client_msg_id` is remembered (`PRESENCE_DEDUPE_SECS`).
    pub dedupe_window: Duration,
    /// Remembered sends the embedded backend keeps at most (oldest forgotten first); Redis keeps
    /// one key per send, which expires.
    pub dedupe_max: usize,
}
