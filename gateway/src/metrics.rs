//! Every metric name in one place, their help texts, and the Prometheus recorder behind `/metrics`.
//! docs/metrics.md lists them for operators (the `metrics` integration test keeps it true).

use std::{sync::OnceLock, time::Instant};

use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS: &str = "presence_connections";
pub const CONNECTIONS_BY_PLATFORM: &str = "presence_connections_by_platform";
pub const CONNECTS: &str = "presence_connects_total";
pub const DISCONNECTS: &str = "presence_disconnects_total";
pub const ONLINE_USERS: &str = "presence_online_users";
pub const STATUS_CHANGES: &str = "presence_status_changes_total";
pub const TRANSITIONS: &str = "presence_transitions_total";
pub const BATCH_SIZE: &str = "presence_batch_size";
pub const EARLY_FLUSHES: &str = "presence_early_flushes_total";
pub const FLUSH_SECONDS: &str = "presence_flush_seconds";
pub const FLUSHES: &str = "presence_flushes_total";
pub const PRESENCE_WRITES: &str = "presence_writes_total";
pub const BACKEND_ROUND_TRIPS: &str = "presence_backend_round_trips_total";
pub const BACKEND_ERRORS: &str = "presence_backend_errors_total";
pub const BACKEND_UP: &str = "presence_backend_up";
pub const BACKEND_TRANSITIONS: &str = "presence_backend_transitions_total";
pub const BACKEND_REFUSED: &str = "presence_backend_refused_total";
pub const RESYNC_EVENTS: &str = "presence_resync_events_total";
pub const RESYNC_MESSAGES: &str = "presence_resync_messages_total";
pub const DEFERRED_CONNECTS: &str = "presence_deferred_connects_total";
pub const SHARD_QUEUE_DEPTH: &str = "presence_shard_queue_depth";
pub const SHARD_USERS: &str = "presence_shard_users";
pub const RENEWALS: &str = "presence_renewals_total";
pub const PRESENCE_EVENTS_DELIVERED: &str = "presence_events_delivered_total";
pub const PUBSUB_MESSAGES: &str = "presence_pubsub_messages_total";
pub const FRAMES_IN: &str = "presence_frames_in_total";
pub const CLIENT_ERRORS: &str = "presence_client_errors_total";
pub const SLOW_CONSUMER_CLOSES: &str = "presence_slow_consumer_closes_total";
pub const SESSION_CLOSES: &str = "presence_session_closes_total";
pub const UNREADABLE_MESSAGES: &str = "presence_unreadable_messages_total";
pub const ACCEPT_REFUSED: &str = "presence_accept_refused_total";
pub const WEBHOOKS: &str = "presence_webhooks_total";
pub const WEBHOOK_QUEUE: &str = "presence_webhook_queue";
pub const WEBHOOKS_IN_FLIGHT: &str = "presence_webhooks_in_flight";
pub const REAPED_USERS: &str = "presence_reaped_users_total";
pub const INDEX_CHECKED: &str = "presence_index_checked_total";
pub const INDEX_REPAIRED: &str = "presence_index_repaired_total";
pub const HEARTBEAT_RTT_SECONDS: &str = "presence_heartbeat_rtt_seconds";
pub const MESSAGES_ROUTED: &str = "presence_messages_routed_total";
pub const DELIVERIES: &str = "presence_deliveries_total";
pub const GROUP_LIMIT_REFUSALS: &str = "presence_group_limit_refusals_total";
pub const DELIVERY_SECONDS: &str = "presence_delivery_seconds";
pub const AUTH_HOOK_CALLS: &str = "presence_auth_hook_calls_total";
pub const AUTH_HOOK_SECONDS: &str = "presence_auth_hook_seconds";
pub const AUTH_HOOK_CACHE_HITS: &str = "presence_auth_hook_cache_hits_total";
pub const SEND_RETRIES: &str = "presence_send_retries_total";
pub const MESSAGES_DEDUPED: &str = "presence_messages_deduped_total";
pub const DEDUPE_ENTRIES: &str = "presence_dedupe_entries";
pub const HTTP_REQUEST_SECONDS: &str = "presence_http_request_seconds";
pub const WS_REQUEST_SECONDS: &str = "presence_ws_request_seconds";
pub const CONNECTIONS_MAX: &str = "presence_connections_max";
pub const SHARD_QUEUE_CAPACITY: &str = "presence_shard_queue_capacity";
pub const WEBHOOK_QUEUE_MAX: &str = "presence_webhook_queue_max";

fn describe() {
    describe_gauge!(CONNECTIONS, "Open WebSocket connections on this node.");
    describe_gauge!(
        CONNECTIONS_BY_PLATFORM,
        "Open connections on this node by platform."
    );
    describe_counter!(CONNECTS, "WebSocket connection attempts by result.");
    describe_counter!(DISCONNECTS, "Closed connections by reason.");
    describe_gauge!(
        ONLINE_USERS,
        "Visibly online users across all nodes, from the backend's counters (every TTL/3)."
    );
    describe_counter!(
        STATUS_CHANGES,
        "Presence record changes (status, platforms or text) written by this node."
    );
    describe_counter!(
        TRANSITIONS,
        "Users whose first connection anywhere opened (online) or last one closed (offline)."
    );
    describe_histogram!(BATCH_SIZE, "Users written per shard flush.");
    describe_counter!(
        EARLY_FLUSHES,
        "Flushes started before their batch was due, for an online or status change."
    );
    describe_histogram!(
        FLUSH_SECONDS,
        "Time to write one shard batch to the backend."
    );
    describe_counter!(FLUSHES, "Shard batch flushes by result.");
    describe_counter!(
        PRESENCE_WRITES,
        "Per-user presence changes flushed to the backend."
    );
    describe_counter!(
        BACKEND_ROUND_TRIPS,
        "Round trips to Redis by operation (a pipeline counts once)."
    );
    describe_counter!(BACKEND_ERRORS, "Failed backend calls by operation.");
    describe_gauge!(
        BACKEND_UP,
        "1 while the backend answers its probe, 0 during an outage (within 2 s of its start)."
    );
    describe_counter!(
        BACKEND_TRANSITIONS,
        "Times the backend was found down or up again (label to)."
    );
    describe_counter!(
        BACKEND_REFUSED,
        "Backend calls refused at once because the backend was known down, by operation."
    );
    describe_counter!(
        GROUP_LIMIT_REFUSALS,
        "Group member adds refused because the user is in PRESENCE_MAX_GROUPS_PER_USER groups already, by where they came from (join, rest)."
    );
    describe_counter!(
        RESYNC_EVENTS,
        "Presence events sent to watchers by a resync after the backend came back or events were lost."
    );
    describe_counter!(
        RESYNC_MESSAGES,
        "Group messages passed to local members from history because their live copy never reached this node (lost while it was resubscribing)."
    );
    describe_counter!(
        DEFERRED_CONNECTS,
        "Connections welcomed without their connect-time reads (groups, stored messages) because the backend was away; by result of the later read."
    );
    describe_gauge!(
        SHARD_QUEUE_DEPTH,
        "Commands waiting in a shard worker's mailbox, sampled at each scrape."
    );
    describe_gauge!(
        SHARD_QUEUE_CAPACITY,
        "Commands a shard worker's mailbox holds before senders wait."
    );
    describe_gauge!(SHARD_USERS, "Users a shard worker holds state for.");
    describe_counter!(RENEWALS, "Presence entries renewed, by result.");
    describe_counter!(
        PRESENCE_EVENTS_DELIVERED,
        "Presence events queued to local watchers."
    );
    describe_counter!(PUBSUB_MESSAGES, "Pub/sub messages by direction.");
    describe_counter!(FRAMES_IN, "Client frames received, by type.");
    describe_counter!(CLIENT_ERRORS, "Error frames sent to clients, by code.");
    describe_counter!(
        SLOW_CONSUMER_CLOSES,
        "Connections closed because their outbound queue overflowed."
    );
    describe_counter!(
        SESSION_CLOSES,
        "Connections closed by the app backend or the token's lifetime, by reason."
    );
    describe_counter!(
        UNREADABLE_MESSAGES,
        "Stored messages left out of an answer because the client's encoding cannot carry them."
    );
    describe_counter!(
        ACCEPT_REFUSED,
        "Sockets closed at accept: too many open, over the per-address rate, or accept errors."
    );
    describe_counter!(
        WEBHOOKS,
        "Webhook deliveries by result: ok, retry, given_up (retry time over), dropped (local buffer full), queue_full."
    );
    describe_gauge!(
        WEBHOOK_QUEUE,
        "Webhook events in the shared queue (waiting or being delivered), as this node last saw it."
    );
    describe_gauge!(
        WEBHOOKS_IN_FLIGHT,
        "Webhook events this node is delivering (retries included)."
    );
    describe_counter!(
        REAPED_USERS,
        "Users whose presence this node reaped from dead nodes."
    );
    describe_counter!(
        INDEX_CHECKED,
        "Online index entries this node's repair walk checked against their records."
    );
    describe_counter!(
        INDEX_REPAIRED,
        "Online index entries this node's repair walk found wrong and corrected."
    );
    describe_histogram!(HEARTBEAT_RTT_SECONDS, "WebSocket ping round-trip time.");
    describe_counter!(
        MESSAGES_ROUTED,
        "Messages routed, by destination kind and result."
    );
    describe_counter!(DELIVERIES, "Messages queued to local connections.");
    describe_histogram!(
        DELIVERY_SECONDS,
        "Time from a message's send to its queueing on this node."
    );
    describe_counter!(
        AUTH_HOOK_CALLS,
        "Calls to the authorization hook by result (allow, deny, partial, error, timeout)."
    );
    describe_histogram!(
        AUTH_HOOK_SECONDS,
        "Time from asking the authorization hook to its answer (or the timeout)."
    );
    describe_counter!(
        AUTH_HOOK_CACHE_HITS,
        "Join and subscribe requests answered from the authorization hook's cache, without a call."
    );
    describe_counter!(
        SEND_RETRIES,
        "Messages the router sent again after a failed backend call."
    );
    describe_counter!(
        MESSAGES_DEDUPED,
        "Sends answered with an earlier send's ack (same sender, destination and id), not sent again."
    );
    describe_gauge!(
        DEDUPE_ENTRIES,
        "Remembered client_msg_ids held by the embedded backend (capped by PRESENCE_DEDUPE_MAX)."
    );
    describe_histogram!(
        HTTP_REQUEST_SECONDS,
        "HTTP requests (REST, probes, metrics, WebSocket upgrades) by route, method and status, from routing to the response."
    );
    describe_histogram!(
        WS_REQUEST_SECONDS,
        "Client frames by type, from decoding to their answer queued (a send's ack, a query's presence_list)."
    );
    describe_gauge!(
        CONNECTIONS_MAX,
        "WebSocket sessions this node accepts (PRESENCE_MAX_CONNECTIONS)."
    );
    describe_gauge!(
        WEBHOOK_QUEUE_MAX,
        "Webhook events the shared queue holds at most (PRESENCE_WEBHOOK_QUEUE_MAX)."
    );
    metrics_process::Collector::default().describe();
}

/// Counters alerts watch, at zero from the start: `increase()` sees nothing in a series until its
/// second sample, so a first slow-consumer close or given-up webhook would otherwise go unnoticed.
fn zero_counters() {
    metrics::counter!(SLOW_CONSUMER_CLOSES).absolute(0);
    for result in ["ok", "retry", "given_up", "dropped", "queue_full"] {
        metrics::counter!(WEBHOOKS, "result" => result).absolute(0);
    }
    for result in ["ok", "error"] {
        metrics::counter!(RENEWALS, "result" => result).absolute(0);
        metrics::counter!(FLUSHES, "result" => result).absolute(0);
    }
    for reason in ["sockets", "rate", "accept_error"] {
        metrics::counter!(ACCEPT_REFUSED, "reason" => reason).absolute(0);
    }
    for to in ["up", "down"] {
        metrics::counter!(BACKEND_TRANSITIONS, "to" => to).absolute(0);
    }
}

/// Refreshes the process's CPU, memory, open files and threads (`process_*`) from /proc; the
/// scrape calls it, so they are as fresh as the scrape.
pub fn sample_process() {
    metrics_process::Collector::default().collect();
}

/// A client frame's age, recorded once (as [`WS_REQUEST_SECONDS`] by its type) by whatever
/// queues its answer: the session, a request task, the router, or the hook's answer.
///
/// Boxed: every connection's session holds an `Option` of one between frames, in the task that
/// every idle connection keeps, so it costs a pointer there instead of 32 bytes (and one small
/// allocation per client frame, which is answered in microseconds anyway).
pub struct RequestTimer(Box<(&'static str, Instant)>);

impl RequestTimer {
    pub fn start(kind: &'static str) -> Self {
        RequestTimer(Box::new((kind, Instant::now())))
    }

    pub fn answered(self) {
        let (kind, started) = *self.0;
        metrics::histogram!(WS_REQUEST_SECONDS, "type" => kind)
            .record(started.elapsed().as_secs_f64());
    }
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once and returns its handle; `None` if another recorder was
/// installed first (then `/metrics` answers empty).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let seconds = &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            let sizes = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), sizes));
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(e) => {
                    tracing::error!(error = %e, "bad metric buckets");
                    return None;
                }
            };
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                return None;
            }
            describe();
            zero_counters();
            Some(handle)
        })
        .clone()
}
