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

/// A token bucket of early flushes: `per_sec` a second, in bursts of at most as many; and held
/// altogether while the shard's changes come at a storm's rate. Written here rather than taken
/// from a rate-limiting crate: it lives inside one worker's task, needs no synchronisation or
/// clock of its own, and is a few lines.
///
/// Why the hold: spent one by one, the budget makes every early flush carry the changes of one
/// refill period, `rate / per_sec` users, so early flushes cost `per_sec / rate` round trips per
/// change; at 10,000 changes a second on one node that alone was the storm's 0.02. From
/// [`STORM_FILL`] of a batch per refill period on (at the defaults 5,000 changes a second on a
/// node, whatever its shard count: each shard gets its share of both budget and changes), a batch
/// fills within a few refill periods anyway, so the shard batches everything: a round trip per
/// `batch_max` changes, each waiting for its batch to fill (80 ms at that rate on 4 shards).
pub(super) struct EarlyFlushes {
    per_sec: f64,
    tokens: f64,
    at: Instant,
    /// Changes a second from which a storm holds early flushes.
    storm: f64,
    changes: ChangeRate,
    /// A storm held the last one: look again then, not at every refill.
    held_until: Option<Instant>,
}

/// The share of a batch that one refill period's changes must fill for the shard to be in a
/// storm.
const STORM_FILL: f64 = 0.25;
/// How often a held budget looks at the rate again.
const STORM_RECHECK: Duration = Duration::from_millis(50);

impl EarlyFlushes {
    pub(super) fn new(per_sec: u32, batch_max: usize) -> Self {
        EarlyFlushes {
            per_sec: f64::from(per_sec),
            tokens: f64::from(per_sec),
            at: Instant::now(),
            storm: f64::from(per_sec) * batch_max as f64 * STORM_FILL,
            changes: ChangeRate::new(Instant::now()),
            held_until: None,
        }
    }

    /// A change was marked for the next flush.
    pub(super) fn note_change(&mut self) {
        self.changes.note();
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * self.per_sec;
        self.tokens = (self.tokens + earned).min(self.per_sec);
        self.at = now;
    }

    /// Spends one early flush if there is one and no storm holds them.
    pub(super) fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens < 1.0 {
            return false;
        }
        if self.changes.per_sec(now) >= self.storm {
            self.held_until = Some(now + STORM_RECHECK);
            return false;
        }
        self.held_until = None;
        self.tokens -= 1.0;
        true
    }

    /// When the next early flush can be spent (far away with a budget of none).
    pub(super) fn next_at(&self) -> Instant {
        if self.per_sec <= 0.0 {
            return self.at + Duration::from_secs(86_400);
        }
        let wait = ((1.0 - self.tokens).max(0.0) / self.per_sec).min(86_400.0);
        let refilled = self.at + Duration::from_secs_f64(wait);
        self.held_until.map_or(refilled, |held| held.max(refilled))
    }
}

/// Changes a second over a sliding second: the last whole second's count, weighed by how much of
/// it the sliding second still covers, plus the current one's. Counted without a clock; the
/// windows move when the rate is asked for, which the worker does at every flush it considers.
struct ChangeRate {
    start: Instant,
    current: u32,
    previous: u32,
}

impl ChangeRate {
    fn new(now: Instant) -> Self {
        ChangeRate {
            start: now,
            current: 0,
            previous: 0,
        }
    }

    fn note(&mut self) {
        self.current = self.current.saturating_add(1);
    }

    fn per_sec(&mut self, now: Instant) -> f64 {
        let second = Duration::from_secs(1);
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= second {
            let whole = elapsed.as_secs();
            // More than a window went by unasked: its changes are spread over all of it.
            self.previous = if whole == 1 {
                self.current
            } else {
                (u64::from(self.current) / whole) as u32
            };
            self.current = 0;
            self.start += Duration::from_secs(whole);
        }
        let into = now
            .saturating_duration_since(self.start)
            .as_secs_f64()
            .min(1.0);
        f64::from(self.previous) * (1.0 - into) + f64::from(self.current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refills_at_its_rate_up_to_one_second_of_it() {
        let start = Instant::now();
        let mut early = EarlyFlushes::new(4, 100);
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
        let mut early = EarlyFlushes::new(0, 100);
        assert!(!early.take(now + Duration::from_secs(5)));
        assert!(early.next_at() > now + Duration::from_secs(3600));
    }

    #[test]
    fn a_storm_holds_early_flushes_until_its_rate_falls() {
        let start = Instant::now();
        // 10 a second, batches of 100: a storm from 250 changes a second.
        let mut early = EarlyFlushes::new(10, 100);
        early.at = start;
        early.changes = ChangeRate::new(start);
        for _ in 0..200 {
            early.note_change();
        }
        let t = start + Duration::from_millis(500);
        assert!(early.take(t), "200 changes in half a second are no storm");
        for _ in 0..100 {
            early.note_change();
        }
        assert!(!early.take(t), "300 are");
        // Held: the budget looks again a little later rather than at once.
        assert_eq!(early.next_at(), t + STORM_RECHECK);
        // A second later, the sliding second still holds most of the storm.
        let t = start + Duration::from_millis(1_100);
        assert!(!early.take(t));
        // Quiet for another second: the storm has slid out, and the budget was kept.
        let t = start + Duration::from_millis(2_100);
        assert!((0..9).all(|_| early.take(t)));
    }

    #[test]
    fn a_rate_asked_for_late_spreads_its_changes_over_the_wait() {
        let start = Instant::now();
        let mut rate = ChangeRate::new(start);
        for _ in 0..1_000 {
            rate.note();
        }
        // Asked for ten seconds later: 100 a second, not 1,000.
        let r = rate.per_sec(start + Duration::from_secs(10));
        assert!((r - 100.0).abs() < 1e-9, "{r}");
    }
}
