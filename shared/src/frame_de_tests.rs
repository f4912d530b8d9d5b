//! The hand-written frame decoder against serde's derived one, which it replaces: on generated
//! frames (valid ones, then mutated: keys moved, dropped, repeated, renamed, values swapped for
//! values of other types, nested values changed), both encodings must accept exactly the same
//! frames and decode them to the same value. The only difference allowed is the one the module
//! documents: integer top-level keys, which the derive read as field positions, are refused.

use std::collections::BTreeMap;
use std::io::Cursor;

use rmpv::Value;
use serde::Deserialize;

use crate::protocol::{
    Body, ClientFrame, Destination, ErrorCode, Message, Platform, Presence, RouteResult,
    ServerFrame, Status,
};
use crate::{Encoding, FrameError};

/// The derive as it was, through serde's remote derive (same variants, fields and attributes).
mod reference {
    use super::*;

    #[derive(Deserialize)]
    #[serde(remote = "ClientFrame", tag = "type", rename_all = "snake_case")]
    pub enum ClientFrameRef {
        Ping {
            #[serde(default)]
            id: Option<u64>,
        },
        SetStatus {
            #[serde(default)]
            id: Option<u64>,
            status: Status,
            #[serde(default)]
            text: Option<String>,
        },
        Subscribe {
            #[serde(default)]
            id: Option<u64>,
            users: Vec<String>,
        },
        Unsubscribe {
            #[serde(default)]
            id: Option<u64>,
            users: Vec<String>,
        },
        Query {
            #[serde(default)]
            id: Option<u64>,
            users: Vec<String>,
        },
        Join {
            #[serde(default)]
            id: Option<u64>,
            group: String,
        },
        Leave {
            #[serde(default)]
            id: Option<u64>,
            group: String,
        },
        GroupOnline {
            #[serde(default)]
            id: Option<u64>,
            group: String,
        },
        Send {
            #[serde(default)]
            id: Option<u64>,
            to: Destination,
            body: Body,
        },
        AckOffline {
            #[serde(default)]
            id: Option<u64>,
            up_to: String,
        },
        Sync {
            #[serde(default)]
            id: Option<u64>,
            group: String,
            #[serde(default)]
            since: Option<String>,
            #[serde(default)]
            limit: Option<u32>,
        },
        Read {
            #[serde(default)]
            id: Option<u64>,
            group: String,
            up_to: String,
        },
        Unread {
            #[serde(default)]
            id: Option<u64>,
        },
    }

    #[derive(Deserialize)]
    #[serde(remote = "ServerFrame", tag = "type", rename_all = "snake_case")]
    pub enum ServerFrameRef {
        Welcome {
            conn_id: String,
            user: String,
            platform: Platform,
            node: String,
            heartbeat_ms: u64,
            server_time: u64,
        },
        Pong {
            #[serde(default)]
            id: Option<u64>,
        },
        Ok {
            #[serde(default)]
            id: Option<u64>,
        },
        Error {
            #[serde(default)]
            id: Option<u64>,
            code: ErrorCode,
            message: String,
        },
        Presence(Presence),
        PresenceList {
            #[serde(default)]
            id: Option<u64>,
            items: Vec<Presence>,
        },
        MemberList {
            #[serde(default)]
            id: Option<u64>,
            group: String,
            users: Vec<String>,
        },
        Message(Message),
        Ack {
            #[serde(default)]
            id: Option<u64>,
            msg_id: String,
            result: RouteResult,
            delivered: u64,
            stored: u64,
        },
        UnreadCounts {
            #[serde(default)]
            id: Option<u64>,
            groups: BTreeMap<String, u64>,
        },
        History {
            #[serde(default)]
            id: Option<u64>,
            group: String,
            messages: Vec<Message>,
            more: bool,
        },
    }

    #[derive(Deserialize)]
    pub struct Client(#[serde(with = "ClientFrameRef")] pub ClientFrame);

    #[derive(Deserialize)]
    pub struct Server(#[serde(with = "ServerFrameRef")] pub ServerFrame);
}

/// The codec's decode as it was: the same map check, then the derive.
fn reference_decode<T: serde::de::DeserializeOwned>(encoding: Encoding, bytes: &[u8]) -> Option<T> {
    let is_map = match encoding {
        Encoding::MsgPack => matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf)),
        Encoding::Json => bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'),
    };
    if !is_map {
        return None;
    }
    match encoding {
        Encoding::MsgPack => {
            let mut cursor = Cursor::new(bytes);
            let value = T::deserialize(&mut rmp_serde::Deserializer::new(&mut cursor)).ok()?;
            (cursor.position() as usize == bytes.len()).then_some(value)
        }
        Encoding::Json => serde_json::from_slice(bytes).ok(),
    }
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Marks a value that exists only in JSON text: the bytes are written as they are.
const RAW_JSON: i8 = -99;

fn raw_json(text: impl AsRef<[u8]>) -> Value {
    Value::Ext(RAW_JSON, text.as_ref().to_vec())
}

fn map(entries: &[(&str, Value)]) -> Value {
    Value::Map(
        entries
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    )
}

/// Values of every kind, including the shapes serde's buffered reader treats specially.
fn odd_values() -> Vec<Value> {
    let presence = map(&[
        ("user", Value::from("u")),
        ("status", Value::from("online")),
        ("platforms", Value::Array(vec![Value::from(1)])),
        ("version", Value::from(1)),
    ]);
    let message = map(&[
        ("msg_id", Value::from("m")),
        ("from", Value::from("a")),
        ("to", map(&[("user", Value::from("b"))])),
        ("body", Value::from(1)),
        ("sent_at", Value::from(2)),
    ]);
    vec![
        Value::Nil,
        Value::from(true),
        Value::from(false),
        Value::from(0),
        Value::from(1),
        Value::from(4),
        Value::from(7),
        Value::from(12),
        Value::from(200),
        Value::from(256),
        Value::from(70_000),
        Value::from(5_000_000_000u64),
        Value::from(u64::MAX),
        Value::from(-1),
        Value::from(-200),
        Value::from(i64::MIN),
        Value::F32(1.5),
        Value::F64(2.0),
        Value::from(""),
        Value::from("online"),
        Value::from("busy"),
        Value::from("offline"),
        Value::from("stored"),
        Value::from("internal"),
        Value::from("bob"),
        Value::from("m1"),
        Value::from("ping"),
        Value::Binary(b"online".to_vec()),
        Value::Binary(b"bob".to_vec()),
        Value::Binary(vec![0xff, 0xfe]),
        Value::Binary(vec![]),
        Value::Binary(vec![1, 3]),
        Value::Ext(5, vec![1, 2, 3]),
        Value::Array(vec![]),
        Value::Array(vec![Value::from("a"), Value::from("b")]),
        Value::Array(vec![Value::from(1), Value::from(2)]),
        Value::Array(vec![Value::from(1), Value::from(300)]),
        Value::Array(vec![Value::Nil]),
        Value::Array(vec![Value::from("online")]),
        Value::Array(vec![Value::from("bob"), Value::Nil, Value::Nil]),
        Value::Array(vec![presence.clone()]),
        Value::Array(vec![message.clone()]),
        Value::Array(vec![Value::Map(vec![])]),
        Value::Array(vec![Value::Array(vec![Value::from(1)])]),
        Value::Map(vec![]),
        map(&[("online", Value::Nil)]),
        map(&[("online", Value::Map(vec![]))]),
        map(&[("online", Value::Array(vec![]))]),
        map(&[("online", Value::from(1))]),
        map(&[("online", Value::Nil), ("busy", Value::Nil)]),
        Value::Map(vec![(Value::from(0), Value::Nil)]),
        Value::Map(vec![(Value::Binary(b"busy".to_vec()), Value::Nil)]),
        map(&[("user", Value::from("bob"))]),
        map(&[("group", Value::from("g"))]),
        map(&[("all", Value::from(true))]),
        map(&[("all", Value::from(false))]),
        map(&[("user", Value::from("a")), ("group", Value::from("b"))]),
        map(&[("user", Value::from("a")), ("user", Value::from("b"))]),
        map(&[("user", Value::from(5))]),
        map(&[("user", Value::Nil)]),
        map(&[("user", Value::from("a")), ("x", Value::from(1))]),
        Value::Map(vec![(Value::from(0), Value::from("bob"))]),
        Value::Map(vec![(Value::from(1), Value::from("g"))]),
        Value::Map(vec![(Value::from(300), Value::from("bob"))]),
        Value::Map(vec![(Value::Binary(b"user".to_vec()), Value::from("bob"))]),
        map(&[("g1", Value::from(3)), ("g2", Value::from(0))]),
        map(&[("g1", Value::from(-3))]),
        presence,
        message,
        raw_json("1e400"),
        raw_json("-0"),
        raw_json("1.0"),
        raw_json("18446744073709551616"),
        raw_json("\"\\ud800\""),
        raw_json("\"\\u0041\\n\""),
        raw_json("\"a\\u0000b\""),
        raw_json("[1,]"),
        raw_json("\"\u{e9}t\u{e9}\""),
        raw_json(b"\"\xff\""),
        raw_json(b"\"a\xc3\""),
        raw_json(b"\"\xed\xa0\x80\""),
    ]
}

/// Keys that some frame (or nested object) has, and a few nobody has.
const KEYS: &[&str] = &[
    "type",
    "id",
    "status",
    "text",
    "users",
    "group",
    "to",
    "body",
    "up_to",
    "since",
    "limit",
    "conn_id",
    "user",
    "platform",
    "node",
    "heartbeat_ms",
    "server_time",
    "code",
    "message",
    "platforms",
    "last_seen",
    "version",
    "items",
    "msg_id",
    "from",
    "sent_at",
    "offline",
    "result",
    "delivered",
    "stored",
    "groups",
    "messages",
    "more",
    "all",
    "extra",
    "Type",
    "",
];

const TYPES: &[&str] = &[
    "ping",
    "set_status",
    "subscribe",
    "join",
    "send",
    "sync",
    "read",
    "unread",
    "welcome",
    "pong",
    "error",
    "presence",
    "presence_list",
    "member_list",
    "message",
    "ack",
    "unread_counts",
    "history",
    "nope",
    "Ping",
];

/// Changes one thing somewhere in `value` (a map, usually a frame).
fn mutate(rng: &mut Rng, value: &mut Value, odd: &[Value], depth: usize) {
    let Value::Map(entries) = value else {
        *value = rng.pick(odd).clone();
        return;
    };
    let key = |rng: &mut Rng| -> Value {
        match rng.below(12) {
            0 => Value::Binary(rng.pick(KEYS).as_bytes().to_vec()),
            1 => Value::from(rng.below(8)),
            2 => Value::from(*rng.pick(&[200u64, 300, 70_000, 5_000_000_000])),
            3 => Value::from(-1),
            4 => Value::Nil,
            _ => Value::from(*rng.pick(KEYS)),
        }
    };
    match rng.below(12) {
        // Move an entry (often `type`) to another place.
        0 | 1 if !entries.is_empty() => {
            let from = rng.below(entries.len());
            let entry = entries.remove(from);
            let to = if rng.below(2) == 0 {
                entries.len()
            } else {
                rng.below(entries.len() + 1)
            };
            entries.insert(to, entry);
        }
        2 if !entries.is_empty() => {
            entries.remove(rng.below(entries.len()));
        }
        // Repeat an entry, with the same or another value.
        3 if !entries.is_empty() => {
            let mut entry = entries[rng.below(entries.len())].clone();
            if rng.below(2) == 0 {
                entry.1 = rng.pick(odd).clone();
            }
            let at = rng.below(entries.len() + 1);
            entries.insert(at, entry);
        }
        4 | 5 if !entries.is_empty() => {
            let i = rng.below(entries.len());
            entries[i].1 = rng.pick(odd).clone();
        }
        6 => {
            let at = rng.below(entries.len() + 1);
            let k = key(rng);
            entries.insert(at, (k, rng.pick(odd).clone()));
        }
        7 if !entries.is_empty() => {
            let i = rng.below(entries.len());
            entries[i].0 = key(rng);
        }
        8 => {
            let t = match rng.below(4) {
                0 => Value::from(rng.below(14)),
                1 => Value::Binary(rng.pick(TYPES).as_bytes().to_vec()),
                _ => Value::from(*rng.pick(TYPES)),
            };
            match entries.iter_mut().find(|(k, _)| k.as_str() == Some("type")) {
                Some(entry) => entry.1 = t,
                None => entries.push((Value::from("type"), t)),
            }
        }
        // Go inside a value.
        _ if !entries.is_empty() && depth < 3 => {
            let i = rng.below(entries.len());
            match &mut entries[i].1 {
                Value::Array(items) if !items.is_empty() => {
                    let j = rng.below(items.len());
                    mutate(rng, &mut items[j], odd, depth + 1);
                }
                Value::Array(items) => items.push(rng.pick(odd).clone()),
                inner => mutate(rng, inner, odd, depth + 1),
            }
        }
        _ => {}
    }
}

fn has_raw_json(value: &Value) -> bool {
    match value {
        Value::Ext(RAW_JSON, _) => true,
        Value::Array(items) => items.iter().any(has_raw_json),
        Value::Map(entries) => entries
            .iter()
            .any(|(k, v)| has_raw_json(k) || has_raw_json(v)),
        _ => false,
    }
}

fn to_msgpack(value: &Value) -> Option<Vec<u8>> {
    if has_raw_json(value) {
        return None;
    }
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, value).ok()?;
    Some(buf)
}

/// JSON text keeping key order and repeated keys; `None` for what JSON cannot hold.
fn to_json(value: &Value) -> Option<Vec<u8>> {
    fn write(value: &Value, out: &mut Vec<u8>) -> Option<()> {
        let push = |out: &mut Vec<u8>, s: &str| out.extend_from_slice(s.as_bytes());
        match value {
            Value::Nil => push(out, "null"),
            Value::Boolean(b) => push(out, if *b { "true" } else { "false" }),
            Value::Integer(i) => push(out, &i.to_string()),
            Value::F32(f) => push(out, &serde_json::to_string(f).ok()?),
            Value::F64(f) => push(out, &serde_json::to_string(f).ok()?),
            Value::String(s) => push(out, &serde_json::to_string(s.as_str()?).ok()?),
            Value::Array(items) => {
                push(out, "[");
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        push(out, ",");
                    }
                    write(item, out)?;
                }
                push(out, "]");
            }
            Value::Map(entries) => {
                push(out, "{");
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        push(out, ",");
                    }
                    push(out, &serde_json::to_string(k.as_str()?).ok()?);
                    push(out, ":");
                    write(v, out)?;
                }
                push(out, "}");
            }
            Value::Ext(RAW_JSON, raw) => out.extend_from_slice(raw),
            Value::Binary(_) | Value::Ext(..) => return None,
        }
        Some(())
    }
    let mut out = Vec::new();
    write(value, &mut out)?;
    Some(out)
}

fn has_integer_key(value: &Value) -> bool {
    matches!(value, Value::Map(entries) if entries.iter().any(|(k, _)| k.is_i64() || k.is_u64()))
}

/// Decodes with both decoders and checks they agree.
fn compare<T>(
    encoding: Encoding,
    bytes: &[u8],
    frame: &Value,
    new: impl Fn(&[u8]) -> Result<T, FrameError>,
    old: impl Fn(&[u8]) -> Option<T>,
) -> bool
where
    T: PartialEq + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let new = new(bytes).ok();
    let old = old(bytes);
    match (&new, &old) {
        (Some(a), Some(b)) => assert_eq!(a, b, "{encoding:?} decodes {frame} differently"),
        (None, None) => {}
        (None, Some(_)) if has_integer_key(frame) => {}
        _ => panic!(
            "{encoding:?}: the hand-written decoder gives {new:?}, the derive {old:?}, for {frame}\n\
             ({})",
            String::from_utf8_lossy(bytes)
        ),
    }
    new.is_some()
}

fn client_seeds() -> Vec<ClientFrame> {
    let body = Value::Map(vec![
        (Value::from("text"), Value::from("hi")),
        (Value::from("n"), Value::Array(vec![Value::from(1)])),
    ]);
    vec![
        ClientFrame::Ping { id: Some(1) },
        ClientFrame::Ping { id: None },
        ClientFrame::SetStatus {
            id: Some(2),
            status: Status::Busy,
            text: Some("in a call".into()),
        },
        ClientFrame::SetStatus {
            id: None,
            status: Status::Online,
            text: None,
        },
        ClientFrame::Subscribe {
            id: Some(3),
            users: vec!["a".into(), "b".into()],
        },
        ClientFrame::Unsubscribe {
            id: Some(4),
            users: vec![],
        },
        ClientFrame::Query {
            id: None,
            users: vec!["c".into()],
        },
        ClientFrame::Join {
            id: Some(5),
            group: "g".into(),
        },
        ClientFrame::Leave {
            id: None,
            group: "g".into(),
        },
        ClientFrame::GroupOnline {
            id: Some(6),
            group: "g".into(),
        },
        ClientFrame::Send {
            id: Some(7),
            to: Destination::User { user: "bob".into() },
            body: body.clone(),
        },
        ClientFrame::Send {
            id: None,
            to: Destination::Group { group: "g".into() },
            body: Value::from("plain"),
        },
        ClientFrame::Send {
            id: Some(8),
            to: Destination::All { all: true },
            body: Value::Binary(vec![0, 1]),
        },
        ClientFrame::AckOffline {
            id: Some(9),
            up_to: "m1".into(),
        },
        ClientFrame::Sync {
            id: Some(10),
            group: "g".into(),
            since: Some("m1".into()),
            limit: Some(50),
        },
        ClientFrame::Sync {
            id: None,
            group: "g".into(),
            since: None,
            limit: None,
        },
        ClientFrame::Read {
            id: Some(11),
            group: "g".into(),
            up_to: "m2".into(),
        },
        ClientFrame::Unread { id: Some(12) },
    ]
}

fn server_seeds() -> Vec<ServerFrame> {
    let presence = Presence {
        user: "bob".into(),
        status: Status::Away,
        platforms: vec![1, 5],
        text: Some("lunch".into()),
        last_seen: Some(5),
        version: 12,
    };
    let message = Message {
        msg_id: "m1".into(),
        from: "alice".into(),
        to: Destination::Group { group: "g".into() },
        body: Value::Map(vec![(Value::from("text"), Value::from("hi"))]),
        sent_at: 7,
        offline: Some(true),
    };
    vec![
        ServerFrame::Welcome {
            conn_id: "c".into(),
            user: "alice".into(),
            platform: 1,
            node: "n".into(),
            heartbeat_ms: 25_000,
            server_time: 1,
        },
        ServerFrame::Pong { id: Some(1) },
        ServerFrame::Ok { id: None },
        ServerFrame::error(Some(3), ErrorCode::BadRequest, "why"),
        ServerFrame::Presence(presence.clone()),
        ServerFrame::Presence(Presence {
            text: None,
            last_seen: None,
            platforms: vec![],
            ..presence.clone()
        }),
        ServerFrame::PresenceList {
            id: Some(4),
            items: vec![presence.clone()],
        },
        ServerFrame::MemberList {
            id: Some(5),
            group: "g".into(),
            users: vec!["a".into()],
        },
        ServerFrame::Message(message.clone()),
        ServerFrame::Message(Message {
            offline: None,
            to: Destination::All { all: true },
            ..message.clone()
        }),
        ServerFrame::Ack {
            id: Some(6),
            msg_id: "m1".into(),
            result: RouteResult::Stored,
            delivered: 0,
            stored: 1,
        },
        ServerFrame::UnreadCounts {
            id: Some(7),
            groups: BTreeMap::from([("g".to_owned(), 2)]),
        },
        ServerFrame::History {
            id: Some(8),
            group: "g".into(),
            messages: vec![message],
            more: false,
        },
    ]
}

fn as_value<T: serde::Serialize>(frame: &T) -> Value {
    let bytes = rmp_serde::to_vec_named(frame).expect("frames encode");
    rmpv::decode::read_value(&mut &bytes[..]).expect("encoded frames are MessagePack")
}

/// Runs `rounds` mutated frames from `seeds` through both decoders in both encodings; returns how
/// many the decoders accepted and refused.
fn differential<T>(
    seeds: &[Value],
    rounds: usize,
    seed: u64,
    new: impl Fn(Encoding, &[u8]) -> Result<T, FrameError>,
    old: impl Fn(Encoding, &[u8]) -> Option<T>,
) -> (usize, usize)
where
    T: PartialEq + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let odd = odd_values();
    let mut rng = Rng(seed);
    let (mut accepted, mut refused) = (0, 0);
    for round in 0..rounds {
        let mut frame = seeds[round % seeds.len()].clone();
        if round >= seeds.len() {
            for _ in 0..1 + rng.below(3) {
                mutate(&mut rng, &mut frame, &odd, 0);
            }
        }
        let mut check = |encoding: Encoding, bytes: &[u8]| {
            if compare(
                encoding,
                bytes,
                &frame,
                |b| new(encoding, b),
                |b| old(encoding, b),
            ) {
                accepted += 1;
            } else {
                refused += 1;
            }
        };
        if let Some(bytes) = to_msgpack(&frame) {
            check(Encoding::MsgPack, &bytes);
        }
        if let Some(text) = to_json(&frame) {
            check(Encoding::Json, &text);
        }
    }
    (accepted, refused)
}

#[test]
fn client_frames_are_decoded_exactly_as_the_derive_did() {
    let seeds: Vec<Value> = client_seeds().iter().map(as_value).collect();
    let (accepted, refused) = differential(
        &seeds,
        60_000,
        0x5eed_0001,
        |e, b| e.decode_client(b),
        |e, b| reference_decode::<reference::Client>(e, b).map(|c| c.0),
    );
    // The mutations must exercise both outcomes, or the comparison proves little.
    assert!(
        accepted > 10_000 && refused > 10_000,
        "{accepted} accepted, {refused} refused"
    );
}

#[test]
fn server_frames_are_decoded_exactly_as_the_derive_did() {
    let seeds: Vec<Value> = server_seeds().iter().map(as_value).collect();
    let (accepted, refused) = differential(
        &seeds,
        60_000,
        0x5eed_0002,
        |e, b| e.decode_server(b),
        |e, b| reference_decode::<reference::Server>(e, b).map(|s| s.0),
    );
    assert!(
        accepted > 10_000 && refused > 10_000,
        "{accepted} accepted, {refused} refused"
    );
}

/// Bodies nested as deep as each format allows (MessagePack's depth limit is 1024, JSON's 128)
/// decode the same way, and within the stack of a tokio worker thread (2 MiB).
#[test]
fn deeply_nested_bodies_decode_as_before_within_a_worker_stack() {
    let run = || {
        for depth in [100, 126, 127, 128, 500, 1000, 1022, 1023, 1024, 1100] {
            let mut body = Value::from(1);
            for _ in 0..depth {
                body = Value::Array(vec![body]);
            }
            let frame = map(&[
                ("type", Value::from("send")),
                ("to", map(&[("user", Value::from("bob"))])),
                ("body", body.clone()),
            ]);
            let late = map(&[
                ("body", body),
                ("to", map(&[("user", Value::from("bob"))])),
                ("type", Value::from("send")),
            ]);
            for frame in [frame, late] {
                for (encoding, bytes) in [
                    (Encoding::MsgPack, to_msgpack(&frame)),
                    (Encoding::Json, to_json(&frame)),
                ] {
                    let bytes = bytes.expect("encodable");
                    compare(
                        encoding,
                        &bytes,
                        &frame,
                        |b| encoding.decode_client(b),
                        |b| reference_decode::<reference::Client>(encoding, b).map(|c| c.0),
                    );
                }
            }
        }
    };
    std::thread::Builder::new()
        .stack_size(if cfg!(debug_assertions) {
            32 << 20
        } else {
            2 << 20
        })
        .spawn(run)
        .expect("thread starts")
        .join()
        .expect("no stack overflow and no difference");
}
