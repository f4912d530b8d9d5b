//! Tests of the settings: defaults, validation of all values at once, the backend choice.

use super::*;
use std::collections::HashMap;

fn parse(args: &[&str], env: &[(&str, &str)]) -> Config {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let argv = std::iter::once("presence-gateway").chain(args.iter().copied());
    Config::try_parse_from_env(argv, |k| env.get(k).cloned()).expect("parses")
}

#[test]
fn defaults_match_the_contract() {
    let c = parse(&[], &[]);
    assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.batch_max, 100);
    assert_eq!(c.batch_interval_ms, 1000);
    assert_eq!(c.ttl_secs, 60);
    assert_eq!(c.heartbeat_ms, 25_000);
    assert_eq!(c.idle_away_secs, 600);
    assert_eq!(c.max_frame_bytes, 65_536);
    assert_eq!(c.key_prefix, "presence");
    assert_eq!(c.backend(), BackendChoice::Embedded);
    assert_eq!(c.effective_api_key(), None);
    assert_eq!(c.auth_hook_url(), None);
    assert_eq!(c.auth_hook_timeout_ms, 2000);
    assert_eq!(c.auth_hook_cache_secs, 0);
    assert!(c.validate().is_ok());
}

#[test]
fn environment_and_flags_share_names() {
    let c = parse(
        &["--batch-max", "7"],
        &[("PRESENCE_TTL_SECS", "9"), ("PRESENCE_DEV", "1")],
    );
    assert_eq!(c.batch_max, 7);
    assert_eq!(c.ttl_secs, 9);
    assert!(c.dev);
    assert_eq!(c.effective_api_key().as_deref(), Some("dev"));
}

#[test]
fn flags_win_over_environment() {
    let c = parse(&["--batch-max", "7"], &[("PRESENCE_BATCH_MAX", "9")]);
    assert_eq!(c.batch_max, 7);
}

#[test]
fn every_problem_is_reported_at_once() {
    let c = parse(
        &[
            "--batch-max=0",
            "--ttl-secs=1",
            "--redis-url=http://x",
            "--redis-cluster=a:1",
        ],
        &[],
    );
    let problems = c.validate().expect_err("invalid");
    assert_eq!(problems.len(), 4, "{problems:?}");
}

#[test]
fn the_auth_hook_is_checked() {
    let ok = parse(
        &["--auth-hook-url=http://app:8000/authz"],
        &[
            ("PRESENCE_WEBHOOK_SECRET", "s"),
            ("PRESENCE_AUTH_HOOK_TIMEOUT_MS", "500"),
            ("PRESENCE_AUTH_HOOK_CACHE_SECS", "30"),
        ],
    );
    assert_eq!(ok.auth_hook_url(), Some("http://app:8000/authz"));
    assert_eq!(ok.auth_hook_timeout(), Duration::from_millis(500));
    assert_eq!(ok.auth_hook_cache(), Duration::from_secs(30));
    assert!(ok.validate().is_ok(), "{:?}", ok.validate());
    // Without a secret, with https, out of bounds: all reported together.
    let bad = parse(
        &[
            "--auth-hook-url=https://app/authz",
            "--auth-hook-timeout-ms=0",
            "--auth-hook-cache-secs=86401",
        ],
        &[],
    );
    let problems = bad.validate().expect_err("invalid");
    assert_eq!(problems.len(), 4, "{problems:?}");
    let unparsable = parse(&["--auth-hook-url=app:8000", "--webhook-secret=s"], &[]);
    assert_eq!(unparsable.validate().expect_err("invalid").len(), 1);
    // Empty is unset (as a templated environment may leave it).
    let empty = parse(&[], &[("PRESENCE_AUTH_HOOK_URL", "")]);
    assert_eq!(empty.auth_hook_url(), None);
    assert!(empty.validate().is_ok());
}

#[test]
fn cluster_seeds_are_split() {
    let c = parse(&["--redis-cluster", "127.0.0.1:7000, 127.0.0.1:7001"], &[]);
    assert_eq!(
        c.backend(),
        BackendChoice::RedisCluster(vec!["127.0.0.1:7000".into(), "127.0.0.1:7001".into()])
    );
}

#[test]
fn webhook_settings_have_defaults_and_bounds() {
    let c = parse(&[], &[]);
    assert_eq!(
        (c.webhook_retry_secs, c.webhook_queue_max, c.webhook_buffer),
        (3_600, 100_000, 65_536)
    );
    let c = parse(
        &["--webhook-queue-max=5"],
        &[("PRESENCE_WEBHOOK_RETRY_SECS", "2")],
    );
    assert_eq!((c.webhook_retry_secs, c.webhook_queue_max), (2, 5));
    assert!(c.validate().is_ok());
    let bad = parse(
        &["--webhook-retry-secs=0", "--webhook-queue-max=0"],
        &[("PRESENCE_WEBHOOK_BUFFER", "0")],
    );
    let problems = bad.validate().expect_err("invalid");
    assert_eq!(problems.len(), 2, "{problems:?}");
}

#[test]
fn dedupe_and_send_retry_are_checked() {
    let c = parse(&[], &[]);
    assert_eq!(
        (c.dedupe_secs, c.dedupe_max, c.send_retry_ms),
        (300, 100_000, 2_000)
    );
    let c = parse(
        &["--dedupe-secs=0", "--send-retry-ms=5"],
        &[("PRESENCE_DEDUPE_MAX", "7")],
    );
    assert_eq!(c.dedupe_max, 7);
    let problems = c.validate().expect_err("invalid");
    assert_eq!(problems.len(), 2, "{problems:?}");
}

#[test]
fn drain_settings_fit_in_the_grace_period() {
    let c = parse(&[], &[]);
    assert_eq!(
        (
            c.drain_delay_secs,
            c.drain_spread_secs,
            c.drain_handover_secs,
            c.shutdown_grace_secs
        ),
        (5, 10, 10, 30)
    );
    let c = parse(
        &["--drain-delay-secs=1", "--drain-handover-secs=0"],
        &[("PRESENCE_DRAIN_SPREAD_SECS", "2")],
    );
    assert_eq!(
        (c.drain_delay(), c.drain_spread(), c.drain_handover()),
        (
            Duration::from_secs(1),
            Duration::from_secs(2),
            Duration::ZERO
        )
    );
    assert!(c.validate().is_ok());
    let late = parse(&["--drain-delay-secs=20", "--drain-spread-secs=10"], &[]);
    assert_eq!(late.validate().expect_err("invalid").len(), 1);
    let huge = parse(&["--drain-handover-secs=3601"], &[]);
    assert_eq!(huge.validate().expect_err("invalid").len(), 1);
}
