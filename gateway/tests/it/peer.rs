//! A client in a task of its own: it reads all the time (so it is never a slow consumer), records
//! what it hears, and runs the requests it is handed. Fault and chaos tests drive many at once and
//! look at what each one heard afterwards.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use shared::{ClientFrame, Destination, Encoding, Presence, ServerFrame, Status};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use crate::{
    client::{Client, jwt, reply_id},
    harness::Node,
};

/// How long a request may wait for its answer before the peer gives up on it (a node may be
/// waiting for Redis to come back).
const ANSWER_WAIT: Duration = Duration::from_secs(15);

type MakeFrame = Box<dyn FnOnce(Option<u64>) -> ClientFrame + Send>;

enum PeerCmd {
    Request(MakeFrame, oneshot::Sender<ServerFrame>),
    Close,
}

/// What a peer heard.
#[derive(Default, Debug)]
pub struct Heard {
    /// Each user's presence with the highest version heard (`presence_list` items and events).
    pub latest: HashMap<String, Presence>,
    /// Every presence a user was heard in, in the order heard.
    pub history: HashMap<String, Vec<Presence>>,
    /// Ids of the `message` frames received.
    pub messages: HashSet<String>,
    /// Set once the connection is gone: who ended it and how.
    pub ended: Option<String>,
}

impl Heard {
    fn presence(&mut self, p: Presence) {
        let newer = self
            .latest
            .get(&p.user)
            .is_none_or(|old| p.version > old.version);
        self.history
            .entry(p.user.clone())
            .or_default()
            .push(p.clone());
        if newer {
            self.latest.insert(p.user.clone(), p);
        }
    }
}

/// A connected client driven through its own task.
pub struct Peer {
    pub user: String,
    pub platform: u8,
    /// Index of the node it connected to, in the test's list.
    pub node: usize,
    /// When `welcome` arrived.
    pub since: Instant,
    pub heard: Arc<Mutex<Heard>>,
    commands: mpsc::UnboundedSender<PeerCmd>,
}

impl Peer {
    /// Connects and waits for `welcome`; an error says what happened instead.
    pub async fn connect(
        node: &Node,
        index: usize,
        user: &str,
        platform: u8,
    ) -> Result<Peer, String> {
        let token = jwt(user, platform);
        let open = Client::open(node, &token, Encoding::MsgPack);
        let mut client = match tokio::time::timeout(ANSWER_WAIT, open).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(format!("upgrade refused: {e}")),
            Err(_) => return Err("upgrade timed out".into()),
        };
        match tokio::time::timeout(ANSWER_WAIT, client.next_frame()).await {
            Ok(Ok(ServerFrame::Welcome { .. })) => {}
            Ok(Ok(other)) => return Err(format!("expected welcome, got {other:?}")),
            Ok(Err(closed)) => return Err(format!("closed before welcome: {closed:?}")),
            Err(_) => return Err("no welcome".into()),
        }
        let heard = Arc::new(Mutex::new(Heard::default()));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(client, rx, heard.clone()));
        Ok(Peer {
            user: user.to_string(),
            platform,
            node: index,
            since: Instant::now(),
            heard,
            commands: tx,
        })
    }

    /// Whether the connection is still up.
    pub fn alive(&self) -> bool {
        self.heard.lock().expect("heard").ended.is_none()
    }

    /// Sends a request and waits for its answer; `None` when the connection ended or nothing came.
    pub async fn request(
        &self,
        make: impl FnOnce(Option<u64>) -> ClientFrame + Send + 'static,
    ) -> Option<ServerFrame> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(PeerCmd::Request(Box::new(make), tx))
            .ok()?;
        tokio::time::timeout(ANSWER_WAIT, rx).await.ok()?.ok()
    }

    /// True when the server answered `ok`.
    pub async fn set_status(&self, status: Status) -> bool {
        matches!(
            self.request(move |id| ClientFrame::SetStatus {
                id,
                status,
                text: None
            })
            .await,
            Some(ServerFrame::Ok { .. })
        )
    }

    /// Subscribes to `users`; true when the `presence_list` came (its items are recorded).
    pub async fn subscribe(&self, users: Vec<String>) -> bool {
        let answer = self
            .request(move |id| ClientFrame::Subscribe { id, users })
            .await;
        let listed = matches!(answer, Some(ServerFrame::PresenceList { .. }));
        if !listed {
            eprintln!("{}: subscribe answered {answer:?}", self.user);
        }
        listed
    }

    /// Sends `text` to `group`; the `ack` (or whatever answered).
    pub async fn send_group(&self, group: &str, text: &str) -> Option<ServerFrame> {
        let to = Destination::Group {
            group: group.to_string(),
        };
        let body = shared::Body::from(text);
        self.request(move |id| ClientFrame::Send {
            id,
            to,
            body,
            client_msg_id: None,
        })
        .await
    }

    /// Closes the connection (the task ends once the server saw it).
    pub fn close(&self) {
        let _ = self.commands.send(PeerCmd::Close);
    }
}

async fn run(
    mut client: Client,
    mut commands: mpsc::UnboundedReceiver<PeerCmd>,
    heard: Arc<Mutex<Heard>>,
) {
    let mut waiting: HashMap<u64, oneshot::Sender<ServerFrame>> = HashMap::new();
    loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(PeerCmd::Request(make, answer)) => {
                    let id = client.id();
                    if client.try_send(&make(Some(id))).await.is_err() {
                        heard.lock().expect("heard").ended = Some("send failed".into());
                        return;
                    }
                    waiting.insert(id, answer);
                }
                Some(PeerCmd::Close) | None => {
                    heard.lock().expect("heard").ended = Some("closed by the test".into());
                    client.close().await;
                    return;
                }
            },
            frame = client.next_frame() => match frame {
                Ok(frame) => {
                    if let Some(answer) = reply_id(&frame).and_then(|id| waiting.remove(&id)) {
                        if let ServerFrame::PresenceList { items, .. } = &frame {
                            let mut heard = heard.lock().expect("heard");
                            items.iter().for_each(|p| heard.presence(p.clone()));
                        }
                        let _ = answer.send(frame);
                        continue;
                    }
                    let mut heard = heard.lock().expect("heard");
                    match frame {
                        ServerFrame::Presence(p) => heard.presence(p),
                        ServerFrame::Message(m) => {
                            heard.messages.insert(m.msg_id);
                        }
                        _ => {}
                    }
                }
                Err(closed) => {
                    heard.lock().expect("heard").ended = Some(format!("server ended it: {closed:?}"));
                    return;
                }
            },
        }
    }
}
