//! Mints the HS256 JWTs clients connect with (claims `sub`, `platform`, `exp`), locally, with no
//! REST call per client.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    platform: u8,
    exp: u64,
    iat: u64,
}

/// Signs client tokens with the gateway's JWT secret.
pub struct Minter {
    key: EncodingKey,
    header: Header,
    ttl: Duration,
}

impl Minter {
    pub fn new(secret: &str, ttl: Duration) -> Self {
        Minter {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::default(),
            ttl,
        }
    }

    /// A token for `user` on `platform`, valid for the configured lifetime from now.
    pub fn mint(&self, user: &str, platform: u8) -> anyhow::Result<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            sub: user,
            platform,
            exp: now + self.ttl.as_secs(),
            iat: now,
        };
        Ok(jsonwebtoken::encode(&self.header, &claims, &self.key)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Back {
        sub: String,
        platform: u8,
        exp: u64,
    }

    #[test]
    fn tokens_verify_with_the_same_secret() -> anyhow::Result<()> {
        let minter = Minter::new("s3cret", Duration::from_secs(600));
        let token = minter.mint("alice", 5)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = decode::<Back>(&token, &DecodingKey::from_secret(b"s3cret"), &validation)?;
        assert_eq!(data.claims.sub, "alice");
        assert_eq!(data.claims.platform, 5);
        assert!(data.claims.exp > 0);
        assert!(decode::<Back>(&token, &DecodingKey::from_secret(b"other"), &validation).is_err());
        Ok(())
    }
}
