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
use shared::{Encoding, ErrorCode, Message as ChatMessage, Platform, ServerFrame};
use tokio::sync::{mpsc, oneshot};

use super::{requests::Requests, writer::write_loop};
use crate::{
    app::App,
    auth::Identity,
    backend::{BackendError, ConnectState, msg_id},
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
    // that `welcome` and the stored messages are the first frames, in that order. Without the
    // backend (down, or not answering in time) the connection is welcomed all the same and what
    // could not be read follows once the backend is back (`catch_up`).
    let state = connect_reads(&app, &conn.user).await;
    let missing = Missing::of(&state);
    let ConnectState {
        groups,
        offline,
        revoked_at,
    } = state;
    // A revocation that cannot be read lets the connection in for now: an outage must not lock
    // every user out. It is checked again when the backend is back.
    let revoked = revoked_at
        .as_ref()
        .is_ok_and(|at| at.is_some_and(|at| conn.token_issued_before(at)));
    let groups = groups.unwrap_or_default();
    let offline = offline_frames(&app, &conn, offline.unwrap_or_default());
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
    if missing.any() {
        metrics::counter!(m::DEFERRED_CONNECTS, "result" => "deferred").increment(1);
        tokio::spawn(catch_up(app.clone(), conn.clone(), missing));
    }
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

/// How long a connect waits for its connect-time reads: a client is welcomed within a second
/// even when the backend stalls before the circuit notices (a healthy round trip takes about a
/// millisecond).
const CONNECT_READ_WAIT: Duration = Duration::from_millis(750);
/// How long a login under a multi-login policy waits to be numbered. Longer than the reads: a
/// login left unnumbered stays, and loses to every numbered one, so under load (a slow but
/// healthy Redis) two racing logins could both lose. While Redis is known down it fails at once.
const LOGIN_WAIT: Duration = Duration::from_secs(3);
/// Between attempts of a connection's late connect-time reads.
const CATCH_UP_RETRY: Duration = Duration::from_millis(500);

async fn connect_reads(app: &App, user: &str) -> ConnectState {
    tokio::time::timeout(CONNECT_READ_WAIT, app.backend.sessions.connect_state(user))
        .await
        .unwrap_or_else(|_| {
            ConnectState::failed(BackendError::unavailable("connect", "no answer in time"))
        })
}

/// Stored messages as frames, bounded in bytes: the rest stays stored and follows on a later
/// connect, after the client acknowledged these.
fn offline_frames(
    app: &App,
    conn: &ConnHandle,
    offline: Vec<ChatMessage>,
) -> Vec<Arc<EncodedFrame>> {
    let (offline, _) = within_bytes(offline, conn.encoding, app.config.max_reply_bytes);
    offline
        .into_iter()
        .map(|m| EncodedFrame::new(ServerFrame::Message(m)))
        .collect()
}

/// Which connect-time reads a connection still lacks.
#[derive(Clone, Copy)]
struct Missing {
    groups: bool,
    offline: bool,
    revocation: bool,
}

impl Missing {
    fn of(state: &ConnectState) -> Self {
        Missing {
            groups: state.groups.is_err(),
            offline: state.offline.is_err(),
            revocation: state.revoked_at.is_err(),
        }
    }

    fn any(&self) -> bool {
        self.groups || self.offline || self.revocation
    }
}

/// A connection welcomed while the backend was away gets, once it is back, what the connect could
/// not read: it follows its groups, receives its stored messages, and is closed if its token was
/// revoked. Retried until done or the connection closes.
async fn catch_up(app: Arc<App>, conn: Arc<ConnHandle>, mut missing: Missing) {
    loop {
        tokio::select! {
            _ = app.backend.health.wait_up() => {}
            _ = conn.close_requested().cancelled() => return,
        }
        let state = app.backend.sessions.connect_state(&conn.user).await;
        if missing.revocation
            && let Ok(at) = &state.revoked_at
        {
            missing.revocation = false;
            if at.is_some_and(|at| conn.token_issued_before(at)) {
                metrics::counter!(m::DEFERRED_CONNECTS, "result" => "revoked").increment(1);
                conn.close_with(close_code::UNAUTHORIZED, "token revoked");
                return;
            }
        }
        if missing.groups
            && let Ok(groups) = state.groups
        {
            missing.groups = false;
            for group in groups {
                let since = msg_id(conn.connected_at, 0);
                app.shards.follow(&conn, &group, true, Some(since)).await;
            }
        }
        if missing.offline
            && let Ok(offline) = state.offline
        {
            missing.offline = false;
            for frame in offline_frames(&app, &conn, offline) {
                conn.push(&frame);
            }
        }
        if !missing.any() {
            metrics::counter!(m::DEFERRED_CONNECTS, "result" => "caught_up").increment(1);
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(CATCH_UP_RETRY) => {}
            _ = conn.close_requested().cancelled() => return,
        }
    }
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
    let numbered = tokio::time::timeout(LOGIN_WAIT, app.backend.sessions.login(&conn.user, scope))
        .await
        .unwrap_or_else(|_| Err(BackendError::unavailable("login", "no answer in time")));
    match numbered {
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
    // Once the drain closes sessions, this one's turn (see `drain.rs`); it keeps serving until then.
    let mut close_at = None;
    loop {
        let message = tokio::select! {
            m = stream.next() => m,
            // Only with the authorization hook, while a `subscribe` waits for its answer.
            Some(answer) = requests.next_answer(), if requests.awaits_answer() => {
                Box::pin(requests.answered(answer)).await;
                continue;
            }
            _ = conn.close_requested().cancelled() => return,
            _ = app.drain.closing(), if close_at.is_none() => {
                close_at = Some(app.drain.take_turn());
                continue;
            }
            _ = tokio::time::sleep_until(close_at.unwrap_or_else(tokio::time::Instant::now)), if close_at.is_some() => {
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
