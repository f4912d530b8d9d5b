//! Sessions on the embedded backend: one node, so control messages go straight to the node's
//! event sink when the user has a connection here.

use async_trait::async_trait;

use super::MemoryBackend;
use crate::backend::{
    BackendError, BackendEvent, ConnectState, Control, Groups, MessageStore, Sessions, Topic,
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
}
