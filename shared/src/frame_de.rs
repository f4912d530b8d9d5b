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
use std::marker::PhantomData;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, Unexpected, Visitor};

use crate::protocol::{
    Body, ClientFrame, Destination, ErrorCode, Message, Platform, Presence, RouteResult,
    ServerFrame, Status,
};
use crate::replay::{self, Skip};

/// Takes a field's value out of its slot once the map is read. An absent field is an error,
/// except for `Option` fields (all `#[serde(default)]` in the derive), where absent and `null`
/// are both `None`. The error is the missing field's name.
fn take<'de, T: FieldValue<'de>>(
    slot: &mut Option<T>,
    name: &'static str,
) -> Result<T, &'static str> {
    slot.take().or_else(T::absent).ok_or(name)
}

/// The field slots of one frame enum, and how its variants are built from them.
trait Frame: Default {
    type Field: Copy + 'static;
    type Value;
    /// What [`FrameVisitor`] expects.
    const EXPECTING: &'static str;
    /// The `type` of each variant, in the enum's declaration order (a MessagePack `type` may be
    /// this index, as serde's derive allowed).
    const TYPES: &'static [&'static str];
    fn field(key: &[u8]) -> Option<Self::Field>;
    fn name(field: Self::Field) -> &'static str;
    fn bit(field: Self::Field) -> u64;
    /// The fields of the variant at `index` in [`Frame::TYPES`], in declaration order.
    fn fields_of(index: usize) -> &'static [Self::Field];
    /// Reads the current entry's value into the field's slot. `Ok(false)`: the field's type
    /// refused the value (which was still read to its end; the error is the context's);
    /// `Err`: the input is broken.
    fn read<'de, M: MapAccess<'de>>(
        &mut self,
        field: Self::Field,
        map: &mut M,
        ctx: &replay::Ctx,
    ) -> Result<bool, M::Error>;
    /// Builds the variant at `index` from the slots.
    fn build<E: de::Error>(&mut self, index: usize) -> Result<Self::Value, E>;
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

    /// The value of an absent field, if it may be absent.
    fn absent() -> Option<Self> {
        None
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

impl<'de, T: Deserialize<'de>> FieldValue<'de> for Option<T> {
    fn absent() -> Option<Self> {
        Some(None)
    }
}

macro_rules! replayed {
    ($($ty:ty),* $(,)?) => {
        $(impl<'de> FieldValue<'de> for $ty {})*
    };
}

replayed!(
    String,
    u8,
    u64,
    bool,
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

/// Builds a struct variant, or a newtype variant around a struct.
macro_rules! variant {
    ($frame:ident::$variant:ident ($inner:ident) { $($body:tt)* }) => {
        $frame::$variant($inner { $($body)* })
    };
    ($frame:ident::$variant:ident { $($body:tt)* }) => {
        $frame::$variant { $($body)* }
    };
}

/// Declares the one-pass `Deserialize` of a frame enum from two lists: every field of every
/// variant (`slot b"key": Type`; a name has one type across variants), then every variant in
/// declaration order (`"type" => Variant { fields }`, or `Variant(Struct) { fields }` for a
/// newtype variant). The field enum, slot struct, [`Frame`] impl and `Deserialize` impl follow.
macro_rules! frame {
    (
        $(#[$meta:meta])*
        $frame:ident: $fields:ident, $field:ident { $($slot:ident $key:literal: $ty:ty,)* }
        $($type:literal => $variant:ident $(($inner:ident))? { $($has:ident),* },)*
    ) => {
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy)]
        enum $field {
            $($slot,)*
        }

        $(#[$meta])*
        #[derive(Default)]
        struct $fields {
            $($slot: Option<$ty>,)*
        }

        impl Frame for $fields {
            type Field = $field;
            type Value = $frame;
            const EXPECTING: &'static str = concat!("internally tagged enum ", stringify!($frame));
            const TYPES: &'static [&'static str] = &[$($type),*];

            fn field(key: &[u8]) -> Option<$field> {
                match key {
                    $($key => Some($field::$slot),)*
                    _ => None,
                }
            }

            fn name(field: $field) -> &'static str {
                match field {
                    $($field::$slot => stringify!($slot),)*
                }
            }

            fn bit(field: $field) -> u64 {
                1 << field as u32
            }

            fn fields_of(index: usize) -> &'static [$field] {
                const OWN: &[&[$field]] = &[$(&[$($field::$has),*]),*];
                OWN.get(index).copied().unwrap_or(&[])
            }

            fn read<'de, M: MapAccess<'de>>(
                &mut self,
                field: $field,
                map: &mut M,
                ctx: &replay::Ctx,
            ) -> Result<bool, M::Error> {
                Ok(match field {
                    $($field::$slot => {
                        <$ty as FieldValue>::read_into(map, ctx, &mut self.$slot)?
                    })*
                })
            }

            fn build<E: de::Error>(&mut self, index: usize) -> Result<$frame, E> {
                type Build = fn(&mut $fields) -> Result<$frame, &'static str>;
                const BUILD: &[Build] = &[$(|f| {
                    Ok(variant!($frame::$variant $(($inner))? {
                        $($has: take(&mut f.$has, stringify!($has))?,)*
                    }))
                }),*];
                match BUILD.get(index) {
                    Some(build) => build(self).map_err(E::missing_field),
                    None => Err(E::custom(concat!("unknown ", stringify!($frame), " type"))),
                }
            }
        }

        impl<'de> Deserialize<'de> for $frame {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(FrameVisitor::<$fields>(PhantomData))
            }
        }
    };
}

frame! {
    /// Every field of every client frame.
    ClientFrame: ClientFields, ClientField {
        id b"id": Option<u64>,
        status b"status": Status,
        text b"text": Option<String>,
        users b"users": Vec<String>,
        group b"group": String,
        to b"to": Destination,
        body b"body": Body,
        up_to b"up_to": String,
        since b"since": Option<String>,
        limit b"limit": Option<u32>,
    }
    "ping" => Ping { id },
    "set_status" => SetStatus { id, status, text },
    "subscribe" => Subscribe { id, users },
    "unsubscribe" => Unsubscribe { id, users },
    "query" => Query { id, users },
    "join" => Join { id, group },
    "leave" => Leave { id, group },
    "group_online" => GroupOnline { id, group },
    "send" => Send { id, to, body },
    "ack_offline" => AckOffline { id, up_to },
    "sync" => Sync { id, group, since, limit },
    "read" => Read { id, group, up_to },
    "unread" => Unread { id },
}

frame! {
    /// Every field of every server frame (and of `Presence` and `Message`, which are frames too).
    ServerFrame: ServerFields, ServerField {
        id b"id": Option<u64>,
        conn_id b"conn_id": String,
        user b"user": String,
        platform b"platform": Platform,
        node b"node": String,
        heartbeat_ms b"heartbeat_ms": u64,
        server_time b"server_time": u64,
        code b"code": ErrorCode,
        message b"message": String,
        status b"status": Status,
        platforms b"platforms": Vec<Platform>,
        text b"text": Option<String>,
        last_seen b"last_seen": Option<u64>,
        version b"version": u64,
        items b"items": Vec<Presence>,
        group b"group": String,
        users b"users": Vec<String>,
        msg_id b"msg_id": String,
        from b"from": String,
        to b"to": Destination,
        body b"body": Body,
        sent_at b"sent_at": u64,
        offline b"offline": Option<bool>,
        result b"result": RouteResult,
        delivered b"delivered": u64,
        stored b"stored": u64,
        groups b"groups": BTreeMap<String, u64>,
        messages b"messages": Vec<Message>,
        more b"more": bool,
    }
    "welcome" => Welcome { conn_id, user, platform, node, heartbeat_ms, server_time },
    "pong" => Pong { id },
    "ok" => Ok { id },
    "error" => Error { id, code, message },
    "presence" => Presence(Presence) { user, status, platforms, text, last_seen, version },
    "presence_list" => PresenceList { id, items },
    "member_list" => MemberList { id, group, users },
    "message" => Message(Message) { msg_id, from, to, body, sent_at, offline },
    "ack" => Ack { id, msg_id, result, delivered, stored },
    "unread_counts" => UnreadCounts { id, groups },
    "history" => History { id, group, messages, more },
}

/// Walks a frame's map once: see the module documentation.
fn read_frame<'de, M: MapAccess<'de>, F: Frame>(mut map: M) -> Result<F::Value, M::Error> {
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
                let index = map.next_value_seed(TypeSeed(F::TYPES))?;
                let own = F::fields_of(index);
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
        Some((index, _)) => fields.build(index),
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

/// The visitor of a frame enum's map.
struct FrameVisitor<F>(PhantomData<F>);

impl<'de, F: Frame> Visitor<'de> for FrameVisitor<F> {
    type Value = F::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(F::EXPECTING)
    }

    fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<F::Value, M::Error> {
        read_frame::<M, F>(map)
    }
}

#[cfg(test)]
#[path = "frame_de_tests.rs"]
mod tests;
