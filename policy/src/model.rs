//! The vocabulary shared by the policy engine and the agent's flow events: verdicts,
//! finding kinds, encryption states and identity sources (serialised exactly as
//! PRODUCT.md names them), plus the flow description that enters evaluation and the
//! [`Decision`] that leaves it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

/// Whether a flow matches the intended posture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    /// Some rule allows the flow and its mTLS requirement is met (or not observable).
    Compliant,
    /// No rule allows the flow, a deny rule matches it, or required mTLS is missing.
    Violation,
    /// An identity the decision needs could not be established.
    Unknown,
}

/// What evaluation found out about a flow; zero or more per flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FindingKind {
    NoMatchingRule,
    DeniedByRule,
    MtlsMissing,
    MtlsUnverified,
    UnknownIdentity,
    IntendedFlowFailed,
    /// A certificate seen in the handshake names another SPIFFE ID than the
    /// end it belongs to (e.g. the server presented someone else's SVID).
    IdentityMismatch,
    /// A rule requires Cilium mutual authentication, and Cilium's auth map
    /// held no valid entry for the pair when the connection was made.
    MutualAuthMissing,
    /// Cilium authenticated the pair, but the bytes crossed between nodes
    /// unencrypted (no WireGuard or IPsec): authentication only.
    MutualAuthUnencrypted,
}

impl FindingKind {
    pub const ALL: [FindingKind; 9] = [
        FindingKind::NoMatchingRule,
        FindingKind::DeniedByRule,
        FindingKind::MtlsMissing,
        FindingKind::MtlsUnverified,
        FindingKind::UnknownIdentity,
        FindingKind::IntendedFlowFailed,
        FindingKind::IdentityMismatch,
        FindingKind::MutualAuthMissing,
        FindingKind::MutualAuthUnencrypted,
    ];

    /// The name used in events, metrics and filters.
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::NoMatchingRule => "NO_MATCHING_RULE",
            FindingKind::DeniedByRule => "DENIED_BY_RULE",
            FindingKind::MtlsMissing => "MTLS_MISSING",
            FindingKind::MtlsUnverified => "MTLS_UNVERIFIED",
            FindingKind::UnknownIdentity => "UNKNOWN_IDENTITY",
            FindingKind::IntendedFlowFailed => "INTENDED_FLOW_FAILED",
            FindingKind::IdentityMismatch => "IDENTITY_MISMATCH",
            FindingKind::MutualAuthMissing => "MUTUAL_AUTH_MISSING",
            FindingKind::MutualAuthUnencrypted => "MUTUAL_AUTH_UNENCRYPTED",
        }
    }
}

/// Encryption as it appears in flow events (`encryption.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EncryptionState {
    Plaintext,
    Tls,
    Mtls,
    /// No payload was seen, so nothing is known.
    Unknown,
}

/// Where an end's SPIFFE ID came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum IdentitySource {
    /// From the SPIRE Delegated Identity API.
    Attested,
    /// From pod metadata and the `spiffe://<td>/ns/<ns>/sa/<sa>` convention.
    Derived,
    Unknown,
}

impl Verdict {
    /// The name used in events, metrics and the stream.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Compliant => "COMPLIANT",
            Verdict::Violation => "VIOLATION",
            Verdict::Unknown => "UNKNOWN",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncryptionState {
    /// The name used in events, metrics and the stream.
    pub fn as_str(self) -> &'static str {
        match self {
            EncryptionState::Plaintext => "PLAINTEXT",
            EncryptionState::Tls => "TLS",
            EncryptionState::Mtls => "MTLS",
            EncryptionState::Unknown => "UNKNOWN",
        }
    }
}

impl fmt::Display for EncryptionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl IdentitySource {
    /// The name used in events, metrics and the stream.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentitySource::Attested => "ATTESTED",
            IdentitySource::Derived => "DERIVED",
            IdentitySource::Unknown => "UNKNOWN",
        }
    }
}

impl fmt::Display for IdentitySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the capture layer observed about encryption, in more detail than
/// [`EncryptionState`]: whether a TLS client certificate was *observable* decides
/// between `MTLS_MISSING` and `MTLS_UNVERIFIED`, and only the caller (which saw the
/// handshake) knows that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObservedEncryption {
    Plaintext,
    /// TLS whose handshake was visible (TLS 1.2 and older) and carried no client
    /// certificate: definitely not mutual.
    TlsNoClientCert,
    /// TLS whose client authentication cannot be observed (TLS 1.3 encrypts it).
    TlsUnverified,
    /// Mutual TLS: a client certificate was seen, or the mesh vouches for it.
    Mtls,
    /// No payload was seen (for instance a flow that failed or sent nothing).
    Unknown,
}

impl ObservedEncryption {
    /// The state reported in flow events.
    pub fn state(self) -> EncryptionState {
        match self {
            ObservedEncryption::Plaintext => EncryptionState::Plaintext,
            ObservedEncryption::TlsNoClientCert | ObservedEncryption::TlsUnverified => {
                EncryptionState::Tls
            }
            ObservedEncryption::Mtls => EncryptionState::Mtls,
            ObservedEncryption::Unknown => EncryptionState::Unknown,
        }
    }

    /// Lower-case name as used by `policy explain --encryption`.
    pub fn as_str(self) -> &'static str {
        match self {
            ObservedEncryption::Plaintext => "plaintext",
            ObservedEncryption::TlsNoClientCert => "tls-no-client-cert",
            ObservedEncryption::TlsUnverified => "tls",
            ObservedEncryption::Mtls => "mtls",
            ObservedEncryption::Unknown => "unknown",
        }
    }
}

/// What kind of thing one end of a flow is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerKind {
    /// A pod (or any workload) in the cluster.
    Workload,
    /// An address outside the cluster.
    World,
    /// A node of the cluster.
    Host,
    /// Nothing could be resolved about this end.
    Unknown,
}

/// Label lookup, so the agent can pass whatever map it keeps pod labels in.
pub trait Labels {
    fn label(&self, key: &str) -> Option<&str>;
}

impl Labels for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl<L: Labels + ?Sized> Labels for std::sync::Arc<L> {
    fn label(&self, key: &str) -> Option<&str> {
        (**self).label(key)
    }
}

impl Labels for HashMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// One end of a flow, borrowed from the caller's caches so that building it per flow
/// costs nothing.
#[derive(Clone, Copy)]
pub struct Peer<'a> {
    pub kind: PeerKind,
    /// The SPIFFE ID, attested or derived; `None` when it could not be established.
    pub spiffe_id: Option<&'a str>,
    pub identity_source: IdentitySource,
    pub namespace: Option<&'a str>,
    pub service_account: Option<&'a str>,
    /// Pod labels; `None` when they are not known (which makes label selectors
    /// undecidable, not false).
    pub labels: Option<&'a dyn Labels>,
    /// Short name used in finding messages (pod or workload name); optional.
    pub name: Option<&'a str>,
}

impl fmt::Debug for Peer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("kind", &self.kind)
            .field("spiffe_id", &self.spiffe_id)
            .field("identity_source", &self.identity_source)
            .field("namespace", &self.namespace)
            .field("service_account", &self.service_account)
            .field("labels_known", &self.labels.is_some())
            .field("name", &self.name)
            .finish()
    }
}

impl<'a> Peer<'a> {
    /// An address outside the cluster.
    pub const WORLD: Peer<'static> = Peer::of_kind(PeerKind::World);
    /// A cluster node.
    pub const HOST: Peer<'static> = Peer::of_kind(PeerKind::Host);
    /// An end about which nothing is known.
    pub const UNKNOWN: Peer<'static> = Peer::of_kind(PeerKind::Unknown);

    const fn of_kind(kind: PeerKind) -> Peer<'static> {
        Peer {
            kind,
            spiffe_id: None,
            identity_source: IdentitySource::Unknown,
            namespace: None,
            service_account: None,
            labels: None,
            name: None,
        }
    }

    /// A workload known only by its SPIFFE ID.
    pub fn spiffe(id: &'a str, source: IdentitySource) -> Self {
        Peer {
            kind: PeerKind::Workload,
            spiffe_id: Some(id),
            identity_source: source,
            namespace: None,
            service_account: None,
            labels: None,
            name: None,
        }
    }

    /// The name used in messages: the given name, else the service account (from the
    /// SPIFFE ID's `/sa/<sa>` when present), else an app label, else the ID.
    pub fn display_name(&self) -> Cow<'a, str> {
        match self.kind {
            PeerKind::World => return Cow::Borrowed("world"),
            PeerKind::Host => return Cow::Borrowed("host"),
            PeerKind::Unknown => return Cow::Borrowed("unknown"),
            PeerKind::Workload => {}
        }
        if let Some(n) = self.name {
            return Cow::Borrowed(n);
        }
        if let Some(sa) = self.service_account {
            return Cow::Borrowed(sa);
        }
        if let Some(id) = self.spiffe_id
            && let Some((_, sa)) = id.rsplit_once("/sa/")
            && !sa.is_empty()
            && !sa.contains('/')
        {
            return Cow::Borrowed(sa);
        }
        if let Some(app) = self.labels.and_then(|l| l.label("app")) {
            return Cow::Borrowed(app);
        }
        if let Some(id) = self.spiffe_id {
            return Cow::Borrowed(id);
        }
        match self.namespace {
            Some(ns) => Cow::Owned(format!("unidentified pod in {ns}")),
            None => Cow::Borrowed("unidentified workload"),
        }
    }
}

/// A flow to judge.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    pub source: Peer<'a>,
    pub destination: Peer<'a>,
    /// Destination TCP port.
    pub port: u16,
    pub encryption: ObservedEncryption,
    /// Why the encryption could not be seen, in words, when it is
    /// `Unknown` (or TLS with the client certificate undecided); empty for
    /// the default reason, that no payload was seen.
    pub encryption_detail: &'a str,
    /// The attempt never established (refused, reset, timed out).
    pub failed: bool,
    /// Where Cilium's mutual authentication state for this flow can be read;
    /// asked only when a rule requires it.
    pub mutual_auth: &'a dyn MutualAuthSource,
}

/// One finding with a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub message: String,
}

/// The outcome of evaluating one flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub findings: Vec<Finding>,
    /// The rule that decided the verdict (allow or deny); empty when none did.
    pub policy_rule: String,
    /// Whether the allowing rule(s) require mTLS.
    pub mtls_required: bool,
    /// Whether an allowing rule requires Cilium mutual authentication
    /// (`authentication.mode: required`).
    #[serde(default)]
    pub mutual_auth_required: bool,
    /// What Cilium recorded for the pair, when a rule required it and mTLS on
    /// the wire did not already satisfy it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_auth: Option<MutualAuth>,
}

impl Decision {
    pub fn has(&self, kind: FindingKind) -> bool {
        self.findings.iter().any(|f| f.kind == kind)
    }
}

/// Knobs the agent may expose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvalOptions {
    /// Count `MTLS_UNVERIFIED` (TLS whose client certificate cannot be observed) as a
    /// violation where mTLS is required. Off by default: TLS 1.3 hides client
    /// authentication, and flagging every TLS 1.3 flow would drown real findings.
    pub unverified_mtls_is_violation: bool,
}

/// Cilium mutual authentication of one flow, as its node's auth map had it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MutualAuthState {
    /// A valid entry for the pair existed when the connection was made.
    Authenticated,
    /// The pair's entry had expired when the connection was made.
    Expired,
    /// No entry for the pair (this node, this auth type).
    Missing,
    /// Cilium's state cannot be read here (no Cilium, maps not mounted, an
    /// end without a Cilium identity, or enforced on another node).
    NotObservable,
}

impl MutualAuthState {
    pub const ALL: [MutualAuthState; 4] = [
        MutualAuthState::Authenticated,
        MutualAuthState::Expired,
        MutualAuthState::Missing,
        MutualAuthState::NotObservable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MutualAuthState::Authenticated => "AUTHENTICATED",
            MutualAuthState::Expired => "EXPIRED",
            MutualAuthState::Missing => "MISSING",
            MutualAuthState::NotObservable => "NOT_OBSERVABLE",
        }
    }
}

/// Whether Cilium's transparent encryption covers a flow's path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathEncryption {
    /// Both ends on one node: transparent encryption never applies.
    SameNode,
    /// Cross-node, and Cilium encrypts it (WireGuard or IPsec).
    Encrypted,
    /// Cross-node, and Cilium does not encrypt it.
    Unencrypted,
    /// Cannot be told here.
    #[default]
    Unknown,
}

impl PathEncryption {
    pub fn as_str(self) -> &'static str {
        match self {
            PathEncryption::SameNode => "SAME_NODE",
            PathEncryption::Encrypted => "ENCRYPTED",
            PathEncryption::Unencrypted => "UNENCRYPTED",
            PathEncryption::Unknown => "UNKNOWN",
        }
    }
}

/// The node whose Cilium enforces a mutual authentication requirement: the
/// destination's for an ingress rule, the source's for an egress rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthSide {
    Ingress,
    Egress,
}

/// What was seen of Cilium mutual authentication for one flow (`mutual_auth`
/// in flow events).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MutualAuth {
    pub state: MutualAuthState,
    /// Whose node enforces it (and whose auth map was read).
    pub enforced_on: AuthSide,
    /// Cilium security identities of the enforcing end and of its peer, and
    /// the peer's node id, as in the auth map's key; 0 when not known.
    #[serde(default)]
    pub local_identity: u32,
    #[serde(default)]
    pub remote_identity: u32,
    #[serde(default)]
    pub remote_node_id: u16,
    /// Expiry of the entry found (RFC 3339), empty when none was.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub expires: String,
    #[serde(default)]
    pub path_encryption: PathEncryption,
    /// Why it is not observable, or what was looked for; empty when
    /// authenticated.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl MutualAuth {
    /// An answer that says the state cannot be read, and why.
    pub fn not_observable(side: AuthSide, detail: impl Into<String>) -> Self {
        MutualAuth {
            state: MutualAuthState::NotObservable,
            enforced_on: side,
            local_identity: 0,
            remote_identity: 0,
            remote_node_id: 0,
            expires: String::new(),
            path_encryption: PathEncryption::Unknown,
            detail: detail.into(),
        }
    }
}

/// Where the policy engine reads Cilium's mutual authentication state for the
/// flow it is judging. Asked only for flows under a rule that requires it.
pub trait MutualAuthSource: fmt::Debug {
    fn observe(&self, side: AuthSide) -> MutualAuth;
}

/// No Cilium state to read: every answer is `NOT_OBSERVABLE`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCilium;

/// What `NoCilium` says.
pub const NO_CILIUM: &str = "Cilium mutual authentication not observable here";

impl MutualAuthSource for NoCilium {
    fn observe(&self, side: AuthSide) -> MutualAuth {
        MutualAuth::not_observable(side, NO_CILIUM)
    }
}

/// A fixed answer (for `policy explain` and tests).
impl MutualAuthSource for MutualAuth {
    fn observe(&self, side: AuthSide) -> MutualAuth {
        MutualAuth {
            enforced_on: side,
            ..self.clone()
        }
    }
}
