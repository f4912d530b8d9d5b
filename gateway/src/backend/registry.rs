//! The registry role: which nodes are alive, and cleaning up after those that died.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{BackendError, Changed};

/// Nodes announce themselves every third of `node_ttl`; one that stops is dead `node_ttl` after
/// its last announcement.
///
/// - Exactly one caller across all nodes reaps a given dead node: its presence entries are
///   removed, the resulting changes published, and returned to that caller only (for webhooks).
/// - `leave_node` removes the node and whatever entries it still holds (graceful shutdown).
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Announces or refreshes this node.
    async fn announce_node(&self, info: &NodeInfo) -> Result<(), BackendError>;
    async fn leave_node(&self, node: &str) -> Result<(), BackendError>;
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
