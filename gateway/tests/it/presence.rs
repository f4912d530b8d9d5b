//! Presence behaviour every backend must show, written once and run through `behaviour_suite!`
//! against the embedded backend (a node process, and the same node in-process) and Redis.

use std::time::Duration;

use shared::{ClientFrame, Presence, ServerFrame, Status};

use crate::{
    client::{Client, Rest},
    harness::{Backend, NodeBuilder, Redis},
};

/// A node on the backend under test, and what it needs.
pub struct Setup {
    pub backend: Backend,
    in_process: bool,
    _redis: Option<Redis>,
}

impl Setup {
    pub fn new(kind: &str) -> Setup {
        match kind {
            "embedded" | "inproc" => Setup {
                backend: Backend::Embedded,
                in_process: kind == "inproc",
                _redis: None,
            },
            _ => {
                let redis = Redis::start();
                Setup {
                    backend: Backend::Redis(redis.url()),
                    in_process: false,
                    _redis: Some(redis),
                }
            }
        }
    }

    pub fn node(&self) -> NodeBuilder {
        let builder = NodeBuilder::new(&self.backend);
        if self.in_process {
            builder.in_process()
        } else {
            builder
        }
    }
}

/// `everywhere` tests run on the embedded backend (process and in-process) and on Redis;
/// `processes` tests skip the in-process node.
macro_rules! behaviour_suite {
    (everywhere: [$($test:ident),* $(,)?], processes: [$($proc_test:ident),* $(,)?] $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::Setup::new("embedded")).await
                }
            )*
            $(
                #[tokio::test]
                async fn $proc_test() {
                    super::$proc_test(super::Setup::new("embedded")).await
                }
            )*
        }
        mod inproc {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::Setup::new("inproc")).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::Setup::new("redis")).await
                }
            )*
            $(
                #[tokio::test]
                async fn $proc_test() {
                    super::$proc_test(super::Setup::new("redis")).await
                }
            )*
        }
    };
}

behaviour_suite!(
    everywhere: [
        platforms_aggregate_and_versions_grow,
        invisible_looks_offline_to_others,
        invisible_activity_moves_no_version_others_see,
        busy_with_text_reaches_subscribers,
        idle_connections_turn_away_and_activity_brings_back,
        second_tab_on_same_platform_changes_nothing,
        unsubscribe_stops_events,
        query_answers_known_and_unknown_users,
        rest_sees_what_others_see,
        graceful_shutdown_closes_with_going_away,
    ],
    // It counts writes on `/metrics`, which in-process nodes share with every other test of the
    // binary; `shard.rs` pins flap suppression at the backend itself.
    processes: [flaps_inside_one_batch_are_silent],
);

async fn platforms_aggregate_and_versions_grow(setup: Setup) {
    let node = setup.node().start();
    let mut bob = Client::connect(&node, "bob", 2).await;
    let initial = bob.subscribe(&["alice"]).await;
    assert_eq!(initial[0].status, Status::Offline);

    let alice_ios = Client::connect(&node, "alice", 1).await;
    let alice_web = Client::connect_json(&node, "alice", 5).await;
    let mut versions = vec![initial[0].version];
    let both = loop {
        let p = bob.presence_of("alice").await;
        versions.push(p.version);
        if p.platforms == vec![1, 5] {
            break p;
        }
    };
    assert_eq!(both.status, Status::Online);
    assert_eq!(both.last_seen, None);

    alice_ios.close().await;
    let web_only = bob.presence_of("alice").await;
    versions.push(web_only.version);
    assert_eq!(
        (web_only.status, web_only.platforms.clone()),
        (Status::Online, vec![5])
    );

    alice_web.close().await;
    let offline = bob.presence_of("alice").await;
    versions.push(offline.version);
    assert_eq!(offline.status, Status::Offline);
    assert!(offline.platforms.is_empty());
    assert!(offline.last_seen.is_some(), "offline carries last_seen");
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions grow: {versions:?}"
    );
}

async fn invisible_looks_offline_to_others(setup: Setup) {
    let node = setup.node().start();
    let mut alice = Client::connect(&node, "alice", 1).await;
    let mut bob = Client::connect(&node, "bob", 1).await;
    bob.watch_until("alice", Status::Online).await;
    alice.watch_until("alice", Status::Online).await;

    alice.set_status(Status::Invisible, None).await;
    let seen_by_bob = bob.presence_until("alice", Status::Offline).await;
    assert!(seen_by_bob.platforms.is_empty());
    assert!(seen_by_bob.last_seen.is_some());
    let seen_by_self = alice.presence_until("alice", Status::Invisible).await;
    assert_eq!(seen_by_self.platforms, vec![1]);

    let queried = bob
        .request(|id| ClientFrame::Query {
            id,
            users: vec!["alice".into()],
        })
        .await;
    match queried {
        ServerFrame::PresenceList { items, .. } => assert_eq!(items[0].status, Status::Offline),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        Rest::new(&node).presence("alice").await["status"],
        "offline"
    );

    alice.set_status(Status::Online, None).await;
    assert_eq!(bob.presence_of("alice").await.status, Status::Online);
}

/// An invisible user connects a second device, drops it, leaves and comes back: they see each
/// change of their own; a watcher (subscribed after they hid) gets no event, and a poller (`query`,
/// REST) sees the same version throughout, until they turn visible.
async fn invisible_activity_moves_no_version_others_see(setup: Setup) {
    let node = setup.node().start();
    let rest = Rest::new(&node);
    let mut alice = Client::connect(&node, "alice", 1).await;
    rest.wait_presence("alice", |p| p["status"] == "online")
        .await;
    alice.set_status(Status::Invisible, None).await;
    rest.wait_presence("alice", |p| p["status"] == "offline")
        .await;

    let mut bob = Client::connect(&node, "bob", 1).await;
    let hidden = bob.subscribe(&["alice"]).await.remove(0);
    assert_eq!(hidden.status, Status::Offline);
    assert!(hidden.last_seen.is_some());
    let mut carol = Client::connect(&node, "carol", 2).await;
    let mut own = alice.subscribe(&["alice"]).await.remove(0);
    assert_eq!(
        (own.status, own.platforms.clone()),
        (Status::Invisible, vec![1])
    );
    assert!(own.version >= hidden.version);

    let mut unmoved = async |own: &Presence, seen: Presence| {
        assert!(
            seen.version > own.version,
            "alice sees her change: {seen:?}"
        );
        assert_eq!(seen.status, Status::Invisible);
        bob.expect_silence(Duration::from_millis(300)).await;
        assert_eq!(query_one(&mut carol, "alice").await, hidden, "polled");
        assert_eq!(query_one(&mut bob, "alice").await, hidden, "polled");
        let by_rest = rest.presence("alice").await;
        assert_eq!(by_rest["version"], hidden.version);
        assert_eq!(by_rest["status"], "offline");
        seen
    };

    let web = Client::connect(&node, "alice", 5).await;
    let seen = event_until(&mut alice, "alice", |p| p.platforms == vec![1, 5]).await;
    own = unmoved(&own, seen).await;
    web.close().await;
    let seen = event_until(&mut alice, "alice", |p| p.platforms == vec![1]).await;
    own = unmoved(&own, seen).await;

    // Every device gone (alice alone sees herself offline), then back on another platform.
    alice.close().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut alice = Client::connect(&node, "alice", 2).await;
    let seen = loop {
        let p = query_one(&mut alice, "alice").await;
        if p.platforms == vec![2] {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    own = unmoved(&own, seen).await;

    alice.set_status(Status::Online, None).await;
    let visible = bob.presence_of("alice").await;
    assert_eq!(
        (visible.status, visible.platforms),
        (Status::Online, vec![2])
    );
    assert!(
        visible.version > hidden.version,
        "a change others see moves it"
    );
    let mine = query_one(&mut alice, "alice").await;
    assert_eq!(mine.status, Status::Online);
    assert!(mine.version > own.version);
}

/// `user` as `client` may see them, by `query`.
async fn query_one(client: &mut Client, user: &str) -> Presence {
    match client
        .request(|id| ClientFrame::Query {
            id,
            users: vec![user.to_string()],
        })
        .await
    {
        ServerFrame::PresenceList { mut items, .. } => items.remove(0),
        other => panic!("expected presence_list, got {other:?}"),
    }
}

/// The first event of `user`'s presence to `client` that satisfies `check`.
async fn event_until(
    client: &mut Client,
    user: &str,
    check: impl Fn(&Presence) -> bool,
) -> Presence {
    loop {
        let p = client.presence_of(user).await;
        if check(&p) {
            return p;
        }
    }
}

async fn busy_with_text_reaches_subscribers(setup: Setup) {
    let node = setup.node().start();
    let mut alice = Client::connect(&node, "alice", 3).await;
    let mut bob = Client::connect_json(&node, "bob", 5).await;
    bob.watch_until("alice", Status::Online).await;
    alice.set_status(Status::Busy, Some("in a meeting")).await;
    let p = bob.presence_until("alice", Status::Busy).await;
    assert_eq!(p.status, Status::Busy);
    assert_eq!(p.text.as_deref(), Some("in a meeting"));

    let long = "x".repeat(129);
    let reply = alice
        .request(|id| ClientFrame::SetStatus {
            id,
            status: Status::Away,
            text: Some(long),
        })
        .await;
    assert!(
        matches!(
            reply,
            ServerFrame::Error {
                code: shared::ErrorCode::BadRequest,
                ..
            }
        ),
        "{reply:?}"
    );
    let reply = alice
        .request(|id| ClientFrame::SetStatus {
            id,
            status: Status::Offline,
            text: None,
        })
        .await;
    assert!(
        matches!(
            reply,
            ServerFrame::Error {
                code: shared::ErrorCode::BadRequest,
                ..
            }
        ),
        "{reply:?}"
    );
}

async fn idle_connections_turn_away_and_activity_brings_back(setup: Setup) {
    let node = setup.node().arg("--idle-away-secs=1").start();
    let mut alice = Client::connect(&node, "alice", 1).await;
    let mut bob = Client::connect(&node, "bob", 1).await;
    bob.subscribe(&["alice"]).await;
    let mut p = bob.presence_of("alice").await;
    // Bob's own requests do not count as alice's activity; alice stays silent.
    while p.status == Status::Online {
        p = bob.presence_of("alice").await;
    }
    assert_eq!(p.status, Status::Away);
    alice
        .request(|id| ClientFrame::Query {
            id,
            users: vec!["bob".into()],
        })
        .await;
    assert_eq!(bob.presence_of("alice").await.status, Status::Online);
}

/// A client that drops and reconnects within the batch interval (a phone changing networks) is
/// never seen offline: coming online is written at once, going offline waits for the batch.
async fn flaps_inside_one_batch_are_silent(setup: Setup) {
    let node = setup.node().arg("--batch-interval-ms=1500").start();
    let mut bob = Client::connect(&node, "bob", 1).await;
    let alice = Client::connect(&node, "alice", 1).await;
    let online = bob.watch_until("alice", Status::Online).await;
    // Bob's own connect may still be flushed; alice's flap must not be.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let writes_before = node.metric("presence_writes_total").await;
    alice.close().await;
    let _alice = Client::connect(&node, "alice", 1).await;
    // The list and alice's own online event may both carry the version seen: not news.
    bob.expect_nothing_new(Duration::from_millis(3500), &online)
        .await;
    let writes_after = node.metric("presence_writes_total").await;
    assert!(
        writes_after - writes_before <= 1.0,
        "{writes_before} -> {writes_after}"
    );
}

async fn second_tab_on_same_platform_changes_nothing(setup: Setup) {
    let node = setup.node().start();
    let mut bob = Client::connect(&node, "bob", 1).await;
    bob.subscribe(&["alice"]).await;
    let _tab1 = Client::connect(&node, "alice", 5).await;
    assert_eq!(bob.presence_of("alice").await.platforms, vec![5]);
    let tab2 = Client::connect(&node, "alice", 5).await;
    tab2.close().await;
    bob.expect_silence(Duration::from_millis(600)).await;
}

async fn unsubscribe_stops_events(setup: Setup) {
    let node = setup.node().start();
    let mut bob = Client::connect(&node, "bob", 1).await;
    bob.subscribe(&["alice"]).await;
    let alice = Client::connect(&node, "alice", 1).await;
    bob.presence_of("alice").await;
    let reply = bob
        .request(|id| ClientFrame::Unsubscribe {
            id,
            users: vec!["alice".into()],
        })
        .await;
    assert!(matches!(reply, ServerFrame::Ok { .. }));
    alice.close().await;
    bob.expect_silence(Duration::from_millis(600)).await;
}

async fn query_answers_known_and_unknown_users(setup: Setup) {
    let node = setup.node().start();
    let _alice = Client::connect(&node, "alice", 7).await;
    let mut bob = Client::connect(&node, "bob", 1).await;
    let rest = Rest::new(&node);
    rest.wait_presence("alice", |p| p["status"] == "online")
        .await;
    let reply = bob
        .request(|id| ClientFrame::Query {
            id,
            users: vec!["alice".into(), "nobody".into()],
        })
        .await;
    let ServerFrame::PresenceList { items, .. } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(items.len(), 2);
    assert_eq!(
        (items[0].status, items[0].platforms.clone()),
        (Status::Online, vec![7])
    );
    assert_eq!((items[1].status, items[1].version), (Status::Offline, 0));

    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let reply = bob
        .request(|id| ClientFrame::Query {
            id,
            users: too_many,
        })
        .await;
    assert!(matches!(
        reply,
        ServerFrame::Error {
            code: shared::ErrorCode::BadRequest,
            ..
        }
    ));
    let reply = bob
        .request(|id| ClientFrame::Subscribe {
            id,
            users: vec!["bad id".into()],
        })
        .await;
    assert!(matches!(
        reply,
        ServerFrame::Error {
            code: shared::ErrorCode::BadRequest,
            ..
        }
    ));
}

async fn rest_sees_what_others_see(setup: Setup) {
    let node = setup.node().start();
    let rest = Rest::new(&node);
    let _a1 = Client::connect(&node, "u1", 1).await;
    let _a2 = Client::connect(&node, "u2", 2).await;
    let _a3 = Client::connect(&node, "u3", 2).await;
    let mut hidden = Client::connect(&node, "u4", 2).await;
    hidden.set_status(Status::Invisible, None).await;
    for user in ["u1", "u2", "u3"] {
        rest.wait_presence(user, |p| p["status"] == "online").await;
    }
    rest.wait_presence("u4", |p| p["status"] == "offline").await;

    let (status, body) = rest
        .post(
            "/presence/query",
            serde_json::json!({"users": ["u1", "u4", "zz"]}),
        )
        .await;
    assert_eq!(status, 200);
    let statuses: Vec<&str> = body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(statuses, vec!["online", "offline", "offline"]);

    let (_, page) = rest.get("/online?limit=2").await;
    assert_eq!(page["users"], serde_json::json!(["u1", "u2"]));
    let cursor = page["next_cursor"].as_str().expect("cursor");
    let (_, page) = rest.get(&format!("/online?limit=2&cursor={cursor}")).await;
    assert_eq!(page["users"], serde_json::json!(["u3"]));
    assert!(page["next_cursor"].is_null());
    let (_, page) = rest.get("/online?platform=2").await;
    assert_eq!(page["users"], serde_json::json!(["u2", "u3"]));

    let (_, stats) = rest.get("/stats").await;
    assert_eq!(stats["online_users"], 3);
    assert_eq!(stats["connections"], 4);
    assert_eq!(stats["by_platform"]["2"], 2);
    assert_eq!(stats["nodes"], 1);
}

async fn graceful_shutdown_closes_with_going_away(setup: Setup) {
    let node = setup.node().start();
    let mut alice = Client::connect(&node, "alice", 1).await;
    let waiter = tokio::spawn(node.shut_down());
    assert_eq!(alice.closed().await, crate::client::Closed::Code(1001));
    assert!(waiter.await.expect("join"), "node exits cleanly");
}
