//! The endpoint directory from the Kubernetes API (`--kubernetes`): kube-rs
//! watchers on Pods (all namespaces) and Nodes keep a map by pod UID and by
//! node name, and publish a new [`EndpointDirectory`] once the initial lists
//! are complete, then on every change that matters to the directory (bursts
//! coalesced: at most one new directory every [`PUBLISH_INTERVAL`]).
//!
//! A pod is indexed by its UID and by its `status.podIPs` (else
//! `status.podIP`). A pod without an address yet is left out until it gets
//! one; pods that have finished (`Succeeded`, `Failed`) are left out since
//! their addresses may already belong to new pods. A `hostNetwork` pod is
//! kept by UID only, with no addresses: its addresses are the node's, and
//! indexing them would make every connection of the node look like that pod
//! (the cgroup resolver still finds local ones by UID). Nodes give their
//! `InternalIP` and `ExternalIP` addresses (peers seen as `host`).
//!
//! Errors of the API (unreachable, 403, 410 Gone, ...) are logged, retried
//! with kube's default backoff, and the last directory stays in force; a
//! watcher that re-lists swaps in the new list whole once it is complete.
//! Nothing here panics or blocks the flow pipeline, which only reads the
//! latest directory from the `watch` channel.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::{EndpointDirectory, NodeInfo, PodInfo};
use crate::flow::PodMeta;

/// At most one new directory per this interval while changes keep coming.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(200);
/// How long the first change of a burst waits for the rest of it.
const GATHER: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error(
        "--kubernetes: cannot find the Kubernetes API: neither a kubeconfig ($KUBECONFIG, else ~/.kube/config) nor an in-cluster service account ($KUBERNETES_SERVICE_HOST and /var/run/secrets/kubernetes.io/serviceaccount) is usable ({0}); run flowaudit in a pod with a service account, set KUBECONFIG, or use --endpoints FILE"
    )]
    Config(#[source] kube::config::InferConfigError),
    #[error("--kubernetes: cannot build a Kubernetes API client for {url}: {source}")]
    Client {
        url: String,
        #[source]
        source: kube::Error,
    },
}

/// A Kubernetes API client from the environment (`kube::Config::infer`):
/// the kubeconfig in `$KUBECONFIG` (else `~/.kube/config`) if there is one,
/// else the pod's service account (in-cluster). Makes no request.
pub async fn client() -> Result<Client, KubernetesError> {
    // kube's TLS is rustls; ring is the provider built in. Ignored when a
    // provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::Config::infer()
        .await
        .map_err(KubernetesError::Config)?;
    client_from_config(config)
}

/// A client of the Kubernetes API stand-in, through the kubeconfig it
/// writes, as the agent would read one (tests).
#[cfg(test)]
pub(crate) async fn standin_client(standin: &flowaudit_tests::kube_standin::KubeStandin) -> Client {
    let path = std::env::temp_dir().join(format!(
        "fa-kubeconfig-{}-{}",
        std::process::id(),
        standin.addr().port()
    ));
    standin.write_kubeconfig(&path).unwrap();
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    std::fs::remove_file(&path).ok();
    client_from_config(config).unwrap()
}

/// A client for an explicit configuration (tests, or a caller that has one).
pub fn client_from_config(config: kube::Config) -> Result<Client, KubernetesError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|source| KubernetesError::Client {
        url: url.clone(),
        source,
    })?;
    tracing::info!(%url, "Kubernetes API client configured");
    Ok(client)
}

/// Watches pods and nodes until `tx` has no receiver left, publishing each
/// new directory on `tx`; `ready` (if given) fires once the first complete
/// directory is published. Spawn it: it runs for the life of the agent.
pub async fn watch_cluster(
    client: Client,
    tx: watch::Sender<Arc<EndpointDirectory>>,
    ready: Option<oneshot::Sender<()>>,
    stats: Arc<super::DirectoryStats>,
) {
    use std::sync::atomic::Ordering;
    let pods = watcher::watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff();
    let nodes =
        watcher::watcher(Api::<Node>::all(client), watcher::Config::default()).default_backoff();
    let mut pods = std::pin::pin!(pods);
    let mut nodes = std::pin::pin!(nodes);
    let mut pod_store: Reflected<PodEntry> = Reflected::new("pods");
    let mut node_store: Reflected<NodeInfo> = Reflected::new("nodes");
    let mut ready = ready;
    let mut dirty_since: Option<Instant> = None;
    let mut last_publish: Option<Instant> = None;
    let mut published = false;
    loop {
        // Pods are needed; nodes too, unless their watch is failing (e.g.
        // no RBAC for nodes): then pods go out, node addresses are `world`.
        let can_publish = pod_store.listed && (node_store.listed || node_store.failing);
        let deadline = match (dirty_since, last_publish) {
            (Some(d), Some(l)) => (d + GATHER).max(l + PUBLISH_INTERVAL),
            (Some(d), None) => d + GATHER,
            (None, _) => Instant::now() + Duration::from_secs(3600),
        };
        tokio::select! {
            ev = pods.next() => match ev {
                Some(ev) => {
                    if pod_store.handle(ev, pod_key, pod_entry) && dirty_since.is_none() {
                        dirty_since = Some(Instant::now());
                    }
                    stats.errors.store(pod_store.errors + node_store.errors, Ordering::Relaxed);
                }
                None => return,
            },
            ev = nodes.next() => match ev {
                Some(ev) => {
                    let was_failing = node_store.failing;
                    let changed = node_store.handle(ev, node_key, node_info);
                    stats.errors.store(pod_store.errors + node_store.errors, Ordering::Relaxed);
                    // A nodes watch that starts failing may unblock the
                    // first publication.
                    if (changed || (node_store.failing && !was_failing && !published))
                        && dirty_since.is_none()
                    {
                        dirty_since = Some(Instant::now());
                    }
                }
                None => return,
            },
            _ = tokio::time::sleep_until(deadline), if dirty_since.is_some() && can_publish => {
                dirty_since = None;
                last_publish = Some(Instant::now());
                let dir = build_directory(&pod_store, &node_store);
                let pods_n = pod_store.items.len();
                let nodes_n = node_store.items.len();
                stats.pods.store(dir.len() as u64, Ordering::Relaxed);
                tx.send_replace(Arc::new(dir));
                if published {
                    tracing::debug!(pods = pods_n, nodes = nodes_n, "endpoint directory updated from the Kubernetes API");
                } else {
                    published = true;
                    tracing::info!(pods = pods_n, nodes = nodes_n, "endpoint directory listed from the Kubernetes API");
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
            }
            _ = tx.closed() => return,
        }
    }
}

/// What the directory needs of a pod, plus what orders pods that claim the
/// same address (the newest live one wins).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodEntry {
    deleting: bool,
    created: Option<k8s_openapi::jiff::Timestamp>,
    info: PodInfo,
}

fn pod_key(p: &Pod) -> Option<String> {
    p.metadata.uid.clone().filter(|u| !u.is_empty())
}

fn node_key(n: &Node) -> Option<String> {
    n.metadata.name.clone().filter(|n| !n.is_empty())
}

/// The directory's view of a pod, or None if it has no place there.
fn pod_entry(p: &Pod) -> Option<PodEntry> {
    let uid = pod_key(p)?;
    let status = p.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let spec = p.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let mut ips: Vec<IpAddr> = Vec::new();
    if !host_network && let Some(s) = status {
        let listed = s.pod_ips.iter().flatten().map(|i| i.ip.as_str());
        for ip in listed.chain(s.pod_ip.as_deref()) {
            if let Ok(ip) = ip.parse::<IpAddr>()
                && !ips.contains(&ip)
            {
                ips.push(ip);
            }
        }
    }
    if ips.is_empty() && !host_network {
        return None;
    }
    let service_account = spec
        .and_then(|s| s.service_account_name.clone().or(s.service_account.clone()))
        .unwrap_or_default();
    Some(PodEntry {
        deleting: p.metadata.deletion_timestamp.is_some(),
        created: p.metadata.creation_timestamp.as_ref().map(|t| t.0),
        info: PodInfo {
            ips,
            uid,
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            meta: Arc::new(PodMeta {
                namespace: p.metadata.namespace.as_deref().unwrap_or_default().into(),
                pod_name: p.metadata.name.as_deref().unwrap_or_default().into(),
                service_account: service_account.into(),
                labels: p.metadata.labels.clone().unwrap_or_default(),
            }),
        },
    })
}

fn node_info(n: &Node) -> Option<NodeInfo> {
    let name = node_key(n)?;
    let mut ips = Vec::new();
    for a in n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        if (a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            && let Ok(ip) = a.address.parse::<IpAddr>()
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    Some(NodeInfo { name, ips })
}

fn build_directory(pods: &Reflected<PodEntry>, nodes: &Reflected<NodeInfo>) -> EndpointDirectory {
    let mut entries: Vec<&PodEntry> = pods.items.values().collect();
    // Later entries win an address: terminating pods first, then by age.
    entries.sort_by(|a, b| {
        b.deleting
            .cmp(&a.deleting)
            .then(a.created.cmp(&b.created))
            .then(a.info.uid.cmp(&b.info.uid))
    });
    let mut node_list: Vec<NodeInfo> = nodes.items.values().cloned().collect();
    node_list.sort_by(|a, b| a.name.cmp(&b.name));
    EndpointDirectory::from_pods(
        node_list,
        entries.into_iter().map(|e| e.info.clone()).collect(),
    )
}

/// One watched collection, kept like kube's reflector store: a re-list is
/// buffered and swapped in whole when complete.
pub(crate) struct Reflected<T> {
    what: &'static str,
    pub(crate) items: HashMap<String, T>,
    relist: Option<HashMap<String, T>>,
    /// The initial list has completed at least once.
    listed: bool,
    /// The last thing the watch said was an error.
    failing: bool,
    errors: u64,
}

impl<T: PartialEq> Reflected<T> {
    pub(crate) fn new(what: &'static str) -> Self {
        Self {
            what,
            items: HashMap::new(),
            relist: None,
            listed: false,
            failing: false,
            errors: 0,
        }
    }

    /// Applies one watcher item; true if the directory changed.
    pub(crate) fn handle<K>(
        &mut self,
        ev: Result<Event<K>, watcher::Error>,
        key: impl Fn(&K) -> Option<String>,
        convert: impl Fn(&K) -> Option<T>,
    ) -> bool {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                self.errors += 1;
                self.failing = true;
                tracing::warn!(
                    resource = self.what,
                    error = %e,
                    errors = self.errors,
                    "Kubernetes watch failed; retrying with backoff, the last endpoint directory stays in force"
                );
                return false;
            }
        };
        // `Init` comes before the list call is made, so it is no sign of
        // recovery: each retry against an API that refuses would say so.
        if self.failing && !matches!(ev, Event::Init) {
            self.failing = false;
            tracing::info!(resource = self.what, "Kubernetes watch recovered");
        }
        match ev {
            Event::Init => {
                self.relist = Some(HashMap::new());
                false
            }
            Event::InitApply(obj) => {
                if let (Some(buf), Some(k), Some(v)) =
                    (self.relist.as_mut(), key(&obj), convert(&obj))
                {
                    buf.insert(k, v);
                }
                false
            }
            Event::InitDone => {
                let new = self.relist.take().unwrap_or_default();
                let changed = !self.listed || new != self.items;
                self.items = new;
                self.listed = true;
                changed
            }
            Event::Apply(obj) => {
                let Some(k) = key(&obj) else { return false };
                match convert(&obj) {
                    Some(v) => {
                        if self.items.get(&k) == Some(&v) {
                            false
                        } else {
                            self.items.insert(k, v);
                            true
                        }
                    }
                    None => self.items.remove(&k).is_some(),
                }
            }
            Event::Delete(obj) => key(&obj).is_some_and(|k| self.items.remove(&k).is_some()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::Peer;
    use flowaudit_tests::kube_standin::{KubeStandin, StandinPod};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    /// A watch that fails is failing until objects come again: the
    /// watcher's `Init`, sent before each list call, is no recovery (each
    /// retry against an API that refuses said "recovered").
    #[test]
    fn a_failing_watch_recovers_when_objects_come_not_when_it_asks_again() {
        let mut r: Reflected<String> = Reflected::new("pods");
        let key = |s: &String| Some(s.clone());
        let conv = |s: &String| Some(s.clone());
        r.handle(Err(watcher::Error::NoResourceVersion), key, conv);
        assert!(r.failing && r.errors == 1);
        r.handle(Ok(Event::Init), key, conv);
        assert!(r.failing, "asking again is not recovering");
        r.handle(Err(watcher::Error::NoResourceVersion), key, conv);
        r.handle(Ok(Event::Init), key, conv);
        r.handle(Ok(Event::InitApply("a".to_string())), key, conv);
        assert!(!r.failing, "objects came");
        assert_eq!(r.errors, 2);
        assert!(r.handle(Ok(Event::InitDone), key, conv));
        assert!(r.listed && r.items.contains_key("a"));
    }

    #[test]
    fn pods_map_to_directory_entries() {
        let base = StandinPod::new("ns", "web-1", "u-1")
            .service_account("web")
            .label("app", "web")
            .node("n1")
            .ips(&[ip("10.0.0.5"), ip("fd00::5")]);
        let e = pod_entry(&pod(base.to_json(3))).unwrap();
        assert_eq!(e.info.ips, vec![ip("10.0.0.5"), ip("fd00::5")]);
        assert_eq!(
            (
                e.info.meta.namespace.as_str(),
                e.info.meta.pod_name.as_str(),
                e.info.uid.as_str(),
                e.info.meta.service_account.as_str(),
                e.info.node.as_str()
            ),
            ("ns", "web-1", "u-1", "web", "n1")
        );
        assert_eq!(
            e.info.meta.labels.get("app").map(String::as_str),
            Some("web")
        );
        // status.podIP alone (older clusters).
        let mut v = base.to_json(3);
        v["status"].as_object_mut().unwrap().remove("podIPs");
        assert_eq!(pod_entry(&pod(v)).unwrap().info.ips, vec![ip("10.0.0.5")]);
        // No address yet: left out. Finished: left out.
        assert!(pod_entry(&pod(base.clone().ips(&[]).to_json(3))).is_none());
        assert!(pod_entry(&pod(base.clone().phase("Succeeded").to_json(3))).is_none());
        // hostNetwork: by UID, never by the node's addresses.
        let h = pod_entry(&pod(base
            .clone()
            .host_network(true)
            .ips(&[ip("172.18.0.3")])
            .to_json(3)))
        .unwrap();
        assert!(h.info.ips.is_empty());
        let mut store = Reflected::new("pods");
        store.items.insert("u-1".into(), h);
        let dir = build_directory(&store, &Reflected::new("nodes"));
        assert!(dir.pod_by_uid("u-1").is_some());
        assert_eq!(dir.peer(ip("172.18.0.3")), Peer::World);
    }

    async fn start(
        standin: &KubeStandin,
    ) -> (
        watch::Receiver<Arc<EndpointDirectory>>,
        tokio::task::JoinHandle<()>,
        Arc<crate::endpoints::DirectoryStats>,
    ) {
        let client = standin_client(standin).await;
        let (tx, rx) = watch::channel(Arc::new(EndpointDirectory::default()));
        let (ready_tx, ready_rx) = oneshot::channel();
        let stats = Arc::new(crate::endpoints::DirectoryStats::default());
        let task = tokio::spawn(watch_cluster(client, tx, Some(ready_tx), stats.clone()));
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("initial directory published within 10 s")
            .expect("watcher alive");
        (rx, task, stats)
    }

    async fn wait_for(
        rx: &mut watch::Receiver<Arc<EndpointDirectory>>,
        what: &str,
        secs: u64,
        ok: impl Fn(&EndpointDirectory) -> bool,
    ) {
        let res = tokio::time::timeout(Duration::from_secs(secs), async {
            loop {
                if ok(&rx.borrow_and_update()) {
                    return;
                }
                rx.changed().await.expect("watcher alive");
            }
        })
        .await;
        assert!(res.is_ok(), "within {secs} s: {what}");
    }

    fn pod_name(dir: &EndpointDirectory, addr: &str) -> Option<String> {
        match dir.peer(ip(addr)) {
            Peer::Pod(p) => Some(p.meta.pod_name.to_string()),
            _ => None,
        }
    }

    fn web(i: u8) -> StandinPod {
        StandinPod::new("apps", &format!("web-{i}"), &format!("uid-web-{i}"))
            .service_account("web")
            .label("app", "web")
            .ips(&[ip(&format!("10.9.0.{i}")), ip(&format!("fd00:9::{i}"))])
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lists_then_follows_adds_relabels_and_deletes() {
        let k = KubeStandin::start();
        k.add_node("n1", &[ip("192.0.2.10"), ip("2001:db8::10")]);
        k.add_pod(web(1));
        k.add_pod(web(2));
        k.add_pod(StandinPod::new("apps", "pending-0", "uid-pending"));
        k.add_pod(
            StandinPod::new("kube-system", "cilium-x", "uid-hostnet")
                .host_network(true)
                .ips(&[ip("192.0.2.10")]),
        );
        let (mut rx, task, stats) = start(&k).await;
        assert_eq!(
            stats.pods.load(std::sync::atomic::Ordering::Relaxed),
            rx.borrow().len() as u64
        );
        assert!(rx.borrow().len() >= 3);
        {
            let dir = rx.borrow_and_update().clone();
            assert_eq!(pod_name(&dir, "10.9.0.1").as_deref(), Some("web-1"));
            assert_eq!(pod_name(&dir, "fd00:9::2").as_deref(), Some("web-2"));
            assert_eq!(dir.peer(ip("192.0.2.10")), Peer::Host("n1"));
            assert_eq!(dir.peer(ip("2001:db8::10")), Peer::Host("n1"));
            assert!(dir.pod_by_uid("uid-hostnet").is_some());
            assert!(dir.pod_by_uid("uid-pending").is_none());
            let p = dir.pod_by_uid("uid-web-1").unwrap();
            assert_eq!(p.meta.service_account, "web");
            assert_eq!(p.node, NODE);
        }
        // Added.
        k.add_pod(web(3));
        wait_for(&mut rx, "web-3 appears", 10, |d| {
            pod_name(d, "10.9.0.3").is_some()
        })
        .await;
        // The pending pod gets its address.
        k.update_pod("uid-pending", |p| p.ips = vec![ip("10.9.0.50")]);
        wait_for(&mut rx, "pending-0 gets its address", 10, |d| {
            pod_name(d, "10.9.0.50").as_deref() == Some("pending-0")
        })
        .await;
        // Relabelled.
        k.update_pod_labels("uid-web-1", &[("app", "web"), ("track", "canary")]);
        wait_for(&mut rx, "web-1 relabelled", 10, |d| {
            d.pod_by_uid("uid-web-1")
                .is_some_and(|p| p.meta.labels.get("track").map(String::as_str) == Some("canary"))
        })
        .await;
        // Deleted.
        k.delete_pod("uid-web-2");
        wait_for(&mut rx, "web-2 gone", 10, |d| {
            pod_name(d, "10.9.0.2").is_none() && d.pod_by_uid("uid-web-2").is_none()
        })
        .await;
        assert_eq!(rx.borrow().peer(ip("10.9.0.2")), Peer::World);
        // A burst ends up complete.
        for i in 10..60 {
            k.add_pod(web(i));
        }
        wait_for(&mut rx, "the burst is in", 10, |d| {
            (10..60).all(|i| pod_name(d, &format!("10.9.0.{i}")).is_some())
        })
        .await;
        task.abort();
    }

    const NODE: &str = flowaudit_tests::scenario::NODE_NAME;

    /// How many times the pods were listed (not watched).
    fn pod_lists(k: &KubeStandin) -> usize {
        k.requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/pods") && !r.contains("watch=true"))
            .count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn survives_the_api_going_away_and_coming_back() {
        let k = KubeStandin::start();
        k.set_bookmark_interval(Duration::from_millis(300));
        k.add_node("n1", &[ip("192.0.2.10")]);
        k.add_pod(web(1));
        k.add_pod(web(2));
        let (mut rx, task, stats) = start(&k).await;
        assert_eq!(pod_name(&rx.borrow(), "10.9.0.1").as_deref(), Some("web-1"));
        let errors = || stats.errors.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(errors(), 0);

        // Down: open watches are cut, reconnects refused. The last
        // directory stays in force.
        k.stop();
        k.delete_pod("uid-web-1");
        k.add_pod(web(3));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        {
            let dir = rx.borrow();
            assert_eq!(pod_name(&dir, "10.9.0.1").as_deref(), Some("web-1"));
            assert_eq!(pod_name(&dir, "10.9.0.2").as_deref(), Some("web-2"));
        }
        assert!(
            errors() > 0,
            "the failed watch calls are counted for /metrics"
        );
        // Back on the same port: the watch resumes from where it was and
        // gets what happened meanwhile.
        k.restart();
        wait_for(&mut rx, "changes made while the API was down", 45, |d| {
            pod_name(d, "10.9.0.1").is_none() && pod_name(d, "10.9.0.3").is_some()
        })
        .await;

        assert_eq!(
            pod_lists(&k),
            1,
            "resumed without a new list: {:#?}",
            k.requests()
        );

        // Down again, and the history is compacted meanwhile: resuming gets
        // 410 Gone, the watcher re-lists, and the re-list replaces the
        // directory whole (a pod deleted meanwhile disappears).
        k.stop();
        k.delete_pod("uid-web-2");
        k.add_pod(web(4));
        k.expire_history();
        k.restart();
        wait_for(&mut rx, "the re-list after 410", 45, |d| {
            pod_name(d, "10.9.0.2").is_none()
                && pod_name(d, "10.9.0.4").is_some()
                && pod_name(d, "10.9.0.3").is_some()
        })
        .await;
        assert!(
            pod_lists(&k) >= 2,
            "re-listed after 410: {:#?}",
            k.requests()
        );
        assert_eq!(rx.borrow().peer(ip("192.0.2.10")), Peer::Host("n1"));
        assert!(!task.is_finished(), "the watcher keeps running");
        // And follows changes again.
        k.update_pod_labels("uid-web-3", &[("app", "web-v2")]);
        wait_for(&mut rx, "relabel after recovery", 20, |d| {
            d.pod_by_uid("uid-web-3")
                .is_some_and(|p| p.meta.labels.get("app").map(String::as_str) == Some("web-v2"))
        })
        .await;
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stops_when_the_pipeline_is_gone() {
        let k = KubeStandin::start();
        k.add_node("n1", &[ip("192.0.2.10")]);
        let (rx, task, _) = start(&k).await;
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("watch_cluster returns once nobody reads the directory")
            .unwrap();
    }
}
