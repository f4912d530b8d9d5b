//! Every setting of a gateway node, read from flags and `PRESENCE_*` environment variables (one name
//! for each), then validated as a whole. The only module that reads the environment.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, ValueEnum};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What a new login does to the user's older connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MultiLogin {
    /// Every login stays.
    All,
    /// A new login replaces the user's older connections on the same platform, on any node.
    Platform,
    /// A new login replaces every older connection of the user, on any node.
    Single,
}

/// The raw settings, exactly as given. Call [`Config::validate`] before use.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "presence-gateway",
    version,
    about = "Horizontally sharded presence gateway",
    args_override_self = true
)]
pub struct Config {
    /// HTTP and WebSocket address (`/ws`, `/v1`, `/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "PRESENCE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Key for `/v1`. Without one `/v1` answers 401, except with `--dev`, where the key is `dev`.
    #[arg(long, env = "PRESENCE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// HS256 secret for client JWTs (claims `sub`, `platform`, `exp`); JWTs are refused without one.
    #[arg(long, env = "PRESENCE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// `redis://host:port/db` of a single Redis; unset (and no cluster) means the embedded backend.
    #[arg(long, env = "PRESENCE_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Comma-separated `host:port` seeds of a Redis Cluster (instead of `--redis-url`).
    #[arg(long, env = "PRESENCE_REDIS_CLUSTER")]
    pub redis_cluster: Option<String>,

    /// Prefix of every Redis key and channel, so two deployments can share a Redis.
    #[arg(long, env = "PRESENCE_KEY_PREFIX", default_value = "presence")]
    pub key_prefix: String,

    /// This node's id (default: the host name, else random).
    #[arg(long, env = "PRESENCE_NODE_ID")]
    pub node_id: Option<String>,

    /// The WebSocket URL this node advertises (default: derived from the listen address).
    #[arg(long, env = "PRESENCE_WS_URL")]
    pub ws_url: Option<String>,

    /// Shard workers per node (default: twice the cores).
    #[arg(long, env = "PRESENCE_SHARDS")]
    pub shards: Option<usize>,

    /// Changes that make a shard flush at once.
    #[arg(long, env = "PRESENCE_BATCH_MAX", default_value_t = 100)]
    pub batch_max: usize,

    /// Longest wait, from a shard's first pending change, before it flushes.
    #[arg(long, env = "PRESENCE_BATCH_INTERVAL_MS", default_value_t = 1000)]
    pub batch_interval_ms: u64,

    /// Flushes per second a node may start before their batch is due, so that a user coming
    /// online or choosing a status is seen at once (offline transitions always wait for the
    /// batch). Spread over the shards; past it, changes batch, and from batch_max / 4 × this many
    /// changes a second on the node (a storm: 5,000 at the defaults) all of them do. 0 batches
    /// everything.
    #[arg(long, env = "PRESENCE_EARLY_FLUSHES_PER_SEC", default_value_t = 200)]
    pub early_flushes_per_sec: u32,

    /// Presence entry expiry; each node renews its entries every third of it.
    #[arg(long, env = "PRESENCE_TTL_SECS", default_value_t = 60)]
    pub ttl_secs: u64,

    /// Server ping interval; a connection silent for two intervals is closed with 4010.
    #[arg(long, env = "PRESENCE_HEARTBEAT_MS", default_value_t = 25_000)]
    pub heartbeat_ms: u64,

    /// Inactivity on every connection of a user before they show as away.
    #[arg(long, env = "PRESENCE_IDLE_AWAY_SECS", default_value_t = 600)]
    pub idle_away_secs: u64,

    /// Largest frame accepted, in bytes; larger ones close the socket with 4008.
    #[arg(long, env = "PRESENCE_MAX_FRAME_BYTES", default_value_t = 65_536)]
    pub max_frame_bytes: usize,

    /// Frames a connection's outbound queue holds before the connection counts as a slow consumer
    /// and is closed with 4008.
    #[arg(long, env = "PRESENCE_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,

    /// Bytes a connection's outbound queue holds before the connection counts as a slow consumer
    /// and is closed with 4008.
    #[arg(long, env = "PRESENCE_OUTBOUND_QUEUE_BYTES", default_value_t = 4 << 20)]
    pub outbound_queue_bytes: usize,

    /// Largest reply of many messages (`sync`, stored messages at connect, REST history): longer
    /// ones are cut, with `more: true` where the reply has it.
    #[arg(long, env = "PRESENCE_MAX_REPLY_BYTES", default_value_t = 1 << 20)]
    pub max_reply_bytes: usize,

    /// What a new login does to the user's older connections (closed with 4011): `all` keeps
    /// them, `platform` replaces those on the same platform, `single` replaces every one.
    #[arg(long, env = "PRESENCE_MULTI_LOGIN", value_enum, default_value_t = MultiLogin::All)]
    pub multi_login: MultiLogin,

    /// WebSocket sessions one node holds at most; more upgrades are answered 503. Sockets are
    /// capped at this plus a headroom kept for probes, metrics and REST. The default leaves room
    /// under a 20,000 open-files limit.
    #[arg(long, env = "PRESENCE_MAX_CONNECTIONS", default_value_t = 16_384)]
    pub max_connections: usize,

    /// A request's headers must arrive within this many ms, or the socket is closed (silent and
    /// slowloris sockets).
    #[arg(long, env = "PRESENCE_HEADER_TIMEOUT_MS", default_value_t = 5_000)]
    pub header_timeout_ms: u64,

    /// New connections per second from one address (0: no limit). Behind a load balancer that
    /// hides clients' addresses every client shares one, so it is off by default.
    #[arg(long, env = "PRESENCE_CONNECT_RATE_PER_IP", default_value_t = 0)]
    pub connect_rate_per_ip: u32,

    /// Connections one user may hold on one node; more are closed with 4009.
    #[arg(long, env = "PRESENCE_MAX_CONNS_PER_USER", default_value_t = 32)]
    pub max_conns_per_user: usize,

    /// Frames a connection may send per second (sustained; bursts of the same size pass).
    #[arg(long, env = "PRESENCE_RATE_LIMIT", default_value_t = 200)]
    pub rate_limit: u32,

    /// How long a stored private message waits for its recipient, in seconds.
    #[arg(long, env = "PRESENCE_OFFLINE_TTL_SECS", default_value_t = 30 * 86_400)]
    pub offline_ttl_secs: u64,

    /// Private messages one client may leave stored for offline recipients per window (per
    /// node); beyond it such sends answer `rate_limited`.
    #[arg(long, env = "PRESENCE_STORE_QUOTA_MESSAGES", default_value_t = 500)]
    pub store_quota_messages: u64,

    /// Bytes of bodies one client may leave stored per window (per node).
    #[arg(long, env = "PRESENCE_STORE_QUOTA_BYTES", default_value_t = 4 << 20)]
    pub store_quota_bytes: u64,

    /// The storage budget's window, in seconds.
    #[arg(
        long,
        env = "PRESENCE_STORE_QUOTA_WINDOW_SECS",
        default_value_t = 3_600
    )]
    pub store_quota_window_secs: u64,

    /// Groups one user may be a member of. A `join` or a REST member add past it is refused
    /// (`forbidden`), so that what a connect reads for the user (their groups, and for `unread`
    /// each group's read position and count) stays bounded.
    #[arg(long, env = "PRESENCE_MAX_GROUPS_PER_USER", default_value_t = 1000)]
    pub max_groups_per_user: usize,

    /// Private messages kept per offline user until they connect and acknowledge them.
    #[arg(long, env = "PRESENCE_OFFLINE_CAP", default_value_t = 1000)]
    pub offline_cap: usize,

    /// Messages kept per group for `sync` and history.
    #[arg(long, env = "PRESENCE_HISTORY_CAP", default_value_t = 1000)]
    pub history_cap: usize,

    /// Oldest group message kept, in seconds.
    #[arg(long, env = "PRESENCE_HISTORY_AGE_SECS", default_value_t = 7 * 86_400)]
    pub history_age_secs: u64,

    /// How long a `send`'s `client_msg_id` is remembered, in seconds: a repeat within it gets the
    /// first one's `ack` and is not sent again.
    #[arg(long, env = "PRESENCE_DEDUPE_SECS", default_value_t = 300)]
    pub dedupe_secs: u64,

    /// Remembered `client_msg_id`s the embedded backend keeps at most (the oldest are forgotten
    /// first). On Redis each is a key that expires after `PRESENCE_DEDUPE_SECS`.
    #[arg(long, env = "PRESENCE_DEDUPE_MAX", default_value_t = 100_000)]
    pub dedupe_max: usize,

    /// How long the router keeps trying a message whose backend call failed (with backoff)
    /// before answering `unavailable`, in ms; every attempt ends by then.
    #[arg(long, env = "PRESENCE_SEND_RETRY_MS", default_value_t = 2_000)]
    pub send_retry_ms: u64,

    /// Lifetime of opaque tokens from `POST /v1/tokens` when the request names none.
    #[arg(long, env = "PRESENCE_TOKEN_TTL_SECS", default_value_t = 86_400)]
    pub token_ttl_secs: u64,

    /// Comma-separated allowed `Origin` values for `/ws`; unset allows any origin.
    #[arg(long, env = "PRESENCE_ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,

    /// Comma-separated webhook targets for `user.online` / `user.offline`.
    #[arg(long, env = "PRESENCE_WEBHOOK_URLS")]
    pub webhook_urls: Option<String>,

    /// HMAC-SHA256 key for webhook signatures.
    #[arg(long, env = "PRESENCE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// How long after an event its webhook is retried (backoff 200 ms doubling to 30 s) before it
    /// is given up, counted and logged.
    #[arg(long, env = "PRESENCE_WEBHOOK_RETRY_SECS", default_value_t = 3_600)]
    pub webhook_retry_secs: u64,

    /// Webhook events the shared queue (Redis stream, or memory) holds at most, across all
    /// nodes; more are refused and counted.
    #[arg(long, env = "PRESENCE_WEBHOOK_QUEUE_MAX", default_value_t = 100_000)]
    pub webhook_queue_max: usize,

    /// Webhook events a node buffers while the queue is slow or unreachable; more are dropped
    /// and counted (a shard never waits on it).
    #[arg(long, env = "PRESENCE_WEBHOOK_BUFFER", default_value_t = 65_536)]
    pub webhook_buffer: usize,

    /// Authorization hook: the gateway asks this URL (a signed `POST`) before each client `join` and
    /// `subscribe`. Needs `--webhook-secret`, which signs its requests. Unset: no hook.
    #[arg(long, env = "PRESENCE_AUTH_HOOK_URL")]
    pub auth_hook_url: Option<String>,

    /// Longest wait for the authorization hook's answer; no answer in time refuses the request.
    #[arg(long, env = "PRESENCE_AUTH_HOOK_TIMEOUT_MS", default_value_t = 2000)]
    pub auth_hook_timeout_ms: u64,

    /// How long the authorization hook's answers are kept per exact request (0: not kept).
    #[arg(long, env = "PRESENCE_AUTH_HOOK_CACHE_SECS", default_value_t = 0)]
    pub auth_hook_cache_secs: u64,

    /// Longest drain on SIGTERM/SIGINT: delay, spread, the last flush and the handover together.
    #[arg(long, env = "PRESENCE_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// After SIGTERM/SIGINT, how long the node keeps serving and accepting while `/readyz`
    /// answers 503, so a load balancer's health checks take it out before any client is closed.
    #[arg(long, env = "PRESENCE_DRAIN_DELAY_SECS", default_value_t = 5)]
    pub drain_delay_secs: u64,

    /// Then the node's clients are closed (1001) one after another over this many seconds, so
    /// their reconnects do not land on the other nodes all at once.
    #[arg(long, env = "PRESENCE_DRAIN_SPREAD_SECS", default_value_t = 10)]
    pub drain_spread_secs: u64,

    /// A user closed by the drain stays online this long for everyone (their entry is handed over
    /// to expiry): one who reconnects to another node meanwhile never shows offline and no
    /// `user.offline` webhook fires. 0: the drain writes them offline at once.
    #[arg(long, env = "PRESENCE_DRAIN_HANDOVER_SECS", default_value_t = 10)]
    pub drain_handover_secs: u64,

    /// Log filter (tracing env-filter syntax).
    #[arg(long, env = "PRESENCE_LOG", default_value = "info")]
    pub log: String,

    /// Log line format.
    #[arg(long, env = "PRESENCE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Laptop mode: API key `dev`, and a printed example of how to get a token and connect.
    #[arg(long, env = "PRESENCE_DEV", default_value_t = false)]
    pub dev: bool,
}

/// Where presence lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendChoice {
    Embedded,
    Redis(String),
    RedisCluster(Vec<String>),
}

impl Config {
    /// The storage budget of client senders.
    pub fn store_quota(&self) -> crate::router::StoreQuota {
        crate::router::StoreQuota {
            messages: self.store_quota_messages,
            bytes: self.store_quota_bytes,
            window: Duration::from_secs(self.store_quota_window_secs),
        }
    }

    /// How the router retries a batch whose backend call failed.
    pub fn send_retry(&self) -> crate::router::RetryPolicy {
        crate::router::RetryPolicy::new(Duration::from_millis(self.send_retry_ms))
    }

    /// The defaults, as if started with no flags and an empty environment.
    pub fn defaults() -> Self {
        match Config::try_parse_from_env(["presence-gateway"], |_| None) {
            Ok(config) => config,
            // Every field has a default, so an empty command line always parses.
            Err(e) => unreachable!("defaults do not parse: {e}"),
        }
    }

    /// Parses flags, reading environment variables through `lookup` instead of the process
    /// environment, so tests never touch the real one.
    pub fn try_parse_from_env<I, T>(
        args: I,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut command = <Config as clap::CommandFactory>::command();
        // Replace each argument's env lookup by one through `lookup`: clap reads the process
        // environment only, so variables found by `lookup` are turned into flags.
        let mut argv: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let mut extra: Vec<std::ffi::OsString> = Vec::new();
        for arg in command.get_arguments() {
            if let (Some(env), Some(long)) = (arg.get_env(), arg.get_long())
                && let Some(value) = env.to_str().and_then(&lookup)
            {
                if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
                    if value == "1" || value.eq_ignore_ascii_case("true") {
                        extra.push(format!("--{long}").into());
                    }
                } else {
                    extra.push(format!("--{long}={value}").into());
                }
            }
        }
        command = command
            .mut_args(|arg| arg.env(None::<&str>))
            .args_override_self(true);
        // Variables go first so that flags on the command line win over them.
        let program = if argv.is_empty() {
            "presence-gateway".into()
        } else {
            argv.remove(0)
        };
        let argv: Vec<std::ffi::OsString> =
            std::iter::once(program).chain(extra).chain(argv).collect();
        let matches = command.try_get_matches_from(argv)?;
        <Config as clap::FromArgMatches>::from_arg_matches(&matches)
    }

    pub fn backend(&self) -> BackendChoice {
        match (&self.redis_url, &self.redis_cluster) {
            (Some(url), _) => BackendChoice::Redis(url.clone()),
            (None, Some(seeds)) => BackendChoice::RedisCluster(self.cluster_seeds(seeds)),
            (None, None) => BackendChoice::Embedded,
        }
    }

    fn cluster_seeds(&self, seeds: &str) -> Vec<String> {
        seeds
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }

    /// The API key in force: the configured one, or `dev` in dev mode.
    pub fn effective_api_key(&self) -> Option<String> {
        self.api_key
            .clone()
            .filter(|k| !k.is_empty())
            .or_else(|| self.dev.then(|| "dev".to_string()))
    }

    pub fn node_id(&self) -> String {
        if let Some(id) = &self.node_id {
            return id.clone();
        }
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        if shared::ids::is_valid_id(&host) {
            // Several nodes on one host (tests, benchmarks) need distinct ids: add the port.
            format!("{host}-{}", self.listen.port())
        } else {
            format!("node-{:016x}", rand::random::<u64>())
        }
    }

    /// The advertised WebSocket URL for a node bound to `bound`.
    pub fn ws_url(&self, bound: SocketAddr) -> String {
        if let Some(url) = &self.ws_url {
            return url.clone();
        }
        let host = if bound.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            bound.ip().to_string()
        };
        format!("ws://{host}:{}/ws", bound.port())
    }

    pub fn shard_count(&self) -> usize {
        self.shards.unwrap_or_else(|| {
            2 * std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        })
    }

    /// Each shard's share of [`Config::early_flushes_per_sec`] (at least one when it is not 0).
    pub fn early_flushes_per_shard(&self) -> u32 {
        let shards = self.shard_count().max(1) as u32;
        self.early_flushes_per_sec.div_ceil(shards)
    }

    pub fn batch_interval(&self) -> Duration {
        Duration::from_millis(self.batch_interval_ms)
    }
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs)
    }
    pub fn renew_interval(&self) -> Duration {
        Duration::from_millis(self.ttl_secs * 1000 / 3)
    }
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
    pub fn idle_away(&self) -> Duration {
        Duration::from_secs(self.idle_away_secs)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
    pub fn drain_delay(&self) -> Duration {
        Duration::from_secs(self.drain_delay_secs)
    }
    pub fn drain_spread(&self) -> Duration {
        Duration::from_secs(self.drain_spread_secs)
    }
    pub fn drain_handover(&self) -> Duration {
        Duration::from_secs(self.drain_handover_secs)
    }

    /// The authorization hook's URL; an empty value counts as unset.
    pub fn auth_hook_url(&self) -> Option<&str> {
        self.auth_hook_url.as_deref().filter(|u| !u.is_empty())
    }
    pub fn auth_hook_timeout(&self) -> Duration {
        Duration::from_millis(self.auth_hook_timeout_ms)
    }
    pub fn auth_hook_cache(&self) -> Duration {
        Duration::from_secs(self.auth_hook_cache_secs)
    }

    pub fn allowed_origins(&self) -> Vec<String> {
        split_list(self.allowed_origins.as_deref())
    }
    pub fn webhook_urls(&self) -> Vec<String> {
        split_list(self.webhook_urls.as_deref())
    }
    /// Webhooks go out at all: a secret to sign them and somewhere to send them.
    pub fn sends_webhooks(&self) -> bool {
        self.webhook_secret.is_some() && !self.webhook_urls().is_empty()
    }
    pub fn webhook_retry(&self) -> Duration {
        Duration::from_secs(self.webhook_retry_secs)
    }
}

fn split_list(list: Option<&str>) -> Vec<String> {
    list.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

mod validate;

#[cfg(test)]
mod tests;
