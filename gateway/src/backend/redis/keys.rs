//! Every Redis key and channel name. Per-user keys carry the user id as hash tag, so a user's
//! record and event channel share a slot. The online index is split into [`BUCKETS`] buckets by
//! the user's slot, each bucket's keys under a tag of its own chosen to land in its own part of
//! the slot space, so a Redis Cluster spreads them over its masters. The few registry keys (node
//! infos and heartbeats, O(nodes)) share the `{prefix}` tag.

use fred::util::redis_keyslot;
use shared::Destination;

/// Buckets of the online index. Each holds about 1/128 of the online users, so a bucket of 10
/// million users has ~80,000 (its commands stay O(log n)), and a 3- to 16-master cluster gets
/// 8 or more buckets per master. Reading every bucket (counts, a page of `GET /v1/online`) is 128
/// small commands in one round trip. Changing it moves users between buckets: all nodes of a
/// deployment must agree, so it is not a setting.
pub const BUCKETS: usize = 128;
/// Hash slots of a Redis Cluster.
const SLOTS: usize = 16_384;

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
    /// Each bucket's hash tag (see [`bucket_tag`]), computed once.
    tags: Vec<String>,
}

/// The hash tag of bucket `b`: the first of `b.0`, `b.1`, ... whose slot falls in the bucket's
/// share of the slot space (`b * SLOTS / BUCKETS` up to the next bucket's). Cluster slot ranges
/// are contiguous, so the buckets spread over the masters as evenly as the slots do. Every node
/// computes the same tags (about 128 CRC16s per bucket).
fn bucket_tag(b: usize) -> String {
    (0u32..)
        .map(|i| format!("{b}.{i}"))
        .find(|tag| usize::from(redis_keyslot(tag.as_bytes())) * BUCKETS / SLOTS == b)
        .unwrap_or_default()
}

/// The index bucket of a user: their keys' slot scaled to [`BUCKETS`], so the bucket's keys sit
/// in the same part of the slot space as the user's own.
pub fn bucket_of(user: &str) -> usize {
    usize::from(redis_keyslot(user.as_bytes())) * BUCKETS / SLOTS
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
            tags: (0..BUCKETS).map(bucket_tag).collect(),
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

    /// Bucket `b`'s keys all start with this: `P:ix:{tag}`, a ZSET (scores 0, so ordered by id)
    /// of the bucket's visibly online users.
    pub fn index(&self, b: usize) -> String {
        format!("{}:ix:{{{}}}", self.prefix, self.tags[b % BUCKETS])
    }

    /// HASH of bucket `b`: user -> `version:counted mask` (0 for a user who just left: a
    /// tombstone), the counters `#n` and `#1`..`#8`, and the repair cursor `#r` (index.lua).
    pub fn index_state(&self, b: usize) -> String {
        format!("{}:s", self.index(b))
    }

    /// ZSET of bucket `b`'s tombstones, scored by when the user left (ms).
    pub fn index_tombstones(&self, b: usize) -> String {
        format!("{}:t", self.index(b))
    }

    /// ZSET (scores 0) of bucket `b`'s users with an entry from `node`: what reaping `node`
    /// walks. The bucket's tag comes first, so a node id cannot change the slot.
    pub fn node_users(&self, b: usize, node: &str) -> String {
        format!("{}:n:{node}", self.index(b))
    }

    /// Before the index was bucketed (issue 11): ZSET of users with an entry from `node`, and one
    /// per platform. Only reaping reads them, so a node of an older version is still reaped.
    pub fn legacy_node_sets(&self, node: &str) -> Vec<String> {
        let mut keys = vec![self.registry(&format!("n:{node}:u"))];
        keys.extend(shared::ids::PLATFORMS.map(|p| self.registry(&format!("n:{node}:p{p}"))));
        keys
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
        for key in [k.nodes(), k.heartbeats(), k.reap_lock("n1")] {
            assert!(key.starts_with("{p}:"), "{key}");
        }
    }

    #[test]
    fn each_bucket_lands_in_its_own_share_of_the_slots() {
        let k = Keys::new("p");
        let mut tags = std::collections::BTreeSet::new();
        for b in 0..BUCKETS {
            let slot = usize::from(redis_keyslot(k.index(b).as_bytes()));
            assert_eq!(slot * BUCKETS / SLOTS, b, "{}", k.index(b));
            for key in [
                k.index_state(b),
                k.index_tombstones(b),
                k.node_users(b, "{x}"),
            ] {
                assert_eq!(usize::from(redis_keyslot(key.as_bytes())), slot, "{key}");
            }
            tags.insert(k.index(b));
        }
        assert_eq!(tags.len(), BUCKETS);
    }

    #[test]
    fn users_spread_over_every_bucket() {
        let mut per_bucket = vec![0u32; BUCKETS];
        for i in 0..100_000 {
            per_bucket[bucket_of(&format!("user{i}"))] += 1;
        }
        let (min, max) = (per_bucket.iter().min(), per_bucket.iter().max());
        // 781 expected per bucket; CRC16 of such ids is close to uniform.
        assert!(min > Some(&600) && max < Some(&1000), "{min:?}..{max:?}");
    }
}
