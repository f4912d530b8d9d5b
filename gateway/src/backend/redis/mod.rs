//! The Redis backend: presence for many nodes on one Redis or a Redis Cluster. See
//! docs/ARCHITECTURE.md for every key, its type, expiry and writer. Only this module knows fred,
//! key names and channels.

mod envelope;
mod keys;
mod messaging;
mod pubsub;
mod record;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};

use async_trait::async_trait;
use fred::{
    clients::{Client, SubscriberClient},
    prelude::*,
    types::{ClusterHash, CustomCommand, config::ServerConfig, scripts::Script},
};
use shared::{Platform, Status};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::{keys::Keys, pubsub::SubCmd};
use super::{
    Backend, BackendError, BackendEvent, BackendSettings, Changed, Counts, EventSink, NodeInfo,
    Outgoing, PresenceWrite, Renewal, SendOutcome, SendRefused, TokenClaims,
};
use crate::{
    clock::now_ms,
    metrics as m,
    presence::{ChosenStatus, NodeEntry, PresenceRecord, platform_bit},
};

const WRITE_LUA: &str = include_str!("write.lua");
const COUNTS_LUA: &str = include_str!("counts.lua");
const GROUP_SEND_LUA: &str = include_str!("group_send.lua");
const PRIVATE_SEND_LUA: &str = include_str!("private_send.lua");
const BROADCAST_LUA: &str = include_str!("broadcast.lua");
const READ_LUA: &str = include_str!("read.lua");

/// A user's record (not its entries) outlives its last write by this long, so `last_seen` and the
/// chosen status survive a user's time away.
const RECORD_TTL_MS: u64 = 30 * 86_400 * 1000;
/// Users per pipeline: bounds one round trip's size when a whole shard is rewritten.
const PIPELINE_USERS: usize = 1000;
/// Users per `write.lua` call on one Redis: spreads the script's entry cost (≈ 20% of a
/// one-user call, measured with callgrind) while one call still blocks Redis for well under 1 ms.
const WRITE_USERS_PER_CALL: usize = 50;
/// A reaper holds a dead node for this long; if it dies mid-way another takes over after it.
const REAP_LOCK_MS: u64 = 30_000;

/// Where Redis is.
#[derive(Debug, Clone)]
pub enum RedisTarget {
    Single(String),
    Cluster(Vec<String>),
}

pub struct RedisBackend {
    client: Client,
    keys: Keys,
    settings: BackendSettings,
    cluster: bool,
    write: Script,
    counts: Script,
    group_send: Script,
    private_send: Script,
    broadcast: Script,
    read: Script,
    subscriptions: mpsc::UnboundedSender<SubCmd>,
}

/// One script call of a pipeline: script, keys, arguments (as Values: cloning one on a retry
/// shares its bytes).
type ScriptCall<'a> = (&'a Script, Vec<Value>, Vec<Value>);

/// One user's part of a `write.lua` call: this node's entry (`None` removes it), a newly chosen
/// status, or the status to restore if Redis lost it (renewal after a restart).
struct UserWrite<'a> {
    user: &'a str,
    entry: Option<NodeEntry>,
    status: Option<&'a ChosenStatus>,
    restore: Option<&'a ChosenStatus>,
}

impl<'a> UserWrite<'a> {
    fn removal(user: &'a str) -> Self {
        UserWrite {
            user,
            entry: None,
            status: None,
            restore: None,
        }
    }
}

fn unavailable(e: fred::error::Error) -> BackendError {
    BackendError::Unavailable(e.to_string())
}

fn cmd(name: &'static str) -> CustomCommand {
    CustomCommand::new_static(name, ClusterHash::FirstKey, false)
}

impl RedisBackend {
    /// Connects (waiting up to 10 s for Redis), starts the subscriber tasks on `tracker`, and
    /// reaps what an earlier process with this node id left behind.
    pub async fn connect(
        target: RedisTarget,
        prefix: &str,
        node: &str,
        settings: BackendSettings,
        events: EventSink,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        let (config, cluster) = match &target {
            RedisTarget::Single(url) => (Config::from_url(url)?, false),
            RedisTarget::Cluster(seeds) => {
                let mut hosts = Vec::new();
                for seed in seeds {
                    let (host, port) = seed
                        .rsplit_once(':')
                        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                        .ok_or_else(|| anyhow::anyhow!("cluster seed {seed:?} is not host:port"))?;
                    hosts.push((host, port));
                }
                let config = Config {
                    server: ServerConfig::new_clustered(hosts),
                    ..Config::default()
                };
                (config, true)
            }
        };
        let mut builder = Builder::from_config(config);
        // Retry forever: an outage is survived, not fatal.
        builder
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(5);
                c.max_command_attempts = 3;
            })
            .with_performance_config(|p| {
                // Commands fail instead of waiting forever while Redis is away; shards retry.
                p.default_command_timeout = Duration::from_secs(5);
            });
        let client = builder.build()?;
        // fred preallocates each broadcast channel of a client at this capacity; only the
        // subscriber's message channel needs depth (it absorbs bursts while events are routed).
        builder.with_performance_config(|p| p.broadcast_channel_capacity = 1 << 14);
        let subscriber: SubscriberClient = builder.build_subscriber_client()?;
        // `init` listens for the first connection before starting it (`connect` followed by
        // `wait_for_connect` can miss a fast one and wait forever).
        let wait = Duration::from_secs(10);
        tokio::time::timeout(wait, client.init())
            .await
            .map_err(|_| anyhow::anyhow!("Redis not reachable within {wait:?}"))??;
        tokio::time::timeout(wait, subscriber.init())
            .await
            .map_err(|_| anyhow::anyhow!("Redis (subscriber) not reachable within {wait:?}"))??;
        let _resubscribe = subscriber.manage_subscriptions();

        let keys = Keys::new(prefix);
        let (sub_tx, sub_rx) = mpsc::unbounded_channel();
        tracker.spawn(pubsub::run_subscriptions(
            subscriber.clone(),
            cluster,
            sub_rx,
            stop.clone(),
        ));
        let _ = sub_tx.send(SubCmd::Watch(vec![keys.broadcast_channel()]));
        tracker.spawn(pubsub::run_messages(
            subscriber.clone(),
            keys.clone(),
            events.clone(),
            stop.clone(),
        ));
        tracker.spawn(watch_reconnects(client.clone(), events, stop));

        let backend = RedisBackend {
            client,
            keys,
            settings,
            cluster,
            write: Script::from_lua(WRITE_LUA),
            counts: Script::from_lua(COUNTS_LUA),
            group_send: Script::from_lua(GROUP_SEND_LUA),
            private_send: Script::from_lua(PRIVATE_SEND_LUA),
            broadcast: Script::from_lua(BROADCAST_LUA),
            read: Script::from_lua(READ_LUA),
            subscriptions: sub_tx,
        };
        backend.load_scripts().await?;
        // A node restarted under the same id must not leave its old users online forever: nobody
        // else reaps a node that keeps heartbeating.
        let stale = backend.reap_node(node).await?;
        if !stale.is_empty() {
            tracing::info!(
                users = stale.len(),
                "cleared presence left by this node's previous run"
            );
        }
        Ok(backend)
    }

    fn publish_command(&self) -> &'static str {
        if self.cluster { "SPUBLISH" } else { "PUBLISH" }
    }

    fn count_round_trip(op: &'static str) {
        metrics::counter!(m::BACKEND_ROUND_TRIPS, "op" => op).increment(1);
    }

    fn error(op: &'static str, e: fred::error::Error) -> BackendError {
        metrics::counter!(m::BACKEND_ERRORS, "op" => op).increment(1);
        unavailable(e)
    }

    /// `write.lua` calls for `users`, in order: on one Redis many users per call (the script's
    /// own entry cost is spread over them), on a cluster one per call (a script's keys must
    /// share a slot). `touch` pushes every record's expiry out (renewal, reaper).
    fn write_calls<'a>(
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
        let common: [Value; 6] = [
            node.into(),
            now.to_string().into(),
            (self.settings.presence_ttl.as_millis() as u64)
                .to_string()
                .into(),
            RECORD_TTL_MS.to_string().into(),
            self.publish_command().into(),
            if touch { "1" } else { "" }.into(),
        ];
        let status_args = |s: Option<&ChosenStatus>| match s {
            Some(s) => (
                Value::from(s.status.as_str()),
                Value::from(s.text.clone().unwrap_or_default()),
            ),
            None => (Value::from(""), Value::from("")),
        };
        let mut calls: Vec<ScriptCall<'a>> = Vec::new();
        for (i, w) in users.into_iter().enumerate() {
            if i % per_call == 0 {
                calls.push((&self.write, Vec::new(), common.to_vec()));
            }
            let Some((_, keys, args)) = calls.last_mut() else {
                continue;
            };
            keys.push(self.keys.user(w.user).into());
            keys.push(self.keys.user_channel(w.user).into());
            let entry = w
                .entry
                .map(|e| format!("{}:{}", e.platforms, u8::from(e.idle)))
                .unwrap_or_default();
            let (cs, ct) = status_args(w.status);
            let (rs, rt) = status_args(w.restore);
            args.extend([Value::from(w.user), Value::from(entry), cs, ct, rs, rt]);
        }
        calls
    }

    async fn load_scripts(&self) -> Result<(), fred::error::Error> {
        for script in [
            &self.write,
            &self.counts,
            &self.group_send,
            &self.private_send,
            &self.broadcast,
            &self.read,
        ] {
            script.load(&self.client).await?;
        }
        Ok(())
    }

    /// Runs script calls (and set updates) as one pipeline, one round trip; reloads the scripts
    /// once if Redis lost them (it restarted). Returns the scripts' replies in order.
    async fn run_scripts_with(
        &self,
        op: &'static str,
        calls: &[ScriptCall<'_>],
        sets: Option<&SetUpdates>,
    ) -> Result<Vec<Value>, BackendError> {
        for attempt in 0..2 {
            let pipeline = self.client.pipeline();
            // EVALSHA sha numkeys key...: routed by its first key, argument 2.
            let evalsha = CustomCommand::new_static("EVALSHA", ClusterHash::Offset(2), false);
            for (script, keys, args) in calls {
                let mut argv: Vec<Value> = Vec::with_capacity(2 + keys.len() + args.len());
                argv.push(script.sha1().to_string().into());
                argv.push(Value::Integer(keys.len() as i64));
                argv.extend(keys.iter().cloned());
                argv.extend(args.iter().cloned());
                let _: () = pipeline
                    .custom(evalsha.clone(), argv)
                    .await
                    .map_err(|e| Self::error(op, e))?;
            }
            if let Some(sets) = sets {
                sets.queue(&pipeline)
                    .await
                    .map_err(|e| Self::error(op, e))?;
            }
            Self::count_round_trip(op);
            let results: Vec<Result<Value, fred::error::Error>> = pipeline.try_all().await;
            let noscript = results
                .iter()
                .any(|r| matches!(r, Err(e) if e.details().starts_with("NOSCRIPT")));
            if noscript && attempt == 0 {
                self.load_scripts().await.map_err(|e| Self::error(op, e))?;
                continue;
            }
            return results
                .into_iter()
                .take(calls.len())
                .map(|r| r.map_err(|e| Self::error(op, e)))
                .collect();
        }
        Err(BackendError::Unavailable(
            "scripts could not be loaded".into(),
        ))
    }

    async fn run_scripts(
        &self,
        op: &'static str,
        calls: &[ScriptCall<'_>],
    ) -> Result<Vec<Value>, BackendError> {
        self.run_scripts_with(op, calls, None).await
    }

    /// Runs `write.lua` calls plus index updates as one round trip; returns the changes the
    /// script reported (one reply per user: 0, or the mask before and the published payload).
    async fn write_pipeline(
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
                if let Some((_, record)) = payload.as_deref().and_then(record::parse_payload) {
                    metrics::counter!(m::PUBSUB_MESSAGES, "direction" => "out").increment(1);
                    changed.push(Changed {
                        before_platforms: before,
                        record,
                    });
                }
            }
        }
        Ok(changed)
    }

    /// Removes every entry `node` holds and publishes what that changes; then forgets the node.
    async fn reap_node(&self, node: &str) -> Result<Vec<Changed>, BackendError> {
        let users_key = self.keys.node_users(node);
        let now = now_ms();
        let mut changed = Vec::new();
        loop {
            Self::count_round_trip("reap");
            let users: Vec<String> = self
                .client
                .custom(
                    cmd("ZRANGE"),
                    vec![
                        users_key.clone(),
                        "0".into(),
                        (PIPELINE_USERS - 1).to_string(),
                    ],
                )
                .await
                .map_err(|e| Self::error("reap", e))?;
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
                .map_err(unavailable)?;
        }
        let _: () = pipeline
            .custom(cmd("ZREM"), vec![self.keys.heartbeats(), node.to_string()])
            .await
            .map_err(unavailable)?;
        let _: () = pipeline
            .custom(cmd("HDEL"), vec![self.keys.nodes(), node.to_string()])
            .await
            .map_err(unavailable)?;
        Self::count_round_trip("reap");
        let _: Vec<Value> = pipeline.all().await.map_err(|e| Self::error("reap", e))?;
        Ok(changed)
    }

    async fn live_nodes(&self) -> Result<Vec<String>, BackendError> {
        let since = now_ms().saturating_sub(self.settings.node_ttl.as_millis() as u64);
        Self::count_round_trip("nodes");
        self.client
            .custom(
                cmd("ZRANGEBYSCORE"),
                vec![self.keys.heartbeats(), since.to_string(), "+inf".into()],
            )
            .await
            .map_err(|e| Self::error("nodes", e))
    }
}

/// ZADD/ZREM work queued into a write pipeline, one command per set.
#[derive(Default)]
struct SetUpdates {
    add: BTreeMap<String, BTreeSet<String>>,
    remove: BTreeMap<String, BTreeSet<String>>,
}

impl SetUpdates {
    fn add(&mut self, key: &str, users: impl IntoIterator<Item = String>) {
        self.add.entry(key.to_string()).or_default().extend(users);
    }

    fn remove(&mut self, key: &str, users: impl IntoIterator<Item = String>) {
        self.remove
            .entry(key.to_string())
            .or_default()
            .extend(users);
    }

    /// The node and platform sets for one user moving from `before` to `after` on `node`.
    fn entry_change(
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

    fn status_change(&mut self, keys: &Keys, user: &str, status: &ChosenStatus) {
        if status.status == Status::Invisible {
            self.add(&keys.invisible(), [user.to_string()]);
        } else {
            self.remove(&keys.invisible(), [user.to_string()]);
        }
    }

    async fn queue(
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

/// A reconnect may follow a Redis restart that lost everything: every shard rewrites its users.
async fn watch_reconnects(client: Client, events: EventSink, stop: CancellationToken) {
    let mut reconnects = client.reconnect_rx();
    loop {
        tokio::select! {
            r = reconnects.recv() => match r {
                Ok(server) => {
                    tracing::info!(%server, "reconnected to Redis: rewriting local presence");
                    if events.send(BackendEvent::Resync).await.is_err() {
                        break;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let _ = events.send(BackendEvent::Resync).await;
                }
                Err(_) => break,
            },
            _ = stop.cancelled() => break,
        }
    }
}

#[async_trait]
impl Backend for RedisBackend {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn write_presence(
        &self,
        node: &str,
        writes: Vec<PresenceWrite>,
    ) -> Result<Vec<Changed>, BackendError> {
        let now = now_ms();
        let mut changed = Vec::new();
        for chunk in writes.chunks(PIPELINE_USERS) {
            let mut sets = SetUpdates::default();
            let users = chunk.iter().map(|w| {
                sets.entry_change(&self.keys, node, &w.user, w.before, w.entry);
                if let Some(status) = &w.status {
                    sets.status_change(&self.keys, &w.user, status);
                }
                UserWrite {
                    user: &w.user,
                    entry: w.entry,
                    status: w.status.as_ref(),
                    restore: None,
                }
            });
            let calls = self.write_calls(node, now, false, users);
            changed.extend(self.write_pipeline("flush", &calls, &sets).await?);
        }
        Ok(changed)
    }

    async fn renew_presence(
        &self,
        node: &str,
        entries: Vec<Renewal>,
    ) -> Result<Vec<Changed>, BackendError> {
        let now = now_ms();
        let mut changed = Vec::new();
        for chunk in entries.chunks(PIPELINE_USERS) {
            // Renewal re-adds to the sets too: after Redis lost its data, this restores them.
            let mut sets = SetUpdates::default();
            let users = chunk.iter().map(|r| {
                sets.entry_change(&self.keys, node, &r.user, None, Some(r.entry));
                if let Some(chosen) = &r.chosen
                    && chosen.status == Status::Invisible
                {
                    sets.status_change(&self.keys, &r.user, chosen);
                }
                UserWrite {
                    user: &r.user,
                    entry: Some(r.entry),
                    status: None,
                    restore: r.chosen.as_ref(),
                }
            });
            let calls = self.write_calls(node, now, true, users);
            changed.extend(self.write_pipeline("renew", &calls, &sets).await?);
        }
        Ok(changed)
    }

    async fn presence(&self, users: &[String]) -> Result<Vec<PresenceRecord>, BackendError> {
        let now = now_ms();
        let mut records = Vec::with_capacity(users.len());
        for chunk in users.chunks(PIPELINE_USERS) {
            let pipeline = self.client.pipeline();
            for user in chunk {
                let _: () = pipeline
                    .custom(cmd("HGETALL"), vec![self.keys.user(user)])
                    .await
                    .map_err(unavailable)?;
            }
            Self::count_round_trip("query");
            let hashes: Vec<HashMap<String, String>> =
                pipeline.all().await.map_err(|e| Self::error("query", e))?;
            for (user, hash) in chunk.iter().zip(hashes) {
                records.push(record::from_hash(user, &hash, now));
            }
        }
        Ok(records)
    }

    async fn online_users(
        &self,
        after: Option<&str>,
        limit: usize,
        platform: Option<Platform>,
    ) -> Result<(Vec<String>, Option<String>), BackendError> {
        let nodes = self.live_nodes().await?;
        let sets: Vec<String> = nodes
            .iter()
            .map(|n| match platform {
                Some(p) => self.keys.node_platform(n, p),
                None => self.keys.node_users(n),
            })
            .collect();
        let mut cursor = after.map(String::from);
        let mut page = Vec::with_capacity(limit);
        // Each round reads the next `limit + 1` ids of every node's set (O(log n) each), merges
        // them, and drops invisible users; a few rounds fill a page even with many invisible users.
        for _ in 0..16 {
            let min = cursor
                .as_ref()
                .map(|c| format!("({c}"))
                .unwrap_or_else(|| "-".into());
            let pipeline = self.client.pipeline();
            for set in &sets {
                let args = vec![
                    set.clone(),
                    min.clone(),
                    "+".into(),
                    "BYLEX".into(),
                    "LIMIT".into(),
                    "0".into(),
                    (limit + 1).to_string(),
                ];
                let _: () = pipeline
                    .custom(cmd("ZRANGE"), args)
                    .await
                    .map_err(unavailable)?;
            }
            Self::count_round_trip("online");
            let lists: Vec<Vec<String>> = if sets.is_empty() {
                Vec::new()
            } else {
                pipeline.all().await.map_err(|e| Self::error("online", e))?
            };
            let exhausted = lists.iter().all(|l| l.len() <= limit);
            let merged: BTreeSet<String> = lists.into_iter().flatten().collect();
            let candidates: Vec<String> = merged.into_iter().take(limit + 1).collect();
            if candidates.is_empty() {
                return Ok((page, None));
            }
            let mut args = vec![self.keys.invisible()];
            args.extend(candidates.iter().cloned());
            Self::count_round_trip("online");
            let hidden: Vec<Option<f64>> = self
                .client
                .custom(cmd("ZMSCORE"), args)
                .await
                .map_err(|e| Self::error("online", e))?;
            for (user, hidden) in candidates.iter().zip(hidden) {
                if hidden.is_some() {
                    continue;
                }
                if page.len() == limit {
                    let next = page.last().cloned();
                    return Ok((page, next));
                }
                page.push(user.clone());
            }
            if exhausted && candidates.len() <= limit {
                return Ok((page, None));
            }
            cursor = candidates.last().cloned();
        }
        let next = page.last().cloned();
        Ok((page, next))
    }

    async fn counts(&self) -> Result<Counts, BackendError> {
        let nodes = self.live_nodes().await?;
        let mut keys = vec![self.keys.scratch(), self.keys.invisible()];
        keys.extend(nodes.iter().map(|n| self.keys.node_users(n)));
        for p in shared::ids::PLATFORMS {
            keys.extend(nodes.iter().map(|n| self.keys.node_platform(n, p)));
        }
        Self::count_round_trip("counts");
        let counts: Vec<u64> = self
            .counts
            .evalsha_with_reload(&self.client, keys, vec![nodes.len().to_string()])
            .await
            .map_err(|e| Self::error("counts", e))?;
        let mut out = Counts {
            online_users: counts.first().copied().unwrap_or(0),
            by_platform: BTreeMap::new(),
        };
        for (p, n) in shared::ids::PLATFORMS.zip(counts.into_iter().skip(1)) {
            if n > 0 {
                out.by_platform.insert(p, n);
            }
        }
        Ok(out)
    }

    fn watch(&self, users: Vec<String>) {
        let channels = users.iter().map(|u| self.keys.user_channel(u)).collect();
        let _ = self.subscriptions.send(SubCmd::Watch(channels));
    }

    fn unwatch(&self, users: Vec<String>) {
        let channels = users.iter().map(|u| self.keys.user_channel(u)).collect();
        let _ = self.subscriptions.send(SubCmd::Unwatch(channels));
    }

    async fn put_token(&self, token: &str, claims: &TokenClaims) -> Result<(), BackendError> {
        let ttl = claims.expires_at.saturating_sub(now_ms()).max(1);
        let value =
            serde_json::to_string(claims).map_err(|e| BackendError::Internal(e.to_string()))?;
        Self::count_round_trip("token");
        let _: Value = self
            .client
            .custom(
                cmd("SET"),
                vec![self.keys.token(token), value, "PX".into(), ttl.to_string()],
            )
            .await
            .map_err(|e| Self::error("token", e))?;
        Ok(())
    }

    async fn get_token(&self, token: &str) -> Result<Option<TokenClaims>, BackendError> {
        Self::count_round_trip("token");
        let value: Option<String> = self
            .client
            .custom(cmd("GET"), vec![self.keys.token(token)])
            .await
            .map_err(|e| Self::error("token", e))?;
        Ok(value.and_then(|v| serde_json::from_str(&v).ok()))
    }

    async fn announce_node(&self, info: &NodeInfo) -> Result<(), BackendError> {
        let json =
            serde_json::to_string(info).map_err(|e| BackendError::Internal(e.to_string()))?;
        let pipeline = self.client.pipeline();
        let _: () = pipeline
            .custom(cmd("HSET"), vec![self.keys.nodes(), info.id.clone(), json])
            .await
            .map_err(unavailable)?;
        let _: () = pipeline
            .custom(
                cmd("ZADD"),
                vec![
                    self.keys.heartbeats(),
                    info.last_heartbeat.to_string(),
                    info.id.clone(),
                ],
            )
            .await
            .map_err(unavailable)?;
        Self::count_round_trip("registry");
        let _: Vec<Value> = pipeline
            .all()
            .await
            .map_err(|e| Self::error("registry", e))?;
        Ok(())
    }

    async fn leave_node(&self, node: &str) -> Result<(), BackendError> {
        // The final flush removed this node's entries; reaping clears whatever a failed flush left.
        let changed = self.reap_node(node).await?;
        if !changed.is_empty() {
            tracing::warn!(
                users = changed.len(),
                "presence entries left at shutdown were removed"
            );
        }
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BackendError> {
        let ids = self.live_nodes().await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec![self.keys.nodes()];
        args.extend(ids.iter().cloned());
        Self::count_round_trip("nodes");
        let infos: Vec<Option<String>> = self
            .client
            .custom(cmd("HMGET"), args)
            .await
            .map_err(|e| Self::error("nodes", e))?;
        let mut nodes: Vec<NodeInfo> = infos
            .into_iter()
            .flatten()
            .filter_map(|j| serde_json::from_str(&j).ok())
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    async fn reap_dead_nodes(&self, me: &str) -> Result<Vec<Changed>, BackendError> {
        let before = now_ms().saturating_sub(self.settings.node_ttl.as_millis() as u64);
        Self::count_round_trip("reap");
        let dead: Vec<String> = self
            .client
            .custom(
                cmd("ZRANGEBYSCORE"),
                vec![self.keys.heartbeats(), "-inf".into(), format!("({before}")],
            )
            .await
            .map_err(|e| Self::error("reap", e))?;
        let mut changed = Vec::new();
        for node in dead.into_iter().filter(|n| n != me) {
            // Exactly one survivor reaps each dead node: whoever sets the lock first.
            Self::count_round_trip("reap");
            let got: Option<String> = self
                .client
                .custom(
                    cmd("SET"),
                    vec![
                        self.keys.reap_lock(&node),
                        me.to_string(),
                        "NX".into(),
                        "PX".into(),
                        REAP_LOCK_MS.to_string(),
                    ],
                )
                .await
                .map_err(|e| Self::error("reap", e))?;
            if got.is_none() {
                continue;
            }
            let reaped = self.reap_node(&node).await?;
            tracing::info!(dead = %node, users = reaped.len(), "reaped a node that stopped heartbeating");
            changed.extend(reaped);
        }
        Ok(changed)
    }

    fn watch_inboxes(&self, users: Vec<String>) {
        let channels = users.iter().map(|u| self.keys.inbox_channel(u)).collect();
        let _ = self.subscriptions.send(SubCmd::Watch(channels));
    }

    fn unwatch_inboxes(&self, users: Vec<String>) {
        let channels = users.iter().map(|u| self.keys.inbox_channel(u)).collect();
        let _ = self.subscriptions.send(SubCmd::Unwatch(channels));
    }

    fn watch_groups(&self, groups: Vec<String>) {
        let channels = groups.iter().map(|g| self.keys.group_channel(g)).collect();
        let _ = self.subscriptions.send(SubCmd::Watch(channels));
    }

    fn unwatch_groups(&self, groups: Vec<String>) {
        let channels = groups.iter().map(|g| self.keys.group_channel(g)).collect();
        let _ = self.subscriptions.send(SubCmd::Unwatch(channels));
    }

    async fn add_member(&self, group: &str, user: &str) -> Result<(), BackendError> {
        self.add_member_impl(group, user, true).await
    }

    async fn remove_member(&self, group: &str, user: &str) -> Result<(), BackendError> {
        self.add_member_impl(group, user, false).await
    }

    async fn members(
        &self,
        group: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<String>), BackendError> {
        let min = after.map(|a| format!("({a}")).unwrap_or_else(|| "-".into());
        Self::count_round_trip("groups");
        let mut page: Vec<String> = self
            .client
            .custom(
                cmd("ZRANGE"),
                vec![
                    self.keys.members(group),
                    min,
                    "+".into(),
                    "BYLEX".into(),
                    "LIMIT".into(),
                    "0".into(),
                    (limit + 1).to_string(),
                ],
            )
            .await
            .map_err(|e| Self::error("groups", e))?;
        let more = page.len() > limit;
        page.truncate(limit);
        let next = if more { page.last().cloned() } else { None };
        Ok((page, next))
    }

    async fn is_member(&self, group: &str, user: &str) -> Result<bool, BackendError> {
        Self::count_round_trip("groups");
        let score: Option<f64> = self
            .client
            .custom(
                cmd("ZSCORE"),
                vec![self.keys.members(group), user.to_string()],
            )
            .await
            .map_err(|e| Self::error("groups", e))?;
        Ok(score.is_some())
    }

    async fn user_groups(&self, user: &str) -> Result<Vec<String>, BackendError> {
        Self::count_round_trip("groups");
        self.client
            .custom(cmd("SMEMBERS"), vec![self.keys.user_groups(user)])
            .await
            .map_err(|e| Self::error("groups", e))
    }

    async fn send(
        &self,
        messages: Vec<Outgoing>,
    ) -> Result<Vec<Result<SendOutcome, SendRefused>>, BackendError> {
        self.send_impl(messages).await
    }

    async fn offline_messages(&self, user: &str) -> Result<Vec<shared::Message>, BackendError> {
        self.offline_impl(user).await
    }

    async fn connect_state(&self, user: &str) -> super::ConnectState {
        self.connect_state_impl(user).await
    }

    async fn ack_offline(&self, user: &str, up_to: &str) -> Result<(), BackendError> {
        self.ack_offline_impl(user, up_to).await
    }

    async fn history(
        &self,
        group: &str,
        since: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<shared::Message>, bool), BackendError> {
        self.history_impl(group, since, limit).await
    }

    async fn read_position(&self, user: &str, group: &str) -> Result<Option<String>, BackendError> {
        Self::count_round_trip("read");
        self.client
            .custom(
                cmd("HGET"),
                vec![self.keys.read_positions(user), group.to_string()],
            )
            .await
            .map_err(|e| Self::error("read", e))
    }

    async fn set_read_position(
        &self,
        user: &str,
        group: &str,
        up_to: &str,
    ) -> Result<(), BackendError> {
        let call: ScriptCall<'_> = (
            &self.read,
            vec![self.keys.read_positions(user).into()],
            vec![group.into(), up_to.into()],
        );
        self.run_scripts("read", &[call]).await?;
        Ok(())
    }

    async fn unread(&self, user: &str) -> Result<BTreeMap<String, u64>, BackendError> {
        self.unread_impl(user).await
    }
}
