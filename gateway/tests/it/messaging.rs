//! Messaging: groups, private messages, acks, offline delivery, history and catch-up, broadcasts,
//! slow consumers. The behaviour suite runs on both backends; the spread tests on 3 nodes.

use std::{collections::HashMap, time::Duration};

use serde_json::json;
use shared::{Body, ClientFrame, Destination, ErrorCode, Message, RouteResult, ServerFrame};

use crate::{
    client::{Client, Closed, Rest},
    harness::{Backend, Node, NodeBuilder, Redis},
    presence::Setup,
};

fn text(s: &str) -> Body {
    Body::String(s.into())
}

fn group(g: &str) -> Destination {
    Destination::Group { group: g.into() }
}

fn user(u: &str) -> Destination {
    Destination::User { user: u.into() }
}

/// Opens `g` (the app backend's `PUT /v1/groups/{g}`) and joins it.
async fn join(client: &mut Client, g: &str) {
    open_group(client, g).await;
    let reply = client
        .request(|id| ClientFrame::Join {
            id,
            group: g.into(),
        })
        .await;
    assert!(matches!(reply, ServerFrame::Ok { .. }), "{reply:?}");
}

/// Leaves `g`; the answer is `ok`.
async fn leave(client: &mut Client, g: &str) {
    let reply = client
        .request(|id| ClientFrame::Leave {
            id,
            group: g.into(),
        })
        .await;
    assert!(matches!(reply, ServerFrame::Ok { .. }), "{reply:?}");
}

async fn open_group(client: &Client, g: &str) {
    let status = client
        .rest
        .put(&format!("/groups/{g}"), Some(json!({"join": "open"})))
        .await;
    assert_eq!(status, 204, "opening {g}");
}

/// Sends and returns the ack's (msg_id, result, delivered, stored).
async fn send(client: &mut Client, to: Destination, body: Body) -> (String, RouteResult, u64, u64) {
    match client
        .request(|id| ClientFrame::Send {
            id,
            to,
            body,
            client_msg_id: None,
        })
        .await
    {
        ServerFrame::Ack {
            msg_id,
            result,
            delivered,
            stored,
            ..
        } => (msg_id, result, delivered, stored),
        other => panic!("expected ack, got {other:?}"),
    }
}

async fn next_message(client: &mut Client) -> Message {
    client
        .expect(|f| match f {
            ServerFrame::Message(m) => Some(m.clone()),
            _ => None,
        })
        .await
}

macro_rules! messaging_suite {
    ($($test:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test] async fn $test() { super::$test(super::Setup::new("embedded")).await })*
        }
        mod redis {
            $(#[tokio::test] async fn $test() { super::$test(super::Setup::new("redis")).await })*
        }
    };
}

messaging_suite!(
    group_messages_reach_members_and_the_senders_other_devices,
    non_members_may_not_send_to_a_group,
    private_messages_are_stored_until_acknowledged,
    sync_and_unread_follow_the_read_position,
    a_read_beyond_the_last_message_hides_nothing_sent_later,
    broadcasts_reach_every_connection,
    app_backend_manages_groups_and_sends_system_messages,
    bad_message_requests_are_refused,
    closed_groups_take_members_only_from_the_app,
    a_user_in_too_many_groups_is_refused_more,
);

async fn group_messages_reach_members_and_the_senders_other_devices(setup: Setup) {
    let node = setup.node().start();
    let mut alice_phone = Client::connect(&node, "alice", 1).await;
    let mut alice_web = Client::connect_json(&node, "alice", 5).await;
    let mut bob = Client::connect(&node, "bob", 2).await;
    let mut carol = Client::connect(&node, "carol", 2).await;
    join(&mut alice_phone, "team").await;
    join(&mut bob, "team").await;

    let body = Body::Map(vec![(text("text"), text("hi")), (text("n"), Body::from(1))]);
    let (msg_id, result, _, _) = send(&mut alice_phone, group("team"), body.clone()).await;
    assert_eq!(result, RouteResult::Delivered);
    for receiver in [&mut bob, &mut alice_web] {
        let m = next_message(receiver).await;
        assert_eq!(
            (m.msg_id.as_str(), m.from.as_str()),
            (msg_id.as_str(), "alice")
        );
        assert_eq!(m.to, group("team"));
        assert_eq!(m.body, body);
        assert!(m.sent_at > 0 && m.offline.is_none());
    }
    // The sender's connection gets the ack only; non-members nothing.
    alice_phone.expect_silence(Duration::from_millis(300)).await;
    carol.expect_silence(Duration::from_millis(300)).await;

    let reply = bob
        .request(|id| ClientFrame::GroupOnline {
            id,
            group: "team".into(),
        })
        .await;
    let ServerFrame::MemberList { users, .. } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(users, vec!["alice", "bob"]);

    // After leaving, bob hears nothing more.
    leave(&mut bob, "team").await;
    send(&mut alice_phone, group("team"), text("after")).await;
    assert_eq!(next_message(&mut alice_web).await.body, text("after"));
    bob.expect_silence(Duration::from_millis(300)).await;
}

async fn non_members_may_not_send_to_a_group(setup: Setup) {
    let node = setup.node().start();
    let mut alice = Client::connect(&node, "alice", 1).await;
    let mut eve = Client::connect(&node, "eve", 1).await;
    join(&mut alice, "team").await;
    let reply = eve
        .request(|id| ClientFrame::Send {
            id,
            to: group("team"),
            body: text("let me in"),
            client_msg_id: None,
        })
        .await;
    assert!(
        matches!(
            reply,
            ServerFrame::Error {
                code: ErrorCode::Forbidden,
                ..
            }
        ),
        "{reply:?}"
    );
    alice.expect_silence(Duration::from_millis(300)).await;
    let reply = eve
        .request(|id| ClientFrame::Sync {
            id,
            group: "team".into(),
            since: None,
            limit: None,
        })
        .await;
    assert!(
        matches!(
            reply,
            ServerFrame::Error {
                code: ErrorCode::Forbidden,
                ..
            }
        ),
        "{reply:?}"
    );
    // Alone in a group: nobody to deliver to.
    join(&mut eve, "solo").await;
    assert_eq!(
        send(&mut eve, group("solo"), text("echo")).await.1,
        RouteResult::NoRecipients
    );
}

async fn private_messages_are_stored_until_acknowledged(setup: Setup) {
    let node = setup.node().start();
    let mut alice = Client::connect(&node, "alice", 1).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (id, result, delivered, stored) =
            send(&mut alice, user("bob"), text(&format!("m{i}"))).await;
        assert_eq!((result, delivered, stored), (RouteResult::Stored, 0, 1));
        ids.push(id);
    }
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids sort in send order: {ids:?}"
    );

    let mut bob = Client::connect(&node, "bob", 2).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = next_message(&mut bob).await;
        assert_eq!(m.offline, Some(true));
        got.push(m.msg_id);
    }
    assert_eq!(got, ids);
    // Live now: delivered, not stored.
    let (_, result, delivered, stored) = send(&mut alice, user("bob"), text("live")).await;
    assert_eq!((result, delivered, stored), (RouteResult::Delivered, 1, 0));
    let live = next_message(&mut bob).await;
    assert_eq!((live.body, live.offline), (text("live"), None));

    // Unacknowledged messages come again on reconnect; acknowledged ones do not.
    bob.close().await;
    let mut bob = Client::connect(&node, "bob", 2).await;
    assert_eq!(next_message(&mut bob).await.msg_id, ids[0]);
    let reply = bob
        .request(|id| ClientFrame::AckOffline {
            id,
            up_to: ids[1].clone(),
        })
        .await;
    assert!(matches!(reply, ServerFrame::Ok { .. }));
    bob.close().await;
    let mut bob = Client::connect(&node, "bob", 2).await;
    let m = next_message(&mut bob).await;
    assert_eq!(m.msg_id, ids[2]);
    bob.expect_silence(Duration::from_millis(300)).await;
}

async fn sync_and_unread_follow_the_read_position(setup: Setup) {
    let node = setup.node().start();
    let rest = Rest::new(&node);
    let mut alice = Client::connect(&node, "alice", 1).await;
    join(&mut alice, "g1").await;
    let mut bob = Client::connect(&node, "bob", 1).await;
    join(&mut bob, "g1").await;
    let (first, ..) = send(&mut alice, group("g1"), text("one")).await;
    assert_eq!(next_message(&mut bob).await.msg_id, first);
    bob.close().await;
    let mut missed = Vec::new();
    for i in 0..4 {
        missed.push(
            send(&mut alice, group("g1"), text(&format!("missed {i}")))
                .await
                .0,
        );
    }

    let mut bob = Client::connect(&node, "bob", 1).await;
    let reply = bob.request(|id| ClientFrame::Unread { id }).await;
    let ServerFrame::UnreadCounts { groups, .. } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(groups.get("g1"), Some(&5), "nothing read yet: {groups:?}");

    // With `since`: exactly what came after it.
    let reply = bob
        .request(|id| ClientFrame::Sync {
            id,
            group: "g1".into(),
            since: Some(first.clone()),
            limit: None,
        })
        .await;
    let ServerFrame::History { messages, more, .. } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(
        messages
            .iter()
            .map(|m| m.msg_id.clone())
            .collect::<Vec<_>>(),
        missed
    );
    assert!(!more);

    // Without `since`: after the read position.
    assert!(matches!(
        bob.request(|id| ClientFrame::Read {
            id,
            group: "g1".into(),
            up_to: missed[1].clone()
        })
        .await,
        ServerFrame::Ok { .. }
    ));
    let reply = bob
        .request(|id| ClientFrame::Sync {
            id,
            group: "g1".into(),
            since: None,
            limit: Some(1),
        })
        .await;
    let ServerFrame::History { messages, more, .. } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(messages[0].msg_id, missed[2]);
    assert!(more);
    let reply = bob.request(|id| ClientFrame::Unread { id }).await;
    let ServerFrame::UnreadCounts { groups, .. } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(groups.get("g1"), Some(&2));
    // The read position never moves back.
    bob.request(|id| ClientFrame::Read {
        id,
        group: "g1".into(),
        up_to: first.clone(),
    })
    .await;
    let reply = bob.request(|id| ClientFrame::Unread { id }).await;
    let ServerFrame::UnreadCounts { groups, .. } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(groups.get("g1"), Some(&2));

    let (status, history) = rest
        .get(&format!("/groups/g1/history?since={}&limit=2", missed[0]))
        .await;
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(2));
    assert_eq!(history["messages"][0]["msg_id"], missed[1].as_str());
    assert_eq!(history["more"], true);
}

/// A read position years ahead would hide every message sent until then: it clamps to the
/// group's last message, so what comes next is unread and `sync` returns it.
async fn a_read_beyond_the_last_message_hides_nothing_sent_later(setup: Setup) {
    let node = setup.node().start();
    let mut alice = Client::connect(&node, "alice", 1).await;
    join(&mut alice, "ahead").await;
    let mut bob = Client::connect(&node, "bob", 1).await;
    join(&mut bob, "ahead").await;
    let (first, ..) = send(&mut alice, group("ahead"), text("one")).await;
    for up_to in ["9999999999999-0000000001", "0000000000001-9999999999"] {
        let reply = bob
            .request(|id| ClientFrame::Read {
                id,
                group: "ahead".into(),
                up_to: up_to.into(),
            })
            .await;
        assert!(
            matches!(reply, ServerFrame::Ok { .. }),
            "{up_to}: {reply:?}"
        );
    }
    let unread = |groups: &std::collections::BTreeMap<String, u64>| groups.get("ahead").copied();
    let reply = bob.request(|id| ClientFrame::Unread { id }).await;
    let ServerFrame::UnreadCounts { groups, .. } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(unread(&groups), Some(0), "read up to {first}");

    let (next, ..) = send(&mut alice, group("ahead"), text("two")).await;
    let reply = bob.request(|id| ClientFrame::Unread { id }).await;
    let ServerFrame::UnreadCounts { groups, .. } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(unread(&groups), Some(1), "{next} came after the position");
    let reply = bob
        .request(|id| ClientFrame::Sync {
            id,
            group: "ahead".into(),
            since: None,
            limit: None,
        })
        .await;
    let ServerFrame::History { messages, .. } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(
        messages
            .iter()
            .map(|m| m.msg_id.as_str())
            .collect::<Vec<_>>(),
        [next.as_str()]
    );
}

async fn broadcasts_reach_every_connection(setup: Setup) {
    let node = setup.node().start();
    let rest = Rest::new(&node);
    let mut clients = vec![
        Client::connect(&node, "a", 1).await,
        Client::connect(&node, "a", 2).await,
        Client::connect_json(&node, "b", 5).await,
    ];
    let (status, answer) = rest
        .post(
            "/messages",
            json!({"to": {"all": true}, "body": {"notice": "maintenance"}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    for client in &mut clients {
        let m = next_message(client).await;
        assert_eq!(m.from, "system");
        assert_eq!(m.to, Destination::All { all: true });
        assert_eq!(m.msg_id, answer["msg_id"].as_str().expect("msg_id"));
    }
    let reply = clients[0]
        .request(|id| ClientFrame::Send {
            id,
            to: Destination::All { all: true },
            body: text("spam"),
            client_msg_id: None,
        })
        .await;
    assert!(
        matches!(
            reply,
            ServerFrame::Error {
                code: ErrorCode::Forbidden,
                ..
            }
        ),
        "{reply:?}"
    );
}

async fn app_backend_manages_groups_and_sends_system_messages(setup: Setup) {
    let node = setup.node().start();
    let rest = Rest::new(&node);
    let mut dana = Client::connect(&node, "dana", 3).await;
    rest.wait_presence("dana", |p| p["status"] == "online")
        .await;
    // Membership added by REST takes effect on connections already open.
    let http = reqwest::Client::new();
    for u in ["dana", "erin", "finn"] {
        let resp = http
            .put(format!("{}/v1/groups/ops/members/{u}", node.http()))
            .bearer_auth(crate::harness::API_KEY)
            .send()
            .await
            .expect("PUT");
        assert_eq!(resp.status(), 204);
    }
    let (_, page) = rest.get("/groups/ops/members?limit=2").await;
    assert_eq!(page["users"], json!(["dana", "erin"]));
    let (_, page) = rest
        .get(&format!(
            "/groups/ops/members?cursor={}",
            page["next_cursor"].as_str().expect("cursor")
        ))
        .await;
    assert_eq!(page["users"], json!(["finn"]));
    assert!(page["next_cursor"].is_null());
    let (_, online) = rest.get("/groups/ops/online").await;
    assert_eq!(online["users"], json!(["dana"]));

    // Wait until the membership event reached dana's connection, then a system message arrives.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let m = loop {
        let (status, answer) = rest
            .post(
                "/messages",
                json!({"to": {"group": "ops"}, "body": "deploy at 5"}),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["result"], "delivered");
        let got = tokio::time::timeout(Duration::from_millis(300), next_message(&mut dana)).await;
        if let Ok(m) = got {
            break m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "membership never reached the connection"
        );
    };
    assert_eq!(
        (m.from.as_str(), m.body.as_str()),
        ("system", Some("deploy at 5"))
    );

    let (status, answer) = rest
        .post(
            "/messages",
            json!({"to": {"user": "erin"}, "body": 1, "from": "billing"}),
        )
        .await;
    assert_eq!(
        (status, answer["result"].as_str(), answer["stored"].as_u64()),
        (200, Some("stored"), Some(1))
    );
    let resp = http
        .delete(format!("{}/v1/groups/ops/members/finn", node.http()))
        .bearer_auth(crate::harness::API_KEY)
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), 204);
    let (_, page) = rest.get("/groups/ops/members").await;
    assert_eq!(page["users"], json!(["dana", "erin"]));
    let (status, _) = rest
        .post(
            "/messages",
            json!({"to": {"user": "erin", "group": "ops"}, "body": 1}),
        )
        .await;
    assert_eq!(status, 400);
}

async fn bad_message_requests_are_refused(setup: Setup) {
    let node = setup.node().start();
    let mut alice = Client::connect(&node, "alice", 1).await;
    for frame in [
        ClientFrame::Send {
            id: Some(1),
            to: user("bad id"),
            body: text("x"),
            client_msg_id: None,
        },
        ClientFrame::Join {
            id: Some(2),
            group: String::new(),
        },
        ClientFrame::AckOffline {
            id: Some(3),
            up_to: "yesterday".into(),
        },
        ClientFrame::Sync {
            id: Some(4),
            group: "g".into(),
            since: None,
            limit: Some(501),
        },
        ClientFrame::Read {
            id: Some(5),
            group: "g".into(),
            up_to: "x".into(),
        },
        ClientFrame::Read {
            id: Some(6),
            group: "g".into(),
            up_to: "+1700000000000-1".into(),
        },
    ] {
        let want = frame.id();
        alice.send(&frame).await;
        match alice.recv().await {
            ServerFrame::Error {
                code: ErrorCode::BadRequest,
                id,
                ..
            } => assert_eq!(id, want),
            other => panic!("{frame:?} -> {other:?}"),
        }
    }
}

/// Members spread over 3 nodes: every message exactly once per connection, in order per sender.
#[tokio::test]
async fn group_spread_over_three_nodes_gets_every_message_once_in_order() {
    let redis = Redis::start();
    let backend = Backend::Redis(redis.url());
    let nodes: Vec<Node> = (0..3).map(|_| NodeBuilder::new(&backend).start()).collect();
    let mut members = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for j in 0..2 {
            let mut c = Client::connect(node, &format!("m{i}{j}"), 1).await;
            join(&mut c, "spread").await;
            members.push(c);
        }
    }
    // Membership of connections elsewhere follows through pub/sub: give it a moment to settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let senders = [0usize, 3, 5];
    let per_sender = 20;
    for round in 0..per_sender {
        for &s in &senders {
            let from = format!("m{}{}", s / 2, s % 2);
            let body = Body::Map(vec![
                (text("from"), text(&from)),
                (text("seq"), Body::from(round as u64)),
            ]);
            let id = members[s].id();
            members[s]
                .send(&ClientFrame::Send {
                    id: Some(id),
                    to: group("spread"),
                    body,
                    client_msg_id: None,
                })
                .await;
        }
    }
    for (index, member) in members.iter_mut().enumerate() {
        let own = senders.contains(&index);
        let expected = senders.len() * per_sender - if own { per_sender } else { 0 };
        let mut last_seq: HashMap<String, i64> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..expected {
            let m = next_message(member).await;
            assert!(seen.insert(m.msg_id.clone()), "duplicate {}", m.msg_id);
            let seq = m
                .body
                .as_map()
                .and_then(|kv| kv.iter().find(|(k, _)| k.as_str() == Some("seq")))
                .and_then(|(_, v)| v.as_i64())
                .expect("seq");
            let prev = last_seq.insert(m.from.clone(), seq).unwrap_or(-1);
            assert_eq!(
                seq,
                prev + 1,
                "out of order from {} at member {index}",
                m.from
            );
        }
        if own {
            for _ in 0..per_sender {
                member
                    .expect(|f| matches!(f, ServerFrame::Ack { .. }).then_some(()))
                    .await;
            }
        }
        member.expect_silence(Duration::from_millis(300)).await;
    }
}

/// Private messages and multi-device copies cross nodes.
#[tokio::test]
async fn private_messages_cross_nodes_to_every_device() {
    let redis = Redis::start();
    let backend = Backend::Redis(redis.url());
    let nodes: Vec<Node> = (0..3).map(|_| NodeBuilder::new(&backend).start()).collect();
    let mut alice = Client::connect(&nodes[0], "alice", 1).await;
    let mut alice_other = Client::connect(&nodes[2], "alice", 5).await;
    let mut bob_a = Client::connect(&nodes[1], "bob", 1).await;
    let mut bob_b = Client::connect(&nodes[2], "bob", 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (msg_id, result, delivered, _) = send(&mut alice, user("bob"), text("psst")).await;
    assert_eq!(
        (result, delivered),
        (RouteResult::Delivered, 2),
        "two nodes hold bob's connections"
    );
    for c in [&mut bob_a, &mut bob_b, &mut alice_other] {
        let m = next_message(c).await;
        assert_eq!(
            (m.msg_id.as_str(), m.body.as_str()),
            (msg_id.as_str(), Some("psst"))
        );
    }
    alice.expect_silence(Duration::from_millis(300)).await;
}

/// A client that stops reading is closed with 4008; the others keep receiving.
#[tokio::test]
async fn slow_consumer_is_closed_and_others_keep_receiving() {
    let redis = Redis::start();
    let node = NodeBuilder::new(&Backend::Redis(redis.url()))
        .arg("--outbound-queue=64")
        .start();
    let rest = Rest::new(&node);
    let mut fast = Client::connect(&node, "fast", 1).await;
    let mut slow = Client::connect(&node, "slow", 1).await;
    join(&mut fast, "firehose").await;
    join(&mut slow, "firehose").await;
    // Big bodies fill the slow client's socket buffers, then its queue; it never reads.
    let body = "x".repeat(32 * 1024);
    let total = 400;
    let reader = tokio::spawn(async move {
        for _ in 0..total {
            next_message(&mut fast).await;
        }
        fast
    });
    for _ in 0..total {
        let (status, answer) = rest
            .post(
                "/messages",
                json!({"to": {"group": "firehose"}, "body": body}),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
    }
    let mut fast = reader.await.expect("the fast reader got every message");
    // The close frame queues behind data the client never read, so it may not get through
    // before the server gives up on the socket; the server counts why it closed it.
    let closed = slow.closed().await;
    assert!(
        matches!(closed, Closed::Code(4008) | Closed::NoCode),
        "{closed:?}"
    );
    assert_eq!(
        node.metric("presence_slow_consumer_closes_total").await,
        1.0
    );
    rest.post(
        "/messages",
        json!({"to": {"group": "firehose"}, "body": "still here"}),
    )
    .await;
    assert_eq!(
        next_message(&mut fast).await.body.as_str(),
        Some("still here")
    );
}

fn is_forbidden(reply: &ServerFrame) -> bool {
    matches!(
        reply,
        ServerFrame::Error {
            code: ErrorCode::Forbidden,
            ..
        }
    )
}

/// Groups are closed unless the app opens them; a non-member learns nothing of a group, whether or
/// not it exists; the app backend sees its policy, members and last message.
async fn closed_groups_take_members_only_from_the_app(setup: Setup) {
    let node = setup.node().start();
    let rest = Rest::new(&node);
    let mut alice = Client::connect(&node, "alice", 1).await;
    let mut eve = Client::connect(&node, "eve", 1).await;
    for g in ["vault", "nowhere"] {
        let reply = eve
            .request(|id| ClientFrame::Join {
                id,
                group: g.into(),
            })
            .await;
        assert!(is_forbidden(&reply), "join {g}: {reply:?}");
    }
    let (status, info) = rest.get("/groups/vault").await;
    assert_eq!(status, 200);
    assert_eq!(
        info,
        json!({"group": "vault", "join": "closed", "members": 0, "last_message_at": null})
    );
    assert_eq!(rest.put("/groups/vault/members/alice", None).await, 204);
    let (msg_id, _, _, _) = send(&mut alice, group("vault"), text("secret")).await;

    for g in ["vault", "nowhere"] {
        let requests: Vec<Box<dyn FnOnce(Option<u64>) -> ClientFrame>> = vec![
            Box::new(|id| ClientFrame::Sync {
                id,
                group: g.into(),
                since: None,
                limit: None,
            }),
            Box::new(|id| ClientFrame::Read {
                id,
                group: g.into(),
                up_to: "1700000000000-0000000001".into(),
            }),
            Box::new(|id| ClientFrame::GroupOnline {
                id,
                group: g.into(),
            }),
            Box::new(|id| ClientFrame::Send {
                id,
                to: group(g),
                body: text("let me in"),
                client_msg_id: None,
            }),
        ];
        for make in requests {
            let reply = eve.request(make).await;
            assert!(is_forbidden(&reply), "{g}: {reply:?}");
        }
    }
    match eve.request(|id| ClientFrame::Unread { id }).await {
        ServerFrame::UnreadCounts { groups, .. } => assert!(groups.is_empty(), "{groups:?}"),
        other => panic!("{other:?}"),
    }
    // A member may join (again) a closed group.
    let reply = alice
        .request(|id| ClientFrame::Join {
            id,
            group: "vault".into(),
        })
        .await;
    assert!(matches!(reply, ServerFrame::Ok { .. }), "{reply:?}");

    let (_, info) = rest.get("/groups/vault").await;
    assert_eq!(info["join"], "closed");
    assert_eq!(info["members"], 1);
    let (ms, _) = msg_id.split_once('-').expect("msg id");
    assert_eq!(
        info["last_message_at"],
        json!(ms.parse::<u64>().expect("ms"))
    );

    assert_eq!(
        rest.put("/groups/vault", Some(json!({"join": "open"})))
            .await,
        204
    );
    assert_eq!(
        rest.put("/groups/vault", Some(json!({"join": "ajar"})))
            .await,
        400
    );
    let reply = eve
        .request(|id| ClientFrame::Join {
            id,
            group: "vault".into(),
        })
        .await;
    assert!(matches!(reply, ServerFrame::Ok { .. }), "{reply:?}");
    let (_, info) = rest.get("/groups/vault").await;
    assert_eq!(
        (info["join"].as_str(), info["members"].as_u64()),
        (Some("open"), Some(2))
    );
}

/// `PRESENCE_MAX_GROUPS_PER_USER`: past it a `join` answers `forbidden`, and so does the REST
/// member add (403); groups the user is in can be joined again, leaving makes room, other users
/// are not affected, and each refusal is counted.
async fn a_user_in_too_many_groups_is_refused_more(setup: Setup) {
    let node = setup.node().arg("--max-groups-per-user=2").start();
    let rest = Rest::new(&node);
    let mut alice = Client::connect(&node, "alice", 1).await;
    join(&mut alice, "g1").await;
    assert_eq!(rest.put("/groups/g2/members/alice", None).await, 204);
    open_group(&alice, "g3").await;
    let join_g3 = |id| ClientFrame::Join {
        id,
        group: "g3".into(),
    };
    match alice.request(join_g3).await {
        ServerFrame::Error {
            code: ErrorCode::Forbidden,
            message,
            ..
        } => assert!(message.contains("too many groups (at most 2)"), "{message}"),
        other => panic!("a third group: {other:?}"),
    }
    let (status, answer) = rest.put_answer("/groups/g4/members/alice").await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(answer["error"]["code"], "forbidden", "{answer}");
    let (_, info) = rest.get("/groups/g3").await;
    assert_eq!(info["members"], 0, "nothing changed");

    join(&mut alice, "g1").await;
    assert_eq!(rest.put("/groups/g2/members/alice", None).await, 204);
    assert_eq!(rest.put("/groups/g3/members/bob", None).await, 204);
    leave(&mut alice, "g1").await;
    join(&mut alice, "g3").await;
    let (_, info) = rest.get("/groups/g3").await;
    assert_eq!(info["members"], 2);
    assert_eq!(
        node.metric("presence_group_limit_refusals_total").await,
        2.0
    );
}

/// The closed-group rules hold across nodes: membership set through one node's REST API is what
/// every node checks, and opening the group through a third lets a client on another join and
/// receive.
#[tokio::test]
async fn closed_groups_hold_across_three_nodes() {
    let redis = Redis::start();
    let backend = Backend::Redis(redis.url());
    let nodes: Vec<Node> = (0..3).map(|_| NodeBuilder::new(&backend).start()).collect();
    assert_eq!(
        Rest::new(&nodes[0])
            .put("/groups/ops/members/alice", None)
            .await,
        204
    );
    let mut alice = Client::connect(&nodes[1], "alice", 1).await;
    let mut eve = Client::connect(&nodes[2], "eve", 1).await;
    let reply = eve
        .request(|id| ClientFrame::Join {
            id,
            group: "ops".into(),
        })
        .await;
    assert!(is_forbidden(&reply), "{reply:?}");
    let reply = eve
        .request(|id| ClientFrame::Send {
            id,
            to: group("ops"),
            body: text("hi"),
            client_msg_id: None,
        })
        .await;
    assert!(is_forbidden(&reply), "{reply:?}");
    let reply = eve
        .request(|id| ClientFrame::Sync {
            id,
            group: "ops".into(),
            since: None,
            limit: None,
        })
        .await;
    assert!(is_forbidden(&reply), "{reply:?}");
    let (_, sent, _, _) = send(&mut alice, group("ops"), text("members only")).await;
    assert_eq!(sent, RouteResult::NoRecipients);

    assert_eq!(
        Rest::new(&nodes[0])
            .put("/groups/ops", Some(json!({"join": "open"})))
            .await,
        204
    );
    let reply = eve
        .request(|id| ClientFrame::Join {
            id,
            group: "ops".into(),
        })
        .await;
    assert!(matches!(reply, ServerFrame::Ok { .. }), "{reply:?}");
    let (_, info) = Rest::new(&nodes[2]).get("/groups/ops").await;
    assert_eq!(
        (info["join"].as_str(), info["members"].as_u64()),
        (Some("open"), Some(2))
    );
    send(&mut alice, group("ops"), text("welcome")).await;
    let m = next_message(&mut eve).await;
    assert_eq!(m.from, "alice");
}
