//! Sessions on the embedded backend: one node, so control messages go straight to the node's
//! event sink when the user has a connection here.

use async_trait::async_trait;
use shared::Platform;

use super::MemoryBackend;
use crate::backend::{
    BackendError, BackendEvent, ConnectState, ConnectionInfo, Control, Groups, MessageStore,
    Sessions, Topic, sessions::LIST_WAIT,
};

#[async_trait]
impl Sessions for MemoryBackend {
    async fn connect_state(&self, user: &str) -> ConnectState {
        ConnectState {
            groups: self.user_groups(user).await,
            offline: self.offline_messages(user).await,
            revoked_at: Ok(self.lock().revoked.get(user).copied()),
        }
    }

    async fn control(&self, user: &str, control: &Control) -> Result<u64, BackendError> {
        let connected = self.lock().listens(Topic::Inbox(user.to_string()));
        if !connected {
            return Ok(0);
        }
        let event = BackendEvent::Control {
            user: user.to_string(),
            control: control.clone(),
        };
        // The node is shutting down when the sink is closed; nobody is left to tell.
        let _ = self.events.send(event).await;
        Ok(1)
    }

    async fn revoke(&self, user: &str, at: u64) -> Result<u64, BackendError> {
        {
            let mut state = self.lock();
            let revoked = state.revoked.entry(user.to_string()).or_default();
            *revoked = (*revoked).max(at);
        }
        self.control(user, &Control::Revoke { before: at }).await
    }

    async fn login(&self, user: &str, scope: Option<Platform>) -> Result<u64, BackendError> {
        let seq = {
            let mut state = self.lock();
            let seq = state.logins.entry((user.to_string(), scope)).or_default();
            *seq += 1;
            *seq
        };
        self.control(
            user,
            &Control::Replace {
                platform: scope,
                seq,
            },
        )
        .await?;
        Ok(seq)
    }

    async fn latest_login(&self, user: &str, scope: Option<Platform>) -> Result<u64, BackendError> {
        Ok(self
            .lock()
            .logins
            .get(&(user.to_string(), scope))
            .copied()
            .unwrap_or(0))
    }

    async fn connections(&self, user: &str) -> Result<Vec<ConnectionInfo>, BackendError> {
        let reply = hex::encode(rand::random::<[u8; 8]>());
        let asked = self
            .control(
                user,
                &Control::List {
                    reply: reply.clone(),
                },
            )
            .await?;
        let deadline = tokio::time::Instant::now() + LIST_WAIT;
        while asked > 0 && tokio::time::Instant::now() < deadline {
            if let Some(answer) = self.lock().list_replies.remove(&reply) {
                return Ok(answer);
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Ok(Vec::new())
    }

    async fn answer_list(
        &self,
        _user: &str,
        reply: &str,
        _node: &str,
        connections: Vec<ConnectionInfo>,
    ) -> Result<(), BackendError> {
        let mut state = self.lock();
        // Bounded: an answer nobody collects (the asker gave up) is dropped with the oldest.
        if state.list_replies.len() >= 1024 {
            state.list_replies.clear();
        }
        state.list_replies.insert(reply.to_string(), connections);
        Ok(())
    }
}
