//! Hostile clients against a real node: each attack must leave the node under its stated bound.

use std::time::Duration;

use serde_json::json;
use shared::{Body, ClientFrame, Destination, ErrorCode, ServerFrame};

use crate::{
    client::{Client, Rest},
    harness::{Backend, NodeBuilder},
};

/// A member who never reads asks for the whole history of a group of 60 KB messages, again and
/// again. Each reply is cut at `PRESENCE_MAX_REPLY_BYTES` and the connection's queue at
/// `PRESENCE_OUTBOUND_QUEUE_BYTES`, so the node grows by at most about
/// queue + in-flight replies (4 + 16 × 1 MiB) however many requests come, and the attacker is
/// closed as a slow consumer. (Before the byte bounds: +1.8 GiB in under a second.)
#[tokio::test]
async fn a_reader_that_never_reads_cannot_grow_the_node() {
    let node = NodeBuilder::new(&Backend::Embedded).start();
    let rest = Rest::new(&node);
    assert_eq!(rest.put("/groups/big/members/mallory", None).await, 204);
    let chunk = "x".repeat(60_000);
    for i in 0..300 {
        let (status, body) = rest
            .post(
                "/messages",
                json!({"to": {"group": "big"}, "body": {"n": i, "pad": chunk}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let mut mallory = Client::connect(&node, "mallory", 1).await;
    // One honest look: a full `sync` comes back cut, with `more`.
    let reply = mallory
        .request(|id| ClientFrame::Sync {
            id,
            group: "big".into(),
            since: None,
            limit: Some(500),
        })
        .await;
    match reply {
        ServerFrame::History { messages, more, .. } => {
            assert!(more, "cut at the reply bound");
            assert!(
                (1..300).contains(&messages.len()),
                "{} messages",
                messages.len()
            );
        }
        other => panic!("{other:?}"),
    }
    let before = node.rss_bytes();
    for i in 0..60 {
        mallory
            .send(&ClientFrame::Sync {
                id: Some(1000 + i),
                group: "big".into(),
                since: None,
                limit: Some(500),
            })
            .await;
    }
    let mut peak = before;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peak = peak.max(node.rss_bytes());
    }
    let grew_mib = (peak.saturating_sub(before)) as f64 / (1 << 20) as f64;
    assert!(grew_mib < 64.0, "the node grew by {grew_mib:.1} MiB");
    let closed = node.metric("presence_slow_consumer_closes_total").await;
    assert!(closed >= 1.0, "the attacker is closed as a slow consumer");
    // And the memory goes back once the attacker is gone (the allocator returns freed pages
    // after a short delay).
    drop(mallory);
    let mut after = peak;
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = node.rss_bytes();
        if after < before + (16 << 20) {
            break;
        }
    }
    let left_mib = after.saturating_sub(before) as f64 / (1 << 20) as f64;
    assert!(
        left_mib < 16.0,
        "{left_mib:.1} MiB still held after the attacker left"
    );
}

/// Bodies that not every client could read are refused before anything is stored or sent.
#[tokio::test]
async fn poison_bodies_are_refused_in_both_encodings() {
    let node = NodeBuilder::new(&Backend::Embedded).start();
    let rest = Rest::new(&node);
    assert_eq!(rest.put("/groups/g/members/alice", None).await, 204);
    let mut deep = Body::from(1);
    for _ in 0..40 {
        deep = Body::Array(vec![deep]);
    }
    let poison = [
        Body::Map(vec![(Body::Binary(b"k".to_vec()), Body::from(1))]),
        Body::Map(vec![(Body::Nil, Body::from(1))]),
        Body::Map(vec![(Body::Array(vec![]), Body::from(1))]),
        deep,
    ];
    let mut alice = Client::connect(&node, "alice", 1).await;
    for body in poison {
        let reply = alice
            .request(|id| ClientFrame::Send {
                id,
                to: Destination::Group { group: "g".into() },
                body: body.clone(),
                client_msg_id: None,
            })
            .await;
        assert!(
            matches!(
                reply,
                ServerFrame::Error {
                    code: ErrorCode::BadRequest,
                    ..
                }
            ),
            "{body:?}: {reply:?}"
        );
    }
    let mut deep_json = json!(1);
    for _ in 0..40 {
        deep_json = json!([deep_json]);
    }
    let (status, _) = rest
        .post(
            "/messages",
            json!({"to": {"group": "g"}, "body": deep_json}),
        )
        .await;
    assert_eq!(status, 400);
    let (_, history) = rest.get("/groups/g/history").await;
    assert_eq!(history["messages"], json!([]), "nothing was stored");
}

/// 2,000 sockets that never send a request, and one that sends its headers a byte at a time, are
/// closed within the header timeout; the health endpoint answers throughout.
#[tokio::test]
async fn silent_and_slowloris_sockets_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = NodeBuilder::new(&Backend::Embedded)
        .arg("--header-timeout-ms=1000")
        .start();
    let addr = node.addr;
    let mut silent = Vec::new();
    for _ in 0..2000 {
        silent.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let drip = tokio::spawn(async move {
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .cycle()
            .take(100)
        {
            if slow.write_all(&[*byte]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        let health = reqwest::get(format!("{}/healthz", node.http()))
            .await
            .expect("healthz answers while 2,000 sockets sit silent");
        assert_eq!(health.status(), 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut buf = [0u8; 64];
    for (i, mut s) in silent.into_iter().enumerate() {
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "silent socket {i} still open: {read:?}"
        );
    }
    assert!(drip.await.expect("drip"), "the slowloris socket was closed");
}

/// Past `PRESENCE_MAX_CONNECTIONS` sessions, upgrades get 503 and the REST API still answers.
#[tokio::test]
async fn the_session_limit_keeps_room_for_the_api() {
    let node = NodeBuilder::new(&Backend::Embedded)
        .arg("--max-connections=2")
        .start();
    let _a = Client::connect(&node, "a", 1).await;
    let _b = Client::connect(&node, "b", 1).await;
    let refused = Client::open(
        &node,
        &crate::client::jwt("c", 1),
        shared::Encoding::MsgPack,
    )
    .await;
    assert!(refused.is_err(), "a third session is refused");
    let (status, _) = Rest::new(&node).get("/nodes").await;
    assert_eq!(status, 200);
}

/// One client sends 64 KB private messages to hundreds of made-up (offline) users: its budget of
/// stored messages cuts it off, and Redis keeps only what the budget allowed. Messages to online
/// users still go; the app backend has no budget.
#[tokio::test]
async fn a_client_cannot_fill_the_offline_store() {
    let redis = crate::harness::Redis::start();
    let node = NodeBuilder::new(&Backend::Redis(redis.url()))
        .arg("--store-quota-messages=20")
        .arg("--store-quota-bytes=100000000")
        .start();
    let mut spammer = Client::connect(&node, "spammer", 1).await;
    let mut friend = Client::connect(&node, "friend", 1).await;
    let big = Body::from("x".repeat(60_000));
    let (mut stored, mut refused) = (0, 0);
    for i in 0..60 {
        let reply = spammer
            .request(|id| ClientFrame::Send {
                id,
                to: Destination::User {
                    user: format!("ghost{i}"),
                },
                body: big.clone(),
                client_msg_id: None,
            })
            .await;
        match reply {
            ServerFrame::Ack { stored: 1, .. } => stored += 1,
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                ..
            } => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((stored, refused), (20, 40));
    let streams = redis.cli(&["--scan", "--pattern", "presence:ib:*"]);
    assert_eq!(streams.lines().count(), 20, "only the budget was stored");
    // Live delivery is not stored, so it is not cut.
    let reply = spammer
        .request(|id| ClientFrame::Send {
            id,
            to: Destination::User {
                user: "friend".into(),
            },
            body: Body::from("hi"),
            client_msg_id: None,
        })
        .await;
    assert!(
        matches!(reply, ServerFrame::Ack { stored: 0, .. }),
        "{reply:?}"
    );
    let got = friend
        .expect(|f| match f {
            ServerFrame::Message(m) => Some(m.from.clone()),
            _ => None,
        })
        .await;
    assert_eq!(got, "spammer");
    let (status, answer) = Rest::new(&node)
        .post(
            "/messages",
            json!({"to": {"user": "ghost-app"}, "body": "from the app", "from": "spammer"}),
        )
        .await;
    assert_eq!(
        (status, answer["stored"].as_u64()),
        (200, Some(1)),
        "{answer}"
    );
}
