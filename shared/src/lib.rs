//! What every party of the presence gateway needs to speak to it: the frames of the wire contract,
//! their two encodings, the rules for ids, and the hash that places a user on a shard.
//!
//! This crate does no I/O and depends on no runtime, so any Rust client can use it.

pub mod body;
pub mod codec;
mod frame_de;
pub mod ids;
pub mod protocol;
pub mod shard;

pub use codec::{Encoding, FrameError};
pub use protocol::{
    Body, ClientFrame, Destination, ErrorCode, Message, Outcome, Platform, Presence, RouteResult,
    ServerFrame, Status,
};
