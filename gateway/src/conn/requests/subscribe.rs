//! Subscriptions under the authorization hook: a `subscribe` is put to the hook from a task, and
//! the session applies the answer (watching the allowed users, answering `presence_list` with the
//! denied ones); and dropping a connection's watches.

use std::{
    collections::HashMap,
    sync::Arc,
    task::{Context, Poll},
};

use shared::ErrorCode;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::{MAX_IN_FLIGHT, MAX_USERS, Requests, checks::bad};
use crate::{
    authz::{Ask, AuthzHook, Verdict},
    metrics::RequestTimer,
    shard::ShardCmd,
};

/// Subscribes of one connection whose hook answer has not been applied yet.
pub(super) struct Asking {
    /// Users named by a subscribe still waiting, with that subscribe's number: only the latest
    /// subscribe naming a user decides for them, and an `unsubscribe` naming them meanwhile wins.
    pub(super) pending: HashMap<String, u64>,
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
    timer: Option<RequestTimer>,
}

impl Requests {
    /// `subscribe` with the authorization hook: the users count against the connection's limit
    /// at once, and the hook is asked in a task of its own, which hands its answer back to the
    /// session (see [`Requests::answered`]). Nothing is watched before the answer.
    pub(super) fn ask_to_subscribe(
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
            .filter(|u| !self.subscribed.contains(u))
            .count();
        let adding = users
            .iter()
            .filter(|u| !self.subscribed.contains(u) && !asking.pending.contains_key(*u))
            .count();
        if self.subscribed.count() + waiting + adding > MAX_USERS {
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
        let timer = self.timer.take();
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
                    timer,
                })
                .await;
        });
        Ok(())
    }

    /// The next hook answer to apply, while one is due (pending otherwise).
    pub fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<Option<Answered>> {
        match &mut self.asking {
            Some(asking) if asking.outstanding > 0 => asking.rx.poll_recv(cx),
            _ => Poll::Pending,
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
            timer,
        } = answer;
        // Answered below, by the `presence_list` read's task or the refusal.
        self.timer = timer;
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
                if let Some(timer) = self.timer.take() {
                    timer.answered();
                }
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
        let confirmed = self.watch(watch).await;
        self.unwatch(unwatch).await;
        let denied = (!denied.is_empty()).then_some(denied);
        self.query_with(permit, id, allowed, denied, confirmed);
    }

    /// Watches `users` at their shards; each receiver fires once that shard's users' events
    /// reach this node, so the `presence_list` is read after it and misses no change.
    pub(super) async fn watch(&self, users: Vec<String>) -> Vec<oneshot::Receiver<()>> {
        let mut confirmations = Vec::new();
        for (shard, users) in self.app.shards.partition(users) {
            let (confirmed, confirmation) = oneshot::channel();
            let cmd = ShardCmd::Watch {
                users,
                conn: self.conn.clone(),
                confirmed: Some(confirmed),
            };
            if self.app.shards.send_to(shard, cmd).await {
                confirmations.push(confirmation);
            }
        }
        confirmations
    }

    pub(super) async fn unwatch(&self, users: Vec<String>) {
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
        let all = self.subscribed.take_all();
        self.unwatch(all).await;
    }
}
