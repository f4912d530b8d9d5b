//! The webhook queue role: events on their way to the app backend's webhook URLs, shared by every
//! node so that any live node delivers them and a node's death loses none.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::BackendError;

/// One webhook event as it waits in the queue. Everything a delivery needs travels with it, so any
/// node can deliver it, and the same `id` goes out on every attempt, from every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedWebhook {
    /// `X-Presence-Event-Id`: receivers dedupe on it.
    pub id: String,
    /// When the event happened (ms since the epoch): retries stop a fixed time after it, whoever
    /// delivers it.
    pub at: u64,
    /// The JSON body, exactly as signed and sent.
    pub body: Bytes,
}

/// An event a node holds: `entry` names it in the queue for [`WebhookQueue::ack`],
/// [`WebhookQueue::touch`] and [`WebhookQueue::release`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedWebhook {
    pub entry: String,
    pub event: QueuedWebhook,
}

/// What `enqueue` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// Events added; the rest of the batch was refused because the queue was full.
    pub added: usize,
    /// Events in the queue afterwards (waiting or held by a node).
    pub len: usize,
}

/// Where `reclaim` goes on from: start with [`ReclaimCursor::start`], then pass what each call
/// returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReclaimCursor(pub String);

impl ReclaimCursor {
    pub fn start() -> Self {
        ReclaimCursor::default()
    }
}

/// Webhook events, delivered at least once:
/// - `enqueue` adds events while the queue holds fewer than `max` (waiting and held together);
///   the rest are refused, never an older event dropped for a newer one.
/// - `claim` hands each waiting event to one node, which holds it until it `ack`s it (delivered
///   or given up: gone for good). A held event that its node has neither acked nor `touch`ed for
///   `idle` is handed to another node by that node's `reclaim` (its holder died or lost the
///   backend); `release` makes held events reclaimable at once (a node leaving).
/// - So an event may be delivered twice, never lost while the backend keeps its data. No order
///   between events. Every call costs at most its `max` (or its list's length), never the
///   queue's length.
#[async_trait]
pub trait WebhookQueue: Send + Sync + 'static {
    async fn enqueue(&self, events: &[QueuedWebhook], max: usize)
    -> Result<Enqueued, BackendError>;
    /// Up to `max` waiting events, now held by `node`.
    async fn claim(&self, node: &str, max: usize) -> Result<Vec<ClaimedWebhook>, BackendError>;
    /// Up to `max` events other nodes (or an earlier run of `node`) held for at least `idle`
    /// without a touch, now held by `node`; and where the next call goes on.
    async fn reclaim(
        &self,
        node: &str,
        cursor: &ReclaimCursor,
        max: usize,
        idle: Duration,
    ) -> Result<(Vec<ClaimedWebhook>, ReclaimCursor), BackendError>;
    /// `node` still works on these entries: nobody reclaims them for another `idle`.
    async fn touch(&self, node: &str, entries: &[String]) -> Result<(), BackendError>;
    /// `node` gives these entries up undelivered: any node may reclaim them at once.
    async fn release(&self, node: &str, entries: &[String]) -> Result<(), BackendError>;
    /// Done with these entries: they leave the queue.
    async fn ack(&self, entries: &[String]) -> Result<(), BackendError>;
    /// Events in the queue, waiting or held (O(1)): a write may queue events itself
    /// (`WebhookWritten::Queued`), so no enqueue of this node's sees every change of it.
    async fn queued(&self) -> Result<usize, BackendError>;
}
