//! Prometheus metrics: the `flowaudit_*` families of PRODUCT.md, the
//! pipeline sink that counts flows into them, and the HTTP server on
//! `--metrics-addr` (`/metrics`, `/healthz`, `/readyz`).
//!
//! [`Metrics`] lives in [`AgentState`] so every stage reaches the same
//! handles. Counters that stages keep on their hot path are atomics in the
//! stage's own stats struct, read here at scrape time: [`CaptureStats`]
//! (kernel records and losses), [`IdentityStats`] (lookups),
//! [`CiliumStats`], [`ExportFileStats`]. State changes come through methods:
//! [`Metrics::set_spire_connected`], [`Metrics::policy_reload`] and
//! [`Metrics::set_policy_rules`].
//!
//! Cardinality stays bounded: every label is a closed enum except the
//! identities of `flowaudit_policy_violations_total`, whose series are
//! capped (new pairs beyond the cap count under `other`) and dropped when
//! unseen for [`VIOLATION_SERIES_IDLE`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use flowaudit_policy::{EncryptionState, FindingKind, MutualAuthState, Verdict};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use super::state::AgentState;
use crate::capture::CaptureStats;
use crate::cilium::CiliumStats;
use crate::export::file::ExportFileStats;
use crate::flow::{ArcStr, Direction, EventKind, FlowEvent, UnknownReason};
use crate::identity::{IdentityStats, LookupResult};
use flowaudit_common::LossPlace;

/// Most `{source,destination,port}` series of `flowaudit_policy_violations_total`.
/// `--metrics-addr`: the IP address and port to listen on. The error says
/// the form expected (the standard library's said only "invalid socket
/// address syntax", also for a host name or a port past 65535).
pub fn listen_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse().map_err(|_| {
        format!(
            "`{s}`: expected IP:PORT to listen on, e.g. 0.0.0.0:9966, 127.0.0.1:9966 or [::]:9966 (an IP address, not a host name; a port up to 65535)"
        )
    })
}

pub const VIOLATION_SERIES_CAP: usize = 1000;
/// A violation series unseen this long is dropped (its workloads are likely gone).
pub const VIOLATION_SERIES_IDLE: Duration = Duration::from_secs(15 * 60);
/// Connections whose first events were counted, remembered so a CLOSE adds
/// only what its CONNECT did not; beyond this many open ones, counting
/// falls back to per event.
const OPEN_CONNECTIONS_CAP: usize = 1 << 19;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "could not listen for metrics on {addr}: {source} (choose another --metrics-addr, or stop what holds the port)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The identity stage's lookup results (`identity::spire::Lookup::label`),
/// exposed at 0 from the start.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FlowLabels {
    event: &'static str,
    verdict: &'static str,
    direction: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// `flowaudit_mtls_unverified_total{reason}`: why mTLS could not be
/// verified. `tls_client_certificate_hidden` is TLS whose client
/// certificate cannot be observed (TLS 1.3); the others are
/// `UnknownReason`s (nothing seen, capture lost, not observable).
const TLS_HIDDEN: &str = "tls_client_certificate_hidden";

fn unverified_reason(e: &crate::flow::Encryption) -> &'static str {
    e.unknown_reason.map_or(TLS_HIDDEN, UnknownReason::as_str)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ViolationLabels {
    source: String,
    destination: String,
    port: String,
}

/// A violation series as the sink finds it: source and destination SPIFFE
/// IDs (shared with the flow, so a lookup copies no bytes) and the port.
type ViolationKey = (ArcStr, ArcStr, u16);

impl ViolationLabels {
    fn of((source, destination, port): &ViolationKey) -> Self {
        let id = |s: &str| if s.is_empty() { "unknown" } else { s }.to_owned();
        Self {
            source: id(source),
            destination: id(destination),
            port: port.to_string(),
        }
    }

    /// The one series that counts violations past `VIOLATION_SERIES_CAP`.
    fn other() -> Self {
        Self {
            source: "other".into(),
            destination: "other".into(),
            port: "other".into(),
        }
    }
}

/// Every metric handle of the agent. Cheap to share (`Arc`); all methods
/// take `&self`.
pub struct Metrics {
    registry: Registry,
    flows: Family<FlowLabels, Counter>,
    findings: Family<KindLabels, Counter>,
    mtls_unverified: Family<ReasonLabels, Counter>,
    violations: Family<ViolationLabels, Counter>,
    encryption: Family<StateLabels, Counter>,
    spire_connected: Gauge,
    stream_subscribers: Gauge,
    stream_dropped: Counter,
    policy_reloads: Family<ResultLabels, Counter>,
    policy_rules: Gauge,
    /// Updated by the export file sink, read on each scrape.
    pub export_file: Arc<ExportFileStats>,
    /// The endpoint directory's source (`--endpoints` or Kubernetes).
    pub endpoints: Arc<crate::endpoints::DirectoryStats>,
    /// Updated by the Cilium reader, read on each scrape.
    pub cilium: Arc<CiliumStats>,
    /// Updated by the identity stage, read on each scrape.
    pub identity: Arc<IdentityStats>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Kernel counters, read from the capture stats on each scrape.
#[derive(Debug)]
struct KernelCollector(Arc<CaptureStats>);

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        counter(
            &mut encoder,
            "flowaudit_kernel_events",
            "Connection records read from the kernel ring buffer.",
            &self.0.records,
        )?;
        // Every place, from 0: ring_full_connect, ring_full_close,
        // ring_full_failed and close_untracked lose flow events; the others
        // lose what `LossPlace::consequence` says (owners, payload).
        counters_by(
            &mut encoder,
            "flowaudit_kernel_events_lost",
            "What the kernel side lost, by place (see `flowaudit status`): flow events at ring_full_connect, ring_full_close, ring_full_failed and close_untracked; owners, listeners or payload (encryption) at the others.",
            "place",
            LossPlace::ALL.map(|place| (place.name(), &self.0.lost[place as usize])),
        )?;
        let mut degraded = encoder.encode_descriptor(
            "flowaudit_kernel_degraded",
            "Facts this node's kernel does not give the agent (1 per named degradation; see `flowaudit status`).",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for d in &self.0.degradations {
            ConstGauge::new(1i64).encode(degraded.encode_family(&[("name", d.name)])?)?;
        }
        Ok(())
    }
}

/// The export file's failures, read from its stats on each scrape.
#[derive(Debug)]
struct ExportFileCollector(Arc<ExportFileStats>);

impl Collector for ExportFileCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        counter(
            &mut encoder,
            "flowaudit_export_file_errors",
            "Export file writes and rotations that failed (e.g. a full disk).",
            &self.0.errors,
        )?;
        counters_by(
            &mut encoder,
            "flowaudit_export_file_flows_lost",
            "Flow events missing from the export file, by reason: write_failed (a write or rotation failed), writer_behind (its writer was a full backlog behind the flows; the other sinks got them).",
            "reason",
            [
                ("write_failed", &self.0.flows_lost),
                ("writer_behind", &self.0.flows_behind),
            ],
        )
    }
}

/// The endpoint directory's size and its source's failures, read on each
/// scrape.
#[derive(Debug)]
struct DirectoryCollector(Arc<crate::endpoints::DirectoryStats>);

impl Collector for DirectoryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pods = ConstGauge::new(self.0.pods.load(Ordering::Relaxed) as i64);
        pods.encode(encoder.encode_descriptor(
            "flowaudit_endpoint_directory_pods",
            "Pods in the endpoint directory in force (from --endpoints or the Kubernetes API)",
            None,
            pods.metric_type(),
        )?)?;
        counter(
            &mut encoder,
            "flowaudit_endpoint_directory_errors",
            "New --endpoints file versions refused and Kubernetes list/watch calls that failed; each time the last good directory stayed in force",
            &self.0.errors,
        )
    }
}

/// One counter read from `value` at the scrape.
fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: &AtomicU64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value.load(Ordering::Relaxed));
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

/// A counter family with one label, a series per `(label value, count)`.
fn counters_by<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    series: impl IntoIterator<Item = (&'a str, &'a AtomicU64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (value, count) in series {
        let c = ConstCounter::new(count.load(Ordering::Relaxed));
        c.encode(family.encode_family(&[(label, value)])?)?;
    }
    Ok(())
}

/// Cilium mutual authentication answers, read on each scrape.
#[derive(Debug)]
struct CiliumCollector(Arc<CiliumStats>);

impl Collector for CiliumCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "flowaudit_mutual_auth",
            "Flow events under a rule requiring Cilium mutual authentication, by what this node's Cilium auth map held for the pair (AUTHENTICATED, EXPIRED, MISSING, NOT_OBSERVABLE); once per event and enforcing side",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (i, state) in MutualAuthState::ALL.iter().enumerate() {
            let n = ConstCounter::new(self.0.by_state[i].load(Ordering::Relaxed));
            n.encode(family.encode_family(&[("state", state.as_str())])?)?;
        }
        Ok(())
    }
}

/// Identity lookups by result, read from the identity stage's stats.
#[derive(Debug)]
struct IdentityCollector(Arc<IdentityStats>);

impl Collector for IdentityCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "flowaudit_identity_lookups",
            "Identity lookups by result (attested, no_identity, timeout, unavailable, unreadable), once per flow end when it is settled",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for result in LookupResult::ALL {
            let n = ConstCounter::new(self.0.lookups(result));
            n.encode(family.encode_family(&[("result", result.label())])?)?;
        }
        Ok(())
    }
}

impl Metrics {
    pub fn new(version: &'static str, capture: Arc<CaptureStats>) -> Self {
        let mut registry = Registry::default();
        // prometheus-client appends `_total` to counters: register the stem.
        let flows = Family::default();
        registry.register(
            "flowaudit_flows",
            "Flow events, by event kind, verdict and direction",
            flows.clone(),
        );
        let findings = Family::default();
        registry.register(
            "flowaudit_findings",
            "Policy findings, once per connection and observing side",
            findings.clone(),
        );
        let mtls_unverified = Family::default();
        registry.register(
            "flowaudit_mtls_unverified",
            "MTLS_UNVERIFIED findings by reason: a rule requires mTLS and it could not be verified (tls_client_certificate_hidden, no_payload_seen, not_watched, payload_lost, stream_gap, not_observable); once per connection and observing side",
            mtls_unverified.clone(),
        );
        let violations = Family::default();
        registry.register(
            "flowaudit_policy_violations",
            "Connections judged VIOLATION, by source identity, destination identity and port (series capped; overflow under \"other\")",
            violations.clone(),
        );
        let encryption = Family::default();
        registry.register(
            "flowaudit_flow_encryption",
            "Finished connections by observed encryption state",
            encryption.clone(),
        );
        registry.register_collector(Box::new(KernelCollector(capture)));
        let export_file = Arc::<ExportFileStats>::default();
        registry.register_collector(Box::new(ExportFileCollector(export_file.clone())));
        let endpoints = Arc::<crate::endpoints::DirectoryStats>::default();
        registry.register_collector(Box::new(DirectoryCollector(endpoints.clone())));
        let cilium = Arc::<CiliumStats>::default();
        registry.register_collector(Box::new(CiliumCollector(cilium.clone())));
        let identity = Arc::<IdentityStats>::default();
        registry.register_collector(Box::new(IdentityCollector(identity.clone())));
        let spire_connected = Gauge::default();
        registry.register(
            "flowaudit_spire_connected",
            "1 while the SPIRE Delegated Identity API is connected",
            spire_connected.clone(),
        );
        let stream_subscribers = Gauge::default();
        registry.register(
            "flowaudit_stream_subscribers",
            "gRPC GetFlows subscribers following the stream",
            stream_subscribers.clone(),
        );
        let stream_dropped = Counter::default();
        registry.register(
            "flowaudit_stream_dropped",
            "Flows not delivered to a slow stream subscriber (its queue stayed full until the hub's ring went round)",
            stream_dropped.clone(),
        );
        let policy_reloads = Family::default();
        registry.register(
            "flowaudit_policy_reloads",
            "Policy (re)loads by result (success, failure)",
            policy_reloads.clone(),
        );
        let policy_rules = Gauge::default();
        registry.register(
            "flowaudit_policy_rules",
            "Rules in the policy in force",
            policy_rules.clone(),
        );
        // Every series of a closed label set starts at 0, so it is exposed
        // (with its TYPE) from the first scrape and rate() sees its first
        // increase.
        for event in ["CONNECT", "CLOSE", "FAILED"] {
            for verdict in ["COMPLIANT", "VIOLATION", "UNKNOWN"] {
                for direction in ["EGRESS", "INGRESS"] {
                    let _ = flows.get_or_create(&FlowLabels {
                        event,
                        verdict,
                        direction,
                    });
                }
            }
        }
        for kind in FindingKind::ALL {
            let _ = findings.get_or_create(&KindLabels {
                kind: kind.as_str(),
            });
        }
        for reason in
            std::iter::once(TLS_HIDDEN).chain(UnknownReason::ALL.map(UnknownReason::as_str))
        {
            let _ = mtls_unverified.get_or_create(&ReasonLabels { reason });
        }
        for state in [
            EncryptionState::Plaintext,
            EncryptionState::Tls,
            EncryptionState::Mtls,
            EncryptionState::Unknown,
        ] {
            let _ = encryption.get_or_create(&StateLabels {
                state: state.as_str(),
            });
        }
        for result in ["success", "failure"] {
            let _ = policy_reloads.get_or_create(&ResultLabels { result });
        }
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info.get_or_create(&VersionLabels { version }).set(1);
        registry.register("flowaudit_build_info", "Agent version", build_info);
        Self {
            registry,
            flows,
            findings,
            mtls_unverified,
            violations,
            encryption,
            spire_connected,
            stream_subscribers,
            stream_dropped,
            policy_reloads,
            policy_rules,
            export_file,
            endpoints,
            cilium,
            identity,
        }
    }

    /// Whether the SPIRE Delegated Identity API is connected (identity stage).
    pub fn set_spire_connected(&self, connected: bool) {
        self.spire_connected.set(i64::from(connected));
    }

    /// Counts a policy load or reload: `ok` false when the new version was
    /// rejected and the last good one stays in force (policy stage).
    #[allow(dead_code)] // until the policy stage counts its reloads
    pub fn policy_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.policy_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Number of rules in the policy now in force (policy stage).
    pub fn set_policy_rules(&self, rules: u64) {
        self.policy_rules
            .set(i64::try_from(rules).unwrap_or(i64::MAX));
    }

    /// The exposition in OpenMetrics text (ends with `# EOF`).
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The exposition in the Prometheus text format 0.0.4, for scrapers that
    /// do not ask for OpenMetrics (and `promtool check metrics`): a counter's
    /// family is named with its `_total`, and there is no `# EOF`.
    pub fn encode_prometheus_text(&self) -> String {
        prometheus_text(&self.encode_openmetrics())
    }
}

/// OpenMetrics text in the Prometheus text format 0.0.4: a counter's
/// family is named with its `_total`, and there is no `# EOF`.
pub fn prometheus_text(om: &str) -> String {
    let counters: Vec<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len() + 64);
    for line in om.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# TYPE ", "# HELP "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

impl super::hub::StreamObserver for Metrics {
    fn subscriber_added(&self) {
        self.stream_subscribers.inc();
    }

    fn subscriber_removed(&self) {
        self.stream_subscribers.dec();
    }

    fn stream_dropped(&self, n: u64) {
        self.stream_dropped.inc_by(n);
    }
}

/// Indexes of `MetricsSink::flows`, in the order it is built.
fn flow_index(f: &FlowEvent) -> (usize, usize, usize) {
    let event = match f.event {
        EventKind::Connect => 0,
        EventKind::Close => 1,
        EventKind::Failed => 2,
    };
    let direction = match f.direction {
        Direction::Egress => 0,
        Direction::Ingress => 1,
    };
    (event, verdict_index(f.verdict), direction)
}

fn verdict_index(v: Verdict) -> usize {
    match v {
        Verdict::Compliant => 0,
        Verdict::Violation => 1,
        Verdict::Unknown => 2,
    }
}

const ENCRYPTION_STATES: [EncryptionState; 4] = [
    EncryptionState::Plaintext,
    EncryptionState::Tls,
    EncryptionState::Mtls,
    EncryptionState::Unknown,
];

fn finding_index(k: FindingKind) -> usize {
    FindingKind::ALL.iter().position(|x| *x == k).unwrap_or(0)
}

fn finding_bit(k: FindingKind) -> u8 {
    1 << finding_index(k)
}

const VIOLATION_BIT: u8 = 1 << 7;

/// The pipeline sink that counts flows. A connection gives a CONNECT and a
/// CLOSE per observing side, and its findings may only be known at CLOSE
/// (mTLS needs payload): findings and violations are counted once per
/// connection and side, at the first event that carries them; encryption
/// once, at CLOSE (or FAILED), when it is final.
pub struct MetricsSink {
    metrics: Arc<Metrics>,
    /// The per-flow series, taken from their families once: a family
    /// lookup takes a lock and hashes the labels, for every flow.
    /// `flows` by event, verdict and direction.
    flows: [[[Counter; 2]; 3]; 3],
    findings: [Counter; FindingKind::ALL.len()],
    encryption: [Counter; 4],
    /// Socket cookie of open connections -> what was already counted for it.
    open: crate::capture::record::CookieMap<u8>,
    /// Violation series counted into (at most `VIOLATION_SERIES_CAP`), with
    /// when each was last counted, to expire idle ones.
    violations: HashMap<ViolationKey, (Counter, Instant), foldhash::fast::RandomState>,
    /// The series past the cap, once it is needed.
    other_violations: Option<Counter>,
    /// When the current pass began: the time a violation is "seen" (to
    /// the pass, far finer than the idle time that expires it).
    now: Instant,
    last_expiry: Instant,
}

impl MetricsSink {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let flow = |event: EventKind, verdict: Verdict, direction: Direction| {
            metrics
                .flows
                .get_or_create(&FlowLabels {
                    event: event.as_str(),
                    verdict: verdict.as_str(),
                    direction: direction.as_str(),
                })
                .clone()
        };
        let by_verdict = |event| {
            [Verdict::Compliant, Verdict::Violation, Verdict::Unknown]
                .map(|v| [Direction::Egress, Direction::Ingress].map(|d| flow(event, v, d)))
        };
        let flows = [EventKind::Connect, EventKind::Close, EventKind::Failed].map(by_verdict);
        let findings = FindingKind::ALL.map(|kind| {
            metrics
                .findings
                .get_or_create(&KindLabels {
                    kind: kind.as_str(),
                })
                .clone()
        });
        let encryption = ENCRYPTION_STATES.map(|state| {
            metrics
                .encryption
                .get_or_create(&StateLabels {
                    state: state.as_str(),
                })
                .clone()
        });
        Self {
            flows,
            findings,
            encryption,
            metrics,
            open: Default::default(),
            violations: HashMap::default(),
            other_violations: None,
            now: Instant::now(),
            last_expiry: Instant::now(),
        }
    }

    /// Counts a violating connection into its series, taken from the
    /// family once; past the cap, into the `other` series.
    fn count_violation(&mut self, flow: &FlowEvent) {
        let key = (
            flow.source.spiffe_id.clone(),
            flow.destination.spiffe_id.clone(),
            flow.l4.destination_port,
        );
        if let Some((series, seen)) = self.violations.get_mut(&key) {
            series.inc();
            *seen = self.now;
        } else if self.violations.len() < VIOLATION_SERIES_CAP {
            let series = self
                .metrics
                .violations
                .get_or_create(&ViolationLabels::of(&key))
                .clone();
            series.inc();
            self.violations.insert(key, (series, self.now));
        } else {
            let metrics = &self.metrics;
            self.other_violations
                .get_or_insert_with(|| {
                    metrics
                        .violations
                        .get_or_create(&ViolationLabels::other())
                        .clone()
                })
                .inc();
        }
    }

    /// Drops the violation series not counted into for `idle` (their
    /// workloads are likely gone); `flush` calls it now and then.
    pub fn expire_violation_series(&mut self, idle: Duration) {
        let (now, metrics) = (Instant::now(), &self.metrics);
        self.violations.retain(|key, (_, seen)| {
            let keep = now.duration_since(*seen) < idle;
            if !keep {
                metrics.violations.remove(&ViolationLabels::of(key));
            }
            keep
        });
    }
}

impl crate::pipeline::Sink for MetricsSink {
    fn on_flow(&mut self, flow: &Arc<FlowEvent>) {
        let m = &self.metrics;
        let (e, v, d) = flow_index(flow);
        self.flows[e][v][d].inc();
        let cookie = flow.socket.cookie;
        let done = match flow.event {
            EventKind::Connect => 0,
            EventKind::Close => self.open.remove(&cookie).unwrap_or(0),
            EventKind::Failed => 0,
        };
        let mut now = done;
        for f in &flow.findings {
            let bit = finding_bit(f.kind);
            if now & bit == 0 {
                now |= bit;
                self.findings[finding_index(f.kind)].inc();
                if f.kind == FindingKind::MtlsUnverified {
                    m.mtls_unverified
                        .get_or_create(&ReasonLabels {
                            reason: unverified_reason(&flow.encryption),
                        })
                        .inc();
                }
            }
        }
        if flow.verdict == Verdict::Violation && now & VIOLATION_BIT == 0 {
            now |= VIOLATION_BIT;
            self.count_violation(flow);
        }
        match flow.event {
            EventKind::Connect => {
                if self.open.len() < OPEN_CONNECTIONS_CAP {
                    self.open.insert(cookie, now);
                }
            }
            EventKind::Close | EventKind::Failed => {
                let state = flow.encryption.state;
                self.encryption[ENCRYPTION_STATES
                    .iter()
                    .position(|s| *s == state)
                    .unwrap_or(3)]
                .inc();
            }
        }
    }

    fn flush(&mut self) {
        self.now = Instant::now();
        if self.now.duration_since(self.last_expiry) > Duration::from_secs(60) {
            self.last_expiry = self.now;
            self.expire_violation_series(VIOLATION_SERIES_IDLE);
        }
    }
}

/// An address block of `--metrics-allow` (`10.0.0.0/8`, `fd00::/8`, or one
/// address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!("`{text}` is not a CIDR block: expected e.g. 10.0.0.0/8, fd00::/8 or 127.0.0.1")
        };
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // A v4 client of a [::] listener shows as ::ffff:a.b.c.d.
        let bits = |ip: IpAddr| match ip.to_canonical() {
            IpAddr::V4(a) => (u128::from(a.to_bits()), 32u32),
            IpAddr::V6(a) => (a.to_bits(), 128u32),
        };
        let ((net, width), (host, host_width)) = (bits(self.addr), bits(ip));
        if width != host_width {
            return false;
        }
        let shift = width - u32::from(self.prefix);
        shift == width || net.checked_shr(shift) == host.checked_shr(shift)
    }
}

/// Binds `--metrics-addr` now (so a taken port fails the start) and serves
/// it in the background. With `allow` non-empty, `/metrics` answers only
/// clients in those blocks (403 to others).
pub async fn serve(
    addr: SocketAddr,
    state: Arc<dyn Exposition>,
    allow: Vec<Cidr>,
) -> Result<SocketAddr, MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let allow = Arc::new(allow);
    let app = Router::new()
        .route(
            "/metrics",
            get(
                move |ConnectInfo(from): ConnectInfo<SocketAddr>,
                      state: State<Arc<dyn Exposition>>,
                      headers: HeaderMap| async move {
                    if allow.is_empty() || allow.iter().any(|c| c.contains(from.ip())) {
                        metrics(state, headers).await
                    } else {
                        (
                            StatusCode::FORBIDDEN,
                            format!("{} is not in --metrics-allow\n", from.ip()),
                        )
                            .into_response()
                    }
                },
            ),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
        .into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(local)
}

/// What the metrics server serves: the agent's state, or the relay's.
pub trait Exposition: Send + Sync + 'static {
    fn openmetrics(&self) -> String;
    fn prometheus_text(&self) -> String;
    /// `Err(why)` makes `/readyz` answer 503 with the reason.
    fn readiness(&self) -> Result<(), String>;
}

impl Exposition for AgentState {
    fn openmetrics(&self) -> String {
        self.metrics.encode_openmetrics()
    }

    fn prometheus_text(&self) -> String {
        self.metrics.encode_prometheus_text()
    }

    fn readiness(&self) -> Result<(), String> {
        AgentState::readiness(self)
    }
}

async fn metrics(State(state): State<Arc<dyn Exposition>>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            state.openmetrics(),
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            state.prometheus_text(),
        )
            .into_response()
    }
}

async fn readyz(State(state): State<Arc<dyn Exposition>>) -> Response {
    match state.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Sink;

    #[test]
    fn listen_addresses_are_ip_and_port_and_the_error_says_so() {
        assert_eq!(listen_addr("[::]:9966").unwrap().port(), 9966);
        for bad in ["localhost:9966", "127.0.0.1:99999", "9966"] {
            let e = listen_addr(bad).unwrap_err();
            assert!(
                e.starts_with(&format!("`{bad}`: expected IP:PORT")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn metrics_allow_blocks_contain_their_addresses_only() {
        let c = |s: &str| Cidr::parse(s).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let cases = [
            ("127.0.0.1", "127.0.0.1", true),
            ("127.0.0.1", "127.0.0.2", false),
            ("10.0.0.0/8", "10.244.1.5", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.0.0.0/8", "::ffff:10.1.2.3", true),
            ("0.0.0.0/0", "192.0.2.1", true),
            ("0.0.0.0/0", "2001:db8::1", false),
            ("fd00::/8", "fd00:10:244:1::5", true),
            ("fd00::/8", "fe80::1", false),
            ("::/0", "2001:db8::1", true),
            ("172.18.0.3/32", "172.18.0.3", true),
        ];
        for (block, addr, want) in cases {
            assert_eq!(c(block).contains(ip(addr)), want, "{block} contains {addr}");
        }
        for bad in ["10.0.0.0/33", "fd00::/129", "10.0.0/8", "x", "10.0.0.0/"] {
            let e = Cidr::parse(bad).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }
    use crate::flow::Finding;

    fn flow(event: EventKind, cookie: u64) -> Arc<FlowEvent> {
        let mut f = crate::export::hub::tests::sample_flow();
        f.event = event;
        f.socket.cookie = cookie;
        Arc::new(f)
    }

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    #[test]
    fn the_endpoint_directory_shows_its_pods_and_its_sources_errors() {
        let m = Arc::new(Metrics::new("0", Arc::new(CaptureStats::default())));
        let text = m.encode_prometheus_text();
        assert_eq!(
            sample(&text, "flowaudit_endpoint_directory_pods"),
            Some(0.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "flowaudit_endpoint_directory_errors_total"),
            Some(0.0)
        );
        m.endpoints.pods.store(5, Ordering::Relaxed);
        m.endpoints.errors.fetch_add(3, Ordering::Relaxed);
        let text = m.encode_prometheus_text();
        assert_eq!(
            sample(&text, "flowaudit_endpoint_directory_pods"),
            Some(5.0)
        );
        assert_eq!(
            sample(&text, "flowaudit_endpoint_directory_errors_total"),
            Some(3.0)
        );
    }

    /// The export file's losses, one series per reason, from 0.
    #[test]
    fn export_file_losses_are_counted_by_reason() {
        let m = Arc::new(Metrics::new("0", Arc::new(CaptureStats::default())));
        let text = m.encode_prometheus_text();
        for reason in ["write_failed", "writer_behind"] {
            let series = format!("flowaudit_export_file_flows_lost_total{{reason=\"{reason}\"}}");
            assert_eq!(sample(&text, &series), Some(0.0), "{series} in\n{text}");
        }
        m.export_file.errors.fetch_add(2, Ordering::Relaxed);
        m.export_file.flows_lost.fetch_add(7, Ordering::Relaxed);
        m.export_file.flows_behind.fetch_add(11, Ordering::Relaxed);
        let text = m.encode_prometheus_text();
        assert_eq!(
            sample(&text, "flowaudit_export_file_errors_total"),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                "flowaudit_export_file_flows_lost_total{reason=\"write_failed\"}"
            ),
            Some(7.0)
        );
        assert_eq!(
            sample(
                &text,
                "flowaudit_export_file_flows_lost_total{reason=\"writer_behind\"}"
            ),
            Some(11.0)
        );
    }

    /// Each combination of labels goes to its own series (the sink keeps
    /// the series' handles in arrays, indexed by the flow's enums).
    #[test]
    fn every_label_combination_counts_into_its_own_series() {
        let m = Arc::new(Metrics::new("0", Arc::new(CaptureStats::default())));
        let mut sink = MetricsSink::new(m.clone());
        let mut expected = Vec::new();
        let mut n = 0u64;
        for event in [EventKind::Connect, EventKind::Close, EventKind::Failed] {
            for verdict in [Verdict::Compliant, Verdict::Violation, Verdict::Unknown] {
                for direction in [Direction::Egress, Direction::Ingress] {
                    for state in ENCRYPTION_STATES {
                        n += 1;
                        let mut f = (*flow(event, 1_000 + n)).clone();
                        f.verdict = verdict;
                        f.direction = direction;
                        Arc::make_mut(&mut f.encryption).state = state;
                        f.findings = vec![Finding {
                            kind: FindingKind::ALL[n as usize % FindingKind::ALL.len()],
                            message: "m".into(),
                        }]
                        .into();
                        // n times, so a flow counted under another series shows.
                        for _ in 0..n {
                            sink.on_flow(&Arc::new(f.clone()));
                        }
                        expected.push((event, verdict, direction, state, n));
                    }
                }
            }
        }
        let text = m.encode_prometheus_text();
        let mut by_state = [0.0; 4];
        let mut by_kind = [0.0; FindingKind::ALL.len()];
        for (i, &(event, verdict, direction, _, n)) in expected.iter().enumerate() {
            let series = format!(
                "flowaudit_flows_total{{event=\"{}\",verdict=\"{}\",direction=\"{}\"}}",
                event.as_str(),
                verdict.as_str(),
                direction.as_str()
            );
            let per_series: u64 = expected
                .iter()
                .filter(|e| (e.0, e.1, e.2) == (event, verdict, direction))
                .map(|e| e.4)
                .sum();
            assert_eq!(sample(&text, &series), Some(per_series as f64), "{series}");
            if event != EventKind::Connect {
                by_state[i % 4] += n as f64;
            }
            // No CLOSE here follows a CONNECT that counted the finding
            // already, so every flow counts its one finding.
            by_kind[n as usize % FindingKind::ALL.len()] += n as f64;
        }
        for (i, state) in ENCRYPTION_STATES.iter().enumerate() {
            let series = format!(
                "flowaudit_flow_encryption_total{{state=\"{}\"}}",
                state.as_str()
            );
            assert_eq!(sample(&text, &series), Some(by_state[i]), "{series}");
        }
        for (i, kind) in FindingKind::ALL.iter().enumerate() {
            let series = format!("flowaudit_findings_total{{kind=\"{}\"}}", kind.as_str());
            assert_eq!(sample(&text, &series), Some(by_kind[i]), "{series}");
        }
    }

    #[test]
    fn counts_flows_findings_once_per_connection_and_encryption_at_close() {
        let m = Arc::new(Metrics::new("9.9.9", Arc::new(CaptureStats::default())));
        let mut sink = MetricsSink::new(m.clone());
        let mut connect = (*flow(EventKind::Connect, 7)).clone();
        connect.verdict = Verdict::Violation;
        connect.source.spiffe_id = "spiffe://demo.local/ns/a/sa/frontend".into();
        connect.destination.spiffe_id = "spiffe://demo.local/ns/a/sa/postgresql".into();
        connect.findings.push(Finding {
            kind: FindingKind::NoMatchingRule,
            message: "x".into(),
        });
        let mut close = connect.clone();
        close.event = EventKind::Close;
        std::sync::Arc::make_mut(&mut close.encryption).state = EncryptionState::Plaintext;
        close.findings.push(Finding {
            kind: FindingKind::MtlsMissing,
            message: "y".into(),
        });
        sink.on_flow(&Arc::new(connect));
        sink.on_flow(&Arc::new(close));
        let text = m.encode_prometheus_text();
        let s = |series: &str| sample(&text, series).unwrap_or(-1.0);
        assert_eq!(
            s(
                "flowaudit_flows_total{event=\"CONNECT\",verdict=\"VIOLATION\",direction=\"EGRESS\"}"
            ),
            1.0,
            "{text}"
        );
        assert_eq!(
            s("flowaudit_findings_total{kind=\"NO_MATCHING_RULE\"}"),
            1.0
        );
        assert_eq!(s("flowaudit_findings_total{kind=\"MTLS_MISSING\"}"), 1.0);
        assert_eq!(
            s(
                "flowaudit_policy_violations_total{source=\"spiffe://demo.local/ns/a/sa/frontend\",destination=\"spiffe://demo.local/ns/a/sa/postgresql\",port=\"5432\"}"
            ),
            1.0,
            "{text}"
        );
        assert_eq!(
            s("flowaudit_flow_encryption_total{state=\"PLAINTEXT\"}"),
            1.0
        );
        assert_eq!(s("flowaudit_build_info{version=\"9.9.9\"}"), 1.0);
        assert_eq!(s("flowaudit_kernel_events_total"), 0.0, "{text}");
        assert!(
            text.contains("# TYPE flowaudit_flows_total counter"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        assert!(m.encode_openmetrics().ends_with("# EOF\n"));
    }

    #[test]
    fn violation_series_are_capped_and_expire() {
        let m = Arc::new(Metrics::new("0", Arc::new(CaptureStats::default())));
        let mut sink = MetricsSink::new(m.clone());
        for i in 0..VIOLATION_SERIES_CAP + 5 {
            let mut f = (*flow(EventKind::Failed, i as u64)).clone();
            f.verdict = Verdict::Violation;
            f.source.spiffe_id = format!("spiffe://demo.local/ns/a/sa/s{i}").into();
            sink.on_flow(&Arc::new(f));
        }
        let text = m.encode_prometheus_text();
        let series = text
            .lines()
            .filter(|l| l.starts_with("flowaudit_policy_violations_total{"))
            .count();
        assert_eq!(series, VIOLATION_SERIES_CAP + 1);
        assert_eq!(
            sample(
                &text,
                "flowaudit_policy_violations_total{source=\"other\",destination=\"other\",port=\"other\"}"
            ),
            Some(5.0)
        );
        sink.expire_violation_series(Duration::ZERO);
        let text = m.encode_prometheus_text();
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("flowaudit_policy_violations_total{source=\"spiffe"))
                .count(),
            0
        );
    }

    #[test]
    fn stage_handles_update_their_series() {
        let m = Metrics::new("0", Arc::new(CaptureStats::default()));
        m.identity.count(LookupResult::Attested);
        m.identity.count(LookupResult::Attested);
        m.identity.count(LookupResult::Timeout);
        m.set_spire_connected(true);
        m.policy_reload(true);
        m.policy_reload(false);
        m.set_policy_rules(6);
        let text = m.encode_prometheus_text();
        assert_eq!(
            sample(
                &text,
                "flowaudit_identity_lookups_total{result=\"attested\"}"
            ),
            Some(2.0)
        );
        for (result, n) in [("timeout", 1.0), ("no_identity", 0.0), ("unavailable", 0.0)] {
            assert_eq!(
                sample(
                    &text,
                    &format!("flowaudit_identity_lookups_total{{result=\"{result}\"}}")
                ),
                Some(n),
                "{result}"
            );
        }
        assert_eq!(sample(&text, "flowaudit_spire_connected"), Some(1.0));
        assert_eq!(
            sample(&text, "flowaudit_policy_reloads_total{result=\"failure\"}"),
            Some(1.0)
        );
        assert_eq!(sample(&text, "flowaudit_policy_rules"), Some(6.0));
    }
}
