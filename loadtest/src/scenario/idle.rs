//! `idle`: ramps to N connections at a target connect rate, holds them, and reports connect
//! latency, failures, the achieved rate, each node's connection count and memory per connection.

use std::{sync::Arc, time::Duration};

use serde_json::json;
use tokio::{sync::watch, time::Instant};

use super::{
    CLOSE_WAIT, Outcome, connect_member, count_undecodable, gate, join_connections, pace, per_sec,
    percent, setup_and_run, share, slice,
};
use crate::{
    cli::IdleArgs,
    client::Incoming,
    probe::{CONNECTIONS, Snapshot},
    report::{Section, Stats, Summary, round},
    workers::{Phase, Shared, WorkerCtx, epoch_us, wait_phase},
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

pub fn summarize(args: &IdleArgs, o: &Outcome<'_>) -> Summary {
    let s = o.stats;
    let connected = s.get("connected");
    let failed = s.get("connect_failed");
    let dropped = s.get("dropped");
    let ramp_secs = match (s.mins.get("ramp_start_us"), s.maxs.get("ramp_end_us")) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e6,
        _ => 0.0,
    };
    let achieved = per_sec(connected, ramp_secs);
    let latency = s.hist("connect").summary();
    let failures = s.with_prefix("connect_error.");

    let mut summary = Summary::default();
    let mut conns = Section::new("connections");
    conns
        .value("requested", args.connections)
        .value("connected", connected);
    for (node, n) in s.with_prefix("welcome_node.") {
        conns.value(format!("  welcomed by node {node}"), n);
    }
    conns.value(
        "failed",
        format!("{failed} ({:.2}%)", percent(failed, args.connections)),
    );
    for (kind, n) in &failures {
        conns.value(format!("  failed: {kind}"), n);
    }
    conns
        .value("closed by the server during the hold", dropped)
        .value("undecodable frames", s.get("decode_errors"))
        .value("processes", o.workers);
    summary.sections.push(conns);

    let mut rate = Section::new("connect");
    rate.latency("connect latency (to welcome)", latency)
        .value("target rate (connects/s)", args.rate)
        .value("achieved rate (connects/s)", format!("{achieved:.0}"))
        .value("ramp (s)", format!("{ramp_secs:.2}"));
    summary.sections.push(rate);

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
    let mut nodes_json = Vec::new();
    // Per node: what the ramp added to its gauge, when both readings exist.
    let mut ramp_added: Vec<Option<i64>> = Vec::new();
    let mut nodes = Section::new("nodes (presence_connections from /metrics)");
    for (e, node) in o.after_run.nodes.iter().enumerate() {
        let gauge = |snap: &Snapshot| -> Option<f64> {
            let n = snap.nodes.get(e)?;
            if n.error.is_some() {
                return None;
            }
            Some(n.metrics.get(CONNECTIONS).copied().unwrap_or(0.0))
        };
        let before = gauge(o.before);
        let ramped = gauge(o.after_setup);
        let held = gauge(o.after_run);
        ramp_added.push(ramped.zip(before).map(|(a, b)| (a - b) as i64));
        let mine = ours.get(e).copied().unwrap_or(0);
        let delta = match (before, held) {
            (Some(b), Some(h)) => Some(h - b),
            _ => None,
        };
        let confirmed = delta.map(|d| (d - mine as f64).abs() < 0.5);
        let shown = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0}"));
        nodes.value(
            node.endpoint.clone(),
            format!(
                "ours {mine} | gauge before {} after ramp {} end of hold {} | {}",
                shown(before),
                shown(ramped),
                shown(held),
                match confirmed {
                    Some(true) => "counts match",
                    Some(false) => "COUNTS DIFFER",
                    None => "unreadable",
                }
            ),
        );
        if let Some(err) = &node.error {
            summary
                .warnings
                .push(format!("{}: cannot read /metrics: {err}", node.endpoint));
        }
        nodes_json.push(json!({
            "endpoint": node.endpoint,
            "our_connections": mine,
            "gauge_before": before,
            "gauge_after_ramp": ramped,
            "gauge_end_of_hold": held,
            "counts_match": confirmed,
        }));
    }
    summary.sections.push(nodes);

    let mut memory_json = Vec::new();
    let pids = o.probe.pids();
    if !pids.is_empty() {
        let mut mem = Section::new("gateway memory (VmRSS)");
        let total_ours: i64 = ours.iter().sum();
        for (k, &pid) in pids.iter().enumerate() {
            let conns = if pids.len() == endpoints {
                // The node's own count of what the ramp added, else ours.
                ramp_added
                    .get(k)
                    .copied()
                    .flatten()
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
                (Some(b), Some(a)) if conns > 0 => Some((a as f64 - b as f64) / conns as f64),
                _ => None,
            };
            let mib =
                |v: Option<u64>| v.map_or("n/a".into(), |v| format!("{:.1}", v as f64 / 1024.0));
            let kib = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2}"));
            mem.value(
                format!("pid {pid} RSS MiB"),
                format!(
                    "before {} | after ramp {} | end of hold {}",
                    mib(before),
                    mib(ramped),
                    mib(held)
                ),
            );
            mem.value(
                format!("pid {pid} KiB per connection ({conns} conns)"),
                format!(
                    "after ramp {} | end of hold {}",
                    kib(per_conn(ramped)),
                    kib(per_conn(held))
                ),
            );
            for snap in [o.before, o.after_setup, o.after_run] {
                if let Some(err) = snap.pids.get(k).and_then(|p| p.error.as_ref()) {
                    summary.warnings.push(format!("pid {pid}: {err}"));
                    break;
                }
            }
            memory_json.push(json!({
                "pid": pid,
                "connections": conns,
                "rss_kib_before": before,
                "rss_kib_after_ramp": ramped,
                "rss_kib_end_of_hold": held,
                "kib_per_connection_after_ramp": per_conn(ramped).map(|v| round(v, 3)),
                "kib_per_connection_end_of_hold": per_conn(held).map(|v| round(v, 3)),
            }));
        }
        summary.sections.push(mem);
    }

    if connected == 0 {
        summary.problems.push("no connection succeeded".to_string());
    }
    summary.figures = json!({
        "requested": args.connections,
        "connected": connected,
        "failed": failed,
        "failure_kinds": failures,
        "dropped_during_hold": dropped,
        "decode_errors": s.get("decode_errors"),
        "connect_latency_ms": latency,
        "target_rate": args.rate,
        "achieved_rate": round(achieved, 1),
        "ramp_secs": round(ramp_secs, 3),
        "hold_secs": args.hold,
        "nodes": nodes_json,
        "memory": memory_json,
    });
    summary
}
