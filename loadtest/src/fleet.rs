//! The fleet: starts a run's workers, tells them the phases and collects their events and results.
//!
//! One worker runs in this process; past one process's open-file limit they are child processes
//! of this binary (hidden `worker` subcommand: the assignment as JSON, phase commands on stdin,
//! events and the final result as JSON lines on stdout). The parent sees the same event stream
//! either way.

use std::{
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, Command},
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    cli::WorkerArgs,
    client::ClientEnv,
    report::{Recorder, Stats},
    scenario::{
        Scenario,
        support::{Counters, Shared, WorkerCtx},
    },
};

/// How often a worker reports its progress counters.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Longest wait for a worker process to exit once it was told to stop.
const EXIT_WAIT: Duration = Duration::from_secs(30);

/// One worker's assignment.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RunSpec {
    pub scenario: Scenario,
    /// Prefix of the run's user and group ids.
    pub prefix: String,
    /// This worker's position, from 0.
    pub worker: usize,
    pub workers: usize,
}

/// What the parent tells workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Setup,
    Go,
    Stop,
}

/// Live counters of a worker, for the progress bar.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Connections open now.
    pub open: i64,
    /// Connections that got their `welcome`.
    pub connects: u64,
    /// Connections that failed.
    pub failed: u64,
    /// Frames sent in the measured phase.
    pub sent: u64,
    /// Deliveries, events or replies received in the measured phase.
    pub received: u64,
    /// Error frames received.
    pub errors: u64,
}

impl Progress {
    pub fn add(&mut self, o: &Progress) {
        self.open += o.open;
        self.connects += o.connects;
        self.failed += o.failed;
        self.sent += o.sent;
        self.received += o.received;
        self.errors += o.errors;
    }
}

/// What a worker tells the parent.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    Progress(Progress),
    /// Setup is done (connections open, subscriptions and joins answered).
    Ready {
        unavailable: Option<String>,
    },
    /// The measured phase is over; connections stay open until `stop`.
    RunDone,
    /// The final statistics; the worker ends after it.
    Result {
        stats: Box<Stats>,
    },
    /// The worker could not run.
    Fatal {
        message: String,
    },
    /// Sent by the parent side when a worker's event stream ended.
    Exited,
}

/// Runs one worker to its end: setup, the measured phase and closing, reporting through `events`.
pub async fn run_worker(
    spec: RunSpec,
    events: mpsc::UnboundedSender<Event>,
    phase: watch::Receiver<Phase>,
) {
    let env = match ClientEnv::new(spec.scenario.common()) {
        Ok(env) => env,
        Err(e) => {
            let _ = events.send(Event::Fatal {
                message: format!("{e:#}"),
            });
            return;
        }
    };
    let shared = Arc::new(Shared {
        env,
        rec: Recorder::default(),
        counters: Counters::default(),
        prefix: spec.prefix.clone(),
    });
    let ticker = {
        let shared = shared.clone();
        let events = events.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            loop {
                tick.tick().await;
                if events
                    .send(Event::Progress(shared.counters.snapshot()))
                    .is_err()
                {
                    break;
                }
            }
        })
    };
    let ctx = WorkerCtx::new(
        spec.worker,
        spec.workers,
        shared.clone(),
        phase,
        events.clone(),
    );
    let outcome = spec.scenario.run_worker(ctx).await;
    ticker.abort();
    let _ = events.send(Event::Progress(shared.counters.snapshot()));
    let _ = events.send(match outcome {
        Ok(stats) => Event::Result {
            stats: Box::new(stats),
        },
        Err(e) => Event::Fatal {
            message: format!("{e:#}"),
        },
    });
}

/// The hidden `worker` subcommand: runs one worker, reading phases from stdin and writing events
/// to stdout as JSON lines.
pub async fn worker_process(args: WorkerArgs) -> anyhow::Result<()> {
    let spec: RunSpec = serde_json::from_str(&args.spec).context("bad --spec")?;
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => match line.trim() {
                    "go" => {
                        phase_tx.send_if_modified(|p| {
                            let change = *p < Phase::Go;
                            if change {
                                *p = Phase::Go;
                            }
                            change
                        });
                    }
                    "stop" => {
                        let _ = phase_tx.send(Phase::Stop);
                    }
                    _ => {}
                },
                // The parent is gone: stop.
                Ok(None) | Err(_) => {
                    let _ = phase_tx.send(Phase::Stop);
                    break;
                }
            }
        }
    });
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let worker = tokio::spawn(run_worker(spec, events_tx, phase_rx));
    let mut stdout = tokio::io::stdout();
    while let Some(event) = events_rx.recv().await {
        let last = matches!(event, Event::Result { .. } | Event::Fatal { .. });
        let mut line = serde_json::to_string(&event)?;
        line.push('\n');
        stdout.write_all(line.as_bytes()).await?;
        stdout.flush().await?;
        if last {
            break;
        }
    }
    worker.abort();
    Ok(())
}

enum Control {
    Local(watch::Sender<Phase>),
    Child(Option<ChildStdin>),
}

/// The parent's side of a run's workers.
pub struct Fleet {
    events: mpsc::UnboundedReceiver<(usize, Event)>,
    controls: Vec<Control>,
    children: Vec<Child>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Starts `workers` workers of `spec`: one in this process, or that many child processes.
    pub fn start(spec: &RunSpec, workers: usize) -> anyhow::Result<Fleet> {
        let (tx, events) = mpsc::unbounded_channel();
        let mut fleet = Fleet {
            events,
            controls: Vec::new(),
            children: Vec::new(),
            tasks: Vec::new(),
        };
        if workers <= 1 {
            let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
            let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
            let mut spec = spec.clone();
            spec.worker = 0;
            spec.workers = 1;
            fleet
                .tasks
                .push(tokio::spawn(run_worker(spec, ev_tx, phase_rx)));
            fleet.tasks.push(tokio::spawn(async move {
                while let Some(e) = ev_rx.recv().await {
                    if tx.send((0, e)).is_err() {
                        return;
                    }
                }
                let _ = tx.send((0, Event::Exited));
            }));
            fleet.controls.push(Control::Local(phase_tx));
            return Ok(fleet);
        }
        let exe = std::env::current_exe().context("cannot find this program to start workers")?;
        for worker in 0..workers {
            let mut spec = spec.clone();
            spec.worker = worker;
            spec.workers = workers;
            let mut child = Command::new(&exe)
                .arg("worker")
                .arg("--spec")
                .arg(serde_json::to_string(&spec)?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start worker process {worker}"))?;
            let stdout = child.stdout.take().context("worker has no stdout")?;
            fleet.controls.push(Control::Child(child.stdin.take()));
            let tx = tx.clone();
            fleet.tasks.push(tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let event =
                        serde_json::from_str::<Event>(&line).unwrap_or_else(|e| Event::Fatal {
                            message: format!("unreadable worker output ({e}): {line:.200}"),
                        });
                    if tx.send((worker, event)).is_err() {
                        return;
                    }
                }
                let _ = tx.send((worker, Event::Exited));
            }));
            fleet.children.push(child);
        }
        Ok(fleet)
    }

    pub fn len(&self) -> usize {
        self.controls.len()
    }

    /// Tells every worker the new phase.
    pub async fn set_phase(&mut self, phase: Phase) {
        let word = match phase {
            Phase::Setup => return,
            Phase::Go => "go\n",
            Phase::Stop => "stop\n",
        };
        for control in &mut self.controls {
            match control {
                Control::Local(tx) => {
                    let _ = tx.send(phase);
                }
                Control::Child(stdin) => {
                    if let Some(pipe) = stdin {
                        let written = tokio::time::timeout(Duration::from_secs(5), async {
                            pipe.write_all(word.as_bytes()).await?;
                            pipe.flush().await
                        })
                        .await;
                        if !matches!(written, Ok(Ok(()))) {
                            *stdin = None;
                        }
                    }
                }
            }
        }
    }

    /// The next event of any worker, or `None` at `deadline` (or when every worker is gone).
    pub async fn next_event(&mut self, deadline: tokio::time::Instant) -> Option<(usize, Event)> {
        tokio::time::timeout_at(deadline, self.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits for every worker to end (killing those that do not within a bound).
    pub async fn finish(mut self) {
        for control in &mut self.controls {
            match control {
                Control::Local(tx) => {
                    let _ = tx.send(Phase::Stop);
                }
                Control::Child(stdin) => {
                    // Closing stdin tells a worker its parent is done.
                    *stdin = None;
                }
            }
        }
        let deadline = Instant::now() + EXIT_WAIT;
        for child in &mut self.children {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, child.wait()).await.is_err() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}
