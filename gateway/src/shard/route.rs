//! Backend events to shards: each goes to the shard that owns its user or group, or to every
//! shard (a broadcast, a resync).

use std::sync::Arc;

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::{ShardCmd, Shards};
use crate::backend::{Audience, BackendEvent};

/// Sends each backend event to the shard that owns its user.
pub async fn route_events(
    mut events: mpsc::Receiver<BackendEvent>,
    shards: Shards,
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
            BackendEvent::Control { user, control } => {
                let key = user.clone();
                shards.send(&key, ShardCmd::Control { user, control }).await;
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
