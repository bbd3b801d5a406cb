//! Where flow events leave the agent. Every sink gets each flow once, in
//! order, from the pipeline's single judge-and-fan-out task; a sink must not
//! block it (a slow consumer buffers or drops on its own side, and counts).
//! Sinks: the export file ([`file`]), Prometheus counters ([`metrics`]) and
//! the flow hub behind the gRPC stream ([`hub`], [`grpc`]).

mod ahead;
pub mod convert;
pub mod file;
pub mod filter;
pub mod grpc;
pub mod h2_authority;
pub mod hub;
pub mod linger;
pub mod metrics;
pub mod mtls;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use crate::pipeline::Sink;
use state::AgentState;

/// `flowaudit.v1`, generated from `proto/flowaudit/v1/flowaudit.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("flowaudit.v1");

    /// Descriptors served by gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("flowaudit_descriptor");
}

/// `flowaudit agent` flags of the export side.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Write flow events to this file as JSON lines, rotated by size. It is
    /// written out behind the writer every 8 MiB, and what is on disk then
    /// leaves the page cache. On a disk, the next file's blocks are
    /// allocated ahead (a hidden spare, `.NAME.spare`, up to 256 MiB; size 0)
    /// so that the writer never waits to allocate; the blocks not written
    /// are given back when the agent stops. A writer 16,384 flows behind (a slow disk)
    /// leaves the next flows out of the file and counts them
    /// (flowaudit_export_file_flows_lost_total); capture never waits for it.
    #[arg(long, env = "FLOWAUDIT_EXPORT_FILE", value_name = "PATH")]
    pub export_file: Option<PathBuf>,
    /// Rotate the export file when it reaches this many MiB. The renames
    /// are made beside the writer; while they wait for the disk (more
    /// than 20 ms) lines go on into the full file, so it can grow past
    /// this size. A rotation that fails loses no line: it is logged,
    /// counted (flowaudit_export_file_errors_total) and tried again each
    /// second.
    #[arg(
        long,
        env = "FLOWAUDIT_EXPORT_FILE_MAX_SIZE_MB",
        default_value_t = 64,
        value_name = "MIB",
        value_parser = clap::value_parser!(u64).range(1..=1 << 20)
    )]
    pub export_file_max_size_mb: u64,
    /// How many rotated export files to keep (PATH.1 ... PATH.N).
    #[arg(
        long,
        env = "FLOWAUDIT_EXPORT_FILE_MAX_BACKUPS",
        default_value_t = 5,
        value_name = "N"
    )]
    pub export_file_max_backups: u32,
    /// Serve Prometheus metrics (/metrics), /healthz and /readyz here.
    #[arg(
        long,
        env = "FLOWAUDIT_METRICS_ADDR",
        default_value = "0.0.0.0:9966",
        value_name = "ADDR",
        value_parser = crate::export::metrics::listen_addr
    )]
    pub metrics_addr: SocketAddr,
    /// Answer /metrics only to clients in this CIDR (repeatable, e.g. the
    /// node or Prometheus subnet); others get 403. Default: any client.
    /// /healthz and /readyz stay open to all (they expose no flow data).
    #[arg(
        long,
        env = "FLOWAUDIT_METRICS_ALLOW",
        value_delimiter = ',',
        value_parser = metrics::Cidr::parse,
        value_name = "CIDR"
    )]
    pub metrics_allow: Vec<metrics::Cidr>,
    /// Serve the gRPC flow stream here: unix:///PATH or HOST:PORT (repeatable).
    #[arg(
        long,
        env = "FLOWAUDIT_GRPC_ADDR",
        value_delimiter = ',',
        default_value = grpc::DEFAULT_ADDR,
        value_name = "ADDR",
        value_parser = grpc::addr_arg
    )]
    pub grpc_addr: Vec<String>,
    #[command(flatten)]
    pub tls: mtls::TlsArgs,
    /// Flows kept in memory for `observe --last` and `--since`.
    #[arg(
        long,
        env = "FLOWAUDIT_FLOW_BUFFER",
        default_value_t = 8192,
        value_name = "N",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000)
    )]
    pub flow_buffer: usize,
    /// Flows queued per stream subscriber before it starts losing them.
    #[arg(
        long,
        env = "FLOWAUDIT_STREAM_QUEUE",
        default_value_t = 4096,
        value_name = "N",
        hide = true
    )]
    pub stream_queue: usize,
}

/// Most stream subscribers at once (each costs a queue and a filter check per flow).
pub const MAX_SUBSCRIBERS: usize = 1024;

/// The pipeline's sinks, and what ends the flow stream when the agent stops.
pub struct Started {
    pub sinks: Vec<Box<dyn Sink>>,
    pub stream: StreamEnd,
}

/// Ends the gRPC flow stream (see [`StreamEnd::stop`]).
pub struct StreamEnd {
    hub: Arc<hub::Hub>,
    grpc: grpc::GrpcStop,
}

impl StreamEnd {
    /// Once the pipeline has handed over its last flow: every follow
    /// stream gets what was published, then ends with UNAVAILABLE saying
    /// `why`; the gRPC servers stop accepting and close once their streams
    /// have ended, waiting at most [`grpc::STREAM_END_WAIT`] for clients
    /// that read nothing.
    pub async fn stop(self, why: &str) {
        self.hub.close(why);
        self.grpc.stop().await;
    }
}

/// Opens every configured sink and starts the servers that feed from them
/// (metrics HTTP, gRPC). Every listener is bound before this returns, so a
/// taken port or socket fails the agent's start with a clear error.
impl ExportArgs {
    /// What can be told wrong from the flags alone (addresses, TLS flags
    /// and --allow-peer globs, plaintext TCP beyond loopback), so that the
    /// agent stops on a typo before it attaches anything. [`start`] still
    /// finds what only trying shows (a port in use, a file it cannot read).
    pub fn check(&self) -> anyhow::Result<()> {
        let tls = self.tls.check()?.is_some();
        // Certificate files are read now too (the Workload API is asked
        // later: it may not be up yet).
        self.tls.check_files()?;
        if let Some(path) = &self.export_file {
            file::check_path(path)?;
        }
        for text in &self.grpc_addr {
            let addr = grpc::GrpcAddr::parse(text)?;
            if let grpc::GrpcAddr::Unix(path) = &addr {
                grpc::check_socket_path(path)?;
            }
            if let grpc::GrpcAddr::Tcp(hostport) = addr {
                let loopback = match hostport.parse::<std::net::SocketAddr>() {
                    Ok(a) => a.ip().is_loopback(),
                    // A host name: known once bound (`start` refuses then).
                    Err(_) => true,
                };
                if !tls && !loopback {
                    return Err(
                        grpc::GrpcError::PlaintextBeyondLoopback { addr: text.clone() }.into(),
                    );
                }
            }
        }
        Ok(())
    }
}

pub async fn start(args: &ExportArgs, state: &Arc<AgentState>) -> anyhow::Result<Started> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(path) = &args.export_file {
        let mut file = file::ExportFile::open(
            path,
            args.export_file_max_size_mb.saturating_mul(1024 * 1024),
            args.export_file_max_backups,
        )?;
        file.stats = state.metrics.export_file.clone();
        let sink = file::ExportFileSink::new(file).map_err(|e| {
            anyhow::anyhow!(
                "could not start the export file writer thread for {}: {e}",
                path.display()
            )
        })?;
        sinks.push(Box::new(sink));
    }
    sinks.push(Box::new(metrics::MetricsSink::new(state.metrics.clone())));
    let hub = Arc::new(hub::Hub::new(
        args.flow_buffer,
        args.stream_queue,
        MAX_SUBSCRIBERS,
        state.metrics.clone(),
    ));
    sinks.push(Box::new(hub::HubSink::new(hub.clone(), state.clone())));

    // TCP listeners wait for an SVID; the audit, /metrics and the health
    // endpoints (the kubelet's probes) and the Unix socket never do: an
    // agent whose SPIRE agent is not up yet (or is restarting) keeps
    // auditing, and its TCP listeners start once the Workload API answers.
    let (tls, no_svid) =
        match tokio::time::timeout(SVID_WAIT_AT_START, mtls::ServerTls::load(&args.tls)).await {
            Ok(Ok(tls)) => (tls, None),
            Ok(Err(e @ mtls::TlsError::WorkloadApi { .. })) => (None, Some(e.to_string())),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => (
                None,
                Some(format!(
                    "the SPIRE Workload API gave none within {} s",
                    SVID_WAIT_AT_START.as_secs()
                )),
            ),
        };
    let deferred: Vec<String> = match &no_svid {
        None => Vec::new(),
        Some(why) => {
            let tcp: Vec<String> = args
                .grpc_addr
                .iter()
                .filter(|a| !a.starts_with("unix://"))
                .cloned()
                .collect();
            tracing::warn!(error = %why, tcp = ?tcp, "no SVID yet: the TCP gRPC listeners start when the SPIRE Workload API answers; auditing, /metrics, /healthz and the Unix socket go on meanwhile");
            tcp
        }
    };
    // A port taken now fails the start, as it does without the wait.
    grpc::check_bind(&deferred)?;
    if let Some(tls) = &tls {
        tracing::info!(spiffe_id = %tls.spiffe_id(), allow_peer = ?args.tls.allow_peer, "TCP gRPC listeners use mTLS");
    }
    let metrics_addr =
        metrics::serve(args.metrics_addr, state.clone(), args.metrics_allow.clone()).await?;
    tracing::info!(addr = %metrics_addr, "metrics listening: /metrics, /healthz, /readyz");
    let now: Vec<String> = if deferred.is_empty() {
        args.grpc_addr.clone()
    } else {
        args.grpc_addr
            .iter()
            .filter(|a| a.starts_with("unix://"))
            .cloned()
            .collect()
    };
    let stop = grpc::GrpcStop::default();
    let grpc_addrs = grpc::serve(&now, hub.clone(), state.clone(), tls.as_ref(), &stop).await?;
    for addr in grpc_addrs {
        tracing::info!(addr = %addr, "gRPC flow stream listening");
    }
    if !deferred.is_empty() {
        tokio::spawn(serve_when_svid(
            deferred,
            args.tls.clone(),
            hub.clone(),
            state.clone(),
            stop.clone(),
        ));
    }
    Ok(Started {
        sinks,
        stream: StreamEnd { hub, grpc: stop },
    })
}

/// How long the agent's start waits for its SVID before it goes on
/// without (its TCP listeners then start in the background, see
/// [`serve_when_svid`]): a SPIRE agent that is up answers in milliseconds,
/// and the start must not hold up the kernel events' reader or the health
/// endpoints for the Workload API's whole 30 s wait (the liveness probe
/// killed an agent whose SPIRE agent was slow).
const SVID_WAIT_AT_START: std::time::Duration = std::time::Duration::from_secs(5);

/// Retries the Workload API until it gives an SVID, then serves `addrs`.
/// The first try is at once: the start's was cut short.
async fn serve_when_svid(
    addrs: Vec<String>,
    tls: mtls::TlsArgs,
    hub: Arc<hub::Hub>,
    state: Arc<AgentState>,
    stop: grpc::GrpcStop,
) {
    let mut backoff = crate::runtime::Backoff::new(
        std::time::Duration::from_secs(2),
        std::time::Duration::from_secs(30),
    );
    loop {
        match mtls::ServerTls::load(&tls).await {
            Ok(Some(server)) => {
                tracing::info!(spiffe_id = %server.spiffe_id(), allow_peer = ?tls.allow_peer, "TCP gRPC listeners use mTLS");
                match grpc::serve(&addrs, hub, state, Some(&server), &stop).await {
                    Ok(bound) => {
                        for addr in bound {
                            tracing::info!(addr = %addr, "gRPC flow stream listening");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "the TCP gRPC listeners could not start"),
                }
                return;
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "still no SVID from the SPIRE Workload API; retrying");
                tokio::time::sleep(backoff.next(None)).await;
            }
        }
    }
}
