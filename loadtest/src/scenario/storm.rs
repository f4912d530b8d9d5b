//! `storm`: many connected users change status (away, busy, online, ...) at a target total rate;
//! reports the presence changes each node flushed per second and backend round trips per change,
//! from `/metrics` read before and after.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use shared::{ClientFrame, ServerFrame, Status};
use tokio::{
    sync::{mpsc::UnboundedSender, watch},
    time::Instant,
};

use super::{
    Outcome,
    messaging::count_error,
    support::{
        CLOSE_WAIT, Shared, WorkerCtx, connect_member, count_undecodable, gate, join_connections,
        pace, per_sec, setup_and_run, share, slice, wait_phase,
    },
};
use crate::{
    cli::StormArgs,
    client::Incoming,
    fleet::Phase,
    probe::{ROUND_TRIPS, Snapshot, WRITES},
    report::{Cell, LatencySummary, Section, Stats, Summary, figures, round},
};

/// Time after the last change for its `ok` to arrive.
const REPLY_WAIT: Duration = Duration::from_secs(2);
const CYCLE: [Status; 3] = [Status::Away, Status::Busy, Status::Online];
const SAMPLE_BATCH: usize = 256;
const MAX_PENDING: usize = 1000;

pub fn validate(a: &StormArgs) -> anyhow::Result<Vec<String>> {
    let per_user = a.rate as f64 / a.users as f64;
    let mut warnings = Vec::new();
    if per_user > 200.0 {
        warnings.push(format!(
            "each user changes status {per_user:.0} times/s, above the gateway's default \
             per-connection limit of 200 frames/s: raise --users"
        ));
    }
    Ok(warnings)
}

pub async fn worker(args: &StormArgs, mut ctx: WorkerCtx) -> anyhow::Result<Stats> {
    let range = slice(args.users, ctx.worker, ctx.workers, 1);
    let n = range.end - range.start;
    let connect_rate = share(args.connect_rate, n, args.users);
    let every = Duration::from_secs_f64(args.users as f64 / args.rate as f64);
    let duration = Duration::from_secs(args.duration);
    let shared = ctx.shared.clone();
    let (gate_tx, mut gate) = gate();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for (k, i) in range.enumerate() {
        pace(start, k as u64, connect_rate).await;
        if ctx.phase_now() == Phase::Stop {
            break;
        }
        let plan = Plan {
            index: i as usize,
            user: format!("{}-s{i}", shared.prefix),
            every,
            first: every.mul_f64(i as f64 / args.users as f64),
            duration,
        };
        tasks.push(tokio::spawn(user(
            plan,
            shared.clone(),
            gate_tx.clone(),
            ctx.phase.clone(),
        )));
    }
    drop(gate_tx);
    let flush_wait = Duration::from_millis(args.flush_wait_ms);
    let run = duration + REPLY_WAIT;
    setup_and_run(&mut ctx, &mut gate, tasks.len(), flush_wait, run).await;
    ctx.wait_stop(Duration::from_secs(120) + flush_wait).await;
    join_connections(&shared, tasks).await;
    Ok(shared.rec.take())
}

struct Plan {
    index: usize,
    user: String,
    every: Duration,
    first: Duration,
    duration: Duration,
}

async fn user(
    plan: Plan,
    shared: Arc<Shared>,
    gate: UnboundedSender<bool>,
    phase: watch::Receiver<Phase>,
) {
    let Some(connected) = connect_member(&shared, plan.index, &plan.user, &gate).await else {
        return;
    };
    let _ = gate.send(true);
    let mut conn = connected.conn;
    let mut local = Stats::default();
    let mut samples: Vec<u64> = Vec::new();
    let mut pending: FxHashMap<u64, Instant> = FxHashMap::default();
    let mut running = false;
    let mut next: Option<Instant> = None;
    let mut end = Instant::now();
    let mut seq: u64 = 0;
    let mut alive = true;
    // The phase wait and the send timer are made once and replaced or reset when they change,
    // not remade on every turn of the loop (one per `ok`), which would register and drop two
    // timers and a watch waiter per reply.
    let wait_for = |target: Phase| {
        let mut rx = phase.clone();
        async move { wait_phase(&mut rx, target, Duration::from_secs(86_400)).await }
    };
    let waiting = wait_for(Phase::Go);
    let send_timer = tokio::time::sleep_until(end);
    tokio::pin!(waiting, send_timer);
    loop {
        let due = next.filter(|t| *t < end);
        tokio::select! {
            incoming = conn.recv() => match incoming {
                Incoming::Frame(frame) => match frame {
                    ServerFrame::Ok { id: Some(id), .. } => {
                        if let Some(sent) = pending.remove(&id) {
                            local.add("ok", 1);
                            shared.counters.received.fetch_add(1, Ordering::Relaxed);
                            samples.push(sent.elapsed().as_micros() as u64);
                            if samples.len() >= SAMPLE_BATCH {
                                flush(&shared, &mut samples);
                            }
                        }
                    }
                    ServerFrame::Error {
                        id, code, message, ..
                    } => {
                        count_error(&mut local, code, &message);
                        shared.counters.errors.fetch_add(1, Ordering::Relaxed);
                        if let Some(id) = id {
                            pending.remove(&id);
                        }
                    }
                    _ => {}
                },
                Incoming::Undecodable(e) => count_undecodable(&mut local, &e),
                Incoming::Closed(_) | Incoming::Failed(_) => {
                    local.add("dropped", 1);
                    alive = false;
                    break;
                }
            },
            _ = &mut send_timer, if due.is_some() => {
                if let Some(at) = due {
                    seq += 1;
                    let status = CYCLE[(seq as usize - 1) % CYCLE.len()];
                    let frame = ClientFrame::SetStatus { id: Some(seq), status, text: None };
                    if pending.len() < MAX_PENDING {
                        pending.insert(seq, Instant::now());
                    }
                    if conn.send(&frame).await.is_err() {
                        local.add("send_failed", 1);
                        alive = false;
                        break;
                    }
                    local.add("sent", 1);
                    shared.counters.sent.fetch_add(1, Ordering::Relaxed);
                    let at = at + plan.every;
                    next = Some(at);
                    send_timer.as_mut().reset(at);
                }
            }
            p = &mut waiting => {
                match p {
                    Phase::Stop => break,
                    Phase::Go if !running => {
                        running = true;
                        let go = Instant::now();
                        end = go + plan.duration;
                        let first = go + plan.first;
                        next = Some(first);
                        send_timer.as_mut().reset(first);
                    }
                    _ => {}
                }
                // A finished wait must not be polled again.
                waiting.set(wait_for(if running { Phase::Stop } else { Phase::Go }));
            }
        }
    }
    flush(&shared, &mut samples);
    shared.rec.lock().merge(local);
    if alive {
        conn.close(CLOSE_WAIT).await;
    }
    shared.counters.closed();
}

fn flush(shared: &Shared, samples: &mut Vec<u64>) {
    if samples.is_empty() {
        return;
    }
    let mut rec = shared.rec.lock();
    for v in samples.drain(..) {
        rec.record("set_status", v);
    }
}

fn delta(a: &Snapshot, b: &Snapshot, metric: &str) -> Option<f64> {
    Some(b.total(metric)? - a.total(metric).unwrap_or(0.0))
}

figures! {
    /// What `storm` measured.
    pub struct StormFigures {
        "connections" {
            users: u64,
            connected: u64,
            connect_failed: u64,
            failure_kinds: BTreeMap<String, u64>,
            dropped: u64,
        }
        "status changes sent" {
            changes_sent: u64,
            changes_ok: u64,
            errors: BTreeMap<String, u64>,
            target_rate: u64,
            achieved_rate: f64,
            set_status_latency_ms: LatencySummary,
            decode_errors: u64,
        }
        "gateway (/metrics, summed over nodes)" {
            /// `presence_writes_total` flushed during the storm.
            presence_writes: Option<f64>,
            flushed_per_sec: Option<f64>,
            /// The highest rate of the 1 s samples.
            peak_flushed_per_sec: Option<f64>,
            writes_per_change_sent: Option<f64>,
            /// `presence_backend_round_trips_total` during the storm.
            backend_round_trips: Option<f64>,
            round_trips_per_change: Option<f64>,
            flush_series: FlushSeries,
        }
        "nodes (/metrics)" {
            nodes: Vec<StormNode>,
        }
    }
}

figures! {
    /// What one node's counters grew by during the storm.
    pub struct StormNode {
        endpoint: String,
        presence_writes: Option<f64>,
        backend_round_trips: Option<f64>,
        error: Option<String>,
    }
}

/// The flush rate between `/metrics` samples (every second of the storm).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlushPoint {
    pub at_ms: u64,
    pub writes_per_sec: f64,
}

/// The flush rate over time: in the report, and counted in the table (one row for all).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FlushSeries(pub Vec<FlushPoint>);

impl Cell for FlushSeries {
    fn rows(&self, name: &str, section: &mut Section) {
        section.value(name, format!("{} samples (in the report)", self.0.len()));
    }
}

pub fn summarize(args: &StormArgs, o: &Outcome<'_>) -> Summary {
    let s = o.stats;
    let connected = s.get("connected");
    let sent = s.get("sent");
    let writes = delta(o.after_setup, o.after_run, WRITES);
    let trips = delta(o.after_setup, o.after_run, ROUND_TRIPS);
    let secs = args.duration as f64;
    let mut peak: Option<f64> = None;
    let mut series = Vec::new();
    let mut points: Vec<&Snapshot> = vec![o.after_setup];
    points.extend(o.during.iter());
    points.push(o.after_run);
    for pair in points.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let dt = (b.at_ms.saturating_sub(a.at_ms)) as f64 / 1000.0;
        if let (Some(w), true) = (delta(a, b, WRITES), dt > 0.2) {
            let rate = w / dt;
            peak = Some(peak.map_or(rate, |p: f64| p.max(rate)));
            series.push(FlushPoint {
                at_ms: b.at_ms,
                writes_per_sec: round(rate, 1),
            });
        }
    }
    let per_change = match (trips, writes) {
        (Some(t), Some(w)) if w > 0.0 => Some(t / w),
        _ => None,
    };
    let nodes = o
        .after_run
        .nodes
        .iter()
        .enumerate()
        .map(|(e, n)| {
            let before = o.after_setup.nodes.get(e);
            let d = |m: &str| {
                let b = before
                    .and_then(|b| b.metrics.get(m))
                    .copied()
                    .unwrap_or(0.0);
                n.metrics.get(m).map(|a| a - b)
            };
            StormNode {
                endpoint: n.endpoint.clone(),
                presence_writes: d(WRITES),
                backend_round_trips: d(ROUND_TRIPS),
                error: n.error.clone(),
            }
        })
        .collect();
    let figures = StormFigures {
        users: args.users,
        connected,
        connect_failed: s.get("connect_failed"),
        failure_kinds: s.with_prefix("connect_error."),
        dropped: s.get("dropped"),
        changes_sent: sent,
        changes_ok: s.get("ok"),
        errors: s.with_prefix("error."),
        target_rate: args.rate,
        achieved_rate: round(per_sec(sent, secs), 1),
        set_status_latency_ms: s.hist("set_status").summary(),
        decode_errors: s.get("decode_errors"),
        presence_writes: writes,
        flushed_per_sec: writes.map(|w| round(w / secs, 1)),
        peak_flushed_per_sec: peak.map(|v| round(v, 1)),
        writes_per_change_sent: writes
            .filter(|_| sent > 0)
            .map(|w| round(w / sent as f64, 4)),
        backend_round_trips: trips,
        round_trips_per_change: per_change.map(|v| round(v, 5)),
        flush_series: FlushSeries(series),
        nodes,
    };

    let mut summary = Summary::new(&figures);
    for node in &o.after_run.nodes {
        if let Some(err) = &node.error {
            summary
                .warnings
                .push(format!("{}: cannot read /metrics: {err}", node.endpoint));
        }
    }
    if writes.is_none() {
        summary
            .warnings
            .push("no node exports presence_writes_total: flush rate unknown".into());
    }
    if trips.is_none() {
        summary.warnings.push(
            "presence_backend_round_trips_total is absent (embedded backend?): round trips n/a"
                .into(),
        );
    }
    if connected == 0 {
        summary.problems.push("no connection succeeded".into());
    }
    summary
}
