//! `/metrics` as an operator's Prometheus sees it. A node on Redis serves a little of everything
//! (clients that watch, message and err; REST; webhooks to a target that is down; a Redis stall),
//! then its scrape must pass `promtool check metrics`, hold every metric the Grafana dashboard
//! and the alert rules name, and match docs/metrics.md (every exported metric documented, with
//! its type; no documented metric the code does not have).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;
use shared::{ClientFrame, ServerFrame, Status};

use crate::{
    client::Rest,
    harness::{Backend, Node, NodeBuilder, Redis, free_port, metric_sum},
    peer::Peer,
};

fn repo_file(path: &str) -> String {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

async fn scrape(node: &Node) -> String {
    reqwest::get(format!("{}/metrics", node.http()))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}

/// Scrapes until `ready` holds (the node's periodic work has run), at most 20 s.
async fn scrape_until(node: &Node, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(node).await;
        if ready(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "never saw {what}:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sample names of a scrape (`x_bucket`, `x_sum`, `x_count` for a histogram `x`).
fn series_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// `{family: type}` from the scrape's `# TYPE` lines.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.trim().to_string()))
        .collect()
}

/// Every `presence_*` / `process_*` word in a text: the metric names a query or a page uses.
fn metric_words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .filter(|w| w.starts_with("presence_") || w.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

/// `{name: type}` from docs/metrics.md's tables: rows "| `name` | type | labels | meaning |".
fn documented() -> BTreeMap<String, String> {
    repo_file("docs/metrics.md")
        .lines()
        .filter_map(|l| {
            let mut cells = l.split('|').map(str::trim).skip(1);
            let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
            let kind = cells.next()?;
            Some((name.to_string(), kind.to_string()))
        })
        .filter(|(name, _)| name.starts_with("presence_") || name.starts_with("process_"))
        .collect()
}

/// Two clients that watch each other, join a group and message it, make a few requests (one
/// refused), and a third that comes and goes; the app backend's REST calls.
async fn traffic(node: &Node) -> Vec<Peer> {
    let rest = Rest::new(node);
    assert_eq!(
        rest.put("/groups/ops", Some(json!({"join": "open"}))).await,
        204
    );
    let alice = Peer::connect(node, 0, "alice", 1).await.expect("alice");
    let bob = Peer::connect(node, 0, "bob", 5).await.expect("bob");
    assert!(bob.subscribe(vec!["alice".into()]).await);
    assert!(alice.subscribe(vec!["bob".into()]).await);
    for peer in [&alice, &bob] {
        let joined = peer
            .request(|id| ClientFrame::Join {
                id,
                group: "ops".into(),
            })
            .await;
        assert!(matches!(joined, Some(ServerFrame::Ok { .. })), "{joined:?}");
    }
    assert!(alice.set_status(Status::Busy).await);
    let ack = alice.send_group("ops", "hello").await;
    assert!(matches!(ack, Some(ServerFrame::Ack { .. })), "{ack:?}");
    let pong = bob.request(|id| ClientFrame::Ping { id }).await;
    assert!(matches!(pong, Some(ServerFrame::Pong { .. })), "{pong:?}");
    // A group name with a space: `bad_request`.
    let refused = bob
        .request(|id| ClientFrame::Join {
            id,
            group: "no such name".into(),
        })
        .await;
    assert!(
        matches!(refused, Some(ServerFrame::Error { .. })),
        "{refused:?}"
    );
    let carol = Peer::connect(node, 0, "carol", 3).await.expect("carol");
    carol.close();
    rest.presence("alice").await;
    let (status, _) = rest.get("/stats").await;
    assert_eq!(status, 200);
    vec![alice, bob]
}

#[tokio::test]
async fn a_scrape_under_traffic_passes_promtool_and_has_what_dashboard_alerts_and_docs_name() {
    let redis = Redis::start();
    // Nobody listens there: every webhook delivery fails and is retried.
    let webhook_target = format!("http://127.0.0.1:{}/hook", free_port());
    let node = NodeBuilder::new(&Backend::Redis(redis.url()))
        // Renewals and the registry's online count every second; pings every 300 ms.
        .arg("--ttl-secs=3")
        .arg("--heartbeat-ms=300")
        .arg(format!("--webhook-urls={webhook_target}"))
        .arg("--webhook-secret=metrics-test")
        .start();
    let _peers = traffic(&node).await;
    scrape_until(
        &node,
        "renewals, heartbeats, the online count, webhook retries",
        |t| {
            metric_sum(t, "presence_renewals_total") > 0.0
                && metric_sum(t, "presence_heartbeat_rtt_seconds_count") > 0.0
                && metric_sum(t, "presence_online_users") > 0.0
                && t.contains(r#"presence_webhooks_total{result="retry"}"#)
                && !t.contains(r#"presence_webhooks_total{result="retry"} 0"#)
        },
    )
    .await;

    // A Redis stall: calls in flight fail, the circuit opens and refuses, the gauge says so.
    redis.pause();
    let rest = Rest::new(&node);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let _ = tokio::time::timeout(Duration::from_millis(500), rest.get("/presence/alice")).await;
        let text = scrape(&node).await;
        if metric_sum(&text, "presence_backend_up") == 0.0
            && metric_sum(&text, "presence_backend_errors_total") > 0.0
            && metric_sum(&text, "presence_backend_refused_total") > 0.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "the stall never showed:\n{text}");
    }
    redis.resume();
    let text = scrape_until(&node, "Redis back", |t| {
        metric_sum(t, "presence_backend_up") == 1.0
    })
    .await;

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; `make promtool` installs it)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write the scrape to promtool");
    let checked = promtool.wait_with_output().expect("promtool ran");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    let exported = series_names(&text);
    for file in [
        "helm/presence-gateway/files/dashboard.json",
        "helm/presence-gateway/files/alerts.yml",
    ] {
        let missing: Vec<_> = metric_words(&repo_file(file))
            .into_iter()
            .filter(|name| !exported.contains(name))
            .collect();
        assert!(
            missing.is_empty(),
            "{file} names metrics the node does not export: {missing:?}"
        );
    }

    let docs = documented();
    for (family, kind) in families(&text) {
        assert_eq!(
            docs.get(&family),
            Some(&kind),
            "docs/metrics.md must list {family} as a {kind}"
        );
    }
    let code: BTreeSet<String> = repo_file("gateway/src/metrics.rs")
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("pub const ")?
                .split_once(": &str = \"")
        })
        .filter_map(|(_, rest)| rest.split('"').next())
        .map(str::to_string)
        .collect();
    assert!(
        code.len() > 40,
        "read only {} names from metrics.rs",
        code.len()
    );
    for name in &code {
        assert!(
            docs.contains_key(name),
            "docs/metrics.md does not list {name} (metrics.rs)"
        );
    }
    for name in docs.keys() {
        assert!(
            code.contains(name) || name.starts_with("process_"),
            "docs/metrics.md lists {name}, which metrics.rs does not define"
        );
    }
}
