//! A simulated Kubernetes node for root-only tests, built like a kind node
//! (a container). A [`SimNode`] is a set of namespaces held by a node init
//! process (pid 1 of the node's pid namespace, started by the `node-exec`
//! binary): pid, mount, UTS (hostname = node name) and cgroup namespaces, plus
//! a "node" network namespace holding a Linux bridge (`br0`) with the node's
//! IPv4/IPv6 addresses. Inside the node, /proc shows only the node's
//! processes and /sys/fs/cgroup is the node's own cgroup subtree
//! (`<cgroup2>/fasim-<pid>-n<i>` on the host). Each [`Pod`] is its own
//! network namespace whose `eth0` is a veth into that bridge (default route
//! via the node), plus a cgroup laid out the way the kubelet's systemd
//! driver does it on kind:
//! `kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/
//! kubelet-kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope`.
//! Processes started with [`Pod::spawn`] run in the node's namespaces and in
//! the pod's netns and cgroup, exactly as a container's. Nodes are not
//! connected unless [`SimNode::link`] joins two of them with a veth on a
//! transit subnet; IP forwarding is then on in those node namespaces only
//! (never on the host) and nothing routes to or from the host, so test
//! traffic can never leave the namespaces the test created. Dropping the
//! node (also during a panic's unwind) kills its init (and with it every
//! process of the node) and the pods' processes, and removes cgroups, links
//! and namespaces; [`cleanup_stale`] removes what a killed earlier run left.
//!
//! Addressing for node index `i` (0..=255, 250 is the transit subnet),
//! pod host numbers 2..=253:
//!
//! | what       | IPv4            | IPv6                   |
//! |------------|-----------------|------------------------|
//! | subnet     | 10.213.i.0/24   | fdfa:ca11:0:i::/64 (i in hex) |
//! | node (br0) | 10.213.i.1      | fdfa:ca11:0:i::1       |
//! | pod *h*    | 10.213.i.h      | fdfa:ca11:0:i::h (h in hex) |
//! | silent     | 10.213.i.254    | fdfa:ca11:0:i::fe      |
//! | transit    | 10.213.250.i/32 | fdfa:ca11:0:fa::i/128  |

mod cgroup;
mod cmd;
mod exec;
pub(crate) mod netns;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use cgroup::cgroup2_mount;
pub use exec::{ExecOpts, node_exec_path, node_pid_of, real_process, sibling_binary};

/// Every namespace and cgroup this module creates starts with this, followed
/// by the owning process id: `fasim-<pid>-n<index>[-p<host>]`. [`cleanup_stale`]
/// relies on it.
pub const NAME_PREFIX: &str = "fasim-";

/// Name of the bridge inside each node namespace.
pub const BRIDGE: &str = "br0";

/// First and last host number handed to pods; 1 is the node, 254 is silent.
const FIRST_POD_HOST: u8 = 2;
const LAST_POD_HOST: u8 = 253;
const SILENT_HOST: u8 = 254;

/// How long teardown waits for killed processes to leave their cgroup.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong while building or tearing down the simulated node.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(
        "the simulated node needs root (network namespaces, veths, cgroups): run as root, \
         e.g. `sudo -E cargo test -p flowaudit-tests -- --test-threads=1`"
    )]
    NotRoot,
    #[error("`ip` (iproute2) was not found on PATH: install it (apt-get install iproute2)")]
    IpMissing,
    #[error(
        "no cgroup2 mount in /proc/self/mountinfo: the simulated node needs cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup/unified)"
    )]
    NoCgroup2,
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "node index {index} is already used by a live simulated node ({owner}): pick another index"
    )]
    IndexInUse { index: u8, owner: String },
    #[error("node {index} is full: at most {} pods per node", LAST_POD_HOST - FIRST_POD_HOST + 1)]
    NodeFull { index: u8 },
    #[error("{0}")]
    Other(String),
}

/// What a pod is, in Kubernetes terms. `uid` is generated (a random UUID v4)
/// when `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub uid: Option<String>,
}

impl PodSpec {
    /// A pod with service account `default`, no labels, a generated uid.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        PodSpec {
            namespace: namespace.into(),
            name: name.into(),
            service_account: "default".into(),
            labels: BTreeMap::new(),
            uid: None,
        }
    }
    pub fn service_account(mut self, sa: impl Into<String>) -> Self {
        self.service_account = sa.into();
        self
    }
    pub fn label(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }
    pub fn uid(mut self, uid: impl Into<String>) -> Self {
        self.uid = Some(uid.into());
        self
    }
}

/// One simulated node. Owns every pod added to it: dropping it tears them all
/// down. `Send + Sync`; pods can be added from several threads.
#[derive(Debug)]
pub struct SimNode {
    index: u8,
    name: String,
    /// node-exec holding the init (its parent); killed with the init.
    init: Mutex<Option<Child>>,
    init_pid: u32,
    netns: String,
    netns_inode: u64,
    ip4: Ipv4Addr,
    ip6: Ipv6Addr,
    cgroup2: PathBuf,
    cgroup_root: PathBuf,
    state: Mutex<NodeState>,
}

#[derive(Debug)]
struct NodeState {
    pods: Vec<Pod>,
    next_host: u8,
    torn_down: bool,
}

/// A handle on a pod of a [`SimNode`]; cheap to clone. The node owns the
/// pod's resources, so a handle that outlives its node only reports errors.
#[derive(Debug, Clone)]
pub struct Pod(Arc<PodInner>);

#[derive(Debug)]
struct PodInner {
    spec: PodSpec,
    /// In the node's network namespace (no netns or veth of its own).
    host_network: bool,
    node_init_pid: u32,
    node_cgroup_root: PathBuf,
    uid: String,
    container_id: String,
    ip4: Ipv4Addr,
    ip6: Ipv6Addr,
    netns: String,
    netns_inode: u64,
    node_netns: String,
    host_veth: String,
    pod_cgroup: PathBuf,
    cgroup: PathBuf,
    cgroup_id: u64,
}

fn ip4_of(index: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 213, index, host)
}

fn ip6_of(index: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfdfa, 0xca11, 0, index as u16, 0, 0, 0, host as u16)
}

/// The subnet (as a node index) that carries links between nodes.
const TRANSIT: u8 = 250;

/// kind's kubelet (systemd cgroup driver) below the node's cgroup.
const KUBEPODS_BESTEFFORT: &str =
    "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice";

impl SimNode {
    /// Builds node `index`: its namespace, bridge and addresses, and its
    /// cgroup prefix. Runs [`cleanup_stale`] first. Fails with
    /// [`SimError::NotRoot`] when not root, [`SimError::IndexInUse`] when a
    /// live node (this or another process) already has this index.
    pub fn new(index: u8) -> Result<SimNode, SimError> {
        SimNode::named(index, &format!("sim-node-{index}"))
    }

    /// Like [`SimNode::new`], with the node name (its hostname) given.
    pub fn named(index: u8, name: &str) -> Result<SimNode, SimError> {
        cmd::preflight()?;
        cleanup_stale()?;
        let cgroup2 = cgroup2_mount()?;
        let suffix = format!("-n{index}");
        for name in netns::list()? {
            if name.starts_with(NAME_PREFIX) && name.ends_with(&suffix) {
                return Err(SimError::IndexInUse {
                    index,
                    owner: format!("netns {name}"),
                });
            }
        }
        let netns = format!("{NAME_PREFIX}{}-n{index}", std::process::id());
        let cgroup_root = cgroup2.join(&netns);
        netns::add(&netns)?;
        // From here on, a failure must undo what exists: let Drop do it.
        let mut node = SimNode {
            index,
            name: name.to_string(),
            init: Mutex::new(None),
            init_pid: 0,
            netns: netns.clone(),
            netns_inode: 0,
            ip4: ip4_of(index, 1),
            ip6: ip6_of(index, 1),
            cgroup2,
            cgroup_root,
            state: Mutex::new(NodeState {
                pods: Vec::new(),
                next_host: FIRST_POD_HOST,
                torn_down: false,
            }),
        };
        node.netns_inode = netns::inode(&netns)?;
        let n = netns.as_str();
        // No DAD on the node's links (bridge, transit veths): a router whose
        // link-local address is still tentative sends no neighbour
        // solicitation, so a forwarded packet would wait ~2 s.
        netns::run_in(n, || {
            netns::write_sysctl("net.ipv6.conf.default.accept_dad", "0")?;
            netns::write_sysctl("net.ipv6.conf.all.accept_dad", "0")
        })?;
        // forward_delay 0 and no multicast snooping: ports forward at once and
        // IPv6 neighbour discovery is flooded, so a fresh pod is reachable
        // without waiting for MLD reports.
        let (ip4, ip6) = (format!("{}/24", node.ip4), format!("{}/64", node.ip6));
        cmd::ip_batch(
            n,
            &[
                cmd::line(&["link", "set", "lo", "up"]),
                cmd::line(&[
                    "link",
                    "add",
                    BRIDGE,
                    "type",
                    "bridge",
                    "forward_delay",
                    "0",
                    "stp_state",
                    "0",
                    "mcast_snooping",
                    "0",
                ]),
                cmd::line(&["addr", "add", &ip4, "dev", BRIDGE]),
                cmd::line(&["addr", "add", &ip6, "dev", BRIDGE, "nodad"]),
                cmd::line(&["link", "set", BRIDGE, "up"]),
            ],
        )?;
        // New namespaces start with forwarding off; state it so that a changed
        // default can never turn the node into a router.
        netns::run_in(n, || {
            netns::write_sysctl("net.ipv4.ip_forward", "0")?;
            netns::write_sysctl("net.ipv6.conf.all.forwarding", "0")
        })?;
        cgroup::create_all(&node.kubepods_besteffort())?;
        cgroup::create_all(&node.cgroup_root.join("system.slice"))?;
        let init_cg = node.cgroup_root.join("init.scope");
        cgroup::create_all(&init_cg)?;
        let (init, init_pid) =
            exec::start_init(name, &node.cgroup_root, &init_cg, &netns::path(&node.netns))?;
        *node.init.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(init);
        node.init_pid = init_pid;
        Ok(node)
    }

    /// Adds a pod: namespace, veth (`eth0` inside, enslaved to the bridge on
    /// the node side), addresses, and the kubelet-style cgroup.
    pub fn add_pod(&self, spec: PodSpec) -> Result<Pod, SimError> {
        self.add_pod_with(spec, false)
    }

    /// Adds a `hostNetwork: true` pod: its own cgroup, the node's network
    /// namespace and addresses (no veth).
    pub fn add_host_network_pod(&self, spec: PodSpec) -> Result<Pod, SimError> {
        self.add_pod_with(spec, true)
    }

    fn add_pod_with(&self, spec: PodSpec, host_network: bool) -> Result<Pod, SimError> {
        let host = {
            let mut st = self.lock();
            if st.torn_down {
                return Err(SimError::Other(format!(
                    "node {} was already torn down",
                    self.index
                )));
            }
            if host_network {
                1
            } else if st.next_host > LAST_POD_HOST {
                return Err(SimError::NodeFull { index: self.index });
            } else {
                st.next_host += 1;
                st.next_host - 1
            }
        };
        let uid = match &spec.uid {
            Some(u) => u.clone(),
            None => random_uuid()?,
        };
        let container_id = random_hex(32)?;
        let pod_cgroup = self.kubepods_besteffort().join(format!(
            "kubelet-kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        let mut parts = PodInner {
            host_network,
            node_init_pid: self.init_pid,
            node_cgroup_root: self.cgroup_root.clone(),
            uid: uid.clone(),
            spec: PodSpec {
                uid: Some(uid),
                ..spec
            },
            cgroup: pod_cgroup.join(format!("cri-containerd-{container_id}.scope")),
            pod_cgroup,
            container_id,
            ip4: ip4_of(self.index, host),
            ip6: ip6_of(self.index, host),
            netns: if host_network {
                self.netns.clone()
            } else {
                format!("{}-p{host}", self.netns)
            },
            netns_inode: 0,
            node_netns: self.netns.clone(),
            host_veth: format!("fa{}v{host}", self.index),
            cgroup_id: 0,
        };
        if let Err(e) = self.build_pod(&mut parts) {
            // Undo the half-built pod; the build error is the one to report.
            let _ = teardown_pod(&parts);
            return Err(e);
        }
        let pod = Pod(Arc::new(parts));
        self.lock().pods.push(pod.clone());
        Ok(pod)
    }

    fn build_pod(&self, p: &mut PodInner) -> Result<(), SimError> {
        cgroup::create_all(&p.cgroup)?;
        p.cgroup_id = cgroup::id(&p.cgroup)?;
        if p.host_network {
            p.netns_inode = self.netns_inode;
            return Ok(());
        }
        netns::add(&p.netns)?;
        p.netns_inode = netns::inode(&p.netns)?;
        let (n, pn) = (self.netns.as_str(), p.netns.as_str());
        cmd::ip_batch(
            n,
            &[
                cmd::line(&[
                    "link",
                    "add",
                    &p.host_veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    pn,
                ]),
                cmd::line(&["link", "set", &p.host_veth, "master", BRIDGE, "up"]),
            ],
        )?;
        let (ip4, ip6) = (format!("{}/24", p.ip4), format!("{}/64", p.ip6));
        let (via4, via6) = (self.ip4.to_string(), self.ip6.to_string());
        cmd::ip_batch(
            pn,
            &[
                cmd::line(&["link", "set", "lo", "up"]),
                cmd::line(&["addr", "add", &ip4, "dev", "eth0"]),
                // nodad: the address is usable at once instead of after ~1 s of DAD.
                cmd::line(&["addr", "add", &ip6, "dev", "eth0", "nodad"]),
                cmd::line(&["link", "set", "eth0", "up"]),
                // Off-subnet traffic goes to the node, which routes it to a
                // linked node (SimNode::link) or drops it.
                cmd::line(&["route", "add", "default", "via", &via4]),
                cmd::line(&["route", "add", "::/0", "via", &via6]),
            ],
        )?;
        Ok(())
    }

    /// Tears the pod down now (kills its processes, removes cgroup, veth,
    /// namespace). Other handles on it only report errors afterwards.
    pub fn remove_pod(&self, pod: &Pod) -> Result<(), SimError> {
        self.lock().pods.retain(|p| !Arc::ptr_eq(&p.0, &pod.0));
        teardown_pod(&pod.0)
    }

    /// Tears everything down and reports the first error (Drop can only print).
    pub fn shutdown(self) -> Result<(), SimError> {
        self.teardown()
    }

    fn teardown(&self) -> Result<(), SimError> {
        let pods = {
            let mut st = self.lock();
            if st.torn_down {
                return Ok(());
            }
            st.torn_down = true;
            std::mem::take(&mut st.pods)
        };
        // Killing the init kills every process in the node's pid namespace;
        // their parents (node-exec, alive until then) reap them, and the
        // init's parent reaps the init once all are gone.
        if self.init_pid != 0 {
            // SAFETY: SIGKILL to the node's init, which this node started.
            unsafe { libc::kill(self.init_pid as i32, libc::SIGKILL) };
        }
        if let Some(mut init) = self.init.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let deadline = std::time::Instant::now() + TEARDOWN_TIMEOUT;
            while matches!(init.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = init.kill();
            let _ = init.wait();
        }
        let mut first_err = None;
        for p in &pods {
            if let Err(e) = teardown_pod(&p.0) {
                first_err.get_or_insert(e);
            }
        }
        // Anything else that got into the node's cgroups (a helper spawned by
        // hand) must go too before the directories can be removed.
        let steps = [
            cgroup::kill_all(&self.cgroup_root, TEARDOWN_TIMEOUT),
            cgroup::remove_tree(&self.cgroup_root, TEARDOWN_TIMEOUT),
            netns::del(&self.netns),
        ];
        for r in steps {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NodeState> {
        // A panic while holding the lock leaves consistent data (plain pushes).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kubepods_besteffort(&self) -> PathBuf {
        self.cgroup_root.join(KUBEPODS_BESTEFFORT)
    }

    /// The index this node was built with.
    pub fn index(&self) -> u8 {
        self.index
    }
    /// Name of the node's network namespace (under /run/netns).
    pub fn netns(&self) -> &str {
        &self.netns
    }
    /// Inode of the node's network namespace.
    pub fn netns_inode(&self) -> u64 {
        self.netns_inode
    }
    /// The node's IPv4 address on the bridge (10.213.<index>.1).
    pub fn ip4(&self) -> Ipv4Addr {
        self.ip4
    }
    /// The node's IPv6 address on the bridge (fdfa:ca11:0:<index>::1).
    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
    }
    /// IPv4 subnet as `addr/len`.
    pub fn subnet4(&self) -> String {
        format!("{}/24", ip4_of(self.index, 0))
    }
    /// IPv6 subnet as `addr/len`.
    pub fn subnet6(&self) -> String {
        format!("{}/64", ip6_of(self.index, 0))
    }
    /// An address on the subnet that nobody holds: ARP/ND never answers, so
    /// a connect to it times out (or fails "unreachable" after ~3 s).
    pub fn silent_ip4(&self) -> Ipv4Addr {
        ip4_of(self.index, SILENT_HOST)
    }
    /// IPv6 counterpart of [`SimNode::silent_ip4`].
    pub fn silent_ip6(&self) -> Ipv6Addr {
        ip6_of(self.index, SILENT_HOST)
    }
    /// The cgroup2 mount point in use.
    pub fn cgroup2_mount(&self) -> &Path {
        &self.cgroup2
    }
    /// The node's own cgroup: `<cgroup2>/fasim-<pid>-n<index>` on the host,
    /// the root of /sys/fs/cgroup inside the node; the kubelet tree
    /// (`kubelet.slice/...`), `init.scope` and `system.slice` lie below it.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }
    /// Handles on every live pod, in creation order.
    pub fn pods(&self) -> Vec<Pod> {
        self.lock().pods.clone()
    }
    /// The node's name: its hostname, what `--node-name` should say.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Host pid of the node's init (pid 1 inside the node).
    pub fn init_pid(&self) -> u32 {
        self.init_pid
    }

    /// Runs `cmd` in the node but in no pod: the node's namespaces (network
    /// included) and its own cgroup `<node>/system.slice/<program>-<n>.scope`,
    /// like a systemd service on the node. The handle is node-exec's.
    pub fn exec(&self, cmd: Command) -> Result<Child, SimError> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let prog = Path::new(cmd.get_program())
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let scope = self
            .cgroup_root
            .join("system.slice")
            .join(format!("{prog}-{n}.scope"));
        cgroup::create_all(&scope)?;
        let what = format!("{prog:?} on node {}", self.name);
        exec::spawn(
            cmd,
            self.init_pid,
            None,
            Some(&scope),
            &ExecOpts::default(),
            &what,
        )
    }

    /// [`SimNode::exec`] to completion, output captured.
    pub fn exec_output(&self, cmd: Command) -> Result<Output, SimError> {
        let what = format!("{:?} on node {}", cmd.get_program(), self.name);
        exec::output(self.exec(exec::piped(cmd))?, &what)
    }

    /// What the real `ps -eo pid,comm` prints inside the node.
    pub fn ps_output(&self) -> Result<String, SimError> {
        let mut cmd = Command::new("ps");
        cmd.args(["-eo", "pid,comm"]);
        let out = self.exec_output(cmd)?;
        if !out.status.success() {
            return Err(SimError::Other(format!(
                "ps in node {} failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// (node pid, comm) of every process in the node, from the node's own
    /// procfs (`/proc/<init>/root/proc`), sorted by pid.
    pub fn ps(&self) -> Result<Vec<(u32, String)>, SimError> {
        let proc_dir = PathBuf::from(format!("/proc/{}/root/proc", self.init_pid));
        let rd = std::fs::read_dir(&proc_dir).map_err(|e| SimError::Io {
            what: format!("list {}", proc_dir.display()),
            source: e,
        })?;
        let mut out: Vec<(u32, String)> = rd
            .flatten()
            .filter_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
                Some((pid, comm.trim_end().to_string()))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Runs `f` on a thread inside the node's network namespace.
    pub fn run_in_netns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, SimError> {
        netns::run_in(&self.netns, move || Ok(f()))
    }

    /// This node's address on the transit subnet (see [`SimNode::link`]).
    pub fn transit_ip4(&self) -> Ipv4Addr {
        ip4_of(TRANSIT, self.index)
    }
    /// IPv6 counterpart of [`SimNode::transit_ip4`].
    pub fn transit_ip6(&self) -> Ipv6Addr {
        ip6_of(TRANSIT, self.index)
    }

    /// Connects two nodes as a cluster network would: a veth `fx<other
    /// index>` between the node namespaces, each end with its node's transit
    /// address, a route to the other node's pod subnets via the other's
    /// transit address, and IP forwarding on in both node namespaces (never
    /// on the host). Nothing routes to or from the host. The link goes with
    /// either node.
    pub fn link(&self, other: &SimNode) -> Result<(), SimError> {
        if self.index == other.index || self.index == TRANSIT || other.index == TRANSIT {
            return Err(SimError::Other(format!(
                "cannot link node {} with node {}: two distinct nodes, neither index {TRANSIT} \
                 (its subnet carries the links)",
                self.index, other.index
            )));
        }
        let (a, b) = (self, other);
        let (va, vb) = (format!("fx{}", b.index), format!("fx{}", a.index));
        for (me, peer, dev) in [(a, b, &va), (b, a, &vb)] {
            let n = me.netns.as_str();
            let (my4, my6) = (me.transit_ip4(), me.transit_ip6());
            let (peer4, peer6) = (peer.transit_ip4(), peer.transit_ip6());
            let (p4, p6) = (peer4.to_string(), peer6.to_string());
            let (a4, a6) = (format!("{my4}/32"), format!("{my6}/128"));
            let (r4, r6) = (format!("{peer4}/32"), format!("{peer6}/128"));
            let (s4, s6) = (peer.subnet4(), peer.subnet6());
            let mut commands = Vec::new();
            if std::ptr::eq(me, a) {
                // The link itself, made from the first node's side.
                commands.push(cmd::line(&[
                    "link", "add", dev, "type", "veth", "peer", "name", &vb, "netns", &b.netns,
                ]));
            }
            commands.extend([
                cmd::line(&["addr", "add", &a4, "dev", dev]),
                cmd::line(&["addr", "add", &a6, "dev", dev, "nodad"]),
                cmd::line(&["link", "set", dev, "up"]),
                cmd::line(&["route", "add", &r4, "dev", dev]),
                cmd::line(&["route", "add", &r6, "dev", dev]),
                cmd::line(&["route", "add", &s4, "via", &p4, "dev", dev]),
                cmd::line(&["route", "add", &s6, "via", &p6, "dev", dev]),
            ]);
            cmd::ip_batch(n, &commands)?;
            netns::run_in(n, || {
                netns::write_sysctl("net.ipv4.ip_forward", "1")?;
                netns::write_sysctl("net.ipv6.conf.all.forwarding", "1")
            })?;
        }
        Ok(())
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!(
                "simnode: cleanup of node {} ({}) incomplete: {e}",
                self.index, self.netns
            );
        }
    }
}

/// Kills the pod's processes, then removes its cgroup (only possible once
/// empty), veth and namespace. Tolerates pieces that were never created.
fn teardown_pod(p: &PodInner) -> Result<(), SimError> {
    let mut first_err = None;
    let mut note = |r: Result<(), SimError>| {
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    };
    note(cgroup::kill_all(&p.pod_cgroup, TEARDOWN_TIMEOUT));
    note(cgroup::remove_tree(&p.pod_cgroup, TEARDOWN_TIMEOUT));
    if p.host_network {
        return first_err.map_or(Ok(()), Err);
    }
    // Deleting one end of a veth deletes both; the namespace going away would
    // too, but only once nothing holds it.
    if netns::path(&p.node_netns).exists() {
        let _ = cmd::ip(&["-n", &p.node_netns, "link", "del", &p.host_veth]);
    }
    note(netns::del(&p.netns));
    first_err.map_or(Ok(()), Err)
}

impl Pod {
    /// The spec the pod was created with, `uid` filled in.
    pub fn spec(&self) -> &PodSpec {
        &self.0.spec
    }
    pub fn namespace(&self) -> &str {
        &self.0.spec.namespace
    }
    pub fn name(&self) -> &str {
        &self.0.spec.name
    }
    pub fn service_account(&self) -> &str {
        &self.0.spec.service_account
    }
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.0.spec.labels
    }
    /// Pod UID (as in `metadata.uid`), part of the cgroup path.
    pub fn uid(&self) -> &str {
        &self.0.uid
    }
    /// The 64-hex "container id": the leaf cgroup directory's name.
    pub fn container_id(&self) -> &str {
        &self.0.container_id
    }
    pub fn ip4(&self) -> Ipv4Addr {
        self.0.ip4
    }
    pub fn ip6(&self) -> Ipv6Addr {
        self.0.ip6
    }
    /// Name of the pod's network namespace (under /run/netns).
    pub fn netns(&self) -> &str {
        &self.0.netns
    }
    /// `/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.0.netns)
    }
    /// Inode of the pod's network namespace, as `/proc/<pid>/ns/net` shows.
    pub fn netns_inode(&self) -> u64 {
        self.0.netns_inode
    }
    /// The node-side end of the pod's veth (in the node namespace).
    pub fn host_veth(&self) -> &str {
        &self.0.host_veth
    }
    /// `.../kubepods/besteffort/pod<uid>`.
    pub fn pod_cgroup_path(&self) -> &Path {
        &self.0.pod_cgroup
    }
    /// `.../kubepods/besteffort/pod<uid>/<container id>`: where spawned
    /// processes live.
    pub fn cgroup_path(&self) -> &Path {
        &self.0.cgroup
    }
    /// Inode of [`Pod::cgroup_path`], i.e. `bpf_get_current_cgroup_id()` of
    /// a process in the pod.
    pub fn cgroup_id(&self) -> u64 {
        self.0.cgroup_id
    }
    /// The path as `/proc/<pid>/cgroup` shows it (`0::<this>`), relative to
    /// the cgroup2 mount.
    pub fn cgroup_relative(&self, cgroup2_mount: &Path) -> PathBuf {
        Path::new("/").join(
            self.0
                .cgroup
                .strip_prefix(cgroup2_mount)
                .unwrap_or(&self.0.cgroup),
        )
    }

    /// The path as `/proc/<pid>/cgroup` shows it inside the node (`0::<this>`):
    /// relative to the node's cgroup, e.g.
    /// `/kubelet.slice/.../cri-containerd-<id>.scope`.
    pub fn node_cgroup_relative(&self) -> PathBuf {
        self.cgroup_relative(&self.0.node_cgroup_root)
    }
    /// Whether the pod uses the node's network namespace.
    pub fn host_network(&self) -> bool {
        self.0.host_network
    }
    /// Runs `f` on a thread inside the pod's network namespace.
    pub fn run_in_netns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, SimError> {
        netns::run_in(&self.0.netns, move || Ok(f()))
    }

    /// Starts `cmd` as the pod's container: in the node's pid, mount, UTS and
    /// cgroup namespaces, the pod's network namespace and cgroup, with every
    /// capability. node-exec joins the cgroup and namespaces before it forks
    /// the command, so nothing the command does (not even its first connect)
    /// is attributed elsewhere. The returned handle is node-exec's (host
    /// pid); it forwards signals and exits as the command does. `cmd` keeps
    /// its stdio, environment and working directory.
    pub fn spawn(&self, cmd: Command) -> Result<Child, SimError> {
        self.spawn_with(cmd, &ExecOpts::default())
    }

    /// [`Pod::spawn`] with a container's security settings.
    pub fn spawn_with(&self, cmd: Command, opts: &ExecOpts) -> Result<Child, SimError> {
        let what = format!(
            "{:?} in pod {}/{}",
            cmd.get_program(),
            self.namespace(),
            self.name()
        );
        exec::spawn(
            cmd,
            self.0.node_init_pid,
            Some(&netns::path(&self.0.netns)),
            Some(&self.0.cgroup),
            opts,
            &what,
        )
    }

    /// Like [`Pod::spawn`], but the process is killed and reaped when the
    /// returned guard drops.
    pub fn spawn_guarded(&self, cmd: Command) -> Result<PodProcess, SimError> {
        self.spawn(cmd).map(PodProcess::new)
    }

    /// Runs `cmd` in the pod to completion and returns its output.
    pub fn output(&self, cmd: Command) -> Result<Output, SimError> {
        let what = format!("{:?} in pod {}", cmd.get_program(), self.name());
        exec::output(self.spawn(exec::piped(cmd))?, &what)
    }
}

/// A process in a pod (or node) started through node-exec, SIGKILLed and
/// reaped when dropped. The handle is node-exec's; [`PodProcess::host_pid`]
/// and [`PodProcess::node_pid`] name the command's own process.
#[derive(Debug)]
pub struct PodProcess {
    child: Option<Child>,
    real: std::sync::OnceLock<u32>,
}

impl PodProcess {
    /// Guards a node-exec child (from [`Pod::spawn`] or [`SimNode::exec`]).
    pub fn new(child: Child) -> Self {
        PodProcess {
            child: Some(child),
            real: std::sync::OnceLock::new(),
        }
    }
    /// Host pid of node-exec, the parent the handle is on.
    pub fn node_exec_pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }
    /// Host pid of the command (node-exec's child), as a host agent or host
    /// tools see it. Waits for node-exec to fork; panics if it never does.
    pub fn host_pid(&self) -> u32 {
        *self.real.get_or_init(|| {
            real_process(self.node_exec_pid())
                .unwrap_or_else(|e| panic!("finding the pod process behind node-exec: {e}"))
        })
    }
    /// The command's pid in the node's pid namespace: what `ps` on the node
    /// shows (and what an agent on the node reports).
    pub fn node_pid(&self) -> u32 {
        let host = self.host_pid();
        node_pid_of(host).unwrap_or_else(|e| panic!("node pid of host pid {host}: {e}"))
    }
    pub fn child_mut(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("PodProcess holds its child until dropped or taken")
    }
    /// Gives up the guard: the caller owns the child again.
    pub fn into_child(mut self) -> Child {
        self.child
            .take()
            .expect("PodProcess holds its child until dropped or taken")
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The command has node-exec's death signal (SIGKILL).
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Removes namespaces and cgroups left by a simulated node whose owning
/// process is gone (a test run that was killed): kills what still runs in
/// those cgroups, then removes cgroups and namespaces. Leftovers of live
/// processes (a concurrent test binary) are not touched. Returns the names
/// removed.
pub fn cleanup_stale() -> Result<Vec<String>, SimError> {
    let cg2 = cgroup2_mount()?;
    let mut removed = Vec::new();
    let mut first_err = None;
    let cg_names: Vec<String> = std::fs::read_dir(&cg2)
        .map_err(|e| SimError::Io {
            what: format!("list {}", cg2.display()),
            source: e,
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_stale(n))
        .collect();
    for name in cg_names {
        let p = cg2.join(&name);
        match cgroup::kill_all(&p, TEARDOWN_TIMEOUT)
            .and_then(|_| cgroup::remove_tree(&p, TEARDOWN_TIMEOUT))
        {
            Ok(()) => removed.push(p.display().to_string()),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    // Pods first, then nodes: a pod namespace name extends its node's.
    let mut ns_names: Vec<String> = netns::list()?.into_iter().filter(|n| is_stale(n)).collect();
    ns_names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in ns_names {
        match netns::del(&name) {
            Ok(()) => removed.push(format!("netns {name}")),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

/// `fasim-<pid>-...` whose pid is neither us nor alive.
fn is_stale(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(NAME_PREFIX) else {
        return false;
    };
    let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<i32>) else {
        return false;
    };
    if pid as u32 == std::process::id() {
        return false;
    }
    // SAFETY: signal 0 only checks existence; EPERM still means alive.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    !alive
}

fn random_bytes<const N: usize>() -> Result<[u8; N], SimError> {
    let mut b = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: writes at most N - filled bytes into our buffer.
        let n = unsafe { libc::getrandom(b[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(SimError::Io {
                what: "getrandom".into(),
                source: e,
            });
        }
        filled += n as usize;
    }
    Ok(b)
}

fn random_hex(bytes: usize) -> Result<String, SimError> {
    let b = random_bytes::<32>()?;
    Ok(b[..bytes.min(32)]
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect())
}

/// A random RFC 4122 version 4 UUID, like the API server assigns.
fn random_uuid() -> Result<String, SimError> {
    let mut b = random_bytes::<16>()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_disjoint_per_index() {
        assert_eq!(ip4_of(3, 2).to_string(), "10.213.3.2");
        assert_eq!(ip6_of(3, 254).to_string(), "fdfa:ca11:0:3::fe");
        assert_ne!(ip4_of(1, 2), ip4_of(2, 2));
    }

    #[test]
    fn stale_names_need_a_dead_pid() {
        assert!(!is_stale("something-else"));
        assert!(!is_stale(&format!(
            "{NAME_PREFIX}{}-n0",
            std::process::id()
        )));
        // pid 1 is always alive.
        assert!(!is_stale(&format!("{NAME_PREFIX}1-n0-p2")));
        // Above pid_max (4194304): cannot be alive.
        assert!(is_stale(&format!("{NAME_PREFIX}99999999-n0")));
    }

    #[test]
    fn uuid_shape() {
        let u = random_uuid().expect("getrandom works");
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_eq!(random_hex(32).expect("getrandom works").len(), 64);
    }
}
