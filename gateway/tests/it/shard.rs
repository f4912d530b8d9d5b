//! One shard worker on a paused clock, in-process: started through `Shards::spawn` as
//! `app::build` starts them, on the embedded backend behind a `PresenceStore` that records every
//! call (with the paused clock's time) and can be told to fail. Backend events reach the shard
//! through `route_events`, as in a node; connections are `ConnHandle`s whose queues the test reads.
//! Each test pins one rule of `shard/worker` to the millisecond and takes milliseconds of real time.
//!
//! The clock moves with [`Shard::at`], a `sleep_until` on the paused clock: a paused runtime moves
//! its clock only once every task is idle, and then only to the next timer due, so every timer on
//! the way (the batch deadline, a retry, a renewal tick, the idle check) fires at its own instant
//! and the worker has finished with it before the test looks. `time::advance` would jump in one
//! step and return after a single yield: timers passed on the way would fire together, late, and
//! the worker might not have run yet.
//!
//! `clock::now_ms` is the wall clock and does not move with the paused one. Nothing here depends on
//! it but idleness, which the worker reads from `ConnHandle::last_activity` (wall-clock ms): the idle
//! test ages a connection by back-dating that instead of waiting. Presence versions still grow, as
//! they are `max(previous + 1, now_ms)`.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use gateway::{
    backend::{
        BackendError, BackendSettings, Changed, Counts, IndexRepair, MemoryBackend,
        MessageSettings, PresenceStore, PresenceWrite, Renewal,
    },
    clock::now_ms,
    conn_handle::ConnHandle,
    frame::EncodedFrame,
    hooks::ChangeHooks,
    presence::{ChosenStatus, NodeEntry, PresenceRecord, platform_bit},
    shard::{ShardBackend, ShardCmd, ShardSettings, Shards, route_events},
};
use shared::{Encoding, Platform, Presence, ServerFrame, Status};
use tokio::{
    sync::{Notify, mpsc, oneshot},
    time::{Instant, sleep, sleep_until},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

const NODE: &str = "node-a";
const DAY: Duration = Duration::from_secs(86_400);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A shard that batches for 1 s, flushes at 100 changes, and (within a test's span) neither
/// renews nor finds anyone idle.
fn settings() -> ShardSettings {
    ShardSettings {
        node: NODE.into(),
        batch_max: 100,
        batch_interval: ms(1000),
        early_flushes_per_sec: 0,
        renew_interval: DAY,
        idle_away: DAY,
        max_conns_per_user: 4,
        mailbox: 4096,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    Renew,
}

/// One call the shard made to the presence store.
#[derive(Debug, Clone)]
struct Call {
    /// When it started, in ms since the test started (paused clock).
    at: u64,
    op: Op,
    /// The users it carried, sorted.
    users: Vec<String>,
    /// What a write carried, sorted by user.
    writes: Vec<PresenceWrite>,
    /// Failed on purpose.
    failed: bool,
}

/// The embedded backend's presence role, recorded.
struct Recorder {
    inner: Arc<MemoryBackend>,
    started: Instant,
    calls: Mutex<Vec<Call>>,
    /// Writes still to fail.
    fail_writes: AtomicUsize,
    /// How long a renewal call takes, in ms (so a test can catch a round in flight).
    renew_ms: AtomicU64,
    /// How long a write takes, in ms.
    write_ms: AtomicU64,
}

impl Recorder {
    fn log(&self, op: Op, mut users: Vec<String>, mut writes: Vec<PresenceWrite>, failed: bool) {
        users.sort();
        writes.sort_by(|a, b| a.user.cmp(&b.user));
        let at = self.started.elapsed().as_millis() as u64;
        self.calls.lock().expect("calls").push(Call {
            at,
            op,
            users,
            writes,
            failed,
        });
    }
}

#[async_trait]
impl PresenceStore for Recorder {
    async fn write_presence(
        &self,
        node: &str,
        writes: Vec<PresenceWrite>,
    ) -> Result<Vec<Changed>, BackendError> {
        let failed = self
            .fail_writes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let users = writes.iter().map(|w| w.user.clone()).collect();
        self.log(Op::Write, users, writes.clone(), failed);
        let takes = self.write_ms.load(Ordering::SeqCst);
        if takes > 0 {
            sleep(ms(takes)).await;
        }
        if failed {
            return Err(BackendError::unavailable("flush", "injected failure"));
        }
        self.inner.write_presence(node, writes).await
    }

    async fn renew_presence(
        &self,
        node: &str,
        entries: Vec<Renewal>,
    ) -> Result<Vec<Changed>, BackendError> {
        let users = entries.iter().map(|r| r.user.clone()).collect();
        self.log(Op::Renew, users, Vec::new(), false);
        let takes = self.renew_ms.load(Ordering::SeqCst);
        if takes > 0 {
            sleep(ms(takes)).await;
        }
        self.inner.renew_presence(node, entries).await
    }

    async fn presence(&self, users: &[String]) -> Result<Vec<PresenceRecord>, BackendError> {
        self.inner.presence(users).await
    }

    async fn online_users(
        &self,
        after: Option<&str>,
        limit: usize,
        platform: Option<Platform>,
    ) -> Result<(Vec<String>, Option<String>), BackendError> {
        self.inner.online_users(after, limit, platform).await
    }

    async fn counts(&self) -> Result<Counts, BackendError> {
        self.inner.counts().await
    }

    async fn repair_index(&self) -> Result<IndexRepair, BackendError> {
        self.inner.repair_index().await
    }
}

/// A local connection as the shard sees it; the test drains its queue as its session would.
struct Conn {
    handle: Arc<ConnHandle>,
}

impl Conn {
    /// The presence events queued since the last call.
    fn presence(&mut self) -> Vec<Presence> {
        let mut events = Vec::new();
        while let Some(frame) = self.handle.pop_queued() {
            let bytes = frame.bytes(Encoding::Json).expect("encodes");
            if let ServerFrame::Presence(p) = Encoding::Json.decode_server(&bytes).expect("decodes")
            {
                events.push(p);
            }
        }
        events
    }
}

/// One shard worker of node `NODE`, on the embedded backend behind a [`Recorder`].
struct Shard {
    backend: Arc<MemoryBackend>,
    store: Arc<Recorder>,
    shards: Shards,
    tracker: TaskTracker,
    stop: CancellationToken,
    started: Instant,
    next_conn: AtomicU64,
}

impl Shard {
    fn start(settings: ShardSettings) -> Shard {
        // Entries outlive every test unless one renews them.
        let ttl = settings.renew_interval.saturating_mul(3);
        let (events_tx, events_rx) = mpsc::channel(4096);
        let backend = Arc::new(MemoryBackend::new(
            BackendSettings {
                presence_ttl: ttl,
                node_ttl: ttl,
                messages: MessageSettings {
                    offline_cap: 10,
                    history_cap: 10,
                    history_age: DAY,
                    offline_ttl: DAY,
                    dedupe_window: Duration::from_secs(300),
                    dedupe_max: 1000,
                },
                max_groups_per_user: 1000,
                webhooks: None,
            },
            events_tx,
        ));
        let started = Instant::now();
        let store = Arc::new(Recorder {
            inner: backend.clone(),
            started,
            calls: Mutex::new(Vec::new()),
            fail_writes: AtomicUsize::new(0),
            renew_ms: AtomicU64::new(0),
            write_ms: AtomicU64::new(0),
        });
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let shards = Shards::spawn(
            1,
            settings,
            ShardBackend {
                presence: store.clone(),
                subscriptions: backend.clone(),
                messages: backend.clone(),
            },
            ChangeHooks::metrics_only(),
            &tracker,
            stop.clone(),
        );
        tracker.spawn(route_events(
            events_rx,
            shards.clone(),
            backend.clone(),
            "n1".into(),
            Arc::new(Notify::new()),
            stop.clone(),
        ));
        Shard {
            backend,
            store,
            shards,
            tracker,
            stop,
            started,
            next_conn: AtomicU64::new(1),
        }
    }

    /// Ms since the test started.
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Runs the paused clock to `t` ms after the start, firing every timer due on the way, and
    /// returns once every task is idle at `t`.
    async fn at(&self, t: u64) {
        assert!(t >= self.now(), "at({t}) is in the past ({})", self.now());
        sleep_until(self.started + ms(t)).await;
    }

    fn conn(&self, user: &str, platform: Platform) -> Conn {
        let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, 40_000));
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let handle = ConnHandle::new(
            id,
            user.to_string(),
            platform,
            Encoding::Json,
            peer,
            None,
            now_ms(),
            256,
        );
        Conn {
            handle: Arc::new(handle),
        }
    }

    async fn send(&self, user: &str, cmd: ShardCmd) {
        assert!(self.shards.send(user, cmd).await, "shard stopped");
    }

    /// Opens a connection of `user` on `platform`.
    async fn connect(&self, user: &str, platform: Platform) -> Conn {
        let conn = self.conn(user, platform);
        let (reply, accepted) = oneshot::channel();
        let cmd = ShardCmd::Connect {
            conn: conn.handle.clone(),
            welcome: EncodedFrame::new(ServerFrame::Pong { id: None }),
            offline: Vec::new(),
            groups: Vec::new(),
            reply,
        };
        self.send(user, cmd).await;
        assert!(accepted.await.expect("reply"), "connection refused");
        conn
    }

    async fn disconnect(&self, conn: &Conn) {
        let cmd = ShardCmd::Disconnect {
            user: conn.handle.user.clone(),
            conn: conn.handle.id,
        };
        self.send(&conn.handle.user, cmd).await;
    }

    /// A connection of a user who is not connected through this shard, subscribed to `users`.
    async fn watcher(&self, users: &[&str]) -> Conn {
        let conn = self.conn("watcher", 1);
        let cmd = ShardCmd::Watch {
            users: users.iter().map(|u| u.to_string()).collect(),
            conn: conn.handle.clone(),
            confirmed: None,
        };
        self.send(users[0], cmd).await;
        conn
    }

    async fn set_status(&self, user: &str, status: Status, text: Option<&str>) {
        let status = ChosenStatus {
            status,
            text: text.map(String::from),
            at: gateway::clock::now_ms(),
        };
        let cmd = ShardCmd::SetStatus {
            user: user.to_string(),
            status,
        };
        self.send(user, cmd).await;
    }

    async fn record(&self, user: &str) -> PresenceRecord {
        let mut records = self
            .backend
            .presence(&[user.to_string()])
            .await
            .expect("embedded read");
        records.pop().expect("one record")
    }

    fn calls(&self, op: Op) -> Vec<Call> {
        let calls = self.store.calls.lock().expect("calls");
        calls.iter().filter(|c| c.op == op).cloned().collect()
    }

    fn writes(&self) -> Vec<Call> {
        self.calls(Op::Write)
    }

    fn fail_writes(&self, n: usize) {
        self.store.fail_writes.store(n, Ordering::SeqCst);
    }

    /// Stops the worker as a node's shutdown does, and waits for its last flush.
    async fn stop(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn entry(platforms: &[Platform], idle: bool) -> Option<NodeEntry> {
    Some(NodeEntry {
        platforms: platforms.iter().fold(0, |m, p| m | platform_bit(*p)),
        idle,
    })
}

fn users(names: &[&str]) -> Vec<String> {
    names.iter().map(|u| u.to_string()).collect()
}

fn at_and_users(calls: &[Call]) -> Vec<(u64, Vec<String>)> {
    calls.iter().map(|c| (c.at, c.users.clone())).collect()
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_written_batch_interval_after_its_first_change() {
    let shard = Shard::start(settings());
    let mut bob = shard.watcher(&["alice", "carol"]).await;
    let alice = shard.connect("alice", 1).await;
    shard.at(400).await;
    // A later change joins the pending batch and does not push its deadline back.
    let _carol = shard.connect("carol", 5).await;

    shard.at(999).await;
    assert!(shard.writes().is_empty(), "{:?}", shard.writes());
    assert_eq!(shard.record("alice").await.status, Status::Offline);
    assert!(bob.presence().is_empty());

    shard.at(1001).await;
    let writes = shard.writes();
    assert_eq!(at_and_users(&writes), [(1000, users(&["alice", "carol"]))]);
    assert_eq!(writes[0].writes[0].entry, entry(&[1], false));
    assert_eq!(writes[0].writes[1].entry, entry(&[5], false));
    let alice_now = shard.record("alice").await;
    assert_eq!((alice_now.status, alice_now.platforms), (Status::Online, 2));
    let mut seen: Vec<(String, Status)> = bob
        .presence()
        .into_iter()
        .map(|p| (p.user, p.status))
        .collect();
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        [
            ("alice".to_string(), Status::Online),
            ("carol".to_string(), Status::Online)
        ]
    );

    // The next change opens a new batch, due a whole interval after it.
    shard.at(1500).await;
    shard.disconnect(&alice).await;
    shard.at(2499).await;
    assert_eq!(shard.writes().len(), 1);
    shard.at(2501).await;
    let writes = shard.writes();
    assert_eq!(at_and_users(&writes[1..]), [(2500, users(&["alice"]))]);
    assert_eq!(writes[1].writes[0].entry, None);
    assert_eq!(writes[1].writes[0].before, entry(&[1], false));
    assert_eq!(shard.record("alice").await.status, Status::Offline);
    let events = bob.presence();
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].user.as_str(), events[0].status),
        ("alice", Status::Offline)
    );
    shard.stop().await;
}

/// Group commit: coming online and choosing a status are written as soon as no write is in
/// flight (what arrives during one goes out right after it), within the budget of early flushes;
/// going offline waits for the batch even when an early flush goes out meanwhile, so a quick
/// reconnect stays silent; past the budget, an urgent change waits for it (or the batch).
#[tokio::test(start_paused = true)]
async fn online_and_status_changes_go_out_at_once_offline_waits_for_the_batch() {
    let shard = Shard::start(ShardSettings {
        early_flushes_per_sec: 2,
        ..settings()
    });
    shard.store.write_ms.store(10, Ordering::SeqCst);
    let mut bob = shard.watcher(&["alice", "carol", "dave", "erin"]).await;
    let alice = shard.connect("alice", 1).await;
    shard.at(2).await;
    let _carol = shard.connect("carol", 1).await;
    shard.at(5).await;
    let dave = shard.connect("dave", 2).await;
    shard.at(21).await;
    assert_eq!(
        at_and_users(&shard.writes()),
        [(0, users(&["alice"])), (10, users(&["carol", "dave"]))]
    );
    let mut online: Vec<_> = bob.presence().into_iter().map(|p| p.user).collect();
    online.sort();
    assert_eq!(online, users(&["alice", "carol", "dave"]));

    // Offline waits a whole interval; an urgent change meanwhile goes out alone, once the budget
    // (2 a second, both spent) has room again.
    shard.disconnect(&alice).await;
    shard.at(30).await;
    let _erin = shard.connect("erin", 1).await;
    shard.at(400).await;
    assert_eq!(shard.writes().len(), 2, "{:?}", shard.writes());
    shard.at(600).await;
    let writes = shard.writes();
    assert_eq!(writes[2].users, users(&["erin"]));
    assert!((499..=502).contains(&writes[2].at), "{:?}", writes[2]);
    assert_eq!(bob.presence()[0].user, "erin");
    shard.at(1020).await;
    assert_eq!(shard.writes().len(), 3);
    shard.at(1032).await;
    assert_eq!(
        at_and_users(&shard.writes()[3..]),
        [(1021, users(&["alice"]))]
    );
    assert_eq!(bob.presence()[0].status, Status::Offline);

    // A status choice is urgent; a reconnect inside the batch is not written at all.
    shard.set_status("carol", Status::Busy, Some("call")).await;
    shard.at(1100).await;
    shard.disconnect(&dave).await;
    let _dave = shard.connect("dave", 2).await;
    shard.at(3000).await;
    let writes = shard.writes();
    assert_eq!(at_and_users(&writes[4..]), [(1032, users(&["carol"]))]);
    let seen: Vec<_> = bob
        .presence()
        .into_iter()
        .map(|p| (p.user, p.status))
        .collect();
    assert_eq!(seen, [("carol".to_string(), Status::Busy)]);
    shard.stop().await;
}

#[tokio::test(start_paused = true)]
async fn batch_max_changes_are_written_at_once() {
    let shard = Shard::start(ShardSettings {
        batch_max: 3,
        ..settings()
    });
    let _u1 = shard.connect("u1", 1).await;
    let _u2 = shard.connect("u2", 1).await;
    // A status set by a user already in the batch is not another change.
    shard.set_status("u2", Status::Busy, None).await;
    shard.at(1).await;
    assert!(shard.writes().is_empty());
    let _u3 = shard.connect("u3", 1).await;
    shard.at(2).await;
    assert_eq!(
        at_and_users(&shard.writes()),
        [(1, users(&["u1", "u2", "u3"]))]
    );
    assert_eq!(shard.record("u2").await.status, Status::Busy);

    // The next change waits for the interval again.
    let _u4 = shard.connect("u4", 1).await;
    shard.at(1001).await;
    assert_eq!(shard.writes().len(), 1);
    shard.at(1003).await;
    assert_eq!(at_and_users(&shard.writes()[1..]), [(1002, users(&["u4"]))]);
    shard.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_flap_inside_one_batch_writes_and_publishes_nothing() {
    let shard = Shard::start(settings());
    let mut bob = shard.watcher(&["alice"]).await;
    let alice = shard.connect("alice", 1).await;
    shard.at(10).await;
    shard.disconnect(&alice).await;
    shard.at(3000).await;
    assert!(shard.writes().is_empty(), "{:?}", shard.writes());
    let record = shard.record("alice").await;
    assert_eq!((record.status, record.version), (Status::Offline, 0));
    assert!(bob.presence().is_empty());

    // The other way round: online, then a reconnect on the same platform inside one batch.
    let alice = shard.connect("alice", 1).await;
    shard.at(4001).await;
    assert_eq!(at_and_users(&shard.writes()), [(4000, users(&["alice"]))]);
    assert_eq!(bob.presence()[0].status, Status::Online);
    shard.disconnect(&alice).await;
    shard.at(4100).await;
    let alice = shard.connect("alice", 1).await;
    shard.at(6000).await;
    assert_eq!(shard.writes().len(), 1, "{:?}", shard.writes());
    assert!(bob.presence().is_empty());

    // A reconnect on another platform does change the entry, and is written.
    shard.disconnect(&alice).await;
    let _alice = shard.connect("alice", 5).await;
    shard.at(7001).await;
    let writes = shard.writes();
    assert_eq!(at_and_users(&writes[1..]), [(7000, users(&["alice"]))]);
    assert_eq!(writes[1].writes[0].entry, entry(&[5], false));
    assert_eq!(bob.presence()[0].platforms, vec![5]);
    shard.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failed_batches_are_retried_with_doubling_backoff_and_lose_nothing() {
    let shard = Shard::start(ShardSettings {
        batch_interval: ms(50),
        early_flushes_per_sec: 0,
        ..settings()
    });
    shard.fail_writes(8);
    let _alice = shard.connect("alice", 1).await;
    shard
        .set_status("alice", Status::Busy, Some("in a meeting"))
        .await;
    // Bob's change arrives during the outage and joins the next attempt.
    shard.at(2000).await;
    let bob = shard.connect("bob", 2).await;
    shard.at(30_000).await;

    let writes = shard.writes();
    // First attempt at the batch deadline, then 100 ms, doubling, capped at 5 s.
    let times: Vec<u64> = writes.iter().map(|c| c.at).collect();
    assert_eq!(times, [50, 150, 350, 750, 1550, 3150, 6350, 11_350, 16_350]);
    let failed: Vec<bool> = writes.iter().map(|c| c.failed).collect();
    let mut expect = vec![true; 8];
    expect.push(false);
    assert_eq!(failed, expect);
    for call in &writes {
        // A failed batch keeps its users, entries and status for the next attempt.
        let alice = &call.writes[0];
        assert_eq!(alice.user, "alice");
        assert_eq!(alice.entry, entry(&[1], false));
        assert_eq!(alice.before, None);
        let status = alice.status.as_ref().expect("status kept");
        assert_eq!(
            (status.status, status.text.as_deref()),
            (Status::Busy, Some("in a meeting"))
        );
        let expect = if call.at < 2000 {
            users(&["alice"])
        } else {
            users(&["alice", "bob"])
        };
        assert_eq!(call.users, expect, "at {}", call.at);
    }
    let alice = shard.record("alice").await;
    assert_eq!(
        (alice.status, alice.text.as_deref()),
        (Status::Busy, Some("in a meeting"))
    );
    assert_eq!(shard.record("bob").await.status, Status::Online);

    // Success resets the backoff: the next failure is retried 100 ms later.
    shard.fail_writes(1);
    shard.disconnect(&bob).await;
    shard.at(31_000).await;
    let writes = shard.writes();
    let after: Vec<(u64, bool)> = writes[9..].iter().map(|c| (c.at, c.failed)).collect();
    assert_eq!(after, [(30_050, true), (30_150, false)]);
    assert_eq!(shard.record("bob").await.status, Status::Offline);
    shard.stop().await;
}

#[tokio::test(start_paused = true)]
async fn renewal_rounds_run_every_interval_in_chunks_with_flushes_between() {
    let shard = Shard::start(ShardSettings {
        batch_max: 10_000,
        batch_interval: ms(50),
        early_flushes_per_sec: 0,
        renew_interval: ms(1000),
        ..settings()
    });
    // Each renewal call takes 10 ms, so a round of 3 chunks is in flight for 30 ms.
    shard.store.renew_ms.store(10, Ordering::SeqCst);
    let names: Vec<String> = (0..1200).map(|i| format!("user-{i:04}")).collect();
    let mut conns = Vec::new();
    for name in &names {
        conns.push(shard.connect(name, 1).await);
    }
    shard.at(60).await;
    assert_eq!(shard.writes().len(), 1);
    assert_eq!(shard.writes()[0].users.len(), 1200);

    // Rounds start at a random point of the first interval, then follow it exactly.
    shard.at(1060).await;
    let first = shard
        .calls(Op::Renew)
        .first()
        .map(|c| c.at)
        .expect("a round");
    assert!((50..1060).contains(&first), "first round at {first}");
    shard.at(first + 1100).await;
    let renews = shard.calls(Op::Renew);
    let sizes: Vec<(u64, usize)> = renews.iter().map(|c| (c.at, c.users.len())).collect();
    assert_eq!(
        sizes,
        [
            (first, 500),
            (first + 10, 500),
            (first + 20, 200),
            (first + 1000, 500),
            (first + 1010, 500),
            (first + 1020, 200),
        ]
    );
    for round in renews.chunks(3) {
        let mut renewed: Vec<String> = round.iter().flat_map(|c| c.users.clone()).collect();
        renewed.sort();
        assert_eq!(renewed, names, "each user once per round");
    }

    // A batch due while a chunk is in flight goes before the round's next chunk.
    let round = first + 2000;
    shard.at(round - 45).await;
    let _late = shard.connect("late", 1).await;
    shard.at(round + 100).await;
    let calls: Vec<(u64, Op, usize)> = shard.store.calls.lock().expect("calls")[1 + 6..]
        .iter()
        .map(|c| (c.at, c.op, c.users.len()))
        .collect();
    assert_eq!(
        calls,
        [
            (round, Op::Renew, 500),
            (round + 10, Op::Write, 1),
            (round + 10, Op::Renew, 500),
            (round + 20, Op::Renew, 200),
        ]
    );
    // The user written mid-round is renewed from the next round on.
    shard.at(round + 1100).await;
    let next: Vec<usize> = shard.calls(Op::Renew)[9..]
        .iter()
        .map(|c| c.users.len())
        .collect();
    assert_eq!(next, [500, 500, 201]);
    drop(conns);
    shard.stop().await;
}

#[tokio::test(start_paused = true)]
async fn idle_connections_turn_away_at_the_next_idle_check() {
    // Idle after 2 s; the check runs every quarter of that.
    let shard = Shard::start(ShardSettings {
        batch_interval: ms(50),
        early_flushes_per_sec: 0,
        idle_away: ms(2000),
        ..settings()
    });
    let mut bob = shard.watcher(&["alice"]).await;
    let alice = shard.connect("alice", 1).await;
    shard.at(100).await;
    assert_eq!(bob.presence()[0].status, Status::Online);
    // The wall clock does not move with the paused one: age the connection by hand.
    alice
        .handle
        .last_activity
        .store(now_ms() - 2000, Ordering::Relaxed);
    shard.at(549).await;
    assert_eq!(shard.record("alice").await.status, Status::Online);
    shard.at(551).await;
    let writes = shard.writes();
    assert_eq!(at_and_users(&writes[1..]), [(550, users(&["alice"]))]);
    assert_eq!(writes[1].writes[0].entry, entry(&[1], true));
    assert_eq!(shard.record("alice").await.status, Status::Away);
    assert_eq!(bob.presence()[0].status, Status::Away);

    // Activity brings her back at once (in the next batch), without waiting for a check.
    shard.at(600).await;
    alice.handle.touch(now_ms());
    let cmd = ShardCmd::Active {
        user: "alice".to_string(),
    };
    shard.send("alice", cmd).await;
    shard.at(651).await;
    let writes = shard.writes();
    assert_eq!(at_and_users(&writes[2..]), [(650, users(&["alice"]))]);
    assert_eq!(shard.record("alice").await.status, Status::Online);
    assert_eq!(bob.presence()[0].status, Status::Online);
    shard.stop().await;
}

#[tokio::test(start_paused = true)]
async fn stopping_writes_the_pending_batch_without_waiting() {
    let shard = Shard::start(settings());
    let _alice = shard.connect("alice", 1).await;
    shard.at(10).await;
    shard.stop().await;
    assert_eq!(at_and_users(&shard.writes()), [(10, users(&["alice"]))]);
    assert_eq!(shard.record("alice").await.status, Status::Online);
}

#[tokio::test(start_paused = true)]
async fn while_draining_closes_take_nothing_from_the_entry() {
    let shard = Shard::start(settings());
    let mut watcher = shard.watcher(&["alice", "bob", "carol"]).await;
    let alice = shard.connect("alice", 1).await;
    let bob_ios = shard.connect("bob", 1).await;
    let bob_web = shard.connect("bob", 5).await;
    let carol = shard.connect("carol", 2).await;
    shard.at(1001).await;
    assert_eq!(shard.writes().len(), 1);
    assert_eq!(watcher.presence().len(), 3);

    // The drain: every connection closes, one platform of bob's first; carol sets a status
    // before hers closes, and dave connects in between.
    shard.send("alice", ShardCmd::Drain).await;
    shard.disconnect(&bob_ios).await;
    shard.at(1500).await;
    shard.disconnect(&alice).await;
    shard.disconnect(&bob_web).await;
    shard.set_status("carol", Status::Busy, None).await;
    let _dave = shard.connect("dave", 3).await;
    shard.disconnect(&carol).await;
    shard.stop().await;

    // Only carol's status and dave's arrival were written; everyone else's entry stays as it was.
    let writes = shard.writes();
    assert_eq!(
        at_and_users(&writes[1..]),
        [(1500, users(&["carol", "dave"]))]
    );
    let carol_write = &writes[1].writes[0];
    assert_eq!(carol_write.entry, entry(&[2], false));
    assert_eq!(
        carol_write.status.as_ref().map(|s| s.status),
        Some(Status::Busy)
    );
    assert_eq!(writes[1].writes[1].entry, entry(&[3], false));
    for (user, platforms) in [("alice", vec![1]), ("bob", vec![1, 5]), ("carol", vec![2])] {
        let record = shard.record(user).await;
        assert_eq!(
            record.platforms,
            platforms.iter().fold(0, |m, p| m | platform_bit(*p))
        );
    }
    // (The worker stopped with the node, so carol's busy may not have been passed on.)
    let offline: Vec<Presence> = watcher
        .presence()
        .into_iter()
        .filter(|p| p.status == Status::Offline)
        .collect();
    assert_eq!(offline, vec![], "nobody went offline");
}
