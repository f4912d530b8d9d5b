//! Faults under traffic: a Redis Cluster master killed (its replica takes over) and a gateway node
//! SIGKILLed while messages flow. docs/ARCHITECTURE.md ("Faults") states what each keeps.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use shared::{ClientFrame, Destination, RouteResult, ServerFrame, Status};
use tokio::time::Instant;

use crate::{
    client::Rest,
    harness::{Backend, Node, NodeBuilder, Redis, RedisCluster},
    peer::Peer,
};

/// Long enough for a node's SSUBSCRIBE calls to be acknowledged after a `subscribe` answered.
const SUBSCRIBED: Duration = Duration::from_secs(1);

/// Polls `check` until it passes; panics with its last complaint after `within`.
pub async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> Result<(), String>) {
    let deadline = Instant::now() + within;
    loop {
        let outcome = check().await;
        match outcome {
            Ok(()) => return,
            Err(why) if Instant::now() >= deadline => panic!("after {within:?}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// What `POST /v1/presence/query` on `node` answers for `users`: user → (status, platforms).
pub async fn presence_on(
    node: &Node,
    users: &[String],
) -> Result<BTreeMap<String, (String, Vec<u8>)>, String> {
    let (status, body) = Rest::new(node)
        .post("/presence/query", json!({ "users": users }))
        .await;
    if status != 200 {
        return Err(format!("presence query on {}: {status} {body}", node.id));
    }
    let items = body["items"].as_array().cloned().unwrap_or_default();
    Ok(items
        .iter()
        .map(|p| {
            let platforms = p["platforms"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_u64().map(|v| v as u8))
                        .collect()
                })
                .unwrap_or_default();
            (
                p["user"].as_str().unwrap_or_default().to_string(),
                (
                    p["status"].as_str().unwrap_or_default().to_string(),
                    platforms,
                ),
            )
        })
        .collect())
}

/// The name a status has on the wire.
pub fn status_name(status: Status) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// Every message id in a group's history, through `GET /v1/groups/{g}/history` pages.
pub async fn history_ids(rest: &Rest, group: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut since = String::new();
    loop {
        let path = if since.is_empty() {
            format!("/groups/{group}/history?limit=100")
        } else {
            format!("/groups/{group}/history?limit=100&since={since}")
        };
        let (status, body) = rest.get(&path).await;
        assert_eq!(status, 200, "{body}");
        let page: Vec<String> = body["messages"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["msg_id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        ids.extend(page.iter().cloned());
        match page.last() {
            Some(last) if body["more"] == Value::Bool(true) => since = last.clone(),
            _ => return ids,
        }
    }
}

/// Every watcher's latest event per user, and every node's answer, equal `expected`.
async fn presence_is(
    nodes: &[&Node],
    watchers: &[Peer],
    expected: &BTreeMap<String, (String, Vec<u8>)>,
) -> Result<(), String> {
    let users: Vec<String> = expected.keys().cloned().collect();
    let mut wrong = Vec::new();
    for node in nodes {
        let got = presence_on(node, &users).await?;
        for (user, want) in expected {
            if got.get(user) != Some(want) {
                wrong.push(format!(
                    "node {}: {user} expected {want:?}, got {:?}",
                    node.id,
                    got.get(user)
                ));
            }
        }
    }
    for w in watchers {
        let heard = w.heard.lock().expect("heard");
        for (user, want) in expected {
            let got = heard
                .latest
                .get(user)
                .map(|p| (status_name(p.status), p.platforms.clone()));
            if got.as_ref() != Some(want) {
                wrong.push(format!(
                    "watcher {}: {user} expected {want:?}, got {got:?}",
                    w.user
                ));
            }
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} differences:\n{}",
            wrong.len(),
            wrong.join("\n")
        ))
    }
}

/// The channel of the failover test's group `gf` (whose members are on all three nodes).
const GROUP_CHANNEL: &str = "presence:gm:{gf}";

/// A master of a 3-master cluster with replicas is SIGKILLed while statuses change on every
/// node: its replica takes over, and without a restart the nodes follow the new topology, their
/// sharded subscriptions (presence events, the group's channel) come back, and presence on every
/// node and at every watcher is the truth afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_under_traffic_keeps_presence_right() {
    let mut cluster = RedisCluster::start_with_replicas(1000);
    let backend = Backend::Cluster(cluster.seeds());
    let n: Vec<Node> = (0..3)
        .map(|_| NodeBuilder::new(&backend).arg("--ttl-secs=6").start())
        .collect();
    let users: Vec<String> = (0..30).map(|i| format!("f{i}")).collect();
    // Watchers subscribe before the users come: a `presence_list` read before the node's
    // SSUBSCRIBE is acknowledged misses a change published in between (reported, not this
    // test's subject), so the test lets the subscriptions land first.
    let mut watchers = Vec::new();
    for (k, node) in n.iter().enumerate() {
        let w = Peer::connect(node, k, &format!("watch{k}"), 1)
            .await
            .expect("connect");
        assert!(w.subscribe(users.clone()).await, "subscribe");
        watchers.push(w);
    }
    tokio::time::sleep(SUBSCRIBED).await;
    let mut peers = Vec::new();
    for (i, user) in users.iter().enumerate() {
        peers.push(
            Peer::connect(&n[i % 3], i % 3, user, 1)
                .await
                .expect("connect"),
        );
    }
    let rest = Rest::new(&n[0]);
    for member in ["f1", "f2", "f3"] {
        assert_eq!(
            rest.put(&format!("/groups/gf/members/{member}"), None)
                .await,
            204
        );
    }
    let mut expected: BTreeMap<String, (String, Vec<u8>)> = users
        .iter()
        .map(|u| (u.clone(), ("online".to_string(), vec![1])))
        .collect();
    let all: Vec<&Node> = n.iter().collect();
    eventually(Duration::from_secs(20), async || {
        presence_is(&all, &watchers, &expected).await
    })
    .await;

    // Traffic: every user flips between busy and online until told to stop.
    let peers = Arc::new(peers);
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn({
        let (peers, stop) = (peers.clone(), stop.clone());
        async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let status = if round.is_multiple_of(2) {
                    Status::Busy
                } else {
                    Status::Online
                };
                futures_util::future::join_all(peers.iter().map(|p| p.set_status(status))).await;
                round += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            round
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The master holding the group's channel goes, so its subscription has to move too.
    let victim = cluster.owner_of(GROUP_CHANNEL);
    let killed_at = Instant::now();
    cluster.kill(victim);
    // Blocks this worker only; the peers and the traffic run on the other.
    let took = tokio::task::block_in_place(|| {
        cluster.wait_healthy(3, 0);
        killed_at.elapsed()
    });
    eprintln!("failover: master {victim} killed; cluster ok again after {took:?}");
    assert_ne!(cluster.owner_of(GROUP_CHANNEL), victim);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let rounds = traffic.await.expect("traffic");
    assert!(rounds > 2, "{rounds} rounds of traffic");

    // After the failover: final statuses, a few users leave, new ones come.
    for (i, p) in peers.iter().enumerate() {
        let status = if i.is_multiple_of(2) {
            Status::Away
        } else {
            Status::Busy
        };
        assert!(p.set_status(status).await, "{} set_status", p.user);
        expected.insert(p.user.clone(), (status_name(status), vec![1]));
    }
    for p in peers.iter().step_by(5) {
        p.close();
        expected.insert(p.user.clone(), ("offline".to_string(), vec![]));
    }
    let late_users: Vec<String> = (0..6).map(|i| format!("late{i}")).collect();
    for w in &watchers {
        assert!(w.subscribe(late_users.clone()).await, "subscribe");
    }
    tokio::time::sleep(SUBSCRIBED).await;
    let mut late = Vec::new();
    for (i, user) in late_users.iter().enumerate() {
        late.push(
            Peer::connect(&n[i % 3], i % 3, user, 2)
                .await
                .expect("connect"),
        );
        expected.insert(user.clone(), ("online".to_string(), vec![2]));
    }
    if std::env::var("FAULTS_DEBUG").is_ok() {
        tokio::time::sleep(Duration::from_secs(5)).await;
        for node in &n {
            let logs = node.logs();
            let lines: Vec<&str> = logs
                .lines()
                .filter(|l| {
                    l.contains("WARN")
                        || l.contains("ERROR")
                        || l.contains("econnect")
                        || l.contains("ubscri")
                        || l.contains("SSUBSCRIBE")
                        || l.contains("resync")
                        || l.contains("re-read")
                })
                .collect();
            eprintln!("---- {}\n{}", node.id, lines.join("\n"));
        }
    }
    eventually(Duration::from_secs(30), async || {
        presence_is(&all, &watchers, &expected).await
    })
    .await;

    // Group messages still reach members on every node through the moved channel.
    let ack = peers[1].send_group("gf", "after failover").await;
    let Some(ServerFrame::Ack { msg_id, result, .. }) = ack else {
        panic!("send after failover: {ack:?}");
    };
    assert_eq!(result, RouteResult::Delivered);
    eventually(Duration::from_secs(10), async || {
        let missing: Vec<&str> = [&peers[2], &peers[3]]
            .iter()
            .filter(|p| !p.heard.lock().expect("heard").messages.contains(&msg_id))
            .map(|p| p.user.as_str())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("{msg_id} missing at {missing:?}"))
        }
    })
    .await;
}

/// A node SIGKILLed while its clients and others send: what was acknowledged is kept (group
/// history, private messages stored for an offline user, live delivery to members that stayed on
/// other nodes); what the dead node's own connections had not yet received live is gone with them.
#[tokio::test]
async fn node_crash_under_message_traffic_keeps_what_was_acknowledged() {
    let redis = Redis::start();
    let backend = Backend::Redis(redis.url());
    let mut n: Vec<Node> = (0..3)
        .map(|_| {
            NodeBuilder::new(&backend)
                .arg("--ttl-secs=3")
                .arg("--rate-limit=100000")
                .arg("--store-quota-messages=100000")
                .start()
        })
        .collect();
    let rest = Rest::new(&n[1]);
    let members = ["m0", "m1", "m2", "s0", "s1"];
    for m in members {
        assert_eq!(
            rest.put(&format!("/groups/crash/members/{m}"), None).await,
            204
        );
    }
    // Senders s0 (on the doomed node 0) and s1 (node 1); members m0..m2 on nodes 0..2.
    let mut peers = Vec::new();
    for (i, user) in members.iter().enumerate() {
        let node = if *user == "s0" {
            0
        } else if *user == "s1" {
            1
        } else {
            i
        };
        peers.push(Arc::new(
            Peer::connect(&n[node], node, user, 1)
                .await
                .expect("connect"),
        ));
    }
    let sender = |p: Arc<Peer>, stop: Arc<AtomicBool>| {
        tokio::spawn(async move {
            let (mut group_acks, mut stored_acks, mut unanswered) = (Vec::new(), Vec::new(), 0u32);
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) && p.alive() {
                i += 1;
                let ack = p.send_group("crash", &format!("{} {i}", p.user)).await;
                match ack {
                    Some(ServerFrame::Ack { msg_id, result, .. }) => {
                        group_acks.push((msg_id, result))
                    }
                    _ => unanswered += 1,
                }
                let to = Destination::User {
                    user: "away".into(),
                };
                let body = shared::Body::from(format!("{} private {i}", p.user));
                let ack = p
                    .request(move |id| ClientFrame::Send {
                        id,
                        to,
                        body,
                        client_msg_id: None,
                    })
                    .await;
                match ack {
                    Some(ServerFrame::Ack {
                        msg_id,
                        result: RouteResult::Stored,
                        ..
                    }) => stored_acks.push(msg_id),
                    Some(other) => panic!("private send: {other:?}"),
                    None => unanswered += 1,
                }
            }
            (group_acks, stored_acks, unanswered)
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let doomed = sender(peers[3].clone(), stop.clone());
    let survivor = sender(peers[4].clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;
    n[0].kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (doomed_group, doomed_stored, doomed_unanswered) = doomed.await.expect("sender on node 0");
    let (survivor_group, survivor_stored, _) = survivor.await.expect("sender on node 1");
    assert!(
        !peers[0].alive() && !peers[3].alive(),
        "node 0's connections end with it"
    );
    eprintln!(
        "node crash: sender on the killed node had {} group and {} private acks, {} requests unanswered; \
         the survivor {} and {}",
        doomed_group.len(),
        doomed_stored.len(),
        doomed_unanswered,
        survivor_group.len(),
        survivor_stored.len()
    );
    assert!(!doomed_group.is_empty() && !survivor_group.is_empty());

    // Kept: every acknowledged group message is in the history...
    let history: HashSet<String> = history_ids(&rest, "crash").await.into_iter().collect();
    for (msg_id, _) in doomed_group.iter().chain(&survivor_group) {
        assert!(
            history.contains(msg_id),
            "acknowledged {msg_id} missing from history"
        );
    }
    // ...and reached the members that stayed connected, when it was acknowledged as delivered.
    for member in [&peers[1], &peers[2]] {
        let heard = member.heard.lock().expect("heard");
        let missing: Vec<&String> = doomed_group
            .iter()
            .chain(&survivor_group)
            .filter(|(_, r)| *r == RouteResult::Delivered)
            .map(|(id, _)| id)
            .filter(|id| !heard.messages.contains(*id))
            .collect();
        assert!(missing.is_empty(), "{} missed {missing:?}", member.user);
    }
    // Kept: private messages stored for the offline user arrive when they connect.
    let away = Peer::connect(&n[2], 2, "away", 1).await.expect("connect");
    eventually(Duration::from_secs(10), async || {
        let heard = away.heard.lock().expect("heard");
        let missing: Vec<&String> = doomed_stored
            .iter()
            .chain(&survivor_stored)
            .filter(|id| !heard.messages.contains(*id))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("stored messages missing: {missing:?}"))
        }
    })
    .await;
    // Presence: the dead node's users go offline once its entries expire and it is reaped.
    for user in ["m0", "s0"] {
        rest.wait_presence(user, |p| p["status"] == "offline").await;
    }
}
