//! `GET /metrics`: samples what no event updates (shard mailboxes, the process, the node's limits),
//! then renders the Prometheus text.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::State,
    http::header,
    response::{IntoResponse, Response},
};

use crate::{app::App, metrics as m};

/// The longest a scrape waits for the webhook queue's length.
const QUEUE_READ: Duration = Duration::from_millis(250);

pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    let Some(handle) = &app.metrics else {
        return text(String::new());
    };
    // A mailbox that fills between two flushes shows here, not only after the next job.
    for (shard, depth) in app.shards.queue_depths().enumerate() {
        metrics::gauge!(m::SHARD_QUEUE_DEPTH, "shard" => shard.to_string()).set(depth as f64);
    }
    metrics::gauge!(m::SHARD_QUEUE_CAPACITY).set(app.shards.mailbox_capacity() as f64);
    metrics::gauge!(m::CONNECTIONS_MAX).set(app.config.max_connections as f64);
    metrics::gauge!(m::WEBHOOK_QUEUE_MAX).set(app.config.webhook_queue_max as f64);
    if app.config.sends_webhooks() {
        // One O(1) read; a stalled Redis keeps the last value rather than hold the scrape.
        let len = tokio::time::timeout(QUEUE_READ, app.backend.webhooks.queued()).await;
        if let Ok(Ok(len)) = len {
            metrics::gauge!(m::WEBHOOK_QUEUE).set(len as f64);
        }
    }
    m::sample_process();
    text(handle.render())
}

fn text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
