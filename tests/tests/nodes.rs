//! Two kind-like nodes on one kernel, each with its own agent (run as the
//! DaemonSet runs it) and its own SPIRE agent (the double, inside the node):
//! each agent reports exactly the sockets of its own node, and a connection
//! between the nodes appears on both, EGRESS on the client's node and
//! INGRESS on the server's, with the local end ATTESTED by that node's SPIRE
//! and the remote end DERIVED from the directory. Needs root; never skips.

use std::collections::BTreeMap;
use std::net::IpAddr;

use flowaudit_tests::agent::flows_between;
use flowaudit_tests::scenario::endpoint_entry;
use flowaudit_tests::simpod::{ConnRecord, ServeOpts};
use flowaudit_tests::support::*;
use flowaudit_tests::{Pod, PodSpec, SimNode};
use serde_json::Value;

const TD: &str = "demo.local";

fn spiffe_id(p: &Pod) -> String {
    format!(
        "spiffe://{TD}/ns/{}/sa/{}",
        p.namespace(),
        p.service_account()
    )
}

fn pod(node: &SimNode, name: &str, sa: &str) -> Pod {
    node.add_pod(
        PodSpec::new("99-apps", name)
            .service_account(sa)
            .label("app", sa),
    )
    .unwrap_or_else(|e| panic!("pod {name} on {}: {e}", node.name()))
}

fn serve(p: &Pod) -> flowaudit_tests::simpod::Server {
    p.serve(&ServeOpts {
        listen: vec![
            "0.0.0.0:8000".parse().unwrap(),
            "[::]:8000".parse().unwrap(),
        ],
        reply_bytes: 100,
    })
    .unwrap_or_else(|e| panic!("server in {}: {e}", p.name()))
}

/// Kind of each of a connection's events on one node, sorted:
/// `CONNECT/EGRESS`, ...
fn kinds(flows: &[Value], rec: &ConnRecord) -> Vec<String> {
    let mut k: Vec<String> = flows_between(flows, rec.local.expect("local"), rec.remote)
        .map(|f| {
            format!(
                "{}/{}",
                f["event"].as_str().unwrap_or(""),
                f["direction"].as_str().unwrap_or("")
            )
        })
        .collect();
    k.sort();
    k
}

fn end_is(end: &Value, p: &Pod, source: &str, what: &str) {
    assert_eq!(end["spiffe_id"], spiffe_id(p), "{what}: SPIFFE ID of {end}");
    assert_eq!(
        end["identity_source"], source,
        "{what}: identity source of {end}"
    );
    assert_eq!(end["pod_name"], p.name(), "{what}: pod of {end}");
}

#[test]
fn two_nodes_each_see_their_own_sockets_and_both_halves_of_cross_node_connections() {
    require_root();
    let a = SimNode::named(70, "precinct-99-worker").expect("node a");
    let b = SimNode::named(71, "precinct-99-worker2").expect("node b");
    a.link(&b).expect("route between the nodes");
    let (frontend, backend) = (
        pod(&a, "frontend-7d9f", "frontend"),
        pod(&a, "backend-5c8b", "backend"),
    );
    let (openbao, postgresql) = (
        pod(&b, "openbao-0", "openbao"),
        pod(&b, "postgresql-0", "postgresql"),
    );

    let dir = temp_dir("two-nodes");
    let endpoints = dir.join("endpoints.yaml");
    let mut text = format!(
        "nodes:\n  - name: {}\n    ips: [{}]\n  - name: {}\n    ips: [{}]\nendpoints:\n",
        a.name(),
        a.ip4(),
        b.name(),
        b.ip4()
    );
    for (n, p) in [
        (&a, &frontend),
        (&a, &backend),
        (&b, &openbao),
        (&b, &postgresql),
    ] {
        text.push_str(&endpoint_entry(p, n.name()));
    }
    std::fs::write(&endpoints, text).expect("write endpoints");

    let _spire_a = node_spire(&a, &[&frontend, &backend]);
    let _spire_b = node_spire(&b, &[&openbao, &postgresql]);
    let args = [
        "--endpoints",
        endpoints.to_str().unwrap(),
        "--trust-domain",
        TD,
        "--identity-wait-ms",
        "2000",
    ];
    let agent_a = node_agent(&a, &args);
    let agent_b = node_agent(&b, &args);
    // Servers start after the agents: their owners come from listen()
    // itself on every kernel (recovering older listeners is the capture
    // test's subject).
    let _servers = [serve(&backend), serve(&postgresql)];

    let same_a = connect_ok(&frontend, IpAddr::V4(backend.ip4()), 3);
    let same_b = connect_ok(&openbao, IpAddr::V6(postgresql.ip6()), 3);
    let a_to_b = connect_ok(&frontend, IpAddr::V4(postgresql.ip4()), 3);
    let a_to_b6 = connect_ok(&frontend, IpAddr::V6(postgresql.ip6()), 2);
    let b_to_a = connect_ok(&openbao, IpAddr::V4(backend.ip4()), 3);
    // Each side's CLOSE may trail the other's under emulation: wait for
    // every socket's CLOSE on both nodes before stopping the agents.
    let cross = a_to_b.len() + a_to_b6.len() + b_to_a.len();
    for (agent, same) in [(&agent_a, same_a.len()), (&agent_b, same_b.len())] {
        agent.wait_for_flows(same * 2 + cross, std::time::Duration::from_secs(20), |f| {
            f["event"] == "CLOSE"
        });
    }
    let report_a = agent_a.stop();
    let report_b = agent_b.stop();
    let (fa, fb) = (&report_a.flows, &report_b.flows);

    let both = [
        "CLOSE/EGRESS",
        "CLOSE/INGRESS",
        "CONNECT/EGRESS",
        "CONNECT/INGRESS",
    ];
    let client_half = ["CLOSE/EGRESS", "CONNECT/EGRESS"];
    let server_half = ["CLOSE/INGRESS", "CONNECT/INGRESS"];
    let mut problems = Vec::new();
    let mut expect =
        |flows: &[Value], node: &str, recs: &[ConnRecord], want: &[&str], label: &str| {
            for r in recs {
                let got = kinds(flows, r);
                if got != want {
                    problems.push(format!(
                        "{label} on {node}: {r:?} gave {got:?}, expected {want:?}"
                    ));
                }
            }
        };
    expect(fa, a.name(), &same_a, &both, "same-node a");
    expect(fb, b.name(), &same_a, &[], "same-node a");
    expect(fb, b.name(), &same_b, &both, "same-node b");
    expect(fa, a.name(), &same_b, &[], "same-node b");
    for recs in [&a_to_b, &a_to_b6] {
        expect(fa, a.name(), recs, &client_half, "a -> b");
        expect(fb, b.name(), recs, &server_half, "a -> b");
    }
    expect(fa, a.name(), &b_to_a, &server_half, "b -> a");
    expect(fb, b.name(), &b_to_a, &client_half, "b -> a");
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Exactly these connections' events, nothing of the other node.
    let expected_a = same_a.len() * 4 + (a_to_b.len() + a_to_b6.len() + b_to_a.len()) * 2;
    let expected_b = same_b.len() * 4 + (a_to_b.len() + a_to_b6.len() + b_to_a.len()) * 2;
    assert_eq!(fa.len(), expected_a, "node a's events: {fa:#?}");
    assert_eq!(fb.len(), expected_b, "node b's events: {fb:#?}");
    for (flows, node) in [(fa, &a), (fb, &b)] {
        for f in flows.iter() {
            assert_eq!(f["node_name"], node.name(), "{f}");
        }
    }

    // Identities: the local end ATTESTED by its node's SPIRE, the remote
    // end DERIVED from the directory.
    for rec in a_to_b.iter().chain(&a_to_b6) {
        let what = format!("frontend -> postgresql {rec:?}");
        let local = rec.local.expect("local");
        let on_a: Vec<&Value> = flows_between(fa, local, rec.remote).collect();
        let on_b: Vec<&Value> = flows_between(fb, local, rec.remote).collect();
        for e in &on_a {
            end_is(&e["source"], &frontend, "ATTESTED", &what);
            end_is(&e["destination"], &postgresql, "DERIVED", &what);
        }
        for e in &on_b {
            end_is(&e["source"], &frontend, "DERIVED", &what);
            end_is(&e["destination"], &postgresql, "ATTESTED", &what);
        }
        // The two halves are one connection: the same 4-tuple, and the
        // bytes each side counted agree with what the client sent and got.
        // Without kernel reads (the `kernel_reads` degradation) a socket's
        // received count may include the peer's FIN: one byte high.
        let close = |v: &[&Value]| {
            v.iter()
                .find(|e| e["event"] == "CLOSE")
                .map(|e| {
                    (
                        e["bytes_sent"].as_u64().unwrap_or(u64::MAX),
                        e["bytes_received"].as_u64().unwrap_or(u64::MAX),
                    )
                })
                .unwrap_or_else(|| panic!("{what}: no CLOSE in {v:#?}"))
        };
        let slack = u64::from(!kernel_reads());
        for (node, (sent, received)) in [("a", close(&on_a)), ("b", close(&on_b))] {
            assert!(
                (rec.sent..=rec.sent + slack).contains(&sent)
                    && (rec.received..=rec.received + slack).contains(&received),
                "{what}: node {node} counted ({sent}, {received}), the client ({}, {})",
                rec.sent,
                rec.received
            );
        }
    }
    for rec in &b_to_a {
        let what = format!("openbao -> backend {rec:?}");
        let local = rec.local.expect("local");
        for e in flows_between(fb, local, rec.remote) {
            end_is(&e["source"], &openbao, "ATTESTED", &what);
            end_is(&e["destination"], &backend, "DERIVED", &what);
        }
        for e in flows_between(fa, local, rec.remote) {
            end_is(&e["source"], &openbao, "DERIVED", &what);
            end_is(&e["destination"], &backend, "ATTESTED", &what);
        }
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    counts.insert("node a events", fa.len());
    counts.insert("node b events", fb.len());
    counts.insert(
        "cross-node connections (both halves seen)",
        a_to_b.len() + a_to_b6.len() + b_to_a.len(),
    );
    eprintln!("figures: two nodes: {counts:?}");
}
