//! A server frame encoded at most once per encoding, however many connections it goes to.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use shared::{Encoding, Message, ServerFrame};

/// The longest prefix of `messages` whose encoding in `encoding` fits in `max` bytes (at least one
/// message, whose size the frame limit bounds), and whether it cut any. Replies of many messages
/// go through here, so one reply costs a bounded number of bytes.
pub fn within_bytes(
    messages: Vec<Message>,
    encoding: Encoding,
    max: usize,
) -> (Vec<Message>, bool) {
    let mut total = 0;
    let mut keep = 0;
    for m in &messages {
        total += encoding.encode(m).map(|b| b.len()).unwrap_or(0);
        if keep > 0 && total > max {
            break;
        }
        keep += 1;
    }
    let cut = keep < messages.len();
    let mut messages = messages;
    messages.truncate(keep);
    (messages, cut)
}

/// A frame shared by every connection it is sent to. Fan-out to N connections costs one encode per
/// encoding in use, not N.
pub struct EncodedFrame {
    frame: ServerFrame,
    cache: [OnceLock<Option<Bytes>>; 2],
}

impl EncodedFrame {
    pub fn new(frame: ServerFrame) -> Arc<Self> {
        Arc::new(EncodedFrame {
            frame,
            cache: [OnceLock::new(), OnceLock::new()],
        })
    }

    /// The frame itself back.
    pub fn into_frame(self) -> ServerFrame {
        self.frame
    }

    /// The frame's bytes in `encoding`; `None` if it cannot be encoded (logged once).
    pub fn bytes(&self, encoding: Encoding) -> Option<Bytes> {
        self.cache[encoding.index()]
            .get_or_init(|| match encoding.encode(&self.frame) {
                Ok(bytes) => Some(Bytes::from(bytes)),
                Err(e) => {
                    tracing::error!(error = %e, ?encoding, "cannot encode a server frame");
                    None
                }
            })
            .clone()
    }
}
