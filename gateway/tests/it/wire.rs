//! Broken WebSocket framing from a hand-written client: each violation closes with the code that
//! names it (RFC 6455: 1002 protocol error, 1007 invalid data).

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    client::jwt,
    harness::{Backend, NodeBuilder},
};

/// Opens a WebSocket by hand (JSON subprotocol) and returns the socket after the 101.
async fn handshake(addr: &str, token: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET /ws?token={token}&format=json HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.expect("request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.expect("response");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// A masked client frame (payload under 64 KiB).
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut out = vec![first];
    if payload.len() < 126 {
        out.push(0x80 | payload.len() as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Reads server frames until a close frame; its code.
async fn close_code(tcp: &mut TcpStream) -> u16 {
    let read = async {
        loop {
            let mut head = [0u8; 2];
            tcp.read_exact(&mut head).await.ok()?;
            let mut len = u64::from(head[1] & 0x7f);
            if len == 126 {
                let mut ext = [0u8; 2];
                tcp.read_exact(&mut ext).await.ok()?;
                len = u64::from(u16::from_be_bytes(ext));
            } else if len == 127 {
                let mut ext = [0u8; 8];
                tcp.read_exact(&mut ext).await.ok()?;
                len = u64::from_be_bytes(ext);
            }
            let mut payload = vec![0u8; len as usize];
            tcp.read_exact(&mut payload).await.ok()?;
            if head[0] & 0x0f == 0x8 {
                return Some(u16::from_be_bytes([*payload.first()?, *payload.get(1)?]));
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), read)
        .await
        .expect("closed in time")
        .expect("a close frame with a code")
}

#[tokio::test]
async fn framing_violations_close_with_their_codes() {
    let node = NodeBuilder::new(&Backend::Embedded).start();
    let addr = node.http().trim_start_matches("http://").to_string();
    let cases: [(&str, Vec<u8>, u16); 4] = [
        ("reserved bit", frame(0x80 | 0x40 | 0x1, b"{}"), 1002),
        ("unknown opcode", frame(0x80 | 0x3, b"{}"), 1002),
        (
            "oversize control frame",
            frame(0x80 | 0x9, &[0u8; 126]),
            1002,
        ),
        (
            "text that is not UTF-8",
            frame(0x80 | 0x1, &[0xff, 0xfe]),
            1007,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut tcp = handshake(&addr, &jwt("alice", 1)).await;
        tcp.write_all(&bytes).await.expect("write");
        assert_eq!(close_code(&mut tcp).await, code, "{what}");
    }
}
