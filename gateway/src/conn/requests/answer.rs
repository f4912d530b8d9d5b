//! How a request's backend work runs and is answered: in a task of its own (at most
//! `MAX_IN_FLIGHT` per connection), its answer queued as the connection can read it; and
//! `refresh`, which answers from the token store.

use std::sync::Arc;

use shared::{Encoding, ErrorCode, ServerFrame};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{MAX_IN_FLIGHT, Requests};
use crate::{
    auth::AuthError,
    backend::{BackendError, Roles},
    frame::EncodedFrame,
    metrics as m,
};

/// How long a `subscribe`'s `presence_list` waits for its watches to take effect (a SUBSCRIBE
/// round trip, about a millisecond; longer only while Redis is away, when the list is read
/// anyway and the resync's re-read repairs what it missed).
const SUBSCRIBE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a `subscribe` answered before its watches were confirmed waits for them, to read its
/// users again then (a slow SUBSCRIBE on a loaded Redis, or during a cluster failover).
const LATE_CONFIRM_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Requests {
    /// Replaces the connection's token with a newer one of the same user and platform, moving
    /// its expiry; any other token leaves the connection as it was.
    pub(super) fn refresh(
        &mut self,
        id: Option<u64>,
        token: String,
    ) -> Result<(), (ErrorCode, String)> {
        let app = self.app.clone();
        let conn = self.conn.clone();
        let permit = self.permit()?;
        let timer = self.timer.take();
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
            if let Some(timer) = timer {
                timer.answered();
            }
        });
        Ok(())
    }

    /// The connection's requests in flight (made at the first request).
    fn in_flight(&self) -> Arc<Semaphore> {
        self.in_flight
            .get_or_init(|| Arc::new(Semaphore::new(MAX_IN_FLIGHT)))
            .clone()
    }

    /// One of the connection's `MAX_IN_FLIGHT` slots for backend work.
    pub(super) fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, (ErrorCode, String)> {
        self.in_flight().try_acquire_owned().map_err(|_| {
            (
                ErrorCode::RateLimited,
                "too many requests in flight".to_string(),
            )
        })
    }

    /// Runs backend work for a request in its own task (at most `MAX_IN_FLIGHT` per connection)
    /// and queues its answer; a backend failure answers `unavailable`.
    pub(super) fn spawn<F, Fut>(
        &mut self,
        id: Option<u64>,
        work: F,
    ) -> Result<(), (ErrorCode, String)>
    where
        F: FnOnce(Roles) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<ServerFrame, BackendError>> + Send + 'static,
    {
        self.spawn_or(id, "backend unavailable", work)
    }

    /// `spawn`, with the message a backend failure answers.
    pub(super) fn spawn_or<F, Fut>(
        &mut self,
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
    pub(super) fn run<F, Fut>(
        &mut self,
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
        let timer = self.timer.take();
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
            if let Some(timer) = timer {
                timer.answered();
            }
        });
    }

    /// Answers `presence_list` for `users`, as this connection's user may see them.
    pub(super) fn query(
        &mut self,
        id: Option<u64>,
        users: Vec<String>,
    ) -> Result<(), (ErrorCode, String)> {
        let permit = self.permit()?;
        self.query_with(permit, id, users, None, Vec::new());
        Ok(())
    }

    /// `query` in the slot `permit`; `denied` (users the hook refused) goes into the answer. The
    /// read waits (at most [`SUBSCRIBE_WAIT`]) for `confirmed`: the watches of a `subscribe`
    /// taking effect, so no change falls between the list and the first event.
    pub(super) fn query_with(
        &mut self,
        permit: OwnedSemaphorePermit,
        id: Option<u64>,
        users: Vec<String>,
        denied: Option<Vec<String>>,
        confirmed: Vec<tokio::sync::oneshot::Receiver<()>>,
    ) {
        let viewer = self.conn.user.clone();
        let conn = self.conn.clone();
        let in_flight = self.in_flight();
        self.run(
            permit,
            id,
            "presence store unavailable",
            move |backend| async move {
                let mut late = None;
                if !confirmed.is_empty() {
                    let mut all = futures_util::future::join_all(confirmed);
                    if tokio::time::timeout(SUBSCRIBE_WAIT, &mut all)
                        .await
                        .is_err()
                    {
                        late = Some(all);
                    }
                }
                let records = backend.presence.presence(&users).await?;
                // It counts against the connection's requests in flight; with none free it is
                // skipped (the client may subscribe again).
                if let (Some(all), Ok(permit)) = (late, in_flight.try_acquire_owned()) {
                    // The list is read before the watches took effect: a change in between would
                    // reach nobody. Once they do, the users are read again and passed on as
                    // events (the client drops versions it has). A watch never confirmed was
                    // refused: the resync after its retry re-reads it.
                    let (users, viewer, presence) =
                        (users.clone(), viewer.clone(), backend.presence.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        if tokio::time::timeout(LATE_CONFIRM_WAIT, all).await.is_err() {
                            return;
                        }
                        let Ok(records) = presence.presence(&users).await else {
                            return;
                        };
                        for record in records {
                            conn.push_frame(ServerFrame::Presence(record.view_for(Some(&viewer))));
                        }
                    });
                }
                Ok(ServerFrame::PresenceList {
                    denied,
                    id,
                    items: records.iter().map(|r| r.view_for(Some(&viewer))).collect(),
                })
            },
        )
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
