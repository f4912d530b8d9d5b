//! The Lua scripts (each in its own `.lua` file beside this one), loading them, and running calls
//! of them as one pipeline that reloads them once if Redis lost them (it restarted).

use fred::{
    prelude::*,
    types::{ClusterHash, CustomCommand, scripts::Script},
};

use super::{RedisBackend, write::SetUpdates};
use crate::backend::BackendError;

/// Every script the backend runs, loaded at start and again after a Redis restart.
pub(super) struct Scripts {
    pub write: Script,
    pub counts: Script,
    pub group_send: Script,
    pub private_send: Script,
    pub broadcast: Script,
    pub read: Script,
    pub login: Script,
    pub webhook_enqueue: Script,
    pub webhook_ack: Script,
    pub handover: Script,
    pub handover_node: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Scripts {
            write: Script::from_lua(include_str!("write.lua")),
            counts: Script::from_lua(include_str!("counts.lua")),
            group_send: Script::from_lua(include_str!("group_send.lua")),
            private_send: Script::from_lua(include_str!("private_send.lua")),
            broadcast: Script::from_lua(include_str!("broadcast.lua")),
            read: Script::from_lua(include_str!("read.lua")),
            login: Script::from_lua(include_str!("login.lua")),
            webhook_enqueue: Script::from_lua(include_str!("webhook_enqueue.lua")),
            webhook_ack: Script::from_lua(include_str!("webhook_ack.lua")),
            handover: Script::from_lua(include_str!("handover.lua")),
            handover_node: Script::from_lua(include_str!("handover_node.lua")),
        }
    }
}

/// One script call of a pipeline: script, keys, arguments (as Values: cloning one on a retry
/// shares its bytes).
pub(super) type ScriptCall<'a> = (&'a Script, Vec<Value>, Vec<Value>);

impl RedisBackend {
    pub(super) async fn load_scripts(&self) -> Result<(), fred::error::Error> {
        for script in [
            &self.scripts.write,
            &self.scripts.counts,
            &self.scripts.group_send,
            &self.scripts.private_send,
            &self.scripts.broadcast,
            &self.scripts.read,
            &self.scripts.login,
            &self.scripts.webhook_enqueue,
            &self.scripts.webhook_ack,
            &self.scripts.handover,
            &self.scripts.handover_node,
        ] {
            script.load(&self.client).await?;
        }
        Ok(())
    }

    /// Runs script calls (and set updates) as one pipeline, one round trip; reloads the scripts
    /// once if Redis lost them (it restarted). Returns the scripts' replies in order.
    pub(super) async fn run_scripts_with(
        &self,
        op: &'static str,
        calls: &[ScriptCall<'_>],
        sets: Option<&SetUpdates>,
    ) -> Result<Vec<Value>, BackendError> {
        for attempt in 0..2 {
            let pipeline = self.client.pipeline();
            // EVALSHA sha numkeys key...: routed by its first key, argument 2.
            let evalsha = CustomCommand::new_static("EVALSHA", ClusterHash::Offset(2), false);
            for (script, keys, args) in calls {
                let mut argv: Vec<Value> = Vec::with_capacity(2 + keys.len() + args.len());
                argv.push(script.sha1().to_string().into());
                argv.push(Value::Integer(keys.len() as i64));
                argv.extend(keys.iter().cloned());
                argv.extend(args.iter().cloned());
                // Queuing happens before anything is sent.
                let _: () = pipeline
                    .custom(evalsha.clone(), argv)
                    .await
                    .map_err(|e| Self::not_sent(op, e))?;
            }
            if let Some(sets) = sets {
                sets.queue(&pipeline)
                    .await
                    .map_err(|e| Self::not_sent(op, e))?;
            }
            Self::count_round_trip(op);
            let results: Vec<Result<Value, fred::error::Error>> = pipeline.try_all().await;
            let noscript = results
                .iter()
                .any(|r| matches!(r, Err(e) if e.details().starts_with("NOSCRIPT")));
            if noscript && attempt == 0 {
                self.load_scripts().await.map_err(|e| Self::error(op, e))?;
                continue;
            }
            return results
                .into_iter()
                .take(calls.len())
                .map(|r| r.map_err(|e| Self::error(op, e)))
                .collect();
        }
        Err(BackendError::unavailable(op, "scripts could not be loaded"))
    }

    pub(super) async fn run_scripts(
        &self,
        op: &'static str,
        calls: &[ScriptCall<'_>],
    ) -> Result<Vec<Value>, BackendError> {
        self.run_scripts_with(op, calls, None).await
    }
}
