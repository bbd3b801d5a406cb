//! `flowaudit relay` on two kind-like nodes: an agent on each (run as the
//! DaemonSet runs it, its TCP gRPC with mTLS for the relay's SPIFFE ID
//! only), the relay in a pod of its own (as its Deployment runs it, dialing
//! the agents' pod addresses with `--peers`), and `flowaudit observe` in a
//! third pod with an operator's SVID. Covers: time order across nodes,
//! joined cross-node connections with both ends ATTESTED by their own
//! node's SPIRE, losses told per node, a node's agent stopped and started
//! again (status notices; the other node's flows keep coming; the node's
//! flows resume), and clients without a valid SVID refused. Needs root;
//! never skips.

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flowaudit_tests::agent::{RunningAgent, agent_binary};
use flowaudit_tests::daemonset::kind_agent_pod_spec;
use flowaudit_tests::scenario::endpoint_entry;
use flowaudit_tests::simnode::PodProcess;
use flowaudit_tests::simpod::{ConnRecord, ServeOpts};
use flowaudit_tests::support::*;
use flowaudit_tests::tls::TlsMaterial;
use flowaudit_tests::{Pod, PodSpec, SimNode};
use serde_json::Value;

const AGENT_ID: &str = "spiffe://demo.local/ns/flowaudit/sa/flowaudit";
const RELAY_ID: &str = "spiffe://demo.local/ns/flowaudit/sa/flowaudit-relay";
const OBSERVER_ID: &str = "spiffe://demo.local/flowaudit/observer/test";

fn pod(node: &SimNode, ns: &str, name: &str, sa: &str) -> Pod {
    node.add_pod(PodSpec::new(ns, name).service_account(sa).label("app", sa))
        .unwrap_or_else(|e| panic!("pod {name} on {}: {e}", node.name()))
}

fn serve(p: &Pod) -> flowaudit_tests::simpod::Server {
    p.serve(&ServeOpts {
        listen: vec!["0.0.0.0:8000".parse().unwrap()],
        reply_bytes: 100,
    })
    .unwrap_or_else(|e| panic!("server in {}: {e}", p.name()))
}

/// The TLS flags of a client of the relay with `who`'s certificate.
fn client_tls(tls: &TlsMaterial, who: &str) -> Vec<String> {
    tls.client_flags(who, RELAY_ID)
}

/// A following `observe` in `pod`: its JSON lines and its notices (stderr).
struct Follower {
    _proc: PodProcess,
    flows: mpsc::Receiver<Value>,
    notices: mpsc::Receiver<String>,
    seen_notices: Vec<String>,
}

impl Follower {
    fn start(pod: &Pod, args: &[String]) -> Self {
        let mut cmd = Command::new(agent_binary());
        cmd.arg("observe").args(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = pod
            .spawn(cmd)
            .unwrap_or_else(|e| panic!("observe in {}: {e}", pod.name()));
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let (ftx, flows) = mpsc::channel();
        let (ntx, notices) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("observe printed a line that is not JSON ({e}): {line}")
                });
                if ftx.send(v).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if ntx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            _proc: PodProcess::new(child),
            flows,
            notices,
            seen_notices: Vec::new(),
        }
    }

    /// Flows until `done` says enough (panics after `secs`).
    fn flows_until(
        &self,
        secs: u64,
        what: &str,
        mut done: impl FnMut(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut got = Vec::new();
        while !done(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.flows.recv_timeout(left) {
                Ok(v) => got.push(v),
                Err(_) => panic!(
                    "{what}: not within {secs} s; got {} flows:\n{got:#?}",
                    got.len()
                ),
            }
        }
        got
    }

    /// Waits for a notice line containing every one of `parts`.
    fn notice(&mut self, secs: u64, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(n) = self
                .seen_notices
                .iter()
                .find(|n| parts.iter().all(|p| n.contains(p)))
            {
                return n.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.notices.recv_timeout(left) {
                Ok(line) => self.seen_notices.push(line),
                Err(_) => panic!(
                    "no notice with {parts:?} within {secs} s; notices so far:\n{}",
                    self.seen_notices.join("\n")
                ),
            }
        }
    }
}

fn run_in(pod: &Pod, args: &[String]) -> std::process::Output {
    let mut cmd = Command::new(agent_binary());
    cmd.args(args);
    pod.output(cmd)
        .unwrap_or_else(|e| panic!("{args:?} in {}: {e}", pod.name()))
}

/// The joined flows (two halves) of `rec`'s connection.
fn joined_of<'a>(flows: &'a [Value], rec: &ConnRecord) -> Vec<&'a Value> {
    let local = rec.local.expect("local address");
    flows
        .iter()
        .filter(|f| {
            f["l4"]["source_port"] == local.port()
                && f["l4"]["source_ip"] == local.ip().to_string()
                && f["l4"]["destination_ip"] == rec.remote.ip().to_string()
                && f["joined"]["halves"]
                    .as_array()
                    .is_some_and(|h| h.len() == 2)
        })
        .collect()
}

#[test]
fn relay_merges_nodes_joins_cross_node_connections_and_rides_out_a_node_restart() {
    require_root();
    let a = SimNode::named(74, "precinct-99-worker").expect("node a");
    let b = SimNode::named(75, "precinct-99-worker2").expect("node b");
    a.link(&b).expect("route between the nodes");
    let frontend = pod(&a, "99-apps", "frontend-7d9f", "frontend");
    let web = pod(&a, "99-apps", "web-0", "web");
    let backend = pod(&b, "99-apps", "backend-5c8b", "backend");

    let dir = temp_dir("relay");
    let tls = TlsMaterial::generate(
        &dir,
        &[
            ("agent", AGENT_ID),
            ("relay", RELAY_ID),
            ("observer", OBSERVER_ID),
            // A workload's real SVID: valid, but not an observer's.
            ("intruder", "spiffe://demo.local/ns/99-apps/sa/frontend"),
        ],
    )
    .expect("test certificates");
    let endpoints = dir.join("endpoints.yaml");
    let mut text = format!(
        "nodes:\n  - name: {}\n    ips: [{}]\n  - name: {}\n    ips: [{}]\nendpoints:\n",
        a.name(),
        a.ip4(),
        b.name(),
        b.ip4()
    );
    for (n, p) in [(&a, &frontend), (&a, &web), (&b, &backend)] {
        text.push_str(&endpoint_entry(p, n.name()));
    }
    std::fs::write(&endpoints, text).expect("write endpoints");
    let _spire_a = node_spire(&a, &[&frontend, &web]);
    let _spire_b = node_spire(&b, &[&backend]);

    let (cert, key, ca) = (tls.cert("agent"), tls.key("agent"), tls.ca());
    let common = [
        "--endpoints",
        endpoints.to_str().unwrap(),
        "--trust-domain",
        TD,
        "--identity-wait-ms",
        "2000",
        "--grpc-addr",
        "0.0.0.0:4244",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-ca",
        &ca,
        "--allow-peer",
        RELAY_ID,
    ];
    let agent_a = node_agent(&a, &common);
    // Node b watches one socket's payload at once: every other socket there is a
    // kernel loss (payload_map_full) its agent tells its subscribers.
    let mut args_b = common.to_vec();
    args_b.extend(["--payload-sockets", "1"]);
    let agent_b = node_agent(&b, &args_b);
    let pod_b = agent_b.pod().expect("agent b runs in a pod").clone();
    let ip_a = agent_a.pod().expect("agent a runs in a pod").ip4();
    let _servers = [serve(&backend), serve(&web)];

    // The relay in its own pod on node a, as its Deployment runs it.
    let relay_pod = pod(&a, "flowaudit", "flowaudit-relay-0", "flowaudit-relay");
    let relay_log = dir.join("relay.log");
    let mut relay_cmd = Command::new(agent_binary());
    relay_cmd
        .args(["relay", "--name", "relay-0", "--peers"])
        .arg(format!("{ip_a}:4244,{}:4244", pod_b.ip4()))
        .args([
            "--grpc-addr",
            "0.0.0.0:4245",
            "--metrics-addr",
            "127.0.0.1:9967",
        ])
        .args([
            "--tls-cert",
            &tls.cert("relay"),
            "--tls-key",
            &tls.key("relay"),
            "--tls-ca",
            &ca,
        ])
        .args(["--allow-peer", "spiffe://demo.local/flowaudit/observer/*"])
        .args(["--allow-agent", AGENT_ID])
        .args([
            "--sort-window",
            "2s",
            "--join-window",
            "4s",
            "--log-format",
            "json",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&relay_log).expect("relay log"));
    let relay = relay_pod
        .spawn_guarded(relay_cmd)
        .unwrap_or_else(|e| panic!("relay: {e}"));
    let relay_log_text = || std::fs::read_to_string(&relay_log).unwrap_or_default();
    let server = format!("{}:4245", relay_pod.ip4());

    // The operator's pod on node b.
    let ops = pod(&b, "ops", "observer", "observer");
    let status_args = |who: &str| {
        let mut v = vec![
            "status".to_owned(),
            "--server".into(),
            server.clone(),
            "-o".into(),
            "json".into(),
        ];
        v.extend(client_tls(&tls, who));
        v
    };
    // Both nodes connected, as `flowaudit status` lists them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status: Value = loop {
        let out = run_in(&ops, &status_args("observer"));
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
            let connected = v["nodes"].as_array().map_or(0, |n| {
                n.iter().filter(|n| n["state"] == "CONNECTED").count()
            });
            if connected == 2 {
                break v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not connect both nodes within 30 s; status: {}{}\nrelay log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            relay_log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(status["relay"], true, "{status:#}");
    let mut names: Vec<&str> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_name"].as_str().unwrap_or(""))
        .collect();
    names.sort();
    assert_eq!(names, [a.name(), b.name()], "{status:#}");
    let text_status = run_in(
        &ops,
        &status_args("observer")[..3]
            .iter()
            .cloned()
            .chain(client_tls(&tls, "observer"))
            .collect::<Vec<_>>(),
    );
    let text_status = String::from_utf8_lossy(&text_status.stdout).into_owned();
    assert!(
        text_status.contains(a.name())
            && text_status.contains(b.name())
            && text_status.contains("connected"),
        "`flowaudit status` lists the nodes:\n{text_status}"
    );

    // Clients without a valid SVID are refused on the TCP port.
    for who in ["intruder", "agent"] {
        let out = run_in(&ops, &status_args(who));
        assert!(
            !out.status.success(),
            "{who} was served: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let plaintext = run_in(&ops, &["status".into(), "--server".into(), server.clone()]);
    assert!(
        !plaintext.status.success(),
        "a client without TLS was served: {}",
        String::from_utf8_lossy(&plaintext.stdout)
    );

    // A joined follower in the operator's pod.
    let mut follow_args = vec![
        "--server".to_owned(),
        server.clone(),
        "-f".into(),
        "--join".into(),
        "--namespace".into(),
        "99-apps".into(),
        "-o".into(),
        "json".into(),
    ];
    follow_args.extend(client_tls(&tls, "observer"));
    let mut follower = Follower::start(&ops, &follow_args);
    std::thread::sleep(Duration::from_secs(1));

    // Cross-node connections: one joined flow per event, both ends ATTESTED
    // by their own node.
    let cross = connect_ok(&frontend, IpAddr::V4(backend.ip4()), 3);
    let got = follower.flows_until(
        40,
        "joined CONNECT and CLOSE of 3 cross-node connections",
        |got| cross.iter().all(|r| joined_of(got, r).len() == 2),
    );
    for rec in &cross {
        let flows = joined_of(&got, rec);
        let mut events: Vec<&str> = flows.iter().map(|f| f["event"].as_str().unwrap()).collect();
        events.sort();
        assert_eq!(events, ["CLOSE", "CONNECT"], "{rec:?}: {flows:#?}");
        for f in flows {
            let what = format!("joined {rec:?}: {f:#}");
            assert_eq!(f["source"]["identity_source"], "ATTESTED", "{what}");
            assert_eq!(f["source"]["pod_name"], frontend.name(), "{what}");
            assert!(f["source"]["pid"].as_u64().is_some(), "{what}");
            assert_eq!(f["destination"]["identity_source"], "ATTESTED", "{what}");
            assert_eq!(f["destination"]["pod_name"], backend.name(), "{what}");
            assert!(f["destination"]["pid"].as_u64().is_some(), "{what}");
            let halves = f["joined"]["halves"].as_array().unwrap();
            assert_eq!(
                (
                    halves[0]["direction"].as_str(),
                    halves[0]["node_name"].as_str()
                ),
                (Some("EGRESS"), Some(a.name())),
                "{what}"
            );
            assert_eq!(
                (
                    halves[1]["direction"].as_str(),
                    halves[1]["node_name"].as_str()
                ),
                (Some("INGRESS"), Some(b.name())),
                "{what}"
            );
        }
    }
    // Node b's kernel losses reach the follower, named by node.
    let lost = follower.notice(20, &[&format!("node {}", b.name()), "payload_map_full"]);
    assert!(!lost.contains(&format!("node {}:", a.name())), "{lost}");

    // Merged time order, with every half: --last from the relay's buffer.
    let mut last_args = vec![
        "observe".to_owned(),
        "--server".into(),
        server.clone(),
        "--last".into(),
        "1000".into(),
        "--namespace".into(),
        "99-apps".into(),
        "-o".into(),
        "json".into(),
    ];
    last_args.extend(client_tls(&tls, "observer"));
    let out = run_in(&ops, &last_args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let merged: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON flow"))
        .collect();
    let times: Vec<&str> = merged.iter().map(|f| f["time"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "flows from both nodes in time order");
    for rec in &cross {
        let local = rec.local.unwrap();
        let halves: Vec<(&str, &str)> = merged
            .iter()
            .filter(|f| f["l4"]["source_port"] == local.port())
            .map(|f| {
                (
                    f["node_name"].as_str().unwrap(),
                    f["direction"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            halves.len(),
            4,
            "{rec:?}: both events on both nodes: {halves:?}"
        );
        assert!(
            halves.contains(&(a.name(), "EGRESS")) && halves.contains(&(b.name(), "INGRESS")),
            "{halves:?}"
        );
    }

    // Node b's agent stops: told why (a stop, not a broken stream), and
    // node a's flows keep coming.
    agent_b.stop();
    let stopped = follower.notice(
        30,
        &[
            b.name(),
            "unavailable",
            &format!(
                "the flowaudit agent on node {} is stopping (SIGINT)",
                b.name()
            ),
        ],
    );
    assert!(
        !stopped.contains("stream broke"),
        "a stopping agent is not a broken stream: {stopped}"
    );
    let during = connect_ok(&frontend, IpAddr::V4(web.ip4()), 1);
    follower.flows_until(30, "node a's flows while node b is down", |got| {
        joined_of(got, &during[0]).len() == 2
    });
    // Started again in its pod (same address): told, and its flows resume.
    let agent_b = RunningAgent::start_in_pod(&b, pod_b, &kind_agent_pod_spec(), &args_b, &[]);
    follower.notice(30, &[b.name(), "back"]);
    let after = connect_ok(&frontend, IpAddr::V4(backend.ip4()), 1);
    let got = follower.flows_until(
        40,
        "a cross-node connection after node b came back",
        |got| joined_of(got, &after[0]).len() == 2,
    );
    let f = joined_of(&got, &after[0])[0];
    assert_eq!(f["destination"]["identity_source"], "ATTESTED", "{f:#}");

    // The relay's metrics say the same.
    let mut curl = Command::new("curl");
    curl.args(["-sf", "http://127.0.0.1:9967/metrics"]);
    let metrics = relay_pod.output(curl).expect("curl in the relay's pod");
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    let series = |s: &str| metric_sample(&metrics, s);
    assert_eq!(series("flowaudit_relay_peers"), 2.0, "{metrics}");
    assert_eq!(
        series(&format!(
            "flowaudit_relay_peer_state{{node=\"{}\",state=\"back\"}}",
            b.name()
        )),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        series(&format!(
            "flowaudit_relay_peer_connects_total{{node=\"{}\"}}",
            b.name()
        )),
        2.0,
        "{metrics}"
    );
    assert!(
        series(&format!(
            "flowaudit_relay_peer_lost_events_total{{node=\"{}\"}}",
            b.name()
        )) > 0.0,
        "{metrics}"
    );
    assert!(
        series("flowaudit_relay_flows_joined_total{halves=\"both\"}") >= 10.0,
        "{metrics}"
    );
    assert!(
        series("flowaudit_relay_flows_merged_total") >= 20.0,
        "{metrics}"
    );
    // The relay stops (SIGTERM, as a rollout of its Deployment does): the
    // follower is told why and reconnects.
    // SAFETY: kill(2) takes plain integers: it signals a process this test started.
    unsafe { libc::kill(relay.host_pid() as i32, libc::SIGTERM) };
    follower.notice(
        30,
        &[
            "lost the connection",
            "the flowaudit relay is stopping (SIGTERM)",
            "reconnecting",
        ],
    );
    drop(agent_b);
    drop(agent_a);
}
