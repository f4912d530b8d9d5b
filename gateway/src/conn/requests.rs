//! Client requests of one connection: decoding, validation, rate limiting, and the answer to each.
//! Shard commands are sent from here; backend reads and calls to the authorization hook run in tasks
//! of their own (at most `MAX_IN_FLIGHT` per connection) so the session keeps reading.
//!
//! With the hook, a `subscribe` changes the connection's subscriptions only once the hook answered:
//! the task asks, then hands the answer back to the session ([`Requests::answered`]), which alone
//! owns the subscription set and so watches, and later unwatches, in request order.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use shared::{ClientFrame, Destination, Encoding, ErrorCode, ServerFrame, Status, ids};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::conn_handle::ConnHandle;
use crate::{
    app::App,
    auth::AuthError,
    authz::{Ask, AuthzHook, Verdict},
    backend::{BackendError, JoinPolicy, Origin, Outgoing, Roles, online_members, parse_msg_id},
    clock::now_ms,
    frame::EncodedFrame,
    metrics as m,
    presence::ChosenStatus,
    router::{Reply, RouteJob},
    shard::ShardCmd,
};

/// Most users one request may name, and one connection may watch in all.
pub const MAX_USERS: usize = 1000;
/// Backend requests of one connection running at once.
const MAX_IN_FLIGHT: usize = 16;

pub struct Requests {
    app: Arc<App>,
    conn: Arc<ConnHandle>,
    /// Users this connection watches, so they can be unwatched when it closes.
    subscribed: HashSet<String>,
    in_flight: Arc<Semaphore>,
    bucket: TokenBucket,
    /// Subscribes waiting for the authorization hook; made at the first one (boxed: most
    /// connections never have one, and every connection carries this field).
    asking: Option<Box<Asking>>,
}

/// Subscribes of one connection whose hook answer has not been applied yet.
struct Asking {
    /// Users named by a subscribe still waiting, with that subscribe's number: only the latest
    /// subscribe naming a user decides for them, and an `unsubscribe` naming them meanwhile wins.
    pending: HashMap<String, u64>,
    /// Number of the last subscribe sent to the hook.
    last: u64,
    /// Answers handed out and not yet applied.
    outstanding: usize,
    tx: mpsc::Sender<Answered>,
    rx: mpsc::Receiver<Answered>,
}

/// The hook's answer to one `subscribe`, for the session to apply.
pub struct Answered {
    id: Option<u64>,
    number: u64,
    users: Vec<String>,
    verdict: Verdict,
    /// The request's in-flight slot, kept for the `presence_list` read that follows.
    permit: OwnedSemaphorePermit,
}

impl Requests {
    pub fn new(app: Arc<App>, conn: Arc<ConnHandle>) -> Self {
        let rate = app.config.rate_limit;
        Requests {
            app,
            conn,
            subscribed: HashSet::new(),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            bucket: TokenBucket::new(rate),
            asking: None,
        }
    }

    pub fn reply_error(&self, id: Option<u64>, code: ErrorCode, message: impl Into<String>) {
        metrics::counter!(m::CLIENT_ERRORS, "code" => code.as_str()).increment(1);
        self.conn.push_frame(ServerFrame::error(id, code, message));
    }

    fn reply(&self, frame: ServerFrame) {
        self.conn.push_frame(frame);
    }

    pub async fn handle(&mut self, payload: &[u8], now: u64) {
        if !self.bucket.take() {
            let id = self
                .conn
                .encoding
                .decode_client(payload)
                .ok()
                .and_then(|f| f.id());
            self.reply_error(
                id,
                ErrorCode::RateLimited,
                "over the per-connection frame rate",
            );
            return;
        }
        let frame = match self.conn.encoding.decode_client(payload) {
            Ok(frame) => frame,
            Err(e) => {
                self.reply_error(e.id, ErrorCode::BadRequest, e.message);
                return;
            }
        };
        metrics::counter!(m::FRAMES_IN, "type" => frame.kind()).increment(1);
        if !matches!(frame, ClientFrame::Ping { .. }) {
            self.note_activity(now).await;
        }
        let id = frame.id();
        if let Err((code, message)) = self.dispatch(frame).await {
            self.reply_error(id, code, message);
        }
    }

    /// Activity brings an auto-away user back: the shard hears of it only when this connection
    /// had been idle long enough to count.
    async fn note_activity(&self, now: u64) {
        let before = self.conn.touch(now);
        let idle_ms = self.app.config.idle_away_secs * 1000;
        if now.saturating_sub(before) >= idle_ms {
            let user = self.conn.user.clone();
            self.app
                .shards
                .send(&user, ShardCmd::Active { user: user.clone() })
                .await;
        }
    }

    async fn dispatch(&mut self, frame: ClientFrame) -> Result<(), (ErrorCode, String)> {
        match frame {
            ClientFrame::Ping { id } => self.reply(ServerFrame::Pong { id }),
            ClientFrame::SetStatus { id, status, text } => {
                if status == Status::Offline {
                    return Err(bad("status must be online, away, busy or invisible"));
                }
                if text
                    .as_ref()
                    .is_some_and(|t| t.len() > ids::MAX_STATUS_TEXT_BYTES)
                {
                    return Err(bad(format!(
                        "text must be at most {} bytes",
                        ids::MAX_STATUS_TEXT_BYTES
                    )));
                }
                let user = self.conn.user.clone();
                let cmd = ShardCmd::SetStatus {
                    user: user.clone(),
                    status: ChosenStatus { status, text },
                };
                if !self.app.shards.send(&user, cmd).await {
                    return Err(unavailable());
                }
                self.reply(ServerFrame::ok(id));
            }
            ClientFrame::Subscribe { id, users } => {
                let users = checked_users(users)?;
                if let Some(hook) = &self.app.authz {
                    let hook = hook.clone();
                    return self.ask_to_subscribe(hook, id, users);
                }
                let new: Vec<String> = users
                    .iter()
                    .filter(|u| !self.subscribed.contains(*u))
                    .cloned()
                    .collect();
                if self.subscribed.len() + new.len() > MAX_USERS {
                    return Err(bad(format!(
                        "a connection may subscribe to at most {MAX_USERS} users"
                    )));
                }
                self.subscribed.extend(new.iter().cloned());
                for (shard, users) in self.app.shards.partition(new) {
                    let cmd = ShardCmd::Watch {
                        users,
                        conn: self.conn.clone(),
                    };
                    self.app.shards.send_to(shard, cmd).await;
                }
                self.query(id, users)?;
            }
            ClientFrame::Unsubscribe { id, users } => {
                let users = checked_users(users)?;
                if let Some(asking) = &mut self.asking {
                    for user in &users {
                        asking.pending.remove(user);
                    }
                }
                let gone: Vec<String> = users
                    .into_iter()
                    .filter(|u| self.subscribed.remove(u))
                    .collect();
                self.unwatch(gone).await;
                self.reply(ServerFrame::ok(id));
            }
            ClientFrame::Query { id, users } => {
                let users = checked_users(users)?;
                self.query(id, users)?;
            }
            ClientFrame::Join { id, group } => {
                ids::check_id("group", &group).map_err(bad)?;
                self.change_membership(id, group, true)?;
            }
            ClientFrame::Leave { id, group } => {
                ids::check_id("group", &group).map_err(bad)?;
                self.change_membership(id, group, false)?;
            }
            ClientFrame::GroupOnline { id, group } => {
                ids::check_id("group", &group).map_err(bad)?;
                let user = self.conn.user.clone();
                self.spawn(id, move |backend| async move {
                    if !backend.groups.is_member(&group, &user).await? {
                        return Ok(forbidden(
                            id,
                            "only members may list a group's online members",
                        ));
                    }
                    let users =
                        online_members(backend.groups.as_ref(), backend.presence.as_ref(), &group)
                            .await?;
                    Ok(ServerFrame::MemberList { id, group, users })
                })?;
            }
            ClientFrame::Send { id, to, body } => {
                shared::body::check_body(&body).map_err(|e| bad(e.to_string()))?;
                match &to {
                    Destination::User { user } => ids::check_id("user", user).map_err(bad)?,
                    Destination::Group { group } => ids::check_id("group", group).map_err(bad)?,
                    Destination::All { .. } => {
                        return Err((
                            ErrorCode::Forbidden,
                            "only the app backend may send to everyone".into(),
                        ));
                    }
                }
                let job = RouteJob {
                    out: Outgoing {
                        from: self.conn.user.clone(),
                        to,
                        body,
                        sent_at: now_ms(),
                        origin: Some(Origin {
                            node: self.app.node_id.to_string(),
                            conn: self.conn.id,
                        }),
                        check_membership: true,
                    },
                    reply: Reply::Conn {
                        conn: self.conn.clone(),
                        id,
                    },
                };
                if !self.app.router.route(job).await {
                    return Err(unavailable());
                }
            }
            ClientFrame::AckOffline { id, up_to } => {
                check_msg_id(&up_to)?;
                let user = self.conn.user.clone();
                self.spawn(id, move |backend| async move {
                    backend.messages.ack_offline(&user, &up_to).await?;
                    Ok(ServerFrame::ok(id))
                })?;
            }
            ClientFrame::Sync {
                id,
                group,
                since,
                limit,
            } => {
                ids::check_id("group", &group).map_err(bad)?;
                if let Some(since) = &since {
                    check_msg_id(since)?;
                }
                let limit = limit.unwrap_or(100) as usize;
                if limit == 0 || limit > MAX_SYNC {
                    return Err(bad(format!("limit must be 1 to {MAX_SYNC}")));
                }
                let user = self.conn.user.clone();
                self.spawn(id, move |backend| async move {
                    if !backend.groups.is_member(&group, &user).await? {
                        return Ok(forbidden(id, "only members may read a group's messages"));
                    }
                    let since = match since {
                        Some(since) => Some(since),
                        None => backend.messages.read_position(&user, &group).await?,
                    };
                    let (messages, more) = backend
                        .messages
                        .history(&group, since.as_deref(), limit)
                        .await?;
                    Ok(ServerFrame::History {
                        id,
                        group,
                        messages,
                        more,
                    })
                })?;
            }
            ClientFrame::Read { id, group, up_to } => {
                ids::check_id("group", &group).map_err(bad)?;
                check_msg_id(&up_to)?;
                check_not_ahead(&up_to)?;
                let user = self.conn.user.clone();
                self.spawn(id, move |backend| async move {
                    if !backend.groups.is_member(&group, &user).await? {
                        return Ok(forbidden(id, "only members may mark a group read"));
                    }
                    backend
                        .messages
                        .set_read_position(&user, &group, &up_to)
                        .await?;
                    Ok(ServerFrame::ok(id))
                })?;
            }
            ClientFrame::Refresh { id, token } => self.refresh(id, token)?,
            ClientFrame::Unread { id } => {
                let user = self.conn.user.clone();
                self.spawn(id, move |backend| async move {
                    let groups = backend.messages.unread(&user).await?;
                    Ok(ServerFrame::UnreadCounts { id, groups })
                })?;
            }
        }
        Ok(())
    }

    /// Joins or leaves a group. Once the backend has it, this connection follows at once (before
    /// the `ok`, so a message sent after it reaches this connection); the user's other connections,
    /// here and on other nodes, follow through the membership event.
    fn change_membership(
        &self,
        id: Option<u64>,
        group: String,
        joined: bool,
    ) -> Result<(), (ErrorCode, String)> {
        let user = self.conn.user.clone();
        let conn = self.conn.clone();
        let shards = self.app.shards.clone();
        let hook = self.app.authz.clone();
        self.spawn(id, move |backend| async move {
            if joined {
                // A member joining again is not refused, whatever the policy. A closed group
                // refuses non-members before the hook is asked: its answer could not change that.
                let open = backend.groups.join_policy(&group).await? == JoinPolicy::Open;
                if !open && !backend.groups.is_member(&group, &user).await? {
                    return Ok(forbidden(
                        id,
                        "this group is closed: members are added by the app",
                    ));
                }
                if let Some(hook) = hook {
                    let ask = Ask::Join {
                        user: &user,
                        platform: conn.platform,
                        group: &group,
                    };
                    match hook.check(&ask).await {
                        Verdict::Allow => {}
                        Verdict::Deny(refusal) => return Ok(forbidden(id, refusal.message())),
                        // A list answers only a subscribe; `check` reads it as a failure for a join.
                        Verdict::Only(_) => return Ok(forbidden(id, "not allowed by the app")),
                    }
                }
                backend.groups.add_member(&group, &user).await?;
            } else {
                backend.groups.remove_member(&group, &user).await?;
            }
            shards.follow(&conn, &group, joined).await;
            Ok(ServerFrame::ok(id))
        })
    }

    /// Replaces the connection's token with a newer one of the same user and platform, moving
    /// its expiry; any other token leaves the connection as it was.
    fn refresh(&self, id: Option<u64>, token: String) -> Result<(), (ErrorCode, String)> {
        let app = self.app.clone();
        let conn = self.conn.clone();
        let permit = self.permit()?;
        tokio::spawn(async move {
            let _permit = permit;
            let frame = match app.auth.authenticate(Some(&token)).await {
                Ok(identity)
                    if identity.user == conn.user && identity.platform == conn.platform =>
                {
                    conn.set_token(identity.issued_at, identity.expires_at);
                    ServerFrame::Ok {
                        id,
                        expires_at: Some(identity.expires_at),
                    }
                }
                Ok(_) => ServerFrame::error(
                    id,
                    ErrorCode::Unauthorized,
                    "the token is for another user or platform",
                ),
                Err(AuthError::Unavailable) => {
                    ServerFrame::error(id, ErrorCode::Unavailable, "token store unavailable")
                }
                Err(e) => ServerFrame::error(id, ErrorCode::Unauthorized, e.to_string()),
            };
            conn.push_frame(frame);
        });
        Ok(())
    }

    /// One of the connection's `MAX_IN_FLIGHT` slots for backend work.
    fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, (ErrorCode, String)> {
        self.in_flight.clone().try_acquire_owned().map_err(|_| {
            (
                ErrorCode::RateLimited,
                "too many requests in flight".to_string(),
            )
        })
    }

    /// Runs backend work for a request in its own task (at most `MAX_IN_FLIGHT` per connection)
    /// and queues its answer; a backend failure answers `unavailable`.
    fn spawn<F, Fut>(&self, id: Option<u64>, work: F) -> Result<(), (ErrorCode, String)>
    where
        F: FnOnce(Roles) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<ServerFrame, BackendError>> + Send + 'static,
    {
        self.spawn_or(id, "backend unavailable", work)
    }

    /// `spawn`, with the message a backend failure answers.
    fn spawn_or<F, Fut>(
        &self,
        id: Option<u64>,
        failure: &'static str,
        work: F,
    ) -> Result<(), (ErrorCode, String)>
    where
        F: FnOnce(Roles) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<ServerFrame, BackendError>> + Send + 'static,
    {
        let permit = self.permit()?;
        self.run(permit, id, failure, work);
        Ok(())
    }

    /// Runs `work` in its own task holding `permit`, and queues its answer.
    fn run<F, Fut>(
        &self,
        permit: OwnedSemaphorePermit,
        id: Option<u64>,
        failure: &'static str,
        work: F,
    ) where
        F: FnOnce(Roles) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<ServerFrame, BackendError>> + Send + 'static,
    {
        let backend = self.app.backend.clone();
        let conn = self.conn.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let frame = match work(backend).await {
                Ok(frame) => frame,
                Err(e) => {
                    tracing::warn!(error = %e, "request failed in the backend");
                    ServerFrame::error(id, ErrorCode::Unavailable, failure)
                }
            };
            conn.push(&readable(frame, conn.encoding, id));
        });
    }

    /// Answers `presence_list` for `users`, as this connection's user may see them.
    fn query(&self, id: Option<u64>, users: Vec<String>) -> Result<(), (ErrorCode, String)> {
        let permit = self.permit()?;
        self.query_with(permit, id, users, None);
        Ok(())
    }

    /// `query` in the slot `permit`; `denied` (users the hook refused) goes into the answer.
    fn query_with(
        &self,
        permit: OwnedSemaphorePermit,
        id: Option<u64>,
        users: Vec<String>,
        denied: Option<Vec<String>>,
    ) {
        let viewer = self.conn.user.clone();
        self.run(
            permit,
            id,
            "presence store unavailable",
            move |backend| async move {
                let records = backend.presence.presence(&users).await?;
                Ok(ServerFrame::PresenceList {
                    denied,
                    id,
                    items: records.iter().map(|r| r.view_for(Some(&viewer))).collect(),
                })
            },
        )
    }

    /// `subscribe` with the authorization hook: the users count against the connection's limit
    /// at once, and the hook is asked in a task of its own, which hands its answer back to the
    /// session (see [`Requests::answered`]). Nothing is watched before the answer.
    fn ask_to_subscribe(
        &mut self,
        hook: Arc<AuthzHook>,
        id: Option<u64>,
        users: Vec<String>,
    ) -> Result<(), (ErrorCode, String)> {
        let permit = self.permit()?;
        let asking = self.asking.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
            Box::new(Asking {
                pending: HashMap::new(),
                last: 0,
                outstanding: 0,
                tx,
                rx,
            })
        });
        let waiting = asking
            .pending
            .keys()
            .filter(|u| !self.subscribed.contains(*u))
            .count();
        let adding = users
            .iter()
            .filter(|u| !self.subscribed.contains(*u) && !asking.pending.contains_key(*u))
            .count();
        if self.subscribed.len() + waiting + adding > MAX_USERS {
            return Err(bad(format!(
                "a connection may subscribe to at most {MAX_USERS} users"
            )));
        }
        asking.last += 1;
        let number = asking.last;
        for user in &users {
            asking.pending.insert(user.clone(), number);
        }
        asking.outstanding += 1;
        let tx = asking.tx.clone();
        let (user, platform) = (self.conn.user.clone(), self.conn.platform);
        tokio::spawn(async move {
            let ask = Ask::Subscribe {
                user: &user,
                platform,
                users: &users,
            };
            let verdict = hook.check(&ask).await;
            // The session may have ended meanwhile; then nobody applies the answer.
            let _ = tx
                .send(Answered {
                    id,
                    number,
                    users,
                    verdict,
                    permit,
                })
                .await;
        });
        Ok(())
    }

    /// Whether a hook answer may be on its way (the session only polls [`Requests::next_answer`]
    /// then).
    pub fn awaits_answer(&self) -> bool {
        self.asking.as_ref().is_some_and(|a| a.outstanding > 0)
    }

    /// The next hook answer to apply.
    pub async fn next_answer(&mut self) -> Option<Answered> {
        match &mut self.asking {
            Some(asking) => asking.rx.recv().await,
            None => std::future::pending().await,
        }
    }

    /// Applies the hook's answer to a `subscribe`: for each user this subscribe still decides
    /// (see [`Asking::pending`]), an allowed one is watched and a denied one is unwatched if the
    /// connection watched them before. Then answers `presence_list` for the allowed users, naming
    /// the denied ones; a refusal answers `forbidden` and changes nothing.
    pub async fn answered(&mut self, answer: Answered) {
        let Some(asking) = &mut self.asking else {
            return;
        };
        asking.outstanding = asking.outstanding.saturating_sub(1);
        let Answered {
            id,
            number,
            users,
            verdict,
            permit,
        } = answer;
        let mut decides = |user: &String| {
            let mine = asking.pending.get(user) == Some(&number);
            if mine {
                asking.pending.remove(user);
            }
            mine
        };
        let (allowed, denied): (Vec<String>, Vec<String>) = match verdict {
            Verdict::Allow => (users, Vec::new()),
            Verdict::Only(allowed) => users.into_iter().partition(|u| allowed.contains(u)),
            Verdict::Deny(refusal) => {
                for user in &users {
                    decides(user);
                }
                drop(permit);
                self.reply_error(id, ErrorCode::Forbidden, refusal.message());
                return;
            }
        };
        let mut watch = Vec::new();
        for user in &allowed {
            if decides(user) && self.subscribed.insert(user.clone()) {
                watch.push(user.clone());
            }
        }
        let mut unwatch = Vec::new();
        for user in &denied {
            if decides(user) && self.subscribed.remove(user) {
                unwatch.push(user.clone());
            }
        }
        for (shard, users) in self.app.shards.partition(watch) {
            let cmd = ShardCmd::Watch {
                users,
                conn: self.conn.clone(),
            };
            self.app.shards.send_to(shard, cmd).await;
        }
        self.unwatch(unwatch).await;
        let denied = (!denied.is_empty()).then_some(denied);
        self.query_with(permit, id, allowed, denied);
    }

    async fn unwatch(&self, users: Vec<String>) {
        for (shard, users) in self.app.shards.partition(users) {
            let cmd = ShardCmd::Unwatch {
                users,
                conn: self.conn.id,
            };
            self.app.shards.send_to(shard, cmd).await;
        }
    }

    /// Drops every watch of this connection (it is closing).
    pub async fn release(&mut self) {
        // Answers still on their way are dropped with it: nothing more gets watched.
        self.asking = None;
        let all: Vec<String> = self.subscribed.drain().collect();
        self.unwatch(all).await;
    }
}

/// The answer as this connection can read it. A stored message written before bodies were checked
/// may not encode in every encoding: it is left out of a `history` (and counted) rather than
/// leaving the request unanswered; any other answer that cannot be encoded becomes an error.
fn readable(frame: ServerFrame, encoding: Encoding, id: Option<u64>) -> Arc<EncodedFrame> {
    let encoded = EncodedFrame::new(frame);
    if encoded.bytes(encoding).is_some() {
        return encoded;
    }
    let frame = match Arc::try_unwrap(encoded).map(EncodedFrame::into_frame) {
        Ok(ServerFrame::History {
            id,
            group,
            messages,
            more,
        }) => {
            let total = messages.len();
            let messages: Vec<_> = messages
                .into_iter()
                .filter(|m| encoding.encode(m).is_ok())
                .collect();
            metrics::counter!(m::UNREADABLE_MESSAGES).increment((total - messages.len()) as u64);
            ServerFrame::History {
                id,
                group,
                messages,
                more,
            }
        }
        _ => ServerFrame::error(
            id,
            ErrorCode::Internal,
            "the answer cannot be encoded for this connection",
        ),
    };
    EncodedFrame::new(frame)
}

/// Messages one `sync` may ask for.
const MAX_SYNC: usize = 500;

fn forbidden(id: Option<u64>, message: &str) -> ServerFrame {
    ServerFrame::error(id, ErrorCode::Forbidden, message)
}

fn check_msg_id(id: &str) -> Result<(), (ErrorCode, String)> {
    parse_msg_id(id)
        .map(|_| ())
        .ok_or_else(|| bad("message ids look like 1700000000000-0000000001"))
}

/// How far past this node's clock a read position may point: ids come from the clocks of the nodes
/// that sent the messages, which may run a little ahead.
const READ_AHEAD_MS: u64 = 60_000;

/// A read position beyond any message that can exist would hide every message sent before the
/// clock reaches it.
fn check_not_ahead(up_to: &str) -> Result<(), (ErrorCode, String)> {
    match parse_msg_id(up_to) {
        Some((ms, _)) if ms > now_ms().saturating_add(READ_AHEAD_MS) => {
            Err(bad("up_to is after the newest message that can exist"))
        }
        _ => Ok(()),
    }
}

fn bad(message: impl Into<String>) -> (ErrorCode, String) {
    (ErrorCode::BadRequest, message.into())
}

fn unavailable() -> (ErrorCode, String) {
    (ErrorCode::Unavailable, "node is stopping".into())
}

/// Validates a request's user list: at most [`MAX_USERS`], every id valid; duplicates dropped.
fn checked_users(users: Vec<String>) -> Result<Vec<String>, (ErrorCode, String)> {
    if users.len() > MAX_USERS {
        return Err(bad(format!("at most {MAX_USERS} users per request")));
    }
    let mut seen = HashSet::with_capacity(users.len());
    let mut out = Vec::with_capacity(users.len());
    for user in users {
        ids::check_id("user", &user).map_err(bad)?;
        if seen.insert(user.clone()) {
            out.push(user);
        }
    }
    Ok(out)
}

/// Frames per second a connection may send: `rate` sustained, bursts of up to `rate`.
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32) -> Self {
        TokenBucket {
            rate: rate as f64,
            tokens: rate as f64,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
