//! Encryption on the wire, end to end: real TLS stacks (`openssl s_server`
//! and `s_client`, TLS 1.2 and 1.3, with and without client certificates,
//! SPIFFE URI SAN certificates, an impostor server), plaintext HTTP and a
//! PostgreSQL startup message, between pods of the simulated node over IPv4
//! and IPv6. Every event of each connection (CONNECT and CLOSE, both
//! sockets) must carry the right encryption state and findings. Needs root;
//! never skips.

use std::net::IpAddr;

use flowaudit_tests::scenario::{BACKEND, FRONTEND, POSTGRESQL, Precinct99};
use flowaudit_tests::support::*;
use flowaudit_tests::tls::{self, ClientAuth, TlsMaterial, Version};
use serde_json::Value;

const POLICY: &str = "apiVersion: flowaudit.io/v1alpha1
kind: FlowPolicy
metadata: {name: mtls-test}
spec:
  trustDomain: demo.local
  mtls: required
  rules:
    - name: frontend-to-backend
      from: [spiffe://demo.local/ns/99-apps/sa/frontend]
      to:   [spiffe://demo.local/ns/99-apps/sa/backend]
      ports: [8000, \"8400-8499\"]
    - name: backend-to-postgresql
      from: [spiffe://demo.local/ns/99-apps/sa/backend]
      to:   [spiffe://demo.local/ns/99-apps/sa/postgresql]
      ports: [5432]
      mtls: optional
";

const TD: &str = "spiffe://demo.local/ns/99-apps/sa";

/// What one connection must look like in every one of its events.
struct Expect {
    state: &'static str,
    client_certificate: &'static str,
    inferred: bool,
    tls_version: &'static str,
    server_spiffe_id: &'static str,
    client_spiffe_id: &'static str,
    protocol: &'static str,
    verdict: &'static str,
    findings: &'static [&'static str],
}

struct TlsCase {
    name: &'static str,
    port: u16,
    version: Version,
    auth: ClientAuth,
    server_cert: &'static str,
    client_cert: Option<&'static str>,
    ipv6: bool,
    expect: Expect,
}

fn tls_cases() -> Vec<TlsCase> {
    let mtls = |version: &'static str, inferred: bool| Expect {
        state: "MTLS",
        client_certificate: "SENT",
        inferred,
        tls_version: version,
        server_spiffe_id: if version == "TLS1.2" { "backend" } else { "" },
        client_spiffe_id: if version == "TLS1.2" { "frontend" } else { "" },
        protocol: "tls",
        verdict: "COMPLIANT",
        findings: &[],
    };
    let no_cert = |version: &'static str, inferred: bool| Expect {
        state: "TLS",
        client_certificate: "NOT_SENT",
        inferred,
        tls_version: version,
        server_spiffe_id: if version == "TLS1.2" { "backend" } else { "" },
        client_spiffe_id: "",
        protocol: "tls",
        verdict: "VIOLATION",
        findings: &["MTLS_MISSING"],
    };
    let case = |name, port, version, auth, client_cert, ipv6, expect| TlsCase {
        name,
        port,
        version,
        auth,
        server_cert: "backend",
        client_cert,
        ipv6,
        expect,
    };
    vec![
        case(
            "TLS1.2 mutual",
            8401,
            Version::Tls12,
            ClientAuth::Required,
            Some("frontend"),
            false,
            mtls("TLS1.2", false),
        ),
        case(
            "TLS1.2 no CertificateRequest",
            8402,
            Version::Tls12,
            ClientAuth::None,
            None,
            false,
            no_cert("TLS1.2", false),
        ),
        case(
            "TLS1.2 requested, client has none",
            8403,
            Version::Tls12,
            ClientAuth::Optional,
            None,
            false,
            no_cert("TLS1.2", false),
        ),
        case(
            "TLS1.3 mutual",
            8404,
            Version::Tls13,
            ClientAuth::Required,
            Some("frontend"),
            false,
            mtls("TLS1.3", true),
        ),
        case(
            "TLS1.3 no CertificateRequest",
            8405,
            Version::Tls13,
            ClientAuth::None,
            None,
            false,
            no_cert("TLS1.3", true),
        ),
        case(
            "TLS1.3 requested, client has none",
            8406,
            Version::Tls13,
            ClientAuth::Optional,
            None,
            false,
            no_cert("TLS1.3", true),
        ),
        case(
            "TLS1.2 mutual over IPv6",
            8408,
            Version::Tls12,
            ClientAuth::Required,
            Some("frontend"),
            true,
            mtls("TLS1.2", false),
        ),
        case(
            "TLS1.3 mutual over IPv6",
            8409,
            Version::Tls13,
            ClientAuth::Required,
            Some("frontend"),
            true,
            mtls("TLS1.3", true),
        ),
        TlsCase {
            name: "TLS1.2 impostor server (postgresql's SVID on backend)",
            port: 8407,
            version: Version::Tls12,
            auth: ClientAuth::Required,
            server_cert: "postgresql",
            client_cert: Some("frontend"),
            ipv6: false,
            expect: Expect {
                server_spiffe_id: "postgresql",
                verdict: "VIOLATION",
                findings: &["IDENTITY_MISMATCH"],
                ..mtls("TLS1.2", false)
            },
        },
    ]
}

fn str_of<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_str().unwrap_or("")
}

/// Checks every event to `server:port`; returns the problems found.
fn check(flows: &[Value], server: &[IpAddr], port: u16, label: &str, e: &Expect) -> Vec<String> {
    let events: Vec<&Value> = flows
        .iter()
        .filter(|f| {
            f["l4"]["destination_port"] == port
                && server
                    .iter()
                    .any(|ip| f["l4"]["destination_ip"] == ip.to_string().as_str())
        })
        .collect();
    let mut problems = Vec::new();
    for (event, direction) in [
        ("CONNECT", "EGRESS"),
        ("CONNECT", "INGRESS"),
        ("CLOSE", "EGRESS"),
        ("CLOSE", "INGRESS"),
    ] {
        let n = events
            .iter()
            .filter(|f| f["event"] == event && f["direction"] == direction)
            .count();
        if n != 1 {
            problems.push(format!(
                "{label}: {n} {event} {direction} events, expected 1"
            ));
        }
    }
    let id = |sa: &str| {
        if sa.is_empty() {
            String::new()
        } else {
            format!("{TD}/{sa}")
        }
    };
    for f in &events {
        let enc = &f["encryption"];
        let findings = finding_kinds(f);
        let got = (
            str_of(enc, &["state"]),
            str_of(enc, &["client_certificate"]),
            enc["client_certificate_inferred"]
                .as_bool()
                .unwrap_or(false),
            str_of(enc, &["tls_version"]),
            str_of(enc, &["server_spiffe_id"]).to_owned(),
            str_of(enc, &["client_spiffe_id"]).to_owned(),
            str_of(enc, &["protocol"]),
            str_of(f, &["verdict"]),
            findings,
        );
        let want = (
            e.state,
            if e.client_certificate.is_empty() {
                ""
            } else {
                e.client_certificate
            },
            e.inferred,
            e.tls_version,
            id(e.server_spiffe_id),
            id(e.client_spiffe_id),
            e.protocol,
            e.verdict,
            e.findings.to_vec(),
        );
        if got != want {
            problems.push(format!(
                "{label}: {} {}: got {got:?}, expected {want:?}",
                f["event"], f["direction"]
            ));
        }
    }
    if e.state.starts_with("TLS") || e.state == "MTLS" {
        for f in &events {
            if str_of(&f["encryption"], &["sni"]) != "backend.demo.local"
                || f["encryption"]["alpn"] != serde_json::json!(["h2", "http/1.1"])
            {
                problems.push(format!("{label}: SNI/ALPN not as the client offered: {f}"));
            }
        }
    }
    if !problems.is_empty() {
        // Each event whole: its unknown reason, cookie and times tell a
        // record the kernel never sent from one that came late.
        for f in &events {
            problems.push(format!("  {label} event: {f}"));
        }
    }
    problems
}

/// Test certificates under `dir` for the scenario's service accounts `names`.
fn pki(dir: &std::path::Path, names: &[&str]) -> TlsMaterial {
    let leaves: Vec<(&str, String)> = names.iter().map(|n| (*n, format!("{TD}/{n}"))).collect();
    let leaves: Vec<(&str, &str)> = leaves.iter().map(|(n, id)| (*n, id.as_str())).collect();
    TlsMaterial::generate(&dir.join("pki"), &leaves).expect("test certificates")
}

/// What a plaintext connection looks like in every one of its events.
fn plaintext(
    protocol: &'static str,
    verdict: &'static str,
    findings: &'static [&'static str],
) -> Expect {
    Expect {
        state: "PLAINTEXT",
        client_certificate: "",
        inferred: false,
        tls_version: "",
        server_spiffe_id: "",
        client_spiffe_id: "",
        protocol,
        verdict,
        findings,
    }
}

/// Fails with every problem found, followed by the agent's counters
/// (losses by place, waits that ran out) and whether all `closes` CLOSE
/// events had come when the agent was stopped; then asserts that no kernel
/// event was lost.
fn assert_no_problems(
    mut problems: Vec<String>,
    closes: usize,
    all_closed: bool,
    report: &flowaudit_tests::agent::AgentReport,
) {
    if !problems.is_empty() {
        problems.push(format!(
            "all {closes} CLOSEs seen before the stop: {all_closed}; the agent's stop line: {}",
            report.stopped
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(
        report.counter("kernel_events_lost"),
        0,
        "kernel events lost"
    );
}

#[test]
fn each_connection_gets_the_encryption_it_carries() {
    require_root();
    let sim = Precinct99::start(60).expect("precinct-99 on a simulated node");
    let dir = temp_dir("mtls");
    let material = pki(&dir, &["backend", "frontend", "postgresql"]);
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, POLICY).expect("policy");
    let agent = sim.agent(
        &dir,
        &policy,
        &[
            "--spire-admin-socket",
            "none",
            // A handshake takes far longer under software emulation (the
            // kernel matrix runs this test in QEMU); the default 250 ms would
            // send the CONNECT before the client's certificate is seen.
            "--encryption-wait-ms",
            "5000",
        ],
    );
    let frontend = &sim.workloads[FRONTEND].pod;
    let backend = &sim.workloads[BACKEND].pod;
    let cases = tls_cases();
    for c in &cases {
        let ip = if c.ipv6 {
            IpAddr::V6(backend.ip6())
        } else {
            IpAddr::V4(backend.ip4())
        };
        let _server = tls::server(
            backend,
            &material,
            c.server_cert,
            ip,
            c.port,
            c.version,
            c.auth,
            Some(1),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let (ok, out) = tls::client(frontend, &material, ip, c.port, c.version, c.client_cert)
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert!(ok, "{}: the TLS handshake failed: {out}", c.name);
    }
    // Plaintext: an HTTP request to backend:8000 (simpod answers), and a
    // PostgreSQL startup message (protocol 3.0, user and database).
    let http = b"GET /api/orders HTTP/1.1\r\nHost: backend\r\n\r\n";
    assert!(
        tls::raw_client(frontend, IpAddr::V4(backend.ip4()), 8000, http).expect("http client"),
        "plaintext HTTP client failed"
    );
    let mut startup = Vec::new();
    let body = b"\x00\x03\x00\x00user\x00app\x00database\x00orders\x00\x00";
    startup.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    startup.extend_from_slice(body);
    let postgresql = &sim.workloads[POSTGRESQL].pod;
    assert!(
        tls::raw_client(backend, IpAddr::V4(postgresql.ip4()), 5432, &startup)
            .expect("postgresql client"),
        "PostgreSQL startup client failed"
    );
    // Every connection closes on both of its sockets; the server's may close
    // a moment after the client's (seconds under emulation).
    let total = cases.len() + 2;
    let all_closed = agent.wait_for_flows(2 * total, std::time::Duration::from_secs(30), |f| {
        f["event"] == "CLOSE"
    });
    let report = agent.stop();

    let backend_ips = [IpAddr::V4(backend.ip4()), IpAddr::V6(backend.ip6())];
    let mut problems = Vec::new();
    let mut right = 0;
    for c in &cases {
        let p = check(&report.flows, &backend_ips, c.port, c.name, &c.expect);
        right += usize::from(p.is_empty());
        problems.extend(p);
    }
    let postgresql_ips = [IpAddr::V4(postgresql.ip4())];
    let plaintext_cases = [
        (
            &backend_ips[..],
            8000,
            "plaintext HTTP",
            plaintext("http", "VIOLATION", &["MTLS_MISSING"][..]),
        ),
        (
            &postgresql_ips[..],
            5432,
            "PostgreSQL startup",
            plaintext("postgresql", "COMPLIANT", &[][..]),
        ),
    ];
    for (ips, port, label, e) in &plaintext_cases {
        let p = check(&report.flows, ips, *port, label, e);
        right += usize::from(p.is_empty());
        problems.extend(p);
    }
    eprintln!("handshake matrix: {right} of {total} connections classified right");
    assert_no_problems(problems, 2 * total, all_closed, &report);
}

/// One plaintext HTTP request from the frontend to the backend (port 8000).
fn plaintext_request(sim: &Precinct99) {
    let http = b"GET /api/orders HTTP/1.1\r\nHost: backend\r\n\r\n";
    assert!(
        tls::raw_client(
            &sim.workloads[FRONTEND].pod,
            IpAddr::V4(sim.workloads[BACKEND].pod.ip4()),
            8000,
            http
        )
        .expect("http client"),
        "plaintext HTTP client failed"
    );
}

/// `rounds` plaintext requests one after the other, each waited for until
/// both of its sockets' CLOSE events came; then the agent's /metrics, its
/// flows to the backend's port 8000, and its stop report.
fn plaintext_rounds(
    sim: &Precinct99,
    agent: flowaudit_tests::agent::RunningAgent,
    rounds: usize,
) -> (String, Vec<Value>, flowaudit_tests::agent::AgentReport) {
    for round in 1..=rounds {
        plaintext_request(sim);
        assert!(
            agent.wait_for_flows(2 * round, std::time::Duration::from_secs(30), |f| {
                f["event"] == "CLOSE" && f["l4"]["destination_port"] == 8000
            }),
            "connection {round}: its CLOSE events never came"
        );
    }
    let (code, metrics) = agent.http_get("/metrics");
    assert_eq!(code, 200);
    let report = agent.stop();
    let to_backend = report
        .flows
        .iter()
        .filter(|f| f["l4"]["destination_port"] == 8000)
        .cloned()
        .collect();
    (metrics, to_backend, report)
}

/// An agent in `sim`'s node judging by `POLICY`, without SPIRE, with `extra` flags.
fn agent_under_policy(
    sim: &Precinct99,
    name: &str,
    extra: &[&str],
) -> (TestDir, flowaudit_tests::agent::RunningAgent) {
    let dir = temp_dir(name);
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, POLICY).expect("policy");
    let mut args = vec!["--spire-admin-socket", "none"];
    args.extend_from_slice(extra);
    let agent = sim.agent(&dir, &policy, &args);
    (dir, agent)
}

/// Issue 16: an auditor that could not see must say so. With the kernel's
/// payload places made few (`--payload-sockets 2`), one idle connection takes
/// them; the next connection's payload is not watched. Under a rule requiring
/// mTLS, neither may come out silently COMPLIANT: each gets MTLS_UNVERIFIED
/// with its reason (`no_payload_seen` for the idle one, `not_watched` for
/// the unwatched one), the reasons are counted, and the loss is visible at
/// every place a user looks: /metrics, `flowaudit status` and the stream.
#[test]
fn encryption_not_seen_is_never_silently_compliant() {
    require_root();
    let sim = Precinct99::start(66).expect("precinct-99 on a simulated node");
    let (_dir, agent) = agent_under_policy(
        &sim,
        "mtls-unseen",
        &["--payload-sockets", "2", "--encryption-wait-ms", "1000"],
    );
    let bin = flowaudit_tests::agent::agent_binary();
    // A subscriber following the stream, to see the loss notice.
    let mut follower = std::process::Command::new(&bin)
        .args([
            "observe",
            "--server",
            &agent.grpc_addr(),
            "-f",
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("flowaudit observe -f");
    std::thread::sleep(std::time::Duration::from_millis(500));

    let frontend = sim.workloads[FRONTEND].pod.clone();
    let backend = &sim.workloads[BACKEND].pod;
    let to = std::net::SocketAddr::new(IpAddr::V4(backend.ip4()), 8000);
    // The idle connection: both of its sockets are watched and take both places.
    let holder = std::thread::spawn(move || {
        let mut opts = flowaudit_tests::simpod::ConnectOpts::new(to);
        opts.hold_ms = 12_000;
        frontend.connect(&opts)
    });
    // Its two CONNECTs (out after the 1 s encryption wait) say both of its
    // sockets are watched; under emulation that takes seconds.
    assert!(
        agent.wait_for_flows(2, std::time::Duration::from_secs(30), |f| {
            f["event"] == "CONNECT" && f["l4"]["destination_port"] == 8000
        }),
        "the idle connection never showed up"
    );
    plaintext_request(&sim);
    let held = holder
        .join()
        .expect("holder thread")
        .expect("idle connection");
    let held_port = held
        .records
        .first()
        .and_then(|r| r.local)
        .map(|a| a.port())
        .expect("the idle connection's record");
    agent.wait_for_flows(4, std::time::Duration::from_secs(30), |f| {
        f["event"] == "CLOSE"
    });
    let (code, metrics) = agent.http_get("/metrics");
    assert_eq!(code, 200);
    let status = std::process::Command::new(&bin)
        .args(["status", "--server", &agent.grpc_addr(), "-o", "json"])
        .output()
        .expect("flowaudit status");
    let status: Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    let report = agent.stop();
    flowaudit_tests::agent::stop_child(&mut follower, std::time::Duration::from_secs(5));
    let mut follower_err = String::new();
    std::io::Read::read_to_string(
        &mut follower.stderr.take().expect("observe's stderr is piped"),
        &mut follower_err,
    )
    .expect("observe's stderr");

    let mut problems = Vec::new();
    let to_backend: Vec<&Value> = report
        .flows
        .iter()
        .filter(|f| f["l4"]["destination_port"] == 8000 && f["event"] != "FAILED")
        .collect();
    assert!(
        to_backend.len() >= 8,
        "expected CONNECT and CLOSE of both sockets of both connections, got {}",
        to_backend.len()
    );
    for f in &to_backend {
        let client_port = f["l4"]["source_port"].as_u64().unwrap_or(0);
        let expected = if client_port != u64::from(held_port) {
            "not_watched"
        } else if f["event"] == "CONNECT" {
            "no_payload_seen"
        } else {
            // The server answers when the idle client closes: its CLOSE
            // events carry what was seen then (plaintext, MTLS_MISSING).
            continue;
        };
        let kinds = finding_kinds(f);
        let unverified = f["findings"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["kind"] == "MTLS_UNVERIFIED"));
        if f["encryption"]["state"] != "UNKNOWN"
            || f["encryption"]["unknown_reason"] != expected
            || !kinds.contains(&"MTLS_UNVERIFIED")
        {
            problems.push(format!(
                "{} {} from port {client_port}: expected encryption UNKNOWN ({expected}) with MTLS_UNVERIFIED, got {} ({}) with {kinds:?}, verdict {}",
                f["event"],
                f["direction"],
                f["encryption"]["state"],
                f["encryption"]["unknown_reason"],
                f["verdict"]
            ));
        } else if expected == "not_watched"
            && !unverified.is_some_and(|u| {
                u["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("--payload-sockets sockets were watched already"))
            })
        {
            problems.push(format!("the finding does not say why: {unverified:?}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let lost = flowaudit_tests::support::metric_sample(
        &metrics,
        "flowaudit_kernel_events_lost_total{place=\"payload_map_full\"}",
    );
    assert!(
        lost >= 2.0,
        "payload_map_full counted {lost}, expected >= 2"
    );
    for (reason, at_least) in [("not_watched", 2.0), ("no_payload_seen", 2.0)] {
        let n = flowaudit_tests::support::metric_sample(
            &metrics,
            &format!("flowaudit_mtls_unverified_total{{reason=\"{reason}\"}}"),
        );
        assert!(
            n >= at_least,
            "flowaudit_mtls_unverified_total{{reason=\"{reason}\"}} is {n}, expected >= {at_least}"
        );
    }
    let place = status["kernel_losses"]
        .as_array()
        .and_then(|a| a.iter().find(|l| l["place"] == "payload_map_full"))
        .unwrap_or_else(|| panic!("status lists no payload_map_full: {status}"));
    assert!(
        place["count"].as_u64() >= Some(2),
        "status: payload_map_full {place}"
    );
    assert!(
        follower_err.contains("payload_map_full"),
        "the stream told no payload_map_full loss; observe said:\n{follower_err}"
    );
}

/// A socket holds its `--payload-sockets` place from the handshake until it
/// closes, and then gives it back (the kernel keeps the count; the state
/// lives in each socket's own storage). With 2 places, three plaintext
/// connections one after the other are each watched: every event says
/// PLAINTEXT, none `not_watched`, and nothing is counted at
/// `payload_map_full`. Without the place given back at CLOSE, the second
/// connection would find both places taken.
#[test]
fn a_closed_socket_gives_its_payload_place_back() {
    require_root();
    let sim = Precinct99::start(69).expect("precinct-99 on a simulated node");
    let (_dir, agent) = agent_under_policy(&sim, "mtls-places", &["--payload-sockets", "2"]);
    // Both sockets' CLOSE records come with their places given back.
    let (metrics, to_backend, _) = plaintext_rounds(&sim, agent, 3);
    assert_eq!(
        to_backend.len(),
        12,
        "CONNECT and CLOSE of both sockets of 3 connections: {to_backend:#?}"
    );
    for f in &to_backend {
        assert_eq!(
            f["encryption"]["state"], "PLAINTEXT",
            "{} {} from port {}: expected PLAINTEXT (each connection watched): {f}",
            f["event"], f["direction"], f["l4"]["source_port"]
        );
    }
    let lost = flowaudit_tests::support::metric_sample(
        &metrics,
        "flowaudit_kernel_events_lost_total{place=\"payload_map_full\"}",
    );
    assert_eq!(lost, 0.0, "payload_map_full counted {lost}");
}

/// `--payload-capture=false`: the payload programs stay unattached and
/// the kernel watches no socket's payload, so every event of a
/// plaintext connection under an mTLS rule is UNKNOWN (`not_watched`) with
/// MTLS_UNVERIFIED, never PLAINTEXT and never silently compliant; and
/// `payload_map_full` counts no loss, since nothing was lost.
#[test]
fn payload_capture_off_says_not_watched_for_every_event() {
    require_root();
    let sim = Precinct99::start(68).expect("precinct-99 on a simulated node");
    let (_dir, agent) = agent_under_policy(&sim, "mtls-capture-off", &["--payload-capture=false"]);
    let (metrics, to_backend, report) = plaintext_rounds(&sim, agent, 1);
    assert_eq!(
        to_backend.len(),
        4,
        "CONNECT and CLOSE of both sockets: {to_backend:#?}"
    );
    for f in &to_backend {
        let unverified = f["findings"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["kind"] == "MTLS_UNVERIFIED"));
        assert!(
            f["encryption"]["state"] == "UNKNOWN"
                && f["encryption"]["unknown_reason"] == "not_watched"
                && unverified.is_some_and(|u| u["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("payload capture is off")))
                && f["verdict"] == "COMPLIANT",
            "{} {}: expected UNKNOWN (not_watched) with an MTLS_UNVERIFIED that names the switch, reported but COMPLIANT (--mtls-unverified report, the default): {f}",
            f["event"],
            f["direction"]
        );
    }
    let lost = flowaudit_tests::support::metric_sample(
        &metrics,
        "flowaudit_kernel_events_lost_total{place=\"payload_map_full\"}",
    );
    assert_eq!(
        lost, 0.0,
        "payload_map_full counted {lost} with capture off"
    );
    assert_eq!(report.counter("kernel_events_lost"), 0);
}

/// `--mtls-unverified violation`: where a rule requires mTLS, encryption
/// that was not seen (here: payload capture off) makes the flow a
/// VIOLATION, with the same MTLS_UNVERIFIED finding.
#[test]
fn mtls_unverified_counts_as_a_violation_when_asked() {
    require_root();
    let sim = Precinct99::start(73).expect("precinct-99 on a simulated node");
    let (_dir, agent) = agent_under_policy(
        &sim,
        "mtls-unverified-violation",
        &["--payload-capture=false", "--mtls-unverified", "violation"],
    );
    let (_metrics, to_backend, _report) = plaintext_rounds(&sim, agent, 1);
    assert_eq!(
        to_backend.len(),
        4,
        "CONNECT and CLOSE of both sockets: {to_backend:#?}"
    );
    for f in &to_backend {
        let kinds = finding_kinds(f);
        assert!(
            f["verdict"] == "VIOLATION" && kinds.contains(&"MTLS_UNVERIFIED"),
            "{} {}: expected a VIOLATION with MTLS_UNVERIFIED: {f}",
            f["event"],
            f["direction"]
        );
    }
}

/// Issue 16: packets with IPv6 extension headers are not parsed by the
/// payload hook; the kernel says so at once (a mark record), and the flow
/// carries `unknown_reason: not_observable` and MTLS_UNVERIFIED, where it
/// used to wait out the timeout and pass as COMPLIANT. The client sets a
/// destination-options header (PadN) on its socket (IPV6_DSTOPTS, root in
/// its pod), so every packet it sends carries one.
#[test]
fn ipv6_extension_headers_are_reported_not_observable() {
    require_root();
    let sim = Precinct99::start(67).expect("precinct-99 on a simulated node");
    let (_dir, agent) = agent_under_policy(&sim, "mtls-exthdr", &["--encryption-wait-ms", "5000"]);
    // A server of our own on the backend's IPv6 address (the scenario's
    // listen on IPv4), on a port the mTLS rule covers.
    let backend = sim.workloads[BACKEND].pod.ip6();
    let _server = sim.workloads[BACKEND]
        .pod
        .serve(&flowaudit_tests::simpod::ServeOpts {
            listen: vec![std::net::SocketAddr::new(IpAddr::V6(backend), 8499)],
            reply_bytes: 64,
        })
        .expect("IPv6 server");
    // struct ip6_dest: next header (kernel-filled), length 0 (8 bytes),
    // then PadN (type 1) with 4 bytes of padding.
    let script = format!(
        "import socket\n\
         s=socket.socket(socket.AF_INET6,socket.SOCK_STREAM)\n\
         s.setsockopt(socket.IPPROTO_IPV6,59,bytes([0,0,1,4,0,0,0,0]))\n\
         s.settimeout(3)\n\
         s.connect(('{backend}',8499))\n\
         s.sendall(b'GET /api/orders HTTP/1.1\\r\\nHost: backend\\r\\n\\r\\n')\n\
         s.shutdown(socket.SHUT_WR)\n\
         try:\n  s.recv(4096)\n\
         except Exception:\n  pass\n\
         s.close()\n"
    );
    let out = sim.workloads[FRONTEND]
        .pod
        .output({
            let mut c = std::process::Command::new("python3");
            c.args(["-c", &script]);
            c
        })
        .expect("python3 client");
    assert!(
        out.status.success(),
        "the IPv6 client with a destination-options header failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.wait_for_flows(2, std::time::Duration::from_secs(30), |f| {
        f["event"] == "CLOSE"
    });
    let report = agent.stop();
    let events: Vec<&Value> = report
        .flows
        .iter()
        .filter(|f| {
            f["l4"]["destination_port"] == 8499
                && f["l4"]["destination_ip"] == backend.to_string().as_str()
        })
        .collect();
    assert_eq!(
        events.len(),
        4,
        "expected CONNECT and CLOSE of both sockets: {events:#?}"
    );
    // The client's packets carry the header: the client's outbound and the
    // server's inbound stream are not observable. (The server's answer has
    // none, but the classification ends at the first mark.)
    for f in &events {
        let findings = finding_kinds(f);
        assert!(
            f["encryption"]["state"] == "UNKNOWN"
                && f["encryption"]["unknown_reason"] == "not_observable"
                && findings.contains(&"MTLS_UNVERIFIED"),
            "{} {}: expected UNKNOWN (not_observable) with MTLS_UNVERIFIED, got {} ({}) {findings:?}",
            f["event"],
            f["direction"],
            f["encryption"]["state"],
            f["encryption"]["unknown_reason"]
        );
    }
}

/// One Python process in `pod` that listens on each of `listeners` (address,
/// port, TLS or not) with `TCP_DEFER_ACCEPT`, so that the kernel drops the
/// handshake's bare last ACK and the client's first data segment is what
/// makes the accepted socket. Each listener takes one connection and reads
/// once; a plaintext one answers 16 zero bytes, a TLS one (with `cert`: a
/// certificate and key; ALPN h2, http/1.1, no CertificateRequest) echoes
/// what it read reversed and waits for the client to close first
/// (s_client fails on an EOF without close_notify). One process for all:
/// Python starts slowly under the kernel matrix's emulation.
fn deferred_accept_servers(
    pod: &flowaudit_tests::Pod,
    cert: (&str, &str),
    listeners: &[(IpAddr, u16, bool)],
) -> flowaudit_tests::simnode::PodProcess {
    use std::io::BufRead;
    let script = "import socket, ssl, sys, threading\n\
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
        ctx.load_cert_chain(sys.argv[1], sys.argv[2])\n\
        ctx.set_alpn_protocols(['h2', 'http/1.1'])\n\
        def serve(s, tls):\n\
        \x20   c, _ = s.accept()\n\
        \x20   c.settimeout(30)\n\
        \x20   try:\n\
        \x20       if tls:\n\
        \x20           c = ctx.wrap_socket(c, server_side=True)\n\
        \x20       data = c.recv(4096)\n\
        \x20       c.sendall(data[::-1] if tls else bytes(16))\n\
        \x20       while tls and c.recv(4096):\n\
        \x20           pass\n\
        \x20   except Exception as e:\n\
        \x20       print('server on', s.getsockname(), 'failed:', e, file=sys.stderr)\n\
        \x20   c.close()\n\
        threads = []\n\
        for spec in sys.argv[3:]:\n\
        \x20   ip, port, tls = spec.split(',')\n\
        \x20   s = socket.socket(socket.AF_INET6 if ':' in ip else socket.AF_INET)\n\
        \x20   s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
        \x20   s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 10)\n\
        \x20   s.bind((ip, int(port)))\n\
        \x20   s.listen(4)\n\
        \x20   threads.append(threading.Thread(target=serve, args=(s, tls == 'tls')))\n\
        for t in threads:\n\
        \x20   t.start()\n\
        print('READY', flush=True)\n\
        for t in threads:\n\
        \x20   t.join()\n";
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", script, cert.0, cert.1]);
    for (ip, port, tls) in listeners {
        cmd.arg(format!(
            "{ip},{port},{}",
            if *tls { "tls" } else { "plain" }
        ));
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    let mut proc = pod
        .spawn_guarded(cmd)
        .expect("python3 deferred-accept servers");
    let stdout = proc
        .child_mut()
        .stdout
        .take()
        .expect("the servers' stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        let _ = tx.send(lines.next().and_then(Result::ok));
    });
    let line = rx.recv_timeout(std::time::Duration::from_secs(60));
    assert!(
        matches!(&line, Ok(Some(l)) if l == "READY"),
        "the deferred-accept servers ({listeners:?}) did not start listening in 60 s: {line:?}"
    );
    proc
}

/// A server listening with `TCP_DEFER_ACCEPT` (nginx `listen ... deferred`,
/// haproxy `defer-accept`) gets its accepted socket from the client's first
/// data segment, which the kernel filters on the listening socket only.
/// The server's end must still be classified from what the client sent:
/// its HTTP request (the server answers 16 zero bytes, which say nothing;
/// over IPv4 and IPv6), and its ClientHello (where SNI and ALPN come from),
/// also one longer than a kernel record. Both ends of each
/// connection must match what a server without the option gets.
#[test]
fn a_deferred_accept_server_sees_the_clients_first_bytes() {
    require_root();
    let sim = Precinct99::start(72).expect("precinct-99 on a simulated node");
    let dir = temp_dir("mtls-deferred");
    let material = pki(&dir, &["backend", "frontend"]);
    let (_agent_dir, agent) = agent_under_policy(
        &sim,
        "mtls-deferred-agent",
        &["--encryption-wait-ms", "5000"],
    );
    let frontend = &sim.workloads[FRONTEND].pod;
    let backend = &sim.workloads[BACKEND].pod;
    let ip = IpAddr::V4(backend.ip4());
    let ip6 = IpAddr::V6(backend.ip6());
    let http = b"GET /api/orders HTTP/1.1\r\nHost: backend\r\n\r\n";
    let (cert, key) = (material.cert("backend"), material.key("backend"));
    let _servers = deferred_accept_servers(
        backend,
        (&cert, &key),
        &[
            (ip, 8496, false),
            (ip6, 8495, false),
            (ip, 8497, true),
            (ip, 8494, true),
        ],
    );
    for (ip, port) in [(ip, 8496), (ip6, 8495)] {
        assert!(
            tls::raw_client(frontend, ip, port, http).expect("http client"),
            "plaintext HTTP client to {ip} failed"
        );
    }
    let (ok, out) =
        tls::client(frontend, &material, ip, 8497, Version::Tls13, None).expect("TLS client");
    assert!(
        ok,
        "the TLS handshake with the deferred-accept server failed: {out}"
    );

    // A ClientHello longer than one kernel record (1,024 bytes), as clients
    // offering post-quantum key shares send: a long ALPN list here.
    let script = "import socket, ssl, sys\n\
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n\
        ctx.load_verify_locations(sys.argv[3])\n\
        ctx.check_hostname = False\n\
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3\n\
        ctx.set_alpn_protocols(['h2', 'http/1.1'] + ['p%d-' % i + 'x' * 200 for i in range(8)])\n\
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)\n\
        t = ctx.wrap_socket(s, server_hostname='backend.demo.local')\n\
        t.sendall(b'hello')\n\
        assert t.recv(64) == b'olleh'\n\
        t.close()\n";
    let out = frontend
        .output({
            let mut c = std::process::Command::new("python3");
            c.args(["-c", script, &ip.to_string(), "8494", &material.ca()]);
            c
        })
        .expect("python3 TLS client");
    assert!(
        out.status.success(),
        "the TLS client with a long ClientHello failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let all_closed = agent.wait_for_flows(8, std::time::Duration::from_secs(30), |f| {
        f["event"] == "CLOSE"
    });
    let report = agent.stop();
    let http_expect = plaintext("http", "VIOLATION", &["MTLS_MISSING"]);
    let mut problems = check(
        &report.flows,
        &[ip],
        8496,
        "plaintext HTTP to a deferred-accept server",
        &http_expect,
    );
    problems.extend(check(
        &report.flows,
        &[ip6],
        8495,
        "plaintext HTTP to a deferred-accept server over IPv6",
        &http_expect,
    ));
    problems.extend(check(
        &report.flows,
        &[ip],
        8497,
        "TLS1.3 to a deferred-accept server",
        &Expect {
            state: "TLS",
            client_certificate: "NOT_SENT",
            inferred: true,
            tls_version: "TLS1.3",
            server_spiffe_id: "",
            client_spiffe_id: "",
            protocol: "tls",
            verdict: "VIOLATION",
            findings: &["MTLS_MISSING"],
        },
    ));
    // The long ClientHello: both ends see all of it (its SNI, and its ALPN
    // list, which runs past the first record), and agree.
    let big: Vec<&Value> = report
        .flows
        .iter()
        .filter(|f| f["l4"]["destination_port"] == 8494)
        .collect();
    let offered: Vec<String> = ["h2".to_owned(), "http/1.1".to_owned()]
        .into_iter()
        .chain((0..8).map(|i| format!("p{i}-{}", "x".repeat(200))))
        .collect();
    let client_end = big
        .iter()
        .find(|f| f["event"] == "CLOSE" && f["direction"] == "EGRESS");
    if big.len() != 4 {
        problems.push(format!(
            "long ClientHello: {} events, expected CONNECT and CLOSE of both sockets",
            big.len()
        ));
    }
    for f in &big {
        let enc = &f["encryption"];
        let alpn: Vec<&str> = enc["alpn"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if str_of(enc, &["state"]) != "TLS"
            || str_of(enc, &["tls_version"]) != "TLS1.3"
            || str_of(enc, &["sni"]) != "backend.demo.local"
            || alpn != offered
            || client_end.map(|c| &c["encryption"]) != Some(enc)
        {
            problems.push(format!(
                "long ClientHello: {} {}: expected TLS1.3, SNI backend.demo.local, the 10 offered ALPN names, and the client end's encryption; got {enc}",
                f["event"], f["direction"]
            ));
        }
    }
    assert_no_problems(problems, 8, all_closed, &report);
}
