//! WebSocket connections: the upgrade (authentication, encoding, limits), the session that reads
//! and writes one socket, and the handling of client requests.

mod requests;
mod session;
mod writer;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{ConnectInfo, Query, State, WebSocketUpgrade},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use shared::{Encoding, ErrorCode};

use crate::{
    api_error::ApiError,
    app::App,
    auth::{AuthError, bearer},
    metrics as m,
};

/// Bytes read from a socket at once. Every connection holds a buffer of this size, so it is sized
/// for the small frames clients send; larger frames grow it while they are read.
const READ_BUFFER_BYTES: usize = 512;

#[derive(Deserialize)]
pub struct WsParams {
    token: Option<String>,
    format: Option<String>,
}

/// `GET /ws`: authenticates before upgrading, so a bad token is a plain 401.
pub async fn upgrade(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<WsParams>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    // Accepted while the drain only waits for load balancers to notice; refused once it closes.
    if app.drain.is_closing() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "node is draining",
        )
        .into_response();
    }
    if app.connections() as usize >= app.config.max_connections {
        metrics::counter!(m::CONNECTS, "result" => "full").increment(1);
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "node is at its connection limit",
        )
        .into_response();
    }
    if !app.allowed_origins.is_empty() {
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        if let Some(origin) = origin
            && !app.allowed_origins.iter().any(|o| o == origin)
        {
            metrics::counter!(m::CONNECTS, "result" => "forbidden_origin").increment(1);
            return ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                "origin not allowed",
            )
            .into_response();
        }
    }
    let ws = ws.protocols([
        shared::codec::SUBPROTOCOL_MSGPACK,
        shared::codec::SUBPROTOCOL_JSON,
    ]);
    let encoding = match (
        ws.selected_protocol().and_then(|p| p.to_str().ok()),
        params.format.as_deref(),
    ) {
        (Some(p), _) => Encoding::from_subprotocol(p).unwrap_or_default(),
        (None, Some(f)) => match Encoding::from_format(f) {
            Some(e) => e,
            None => {
                return ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadRequest,
                    "format must be msgpack or json",
                )
                .into_response();
            }
        },
        (None, None) => Encoding::MsgPack,
    };
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = params.token.as_deref().or_else(|| bearer(authorization));
    let identity = match app.auth.authenticate(token).await {
        Ok(identity) => identity,
        Err(AuthError::Unavailable) => {
            metrics::counter!(m::CONNECTS, "result" => "unavailable").increment(1);
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "token store unavailable",
            )
            .into_response();
        }
        Err(e) => {
            metrics::counter!(m::CONNECTS, "result" => "unauthorized").increment(1);
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                e.to_string(),
            )
            .into_response();
        }
    };
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(256).collect());
    let max = app.config.max_frame_bytes;
    // Small buffers keep an idle connection to a few KiB; frames above twice the limit are cut off
    // by the protocol layer, frames between the limit and twice it get a `too_large` error.
    ws.read_buffer_size(READ_BUFFER_BYTES)
        // Frames queue in the write buffer until the writer flushes a burst (`send_burst`), so
        // a backlog leaves in one `send()`; the writer never buffers more than one burst.
        .write_buffer_size(writer::WRITE_BURST_BYTES)
        .max_message_size(max * 2)
        .max_frame_size(max * 2)
        .on_upgrade(move |socket| {
            // The setup runs in axum's upgrade task, which ends with it; only an accepted
            // connection gets a task of its own (`session::serve`), sized for the session alone.
            let sessions = app.sessions.clone();
            sessions.track_future(session::run(
                app, socket, identity, encoding, peer, user_agent,
            ))
        })
}
