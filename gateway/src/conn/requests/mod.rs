//! Client requests of one connection: decoding, validation, rate limiting, and the answer to each.
//! Shard commands are sent from here; backend reads and calls to the authorization hook run in tasks
//! of their own (at most `MAX_IN_FLIGHT` per connection) so the session keeps reading.
//!
//! With the hook, a `subscribe` changes the connection's subscriptions only once the hook answered:
//! the task asks, then hands the answer back to the session ([`Requests::answered`]), which alone
//! owns the subscription set and so watches, and later unwatches, in request order.

use std::sync::{Arc, OnceLock};

use shared::{ClientFrame, Destination, ErrorCode, Outcome, ServerFrame, Status, ids};
use tokio::sync::Semaphore;

mod answer;
mod checks;
mod subscribe;
mod watched;

pub use self::subscribe::Answered;

use self::{subscribe::Asking, watched::Watched};

use self::checks::{
    TokenBucket, bad, check_client_msg_id, check_msg_id, checked_users, forbidden, unavailable,
};
use crate::conn_handle::ConnHandle;
use crate::frame::within_bytes;
use crate::{
    app::App,
    authz::{Ask, Verdict},
    backend::{Added, Dedupe, JoinPolicy, Origin, Outgoing, online_members, too_many_groups},
    clock::now_ms,
    metrics::{self as m, RequestTimer},
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
    subscribed: Watched,
    /// Slots for backend work; made at the first request that needs one (most idle connections
    /// never do).
    in_flight: OnceLock<Arc<Semaphore>>,
    bucket: TokenBucket,
    /// Subscribes waiting for the authorization hook; made at the first one (boxed: most
    /// connections never have one, and every connection carries this field).
    asking: Option<Box<Asking>>,
    /// The frame being handled: taken by whatever answers it later (a request task, the router,
    /// the hook's answer), else recorded when `handle` returns.
    timer: Option<RequestTimer>,
}

impl Requests {
    pub fn new(app: Arc<App>, conn: Arc<ConnHandle>) -> Self {
        let rate = app.config.rate_limit;
        Requests {
            app,
            conn,
            subscribed: Watched::default(),
            in_flight: OnceLock::new(),
            bucket: TokenBucket::new(rate),
            asking: None,
            timer: None,
        }
    }

    /// The node this connection is on.
    pub fn app(&self) -> &Arc<App> {
        &self.app
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
        self.timer = Some(RequestTimer::start(frame.kind()));
        if !matches!(frame, ClientFrame::Ping { .. }) {
            self.note_activity(now).await;
        }
        let id = frame.id();
        if let Err((code, message)) = self.dispatch(frame).await {
            self.reply_error(id, code, message);
        }
        if let Some(timer) = self.timer.take() {
            timer.answered();
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
                    status: ChosenStatus {
                        status,
                        text,
                        at: now_ms(),
                    },
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
                    .filter(|u| !self.subscribed.contains(u))
                    .cloned()
                    .collect();
                if self.subscribed.count() + new.len() > MAX_USERS {
                    return Err(bad(format!(
                        "a connection may subscribe to at most {MAX_USERS} users"
                    )));
                }
                for user in &new {
                    self.subscribed.insert(user.clone());
                }
                let confirmed = self.watch(new).await;
                let permit = self.permit()?;
                self.query_with(permit, id, users, None, confirmed);
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
            ClientFrame::Send {
                id,
                to,
                body,
                client_msg_id,
            } => {
                shared::body::check_body(&body).map_err(|e| bad(e.to_string()))?;
                check_client_msg_id(client_msg_id.as_deref())?;
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
                        // The router decides, from the sender's budget.
                        may_store: true,
                        dedupe: client_msg_id.map(Dedupe::Client),
                    },
                    reply: Reply::Conn {
                        conn: self.conn.clone(),
                        id,
                        timer: self.timer.take(),
                    },
                };
                if !self.app.router.route(job).await {
                    self.reply(ServerFrame::send_unavailable(id, Outcome::NotSent));
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
                let (encoding, max_reply) = (self.conn.encoding, self.app.config.max_reply_bytes);
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
                    let (messages, cut) = within_bytes(messages, encoding, max_reply);
                    Ok(ServerFrame::History {
                        id,
                        group,
                        messages,
                        more: more || cut,
                    })
                })?;
            }
            ClientFrame::Read { id, group, up_to } => {
                ids::check_id("group", &group).map_err(bad)?;
                check_msg_id(&up_to)?;
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
        &mut self,
        id: Option<u64>,
        group: String,
        joined: bool,
    ) -> Result<(), (ErrorCode, String)> {
        let user = self.conn.user.clone();
        let conn = self.conn.clone();
        let shards = self.app.shards.clone();
        let hook = self.app.authz.clone();
        let max_groups = self.app.config.max_groups_per_user;
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
                if backend.groups.add_member(&group, &user).await? == Added::TooManyGroups {
                    metrics::counter!(m::GROUP_LIMIT_REFUSALS, "via" => "join").increment(1);
                    return Ok(forbidden(id, &too_many_groups(max_groups)));
                }
            } else {
                backend.groups.remove_member(&group, &user).await?;
            }
            shards.follow(&conn, &group, joined, None).await;
            Ok(ServerFrame::ok(id))
        })
    }
}

/// Messages one `sync` may ask for.
const MAX_SYNC: usize = 500;
