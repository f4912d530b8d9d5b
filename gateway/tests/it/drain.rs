//! The drain on SIGTERM, with real node processes: `/readyz` turns 503 at once while the node
//! keeps serving and accepting for the drain delay, then clients are closed with 1001 spread over
//! the drain spread and new upgrades refused; on Redis, drained users who reconnect (to another
//! node, or to the node restarted under its id) never show offline to watchers and get no
//! `user.offline` webhook, a user with a session on another node keeps every platform, and a
//! user who does not come back goes offline (event and webhook) once the handover window ends.

use std::time::Duration;

use shared::{ClientFrame, Encoding, ServerFrame, Status};
use tokio::time::Instant;

use crate::{
    client::{Client, Closed, Rest, jwt},
    harness::{Backend, Node, NodeBuilder, Redis},
    peer::Peer,
    receiver::{PATIENCE, Receiver, SECRET},
};

/// SIGTERMs `node` without waiting; the task ends with its exit success.
fn terminate(mut node: Node) -> tokio::task::JoinHandle<bool> {
    tokio::task::spawn_blocking(move || node.terminate())
}

async fn readyz(node_http: &str) -> Option<u16> {
    let answer = reqwest::get(format!("{node_http}/readyz")).await.ok()?;
    Some(answer.status().as_u16())
}

#[tokio::test]
async fn a_draining_node_serves_until_it_closes_clients_one_after_another() {
    let node = NodeBuilder::new(&Backend::Embedded)
        .arg("--drain-delay-secs=3")
        .arg("--drain-spread-secs=4")
        .arg("--shutdown-grace-secs=12")
        .start();
    let (http, ws) = (node.http(), node.ws());
    let open = |user: &str| {
        let url = format!("{ws}?token={}", jwt(user, 1));
        async move { Client::open_url(&url, Some(Encoding::MsgPack)).await }
    };
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(Client::connect(&node, &format!("u{i}"), 1).await);
    }
    assert_eq!(readyz(&http).await, Some(200));

    let signalled = Instant::now();
    let exit = terminate(node);
    // Not ready at once (well before the delay is over)...
    while readyz(&http).await != Some(503) {
        assert!(
            signalled.elapsed() < Duration::from_secs(2),
            "/readyz stayed 200"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... while the node still serves its clients and accepts new ones.
    let mut late = open("late").await.expect("an upgrade during the delay");
    assert!(matches!(late.recv().await, ServerFrame::Welcome { .. }));
    match clients[0].request(|id| ClientFrame::Ping { id }).await {
        ServerFrame::Pong { .. } => {}
        other => panic!("expected pong, got {other:?}"),
    }
    clients.push(late);

    let (closes, mut closed) = tokio::sync::mpsc::unbounded_channel();
    for mut client in clients {
        let closes = closes.clone();
        tokio::spawn(async move {
            let code = client.closed().await;
            let _ = closes.send((code, signalled.elapsed()));
        });
    }
    let mut closed_at = Vec::new();
    while let Some((code, at)) = closed.recv().await {
        assert_eq!(code, Closed::Code(1001));
        if closed_at.is_empty() {
            // Sessions are closing: a new upgrade is refused while the rest wait for their turn.
            match open("again").await {
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status().as_u16(), 503)
                }
                other => panic!("expected 503 while closing, got {:?}", other.map(|_| ())),
            }
        }
        closed_at.push(at);
        if closed_at.len() == 5 {
            break;
        }
    }
    assert!(exit.await.expect("join"), "the node exits cleanly");
    // Lower bounds only (sleeps last at least as long as asked): nobody closed before the delay,
    // and the five closes were spread over the spread (turns at 0, 0.8, ... 3.2 s).
    assert!(closed_at[0] >= Duration::from_secs(3), "{closed_at:?}");
    assert!(
        closed_at[4] - closed_at[0] >= Duration::from_millis(3000),
        "{closed_at:?}"
    );
}

/// A node on `redis` with webhooks to `receiver`, a short TTL (the reaper runs every second) and
/// the given drain flags.
fn node_on(redis: &Redis, receiver: &Receiver, id: Option<&str>, drain: &[&str]) -> Node {
    let mut builder = NodeBuilder::new(&Backend::Redis(redis.url()))
        .arg(format!("--webhook-urls=http://{}/hook", receiver.addr))
        .arg(format!("--webhook-secret={SECRET}"))
        .arg("--ttl-secs=3");
    if let Some(id) = id {
        builder = builder.with_id(id);
    }
    for flag in drain {
        builder = builder.arg(*flag);
    }
    builder.start()
}

/// Waits until `peer`'s connection is gone (the drain closed it).
async fn until_closed(peer: &Peer) {
    let deadline = Instant::now() + PATIENCE;
    while peer.alive() {
        assert!(Instant::now() < deadline, "{} was never closed", peer.user);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ended = peer.heard.lock().expect("heard").ended.clone();
    assert_eq!(ended.as_deref(), Some("server ended it: Code(1001)"));
}

#[tokio::test]
async fn drained_users_who_reconnect_never_show_offline() {
    // Long enough for the drained node to restart and erin to reconnect on a loaded machine.
    const WINDOW: &str = "--drain-handover-secs=8";
    let redis = Redis::start();
    let receiver = Receiver::start().await;
    let drain = [
        "--drain-delay-secs=0",
        "--drain-spread-secs=1",
        WINDOW,
        "--shutdown-grace-secs=10",
    ];
    let draining = node_on(&redis, &receiver, None, &drain);
    let draining_id = draining.id.clone();
    let other = node_on(&redis, &receiver, None, &[]);
    let rest = Rest::new(&other);

    // alice comes back on the other node, erin on the drained node restarted under its id, carol
    // has a second session on the other node all along, bob does not come back.
    let mut on_draining = Vec::new();
    for (user, platform) in [("alice", 1), ("bob", 1), ("carol", 1), ("erin", 3)] {
        on_draining.push(
            Peer::connect(&draining, 0, user, platform)
                .await
                .expect("connect"),
        );
    }
    let _carol_too = Peer::connect(&other, 1, "carol", 2).await.expect("connect");
    let watched: Vec<String> = ["alice", "bob", "carol", "erin", "marker"]
        .map(String::from)
        .to_vec();
    for user in ["alice", "bob", "erin"] {
        rest.wait_presence(user, |p| p["status"] == "online").await;
    }
    rest.wait_presence("carol", |p| p["platforms"] == serde_json::json!([1, 2]))
        .await;
    let watcher = Peer::connect(&other, 1, "watcher", 5)
        .await
        .expect("connect");
    assert!(watcher.subscribe(watched).await);
    for user in ["alice", "bob", "erin"] {
        receiver
            .wait_for(&format!("user.online of {user}"), |hits| {
                hits.iter()
                    .any(|h| h.ok && h.body["user"] == user && h.body["event"] == "user.online")
                    .then_some(())
            })
            .await;
    }

    let exit = terminate(draining);
    let mut back = Vec::new();
    for peer in &on_draining {
        until_closed(peer).await;
        if peer.user == "alice" || peer.user == "carol" {
            back.push(
                Peer::connect(&other, 1, &peer.user, peer.platform)
                    .await
                    .expect("reconnect"),
            );
        }
    }
    assert!(exit.await.expect("join"), "the drained node exits cleanly");
    let restarted = node_on(&redis, &receiver, Some(&draining_id), &drain);
    back.push(
        Peer::connect(&restarted, 0, "erin", 3)
            .await
            .expect("reconnect to the restarted node"),
    );

    // bob goes offline once the window is over (the reaper of the handover publishes it)...
    let deadline = Instant::now() + PATIENCE;
    loop {
        let bob = watcher
            .heard
            .lock()
            .expect("heard")
            .latest
            .get("bob")
            .cloned();
        if bob.is_some_and(|p| p.status == Status::Offline) {
            break;
        }
        assert!(Instant::now() < deadline, "bob never went offline");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    receiver.delivered("bob", "user.offline").await;
    // ... and everything published after that reap (a user connecting now) reaches the watcher
    // and the receiver after anything the same reap could have published about the others.
    let _marker = Peer::connect(&other, 1, "marker", 4)
        .await
        .expect("connect");
    let deadline = Instant::now() + PATIENCE;
    while !watcher
        .heard
        .lock()
        .expect("heard")
        .latest
        .get("marker")
        .is_some_and(|p| p.status == Status::Online)
    {
        assert!(Instant::now() < deadline, "the marker never showed online");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    receiver.delivered("marker", "user.online").await;

    let history = watcher.heard.lock().expect("heard").history.clone();
    for user in ["alice", "carol", "erin"] {
        let history = &history[user];
        assert!(
            history.iter().all(|p| p.status == Status::Online),
            "{user} showed offline: {history:?}"
        );
    }
    assert!(
        history["carol"].iter().all(|p| p.platforms == vec![1, 2]),
        "carol kept both platforms: {:?}",
        history["carol"]
    );
    for user in ["alice", "carol", "erin"] {
        assert_eq!(receiver.attempts(user, "user.offline").len(), 0, "{user}");
        let now = rest.presence(user).await;
        assert_eq!(now["status"], "online", "{user}: {now}");
    }
    drop(restarted);
}
