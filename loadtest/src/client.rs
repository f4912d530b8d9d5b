//! One client connection: binds a loopback source address, connects (TLS for `wss://`), upgrades
//! with a minted JWT and small buffers, waits for `welcome`, then sends and receives frames
//! without ever panicking on what the server sends.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use shared::{ClientFrame, Encoding, ServerFrame};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{
        ClientConfig, RootCertStore,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    },
};
use tokio_tungstenite::{
    WebSocketStream, client_async_with_config,
    tungstenite::{
        self, Bytes, Message,
        client::IntoClientRequest,
        http::{HeaderValue, header::SEC_WEBSOCKET_PROTOCOL},
        protocol::{CloseFrame, WebSocketConfig, frame::coding::CloseCode},
    },
};
use tokio_util::either::Either;

use crate::{
    cli::CommonArgs,
    target::{Target, parse_source_ips, source_for},
    token::Minter,
};

/// Largest message the tool accepts from the server.
const MAX_MESSAGE: usize = 1 << 20;

/// Small buffers, so one process can hold many sockets (tungstenite's default read buffer is
/// 128 KiB per connection).
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_MESSAGE * 2)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// Everything needed to open client connections of a run.
pub struct ClientEnv {
    pub targets: Vec<Target>,
    pub sources: Vec<IpAddr>,
    pub encoding: Encoding,
    pub format_in_query: bool,
    pub platform: Option<u8>,
    pub connect_timeout: Duration,
    minter: Minter,
    /// For `wss://` targets (built only when there is one).
    tls: Option<TlsConnector>,
}

/// A connection's byte stream: plain TCP, or TLS (boxed: a TLS session's buffers would otherwise
/// make every plain connection as large).
pub type Stream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

impl ClientEnv {
    /// Checks the common options (loopback URLs, source addresses) and builds the environment.
    pub fn new(common: &CommonArgs) -> anyhow::Result<Self> {
        if common.urls.is_empty() {
            anyhow::bail!("give at least one --url");
        }
        let targets = common
            .urls
            .iter()
            .map(|u| Target::parse(u, common.allow_remote))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let tls = match targets.iter().any(|t| t.tls) {
            true => Some(tls_connector(common.ca_file.as_deref())?),
            false => None,
        };
        if common.jwt_secret.is_empty() {
            anyhow::bail!("--jwt-secret must not be empty");
        }
        Ok(ClientEnv {
            targets,
            sources: parse_source_ips(&common.source_ips)?,
            encoding: common.format.encoding(),
            format_in_query: common.format_in_query,
            platform: common.platform,
            connect_timeout: Duration::from_millis(common.connect_timeout_ms),
            minter: Minter::new(
                &common.jwt_secret,
                Duration::from_secs(common.token_ttl_secs),
            ),
            tls,
        })
    }

    /// The URL (by position in `--url`) client number `index` of a run connects to.
    pub fn url_index(&self, index: usize) -> usize {
        index % self.targets.len().max(1)
    }

    /// Connects client number `index` of the run as `user`: its URL and source address are
    /// chosen round-robin from the index, its platform cycles 1..8 unless fixed.
    pub async fn connect(&self, index: usize, user: &str) -> Result<Connected, ConnectError> {
        let url_index = self.url_index(index);
        let target = self
            .targets
            .get(url_index)
            .ok_or_else(|| ConnectError::new("config", "no target"))?;
        let source = source_for(target, &self.sources, index / self.targets.len().max(1));
        let platform = self.platform.unwrap_or(1 + (index % 8) as u8);
        let token = self
            .minter
            .mint(user, platform)
            .map_err(|e| ConnectError::new("token", e.to_string()))?;
        let format = self.format_in_query.then_some(match self.encoding {
            Encoding::MsgPack => "msgpack",
            Encoding::Json => "json",
        });
        let url = target.client_url(&token, format);
        let subprotocol = (!self.format_in_query).then(|| self.encoding.subprotocol());
        let started = Instant::now();
        let tls = match (target.tls, &self.tls) {
            (true, Some(connector)) => Some((connector, target.host.as_str())),
            _ => None,
        };
        let attempt = open(target.addr, source, tls, &url, subprotocol, self.encoding);
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(Ok((conn, welcome))) => Ok(Connected {
                conn,
                welcome,
                latency: started.elapsed(),
                url_index,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ConnectError::new(
                "timeout",
                format!("no welcome within {:?}", self.connect_timeout),
            )),
        }
    }
}

/// A connection that got its `welcome`.
pub struct Connected {
    pub conn: Conn,
    pub welcome: Welcome,
    /// From the start of the TCP connect to the `welcome` frame.
    pub latency: Duration,
    /// Position of the URL in `--url`.
    pub url_index: usize,
}

/// What the `welcome` frame said.
#[derive(Debug, Clone)]
pub struct Welcome {
    pub node: String,
}

/// Why a connection failed; `kind` is a short label for counters.
#[derive(Debug, Clone)]
pub struct ConnectError {
    pub kind: String,
    pub message: String,
}

impl ConnectError {
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        ConnectError {
            kind: kind.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// TLS settings for `wss://`: the system's trusted CAs plus those in `ca_file`, ring as the
/// crypto provider, TLS 1.2 and 1.3.
fn tls_connector(ca_file: Option<&Path>) -> anyhow::Result<TlsConnector> {
    let mut roots = RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(system.certs);
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow::anyhow!("--ca-file {}: {e}", path.display()))?;
        if certs.is_empty() {
            anyhow::bail!("--ca-file {}: no certificate in it", path.display());
        }
        for cert in certs {
            roots.add(cert)?;
        }
    }
    if roots.is_empty() {
        anyhow::bail!("no trusted CA for wss:// (the system store is empty): give --ca-file");
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

async fn open(
    addr: SocketAddr,
    source: IpAddr,
    tls: Option<(&TlsConnector, &str)>,
    url: &str,
    subprotocol: Option<&'static str>,
    encoding: Encoding,
) -> Result<(Conn, Welcome), ConnectError> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| ConnectError::new("socket", e.to_string()))?;
    bind_address_no_port(&socket).map_err(|e| {
        ConnectError::new(
            "sockopt",
            format!("cannot set IP_BIND_ADDRESS_NO_PORT before binding {source}: {e}"),
        )
    })?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| ConnectError::new("bind", format!("{source}: {e}")))?;
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| ConnectError::new("tcp", format!("{addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let stream: Stream = match tls {
        None => Either::Left(stream),
        Some((connector, host)) => {
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| ConnectError::new("tls", format!("{host}: {e}")))?;
            let tls = connector
                .connect(name, stream)
                .await
                .map_err(|e| ConnectError::new("tls", e.to_string()))?;
            Either::Right(Box::new(tls))
        }
    };
    let mut request = url
        .into_client_request()
        .map_err(|e| ConnectError::new("request", e.to_string()))?;
    if let Some(protocol) = subprotocol {
        request
            .headers_mut()
            .insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(protocol));
    }
    let (ws, _response) = client_async_with_config(request, stream, Some(ws_config()))
        .await
        .map_err(|e| match e {
            tungstenite::Error::Http(response) => ConnectError::new(
                format!("http_{}", response.status().as_u16()),
                format!("upgrade refused with {}", response.status()),
            ),
            other => ConnectError::new("handshake", other.to_string()),
        })?;
    let mut conn = Conn { ws, encoding };
    match conn.recv().await {
        Incoming::Frame(frame) => match frame {
            ServerFrame::Welcome { node, .. } => Ok((conn, Welcome { node })),
            other => Err(ConnectError::new(
                "no_welcome",
                format!("first frame was {other:?}"),
            )),
        },
        Incoming::Undecodable(e) => Err(ConnectError::new("decode", e)),
        Incoming::Closed(code) => Err(ConnectError::new(
            format!(
                "closed_{}",
                code.map_or("none".to_string(), |c| c.to_string())
            ),
            "closed before welcome",
        )),
        Incoming::Failed(e) => Err(ConnectError::new("io", e)),
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` (Linux 4.2+), so that `bind()` to `source:0` only fixes the
/// source address and the kernel picks the port at `connect()`, where a port only needs a free
/// 4-tuple: each source address then has the whole ephemeral range per destination, and `bind()`
/// no longer scans the bind hash for a port no other socket holds (with ~18,000 ports in use per
/// source address that scan took 97% of the tool's CPU). Neither tokio nor socket2 exposes it;
/// nix does, safely.
/// For IPv6 sockets too: the kernel hands `IPPROTO_IP` options of TCP sockets to the IPv4 code.
#[cfg(target_os = "linux")]
fn bind_address_no_port(socket: &TcpSocket) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
    setsockopt(socket, IpBindAddressNoPort, &true).map_err(std::io::Error::from)
}

/// Elsewhere the port is chosen at `bind()`.
#[cfg(not(target_os = "linux"))]
fn bind_address_no_port(_socket: &TcpSocket) -> std::io::Result<()> {
    Ok(())
}

/// What one read from a connection gave.
#[derive(Debug)]
pub enum Incoming {
    Frame(ServerFrame),
    /// A message that is not a frame of the connection's encoding; counted, never unwrapped.
    Undecodable(String),
    /// The server closed, with its close code when it sent one.
    Closed(Option<u16>),
    /// The socket broke.
    Failed(String),
}

/// What [`Conn::recv_raw`] gave: a MessagePack message as it came, or anything else as
/// [`Conn::recv`] gives it.
#[derive(Debug)]
pub enum Raw {
    Bytes(Bytes),
    Other(Incoming),
}

/// An open client connection.
pub struct Conn {
    ws: WebSocketStream<Stream>,
    encoding: Encoding,
}

impl Conn {
    /// The next frame, skipping control messages (pings are answered by the WebSocket layer).
    /// Cancel-safe: usable in `select!`.
    pub async fn recv(&mut self) -> Incoming {
        match self.next_message().await {
            Ok(message) => self.decode(message),
            Err(incoming) => incoming,
        }
    }

    /// Like [`Conn::recv`], but a MessagePack message comes back undecoded, for a caller that
    /// reads the frames it counts itself and hands the rest to [`Conn::decode_bytes`].
    pub async fn recv_raw(&mut self) -> Raw {
        match self.next_message().await {
            Ok(Message::Binary(bytes)) if self.encoding == Encoding::MsgPack => Raw::Bytes(bytes),
            Ok(message) => Raw::Other(self.decode(message)),
            Err(incoming) => Raw::Other(incoming),
        }
    }

    /// A message as [`Conn::recv`] would have decoded it.
    pub fn decode_bytes(&self, bytes: &[u8]) -> Incoming {
        match self.encoding.decode_server(bytes) {
            Ok(frame) => Incoming::Frame(frame),
            Err(e) => Incoming::Undecodable(e.message),
        }
    }

    /// The next data or close message; what ended the connection otherwise.
    async fn next_message(&mut self) -> Result<Message, Incoming> {
        loop {
            return match self.ws.next().await {
                None => Err(Incoming::Closed(None)),
                Some(Err(tungstenite::Error::ConnectionClosed))
                | Some(Err(tungstenite::Error::AlreadyClosed)) => Err(Incoming::Closed(None)),
                Some(Err(e)) => Err(Incoming::Failed(e.to_string())),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(m)) => Ok(m),
            };
        }
    }

    fn decode(&self, message: Message) -> Incoming {
        match (message, self.encoding) {
            (Message::Binary(bytes), Encoding::MsgPack) => self.decode_bytes(&bytes),
            (Message::Text(text), Encoding::Json) => self.decode_bytes(text.as_bytes()),
            (Message::Binary(_), Encoding::Json) => {
                Incoming::Undecodable("binary message on a JSON connection".into())
            }
            (Message::Text(_), Encoding::MsgPack) => {
                Incoming::Undecodable("text message on a MessagePack connection".into())
            }
            (Message::Close(frame), _) => Incoming::Closed(frame.map(|f| u16::from(f.code))),
            // `next_message` skips them.
            (Message::Ping(_) | Message::Pong(_) | Message::Frame(_), _) => {
                Incoming::Undecodable("control message".into())
            }
        }
    }

    /// Sends one frame in the connection's encoding.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), String> {
        let bytes = self.encoding.encode(frame).map_err(|e| e.message)?;
        let message = match self.encoding {
            Encoding::MsgPack => Message::Binary(bytes.into()),
            Encoding::Json => {
                Message::Text(String::from_utf8(bytes).map_err(|e| e.to_string())?.into())
            }
        };
        self.ws.send(message).await.map_err(|e| e.to_string())
    }

    /// Closes with 1000 and waits (at most `within`) for the server's close.
    pub async fn close(mut self, within: Duration) {
        let _ = tokio::time::timeout(within, async {
            let frame = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            if self.ws.close(Some(frame)).await.is_err() {
                return;
            }
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}
