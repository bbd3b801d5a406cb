//! The intermediate form every policy document is parsed into before compilation:
//! SPIFFE-ID rules from FlowPolicy, and per-endpoint, per-direction label policies
//! imported from Cilium and Kubernetes. Also the three-valued logic ([`Tri`]) used
//! when an end's identity or labels are not known.

use crate::model::{Peer, PeerKind};
use crate::ports::PortSet;
use crate::spiffe::IdPattern;

/// Kleene three-valued truth: `Unknown` when the answer depends on something about
/// a peer that is not known (its SPIFFE ID, namespace or labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Tri {
    #[default]
    No,
    Unknown,
    Yes,
}

impl std::ops::Not for Tri {
    type Output = Tri;
    fn not(self) -> Tri {
        match self {
            Tri::No => Tri::Yes,
            Tri::Unknown => Tri::Unknown,
            Tri::Yes => Tri::No,
        }
    }
}

impl Tri {
    pub fn and(self, o: Tri) -> Tri {
        self.min(o)
    }
    pub fn or(self, o: Tri) -> Tri {
        self.max(o)
    }
    pub fn from_bool(b: bool) -> Tri {
        if b { Tri::Yes } else { Tri::No }
    }
}

/// Where a rule was written, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub line: usize,
    pub col: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    Required,
    Optional,
}

/// One end of a FlowPolicy rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerPattern {
    Spiffe(IdPattern),
    World,
    Host,
}

impl std::fmt::Display for PeerPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerPattern::Spiffe(p) => p.fmt(f),
            PeerPattern::World => f.write_str("world"),
            PeerPattern::Host => f.write_str("host"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow(MtlsMode),
    Deny,
}

/// A FlowPolicy rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub policy: String,
    pub from: Vec<PeerPattern>,
    pub to: Vec<PeerPattern>,
    pub ports: PortSet,
    pub action: Action,
    pub origin: Origin,
}

/// What a label requirement looks at on an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LabelKey {
    Namespace,
    ServiceAccount,
    Pod(String),
    /// A namespace label other than `kubernetes.io/metadata.name`: flowaudit is not
    /// told namespace labels, so requirements on them are undecidable.
    NamespaceLabel(String),
}

impl std::fmt::Display for LabelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabelKey::Namespace => f.write_str("namespace"),
            LabelKey::ServiceAccount => f.write_str("serviceaccount"),
            LabelKey::Pod(k) => f.write_str(k),
            LabelKey::NamespaceLabel(k) => write!(f, "namespace label {k}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Req {
    In(LabelKey, Vec<String>),
    NotIn(LabelKey, Vec<String>),
    Exists(LabelKey),
    DoesNotExist(LabelKey),
    /// Matches nothing (an unsupported construct that was reported).
    Never,
}

/// A conjunction of label requirements over pods (never matches world or host).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    pub reqs: Vec<Req>,
}

impl Selector {
    pub fn has_namespace_req(&self) -> bool {
        self.reqs.iter().any(|r| match r {
            Req::In(k, _) | Req::NotIn(k, _) | Req::Exists(k) | Req::DoesNotExist(k) => {
                *k == LabelKey::Namespace
            }
            Req::Never => false,
        })
    }

    /// The single namespace this selector is confined to, if any (for indexing).
    pub fn namespace(&self) -> Option<&str> {
        self.reqs.iter().find_map(|r| match r {
            Req::In(LabelKey::Namespace, v) if v.len() == 1 => v.first().map(String::as_str),
            _ => None,
        })
    }

    /// One `label=value` the selector requires, if any (for indexing).
    pub fn index_pair(&self) -> Option<(&str, &str)> {
        self.reqs.iter().find_map(|r| match r {
            Req::In(LabelKey::Pod(k), v) if v.len() == 1 => {
                v.first().map(|v| (k.as_str(), v.as_str()))
            }
            _ => None,
        })
    }

    pub fn matches(&self, peer: &Peer<'_>) -> Tri {
        match peer.kind {
            PeerKind::World | PeerKind::Host => return Tri::No,
            PeerKind::Unknown => {
                // Still No if the selector can match nothing at all.
                return if self.reqs.contains(&Req::Never) {
                    Tri::No
                } else {
                    Tri::Unknown
                };
            }
            PeerKind::Workload => {}
        }
        let mut acc = Tri::Yes;
        for r in &self.reqs {
            let t = match r {
                Req::Never => Tri::No,
                Req::In(k, vs) => value(peer, k).map_or(Tri::Unknown, |v| {
                    Tri::from_bool(v.is_some_and(|v| vs.iter().any(|x| x == v)))
                }),
                Req::NotIn(k, vs) => value(peer, k).map_or(Tri::Unknown, |v| {
                    Tri::from_bool(!v.is_some_and(|v| vs.iter().any(|x| x == v)))
                }),
                Req::Exists(k) => {
                    value(peer, k).map_or(Tri::Unknown, |v| Tri::from_bool(v.is_some()))
                }
                Req::DoesNotExist(k) => {
                    value(peer, k).map_or(Tri::Unknown, |v| Tri::from_bool(v.is_none()))
                }
            };
            acc = acc.and(t);
            if acc == Tri::No {
                break;
            }
        }
        acc
    }
}

/// `None` when unknown; `Some(None)` when known to be absent.
fn value<'a>(peer: &Peer<'a>, key: &LabelKey) -> Option<Option<&'a str>> {
    match key {
        LabelKey::Namespace => peer.namespace.map(Some),
        LabelKey::ServiceAccount => peer.service_account.map(Some),
        LabelKey::Pod(k) => peer.labels.map(|l| l.label(k)),
        LabelKey::NamespaceLabel(_) => None,
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.reqs.is_empty() {
            return f.write_str("all pods");
        }
        let parts: Vec<String> = self
            .reqs
            .iter()
            .map(|r| match r {
                Req::In(k, v) if v.len() == 1 => format!("{k}={}", v.join("")),
                Req::In(k, v) => format!("{k} in ({})", v.join(",")),
                Req::NotIn(k, v) => format!("{k} notin ({})", v.join(",")),
                Req::Exists(k) => k.to_string(),
                Req::DoesNotExist(k) => format!("!{k}"),
                Req::Never => "<nothing>".into(),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Cilium entities, as far as flowaudit can tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    World,
    /// `host` and `remote-node`: flowaudit sees every node as `host`.
    Host,
    Cluster,
    All,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportedPeer {
    Endpoints(Selector),
    Entity(Entity),
    /// Any peer at all (a Kubernetes rule without `from`/`to`, a Cilium L4-only rule).
    Any,
}

impl ImportedPeer {
    pub fn matches(&self, peer: &Peer<'_>) -> Tri {
        match self {
            ImportedPeer::Any => Tri::Yes,
            ImportedPeer::Endpoints(s) => s.matches(peer),
            ImportedPeer::Entity(e) => match (e, peer.kind) {
                (Entity::All, _) => Tri::Yes,
                (_, PeerKind::Unknown) => Tri::Unknown,
                (Entity::World, k) => Tri::from_bool(k == PeerKind::World),
                (Entity::Host, k) => Tri::from_bool(k == PeerKind::Host),
                (Entity::Cluster, k) => Tri::from_bool(k != PeerKind::World),
            },
        }
    }
}

/// One imported ingress or egress rule: any of `peers`, on `ports`.
#[derive(Debug, Clone)]
pub struct ImportedRule {
    pub peers: Vec<ImportedPeer>,
    pub ports: PortSet,
    /// Cilium `authentication.mode: required`: Cilium mutual authentication
    /// between the two identities (an entry in Cilium's auth map), which is
    /// not TLS on the application's socket.
    pub auth_required: bool,
}

impl ImportedRule {
    pub fn matches(&self, other: &Peer<'_>, port: u16) -> Tri {
        if !self.ports.contains(port) {
            return Tri::No;
        }
        self.peers
            .iter()
            .fold(Tri::No, |acc, p| acc.or(p.matches(other)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportKind {
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
    NetworkPolicy,
}

impl ImportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ImportKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            ImportKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            ImportKind::NetworkPolicy => "NetworkPolicy",
        }
    }
    fn short(self) -> &'static str {
        match self {
            ImportKind::CiliumNetworkPolicy => "cnp",
            ImportKind::CiliumClusterwideNetworkPolicy => "ccnp",
            ImportKind::NetworkPolicy => "netpol",
        }
    }
}

/// Per-direction part of an imported policy.
#[derive(Debug, Clone, Default)]
pub struct DirectionRules {
    /// The policy puts its endpoints in default-deny for this direction.
    pub enforced: bool,
    pub allow: Vec<ImportedRule>,
    pub deny: Vec<ImportedRule>,
}

/// One Cilium or Kubernetes policy (or one entry of a CNP `specs` list).
#[derive(Debug, Clone)]
pub struct ImportedPolicy {
    pub kind: ImportKind,
    pub namespace: Option<String>,
    pub name: String,
    /// The endpoints the policy applies to (namespace restriction included).
    pub subject: Selector,
    pub ingress: DirectionRules,
    pub egress: DirectionRules,
    pub origin: Origin,
}

impl ImportedPolicy {
    /// The rule name reported in decisions: `cnp:99-apps/backend-ingress-policy`.
    pub fn rule_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}:{ns}/{}", self.kind.short(), self.name),
            None => format!("{}:{}", self.kind.short(), self.name),
        }
    }
}
