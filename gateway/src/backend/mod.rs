//! The backend: where presence, messages, tokens and the node registry live, and how events
//! reach every node. Each role is a small trait in a file of its own whose doc states its contract;
//! two implementations keep them all: `memory/` (embedded, one node, nothing to install) and
//! `redis/` (many nodes on Redis or Redis Cluster). `app.rs` picks one, once, and hands each
//! consumer only the roles it uses ([`Roles`]).

pub mod events;
pub mod groups;
pub mod health;
pub mod memory;
pub mod messages;
pub mod presence;
pub mod redis;
pub mod registry;
pub mod sessions;
pub mod tokens;
pub mod webhooks;

use std::{sync::Arc, time::Duration};

pub use events::{Audience, BackendEvent, Delivery, EventSink, Origin, Subscriptions, Topic};
pub use groups::{
    Added, GroupInfo, Groups, JoinPolicy, MAX_GROUP_SCAN, online_members, too_many_groups,
};
pub use health::Health;
pub use memory::MemoryBackend;
pub use messages::{
    Dedupe, MessageSettings, MessageStore, Outgoing, RETRY_DEDUPE, SendOutcome, SendRefused,
};
pub use presence::{
    Changed, Counts, IndexRepair, PresenceStore, PresenceWrite, Renewal, WebhookWritten,
};
pub use redis::{RedisBackend, RedisTarget};
pub use registry::{NodeInfo, Registry, handover_name};
pub use sessions::{ConnectState, ConnectionInfo, Control, Sessions};
pub use tokens::{TokenClaims, TokenStore};
pub use webhooks::{ClaimedWebhook, Enqueued, QueuedWebhook, ReclaimCursor, WebhookQueue};

/// Every role together: what an implementation provides. Only `app.rs` sees a whole backend.
pub trait Backend:
    PresenceStore
    + Subscriptions
    + Registry
    + TokenStore
    + Groups
    + MessageStore
    + Sessions
    + WebhookQueue
{
    /// `embedded` or `redis`, for logs and metrics.
    fn kind(&self) -> &'static str;

    /// The circuit: whether the backend is reachable, as the node last found out.
    fn health(&self) -> Health;
}

/// A backend split into the roles its consumers receive.
#[derive(Clone)]
pub struct Roles {
    pub kind: &'static str,
    pub health: Health,
    pub presence: Arc<dyn PresenceStore>,
    pub subscriptions: Arc<dyn Subscriptions>,
    pub registry: Arc<dyn Registry>,
    pub tokens: Arc<dyn TokenStore>,
    pub groups: Arc<dyn Groups>,
    pub messages: Arc<dyn MessageStore>,
    pub sessions: Arc<dyn Sessions>,
    pub webhooks: Arc<dyn WebhookQueue>,
}

impl Roles {
    pub fn of<B: Backend>(backend: Arc<B>) -> Self {
        Roles {
            kind: backend.kind(),
            health: backend.health(),
            presence: backend.clone(),
            subscriptions: backend.clone(),
            registry: backend.clone(),
            tokens: backend.clone(),
            groups: backend.clone(),
            messages: backend.clone(),
            sessions: backend.clone(),
            webhooks: backend,
        }
    }
}

/// What kind of failure a backend call met; callers match on it (retry, HTTP status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The backend could not be reached or did not answer in time: retry later.
    Unavailable,
    /// The backend answered with something this node cannot use (a bug, or data it did not
    /// write): retrying will not help.
    Internal,
}

/// Why a backend call failed. Callers keep their work and retry: nothing here is fatal.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {op}{}", kind_text(.kind), source_text(.source))]
pub struct BackendError {
    kind: ErrorKind,
    /// The operation that failed (`flush`, `send`, …), as in the metrics' `op` label.
    op: &'static str,
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    /// True when the call failed before anything of it reached the backend, so it surely did
    /// not apply (a write may be repeated without doubling it); false when it may have.
    not_sent: bool,
}

fn kind_text(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Unavailable => "backend unavailable",
        ErrorKind::Internal => "backend error",
    }
}

fn source_text(source: &Option<Arc<dyn std::error::Error + Send + Sync>>) -> String {
    source
        .as_ref()
        .map(|s| format!(": {s}"))
        .unwrap_or_default()
}

impl BackendError {
    pub fn unavailable(
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::new(ErrorKind::Unavailable, op, Some(source.into()))
    }

    /// An `Unavailable` call known not to have reached the backend (refused before sending).
    pub fn not_sent(
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        BackendError {
            not_sent: true,
            ..Self::unavailable(op, source)
        }
    }

    pub fn internal(
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::new(ErrorKind::Internal, op, Some(source.into()))
    }

    fn new(
        kind: ErrorKind,
        op: &'static str,
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        BackendError {
            kind,
            op,
            source: source.map(Arc::from),
            not_sent: false,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn op(&self) -> &'static str {
        self.op
    }

    /// Whether the failed call surely did not apply (see [`BackendError::not_sent`]).
    pub fn is_not_sent(&self) -> bool {
        self.not_sent
    }
}

/// Settings every backend needs.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    /// Expiry of a node's presence entries; the node renews them every third of it.
    pub presence_ttl: Duration,
    /// Expiry of a node's registry entry without heartbeats; after it, the node counts as dead.
    pub node_ttl: Duration,
    pub messages: MessageSettings,
    /// `PRESENCE_MAX_GROUPS_PER_USER`: [`Groups::add_member`] refuses a user already in this
    /// many groups.
    pub max_groups_per_user: usize,
    /// Set when webhooks are on: a backend that can (one Redis) queues each transition's event
    /// in the same atomic write as the transition, so no crash falls between them.
    pub webhooks: Option<WebhookWrites>,
}

/// What a write needs to queue a transition's webhook event itself.
#[derive(Debug, Clone)]
pub struct WebhookWrites {
    /// The reporting node (the event's `node`): this node, also when it reaps a dead one.
    pub node: Arc<str>,
    /// `PRESENCE_WEBHOOK_QUEUE_MAX`: past it the event is refused.
    pub queue_max: usize,
}

/// Message ids: `<ms, 13 digits>-<sequence per destination, 10 digits>`. They sort as strings in
/// send order, read back as Redis stream ids, and the sequence counts messages, so unread counts
/// need no scan.
pub fn msg_id(ms: u64, seq: u64) -> String {
    format!("{ms:013}-{seq:010}")
}

/// The (ms, seq) of a message id; `None` for anything else. Digits only: `u64::from_str` also
/// takes a leading `+`, which Redis does not take in a stream id.
pub fn parse_msg_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    let digits = |part: &str| {
        !part.is_empty() && part.len() <= 20 && part.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(ms) || !digits(seq) {
        return None;
    }
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The read position a `read` up to `up_to` asks for, given the group's last message `(ms, seq)`
/// (`None`: no message yet, so no position). An id later than the last message in time or in
/// sequence becomes the last message's: a position ahead of it would hide the messages sent
/// until the clock (or the count) caught up, and unread counts go by sequence while `sync`
/// goes by id, so both parts must stay within the last message for the two to agree. The
/// position is written in the canonical form, which sorts as a string. `None` too for a
/// malformed `up_to`.
pub fn clamp_read_position(up_to: &str, last: Option<(u64, u64)>) -> Option<String> {
    let (ms, seq) = parse_msg_id(up_to)?;
    let (last_ms, last_seq) = last.filter(|&(_, seq)| seq > 0)?;
    Some(if ms > last_ms || seq > last_seq {
        msg_id(last_ms, last_seq)
    } else {
        msg_id(ms, seq)
    })
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
        assert_eq!(parse_msg_id("+1-2"), None);
        assert_eq!(parse_msg_id("1-+2"), None);
    }

    #[test]
    fn read_positions_clamp_to_the_last_message() {
        let last = Some((1_700_000_000_000, 7));
        let clamp = |up_to| clamp_read_position(up_to, last);
        assert_eq!(
            clamp("1700000000000-0000000003").as_deref(),
            Some("1700000000000-0000000003")
        );
        assert_eq!(
            clamp("1700000000000-3").as_deref(),
            Some("1700000000000-0000000003")
        );
        let last_id = Some(msg_id(1_700_000_000_000, 7));
        assert_eq!(clamp("9999999999999-0000000001"), last_id, "later in time");
        assert_eq!(
            clamp("1600000000000-0000000008"),
            last_id,
            "later in sequence"
        );
        assert_eq!(clamp("18446744073709551615-18446744073709551615"), last_id);
        assert_eq!(clamp("x"), None);
        assert_eq!(
            clamp("99999999999999999999-1"),
            None,
            "beyond u64: malformed"
        );
        assert_eq!(clamp_read_position("1-1", None), None, "no message yet");
        assert_eq!(clamp_read_position("1-1", Some((5, 0))), None);
    }
}
