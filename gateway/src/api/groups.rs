//! Group endpoints for the app backend: the join policy, membership, members, online members,
//! history.

use std::sync::Arc;

use axum::{
    Json,
    extract::{
        Path, Query, State,
        rejection::{JsonRejection, QueryRejection},
    },
    http::StatusCode,
};
use serde::{Deserialize, Serialize};
use shared::{ErrorCode, Message, ids};

use super::{ApiError, ApiJson, json_body, page_cursor, page_limit, query_params};
use crate::{
    app::App,
    backend::{Added, JoinPolicy, online_members, parse_msg_id, too_many_groups},
    metrics as m,
};

fn check(group: &str, user: Option<&str>) -> Result<(), ApiError> {
    ids::check_id("group", group).map_err(ApiError::bad_request)?;
    if let Some(user) = user {
        ids::check_id("user", user).map_err(ApiError::bad_request)?;
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSettings {
    join: JoinPolicy,
}

/// `PUT /v1/groups/{group}`: sets the join policy (creating the group's settings).
pub async fn configure(
    State(app): State<Arc<App>>,
    Path(group): Path<String>,
    body: Result<Json<GroupSettings>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    check(&group, None)?;
    let Json(settings) = json_body(body)?;
    app.backend
        .groups
        .set_join_policy(&group, settings.join)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize)]
pub struct GroupState {
    group: String,
    join: JoinPolicy,
    members: u64,
    last_message_at: Option<u64>,
}

/// `GET /v1/groups/{group}`: policy, member count, last message time. A group nobody set up
/// reads as closed and empty.
pub async fn describe(
    State(app): State<Arc<App>>,
    Path(group): Path<String>,
) -> ApiJson<GroupState> {
    check(&group, None)?;
    let info = app.backend.groups.group_info(&group).await?;
    Ok(Json(GroupState {
        group,
        join: info.join,
        members: info.members,
        last_message_at: info.last_message_at,
    }))
}

pub async fn add_member(
    State(app): State<Arc<App>>,
    Path((group, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    check(&group, Some(&user))?;
    if app.backend.groups.add_member(&group, &user).await? == Added::TooManyGroups {
        metrics::counter!(m::GROUP_LIMIT_REFUSALS, "via" => "rest").increment(1);
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            too_many_groups(app.config.max_groups_per_user),
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

pub async fn remove_member(
    State(app): State<Arc<App>>,
    Path((group, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    check(&group, Some(&user))?;
    app.backend.groups.remove_member(&group, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct PageParams {
    cursor: Option<String>,
    limit: Option<usize>,
}

#[derive(Serialize)]
pub struct UserPage {
    users: Vec<String>,
    next_cursor: Option<String>,
}

pub async fn members(
    State(app): State<Arc<App>>,
    Path(group): Path<String>,
    params: Result<Query<PageParams>, QueryRejection>,
) -> ApiJson<UserPage> {
    let params = query_params(params)?;
    check(&group, None)?;
    let limit = page_limit(params.limit, 100)?;
    let cursor = page_cursor(params.cursor)?;
    let (users, next_cursor) = app
        .backend
        .groups
        .members(&group, cursor.as_deref(), limit)
        .await?;
    Ok(Json(UserPage { users, next_cursor }))
}

#[derive(Serialize)]
pub struct Users {
    users: Vec<String>,
}

pub async fn online(State(app): State<Arc<App>>, Path(group): Path<String>) -> ApiJson<Users> {
    check(&group, None)?;
    let users = online_members(
        app.backend.groups.as_ref(),
        app.backend.presence.as_ref(),
        &group,
    )
    .await?;
    Ok(Json(Users { users }))
}

#[derive(Deserialize)]
pub struct HistoryParams {
    since: Option<String>,
    limit: Option<usize>,
}

#[derive(Serialize)]
pub struct History {
    messages: Vec<Message>,
    more: bool,
}

pub async fn history(
    State(app): State<Arc<App>>,
    Path(group): Path<String>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> ApiJson<History> {
    let params = query_params(params)?;
    check(&group, None)?;
    let limit = page_limit(params.limit, 100)?;
    let since = params.since.filter(|s| !s.is_empty());
    if since.as_deref().is_some_and(|s| parse_msg_id(s).is_none()) {
        return Err(ApiError::bad_request("since must be a message id"));
    }
    let (messages, more) = app
        .backend
        .messages
        .history(&group, since.as_deref(), limit)
        .await?;
    // A message stored before bodies were checked may not be JSON; it is left out (and counted)
    // rather than failing the whole answer. One encode per message serves both that check and
    // the reply's size bound.
    let max = app.config.max_reply_bytes;
    let (mut kept, mut bytes, mut unreadable, mut cut) = (Vec::new(), 0, 0u64, false);
    for m in messages {
        match serde_json::to_vec(&m) {
            Err(_) => unreadable += 1,
            Ok(json) if !kept.is_empty() && bytes + json.len() > max => {
                cut = true;
                break;
            }
            Ok(json) => {
                bytes += json.len();
                kept.push(m);
            }
        }
    }
    metrics::counter!(crate::metrics::UNREADABLE_MESSAGES).increment(unreadable);
    let messages: Vec<Message> = kept;
    Ok(Json(History {
        messages,
        more: more || cut,
    }))
}
