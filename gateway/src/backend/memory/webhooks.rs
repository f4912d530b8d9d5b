//! The webhook queue on the embedded backend: in this process's memory, so it lives and dies with
//! the node (the one node there is).

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use async_trait::async_trait;
use tokio::time::Instant;

use super::MemoryBackend;
use crate::backend::{
    BackendError, ClaimedWebhook, Enqueued, QueuedWebhook, ReclaimCursor, WebhookQueue,
};

#[derive(Default)]
pub(super) struct WebhookState {
    /// Names entries, as a stream id does on Redis.
    next: u64,
    waiting: VecDeque<ClaimedWebhook>,
    held: HashMap<String, Held>,
}

struct Held {
    node: String,
    /// Last claim or touch; `None` once released, so any reclaim takes it.
    touched: Option<Instant>,
    event: QueuedWebhook,
}

impl MemoryBackend {
    fn webhooks(&self) -> std::sync::MutexGuard<'_, WebhookState> {
        // Every update below leaves the maps consistent, so a poisoned lock is taken over as is.
        self.webhooks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl WebhookQueue for MemoryBackend {
    async fn queued(&self) -> Result<usize, BackendError> {
        let q = self.webhooks();
        Ok(q.waiting.len() + q.held.len())
    }

    async fn enqueue(
        &self,
        events: &[QueuedWebhook],
        max: usize,
    ) -> Result<Enqueued, BackendError> {
        let mut q = self.webhooks();
        let mut added = 0;
        for event in events {
            if q.waiting.len() + q.held.len() >= max {
                break;
            }
            q.next += 1;
            let entry = q.next.to_string();
            q.waiting.push_back(ClaimedWebhook {
                entry,
                event: event.clone(),
            });
            added += 1;
        }
        Ok(Enqueued {
            added,
            len: q.waiting.len() + q.held.len(),
        })
    }

    async fn claim(&self, node: &str, max: usize) -> Result<Vec<ClaimedWebhook>, BackendError> {
        let mut q = self.webhooks();
        let take = max.min(q.waiting.len());
        let claimed: Vec<ClaimedWebhook> = q.waiting.drain(..take).collect();
        let now = Instant::now();
        for c in &claimed {
            q.held.insert(
                c.entry.clone(),
                Held {
                    node: node.to_string(),
                    touched: Some(now),
                    event: c.event.clone(),
                },
            );
        }
        Ok(claimed)
    }

    async fn reclaim(
        &self,
        node: &str,
        _cursor: &ReclaimCursor,
        max: usize,
        idle: Duration,
    ) -> Result<(Vec<ClaimedWebhook>, ReclaimCursor), BackendError> {
        let mut q = self.webhooks();
        let now = Instant::now();
        // Held events number at most the holders' in-flight bounds, so this scan stays small.
        let mut claimed = Vec::new();
        for (entry, held) in q.held.iter_mut() {
            if claimed.len() >= max {
                break;
            }
            if held.touched.is_some_and(|t| now.duration_since(t) < idle) {
                continue;
            }
            held.node = node.to_string();
            held.touched = Some(now);
            claimed.push(ClaimedWebhook {
                entry: entry.clone(),
                event: held.event.clone(),
            });
        }
        Ok((claimed, ReclaimCursor::start()))
    }

    async fn touch(&self, node: &str, entries: &[String]) -> Result<(), BackendError> {
        let mut q = self.webhooks();
        let now = Instant::now();
        for entry in entries {
            if let Some(held) = q.held.get_mut(entry)
                && held.node == node
            {
                held.touched = Some(now);
            }
        }
        Ok(())
    }

    async fn release(&self, node: &str, entries: &[String]) -> Result<(), BackendError> {
        let mut q = self.webhooks();
        for entry in entries {
            if let Some(held) = q.held.get_mut(entry)
                && held.node == node
            {
                held.touched = None;
            }
        }
        Ok(())
    }

    async fn ack(&self, entries: &[String]) -> Result<(), BackendError> {
        let mut q = self.webhooks();
        for entry in entries {
            q.held.remove(entry);
        }
        Ok(())
    }
}
