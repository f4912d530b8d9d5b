//! The token role: opaque tokens issued over REST, redeemed by any node at connect.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shared::Platform;

use super::BackendError;

/// A token is redeemable on every node from the moment `put_token` returns until its
/// `expires_at`; after that `get_token` answers `None`.
#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    async fn put_token(&self, token: &str, claims: &TokenClaims) -> Result<(), BackendError>;
    /// The claims of a live token.
    async fn get_token(&self, token: &str) -> Result<Option<TokenClaims>, BackendError>;
}

/// What an opaque token stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    pub user: String,
    pub platform: Platform,
    /// Ms since the epoch.
    pub expires_at: u64,
    /// Ms since the epoch; absent in tokens stored before it was recorded.
    #[serde(default)]
    pub issued_at: Option<u64>,
}
