//! Gateway nodes inside the test process: `gateway::serve` (what `main` runs once it has parsed its
//! flags and bound its listener) in a task of the test's runtime, on `127.0.0.1:0`. Such a node
//! needs no build of the binary and no process start; what it cannot do is die (SIGKILL) or log to
//! a pipe, so crash and log tests keep using processes.
//!
//! Nodes in one process share what is process-wide: the Prometheus recorder (`metrics::install`
//! installs it once and hands every later node the same handle), so `/metrics` of an in-process
//! node counts what every in-process node of the test binary did.
//!
//! They run on the real clock: a paused clock advances whenever every task waits, socket reads
//! included, so heartbeats and client timeouts would fire early. The shard tests (`shard.rs`) use a
//! paused clock without sockets.

use std::net::SocketAddr;

use gateway::Config;
use shared::{ClientFrame, ServerFrame, Status};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    client::{Client, Closed, Rest},
    harness::{Backend, NodeBuilder},
};

/// A node serving in a task of the current runtime. Dropping it cancels its shutdown token (the
/// runtime finishes the drain if it outlives the handle); [`InProcess::stop`] also waits for it.
pub struct InProcess {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Binds `config.listen` and serves on it, as `main` does.
pub fn serve(config: Config) -> anyhow::Result<InProcess> {
    if let Err(problems) = config.validate() {
        anyhow::bail!("invalid configuration:\n  {}", problems.join("\n  "));
    }
    let listener = gateway::bind(config.listen)?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    // Connections made before the node is built wait in the listen backlog.
    let task = tokio::spawn(gateway::serve(config, listener, shutdown.clone()));
    Ok(InProcess {
        addr,
        shutdown,
        task: Some(task),
    })
}

impl InProcess {
    /// Drains the node as SIGTERM does (sessions closed with 1001, batches flushed, registry
    /// left) and returns what `serve` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn embedded() -> NodeBuilder {
    NodeBuilder::new(&Backend::Embedded).in_process()
}

#[tokio::test]
async fn a_node_serves_clients_and_drains_with_going_away() {
    let node = embedded().start();
    let rest = Rest::new(&node);
    assert_eq!(rest.get("/stats").await.0, 200);
    let mut bob = Client::connect(&node, "bob", 1).await;
    bob.subscribe(&["alice"]).await;
    let mut alice = Client::connect_json(&node, "alice", 5).await;
    let seen = bob.presence_of("alice").await;
    assert_eq!((seen.status, seen.platforms), (Status::Online, vec![5]));
    let (_, nodes) = rest.get("/nodes").await;
    assert_eq!(nodes["nodes"][0]["id"], node.id);

    let stopping = tokio::spawn(node.shut_down());
    assert_eq!(bob.closed().await, Closed::Code(1001));
    assert_eq!(alice.closed().await, Closed::Code(1001));
    assert!(stopping.await.expect("join"), "serve returned Ok");
}

#[tokio::test]
async fn two_nodes_run_side_by_side_in_one_process() {
    // Each has its own embedded backend; they share the process's metrics recorder.
    let one = embedded().start();
    let two = embedded().start();
    assert_ne!(one.addr, two.addr);
    let mut a = Client::connect(&one, "alice", 1).await;
    let mut b = Client::connect(&two, "alice", 2).await;
    for (client, node) in [(&mut a, &one), (&mut b, &two)] {
        match client.request(|id| ClientFrame::Ping { id }).await {
            ServerFrame::Pong { .. } => {}
            other => panic!("{other:?}"),
        }
        let text = reqwest::get(format!("{}/metrics", node.http()))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("body");
        assert!(text.contains("presence_connects_total"), "{text}");
    }
    Rest::new(&one)
        .wait_presence("alice", |p| p["platforms"] == serde_json::json!([1]))
        .await;
    Rest::new(&two)
        .wait_presence("alice", |p| p["platforms"] == serde_json::json!([2]))
        .await;
    assert!(one.shut_down().await);
    assert!(two.shut_down().await);
}
