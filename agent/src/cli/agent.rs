//! `flowaudit agent`: the node daemon. Attaches the kernel capture, runs the
//! pipeline, reports kernel losses as they happen, and on SIGINT/SIGTERM
//! drains what the kernel already recorded before detaching, then ends the
//! gRPC streams with those flows and a status saying why.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use crate::capture::Capture;
use crate::endpoints::EndpointDirectory;
use crate::export::state::{AgentState, PolicyStatus};
use crate::identity::Enricher;
use crate::identity::cgroup::CgroupResolver;
use crate::identity::spire::{SpireClient, SpireObserver, SpireOptions};
use crate::judge::Judge;
use crate::pipeline::{Pipeline, PipelineStats};
use crate::runtime::{LogFormat, init_logging, node_name};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttestBy {
    Auto,
    Selectors,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Name of this node in flow events (default: $NODE_NAME, else the hostname).
    #[arg(long, env = "FLOWAUDIT_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Intended policy: a file or directory of FlowPolicy, CiliumNetworkPolicy
    /// or NetworkPolicy YAML (repeatable, or several separated by commas).
    /// Reloaded on change; an invalid new version is rejected and the last
    /// good one stays in force.
    #[arg(
        long,
        env = "FLOWAUDIT_POLICY",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub policy: Vec<PathBuf>,
    /// How MTLS_UNVERIFIED (TLS whose client certificate cannot be observed,
    /// as in TLS 1.3, or encryption not seen) counts under a rule that
    /// requires mTLS: `report` (a finding; the verdict stays COMPLIANT) or
    /// `violation` (a VIOLATION, as MTLS_MISSING is).
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        default_value_t = flowaudit_policy::cli::MtlsUnverified::Report,
        env = "FLOWAUDIT_MTLS_UNVERIFIED"
    )]
    pub mtls_unverified: flowaudit_policy::cli::MtlsUnverified,
    /// The SPIRE agent's admin socket (Delegated Identity API): its path
    /// (`unix://` before it is taken too); `none` disables attestation
    /// (local ends then get DERIVED identities).
    #[arg(
        long,
        env = "FLOWAUDIT_SPIRE_ADMIN_SOCKET",
        value_name = "PATH",
        default_value = crate::identity::spire::DEFAULT_ADMIN_SOCKET,
        value_parser = admin_socket
    )]
    pub spire_admin_socket: String,
    /// How workloads are asked about: `auto` (by pid where the SPIRE agent
    /// accepts it, 1.10.2+, else by the selectors of the pod found from the
    /// socket's cgroup) or `selectors` (always by the pod's selectors).
    #[arg(
        long,
        env = "FLOWAUDIT_SPIRE_ATTEST_BY",
        value_enum,
        default_value_t = AttestBy::Auto,
        value_name = "MODE"
    )]
    pub spire_attest_by: AttestBy,
    /// Static endpoint directory (YAML: pods and nodes by address), for nodes
    /// without the Kubernetes API and for tests. Reloaded on change.
    #[arg(
        long,
        env = "FLOWAUDIT_ENDPOINTS",
        value_name = "PATH",
        conflicts_with = "kubernetes"
    )]
    pub endpoints: Option<PathBuf>,
    /// Watch pods and nodes through the Kubernetes API for the endpoint
    /// directory (default: on when KUBERNETES_SERVICE_HOST is set and no
    /// --endpoints is given).
    #[arg(long, env = "FLOWAUDIT_KUBERNETES")]
    pub kubernetes: bool,
    /// Trust domain for DERIVED identities (default: the policy's, followed
    /// as it is reloaded; else the SPIRE agent's, or the first attested
    /// identity's).
    #[arg(long, env = "FLOWAUDIT_TRUST_DOMAIN", value_name = "DOMAIN", value_parser = trust_domain)]
    pub trust_domain: Option<String>,
    /// How long a flow may wait for SPIRE to attest its local end before it
    /// goes out with a DERIVED identity from its pod (identity_detail says
    /// so; counted in flowaudit_identity_lookups_total).
    #[arg(
        long,
        env = "FLOWAUDIT_IDENTITY_WAIT_MS",
        value_parser = wait_ms,
        default_value_t = 500,
        value_name = "MS"
    )]
    pub identity_wait_ms: u64,
    /// How long a CONNECT may wait for its first payload bytes to show
    /// plaintext, TLS or mTLS before it goes out with encryption UNKNOWN (the
    /// CLOSE then carries what was seen); 0 sends CONNECTs at once.
    #[arg(
        long,
        env = "FLOWAUDIT_ENCRYPTION_WAIT_MS",
        value_parser = wait_ms,
        default_value_t = 250,
        value_name = "MS"
    )]
    pub encryption_wait_ms: u64,
    /// Size of the kernel ring buffer that carries records to the agent, in
    /// MiB (a power of two). It absorbs bursts while the agent catches up;
    /// what does not fit is counted as lost, never silently dropped.
    #[arg(
        long,
        env = "FLOWAUDIT_RING_BUFFER_MIB",
        default_value_t = 32,
        value_parser = ring_buffer_mib,
        value_name = "MIB"
    )]
    pub ring_buffer_mib: u32,
    /// How often the agent reads the kernel ring buffer, in milliseconds.
    /// The kernel programs do not wake the agent for each record: it reads
    /// whatever came on each tick, so a flow reaches the sinks up to this
    /// much later, and the agent wakes this often instead of once per record.
    /// After 20 ticks that found nothing it stops ticking, and the next
    /// record wakes it.
    #[arg(
        long,
        env = "FLOWAUDIT_RING_POLL_MS",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..=1000),
        value_name = "MS"
    )]
    pub ring_poll_ms: u64,
    /// Sockets whose first payload bytes (the TLS handshake) are watched at
    /// once, node-wide; a socket holds its place from the handshake until
    /// it closes. Beyond it a connection's encryption is UNKNOWN with the
    /// reason `not_watched` (an mTLS rule then gives MTLS_UNVERIFIED),
    /// counted at `payload_map_full`. The state lives in each socket's own
    /// kernel storage (32 bytes), so this bounds work, not a map.
    #[arg(
        long,
        env = "FLOWAUDIT_PAYLOAD_SOCKETS",
        default_value_t = flowaudit_common::SOCKETS_MAX,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(flowaudit_common::SOCKETS_MAX)),
        value_name = "N"
    )]
    pub payload_sockets: u32,
    /// Copy the first payload bytes of each connection (cgroup_skb
    /// programs) to tell plaintext, TLS and mTLS apart. `false` leaves those
    /// programs unattached: encryption is then UNKNOWN with the reason
    /// `not_watched` for every connection (an mTLS rule gives
    /// MTLS_UNVERIFIED). For measuring what payload capture costs, or for
    /// nodes where only connections matter.
    #[arg(
        long,
        env = "FLOWAUDIT_PAYLOAD_CAPTURE",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    pub payload_capture: bool,
    /// Where Cilium pins its BPF maps. Flows under a CiliumNetworkPolicy
    /// rule with `authentication.mode: required` are judged by Cilium's auth
    /// map there (`cilium_auth_map`, with `cilium_ipcache[_v2]` and
    /// `cilium_node_map[_v2]`), opened read-only. Without them such flows
    /// get MTLS_UNVERIFIED ("not observable here"), never MTLS_MISSING.
    #[arg(
        long,
        env = "FLOWAUDIT_CILIUM_BPF_DIR",
        default_value = crate::cilium::DEFAULT_DIR,
        value_name = "DIR"
    )]
    pub cilium_bpf_dir: PathBuf,
    #[command(flatten)]
    pub export: crate::export::ExportArgs,
    /// Log format on standard error.
    #[arg(long, env = "FLOWAUDIT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The longest `--identity-wait-ms` / `--encryption-wait-ms`: parked flows
/// sit in memory meanwhile, and a flow held longer is stale news.
pub const MAX_WAIT_MS: u64 = 60_000;

fn wait_ms(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if n <= MAX_WAIT_MS => Ok(n),
        _ => Err(format!(
            "`{s}`: the wait must be a number of milliseconds from 0 to {MAX_WAIT_MS}"
        )),
    }
}

fn trust_domain(s: &str) -> Result<String, String> {
    match flowaudit_policy::spiffe::valid_trust_domain(s) {
        true => Ok(s.to_owned()),
        false => Err(format!(
            "`{s}` is not a trust domain: lower-case letters, digits, `.`, `-` and `_` (e.g. demo.local), without `spiffe://`"
        )),
    }
}

fn ring_buffer_mib(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of MiB"))?;
    if !(1..=1024).contains(&n) || !n.is_power_of_two() {
        return Err(format!(
            "{n} MiB: the ring buffer size must be a power of two from 1 to 1024 MiB"
        ));
    }
    Ok(n)
}

/// `--spire-admin-socket`: `none`, or an absolute path, which may be
/// written as a URI (`unix:///run/...`, as `--workload-api` is). An empty
/// value (an unset variable in a manifest) is refused rather than taken as
/// `none`: it would silently turn attestation off.
fn admin_socket(s: &str) -> Result<String, String> {
    let path = s.strip_prefix("unix://").unwrap_or(s);
    match path {
        "none" if path == s => Ok(s.to_owned()),
        "" => Err(
            "empty: give the SPIRE agent's admin socket path, or `none` to run without SPIRE"
                .to_owned(),
        ),
        p if p.starts_with('/') => Ok(p.to_owned()),
        _ => Err(format!(
            "`{s}`: the admin socket's path must be absolute, e.g. {}",
            crate::identity::spire::DEFAULT_ADMIN_SOCKET
        )),
    }
}

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let format = args.log_format;
    crate::runtime::return_freed_memory_promptly();
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run_async(args)));
    crate::runtime::end_with(result, format, "flowaudit agent")
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
    args.export.check()?;
    // The first version, followed by `start_endpoints` from then on.
    let endpoints_file = args
        .endpoints
        .as_deref()
        .map(EndpointDirectory::load)
        .transpose()?;
    let mut capture = Capture::start(
        args.ring_buffer_mib << 20,
        args.payload_sockets,
        args.payload_capture,
    )?;
    let (tx, rx) = mpsc::channel(crate::capture::READ_QUEUE);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let reader = capture.reader(tx)?;
    let pipeline_stats = Arc::new(PipelineStats::default());
    let state = Arc::new(AgentState::new(
        node.clone(),
        capture.stats.clone(),
        pipeline_stats.clone(),
    ));
    let crate::export::Started { sinks, stream } =
        crate::export::start(&args.export, &state).await?;
    let mut watchers = crate::runtime::Watchers::default();
    let endpoints = start_endpoints(&args, endpoints_file, &state, &mut watchers).await?;
    let (enricher, judge) =
        start_identity_and_policy(&args, endpoints, &capture, policy, &state, &mut watchers)?;
    let spire = enricher.spire.clone();
    let mut spire_seen: SpireSeen = None;
    let pipeline = Pipeline::new(
        node.as_str().into(),
        Some(enricher),
        judge,
        sinks,
        pipeline_stats.clone(),
        Duration::from_millis(args.identity_wait_ms),
        Duration::from_millis(args.encryption_wait_ms),
    );
    let poll = Duration::from_millis(args.ring_poll_ms);
    let mut flows = crate::runtime::spawn_own_thread(
        "flowaudit-flows",
        run_flows(reader, pipeline, rx, shutdown_rx, poll),
    )?;
    // Ready (for /readyz) before saying so in the log.
    state.attached.store(true, Ordering::Relaxed);
    tracing::info!(
        node = %node,
        cgroup_root = %capture.cgroup_root.display(),
        offsets = ?capture.offsets,
        features = ?capture.features,
        export_file = ?args.export.export_file,
        "agent ready: sock_ops attached to the cgroup v2 root"
    );
    for d in &capture.stats.degradations {
        tracing::warn!(
            name = d.name,
            reason = %d.reason,
            lost = d.lost,
            "this kernel does not give a fact: the agent runs without it"
        );
    }

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let signal = loop {
        tokio::select! {
            _ = tick.tick() => {
                report_losses(&capture);
                if let Some(spire) = &spire {
                    report_spire(spire, &state, &mut spire_seen);
                    state.report_identity_cache(spire.status().cached_workloads as u64);
                }
            }
            _ = sigint.recv() => break "SIGINT",
            _ = sigterm.recv() => break "SIGTERM",
            // Only a failure ends it before shutdown: the agent would
            // look alive and report nothing.
            ended = flows.finished() => {
                let why = match ended {
                    Ok(Ok(())) => anyhow::anyhow!("the ring reader and the pipeline stopped"),
                    Ok(Err(e)) | Err(e) => e,
                };
                capture.detach();
                return Err(why.context("flows are no longer read: the agent stops"));
            }
            why = watchers.ended() => {
                capture.detach();
                return Err(why.context("the agent stops rather than judge flows by a state that no longer changes"));
            }
        }
    };
    tracing::info!("{signal}: stopping");
    // Detach first, then drain: once no program runs, the reader's final
    // drain sees every record the kernel ever wrote.
    capture.detach();
    let _ = shutdown_tx.send(true);
    // The rest of the shutdown goes on after a failure; it is the exit's.
    let flows_ended = flows.finished().await.and_then(|ended| ended);
    if let Err(e) = &flows_ended {
        tracing::error!(error = %format!("{e:#}"), "the flows thread failed while stopping");
    }
    // Every flow is with the stream's subscribers now: each stream ends
    // with them, then with a status saying why.
    let why = format!("the flowaudit agent on node {node} is stopping ({signal})");
    stream.stop(&why).await;
    report_losses(&capture);
    let stats = &capture.stats;
    tracing::info!(
        kernel_records = stats.records.load(Ordering::Relaxed),
        malformed_records = stats.malformed.load(Ordering::Relaxed),
        kernel_events_lost = stats.events_lost(),
        ring_reader_sleeps = stats.reader_sleeps.load(Ordering::Relaxed),
        ring_reader_kernel_wakeups = stats.reader_kernel_wakeups.load(Ordering::Relaxed),
        flows = pipeline_stats.flows.load(Ordering::Relaxed),
        identity_waits = pipeline_stats.identity_waits.load(Ordering::Relaxed),
        identity_wait_us_mean = pipeline_stats
            .identity_wait_us_total
            .load(Ordering::Relaxed)
            / pipeline_stats.identity_waits.load(Ordering::Relaxed).max(1),
        identity_wait_us_max = pipeline_stats.identity_wait_us_max.load(Ordering::Relaxed),
        identity_timeouts = pipeline_stats.identity_timeouts.load(Ordering::Relaxed),
        "agent stopped; programs detached"
    );
    drop(capture);
    flows_ended
}

/// The ring reader and the pipeline, on the flows thread: each its own
/// task (the reader waits for room in the channel while the pipeline works
/// through it). A task that panics drops its end of the channel, so the
/// other ends too, and the error names it.
async fn run_flows(
    reader: crate::capture::reader::Reader,
    pipeline: Pipeline,
    rx: mpsc::Receiver<Vec<crate::capture::record::KernelRecord>>,
    shutdown: watch::Receiver<bool>,
    poll: Duration,
) -> anyhow::Result<()> {
    crate::runtime::run_tasks(vec![
        ("ring reader", Box::pin(reader.run(shutdown, poll))),
        ("pipeline", Box::pin(pipeline.run(rx))),
    ])
    .await
}

/// Starts the endpoint directory and policy watchers and the SPIRE client.
fn start_identity_and_policy(
    args: &AgentArgs,
    endpoints: Option<watch::Receiver<Arc<EndpointDirectory>>>,
    capture: &Capture,
    policy: Option<flowaudit_policy::Loaded>,
    state: &Arc<AgentState>,
    watchers: &mut crate::runtime::Watchers,
) -> anyhow::Result<(Enricher, Judge)> {
    let mut trust_domain = args.trust_domain.clone();
    let cilium = Arc::new(crate::cilium::Cilium::new(
        args.cilium_bpf_dir.clone(),
        state.metrics.cilium.clone(),
    ));
    // The policy's updates, for the trust domain of DERIVED IDs when
    // --trust-domain does not give one.
    let mut policy_updates = None;
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
            // Counted as every later load is: a fresh agent shows what it
            // runs on.
            state.metrics.policy_reload(true);
            state.report_policy(PolicyStatus {
                version: Some(loaded.policy.version().to_owned()),
                rules: loaded.policy.rule_count() as u64,
                loaded: Some(std::time::SystemTime::now()),
                last_error: None,
            });
            let options = args.mtls_unverified.eval_options();
            let (tx, rx) = watch::channel(Arc::new(loaded.policy.with_options(options)));
            if args.trust_domain.is_none() {
                policy_updates = Some(rx.clone());
            }
            let st = state.clone();
            // When the version in force was loaded: a rejected reload
            // leaves it as it was.
            let loaded_at = std::sync::Mutex::new(std::time::SystemTime::now());
            let hook = Box::new(
                move |ok: bool, version: &str, rules: usize, error: Option<String>| {
                    st.metrics.policy_reload(ok);
                    let mut at = loaded_at.lock().unwrap_or_else(|p| p.into_inner());
                    if ok {
                        *at = std::time::SystemTime::now();
                    }
                    st.report_policy(PolicyStatus {
                        version: Some(version.to_owned()),
                        rules: rules as u64,
                        loaded: Some(*at),
                        last_error: error,
                    });
                },
            );
            watchers.spawn(
                "policy watcher",
                crate::judge::watch_policies(args.policy.clone(), options, tx, hook),
            );
            Judge::new(Some(rx), Some(cilium.clone()))
        }
        None => {
            // Said as such by `status` (an empty version), rather than as
            // a stage that has not reported.
            state.report_policy(PolicyStatus {
                version: Some(String::new()),
                rules: 0,
                loaded: None,
                last_error: None,
            });
            Judge::new(None, Some(cilium.clone()))
        }
    };
    let spire = match args.spire_admin_socket.as_str() {
        "none" => {
            let detail = "SPIRE attestation disabled (--spire-admin-socket none): local ends get DERIVED identities from their pod (socket cgroup -> pod UID -> endpoint directory)";
            tracing::warn!("{detail}");
            state.report_spire(crate::export::state::SpireStatus {
                connected: false,
                socket: String::new(),
                mode: "disabled".into(),
                detail: detail.into(),
            });
            None
        }
        path => {
            let observer = Arc::new(SpireGauge {
                state: state.clone(),
            });
            Some(SpireClient::start(
                PathBuf::from(path),
                SpireOptions {
                    observer: Some(observer),
                    force_mode: (args.spire_attest_by == AttestBy::Selectors)
                        .then_some(crate::identity::spire::SpireMode::Selectors),
                    ..Default::default()
                },
            ))
        }
    };
    if trust_domain.is_none() {
        tracing::warn!(
            spire = spire.is_some(),
            "no trust domain from --trust-domain or the policy: DERIVED IDs use the SPIRE agent's once it answers; until then (or without SPIRE) pod ends cannot be named: pass --trust-domain"
        );
    }
    let cgroups = CgroupResolver::new(capture.cgroup_root.clone());
    let mut enricher = Enricher::new(endpoints, cgroups, spire, args.trust_domain.clone());
    if let Some(rx) = policy_updates {
        enricher.follow_policy(rx);
    }
    enricher.node_name = node_name(args.node_name.as_deref());
    enricher.wait_ms = args.identity_wait_ms;
    // Counted once per flow end, when its identity is settled (not per poll).
    enricher.stats = state.metrics.identity.clone();
    Ok((enricher, judge))
}

/// The endpoint directory: from `--endpoints FILE` (`file` is its first
/// version, read before anything was attached), or from the Kubernetes API
/// (`--kubernetes`, on by default inside a cluster), watched either way.
async fn start_endpoints(
    args: &AgentArgs,
    file: Option<EndpointDirectory>,
    state: &AgentState,
    watchers: &mut crate::runtime::Watchers,
) -> anyhow::Result<Option<watch::Receiver<Arc<EndpointDirectory>>>> {
    let stats = state.metrics.endpoints.clone();
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty());
    match (args.endpoints.as_ref().zip(file), args.kubernetes) {
        // clap refuses --endpoints with --kubernetes.
        (Some((path, dir)), _) => {
            tracing::info!(path = %path.display(), pods = dir.len(), "endpoint directory loaded");
            let (tx, rx) = watch::channel(Arc::new(dir));
            watchers.spawn(
                "--endpoints file watcher",
                crate::endpoints::watch_file(path.clone(), tx, stats),
            );
            Ok(Some(rx))
        }
        (None, explicit) if explicit || in_cluster => {
            let client = crate::endpoints::kubernetes::client().await?;
            let (tx, rx) = watch::channel(Arc::new(EndpointDirectory::default()));
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            watchers.spawn(
                "Kubernetes pod and node watcher",
                crate::endpoints::kubernetes::watch_cluster(client, tx, Some(ready_tx), stats),
            );
            // Flows judged before the first list would all be "world".
            if tokio::time::timeout(Duration::from_secs(10), ready_rx)
                .await
                .is_err()
            {
                tracing::warn!(
                    "the Kubernetes API has not listed pods within 10 s; starting with an empty endpoint directory"
                );
            }
            Ok(Some(rx))
        }
        (None, _) => {
            tracing::warn!(
                "no --endpoints and no Kubernetes API: peers cannot be named (kind UNKNOWN)"
            );
            Ok(None)
        }
    }
}

/// Feeds the SPIRE connection state to `flowaudit_spire_connected` as it changes.
struct SpireGauge {
    state: Arc<AgentState>,
}

impl SpireObserver for SpireGauge {
    fn on_connected(&self, connected: bool) {
        self.state.metrics.set_spire_connected(connected);
    }
}

type SpireSeen = Option<(bool, String, Option<String>)>;

/// Reports the SPIRE connection to `status` and `flowaudit_spire_connected`,
/// and logs it once per change: connected (with the attestation mode), or
/// not, with the reason, its fix, and what identities are meanwhile.
fn report_spire(spire: &SpireClient, state: &AgentState, seen: &mut SpireSeen) {
    let st = spire.status();
    let now = (st.connected, st.mode.to_string(), st.last_error.clone());
    let detail = if st.connected {
        String::new()
    } else {
        format!(
            "{}; meanwhile local ends get DERIVED identities from their pod (socket cgroup -> pod UID -> endpoint directory)",
            st.last_error.as_deref().unwrap_or("connecting")
        )
    };
    state.report_spire(crate::export::state::SpireStatus {
        connected: st.connected,
        socket: st.socket_path.display().to_string(),
        mode: st.mode.to_string(),
        detail,
    });
    if seen.as_ref() == Some(&now) {
        return;
    }
    if st.connected {
        tracing::info!(socket = %st.socket_path.display(), mode = %st.mode, "SPIRE Delegated Identity API connected");
    } else if let Some(err) = &st.last_error {
        tracing::warn!(
            socket = %st.socket_path.display(),
            error = %err,
            "SPIRE Delegated Identity API unavailable: local ends get DERIVED identities from their pod (cgroup -> pod UID -> endpoint directory) until it answers"
        );
    } else {
        tracing::info!(socket = %st.socket_path.display(), "connecting to the SPIRE Delegated Identity API");
        // Not settled yet: report again once it is.
        return;
    }
    *seen = Some(now);
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

#[cfg(test)]
mod tests {
    use super::{MAX_WAIT_MS, ring_buffer_mib, wait_ms};

    #[test]
    fn ring_buffer_size_is_a_power_of_two_in_range() {
        assert_eq!(ring_buffer_mib("32"), Ok(32));
        assert_eq!(ring_buffer_mib("1"), Ok(1));
        for bad in ["0", "3", "2048", "x", "-8"] {
            let e = ring_buffer_mib(bad).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    /// What the agent refuses from its flags alone, before it attaches
    /// anything (`run_async` checks these first).
    #[test]
    fn typos_in_addresses_tls_flags_and_the_trust_domain_are_refused_from_the_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            agent: super::AgentArgs,
        }
        let check = |args: &[&str]| -> Result<(), String> {
            let cli = Cli::try_parse_from(std::iter::once("flowaudit").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?;
            cli.agent.export.check().map_err(|e| e.to_string())
        };
        // A regular file where a socket's or a directory's path is given.
        let dir = flowaudit_tests::support::TestDir::new("fa-agent-flags");
        let file = dir.path().join("regular");
        std::fs::write(&file, "x").unwrap();
        let file = file.display().to_string();
        check(&[]).unwrap();
        check(&[
            "--grpc-addr",
            "127.0.0.1:4244",
            "--grpc-addr",
            "unix:///run/f.sock",
        ])
        .unwrap();
        check(&[
            "--workload-api",
            "unix:///run/w.sock",
            "--allow-peer",
            "spiffe://d/ns/*/sa/*",
            "--grpc-addr",
            "0.0.0.0:4244",
        ])
        .unwrap();
        for (args, says) in [
            (
                &["--trust-domain", "Demo.Local"][..],
                "is not a trust domain",
            ),
            (
                &["--trust-domain", "spiffe://demo.local"][..],
                "is not a trust domain",
            ),
            (
                &["--allow-peer", "spiffe:/x", "--workload-api", "unix:///w"][..],
                "is not a SPIFFE ID",
            ),
            (
                &["--allow-peer", "spiffe://d/x"][..],
                "--allow-peer needs TLS",
            ),
            (&["--workload-api", "unix:///w"][..], "no --allow-peer"),
            (
                &["--grpc-addr", "0.0.0.0:4244"][..],
                "listens beyond loopback",
            ),
            (&["--grpc-addr", "tcp://x"][..], "invalid gRPC address"),
            (
                &["--workload-api", "/run/w.sock"][..],
                "the Workload API is given as a URI: unix:///run/w.sock",
            ),
            (
                &["--endpoints", "/e.yaml", "--kubernetes"][..],
                "cannot be used with",
            ),
            (
                &["--grpc-addr", &format!("unix://{file}")][..],
                "is not a socket",
            ),
            (
                &["--export-file", &format!("{file}/flows.jsonl")][..],
                "could not open export file",
            ),
            (
                &[
                    "--tls-cert",
                    "/nonexistent/c.pem",
                    "--tls-key",
                    "/nonexistent/k.pem",
                    "--tls-ca",
                    "/nonexistent/ca.pem",
                    "--allow-peer",
                    "spiffe://d/x",
                ][..],
                "could not read --tls-cert /nonexistent/c.pem",
            ),
            (&["--spire-admin-socket", ""][..], "empty: give the SPIRE"),
            (
                &["--spire-admin-socket", "run/admin.sock"][..],
                "must be absolute",
            ),
            (&["--export-file-max-size-mb", "0"][..], "0 is not in 1..="),
            (&["--flow-buffer", "0"][..], "0 is not in 1..="),
        ] {
            let e = check(args).expect_err("refused");
            assert!(e.contains(says), "{args:?}: {e}");
        }
        let admin = |v: &str| {
            Cli::try_parse_from(["flowaudit", "--spire-admin-socket", v])
                .map(|c| c.agent.spire_admin_socket)
                .map_err(|e| e.to_string())
        };
        assert_eq!(admin("unix:///run/a.sock").unwrap(), "/run/a.sock");
        assert_eq!(admin("none").unwrap(), "none");
        assert!(admin("unix://none").is_err());
    }

    #[test]
    fn the_ring_is_read_every_5_ms_unless_told_1_to_1000() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            agent: super::AgentArgs,
        }
        let poll = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("flowaudit").chain(args.iter().copied()))
                .map(|c| c.agent.ring_poll_ms)
        };
        assert_eq!(poll(&[]).unwrap(), 5);
        assert_eq!(poll(&["--ring-poll-ms", "1"]).unwrap(), 1);
        assert_eq!(poll(&["--ring-poll-ms", "1000"]).unwrap(), 1000);
        for bad in ["0", "1001", "5ms", "-1"] {
            let arg = format!("--ring-poll-ms={bad}");
            let e = poll(&[&arg]).expect_err("rejected").to_string();
            assert!(
                e.contains("--ring-poll-ms") && e.contains(bad),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn waits_are_milliseconds_up_to_a_minute() {
        assert_eq!(wait_ms("0"), Ok(0));
        assert_eq!(wait_ms("500"), Ok(500));
        assert_eq!(wait_ms(&MAX_WAIT_MS.to_string()), Ok(MAX_WAIT_MS));
        for bad in [
            "60001",
            "18446744073709551615",
            "99999999999999999999",
            "-1",
            "1s",
            "",
        ] {
            let e = wait_ms(bad).unwrap_err();
            assert!(
                e.contains(&format!("`{bad}`")) && e.contains("from 0 to 60000"),
                "{bad}: {e}"
            );
        }
    }
}
