//! What the scenarios use: a worker's handle on its run, its tasks' shared state and common steps.
//!
//! The handle waits for the phases and reports ready and done; the tasks share the connection
//! environment, the statistics and the progress counters; the common steps slice and pace the
//! load, gate the setup, connect, close, and do the arithmetic of summaries.

use std::{
    ops::Range,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};

use crate::{
    client::{ClientEnv, Connected},
    fleet::{Event, Phase, Progress},
    report::{Recorder, Stats},
};

/// Longest a connection waits for the server's close.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Atomic progress counters shared by a worker's tasks.
#[derive(Default)]
pub struct Counters {
    pub open: AtomicI64,
    pub connects: AtomicU64,
    pub failed: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub errors: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> Progress {
        Progress {
            open: self.open.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    pub fn opened(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.connects.fetch_add(1, Ordering::Relaxed);
    }

    pub fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a worker's connection tasks share.
pub struct Shared {
    pub env: ClientEnv,
    pub rec: Recorder,
    pub counters: Counters,
    pub prefix: String,
}

impl Shared {
    /// Connects client `index` as `user`. A failure is counted (`failed_key`, `connect_error.<kind>`
    /// with a sample) and reported to the setup `gate`, if any; then `None`.
    pub async fn connect_counted(
        &self,
        index: usize,
        user: &str,
        failed_key: &str,
        gate: Option<&mpsc::UnboundedSender<bool>>,
    ) -> Option<Connected> {
        match self.env.connect(index, user).await {
            Ok(connected) => Some(connected),
            Err(e) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                let mut rec = self.rec.lock();
                rec.add(failed_key, 1);
                rec.add(&format!("connect_error.{}", e.kind), 1);
                rec.sample(&format!("connect_error.{}", e.kind), &e.message);
                drop(rec);
                if let Some(gate) = gate {
                    let _ = gate.send(false);
                }
                None
            }
        }
    }
}

/// A worker's handle on its assignment and its parent.
pub struct WorkerCtx {
    pub worker: usize,
    pub workers: usize,
    pub shared: Arc<Shared>,
    pub phase: watch::Receiver<Phase>,
    events: mpsc::UnboundedSender<Event>,
}

impl WorkerCtx {
    pub fn new(
        worker: usize,
        workers: usize,
        shared: Arc<Shared>,
        phase: watch::Receiver<Phase>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Self {
        WorkerCtx {
            worker,
            workers,
            shared,
            phase,
            events,
        }
    }

    pub fn ready(&self, unavailable: Option<String>) {
        let _ = self.events.send(Event::Ready { unavailable });
    }

    pub fn run_done(&self) {
        let _ = self.events.send(Event::RunDone);
    }

    pub fn phase_now(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Waits until the parent says go (true) or stop (false), at most `within`.
    pub async fn wait_go(&mut self, within: Duration) -> bool {
        wait_phase(&mut self.phase, Phase::Go, within).await == Phase::Go
    }

    /// Waits until the parent says stop, at most `within`.
    pub async fn wait_stop(&mut self, within: Duration) {
        wait_phase(&mut self.phase, Phase::Stop, within).await;
    }

    /// Sleeps `d`, or less when the parent says stop.
    pub async fn sleep_unless_stopped(&mut self, d: Duration) {
        wait_phase(&mut self.phase, Phase::Stop, d).await;
    }
}

/// Waits until the phase is at least `at_least`; the phase then, or `Stop` after `within` or if
/// the parent is gone.
pub async fn wait_phase(
    rx: &mut watch::Receiver<Phase>,
    at_least: Phase,
    within: Duration,
) -> Phase {
    let waited = tokio::time::timeout(within, async {
        rx.wait_for(|p| *p >= at_least).await.map(|p| *p)
    })
    .await;
    match waited {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => Phase::Stop,
        Err(_) => {
            let now = *rx.borrow();
            if now >= at_least { now } else { Phase::Stop }
        }
    }
}

/// Waits until a watched flag is set (or its sender is gone).
pub async fn wait_flag<T>(rx: &mut watch::Receiver<T>, set: impl FnMut(&T) -> bool) {
    let _ = rx.wait_for(set).await.map(|_| ());
}

/// Microseconds since the Unix epoch (shared by every process on the machine).
pub fn epoch_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
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
