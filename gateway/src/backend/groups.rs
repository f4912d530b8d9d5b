//! The membership role: who is in which group, and who of them is online.

use async_trait::async_trait;

use super::{BackendError, PresenceStore};

/// Group membership, kept both ways (a group's members, a user's groups).
///
/// - A change is visible to every reader once the call returns, and is announced with
///   [`super::BackendEvent::Membership`] to every node that watches the user's inbox, so their
///   connections start or stop getting the group's messages.
/// - Adding a member twice, or removing a non-member, changes nothing and announces nothing
///   (the embedded backend) or announces again harmlessly (Redis).
#[async_trait]
pub trait Groups: Send + Sync + 'static {
    async fn add_member(&self, group: &str, user: &str) -> Result<(), BackendError>;
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
