//! The flow event: what every stage after capture passes along and what the
//! export file, the stream and `observe -o json` carry, in the exact JSON
//! shape of PRODUCT.md. Capture fills the kernel facts (4-tuple, owner,
//! bytes, timing); identity, policy and the TLS classifier fill the rest.

pub mod json;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

pub use arcstr::ArcStr;

/// Makes `s` static (kept for the agent's life) while fewer than `cap`
/// strings were made so through `made`: a string every flow shares (a
/// process's name, a derived SPIFFE ID) is then copied and dropped without
/// touching a reference count, two atomic operations per copy otherwise.
/// `cap` bounds the memory kept, whatever the node runs.
pub fn make_static(s: &ArcStr, made: &std::sync::atomic::AtomicUsize, cap: usize) {
    use std::sync::atomic::Ordering;
    if made.load(Ordering::Relaxed) < cap && made.fetch_add(1, Ordering::Relaxed) < cap {
        s.leak();
    }
}
pub use flowaudit_policy::Finding;
use flowaudit_policy::{EncryptionState, IdentitySource, Verdict};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventKind {
    Connect,
    Close,
    Failed,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Connect => "CONNECT",
            EventKind::Close => "CLOSE",
            EventKind::Failed => "FAILED",
        }
    }
}

/// Seen from the node: EGRESS when the observing socket connected out,
/// INGRESS when it accepted the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "EGRESS",
            Direction::Ingress => "INGRESS",
        }
    }
}

/// Why an attempt never established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailureReason {
    /// The peer answered the SYN with a reset (nothing listening, or a reject rule).
    Refused,
    /// The connection was reset during the handshake.
    Reset,
    /// SYNs went unanswered until the kernel gave up.
    TimedOut,
    /// The network said the peer cannot be reached (ICMP, or no ARP/ND answer).
    Unreachable,
    /// The application closed the socket while the handshake was pending,
    /// typically its own connect timeout; `retransmits` says how many SYNs were retried.
    Aborted,
    /// Another socket error; the errno is in the message.
    Error,
    /// The kernel did not let the agent read the socket's error (the
    /// `kernel_reads` degradation, e.g. under lockdown).
    Unknown,
}

impl FailureReason {
    /// Classifies the socket error (errno) of a socket that closed before it established.
    pub fn classify(errno: u32) -> Self {
        if errno == flowaudit_common::ERROR_UNREAD || errno == flowaudit_common::ERROR_TAKEN {
            return FailureReason::Unknown;
        }
        match errno as i32 {
            // No error: the application gave up (its own connect timeout);
            // `retransmits` tells whether SYNs went unanswered meanwhile.
            0 => FailureReason::Aborted,
            libc::ECONNREFUSED => FailureReason::Refused,
            libc::ECONNRESET | libc::EPIPE => FailureReason::Reset,
            libc::ETIMEDOUT => FailureReason::TimedOut,
            libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN => {
                FailureReason::Unreachable
            }
            _ => FailureReason::Error,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Refused => "REFUSED",
            FailureReason::Reset => "RESET",
            FailureReason::TimedOut => "TIMED_OUT",
            FailureReason::Unreachable => "UNREACHABLE",
            FailureReason::Aborted => "ABORTED",
            FailureReason::Error => "ERROR",
            FailureReason::Unknown => "UNKNOWN",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct L4 {
    /// "TCP", a literal: no allocation per flow.
    pub protocol: ArcStr,
    pub source_ip: IpAddr,
    pub source_port: u16,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

/// What an end is: a pod, a node's own address, outside the cluster, or not
/// known (no endpoint directory to ask).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EndKind {
    Pod,
    Host,
    World,
    #[default]
    Unknown,
}

/// A pod's names and labels: made once per pod by the endpoint directory
/// and shared (one `Arc`) by every end of every flow of the pod, so a flow
/// copies none of them and joining an end to its pod is one reference
/// count. In JSON its fields sit in the end itself (flattened).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMeta {
    pub namespace: ArcStr,
    pub pod_name: ArcStr,
    pub service_account: ArcStr,
    pub labels: BTreeMap<String, String>,
}

/// The names of an end no pod stands for: all empty.
static NO_POD: PodMeta = PodMeta {
    namespace: ArcStr::new(),
    pod_name: ArcStr::new(),
    service_account: ArcStr::new(),
    labels: BTreeMap::new(),
};

/// An end's pod ([`PodMeta`], which it derefs to): the directory's shared
/// entry, or none, an empty value held without a reference count. Every
/// end starts without a pod and most are given one a moment later, so a
/// shared empty `Arc` cost two atomic operations per end for nothing.
#[derive(Clone, Default)]
pub struct PodRef(Option<Arc<PodMeta>>);

impl PodRef {
    /// No pod.
    pub const NONE: PodRef = PodRef(None);

    /// Where the names live: the same for every end of a pod (and for
    /// every end without one), so a cache can key on it.
    pub fn as_ptr(&self) -> *const PodMeta {
        &**self
    }

    /// The names to change, copied first if shared (an empty entry is
    /// made for an end without a pod).
    pub fn make_mut(&mut self) -> &mut PodMeta {
        Arc::make_mut(self.0.get_or_insert_with(Arc::default))
    }

    /// Whether both are the same pod entry (or both none).
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        std::ptr::eq(a.as_ptr(), b.as_ptr())
    }
}

impl std::ops::Deref for PodRef {
    type Target = PodMeta;
    fn deref(&self) -> &PodMeta {
        self.0.as_deref().unwrap_or(&NO_POD)
    }
}

impl From<Arc<PodMeta>> for PodRef {
    fn from(pod: Arc<PodMeta>) -> Self {
        PodRef(Some(pod))
    }
}

impl From<PodMeta> for PodRef {
    fn from(pod: PodMeta) -> Self {
        PodRef(Some(Arc::new(pod)))
    }
}

/// By the names, not where they live: no pod equals an empty one.
impl PartialEq for PodRef {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for PodRef {}

impl std::fmt::Debug for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl Serialize for PodRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for PodRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        PodMeta::deserialize(d).map(PodRef::from)
    }
}

/// One end of a flow. `pid`/`process` are set for the end whose socket the
/// kernel saw on this node (both ends when both live here, as two events).
/// The pod's names and labels are shared with the endpoint directory
/// (`pod`), the SPIFFE ID with the identity cache, so a flow copies none of
/// them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    #[serde(default)]
    pub kind: EndKind,
    pub spiffe_id: ArcStr,
    pub identity_source: IdentitySource,
    /// Why the end is not ATTESTED (how the ID was reached instead, or why
    /// it could not be); empty for ATTESTED ends.
    /// Mostly one of a few fixed sentences, static (`arcstr::literal!`):
    /// shared without a copy or a count, and 8 bytes in the flow.
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub identity_detail: ArcStr,
    /// `namespace`, `pod_name`, `service_account` and `labels` in JSON.
    #[serde(flatten)]
    pub pod: PodRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ArcStr>,
    /// cgroup v2 id of the owning process: the key identity uses to find the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

impl Endpoint {
    pub fn unknown() -> Self {
        Self {
            kind: EndKind::Unknown,
            spiffe_id: ArcStr::new(),
            identity_source: IdentitySource::Unknown,
            identity_detail: ArcStr::new(),
            pod: PodRef::NONE,
            pid: None,
            process: None,
            cgroup_id: None,
        }
    }
}

/// What the first payload bytes showed (`encryption` in events). The first
/// four fields are PRODUCT's; the rest appear when known.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Encryption {
    pub state: EncryptionState,
    pub tls_version: String,
    pub sni: String,
    pub alpn: Vec<String>,
    /// "http", "postgresql", ... for recognised plaintext; "tls".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    #[serde(default, skip_serializing_if = "ClientCertificate::is_unknown")]
    pub client_certificate: ClientCertificate,
    /// `client_certificate` was inferred from the size of the client's
    /// encrypted second flight (TLS 1.3 hides certificates).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub client_certificate_inferred: bool,
    /// SPIFFE IDs of the certificates seen in clear (TLS 1.2 and older).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub server_spiffe_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_spiffe_id: String,
    /// Why the encryption (or, for TLS, the client certificate) could not
    /// be seen; set only when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown_reason: Option<UnknownReason>,
}

/// Why a connection's encryption could not be seen. A flow under a rule
/// requiring mTLS with one of these gets `MTLS_UNVERIFIED` with the reason,
/// and `flowaudit_mtls_unverified_total{reason}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownReason {
    /// No payload arrived (in time for a CONNECT event, or at all).
    NoPayloadSeen,
    /// The kernel did not watch the socket's payload (its map was full, or
    /// payload capture is off).
    NotWatched,
    /// Payload bytes were lost (ring buffer full, or the agent's own
    /// tracker was full).
    PayloadLost,
    /// A segment was missing or out of order: the stream could not be followed.
    StreamGap,
    /// The packets cannot be parsed (IPv6 extension headers).
    NotObservable,
}

impl UnknownReason {
    pub const ALL: [UnknownReason; 5] = [
        Self::NoPayloadSeen,
        Self::NotWatched,
        Self::PayloadLost,
        Self::StreamGap,
        Self::NotObservable,
    ];

    /// The JSON and metric label form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoPayloadSeen => "no_payload_seen",
            Self::NotWatched => "not_watched",
            Self::PayloadLost => "payload_lost",
            Self::StreamGap => "stream_gap",
            Self::NotObservable => "not_observable",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Words for finding messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NoPayloadSeen => "no payload was seen in time",
            Self::NotWatched => {
                "capture lost: the payload was not watched (--payload-sockets sockets were watched already; or payload capture is off, --payload-capture=false)"
            }
            Self::PayloadLost => "capture lost: payload bytes were dropped (ring buffer full)",
            Self::StreamGap => {
                "capture lost: a gap in the byte stream (a segment missing or out of order)"
            }
            Self::NotObservable => {
                "not observable: packets with IPv6 extension headers are not parsed"
            }
        }
    }
}

impl Default for Encryption {
    fn default() -> Self {
        Self {
            state: EncryptionState::Unknown,
            tls_version: String::new(),
            sni: String::new(),
            alpn: Vec::new(),
            protocol: String::new(),
            client_certificate: ClientCertificate::Unknown,
            client_certificate_inferred: false,
            server_spiffe_id: String::new(),
            client_spiffe_id: String::new(),
            unknown_reason: None,
        }
    }
}

/// Whether the TLS client presented a certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClientCertificate {
    /// Not TLS, or the handshake was not seen far enough.
    #[default]
    Unknown,
    Sent,
    /// The server did not ask for one, or the client sent an empty one.
    NotSent,
    /// TLS 1.3 resumption or similar: it cannot be told from the wire.
    Unobservable,
}

impl ClientCertificate {
    fn is_unknown(&self) -> bool {
        *self == Self::Unknown
    }
}

/// Kernel facts that do not belong to either end: which socket, which
/// network namespace, why it failed. Kept so a CONNECT can be tied to its
/// CLOSE and a pod's traffic told apart from the host's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Socket {
    pub cookie: u64,
    pub netns_cookie: u64,
    /// Start time of the owning process (ns since boot), to tell a reused pid.
    #[serde(default)]
    pub process_start_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<FailureReason>,
    /// errno of the socket error seen at close, 0 if none.
    #[serde(default)]
    pub error: u32,
    #[serde(default)]
    pub retransmits: u32,
}

/// A flow's one-line summary (JSON `summary`), written when a sink first
/// serializes the flow (the export file's thread, a subscriber's stream)
/// rather than by the pipeline for every flow: a flow only counted in
/// metrics never has one built. Empty until then, or as received (from the
/// stream, or JSON). A flow changed after it was asked for (the relay's
/// joined flow, built from a half) gets `Summary::default()` again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary(OnceLock<String>);

impl Summary {
    /// The summary if it was written (or received); never writes it.
    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

impl From<String> for Summary {
    fn from(s: String) -> Self {
        Self(OnceLock::from(s))
    }
}

impl Serialize for Summary {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.get().unwrap_or_default())
    }
}

impl<'de> Deserialize<'de> for Summary {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::from)
    }
}

/// A flow's findings (JSON `findings`, a list). Shared with the judge's
/// memo: a remembered decision copies neither the list nor its messages.
/// No findings is no allocation. Changing them (`push`, `extend`, through
/// `DerefMut`) copies the list first if another flow shares it.
#[derive(Debug, Clone, Default)]
pub struct Findings(Option<Arc<Vec<Finding>>>);

impl Findings {
    pub fn push(&mut self, finding: Finding) {
        self.list_mut().push(finding);
    }

    fn list_mut(&mut self) -> &mut Vec<Finding> {
        Arc::make_mut(self.0.get_or_insert_with(Default::default))
    }
}

impl std::ops::Deref for Findings {
    type Target = [Finding];
    fn deref(&self) -> &[Finding] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
}

impl std::ops::DerefMut for Findings {
    fn deref_mut(&mut self) -> &mut [Finding] {
        self.list_mut()
    }
}

impl From<Vec<Finding>> for Findings {
    fn from(list: Vec<Finding>) -> Self {
        Self((!list.is_empty()).then(|| Arc::new(list)))
    }
}

impl Extend<Finding> for Findings {
    fn extend<I: IntoIterator<Item = Finding>>(&mut self, iter: I) {
        let mut iter = iter.into_iter().peekable();
        if iter.peek().is_some() {
            self.list_mut().extend(iter);
        }
    }
}

impl FromIterator<Finding> for Findings {
    fn from_iter<I: IntoIterator<Item = Finding>>(iter: I) -> Self {
        Vec::from_iter(iter).into()
    }
}

impl<'a> IntoIterator for &'a Findings {
    type Item = &'a Finding;
    type IntoIter = std::slice::Iter<'a, Finding>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl PartialEq for Findings {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Findings {}

impl Serialize for Findings {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Findings {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::deserialize(d).map(Self::from)
    }
}

/// A flow event (PRODUCT.md "Flow events", JSON form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEvent {
    /// JSON: RFC 3339 with nanoseconds, UTC.
    pub time: FlowTime,
    pub node_name: ArcStr,
    pub event: EventKind,
    pub verdict: Verdict,
    pub findings: Findings,
    /// Shared with the judge's memo: a remembered decision copies no bytes.
    pub policy_rule: ArcStr,
    pub l4: L4,
    pub source: Endpoint,
    pub destination: Endpoint,
    pub direction: Direction,
    /// Shared: sockets with the same answer point at one copy.
    pub encryption: Arc<Encryption>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: u64,
    /// Written when a sink first serializes the flow: see [`Summary`].
    pub summary: Summary,
    /// Not in PRODUCT.md's JSON form: a line without it (written by hand
    /// or by another tool in that form) reads as socket 0.
    #[serde(default)]
    pub socket: Socket,
    /// Cilium mutual authentication, on flows under a rule that requires it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_auth: Option<Box<flowaudit_policy::MutualAuth>>,
    /// `flowaudit relay --join`: the halves of the connection this flow
    /// stands for, each as its own node saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined: Option<Box<Joined>>,
}

/// The halves of a connection joined by the relay (JSON `joined`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    /// Both halves, or the one that came when the join window closed.
    pub halves: Vec<JoinedHalf>,
}

/// One node's view of a joined connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinedHalf {
    pub direction: Direction,
    pub node_name: ArcStr,
    pub time: FlowTime,
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<Finding>,
    pub source_identity: IdentitySource,
    pub destination_identity: IdentitySource,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub encryption: EncryptionState,
    pub cookie: u64,
}

impl FlowEvent {
    /// The endpoint whose socket the kernel saw (the one with the process).
    pub fn local_end_mut(&mut self) -> &mut Endpoint {
        match self.direction {
            Direction::Egress => &mut self.source,
            Direction::Ingress => &mut self.destination,
        }
    }

    /// Short name of an end for summaries: pod, else address.
    pub fn end_name(&self, ep: &Endpoint, ip: IpAddr) -> String {
        let mut s = String::new();
        write_end_name(&mut s, ep, ip);
        s
    }

    /// The one-line summary, written the first time it is asked for.
    pub fn summary(&self) -> &str {
        self.summary.0.get_or_init(|| self.make_summary())
    }

    /// One-line description, e.g. "frontend -> postgresql:5432 plaintext: no rule allows this flow".
    /// Written into one buffer.
    pub fn make_summary(&self) -> String {
        let mut s = String::with_capacity(
            96 + self.findings.first().map_or(0, |f| f.message.len())
                + self.source.pod.service_account.len()
                + self.destination.pod.service_account.len(),
        );
        self.write_summary(&mut s);
        s
    }

    /// Appends the summary (what [`FlowEvent::make_summary`] returns) to
    /// `s`: the export file's writer reuses one buffer for every flow.
    pub fn write_summary(&self, s: &mut String) {
        let mut n = itoa::Buffer::new();
        write_end_name(s, &self.source, self.l4.source_ip);
        s.push_str(" -> ");
        write_end_name(s, &self.destination, self.l4.destination_ip);
        s.push(':');
        s.push_str(n.format(self.l4.destination_port));
        match self.event {
            EventKind::Connect => s.push_str(" connected"),
            EventKind::Close => {
                s.push_str(" closed after ");
                s.push_str(n.format(self.duration_ms));
                s.push_str(" ms, ");
                s.push_str(n.format(self.bytes_sent));
                s.push_str(" B sent, ");
                s.push_str(n.format(self.bytes_received));
                s.push_str(" B received");
            }
            EventKind::Failed => {
                let reason = self
                    .socket
                    .failure_reason
                    .map_or("FAILED", FailureReason::as_str);
                s.push_str(" failed: ");
                s.extend(reason.chars().map(|c| {
                    if c == '_' {
                        ' '
                    } else {
                        c.to_ascii_lowercase()
                    }
                }));
                if self.socket.retransmits > 0 {
                    s.push_str(" after ");
                    s.push_str(n.format(self.socket.retransmits));
                    s.push_str(" SYN retransmissions");
                }
            }
        }
        if let Some(f) = self.findings.first() {
            s.push_str(": ");
            s.push_str(&f.message);
        }
    }
}

/// Appends the short name of an end: its workload (service account), pod,
/// else what its address is.
fn write_end_name(s: &mut String, ep: &Endpoint, ip: IpAddr) {
    // Writing into a String cannot fail.
    if !ep.pod.service_account.is_empty() {
        // The workload's name reads better than the pod's hashed one: "frontend", not "frontend-7d9f".
        s.push_str(&ep.pod.service_account);
    } else if !ep.pod.pod_name.is_empty() {
        s.push_str(&ep.pod.pod_name);
    } else if ep.kind == EndKind::World {
        let _ = write!(s, "world ({ip})");
    } else if ep.kind == EndKind::Host {
        let _ = write!(s, "host ({ip})");
    } else if let Some(p) = &ep.process {
        let _ = write!(s, "{ip} ({p})");
    } else {
        let _ = write!(s, "{ip}");
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses RFC 3339 (`2026-11-28T12:00:01.123Z`, `...+02:00`; `t` and
/// a space accepted for `T`) into seconds and nanoseconds since the Unix epoch.
pub fn parse_rfc3339(text: &str) -> Option<(i64, u32)> {
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 9 {
                nanos = nanos * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        let digits = i - start;
        if digits == 0 {
            return None;
        }
        for _ in digits..9 {
            nanos *= 10;
        }
    }
    let offset = match text.get(i..)? {
        "Z" | "z" => 0,
        tz if tz.len() == 6
            && (tz.starts_with('+') || tz.starts_with('-'))
            && tz.as_bytes()[3] == b':' =>
        {
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            sign * (num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    Some((
        days * 86_400 + h * 3600 + mi * 60 + s - offset,
        nanos as u32,
    ))
}

/// When a flow happened: seconds and nanoseconds since the Unix epoch,
/// UTC. Kept as integers (compared, ordered and turned into a protobuf
/// `Timestamp` as such); the RFC 3339 text (`2026-11-28T12:00:01.123456789Z`,
/// JSON `time`) is written only when a flow is serialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FlowTime {
    secs: i64,
    /// Below 1,000,000,000.
    nanos: u32,
}

impl FlowTime {
    /// `nanos` past a second are cut to the last nanosecond of it.
    pub fn new(secs: i64, nanos: u32) -> Self {
        Self {
            secs,
            nanos: nanos.min(999_999_999),
        }
    }

    /// A wall-clock time; one before the epoch is the epoch.
    pub fn from_system(t: std::time::SystemTime) -> Self {
        let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Self::new(
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        )
    }

    pub fn now() -> Self {
        Self::from_system(std::time::SystemTime::now())
    }

    /// RFC 3339 text (see [`parse_rfc3339`]).
    pub fn parse(text: &str) -> Option<Self> {
        parse_rfc3339(text).map(|(secs, nanos)| Self::new(secs, nanos))
    }

    pub fn secs(self) -> i64 {
        self.secs
    }

    pub fn nanos(self) -> u32 {
        self.nanos
    }

    /// RFC 3339, UTC, with nanoseconds: digits written into a fixed
    /// template on the stack (once per serialized flow, so without the
    /// formatting machinery).
    pub fn rfc3339(self) -> Rfc3339 {
        let (days, rem) = (self.secs.div_euclid(86_400), self.secs.rem_euclid(86_400));
        let (y, m, dd) = civil_from_days(days);
        let mut out = Rfc3339 {
            buf: [0; Rfc3339::CAP],
            len: Rfc3339::FIXED,
        };
        if !(0..=9999).contains(&y) {
            let s = rfc3339_formatted(y, m, dd, rem, self.nanos);
            // An i64 of seconds has at most 12 digits of years.
            out.len = s.len().min(Rfc3339::CAP);
            out.buf[..out.len].copy_from_slice(&s.as_bytes()[..out.len]);
            return out;
        }
        out.buf[..Rfc3339::FIXED].copy_from_slice(b"0000-00-00T00:00:00.000000000Z");
        let fields: [(std::ops::Range<usize>, u64); 7] = [
            (0..4, y as u64),
            (5..7, u64::from(m)),
            (8..10, u64::from(dd)),
            (11..13, (rem / 3600) as u64),
            (14..16, ((rem % 3600) / 60) as u64),
            (17..19, (rem % 60) as u64),
            (20..29, u64::from(self.nanos)),
        ];
        for (range, v) in fields {
            digits(&mut out.buf[range], v);
        }
        out
    }
}

/// Tests write times as text.
#[cfg(test)]
impl From<&str> for FlowTime {
    fn from(text: &str) -> Self {
        Self::parse(text).unwrap_or_else(|| panic!("not an RFC 3339 time: {text:?}"))
    }
}

/// A time's RFC 3339 text, on the stack.
#[derive(Clone, Copy)]
pub struct Rfc3339 {
    buf: [u8; Rfc3339::CAP],
    len: usize,
}

impl Rfc3339 {
    const CAP: usize = 48;
    /// Length of the fixed form (years 0 to 9999), whose nanoseconds are
    /// `buf[20..29]`.
    const FIXED: usize = 30;

    /// The same text with these nanoseconds (a time in the same second):
    /// false, changing nothing, when it is not the fixed form.
    fn set_nanos(&mut self, nanos: u32) -> bool {
        if self.len != Self::FIXED {
            return false;
        }
        digits(&mut self.buf[20..29], u64::from(nanos));
        true
    }
}

/// Fills `buf` with the last decimal digits of `v`, leading zeros included.
fn digits(buf: &mut [u8], mut v: u64) {
    for c in buf.iter_mut().rev() {
        *c = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

impl std::ops::Deref for Rfc3339 {
    type Target = str;
    fn deref(&self) -> &str {
        // Digits and ASCII punctuation only.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl std::fmt::Display for FlowTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.rfc3339())
    }
}

impl Serialize for FlowTime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.rfc3339())
    }
}

impl<'de> Deserialize<'de> for FlowTime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Cow::<str>::deserialize(d)?;
        Self::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 time: {text:?}")))
    }
}

/// A wall-clock time as RFC 3339 UTC with nanoseconds (see
/// [`FlowTime::rfc3339`]).
pub fn rfc3339_nanos(t: std::time::SystemTime) -> String {
    FlowTime::from_system(t).to_string()
}

/// The same, through `write!` (years past 9999, and the tests' reference).
fn rfc3339_formatted(y: i64, m: u32, dd: u32, rem: i64, nanos: u32) -> String {
    let mut s = String::with_capacity(30);
    // Writing into a String cannot fail.
    let _ = write!(
        s,
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
    );
    s
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    /// An end without a pod reads as empty names, equals an empty pod,
    /// writes and reads back as one, and is changed through a copy of its own.
    #[test]
    fn an_end_without_a_pod_reads_as_empty_names() {
        let none = PodRef::NONE;
        assert_eq!(*none, PodMeta::default());
        assert_eq!(none, PodRef::from(PodMeta::default()));
        assert!(PodRef::ptr_eq(&none, &PodRef::default()), "one empty value");
        let mut ep = Endpoint::unknown();
        let json = serde_json::to_value(&ep).unwrap();
        assert_eq!(json["namespace"], "");
        assert_eq!(json["labels"], serde_json::json!({}));
        let back: Endpoint = serde_json::from_value(json).unwrap();
        assert_eq!(back, ep);
        // A pod's entry is shared by pointer; changing an end copies it.
        let shared = PodRef::from(PodMeta {
            namespace: "99-apps".into(),
            ..PodMeta::default()
        });
        ep.pod = shared.clone();
        assert!(PodRef::ptr_eq(&ep.pod, &shared));
        ep.pod.make_mut().pod_name = "frontend-0".into();
        assert!(!PodRef::ptr_eq(&ep.pod, &shared));
        assert_eq!((&*ep.pod.namespace, &*shared.pod_name), ("99-apps", ""));
        let mut other = Endpoint::unknown();
        other.pod.make_mut().namespace = "x".into();
        assert_eq!(other.pod.namespace, "x");
        assert_eq!(
            PodRef::NONE.namespace,
            "",
            "the shared empty value is untouched"
        );
    }

    /// The template writer agrees with `write!` over centuries of instants.
    #[test]
    fn rfc3339_template_agrees_with_formatting() {
        let mut secs: u64 = 0;
        while secs < 253_402_300_799 {
            for nanos in [0, 1, 999_999_999, 123_456_789] {
                let t = UNIX_EPOCH + Duration::new(secs, nanos);
                let (days, rem) = ((secs / 86_400) as i64, (secs % 86_400) as i64);
                let (y, m, d) = civil_from_days(days);
                assert_eq!(
                    rfc3339_nanos(t),
                    rfc3339_formatted(y, m, d, rem, nanos),
                    "{secs}"
                );
            }
            secs = secs * 3 / 2 + 86_399;
        }
        let far = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert_eq!(rfc3339_nanos(far), "10000-01-01T00:00:00.000000000Z");
    }

    /// Times are integers, written as RFC 3339 only when serialized: JSON
    /// holds the text, reads it back, and refuses what is not a time.
    #[test]
    fn flow_times_order_as_times_and_round_trip_through_json() {
        let t = FlowTime::parse("2026-11-28T14:00:01.5+02:00").unwrap();
        assert_eq!(t, FlowTime::new(1_795_867_201, 500_000_000));
        assert_eq!(t.to_string(), "2026-11-28T12:00:01.500000000Z");
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2026-11-28T12:00:01.500000000Z\"");
        assert_eq!(serde_json::from_str::<FlowTime>(&json).unwrap(), t);
        let e = serde_json::from_str::<FlowTime>("\"12:00 yesterday\"").unwrap_err();
        assert!(
            e.to_string()
                .contains("not an RFC 3339 time: \"12:00 yesterday\""),
            "{e}"
        );
        assert!(FlowTime::new(1, 0) > FlowTime::new(0, 999_999_999));
        assert!(FlowTime::new(-1, 0) < FlowTime::default());
        assert_eq!(FlowTime::new(5, 2_000_000_000).nanos(), 999_999_999);
        assert_eq!(
            FlowTime::new(-1, 5).to_string(),
            "1969-12-31T23:59:59.000000005Z"
        );
        // Whatever a peer sends: written whole, never a panic.
        for secs in [i64::MAX, i64::MIN, 253_402_300_800] {
            let text = FlowTime::new(secs, 999_999_999).to_string();
            assert!(text.ends_with(".999999999Z"), "{text}");
        }
    }

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339_nanos(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_795_867_201, 123_456_789);
        assert_eq!(rfc3339_nanos(t), "2026-11-28T12:00:01.123456789Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339_nanos(leap), "2000-02-29T00:00:00.000000000Z");
    }

    #[test]
    fn failure_reasons_follow_the_socket_error() {
        assert_eq!(
            FailureReason::classify(libc::ECONNREFUSED as u32),
            FailureReason::Refused
        );
        assert_eq!(
            FailureReason::classify(libc::ETIMEDOUT as u32),
            FailureReason::TimedOut
        );
        assert_eq!(
            FailureReason::classify(libc::EHOSTUNREACH as u32),
            FailureReason::Unreachable
        );
        assert_eq!(
            FailureReason::classify(libc::ECONNRESET as u32),
            FailureReason::Reset
        );
        assert_eq!(FailureReason::classify(0), FailureReason::Aborted);
        assert_eq!(
            FailureReason::classify(flowaudit_common::ERROR_UNREAD),
            FailureReason::Unknown
        );
        // The kernel ended it, the application had read its error: not ABORTED.
        assert_eq!(
            FailureReason::classify(flowaudit_common::ERROR_TAKEN),
            FailureReason::Unknown
        );
        assert_eq!(
            FailureReason::classify(libc::EACCES as u32),
            FailureReason::Error
        );
    }
}
