//! Presence events between nodes: a node subscribes to the event channel of each user its clients
//! watch (SUBSCRIBE, or SSUBSCRIBE on a cluster), and turns messages into backend events. Redis work
//! per presence change is one PUBLISH from the write script, whatever the number of nodes.

use std::{collections::HashSet, time::Duration};

use fred::{clients::SubscriberClient, prelude::*};
use futures_util::future::join_all;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_util::sync::CancellationToken;

use super::{keys::Keys, record};
use crate::{
    backend::{BackendEvent, EventSink},
    metrics as m,
};

pub enum SubCmd {
    Watch(Vec<String>),
    Unwatch(Vec<String>),
}

/// Channels per SUBSCRIBE call (one call per channel on a cluster, where each user's channel
/// lives in its own slot).
const CHUNK: usize = 500;

/// Keeps the subscriber's channels equal to the watched users, retrying what Redis refused (fred
/// only remembers, and resubscribes after a reconnect, what succeeded).
pub async fn run_subscriptions(
    subscriber: SubscriberClient,
    keys: Keys,
    cluster: bool,
    mut commands: mpsc::UnboundedReceiver<SubCmd>,
    stop: CancellationToken,
) {
    let mut wanted: HashSet<String> = HashSet::new();
    let mut subscribed: HashSet<String> = HashSet::new();
    let mut retry = false;
    loop {
        let first = tokio::select! {
            c = commands.recv() => match c { Some(c) => Some(c), None => break },
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry => None,
            _ = stop.cancelled() => break,
        };
        let mut apply = |cmd: SubCmd| match cmd {
            SubCmd::Watch(users) => wanted.extend(users),
            SubCmd::Unwatch(users) => users.iter().for_each(|u| {
                wanted.remove(u);
            }),
        };
        if let Some(cmd) = first {
            apply(cmd);
        }
        while let Ok(cmd) = commands.try_recv() {
            apply(cmd);
        }
        let add: Vec<String> = wanted.difference(&subscribed).cloned().collect();
        let remove: Vec<String> = subscribed.difference(&wanted).cloned().collect();
        retry = false;
        for users in add.chunks(CHUNK) {
            let channels: Vec<String> = users.iter().map(|u| keys.user_channel(u)).collect();
            let ok = if cluster {
                join_all(channels.into_iter().map(|c| subscriber.ssubscribe(c)))
                    .await
                    .into_iter()
                    .all(|r| r.is_ok())
            } else {
                subscriber.subscribe(channels).await.is_ok()
            };
            if ok {
                subscribed.extend(users.iter().cloned());
            } else {
                metrics::counter!(m::BACKEND_ERRORS, "op" => "subscribe").increment(1);
                retry = true;
            }
        }
        for users in remove.chunks(CHUNK) {
            let channels: Vec<String> = users.iter().map(|u| keys.user_channel(u)).collect();
            let ok = if cluster {
                join_all(channels.into_iter().map(|c| subscriber.sunsubscribe(c)))
                    .await
                    .into_iter()
                    .all(|r| r.is_ok())
            } else {
                subscriber.unsubscribe(channels).await.is_ok()
            };
            if ok {
                users.iter().for_each(|u| {
                    subscribed.remove(u);
                });
            } else {
                retry = true;
            }
        }
    }
}

/// Turns subscriber messages into presence events for the node.
pub async fn run_messages(
    subscriber: SubscriberClient,
    keys: Keys,
    events: EventSink,
    stop: CancellationToken,
) {
    let mut messages = subscriber.message_rx();
    loop {
        let message = tokio::select! {
            m = messages.recv() => m,
            _ = stop.cancelled() => break,
        };
        match message {
            Ok(message) => {
                metrics::counter!(m::PUBSUB_MESSAGES, "direction" => "in").increment(1);
                let Some(channel_user) = keys.user_of_channel(&message.channel) else {
                    continue;
                };
                let Some(payload) = message.value.as_str() else {
                    continue;
                };
                match record::parse_payload(&payload) {
                    Some((_, rec)) if rec.user == channel_user => {
                        if events.send(BackendEvent::Presence(rec)).await.is_err() {
                            break;
                        }
                    }
                    _ => tracing::warn!(channel = %message.channel, "unreadable presence event"),
                }
            }
            Err(RecvError::Lagged(n)) => {
                metrics::counter!(m::BACKEND_ERRORS, "op" => "pubsub_lagged").increment(n);
                tracing::warn!(
                    missed = n,
                    "presence events dropped: the node read pub/sub too slowly"
                );
            }
            Err(RecvError::Closed) => break,
        }
    }
}
