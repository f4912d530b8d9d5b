//! Shard workers: each owns the local state of the users hashed onto it (their connections here,
//! who here watches them, what this node last wrote for them) and batches their presence changes
//! to the backend. Everyone else holds a [`Shards`] handle and sends commands.

mod route;
mod worker;

pub use route::route_events;

use std::{sync::Arc, time::Duration};

use shared::shard::shard_of;
use tokio::sync::{mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    backend::{ConnectionInfo, Control, Delivery, MessageStore, PresenceStore, Subscriptions},
    conn_handle::{ConnHandle, ConnId},
    frame::EncodedFrame,
    hooks::ChangeHooks,
    presence::{ChosenStatus, PresenceRecord},
};

/// Commands a shard worker understands; every trigger of per-user state change is one of these.
pub enum ShardCmd {
    /// A connection of one of this shard's users opened. Answers false when the user already has
    /// `max_conns_per_user` connections here. Otherwise the shard queues `welcome` to it before
    /// anything else can be.
    Connect {
        conn: Arc<ConnHandle>,
        welcome: Arc<EncodedFrame>,
        /// Stored private messages, queued right after `welcome`.
        offline: Vec<Arc<EncodedFrame>>,
        /// The user's groups: the connection follows each from the start.
        groups: Vec<String>,
        reply: oneshot::Sender<bool>,
    },
    /// A connection closed; always sent, whatever ended it.
    Disconnect { user: String, conn: ConnId },
    /// The node is draining with a handover: from now on a closing connection takes nothing
    /// from this node's entry of its user (it is handed over to expiry at shutdown), so a user
    /// the drain closes and who reconnects elsewhere never shows offline.
    Drain,
    /// A connection that had been idle for `idle_away` saw activity again.
    Active { user: String },
    /// The user chose a status.
    SetStatus { user: String, status: ChosenStatus },
    /// `conn` wants `users`' presence events (all of them on this shard). `confirmed` fires
    /// once their events reach this node (a `presence_list` read after it misses no change).
    Watch {
        users: Vec<String>,
        conn: Arc<ConnHandle>,
        confirmed: Option<oneshot::Sender<()>>,
    },
    /// `conn` no longer wants `users`' presence events.
    Unwatch { users: Vec<String>, conn: ConnId },
    /// A presence change from the backend (this node's or another's); `public_changed` when
    /// others see it change too.
    Presence {
        record: PresenceRecord,
        public_changed: bool,
    },
    /// The backend may have lost this node's entries, and events may have been lost: rewrite
    /// them all now, and re-read what local connections watch once other nodes had time to.
    Resync,
    /// Events stopped arriving (the subscriber lost its connection): note where each group's
    /// gap starts, for the re-read after the `Resync` that ends it.
    Gap,
    /// A re-read of watched users' presence (the shard's own, from a task of its own).
    Reread(Reread),
    /// A message for local connections of a user of this shard, of a group of this shard, or of
    /// everyone on this shard.
    Deliver(Arc<Delivery>),
    /// The app backend acts on a user of this shard: their matching connections here close.
    Control { user: String, control: Control },
    /// This node's connections of a user of this shard, as the app backend lists them.
    Connections {
        user: String,
        reply: oneshot::Sender<Vec<ConnectionInfo>>,
    },
    /// A user of this shard joined or left a group: their connections here follow.
    Membership {
        user: String,
        group: String,
        joined: bool,
    },
    /// A client joined or left a group: `conn` (of a user of this shard) follows it or stops.
    /// `done` fires once the group's shard has the change queued.
    Follow {
        conn: Arc<ConnHandle>,
        group: String,
        joined: bool,
        /// Pass on the group's messages after this id sent before the attach.
        since: Option<String>,
        done: oneshot::Sender<()>,
    },
    /// `conn` gets this group's messages (the group is on this shard).
    GroupAttach {
        group: String,
        conn: Arc<ConnHandle>,
        since: Option<String>,
    },
    /// `conn` no longer gets this group's messages.
    GroupDetach { group: String, conn: ConnId },
}

/// What a shard's re-read task reports back.
pub enum Reread {
    /// Records read no earlier than `read_at` (ms, taken before the read was sent).
    Records {
        records: Vec<PresenceRecord>,
        read_at: u64,
    },
    /// A group's history from the starts of its gaps, as read `read` found it.
    Group {
        group: String,
        messages: Vec<shared::Message>,
        read: u64,
    },
    /// This node now hears `group`'s messages (its first local member attached): what was sent
    /// between the attach and the subscription is read from history.
    Subscribed { group: String },
    /// Messages a connection that followed its group late missed.
    Backfill {
        conn: Arc<ConnHandle>,
        messages: Vec<shared::Message>,
    },
    /// The fill `read` of a group failed: its gaps wait for the next read.
    Failed { read: u64 },
    /// Re-read `read` ended; not `ok` means it failed part-way and is tried again.
    Finished { ok: bool, read: u64 },
}

/// The backend roles a shard worker uses.
#[derive(Clone)]
pub struct ShardBackend {
    pub presence: Arc<dyn PresenceStore>,
    pub subscriptions: Arc<dyn Subscriptions>,
    /// Group history, read after events were lost.
    pub messages: Arc<dyn MessageStore>,
}

/// Tunables of a shard worker.
#[derive(Debug, Clone)]
pub struct ShardSettings {
    pub node: Arc<str>,
    pub batch_max: usize,
    pub batch_interval: Duration,
    /// Flushes a shard may start before its batch is due, for urgent changes, per second.
    pub early_flushes_per_sec: u32,
    pub renew_interval: Duration,
    pub idle_away: Duration,
    pub max_conns_per_user: usize,
    pub mailbox: usize,
}

/// A cloneable handle on every shard of the node.
#[derive(Clone)]
pub struct Shards {
    senders: Arc<[mpsc::Sender<ShardCmd>]>,
}

impl Shards {
    /// Starts `count` workers on `tracker`. They stop, after a last flush, once `stop` is
    /// cancelled and their mailboxes are drained.
    pub fn spawn(
        count: usize,
        settings: ShardSettings,
        backend: ShardBackend,
        hooks: ChangeHooks,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Shards {
        let (senders, mailboxes): (Vec<_>, Vec<_>) =
            (0..count).map(|_| mpsc::channel(settings.mailbox)).unzip();
        let shards = Shards {
            senders: senders.into(),
        };
        for (index, mailbox) in mailboxes.into_iter().enumerate() {
            let worker = worker::Worker::new(
                index,
                settings.clone(),
                backend.clone(),
                hooks.clone(),
                shards.clone(),
                mailbox,
            );
            tracker.spawn(worker.run(stop.clone()));
        }
        shards
    }

    pub fn count(&self) -> usize {
        self.senders.len()
    }

    /// Commands waiting in each shard's mailbox, in shard order, as of now.
    pub fn queue_depths(&self) -> impl Iterator<Item = usize> + '_ {
        self.senders
            .iter()
            .map(|tx| tx.max_capacity() - tx.capacity())
    }

    /// Commands one shard's mailbox holds before senders wait.
    pub fn mailbox_capacity(&self) -> usize {
        self.senders.first().map_or(0, |tx| tx.max_capacity())
    }

    /// The shard that owns `key`.
    pub fn index_of(&self, key: &str) -> usize {
        shard_of(key, self.senders.len())
    }

    /// Sends to the shard owning `key`, waiting for room. False only once the shard has stopped.
    pub async fn send(&self, key: &str, cmd: ShardCmd) -> bool {
        self.send_to(self.index_of(key), cmd).await
    }

    pub async fn send_to(&self, index: usize, cmd: ShardCmd) -> bool {
        match self.senders.get(index) {
            Some(tx) => tx.send(cmd).await.is_ok(),
            None => false,
        }
    }

    /// Makes `conn` follow (or stop following) a group; returns once the group's shard has it
    /// queued (at once if the node is stopping). With `since` (a message id), the connection also
    /// gets the group's messages after it that were sent before it was attached (it follows
    /// late: it connected while the backend was away).
    pub async fn follow(
        &self,
        conn: &Arc<ConnHandle>,
        group: &str,
        joined: bool,
        since: Option<String>,
    ) {
        let (done, queued) = oneshot::channel();
        let cmd = ShardCmd::Follow {
            conn: conn.clone(),
            group: group.to_string(),
            joined,
            since,
            done,
        };
        if self.send(&conn.user, cmd).await {
            let _ = queued.await;
        }
    }

    /// Passes a command from one shard to another without waiting: shards never wait on each
    /// other (two full mailboxes would deadlock). Order is kept unless the target's mailbox is
    /// full, when a task waits for room. `done` fires once the command is queued.
    pub(crate) fn forward(&self, index: usize, cmd: ShardCmd, done: Option<oneshot::Sender<()>>) {
        let Some(tx) = self.senders.get(index) else {
            return;
        };
        match tx.try_send(cmd) {
            Ok(()) => {
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            Err(mpsc::error::TrySendError::Full(cmd)) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(cmd).await;
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Tells every shard the node is draining (see [`ShardCmd::Drain`]); returns once each has
    /// it queued, so it comes before any close the drain causes.
    pub async fn drain(&self) {
        for index in 0..self.senders.len() {
            self.send_to(index, ShardCmd::Drain).await;
        }
    }

    /// Groups `users` by owning shard.
    pub fn partition(&self, users: Vec<String>) -> Vec<(usize, Vec<String>)> {
        let mut parts: Vec<Vec<String>> = vec![Vec::new(); self.senders.len()];
        for user in users {
            let index = self.index_of(&user);
            parts[index].push(user);
        }
        parts
            .into_iter()
            .enumerate()
            .filter(|(_, users)| !users.is_empty())
            .collect()
    }
}
