//! Webhooks: a receiver in the test process (checks signatures, records every attempt, fails on
//! demand) and gateway nodes on the embedded backend and on Redis. Every transition arrives
//! signed with an event id; failures are retried with the same id; a killed node's events are
//! delivered by another node; what the retry time cannot deliver is given up and counted; the
//! queue's bound refuses and counts.

use std::{collections::HashMap, sync::atomic::Ordering, time::Duration};

use serde_json::json;
use tokio::time::Instant;

use crate::{
    client::{Client, Rest},
    harness::{Backend, Node, NodeBuilder, Redis, RedisCluster},
    receiver::{PATIENCE, Receiver, SECRET},
};

fn node(backend: &Backend, receiver: &Receiver, extra: &[&str]) -> Node {
    let mut builder = NodeBuilder::new(backend)
        .arg(format!("--webhook-urls=http://{}/hook", receiver.addr))
        .arg(format!("--webhook-secret={SECRET}"));
    for arg in extra {
        builder = builder.arg(*arg);
    }
    builder.start()
}

/// The sum of `name`'s samples whose labels include `label` (`result="given_up"`).
async fn metric_with(node: &Node, name: &str, label: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", node.http()))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_metric(node: &Node, name: &str, label: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let value = metric_with(node, name, label).await;
        if value >= at_least {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{{{label}}} stayed at {value}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Online, offline and kicked, each once, signed, with an event id that is also the body's `id`.
async fn transitions_arrive_signed_with_event_ids(backend: Backend) {
    let receiver = Receiver::start().await;
    let node = node(&backend, &receiver, &[]);
    let client = Client::connect(&node, "alice", 3).await;
    let online = receiver.delivered("alice", "user.online").await;
    client.close().await;
    let offline = receiver.delivered("alice", "user.offline").await;
    let _again = Client::connect(&node, "alice", 1).await;
    receiver
        .wait_for("the second online", |hits| {
            (hits
                .iter()
                .filter(|h| h.body["event"] == "user.online")
                .count()
                == 2)
                .then_some(())
        })
        .await;
    let (status, _) = Rest::new(&node)
        .post("/users/alice/disconnect", json!({"reason": "bye"}))
        .await;
    assert_eq!(status, 202);
    let kicked = receiver.delivered("alice", "user.kicked").await;
    assert_eq!(kicked.body["reason"], "bye");

    assert_eq!(online.body["platforms"], json!([3]));
    assert_eq!(offline.body["platforms"], json!([3]));
    assert_eq!(online.body["node"], node.id.as_str());
    for hit in [&online, &offline, &kicked] {
        assert!(hit.signed, "{hit:?}");
        assert_eq!(hit.id.len(), 32, "{hit:?}");
        assert_eq!(hit.body["id"], hit.id.as_str(), "{hit:?}");
    }
    let ids: std::collections::HashSet<String> =
        receiver.hits().into_iter().map(|h| h.id).collect();
    assert_eq!(
        ids.len(),
        receiver.hits().len(),
        "one id per event, each once"
    );
}

#[tokio::test]
async fn transitions_arrive_signed_with_event_ids_on_the_embedded_backend() {
    transitions_arrive_signed_with_event_ids(Backend::Embedded).await;
}

#[tokio::test]
async fn transitions_arrive_signed_with_event_ids_on_redis() {
    let redis = Redis::start();
    transitions_arrive_signed_with_event_ids(Backend::Redis(redis.url())).await;
}

/// The stream is one key, so every command lands on its slot's master (XREADGROUP is routed by
/// its key, not its first argument).
#[tokio::test]
async fn transitions_arrive_signed_with_event_ids_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    transitions_arrive_signed_with_event_ids(Backend::Cluster(cluster.seeds())).await;
}

#[tokio::test]
async fn failed_attempts_are_retried_with_the_same_event_id() {
    let redis = Redis::start();
    let receiver = Receiver::start().await;
    receiver.state.fail_first.store(2, Ordering::SeqCst);
    let node = node(&Backend::Redis(redis.url()), &receiver, &[]);
    let _client = Client::connect(&node, "bob", 1).await;
    let delivered = receiver.delivered("bob", "user.online").await;
    let attempts = receiver.attempts("bob", "user.online");
    assert_eq!(attempts.len(), 3, "{attempts:#?}");
    assert!(attempts.iter().all(|a| a.id == delivered.id && a.signed));
    assert_eq!(
        attempts.iter().map(|a| a.ok).collect::<Vec<_>>(),
        [false, false, true]
    );
    assert!(
        attempts[2].when - attempts[1].when >= Duration::from_millis(150),
        "backoff between retries"
    );
    assert!(metric_with(&node, "presence_webhooks_total", r#"result="retry""#).await >= 2.0);
    // Delivered and acked: the queue is empty again.
    assert_eq!(redis.cli(&["XLEN", "{presence}:wh"]).trim(), "0");
}

/// Node A holds its users' online events, retrying against a failing receiver, and is killed.
/// Node B takes the events over after the claim timeout (the TTL) and delivers them, with A's
/// event ids; as A's reaper it also sends the offline events.
#[tokio::test]
async fn a_killed_nodes_webhooks_are_delivered_by_another_node() {
    let redis = Redis::start();
    let backend = Backend::Redis(redis.url());
    let receiver = Receiver::start().await;
    receiver.set_down(true);
    let extra = ["--ttl-secs=3"];
    let mut a = node(&backend, &receiver, &extra);
    let users = ["k1", "k2", "k3"];
    let mut clients = Vec::new();
    for user in users {
        clients.push(Client::connect(&a, user, 1).await);
    }
    let ids: HashMap<&str, String> = receiver
        .wait_for("an attempt at every online event", |hits| {
            let ids: HashMap<&str, String> = users
                .iter()
                .filter_map(|u| {
                    let hit = hits
                        .iter()
                        .find(|h| h.body["user"] == *u && h.body["event"] == "user.online")?;
                    Some((*u, hit.id.clone()))
                })
                .collect();
            (ids.len() == users.len()).then_some(ids)
        })
        .await;
    a.kill();
    drop(clients);
    let killed_at = Instant::now();
    receiver.set_down(false);

    let _b = node(&backend, &receiver, &extra);
    for user in users {
        let hit = receiver.delivered(user, "user.online").await;
        assert_eq!(hit.id, ids[user], "the event id A used");
        assert!(hit.when > killed_at);
        assert_eq!(hit.body["node"], a.id.as_str(), "the event is A's");
        let offline = receiver.delivered(user, "user.offline").await;
        assert!(offline.signed);
    }
}

/// Nothing takes the event within the retry time: given up, counted, logged, and gone from the
/// queue.
async fn undeliverable_events_are_given_up(backend: Backend) -> Node {
    let receiver = Receiver::start().await;
    receiver.set_down(true);
    let node = node(&backend, &receiver, &["--webhook-retry-secs=1"]);
    let _client = Client::connect(&node, "gina", 1).await;
    wait_metric(
        &node,
        "presence_webhooks_total",
        r#"result="given_up""#,
        1.0,
    )
    .await;
    let attempts = receiver.attempts("gina", "user.online");
    assert!(
        attempts.len() >= 2,
        "retried before giving up: {attempts:#?}"
    );
    assert!(attempts.iter().all(|a| a.id == attempts[0].id));
    let deadline = Instant::now() + PATIENCE;
    while !node.logs().contains("webhook given up") {
        assert!(Instant::now() < deadline, "no log line: {}", node.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node
}

#[tokio::test]
async fn undeliverable_events_are_given_up_on_the_embedded_backend() {
    undeliverable_events_are_given_up(Backend::Embedded).await;
}

#[tokio::test]
async fn undeliverable_events_are_given_up_on_redis() {
    let redis = Redis::start();
    let _node = undeliverable_events_are_given_up(Backend::Redis(redis.url())).await;
    let deadline = Instant::now() + PATIENCE;
    while redis.cli(&["XLEN", "{presence}:wh"]).trim() != "0" {
        assert!(Instant::now() < deadline, "given up but still queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `PRESENCE_WEBHOOK_QUEUE_MAX` bounds what waits (the receiver is down, nothing leaves): the
/// newest events are refused and counted.
async fn the_queue_is_bounded(backend: Backend) {
    let receiver = Receiver::start().await;
    receiver.set_down(true);
    let node = node(&backend, &receiver, &["--webhook-queue-max=2"]);
    let mut clients = Vec::new();
    for user in ["q1", "q2", "q3", "q4", "q5"] {
        clients.push(Client::connect(&node, user, 1).await);
    }
    wait_metric(
        &node,
        "presence_webhooks_total",
        r#"result="queue_full""#,
        3.0,
    )
    .await;
    let ids: std::collections::HashSet<String> =
        receiver.hits().into_iter().map(|h| h.id).collect();
    assert!(ids.len() <= 2, "only the queued events are tried: {ids:?}");
    assert_eq!(
        metric_with(&node, "presence_webhooks_total", r#"result="queue_full""#).await,
        3.0
    );
}

#[tokio::test]
async fn the_queue_is_bounded_on_the_embedded_backend() {
    the_queue_is_bounded(Backend::Embedded).await;
}

#[tokio::test]
async fn the_queue_is_bounded_on_redis() {
    let redis = Redis::start();
    the_queue_is_bounded(Backend::Redis(redis.url())).await;
}
