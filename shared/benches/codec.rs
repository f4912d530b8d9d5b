//! Micro-benchmarks of the wire codec (frame decode and encode in MessagePack and JSON) and of
//! `shard_of`: every client frame is decoded once, every server frame encoded once per encoding in
//! use, and every command to a shard hashes a user id first, so these costs bound per-message CPU.
//!
//! Run: `cargo bench -p presence-shared --bench codec -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shared::{
    Body, ClientFrame, Destination, Encoding, Message, Presence, RouteResult, ServerFrame, Status,
    shard::shard_of,
};

fn name(encoding: Encoding) -> &'static str {
    match encoding {
        Encoding::MsgPack => "msgpack",
        Encoding::Json => "json",
    }
}

/// `send` to a user with a small map body, as a chat client sends it.
fn send_frame() -> ClientFrame {
    ClientFrame::Send {
        id: Some(42),
        to: Destination::User {
            user: "user-104729".to_string(),
        },
        body: Body::Map(vec![
            (
                Body::from("text"),
                Body::from("are you coming to the standup?"),
            ),
            (Body::from("kind"), Body::from("chat")),
            (Body::from("seq"), Body::from(17u64)),
            (Body::from("urgent"), Body::from(false)),
        ]),
        client_msg_id: None,
    }
}

/// `subscribe` to 100 users: a contact list opened at connect.
fn subscribe_frame() -> ClientFrame {
    ClientFrame::Subscribe {
        id: Some(7),
        users: (0..100)
            .map(|i| format!("user-{:06}", 100_000 + i))
            .collect(),
    }
}

/// A `presence` event as watchers get it.
fn presence_frame() -> ServerFrame {
    ServerFrame::Presence(Presence {
        user: "user-104729".to_string(),
        status: Status::Busy,
        platforms: vec![1, 3],
        text: Some("in a meeting".to_string()),
        last_seen: None,
        version: 1_767_225_600_123,
    })
}

/// A group `message` whose body is a map holding 200 bytes of text.
fn message_frame() -> ServerFrame {
    ServerFrame::Message(Message {
        msg_id: "1767225600123-0000000042".to_string(),
        from: "user-104729".to_string(),
        to: Destination::Group {
            group: "team-platform".to_string(),
        },
        body: Body::Map(vec![(Body::from("text"), Body::from("x".repeat(200)))]),
        sent_at: 1_767_225_600_123,
        offline: None,
    })
}

/// The `ack` a sender gets for each `send`.
fn ack_frame() -> ServerFrame {
    ServerFrame::Ack {
        id: Some(42),
        msg_id: "1767225600123-0000000042".to_string(),
        result: RouteResult::Delivered,
        delivered: 3,
        stored: 0,
    }
}

fn encoded<T: serde::Serialize>(encoding: Encoding, frame: &T) -> Vec<u8> {
    encoding.encode(frame).expect("bench frames are encodable")
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    let client = [
        ("client_send_small_map", send_frame()),
        ("client_subscribe_100", subscribe_frame()),
    ];
    let server = [
        ("server_presence", presence_frame()),
        ("server_message_200b", message_frame()),
        ("server_ack", ack_frame()),
    ];
    for encoding in Encoding::ALL {
        for (label, frame) in &client {
            let bytes = encoded(encoding, frame);
            let back = encoding.decode_client(&bytes).expect("round trip");
            assert_eq!(&back, frame, "{label} round trip in {}", name(encoding));
            group.bench_with_input(
                BenchmarkId::new(*label, name(encoding)),
                &bytes,
                |b, bytes| b.iter(|| encoding.decode_client(black_box(bytes))),
            );
        }
        for (label, frame) in &server {
            let bytes = encoded(encoding, frame);
            let back = encoding.decode_server(&bytes).expect("round trip");
            assert_eq!(&back, frame, "{label} round trip in {}", name(encoding));
            group.bench_with_input(
                BenchmarkId::new(*label, name(encoding)),
                &bytes,
                |b, bytes| b.iter(|| encoding.decode_server(black_box(bytes))),
            );
        }
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    let server = [
        ("server_presence", presence_frame()),
        ("server_message_200b", message_frame()),
    ];
    for encoding in Encoding::ALL {
        for (label, frame) in &server {
            group.bench_with_input(
                BenchmarkId::new(*label, name(encoding)),
                frame,
                |b, frame| b.iter(|| encoding.encode(black_box(frame))),
            );
        }
        // What a client (and the load tool) encodes most.
        let send = send_frame();
        group.bench_with_input(
            BenchmarkId::new("client_send_small_map", name(encoding)),
            &send,
            |b, frame| b.iter(|| encoding.encode(black_box(frame))),
        );
    }
    group.finish();
}

fn shard_hash(c: &mut Criterion) {
    let mut group = c.benchmark_group("shard_of");
    group.throughput(Throughput::Elements(1));
    let ids = [
        ("short_id", "user-104729".to_string()),
        ("uuid", "3f2a9c1e-8b7d-4e2f-9a61-0c5d7e8f9a10".to_string()),
    ];
    for (label, id) in &ids {
        group.bench_with_input(BenchmarkId::new(*label, 16), id, |b, id| {
            b.iter(|| shard_of(black_box(id), black_box(16)))
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode, shard_hash);
criterion_main!(benches);
