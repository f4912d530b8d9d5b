//! A real WebSocket client speaking the wire contract (both encodings), and REST helpers.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use shared::{ClientFrame, Encoding, Presence, ServerFrame, Status};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{self, Message, client::IntoClientRequest, http::HeaderValue},
};

use super::harness::{API_KEY, JWT_SECRET, Node};

/// How long a test waits for a frame it expects.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub encoding: Encoding,
    next_id: u64,
    /// Frames read while waiting for another one, served before new reads.
    backlog: std::collections::VecDeque<ServerFrame>,
    /// The REST API of the node this client is connected to.
    pub rest: Rest,
    /// The reason of the server's close frame, once it came.
    pub close_reason: Option<String>,
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    Code(u16),
    NoCode,
}

/// Mints an HS256 JWT as an app backend would.
pub fn jwt(user: &str, platform: u8) -> String {
    jwt_expiring(user, platform, 3600)
}

/// A JWT that says when it was issued (`iat`, seconds).
pub fn jwt_issued(user: &str, platform: u8, iat: u64) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "platform": platform, "exp": iat + 3600, "iat": iat}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign jwt")
}

pub fn jwt_expiring(user: &str, platform: u8, secs_from_now: i64) -> String {
    let exp = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
        + secs_from_now) as u64;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "platform": platform, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign jwt")
}

impl Client {
    /// Connects `user` on `platform` with a JWT, MessagePack.
    pub async fn connect(node: &Node, user: &str, platform: u8) -> Client {
        Self::connect_as(node, user, platform, Encoding::MsgPack).await
    }

    pub async fn connect_json(node: &Node, user: &str, platform: u8) -> Client {
        Self::connect_as(node, user, platform, Encoding::Json).await
    }

    pub async fn connect_as(node: &Node, user: &str, platform: u8, encoding: Encoding) -> Client {
        let mut client = Self::open(node, &jwt(user, platform), encoding)
            .await
            .expect("connect");
        match client.recv().await {
            ServerFrame::Welcome {
                user: u,
                platform: p,
                ..
            } => {
                assert_eq!((u.as_str(), p), (user, platform));
            }
            other => panic!("expected welcome, got {other:?}"),
        }
        client
    }

    /// Opens a socket with `token` (subprotocol chooses the encoding); no frame is read.
    pub async fn open(
        node: &Node,
        token: &str,
        encoding: Encoding,
    ) -> Result<Client, tungstenite::Error> {
        let url = format!("{}?token={token}", node.ws());
        Self::open_url(&url, Some(encoding)).await
    }

    /// Opens `url` as is; with `encoding`, asks for it by subprotocol.
    pub async fn open_url(
        url: &str,
        encoding: Option<Encoding>,
    ) -> Result<Client, tungstenite::Error> {
        let mut request = url.into_client_request()?;
        if let Some(encoding) = encoding {
            request.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(encoding.subprotocol()),
            );
        }
        let (ws, response) = tokio_tungstenite::connect_async(request).await?;
        let encoding = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .and_then(Encoding::from_subprotocol)
            .or(encoding)
            .unwrap_or_else(|| {
                if url.contains("format=json") {
                    Encoding::Json
                } else {
                    Encoding::MsgPack
                }
            });
        Ok(Client {
            ws,
            encoding,
            next_id: 1,
            backlog: Default::default(),
            rest: Rest::for_ws_url(url),
            close_reason: None,
        })
    }

    pub async fn send(&mut self, frame: &ClientFrame) {
        let bytes = self.encoding.encode(frame).expect("encode");
        self.send_raw(bytes).await;
    }

    /// Sends a frame; an error instead of a panic when the connection is gone.
    pub async fn try_send(&mut self, frame: &ClientFrame) -> Result<(), tungstenite::Error> {
        let bytes = self.encoding.encode(frame).expect("encode");
        let message = match self.encoding {
            Encoding::MsgPack => Message::Binary(bytes.into()),
            Encoding::Json => Message::Text(String::from_utf8(bytes).expect("utf-8").into()),
        };
        self.ws.send(message).await
    }

    /// Sends bytes as the connection's frame kind (binary for MessagePack, text for JSON).
    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        let message = match self.encoding {
            Encoding::MsgPack => Message::Binary(bytes.into()),
            Encoding::Json => Message::Text(String::from_utf8(bytes).expect("utf-8").into()),
        };
        self.ws.send(message).await.expect("send");
    }

    pub async fn send_message(&mut self, message: Message) {
        self.ws.send(message).await.expect("send");
    }

    /// Next id for a request.
    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Reads the next server frame (pings are answered by tungstenite).
    pub async fn recv(&mut self) -> ServerFrame {
        if let Some(frame) = self.backlog.pop_front() {
            return frame;
        }
        self.read()
            .await
            .unwrap_or_else(|closed| panic!("connection closed: {closed:?}"))
    }

    async fn read(&mut self) -> Result<ServerFrame, Closed> {
        tokio::time::timeout(WAIT, self.next_frame())
            .await
            .expect("timed out waiting for a frame")
    }

    /// The next server frame however long it takes, or how the connection ended (cancel-safe:
    /// its only await is the socket's `next`).
    pub async fn next_frame(&mut self) -> Result<ServerFrame, Closed> {
        loop {
            let next = self.ws.next().await;
            let message = match next {
                Some(Ok(m)) => m,
                Some(Err(_)) | None => return Err(Closed::NoCode),
            };
            let bytes = match message {
                Message::Binary(b) => {
                    assert_eq!(
                        self.encoding,
                        Encoding::MsgPack,
                        "binary frame on a JSON connection"
                    );
                    b.to_vec()
                }
                Message::Text(t) => {
                    assert_eq!(
                        self.encoding,
                        Encoding::Json,
                        "text frame on a MessagePack connection"
                    );
                    t.as_bytes().to_vec()
                }
                Message::Close(Some(frame)) => {
                    self.close_reason = Some(frame.reason.to_string());
                    return Err(Closed::Code(frame.code.into()));
                }
                Message::Close(None) => return Err(Closed::NoCode),
                _ => continue,
            };
            return Ok(self
                .encoding
                .decode_server(&bytes)
                .expect("server frame decodes"));
        }
    }

    /// Reads until a frame matches, keeping the others for later `recv`s.
    pub async fn expect<T>(&mut self, mut pick: impl FnMut(&ServerFrame) -> Option<T>) -> T {
        if let Some(pos) = self.backlog.iter().position(|f| pick(f).is_some()) {
            let frame = self.backlog.remove(pos).expect("present");
            return pick(&frame).expect("matched");
        }
        loop {
            let frame = self
                .read()
                .await
                .unwrap_or_else(|c| panic!("closed while waiting: {c:?}"));
            if let Some(found) = pick(&frame) {
                return found;
            }
            self.backlog.push_back(frame);
        }
    }

    /// Waits for the reply carrying `id`.
    pub async fn reply(&mut self, id: u64) -> ServerFrame {
        self.expect(|f| (reply_id(f) == Some(id)).then(|| f.clone()))
            .await
    }

    /// Sends a request with a fresh id and waits for its reply.
    pub async fn request(&mut self, make: impl FnOnce(Option<u64>) -> ClientFrame) -> ServerFrame {
        let id = self.id();
        self.send(&make(Some(id))).await;
        self.reply(id).await
    }

    /// Waits for the next `presence` event about `user`.
    pub async fn presence_of(&mut self, user: &str) -> Presence {
        self.expect(|f| match f {
            ServerFrame::Presence(p) if p.user == user => Some(p.clone()),
            _ => None,
        })
        .await
    }

    /// Waits for a `presence` event about `user` with `status`, skipping others (an earlier
    /// state may still be on its way).
    pub async fn presence_until(&mut self, user: &str, status: Status) -> Presence {
        loop {
            let p = self.presence_of(user).await;
            if p.status == status {
                return p;
            }
        }
    }

    /// Subscribes to `user` and waits until it is seen with `status`, in the initial list or in
    /// an event after it: a change is written at once, so it may land before or after the
    /// subscription.
    pub async fn watch_until(&mut self, user: &str, status: Status) -> Presence {
        let listed = self.subscribe(&[user]).await;
        match listed
            .into_iter()
            .find(|p| p.user == user && p.status == status)
        {
            Some(p) => p,
            None => self.presence_until(user, status).await,
        }
    }

    /// Subscribes to `users` and returns the initial presence list.
    pub async fn subscribe(&mut self, users: &[&str]) -> Vec<Presence> {
        let users = users.iter().map(|u| u.to_string()).collect();
        match self
            .request(|id| ClientFrame::Subscribe { id, users })
            .await
        {
            ServerFrame::PresenceList { items, .. } => items,
            other => panic!("expected presence_list, got {other:?}"),
        }
    }

    pub async fn set_status(&mut self, status: Status, text: Option<&str>) {
        let text = text.map(String::from);
        match self
            .request(|id| ClientFrame::SetStatus { id, status, text })
            .await
        {
            ServerFrame::Ok { .. } => {}
            other => panic!("expected ok, got {other:?}"),
        }
    }

    /// Asserts nothing arrives for `quiet` (besides pings).
    pub async fn expect_silence(&mut self, quiet: Duration) {
        assert!(
            self.backlog.is_empty(),
            "unexpected frames: {:?}",
            self.backlog
        );
        match tokio::time::timeout(quiet, self.ws.next()).await {
            Err(_) => {}
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(other) => panic!("expected silence, got {other:?}"),
        }
    }

    /// As [`Client::expect_silence`], but an event of `seen`'s user at a version the client has
    /// already seen is not news: a real client drops it (protocol.md), and a subscribe's list and
    /// the write's own event can both carry the same version.
    pub async fn expect_nothing_new(&mut self, quiet: Duration, seen: &Presence) {
        let old = |f: &ServerFrame| matches!(f, ServerFrame::Presence(p) if p.user == seen.user && p.version <= seen.version);
        self.backlog.retain(|f| !old(f));
        assert!(
            self.backlog.is_empty(),
            "unexpected frames: {:?}",
            self.backlog
        );
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            match tokio::time::timeout_at(deadline, self.next_frame()).await {
                Err(_) => return,
                Ok(Ok(frame)) if old(&frame) => continue,
                Ok(other) => panic!("expected nothing new, got {other:?}"),
            }
        }
    }

    /// Waits for the server to close the connection and returns the code.
    pub async fn closed(&mut self) -> Closed {
        loop {
            match self.read().await {
                Ok(_) => continue,
                Err(closed) => return closed,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Drain until the server's close arrives, so the server has seen it too.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

pub fn reply_id(frame: &ServerFrame) -> Option<u64> {
    match frame {
        ServerFrame::Pong { id }
        | ServerFrame::Ok { id, .. }
        | ServerFrame::Error { id, .. }
        | ServerFrame::PresenceList { id, .. }
        | ServerFrame::MemberList { id, .. }
        | ServerFrame::Ack { id, .. }
        | ServerFrame::UnreadCounts { id, .. }
        | ServerFrame::History { id, .. } => *id,
        _ => None,
    }
}

/// REST calls to a node with the API key.
pub struct Rest {
    base: String,
    http: reqwest::Client,
}

impl Rest {
    /// The REST API of the node serving `ws://host:port/ws...`.
    pub fn for_ws_url(url: &str) -> Rest {
        let host = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap_or_default();
        Rest {
            base: format!("http://{host}/v1"),
            http: reqwest::Client::new(),
        }
    }

    pub fn new(node: &Node) -> Rest {
        Rest {
            base: format!("{}/v1", node.http()),
            http: reqwest::Client::new(),
        }
    }

    /// Sends `req` with the API key; the status and the answer's JSON (null when there is none).
    async fn answer(req: reqwest::RequestBuilder, what: &str) -> (u16, Value) {
        let resp = req.bearer_auth(API_KEY).send().await.expect(what);
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        Self::answer(self.http.get(format!("{}{path}", self.base)), "GET").await
    }

    pub async fn put(&self, path: &str, body: Option<Value>) -> u16 {
        let mut req = self
            .http
            .put(format!("{}{path}", self.base))
            .bearer_auth(API_KEY);
        if let Some(body) = body {
            req = req.json(&body);
        }
        req.send().await.expect("PUT").status().as_u16()
    }

    /// `PUT` without a body; the status and the answer's JSON (null when there is none).
    pub async fn put_answer(&self, path: &str) -> (u16, Value) {
        Self::answer(self.http.put(format!("{}{path}", self.base)), "PUT").await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let req = self.http.post(format!("{}{path}", self.base)).json(&body);
        Self::answer(req, "POST").await
    }

    pub async fn presence(&self, user: &str) -> Value {
        let (status, body) = self.get(&format!("/presence/{user}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Polls `GET /v1/presence/{user}` until `check` holds. A 503 (the node knows its backend is
    /// down, as it may be just after a Redis restart) is polled through; any other error fails.
    pub async fn wait_presence(&self, user: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = self.get(&format!("/presence/{user}")).await;
            assert!(status == 200 || status == 503, "{status}: {body}");
            if status == 200 && check(&body) {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "presence of {user} never matched; last: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
