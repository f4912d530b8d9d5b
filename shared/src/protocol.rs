//! The frames of wire contract version 1 (see docs/protocol.md in the repository): what clients send, what the server
//! sends, and the objects inside them. Field names and shapes here are the public contract.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A platform id, 1 (iOS) to 8 (admin console).
pub type Platform = u8;

/// A message body: any value the sender put there, passed through untouched.
pub type Body = rmpv::Value;

/// A user's presence status. Clients may set every status but `offline`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Online,
    Offline,
    Away,
    Busy,
    Invisible,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "online",
            Status::Offline => "offline",
            Status::Away => "away",
            Status::Busy => "busy",
            Status::Invisible => "invisible",
        }
    }
}

/// Where a message goes: `{"user": id}`, `{"group": id}` or `{"all": true}` (app backend only).
/// Anything else (both a user and a group, `{"all": false}`, unknown keys) is refused on decode.
#[derive(Serialize, Debug, Clone, PartialEq, Eq, Hash)]
#[serde(untagged)]
pub enum Destination {
    User { user: String },
    Group { group: String },
    All { all: bool },
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            user: Option<String>,
            group: Option<String>,
            all: Option<bool>,
        }
        match Raw::deserialize(d)? {
            Raw {
                user: Some(user),
                group: None,
                all: None,
            } => Ok(Destination::User { user }),
            Raw {
                user: None,
                group: Some(group),
                all: None,
            } => Ok(Destination::Group { group }),
            Raw {
                user: None,
                group: None,
                all: Some(true),
            } => Ok(Destination::All { all: true }),
            _ => Err(serde::de::Error::custom(
                "`to` must be exactly one of {\"user\": id}, {\"group\": id} or {\"all\": true}",
            )),
        }
    }
}

/// Machine-readable error codes of `error` frames and REST errors.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    TooLarge,
    RateLimited,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire (and in metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Whether a `send` answered with `unavailable` went out, on that `error` (`outcome`).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Nothing reached the backend: sending again cannot duplicate it.
    NotSent,
    /// The backend may have routed it; send again with the same `client_msg_id` to be sure it
    /// goes out once.
    Unknown,
}

/// How a message was routed, reported in `ack`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RouteResult {
    /// Every recipient had at least one connection that got it.
    Delivered,
    /// Some recipients got it live, the rest had it stored.
    Partial,
    /// No recipient was online; it waits in storage.
    Stored,
    /// Nobody to deliver to and nothing stored.
    NoRecipients,
}

/// One user's presence, as in `presence` events and `presence_list` items.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub user: String,
    pub status: Status,
    /// Platforms with at least one live connection, ascending.
    pub platforms: Vec<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Set for offline users: when they were last seen online, in ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
    /// Grows with every change of this user's presence, so a late event can be dropped.
    pub version: u64,
}

/// A delivered message, as in `message` frames and `history` items.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Message {
    /// Sortable in send order per destination.
    pub msg_id: String,
    /// The sending user, or `system`.
    pub from: String,
    pub to: Destination,
    pub body: Body,
    pub sent_at: u64,
    /// True when delivered from offline storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline: Option<bool>,
}

/// A frame from client to server. The derived `Deserialize` is the reference decoder; the codec
/// reads frames whose `type` comes first in one pass instead (see `frame_de.rs`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    SetStatus {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        status: Status,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
    },
    Subscribe {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        users: Vec<String>,
    },
    Unsubscribe {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        users: Vec<String>,
    },
    Query {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        users: Vec<String>,
    },
    Join {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        group: String,
    },
    Leave {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        group: String,
    },
    GroupOnline {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        group: String,
    },
    Send {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        to: Destination,
        body: Body,
        /// The client's own id of the message (1 to
        /// [`crate::ids::MAX_CLIENT_MSG_ID_BYTES`] bytes): a
        /// repeat within the dedupe window gets the first one's `ack` and is not sent again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
    },
    AckOffline {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        up_to: String,
    },
    Sync {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        group: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    Read {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        group: String,
        up_to: String,
    },
    Unread {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// A new token for the same user and platform, before the connection's one expires.
    Refresh {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        token: String,
    },
}

impl ClientFrame {
    /// The request id, echoed in the reply.
    pub fn id(&self) -> Option<u64> {
        match self {
            ClientFrame::Ping { id }
            | ClientFrame::SetStatus { id, .. }
            | ClientFrame::Subscribe { id, .. }
            | ClientFrame::Unsubscribe { id, .. }
            | ClientFrame::Query { id, .. }
            | ClientFrame::Join { id, .. }
            | ClientFrame::Leave { id, .. }
            | ClientFrame::GroupOnline { id, .. }
            | ClientFrame::Send { id, .. }
            | ClientFrame::AckOffline { id, .. }
            | ClientFrame::Sync { id, .. }
            | ClientFrame::Read { id, .. }
            | ClientFrame::Unread { id }
            | ClientFrame::Refresh { id, .. } => *id,
        }
    }

    /// The frame's `type`, for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Ping { .. } => "ping",
            ClientFrame::SetStatus { .. } => "set_status",
            ClientFrame::Subscribe { .. } => "subscribe",
            ClientFrame::Unsubscribe { .. } => "unsubscribe",
            ClientFrame::Query { .. } => "query",
            ClientFrame::Join { .. } => "join",
            ClientFrame::Leave { .. } => "leave",
            ClientFrame::GroupOnline { .. } => "group_online",
            ClientFrame::Send { .. } => "send",
            ClientFrame::AckOffline { .. } => "ack_offline",
            ClientFrame::Sync { .. } => "sync",
            ClientFrame::Read { .. } => "read",
            ClientFrame::Unread { .. } => "unread",
            ClientFrame::Refresh { .. } => "refresh",
        }
    }
}

/// A frame from server to client, decoded like [`ClientFrame`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        conn_id: String,
        user: String,
        platform: Platform,
        node: String,
        heartbeat_ms: u64,
        server_time: u64,
        /// When the connection's token expires (ms): the server closes it with 4001 then,
        /// unless the client sent `refresh`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    Ok {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// The new expiry, in the answer to `refresh`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        code: ErrorCode,
        message: String,
        /// Only on a `send` answered with `unavailable`: whether the message may have gone out.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outcome: Option<Outcome>,
    },
    Presence(Presence),
    PresenceList {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        items: Vec<Presence>,
        /// Users of a `subscribe` the authorization hook did not allow (left out of `items`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        denied: Option<Vec<String>>,
    },
    MemberList {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        group: String,
        users: Vec<String>,
    },
    Message(Message),
    Ack {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        msg_id: String,
        result: RouteResult,
        delivered: u64,
        stored: u64,
    },
    UnreadCounts {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        groups: BTreeMap<String, u64>,
    },
    History {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        group: String,
        messages: Vec<Message>,
        more: bool,
    },
}

impl ServerFrame {
    /// An `ok` reply.
    pub fn ok(id: Option<u64>) -> Self {
        ServerFrame::Ok {
            id,
            expires_at: None,
        }
    }

    /// An `error` reply.
    pub fn error(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            id,
            code,
            message: message.into(),
            outcome: None,
        }
    }

    /// The `unavailable` answer to a `send`, saying whether it may have gone out.
    pub fn send_unavailable(id: Option<u64>, outcome: Outcome) -> Self {
        let message = match outcome {
            Outcome::NotSent => "message store unavailable; the message was not sent",
            Outcome::Unknown => {
                "message store unavailable; the message may have been sent: retry with the same client_msg_id"
            }
        };
        ServerFrame::Error {
            id,
            code: ErrorCode::Unavailable,
            message: message.into(),
            outcome: Some(outcome),
        }
    }
}
