//! Identity: joins both ends of a flow with who they are. In: a `FlowEvent`
//! with addresses and, for the end whose socket this node saw, the owning
//! process and cgroup. Out: each end's kind (pod, host, world), pod metadata
//! from the endpoint directory, and its SPIFFE ID with its source:
//! `ATTESTED` from SPIRE's Delegated Identity API (local ends, and remote
//! pods whose attested identity is already known), `DERIVED` from pod
//! metadata and the trust domain's `ns/<ns>/sa/<sa>` convention, or
//! `UNKNOWN`. Never blocks: an identity still being fetched is reported as
//! pending and the pipeline decides how long the flow may wait.

pub mod cgroup;
pub mod spire;

use std::sync::Arc;

use flowaudit_policy::IdentitySource;
use tokio::sync::watch;

use self::cgroup::CgroupResolver;
use self::spire::{Lookup, SpireClient, WorkloadQuery};
use crate::endpoints::{EndpointDirectory, Peer, PodInfo};
use crate::flow::{Direction, EndKind, Endpoint, FlowEvent};

/// What to do with a flow after enrichment.
pub enum Enriched {
    Done,
    /// The local end's attested identity is being fetched.
    Pending(WorkloadQuery),
}

pub struct Enricher {
    pub endpoints: Option<watch::Receiver<Arc<EndpointDirectory>>>,
    pub cgroups: CgroupResolver,
    pub spire: Option<SpireClient>,
    /// For DERIVED IDs; when None, the trust domain of the first attested ID seen.
    pub trust_domain: Option<String>,
    learned_trust_domain: Option<String>,
    /// This node: remote pods elsewhere are never asked of the local SPIRE agent.
    pub node_name: String,
    pub on_lookup: Option<Box<dyn Fn(&'static str) + Send>>,
}

impl Enricher {
    pub fn new(
        endpoints: Option<watch::Receiver<Arc<EndpointDirectory>>>,
        cgroups: CgroupResolver,
        spire: Option<SpireClient>,
        trust_domain: Option<String>,
    ) -> Self {
        Self {
            endpoints,
            cgroups,
            spire,
            trust_domain,
            learned_trust_domain: None,
            node_name: String::new(),
            on_lookup: None,
        }
    }

    fn count(&self, result: &'static str) {
        if let Some(f) = &self.on_lookup {
            f(result);
        }
    }

    fn trust_domain(&self) -> Option<&str> {
        self.trust_domain
            .as_deref()
            .or(self.learned_trust_domain.as_deref())
    }

    /// Fills kinds, pod metadata and SPIFFE IDs of both ends.
    pub fn enrich(&mut self, flow: &mut FlowEvent) -> Enriched {
        let dir = self.endpoints.as_ref().map(|rx| rx.borrow().clone());
        let local_is_source = flow.direction == Direction::Egress;
        let (local, remote, local_ip, remote_ip) = if local_is_source {
            (
                &mut flow.source,
                &mut flow.destination,
                flow.l4.source_ip,
                flow.l4.destination_ip,
            )
        } else {
            (
                &mut flow.destination,
                &mut flow.source,
                flow.l4.destination_ip,
                flow.l4.source_ip,
            )
        };
        // Local end: the pod its cgroup belongs to is authoritative (a
        // hostNetwork pod shares the node's address); else by address.
        let pod_uid = local.cgroup_id.and_then(|id| self.cgroups.pod_uid(id));
        let local_pod = match (&dir, &pod_uid) {
            (Some(d), Some(uid)) => d.pod_by_uid(uid),
            _ => None,
        };
        match (&local_pod, &dir) {
            (Some(p), _) => apply_pod(local, p),
            (None, Some(d)) => apply_peer(local, &d.peer(local_ip)),
            (None, None) => {}
        }
        // Looked up once: it names the remote end and decides whether to ask SPIRE.
        let remote_peer = dir.as_ref().map(|d| d.peer(remote_ip));
        if let Some(peer) = &remote_peer {
            apply_peer(remote, peer);
        }
        // Remote end: attested if SPIRE already knows that pod, else derived.
        // SPIRE matches an entry when its selectors are a subset of those
        // asked with: ask with everything known about the pod. Only this
        // node's SPIRE agent can attest this node's pods.
        let remote_query = match &remote_peer {
            Some(Peer::Pod(p))
                if !p.uid.is_empty() && (p.node.is_empty() || p.node == self.node_name) =>
            {
                Some(WorkloadQuery {
                    pod_uid: Some(p.uid.clone()),
                    namespace: non_empty(&p.namespace),
                    service_account: non_empty(&p.service_account),
                    ..Default::default()
                })
            }
            _ => None,
        };
        let mut remote_attested = None;
        if let (Some(spire), Some(q)) = (&self.spire, remote_query) {
            if let Lookup::Attested(id) = spire.lookup(&q) {
                remote_attested = Some(id.spiffe_id.clone());
            }
        }
        let td = self.trust_domain().map(str::to_owned);
        match remote_attested {
            Some(id) => set_id(remote, id, IdentitySource::Attested),
            None => derive(remote, td.as_deref()),
        }

        // Local end: ask SPIRE (by pid, checked against the process start
        // time; or by the pod's selectors).
        let Some(spire) = &self.spire else {
            derive(local, td.as_deref());
            return Enriched::Done;
        };
        if local.pid.is_none() && pod_uid.is_none() {
            return Enriched::Done;
        }
        let q = WorkloadQuery {
            pid: local.pid,
            pid_start_ns: flow.socket.process_start_ns,
            pod_uid,
            namespace: non_empty(&local.namespace),
            service_account: non_empty(&local.service_account),
        };
        match spire.lookup(&q) {
            Lookup::Pending => return Enriched::Pending(q),
            result => self.apply_lookup(flow.local_end_mut(), result),
        }
        Enriched::Done
    }

    /// Applies the answer for a local end (after a wait, or at once).
    pub fn apply_lookup(&mut self, local: &mut Endpoint, result: Lookup) {
        match result {
            Lookup::Attested(id) => {
                if self.trust_domain.is_none() && self.learned_trust_domain.is_none() {
                    self.learned_trust_domain = trust_domain_of(&id.spiffe_id);
                }
                set_id(local, id.spiffe_id.clone(), IdentitySource::Attested);
                self.count("attested");
            }
            Lookup::NoIdentity => {
                set_id(local, String::new(), IdentitySource::Unknown);
                self.count("no_identity");
            }
            Lookup::Pending => {
                set_id(local, String::new(), IdentitySource::Unknown);
                self.count("timeout");
            }
            Lookup::Unavailable(why) => {
                tracing::debug!(%why, "SPIRE unavailable: local end UNKNOWN");
                set_id(local, String::new(), IdentitySource::Unknown);
                self.count("unavailable");
            }
        }
    }

    /// Re-asks SPIRE for a parked flow: the local end's answer, if there is one yet.
    pub fn poll(&self, q: &WorkloadQuery) -> Lookup {
        self.spire
            .as_ref()
            .map_or(Lookup::NoIdentity, |s| s.lookup(q))
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

fn trust_domain_of(id: &str) -> Option<String> {
    id.strip_prefix("spiffe://")?
        .split('/')
        .next()
        .filter(|td| !td.is_empty())
        .map(str::to_owned)
}

fn set_id(ep: &mut Endpoint, id: String, source: IdentitySource) {
    ep.spiffe_id = id;
    ep.identity_source = source;
}

fn apply_pod(ep: &mut Endpoint, p: &PodInfo) {
    ep.kind = EndKind::Pod;
    ep.namespace = p.namespace.clone();
    ep.pod_name = p.pod.clone();
    ep.service_account = p.service_account.clone();
    ep.labels = p.labels.clone();
}

fn apply_peer(ep: &mut Endpoint, peer: &Peer) {
    match peer {
        Peer::Pod(p) => apply_pod(ep, p),
        Peer::Host(_) => ep.kind = EndKind::Host,
        Peer::World => ep.kind = EndKind::World,
    }
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>` from pod metadata, said as DERIVED.
fn derive(ep: &mut Endpoint, td: Option<&str>) {
    match (ep.kind, td) {
        (EndKind::Pod, Some(td)) if !ep.namespace.is_empty() && !ep.service_account.is_empty() => {
            let id = flowaudit_policy::spiffe::derive_id(td, &ep.namespace, &ep.service_account);
            set_id(ep, id, IdentitySource::Derived);
        }
        _ => set_id(ep, String::new(), IdentitySource::Unknown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Clock;
    use crate::capture::record::{KernelEvent, tests::sample};
    use std::path::Path;

    fn directory() -> watch::Receiver<Arc<EndpointDirectory>> {
        let yaml = "nodes:\n  - {name: n1, ips: [10.244.0.1]}\nendpoints:\n  - {ips: [10.244.1.5], namespace: 99-apps, pod: frontend-7d9f, uid: 11111111-2222-3333-4444-555555555555, serviceAccount: frontend, labels: {app: frontend}}\n  - {ips: [10.244.1.9], namespace: 99-apps, pod: postgresql-0, serviceAccount: postgresql}\n";
        let dir = EndpointDirectory::parse(Path::new("e.yaml"), yaml).unwrap();
        watch::channel(Arc::new(dir)).1
    }

    fn flow() -> FlowEvent {
        FlowEvent::from_kernel(
            &KernelEvent::from_record(&sample()).unwrap(),
            "n1",
            &Clock::now(),
        )
    }

    #[test]
    fn without_spire_both_pod_ends_are_derived_from_metadata() {
        let mut e = Enricher::new(
            Some(directory()),
            CgroupResolver::new("/nonexistent".into()),
            None,
            Some("demo.local".into()),
        );
        let mut f = flow();
        assert!(matches!(e.enrich(&mut f), Enriched::Done));
        assert_eq!(
            f.source.spiffe_id,
            "spiffe://demo.local/ns/99-apps/sa/frontend"
        );
        assert_eq!(f.source.identity_source, IdentitySource::Derived);
        assert_eq!(
            f.source.labels.get("app").map(String::as_str),
            Some("frontend")
        );
        assert_eq!(
            f.destination.spiffe_id,
            "spiffe://demo.local/ns/99-apps/sa/postgresql"
        );
        assert_eq!(f.destination.pod_name, "postgresql-0");
        assert_eq!(f.destination.kind, EndKind::Pod);
    }

    #[test]
    fn hosts_and_world_have_no_identity() {
        let mut e = Enricher::new(
            Some(directory()),
            CgroupResolver::new("/nonexistent".into()),
            None,
            Some("demo.local".into()),
        );
        let mut f = flow();
        f.l4.destination_ip = "10.244.0.1".parse().unwrap();
        e.enrich(&mut f);
        assert_eq!(f.destination.kind, EndKind::Host);
        assert_eq!(f.destination.identity_source, IdentitySource::Unknown);
        let mut f = flow();
        f.l4.destination_ip = "93.184.216.34".parse().unwrap();
        e.enrich(&mut f);
        assert_eq!(f.destination.kind, EndKind::World);
        assert_eq!(f.destination.spiffe_id, "");
    }

    #[test]
    fn no_trust_domain_means_no_derived_id() {
        let mut e = Enricher::new(
            Some(directory()),
            CgroupResolver::new("/nonexistent".into()),
            None,
            None,
        );
        let mut f = flow();
        e.enrich(&mut f);
        assert_eq!(f.source.identity_source, IdentitySource::Unknown);
        assert_eq!(f.source.pod_name, "frontend-7d9f");
        assert_eq!(
            trust_domain_of("spiffe://demo.local/ns/a/sa/b").as_deref(),
            Some("demo.local")
        );
        assert_eq!(trust_domain_of("http://x"), None);
    }
}
