//! Stream filters: the `observe` flags, compiled from `FlowFilter` messages
//! (allow and deny lists; globs on SPIFFE IDs, Kubernetes label selectors,
//! pod prefixes, enums) into a [`FilterSet`] that each subscriber's task of
//! the hub runs, and that `observe --input-file` runs on a file.

use std::collections::BTreeMap;
#[cfg(test)]
use std::sync::Arc;

use flowaudit_policy::spiffe::{IdPattern, parse_pattern};
use flowaudit_policy::{EncryptionState, FindingKind, Verdict};

use super::proto;
use crate::flow::{Endpoint, EventKind, FlowEvent};

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("invalid identity glob: {0}")]
    Identity(String),
    #[error(
        "invalid label selector `{selector}`: {reason} (Kubernetes syntax: `app=frontend`, `app!=x`, `app in (a,b)`, `app notin (a)`, `key`, `!key`, joined by commas)"
    )]
    Label { selector: String, reason: String },
    #[error("invalid pod `{0}`: expected [NAMESPACE/]POD-NAME-PREFIX")]
    Pod(String),
    #[error("invalid port {0}: expected 1-65535")]
    Port(u32),
    #[error("unknown {what} value {value} in a flow filter")]
    Enum { what: &'static str, value: i32 },
}

/// A Kubernetes label selector requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl LabelReq {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            LabelReq::Eq(k, v) => labels.get(k) == Some(v),
            // As in Kubernetes: `!=` and `notin` also match objects without the key.
            LabelReq::NotEq(k, v) => labels.get(k) != Some(v),
            LabelReq::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            LabelReq::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            LabelReq::Exists(k) => labels.contains_key(k),
            LabelReq::NotExists(k) => !labels.contains_key(k),
        }
    }
}

/// A label selector: every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelReq>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, FilterError> {
        let err = |reason: &str| FilterError::Label {
            selector: text.to_owned(),
            reason: reason.to_owned(),
        };
        // Split on commas outside parentheses.
        let mut parts = Vec::new();
        let (mut depth, mut start) = (0i32, 0usize);
        for (i, c) in text.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
            if depth < 0 {
                return Err(err("unbalanced `)`"));
            }
        }
        if depth != 0 {
            return Err(err("unbalanced `(`"));
        }
        parts.push(&text[start..]);
        let key = |k: &str| -> Result<String, FilterError> {
            // Hubble users write `k8s:app=x`: the source prefix means nothing here.
            let k = k.trim();
            let k = k.strip_prefix("k8s:").unwrap_or(k);
            if k.is_empty() || k.contains(|c: char| c.is_whitespace() || "=!(),".contains(c)) {
                return Err(err(&format!("`{k}` is not a label key")));
            }
            Ok(k.to_owned())
        };
        let value = |v: &str| -> Result<String, FilterError> {
            let v = v.trim();
            if v.contains(|c: char| c.is_whitespace() || "=!(),".contains(c)) {
                return Err(err(&format!("`{v}` is not a label value")));
            }
            Ok(v.to_owned())
        };
        let set = |rest: &str| -> Result<Vec<String>, FilterError> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| err("a set must be written `(a,b)`"))?;
            inner.split(',').map(value).collect()
        };
        let mut reqs = Vec::new();
        for part in parts {
            let p = part.trim();
            if p.is_empty() {
                return Err(err("empty requirement"));
            }
            let req = if let Some((k, v)) = p.split_once("!=") {
                LabelReq::NotEq(key(k)?, value(v)?)
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                LabelReq::Eq(key(k)?, value(v)?)
            } else if let Some(k) = p.strip_prefix('!') {
                LabelReq::NotExists(key(k)?)
            } else if let Some((k, rest)) = p.split_once(" notin ") {
                LabelReq::NotIn(key(k)?, set(rest)?)
            } else if let Some((k, rest)) = p.split_once(" in ") {
                LabelReq::In(key(k)?, set(rest)?)
            } else {
                LabelReq::Exists(key(p)?)
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| r.matches(labels))
    }
}

/// `[NS/]PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodPrefix {
    namespace: Option<String>,
    prefix: String,
}

/// Value parsers for the command line's filter flags (`observe`): a bad
/// glob, pod or selector is a usage error there (exit 2, naming the
/// flag), as a bad enum value is; the same checks as [`Filter::compile`].
pub mod arg {
    use super::{FilterError, LabelSelector, PodPrefix, parse_pattern};

    pub fn identity(s: &str) -> Result<String, String> {
        parse_pattern(s)
            .map(|_| s.to_owned())
            .map_err(|e| FilterError::Identity(e).to_string())
    }

    pub fn pod(s: &str) -> Result<String, String> {
        PodPrefix::parse(s)
            .map(|_| s.to_owned())
            .map_err(|e| e.to_string())
    }

    pub fn labels(s: &str) -> Result<String, String> {
        LabelSelector::parse(s)
            .map(|_| s.to_owned())
            .map_err(|e| e.to_string())
    }
}

impl PodPrefix {
    fn parse(text: &str) -> Result<Self, FilterError> {
        match text.split_once('/') {
            Some((ns, p)) if !ns.is_empty() && !p.contains('/') => Ok(Self {
                namespace: Some(ns.to_owned()),
                prefix: p.to_owned(),
            }),
            Some(_) => Err(FilterError::Pod(text.to_owned())),
            None if text.is_empty() => Err(FilterError::Pod(text.to_owned())),
            None => Ok(Self {
                namespace: None,
                prefix: text.to_owned(),
            }),
        }
    }

    fn matches(&self, ep: &Endpoint) -> bool {
        let pod = &*ep.pod;
        !pod.pod_name.is_empty()
            && pod.pod_name.starts_with(&self.prefix)
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == pod.namespace)
    }
}

/// One compiled `FlowFilter`: every non-empty field must match; any value
/// of a field may.
#[derive(Debug, Default)]
pub struct Filter {
    verdict: Vec<Verdict>,
    finding: Vec<FindingKind>,
    source_identity: Vec<IdPattern>,
    destination_identity: Vec<IdPattern>,
    namespace: Vec<String>,
    source_namespace: Vec<String>,
    destination_namespace: Vec<String>,
    source_pod: Vec<PodPrefix>,
    destination_pod: Vec<PodPrefix>,
    source_label: Vec<LabelSelector>,
    destination_label: Vec<LabelSelector>,
    port: Vec<u16>,
    event: Vec<EventKind>,
    encryption: Vec<EncryptionState>,
}

fn any<T>(wanted: &[T], pred: impl Fn(&T) -> bool) -> bool {
    wanted.is_empty() || wanted.iter().any(pred)
}

fn enums<T>(
    values: &[i32],
    what: &'static str,
    conv: impl Fn(i32) -> Option<T>,
) -> Result<Vec<T>, FilterError> {
    values
        .iter()
        .map(|&value| conv(value).ok_or(FilterError::Enum { what, value }))
        .collect()
}

impl Filter {
    pub fn compile(f: &proto::FlowFilter) -> Result<Self, FilterError> {
        use super::convert;
        let globs = |v: &[String]| -> Result<Vec<IdPattern>, FilterError> {
            v.iter()
                .map(|g| parse_pattern(g).map_err(FilterError::Identity))
                .collect()
        };
        let pods = |v: &[String]| {
            v.iter()
                .map(|p| PodPrefix::parse(p))
                .collect::<Result<Vec<_>, _>>()
        };
        let labels = |v: &[String]| {
            v.iter()
                .map(|s| LabelSelector::parse(s))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            verdict: enums(&f.verdict, "verdict", convert::verdict_from)?,
            finding: enums(&f.finding, "finding", convert::finding_from)?,
            source_identity: globs(&f.source_identity)?,
            destination_identity: globs(&f.destination_identity)?,
            namespace: f.namespace.clone(),
            source_namespace: f.source_namespace.clone(),
            destination_namespace: f.destination_namespace.clone(),
            source_pod: pods(&f.source_pod)?,
            destination_pod: pods(&f.destination_pod)?,
            source_label: labels(&f.source_label)?,
            destination_label: labels(&f.destination_label)?,
            port: f
                .port
                .iter()
                .map(|&p| {
                    u16::try_from(p)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or(FilterError::Port(p))
                })
                .collect::<Result<_, _>>()?,
            event: enums(&f.event, "event", convert::event_from)?,
            encryption: enums(&f.encryption, "encryption", convert::encryption_from)?,
        })
    }

    pub fn matches(&self, f: &FlowEvent) -> bool {
        let (src, dst) = (&f.source, &f.destination);
        any(&self.verdict, |v| *v == f.verdict)
            && any(&self.event, |e| *e == f.event)
            && any(&self.port, |p| *p == f.l4.destination_port)
            && any(&self.encryption, |e| *e == f.encryption.state)
            && any(&self.finding, |k| f.findings.iter().any(|x| x.kind == *k))
            && any(&self.namespace, |ns| {
                *ns == src.pod.namespace || *ns == dst.pod.namespace
            })
            && any(&self.source_namespace, |ns| *ns == src.pod.namespace)
            && any(&self.destination_namespace, |ns| *ns == dst.pod.namespace)
            && any(&self.source_pod, |p| p.matches(src))
            && any(&self.destination_pod, |p| p.matches(dst))
            && any(&self.source_label, |s| s.matches(&src.pod.labels))
            && any(&self.destination_label, |s| s.matches(&dst.pod.labels))
            && any(&self.source_identity, |g| {
                !src.spiffe_id.is_empty() && g.matches(&src.spiffe_id)
            })
            && any(&self.destination_identity, |g| {
                !dst.spiffe_id.is_empty() && g.matches(&dst.spiffe_id)
            })
    }
}

/// Allow and deny lists: a flow passes when it matches some allow filter
/// (or there are none) and no deny filter.
#[derive(Debug, Default)]
pub struct FilterSet {
    allow: Vec<Filter>,
    deny: Vec<Filter>,
    /// Tests hold a filter up with this.
    #[cfg(test)]
    stall: Option<Arc<tests::Stall>>,
}

impl FilterSet {
    pub fn compile(
        allow: &[proto::FlowFilter],
        deny: &[proto::FlowFilter],
    ) -> Result<Self, FilterError> {
        Ok(Self {
            allow: allow
                .iter()
                .map(Filter::compile)
                .collect::<Result<_, _>>()?,
            deny: deny.iter().map(Filter::compile).collect::<Result<_, _>>()?,
            #[cfg(test)]
            stall: None,
        })
    }

    /// Passes every flow, each after `stall` lets it (tests of the hub).
    #[cfg(test)]
    pub(crate) fn stalled(stall: Arc<tests::Stall>) -> Self {
        Self {
            stall: Some(stall),
            ..Self::default()
        }
    }

    /// No allow or deny filter: every flow passes.
    pub fn matches_all(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    pub fn matches(&self, f: &FlowEvent) -> bool {
        #[cfg(test)]
        if let Some(stall) = &self.stall {
            stall.wait();
        }
        (self.allow.is_empty() || self.allow.iter().any(|a| a.matches(f)))
            && !self.deny.iter().any(|d| d.matches(f))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::export::hub::tests::sample_flow;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Holds a subscriber's filter up while `gate` is locked; counts the
    /// flows that reached it.
    #[derive(Debug, Default)]
    pub(crate) struct Stall {
        pub(crate) gate: std::sync::Mutex<()>,
        pub(crate) entered: AtomicU64,
    }

    impl Stall {
        /// Blocks the filter's thread until the test lets go. Through
        /// `block_in_place`: a worker merely blocked keeps the tasks in its
        /// LIFO slot (which no other worker may steal), so the other
        /// subscriber or the test itself could hang behind the stall.
        pub(crate) fn wait(&self) {
            self.entered.fetch_add(1, Ordering::SeqCst);
            tokio::task::block_in_place(|| drop(self.gate.lock()));
        }
    }
    fn labelled(ns: &str, pod: &str, app: &str) -> Endpoint {
        let mut e = Endpoint::unknown();
        let meta = e.pod.make_mut();
        meta.namespace = ns.into();
        meta.pod_name = pod.into();
        meta.labels.insert("app".into(), app.into());
        e.spiffe_id = format!("spiffe://demo.local/ns/{ns}/sa/{app}").into();
        e
    }

    fn scenario_flow() -> FlowEvent {
        let mut f = sample_flow();
        f.source = labelled("99-apps", "frontend-7d9f", "frontend");
        f.destination = labelled("99-apps", "postgresql-0", "postgresql");
        f.verdict = Verdict::Violation;
        f.findings.push(crate::flow::Finding {
            kind: FindingKind::NoMatchingRule,
            message: "m".into(),
        });
        f
    }

    fn filter(edit: impl FnOnce(&mut proto::FlowFilter)) -> Filter {
        let mut p = proto::FlowFilter::default();
        edit(&mut p);
        Filter::compile(&p).unwrap()
    }

    #[test]
    fn label_selectors_follow_kubernetes_semantics() {
        let labels: BTreeMap<String, String> = [
            ("app".into(), "frontend".into()),
            ("tier".into(), "web".into()),
        ]
        .into();
        let yes = [
            "app=frontend",
            "app==frontend",
            "k8s:app=frontend",
            "app!=backend",
            "app in (frontend, backend)",
            "app notin (backend)",
            "tier",
            "!db",
            "app=frontend,tier in (web)",
            "missing!=x",
        ];
        for s in yes {
            assert!(
                LabelSelector::parse(s).unwrap().matches(&labels),
                "{s} should match"
            );
        }
        let no = [
            "app=backend",
            "app in (a,b)",
            "app notin (frontend)",
            "db",
            "!tier",
            "app=frontend,db",
        ];
        for s in no {
            assert!(
                !LabelSelector::parse(s).unwrap().matches(&labels),
                "{s} should not match"
            );
        }
        for bad in ["", "app in a,b", "app in (a", "a=b=c", "=x", "app=(x)"] {
            assert!(
                LabelSelector::parse(bad).is_err(),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn filters_match_every_field() {
        let f = scenario_flow();
        let cases: Vec<(Filter, bool)> = vec![
            (
                filter(|p| p.verdict = vec![proto::Verdict::Violation as i32]),
                true,
            ),
            (
                filter(|p| p.verdict = vec![proto::Verdict::Compliant as i32]),
                false,
            ),
            (
                filter(|p| p.finding = vec![proto::FindingKind::NoMatchingRule as i32]),
                true,
            ),
            (
                filter(|p| p.finding = vec![proto::FindingKind::MtlsMissing as i32]),
                false,
            ),
            (
                filter(|p| {
                    p.source_identity = vec!["spiffe://demo.local/ns/99-apps/*/frontend".into()]
                }),
                true,
            ),
            (
                filter(|p| p.source_identity = vec!["spiffe://demo.local/ns/99-apps/**".into()]),
                true,
            ),
            (
                filter(|p| {
                    p.destination_identity = vec!["spiffe://demo.local/ns/*/sa/backend".into()]
                }),
                false,
            ),
            (filter(|p| p.namespace = vec!["99-apps".into()]), true),
            (
                filter(|p| p.source_namespace = vec!["openbao".into()]),
                false,
            ),
            (
                filter(|p| p.source_pod = vec!["99-apps/frontend".into()]),
                true,
            ),
            (filter(|p| p.source_pod = vec!["frontend".into()]), true),
            (
                filter(|p| p.destination_pod = vec!["openbao/postgresql".into()]),
                false,
            ),
            (
                filter(|p| p.source_label = vec!["app=frontend".into()]),
                true,
            ),
            (
                filter(|p| p.destination_label = vec!["app in (backend)".into()]),
                false,
            ),
            (filter(|p| p.port = vec![5432]), true),
            (filter(|p| p.port = vec![8000, 5432]), true),
            (filter(|p| p.port = vec![8000]), false),
            (
                filter(|p| p.event = vec![proto::EventKind::Close as i32]),
                true,
            ),
            (
                filter(|p| p.encryption = vec![proto::EncryptionState::Plaintext as i32]),
                false,
            ),
        ];
        for (i, (flt, want)) in cases.iter().enumerate() {
            assert_eq!(flt.matches(&f), *want, "case {i}: {flt:?}");
        }
        let set = FilterSet::compile(
            &[proto::FlowFilter {
                port: vec![5432],
                ..Default::default()
            }],
            &[proto::FlowFilter {
                source_namespace: vec!["99-apps".into()],
                ..Default::default()
            }],
        )
        .unwrap();
        assert!(!set.matches(&f), "deny wins over allow");
        assert!(
            Filter::compile(&proto::FlowFilter {
                port: vec![70000],
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            Filter::compile(&proto::FlowFilter {
                verdict: vec![99],
                ..Default::default()
            })
            .is_err()
        );
    }
}
