//! Redis outages under two nodes: while Redis stalls or is down, connects are welcomed at once,
//! reads fail fast and `presence_backend_up` says so; once it is back (same data or empty),
//! every watcher ends with the truth and every connection made meanwhile gets its groups and
//! stored messages.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde_json::json;
use shared::{ServerFrame, Status};

use crate::{
    client::{Client, Rest},
    harness::{Backend, Node, NodeBuilder, Redis},
};

/// Waits until every node reports `presence_backend_up` = `up`; returns how long that took.
async fn wait_backend_up(nodes: &[&Node], up: bool) -> Duration {
    let started = Instant::now();
    let want = if up { 1.0 } else { 0.0 };
    for node in nodes {
        loop {
            if node.metric("presence_backend_up").await == want {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "presence_backend_up never became {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    started.elapsed()
}

/// What a watcher was last told of each user: `(status, version)`, keeping only events whose
/// version is above the last one, as the contract tells clients to.
struct Seen(BTreeMap<String, (Status, u64)>);

impl Seen {
    fn note(&mut self, user: &str, status: Status, version: u64) {
        let entry = self
            .0
            .entry(user.to_string())
            .or_insert((Status::Offline, 0));
        if version > entry.1 {
            *entry = (status, version);
        }
    }

    fn status(&self, user: &str) -> Status {
        self.0.get(user).map_or(Status::Offline, |s| s.0)
    }

    /// Reads the watcher's frames until its view equals `truth` (users online in it, every
    /// other watched user offline), or panics with the difference.
    async fn settle(&mut self, watcher: &mut Client, watched: &[String], truth: &[String]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let wrong: Vec<String> = watched
                .iter()
                .filter(|u| (self.status(u) == Status::Online) != truth.contains(u))
                .map(|u| format!("{u}: shown {:?}", self.status(u)))
                .collect();
            if wrong.is_empty() {
                return;
            }
            let frame = tokio::time::timeout_at(deadline, watcher.recv())
                .await
                .unwrap_or_else(|_| panic!("the watcher never saw the truth: {wrong:?}"));
            if let ServerFrame::Presence(p) = frame {
                self.note(&p.user, p.status, p.version);
            }
        }
    }
}

async fn watch(watcher: &mut Client, users: &[String]) -> Seen {
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    let mut seen = Seen(BTreeMap::new());
    for p in watcher.subscribe(&names).await {
        seen.note(&p.user, p.status, p.version);
    }
    seen
}

fn names(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

/// Redis stalls (SIGSTOP) for a few seconds under two nodes.
#[tokio::test]
async fn a_stalled_redis_is_noticed_and_nothing_waits_for_it() {
    let redis = Redis::start();
    let backend = Backend::Redis(redis.url());
    let a = NodeBuilder::new(&backend).start();
    let b = NodeBuilder::new(&backend).start();
    let rest_a = Rest::new(&a);
    assert_eq!(rest_a.put("/groups/crew/members/late", None).await, 204);
    assert_eq!(rest_a.put("/groups/crew/members/early", None).await, 204);
    let (status, _) = rest_a
        .post(
            "/messages",
            json!({"to": {"user": "late"}, "body": "kept for you"}),
        )
        .await;
    assert_eq!(status, 200);
    let mut early = Client::connect(&b, "early", 1).await;

    let watched = names("s", 0..6);
    let mut watcher = Client::connect(&a, "watcher", 1).await;
    let mut seen = watch(&mut watcher, &watched).await;
    let mut on_b = Vec::new();
    for user in &watched[..3] {
        on_b.push(Client::connect(&b, user, 2).await);
    }
    seen.settle(&mut watcher, &watched, &watched[..3]).await;

    redis.pause();
    let noticed = wait_backend_up(&[&a, &b], false).await;
    println!("stall noticed by both nodes after {noticed:?}");

    // A connect needs no Redis to be welcomed; its groups and stored messages follow.
    let started = Instant::now();
    let mut late = Client::connect(&a, "late", 1).await;
    let welcomed = started.elapsed();
    println!("welcomed during the stall after {welcomed:?}");
    assert!(
        welcomed < Duration::from_secs(3),
        "a connect waited {welcomed:?} for a stalled Redis"
    );
    // Reads fail fast, with the contract's error.
    let started = Instant::now();
    let (status, body) = rest_a.get("/presence/s0").await;
    let answered = started.elapsed();
    println!("REST read answered {status} after {answered:?}");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert!(answered < Duration::from_secs(3), "{answered:?}");

    // Changes during the stall.
    drop(on_b.remove(0)); // s0 leaves
    on_b.push(Client::connect(&b, "s4", 2).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    redis.resume();
    let healed = wait_backend_up(&[&a, &b], true).await;
    println!("back up on both nodes after {healed:?}");
    let truth = vec!["s1".to_string(), "s2".into(), "s4".into()];
    seen.settle(&mut watcher, &watched, &truth).await;

    // The stored message arrives, and the connection follows its group.
    let stored = late
        .expect(|f| match f {
            ServerFrame::Message(m) => Some(m.clone()),
            _ => None,
        })
        .await;
    assert_eq!(stored.body.as_str(), Some("kept for you"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = rest_a
        .post(
            "/messages",
            json!({"to": {"group": "crew"}, "body": "after the stall"}),
        )
        .await;
    assert_eq!(status, 200);
    for client in [&mut late, &mut early] {
        let message = client
            .expect(|f| match f {
                ServerFrame::Message(m) if m.body.as_str() == Some("after the stall") => {
                    Some(m.clone())
                }
                _ => None,
            })
            .await;
        assert_eq!(message.from, "system");
    }
}

/// Redis killed, then restarted empty: no watcher keeps a ghost, and users who came or went
/// during the outage are announced, even those of a node that died meanwhile (nobody is left to
/// say they left: the watchers' nodes find out by re-reading).
#[tokio::test]
async fn after_redis_comes_back_empty_every_watcher_sees_the_truth() {
    let mut redis = Redis::start();
    let backend = Backend::Redis(redis.url());
    let a = NodeBuilder::new(&backend).start();
    let b = NodeBuilder::new(&backend).start();
    let mut c = NodeBuilder::new(&backend).start();
    let watched = names("u", 0..16);
    let mut watchers = vec![
        Client::connect(&a, "watcher-a", 1).await,
        Client::connect(&b, "watcher-b", 1).await,
    ];
    let mut seen = Vec::new();
    for watcher in &mut watchers {
        seen.push(watch(watcher, &watched).await);
    }
    let mut connected: BTreeMap<String, Client> = BTreeMap::new();
    for (i, user) in watched[..8].iter().enumerate() {
        let node = if i % 2 == 0 { &a } else { &b };
        connected.insert(user.clone(), Client::connect(node, user, 1).await);
    }
    let mut doomed = Vec::new();
    for user in &watched[14..] {
        doomed.push(Client::connect(&c, user, 1).await);
    }
    let before: Vec<String> = watched[..8].iter().chain(&watched[14..]).cloned().collect();
    for (watcher, seen) in watchers.iter_mut().zip(&mut seen) {
        seen.settle(watcher, &watched, &before).await;
    }

    redis.stop();
    wait_backend_up(&[&a, &b], false).await;
    c.kill();
    drop(doomed);
    // During the outage: four leave, six arrive (on both nodes).
    for user in &watched[..4] {
        connected.remove(user);
    }
    for (i, user) in watched[8..14].iter().enumerate() {
        let node = if i % 2 == 0 { &a } else { &b };
        let started = Instant::now();
        connected.insert(user.clone(), Client::connect(node, user, 1).await);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a connect during the outage waited {:?}",
            started.elapsed()
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart_empty();

    let truth: Vec<String> = connected.keys().cloned().collect();
    for (watcher, seen) in watchers.iter_mut().zip(&mut seen) {
        seen.settle(watcher, &watched, &truth).await;
    }
    for node in [&a, &b] {
        let rest = Rest::new(node);
        for user in &watched {
            let online = truth.contains(user);
            rest.wait_presence(user, |p| (p["status"] == "online") == online)
                .await;
        }
    }
}
