//! What the messaging scenarios read of a delivered `message` frame: its id, sender, destination
//! and the send time in its body; and a reader that takes just these from a MessagePack frame.
//!
//! Why a reader of its own: at several hundred thousand deliveries per second the load tool spent
//! about half of its CPU decoding frames in full (`Encoding::decode_server`: every key and value,
//! an owned `rmpv::Value` tree for the body, UTF-8 checks of every string, then dropping it all),
//! which made it dearer per delivery than the gateway it measures. [`read`] walks the same bytes
//! without allocating (rmp's `Marker` classifies each value) and borrows the strings it keeps. It
//! answers only for frames it reads exactly as the full decoder would: `type` first and equal to
//! `"message"`, string keys, each field of `Message` at most once and no other, values of the
//! fields' types, nothing after the map. For anything else it answers `None`, and the caller decodes
//! the frame in full, so a frame counts the same either way (the tests check that every frame
//! `read` accepts, of many mutated ones, decodes in full to the same fields).

use rmp::Marker;
use shared::{Body, Destination, Message};

/// Deepest nesting inside a body the reader steps over; deeper bodies are decoded in full.
const MAX_DEPTH: usize = 8;

/// The fields of a delivered message the scenarios count, borrowed from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery<'a> {
    pub msg_id: MsgId<'a>,
    pub from: &'a str,
    pub to: To<'a>,
    /// The body's `ts` (send time, µs since the epoch), as `body_timestamp` reads it.
    pub ts: Option<u64>,
}

/// A message id: the two numbers of the form the gateway writes, `<ms, 13 digits>-<seq, 10
/// digits>`, or any other text. The form is fixed-width, so two ids of that form have the same
/// numbers only when they are the same text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgId<'a> {
    Numeric(u64, u64),
    Text(&'a str),
}

impl<'a> MsgId<'a> {
    pub fn of(id: &'a str) -> Self {
        match numeric_id(id.as_bytes()) {
            Some((ms, seq)) => MsgId::Numeric(ms, seq),
            None => MsgId::Text(id),
        }
    }
}

/// The (ms, seq) of a `<13 digits>-<10 digits>` message id; `None` for any other text.
pub fn numeric_id(id: &[u8]) -> Option<(u64, u64)> {
    if id.len() != 24 || id[13] != b'-' {
        return None;
    }
    Some((digits(&id[..13])?, digits(&id[14..])?))
}

/// The value of a string of ASCII digits (at most 19, so it fits); `None` if any is not one.
fn digits(text: &[u8]) -> Option<u64> {
    text.iter().try_fold(0u64, |n, b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// A message's destination, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To<'a> {
    User(&'a str),
    Group(&'a str),
    All,
}

impl To<'_> {
    pub fn is(&self, d: &Destination) -> bool {
        match (self, d) {
            (To::User(a), Destination::User { user }) => *a == user,
            (To::Group(a), Destination::Group { group }) => *a == group,
            (To::All, Destination::All { all }) => *all,
            _ => false,
        }
    }
}

impl<'a> Delivery<'a> {
    /// The same fields of a message decoded in full.
    pub fn of(msg: &'a Message) -> Self {
        Delivery {
            msg_id: MsgId::of(&msg.msg_id),
            from: &msg.from,
            to: match &msg.to {
                Destination::User { user } => To::User(user),
                Destination::Group { group } => To::Group(group),
                Destination::All { .. } => To::All,
            },
            ts: body_timestamp(&msg.body),
        }
    }
}

/// The send time carried in a body, if it carries one: the value of its first `ts` key, when
/// that is a non-negative integer.
pub fn body_timestamp(body: &Body) -> Option<u64> {
    body.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some("ts"))
        .and_then(|(_, v)| v.as_u64())
}

/// The delivery in a MessagePack `message` frame, or `None` when the frame is anything else or
/// anything the full decoder might read differently (see the module's comment).
pub fn read(frame: &[u8]) -> Option<Delivery<'_>> {
    let mut c = Cursor(frame);
    let entries = c.map_len()?;
    if entries == 0 || c.str()? != b"type" || c.str()? != b"message" {
        return None;
    }
    let (mut msg_id, mut from, mut to, mut ts, mut sent_at, mut offline) =
        (None, None, None, None, None, None);
    for _ in 1..entries {
        let key = c.str()?;
        let fresh = match key {
            b"msg_id" => msg_id.replace(c.msg_id()?).is_none(),
            b"from" => from.replace(c.text()?).is_none(),
            b"to" => to.replace(c.destination()?).is_none(),
            b"body" => ts.replace(c.body()?).is_none(),
            b"sent_at" => sent_at.replace(c.uint()?).is_none(),
            b"offline" => offline.replace(c.optional_bool()?).is_none(),
            _ => false,
        };
        if !fresh {
            return None;
        }
    }
    sent_at?;
    if !c.0.is_empty() {
        return None;
    }
    Some(Delivery {
        msg_id: msg_id?,
        from: from?,
        to: to?,
        ts: ts?,
    })
}

/// Reads MessagePack values off the front of a slice; `None` for malformed input and for what
/// the reader leaves to the full decoder.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn marker(&mut self) -> Option<Marker> {
        let (first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(Marker::from_u8(*first))
    }

    /// A big-endian unsigned number of `n` bytes.
    fn be(&mut self, n: usize) -> Option<u64> {
        Some(
            self.take(n)?
                .iter()
                .fold(0u64, |v, b| v << 8 | u64::from(*b)),
        )
    }

    fn len(&mut self, n: usize) -> Option<usize> {
        usize::try_from(self.be(n)?).ok()
    }

    fn map_len(&mut self) -> Option<usize> {
        match self.marker()? {
            Marker::FixMap(n) => Some(usize::from(n)),
            Marker::Map16 => self.len(2),
            Marker::Map32 => self.len(4),
            _ => None,
        }
    }

    /// A str's bytes (not checked as UTF-8).
    fn str(&mut self) -> Option<&'a [u8]> {
        let n = match self.marker()? {
            Marker::FixStr(n) => usize::from(n),
            Marker::Str8 => self.len(1)?,
            Marker::Str16 => self.len(2)?,
            Marker::Str32 => self.len(4)?,
            _ => return None,
        };
        self.take(n)
    }

    /// A str that is valid UTF-8, as a `String` field needs.
    fn text(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.str()?).ok()
    }

    /// A message id; its numbers without a UTF-8 check when it has the gateway's (ASCII) form.
    fn msg_id(&mut self) -> Option<MsgId<'a>> {
        let raw = self.str()?;
        Some(match numeric_id(raw) {
            Some((ms, seq)) => MsgId::Numeric(ms, seq),
            None => MsgId::Text(std::str::from_utf8(raw).ok()?),
        })
    }

    /// An integer: `Some(Some(n))` when it is non-negative, `Some(None)` when negative.
    fn int(&mut self, marker: Marker) -> Option<Option<u64>> {
        let signed = |v: i64| u64::try_from(v).ok();
        Some(match marker {
            Marker::FixPos(n) => Some(u64::from(n)),
            Marker::U8 => Some(self.be(1)?),
            Marker::U16 => Some(self.be(2)?),
            Marker::U32 => Some(self.be(4)?),
            Marker::U64 => Some(self.be(8)?),
            Marker::FixNeg(_) => None,
            Marker::I8 => signed(i64::from(self.take(1)?[0] as i8)),
            Marker::I16 => signed(i64::from(i16::from_be_bytes(
                self.take(2)?.try_into().ok()?,
            ))),
            Marker::I32 => signed(i64::from(i32::from_be_bytes(
                self.take(4)?.try_into().ok()?,
            ))),
            Marker::I64 => signed(i64::from_be_bytes(self.take(8)?.try_into().ok()?)),
            _ => return None,
        })
    }

    /// A non-negative integer, as a `u64` field needs.
    fn uint(&mut self) -> Option<u64> {
        let marker = self.marker()?;
        self.int(marker)?
    }

    fn optional_bool(&mut self) -> Option<Option<bool>> {
        match self.marker()? {
            Marker::Null => Some(None),
            Marker::True => Some(Some(true)),
            Marker::False => Some(Some(false)),
            _ => None,
        }
    }

    /// `to`: a map of exactly one entry, `user` or `group` with a string, or `all: true`.
    fn destination(&mut self) -> Option<To<'a>> {
        if self.map_len()? != 1 {
            return None;
        }
        match self.str()? {
            b"user" => Some(To::User(self.text()?)),
            b"group" => Some(To::Group(self.text()?)),
            b"all" => (self.optional_bool()? == Some(true)).then_some(To::All),
            _ => None,
        }
    }

    /// Steps over a body; its `ts` as `body_timestamp` reads it.
    fn body(&mut self) -> Option<Option<u64>> {
        let entries = match self.0.first().copied().map(Marker::from_u8) {
            Some(Marker::FixMap(_) | Marker::Map16 | Marker::Map32) => self.map_len()?,
            _ => {
                self.skip(1)?;
                return Some(None);
            }
        };
        let mut ts = None;
        let mut found = false;
        for _ in 0..entries {
            let is_ts = match Marker::from_u8(*self.0.first()?) {
                Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                    self.str()? == b"ts"
                }
                _ => {
                    self.skip(2)?;
                    false
                }
            };
            if is_ts && !found {
                found = true;
                let marker = self.marker()?;
                ts = match marker {
                    Marker::FixPos(_)
                    | Marker::FixNeg(_)
                    | Marker::U8
                    | Marker::U16
                    | Marker::U32
                    | Marker::U64
                    | Marker::I8
                    | Marker::I16
                    | Marker::I32
                    | Marker::I64 => self.int(marker)?,
                    _ => {
                        self.skip_after(marker, 2)?;
                        None
                    }
                };
            } else {
                self.skip(2)?;
            }
        }
        Some(ts)
    }

    /// Steps over one value at nesting level `depth`.
    fn skip(&mut self, depth: usize) -> Option<()> {
        let marker = self.marker()?;
        self.skip_after(marker, depth)
    }

    fn skip_after(&mut self, marker: Marker, depth: usize) -> Option<()> {
        let (bytes, items) = match marker {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
                (0, 0)
            }
            Marker::U8 | Marker::I8 => (1, 0),
            Marker::U16 | Marker::I16 => (2, 0),
            Marker::U32 | Marker::I32 | Marker::F32 => (4, 0),
            Marker::U64 | Marker::I64 | Marker::F64 => (8, 0),
            Marker::FixStr(n) => (usize::from(n), 0),
            Marker::Str8 | Marker::Bin8 => (self.len(1)?, 0),
            Marker::Str16 | Marker::Bin16 => (self.len(2)?, 0),
            Marker::Str32 | Marker::Bin32 => (self.len(4)?, 0),
            Marker::FixArray(n) => (0, usize::from(n)),
            Marker::Array16 => (0, self.len(2)?),
            Marker::Array32 => (0, self.len(4)?),
            Marker::FixMap(n) => (0, 2 * usize::from(n)),
            Marker::Map16 => (0, 2 * self.len(2)?),
            Marker::Map32 => (0, 2 * self.len(4)?),
            // Extensions (which bodies may not carry) and the reserved marker: the full decoder's
            // call.
            _ => return None,
        };
        self.take(bytes)?;
        if items > 0 {
            if depth >= MAX_DEPTH {
                return None;
            }
            for _ in 0..items {
                self.skip(depth + 1)?;
            }
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{Encoding, ServerFrame};

    fn message(to: Destination, body: Body, offline: Option<bool>) -> ServerFrame {
        ServerFrame::Message(Message {
            msg_id: "1764518400000-0000000042".into(),
            from: "lt-g0-m3".into(),
            to,
            body,
            sent_at: 1_764_518_400_000,
            offline,
        })
    }

    fn bodies() -> Vec<Body> {
        vec![
            Body::Map(vec![
                (Body::from("ts"), Body::from(1_764_518_400_123_456u64)),
                (Body::from("seq"), Body::from(7)),
                (Body::from("from"), Body::from(3)),
                (Body::from("pad"), Body::from("x".repeat(64))),
            ]),
            Body::Map(vec![
                (Body::from("seq"), Body::from(7)),
                (Body::from("ts"), Body::from(-5)),
                (Body::from("ts"), Body::from(9)),
            ]),
            Body::Map(vec![
                (Body::from(1), Body::Array(vec![Body::Nil, Body::F64(1.5)])),
                (Body::from("ts"), Body::from(3)),
                (Body::from("ts"), Body::from(4)),
            ]),
            Body::Map(vec![(Body::from("ts"), Body::from("soon"))]),
            Body::Map(vec![(Body::from("ts"), Body::from(300))]),
            Body::Map(vec![(Body::from("ts"), Body::from(u64::MAX))]),
            Body::Map(vec![(
                Body::from("deep"),
                Body::Map(vec![(Body::from("ts"), Body::Binary(vec![1, 2, 3]))]),
            )]),
            Body::from("just text"),
            Body::Nil,
            Body::Array(vec![Body::from(1), Body::from("ts")]),
            Body::Map(vec![]),
        ]
    }

    fn frames() -> Vec<ServerFrame> {
        let mut out = Vec::new();
        for body in bodies() {
            for to in [
                Destination::Group { group: "g".into() },
                Destination::User { user: "u".into() },
                Destination::All { all: true },
            ] {
                for offline in [None, Some(true)] {
                    out.push(message(to.clone(), body.clone(), offline));
                }
            }
        }
        out
    }

    /// What the full decoder makes of `bytes`, as a delivery, if it is a message.
    fn full(bytes: &[u8]) -> Option<(String, String, Destination, Option<u64>)> {
        match Encoding::MsgPack.decode_server(bytes) {
            Ok(ServerFrame::Message(m)) => {
                let ts = body_timestamp(&m.body);
                Some((m.msg_id, m.from, m.to, ts))
            }
            _ => None,
        }
    }

    fn same(d: &Delivery<'_>, f: &(String, String, Destination, Option<u64>)) -> bool {
        d.msg_id == MsgId::of(&f.0) && d.from == f.1 && d.to.is(&f.2) && d.ts == f.3
    }

    #[test]
    fn reads_what_the_encoder_writes_as_the_full_decoder_does() -> anyhow::Result<()> {
        for frame in frames() {
            let bytes = Encoding::MsgPack.encode(&frame)?;
            let d = read(&bytes).ok_or_else(|| anyhow::anyhow!("not read: {frame:?}"))?;
            let f = full(&bytes).ok_or_else(|| anyhow::anyhow!("not decoded: {frame:?}"))?;
            assert!(same(&d, &f), "{d:?} vs {f:?}");
            let ServerFrame::Message(m) = &frame else {
                anyhow::bail!("not a message");
            };
            assert_eq!(d, Delivery::of(m));
        }
        Ok(())
    }

    #[test]
    fn leaves_other_frames_to_the_full_decoder() -> anyhow::Result<()> {
        let others = [
            ServerFrame::Pong { id: Some(1) },
            ServerFrame::Ack {
                id: Some(2),
                msg_id: "m".into(),
                result: shared::RouteResult::Delivered,
                delivered: 3,
                stored: 0,
            },
        ];
        for frame in others {
            assert_eq!(read(&Encoding::MsgPack.encode(&frame)?), None);
        }
        // Not a map, an empty map, `type` not first, an unknown key, a key twice, trailing bytes.
        let mut not_first = vec![0x82];
        rmp::encode::write_str(&mut not_first, "msg_id")?;
        rmp::encode::write_str(&mut not_first, "x")?;
        rmp::encode::write_str(&mut not_first, "type")?;
        rmp::encode::write_str(&mut not_first, "message")?;
        assert_eq!(read(&[0x91, 0x01]), None);
        assert_eq!(read(&[0x80]), None);
        assert_eq!(read(&not_first), None);
        let good = Encoding::MsgPack.encode(&frames()[0])?;
        assert!(read(&good).is_some());
        let mut trailing = good.clone();
        trailing.push(0xc0);
        assert_eq!(read(&trailing), None);
        let mut extra = good.clone();
        extra[0] += 1;
        rmp::encode::write_str(&mut extra, "extra")?;
        rmp::encode::write_nil(&mut extra)?;
        assert_eq!(read(&extra), None);
        let mut twice = good.clone();
        twice[0] += 1;
        rmp::encode::write_str(&mut twice, "sent_at")?;
        rmp::encode::write_uint(&mut twice, 5)?;
        assert_eq!(read(&twice), None);
        Ok(())
    }

    /// Every frame the reader accepts, among truncated and byte-mutated ones, decodes in full to
    /// the same delivery.
    #[test]
    fn accepts_nothing_the_full_decoder_reads_differently() -> anyhow::Result<()> {
        let mut accepted = 0;
        let mut checked = 0;
        for frame in frames() {
            let good = Encoding::MsgPack.encode(&frame)?;
            let mut variants: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
            for i in 0..good.len() {
                for v in [
                    0x00, 0x01, 0x7f, 0x80, 0x81, 0xa0, 0xc0, 0xc1, 0xc3, 0xd9, 0xff,
                ] {
                    let mut b = good.clone();
                    b[i] = v;
                    variants.push(b);
                }
                let mut b = good.clone();
                b[i] ^= 0x20;
                variants.push(b);
            }
            for bytes in variants {
                checked += 1;
                if let Some(d) = read(&bytes) {
                    accepted += 1;
                    let f = full(&bytes)
                        .ok_or_else(|| anyhow::anyhow!("read but not decoded: {bytes:02x?}"))?;
                    assert!(same(&d, &f), "{bytes:02x?}: {d:?} vs {f:?}");
                }
            }
        }
        assert!(
            accepted > 100 && accepted < checked,
            "{accepted} of {checked}"
        );
        Ok(())
    }
}
