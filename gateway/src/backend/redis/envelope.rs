//! How messages travel through Redis: a MessagePack envelope (binary-safe, so bodies pass through
//! untouched) written once to history or offline storage and published as `M<msg_id>|<envelope>`.
//! Membership changes travel on a user's inbox channel as `J<group>` / `L<group>`, the app
//! backend's control of the user's connections as `C<json>`.

use serde::{Deserialize, Serialize};
use shared::{Body, Destination, Message};

use crate::backend::{Control, Origin, Outgoing};

#[derive(Serialize, Deserialize)]
struct Envelope {
    from: String,
    to: Destination,
    body: Body,
    sent_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<Origin>,
}

pub fn encode(out: &Outgoing) -> Result<Vec<u8>, String> {
    rmp_serde::to_vec_named(&Envelope {
        from: out.from.clone(),
        to: out.to.clone(),
        body: out.body.clone(),
        sent_at: out.sent_at,
        origin: out.origin.clone(),
    })
    .map_err(|e| e.to_string())
}

/// A stored envelope back as a message with `msg_id`.
pub fn decode(msg_id: String, bytes: &[u8]) -> Option<(Message, Option<Origin>)> {
    let env: Envelope = rmp_serde::from_slice(bytes).ok()?;
    Some((
        Message {
            msg_id,
            from: env.from,
            to: env.to,
            body: env.body,
            sent_at: env.sent_at,
            offline: None,
        },
        env.origin,
    ))
}

/// What an inbox, group or broadcast channel carried.
pub enum Published {
    Message(Message, Option<Origin>),
    Joined(String),
    Left(String),
    Control(Control),
}

pub fn parse_published(payload: &[u8]) -> Option<Published> {
    let (&kind, rest) = payload.split_first()?;
    match kind {
        b'M' => {
            let bar = rest.iter().position(|b| *b == b'|')?;
            let id = std::str::from_utf8(&rest[..bar]).ok()?;
            let (message, origin) = decode(id.to_string(), &rest[bar + 1..])?;
            Some(Published::Message(message, origin))
        }
        b'J' => Some(Published::Joined(
            std::str::from_utf8(rest).ok()?.to_string(),
        )),
        b'L' => Some(Published::Left(std::str::from_utf8(rest).ok()?.to_string())),
        b'C' => Some(Published::Control(serde_json::from_slice(rest).ok()?)),
        _ => None,
    }
}

/// Stream ids come back without padding (`1700000000000-7`); message ids are padded to sort.
pub fn padded(stream_id: &str) -> Option<String> {
    let (ms, seq) = crate::backend::parse_msg_id(stream_id)?;
    Some(crate::backend::msg_id(ms, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_messages_round_trip_with_binary_bodies() {
        let out = Outgoing {
            from: "a".into(),
            to: Destination::Group { group: "g".into() },
            body: Body::Binary(vec![b'|', 0, 255]),
            sent_at: 5,
            origin: Some(Origin {
                node: "n".into(),
                conn: 7,
            }),
            check_membership: true,
            may_store: true,
            dedupe: None,
        };
        let mut payload = b"M0000000000005-0000000001|".to_vec();
        payload.extend(encode(&out).expect("encodes"));
        let Some(Published::Message(m, origin)) = parse_published(&payload) else {
            panic!("not a message")
        };
        assert_eq!(m.msg_id, "0000000000005-0000000001");
        assert_eq!(m.body, Body::Binary(vec![b'|', 0, 255]));
        assert_eq!(origin.map(|o| o.conn), Some(7));
        assert!(matches!(parse_published(b"Jteam"), Some(Published::Joined(g)) if g == "team"));
        assert_eq!(
            padded("1700000000000-7").as_deref(),
            Some("1700000000000-0000000007")
        );
    }
}
