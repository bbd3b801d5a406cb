//! Runs the real `flowaudit agent` for integration tests: starts it with an
//! export file and JSON logs, waits until its programs are attached, and on
//! `stop()` (or drop) sends SIGINT, waits for it to drain and detach, and
//! returns the flow events it wrote and the counters of its last log line.
//!
//! Unless the test passes its own, the agent gets `--metrics-addr
//! 127.0.0.1:0` and a gRPC socket in its temp dir, so agents of different
//! tests never compete for the defaults; the addresses it bound are read
//! from its log (`metrics_addr()`, `grpc_addr()`).
//!
//! [`RunningAgent::start`] runs it on the host as full root (node
//! `sim-node`); [`RunningAgent::start_in_node`] runs it the way the
//! DaemonSet does on a kind node: in a [`SimNode`], in a pod of its own,
//! with exactly the manifest's capabilities, no_new_privs and read-only root
//! (its temp dir plays the emptyDirs), named after the node.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::daemonset::AgentPodSpec;
use crate::simnode::{ExecOpts, Pod, PodSpec, SimNode};

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
    /// The agent's pod when it runs in a node (its handle is node-exec's).
    pod: Option<Pod>,
}

/// What containerd grants a container that does not drop ALL (its default
/// OCI spec), before `capabilities.add`.
const RUNTIME_DEFAULT_CAPS: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

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
        let dir = temp_dir();
        let mut cmd = agent_command(&dir, "sim-node", extra_args, env);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", agent_binary().display()));
        Self::wait_ready(child, dir, None)
    }

    /// Starts the agent inside `node` as the DaemonSet's pod `pod_spec`
    /// (e.g. `daemonset::kind_agent_pod_spec()`) runs it: its own pod
    /// (netns and cgroup; the node's netns with `host_network`), the node's
    /// pid, mount, UTS and cgroup namespaces, exactly the spec's capabilities
    /// (drop ALL + add), no_new_privs unless privilege escalation is allowed,
    /// a read-only root with its temp dir (export file, gRPC socket) writable,
    /// RLIMIT_MEMLOCK infinity, `--node-name` the node's name. The spec's
    /// hostPaths are the node's own paths and must exist inside the node.
    /// The agent's own arguments are the harness's (JSON logs, export file,
    /// metrics on 127.0.0.1:0 in its netns, gRPC on a socket in its temp
    /// dir), then `extra_args`; `pod_spec.args` are not used.
    pub fn start_in_node(
        node: &SimNode,
        pod_spec: &AgentPodSpec,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let spec = PodSpec::new("flowaudit", format!("flowaudit-{:x}", rand_u64() as u16))
            .service_account("flowaudit")
            .label("app.kubernetes.io/name", "flowaudit");
        let pod = if pod_spec.host_network {
            node.add_host_network_pod(spec)
        } else {
            node.add_pod(spec)
        }
        .unwrap_or_else(|e| panic!("adding the agent's pod to node {}: {e}", node.name()));
        Self::start_in_pod(node, pod, pod_spec, extra_args, env)
    }

    /// Like [`RunningAgent::start_in_node`], in a pod that exists already
    /// (e.g. the pod of an agent that stopped: a container restarted in
    /// place keeps its pod's address).
    pub fn start_in_pod(
        node: &SimNode,
        pod: Pod,
        pod_spec: &AgentPodSpec,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        check_node_pod_spec(node, pod_spec);
        let dir = temp_dir();
        let caps = if pod_spec.privileged {
            None
        } else if pod_spec.capabilities_drop_all {
            Some(pod_spec.capabilities_add.clone())
        } else {
            let mut c: Vec<String> = RUNTIME_DEFAULT_CAPS.map(String::from).to_vec();
            c.extend(pod_spec.capabilities_add.iter().cloned());
            Some(c)
        };
        let opts = ExecOpts {
            caps,
            no_new_privs: !pod_spec.allow_privilege_escalation && !pod_spec.privileged,
            ro_root: pod_spec.read_only_root,
            rw: vec![dir.clone()],
            ro: pod_spec
                .host_paths
                .iter()
                .filter(|m| m.read_only)
                .map(|m| PathBuf::from(&m.mount_path))
                .collect(),
            memlock_unlimited: true,
        };
        let cmd = agent_command(&dir, node.name(), extra_args, env);
        let child = pod.spawn_with(cmd, &opts).unwrap_or_else(|e| {
            panic!(
                "could not start {} in node {}: {e}",
                agent_binary().display(),
                node.name()
            )
        });
        Self::wait_ready(child, dir, Some(pod))
    }

    fn wait_ready(mut child: Child, dir: PathBuf, pod: Option<Pod>) -> Self {
        let export_file = dir.join("flows.jsonl");
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
            pod,
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

    /// The agent's host pid (behind node-exec when it runs in a node).
    pub fn host_pid(&self) -> u32 {
        let id = self.child.as_ref().expect("agent is running").id();
        match &self.pod {
            None => id,
            Some(_) => crate::simnode::real_process(id)
                .unwrap_or_else(|e| panic!("finding the agent behind node-exec: {e}")),
        }
    }

    /// The agent's pid in its pid namespace (the node's when in a node).
    pub fn node_pid(&self) -> u32 {
        let host = self.host_pid();
        crate::simnode::node_pid_of(host)
            .unwrap_or_else(|e| panic!("node pid of the agent (host pid {host}): {e}"))
    }

    /// Waits (up to `secs`) for a log line after "agent ready" that
    /// `pred` accepts, and returns it.
    pub fn wait_for_log(&mut self, secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log_rx.recv_timeout(left) {
                Ok(v) => {
                    self.early_logs.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "{what}: no such log line within {secs} s; the agent's log:\n{:#?}",
                    self.early_logs
                ),
            }
        }
    }

    /// The agent's pod, when it runs in a node.
    pub fn pod(&self) -> Option<&Pod> {
        self.pod.as_ref()
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
        let expected = if self.pod.is_some() {
            crate::support::expected_kernel_degradations_in_node()
        } else {
            crate::support::expected_kernel_degradations()
        };
        assert_eq!(
            got,
            expected,
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
    /// In a node, the request is made from inside the agent's network namespace.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let addr = self.metrics_addr();
        match &self.pod {
            None => http_get(addr, path),
            Some(pod) => {
                let p = path.to_owned();
                pod.run_in_netns(move || {
                    std::panic::catch_unwind(|| http_get(addr, &p)).map_err(|e| {
                        e.downcast_ref::<String>()
                            .cloned()
                            .unwrap_or_else(|| "GET panicked".into())
                    })
                })
                .unwrap_or_else(|e| panic!("GET {path} inside pod {}: {e}", pod.name()))
                .unwrap_or_else(|e| panic!("{e}"))
            }
        }
    }

    /// Stops the agent with SIGINT (it drains the kernel's ring buffer
    /// first) and returns what it recorded.
    pub fn stop(self) -> AgentReport {
        self.stop_with(libc::SIGINT)
    }

    /// Like `stop`, with another signal (SIGTERM is what Kubernetes sends).
    pub fn stop_with(mut self, signal: i32) -> AgentReport {
        let mut child = self.child.take().expect("agent is running");
        // SAFETY: kill(2) takes plain integers: it signals a process this test started.
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

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "flowaudit-test-{}-{}",
        std::process::id(),
        rand_u64()
    ));
    std::fs::create_dir_all(&dir).expect("create the agent's temp dir");
    dir
}

/// `flowaudit agent` with the harness's defaults (see the module docs).
fn agent_command(
    dir: &Path,
    node_name: &str,
    extra_args: &[&str],
    env: &[(&str, &str)],
) -> Command {
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
    let mut cmd = Command::new(agent_binary());
    cmd.arg("agent")
        .arg("--export-file")
        .arg(&export_file)
        .args(["--log-format", "json", "--node-name", node_name])
        .args(&defaults)
        .args(extra_args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// The pod spec can be run here, and its hostPaths exist inside the node.
fn check_node_pod_spec(node: &SimNode, spec: &AgentPodSpec) {
    if let Some(uid) = spec.run_as_user.filter(|u| *u != 0) {
        panic!(
            "the agent's pod runs as uid {uid}: the simulated node runs containers as root only"
        );
    }
    if !spec.host_pid {
        panic!(
            "the agent's pod has hostPID: false: the simulated node runs containers in the node's pid namespace only"
        );
    }
    for m in &spec.host_paths {
        if m.mount_path != m.host_path {
            panic!(
                "hostPath {} is mounted at {}: the simulated node only offers hostPaths at their node path",
                m.host_path, m.mount_path
            );
        }
        let inside = PathBuf::from(format!("/proc/{}/root", node.init_pid()))
            .join(m.mount_path.trim_start_matches('/'));
        // The manifest's hostPaths under the node's own /run are
        // DirectoryOrCreate (the SPIRE admin socket directory): the kubelet
        // creates them; the others (/sys/fs/cgroup) must exist.
        if !inside.exists() && m.host_path.starts_with("/run/") {
            std::fs::create_dir_all(&inside).unwrap_or_else(|e| {
                panic!(
                    "creating hostPath {} in node {}: {e}",
                    m.host_path,
                    node.name()
                )
            });
        }
        if !inside.exists() {
            panic!(
                "the agent's hostPath {} (mounted at {}) does not exist inside node {}",
                m.host_path,
                m.mount_path,
                node.name()
            );
        }
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
    stop_child_with(child, libc::SIGINT, grace);
}

/// Sends `signal`, waits up to `grace`, then kills and reaps.
pub fn stop_child_with(child: &mut std::process::Child, signal: i32, grace: Duration) {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
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

pub fn flows_between(
    flows: &[Value],
    src: std::net::SocketAddr,
    dst: std::net::SocketAddr,
) -> impl Iterator<Item = &Value> {
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
    http_get_from(None, addr, path)
}

/// [`http_get`] from a chosen source address (e.g. 127.0.0.2, to test
/// source-address restrictions on loopback).
pub fn http_get_from(
    source: Option<std::net::IpAddr>,
    addr: std::net::SocketAddr,
    path: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let connect = || -> std::io::Result<std::net::TcpStream> {
        let Some(ip) = source else {
            return std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5));
        };
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        sock.bind(&std::net::SocketAddr::new(ip, 0).into())?;
        sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
        Ok(sock.into())
    };
    let mut s = connect().unwrap_or_else(|e| panic!("connect to {addr} from {source:?}: {e}"));
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
