//! Wiring: builds the backend, the shards and the shared state every request handler and session
//! sees, and starts the node's long-lived tasks. The only place that spawns them.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use metrics_exporter_prometheus::PrometheusHandle;
use shared::Platform;
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::Authenticator,
    authz::AuthzHook,
    backend::{
        BackendSettings, MemoryBackend, MessageSettings, RedisBackend, RedisTarget, Roles,
        WebhookWrites,
    },
    clock::now_ms,
    config::{BackendChoice, Config},
    drain::Drain,
    hooks::{ChangeHooks, WebhookSettings},
    index_repair, metrics as m,
    registry::Heartbeat,
    router::Router,
    shard::{ShardBackend, ShardSettings, Shards, route_events},
};

/// Backend events waiting to be routed to shards.
const EVENT_QUEUE: usize = 65_536;
/// Commands a shard's mailbox holds before senders wait.
const SHARD_MAILBOX: usize = 16_384;

/// What every handler and session shares.
pub struct App {
    pub config: Config,
    pub node_id: Arc<str>,
    pub ws_url: String,
    pub started_at: u64,
    pub backend: Roles,
    pub shards: Shards,
    pub router: Router,
    pub auth: Authenticator,
    /// The app backend's say on client `join` and `subscribe` (`PRESENCE_AUTH_HOOK_URL`).
    pub authz: Option<Arc<AuthzHook>>,
    /// Metrics and webhooks after changes (the REST API's kicks too).
    pub hooks: ChangeHooks,
    pub api_key: Option<String>,
    pub allowed_origins: Vec<String>,
    pub metrics: Option<PrometheusHandle>,
    /// False until started and again once draining: `/readyz` answers 503.
    pub ready: AtomicBool,
    /// The drain's phases: sessions close in turn once it closes them.
    pub drain: Drain,
    next_conn_id: AtomicU64,
    /// Open connections; the registry heartbeat announces it.
    connections: Arc<AtomicI64>,
    by_platform: [AtomicI64; 9],
    /// Every session task, so shutdown can wait for them to close.
    pub sessions: TaskTracker,
    /// Wakes the registry heartbeat early (after the backend lost its data).
    pub announce_now: Arc<tokio::sync::Notify>,
}

impl App {
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The open-connections counter, for the accept loop's socket cap.
    pub fn connection_counter(&self) -> Arc<AtomicI64> {
        self.connections.clone()
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed).max(0) as u64
    }

    /// Counts a connection in or out of the node's gauges.
    pub fn count_connection(&self, platform: Platform, delta: i64) {
        let total = self.connections.fetch_add(delta, Ordering::Relaxed) + delta;
        metrics::gauge!(m::CONNECTIONS).set(total as f64);
        if let Some(slot) = self.by_platform.get(platform as usize) {
            let n = slot.fetch_add(delta, Ordering::Relaxed) + delta;
            metrics::gauge!(m::CONNECTIONS_BY_PLATFORM, "platform" => platform.to_string())
                .set(n as f64);
        }
    }
}

/// The running node's tasks, for shutdown.
pub struct Running {
    pub app: Arc<App>,
    /// Stopped before the node leaves the registry, so it cannot announce itself again after.
    heartbeat: (CancellationToken, tokio::task::JoinHandle<()>),
    /// Cancelled once every session is gone: the accept loop stops (see [`Running::stop_accepting`]).
    stop_accepting: CancellationToken,
    background: TaskTracker,
    shards_tracker: TaskTracker,
    stop_shards: CancellationToken,
    stop_background: CancellationToken,
}

/// Builds the node. `bound` is the address the listener got.
pub async fn build(config: Config, bound: SocketAddr) -> anyhow::Result<Running> {
    let node_id: Arc<str> = config.node_id().into();
    let settings = BackendSettings {
        presence_ttl: config.ttl(),
        node_ttl: config.ttl(),
        messages: MessageSettings {
            offline_cap: config.offline_cap,
            history_cap: config.history_cap,
            history_age: Duration::from_secs(config.history_age_secs),
            offline_ttl: Duration::from_secs(config.offline_ttl_secs),
            dedupe_window: Duration::from_secs(config.dedupe_secs),
            dedupe_max: config.dedupe_max,
        },
        max_groups_per_user: config.max_groups_per_user,
        webhooks: config.sends_webhooks().then(|| WebhookWrites {
            node: node_id.clone(),
            queue_max: config.webhook_queue_max,
        }),
    };
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let background = TaskTracker::new();
    let stop_background = CancellationToken::new();
    let redis_target = match config.backend() {
        BackendChoice::Embedded => None,
        BackendChoice::Redis(url) => Some(RedisTarget::Single(url)),
        BackendChoice::RedisCluster(seeds) => Some(RedisTarget::Cluster(seeds)),
    };
    let backend = match redis_target {
        None => Roles::of(Arc::new(MemoryBackend::new(settings, events_tx))),
        Some(target) => Roles::of(Arc::new(
            RedisBackend::connect(
                target,
                &config.key_prefix,
                settings,
                events_tx,
                &background,
                stop_background.clone(),
            )
            .await?,
        )),
    };

    let hooks = match &config.webhook_secret {
        Some(secret) => ChangeHooks::with_webhooks(
            WebhookSettings {
                urls: config.webhook_urls(),
                secret: secret.clone(),
                node: node_id.clone(),
                retry: config.webhook_retry(),
                queue_max: config.webhook_queue_max,
                buffer: config.webhook_buffer,
                // A node whose heartbeat is this old counts as dead; so does one that has not
                // touched its webhook events for as long.
                claim_timeout: config.ttl(),
            },
            backend.webhooks.clone(),
            stop_background.clone(),
            &background,
        ),
        None => ChangeHooks::metrics_only(),
    };

    // A node restarted under the same id must not leave its old users online forever: nobody
    // else reaps a node that keeps announcing. Their offline transitions go out as webhooks.
    let stale = backend.registry.reap_previous_run(&node_id).await?;
    if !stale.is_empty() {
        tracing::info!(
            users = stale.len(),
            "cleared presence left by this node's previous run"
        );
        metrics::counter!(m::REAPED_USERS).increment(stale.len() as u64);
        hooks.changed(&node_id, stale);
    }

    let authz = match (config.auth_hook_url(), &config.webhook_secret) {
        (Some(url), Some(secret)) => Some(Arc::new(AuthzHook::new(
            url.to_string(),
            secret.as_bytes(),
            config.auth_hook_timeout(),
            config.auth_hook_cache(),
        )?)),
        (Some(_), None) => anyhow::bail!("PRESENCE_AUTH_HOOK_URL needs PRESENCE_WEBHOOK_SECRET"),
        (None, _) => None,
    };

    let shards_tracker = TaskTracker::new();
    let stop_shards = CancellationToken::new();
    let shards = Shards::spawn(
        config.shard_count(),
        ShardSettings {
            node: node_id.clone(),
            batch_max: config.batch_max,
            batch_interval: config.batch_interval(),
            early_flushes_per_sec: config.early_flushes_per_shard(),
            renew_interval: config.renew_interval(),
            idle_away: config.idle_away(),
            max_conns_per_user: config.max_conns_per_user,
            mailbox: SHARD_MAILBOX,
        },
        ShardBackend {
            presence: backend.presence.clone(),
            subscriptions: backend.subscriptions.clone(),
            messages: backend.messages.clone(),
        },
        hooks.clone(),
        &shards_tracker,
        stop_shards.clone(),
    );

    let router = Router::spawn(
        config.shard_count(),
        backend.messages.clone(),
        config.store_quota(),
        config.send_retry(),
        &shards_tracker,
        stop_shards.clone(),
    );

    let app = Arc::new(App {
        ws_url: config.ws_url(bound),
        node_id,
        started_at: now_ms(),
        hooks: hooks.clone(),
        auth: Authenticator::new(config.jwt_secret.as_deref(), backend.tokens.clone()),
        authz,
        api_key: config.effective_api_key(),
        allowed_origins: config.allowed_origins(),
        backend,
        shards: shards.clone(),
        router,
        metrics: m::install(),
        ready: AtomicBool::new(false),
        next_conn_id: AtomicU64::new(1),
        connections: Arc::new(AtomicI64::new(0)),
        by_platform: Default::default(),
        sessions: TaskTracker::new(),
        drain: Drain::default(),
        announce_now: Arc::new(tokio::sync::Notify::new()),
        config,
    });
    app.backend.health.export();

    background.spawn(route_events(
        events_rx,
        shards,
        app.backend.sessions.clone(),
        app.node_id.clone(),
        app.announce_now.clone(),
        stop_background.clone(),
    ));
    let heartbeat = Heartbeat {
        registry: app.backend.registry.clone(),
        presence: app.backend.presence.clone(),
        hooks,
        node_id: app.node_id.clone(),
        ws_url: app.ws_url.clone(),
        started_at: app.started_at,
        connections: app.connections.clone(),
        interval: app.config.renew_interval(),
        now: app.announce_now.clone(),
    };
    // In the registry before ready, so the first token answer can already name this node.
    if let Err(e) = heartbeat.announce().await {
        tracing::warn!(error = %e, "could not announce the node; the heartbeat will retry");
    }
    let stop_heartbeat = stop_background.child_token();
    let heartbeat = (
        stop_heartbeat.clone(),
        background.spawn(heartbeat.run(stop_heartbeat)),
    );
    background.spawn(index_repair::run(
        app.backend.presence.clone(),
        index_repair::REPAIR_INTERVAL,
        stop_background.clone(),
    ));
    if let Some(handle) = app.metrics.clone() {
        let stop = stop_background.clone();
        background.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => handle.run_upkeep(),
                    _ = stop.cancelled() => break,
                }
            }
        });
    }
    app.ready.store(true, Ordering::Release);
    Ok(Running {
        app,
        heartbeat,
        stop_accepting: CancellationToken::new(),
        background,
        shards_tracker,
        stop_shards,
        stop_background,
    })
}

impl Running {
    /// The accept loop's stop: it outlives the signal, since during the drain the node still
    /// answers probes (503 on `/readyz`), metrics and REST, and accepts WebSockets until it
    /// starts closing them.
    pub fn stop_accepting(&self) -> CancellationToken {
        self.stop_accepting.clone()
    }

    /// Drains the node (docs/ARCHITECTURE.md, "Shutdown: the drain"), all within the grace
    /// period: not ready but serving for the drain delay; sessions closed with 1001 spread over
    /// the drain spread (closes taking nothing from presence when there is a handover window);
    /// the accept loop stopped once they are gone; every batch flushed; then the node's entries
    /// handed over to expiry (or removed, without a window) as it leaves the registry.
    pub async fn shutdown(self) {
        let app = self.app;
        let config = &app.config;
        let deadline = tokio::time::Instant::now() + config.shutdown_grace();
        app.ready.store(false, Ordering::Release);
        app.drain.begin();
        tracing::info!(
            delay_secs = config.drain_delay_secs,
            "draining: not ready, still serving until load balancers notice"
        );
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + config.drain_delay()))
            .await;
        let handover = config.drain_handover();
        if !handover.is_zero() {
            app.shards.drain().await;
        }
        let open = app.connections();
        tracing::info!(
            sessions = open,
            spread_secs = config.drain_spread_secs,
            "draining: closing sessions"
        );
        app.drain.close_sessions(open, config.drain_spread());
        app.sessions.close();
        if tokio::time::timeout_at(deadline, app.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!("sessions still open at the end of the grace period");
        }
        self.stop_accepting.cancel();
        self.stop_shards.cancel();
        self.shards_tracker.close();
        if tokio::time::timeout_at(deadline, self.shards_tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("shards still flushing at the end of the grace period");
        }
        let (stop_heartbeat, heartbeat) = self.heartbeat;
        stop_heartbeat.cancel();
        let _ = tokio::time::timeout_at(deadline, heartbeat).await;
        let registry = &app.backend.registry;
        if handover.is_zero() {
            match tokio::time::timeout_at(deadline, registry.leave_node(&app.node_id)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not leave the node registry"),
                Err(_) => tracing::warn!("no time left to leave the node registry"),
            }
        } else {
            match tokio::time::timeout_at(deadline, registry.hand_over(&app.node_id, handover))
                .await
            {
                Ok(Ok(users)) => tracing::info!(
                    users,
                    window_secs = handover.as_secs(),
                    "handed presence over to expiry: users who reconnect elsewhere stay online"
                ),
                // Then the node is reaped as a dead one: its users show offline within the TTL
                // (those who reconnected elsewhere stay online all the same).
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not hand presence over; the node will be reaped as dead")
                }
                Err(_) => tracing::warn!("no time left to hand presence over"),
            }
        }
        self.stop_background.cancel();
        self.background.close();
        let _ = tokio::time::timeout_at(deadline, self.background.wait()).await;
        tracing::info!(node = %app.node_id, "node stopped");
    }
}
