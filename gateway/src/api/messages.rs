//! `POST /v1/messages`: system messages and broadcasts from the app backend.

use std::sync::Arc;

use axum::{
    Json,
    extract::{State, rejection::JsonRejection},
    http::StatusCode,
};
use serde::{Deserialize, Serialize};
use shared::{Body, Destination, ErrorCode, Outcome, RouteResult, ids};
use tokio::sync::oneshot;

use super::{ApiError, ApiJson, json_body};
use crate::{
    app::App,
    backend::{Dedupe, Outgoing},
    clock::now_ms,
    router::{Reply, RouteJob},
};

#[derive(Deserialize)]
pub struct SendRequest {
    to: Destination,
    body: Body,
    from: Option<String>,
    /// As a client's: a repeat from the same `from` to the same destination within the dedupe
    /// window answers the first one's outcome and is not sent again.
    client_msg_id: Option<String>,
}

#[derive(Serialize)]
pub struct SendAnswer {
    msg_id: String,
    result: RouteResult,
    delivered: u64,
    stored: u64,
}

pub async fn send(
    State(app): State<Arc<App>>,
    body: Result<Json<SendRequest>, JsonRejection>,
) -> ApiJson<SendAnswer> {
    let Json(req) = json_body(body)?;
    shared::body::check_body(&req.body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let from = req.from.unwrap_or_else(|| ids::SYSTEM_USER.to_string());
    ids::check_id("from", &from).map_err(ApiError::bad_request)?;
    match &req.to {
        Destination::User { user } => ids::check_id("user", user),
        Destination::Group { group } => ids::check_id("group", group),
        Destination::All { .. } => Ok(()),
    }
    .map_err(ApiError::bad_request)?;
    if let Some(id) = &req.client_msg_id {
        ids::check_client_msg_id(id).map_err(ApiError::bad_request)?;
    }
    let (tx, rx) = oneshot::channel();
    let job = RouteJob {
        out: Outgoing {
            from,
            to: req.to,
            body: req.body,
            sent_at: now_ms(),
            origin: None,
            check_membership: false,
            may_store: true,
            dedupe: req.client_msg_id.map(Dedupe::Client),
        },
        reply: Reply::Caller(tx),
    };
    if !app.router.route(job).await {
        return Err(unavailable(Outcome::NotSent));
    }
    // The router answers every job it took; a dropped reply means it stopped mid-batch.
    let result = rx.await.map_err(|_| unavailable(Outcome::Unknown))?;
    let outcome = match result {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(refused)) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                refused.to_string(),
            ));
        }
        Err(failed) => return Err(ApiError::from(failed.error).with_outcome(failed.outcome)),
    };
    Ok(Json(SendAnswer {
        msg_id: outcome.msg_id,
        result: outcome.result,
        delivered: outcome.delivered,
        stored: outcome.stored,
    }))
}

/// The 503 of a send that did not go through, saying whether it may have gone out.
fn unavailable(outcome: Outcome) -> ApiError {
    let message = match outcome {
        Outcome::NotSent => "node is stopping; the message was not sent",
        Outcome::Unknown => "node is stopping; the message may have been sent",
    };
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable,
        message,
    )
    .with_outcome(outcome)
}
