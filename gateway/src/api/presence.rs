//! Presence endpoints for the app backend: one user, a batch, the online list, counts and nodes.
//! The app backend sees what any other user would (invisible users look offline).

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Json,
    extract::{
        Path, Query, State,
        rejection::{JsonRejection, QueryRejection},
    },
};
use serde::{Deserialize, Serialize};
use shared::{Presence, ids};

use super::{ApiError, ApiJson, json_body, page_cursor, page_limit, query_params};
use crate::{app::App, backend::NodeInfo};

const MAX_USERS: usize = 1000;

pub async fn one(State(app): State<Arc<App>>, Path(user): Path<String>) -> ApiJson<Presence> {
    ids::check_id("user", &user).map_err(ApiError::bad_request)?;
    let records = app
        .backend
        .presence
        .presence(std::slice::from_ref(&user))
        .await?;
    let presence = records
        .first()
        .map(|r| r.public_view())
        .ok_or_else(|| ApiError::bad_request("no such user"))?;
    Ok(Json(presence))
}

#[derive(Deserialize)]
pub struct QueryRequest {
    users: Vec<String>,
}

#[derive(Serialize)]
pub struct Items {
    items: Vec<Presence>,
}

pub async fn query(
    State(app): State<Arc<App>>,
    body: Result<Json<QueryRequest>, JsonRejection>,
) -> ApiJson<Items> {
    let Json(req) = json_body(body)?;
    if req.users.len() > MAX_USERS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_USERS} users per query"
        )));
    }
    for user in &req.users {
        ids::check_id("user", user).map_err(ApiError::bad_request)?;
    }
    let records = app.backend.presence.presence(&req.users).await?;
    Ok(Json(Items {
        items: records.iter().map(|r| r.public_view()).collect(),
    }))
}

#[derive(Deserialize)]
pub struct OnlineParams {
    cursor: Option<String>,
    limit: Option<usize>,
    platform: Option<u8>,
}

#[derive(Serialize)]
pub struct OnlinePage {
    users: Vec<String>,
    next_cursor: Option<String>,
}

pub async fn online(
    State(app): State<Arc<App>>,
    params: Result<Query<OnlineParams>, QueryRejection>,
) -> ApiJson<OnlinePage> {
    let params = query_params(params)?;
    let limit = page_limit(params.limit, 100)?;
    if let Some(p) = params.platform
        && !ids::is_valid_platform(p)
    {
        return Err(ApiError::bad_request("platform must be 1 to 8"));
    }
    let cursor = page_cursor(params.cursor)?;
    let (users, next_cursor) = app
        .backend
        .presence
        .online_users(cursor.as_deref(), limit, params.platform)
        .await?;
    Ok(Json(OnlinePage { users, next_cursor }))
}

#[derive(Serialize)]
pub struct Stats {
    online_users: u64,
    connections: u64,
    by_platform: BTreeMap<String, u64>,
    nodes: usize,
}

pub async fn stats(State(app): State<Arc<App>>) -> ApiJson<Stats> {
    let counts = app.backend.presence.counts().await?;
    let nodes = app.backend.registry.nodes().await?;
    // Other nodes' counts are as of their last heartbeat; this node's is live.
    let others: u64 = nodes
        .iter()
        .filter(|n| *n.id != *app.node_id)
        .map(|n| n.connections)
        .sum();
    let nodes_up = nodes.len().max(1);
    Ok(Json(Stats {
        online_users: counts.online_users,
        connections: others + app.connections(),
        by_platform: counts
            .by_platform
            .into_iter()
            .map(|(p, n)| (p.to_string(), n))
            .collect(),
        nodes: nodes_up,
    }))
}

#[derive(Serialize)]
pub struct Nodes {
    nodes: Vec<NodeInfo>,
}

pub async fn nodes(State(app): State<Arc<App>>) -> ApiJson<Nodes> {
    Ok(Json(Nodes {
        nodes: app.backend.registry.nodes().await?,
    }))
}
