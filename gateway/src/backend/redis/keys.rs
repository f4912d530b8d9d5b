//! Every Redis key and channel name. Per-user keys carry the user id as hash tag, so a user's
//! record and event channel share a slot; registry keys share the `{prefix}` tag, so the scripts
//! over them stay in one slot of a Redis Cluster.

use shared::Platform;

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

    /// The user id back from an event channel name.
    pub fn user_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(&self.prefix)?
            .strip_prefix(":ev:{")?
            .strip_suffix('}')
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
        assert_eq!(k.user_of_channel("presence:ev:{alice}"), Some("alice"));
        assert_eq!(k.user_of_channel("other:ev:{alice}"), None);
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
