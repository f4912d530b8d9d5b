//! Looks at the gateways from outside: a few counters of each node's `/metrics` (plain HTTP on the
//! WebSocket URL's host and port) and the resident memory of gateway processes from /proc.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration, time::Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::target::Target;

/// Open connections of a node (gauge).
pub const CONNECTIONS: &str = "presence_connections";
/// Per-user presence changes flushed to the backend.
pub const WRITES: &str = "presence_writes_total";
/// Redis round trips (absent on the embedded backend).
pub const ROUND_TRIPS: &str = "presence_backend_round_trips_total";

const WATCHED: [&str; 3] = [CONNECTIONS, WRITES, ROUND_TRIPS];
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BODY: usize = 16 << 20;

/// One node's watched metrics, each summed over its label sets; a metric the node does not
/// export is absent from the map.
#[derive(Debug, Clone, Serialize, Default)]
pub struct NodeSample {
    pub endpoint: String,
    pub metrics: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One gateway process's resident memory.
#[derive(Debug, Clone, Serialize)]
pub struct PidSample {
    pub pid: u32,
    pub rss_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Everything read from the gateways at one moment.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Snapshot {
    pub label: String,
    /// Milliseconds since the run started.
    pub at_ms: u64,
    pub nodes: Vec<NodeSample>,
    pub pids: Vec<PidSample>,
}

impl Snapshot {
    /// Sum of a metric over the nodes that export it; `None` when none does.
    pub fn total(&self, metric: &str) -> Option<f64> {
        let values: Vec<f64> = self
            .nodes
            .iter()
            .filter_map(|n| n.metrics.get(metric).copied())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }
}

/// The gateways of a run: distinct `/metrics` endpoints and the processes to watch.
pub struct Probe {
    endpoints: Vec<(SocketAddr, String)>,
    /// For each `--url`, its endpoint.
    url_endpoint: Vec<usize>,
    pids: Vec<u32>,
    started: Instant,
}

impl Probe {
    pub fn new(targets: &[Target], pids: &[u32], started: Instant) -> Self {
        let mut endpoints: Vec<(SocketAddr, String)> = Vec::new();
        let mut url_endpoint = Vec::new();
        for t in targets {
            let index = match endpoints.iter().position(|(a, _)| *a == t.addr) {
                Some(i) => i,
                None => {
                    endpoints.push((t.addr, t.authority.clone()));
                    endpoints.len() - 1
                }
            };
            url_endpoint.push(index);
        }
        Probe {
            endpoints,
            url_endpoint,
            pids: pids.to_vec(),
            started,
        }
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// The endpoint (node) `--url` number `url` belongs to.
    pub fn endpoint_of_url(&self, url: usize) -> usize {
        self.url_endpoint.get(url).copied().unwrap_or(0)
    }

    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// Reads every node's metrics (concurrently) and every process's memory.
    pub async fn snapshot(&self, label: &str) -> Snapshot {
        let fetches = self.endpoints.iter().map(|(addr, authority)| async move {
            let endpoint = format!("http://{authority}/metrics");
            match fetch_metrics(*addr, authority).await {
                Ok(metrics) => NodeSample {
                    endpoint,
                    metrics,
                    error: None,
                },
                Err(e) => NodeSample {
                    endpoint,
                    metrics: BTreeMap::new(),
                    error: Some(format!("{e:#}")),
                },
            }
        });
        let nodes = futures_util::future::join_all(fetches).await;
        let pids = self
            .pids
            .iter()
            .map(|&pid| match read_rss_kib(pid) {
                Ok(kib) => PidSample {
                    pid,
                    rss_kib: Some(kib),
                    error: None,
                },
                Err(e) => PidSample {
                    pid,
                    rss_kib: None,
                    error: Some(format!("{e:#}")),
                },
            })
            .collect();
        Snapshot {
            label: label.to_string(),
            at_ms: self.started.elapsed().as_millis() as u64,
            nodes,
            pids,
        }
    }
}

async fn fetch_metrics(addr: SocketAddr, authority: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let body = tokio::time::timeout(HTTP_TIMEOUT, http_get(addr, authority, "/metrics"))
        .await
        .context("timed out")??;
    Ok(parse_metrics(&body, &WATCHED))
}

/// A plain-HTTP client for the node at `addr`, whose URLs are `http://{authority}/...` (the
/// WebSocket URL's host and port): a host name (`localhost`) is pinned to `addr`, never looked up.
pub fn http_client(
    addr: SocketAddr,
    authority: &str,
    timeout: Duration,
) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .resolve(host_of(authority), addr)
        .build()
}

/// The host of `host[:port]` (an IPv6 host keeps its brackets).
fn host_of(authority: &str) -> &str {
    authority
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(authority, |(host, _)| host)
}

/// GET over plain HTTP to `addr` (with `authority` as Host): the body of a 2xx answer.
async fn http_get(addr: SocketAddr, authority: &str, path: &str) -> anyhow::Result<String> {
    let client = http_client(addr, authority, HTTP_TIMEOUT)?;
    let response = client
        .get(format!("http://{authority}{path}"))
        .send()
        .await?
        .error_for_status()?;
    let text = response.text().await?;
    if text.len() > MAX_BODY {
        bail!("GET {path}: answer over {MAX_BODY} bytes");
    }
    Ok(text)
}

/// Sums each wanted metric over its label sets in Prometheus text format.
pub fn parse_metrics(text: &str, wanted: &[&str]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
        let name = &line[..name_end];
        if !wanted.contains(&name) {
            continue;
        }
        let rest = &line[name_end..];
        let rest = if rest.starts_with('{') {
            match rest.rfind('}') {
                Some(close) => &rest[close + 1..],
                None => continue,
            }
        } else {
            rest
        };
        if let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *out.entry(name.to_string()).or_insert(0.0) += value;
        }
    }
    out
}

/// VmRSS of a process, in KiB.
pub fn read_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    parse_vmrss(&status).with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

fn parse_vmrss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_labels() {
        let text = "# HELP presence_connections x\n\
            # TYPE presence_connections gauge\n\
            presence_connections 42\n\
            presence_writes_total{result=\"ok\"} 10\n\
            presence_writes_total{result=\"a b}\"} 5 1700000000\n\
            presence_writes_total_other 99\n\
            presence_backend_round_trips_totalx 1\n";
        let m = parse_metrics(text, &WATCHED);
        assert_eq!(m.get(CONNECTIONS), Some(&42.0));
        assert_eq!(m.get(WRITES), Some(&15.0));
        assert_eq!(m.get(ROUND_TRIPS), None);
    }

    #[test]
    fn hosts_are_split_from_ports() {
        assert_eq!(host_of("localhost:8080"), "localhost");
        assert_eq!(host_of("localhost"), "localhost");
        assert_eq!(host_of("127.0.0.1:80"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7000"), "[::1]");
        assert_eq!(host_of("[::1]"), "[::1]");
    }

    #[test]
    fn vmrss_is_read() {
        assert_eq!(parse_vmrss("Name:\tx\nVmRSS:\t   12345 kB\n"), Some(12345));
        assert_eq!(parse_vmrss("Name:\tx\n"), None);
        assert!(read_rss_kib(std::process::id()).is_ok_and(|k| k > 0));
    }
}
