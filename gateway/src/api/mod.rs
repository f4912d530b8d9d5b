//! HTTP surface: the router, the API-key guard of `/v1`, JSON errors, and the health endpoints.

mod groups;
mod messages;
mod presence;
mod scrape;
mod timing;
mod tokens;
mod users;

use std::sync::{Arc, atomic::Ordering};

use axum::{
    Json, Router,
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use shared::ErrorCode;

pub use crate::api_error::ApiError;
use crate::{app::App, auth, conn};

/// Largest page any list endpoint answers.
const MAX_PAGE: usize = 1000;

/// A page size: `limit` or `default`, 1 to 1,000.
pub fn page_limit(limit: Option<usize>, default: usize) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(default);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_PAGE}"
        )));
    }
    Ok(limit)
}

/// A paging cursor (the last id of the previous page); empty means none.
pub fn page_cursor(cursor: Option<String>) -> Result<Option<String>, ApiError> {
    let cursor = cursor.filter(|c| !c.is_empty());
    if let Some(c) = &cursor {
        shared::ids::check_id("cursor", c).map_err(ApiError::bad_request)?;
    }
    Ok(cursor)
}

/// Turns axum's own body rejections into contract errors.
pub type ApiJson<T> = Result<Json<T>, ApiError>;

/// A JSON body, or the contract's error: 413 `too_large` over the body limit, else 400.
pub fn json_body<T>(body: Result<Json<T>, axum::extract::rejection::JsonRejection>) -> ApiJson<T> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLarge,
                e.body_text(),
            )
        } else {
            ApiError::bad_request(e.body_text())
        }
    })
}

/// Query-string parameters, or the contract's 400 (axum's own rejection is plain text).
pub fn query_params<T>(
    query: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    query
        .map(|axum::extract::Query(params)| params)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

pub fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/tokens", post(tokens::create))
        .route("/presence/query", post(presence::query))
        .route("/presence/{user}", get(presence::one))
        .route("/online", get(presence::online))
        .route("/stats", get(presence::stats))
        .route("/nodes", get(presence::nodes))
        .route(
            "/groups/{group}/members/{user}",
            put(groups::add_member).delete(groups::remove_member),
        )
        .route(
            "/groups/{group}",
            get(groups::describe).put(groups::configure),
        )
        .route("/groups/{group}/members", get(groups::members))
        .route("/groups/{group}/online", get(groups::online))
        .route("/groups/{group}/history", get(groups::history))
        .route("/messages", post(messages::send))
        .route("/users/{user}/disconnect", post(users::disconnect))
        .route("/users/{user}/revoke", post(users::revoke))
        .route("/users/{user}/connections", get(users::connections))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), require_api_key));
    Router::new()
        .route("/ws", get(conn::upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(scrape::metrics))
        .nest("/v1", v1)
        // Routed requests only: unknown paths would each be a label value of their own.
        .route_layer(middleware::from_fn(timing::timed))
        .with_state(app)
}

async fn require_api_key(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let presented = auth::bearer(
        request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    if auth::api_key_matches(app.api_key.as_deref(), presented) {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "missing or wrong API key",
        )
        .into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such endpoint",
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.ready.load(Ordering::Acquire) {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    }
}
