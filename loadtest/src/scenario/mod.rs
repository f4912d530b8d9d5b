//! The scenarios, what the coordinator needs to know of each (sockets, phase timing, gateway
//! probes), and helpers they share (slicing users over workers, pacing, setup gates, connecting
//! and closing connection tasks).

pub mod churn;
pub mod fanout;
pub mod idle;
pub mod messaging;
pub mod private;
pub mod storm;

use std::{ops::Range, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};

use crate::{
    cli::{ChurnArgs, CommonArgs, FanoutArgs, IdleArgs, PrivateArgs, StormArgs},
    client::{ClientEnv, Connected},
    probe::{Probe, Snapshot},
    report::{Stats, Summary},
    workers::{Shared, WorkerCtx},
};

/// Longest a connection waits for the server's close.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A scenario with its options.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "scenario", rename_all = "snake_case")]
pub enum Scenario {
    Idle(IdleArgs),
    Churn(ChurnArgs),
    Fanout(FanoutArgs),
    Private(PrivateArgs),
    Storm(StormArgs),
}

/// What the coordinator measured around the workers, for a scenario's summary.
pub struct Outcome<'a> {
    pub stats: &'a Stats,
    pub env: &'a ClientEnv,
    pub probe: &'a Probe,
    /// Before any worker started.
    pub before: &'a Snapshot,
    /// After setup (and the scenario's pre-go wait), right before `go`.
    pub after_setup: &'a Snapshot,
    /// After the measured phase (and the scenario's post-run wait), before connections close.
    pub after_run: &'a Snapshot,
    /// Taken every second during the measured phase, for scenarios that ask for it.
    pub during: &'a [Snapshot],
    pub workers: usize,
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Idle(_) => "idle",
            Scenario::Churn(_) => "churn",
            Scenario::Fanout(_) => "fanout",
            Scenario::Private(_) => "private",
            Scenario::Storm(_) => "storm",
        }
    }

    pub fn common(&self) -> &CommonArgs {
        match self {
            Scenario::Idle(a) => &a.common,
            Scenario::Churn(a) => &a.common,
            Scenario::Fanout(a) => &a.common,
            Scenario::Private(a) => &a.common,
            Scenario::Storm(a) => &a.common,
        }
    }

    /// A one-line description of the planned load.
    pub fn plan(&self) -> String {
        match self {
            Scenario::Idle(a) => format!(
                "{} connections at {}/s, hold {} s",
                a.connections, a.rate, a.hold
            ),
            Scenario::Churn(a) => format!(
                "{} clients/s for {} s, each living {} ms, {} watcher(s) per user",
                a.clients_per_sec, a.duration, a.lifetime_ms, a.watchers
            ),
            Scenario::Fanout(a) => format!(
                "{} groups × {} members, {} sender(s)/group, {} msg/s for {} s",
                a.groups, a.members, a.senders_per_group, a.messaging.rate, a.messaging.duration
            ),
            Scenario::Private(a) => format!(
                "{} users in pairs, {} msg/s for {} s",
                private::users(a),
                a.messaging.rate,
                a.messaging.duration
            ),
            Scenario::Storm(a) => format!(
                "{} users, {} status changes/s for {} s",
                a.users, a.rate, a.duration
            ),
        }
    }

    /// Sockets the run holds at its peak, over all processes.
    pub fn sockets(&self) -> u64 {
        match self {
            Scenario::Idle(a) => a.connections,
            Scenario::Churn(a) => churn::sockets(a),
            Scenario::Fanout(a) => a.groups * a.members,
            Scenario::Private(a) => private::users(a),
            Scenario::Storm(a) => a.users,
        }
    }

    /// Connection attempts of the setup phase (for the progress bar).
    pub fn setup_target(&self) -> u64 {
        match self {
            Scenario::Idle(a) => a.connections,
            Scenario::Churn(a) => churn::observers(a),
            _ => self.sockets(),
        }
    }

    /// Longest the setup phase may take.
    pub fn setup_timeout(&self) -> Duration {
        let connect = Duration::from_millis(self.common().connect_timeout_ms);
        let ramp = |n: u64, rate: u64| Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
        let base = match self {
            Scenario::Idle(a) => ramp(a.connections, a.rate),
            Scenario::Churn(a) => ramp(churn::observers(a), 1000),
            Scenario::Fanout(a) => ramp(self.sockets(), a.messaging.connect_rate),
            Scenario::Private(a) => ramp(self.sockets(), a.messaging.connect_rate),
            Scenario::Storm(a) => ramp(a.users, a.connect_rate),
        };
        base + connect * 2 + Duration::from_secs(30)
    }

    /// How long the measured phase should last.
    pub fn run_length(&self) -> Duration {
        let ms = Duration::from_millis;
        match self {
            Scenario::Idle(a) => Duration::from_secs(a.hold),
            Scenario::Churn(a) => {
                Duration::from_secs(a.duration) + ms(a.lifetime_ms) + ms(a.drain_ms)
            }
            Scenario::Fanout(a) => {
                Duration::from_secs(a.messaging.duration) + ms(a.messaging.drain_ms)
            }
            Scenario::Private(a) => {
                Duration::from_secs(a.messaging.duration) + ms(a.messaging.drain_ms)
            }
            Scenario::Storm(a) => Duration::from_secs(a.duration) + ms(2000),
        }
    }

    /// Longest the measured phase may take before the coordinator gives up on a worker.
    pub fn run_timeout(&self) -> Duration {
        let connect = Duration::from_millis(self.common().connect_timeout_ms);
        self.run_length() + connect + Duration::from_secs(30)
    }

    /// Pause between setup and `go` (before the "after setup" snapshot).
    pub fn pre_go_wait(&self) -> Duration {
        match self {
            Scenario::Idle(a) => Duration::from_millis(a.settle_ms),
            Scenario::Storm(a) => Duration::from_millis(a.flush_wait_ms),
            _ => Duration::ZERO,
        }
    }

    /// Pause between the end of the measured phase and the "after run" snapshot.
    pub fn post_run_wait(&self) -> Duration {
        match self {
            Scenario::Storm(a) => Duration::from_millis(a.flush_wait_ms),
            _ => Duration::ZERO,
        }
    }

    /// Whether the coordinator samples `/metrics` every second during the measured phase.
    pub fn poll_during_run(&self) -> bool {
        matches!(self, Scenario::Storm(_))
    }

    pub fn gateway_pids(&self) -> &[u32] {
        match self {
            Scenario::Idle(a) => &a.gateway_pids,
            _ => &[],
        }
    }

    /// Checks options against each other; warnings that do not stop the run.
    pub fn validate(&self) -> anyhow::Result<Vec<String>> {
        match self {
            Scenario::Idle(_) => Ok(Vec::new()),
            Scenario::Churn(a) => churn::validate(a),
            Scenario::Fanout(a) => fanout::validate(a),
            Scenario::Private(a) => private::validate(a),
            Scenario::Storm(a) => storm::validate(a),
        }
    }

    /// Runs this worker's part of the scenario.
    pub async fn run_worker(&self, ctx: WorkerCtx) -> anyhow::Result<Stats> {
        match self {
            Scenario::Idle(a) => idle::worker(a, ctx).await,
            Scenario::Churn(a) => churn::worker(a, ctx).await,
            Scenario::Fanout(a) => fanout::worker(a, ctx).await,
            Scenario::Private(a) => private::worker(a, ctx).await,
            Scenario::Storm(a) => storm::worker(a, ctx).await,
        }
    }

    /// The scenario's figures from the merged statistics and the gateway snapshots.
    pub fn summarize(&self, o: &Outcome<'_>) -> Summary {
        match self {
            Scenario::Idle(a) => idle::summarize(a, o),
            Scenario::Churn(a) => churn::summarize(a, o),
            Scenario::Fanout(a) => fanout::summarize(a, o),
            Scenario::Private(a) => private::summarize(a, o),
            Scenario::Storm(a) => storm::summarize(a, o),
        }
    }
}

/// Worker `worker`'s contiguous part of `0..total`, cut at multiples of `align`.
pub fn slice(total: u64, worker: usize, workers: usize, align: u64) -> Range<u64> {
    let align = align.max(1);
    let units = total.div_ceil(align);
    let workers = workers.max(1) as u64;
    let w = (worker as u64).min(workers);
    let start = (units * w / workers * align).min(total);
    let end = (units * (w + 1) / workers * align).min(total);
    start..end
}

/// A worker's share of a total rate, by its share of the items.
pub fn share(rate: u64, part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        rate as f64 * part as f64 / total as f64
    }
}

/// Sleeps until item `k` of a paced sequence is due: `start + k / per_sec`.
pub async fn pace(start: Instant, k: u64, per_sec: f64) {
    if per_sec > 0.0 {
        tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / per_sec)).await;
    }
}

/// Counts finished setup steps (a connect, a join, a subscribe) of a worker's tasks.
pub struct Gate {
    rx: mpsc::UnboundedReceiver<bool>,
}

/// Each task holds a clone of the sender and sends once.
pub fn gate() -> (mpsc::UnboundedSender<bool>, Gate) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, Gate { rx })
}

impl Gate {
    /// Waits for `n` steps (or for every sender to be gone, or the deadline); the number that
    /// succeeded.
    pub async fn wait(&mut self, n: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        let mut ok = 0;
        for _ in 0..n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(true)) => ok += 1,
                Ok(Some(false)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        ok
    }
}

/// Connects client `index` as `user` for a scenario's setup: a failure is counted
/// (`connect_failed`) and reported to `gate`; a success is counted as `connected`, with its
/// latency in the `connect` histogram. The caller reports the success to `gate` when its own
/// setup is done.
pub async fn connect_member(
    shared: &Shared,
    index: usize,
    user: &str,
    gate: &mpsc::UnboundedSender<bool>,
) -> Option<Connected> {
    let connected = shared
        .connect_counted(index, user, "connect_failed", Some(gate))
        .await?;
    shared.counters.opened();
    let mut rec = shared.rec.lock();
    rec.add("connected", 1);
    rec.record("connect", connected.latency.as_micros() as u64);
    drop(rec);
    Some(connected)
}

/// Counts a message that did not decode, keeping the first as an example.
pub fn count_undecodable(stats: &mut Stats, error: &str) {
    stats.add("decode_errors", 1);
    stats.sample("decode_error", error);
}

/// Setup and measured phase of a worker whose connection tasks run by themselves: waits for the
/// tasks' `steps` setup steps (at most the connect timeout plus 5 s), reports ready, waits for go
/// (at most 120 s plus `pre_go`, the coordinator's pause before it), lets the tasks run for
/// `run` (less when told to stop) and reports the run done.
pub async fn setup_and_run(
    ctx: &mut WorkerCtx,
    gate: &mut Gate,
    steps: usize,
    pre_go: Duration,
    run: Duration,
) {
    let bound = ctx.shared.env.connect_timeout + Duration::from_secs(5);
    gate.wait(steps, bound).await;
    ctx.ready(None);
    if ctx.wait_go(Duration::from_secs(120) + pre_go).await {
        ctx.sleep_unless_stopped(run).await;
    }
    ctx.run_done();
}

/// Waits for a worker's connection tasks to close, at most five close waits; counts
/// `close_timeouts` when they take longer.
pub async fn join_connections(shared: &Shared, tasks: Vec<JoinHandle<()>>) {
    let closing = futures_util::future::join_all(tasks);
    if tokio::time::timeout(CLOSE_WAIT * 5, closing).await.is_err() {
        shared.rec.add("close_timeouts", 1);
    }
}

/// Per second, guarded against a zero interval.
pub fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// `part / whole` as a percentage, 0 when `whole` is 0.
pub fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_everything_once() {
        for total in [0u64, 1, 7, 100, 1001] {
            for workers in 1..6 {
                for align in [1u64, 2] {
                    let mut next = 0;
                    for w in 0..workers {
                        let r = slice(total, w, workers, align);
                        assert_eq!(r.start, next, "{total} {workers} {align}");
                        assert!(r.start.is_multiple_of(align) || r.start == total);
                        next = r.end;
                    }
                    assert_eq!(next, total);
                }
            }
        }
    }
}
