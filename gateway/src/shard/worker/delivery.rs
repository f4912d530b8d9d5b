//! What the shard passes to local connections: presence events to watchers (once per version),
//! messages to a user's or a group's connections, and which connections follow which group.

use std::sync::Arc;

use shared::ServerFrame;
use tokio::sync::oneshot;

use super::{super::ShardCmd, Worker};
use crate::{
    backend::{Audience, ConnectionInfo, Control, Delivery, Topic},
    clock::now_ms,
    conn_handle::{ConnHandle, ConnId, RTT_UNMEASURED, close_code},
    frame::EncodedFrame,
    metrics as m,
    presence::PresenceRecord,
};

impl Worker {
    /// Passes a message to the local connections it is for; the sending connection gets an `ack`
    /// instead, every other connection (the sender's other devices included) a copy.
    pub(super) fn deliver(&mut self, delivery: &Delivery) {
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
                if let Some(mark) = self.group_marks.get_mut(group) {
                    let id = &delivery.message.msg_id;
                    if mark.delivered && *id <= mark.id {
                        // Already passed on by a history re-read.
                        tracing::debug!(shard = self.index, %group, %id, mark = %mark.id, "live repeat dropped");
                        return;
                    }
                    if *id > mark.id {
                        mark.id.clone_from(id);
                        mark.delivered = true;
                        if !mark.gaps.is_empty() {
                            mark.gaps.heard(id);
                            tracing::debug!(shard = self.index, %group, %id, gaps = ?mark.gaps, "live message after a gap");
                        }
                    }
                }
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

    /// Passes a presence change to this node's watchers of the user: the user's own connections
    /// get their own view when `version` moved, everyone else the public view when
    /// `public_version` did; each at most once per version, never one below what they saw.
    pub(super) fn fan_out(&mut self, record: PresenceRecord, public_changed: bool) {
        let Some(slot) = self.users.get_mut(&record.user) else {
            return;
        };
        if slot.watchers.is_empty() {
            return;
        }
        let own = record.version > slot.seen_version;
        // Before any public version is known here (the user was just watched), only a change
        // this very event made is news to others: their `presence_list` already shows the public
        // version an event of a change they cannot see carries, and passing it on would tell
        // them the user did something. Later, any higher public version is, even one whose
        // change reached this node in an event since lost.
        let public = record.public_version > slot.seen_public_version
            && (public_changed || slot.seen_public_version > 0);
        slot.seen_version = slot.seen_version.max(record.version);
        slot.seen_public_version = slot.seen_public_version.max(record.public_version);
        if public {
            slot.shown_offline = !crate::presence::visibly_online(record.status);
        }
        if !own && !public {
            return;
        }
        let mut own_frame = None;
        let mut public_frame = None;
        let mut sent = 0u64;
        for watcher in slot.watchers.values() {
            let frame = if watcher.user == record.user {
                if !own {
                    continue;
                }
                &*own_frame.get_or_insert_with(|| {
                    EncodedFrame::new(ServerFrame::Presence(record.own_view()))
                })
            } else {
                if !public {
                    continue;
                }
                &*public_frame.get_or_insert_with(|| {
                    EncodedFrame::new(ServerFrame::Presence(record.public_view()))
                })
            };
            if watcher.push(frame) {
                sent += 1;
            }
        }
        metrics::counter!(m::PRESENCE_EVENTS_DELIVERED).increment(sent);
    }

    pub(super) fn detach(&mut self, group: &str, conn: ConnId) {
        if let Some(members) = self.groups.get_mut(group) {
            members.remove(&conn);
            if members.is_empty() {
                self.groups.remove(group);
                self.group_marks.remove(group);
                self.subscriptions
                    .unwatch(vec![Topic::Group(group.to_string())]);
            }
        }
    }

    /// The user's connections on this node.
    pub(super) fn connections(&self, user: &str) -> Vec<ConnectionInfo> {
        let node = &*self.settings.node;
        self.users
            .get(user)
            .map(|slot| {
                slot.conns
                    .iter()
                    .map(|c| ConnectionInfo {
                        conn_id: format!("{node}-{}", c.id),
                        node: node.to_string(),
                        platform: c.platform,
                        connected_at: c.connected_at,
                        remote_addr: c.peer.to_string(),
                        user_agent: c.user_agent.clone(),
                        rtt_ms: match c.rtt_ms.load(std::sync::atomic::Ordering::Relaxed) {
                            RTT_UNMEASURED => None,
                            rtt => Some(rtt),
                        },
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Closes the user's local connections the app backend's control matches.
    pub(super) fn control(&mut self, user: &str, control: &Control) {
        let Some(slot) = self.users.get(user) else {
            return;
        };
        for conn in &slot.conns {
            let closed = match control {
                Control::Disconnect { platforms, reason } => {
                    (platforms.is_empty() || platforms.contains(&conn.platform))
                        && conn.close_with(close_code::DISCONNECTED, reason)
                }
                Control::Revoke { before } => {
                    conn.token_issued_before(*before)
                        && conn.close_with(close_code::UNAUTHORIZED, "token revoked")
                }
                Control::Replace { platform, seq } => {
                    platform.is_none_or(|p| p == conn.platform)
                        && conn.login_seq() < *seq
                        && conn.close(close_code::REPLACED)
                }
                // Answered by the event router through `ShardCmd::Connections`.
                Control::List { .. } => false,
            };
            if closed {
                metrics::counter!(m::SESSION_CLOSES, "reason" => control.label()).increment(1);
            }
        }
    }

    /// Makes a local connection of one of this shard's users follow (or stop following) a
    /// group: records it here, the one owner of a connection's groups, and attaches it at (or
    /// detaches it from) the group's shard. `done` fires once that shard has the command queued,
    /// so a message sent after it reaches the connection. A connection already gone follows
    /// nothing.
    pub(super) fn follow(
        &mut self,
        conn: &Arc<ConnHandle>,
        group: String,
        joined: bool,
        since: Option<String>,
        done: Option<oneshot::Sender<()>>,
    ) {
        let Some(slot) = self.users.get_mut(&conn.user) else {
            return;
        };
        if !slot.conns.iter().any(|c| c.id == conn.id) {
            return;
        }
        let followed = slot.groups.entry(conn.id).or_default();
        let changed = if joined {
            followed.insert(group.clone())
        } else {
            followed.remove(&group)
        };
        if followed.is_empty() {
            slot.groups.remove(&conn.id);
        }
        if !changed {
            if let Some(done) = done {
                let _ = done.send(());
            }
            return;
        }
        let index = self.shards.index_of(&group);
        let cmd = if joined {
            ShardCmd::GroupAttach {
                group,
                conn: conn.clone(),
                since,
            }
        } else {
            ShardCmd::GroupDetach {
                group,
                conn: conn.id,
            }
        };
        self.shards.forward(index, cmd, done);
    }
}
