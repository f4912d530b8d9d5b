//! Places a key (a user or a group) on one of a node's shard workers.

use twox_hash::XxHash3_64;

/// The shard, out of `shards`, that owns `key`. Stable across processes and versions of this crate,
/// so a load tool can predict placement. `shards` of 0 is treated as 1.
pub fn shard_of(key: &str, shards: usize) -> usize {
    let shards = shards.max(1) as u64;
    (XxHash3_64::oneshot(key.as_bytes()) % shards) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_stable_and_in_range() {
        for n in 1..32 {
            let s = shard_of("alice", n);
            assert!(s < n);
            assert_eq!(s, shard_of("alice", n));
        }
        assert_eq!(shard_of("x", 0), 0);
    }

    #[test]
    fn placement_spreads_users() {
        let mut counts = [0usize; 8];
        for i in 0..8000 {
            counts[shard_of(&format!("user-{i}"), 8)] += 1;
        }
        // Every shard gets a fair part; a hash that put everything on few shards would fail here.
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
