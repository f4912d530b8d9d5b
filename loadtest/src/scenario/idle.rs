//! `idle`: ramps to N connections at a target connect rate, holds them, and reports connect
//! latency, failures, the achieved rate, each node's connection count and memory per connection.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::{sync::watch, time::Instant};

use super::{
    Outcome,
    support::{
        CLOSE_WAIT, Shared, WorkerCtx, connect_member, count_undecodable, epoch_us, gate,
        join_connections, pace, per_sec, setup_and_run, share, slice, wait_phase,
    },
};
use crate::{
    cli::IdleArgs,
    client::Incoming,
    fleet::Phase,
    probe::{CONNECTIONS, Snapshot},
    report::{LatencySummary, Stats, Summary, figures, round},
};

pub async fn worker(args: &IdleArgs, mut ctx: WorkerCtx) -> anyhow::Result<Stats> {
    let range = slice(args.connections, ctx.worker, ctx.workers, 1);
    let n = range.end - range.start;
    let rate = share(args.rate, n, args.connections);
    let shared = ctx.shared.clone();
    let (gate_tx, mut gate) = gate();
    let start = Instant::now();
    shared.rec.lock().min("ramp_start_us", epoch_us());
    let mut tasks = Vec::with_capacity(n as usize);
    for (k, i) in range.enumerate() {
        pace(start, k as u64, rate).await;
        if ctx.phase_now() == Phase::Stop {
            break;
        }
        let user = format!("{}-i{i}", shared.prefix);
        tasks.push(tokio::spawn(connection(
            i as usize,
            user,
            shared.clone(),
            gate_tx.clone(),
            ctx.phase.clone(),
        )));
    }
    drop(gate_tx);
    let settle = Duration::from_millis(args.settle_ms);
    let hold = Duration::from_secs(args.hold);
    setup_and_run(&mut ctx, &mut gate, tasks.len(), settle, hold).await;
    ctx.wait_stop(Duration::from_secs(120)).await;
    join_connections(&shared, tasks).await;
    Ok(shared.rec.take())
}

/// One idle client: connect, then read (answering pings) until told to stop.
async fn connection(
    index: usize,
    user: String,
    shared: Arc<Shared>,
    gate: tokio::sync::mpsc::UnboundedSender<bool>,
    mut phase: watch::Receiver<Phase>,
) {
    let Some(connected) = connect_member(&shared, index, &user, &gate).await else {
        return;
    };
    {
        let mut rec = shared.rec.lock();
        rec.vec_add("connected_by_url", connected.url_index, 1);
        rec.add(&format!("welcome_node.{}", connected.welcome.node), 1);
        rec.max("ramp_end_us", epoch_us());
    }
    let _ = gate.send(true);
    let url_index = connected.url_index;
    let mut conn = connected.conn;
    loop {
        tokio::select! {
            incoming = conn.recv() => match incoming {
                Incoming::Frame(_) => shared.rec.add("frames_in", 1),
                Incoming::Undecodable(e) => count_undecodable(&mut shared.rec.lock(), &e),
                Incoming::Closed(code) => {
                    let mut rec = shared.rec.lock();
                    rec.add("dropped", 1);
                    rec.add(&format!("dropped_close.{}", code.map_or("none".into(), |c| c.to_string())), 1);
                    rec.vec_add("dropped_by_url", url_index, 1);
                    drop(rec);
                    shared.counters.closed();
                    return;
                }
                Incoming::Failed(e) => {
                    let mut rec = shared.rec.lock();
                    rec.add("dropped", 1);
                    rec.add("dropped_close.io_error", 1);
                    rec.sample("dropped_io_error", &e);
                    rec.vec_add("dropped_by_url", url_index, 1);
                    drop(rec);
                    shared.counters.closed();
                    return;
                }
            },
            p = wait_phase(&mut phase, Phase::Stop, Duration::from_secs(86_400)) => {
                if p == Phase::Stop {
                    break;
                }
            }
        }
    }
    conn.close(CLOSE_WAIT).await;
    shared.counters.closed();
}

figures! {
    /// What `idle` measured.
    pub struct IdleFigures {
        "connections" {
            requested: u64,
            connected: u64,
            /// Connections by the node named in their `welcome`.
            welcome_nodes: BTreeMap<String, u64>,
            failed: u64,
            failure_kinds: BTreeMap<String, u64>,
            dropped_during_hold: u64,
            decode_errors: u64,
        }
        "connect" {
            connect_latency_ms: LatencySummary,
            target_rate: u64,
            achieved_rate: f64,
            ramp_secs: f64,
            hold_secs: u64,
        }
        "nodes (presence_connections from /metrics)" {
            nodes: Vec<IdleNode>,
        }
        "gateway memory (VmRSS)" {
            memory: Vec<IdleMemory>,
        }
    }
}

figures! {
    /// A node's connections: ours (by URL) and its own gauge before the ramp, after it and at
    /// the end of the hold.
    pub struct IdleNode {
        endpoint: String,
        our_connections: i64,
        gauge_before: Option<f64>,
        gauge_after_ramp: Option<f64>,
        gauge_end_of_hold: Option<f64>,
        /// Whether the gauge grew by our connections during the run.
        counts_match: Option<bool>,
    }
}

figures! {
    /// A gateway process's resident memory, and per connection.
    pub struct IdleMemory {
        pid: u32,
        connections: i64,
        rss_kib_before: Option<u64>,
        rss_kib_after_ramp: Option<u64>,
        rss_kib_end_of_hold: Option<u64>,
        kib_per_connection_after_ramp: Option<f64>,
        kib_per_connection_end_of_hold: Option<f64>,
    }
}

pub fn summarize(args: &IdleArgs, o: &Outcome<'_>) -> Summary {
    let s = o.stats;
    let mut warnings = Vec::new();
    let ramp_secs = match (s.mins.get("ramp_start_us"), s.maxs.get("ramp_end_us")) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e6,
        _ => 0.0,
    };
    let connected = s.get("connected");

    // Connections per node: ours (by URL) and the node's own gauge.
    let endpoints = o.probe.endpoint_count();
    let mut ours = vec![0i64; endpoints];
    let by_url = s.vector("connected_by_url");
    let dropped_by_url = s.vector("dropped_by_url");
    for url in 0..o.env.targets.len() {
        let e = o.probe.endpoint_of_url(url);
        let n = by_url.get(url).copied().unwrap_or(0) as i64
            - dropped_by_url.get(url).copied().unwrap_or(0) as i64;
        if let Some(slot) = ours.get_mut(e) {
            *slot += n;
        }
    }
    let mut nodes = Vec::new();
    for (e, node) in o.after_run.nodes.iter().enumerate() {
        let gauge = |snap: &Snapshot| -> Option<f64> {
            let n = snap.nodes.get(e)?;
            if n.error.is_some() {
                return None;
            }
            Some(n.metrics.get(CONNECTIONS).copied().unwrap_or(0.0))
        };
        let (before, held) = (gauge(o.before), gauge(o.after_run));
        let mine = ours.get(e).copied().unwrap_or(0);
        if let Some(err) = &node.error {
            warnings.push(format!("{}: cannot read /metrics: {err}", node.endpoint));
        }
        nodes.push(IdleNode {
            endpoint: node.endpoint.clone(),
            our_connections: mine,
            gauge_before: before,
            gauge_after_ramp: gauge(o.after_setup),
            gauge_end_of_hold: held,
            counts_match: before
                .zip(held)
                .map(|(b, h)| (h - b - mine as f64).abs() < 0.5),
        });
    }

    let mut memory = Vec::new();
    let pids = o.probe.pids();
    let total_ours: i64 = ours.iter().sum();
    for (k, &pid) in pids.iter().enumerate() {
        let conns = if pids.len() == endpoints {
            // The node's own count of what the ramp added, else ours.
            nodes
                .get(k)
                .and_then(|n| n.gauge_after_ramp.zip(n.gauge_before))
                .map(|(a, b)| (a - b) as i64)
                .filter(|g| *g > 0)
                .unwrap_or(ours.get(k).copied().unwrap_or(0))
        } else if pids.len() == 1 {
            total_ours
        } else {
            total_ours / pids.len() as i64
        };
        let rss = |snap: &Snapshot| snap.pids.get(k).and_then(|p| p.rss_kib);
        let (before, ramped, held) = (rss(o.before), rss(o.after_setup), rss(o.after_run));
        let per_conn = |after: Option<u64>| match (before, after) {
            (Some(b), Some(a)) if conns > 0 => Some(round((a as f64 - b as f64) / conns as f64, 3)),
            _ => None,
        };
        for snap in [o.before, o.after_setup, o.after_run] {
            if let Some(err) = snap.pids.get(k).and_then(|p| p.error.as_ref()) {
                warnings.push(format!("pid {pid}: {err}"));
                break;
            }
        }
        memory.push(IdleMemory {
            pid,
            connections: conns,
            rss_kib_before: before,
            rss_kib_after_ramp: ramped,
            rss_kib_end_of_hold: held,
            kib_per_connection_after_ramp: per_conn(ramped),
            kib_per_connection_end_of_hold: per_conn(held),
        });
    }

    let figures = IdleFigures {
        requested: args.connections,
        connected,
        welcome_nodes: s.with_prefix("welcome_node."),
        failed: s.get("connect_failed"),
        failure_kinds: s.with_prefix("connect_error."),
        dropped_during_hold: s.get("dropped"),
        decode_errors: s.get("decode_errors"),
        connect_latency_ms: s.hist("connect").summary(),
        target_rate: args.rate,
        achieved_rate: round(per_sec(connected, ramp_secs), 1),
        ramp_secs: round(ramp_secs, 3),
        hold_secs: args.hold,
        nodes,
        memory,
    };
    let mut summary = Summary::new(&figures);
    summary.warnings = warnings;
    if connected == 0 {
        summary.problems.push("no connection succeeded".to_string());
    }
    summary
}
