//! The app backend's part of a run's setup. Groups are closed on the gateway unless the app opens
//! them, so before any member connects the coordinator opens every group the run uses, once, with
//! `PUT /v1/groups/{group}` and `{"join":"open"}` (`Authorization: Bearer` the `--api-key`), over
//! plain HTTP on the first `--url`'s host and port (as `/metrics` is read), a bounded number of
//! requests at a time. Members still `join` their group over the WebSocket: that stays what is
//! measured.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{TryStreamExt, stream};
use reqwest::StatusCode;
use serde_json::json;

use crate::{probe, target::Target};

/// `PUT`s in flight at once.
pub const CONCURRENCY: usize = 32;
/// Longest wait for one answer.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Most characters of an error answer quoted in a message.
const QUOTE: usize = 300;

/// What opening the run's groups took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Opened {
    /// Groups opened: one `PUT` round trip each.
    pub groups: u64,
    pub secs: f64,
}

/// Opens every one of `groups` on the node of `target`, at most `CONCURRENCY` at a time; the
/// first refusal (401 for a wrong key, any other non-2xx answer) or failed request is the error.
pub async fn open_groups(
    target: &Target,
    api_key: &str,
    groups: &[String],
) -> anyhow::Result<Opened> {
    if groups.is_empty() {
        return Ok(Opened::default());
    }
    let started = Instant::now();
    let client = probe::http_client(target.addr, &target.authority, HTTP_TIMEOUT)?;
    let base = format!("http://{}", target.authority);
    let (client, base) = (&client, base.as_str());
    stream::iter(groups.iter().map(Ok))
        .try_for_each_concurrent(CONCURRENCY, |group| open(client, base, api_key, group))
        .await?;
    Ok(Opened {
        groups: groups.len() as u64,
        secs: started.elapsed().as_secs_f64(),
    })
}

async fn open(
    client: &reqwest::Client,
    base: &str,
    api_key: &str,
    group: &str,
) -> anyhow::Result<()> {
    // Group ids are `[A-Za-z0-9_.:@-]`: nothing to escape in a path segment.
    let url = format!("{base}/v1/groups/{group}");
    let response = client
        .put(&url)
        .bearer_auth(api_key)
        .json(&json!({ "join": "open" }))
        .send()
        .await
        .with_context(|| format!("cannot open group {group}: PUT {url} failed"))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let text = response.text().await.unwrap_or_default();
    let quoted: String = text.trim().chars().take(QUOTE).collect();
    if status == StatusCode::UNAUTHORIZED {
        bail!(
            "the gateway refused the API key: PUT {url} answered {status} ({quoted}); give the \
             gateway's key with --api-key or PRESENCE_API_KEY (the default, `dev`, is only the \
             key of a `presence-gateway --dev` started without one)"
        );
    }
    bail!("cannot open group {group}: PUT {url} answered {status} ({quoted})");
}
