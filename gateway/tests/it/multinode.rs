//! Many nodes on one Redis and on a Redis Cluster: presence across nodes, crash reaping, batched
//! round trips, and recovery after Redis comes back empty (with the last chosen status).

use std::time::Duration;

use serde_json::Value;
use shared::{ClientFrame, ServerFrame, Status};

use crate::{
    client::{Client, Rest},
    harness::{Backend, Node, NodeBuilder, Redis, RedisCluster},
    peer::Peer,
};

fn nodes(backend: &Backend, n: usize, extra: &[&str]) -> Vec<Node> {
    (0..n)
        .map(|_| {
            let mut builder = NodeBuilder::new(backend);
            for arg in extra {
                builder = builder.arg(*arg);
            }
            builder.start()
        })
        .collect()
}

/// A user on node A (platform 1) and node B (platform 2), watched from node C.
async fn presence_spans_nodes(backend: Backend) {
    let n = nodes(&backend, 3, &[]);
    let mut watcher = Client::connect(&n[2], "carol", 5).await;
    assert_eq!(
        watcher.subscribe(&["alice"]).await[0].status,
        Status::Offline
    );

    let on_a = Client::connect(&n[0], "alice", 1).await;
    let on_b = Client::connect(&n[1], "alice", 2).await;
    let mut last_version = 0;
    loop {
        let p = watcher.presence_of("alice").await;
        assert!(p.version > last_version);
        last_version = p.version;
        if p.platforms == vec![1, 2] {
            break;
        }
    }
    for node in &n {
        let body = Rest::new(node)
            .wait_presence("alice", |p| p["platforms"] == serde_json::json!([1, 2]))
            .await;
        assert_eq!(body["status"], "online");
    }

    on_a.close().await;
    let p = watcher.presence_of("alice").await;
    assert_eq!((p.status, p.platforms.clone()), (Status::Online, vec![2]));
    assert!(p.version > last_version);
    last_version = p.version;
    on_b.close().await;
    let p = watcher.presence_of("alice").await;
    assert_eq!(p.status, Status::Offline);
    assert!(p.version > last_version && p.last_seen.is_some());

    let (_, nodes_body) = Rest::new(&n[0]).get("/nodes").await;
    assert_eq!(nodes_body["nodes"].as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn presence_spans_nodes_on_one_redis() {
    let redis = Redis::start();
    presence_spans_nodes(Backend::Redis(redis.url())).await;
}

#[tokio::test]
async fn presence_spans_nodes_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    presence_spans_nodes(Backend::Cluster(cluster.seeds())).await;
}

/// A node killed without a word: its users go offline within the TTL plus one renewal interval,
/// and every subscriber elsewhere hears it exactly once per user.
async fn killed_node_is_reaped(backend: Backend) {
    let mut n = nodes(&backend, 3, &["--ttl-secs=3"]);
    let users = ["u1", "u2", "u3"];
    let mut doomed = Vec::new();
    for user in users {
        doomed.push(Client::connect(&n[0], user, 2).await);
    }
    let mut w1 = Client::connect(&n[1], "w1", 1).await;
    let mut w2 = Client::connect(&n[2], "w2", 1).await;
    let rest = Rest::new(&n[1]);
    for user in users {
        rest.wait_presence(user, |p| p["status"] == "online").await;
    }
    w1.subscribe(&users).await;
    w2.subscribe(&users).await;

    n[0].kill();
    drop(doomed);
    let killed_at = tokio::time::Instant::now();
    for user in users {
        rest.wait_presence(user, |p| p["status"] == "offline").await;
    }
    // TTL 3 s plus one renewal interval (1 s), with slack for a loaded machine.
    assert!(
        killed_at.elapsed() < Duration::from_secs(8),
        "took {:?}",
        killed_at.elapsed()
    );

    for watcher in [&mut w1, &mut w2] {
        for _ in users {
            let p = watcher
                .expect(|f| match f {
                    shared::ServerFrame::Presence(p) => Some(p.clone()),
                    _ => None,
                })
                .await;
            assert_eq!(p.status, Status::Offline, "{p:?}");
        }
        // Exactly once: nothing more arrives about them (reaping ran on one node only).
        watcher.expect_silence(Duration::from_secs(3)).await;
    }
    assert!(
        Rest::new(&n[2]).get("/nodes").await.1["nodes"]
            .as_array()
            .map(Vec::len)
            == Some(2)
    );
    // The reaper took them out of the counts and the online list too.
    let (_, stats) = rest.get("/stats").await;
    assert_eq!(stats["online_users"], 2, "w1 and w2: {stats}");
    assert_eq!(stats["by_platform"], serde_json::json!({"1": 2}));
    let (_, page) = rest.get("/online").await;
    assert_eq!(page["users"], serde_json::json!(["w1", "w2"]));
}

/// A node SIGKILLed while its clients come and go (some of its flushes cut between `write.lua`
/// and the index step): once it is reaped, `GET /v1/stats` and the full `GET /v1/online` walk on
/// the survivor say exactly who is connected there.
async fn counts_are_exact_after_a_node_dies_mid_churn(backend: Backend) {
    let mut n = nodes(&backend, 2, &["--ttl-secs=3", "--batch-interval-ms=20"]);
    let mut steady = Vec::new();
    for i in 0..4 {
        steady.push(Client::connect(&n[1], &format!("steady{i}"), 1 + i as u8).await);
    }
    let doomed = n[0].ws();
    let churn = tokio::spawn(async move {
        let mut held = std::collections::VecDeque::new();
        for i in 0.. {
            let user = format!("churn{}", i % 40);
            let url = format!("{doomed}?token={}", crate::client::jwt(&user, 2));
            match Client::open_url(&url, None).await {
                Ok(client) => held.push_back(client),
                Err(_) => return i,
            }
            if held.len() > 10 {
                held.pop_front();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        0
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    n[0].kill();
    let attempts = churn.await.expect("churn task");
    assert!(attempts > 20, "the churn ran: {attempts} connects");
    let rest = Rest::new(&n[1]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, stats) = rest.get("/stats").await;
        assert_eq!(status, 200, "{stats}");
        if stats["online_users"] == 4 {
            assert_eq!(
                stats["by_platform"],
                serde_json::json!({"1": 1, "2": 1, "3": 1, "4": 1}),
                "{stats}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "counts never came back to the 4 steady users: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, page) = rest.get("/online?limit=2").await;
    let (_, rest_page) = rest
        .get(&format!(
            "/online?limit=2&cursor={}",
            page["next_cursor"].as_str().unwrap_or("")
        ))
        .await;
    assert_eq!(page["users"], serde_json::json!(["steady0", "steady1"]));
    assert_eq!(
        rest_page["users"],
        serde_json::json!(["steady2", "steady3"])
    );
    assert_eq!(rest_page["next_cursor"], Value::Null);
    for i in 0..40 {
        let p = rest.presence(&format!("churn{i}")).await;
        assert_eq!(p["status"], "offline", "churn{i}: {p}");
    }
}

#[tokio::test]
async fn counts_are_exact_after_a_node_dies_mid_churn_on_one_redis() {
    let redis = Redis::start();
    counts_are_exact_after_a_node_dies_mid_churn(Backend::Redis(redis.url())).await;
}

#[tokio::test]
async fn counts_are_exact_after_a_node_dies_mid_churn_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    counts_are_exact_after_a_node_dies_mid_churn(Backend::Cluster(cluster.seeds())).await;
}

#[tokio::test]
async fn killed_node_is_reaped_on_one_redis() {
    let redis = Redis::start();
    killed_node_is_reaped(Backend::Redis(redis.url())).await;
}

#[tokio::test]
async fn killed_node_is_reaped_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    killed_node_is_reaped(Backend::Cluster(cluster.seeds())).await;
}

/// 300 users connecting within one second cost a few pipelines, not 300 round trips, and a few
/// script calls: a storm spends the budget of early flushes (1 a second here) at once and then
/// batches; a batch is one round trip on one Redis (`write.lua` writes the online index too).
#[tokio::test]
async fn flush_round_trips_grow_with_batches_not_changes() {
    let redis = Redis::start();
    let node = NodeBuilder::new(&Backend::Redis(redis.url()))
        .arg("--shards=1")
        .arg("--batch-interval-ms=1000")
        .arg("--batch-max=100")
        .arg("--early-flushes-per-sec=1")
        .start();
    let trips_before = node
        .metric("presence_backend_round_trips_total{op=\"flush\"}")
        .await;
    let renew_trips_before = node
        .metric("presence_backend_round_trips_total{op=\"renew\"}")
        .await;
    let renewed_before = node.metric("presence_renewals_total{result=\"ok\"}").await;
    let repair_trips_before = node
        .metric("presence_backend_round_trips_total{op=\"repair\"}")
        .await;
    let evals_before = redis.command_calls("evalsha");
    let started = tokio::time::Instant::now();
    // Connect concurrently, so the changes land close together even on a loaded machine.
    let connects = (0..300).map(|i| {
        let node = &node;
        async move { Client::connect(node, &format!("user-{i}"), 1).await }
    });
    let _clients = futures_util::future::join_all(connects).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while node.metric("presence_writes_total").await < 300.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "300 changes never flushed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let writes = node.metric("presence_writes_total").await;
    let trips = node
        .metric("presence_backend_round_trips_total{op=\"flush\"}")
        .await
        - trips_before;
    let evals = redis.command_calls("evalsha") - evals_before;
    // A renewal round (its start is jittered) may fall into the window; it runs the same script.
    let renew_trips = node
        .metric("presence_backend_round_trips_total{op=\"renew\"}")
        .await
        - renew_trips_before;
    let renewed = node.metric("presence_renewals_total{result=\"ok\"}").await - renewed_before;
    // The index repair walk runs a step a second: a page script and an index script at most.
    let repair_trips = node
        .metric("presence_backend_round_trips_total{op=\"repair\"}")
        .await
        - repair_trips_before;
    assert!(writes >= 300.0, "writes {writes}");
    // On one Redis a script call carries up to 6 status changes or 3 users coming online (their
    // index entries too, in the same call), so a pipeline of n users makes between ceil(n / 6)
    // and ceil(n / 3) `write.lua` calls and no `index.lua` (`write.rs`: WRITE_CALL_UNITS);
    // renewals count as users coming online.
    let fewest = (writes / 6.0).ceil();
    let most = (writes / 3.0).ceil() + trips + (renewed / 3.0 + renew_trips) + 2.0 * repair_trips;
    assert!(
        evals as f64 >= fewest && evals as f64 <= most,
        "{evals} script calls for {writes} changes in {trips} round trips"
    );
    // A batch is cut at 100 changes or 1 s after its first: 300 changes cost 3 full batches plus
    // at most one timer-cut batch per second the connects took (a loaded machine connects
    // slower), and the early flushes of the budget (a burst of 1, then 1 a second); one round
    // trip each.
    let early = node.metric("presence_early_flushes_total").await;
    assert!(early <= elapsed.ceil() + 1.0, "{early} early flushes");
    let bound = (writes / 100.0).ceil() + elapsed.ceil() + 1.0 + early;
    assert!(
        trips <= bound,
        "{trips} flush round trips for {writes} changes in {elapsed:.1} s (bound {bound})"
    );
    assert!(
        (trips - early) / writes <= 0.04,
        "{} round trips per change besides {early} early flushes",
        (trips - early) / writes
    );
}

/// Redis restarted empty under two nodes: within seconds presence again equals who is connected.
#[tokio::test]
async fn presence_recovers_after_redis_restarts_empty() {
    let mut redis = Redis::start();
    let backend = Backend::Redis(redis.url());
    let n = nodes(&backend, 2, &["--ttl-secs=6"]);
    let mut clients = Vec::new();
    for (i, node) in n.iter().enumerate() {
        for j in 0..5 {
            clients.push(Client::connect(node, &format!("n{i}-u{j}"), 3).await);
        }
    }
    let mut hidden = Client::connect(&n[0], "ghost", 1).await;
    hidden.set_status(Status::Invisible, None).await;
    let rest = Rest::new(&n[1]);
    rest.wait_presence("n1-u4", |p| p["status"] == "online")
        .await;

    // Restarted without its data (the nodes may already be rewriting theirs by the time a
    // DBSIZE would run, so the test looks at what they rebuild, not at the empty moment).
    redis.restart_empty();

    for node in &n {
        let rest = Rest::new(node);
        for i in 0..2 {
            for j in 0..5 {
                rest.wait_presence(&format!("n{i}-u{j}"), |p| p["status"] == "online")
                    .await;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, stats) = rest.get("/stats").await;
            if stats["online_users"] == 10 && stats["nodes"] == 2 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "stats never recovered: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(
        n[0].logs().contains("reconnected to Redis"),
        "{}",
        n[0].logs()
    );
    // The invisible user stays invisible.
    assert_eq!(rest.presence("ghost").await["status"], "offline");
    // And new changes flow again, across nodes.
    let mut watcher = Client::connect(&n[1], "watcher", 1).await;
    watcher.subscribe(&["late"]).await;
    let _late = Client::connect(&n[0], "late", 4).await;
    assert_eq!(watcher.presence_of("late").await.status, Status::Online);
}

/// Users connected to two nodes choose `busy` through one node, then `online` with a text through
/// the other; Redis restarts empty and both nodes rewrite what they hold at once, in no set order.
/// REST on both nodes and watchers on both end with the last choice. The first choice went through
/// node A for half the users and through node B for the other half, so under the old rule (the
/// first renewal to arrive wins) some users end `busy` whichever node renews first (seen in chaos:
/// issue 13).
#[tokio::test]
async fn the_last_chosen_status_wins_after_redis_restarts_empty() {
    const USERS: usize = 12;
    let mut redis = Redis::start();
    let backend = Backend::Redis(redis.url());
    let n = nodes(&backend, 2, &[]);
    let users: Vec<String> = (0..USERS).map(|i| format!("st{i}")).collect();
    let mut conns = Vec::new();
    for user in &users {
        let mut pair = Vec::new();
        for (i, node) in n.iter().enumerate() {
            let peer = Peer::connect(node, i, user, i as u8 + 1).await;
            pair.push(peer.expect("connects"));
        }
        conns.push(pair);
    }
    let mut watchers = Vec::new();
    for (i, node) in n.iter().enumerate() {
        let watcher = Peer::connect(node, i, &format!("watcher{i}"), 1)
            .await
            .expect("connects");
        assert!(watcher.subscribe(users.clone()).await);
        watchers.push(watcher);
    }
    let rests = [Rest::new(&n[0]), Rest::new(&n[1])];

    // Each choice is written before the next is made, so the last one is the newest everywhere.
    for (step, (status, text)) in [(Status::Busy, "first"), (Status::Online, "last")]
        .into_iter()
        .enumerate()
    {
        for (i, pair) in conns.iter().enumerate() {
            let through = &pair[(i + step) % 2];
            let answer = through
                .request(move |id| ClientFrame::SetStatus {
                    id,
                    status,
                    text: Some(text.to_string()),
                })
                .await;
            assert!(matches!(answer, Some(ServerFrame::Ok { .. })), "{answer:?}");
        }
        for user in &users {
            rests[0].wait_presence(user, |p| p["text"] == text).await;
        }
    }
    let before: Vec<u64> = users
        .iter()
        .map(|u| watchers[0].heard.lock().expect("heard").latest[u].version)
        .collect();

    redis.restart_empty();

    let last = |p: &Value| {
        p["status"] == "online"
            && p["text"] == "last"
            && p["platforms"] == serde_json::json!([1, 2])
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for (rest, user) in rests.iter().flat_map(|r| users.iter().map(move |u| (r, u))) {
        // Redis is empty now: a record with both platforms was rewritten by both nodes.
        loop {
            let (code, body) = rest.get(&format!("/presence/{user}")).await;
            if code == 200 && body["platforms"] == serde_json::json!([1, 2]) {
                assert!(last(&body), "{user} after both nodes renewed: {body}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{user}: {code} {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Watchers hear the rewritten records (events, then the re-read a second later).
    for (w, watcher) in watchers.iter().enumerate() {
        for (user, before) in users.iter().zip(&before) {
            loop {
                let heard = watcher.heard.lock().expect("heard").latest[user].clone();
                if heard.version > *before
                    && heard.status == Status::Online
                    && heard.text.as_deref() == Some("last")
                    && heard.platforms == [1, 2]
                {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "watcher on node {w} ends with {heard:?} for {user}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // And it stays so once every renewal and re-read is through.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for rest in &rests {
        for user in &users {
            let body = rest.presence(user).await;
            assert!(last(&body), "{user} later: {body}");
        }
    }
    for watcher in &watchers {
        let heard = watcher.heard.lock().expect("heard");
        for user in &users {
            assert_eq!(heard.latest[user].text.as_deref(), Some("last"), "{user}");
        }
    }
}

/// The registry answers the least-loaded node with new tokens.
#[tokio::test]
async fn tokens_work_on_every_node_and_name_the_least_loaded() {
    let redis = Redis::start();
    let n = nodes(&Backend::Redis(redis.url()), 2, &["--ttl-secs=3"]);
    let mut busy = Vec::new();
    for i in 0..3 {
        busy.push(Client::connect(&n[0], &format!("b{i}"), 1).await);
    }
    // Heartbeats run every second with this TTL; wait for one that carries the counts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = Rest::new(&n[0])
        .post(
            "/tokens",
            serde_json::json!({"user": "dora", "platform": 5}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["node"]["id"], n[1].id, "{body}");
    let token = body["token"].as_str().expect("token");
    let mut on_other = Client::open(&n[1], token, shared::Encoding::Json)
        .await
        .expect("token valid on another node");
    assert!(matches!(
        on_other.recv().await,
        shared::ServerFrame::Welcome { .. }
    ));
}

/// A shard with more users than one renewal chunk keeps them all online well past the TTL.
#[tokio::test]
async fn renewal_keeps_a_big_shard_online_past_the_ttl() {
    let redis = Redis::start();
    let node = NodeBuilder::new(&Backend::Redis(redis.url()))
        .arg("--shards=1")
        .arg("--ttl-secs=3")
        .start();
    let connects = (0..1200).map(|i| {
        let node = &node;
        async move { Client::connect(node, &format!("r{i}"), 2).await }
    });
    let _clients = futures_util::future::join_all(connects).await;
    let rest = Rest::new(&node);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while rest.get("/stats").await.1["online_users"] != 1200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "users never all online"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two TTLs: without renewal every entry would have expired twice over.
    tokio::time::sleep(Duration::from_secs(6)).await;
    // Reads drop expired entries, so every user online here was renewed in time.
    for range in [0..600, 600..1200] {
        let users: Vec<String> = range.map(|i| format!("r{i}")).collect();
        let (status, body) = rest
            .post("/presence/query", serde_json::json!({ "users": users }))
            .await;
        assert_eq!(status, 200, "{body}");
        let items = body["items"].as_array().expect("items");
        let offline: Vec<&serde_json::Value> =
            items.iter().filter(|p| p["status"] != "online").collect();
        assert!(
            offline.is_empty(),
            "{} users expired: {:?}",
            offline.len(),
            offline.first()
        );
    }
    let renewed = node.metric("presence_renewals_total{result=\"ok\"}").await;
    assert!(
        renewed >= 2400.0,
        "every user renewed at least twice, in chunks: {renewed}"
    );
}

/// The record's expiry is pushed out when the user's entries change and on renewal, not on every
/// status change (write.lua skips the PEXPIRE there); it must still always carry one, and status
/// changes must still reach Redis.
#[tokio::test]
async fn user_records_always_expire() {
    let redis = Redis::start();
    let node = NodeBuilder::new(&Backend::Redis(redis.url()))
        .arg("--batch-interval-ms=10")
        .start();
    let rest = Rest::new(&node);
    let mut alice = Client::connect(&node, "alice", 1).await;
    rest.wait_presence("alice", |p| p["status"] == "online")
        .await;
    alice.set_status(Status::Busy, Some("in a call")).await;
    rest.wait_presence("alice", |p| {
        p["status"] == "busy" && p["text"] == "in a call"
    })
    .await;
    let ttl_ms = |r: &Redis| -> i64 {
        r.cli(&["PTTL", "presence:u:{alice}"])
            .trim()
            .parse()
            .unwrap_or(-3)
    };
    let day_ms = 86_400_000;
    assert!(ttl_ms(&redis) > 29 * day_ms, "PTTL {}", ttl_ms(&redis));
    alice.close().await;
    rest.wait_presence("alice", |p| p["status"] == "offline")
        .await;
    assert!(ttl_ms(&redis) > 29 * day_ms, "PTTL {}", ttl_ms(&redis));
}
