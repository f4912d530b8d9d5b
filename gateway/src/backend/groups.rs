//! The membership role: who is in which group, and who of them is online.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{BackendError, PresenceStore};

/// Group membership, kept both ways (a group's members, a user's groups), and each group's join
/// policy.
///
/// - A group is `closed` until the app backend opens it: only `open` groups take a client's
///   `join`. The policy outlives the group's members (setting it creates the group).
/// - A change is visible to every reader once the call returns, and is announced with
///   [`super::BackendEvent::Membership`] to every node that watches the user's inbox, so their
///   connections start or stop getting the group's messages.
/// - Adding a member twice, or removing a non-member, changes nothing and announces nothing
///   (the embedded backend) or announces again harmlessly (Redis).
/// - A user is a member of at most `max_groups_per_user` groups (`BackendSettings`): adding
///   them to one more is refused with [`Added::TooManyGroups`] and changes nothing; adding them
///   again to a group they are in is never refused. The check and the addition are one step, so
///   racing adds cannot pass the limit together.
#[async_trait]
pub trait Groups: Send + Sync + 'static {
    async fn add_member(&self, group: &str, user: &str) -> Result<Added, BackendError>;
    async fn remove_member(&self, group: &str, user: &str) -> Result<(), BackendError>;
    /// Members in id order after `after`, at most `limit`, and the next cursor.
    async fn members(
        &self,
        group: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<String>), BackendError>;
    async fn is_member(&self, group: &str, user: &str) -> Result<bool, BackendError>;
    async fn user_groups(&self, user: &str) -> Result<Vec<String>, BackendError>;
    async fn set_join_policy(&self, group: &str, join: JoinPolicy) -> Result<(), BackendError>;
    /// The group's policy; `closed` for a group nobody set up.
    async fn join_policy(&self, group: &str) -> Result<JoinPolicy, BackendError>;
    /// Policy, member count and last message time, in one read.
    async fn group_info(&self, group: &str) -> Result<GroupInfo, BackendError>;
}

/// What [`Groups::add_member`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// The user is a member now (or was already).
    Member,
    /// The user is already in as many groups as `max_groups_per_user` allows: nothing changed.
    TooManyGroups,
}

/// The refusal's message, the same on the WebSocket and over REST.
pub fn too_many_groups(max: usize) -> String {
    format!("the user is a member of too many groups (at most {max})")
}

/// Who may add members to a group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinPolicy {
    /// Only the app backend, over REST.
    #[default]
    Closed,
    /// Any authenticated client, with `join`.
    Open,
}

impl JoinPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            JoinPolicy::Closed => "closed",
            JoinPolicy::Open => "open",
        }
    }

    /// The policy stored as text; anything unknown is `closed`, which fails safe.
    pub fn parse(text: &str) -> Self {
        if text == "open" {
            JoinPolicy::Open
        } else {
            JoinPolicy::Closed
        }
    }
}

/// What the app backend sees of a group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupInfo {
    pub join: JoinPolicy,
    pub members: u64,
    /// Ms since the epoch of the newest message sent to it.
    pub last_message_at: Option<u64>,
}

/// Group members `online_members` looks at, at most.
pub const MAX_GROUP_SCAN: usize = 10_000;

/// Visibly online members of a group (of its first [`MAX_GROUP_SCAN`] members).
pub async fn online_members(
    groups: &dyn Groups,
    presence: &dyn PresenceStore,
    group: &str,
) -> Result<Vec<String>, BackendError> {
    let (members, _) = groups.members(group, None, MAX_GROUP_SCAN).await?;
    let records = presence.presence(&members).await?;
    Ok(records
        .into_iter()
        .filter(|r| crate::presence::visibly_online(r.status))
        .map(|r| r.user)
        .collect())
}
