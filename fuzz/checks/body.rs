//! What `check_body` promises: a body it passes reads the same in both encodings. The first
//! byte of an input picks the encoding the body arrives in (even: MessagePack, odd: JSON), the
//! rest is the body, decoded as the gateway decodes one (serde into `rmpv::Value`). A body that
//! passes is relayed in a `message` frame, which must encode in both encodings and decode back
//! in each (JSON clients get binary as arrays of byte values, so the JSON form is compared
//! after one round of its own). Shared by the fuzz target `body` and the corpus replay test.

use shared::{Body, Destination, Encoding, Message, ServerFrame, body::check_body};

pub fn check(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let body: Body = match if selector % 2 == 0 {
        rmp_serde::from_slice(rest).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(rest).map_err(|e| e.to_string())
    } {
        Ok(body) => body,
        Err(_) => return,
    };
    if check_body(&body).is_err() {
        return;
    }
    let frame = ServerFrame::Message(Message {
        msg_id: "1700000000000-0000000001".into(),
        from: "alice".into(),
        to: Destination::Group { group: "g".into() },
        body,
        sent_at: 1_700_000_000_000,
        offline: None,
    });
    for encoding in Encoding::ALL {
        let bytes = encoding
            .encode(&frame)
            .unwrap_or_else(|e| panic!("checked body, but no {encoding:?}: {e}: {frame:?}"));
        let back = encoding
            .decode_server(&bytes)
            .unwrap_or_else(|e| panic!("{encoding:?} client cannot read {bytes:?}: {e}"));
        let again = encoding.encode(&back).expect("a decoded frame encodes");
        match encoding {
            Encoding::MsgPack => assert_eq!(bytes, again, "MessagePack changed {frame:?}"),
            // JSON loses what it has no form for (binary, f32): one round trip settles it.
            Encoding::Json => {
                let settled = encoding
                    .decode_server(&again)
                    .and_then(|f| encoding.encode(&f))
                    .expect("a settled JSON frame reads back");
                assert_eq!(again, settled, "JSON keeps changing {frame:?}");
            }
        }
        if let ServerFrame::Message(m) = &back
            && let Err(e) = check_body(&m.body)
        {
            panic!(
                "{encoding:?} turned a checked body into one refused ({e}): {:?}",
                m.body
            );
        }
    }
}
