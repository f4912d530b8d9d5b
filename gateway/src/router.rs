//! Message routing workers. Each sender is hashed onto one worker, which sends what queued up
//! since its last call as one backend call (one pipeline): a sender's messages keep their order
//! across all their devices, and a burst costs one round trip, not one per message. A batch whose
//! backend call failed is tried again (a few times, within `PRESENCE_SEND_RETRY_MS`), safely: the
//! router gives every message without a `client_msg_id` an id of its own, so the backend applies
//! each message once however many attempts reach it. The worker also keeps each client sender's
//! budget of messages stored for offline recipients.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use shared::{ErrorCode, Outcome, ServerFrame, shard::shard_of};
use tokio::{
    sync::{mpsc, oneshot},
    time::timeout_at,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    backend::{BackendError, Dedupe, ErrorKind, MessageStore, Outgoing, SendOutcome, SendRefused},
    conn_handle::ConnHandle,
    metrics::{self as m, RequestTimer},
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

/// Waits before the second and third attempt at a failed batch: a blip (a failover, a reconnect)
/// is often over after the first; more attempts in a row only add load to a backend in trouble.
const BACKOFF: [Duration; 2] = [Duration::from_millis(50), Duration::from_millis(200)];

/// How the router tries a failed batch again, and how long it may take in all before answering.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Every attempt, and so the answer, comes within this time of the first attempt's start.
    pub budget: Duration,
}

impl RetryPolicy {
    pub fn new(budget: Duration) -> Self {
        RetryPolicy { budget }
    }

    /// After `attempts` failed attempts, the last with `error`, `elapsed` after the first began:
    /// how long to wait before the next one, or `None` to answer now. Only `Unavailable` is
    /// worth another try (an `Internal` error would repeat); a caller that knows the backend is
    /// down can skip asking.
    pub fn next_delay(
        &self,
        error: &BackendError,
        attempts: usize,
        elapsed: Duration,
    ) -> Option<Duration> {
        let delay = *BACKOFF.get(attempts.checked_sub(1)?)?;
        let retry = error.kind() == ErrorKind::Unavailable && elapsed + delay < self.budget;
        retry.then_some(delay)
    }
}

/// A batch that could not be routed: the last error and whether any of it may have gone out.
#[derive(Debug, Clone)]
pub struct SendFailed {
    pub error: BackendError,
    pub outcome: Outcome,
}

pub type SendResult = Result<Result<SendOutcome, SendRefused>, SendFailed>;

/// Where the outcome goes.
pub enum Reply {
    /// A client's `send`: answered with `ack` or `error`.
    Conn {
        conn: Arc<ConnHandle>,
        id: Option<u64>,
        /// The `send` frame's age, recorded as the `ack` is queued.
        timer: Option<RequestTimer>,
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
        retry: RetryPolicy,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Router {
        // Router ids must not repeat across this node's restarts within their window.
        let run_id: u64 = rand::random();
        let senders: Vec<_> = (0..count.max(1))
            .map(|worker| {
                let (tx, rx) = mpsc::channel(MAILBOX);
                let ids = RetryIds {
                    prefix: format!("{run_id:x}.{worker:x}."),
                    next: 0,
                };
                let worker = Worker {
                    messages: messages.clone(),
                    budget: StoreBudget::new(quota),
                    retry,
                    ids,
                };
                tracker.spawn(worker.run(rx, stop.clone()));
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

/// The router's own dedupe ids, unique per node run and worker.
struct RetryIds {
    prefix: String,
    next: u64,
}

impl RetryIds {
    fn next(&mut self) -> String {
        self.next += 1;
        format!("{}{:x}", self.prefix, self.next)
    }
}

/// One routing worker: its senders' batches, in order, one at a time.
struct Worker {
    messages: Arc<dyn MessageStore>,
    budget: StoreBudget,
    retry: RetryPolicy,
    ids: RetryIds,
}

impl Worker {
    async fn run(mut self, mut jobs: mpsc::Receiver<RouteJob>, stop: CancellationToken) {
        let mut batch = Vec::with_capacity(BATCH);
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
            self.route(&mut batch).await;
        }
    }

    async fn route(&mut self, batch: &mut Vec<RouteJob>) {
        let now = Instant::now();
        for job in batch.iter_mut() {
            let out = &mut job.out;
            // Clients spend a budget; the app backend (no origin connection) does not.
            out.may_store = out.origin.is_none() || self.budget.has_room(&out.from, now);
            // With an id on every message, a retry after an attempt that did apply unseen
            // cannot send anything twice.
            if out.dedupe.is_none() {
                out.dedupe = Some(Dedupe::Retry(self.ids.next()));
            }
        }
        match self.send_with_retries(batch).await {
            Ok(results) => {
                for (job, result) in batch.drain(..).zip(results) {
                    if let Ok(o) = &result
                        && o.stored > 0
                        && job.out.origin.is_some()
                        && !repeats_a_client_send(o, &job.out)
                    {
                        let bytes = rmp_serde::to_vec(&job.out.body).map_or(0, |b| b.len());
                        self.budget.charge(&job.out.from, bytes as u64, now);
                    }
                    answer(job, Ok(result));
                }
            }
            Err(failed) => {
                tracing::warn!(
                    error = %failed.error,
                    outcome = ?failed.outcome,
                    messages = batch.len(),
                    "message routing failed"
                );
                for job in batch.drain(..) {
                    answer(job, Err(failed.clone()));
                }
            }
        }
    }

    /// Sends a batch, again after a transient failure as the policy allows; every attempt ends
    /// within the policy's budget. An attempt cut short may still run later; the dedupe ids
    /// make that harmless, and the answer says the outcome is unknown.
    async fn send_with_retries(
        &self,
        batch: &[RouteJob],
    ) -> Result<Vec<Result<SendOutcome, SendRefused>>, SendFailed> {
        // Tokio's clock, which the timeouts and sleeps below follow (paused in tests).
        let started = tokio::time::Instant::now();
        let deadline = started + self.retry.budget;
        let mut maybe_sent = false;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let outs = batch.iter().map(|j| j.out.clone()).collect();
            let error = match timeout_at(deadline, self.messages.send(outs)).await {
                Ok(Ok(results)) => return Ok(results),
                Ok(Err(e)) => e,
                Err(_) => BackendError::unavailable("send", "no answer within the retry budget"),
            };
            maybe_sent |= !error.is_not_sent();
            let Some(delay) = self.retry.next_delay(&error, attempts, started.elapsed()) else {
                let outcome = if maybe_sent {
                    Outcome::Unknown
                } else {
                    Outcome::NotSent
                };
                return Err(SendFailed { error, outcome });
            };
            tracing::info!(error = %error, attempts, messages = batch.len(), "retrying messages");
            metrics::counter!(m::SEND_RETRIES).increment(batch.len() as u64);
            tokio::time::sleep(delay).await;
        }
    }
}

/// True when `outcome` is an earlier send's that the client repeated: that send was charged.
/// (A repeat of the router's own id answers an attempt whose outcome it never saw.)
fn repeats_a_client_send(outcome: &SendOutcome, out: &Outgoing) -> bool {
    outcome.duplicate && matches!(out.dedupe, Some(Dedupe::Client(_)))
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
        Reply::Conn { conn, id, timer } => {
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
                Err(failed) => ServerFrame::send_unavailable(id, failed.outcome),
            };
            conn.push_frame(frame);
            if let Some(timer) = timer {
                timer.answered();
            }
        }
    }
}

#[cfg(test)]
#[path = "router_tests.rs"]
mod tests;
