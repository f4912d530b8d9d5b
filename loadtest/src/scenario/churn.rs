//! `churn`: clients connect and disconnect at a steady rate while observers subscribe to them;
//! measures presence propagation latency (online and offline) and missing or duplicate events.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use shared::{ClientFrame, ServerFrame, Status};
use tokio::{
    sync::{mpsc::UnboundedSender, watch},
    time::Instant,
};

use super::{
    Outcome,
    support::{
        CLOSE_WAIT, Shared, WorkerCtx, count_undecodable, epoch_us, gate, pace, per_sec, share,
        slice, wait_flag, wait_phase,
    },
};
use crate::{
    cli::ChurnArgs,
    client::{Conn, Incoming},
    fleet::Phase,
    report::{LatencySummary, Stats, Summary, figures, round},
};

const SUBSCRIBE_WAIT: Duration = Duration::from_secs(15);
const ONLINE: u8 = 1;
const OFFLINE: u8 = 2;

/// Churning clients of the whole run.
pub fn clients(a: &ChurnArgs) -> u64 {
    a.clients_per_sec * a.duration
}

/// Observer connections of the whole run.
pub fn observers(a: &ChurnArgs) -> u64 {
    clients(a).div_ceil(a.users_per_observer) * a.watchers
}

/// Peak sockets: every observer, plus the clients alive at once (with a margin).
pub fn sockets(a: &ChurnArgs) -> u64 {
    let alive = (a.clients_per_sec * (a.lifetime_ms + 2000)).div_ceil(1000);
    observers(a) + alive + a.clients_per_sec
}

pub fn validate(a: &ChurnArgs) -> anyhow::Result<Vec<String>> {
    if clients(a) > 2_000_000 {
        anyhow::bail!("clients-per-sec × duration is over 2,000,000 clients");
    }
    let mut warnings = Vec::new();
    if a.lifetime_ms < 1500 {
        warnings.push(format!(
            "--lifetime-ms {} is near or below the gateway's default batch interval (1 s): \
             a connect and a disconnect in one batch cancel out and send no event",
            a.lifetime_ms
        ));
    }
    Ok(warnings)
}

/// When each churning client of this worker started, got its welcome and closed: microseconds
/// since `t0`, plus one (0 = not yet).
struct Track {
    t0: Instant,
    base: u64,
    start: Vec<AtomicU64>,
    welcome: Vec<AtomicU64>,
    close: Vec<AtomicU64>,
}

impl Track {
    fn now(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64 + 1
    }

    fn mark(slot: Option<&AtomicU64>, v: u64) {
        if let Some(s) = slot {
            s.store(v, Ordering::Relaxed);
        }
    }

    fn get(v: &[AtomicU64], k: usize) -> u64 {
        v.get(k).map_or(0, |a| a.load(Ordering::Relaxed))
    }
}

pub async fn worker(args: &ChurnArgs, mut ctx: WorkerCtx) -> anyhow::Result<Stats> {
    let total = clients(args);
    let range = slice(total, ctx.worker, ctx.workers, args.users_per_observer);
    let n = (range.end - range.start) as usize;
    let shared = ctx.shared.clone();
    let zeros = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
    let track = Arc::new(Track {
        t0: Instant::now(),
        base: range.start,
        start: zeros(n),
        welcome: zeros(n),
        close: zeros(n),
    });

    // Setup: observers subscribe to blocks of the users this worker will churn.
    let (final_tx, mut final_gate) = gate();
    let (gate_tx, mut gate) = gate();
    let (done_tx, done_rx) = watch::channel(false);
    let mut observer_tasks = Vec::new();
    let block = args.users_per_observer as usize;
    let mut block_start = 0usize;
    while block_start < n {
        let block_end = (block_start + block).min(n);
        for j in 0..args.watchers as usize {
            let first = range.start as usize + block_start;
            let obs = Observer {
                index: first + j + 1,
                user: format!("{}-o{first}-{j}", shared.prefix),
                block: block_start..block_end,
                shared: shared.clone(),
                track: track.clone(),
            };
            observer_tasks.push(tokio::spawn(obs.run(
                gate_tx.clone(),
                final_tx.clone(),
                done_rx.clone(),
                ctx.phase.clone(),
            )));
            // Observers connect at up to 1,000/s.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        block_start = block_end;
    }
    drop(gate_tx);
    drop(final_tx);
    let connect = Duration::from_millis(args.common.connect_timeout_ms);
    gate.wait(observer_tasks.len(), connect + SUBSCRIBE_WAIT)
        .await;
    ctx.ready(None);
    if !ctx.wait_go(Duration::from_secs(120)).await {
        let _ = done_tx.send(true);
        return finish(ctx, observer_tasks).await;
    }

    // Run: clients arrive at this worker's share of the rate, live, and leave.
    let rate = share(args.clients_per_sec, n as u64, total);
    let lifetime = Duration::from_millis(args.lifetime_ms);
    let go = Instant::now();
    let mut clients = Vec::with_capacity(n);
    for k in 0..n {
        pace(go, k as u64, rate).await;
        if ctx.phase_now() == Phase::Stop {
            break;
        }
        let i = range.start as usize + k;
        clients.push(tokio::spawn(client(
            i,
            k,
            format!("{}-c{i}", shared.prefix),
            lifetime,
            shared.clone(),
            track.clone(),
        )));
    }
    {
        let mut rec = shared.rec.lock();
        rec.min(
            "first_start_us",
            epoch_us().saturating_sub(go.elapsed().as_micros() as u64),
        );
        rec.max("last_start_us", epoch_us());
    }
    let bound = connect + lifetime + CLOSE_WAIT * 2;
    if tokio::time::timeout(bound, futures_util::future::join_all(clients))
        .await
        .is_err()
    {
        shared.rec.add("client_timeouts", 1);
    }
    ctx.sleep_unless_stopped(Duration::from_millis(args.drain_ms))
        .await;
    let _ = done_tx.send(true);
    final_gate
        .wait(observer_tasks.len(), Duration::from_secs(10))
        .await;
    ctx.run_done();
    ctx.wait_stop(Duration::from_secs(120)).await;
    finish(ctx, observer_tasks).await
}

async fn finish(
    mut ctx: WorkerCtx,
    observers: Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<Stats> {
    ctx.wait_stop(Duration::from_secs(120)).await;
    let _ = tokio::time::timeout(CLOSE_WAIT * 3, futures_util::future::join_all(observers)).await;
    Ok(ctx.shared.rec.take())
}

/// One churning client: connect, live `lifetime` after the welcome, close.
async fn client(
    index: usize,
    k: usize,
    user: String,
    lifetime: Duration,
    shared: Arc<Shared>,
    track: Arc<Track>,
) {
    Track::mark(track.start.get(k), track.now());
    shared.counters.sent.fetch_add(1, Ordering::Relaxed);
    let Some(connected) = shared
        .connect_counted(index, &user, "client_failed", None)
        .await
    else {
        return;
    };
    Track::mark(track.welcome.get(k), track.now());
    shared.counters.opened();
    {
        let mut rec = shared.rec.lock();
        rec.add("client_connected", 1);
        rec.record("connect", connected.latency.as_micros() as u64);
    }
    let mut conn = connected.conn;
    let until = Instant::now() + lifetime;
    let dropped = loop {
        tokio::select! {
            incoming = conn.recv() => match incoming {
                Incoming::Frame(_) => {}
                Incoming::Undecodable(e) => count_undecodable(&mut shared.rec.lock(), &e),
                Incoming::Closed(_) | Incoming::Failed(_) => break true,
            },
            _ = tokio::time::sleep_until(until) => break false,
        }
    };
    Track::mark(track.close.get(k), track.now());
    if dropped {
        shared.rec.add("client_dropped", 1);
    } else {
        conn.close(CLOSE_WAIT).await;
    }
    shared.counters.closed();
}

/// An observer connection subscribed to one block of churning users.
struct Observer {
    index: usize,
    user: String,
    /// Positions in the worker's `Track`.
    block: std::ops::Range<usize>,
    shared: Arc<Shared>,
    track: Arc<Track>,
}

impl Observer {
    async fn run(
        self,
        gate: UnboundedSender<bool>,
        finalized: UnboundedSender<bool>,
        mut done: watch::Receiver<bool>,
        mut phase: watch::Receiver<Phase>,
    ) {
        let shared = self.shared.clone();
        let mut conn = match self.subscribe().await {
            Ok(conn) => conn,
            Err(kind) => {
                shared.counters.failed.fetch_add(1, Ordering::Relaxed);
                shared.rec.add(&format!("observer_failed.{kind}"), 1);
                let _ = gate.send(false);
                let _ = finalized.send(false);
                return;
            }
        };
        shared.rec.add("observers_subscribed", 1);
        let _ = gate.send(true);
        let mut seen = vec![0u8; self.block.len()];
        let mut local = Stats::default();
        let mut alive = true;
        while alive {
            tokio::select! {
                incoming = conn.recv() => match incoming {
                    Incoming::Frame(frame) => self.on_frame(frame, &mut seen, &mut local),
                    Incoming::Undecodable(e) => count_undecodable(&mut local, &e),
                    Incoming::Closed(_) | Incoming::Failed(_) => {
                        local.add("observer_dropped", 1);
                        alive = false;
                    }
                },
                _ = wait_flag(&mut done, |d| *d) => break,
            }
        }
        self.count_missing(&seen, &mut local);
        shared.rec.lock().merge(local);
        let _ = finalized.send(true);
        if alive {
            wait_phase(&mut phase, Phase::Stop, Duration::from_secs(300)).await;
            conn.close(CLOSE_WAIT).await;
        }
        shared.counters.closed();
    }

    /// Connects and subscribes; the failure kind on error.
    async fn subscribe(&self) -> Result<Conn, String> {
        let connected = self
            .shared
            .env
            .connect(self.index, &self.user)
            .await
            .map_err(|e| {
                self.shared
                    .rec
                    .lock()
                    .sample("observer_connect", &e.to_string());
                e.kind
            })?;
        self.shared.counters.opened();
        let mut conn = connected.conn;
        let users = self
            .block
            .clone()
            .map(|k| format!("{}-c{}", self.shared.prefix, self.track.base as usize + k))
            .collect();
        let frame = ClientFrame::Subscribe { id: Some(1), users };
        let answer = async {
            conn.send(&frame).await.map_err(|_| "send".to_string())?;
            loop {
                match conn.recv().await {
                    Incoming::Frame(f) => match f {
                        ServerFrame::PresenceList { id: Some(1), .. } => return Ok(()),
                        ServerFrame::Error { code, message, .. } => {
                            self.shared
                                .rec
                                .lock()
                                .sample("observer_subscribe", &message);
                            return Err(code.as_str().to_string());
                        }
                        _ => {}
                    },
                    Incoming::Undecodable(_) => {}
                    Incoming::Closed(_) | Incoming::Failed(_) => return Err("closed".into()),
                }
            }
        };
        match tokio::time::timeout(SUBSCRIBE_WAIT, answer).await {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(kind)) => {
                self.shared.counters.closed();
                Err(kind)
            }
            Err(_) => {
                self.shared.counters.closed();
                Err("subscribe_timeout".into())
            }
        }
    }

    fn on_frame(&self, frame: ServerFrame, seen: &mut [u8], local: &mut Stats) {
        let presence = match frame {
            ServerFrame::Presence(p) => p,
            ServerFrame::Error { message, .. } => {
                local.add("observer_errors", 1);
                local.sample("observer_error", &message);
                return;
            }
            _ => return,
        };
        let now = self.track.now();
        self.shared
            .counters
            .received
            .fetch_add(1, Ordering::Relaxed);
        let k = presence
            .user
            .strip_prefix(&self.shared.prefix)
            .and_then(|r| r.strip_prefix("-c"))
            .and_then(|r| r.parse::<u64>().ok())
            .and_then(|i| i.checked_sub(self.track.base))
            .map(|k| k as usize);
        let Some(k) = k.filter(|k| self.block.contains(k)) else {
            local.add("unexpected_events", 1);
            return;
        };
        let Some(flags) = seen.get_mut(k - self.block.start) else {
            return;
        };
        if presence.status == Status::Offline {
            local.add("offline_events", 1);
            if *flags & OFFLINE != 0 {
                local.add("duplicate_offline", 1);
                return;
            }
            *flags |= OFFLINE;
            match Track::get(&self.track.close, k) {
                0 => local.add("offline_before_close", 1),
                closed => local.record("offline", now.saturating_sub(closed)),
            }
        } else {
            local.add("online_events", 1);
            if *flags & ONLINE != 0 {
                local.add("duplicate_online", 1);
                return;
            }
            *flags |= ONLINE;
            match Track::get(&self.track.start, k) {
                0 => local.add("online_before_start", 1),
                started => local.record("online_from_connect", now.saturating_sub(started)),
            }
            let welcomed = Track::get(&self.track.welcome, k);
            if welcomed > 0 {
                local.record("online_from_welcome", now.saturating_sub(welcomed));
            }
        }
    }

    /// Users of the block that connected (or left) without this observer hearing of it.
    fn count_missing(&self, seen: &[u8], local: &mut Stats) {
        for (offset, flags) in seen.iter().enumerate() {
            let k = self.block.start + offset;
            if Track::get(&self.track.welcome, k) == 0 {
                continue;
            }
            local.add("expected_online", 1);
            if flags & ONLINE == 0 {
                local.add("missing_online", 1);
            }
            if Track::get(&self.track.close, k) != 0 {
                local.add("expected_offline", 1);
                if flags & OFFLINE == 0 {
                    local.add("missing_offline", 1);
                }
            }
        }
    }
}

figures! {
    /// What `churn` measured.
    pub struct ChurnFigures {
        "clients" {
            clients_planned: u64,
            clients_connected: u64,
            clients_failed: u64,
            failure_kinds: BTreeMap<String, u64>,
            clients_dropped: u64,
            target_rate: u64,
            achieved_rate: f64,
            connect_latency_ms: LatencySummary,
        }
        "observers" {
            observers_planned: u64,
            observers_subscribed: u64,
            observer_failure_kinds: BTreeMap<String, u64>,
            observers_dropped: u64,
        }
        "presence propagation" {
            online_latency_from_connect_ms: LatencySummary,
            online_latency_from_welcome_ms: LatencySummary,
            offline_latency_from_close_ms: LatencySummary,
            expected_online: u64,
            missing_online: u64,
            duplicate_online: u64,
            expected_offline: u64,
            missing_offline: u64,
            duplicate_offline: u64,
            /// Events about a user the observer did not subscribe to.
            unexpected_events: u64,
            online_before_start: u64,
            offline_before_close: u64,
            decode_errors: u64,
        }
    }
}

pub fn summarize(args: &ChurnArgs, o: &Outcome<'_>) -> Summary {
    let s = o.stats;
    let connected = s.get("client_connected");
    let failed = s.get("client_failed");
    let arrival_secs = match (s.mins.get("first_start_us"), s.maxs.get("last_start_us")) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e6,
        _ => 0.0,
    };
    let started = connected + failed;
    let figures = ChurnFigures {
        clients_planned: clients(args),
        clients_connected: connected,
        clients_failed: failed,
        failure_kinds: s.with_prefix("connect_error."),
        clients_dropped: s.get("client_dropped"),
        target_rate: args.clients_per_sec,
        achieved_rate: round(per_sec(started.saturating_sub(1), arrival_secs), 2),
        connect_latency_ms: s.hist("connect").summary(),
        observers_planned: observers(args),
        observers_subscribed: s.get("observers_subscribed"),
        observer_failure_kinds: s.with_prefix("observer_failed."),
        observers_dropped: s.get("observer_dropped"),
        online_latency_from_connect_ms: s.hist("online_from_connect").summary(),
        online_latency_from_welcome_ms: s.hist("online_from_welcome").summary(),
        offline_latency_from_close_ms: s.hist("offline").summary(),
        expected_online: s.get("expected_online"),
        missing_online: s.get("missing_online"),
        duplicate_online: s.get("duplicate_online"),
        expected_offline: s.get("expected_offline"),
        missing_offline: s.get("missing_offline"),
        duplicate_offline: s.get("duplicate_offline"),
        unexpected_events: s.get("unexpected_events"),
        online_before_start: s.get("online_before_start"),
        offline_before_close: s.get("offline_before_close"),
        decode_errors: s.get("decode_errors"),
    };
    let mut summary = Summary::new(&figures);
    if connected == 0 {
        summary.problems.push("no churn client connected".into());
    }
    if figures.observers_subscribed == 0 {
        summary.problems.push("no observer subscribed".into());
    }
    summary
}
