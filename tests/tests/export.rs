//! The export side of the real agent on a simulated node: a real Prometheus
//! scrapes `/metrics` and PromQL returns the flow counts of traffic the test
//! made (and `promtool check metrics` is clean); an independent Python
//! grpcio client, generated from the .proto, tails the stream with filters;
//! a stalled subscriber loses only its own flows and is told how many; 100
//! subscribers each get every flow; `observe -f` survives an agent restart;
//! `observe` output matches golden files. Prints the measured stream
//! throughput and delay. Needs root (except the golden test); never skips.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use flowaudit_tests::Pod;
use flowaudit_tests::agent::{RunningAgent, agent_binary, http_get};
use flowaudit_tests::simpod::{ConnResult, ConnectOpts, ConnectReport, ServeOpts, Server};
use flowaudit_tests::support::*;
use serde_json::Value;

fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn serve(server: &Pod, ports: &[u16]) -> Server {
    server
        .serve(&ServeOpts {
            listen: ports
                .iter()
                .map(|p| SocketAddr::new(IpAddr::V4(server.ip4()), *p))
                .collect(),
            reply_bytes: 10,
        })
        .expect("server")
}

fn connect(client: &Pod, server: &Pod, port: u16, count: u64, concurrency: u32) -> ConnectReport {
    let mut opts = ConnectOpts::new(SocketAddr::new(IpAddr::V4(server.ip4()), port));
    opts.count = count;
    opts.concurrency = concurrency;
    opts.send_bytes = 10;
    let report = client.connect(&opts).expect("client");
    let failed: Vec<_> = report
        .records
        .iter()
        .filter(|r| r.result != ConnResult::Ok)
        .collect();
    assert!(failed.is_empty(), "connections failed: {failed:?}");
    assert_eq!(report.records.len() as u64, count);
    report
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of one exposition line `series value`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn wait_subscribers(agent: &RunningAgent, n: usize) {
    wait_until(
        &format!("the agent has {n} stream subscribers"),
        Duration::from_secs(60),
        || {
            sample(
                &agent.http_get("/metrics").1,
                "flowaudit_stream_subscribers",
            ) == Some(n as f64)
        },
    );
}

fn observe(server: &str, args: &[&str]) -> Command {
    let mut c = Command::new(agent_binary());
    c.args(["observe", "--server", server, "--color", "never"])
        .args(args);
    c
}

/// A child's output lines, each with the wall time it arrived.
struct Lines {
    rx: mpsc::Receiver<(SystemTime, String)>,
    got: Vec<(SystemTime, String)>,
    /// What else a failed wait shows (the child's stderr, say).
    context: Option<Box<dyn Fn() -> String>>,
}

impl Lines {
    fn new(r: impl Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(r).lines().map_while(Result::ok) {
                if tx.send((SystemTime::now(), l)).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            got: Vec::new(),
            context: None,
        }
    }

    /// A failed wait also shows what `context` says.
    fn with_context(mut self, context: impl Fn() -> String + 'static) -> Self {
        self.context = Some(Box::new(context));
        self
    }

    fn drain(&mut self) -> usize {
        while let Ok(l) = self.rx.try_recv() {
            self.got.push(l);
        }
        self.got.len()
    }

    fn wait_count(&mut self, n: usize, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        while self.drain() < n {
            if Instant::now() > deadline {
                panic!(
                    "{what}: expected {n} lines within {timeout:?}, got {}; last: {:?}{}",
                    self.got.len(),
                    self.got.last(),
                    self.context.as_ref().map(|c| c()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            if let Some((_, l)) = self.got.iter().find(|(_, l)| l.contains(needle)) {
                return l.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "no line containing {needle:?} within {timeout:?}; got {:?}",
                    self.got
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn sigint_and_wait(child: &mut Child, what: &str) {
    // SAFETY: kill(2) takes plain integers: it signals a process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "{what} exited with {status} on Ctrl-C");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not end within 10 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (at most `limit`) for a child to exit, then takes what it
/// printed (a few lines: its pipes do not fill meanwhile).
fn wait_output(mut child: Child, limit: Duration, what: &str) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("its output")
}

fn parse_time(t: &str) -> SystemTime {
    // 2026-11-28T12:00:01.123456789Z; the agent always writes this form.
    let num = |r: std::ops::Range<usize>| -> i64 { t[r].parse().expect("time digits") };
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2.rem_euclid(400);
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = days * 86_400 + num(11..13) * 3600 + num(14..16) * 60 + num(17..19);
    SystemTime::UNIX_EPOCH + Duration::new(secs as u64, num(20..29) as u32)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------- Prometheus

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A keep-alive HTTP/1.1 client: one TCP connection for all queries, so the
/// test's own queries add no flows to the counts it checks.
struct Http {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
}

impl Http {
    fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        Self {
            addr,
            reader: BufReader::new(s),
        }
    }

    fn get(&mut self, path: &str) -> (u16, String) {
        let addr = self.addr;
        write!(
            self.reader.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n"
        )
        .unwrap_or_else(|e| panic!("send to {addr}: {e}"));
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let code: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response from {addr}: {line:?}"));
        let (mut length, mut chunked) = (0usize, false);
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("header");
            let h = line.trim_end().to_ascii_lowercase();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.strip_prefix("content-length:") {
                length = v.trim().parse().expect("content-length");
            }
            if h.starts_with("transfer-encoding:") && h.contains("chunked") {
                chunked = true;
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line).expect("chunk size");
                let n = usize::from_str_radix(line.trim(), 16).expect("chunk size");
                let mut chunk = vec![0; n + 2];
                self.reader.read_exact(&mut chunk).expect("chunk");
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else {
            body.resize(length, 0);
            self.reader.read_exact(&mut body).expect("body");
        }
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    /// A PromQL instant query whose result is one number (None: no series).
    fn query(&mut self, expr: &str) -> Option<f64> {
        let enc: String = expr
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (code, body) = self.get(&format!("/api/v1/query?query={enc}"));
        assert_eq!(code, 200, "PromQL {expr}: {body}");
        let v: Value = serde_json::from_str(&body).expect("PromQL JSON");
        let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
        result.first().map(|r| {
            r["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("PromQL {expr}: {body}"))
        })
    }
}

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    /// Removed (its own drop) once the process is gone.
    _dir: TestDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = temp_dir("prometheus");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: flowaudit\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("could not start prometheus ({e}): install Debian's `prometheus` (cargo xtask setup)")
            });
        let p = Self {
            child,
            addr,
            _dir: dir,
        };
        wait_until("Prometheus is ready", Duration::from_secs(60), || {
            TcpStream::connect(addr).is_ok() && http_get(addr, "/-/ready").0 == 200
        });
        p
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: kill(2) takes plain integers: it signals a process this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_the_flow_counts_of_generated_traffic() {
    require_root();
    let (_node, client, server) = two_pods(40);
    let _srv = serve(&server, &[8000]);
    let agent = RunningAgent::start(&[]);
    assert_eq!(agent.http_get("/healthz"), (200, "ok\n".to_owned()));
    // `attached` is set just after the "agent ready" log line.
    wait_until("/readyz says ready", Duration::from_secs(10), || {
        agent.http_get("/readyz") == (200, "ready\n".to_owned())
    });

    // promtool lints the exposition as the agent serves it to plain scrapers.
    let (code, text) = agent.http_get("/metrics");
    assert_eq!(code, 200);
    for name in [
        "flowaudit_flows_total",
        "flowaudit_findings_total",
        // flowaudit_policy_violations_total has series only once a
        // violation names its identities (none without a policy).
        "flowaudit_flow_encryption_total",
        "flowaudit_kernel_events_total",
        "flowaudit_kernel_events_lost_total",
        "flowaudit_identity_lookups_total",
        "flowaudit_spire_connected",
        "flowaudit_stream_subscribers",
        "flowaudit_stream_dropped_total",
        "flowaudit_policy_reloads_total",
        "flowaudit_policy_rules",
        "flowaudit_build_info",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "metric {name} is not exposed:\n{text}"
        );
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics is not clean: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let prom = Prometheus::start(agent.metrics_addr());
    let mut http = Http::connect(prom.addr);
    wait_until(
        "Prometheus scraped the agent",
        Duration::from_secs(30),
        || {
            http.query("up{job=\"flowaudit\"}") == Some(1.0)
                && http.query("flowaudit_build_info").is_some()
        },
    );
    // Let a scrape happen after our own query connection was counted.
    std::thread::sleep(Duration::from_millis(2500));
    let egress = "sum(flowaudit_flows_total{event=\"CONNECT\",direction=\"EGRESS\"})";
    let ingress_close = "sum(flowaudit_flows_total{event=\"CLOSE\",direction=\"INGRESS\"})";
    let base_egress = http.query(egress).unwrap_or(0.0);
    let base_close = http.query(ingress_close).unwrap_or(0.0);

    const N: u64 = 150;
    connect(&client, &server, 8000, N, 4);
    wait_until(
        "Prometheus sees the new CONNECT EGRESS flows",
        Duration::from_secs(30),
        || http.query(egress).unwrap_or(0.0) - base_egress >= N as f64,
    );
    std::thread::sleep(Duration::from_millis(2500)); // a later scrape: nothing more should come
    let d_egress = http.query(egress).unwrap_or(0.0) - base_egress;
    let d_close = http.query(ingress_close).unwrap_or(0.0) - base_close;
    // Exactly the test's connections; a little room for unrelated TCP on this machine.
    for (what, d) in [("CONNECT EGRESS", d_egress), ("CLOSE INGRESS", d_close)] {
        assert!(
            (N as f64..=N as f64 + 3.0).contains(&d),
            "PromQL increase of {what} flows: expected {N} (the test's connections), got {d}"
        );
    }
    assert_eq!(http.query("flowaudit_kernel_events_lost_total"), Some(0.0));
    assert!(http.query("flowaudit_kernel_events_total").unwrap_or(0.0) >= (4 * N) as f64);
    println!("prometheus: {N} connections -> CONNECT EGRESS +{d_egress}, CLOSE INGRESS +{d_close}");
    drop(prom);
    let report = agent.stop();
    assert_eq!(report.counter("kernel_events_lost"), 0);
}

// ---------------------------------------------------------------- Python client

fn python_client(server: &str, args: &[&str]) -> Command {
    let mut c = Command::new(venv_python());
    c.arg(tests_dir().join("python/flowaudit_client.py"))
        .args(["--server", server])
        .args(args);
    c
}

fn python_json(server: &str, args: &[&str]) -> Value {
    let out = python_client(server, args)
        .output()
        .expect("the virtual environment's python3");
    assert!(
        out.status.success(),
        "python client {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "python client {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn python_grpc_client_tails_the_stream_with_filters() {
    require_root();
    let (_node, client, server) = two_pods(41);
    let _srv = serve(&server, &[8000, 9000]);
    let agent = RunningAgent::start(&[]);
    let addr = agent.grpc_addr();
    let sock = addr
        .strip_prefix("unix://")
        .expect("a Unix socket by default");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket {sock} mode {mode:o}");

    // Reflection: a generic client finds the service and its file.
    let r = python_json(&addr, &["reflect"]);
    let services: Vec<&str> = r["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(services.contains(&"flowaudit.v1.FlowAudit"), "{r}");
    assert!(
        r["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "flowaudit/v1/flowaudit.proto"),
        "{r}"
    );

    const N: u64 = 20;
    let tail = python_client(
        &addr,
        &[
            "tail",
            "--follow",
            "--port",
            "8000",
            "--event",
            "CONNECT",
            "--expect",
            "40",
            "--idle",
            "2",
            "--deadline",
            "90",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("the virtual environment's python3");
    wait_subscribers(&agent, 1);
    let good = connect(&client, &server, 8000, N, 2);
    connect(&client, &server, 9000, 10, 2); // filtered out by port
    let out = tail.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python tail failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut seen = BTreeSet::new();
    for l in &lines {
        let f = &l["flow"];
        assert_eq!(f["event"], "EVENT_KIND_CONNECT", "{l}");
        assert_eq!(f["l4"]["destination_port"], 8000, "{l}");
        assert_eq!(l["node_name"], "sim-node");
        seen.insert((
            f["l4"]["source_port"].as_u64().unwrap(),
            f["direction"].as_str().unwrap().to_owned(),
        ));
    }
    let expected: BTreeSet<(u64, String)> = good
        .records
        .iter()
        .flat_map(|r| {
            let p = u64::from(r.local.unwrap().port());
            [
                (p, "DIRECTION_EGRESS".to_owned()),
                (p, "DIRECTION_INGRESS".to_owned()),
            ]
        })
        .collect();
    assert_eq!(
        lines.len(),
        2 * N as usize,
        "exactly one CONNECT per side: {lines:#?}"
    );
    assert_eq!(seen, expected);

    let st = python_json(&addr, &["status"]);
    assert_eq!(st["node_name"], "sim-node", "{st}");
    assert_eq!(st["ready"], true, "{st}");

    // `flowaudit status` prints the same.
    let out = Command::new(agent_binary())
        .args(["status", "--server", &addr])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "Node:               sim-node",
        "Ready:              yes",
        "Kernel events lost: 0",
        "Identity cache:",
        "SPIRE connection:",
        // This agent runs without --policy.
        "Policy version:     none (the agent runs without --policy",
    ] {
        assert!(text.contains(line), "status lacks {line:?}:\n{text}");
    }

    // The stream and the export file print the same flows the same way.
    let from_server = observe(&addr, &["--last", "8000", "-o", "json", "--port", "8000"])
        .output()
        .unwrap();
    assert!(from_server.status.success());
    let report = agent.stop();
    let dir = temp_dir("python");
    let flows_file = dir.join("flows.jsonl");
    let text: String = report.flows.iter().map(|f| format!("{f}\n")).collect();
    std::fs::write(&flows_file, text).unwrap();
    let from_file = Command::new(agent_binary())
        .args(["observe", "--input-file"])
        .arg(&flows_file)
        .args(["-o", "json", "--port", "8000"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&from_server.stdout),
        String::from_utf8_lossy(&from_file.stdout)
    );
    assert_eq!(
        String::from_utf8_lossy(&from_server.stdout).lines().count(),
        4 * N as usize
    );
}

// ---------------------------------------------------------------- slow readers

#[test]
fn a_stalled_subscriber_loses_only_its_own_flows_and_is_told() {
    require_root();
    let (_node, client, server) = two_pods(42);
    let _srv = serve(&server, &[8000]);
    let agent = RunningAgent::start(&[]);
    let addr = agent.grpc_addr();
    let dir = temp_dir("stalled");
    let mut fast = observe(&addr, &["-f", "-o", "json", "--port", "8000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut fast_out = Lines::new(fast.stdout.take().unwrap());
    let mut fast_err = Lines::new(fast.stderr.take().unwrap());
    let mut stalled = observe(&addr, &["-f", "-o", "json", "--port", "8000"])
        .stdout(std::fs::File::create(dir.join("stalled.out")).unwrap())
        .stderr(std::fs::File::create(dir.join("stalled.err")).unwrap())
        .spawn()
        .unwrap();
    wait_subscribers(&agent, 2);
    // Connected and subscribed, and now it never reads again.
    // SAFETY: kill(2) takes plain integers: it signals a process this test started.
    unsafe { libc::kill(stalled.id() as i32, libc::SIGSTOP) };

    // More than a stalled subscriber can be held for: its queue (4,096
    // flows), the hub's ring it waits on (256 entries of up to 64 flows),
    // and what its HTTP/2 stream and socket buffers take.
    const N: u64 = 8000;
    let total = 4 * N as usize; // CONNECT and CLOSE, both sides
    connect(&client, &server, 8000, N, 8);
    fast_out.wait_count(total, Duration::from_secs(120), "the reading subscriber");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        fast_out.drain(),
        total,
        "the reading subscriber got extra flows"
    );
    fast_err.drain();
    assert!(
        fast_err.got.is_empty(),
        "the reading subscriber was told of losses: {:?}",
        fast_err.got
    );
    let metrics = agent.http_get("/metrics").1;
    let dropped = sample(&metrics, "flowaudit_stream_dropped_total").unwrap_or(0.0) as u64;
    assert!(
        dropped > 0,
        "the stalled subscriber lost nothing?\n{metrics}"
    );

    // It wakes up: it gets what was queued, then hears how many it lost.
    // SAFETY: kill(2) takes plain integers: it signals a process this test started.
    unsafe { libc::kill(stalled.id() as i32, libc::SIGCONT) };
    let count = |p: &Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let mut last = usize::MAX;
    wait_until(
        "the stalled subscriber drained",
        Duration::from_secs(60),
        || {
            std::thread::sleep(Duration::from_millis(1000));
            let now = count(&dir.join("stalled.out"));
            let stable = now == last;
            last = now;
            stable
        },
    );
    sigint_and_wait(&mut stalled, "the stalled observe");
    let got = count(&dir.join("stalled.out"));
    let err = std::fs::read_to_string(dir.join("stalled.err")).unwrap();
    let lost = told_undelivered(&err);
    assert!(
        lost > 0,
        "the stalled subscriber was not told of its losses: {err:?}"
    );
    assert_eq!(
        got as u64 + lost,
        total as u64,
        "stalled subscriber: {got} flows + {lost} lost != {total}; stderr: {err}"
    );
    // Read again now: the stalled subscriber's own task may still have
    // been dropping flows from the hub's ring when the first reading was
    // taken (seen once: 9,951 then, 10,007 told).
    let metrics = agent.http_get("/metrics").1;
    let dropped_now = sample(&metrics, "flowaudit_stream_dropped_total").unwrap_or(0.0) as u64;
    assert!(
        dropped_now >= dropped,
        "{dropped_now} < {dropped}: the counter went back"
    );
    assert_eq!(
        lost, dropped_now,
        "told losses vs flowaudit_stream_dropped_total"
    );
    println!("stalled subscriber: got {got}, told it lost {lost}; the reader got all {total}");
    sigint_and_wait(&mut fast, "the reading observe");
    let report = agent.stop();
    assert_eq!(report.counter("kernel_events_lost"), 0);
    let to_port = report
        .flows
        .iter()
        .filter(|f| f["l4"]["destination_port"] == 8000)
        .count();
    assert_eq!(to_port, total, "the pipeline (export file) got every flow");
}

#[test]
fn a_hundred_subscribers_each_get_every_flow() {
    require_root();
    let (_node, client, server) = two_pods(43);
    let _srv = serve(&server, &[8000]);
    let agent = RunningAgent::start(&[]);
    let addr = agent.grpc_addr();
    let dir = temp_dir("hundred");
    const SUBS: usize = 100;
    let mut subs: Vec<Child> = (0..SUBS)
        .map(|i| {
            observe(&addr, &["-f", "-o", "json", "--port", "8000"])
                .stdout(std::fs::File::create(dir.join(format!("{i}.out"))).unwrap())
                .stderr(std::fs::File::create(dir.join(format!("{i}.err"))).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_subscribers(&agent, SUBS);
    const N: u64 = 500;
    let total = 4 * N as usize;
    let start = Instant::now();
    connect(&client, &server, 8000, N, 8);
    let count = |i: usize| {
        std::fs::read_to_string(dir.join(format!("{i}.out")))
            .unwrap_or_default()
            .lines()
            .count()
    };
    wait_until(
        "all 100 subscribers have every flow",
        Duration::from_secs(120),
        || (0..SUBS).all(|i| count(i) >= total),
    );
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "100 subscribers: {} flows delivered in {elapsed:.2} s from the first connection ({:.0} flows/s in total; bounded by the traffic, see stream_throughput for capacity)",
        SUBS * total,
        (SUBS * total) as f64 / elapsed
    );
    for (i, c) in subs.iter_mut().enumerate() {
        sigint_and_wait(c, &format!("subscriber {i}"));
    }
    let report = agent.stop();
    let expected: Vec<String> = report
        .flows
        .iter()
        .filter(|f| f["l4"]["destination_port"] == 8000)
        .map(|f| f.to_string())
        .collect();
    assert_eq!(expected.len(), total);
    for i in 0..SUBS {
        let text = std::fs::read_to_string(dir.join(format!("{i}.out"))).unwrap();
        let got: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap().to_string())
            .collect();
        assert!(
            got == expected,
            "subscriber {i} did not get exactly the export file's flows, in order"
        );
        let err = std::fs::read_to_string(dir.join(format!("{i}.err"))).unwrap();
        assert!(err.is_empty(), "subscriber {i}: {err}");
    }
}

/// Delay from a connection (its kernel timestamp) to its event arriving on
/// a subscriber's stdout, and burst throughput to one subscriber.
#[test]
fn stream_delay_and_single_subscriber_throughput() {
    require_root();
    let (_node, client, server) = two_pods(44);
    let _srv = serve(&server, &[8000]);
    let agent = RunningAgent::start(&[]);
    let addr = agent.grpc_addr();
    let mut sub = observe(&addr, &["-f", "-o", "json", "--port", "8000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = Arc::new(Mutex::new(String::new()));
    let stderr = sub.stderr.take().unwrap();
    let err_w = err.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut e = err_w.lock().unwrap();
            e.push_str(&l);
            e.push('\n');
        }
    });
    let mut lines = Lines::new(sub.stdout.take().unwrap()).with_context({
        let err = err.clone();
        move || format!("; observe's stderr so far: {:?}", err.lock().unwrap())
    });
    wait_subscribers(&agent, 1);

    // Paced: one connection at a time.
    const PACED: u64 = 300;
    connect(&client, &server, 8000, PACED, 1);
    lines.wait_count(4 * PACED as usize, Duration::from_secs(60), "paced flows");
    let mut delays: Vec<f64> = lines
        .got
        .iter()
        .filter_map(|(at, l)| {
            let f: Value = serde_json::from_str(l).ok()?;
            (f["event"] == "CONNECT").then(|| {
                let t = parse_time(f["time"].as_str().unwrap());
                at.duration_since(t).unwrap_or_default().as_secs_f64() * 1000.0
            })
        })
        .collect();
    delays.sort_by(|a, b| a.total_cmp(b));
    let (median, p99) = (percentile(&delays, 0.5), percentile(&delays, 0.99));
    println!(
        "stream delay, connection -> event on a subscriber: median {median:.2} ms, p99 {p99:.2} ms over {} CONNECT events",
        delays.len()
    );
    assert!(p99 < 1000.0, "p99 delay {p99} ms");

    // Burst: as fast as simpod connects.
    lines.got.clear();
    const BURST: u64 = 3000;
    let start = Instant::now();
    connect(&client, &server, 8000, BURST, 8);
    // A subscriber that falls behind a burst by more than its queue and the
    // hub's ring (observe not scheduled) loses flows by design, and is told how
    // many. Nothing may go missing untold: every flow arrives or is in a
    // loss notice, and the agent's count says the same. (CI once got 11,365
    // of 12,000 here with observe's stderr unread.)
    let told = || told_undelivered(&err.lock().unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    while lines.drain() as u64 + told() < 4 * BURST {
        assert!(
            Instant::now() < deadline,
            "burst flows: {} of {} arrived and {} were told lost within 120 s; observe's stderr: {:?}",
            lines.got.len(),
            4 * BURST,
            told(),
            err.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A task that fell behind the hub's ring is told its losses before its
    // filter (other flows on the node, say the test's own, count too): so
    // at least, not exactly.
    let (arrived, lost) = (lines.got.len() as u64, told());
    assert!(
        arrived <= 4 * BURST,
        "{arrived} flows arrived for {BURST} connections"
    );
    let first = lines.got.first().unwrap().0;
    let last = lines.got.last().unwrap().0;
    let span = last.duration_since(first).unwrap_or_default().as_secs_f64();
    println!(
        "1 subscriber: {arrived} flows in {span:.2} s between first and last ({:.0} flows/s; {:.2} s from the first connect call; bounded by the traffic); {lost} not delivered (told)",
        arrived as f64 / span.max(1e-9),
        start.elapsed().as_secs_f64()
    );
    let (status, metrics) = agent.http_get("/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        metric_sample(&metrics, "flowaudit_stream_dropped_total"),
        lost as f64,
        "the agent's count of flows not delivered to subscribers"
    );
    sigint_and_wait(&mut sub, "observe");
    let report = agent.stop();
    assert_eq!(report.counter("kernel_events_lost"), 0);
}

/// The flows `observe` was told it did not get (its stderr's "N flows not
/// delivered" notices).
fn told_undelivered(stderr: &str) -> u64 {
    stderr
        .lines()
        .filter(|l| l.contains("flows not delivered"))
        .map(|l| {
            l.trim_start_matches("flowaudit observe: ")
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no count in {l:?}"))
        })
        .sum()
}

/// A stopping agent ends each follow stream after the last flows it had,
/// with UNAVAILABLE saying why: `observe -f` prints every flow, says the
/// agent is stopping and reconnects to the restarted one; an independent
/// gRPC client (grpcio) gets the same status and reason, not a connection
/// torn down under it.
#[test]
fn observe_follow_reconnects_when_the_agent_restarts() {
    require_root();
    let (_node, client, server) = two_pods(45);
    let _srv = serve(&server, &[8000]);
    let dir = temp_dir("restart");
    let grpc = format!("unix://{}", dir.join("run/flowaudit.sock").display());
    let args = ["--grpc-addr", grpc.as_str()];
    let agent = RunningAgent::start(&args);
    let mut sub = observe(&grpc, &["-f", "-o", "json", "--port", "8000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = Lines::new(sub.stdout.take().unwrap());
    let mut err = Lines::new(sub.stderr.take().unwrap());
    let py = python_client(
        &grpc,
        &["tail", "--follow", "--port", "8000", "--deadline", "60"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("the virtual environment's python3");
    wait_subscribers(&agent, 2);
    connect(&client, &server, 8000, 2, 1);
    // Stopped as soon as its export file has the four events of each
    // connection: the streams may not have sent them yet.
    assert!(
        agent.wait_for_flows(8, Duration::from_secs(30), |f| f["l4"]["destination_port"]
            == 8000),
        "the agent's export file has the 8 flows"
    );
    let report = agent.stop();
    let stopping = "the flowaudit agent on node sim-node is stopping (SIGINT)";
    let lost = err.wait_line("lost the connection", Duration::from_secs(15));
    assert!(lost.contains(stopping), "observe says why: {lost}");
    out.drain();
    assert_eq!(out.got.len(), 8, "every flow before the end: {:?}", out.got);
    assert!(
        !report
            .logs
            .iter()
            .any(|l| l.to_string().contains("their connections were closed")),
        "every stream ended in time: {:#?}",
        report.logs
    );
    let py = wait_output(py, Duration::from_secs(30), "the Python client");
    let py_err = String::from_utf8_lossy(&py.stderr);
    assert_eq!(py.status.code(), Some(2), "an RPC error: {py_err}");
    assert!(
        py_err.contains(&format!(
            "GetFlows failed: StatusCode.UNAVAILABLE {stopping}"
        )),
        "{py_err}"
    );
    let py_flows = String::from_utf8_lossy(&py.stdout)
        .lines()
        .filter(|l| l.starts_with("{\"flow\""))
        .count();
    assert_eq!(py_flows, 8, "{}", String::from_utf8_lossy(&py.stdout));
    let agent = RunningAgent::start(&args);
    err.wait_line("reconnected to", Duration::from_secs(30));
    wait_subscribers(&agent, 1);
    connect(&client, &server, 8000, 3, 1);
    out.wait_count(8 + 12, Duration::from_secs(30), "flows after the restart");
    sigint_and_wait(&mut sub, "observe -f");
    drop(agent);
}

// ---------------------------------------------------------------- golden files

/// `observe` output for a fixed input (tests/golden/flows.jsonl). Set
/// UPDATE_GOLDEN=1 to rewrite the expected files after a deliberate change.
#[test]
fn observe_output_matches_the_golden_files() {
    let golden = tests_dir().join("golden");
    let cases: [(&[&str], &str); 4] = [
        (&["-o", "compact"], "observe-compact.txt"),
        (&["-o", "json"], "observe-json.jsonl"),
        (
            &[
                "--verdict",
                "violation",
                "--from-label",
                "app=frontend",
                "--to-pod",
                "99-apps/postgresql",
            ],
            "observe-filtered.txt",
        ),
        (
            &[
                "--last",
                "2",
                "--from-identity",
                "spiffe://demo.local/ns/99-apps/**",
                "--encryption",
                "TLS",
                "--event",
                "CLOSE",
            ],
            "observe-last.txt",
        ),
    ];
    for (args, file) in cases {
        let out = Command::new(agent_binary())
            .args(["observe", "--color", "never", "--input-file"])
            .arg(golden.join("flows.jsonl"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = golden.join(file);
        let got = String::from_utf8(out.stdout).unwrap();
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &got).unwrap();
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
        assert_eq!(
            got,
            want,
            "observe {args:?} differs from {}",
            path.display()
        );
    }
}

#[test]
fn prometheus_counts_the_scenario_violations() {
    require_root();
    let sim = flowaudit_tests::scenario::Precinct99::start(42).expect("precinct-99");
    let dir = std::env::temp_dir().join(format!("flowaudit-prom-scenario-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let endpoints = dir.join("endpoints.yaml");
    sim.write_endpoint_directory(&endpoints).expect("endpoints");
    let policy = scenario_policy();
    let agent = RunningAgent::start(&[
        "--endpoints",
        endpoints.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        "--spire-admin-socket",
        "none",
    ]);
    let prom = Prometheus::start(agent.metrics_addr());
    let mut http = Http::connect(prom.addr);
    wait_until(
        "Prometheus scraped the agent",
        Duration::from_secs(30),
        || http.query("up{job=\"flowaudit\"}") == Some(1.0),
    );
    const ROUNDS: usize = 3;
    for _ in 0..ROUNDS {
        for f in &flowaudit_tests::scenario::SCENARIO {
            sim.run(f).expect("scenario traffic");
        }
    }
    // The scenario's violations between pods: frontend -> postgresql (denied)
    // and plaintext frontend -> backend (mTLS required), each counted once
    // per connection and observing side (client EGRESS, server INGRESS).
    // (Prometheus's own scrapes of the agent are host-to-host flows no rule
    // allows: violations too, labelled `unknown`.)
    let by_pair = "sum(flowaudit_policy_violations_total{source=\"spiffe://demo.local/ns/99-apps/sa/frontend\",destination=\"spiffe://demo.local/ns/99-apps/sa/postgresql\",port=\"5432\"})";
    let expected = (2 * ROUNDS) as f64;
    wait_until(
        "Prometheus sees the scenario's violations",
        Duration::from_secs(30),
        || http.query(by_pair) == Some(expected),
    );
    wait_until(
        "Prometheus sees plaintext frontend -> backend as MTLS_MISSING",
        Duration::from_secs(30),
        || http.query("sum(flowaudit_findings_total{kind=\"MTLS_MISSING\"})") == Some(expected),
    );
    let pod_violations = "sum(flowaudit_policy_violations_total{source=~\"spiffe://.*\"})";
    assert_eq!(
        http.query(pod_violations),
        Some(2.0 * expected),
        "a scenario flow other than frontend -> postgresql and frontend -> backend was a violation"
    );
    // The dropped intended flow: one FAILED attempt per round, seen by the client.
    wait_until(
        "Prometheus sees INTENDED_FLOW_FAILED",
        Duration::from_secs(30),
        || {
            http.query("sum(flowaudit_findings_total{kind=\"INTENDED_FLOW_FAILED\"})")
                == Some(ROUNDS as f64)
        },
    );
    let report = agent.stop();
    assert_eq!(report.counter("kernel_events_lost"), 0);
    std::fs::remove_dir_all(dir).ok();
}
