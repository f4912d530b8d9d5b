//! After the backend was away (or events were lost on the way), watchers may hold a presence that
//! is no longer true: events published meanwhile never arrived, and a Redis restarted empty has
//! forgotten users nobody rewrites. So the shard re-reads the records of every user its local
//! connections watch and passes on what they did not see. Clients drop what they already have
//! (an event whose version is not above the last one they saw), so a repeat costs a frame, never
//! a wrong state.
//!
//! Group messages published while this node was not subscribed (Redis restarted, the subscriber
//! reconnecting) were acknowledged `delivered` if any node heard them; the shard re-reads each of
//! its groups' history after the last message its local members got and passes on the rest.

use std::{sync::Arc, time::Duration};

use shared::ServerFrame;

use tokio::time::Instant;

use super::{super::Reread, Worker};
use crate::{
    clock::now_ms, conn_handle::ConnHandle, frame::EncodedFrame, metrics as m,
    presence::PresenceRecord,
};

/// Users per backend read.
const REREAD_CHUNK: usize = 500;
/// Messages per group a re-read passes on at most; members `sync` the rest.
const GROUP_FILL: usize = 100;
/// A failed re-read is tried again after this long.
const REREAD_RETRY: Duration = Duration::from_secs(1);

impl Worker {
    /// The backend is back: re-read once every node had time to rewrite its presence (they
    /// reconnect within about a second of each other; what they rewrite later reaches watchers
    /// as ordinary events).
    pub(super) fn schedule_reread(&mut self) {
        self.note_gap();
        let at = Instant::now() + self.settings.batch_interval + Duration::from_secs(1);
        self.reread_at = Some(self.reread_at.map_or(at, |t| t.max(at)));
    }

    /// The gap in each group's messages starts at what its members got last: noted when the
    /// subscriber lost its connection, else at the episode's first resync.
    pub(super) fn note_gap(&mut self) {
        for (group, mark) in self.group_marks.iter_mut() {
            mark.gaps.open(&mark.id);
            tracing::debug!(shard = self.index, %group, mark = %mark.id, gaps = ?mark.gaps, "message gap noted");
        }
    }

    pub(super) fn start_reread(&mut self) {
        self.reread_at = None;
        let users: Vec<String> = self
            .users
            .iter()
            .filter(|(_, slot)| !slot.watchers.is_empty())
            .map(|(user, _)| user.clone())
            .collect();
        self.reads += 1;
        let read_id = self.reads;
        let groups: Vec<(String, Vec<String>)> = self
            .group_marks
            .iter_mut()
            .map(|(group, mark)| (group.clone(), mark.gaps.start_reading(&mark.id, read_id)))
            .collect();
        if users.is_empty() && groups.is_empty() {
            return;
        }
        tracing::debug!(
            shard = self.index,
            users = users.len(),
            groups = groups.len(),
            "re-reading presence and group history"
        );
        self.rereading = true;
        let (presence, messages) = (self.presence.clone(), self.messages.clone());
        let (shards, index) = (self.shards.clone(), self.index);
        tokio::spawn(async move {
            // Each part goes back to the shard as it is read; a failure ends the re-read, which
            // is tried again whole.
            let send = |reread| shards.send_to(index, super::ShardCmd::Reread(reread));
            let read = async {
                for (group, starts) in groups {
                    let messages = read_gaps(&*messages, &group, starts).await?;
                    if !send(Reread::Group {
                        group,
                        messages,
                        read: read_id,
                    })
                    .await
                    {
                        return Ok(());
                    }
                }
                for chunk in users.chunks(REREAD_CHUNK) {
                    let read_at = now_ms();
                    let records = presence.presence(chunk).await?;
                    if !send(Reread::Records { records, read_at }).await {
                        return Ok(());
                    }
                }
                Ok::<(), crate::backend::BackendError>(())
            };
            let ok = match read.await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(shard = index, error = %e, "re-read failed; retrying");
                    false
                }
            };
            send(Reread::Finished { ok, read: read_id }).await;
        });
    }

    pub(super) fn reread(&mut self, reread: Reread) {
        match reread {
            Reread::Records { records, read_at } => {
                for record in records {
                    self.reconcile(record, read_at);
                }
            }
            Reread::Group {
                group,
                messages,
                read,
            } => {
                tracing::debug!(
                    shard = self.index,
                    %group,
                    read = messages.len(),
                    after = self.group_marks.get(&group).map(|m| m.id.as_str()),
                    "group history re-read"
                );
                let Some(mark) = self.group_marks.get_mut(&group) else {
                    return;
                };
                tracing::debug!(shard = self.index, %group, read, gaps = ?mark.gaps, "group gaps read");
                let missed = mark.gaps.missed(messages, &mark.id, read);
                for message in missed {
                    metrics::counter!(m::RESYNC_MESSAGES).increment(1);
                    self.deliver_missed(&group, message);
                }
            }
            Reread::Backfill { conn, messages } => {
                for message in messages {
                    let frame = EncodedFrame::new(ServerFrame::Message(message));
                    conn.push(&frame);
                }
            }
            Reread::Subscribed { group } => self.fill_group(group),
            Reread::Failed { read } => self
                .group_marks
                .values_mut()
                .for_each(|mark| mark.gaps.read_failed(read)),
            Reread::Finished { ok, read } => {
                self.rereading = false;
                if !ok {
                    self.group_marks
                        .values_mut()
                        .for_each(|mark| mark.gaps.read_failed(read));
                }
                if !ok && self.reread_at.is_none() {
                    self.reread_at = Some(Instant::now() + REREAD_RETRY);
                }
            }
        }
    }

    /// Starts hearing `group`; once the subscription is confirmed, its gap is filled.
    pub(super) fn watch_group(&self, group: String) {
        let (confirmed, subscribed) = tokio::sync::oneshot::channel();
        self.subscriptions
            .watch_confirmed(vec![crate::backend::Topic::Group(group.clone())], confirmed);
        let (shards, index) = (self.shards.clone(), self.index);
        tokio::spawn(async move {
            // Dropped unconfirmed (the subscriber stopped, or a refused SUBSCRIBE retried):
            // the resync that follows re-reads the gap.
            if subscribed.await.is_ok() {
                let cmd = super::ShardCmd::Reread(Reread::Subscribed { group });
                shards.send_to(index, cmd).await;
            }
        });
    }

    /// Reads what `group`'s gaps hold (one read of history per gap) from a task.
    fn fill_group(&mut self, group: String) {
        let Some(mark) = self.group_marks.get_mut(&group) else {
            return;
        };
        self.reads += 1;
        let read = self.reads;
        let starts = mark.gaps.start_reading(&mark.id, read);
        let (messages, shards, index) = (self.messages.clone(), self.shards.clone(), self.index);
        tokio::spawn(async move {
            match read_gaps(&*messages, &group, starts).await {
                Ok(messages) => {
                    let cmd = Reread::Group {
                        group,
                        messages,
                        read,
                    };
                    shards.send_to(index, super::ShardCmd::Reread(cmd)).await;
                }
                Err(e) => {
                    // The backend is away: its resync re-reads every gap.
                    tracing::debug!(shard = index, %group, error = %e, "group fill failed");
                    let cmd = Reread::Failed { read };
                    shards.send_to(index, super::ShardCmd::Reread(cmd)).await;
                }
            }
        });
    }

    /// Passes a message the group's local members missed to all of them, without moving the
    /// mark when it lies inside a gap (later ones were heard live).
    fn deliver_missed(&mut self, group: &str, message: shared::Message) {
        let id = message.msg_id.clone();
        let frame = EncodedFrame::new(ServerFrame::Message(message));
        let mut sent = 0u64;
        if let Some(members) = self.groups.get(group) {
            for conn in members.values() {
                if !conn.is_closing() && conn.push(&frame) {
                    sent += 1;
                }
            }
        }
        if let Some(mark) = self.group_marks.get_mut(group)
            && id > mark.id
        {
            mark.id = id;
            mark.delivered = true;
        }
        metrics::counter!(m::DELIVERIES).increment(sent);
    }

    /// A connection that follows `group` late (it connected while the backend was away) gets the
    /// group's messages after `since` up to `up_to` (the group's mark when it was attached: later
    /// ones reach it live, or by a re-read). Read from a task; at most [`GROUP_FILL`].
    pub(super) fn backfill(
        &self,
        conn: Arc<ConnHandle>,
        group: String,
        since: String,
        up_to: String,
    ) {
        let (messages, shards, index) = (self.messages.clone(), self.shards.clone(), self.index);
        tokio::spawn(async move {
            let read = messages.history(&group, Some(&since), GROUP_FILL).await;
            let Ok((mut messages, _)) = read else {
                tracing::debug!(shard = index, %group, "backfill of a late follower failed");
                return;
            };
            messages.retain(|m| m.msg_id <= up_to);
            if !messages.is_empty() {
                metrics::counter!(m::RESYNC_MESSAGES).increment(messages.len() as u64);
                let cmd = super::ShardCmd::Reread(Reread::Backfill { conn, messages });
                shards.send_to(index, cmd).await;
            }
        });
    }

    /// Passes on a re-read record as if it were an event. A user the backend no longer knows
    /// (version 0: it restarted empty and nobody rewrote them) is offline: watchers get that at
    /// the time the read was sent, a version that follows the clock like every other, unless they
    /// were last shown offline, or an event newer than the read arrived meanwhile (the user's node
    /// rewrote them after the read: that event is the truth, and an offline versioned later would
    /// hide it).
    fn reconcile(&mut self, record: PresenceRecord, read_at: u64) {
        let Some(slot) = self.users.get(&record.user) else {
            return;
        };
        if slot.watchers.is_empty() {
            return;
        }
        let record = if record.version == 0 {
            if slot.shown_offline || slot.seen_version.max(slot.seen_public_version) >= read_at {
                return;
            }
            PresenceRecord {
                version: read_at,
                public_version: read_at,
                ..record
            }
        } else {
            record
        };
        if record.version > slot.seen_version || record.public_version > slot.seen_public_version {
            metrics::counter!(m::RESYNC_EVENTS).increment(1);
        }
        // Forced public: the re-read may carry a change whose event was lost; a client that saw
        // this version already drops it.
        self.fan_out(record, true);
    }
}

/// A group's history from each gap's start, at most [`GROUP_FILL`] messages per gap.
async fn read_gaps(
    messages: &dyn crate::backend::MessageStore,
    group: &str,
    starts: Vec<String>,
) -> Result<Vec<shared::Message>, crate::backend::BackendError> {
    let mut read = Vec::new();
    for since in starts {
        read.extend(messages.history(group, Some(&since), GROUP_FILL).await?.0);
    }
    Ok(read)
}
