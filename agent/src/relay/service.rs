//! The relay's `flowaudit.v1.FlowAudit`: `GetFlows` from the merged hub
//! (or, with `join`, the joined one), every filter applied as on an agent;
//! `ServerStatus` with `relay` set and each node's state, counts and own
//! status (asked of every connected node concurrently, 2 s at most).

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use tokio_stream::StreamExt as _;

use super::RelayState;
use super::peers::{NodeState, notice_of};
use crate::export::grpc::{FlowResponseStream, flow_stream, system_time_to_proto};
use crate::export::proto;
use crate::export::proto::flow_audit_server::FlowAudit;

/// How long `ServerStatus` waits for a node's own status.
const NODE_STATUS_TIMEOUT: Duration = Duration::from_secs(2);

pub struct RelayService {
    state: Arc<RelayState>,
}

impl RelayService {
    pub fn new(state: Arc<RelayState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl FlowAudit for RelayService {
    type GetFlowsStream = FlowResponseStream;

    async fn get_flows(
        &self,
        request: Request<proto::GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let req = request.into_inner();
        let hub = if req.join {
            &self.state.joined
        } else {
            &self.state.raw
        };
        let follow = req.follow;
        let stream = flow_stream(hub, req, &self.state.name)?;
        if !follow {
            return Ok(Response::new(stream));
        }
        // A follower learns of the nodes that are down already, not only
        // of those that go down after it came (notices are sent on a
        // change): else a relay whose nodes are all unreachable streams
        // nothing, saying nothing.
        let down: Vec<Result<proto::GetFlowsResponse, Status>> = self
            .state
            .peers
            .snapshot()
            .iter()
            .filter(|p| matches!(p.state, NodeState::Unavailable | NodeState::Gone))
            .map(|p| Ok(notice_of(p)))
            .collect();
        Ok(Response::new(Box::pin(
            tokio_stream::iter(down).chain(stream),
        )))
    }

    async fn server_status(
        &self,
        _request: Request<proto::ServerStatusRequest>,
    ) -> Result<Response<proto::ServerStatusResponse>, Status> {
        Ok(Response::new(status_of(&self.state).await))
    }
}

pub async fn status_of(state: &RelayState) -> proto::ServerStatusResponse {
    let peers = state.peers.snapshot();
    let mut asks = tokio::task::JoinSet::new();
    for (i, p) in peers.iter().enumerate() {
        if let Some(mut client) = p.client.clone() {
            asks.spawn(async move {
                let answer = tokio::time::timeout(
                    NODE_STATUS_TIMEOUT,
                    client.server_status(proto::ServerStatusRequest {}),
                )
                .await;
                (i, answer.ok().and_then(|r| r.ok()).map(|r| r.into_inner()))
            });
        }
    }
    let mut own = vec![None; peers.len()];
    while let Some(Ok((i, status))) = asks.join_next().await {
        own[i] = status;
    }
    let nodes: Vec<proto::NodeStatus> = peers
        .into_iter()
        .zip(own)
        .map(|(p, status)| proto::NodeStatus {
            node_name: p.name,
            address: p.address,
            state: p.state as i32,
            detail: p.detail,
            state_since: Some(system_time_to_proto(p.since)),
            flows: p.flows,
            lost: p.lost,
            connects: p.connects,
            status,
        })
        .collect();
    let connected = nodes
        .iter()
        .filter(|n| {
            matches!(
                proto::NodeState::try_from(n.state),
                Ok(proto::NodeState::Connected | proto::NodeState::Back)
            )
        })
        .count();
    let merged = state
        .stats
        .merged
        .load(std::sync::atomic::Ordering::Relaxed);
    proto::ServerStatusResponse {
        node_name: state.name.clone(),
        version: state.version.to_owned(),
        started: Some(system_time_to_proto(state.started)),
        uptime_seconds: state.started.elapsed().unwrap_or_default().as_secs(),
        flows_seen: merged,
        flows_buffered: state.raw.buffered() as u64,
        flow_buffer_capacity: state.raw.capacity() as u64,
        subscribers: u32::try_from(state.raw.subscribers() + state.joined.subscribers())
            .unwrap_or(u32::MAX),
        stream_dropped: state.raw.dropped() + state.joined.dropped(),
        kernel_events_lost: nodes.iter().map(|n| n.lost).sum(),
        ready: true,
        not_ready_reason: if connected == 0 {
            "no node connected".to_owned()
        } else {
            String::new()
        },
        relay: true,
        nodes,
        ..Default::default()
    }
}
