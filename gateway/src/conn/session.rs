//! One WebSocket session: registers the connection with its user's shard, then reads client frames
//! in this task while a writer task drains the outbound queue, sends heartbeats and closes the
//! socket with the code asked for. The session never awaits Redis: backend work for a request runs
//! in a task of its own and answers through the outbound queue. Nor does it await the authorization
//! hook: a task asks it, and the session only applies the answer to its subscriptions.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use shared::{Encoding, ErrorCode, ServerFrame};
use tokio::sync::{mpsc, oneshot};

use super::requests::Requests;
use crate::{
    app::App,
    auth::Identity,
    backend::ConnectState,
    clock::now_ms,
    conn_handle::{ConnHandle, close_code},
    frame::EncodedFrame,
    metrics as m,
    shard::ShardCmd,
};

/// Bounds one write burst (see `send_burst`): enough to make one syscall carry a backlog, small
/// enough that a burst does not grow the connection's write buffer for good.
const WRITE_BURST_FRAMES: usize = 64;
pub(super) const WRITE_BURST_BYTES: usize = 16 * 1024;

pub async fn run(
    app: Arc<App>,
    sink: SplitSink<WebSocket, Message>,
    stream: SplitStream<WebSocket>,
    identity: Identity,
    encoding: Encoding,
    peer: SocketAddr,
    user_agent: Option<String>,
) {
    let (out_tx, out_rx) = mpsc::channel(app.config.outbound_queue);
    let now = now_ms();
    let conn = Arc::new(ConnHandle::new(
        app.next_conn_id(),
        identity.user.clone(),
        identity.platform,
        encoding,
        peer,
        user_agent,
        now,
        out_tx,
    ));
    conn.set_token(identity.issued_at, identity.expires_at);
    let welcome = ServerFrame::Welcome {
        conn_id: format!("{}-{}", app.node_id, conn.id),
        user: conn.user.clone(),
        platform: conn.platform,
        node: app.node_id.to_string(),
        heartbeat_ms: app.config.heartbeat_ms,
        server_time: now,
        expires_at: (identity.expires_at != 0).then_some(identity.expires_at),
    };
    // The user's groups and stored messages are read before the connection is registered, so
    // that `welcome` and the stored messages are the first frames, in that order.
    let ConnectState {
        groups,
        offline,
        revoked_at,
    } = app.backend.sessions.connect_state(&conn.user).await;
    // A revocation that cannot be read lets the connection in: an outage must not lock every
    // user out. The revoke also closed live connections, so this only matters for a token
    // presented again while the backend is away.
    let revoked = match revoked_at {
        Ok(at) => at.is_some_and(|at| conn.token_issued_before(at)),
        Err(e) => {
            tracing::warn!(error = %e, user = %conn.user, "cannot read the user's revocation");
            false
        }
    };
    let groups = groups.unwrap_or_else(|e| {
        tracing::warn!(error = %e, user = %conn.user, "cannot read the user's groups");
        Vec::new()
    });
    let offline: Vec<Arc<EncodedFrame>> = offline
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, user = %conn.user, "cannot read stored messages");
            Vec::new()
        })
        .into_iter()
        .map(|m| EncodedFrame::new(ServerFrame::Message(m)))
        .collect();
    if revoked {
        metrics::counter!(m::CONNECTS, "result" => "revoked").increment(1);
        conn.close_with(close_code::UNAUTHORIZED, "token revoked");
        let heartbeat = app.config.heartbeat();
        let _ = tokio::spawn(write_loop(sink, out_rx, conn, heartbeat)).await;
        return;
    }
    // Setup and teardown are boxed: a task is as large as its largest await point, and these are
    // larger than the read loop that an idle connection sits in.
    let accepted = Box::pin(register(
        &app,
        &conn,
        EncodedFrame::new(welcome),
        offline,
        groups,
    ))
    .await;
    let writer = tokio::spawn(write_loop(
        sink,
        out_rx,
        conn.clone(),
        app.config.heartbeat(),
    ));
    match accepted {
        Some(true) => {}
        Some(false) => {
            metrics::counter!(m::CONNECTS, "result" => "too_many").increment(1);
            conn.close(close_code::TOO_MANY_CONNECTIONS);
            let _ = writer.await;
            return;
        }
        None => {
            conn.close(close_code::GOING_AWAY);
            let _ = writer.await;
            return;
        }
    }
    metrics::counter!(m::CONNECTS, "result" => "ok").increment(1);
    app.count_connection(conn.platform, 1);
    tracing::debug!(conn = conn.id, user = %conn.user, platform = conn.platform, %peer, "connected");

    let mut requests = Requests::new(app.clone(), conn.clone());
    read_loop(&app, stream, &conn, &mut requests).await;
    Box::pin(finish(app, conn, requests, writer)).await;
}

/// Whatever ended the session, the shard hears of it (and detaches the connection from its
/// groups), and watches are dropped.
async fn finish(
    app: Arc<App>,
    conn: Arc<ConnHandle>,
    mut requests: Requests,
    writer: tokio::task::JoinHandle<()>,
) {
    requests.release().await;
    app.shards
        .send(
            &conn.user,
            ShardCmd::Disconnect {
                user: conn.user.clone(),
                conn: conn.id,
            },
        )
        .await;
    app.count_connection(conn.platform, -1);
    let reason = match conn.requested_close_code() {
        Some(close_code::GOING_AWAY) => "going_away",
        Some(close_code::POLICY) => "policy",
        Some(close_code::HEARTBEAT_TIMEOUT) => "heartbeat_timeout",
        Some(_) => "server",
        None => "client",
    };
    metrics::counter!(m::DISCONNECTS, "reason" => reason).increment(1);
    conn.close(close_code::NORMAL);
    let _ = writer.await;
    tracing::debug!(conn = conn.id, user = %conn.user, reason, "disconnected");
}

/// Registers the connection with its shard; `None` when the node is stopping.
async fn register(
    app: &App,
    conn: &Arc<ConnHandle>,
    welcome: Arc<EncodedFrame>,
    offline: Vec<Arc<EncodedFrame>>,
    groups: Vec<String>,
) -> Option<bool> {
    let (reply, answer) = oneshot::channel();
    let cmd = ShardCmd::Connect {
        conn: conn.clone(),
        welcome,
        offline,
        groups,
        reply,
    };
    if !app.shards.send(&conn.user, cmd).await {
        return None;
    }
    answer.await.ok()
}

async fn read_loop(
    app: &App,
    mut stream: SplitStream<WebSocket>,
    conn: &Arc<ConnHandle>,
    requests: &mut Requests,
) {
    let max = app.config.max_frame_bytes;
    loop {
        let message = tokio::select! {
            m = stream.next() => m,
            // Only with the authorization hook, while a `subscribe` waits for its answer.
            Some(answer) = requests.next_answer(), if requests.awaits_answer() => {
                Box::pin(requests.answered(answer)).await;
                continue;
            }
            _ = conn.close_requested().cancelled() => return,
            _ = app.closing.cancelled() => {
                conn.close(close_code::GOING_AWAY);
                return;
            }
        };
        let message = match message {
            None => return,
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                let failure = ReadFailure::of(e);
                // Oversized frames end here (the protocol layer refuses them); so do broken sockets.
                if let ReadFailure::TooLarge(_) = failure {
                    conn.close(close_code::POLICY);
                }
                tracing::debug!(conn = conn.id, error = %failure, "read failed");
                return;
            }
        };
        let now = now_ms();
        conn.last_heard
            .store(now, std::sync::atomic::Ordering::Relaxed);
        let payload = match (message, conn.encoding) {
            (Message::Binary(bytes), Encoding::MsgPack) => bytes,
            (Message::Text(text), Encoding::Json) => Bytes::from(text),
            (Message::Binary(_), Encoding::Json) | (Message::Text(_), Encoding::MsgPack) => {
                requests.reply_error(
                    None,
                    ErrorCode::BadRequest,
                    "frames must be binary MessagePack for presence.v1.msgpack, text JSON for presence.v1.json",
                );
                continue;
            }
            (Message::Pong(payload), _) => {
                note_rtt(conn, &payload, now);
                continue;
            }
            (Message::Ping(_), _) => continue,
            (Message::Close(_), _) => return,
        };
        if payload.len() > max {
            requests.reply_error(
                None,
                ErrorCode::TooLarge,
                format!(
                    "frame of {} bytes is over the {max}-byte limit",
                    payload.len()
                ),
            );
            continue;
        }
        // Boxed: an idle connection's task is as large as its largest await point, and request
        // handling is by far the largest; boxing keeps that cost to the moments it runs.
        Box::pin(requests.handle(&payload, now)).await;
    }
}

/// Why reading the socket failed, told apart by the protocol layer's error type.
#[derive(Debug, thiserror::Error)]
enum ReadFailure {
    /// A frame or message over the size limit.
    #[error("too large: {0}")]
    TooLarge(tungstenite::error::CapacityError),
    /// The client broke the WebSocket protocol (reserved bits, bad opcode, bad close frame, …).
    #[error("protocol violation: {0}")]
    Protocol(tungstenite::error::ProtocolError),
    /// A text frame that is not UTF-8.
    #[error("text frame is not UTF-8")]
    Utf8,
    /// The socket itself failed (reset, closed mid-frame).
    #[error("socket: {0}")]
    Socket(String),
}

impl ReadFailure {
    fn of(e: axum::Error) -> Self {
        match e.into_inner().downcast::<tungstenite::Error>() {
            Ok(e) => match *e {
                tungstenite::Error::Capacity(c) => ReadFailure::TooLarge(c),
                tungstenite::Error::Protocol(p) => ReadFailure::Protocol(p),
                tungstenite::Error::Utf8(_) => ReadFailure::Utf8,
                other => ReadFailure::Socket(other.to_string()),
            },
            Err(other) => ReadFailure::Socket(other.to_string()),
        }
    }
}

fn note_rtt(conn: &ConnHandle, payload: &[u8], now: u64) {
    if let Ok(sent) = <[u8; 8]>::try_from(payload) {
        let rtt = now.saturating_sub(u64::from_be_bytes(sent));
        conn.rtt_ms.store(rtt, std::sync::atomic::Ordering::Relaxed);
        metrics::histogram!(m::HEARTBEAT_RTT_SECONDS).record(rtt as f64 / 1000.0);
    }
}

/// Drains the outbound queue into the socket, pings every `heartbeat`, and closes the socket with
/// the requested code once the connection is asked to close (or the client is silent for two
/// heartbeats: 4010; or its token expired: 4001).
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut out: mpsc::Receiver<Arc<EncodedFrame>>,
    conn: Arc<ConnHandle>,
    heartbeat: Duration,
) {
    // One timer serves the heartbeat and the token's expiry: it fires at whichever comes first,
    // so an idle connection carries no second timer.
    let mut next_ping = tokio::time::Instant::now() + heartbeat;
    let timer = tokio::time::sleep_until(next_ping);
    tokio::pin!(timer);
    let closer = conn.close_requested().clone();
    loop {
        let deadline = next_ping.min(token_deadline(&conn));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        tokio::select! {
            biased;
            _ = closer.cancelled() => break,
            frame = out.recv() => {
                let Some(frame) = frame else { break };
                let sent = tokio::select! {
                    r = Box::pin(send_burst(&mut sink, &mut out, conn.encoding, frame)) => r.is_ok(),
                    _ = closer.cancelled() => false,
                };
                if !sent {
                    conn.close(close_code::NORMAL);
                    break;
                }
            }
            _ = &mut timer => {
                let now = now_ms();
                let expires = conn.token_expires_at.load(std::sync::atomic::Ordering::Relaxed);
                if expires != 0 && now >= expires {
                    metrics::counter!(m::SESSION_CLOSES, "reason" => "token_expired").increment(1);
                    conn.close_with(close_code::UNAUTHORIZED, "token expired");
                    break;
                }
                if tokio::time::Instant::now() < next_ping {
                    continue;
                }
                next_ping += heartbeat;
                let heard = conn.last_heard.load(std::sync::atomic::Ordering::Relaxed);
                if now.saturating_sub(heard) > 2 * heartbeat.as_millis() as u64 {
                    conn.close(close_code::HEARTBEAT_TIMEOUT);
                    break;
                }
                let ping = Message::Ping(Bytes::copy_from_slice(&now.to_be_bytes()));
                if sink.send(ping).await.is_err() {
                    conn.close(close_code::NORMAL);
                    break;
                }
            }
        }
    }
    let code = conn.requested_close_code().unwrap_or(close_code::NORMAL);
    let reason = conn.close_reason().map(Utf8Bytes::from);
    Box::pin(close_socket(sink, out, conn.encoding, code, reason)).await;
}

/// When the token expires, on tokio's clock (far away for a token that does not expire).
fn token_deadline(conn: &ConnHandle) -> tokio::time::Instant {
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    match conn
        .token_expires_at
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        0 => far,
        expires => {
            let left = Duration::from_millis(expires.saturating_sub(now_ms()));
            (tokio::time::Instant::now() + left).min(far)
        }
    }
}

/// Frames queued before the close was asked for still go out (e.g. an error explaining it),
/// within a short bound; a slow consumer's backlog is dropped so the close frame goes first.
async fn close_socket(
    mut sink: SplitSink<WebSocket, Message>,
    mut out: mpsc::Receiver<Arc<EncodedFrame>>,
    encoding: Encoding,
    code: u16,
    reason: Option<Utf8Bytes>,
) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        if code != close_code::POLICY {
            while let Ok(frame) = out.try_recv() {
                let Some(message) = to_message(encoding, &frame) else {
                    continue;
                };
                if sink.feed(message).await.is_err() {
                    return;
                }
            }
        }
        let reason = reason.unwrap_or_else(|| Utf8Bytes::from_static(close_reason(code)));
        let _ = sink
            .send(Message::Close(Some(CloseFrame { code, reason })))
            .await;
        let _ = sink.close().await;
    })
    .await;
}

fn close_reason(code: u16) -> &'static str {
    match code {
        close_code::GOING_AWAY => "node going away",
        close_code::UNAUTHORIZED => "unauthorized",
        close_code::DISCONNECTED => "disconnected by the app",
        close_code::REPLACED => "replaced by a newer login",
        close_code::POLICY => "policy violation",
        close_code::TOO_MANY_CONNECTIONS => "too many connections for this user",
        close_code::HEARTBEAT_TIMEOUT => "heartbeat timeout",
        _ => "",
    }
}

/// The WebSocket message carrying `frame` in `encoding`; `None` if it cannot be encoded (logged
/// where it is encoded).
/// Writes `first` and what else is already queued, up to `WRITE_BURST_FRAMES` frames or
/// `WRITE_BURST_BYTES`, with one flush: under load one `send()` carries many frames instead of one
/// syscall and one loopback/TCP transmit per frame, the gateway's main per-delivery cost.
async fn send_burst(
    sink: &mut SplitSink<WebSocket, Message>,
    out: &mut mpsc::Receiver<Arc<EncodedFrame>>,
    encoding: Encoding,
    first: Arc<EncodedFrame>,
) -> Result<(), axum::Error> {
    let mut frames = 0;
    let mut bytes = 0;
    let mut next = Some(first);
    while let Some(frame) = next.take() {
        if let Some(message) = to_message(encoding, &frame) {
            bytes += match &message {
                Message::Binary(b) => b.len(),
                Message::Text(t) => t.len(),
                _ => 0,
            };
            sink.feed(message).await?;
        }
        frames += 1;
        if frames < WRITE_BURST_FRAMES && bytes < WRITE_BURST_BYTES {
            next = out.try_recv().ok();
        }
    }
    sink.flush().await
}

fn to_message(encoding: Encoding, frame: &EncodedFrame) -> Option<Message> {
    let bytes = frame.bytes(encoding)?;
    Some(match encoding {
        Encoding::MsgPack => Message::Binary(bytes),
        // serde_json writes UTF-8 only, so this conversion does not fail in practice.
        Encoding::Json => Message::Text(Utf8Bytes::try_from(bytes).ok()?),
    })
}
