//! Smoke runs of `presence-loadtest` against the real gateway binary: short `idle`, `churn`,
//! `storm`, `fanout` and `private` runs must connect everything, fail nothing and count something;
//! `fanout` must open its groups with the API key and stop on a wrong one; non-loopback targets
//! must be refused; `wss://` works through HAProxy terminating TLS with a certificate of a CA
//! made for the test (given with `--ca-file`), and fails without it.
//!
//! The gateway is another package's binary, so Cargo does not build it for this test: `make test`
//! builds it first (or run `cargo build -p presence-gateway`). The test looks for it next to the
//! load tool's own binary, then in `$CARGO_TARGET_DIR/debug` and `<workspace>/target/debug`
//! (`PRESENCE_GATEWAY_BIN` overrides), and fails with a clear message when it is missing.

use std::{
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;

/// HAProxy as a child process: the gateway tests' own harness file.
#[path = "../../gateway/tests/it/haproxy.rs"]
#[allow(dead_code)]
mod haproxy;

const SECRET: &str = "test-secret";

/// A gateway child process, killed and reaped when dropped (also when a test panics).
struct Gateway {
    child: Child,
    addr: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gateway_binary() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os("PRESENCE_GATEWAY_BIN") {
        candidates.push(PathBuf::from(path));
    }
    if let Some(dir) = Path::new(env!("CARGO_BIN_EXE_presence-loadtest")).parent() {
        candidates.push(dir.join("presence-gateway"));
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        let dir = if dir.is_absolute() {
            dir
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir)
        };
        candidates.push(dir.join("debug").join("presence-gateway"));
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/debug")
            .join("presence-gateway"),
    );
    match candidates.iter().find(|p| p.is_file()) {
        Some(found) => found.clone(),
        None => panic!(
            "the presence-gateway binary is missing (looked at {candidates:?}); build it first \
             with `cargo build -p presence-gateway` (`make test` does this before the tests)"
        ),
    }
}

/// Removes ANSI colour sequences (the gateway's text logs may carry them).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `addr` of the gateway's "listening" log line, JSON (`"addr":"..."`) or text (`addr=...`).
fn listening_addr(line: &str) -> Option<String> {
    let line = strip_ansi(line);
    if !line.contains("listening") {
        return None;
    }
    if let Ok(v) = serde_json::from_str::<Value>(&line) {
        let addr = v
            .get("fields")
            .and_then(|f| f.get("addr"))
            .or_else(|| v.get("addr"))
            .and_then(Value::as_str);
        if let Some(addr) = addr {
            return Some(addr.to_string());
        }
    }
    let start = line
        .find("\"addr\":\"")
        .map(|i| i + 8)
        .or_else(|| line.find("addr=").map(|i| i + 5))?;
    let addr: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();
    (!addr.is_empty()).then_some(addr)
}

fn forward_lines(pipe: impl Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        // Keeps draining the pipe until the gateway exits, so it never blocks on a full pipe.
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
}

fn start_gateway() -> Gateway {
    let bin = gateway_binary();
    let mut child = Command::new(&bin)
        .args([
            "--dev",
            "--jwt-secret",
            SECRET,
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        forward_lines(out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        forward_lines(err, tx);
    }
    let mut gateway = Gateway {
        child,
        addr: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if let Some(addr) = listening_addr(&line) {
                    gateway.addr = addr;
                    return gateway;
                }
                seen.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(status)) = gateway.child.try_wait() {
                    panic!("the gateway exited with {status} before listening: {seen:#?}");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    panic!("the gateway did not log a \"listening\" line with its addr: {seen:#?}");
}

/// Runs the load tool with `args` plus the gateway URL, secret and a report file; the exit status
/// and the parsed report.
fn loadtest(gateway: &Gateway, name: &str, args: &[&str]) -> (ExitStatus, Value) {
    loadtest_at(&format!("ws://{}/ws", gateway.addr), name, args)
}

/// [`loadtest`] against `url`.
fn loadtest_at(url: &str, name: &str, args: &[&str]) -> (ExitStatus, Value) {
    let report = std::env::temp_dir().join(format!(
        "presence-loadtest-smoke-{}-{name}.json",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&report);
    let mut child = Command::new(env!("CARGO_BIN_EXE_presence-loadtest"))
        .args(args)
        .args(["--url", url, "--jwt-secret", SECRET, "--quiet", "--report"])
        .arg(&report)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start presence-loadtest");
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        forward_lines(out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        forward_lines(err, tx);
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("presence-loadtest {name} did not stop by itself within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(100));
    let output: Vec<String> = rx.try_iter().collect();
    let text = std::fs::read_to_string(&report).unwrap_or_else(|e| {
        panic!("no report from presence-loadtest {name} ({status}): {e}\n{output:#?}")
    });
    let _ = std::fs::remove_file(&report);
    let value: Value = serde_json::from_str(&text).expect("the report is JSON");
    println!("{}", output.join("\n"));
    (status, value)
}

fn num(report: &Value, pointer: &str) -> f64 {
    report
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("report has no number at {pointer}: {report:#}"))
}

#[test]
fn idle_connects_everything() {
    let gateway = start_gateway();
    let pid = gateway.child.id().to_string();
    let (status, r) = loadtest(
        &gateway,
        "idle",
        &[
            "idle",
            "--connections",
            "50",
            "--rate",
            "200",
            "--hold",
            "2",
            "--settle-ms",
            "300",
            "--gateway-pid",
            &pid,
        ],
    );
    assert!(status.success(), "exit {status}: {r:#}");
    assert_eq!(r["scenario"], "idle");
    assert!(r["command"].as_str().is_some_and(|c| c.contains("idle")));
    assert!(
        !r.to_string().contains(SECRET),
        "the report leaks the JWT secret"
    );
    assert_eq!(num(&r, "/figures/connected"), 50.0, "{r:#}");
    assert_eq!(num(&r, "/figures/failed"), 0.0, "{r:#}");
    assert_eq!(num(&r, "/figures/dropped_during_hold"), 0.0, "{r:#}");
    assert!(num(&r, "/figures/achieved_rate") > 0.0);
    assert_eq!(num(&r, "/figures/connect_latency_ms/count"), 50.0);
    assert_eq!(r["figures"]["nodes"][0]["counts_match"], true, "{r:#}");
    assert!(
        num(&r, "/figures/memory/0/rss_kib_after_ramp") > 0.0,
        "{r:#}"
    );
}

#[test]
fn churn_sees_every_online_and_offline() {
    let gateway = start_gateway();
    let (status, r) = loadtest(
        &gateway,
        "churn",
        &[
            "churn",
            "--clients-per-sec",
            "5",
            "--duration",
            "2",
            "--lifetime-ms",
            "1500",
            "--drain-ms",
            "2500",
        ],
    );
    assert!(status.success(), "exit {status}: {r:#}");
    assert_eq!(num(&r, "/figures/clients_connected"), 10.0, "{r:#}");
    assert_eq!(num(&r, "/figures/clients_failed"), 0.0, "{r:#}");
    assert_eq!(num(&r, "/figures/observers_subscribed"), 1.0, "{r:#}");
    assert_eq!(num(&r, "/figures/expected_online"), 10.0, "{r:#}");
    assert_eq!(num(&r, "/figures/missing_online"), 0.0, "{r:#}");
    assert_eq!(num(&r, "/figures/missing_offline"), 0.0, "{r:#}");
    assert_eq!(num(&r, "/figures/duplicate_online"), 0.0, "{r:#}");
    assert_eq!(num(&r, "/figures/duplicate_offline"), 0.0, "{r:#}");
    assert_eq!(
        num(&r, "/figures/online_latency_from_connect_ms/count"),
        10.0
    );
    assert_eq!(
        num(&r, "/figures/offline_latency_from_close_ms/count"),
        10.0
    );
}

#[test]
fn storm_changes_are_flushed() {
    let gateway = start_gateway();
    let (status, r) = loadtest(
        &gateway,
        "storm",
        &[
            "storm",
            "--users",
            "20",
            "--rate",
            "100",
            "--duration",
            "2",
            "--flush-wait-ms",
            "1500",
            "--format",
            "json",
        ],
    );
    assert!(status.success(), "exit {status}: {r:#}");
    assert_eq!(num(&r, "/figures/connected"), 20.0, "{r:#}");
    assert_eq!(num(&r, "/figures/connect_failed"), 0.0, "{r:#}");
    let sent = num(&r, "/figures/changes_sent");
    assert!(sent > 0.0, "{r:#}");
    assert_eq!(num(&r, "/figures/changes_ok"), sent, "{r:#}");
    assert!(num(&r, "/figures/presence_writes") > 0.0, "{r:#}");
    assert!(num(&r, "/figures/flushed_per_sec") > 0.0, "{r:#}");
}

/// The messaging scenarios must end by themselves either way: with deliveries once the gateway
/// routes messages, or with exit code 3 and the `unavailable` answer in the report before that.
#[test]
fn messaging_scenarios_never_hang() {
    let gateway = start_gateway();
    for (name, args) in [
        (
            "fanout",
            &[
                "fanout",
                "--groups",
                "2",
                "--members",
                "3",
                "--rate",
                "20",
                "--duration",
                "1",
            ][..],
        ),
        (
            "private",
            &["private", "--users", "4", "--rate", "20", "--duration", "1"][..],
        ),
    ] {
        let (status, r) = loadtest(&gateway, name, args);
        match status.code() {
            Some(0) => assert!(num(&r, "/figures/received") > 0.0, "{r:#}"),
            Some(3) => {
                assert!(r["figures"]["unavailable"].is_string(), "{r:#}");
                assert_eq!(r["exit_code"], 3);
            }
            other => panic!("{name} exited with {other:?}: {r:#}"),
        }
    }
}

#[test]
fn fanout_delivers_to_every_member() {
    let gateway = start_gateway();
    let (status, r) = loadtest(
        &gateway,
        "fanout",
        &[
            "fanout",
            "--groups",
            "3",
            "--members",
            "5",
            "--rate",
            "30",
            "--duration",
            "2",
        ],
    );
    assert!(status.success(), "exit {status}: {r:#}");
    assert_eq!(num(&r, "/figures/connect_failed"), 0.0, "{r:#}");
    assert_eq!(num(&r, "/figures/joined"), 15.0, "{r:#}");
    assert!(num(&r, "/figures/expected_deliveries") > 0.0, "{r:#}");
    assert_eq!(num(&r, "/figures/lost"), 0.0, "{r:#}");
    assert_eq!(num(&r, "/figures/duplicates"), 0.0, "{r:#}");
}

/// Groups are closed by default: `fanout` opens them with the API key (`dev` on a `--dev`
/// gateway, the default) before its members join; a wrong key stops the run before that.
#[test]
fn fanout_needs_the_api_key() {
    let gateway = start_gateway();
    let (status, r) = loadtest(
        &gateway,
        "fanout-key",
        &[
            "fanout",
            "--groups",
            "2",
            "--members",
            "2",
            "--rate",
            "10",
            "--duration",
            "1",
            "--api-key",
            "dev",
        ],
    );
    assert!(status.success(), "exit {status}: {r:#}");
    assert_eq!(num(&r, "/figures/groups_opened"), 2.0, "{r:#}");
    assert_eq!(num(&r, "/figures/joined"), 4.0, "{r:#}");
    let out = Command::new(env!("CARGO_BIN_EXE_presence-loadtest"))
        .args([
            "fanout",
            "--groups",
            "2",
            "--members",
            "2",
            "--duration",
            "1",
        ])
        .args(["--url", &format!("ws://{}/ws", gateway.addr)])
        .args([
            "--jwt-secret",
            SECRET,
            "--api-key",
            "not-the-key-7f3a",
            "--quiet",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("cannot start presence-loadtest");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("401") && err.contains("--api-key"),
        "no clear message: {err}"
    );
    assert!(!err.contains("7f3a"), "the key is echoed: {err}");
}

#[test]
fn private_messages_arrive() {
    let gateway = start_gateway();
    let (status, r) = loadtest(
        &gateway,
        "private",
        &[
            "private",
            "--users",
            "10",
            "--rate",
            "50",
            "--duration",
            "2",
        ],
    );
    assert!(status.success(), "exit {status}: {r:#}");
    assert_eq!(num(&r, "/figures/connect_failed"), 0.0, "{r:#}");
    assert!(num(&r, "/figures/expected_deliveries") > 0.0, "{r:#}");
    assert_eq!(num(&r, "/figures/lost"), 0.0, "{r:#}");
    assert_eq!(num(&r, "/figures/duplicates"), 0.0, "{r:#}");
}

#[test]
fn other_hosts_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_presence-loadtest"))
        .args([
            "idle",
            "--url",
            "ws://192.168.1.10:8080/ws",
            "--jwt-secret",
            SECRET,
            "--quiet",
        ])
        .output()
        .expect("cannot start presence-loadtest");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loopback"), "{err}");
}

#[test]
fn listening_lines_are_parsed() {
    assert_eq!(
        listening_addr(
            r#"{"level":"INFO","fields":{"message":"listening","addr":"127.0.0.1:4000"}}"#
        ),
        Some("127.0.0.1:4000".into())
    );
    assert_eq!(
        listening_addr(
            "\u{1b}[2mgateway\u{1b}[0m listening \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:34795 ws_url=x"
        ),
        Some("127.0.0.1:34795".into())
    );
    assert_eq!(listening_addr("something else"), None);
}

/// A CA and a certificate it signed for `localhost` and 127.0.0.1, made with the openssl CLI in
/// `dir`: returns (the CA's PEM, the server's certificate and key in one PEM, as HAProxy reads it).
fn make_certificates(dir: &Path) -> (PathBuf, PathBuf) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (Debian package `openssl`)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=presence test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"],
            &ec[..],
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write server.ext");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    let bundle = dir.join("server-bundle.pem");
    let pem = std::fs::read_to_string(dir.join("server.pem")).expect("server.pem")
        + &std::fs::read_to_string(dir.join("server.key")).expect("server.key");
    std::fs::write(&bundle, pem).expect("write the bundle");
    (dir.join("ca.pem"), bundle)
}

#[test]
fn wss_through_a_tls_terminating_load_balancer() {
    let gateway = start_gateway();
    let dir = std::env::temp_dir().join(format!("presence-loadtest-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tls dir");
    let (ca, bundle) = make_certificates(&dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let _lb = haproxy::Haproxy::start(&format!(
        "defaults\n    mode http\n    timeout connect 2s\n    timeout client 1m\n    \
         timeout server 1m\n    timeout tunnel 1m\n\n\
         frontend tls\n    bind 127.0.0.1:{port} ssl crt {}\n    default_backend gateway\n\n\
         backend gateway\n    server g {}\n",
        bundle.display(),
        gateway.addr
    ));
    let url = format!("wss://localhost:{port}/ws");
    let idle = [
        "idle",
        "--connections",
        "20",
        "--rate",
        "100",
        "--hold",
        "1",
        "--settle-ms",
        "0",
    ];
    let ca_arg = ca.display().to_string();
    let (status, r) = loadtest_at(&url, "wss", &[&idle[..], &["--ca-file", &ca_arg]].concat());
    assert!(status.success(), "exit {status}: {r:#}");
    assert_eq!(num(&r, "/figures/connected"), 20.0, "{r:#}");
    assert_eq!(num(&r, "/figures/failed"), 0.0, "{r:#}");
    // Without the CA the certificate is not trusted: nothing connects.
    let (status, r) = loadtest_at(&url, "wss-untrusted", &idle);
    assert!(!status.success(), "{r:#}");
    assert_eq!(num(&r, "/figures/connected"), 0.0, "{r:#}");
    let _ = std::fs::remove_dir_all(&dir);
}
