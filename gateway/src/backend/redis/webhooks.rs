//! The webhook queue on Redis: one stream (`{P}:wh`) read through one consumer group whose
//! consumers are the nodes. `XREADGROUP` claims, the group's pending list remembers who holds
//! what, `XAUTOCLAIM` takes over what a dead node held, `webhook_ack.lua` acks and deletes.
//! Every command carries a COUNT or a bounded list of ids.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::{prelude::*, types::CustomCommand};

use super::{RedisBackend, cmd, cmd_for, scripts::ScriptCall};
use crate::backend::{
    BackendError, ClaimedWebhook, Enqueued, QueuedWebhook, ReclaimCursor, WebhookQueue,
};

/// The consumer group every node reads the stream through.
const GROUP: &str = "delivery";
/// Events per `webhook_enqueue.lua` call and ids per ack or claim command: keeps each
/// script's run (and so Redis's pause for it) short.
const CHUNK: usize = 100;
/// `release` backdates a held event's last delivery by this much: beyond any reclaim's `idle`
/// (the presence TTL, at most a week), so the next reclaim anywhere takes it.
const RELEASED_IDLE_MS: u64 = 30 * 86_400 * 1000;

#[async_trait]
impl WebhookQueue for RedisBackend {
    async fn queued(&self) -> Result<usize, BackendError> {
        self.admit("webhooks")?;
        Self::count_round_trip("webhooks");
        self.client
            .custom(cmd("XLEN"), vec![self.keys.webhooks()])
            .await
            .map_err(|e| Self::error("webhooks", e))
    }

    async fn enqueue(
        &self,
        events: &[QueuedWebhook],
        max: usize,
    ) -> Result<Enqueued, BackendError> {
        let key: Value = self.keys.webhooks().into();
        let mut calls: Vec<ScriptCall<'_>> = Vec::new();
        for chunk in events.chunks(CHUNK) {
            let mut args: Vec<Value> = Vec::with_capacity(1 + 3 * chunk.len());
            args.push(max.to_string().into());
            for e in chunk {
                args.push(e.id.as_str().into());
                args.push(e.at.to_string().into());
                args.push(Value::Bytes(e.body.clone()));
            }
            calls.push((&self.scripts.webhook_enqueue, vec![key.clone()], args));
        }
        let mut done = Enqueued { added: 0, len: 0 };
        for reply in self.run_scripts("webhooks", &calls).await? {
            let Value::Array(parts) = reply else {
                return Err(BackendError::internal("webhooks", "enqueue reply"));
            };
            let mut numbers = parts.iter().map(|v| v.as_u64().unwrap_or(0) as usize);
            done.added += numbers.next().unwrap_or(0);
            done.len = numbers.next().unwrap_or(done.len);
        }
        Ok(done)
    }

    async fn claim(&self, node: &str, max: usize) -> Result<Vec<ClaimedWebhook>, BackendError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let args: Vec<Value> = vec![
            "GROUP".into(),
            GROUP.into(),
            node.into(),
            "COUNT".into(),
            max.to_string().into(),
            "STREAMS".into(),
            self.keys.webhooks().into(),
            ">".into(),
        ];
        // XREADGROUP's key is not its first argument (see `cmd_for`).
        let reply = self
            .grouped(cmd_for("XREADGROUP", &self.keys.webhooks()), args)
            .await?;
        // [[key, [entry, ...]]] (the clients speak RESP2); nil when nothing waits.
        let Value::Array(streams) = reply else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for stream in streams {
            let entries = match stream {
                Value::Array(mut kv) if kv.len() == 2 => kv.pop(),
                other => Some(other),
            };
            if let Some(Value::Array(entries)) = entries {
                out.extend(entries.into_iter().filter_map(claimed_of));
            }
        }
        Ok(out)
    }

    async fn reclaim(
        &self,
        node: &str,
        cursor: &ReclaimCursor,
        max: usize,
        idle: Duration,
    ) -> Result<(Vec<ClaimedWebhook>, ReclaimCursor), BackendError> {
        if max == 0 {
            return Ok((Vec::new(), cursor.clone()));
        }
        let start = if cursor.0.is_empty() {
            "0-0"
        } else {
            cursor.0.as_str()
        };
        let args: Vec<Value> = vec![
            self.keys.webhooks().into(),
            GROUP.into(),
            node.into(),
            (idle.as_millis() as u64).to_string().into(),
            start.into(),
            "COUNT".into(),
            max.to_string().into(),
        ];
        // [next cursor, [entry, ...], [deleted ids]]: entries deleted meanwhile leave the
        // pending list by themselves.
        let Value::Array(mut parts) = self.grouped(cmd("XAUTOCLAIM"), args).await? else {
            return Ok((Vec::new(), ReclaimCursor::start()));
        };
        parts.truncate(2);
        let entries = parts.pop();
        let next = parts
            .pop()
            .and_then(|v| v.as_string())
            .filter(|c| c != "0-0")
            .unwrap_or_default();
        let claimed = match entries {
            Some(Value::Array(entries)) => entries.into_iter().filter_map(claimed_of).collect(),
            _ => Vec::new(),
        };
        Ok((claimed, ReclaimCursor(next)))
    }

    async fn touch(&self, node: &str, entries: &[String]) -> Result<(), BackendError> {
        self.claim_ids(node, entries, None).await
    }

    async fn release(&self, node: &str, entries: &[String]) -> Result<(), BackendError> {
        self.claim_ids(node, entries, Some(RELEASED_IDLE_MS)).await
    }

    async fn ack(&self, entries: &[String]) -> Result<(), BackendError> {
        let key: Value = self.keys.webhooks().into();
        let calls: Vec<ScriptCall<'_>> = entries
            .chunks(CHUNK)
            .map(|chunk| {
                let mut args: Vec<Value> = Vec::with_capacity(1 + chunk.len());
                args.push(GROUP.into());
                args.extend(chunk.iter().map(|id| Value::from(id.as_str())));
                (&self.scripts.webhook_ack, vec![key.clone()], args)
            })
            .collect();
        if calls.is_empty() {
            return Ok(());
        }
        self.run_scripts("webhooks", &calls).await.map(|_| ())
    }
}

impl RedisBackend {
    /// Runs a consumer-group command, creating the group (and the stream) first if Redis does not
    /// know it: at the first start, and after Redis restarted empty.
    async fn grouped(
        &self,
        command: CustomCommand,
        args: Vec<Value>,
    ) -> Result<Value, BackendError> {
        for attempt in 0..2 {
            Self::count_round_trip("webhooks");
            let sent: Result<Value, _> = self.client.custom(command.clone(), args.clone()).await;
            match sent {
                Ok(reply) => return Ok(reply),
                Err(e) if attempt == 0 && e.details().starts_with("NOGROUP") => {
                    self.create_group().await?;
                }
                Err(e) => return Err(Self::error("webhooks", e)),
            }
        }
        Err(BackendError::unavailable("webhooks", "no consumer group"))
    }

    /// `XGROUP CREATE ... 0 MKSTREAM`: from the stream's start, so events added before the group
    /// existed are delivered too. Another node creating it first is fine.
    async fn create_group(&self) -> Result<(), BackendError> {
        Self::count_round_trip("webhooks");
        let created: Result<Value, _> = self
            .client
            .custom(
                cmd_for("XGROUP", &self.keys.webhooks()),
                vec![
                    "CREATE".into(),
                    self.keys.webhooks(),
                    GROUP.into(),
                    "0".into(),
                    "MKSTREAM".into(),
                ],
            )
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e) if e.details().starts_with("BUSYGROUP") => Ok(()),
            Err(e) => Err(Self::error("webhooks", e)),
        }
    }

    /// `XCLAIM ... 0 <ids> [IDLE ms] JUSTID` for `node`: resets (or, with `idle`, backdates) the
    /// entries' last delivery, which is what `XAUTOCLAIM`'s min-idle looks at.
    async fn claim_ids(
        &self,
        node: &str,
        entries: &[String],
        idle: Option<u64>,
    ) -> Result<(), BackendError> {
        for chunk in entries.chunks(CHUNK) {
            let mut args: Vec<Value> = Vec::with_capacity(8 + chunk.len());
            args.push(self.keys.webhooks().into());
            args.push(GROUP.into());
            args.push(node.into());
            args.push("0".into());
            args.extend(chunk.iter().map(|id| Value::from(id.as_str())));
            if let Some(ms) = idle {
                args.push("IDLE".into());
                args.push(ms.to_string().into());
            }
            args.push("JUSTID".into());
            self.grouped(cmd("XCLAIM"), args).await?;
        }
        Ok(())
    }
}

/// One stream entry (`[id, [field, value, ...]]`) as a claimed event; `None` when it is not one
/// this backend wrote (or was deleted meanwhile: nil fields).
fn claimed_of(entry: Value) -> Option<ClaimedWebhook> {
    let Value::Array(mut parts) = entry else {
        return None;
    };
    if parts.len() != 2 {
        return None;
    }
    let fields = parts.pop()?;
    let entry = parts.pop()?.as_string()?;
    let Value::Array(fields) = fields else {
        return None;
    };
    let (mut id, mut at, mut body) = (None, None, None);
    for pair in fields.chunks(2) {
        let [name, value] = pair else { continue };
        match name.as_string().as_deref() {
            Some("id") => id = value.as_string(),
            Some("at") => at = value.as_u64(),
            Some("b") => body = value.as_bytes().map(Bytes::copy_from_slice),
            _ => {}
        }
    }
    Some(ClaimedWebhook {
        entry,
        event: QueuedWebhook {
            id: id?,
            at: at?,
            body: body?,
        },
    })
}
