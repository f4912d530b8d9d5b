//! Messages on the embedded backend: routing, offline storage, group history and read positions.

use std::collections::BTreeMap;

use async_trait::async_trait;
use shared::{Destination, Message, RouteResult};

use tokio::time::Instant;

use super::{MemoryBackend, dedupe::SendKey};
use crate::{
    backend::{
        Audience, BackendError, BackendEvent, Dedupe, Delivery, MessageStore, Outgoing,
        SendOutcome, SendRefused, Topic, clamp_read_position, msg_id, parse_msg_id,
    },
    clock::now_ms,
    metrics as m,
};

#[async_trait]
impl MessageStore for MemoryBackend {
    async fn send(
        &self,
        messages: Vec<Outgoing>,
    ) -> Result<Vec<Result<SendOutcome, SendRefused>>, BackendError> {
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut events = Vec::new();
        {
            let mut state = self.lock();
            let now = now_ms();
            let limits = &self.settings.messages;
            for out in messages {
                // Router ids need no memory here: a send on this backend cannot fail, so the
                // router never retries one.
                let key = match &out.dedupe {
                    Some(Dedupe::Client(id)) => Some(SendKey::new(&out.from, &out.to, id)),
                    _ => None,
                };
                let seen = key
                    .as_ref()
                    .and_then(|k| state.remembered.get(k, Instant::now()));
                if let Some(first) = seen {
                    metrics::counter!(m::MESSAGES_DEDUPED, "id" => "client").increment(1);
                    outcomes.push(Ok(first.repeated()));
                    continue;
                }
                let outcome = match &out.to {
                    Destination::User { user }
                        if !out.may_store && !state.listens(Topic::Inbox(user.clone())) =>
                    {
                        Err(SendRefused::StoreQuota)
                    }
                    Destination::User { user } => {
                        let inbox = state.stored.entry(user.clone()).or_default();
                        inbox.seq += 1;
                        let message = message_of(&out, msg_id(now, inbox.seq));
                        let online = state.listens(Topic::Inbox(user.clone()));
                        let outcome = if online {
                            events.push(delivery(Audience::User(user.clone()), &message, &out));
                            SendOutcome::new(message.msg_id.clone(), RouteResult::Delivered, 1, 0)
                        } else {
                            let inbox = state.stored.entry(user.clone()).or_default();
                            inbox.messages.push_back(message.clone());
                            while inbox.messages.len() > limits.offline_cap {
                                inbox.messages.pop_front();
                            }
                            SendOutcome::new(message.msg_id.clone(), RouteResult::Stored, 0, 1)
                        };
                        if out.from != *user && state.listens(Topic::Inbox(out.from.clone())) {
                            events.push(delivery(Audience::User(out.from.clone()), &message, &out));
                        }
                        Ok(outcome)
                    }
                    Destination::Group { group } => {
                        let is_member = state
                            .groups
                            .get(group)
                            .is_some_and(|g| g.members.contains(&out.from));
                        if out.check_membership && !is_member {
                            Err(SendRefused::NotMember)
                        } else {
                            let live = state.listens(Topic::Group(group.clone()));
                            let g = state.groups.entry(group.clone()).or_default();
                            g.seq += 1;
                            g.last_message_at = Some(now);
                            let message = message_of(&out, msg_id(now, g.seq));
                            g.history.push_back(message.clone());
                            let oldest = now.saturating_sub(limits.history_age.as_millis() as u64);
                            while g.history.len() > limits.history_cap
                                || g.history.front().is_some_and(|m| m.sent_at < oldest)
                            {
                                g.history.pop_front();
                            }
                            let others = g.members.iter().filter(|m| **m != out.from).count();
                            if live {
                                events.push(delivery(
                                    Audience::Group(group.clone()),
                                    &message,
                                    &out,
                                ));
                            }
                            let result = match (others, live) {
                                (0, _) => RouteResult::NoRecipients,
                                (_, true) => RouteResult::Delivered,
                                (_, false) => RouteResult::Stored,
                            };
                            Ok(SendOutcome::new(message.msg_id, result, u64::from(live), 0))
                        }
                    }
                    Destination::All { .. } => {
                        let message = message_of(&out, msg_id(now, 0));
                        events.push(delivery(Audience::All, &message, &out));
                        Ok(SendOutcome::new(
                            message.msg_id,
                            RouteResult::Delivered,
                            1,
                            0,
                        ))
                    }
                };
                if let (Some(key), Ok(sent)) = (key, &outcome) {
                    state.remembered.insert(key, sent.clone(), Instant::now());
                }
                outcomes.push(outcome);
            }
            metrics::gauge!(m::DEDUPE_ENTRIES).set(state.remembered.len() as f64);
        }
        for event in events {
            let _ = self.events.send(event).await;
        }
        Ok(outcomes)
    }

    async fn offline_messages(&self, user: &str) -> Result<Vec<Message>, BackendError> {
        let oldest = now_ms().saturating_sub(self.settings.messages.offline_ttl.as_millis() as u64);
        let mut state = self.lock();
        if let Some(inbox) = state.stored.get_mut(user) {
            inbox.messages.retain(|m| m.sent_at >= oldest);
        }
        Ok(state
            .stored
            .get(user)
            .map(|i| {
                i.messages
                    .iter()
                    .cloned()
                    .map(|mut m| {
                        m.offline = Some(true);
                        m
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn ack_offline(&self, user: &str, up_to: &str) -> Result<(), BackendError> {
        if let Some(inbox) = self.lock().stored.get_mut(user) {
            inbox.messages.retain(|m| m.msg_id.as_str() > up_to);
        }
        Ok(())
    }

    async fn history(
        &self,
        group: &str,
        since: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Message>, bool), BackendError> {
        let state = self.lock();
        let oldest = now_ms().saturating_sub(self.settings.messages.history_age.as_millis() as u64);
        let Some(g) = state.groups.get(group) else {
            return Ok((Vec::new(), false));
        };
        let mut page: Vec<Message> = g
            .history
            .iter()
            .filter(|m| m.sent_at >= oldest)
            .filter(|m| since.is_none_or(|s| m.msg_id.as_str() > s))
            .take(limit + 1)
            .cloned()
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        Ok((page, more))
    }

    async fn read_position(&self, user: &str, group: &str) -> Result<Option<String>, BackendError> {
        Ok(self
            .lock()
            .read_positions
            .get(user)
            .and_then(|p| p.get(group))
            .cloned())
    }

    async fn set_read_position(
        &self,
        user: &str,
        group: &str,
        up_to: &str,
    ) -> Result<(), BackendError> {
        let mut state = self.lock();
        let last = state
            .groups
            .get(group)
            .and_then(|g| Some((g.last_message_at?, g.seq)));
        let Some(up_to) = clamp_read_position(up_to, last) else {
            return Ok(());
        };
        let positions = state.read_positions.entry(user.to_string()).or_default();
        let current = positions.entry(group.to_string()).or_default();
        if up_to > *current {
            *current = up_to;
        }
        Ok(())
    }

    async fn unread(&self, user: &str) -> Result<BTreeMap<String, u64>, BackendError> {
        let state = self.lock();
        let mut counts = BTreeMap::new();
        for group in state.user_groups.get(user).into_iter().flatten() {
            let Some(g) = state.groups.get(group) else {
                continue;
            };
            let read_seq = state
                .read_positions
                .get(user)
                .and_then(|p| p.get(group))
                .and_then(|id| parse_msg_id(id))
                .map(|(_, seq)| seq)
                .unwrap_or(0);
            let unread = g.seq.saturating_sub(read_seq).min(g.history.len() as u64);
            counts.insert(group.clone(), unread);
        }
        Ok(counts)
    }
}

fn message_of(out: &Outgoing, msg_id: String) -> Message {
    Message {
        msg_id,
        from: out.from.clone(),
        to: out.to.clone(),
        body: out.body.clone(),
        sent_at: out.sent_at,
        offline: None,
    }
}

fn delivery(audience: Audience, message: &Message, out: &Outgoing) -> BackendEvent {
    BackendEvent::Message(Delivery {
        audience,
        message: message.clone(),
        origin: out.origin.clone(),
    })
}
