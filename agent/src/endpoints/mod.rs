//! The endpoint directory: which pod (namespace, name, UID, service account,
//! labels, node) or node owns an address. Input: the `--endpoints` YAML file
//! (PRODUCT.md format), reloaded when it changes; out: `Peer` answers for
//! addresses and pod UIDs. An address in neither list is `world`. A new
//! version of the file that does not parse is rejected with file, line and
//! column, and the last good directory stays in force.

pub mod kubernetes;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::flow::{ArcStr, PodMeta};

#[derive(Debug, thiserror::Error)]
pub enum EndpointsError {
    #[error("cannot read endpoint directory {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A pod, as the directory knows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "PodEntry")]
pub struct PodInfo {
    pub ips: Vec<IpAddr>,
    pub uid: String,
    pub node: String,
    /// Names and labels, shared with every end of every flow of the pod
    /// (issue 15): joining an end to its pod is one reference count.
    pub meta: Arc<PodMeta>,
}

/// A pod as the `--endpoints` file writes it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PodEntry {
    /// None for a hostNetwork pod, known by its `uid` alone.
    #[serde(default)]
    ips: Vec<IpAddr>,
    namespace: ArcStr,
    pod: ArcStr,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    service_account: ArcStr,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    node: String,
}

impl From<PodEntry> for PodInfo {
    fn from(e: PodEntry) -> Self {
        Self {
            ips: e.ips,
            uid: e.uid,
            node: e.node,
            meta: Arc::new(PodMeta {
                namespace: e.namespace,
                pod_name: e.pod,
                service_account: e.service_account,
                labels: e.labels,
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    pub name: String,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectoryFile {
    #[serde(default)]
    nodes: Vec<NodeInfo>,
    #[serde(default)]
    endpoints: Vec<PodInfo>,
}

/// What an address is, borrowed from the directory: naming a flow's end
/// costs no reference count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer<'a> {
    Pod(&'a PodInfo),
    /// A node's own address (name of the node).
    Host(&'a str),
    /// Outside the cluster.
    World,
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
pub struct EndpointDirectory {
    // Looked up for every flow, filled only from the directory: a fast
    // seeded hash (no SipHash) is enough, as nobody else inserts keys.
    by_ip: FastMap<IpAddr, Arc<PodInfo>>,
    by_uid: FastMap<String, Arc<PodInfo>>,
    nodes: FastMap<IpAddr, Arc<str>>,
    /// Pods it holds (each once, whatever its addresses).
    pods: usize,
}

impl EndpointDirectory {
    pub fn from_pods(nodes: Vec<NodeInfo>, pods: Vec<PodInfo>) -> Self {
        let mut dir = Self::default();
        for n in nodes {
            let name: Arc<str> = Arc::from(n.name.as_str());
            for ip in n.ips {
                dir.nodes.insert(canonical(ip), name.clone());
            }
        }
        dir.pods = pods.len();
        for p in pods {
            let p = Arc::new(p);
            for ip in &p.ips {
                dir.by_ip.insert(canonical(*ip), p.clone());
            }
            if !p.uid.is_empty() {
                dir.by_uid.insert(p.uid.clone(), p.clone());
            }
        }
        dir
    }

    /// Parses the YAML text of an endpoint directory file.
    pub fn parse(path: &Path, text: &str) -> Result<Self, EndpointsError> {
        let file: DirectoryFile = if text.trim().is_empty() {
            DirectoryFile::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| {
                let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
                EndpointsError::Parse {
                    path: path.to_path_buf(),
                    line,
                    column,
                    message: e.to_string(),
                }
            })?
        };
        check_pods(&file).map_err(|message| EndpointsError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(Self::from_pods(file.nodes, file.endpoints))
    }

    pub fn load(path: &Path) -> Result<Self, EndpointsError> {
        Self::parse(path, &read(path)?)
    }

    /// [`load`](Self::load) for a new version of a file that had one: an
    /// empty file is refused then (a file being written, a key emptied by
    /// mistake), since it would make every pod a stranger at once; a
    /// directory without pods is written `endpoints: []`.
    pub fn reload(path: &Path) -> Result<Self, EndpointsError> {
        let text = read(path)?;
        if text.trim().is_empty() {
            return Err(EndpointsError::Invalid {
                path: path.to_path_buf(),
                message: "the file is now empty (still being written?); write `endpoints: []` for a directory without pods".into(),
            });
        }
        Self::parse(path, &text)
    }

    pub fn peer(&self, ip: IpAddr) -> Peer<'_> {
        let ip = canonical(ip);
        if let Some(p) = self.by_ip.get(&ip) {
            Peer::Pod(p)
        } else if let Some(n) = self.nodes.get(&ip) {
            Peer::Host(n)
        } else if ip.is_loopback() {
            // Loopback never leaves the namespace it was used in.
            Peer::Host("localhost")
        } else {
            Peer::World
        }
    }

    pub fn pod_by_uid(&self, uid: &str) -> Option<Arc<PodInfo>> {
        self.by_uid.get(uid).cloned()
    }

    /// Pods it holds.
    pub fn len(&self) -> usize {
        self.pods
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the file says that cannot be true of a cluster: a pod with no
/// address and no UID to know it by, an address or a UID of two pods, a
/// pod at a node's own address.
fn check_pods(file: &DirectoryFile) -> Result<(), String> {
    let name = |p: &PodInfo| format!("{}/{}", p.meta.namespace, p.meta.pod_name);
    let nodes: HashMap<IpAddr, &str> = file
        .nodes
        .iter()
        .flat_map(|n| n.ips.iter().map(|ip| (canonical(*ip), n.name.as_str())))
        .collect();
    let mut ips: HashMap<IpAddr, &PodInfo> = HashMap::new();
    let mut uids: HashMap<&str, &PodInfo> = HashMap::new();
    for p in &file.endpoints {
        if p.ips.is_empty() && p.uid.is_empty() {
            return Err(format!(
                "endpoint {} has no ips and no uid: give its addresses, or its uid alone for a hostNetwork pod (known by the UID in its processes' cgroup, as the Kubernetes API source keeps them)",
                name(p)
            ));
        }
        for ip in &p.ips {
            if let Some(node) = nodes.get(&canonical(*ip)) {
                return Err(format!(
                    "address {ip} of endpoint {} is node {node}'s own address: a hostNetwork pod shares its node's addresses, and listing them would make every connection of the node look like this pod; write it with `ips: []` and its uid (known by UID only, as the Kubernetes API source keeps such pods)",
                    name(p)
                ));
            }
            if let Some(other) = ips.insert(canonical(*ip), p) {
                return Err(format!(
                    "address {ip} belongs to both endpoint {} and endpoint {}",
                    name(other),
                    name(p)
                ));
            }
        }
        if !p.uid.is_empty()
            && let Some(other) = uids.insert(&p.uid, p)
        {
            return Err(format!(
                "uid {} belongs to both endpoint {} and endpoint {}",
                p.uid,
                name(other),
                name(p)
            ));
        }
    }
    Ok(())
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Identifies a version of a file: a ConfigMap update swaps a symlink, so
/// the inode changes even when size and mtime do not.
pub fn file_stamp(path: &Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// The largest `--endpoints` file read: about 200,000 pods as PRODUCT.md
/// writes them. A path given by mistake (a log, `/dev/zero`) is refused
/// rather than read into memory without end.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

fn read(path: &Path) -> Result<String, EndpointsError> {
    use std::io::Read as _;
    let failed = |source| EndpointsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(failed)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(EndpointsError::Invalid {
            path: path.to_path_buf(),
            message: format!(
                "larger than {} MiB: not an endpoint directory (wrong path?)",
                MAX_FILE_BYTES >> 20
            ),
        });
    }
    String::from_utf8(bytes).map_err(|e| {
        failed(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not UTF-8 text (first bad byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        ))
    })
}

/// What the endpoint directory's source did, read by `/metrics`
/// (`flowaudit_endpoint_directory_pods`, `..._errors_total`): a directory
/// that stopped following the cluster shows there, not only in the logs.
#[derive(Debug, Default)]
pub struct DirectoryStats {
    /// Pods in the directory in force.
    pub pods: std::sync::atomic::AtomicU64,
    /// New versions of the `--endpoints` file refused, and Kubernetes
    /// list or watch calls that failed: each time, the last good
    /// directory stayed in force.
    pub errors: std::sync::atomic::AtomicU64,
}

/// Watches the file and publishes every good new version on `tx`. A bad
/// version is logged with its position and counted, and the last good one
/// stays.
pub async fn watch_file(
    path: PathBuf,
    tx: tokio::sync::watch::Sender<Arc<EndpointDirectory>>,
    stats: Arc<DirectoryStats>,
) {
    use std::sync::atomic::Ordering;
    stats
        .pods
        .store(tx.borrow().len() as u64, Ordering::Relaxed);
    let mut stamp = file_stamp(&path);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = file_stamp(&path);
        if now == stamp {
            continue;
        }
        stamp = now;
        match EndpointDirectory::reload(&path) {
            Ok(dir) => {
                tracing::info!(path = %path.display(), pods = dir.len(), "endpoint directory reloaded");
                stats.pods.store(dir.len() as u64, Ordering::Relaxed);
                if tx.send(Arc::new(dir)).is_err() {
                    return;
                }
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "endpoint directory rejected; the last good version stays in force")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
nodes:                      # node addresses: peers seen as `host`
  - name: precinct-99-worker
    ips: [172.18.0.3]
endpoints:                  # pods
  - ips: [10.244.1.5, "fd00:10:244:1::5"]
    namespace: 99-apps
    pod: frontend-7d9f
    uid: 3f1c2a9e-5b7d-4c1e-9a0b-2d6f8e4c1a77   # pod UID (optional)
    serviceAccount: frontend
    labels: {app: frontend}
    node: precinct-99-worker
"#;

    #[test]
    fn product_md_example_parses_and_answers() {
        let dir = EndpointDirectory::parse(Path::new("e.yaml"), SAMPLE).unwrap();
        let Peer::Pod(p) = dir.peer("10.244.1.5".parse().unwrap()) else {
            panic!("pod expected")
        };
        assert_eq!(
            (
                p.meta.namespace.as_str(),
                p.meta.pod_name.as_str(),
                p.meta.service_account.as_str()
            ),
            ("99-apps", "frontend-7d9f", "frontend")
        );
        assert_eq!(
            p.meta.labels.get("app").map(String::as_str),
            Some("frontend")
        );
        assert!(matches!(
            dir.peer("fd00:10:244:1::5".parse().unwrap()),
            Peer::Pod(_)
        ));
        assert!(matches!(
            dir.peer("::ffff:10.244.1.5".parse().unwrap()),
            Peer::Pod(_)
        ));
        assert_eq!(
            dir.peer("172.18.0.3".parse().unwrap()),
            Peer::Host("precinct-99-worker")
        );
        assert_eq!(dir.peer("8.8.8.8".parse().unwrap()), Peer::World);
        // Loopback never leaves the namespace it was used in: the host
        // `localhost`, not the world (docs/kubernetes.md).
        for lo in ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(
                dir.peer(lo.parse().unwrap()),
                Peer::Host("localhost"),
                "{lo}"
            );
        }
        assert!(
            dir.pod_by_uid("3f1c2a9e-5b7d-4c1e-9a0b-2d6f8e4c1a77")
                .is_some()
        );
        assert!(dir.pod_by_uid("nope").is_none());
    }

    #[test]
    fn bad_files_name_file_line_and_column() {
        let bad =
            "endpoints:\n  - ips: [10.0.0.1]\n    namespace: a\n    pod: b\n    colour: red\n";
        let e = EndpointDirectory::parse(Path::new("/etc/e.yaml"), bad)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/e.yaml:5:"), "{e}");
        assert!(e.contains("colour"), "{e}");
        let e = EndpointDirectory::parse(Path::new("e.yaml"), "endpoints:\n  - ips: [not-an-ip]\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("e.yaml:2:"), "{e}");
        let dup = "endpoints:\n  - {ips: [10.0.0.1], namespace: a, pod: x}\n  - {ips: [10.0.0.1], namespace: a, pod: y}\n";
        let e = EndpointDirectory::parse(Path::new("e.yaml"), dup)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "e.yaml: address 10.0.0.1 belongs to both endpoint a/x and endpoint a/y"
        );
        assert!(
            EndpointDirectory::parse(Path::new("e.yaml"), "")
                .unwrap()
                .is_empty()
        );
    }

    /// What cannot be true of a cluster is refused, naming the endpoints;
    /// a hostNetwork pod is written by its UID alone and known by it, its
    /// node's addresses stay the node's.
    #[test]
    fn addresses_and_uids_of_two_endpoints_or_of_a_node_are_refused() {
        let parse = |text: &str| {
            EndpointDirectory::parse(Path::new("e.yaml"), text).map_err(|e| e.to_string())
        };
        let node = "nodes:\n  - {name: w1, ips: [172.18.0.3]}\n";
        assert_eq!(
            parse(&format!(
                "{node}endpoints:\n  - {{ips: [172.18.0.3], namespace: kube-system, pod: kube-proxy-x, uid: u1}}\n"
            ))
            .unwrap_err(),
            "e.yaml: address 172.18.0.3 of endpoint kube-system/kube-proxy-x is node w1's own address: a hostNetwork pod shares its node's addresses, and listing them would make every connection of the node look like this pod; write it with `ips: []` and its uid (known by UID only, as the Kubernetes API source keeps such pods)"
        );
        let host_network = parse(&format!(
            "{node}endpoints:\n  - {{namespace: kube-system, pod: kube-proxy-x, uid: u1}}\n  - {{ips: [], namespace: a, pod: b, uid: u2}}\n"
        ))
        .unwrap();
        assert_eq!(host_network.len(), 2);
        assert_eq!(
            host_network.peer("172.18.0.3".parse().unwrap()),
            Peer::Host("w1")
        );
        let by_uid = host_network.pod_by_uid("u1").expect("known by its UID");
        assert_eq!(by_uid.meta.pod_name.as_str(), "kube-proxy-x");
        assert!(by_uid.ips.is_empty());
        assert_eq!(
            parse("endpoints:\n  - {ips: [], namespace: a, pod: b}\n").unwrap_err(),
            "e.yaml: endpoint a/b has no ips and no uid: give its addresses, or its uid alone for a hostNetwork pod (known by the UID in its processes' cgroup, as the Kubernetes API source keeps them)"
        );
        assert_eq!(
            parse("endpoints:\n  - {ips: [10.0.0.1], namespace: a, pod: x, uid: u1}\n  - {ips: [10.0.0.2], namespace: b, pod: y, uid: u1}\n").unwrap_err(),
            "e.yaml: uid u1 belongs to both endpoint a/x and endpoint b/y"
        );
    }

    /// A path given by mistake is refused before it is read into memory
    /// whole; a file that is not text says so.
    #[test]
    fn a_file_too_large_or_not_text_is_refused() {
        let dir = flowaudit_tests::support::TestDir::new("fa-endpoints-size");
        let big = dir.path().join("big.yaml");
        std::fs::File::create(&big)
            .and_then(|f| f.set_len(MAX_FILE_BYTES + 1))
            .unwrap();
        let e = EndpointDirectory::load(&big).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: larger than 64 MiB: not an endpoint directory (wrong path?)",
                big.display()
            )
        );
        let binary = dir.path().join("bin.yaml");
        std::fs::write(&binary, b"endpoints: []\n\xff\xfe").unwrap();
        let e = EndpointDirectory::load(&binary).unwrap_err().to_string();
        assert!(
            e.ends_with("not UTF-8 text (first bad byte at offset 14)"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn watcher_publishes_good_versions_and_keeps_the_last_good_one() {
        let dir = flowaudit_tests::support::TestDir::new("fa-endpoints");
        let path = dir.join("e.yaml");
        std::fs::write(&path, SAMPLE).unwrap();
        let (tx, mut rx) =
            tokio::sync::watch::channel(Arc::new(EndpointDirectory::load(&path).unwrap()));
        let stats = Arc::new(DirectoryStats::default());
        let task = tokio::spawn(watch_file(path.clone(), tx, stats.clone()));
        let counted = |stats: &DirectoryStats| {
            use std::sync::atomic::Ordering::Relaxed;
            (stats.pods.load(Relaxed), stats.errors.load(Relaxed))
        };
        // A broken version: rejected, nothing published.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        std::fs::write(&path, "endpoints: [[[").unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_millis(2500), rx.changed()).await;
        assert!(r.is_err(), "a broken file must not be published");
        assert!(matches!(
            rx.borrow().peer("10.244.1.5".parse().unwrap()),
            Peer::Pod(_)
        ));
        // An empty file (truncated for a rewrite): rejected too.
        std::fs::write(&path, "\n").unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_millis(2500), rx.changed()).await;
        assert!(r.is_err(), "an emptied file must not be published");
        assert_eq!(
            counted(&stats),
            (1, 2),
            "two versions refused, one pod in force"
        );
        // A good version with a new pod: published.
        std::fs::write(
            &path,
            format!("{SAMPLE}  - {{ips: [10.244.1.9], namespace: 99-apps, pod: postgresql-0}}\n"),
        )
        .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.changed())
            .await
            .expect("reload")
            .unwrap();
        assert!(matches!(
            rx.borrow_and_update().peer("10.244.1.9".parse().unwrap()),
            Peer::Pod(_)
        ));
        // Without pods, said so: published.
        std::fs::write(&path, "endpoints: []\n").unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.changed())
            .await
            .expect("reload")
            .unwrap();
        assert!(rx.borrow().is_empty());
        assert_eq!(counted(&stats), (0, 2));
        task.abort();
    }
}
