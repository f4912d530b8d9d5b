//! Backend events to shards: each goes to the shard that owns its user or group, or to every
//! shard (a broadcast, a resync); a request to list a user's connections is answered from the
//! user's shard.

use std::sync::Arc;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{ShardCmd, Shards};
use crate::backend::{Audience, BackendEvent, Control, Sessions};

/// Sends each backend event to the shard that owns its user.
pub async fn route_events(
    mut events: mpsc::Receiver<BackendEvent>,
    shards: Shards,
    sessions: Arc<dyn Sessions>,
    node: Arc<str>,
    announce_now: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            e = events.recv() => match e { Some(e) => e, None => break },
            _ = stop.cancelled() => break,
        };
        match event {
            BackendEvent::Presence {
                record,
                public_changed,
            } => {
                let user = record.user.clone();
                let cmd = ShardCmd::Presence {
                    record,
                    public_changed,
                };
                shards.send(&user, cmd).await;
            }
            BackendEvent::Control {
                user,
                control: Control::List { reply },
            } => {
                // Answered from a task: the answer is a backend write, and events keep flowing.
                let (shards, sessions, node) = (shards.clone(), sessions.clone(), node.clone());
                tokio::spawn(async move {
                    let (tx, rx) = oneshot::channel();
                    let cmd = ShardCmd::Connections {
                        user: user.clone(),
                        reply: tx,
                    };
                    if !shards.send(&user, cmd).await {
                        return;
                    }
                    let Ok(conns) = rx.await else { return };
                    if let Err(e) = sessions.answer_list(&user, &reply, &node, conns).await {
                        tracing::warn!(error = %e, %user, "could not answer a connection listing");
                    }
                });
            }
            BackendEvent::Control { user, control } => {
                let key = user.clone();
                shards.send(&key, ShardCmd::Control { user, control }).await;
            }
            BackendEvent::Gap => {
                for index in 0..shards.count() {
                    shards.send_to(index, ShardCmd::Gap).await;
                }
            }
            BackendEvent::Resync => {
                announce_now.notify_one();
                for index in 0..shards.count() {
                    shards.send_to(index, ShardCmd::Resync).await;
                }
            }
            BackendEvent::Message(delivery) => match &delivery.audience {
                Audience::User(key) | Audience::Group(key) => {
                    let key = key.clone();
                    shards
                        .send(&key, ShardCmd::Deliver(Arc::new(delivery)))
                        .await;
                }
                Audience::All => {
                    let delivery = Arc::new(delivery);
                    for index in 0..shards.count() {
                        shards
                            .send_to(index, ShardCmd::Deliver(delivery.clone()))
                            .await;
                    }
                }
            },
            BackendEvent::Membership {
                user,
                group,
                joined,
            } => {
                let key = user.clone();
                shards
                    .send(
                        &key,
                        ShardCmd::Membership {
                            user,
                            group,
                            joined,
                        },
                    )
                    .await;
            }
        }
    }
}
