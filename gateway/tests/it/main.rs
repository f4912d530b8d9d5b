//! Integration tests: real gateway processes, real redis-server processes, real WebSocket clients.

mod client;
mod harness;

/// Connections: authentication, encodings, limits, bad input and close codes.
mod connect;
/// Backend role contracts, each test run in-process against the embedded and the Redis backend.
mod contract;
/// Messaging: groups, private messages, offline storage, history, broadcasts, slow consumers.
mod messaging;
/// Many nodes on Redis and Redis Cluster: cross-node presence, crashes, batching, recovery.
mod multinode;
/// Presence behaviour, one suite run against the embedded and the Redis backend.
mod presence;
/// The REST API of the app backend.
mod rest;
