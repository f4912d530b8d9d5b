//! Sessions on Redis: the connect-time reads in one pipeline, control messages on the user's inbox
//! channel (`C<json>`), revocation times (`P:rv:{user}`), login sequences (`P:ls:{user}`,
//! `login.lua`) and nodes' answers to a connection listing (`P:lr:{user}:<reply>`).

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use fred::prelude::*;
use shared::Platform;

use super::{RedisBackend, cmd, scripts::ScriptCall};
use crate::backend::{
    BackendError, ConnectState, ConnectionInfo, Control, Sessions,
    sessions::{LIST_WAIT, REVOCATION_TTL_MS},
};

/// How long nodes' answers to a `connections` request are kept: past the wait, for stragglers.
const LIST_REPLY_TTL_MS: u64 = 10_000;
/// How often `connections` looks for the nodes' answers.
const LIST_POLL: Duration = Duration::from_millis(10);

fn scope_field(scope: Option<Platform>) -> String {
    scope.map_or_else(|| "all".to_string(), |p| p.to_string())
}

#[async_trait]
impl Sessions for RedisBackend {
    /// Groups, stored messages and the revocation time in one pipeline: a connect costs one
    /// round trip.
    async fn connect_state(&self, user: &str) -> ConnectState {
        if let Err(e) = self.admit("connect") {
            return ConnectState::failed(e);
        }
        let pipeline = self.client.pipeline();
        let queued: Result<(), fred::error::Error> = async {
            let _: () = pipeline
                .custom(cmd("SMEMBERS"), vec![self.keys.user_groups(user)])
                .await?;
            let _: () = pipeline
                .custom(cmd("XRANGE"), self.offline_range(user))
                .await?;
            pipeline
                .custom(cmd("GET"), vec![self.keys.revoked(user)])
                .await
        }
        .await;
        if let Err(e) = queued {
            return ConnectState::failed(Self::error("connect", e));
        }
        Self::count_round_trip("connect");
        let mut results = pipeline.try_all::<Value>().await.into_iter();
        let mut next = || {
            results
                .next()
                .unwrap_or_else(|| Err(fred::error::Error::new_canceled()))
                .map_err(|e| Self::error("connect", e))
        };
        let groups = next().and_then(|v| {
            v.convert::<Vec<String>>()
                .map_err(|e| Self::error("connect", e))
        });
        let offline = next().and_then(|v| {
            v.convert::<Vec<Value>>()
                .map(Self::offline_from)
                .map_err(|e| Self::error("connect", e))
        });
        let revoked_at = next().and_then(|v| {
            v.convert::<Option<u64>>()
                .map_err(|e| Self::error("connect", e))
        });
        ConnectState {
            groups,
            offline,
            revoked_at,
        }
    }

    async fn control(&self, user: &str, control: &Control) -> Result<u64, BackendError> {
        self.admit("control")?;
        let json =
            serde_json::to_string(control).map_err(|e| BackendError::internal("control", e))?;
        Self::count_round_trip("control");
        self.client
            .custom(
                cmd(self.publish_command()),
                vec![self.keys.inbox_channel(user), format!("C{json}")],
            )
            .await
            .map_err(|e| Self::error("control", e))
    }

    async fn revoke(&self, user: &str, at: u64) -> Result<u64, BackendError> {
        self.admit("revoke")?;
        let control = Control::Revoke { before: at };
        let json =
            serde_json::to_string(&control).map_err(|e| BackendError::internal("control", e))?;
        let pipeline = self.client.pipeline();
        let queued: Result<(), fred::error::Error> = async {
            let key = self.keys.revoked(user);
            let _: () = pipeline
                .custom(
                    cmd("SET"),
                    vec![
                        key,
                        at.to_string(),
                        "PX".into(),
                        REVOCATION_TTL_MS.to_string(),
                    ],
                )
                .await?;
            pipeline
                .custom(
                    cmd(self.publish_command()),
                    vec![self.keys.inbox_channel(user), format!("C{json}")],
                )
                .await
        }
        .await;
        queued.map_err(|e| Self::error("control", e))?;
        Self::count_round_trip("control");
        let (_, nodes): (Value, u64) = pipeline
            .all()
            .await
            .map_err(|e| Self::error("control", e))?;
        Ok(nodes)
    }

    async fn login(&self, user: &str, scope: Option<Platform>) -> Result<u64, BackendError> {
        self.admit("login")?;
        let call: ScriptCall<'_> = (
            &self.scripts.login,
            vec![
                self.keys.logins(user).into(),
                self.keys.inbox_channel(user).into(),
            ],
            vec![
                scope_field(scope).into(),
                self.publish_command().into(),
                REVOCATION_TTL_MS.to_string().into(),
            ],
        );
        let reply = self.run_scripts("login", &[call]).await?;
        reply
            .first()
            .and_then(Value::as_u64)
            .ok_or_else(|| BackendError::internal("login", "login.lua answered no sequence"))
    }

    async fn latest_login(&self, user: &str, scope: Option<Platform>) -> Result<u64, BackendError> {
        self.admit("latest_login")?;
        Self::count_round_trip("login");
        let seq: Option<u64> = self
            .client
            .custom(
                cmd("HGET"),
                vec![self.keys.logins(user), scope_field(scope)],
            )
            .await
            .map_err(|e| Self::error("login", e))?;
        Ok(seq.unwrap_or(0))
    }

    async fn connections(&self, user: &str) -> Result<Vec<ConnectionInfo>, BackendError> {
        self.admit("connections")?;
        let reply = hex::encode(rand::random::<[u8; 8]>());
        let asked = self
            .control(
                user,
                &Control::List {
                    reply: reply.clone(),
                },
            )
            .await?;
        let key = self.keys.list_replies(user, &reply);
        let deadline = tokio::time::Instant::now() + LIST_WAIT;
        let mut answers: HashMap<String, String> = HashMap::new();
        // Each node holding a connection answers once; PUBLISH said how many heard the question.
        while (answers.len() as u64) < asked && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(LIST_POLL).await;
            Self::count_round_trip("list");
            answers = self
                .client
                .custom(cmd("HGETALL"), vec![key.clone()])
                .await
                .map_err(|e| Self::error("list", e))?;
        }
        let mut all: Vec<ConnectionInfo> = answers
            .values()
            .filter_map(|json| serde_json::from_str::<Vec<ConnectionInfo>>(json).ok())
            .flatten()
            .collect();
        all.sort_by(|a, b| a.conn_id.cmp(&b.conn_id));
        Ok(all)
    }

    async fn answer_list(
        &self,
        user: &str,
        reply: &str,
        node: &str,
        connections: Vec<ConnectionInfo>,
    ) -> Result<(), BackendError> {
        self.admit("answer_list")?;
        let json =
            serde_json::to_string(&connections).map_err(|e| BackendError::internal("list", e))?;
        let key = self.keys.list_replies(user, reply);
        let pipeline = self.client.pipeline();
        let queued: Result<(), fred::error::Error> = async {
            let _: () = pipeline
                .custom(cmd("HSET"), vec![key.clone(), node.to_string(), json])
                .await?;
            pipeline
                .custom(cmd("PEXPIRE"), vec![key, LIST_REPLY_TTL_MS.to_string()])
                .await
        }
        .await;
        queued.map_err(|e| Self::error("list", e))?;
        Self::count_round_trip("list");
        let _: Vec<Value> = pipeline.all().await.map_err(|e| Self::error("list", e))?;
        Ok(())
    }
}
