//! HAProxy (Debian's package) as a child process on loopback ports, with its stats socket: the
//! load balancer of `lb.rs`, and the TLS terminator of the load tool's `wss://` test (which
//! includes this file, so it depends on nothing else of the test crate).

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// A running haproxy, killed and waited for when dropped; its files live in `dir`.
pub struct Haproxy {
    child: Option<Child>,
    pub dir: PathBuf,
}

/// One server line of `show stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStat {
    pub name: String,
    /// `UP`, `DOWN`, `MAINT`, ... (transitions read `UP 1/2` and the like).
    pub status: String,
    /// Sessions HAProxy has sent this server since it started (health checks not counted).
    pub total: u64,
}

impl Haproxy {
    /// Starts haproxy on `config`, written to a fresh directory, with `global` settings that
    /// bind a stats socket there (`{dir}` in `config` is replaced by that directory); waits until
    /// the socket answers.
    pub fn start(config: &str) -> Haproxy {
        static STARTED: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "haproxy-{}-{nanos}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("haproxy dir");
        let config = config.replace("{dir}", &dir.display().to_string());
        let global = format!(
            "global\n    maxconn 4000\n    stats socket {}/stats.sock mode 600 level admin\n\n",
            dir.display()
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, global + &config).expect("write haproxy.cfg");
        let child = Command::new(binary())
            .arg("-db") // foreground, no daemon: a child the test waits for
            .arg("-q")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy (Debian package `haproxy`; `make haproxy` installs it)");
        let haproxy = Haproxy {
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while haproxy.command("show info").is_none() {
            assert!(Instant::now() < deadline, "haproxy did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        haproxy
    }

    /// Sends one command to the stats socket; its whole answer.
    pub fn command(&self, command: &str) -> Option<String> {
        let mut socket = UnixStream::connect(self.dir.join("stats.sock")).ok()?;
        socket.write_all(format!("{command}\n").as_bytes()).ok()?;
        let mut answer = String::new();
        socket.read_to_string(&mut answer).ok()?;
        Some(answer)
    }

    /// The servers of `backend` as `show stat` lists them.
    pub fn servers(&self, backend: &str) -> Vec<ServerStat> {
        let Some(csv) = self.command("show stat") else {
            return Vec::new();
        };
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let column = |name: &str| header.iter().position(|h| *h == name);
        let (Some(px), Some(sv), Some(status), Some(total)) = (
            column("pxname"),
            column("svname"),
            column("status"),
            column("stot"),
        ) else {
            return Vec::new();
        };
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.get(px) == Some(&backend))
            .filter(|f| !matches!(f.get(sv), Some(&"FRONTEND") | Some(&"BACKEND")))
            .map(|f| ServerStat {
                name: f.get(sv).unwrap_or(&"").to_string(),
                status: f.get(status).unwrap_or(&"").to_string(),
                total: f.get(total).and_then(|t| t.parse().ok()).unwrap_or(0),
            })
            .collect()
    }

    /// Polls `backend`'s `server` until its status starts with `status`; its stats then.
    pub fn wait_status(&self, backend: &str, server: &str, status: &str) -> ServerStat {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self
                .servers(backend)
                .into_iter()
                .find(|s| s.name == server && s.status.starts_with(status))
            {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{backend}/{server} never {status}: {:?}",
                self.servers(backend)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The haproxy binary: on PATH, or where Debian installs it (`/usr/sbin` is not on every PATH).
fn binary() -> PathBuf {
    let installed = Path::new("/usr/sbin/haproxy");
    if installed.exists() {
        installed.to_path_buf()
    } else {
        PathBuf::from("haproxy")
    }
}
