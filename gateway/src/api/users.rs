//! The app backend's view and control of a user's sessions, on every node: connections,
//! disconnect (kick), revoke.

use std::sync::Arc;

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
};
use serde::{Deserialize, Serialize};
use shared::{Platform, ids};

use super::ApiError;
use crate::{
    app::App,
    backend::{ConnectionInfo, Control},
    clock::now_ms,
    conn_handle::MAX_CLOSE_REASON_BYTES,
};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DisconnectRequest {
    #[serde(default)]
    platforms: Vec<Platform>,
    #[serde(default)]
    reason: String,
}

fn check_user(user: &str) -> Result<(), ApiError> {
    ids::check_id("user", user).map_err(ApiError::bad_request)
}

/// `POST /v1/users/{user}/disconnect`: closes the user's connections (on `platforms`, or all)
/// with 4003 on every node. An empty body disconnects everything.
pub async fn disconnect(
    State(app): State<Arc<App>>,
    Path(user): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    check_user(&user)?;
    // The body is optional: without one, every connection of the user goes.
    let req: DisconnectRequest = if body.iter().all(u8::is_ascii_whitespace) {
        DisconnectRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(e.to_string()))?
    };
    if let Some(p) = req.platforms.iter().find(|p| !ids::is_valid_platform(**p)) {
        return Err(ApiError::bad_request(format!("platform {p} is not 1 to 8")));
    }
    if req.reason.len() > MAX_CLOSE_REASON_BYTES {
        return Err(ApiError::bad_request(format!(
            "reason must be at most {MAX_CLOSE_REASON_BYTES} bytes"
        )));
    }
    let control = Control::Disconnect {
        platforms: req.platforms.clone(),
        reason: req.reason.clone(),
    };
    app.backend.sessions.control(&user, &control).await?;
    app.hooks
        .kicked(&app.node_id, &user, req.platforms, &req.reason);
    Ok(StatusCode::ACCEPTED)
}

/// `POST /v1/users/{user}/revoke`: every token of the user issued before now is refused from now
/// on, and the user's live connections close with 4001, on every node.
pub async fn revoke(
    State(app): State<Arc<App>>,
    Path(user): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_user(&user)?;
    app.backend.sessions.revoke(&user, now_ms()).await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Serialize)]
pub struct Connections {
    connections: Vec<ConnectionInfo>,
}

/// `GET /v1/users/{user}/connections`: every live connection of the user, on every node (the
/// nodes that answer within a second).
pub async fn connections(
    State(app): State<Arc<App>>,
    Path(user): Path<String>,
) -> Result<Json<Connections>, ApiError> {
    check_user(&user)?;
    let connections = app.backend.sessions.connections(&user).await?;
    Ok(Json(Connections { connections }))
}
