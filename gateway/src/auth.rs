//! Who is connecting: opaque tokens (minted by `POST /v1/tokens`, stored in the backend) and HS256
//! JWTs (minted by the app backend with the shared secret), and the API key of `/v1`.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use shared::{Platform, ids};
use subtle::ConstantTimeEq;

use crate::{backend::TokenStore, clock::now_ms};

/// A connection's authenticated identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub platform: Platform,
    /// Ms since the epoch when the token stops being valid.
    pub expires_at: u64,
    /// Ms since the epoch when the token was issued, if it says (`iat` of a JWT); a revoke refuses
    /// tokens issued before it, and those that do not say.
    pub issued_at: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("invalid or expired token")]
    Invalid,
    #[error("token store unavailable")]
    Unavailable,
}

#[derive(Deserialize)]
struct JwtClaims {
    sub: String,
    platform: Platform,
    /// Seconds since the epoch.
    exp: u64,
    /// Seconds since the epoch.
    iat: Option<u64>,
}

pub struct Authenticator {
    jwt: Option<(DecodingKey, Validation)>,
    tokens: Arc<dyn TokenStore>,
}

impl Authenticator {
    pub fn new(jwt_secret: Option<&str>, tokens: Arc<dyn TokenStore>) -> Self {
        let jwt = jwt_secret.map(|secret| {
            let mut validation = Validation::new(Algorithm::HS256);
            validation.leeway = 5;
            validation.set_required_spec_claims(&["exp", "sub"]);
            (DecodingKey::from_secret(secret.as_bytes()), validation)
        });
        Authenticator { jwt, tokens }
    }

    /// Checks a token of either kind. A JWT has three dot-separated parts; anything else is looked
    /// up as an opaque token.
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        if token.len() > 4096 {
            return Err(AuthError::Invalid);
        }
        let identity = if token.split('.').count() == 3 {
            let (key, validation) = self.jwt.as_ref().ok_or(AuthError::Invalid)?;
            let data = jsonwebtoken::decode::<JwtClaims>(token, key, validation)
                .map_err(|_| AuthError::Invalid)?;
            Identity {
                user: data.claims.sub,
                platform: data.claims.platform,
                expires_at: data.claims.exp.saturating_mul(1000),
                issued_at: data.claims.iat.map(|s| s.saturating_mul(1000)),
            }
        } else {
            let claims = self
                .tokens
                .get_token(token)
                .await
                .map_err(|_| AuthError::Unavailable)?
                .filter(|c| c.expires_at > now_ms())
                .ok_or(AuthError::Invalid)?;
            Identity {
                user: claims.user,
                platform: claims.platform,
                expires_at: claims.expires_at,
                issued_at: claims.issued_at,
            }
        };
        if !ids::is_valid_id(&identity.user)
            || identity.user == ids::SYSTEM_USER
            || !ids::is_valid_platform(identity.platform)
        {
            return Err(AuthError::Invalid);
        }
        Ok(identity)
    }
}

/// A new opaque token: 256 random bits, hex.
pub fn mint_opaque_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Compares a presented API key with the expected one in constant time.
pub fn api_key_matches(expected: Option<&str>, presented: Option<&str>) -> bool {
    match (expected, presented) {
        (Some(expected), Some(presented)) => expected.as_bytes().ct_eq(presented.as_bytes()).into(),
        _ => false,
    }
}

/// The token of an `Authorization: Bearer ...` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_compare_exactly() {
        assert!(api_key_matches(Some("k"), Some("k")));
        assert!(!api_key_matches(Some("k"), Some("K")));
        assert!(!api_key_matches(Some("k"), Some("kk")));
        assert!(!api_key_matches(Some("k"), None));
        assert!(!api_key_matches(None, Some("k")));
    }

    #[test]
    fn bearer_is_parsed() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn opaque_tokens_have_256_bits() {
        let t = mint_opaque_token();
        assert_eq!(t.len(), 64);
        assert_ne!(t, mint_opaque_token());
    }
}
