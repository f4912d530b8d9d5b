//! Scale: many online users in a real redis-server, put there as 10 gateway nodes would, through
//! the gateway's own Redis backend (`RedisBackend`: its scripts and keys, nothing written by
//! hand); then renewal rounds, churn, reaping a dead node in small steps, `GET /v1/stats` and a
//! full `GET /v1/online` walk on a real node, and what Redis's SLOWLOG and LATENCY saw. Counts
//! and the walk must be exact. `scale_100k` runs in `make test`; `make scale` runs `scale_1m` on
//! a release build (SCALE_USERS, SCALE_CHURN_PER_SEC, SCALE_CHURN_SECS, SCALE_FILL_PER_SEC and
//! SCALE_RENEW_PER_SEC change it). The figures it prints are the sizing section of
//! docs/benchmarks.md. Every SLOWLOG entry is printed with the phase it fell in and what the
//! machine did while it ran (machine.rs); one is the machine's when a stall of Redis's own core
//! explains it (its duration less the stall within the limit), and only the others fail the run
//! (SCALE_SLOWLOG=strict: all of them). `cluster_masters_share_the_churn` checks that a 3-master
//! Redis Cluster spreads presence commands evenly; `scale_cluster` (`make scale SCALE_CLUSTER=1`)
//! runs the whole scale run on one.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use gateway::{
    backend::{
        BackendSettings, Counts, MessageSettings, PresenceWrite, RedisBackend, RedisTarget,
        Renewal, Roles,
    },
    presence::{ChosenStatus, NodeEntry, platform_bit},
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use shared::Status;
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    client::Rest,
    harness::{Backend, NodeBuilder, Redis, RedisCluster},
    machine::{self, CoreProbe, PROBE_PERIOD, Sampler, SlowlogWatch},
};

/// Simulated gateway nodes.
const NODES: usize = 10;
/// Users per write job, as a renewal chunk.
const CHUNK: usize = 500;
/// A simulated node's heartbeat stops this long before it counts as dead (the backends' node TTL).
const NODE_TTL: Duration = Duration::from_secs(3);

/// What one run does.
struct Plan {
    users: usize,
    /// Users connected a second while filling, and renewed a second in a renewal round (0: as
    /// fast as Redis answers). Below what saturates Redis, so that SLOWLOG shows what commands
    /// cost rather than how long they queued behind each other on a machine shared with others.
    fill_per_sec: usize,
    renew_per_sec: usize,
    renewal_rounds: usize,
    /// Changes per second, all nodes together, for `churn_secs`.
    churn_per_sec: usize,
    churn_secs: u64,
    /// SLOWLOG entries (wall time, µs) the run fails on: over 1 ms for `make scale`, run on a
    /// quiet machine. The short version in `make test` shares a loaded machine, where Redis is
    /// preempted mid-command (entries of 20-125 ms for a single HSET were seen at a load of 6 on 2
    /// cores), so it fails only over 250 ms: a command that grows with the users still shows
    /// (at 99,000 users the counting script before the buckets took 500 ms).
    slow_us: u64,
}

impl Plan {
    fn from_env(users: usize, renewal_rounds: usize, churn_secs: u64, slow_us: u64) -> Plan {
        let env = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Plan {
            users: env("SCALE_USERS", users as u64) as usize,
            fill_per_sec: env("SCALE_FILL_PER_SEC", 20_000) as usize,
            renew_per_sec: env("SCALE_RENEW_PER_SEC", 40_000) as usize,
            renewal_rounds,
            churn_per_sec: env("SCALE_CHURN_PER_SEC", 10_000) as usize,
            churn_secs: env("SCALE_CHURN_SECS", churn_secs),
            slow_us,
        }
    }
}

#[tokio::test]
async fn scale_100k() {
    run(Plan::from_env(100_000, 1, 2, 250_000)).await;
}

/// `make scale`: a million users (a few minutes on a release build).
#[tokio::test]
#[ignore = "make scale: a million users, a few minutes on a release build"]
async fn scale_1m() {
    run(Plan::from_env(1_000_000, 2, 10, 1_000)).await;
}

/// A simulated node: a backend of its own (its own connections), the users it holds and which of
/// them are connected now.
struct SimNode {
    id: String,
    roles: Roles,
    users: Vec<String>,
    online: Vec<bool>,
    _stop: StopOnDrop,
}

struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

fn user_id(i: usize) -> String {
    format!("u{i:07}")
}

/// User `i` connects on platform 1 + i % 8; one in a hundred has chosen to be invisible.
fn entry_of(i: usize) -> NodeEntry {
    NodeEntry {
        platforms: platform_bit(1 + (i % 8) as u8),
        idle: false,
    }
}

fn invisible(i: usize) -> bool {
    i % 100 == 99
}

fn chosen_of(i: usize) -> Option<ChosenStatus> {
    invisible(i).then_some(ChosenStatus {
        status: Status::Invisible,
        text: None,
        at: 1,
    })
}

fn index_of(user: &str) -> usize {
    user[1..].parse().expect("a user id of this run")
}

async fn connect(target: &RedisTarget, id: &str) -> (Roles, StopOnDrop) {
    let settings = BackendSettings {
        // Nothing expires during a run: renewal rounds are the run's to time.
        presence_ttl: Duration::from_secs(3600),
        node_ttl: NODE_TTL,
        messages: MessageSettings {
            offline_cap: 100,
            history_cap: 100,
            history_age: Duration::from_secs(3600),
            offline_ttl: Duration::from_secs(3600),
            dedupe_window: Duration::from_secs(60),
            dedupe_max: 100,
        },
        max_groups_per_user: 1000,
        // No webhooks: their events (one XADD per transition) are not part of these figures.
        webhooks: None,
    };
    // Nobody listens for this node's events: they are read and dropped.
    let (tx, mut rx) = mpsc::channel(1024);
    let stop = CancellationToken::new();
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let backend = RedisBackend::connect(
        target.clone(),
        "presence",
        settings,
        tx,
        &TaskTracker::new(),
        stop.clone(),
    )
    .await
    .unwrap_or_else(|e| panic!("{id} connects: {e}"));
    (Roles::of(Arc::new(backend)), StopOnDrop(stop))
}

async fn sim_nodes(target: &RedisTarget, nodes: usize, users: usize) -> Vec<SimNode> {
    let mut sims = Vec::new();
    for n in 0..nodes {
        let id = format!("sim-{n}");
        let (roles, stop) = connect(target, &id).await;
        let users: Vec<String> = (n..users).step_by(nodes).map(user_id).collect();
        sims.push(SimNode {
            id,
            roles,
            online: vec![false; users.len()],
            users,
            _stop: stop,
        });
    }
    sims
}

/// Announces the nodes every 500 ms (as their heartbeats would) until the token is cancelled.
fn heartbeats(sims: &[SimNode], stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    let nodes: Vec<(String, Roles)> = sims
        .iter()
        .map(|s| (s.id.clone(), s.roles.clone()))
        .collect();
    tokio::spawn(async move {
        loop {
            for (id, roles) in &nodes {
                let info = crate::contract::node_info(id, 0);
                let _ = roles.registry.announce_node(&info).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.cancelled() => return,
            }
        }
    })
}

/// A clock for one node's jobs of [`CHUNK`] users, so that all nodes together write `per_sec`
/// users a second (0: as fast as Redis answers).
fn pace(nodes: usize, per_sec: usize) -> Option<tokio::time::Interval> {
    (per_sec > 0).then(|| {
        let every = Duration::from_secs_f64((CHUNK * nodes) as f64 / per_sec as f64);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    })
}

/// Every node connects all its users, in jobs of [`CHUNK`], the nodes in parallel, `per_sec`
/// users a second in all.
async fn fill(sims: &mut [SimNode], per_sec: usize) {
    let nodes = sims.len();
    let jobs = sims.iter_mut().map(|sim| async move {
        let mut tick = pace(nodes, per_sec);
        for (c, chunk) in sim.users.chunks(CHUNK).enumerate() {
            if let Some(tick) = &mut tick {
                tick.tick().await;
            }
            let writes = chunk
                .iter()
                .map(|u| {
                    let i = index_of(u);
                    PresenceWrite {
                        user: u.clone(),
                        entry: Some(entry_of(i)),
                        before: None,
                        status: chosen_of(i),
                    }
                })
                .collect();
            sim.roles
                .presence
                .write_presence(&sim.id, writes)
                .await
                .expect("fill");
            for o in &mut sim.online[c * CHUNK..c * CHUNK + chunk.len()] {
                *o = true;
            }
        }
    });
    futures_util::future::join_all(jobs).await;
}

/// One renewal round: every node renews its connected users, in jobs of [`CHUNK`], `per_sec`
/// users a second in all.
async fn renew(sims: &[SimNode], per_sec: usize) -> usize {
    let nodes = sims.len();
    let jobs = sims.iter().map(|sim| async move {
        let mut tick = pace(nodes, per_sec);
        let renewals: Vec<Renewal> = sim
            .users
            .iter()
            .zip(&sim.online)
            .filter(|(_, on)| **on)
            .map(|(u, _)| {
                let i = index_of(u);
                Renewal {
                    user: u.clone(),
                    entry: entry_of(i),
                    chosen: chosen_of(i),
                }
            })
            .collect();
        let n = renewals.len();
        for chunk in renewals.chunks(CHUNK) {
            if let Some(tick) = &mut tick {
                tick.tick().await;
            }
            let changed = sim
                .roles
                .presence
                .renew_presence(&sim.id, chunk.to_vec())
                .await
                .expect("renew");
            assert!(changed.is_empty(), "a renewal changed {changed:?}");
        }
        n
    });
    futures_util::future::join_all(jobs).await.into_iter().sum()
}

/// Churn: every node flushes a batch every 100 ms, half its changes users coming back (who left
/// before), the rest connected users leaving, `per_sec` changes a second in all. Returns the
/// changes written.
async fn churn(sims: &mut [SimNode], per_sec: usize, secs: u64, seed: u64) -> usize {
    let per_batch = (per_sec / sims.len() / 10).max(2);
    let jobs = sims.iter_mut().enumerate().map(|(n, sim)| async move {
        let mut rng = StdRng::seed_from_u64(seed + n as u64);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Who is not connected: arrivals are drawn from them (a random draw over everyone would
        // mostly find connected users and fall short of the rate).
        let mut away: Vec<usize> = (0..sim.users.len()).filter(|&j| !sim.online[j]).collect();
        let mut written = 0;
        for _ in 0..secs * 10 {
            tick.tick().await;
            let mut picked = std::collections::BTreeSet::new();
            let mut writes = Vec::new();
            let write = |j: usize, leaving: bool| {
                let on = Some(entry_of(index_of(&sim.users[j])));
                let (entry, before) = if leaving { (None, on) } else { (on, None) };
                PresenceWrite {
                    user: sim.users[j].clone(),
                    entry,
                    before,
                    status: None,
                }
            };
            for _ in 0..(per_batch / 2).min(away.len()) {
                let j = away.swap_remove(rng.random_range(0..away.len()));
                picked.insert(j);
                writes.push(write(j, false));
            }
            let mut tries = 0;
            while writes.len() < per_batch && tries < 32 * per_batch {
                tries += 1;
                let j = rng.random_range(0..sim.users.len());
                if sim.online[j] && picked.insert(j) {
                    writes.push(write(j, true));
                }
            }
            sim.roles
                .presence
                .write_presence(&sim.id, writes.clone())
                .await
                .expect("churn");
            for w in &writes {
                let j = sim.users.binary_search(&w.user).expect("own user");
                sim.online[j] = w.entry.is_some();
                if w.entry.is_none() {
                    away.push(j);
                }
            }
            written += writes.len();
        }
        written
    });
    futures_util::future::join_all(jobs).await.into_iter().sum()
}

/// What the nodes' connected users add up to.
fn expected(sims: &[SimNode]) -> (Counts, Vec<String>) {
    let mut counts = Counts::default();
    let mut online = Vec::new();
    for sim in sims {
        for (u, on) in sim.users.iter().zip(&sim.online) {
            let i = index_of(u);
            if *on && !invisible(i) {
                counts.online_users += 1;
                *counts.by_platform.entry(1 + (i % 8) as u8).or_default() += 1;
                online.push(u.clone());
            }
        }
    }
    online.sort();
    (counts, online)
}

/// Redis's own figures, from `INFO` on one server.
#[derive(Debug, Clone, Copy, Default)]
struct RedisFigures {
    memory: u64,
    cpu_secs: f64,
    calls: u64,
}

fn figures(redis: &Redis) -> RedisFigures {
    let info = redis.cli(&["INFO", "all"]);
    let field = |name: &str| -> Option<f64> {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .and_then(|v| v.trim().parse().ok())
    };
    let calls = info
        .lines()
        .filter(|l| l.starts_with("cmdstat_"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    RedisFigures {
        memory: field("used_memory").unwrap_or(0.0) as u64,
        cpu_secs: field("used_cpu_user").unwrap_or(0.0) + field("used_cpu_sys").unwrap_or(0.0),
        calls,
    }
}

/// A phase of the run and when it went on (unix ms), to tell which one a SLOWLOG entry fell in.
struct Phase {
    name: String,
    start_ms: u64,
    end_ms: u64,
}

/// A span of the run that is not a measured phase (waiting for the node TTL, the REST node's
/// start), so that every SLOWLOG entry falls somewhere.
fn mark(log: &mut Vec<Phase>, name: &str, start_ms: u64) {
    log.push(Phase {
        name: name.to_string(),
        start_ms,
        end_ms: machine::unix_ms(),
    });
}

/// The machine's load average (1, 5, 15 minutes), to read SLOWLOG by.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `usec_per_call` of the commands the gateway sends most (`INFO commandstats`).
fn mean_call_cost(redis: &Redis) -> String {
    let info = redis.cli(&["INFO", "commandstats"]);
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls: u64 = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            let per = rest.split("usec_per_call=").nth(1)?.split(',').next()?;
            (calls >= 1000).then(|| format!("{name} {per}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Calls per command (`INFO commandstats`), the busiest first.
fn command_calls(redis: &Redis) -> String {
    let info = redis.cli(&["INFO", "commandstats"]);
    let mut calls: Vec<(u64, String)> = info
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let n = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((n, name.to_string()))
        })
        .collect();
    calls.sort_by(|a, b| b.cmp(a));
    calls
        .iter()
        .map(|(n, name)| format!("{name} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Figures of one phase: per unit of work (users or changes), Redis CPU (µs) and commands.
fn phase(
    log: &mut Vec<Phase>,
    name: &str,
    before: RedisFigures,
    after: RedisFigures,
    units: usize,
    took: Duration,
) {
    let end = machine::unix_ms();
    log.push(Phase {
        name: name.to_string(),
        start_ms: end.saturating_sub(took.as_millis() as u64),
        end_ms: end,
    });
    let units = units.max(1) as f64;
    eprintln!(
        "scale: {name:<22} {units:>9} in {:>6.1} s | Redis CPU {:>6.1} s = {:>5.1} us each | commands {:>9} = {:.3} each",
        took.as_secs_f64(),
        after.cpu_secs - before.cpu_secs,
        (after.cpu_secs - before.cpu_secs) * 1e6 / units,
        after.calls - before.calls,
        (after.calls - before.calls) as f64 / units,
    );
}

async fn run(plan: Plan) {
    let redis = Redis::start();
    for (k, v) in [
        ("slowlog-log-slower-than", "1000"),
        ("slowlog-max-len", "10000"),
        ("latency-monitor-threshold", "1"),
    ] {
        assert_eq!(redis.cli(&["CONFIG", "SET", k, v]).trim(), "OK");
    }
    // SLOWLOG measures wall time: on a machine shared with builds, a preempted Redis logs
    // commands of a few µs as taking milliseconds (thousands of entries of 1-70 ms at a load of
    // 5 on 2 cores, even at nice -10). Production gives Redis a core of its own; the strict run
    // gives it the real-time class for the few minutes it runs.
    let strict = plan.slow_us <= 1_000;
    let preferred = redis.prefer(strict);
    // And a core of its own: the run's own process (the simulated nodes, whose socket writes the
    // kernel processes on the writer's core, in interrupts Redis would otherwise take mid-command)
    // keeps to the other cores.
    let redis_core = if strict { redis.pin_apart() } else { None };
    let pinned = redis_core.is_some();
    let target = RedisTarget::Single(redis.url());
    let mut sims = sim_nodes(&target, NODES, plan.users).await;
    let beating = CancellationToken::new();
    let beat = heartbeats(&sims, beating.clone());
    redis.cli(&["SLOWLOG", "RESET"]);
    redis.cli(&["LATENCY", "RESET"]);
    let sampler = Sampler::start(redis.pid().expect("redis runs"), redis.port);
    let watch = SlowlogWatch::start(redis.port);
    // Where Redis runs alone (the strict run), a probe shares its core to see when the core
    // itself was unavailable (machine.rs, `CoreProbe`).
    let probe = redis_core.map(CoreProbe::start);
    eprintln!(
        "scale: {} users as {NODES} nodes on one redis-server (port {}, real-time: {}, preferred: {preferred}, own core: {pinned}, core probe: {}, kernel memory initialized lazily: {}); load average at the start: {}",
        plan.users,
        redis.port,
        strict,
        probe.as_ref().is_some_and(|p| p.placed),
        machine::lazy_memory_init(),
        load_average()
    );

    let mut phases: Vec<Phase> = Vec::new();
    let empty = figures(&redis);
    let started = Instant::now();
    fill(&mut sims, plan.fill_per_sec).await;
    let filled = figures(&redis);
    phase(
        &mut phases,
        "connect every user",
        empty,
        filled,
        plan.users,
        started.elapsed(),
    );
    eprintln!(
        "scale: Redis memory {:.0} MiB for {} online users = {:.0} bytes each",
        (filled.memory - empty.memory) as f64 / 1048576.0,
        plan.users,
        (filled.memory - empty.memory) as f64 / plan.users as f64
    );
    let (counts, _) = expected(&sims);
    assert_eq!(
        sims[0].roles.presence.counts().await.expect("counts"),
        counts
    );

    for round in 1..=plan.renewal_rounds {
        let before = figures(&redis);
        let started = Instant::now();
        let renewed = renew(&sims, plan.renew_per_sec).await;
        phase(
            &mut phases,
            &format!("renewal round {round}"),
            before,
            figures(&redis),
            renewed,
            started.elapsed(),
        );
    }

    let before = figures(&redis);
    let started = Instant::now();
    let changes = churn(&mut sims, plan.churn_per_sec, plan.churn_secs, 7).await;
    let took = started.elapsed();
    phase(
        &mut phases,
        &format!("churn ({:.0}/s)", changes as f64 / took.as_secs_f64()),
        before,
        figures(&redis),
        changes,
        took,
    );
    let (counts, _) = expected(&sims);
    assert_eq!(
        sims[0].roles.presence.counts().await.expect("counts"),
        counts,
        "counts after the churn"
    );

    // The last node dies: its heartbeat stops, and once it is older than the node TTL another
    // node reaps it, in steps of a few hundred users.
    let idle = machine::unix_ms();
    beating.cancel();
    let _ = beat.await;
    let dead = sims.pop().expect("nodes");
    drop(dead.roles);
    let beating = CancellationToken::new();
    let _beat = heartbeats(&sims, beating.clone());
    let _stop_beating = StopOnDrop(beating);
    tokio::time::sleep(NODE_TTL + Duration::from_secs(1)).await;
    mark(&mut phases, "waiting for the node TTL", idle);
    let before = figures(&redis);
    let started = Instant::now();
    let reaped = sims[0]
        .roles
        .registry
        .reap_dead_nodes(&sims[0].id)
        .await
        .expect("reap");
    let took = started.elapsed();
    let dead_online = dead.online.iter().filter(|o| **o).count();
    phase(
        &mut phases,
        "reap a dead node",
        before,
        figures(&redis),
        dead_online,
        took,
    );
    assert_eq!(
        reaped.len(),
        dead_online,
        "each of its users went offline once"
    );

    let (counts, online) = expected(&sims);
    let started = Instant::now();
    let stats_started = machine::unix_ms();
    assert_eq!(
        sims[0].roles.presence.counts().await.expect("counts"),
        counts,
        "counts after reaping"
    );
    eprintln!("scale: counts read in {:?}", started.elapsed());

    // A real node answers the REST API from the same Redis.
    let node = NodeBuilder::new(&Backend::Redis(redis.url())).start();
    let rest = Rest::new(&node);
    let started = Instant::now();
    let (status, stats) = rest.get("/stats").await;
    eprintln!("scale: GET /v1/stats in {:?}: {stats}", started.elapsed());
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["online_users"], counts.online_users);
    let by_platform: BTreeMap<String, u64> = counts
        .by_platform
        .iter()
        .map(|(p, n)| (p.to_string(), *n))
        .collect();
    assert_eq!(stats["by_platform"], serde_json::json!(by_platform));
    mark(
        &mut phases,
        "counts, REST node start, GET /v1/stats",
        stats_started,
    );

    let before = figures(&redis);
    let started = Instant::now();
    let (walked, pages) = walk(&rest, "").await;
    let took = started.elapsed();
    phase(
        &mut phases,
        &format!("online walk ({pages} pages)"),
        before,
        figures(&redis),
        walked.len(),
        took,
    );
    assert!(
        walked == online,
        "the walk gave {} users, {} expected, in id order",
        walked.len(),
        online.len()
    );
    // One platform of eight: most index entries a bucket looks at are not on it.
    let on_three: Vec<String> = online
        .iter()
        .filter(|u| index_of(u) % 8 == 2)
        .cloned()
        .collect();
    let started = Instant::now();
    let platform_started = machine::unix_ms();
    let (walked, pages) = walk(&rest, "&platform=3").await;
    eprintln!(
        "scale: online walk of platform 3: {} users in {pages} pages, {:.1} s",
        walked.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        walked == on_three,
        "the platform walk gave {} users, {} expected",
        walked.len(),
        on_three.len()
    );
    mark(&mut phases, "online walk of platform 3", platform_started);

    // What Redis saw, each SLOWLOG entry beside what the machine did while it ran.
    let samples = sampler.stop();
    let polls = watch.stop();
    let (stalls, wakeups) = probe.map(CoreProbe::stop).unzip();
    // The probe explains nothing unless it really shared Redis's core: then it preempted Redis
    // (a FIFO thread above Redis's) thousands of times, which Redis's main thread counts as
    // involuntary context switches.
    let preempted = machine::totals(&samples).nvcsw;
    let shared_core = wakeups.is_some_and(|w| w < 10_000 || preempted >= 1_000);
    let stalls = stalls.filter(|_| shared_core);
    if wakeups.is_some() && !shared_core {
        eprintln!(
            "scale: the core probe preempted Redis only {preempted} times: it did not share Redis's core, so it explains no entry"
        );
    }
    let slowlog: serde_json::Value =
        serde_json::from_str(&redis.cli(&["--json", "SLOWLOG", "GET", "10000"]))
            .unwrap_or_default();
    let mut entries = slowlog.as_array().cloned().unwrap_or_default();
    entries.sort_by_key(|e| e[0].as_u64().unwrap_or(0));
    let mut per_phase: BTreeMap<String, usize> = BTreeMap::new();
    // Entries a stall of Redis's core explains: the command's own time (its duration less the
    // time its core was taken from it) is within the limit.
    let mut machine_entries: Vec<u64> = Vec::new();
    for (n, e) in entries.iter().enumerate() {
        let (id, at, us) = (
            e[0].as_u64().unwrap_or(0),
            e[1].as_u64().unwrap_or(0),
            e[2].as_u64().unwrap_or(0),
        );
        // When it was logged: between two polls of SLOWLOG LEN, else (no poll saw it) within
        // the second SLOWLOG gives.
        let (logged_from, logged_to) = machine::logged_between(&polls, n as u64)
            .unwrap_or((at * 1_000_000, at * 1_000_000 + 999_999));
        // The command ran within this span.
        let (from_us, to_us) = (
            logged_from.saturating_sub(us + PROBE_PERIOD.as_micros() as u64),
            logged_to,
        );
        let (from, to) = (from_us / 1000, to_us / 1000);
        let during: Vec<&str> = phases
            .iter()
            .filter(|p| p.start_ms <= to && p.end_ms >= from)
            .map(|p| p.name.as_str())
            .collect();
        let during = if during.is_empty() {
            "setup or after the walk".to_string()
        } else {
            during.join(" / ")
        };
        *per_phase.entry(during.clone()).or_default() += 1;
        let args: Vec<String> = e[3]
            .as_array()
            .map(|a| {
                a.iter()
                    .take(12)
                    .map(|x| {
                        let x = x.as_str().map_or_else(|| x.to_string(), str::to_string);
                        x.chars().take(40).collect()
                    })
                    .collect()
            })
            .unwrap_or_default();
        eprintln!(
            "scale: SLOWLOG #{id} at {at} ({during}): {us} us: {}",
            args.join(" ")
        );
        let verdict = match &stalls {
            Some(stalls) => {
                let seen = machine::stalls_within(stalls, from_us, to_us);
                let lost: u64 = seen.iter().sum();
                let own = us.saturating_sub(lost);
                // A wide span (the poller itself delayed) could hold stalls of other commands.
                let narrow = to_us - from_us <= us + 100_000;
                let explained = narrow && own <= plan.slow_us;
                if explained {
                    machine_entries.push(id);
                }
                format!(
                    "ran within {:.1} ms before {to_us} us; Redis's core unavailable {seen:?} us then, so the command's own time was at most {own} us: {}",
                    (to_us - from_us) as f64 / 1000.0,
                    if explained {
                        "the machine's"
                    } else {
                        "NOT explained by the machine"
                    }
                )
            }
            None => "no core probe (Redis has no core of its own)".to_string(),
        };
        eprintln!("scale:   {verdict}");
        eprintln!(
            "scale:   /proc then: {}",
            machine::window(&samples, from.saturating_sub(100), to + 100)
        );
    }
    if let (Some(stalls), Some(wakeups)) = (&stalls, wakeups) {
        let over = |ms: u64| stalls.iter().filter(|s| s.late_us >= ms * 1000).count();
        eprintln!(
            "scale: core probe: {wakeups} wake-ups every {} us on Redis's core, {} late by 0.15 ms or more ({} by 1 ms, {} by 2 ms, {} by 5 ms), longest {} us",
            PROBE_PERIOD.as_micros(),
            stalls.len(),
            over(1),
            over(2),
            over(5),
            stalls.iter().map(|s| s.late_us).max().unwrap_or(0)
        );
    }
    let per_phase: Vec<String> = per_phase
        .into_iter()
        .map(|(name, n)| format!("{name}: {n}"))
        .collect();
    eprintln!("scale: SLOWLOG entries per phase: {}", per_phase.join(", "));
    for p in &phases {
        eprintln!(
            "scale: machine during {}: {}",
            p.name,
            machine::window(&samples, p.start_ms, p.end_ms)
        );
    }
    eprintln!("scale: machine over the run: {}", machine::totals(&samples));
    let slow: Vec<(u64, String)> = entries
        .iter()
        .map(|e| {
            let us = e[2].as_u64().unwrap_or(0);
            let cmd: Vec<String> = e[3]
                .as_array()
                .map(|a| a.iter().take(5).map(|x| x.to_string()).collect())
                .unwrap_or_default();
            (us, cmd.join(" "))
        })
        .collect();
    let mut worst: HashMap<String, u64> = HashMap::new();
    for (us, cmd) in &slow {
        let name: String = cmd.split(' ').take(1).collect();
        let w = worst.entry(name).or_default();
        *w = (*w).max(*us);
    }
    let over = |ms: u64| slow.iter().filter(|(us, _)| *us > ms * 1000).count();
    eprintln!(
        "scale: SLOWLOG: {} entries over 1 ms ({} over 2 ms, {} over 10 ms, {} over 100 ms); slowest per command (us): {worst:?}",
        slow.len(),
        over(2),
        over(10),
        over(100)
    );
    // Which calls: the command, and for a script its SHA's start and its number of keys.
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for (_, cmd) in &slow {
        let parts: Vec<&str> = cmd.split(' ').collect();
        let kind = if parts.first() == Some(&"\"EVALSHA\"") {
            let sha: String = parts
                .get(1)
                .unwrap_or(&"")
                .chars()
                .skip(1)
                .take(8)
                .collect();
            format!("EVALSHA {sha} keys {}", parts.get(2).unwrap_or(&""))
        } else {
            parts.first().unwrap_or(&"").to_string()
        };
        *kinds.entry(kind).or_default() += 1;
    }
    let mut kinds: Vec<(usize, String)> = kinds.into_iter().map(|(k, n)| (n, k)).collect();
    kinds.sort_by(|a, b| b.cmp(a));
    eprintln!(
        "scale: SLOWLOG by call: {:?}",
        &kinds[..kinds.len().min(12)]
    );
    eprintln!("scale: load average at the end: {}", load_average());
    let latency = redis.cli(&["--json", "LATENCY", "LATEST"]);
    eprintln!(
        "scale: LATENCY LATEST (event, when, latest ms, max ms): {}",
        latency.trim()
    );
    let latest: serde_json::Value = serde_json::from_str(&latency).unwrap_or_default();
    for event in latest.as_array().into_iter().flatten() {
        let name = event[0].as_str().unwrap_or("");
        let history = redis.cli(&["--json", "LATENCY", "HISTORY", name]);
        eprintln!(
            "scale: LATENCY HISTORY {name} (when, ms): {}",
            history.trim()
        );
    }
    // Redis's own per-command percentiles (`latency-tracking`, on by default since 7.0).
    let stats = redis.cli(&["INFO", "latencystats"]);
    let stats: Vec<&str> = stats
        .lines()
        .filter(|l| {
            ["evalsha", "hgetall", "zadd", "zrange", "hmget"]
                .iter()
                .any(|c| l.starts_with(&format!("latency_percentiles_usec_{c}:")))
        })
        .collect();
    eprintln!("scale: latency percentiles (us): {}", stats.join(" "));
    // What each kind of call costs on average (wall time inside Redis, all calls, not only the
    // slow ones): a command that grows with the users shows here too.
    eprintln!("scale: mean µs per call: {}", mean_call_cost(&redis));
    // The run's own INFO calls (its measurements) are not the gateway's; entries the core probe
    // explains are the machine's (each printed above with its evidence), unless
    // SCALE_SLOWLOG=strict asks for a SLOWLOG with nothing over the limit at all.
    let strict_slowlog = std::env::var("SCALE_SLOWLOG").is_ok_and(|v| v == "strict");
    let over: Vec<(u64, u64, String)> = entries
        .iter()
        .filter_map(|e| {
            let (id, us) = (e[0].as_u64()?, e[2].as_u64()?);
            let cmd: Vec<String> = e[3]
                .as_array()?
                .iter()
                .take(5)
                .map(|x| x.to_string())
                .collect();
            Some((id, us, cmd.join(" ")))
        })
        .filter(|(id, us, cmd)| {
            *us > plan.slow_us
                && !cmd.starts_with("\"INFO\"")
                && (strict_slowlog || !machine_entries.contains(id))
        })
        .collect();
    eprintln!(
        "scale: SLOWLOG verdict: {} entries, {} of them explained by Redis's core being unavailable, {} over {} us otherwise",
        entries.len(),
        machine_entries.len(),
        over.len(),
        plan.slow_us
    );
    assert!(
        over.is_empty(),
        "commands slower than {} us (id, us, command): {over:?}",
        plan.slow_us
    );
    eprintln!(
        "scale: Redis memory at the end {:.0} MiB",
        figures(&redis).memory as f64 / 1048576.0
    );
}

/// Every page of `GET /v1/online` (1,000 at a time, `filter` appended to the query); the users
/// and how many pages.
async fn walk(rest: &Rest, filter: &str) -> (Vec<String>, usize) {
    let mut walked = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let (status, page) = rest
            .get(&format!("/online?limit=1000&cursor={cursor}{filter}"))
            .await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        for u in page["users"].as_array().expect("users") {
            walked.push(u.as_str().expect("a user id").to_string());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_string(),
            None => return (walked, pages),
        }
    }
}

/// `make scale SCALE_CLUSTER=1`: the same work on a local 3-master Redis Cluster (300,000 users
/// by default, SCALE_USERS), as 10 nodes: fill, a renewal round, churn, reaping a dead node; then
/// per master the commands, Redis CPU, memory and SLOWLOG (1 ms), and the counts and a full
/// `GET /v1/online` walk checked exact. The three masters share this machine's two cores with the
/// run itself, so their SLOWLOG shows preemption too: it is printed, not asserted (the single
/// Redis run is where the 1 ms rule is checked). Asserted: exact counts and walk, and commands per
/// master within 2x of each other in every phase.
#[tokio::test]
#[ignore = "make scale SCALE_CLUSTER=1: 300,000 users on a 3-master cluster, minutes"]
async fn scale_cluster() {
    let plan = Plan::from_env(300_000, 1, 10, 1_000);
    let cluster = RedisCluster::start();
    for n in &cluster.nodes {
        for (k, v) in [
            ("slowlog-log-slower-than", "1000"),
            ("slowlog-max-len", "10000"),
        ] {
            assert_eq!(n.cli(&["CONFIG", "SET", k, v]).trim(), "OK");
        }
        n.cli(&["SLOWLOG", "RESET"]);
    }
    let target = RedisTarget::Cluster(cluster.seeds());
    let mut sims = sim_nodes(&target, NODES, plan.users).await;
    let beating = CancellationToken::new();
    let beat = heartbeats(&sims, beating.clone());
    eprintln!(
        "cluster: {} users as {NODES} nodes on 3 masters (ports {:?}); load average at the start: {}",
        plan.users,
        cluster.nodes.iter().map(|n| n.port).collect::<Vec<_>>(),
        load_average()
    );
    let per_master =
        |c: &RedisCluster| -> Vec<RedisFigures> { c.nodes.iter().map(figures).collect() };
    // One phase: per master the commands and CPU it took, and the spread of commands.
    let report = |name: &str,
                  before: &[RedisFigures],
                  after: &[RedisFigures],
                  units: usize,
                  took: Duration| {
        let calls: Vec<u64> = before
            .iter()
            .zip(after)
            .map(|(b, a)| a.calls - b.calls)
            .collect();
        let cpu: Vec<String> = before
            .iter()
            .zip(after)
            .map(|(b, a)| format!("{:.1}", a.cpu_secs - b.cpu_secs))
            .collect();
        let (most, fewest) = (
            calls.iter().copied().max().unwrap_or(0),
            calls.iter().copied().min().unwrap_or(0),
        );
        eprintln!(
            "cluster: {name:<22} {units:>8} in {:>6.1} s | commands per master {calls:?} (most/fewest {:.2}) = {:.2} per unit | Redis CPU s per master [{}]",
            took.as_secs_f64(),
            most as f64 / fewest.max(1) as f64,
            calls.iter().sum::<u64>() as f64 / units.max(1) as f64,
            cpu.join(", ")
        );
        assert!(
            most <= 2 * fewest,
            "{name}: commands per master within 2x of each other: {calls:?}"
        );
    };

    let before = per_master(&cluster);
    let started = Instant::now();
    fill(&mut sims, plan.fill_per_sec).await;
    let filled = per_master(&cluster);
    report(
        "connect every user",
        &before,
        &filled,
        plan.users,
        started.elapsed(),
    );
    let memory: Vec<String> = before
        .iter()
        .zip(&filled)
        .map(|(b, a)| format!("{:.0}", (a.memory - b.memory) as f64 / 1048576.0))
        .collect();
    eprintln!(
        "cluster: Redis memory per master after the fill, MiB: [{}]",
        memory.join(", ")
    );
    for round in 1..=plan.renewal_rounds {
        let before = per_master(&cluster);
        let started = Instant::now();
        let renewed = renew(&sims, plan.renew_per_sec).await;
        report(
            &format!("renewal round {round}"),
            &before,
            &per_master(&cluster),
            renewed,
            started.elapsed(),
        );
    }
    let before = per_master(&cluster);
    let started = Instant::now();
    let changes = churn(&mut sims, plan.churn_per_sec, plan.churn_secs, 7).await;
    let took = started.elapsed();
    report(
        &format!("churn ({:.0}/s)", changes as f64 / took.as_secs_f64()),
        &before,
        &per_master(&cluster),
        changes,
        took,
    );

    // The last node dies and another reaps it, as in the single Redis run.
    beating.cancel();
    let _ = beat.await;
    let dead = sims.pop().expect("nodes");
    drop(dead.roles);
    let beating = CancellationToken::new();
    let _beat = heartbeats(&sims, beating.clone());
    let _stop_beating = StopOnDrop(beating);
    tokio::time::sleep(NODE_TTL + Duration::from_secs(1)).await;
    let before = per_master(&cluster);
    let started = Instant::now();
    let reaped = sims[0]
        .roles
        .registry
        .reap_dead_nodes(&sims[0].id)
        .await
        .expect("reap");
    let dead_online = dead.online.iter().filter(|o| **o).count();
    report(
        "reap a dead node",
        &before,
        &per_master(&cluster),
        dead_online,
        started.elapsed(),
    );
    assert_eq!(
        reaped.len(),
        dead_online,
        "each of its users went offline once"
    );

    let (counts, online) = expected(&sims);
    assert_eq!(
        sims[0].roles.presence.counts().await.expect("counts"),
        counts,
        "counts after reaping"
    );
    let node = NodeBuilder::new(&Backend::Cluster(cluster.seeds())).start();
    let rest = Rest::new(&node);
    let (status, stats) = rest.get("/stats").await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["online_users"], counts.online_users);
    let before = per_master(&cluster);
    let started = Instant::now();
    let (walked, pages) = walk(&rest, "").await;
    let took = started.elapsed();
    eprintln!(
        "cluster: online walk: {} users in {pages} pages, {:.1} s",
        walked.len(),
        took.as_secs_f64()
    );
    let after = per_master(&cluster);
    let calls: Vec<u64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.calls - b.calls)
        .collect();
    eprintln!("cluster: online walk commands per master {calls:?}");
    assert!(
        walked == online,
        "the walk gave {} users, {} expected",
        walked.len(),
        online.len()
    );

    for n in &cluster.nodes {
        let slowlog: serde_json::Value =
            serde_json::from_str(&n.cli(&["--json", "SLOWLOG", "GET", "10000"]))
                .unwrap_or_default();
        let entries = slowlog.as_array().cloned().unwrap_or_default();
        let worst = entries
            .iter()
            .filter_map(|e| e[2].as_u64())
            .max()
            .unwrap_or(0);
        let over = |ms: u64| {
            entries
                .iter()
                .filter(|e| e[2].as_u64().unwrap_or(0) > ms * 1000)
                .count()
        };
        eprintln!(
            "cluster: master {}: SLOWLOG {} entries over 1 ms ({} over 2 ms, {} over 10 ms), slowest {worst} us; mean us per call: {}",
            n.port,
            entries.len(),
            over(2),
            over(10),
            mean_call_cost(n)
        );
    }
    eprintln!("cluster: load average at the end: {}", load_average());
}

/// Commands per master of a 3-master cluster while 3 nodes churn: the online index and the
/// nodes' sets are bucketed over the whole slot space, so no master carries the presence work of
/// the others (before, every index key shared the `{presence}` slot).
#[tokio::test]
async fn cluster_masters_share_the_churn() {
    let cluster = RedisCluster::start();
    let target = RedisTarget::Cluster(cluster.seeds());
    let mut sims = sim_nodes(&target, 3, 9_000).await;
    let beating = CancellationToken::new();
    let _beat = heartbeats(&sims, beating.clone());
    let _stop = StopOnDrop(beating);
    fill(&mut sims, 0).await;
    let calls = |c: &RedisCluster| -> Vec<(u16, u64)> {
        c.nodes.iter().map(|n| (n.port, figures(n).calls)).collect()
    };
    let before = calls(&cluster);
    let changes = churn(&mut sims, 3_000, 2, 3).await;
    renew(&sims, 0).await;
    let after = calls(&cluster);
    let per_master: Vec<(u16, u64)> = before
        .iter()
        .zip(&after)
        .map(|((port, b), (_, a))| (*port, a - b))
        .collect();
    eprintln!(
        "cluster: {changes} changes and a renewal round; commands per master: {per_master:?}"
    );
    for n in &cluster.nodes {
        eprintln!("cluster: {} at the end: {}", n.port, command_calls(n));
    }
    let most = per_master.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let fewest = per_master.iter().map(|(_, n)| *n).min().unwrap_or(0);
    assert!(
        most <= 2 * fewest,
        "commands per master within 2x of each other: {per_master:?}"
    );
    let (counts, _) = expected(&sims);
    assert_eq!(
        sims[0].roles.presence.counts().await.expect("counts"),
        counts
    );
}

/// A drained node's hand-over on a 3-master cluster (`Registry::hand_over`): every bucket's set
/// moves to the handover name one bucket per call (a call's keys share a slot), including
/// buckets of more than one page (30,000 users: ~234 a bucket, pages of 200); counts stay exact
/// through the window, and reaping the name when it ends takes every user offline.
#[tokio::test]
async fn cluster_hand_over_moves_every_bucket() {
    const USERS: usize = 30_000;
    let cluster = RedisCluster::start();
    let target = RedisTarget::Cluster(cluster.seeds());
    let mut sims = sim_nodes(&target, 1, USERS).await;
    let (survivor, _survivor_stop) = connect(&target, "survivor").await;
    let announce = |roles: &Roles, id: &str| {
        let (roles, info) = (roles.clone(), crate::contract::node_info(id, 0));
        async move { roles.registry.announce_node(&info).await.expect("announce") }
    };
    fill(&mut sims, 0).await;
    // Announced now: filling takes longer than a node's TTL, and nobody heartbeats here.
    announce(&sims[0].roles, &sims[0].id).await;
    announce(&survivor, "survivor").await;
    let (counts, _) = expected(&sims);
    assert_eq!(survivor.presence.counts().await.expect("counts"), counts);

    // Longer than the hand-over itself takes on a loaded machine (a few seconds in a debug build):
    // the name must still be alive when it is checked below.
    let window = Duration::from_secs(8);
    let handed = sims[0]
        .roles
        .registry
        .hand_over(&sims[0].id, window)
        .await
        .expect("hand over");
    assert_eq!(handed, USERS);
    announce(&survivor, "survivor").await;
    let nodes = survivor.registry.nodes().await.expect("nodes");
    assert_eq!(
        nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        ["survivor"]
    );
    assert_eq!(
        survivor.presence.counts().await.expect("counts"),
        counts,
        "handed-over users stay online and counted through the window"
    );
    assert_eq!(
        survivor
            .registry
            .reap_dead_nodes("survivor")
            .await
            .expect("reap"),
        vec![],
        "nothing to reap before the window ends"
    );

    tokio::time::sleep(window + Duration::from_millis(200)).await;
    announce(&survivor, "survivor").await;
    let reaped = survivor
        .registry
        .reap_dead_nodes("survivor")
        .await
        .expect("reap");
    assert_eq!(
        reaped.len(),
        USERS,
        "every user changes once, through the reaper"
    );
    assert!(
        reaped.iter().all(|c| c.transition() == Some(false)),
        "every user goes offline"
    );
    assert_eq!(
        survivor.presence.counts().await.expect("counts"),
        Counts::default()
    );
    assert_eq!(
        survivor
            .registry
            .reap_dead_nodes("survivor")
            .await
            .expect("reap"),
        vec![],
        "reaped once"
    );
}
