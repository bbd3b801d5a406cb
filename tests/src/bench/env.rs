//! What every measurement stands on: the prerequisite checks (fail with the
//! fix, never skip), an interrupt flag so Ctrl-C or SIGTERM unwinds through
//! the cleanup guards, the bench node (a simulated node with a client and a
//! server pod, the storm server running in the latter, an endpoint
//! directory naming both), the agent as a DaemonSet would run it (no export
//! file unless asked), and guards for host processes and a tracefs mount.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use flowaudit_tests::simnode::PodProcess;
use flowaudit_tests::{Pod, PodSpec, SimNode};
use serde_json::Value;

use crate::traffic::ServerReady;

// ---------------------------------------------------------------- interrupts

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set a flag that every wait checks: the bench then
/// returns an error and its guards remove pods, namespaces and processes.
pub fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: cleaning up and stopping");
    }
    Ok(())
}

/// Sleeps, waking every 100 ms to notice an interrupt.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// Polls `cond` every 50 ms until it holds; an error names `what`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        check_interrupted()?;
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

// ---------------------------------------------------------------- prerequisites

pub fn on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Fails with the fix when something the chosen measurements need is
/// missing: root, the agent binary, and the peer tools.
pub fn check_prerequisites(agent: &Path, tools: &[(&str, &str)]) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the bench loads eBPF programs and builds network namespaces: run it as root \
             (sudo -E cargo xtask bench)"
        );
    }
    if !agent.is_file() {
        bail!(
            "the agent binary {} does not exist: build it (cargo xtask build) or pass --agent",
            agent.display()
        );
    }
    let missing: Vec<String> = tools
        .iter()
        .filter(|(tool, _)| on_path(tool).is_none())
        .map(|(tool, pkg)| format!("`{tool}` (Debian package {pkg})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing: {}: install with `cargo xtask setup` (or apt-get install)",
            missing.join(", ")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- host processes

/// A process on the host (not in a pod): interrupted, then killed, when dropped.
pub struct HostProcess {
    pub child: Option<Child>,
}

impl HostProcess {
    pub fn spawn(mut cmd: Command, what: &str) -> Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start {what} ({cmd:?})"))?;
        Ok(Self { child: Some(child) })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGINT (tools flush their output on it), then waits up to `grace`.
    pub fn interrupt(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                self.child = None;
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let s = child.wait().ok();
                self.child = None;
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.interrupt(Duration::from_secs(5));
        }
    }
}

/// Mounts tracefs at /sys/kernel/tracing when it is not mounted (libbpf
/// finds tracepoints there) and unmounts it again when dropped; leaves an
/// existing mount alone.
pub struct Tracefs {
    mounted_here: bool,
}

pub const TRACEFS: &str = "/sys/kernel/tracing";

impl Tracefs {
    pub fn ensure() -> Result<Self> {
        if Path::new(TRACEFS).join("events").is_dir() {
            return Ok(Self {
                mounted_here: false,
            });
        }
        let out = Command::new("mount")
            .args(["-t", "tracefs", "nodev", TRACEFS])
            .output()
            .context("run mount")?;
        if !out.status.success() {
            bail!(
                "mount -t tracefs nodev {TRACEFS}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Self { mounted_here: true })
    }
}

impl Drop for Tracefs {
    fn drop(&mut self) {
        if self.mounted_here {
            let _ = Command::new("umount").arg(TRACEFS).status();
        }
    }
}

// ---------------------------------------------------------------- the node

/// Ports the storm server answers on: `CONN_RATE_PORTS` for the
/// connection-rate runs, `STORM_PORTS` for the storm; `simpod serve` answers
/// the event-delay connections on `DELAY_PORT`; iperf3 listens on `IPERF_PORT`.
pub const CONN_RATE_PORTS: std::ops::Range<u16> = 8000..8016;
pub const STORM_PORTS: std::ops::Range<u16> = 9000..9064;
pub const DELAY_PORT: u16 = 8100;
pub const IPERF_PORT: u16 = 5201;
/// Client ports the generators bind explicitly. 4-tuples never repeat
/// within a run: the storm's 64 server ports x 50,000 client ports give
/// 3,200,000 (80 s at 40,000 connections a second; a run that used them
/// all stops early and says so); 16 ports, as before 2026-12-07, gave
/// 800,000, which a 25 s pinned run outgrew.
pub const CLIENT_PORTS: (u16, u16) = (10000, 59999);

pub struct BenchNode {
    // Field order is drop order: the server processes before the node.
    pub server_proc: PodProcess,
    pub delay_server: flowaudit_tests::simpod::Server,
    pub client: Pod,
    pub server: Pod,
    pub node: SimNode,
    pub endpoints: PathBuf,
    pub dir: PathBuf,
}

impl BenchNode {
    /// A node (index `index`) with a frontend (client) and a backend
    /// (server) pod of precinct-99, the storm server running in the backend.
    pub fn start(index: u8, dir: &Path, server_threads: usize) -> Result<Self> {
        let node = SimNode::new(index).context("build the simulated node")?;
        let client = node
            .add_pod(
                PodSpec::new("99-apps", "frontend-7d9f")
                    .service_account("frontend")
                    .label("app", "frontend"),
            )
            .context("client pod")?;
        let server = node
            .add_pod(
                PodSpec::new("99-apps", "backend-5c8b")
                    .service_account("backend")
                    .label("app", "backend"),
            )
            .context("server pod")?;
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let endpoints = dir.join("endpoints.yaml");
        let mut y = format!(
            "nodes:\n  - name: sim-node\n    ips: [{}, \"{}\"]\nendpoints:\n",
            node.ip4(),
            node.ip6()
        );
        for p in [&client, &server] {
            y.push_str(&flowaudit_tests::scenario::endpoint_entry(p, "sim-node"));
        }
        std::fs::write(&endpoints, y).context("write the endpoint directory")?;
        let ports: Vec<String> = CONN_RATE_PORTS
            .chain(STORM_PORTS)
            .map(|p| p.to_string())
            .collect();
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("storm-server")
            .arg("--ip")
            .arg(server.ip4().to_string())
            .arg("--threads")
            .arg(server_threads.to_string())
            .arg("--ports")
            .arg(ports.join(","))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut server_proc = server
            .spawn_guarded(cmd)
            .context("start the storm server")?;
        let stdout = server_proc
            .child_mut()
            .stdout
            .take()
            .context("storm server stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("read the storm server's ready line")?;
        let _: ServerReady = serde_json::from_str(line.trim())
            .with_context(|| format!("storm server did not say ready (got {line:?})"))?;
        // Reads each request to EOF, answers, closes: an orderly exchange.
        let delay_server = server
            .serve(&flowaudit_tests::simpod::ServeOpts {
                listen: vec![SocketAddr::new(IpAddr::V4(server.ip4()), DELAY_PORT)],
                reply_bytes: 64,
            })
            .context("start simpod serve for the event-delay connections")?;
        Ok(Self {
            server_proc,
            delay_server,
            client,
            server,
            node,
            endpoints,
            dir: dir.to_owned(),
        })
    }

    /// Tears the node down and reports what could not be removed (dropping
    /// it does the same, but can only print).
    pub fn shutdown(self) -> Result<()> {
        let BenchNode {
            server_proc,
            delay_server,
            node,
            ..
        } = self;
        drop(server_proc);
        drop(delay_server);
        node.shutdown().context("tear down the simulated node")
    }

    pub fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.server.ip4()), port)
    }

    /// Runs this binary's `args` in the client pod to completion; its stdout.
    pub fn run_in_client(&self, args: &[String]) -> Result<String> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut proc = self.client.spawn_guarded(cmd)?;
        let mut out = String::new();
        let mut stdout = proc.child_mut().stdout.take().context("client stdout")?;
        // Read on a thread so an interrupt is noticed while it runs.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut s = String::new();
            let r = stdout.read_to_string(&mut s).map(|_| s);
            let _ = tx.send(r);
        });
        loop {
            check_interrupted()?;
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(r) => {
                    out = r.context("read the client's output")?;
                    break;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = proc.child_mut().wait()?;
        if !status.success() {
            bail!("{} in the client pod failed ({status})", args.join(" "));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------- SPIRE

/// SPIRE's Delegated Identity API as the agent meets it on a node: the
/// `spire-double` binary (`tests/src/spire_double.rs`, which cites the
/// spiffe/spire source of each release it reproduces) on the host, where
/// the bench's agent runs, knowing the two pods and one registration entry
/// per workload by namespace and service account (as a ClusterSPIFFEID
/// makes them). The agent is let in as an authorized delegate. Stopped
/// (SIGINT) when dropped.
pub struct BenchSpire {
    proc: HostProcess,
    pub socket: PathBuf,
    pub release: String,
}

impl BenchSpire {
    pub fn start(node: &BenchNode, release: &str) -> Result<Self> {
        let dir = node.dir.join("spire");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let socket = dir.join("admin.sock");
        let mut cfg = flowaudit_tests::spire_double::SpireDoubleConfig::new(&socket, "demo.local")
            .ttl(3600)
            .version(release);
        for p in [&node.client, &node.server] {
            let id = format!(
                "spiffe://demo.local/ns/{}/sa/{}",
                p.namespace(),
                p.service_account()
            );
            cfg = cfg
                .pod(p.uid(), p.namespace(), p.service_account(), p.name())
                .entry(
                    &id,
                    &[
                        &format!("k8s:ns:{}", p.namespace()),
                        &format!("k8s:sa:{}", p.service_account()),
                    ],
                );
        }
        cfg.authorized = Some(true);
        let config = dir.join("spire-double.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&cfg)?)
            .with_context(|| format!("write {}", config.display()))?;
        let bin = flowaudit_tests::simnode::sibling_binary("spire-double", "SPIRE_DOUBLE_BIN")
            .map_err(|e| anyhow!("{e}"))?;
        let mut cmd = Command::new(&bin);
        cmd.arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut proc = HostProcess::spawn(cmd, "the SPIRE double (spire-double)")?;
        let stdout = proc
            .child
            .as_mut()
            .and_then(|c| c.stdout.take())
            .context("spire-double stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains("\"ready\":true") => {}
            got => bail!(
                "spire-double ({}) did not say it was ready: {got:?}",
                bin.display()
            ),
        }
        Ok(Self {
            proc,
            socket,
            release: release.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

// ---------------------------------------------------------------- the agent

/// `flowaudit agent` with the flags a DaemonSet would give it (policy,
/// endpoint directory, no SPIRE), metrics on a free loopback port and the
/// gRPC stream on a socket of its own, JSON logs read on a thread.
pub struct BenchAgent {
    child: Option<Child>,
    logs: Arc<Mutex<Vec<Value>>>,
    pub metrics: SocketAddr,
    pub grpc: String,
}

pub struct AgentConfig {
    pub binary: PathBuf,
    pub policy: PathBuf,
    pub endpoints: PathBuf,
    /// SPIRE's admin socket; `None` runs the agent without SPIRE
    /// (`--spire-admin-socket none`).
    pub spire_socket: Option<PathBuf>,
    pub extra: Vec<String>,
}

impl BenchAgent {
    pub fn start(cfg: &AgentConfig, dir: &Path, more: &[String]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let sock = dir.join("flowaudit.sock");
        let mut cmd = Command::new(&cfg.binary);
        cmd.arg("agent")
            .arg("--policy")
            .arg(&cfg.policy)
            .arg("--endpoints")
            .arg(&cfg.endpoints)
            .arg("--spire-admin-socket")
            .arg(cfg.spire_socket.as_deref().unwrap_or(Path::new("none")))
            .args(["--metrics-addr", "127.0.0.1:0"])
            .arg("--grpc-addr")
            .arg(format!("unix://{}", sock.display()))
            .args(["--log-format", "json", "--node-name", "sim-node"])
            .args(&cfg.extra)
            .args(more)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start {}", cfg.binary.display()))?;
        let stderr = child.stderr.take().context("agent stderr")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<Value>();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                    let _ = tx.send(v.clone());
                    logs.lock().unwrap_or_else(|p| p.into_inner()).push(v);
                }
            });
        }
        let mut agent = Self {
            child: Some(child),
            logs,
            metrics: SocketAddr::from(([127, 0, 0, 1], 0)),
            grpc: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            check_interrupted()?;
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(v) => {
                    let msg = message(&v);
                    if msg.starts_with("metrics listening") {
                        if let Some(a) = v["addr"].as_str().and_then(|a| a.parse().ok()) {
                            agent.metrics = a;
                        }
                    } else if msg.starts_with("gRPC flow stream listening") {
                        if let Some(a) = v["addr"].as_str() {
                            agent.grpc = a.to_owned();
                        }
                    } else if msg.starts_with("agent ready") {
                        if agent.metrics.port() == 0 || agent.grpc.is_empty() {
                            bail!(
                                "the agent said ready without logging its metrics and gRPC addresses"
                            );
                        }
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if Instant::now() > deadline {
                        bail!("the agent did not report ready within 60 s");
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = agent.child.as_mut().and_then(|c| c.wait().ok());
                    bail!(
                        "the agent exited before it was ready ({status:?}); its log:\n{}",
                        agent.log_text()
                    );
                }
            }
        }
        // With SPIRE, measure the agent as it runs attested, not the
        // fallback of its first moments.
        if let Some(socket) = &cfg.spire_socket
            && wait_until(
                "the agent's SPIRE connection",
                Duration::from_secs(30),
                || {
                    agent
                        .metric("flowaudit_spire_connected")
                        .is_ok_and(|v| v == 1.0)
                },
            )
            .is_err()
        {
            bail!(
                "the agent did not connect to SPIRE at {} within 30 s; its log:\n{}",
                socket.display(),
                agent.log_text()
            );
        }
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_text(&self) -> String {
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Sum of every series of the metric `name` on /metrics.
    pub fn metric(&self, name: &str) -> Result<f64> {
        Ok(metric_sum(&self.metrics_text()?, name))
    }

    /// One scrape of /metrics.
    pub fn metrics_text(&self) -> Result<String> {
        let (code, body) = http_get(self.metrics, "/metrics")?;
        if code != 200 {
            bail!("GET /metrics answered {code}");
        }
        Ok(body)
    }

    /// (user + system CPU seconds, peak resident MiB) of the agent so far.
    pub fn cpu_and_peak_rss(&self) -> (f64, f64) {
        proc_cpu_and_peak_rss(self.pid())
    }

    /// SIGINT, wait for it to drain and detach; the fields of its
    /// "agent stopped" log line.
    pub fn stop(mut self) -> Result<Value> {
        let mut child = self.child.take().context("agent already stopped")?;
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the agent did not stop within 60 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends with the pipe; give it a moment.
        std::thread::sleep(Duration::from_millis(100));
        if !status.success() {
            bail!(
                "the agent exited with {status}; its log:\n{}",
                self.log_text()
            );
        }
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        logs.iter()
            .find(|v| message(v).starts_with("agent stopped"))
            .cloned()
            .ok_or_else(|| anyhow!("the agent never logged 'agent stopped'"))
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            flowaudit_tests::agent::stop_child(&mut child, Duration::from_secs(10));
        }
    }
}

fn message(v: &Value) -> &str {
    v.get("message").and_then(Value::as_str).unwrap_or("")
}

/// Sum of the samples of `name` (with or without labels) in an exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(r) => r.split_once('}')?.1,
                None => rest,
            };
            rest.strip_prefix(' ')?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .sum()
}

/// A minimal HTTP/1.0 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("GET {path} from {addr}: not an HTTP response"))?;
    Ok((code, body.to_owned()))
}

/// Clock ticks per second of the CPU times in /proc (`_SC_CLK_TCK`).
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        t if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// The whole machine's CPU time so far (the `cpu` line of /proc/stat), in
/// seconds summed over all CPUs: what every process and the kernel (its
/// programs, softirqs, interrupts) spent, and how long the CPUs were idle.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MachineCpu {
    /// user, nice, system, irq, softirq and steal.
    pub busy: f64,
    /// idle and iowait.
    pub idle: f64,
}

impl MachineCpu {
    pub fn now() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        Self::parse(&stat).context("/proc/stat has no readable `cpu` line")
    }

    fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let f: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse::<f64>())
            .collect::<Result<_, _>>()
            .ok()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice]:
        // guest time is counted in user already.
        let t = |i: usize| f.get(i).copied().unwrap_or(0.0);
        if f.len() < 4 {
            return None;
        }
        let tick = ticks_per_sec();
        Some(Self {
            busy: (t(0) + t(1) + t(2) + t(5) + t(6) + t(7)) / tick,
            idle: (t(3) + t(4)) / tick,
        })
    }

    /// What was spent from `self` to `later`.
    pub fn until(self, later: Self) -> Self {
        Self {
            busy: later.busy - self.busy,
            idle: later.idle - self.idle,
        }
    }

    /// The share of the time the CPUs were busy, 0 to 1.
    pub fn busy_share(&self) -> f64 {
        self.busy / (self.busy + self.idle)
    }
}

/// The name and user + system CPU seconds of a /proc `stat` line
/// ("PID (comm) state ...": utime and stime are fields 14 and 15).
fn stat_name_and_cpu(stat: &str) -> Option<(&str, f64)> {
    let tick = ticks_per_sec();
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = &head[head.find('(')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((comm, (ut + st) / tick))
}

/// (user + system CPU seconds, peak resident MiB) of a process.
pub fn proc_cpu_and_peak_rss(pid: u32) -> (f64, f64) {
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(stat_name_and_cpu(&s)?.1))
        .unwrap_or(f64::NAN);
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0);
    (cpu, hwm)
}

/// User + system CPU seconds of each thread of a process, by thread id,
/// with the thread's name (`/proc/PID/task/TID/stat`). A thread that ended
/// is missing; a thread that cannot be read is skipped.
pub fn proc_thread_cpu(pid: u32) -> std::collections::BTreeMap<u32, (String, f64)> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        if let Some((comm, cpu)) = stat_name_and_cpu(&stat) {
            out.insert(tid, (comm.to_string(), cpu));
        }
    }
    out
}

/// CPU seconds each thread name used between two [`proc_thread_cpu`]
/// readings (a thread started in between counts from 0).
pub fn thread_cpu_by_name(
    before: &std::collections::BTreeMap<u32, (String, f64)>,
    after: &std::collections::BTreeMap<u32, (String, f64)>,
) -> std::collections::BTreeMap<String, f64> {
    let mut by = std::collections::BTreeMap::new();
    for (tid, (comm, cpu)) in after {
        let was = before.get(tid).map_or(0.0, |b| b.1);
        *by.entry(comm.clone()).or_insert(0.0) += cpu - was;
    }
    by
}

/// Resident MiB of a process's BPF map mappings (`anon_inode:bpf-map` in
/// /proc/PID/smaps): for the agent, its ring buffer, whose data pages are
/// mapped twice (so that a record can wrap around the end) and so count
/// twice in RSS, though the kernel holds them once.
pub fn proc_bpf_map_rss(pid: u32) -> f64 {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return f64::NAN;
    };
    let mut in_map = false;
    let mut kib = 0.0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some(first) if first.contains('-') && !first.ends_with(':') => {
                in_map = line.ends_with("anon_inode:bpf-map");
            }
            Some("Rss:") if in_map => {
                kib += words
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
            _ => {}
        }
    }
    kib / 1024.0
}

/// The block device holding `path` and how many of its interrupts each CPU
/// has taken (from `/sys/dev/block`, the device's `msi_irqs` and
/// `/proc/interrupts`); None when that cannot be told (tmpfs, a device
/// without MSI interrupts, another sysfs layout).
pub fn disk_interrupts(path: &Path) -> Option<(String, Vec<u64>)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let block = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    let name = block.file_name()?.to_string_lossy().into_owned();
    // A partition's device is its disk's parent: walk up to the first
    // directory with interrupts.
    let irqs: Vec<u32> = block.ancestors().find_map(|d| {
        let list: Vec<u32> = std::fs::read_dir(d.join("msi_irqs"))
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        (!list.is_empty()).then_some(list)
    })?;
    let text = std::fs::read_to_string("/proc/interrupts").ok()?;
    let counts = interrupt_counts(&text, &irqs);
    (counts.iter().sum::<u64>() > 0).then_some((name, counts))
}

/// Adds up, per CPU, the counts of `irqs` in `/proc/interrupts` text.
fn interrupt_counts(text: &str, irqs: &[u32]) -> Vec<u64> {
    let mut lines = text.lines();
    let cpus = lines.next().map_or(0, |h| h.split_whitespace().count());
    let mut sum = vec![0u64; cpus];
    for line in lines {
        let Some((irq, rest)) = line.trim_start().split_once(':') else {
            continue;
        };
        if !irq.parse::<u32>().is_ok_and(|n| irqs.contains(&n)) {
            continue;
        }
        for (cpu, n) in rest.split_whitespace().take(cpus).enumerate() {
            sum[cpu] += n.parse::<u64>().unwrap_or(0);
        }
    }
    sum
}

/// Sets the CPU affinity of every thread of `pid` (threads it starts later
/// inherit it from their parent thread): `Some(cpu)` pins them to that CPU,
/// `None` gives them every CPU back. Errors name the thread that refused.
pub fn pin_process(pid: u32, cpu: Option<usize>) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; all zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let cpus: Vec<usize> = match cpu {
        Some(c) => vec![c],
        None => (0..crate::storm::num_cpus()).collect(),
    };
    for c in cpus {
        // SAFETY: `set` is a valid cpu_set_t and c is below the CPU count.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("list the threads of pid {pid}"))?;
    for t in tasks.filter_map(|e| e.ok()) {
        let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: `set` is a valid cpu_set_t of the size passed.
        let rc =
            unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // A thread that just ended is not an error.
            if e.raw_os_error() != Some(libc::ESRCH) {
                bail!("sched_setaffinity of thread {tid} of pid {pid} to {cpu:?}: {e}");
            }
        }
    }
    Ok(())
}

/// Other processes that used at least 20% of a core over `window`
/// (a build beside the bench makes every number noisy): "comm (pct%)".
pub fn busy_others(window: Duration) -> Vec<String> {
    fn sample() -> std::collections::HashMap<u32, (String, u64)> {
        let mut m = std::collections::HashMap::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return m;
        };
        for e in dir.filter_map(|e| e.ok()) {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = stat[open + 1..close].to_owned();
            let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            let ticks = f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
            m.insert(pid, (comm, ticks));
        }
        m
    }
    let hz = ticks_per_sec();
    let a = sample();
    std::thread::sleep(window);
    let b = sample();
    let me = std::process::id();
    let mut busy: Vec<(f64, String)> = b
        .iter()
        .filter(|(pid, _)| **pid != me)
        .filter_map(|(pid, (comm, t1))| {
            let t0 = a.get(pid).map_or(0, |x| x.1);
            let pct = 100.0 * (t1.saturating_sub(t0)) as f64 / hz / window.as_secs_f64();
            (pct >= 20.0).then(|| (pct, comm.clone()))
        })
        .collect();
    busy.sort_by(|x, y| y.0.total_cmp(&x.0));
    busy.into_iter()
        .map(|(pct, comm)| format!("{comm} ({pct:.0}% of a core)"))
        .collect()
}

/// Other `flowaudit agent` processes on the machine: their programs see the
/// bench's connections too, so a "bare" run would not be bare.
pub fn other_agents() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let mut args = cmd.split(|b| *b == 0);
            let exe = args.next().unwrap_or_default();
            exe.ends_with(b"flowaudit") && args.next() == Some(b"agent".as_slice())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_counts_add_up_a_devices_lines_per_cpu() {
        let text = "           CPU0       CPU1       \n \
             35:          0          1 PCI-MSIX-0000:00:02.0   0-edge      virtio1-config\n \
             36:          7     102107 PCI-MSIX-0000:00:02.0   1-edge      virtio1-req.0\n \
             38:          0       7702 PCI-MSIX-0000:00:03.0   1-edge      virtio2-input.0\n\
            NMI:          0          0   Non-maskable interrupts\n";
        assert_eq!(interrupt_counts(text, &[35, 36]), vec![7, 102108]);
        assert_eq!(interrupt_counts(text, &[99]), vec![0, 0]);
    }

    #[test]
    fn a_file_on_no_block_device_has_no_disk() {
        assert_eq!(disk_interrupts(Path::new("/proc/self/stat")), None);
    }

    #[test]
    fn machine_cpu_reads_the_cpu_line() {
        let tick = ticks_per_sec();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let stat = "cpu  100 10 50 800 40 5 15 2 7 0\ncpu0 50 5 25 400 20 2 7 1 3 0\nintr 1\n";
        let m = MachineCpu::parse(stat).expect("parsed");
        assert!(
            close(m.busy, (100.0 + 10.0 + 50.0 + 5.0 + 15.0 + 2.0) / tick),
            "{m:?}"
        );
        assert!(close(m.idle, (800.0 + 40.0) / tick), "{m:?}");
        let later = MachineCpu::parse("cpu  200 10 50 900 40 5 15 2 0 0\n").expect("parsed");
        let d = m.until(later);
        assert!(close(d.busy, 100.0 / tick), "{d:?}");
        assert!(close(d.busy_share(), 0.5), "{d:?}");
        // An old kernel's short line (no steal) still reads; a line of
        // words does not.
        let short = MachineCpu::parse("cpu  1 2 3 4\n").expect("parsed");
        assert!(close(short.idle, 4.0 / tick), "{short:?}");
        assert!(MachineCpu::parse("cpu  a b c d\n").is_none());
        assert!(MachineCpu::parse("cpu0 1 2 3 4\n").is_none());
    }

    #[test]
    fn metric_sum_adds_labelled_series() {
        let text = "# TYPE x counter\nx_total{a=\"1\"} 2\nx_total{a=\"2\"} 3\nx_total_other 9\nx_total 1\n";
        assert_eq!(metric_sum(text, "x_total"), 6.0);
        assert_eq!(metric_sum(text, "missing"), 0.0);
    }
}
