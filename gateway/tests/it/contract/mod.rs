//! The backend roles' contracts (`gateway/src/backend/*.rs`), one suite per role, each test
//! written once and run in-process against both implementations, as centrifuge's
//! `map_broker_shared_test.go` does: `contract!` turns every test body `async fn x(f: Factory)`
//! into `memory::x` (a [`MemoryBackend`]) and `redis::x` (a [`RedisBackend`] on one redis-server
//! shared by the whole test binary, with a key prefix of its own per backend, so tests run
//! concurrently).
//!
//! What a test sees of a backend is an [`Under`]: its roles (as `Roles` hands them to consumers),
//! the node id it writes as, and the receiving end of its event channel. Redis delivers events
//! asynchronously, so tests never sleep for them: [`Under::watch`] and [`Under::unwatch`] return
//! once the change is in effect, and [`Under::sync`] returns every event published before it was
//! called. Each is a private message round trip to an inbox of the harness's own: `watch` and
//! `unwatch` change a probe inbox's subscription in the same call as the topics' (one SUBSCRIBE or
//! UNSUBSCRIBE on Redis) and message it until it is (or no longer is) delivered live; `sync`
//! messages a sentinel inbox watched from the start, and since one subscriber connection hears
//! its channels in publish order, every earlier event has arrived once the sentinel's has.
//!
//! The redis-server starts with the first Redis test and is shut down (and its directory removed)
//! by a watchdog shell when the test process exits, however it exits.
//!
//! Preconditions the app keeps and the tests keep too:
//! - A node's liveness follows the `last_heartbeat` it announced: every backend announces its
//!   node `n1` with the current time when it starts, and a test that writes as another node
//!   announces it.
//! - The app runs `presence_ttl == node_ttl`. On the embedded backend (one process, so no other
//!   node can reap) reaping means sweeping every entry past its expiry, which with equal TTLs is
//!   exactly the dead node's entries; reaping tests use equal TTLs.

use std::{
    collections::{HashMap, VecDeque},
    ops::Deref,
    process::{Child, Command, Stdio},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use gateway::{
    backend::{
        Audience, BackendEvent, BackendSettings, Changed, Delivery, MemoryBackend, MessageSettings,
        NodeInfo, Outgoing, RedisBackend, RedisTarget, Renewal, Roles, Topic,
    },
    clock::now_ms,
    presence::{ChosenStatus, NodeEntry, PresenceRecord, platform_bit},
};
use shared::{Body, Destination, RouteResult, Status};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::harness::Redis;

/// Runs each listed test body against both backends: `contract!(a, b { memory: #[ignore = "…"] })`
/// makes `memory::a`, `memory::b` (ignored), `redis::a` and `redis::b`.
macro_rules! contract {
    ($( $test:ident $({ $(memory: #[$memory:meta])? $(redis: #[$redis:meta])? })? ),* $(,)?) => {
        mod memory {
            $(
                $($(#[$memory])?)?
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::contract::Factory::memory()).await
                }
            )*
        }
        mod redis {
            $(
                $($(#[$redis])?)?
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::contract::Factory::redis()).await
                }
            )*
        }
    };
}

/// `PresenceStore` counts and online index: exact through every change, retries, reaping, data
/// loss and concurrent writers; the repair walk.
mod counts;
/// `Subscriptions`: watched topics, unwatch, ordering, membership and message events.
mod events;
/// `Groups`: membership both ways, paging, idempotence, `online_members`.
mod groups;
/// `MessageStore`: routing, offline storage, history, read positions, unread counts.
mod messages;
/// `PresenceStore`: records, versions, expiry, renewal, online lists and counts.
mod presence;
/// `Registry`: announcements, leaving, reaping exactly once.
mod registry;
/// `TokenStore`: redeeming and expiry.
mod tokens;
/// `WebhookQueue`: claims, acks, taking over from dead nodes, the bound.
mod webhooks;

/// The node every backend under test writes as, announced when it starts.
pub const N1: &str = "n1";
/// How long a test waits for something that should happen at once (an event, a subscription).
const PATIENCE: Duration = Duration::from_secs(10);

/// Which implementation a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Memory,
    Redis,
}

/// Builds the backends of one test, all of one kind.
#[derive(Debug, Clone, Copy)]
pub struct Factory {
    kind: Kind,
}

impl Factory {
    pub fn memory() -> Self {
        Factory { kind: Kind::Memory }
    }

    pub fn redis() -> Self {
        Factory { kind: Kind::Redis }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// A fresh, empty backend with [`settings`].
    pub async fn backend(&self) -> Under {
        self.backend_with(settings()).await
    }

    /// A fresh, empty backend (on Redis: a prefix of its own) as node [`N1`].
    pub async fn backend_with(&self, settings: BackendSettings) -> Under {
        let (tx, rx) = mpsc::channel(4096);
        let (roles, data) = match self.kind {
            Kind::Memory => {
                let backend = Arc::new(MemoryBackend::new(settings.clone(), tx));
                (Roles::of(backend.clone()), Data::Memory(backend))
            }
            Kind::Redis => {
                let prefix = format!(
                    "t{}-{:08x}",
                    COUNTER.fetch_add(1, Ordering::Relaxed),
                    rand::random::<u32>()
                );
                let conn = RedisConn::connect(&prefix, &settings, tx).await;
                (
                    conn.roles.clone(),
                    Data::Redis {
                        prefix,
                        _conn: conn,
                    },
                )
            }
        };
        let mut under = Under {
            settings,
            roles,
            data,
            events: Events {
                rx,
                stash: VecDeque::new(),
            },
            held: HashMap::new(),
            sentinel: probe_user(),
        };
        under.announce(N1).await;
        let sentinel = Topic::Inbox(under.sentinel.clone());
        under.watch(vec![sentinel]).await;
        under
    }
}

/// Settings of most tests: nothing expires while a test runs, caps out of the way.
pub fn settings() -> BackendSettings {
    BackendSettings {
        presence_ttl: Duration::from_secs(30),
        node_ttl: Duration::from_secs(30),
        messages: MessageSettings {
            offline_cap: 100,
            history_cap: 1000,
            history_age: Duration::from_secs(86_400),
            offline_ttl: Duration::from_secs(86_400),
            dedupe_window: Duration::from_secs(300),
            dedupe_max: 1000,
        },
        max_groups_per_user: 1000,
        webhooks: None,
    }
}

/// [`settings`] with short presence and node TTLs (equal, as the app runs them).
pub fn short_ttl(ttl: Duration) -> BackendSettings {
    BackendSettings {
        presence_ttl: ttl,
        node_ttl: ttl,
        ..settings()
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(1);

/// Users of the harness's own: the sentinel inbox behind [`Under::sync`] and the probes behind
/// [`Under::watch`]/[`Under::unwatch`]. Their deliveries never reach a test.
const PROBE: &str = "zz.probe.";

fn probe_user() -> String {
    format!("{PROBE}{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn is_probe(event: &BackendEvent) -> bool {
    matches!(event, BackendEvent::Message(Delivery { audience: Audience::User(u), .. }) if u.starts_with(PROBE))
}

/// A backend under test: its roles, the node it writes as, and its events.
pub struct Under {
    pub settings: BackendSettings,
    roles: Roles,
    data: Data,
    events: Events,
    /// Each (node, user) entry as last written, the `before` of the next write (as a shard keeps it).
    held: HashMap<(String, String), NodeEntry>,
    sentinel: String,
}

enum Data {
    Memory(Arc<MemoryBackend>),
    Redis { prefix: String, _conn: RedisConn },
}

impl Deref for Under {
    type Target = Roles;

    fn deref(&self) -> &Roles {
        &self.roles
    }
}

/// Another node on the same data: on Redis a second connection on the same prefix (its own
/// subscriber and event channel, unread); on the embedded backend, which holds every node of its
/// one process, the very same backend.
pub struct Peer {
    pub node: String,
    roles: Roles,
    _conn: Option<RedisConn>,
}

impl Deref for Peer {
    type Target = Roles;

    fn deref(&self) -> &Roles {
        &self.roles
    }
}

struct RedisConn {
    roles: Roles,
    stop: CancellationToken,
    _events: Option<mpsc::Receiver<BackendEvent>>,
}

impl RedisConn {
    async fn connect(
        prefix: &str,
        settings: &BackendSettings,
        events: mpsc::Sender<BackendEvent>,
    ) -> RedisConn {
        let stop = CancellationToken::new();
        let backend = RedisBackend::connect(
            RedisTarget::Single(shared_redis().redis.url()),
            prefix,
            settings.clone(),
            events,
            &TaskTracker::new(),
            stop.clone(),
        )
        .await
        .expect("connect to the test redis-server");
        RedisConn {
            roles: Roles::of(Arc::new(backend)),
            stop,
            _events: None,
        }
    }
}

impl Drop for RedisConn {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Under {
    /// Another node (`node`) on this backend's data, see [`Peer`].
    pub async fn peer(&self, node: &str) -> Peer {
        match &self.data {
            Data::Memory(backend) => Peer {
                node: node.to_string(),
                roles: Roles::of(backend.clone()),
                _conn: None,
            },
            Data::Redis { prefix, .. } => {
                let (tx, rx) = mpsc::channel(4096);
                let mut conn = RedisConn::connect(prefix, &self.settings, tx).await;
                conn._events = Some(rx);
                Peer {
                    node: node.to_string(),
                    roles: conn.roles.clone(),
                    _conn: Some(conn),
                }
            }
        }
    }

    /// Announces `node` as alive now, as its heartbeat does.
    pub async fn announce(&self, node: &str) {
        self.registry
            .announce_node(&node_info(node, 0))
            .await
            .expect("announce_node");
    }

    // ---- presence, as the shards write it ----

    /// Writes one batch of `node`'s entries (`None` removes one) and chosen statuses, with each
    /// entry's `before` as this node last wrote it.
    pub async fn write(
        &mut self,
        node: &str,
        writes: &[(&str, Option<NodeEntry>, Option<ChosenStatus>)],
    ) -> Vec<Changed> {
        let batch: Vec<_> = writes
            .iter()
            .map(|(user, entry, status)| gateway::backend::PresenceWrite {
                user: user.to_string(),
                entry: *entry,
                before: self
                    .held
                    .get(&(node.to_string(), user.to_string()))
                    .copied(),
                status: status.clone(),
            })
            .collect();
        let changed = self
            .presence
            .write_presence(node, batch)
            .await
            .expect("write_presence");
        for (user, entry, _) in writes {
            let key = (node.to_string(), user.to_string());
            match entry {
                Some(e) => self.held.insert(key, *e),
                None => self.held.remove(&key),
            };
        }
        changed
    }

    /// `user` has connections on `platforms` at [`N1`] (none idle); returns the change, if any.
    pub async fn connect(&mut self, user: &str, platforms: &[u8]) -> Option<Changed> {
        one(self
            .write(N1, &[(user, Some(entry(platforms)), None)])
            .await)
    }

    /// `user`'s last connection at [`N1`] is gone.
    pub async fn disconnect(&mut self, user: &str) -> Option<Changed> {
        one(self.write(N1, &[(user, None, None)]).await)
    }

    /// `user` (connected at [`N1`]) chooses `status`.
    pub async fn set_status(
        &mut self,
        user: &str,
        status: Status,
        text: Option<&str>,
    ) -> Option<Changed> {
        let held = self.held.get(&(N1.to_string(), user.to_string())).copied();
        one(self
            .write(N1, &[(user, held, Some(chosen(status, text)))])
            .await)
    }

    /// Renews `node`'s entries as its shards do: every entry this harness wrote for `node`, each
    /// with the status chosen through it, if given.
    pub async fn renew(&self, node: &str, chosen: &[(&str, ChosenStatus)]) -> Vec<Changed> {
        let renewals: Vec<Renewal> = self
            .held
            .iter()
            .filter(|((n, _), _)| n == node)
            .map(|((_, user), entry)| Renewal {
                user: user.clone(),
                entry: *entry,
                chosen: chosen
                    .iter()
                    .find(|(u, _)| u == user)
                    .map(|(_, c)| c.clone()),
            })
            .collect();
        self.presence
            .renew_presence(node, renewals)
            .await
            .expect("renew_presence")
    }

    pub async fn record(&self, user: &str) -> PresenceRecord {
        let mut records = self
            .presence
            .presence(&[user.to_string()])
            .await
            .expect("presence");
        assert_eq!(records.len(), 1);
        records.remove(0)
    }

    /// Every visibly online user (optionally on `platform`), paging `limit` at a time.
    pub async fn all_online(&self, limit: usize, platform: Option<u8>) -> Vec<String> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (page, next) = self
                .presence
                .online_users(after.as_deref(), limit, platform)
                .await
                .expect("online_users");
            assert!(page.len() <= limit, "page over its limit: {page:?}");
            all.extend(page);
            match next {
                Some(cursor) => after = Some(cursor),
                None => return all,
            }
        }
    }

    /// The backend loses `node`'s presence entries, as when Redis comes back empty: on Redis every
    /// key of this backend's prefix is deleted (and [`N1`] announced again, as the heartbeat does
    /// on a resync). The embedded backend cannot lose data; its nearest case is an entry that
    /// expired and was swept: the TTL is waited out and the entries swept (short TTLs only).
    pub async fn lose_presence(&mut self) {
        match &self.data {
            Data::Redis { prefix, .. } => {
                let script = "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
                              redis.call('DEL', k) n = n + 1 end return n";
                let pattern = format!("*{prefix}*");
                let deleted = shared_redis().redis.cli(&["EVAL", script, "0", &pattern]);
                assert!(
                    deleted.trim().parse::<u64>().is_ok_and(|n| n > 0),
                    "nothing deleted: {deleted:?}"
                );
                self.announce(N1).await;
            }
            Data::Memory(_) => {
                assert!(self.settings.presence_ttl < Duration::from_secs(2));
                sleep_past(self.settings.presence_ttl).await;
                self.registry
                    .reap_dead_nodes("sweeper")
                    .await
                    .expect("reap_dead_nodes");
            }
        }
    }

    /// Repair steps (`PresenceStore::repair_index`) until this backend's walk has covered the
    /// whole index once; returns how many entries they corrected.
    pub async fn repair_pass(&self) -> u64 {
        let mut fixed = 0;
        for _ in 0..100_000 {
            let step = self.presence.repair_index().await.expect("repair_index");
            fixed += step.fixed;
            if step.pass_done {
                return fixed;
            }
        }
        panic!("the repair walk never finished a pass");
    }

    /// `pattern` with `{prefix}` replaced by this backend's key prefix (Redis only).
    pub fn key(&self, pattern: &str) -> String {
        let Data::Redis { prefix, .. } = &self.data else {
            panic!("Redis only");
        };
        pattern.replace("{prefix}", prefix)
    }

    /// Runs a command on this backend's redis-server (Redis only); returns its output.
    pub fn redis_cli(&self, args: &[String]) -> String {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        shared_redis().redis.cli(&args)
    }

    /// On Redis, runs a Lua snippet deleting every key of this backend's prefix that matches
    /// `pattern` (`{prefix}` stands for the prefix); returns how many went.
    pub fn delete_keys(&self, pattern: &str) -> u64 {
        let Data::Redis { prefix, .. } = &self.data else {
            panic!("Redis only");
        };
        let script = "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
                      redis.call('DEL', k) n = n + 1 end return n";
        let pattern = pattern.replace("{prefix}", prefix);
        let deleted = shared_redis().redis.cli(&["EVAL", script, "0", &pattern]);
        deleted.trim().parse().unwrap_or(0)
    }

    /// Redis only: sets the reap lock of `dead` as if `holder` had taken it (and not finished).
    pub fn hold_reap_lock(&self, dead: &str, holder: &str) {
        let Data::Redis { prefix, .. } = &self.data else {
            panic!("Redis only");
        };
        let key = format!("{{{prefix}}}:reap:{dead}");
        shared_redis()
            .redis
            .cli(&["SET", &key, holder, "PX", "30000"]);
    }

    /// Redis only: the users' records are lost and the online index kept, as when the Redis
    /// Cluster master of their slots restarts empty and the index's masters do not.
    pub fn lose_records(&self) -> u64 {
        self.delete_keys("{prefix}:u:*")
    }

    /// Redis only: the online index is lost and the records kept (the other way round).
    pub fn lose_index(&self) -> u64 {
        self.delete_keys("{prefix}:ix:*")
    }

    // ---- events ----

    /// Watches `topics` and returns once events of them reach the sink: the topics go out with a
    /// fresh probe inbox in one `watch`, and the probe is messaged until a message reaches it.
    pub async fn watch(&mut self, mut topics: Vec<Topic>) {
        let probe = probe_user();
        topics.push(Topic::Inbox(probe.clone()));
        self.subscriptions.watch(topics);
        self.until_probe(&probe, true).await;
    }

    /// Unwatches `topics` and returns once events of them no longer reach the sink (a probe that
    /// is watched first goes out with them, and is messaged until messages to it are stored).
    pub async fn unwatch(&mut self, mut topics: Vec<Topic>) {
        let probe = probe_user();
        self.subscriptions.watch(vec![Topic::Inbox(probe.clone())]);
        self.until_probe(&probe, true).await;
        topics.push(Topic::Inbox(probe.clone()));
        self.subscriptions.unwatch(topics);
        self.until_probe(&probe, false).await;
    }

    async fn until_probe(&mut self, probe: &str, heard: bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.round_trip(probe).await != heard {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the subscription of {probe} did not change"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Sends a marker message to `user`'s inbox (from itself, so no sender copy); when it is
    /// delivered live, waits for its event (keeping every other event for the test) and returns
    /// true; when it is stored (nobody listens), returns false.
    async fn round_trip(&mut self, user: &str) -> bool {
        let marker = format!("marker-{}", COUNTER.fetch_add(1, Ordering::Relaxed));
        let out = Outgoing {
            from: user.to_string(),
            to: Destination::User {
                user: user.to_string(),
            },
            body: Body::from(marker.as_str()),
            sent_at: now_ms(),
            origin: None,
            check_membership: false,
            may_store: true,
            dedupe: None,
        };
        let outcome = self
            .messages
            .send(vec![out])
            .await
            .expect("send a marker")
            .remove(0)
            .expect("a private message is never refused");
        if outcome.result != RouteResult::Delivered {
            return false;
        }
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("marker {marker} to {user} was never delivered"))
                .expect("event channel open");
            if let BackendEvent::Message(d) = &event
                && d.audience == Audience::User(user.to_string())
                && d.message.body == Body::from(marker.as_str())
            {
                return true;
            }
            if !is_probe(&event) {
                self.events.stash.push_back(event);
            }
        }
    }

    /// Every event published before this call and not yet taken, in arrival order (the harness's
    /// own deliveries left out).
    pub async fn sync(&mut self) -> Vec<BackendEvent> {
        let sentinel = self.sentinel.clone();
        assert!(
            self.round_trip(&sentinel).await,
            "the sentinel inbox is watched"
        );
        self.events.stash.drain(..).collect()
    }

    /// [`Under::sync`], keeping only presence events.
    pub async fn presence_events(&mut self) -> Vec<PresenceRecord> {
        self.public_flagged_events()
            .await
            .into_iter()
            .map(|(record, _)| record)
            .collect()
    }

    /// [`Under::presence_events`], each with whether others see its change.
    pub async fn public_flagged_events(&mut self) -> Vec<(PresenceRecord, bool)> {
        self.sync()
            .await
            .into_iter()
            .filter_map(|e| match e {
                BackendEvent::Presence {
                    record,
                    public_changed,
                } => Some((record, public_changed)),
                _ => None,
            })
            .collect()
    }
}

struct Events {
    rx: mpsc::Receiver<BackendEvent>,
    /// Events that arrived while the harness waited for one of its own.
    stash: VecDeque<BackendEvent>,
}

fn one(mut changed: Vec<Changed>) -> Option<Changed> {
    assert!(changed.len() <= 1, "one user written, changes: {changed:?}");
    changed.pop()
}

pub fn node_info(node: &str, connections: u64) -> NodeInfo {
    let now = now_ms();
    NodeInfo {
        id: node.to_string(),
        ws_url: format!("ws://{node}.test/ws"),
        connections,
        started_at: now,
        last_heartbeat: now,
    }
}

pub fn mask(platforms: &[u8]) -> u16 {
    platforms.iter().fold(0, |m, p| m | platform_bit(*p))
}

/// An entry with connections on `platforms`, not idle.
pub fn entry(platforms: &[u8]) -> NodeEntry {
    NodeEntry {
        platforms: mask(platforms),
        idle: false,
    }
}

/// An entry whose every connection on `platforms` is idle.
pub fn idle(platforms: &[u8]) -> NodeEntry {
    NodeEntry {
        platforms: mask(platforms),
        idle: true,
    }
}

/// A status chosen now.
pub fn chosen(status: Status, text: Option<&str>) -> ChosenStatus {
    ChosenStatus {
        status,
        text: text.map(String::from),
        at: now_ms(),
    }
}

pub fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A private message from `from` to `to` with body `text`.
pub fn private(from: &str, to: &str, text: &str) -> Outgoing {
    Outgoing {
        from: from.to_string(),
        to: Destination::User {
            user: to.to_string(),
        },
        body: Body::from(text),
        sent_at: now_ms(),
        origin: None,
        check_membership: false,
        may_store: true,
        dedupe: None,
    }
}

/// A message from `from` to `group` with body `text`, sent by a client (`check_membership`) or
/// by the app backend.
pub fn to_group(from: &str, group: &str, text: &str, check_membership: bool) -> Outgoing {
    Outgoing {
        from: from.to_string(),
        to: Destination::Group {
            group: group.to_string(),
        },
        body: Body::from(text),
        sent_at: now_ms(),
        origin: None,
        check_membership,
        may_store: true,
        dedupe: None,
    }
}

/// How far past an expiry a test looks (sleeps last at least as long as asked, so this only
/// covers the clocks' granularity).
const MARGIN: Duration = Duration::from_millis(50);

/// Sleeps until just past `ttl` from now (what expires does so in real time on Redis).
pub async fn sleep_past(ttl: Duration) {
    tokio::time::sleep(ttl + MARGIN).await;
}

/// The redis-server every Redis test of this binary shares, stopped when the process exits.
struct SharedRedis {
    redis: Redis,
    /// A shell reading its stdin, which is this pipe: when this process exits (however it ends)
    /// the pipe closes and the shell shuts the server down and removes its directory. Statics are
    /// never dropped, so `Redis`'s own `Drop` would never run.
    _watchdog: Child,
}

fn shared_redis() -> &'static SharedRedis {
    static REDIS: OnceLock<SharedRedis> = OnceLock::new();
    REDIS.get_or_init(|| {
        let redis = Redis::start();
        let dir = redis.cli(&["CONFIG", "GET", "dir"]);
        let dir = dir.lines().nth(1).unwrap_or_default().trim().to_string();
        assert!(
            dir.contains("presence-redis-"),
            "unexpected redis dir {dir:?}"
        );
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "read _; redis-cli -p {} shutdown nosave; rm -rf '{dir}'",
                redis.port
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the redis watchdog");
        SharedRedis {
            redis,
            _watchdog: watchdog,
        }
    })
}
