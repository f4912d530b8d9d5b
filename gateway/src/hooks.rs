//! What happens after presence records change because of this node: metrics, and webhooks for
//! users going online or offline. Shards call [`ChangeHooks::changed`] and never wait on it.

use std::{sync::Arc, time::Duration};

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{backend::Changed, clock::now_ms, metrics as m, presence::platforms_of};

/// Webhook events waiting to be sent; beyond this, new ones are dropped and counted, because a
/// shard must never wait on an HTTP endpoint.
const WEBHOOK_QUEUE: usize = 65_536;
const WEBHOOK_ATTEMPTS: u32 = 5;

#[derive(Clone, Default)]
pub struct ChangeHooks {
    webhooks: Option<mpsc::Sender<WebhookEvent>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WebhookEvent {
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

    /// Hooks that also POST signed webhooks to `urls`, from a task that stops with `stop`.
    pub fn with_webhooks(
        urls: Vec<String>,
        secret: String,
        stop: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Self {
        if urls.is_empty() {
            return Self::metrics_only();
        }
        let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
        tracker.spawn(send_webhooks(
            rx,
            urls,
            Arc::from(secret.into_bytes()),
            stop,
        ));
        ChangeHooks { webhooks: Some(tx) }
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
            if let Some(tx) = &self.webhooks {
                let platforms = if online {
                    platforms_of(change.record.platforms)
                } else {
                    platforms_of(change.before_platforms)
                };
                let event = WebhookEvent {
                    event,
                    user: change.record.user,
                    platforms,
                    node: node.to_string(),
                    at: now_ms(),
                    reason: None,
                };
                if tx.try_send(event).is_err() {
                    metrics::counter!(m::WEBHOOKS, "result" => "dropped").increment(1);
                }
            }
        }
    }
}

impl ChangeHooks {
    /// The app backend disconnected `user` (on `platforms`, or all when empty) through this node.
    pub fn kicked(&self, node: &str, user: &str, platforms: Vec<u8>, reason: &str) {
        let Some(tx) = &self.webhooks else {
            return;
        };
        let event = WebhookEvent {
            event: "user.kicked",
            user: user.to_string(),
            platforms,
            node: node.to_string(),
            at: now_ms(),
            reason: Some(reason.to_string()),
        };
        if tx.try_send(event).is_err() {
            metrics::counter!(m::WEBHOOKS, "result" => "dropped").increment(1);
        }
    }
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

async fn send_webhooks(
    mut rx: mpsc::Receiver<WebhookEvent>,
    urls: Vec<String>,
    secret: Arc<[u8]>,
    stop: CancellationToken,
) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client; webhooks are off");
            return;
        }
    };
    // Each event goes out from its own task so one slow endpoint delays nobody else; the
    // semaphore bounds how many are in flight.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(64));
    loop {
        let event = tokio::select! {
            e = rx.recv() => match e { Some(e) => e, None => break },
            _ = stop.cancelled() => break,
        };
        let body = match serde_json::to_vec(&event) {
            Ok(b) => bytes::Bytes::from(b),
            Err(_) => continue,
        };
        let sig = signature(&secret, &body);
        for url in &urls {
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            let (client, url, body, sig, stop) = (
                client.clone(),
                url.clone(),
                body.clone(),
                sig.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let _permit = permit;
                deliver(&client, &url, body, &sig, &stop).await;
            });
        }
    }
}

async fn deliver(
    client: &reqwest::Client,
    url: &str,
    body: bytes::Bytes,
    sig: &str,
    stop: &CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        let sent = client
            .post(url)
            .header("content-type", "application/json")
            .header("x-presence-signature", sig)
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(resp) if resp.status().is_success() => {
                metrics::counter!(m::WEBHOOKS, "result" => "ok").increment(1);
                return;
            }
            Ok(resp) => tracing::debug!(%url, status = %resp.status(), attempt, "webhook refused"),
            Err(e) => tracing::debug!(%url, error = %e, attempt, "webhook failed"),
        }
        metrics::counter!(m::WEBHOOKS, "result" => "retry").increment(1);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => break,
        }
        backoff *= 2;
    }
    metrics::counter!(m::WEBHOOKS, "result" => "failed").increment(1);
    tracing::warn!(%url, "webhook given up after retries");
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
}
