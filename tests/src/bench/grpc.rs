//! A minimal client of the agent's `flowaudit.v1.FlowAudit/GetFlows` stream
//! for the event-delay measurement. The messages are the subset of
//! `proto/flowaudit/v1/flowaudit.proto` the bench reads, declared by hand
//! with the proto's field numbers (prost skips the fields not declared), so
//! this crate needs no code generation from the agent's proto.

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use anyhow::{Context, Result, anyhow};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetFlowsRequest {
    #[prost(uint64, tag = "1")]
    pub number: u64,
    #[prost(bool, tag = "2")]
    pub follow: bool,
    #[prost(message, repeated, tag = "4")]
    pub allow: Vec<FlowFilter>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FlowFilter {
    /// Destination (server) port.
    #[prost(uint32, repeated, tag = "12")]
    pub port: Vec<u32>,
    /// `EventKind` values.
    #[prost(int32, repeated, tag = "13")]
    pub event: Vec<i32>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetFlowsResponse {
    #[prost(oneof = "Response", tags = "1, 2")]
    pub response: Option<Response>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Response {
    #[prost(message, tag = "1")]
    Flow(Flow),
    #[prost(message, tag = "2")]
    LostEvents(LostEvents),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LostEvents {
    #[prost(int32, tag = "1")]
    pub source: i32,
    #[prost(uint64, tag = "2")]
    pub count: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Flow {
    #[prost(int32, tag = "3")]
    pub event: i32,
    #[prost(message, optional, tag = "7")]
    pub l4: Option<L4>,
    #[prost(int32, tag = "10")]
    pub direction: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct L4 {
    #[prost(string, tag = "2")]
    pub source_ip: String,
    #[prost(uint32, tag = "3")]
    pub source_port: u32,
    #[prost(string, tag = "4")]
    pub destination_ip: String,
    #[prost(uint32, tag = "5")]
    pub destination_port: u32,
}

pub const EVENT_KIND_CONNECT: i32 = 1;
pub const DIRECTION_EGRESS: i32 = 1;

/// Dials the agent's Unix socket whatever the URI says.
#[derive(Clone)]
struct UnixConnector(PathBuf);

type Dialing = Pin<
    Box<
        dyn Future<Output = std::io::Result<hyper_util::rt::TokioIo<tokio::net::UnixStream>>>
            + Send,
    >,
>;

impl tonic::codegen::Service<Uri> for UnixConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = Dialing;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move {
            let s = tokio::net::UnixStream::connect(path).await?;
            Ok(hyper_util::rt::TokioIo::new(s))
        })
    }
}

/// Connects to `unix:///path` or `HOST:PORT`.
pub async fn channel(addr: &str) -> Result<Channel> {
    if let Some(path) = addr.strip_prefix("unix://") {
        // The URI is required by the API but unused: the connector dials the socket.
        Endpoint::from_static("http://localhost")
            .connect_with_connector(UnixConnector(PathBuf::from(path)))
            .await
            .with_context(|| format!("connect to the agent's gRPC socket {addr}"))
    } else {
        Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await
            .with_context(|| format!("connect to the agent's gRPC address {addr}"))
    }
}

/// Follows CONNECT events to `port` and calls `on_flow` with each one's
/// client (source) address as it arrives; returns when `on_flow` says stop
/// or the stream ends. Lost-event notices are counted into `lost`.
pub async fn follow_connects(
    addr: &str,
    port: u16,
    mut on_flow: impl FnMut(Ipv4Addr, u16, i32) -> bool,
    lost: &mut u64,
    subscribed: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let mut grpc = tonic::client::Grpc::new(channel(addr).await?);
    grpc.ready()
        .await
        .map_err(|e| anyhow!("gRPC channel to {addr} not ready: {e}"))?;
    let request = GetFlowsRequest {
        number: 0,
        follow: true,
        allow: vec![FlowFilter {
            port: vec![u32::from(port)],
            event: vec![EVENT_KIND_CONNECT],
        }],
    };
    let codec = tonic_prost::ProstCodec::<GetFlowsRequest, GetFlowsResponse>::default();
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(request),
            PathAndQuery::from_static("/flowaudit.v1.FlowAudit/GetFlows"),
            codec,
        )
        .await
        .map_err(|e| anyhow!("GetFlows on {addr}: {e}"))?
        .into_inner();
    let _ = subscribed.send(());
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|e| anyhow!("GetFlows stream from {addr}: {e}"))?
    {
        match msg.response {
            Some(Response::Flow(f)) => {
                let Some(l4) = f.l4 else { continue };
                let Ok(ip) = l4.source_ip.parse::<Ipv4Addr>() else {
                    continue;
                };
                if !on_flow(ip, l4.source_port as u16, f.direction) {
                    return Ok(());
                }
            }
            Some(Response::LostEvents(l)) => *lost += l.count,
            None => {}
        }
    }
    Ok(())
}
