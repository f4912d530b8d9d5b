//! Where a group's local members may have missed messages: ranges of message ids, each from the
//! last one passed on before events stopped to the first one heard live after. A node can lose
//! its subscriber several times before a re-read runs (Redis killed twice within a second), so
//! there can be several gaps, each with messages heard live between them that must not be lost
//! nor, where it can be helped, repeated.

use shared::Message;

/// Gaps kept per group before the oldest two are merged: a merged gap also covers what was heard
/// live between them, so a member may get such a message twice (same `msg_id`), never not at all.
const MAX_GAPS: usize = 8;

#[derive(Default, Debug)]
pub(super) struct Gaps {
    list: Vec<Gap>,
}

#[derive(Debug)]
struct Gap {
    /// Messages after this one may be missing.
    start: String,
    /// The first message heard live after the gap opened; `None` while none was.
    end: Option<String>,
    /// The read in flight that covers this gap (its result closes it): a re-read of every group,
    /// or the fill of one group just subscribed. A later read takes the gap over.
    reading: Option<u64>,
}

impl Gaps {
    pub(super) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Events stopped (or may have) after `last`: a gap starts there, unless one is open already
    /// and no re-read has started on it (a read in flight may have read its history before this
    /// second outage began).
    pub(super) fn open(&mut self, last: &str) {
        if self
            .list
            .iter()
            .any(|g| g.end.is_none() && g.reading.is_none())
        {
            return;
        }
        if self.list.len() >= MAX_GAPS {
            let second = self.list.remove(1);
            let first = &mut self.list[0];
            first.end = second.end;
            first.reading = None;
        }
        self.list.push(Gap {
            start: last.to_string(),
            end: None,
            reading: None,
        });
    }

    /// A message heard live: the open gaps end there.
    pub(super) fn heard(&mut self, id: &str) {
        for gap in self.list.iter_mut().filter(|g| g.end.is_none()) {
            gap.end = Some(id.to_string());
        }
    }

    /// Read `read` starts: where each gap's history read starts. With no gap, everything after
    /// `last` (a re-read scheduled before this group had local members).
    pub(super) fn start_reading(&mut self, last: &str, read: u64) -> Vec<String> {
        if self.list.is_empty() {
            self.open(last);
        }
        self.list
            .iter_mut()
            .map(|g| {
                g.reading = Some(read);
                g.start.clone()
            })
            .collect()
    }

    /// Read `read` failed: its gaps wait for the next one.
    pub(super) fn read_failed(&mut self, read: u64) {
        for gap in self.list.iter_mut().filter(|g| g.reading == Some(read)) {
            gap.reading = None;
        }
    }

    /// Of the messages read `read` found, those inside one of its gaps, in id order and once
    /// each; those gaps are closed. `last` is the newest message passed on: after an open gap's
    /// start, only what follows it was missed.
    pub(super) fn missed(
        &mut self,
        mut messages: Vec<Message>,
        last: &str,
        read: u64,
    ) -> Vec<Message> {
        let (reading, kept): (Vec<Gap>, Vec<Gap>) = std::mem::take(&mut self.list)
            .into_iter()
            .partition(|g| g.reading == Some(read));
        self.list = kept;
        messages.sort_by(|a, b| a.msg_id.cmp(&b.msg_id));
        messages.dedup_by(|a, b| a.msg_id == b.msg_id);
        messages.retain(|m| {
            reading.iter().any(|g| {
                m.msg_id > g.start
                    && match &g.end {
                        Some(end) => m.msg_id < *end,
                        None => m.msg_id.as_str() > last,
                    }
            })
        });
        messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str) -> Message {
        Message {
            msg_id: id.to_string(),
            from: "u".into(),
            to: shared::Destination::Group { group: "g".into() },
            body: shared::Body::Nil,
            sent_at: 0,
            offline: None,
        }
    }

    fn ids(messages: &[Message]) -> Vec<&str> {
        messages.iter().map(|m| m.msg_id.as_str()).collect()
    }

    fn history(ids: &[&str]) -> Vec<Message> {
        ids.iter().map(|id| msg(id)).collect()
    }

    #[test]
    fn two_outages_before_the_reread_keep_both_gaps() {
        let mut gaps = Gaps::default();
        gaps.open("a");
        gaps.heard("c"); // first outage ends: b was missed
        gaps.open("d"); // heard up to d, then the second outage: e was missed
        gaps.heard("f");
        let starts = gaps.start_reading("f", 1);
        assert_eq!(starts, ["a", "d"]);
        let read = [history(&["b", "c", "d", "e", "f"]), history(&["e", "f"])].concat();
        assert_eq!(ids(&gaps.missed(read, "f", 1)), ["b", "e"]);
        assert!(gaps.list.is_empty());
    }

    #[test]
    fn an_open_gap_covers_everything_after_what_was_passed_on() {
        let mut gaps = Gaps::default();
        gaps.open("a");
        gaps.open("a"); // another error of the same outage
        assert_eq!(gaps.start_reading("a", 1), ["a"]);
        assert_eq!(ids(&gaps.missed(history(&["b", "c"]), "a", 1)), ["b", "c"]);
    }

    #[test]
    fn an_outage_during_a_read_opens_a_gap_the_read_does_not_close() {
        let mut gaps = Gaps::default();
        gaps.open("a");
        gaps.start_reading("a", 1);
        gaps.open("a"); // the read may have run before this outage's messages were sent
        assert_eq!(ids(&gaps.missed(history(&["b"]), "a", 1)), ["b"]);
        assert_eq!(gaps.start_reading("b", 1), ["a"]);
    }

    #[test]
    fn a_failed_read_leaves_the_gaps_for_the_next() {
        let mut gaps = Gaps::default();
        gaps.open("a");
        gaps.heard("c");
        gaps.start_reading("c", 1);
        gaps.read_failed(1);
        gaps.open("c");
        assert_eq!(gaps.start_reading("c", 1), ["a", "c"]);
    }

    #[test]
    fn without_a_gap_a_read_covers_what_follows_the_last_message() {
        let mut gaps = Gaps::default();
        assert_eq!(gaps.start_reading("b", 1), ["b"]);
        assert_eq!(ids(&gaps.missed(history(&["a", "b", "c"]), "b", 1)), ["c"]);
    }

    #[test]
    fn too_many_gaps_merge_the_oldest_rather_than_lose_one() {
        let mut gaps = Gaps::default();
        for i in 0..MAX_GAPS + 2 {
            gaps.open(&format!("{i}a"));
            gaps.heard(&format!("{i}c"));
        }
        assert_eq!(gaps.list.len(), MAX_GAPS);
        let starts = gaps.start_reading("9c", 1);
        assert_eq!(starts[0], "0a");
        let read = history(&["0b", "1b", "2b", "9b"]);
        // 0b..2b: the merged gaps cover them (and 1a..1c, heard live, would be repeated).
        assert_eq!(ids(&gaps.missed(read, "9c", 1)), ["0b", "1b", "2b", "9b"]);
    }

    #[test]
    fn a_read_closes_only_the_gaps_it_still_covers() {
        let mut gaps = Gaps::default();
        gaps.open("a");
        gaps.heard("c");
        gaps.start_reading("c", 1);
        gaps.open("d");
        assert_eq!(gaps.start_reading("d", 2), ["a", "d"]);
        // Read 1 ends after read 2 took its gap over: it closes nothing.
        assert!(gaps.missed(history(&["b"]), "d", 1).is_empty());
        assert_eq!(ids(&gaps.missed(history(&["b", "e"]), "d", 2)), ["b", "e"]);
    }
}
