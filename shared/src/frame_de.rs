//! Hand-written `Deserialize` for [`ClientFrame`] and [`ServerFrame`].
//!
//! Why not `#[derive(Deserialize)]` with `#[serde(tag = "type")]`: serde reads an internally
//! tagged enum in two passes. It first buffers the whole map into its private `Content` tree
//! (every key, every value, nested bodies included, allocating as it goes), because `type` may
//! come last, and only then deserializes the variant from that tree. That pass allocates for
//! every key and value and cost about as much again as the decoding itself, in both encodings, on
//! every frame the gateway receives and the load tool reads. serde offers no hook to avoid it, and
//! no crate does this either. The derive is kept for `Serialize`, which has no such cost.
//!
//! Here the map is walked once. Each key names either `type` or a field; a field's value is
//! deserialized straight into a slot of a flat struct (`ClientFields`, `ServerFields`), and the
//! variant is built from the slots at the end. When `type` comes first, which is how every
//! encoder of these frames writes it, the variant is known from the start, so a field the variant
//! does not have is skipped like any unknown field. A field that comes before `type` is read
//! without knowing the variant; since a field name has the same type in every variant, it can
//! still be read, and whatever its outcome (a value, a refusal, a second occurrence) only counts
//! once `type` names a variant that has the field, exactly as the derive ignored fields foreign
//! to the variant whatever they held.
//!
//! What is accepted and refused is what the derive accepted and refused (the tests compare the
//! two on generated frames), with one deliberate exception: top-level keys must be strings (a
//! MessagePack bin holding the name also passes, as before). The derive read an integer key as
//! the position of a field in the variant, which the contract never allowed and which cannot be
//! resolved before `type` is known. A frame must also be a map: the derive read a sequence as
//! fields by position, which the codec has always refused before decoding.
//!
//! Values go through [`crate::replay`], which applies the rules serde's buffered pass applied to
//! them (MessagePack bin is not an array, a unit enum is not a variant index, ...), so the nested
//! types keep their derived impls and their exact behaviour. The `type` value itself is read like
//! the derive read it, straight from the format: a name, or in MessagePack also a variant index.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, Unexpected, Visitor};

use crate::protocol::{
    Body, ClientFrame, Destination, ErrorCode, Message, Platform, Presence, RouteResult,
    ServerFrame, Status,
};
use crate::replay::{self, Skip};

/// The `type` of each client frame, in the enum's declaration order (a MessagePack `type` may be
/// this index, as serde's derive allowed).
const CLIENT_TYPES: &[&str] = &[
    "ping",
    "set_status",
    "subscribe",
    "unsubscribe",
    "query",
    "join",
    "leave",
    "group_online",
    "send",
    "ack_offline",
    "sync",
    "read",
    "unread",
];

/// The `type` of each server frame, in the enum's declaration order.
const SERVER_TYPES: &[&str] = &[
    "welcome",
    "pong",
    "ok",
    "error",
    "presence",
    "presence_list",
    "member_list",
    "message",
    "ack",
    "unread_counts",
    "history",
];

/// A required field: absent is an error.
fn required<T, E: de::Error>(slot: &mut Option<T>, name: &'static str) -> Result<T, E> {
    slot.take().ok_or_else(|| E::missing_field(name))
}

/// An optional field: absent and `null` are both `None`.
fn optional<T>(slot: &mut Option<Option<T>>) -> Option<T> {
    slot.take().flatten()
}

/// The field slots of one frame enum.
trait Fields: Default {
    type Field: Copy + PartialEq + 'static;
    fn field(key: &[u8]) -> Option<Self::Field>;
    fn name(field: Self::Field) -> &'static str;
    fn bit(field: Self::Field) -> u64;
    /// Reads the current entry's value into the field's slot. `Ok(false)`: the field's type
    /// refused the value (which was still read to its end; the error is the context's);
    /// `Err`: the input is broken.
    fn read<'de, M: MapAccess<'de>>(
        &mut self,
        field: Self::Field,
        map: &mut M,
        ctx: &replay::Ctx,
    ) -> Result<bool, M::Error>;
}

/// How a field's value is read. Through [`crate::replay`], which applies the rules of serde's
/// buffered pass, except for bodies: `rmpv::Value` takes any value and asks for nothing but
/// `deserialize_any`, which is all the buffered pass did too, so it reads straight from the
/// format (faster, and with less stack for deeply nested bodies), and any error it meets is the
/// format's own.
trait FieldValue<'de>: Deserialize<'de> {
    fn read_into<M: MapAccess<'de>>(
        map: &mut M,
        ctx: &replay::Ctx,
        slot: &mut Option<Self>,
    ) -> Result<bool, M::Error> {
        replay::read_into(map, ctx, slot)
    }
}

impl<'de> FieldValue<'de> for Body {
    fn read_into<M: MapAccess<'de>>(
        map: &mut M,
        _: &replay::Ctx,
        slot: &mut Option<Self>,
    ) -> Result<bool, M::Error> {
        *slot = Some(map.next_value()?);
        Ok(true)
    }
}

macro_rules! replayed {
    ($($ty:ty),* $(,)?) => {
        $(impl<'de> FieldValue<'de> for $ty {})*
    };
}

replayed!(
    String,
    Option<String>,
    u8,
    u64,
    Option<u64>,
    Option<u32>,
    bool,
    Option<bool>,
    Status,
    ErrorCode,
    RouteResult,
    Destination,
    Vec<String>,
    Vec<Platform>,
    Vec<Presence>,
    Vec<Message>,
    BTreeMap<String, u64>,
);

/// Declares the field enum and slot struct of a frame enum: `Variant slot b"key": Type`.
macro_rules! frame_fields {
    ($(#[$meta:meta])* $fields:ident, $field:ident { $($variant:ident $slot:ident $key:literal: $ty:ty,)* }) => {
        #[derive(Clone, Copy, PartialEq, Eq, Debug)]
        enum $field {
            $($variant,)*
        }

        $(#[$meta])*
        #[derive(Default)]
        struct $fields {
            $($slot: Option<$ty>,)*
        }

        impl Fields for $fields {
            type Field = $field;

            fn field(key: &[u8]) -> Option<$field> {
                match key {
                    $($key => Some($field::$variant),)*
                    _ => None,
                }
            }

            fn name(field: $field) -> &'static str {
                match field {
                    $($field::$variant => stringify!($slot),)*
                }
            }

            fn bit(field: $field) -> u64 {
                1 << field as u32
            }

            fn read<'de, M: MapAccess<'de>>(
                &mut self,
                field: $field,
                map: &mut M,
                ctx: &replay::Ctx,
            ) -> Result<bool, M::Error> {
                Ok(match field {
                    $($field::$variant => {
                        <$ty as FieldValue>::read_into(map, ctx, &mut self.$slot)?
                    })*
                })
            }
        }
    };
}

frame_fields! {
    /// Every field of every client frame. A name has one type across variants.
    ClientFields, ClientField {
        Id id b"id": Option<u64>,
        Status status b"status": Status,
        Text text b"text": Option<String>,
        Users users b"users": Vec<String>,
        Group group b"group": String,
        To to b"to": Destination,
        Body body b"body": Body,
        UpTo up_to b"up_to": String,
        Since since b"since": Option<String>,
        Limit limit b"limit": Option<u32>,
    }
}

frame_fields! {
    /// Every field of every server frame (and of `Presence` and `Message`, which are frames too).
    ServerFields, ServerField {
        Id id b"id": Option<u64>,
        ConnId conn_id b"conn_id": String,
        User user b"user": String,
        Platform platform b"platform": Platform,
        Node node b"node": String,
        HeartbeatMs heartbeat_ms b"heartbeat_ms": u64,
        ServerTime server_time b"server_time": u64,
        Code code b"code": ErrorCode,
        MessageText message b"message": String,
        Status status b"status": Status,
        Platforms platforms b"platforms": Vec<Platform>,
        Text text b"text": Option<String>,
        LastSeen last_seen b"last_seen": Option<u64>,
        Version version b"version": u64,
        Items items b"items": Vec<Presence>,
        Group group b"group": String,
        Users users b"users": Vec<String>,
        MsgId msg_id b"msg_id": String,
        From from b"from": String,
        To to b"to": Destination,
        Body body b"body": Body,
        SentAt sent_at b"sent_at": u64,
        Offline offline b"offline": Option<bool>,
        Result result b"result": RouteResult,
        Delivered delivered b"delivered": u64,
        Stored stored b"stored": u64,
        Groups groups b"groups": BTreeMap<String, u64>,
        Messages messages b"messages": Vec<Message>,
        More more b"more": bool,
    }
}

/// The fields each client frame has, by index in [`CLIENT_TYPES`].
fn client_fields(index: usize) -> &'static [ClientField] {
    use ClientField as F;
    match index {
        0 | 12 => &[F::Id],                           // ping, unread
        1 => &[F::Id, F::Status, F::Text],            // set_status
        2..=4 => &[F::Id, F::Users],                  // subscribe, unsubscribe, query
        5..=7 => &[F::Id, F::Group],                  // join, leave, group_online
        8 => &[F::Id, F::To, F::Body],                // send
        9 => &[F::Id, F::UpTo],                       // ack_offline
        10 => &[F::Id, F::Group, F::Since, F::Limit], // sync
        11 => &[F::Id, F::Group, F::UpTo],            // read
        _ => &[],
    }
}

/// The fields each server frame has, by index in [`SERVER_TYPES`].
fn server_fields(index: usize) -> &'static [ServerField] {
    use ServerField as F;
    match index {
        // welcome
        0 => &[
            F::ConnId,
            F::User,
            F::Platform,
            F::Node,
            F::HeartbeatMs,
            F::ServerTime,
        ],
        1 | 2 => &[F::Id],                      // pong, ok
        3 => &[F::Id, F::Code, F::MessageText], // error
        // presence
        4 => &[
            F::User,
            F::Status,
            F::Platforms,
            F::Text,
            F::LastSeen,
            F::Version,
        ],
        5 => &[F::Id, F::Items],           // presence_list
        6 => &[F::Id, F::Group, F::Users], // member_list
        // message
        7 => &[F::MsgId, F::From, F::To, F::Body, F::SentAt, F::Offline],
        // ack
        8 => &[F::Id, F::MsgId, F::Result, F::Delivered, F::Stored],
        9 => &[F::Id, F::Groups],                       // unread_counts
        10 => &[F::Id, F::Group, F::Messages, F::More], // history
        _ => &[],
    }
}

fn build_client<E: de::Error>(index: usize, f: &mut ClientFields) -> Result<ClientFrame, E> {
    Ok(match index {
        0 => ClientFrame::Ping {
            id: optional(&mut f.id),
        },
        1 => ClientFrame::SetStatus {
            id: optional(&mut f.id),
            status: required(&mut f.status, "status")?,
            text: optional(&mut f.text),
        },
        2 => ClientFrame::Subscribe {
            id: optional(&mut f.id),
            users: required(&mut f.users, "users")?,
        },
        3 => ClientFrame::Unsubscribe {
            id: optional(&mut f.id),
            users: required(&mut f.users, "users")?,
        },
        4 => ClientFrame::Query {
            id: optional(&mut f.id),
            users: required(&mut f.users, "users")?,
        },
        5 => ClientFrame::Join {
            id: optional(&mut f.id),
            group: required(&mut f.group, "group")?,
        },
        6 => ClientFrame::Leave {
            id: optional(&mut f.id),
            group: required(&mut f.group, "group")?,
        },
        7 => ClientFrame::GroupOnline {
            id: optional(&mut f.id),
            group: required(&mut f.group, "group")?,
        },
        8 => ClientFrame::Send {
            id: optional(&mut f.id),
            to: required(&mut f.to, "to")?,
            body: required(&mut f.body, "body")?,
        },
        9 => ClientFrame::AckOffline {
            id: optional(&mut f.id),
            up_to: required(&mut f.up_to, "up_to")?,
        },
        10 => ClientFrame::Sync {
            id: optional(&mut f.id),
            group: required(&mut f.group, "group")?,
            since: optional(&mut f.since),
            limit: optional(&mut f.limit),
        },
        11 => ClientFrame::Read {
            id: optional(&mut f.id),
            group: required(&mut f.group, "group")?,
            up_to: required(&mut f.up_to, "up_to")?,
        },
        12 => ClientFrame::Unread {
            id: optional(&mut f.id),
        },
        _ => return Err(E::custom("unknown client frame type")),
    })
}

fn build_server<E: de::Error>(index: usize, f: &mut ServerFields) -> Result<ServerFrame, E> {
    Ok(match index {
        0 => ServerFrame::Welcome {
            conn_id: required(&mut f.conn_id, "conn_id")?,
            user: required(&mut f.user, "user")?,
            platform: required(&mut f.platform, "platform")?,
            node: required(&mut f.node, "node")?,
            heartbeat_ms: required(&mut f.heartbeat_ms, "heartbeat_ms")?,
            server_time: required(&mut f.server_time, "server_time")?,
        },
        1 => ServerFrame::Pong {
            id: optional(&mut f.id),
        },
        2 => ServerFrame::Ok {
            id: optional(&mut f.id),
        },
        3 => ServerFrame::Error {
            id: optional(&mut f.id),
            code: required(&mut f.code, "code")?,
            message: required(&mut f.message, "message")?,
        },
        4 => ServerFrame::Presence(Presence {
            user: required(&mut f.user, "user")?,
            status: required(&mut f.status, "status")?,
            platforms: required(&mut f.platforms, "platforms")?,
            text: optional(&mut f.text),
            last_seen: optional(&mut f.last_seen),
            version: required(&mut f.version, "version")?,
        }),
        5 => ServerFrame::PresenceList {
            id: optional(&mut f.id),
            items: required(&mut f.items, "items")?,
        },
        6 => ServerFrame::MemberList {
            id: optional(&mut f.id),
            group: required(&mut f.group, "group")?,
            users: required(&mut f.users, "users")?,
        },
        7 => ServerFrame::Message(Message {
            msg_id: required(&mut f.msg_id, "msg_id")?,
            from: required(&mut f.from, "from")?,
            to: required(&mut f.to, "to")?,
            body: required(&mut f.body, "body")?,
            sent_at: required(&mut f.sent_at, "sent_at")?,
            offline: optional(&mut f.offline),
        }),
        8 => ServerFrame::Ack {
            id: optional(&mut f.id),
            msg_id: required(&mut f.msg_id, "msg_id")?,
            result: required(&mut f.result, "result")?,
            delivered: required(&mut f.delivered, "delivered")?,
            stored: required(&mut f.stored, "stored")?,
        },
        9 => ServerFrame::UnreadCounts {
            id: optional(&mut f.id),
            groups: required(&mut f.groups, "groups")?,
        },
        10 => ServerFrame::History {
            id: optional(&mut f.id),
            group: required(&mut f.group, "group")?,
            messages: required(&mut f.messages, "messages")?,
            more: required(&mut f.more, "more")?,
        },
        _ => return Err(E::custom("unknown server frame type")),
    })
}

/// Walks a frame's map once: see the module documentation.
fn read_frame<'de, M, F, T>(
    mut map: M,
    types: &'static [&'static str],
    fields_of: fn(usize) -> &'static [F::Field],
    build: fn(usize, &mut F) -> Result<T, M::Error>,
) -> Result<T, M::Error>
where
    M: MapAccess<'de>,
    F: Fields,
{
    // Set when the input itself fails (not just a value's type), after which nothing can be read.
    let ctx = replay::Ctx::default();
    let mut fields = F::default();
    // The variant's index and a bit for each of its fields, once `type` has been read.
    let mut variant: Option<(usize, u64)> = None;
    // Fields met so far; those met more than once before `type`; refusals before `type`.
    let mut seen = 0u64;
    let mut repeated = 0u64;
    let mut refused: Vec<(F::Field, M::Error)> = Vec::new();
    while let Some(key) = map.next_key_seed(KeySeed(F::field))? {
        match key {
            Key::Type => {
                if variant.is_some() {
                    return Err(de::Error::duplicate_field("type"));
                }
                let index = map.next_value_seed(TypeSeed(types))?;
                let own = fields_of(index);
                let mask = own.iter().fold(0, |mask, &f| mask | F::bit(f));
                // What was met before `type` counts now, for this variant's fields only.
                if let Some(&f) = own.iter().find(|&&f| repeated & F::bit(f) != 0) {
                    return Err(de::Error::duplicate_field(F::name(f)));
                }
                if let Some(i) = refused.iter().position(|(f, _)| mask & F::bit(*f) != 0) {
                    return Err(refused.swap_remove(i).1);
                }
                variant = Some((index, mask));
            }
            Key::Field(f) => {
                let bit = F::bit(f);
                match variant {
                    Some((_, mask)) if mask & bit == 0 => map.next_value_seed(Skip)?,
                    Some(_) => {
                        if seen & bit != 0 {
                            return Err(de::Error::duplicate_field(F::name(f)));
                        }
                        seen |= bit;
                        if !fields.read(f, &mut map, &ctx)? {
                            return Err(ctx.take_refusal());
                        }
                    }
                    None if seen & bit != 0 => {
                        repeated |= bit;
                        map.next_value_seed(Skip)?;
                    }
                    None => {
                        seen |= bit;
                        if !fields.read(f, &mut map, &ctx)? {
                            refused.push((f, ctx.take_refusal()));
                        }
                    }
                }
            }
            Key::Other => map.next_value_seed(Skip)?,
        }
    }
    match variant {
        Some((index, _)) => build(index, &mut fields),
        None => Err(de::Error::missing_field("type")),
    }
}

/// A top-level key: `type`, a field of some variant, or anything else (ignored).
enum Key<F> {
    Type,
    Field(F),
    Other,
}

struct KeySeed<F>(fn(&[u8]) -> Option<F>);

impl<'de, F> DeserializeSeed<'de> for KeySeed<F> {
    type Value = Key<F>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key<F>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, F> Visitor<'de> for KeySeed<F> {
    type Value = Key<F>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name (frame keys are strings)")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Key<F>, E> {
        self.visit_bytes(key.as_bytes())
    }

    // A MessagePack bin key, or a str key that is not UTF-8 (which names nothing).
    fn visit_bytes<E: de::Error>(self, key: &[u8]) -> Result<Key<F>, E> {
        if key == b"type" {
            return Ok(Key::Type);
        }
        Ok((self.0)(key).map_or(Key::Other, Key::Field))
    }
}

/// Reads the `type` value as serde's derive did: `deserialize_identifier` on the format itself,
/// so a name (str or bin), or in MessagePack a variant index.
struct TypeSeed(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for TypeSeed {
    type Value = usize;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for TypeSeed {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("variant identifier")
    }

    fn visit_u64<E: de::Error>(self, index: u64) -> Result<usize, E> {
        match usize::try_from(index) {
            Ok(i) if i < self.0.len() => Ok(i),
            _ => Err(E::invalid_value(
                Unexpected::Unsigned(index),
                &VariantIndex(self.0.len()),
            )),
        }
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<usize, E> {
        self.0
            .iter()
            .position(|t| *t == name)
            .ok_or_else(|| E::unknown_variant(name, self.0))
    }

    fn visit_bytes<E: de::Error>(self, name: &[u8]) -> Result<usize, E> {
        self.0
            .iter()
            .position(|t| t.as_bytes() == name)
            .ok_or_else(|| E::unknown_variant(&String::from_utf8_lossy(name), self.0))
    }
}

struct VariantIndex(usize);

impl de::Expected for VariantIndex {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "variant index 0 <= i < {}", self.0)
    }
}

impl<'de> Deserialize<'de> for ClientFrame {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FrameVisitor;

        impl<'de> Visitor<'de> for FrameVisitor {
            type Value = ClientFrame;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("internally tagged enum ClientFrame")
            }

            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<ClientFrame, M::Error> {
                read_frame::<M, ClientFields, _>(map, CLIENT_TYPES, client_fields, build_client)
            }
        }

        d.deserialize_any(FrameVisitor)
    }
}

impl<'de> Deserialize<'de> for ServerFrame {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FrameVisitor;

        impl<'de> Visitor<'de> for FrameVisitor {
            type Value = ServerFrame;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("internally tagged enum ServerFrame")
            }

            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<ServerFrame, M::Error> {
                read_frame::<M, ServerFields, _>(map, SERVER_TYPES, server_fields, build_server)
            }
        }

        d.deserialize_any(FrameVisitor)
    }
}

#[cfg(test)]
#[path = "frame_de_tests.rs"]
mod tests;
