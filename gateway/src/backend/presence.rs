//! The presence role: where each node's entries for its users live, how they expire, and what a
//! change publishes. Written by the shard workers; read by queries, REST and the registry gauge.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::Serialize;
use shared::Platform;

use super::BackendError;
use crate::presence::{ChosenStatus, NodeEntry, PresenceRecord};

/// Presence kept per (user, node) entry.
///
/// - Every entry expires `presence_ttl` after it was last written or renewed, so a crashed node's
///   users stop counting by themselves; the writer renews every third of the TTL.
/// - A user's record changes only when their visible presence does (status, platform set, text);
///   each change gets a version above every earlier one of that user, even after data loss. Its
///   public version moves only when what others see changes (`PresenceRecord::public_view`).
/// - Every record change is published exactly once, to every node that watches the user
///   ([`super::Subscriptions`]), in version order per user.
/// - A write that fails changed nothing the caller relies on; the caller retries it.
#[async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// Writes one shard's batch of `node`'s entries and status changes, and publishes the
    /// resulting record changes. Returns the changed records (for webhooks and metrics).
    async fn write_presence(
        &self,
        node: &str,
        writes: Vec<PresenceWrite>,
    ) -> Result<Vec<Changed>, BackendError>;

    /// Renews `node`'s entries, re-creating those that are missing (the backend lost them), and
    /// publishes whatever that changed.
    async fn renew_presence(
        &self,
        node: &str,
        entries: Vec<Renewal>,
    ) -> Result<Vec<Changed>, BackendError>;

    /// Current records, in the order asked; unknown users come back offline with version 0.
    async fn presence(&self, users: &[String]) -> Result<Vec<PresenceRecord>, BackendError>;

    /// Visibly online users in id order after `after`, at most `limit`, optionally only those on
    /// `platform`; and the cursor of the next page (`None` at the end).
    async fn online_users(
        &self,
        after: Option<&str>,
        limit: usize,
        platform: Option<Platform>,
    ) -> Result<(Vec<String>, Option<String>), BackendError>;

    /// Visibly online users overall and per platform. Read from counters kept with every write,
    /// so it costs the same at any number of users. A crashed node's users count until it is
    /// reaped (or a repair step finds their entries expired), within TTL + TTL/3.
    async fn counts(&self) -> Result<Counts, BackendError>;

    /// One small step of checking the online index (and so the counts) against the users'
    /// records and correcting what disagrees. On Redis the index is written in a second step
    /// after each record (a cluster cannot do both in one), so a node that died in between, or
    /// a node of an older version, can leave an entry wrong; renewals restate every live user,
    /// and these steps, run by every node, walk the whole index. Backends whose index cannot
    /// drift do nothing.
    async fn repair_index(&self) -> Result<IndexRepair, BackendError>;
}

/// What one [`PresenceStore::repair_index`] step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexRepair {
    /// Index entries checked against their records.
    pub checked: usize,
    /// Entries corrected.
    pub fixed: u64,
    /// This node's walk has just covered the whole index once (since its previous pass ended).
    pub pass_done: bool,
}

/// One user's change in one shard's batch.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceWrite {
    pub user: String,
    /// This node's entry for the user after the batch; `None` removes it (no local connection left).
    pub entry: Option<NodeEntry>,
    /// The entry the backend held from this node before (as last acknowledged), so indexes can be
    /// updated without reading it back.
    pub before: Option<NodeEntry>,
    /// A new chosen status, when the user set one in this batch.
    pub status: Option<ChosenStatus>,
}

/// One user's entry to renew.
#[derive(Debug, Clone, PartialEq)]
pub struct Renewal {
    pub user: String,
    pub entry: NodeEntry,
    /// The status last chosen through this node, restored only if the backend lost the user's
    /// record (so an invisible user stays invisible after Redis comes back empty).
    pub chosen: Option<ChosenStatus>,
}

/// One record change, with what came before it where a transition matters (webhooks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// Platform mask before the change: 0 means the user had no connection anywhere.
    pub before_platforms: u16,
    pub record: PresenceRecord,
    /// Others see the change too (`record.public_version` moved); else only the user does (an
    /// invisible user connecting, disconnecting or switching platforms).
    pub public_changed: bool,
    /// Where the transition's webhook event stands (nothing to do without a transition).
    pub webhook: WebhookWritten,
}

/// Whether the backend queued a transition's webhook event in the same atomic write as the
/// transition itself. A node that queues it afterwards can die in between (SIGKILL right after
/// the write), and nobody would ever send that event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WebhookWritten {
    /// The caller queues it (`ChangeHooks`), if webhooks are on.
    #[default]
    NotQueued,
    /// Queued with the write: the caller only wakes its delivery loop.
    Queued,
    /// The write found the queue at its bound (`PRESENCE_WEBHOOK_QUEUE_MAX`) and dropped it.
    Refused,
}

impl Changed {
    /// `Some(true)` when the user just connected somewhere, `Some(false)` when their last
    /// connection anywhere went away.
    pub fn transition(&self) -> Option<bool> {
        match (self.before_platforms != 0, self.record.platforms != 0) {
            (false, true) => Some(true),
            (true, false) => Some(false),
            _ => None,
        }
    }
}

/// Online users overall and per platform (users with a connection on that platform).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub online_users: u64,
    pub by_platform: BTreeMap<Platform, u64>,
}

impl Counts {
    /// A user moved from counted with the platform mask `before` (`None`: not counted) to
    /// `after`.
    pub fn moved(&mut self, before: Option<u16>, after: Option<u16>) {
        for (mask, up) in [(before, false), (after, true)] {
            let Some(mask) = mask else { continue };
            let step = |n: &mut u64| *n = if up { *n + 1 } else { n.saturating_sub(1) };
            step(&mut self.online_users);
            for p in crate::presence::platforms_of(mask) {
                let n = self.by_platform.entry(p).or_default();
                step(n);
                if *n == 0 {
                    self.by_platform.remove(&p);
                }
            }
        }
    }
}
