//! The endpoint directory from the Kubernetes API, end to end: the real
//! agent with `--kubernetes` and `KUBECONFIG` pointing at the Kubernetes API
//! stand-in (pods and nodes served over HTTP, list + watch), precinct-99 on
//! a simulated node. Every scenario flow carries the pod metadata the API
//! serves, with DERIVED identities; then a relabelled pod and a replaced pod
//! (new name and service account on the same address) show in later flows.
//! Needs root; never skips.

use std::time::{Duration, Instant};

use flowaudit_tests::agent::{RunningAgent, flows_between};
use flowaudit_tests::kube_standin::{KubeStandin, StandinPod};
use flowaudit_tests::scenario::{BACKEND, FRONTEND, Precinct99, SCENARIO};
use flowaudit_tests::simpod::ConnRecord;
use flowaudit_tests::support::*;
use serde_json::Value;

/// Waits until the agent has listed pods and nodes and is watching both:
/// its watch requests come after the lists complete.
fn wait_until_watching(k: &KubeStandin) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reqs = k.requests();
        let watching = |coll: &str| {
            reqs.iter()
                .any(|r| r.starts_with(&format!("GET /api/v1/{coll}?")) && r.contains("watch=true"))
        };
        if watching("pods") && watching("nodes") {
            // The directory goes out within the coalescing interval.
            std::thread::sleep(Duration::from_millis(500));
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not list and watch pods and nodes within 20 s; requests: {reqs:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn egress<'a>(flows: &'a [Value], rec: &ConnRecord, event: &str) -> &'a Value {
    let local = rec.local.expect("client address");
    flows_between(flows, local, rec.remote)
        .find(|e| e["direction"] == "EGRESS" && e["event"] == event)
        .unwrap_or_else(|| panic!("no {event} EGRESS event for {rec:?}"))
}

#[test]
fn pod_metadata_comes_from_the_kubernetes_api_and_follows_changes() {
    require_root();
    let sim = Precinct99::start(40).expect("precinct-99 on a simulated node");
    let kube = KubeStandin::start();
    kube.serve_precinct99(&sim);
    let dir = temp_dir("kubernetes");
    let kubeconfig = dir.join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig)
        .expect("write kubeconfig");
    let agent = RunningAgent::start_with_env(
        &[
            "--kubernetes",
            "--policy",
            flowaudit_tests::support::scenario_policy()
                .to_str()
                .unwrap(),
            "--spire-admin-socket",
            "none",
        ],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    wait_until_watching(&kube);

    let records: Vec<_> = SCENARIO
        .iter()
        .map(|f| (f, sim.run(f).expect("scenario traffic")))
        .collect();

    // Changes in the cluster: frontend relabelled; backend replaced by a new
    // pod (new name, UID and service account) on the same addresses.
    let frontend = &sim.workloads[FRONTEND].pod;
    let backend = &sim.workloads[BACKEND].pod;
    assert!(kube.update_pod_labels(frontend.uid(), &[("app", "frontend"), ("track", "canary")]));
    assert!(kube.delete_pod(backend.uid()));
    kube.add_pod(
        StandinPod::new(
            backend.namespace(),
            "backend-6f2a",
            "0b7e6c2d-1f3a-4e5b-8c9d-0a1b2c3d4e5f",
        )
        .service_account("backend-v2")
        .label("app", "backend")
        .ips(&[backend.ip4().into(), backend.ip6().into()]),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let frontend_to_backend = &SCENARIO[1];
    assert_eq!(
        (frontend_to_backend.from, frontend_to_backend.to),
        (Some(FRONTEND), BACKEND)
    );
    let after = sim
        .run(frontend_to_backend)
        .expect("traffic after the changes");
    let report = agent.stop();

    assert!(
        report.logs.iter().any(|l| l["message"]
            .as_str()
            .unwrap_or("")
            .contains("endpoint directory listed from the Kubernetes API")),
        "the agent never said it listed the directory from the Kubernetes API; its log:\n{:#?}",
        report.logs
    );

    for (flow, rec) in &records {
        let e = egress(&report.flows, rec, flow.event);
        assert_eq!(e["verdict"], flow.verdict, "{}: {e}", flow.label);
        if !flow.finding.is_empty() {
            assert!(
                finding_kinds(e).contains(&flow.finding),
                "{}: expected {} in {e}",
                flow.label,
                flow.finding
            );
        }
        let dst = &sim.workloads[flow.to].pod;
        assert_eq!(
            e["destination"]["spiffe_id"],
            format!(
                "spiffe://demo.local/ns/{}/sa/{}",
                dst.namespace(),
                dst.service_account()
            ),
            "{}: {e}",
            flow.label
        );
        assert_eq!(
            e["destination"]["identity_source"], "DERIVED",
            "{}: {e}",
            flow.label
        );
        assert_eq!(
            e["destination"]["pod_name"],
            dst.name(),
            "{}: {e}",
            flow.label
        );
        assert_eq!(
            e["destination"]["labels"]["app"],
            dst.service_account(),
            "{}: {e}",
            flow.label
        );
        match flow.from {
            Some(i) => {
                let src = &sim.workloads[i].pod;
                assert_eq!(e["source"]["pod_name"], src.name(), "{}: {e}", flow.label);
                assert_eq!(
                    e["source"]["identity_source"], "DERIVED",
                    "{}: {e}",
                    flow.label
                );
                assert_eq!(
                    e["source"]["spiffe_id"],
                    format!(
                        "spiffe://demo.local/ns/{}/sa/{}",
                        src.namespace(),
                        src.service_account()
                    ),
                    "{}: {e}",
                    flow.label
                );
                assert_eq!(
                    e["source"]["labels"]["app"],
                    src.service_account(),
                    "{}: {e}",
                    flow.label
                );
                assert!(
                    e["source"]["labels"]
                        .get("track")
                        .is_none_or(Value::is_null),
                    "{}: not relabelled yet: {e}",
                    flow.label
                );
            }
            None => {
                assert_eq!(e["source"]["kind"], "WORLD", "{}: {e}", flow.label);
                assert_eq!(e["source"]["spiffe_id"], "", "{}: {e}", flow.label);
            }
        }
    }

    // After the changes: frontend's new label, the new backend pod and its
    // service account, which no rule names.
    let a = egress(&report.flows, &after, "CONNECT");
    assert_eq!(a["source"]["pod_name"], frontend.name(), "{a}");
    assert_eq!(a["source"]["labels"]["track"], "canary", "{a}");
    assert_eq!(a["source"]["labels"]["app"], "frontend", "{a}");
    assert_eq!(a["destination"]["pod_name"], "backend-6f2a", "{a}");
    assert_eq!(
        a["destination"]["spiffe_id"], "spiffe://demo.local/ns/99-apps/sa/backend-v2",
        "{a}"
    );
    assert_eq!(a["destination"]["identity_source"], "DERIVED", "{a}");
    assert_eq!(a["verdict"], "VIOLATION", "{a}");
    assert!(finding_kinds(a).contains(&"NO_MATCHING_RULE"), "{a}");
}
