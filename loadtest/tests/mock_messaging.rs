//! Checks the `fanout` and `private` accounting (expected deliveries, loss, duplicates, latency)
//! against a small in-test gateway stand-in that routes `join`/`send` and deliberately drops and
//! duplicates some deliveries, since the real gateway has no messaging yet. Like the gateway, the
//! stand-in keeps groups closed (`join` answered `forbidden`) until they are opened with
//! `PUT /v1/groups/{group}` `{"join":"open"}` and its API key, on the same port.

use std::{
    collections::{HashMap, HashSet},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Value, json};
use shared::{ClientFrame, Destination, Encoding, ErrorCode, Message, RouteResult, ServerFrame};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_tungstenite::tungstenite::{
    self,
    handshake::server::{ErrorResponse, Request, Response},
    http::HeaderValue,
};

const SECRET: &str = "mock-secret";
/// Every `DROP_EVERY`th delivery is dropped, every `DUP_EVERY`th is sent twice.
const DROP_EVERY: u64 = 10;
const DUP_EVERY: u64 = 7;
/// The stand-in's REST API key.
const API_KEY: &str = "mock-api-key";

#[derive(Default)]
struct Routes {
    conns: HashMap<String, Vec<(Encoding, mpsc::UnboundedSender<tungstenite::Message>)>>,
    groups: HashMap<String, HashSet<String>>,
}

#[derive(Default)]
struct Mock {
    routes: Mutex<Routes>,
    next_msg: AtomicU64,
    deliveries: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    /// Groups opened over REST.
    opened: Mutex<HashSet<String>>,
    /// REST requests, and WebSocket connections, received.
    rest_requests: AtomicU64,
    websockets: AtomicU64,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

fn wire(enc: Encoding, frame: &ServerFrame) -> Option<tungstenite::Message> {
    let bytes = enc.encode(frame).ok()?;
    Some(match enc {
        Encoding::MsgPack => tungstenite::Message::Binary(bytes.into()),
        Encoding::Json => tungstenite::Message::Text(String::from_utf8(bytes).ok()?.into()),
    })
}

impl Mock {
    /// Delivers `msg` to every connection of `user`, dropping or duplicating some on purpose.
    fn deliver(&self, routes: &Routes, user: &str, msg: &Message) -> u64 {
        let mut reached = 0;
        for (enc, tx) in routes.conns.get(user).into_iter().flatten() {
            let n = self.deliveries.fetch_add(1, Ordering::Relaxed) + 1;
            reached += 1;
            if n.is_multiple_of(DROP_EVERY) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(m) = wire(*enc, &ServerFrame::Message(msg.clone())) else {
                continue;
            };
            if n.is_multiple_of(DUP_EVERY) {
                self.duplicated.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(m.clone());
            }
            let _ = tx.send(m);
        }
        reached
    }

    fn handle(&self, user: &str, frame: ClientFrame) -> ServerFrame {
        match frame {
            ClientFrame::Join { id, group } => {
                let open = self
                    .opened
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&group);
                if !open {
                    return ServerFrame::error(id, ErrorCode::Forbidden, "the group is closed");
                }
                let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
                routes
                    .groups
                    .entry(group)
                    .or_default()
                    .insert(user.to_string());
                ServerFrame::ok(id)
            }
            ClientFrame::Send { id, to, body, .. } => {
                let n = self.next_msg.fetch_add(1, Ordering::Relaxed);
                let msg = Message {
                    msg_id: format!("{n:012}"),
                    from: user.to_string(),
                    to: to.clone(),
                    body,
                    sent_at: 0,
                    offline: None,
                };
                let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
                let recipients: Vec<String> = match &to {
                    Destination::User { user } => vec![user.clone()],
                    Destination::Group { group } => routes
                        .groups
                        .get(group)
                        .into_iter()
                        .flatten()
                        .filter(|u| *u != user)
                        .cloned()
                        .collect(),
                    Destination::All { .. } => Vec::new(),
                };
                let delivered: u64 = recipients
                    .iter()
                    .map(|r| self.deliver(&routes, r, &msg))
                    .sum();
                ServerFrame::Ack {
                    id,
                    msg_id: msg.msg_id,
                    result: RouteResult::Delivered,
                    delivered,
                    stored: 0,
                }
            }
            other => ServerFrame::ok(other.id()),
        }
    }
}

impl Mock {
    /// One REST request: its status line.
    fn rest(&self, method: &str, path: &str, authorization: &str, body: &[u8]) -> &'static str {
        self.rest_requests.fetch_add(1, Ordering::Relaxed);
        if authorization != format!("Bearer {API_KEY}") {
            return "401 Unauthorized";
        }
        let Some(group) = path.strip_prefix("/v1/groups/") else {
            return "404 Not Found";
        };
        if method != "PUT" || group.is_empty() || group.contains('/') {
            return "404 Not Found";
        }
        if serde_json::from_slice::<Value>(body).ok() != Some(json!({ "join": "open" })) {
            return "400 Bad Request";
        }
        self.opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(group.to_string());
        "204 No Content"
    }
}

/// Answers HTTP/1.1 requests on one connection (kept alive) until the client closes it.
async fn serve_rest(mock: Arc<Mock>, stream: TcpStream) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut words = line.split_whitespace();
        let method = words.next().unwrap_or_default().to_string();
        let path = words.next().unwrap_or_default().to_string();
        let (mut length, mut authorization) = (0, String::new());
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "authorization" => authorization = value.trim().to_string(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let status = mock.rest(&method, &path, &authorization, &body);
        let answer = if status.starts_with("204") {
            format!("HTTP/1.1 {status}\r\n\r\n")
        } else {
            let text = format!("mock: {status}");
            format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{text}",
                text.len()
            )
        };
        if reader.get_mut().write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// A REST request (the tool opening its groups) or a WebSocket upgrade (a `GET`).
async fn serve_conn(mock: Arc<Mock>, stream: TcpStream) {
    let mut start = [0u8; 4];
    for _ in 0..100 {
        match stream.peek(&mut start).await {
            Ok(n) if n < start.len() && n > 0 => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            _ => break,
        }
    }
    if &start == b"PUT " {
        serve_rest(mock, stream).await;
    } else {
        serve_ws(mock, stream).await;
    }
}

#[allow(clippy::result_large_err)] // the handshake callback's signature is tungstenite's
async fn serve_ws(mock: Arc<Mock>, stream: TcpStream) {
    let seen: Arc<Mutex<(Option<String>, Encoding)>> = Arc::default();
    let captured = seen.clone();
    let callback = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let mut slot = captured.lock().unwrap_or_else(|e| e.into_inner());
        slot.0 = req.uri().query().map(str::to_string);
        if let Some(p) = req.headers().get("sec-websocket-protocol") {
            let enc = p
                .to_str()
                .ok()
                .and_then(|p| p.split(',').find_map(Encoding::from_subprotocol))
                .unwrap_or_default();
            slot.1 = enc;
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(enc.subprotocol()),
            );
        }
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let (query, mut enc) = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let query = query.unwrap_or_default();
    let mut token = "";
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("token", t)) => token = t,
            Some(("format", f)) => enc = Encoding::from_format(f).unwrap_or(enc),
            _ => {}
        }
    }
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    let Ok(claims) = jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(SECRET.as_bytes()),
        &validation,
    ) else {
        return;
    };
    let user = claims.claims.sub;
    mock.websockets.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let welcome = ServerFrame::Welcome {
        conn_id: "c".into(),
        user: user.clone(),
        platform: 1,
        node: "mock".into(),
        heartbeat_ms: 25_000,
        server_time: 0,
        expires_at: None,
    };
    if let Some(m) = wire(enc, &welcome) {
        let _ = tx.send(m);
    }
    mock.routes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .conns
        .entry(user.clone())
        .or_default()
        .push((enc, tx.clone()));
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
    });
    while let Some(Ok(m)) = stream.next().await {
        let bytes = match m {
            tungstenite::Message::Binary(b) => b.to_vec(),
            tungstenite::Message::Text(t) => t.as_bytes().to_vec(),
            tungstenite::Message::Close(_) => break,
            _ => continue,
        };
        let Ok(frame) = enc.decode_client(&bytes) else {
            continue;
        };
        let reply = mock.handle(&user, frame);
        if let Some(m) = wire(enc, &reply) {
            let _ = tx.send(m);
        }
    }
    let mut routes = mock.routes.lock().unwrap_or_else(|e| e.into_inner());
    routes.conns.remove(&user);
    drop(routes);
    writer.abort();
}

async fn start_mock() -> (Arc<Mock>, String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let mock = Arc::new(Mock::default());
    let m = mock.clone();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_conn(m.clone(), stream));
        }
    });
    (mock, addr, server)
}

async fn run_tool(name: &str, addr: &str, args: &[&str]) -> (Option<i32>, Value) {
    let report = std::env::temp_dir().join(format!(
        "presence-loadtest-mock-{}-{name}.json",
        std::process::id()
    ));
    let url = format!("ws://{addr}/ws");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_presence-loadtest"))
        .args(args)
        .args(["--url", &url, "--jwt-secret", SECRET, "--quiet", "--report"])
        .arg(&report)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot start presence-loadtest");
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("presence-loadtest did not stop by itself")
        .expect("wait");
    let text = std::fs::read_to_string(&report).expect("report written");
    let _ = std::fs::remove_file(&report);
    (
        status.code(),
        serde_json::from_str(&text).expect("JSON report"),
    )
}

fn num(r: &Value, pointer: &str) -> u64 {
    r.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no number at {pointer}: {r:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_counts_loss_and_duplicates() {
    let (mock, addr, server) = start_mock().await;
    let (code, r) = run_tool(
        "fanout",
        &addr,
        &[
            "fanout",
            "--groups",
            "3",
            "--members",
            "5",
            "--rate",
            "30",
            "--duration",
            "2",
            "--drain-ms",
            "500",
            "--api-key",
            API_KEY,
        ],
    )
    .await;
    server.abort();
    assert_eq!(code, Some(0), "{r:#}");
    // Each group opened once, before its members joined.
    assert_eq!(mock.rest_requests.load(Ordering::Relaxed), 3);
    let prefix = r["prefix"].as_str().expect("prefix");
    let mut opened: Vec<String> = mock
        .opened
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect();
    opened.sort();
    assert_eq!(
        opened,
        (0..3)
            .map(|g| format!("{prefix}-grp{g}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(num(&r, "/figures/groups_opened"), 3, "{r:#}");
    assert!(!r.to_string().contains(API_KEY), "the report leaks the key");
    let sent = num(&r, "/figures/sent");
    assert!(sent >= 50, "{r:#}");
    assert_eq!(num(&r, "/figures/acked"), sent);
    assert_eq!(num(&r, "/figures/joined"), 15);
    // Every message goes to the 4 other members of its group.
    assert_eq!(num(&r, "/figures/expected_deliveries"), sent * 4, "{r:#}");
    assert_eq!(
        num(&r, "/figures/lost"),
        mock.dropped.load(Ordering::Relaxed),
        "{r:#}"
    );
    assert_eq!(
        num(&r, "/figures/duplicates"),
        mock.duplicated.load(Ordering::Relaxed),
        "{r:#}"
    );
    assert!(num(&r, "/figures/delivery_latency_ms/count") > 0);
    assert_eq!(num(&r, "/figures/misrouted"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_counts_loss_and_duplicates_across_processes() {
    let (mock, addr, server) = start_mock().await;
    // `--per-process 10` with 20 users: two worker processes whose results are merged.
    let (code, r) = run_tool(
        "private",
        &addr,
        &[
            "private",
            "--users",
            "20",
            "--rate",
            "40",
            "--duration",
            "2",
            "--drain-ms",
            "500",
            "--per-process",
            "10",
            "--format",
            "json",
        ],
    )
    .await;
    server.abort();
    assert_eq!(code, Some(0), "{r:#}");
    assert_eq!(mock.rest_requests.load(Ordering::Relaxed), 0, "no groups");
    assert_eq!(num(&r, "/processes"), 2);
    let sent = num(&r, "/figures/sent");
    assert!(sent >= 60, "{r:#}");
    assert_eq!(num(&r, "/figures/expected_deliveries"), sent, "{r:#}");
    assert_eq!(
        num(&r, "/figures/lost"),
        mock.dropped.load(Ordering::Relaxed),
        "{r:#}"
    );
    assert_eq!(
        num(&r, "/figures/duplicates"),
        mock.duplicated.load(Ordering::Relaxed),
        "{r:#}"
    );
}

/// A wrong API key (here the default, `dev`) stops the run before any member connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_stops_on_a_refused_api_key() {
    let (mock, addr, server) = start_mock().await;
    let url = format!("ws://{addr}/ws");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_presence-loadtest"))
        .args([
            "fanout",
            "--groups",
            "40",
            "--members",
            "2",
            "--duration",
            "1",
        ])
        .args(["--url", &url, "--jwt-secret", SECRET, "--quiet"])
        .env_remove("PRESENCE_API_KEY")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("presence-loadtest did not stop by itself")
        .expect("run presence-loadtest");
    server.abort();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("401") && err.contains("--api-key"),
        "no clear message: {err}"
    );
    assert_eq!(mock.websockets.load(Ordering::Relaxed), 0);
    assert!(
        mock.opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    );
    // It stopped at the first refusal: no more than the 32 requests in flight at once were made.
    let tried = mock.rest_requests.load(Ordering::Relaxed);
    assert!((1..=32).contains(&tried), "{tried} requests");
}
