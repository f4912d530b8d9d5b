//! `storm`: many connected users change status (away, busy, online, ...) at a target total rate;
//! reports the presence changes each node flushed per second and backend round trips per change,
//! from `/metrics` read before and after.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use rustc_hash::FxHashMap;
use serde_json::json;
use shared::{ClientFrame, ServerFrame, Status};
use tokio::{
    sync::{mpsc::UnboundedSender, watch},
    time::Instant,
};

use super::{
    CLOSE_WAIT, Outcome, connect_member, count_undecodable, gate, join_connections,
    messaging::count_error, pace, per_sec, percent, setup_and_run, share, slice,
};
use crate::{
    cli::StormArgs,
    client::Incoming,
    probe::{ROUND_TRIPS, Snapshot, WRITES},
    report::{Section, Stats, Summary, round},
    workers::{Phase, Shared, WorkerCtx, wait_phase},
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
                    ServerFrame::Ok { id: Some(id) } => {
                        if let Some(sent) = pending.remove(&id) {
                            local.add("ok", 1);
                            shared.counters.received.fetch_add(1, Ordering::Relaxed);
                            samples.push(sent.elapsed().as_micros() as u64);
                            if samples.len() >= SAMPLE_BATCH {
                                flush(&shared, &mut samples);
                            }
                        }
                    }
                    ServerFrame::Error { id, code, message } => {
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

pub fn summarize(args: &StormArgs, o: &Outcome<'_>) -> Summary {
    let s = o.stats;
    let connected = s.get("connected");
    let failed = s.get("connect_failed");
    let sent = s.get("sent");
    let ok = s.get("ok");
    let errors = s.with_prefix("error.");
    let failures = s.with_prefix("connect_error.");
    let latency = s.hist("set_status").summary();
    let writes = delta(o.after_setup, o.after_run, WRITES);
    let trips = delta(o.after_setup, o.after_run, ROUND_TRIPS);
    let secs = args.duration as f64;
    let flushed_per_sec = writes.map(|w| w / secs);
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
            series.push(json!({"at_ms": b.at_ms, "writes_per_sec": round(rate, 1)}));
        }
    }
    let per_change = match (trips, writes) {
        (Some(t), Some(w)) if w > 0.0 => Some(t / w),
        _ => None,
    };

    let mut summary = Summary::default();
    let mut c = Section::new("connections");
    c.value("planned", args.users)
        .value("connected", connected)
        .value(
            "failed",
            format!("{failed} ({:.2}%)", percent(failed, args.users)),
        );
    for (kind, n) in &failures {
        c.value(format!("  failed: {kind}"), n);
    }
    c.value("closed by the server", s.get("dropped"))
        .value("processes", o.workers);
    summary.sections.push(c);

    let mut st = Section::new("status changes sent");
    st.value("sent", sent)
        .value("ok", ok)
        .value("target rate (changes/s)", args.rate)
        .value(
            "achieved rate (changes/s)",
            format!("{:.0}", per_sec(sent, secs)),
        );
    for (code, n) in &errors {
        st.value(format!("  error: {code}"), n);
    }
    st.latency("set_status → ok latency", latency)
        .value("undecodable frames", s.get("decode_errors"));
    summary.sections.push(st);

    let shown = |v: Option<f64>, d: usize| v.map_or("n/a".to_string(), |v| format!("{v:.d$}"));
    let mut g = Section::new("gateway (/metrics, summed over nodes)");
    g.value(
        "presence writes flushed (presence_writes_total Δ)",
        shown(writes, 0),
    )
    .value("flushed per second of storm", shown(flushed_per_sec, 0))
    .value("peak flushed per second (1 s samples)", shown(peak, 0))
    .value(
        "writes per status change sent",
        shown(writes.filter(|_| sent > 0).map(|w| w / sent as f64), 3),
    )
    .value("backend round trips (Δ)", shown(trips, 0))
    .value("round trips per change", shown(per_change, 4));
    summary.sections.push(g);
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
    let nodes: Vec<_> = o
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
            json!({
                "endpoint": n.endpoint,
                "presence_writes": d(WRITES),
                "backend_round_trips": d(ROUND_TRIPS),
                "error": n.error,
            })
        })
        .collect();
    summary.figures = json!({
        "users": args.users,
        "connected": connected,
        "connect_failed": failed,
        "failure_kinds": failures,
        "dropped": s.get("dropped"),
        "changes_sent": sent,
        "changes_ok": ok,
        "errors": errors,
        "target_rate": args.rate,
        "achieved_rate": round(per_sec(sent, secs), 1),
        "set_status_latency_ms": latency,
        "presence_writes": writes,
        "flushed_per_sec": flushed_per_sec.map(|v| round(v, 1)),
        "peak_flushed_per_sec": peak.map(|v| round(v, 1)),
        "writes_per_change_sent": writes.filter(|_| sent > 0).map(|w| round(w / sent as f64, 4)),
        "backend_round_trips": trips,
        "round_trips_per_change": per_change.map(|v| round(v, 5)),
        "flush_series": series,
        "nodes": nodes,
        "decode_errors": s.get("decode_errors"),
    });
    summary
}
