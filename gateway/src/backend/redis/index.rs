//! The online index on Redis: [`BUCKETS`] buckets of visibly online users, each with its own
//! counters (`index.lua` keeps both in one step), read by `GET /v1/online` (every bucket walked
//! in id order at once) and the counts; and the repair that walks the buckets in small steps and
//! corrects entries that no longer match the users' records.

use std::sync::atomic::{AtomicUsize, Ordering};

use fred::prelude::*;
use shared::Platform;

use super::{
    RedisBackend,
    keys::BUCKETS,
    record,
    scripts::ScriptCall,
    write::{Found, TOMBSTONE_MS},
};
use crate::{
    backend::{BackendError, Counts, IndexRepair},
    clock::now_ms,
    presence::{platform_bit, visibly_online},
};

/// Rounds of one page of `GET /v1/online` at most; a page of a rare platform may come back short
/// (with a cursor) rather than scan on.
const ONLINE_ROUNDS: usize = 6;
/// Index entries one bucket's script looks at per round, at most (a few hundred µs of Redis).
const BUCKET_SCAN: usize = 1024;
/// Users a repair step checks: one page of a bucket, their records, the corrections.
pub(super) const REPAIR_USERS: usize = 100;

/// Where this node's repair walk is: the bucket it works on, and how many buckets it finished
/// since its pass began.
#[derive(Debug)]
pub(super) struct RepairWalk {
    bucket: AtomicUsize,
    done: AtomicUsize,
}

impl RepairWalk {
    /// Starts at a random bucket, so nodes that start together walk different ones.
    pub(super) fn new() -> Self {
        RepairWalk {
            bucket: AtomicUsize::new(rand::random_range(0..BUCKETS)),
            done: AtomicUsize::new(0),
        }
    }
}

impl RedisBackend {
    /// A page of visibly online users after `after`, in id order. Each round asks every bucket
    /// for its next few matches (one script call each, one round trip); a bucket that has more
    /// says where it stopped, and only users up to the lowest such stop are certain to be all
    /// there are, so the page takes those and the next round starts after them.
    pub(super) async fn online_page(
        &self,
        after: Option<&str>,
        limit: usize,
        platform: Option<Platform>,
    ) -> Result<(Vec<String>, Option<String>), BackendError> {
        let bit = platform.map(platform_bit).unwrap_or(0);
        let mut cursor = after.unwrap_or_default().to_string();
        let mut page: Vec<String> = Vec::with_capacity(limit);
        // Enough per bucket that the lowest stop of 128 usually lies past `limit` users.
        let mut want = (limit * 3).div_ceil(BUCKETS) + 4;
        for _ in 0..ONLINE_ROUNDS {
            let scan = if bit == 0 {
                want
            } else {
                (want * 4).clamp(64, BUCKET_SCAN)
            };
            let calls: Vec<ScriptCall<'_>> = (0..BUCKETS)
                .map(|b| {
                    (
                        &self.scripts.online_page,
                        vec![
                            Value::from(self.keys.index(b)),
                            Value::from(self.keys.index_state(b)),
                        ],
                        vec![
                            Value::from(cursor.as_str()),
                            Value::from(want.to_string()),
                            Value::from(bit.to_string()),
                            Value::from(scan.to_string()),
                        ],
                    )
                })
                .collect();
            let replies = self.run_scripts("online", &calls).await?;
            let mut horizon: Option<String> = None;
            let mut matches: Vec<String> = Vec::new();
            for reply in replies {
                let Value::Array(mut parts) = reply else {
                    return Err(BackendError::internal("online", "unexpected page reply"));
                };
                let bound = parts
                    .pop()
                    .and_then(|v| v.into_string())
                    .unwrap_or_default();
                if let Some(Value::Array(users)) = parts.pop() {
                    matches.extend(users.into_iter().filter_map(|u| u.into_string()));
                }
                if !bound.is_empty() && horizon.as_ref().is_none_or(|h| bound < *h) {
                    horizon = Some(bound);
                }
            }
            if let Some(h) = &horizon {
                matches.retain(|u| u <= h);
            }
            matches.sort_unstable();
            let room = limit - page.len();
            if matches.len() > room {
                page.extend(matches.into_iter().take(room));
                let next = page.last().cloned();
                return Ok((page, next));
            }
            page.extend(matches);
            match horizon {
                None => return Ok((page, None)),
                Some(_) if page.len() == limit => {
                    let next = page.last().cloned();
                    return Ok((page, next));
                }
                Some(h) => cursor = h,
            }
            want *= 2;
        }
        Ok((page, Some(cursor)))
    }

    /// Every bucket's counters in one round trip, summed.
    pub(super) async fn index_counts(&self) -> Result<Counts, BackendError> {
        let pipeline = self.client.pipeline();
        for b in 0..BUCKETS {
            let mut args = vec![self.keys.index_state(b), "#n".to_string()];
            args.extend(shared::ids::PLATFORMS.map(|p| format!("#{p}")));
            let _: () = pipeline
                .custom(super::cmd("HMGET"), args)
                .await
                .map_err(|e| Self::error("counts", e))?;
        }
        Self::count_round_trip("counts");
        let buckets: Vec<Vec<Option<i64>>> =
            pipeline.all().await.map_err(|e| Self::error("counts", e))?;
        let mut sums = [0i64; 9];
        for counters in buckets {
            for (sum, n) in sums.iter_mut().zip(counters) {
                *sum += n.unwrap_or(0);
            }
        }
        let mut counts = Counts {
            online_users: sums[0].max(0) as u64,
            ..Counts::default()
        };
        for (p, n) in shared::ids::PLATFORMS.zip(sums.into_iter().skip(1)) {
            if n > 0 {
                counts.by_platform.insert(p, n as u64);
            }
        }
        Ok(counts)
    }

    /// One repair step: the next [`REPAIR_USERS`] users of the bucket this node walks, their
    /// records read, and every entry that disagrees corrected (`index.lua`, which refuses a
    /// correction older than what the index holds, so a write racing the step wins).
    pub(super) async fn repair_step(&self) -> Result<IndexRepair, BackendError> {
        let bucket = self.repair.bucket.load(Ordering::Relaxed) % BUCKETS;
        let now = now_ms();
        let call: ScriptCall<'_> = (
            &self.scripts.index_page,
            vec![
                Value::from(self.keys.index(bucket)),
                Value::from(self.keys.index_state(bucket)),
                Value::from(self.keys.index_tombstones(bucket)),
            ],
            vec![
                Value::from(REPAIR_USERS.to_string()),
                Value::from(now.to_string()),
                Value::from(TOMBSTONE_MS.to_string()),
            ],
        );
        let reply = self.run_scripts("repair", &[call]).await?;
        let users: Vec<String> = match reply.into_iter().next() {
            Some(Value::Array(users)) => {
                users.into_iter().filter_map(|u| u.into_string()).collect()
            }
            _ => Vec::new(),
        };
        let hashes = self.user_hashes("repair", &users).await?;
        let found: Vec<Found> = users
            .iter()
            .zip(hashes)
            .map(|(user, hash)| {
                let r = record::from_hash(user, &hash, now);
                Found {
                    user: user.clone(),
                    version: r.version,
                    counted: if visibly_online(r.status) {
                        r.platforms
                    } else {
                        0
                    },
                    changed: false,
                    leaves: false,
                }
            })
            .collect();
        let fixed = self.index_found("repair", "", now, &found).await?;
        let mut pass_done = false;
        if users.len() < REPAIR_USERS {
            // This bucket's walk wrapped: on to the next one.
            self.repair
                .bucket
                .store((bucket + 1) % BUCKETS, Ordering::Relaxed);
            if self.repair.done.fetch_add(1, Ordering::Relaxed) + 1 >= BUCKETS {
                self.repair.done.store(0, Ordering::Relaxed);
                pass_done = true;
            }
        }
        if fixed > 0 {
            tracing::info!(fixed, bucket, "online index entries corrected");
        }
        Ok(IndexRepair {
            checked: users.len(),
            fixed,
            pass_done,
        })
    }
}
