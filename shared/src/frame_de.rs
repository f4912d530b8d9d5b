//! One-pass decoding of frames whose `type` comes first.
//!
//! [`ClientFrame`] and [`ServerFrame`] derive `Deserialize` as internally tagged enums, and that
//! derive is the reference decoder. It reads a frame twice, though: it first buffers the whole map
//! into serde's private `Content` tree (every key and value, allocating as it goes), because
//! `type` may come last, and then deserializes the variant from the tree. Every encoder of these
//! frames writes `type` first, so the codec tries [`TypeFirst`] before the derive: it reads the
//! first key, and if that is `type`, reads the tag as the derive does (a variant identifier: a
//! name, or in MessagePack also a variant index) and decodes the variant from the rest of the same
//! map, with a derived struct per struct variant (`Presence` and `Message` for the newtype ones).
//! Anything else (`type` not first, an empty map) gives `None`, and the codec decodes the frame
//! again with the derive.
//!
//! The variant structs read their values straight from the format, not from the buffered tree,
//! so the few odd values the tree's own rules treated differently (see the encoding section of
//! docs/protocol.md) may fare differently with `type` first; every frame of the contract decodes
//! the same either way, which the tests check in both encodings. Top-level keys must be strings
//! (or MessagePack bins naming a field) in both paths: the derive alone would read an integer key
//! as the position of a field in the variant.
//!
//! The variant table at the end repeats each variant's fields: the compiler checks that it lists
//! every variant with exactly its fields and their types, the tests that it names the variants as
//! the derive does.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::value::{BorrowedBytesDeserializer, BytesDeserializer, MapAccessDeserializer};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::protocol::{
    Body, ClientFrame, Destination, ErrorCode, Message, Outcome, Platform, Presence, RouteResult,
    ServerFrame, Status,
};

/// A frame enum whose variant can be read once its `type` key has been.
pub(crate) trait TagFirst: Sized {
    /// Reads the value of the `type` key just read, then the variant from the rest of `map`.
    fn read_variant<'de, M: MapAccess<'de>>(map: M) -> Result<Self, M::Error>;
}

/// Decodes a frame whose first key is `type`; `None` for any other map, which is then read to its
/// end (its keys checked like every top-level key) so the format sees a whole frame.
pub(crate) struct TypeFirst<T>(PhantomData<T>);

impl<T> TypeFirst<T> {
    pub(crate) fn new() -> Self {
        TypeFirst(PhantomData)
    }
}

impl<'de, T: TagFirst> DeserializeSeed<'de> for TypeFirst<T> {
    type Value = Option<T>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: TagFirst> Visitor<'de> for TypeFirst<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a frame (a map)")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Option<T>, M::Error> {
        match map.next_key::<Key>()? {
            Some(Key(key)) if *key == *b"type" => T::read_variant(map).map(Some),
            Some(_) => {
                map.next_value::<IgnoredAny>()?;
                while map.next_key::<Key>()?.is_some() {
                    map.next_value::<IgnoredAny>()?;
                }
                Ok(None)
            }
            None => Ok(None),
        }
    }
}

/// A top-level key: a str, or a MessagePack bin (which the derive takes for a name too).
struct Key<'de>(Cow<'de, [u8]>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name (frame keys are strings)")
    }

    fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Borrowed(key.as_bytes())))
    }

    fn visit_str<E>(self, key: &str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(key.as_bytes().to_vec())))
    }

    fn visit_borrowed_bytes<E>(self, key: &'de [u8]) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Borrowed(key)))
    }

    fn visit_bytes<E>(self, key: &[u8]) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(key.to_vec())))
    }
}

/// The entries after `type`: every key is checked as a [`Key`], and a second `type` is refused,
/// as the derive refuses it; the variant's struct sees the others.
struct Rest<M>(M);

impl<'de, M: MapAccess<'de>> MapAccess<'de> for Rest<M> {
    type Error = M::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, M::Error> {
        let Some(Key(key)) = self.0.next_key()? else {
            return Ok(None);
        };
        match key {
            key if *key == *b"type" => Err(de::Error::duplicate_field("type")),
            Cow::Borrowed(key) => seed
                .deserialize(BorrowedBytesDeserializer::new(key))
                .map(Some),
            Cow::Owned(key) => seed.deserialize(BytesDeserializer::new(&key)).map(Some),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, M::Error> {
        self.0.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

/// Implements [`TagFirst`] for a frame enum from the list of its variants, in declaration order
/// and with the fields (names and types) each has, or `(Struct)` for a newtype variant around a
/// struct. In `$module`: `Tag`, the `type` names, and one derived struct per struct variant.
macro_rules! tag_first {
    ($frame:ident in $module:ident { $($variant:ident $fields:tt,)* }) => {
        mod $module {
            use super::*;

            #[derive(Deserialize)]
            #[serde(variant_identifier, rename_all = "snake_case")]
            pub(super) enum Tag {
                $($variant,)*
            }

            $(tag_first!(@struct $variant $fields);)*
        }

        // Every variant of the enum must be listed.
        const _: fn(&$frame) = |frame| match frame {
            $($frame::$variant { .. } => {})*
        };

        impl TagFirst for $frame {
            fn read_variant<'de, M: MapAccess<'de>>(mut map: M) -> Result<Self, M::Error> {
                let tag: $module::Tag = map.next_value()?;
                let rest = MapAccessDeserializer::new(Rest(map));
                Ok(match tag {
                    $($module::Tag::$variant => tag_first!(@read $frame $module $variant $fields rest),)*
                })
            }
        }
    };
    (@struct $variant:ident { $($field:ident: $ty:ty),* }) => {
        #[derive(Deserialize)]
        pub(super) struct $variant {
            $(pub(super) $field: $ty,)*
        }
    };
    (@struct $variant:ident ($inner:ident)) => {};
    (@read $frame:ident $module:ident $variant:ident { $($field:ident: $ty:ty),* } $rest:ident) => {{
        let $module::$variant { $($field),* } = Deserialize::deserialize($rest)?;
        $frame::$variant { $($field),* }
    }};
    (@read $frame:ident $module:ident $variant:ident ($inner:ident) $rest:ident) => {
        $frame::$variant($inner::deserialize($rest)?)
    };
}

tag_first!(ClientFrame in client {
    Ping { id: Option<u64> },
    SetStatus { id: Option<u64>, status: Status, text: Option<String> },
    Subscribe { id: Option<u64>, users: Vec<String> },
    Unsubscribe { id: Option<u64>, users: Vec<String> },
    Query { id: Option<u64>, users: Vec<String> },
    Join { id: Option<u64>, group: String },
    Leave { id: Option<u64>, group: String },
    GroupOnline { id: Option<u64>, group: String },
    Send { id: Option<u64>, to: Destination, body: Body, client_msg_id: Option<String> },
    AckOffline { id: Option<u64>, up_to: String },
    Sync { id: Option<u64>, group: String, since: Option<String>, limit: Option<u32> },
    Read { id: Option<u64>, group: String, up_to: String },
    Unread { id: Option<u64> },
    Refresh { id: Option<u64>, token: String },
});

tag_first!(ServerFrame in server {
    Welcome {
        conn_id: String, user: String, platform: Platform, node: String, heartbeat_ms: u64,
        server_time: u64, expires_at: Option<u64>
    },
    Pong { id: Option<u64> },
    Ok { id: Option<u64>, expires_at: Option<u64> },
    Error { id: Option<u64>, code: ErrorCode, message: String, outcome: Option<Outcome> },
    Presence(Presence),
    PresenceList { id: Option<u64>, items: Vec<Presence>, denied: Option<Vec<String>> },
    MemberList { id: Option<u64>, group: String, users: Vec<String> },
    Message(Message),
    Ack { id: Option<u64>, msg_id: String, result: RouteResult, delivered: u64, stored: u64 },
    UnreadCounts { id: Option<u64>, groups: BTreeMap<String, u64> },
    History { id: Option<u64>, group: String, messages: Vec<Message>, more: bool },
});

#[cfg(test)]
#[path = "frame_de_tests.rs"]
mod tests;
