//! The two encodings of the wire contract: MessagePack maps with string keys (the default) and JSON.

use std::marker::PhantomData;

use serde::{Deserialize, Serialize, de::DeserializeOwned, de::DeserializeSeed};

use crate::frame_de::{TagFirst, TypeFirst};
use crate::protocol::{ClientFrame, ServerFrame};

/// WebSocket subprotocol that selects MessagePack.
pub const SUBPROTOCOL_MSGPACK: &str = "presence.v1.msgpack";
/// WebSocket subprotocol that selects JSON.
pub const SUBPROTOCOL_JSON: &str = "presence.v1.json";

/// How a connection's frames are encoded. MessagePack frames travel as binary WebSocket messages,
/// JSON frames as text messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Encoding {
    #[default]
    MsgPack,
    Json,
}

impl Encoding {
    pub const ALL: [Encoding; 2] = [Encoding::MsgPack, Encoding::Json];

    /// The encoding a WebSocket subprotocol names, if it names one.
    pub fn from_subprotocol(name: &str) -> Option<Self> {
        match name.trim() {
            SUBPROTOCOL_MSGPACK => Some(Encoding::MsgPack),
            SUBPROTOCOL_JSON => Some(Encoding::Json),
            _ => None,
        }
    }

    /// The encoding a `?format=` query value names, if it names one.
    pub fn from_format(name: &str) -> Option<Self> {
        match name {
            "msgpack" => Some(Encoding::MsgPack),
            "json" => Some(Encoding::Json),
            _ => None,
        }
    }

    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::MsgPack => SUBPROTOCOL_MSGPACK,
            Encoding::Json => SUBPROTOCOL_JSON,
        }
    }

    /// Position in [`Encoding::ALL`], for per-encoding caches.
    pub fn index(self) -> usize {
        match self {
            Encoding::MsgPack => 0,
            Encoding::Json => 1,
        }
    }

    /// Encodes any frame (or frame part) in this encoding.
    pub fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, FrameError> {
        match self {
            Encoding::MsgPack => rmp_serde::to_vec_named(value).map_err(|e| FrameError {
                id: None,
                message: format!("cannot encode MessagePack: {e}"),
            }),
            Encoding::Json => serde_json::to_vec(value).map_err(|e| FrameError {
                id: None,
                message: format!("cannot encode JSON: {e}"),
            }),
        }
    }

    /// Decodes a client frame. On failure the error still carries the frame's `id` when one could be
    /// read, so the `error` reply can name the request it answers.
    pub fn decode_client(self, bytes: &[u8]) -> Result<ClientFrame, FrameError> {
        self.decode(bytes)
    }

    /// Decodes a server frame (for clients and the load tool).
    pub fn decode_server(self, bytes: &[u8]) -> Result<ServerFrame, FrameError> {
        self.decode(bytes)
    }

    fn decode<T: DeserializeOwned + TagFirst>(self, bytes: &[u8]) -> Result<T, FrameError> {
        self.decode_frame(bytes).map_err(|message| FrameError {
            id: self.peek_id(bytes),
            message: format!("malformed frame: {message}"),
        })
    }

    /// One pass when `type` comes first, as every encoder writes it; otherwise the derive, which
    /// buffers the map before it knows the variant (see `frame_de.rs`).
    fn decode_frame<T: DeserializeOwned + TagFirst>(self, bytes: &[u8]) -> Result<T, String> {
        if !self.is_one_map(bytes) {
            return Err("a frame must be one JSON object or one MessagePack map".to_string());
        }
        match self.read(bytes, TypeFirst::new())? {
            Some(frame) => Ok(frame),
            None => self.read(bytes, PhantomData),
        }
    }

    /// Reads one value, which must fill `bytes`, with `seed`.
    pub(crate) fn read<'a, S: DeserializeSeed<'a>>(
        self,
        bytes: &'a [u8],
        seed: S,
    ) -> Result<S::Value, String> {
        match self {
            Encoding::MsgPack => decode_msgpack_exact(bytes, seed),
            Encoding::Json => decode_json(bytes, seed),
        }
    }

    /// Serde would also read a frame written as an array (fields by position); the contract has
    /// maps only, so anything else is refused before decoding.
    fn is_one_map(self, bytes: &[u8]) -> bool {
        match self {
            Encoding::MsgPack => matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf)),
            Encoding::Json => bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'),
        }
    }

    /// Reads just the `id` of a frame that failed to decode as a whole.
    fn peek_id(self, bytes: &[u8]) -> Option<u64> {
        #[derive(serde::Deserialize)]
        struct IdOnly {
            id: Option<u64>,
        }
        if !self.is_one_map(bytes) {
            return None;
        }
        match self {
            Encoding::MsgPack => rmp_serde::from_slice::<IdOnly>(bytes).ok()?.id,
            Encoding::Json => serde_json::from_slice::<IdOnly>(bytes).ok()?.id,
        }
    }
}

/// Decodes one MessagePack value that must fill `bytes` exactly: trailing bytes are an error, as
/// they are for JSON. The deserializer reads `bytes` in place (strings are borrowed, not copied
/// into a buffer first), so the end is checked by reading on: that must fail for want of a marker.
fn decode_msgpack_exact<'a, S: DeserializeSeed<'a>>(
    bytes: &'a [u8],
    seed: S,
) -> Result<S::Value, String> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    let value = seed.deserialize(&mut de).map_err(|e| e.to_string())?;
    match serde::de::IgnoredAny::deserialize(&mut de) {
        Err(rmp_serde::decode::Error::InvalidMarkerRead(e))
            if e.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            Ok(value)
        }
        _ => Err("trailing bytes after the MessagePack map".to_string()),
    }
}

/// Decodes one JSON value. The derive reads, and so UTF-8-checks, every string of a frame, whether
/// its value is kept or not; the text is checked once as a whole instead, which is faster than
/// string by string and refuses the same frames in both paths of the decoder (invalid UTF-8
/// outside a string is a syntax error).
fn decode_json<'a, S: DeserializeSeed<'a>>(bytes: &'a [u8], seed: S) -> Result<S::Value, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("invalid UTF-8: {e}"))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let value = seed.deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(value)
}

/// A frame that could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FrameError {
    /// The request id, when the frame was readable enough to have one.
    pub id: Option<u64>,
    pub message: String,
}
