//! Moves webhook events from the node's local buffer into the shared queue, in batches (one
//! pipeline per batch on Redis). While the queue is unreachable the batch waits here and the
//! buffer fills up to its bound; `ChangeHooks::push` drops (and counts) what does not fit.

use std::{sync::Arc, time::Duration};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    backend::{QueuedWebhook, WebhookQueue},
    metrics as m,
};

/// Events per `enqueue` call.
const BATCH: usize = 500;
/// At stop, the last batch gets this long to reach the queue.
const LAST_CALL: Duration = Duration::from_secs(2);

pub(super) async fn run(
    mut rx: mpsc::Receiver<QueuedWebhook>,
    queue: Arc<dyn WebhookQueue>,
    max: usize,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut batch: Vec<QueuedWebhook> = Vec::with_capacity(BATCH);
    let mut backoff = Duration::from_millis(100);
    loop {
        if batch.is_empty() {
            tokio::select! {
                n = rx.recv_many(&mut batch, BATCH) => if n == 0 { break },
                _ = stop.cancelled() => break,
            }
        }
        match queue.enqueue(&batch, max).await {
            Ok(done) => {
                count_refused(batch.len() - done.added.min(batch.len()));
                metrics::gauge!(m::WEBHOOK_QUEUE).set(done.len as f64);
                batch.clear();
                backoff = Duration::from_millis(100);
                wake.notify_one();
            }
            Err(e) => {
                tracing::warn!(error = %e, events = batch.len(), "webhook events wait for the queue");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => break,
                }
                // At most a second: a node that dies while events wait here loses them.
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    // Stopping: the shards' last flush may just have queued offline events; they go to the queue
    // now, so another node delivers them.
    while batch.len() < rx.max_capacity()
        && let Ok(event) = rx.try_recv()
    {
        batch.push(event);
    }
    if batch.is_empty() {
        return;
    }
    match tokio::time::timeout(LAST_CALL, queue.enqueue(&batch, max)).await {
        Ok(Ok(done)) => count_refused(batch.len() - done.added.min(batch.len())),
        _ => {
            metrics::counter!(m::WEBHOOKS, "result" => "dropped").increment(batch.len() as u64);
            tracing::warn!(
                events = batch.len(),
                "webhook events lost at shutdown: the queue was unreachable"
            );
        }
    }
}

pub(super) fn count_refused(refused: usize) {
    if refused > 0 {
        metrics::counter!(m::WEBHOOKS, "result" => "queue_full").increment(refused as u64);
        tracing::warn!(
            events = refused,
            "webhook queue full (PRESENCE_WEBHOOK_QUEUE_MAX): events dropped"
        );
    }
}
