//! Small helpers every integration test uses: the root check that fails
//! (never skips) with the fix, a per-test temporary directory, the two-pod
//! node, the scenario policy's path, and the "local pod end" of a flow event.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Pod, PodSpec, SimNode};

/// Fails the test with the fix when not root: the tests load eBPF programs
/// and build network namespaces. Never a silent skip.
/// The Python of the virtual environment `cargo xtask setup` fills with
/// tests/requirements.txt (`$FLOWAUDIT_VENV`, else `<repo>/target/venv`):
/// grpcio lives there, never in the system Python.
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("FLOWAUDIT_VENV")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/venv")));
    let python = venv.join("bin/python3");
    assert!(
        python.exists(),
        "{} is missing: run `cargo xtask setup` (it makes the virtual environment), or point FLOWAUDIT_VENV at one with tests/requirements.txt installed",
        python.display()
    );
    python
}

pub fn require_root() {
    // SAFETY: a libc call with no pointer arguments.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "these tests load eBPF programs and build network namespaces: run them as root (`sudo -E cargo xtask test`)"
        );
    }
}

/// The named degradations (docs/architecture.md, "Kernels") the agent must
/// report on the running kernel: `kernel_reads` under a confidentiality
/// lockdown (no `bpf_probe_read_kernel`), none on the kernels of the
/// matrix otherwise (5.10 names namespaces by inode instead of cookie).
pub fn expected_kernel_degradations() -> Vec<String> {
    let mut out = Vec::new();
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").unwrap_or_default();
    if lockdown.contains("[confidentiality]") {
        out.push("kernel_reads".to_owned());
    }
    out
}

/// The degradations of an agent run as the DaemonSet runs it, in a node's
/// pid namespace with only the DaemonSet's capabilities: under a
/// confidentiality lockdown it also cannot translate pids into the node's
/// numbering (`pid_namespace`) nor run the listener iterator, and the /proc
/// fallback needs privileges it does not hold (`listener_scan`).
pub fn expected_kernel_degradations_in_node() -> Vec<String> {
    let mut out = expected_kernel_degradations();
    if out.iter().any(|d| d == "kernel_reads") {
        out.extend(["listener_scan".to_owned(), "pid_namespace".to_owned()]);
    }
    out.sort();
    out
}

/// The agent as the DaemonSet runs it (`deploy/kustomize/overlays/kind`,
/// rendered by `kubectl kustomize`), inside `node`.
pub fn node_agent(node: &SimNode, args: &[&str]) -> crate::agent::RunningAgent {
    crate::agent::RunningAgent::start_in_node(
        node,
        &crate::daemonset::kind_agent_pod_spec(),
        args,
        &[],
    )
}

/// Whether this kernel lets the agent read kernel memory (socket errors,
/// process start times, FIN accounting).
pub fn kernel_reads() -> bool {
    !expected_kernel_degradations()
        .iter()
        .any(|d| d == "kernel_reads")
}

/// A fresh directory for one test, named after it and this process (see
/// [`TestDir`]).
pub fn temp_dir(name: &str) -> TestDir {
    TestDir::new(&format!("flowaudit-{name}"))
}

/// A fresh, empty directory under the temp dir, `<prefix>-<pid>`, removed
/// with everything in it when dropped: at the end of the test, and also when
/// the test fails (the panic unwinds through it). Declare it before
/// whatever writes into it (a process, a socket), so it goes last.
#[derive(Debug)]
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new(prefix: &str) -> Self {
        Self::under(&std::env::temp_dir(), prefix)
    }

    /// The same under `parent` (created if missing), for a test that needs
    /// a particular file system.
    pub fn under(parent: &Path, prefix: &str) -> Self {
        let d = parent.join(format!("{prefix}-{}", std::process::id()));
        // What an earlier run of this process id left (a killed run).
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
        Self(d)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for TestDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `deploy/examples/scenario/precinct-99-scenario.yaml`.
pub fn scenario_policy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/scenario/precinct-99-scenario.yaml")
}

/// A node with a client pod (frontend) and a server pod (backend).
pub fn two_pods(index: u8) -> (SimNode, Pod, Pod) {
    let node = SimNode::new(index).expect("simulated node");
    let client = node
        .add_pod(
            PodSpec::new("99-apps", "frontend-7d9f")
                .service_account("frontend")
                .label("app", "frontend"),
        )
        .expect("client pod");
    let server = node
        .add_pod(
            PodSpec::new("99-apps", "backend-5c8b")
                .service_account("backend")
                .label("app", "backend"),
        )
        .expect("server pod");
    (node, client, server)
}

/// The end whose socket the node saw, for events whose ends are pods.
pub fn local_pod_ends(flows: &[Value]) -> Vec<&Value> {
    pod_ends(flows.iter(), true)
}

/// The other end of each event that established (CONNECT, CLOSE), when it
/// is a pod: on a single simulated node it has its own socket there too.
pub fn peer_pod_ends(flows: &[Value]) -> Vec<&Value> {
    pod_ends(flows.iter().filter(|f| f["event"] != "FAILED"), false)
}

fn pod_ends<'a>(flows: impl Iterator<Item = &'a Value>, local: bool) -> Vec<&'a Value> {
    flows
        .map(|f| {
            if (f["direction"] == "EGRESS") == local {
                &f["source"]
            } else {
                &f["destination"]
            }
        })
        .filter(|e| e["kind"] == "POD")
        .collect()
}

/// The kinds of a flow event's findings, in order.
pub fn finding_kinds(flow: &Value) -> Vec<&str> {
    flow["findings"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x["kind"].as_str()).collect())
        .unwrap_or_default()
}

/// One sample of the Prometheus exposition: `name{labels}` exactly.
pub fn metric_sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no sample {series} in /metrics:\n{text}"))
}

/// Every flow of an export file so far, in order (a line being written is
/// left out).
pub fn read_flows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The trust domain of the multi-node tests.
pub const TD: &str = "demo.local";

/// The SPIRE agent of one node: it knows that node's pods only (the
/// kubelet it asks is the node's), with an entry per service account.
pub fn node_spire(node: &SimNode, pods: &[&Pod]) -> crate::spire_double::NodeDouble {
    let mut cfg = crate::spire_double::SpireDoubleConfig::new("", TD)
        .version(crate::spire_double::VERSION_WITH_PID);
    for p in pods {
        cfg = cfg
            .pod(p.uid(), p.namespace(), p.service_account(), p.name())
            .entry(
                &format!(
                    "spiffe://{TD}/ns/{}/sa/{}",
                    p.namespace(),
                    p.service_account()
                ),
                &[
                    &format!("k8s:ns:{}", p.namespace()),
                    &format!("k8s:sa:{}", p.service_account()),
                ],
            );
    }
    cfg.authorized = Some(true);
    crate::spire_double::NodeDouble::start(node, cfg)
        .unwrap_or_else(|e| panic!("SPIRE double in {}: {e}", node.name()))
}

/// `count` connections from `from` to `to`:8000, 200 bytes each way out,
/// every one of which must succeed.
pub fn connect_ok(from: &Pod, to: std::net::IpAddr, count: u64) -> Vec<crate::simpod::ConnRecord> {
    let mut opts = crate::simpod::ConnectOpts::new(std::net::SocketAddr::new(to, 8000));
    opts.count = count;
    opts.send_bytes = 200;
    let report = from
        .connect(&opts)
        .unwrap_or_else(|e| panic!("{} -> {to}: {e}", from.name()));
    for r in &report.records {
        assert_eq!(
            r.result,
            crate::simpod::ConnResult::Ok,
            "{} -> {to}: {r:?}",
            from.name()
        );
    }
    report.records
}

#[cfg(test)]
mod tests {
    use super::TestDir;

    #[test]
    fn a_test_dir_is_removed_with_its_files_also_when_the_test_fails() {
        let mut path = None;
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let dir = TestDir::new("flowaudit-testdir-unwind");
            std::fs::create_dir_all(dir.join("a/b")).unwrap();
            std::fs::write(dir.join("a/b/f"), b"x").unwrap();
            path = Some(dir.to_path_buf());
            panic!("the test fails");
        }));
        assert!(failed.is_err());
        let path = path.expect("the dir was made");
        assert!(!path.exists(), "{} is left behind", path.display());

        // A stale one of the same name (a killed run) is emptied first.
        let stale =
            std::env::temp_dir().join(format!("flowaudit-testdir-stale-{}", std::process::id()));
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join("old"), b"x").unwrap();
        let dir = TestDir::new("flowaudit-testdir-stale");
        assert_eq!(dir.path(), stale);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        drop(dir);
        assert!(!stale.exists());
    }
}
