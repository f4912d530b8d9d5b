//! One shard worker: the only owner of its users' local state. It applies commands in order,
//! batches presence changes (flushing at `batch_max` changes or `batch_interval` after the first),
//! renews this node's entries every third of the TTL, and fans presence events out to local
//! watchers. At most one backend job (flush or renewal) is in flight, so writes stay in order; a
//! failed job leaves its users dirty and is retried with backoff, so nothing is lost while the
//! backend is away.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use shared::{Presence, ServerFrame};
use tokio::{
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, MissedTickBehavior, interval, interval_at, sleep_until},
};
use tokio_util::sync::CancellationToken;

use super::{ShardCmd, ShardSettings, Shards};
use crate::{
    backend::{
        Audience, BackendError, Changed, Delivery, PresenceStore, PresenceWrite, Renewal,
        Subscriptions, Topic,
    },
    clock::now_ms,
    conn_handle::{ConnHandle, ConnId},
    frame::EncodedFrame,
    hooks::ChangeHooks,
    metrics as m,
    presence::{ChosenStatus, NodeEntry, PresenceRecord, platform_bit},
};

/// Longest pause between retries of a failed backend job.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Users per renewal job. A round renews every user of the shard in jobs of this size, so flushes
/// due in the meantime go between them instead of waiting for the whole shard.
const RENEW_CHUNK: usize = 500;

/// Waits for the job in flight; never completes when there is none.
async fn wait_job(
    job: &mut Option<JoinHandle<JobDone>>,
) -> Result<JobDone, tokio::task::JoinError> {
    match job {
        Some(job) => job.await,
        None => std::future::pending().await,
    }
}

/// What this node knows of one user of this shard.
#[derive(Default)]
struct UserSlot {
    /// The user's connections on this node.
    conns: Vec<Arc<ConnHandle>>,
    /// Connections on this node that subscribed to the user.
    watchers: HashMap<u64, Arc<ConnHandle>>,
    /// This node's entry as the backend last acknowledged it.
    flushed: Option<NodeEntry>,
    /// Every local connection idle for `idle_away`.
    idle: bool,
    /// A status set since the last flush.
    pending_status: Option<ChosenStatus>,
    /// The status last chosen through this node and written, kept to restore it if the backend
    /// loses the user's record.
    chosen_here: Option<ChosenStatus>,
    /// Part of the backend job in flight.
    in_flight: bool,
    /// Highest event version passed to watchers: later events with lower versions are stale.
    seen_version: u64,
    /// Last presence shown to watchers other than the user, to skip events that change nothing
    /// they can see (an invisible user switching platforms).
    last_public: Option<Presence>,
}

impl UserSlot {
    fn desired_entry(&self) -> Option<NodeEntry> {
        if self.conns.is_empty() {
            return None;
        }
        let platforms = self
            .conns
            .iter()
            .fold(0, |mask, c| mask | platform_bit(c.platform));
        Some(NodeEntry {
            platforms,
            idle: self.idle,
        })
    }

    fn is_forgettable(&self) -> bool {
        // `chosen_here` is only worth keeping while the user is connected here.
        self.conns.is_empty()
            && self.watchers.is_empty()
            && self.flushed.is_none()
            && self.pending_status.is_none()
            && !self.in_flight
    }
}

enum Job {
    Flush(Vec<PresenceWrite>),
    Renew(Vec<Renewal>),
}

struct JobDone {
    job: Job,
    result: Result<Vec<Changed>, BackendError>,
    took: Duration,
}

pub(super) struct Worker {
    index: usize,
    settings: ShardSettings,
    presence: Arc<dyn PresenceStore>,
    subscriptions: Arc<dyn Subscriptions>,
    hooks: ChangeHooks,
    /// Other shards, for membership changes that touch a group owned elsewhere.
    shards: Shards,
    mailbox: mpsc::Receiver<ShardCmd>,
    users: HashMap<String, UserSlot>,
    /// Local member connections of the groups on this shard.
    groups: HashMap<String, HashMap<ConnId, Arc<ConnHandle>>>,
    /// Users changed since the last flush began.
    dirty: HashSet<String>,
    /// When the oldest pending change arrived: the batch is due `batch_interval` after it.
    first_dirty_at: Option<Instant>,
    job: Option<JoinHandle<JobDone>>,
    /// A renewal round is due: every user with an entry gets renewed.
    renew_due: bool,
    /// Users still to renew in the current round.
    renew_queue: Vec<String>,
    /// Failed jobs wait until then.
    retry_at: Option<Instant>,
    backoff: Duration,
    shard_label: String,
}

impl Worker {
    pub(super) fn new(
        index: usize,
        settings: ShardSettings,
        presence: Arc<dyn PresenceStore>,
        subscriptions: Arc<dyn Subscriptions>,
        hooks: ChangeHooks,
        shards: Shards,
        mailbox: mpsc::Receiver<ShardCmd>,
    ) -> Self {
        Worker {
            index,
            settings,
            presence,
            subscriptions,
            hooks,
            shards,
            mailbox,
            users: HashMap::new(),
            groups: HashMap::new(),
            dirty: HashSet::new(),
            first_dirty_at: None,
            job: None,
            renew_due: false,
            renew_queue: Vec::new(),
            retry_at: None,
            backoff: MIN_BACKOFF,
            shard_label: index.to_string(),
        }
    }

    pub(super) async fn run(mut self, stop: CancellationToken) {
        // Each shard starts its rounds at a random point of the interval, so a node's shards (and
        // nodes started together) do not renew all at once.
        let period = self.settings.renew_interval;
        let mut renew = interval_at(
            Instant::now() + period.mul_f64(rand::random::<f64>()),
            period,
        );
        renew.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let idle_every =
            (self.settings.idle_away / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut idle_check = interval(idle_every);
        idle_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let far = Duration::from_secs(86_400);

        loop {
            let flush_at = self.next_flush_at().unwrap_or_else(|| Instant::now() + far);
            tokio::select! {
                biased;
                done = wait_job(&mut self.job), if self.job.is_some() => {
                    self.job = None;
                    match done {
                        Ok(done) => self.job_done(done),
                        Err(e) => tracing::error!(shard = self.index, error = %e, "backend job panicked"),
                    }
                }
                cmd = self.mailbox.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                },
                _ = stop.cancelled() => break,
                _ = sleep_until(flush_at), if self.job.is_none() => {}
                _ = renew.tick() => self.renew_due = true,
                _ = idle_check.tick() => self.check_idle(),
            }
            self.maybe_start_job();
        }
        self.drain_and_flush().await;
    }

    /// When the pending batch (or a retry) is due.
    fn next_flush_at(&self) -> Option<Instant> {
        if self.dirty.is_empty() && !self.renew_due && self.renew_queue.is_empty() {
            return None;
        }
        if let Some(retry) = self.retry_at {
            return Some(retry);
        }
        if self.renew_due || !self.renew_queue.is_empty() {
            return Some(Instant::now());
        }
        self.first_dirty_at
            .map(|t| t + self.settings.batch_interval)
    }

    fn handle(&mut self, cmd: ShardCmd) {
        match cmd {
            ShardCmd::Connect {
                conn,
                welcome,
                offline,
                reply,
            } => {
                let max = self.settings.max_conns_per_user;
                let slot = self.users.entry(conn.user.clone()).or_default();
                if slot.conns.len() >= max {
                    let _ = reply.send(false);
                    return;
                }
                let user = conn.user.clone();
                conn.push(&welcome);
                for message in &offline {
                    conn.push(message);
                }
                if slot.conns.is_empty() {
                    self.subscriptions.watch(vec![Topic::Inbox(user.clone())]);
                }
                slot.conns.push(conn);
                let _ = reply.send(true);
                self.refresh_idle(&user);
                self.mark_dirty(user);
            }
            ShardCmd::Disconnect { user, conn } => {
                if let Some(slot) = self.users.get_mut(&user) {
                    let had = !slot.conns.is_empty();
                    slot.conns.retain(|c| c.id != conn);
                    if had && slot.conns.is_empty() {
                        self.subscriptions.unwatch(vec![Topic::Inbox(user.clone())]);
                    }
                    self.refresh_idle(&user);
                    self.mark_dirty(user);
                }
            }
            ShardCmd::Active { user } => self.refresh_idle(&user),
            ShardCmd::SetStatus { user, status } => {
                if let Some(slot) = self.users.get_mut(&user) {
                    slot.pending_status = Some(status);
                    self.mark_dirty(user);
                }
            }
            ShardCmd::Watch { users, conn } => {
                let mut new = Vec::new();
                for user in users {
                    let slot = self.users.entry(user.clone()).or_default();
                    if slot.watchers.is_empty() {
                        new.push(Topic::Presence(user));
                    }
                    slot.watchers.insert(conn.id, conn.clone());
                }
                if !new.is_empty() {
                    self.subscriptions.watch(new);
                }
            }
            ShardCmd::Unwatch { users, conn } => {
                let mut gone = Vec::new();
                for user in users {
                    if let Some(slot) = self.users.get_mut(&user) {
                        if slot.watchers.remove(&conn).is_some() && slot.watchers.is_empty() {
                            slot.seen_version = 0;
                            slot.last_public = None;
                            gone.push(Topic::Presence(user.clone()));
                        }
                        self.forget_if_done(&user);
                    }
                }
                if !gone.is_empty() {
                    self.subscriptions.unwatch(gone);
                }
            }
            ShardCmd::Presence(record) => self.fan_out(record),
            ShardCmd::Resync => {
                self.renew_due = true;
                self.retry_at = None;
            }
            ShardCmd::Deliver(delivery) => self.deliver(&delivery),
            ShardCmd::Membership {
                user,
                group,
                joined,
            } => self.membership(&user, group, joined),
            ShardCmd::GroupAttach { group, conn } => {
                if conn.is_closing() {
                    return;
                }
                let members = self.groups.entry(group.clone()).or_default();
                if members.is_empty() {
                    self.subscriptions.watch(vec![Topic::Group(group.clone())]);
                }
                members.insert(conn.id, conn);
            }
            ShardCmd::GroupDetach { group, conn } => self.detach(&group, conn),
        }
    }

    fn detach(&mut self, group: &str, conn: ConnId) {
        if let Some(members) = self.groups.get_mut(group) {
            members.remove(&conn);
            if members.is_empty() {
                self.groups.remove(group);
                self.subscriptions
                    .unwatch(vec![Topic::Group(group.to_string())]);
            }
        }
    }

    /// Passes a message to the local connections it is for; the sending connection gets an `ack`
    /// instead, every other connection (the sender's other devices included) a copy.
    fn deliver(&mut self, delivery: &Delivery) {
        let frame = EncodedFrame::new(ServerFrame::Message(delivery.message.clone()));
        let node = &*self.settings.node;
        let is_origin = |c: &ConnHandle| {
            delivery
                .origin
                .as_ref()
                .is_some_and(|o| o.conn == c.id && o.node == node)
        };
        let mut sent = 0u64;
        let mut push = |c: &Arc<ConnHandle>| {
            if !is_origin(c) && c.push(&frame) {
                sent += 1;
            }
        };
        match &delivery.audience {
            Audience::User(user) => {
                if let Some(slot) = self.users.get(user) {
                    slot.conns.iter().for_each(&mut push);
                }
            }
            Audience::Group(group) => {
                let mut closed = Vec::new();
                if let Some(members) = self.groups.get(group) {
                    for conn in members.values() {
                        if conn.is_closing() {
                            closed.push(conn.id);
                        } else {
                            push(conn);
                        }
                    }
                }
                for conn in closed {
                    self.detach(group, conn);
                }
            }
            Audience::All => {
                for slot in self.users.values() {
                    slot.conns.iter().for_each(&mut push);
                }
            }
        }
        metrics::counter!(m::DELIVERIES).increment(sent);
        let age = now_ms().saturating_sub(delivery.message.sent_at);
        metrics::histogram!(m::DELIVERY_SECONDS).record(age as f64 / 1000.0);
    }

    /// A user of this shard joined or left a group: each of their connections here is attached to
    /// (or detached from) the group's shard, from a task so shards never wait on each other.
    fn membership(&mut self, user: &str, group: String, joined: bool) {
        let Some(slot) = self.users.get(user) else {
            return;
        };
        if slot.conns.is_empty() {
            return;
        }
        let conns = slot.conns.clone();
        let shards = self.shards.clone();
        tokio::spawn(async move {
            for conn in &conns {
                shards.follow_group(conn, &group, joined).await;
            }
        });
    }

    /// Recomputes whether every local connection of `user` is idle; a change is a presence change.
    fn refresh_idle(&mut self, user: &str) {
        let idle_ms = self.settings.idle_away.as_millis() as u64;
        let now = now_ms();
        let Some(slot) = self.users.get_mut(user) else {
            return;
        };
        let idle = !slot.conns.is_empty()
            && slot
                .conns
                .iter()
                .all(|c| now.saturating_sub(c.last_activity()) >= idle_ms);
        if idle != slot.idle {
            slot.idle = idle;
            self.mark_dirty(user.to_string());
        }
    }

    fn check_idle(&mut self) {
        let users: Vec<String> = self
            .users
            .iter()
            .filter(|(_, s)| !s.conns.is_empty())
            .map(|(u, _)| u.clone())
            .collect();
        for user in users {
            self.refresh_idle(&user);
        }
    }

    fn mark_dirty(&mut self, user: String) {
        self.dirty.insert(user);
        self.first_dirty_at.get_or_insert_with(Instant::now);
    }

    fn forget_if_done(&mut self, user: &str) {
        if self.users.get(user).is_some_and(UserSlot::is_forgettable) && !self.dirty.contains(user)
        {
            self.users.remove(user);
        }
    }

    /// Starts a flush when the batch is full or due, else a renewal when due; one job at a time.
    fn maybe_start_job(&mut self) {
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
        if batch_due {
            self.start_flush();
        } else if self.renew_due || !self.renew_queue.is_empty() {
            self.start_renew();
        }
    }

    fn start_flush(&mut self) {
        self.first_dirty_at = None;
        self.retry_at = None;
        let mut writes = Vec::with_capacity(self.dirty.len().min(self.settings.batch_max * 4));
        for user in std::mem::take(&mut self.dirty) {
            let Some(slot) = self.users.get_mut(&user) else {
                continue;
            };
            let entry = slot.desired_entry();
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
    fn start_renew(&mut self) {
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

    fn spawn_job(&mut self, job: Job) {
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

    fn job_done(&mut self, done: JobDone) {
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
        metrics::gauge!(m::SHARD_QUEUE_DEPTH, "shard" => self.shard_label.clone())
            .set((self.mailbox.max_capacity() - self.mailbox.capacity()) as f64);
        metrics::gauge!(m::SHARD_USERS, "shard" => self.shard_label.clone())
            .set(self.users.len() as f64);
    }

    /// Passes a presence change to this node's watchers of the user, once per version.
    fn fan_out(&mut self, record: PresenceRecord) {
        let Some(slot) = self.users.get_mut(&record.user) else {
            return;
        };
        if slot.watchers.is_empty() || record.version <= slot.seen_version {
            return;
        }
        slot.seen_version = record.version;
        let public = record.public_view();
        let public_changed = slot.last_public.as_ref().is_none_or(|p| {
            p.status != public.status || p.platforms != public.platforms || p.text != public.text
        });
        let own_view = (record.status == shared::Status::Invisible)
            .then(|| EncodedFrame::new(ServerFrame::Presence(record.view_for(Some(&record.user)))));
        let public_frame = EncodedFrame::new(ServerFrame::Presence(public.clone()));
        slot.last_public = Some(public);
        let mut sent = 0u64;
        for watcher in slot.watchers.values() {
            let frame = match &own_view {
                Some(own) if watcher.user == record.user => own,
                _ if public_changed || watcher.user == record.user => &public_frame,
                _ => continue,
            };
            if watcher.push(frame) {
                sent += 1;
            }
        }
        metrics::counter!(m::PRESENCE_EVENTS_DELIVERED).increment(sent);
    }

    /// After `stop`: apply what is still queued, wait for the job in flight, flush what is left.
    async fn drain_and_flush(mut self) {
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
            self.start_flush();
            if let Some(job) = self.job.take()
                && let Ok(done) = job.await
            {
                self.job_done(done);
            }
        }
    }
}
