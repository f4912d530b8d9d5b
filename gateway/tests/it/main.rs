//! Integration tests: real gateway nodes (processes of the binary, or `gateway::serve` in this
//! process), real redis-server processes, real WebSocket clients; and shard workers on a paused
//! clock.

mod client;
mod harness;
/// Nodes in the test process: `gateway::serve` in a task; two side by side.
mod inproc;

/// The authorization hook: a hook server in the test process decides `join` and `subscribe`.
mod access;
/// Connections: authentication, encodings, limits, bad input and close codes.
mod connect;
/// Backend role contracts, each test run in-process against the embedded and the Redis backend.
mod contract;
/// The `rest` fuzz target's stored inputs, replayed through its check.
mod fuzz_corpus;
/// Hostile clients: memory bounds, poison bodies.
mod hostile;
/// Messaging: groups, private messages, offline storage, history, broadcasts, slow consumers.
mod messaging;
/// Many nodes on Redis and Redis Cluster: cross-node presence, crashes, batching, recovery.
mod multinode;
/// Presence behaviour, one suite run against the embedded backend (in a node process and in-process)
/// and the Redis backend.
mod presence;
/// The REST API of the app backend.
mod rest;
/// Token lifetime, refresh, and the app backend's disconnect and revoke across nodes.
mod sessions;
/// One shard worker on a paused clock: batch interval and size, flap suppression, retry backoff,
/// renewal rounds in chunks, the idle check, the last flush at stop.
mod shard;
/// Hand-written broken WebSocket framing and the close codes it gets.
mod wire;
