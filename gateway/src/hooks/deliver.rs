//! The delivery loop every node runs: claim webhook events from the shared queue (new ones, and
//! ones a dead node held), POST each to every URL until all took it or its retry time is over,
//! then ack it. While it works on an event it touches it, so no other node takes it over.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use tokio::{sync::Notify, task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{WebhookSettings, signature};
use crate::{
    backend::{ClaimedWebhook, ReclaimCursor, WebhookQueue},
    clock::now_ms,
    metrics as m,
};

/// Events one node works on at once (each to every URL); the rest wait in the queue for any
/// node with room.
const IN_FLIGHT: usize = 64;
/// How often an idle node looks for new events that another node queued (its own wake it).
const POLL: Duration = Duration::from_secs(1);
/// The first retry's delay; later ones double, up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// One attempt's longest wait for an answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct Delivery {
    queue: Arc<dyn WebhookQueue>,
    settings: WebhookSettings,
    wake: Arc<Notify>,
}

/// What each event's task needs.
struct Sender {
    client: reqwest::Client,
    urls: Vec<String>,
    secret: Vec<u8>,
    retry: Duration,
}

impl Delivery {
    pub(super) fn new(
        settings: WebhookSettings,
        queue: Arc<dyn WebhookQueue>,
        wake: Arc<Notify>,
    ) -> Self {
        Delivery {
            queue,
            settings,
            wake,
        }
    }

    pub(super) async fn run(self, stop: CancellationToken) {
        let client = match reqwest::Client::builder().timeout(ATTEMPT_TIMEOUT).build() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the webhook client; this node delivers none");
                return;
            }
        };
        let sender = Arc::new(Sender {
            client,
            urls: self.settings.urls.clone(),
            secret: self.settings.secret.clone().into_bytes(),
            retry: self.settings.retry,
        });
        let node = self.settings.node.clone();
        let timeout = self.settings.claim_timeout;
        // Held events are touched three times per timeout, so a live node keeps them through a
        // slow or failed touch.
        let mut touch = tokio::time::interval(timeout / 3);
        touch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tasks: JoinSet<String> = JoinSet::new();
        let mut by_task: HashMap<tokio::task::Id, String> = HashMap::new();
        let mut held: HashSet<String> = HashSet::new();
        // Finished (delivered or given up), not yet acked.
        let mut done: Vec<String> = Vec::new();
        let mut cursor = ReclaimCursor::start();
        // At start at once: an earlier run of this node, or a dead node, may have left events.
        let mut next_reclaim = Instant::now();
        loop {
            if !done.is_empty() {
                match self.queue.ack(&done).await {
                    Ok(()) => {
                        for entry in done.drain(..) {
                            held.remove(&entry);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not ack webhook events; will retry")
                    }
                }
            }
            let room = IN_FLIGHT.saturating_sub(held.len());
            let mut claimed = Vec::new();
            if room > 0 {
                match self.queue.claim(&node, room).await {
                    Ok(c) => claimed = c,
                    Err(e) => tracing::warn!(error = %e, "could not claim webhook events"),
                }
                if claimed.len() < room && Instant::now() >= next_reclaim {
                    let max = room - claimed.len();
                    match self.queue.reclaim(&node, &cursor, max, timeout).await {
                        Ok((taken, next)) => {
                            if !taken.is_empty() {
                                tracing::info!(
                                    events = taken.len(),
                                    "took over webhook events another node held too long"
                                );
                            }
                            claimed.extend(taken);
                            cursor = next;
                        }
                        Err(e) => tracing::warn!(error = %e, "could not reclaim webhook events"),
                    }
                    next_reclaim = Instant::now() + (timeout / 3).min(POLL * 5);
                }
            }
            let full = !claimed.is_empty() && claimed.len() >= room;
            for c in claimed {
                if held.insert(c.entry.clone()) {
                    let entry = c.entry.clone();
                    let handle = tasks.spawn(deliver(sender.clone(), c));
                    by_task.insert(handle.id(), entry);
                }
            }
            metrics::gauge!(m::WEBHOOKS_IN_FLIGHT).set(held.len() as f64);
            if full && held.len() < IN_FLIGHT {
                continue;
            }
            tokio::select! {
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    finish(joined, &mut by_task, &mut held, &mut done);
                    while let Some(joined) = tasks.try_join_next_with_id() {
                        finish(joined, &mut by_task, &mut held, &mut done);
                    }
                }
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = touch.tick() => {
                    let working: Vec<String> = held.iter().filter(|e| !done.contains(e)).cloned().collect();
                    if let Err(e) = self.queue.touch(&node, &working).await {
                        tracing::warn!(error = %e, "could not touch held webhook events");
                    }
                }
                _ = stop.cancelled() => break,
            }
        }
        tasks.abort_all();
        let _ = self.queue.ack(&done).await;
        let unfinished: Vec<String> = held.into_iter().filter(|e| !done.contains(e)).collect();
        if !unfinished.is_empty() {
            // Any node may go on with them now, instead of after the claim timeout.
            if let Err(e) = self.queue.release(&node, &unfinished).await {
                tracing::warn!(error = %e, events = unfinished.len(), "could not release webhook events; others take them over after the claim timeout");
            }
        }
    }
}

fn finish(
    joined: Result<(tokio::task::Id, String), tokio::task::JoinError>,
    by_task: &mut HashMap<tokio::task::Id, String>,
    held: &mut HashSet<String>,
    done: &mut Vec<String>,
) {
    match joined {
        Ok((id, entry)) => {
            by_task.remove(&id);
            done.push(entry);
        }
        Err(e) => {
            // Only a panic gets here (tasks are aborted only at stop). The event is no longer
            // touched, so a node (this one too) takes it over after the claim timeout.
            if let Some(entry) = by_task.remove(&e.id()) {
                held.remove(&entry);
            }
            tracing::error!(error = %e, "a webhook delivery task failed");
        }
    }
}

/// Delivers one event to every URL, retrying failed URLs with capped exponential backoff until
/// the retry time after the event is over. Returns the event's entry, to be acked.
async fn deliver(sender: Arc<Sender>, claimed: ClaimedWebhook) -> String {
    let ClaimedWebhook { entry, event } = claimed;
    let sig = signature(&sender.secret, &event.body);
    let deadline = event.at + sender.retry.as_millis() as u64;
    let mut pending: Vec<&str> = sender.urls.iter().map(String::as_str).collect();
    loop {
        let attempts = pending.iter().map(|url| {
            sender
                .client
                .post(*url)
                .header("content-type", "application/json")
                .header("x-presence-signature", &sig)
                .header("x-presence-event-id", &event.id)
                .body(event.body.clone())
                .send()
        });
        let answers = futures_util::future::join_all(attempts).await;
        let mut failed = Vec::new();
        for (url, answer) in pending.into_iter().zip(answers) {
            match answer {
                Ok(resp) if resp.status().is_success() => {
                    metrics::counter!(m::WEBHOOKS, "result" => "ok").increment(1);
                }
                Ok(resp) => {
                    tracing::debug!(%url, status = %resp.status(), id = %event.id, "webhook refused");
                    failed.push(url);
                }
                Err(e) => {
                    tracing::debug!(%url, error = %e, id = %event.id, "webhook failed");
                    failed.push(url);
                }
            }
        }
        if failed.is_empty() {
            return entry;
        }
        let now = now_ms();
        let delay = backoff(now.saturating_sub(event.at));
        if now + delay.as_millis() as u64 > deadline {
            for url in failed {
                metrics::counter!(m::WEBHOOKS, "result" => "given_up").increment(1);
                tracing::warn!(
                    %url,
                    id = %event.id,
                    at = event.at,
                    "webhook given up: not delivered within PRESENCE_WEBHOOK_RETRY_SECS"
                );
            }
            return entry;
        }
        metrics::counter!(m::WEBHOOKS, "result" => "retry").increment(failed.len() as u64);
        tokio::time::sleep(delay).await;
        pending = failed;
    }
}

/// The wait before the next attempt at an event `age_ms` old: about its age, which doubles the
/// wait on each retry (attempts at 0, 0.2, 0.4, 0.8, 1.6 s ...) up to [`MAX_BACKOFF`]. Derived from
/// the event alone, so a node that takes an event over goes on where the dead one stopped.
fn backoff(age_ms: u64) -> Duration {
    Duration::from_millis(age_ms).clamp(MIN_BACKOFF, MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_200_ms_up_to_30_s() {
        let mut age = 0;
        let mut waits = Vec::new();
        for _ in 0..12 {
            let wait = backoff(age);
            waits.push(wait.as_millis() as u64);
            age += wait.as_millis() as u64;
        }
        assert_eq!(
            waits,
            [
                200, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000
            ]
        );
    }
}
