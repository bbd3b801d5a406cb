//! Runs the real `flowaudit agent` for integration tests: starts it with an
//! export file and JSON logs, waits until its programs are attached, and on
//! `stop()` (or drop) sends SIGINT, waits for it to drain and detach, and
//! returns the flow events it wrote and the counters of its last log line.
//!
//! Unless the test passes its own, the agent gets `--metrics-addr
//! 127.0.0.1:0` and a gRPC socket in its temp dir, so agents of different
//! tests never compete for the defaults; the addresses it bound are read
//! from its log (`metrics_addr()`, `grpc_addr()`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The agent binary: `$FLOWAUDIT_BIN`, else `target/release/flowaudit`.
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FLOWAUDIT_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/flowaudit");
    if !p.exists() {
        panic!(
            "the agent binary {} does not exist: build it with `cargo xtask build` (or set FLOWAUDIT_BIN)",
            p.display()
        );
    }
    p
}

pub struct RunningAgent {
    child: Option<Child>,
    pub export_file: PathBuf,
    dir: PathBuf,
    log_rx: mpsc::Receiver<Value>,
    /// Log lines read while waiting for "agent ready".
    early_logs: Vec<Value>,
    metrics_addr: Option<std::net::SocketAddr>,
    grpc_addrs: Vec<String>,
}

/// What the agent reported when it stopped.
#[derive(Debug)]
pub struct AgentReport {
    pub flows: Vec<Value>,
    /// The fields of the "agent stopped" log line.
    pub stopped: Value,
    /// Every log line, for failure messages.
    pub logs: Vec<Value>,
}

impl AgentReport {
    pub fn counter(&self, name: &str) -> u64 {
        self.stopped
            .get(name)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| {
                panic!(
                    "agent's stop log line has no counter {name}: {}",
                    self.stopped
                )
            })
    }
}

impl RunningAgent {
    /// Starts the agent with extra arguments and waits (up to 60 s) until it
    /// says its programs are attached.
    pub fn start(extra_args: &[&str]) -> Self {
        Self::start_with_env(extra_args, &[])
    }

    /// Like [`RunningAgent::start`], with extra environment variables for
    /// the agent (e.g. `KUBECONFIG`).
    pub fn start_with_env(extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "flowaudit-test-{}-{}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir_all(&dir).expect("create the agent's temp dir");
        let export_file = dir.join("flows.jsonl");
        let has = |flag: &str| {
            extra_args
                .iter()
                .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
        };
        let mut defaults: Vec<String> = Vec::new();
        if !has("--metrics-addr") {
            defaults.extend(["--metrics-addr".into(), "127.0.0.1:0".into()]);
        }
        if !has("--grpc-addr") {
            defaults.extend([
                "--grpc-addr".into(),
                format!("unix://{}", dir.join("flowaudit.sock").display()),
            ]);
        }
        let mut child = Command::new(agent_binary())
            .arg("agent")
            .arg("--export-file")
            .arg(&export_file)
            .args(["--log-format", "json", "--node-name", "sim-node"])
            .args(&defaults)
            .args(extra_args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", agent_binary().display()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut agent = Self {
            child: Some(child),
            export_file,
            dir,
            log_rx: rx,
            early_logs: Vec::new(),
            metrics_addr: None,
            grpc_addrs: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let got = agent.log_rx.recv_timeout(left);
            if let Ok(v) = &got {
                agent.early_logs.push(v.clone());
            }
            match got {
                Ok(v) if message(&v).starts_with("agent ready") => return agent,
                Ok(v) if message(&v).starts_with("metrics listening") => {
                    agent.metrics_addr = v["addr"].as_str().and_then(|a| a.parse().ok());
                }
                Ok(v) if message(&v).starts_with("gRPC flow stream listening") => {
                    agent
                        .grpc_addrs
                        .extend(v["addr"].as_str().map(str::to_owned));
                }
                Ok(_) => {}
                Err(_) => {
                    let status = agent
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten());
                    let tail: Vec<String> = agent
                        .early_logs
                        .iter()
                        .rev()
                        .take(8)
                        .rev()
                        .map(|v| v.to_string())
                        .collect();
                    panic!(
                        "the agent did not report ready within 60 s (exit status: {status:?}); its last log lines:\n{}",
                        tail.join("\n")
                    );
                }
            }
        }
    }

    /// Where it serves /metrics, /healthz and /readyz.
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.metrics_addr
            .expect("the agent did not log 'metrics listening' before 'agent ready'")
    }

    /// Its first gRPC address (`unix:///...` or `HOST:PORT`), for `--server`.
    pub fn grpc_addr(&self) -> String {
        self.grpc_addrs
            .first()
            .cloned()
            .expect("the agent did not log 'gRPC flow stream listening' before 'agent ready'")
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent is running").id()
    }

    /// The kernel degradations the agent reports
    /// (`flowaudit_kernel_degraded{name}` series), sorted.
    pub fn kernel_degradations(&self) -> Vec<String> {
        let (code, body) = self.http_get("/metrics");
        assert_eq!(code, 200, "GET /metrics: {body}");
        let mut names: Vec<String> = body
            .lines()
            .filter_map(|l| l.strip_prefix("flowaudit_kernel_degraded{name=\""))
            .filter_map(|l| l.split('"').next())
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    }

    /// Asserts the agent reports exactly the degradations this kernel must
    /// cause (`support::expected_kernel_degradations`); returns them.
    pub fn assert_kernel_degradations(&self) -> Vec<String> {
        let got = self.kernel_degradations();
        assert_eq!(
            got,
            crate::support::expected_kernel_degradations(),
            "kernel degradations reported by the agent on {}",
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        );
        got
    }

    /// Waits (at most `timeout`) until `n` flows in the export file match
    /// `pred`; returns whether they did. For a socket that closes a moment
    /// after its peer (slow under emulation) before the agent is stopped.
    pub fn wait_for_flows(
        &self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.export_file).unwrap_or_default();
            let seen = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| pred(v))
                .count();
            if seen >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET `path` from the metrics server: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics_addr(), path)
    }

    /// Stops the agent with SIGINT (it drains the kernel's ring buffer
    /// first) and returns what it recorded.
    pub fn stop(self) -> AgentReport {
        self.stop_with(libc::SIGINT)
    }

    /// Like `stop`, with another signal (SIGTERM is what Kubernetes sends).
    pub fn stop_with(mut self, signal: i32) -> AgentReport {
        let mut child = self.child.take().expect("agent is running");
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait for the agent") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the agent did not stop within 30 s of signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut logs: Vec<Value> = std::mem::take(&mut self.early_logs);
        logs.extend(self.log_rx.iter());
        assert!(
            status.success(),
            "the agent exited with {status}; its log:\n{logs:#?}"
        );
        let stopped = logs
            .iter()
            .find(|v| message(v).starts_with("agent stopped"))
            .cloned()
            .unwrap_or_else(|| {
                panic!("the agent never logged 'agent stopped'; its log:\n{logs:#?}")
            });
        let text = std::fs::read_to_string(&self.export_file).unwrap_or_default();
        let flows = text
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("export line is not JSON ({e}): {l}"))
            })
            .collect();
        AgentReport {
            flows,
            stopped,
            logs,
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(10));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn message(v: &Value) -> &str {
    v.get("message").and_then(Value::as_str).unwrap_or("")
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    u64::from_ne_bytes(b)
}

/// Flow events whose 4-tuple is `src -> dst` (ports included).
/// SIGINT, then up to `grace` to exit (the agent drains and detaches),
/// then SIGKILL; always reaped.
pub fn stop_child(child: &mut std::process::Child, grace: Duration) {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub fn flows_between<'a>(
    flows: &'a [Value],
    src: std::net::SocketAddr,
    dst: std::net::SocketAddr,
) -> impl Iterator<Item = &'a Value> {
    flows.iter().filter(move |f| {
        let l4 = &f["l4"];
        l4["source_ip"].as_str() == Some(&src.ip().to_string())
            && l4["source_port"].as_u64() == Some(u64::from(src.port()))
            && l4["destination_ip"].as_str() == Some(&dst.ip().to_string())
            && l4["destination_port"].as_u64() == Some(u64::from(dst.port()))
    })
}

/// A minimal HTTP/1.0 GET (no client library in this crate): (status, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
        .unwrap_or_else(|e| panic!("send GET {path} to {addr}: {e}"));
    let mut text = String::new();
    s.read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("read GET {path} from {addr}: {e}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("GET {path} from {addr}: not an HTTP response: {head}"));
    (code, body.to_owned())
}
