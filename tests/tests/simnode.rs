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

use flowaudit_tests::simnode::{ExecOpts, PodProcess};
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
    assert_pod_to_pod(&client, &server);
}

/// `client` reaches `server` over IPv4 and IPv6: 3 connections each, bytes
/// both ways, from the client pod's own addresses (no NAT).
fn assert_pod_to_pod(client: &Pod, server: &Pod) {
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
    let pid = proc_.host_pid();

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
        "process {pid} should be in the pod's container cgroup (seen from the host)"
    );
    let s = want.to_string_lossy();
    let tail = format!(
        "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{}.slice/cri-containerd-{}.scope",
        p.uid().replace('-', "_"),
        p.container_id()
    );
    assert!(
        s.ends_with(&tail),
        "cgroup {s} should end with kind's systemd-driver layout {tail}"
    );
    assert_eq!(p.node_cgroup_relative(), PathBuf::from(&tail));
    assert_eq!(
        flowaudit_tests::spire_double::pod_uid_from_cgroup(&cg).as_deref(),
        Some(p.uid()),
        "the SPIRE double finds the pod uid in {cg:?}"
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

/// Waits until host pid `pid` has exec'd `comm` (node-exec forks first).
fn wait_for_comm(pid: u32, comm: &str) {
    let t0 = Instant::now();
    loop {
        let got = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if got.trim() == comm {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "process {pid} should have become {comm}, is {got:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn sleeper(p: &Pod) -> PodProcess {
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    let proc_ = p
        .spawn_guarded(cmd)
        .unwrap_or_else(|e| panic!("spawn sleep in pod {}: {e}", p.name()));
    wait_for_comm(proc_.host_pid(), "sleep");
    proc_
}

fn stdout_of(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", script]);
    c
}

#[test]
fn pod_process_node_pid_is_what_ps_in_the_node_shows() {
    let node = node(20);
    let p = pod(&node, "frontend");
    let proc_ = sleeper(&p);
    let (host, inside) = (proc_.host_pid(), proc_.node_pid());
    assert_ne!(host, inside, "node pid and host pid should differ");
    assert_ne!(proc_.node_exec_pid(), host, "the handle is node-exec's");
    let ps = node
        .ps_output()
        .unwrap_or_else(|e| panic!("ps in node: {e}"));
    let rows: Vec<(u32, String)> = ps
        .lines()
        .skip(1)
        .filter_map(|l| {
            let (pid, comm) = l.trim().split_once(char::is_whitespace)?;
            Some((pid.parse().ok()?, comm.trim().to_string()))
        })
        .collect();
    assert!(
        rows.contains(&(inside, "sleep".to_string())),
        "ps inside the node should show sleep as pid {inside} (host pid {host}):\n{ps}"
    );
    assert!(
        !rows.iter().any(|(pid, c)| *pid == host && c == "sleep"),
        "ps inside the node shows the host pid {host}:\n{ps}"
    );
    let from_proc = node.ps().unwrap_or_else(|e| panic!("node ps: {e}"));
    assert!(
        from_proc.contains(&(inside, "sleep".to_string())),
        "the node's /proc should show sleep as {inside}: {from_proc:?}"
    );
}

#[test]
fn the_nodes_proc_shows_only_the_nodes_processes() {
    let node = node(21);
    let p = pod(&node, "frontend");
    let _a = sleeper(&p);
    let procs = node.ps().unwrap_or_else(|e| panic!("node ps: {e}"));
    assert_eq!(
        procs.first().map(|(pid, _)| *pid),
        Some(1),
        "the node's init is pid 1: {procs:?}"
    );
    let comms: Vec<&str> = procs.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(
        comms,
        ["node-exec", "sleep"],
        "only the init and the pod's sleep live in the node: {procs:?}"
    );
    let ps = node.ps_output().unwrap_or_else(|e| panic!("ps: {e}"));
    let n = ps.lines().skip(1).count();
    assert_eq!(n, 3, "ps in the node sees init, sleep and itself:\n{ps}");
}

#[test]
fn the_nodes_cgroup_root_hostname_and_proc_are_its_own() {
    let node = node(22);
    let p = pod(&node, "frontend");
    let out = p
        .output(sh(
            "cat /proc/self/cgroup; hostname; stat -fc %T /sys/fs/cgroup; ls /sys/fs/cgroup",
        ))
        .unwrap_or_else(|e| panic!("sh in pod: {e}"));
    let text = stdout_of(out, "sh in pod");
    // On a hybrid host the v1 hierarchies come first; the v2 line is "0::".
    let mut lines = text.lines().skip_while(|l| !l.starts_with("0::"));
    let want = format!("0::{}", p.node_cgroup_relative().display());
    assert_eq!(
        lines.next(),
        Some(want.as_str()),
        "/proc/self/cgroup inside the node:\n{text}"
    );
    assert!(
        want.starts_with("0::/kubelet.slice/") && want.ends_with(".scope"),
        "{want}"
    );
    assert_eq!(lines.next(), Some(node.name()), "hostname in the node");
    assert_eq!(lines.next(), Some("cgroup2fs"), "/sys/fs/cgroup is cgroup2");
    let entries: Vec<&str> = lines.collect();
    for e in [
        "kubelet.slice",
        "init.scope",
        "system.slice",
        "cgroup.procs",
    ] {
        assert!(
            entries.contains(&e),
            "the node's /sys/fs/cgroup should be its own cgroup, with {e}: {entries:?}"
        );
    }
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    assert_ne!(
        host_name.trim(),
        node.name(),
        "the host's hostname is untouched"
    );
    // A node process outside pods: system.slice.
    let out = node
        .exec_output(sh("cat /proc/self/cgroup"))
        .unwrap_or_else(|e| panic!("exec in node: {e}"));
    let text = stdout_of(out, "cat in node");
    assert!(
        text.lines()
            .any(|l| l.starts_with("0::/system.slice/sh-") && l.ends_with(".scope")),
        "SimNode::exec runs in the node's system.slice: {text}"
    );
}

fn status_field(pid: u32, name: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

#[test]
fn node_exec_keeps_exactly_the_listed_capabilities_with_no_new_privs() {
    let node = node(23);
    let p = pod(&node, "agent");
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    let opts = ExecOpts {
        caps: Some(vec!["BPF".into(), "PERFMON".into(), "NET_ADMIN".into()]),
        no_new_privs: true,
        ..ExecOpts::default()
    };
    let proc_ = PodProcess::new(
        p.spawn_with(cmd, &opts)
            .unwrap_or_else(|e| panic!("spawn sleep with caps: {e}")),
    );
    let pid = proc_.host_pid();
    wait_for_comm(pid, "sleep");
    let want = format!("{:016x}", (1u64 << 39) | (1 << 38) | (1 << 12));
    for f in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            status_field(pid, f),
            want,
            "{f} of a BPF,PERFMON,NET_ADMIN process"
        );
    }
    for f in ["CapInh", "CapAmb"] {
        assert_eq!(status_field(pid, f), "0000000000000000", "{f}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // The default keeps every capability and allows privilege escalation.
    let all = sleeper(&p);
    let full = status_field(std::process::id(), "CapBnd");
    assert_eq!(status_field(all.host_pid(), "CapEff"), full);
    assert_eq!(status_field(all.host_pid(), "NoNewPrivs"), "0");
}

#[test]
fn read_only_root_keeps_the_rw_dirs_writable() {
    let node = node(24);
    let p = pod(&node, "agent");
    let rw = std::env::temp_dir().join(format!("fasim-rw-{}", std::process::id()));
    std::fs::create_dir_all(&rw).expect("create rw dir");
    let outside = PathBuf::from(format!("/var/tmp/fasim-ro-{}", std::process::id()));
    let script = format!(
        "touch {o} 2>&1 && echo wrote-root; touch {r}/ok && echo wrote-rw",
        o = outside.display(),
        r = rw.display()
    );
    let opts = ExecOpts {
        ro_root: true,
        rw: vec![rw.clone()],
        ..ExecOpts::default()
    };
    let child = p
        .spawn_with(
            {
                let mut c = sh(&script);
                c.stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped());
                c
            },
            &opts,
        )
        .unwrap_or_else(|e| panic!("spawn sh with --ro-root: {e}"));
    let out = child.wait_with_output().expect("wait for sh");
    let text = String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::remove_file(&outside);
    let rw_ok = rw.join("ok").exists();
    let _ = std::fs::remove_dir_all(&rw);
    assert!(
        text.contains("Read-only file system") && !text.contains("wrote-root"),
        "writing below / should fail read-only: {text}"
    );
    assert!(
        text.contains("wrote-rw") && rw_ok,
        "the rw dir stays writable: {text}"
    );
    // The node's own root stays writable.
    let out = p
        .output(sh(&format!("touch {o} && rm {o}", o = outside.display())))
        .unwrap_or_else(|e| panic!("sh in pod: {e}"));
    stdout_of(out, "a write below / without --ro-root");
}

#[test]
fn cross_node_pod_to_pod_ipv4_and_ipv6() {
    let fwd = || {
        (
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default(),
            std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").unwrap_or_default(),
        )
    };
    let host_fwd = fwd();
    let a = node(25);
    let b = node(26);
    a.link(&b)
        .unwrap_or_else(|e| panic!("linking nodes 25 and 26: {e}"));
    assert_eq!(fwd(), host_fwd, "forwarding on the host must not change");
    let client = pod(&a, "frontend");
    let server = pod(&b, "backend");
    assert_pod_to_pod(&client, &server);
    // Nothing routes to the host: the host has no route into the pod subnets.
    let routes = Command::new("ip")
        .args(["route", "get", &server.ip4().to_string()])
        .output()
        .expect("ip route get");
    let r = String::from_utf8_lossy(&routes.stdout);
    assert!(
        !r.contains("fx") && !r.contains("fa"),
        "the host must not route into the simulated nodes: {r}"
    );
}

#[test]
fn signals_to_node_exec_reach_the_command() {
    use std::os::unix::process::ExitStatusExt;
    let node = node(27);
    let p = pod(&node, "frontend");
    // Killed by the forwarded SIGTERM: node-exec dies of SIGTERM too.
    let proc_ = sleeper(&p);
    let host = proc_.host_pid();
    let mut child = proc_.into_child();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().expect("wait for node-exec");
    assert_eq!(st.signal(), Some(libc::SIGTERM), "node-exec's status: {st}");
    assert!(!running(host), "sleep {host} should be gone");
    // A command that handles the signal: its exit code comes through.
    let mut cmd = sh("trap 'exit 7' USR1; echo ready; while :; do sleep 0.05; done");
    cmd.stdout(std::process::Stdio::piped());
    let mut child = p.spawn(cmd).unwrap_or_else(|e| panic!("spawn sh: {e}"));
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read ready");
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let st = child.wait().expect("wait for node-exec");
    assert_eq!(
        st.code(),
        Some(7),
        "node-exec exits with the command's code: {st}"
    );
}

/// What a node leaves behind if teardown fails.
struct Leftovers {
    netns: Vec<String>,
    cgroups: Vec<PathBuf>,
    /// Host pids: the node's init, the pod's command, a node process.
    pids: Vec<u32>,
    /// node-exec of the pod's command.
    child: std::process::Child,
}

/// Builds a node linked to a second one, with a pod running `sleep` and a
/// node process; returns the nodes and what must vanish with them.
fn populated(index: u8) -> (SimNode, SimNode, Leftovers) {
    let node = node(index);
    let peer = self::node(index + 100);
    node.link(&peer)
        .unwrap_or_else(|e| panic!("link nodes {index} and {}: {e}", index + 100));
    let p = pod(&node, "victim");
    let proc_ = sleeper(&p);
    let pod_pid = proc_.host_pid();
    let child = proc_.into_child();
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    let node_proc = PodProcess::new(
        node.exec(cmd)
            .unwrap_or_else(|e| panic!("exec sleep in node: {e}")),
    );
    let node_pid = node_proc.host_pid();
    // Left running on purpose: teardown must kill it.
    std::mem::forget(node_proc);
    let netns = vec![
        node.netns().to_string(),
        p.netns().to_string(),
        peer.netns().to_string(),
    ];
    let cgroups = vec![
        node.cgroup_root().to_path_buf(),
        p.cgroup_path().to_path_buf(),
        peer.cgroup_root().to_path_buf(),
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
    let pids = vec![node.init_pid(), pod_pid, node_pid, peer.init_pid()];
    for pid in &pids {
        assert!(
            running(*pid),
            "process {pid} should run while the node lives"
        );
    }
    (
        node,
        peer,
        Leftovers {
            netns,
            cgroups,
            pids,
            child,
        },
    )
}

fn assert_gone(l: &mut Leftovers) {
    for n in &l.netns {
        assert!(!netns_exists(n), "netns {n} should be gone after cleanup");
    }
    for c in &l.cgroups {
        assert!(
            !c.exists(),
            "cgroup {} should be gone after cleanup",
            c.display()
        );
    }
    let st = l.child.try_wait().expect("try_wait on the pod's node-exec");
    assert!(
        st.is_some() && !running(l.child.id()),
        "pod's node-exec {} should have been killed",
        l.child.id()
    );
    for pid in &l.pids {
        assert!(
            !running(*pid),
            "process {pid} of {:?} should have been killed: {:?}",
            l.pids,
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .take(8)
                .collect::<Vec<_>>()
        );
    }
    let links = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links
            .lines()
            .any(|l| l.contains(" fx") || l.contains(" fa")),
        "no simulated node's link may be left on the host: {links}"
    );
}

#[test]
fn drop_removes_netns_cgroups_and_processes() {
    let (node, peer, mut left) = populated(14);
    drop(node);
    drop(peer);
    assert_gone(&mut left);
}

#[test]
fn panic_inside_a_test_still_cleans_up() {
    let leftovers = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (_node, _peer, left) = populated(15);
        *leftovers.lock().unwrap() = Some(left);
        panic!("deliberate panic while the node is alive");
    }));
    assert!(r.is_err(), "the closure should have panicked");
    let mut left = leftovers
        .into_inner()
        .unwrap()
        .expect("closure recorded its resources");
    assert_gone(&mut left);
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

#[test]
fn agent_runs_in_a_node_as_the_daemonset_does() {
    let node = node(28);
    let spec = flowaudit_tests::daemonset::kind_agent_pod_spec();
    // The node's /run is its own: the DirectoryOrCreate hostPath is made
    // there, never on the machine.
    let host_run_had = std::path::Path::new("/run/spire/admin-sockets").exists();
    let agent = flowaudit_tests::agent::RunningAgent::start_in_node(&node, &spec, &[], &[]);
    assert!(
        std::path::Path::new(&format!(
            "/proc/{}/root/run/spire/admin-sockets",
            node.init_pid()
        ))
        .is_dir(),
        "the admin socket hostPath exists in the node"
    );
    assert_eq!(
        std::path::Path::new("/run/spire/admin-sockets").exists(),
        host_run_had,
        "the node's /run is not the machine's"
    );
    let (code, body) = agent.http_get("/healthz");
    assert_eq!(
        code, 200,
        "GET /healthz from inside the agent's pod: {body}"
    );
    let host = agent.host_pid();
    assert_ne!(
        agent.node_pid(),
        host,
        "the agent runs in the node's pid namespace"
    );
    let want = format!(
        "{:016x}",
        spec.capability_numbers()
            .iter()
            .fold(0u64, |m, n| m | 1 << n)
    );
    for f in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(status_field(host, f), want, "the agent's {f}");
    }
    assert_eq!(status_field(host, "NoNewPrivs"), "1");
    let report = agent.stop_with(libc::SIGTERM);
    assert!(
        report
            .logs
            .iter()
            .any(|l| l.to_string().contains(node.name())),
        "the agent names its node {}",
        node.name()
    );
}
