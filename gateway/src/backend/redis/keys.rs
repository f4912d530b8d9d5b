//! Every Redis key and channel name. Per-user keys carry the user id as hash tag, so a user's
//! record and event channel share a slot; registry keys share the `{prefix}` tag, so the scripts
//! over them stay in one slot of a Redis Cluster.

use shared::{Destination, Platform};

/// The kinds of channel a node subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind<'a> {
    Presence(&'a str),
    Inbox(&'a str),
    Group(&'a str),
    Broadcast,
}

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// HASH: the user's record and every node's entry (see docs/ARCHITECTURE.md).
    pub fn user(&self, user: &str) -> String {
        format!("{}:u:{{{user}}}", self.prefix)
    }

    /// Channel of the user's presence events.
    pub fn user_channel(&self, user: &str) -> String {
        format!("{}:ev:{{{user}}}", self.prefix)
    }

    /// Channel of the user's private messages, their own copies and membership changes.
    pub fn inbox_channel(&self, user: &str) -> String {
        format!("{}:uc:{{{user}}}", self.prefix)
    }

    /// STREAM of private messages stored while the user was offline.
    pub fn offline(&self, user: &str) -> String {
        format!("{}:ib:{{{user}}}", self.prefix)
    }

    /// SET of the user's groups.
    /// A user's login sequences, per scope (multi-login policy).
    pub fn logins(&self, user: &str) -> String {
        format!("{}:ls:{{{user}}}", self.prefix)
    }

    /// Nodes' answers to one `connections` request about `user`.
    pub fn list_replies(&self, user: &str, reply: &str) -> String {
        format!("{}:lr:{{{user}}}:{reply}", self.prefix)
    }

    pub fn revoked(&self, user: &str) -> String {
        format!("{}:rv:{{{user}}}", self.prefix)
    }

    pub fn user_groups(&self, user: &str) -> String {
        format!("{}:ug:{{{user}}}", self.prefix)
    }

    /// HASH group -> msg_id read up to.
    pub fn read_positions(&self, user: &str) -> String {
        format!("{}:rp:{{{user}}}", self.prefix)
    }

    /// ZSET (scores 0) of a group's members.
    pub fn members(&self, group: &str) -> String {
        format!("{}:g:{{{group}}}:m", self.prefix)
    }

    /// HASH of a group's counters (`seq`, `ms`).
    pub fn group_meta(&self, group: &str) -> String {
        format!("{}:g:{{{group}}}", self.prefix)
    }

    /// STREAM of a group's messages.
    pub fn history(&self, group: &str) -> String {
        format!("{}:gh:{{{group}}}", self.prefix)
    }

    /// Channel of a group's messages.
    pub fn group_channel(&self, group: &str) -> String {
        format!("{}:gm:{{{group}}}", self.prefix)
    }

    /// Channel of messages to everyone online.
    pub fn broadcast_channel(&self) -> String {
        self.registry("all")
    }

    /// Sequence of broadcast message ids.
    pub fn broadcast_seq(&self) -> String {
        self.registry("allseq")
    }

    /// A remembered send (its first outcome), in the slot of its destination's other keys, so
    /// the send script checks and writes it in the same step. `sender|id`: user ids never hold
    /// `|`, so no two (sender, id) pairs share a key; `id` is the dedupe id with its namespace.
    pub fn dedupe(&self, to: &Destination, sender: &str, id: &str) -> String {
        match to {
            Destination::User { user } => format!("{}:dd:{{{user}}}:u:{sender}|{id}", self.prefix),
            Destination::Group { group } => {
                format!("{}:dd:{{{group}}}:g:{sender}|{id}", self.prefix)
            }
            Destination::All { .. } => self.registry(&format!("dd:{sender}|{id}")),
        }
    }

    /// What a subscribed channel carries.
    pub fn classify<'a>(&self, channel: &'a str) -> Option<ChannelKind<'a>> {
        if channel == self.broadcast_channel() {
            return Some(ChannelKind::Broadcast);
        }
        let rest = channel.strip_prefix(&self.prefix)?;
        let (kind, id) = rest.strip_prefix(':')?.split_once(":{")?;
        let id = id.strip_suffix('}')?;
        Some(match kind {
            "ev" => ChannelKind::Presence(id),
            "uc" => ChannelKind::Inbox(id),
            "gm" => ChannelKind::Group(id),
            _ => return None,
        })
    }

    /// STRING with expiry: an opaque token's claims.
    pub fn token(&self, token: &str) -> String {
        format!("{}:tok:{token}", self.prefix)
    }

    fn registry(&self, rest: &str) -> String {
        format!("{{{}}}:{rest}", self.prefix)
    }

    /// HASH node id -> NodeInfo JSON.
    pub fn nodes(&self) -> String {
        self.registry("nodes")
    }

    /// ZSET node id scored by last heartbeat (ms).
    pub fn heartbeats(&self) -> String {
        self.registry("hb")
    }

    /// ZSET (all scores 0, ordered by id) of users with an entry from `node`.
    pub fn node_users(&self, node: &str) -> String {
        self.registry(&format!("n:{node}:u"))
    }

    /// ZSET of users with an entry from `node` on `platform`.
    pub fn node_platform(&self, node: &str, platform: Platform) -> String {
        self.registry(&format!("n:{node}:p{platform}"))
    }

    /// ZSET of users whose chosen status is invisible: left out of online lists and counts.
    pub fn invisible(&self) -> String {
        self.registry("invisible")
    }

    /// STRING: who is reaping a dead node.
    pub fn reap_lock(&self, node: &str) -> String {
        self.registry(&format!("reap:{node}"))
    }

    /// STREAM of webhook events on their way, with one consumer group (`delivery`) whose
    /// consumers are the nodes. One key, so on a cluster one slot: fine for webhook volume.
    pub fn webhooks(&self) -> String {
        self.registry("wh")
    }

    /// Scratch key of the counting script.
    pub fn scratch(&self) -> String {
        self.registry("tmp")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_keys_and_channels_share_the_user_tag() {
        let k = Keys::new("presence");
        assert_eq!(k.user("alice"), "presence:u:{alice}");
        assert_eq!(k.user_channel("alice"), "presence:ev:{alice}");
        assert_eq!(
            k.classify("presence:ev:{alice}"),
            Some(ChannelKind::Presence("alice"))
        );
        assert_eq!(
            k.classify("presence:uc:{alice}"),
            Some(ChannelKind::Inbox("alice"))
        );
        assert_eq!(
            k.classify("presence:gm:{g:1}"),
            Some(ChannelKind::Group("g:1"))
        );
        assert_eq!(k.classify("{presence}:all"), Some(ChannelKind::Broadcast));
        assert_eq!(k.classify("other:ev:{alice}"), None);
    }

    #[test]
    fn dedupe_keys_share_the_destination_tag() {
        let k = Keys::new("p");
        let user = Destination::User { user: "bob".into() };
        let group = Destination::Group {
            group: "bob".into(),
        };
        assert_eq!(k.dedupe(&user, "a:b", "cx"), "p:dd:{bob}:u:a:b|cx");
        assert_ne!(k.dedupe(&user, "a", "cx"), k.dedupe(&group, "a", "cx"));
        assert_eq!(
            k.dedupe(&Destination::All { all: true }, "system", "c1"),
            "{p}:dd:system|c1"
        );
    }

    #[test]
    fn registry_keys_share_the_prefix_tag() {
        let k = Keys::new("p");
        for key in [
            k.nodes(),
            k.heartbeats(),
            k.node_users("n1"),
            k.node_platform("n1", 3),
            k.invisible(),
        ] {
            assert!(key.starts_with("{p}:"), "{key}");
        }
    }
}
