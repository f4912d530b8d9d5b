//! One WebSocket session. `run` sets it up in the upgrade's own task: it reads what a connection
//! needs before its welcome (one backend round trip), numbers its login under a multi-login
//! policy, and registers it with its user's shard. Then `serve` is the connection's one
//! long-lived task: it reads and answers client frames and writes what is queued for the
//! connection (`writer.rs`), pings, and closes. The session never awaits Redis or the
//! authorization hook: backend work and hook calls for a request run in tasks of their own, and
//! the session only applies their answers.

use std::{
    future::Future,
    net::SocketAddr,
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::StreamExt;
use shared::{Encoding, ErrorCode, Message as ChatMessage, Platform, ServerFrame};
use tokio::{sync::oneshot, time::Instant};

use super::{
    requests::{Answered, Requests},
    writer::{Writer, close_socket},
};
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

/// Sets the session up, in the upgrade's task; an accepted connection then gets a task of its own
/// (`serve`), sized for the connected session alone: what only the setup needs (the identity,
/// the connect-time reads, the login) is gone from it.
pub async fn run(
    app: Arc<App>,
    mut socket: WebSocket,
    identity: Identity,
    encoding: Encoding,
    peer: SocketAddr,
    user_agent: Option<String>,
) {
    let now = now_ms();
    let conn = Arc::new(ConnHandle::new(
        app.next_conn_id(),
        identity.user.clone(),
        identity.platform,
        encoding,
        peer,
        user_agent,
        now,
        app.config.outbound_queue,
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
        close(&mut socket, &conn).await;
        return;
    }
    // Numbered before it registers, so this login's own announcement cannot close it.
    if let Some(scope) = login_scope(app.config.multi_login, conn.platform) {
        login(&app, &conn, scope).await;
    }
    match register(&app, &conn, EncodedFrame::new(welcome), offline, groups).await {
        Some(true) => {}
        Some(false) => {
            metrics::counter!(m::CONNECTS, "result" => "too_many").increment(1);
            conn.close(close_code::TOO_MANY_CONNECTIONS);
            close(&mut socket, &conn).await;
            return;
        }
        None => {
            conn.close(close_code::GOING_AWAY);
            close(&mut socket, &conn).await;
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
    let requests = Requests::new(app.clone(), conn.clone());
    let sessions = app.sessions.clone();
    let fut = serve(Session {
        conn,
        socket,
        requests,
        writer: Writer::default(),
    });
    sessions.spawn(fut);
}

/// What the connected session holds (the node's `App` through `requests`).
struct Session {
    conn: Arc<ConnHandle>,
    socket: WebSocket,
    requests: Requests,
    /// The write side's unfinished work (a flush, a ping).
    writer: Writer,
}

/// Closes the socket with the code asked for (1000 if none was) and its reason.
async fn close(socket: &mut WebSocket, conn: &ConnHandle) {
    let code = conn.requested_close_code().unwrap_or(close_code::NORMAL);
    let reason = conn.close_reason().map(Utf8Bytes::from);
    close_socket(socket, conn, code, reason).await;
}

/// What woke the session.
enum Event {
    /// The socket gave a message, ended (`None`) or failed.
    Read(Option<Result<Message, axum::Error>>),
    /// Writing to the socket failed.
    WriteFailed,
    /// A close was asked for (`ConnHandle::close`).
    Closing,
    /// The drain started closing sessions: this one takes its turn.
    NodeClosing,
    /// The authorization hook answered a `subscribe` (boxed: rare, and every idle task holds room
    /// for the largest event).
    Answer(Box<Answered>),
    /// The heartbeat (or the token's expiry) is due.
    Tick,
}

/// The connected session's task: the loop, then the teardown.
///
/// Not an `async fn`: one keeps its arguments for its whole life next to the locals they are
/// moved into, so the session's state would be in its task twice (~0.5 KiB).
#[allow(clippy::manual_async_fn)] // see above: the `async fn` is what costs the memory
fn serve(mut session: Session) -> impl Future<Output = ()> + Send {
    async move {
        session.connected().await;
        Box::pin(finish(session)).await;
    }
}

impl Session {
    /// Reads client frames and answers them, writes what is queued for the connection in bursts,
    /// pings every heartbeat, closes with 4010 after two silent heartbeats and with 4001 when the
    /// token expires; returns once the connection is to close (its code asked for, if any).
    ///
    /// One `poll_fn` waits for everything at once rather than a `select!`, whose branch futures
    /// and output would stay in every idle connection's task.
    async fn connected(&mut self) {
        // One timer serves the heartbeat and the token's expiry: it fires at whichever comes
        // first, so an idle connection carries no second timer.
        let mut next_ping = Instant::now() + self.requests.app().config.heartbeat();
        let mut timer = pin!(tokio::time::sleep_until(next_ping));
        // The node's shutdown token is shared by every session, and polling its future takes a
        // lock they all share: it is registered once here, and afterwards a cheap flag says
        // whether it fired.
        let node = self.requests.app().drain.closing_token();
        let mut node_closing = pin!(node.cancelled());
        std::future::poll_fn(|cx| {
            let _ = node_closing.as_mut().poll(cx);
            Poll::Ready(())
        })
        .await;
        loop {
            let deadline = next_ping.min(deadline_of(&self.conn.token_expires_at)).min(
                // Once the drain closes sessions, this one's turn (see `drain.rs`); it keeps
                // serving until then.
                deadline_of(&self.conn.drain_close_at),
            );
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            let event = std::future::poll_fn(|cx| {
                if let Poll::Ready(event) = self.poll_socket(cx) {
                    return Poll::Ready(event);
                }
                // Only with the authorization hook, while a `subscribe` waits for its answer.
                if let Poll::Ready(Some(answer)) = self.requests.poll_answer(cx) {
                    return Poll::Ready(Event::Answer(Box::new(answer)));
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Tick);
                }
                if node.is_cancelled() && self.conn.drain_close_at.load(Ordering::Relaxed) == 0 {
                    return Poll::Ready(Event::NodeClosing);
                }
                Poll::Pending
            })
            .await;
            let message = match event {
                Event::Read(Some(Ok(message))) => message,
                Event::Read(None) | Event::Closing => return,
                Event::Read(Some(Err(e))) => {
                    let failure = ReadFailure::of(e);
                    // Oversized frames end here (the protocol layer refuses them); so do protocol
                    // violations and broken sockets, each closed with the code that says which.
                    match failure {
                        ReadFailure::TooLarge(_) => self.conn.close(close_code::POLICY),
                        ReadFailure::Protocol(_) => self.conn.close(close_code::PROTOCOL_ERROR),
                        ReadFailure::Utf8 => self.conn.close(close_code::INVALID_DATA),
                        ReadFailure::Socket(_) => false,
                    };
                    tracing::debug!(conn = self.conn.id, error = %failure, "read failed");
                    return;
                }
                Event::WriteFailed => {
                    self.conn.close(close_code::NORMAL);
                    return;
                }
                Event::NodeClosing => {
                    let turn = self.requests.app().drain.take_turn();
                    let wait = turn.saturating_duration_since(Instant::now());
                    let at = now_ms() + wait.as_millis() as u64;
                    self.conn.drain_close_at.store(at.max(1), Ordering::Relaxed);
                    continue;
                }
                Event::Answer(answer) => {
                    let applying = Box::pin(self.requests.answered(*answer));
                    if !while_writing(applying, &mut self.socket, &mut self.writer, &self.conn)
                        .await
                    {
                        self.conn.close(close_code::NORMAL);
                        return;
                    }
                    continue;
                }
                Event::Tick => {
                    let now = now_ms();
                    let drained = self.conn.drain_close_at.load(Ordering::Relaxed);
                    if drained != 0 && now >= drained {
                        self.conn.close(close_code::GOING_AWAY);
                        return;
                    }
                    let expires = self.conn.token_expires_at.load(Ordering::Relaxed);
                    if expires != 0 && now >= expires {
                        metrics::counter!(m::SESSION_CLOSES, "reason" => "token_expired")
                            .increment(1);
                        self.conn
                            .close_with(close_code::UNAUTHORIZED, "token expired");
                        return;
                    }
                    if Instant::now() < next_ping {
                        continue;
                    }
                    let heartbeat = self.requests.app().config.heartbeat();
                    next_ping += heartbeat;
                    let heard = self.conn.last_heard.load(Ordering::Relaxed);
                    if now.saturating_sub(heard) > 2 * heartbeat.as_millis() as u64 {
                        self.conn.close(close_code::HEARTBEAT_TIMEOUT);
                        return;
                    }
                    self.writer.ping(now);
                    continue;
                }
            };
            let now = now_ms();
            let payload = match self.request_of(message, now) {
                Incoming::Request(payload) => payload,
                Incoming::Handled => continue,
                Incoming::Close => return,
            };
            // Boxed: an idle connection's task is as large as its largest await point, and
            // request handling is by far the largest; boxing keeps that cost to the moments it
            // runs.
            let handling = Box::pin(handle(&mut self.requests, payload, now));
            if !while_writing(handling, &mut self.socket, &mut self.writer, &self.conn).await {
                self.conn.close(close_code::NORMAL);
                return;
            }
        }
    }

    /// The socket's side of the session: writes what is due (`Writer::poll_write`, which also
    /// registers the task to be woken by the queue and by a close), then reads.
    fn poll_socket(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if self
            .writer
            .poll_write(&mut self.socket, &self.conn, cx)
            .is_ready()
        {
            return Poll::Ready(Event::WriteFailed);
        }
        if self.conn.is_closing() {
            return Poll::Ready(Event::Closing);
        }
        self.socket.poll_next_unpin(cx).map(Event::Read)
    }

    /// What a message from the client asks for: a request to handle (its payload), nothing
    /// more to do (a pong, say, or a frame answered with an error), or the close.
    fn request_of(&mut self, message: Message, now: u64) -> Incoming {
        self.conn.last_heard.store(now, Ordering::Relaxed);
        let payload = match (message, self.conn.encoding) {
            (Message::Binary(bytes), Encoding::MsgPack) => bytes,
            (Message::Text(text), Encoding::Json) => Bytes::from(text),
            (Message::Binary(_), Encoding::Json) | (Message::Text(_), Encoding::MsgPack) => {
                self.requests.reply_error(
                    None,
                    ErrorCode::BadRequest,
                    "frames must be binary MessagePack for presence.v1.msgpack, text JSON for presence.v1.json",
                );
                return Incoming::Handled;
            }
            (Message::Pong(payload), _) => {
                note_rtt(&self.conn, &payload, now);
                return Incoming::Handled;
            }
            (Message::Ping(_), _) => return Incoming::Handled,
            (Message::Close(_), _) => return Incoming::Close,
        };
        let max = self.requests.app().config.max_frame_bytes;
        if payload.len() > max {
            self.requests.reply_error(
                None,
                ErrorCode::TooLarge,
                format!(
                    "frame of {} bytes is over the {max}-byte limit",
                    payload.len()
                ),
            );
            return Incoming::Handled;
        }
        Incoming::Request(payload)
    }
}

/// What a message from the client asks of the session.
enum Incoming {
    Request(Bytes),
    Handled,
    Close,
}

/// Handles one request; owns its payload, so none of it stays in the session's task.
async fn handle(requests: &mut Requests, payload: Bytes, now: u64) {
    requests.handle(&payload, now).await;
}

/// Runs `work` (a request waiting for a shard's or the router's mailbox, say) to its end while
/// what is queued for the connection keeps going out, as it would with a writer of its own.
/// False if writing failed meanwhile.
async fn while_writing(
    mut work: Pin<Box<impl Future<Output = ()>>>,
    socket: &mut WebSocket,
    writer: &mut Writer,
    conn: &ConnHandle,
) -> bool {
    let mut wrote = true;
    std::future::poll_fn(|cx| {
        if wrote && writer.poll_write(socket, conn, cx).is_ready() {
            wrote = false;
        }
        work.as_mut().poll(cx)
    })
    .await;
    wrote
}

/// A time in ms since the epoch (the token's expiry, the drain's turn) on tokio's clock; far
/// away for 0 (never).
fn deadline_of(at_ms: &AtomicU64) -> Instant {
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    match at_ms.load(Ordering::Relaxed) {
        0 => far,
        expires => {
            let left = Duration::from_millis(expires.saturating_sub(now_ms()));
            (Instant::now() + left).min(far)
        }
    }
}

/// Whatever ended the session, the socket is closed with the code asked for (1000 if none was),
/// and meanwhile the shard hears of it (and detaches the connection from its groups) and
/// watches are dropped.
async fn finish(session: Session) {
    let Session {
        conn,
        mut socket,
        mut requests,
        ..
    } = session;
    let app = requests.app().clone();
    let reason = match conn.requested_close_code() {
        Some(close_code::GOING_AWAY) => "going_away",
        Some(close_code::POLICY) => "policy",
        Some(close_code::HEARTBEAT_TIMEOUT) => "heartbeat_timeout",
        Some(_) => "server",
        None => "client",
    };
    conn.close(close_code::NORMAL);
    let teardown = async {
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
        metrics::counter!(m::DISCONNECTS, "reason" => reason).increment(1);
    };
    tokio::join!(close(&mut socket, &conn), teardown);
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
        // A closed connection's catch-up ends within `CATCH_UP_RETRY` of the close.
        if conn.is_closing() {
            return;
        }
        if tokio::time::timeout(CATCH_UP_RETRY, app.backend.health.wait_up())
            .await
            .is_err()
        {
            continue;
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
        tokio::time::sleep(CATCH_UP_RETRY).await;
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
        conn.rtt_ms.store(rtt, Ordering::Relaxed);
        metrics::histogram!(m::HEARTBEAT_RTT_SECONDS).record(rtt as f64 / 1000.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned_size<A, R>(_: fn(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every idle connection holds this future in its task. tokio puts a task in one allocation
    /// rounded up to 128 bytes, with about 110 bytes of its own (header, scheduler handle, id,
    /// trailer, `TaskTracker`'s token): at 904 bytes the task takes 1,024 bytes (heaptrack), at
    /// 968 it took 1,152 for every connection (docs/benchmarks.md).
    #[test]
    fn an_idle_connection_task_fits_in_one_kib() {
        let size = returned_size(serve as fn(Session) -> _);
        assert!(size <= 904, "the session future grew to {size} bytes");
    }
}
