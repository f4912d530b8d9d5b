//! Connections: tokens, encodings, heartbeats, limits, malformed and oversized frames, close codes.

use std::time::Duration;

use shared::{ClientFrame, Encoding, ErrorCode, ServerFrame};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::{
    client::{Client, Closed, Rest, jwt, jwt_expiring},
    harness::{Backend, Node, NodeBuilder},
};

fn node() -> Node {
    NodeBuilder::new(&Backend::Embedded).start()
}

fn http_status(e: tungstenite::Error) -> u16 {
    match e {
        tungstenite::Error::Http(resp) => resp.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401() {
    let node = node();
    let bad_secret = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "alice", "platform": 1, "exp": 4_000_000_000u64}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret"),
    )
    .expect("sign");
    for token in [
        String::new(),
        "garbage".to_string(),
        jwt_expiring("alice", 1, -120),
        bad_secret,
        jwt("alice", 9),
        jwt("bad id", 1),
    ] {
        let err = Client::open(&node, &token, Encoding::MsgPack)
            .await
            .err()
            .expect("refused");
        assert_eq!(http_status(err), 401, "token {token:?}");
    }
    let no_token = Client::open_url(&node.ws(), None)
        .await
        .err()
        .expect("refused");
    assert_eq!(http_status(no_token), 401);
}

#[tokio::test]
async fn opaque_tokens_work_and_bearer_header_is_accepted() {
    let node = node();
    let rest = Rest::new(&node);
    let (status, body) = rest
        .post(
            "/tokens",
            serde_json::json!({"user": "alice", "platform": 2, "ttl_secs": 60}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().expect("token");
    assert!(token.len() >= 32, "at least 128 bits");
    assert_eq!(body["node"]["ws_url"], node.ws());

    let mut client = Client::open(&node, token, Encoding::Json)
        .await
        .expect("connect");
    assert!(matches!(
        client.recv().await,
        ServerFrame::Welcome { platform: 2, .. }
    ));

    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = node.ws().into_client_request().expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let (_ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("bearer header accepted");
}

#[tokio::test]
async fn json_by_subprotocol_and_by_format_param() {
    let node = node();
    let mut by_protocol = Client::connect_json(&node, "alice", 5).await;
    assert_eq!(by_protocol.encoding, Encoding::Json);
    assert!(matches!(
        by_protocol.request(|id| ClientFrame::Ping { id }).await,
        ServerFrame::Pong { .. }
    ));

    let url = format!("{}?format=json&token={}", node.ws(), jwt("bob", 5));
    let mut by_param = Client::open_url(&url, None).await.expect("connect");
    assert_eq!(by_param.encoding, Encoding::Json);
    assert!(matches!(by_param.recv().await, ServerFrame::Welcome { .. }));

    let url = format!("{}?format=yaml&token={}", node.ws(), jwt("bob", 5));
    let err = Client::open_url(&url, None).await.err().expect("refused");
    assert_eq!(http_status(err), 400);
}

#[tokio::test]
async fn welcome_comes_first_and_ping_answers_with_its_id() {
    let node = node();
    let mut client = Client::open(&node, &jwt("alice", 1), Encoding::MsgPack)
        .await
        .expect("connect");
    match client.recv().await {
        ServerFrame::Welcome {
            user,
            platform,
            node: node_id,
            heartbeat_ms,
            conn_id,
            server_time,
            expires_at,
        } => {
            assert_eq!((user.as_str(), platform), ("alice", 1));
            assert_eq!(node_id, node.id);
            assert_eq!(heartbeat_ms, 25_000);
            assert!(!conn_id.is_empty() && server_time > 0);
            let expires_at = expires_at.expect("welcome says when the token expires");
            assert!(expires_at > server_time, "{expires_at} > {server_time}");
        }
        other => panic!("expected welcome, got {other:?}"),
    }
    client.send(&ClientFrame::Ping { id: Some(42) }).await;
    assert_eq!(client.recv().await, ServerFrame::Pong { id: Some(42) });
}

#[tokio::test]
async fn malformed_frames_get_errors_and_the_connection_survives() {
    let node = node();
    let mut client = Client::connect(&node, "alice", 1).await;
    client.send_raw(vec![0xc1, 0xff, 0x00]).await;
    assert!(matches!(
        client.recv().await,
        ServerFrame::Error {
            code: ErrorCode::BadRequest,
            id: None,
            ..
        }
    ));

    // Unknown type, but the id is readable: the error names the request.
    let unknown =
        rmp_serde::to_vec_named(&serde_json::json!({"type": "teleport", "id": 9})).expect("encode");
    client.send_raw(unknown).await;
    assert!(matches!(
        client.recv().await,
        ServerFrame::Error {
            code: ErrorCode::BadRequest,
            id: Some(9),
            ..
        }
    ));

    // A text frame on a MessagePack connection.
    client
        .send_message(Message::Text("{\"type\":\"ping\"}".into()))
        .await;
    assert!(matches!(
        client.recv().await,
        ServerFrame::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));

    let mut json = Client::connect_json(&node, "bob", 5).await;
    json.send_raw(b"{\"type\":\"subscribe\",\"id\":3,\"users\":\"alice\"}".to_vec())
        .await;
    assert!(matches!(
        json.recv().await,
        ServerFrame::Error {
            code: ErrorCode::BadRequest,
            id: Some(3),
            ..
        }
    ));
    json.send_raw(b"[1,2,3]".to_vec()).await;
    assert!(matches!(
        json.recv().await,
        ServerFrame::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));

    // Still alive.
    assert!(matches!(
        client.request(|id| ClientFrame::Ping { id }).await,
        ServerFrame::Pong { .. }
    ));
    assert!(matches!(
        json.request(|id| ClientFrame::Ping { id }).await,
        ServerFrame::Pong { .. }
    ));
}

#[tokio::test]
async fn oversized_frames_are_refused() {
    let node = NodeBuilder::new(&Backend::Embedded)
        .arg("--max-frame-bytes=1024")
        .start();
    let mut client = Client::connect_json(&node, "alice", 1).await;
    let padding = "x".repeat(1500);
    let frame = format!("{{\"type\":\"ping\",\"id\":1,\"pad\":\"{padding}\"}}");
    client.send_raw(frame.into_bytes()).await;
    assert!(matches!(
        client.recv().await,
        ServerFrame::Error {
            code: ErrorCode::TooLarge,
            ..
        }
    ));
    assert!(matches!(
        client.request(|id| ClientFrame::Ping { id }).await,
        ServerFrame::Pong { .. }
    ));

    let huge = format!("{{\"type\":\"ping\",\"pad\":\"{}\"}}", "x".repeat(10_000));
    client.send_raw(huge.into_bytes()).await;
    assert_eq!(client.closed().await, Closed::Code(4008));
}

#[tokio::test]
async fn silent_clients_are_closed_with_4010() {
    let node = NodeBuilder::new(&Backend::Embedded)
        .arg("--heartbeat-ms=200")
        .start();
    let mut client = Client::connect(&node, "alice", 1).await;
    // Not reading means not answering pings: the client is silent.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(client.closed().await, Closed::Code(4010));
}

#[tokio::test]
async fn responsive_clients_outlive_many_heartbeats() {
    let node = NodeBuilder::new(&Backend::Embedded)
        .arg("--heartbeat-ms=200")
        .start();
    let mut client = Client::connect(&node, "alice", 1).await;
    // Reading answers pings; nothing else is needed to stay connected.
    client.expect_silence(Duration::from_millis(1000)).await;
    client.expect_silence(Duration::from_millis(500)).await;
    assert!(matches!(
        client.request(|id| ClientFrame::Ping { id }).await,
        ServerFrame::Pong { .. }
    ));
}

#[tokio::test]
async fn too_many_connections_for_one_user_close_with_4009() {
    let node = NodeBuilder::new(&Backend::Embedded)
        .arg("--max-conns-per-user=2")
        .start();
    let _a = Client::connect(&node, "alice", 1).await;
    let _b = Client::connect(&node, "alice", 2).await;
    let mut third = Client::open(&node, &jwt("alice", 3), Encoding::MsgPack)
        .await
        .expect("upgrade");
    assert_eq!(third.closed().await, Closed::Code(4009));
    // Another user is unaffected.
    Client::connect(&node, "bob", 1).await;
}

#[tokio::test]
async fn frame_rate_over_the_limit_is_refused() {
    let node = NodeBuilder::new(&Backend::Embedded)
        .arg("--rate-limit=5")
        .start();
    let mut client = Client::connect(&node, "alice", 1).await;
    for i in 0..20 {
        client.send(&ClientFrame::Ping { id: Some(100 + i) }).await;
    }
    let mut limited = 0;
    let mut pongs = 0;
    for _ in 0..20 {
        match client.recv().await {
            ServerFrame::Pong { .. } => pongs += 1,
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                id: Some(_),
                ..
            } => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        pongs >= 5 && limited >= 10,
        "pongs {pongs}, limited {limited}"
    );
}

#[tokio::test]
async fn subscriptions_are_capped_per_connection() {
    let node = node();
    let mut client = Client::connect(&node, "alice", 1).await;
    let first: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
    assert!(matches!(
        client
            .request(|id| ClientFrame::Subscribe { id, users: first })
            .await,
        ServerFrame::PresenceList { .. }
    ));
    let reply = client
        .request(|id| ClientFrame::Subscribe {
            id,
            users: vec!["one-more".into()],
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
        "{reply:?}"
    );
}

#[tokio::test]
async fn disallowed_origins_are_refused() {
    let node = NodeBuilder::new(&Backend::Embedded)
        .arg("--allowed-origins=https://app.example")
        .start();
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("{}?token={}", node.ws(), jwt("alice", 1));
    let mut request = url.clone().into_client_request().expect("request");
    request
        .headers_mut()
        .insert("origin", "https://evil.example".parse().expect("header"));
    let err = tokio_tungstenite::connect_async(request)
        .await
        .expect_err("refused");
    assert_eq!(http_status(err), 403);
    let mut request = url.into_client_request().expect("request");
    request
        .headers_mut()
        .insert("origin", "https://app.example".parse().expect("header"));
    tokio_tungstenite::connect_async(request)
        .await
        .expect("allowed origin");
}
