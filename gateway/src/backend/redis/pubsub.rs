//! Everything a node hears from other nodes comes through the subscriber: presence events of
//! watched users (`P:ev:{u}`), inboxes of locally connected users (`P:uc:{u}`), groups with local
//! members (`P:gm:{g}`), and broadcasts. A node subscribes only to what its own clients need, and
//! every publish is one command whatever the number of nodes.

use std::{collections::HashSet, time::Duration};

use fred::{clients::SubscriberClient, prelude::*};
use futures_util::future::join_all;
use tokio::sync::{
    broadcast::error::{RecvError, TryRecvError},
    mpsc, oneshot,
};
use tokio_util::sync::CancellationToken;

use super::RedisBackend;
use super::{
    envelope::{self, Published},
    keys::{ChannelKind, Keys},
    record,
};
use crate::{
    backend::{Audience, BackendEvent, Delivery, EventSink, Subscriptions, Topic},
    metrics as m,
};

/// Channels to start or stop hearing.
pub enum SubCmd {
    Watch(Vec<String>),
    Unwatch(Vec<String>),
    /// Fire the sender once these channels are all subscribed (sent right after their `Watch`).
    Confirm(Vec<String>, oneshot::Sender<()>),
}

/// Channels per SUBSCRIBE call (one call per channel on a cluster, where each channel lives in
/// its own slot).
const CHUNK: usize = 500;

/// Keeps the subscriber's channels equal to the wanted ones, retrying what Redis refused. Only
/// pending changes are tracked, so each command costs O(channels it names), not O(channels
/// subscribed); a reconnect of the subscriber makes every channel pending again.
///
/// This task, not fred's `manage_subscriptions`, resubscribes after a reconnect: fred's stops at
/// the first refused SSUBSCRIBE and never tries again, and during a Redis Cluster failover the
/// slots of the dead master refuse until its replica has taken over, so a node lost the presence
/// events of a third of its watched users for good (`faults::cluster_failover_*`).
pub async fn run_subscriptions(
    subscriber: SubscriberClient,
    cluster: bool,
    mut commands: mpsc::UnboundedReceiver<SubCmd>,
    events: EventSink,
    gaps: mpsc::Sender<oneshot::Sender<()>>,
    stop: CancellationToken,
) {
    let mut subscribed: HashSet<String> = HashSet::new();
    // Set by a reconnect or a refused subscribe: once every channel is subscribed (again), the
    // shards re-read what was published in the gap (presence of watched users, group history).
    let mut resync_due = false;
    // Who waits for which channels to be subscribed (`Subscriptions::watch_confirmed`).
    let mut waiters: Vec<(Vec<String>, oneshot::Sender<()>)> = Vec::new();
    // A `Gap` was sent for the current outage (until the subscriber reconnects).
    let mut gap_open = false;
    let mut pending = Pending::default();
    let mut retry = false;
    let mut reconnects = subscriber.reconnect_rx();
    let mut errors = subscriber.error_rx();
    loop {
        let first = tokio::select! {
            e = errors.recv() => {
                if matches!(e, Err(RecvError::Closed)) {
                    break;
                }
                // Connection errors only (fred broadcasts those here); one `Gap` per outage.
                if !gap_open && !announce_gap(&gaps).await {
                    break;
                }
                gap_open = true;
                None
            }
            c = commands.recv() => match c { Some(c) => Some(c), None => break },
            r = reconnects.recv() => {
                if matches!(r, Err(RecvError::Closed)) {
                    break;
                }
                // A reconnect is a gap whether or not an error announced one: a re-read started
                // meanwhile by another resync (the command client's reconnect, the probe) may
                // have read and closed that gap while this subscriber was still away. Nothing has
                // been heard since the old connection's last message, so the gap opens exactly
                // where it must. After it, the next error starts another (Redis may go away again
                // before the resync is sent).
                if !announce_gap(&gaps).await {
                    break;
                }
                gap_open = false;
                let again = pending.resubscribe(&mut subscribed);
                tracing::info!(channels = again, "subscriber reconnected: subscribing again");
                resync_due = true;
                None
            }
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry => None,
            _ = stop.cancelled() => break,
        };
        let mut take = |cmd| match cmd {
            SubCmd::Confirm(channels, tx) => waiters.push((channels, tx)),
            cmd => pending.apply(cmd, &subscribed),
        };
        if let Some(cmd) = first {
            take(cmd);
        }
        while let Ok(cmd) = commands.try_recv() {
            take(cmd);
        }
        retry = false;
        let add: Vec<String> = pending.add.drain().collect();
        for channels in add.chunks(CHUNK) {
            let ok = if cluster {
                join_all(channels.iter().map(|c| subscriber.ssubscribe(c.clone())))
                    .await
                    .into_iter()
                    .all(|r| r.is_ok())
            } else {
                subscriber.subscribe(channels.to_vec()).await.is_ok()
            };
            if ok {
                subscribed.extend(channels.iter().cloned());
            } else {
                metrics::counter!(m::BACKEND_ERRORS, "op" => "subscribe").increment(1);
                pending.add.extend(channels.iter().cloned());
                retry = true;
                // What these channels carried until they are subscribed is lost: re-read then.
                resync_due = true;
            }
        }
        let remove: Vec<String> = pending.remove.drain().collect();
        for channels in remove.chunks(CHUNK) {
            let ok = if cluster {
                join_all(channels.iter().map(|c| subscriber.sunsubscribe(c.clone())))
                    .await
                    .into_iter()
                    .all(|r| r.is_ok())
            } else {
                subscriber.unsubscribe(channels.to_vec()).await.is_ok()
            };
            if ok {
                channels.iter().for_each(|c| {
                    subscribed.remove(c);
                });
            } else {
                pending.remove.extend(channels.iter().cloned());
                retry = true;
            }
        }
        // Waiters whose channels are all subscribed now are told; those nobody waits for any
        // more (their request gave up) or whose channels are no longer wanted (unwatched
        // before Redis confirmed them) are dropped unanswered, so the list stays bounded.
        for (mut channels, tx) in std::mem::take(&mut waiters) {
            channels.retain(|c| !subscribed.contains(c));
            if channels.is_empty() {
                let _ = tx.send(());
            } else if !tx.is_closed() && channels.iter().all(|c| pending.add.contains(c)) {
                waiters.push((channels, tx));
            }
        }
        if resync_due && pending.add.is_empty() {
            resync_due = false;
            gap_open = false;
            if events.send(BackendEvent::Resync).await.is_err() {
                break;
            }
        }
    }
}

/// Has the message task pass on what the lost connection delivered, then the `Gap`, and waits
/// for it, so nothing is resubscribed before. Sent from here, the `Gap` could overtake a message
/// the old connection delivered just before it died: that message then ended the gap, and one
/// sent while the node was not subscribed fell outside it and was never re-read (`chaos_short`,
/// about one run in thirty). fred broadcasts every message a connection read before the error
/// of its end, so what the message task holds when asked is all the old connection carried.
async fn announce_gap(gaps: &mpsc::Sender<oneshot::Sender<()>>) -> bool {
    let (done, announced) = oneshot::channel();
    gaps.send(done).await.is_ok() && announced.await.is_ok()
}

/// Subscription changes not yet made.
#[derive(Default)]
struct Pending {
    add: HashSet<String>,
    remove: HashSet<String>,
}

impl Pending {
    /// After a reconnect the server may have forgotten every channel: all subscribed ones are
    /// subscribed again (repeating SUBSCRIBE for a live one changes nothing), except those being
    /// unsubscribed anyway. Returns how many.
    fn resubscribe(&mut self, subscribed: &mut HashSet<String>) -> usize {
        let before = self.add.len();
        let remove = &self.remove;
        self.add
            .extend(subscribed.extract_if(|c| !remove.contains(c)));
        self.add.len() - before
    }

    fn apply(&mut self, cmd: SubCmd, subscribed: &HashSet<String>) {
        match cmd {
            SubCmd::Watch(channels) => {
                for c in channels {
                    self.remove.remove(&c);
                    if !subscribed.contains(&c) {
                        self.add.insert(c);
                    }
                }
            }
            SubCmd::Unwatch(channels) => {
                for c in channels {
                    self.add.remove(&c);
                    if subscribed.contains(&c) {
                        self.remove.insert(c);
                    }
                }
            }
            // Taken by the loop before it gets here.
            SubCmd::Confirm(..) => {}
        }
    }
}

/// Turns subscriber messages into backend events for the node, and announces each `Gap` in
/// their order (`announce_gap`).
pub async fn run_messages(
    subscriber: SubscriberClient,
    keys: Keys,
    events: EventSink,
    mut gaps: mpsc::Receiver<oneshot::Sender<()>>,
    stop: CancellationToken,
) {
    let mut messages = subscriber.message_rx();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            message = messages.recv() => {
                if !forward(&keys, &events, message).await {
                    break;
                }
            }
            gap = gaps.recv() => {
                let Some(done) = gap else { break };
                let drained = loop {
                    let message = match messages.try_recv() {
                        Ok(message) => Ok(message),
                        Err(TryRecvError::Empty) => break true,
                        Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                        Err(TryRecvError::Closed) => Err(RecvError::Closed),
                    };
                    if !forward(&keys, &events, message).await {
                        break false;
                    }
                };
                if !drained || events.send(BackendEvent::Gap).await.is_err() {
                    break;
                }
                let _ = done.send(());
            }
        }
    }
}

/// Passes one subscriber message on; false once the node stopped listening.
async fn forward(
    keys: &Keys,
    events: &EventSink,
    message: Result<fred::types::Message, RecvError>,
) -> bool {
    match message {
        Ok(message) => {
            metrics::counter!(m::PUBSUB_MESSAGES, "direction" => "in").increment(1);
            let Some(payload) = message.value.as_bytes() else {
                return true;
            };
            let event = keys
                .classify(&message.channel)
                .and_then(|kind| to_event(kind, payload));
            match event {
                Some(event) => events.send(event).await.is_ok(),
                None => {
                    tracing::warn!(channel = %message.channel, "unreadable pub/sub message");
                    true
                }
            }
        }
        Err(RecvError::Lagged(n)) => {
            metrics::counter!(m::BACKEND_ERRORS, "op" => "pubsub_lagged").increment(n);
            tracing::warn!(
                missed = n,
                "pub/sub messages dropped: the node read them too slowly; re-reading presence"
            );
            // Lost presence events are repaired by the shards' re-read (lost messages are
            // not: they stay in group history and stored messages).
            events.send(BackendEvent::Resync).await.is_ok()
        }
        Err(RecvError::Closed) => false,
    }
}

fn to_event(kind: ChannelKind<'_>, payload: &[u8]) -> Option<BackendEvent> {
    let delivery = |audience, message, origin| {
        BackendEvent::Message(Delivery {
            audience,
            message,
            origin,
        })
    };
    match kind {
        ChannelKind::Presence(user) => {
            let (record, public_changed) =
                record::parse_payload(std::str::from_utf8(payload).ok()?)?;
            (record.user == user).then_some(BackendEvent::Presence {
                record,
                public_changed,
            })
        }
        ChannelKind::Inbox(user) => match envelope::parse_published(payload)? {
            Published::Message(message, origin) => {
                Some(delivery(Audience::User(user.to_string()), message, origin))
            }
            Published::Joined(group) => Some(BackendEvent::Membership {
                user: user.to_string(),
                group,
                joined: true,
            }),
            Published::Left(group) => Some(BackendEvent::Membership {
                user: user.to_string(),
                group,
                joined: false,
            }),
            Published::Control(control) => Some(BackendEvent::Control {
                user: user.to_string(),
                control,
            }),
        },
        ChannelKind::Group(group) => match envelope::parse_published(payload)? {
            Published::Message(message, origin) => Some(delivery(
                Audience::Group(group.to_string()),
                message,
                origin,
            )),
            _ => None,
        },
        ChannelKind::Broadcast => match envelope::parse_published(payload)? {
            Published::Message(message, origin) => Some(delivery(Audience::All, message, origin)),
            _ => None,
        },
    }
}

impl Subscriptions for RedisBackend {
    fn watch(&self, topics: Vec<Topic>) {
        let channels = topics.iter().map(|t| self.channel(t)).collect();
        let _ = self.subscriptions.send(SubCmd::Watch(channels));
    }

    fn watch_confirmed(&self, topics: Vec<Topic>, confirmed: oneshot::Sender<()>) {
        let channels: Vec<String> = topics.iter().map(|t| self.channel(t)).collect();
        let _ = self.subscriptions.send(SubCmd::Watch(channels.clone()));
        let _ = self
            .subscriptions
            .send(SubCmd::Confirm(channels, confirmed));
    }

    fn unwatch(&self, topics: Vec<Topic>) {
        let channels = topics.iter().map(|t| self.channel(t)).collect();
        let _ = self.subscriptions.send(SubCmd::Unwatch(channels));
    }
}

impl RedisBackend {
    fn channel(&self, topic: &Topic) -> String {
        match topic {
            Topic::Presence(user) => self.keys.user_channel(user),
            Topic::Inbox(user) => self.keys.inbox_channel(user),
            Topic::Group(group) => self.keys.group_channel(group),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_changes_cancel_out_and_skip_what_is_done() {
        let subscribed: HashSet<String> = ["a".to_string()].into();
        let mut p = Pending::default();
        p.apply(SubCmd::Watch(vec!["a".into(), "b".into()]), &subscribed);
        assert_eq!(p.add, ["b".to_string()].into());
        p.apply(SubCmd::Unwatch(vec!["b".into(), "a".into()]), &subscribed);
        assert!(p.add.is_empty());
        assert_eq!(p.remove, ["a".to_string()].into());
        p.apply(SubCmd::Watch(vec!["a".into()]), &subscribed);
        assert!(p.remove.is_empty() && p.add.is_empty());
    }

    #[test]
    fn a_reconnect_makes_every_kept_channel_pending_again() {
        let mut subscribed: HashSet<String> = ["a".into(), "b".into(), "c".into()].into();
        let mut p = Pending::default();
        p.apply(SubCmd::Unwatch(vec!["c".into()]), &subscribed);
        assert_eq!(p.resubscribe(&mut subscribed), 2);
        assert_eq!(p.add, ["a".to_string(), "b".to_string()].into());
        // The channel being unsubscribed stays known, so its SUNSUBSCRIBE still runs.
        assert_eq!(subscribed, ["c".to_string()].into());
    }
}
