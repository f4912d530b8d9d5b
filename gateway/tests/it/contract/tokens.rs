//! `TokenStore` (backend/tokens.rs): a token is redeemable on every node from `put_token` until
//! its `expires_at`, and gone after.

use std::time::Duration;

use gateway::{backend::TokenClaims, clock::now_ms};

use super::{Factory, sleep_past};

contract!(
    tokens_are_redeemable_on_every_node,
    expired_tokens_are_gone,
    tokens_put_past_their_expiry_are_never_redeemable,
);

async fn tokens_are_redeemable_on_every_node(f: Factory) {
    let b = f.backend().await;
    let peer = b.peer("n2").await;
    let claims = TokenClaims {
        user: "alice".into(),
        platform: 5,
        expires_at: now_ms() + 60_000,
        issued_at: None,
    };
    b.tokens.put_token("tok-1", &claims).await.expect("put");
    assert_eq!(
        b.tokens.get_token("tok-1").await.expect("get"),
        Some(claims.clone())
    );
    assert_eq!(
        peer.tokens.get_token("tok-1").await.expect("get"),
        Some(claims.clone()),
        "on another node"
    );
    assert_eq!(
        b.tokens.get_token("tok-1").await.expect("get"),
        Some(claims),
        "redeeming does not use it up"
    );
    assert_eq!(b.tokens.get_token("tok-2").await.expect("get"), None);
}

async fn expired_tokens_are_gone(f: Factory) {
    let b = f.backend().await;
    let claims = TokenClaims {
        user: "bob".into(),
        platform: 1,
        expires_at: now_ms() + 200,
        issued_at: None,
    };
    b.tokens.put_token("short", &claims).await.expect("put");
    assert_eq!(
        b.tokens.get_token("short").await.expect("get"),
        Some(claims.clone())
    );
    sleep_past(Duration::from_millis(
        claims.expires_at.saturating_sub(now_ms()),
    ))
    .await;
    assert_eq!(b.tokens.get_token("short").await.expect("get"), None);
    assert_eq!(b.tokens.get_token("short").await.expect("get"), None);
}

async fn tokens_put_past_their_expiry_are_never_redeemable(f: Factory) {
    let b = f.backend().await;
    let claims = TokenClaims {
        user: "carol".into(),
        platform: 2,
        expires_at: now_ms() - 1_000,
        issued_at: None,
    };
    b.tokens.put_token("stale", &claims).await.expect("put");
    assert_eq!(b.tokens.get_token("stale").await.expect("get"), None);
}
