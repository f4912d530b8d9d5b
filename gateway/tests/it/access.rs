//! The authorization hook: an HTTP server in the test process plays the app backend's hook (checks
//! each request's signature, records it, answers per group or user); gateway nodes ask it before
//! `join` and `subscribe`.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    routing::post,
};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use shared::{ClientFrame, ErrorCode, Presence, ServerFrame, Status};

use crate::{
    client::{Client, Rest},
    harness::{Node, NodeBuilder},
    presence::Setup,
};

const SECRET: &str = "hook-secret";

/// The app backend's hook as the tests play it. The subject is the group of a `join` and the
/// subscribing user of a `subscribe`; by its first letters:
/// - `slow`: answered after 3 s; `lag`: after 500 ms, then as usual;
/// - `err`: 500; `junk`: 200 with a body that is no answer;
/// - `no` (joins): `{"allow": false}`;
/// - otherwise joins are allowed, and subscribes get `{"allow": [users]}` without the users in
///   `hidden`, or `{"allow": true}` when it names none of them.
struct Hook {
    addr: SocketAddr,
    state: Arc<HookState>,
}

#[derive(Default)]
struct HookState {
    calls: Mutex<Vec<Value>>,
    bad_signatures: AtomicUsize,
    hidden: Mutex<HashSet<String>>,
}

impl Hook {
    async fn start() -> Hook {
        let state = Arc::new(HookState::default());
        let app = Router::new()
            .route("/authz", post(answer))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the hook");
        let addr = listener.local_addr().expect("hook address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Hook { addr, state }
    }

    /// A node of `setup` asking this hook.
    fn node(&self, setup: &Setup) -> NodeBuilder {
        setup
            .node()
            .arg(format!("--auth-hook-url=http://{}/authz", self.addr))
            .arg(format!("--webhook-secret={SECRET}"))
    }

    fn hide(&self, users: &[&str]) {
        let mut hidden = self.state.hidden.lock().expect("lock");
        hidden.clear();
        hidden.extend(users.iter().map(|u| u.to_string()));
    }

    fn calls(&self) -> Vec<Value> {
        self.state.calls.lock().expect("lock").clone()
    }

    /// Every request carried a valid signature.
    fn assert_signed(&self) {
        assert_eq!(self.state.bad_signatures.load(Ordering::Relaxed), 0);
    }
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn answer(
    State(state): State<Arc<HookState>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
    let json_type = [(header::CONTENT_TYPE, "application/json")];
    let signed = headers
        .get("x-presence-signature")
        .and_then(|v| v.to_str().ok());
    if signed != Some(sign(&body).as_str()) {
        state.bad_signatures.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::UNAUTHORIZED, json_type, "{}".into());
    }
    let ask: Value = serde_json::from_slice(&body).expect("the hook's request is JSON");
    state.calls.lock().expect("lock").push(ask.clone());
    let subject = match ask["action"].as_str() {
        Some("join") => ask["group"].as_str(),
        Some("subscribe") => ask["user"].as_str(),
        _ => None,
    }
    .unwrap_or_default()
    .to_string();
    if subject.starts_with("slow") {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    if subject.starts_with("lag") {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if subject.starts_with("err") {
        return (StatusCode::INTERNAL_SERVER_ERROR, json_type, "{}".into());
    }
    if subject.starts_with("junk") {
        return (StatusCode::OK, json_type, r#""yes""#.into());
    }
    let allow = if ask["action"] == "join" {
        json!(!subject.starts_with("no"))
    } else {
        let hidden = state.hidden.lock().expect("lock");
        let users: Vec<&str> = ask["users"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if users.iter().any(|u| hidden.contains(*u)) {
            json!(
                users
                    .into_iter()
                    .filter(|u| !hidden.contains(*u))
                    .collect::<Vec<_>>()
            )
        } else {
            json!(true)
        }
    };
    (
        StatusCode::OK,
        json_type,
        json!({"allow": allow}).to_string(),
    )
}

async fn open_group(rest: &Rest, group: &str) {
    let status = rest
        .put(&format!("/groups/{group}"), Some(json!({"join": "open"})))
        .await;
    assert_eq!(status, 204, "opening {group}");
}

async fn join(client: &mut Client, group: &str) -> ServerFrame {
    client
        .request(|id| ClientFrame::Join {
            id,
            group: group.into(),
        })
        .await
}

async fn subscribe(client: &mut Client, users: &[&str]) -> (Vec<Presence>, Option<Vec<String>>) {
    let users = users.iter().map(|u| u.to_string()).collect();
    match client
        .request(|id| ClientFrame::Subscribe { id, users })
        .await
    {
        ServerFrame::PresenceList { items, denied, .. } => (items, denied),
        other => panic!("expected presence_list, got {other:?}"),
    }
}

fn names(items: &[Presence]) -> Vec<&str> {
    items.iter().map(|p| p.user.as_str()).collect()
}

fn assert_forbidden(reply: &ServerFrame) {
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

async fn members(rest: &Rest, group: &str) -> Value {
    let (status, body) = rest.get(&format!("/groups/{group}/members")).await;
    assert_eq!(status, 200, "{body}");
    body["users"].clone()
}

/// `presence_auth_hook_calls_total{result="..."}` of a node.
async fn hook_calls(node: &Node, result: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", node.http()))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    let prefix = format!("presence_auth_hook_calls_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Sets `who`'s status and waits until REST shows it, so its event has gone out.
async fn change_status(who: &mut Client, user: &str, status: Status, rest: &Rest) {
    who.set_status(status, None).await;
    let expected = json!(status);
    rest.wait_presence(user, |p| p["status"] == expected).await;
}

/// Reads `client`'s frames until `user`'s presence shows `status`, failing on any presence event
/// about a user in `never`.
async fn presence_until(client: &mut Client, user: &str, status: Status, never: &[&str]) {
    loop {
        if let ServerFrame::Presence(p) = client.recv().await {
            assert!(
                !never.contains(&p.user.as_str()),
                "event about {}: {p:?}",
                p.user
            );
            if p.user == user && p.status == status {
                return;
            }
        }
    }
}

/// The hook decides joins of open groups; a closed group refuses non-members without asking, and
/// asks for its members; a refused join adds no member.
#[tokio::test]
async fn joins_ask_the_hook() {
    let hook = Hook::start().await;
    let setup = Setup::new("embedded");
    let node = hook.node(&setup).start();
    let rest = Rest::new(&node);
    let mut alice = Client::connect(&node, "alice", 2).await;
    open_group(&rest, "ok-room").await;
    open_group(&rest, "no-room").await;

    let reply = join(&mut alice, "ok-room").await;
    assert!(matches!(reply, ServerFrame::Ok { .. }), "{reply:?}");
    assert_forbidden(&join(&mut alice, "no-room").await);
    assert_eq!(
        hook.calls(),
        vec![
            json!({"action": "join", "user": "alice", "platform": 2, "group": "ok-room"}),
            json!({"action": "join", "user": "alice", "platform": 2, "group": "no-room"}),
        ]
    );
    assert_eq!(members(&rest, "ok-room").await, json!(["alice"]));
    assert_eq!(members(&rest, "no-room").await, json!([]));

    // Closed (the default), alice not a member: refused before the hook is asked.
    assert_forbidden(&join(&mut alice, "ok-closed").await);
    assert_eq!(hook.calls().len(), 2);
    // A member joining again is asked about like anyone.
    for group in ["ok-closed", "no-closed"] {
        let status = rest
            .put(&format!("/groups/{group}/members/alice"), None)
            .await;
        assert_eq!(status, 204);
    }
    let reply = join(&mut alice, "ok-closed").await;
    assert!(matches!(reply, ServerFrame::Ok { .. }), "{reply:?}");
    assert_forbidden(&join(&mut alice, "no-closed").await);
    assert_eq!(hook.calls().len(), 4);
    assert_eq!(hook_calls(&node, "allow").await, 2.0);
    assert_eq!(hook_calls(&node, "deny").await, 2.0);
    hook.assert_signed();
}

macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test] async fn $test() { super::$test(super::Setup::new("embedded")).await })*
        }
        mod redis {
            $(#[tokio::test] async fn $test() { super::$test(super::Setup::new("redis")).await })*
        }
    };
}

on_both_backends!(subscribe_gets_only_what_the_hook_allows);

/// One call per subscribe with all its users; a partial answer subscribes only the allowed users
/// (`denied` names the rest, which get no events), and a later answer denying a watched user
/// drops them.
async fn subscribe_gets_only_what_the_hook_allows(setup: Setup) {
    let hook = Hook::start().await;
    hook.hide(&["carol"]);
    let node = hook.node(&setup).start();
    let rest = Rest::new(&node);
    let mut bob = Client::connect(&node, "bob", 1).await;
    let mut alice = Client::connect(&node, "alice", 5).await;
    rest.wait_presence("bob", |p| p["status"] == "online").await;

    let (items, denied) = subscribe(&mut alice, &["bob", "carol", "dave"]).await;
    assert_eq!(names(&items), ["bob", "dave"]);
    assert_eq!(items[0].status, Status::Online);
    assert_eq!(denied, Some(vec!["carol".to_string()]));
    assert_eq!(
        hook.calls(),
        vec![
            json!({"action": "subscribe", "user": "alice", "platform": 5, "users": ["bob", "carol", "dave"]})
        ]
    );

    // carol comes online: alice hears nothing of it; bob's change reaches her.
    let _carol = Client::connect(&node, "carol", 1).await;
    rest.wait_presence("carol", |p| p["status"] == "online")
        .await;
    change_status(&mut bob, "bob", Status::Away, &rest).await;
    presence_until(&mut alice, "bob", Status::Away, &["carol"]).await;

    // Everything allowed: no `denied` field.
    let (items, denied) = subscribe(&mut alice, &["erin"]).await;
    assert_eq!(names(&items), ["erin"]);
    assert_eq!(denied, None);

    // The app no longer allows bob: a subscribe naming him drops the watch alice had.
    hook.hide(&["bob"]);
    let (items, denied) = subscribe(&mut alice, &["bob", "dave"]).await;
    assert_eq!(names(&items), ["dave"]);
    assert_eq!(denied, Some(vec!["bob".to_string()]));
    change_status(&mut bob, "bob", Status::Busy, &rest).await;
    alice.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(hook.calls().len(), 3);
    assert_eq!(hook_calls(&node, "partial").await, 2.0);
    assert_eq!(hook_calls(&node, "allow").await, 1.0);
    hook.assert_signed();
}

/// A hook that answers too late, fails with 500 or answers nonsense refuses with `forbidden`,
/// for joins and subscribes alike; the connection carries on.
#[tokio::test]
async fn a_failing_hook_refuses() {
    let hook = Hook::start().await;
    let setup = Setup::new("embedded");
    let node = hook.node(&setup).arg("--auth-hook-timeout-ms=300").start();
    let rest = Rest::new(&node);
    let mut alice = Client::connect(&node, "alice", 1).await;
    for group in ["slow-room", "err-room", "junk-room"] {
        open_group(&rest, group).await;
        let started = Instant::now();
        assert_forbidden(&join(&mut alice, group).await);
        assert!(started.elapsed() < Duration::from_secs(2), "{group}");
        assert_eq!(members(&rest, group).await, json!([]));
    }

    let mut bob = Client::connect(&node, "bob", 1).await;
    for subscriber in ["slow-sue", "err-sue", "junk-sue"] {
        let mut sue = Client::connect(&node, subscriber, 1).await;
        let reply = sue
            .request(|id| ClientFrame::Subscribe {
                id,
                users: vec!["bob".into()],
            })
            .await;
        assert_forbidden(&reply);
        if subscriber == "slow-sue" {
            let ServerFrame::Error { message, .. } = reply else {
                unreachable!()
            };
            assert!(message.contains("in time"), "{message}");
        }
        // Refused: not watching bob.
        change_status(&mut bob, "bob", Status::Away, &rest).await;
        change_status(&mut bob, "bob", Status::Online, &rest).await;
        sue.expect_silence(Duration::from_millis(200)).await;
        let pong = sue.request(|id| ClientFrame::Ping { id }).await;
        assert!(matches!(pong, ServerFrame::Pong { .. }), "{pong:?}");
    }
    assert_eq!(hook_calls(&node, "timeout").await, 2.0);
    assert_eq!(hook_calls(&node, "error").await, 4.0);
    hook.assert_signed();
}

/// With a cache, a repeated request (same user, platform, action and group or set of users) is
/// answered without a call; another platform is another request; failures are not kept.
#[tokio::test]
async fn cached_answers_save_calls() {
    let hook = Hook::start().await;
    hook.hide(&["carol"]);
    let setup = Setup::new("embedded");
    let node = hook.node(&setup).arg("--auth-hook-cache-secs=60").start();
    let rest = Rest::new(&node);
    let mut alice = Client::connect(&node, "alice", 1).await;
    open_group(&rest, "ok-room").await;
    open_group(&rest, "no-room").await;
    for _ in 0..2 {
        let reply = join(&mut alice, "ok-room").await;
        assert!(matches!(reply, ServerFrame::Ok { .. }), "{reply:?}");
        assert_forbidden(&join(&mut alice, "no-room").await);
    }
    assert_eq!(hook.calls().len(), 2);

    for users in [["bob", "carol"], ["carol", "bob"]] {
        let (items, denied) = subscribe(&mut alice, &users).await;
        assert_eq!(names(&items), ["bob"]);
        assert_eq!(denied, Some(vec!["carol".to_string()]));
    }
    assert_eq!(hook.calls().len(), 3);

    let mut alice_web = Client::connect(&node, "alice", 5).await;
    let (items, _) = subscribe(&mut alice_web, &["bob", "carol"]).await;
    assert_eq!(names(&items), ["bob"]);
    assert_eq!(hook.calls().len(), 4);

    open_group(&rest, "err-room").await;
    assert_forbidden(&join(&mut alice, "err-room").await);
    assert_forbidden(&join(&mut alice, "err-room").await);
    assert_eq!(hook.calls().len(), 6);

    let hits = node.metric("presence_auth_hook_cache_hits_total").await;
    assert_eq!(hits, 3.0);
    hook.assert_signed();
}

/// The session keeps reading while the hook thinks, and an `unsubscribe` sent meanwhile wins over
/// the answer that comes after it.
#[tokio::test]
async fn the_session_reads_on_while_the_hook_thinks() {
    let hook = Hook::start().await;
    let setup = Setup::new("embedded");
    let node = hook.node(&setup).start();
    let rest = Rest::new(&node);
    let mut bob = Client::connect(&node, "bob", 1).await;
    let mut lag = Client::connect(&node, "lag-alice", 1).await;

    let subscribe_id = lag.id();
    lag.send(&ClientFrame::Subscribe {
        id: Some(subscribe_id),
        users: vec!["bob".into()],
    })
    .await;
    let ping_id = lag.id();
    lag.send(&ClientFrame::Ping { id: Some(ping_id) }).await;
    let unsubscribe_id = lag.id();
    lag.send(&ClientFrame::Unsubscribe {
        id: Some(unsubscribe_id),
        users: vec!["bob".into()],
    })
    .await;
    // The hook answers after 500 ms; the ping and the unsubscribe are answered before.
    let first = lag.recv().await;
    assert!(
        matches!(first, ServerFrame::Pong { id } if id == Some(ping_id)),
        "{first:?}"
    );
    let second = lag.recv().await;
    assert!(
        matches!(second, ServerFrame::Ok { id, .. } if id == Some(unsubscribe_id)),
        "{second:?}"
    );
    match lag.recv().await {
        ServerFrame::PresenceList { id, items, denied } => {
            assert_eq!(id, Some(subscribe_id));
            assert_eq!(names(&items), ["bob"]);
            assert_eq!(denied, None);
        }
        other => panic!("expected presence_list, got {other:?}"),
    }
    // The unsubscribe came last: bob is not watched.
    change_status(&mut bob, "bob", Status::Away, &rest).await;
    lag.expect_silence(Duration::from_millis(300)).await;

    // Without an unsubscribe, the answer's watch holds.
    let (items, _) = subscribe(&mut lag, &["bob"]).await;
    assert_eq!(names(&items), ["bob"]);
    change_status(&mut bob, "bob", Status::Busy, &rest).await;
    presence_until(&mut lag, "bob", Status::Busy, &[]).await;
    hook.assert_signed();
}
