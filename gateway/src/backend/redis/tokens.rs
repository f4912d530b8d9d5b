//! Opaque tokens on Redis: one string key per token, expiring with it.

use async_trait::async_trait;
use fred::prelude::*;

use super::{RedisBackend, cmd};
use crate::{
    backend::{BackendError, TokenClaims, TokenStore},
    clock::now_ms,
};

#[async_trait]
impl TokenStore for RedisBackend {
    async fn put_token(&self, token: &str, claims: &TokenClaims) -> Result<(), BackendError> {
        self.admit("put_token")?;
        let ttl = claims.expires_at.saturating_sub(now_ms());
        if ttl == 0 {
            // Already expired: never redeemable, so nothing to store.
            return Ok(());
        }
        let value =
            serde_json::to_string(claims).map_err(|e| BackendError::internal("token", e))?;
        Self::count_round_trip("token");
        let _: Value = self
            .client
            .custom(
                cmd("SET"),
                vec![self.keys.token(token), value, "PX".into(), ttl.to_string()],
            )
            .await
            .map_err(|e| Self::error("token", e))?;
        Ok(())
    }

    async fn get_token(&self, token: &str) -> Result<Option<TokenClaims>, BackendError> {
        self.admit("get_token")?;
        Self::count_round_trip("token");
        let value: Option<String> = self
            .client
            .custom(cmd("GET"), vec![self.keys.token(token)])
            .await
            .map_err(|e| Self::error("token", e))?;
        let claims: Option<TokenClaims> = value.and_then(|v| serde_json::from_str(&v).ok());
        // Redis expires the key within a millisecond or so; the claims decide.
        Ok(claims.filter(|c| c.expires_at > now_ms()))
    }
}
