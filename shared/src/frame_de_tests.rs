//! The one-pass decoder against the derive, which stays the reference: every variant with `type`
//! first, in the middle and last, odd frames with `type` first, the documented differences, and
//! deep bodies, in both encodings.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::marker::PhantomData;

use rmpv::Value;
use serde::de::DeserializeOwned;

use super::{TagFirst, TypeFirst};
use crate::Encoding;
use crate::protocol::{
    ClientFrame, Destination, ErrorCode, Message, Outcome, Presence, RouteResult, ServerFrame,
    Status,
};

/// The one-pass decoder alone: `None` when `type` is not the first key.
fn fast<T: TagFirst>(encoding: Encoding, bytes: &[u8]) -> Result<Option<T>, String> {
    encoding.read(bytes, TypeFirst::new())
}

/// The derive alone.
fn derive<T: DeserializeOwned>(encoding: Encoding, bytes: &[u8]) -> Result<T, String> {
    encoding.read(bytes, PhantomData)
}

/// A frame in one encoding, keys in the order given and repeated keys kept.
fn encode(encoding: Encoding, value: &Value) -> Vec<u8> {
    match encoding {
        Encoding::MsgPack => {
            let mut bytes = Vec::new();
            rmpv::encode::write_value(&mut bytes, value).expect("writes to a Vec");
            bytes
        }
        Encoding::Json => serde_json::to_vec(value).expect("JSON holds it"),
    }
}

/// Hand-written JSON in both encodings (rmpv keeps the key order and repeated keys).
fn both(text: &str) -> [(Encoding, Vec<u8>); 2] {
    let value: Value = serde_json::from_str(text).expect("test JSON is valid");
    [
        (Encoding::Json, text.as_bytes().to_vec()),
        (Encoding::MsgPack, encode(Encoding::MsgPack, &value)),
    ]
}

fn as_value<T: serde::Serialize>(frame: &T) -> Value {
    let bytes = rmp_serde::to_vec_named(frame).expect("frames encode");
    rmpv::decode::read_value(&mut &bytes[..]).expect("encoded frames are MessagePack")
}

/// The frame with its `type` entry moved to `at` (clamped to the end).
fn type_at(frame: &Value, at: usize) -> Value {
    let Value::Map(mut entries) = frame.clone() else {
        panic!("frames are maps");
    };
    let tag = entries.remove(0);
    assert_eq!(tag.0.as_str(), Some("type"), "encoders write `type` first");
    entries.insert(at.min(entries.len()), tag);
    Value::Map(entries)
}

fn client_seeds() -> Vec<ClientFrame> {
    let body = Value::Map(vec![
        (Value::from("text"), Value::from("hi")),
        (Value::from("n"), Value::Array(vec![Value::from(1)])),
    ]);
    let users = vec!["a".to_string(), "b".to_string()];
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
            users: users.clone(),
        },
        ClientFrame::Unsubscribe {
            id: Some(4),
            users: vec![],
        },
        ClientFrame::Query { id: None, users },
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
            body,
            client_msg_id: None,
        },
        ClientFrame::Send {
            id: None,
            to: Destination::Group { group: "g".into() },
            body: Value::from("plain"),
            client_msg_id: Some("c-1".into()),
        },
        ClientFrame::Send {
            id: Some(8),
            to: Destination::All { all: true },
            body: Value::Binary(vec![0, 1]),
            client_msg_id: Some("é|{}".into()),
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
        ClientFrame::Unread { id: None },
        ClientFrame::Refresh {
            id: Some(13),
            token: "t".into(),
        },
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
            expires_at: None,
        },
        ServerFrame::Welcome {
            conn_id: "c".into(),
            user: "alice".into(),
            platform: 1,
            node: "n".into(),
            heartbeat_ms: 25_000,
            server_time: 1,
            expires_at: Some(2),
        },
        ServerFrame::Pong { id: Some(1) },
        ServerFrame::ok(None),
        ServerFrame::Ok {
            id: Some(2),
            expires_at: Some(3),
        },
        ServerFrame::error(Some(3), ErrorCode::BadRequest, "why"),
        ServerFrame::send_unavailable(Some(4), Outcome::Unknown),
        ServerFrame::send_unavailable(None, Outcome::NotSent),
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
            denied: None,
        },
        ServerFrame::PresenceList {
            id: Some(4),
            items: vec![presence],
            denied: Some(vec!["bob".into()]),
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

/// Each seed with `type` first, in the middle and last: the derive decodes every order to the
/// same frame (the seed itself in MessagePack; JSON has no bin for binary bodies), the one-pass
/// decoder decodes the first to that frame and leaves the others to the derive, and the codec
/// decodes them all.
fn agree_in_every_order<T>(seeds: &[T], decode: impl Fn(Encoding, &[u8]) -> Option<T>)
where
    T: TagFirst + DeserializeOwned + serde::Serialize + Clone + PartialEq + Debug,
{
    for seed in seeds {
        let value = as_value(seed);
        let len = value.as_map().map_or(0, Vec::len);
        for encoding in Encoding::ALL {
            let first = encode(encoding, &value);
            let expected: T = derive(encoding, &first).expect("the derive decodes every seed");
            if encoding == Encoding::MsgPack {
                assert_eq!(&expected, seed);
            }
            for at in [0, len / 2, len] {
                let moved = type_at(&value, at);
                let bytes = encode(encoding, &moved);
                let type_first = at == 0 || len == 1;
                assert_eq!(
                    fast(encoding, &bytes),
                    Ok(type_first.then(|| expected.clone())),
                    "{encoding:?} {moved}"
                );
                assert_eq!(derive(encoding, &bytes).as_ref(), Ok(&expected));
                assert_eq!(decode(encoding, &bytes).as_ref(), Some(&expected));
            }
        }
    }
}

#[test]
fn every_variant_decodes_alike_with_type_first_in_the_middle_or_last() {
    agree_in_every_order(&client_seeds(), |e, b| e.decode_client(b).ok());
    agree_in_every_order(&server_seeds(), |e, b| e.decode_server(b).ok());
}

/// Odd frames with `type` first: the codec (the one-pass decoder) accepts what the derive accepts,
/// decoded alike, and refuses what it refuses.
fn agree<T>(cases: &[(&str, bool)], decode: impl Fn(Encoding, &[u8]) -> Option<T>)
where
    T: TagFirst + DeserializeOwned + PartialEq + Debug,
{
    for &(text, ok) in cases {
        for (encoding, bytes) in both(text) {
            let decided = !matches!(fast::<T>(encoding, &bytes), Ok(None));
            assert!(decided, "{encoding:?} {text} is left to the derive");
            let reference = derive::<T>(encoding, &bytes).ok();
            assert_eq!(decode(encoding, &bytes), reference, "{encoding:?} {text}");
            assert_eq!(reference.is_some(), ok, "{encoding:?} {text}");
        }
    }
}

#[test]
fn odd_frames_with_type_first_decode_as_the_derive_decodes_them() {
    agree(
        &[
            (r#"{"type":"ping"}"#, true),
            (r#"{"type":"ping","id":null}"#, true),
            (r#"{"type":"ping","type":"ping","id":1}"#, false),
            (r#"{"type":"ping","id":1,"type":"unread"}"#, false),
            (r#"{"type":"ping","id":1,"id":2}"#, false),
            (r#"{"type":"unread","id":18446744073709551615}"#, true),
            (r#"{"type":"unread","id":-1}"#, false),
            (r#"{"type":"join","group":"a","group":"b"}"#, false),
            (
                r#"{"type":"join","group":"g","x":1,"x":{"y":[null]}}"#,
                true,
            ),
            (
                r#"{"type":"join","users":5,"status":"x","to":[],"group":"g"}"#,
                true,
            ),
            (r#"{"type":"join"}"#, false),
            (r#"{"type":"join","group":null}"#, false),
            (r#"{"typ\u0065":"j\u006fin","gr\u006fup":"g"}"#, true),
            (
                r#"{"type":"sync","group":"g","since":null,"limit":null}"#,
                true,
            ),
            (r#"{"type":"sync","group":"g","limit":4294967296}"#, false),
            (r#"{"type":"sync","group":"g","since":5}"#, false),
            (
                r#"{"type":"set_status","status":"busy","text":"\u00e9"}"#,
                true,
            ),
            (r#"{"type":"set_status","status":"ONLINE"}"#, false),
            (r#"{"type":"set_status","status":"away","text":5}"#, false),
            (r#"{"type":"subscribe","users":["a",1]}"#, false),
            (r#"{"type":"subscribe","users":"a"}"#, false),
            (
                r#"{"type":"send","to":{"all":true},"body":{"a":[1,{"b":null}]}}"#,
                true,
            ),
            (r#"{"type":"send","to":{"user":"a"},"body":null}"#, true),
            (r#"{"type":"send","to":{"user":"a"}}"#, false),
            (
                r#"{"type":"send","to":{"user":"a","user":"b"},"body":1}"#,
                false,
            ),
            (
                r#"{"type":"send","to":{"user":"a","group":"b"},"body":1}"#,
                false,
            ),
            (r#"{"type":"send","to":{"all":false},"body":1}"#, false),
            (r#"{"type":"nope","id":1}"#, false),
            (r#"{"type":"Ping"}"#, false),
            (r#"{"type":null}"#, false),
            (r#"{"type":["ping"]}"#, false),
        ],
        |e, b| e.decode_client(b).ok(),
    );
    agree(
        &[
            (
                r#"{"type":"presence","user":"u","status":"online","platforms":[1],"version":1,"id":"x"}"#,
                true,
            ),
            (
                r#"{"type":"presence","user":"u","status":"online","platforms":[256],"version":1}"#,
                false,
            ),
            (
                r#"{"type":"presence","user":"u","status":"online","platforms":[],"version":1,"version":2}"#,
                false,
            ),
            (
                r#"{"type":"message","msg_id":"m","from":"a","to":{"group":"g"},"body":[],"sent_at":1,"offline":null}"#,
                true,
            ),
            (
                r#"{"type":"history","group":"g","messages":[{"msg_id":"m"}],"more":false}"#,
                false,
            ),
            (r#"{"type":"unread_counts","groups":{"g":1,"g":2}}"#, true),
            (r#"{"type":"error","code":"teapot","message":"x"}"#, false),
            (r#"{"type":"ok","id":2,"type":"ok"}"#, false),
        ],
        |e, b| e.decode_server(b).ok(),
    );
    // MessagePack only: bins for names, and the variant index the derive takes for a `type`.
    let frame = |entries: Vec<(Value, Value)>| encode(Encoding::MsgPack, &Value::Map(entries));
    for bytes in [
        frame(vec![
            (Value::Binary(b"type".to_vec()), Value::from("join")),
            (Value::Binary(b"group".to_vec()), Value::from("g")),
        ]),
        frame(vec![(Value::from("type"), Value::Binary(b"ping".to_vec()))]),
        frame(vec![
            (Value::from("type"), Value::from(12)),
            (Value::from("id"), Value::from(1)),
        ]),
        frame(vec![(Value::from("type"), Value::from(13))]),
    ] {
        let reference = derive::<ClientFrame>(Encoding::MsgPack, &bytes).ok();
        assert_eq!(Encoding::MsgPack.decode_client(&bytes).ok(), reference);
    }
}

/// Where the one-pass decoder and the derive differ, as docs/protocol.md says: for inputs outside
/// the contract, the outcome may depend on where `type` is. Pinned so a change is noticed.
#[test]
fn documented_differences_from_the_derive() {
    let client = |encoding: Encoding, text: &str| match encoding {
        Encoding::Json => encoding.decode_client(text.as_bytes()),
        Encoding::MsgPack => {
            let value: Value = serde_json::from_str(text).expect("test JSON is valid");
            encoding.decode_client(&encode(encoding, &value))
        }
    };
    // A unit enum as a one-entry map: only the derive's buffered tree takes `{}` for its unit.
    for encoding in Encoding::ALL {
        let late = r#"{"status":{"online":{}},"type":"set_status"}"#;
        let first = r#"{"type":"set_status","status":{"online":{}}}"#;
        assert!(client(encoding, late).is_ok(), "{encoding:?}");
        assert!(client(encoding, first).is_err(), "{encoding:?}");
    }
    // JSON: unknown fields are only checked for syntax, not read into values, with `type` first.
    assert!(client(Encoding::Json, r#"{"type":"ping","x":1e400,"y":"\ud800"}"#).is_ok());
    assert!(client(Encoding::Json, r#"{"x":1e400,"type":"ping"}"#).is_err());
    assert!(client(Encoding::Json, r#"{"y":"\ud800","type":"ping"}"#).is_err());
    // MessagePack: rmp-serde's own leniencies, which the buffered tree did not have: an enum as
    // its variant index, a bin as an array of bytes.
    assert_eq!(
        client(Encoding::MsgPack, r#"{"type":"set_status","status":1}"#),
        Ok(ClientFrame::SetStatus {
            id: None,
            status: Status::Offline,
            text: None
        })
    );
    assert!(client(Encoding::MsgPack, r#"{"status":1,"type":"set_status"}"#).is_err());
    let bin_users = Value::Map(vec![
        (Value::from("type"), Value::from("query")),
        (Value::from("users"), Value::Binary(vec![])),
    ]);
    let bytes = encode(Encoding::MsgPack, &bin_users);
    assert!(Encoding::MsgPack.decode_client(&bytes).is_ok());
    assert!(derive::<ClientFrame>(Encoding::MsgPack, &bytes).is_err());
    // Non-string top-level keys: the derive reads an integer as a field's position; the codec
    // refuses them wherever `type` is.
    for entries in [
        vec![("type", "subscribe"), ("0", "7"), ("1", "[\"a\"]")],
        vec![("0", "7"), ("type", "subscribe"), ("1", "[\"a\"]")],
    ] {
        let frame = Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| {
                    let key = k
                        .parse::<u64>()
                        .map_or_else(|_| Value::from(k), Value::from);
                    let value = serde_json::from_str(v).unwrap_or_else(|_| Value::from(v));
                    (key, value)
                })
                .collect(),
        );
        let bytes = encode(Encoding::MsgPack, &frame);
        assert!(
            derive::<ClientFrame>(Encoding::MsgPack, &bytes).is_ok(),
            "{frame}"
        );
        assert!(Encoding::MsgPack.decode_client(&bytes).is_err(), "{frame}");
    }
}

/// Bodies nested as deep as each format allows (MessagePack's depth limit is 1024, JSON's 128)
/// decode alike in both paths, within the stack of a tokio worker thread (2 MiB).
#[test]
fn deeply_nested_bodies_decode_alike_within_a_worker_stack() {
    let run = || {
        for depth in [100, 126, 127, 128, 500, 1000, 1022, 1023, 1024, 1100] {
            let mut body = Value::from(1);
            for _ in 0..depth {
                body = Value::Array(vec![body]);
            }
            let to = Value::Map(vec![(Value::from("user"), Value::from("bob"))]);
            let first = Value::Map(vec![
                (Value::from("type"), Value::from("send")),
                (Value::from("to"), to),
                (Value::from("body"), body),
            ]);
            let last = type_at(&first, 2);
            for encoding in Encoding::ALL {
                let first = encode(encoding, &first);
                let last = encode(encoding, &last);
                let reference = derive::<ClientFrame>(encoding, &first).ok();
                assert_eq!(encoding.decode_client(&first).ok(), reference);
                assert_eq!(encoding.decode_client(&last).ok(), reference);
                let limit = if encoding == Encoding::Json {
                    126
                } else {
                    1022
                };
                assert_eq!(reference.is_some(), depth <= limit, "{encoding:?} {depth}");
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
