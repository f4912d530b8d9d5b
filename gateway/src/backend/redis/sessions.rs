//! Sessions on Redis: the connect-time reads in one pipeline, control messages on the user's inbox
//! channel (`C<json>`), and revocation times (`P:rv:{user}`).

use async_trait::async_trait;
use fred::prelude::*;

use super::{RedisBackend, cmd};
use crate::backend::{BackendError, ConnectState, Control, Sessions, sessions::REVOCATION_TTL_MS};

#[async_trait]
impl Sessions for RedisBackend {
    /// Groups, stored messages and the revocation time in one pipeline: a connect costs one
    /// round trip.
    async fn connect_state(&self, user: &str) -> ConnectState {
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
            let e = Self::error("connect", e);
            return ConnectState {
                groups: Err(e.clone()),
                offline: Err(e.clone()),
                revoked_at: Err(e),
            };
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
}
