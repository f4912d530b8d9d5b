//! One shard worker: the only owner of its users' local state. It applies commands in order,
//! batches presence changes (flushing at `batch_max` changes or `batch_interval` after the first),
//! renews this node's entries every third of the TTL, and fans presence events out to local
//! watchers. At most one backend job (flush or renewal) is in flight, so writes stay in order; a
//! failed job leaves its users dirty and is retried with backoff, so nothing is lost while the
//! backend is away. It also owns which group each of its users' local connections follows.
//!
//! The loop and the command `match` are here; `batch.rs` runs the backend jobs and `delivery.rs`
//! passes events, messages and group attachments on.

mod batch;
mod delivery;
mod gaps;
mod reread;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use tokio::{
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, MissedTickBehavior, interval, interval_at, sleep_until},
};
use tokio_util::sync::CancellationToken;

use super::{ShardBackend, ShardCmd, ShardSettings, Shards};
use crate::{
    backend::{
        BackendError, Changed, MessageStore, PresenceStore, PresenceWrite, Renewal, Subscriptions,
        Topic, msg_id,
    },
    clock::now_ms,
    conn_handle::{ConnHandle, ConnId},
    hooks::ChangeHooks,
    presence::{ChosenStatus, NodeEntry, platform_bit},
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
    /// The groups each of those connections gets messages of (it is attached at each group's
    /// shard); only connections that follow at least one group have an entry.
    groups: HashMap<ConnId, HashSet<String>>,
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
    /// Highest event version (`version`, what the user sees of themselves) seen since the user
    /// was first watched here: later events with lower versions are stale for the user's own
    /// watchers.
    seen_version: u64,
    /// Highest public version (what others see) seen since the user was first watched here: an
    /// event shows others something only above it, so they never see it go back, nor an event
    /// for a change they cannot see (an invisible user connecting or switching platforms).
    seen_public_version: u64,
    /// Watchers were last shown the user offline (a re-read finding no record sends nothing).
    shown_offline: bool,
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

    /// Watchers want this change at once: the user came online, on a new platform, back from
    /// idle, or chose a status. Going offline, or idle, waits for the batch, so that a client that
    /// drops and reconnects within it is never seen offline.
    fn is_urgent(&self) -> bool {
        if self.pending_status.is_some() {
            return true;
        }
        match (self.desired_entry(), self.flushed) {
            (Some(_), None) => true,
            (Some(want), Some(had)) => {
                want.platforms & !had.platforms != 0 || (had.idle && !want.idle)
            }
            (None, _) => false,
        }
    }

    /// While the node drains, connections close without taking anything from the entry: what
    /// the backend holds stays (a drained user is handed over, not removed), and a connection
    /// opened meanwhile still adds its platform.
    fn draining_entry(&self) -> Option<NodeEntry> {
        match (self.desired_entry(), self.flushed) {
            (Some(now), Some(held)) => Some(NodeEntry {
                platforms: now.platforms | held.platforms,
                idle: now.idle,
            }),
            (now, held) => now.or(held),
        }
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

/// Where a group's local delivery stands (message ids sort as strings in send order).
struct GroupMark {
    id: String,
    /// `id` is a message passed on here (not just the time the group got local members): live
    /// messages at or below it are repeats of a history re-read.
    delivered: bool,
    /// Where messages may have been missed since the backend was last found away (later live
    /// messages move `id` past them before the re-read runs; these keep them).
    gaps: gaps::Gaps,
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
    /// Group history, to fill what local members missed while events were lost.
    messages: Arc<dyn MessageStore>,
    hooks: ChangeHooks,
    /// Other shards, for membership changes that touch a group owned elsewhere.
    shards: Shards,
    mailbox: mpsc::Receiver<ShardCmd>,
    users: HashMap<String, UserSlot>,
    /// Local member connections of the groups on this shard.
    groups: HashMap<String, HashMap<ConnId, Arc<ConnHandle>>>,
    /// Per group with local members, the last message they were passed (or, before any, when
    /// the group got its first local member): where a re-read of its history starts.
    group_marks: HashMap<String, GroupMark>,
    /// Users changed since the last flush began.
    dirty: HashSet<String>,
    /// One of them changed in a way watchers want at once ([`UserSlot::is_urgent`]).
    urgent: bool,
    early: batch::EarlyFlushes,
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
    /// When to re-read the presence of watched users (after the backend came back).
    reread_at: Option<Instant>,
    /// A re-read is running.
    rereading: bool,
    /// Numbers reads of group history, so each closes only the gaps it covered.
    reads: u64,
    /// The node drains with a handover: closing connections leave the entry as it is.
    draining: bool,
}

impl Worker {
    pub(super) fn new(
        index: usize,
        settings: ShardSettings,
        backend: ShardBackend,
        hooks: ChangeHooks,
        shards: Shards,
        mailbox: mpsc::Receiver<ShardCmd>,
    ) -> Self {
        let ShardBackend {
            presence,
            subscriptions,
            messages,
        } = backend;
        let early = batch::EarlyFlushes::new(settings.early_flushes_per_sec, settings.batch_max);
        Worker {
            index,
            settings,
            presence,
            subscriptions,
            messages,
            hooks,
            shards,
            mailbox,
            users: HashMap::new(),
            groups: HashMap::new(),
            group_marks: HashMap::new(),
            dirty: HashSet::new(),
            urgent: false,
            early,
            first_dirty_at: None,
            job: None,
            renew_due: false,
            renew_queue: Vec::new(),
            retry_at: None,
            backoff: MIN_BACKOFF,
            shard_label: index.to_string(),
            reread_at: None,
            rereading: false,
            reads: 0,
            draining: false,
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
            let reread_at = match self.reread_at {
                Some(at) if !self.rereading => at,
                _ => Instant::now() + far,
            };
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
                _ = sleep_until(reread_at), if self.reread_at.is_some() && !self.rereading => {
                    self.start_reread();
                }
                _ = idle_check.tick() => self.check_idle(),
            }
            self.maybe_start_job();
        }
        self.drain_and_flush().await;
    }

    fn handle(&mut self, cmd: ShardCmd) {
        match cmd {
            ShardCmd::Connect {
                conn,
                welcome,
                offline,
                groups,
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
                slot.conns.push(conn.clone());
                let _ = reply.send(true);
                for group in groups {
                    self.follow(&conn, group, true, None, None);
                }
                self.refresh_idle(&user);
                self.mark_dirty(user);
            }
            ShardCmd::Disconnect { user, conn } => {
                let Some(slot) = self.users.get_mut(&user) else {
                    return;
                };
                let had = !slot.conns.is_empty();
                slot.conns.retain(|c| c.id != conn);
                let followed = slot.groups.remove(&conn).unwrap_or_default();
                if had && slot.conns.is_empty() {
                    self.subscriptions.unwatch(vec![Topic::Inbox(user.clone())]);
                }
                for group in followed {
                    let index = self.shards.index_of(&group);
                    self.shards
                        .forward(index, ShardCmd::GroupDetach { group, conn }, None);
                }
                self.refresh_idle(&user);
                self.mark_dirty(user);
            }
            ShardCmd::Drain => self.draining = true,
            ShardCmd::Active { user } => self.refresh_idle(&user),
            ShardCmd::SetStatus { user, status } => {
                if let Some(slot) = self.users.get_mut(&user) {
                    slot.pending_status = Some(status);
                    self.mark_dirty(user);
                }
            }
            ShardCmd::Watch {
                users,
                conn,
                confirmed,
            } => {
                let mut new = Vec::new();
                for user in users {
                    let slot = self.users.entry(user.clone()).or_default();
                    if slot.watchers.is_empty() {
                        new.push(Topic::Presence(user));
                    }
                    slot.watchers.insert(conn.id, conn.clone());
                }
                match (new.is_empty(), confirmed) {
                    (false, Some(confirmed)) => self.subscriptions.watch_confirmed(new, confirmed),
                    (false, None) => self.subscriptions.watch(new),
                    // Watched already: its events arrive.
                    (true, Some(confirmed)) => {
                        let _ = confirmed.send(());
                    }
                    (true, None) => {}
                }
            }
            ShardCmd::Unwatch { users, conn } => {
                let mut gone = Vec::new();
                for user in users {
                    if let Some(slot) = self.users.get_mut(&user) {
                        if slot.watchers.remove(&conn).is_some() && slot.watchers.is_empty() {
                            slot.seen_version = 0;
                            slot.seen_public_version = 0;
                            slot.shown_offline = false;
                            gone.push(Topic::Presence(user.clone()));
                        }
                        self.forget_if_done(&user);
                    }
                }
                if !gone.is_empty() {
                    self.subscriptions.unwatch(gone);
                }
            }
            ShardCmd::Presence {
                record,
                public_changed,
            } => self.fan_out(record, public_changed),
            ShardCmd::Resync => {
                self.renew_due = true;
                self.retry_at = None;
                self.schedule_reread();
            }
            ShardCmd::Reread(reread) => self.reread(reread),
            ShardCmd::Gap => self.note_gap(),
            ShardCmd::Deliver(delivery) => self.deliver(&delivery),
            ShardCmd::Membership {
                user,
                group,
                joined,
            } => {
                let conns = self.users.get(&user).map(|s| s.conns.clone());
                for conn in conns.into_iter().flatten() {
                    self.follow(&conn, group.clone(), joined, None, None);
                }
            }
            ShardCmd::Control { user, control } => self.control(&user, &control),
            ShardCmd::Connections { user, reply } => {
                let _ = reply.send(self.connections(&user));
            }
            ShardCmd::Follow {
                conn,
                group,
                joined,
                since,
                done,
            } => self.follow(&conn, group, joined, since, Some(done)),
            ShardCmd::GroupAttach { group, conn, since } => {
                if conn.is_closing() {
                    return;
                }
                if self.groups.get(&group).is_none_or(|m| m.is_empty()) {
                    // Until the node hears the group, what is sent to it is missed here: a gap
                    // from now, filled once the subscription is confirmed.
                    let id = msg_id(now_ms(), 0);
                    let mut gaps = gaps::Gaps::default();
                    gaps.open(&id);
                    self.group_marks.insert(
                        group.clone(),
                        GroupMark {
                            id,
                            delivered: false,
                            gaps,
                        },
                    );
                    self.watch_group(group.clone());
                }
                let members = self.groups.entry(group.clone()).or_default();
                members.insert(conn.id, conn.clone());
                if let (Some(since), Some(mark)) = (since, self.group_marks.get(&group)) {
                    // What was sent before now is at or below the mark; what follows comes live.
                    let up_to = mark.id.clone();
                    self.backfill(conn, group, since, up_to);
                }
            }
            ShardCmd::GroupDetach { group, conn } => self.detach(&group, conn),
        }
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
        if !self.urgent && self.users.get(&user).is_some_and(UserSlot::is_urgent) {
            self.urgent = true;
        }
        self.early.note_change();
        self.dirty.insert(user);
        self.first_dirty_at.get_or_insert_with(Instant::now);
    }

    fn forget_if_done(&mut self, user: &str) {
        if self.users.get(user).is_some_and(UserSlot::is_forgettable) && !self.dirty.contains(user)
        {
            self.users.remove(user);
        }
    }
}
