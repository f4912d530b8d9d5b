//! Group membership on Redis: a sorted set of members per group (paged by id), a set of groups per
//! user, and a membership event on the user's inbox channel.

use async_trait::async_trait;
use fred::prelude::*;

use super::{RedisBackend, cmd, scripts::ScriptCall};
use crate::backend::{Added, BackendError, GroupInfo, Groups, JoinPolicy};

#[async_trait]
impl Groups for RedisBackend {
    async fn add_member(&self, group: &str, user: &str) -> Result<Added, BackendError> {
        self.admit("add_member")?;
        // First the user's side, checked against the limit in one step (`group_add.lua`, the
        // user's slot); then the group's side and the event. A pipeline cut between the two
        // leaves the group in the user's set only: the caller got an error, and adding again
        // (never refused once the user's set has the group) completes it.
        let call: ScriptCall<'_> = (
            &self.scripts.group_add,
            vec![self.keys.user_groups(user).into()],
            vec![
                group.into(),
                self.settings.max_groups_per_user.to_string().into(),
            ],
        );
        let reply = self.run_scripts("groups", &[call]).await?;
        match reply.first().and_then(Value::as_u64) {
            Some(1) => {}
            Some(0) => return Ok(Added::TooManyGroups),
            _ => {
                return Err(BackendError::internal(
                    "groups",
                    "group_add.lua answered neither 0 nor 1",
                ));
            }
        }
        self.change_member(group, user, true).await?;
        Ok(Added::Member)
    }

    async fn remove_member(&self, group: &str, user: &str) -> Result<(), BackendError> {
        self.admit("remove_member")?;
        self.change_member(group, user, false).await
    }

    async fn members(
        &self,
        group: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<String>), BackendError> {
        self.admit("members")?;
        let min = after.map(|a| format!("({a}")).unwrap_or_else(|| "-".into());
        Self::count_round_trip("groups");
        let mut page: Vec<String> = self
            .client
            .custom(
                cmd("ZRANGE"),
                vec![
                    self.keys.members(group),
                    min,
                    "+".into(),
                    "BYLEX".into(),
                    "LIMIT".into(),
                    "0".into(),
                    (limit + 1).to_string(),
                ],
            )
            .await
            .map_err(|e| Self::error("groups", e))?;
        let more = page.len() > limit;
        page.truncate(limit);
        let next = if more { page.last().cloned() } else { None };
        Ok((page, next))
    }

    async fn is_member(&self, group: &str, user: &str) -> Result<bool, BackendError> {
        self.admit("is_member")?;
        Self::count_round_trip("groups");
        let score: Option<f64> = self
            .client
            .custom(
                cmd("ZSCORE"),
                vec![self.keys.members(group), user.to_string()],
            )
            .await
            .map_err(|e| Self::error("groups", e))?;
        Ok(score.is_some())
    }

    async fn set_join_policy(&self, group: &str, join: JoinPolicy) -> Result<(), BackendError> {
        self.admit("set_join_policy")?;
        Self::count_round_trip("groups");
        let _: Value = self
            .client
            .custom(
                cmd("HSET"),
                vec![
                    self.keys.group_meta(group),
                    "join".into(),
                    join.as_str().into(),
                ],
            )
            .await
            .map_err(|e| Self::error("groups", e))?;
        Ok(())
    }

    async fn join_policy(&self, group: &str) -> Result<JoinPolicy, BackendError> {
        self.admit("join_policy")?;
        Self::count_round_trip("groups");
        let join: Option<String> = self
            .client
            .custom(
                cmd("HGET"),
                vec![self.keys.group_meta(group), "join".into()],
            )
            .await
            .map_err(|e| Self::error("groups", e))?;
        Ok(join.map(|j| JoinPolicy::parse(&j)).unwrap_or_default())
    }

    async fn group_info(&self, group: &str) -> Result<GroupInfo, BackendError> {
        self.admit("group_info")?;
        let pipeline = self.client.pipeline();
        let queued: Result<(), fred::error::Error> = async {
            let _: () = pipeline
                .custom(
                    cmd("HMGET"),
                    vec![self.keys.group_meta(group), "join".into(), "ms".into()],
                )
                .await?;
            pipeline
                .custom(cmd("ZCARD"), vec![self.keys.members(group)])
                .await
        }
        .await;
        queued.map_err(|e| Self::error("groups", e))?;
        Self::count_round_trip("groups");
        let (meta, members): (Vec<Option<String>>, u64) =
            pipeline.all().await.map_err(|e| Self::error("groups", e))?;
        let mut meta = meta.into_iter();
        let join = meta.next().flatten();
        let last = meta.next().flatten();
        Ok(GroupInfo {
            join: join.map(|j| JoinPolicy::parse(&j)).unwrap_or_default(),
            members,
            last_message_at: last.and_then(|ms| ms.parse().ok()),
        })
    }

    async fn user_groups(&self, user: &str) -> Result<Vec<String>, BackendError> {
        self.admit("user_groups")?;
        Self::count_round_trip("groups");
        self.client
            .custom(cmd("SMEMBERS"), vec![self.keys.user_groups(user)])
            .await
            .map_err(|e| Self::error("groups", e))
    }
}

impl RedisBackend {
    async fn change_member(
        &self,
        group: &str,
        user: &str,
        joined: bool,
    ) -> Result<(), BackendError> {
        let pipeline = self.client.pipeline();
        let (zcmd, tag) = if joined { ("ZADD", "J") } else { ("ZREM", "L") };
        let mut zargs = vec![self.keys.members(group)];
        if joined {
            zargs.push("0".into());
        }
        zargs.push(user.to_string());
        let _: () = pipeline
            .custom(cmd(zcmd), zargs)
            .await
            .map_err(|e| Self::error("groups", e))?;
        // A join's user side is `group_add.lua`'s, done before this.
        if !joined {
            let _: () = pipeline
                .custom(
                    cmd("SREM"),
                    vec![self.keys.user_groups(user), group.to_string()],
                )
                .await
                .map_err(|e| Self::error("groups", e))?;
        }
        let _: () = pipeline
            .custom(
                cmd(self.publish_command()),
                vec![self.keys.inbox_channel(user), format!("{tag}{group}")],
            )
            .await
            .map_err(|e| Self::error("groups", e))?;
        Self::count_round_trip("groups");
        let _: Vec<Value> = pipeline.all().await.map_err(|e| Self::error("groups", e))?;
        Ok(())
    }
}
