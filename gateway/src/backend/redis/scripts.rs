//! The Lua scripts (each in its own `.lua` file beside this one), loading them, and running calls
//! of them as one pipeline that reloads them once if Redis lost them (it restarted).

use fred::{
    prelude::*,
    types::{ClusterHash, CustomCommand, scripts::Script},
    util::redis_keyslot,
};

use super::{RedisBackend, write::NodeSetAdds};
use crate::backend::BackendError;

/// Every script the backend runs, loaded at start and again after a Redis restart.
pub(super) struct Scripts {
    pub write: Script,
    pub index: Script,
    pub online_page: Script,
    pub index_page: Script,
    pub group_send: Script,
    pub private_send: Script,
    pub broadcast: Script,
    pub read: Script,
    pub login: Script,
    pub webhook_enqueue: Script,
    pub webhook_ack: Script,
    pub handover: Script,
    pub handover_sets: Script,
    pub handover_node: Script,
    pub group_add: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Scripts {
            // Both run the index's step: its functions go first in each (a script cannot call
            // another, and `EVALSHA` scripts share no library).
            write: Script::from_lua(concat!(
                include_str!("index_step.lua"),
                include_str!("write.lua")
            )),
            index: Script::from_lua(concat!(
                include_str!("index_step.lua"),
                include_str!("index.lua")
            )),
            online_page: Script::from_lua(include_str!("online_page.lua")),
            index_page: Script::from_lua(include_str!("index_page.lua")),
            group_send: Script::from_lua(include_str!("group_send.lua")),
            private_send: Script::from_lua(include_str!("private_send.lua")),
            broadcast: Script::from_lua(include_str!("broadcast.lua")),
            read: Script::from_lua(include_str!("read.lua")),
            login: Script::from_lua(include_str!("login.lua")),
            webhook_enqueue: Script::from_lua(include_str!("webhook_enqueue.lua")),
            webhook_ack: Script::from_lua(include_str!("webhook_ack.lua")),
            handover: Script::from_lua(include_str!("handover.lua")),
            handover_sets: Script::from_lua(include_str!("handover_sets.lua")),
            handover_node: Script::from_lua(include_str!("handover_node.lua")),
            group_add: Script::from_lua(include_str!("group_add.lua")),
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
            &self.scripts.index,
            &self.scripts.online_page,
            &self.scripts.index_page,
            &self.scripts.group_send,
            &self.scripts.private_send,
            &self.scripts.broadcast,
            &self.scripts.read,
            &self.scripts.login,
            &self.scripts.webhook_enqueue,
            &self.scripts.webhook_ack,
            &self.scripts.handover,
            &self.scripts.handover_sets,
            &self.scripts.handover_node,
            &self.scripts.group_add,
        ] {
            script.load(&self.client).await?;
        }
        Ok(())
    }

    /// Runs script calls (and a node's set additions) as one pipeline, one round trip; reloads
    /// the scripts once if Redis lost them (it restarted). Returns the scripts' replies in order.
    pub(super) async fn run_scripts_with(
        &self,
        op: &'static str,
        calls: &[ScriptCall<'_>],
        sets: Option<(&str, &NodeSetAdds)>,
    ) -> Result<Vec<Value>, BackendError> {
        for attempt in 0..2 {
            let pipeline = self.client.pipeline();
            // The node's sets first: a node killed mid-write (its pipeline cut short) then leaves
            // at worst a user in its set without an entry, which reaping it removes harmlessly;
            // the other way round an entry written but in no set would never be reaped, and its
            // user's offline never published.
            if let Some((node, sets)) = sets {
                sets.queue(&self.keys, node, &pipeline)
                    .await
                    .map_err(|e| Self::not_sent(op, e))?;
            }
            for (script, keys, args) in calls {
                // EVALSHA sha numkeys key...: routed by its first key's slot. fred 10 routes a
                // custom command by its first string argument whatever policy it names (only
                // `Custom` is honoured), which here is the SHA: on a 3-master cluster two calls in
                // three went to the wrong master, came back MOVED and made fred re-read the slot
                // map over a fresh connection (seen in `scale::cluster_masters_share_the_churn`).
                let slot = keys
                    .first()
                    .and_then(|k| k.as_bytes())
                    .map(redis_keyslot)
                    .map_or(ClusterHash::Random, ClusterHash::Custom);
                let evalsha = CustomCommand::new_static("EVALSHA", slot, false);
                let mut argv: Vec<Value> = Vec::with_capacity(2 + keys.len() + args.len());
                argv.push(script.sha1().to_string().into());
                argv.push(Value::Integer(keys.len() as i64));
                argv.extend(keys.iter().cloned());
                argv.extend(args.iter().cloned());
                // Queuing happens before anything is sent.
                let _: () = pipeline
                    .custom(evalsha, argv)
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
            // A failed set addition fails the call too: the caller retries the whole write.
            let mut replies: Vec<Value> = results
                .into_iter()
                .map(|r| r.map_err(|e| Self::error(op, e)))
                .collect::<Result<_, _>>()?;
            replies.drain(..sets.map_or(0, |(_, s)| s.len()).min(replies.len()));
            return Ok(replies);
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
