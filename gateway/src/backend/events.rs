//! The subscriptions role: which topics this node hears, and the events the backend hands it.
//! A node hears only what its own connections need; everything comes through one [`EventSink`].

use serde::{Deserialize, Serialize};
use shared::Message;
use tokio::sync::mpsc;

use super::Control;
use crate::presence::PresenceRecord;

/// What a node can listen to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// A user's presence changes (someone here subscribed to them).
    Presence(String),
    /// A user's private messages, the sender copies of their own, and their membership changes
    /// (they have a connection here).
    Inbox(String),
    /// A group's messages (a member has a connection here).
    Group(String),
}

/// Listening, per topic: a set, not a count. Each topic has one owner on a node (the shard of
/// its user or group), which watches it once and unwatches it once.
///
/// - `watch` and `unwatch` never block: the backend queues the work, and retries it while the
///   backend is away, so a watch made during an outage takes effect when it returns.
/// - After `watch(t)` returns, every event of `t` published from then on reaches the
///   [`EventSink`] (on Redis: once the SUBSCRIBE is acknowledged, a few ms later), in publish
///   order per topic; after `unwatch(t)`, none do. Watching a watched topic changes nothing.
/// - Delivery is at most once: an event published while the backend is unreachable is lost, and
///   the backend sends [`BackendEvent::Resync`] when it is back.
pub trait Subscriptions: Send + Sync + 'static {
    fn watch(&self, topics: Vec<Topic>);
    fn unwatch(&self, topics: Vec<Topic>);

    /// `watch`, and `confirmed` fires once every event of `topics` published from then on will
    /// arrive (on Redis: each SUBSCRIBE is acknowledged), so a read made after it misses
    /// nothing in between. Dropped unfired if that does not happen (the topic was unwatched).
    fn watch_confirmed(&self, topics: Vec<Topic>, confirmed: tokio::sync::oneshot::Sender<()>) {
        self.watch(topics);
        let _ = confirmed.send(());
    }
}

/// What the backend tells the node, in the order it happened per topic.
#[derive(Debug, Clone)]
pub enum BackendEvent {
    /// A watched user's presence changed (visibly: status, platforms or text), for others too
    /// when `public_changed` (else only the user's own view moved).
    Presence {
        record: PresenceRecord,
        public_changed: bool,
    },
    /// The backend lost, or may have lost, what this node wrote (Redis came back after an outage,
    /// possibly empty): every shard must rewrite its local presence at once.
    Resync,
    /// The subscriber lost its connection: what is published from now until the `Resync` that
    /// follows its resubscription does not arrive. Shards note where each group's gap starts.
    Gap,
    /// A message for local connections: of `user` (private messages and the sender's copies), of
    /// members of `group`, or of everyone.
    Message(Delivery),
    /// `user` joined or left `group`: their connections here start or stop getting its messages.
    Membership {
        user: String,
        group: String,
        joined: bool,
    },
    /// The app backend acts on `user`'s connections ([`super::Sessions::control`]).
    Control { user: String, control: Control },
}

/// Where a backend sends its events. The node routes them to the shard owning each user.
pub type EventSink = mpsc::Sender<BackendEvent>;

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
