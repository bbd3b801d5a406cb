//! The precinct-99 scenario end to end on the simulated node: the real agent
//! with the endpoint directory, the scenario's intended policy and SPIRE
//! (the Delegated Identity double behaving like the reference log's 1.9.6,
//! and like 1.10.2, the first release that attests by pid) judges every flow
//! as PRODUCT.md says (frontend -> postgresql flagged, the dropped intended
//! flow flagged INTENDED_FLOW_FAILED), with every pod end on the node
//! ATTESTED; and a change to the endpoint directory is picked up while the
//! agent runs (without SPIRE: identities derived from pod metadata). The
//! agent runs as the DaemonSet runs it and the SPIRE double as a SPIRE
//! agent does, both inside the kind-like node. Needs root; never skips.

use std::path::PathBuf;

use flowaudit_tests::agent::flows_between;
use flowaudit_tests::scenario::{FRONTEND, Precinct99, SCENARIO};
use flowaudit_tests::spire_double::{NodeDouble, VERSION_WITH_PID, VERSION_WITHOUT_PID};
use flowaudit_tests::support::*;
use serde_json::Value;

#[test]
fn scenario_flows_get_the_intended_verdicts() {
    require_root();
    // The reference log's SPIRE first (the default), then the first release
    // that attests by pid.
    for (index, version) in [(30u8, VERSION_WITHOUT_PID), (32u8, VERSION_WITH_PID)] {
        scenario_against(index, version);
    }
}

fn scenario_against(index: u8, version: &str) {
    let sim = Precinct99::start(index).expect("precinct-99 on a simulated node");
    let dir = temp_dir(&format!("scenario-{version}"));
    // SPIRE inside the node, on the node's admin socket; the agent as the
    // DaemonSet runs it, with the DaemonSet's default socket path.
    let mut config = sim.spire_double_config(PathBuf::new(), version);
    config.authorized = Some(true);
    let mut double = NodeDouble::start(&sim.node, config).expect("SPIRE double in the node");
    let agent = sim.agent(&dir, &scenario_policy(), &["--identity-wait-ms", "2000"]);
    let degradations = agent.assert_kernel_degradations();
    let records: Vec<_> = SCENARIO
        .iter()
        .map(|f| (f, sim.run(f).expect("scenario traffic")))
        .collect();
    let report = agent.stop();
    for (flow, rec) in &records {
        let local = rec.local.expect("client address");
        let events: Vec<&Value> = flows_between(&report.flows, local, rec.remote).collect();
        let egress: Vec<&&Value> = events
            .iter()
            .filter(|e| e["direction"] == "EGRESS" && e["event"] == flow.event)
            .collect();
        assert_eq!(
            egress.len(),
            1,
            "{version} {}: expected one {} EGRESS event, got {events:#?}",
            flow.label,
            flow.event
        );
        let e = egress[0];
        assert_eq!(e["verdict"], flow.verdict, "{version} {}: {e}", flow.label);
        if !flow.finding.is_empty() {
            assert!(
                finding_kinds(e).contains(&flow.finding),
                "{version} {}: expected {} in {e}",
                flow.label,
                flow.finding
            );
        }
        if flow.verdict == "COMPLIANT" && flow.finding.is_empty() {
            assert!(
                !e["policy_rule"].as_str().unwrap_or("").is_empty(),
                "{version} {}: no rule named in {e}",
                flow.label
            );
        }
        let dst = &sim.workloads[flow.to].pod;
        assert_eq!(e["destination"]["pod_name"], dst.name(), "{}", flow.label);
        match flow.from {
            Some(i) => {
                let src = &sim.workloads[i].pod;
                assert_eq!(e["source"]["pod_name"], src.name(), "{}: {e}", flow.label);
                assert_eq!(
                    e["source"]["labels"]["app"],
                    src.service_account(),
                    "{}",
                    flow.label
                );
            }
            None => {
                assert_eq!(e["source"]["kind"], "WORLD", "{}: {e}", flow.label);
                assert_eq!(e["source"]["spiffe_id"], "", "{}", flow.label);
            }
        }
        // The server's side of an established flow is judged the same way.
        if flow.event == "CONNECT" {
            let ingress: Vec<&&Value> = events
                .iter()
                .filter(|e| e["direction"] == "INGRESS" && e["event"] == "CONNECT")
                .collect();
            assert_eq!(ingress.len(), 1, "{}: {events:#?}", flow.label);
            assert_eq!(ingress[0]["verdict"], flow.verdict, "{}", flow.label);
        }
    }
    // Identities: every pod end on this node ATTESTED (local ends and the
    // peers of established connections), with its SPIFFE ID.
    let runs: Vec<_> = records.iter().map(|(f, r)| (*f, r.clone())).collect();
    let tally = sim
        .check_attested(&report.flows, &runs, &degradations)
        .unwrap_or_else(|e| panic!("SPIRE {version}: {e}"));
    eprintln!("scenario, SPIRE {version} in the node: {tally}");
    double.stop();
}

/// The client's CONNECT event (EGRESS) of the connection `rec`.
fn connect_egress(flows: &[Value], rec: &flowaudit_tests::simpod::ConnRecord) -> Value {
    flows_between(flows, rec.local.expect("local"), rec.remote)
        .find(|e| e["direction"] == "EGRESS" && e["event"] == "CONNECT")
        .cloned()
        .unwrap_or_else(|| panic!("no CONNECT EGRESS for {rec:?}"))
}

/// Replaces `path` whole (a new file renamed over it, as a ConfigMap's
/// update swaps its files): the agent never reads it half written.
fn replace_file(path: &std::path::Path, content: &str) {
    let new = path.with_extension("new");
    std::fs::write(&new, content).unwrap_or_else(|e| panic!("writing {}: {e}", new.display()));
    std::fs::rename(&new, path).unwrap_or_else(|e| panic!("renaming onto {}: {e}", path.display()));
}

#[test]
fn endpoint_directory_changes_apply_while_running() {
    require_root();
    let sim = Precinct99::start(31).expect("precinct-99 on a simulated node");
    let dir = temp_dir("endpoints-change");
    let mut agent = sim.agent(&dir, &scenario_policy(), &["--spire-admin-socket", "none"]);
    // The file the agent watches (it looks once a second).
    let endpoints = dir.join("endpoints.yaml");
    let frontend_to_backend = &SCENARIO[1];
    assert_eq!(frontend_to_backend.from, Some(FRONTEND));
    let before = sim.run(frontend_to_backend).expect("traffic");
    // A broken version: rejected, the last good directory stays in force.
    replace_file(&endpoints, "endpoints: [[[");
    agent.wait_for_log(30, "the broken endpoint directory rejected", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("endpoint directory rejected"))
    });
    let during = sim.run(frontend_to_backend).expect("traffic");
    // frontend now runs under another service account: a workload no rule knows.
    let changed = sim
        .endpoint_directory()
        .replace("serviceAccount: frontend", "serviceAccount: frontend-v2");
    replace_file(&endpoints, &changed);
    agent.wait_for_log(30, "the changed endpoint directory reloaded", |v| {
        v["message"] == "endpoint directory reloaded"
    });
    let after = sim.run(frontend_to_backend).expect("traffic");
    let report = agent.stop();
    let egress = |rec| connect_egress(&report.flows, rec);
    for rec in [&before, &during] {
        let e = egress(rec);
        assert_eq!(
            e["source"]["spiffe_id"], "spiffe://demo.local/ns/99-apps/sa/frontend",
            "{e}"
        );
        assert_eq!(e["verdict"], frontend_to_backend.verdict, "{e}");
        assert_eq!(finding_kinds(&e), vec![frontend_to_backend.finding], "{e}");
    }
    assert!(
        report.logs.iter().any(|l| l["message"]
            .as_str()
            .unwrap_or("")
            .contains("endpoint directory rejected")),
        "the broken directory was not reported"
    );
    let a = egress(&after);
    assert_eq!(
        a["source"]["spiffe_id"], "spiffe://demo.local/ns/99-apps/sa/frontend-v2",
        "{a}"
    );
    assert_eq!(a["verdict"], "VIOLATION", "{a}");
    assert!(finding_kinds(&a).contains(&"NO_MATCHING_RULE"), "{a}");
}

/// A policy change applies to the running agent: a broken version is
/// rejected and counted, the last good one stays in force; a version with
/// another `spec.trustDomain` renames the DERIVED ends of the next flows
/// (and its rules, renamed with it, still match them). Every load, the
/// first included, is counted in `flowaudit_policy_reloads_total`.
#[test]
fn policy_changes_apply_while_running() {
    require_root();
    let sim = Precinct99::start(32).expect("precinct-99 on a simulated node");
    let dir = temp_dir("policy-change");
    let scenario = std::fs::read_to_string(scenario_policy()).expect("the scenario policy");
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, &scenario).expect("writing the policy");
    let mut agent = sim.agent(&dir, &policy, &["--spire-admin-socket", "none"]);
    let reloads = |agent: &flowaudit_tests::agent::RunningAgent, result: &str| -> f64 {
        let (code, text) = agent.http_get("/metrics");
        assert_eq!(code, 200, "{text}");
        metric_sample(
            &text,
            &format!("flowaudit_policy_reloads_total{{result=\"{result}\"}}"),
        )
    };
    assert_eq!(reloads(&agent, "success"), 1.0, "the first load is counted");
    assert_eq!(reloads(&agent, "failure"), 0.0);

    let frontend_to_backend = &SCENARIO[1];
    assert_eq!(frontend_to_backend.from, Some(FRONTEND));
    let before = sim.run(frontend_to_backend).expect("traffic");
    replace_file(
        &policy,
        "apiVersion: flowaudit.io/v1alpha1\nkind: FlowPolicy\nspec: [[[",
    );
    agent.wait_for_log(30, "the broken policy rejected", |v| {
        v["message"] == "policy rejected"
    });
    assert_eq!(
        reloads(&agent, "failure"),
        1.0,
        "the rejected version is counted"
    );
    let during = sim.run(frontend_to_backend).expect("traffic");
    replace_file(&policy, &scenario.replace("demo.local", "precinct.example"));
    agent.wait_for_log(30, "the renamed policy reloaded", |v| {
        v["message"] == "policy reloaded"
    });
    assert_eq!(reloads(&agent, "success"), 2.0);
    let after = sim.run(frontend_to_backend).expect("traffic");
    let report = agent.stop();
    let egress = |rec| connect_egress(&report.flows, rec);
    for (rec, td) in [
        (&before, "demo.local"),
        (&during, "demo.local"),
        (&after, "precinct.example"),
    ] {
        let e = egress(rec);
        for (end, sa) in [("source", "frontend"), ("destination", "backend")] {
            assert_eq!(e[end]["identity_source"], "DERIVED", "{e}");
            assert_eq!(
                e[end]["spiffe_id"],
                format!("spiffe://{td}/ns/99-apps/sa/{sa}"),
                "{end} in {td}: {e}"
            );
        }
        assert_eq!(e["verdict"], frontend_to_backend.verdict, "{e}");
        let rule = e["policy_rule"].as_str().unwrap_or_default();
        assert!(rule.contains("frontend-to-backend"), "{e}");
    }
}
