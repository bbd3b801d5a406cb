//! `flowaudit agent`: the node daemon. Attaches the kernel capture, runs the
//! pipeline, reports kernel losses as they happen, and on SIGINT/SIGTERM
//! drains what the kernel already recorded before detaching.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use crate::capture::Capture;
use crate::endpoints::EndpointDirectory;
use crate::identity::Enricher;
use crate::identity::cgroup::CgroupResolver;
use crate::identity::spire::{SpireClient, SpireOptions};
use crate::judge::Judge;
use crate::pipeline::{Pipeline, PipelineStats};
use crate::state::AgentState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Name of this node in flow events (default: $NODE_NAME, else the hostname).
    #[arg(long, env = "FLOWAUDIT_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Intended policy: a file or directory of FlowPolicy, CiliumNetworkPolicy
    /// or NetworkPolicy YAML (repeatable). Reloaded on change; an invalid new
    /// version is rejected and the last good one stays in force.
    #[arg(
        long,
        env = "FLOWAUDIT_POLICY",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub policy: Vec<PathBuf>,
    /// The SPIRE agent's admin socket (Delegated Identity API); `none` disables
    /// attestation (local ends then get DERIVED identities).
    #[arg(
        long,
        env = "FLOWAUDIT_SPIRE_ADMIN_SOCKET",
        value_name = "PATH",
        default_value = "/run/spire/admin-sockets/admin.sock"
    )]
    pub spire_admin_socket: String,
    /// Static endpoint directory (YAML: pods and nodes by address), for nodes
    /// without the Kubernetes API and for tests. Reloaded on change.
    #[arg(long, env = "FLOWAUDIT_ENDPOINTS", value_name = "PATH")]
    pub endpoints: Option<PathBuf>,
    /// Trust domain for DERIVED identities (default: the policy's, else the
    /// first attested identity's).
    #[arg(long, env = "FLOWAUDIT_TRUST_DOMAIN", value_name = "DOMAIN")]
    pub trust_domain: Option<String>,
    /// How long a flow may wait for SPIRE to attest its local end before it
    /// goes out with an UNKNOWN identity (counted).
    #[arg(
        long,
        env = "FLOWAUDIT_IDENTITY_WAIT_MS",
        default_value_t = 500,
        value_name = "MS"
    )]
    pub identity_wait_ms: u64,
    #[command(flatten)]
    pub export: crate::export::ExportArgs,
    /// Log format on standard error.
    #[arg(long, env = "FLOWAUDIT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

pub fn node_name(explicit: Option<&str>) -> String {
    if let Some(n) = explicit.filter(|n| !n.is_empty()) {
        return n.to_owned();
    }
    if let Ok(n) = std::env::var("NODE_NAME") {
        if !n.is_empty() {
            return n;
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOWAUDIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: AgentArgs) -> anyhow::Result<()> {
    let node = node_name(args.node_name.as_deref());
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;

    // Policy and endpoints are read before anything is attached: a typo
    // there stops the agent with the file and line, not half-way.
    let policy = match args.policy.is_empty() {
        true => {
            tracing::warn!(
                "no --policy: flows are captured and identified but not judged (verdict UNKNOWN)"
            );
            None
        }
        false => Some(crate::judge::load_initial(&args.policy)?),
    };
    let mut capture = Capture::start()?;
    let (tx, rx) = mpsc::channel(16 * 1024);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let reader = capture.spawn_reader(tx, shutdown_rx)?;
    let pipeline_stats = Arc::new(PipelineStats::default());
    let state = Arc::new(AgentState::new(
        node.clone(),
        capture.stats.clone(),
        pipeline_stats.clone(),
    ));
    let sinks = crate::export::start(&args.export, &state).await?;
    let (enricher, judge) = start_identity_and_policy(&args, &capture, policy)?;
    let pipeline = tokio::spawn(
        Pipeline::new(
            node.clone(),
            Some(enricher),
            judge,
            sinks,
            pipeline_stats.clone(),
            Duration::from_millis(args.identity_wait_ms),
        )
        .run(rx),
    );
    tracing::info!(
        node = %node,
        cgroup_root = %capture.cgroup_root.display(),
        offsets = ?capture.offsets,
        export_file = ?args.export.export_file,
        "agent ready: sock_ops attached to the cgroup v2 root"
    );

    state.attached.store(true, Ordering::Relaxed);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => report_losses(&capture),
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break }
        }
    }
    // Stop reading only after draining what the kernel has already written.
    let _ = shutdown_tx.send(true);
    let _ = reader.await;
    let _ = pipeline.await;
    report_losses(&capture);
    let stats = &capture.stats;
    tracing::info!(
        kernel_records = stats.records.load(Ordering::Relaxed),
        malformed_records = stats.malformed.load(Ordering::Relaxed),
        kernel_events_lost = stats.events_lost(),
        flows = pipeline_stats.flows.load(Ordering::Relaxed),
        "agent stopped; programs detached"
    );
    drop(capture);
    Ok(())
}

/// Starts the endpoint directory and policy watchers and the SPIRE client.
fn start_identity_and_policy(
    args: &AgentArgs,
    capture: &Capture,
    policy: Option<flowaudit_policy::Loaded>,
) -> anyhow::Result<(Enricher, Judge)> {
    let endpoints = match &args.endpoints {
        Some(path) => {
            let dir = EndpointDirectory::load(path)?;
            tracing::info!(path = %path.display(), pods = dir.len(), "endpoint directory loaded");
            let (tx, rx) = watch::channel(Arc::new(dir));
            tokio::spawn(crate::endpoints::watch_file(path.clone(), tx));
            Some(rx)
        }
        None => None,
    };
    let mut trust_domain = args.trust_domain.clone();
    let judge = match policy {
        Some(loaded) => {
            for w in &loaded.warnings {
                tracing::warn!(%w, "policy warning");
            }
            tracing::info!(
                version = loaded.policy.version(),
                rules = loaded.policy.rule_count(),
                files = loaded.files.len(),
                "policy loaded"
            );
            if trust_domain.is_none() {
                trust_domain = loaded.policy.trust_domains().first().cloned();
            }
            let (tx, rx) = watch::channel(Arc::new(loaded.policy));
            tokio::spawn(crate::judge::watch_policies(
                args.policy.clone(),
                tx,
                Box::new(|_, _| {}),
            ));
            Judge { policy: Some(rx) }
        }
        None => Judge { policy: None },
    };
    let spire = match args.spire_admin_socket.as_str() {
        "" | "none" => {
            tracing::info!("SPIRE attestation disabled: local ends get DERIVED identities");
            None
        }
        path => Some(SpireClient::start(
            PathBuf::from(path),
            SpireOptions::default(),
        )),
    };
    let cgroups = CgroupResolver::new(capture.cgroup_root.clone());
    Ok((
        Enricher::new(endpoints, cgroups, spire, trust_domain),
        judge,
    ))
}

fn report_losses(capture: &Capture) {
    for (place, n) in capture.poll_losses() {
        tracing::warn!(
            place = place.name(),
            lost = n,
            total = capture.stats.lost[place as usize].load(Ordering::Relaxed),
            "kernel could not deliver records"
        );
    }
}
