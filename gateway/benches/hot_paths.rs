//! Micro-benchmarks of the gateway's per-node hot paths, through public APIs only: a shard worker
//! turning connect/disconnect commands into one batch written to the embedded backend, and the
//! fan-out of one message to many local connections (encode once per encoding, then one
//! non-blocking queue push per connection). These bound how many presence changes and deliveries
//! one node can handle per core. And what timing each client frame costs
//! (`presence_ws_request_seconds`), beside the frame counter every frame already paid for.
//!
//! Run: `cargo bench -p presence-gateway --bench hot_paths -- --warm-up-time 1 --measurement-time 3`

use std::{
    hint::black_box,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gateway::{
    backend::{BackendEvent, BackendSettings, MemoryBackend, MessageSettings, PresenceStore},
    clock::now_ms,
    conn_handle::ConnHandle,
    frame::EncodedFrame,
    hooks::ChangeHooks,
    metrics::{self as m, RequestTimer},
    shard::{ShardBackend, ShardCmd, ShardSettings, Shards},
};
use shared::{Body, Destination, Encoding, Message, ServerFrame, Status};
use tokio::{
    runtime::Runtime,
    sync::{mpsc, oneshot},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

fn peer() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 40_000))
}

/// N connections with their outbound queues; the first half MessagePack, the rest JSON.
fn connections(n: usize, queue: usize) -> Vec<Arc<ConnHandle>> {
    let now = now_ms();
    (0..n)
        .map(|i| {
            let encoding = if i < n / 2 {
                Encoding::MsgPack
            } else {
                Encoding::Json
            };
            let conn = ConnHandle::new(
                i as u64 + 1,
                format!("user-{:06}", 100_000 + i),
                1 + (i % 3) as u8,
                encoding,
                peer(),
                None,
                now,
                queue,
            );
            Arc::new(conn)
        })
        .collect()
}

/// Empties the queues as the connections' sessions would; how many frames they held.
fn drain(conns: &[Arc<ConnHandle>]) -> usize {
    conns
        .iter()
        .map(|conn| std::iter::from_fn(|| conn.pop_queued()).count())
        .sum()
}

/// One shard worker on a current-thread runtime (so the measured time is the CPU cost on one core,
/// not cross-thread wake-ups), writing to the embedded backend, with `n` users of one connection
/// each.
struct ShardFixture {
    rt: Runtime,
    node: ShardNode,
}

struct ShardNode {
    backend: Arc<MemoryBackend>,
    shards: Shards,
    tracker: TaskTracker,
    stop: CancellationToken,
    conns: Vec<Arc<ConnHandle>>,
    /// Kept open so the backend's event sink stays valid.
    _events: mpsc::Receiver<BackendEvent>,
}

impl ShardFixture {
    fn new(n: usize) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
        let (events_tx, events) = mpsc::channel(65_536);
        let backend = Arc::new(MemoryBackend::new(
            BackendSettings {
                presence_ttl: Duration::from_secs(3_600),
                node_ttl: Duration::from_secs(3_600),
                messages: MessageSettings {
                    offline_cap: 100,
                    history_cap: 100,
                    history_age: Duration::from_secs(3_600),
                    offline_ttl: Duration::from_secs(3_600),
                    dedupe_window: Duration::from_secs(300),
                    dedupe_max: 1000,
                },
                max_groups_per_user: 1000,
                webhooks: None,
            },
            events_tx,
        ));
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let shards = {
            let _in_runtime = rt.enter();
            Shards::spawn(
                1,
                ShardSettings {
                    node: "bench-node".into(),
                    // The batch is full, and flushed, when the last command of a phase arrives.
                    batch_max: n,
                    // Small next to the 1 s default but above a 1000-user phase (~1.3 ms): at
                    // 1 ms about one phase in ten was split into two flushes, at 5 ms none was.
                    batch_interval: Duration::from_millis(5),
                    early_flushes_per_sec: 0,
                    // Neither renewal nor the idle check fires during a run.
                    renew_interval: Duration::from_secs(3_600),
                    idle_away: Duration::from_secs(3_600),
                    max_conns_per_user: 4,
                    mailbox: 16_384,
                },
                ShardBackend {
                    presence: backend.clone(),
                    subscriptions: backend.clone(),
                    messages: backend.clone(),
                },
                ChangeHooks::metrics_only(),
                &tracker,
                stop.clone(),
            )
        };
        let conns = connections(n, 8);
        ShardFixture {
            rt,
            node: ShardNode {
                backend,
                shards,
                tracker,
                stop,
                conns,
                _events: events,
            },
        }
    }

    /// Runs `iters` rounds of connect-all then disconnect-all; returns the time of the phase
    /// asked for (`connect` or not) only.
    fn measure(&mut self, iters: u64, timed_connect: bool) -> Duration {
        let node = &mut self.node;
        self.rt.block_on(async {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for connect in [true, false] {
                    let took = node.phase(connect).await;
                    node.settle(connect).await;
                    if connect == timed_connect {
                        total += took;
                    }
                }
            }
            total
        })
    }

    fn shutdown(self) {
        self.node.stop.cancel();
        self.node.tracker.close();
        self.rt.block_on(self.node.tracker.wait());
    }
}

impl ShardNode {
    /// Sends one command per user and waits until the backend shows the last user in its new
    /// state. Commands are applied, batched and flushed in order, so the last user is written in
    /// the last flush: once it shows, every user does.
    async fn phase(&self, connect: bool) -> Duration {
        let started = Instant::now();
        let welcome = EncodedFrame::new(ServerFrame::Pong { id: None });
        for conn in &self.conns {
            let cmd = if connect {
                let (reply, _) = oneshot::channel();
                ShardCmd::Connect {
                    conn: conn.clone(),
                    welcome: welcome.clone(),
                    offline: Vec::new(),
                    groups: Vec::new(),
                    reply,
                }
            } else {
                ShardCmd::Disconnect {
                    user: conn.user.clone(),
                    conn: conn.id,
                }
            };
            assert!(self.shards.send(&conn.user, cmd).await, "shard stopped");
        }
        let expect = if connect {
            Status::Online
        } else {
            Status::Offline
        };
        let last = [self.conns.last().expect("n > 0").user.clone()];
        loop {
            let record = self.backend.presence(&last).await.expect("embedded read");
            if record.first().is_some_and(|r| r.status == expect) {
                break;
            }
            tokio::task::yield_now().await;
        }
        started.elapsed()
    }

    /// Untimed: lets the worker take the finished job back, checks every user landed, and empties
    /// the connections' queues (`welcome`).
    async fn settle(&mut self, connect: bool) {
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        let online = self.backend.counts().await.expect("embedded counts");
        let want = if connect { self.conns.len() as u64 } else { 0 };
        assert_eq!(online.online_users, want, "backend after the phase");
        drain(&self.conns);
    }
}

/// Cost per presence change through a shard: commands over the mailbox, the worker's bookkeeping,
/// the batch build, and the embedded backend's write of each change.
fn shard_batch(c: &mut Criterion) {
    let mut group = c.benchmark_group("shard_batch");
    for n in [100usize, 1000] {
        group.throughput(Throughput::Elements(n as u64));
        let mut fixture = ShardFixture::new(n);
        group.bench_function(BenchmarkId::new("connect", n), |b| {
            b.iter_custom(|iters| fixture.measure(iters, true))
        });
        group.bench_function(BenchmarkId::new("disconnect", n), |b| {
            b.iter_custom(|iters| fixture.measure(iters, false))
        });
        fixture.shutdown();
    }
    group.finish();
}

/// A group message as a shard delivers it: a 200-byte text body.
fn message() -> Message {
    Message {
        msg_id: "1767225600123-0000000042".to_string(),
        from: "user-104729".to_string(),
        to: Destination::Group {
            group: "team-platform".to_string(),
        },
        body: Body::Map(vec![(Body::from("text"), Body::from("x".repeat(200)))]),
        sent_at: 1_767_225_600_123,
        offline: None,
    }
}

/// One message to N local connections, half MessagePack and half JSON: one encode per encoding
/// plus one queue push per connection (what `ShardCmd::Deliver` does per member).
fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan_out");
    let message = message();
    for n in [100usize, 1000, 10_000] {
        group.throughput(Throughput::Elements(n as u64));
        let conns = connections(n, 4);
        group.bench_function(BenchmarkId::new("message_200b", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    let frame = EncodedFrame::new(ServerFrame::Message(message.clone()));
                    let mut sent = 0usize;
                    for conn in &conns {
                        if conn.push(&frame) {
                            sent += 1;
                        }
                    }
                    black_box(frame);
                    total += started.elapsed();
                    assert_eq!(sent, n, "every push queued");
                    assert_eq!(drain(&conns), n, "one frame per connection");
                }
                total
            })
        });
    }
    group.finish();
}

/// Per client frame, with the real Prometheus recorder: the frame counter (there before) and the
/// latency timer (two clock reads and a histogram record by frame type).
fn frame_metrics(c: &mut Criterion) {
    let _ = m::install();
    let mut group = c.benchmark_group("frame_metrics");
    group.bench_function("frames_in_counter", |b| {
        b.iter(|| metrics::counter!(m::FRAMES_IN, "type" => black_box("query")).increment(1))
    });
    group.bench_function("request_timer", |b| {
        b.iter(|| RequestTimer::start(black_box("query")).answered())
    });
    group.finish();
}

criterion_group!(benches, shard_batch, fan_out, frame_metrics);
criterion_main!(benches);
