//! Messages on Redis: sends (one script call per message, pipelined), offline storage and group
//! history in capped streams, read positions and unread counts. Key layout in
//! docs/ARCHITECTURE.md.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use fred::{prelude::*, types::Value};
use shared::{Destination, Message, RouteResult};

use super::{RECORD_TTL_MS, RedisBackend, cmd, envelope, scripts::ScriptCall};
use crate::{
    backend::{
        BackendError, Dedupe, MessageStore, Outgoing, RETRY_DEDUPE, SendOutcome, SendRefused,
        clamp_read_position, parse_msg_id,
    },
    clock::now_ms,
    metrics as m,
};

fn int(n: u64) -> Value {
    Value::Integer(n as i64)
}

#[async_trait]
impl MessageStore for RedisBackend {
    async fn send(
        &self,
        messages: Vec<Outgoing>,
    ) -> Result<Vec<Result<SendOutcome, SendRefused>>, BackendError> {
        self.admit("send")?;
        let now = now_ms();
        let limits = &self.settings.messages;
        let oldest = now.saturating_sub(limits.history_age.as_millis() as u64);
        let mut calls = Vec::with_capacity(messages.len());
        let mut envelopes = Vec::with_capacity(messages.len());
        for out in &messages {
            let env = envelope::encode(out).map_err(|e| BackendError::internal("send", e))?;
            let env_value = Value::Bytes(env.clone().into());
            let (dedupe_key, dedupe_ttl) = self.dedupe_of(out);
            let mut call = match &out.to {
                Destination::User { user } => (
                    &self.scripts.private_send,
                    vec![
                        self.keys.user(user).into(),
                        self.keys.offline(user).into(),
                        self.keys.inbox_channel(user).into(),
                    ],
                    vec![
                        int(now),
                        int(limits.offline_cap as u64),
                        env_value,
                        self.publish_command().into(),
                        int(RECORD_TTL_MS),
                        (if out.may_store { "1" } else { "0" }).into(),
                        int(limits.offline_ttl.as_millis() as u64),
                        // The copy to the sender's other devices, from the script on one Redis:
                        // no second round trip per batch.
                        if self.cluster {
                            "".into()
                        } else {
                            self.copy_channel(out, user).unwrap_or_default().into()
                        },
                    ],
                ),
                Destination::Group { group } => (
                    &self.scripts.group_send,
                    vec![
                        self.keys.members(group).into(),
                        self.keys.group_meta(group).into(),
                        self.keys.history(group).into(),
                        self.keys.group_channel(group).into(),
                    ],
                    vec![
                        out.from.clone().into(),
                        (if out.check_membership { "1" } else { "0" }).into(),
                        int(now),
                        int(limits.history_cap as u64),
                        int(oldest),
                        env_value,
                        self.publish_command().into(),
                    ],
                ),
                Destination::All { .. } => (
                    &self.scripts.broadcast,
                    vec![
                        self.keys.broadcast_seq().into(),
                        self.keys.broadcast_channel().into(),
                    ],
                    vec![int(now), env_value, self.publish_command().into()],
                ),
            };
            // The optional last key and argument: absent, the script remembers nothing.
            if let Some(key) = dedupe_key {
                call.1.push(key.into());
                call.2.push(int(dedupe_ttl));
            }
            calls.push(call);
            envelopes.push(env);
        }
        let results = self.run_scripts("send", &calls).await?;

        let mut outcomes = Vec::with_capacity(messages.len());
        let copies = self.client.pipeline();
        let mut any_copy = false;
        for ((out, env), result) in messages.iter().zip(&envelopes).zip(results) {
            let parts: Vec<Value> = match result {
                Value::Array(parts) => parts,
                _ => {
                    return Err(BackendError::internal(
                        "send",
                        "unexpected send script reply",
                    ));
                }
            };
            let int = |i: usize| parts.get(i).and_then(Value::as_i64).unwrap_or(0);
            let id = |i: usize| parts.get(i).and_then(Value::as_string).unwrap_or_default();
            // The scripts add a last element 1 when they answered from an earlier send.
            let repeat = match &out.to {
                Destination::All { .. } => int(2) == 1,
                _ => int(3) == 1,
            };
            let outcome = match &out.to {
                Destination::User { .. } if int(1) < 0 => Err(SendRefused::StoreQuota),
                Destination::User { .. } if repeat => {
                    let (nodes, stored) = (int(0) as u64, int(1) as u64);
                    Ok(SendOutcome::new(
                        id(2),
                        private_result(stored),
                        nodes,
                        stored,
                    ))
                }
                Destination::User { user } => {
                    let (nodes, stored, msg_id) = (int(0) as u64, int(1) as u64, id(2));
                    // On a cluster the sender's inbox is in another slot than the script's keys:
                    // the copy to their other devices goes out here.
                    if self.cluster
                        && let Some(channel) = self.copy_channel(out, user)
                    {
                        let mut payload = format!("M{msg_id}|").into_bytes();
                        payload.extend_from_slice(env);
                        let args: Vec<Value> = vec![channel.into(), Value::Bytes(payload.into())];
                        let _: () = copies
                            .custom(cmd(self.publish_command()), args)
                            .await
                            .map_err(|e| Self::error("send", e))?;
                        any_copy = true;
                    }
                    Ok(SendOutcome::new(
                        msg_id,
                        private_result(stored),
                        nodes,
                        stored,
                    ))
                }
                Destination::Group { .. } => {
                    let others = int(0);
                    if others < 0 {
                        Err(SendRefused::NotMember)
                    } else {
                        let (nodes, msg_id) = (int(1) as u64, id(2));
                        let result = match (others, nodes) {
                            (0, _) => RouteResult::NoRecipients,
                            (_, 0) => RouteResult::Stored,
                            _ => RouteResult::Delivered,
                        };
                        Ok(SendOutcome::new(msg_id, result, nodes, 0))
                    }
                }
                Destination::All { .. } => {
                    let (nodes, msg_id) = (int(0) as u64, id(1));
                    Ok(SendOutcome::new(msg_id, RouteResult::Delivered, nodes, 0))
                }
            };
            outcomes.push(match outcome {
                Ok(first) if repeat => {
                    count_repeat(out);
                    Ok(first.repeated())
                }
                other => other,
            });
        }
        if any_copy {
            Self::count_round_trip("send");
            let _: Vec<Value> = copies.all().await.map_err(|e| Self::error("send", e))?;
        }
        Ok(outcomes)
    }
    async fn offline_messages(&self, user: &str) -> Result<Vec<Message>, BackendError> {
        self.admit("offline_messages")?;
        Self::count_round_trip("offline");
        let entries: Vec<Value> = self
            .client
            .custom(cmd("XRANGE"), self.offline_range(user))
            .await
            .map_err(|e| Self::error("offline", e))?;
        Ok(Self::offline_from(entries))
    }
    async fn ack_offline(&self, user: &str, up_to: &str) -> Result<(), BackendError> {
        self.admit("ack_offline")?;
        let (ms, seq) = parse_msg_id(up_to)
            .ok_or_else(|| BackendError::internal("offline", "bad message id"))?;
        Self::count_round_trip("offline");
        let _: Value = self
            .client
            .custom(
                cmd("XTRIM"),
                vec![
                    self.keys.offline(user),
                    "MINID".into(),
                    format!("{ms}-{}", seq.saturating_add(1)),
                ],
            )
            .await
            .map_err(|e| Self::error("offline", e))?;
        Ok(())
    }
    async fn history(
        &self,
        group: &str,
        since: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Message>, bool), BackendError> {
        self.admit("history")?;
        let start = match since.and_then(parse_msg_id) {
            Some((ms, seq)) => format!("({ms}-{seq}"),
            None => "-".into(),
        };
        Self::count_round_trip("history");
        let entries: Vec<Value> = self
            .client
            .custom(
                cmd("XRANGE"),
                vec![
                    self.keys.history(group),
                    start,
                    "+".into(),
                    "COUNT".into(),
                    (limit + 1).to_string(),
                ],
            )
            .await
            .map_err(|e| Self::error("history", e))?;
        let oldest = now_ms().saturating_sub(self.settings.messages.history_age.as_millis() as u64);
        let mut messages: Vec<Message> = Self::stream_messages(entries)
            .into_iter()
            .filter(|m| m.sent_at >= oldest)
            .collect();
        let more = messages.len() > limit;
        messages.truncate(limit);
        Ok((messages, more))
    }

    async fn read_position(&self, user: &str, group: &str) -> Result<Option<String>, BackendError> {
        self.admit("read_position")?;
        Self::count_round_trip("read");
        self.client
            .custom(
                cmd("HGET"),
                vec![self.keys.read_positions(user), group.to_string()],
            )
            .await
            .map_err(|e| Self::error("read", e))
    }

    async fn set_read_position(
        &self,
        user: &str,
        group: &str,
        up_to: &str,
    ) -> Result<(), BackendError> {
        self.admit("set_read_position")?;
        // The group's last id is read first, in a round trip of its own: its hash and the user's
        // read positions live in different slots of a cluster, so one script cannot touch both.
        // The last id only grows, so a message sent in between is merely left unread.
        Self::count_round_trip("read");
        let meta: Vec<Option<u64>> = self
            .client
            .custom(
                cmd("HMGET"),
                vec![self.keys.group_meta(group), "ms".into(), "seq".into()],
            )
            .await
            .map_err(|e| Self::error("read", e))?;
        let last = match meta.as_slice() {
            [Some(ms), Some(seq)] => Some((*ms, *seq)),
            _ => None,
        };
        let Some(up_to) = clamp_read_position(up_to, last) else {
            return Ok(());
        };
        let call: ScriptCall<'_> = (
            &self.scripts.read,
            vec![self.keys.read_positions(user).into()],
            vec![group.into(), up_to.into()],
        );
        self.run_scripts("read", &[call]).await?;
        Ok(())
    }
    async fn unread(&self, user: &str) -> Result<BTreeMap<String, u64>, BackendError> {
        self.admit("unread")?;
        let pipeline = self.client.pipeline();
        let _: () = pipeline
            .custom(cmd("SMEMBERS"), vec![self.keys.user_groups(user)])
            .await
            .map_err(|e| Self::error("unread", e))?;
        let _: () = pipeline
            .custom(cmd("HGETALL"), vec![self.keys.read_positions(user)])
            .await
            .map_err(|e| Self::error("unread", e))?;
        Self::count_round_trip("unread");
        let (groups, positions): (Vec<String>, HashMap<String, String>) =
            pipeline.all().await.map_err(|e| Self::error("unread", e))?;
        if groups.is_empty() {
            return Ok(BTreeMap::new());
        }
        let pipeline = self.client.pipeline();
        for group in &groups {
            let _: () = pipeline
                .custom(cmd("HGET"), vec![self.keys.group_meta(group), "seq".into()])
                .await
                .map_err(|e| Self::error("unread", e))?;
            let _: () = pipeline
                .custom(cmd("XLEN"), vec![self.keys.history(group)])
                .await
                .map_err(|e| Self::error("unread", e))?;
        }
        Self::count_round_trip("unread");
        let values: Vec<Value> = pipeline.all().await.map_err(|e| Self::error("unread", e))?;
        let mut counts = BTreeMap::new();
        for (group, pair) in groups.iter().zip(values.chunks(2)) {
            let last_seq = pair.first().and_then(Value::as_u64).unwrap_or(0);
            let kept = pair.get(1).and_then(Value::as_u64).unwrap_or(0);
            let read_seq = positions
                .get(group)
                .and_then(|id| parse_msg_id(id))
                .map(|(_, seq)| seq)
                .unwrap_or(0);
            counts.insert(group.clone(), last_seq.saturating_sub(read_seq).min(kept));
        }
        Ok(counts)
    }
}

/// A private message's result: stored for an offline recipient, or delivered live.
fn private_result(stored: u64) -> RouteResult {
    if stored > 0 {
        RouteResult::Stored
    } else {
        RouteResult::Delivered
    }
}

fn count_repeat(out: &Outgoing) {
    let by = match out.dedupe {
        Some(Dedupe::Retry(_)) => "router",
        _ => "client",
    };
    metrics::counter!(m::MESSAGES_DEDUPED, "id" => by).increment(1);
}

impl RedisBackend {
    /// The channel of the sender's inbox, where their other devices get a copy of a private
    /// message; none for a message to oneself or from the app backend.
    fn copy_channel(&self, out: &Outgoing, to: &str) -> Option<String> {
        (out.from != to && out.from != shared::ids::SYSTEM_USER)
            .then(|| self.keys.inbox_channel(&out.from))
    }

    /// A send's dedupe key and how long it lives (ms), if it has an id. Client and router ids
    /// live in namespaces of their own (`c`, `r`), so neither can stand for the other.
    fn dedupe_of(&self, out: &Outgoing) -> (Option<String>, u64) {
        match &out.dedupe {
            Some(Dedupe::Client(id)) => (
                Some(self.keys.dedupe(&out.to, &out.from, &format!("c{id}"))),
                self.settings.messages.dedupe_window.as_millis() as u64,
            ),
            Some(Dedupe::Retry(id)) => (
                Some(self.keys.dedupe(&out.to, &out.from, &format!("r{id}"))),
                RETRY_DEDUPE.as_millis() as u64,
            ),
            None => (None, 0),
        }
    }

    /// Reads stream entries into messages (oldest first), skipping anything unreadable.
    fn stream_messages(entries: Vec<Value>) -> Vec<Message> {
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(mut parts) = entry else {
                continue;
            };
            if parts.len() != 2 {
                continue;
            }
            let fields = parts.pop();
            let id = parts.pop().and_then(|v| v.as_string());
            let (Some(id), Some(Value::Array(fields))) = (id, fields) else {
                continue;
            };
            let Some(id) = envelope::padded(&id) else {
                continue;
            };
            let bytes = fields.get(1).and_then(|v| v.as_bytes()).map(|b| b.to_vec());
            if let Some((message, _)) = bytes.and_then(|b| envelope::decode(id, &b)) {
                out.push(message);
            }
        }
        out
    }

    /// XRANGE arguments for a user's stored messages, oldest first, at most the cap.
    pub(super) fn offline_range(&self, user: &str) -> Vec<String> {
        vec![
            self.keys.offline(user),
            "-".into(),
            "+".into(),
            "COUNT".into(),
            self.settings.messages.offline_cap.to_string(),
        ]
    }

    pub(super) fn offline_from(entries: Vec<Value>) -> Vec<Message> {
        Self::stream_messages(entries)
            .into_iter()
            .map(|mut m| {
                m.offline = Some(true);
                m
            })
            .collect()
    }
}
