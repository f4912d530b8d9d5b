//! `POST /v1/tokens`: opaque tokens for clients, and the least-loaded node to connect to.

use std::sync::Arc;

use axum::{Json, extract::State, extract::rejection::JsonRejection};
use serde::{Deserialize, Serialize};
use shared::ids;

use super::{ApiError, ApiJson, json_body};
use crate::{app::App, auth, backend::TokenClaims, clock::now_ms};

/// Longest token lifetime a request may ask for: 30 days.
const MAX_TTL_SECS: u64 = 30 * 86_400;

#[derive(Deserialize)]
pub struct TokenRequest {
    user: String,
    platform: u8,
    ttl_secs: Option<u64>,
}

#[derive(Serialize)]
pub struct NodeRef {
    id: String,
    ws_url: String,
}

#[derive(Serialize)]
pub struct TokenAnswer {
    token: String,
    expires_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<NodeRef>,
}

pub async fn create(
    State(app): State<Arc<App>>,
    body: Result<Json<TokenRequest>, JsonRejection>,
) -> ApiJson<TokenAnswer> {
    let Json(req) = json_body(body)?;
    ids::check_id("user", &req.user).map_err(ApiError::bad_request)?;
    if req.user == ids::SYSTEM_USER {
        return Err(ApiError::bad_request(format!(
            "the user id {} is reserved for the app backend's messages",
            ids::SYSTEM_USER
        )));
    }
    if !ids::is_valid_platform(req.platform) {
        return Err(ApiError::bad_request("platform must be 1 to 8"));
    }
    let ttl = req.ttl_secs.unwrap_or(app.config.token_ttl_secs);
    if ttl == 0 || ttl > MAX_TTL_SECS {
        return Err(ApiError::bad_request(format!(
            "ttl_secs must be 1 to {MAX_TTL_SECS}"
        )));
    }
    let token = auth::mint_opaque_token();
    let now = now_ms();
    let claims = TokenClaims {
        user: req.user,
        platform: req.platform,
        expires_at: now + ttl * 1000,
        issued_at: Some(now),
    };
    app.backend.tokens.put_token(&token, &claims).await?;
    // The least-loaded node, for deployments without a load balancer; a registry hiccup only
    // leaves it out.
    let node = app
        .backend
        .registry
        .nodes()
        .await
        .ok()
        .and_then(|nodes| {
            nodes
                .into_iter()
                .min_by_key(|n| (n.connections, n.id.clone()))
        })
        .map(|n| NodeRef {
            id: n.id,
            ws_url: n.ws_url,
        });
    Ok(Json(TokenAnswer {
        token,
        expires_at: claims.expires_at,
        node,
    }))
}
