//! The real agent, with its real eBPF programs in this kernel, run as the
//! DaemonSet runs it (in a kind-like node's namespaces, with only the
//! DaemonSet's capabilities), watching real connections between pods of that
//! node: every connection gives
//! exactly one CONNECT and one CLOSE per side with the right 4-tuple,
//! direction, owning pod process and byte counts; failed attempts say why;
//! a burst loses nothing. Needs root (CI runs it as root); never skips.

use std::net::{IpAddr, SocketAddr};

use flowaudit_tests::agent::flows_between;
use flowaudit_tests::simpod::{ConnResult, ConnectOpts, ServeOpts};
use flowaudit_tests::support::*;
use flowaudit_tests::{Pod, PodSpec, SimNode};
use serde_json::Value;

fn one<'a>(
    flows: impl Iterator<Item = &'a Value>,
    event: &str,
    direction: &str,
    what: &str,
) -> &'a Value {
    let matching: Vec<&Value> = flows
        .filter(|f| f["event"] == event && f["direction"] == direction)
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "expected exactly one {event} {direction} for {what}, got {}: {matching:#?}",
        matching.len()
    );
    matching[0]
}

/// Asserts the owner fields of the end whose socket the kernel saw. `pid`
/// is the node's number for the process (what `ps` in the node shows);
/// an agent that cannot translate pids (the `pid_namespace` degradation)
/// reports none rather than a wrong one.
fn assert_owner(end: &Value, pid: u32, pod: &Pod, what: &str) {
    let expected = (!pids_lost()).then_some(u64::from(pid));
    assert_eq!(end["pid"].as_u64(), expected, "{what}: owning pid in {end}");
    assert_eq!(
        end["process"].as_str(),
        Some("simpod"),
        "{what}: process name in {end}"
    );
    assert_eq!(
        end["cgroup_id"].as_u64(),
        Some(pod.cgroup_id()),
        "{what}: cgroup of pod {} in {end}",
        pod.name()
    );
}

/// The server end: owned by the server, or (when the kernel could not tell)
/// by no process at all.
fn assert_server_owner(end: &Value, owned: bool, pid: u32, pod: &Pod, what: &str) {
    if owned {
        assert_owner(end, pid, pod, what);
    } else {
        assert_eq!(
            end["pid"],
            Value::Null,
            "{what}: no owner expected in {end}"
        );
    }
}

/// Exact payload bytes of a CLOSE. Without kernel reads (the documented
/// `kernel_reads` degradation) whether the peer's FIN arrived cannot be
/// read, so the recording socket's received count may include it: one byte
/// more (in `bytes_received` for EGRESS, `bytes_sent` for INGRESS, which
/// count from the client's side), never fewer.
fn assert_bytes(close: &Value, (sent, received): (u64, u64), what: &str) {
    let got = (
        close["bytes_sent"].as_u64().unwrap_or(u64::MAX),
        close["bytes_received"].as_u64().unwrap_or(u64::MAX),
    );
    let ok = if kernel_reads() {
        got == (sent, received)
    } else {
        (got.0 == sent || got.0 == sent + 1) && (got.1 == received || got.1 == received + 1)
    };
    assert!(
        ok,
        "{what}: bytes (sent, received) {got:?}, expected ({sent}, {received}): {close}"
    );
}

fn pids_lost() -> bool {
    expected_kernel_degradations_in_node()
        .iter()
        .any(|d| d == "pid_namespace")
}

/// `server_first`: the server listens before the agent starts (its owner
/// comes from the start-up listener iterator), else after (from listen()
/// itself).
fn check_connections(
    node: &SimNode,
    family: &str,
    client: &Pod,
    server: &Pod,
    server_ip: IpAddr,
    listen: IpAddr,
    server_first: bool,
) {
    let serve = || {
        server
            .serve(&ServeOpts {
                listen: vec![SocketAddr::new(listen, 8000)],
                reply_bytes: 300,
            })
            .expect("server")
    };
    let (srv, agent) = if server_first {
        let srv = serve();
        (srv, node_agent(node, &[]))
    } else {
        let agent = node_agent(node, &[]);
        (serve(), agent)
    };
    // A server that predates the agent is found by the start-up listener
    // iterator, which a kernel without kernel reads cannot run (the
    // `listener_scan` degradation): its accepted sockets then have no
    // owner, and must not get a wrong one.
    let scan_lost = agent
        .assert_kernel_degradations()
        .iter()
        .any(|d| d == "listener_scan");
    let server_owned = !(server_first && scan_lost);
    let mut opts = ConnectOpts::new(SocketAddr::new(server_ip, 8000));
    opts.count = 3;
    opts.send_bytes = 1000;
    let report = client.connect(&opts).expect("client");
    let server_pid = srv.process.node_pid();
    // The pid the events carry is the one `ps` inside the node shows.
    let ps = node.ps_output().expect("ps inside the node");
    assert!(
        ps.lines().any(|l| {
            let mut f = l.split_whitespace();
            f.next() == Some(server_pid.to_string().as_str()) && f.next() == Some("simpod")
        }),
        "`ps -eo pid,comm` inside {} does not show the server as pid {server_pid}:\n{ps}",
        node.name()
    );
    assert_ne!(
        server_pid,
        srv.process.host_pid(),
        "a node's pid namespace numbers the server apart from the host's"
    );
    eprintln!(
        "figures: {family}: server pid {server_pid} in node {} (as `ps` there shows it; host pid {}), clients {:?}",
        node.name(),
        srv.process.host_pid(),
        report.records.iter().map(|r| r.pid).collect::<Vec<_>>()
    );
    drop(srv);
    let report_agent = agent.stop();
    assert_eq!(report_agent.counter("kernel_events_lost"), 0);
    let flows = &report_agent.flows;
    assert_eq!(report.records.len(), 3);
    for rec in &report.records {
        assert_eq!(
            rec.result,
            ConnResult::Ok,
            "{family} connection failed: {rec:?}"
        );
        let local = rec.local.expect("client local address");
        let what = format!("{family} {local} -> {}", rec.remote);
        let between: Vec<&Value> = flows_between(flows, local, rec.remote).collect();

        let c = one(between.iter().copied(), "CONNECT", "EGRESS", &what);
        assert_owner(&c["source"], rec.pid, client, &what);
        let c = one(between.iter().copied(), "CLOSE", "EGRESS", &what);
        assert_owner(&c["source"], rec.pid, client, &what);
        assert_bytes(c, (1000, 300), &what);

        let s = one(between.iter().copied(), "CONNECT", "INGRESS", &what);
        assert_server_owner(&s["destination"], server_owned, server_pid, server, &what);
        let s = one(between.iter().copied(), "CLOSE", "INGRESS", &what);
        assert_server_owner(&s["destination"], server_owned, server_pid, server, &what);
        // Both sides agree on the bytes, counted from the client's point of view.
        assert_bytes(s, (1000, 300), &what);
        assert!(
            between
                .iter()
                .all(|f| f["l4"]["protocol"] == "TCP" && f["node_name"] == node.name())
        );
        assert_eq!(
            between.len(),
            4,
            "{what}: unexpected extra events {between:#?}"
        );
        // The socket cookie ties each side's CONNECT to its CLOSE.
        for dir in ["EGRESS", "INGRESS"] {
            let cookies: Vec<&Value> = between
                .iter()
                .filter(|f| f["direction"] == dir)
                .map(|f| &f["socket"]["cookie"])
                .collect();
            assert_eq!(
                cookies[0], cookies[1],
                "{what} {dir}: CONNECT and CLOSE carry different cookies"
            );
        }
    }
}

#[test]
fn ipv4_connections_to_a_server_older_than_the_agent() {
    require_root();
    let (node, client, server) = two_pods(20);
    check_connections(
        &node,
        "IPv4",
        &client,
        &server,
        IpAddr::V4(server.ip4()),
        "0.0.0.0".parse().unwrap(),
        true,
    );
}

#[test]
fn ipv6_connections_to_a_server_started_after_the_agent() {
    require_root();
    let (node, client, server) = two_pods(21);
    check_connections(
        &node,
        "IPv6",
        &client,
        &server,
        IpAddr::V6(server.ip6()),
        "::".parse().unwrap(),
        false,
    );
}

#[test]
fn failed_attempts_say_why() {
    require_root();
    let (node, client, server) = two_pods(22);
    let agent = node_agent(&node, &[]);
    // Without kernel reads the socket error cannot be read: each reason is
    // then the documented UNKNOWN, never a wrong one.
    let reads = !agent
        .assert_kernel_degradations()
        .iter()
        .any(|d| d == "kernel_reads");
    let mut attempts = Vec::new();
    // Nothing listens on 9999: the peer answers the SYN with a reset.
    for ip in [IpAddr::V4(server.ip4()), IpAddr::V6(server.ip6())] {
        let report = client
            .connect(&ConnectOpts::new(SocketAddr::new(ip, 9999)))
            .expect("client");
        attempts.push((report.records[0].clone(), "REFUSED"));
    }
    // A silent peer: no host answers ARP/ND for it, so the kernel reports it unreachable.
    for ip in [IpAddr::V4(node.silent_ip4()), IpAddr::V6(node.silent_ip6())] {
        let mut opts = ConnectOpts::new(SocketAddr::new(ip, 8000));
        opts.timeout_ms = 10_000;
        let report = client.connect(&opts).expect("client");
        attempts.push((report.records[0].clone(), "UNREACHABLE"));
    }
    // The application gives up first (its own 300 ms connect timeout).
    let mut opts = ConnectOpts::new(SocketAddr::new(IpAddr::V4(node.silent_ip4()), 8001));
    opts.timeout_ms = 300;
    let report = client.connect(&opts).expect("client");
    attempts.push((report.records[0].clone(), "ABORTED"));

    let report_agent = agent.stop();
    // The kernel wakes the client as it sets the socket error; a client
    // that reads it (SO_ERROR clears it) in the instant before the state
    // change reaches the programs leaves nothing to read (seen on 6.12,
    // about once in 300 unreachable attempts). The agent then says UNKNOWN
    // with `error` ERROR_TAKEN, never ABORTED: at most one of the four
    // attempts the kernel ended may be that.
    let mut taken = Vec::new();
    for (rec, reason) in &attempts {
        assert_ne!(rec.result, ConnResult::Ok, "{rec:?} should have failed");
        let local = rec
            .local
            .expect("failed attempts still have a local address");
        let what = format!("{local} -> {} ({:?})", rec.remote, rec.result);
        let between: Vec<&Value> = flows_between(&report_agent.flows, local, rec.remote).collect();
        let f = one(between.iter().copied(), "FAILED", "EGRESS", &what);
        let reason = if reads { *reason } else { "UNKNOWN" };
        if reads
            && reason != "ABORTED"
            && f["socket"]["error"] == flowaudit_common::ERROR_TAKEN
            && f["socket"]["failure_reason"] == "UNKNOWN"
        {
            taken.push(what.clone());
        } else {
            assert_eq!(f["socket"]["failure_reason"], reason, "{what}: {f}");
        }
        assert_owner(&f["source"], rec.pid, &client, &what);
        assert!(
            !between
                .iter()
                .any(|f| f["event"] == "CONNECT" || f["event"] == "CLOSE"),
            "{what}: a failed attempt must not look established: {between:#?}"
        );
    }
    assert!(
        taken.len() <= 1,
        "the client took the socket error first more than once: {taken:?}"
    );
}

#[test]
fn burst_of_5000_connections_across_pods_loses_nothing() {
    require_root();
    let node = SimNode::new(23).expect("simulated node");
    let servers: Vec<Pod> = (0..2)
        .map(|i| {
            node.add_pod(PodSpec::new("99-apps", format!("backend-{i}")))
                .expect("server pod")
        })
        .collect();
    let clients: Vec<Pod> = (0..3)
        .map(|i| {
            node.add_pod(PodSpec::new("99-apps", format!("frontend-{i}")))
                .expect("client pod")
        })
        .collect();
    let _srvs: Vec<_> = servers
        .iter()
        .map(|s| {
            s.serve(&ServeOpts {
                listen: vec!["0.0.0.0:8000".parse().unwrap()],
                reply_bytes: 16,
            })
            .expect("server")
        })
        .collect();
    let agent = node_agent(&node, &[]);
    let started = std::time::Instant::now();
    let handles: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let c = c.clone();
            let to = SocketAddr::new(IpAddr::V4(servers[i % 2].ip4()), 8000);
            std::thread::spawn(move || {
                let mut opts = ConnectOpts::new(to);
                opts.count = 1700;
                opts.send_bytes = 32;
                opts.concurrency = 16;
                // Under QEMU on a busy 2-core machine a server's answer can
                // take seconds; the test is about losing nothing, not speed.
                opts.timeout_ms = 15_000;
                c.connect(&opts).expect("client burst")
            })
        })
        .collect();
    let reports: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect();
    let elapsed = started.elapsed();
    let report_agent = agent.stop();
    let total: usize = reports.iter().map(|r| r.records.len()).sum();
    assert!(total >= 5000, "only {total} connections were made");
    eprintln!(
        "burst: {total} connections in {elapsed:?}, {} flow events",
        report_agent.flows.len()
    );

    use std::collections::HashMap;
    let mut by_tuple: HashMap<(String, u64, String), Vec<&Value>> = HashMap::new();
    for f in &report_agent.flows {
        let l4 = &f["l4"];
        let key = (
            l4["source_ip"].as_str().unwrap_or("").to_owned(),
            l4["source_port"].as_u64().unwrap_or(0),
            format!(
                "{}:{}",
                l4["destination_ip"].as_str().unwrap_or(""),
                l4["destination_port"]
            ),
        );
        by_tuple.entry(key).or_default().push(f);
    }
    // A client may reuse a port once its earlier connection is gone (on a
    // slow machine, e.g. under QEMU, it does): a tuple made n times must
    // show each event n times.
    let mut made: HashMap<(String, u64, String), usize> = HashMap::new();
    for rec in reports.iter().flat_map(|r| &r.records) {
        assert_eq!(
            rec.result,
            ConnResult::Ok,
            "burst connection failed: {rec:?}"
        );
        let local = rec.local.expect("local address");
        let key = (
            local.ip().to_string(),
            u64::from(local.port()),
            format!("{}:{}", rec.remote.ip(), rec.remote.port()),
        );
        *made.entry(key).or_default() += 1;
    }
    let mut missing = Vec::new();
    for (key, times) in &made {
        let (ip, port, remote) = key;
        let local = format!("{ip}:{port}");
        let events = by_tuple.get(key).map(Vec::as_slice).unwrap_or(&[]);
        let mut kinds: Vec<String> = events
            .iter()
            .map(|f| {
                format!(
                    "{}/{}",
                    f["event"].as_str().unwrap(),
                    f["direction"].as_str().unwrap()
                )
            })
            .collect();
        kinds.sort();
        let mut expected: Vec<String> = [
            "CLOSE/EGRESS",
            "CLOSE/INGRESS",
            "CONNECT/EGRESS",
            "CONNECT/INGRESS",
        ]
        .iter()
        .flat_map(|k| std::iter::repeat_n(k.to_string(), *times))
        .collect();
        expected.sort();
        if kinds != expected {
            missing.push(format!("{local} -> {remote} (made {times}x): {kinds:?}"));
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {total} connections lack events (first: {:?})",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(
        report_agent.counter("kernel_events_lost"),
        0,
        "the kernel lost records"
    );
    assert_eq!(report_agent.counter("malformed_records"), 0);
}

/// flowaudit's eBPF programs loaded in the kernel now: id -> name (from
/// `bpftool -j prog list`; names are truncated to 15 chars on old kernels).
fn loaded_programs() -> std::collections::BTreeMap<u64, String> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "list"])
        .output()
        .expect("bpftool (Debian package bpftool; `cargo xtask setup` installs it)");
    assert!(
        out.status.success(),
        "bpftool prog list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let progs: Vec<Value> = serde_json::from_slice(&out.stdout).expect("bpftool -j prints JSON");
    progs
        .iter()
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_owned())))
        .filter(|(_, name)| name.starts_with("flowaudit_"))
        .collect()
}

#[test]
fn sigterm_drains_and_detaches() {
    require_root();
    let (node, client, server) = two_pods(24);
    let _srv = server
        .serve(&ServeOpts {
            listen: vec!["0.0.0.0:8000".parse().unwrap()],
            reply_bytes: 10,
        })
        .expect("server");
    // Another agent (another test run) may hold programs of the same
    // names: this agent's are those that appear when it starts.
    let before = loaded_programs();
    let agent = node_agent(&node, &[]);
    let ours: Vec<(u64, String)> = loaded_programs()
        .into_iter()
        .filter(|(id, _)| !before.contains_key(id))
        .collect();
    assert!(
        ours.iter().any(|(_, n)| n.starts_with("flowaudit_sock_")),
        "the sock_ops program is not loaded while the agent runs: {ours:?}"
    );
    let mut opts = ConnectOpts::new(SocketAddr::new(IpAddr::V4(server.ip4()), 8000));
    opts.count = 200;
    opts.concurrency = 8;
    let rep = client.connect(&opts).expect("client");
    // A client socket reaches CLOSE (its CLOSE record) only once the last
    // FIN or ACK of its exchange came, which may be after close() returned;
    // an agent stopped before that rightly never sees it. So wait until
    // every client socket is gone (or in TIME_WAIT, past its CLOSE record).
    let to = format!("dst {}:8000", server.ip4());
    let mut open = String::new();
    for _ in 0..100 {
        let mut ss = std::process::Command::new("ss");
        ss.args(["-tanH", "state", "all", &to]);
        let out = client.output(ss).expect("ss in the client pod");
        open = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with("TIME-WAIT"))
            .collect::<Vec<_>>()
            .join("\n");
        if open.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        open.is_empty(),
        "client sockets still open after 10 s:\n{open}"
    );
    // Then stop at once: the records still in the ring buffer must be
    // drained, not lost.
    let report = agent.stop_with(libc::SIGTERM);
    let closes = report
        .flows
        .iter()
        .filter(|f| f["event"] == "CLOSE" && f["direction"] == "EGRESS")
        .count();
    assert_eq!(
        closes,
        rep.records.len(),
        "every connection's CLOSE must be written before the agent exits"
    );
    assert!(
        report
            .logs
            .iter()
            .any(|l| l["message"].as_str().unwrap_or("").contains("SIGTERM")),
        "the agent did not log the SIGTERM"
    );
    // The kernel frees a program once its last reference is gone, after an
    // RCU grace period and from a work queue: a listing right after the
    // agent's exit may still show it for a moment. Wait for that, bounded.
    let mut left = Vec::new();
    for _ in 0..100 {
        let after = loaded_programs();
        left = ours
            .iter()
            .filter(|(id, _)| after.contains_key(id))
            .cloned()
            .collect();
        if left.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        left.is_empty(),
        "programs still loaded 10 s after the agent exited: {left:?}"
    );
}

#[test]
fn an_idle_reader_is_woken_by_the_kernels_next_record() {
    require_root();
    let (node, client, server) = two_pods(25);
    let _srv = server
        .serve(&ServeOpts {
            listen: vec!["0.0.0.0:8000".parse().unwrap()],
            reply_bytes: 10,
        })
        .expect("server");
    let agent = node_agent(&node, &[]);
    // Nothing happens on the node: after 20 empty reads (100 ms at the
    // default 5 ms) the reader stops its timer and waits for the kernel.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut opts = ConnectOpts::new(SocketAddr::new(IpAddr::V4(server.ip4()), 8000));
    opts.count = 2;
    let rep = client.connect(&opts).expect("client");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let report = agent.stop();
    for rec in &rep.records {
        assert_eq!(rec.result, ConnResult::Ok, "{rec:?}");
        let local = rec.local.expect("client local address");
        let what = format!("{local} -> {}", rec.remote);
        let between: Vec<&Value> = flows_between(&report.flows, local, rec.remote).collect();
        for event in ["CONNECT", "CLOSE"] {
            for dir in ["EGRESS", "INGRESS"] {
                one(between.iter().copied(), event, dir, &what);
            }
        }
    }
    assert!(
        report.counter("ring_reader_sleeps") >= 1,
        "the reader never slept in 2 idle seconds: {}",
        report.stopped
    );
    // The first record after the sleep woke it (the reader's fallback look,
    // every 200 ms, counts no wake-up).
    assert!(
        report.counter("ring_reader_kernel_wakeups") >= 1,
        "no record woke the sleeping reader: {}",
        report.stopped
    );
    assert_eq!(report.counter("kernel_events_lost"), 0);
}

#[test]
fn not_root_is_a_clear_error() {
    require_root();
    // Run the agent as nobody: it must refuse with the fix, not fail obscurely.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(flowaudit_tests::agent::agent_binary())
        .args(["agent", "--spire-admin-socket", "none"])
        .output()
        .expect("setpriv (util-linux)");
    assert!(
        !out.status.success(),
        "the agent must not start without root"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("must run as root") && err.contains("65534"),
        "unclear error: {err}"
    );
}

#[test]
fn absurd_waits_are_a_clear_error() {
    require_root();
    // As nobody, so that an agent that accepted the value could not start
    // capturing: the command line must refuse it first, naming the range.
    for flag in ["--identity-wait-ms", "--encryption-wait-ms"] {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(flowaudit_tests::agent::agent_binary())
            .args([
                "agent",
                "--spire-admin-socket",
                "none",
                flag,
                "18446744073709551615",
            ])
            .output()
            .expect("setpriv (util-linux)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{flag} 18446744073709551615 must be a usage error (exit 2); got {:?}: {err}",
            out.status
        );
        assert!(
            err.contains(flag) && err.contains("from 0 to 60000") && !err.contains("panicked"),
            "unclear error for {flag}: {err}"
        );
    }
}
