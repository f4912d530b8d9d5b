//! What frame decoding must do with any bytes, in either encoding: return a frame or an error,
//! never panic. A frame that decodes must encode again, decode from that to the same frame, and
//! read the same through the derive, the reference decoder `codec.rs` falls back to (a
//! re-encoded frame is in the contract's form: `type` first, documented types only). A frame
//! whose bodies pass `check_body` must also encode and decode in the other encoding: every
//! client reads it. Shared by the fuzz targets `frame_msgpack` and `frame_json` and the corpus
//! replay test, so a stored input is judged the same way in both.

use std::fmt::Debug;

use serde::{Serialize, de::DeserializeOwned};
use shared::{ClientFrame, Encoding, FrameError, ServerFrame, body::check_body};

/// Decodes `data` as a client frame and as a server frame in `encoding`.
pub fn check(encoding: Encoding, data: &[u8]) {
    if let Ok(frame) = encoding.decode_client(data) {
        let bodies_ok = match &frame {
            ClientFrame::Send { body, .. } => check_body(body).is_ok(),
            _ => true,
        };
        round_trip(encoding, &frame, bodies_ok, Encoding::decode_client);
    }
    if let Ok(frame) = encoding.decode_server(data) {
        let bodies_ok = match &frame {
            ServerFrame::Message(m) => check_body(&m.body).is_ok(),
            ServerFrame::History { messages, .. } => {
                messages.iter().all(|m| check_body(&m.body).is_ok())
            }
            _ => true,
        };
        round_trip(encoding, &frame, bodies_ok, Encoding::decode_server);
    }
}

fn round_trip<F>(
    encoding: Encoding,
    frame: &F,
    bodies_ok: bool,
    decode: fn(Encoding, &[u8]) -> Result<F, FrameError>,
) where
    F: Serialize + DeserializeOwned + Debug,
{
    let first = match encoding.encode(frame) {
        Ok(bytes) => bytes,
        // A body the server would refuse (a MessagePack map with integer keys) may have no
        // JSON form; nothing else may fail to encode.
        Err(e) => {
            assert!(
                !bodies_ok && encoding == Encoding::Json,
                "{frame:?} decoded from {encoding:?} but does not encode: {e}"
            );
            return;
        }
    };
    let again = decode(encoding, &first)
        .unwrap_or_else(|e| panic!("{frame:?} encoded as {first:?} does not decode: {e}"));
    let second = encoding
        .encode(&again)
        .expect("a frame that encoded once encodes again");
    assert_eq!(
        first, second,
        "{frame:?} changed in a round trip to {again:?}"
    );
    let reference: F = match encoding {
        Encoding::MsgPack => rmp_serde::from_slice(&first).map_err(|e| e.to_string()),
        Encoding::Json => serde_json::from_slice(&first).map_err(|e| e.to_string()),
    }
    .unwrap_or_else(|e| panic!("the derive refuses {first:?}, which the codec read: {e}"));
    let third = encoding
        .encode(&reference)
        .expect("the derive's frame encodes");
    assert_eq!(first, third, "the derive reads {first:?} as {reference:?}");
    if bodies_ok {
        for other in Encoding::ALL {
            let bytes = other
                .encode(frame)
                .unwrap_or_else(|e| panic!("{frame:?} has checked bodies but no {other:?}: {e}"));
            if let Err(e) = decode(other, &bytes) {
                panic!("{frame:?} in {other:?} ({bytes:?}) does not decode: {e}");
            }
        }
    }
}
