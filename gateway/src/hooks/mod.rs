//! What happens after presence records change because of this node: metrics, and webhooks for
//! users going online or offline (and kicked). Shards call [`ChangeHooks::changed`] and never wait
//! on it: an event goes into a bounded local buffer, `outbox.rs` moves it to the backend's
//! [`WebhookQueue`] (a Redis stream shared by every node, or memory on the embedded backend), and
//! `deliver.rs` on every node claims events from there and POSTs them, retrying for a set time.

mod deliver;
mod outbox;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::{Notify, mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    backend::{Changed, QueuedWebhook, WebhookQueue, WebhookWritten},
    clock::now_ms,
    metrics as m,
    presence::platforms_of,
};

/// Where webhooks go and how hard the node tries.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub urls: Vec<String>,
    pub secret: String,
    /// This node's id: its name as a consumer of the shared queue.
    pub node: Arc<str>,
    /// How long after an event its delivery is retried before it is given up.
    pub retry: Duration,
    /// Events the shared queue holds at most; more are refused and counted.
    pub queue_max: usize,
    /// Events the local buffer holds while the queue is slow or unreachable; more are dropped
    /// and counted.
    pub buffer: usize,
    /// A node that holds an event this long without a sign of life is taken to be dead, and
    /// another node delivers the event.
    pub claim_timeout: Duration,
}

#[derive(Clone, Default)]
pub struct ChangeHooks {
    webhooks: Option<mpsc::Sender<QueuedWebhook>>,
    /// Wakes this node's delivery loop when a write queued events itself.
    wake: Option<Arc<Notify>>,
}

/// A webhook's JSON body.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookEvent {
    /// The same as `X-Presence-Event-Id`.
    pub id: String,
    pub event: &'static str,
    pub user: String,
    pub platforms: Vec<u8>,
    pub node: String,
    pub at: u64,
    /// Why the app backend disconnected the user (`user.kicked`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ChangeHooks {
    /// Hooks that only count.
    pub fn metrics_only() -> Self {
        ChangeHooks::default()
    }

    /// Hooks that also send signed webhooks through `queue`, from tasks on `tracker` that stop
    /// with `stop` (what is still buffered then goes to the queue first).
    pub fn with_webhooks(
        settings: WebhookSettings,
        queue: Arc<dyn WebhookQueue>,
        stop: CancellationToken,
        tracker: &TaskTracker,
    ) -> Self {
        if settings.urls.is_empty() {
            return Self::metrics_only();
        }
        let (tx, rx) = mpsc::channel(settings.buffer.max(1));
        // The outbox wakes this node's delivery loop, so an event usually goes out at once
        // instead of at the next poll.
        let wake = Arc::new(Notify::new());
        tracker.spawn(outbox::run(
            rx,
            queue.clone(),
            settings.queue_max,
            wake.clone(),
            stop.clone(),
        ));
        tracker.spawn(deliver::Delivery::new(settings, queue, wake.clone()).run(stop));
        ChangeHooks {
            webhooks: Some(tx),
            wake: Some(wake),
        }
    }

    pub fn changed(&self, node: &str, changes: Vec<Changed>) {
        if changes.is_empty() {
            return;
        }
        metrics::counter!(m::STATUS_CHANGES).increment(changes.len() as u64);
        for change in changes {
            let Some(online) = change.transition() else {
                continue;
            };
            let event = if online {
                "user.online"
            } else {
                "user.offline"
            };
            metrics::counter!(m::TRANSITIONS, "to" => if online { "online" } else { "offline" })
                .increment(1);
            match change.webhook {
                WebhookWritten::Queued => {
                    if let Some(wake) = &self.wake {
                        wake.notify_one();
                    }
                    continue;
                }
                WebhookWritten::Refused => {
                    outbox::count_refused(1);
                    continue;
                }
                WebhookWritten::NotQueued => {}
            }
            if self.webhooks.is_some() {
                let platforms = if online {
                    platforms_of(change.record.platforms)
                } else {
                    platforms_of(change.before_platforms)
                };
                self.push(event, change.record.user, platforms, node, None);
            }
        }
    }

    /// The app backend disconnected `user` (on `platforms`, or all when empty) through this node.
    pub fn kicked(&self, node: &str, user: &str, platforms: Vec<u8>, reason: &str) {
        self.push(
            "user.kicked",
            user.to_string(),
            platforms,
            node,
            Some(reason.to_string()),
        );
    }

    /// Into the local buffer, never waiting; false (and counted) when it is full.
    fn push(
        &self,
        event: &'static str,
        user: String,
        platforms: Vec<u8>,
        node: &str,
        reason: Option<String>,
    ) -> bool {
        let Some(tx) = &self.webhooks else {
            return false;
        };
        let event = WebhookEvent {
            id: event_id(),
            event,
            user,
            platforms,
            node: node.to_string(),
            at: now_ms(),
            reason,
        };
        let Ok(body) = serde_json::to_vec(&event) else {
            return false;
        };
        let queued = QueuedWebhook {
            id: event.id,
            at: event.at,
            body: Bytes::from(body),
        };
        if tx.try_send(queued).is_err() {
            metrics::counter!(m::WEBHOOKS, "result" => "dropped").increment(1);
            return false;
        }
        true
    }
}

/// 128 random bits: unique per event without coordination between nodes.
fn event_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Signs a webhook body: `sha256=<hex HMAC-SHA256>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes any key length"),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_hmac() {
        // RFC 4231 test case 2.
        let sig = signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[tokio::test]
    async fn a_full_buffer_drops_instead_of_waiting() {
        let (tx, _rx) = mpsc::channel(2);
        let hooks = ChangeHooks {
            webhooks: Some(tx),
            wake: None,
        };
        let pushed: Vec<bool> = (0..4)
            .map(|i| hooks.push("user.online", format!("u{i}"), vec![1], "n1", None))
            .collect();
        assert_eq!(pushed, [true, true, false, false]);
    }

    #[tokio::test]
    async fn events_a_write_queued_are_not_queued_again() {
        let (tx, mut rx) = mpsc::channel(8);
        let wake = Arc::new(Notify::new());
        let hooks = ChangeHooks {
            webhooks: Some(tx),
            wake: Some(wake.clone()),
        };
        let change = |user: &str, webhook| Changed {
            before_platforms: 0,
            record: crate::presence::PresenceRecord {
                platforms: 2,
                ..crate::presence::PresenceRecord::unknown(user)
            },
            public_changed: true,
            webhook,
        };
        hooks.changed(
            "n1",
            vec![
                change("queued", WebhookWritten::Queued),
                change("refused", WebhookWritten::Refused),
                change("mine", WebhookWritten::NotQueued),
            ],
        );
        let event = rx.try_recv().expect("the caller's event");
        assert!(std::str::from_utf8(&event.body).is_ok_and(|b| b.contains(r#""user":"mine""#)));
        assert!(rx.try_recv().is_err(), "only that one");
        // The write's event wakes the delivery loop (a permit is stored for it).
        tokio::time::timeout(std::time::Duration::from_secs(1), wake.notified())
            .await
            .expect("woken");
    }

    #[test]
    fn event_ids_differ() {
        assert_ne!(event_id(), event_id());
        assert_eq!(event_id().len(), 32);
    }
}
