//! Token lifetime and the app backend's control of sessions: expiry closes with 4001 unless the
//! client refreshed; disconnect (4003) and revoke (4001) reach connections on every node.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use shared::{ClientFrame, Encoding, ErrorCode, ServerFrame};

use crate::{
    client::{Client, Closed, Rest, jwt, jwt_expiring, jwt_issued},
    harness::{Backend, NodeBuilder, Redis},
};

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

async fn open(node: &crate::harness::Node, token: &str) -> Client {
    let mut client = Client::open(node, token, Encoding::MsgPack)
        .await
        .expect("connect");
    let welcome = client.recv().await;
    assert!(
        matches!(welcome, ServerFrame::Welcome { .. }),
        "{welcome:?}"
    );
    client
}

/// A token that expires closes its connection with 4001; one refreshed in time does not, and a
/// token of someone else does not refresh anything.
#[tokio::test]
async fn expired_tokens_close_with_4001_unless_refreshed() {
    let node = NodeBuilder::new(&Backend::Embedded).start();
    let mut stale = open(&node, &jwt_expiring("alice", 1, 2)).await;
    let mut fresh = open(&node, &jwt_expiring("bob", 1, 2)).await;

    let reply = fresh
        .request(|id| ClientFrame::Refresh {
            id,
            token: jwt("mallory", 1),
        })
        .await;
    assert!(
        matches!(
            reply,
            ServerFrame::Error {
                code: ErrorCode::Unauthorized,
                ..
            }
        ),
        "{reply:?}"
    );
    let reply = fresh
        .request(|id| ClientFrame::Refresh {
            id,
            token: jwt("bob", 2),
        })
        .await;
    assert!(
        matches!(
            reply,
            ServerFrame::Error {
                code: ErrorCode::Unauthorized,
                ..
            }
        ),
        "another platform: {reply:?}"
    );
    let reply = fresh
        .request(|id| ClientFrame::Refresh {
            id,
            token: jwt("bob", 1),
        })
        .await;
    match reply {
        ServerFrame::Ok {
            expires_at: Some(at),
            ..
        } => assert!(at > (now_secs() + 3000) * 1000, "{at}"),
        other => panic!("{other:?}"),
    }

    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), stale.closed())
            .await
            .expect("closed in time"),
        Closed::Code(4001)
    );
    assert_eq!(stale.close_reason.as_deref(), Some("token expired"));
    let reply = fresh.request(|id| ClientFrame::Ping { id }).await;
    assert!(matches!(reply, ServerFrame::Pong { .. }), "{reply:?}");
}

/// Disconnect and revoke, asked of any node, reach the user's connections on every node; after a
/// revoke the old tokens (JWT and opaque) are refused, newer ones are not.
#[tokio::test]
async fn disconnect_and_revoke_reach_every_node() {
    let redis = Redis::start();
    let backend = Backend::Redis(redis.url());
    let nodes: Vec<_> = (0..3).map(|_| NodeBuilder::new(&backend).start()).collect();
    let rest = Rest::new(&nodes[2]);
    let issued = now_secs();
    let old_jwt = jwt_issued("alice", 2, issued);
    let (status, minted) = rest
        .post("/tokens", json!({"user": "alice", "platform": 5}))
        .await;
    assert_eq!(status, 200);
    let old_opaque = minted["token"].as_str().expect("token").to_string();

    let mut phone = Client::connect(&nodes[0], "alice", 1).await;
    let mut laptop = open(&nodes[1], &old_jwt).await;
    let mut web = open(&nodes[2], &old_opaque).await;
    let mut bob = Client::connect(&nodes[0], "bob", 1).await;

    let (status, _) = rest
        .post(
            "/users/alice/disconnect",
            json!({"platforms": [1], "reason": "banned from mobile"}),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(phone.closed().await, Closed::Code(4003));
    assert_eq!(phone.close_reason.as_deref(), Some("banned from mobile"));
    for c in [&mut laptop, &mut web, &mut bob] {
        let reply = c.request(|id| ClientFrame::Ping { id }).await;
        assert!(matches!(reply, ServerFrame::Pong { .. }), "{reply:?}");
    }

    // Revoke through another node; JWT iat has whole seconds, so the next token is minted in a
    // later second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _) = Rest::new(&nodes[1])
        .post("/users/alice/revoke", json!({}))
        .await;
    assert_eq!(status, 202);
    assert_eq!(laptop.closed().await, Closed::Code(4001));
    assert_eq!(web.closed().await, Closed::Code(4001));
    let reply = bob.request(|id| ClientFrame::Ping { id }).await;
    assert!(matches!(reply, ServerFrame::Pong { .. }), "{reply:?}");

    for (node, token) in [(&nodes[0], &old_jwt), (&nodes[1], &old_opaque)] {
        let mut again = Client::open(node, token, Encoding::MsgPack)
            .await
            .expect("upgrade");
        assert_eq!(again.closed().await, Closed::Code(4001), "old token");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut renewed = open(&nodes[0], &jwt_issued("alice", 2, now_secs())).await;
    let reply = renewed.request(|id| ClientFrame::Ping { id }).await;
    assert!(matches!(reply, ServerFrame::Pong { .. }), "{reply:?}");
    let (status, minted) = rest
        .post("/tokens", json!({"user": "alice", "platform": 5}))
        .await;
    assert_eq!(status, 200);
    let _ = open(&nodes[1], minted["token"].as_str().expect("token")).await;
}

/// The app backend's messages come from `system`: no client may be that user.
#[tokio::test]
async fn nobody_may_be_the_system_user() {
    let node = NodeBuilder::new(&Backend::Embedded).start();
    let (status, body) = Rest::new(&node)
        .post("/tokens", json!({"user": "system", "platform": 1}))
        .await;
    assert_eq!(status, 400, "{body}");
    let refused = Client::open(&node, &jwt("system", 1), Encoding::MsgPack).await;
    assert!(refused.is_err(), "a JWT for system is refused");
}

/// The app backend lists a user's connections across nodes.
#[tokio::test]
async fn connections_are_listed_across_nodes() {
    let redis = Redis::start();
    let backend = Backend::Redis(redis.url());
    let nodes: Vec<_> = (0..2).map(|_| NodeBuilder::new(&backend).start()).collect();
    let mut phone = Client::connect(&nodes[0], "alice", 1).await;
    let mut web = Client::connect_json(&nodes[1], "alice", 5).await;
    for c in [&mut phone, &mut web] {
        let reply = c.request(|id| ClientFrame::Ping { id }).await;
        assert!(matches!(reply, ServerFrame::Pong { .. }), "{reply:?}");
    }
    let (status, body) = Rest::new(&nodes[1]).get("/users/alice/connections").await;
    assert_eq!(status, 200, "{body}");
    let conns = body["connections"].as_array().expect("list");
    let mut seen: Vec<(String, u64)> = conns
        .iter()
        .map(|c| {
            assert!(c["conn_id"].as_str().is_some_and(|s| !s.is_empty()), "{c}");
            assert!(c["connected_at"].as_u64().is_some_and(|t| t > 0), "{c}");
            assert!(
                c["remote_addr"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("127.")),
                "{c}"
            );
            (
                c["node"].as_str().expect("node").to_string(),
                c["platform"].as_u64().expect("platform"),
            )
        })
        .collect();
    seen.sort();
    let mut expected = vec![(nodes[0].id.clone(), 1), (nodes[1].id.clone(), 5)];
    expected.sort();
    assert_eq!(seen, expected);
    let (_, body) = Rest::new(&nodes[0]).get("/users/nobody/connections").await;
    assert_eq!(body, json!({"connections": []}));
}

/// Whether the connection is still open once every node had its chance to close it: the
/// replacement is announced at once, and each login checks again a second after it connected.
async fn still_open(client: &mut Client) -> bool {
    match tokio::time::timeout(Duration::from_millis(1800), async {
        client.send(&ClientFrame::Ping { id: Some(999) }).await;
        client.closed().await
    })
    .await
    {
        Ok(Closed::Code(4011)) => false,
        Ok(other) => panic!("closed with {other:?}"),
        Err(_) => true,
    }
}

/// `platform`: a new login replaces the older one on the same platform, on another node; other
/// platforms stay.
#[tokio::test]
async fn a_newer_login_replaces_the_older_on_its_platform() {
    let redis = Redis::start();
    let backend = Backend::Redis(redis.url());
    let nodes: Vec<_> = (0..2)
        .map(|_| {
            NodeBuilder::new(&backend)
                .arg("--multi-login=platform")
                .start()
        })
        .collect();
    let mut old_phone = Client::connect(&nodes[0], "alice", 1).await;
    let mut web = Client::connect(&nodes[0], "alice", 5).await;
    let mut new_phone = Client::connect(&nodes[1], "alice", 1).await;
    assert_eq!(old_phone.closed().await, Closed::Code(4011));
    assert!(still_open(&mut web).await);
    assert!(still_open(&mut new_phone).await);
}

/// `single`: two logins racing on two nodes leave exactly one connection.
#[tokio::test]
async fn racing_logins_leave_exactly_one() {
    let redis = Redis::start();
    let backend = Backend::Redis(redis.url());
    let nodes: Vec<_> = (0..2)
        .map(|_| {
            NodeBuilder::new(&backend)
                .arg("--multi-login=single")
                .start()
        })
        .collect();
    for round in 0..2 {
        let user = format!("racer{round}");
        let (mut a, mut b) = tokio::join!(
            Client::connect(&nodes[0], &user, 1),
            Client::connect(&nodes[1], &user, 2)
        );
        let (a_open, b_open) = tokio::join!(still_open(&mut a), still_open(&mut b));
        assert!(
            a_open ^ b_open,
            "round {round}: exactly one survives ({a_open}, {b_open})"
        );
    }
}

/// The same on the embedded backend, and its connection listing.
#[tokio::test]
async fn embedded_multi_login_and_listing() {
    let node = NodeBuilder::new(&Backend::Embedded)
        .arg("--multi-login=single")
        .start();
    let mut first = Client::connect(&node, "alice", 1).await;
    let mut second = Client::connect(&node, "alice", 2).await;
    assert_eq!(first.closed().await, Closed::Code(4011));
    assert!(still_open(&mut second).await);
    let (_, body) = Rest::new(&node).get("/users/alice/connections").await;
    let conns = body["connections"].as_array().expect("list");
    assert_eq!(conns.len(), 1, "{body}");
    assert_eq!(conns[0]["platform"], 2);
}
