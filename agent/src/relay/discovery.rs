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
use crate::export::hub::LabelSelector;

#[derive(Debug, Clone, Args)]
pub struct KubernetesArgs {
    /// Find the agents through the Kubernetes API: the pods of the
    /// DaemonSet (on by default inside a cluster when --peers is not given).
    #[arg(long)]
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

/// Keeps the peer table equal to the agents' pods, keyed by node.
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
    while let Some(ev) = events.next().await {
        if !pods.handle(ev, pod_key, |p| agent_of(p, &selector, port)) {
            continue;
        }
        // One agent per node; a node's newest pod wins while an old one terminates.
        let mut wanted: std::collections::BTreeMap<&str, &str> = Default::default();
        for a in pods.items.values() {
            wanted.insert(&a.node, &a.address);
        }
        for key in peers.keys() {
            if !wanted.contains_key(key.as_str()) {
                peers.remove(&key);
            }
        }
        for (node, address) in wanted {
            peers.upsert(node, Some(node), address);
        }
    }
}
