//! `flowaudit relay`: one stream for the whole cluster. It reads every
//! node's agent over TCP gRPC with mTLS ([`peers`]), puts their flows in
//! time order within a bounded sort window ([`merge`]), joins the two
//! halves of connections seen on two nodes for subscribers that ask
//! ([`join`]), and serves the same `flowaudit.v1.FlowAudit` API as an agent
//! ([`service`]), so `flowaudit observe --server` and `flowaudit status
//! --server` work against it unchanged. Nodes come from `--peers` or from
//! the agents' pods through the Kubernetes API ([`discovery`]).
//!
//! The merger is one task between two bounded hand-overs: peer tasks wait
//! for room in its channel (the agents' own queues then drop for the relay
//! and say so, per node), and subscribers read from hubs that never wait
//! for them, so a slow client loses flows and is told, never slowing the
//! others.

pub mod discovery;
pub mod join;
pub mod merge;
pub mod metrics;
pub mod peers;
pub mod service;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use tokio::sync::mpsc;

use crate::export::hub::Hub;
use crate::export::metrics::Cidr;
use crate::export::mtls::{ClientTls, ServerTls, TlsArgs};
use crate::flow::FlowEvent;
use crate::runtime::LogFormat;
use join::{Joiner, Outcome};
use merge::SortWindow;
use peers::{PeerContext, Peers, RelayStats};

/// The relay's default `--grpc-addr` (Hubble Relay's port).
pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:4245";
/// The agents' TCP gRPC port the relay dials by default.
pub const DEFAULT_AGENT_PORT: u16 = 4244;
/// Flows the merger's channel holds before peer tasks wait.
const MERGE_CHANNEL: usize = 16 * 1024;
/// Halves the joiner holds at most.
const JOIN_MAX: usize = 1 << 16;

#[derive(Debug, Args)]
pub struct RelayArgs {
    /// This relay's name in status and its own notices (default: $POD_NAME, else the hostname).
    #[arg(long, env = "FLOWAUDIT_NAME", value_name = "NAME")]
    pub name: Option<String>,
    /// The agents to read, HOST:PORT, comma-separated or repeated (their
    /// `--grpc-addr` on TCP). Without it, --kubernetes finds them.
    #[arg(
        long,
        env = "FLOWAUDIT_PEERS",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    pub peers: Vec<String>,
    #[command(flatten)]
    pub discovery: discovery::KubernetesArgs,
    /// Where the relay serves `flowaudit.v1.FlowAudit`: HOST:PORT (mTLS
    /// beyond loopback) or unix:///PATH; repeatable.
    #[arg(long, env = "FLOWAUDIT_GRPC_ADDR", value_name = "ADDR", default_values_t = [DEFAULT_GRPC_ADDR.to_owned()], value_parser = crate::export::grpc::addr_arg)]
    pub grpc_addr: Vec<String>,
    /// /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "FLOWAUDIT_METRICS_ADDR",
        default_value = "0.0.0.0:9967",
        value_name = "ADDR",
        value_parser = crate::export::metrics::listen_addr
    )]
    pub metrics_addr: SocketAddr,
    /// Answer /metrics only to these source blocks (CIDR, repeatable); others get 403.
    #[arg(long, env = "FLOWAUDIT_METRICS_ALLOW", value_name = "CIDR", value_delimiter = ',', value_parser = Cidr::parse)]
    pub metrics_allow: Vec<Cidr>,
    /// The relay's SVID and trust bundle (`--workload-api`, or
    /// `--tls-cert/--tls-key/--tls-ca`), used both to serve (clients
    /// allowed by --allow-peer) and to dial the agents (--allow-agent).
    #[command(flatten)]
    pub tls: TlsArgs,
    /// SPIFFE ID the agents must present when the relay dials them,
    /// repeatable, globs as in policies (e.g.
    /// 'spiffe://demo.local/ns/flowaudit/sa/flowaudit'). Required with TLS.
    #[arg(
        long,
        env = "FLOWAUDIT_ALLOW_AGENT",
        value_name = "GLOB",
        value_delimiter = ','
    )]
    pub allow_agent: Vec<String>,
    /// Merged flows kept for `observe --last` and `--since`.
    #[arg(
        long,
        env = "FLOWAUDIT_FLOW_BUFFER",
        default_value_t = 16384,
        value_name = "N",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000)
    )]
    pub flow_buffer: usize,
    /// How long a flow waits for older flows from slower nodes before it
    /// goes out (time order across nodes holds within it): 500ms, 1s, ...
    #[arg(long, env = "FLOWAUDIT_SORT_WINDOW", allow_hyphen_values = true, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub sort_window: Duration,
    /// Flows the sort window holds at most; beyond, the oldest goes out at once.
    #[arg(long, env = "FLOWAUDIT_SORT_BUFFER", default_value_t = 100, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub sort_buffer: u64,
    /// How long one half of a connection waits for the other (`--join`
    /// subscribers) before it goes out alone.
    #[arg(long, env = "FLOWAUDIT_JOIN_WINDOW", allow_hyphen_values = true, default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    pub join_window: Duration,
    /// Flows asked of each node when first connected (the last N of its buffer).
    #[arg(
        long,
        env = "FLOWAUDIT_HISTORY",
        default_value_t = 1000,
        value_name = "N"
    )]
    pub history: u64,
    /// Most following subscribers at once.
    #[arg(
        long,
        env = "FLOWAUDIT_MAX_SUBSCRIBERS",
        default_value_t = 256,
        value_name = "N",
        value_parser = subscribers
    )]
    pub max_subscribers: usize,
    /// Log format on standard error.
    #[arg(long, env = "FLOWAUDIT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `--max-subscribers`: 0 would refuse every follower.
fn subscribers(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=65_536).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{s}`: the number of followers at once must be from 1 to 65536"
        )),
    }
}

/// `250ms`, `1s`, `2.5s`, `1m`: at most 60 s (flows wait in memory).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    // A sign is read with the number, so `-1s` is said to be out of range.
    let (num, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-')) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a duration like 500ms, 1s or 1.5s"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("`{s}`: the unit must be ms, s or m")),
    };
    if !(0.0..=60.0).contains(&secs) {
        return Err(format!("`{s}`: must be from 0 to 60 s"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(
        "no agents to read: pass --peers HOST:PORT,... or --kubernetes (on by default inside a cluster)"
    )]
    NoPeers,
    #[error(
        "TLS is configured but no --allow-agent: name the SPIFFE IDs the agents present, e.g. --allow-agent 'spiffe://demo.local/ns/flowaudit/sa/flowaudit'"
    )]
    NoAllowedAgent,
    #[error(
        "--allow-agent needs TLS: add --workload-api unix:///PATH or --tls-cert F --tls-key F --tls-ca F"
    )]
    AllowAgentWithoutTls,
    #[error("--peers {0}: {1}; expected HOST:PORT (IPv6 in brackets: [::1]:4244)")]
    Peer(String, String),
}

/// Everything the relay's front ends read.
pub struct RelayState {
    pub name: String,
    pub version: &'static str,
    pub started: SystemTime,
    pub raw: Arc<Hub>,
    pub joined: Arc<Hub>,
    pub peers: Arc<Peers>,
    pub stats: Arc<RelayStats>,
    pub metrics: Arc<metrics::RelayMetrics>,
}

impl crate::export::metrics::Exposition for RelayState {
    fn openmetrics(&self) -> String {
        self.metrics.openmetrics()
    }

    fn prometheus_text(&self) -> String {
        crate::export::metrics::prometheus_text(&self.metrics.openmetrics())
    }

    /// Ready once serving: nodes come and go, and their state is in
    /// `flowaudit status` and the metrics.
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
}

pub fn run(args: RelayArgs) -> anyhow::Result<()> {
    crate::runtime::init_logging(args.log_format);
    let format = args.log_format;
    crate::runtime::return_freed_memory_promptly();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return crate::runtime::end_with(Err(e.into()), format, "flowaudit relay"),
    };
    let result = runtime.block_on(async move {
        let relay = start(&args).await?;
        tracing::info!(
            grpc = ?relay.grpc,
            metrics = %relay.metrics_addr,
            "relay serving"
        );
        let signal = shutdown_signal().await;
        tracing::info!("{signal}: relay stopping");
        let why = format!("the flowaudit relay is stopping ({signal})");
        relay.stop(&why).await;
        anyhow::Ok(())
    });
    crate::runtime::end_with(result, format, "flowaudit relay")
}

/// Which signal asked the relay to stop.
async fn shutdown_signal() -> &'static str {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// A started relay (its tasks run until the runtime stops).
pub struct Running {
    pub state: Arc<RelayState>,
    pub grpc: Vec<crate::export::grpc::GrpcAddr>,
    pub metrics_addr: SocketAddr,
    stop: crate::export::grpc::GrpcStop,
    merge: Merge,
}

/// The merge task, and how to tell it to hand out what it holds and end.
struct Merge {
    flush: Arc<tokio::sync::Notify>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// How long a stopping relay waits for the merge task to hand out the
/// flows its sort window and joiner hold.
const MERGE_FLUSH_WAIT: Duration = Duration::from_secs(2);

impl Running {
    /// Hands out the flows the sort window and the joiner still hold (a
    /// stop loses none of what reached the relay), ends every follow stream
    /// with UNAVAILABLE saying `why` after them, then closes the gRPC
    /// servers (see [`crate::export::grpc::GrpcStop::stop`]).
    pub async fn stop(&self, why: &str) {
        self.merge.flush.notify_one();
        let task = self
            .merge
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = task
            && tokio::time::timeout(MERGE_FLUSH_WAIT, task).await.is_err()
        {
            tracing::warn!("the merge task did not hand out its held flows in time");
        }
        self.state.raw.close(why);
        self.state.joined.close(why);
        self.stop.stop().await;
    }
}

/// An agent's address, as its connection will be made: HOST:PORT (TCP,
/// where mTLS can be spoken).
fn check_peer(p: &str) -> Result<(), RelayError> {
    if p.trim().is_empty() {
        return Err(RelayError::Peer(
            p.to_owned(),
            "an empty entry (two commas in a row?)".into(),
        ));
    }
    match crate::export::grpc::GrpcAddr::parse(p) {
        Ok(crate::export::grpc::GrpcAddr::Tcp(_)) => Ok(()),
        Ok(crate::export::grpc::GrpcAddr::Unix(_)) => Err(RelayError::Peer(
            p.to_owned(),
            "an agent is followed over TCP (its --grpc-addr HOST:PORT)".into(),
        )),
        Err(crate::export::grpc::GrpcError::Addr(_, why)) => {
            Err(RelayError::Peer(p.to_owned(), why.into()))
        }
        Err(e) => Err(RelayError::Peer(p.to_owned(), e.to_string())),
    }
}

pub async fn start(args: &RelayArgs) -> anyhow::Result<Running> {
    for p in &args.peers {
        check_peer(p)?;
    }
    let kubernetes = args.discovery.enabled(!args.peers.is_empty());
    if args.peers.is_empty() && !kubernetes {
        return Err(RelayError::NoPeers.into());
    }
    let tls_on = args.tls.workload_api.is_some() || args.tls.tls_cert.is_some();
    match (tls_on, args.allow_agent.is_empty()) {
        (true, true) => return Err(RelayError::NoAllowedAgent.into()),
        (false, false) => return Err(RelayError::AllowAgentWithoutTls.into()),
        _ => {}
    }
    // Told as the relay's flag (the agents' allow list is given to the
    // client side as its --allow-peer).
    if let Err(crate::export::mtls::TlsError::AllowPeer { glob, reason }) =
        crate::export::mtls::AllowedPeers::parse(&args.allow_agent)
    {
        anyhow::bail!("--allow-agent {glob}: {reason}");
    }
    let server_tls = ServerTls::load(&args.tls).await?;
    let client_tls = ClientTls::load(&TlsArgs {
        allow_peer: args.allow_agent.clone(),
        ..args.tls.clone()
    })
    .await?;
    let version = env!("CARGO_PKG_VERSION");
    let name = crate::runtime::node_name(
        args.name
            .as_deref()
            .or(std::env::var("POD_NAME").ok().as_deref()),
    );
    let stream = Arc::new(metrics::StreamCounters::default());
    let hub = || {
        Arc::new(Hub::new(
            args.flow_buffer,
            1024,
            args.max_subscribers,
            stream.clone(),
        ))
    };
    let (raw, joined) = (hub(), hub());
    let stats = Arc::new(RelayStats::default());
    let (tx, rx) = mpsc::channel(MERGE_CHANNEL);
    let peers = Arc::new(Peers::new(PeerContext {
        tls: client_tls,
        flows: tx,
        raw: raw.clone(),
        joined: joined.clone(),
        history: args.history,
        stats: stats.clone(),
    }));
    let relay_metrics = Arc::new(metrics::RelayMetrics::new(
        version,
        stream.clone(),
        peers.clone(),
        stats.clone(),
    ));
    let state = Arc::new(RelayState {
        name,
        version,
        started: SystemTime::now(),
        raw: raw.clone(),
        joined: joined.clone(),
        peers: peers.clone(),
        stats: stats.clone(),
        metrics: relay_metrics.clone(),
    });
    let flush = Arc::new(tokio::sync::Notify::new());
    let merge_task = tokio::spawn(merge_task(
        rx,
        flush.clone(),
        SortWindow::new(
            args.sort_window,
            usize::try_from(args.sort_buffer).unwrap_or(usize::MAX),
        ),
        Joiner::new(args.join_window, JOIN_MAX),
        raw,
        joined,
        stats,
    ));
    let stop = crate::export::grpc::GrpcStop::default();
    let grpc = crate::export::grpc::serve_service(
        &args.grpc_addr,
        service::RelayService::new(state.clone()),
        server_tls.as_ref(),
        &stop,
    )
    .await?;
    let metrics_addr =
        crate::export::metrics::serve(args.metrics_addr, state.clone(), args.metrics_allow.clone())
            .await?;
    // Nodes are dialled once the relay's own listeners are up: a bad
    // --grpc-addr or --metrics-addr ends the start before any node is.
    for p in &args.peers {
        peers.upsert(p, None, p);
    }
    if kubernetes {
        discovery::spawn(&args.discovery, peers.clone()).await?;
    }
    Ok(Running {
        state,
        grpc,
        metrics_addr,
        stop,
        merge: Merge {
            flush,
            task: std::sync::Mutex::new(Some(merge_task)),
        },
    })
}

/// Flows in from every node; out in time order to the hub of plain
/// subscribers, and through the joiner to the hub of `join` subscribers.
/// On `flush` (the relay is stopping), or when every node's sender is
/// gone, it hands out everything it holds (what waits in its channel, its
/// sort window, the joiner's halves) and ends.
async fn merge_task(
    mut rx: mpsc::Receiver<Arc<FlowEvent>>,
    flush: Arc<tokio::sync::Notify>,
    mut window: SortWindow,
    mut joiner: Joiner,
    raw: Arc<Hub>,
    joined: Arc<Hub>,
    stats: Arc<RelayStats>,
) {
    let mut batch = Vec::with_capacity(256);
    // What goes out of this pass, handed to each hub at once.
    let (mut raw_out, mut joined_out) = (Vec::new(), Vec::new());
    loop {
        let deadline = match (window.next_deadline(), joiner.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let got = tokio::select! {
            n = rx.recv_many(&mut batch, 256) => n,
            _ = sleep => usize::MAX,
            _ = flush.notified() => {
                // No more in: what the channel holds comes out of it.
                rx.close();
                while rx.recv_many(&mut batch, 256).await > 0 {}
                0
            }
        };
        if got == 0 {
            // The relay is stopping (or every sender is gone): nothing more
            // comes, so nothing waits for anything.
            let now = Instant::now();
            stats
                .merged
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            for f in batch.drain(..) {
                window.push(f, now);
            }
            let mut out = Out {
                raw: &mut raw_out,
                joined: &mut joined_out,
                joiner: &mut joiner,
                stats: &stats,
            };
            for f in window.drain() {
                out.push(f, now);
            }
            for (f, outcome) in joiner.drain() {
                count(outcome, &stats);
                joined_out.push(f);
            }
            raw.publish_all(&mut raw_out);
            joined.publish_all(&mut joined_out);
            return;
        }
        let now = Instant::now();
        let n = batch.len() as u64;
        for f in batch.drain(..) {
            window.push(f, now);
        }
        stats.merged.fetch_add(n, Ordering::Relaxed);
        let mut out = Out {
            raw: &mut raw_out,
            joined: &mut joined_out,
            joiner: &mut joiner,
            stats: &stats,
        };
        while let Some(f) = window.pop_ready(now) {
            out.push(f, now);
        }
        stats
            .out_of_order
            .store(window.out_of_order(), Ordering::Relaxed);
        for (f, outcome) in joiner.expire(now) {
            count(outcome, &stats);
            joined_out.push(f);
        }
        raw.publish_all(&mut raw_out);
        joined.publish_all(&mut joined_out);
    }
}

/// One pass's output: every flow to the plain hub, and through the joiner
/// to the `join` hub.
struct Out<'a> {
    raw: &'a mut Vec<Arc<FlowEvent>>,
    joined: &'a mut Vec<Arc<FlowEvent>>,
    joiner: &'a mut Joiner,
    stats: &'a RelayStats,
}

impl Out<'_> {
    fn push(&mut self, f: Arc<FlowEvent>, now: Instant) {
        self.raw.push(f.clone());
        for (j, outcome) in self.joiner.push(f, now) {
            count(outcome, self.stats);
            self.joined.push(j);
        }
    }
}

fn count(outcome: Outcome, stats: &RelayStats) {
    match outcome {
        Outcome::Joined => stats.joined.fetch_add(1, Ordering::Relaxed),
        Outcome::Alone => stats.alone.fetch_add(1, Ordering::Relaxed),
        Outcome::Passed => 0,
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::CaptureStats;
    use crate::export::grpc;
    use crate::export::grpc::tests::follow;
    use crate::export::proto;
    use crate::export::state::AgentState;
    use crate::pipeline::PipelineStats;
    use clap::Parser;
    use tokio_stream::StreamExt;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        relay: RelayArgs,
    }

    /// An agent's gRPC side without capture: its hub, served on loopback TCP.
    async fn agent(name: &str) -> (Arc<Hub>, String) {
        let state = Arc::new(AgentState::new(
            name.into(),
            Arc::new(CaptureStats::default()),
            Arc::new(PipelineStats::default()),
        ));
        let hub = Arc::new(Hub::new(1 << 16, 1 << 20, 16, state.metrics.clone()));
        let stop = grpc::GrpcStop::default();
        let bound = grpc::serve(&["127.0.0.1:0".to_owned()], hub.clone(), state, None, &stop)
            .await
            .unwrap();
        (hub, bound[0].to_string())
    }

    /// Waits (at most 20 s) until the relay follows every peer.
    async fn wait_connected(relay: &Running) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while relay
            .state
            .peers
            .snapshot()
            .iter()
            .any(|p| p.state != peers::NodeState::Connected)
        {
            assert!(
                Instant::now() < deadline,
                "the relay never reached its peers"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn at_now(node: &str, seq: u64) -> Arc<FlowEvent> {
        let mut f = crate::export::hub::tests::sample_flow();
        f.node_name = node.into();
        f.socket.cookie = seq;
        f.time = crate::flow::FlowTime::now();
        Arc::new(f)
    }

    fn bench_result(id: &str, name: &str, value: f64, unit: &str, detail: &str) {
        println!(
            "bench-result: {}",
            serde_json::json!({"id": id, "name": name, "value": value, "unit": unit,
                "target": "", "met": null, "detail": detail})
        );
    }

    fn percentile(sorted: &[f64], p: f64) -> f64 {
        sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
    }

    /// The relay's added delay (p50, p99: from a flow's time at its agent
    /// to its arrival at a client of the relay, against a client of the
    /// agent itself) and its throughput with three nodes. Run with
    /// `cargo test --release -p flowaudit relay_throughput -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, run by `cargo xtask bench`; tests do not assert on time"]
    async fn relay_throughput() {
        let nodes = ["n1", "n2", "n3"];
        let mut agents = Vec::new();
        for n in nodes {
            agents.push(agent(n).await);
        }
        let peers: Vec<String> = agents.iter().map(|(_, a)| a.clone()).collect();
        let cli = Cli::parse_from([
            "relay",
            "--peers",
            &peers.join(","),
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--history",
            "0",
            "--flow-buffer",
            "1024",
        ]);
        let relay = start(&cli.relay).await.unwrap();
        wait_connected(&relay).await;
        let relay_addr = relay.grpc[0].to_string();
        // Delay at a steady rate, side by side: the relay's client and a
        // client of node n1's agent.
        for rate in [300u64, 3000] {
            let mut via_relay = follow(&relay_addr).await;
            let mut direct = follow(&agents[0].1).await;
            let per_node = rate * 3 / nodes.len() as u64; // 3 s of flows
            let collect = |mut s: tonic::Streaming<proto::GetFlowsResponse>, want: u64| {
                tokio::spawn(async move {
                    let mut delays = Vec::new();
                    while (delays.len() as u64) < want {
                        let Some(Ok(r)) = s.next().await else { break };
                        if let Some(proto::get_flows_response::Response::Flow(f)) = r.response {
                            let t = f.time.unwrap();
                            let sent = std::time::UNIX_EPOCH
                                + Duration::new(t.seconds as u64, t.nanos as u32);
                            delays.push(
                                SystemTime::now()
                                    .duration_since(sent)
                                    .unwrap_or_default()
                                    .as_secs_f64()
                                    * 1000.0,
                            );
                        }
                    }
                    delays
                })
            };
            let relay_task = collect(via_relay, per_node * nodes.len() as u64);
            let direct_task = collect(direct, per_node);
            let gap = Duration::from_secs_f64(nodes.len() as f64 / rate as f64);
            for seq in 0..per_node {
                for (i, (hub, _)) in agents.iter().enumerate() {
                    hub.publish(&at_now(nodes[i], seq));
                }
                tokio::time::sleep(gap).await;
            }
            let (mut r, mut d) = (relay_task.await.unwrap(), direct_task.await.unwrap());
            r.sort_by(f64::total_cmp);
            d.sort_by(f64::total_cmp);
            println!(
                "relay delay at {rate} flows/s from 3 nodes (sort window 1 s, buffer 100): relay p50 {:.1} ms p99 {:.1} ms ({} flows); agent alone p50 {:.1} ms p99 {:.1} ms",
                percentile(&r, 0.5),
                percentile(&r, 0.99),
                r.len(),
                percentile(&d, 0.5),
                percentile(&d, 0.99),
            );
            for (p, q) in [("p50", 0.5), ("p99", 0.99)] {
                bench_result(
                    &format!("relay_delay_{p}_{rate}"),
                    &format!("Relay added delay {p}, {rate} flows/s from 3 nodes"),
                    percentile(&r, q) - percentile(&d, q),
                    "ms",
                    &format!(
                        "flow time to a relay client {:.1} ms, to a client of the agent itself {:.1} ms; sort window 1 s, buffer 100 (defaults)",
                        percentile(&r, q),
                        percentile(&d, q)
                    ),
                );
            }
            via_relay = follow(&relay_addr).await;
            drop(via_relay);
            direct = follow(&agents[0].1).await;
            drop(direct);
        }
        // Throughput: every node publishes as fast as it can.
        let per_node = 100_000u64;
        let mut s = follow(&relay_addr).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let start_at = Instant::now();
        let consumer = tokio::spawn(async move {
            let (mut flows, mut lost) = (0u64, 0u64);
            while flows + lost < per_node * 3 {
                match tokio::time::timeout(Duration::from_secs(5), s.next()).await {
                    Ok(Some(Ok(r))) => match r.response {
                        Some(proto::get_flows_response::Response::Flow(_)) => flows += 1,
                        Some(proto::get_flows_response::Response::LostEvents(l)) => lost += l.count,
                        _ => {}
                    },
                    _ => break,
                }
            }
            (flows, lost, start_at.elapsed())
        });
        let mut producers = Vec::new();
        for (i, (hub, _)) in agents.iter().enumerate() {
            let (hub, node) = (hub.clone(), nodes[i]);
            producers.push(tokio::task::spawn_blocking(move || {
                // In bursts, as an agent's pipeline hands them over.
                let mut burst = Vec::new();
                for seq in 0..per_node {
                    burst.push(at_now(node, seq));
                    if burst.len() == 256 {
                        hub.publish_all(&mut burst);
                    }
                }
                hub.publish_all(&mut burst);
            }));
        }
        for p in producers {
            p.await.unwrap();
        }
        let (flows, lost, took) = consumer.await.unwrap();
        let out_of_order = relay.state.stats.out_of_order.load(Ordering::Relaxed);
        bench_result(
            "relay_throughput",
            "Relay throughput, 3 nodes publishing at full speed, one client",
            flows as f64 / took.as_secs_f64(),
            "flows/s",
            &format!(
                "{flows} of {} delivered, {lost} told lost, {out_of_order} out of order; agents, relay and client share 2 cores",
                per_node * 3
            ),
        );
        println!(
            "relay throughput with 3 nodes: {:.0} flows/s delivered to one client ({flows} of {}, {lost} told lost, {out_of_order} out of order) in {:.2} s",
            flows as f64 / took.as_secs_f64(),
            per_node * 3,
            took.as_secs_f64()
        );
    }

    /// A stop hands out what the sort window still holds: with a 60 s
    /// window, flows that reached the relay come out at the stop, in time
    /// order, before the stream ends as a stop (UNAVAILABLE, the reason,
    /// the stopping mark), not as a broken stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_hands_out_the_flows_the_sort_window_holds() {
        let (hub, addr) = agent("n1").await;
        let cli = Cli::parse_from([
            "relay",
            "--peers",
            &addr,
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--sort-window",
            "60s",
        ]);
        let relay = start(&cli.relay).await.unwrap();
        wait_connected(&relay).await;
        let mut stream = follow(&relay.grpc[0].to_string()).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        // Published newest first: the window puts them back in order.
        let flows: Vec<_> = (0..3).map(|seq| at_now("n1", seq)).collect();
        for f in flows.iter().rev() {
            hub.publish(f);
        }
        while relay.state.stats.merged.load(Ordering::Relaxed) < 3 {
            assert!(Instant::now() < deadline, "the relay never got the 3 flows");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Held for 60 s: nothing has come out yet.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), stream.next())
                .await
                .is_err(),
            "the window let a flow out early"
        );
        let why = "the flowaudit relay is stopping (SIGTERM)";
        let stopping = tokio::spawn(async move { relay.stop(why).await });
        let mut got = Vec::new();
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
                Ok(Some(Ok(r))) => {
                    if let Some(proto::get_flows_response::Response::Flow(f)) = r.response {
                        got.push(f.socket.unwrap().cookie);
                    }
                }
                Ok(Some(Err(status))) => break status,
                other => panic!("the stream did not end with a status: {other:?}; flows {got:?}"),
            }
        };
        assert_eq!(got, vec![0, 1, 2], "the held flows, in time order");
        assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
        assert_eq!(end.message(), why);
        assert!(grpc::is_stopping(&end), "not marked as a stop: {end:?}");
        stopping.await.unwrap();
    }

    /// A TCP proxy on loopback to `to` whose traffic can be stopped both
    /// ways, as by a frozen agent or a node gone without closing its
    /// connections: they stay open and nothing comes back.
    async fn freezable_proxy(to: String) -> (String, Arc<std::sync::atomic::AtomicBool>) {
        use std::sync::atomic::AtomicBool;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        async fn pipe(
            mut from: tokio::net::tcp::OwnedReadHalf,
            mut to: tokio::net::tcp::OwnedWriteHalf,
            frozen: Arc<AtomicBool>,
        ) {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                while frozen.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // Cancel-safe: a read cut short by the timeout took nothing.
                let n = match tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf))
                    .await
                {
                    Err(_) => continue,
                    Ok(Ok(0) | Err(_)) => return,
                    Ok(Ok(n)) => n,
                };
                while frozen.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&to).await else {
                    continue;
                };
                let ((cr, cw), (sr, sw)) = (client.into_split(), server.into_split());
                tokio::spawn(pipe(cr, sw, f.clone()));
                tokio::spawn(pipe(sr, cw, f.clone()));
            }
        });
        (addr, frozen)
    }

    /// An agent that stops answering while its connection stays open is
    /// shown UNAVAILABLE within the keepalive's interval and wait (it was
    /// "connected" for good), and comes BACK when it answers again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_that_stops_answering_is_shown_unavailable_then_back() {
        let (_hub, addr) = agent("n1").await;
        let (proxy, frozen) = freezable_proxy(addr).await;
        let cli = Cli::parse_from([
            "relay",
            "--peers",
            &proxy,
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ]);
        let relay = start(&cli.relay).await.unwrap();
        wait_connected(&relay).await;
        let node = || relay.state.peers.snapshot().remove(0);
        frozen.store(true, Ordering::SeqCst);
        let frozen_at = Instant::now();
        let deadline = frozen_at + grpc::KEEPALIVE * 2 + Duration::from_secs(20);
        while node().state != peers::NodeState::Unavailable {
            assert!(
                Instant::now() < deadline,
                "still {:?} ({}) {:?} after the agent stopped answering",
                node().state,
                node().detail,
                frozen_at.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let unavailable = node().detail;
        frozen.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        while node().state != peers::NodeState::Back {
            assert!(
                Instant::now() < deadline,
                "not back after the agent answers again: {:?} ({}); unavailable because: {unavailable}",
                node().state,
                node().detail
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        relay.stop("test over").await;
    }

    /// A listener of the relay's own that cannot be bound ends the start
    /// before any node is dialled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_listener_ends_the_start_before_any_node_is_dialled() {
        let node = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        node.set_nonblocking(true).unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cli = Cli::parse_from([
            "relay",
            "--peers",
            &node.local_addr().unwrap().to_string(),
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            &taken.local_addr().unwrap().to_string(),
        ]);
        assert!(
            start(&cli.relay).await.is_err(),
            "the metrics port is taken"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            node.accept().map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::WouldBlock),
            "the node was dialled"
        );
    }

    /// A node down before a follower came is told to it first (notices
    /// are sent on a change, so it learnt nothing of it before).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_learns_of_the_nodes_down_already() {
        let (_hub, addr) = agent("n1").await;
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = closed.local_addr().unwrap().to_string();
        drop(closed);
        let cli = Cli::parse_from([
            "relay",
            "--peers",
            &format!("{addr},{dead}"),
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ]);
        let relay = start(&cli.relay).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let states = || {
            relay
                .state
                .peers
                .snapshot()
                .iter()
                .map(|p| (p.address.clone(), p.state))
                .collect::<Vec<_>>()
        };
        while !states()
            .iter()
            .any(|(a, s)| *a == dead && *s == peers::NodeState::Unavailable)
            || !states()
                .iter()
                .any(|(a, s)| *a == addr && *s == peers::NodeState::Connected)
        {
            assert!(Instant::now() < deadline, "{:?}", states());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut stream = follow(&relay.grpc[0].to_string()).await;
        let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a notice at once")
            .expect("the stream is open")
            .expect("not an error");
        let Some(proto::get_flows_response::Response::NodeStatus(n)) = first.response else {
            panic!("expected a node status first, got {first:?}");
        };
        assert_eq!(n.state, proto::NodeState::Unavailable as i32, "{n:?}");
        assert_eq!(n.address, dead);
        assert!(n.message.contains("Connection refused"), "{n:?}");
        // Only the node that is down: the connected one says nothing.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), stream.next())
                .await
                .is_err(),
            "a second notice"
        );
        relay.stop("test over").await;
    }

    #[tokio::test]
    async fn a_bad_allow_agent_is_named_as_such() {
        let cli = Cli::parse_from([
            "relay",
            "--peers",
            "127.0.0.1:4244",
            "--tls-cert",
            "/nonexistent/relay.pem",
            "--tls-key",
            "/nonexistent/relay.key",
            "--tls-ca",
            "/nonexistent/ca.pem",
            "--allow-peer",
            "spiffe://demo.local/ns/ops/**",
            "--allow-agent",
            "bogus",
        ]);
        let e = start(&cli.relay).await.err().expect("refused").to_string();
        assert!(
            e.starts_with("--allow-agent bogus: `bogus` is not a SPIFFE ID"),
            "{e}"
        );
    }

    #[test]
    fn max_subscribers_is_at_least_one() {
        let e = Cli::try_parse_from(["relay", "--peers", "a:1", "--flow-buffer", "0"])
            .err()
            .expect("--flow-buffer 0 accepted")
            .to_string();
        assert!(e.contains("0 is not in 1..="), "{e}");
        for bad in ["0", "x", "65537"] {
            let e = Cli::try_parse_from(["relay", "--peers", "a:1", "--max-subscribers", bad])
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"))
                .to_string();
            assert!(e.contains("must be from 1 to 65536"), "{bad}: {e}");
        }
        let ok = Cli::try_parse_from(["relay", "--peers", "a:1", "--max-subscribers", "1"]);
        assert_eq!(ok.map(|c| c.relay.max_subscribers).ok(), Some(1));
    }

    #[test]
    fn peers_are_checked_as_their_connections_will_be_made() {
        check_peer("10.244.1.2:4244").unwrap();
        check_peer("[fd00::2]:4244").unwrap();
        for (bad, why) in [
            ("::1:4244", "an IPv6 address goes in brackets"),
            ("", "an empty entry (two commas in a row?)"),
            (
                "unix:///run/flowaudit.sock",
                "an agent is followed over TCP (its --grpc-addr HOST:PORT)",
            ),
        ] {
            assert_eq!(
                check_peer(bad).unwrap_err().to_string(),
                format!("--peers {bad}: {why}; expected HOST:PORT (IPv6 in brackets: [::1]:4244)")
            );
        }
    }

    #[test]
    fn durations_parse_with_units_and_bad_ones_are_named() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        for bad in ["", "s", "1h", "2m", "-1s", "1.2.3s", "é"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
        assert_eq!(
            parse_duration("-1s").unwrap_err(),
            "`-1s`: must be from 0 to 60 s"
        );
        // On the command line too, where clap took `-1s` for a flag.
        for flag in ["--sort-window", "--join-window"] {
            let e = Cli::try_parse_from(["relay", "--peers", "a:1", flag, "-1s"])
                .err()
                .unwrap_or_else(|| panic!("{flag} -1s accepted"))
                .to_string();
            assert!(
                e.contains(flag) && e.contains("`-1s`: must be from 0 to 60 s"),
                "{flag}: {e}"
            );
        }
    }
}
