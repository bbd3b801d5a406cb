//! Root-only tests of the simulated node and simpod: traffic across the
//! bridge (IPv4 and IPv6), refused and silent peers, pod processes really in
//! their pod's cgroup and netns, and teardown (on drop, on panic, of stale
//! leftovers). Without root every test fails with the "run as root" message:
//! a skipped test would hide that nothing was checked. Each test uses its own
//! node index, so they may also run in parallel.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use flowaudit_tests::simpod::{ConnResult, ConnectOpts, ServeOpts};
use flowaudit_tests::{Pod, PodSpec, SimNode, cleanup_stale};

fn node(index: u8) -> SimNode {
    SimNode::new(index).unwrap_or_else(|e| panic!("creating simulated node {index} failed: {e}"))
}

fn pod(node: &SimNode, name: &str) -> Pod {
    node.add_pod(
        PodSpec::new("precinct-99", name)
            .service_account(name)
            .label("app", name),
    )
    .unwrap_or_else(|e| panic!("adding pod {name} to node {} failed: {e}", node.index()))
}

fn netns_exists(name: &str) -> bool {
    PathBuf::from("/run/netns").join(name).exists()
}

/// True while the pid exists and is not a zombie.
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // State is the field after the parenthesised comm.
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, r)| !r.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

#[test]
fn pod_to_pod_ipv4_and_ipv6_across_the_bridge() {
    let node = node(10);
    let client = pod(&node, "frontend");
    let server = pod(&node, "backend");
    let srv = server
        .serve(&ServeOpts {
            listen: vec![
                SocketAddr::new(server.ip4().into(), 8080),
                SocketAddr::new(server.ip6().into(), 8080),
            ],
            reply_bytes: 300,
        })
        .unwrap_or_else(|e| panic!("simpod serve in backend failed: {e}"));
    assert_eq!(
        srv.ready.listen.len(),
        2,
        "server should report both listeners: {:?}",
        srv.ready
    );

    for to in [
        SocketAddr::new(server.ip4().into(), 8080),
        SocketAddr::new(server.ip6().into(), 8080),
    ] {
        let rep = client
            .connect(&ConnectOpts {
                count: 3,
                send_bytes: 1000,
                ..ConnectOpts::new(to)
            })
            .unwrap_or_else(|e| panic!("simpod connect to {to} failed: {e}"));
        assert_eq!(
            rep.summary.ok, 3,
            "expected 3 ok connections to {to}, got {:?}",
            rep.records
        );
        for r in &rep.records {
            assert_eq!(
                (r.result, r.sent, r.received),
                (ConnResult::Ok, 1000, 300),
                "record {r:?}"
            );
            let local = r
                .local
                .unwrap_or_else(|| panic!("no local address in {r:?}"));
            let want_ip = if to.is_ipv4() {
                client.ip4().into()
            } else {
                std::net::IpAddr::from(client.ip6())
            };
            assert_eq!(
                local.ip(),
                want_ip,
                "client source address should be the pod's own: {r:?}"
            );
            assert_eq!(r.remote, to);
            assert_eq!(
                r.pid, rep.summary.pid,
                "records carry the connecting simpod's pid"
            );
        }
    }
}

#[test]
fn refused_port_reports_refused_with_local_address() {
    let node = node(11);
    let client = pod(&node, "frontend");
    let server = pod(&node, "backend");
    for to in [
        SocketAddr::new(server.ip4().into(), 9),
        SocketAddr::new(server.ip6().into(), 9),
    ] {
        let rep = client
            .connect(&ConnectOpts::new(to))
            .unwrap_or_else(|e| panic!("simpod connect to {to}: {e}"));
        let r = &rep.records[0];
        assert_eq!(
            r.result,
            ConnResult::Refused,
            "closed port {to} should refuse: {r:?}"
        );
        assert!(
            r.local.is_some(),
            "a refused attempt still has a local port: {r:?}"
        );
    }
}

#[test]
fn silent_peer_times_out_or_is_unreachable_within_the_timeout() {
    let node = node(12);
    let client = pod(&node, "frontend");
    for to in [
        SocketAddr::new(node.silent_ip4().into(), 80),
        SocketAddr::new(node.silent_ip6().into(), 80),
    ] {
        let t0 = Instant::now();
        let rep = client
            .connect(&ConnectOpts {
                timeout_ms: 1000,
                ..ConnectOpts::new(to)
            })
            .unwrap_or_else(|e| panic!("simpod connect to {to}: {e}"));
        let took = t0.elapsed();
        let r = &rep.records[0];
        assert!(
            matches!(r.result, ConnResult::Timeout | ConnResult::Unreachable),
            "silent peer {to} should give timeout or unreachable, got {r:?}"
        );
        assert!(
            r.local.is_some(),
            "a timed-out attempt still has a local port: {r:?}"
        );
        assert!(
            took < Duration::from_secs(3),
            "connect to {to} took {took:?}, timeout was 1 s"
        );
    }
}

#[test]
fn spawned_process_is_in_the_pods_cgroup_and_netns() {
    let node = node(13);
    let p = pod(&node, "postgresql");
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    let proc_ = p
        .spawn_guarded(cmd)
        .unwrap_or_else(|e| panic!("spawn sleep in pod: {e}"));
    let pid = proc_.pid();

    let cg =
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read /proc/<pid>/cgroup");
    let v2 = cg
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no v2 line in {cg:?}"));
    let want = p.cgroup_relative(node.cgroup2_mount());
    assert_eq!(
        PathBuf::from(v2),
        want,
        "process {pid} should be in the pod's container cgroup"
    );
    let s = want.to_string_lossy();
    let tail = format!("/kubepods/besteffort/pod{}/{}", p.uid(), p.container_id());
    assert!(
        s.ends_with(&tail),
        "cgroup {s} should end with the kubelet layout {tail}"
    );
    assert_eq!(p.container_id().len(), 64);
    assert!(p.container_id().chars().all(|c| c.is_ascii_hexdigit()));
    let ino = std::fs::metadata(p.cgroup_path())
        .expect("stat pod cgroup")
        .ino();
    assert_eq!(p.cgroup_id(), ino, "cgroup id is the directory inode");

    let ns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .expect("stat /proc/<pid>/ns/net")
        .ino();
    assert_eq!(
        ns,
        p.netns_inode(),
        "process {pid} should be in the pod's netns"
    );
    let own = std::fs::metadata("/proc/self/ns/net")
        .expect("stat own netns")
        .ino();
    assert_ne!(ns, own, "the pod netns must not be the test's own");
}

/// Builds a node with a pod running `sleep`, returns what must vanish.
fn populated(index: u8) -> (SimNode, Vec<String>, Vec<PathBuf>, std::process::Child) {
    let node = node(index);
    let p = pod(&node, "victim");
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    let child = p.spawn(cmd).unwrap_or_else(|e| panic!("spawn sleep: {e}"));
    let netns = vec![node.netns().to_string(), p.netns().to_string()];
    let cgroups = vec![
        node.cgroup_root().to_path_buf(),
        p.cgroup_path().to_path_buf(),
    ];
    for n in &netns {
        assert!(
            netns_exists(n),
            "netns {n} should exist while the node lives"
        );
    }
    for c in &cgroups {
        assert!(
            c.exists(),
            "cgroup {} should exist while the node lives",
            c.display()
        );
    }
    (node, netns, cgroups, child)
}

fn assert_gone(netns: &[String], cgroups: &[PathBuf], child: &mut std::process::Child) {
    for n in netns {
        assert!(!netns_exists(n), "netns {n} should be gone after cleanup");
    }
    for c in cgroups {
        assert!(
            !c.exists(),
            "cgroup {} should be gone after cleanup",
            c.display()
        );
    }
    let st = child.try_wait().expect("try_wait on the pod's process");
    assert!(
        st.is_some() && !running(child.id()),
        "pod process {} should have been killed",
        child.id()
    );
}

#[test]
fn drop_removes_netns_cgroups_and_processes() {
    let (node, netns, cgroups, mut child) = populated(14);
    drop(node);
    assert_gone(&netns, &cgroups, &mut child);
}

#[test]
fn panic_inside_a_test_still_cleans_up() {
    let leftovers = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (_node, netns, cgroups, child) = populated(15);
        *leftovers.lock().unwrap() = Some((netns, cgroups, child));
        panic!("deliberate panic while the node is alive");
    }));
    assert!(r.is_err(), "the closure should have panicked");
    let (netns, cgroups, mut child) = leftovers
        .into_inner()
        .unwrap()
        .expect("closure recorded its resources");
    assert_gone(&netns, &cgroups, &mut child);
}

#[test]
fn cleanup_stale_removes_a_dead_runs_leftovers() {
    // Make sure we have root and cgroup2 before faking leftovers by hand.
    drop(node(16));
    let cg2 = flowaudit_tests::simnode::cgroup2_mount().expect("cgroup2 mount");
    // pid 99999999 is above pid_max: its owner is certainly dead.
    let name = "fasim-99999999-n16";
    let leaf = cg2.join(name).join("kubepods/besteffort/podx/c");
    std::fs::create_dir_all(&leaf).expect("create fake stale cgroup");
    let st = Command::new("ip")
        .args(["netns", "add", name])
        .status()
        .expect("run ip netns add");
    assert!(st.success(), "ip netns add {name} failed");
    // A process left running in the stale cgroup, as a killed test run leaves simpod.
    let procs = leaf.join("cgroup.procs");
    let mut sleeper = Command::new("sh")
        .args([
            "-c",
            &format!("echo $$ > {} && exec sleep 60", procs.display()),
        ])
        .spawn()
        .expect("spawn stale sleeper");
    let t0 = Instant::now();
    while std::fs::read_to_string(&procs)
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "sleeper never joined {}",
            procs.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let removed = cleanup_stale().unwrap_or_else(|e| panic!("cleanup_stale failed: {e}"));
    assert!(
        removed.iter().any(|r| r.contains(name)),
        "cleanup_stale should report {name}: {removed:?}"
    );
    assert!(!netns_exists(name), "stale netns {name} should be gone");
    assert!(
        !cg2.join(name).exists(),
        "stale cgroup {name} should be gone"
    );
    let st = sleeper.wait().expect("wait for stale sleeper");
    assert!(
        !st.success(),
        "the stale sleeper should have been killed, exited {st}"
    );
}

#[test]
fn nodes_have_disjoint_subnets_and_indexes_are_exclusive() {
    let a = node(17);
    let b = node(18);
    assert_ne!(a.subnet4(), b.subnet4());
    assert_ne!(a.subnet6(), b.subnet6());
    match SimNode::new(17) {
        Err(flowaudit_tests::SimError::IndexInUse { index: 17, .. }) => {}
        other => panic!("a second node 17 should be refused with IndexInUse, got {other:?}"),
    }
}

#[test]
fn burst_of_5000_connections_across_pods() {
    let node = node(19);
    let server = pod(&node, "backend");
    let clients: Vec<Pod> = (0..3).map(|i| pod(&node, &format!("client-{i}"))).collect();
    let to = SocketAddr::new(server.ip4().into(), 8080);
    let _srv = server
        .serve(&ServeOpts {
            listen: vec![to],
            reply_bytes: 64,
        })
        .unwrap_or_else(|e| panic!("simpod serve: {e}"));
    let t0 = Instant::now();
    let handles: Vec<_> = clients
        .iter()
        .cloned()
        .map(|c| {
            std::thread::spawn(move || {
                c.connect(&ConnectOpts {
                    count: 1700,
                    send_bytes: 32,
                    concurrency: 16,
                    ..ConnectOpts::new(to)
                })
                .unwrap_or_else(|e| panic!("simpod connect from {}: {e}", c.name()))
            })
        })
        .collect();
    let mut tuples = HashSet::new();
    let mut total = 0;
    for h in handles {
        let rep = h.join().expect("client thread");
        assert_eq!(
            rep.summary.ok, 1700,
            "every connection should succeed: {:?}",
            rep.summary
        );
        for r in rep.records {
            total += 1;
            assert!(
                tuples.insert((r.local, r.remote)),
                "4-tuple reused within the burst: {r:?}"
            );
        }
    }
    let took = t0.elapsed();
    assert_eq!(total, 5100);
    eprintln!("burst: 5100 connections from 3 pods in {took:?}");
    assert!(took < Duration::from_secs(60), "burst took {took:?}");
}
