//! The `write.lua` driver shared by flush, renewal and the reaper. On one Redis a batch costs one
//! round trip: `write.lua` writes its users' records and, in the same script, the online index and
//! its counters (`index_step.lua`), with the node's sets in the same pipeline. On a cluster the
//! records and the index buckets sit in different slots, so no script can do both: a second round
//! trip brings the index in line with what the writes found (`index.lua`); a node that dies
//! between them leaves its users in its sets, and whoever reaps it writes the index right.

use std::collections::BTreeMap;

use fred::{clients::Client, prelude::*};

use super::{
    RECORD_TTL_MS, RedisBackend, cmd,
    keys::{BUCKETS, bucket_of},
    record,
    scripts::ScriptCall,
};
use crate::{
    backend::{BackendError, Changed, WebhookWritten},
    presence::{ChosenStatus, NodeEntry},
};

/// How much one `write.lua` call on one Redis may carry, in units: a user whose write leaves
/// their platforms as they were is one, a user coming online, going offline or changing
/// platforms (an index entry and counters to change too) two. Spreads the script's entry cost
/// (≈ 20% of a one-user call, measured with callgrind) while one call blocks Redis for well under
/// 1 ms. A user's record costs 4-5 commands, 20-35 µs of Redis on this 2-core machine, up to
/// ~70 µs for a churn's random users (cold records, an offline transition's publish); a user
/// leaving or coming back costs the index 6-7 commands more (state, index, tombstone, counters).
/// `make scale`'s SLOWLOG (2026-11-30) found calls of 16 records or 10 index users over 1 ms when
/// the machine's neighbours slowed Redis down with no stall of its core to explain them; calls
/// of 8 records and of 5 index users (the index then had a script of its own) kept `EVALSHA` at
/// p99.9 270-300 µs there. With 8 units (4 transitions) a churn's calls took 35% longer than
/// those (p50 92-96 µs against 68, p99.9 0.94-1.09 ms against 0.80-0.81 on the unpinned 2-core
/// machine, 2,000 clients/s); 6 units (6 status changes or 3 transitions) bring them back near
/// the old calls' length (p50 71-74 µs against 66-68, p99.9 0.86-0.95 ms against 0.72-1.01) for
/// the same Redis CPU. Calls are pipelined, so the round trips stay the same.
const WRITE_CALL_UNITS: usize = 6;
/// Users per `index.lua` call (a cluster's second round trip, the repair walk): as above.
const INDEX_USERS_PER_CALL: usize = 5;
/// How long index.lua keeps a tombstone: longer than any report can be late (the command timeout
/// of 5 s, three attempts), short enough that at a churn of 5,000 users going offline per second
/// they hold ~150,000 entries (~25 MB).
pub(super) const TOMBSTONE_MS: u64 = 30_000;

/// One user's part of a `write.lua` call: this node's entry (`None` removes it), a newly chosen
/// status, or the status to restore if Redis lost it or holds an older choice (renewal).
pub(super) struct UserWrite<'a> {
    pub(super) user: &'a str,
    pub(super) entry: Option<NodeEntry>,
    pub(super) status: Option<&'a ChosenStatus>,
    pub(super) restore: Option<&'a ChosenStatus>,
    /// This node's entry as Redis last acknowledged it. Sent with a removal: if Redis lost the
    /// record meanwhile (restarted empty), the script still knows the user was online and
    /// publishes the offline transition instead of nothing. Compared with `entry`, it also says
    /// whether the write will change the index (what a call's size counts).
    pub(super) was: Option<NodeEntry>,
    /// Put the user in the node's set (in the first round trip, so a node that dies after its
    /// entry was written is reaped with it).
    pub(super) joins: bool,
}

impl<'a> UserWrite<'a> {
    pub(super) fn removal(user: &'a str) -> Self {
        UserWrite {
            user,
            entry: None,
            status: None,
            restore: None,
            was: None,
            joins: false,
        }
    }
}

/// What the online index must show of one user, as a record read or write found it.
pub(super) struct Found {
    pub(super) user: String,
    /// The record's version; 0 when there is no record.
    pub(super) version: u64,
    /// The platform mask of a visibly online user, else 0.
    pub(super) counted: u16,
    /// The write changed the record (a tombstone is kept when it took the user offline).
    pub(super) changed: bool,
    /// The node's entry is gone: the user leaves the node's set.
    pub(super) leaves: bool,
}

impl RedisBackend {
    /// `write.lua` calls for `users`, in order: on one Redis many users per call (the script's
    /// own entry cost is spread over them) and the online index written in the same call, on a
    /// cluster one user per call (a script's keys must share a slot) and the index left to
    /// [`RedisBackend::index_found`]. `touch` pushes every record's expiry out (renewal, reaper).
    fn write_calls<'a>(
        &'a self,
        node: &str,
        now: u64,
        touch: bool,
        users: &[UserWrite<'a>],
    ) -> Vec<ScriptCall<'a>> {
        let units = |w: &UserWrite| {
            let platforms = |e: Option<NodeEntry>| e.map(|e| e.platforms);
            if touch || platforms(w.entry) != platforms(w.was) {
                2
            } else {
                1
            }
        };
        // On one Redis the script queues each transition's webhook event itself (see
        // `WebhookWritten`); on a cluster it cannot reach the queue's slot, so the node's outbox
        // queues it after the write.
        let webhooks = self.settings.webhooks.as_ref().filter(|_| !self.cluster);
        let common: [Value; 9] = [
            node.into(),
            now.to_string().into(),
            (self.settings.presence_ttl.as_millis() as u64)
                .to_string()
                .into(),
            RECORD_TTL_MS.to_string().into(),
            self.publish_command().into(),
            if touch { "1" } else { "" }.into(),
            webhooks
                .map_or(String::new(), |w| w.queue_max.to_string())
                .into(),
            webhooks.map_or("", |w| &*w.node).into(),
            if self.cluster {
                String::new()
            } else {
                TOMBSTONE_MS.to_string()
            }
            .into(),
        ];
        let status_args = |s: Option<&ChosenStatus>| match s {
            Some(s) => [
                Value::from(s.status.as_str()),
                Value::from(s.text.clone().unwrap_or_default()),
                Value::from(s.at.to_string()),
            ],
            None => [Value::from(""), Value::from(""), Value::from("")],
        };
        // On a cluster one user per call (a script's keys must share a slot).
        let budget = if self.cluster { 1 } else { WRITE_CALL_UNITS };
        chunks_by_units(users, budget, units)
            .into_iter()
            .map(|chunk| {
                let mut keys: Vec<Value> = Vec::with_capacity(chunk.len() * 6 + 1);
                let mut args = common.to_vec();
                // The buckets of this call's users, each one group of four keys after theirs.
                let mut buckets: Vec<usize> = Vec::new();
                for w in chunk {
                    keys.push(self.keys.user(w.user).into());
                    keys.push(self.keys.user_channel(w.user).into());
                    let entry = match (w.entry, w.was) {
                        (Some(e), _) => format!("{}:{}", e.platforms, u8::from(e.idle)),
                        (None, Some(was)) => format!("-{}", was.platforms),
                        (None, None) => String::new(),
                    };
                    args.extend([Value::from(w.user), Value::from(entry)]);
                    args.extend(status_args(w.status));
                    args.extend(status_args(w.restore));
                    let group = if self.cluster {
                        String::new()
                    } else {
                        let bucket = bucket_of(w.user);
                        let at = match buckets.iter().position(|b| *b == bucket) {
                            Some(at) => at,
                            None => {
                                buckets.push(bucket);
                                buckets.len() - 1
                            }
                        };
                        (at + 1).to_string()
                    };
                    args.push(group.into());
                }
                for bucket in buckets {
                    keys.extend(self.index_keys(bucket, node).map(Value::from));
                }
                if webhooks.is_some() {
                    keys.push(self.keys.webhooks().into());
                }
                (&self.scripts.write, keys, args)
            })
            .collect()
    }

    /// A bucket's four keys as `index_step.lua` takes them.
    fn index_keys(&self, bucket: usize, node: &str) -> [String; 4] {
        [
            self.keys.index(bucket),
            self.keys.index_state(bucket),
            self.keys.index_tombstones(bucket),
            self.keys.node_users(bucket, node),
        ]
    }

    /// Writes `users` as `node` (at most a pipeline's worth): `write.lua` (with the online index on
    /// one Redis) and the node's sets in one round trip, on a cluster the online index in a
    /// second. Returns the changes the script published.
    pub(super) async fn write_users(
        &self,
        op: &'static str,
        node: &str,
        now: u64,
        touch: bool,
        users: &[UserWrite<'_>],
    ) -> Result<Vec<Changed>, BackendError> {
        let mut joins = NodeSetAdds::default();
        for w in users.iter().filter(|w| w.joins) {
            joins.add(bucket_of(w.user), w.user);
        }
        let calls = self.write_calls(node, now, touch, users);
        let results = self
            .run_scripts_with(op, &calls, Some((node, &joins)))
            .await?;
        let replies = results.into_iter().flat_map(|r| match r {
            Value::Array(users) => users,
            _ => Vec::new(),
        });
        let mut changed = Vec::new();
        // What a cluster's second round trip tells the index; one Redis wrote it already.
        let mut found = Vec::with_capacity(if self.cluster { users.len() } else { 0 });
        for (w, reply) in users.iter().zip(replies) {
            let Value::Array(parts) = reply else {
                return Err(BackendError::internal(op, "unexpected write.lua reply"));
            };
            let int = |i: usize| parts.get(i).and_then(Value::as_u64).unwrap_or(0);
            let payload = parts.get(1).and_then(Value::as_string).unwrap_or_default();
            let parsed = record::parse_payload(&payload);
            let record_changed = parsed.is_some();
            if let Some((record, public_changed)) = parsed {
                metrics::counter!(crate::metrics::PUBSUB_MESSAGES, "direction" => "out")
                    .increment(1);
                // The fifth element: the script queued the transition's webhook event (1) or
                // refused it at the queue's bound (0); absent when it did not try.
                let webhook = match parts.get(4).and_then(Value::as_u64) {
                    Some(1) => WebhookWritten::Queued,
                    Some(_) => WebhookWritten::Refused,
                    None => WebhookWritten::NotQueued,
                };
                changed.push(Changed {
                    before_platforms: int(0) as u16,
                    record,
                    public_changed,
                    webhook,
                });
            }
            if self.cluster {
                found.push(Found {
                    user: w.user.to_string(),
                    version: int(2),
                    counted: int(3) as u16,
                    changed: record_changed,
                    leaves: w.entry.is_none(),
                });
            }
        }
        if self.cluster {
            self.index_found(op, node, now, &found).await?;
        }
        Ok(changed)
    }

    /// Brings the online index in line with `found` (`index.lua`: a cluster's writes, and the
    /// repair walk): on one Redis up to [`INDEX_USERS_PER_CALL`] users of any buckets per call,
    /// on a cluster one bucket per call. One round trip. Returns how many users' index entries changed.
    pub(super) async fn index_found(
        &self,
        op: &'static str,
        node: &str,
        now: u64,
        found: &[Found],
    ) -> Result<u64, BackendError> {
        if found.is_empty() {
            return Ok(0);
        }
        let mut by_bucket: BTreeMap<usize, Vec<&Found>> = BTreeMap::new();
        for f in found {
            by_bucket.entry(bucket_of(&f.user)).or_default().push(f);
        }
        let common = [
            Value::from(now.to_string()),
            Value::from(TOMBSTONE_MS.to_string()),
        ];
        let mut calls: Vec<ScriptCall<'_>> = Vec::new();
        // (bucket, its group number in the current call), so each bucket's keys go in once.
        let mut groups: Vec<usize> = Vec::new();
        let mut in_call = 0;
        for (bucket, users) in &by_bucket {
            for f in users {
                let new_call = calls.is_empty()
                    || in_call == INDEX_USERS_PER_CALL
                    || (self.cluster && groups.last() != Some(bucket));
                if new_call {
                    calls.push((&self.scripts.index, Vec::new(), common.to_vec()));
                    groups.clear();
                    in_call = 0;
                }
                let Some((_, keys, args)) = calls.last_mut() else {
                    continue;
                };
                if groups.last() != Some(bucket) {
                    groups.push(*bucket);
                    keys.extend(self.index_keys(*bucket, node).map(Value::from));
                }
                let flags = match (f.changed, f.leaves) {
                    (true, true) => "cr",
                    (true, false) => "c",
                    (false, true) => "r",
                    (false, false) => "",
                };
                args.extend([
                    Value::from(groups.len().to_string()),
                    Value::from(f.user.as_str()),
                    Value::from(f.version.to_string()),
                    Value::from(f.counted.to_string()),
                    Value::from(flags),
                ]);
                in_call += 1;
            }
        }
        let replies = self.run_scripts(op, &calls).await?;
        Ok(replies.iter().filter_map(Value::as_u64).sum())
    }

    /// Removes every entry `node` holds and publishes what that changes, a step of at most
    /// [`REAP_STEP`] users at a time; then forgets the node. A reaper's `lock` is kept alive
    /// after every step.
    pub(super) async fn reap_node(
        &self,
        node: &str,
        lock: Option<&str>,
    ) -> Result<Vec<Changed>, BackendError> {
        let mut changed = Vec::new();
        // Nodes of a version before the bucketed index kept one set per node.
        let legacy = self.keys.legacy_node_sets(node);
        loop {
            let users = self.node_page(&legacy[0]).await?;
            if users.is_empty() {
                break;
            }
            let now = crate::clock::now_ms();
            let removals: Vec<UserWrite> = users.iter().map(|u| UserWrite::removal(u)).collect();
            changed.extend(self.write_users("reap", node, now, true, &removals).await?);
            let mut args = vec![legacy[0].clone()];
            args.extend(users.iter().cloned());
            Self::count_round_trip("reap");
            let _: Value = self
                .client
                .custom(cmd("ZREM"), args)
                .await
                .map_err(|e| Self::error("reap", e))?;
            self.keep_lock(lock).await?;
        }
        // The first page of every bucket in one round trip; full buckets are read again.
        let mut pages = self
            .node_pages("reap", node, (0..BUCKETS).map(|b| (b, 0)))
            .await?;
        while !pages.is_empty() {
            let mut again = Vec::new();
            for (bucket, users) in pages {
                let now = crate::clock::now_ms();
                let removals: Vec<UserWrite> =
                    users.iter().map(|u| UserWrite::removal(u)).collect();
                // The index step takes each user out of the node's set.
                changed.extend(self.write_users("reap", node, now, true, &removals).await?);
                // Each step took its users out of the set, so the next page starts at rank 0.
                if users.len() == REAP_STEP {
                    again.push((bucket, 0));
                }
                self.keep_lock(lock).await?;
            }
            pages = self.node_pages("reap", node, again).await?;
        }
        let pipeline = self.client.pipeline();
        let queued: Result<(), fred::error::Error> = async {
            // UNLINK: a legacy platform set can still be large; Redis frees it in the background.
            let _: () = pipeline.custom(cmd("UNLINK"), legacy).await?;
            let _: () = pipeline
                .custom(cmd("ZREM"), vec![self.keys.heartbeats(), node.to_string()])
                .await?;
            pipeline
                .custom(cmd("HDEL"), vec![self.keys.nodes(), node.to_string()])
                .await
        }
        .await;
        queued.map_err(|e| Self::error("reap", e))?;
        Self::count_round_trip("reap");
        let _: Vec<Value> = pipeline.all().await.map_err(|e| Self::error("reap", e))?;
        Ok(changed)
    }

    async fn keep_lock(&self, lock: Option<&str>) -> Result<(), BackendError> {
        let Some(lock) = lock else { return Ok(()) };
        Self::count_round_trip("reap");
        let _: Value = self
            .client
            .custom(
                cmd("PEXPIRE"),
                vec![lock.to_string(), super::registry::REAP_LOCK_MS.to_string()],
            )
            .await
            .map_err(|e| Self::error("reap", e))?;
        Ok(())
    }

    /// The first [`REAP_STEP`] users of a node's set.
    async fn node_page(&self, key: &str) -> Result<Vec<String>, BackendError> {
        Self::count_round_trip("reap");
        self.client
            .custom(
                cmd("ZRANGE"),
                vec![key.to_string(), "0".into(), (REAP_STEP - 1).to_string()],
            )
            .await
            .map_err(|e| Self::error("reap", e))
    }

    /// [`REAP_STEP`] users of `node`'s set in each bucket of `from` (bucket, rank to start at),
    /// in one round trip: each a ZRANGE by rank, O(log n + 200). Only buckets with users.
    pub(super) async fn node_pages(
        &self,
        op: &'static str,
        node: &str,
        from: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<Vec<(usize, Vec<String>)>, BackendError> {
        let from: Vec<(usize, usize)> = from.into_iter().collect();
        if from.is_empty() {
            return Ok(Vec::new());
        }
        let pipeline = self.client.pipeline();
        for &(b, start) in &from {
            let _: () = pipeline
                .custom(
                    cmd("ZRANGE"),
                    vec![
                        self.keys.node_users(b, node),
                        start.to_string(),
                        (start + REAP_STEP - 1).to_string(),
                    ],
                )
                .await
                .map_err(|e| Self::error(op, e))?;
        }
        Self::count_round_trip(op);
        let pages: Vec<Vec<String>> = pipeline.all().await.map_err(|e| Self::error(op, e))?;
        Ok(from
            .into_iter()
            .zip(pages)
            .filter(|(_, users)| !users.is_empty())
            .map(|((b, _), users)| (b, users))
            .collect())
    }
}

/// `items` cut in order into runs whose costs add up to at most `budget` each (an item costing
/// more than the budget alone in its run).
fn chunks_by_units<T>(items: &[T], budget: usize, cost: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut chunks = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let c = cost(item).min(budget);
        if used + c > budget {
            chunks.push(&items[start..i]);
            (start, used) = (i, 0);
        }
        used += c;
    }
    if start < items.len() {
        chunks.push(&items[start..]);
    }
    chunks
}

/// Users a reaping step takes: two or more `write.lua` and `index.lua` calls, each well under
/// 1 ms of Redis.
pub(super) const REAP_STEP: usize = 200;

/// Users joining the writing node's sets, per bucket: one ZADD each, queued into the write
/// round trip.
#[derive(Default)]
pub(super) struct NodeSetAdds {
    add: BTreeMap<usize, Vec<String>>,
}

impl NodeSetAdds {
    /// ZADDs [`NodeSetAdds::queue`] queues: one per bucket.
    pub(super) fn len(&self) -> usize {
        self.add.len()
    }

    fn add(&mut self, bucket: usize, user: &str) {
        self.add.entry(bucket).or_default().push(user.to_string());
    }

    pub(super) async fn queue(
        &self,
        keys: &super::keys::Keys,
        node: &str,
        pipeline: &fred::clients::Pipeline<Client>,
    ) -> Result<(), fred::error::Error> {
        for (bucket, users) in &self.add {
            let mut args = vec![keys.node_users(*bucket, node)];
            for user in users {
                args.push("0".into());
                args.push(user.clone());
            }
            let _: () = pipeline.custom(cmd("ZADD"), args).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::chunks_by_units;

    #[test]
    fn calls_are_cut_by_what_their_users_cost() {
        let costs = [1, 1, 2, 2, 2, 1, 2, 1, 1, 1];
        let chunks = chunks_by_units(&costs, 4, |c| *c);
        assert_eq!(chunks, [&[1, 1, 2][..], &[2, 2], &[1, 2, 1], &[1, 1]]);
        // A budget of one: one item a call, whatever it costs.
        assert_eq!(chunks_by_units(&costs, 1, |c| *c).len(), costs.len());
        assert!(chunks_by_units(&[] as &[usize], 8, |c| *c).is_empty());
    }
}
