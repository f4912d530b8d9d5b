//! The Redis backend: every role for many nodes on one Redis or a Redis Cluster. This file
//! connects and holds the clients; each role's `impl` is in the file named after it, the scripts
//! in `scripts.rs` and the `write.lua` driver in `write.rs`. See docs/ARCHITECTURE.md for every
//! key, its type, expiry and writer. Only this module knows fred, key names and channels.

mod envelope;
mod groups;
mod index;
mod keys;
mod messages;
mod presence;
mod probe;
mod pubsub;
mod record;
mod registry;
mod scripts;
mod sessions;
mod tokens;
mod webhooks;
mod write;

use std::time::Duration;

use fred::{
    clients::{Client, SubscriberClient},
    prelude::*,
    types::{ClusterHash, CustomCommand, config::ServerConfig},
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::{keys::Keys, pubsub::SubCmd, scripts::Scripts};
use super::{Backend, BackendError, BackendEvent, BackendSettings, EventSink, Health};
use crate::metrics as m;

/// A user's record (not its entries) outlives its last write by this long, so `last_seen` and the
/// chosen status survive a user's time away.
const RECORD_TTL_MS: u64 = 30 * 86_400 * 1000;
/// Users per pipeline: bounds one round trip's size when a whole shard is rewritten.
const PIPELINE_USERS: usize = 1000;
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
    scripts: Scripts,
    subscriptions: mpsc::UnboundedSender<SubCmd>,
    health: Health,
    /// This node's place in the walk of the online index's repair.
    repair: index::RepairWalk,
}

/// A command whose key is its first string argument (fred routes it by that on a cluster).
fn cmd(name: &'static str) -> CustomCommand {
    CustomCommand::new_static(name, ClusterHash::FirstKey, false)
}

/// A command routed by `key`'s slot, for commands whose first string argument is not the key:
/// fred 10 routes a custom command by its first string argument whatever policy it names, but
/// for `ClusterHash::Custom` (a misrouted command comes back MOVED and makes fred re-read the
/// slot map over a fresh connection).
fn cmd_for(name: &'static str, key: &str) -> CustomCommand {
    let slot = fred::util::redis_keyslot(key.as_bytes());
    CustomCommand::new_static(name, ClusterHash::Custom(slot), false)
}

impl RedisBackend {
    /// Connects (waiting up to 10 s for Redis) and starts the subscriber tasks on `tracker`.
    pub async fn connect(
        target: RedisTarget,
        prefix: &str,
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
        // No `manage_subscriptions()`: `pubsub::run_subscriptions` resubscribes (see why there).

        let keys = Keys::new(prefix);
        let (sub_tx, sub_rx) = mpsc::unbounded_channel();
        let (gap_tx, gap_rx) = mpsc::channel(1);
        tracker.spawn(pubsub::run_subscriptions(
            subscriber.clone(),
            cluster,
            sub_rx,
            events.clone(),
            gap_tx,
            stop.clone(),
        ));
        let _ = sub_tx.send(SubCmd::Watch(vec![keys.broadcast_channel()]));
        tracker.spawn(pubsub::run_messages(
            subscriber.clone(),
            keys.clone(),
            events.clone(),
            gap_rx,
            stop.clone(),
        ));
        tracker.spawn(watch_reconnects(
            client.clone(),
            events.clone(),
            stop.clone(),
        ));
        let health = Health::new();
        tracker.spawn(probe::run_probe(
            client.clone(),
            subscriber.clone(),
            cluster,
            health.clone(),
            events,
            stop,
        ));

        let backend = RedisBackend {
            client,
            keys,
            settings,
            cluster,
            scripts: Scripts::new(),
            subscriptions: sub_tx,
            health,
            repair: index::RepairWalk::new(),
        };
        backend.load_scripts().await?;
        Ok(backend)
    }

    fn publish_command(&self) -> &'static str {
        if self.cluster { "SPUBLISH" } else { "PUBLISH" }
    }

    fn count_round_trip(op: &'static str) {
        metrics::counter!(m::BACKEND_ROUND_TRIPS, "op" => op).increment(1);
    }

    /// The circuit: refuses a call at once while Redis is known down, instead of letting it wait
    /// out the command timeout. Not on a cluster: an outage there is usually one master's, until
    /// its replica takes over, and fred learns the new slot map from the redirects and errors of
    /// the calls themselves; refusing them kept a node from ever seeing the failover
    /// (`faults::cluster_failover_*`). There the probe only reports (`presence_backend_up`).
    fn admit(&self, op: &'static str) -> Result<(), BackendError> {
        if self.cluster {
            return Ok(());
        }
        self.health.admit(op)
    }

    fn error(op: &'static str, e: fred::error::Error) -> BackendError {
        metrics::counter!(m::BACKEND_ERRORS, "op" => op).increment(1);
        BackendError::unavailable(op, e)
    }

    /// An error met before the call was sent: it surely did not apply.
    fn not_sent(op: &'static str, e: fred::error::Error) -> BackendError {
        metrics::counter!(m::BACKEND_ERRORS, "op" => op).increment(1);
        BackendError::not_sent(op, e)
    }
}

/// A reconnect may follow a Redis restart that lost everything: every shard rewrites its users.
/// (The subscriber's reconnect is `pubsub::run_subscriptions`'s: it resyncs once every channel
/// is subscribed again.)
async fn watch_reconnects(client: Client, events: EventSink, stop: CancellationToken) {
    let mut reconnects = client.reconnect_rx();
    loop {
        let server = tokio::select! {
            r = reconnects.recv() => r,
            _ = stop.cancelled() => break,
        };
        match server {
            Ok(server) => {
                tracing::info!(%server, "reconnected to Redis: rewriting local presence");
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(_) => break,
        }
        if events.send(BackendEvent::Resync).await.is_err() {
            break;
        }
    }
}

impl Backend for RedisBackend {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn health(&self) -> Health {
        self.health.clone()
    }
}
