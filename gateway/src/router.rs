//! Message routing workers. Each sender is hashed onto one worker, which sends what queued up
//! since its last call as one backend call (one pipeline): a sender's messages keep their order
//! across all their devices, and a burst costs one round trip, not one per message. The worker
//! also keeps each client sender's budget of messages stored for offline recipients.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use shared::{ErrorCode, ServerFrame, shard::shard_of};
use tokio::sync::{mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    backend::{BackendError, MessageStore, Outgoing, SendOutcome, SendRefused},
    conn_handle::ConnHandle,
    metrics as m,
};

/// Senders one worker keeps a storage budget for; beyond it the table starts over (every sender
/// gets a fresh window: the bound on memory wins over exactness for that moment).
const BUDGET_SENDERS: usize = 65_536;

/// How much a client may leave stored for offline recipients.
#[derive(Debug, Clone, Copy)]
pub struct StoreQuota {
    /// Stored private messages per sender per window.
    pub messages: u64,
    /// Bytes of stored bodies per sender per window.
    pub bytes: u64,
    pub window: Duration,
}

/// Per sender: what they stored in the current window (per node: a sender's devices on several
/// nodes get a budget on each).
struct StoreBudget {
    quota: StoreQuota,
    spent: HashMap<String, (Instant, u64, u64)>,
}

impl StoreBudget {
    fn new(quota: StoreQuota) -> Self {
        StoreBudget {
            quota,
            spent: HashMap::new(),
        }
    }

    fn has_room(&mut self, sender: &str, now: Instant) -> bool {
        match self.spent.get(sender) {
            Some((since, _, _)) if now.duration_since(*since) >= self.quota.window => {
                self.spent.remove(sender);
                true
            }
            Some((_, messages, bytes)) => {
                *messages < self.quota.messages && *bytes < self.quota.bytes
            }
            None => true,
        }
    }

    fn charge(&mut self, sender: &str, bytes: u64, now: Instant) {
        if self.spent.len() >= BUDGET_SENDERS && !self.spent.contains_key(sender) {
            self.spent.clear();
        }
        let entry = self.spent.entry(sender.to_string()).or_insert((now, 0, 0));
        entry.1 += 1;
        entry.2 += bytes;
    }
}

/// Messages one backend call carries at most.
const BATCH: usize = 256;
const MAILBOX: usize = 8192;

pub type SendResult = Result<Result<SendOutcome, SendRefused>, BackendError>;

/// Where the outcome goes.
pub enum Reply {
    /// A client's `send`: answered with `ack` or `error`.
    Conn {
        conn: Arc<ConnHandle>,
        id: Option<u64>,
    },
    /// The REST API waits for it.
    Caller(oneshot::Sender<SendResult>),
}

pub struct RouteJob {
    pub out: Outgoing,
    pub reply: Reply,
}

#[derive(Clone)]
pub struct Router {
    senders: Arc<[mpsc::Sender<RouteJob>]>,
}

impl Router {
    pub fn spawn(
        count: usize,
        messages: Arc<dyn MessageStore>,
        quota: StoreQuota,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Router {
        let senders: Vec<_> = (0..count.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(MAILBOX);
                tracker.spawn(run(rx, messages.clone(), quota, stop.clone()));
                tx
            })
            .collect();
        Router {
            senders: senders.into(),
        }
    }

    /// Queues a message behind its sender's earlier ones. False once the router has stopped.
    pub async fn route(&self, job: RouteJob) -> bool {
        let index = shard_of(&job.out.from, self.senders.len());
        match self.senders.get(index) {
            Some(tx) => tx.send(job).await.is_ok(),
            None => false,
        }
    }
}

async fn run(
    mut jobs: mpsc::Receiver<RouteJob>,
    messages: Arc<dyn MessageStore>,
    quota: StoreQuota,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut budget = StoreBudget::new(quota);
    loop {
        let first = tokio::select! {
            j = jobs.recv() => match j { Some(j) => j, None => break },
            _ = stop.cancelled() => break,
        };
        batch.push(first);
        while batch.len() < BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let now = Instant::now();
        let outs = batch
            .iter()
            .map(|j| {
                let mut out = j.out.clone();
                // Clients spend a budget; the app backend (no origin connection) does not.
                out.may_store = out.origin.is_none() || budget.has_room(&out.from, now);
                out
            })
            .collect();
        match messages.send(outs).await {
            Ok(results) => {
                for (job, result) in batch.drain(..).zip(results) {
                    if let Ok(o) = &result
                        && o.stored > 0
                        && job.out.origin.is_some()
                    {
                        let bytes = rmp_serde::to_vec(&job.out.body).map_or(0, |b| b.len());
                        budget.charge(&job.out.from, bytes as u64, now);
                    }
                    answer(job, Ok(result));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, messages = batch.len(), "message routing failed");
                for job in batch.drain(..) {
                    answer(job, Err(e.clone()));
                }
            }
        }
    }
}

fn answer(job: RouteJob, result: SendResult) {
    let kind = match &job.out.to {
        shared::Destination::User { .. } => "user",
        shared::Destination::Group { .. } => "group",
        shared::Destination::All { .. } => "all",
    };
    let label = match &result {
        Ok(Ok(_)) => "ok",
        Ok(Err(_)) => "refused",
        Err(_) => "error",
    };
    metrics::counter!(m::MESSAGES_ROUTED, "to" => kind, "result" => label).increment(1);
    match job.reply {
        Reply::Caller(tx) => {
            let _ = tx.send(result);
        }
        Reply::Conn { conn, id } => {
            let frame = match result {
                Ok(Ok(o)) => ServerFrame::Ack {
                    id,
                    msg_id: o.msg_id,
                    result: o.result,
                    delivered: o.delivered,
                    stored: o.stored,
                },
                Ok(Err(refused @ SendRefused::StoreQuota)) => {
                    ServerFrame::error(id, ErrorCode::RateLimited, refused.to_string())
                }
                Ok(Err(refused)) => {
                    ServerFrame::error(id, ErrorCode::Forbidden, refused.to_string())
                }
                Err(_) => {
                    ServerFrame::error(id, ErrorCode::Unavailable, "message store unavailable")
                }
            };
            conn.push_frame(frame);
        }
    }
}
