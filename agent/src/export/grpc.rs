//! The gRPC side: `flowaudit.v1.FlowAudit` served on every `--grpc-addr`
//! (a Unix socket by default, its connections through [`super::h2_authority`]
//! so stock clients work; TCP on request) with server reflection, the
//! client connection used by `observe` and `status`. Flows become `Flow`
//! messages through [`super::convert`].

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, UdsConnectInfo};
use tonic::transport::{Channel, Endpoint as TonicEndpoint, Server};
use tonic::{Request, Response, Status};

use super::convert;
use super::filter::FilterSet;
use super::h2_authority::AuthorityFix;
use super::hub::{Hub, HubError, Item, LostSource, Subscribe};
use super::linger::{LINGER, Lingering, Lingers};
use super::mtls::{ClientTls, ServerTls};
use super::proto;
use super::proto::flow_audit_client::FlowAuditClient;
use super::proto::flow_audit_server::{FlowAudit, FlowAuditServer};
use super::state::AgentState;
use flowaudit_common::LossPlace;

/// The default `--grpc-addr` (and `--server` of `observe` and `status`).
pub const DEFAULT_ADDR: &str = "unix:///var/run/flowaudit/flowaudit.sock";

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// The address, and what is wrong with it.
    #[error(
        "invalid gRPC address `{0}`: {1}; expected unix:///path/to.sock or HOST:PORT (e.g. 127.0.0.1:4244, [::1]:4244)"
    )]
    Addr(String, &'static str),
    #[error("could not create the directory of the gRPC socket {path}: {source}")]
    SocketDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the gRPC socket {0} is in use by another process (another flowaudit agent?): stop it or choose another --grpc-addr"
    )]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket: refusing to replace it; choose another --grpc-addr")]
    NotASocket(PathBuf),
    #[error("could not listen for gRPC on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "--grpc-addr {addr} listens beyond loopback, and TCP gRPC without TLS has no authentication: add --workload-api unix:///PATH (or --tls-cert F --tls-key F --tls-ca F) with --allow-peer GLOB for mTLS, or listen on 127.0.0.1 or [::1]"
    )]
    PlaintextBeyondLoopback { addr: String },
    #[error("server reflection could not load the flowaudit.v1 descriptors: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// `why` is the whole chain of causes (tonic's own text is only
    /// "transport error").
    #[error("could not connect to {addr}: {why}")]
    Connect { addr: String, why: String },
}

/// Where the gRPC server listens or a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcAddr {
    Unix(PathBuf),
    Tcp(String),
}

impl GrpcAddr {
    pub fn parse(text: &str) -> Result<Self, GrpcError> {
        let bad = |why| Err(GrpcError::Addr(text.to_owned(), why));
        if let Some(path) = text.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return bad("a unix:// path must be absolute");
            }
            return Ok(GrpcAddr::Unix(PathBuf::from(path)));
        }
        let hostport = text
            .strip_prefix("http://")
            .unwrap_or(text)
            .trim_end_matches('/');
        if hostport.contains("://") {
            return bad(
                "only unix:// and http:// (or no scheme) are spoken; TLS is set by the TLS flags, not by https://",
            );
        }
        // HOST:PORT with a numeric port; IPv6 hosts in brackets.
        let Some((host, port)) = hostport.rsplit_once(':') else {
            return bad("no port");
        };
        if host.is_empty() {
            return bad("no host");
        }
        if port.parse::<u16>().is_err() {
            return bad("the port is not a number from 0 to 65535");
        }
        let bracketed = host.starts_with('[') && host.ends_with(']');
        if host.contains(':') && !bracketed {
            return bad("an IPv6 address goes in brackets");
        }
        // What the connection will be made from must parse too.
        if host.contains(['/', '@', '?', '#'])
            || http::Uri::try_from(format!("http://{hostport}")).is_err()
        {
            return bad("the host is not a name or an address");
        }
        Ok(GrpcAddr::Tcp(hostport.to_owned()))
    }
}

impl std::fmt::Display for GrpcAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GrpcAddr::Unix(p) => write!(f, "unix://{}", p.display()),
            GrpcAddr::Tcp(a) => f.write_str(a),
        }
    }
}

// ---------------------------------------------------------------- server

pub struct FlowAuditService {
    hub: Arc<Hub>,
    state: Arc<AgentState>,
}

pub type FlowResponseStream =
    Pin<Box<dyn Stream<Item = Result<proto::GetFlowsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl FlowAudit for FlowAuditService {
    type GetFlowsStream = FlowResponseStream;

    async fn get_flows(
        &self,
        request: Request<proto::GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        // `join` is the relay's: an agent has one node's halves only.
        let stream = flow_stream(&self.hub, request.into_inner(), &self.state.node_name)?;
        Ok(Response::new(stream))
    }

    async fn server_status(
        &self,
        _request: Request<proto::ServerStatusRequest>,
    ) -> Result<Response<proto::ServerStatusResponse>, Status> {
        Ok(Response::new(status_of(&self.state, &self.hub)))
    }
}

/// A `GetFlows` answer from a hub: its buffered flows, then (with
/// `follow`) live ones, its losses and notices. Flows carry their own node;
/// this server's own notices carry `own_name`. Conversion to protobuf
/// happens in the subscriber's task, never on the pipeline. When the hub
/// closes (the server is stopping), a follow stream gets everything
/// published before, then ends with UNAVAILABLE and the hub's reason: the
/// status clients reconnect on, instead of a connection torn down under
/// them.
pub fn flow_stream(
    hub: &Arc<Hub>,
    req: proto::GetFlowsRequest,
    own_name: &str,
) -> Result<FlowResponseStream, Status> {
    let filter = FilterSet::compile(&req.allow, &req.deny)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let since = req.since.as_ref().map(convert::flow_time);
    let stream = hub
        .subscribe(Subscribe {
            number: req.number,
            follow: req.follow,
            since,
            filter,
        })
        .map_err(|e| match e {
            HubError::Closed(why) => stopping(&why),
            HubError::TooManySubscribers(_) => Status::resource_exhausted(e.to_string()),
        })?;
    let own = own_name.to_owned();
    let out = stream.map(move |item| {
        Ok(match item {
            Item::Flow(f) => proto::GetFlowsResponse {
                node_name: f.node_name.to_string(),
                response: Some(proto::get_flows_response::Response::Flow(
                    convert::flow_to_proto(&f),
                )),
            },
            Item::Lost { source, count } => proto::GetFlowsResponse {
                node_name: own.clone(),
                response: Some(proto::get_flows_response::Response::LostEvents(
                    lost_events(source, count),
                )),
            },
            Item::Notice(n) => n.as_ref().clone(),
        })
    });
    let hub = hub.clone();
    let end =
        futures_util::stream::once(async move { hub.closed().map(|why| Err(stopping(&why))) })
            .filter_map(|end| end);
    Ok(match req.follow {
        true => Box::pin(out.chain(end)),
        false => Box::pin(out),
    })
}

/// The metadata key that tells a client a stream ended because the
/// server is stopping on purpose (a rollout, a drain), not because the
/// connection broke: both come as UNAVAILABLE, since clients reconnect on
/// it either way.
pub const STOPPING_KEY: &str = "flowaudit-stopping";

/// The end of a follow stream whose server is stopping: UNAVAILABLE with
/// the reason and [`STOPPING_KEY`].
fn stopping(why: &str) -> Status {
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert(
        STOPPING_KEY,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    Status::with_metadata(tonic::Code::Unavailable, why, md)
}

/// Whether a stream ended because its server stopped on purpose.
pub fn is_stopping(status: &Status) -> bool {
    status.code() == tonic::Code::Unavailable && status.metadata().contains_key(STOPPING_KEY)
}

/// How long a stopping agent or relay waits for stream clients to read the
/// last flows and the end of their streams (within the pod's 30 s grace).
pub const STREAM_END_WAIT: Duration = Duration::from_secs(5);

/// Stops gRPC servers gracefully: each stops accepting, lets its open
/// requests finish (a closed hub ends its follow streams), then ends its
/// connections, each closed once its client has read the end (see
/// [`super::linger`]). Clones share the servers.
#[derive(Clone)]
pub struct GrpcStop {
    signal: Arc<tokio::sync::watch::Sender<bool>>,
    servers: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    lingers: Lingers,
}

impl Default for GrpcStop {
    fn default() -> Self {
        Self {
            signal: Arc::new(tokio::sync::watch::channel(false).0),
            servers: Arc::default(),
            lingers: Lingers::default(),
        }
    }
}

impl GrpcStop {
    /// Spawns a server that runs until [`GrpcStop::stop`].
    fn spawn<F>(&self, serve: impl FnOnce(Pin<Box<dyn Future<Output = ()> + Send>>) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut rx = self.signal.subscribe();
        let stopped = Box::pin(async move {
            // An error says every `GrpcStop` is gone without stopping: the
            // server then runs as long as the runtime does.
            if rx.wait_for(|stop| *stop).await.is_err() {
                std::future::pending::<()>().await;
            }
        });
        let task = tokio::spawn(serve(stopped));
        self.servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    /// Tells every server to stop and waits until they have, at most
    /// [`STREAM_END_WAIT`] (a client that reads nothing keeps its stream
    /// open; then it is said in the log), then until each ended connection's
    /// client has closed it, at most [`LINGER`] more. Servers spawned later
    /// stop at once.
    pub async fn stop(&self) {
        let before = self.lingers.cut();
        self.end_servers().await;
        let cut = self.lingers.wait().await - before;
        if cut > 0 {
            tracing::info!(
                connections = cut,
                linger = ?LINGER,
                "gRPC clients did not close their ended connections in time; closed"
            );
        }
    }

    /// The first half of [`GrpcStop::stop`]: the servers end, their
    /// connections linger.
    async fn end_servers(&self) {
        self.signal.send_replace(true);
        let servers = std::mem::take(&mut *self.servers.lock().unwrap_or_else(|p| p.into_inner()));
        let all = futures_util::future::join_all(servers);
        if tokio::time::timeout(STREAM_END_WAIT, all).await.is_err() {
            tracing::warn!(
                wait = ?STREAM_END_WAIT,
                "stream clients still had flows to read; their connections were closed"
            );
        }
    }
}

pub fn lost_events(source: LostSource, count: u64) -> proto::LostEvents {
    let (src, message, place) = match source {
        LostSource::SubscriberQueue => (
            proto::LostEventsSource::SubscriberQueue,
            format!(
                "{count} flows not delivered: this subscriber read more slowly than flows came, until its queue and the agent's stream buffer were full"
            ),
            String::new(),
        ),
        LostSource::Kernel(place) => (
            proto::LostEventsSource::Kernel,
            format!(
                "{count} lost in the kernel at {}: {}",
                place.name(),
                place.consequence()
            ),
            place.name().to_owned(),
        ),
    };
    proto::LostEvents {
        source: src as i32,
        count,
        message,
        place,
    }
}

/// Every loss place with its count, for `ServerStatus`.
fn kernel_losses(stats: &crate::capture::CaptureStats) -> Vec<proto::KernelLoss> {
    LossPlace::ALL
        .iter()
        .map(|&p| proto::KernelLoss {
            place: p.name().to_owned(),
            count: stats.lost[p as usize].load(Ordering::Relaxed),
            consequence: p.consequence().to_owned(),
            loses_flow_events: p.loses_event(),
        })
        .collect()
}

pub fn system_time_to_proto(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

pub fn status_of(state: &AgentState, hub: &Hub) -> proto::ServerStatusResponse {
    let stages = state.stages();
    let readiness = state.readiness();
    proto::ServerStatusResponse {
        node_name: state.node_name.clone(),
        version: state.version.to_owned(),
        started: Some(system_time_to_proto(state.started)),
        uptime_seconds: state.started.elapsed().unwrap_or_default().as_secs(),
        flows_seen: state.pipeline.flows.load(Ordering::Relaxed),
        kernel_events: state.capture.records.load(Ordering::Relaxed),
        kernel_events_lost: state.capture.events_lost(),
        kernel_losses: kernel_losses(&state.capture),
        relay: false,
        nodes: Vec::new(),
        cilium: Some(match state.metrics.cilium.last_look.lock().ok().and_then(|l| l.clone()) {
            Some((maps_found, detail)) => proto::CiliumStatus { maps_found, detail },
            None => proto::CiliumStatus {
                maps_found: false,
                detail: "not looked at: no flow under a rule requiring Cilium mutual authentication yet".into(),
            },
        }),
        flows_buffered: hub.buffered() as u64,
        flow_buffer_capacity: hub.capacity() as u64,
        subscribers: u32::try_from(hub.subscribers()).unwrap_or(u32::MAX),
        stream_dropped: hub.dropped(),
        ready: readiness.is_ok(),
        not_ready_reason: readiness.err().unwrap_or_default(),
        identity_cache: stages
            .identity_cache
            .as_ref()
            .map(|c| proto::IdentityCacheStatus { entries: c.entries }),
        spire: stages.spire.as_ref().map(|s| proto::SpireStatus {
            connected: s.connected,
            socket: s.socket.clone(),
            mode: s.mode.clone(),
            detail: s.detail.clone(),
        }),
        policy: stages.policy.as_ref().map(|p| proto::PolicyStatus {
            version: p.version.clone().unwrap_or_default(),
            rules: p.rules,
            loaded: p.loaded.map(system_time_to_proto),
            last_error: p.last_error.clone().unwrap_or_default(),
        }),
        kernel_degradations: state
            .capture
            .degradations
            .iter()
            .map(|d| proto::KernelDegradation {
                name: d.name.to_owned(),
                reason: d.reason.clone(),
                lost: d.lost.to_owned(),
            })
            .collect(),
    }
}

/// Removes the Unix socket when the server stops (the runtime drops its task).
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What can be told of a Unix socket's path before it is bound: a file
/// of another kind there is never replaced.
pub fn check_socket_path(path: &Path) -> Result<(), GrpcError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => Err(GrpcError::NotASocket(path.to_path_buf())),
        _ => Ok(()),
    }
}

fn prepare_socket(path: &Path) -> Result<(), GrpcError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| GrpcError::SocketDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    check_socket_path(path)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A live socket belongs to a running agent; a dead one is left
            // over from one that was killed.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(GrpcError::SocketInUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
            Ok(())
        }
        _ => Ok(()),
    }
}

impl Connected for AuthorityFix<Lingering<tokio::net::UnixStream>> {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref().connect_info()
    }
}

/// Binds every address now (so a bad one fails the start) and serves them
/// in the background. Returns the addresses bound (TCP port 0 resolved).
/// TCP listeners use mTLS when `tls` is given; without it, only loopback
/// addresses are accepted.
pub async fn serve(
    addrs: &[String],
    hub: Arc<Hub>,
    state: Arc<AgentState>,
    tls: Option<&ServerTls>,
    stop: &GrpcStop,
) -> Result<Vec<GrpcAddr>, GrpcError> {
    serve_service(addrs, FlowAuditService { hub, state }, tls, stop).await
}

/// [`serve`] for any implementation of the service (the agent's, the relay's).
pub async fn serve_service<S: FlowAudit>(
    addrs: &[String],
    service: S,
    tls: Option<&ServerTls>,
    stop: &GrpcStop,
) -> Result<Vec<GrpcAddr>, GrpcError> {
    let service = Arc::new(service);
    let mut bound = Vec::new();
    for text in addrs {
        let addr = GrpcAddr::parse(text)?;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let service = FlowAuditServer::from_arc(service.clone());
        let router = Server::builder()
            // Notice dead peers of idle streams, so their subscriptions end.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        match &addr {
            GrpcAddr::Unix(path) => {
                prepare_socket(path)?;
                let listener =
                    tokio::net::UnixListener::bind(path).map_err(|source| GrpcError::Bind {
                        addr: text.clone(),
                        source,
                    })?;
                // Flows name workloads and processes: owner and group only.
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(
                    |source| GrpcError::Bind {
                        addr: text.clone(),
                        source,
                    },
                )?;
                let guard = SocketGuard(path.clone());
                // Stock clients send the socket path as :authority: see h2_authority.
                let lingers = stop.lingers.clone();
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener)
                    .map(move |conn| conn.map(|c| AuthorityFix::new(Lingering::new(c, &lingers))));
                stop.spawn(|stopped| async move {
                    let _guard = guard;
                    if let Err(e) = router.serve_with_incoming_shutdown(incoming, stopped).await {
                        tracing::error!(error = %e, "gRPC server on a Unix socket stopped");
                    }
                });
                bound.push(addr.clone());
            }
            GrpcAddr::Tcp(hostport) => {
                let listener = tokio::net::TcpListener::bind(hostport.as_str())
                    .await
                    .map_err(|source| GrpcError::Bind {
                        addr: text.clone(),
                        source,
                    })?;
                let local: SocketAddr =
                    listener.local_addr().map_err(|source| GrpcError::Bind {
                        addr: text.clone(),
                        source,
                    })?;
                match tls {
                    Some(tls) => {
                        let incoming = tls.incoming(listener, &stop.lingers);
                        stop.spawn(|stopped| async move {
                            if let Err(e) =
                                router.serve_with_incoming_shutdown(incoming, stopped).await
                            {
                                tracing::error!(error = %e, "gRPC server on TCP (mTLS) stopped");
                            }
                        });
                    }
                    None if local.ip().is_loopback() => {
                        let lingers = stop.lingers.clone();
                        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener)
                            .map(move |conn| conn.map(|c| Lingering::new(c, &lingers)));
                        stop.spawn(|stopped| async move {
                            if let Err(e) =
                                router.serve_with_incoming_shutdown(incoming, stopped).await
                            {
                                tracing::error!(error = %e, "gRPC server on TCP stopped");
                            }
                        });
                    }
                    None => {
                        return Err(GrpcError::PlaintextBeyondLoopback { addr: text.clone() });
                    }
                }
                bound.push(GrpcAddr::Tcp(local.to_string()));
            }
        }
    }
    Ok(bound)
}

/// The value parser of a gRPC address flag (`--grpc-addr`, `--server`):
/// a malformed one is a usage error (exit 2, naming the flag).
pub fn addr_arg(s: &str) -> Result<String, String> {
    GrpcAddr::parse(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

/// Binds each TCP address of `addrs` for a moment, so that one taken (or
/// not of this host) fails the start even when its listener starts later
/// (the agent's, once SPIRE gave it an SVID).
pub fn check_bind(addrs: &[String]) -> Result<(), GrpcError> {
    for text in addrs {
        if let GrpcAddr::Tcp(hostport) = GrpcAddr::parse(text)? {
            std::net::TcpListener::bind(hostport.as_str()).map_err(|source| GrpcError::Bind {
                addr: text.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- client

/// Connects to an agent (`unix:///path` or `HOST:PORT`).
pub async fn connect(text: &str) -> Result<FlowAuditClient<Channel>, GrpcError> {
    connect_tls(text, &ClientTls::default()).await
}

/// How long a client waits for a connection (TCP, and TLS where asked
/// for) and for the server's first answer to a call: a server that takes
/// the connection and never answers ends the command instead of holding it.
pub const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How often a client pings the server over HTTP/2 (and, at the TCP
/// level, probes it) while connected, and how long it waits for the
/// answer: a server that stopped answering with its connection still open
/// (a frozen process, a node gone without closing its connections) ends
/// the call within about 20 s, where the stream would otherwise wait for
/// ever (the relay showed such a node "connected" for good).
pub const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(10);

/// What every client endpoint has: [`ANSWER_WAIT`] to connect, and
/// [`KEEPALIVE`] pings while connected.
fn client_endpoint(endpoint: TonicEndpoint) -> TonicEndpoint {
    endpoint
        .connect_timeout(ANSWER_WAIT)
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE)
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(KEEPALIVE))
}

/// A failed connect to a Unix socket, said with what is at the path when
/// it is not a socket: connecting to a regular file fails with "Permission
/// denied" or "Connection refused", which hides the wrong path.
fn unix_connect_error(path: &Path, e: std::io::Error) -> std::io::Error {
    let what = match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_socket() => return e,
        Ok(m) if m.is_dir() => "a directory",
        Ok(m) if m.is_file() => "a regular file",
        Ok(_) => "a file of another kind",
        Err(_) => return e,
    };
    std::io::Error::new(
        e.kind(),
        format!("{} is {what}, not a Unix socket ({e})", path.display()),
    )
}

/// The causes under `e`, each said once (`client error (Connect):
/// Connection refused (os error 111)`), or `e` itself when it has none.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = e.source();
    while let Some(cause) = next {
        let part = cause.to_string();
        if !parts.last().is_some_and(|last| last.contains(&part)) {
            parts.push(part);
        }
        next = cause.source();
    }
    match parts.is_empty() {
        true => e.to_string(),
        false => parts.join(": "),
    }
}

/// Connects to an agent; a `HOST:PORT` uses mTLS when `tls` is configured
/// (a Unix socket never does).
pub async fn connect_tls(
    text: &str,
    tls: &ClientTls,
) -> Result<FlowAuditClient<Channel>, GrpcError> {
    let addr = GrpcAddr::parse(text)?;
    let err = |e: tonic::transport::Error| GrpcError::Connect {
        addr: text.to_owned(),
        why: causes(&e),
    };
    let channel = match addr {
        GrpcAddr::Unix(path) => {
            // The URI is required by the API but unused: the connector dials the socket.
            client_endpoint(TonicEndpoint::from_static("http://localhost"))
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(&path)
                            .await
                            .map_err(|e| unix_connect_error(&path, e))?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await
                .map_err(err)?
        }
        GrpcAddr::Tcp(hostport) if tls.is_enabled() => {
            let tls = tls.clone();
            // TLS is done by the connector; the scheme only names HTTP/2.
            TonicEndpoint::from_shared(format!("http://{hostport}"))
                .map(client_endpoint)
                .map_err(|_| GrpcError::Addr(text.to_owned(), "not a URI"))?
                .connect_with_connector(tower::service_fn(move |_| {
                    let (tls, hostport) = (tls.clone(), hostport.clone());
                    async move {
                        let s = tls.dial(&hostport).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await
                .map_err(err)?
        }
        GrpcAddr::Tcp(hostport) => TonicEndpoint::from_shared(format!("http://{hostport}"))
            .map(client_endpoint)
            .map_err(|_| GrpcError::Addr(text.to_owned(), "not a URI"))?
            .connect()
            .await
            .map_err(err)?,
    };
    Ok(FlowAuditClient::new(channel).max_decoding_message_size(16 * 1024 * 1024))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::export::hub::tests::sample_flow;
    use crate::export::metrics::Metrics;

    /// The cause is said, not tonic's bare "transport error".
    #[tokio::test]
    async fn a_failed_connect_says_why() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let e = connect(&addr)
            .await
            .expect_err("nothing listens")
            .to_string();
        assert_eq!(
            e,
            format!(
                "could not connect to {addr}: tcp connect error: Connection refused (os error 111)"
            )
        );
        let e = connect("unix:///nonexistent/flowaudit.sock")
            .await
            .expect_err("no socket")
            .to_string();
        assert_eq!(
            e,
            "could not connect to unix:///nonexistent/flowaudit.sock: No such file or directory (os error 2)"
        );
        let dir = std::env::temp_dir().join(format!("fa-connect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("not-a-socket");
        std::fs::write(&file, "x").unwrap();
        for (path, what) in [(&file, "a regular file"), (&dir, "a directory")] {
            let addr = format!("unix://{}", path.display());
            let e = connect(&addr).await.expect_err("not a socket").to_string();
            assert!(
                e.starts_with(&format!(
                    "could not connect to {addr}: {} is {what}, not a Unix socket (",
                    path.display()
                )),
                "{e}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_taken_port_is_found_before_its_listener_starts() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let e = check_bind(std::slice::from_ref(&addr))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("could not listen for gRPC on {addr}: ")),
            "{e}"
        );
        drop(taken);
        check_bind(&[addr, "unix:///nonexistent/x.sock".into()]).unwrap();
    }

    /// A follow stream of everything the server at `addr` publishes.
    pub async fn follow(addr: &str) -> tonic::Streaming<proto::GetFlowsResponse> {
        connect(addr)
            .await
            .unwrap()
            .get_flows(proto::GetFlowsRequest {
                follow: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    #[test]
    fn addresses() {
        assert_eq!(
            GrpcAddr::parse(DEFAULT_ADDR).unwrap(),
            GrpcAddr::Unix("/var/run/flowaudit/flowaudit.sock".into())
        );
        assert_eq!(
            GrpcAddr::parse("127.0.0.1:4245").unwrap(),
            GrpcAddr::Tcp("127.0.0.1:4245".into())
        );
        assert_eq!(
            GrpcAddr::parse("[::1]:4245").unwrap(),
            GrpcAddr::Tcp("[::1]:4245".into())
        );
        assert_eq!(
            GrpcAddr::parse("http://localhost:4245").unwrap(),
            GrpcAddr::Tcp("localhost:4245".into())
        );
        for (bad, why) in [
            ("unix://relative.sock", "a unix:// path must be absolute"),
            ("localhost", "no port"),
            (":4245", "no host"),
            ("host:port", "the port is not a number from 0 to 65535"),
            ("::1:4244", "an IPv6 address goes in brackets"),
            (
                "https://127.0.0.1:4244",
                "only unix:// and http:// (or no scheme) are spoken; TLS is set by the TLS flags, not by https://",
            ),
            ("user@host:4244", "the host is not a name or an address"),
            ("a b:4244", "the host is not a name or an address"),
        ] {
            match GrpcAddr::parse(bad) {
                Err(GrpcError::Addr(text, reason)) => {
                    assert_eq!((text.as_str(), reason), (bad, why));
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    /// A raw HTTP/2 client on a Unix socket, for what stock clients do at
    /// a connection's end that tonic's own client does not.
    struct RawClient(std::os::unix::net::UnixStream);

    impl RawClient {
        /// Connects with no window for stream data (each stream's flows and
        /// status wait for [`RawClient::open_window`]) and asks to follow.
        fn follow(sock: &Path) -> Self {
            use crate::export::h2_authority::PREFACE;
            use crate::export::h2_authority::tests::{frame, request_block};
            use prost::Message;
            use std::io::Write;
            let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut out = PREFACE.to_vec();
            out.extend(frame(0x4, 0, 0, &[0, 4, 0, 0, 0, 0])); // INITIAL_WINDOW_SIZE 0
            out.extend(frame(0x1, 0x4, 1, &request_block(b"localhost")));
            let request = proto::GetFlowsRequest {
                follow: true,
                ..Default::default()
            }
            .encode_to_vec();
            let mut body = vec![0];
            body.extend((request.len() as u32).to_be_bytes());
            body.extend(request);
            out.extend(frame(0x0, 0x1, 1, &body));
            s.write_all(&out).unwrap();
            Self(s)
        }

        fn read_frame(&mut self) -> crate::export::h2_authority::tests::Frame {
            use std::io::Read;
            let mut bytes = vec![0; 9];
            self.0
                .read_exact(&mut bytes)
                .expect("a frame from the server");
            let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            bytes.resize(9 + len, 0);
            self.0.read_exact(&mut bytes[9..]).unwrap();
            crate::export::h2_authority::tests::frames_after_preface(&bytes)
                .pop()
                .unwrap()
        }

        /// Reads up to the ping of the server's graceful shutdown (after its
        /// first GOAWAY) and answers it and every SETTINGS, as clients do.
        fn answer_up_to_the_shutdown_ping(
            &mut self,
        ) -> Vec<crate::export::h2_authority::tests::Frame> {
            use crate::export::h2_authority::tests::frame;
            use std::io::Write;
            let mut seen = Vec::new();
            loop {
                let f = self.read_frame();
                let unacked = f.flags & 0x1 == 0;
                if f.kind == 0x4 && unacked {
                    self.0.write_all(&frame(0x4, 0x1, 0, &[])).unwrap();
                }
                let ping = f.kind == 0x6 && unacked;
                if ping {
                    self.0.write_all(&frame(0x6, 0x1, 0, &f.payload)).unwrap();
                }
                seen.push(f);
                if ping {
                    return seen;
                }
            }
        }

        /// A WINDOW_UPDATE of 1 MiB on `stream` (0: the connection's).
        fn open_window(&mut self, stream: u32) -> std::io::Result<()> {
            use crate::export::h2_authority::tests::frame;
            use std::io::Write;
            self.0
                .write_all(&frame(0x8, 0, stream, &(1u32 << 20).to_be_bytes()))
        }
    }

    async fn unix_server(name: &str) -> (PathBuf, Arc<Hub>, GrpcStop) {
        use crate::capture::CaptureStats;
        use crate::pipeline::PipelineStats;
        let dir = std::env::temp_dir().join(format!("fa-grpc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sock = dir.join("s.sock");
        let state = Arc::new(AgentState::new(
            "test".into(),
            Arc::new(CaptureStats::default()),
            Arc::new(PipelineStats::default()),
        ));
        let hub = Arc::new(Hub::new(64, 64, 16, state.metrics.clone()));
        let stop = GrpcStop::default();
        let addr = format!("unix://{}", sock.display());
        serve(std::slice::from_ref(&addr), hub.clone(), state, None, &stop)
            .await
            .unwrap();
        (sock, hub, stop)
    }

    /// grpc-core writes (a WINDOW_UPDATE for the flows it consumed) before
    /// it reads the rest of its buffer. A stopping server whose connection
    /// ended must not have closed it then, or the write fails (EPIPE) and
    /// the client fails the call with that, never reading the status it had
    /// been sent (see [`super::super::linger`]). Here a client writes after
    /// the server has ended, then reads the flow and the status, and closes.
    #[tokio::test]
    async fn a_client_that_writes_before_reading_the_end_still_gets_the_status() {
        let (sock, hub, stop) = unix_server("linger").await;
        let dir = sock.parent().unwrap().to_path_buf();
        let (ended_tx, ended_rx) = std::sync::mpsc::channel::<()>();
        let client = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut c = RawClient::follow(&sock);
            let mut frames = c.answer_up_to_the_shutdown_ping();
            // The flow and the status go out; then h2 ends the connection.
            c.open_window(1).unwrap();
            ended_rx.recv().unwrap();
            let wrote = c.open_window(0);
            let mut rest = Vec::new();
            let read = c.0.read_to_end(&mut rest);
            frames.extend(crate::export::h2_authority::tests::frames_after_preface(
                &rest,
            ));
            (wrote, read, frames)
        });
        while hub.subscribers() < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        hub.publish_all(&mut vec![Arc::new(sample_flow())]);
        hub.close("the server is stopping (SIGTERM)");
        stop.end_servers().await;
        ended_tx.send(()).unwrap();
        let (wrote, read, frames) = client.await.unwrap();
        wrote.expect("a write after the server ended the connection");
        read.expect("the rest of the connection, up to its end");
        assert_eq!(stop.lingers.wait().await, 0, "the client closed it");
        let on_stream = |kind: u8| {
            frames
                .iter()
                .filter(move |f| f.kind == kind && f.stream == 1)
        };
        assert!(
            on_stream(0x0).any(|f| f.payload.len() > 5),
            "the flow: {frames:?}"
        );
        let mut decoder = loona_hpack::Decoder::new();
        let blocks: Vec<_> = on_stream(0x1)
            .map(|f| (f.flags, decoder.decode(&f.payload).unwrap()))
            .collect();
        let (flags, trailers) = blocks.last().expect("headers on the stream");
        assert_eq!(flags & 0x1, 0x1, "the last block ends the stream");
        let field = |name: &[u8]| {
            trailers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(field(b"grpc-status").as_deref(), Some("14"), "{trailers:?}");
        assert_eq!(
            field(b"grpc-message").as_deref(),
            Some("the%20server%20is%20stopping%20(SIGTERM)")
        );
        assert!(
            frames.iter().any(|f| f.kind == 0x7),
            "the GOAWAY: {frames:?}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A client that never closes an ended connection holds the stop up for
    /// [`LINGER`] at most; it is counted.
    #[tokio::test]
    async fn a_client_that_never_closes_is_cut_after_the_linger() {
        let (sock, hub, stop) = unix_server("linger-cut").await;
        let dir = sock.parent().unwrap().to_path_buf();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let client = tokio::task::spawn_blocking(move || {
            let mut c = RawClient::follow(&sock);
            c.answer_up_to_the_shutdown_ping();
            // Open until the test is done with it.
            done_rx.recv().unwrap();
        });
        while hub.subscribers() < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        hub.close("the server is stopping (SIGTERM)");
        stop.end_servers().await;
        assert_eq!(stop.lingers.wait().await, 1, "cut at the linger");
        done_tx.send(()).unwrap();
        client.await.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Delivery capacity of the stream over a real Unix socket: one
    /// producer (the pipeline's role) and 1 or 100 followers. Prints
    /// flows/s per subscriber and in total. Run with
    /// `cargo test --release -p flowaudit stream_throughput -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, run by `cargo xtask bench`; tests do not assert on time"]
    async fn stream_throughput() {
        for subs in [1usize, 100] {
            let flows = if subs == 1 { 200_000 } else { 20_000 };
            let (per_sub, total, lost) = run_throughput(subs, flows).await;
            println!(
                "stream throughput: {subs} subscriber(s): {per_sub:.0} flows/s each, {total:.0} flows/s delivered in total, {lost} lost"
            );
        }
    }

    async fn run_throughput(subs: usize, flows: usize) -> (f64, f64, u64) {
        use crate::capture::CaptureStats;
        use crate::pipeline::PipelineStats;
        let dir = std::env::temp_dir().join(format!("fa-grpc-bench-{}-{subs}", std::process::id()));
        let sock = dir.join("s.sock");
        let state = Arc::new(AgentState::new(
            "bench".into(),
            Arc::new(CaptureStats::default()),
            Arc::new(PipelineStats::default()),
        ));
        let metrics: Arc<Metrics> = state.metrics.clone();
        // Queues hold every flow: this measures delivery, not loss.
        let hub = Arc::new(Hub::new(8192, flows + 1, 1024, metrics));
        let addr = format!("unix://{}", sock.display());
        serve(
            std::slice::from_ref(&addr),
            hub.clone(),
            state.clone(),
            None,
            &GrpcStop::default(),
        )
        .await
        .unwrap();
        let mut tasks = Vec::new();
        for _ in 0..subs {
            let mut stream = follow(&addr).await;
            tasks.push(tokio::spawn(async move {
                let mut n = 0usize;
                let mut lost = 0u64;
                let mut first = None;
                while let Some(Ok(r)) = stream.next().await {
                    first.get_or_insert_with(std::time::Instant::now);
                    match r.response {
                        Some(proto::get_flows_response::Response::Flow(_)) => n += 1,
                        Some(proto::get_flows_response::Response::LostEvents(l)) => lost += l.count,
                        _ => {}
                    }
                    if n as u64 + lost >= flows as u64 {
                        break;
                    }
                }
                (n, lost, first.map(|t| t.elapsed()))
            }));
        }
        while hub.subscribers() < subs {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let flow = Arc::new(sample_flow());
        let start = std::time::Instant::now();
        let producer = {
            let hub = hub.clone();
            tokio::task::spawn_blocking(move || {
                // In bursts, as the pipeline's sink hands them over.
                let mut burst = Vec::new();
                for _ in 0..flows {
                    burst.push(flow.clone());
                    if burst.len() == 256 {
                        hub.publish_all(&mut burst);
                    }
                }
                hub.publish_all(&mut burst);
            })
        };
        producer.await.unwrap();
        let mut got = 0usize;
        let mut lost = 0u64;
        for t in tasks {
            let (n, l, _) = t.await.unwrap();
            got += n;
            lost += l;
        }
        let secs = start.elapsed().as_secs_f64();
        let _ = std::fs::remove_dir_all(&dir);
        (got as f64 / subs as f64 / secs, got as f64 / secs, lost)
    }
}
