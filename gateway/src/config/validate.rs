//! Validation of the settings as a whole: every bad value reported at once.

use super::*;

impl Config {
    /// Checks every setting and reports all problems at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.redis_url.is_some() && self.redis_cluster.is_some() {
            problems.push("set PRESENCE_REDIS_URL or PRESENCE_REDIS_CLUSTER, not both".into());
        }
        if let Some(url) = &self.redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            problems.push(format!(
                "PRESENCE_REDIS_URL must start with redis://, got {url:?}"
            ));
        }
        if let Some(seeds) = &self.redis_cluster
            && self.cluster_seeds(seeds).is_empty()
        {
            problems.push("PRESENCE_REDIS_CLUSTER names no host:port seed".into());
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}', ' ']) {
            problems.push("PRESENCE_KEY_PREFIX must be non-empty, without braces or spaces".into());
        }
        if let Some(id) = &self.node_id
            && !shared::ids::is_valid_id(id)
        {
            problems.push("PRESENCE_NODE_ID must be 1 to 128 bytes of [A-Za-z0-9_.:@-]".into());
        }
        if self.shards == Some(0) || self.shards.is_some_and(|s| s > 1024) {
            problems.push("PRESENCE_SHARDS must be 1 to 1024".into());
        }
        if self.batch_max == 0 {
            problems.push("PRESENCE_BATCH_MAX must be at least 1".into());
        }
        if self.batch_interval_ms == 0 {
            problems.push("PRESENCE_BATCH_INTERVAL_MS must be at least 1".into());
        }
        if self.early_flushes_per_sec > 100_000 {
            problems.push("PRESENCE_EARLY_FLUSHES_PER_SEC must be at most 100000".into());
        }
        const WEEK_SECS: u64 = 7 * 86_400;
        if !(3..=WEEK_SECS).contains(&self.ttl_secs) {
            problems
                .push("PRESENCE_TTL_SECS must be 3 (renewal runs every third) to 604800".into());
        }
        if !(100..=3_600_000).contains(&self.heartbeat_ms) {
            problems.push("PRESENCE_HEARTBEAT_MS must be 100 to 3600000".into());
        }
        if !(1..=WEEK_SECS).contains(&self.idle_away_secs) {
            problems.push("PRESENCE_IDLE_AWAY_SECS must be 1 to 604800".into());
        }
        if self.batch_interval_ms > 60_000 || self.shutdown_grace_secs > 3600 {
            problems.push(
                "PRESENCE_BATCH_INTERVAL_MS must be at most 60000 and PRESENCE_SHUTDOWN_GRACE_SECS at most 3600"
                    .into(),
            );
        }
        if self.drain_delay_secs > 600
            || self.drain_spread_secs > 3600
            || self.drain_handover_secs > 3600
        {
            problems.push(
                "PRESENCE_DRAIN_DELAY_SECS must be at most 600, PRESENCE_DRAIN_SPREAD_SECS and PRESENCE_DRAIN_HANDOVER_SECS at most 3600"
                    .into(),
            );
        } else if self.drain_delay_secs + self.drain_spread_secs >= self.shutdown_grace_secs {
            // The last flush and the handover need time after the last client is closed.
            problems.push(
                "PRESENCE_DRAIN_DELAY_SECS + PRESENCE_DRAIN_SPREAD_SECS must be less than PRESENCE_SHUTDOWN_GRACE_SECS"
                    .into(),
            );
        }
        if self.history_age_secs > 365 * 86_400 || self.token_ttl_secs > 30 * 86_400 {
            problems.push(
                "PRESENCE_HISTORY_AGE_SECS must be at most a year and PRESENCE_TOKEN_TTL_SECS at most 30 days"
                    .into(),
            );
        }
        if !(256..=64 << 20).contains(&self.max_frame_bytes) {
            problems.push("PRESENCE_MAX_FRAME_BYTES must be 256 to 67108864".into());
        }
        if self.outbound_queue < 8 {
            problems.push("PRESENCE_OUTBOUND_QUEUE must be at least 8".into());
        }
        if self.max_reply_bytes < self.max_frame_bytes {
            problems.push(
                "PRESENCE_MAX_REPLY_BYTES must be at least PRESENCE_MAX_FRAME_BYTES (one message)"
                    .into(),
            );
        }
        if self.outbound_queue_bytes < self.max_reply_bytes {
            problems.push(
                "PRESENCE_OUTBOUND_QUEUE_BYTES must be at least PRESENCE_MAX_REPLY_BYTES".into(),
            );
        }
        if self.store_quota_window_secs == 0 {
            problems.push("PRESENCE_STORE_QUOTA_WINDOW_SECS must be at least 1".into());
        }
        if self.offline_ttl_secs < 60 {
            problems.push("PRESENCE_OFFLINE_TTL_SECS must be at least 60".into());
        }
        if !(1..=86_400).contains(&self.dedupe_secs) || self.dedupe_max == 0 {
            problems.push(
                "PRESENCE_DEDUPE_SECS must be 1 to 86400 and PRESENCE_DEDUPE_MAX at least 1".into(),
            );
        }
        if !(100..=60_000).contains(&self.send_retry_ms) {
            problems.push("PRESENCE_SEND_RETRY_MS must be 100 to 60000".into());
        }
        if self.max_connections == 0 {
            problems.push("PRESENCE_MAX_CONNECTIONS must be at least 1".into());
        }
        if !(100..=600_000).contains(&self.header_timeout_ms) {
            problems.push("PRESENCE_HEADER_TIMEOUT_MS must be 100 to 600000".into());
        }
        if self.max_conns_per_user == 0 {
            problems.push("PRESENCE_MAX_CONNS_PER_USER must be at least 1".into());
        }
        if self.max_groups_per_user == 0 {
            problems.push("PRESENCE_MAX_GROUPS_PER_USER must be at least 1".into());
        }
        if self.rate_limit == 0 {
            problems.push("PRESENCE_RATE_LIMIT must be at least 1".into());
        }
        if self.offline_cap == 0 || self.history_cap == 0 || self.history_age_secs == 0 {
            problems.push(
                "PRESENCE_OFFLINE_CAP, PRESENCE_HISTORY_CAP and PRESENCE_HISTORY_AGE_SECS must be at least 1"
                    .into(),
            );
        }
        if self.token_ttl_secs == 0 {
            problems.push("PRESENCE_TOKEN_TTL_SECS must be at least 1".into());
        }
        if !self.webhook_urls().is_empty() && self.webhook_secret.is_none() {
            problems.push("PRESENCE_WEBHOOK_URLS needs PRESENCE_WEBHOOK_SECRET".into());
        }
        if !(1..=WEEK_SECS).contains(&self.webhook_retry_secs) {
            problems.push("PRESENCE_WEBHOOK_RETRY_SECS must be 1 to 604800".into());
        }
        if !(1..=10_000_000).contains(&self.webhook_queue_max)
            || !(1..=1_000_000).contains(&self.webhook_buffer)
        {
            problems.push(
                "PRESENCE_WEBHOOK_QUEUE_MAX must be 1 to 10000000 and PRESENCE_WEBHOOK_BUFFER 1 to 1000000"
                    .into(),
            );
        }
        if let Some(url) = self.auth_hook_url() {
            match reqwest::Url::parse(url) {
                Ok(u) if u.scheme() == "http" && u.host().is_some() => {}
                // reqwest is built without TLS (see the workspace Cargo.toml), so https cannot work.
                Ok(u) if u.scheme() == "https" => problems.push(
                    "PRESENCE_AUTH_HOOK_URL must be http:// (this build has no TLS client)".into(),
                ),
                _ => problems.push(format!(
                    "PRESENCE_AUTH_HOOK_URL must be an http:// URL, got {url:?}"
                )),
            }
            if self.webhook_secret.as_deref().is_none_or(str::is_empty) {
                problems.push(
                    "PRESENCE_AUTH_HOOK_URL needs PRESENCE_WEBHOOK_SECRET (it signs the hook's requests)"
                        .into(),
                );
            }
        }
        if !(10..=60_000).contains(&self.auth_hook_timeout_ms) {
            problems.push("PRESENCE_AUTH_HOOK_TIMEOUT_MS must be 10 to 60000".into());
        }
        if self.auth_hook_cache_secs > 86_400 {
            problems.push("PRESENCE_AUTH_HOOK_CACHE_SECS must be at most 86400".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log) {
            problems.push(format!("PRESENCE_LOG is not a valid filter: {e}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}
