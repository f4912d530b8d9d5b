//! The scenarios and what the coordinator needs to know of each (sockets, phase timing, gateway
//! probes); what their workers share is in `support`.

pub mod churn;
pub mod fanout;
pub mod idle;
pub mod messaging;
pub mod private;
pub mod storm;
pub mod support;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    admin::Opened,
    cli::{ChurnArgs, CommonArgs, FanoutArgs, IdleArgs, PrivateArgs, StormArgs},
    client::ClientEnv,
    probe::{Probe, Snapshot},
    report::{Stats, Summary},
};
use support::WorkerCtx;

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
    /// The groups the coordinator opened before the workers started.
    pub opened: Opened,
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

    /// Groups the run's members join: the coordinator opens them (`PUT /v1/groups/{group}`)
    /// before any worker starts, as groups are closed by default.
    pub fn groups(&self, prefix: &str) -> Vec<String> {
        match self {
            Scenario::Fanout(a) => (0..a.groups).map(|g| fanout::group_id(prefix, g)).collect(),
            _ => Vec::new(),
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

#[cfg(test)]
mod tests {
    use serde::Serialize;
    use serde_json::Value;

    use super::{churn, fanout, idle, messaging, storm};

    /// The keys of `figures` in the JSON report.
    fn keys(figures: &impl Serialize) -> Vec<String> {
        match serde_json::to_value(figures) {
            Ok(Value::Object(map)) => map.keys().cloned().collect(),
            other => panic!("figures are not a JSON object: {other:?}"),
        }
    }

    /// The report's keys are what `bench/` and the smoke tests read: renaming a field breaks them.
    #[test]
    fn figures_keep_their_report_keys() {
        assert_eq!(
            keys(&idle::IdleFigures::default()),
            [
                "achieved_rate",
                "connect_latency_ms",
                "connected",
                "decode_errors",
                "dropped_during_hold",
                "failed",
                "failure_kinds",
                "hold_secs",
                "memory",
                "nodes",
                "ramp_secs",
                "requested",
                "target_rate",
                "welcome_nodes",
            ]
        );
        assert_eq!(
            keys(&idle::IdleNode::default()),
            [
                "counts_match",
                "endpoint",
                "gauge_after_ramp",
                "gauge_before",
                "gauge_end_of_hold",
                "our_connections",
            ]
        );
        assert_eq!(
            keys(&idle::IdleMemory::default()),
            [
                "connections",
                "kib_per_connection_after_ramp",
                "kib_per_connection_end_of_hold",
                "pid",
                "rss_kib_after_ramp",
                "rss_kib_before",
                "rss_kib_end_of_hold",
            ]
        );
        assert_eq!(
            keys(&churn::ChurnFigures::default()),
            [
                "achieved_rate",
                "clients_connected",
                "clients_dropped",
                "clients_failed",
                "clients_planned",
                "connect_latency_ms",
                "decode_errors",
                "duplicate_offline",
                "duplicate_online",
                "expected_offline",
                "expected_online",
                "failure_kinds",
                "missing_offline",
                "missing_online",
                "observer_failure_kinds",
                "observers_dropped",
                "observers_planned",
                "observers_subscribed",
                "offline_before_close",
                "offline_latency_from_close_ms",
                "online_before_start",
                "online_latency_from_connect_ms",
                "online_latency_from_welcome_ms",
                "target_rate",
                "unexpected_events",
            ]
        );
        assert_eq!(
            keys(&storm::StormFigures::default()),
            [
                "achieved_rate",
                "backend_round_trips",
                "changes_ok",
                "changes_sent",
                "connect_failed",
                "connected",
                "decode_errors",
                "dropped",
                "errors",
                "failure_kinds",
                "flush_series",
                "flushed_per_sec",
                "nodes",
                "peak_flushed_per_sec",
                "presence_writes",
                "round_trips_per_change",
                "set_status_latency_ms",
                "target_rate",
                "users",
                "writes_per_change_sent",
            ]
        );
        assert_eq!(
            keys(&storm::StormNode::default()),
            [
                "backend_round_trips",
                "endpoint",
                "error",
                "presence_writes"
            ]
        );
        let messaging = [
            "achieved_send_rate",
            "ack_latency_ms",
            "ack_results",
            "acked",
            "beyond_expected",
            "connect_failed",
            "connected",
            "connections_planned",
            "decode_errors",
            "deliveries_per_sec",
            "delivery_latency_ms",
            "dropped",
            "duplicates",
            "errors",
            "expected_deliveries",
            "failure_kinds",
            "loss_percent",
            "lost",
            "misrouted",
            "received",
            "self_copies",
            "sent",
            "target_rate",
            "unavailable",
        ];
        assert_eq!(keys(&messaging::MessagingFigures::default()), messaging);
        let mut fanout: Vec<&str> = messaging.to_vec();
        fanout.extend([
            "groups",
            "groups_open_secs",
            "groups_opened",
            "join_failure_kinds",
            "joined",
            "members_per_group",
            "senders_per_group",
        ]);
        fanout.sort_unstable();
        assert_eq!(keys(&fanout::FanoutFigures::default()), fanout);
    }

    #[test]
    fn figures_survive_json() -> anyhow::Result<()> {
        let mut f = fanout::FanoutFigures {
            groups: 3,
            joined: 14,
            ..Default::default()
        };
        f.join_failure_kinds.insert("forbidden".into(), 1);
        f.messaging.delivery_latency_ms.count = 7;
        f.messaging.unavailable = Some("no groups".into());
        let back: fanout::FanoutFigures = serde_json::from_str(&serde_json::to_string(&f)?)?;
        assert_eq!(back, f);
        let mut s = storm::StormFigures {
            presence_writes: Some(40.0),
            ..Default::default()
        };
        s.flush_series.0.push(storm::FlushPoint {
            at_ms: 5,
            writes_per_sec: 1.5,
        });
        let back: storm::StormFigures = serde_json::from_str(&serde_json::to_string(&s)?)?;
        assert_eq!(back, s);
        Ok(())
    }
}
