//! The registry role: which nodes are alive, and cleaning up after those that died.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{BackendError, Changed};

/// Nodes announce themselves every third of `node_ttl`; one that stops is dead `node_ttl` after
/// its last announcement.
///
/// - Exactly one caller across all nodes reaps a given dead node: its presence entries are
///   removed, the resulting changes published, and returned to that caller only (for webhooks).
/// - `leave_node` removes the node and whatever entries it still holds (graceful shutdown).
/// - `hand_over` (graceful shutdown, zero-flap) leaves the node's entries as they are for a
///   window, under a name no node runs as, and takes the node out of the registry. Nothing is
///   published: a user who reconnects to another node within the window never shows offline.
///   Entries nobody superseded expire at the window's end (reads show those users offline); the
///   name is then reaped like a dead node, publishing their offline changes (and webhooks)
///   within a heartbeat interval. A new run under the same node id starts with nothing of it.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Announces or refreshes this node.
    async fn announce_node(&self, info: &NodeInfo) -> Result<(), BackendError>;
    async fn leave_node(&self, node: &str) -> Result<(), BackendError>;
    /// Leaves the registry, handing `node`'s entries over to expiry at most `window` from now;
    /// returns how many users had one.
    async fn hand_over(&self, node: &str, window: Duration) -> Result<usize, BackendError>;
    /// Every live node, in id order.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, BackendError>;
    /// Reaps nodes that stopped announcing; `me` is never reaped.
    async fn reap_dead_nodes(&self, me: &str) -> Result<Vec<Changed>, BackendError>;
    /// At start: removes what an earlier process under this node id left (nobody else reaps a
    /// node that keeps announcing) and returns the changes, for webhooks.
    async fn reap_previous_run(&self, node: &str) -> Result<Vec<Changed>, BackendError>;
}

/// A node as the registry shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    pub ws_url: String,
    pub connections: u64,
    pub started_at: u64,
    pub last_heartbeat: u64,
}

/// The name a node's entries are handed over under at `now_ms`: no node runs as it (node ids
/// have no `~`), so nothing renews it, and a new run of the node starts clean.
pub fn handover_name(node: &str, now_ms: u64) -> String {
    format!("{node}~{now_ms}")
}
