//! `POST /v1/messages`: system messages and broadcasts from the app backend.

use std::sync::Arc;

use axum::{
    Json,
    extract::{State, rejection::JsonRejection},
    http::StatusCode,
};
use serde::{Deserialize, Serialize};
use shared::{Body, Destination, ErrorCode, RouteResult, ids};
use tokio::sync::oneshot;

use super::{ApiError, ApiJson, json_body};
use crate::{
    app::App,
    backend::Outgoing,
    clock::now_ms,
    router::{Reply, RouteJob},
};

#[derive(Deserialize)]
pub struct SendRequest {
    to: Destination,
    body: Body,
    from: Option<String>,
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
        },
        reply: Reply::Caller(tx),
    };
    let unavailable = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "node is stopping",
        )
    };
    if !app.router.route(job).await {
        return Err(unavailable());
    }
    let outcome = rx.await.map_err(|_| unavailable())??.map_err(|refused| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            refused.to_string(),
        )
    })?;
    Ok(Json(SendAnswer {
        msg_id: outcome.msg_id,
        result: outcome.result,
        delivered: outcome.delivered,
        stored: outcome.stored,
    }))
}
