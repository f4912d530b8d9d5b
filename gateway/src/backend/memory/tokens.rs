//! Opaque tokens on the embedded backend.

use async_trait::async_trait;

use super::MemoryBackend;
use crate::{
    backend::{BackendError, TokenClaims, TokenStore},
    clock::now_ms,
};

#[async_trait]
impl TokenStore for MemoryBackend {
    async fn put_token(&self, token: &str, claims: &TokenClaims) -> Result<(), BackendError> {
        self.lock().tokens.insert(token.to_string(), claims.clone());
        Ok(())
    }

    async fn get_token(&self, token: &str) -> Result<Option<TokenClaims>, BackendError> {
        let mut state = self.lock();
        let live = state
            .tokens
            .get(token)
            .filter(|c| c.expires_at > now_ms())
            .cloned();
        if live.is_none() {
            state.tokens.remove(token);
        }
        Ok(live)
    }
}
