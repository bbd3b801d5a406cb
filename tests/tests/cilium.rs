//! Issue 18: Cilium mutual authentication audited as Cilium enforces it.
//! A CiliumNetworkPolicy with `authentication.mode: required` on the
//! backend's ingress; the agent runs as the DaemonSet does (its read-only
//! hostPath /sys/fs/bpf included) in a kind-like node whose BPF filesystem
//! holds a Cilium double's pinned maps, with Cilium's layouts at v1.15.7 and
//! v1.18.3. Each client pod is a separate security identity whose auth-map
//! state differs; every event of its connection must carry that state, with
//! the verdict and findings the issue asks for.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime};

use flowaudit_tests::cilium_double::{
    AUTH_TYPE_ALWAYS_FAIL, AUTH_TYPE_SPIRE, AuthKey, CiliumDouble, Release, WIREGUARD_KEY,
};
use flowaudit_tests::scenario::{BACKEND, Precinct99, endpoint_entry};
use flowaudit_tests::simnode::{Pod, PodSpec};
use flowaudit_tests::simpod::{ConnectOpts, ServeOpts};
use flowaudit_tests::support::{finding_kinds, require_root, temp_dir};
use serde_json::Value;

const BACKEND_ID: u32 = 20_001;
/// Node addresses the double says some peers live on (never routed: only
/// Cilium's maps name them).
const NODE_B: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 99);
const NODE_C: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 98);

fn policy() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/cilium-mutual-auth/backend-ingress.yaml")
}

/// What every event of one connection must show.
struct Expect {
    state: &'static str,
    path: &'static str,
    verdict: &'static str,
    finding: Option<&'static str>,
    /// Words the finding's message (or the state's detail) must contain.
    words: &'static str,
}

fn client(sim: &Precinct99, name: &str) -> Pod {
    sim.node
        .add_pod(
            PodSpec::new("99-apps", name)
                .service_account("frontend")
                .label("app", "frontend"),
        )
        .unwrap_or_else(|e| panic!("adding client pod {name}: {e}"))
}

fn connect(from: &Pod, to: Ipv4Addr) {
    let mut opts = ConnectOpts::new(SocketAddr::new(IpAddr::V4(to), 8000));
    opts.send_bytes = 200;
    opts.timeout_ms = 3000;
    let r = from
        .connect(&opts)
        .unwrap_or_else(|e| panic!("{} -> {to}:8000: {e}", from.name()));
    assert!(
        r.records.iter().all(|c| c.error.is_none()),
        "{} -> {to}:8000 should connect: {:?}",
        from.name(),
        r.records
    );
}

fn events_of<'a>(flows: &'a [Value], from: &Pod, to: Ipv4Addr) -> Vec<&'a Value> {
    flows
        .iter()
        .filter(|f| {
            f["l4"]["source_ip"] == from.ip4().to_string().as_str()
                && f["l4"]["destination_ip"] == to.to_string().as_str()
                && f["l4"]["destination_port"] == 8000
        })
        .collect()
}

/// Every event (CONNECT and CLOSE of both sockets) carries the expected
/// state; returns what was wrong.
fn check(flows: &[Value], from: &Pod, to: Ipv4Addr, e: &Expect) -> Vec<String> {
    let events = events_of(flows, from, to);
    let case = format!("{} -> {to}:8000", from.name());
    if events.len() != 4 {
        return vec![format!(
            "{case}: expected CONNECT and CLOSE of both sockets, got {} events",
            events.len()
        )];
    }
    let mut wrong = Vec::new();
    for f in events {
        let kinds = finding_kinds(f);
        let messages: Vec<&str> = f["findings"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["message"].as_str()).collect())
            .unwrap_or_default();
        let m = &f["mutual_auth"];
        let text = format!(
            "{} {}: {} {kinds:?} mutual_auth={m}",
            f["event"], f["direction"], f["verdict"]
        );
        let finding_ok = match e.finding {
            Some(k) => kinds == [k] && messages.iter().any(|x| x.contains(e.words)),
            None => kinds.is_empty() && m["detail"].as_str().unwrap_or("").contains(e.words),
        };
        if m["state"] != e.state
            || m["path_encryption"] != e.path
            || f["verdict"] != e.verdict
            || !finding_ok
            || kinds.contains(&"MTLS_MISSING")
        {
            wrong.push(format!(
                "{case}: expected {} ({}) {} {:?} mentioning {:?}; got {text}",
                e.state, e.path, e.verdict, e.finding, e.words
            ));
        }
    }
    wrong
}

fn key(remote: u32, node: u16, auth_type: u8) -> AuthKey {
    AuthKey {
        local_identity: BACKEND_ID,
        remote_identity: remote,
        remote_node_id: node,
        auth_type,
    }
}

/// Fills the double with the cluster this test describes (`clients` in the
/// order of `CASES`, identities 30001...).
fn fill(double: &CiliumDouble, sim: &Precinct99, clients: &[Pod], remote_backend: &Pod) {
    let hour = Duration::from_secs(3600);
    let now = SystemTime::now();
    let must = |r: std::io::Result<()>, what: &str| {
        r.unwrap_or_else(|e| panic!("Cilium double: {what}: {e}"));
    };
    let backend = sim.workloads[BACKEND].pod.ip4();
    must(
        double.set_identity(IpAddr::V4(backend), BACKEND_ID, None, 0),
        "backend identity",
    );
    must(
        double.set_identity(
            IpAddr::V4(remote_backend.ip4()),
            BACKEND_ID,
            Some(NODE_B),
            WIREGUARD_KEY,
        ),
        "remote backend identity",
    );
    must(double.set_node(NODE_B, 5, 0), "node B");
    must(double.set_node(NODE_C, 6, 0), "node C");
    for (i, pod) in clients.iter().enumerate() {
        let id = 30_001 + i as u32;
        let (node, enc) = match i {
            5 => (Some(NODE_B), WIREGUARD_KEY),
            6 => (Some(NODE_C), 0),
            _ => (None, 0),
        };
        must(
            double.set_identity(IpAddr::V4(pod.ip4()), id, node, enc),
            "client identity",
        );
        let entry = match i {
            0 => Some((key(id, 0, AUTH_TYPE_SPIRE), now + hour)),
            1 => Some((key(id, 0, AUTH_TYPE_SPIRE), now - hour)),
            2 => None,
            3 => Some((key(id, 9, AUTH_TYPE_SPIRE), now + hour)),
            4 => Some((key(id, 0, AUTH_TYPE_ALWAYS_FAIL), now + hour)),
            5 => Some((key(id, 5, AUTH_TYPE_SPIRE), now + hour)),
            6 => Some((key(id, 6, AUTH_TYPE_SPIRE), now + hour)),
            _ => None,
        };
        if let Some((k, until)) = entry {
            must(double.authenticate(k, until), "auth entry");
        }
    }
}

/// The client pods, each one identity and one auth-map state.
const CASES: [(&str, Expect); 7] = [
    (
        "frontend-ok",
        Expect {
            state: "AUTHENTICATED",
            path: "SAME_NODE",
            verdict: "COMPLIANT",
            finding: None,
            words: "",
        },
    ),
    (
        "frontend-expired",
        Expect {
            state: "EXPIRED",
            path: "SAME_NODE",
            verdict: "VIOLATION",
            finding: Some("MUTUAL_AUTH_MISSING"),
            words: "had expired at",
        },
    ),
    (
        "frontend-noentry",
        Expect {
            state: "MISSING",
            path: "SAME_NODE",
            verdict: "VIOLATION",
            finding: Some("MUTUAL_AUTH_MISSING"),
            words: "no Cilium auth entry for the pair (identities 20001 -> 30003, remote node 0)",
        },
    ),
    (
        // An entry exists, for the same identities from another node.
        "frontend-othernode",
        Expect {
            state: "MISSING",
            path: "SAME_NODE",
            verdict: "VIOLATION",
            finding: Some("MUTUAL_AUTH_MISSING"),
            words: "remote node 0",
        },
    ),
    (
        // An entry exists, of another auth type (test-always-fail).
        "frontend-othertype",
        Expect {
            state: "MISSING",
            path: "SAME_NODE",
            verdict: "VIOLATION",
            finding: Some("MUTUAL_AUTH_MISSING"),
            words: "auth type spire",
        },
    ),
    (
        "frontend-wireguard",
        Expect {
            state: "AUTHENTICATED",
            path: "ENCRYPTED",
            verdict: "COMPLIANT",
            finding: None,
            words: "WireGuard",
        },
    ),
    (
        "frontend-unencrypted",
        Expect {
            state: "AUTHENTICATED",
            path: "UNENCRYPTED",
            verdict: "COMPLIANT",
            finding: Some("MUTUAL_AUTH_UNENCRYPTED"),
            words: "no WireGuard or IPsec",
        },
    ),
];

#[test]
fn cilium_mutual_authentication_is_audited_from_its_auth_map() {
    require_root();
    let sim = Precinct99::start(80).expect("precinct-99 on a simulated node");
    let clients: Vec<Pod> = CASES.iter().map(|(n, _)| client(&sim, n)).collect();
    let remote_backend = sim
        .node
        .add_pod(
            PodSpec::new("99-apps", "backend-remote")
                .service_account("backend")
                .label("app", "backend"),
        )
        .expect("backend-remote pod");
    let _remote_server = remote_backend
        .serve(&ServeOpts {
            listen: vec![SocketAddr::new(IpAddr::V4(remote_backend.ip4()), 8000)],
            reply_bytes: 64,
        })
        .expect("backend-remote server");
    let dir = temp_dir("cilium-auth");
    let endpoints = dir.join("endpoints.yaml");
    let mut y = sim.endpoint_directory();
    for p in clients.iter().chain([&remote_backend]) {
        y.push_str(&endpoint_entry(p, sim.node.name()));
    }
    std::fs::write(&endpoints, y).expect("endpoint directory");
    let policy = policy();
    let agent = flowaudit_tests::support::node_agent(
        &sim.node,
        &[
            "--endpoints",
            endpoints.to_str().expect("UTF-8"),
            "--policy",
            policy.to_str().expect("UTF-8"),
            "--trust-domain",
            "demo.local",
            "--spire-admin-socket",
            "none",
        ],
    );
    let backend = sim.workloads[BACKEND].pod.ip4();
    let mut wrong = Vec::new();

    // 1. No Cilium on the node yet: not observable, never MTLS_MISSING.
    connect(&clients[0], backend);
    agent.wait_for_flows(4, Duration::from_secs(30), |_| true);
    let before = flowaudit_tests::support::read_flows(&agent.export_file);
    wrong.extend(check(
        &before,
        &clients[0],
        backend,
        &Expect {
            state: "NOT_OBSERVABLE",
            path: "UNKNOWN",
            verdict: "COMPLIANT",
            finding: Some("MTLS_UNVERIFIED"),
            words: "Cilium mutual authentication not observable here",
        },
    ));

    // 2. Cilium 1.15.7 appears (as when its agent starts after flowaudit):
    // the agent opens the maps at its next look, within 10 s.
    let double = CiliumDouble::install(&sim.node, Release::V1_15_7).expect("Cilium 1.15.7 double");
    fill(&double, &sim, &clients, &remote_backend);
    std::thread::sleep(Duration::from_millis(10_500));
    for c in &clients {
        connect(c, backend);
    }
    // Ingress is enforced on the destination's node: another node's Cilium
    // decides it, and that node's flowaudit reports it.
    connect(&clients[0], remote_backend.ip4());
    agent.wait_for_flows(
        before.len() + 4 * (CASES.len() + 1),
        Duration::from_secs(60),
        |_| true,
    );
    let first = flowaudit_tests::support::read_flows(&agent.export_file).split_off(before.len());
    for (c, (_, e)) in clients.iter().zip(CASES.iter()) {
        wrong.extend(check(&first, c, backend, e));
    }
    wrong.extend(check(
        &first,
        &clients[0],
        remote_backend.ip4(),
        &Expect {
            state: "NOT_OBSERVABLE",
            path: "UNKNOWN",
            verdict: "COMPLIANT",
            finding: Some("MTLS_UNVERIFIED"),
            words: "enforced by Cilium on the destination's node (172.18.0.99)",
        },
    ));
    let seen = before.len() + first.len();

    // What `flowaudit observe` shows, and what /metrics counts.
    let observe = std::process::Command::new(flowaudit_tests::agent::agent_binary())
        .args(["observe", "--server", &agent.grpc_addr(), "--last", "200"])
        .output()
        .expect("flowaudit observe");
    let observe = String::from_utf8_lossy(&observe.stdout).into_owned();
    let (_, metrics) = agent.http_get("/metrics");
    let status = std::process::Command::new(flowaudit_tests::agent::agent_binary())
        .args(["status", "--server", &agent.grpc_addr(), "-o", "json"])
        .output()
        .expect("flowaudit status");
    let status: Value = serde_json::from_slice(&status.stdout).unwrap_or_else(|e| {
        panic!(
            "flowaudit status -o json: {e}: {}",
            String::from_utf8_lossy(&status.stdout)
        )
    });
    assert!(
        status["cilium"]["maps_found"] == true
            && status["cilium"]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("/sys/fs/bpf/tc/globals") && d.contains("1.15-1.17")),
        "flowaudit status should say where Cilium's maps were found: {}",
        status["cilium"]
    );

    // 3. Cilium upgraded to 1.18.3: the maps are re-created with the new
    // layouts (cilium_ipcache_v2, cilium_node_map_v2); the agent follows.
    double.uninstall().expect("unpinning the 1.15.7 maps");
    let double = CiliumDouble::install(&sim.node, Release::V1_18_3).expect("Cilium 1.18.3 double");
    fill(&double, &sim, &clients, &remote_backend);
    std::thread::sleep(Duration::from_millis(10_500));
    let upgraded = [0usize, 1, 5];
    for i in upgraded {
        connect(&clients[i], backend);
    }
    agent.wait_for_flows(seen + 4 * upgraded.len(), Duration::from_secs(60), |_| true);
    let report = agent.stop();
    let upgraded_flows = report.flows.get(seen..).unwrap_or_default();
    for i in upgraded {
        wrong.extend(check(upgraded_flows, &clients[i], backend, &CASES[i].1));
    }
    assert!(
        wrong.is_empty(),
        "Cilium mutual authentication was not audited as Cilium enforces it:\n{}",
        wrong.join("\n")
    );
    let layouts: Vec<&str> = report
        .logs
        .iter()
        .filter_map(|l| l["ipcache"].as_str())
        .collect();
    assert_eq!(
        layouts,
        [
            "cilium_ipcache (Cilium 1.15-1.17 layout)",
            "cilium_ipcache_v2 (Cilium 1.18+ layout)"
        ],
        "the agent should log each Cilium layout it opened"
    );
    for (state, at_least) in [
        ("AUTHENTICATED", 3.0 * 4.0),
        ("EXPIRED", 4.0),
        ("MISSING", 3.0 * 4.0),
        ("NOT_OBSERVABLE", 2.0 * 4.0),
    ] {
        let got = flowaudit_tests::support::metric_sample(
            &metrics,
            &format!("flowaudit_mutual_auth_total{{state=\"{state}\"}}"),
        );
        assert!(
            got >= at_least,
            "flowaudit_mutual_auth_total{{state=\"{state}\"}} = {got}, expected at least {at_least}"
        );
    }
    // The compact lines name ends by SPIFFE ID (every client is frontend):
    // each state appears, on a line with its verdict and finding.
    for (state, verdict, finding) in [
        ("AUTHENTICATED(ENCRYPTED)", "COMPLIANT", ""),
        ("AUTHENTICATED(SAME_NODE)", "COMPLIANT", ""),
        (
            "AUTHENTICATED(UNENCRYPTED)",
            "COMPLIANT",
            " MUTUAL_AUTH_UNENCRYPTED",
        ),
        ("EXPIRED(SAME_NODE)", "VIOLATION", " MUTUAL_AUTH_MISSING"),
        ("MISSING(SAME_NODE)", "VIOLATION", " MUTUAL_AUTH_MISSING"),
        ("NOT_OBSERVABLE(UNKNOWN)", "COMPLIANT", " MTLS_UNVERIFIED"),
    ] {
        let shown = format!("cilium-auth={state}{finding}");
        let line = observe
            .lines()
            .find(|l| l.contains(&shown))
            .unwrap_or_else(|| panic!("observe shows no `{shown}`:\n{observe}"));
        assert!(
            line.contains(verdict),
            "observe: {state} should be {verdict}: {line}"
        );
    }
}
