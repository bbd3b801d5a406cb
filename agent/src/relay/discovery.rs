//! Where the agents are: the DaemonSet's pods, watched through the
//! Kubernetes API (`--kubernetes`). In: pods in `--agent-namespace` that
//! match `--agent-selector` (asked of the API as a label selector, and
//! checked again here). Out: the peer table, one node per pod
//! (`spec.nodeName`, `status.podIP:--agent-port`), updated as pods come,
//! change address and go. A pod that is not running or has no address yet
//! is not a peer. When the watch fails, the last known peers stay.

use std::sync::Arc;

use clap::Args;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;

use super::peers::Peers;
use crate::endpoints::kubernetes::Reflected;
use crate::export::filter::LabelSelector;

#[derive(Debug, Clone, Args)]
pub struct KubernetesArgs {
    /// Find the agents through the Kubernetes API: the pods of the
    /// DaemonSet (on by default inside a cluster when --peers is not given).
    #[arg(long, env = "FLOWAUDIT_KUBERNETES")]
    pub kubernetes: bool,
    /// The agents' namespace (default: $POD_NAMESPACE, else flowaudit).
    #[arg(long, env = "FLOWAUDIT_AGENT_NAMESPACE", value_name = "NS")]
    pub agent_namespace: Option<String>,
    /// Label selector of the agents' pods.
    #[arg(
        long,
        env = "FLOWAUDIT_AGENT_SELECTOR",
        value_name = "SELECTOR",
        default_value = "app.kubernetes.io/name=flowaudit,app.kubernetes.io/component=agent"
    )]
    pub agent_selector: String,
    /// The agents' TCP gRPC port (their --grpc-addr).
    #[arg(long, env = "FLOWAUDIT_AGENT_PORT", value_name = "PORT", default_value_t = super::DEFAULT_AGENT_PORT)]
    pub agent_port: u16,
}

impl KubernetesArgs {
    /// On when asked, or inside a cluster without --peers.
    pub fn enabled(&self, have_peers: bool) -> bool {
        self.kubernetes || (!have_peers && std::env::var_os("KUBERNETES_SERVICE_HOST").is_some())
    }

    fn namespace(&self) -> String {
        self.agent_namespace
            .clone()
            .or_else(|| {
                std::env::var("POD_NAMESPACE")
                    .ok()
                    .filter(|n| !n.is_empty())
            })
            .unwrap_or_else(|| "flowaudit".to_owned())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("--agent-selector: {0}")]
    Selector(String),
    #[error(transparent)]
    Kubernetes(#[from] crate::endpoints::kubernetes::KubernetesError),
}

/// A peer: (node name, HOST:PORT).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Agent {
    node: String,
    address: String,
}

fn agent_of(p: &Pod, selector: &LabelSelector, port: u16) -> Option<Agent> {
    let labels = p.metadata.labels.clone().unwrap_or_default();
    if !selector.matches(&labels) || p.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = p.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ip: std::net::IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    let node = p.spec.as_ref()?.node_name.clone()?;
    let address = match ip {
        std::net::IpAddr::V4(v4) => format!("{v4}:{port}"),
        std::net::IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    };
    Some(Agent { node, address })
}

fn pod_key(p: &Pod) -> Option<String> {
    p.metadata.uid.clone()
}

/// Starts the watch (the client is made now, so a missing API fails the start).
pub async fn spawn(args: &KubernetesArgs, peers: Arc<Peers>) -> Result<(), DiscoveryError> {
    let selector = LabelSelector::parse(&args.agent_selector)
        .map_err(|e| DiscoveryError::Selector(e.to_string()))?;
    let client = crate::endpoints::kubernetes::client().await?;
    let namespace = args.namespace();
    tracing::info!(%namespace, selector = %args.agent_selector, "finding the agents through the Kubernetes API");
    tokio::spawn(watch(
        Api::<Pod>::namespaced(client, &namespace),
        args.agent_selector.clone(),
        selector,
        args.agent_port,
        peers,
    ));
    Ok(())
}

/// Keeps the peers it found equal to the agents' pods, keyed by node; the
/// peers `--peers` names are not its own and stay.
pub async fn watch(
    api: Api<Pod>,
    selector_text: String,
    selector: LabelSelector,
    port: u16,
    peers: Arc<Peers>,
) {
    let config = watcher::Config::default().labels(&selector_text);
    let events = watcher::watcher(api, config).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut pods: Reflected<Agent> = Reflected::new("agent pods");
    // The nodes this watch made peers of.
    let mut found: std::collections::BTreeSet<String> = Default::default();
    while let Some(ev) = events.next().await {
        if !pods.handle(ev, pod_key, |p| agent_of(p, &selector, port)) {
            continue;
        }
        // One agent per node; a node's newest pod wins while an old one terminates.
        let mut wanted: std::collections::BTreeMap<&str, &str> = Default::default();
        for a in pods.items.values() {
            wanted.insert(&a.node, &a.address);
        }
        for key in &found {
            if !wanted.contains_key(key.as_str()) {
                peers.remove(key);
            }
        }
        found = wanted.keys().map(|k| (*k).to_owned()).collect();
        for (node, address) in wanted {
            peers.upsert(node, Some(node), address);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::hub::Hub;
    use crate::export::mtls::ClientTls;
    use crate::relay::peers::{NodeState, PeerContext, RelayStats};
    use flowaudit_tests::kube_standin::{KubeStandin, StandinPod};
    use std::time::Duration;

    fn agent_pod(name: &str, node: &str, ip: &str) -> StandinPod {
        StandinPod::new("flowaudit", name, &format!("uid-{name}"))
            .label("app.kubernetes.io/name", "flowaudit")
            .label("app.kubernetes.io/component", "agent")
            .node(node)
            .ips(&[ip.parse().unwrap()])
    }

    async fn wait_for(
        peers: &Peers,
        what: &str,
        ok: impl Fn(&[super::super::peers::PeerInfo]) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let snap = peers.snapshot();
            if ok(&snap) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "within 10 s: {what}; peers: {:?}",
                snap.iter()
                    .map(|p| (&p.name, &p.address, p.state))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_agents_running_pods_are_the_peers_and_a_deleted_one_is_gone() {
        let k = KubeStandin::start();
        k.add_pod(agent_pod("flowaudit-a", "worker", "127.0.0.2"));
        // Not agents: the relay's own pod, a pod elsewhere, a pending agent.
        k.add_pod(
            StandinPod::new("flowaudit", "flowaudit-relay-0", "uid-relay")
                .label("app.kubernetes.io/name", "flowaudit")
                .label("app.kubernetes.io/component", "relay")
                .ips(&["127.0.0.9".parse().unwrap()]),
        );
        k.add_pod(agent_pod("flowaudit-pending", "worker3", "127.0.0.4").phase("Pending"));
        let client = crate::endpoints::kubernetes::standin_client(&k).await;
        let hub = Arc::new(Hub::new(
            16,
            16,
            4,
            Arc::new(crate::relay::metrics::StreamCounters::default()),
        ));
        let peers = Arc::new(Peers::new(PeerContext {
            tls: ClientTls::default(),
            flows: tokio::sync::mpsc::channel(16).0,
            raw: hub.clone(),
            joined: hub,
            history: 0,
            stats: Arc::new(RelayStats::default()),
        }));
        let text = "app.kubernetes.io/name=flowaudit,app.kubernetes.io/component=agent";
        let selector = LabelSelector::parse(text).unwrap();
        // A peer named by --peers: not the watch's to remove.
        peers.upsert("127.0.0.8:4244", None, "127.0.0.8:4244");
        let task = tokio::spawn(watch(
            Api::<Pod>::namespaced(client, "flowaudit"),
            text.to_owned(),
            selector,
            4244,
            peers.clone(),
        ));
        let static_peer = |p: &[super::super::peers::PeerInfo]| {
            p.iter()
                .any(|x| x.address == "127.0.0.8:4244" && x.state != NodeState::Gone)
        };
        wait_for(&peers, "the running agent and the --peers one", |p| {
            p.len() == 2
                && p.iter()
                    .any(|x| x.name == "worker" && x.address == "127.0.0.2:4244")
                && static_peer(p)
        })
        .await;
        // A second node's agent comes; the first is recreated elsewhere.
        k.add_pod(agent_pod("flowaudit-b", "worker2", "127.0.0.3"));
        k.delete_pod("uid-flowaudit-a");
        k.add_pod(agent_pod("flowaudit-a2", "worker", "127.0.0.5"));
        wait_for(&peers, "worker moved to its new pod, worker2 added", |p| {
            p.len() == 3
                && p.iter().any(|x| {
                    x.name == "worker"
                        && x.address == "127.0.0.5:4244"
                        && x.state != NodeState::Gone
                })
                && p.iter()
                    .any(|x| x.name == "worker2" && x.address == "127.0.0.3:4244")
        })
        .await;
        k.delete_pod("uid-flowaudit-b");
        wait_for(
            &peers,
            "worker2's agent is gone, the --peers one stays",
            |p| {
                p.iter()
                    .any(|x| x.name == "worker2" && x.state == NodeState::Gone)
                    && p.iter()
                        .any(|x| x.name == "worker" && x.state != NodeState::Gone)
                    && static_peer(p)
            },
        )
        .await;
        task.abort();
    }
}
