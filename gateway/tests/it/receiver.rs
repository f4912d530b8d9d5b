//! A webhook receiver in the test process: checks each request's signature, records every
//! attempt, and fails on demand (`webhooks.rs`, `drain.rs`, `lb.rs`).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::time::Instant;

pub const SECRET: &str = "webhook-secret";
/// Longest wait for something the gateway should do within seconds, on a loaded machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Hit {
    /// `X-Presence-Event-Id`.
    pub id: String,
    pub signed: bool,
    pub body: Value,
    /// Answered 2xx.
    pub ok: bool,
    pub when: Instant,
}

#[derive(Default)]
pub struct ReceiverState {
    hits: Mutex<Vec<Hit>>,
    /// Every request answered 500 while set.
    pub down: AtomicBool,
    /// The first this-many attempts of each event id answered 500.
    pub fail_first: AtomicUsize,
}

pub struct Receiver {
    pub addr: SocketAddr,
    pub state: Arc<ReceiverState>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let state = Arc::new(ReceiverState::default());
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("receiver address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, state }
    }

    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().expect("lock").clone()
    }

    /// Every attempt at `event` about `user`.
    pub fn attempts(&self, user: &str, event: &str) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.body["user"] == user && h.body["event"] == event)
            .collect()
    }

    /// Waits until `check` holds of what arrived.
    pub async fn wait_for<T>(&self, what: &str, check: impl Fn(&[Hit]) -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let hits = self.hits();
            if let Some(found) = check(&hits) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "never got {what}; got: {hits:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The first accepted delivery of `event` about `user`.
    pub async fn delivered(&self, user: &str, event: &str) -> Hit {
        self.wait_for(&format!("{event} of {user}"), |hits| {
            hits.iter()
                .find(|h| h.ok && h.body["user"] == user && h.body["event"] == event)
                .cloned()
        })
        .await
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let id = header("x-presence-event-id");
    let signed = header("x-presence-signature") == sign(&body);
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut hits = state.hits.lock().expect("lock");
    let earlier = hits.iter().filter(|h| h.id == id).count();
    let ok =
        !state.down.load(Ordering::SeqCst) && earlier >= state.fail_first.load(Ordering::SeqCst);
    hits.push(Hit {
        id,
        signed,
        body,
        ok,
        when: Instant::now(),
    });
    if ok {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}
