//! Identity end to end: the real agent asks a Delegated Identity server (the
//! SPIRE double: real gRPC on a unix socket, real X.509 SVIDs, attestation
//! of pids through their pod cgroup) about the precinct-99 pods of a
//! simulated node. Local ends come out ATTESTED; while SPIRE is down new
//! workloads come out UNKNOWN and, once it is back, ATTESTED again; an agent
//! that is not an authorized delegate says so and names the fix. Needs root.

use std::path::PathBuf;
use std::time::Duration;

use flowaudit_tests::agent::{RunningAgent, flows_between};
use flowaudit_tests::scenario::{BACKEND, FRONTEND, Precinct99, SCENARIO};
use flowaudit_tests::simpod::ConnRecord;
use flowaudit_tests::spire_double::{SpireDouble, SpireDoubleConfig};
use flowaudit_tests::support::*;
use serde_json::Value;

fn double_config(sim: &Precinct99, socket: PathBuf, version: &str) -> SpireDoubleConfig {
    sim.spire_double_config(socket, version)
}

fn start_agent(sim: &Precinct99, dir: &std::path::Path, socket: &std::path::Path) -> RunningAgent {
    let endpoints = dir.join("endpoints.yaml");
    sim.write_endpoint_directory(&endpoints)
        .expect("write endpoints");
    let policy = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/scenario/precinct-99-scenario.yaml");
    RunningAgent::start(&[
        "--endpoints",
        endpoints.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        "--spire-admin-socket",
        socket.to_str().unwrap(),
        "--identity-wait-ms",
        "2000",
    ])
}

fn egress(flows: &[Value], rec: &ConnRecord, event: &str) -> Value {
    flows_between(flows, rec.local.expect("local address"), rec.remote)
        .find(|e| e["direction"] == "EGRESS" && e["event"] == event)
        .cloned()
        .unwrap_or_else(|| panic!("no {event} EGRESS event for {rec:?}"))
}

fn id_of(pod: &flowaudit_tests::Pod) -> String {
    format!(
        "spiffe://demo.local/ns/{}/sa/{}",
        pod.namespace(),
        pod.service_account()
    )
}

#[test]
fn local_ends_are_attested_by_pid_and_by_selectors() {
    require_root();
    for (index, version) in [(50u8, "1.10.2"), (51u8, "1.9.6")] {
        let sim = Precinct99::start(index).expect("precinct-99");
        let dir = temp_dir(&format!("identity-{version}"));
        let socket = dir.join("admin.sock");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let double = rt
            .block_on(SpireDouble::start(double_config(
                &sim,
                socket.clone(),
                version,
            )))
            .expect("SPIRE double");
        double.set_authorized(true);
        let agent = start_agent(&sim, &dir, &socket);
        let records: Vec<_> = SCENARIO
            .iter()
            .map(|f| (f, sim.run(f).expect("traffic")))
            .collect();
        let report = agent.stop();
        for (flow, rec) in &records {
            let e = egress(&report.flows, rec, flow.event);
            let dst = &sim.workloads[flow.to].pod;
            assert_eq!(
                e["destination"]["spiffe_id"],
                id_of(dst),
                "{version} {}: {e}",
                flow.label
            );
            let Some(from) = flow.from else { continue };
            let src = &sim.workloads[from].pod;
            assert_eq!(
                e["source"]["spiffe_id"],
                id_of(src),
                "{version} {}: {e}",
                flow.label
            );
            assert_eq!(
                e["source"]["identity_source"], "ATTESTED",
                "{version} {}: {e}",
                flow.label
            );
            assert_eq!(e["verdict"], flow.verdict, "{version} {}: {e}", flow.label);
        }
        let mode = if version == "1.9.6" {
            "selectors"
        } else {
            "pid"
        };
        assert!(
            report.logs.iter().any(|l| l["mode"] == mode),
            "{version}: the agent should say it attests by {mode}; logs: {:#?}",
            report.logs
        );
        let local_ends = local_pod_ends(&report.flows);
        let attested = local_ends
            .iter()
            .filter(|e| e["identity_source"] == "ATTESTED")
            .count();
        eprintln!(
            "{version}: {attested} of {} local pod ends ATTESTED; flows that waited for SPIRE: {}, mean {} us, max {} us, timeouts {}; double {:?}",
            local_ends.len(),
            report.counter("identity_waits"),
            report.counter("identity_wait_us_mean"),
            report.counter("identity_wait_us_max"),
            report.counter("identity_timeouts"),
            double.stats()
        );
        assert_eq!(
            report.counter("identity_timeouts"),
            0,
            "{version}: SPIRE answered late"
        );
        rt.block_on(double.stop());
        std::fs::remove_dir_all(dir).ok();
    }
}

#[test]
fn spire_outage_gives_unknown_then_attested_again() {
    require_root();
    let sim = Precinct99::start(52).expect("precinct-99");
    let dir = temp_dir("identity-outage");
    let socket = dir.join("admin.sock");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let double = rt
        .block_on(SpireDouble::start(double_config(
            &sim,
            socket.clone(),
            "1.10.2",
        )))
        .expect("SPIRE double");
    double.set_authorized(true);
    let agent = start_agent(&sim, &dir, &socket);
    let flow = &SCENARIO[1]; // frontend -> backend: a new client process every time
    assert_eq!((flow.from, flow.to), (Some(FRONTEND), BACKEND));
    let before = sim.run(flow).expect("traffic");
    // Let SPIRE answer for it before it goes down.
    std::thread::sleep(Duration::from_millis(1000));
    rt.block_on(double.stop());
    std::thread::sleep(Duration::from_millis(1500));
    let during = sim.run(flow).expect("traffic");
    rt.block_on(double.restart()).expect("restart the double");
    let restarted = std::time::Instant::now();
    double.set_authorized(true);
    // Reconnection backs off (at most 5 s): flows become ATTESTED again
    // within a bounded time; try a new client every second for 20 s.
    let mut after = None;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_secs(1));
        let rec = sim.run(flow).expect("traffic");
        std::thread::sleep(Duration::from_millis(300));
        let text = std::fs::read_to_string(&agent.export_file).unwrap_or_default();
        let flows: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let attested = flows_between(&flows, rec.local.expect("local"), rec.remote)
            .any(|e| e["direction"] == "EGRESS" && e["source"]["identity_source"] == "ATTESTED");
        after = Some(rec);
        if attested {
            break;
        }
    }
    let after = after.expect("ran after the restart");
    eprintln!(
        "outage: ATTESTED again {:?} after the SPIRE stand-in restarted",
        restarted.elapsed()
    );
    let report = agent.stop();
    let src = |rec| egress(&report.flows, rec, "CONNECT")["source"].clone();
    assert_eq!(
        src(&before)["identity_source"],
        "ATTESTED",
        "{}\nlogs: {:#?}",
        src(&before),
        report.logs
    );
    assert_eq!(
        src(&during)["identity_source"],
        "UNKNOWN",
        "during the outage: {}",
        src(&during)
    );
    assert_eq!(src(&during)["spiffe_id"], "", "{}", src(&during));
    assert_eq!(
        src(&after)["identity_source"],
        "ATTESTED",
        "after SPIRE is back: {}\nlogs: {:#?}",
        src(&after),
        report.logs
    );
    assert!(
        report
            .logs
            .iter()
            .any(|l| l["message"].as_str().unwrap_or("").contains("unavailable")),
        "the outage was not logged"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn unauthorized_delegate_is_told_the_fix() {
    require_root();
    let sim = Precinct99::start(53).expect("precinct-99");
    let dir = temp_dir("identity-denied");
    let socket = dir.join("admin.sock");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let double = rt
        .block_on(SpireDouble::start(double_config(
            &sim,
            socket.clone(),
            "1.10.2",
        )))
        .expect("SPIRE double");
    double.set_authorized(false);
    let agent = start_agent(&sim, &dir, &socket);
    let rec = sim.run(&SCENARIO[1]).expect("traffic");
    std::thread::sleep(Duration::from_millis(1500));
    let report = agent.stop();
    let e = egress(&report.flows, &rec, "CONNECT");
    assert_eq!(e["source"]["identity_source"], "UNKNOWN", "{e}");
    let told = report
        .logs
        .iter()
        .filter_map(|l| l["error"].as_str())
        .any(|err| err.contains("authorized_delegates"));
    assert!(
        told,
        "the agent must name the authorized_delegates fix; logs: {:#?}",
        report.logs
    );
    rt.block_on(double.stop());
    std::fs::remove_dir_all(dir).ok();
}
