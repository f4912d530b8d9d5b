//! What every REST endpoint that reads a JSON body must do with any body: answer with a status
//! the contract lists for it (never a 5xx, never a panic), and answer an error with the
//! contract's JSON error (`{"error": {"code", "message"}}`). The first byte of an input picks the endpoint,
//! the rest is the body. Requests go through the whole router of an embedded-backend node in
//! dev mode (API key `dev`), as an app backend's would, minus the socket. Shared by the fuzz
//! target `rest` and the corpus replay test.

use std::net::SocketAddr;

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode, header},
};
use gateway::{Config, api, app};
use tower::ServiceExt;

/// Each endpoint with a JSON body, and the statuses it may answer.
const ENDPOINTS: [(&str, &str, &[u16]); 5] = [
    ("POST", "/v1/tokens", &[200, 400]),
    ("POST", "/v1/presence/query", &[200, 400]),
    ("PUT", "/v1/groups/g1", &[204, 400]),
    ("POST", "/v1/messages", &[200, 400, 403]),
    ("POST", "/v1/users/u1/disconnect", &[202, 400]),
];

/// Requests a node serves before it is replaced by a fresh one: the embedded backend keeps what
/// the requests create (tokens live up to 30 days), which would grow without end in a long run.
const REQUESTS_PER_NODE: u32 = 20_000;

/// One node on a runtime of the caller's thread.
pub struct Rest {
    runtime: tokio::runtime::Runtime,
    node: Option<(app::Running, Router)>,
    served: u32,
}

impl Rest {
    pub fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        Rest {
            runtime,
            node: None,
            served: 0,
        }
    }

    pub fn check(&mut self, data: &[u8]) {
        let Some((&selector, body)) = data.split_first() else {
            return;
        };
        let (method, path, allowed) = ENDPOINTS[usize::from(selector) % ENDPOINTS.len()];
        if self.served >= REQUESTS_PER_NODE {
            self.served = 0;
            if let Some((running, _)) = self.node.take() {
                self.runtime.block_on(running.shutdown());
            }
        }
        self.served += 1;
        let router = match &self.node {
            Some((_, router)) => router.clone(),
            None => {
                let running = self.runtime.block_on(start());
                let router = api::router(running.app.clone());
                self.node = Some((running, router.clone()));
                router
            }
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, "Bearer dev")
            .body(Body::from(body.to_vec()))
            .expect("a request from constant parts");
        let (status, answer) = self.runtime.block_on(async {
            let response = router
                .oneshot(request)
                .await
                .expect("the router is infallible");
            let status = response.status();
            let answer = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("an answer in memory");
            (status, answer)
        });
        let shown = String::from_utf8_lossy(body);
        assert!(
            allowed.contains(&status.as_u16()),
            "{method} {path} {shown:?} answered {status}: {}",
            String::from_utf8_lossy(&answer)
        );
        if status.is_client_error() {
            let error: serde_json::Value = serde_json::from_slice(&answer)
                .unwrap_or_else(|e| panic!("{method} {path} {shown:?}: error body not JSON: {e}"));
            assert!(
                error["error"]["code"].is_string() && error["error"]["message"].is_string(),
                "{method} {path} {shown:?}: {error}"
            );
        } else if status == StatusCode::OK {
            serde_json::from_slice::<serde_json::Value>(&answer)
                .unwrap_or_else(|e| panic!("{method} {path} {shown:?}: answer not JSON: {e}"));
        }
    }
}

impl Default for Rest {
    fn default() -> Self {
        Self::new()
    }
}

async fn start() -> app::Running {
    // No drain delay or spread: nothing balances load onto this node, and the checks restart it.
    let flags = [
        "presence-gateway",
        "--dev",
        "--drain-delay-secs=0",
        "--drain-spread-secs=0",
        "--shutdown-grace-secs=1",
    ];
    let config = Config::try_parse_from_env(flags, |_| None).expect("dev flags parse");
    let bound: SocketAddr = ([127, 0, 0, 1], 9).into();
    app::build(config, bound).await.expect("a dev node builds")
}
