//! The `write.lua` driver shared by flush, renewal and the reaper: builds the script calls for a
//! batch of users, runs them with the index updates in one pipeline, and reads back the changes.

use std::collections::{BTreeMap, BTreeSet};

use fred::{clients::Client, prelude::*};
use shared::Status;

use super::{
    PIPELINE_USERS, RECORD_TTL_MS, RedisBackend, cmd, keys::Keys, record, scripts::ScriptCall,
};
use crate::{
    backend::{BackendError, Changed, WebhookWritten},
    clock::now_ms,
    metrics as m,
    presence::{ChosenStatus, NodeEntry, platform_bit},
};

/// Users per `write.lua` call on one Redis: spreads the script's entry cost (≈ 20% of a
/// one-user call, measured with callgrind) while one call still blocks Redis for well under 1 ms.
const WRITE_USERS_PER_CALL: usize = 50;

/// One user's part of a `write.lua` call: this node's entry (`None` removes it), a newly chosen
/// status, or the status to restore if Redis lost it or holds an older choice (renewal).
pub(super) struct UserWrite<'a> {
    pub(super) user: &'a str,
    pub(super) entry: Option<NodeEntry>,
    pub(super) status: Option<&'a ChosenStatus>,
    pub(super) restore: Option<&'a ChosenStatus>,
    /// This node's entry as Redis last acknowledged it, sent with a removal: if Redis lost the
    /// record meanwhile (restarted empty), the script still knows the user was online and
    /// publishes the offline transition instead of nothing.
    pub(super) was: Option<NodeEntry>,
}

impl<'a> UserWrite<'a> {
    pub(super) fn removal(user: &'a str) -> Self {
        UserWrite {
            user,
            entry: None,
            status: None,
            restore: None,
            was: None,
        }
    }
}

impl RedisBackend {
    /// `write.lua` calls for `users`, in order: on one Redis many users per call (the script's
    /// own entry cost is spread over them), on a cluster one per call (a script's keys must
    /// share a slot). `touch` pushes every record's expiry out (renewal, reaper).
    pub(super) fn write_calls<'a>(
        &'a self,
        node: &str,
        now: u64,
        touch: bool,
        users: impl IntoIterator<Item = UserWrite<'a>>,
    ) -> Vec<ScriptCall<'a>> {
        let per_call = if self.cluster {
            1
        } else {
            WRITE_USERS_PER_CALL
        };
        // On one Redis the script queues each transition's webhook event itself (see
        // `WebhookWritten`); on a cluster it cannot reach the queue's slot, so the node's outbox
        // queues it after the write.
        let webhooks = self.settings.webhooks.as_ref().filter(|_| !self.cluster);
        let common: [Value; 8] = [
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
        ];
        let status_args = |s: Option<&ChosenStatus>| match s {
            Some(s) => [
                Value::from(s.status.as_str()),
                Value::from(s.text.clone().unwrap_or_default()),
                Value::from(s.at.to_string()),
            ],
            None => [Value::from(""), Value::from(""), Value::from("")],
        };
        let mut calls: Vec<ScriptCall<'a>> = Vec::new();
        for (i, w) in users.into_iter().enumerate() {
            if i % per_call == 0 {
                calls.push((&self.scripts.write, Vec::new(), common.to_vec()));
            }
            let Some((_, keys, args)) = calls.last_mut() else {
                continue;
            };
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
        }
        if webhooks.is_some() {
            for (_, keys, _) in &mut calls {
                keys.push(self.keys.webhooks().into());
            }
        }
        calls
    }

    /// Runs `write.lua` calls plus index updates as one round trip; returns the changes the
    /// script reported (one reply per user: 0, or the mask before, the published payload and,
    /// when it queued the transition's webhook event, 1, or 0 when the queue was full).
    pub(super) async fn write_pipeline(
        &self,
        op: &'static str,
        calls: &[ScriptCall<'_>],
        sets: &SetUpdates,
    ) -> Result<Vec<Changed>, BackendError> {
        let results = self.run_scripts_with(op, calls, Some(sets)).await?;
        let mut changed = Vec::new();
        for reply in results.into_iter().filter_map(|r| match r {
            Value::Array(users) => Some(users),
            _ => None,
        }) {
            for user in reply {
                let Value::Array(parts) = user else { continue };
                let before = parts.first().and_then(|v| v.as_u64()).unwrap_or(0) as u16;
                let payload = parts.get(1).and_then(|v| v.as_string());
                if let Some((record, public_changed)) =
                    payload.as_deref().and_then(record::parse_payload)
                {
                    metrics::counter!(m::PUBSUB_MESSAGES, "direction" => "out").increment(1);
                    let webhook = match parts.get(2).and_then(|v| v.as_u64()) {
                        Some(1) => WebhookWritten::Queued,
                        Some(_) => WebhookWritten::Refused,
                        None => WebhookWritten::NotQueued,
                    };
                    changed.push(Changed {
                        before_platforms: before,
                        record,
                        public_changed,
                        webhook,
                    });
                }
            }
        }
        Ok(changed)
    }

    /// Runs set updates alone, as one round trip.
    pub(super) async fn update_sets(
        &self,
        op: &'static str,
        sets: &SetUpdates,
    ) -> Result<(), BackendError> {
        let pipeline = self.client.pipeline();
        sets.queue(&pipeline)
            .await
            .map_err(|e| Self::error(op, e))?;
        Self::count_round_trip(op);
        let _: Vec<Value> = pipeline.all().await.map_err(|e| Self::error(op, e))?;
        Ok(())
    }

    /// Up to [`PIPELINE_USERS`] users of a node's user set, from position `start`.
    pub(super) async fn node_users_page(
        &self,
        op: &'static str,
        users_key: &str,
        start: usize,
    ) -> Result<Vec<String>, BackendError> {
        Self::count_round_trip(op);
        self.client
            .custom(
                cmd("ZRANGE"),
                vec![
                    users_key.to_string(),
                    start.to_string(),
                    (start + PIPELINE_USERS - 1).to_string(),
                ],
            )
            .await
            .map_err(|e| Self::error(op, e))
    }

    /// Removes every entry `node` holds and publishes what that changes; then forgets the node.
    pub(super) async fn reap_node(&self, node: &str) -> Result<Vec<Changed>, BackendError> {
        let users_key = self.keys.node_users(node);
        let now = now_ms();
        let mut changed = Vec::new();
        loop {
            // Each round removes what it read from the set, so the next starts at 0 again.
            let users = self.node_users_page("reap", &users_key, 0).await?;
            if users.is_empty() {
                break;
            }
            let calls =
                self.write_calls(node, now, true, users.iter().map(|u| UserWrite::removal(u)));
            let mut sets = SetUpdates::default();
            sets.remove(&users_key, users.iter().cloned());
            changed.extend(self.write_pipeline("reap", &calls, &sets).await?);
        }
        let pipeline = self.client.pipeline();
        let mut del = vec![users_key];
        del.extend(shared::ids::PLATFORMS.map(|p| self.keys.node_platform(node, p)));
        for key in del {
            let _: () = pipeline
                .custom(cmd("DEL"), vec![key])
                .await
                .map_err(|e| Self::error("reap", e))?;
        }
        let _: () = pipeline
            .custom(cmd("ZREM"), vec![self.keys.heartbeats(), node.to_string()])
            .await
            .map_err(|e| Self::error("reap", e))?;
        let _: () = pipeline
            .custom(cmd("HDEL"), vec![self.keys.nodes(), node.to_string()])
            .await
            .map_err(|e| Self::error("reap", e))?;
        Self::count_round_trip("reap");
        let _: Vec<Value> = pipeline.all().await.map_err(|e| Self::error("reap", e))?;
        Ok(changed)
    }
}

/// ZADD/ZREM work queued into a write pipeline, one command per set.
#[derive(Default)]
pub(super) struct SetUpdates {
    add: BTreeMap<String, BTreeSet<String>>,
    remove: BTreeMap<String, BTreeSet<String>>,
}

impl SetUpdates {
    pub(super) fn add(&mut self, key: &str, users: impl IntoIterator<Item = String>) {
        self.add.entry(key.to_string()).or_default().extend(users);
    }

    pub(super) fn remove(&mut self, key: &str, users: impl IntoIterator<Item = String>) {
        self.remove
            .entry(key.to_string())
            .or_default()
            .extend(users);
    }

    /// The node and platform sets for one user moving from `before` to `after` on `node`.
    pub(super) fn entry_change(
        &mut self,
        keys: &Keys,
        node: &str,
        user: &str,
        before: Option<NodeEntry>,
        after: Option<NodeEntry>,
    ) {
        let before_mask = before.map(|e| e.platforms).unwrap_or(0);
        let after_mask = after.map(|e| e.platforms).unwrap_or(0);
        match (before.is_some(), after.is_some()) {
            (false, true) => self.add(&keys.node_users(node), [user.to_string()]),
            (true, false) => self.remove(&keys.node_users(node), [user.to_string()]),
            _ => {}
        }
        for p in shared::ids::PLATFORMS {
            let bit = platform_bit(p);
            match (before_mask & bit != 0, after_mask & bit != 0) {
                (false, true) => self.add(&keys.node_platform(node, p), [user.to_string()]),
                (true, false) => self.remove(&keys.node_platform(node, p), [user.to_string()]),
                _ => {}
            }
        }
    }

    /// The invisible set for a user whose chosen (or, when connected, effective) status is
    /// `status`.
    pub(super) fn status_change(&mut self, keys: &Keys, user: &str, status: Status) {
        if status == Status::Invisible {
            self.add(&keys.invisible(), [user.to_string()]);
        } else {
            self.remove(&keys.invisible(), [user.to_string()]);
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }

    pub(super) async fn queue(
        &self,
        pipeline: &fred::clients::Pipeline<Client>,
    ) -> Result<(), fred::error::Error> {
        for (key, users) in &self.add {
            let mut args = vec![key.clone()];
            for user in users {
                args.push("0".into());
                args.push(user.clone());
            }
            let _: () = pipeline.custom(cmd("ZADD"), args).await?;
        }
        for (key, users) in &self.remove {
            let mut args = vec![key.clone()];
            args.extend(users.iter().cloned());
            let _: () = pipeline.custom(cmd("ZREM"), args).await?;
        }
        Ok(())
    }
}
