//! The latency of every routed HTTP request, by route template (never the raw path, so the label
//! set stays bounded), method and status.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request},
    middleware::Next,
    response::Response,
};

use crate::metrics as m;

pub async fn timed(route: MatchedPath, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    metrics::histogram!(
        m::HTTP_REQUEST_SECONDS,
        "route" => route.as_str().to_owned(),
        "method" => method,
        "status" => response.status().as_u16().to_string(),
    )
    .record(started.elapsed().as_secs_f64());
    response
}
