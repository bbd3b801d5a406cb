//! The nodes the relay reads from: one task per node's agent, which dials
//! its gRPC (TCP, mTLS with `--allow-agent`), follows its `GetFlows` and
//! hands each flow to the merger. In: peers added and removed by discovery
//! (`--peers` or the agents' pods). Out: flows (to the merger's channel),
//! node status notices and the node's own losses (to every subscriber of
//! the relay), and the table `ServerStatus` and the metrics read.
//!
//! A node that cannot be reached, or whose stream breaks, is UNAVAILABLE
//! (said once) and retried with backoff; when it answers again it is BACK
//! and its flows resume after the last one received (`since`), so what it
//! buffered meanwhile is not lost. Each node has its own task: a slow or
//! dead node holds up no other.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::export::hub::Hub;
use crate::export::mtls::ClientTls;
use crate::export::proto;
use crate::export::proto::flow_audit_client::FlowAuditClient;
use crate::export::proto::get_flows_response::Response;
use crate::export::{convert, grpc};
use crate::flow::FlowEvent;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Dialing, the TLS handshake and the first answers.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a node that went away stays listed (as GONE).
const GONE_KEPT: Duration = Duration::from_secs(600);

pub use proto::NodeState;

/// One node as the relay sees it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The node's name: from discovery, else what its agent says, else the address.
    pub name: String,
    pub address: String,
    pub state: NodeState,
    pub detail: String,
    pub since: SystemTime,
    pub flows: u64,
    pub lost: u64,
    pub connects: u64,
    /// While connected: for `ServerStatus`.
    pub client: Option<FlowAuditClient<Channel>>,
}

impl PeerInfo {
    pub fn state_name(&self) -> &'static str {
        state_name(self.state)
    }
}

pub fn state_name(s: NodeState) -> &'static str {
    match s {
        NodeState::Connected => "connected",
        NodeState::Unavailable => "unavailable",
        NodeState::Gone => "gone",
        NodeState::Back => "back",
        NodeState::Connecting => "connecting",
        NodeState::Unspecified => "unknown",
    }
}

/// What the relay's stages count, read by its metrics and status.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub merged: AtomicU64,
    pub joined: AtomicU64,
    pub alone: AtomicU64,
    pub out_of_order: AtomicU64,
    pub malformed: AtomicU64,
}

/// What every peer task shares.
pub struct PeerContext {
    pub tls: ClientTls,
    pub flows: mpsc::Sender<Arc<FlowEvent>>,
    pub raw: Arc<Hub>,
    pub joined: Arc<Hub>,
    /// Flows asked of a node at the first connection (its buffer's last N).
    pub history: u64,
    pub stats: Arc<RelayStats>,
}

impl PeerContext {
    /// To every subscriber, joined or not.
    fn notify(&self, response: proto::GetFlowsResponse) {
        self.raw.notice(response.clone());
        self.joined.notice(response);
    }
}

struct Slot {
    info: Arc<Mutex<PeerInfo>>,
    task: Option<tokio::task::AbortHandle>,
}

/// The peer table, keyed by node name (Kubernetes) or address (`--peers`).
pub struct Peers {
    table: Mutex<BTreeMap<String, Slot>>,
    ctx: Arc<PeerContext>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Peers {
    pub fn new(ctx: PeerContext) -> Self {
        Self {
            table: Mutex::new(BTreeMap::new()),
            ctx: Arc::new(ctx),
        }
    }

    /// Adds a node, or points a known one at a new address (a recreated
    /// agent pod). A node listed as GONE comes back.
    pub fn upsert(&self, key: &str, name: Option<&str>, address: &str) {
        let mut table = lock(&self.table);
        if let Some(slot) = table.get(key) {
            let info = lock(&slot.info);
            if info.address == address && info.state != NodeState::Gone {
                return;
            }
        }
        if let Some(old) = table.remove(key)
            && let Some(task) = old.task
        {
            task.abort();
        }
        let info = Arc::new(Mutex::new(PeerInfo {
            name: name.unwrap_or(address).to_owned(),
            address: address.to_owned(),
            state: NodeState::Connecting,
            detail: "not connected yet".into(),
            since: SystemTime::now(),
            flows: 0,
            lost: 0,
            connects: 0,
            client: None,
        }));
        let task = tokio::spawn(run(self.ctx.clone(), info.clone(), name.is_some()));
        table.insert(
            key.to_owned(),
            Slot {
                info,
                task: Some(task.abort_handle()),
            },
        );
        // Forget nodes gone long ago.
        table.retain(|_, slot| {
            let info = lock(&slot.info);
            info.state != NodeState::Gone || info.since.elapsed().unwrap_or_default() < GONE_KEPT
        });
    }

    /// The node left the cluster: stop reading it, tell the subscribers.
    pub fn remove(&self, key: &str) {
        let mut table = lock(&self.table);
        let Some(slot) = table.get_mut(key) else {
            return;
        };
        if let Some(task) = slot.task.take() {
            task.abort();
        }
        let mut info = lock(&slot.info);
        if info.state == NodeState::Gone {
            return;
        }
        info.client = None;
        let message = "its agent pod is gone: no longer read".to_owned();
        self.ctx
            .notify(set_state(&mut info, NodeState::Gone, message));
    }

    pub fn keys(&self) -> Vec<String> {
        lock(&self.table).keys().cloned().collect()
    }

    pub fn snapshot(&self) -> Vec<PeerInfo> {
        lock(&self.table)
            .values()
            .map(|s| lock(&s.info).clone())
            .collect()
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        for slot in lock(&self.table).values_mut() {
            if let Some(task) = slot.task.take() {
                task.abort();
            }
        }
    }
}

/// Changes the state and makes the notice that tells it.
fn set_state(info: &mut PeerInfo, state: NodeState, detail: String) -> proto::GetFlowsResponse {
    info.state = state;
    info.detail = detail;
    info.since = SystemTime::now();
    match state {
        NodeState::Unavailable | NodeState::Gone => {
            tracing::warn!(node = %info.name, address = %info.address, state = state_name(state), reason = %info.detail, "node stream");
        }
        _ => {
            tracing::info!(node = %info.name, address = %info.address, state = state_name(state), "node stream");
        }
    }
    notice_of(info)
}

/// The node status notice of a node as it is now.
pub fn notice_of(info: &PeerInfo) -> proto::GetFlowsResponse {
    proto::GetFlowsResponse {
        node_name: info.name.clone(),
        response: Some(Response::NodeStatus(proto::NodeStatusEvent {
            state: info.state as i32,
            node_name: info.name.clone(),
            address: info.address.clone(),
            message: info.detail.clone(),
        })),
    }
}

/// 1 ns after `t`: where a resumed stream starts, so nothing repeats.
fn after(t: prost_types::Timestamp) -> prost_types::Timestamp {
    if t.nanos < 999_999_999 {
        prost_types::Timestamp {
            seconds: t.seconds,
            nanos: t.nanos + 1,
        }
    } else {
        prost_types::Timestamp {
            seconds: t.seconds + 1,
            nanos: 0,
        }
    }
}

fn now_timestamp() -> prost_types::Timestamp {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

type Connected = (
    FlowAuditClient<Channel>,
    String,
    tonic::Streaming<proto::GetFlowsResponse>,
);

async fn connect(
    ctx: &PeerContext,
    address: &str,
    request: proto::GetFlowsRequest,
) -> Result<Connected, String> {
    let attempt = async {
        let mut client = grpc::connect_tls(address, &ctx.tls)
            .await
            .map_err(|e| e.to_string())?;
        let status = client
            .server_status(proto::ServerStatusRequest {})
            .await
            .map_err(|s| format!("ServerStatus failed: {}", s.message()))?
            .into_inner();
        if status.relay {
            return Err(format!(
                "{address} is a relay, not an agent: --peers and discovery must name agents"
            ));
        }
        let stream = client
            .get_flows(request)
            .await
            .map_err(|s| format!("GetFlows failed: {}", s.message()))?
            .into_inner();
        Ok((client, status.node_name, stream))
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()))?
}

/// One node's task: connect, follow, and on any break retry and resume.
async fn run(ctx: Arc<PeerContext>, info: Arc<Mutex<PeerInfo>>, named: bool) {
    let mut since: Option<prost_types::Timestamp> = None;
    let mut first = true;
    let mut backoff = crate::runtime::Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    loop {
        let address = lock(&info).address.clone();
        let request = proto::GetFlowsRequest {
            number: if first { ctx.history } else { 0 },
            follow: true,
            since,
            ..Default::default()
        };
        let (client, agent_name, mut stream) = match connect(&ctx, &address, request).await {
            Ok(c) => c,
            Err(reason) => {
                {
                    let mut i = lock(&info);
                    if i.state != NodeState::Unavailable {
                        let notice = set_state(&mut i, NodeState::Unavailable, reason);
                        drop(i);
                        ctx.notify(notice);
                    } else {
                        i.detail = reason;
                    }
                }
                tokio::time::sleep(backoff.next(None)).await;
                continue;
            }
        };
        let connected_at = tokio::time::Instant::now();
        let name = {
            let mut i = lock(&info);
            if !named && !agent_name.is_empty() {
                i.name = agent_name;
            }
            i.client = Some(client);
            i.connects += 1;
            let state = if first {
                NodeState::Connected
            } else {
                NodeState::Back
            };
            let how = if first {
                format!("following its flows (the last {} first)", ctx.history)
            } else {
                "resumed after the last flow received".to_owned()
            };
            let notice = set_state(&mut i, state, how);
            let name = i.name.clone();
            drop(i);
            ctx.notify(notice);
            name
        };
        first = false;
        let node: crate::flow::ArcStr = name.as_str().into();
        let reason = loop {
            match stream.next().await {
                Some(Ok(r)) => match r.response {
                    Some(Response::Flow(f)) => {
                        if let Some(t) = f.time {
                            since = Some(after(t));
                        }
                        match convert::flow_from_proto(f) {
                            Ok(mut flow) => {
                                if flow.node_name.is_empty() {
                                    flow.node_name = node.clone();
                                }
                                lock(&info).flows += 1;
                                if ctx.flows.send(Arc::new(flow)).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                ctx.stats.malformed.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(node = %name, error = %e, "skipping a malformed flow");
                            }
                        }
                    }
                    Some(Response::LostEvents(mut l)) => {
                        lock(&info).lost += l.count;
                        // Whose loss: the relay's clients read many nodes.
                        l.message = format!("node {name}: {}", l.message);
                        ctx.notify(proto::GetFlowsResponse {
                            node_name: name.clone(),
                            response: Some(Response::LostEvents(l)),
                        });
                    }
                    // A relay in front of relays: pass it on.
                    Some(Response::NodeStatus(n)) => ctx.notify(proto::GetFlowsResponse {
                        node_name: r.node_name,
                        response: Some(Response::NodeStatus(n)),
                    }),
                    None => {}
                },
                // A rollout or a drain: the agent says why, nothing broke.
                Some(Err(status)) if crate::export::grpc::is_stopping(&status) => {
                    break status.message().to_owned();
                }
                Some(Err(status)) => break format!("the stream broke: {}", status.message()),
                None => break "the agent ended the stream".to_owned(),
            }
        };
        // Nothing received yet: resume from when it broke.
        since = since.or_else(|| Some(now_timestamp()));
        {
            let mut i = lock(&info);
            i.client = None;
            let notice = set_state(&mut i, NodeState::Unavailable, reason);
            drop(i);
            ctx.notify(notice);
        }
        // An agent that ends each stream at once is not redialled at the
        // shortest wait for ever.
        tokio::time::sleep(backoff.next(Some(connected_at.elapsed()))).await;
    }
}
