//! The REST API: API key, validation, error shape, health, readiness and metrics.

use serde_json::json;

use crate::{
    client::Rest,
    harness::{Backend, NodeBuilder},
};

#[tokio::test]
async fn v1_requires_the_api_key() {
    let node = NodeBuilder::new(&Backend::Embedded).start();
    let http = reqwest::Client::new();
    for key in [None, Some("wrong"), Some("test-ke")] {
        let mut request = http.get(format!("{}/v1/stats", node.http()));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let resp = request.send().await.expect("GET");
        assert_eq!(resp.status(), 401);
        let body: serde_json::Value = resp.json().await.expect("json");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
}

#[tokio::test]
async fn without_a_configured_key_v1_refuses_everything() {
    let node = NodeBuilder::new(&Backend::Embedded)
        .arg("--api-key=")
        .start();
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/stats", node.http()))
        .bearer_auth("")
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn bad_requests_get_contract_errors() {
    let node = NodeBuilder::new(&Backend::Embedded).start();
    let rest = Rest::new(&node);
    let cases = [
        ("/tokens", json!({"user": "a b", "platform": 1})),
        ("/tokens", json!({"user": "alice", "platform": 0})),
        ("/tokens", json!({"user": "alice"})),
        (
            "/tokens",
            json!({"user": "alice", "platform": 1, "ttl_secs": 0}),
        ),
        ("/presence/query", json!({"users": ["ok", "not ok"]})),
        (
            "/presence/query",
            json!({"users": (0..1001).map(|i| format!("u{i}")).collect::<Vec<_>>()}),
        ),
    ];
    for (path, body) in cases {
        let (status, answer) = rest.post(path, body.clone()).await;
        assert_eq!(status, 400, "{path} {body}: {answer}");
        assert_eq!(answer["error"]["code"], "bad_request");
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    for path in [
        "/online?limit=0",
        "/online?limit=1001",
        "/online?platform=9",
        "/presence/bad%20id",
        "/online?limit=-5",
        "/online?limit=abc",
        "/groups/g/members?limit=-1",
        "/groups/g/history?limit=x",
    ] {
        let (status, answer) = rest.get(path).await;
        assert_eq!(status, 400, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], "bad_request", "{path}: JSON error");
    }
    let (status, answer) = rest.get("/no/such/thing").await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    // Over the body limit: 413 with the contract's error, not a plain 400. Last, on a client of
    // its own: the server closes the connection without reading the rest of the body.
    let huge = "x".repeat(3 << 20);
    let (status, answer) = Rest::new(&node)
        .post("/presence/query", json!({"users": [huge]}))
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (413, Some("too_large")),
        "{answer}"
    );
}

#[tokio::test]
async fn health_readiness_metrics_and_nodes() {
    let node = NodeBuilder::new(&Backend::Embedded).start();
    let get = |path: &str| reqwest::get(format!("{}{path}", node.http()));
    assert_eq!(get("/healthz").await.expect("healthz").status(), 200);
    assert_eq!(get("/readyz").await.expect("readyz").status(), 200);
    let _client = crate::client::Client::connect(&node, "alice", 1).await;
    // The backend gauge is set by the first registry tick, moments after start.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = get("/metrics")
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let missing: Vec<&str> = [
            "presence_connections",
            "presence_connects_total",
            "presence_backend_up",
        ]
        .into_iter()
        .filter(|name| !text.contains(name))
        .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing:?} missing from /metrics"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (status, nodes) = Rest::new(&node).get("/nodes").await;
    assert_eq!(status, 200);
    let list = nodes["nodes"].as_array().expect("nodes");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], node.id);
    assert_eq!(list[0]["ws_url"], node.ws());
    // The node's stdout is a pipe here, not a terminal: no colour codes in its logs.
    let logs = node.logs();
    assert!(logs.contains("listening"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "ANSI escape codes in piped logs");
}
