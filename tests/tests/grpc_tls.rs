//! The agent's open network surfaces, closed: TCP gRPC beyond loopback
//! needs mTLS (a plaintext non-loopback `--grpc-addr` stops the start);
//! with mTLS from files, only clients whose SPIFFE ID matches `--allow-peer`
//! get flows and status (a disallowed ID, a TLS client without a
//! certificate and a plaintext client are refused), and the client checks
//! the agent's ID too; with the SPIRE Workload API (a double speaking the
//! real protocol), the agent keeps serving across an SVID rotation, with the
//! new SVID; `--metrics-allow` answers 403 to other sources. Real TLS
//! handshakes over TCP on loopback. Needs root (the agent attaches its
//! programs); never skips.

use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use flowaudit_tests::agent::{RunningAgent, agent_binary, http_get_from};
use flowaudit_tests::support::*;
use flowaudit_tests::tls::TlsMaterial;
use flowaudit_tests::workload_api_double::WorkloadApiDouble;
use serde_json::Value;

const AGENT_ID: &str = "spiffe://demo.local/ns/flowaudit/sa/flowaudit";
const OPS_ID: &str = "spiffe://demo.local/ns/ops/sa/alice";
const FRONTEND_ID: &str = "spiffe://demo.local/ns/99-apps/sa/frontend";
const ALLOW_OPS: &str = "spiffe://demo.local/ns/ops/**";

/// Runs `cmd` to completion, killing it after `secs`.
fn run(mut cmd: Command, secs: u64) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("collect output")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The TLS flags of a client or agent.
fn tls_flags(cert: &Path, key: &Path, ca: &Path, allow: &str) -> Vec<String> {
    [
        "--tls-cert",
        &cert.to_string_lossy(),
        "--tls-key",
        &key.to_string_lossy(),
        "--tls-ca",
        &ca.to_string_lossy(),
        "--allow-peer",
        allow,
    ]
    .map(str::to_owned)
    .to_vec()
}

fn status(server: &str, tls: &[String]) -> Output {
    let mut c = Command::new(agent_binary());
    c.args(["status", "--server", server, "-o", "json"])
        .args(tls);
    run(c, 30)
}

fn observe_json(server: &str, tls: &[String], extra: &[&str]) -> Output {
    let mut c = Command::new(agent_binary());
    c.args(["observe", "--server", server, "-o", "json"])
        .args(tls)
        .args(extra);
    run(c, 30)
}

/// `status` succeeds and names the agent's node.
fn assert_status_ok(server: &str, tls: &[String], what: &str) {
    let out = status(server, tls);
    assert!(
        out.status.success(),
        "{what}: status must succeed:\n{}",
        text(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: status printed no JSON ({e}):\n{}", text(&out)));
    assert_eq!(v["node_name"], "sim-node", "{what}: {v}");
}

fn assert_refused(out: &Output, what: &str) {
    assert!(
        !out.status.success(),
        "{what}: must be refused, yet it succeeded:\n{}",
        text(out)
    );
}

/// `openssl s_client` to `addr` (optionally with a client certificate),
/// stdin held open 1 s so a post-handshake alert is read; output text.
fn s_client(addr: &str, ca: &Path, cert: Option<(&Path, &Path)>) -> String {
    let mut cmd = format!(
        "sleep 1 | timeout 10 openssl s_client -connect {addr} -CAfile {} -alpn h2 -showcerts",
        ca.display()
    );
    if let Some((c, k)) = cert {
        cmd.push_str(&format!(" -cert {} -key {}", c.display(), k.display()));
    }
    let mut c = Command::new("sh");
    c.args(["-c", &cmd]);
    text(&run(c, 20))
}

/// The base64 of the first certificate in `pem_text` (whitespace removed).
fn first_cert_b64(pem_text: &str) -> Option<String> {
    let start = pem_text.find("-----BEGIN CERTIFICATE-----")? + 27;
    let end = start + pem_text[start..].find("-----END CERTIFICATE-----")?;
    Some(pem_text[start..end].split_whitespace().collect())
}

fn log_lines<'a>(logs: &'a [Value], message: &str) -> Vec<&'a Value> {
    logs.iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .collect()
}

#[test]
fn agent_refuses_a_plaintext_grpc_addr_beyond_loopback() {
    require_root();
    let dir = temp_dir("grpc-plaintext");
    let mut c = Command::new(agent_binary());
    c.args([
        "agent",
        "--grpc-addr",
        "0.0.0.0:0",
        "--metrics-addr",
        "127.0.0.1:0",
    ])
    .args(["--spire-admin-socket", "none", "--log-format", "json"])
    .arg("--export-file")
    .arg(dir.join("flows.jsonl"));
    let out = run(c, 60);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "the agent must stop at start with a plaintext --grpc-addr 0.0.0.0:0:\n{}",
        text(&out)
    );
    for needle in [
        "--grpc-addr 0.0.0.0:0",
        "--workload-api",
        "--tls-cert",
        "--allow-peer",
    ] {
        assert!(
            stderr.contains(needle),
            "the start error must name {needle}:\n{stderr}"
        );
    }
}

#[test]
fn loopback_tcp_grpc_without_tls_still_serves() {
    require_root();
    let agent =
        RunningAgent::start(&["--grpc-addr", "127.0.0.1:0", "--spire-admin-socket", "none"]);
    assert_status_ok(&agent.grpc_addr(), &[], "plaintext status on 127.0.0.1");
    agent.stop();
}

#[test]
fn file_mtls_serves_allowed_spiffe_ids_only() {
    require_root();
    let dir = temp_dir("grpc-mtls-files");
    let m = TlsMaterial::generate(
        &dir,
        &[
            ("agent", AGENT_ID),
            ("ops", OPS_ID),
            ("frontend", FRONTEND_ID),
        ],
    )
    .unwrap_or_else(|e| panic!("making certificates: {e}"));
    let files = |n: &str, allow: &str| {
        let (c, k, a) = (m.cert(n), m.key(n), m.ca());
        tls_flags(Path::new(&c), Path::new(&k), Path::new(&a), allow)
    };
    let mut args = vec!["--grpc-addr".to_owned(), "127.0.0.1:0".to_owned()];
    args.extend(files("agent", ALLOW_OPS));
    args.extend(["--spire-admin-socket".into(), "none".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = RunningAgent::start(&args);
    let addr = agent.grpc_addr();
    let port = addr.rsplit_once(':').unwrap().1.to_owned();

    // Allowed: ServerStatus and flows (the clients' own connections to the
    // agent's port are flows too).
    let ops = files("ops", AGENT_ID);
    assert_status_ok(&addr, &ops, "ops (allowed by --allow-peer)");
    let deadline = Instant::now() + Duration::from_secs(15);
    let flows = loop {
        let out = observe_json(&addr, &ops, &["--last", "1000", "--port", &port]);
        assert!(out.status.success(), "observe as ops:\n{}", text(&out));
        let n = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| serde_json::from_str::<Value>(l).is_ok())
            .count();
        if n > 0 || Instant::now() > deadline {
            break n;
        }
        assert_status_ok(&addr, &ops, "ops, making a flow");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        flows > 0,
        "observe over mTLS printed no flow to port {port}"
    );

    // A valid certificate from the same CA, with a disallowed SPIFFE ID.
    let out = status(&addr, &files("frontend", AGENT_ID));
    assert_refused(&out, "frontend (valid certificate, ID not allowed)");
    // No TLS at all.
    assert_refused(&status(&addr, &[]), "a plaintext client");
    // TLS without a client certificate (a real OpenSSL handshake).
    let no_cert = s_client(&addr, Path::new(&m.ca()), None);
    assert!(
        no_cert.contains("alert"),
        "a TLS client without a certificate must get an alert:\n{no_cert}"
    );
    // The client checks the agent's ID: an agent it does not allow is refused.
    let out = status(
        &addr,
        &files("ops", "spiffe://demo.local/ns/other/sa/agent"),
    );
    assert_refused(&out, "ops expecting another agent ID");

    let report = agent.stop();
    let refused = log_lines(
        &report.logs,
        "TLS peer refused: its SPIFFE ID matches no --allow-peer",
    );
    assert!(
        refused.iter().any(|v| v["peer"] == FRONTEND_ID),
        "the agent must log that it refused {FRONTEND_ID}; its log:\n{:#?}",
        report.logs
    );
    assert!(
        !refused.iter().any(|v| v["peer"] == OPS_ID),
        "ops was allowed, yet refused: {refused:#?}"
    );
    let failed = log_lines(&report.logs, "TLS handshake on the gRPC listener failed");
    assert!(
        failed.iter().any(|v| v["error"]
            .as_str()
            .is_some_and(|e| e.contains("no certificates"))),
        "the agent must log the handshake without a client certificate; handshake failures: {failed:#?}"
    );
}

/// The DaemonSet's agents dial SPIRE's Workload API for their listener's
/// SVID: an agent that starts before its SPIRE agent keeps auditing and
/// serving its Unix socket, and opens its TCP listener once SPIRE answers.
#[test]
fn an_agent_started_before_spire_serves_tcp_once_the_workload_api_answers() {
    require_root();
    let dir = temp_dir("grpc-mtls-late-spire");
    let socket = dir.join("api.sock");
    let endpoint = format!("unix://{}", socket.display());
    let unix_addr = format!("unix://{}", dir.join("agent.sock").display());
    let mut agent = RunningAgent::start(&[
        "--grpc-addr",
        &unix_addr,
        "--grpc-addr",
        "127.0.0.1:0",
        "--workload-api",
        &endpoint,
        "--allow-peer",
        ALLOW_OPS,
        "--spire-admin-socket",
        "none",
    ]);
    // Ready and serving on its Unix socket, with no SVID yet.
    let unix = agent.grpc_addr();
    assert!(unix.starts_with("unix://"), "{unix}");
    let status = run(
        {
            let mut c = Command::new(agent_binary());
            c.args(["status", "--server", &unix]);
            c
        },
        20,
    );
    assert!(
        status.status.success(),
        "status on the Unix socket: {}",
        text(&status)
    );
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let double = rt
        .block_on(WorkloadApiDouble::start(&socket, AGENT_ID))
        .unwrap_or_else(|e| panic!("starting the Workload API double: {e}"));
    let ca = dir.join("ca.pem");
    double.write_ca(&ca).unwrap();
    let (ops_cert, ops_key) = double.write_svid(&dir, "ops", OPS_ID).unwrap();
    let ops = tls_flags(&ops_cert, &ops_key, &ca, AGENT_ID);
    let listening = agent.wait_for_log(120, "the TCP listener after SPIRE came", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("gRPC flow stream listening"))
            && v["addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:"))
    });
    let addr = listening["addr"].as_str().unwrap().to_owned();
    assert_status_ok(&addr, &ops, "ops once SPIRE answered");
    let report = agent.stop();
    drop(double);
    // The start waited 5 s for the SVID, not the Workload API's 30 s: the
    // kernel events' reader and the kubelet's probes wait for the start.
    let waited = log_lines(&report.logs, "no SVID yet");
    assert!(
        waited.iter().any(|v| v["error"]
            .as_str()
            .is_some_and(|e| e == "the SPIRE Workload API gave none within 5 s")),
        "the agent must go on after 5 s without its SVID; its warnings: {waited:#?}"
    );
}

#[test]
fn workload_api_svid_rotation_keeps_mtls_serving_with_the_new_svid() {
    require_root();
    let dir = temp_dir("grpc-mtls-workload-api");
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let double = rt
        .block_on(WorkloadApiDouble::start(&dir.join("api.sock"), AGENT_ID))
        .unwrap_or_else(|e| panic!("starting the Workload API double: {e}"));
    let ca = dir.join("ca.pem");
    double.write_ca(&ca).unwrap();
    let (ops_cert, ops_key) = double.write_svid(&dir, "ops", OPS_ID).unwrap();
    let ops = tls_flags(&ops_cert, &ops_key, &ca, AGENT_ID);

    let endpoint = double.endpoint();
    let agent = RunningAgent::start(&[
        "--grpc-addr",
        "127.0.0.1:0",
        "--workload-api",
        &endpoint,
        "--allow-peer",
        ALLOW_OPS,
        "--spire-admin-socket",
        "none",
    ]);
    let addr = agent.grpc_addr();
    assert_status_ok(&addr, &ops, "ops before the rotation");
    let presented = || {
        let out = s_client(&addr, &ca, Some((&ops_cert, &ops_key)));
        first_cert_b64(&out).unwrap_or_else(|| panic!("s_client saw no certificate:\n{out}"))
    };
    let first = first_cert_b64(&double.current_leaf_pem()).unwrap();
    let keys = [double.current_key_pem()];
    assert_eq!(
        presented(),
        first,
        "the agent must present the Workload API's SVID"
    );

    double.rotate().unwrap();
    let second = first_cert_b64(&double.current_leaf_pem()).unwrap();
    assert_ne!(first, second);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = presented();
        if now == second {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "15 s after the rotation the agent still presents {}",
            if now == first {
                "the old SVID"
            } else {
                "an unknown certificate"
            }
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_status_ok(&addr, &ops, "ops after the rotation");
    // A disallowed ID under the same bundle is still refused.
    let (fe_cert, fe_key) = double.write_svid(&dir, "frontend", FRONTEND_ID).unwrap();
    assert_refused(
        &status(&addr, &tls_flags(&fe_cert, &fe_key, &ca, AGENT_ID)),
        "frontend after the rotation",
    );
    assert_eq!(
        double.missing_header_calls(),
        0,
        "every call carried workload.spiffe.io: true"
    );
    assert!(double.streams_opened() >= 1);

    let keys = [keys[0].clone(), double.current_key_pem()];
    let report = agent.stop();
    // The secret part of each key (the PKCS#8 prefix is the same for all
    // P-256 keys), in base64 as PEM has it: never in the agent's log.
    let log_text = format!("{:?}", report.logs);
    for key in &keys {
        let b64: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        let secret = &b64[48..88];
        assert!(
            !log_text.contains(secret),
            "the agent's log holds a private key"
        );
    }
    assert!(
        !log_lines(&report.logs, "X.509-SVID or bundle rotated").is_empty(),
        "the agent must log the rotation; its log:\n{:#?}",
        report.logs
    );
    drop(double);
}

#[test]
fn metrics_allow_answers_403_to_other_sources() {
    require_root();
    let agent = RunningAgent::start(&[
        "--metrics-allow",
        "127.0.0.1/32",
        "--spire-admin-socket",
        "none",
    ]);
    let addr = agent.metrics_addr();
    let (one, two): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
    let (code, body) = http_get_from(Some(one), addr, "/metrics");
    assert_eq!(code, 200, "GET /metrics from 127.0.0.1 (allowed): {body}");
    assert!(body.contains("flowaudit_flows_total"), "{body}");
    let (code, body) = http_get_from(Some(two), addr, "/metrics");
    assert_eq!(
        code, 403,
        "GET /metrics from 127.0.0.2 (not in --metrics-allow): {body}"
    );
    assert!(
        !body.contains("flowaudit_"),
        "a refused scrape must carry no metric: {body}"
    );
    let (code, _) = http_get_from(Some(two), addr, "/healthz");
    assert_eq!(code, 200, "/healthz stays open to probes");
    agent.stop();
}
