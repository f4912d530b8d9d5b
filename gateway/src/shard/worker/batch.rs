//! The shard's backend jobs: when a batch is due, building a flush or a renewal chunk, running
//! it off the worker's task (one at a time, so writes stay in order), and what its outcome
//! changes: acknowledged entries, or dirty users and a backoff.

use std::time::Duration;

use tokio::time::Instant;

use super::{Job, JobDone, MAX_BACKOFF, MIN_BACKOFF, RENEW_CHUNK, Worker};
use crate::{
    backend::{PresenceWrite, Renewal},
    metrics as m,
};

impl Worker {
    /// When the pending batch (or a retry) is due.
    pub(super) fn next_flush_at(&self) -> Option<Instant> {
        if self.dirty.is_empty() && !self.renew_due && self.renew_queue.is_empty() {
            return None;
        }
        if let Some(retry) = self.retry_at {
            return Some(retry);
        }
        if self.renew_due || !self.renew_queue.is_empty() {
            return Some(Instant::now());
        }
        let due = self
            .first_dirty_at
            .map(|t| t + self.settings.batch_interval);
        match (self.urgent, due) {
            (true, Some(due)) => Some(self.early.next_at().min(due)),
            _ => due,
        }
    }

    /// Starts a flush when the batch is full or due, else a renewal when due; one job at a time.
    pub(super) fn maybe_start_job(&mut self) {
        if self.job.is_some() {
            return;
        }
        let now = Instant::now();
        if self.retry_at.is_some_and(|t| t > now) {
            return;
        }
        let batch_due = self.dirty.len() >= self.settings.batch_max
            || self
                .first_dirty_at
                .is_some_and(|t| t + self.settings.batch_interval <= now)
            || (self.retry_at.is_some() && !self.dirty.is_empty());
        // Group commit: an urgent change goes out as soon as no job is in flight (what arrives
        // during one waits for it), within the budget of early flushes; a storm spends it
        // within its first moments and batches as before.
        let early = !batch_due && self.urgent && !self.dirty.is_empty() && self.early.take(now);
        if batch_due {
            self.start_flush(false);
        } else if early {
            metrics::counter!(m::EARLY_FLUSHES).increment(1);
            self.start_flush(true);
        } else if self.renew_due || !self.renew_queue.is_empty() {
            self.start_renew();
        }
    }

    /// Writes the pending changes; an `early` flush only the urgent ones (the rest keep their
    /// batch's deadline, so a reconnect within it still cancels an offline).
    pub(super) fn start_flush(&mut self, early: bool) {
        self.urgent = false;
        self.retry_at = None;
        let mut dirty = std::mem::take(&mut self.dirty);
        if early {
            let users = &self.users;
            let (now, later) = dirty
                .into_iter()
                .partition(|u| users.get(u).is_some_and(super::UserSlot::is_urgent));
            dirty = now;
            self.dirty = later;
        }
        if self.dirty.is_empty() {
            self.first_dirty_at = None;
        }
        let mut writes = Vec::with_capacity(dirty.len().min(self.settings.batch_max * 4));
        for user in dirty {
            let Some(slot) = self.users.get_mut(&user) else {
                continue;
            };
            let entry = if self.draining {
                slot.draining_entry()
            } else {
                slot.desired_entry()
            };
            let status = slot.pending_status.take();
            // Flap suppression: a connect and a disconnect inside one batch leave the entry as the
            // backend has it, so nothing is written and nobody hears of it.
            if entry == slot.flushed && status.is_none() {
                self.forget_if_done(&user);
                continue;
            }
            slot.in_flight = true;
            writes.push(PresenceWrite {
                user,
                entry,
                before: slot.flushed,
                status,
            });
        }
        if writes.is_empty() {
            return;
        }
        metrics::histogram!(m::BATCH_SIZE).record(writes.len() as f64);
        self.spawn_job(Job::Flush(writes));
    }

    /// Renews the next chunk of the current round, starting a round when one is due.
    pub(super) fn start_renew(&mut self) {
        if self.renew_due {
            self.renew_due = false;
            self.renew_queue = self
                .users
                .iter()
                .filter(|(_, s)| s.flushed.is_some())
                .map(|(u, _)| u.clone())
                .collect();
        }
        let take = self.renew_queue.len().min(RENEW_CHUNK);
        let chunk: Vec<Renewal> = self
            .renew_queue
            .split_off(self.renew_queue.len() - take)
            .into_iter()
            .filter_map(|user| {
                let slot = self.users.get(&user)?;
                slot.flushed.map(|entry| Renewal {
                    user,
                    entry,
                    chosen: slot.chosen_here.clone(),
                })
            })
            .collect();
        if !chunk.is_empty() {
            self.spawn_job(Job::Renew(chunk));
        }
    }

    pub(super) fn spawn_job(&mut self, job: Job) {
        self.retry_at = None;
        let presence = self.presence.clone();
        let node = self.settings.node.clone();
        self.job = Some(tokio::spawn(async move {
            let started = Instant::now();
            let result = match &job {
                Job::Flush(writes) => presence.write_presence(&node, writes.clone()).await,
                Job::Renew(entries) => presence.renew_presence(&node, entries.clone()).await,
            };
            JobDone {
                job,
                result,
                took: started.elapsed(),
            }
        }));
    }

    pub(super) fn job_done(&mut self, done: JobDone) {
        let ok = done.result.is_ok();
        match (&done.job, done.result) {
            (Job::Flush(writes), Ok(changed)) => {
                metrics::histogram!(m::FLUSH_SECONDS).record(done.took.as_secs_f64());
                metrics::counter!(m::FLUSHES, "result" => "ok").increment(1);
                metrics::counter!(m::PRESENCE_WRITES).increment(writes.len() as u64);
                for write in writes {
                    if let Some(slot) = self.users.get_mut(&write.user) {
                        slot.flushed = write.entry;
                        slot.in_flight = false;
                        if write.status.is_some() {
                            slot.chosen_here = write.status.clone();
                        }
                    }
                    self.forget_if_done(&write.user);
                }
                self.hooks.changed(&self.settings.node, changed);
            }
            (Job::Flush(writes), Err(e)) => {
                metrics::counter!(m::FLUSHES, "result" => "error").increment(1);
                tracing::warn!(shard = self.index, error = %e, users = writes.len(), "presence flush failed; will retry");
                for write in writes {
                    if let Some(slot) = self.users.get_mut(&write.user) {
                        slot.in_flight = false;
                        if slot.pending_status.is_none() {
                            slot.pending_status = write.status.clone();
                        }
                    }
                    self.dirty.insert(write.user.clone());
                }
                self.first_dirty_at.get_or_insert_with(Instant::now);
            }
            (Job::Renew(entries), Ok(changed)) => {
                metrics::counter!(m::RENEWALS, "result" => "ok").increment(entries.len() as u64);
                if !changed.is_empty() {
                    tracing::info!(
                        shard = self.index,
                        restored = changed.len(),
                        "renewal restored presence the backend had lost"
                    );
                }
                self.hooks.changed(&self.settings.node, changed);
            }
            (Job::Renew(entries), Err(e)) => {
                metrics::counter!(m::RENEWALS, "result" => "error").increment(entries.len() as u64);
                tracing::warn!(shard = self.index, error = %e, "presence renewal failed; will retry");
                self.renew_queue
                    .extend(entries.iter().map(|r| r.user.clone()));
            }
        }
        if ok {
            self.backoff = MIN_BACKOFF;
        } else {
            self.retry_at = Some(Instant::now() + self.backoff);
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
        metrics::gauge!(m::SHARD_USERS, "shard" => self.shard_label.clone())
            .set(self.users.len() as f64);
    }

    /// After `stop`: apply what is still queued, wait for the job in flight, flush what is left.
    pub(super) async fn drain_and_flush(mut self) {
        self.mailbox.close();
        while let Some(cmd) = self.mailbox.recv().await {
            self.handle(cmd);
        }
        if let Some(job) = self.job.take()
            && let Ok(done) = job.await
        {
            self.job_done(done);
        }
        self.retry_at = None;
        if !self.dirty.is_empty() {
            self.start_flush(false);
            if let Some(job) = self.job.take()
                && let Ok(done) = job.await
            {
                self.job_done(done);
            }
        }
    }
}

/// A token bucket of early flushes: `per_sec` a second, in bursts of at most as many. Written
/// here rather than taken from a rate-limiting crate: it lives inside one worker's task, needs no
/// synchronisation or clock of its own, and is a few lines.
pub(super) struct EarlyFlushes {
    per_sec: f64,
    tokens: f64,
    at: Instant,
}

impl EarlyFlushes {
    pub(super) fn new(per_sec: u32) -> Self {
        EarlyFlushes {
            per_sec: f64::from(per_sec),
            tokens: f64::from(per_sec),
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * self.per_sec;
        self.tokens = (self.tokens + earned).min(self.per_sec);
        self.at = now;
    }

    /// Spends one early flush if there is one.
    pub(super) fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the next early flush can be spent (far away with a budget of none).
    pub(super) fn next_at(&self) -> Instant {
        if self.per_sec <= 0.0 {
            return self.at + Duration::from_secs(86_400);
        }
        let wait = ((1.0 - self.tokens).max(0.0) / self.per_sec).min(86_400.0);
        self.at + Duration::from_secs_f64(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refills_at_its_rate_up_to_one_second_of_it() {
        let start = Instant::now();
        let mut early = EarlyFlushes::new(4);
        early.at = start;
        assert!((0..4).all(|_| early.take(start)));
        assert!(!early.take(start));
        assert_eq!(early.next_at(), start + Duration::from_millis(250));
        assert!(early.take(start + Duration::from_millis(250)));
        assert!(!early.take(start + Duration::from_millis(250)));
        let later = start + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| early.take(later)).count(), 4);
    }

    #[test]
    fn a_budget_of_none_never_flushes_early() {
        let now = Instant::now();
        let mut early = EarlyFlushes::new(0);
        assert!(!early.take(now + Duration::from_secs(5)));
        assert!(early.next_at() > now + Duration::from_secs(3600));
    }
}
