//! Golden frames for clients in other languages: every server frame as this crate encodes it in
//! both encodings, and every client frame as JSON. The TypeScript SDK's tests decode them
//! (clients/js/test/golden.test.ts), so a change of shape here fails there too.
//!
//! The files are committed; this test fails when they differ from what the crate writes now.
//! `UPDATE_GOLDEN=1 cargo test -p presence-shared --test golden` rewrites them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rmpv::Value;
use shared::{
    ClientFrame, Destination, Encoding, ErrorCode, Message, Outcome, Presence, RouteResult,
    ServerFrame, Status,
};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn body() -> Value {
    Value::Map(vec![
        (Value::from("text"), Value::from("héllo")),
        (Value::from("n"), Value::from(42)),
        (Value::from("ratio"), Value::from(0.5)),
        (
            Value::from("tags"),
            Value::Array(vec![Value::from("a"), Value::Nil, Value::from(true)]),
        ),
        (Value::from("raw"), Value::Binary(vec![0, 1, 254, 255])),
    ])
}

fn bob() -> Presence {
    Presence {
        user: "bob".into(),
        status: Status::Busy,
        platforms: vec![1, 5],
        text: Some("in a meeting".into()),
        last_seen: None,
        version: 1_763_790_000_123,
    }
}

fn carol_offline() -> Presence {
    Presence {
        user: "carol".into(),
        status: Status::Offline,
        platforms: vec![],
        text: None,
        last_seen: Some(1_763_780_000_000),
        version: 1_763_780_000_001,
    }
}

fn message(offline: Option<bool>, to: Destination) -> Message {
    Message {
        msg_id: "1763790000456-0000000001".into(),
        from: "alice".into(),
        to,
        body: body(),
        sent_at: 1_763_790_000_456,
        offline,
    }
}

fn group(g: &str) -> Destination {
    Destination::Group { group: g.into() }
}

fn user(u: &str) -> Destination {
    Destination::User { user: u.into() }
}

fn server_frames() -> Vec<(&'static str, ServerFrame)> {
    vec![
        (
            "welcome",
            ServerFrame::Welcome {
                conn_id: "node-1-7".into(),
                user: "alice".into(),
                platform: 5,
                node: "node-1".into(),
                heartbeat_ms: 25_000,
                server_time: 1_763_790_000_000,
                expires_at: Some(1_763_876_400_000),
            },
        ),
        (
            "welcome_no_expiry",
            ServerFrame::Welcome {
                conn_id: "node-1-8".into(),
                user: "alice".into(),
                platform: 1,
                node: "node-1".into(),
                heartbeat_ms: 25_000,
                server_time: 1_763_790_000_000,
                expires_at: None,
            },
        ),
        ("pong", ServerFrame::Pong { id: Some(3) }),
        ("ok", ServerFrame::ok(Some(4))),
        (
            "ok_refresh",
            ServerFrame::Ok {
                id: Some(5),
                expires_at: Some(1_763_880_000_000),
            },
        ),
        (
            "error",
            ServerFrame::error(Some(6), ErrorCode::Forbidden, "only members may send"),
        ),
        (
            "error_no_id",
            ServerFrame::error(None, ErrorCode::BadRequest, "malformed frame"),
        ),
        (
            "error_send_unavailable",
            ServerFrame::send_unavailable(Some(7), Outcome::Unknown),
        ),
        ("presence", ServerFrame::Presence(bob())),
        ("presence_offline", ServerFrame::Presence(carol_offline())),
        (
            "presence_list",
            ServerFrame::PresenceList {
                id: Some(8),
                items: vec![bob(), carol_offline()],
                denied: None,
            },
        ),
        (
            "presence_list_denied",
            ServerFrame::PresenceList {
                id: Some(9),
                items: vec![bob()],
                denied: Some(vec!["mallory".into()]),
            },
        ),
        (
            "member_list",
            ServerFrame::MemberList {
                id: Some(10),
                group: "team".into(),
                users: vec!["alice".into(), "bob".into()],
            },
        ),
        (
            "message_group",
            ServerFrame::Message(message(None, group("team"))),
        ),
        (
            "message_offline",
            ServerFrame::Message(message(Some(true), user("bob"))),
        ),
        (
            "message_all",
            ServerFrame::Message(Message {
                from: "system".into(),
                ..message(None, Destination::All { all: true })
            }),
        ),
        (
            "ack",
            ServerFrame::Ack {
                id: Some(11),
                msg_id: "1763790000456-0000000001".into(),
                result: RouteResult::Delivered,
                delivered: 2,
                stored: 0,
            },
        ),
        (
            "unread_counts",
            ServerFrame::UnreadCounts {
                id: Some(12),
                groups: BTreeMap::from([("team".into(), 3), ("ops".into(), 0)]),
            },
        ),
        (
            "history",
            ServerFrame::History {
                id: Some(13),
                group: "team".into(),
                messages: vec![
                    message(None, group("team")),
                    Message {
                        msg_id: "1763790000789-0000000002".into(),
                        ..message(None, group("team"))
                    },
                ],
                more: true,
            },
        ),
    ]
}

fn client_frames() -> Vec<(&'static str, ClientFrame)> {
    let users = || vec!["bob".to_string(), "carol".to_string()];
    vec![
        ("ping", ClientFrame::Ping { id: Some(1) }),
        (
            "set_status",
            ClientFrame::SetStatus {
                id: Some(1),
                status: Status::Busy,
                text: Some("in a meeting".into()),
            },
        ),
        (
            "subscribe",
            ClientFrame::Subscribe {
                id: Some(1),
                users: users(),
            },
        ),
        (
            "unsubscribe",
            ClientFrame::Unsubscribe {
                id: Some(1),
                users: users(),
            },
        ),
        (
            "query",
            ClientFrame::Query {
                id: Some(1),
                users: users(),
            },
        ),
        (
            "join",
            ClientFrame::Join {
                id: Some(1),
                group: "team".into(),
            },
        ),
        (
            "leave",
            ClientFrame::Leave {
                id: Some(1),
                group: "team".into(),
            },
        ),
        (
            "group_online",
            ClientFrame::GroupOnline {
                id: Some(1),
                group: "team".into(),
            },
        ),
        (
            "send",
            ClientFrame::Send {
                id: Some(1),
                to: group("team"),
                body: Value::Map(vec![(Value::from("text"), Value::from("hello"))]),
                client_msg_id: Some("c-1".into()),
            },
        ),
        (
            "ack_offline",
            ClientFrame::AckOffline {
                id: Some(1),
                up_to: "1763790000456-0000000001".into(),
            },
        ),
        (
            "sync",
            ClientFrame::Sync {
                id: Some(1),
                group: "team".into(),
                since: Some("1763790000456-0000000001".into()),
                limit: Some(50),
            },
        ),
        (
            "read",
            ClientFrame::Read {
                id: Some(1),
                group: "team".into(),
                up_to: "1763790000456-0000000001".into(),
            },
        ),
        ("unread", ClientFrame::Unread { id: Some(1) }),
        (
            "refresh",
            ClientFrame::Refresh {
                id: Some(1),
                token: "new-token".into(),
            },
        ),
    ]
}

/// Every file this crate would write now, by path under `tests/golden/`.
fn expected() -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for (name, frame) in server_frames() {
        for encoding in Encoding::ALL {
            let bytes = encoding.encode(&frame).expect("encode");
            // MessagePack keeps every frame as it was; JSON turns a binary body into an array
            // of byte values (docs/protocol.md, "Bodies").
            let decoded = encoding.decode_server(&bytes).expect("decode");
            if encoding == Encoding::MsgPack {
                assert_eq!(decoded, frame);
            }
            let ext = match encoding {
                Encoding::MsgPack => "msgpack",
                Encoding::Json => "json",
            };
            files.insert(format!("server/{name}.{ext}"), bytes);
        }
    }
    for (name, frame) in client_frames() {
        let bytes = Encoding::Json.encode(&frame).expect("encode");
        assert_eq!(Encoding::Json.decode_client(&bytes).expect("decode"), frame);
        files.insert(format!("client/{name}.json"), bytes);
    }
    files
}

#[test]
fn golden_frames_match_what_the_crate_writes() {
    let root = dir();
    let files = expected();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        let _ = std::fs::remove_dir_all(&root);
        for (path, bytes) in &files {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
            std::fs::write(&path, bytes).expect("write golden file");
        }
        return;
    }
    let mut stale = Vec::new();
    for (path, bytes) in &files {
        if std::fs::read(root.join(path)).ok().as_deref() != Some(bytes.as_slice()) {
            stale.push(path.clone());
        }
    }
    for sub in ["server", "client"] {
        for entry in std::fs::read_dir(root.join(sub))
            .expect("golden dir")
            .flatten()
        {
            let path = format!("{sub}/{}", entry.file_name().to_string_lossy());
            if !files.contains_key(&path) {
                stale.push(format!("{path} (no longer written)"));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "golden frames differ from what the crate writes: {stale:?}\n\
         rewrite them with `UPDATE_GOLDEN=1 cargo test -p presence-shared --test golden` \
         and make the TypeScript SDK (clients/js) read the new shapes"
    );
}
