//! One WebSocket session: reads what a connection needs before its welcome (one backend round
//! trip), numbers its login under a multi-login policy, registers it with its user's shard, then
//! reads client frames in this task while the writer task (`writer.rs`) drains the outbound
//! queue. The read loop never awaits Redis or the authorization hook: backend work and hook calls
//! for a request run in tasks of their own, and the session only applies their answers.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use futures_util::{
    StreamExt,
    stream::{SplitSink, SplitStream},
};
use shared::{Encoding, ErrorCode, Platform, ServerFrame};
use tokio::sync::{mpsc, oneshot};

use super::{requests::Requests, writer::write_loop};
use crate::{
    app::App,
    auth::Identity,
    backend::ConnectState,
    clock::now_ms,
    config::MultiLogin,
    conn_handle::{ConnHandle, close_code},
    frame::{EncodedFrame, within_bytes},
    metrics as m,
    shard::ShardCmd,
};

/// When a login under a multi-login policy checks that no newer one slipped past it: well after
/// a node subscribes to a new user's inbox (a few ms).
const LOGIN_RECHECK: Duration = Duration::from_secs(1);

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
    conn.set_max_queued_bytes(app.config.outbound_queue_bytes);
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
    let offline = offline.unwrap_or_else(|e| {
        tracing::warn!(error = %e, user = %conn.user, "cannot read stored messages");
        Vec::new()
    });
    // Bounded in bytes: the rest stays stored and follows on a later connect, after the client
    // acknowledged these.
    let (offline, _) = within_bytes(offline, conn.encoding, app.config.max_reply_bytes);
    let offline: Vec<Arc<EncodedFrame>> = offline
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
    // Numbered before it registers, so this login's own announcement cannot close it.
    if let Some(scope) = login_scope(app.config.multi_login, conn.platform) {
        Box::pin(login(&app, &conn, scope)).await;
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

/// A multi-login policy's scope for a login on `platform`: `None` when every login stays.
fn login_scope(policy: MultiLogin, platform: Platform) -> Option<Option<Platform>> {
    match policy {
        MultiLogin::All => None,
        MultiLogin::Platform => Some(Some(platform)),
        MultiLogin::Single => Some(None),
    }
}

/// After a login under a multi-login policy, every node closes the user's older logins in its
/// scope (`Control::Replace`, in the order Redis numbered them). A node that was not yet
/// listening to the user when a newer login was announced would miss it, so each connection
/// also looks again once the announcement has surely been heard: two logins racing on two
/// nodes leave exactly the later one. Without the backend, the login stays (and is logged).
async fn login(app: &Arc<App>, conn: &Arc<ConnHandle>, scope: Option<Platform>) {
    match app.backend.sessions.login(&conn.user, scope).await {
        Ok(seq) => conn.set_login_seq(seq),
        Err(e) => {
            tracing::warn!(error = %e, user = %conn.user, "cannot number the login; it stays");
            return;
        }
    }
    let (app, conn) = (app.clone(), conn.clone());
    tokio::spawn(async move {
        tokio::time::sleep(LOGIN_RECHECK).await;
        if conn.is_closing() {
            return;
        }
        if let Ok(latest) = app.backend.sessions.latest_login(&conn.user, scope).await
            && latest > conn.login_seq()
            && conn.close(close_code::REPLACED)
        {
            metrics::counter!(m::SESSION_CLOSES, "reason" => "replaced").increment(1);
        }
    });
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
                // Oversized frames end here (the protocol layer refuses them); so do protocol
                // violations and broken sockets, each closed with the code that says which.
                match failure {
                    ReadFailure::TooLarge(_) => conn.close(close_code::POLICY),
                    ReadFailure::Protocol(_) => conn.close(close_code::PROTOCOL_ERROR),
                    ReadFailure::Utf8 => conn.close(close_code::INVALID_DATA),
                    ReadFailure::Socket(_) => false,
                };
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
