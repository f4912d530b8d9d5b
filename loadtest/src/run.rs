//! The coordinator of a run: checks the options, reads the gateways before, opens the run's
//! groups (`admin`), starts the workers, steps them through setup, go and stop with a progress
//! bar, reads the gateways after, and prints the summary table and writes the JSON report.

use std::{
    io::IsTerminal,
    net::SocketAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use shared::ids;

use crate::{
    admin::{self, Opened},
    client::ClientEnv,
    fleet::{Event, Fleet, Phase, Progress, RunSpec},
    probe::Probe,
    report::{self, Figures, RunFigures, Stats},
    scenario::{Outcome, Scenario},
    target::Target,
};

/// Exit code when the gateway answered `unavailable` for a feature the scenario needs.
pub const EXIT_UNAVAILABLE: i32 = 3;
/// Exit code when the run could not measure what it should (no connection, a worker failed).
pub const EXIT_FAILED: i32 = 1;
/// Connections one source address can hold to one gateway address. `client.rs` sets
/// `IP_BIND_ADDRESS_NO_PORT`, so the port is chosen at `connect()` and only the 4-tuple (source
/// address and port, gateway address and port) must be free: each source address has the whole
/// ephemeral range (`ip_local_port_range`, 32768–60999 = 28,232 ports here) towards each gateway
/// URL, whatever it holds towards the others. Not all of it: `connect()` skips every port that
/// some socket holds through an explicit `bind()` (a listener in the range, another tool
/// without the option, on any address), and this tool's own `/metrics` reads (from 127.0.0.1)
/// share the pairs; hence the margin. (Before the option, the port was taken at
/// `bind()`, from 28,232 shared by all URLs, by a scan of the bind hash that got slower with
/// every port in use: 97% of the tool's CPU at ~18,000 ports per address.)
const PORTS_PER_SOURCE: u64 = 27_000;

#[derive(Default)]
struct WorkerState {
    progress: Progress,
    ready: bool,
    unavailable: Option<String>,
    run_done: bool,
    result: Option<Stats>,
    fatal: Option<String>,
    exited: bool,
}

impl WorkerState {
    fn over(&self) -> bool {
        self.exited || self.result.is_some() || self.fatal.is_some()
    }
}

/// Runs a scenario from the command line; the process exit code.
pub async fn run(scenario: Scenario, argv: Vec<String>) -> anyhow::Result<i32> {
    let common = scenario.common().clone();
    let env = ClientEnv::new(&common)?;
    let mut warnings = scenario.validate()?;
    let prefix = common.prefix.clone().unwrap_or_else(default_prefix);
    if !ids::is_valid_id(&prefix) || prefix.len() > 64 {
        bail!("--prefix must be 1 to 64 characters of [A-Za-z0-9_.:@-]");
    }
    let sockets = scenario.sockets();
    let pair = busiest_pair(&env.targets, env.sources.len(), sockets);
    if pair.sockets > PORTS_PER_SOURCE {
        let hint = if pair.ipv4 {
            format!(
                "use e.g. --source-ips 127.0.0.1-127.0.0.{}, or more --url nodes",
                pair.on_url.div_ceil(PORTS_PER_SOURCE).min(254)
            )
        } else {
            "an IPv6 URL is always reached from [::1]: use more --url nodes".to_string()
        };
        bail!(
            "{sockets} sockets put {} on one source address towards {}, more than the about \
             {PORTS_PER_SOURCE} ephemeral ports a source address has towards one gateway: {hint}",
            pair.sockets,
            pair.url
        );
    }
    let workers = sockets.div_ceil(common.per_process).max(1) as usize;
    let started_at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let t0 = Instant::now();
    let probe = Probe::new(&env.targets, scenario.gateway_pids(), t0);
    let show = !common.quiet && std::io::stdout().is_terminal();
    if !common.quiet {
        eprintln!(
            "presence-loadtest {}: {} → {} URL(s), {workers} process(es), prefix {prefix}",
            scenario.name(),
            scenario.plan(),
            env.targets.len(),
        );
        for w in &warnings {
            eprintln!("warning: {w}");
        }
    }

    let before = probe.snapshot("before").await;
    for node in &before.nodes {
        if let Some(e) = &node.error {
            warnings.push(format!(
                "{}: /metrics not readable before the run: {e}",
                node.endpoint
            ));
        }
    }
    // Groups are closed by default: open the run's groups before any member connects.
    let groups = scenario.groups(&prefix);
    let opened = match env.targets.first() {
        Some(target) if !groups.is_empty() => {
            let opened = admin::open_groups(target, &common.api_key, &groups)
                .await
                .context("opening the run's groups (PUT /v1/groups/{group})")?;
            if !common.quiet {
                eprintln!(
                    "opened {} group(s) on {} in {:.2} s",
                    opened.groups, target.authority, opened.secs
                );
            }
            opened
        }
        _ => Opened::default(),
    };
    let spec = RunSpec {
        scenario: scenario.clone(),
        prefix: prefix.clone(),
        worker: 0,
        workers,
    };
    let mut fleet = Fleet::start(&spec, workers)?;
    let mut states: Vec<WorkerState> = (0..fleet.len()).map(|_| WorkerState::default()).collect();
    let bar = Bar::new(show, scenario.setup_target());

    // Setup.
    let setup_deadline = tokio::time::Instant::now() + scenario.setup_timeout();
    let setup_ok = pump(&mut fleet, &mut states, &bar, setup_deadline, |s| s.ready).await;
    let unavailable = states.iter().find_map(|s| s.unavailable.clone());
    let mut problems: Vec<String> = Vec::new();
    if !setup_ok {
        problems.push("setup did not finish in time on every worker".into());
    }
    let setup_secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(scenario.pre_go_wait()).await;
    let after_setup = probe.snapshot("after_setup").await;

    // The measured phase.
    let mut during = Vec::new();
    let mut run_secs = 0.0;
    let go = Instant::now();
    if unavailable.is_none() {
        fleet.set_phase(Phase::Go).await;
        bar.running(scenario.run_length());
        let run_deadline = tokio::time::Instant::now() + scenario.run_timeout();
        if scenario.poll_during_run() {
            let mut next = tokio::time::Instant::now() + Duration::from_secs(1);
            loop {
                let until = next.min(run_deadline);
                if pump(&mut fleet, &mut states, &bar, until, |s| s.run_done).await {
                    break;
                }
                if tokio::time::Instant::now() >= run_deadline {
                    problems.push("the measured phase did not end in time on every worker".into());
                    break;
                }
                during.push(probe.snapshot("during").await);
                next += Duration::from_secs(1);
            }
        } else if !pump(&mut fleet, &mut states, &bar, run_deadline, |s| s.run_done).await {
            problems.push("the measured phase did not end in time on every worker".into());
        }
        run_secs = go.elapsed().as_secs_f64();
        tokio::time::sleep(scenario.post_run_wait()).await;
    }
    let after_run = probe.snapshot("after_run").await;

    // Close and collect.
    bar.closing();
    fleet.set_phase(Phase::Stop).await;
    let close_deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    pump(&mut fleet, &mut states, &bar, close_deadline, |_| false).await;
    fleet.finish().await;
    bar.finish();

    let mut stats = Stats::default();
    for (i, s) in states.iter_mut().enumerate() {
        match (s.result.take(), &s.fatal) {
            (Some(r), _) => stats.merge(r),
            (None, Some(f)) => problems.push(format!("worker {i} failed: {f}")),
            (None, None) => problems.push(format!("worker {i} ended without a result")),
        }
    }
    if stats.unavailable.is_none() {
        stats.unavailable = unavailable;
    }
    let outcome = Outcome {
        stats: &stats,
        env: &env,
        probe: &probe,
        before: &before,
        after_setup: &after_setup,
        after_run: &after_run,
        during: &during,
        opened,
    };
    let mut summary = scenario.summarize(&outcome);
    summary.problems.extend(problems);
    warnings.append(&mut summary.warnings);
    summary.warnings = warnings;
    let run_figures = RunFigures {
        processes: workers,
        elapsed_secs: report::round(t0.elapsed().as_secs_f64(), 3),
        setup_secs: report::round(setup_secs, 3),
        run_secs: report::round(run_secs, 3),
    };
    summary.sections.extend(run_figures.sections());
    let title = format!(
        "presence-loadtest {} — {}",
        scenario.name(),
        scenario.plan()
    );
    print!("{}", report::table(&title, &summary));

    let code = if stats.unavailable.is_some() {
        EXIT_UNAVAILABLE
    } else if summary.problems.is_empty() {
        0
    } else {
        EXIT_FAILED
    };
    if let Some(path) = &common.report {
        let argv = report::redact_secret(&argv);
        let mut params = serde_json::to_value(&scenario)?;
        if let Some(common) = params.get_mut("common").and_then(|c| c.as_object_mut()) {
            common.insert("jwt_secret".into(), json!("<redacted>"));
        }
        let mut doc = json!({
            "tool": "presence-loadtest",
            "version": env!("CARGO_PKG_VERSION"),
            "scenario": scenario.name(),
            "command_line": argv,
            "command": report::shell_line(&argv),
            "started_at_ms": started_at_ms,
            "prefix": prefix,
            "urls": common.urls,
            "params": params,
            "ok": code == 0,
            "exit_code": code,
            "problems": summary.problems,
            "warnings": summary.warnings,
            "figures": summary.figures,
            "latency_ms": report::latencies_json(&stats),
            "counters": stats.counters,
            "error_samples": stats.samples,
            "snapshots": {
                "before": before,
                "after_setup": after_setup,
                "during": during,
                "after_run": after_run,
            },
        });
        if let (Some(doc), Value::Object(run)) =
            (doc.as_object_mut(), serde_json::to_value(&run_figures)?)
        {
            doc.extend(run);
        }
        report::write_json(path, &doc)?;
        if !common.quiet {
            eprintln!("report written to {}", path.display());
        }
    }
    if let Some(message) = &stats.unavailable {
        eprintln!(
            "error: the gateway does not offer what the {} scenario needs (it answered \
             `unavailable`: {message})",
            scenario.name()
        );
    }
    Ok(code)
}

/// The (source address, gateway address) pair that gets the most of a run's sockets.
#[derive(Debug)]
struct Pair {
    /// Sockets on that pair.
    sockets: u64,
    /// The gateway's URL (the first given, if several name it).
    url: String,
    ipv4: bool,
    /// Sockets to that gateway address, from all source addresses.
    on_url: u64,
}

/// Where `sockets` client sockets land: client `i` goes to URL `i % urls` and, for an IPv4 URL,
/// from source address `(i / urls) % sources` (`ClientEnv::connect`); an IPv6 URL is reached from
/// `[::1]` alone. URLs naming the same address add up.
fn busiest_pair(targets: &[Target], sources: usize, sockets: u64) -> Pair {
    let urls = targets.len().max(1) as u64;
    let mut per_addr: Vec<(SocketAddr, Pair)> = Vec::new();
    for (t, target) in targets.iter().enumerate() {
        let on_url = sockets.saturating_sub(t as u64).div_ceil(urls);
        let ipv4 = target.addr.is_ipv4();
        let spread = if ipv4 { sources.max(1) as u64 } else { 1 };
        let on_pair = on_url.div_ceil(spread);
        match per_addr.iter_mut().find(|(a, _)| *a == target.addr) {
            Some((_, p)) => {
                p.sockets += on_pair;
                p.on_url += on_url;
            }
            None => per_addr.push((
                target.addr,
                Pair {
                    sockets: on_pair,
                    url: target.url.clone(),
                    ipv4,
                    on_url,
                },
            )),
        }
    }
    // Reversed, so that of equals the first URL is named.
    per_addr
        .into_iter()
        .rev()
        .map(|(_, p)| p)
        .max_by_key(|p| p.sockets)
        .unwrap_or(Pair {
            sockets: 0,
            url: String::new(),
            ipv4: true,
            on_url: 0,
        })
}

/// Handles worker events until `done` holds for every worker still running (true), or the
/// deadline passes (false).
async fn pump(
    fleet: &mut Fleet,
    states: &mut [WorkerState],
    bar: &Bar,
    deadline: tokio::time::Instant,
    done: impl Fn(&WorkerState) -> bool,
) -> bool {
    loop {
        if states.iter().all(|s| s.over() || done(s)) {
            // With `|_| false` this waits for every worker to be over.
            return true;
        }
        let Some((i, event)) = fleet.next_event(deadline).await else {
            return false;
        };
        let Some(state) = states.get_mut(i) else {
            continue;
        };
        match event {
            Event::Progress(p) => state.progress = p,
            Event::Ready { unavailable } => {
                state.ready = true;
                state.unavailable = unavailable;
            }
            Event::RunDone => state.run_done = true,
            Event::Result { stats } => state.result = Some(*stats),
            Event::Fatal { message } => state.fatal = Some(message),
            Event::Exited => state.exited = true,
        }
        let mut total = Progress::default();
        for s in states.iter() {
            total.add(&s.progress);
        }
        bar.update(&total);
    }
}

/// The progress bar: connection attempts during setup, time during the measured phase.
struct Bar {
    bar: ProgressBar,
    run: std::sync::Mutex<Option<(Instant, Duration)>>,
}

impl Bar {
    fn new(show: bool, setup_target: u64) -> Self {
        let bar = ProgressBar::with_draw_target(
            Some(setup_target),
            if show {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix:>8} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
        ) {
            bar.set_style(style);
        }
        bar.set_prefix("setup");
        Bar {
            bar,
            run: std::sync::Mutex::new(None),
        }
    }

    fn running(&self, length: Duration) {
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix:>8} [{elapsed_precise}] {wide_bar} {percent:>3}% {msg}",
        ) {
            self.bar.set_style(style);
        }
        self.bar.set_prefix("run");
        self.bar.set_length(length.as_millis().max(1) as u64);
        self.bar.set_position(0);
        if let Ok(mut run) = self.run.lock() {
            *run = Some((Instant::now(), length));
        }
    }

    fn closing(&self) {
        self.bar.set_prefix("closing");
    }

    fn update(&self, p: &Progress) {
        let run = self.run.lock().ok().and_then(|r| *r);
        match run {
            None => self.bar.set_position(p.connects + p.failed),
            Some((start, length)) => self
                .bar
                .set_position(start.elapsed().min(length).as_millis() as u64),
        }
        self.bar.set_message(format!(
            "open {} failed {} sent {} recv {} errors {}",
            p.open, p.failed, p.sent, p.received, p.errors
        ));
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `lt` and the time in base 36: unique enough between runs on one machine.
fn default_prefix() -> String {
    let mut n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    while n > 0 {
        out.push(digits[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    format!("lt{}", String::from_utf8_lossy(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_spread_over_source_addresses_and_urls() -> anyhow::Result<()> {
        let a = Target::parse("ws://127.0.0.1:8080/ws", false)?;
        let b = Target::parse("ws://127.0.0.1:8081/ws", false)?;
        let v6 = Target::parse("ws://[::1]:8082/ws", false)?;
        // One URL, 4 addresses: 10,001 sockets put 2,501 on the first address.
        let p = busiest_pair(std::slice::from_ref(&a), 4, 10_001);
        assert_eq!((p.sockets, p.on_url, p.ipv4), (2_501, 10_001, true));
        // Two URLs: each address holds its share towards each URL separately.
        let p = busiest_pair(&[a.clone(), b.clone()], 1, 50_001);
        assert_eq!(
            (p.sockets, p.url.as_str()),
            (25_001, "ws://127.0.0.1:8080/ws")
        );
        // The same address twice counts once.
        let p = busiest_pair(&[a.clone(), a.clone()], 1, 50_000);
        assert_eq!((p.sockets, p.on_url), (50_000, 50_000));
        // IPv6 URLs are reached from [::1] whatever --source-ips says.
        let p = busiest_pair(&[a, v6], 10, 40_000);
        assert_eq!((p.sockets, p.ipv4), (20_000, false));
        assert!(busiest_pair(&[b], 1, PORTS_PER_SOURCE).sockets <= PORTS_PER_SOURCE);
        Ok(())
    }

    #[test]
    fn default_prefixes_are_valid_ids() {
        let p = default_prefix();
        assert!(p.starts_with("lt") && ids::is_valid_id(&p), "{p}");
    }
}
