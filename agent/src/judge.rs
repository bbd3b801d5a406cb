//! Judging: each flow against the intended policy in force. In: a flow whose
//! ends carry kinds, metadata and SPIFFE IDs; out: verdict, findings and the
//! deciding rule (the `policy` crate decides; this module adapts the flow).
//! Also the policy watcher: `--policy` files and directories are reloaded
//! when they change, swapped atomically; a version with errors is rejected,
//! its diagnostics logged with file, line and column, and the last good one
//! stays in force.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flowaudit_policy::{
    EncryptionState, FindingKind, Flow, ObservedEncryption, Peer, PeerKind, PolicySet, Verdict,
};
use tokio::sync::watch;

use crate::cilium::Cilium;
use crate::flow::{
    ClientCertificate, Encryption, EndKind, Endpoint, EventKind, Finding, FlowEvent,
};

/// Called after every reload attempt: (accepted, version in force, rules in
/// force, why the attempt was rejected).
pub type ReloadHook = Box<dyn Fn(bool, &str, usize, Option<String>) + Send + Sync>;

pub struct Judge {
    pub policy: Option<watch::Receiver<Arc<PolicySet>>>,
    /// This node's Cilium, asked for flows under a rule that requires
    /// mutual authentication; None answers "not observable" (tests).
    pub cilium: Option<Arc<Cilium>>,
    /// `policy`'s set now, taken from it when it changes: a flow reads it
    /// without the channel's lock or a reference count of its own.
    current: Option<Arc<PolicySet>>,
    memo: Memo,
}

/// Slots of the decision memo (a power of two), in sets of two: a flow may
/// sit in either slot of its set, so two busy pairs of workloads that hash
/// alike do not evict each other. The pipeline bench's 50 pods and 4 ports
/// make 5,000 keys (2,500 pairs of pods and port, each with the CONNECT's
/// and the CLOSE's observed encryption). Of its 400,000 decisions, 1,024
/// slots answered 52%, 4,096 slots 81.5% and 16,384 slots 98.2%
/// (2026-12-07: 12% fewer instructions per kernel record than with 4,096,
/// and more records per CPU-second in each of 5 runs side by side). A slot
/// takes at most 72 bytes (checked below), so the memo 1.125 MiB; only the
/// sets a node's pairs use are ever in the CPU's caches.
const MEMO_SLOTS: usize = 16_384;

const _: () = assert!(std::mem::size_of::<Option<MemoEntry>>() <= 72);

/// Recent decisions, by everything the policy reads of a flow: the policy
/// version, both ends (kind, identity source, SPIFFE ID, namespace, service
/// account, pod, labels), the port, the observed encryption and whether the
/// attempt failed. A CLOSE after its CONNECT, and the flows of a busy pair of
/// workloads, are judged once, not once per event.
///
/// The ends' pod metadata and SPIFFE IDs are shared (`Arc`, `ArcStr`) with
/// the endpoint directory and the identity cache, so a key compares pointers;
/// an entry holds clones of what it compares, so a pointer it holds cannot
/// be freed and reused for other text while it is there. A different
/// pointer to the same text is only a miss. Decisions that read Cilium's
/// auth map (a rule requiring mutual authentication) depend on the time of
/// the connection and are never kept. The judge empties it when it takes a
/// new policy version ([`Memo::start_over`]).
#[derive(Default)]
struct Memo {
    /// Empty until the judge takes its first policy set.
    slots: Vec<Option<MemoEntry>>,
    #[cfg(test)]
    hits: u64,
}

struct MemoEntry {
    source: EndKey,
    destination: EndKey,
    port: u16,
    encryption: ObservedEncryption,
    detail: Option<crate::flow::UnknownReason>,
    failed: bool,
    verdict: Verdict,
    findings: crate::flow::Findings,
    policy_rule: crate::flow::ArcStr,
}

struct EndKey {
    kind: EndKind,
    identity_source: flowaudit_policy::IdentitySource,
    spiffe_id: crate::flow::ArcStr,
    /// Namespace, service account, pod name and labels.
    pod: crate::flow::PodRef,
}

impl EndKey {
    fn of(ep: &Endpoint) -> Self {
        EndKey {
            kind: ep.kind,
            identity_source: ep.identity_source,
            spiffe_id: ep.spiffe_id.clone(),
            pod: ep.pod.clone(),
        }
    }

    fn is(&self, ep: &Endpoint) -> bool {
        use crate::flow::ArcStr;
        self.kind == ep.kind
            && self.identity_source == ep.identity_source
            && ArcStr::ptr_eq(&self.spiffe_id, &ep.spiffe_id)
            && crate::flow::PodRef::ptr_eq(&self.pod, &ep.pod)
    }
}

impl Memo {
    /// The first slot of the flow's set.
    fn set(flow: &FlowEvent) -> usize {
        use std::hash::{BuildHasher, Hasher};
        let mut h = foldhash::fast::FixedState::default().build_hasher();
        for ep in [&flow.source, &flow.destination] {
            h.write_usize(ep.spiffe_id.as_ptr() as usize);
            h.write_usize(ep.pod.as_ptr() as usize);
        }
        h.write_u16(flow.l4.destination_port);
        h.write_u8(flow.encryption.state as u8);
        h.write_u8(u8::from(flow.event == EventKind::Failed));
        (h.finish() as usize & (MEMO_SLOTS - 1)) & !1
    }

    /// Forgets every decision: they were the last policy version's.
    fn start_over(&mut self) {
        self.slots.clear();
        self.slots.resize_with(MEMO_SLOTS, || None);
    }

    fn get(&mut self, flow: &FlowEvent) -> Option<&MemoEntry> {
        let set = Self::set(flow);
        let found = self.slots.get(set..set + 2)?.iter().flatten().find(|e| {
            e.port == flow.l4.destination_port
                && e.encryption == observed(&flow.encryption)
                && e.detail == flow.encryption.unknown_reason
                && e.failed == (flow.event == EventKind::Failed)
                && e.source.is(&flow.source)
                && e.destination.is(&flow.destination)
        });
        #[cfg(test)]
        {
            self.hits += u64::from(found.is_some());
        }
        found
    }

    /// Keeps a decision in the first slot of its set; what was there moves
    /// to the second (the older one leaves).
    fn put(
        &mut self,
        flow: &FlowEvent,
        verdict: Verdict,
        findings: &crate::flow::Findings,
        rule: &crate::flow::ArcStr,
    ) {
        let Some(pair) = self
            .slots
            .get_mut(Self::set(flow)..)
            .and_then(|s| s.get_mut(..2))
        else {
            // Before the first policy set (`start_over`): nothing is kept.
            return;
        };
        if pair[0].is_some() {
            pair[1] = pair[0].take();
        }
        pair[0] = Some(MemoEntry {
            source: EndKey::of(&flow.source),
            destination: EndKey::of(&flow.destination),
            port: flow.l4.destination_port,
            encryption: observed(&flow.encryption),
            detail: flow.encryption.unknown_reason,
            failed: flow.event == EventKind::Failed,
            verdict,
            findings: findings.clone(),
            policy_rule: rule.clone(),
        });
    }
}

fn some(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn peer(ep: &Endpoint) -> Peer<'_> {
    let kind = match ep.kind {
        EndKind::Pod => PeerKind::Workload,
        EndKind::Host => PeerKind::Host,
        EndKind::World => PeerKind::World,
        EndKind::Unknown => PeerKind::Unknown,
    };
    Peer {
        kind,
        spiffe_id: some(&ep.spiffe_id),
        identity_source: ep.identity_source,
        namespace: some(&ep.pod.namespace),
        service_account: some(&ep.pod.service_account),
        labels: (ep.kind == EndKind::Pod)
            .then_some(&ep.pod.labels as &dyn flowaudit_policy::Labels),
        name: some(&ep.pod.service_account).or(some(&ep.pod.pod_name)),
    }
}

/// What the policy engine needs to know of the observed encryption.
fn observed(e: &Encryption) -> ObservedEncryption {
    match e.state {
        EncryptionState::Unknown => ObservedEncryption::Unknown,
        EncryptionState::Plaintext => ObservedEncryption::Plaintext,
        EncryptionState::Mtls => ObservedEncryption::Mtls,
        EncryptionState::Tls => match e.client_certificate {
            ClientCertificate::NotSent => ObservedEncryption::TlsNoClientCert,
            _ => ObservedEncryption::TlsUnverified,
        },
    }
}

/// Certificates seen in clear that name another SPIFFE ID than the end
/// they belong to: a server (or client) presenting someone else's SVID.
fn identity_mismatches(flow: &FlowEvent) -> Vec<Finding> {
    let e = &flow.encryption;
    [
        ("server", &e.server_spiffe_id, &flow.destination),
        ("client", &e.client_spiffe_id, &flow.source),
    ]
    .into_iter()
    .filter(|(_, seen, end)| {
        !seen.is_empty() && !end.spiffe_id.is_empty() && **seen != end.spiffe_id
    })
    .map(|(role, seen, end)| Finding {
        kind: FindingKind::IdentityMismatch,
        message: format!(
            "the {role} presented a certificate for {seen}, but this end is {} ({})",
            end.spiffe_id, end.identity_source
        ),
    })
    .collect()
}

impl Judge {
    /// A judge on a node without Cilium (tests, benches): every mutual
    /// authentication answer is "not observable".
    pub fn without_cilium(policy: Option<watch::Receiver<Arc<PolicySet>>>) -> Judge {
        Judge::new(policy, None)
    }

    pub fn new(
        policy: Option<watch::Receiver<Arc<PolicySet>>>,
        cilium: Option<Arc<Cilium>>,
    ) -> Judge {
        Judge {
            policy,
            cilium,
            current: None,
            memo: Memo::default(),
        }
    }

    /// Decisions the memo answered so far (benches report it).
    #[cfg(test)]
    pub(crate) fn memo_hits(&self) -> u64 {
        self.memo.hits
    }

    pub fn judge(&mut self, flow: &mut FlowEvent) {
        let mismatches = identity_mismatches(flow);
        if let Some(rx) = &mut self.policy {
            let set: &Arc<PolicySet> = match &mut self.current {
                // An error: the policy's source is gone; the last set stays.
                Some(set) if !rx.has_changed().unwrap_or(false) => set,
                slot => {
                    self.memo.start_over();
                    slot.insert(rx.borrow_and_update().clone())
                }
            };
            if let Some(known) = self.memo.get(flow) {
                flow.verdict = known.verdict;
                flow.findings.clone_from(&known.findings);
                flow.policy_rule.clone_from(&known.policy_rule);
                flow.mutual_auth = None;
            } else {
                let per_flow;
                let mutual_auth: &dyn flowaudit_policy::MutualAuthSource = match &self.cilium {
                    Some(c) => {
                        per_flow = c.for_flow(flow);
                        &per_flow
                    }
                    None => &flowaudit_policy::NoCilium,
                };
                let decision = set.evaluate(&Flow {
                    source: peer(&flow.source),
                    destination: peer(&flow.destination),
                    port: flow.l4.destination_port,
                    encryption: observed(&flow.encryption),
                    encryption_detail: flow.encryption.unknown_reason.map_or("", |r| r.describe()),
                    failed: flow.event == EventKind::Failed,
                    mutual_auth,
                });
                let rule = crate::flow::ArcStr::from(decision.policy_rule.as_str());
                let findings = crate::flow::Findings::from(decision.findings);
                if !decision.mutual_auth_required {
                    self.memo.put(flow, decision.verdict, &findings, &rule);
                }
                flow.verdict = decision.verdict;
                flow.findings = findings;
                flow.policy_rule = rule;
                flow.mutual_auth = decision.mutual_auth.map(Box::new);
            }
        }
        // Whatever the policy says, an end that is not who it claims to be
        // is a violation.
        if !mismatches.is_empty() {
            flow.verdict = Verdict::Violation;
            flow.findings.extend(mismatches);
        }
    }
}

/// Loads the policy at start-up: errors here stop the agent (there is no
/// last good version to keep).
pub fn load_initial(paths: &[PathBuf]) -> anyhow::Result<flowaudit_policy::Loaded> {
    flowaudit_policy::load_paths(paths).map_err(|e| {
        let details: Vec<String> = e.diagnostics().iter().map(ToString::to_string).collect();
        if details.is_empty() {
            anyhow::anyhow!("cannot load --policy: {e}")
        } else {
            anyhow::anyhow!("cannot load --policy:\n  {}", details.join("\n  "))
        }
    })
}

/// A file's stamp (see `endpoints::file_stamp`).
type FileStamp = Option<(u64, u64, i64, i64)>;

/// What identifies a version of the policy paths: every file with its stamp.
fn stamp(paths: &[PathBuf]) -> Vec<(PathBuf, FileStamp)> {
    match flowaudit_policy::expand_paths(paths) {
        Ok(files) => files
            .into_iter()
            .map(|f| {
                let s = crate::endpoints::file_stamp(&f);
                (f, s)
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Polls the policy paths every second; publishes each good new version,
/// evaluated with `options` (the agent's flags) as the first one is.
pub async fn watch_policies(
    paths: Vec<PathBuf>,
    options: flowaudit_policy::EvalOptions,
    tx: watch::Sender<Arc<PolicySet>>,
    hook: ReloadHook,
) {
    // Nothing seen yet: the first tick (at once) reads the paths again, so
    // an edit made while the agent started is not taken as the version
    // loaded then; the same content again changes nothing.
    let mut last = Vec::new();
    // Whether the last attempt was rejected: a good version then clears
    // the error even when it is the one in force.
    let mut rejected = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = stamp(&paths);
        if now == last {
            continue;
        }
        last = now;
        match flowaudit_policy::load_paths(&paths) {
            Ok(loaded) => {
                let same = loaded.policy.version() == tx.borrow().version();
                if same && !rejected {
                    continue;
                }
                rejected = false;
                for w in &loaded.warnings {
                    tracing::warn!(%w, "policy warning");
                }
                let rules = loaded.policy.rule_count();
                tracing::info!(version = loaded.policy.version(), rules, "policy reloaded");
                hook(true, loaded.policy.version(), rules, None);
                // The version in force again (a rejected edit undone): the
                // error is cleared above; nothing new to judge by.
                if !same
                    && tx
                        .send(Arc::new(loaded.policy.with_options(options)))
                        .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                rejected = true;
                let errors = || {
                    e.diagnostics()
                        .iter()
                        .filter(|d| d.severity == flowaudit_policy::Severity::Error)
                };
                for d in e.diagnostics() {
                    match d.severity {
                        flowaudit_policy::Severity::Error => tracing::error!(%d, "policy rejected"),
                        _ => tracing::warn!(%d, "policy warning"),
                    }
                }
                if errors().next().is_none() {
                    tracing::error!(error = %e, "policy rejected");
                }
                tracing::error!(
                    version = tx.borrow().version(),
                    "the last good policy stays in force"
                );
                // The first error, never a warning that came before it.
                let why = errors()
                    .next()
                    .map_or_else(|| e.to_string(), ToString::to_string);
                let (version, rules) = {
                    let p = tx.borrow();
                    (p.version().to_owned(), p.rule_count())
                };
                hook(false, &version, rules, Some(why));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Clock;
    use crate::capture::record::{KernelEvent, tests::sample};
    use flowaudit_policy::IdentitySource;
    use flowaudit_tests::support::TestDir;

    const POLICY: &str = "apiVersion: flowaudit.io/v1alpha1\nkind: FlowPolicy\nmetadata: {name: t}\nspec:\n  trustDomain: demo.local\n  mtls: optional\n  rules:\n    - name: frontend-to-backend\n      from: [spiffe://demo.local/ns/99-apps/sa/frontend]\n      to: [spiffe://demo.local/ns/99-apps/sa/backend]\n      ports: [8000]\n";

    fn flow(dst_sa: &str, port: u16) -> FlowEvent {
        let mut f = FlowEvent::from_kernel(
            &KernelEvent::from_record(&sample()).unwrap(),
            &"n1".into(),
            &Clock::now(),
        );
        f.l4.destination_port = port;
        for (ep, sa) in [(&mut f.source, "frontend"), (&mut f.destination, dst_sa)] {
            ep.kind = EndKind::Pod;
            let pod = ep.pod.make_mut();
            pod.namespace = "99-apps".into();
            pod.service_account = sa.into();
            ep.spiffe_id = format!("spiffe://demo.local/ns/99-apps/sa/{sa}").into();
            ep.identity_source = IdentitySource::Attested;
        }
        f
    }

    /// A directory of its own for each call (tests run in parallel).
    fn dir_with(policy: &str) -> (TestDir, PathBuf) {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = TestDir::new(&format!("fa-judge-{n}"));
        let file = dir.join("p.yaml");
        std::fs::write(&file, policy).unwrap();
        (dir, file)
    }

    /// The memo answers a repeated flow exactly as the policy would, and
    /// anything the policy reads (port, encryption, failure, an end, the
    /// policy version) makes it ask the policy again.
    #[test]
    fn repeated_flows_are_judged_once_and_exactly_as_the_policy_would() {
        let required = POLICY.replace("mtls: optional", "mtls: required");
        let (_dir, file) = dir_with(&required);
        let loaded = load_initial(std::slice::from_ref(&file)).unwrap();
        let (tx, rx) = watch::channel(Arc::new(loaded.policy));
        let mut judge = Judge::without_cilium(Some(rx));
        let mut fresh = Judge::without_cilium(Some(tx.subscribe()));
        let base = flow("backend", 8000);
        let plaintext = {
            let mut f = base.clone();
            Arc::make_mut(&mut f.encryption).state = EncryptionState::Plaintext;
            f
        };
        let mut other_port = base.clone();
        other_port.l4.destination_port = 8001;
        let mut failed = base.clone();
        failed.event = EventKind::Failed;
        let mut other_end = base.clone();
        other_end.destination = flow("postgresql", 8000).destination;
        let variants = [&base, &plaintext, &other_port, &failed, &other_end];
        let outcome = |f: &FlowEvent| (f.verdict, f.findings.clone(), f.policy_rule.clone());
        for round in 0..3 {
            for (i, v) in variants.iter().enumerate() {
                let (mut a, mut b) = ((*v).clone(), (*v).clone());
                judge.judge(&mut a);
                // A judge whose memo is emptied each time: the policy's own answer.
                fresh.memo.start_over();
                fresh.judge(&mut b);
                assert_eq!(outcome(&a), outcome(&b), "variant {i}, round {round}");
            }
        }
        assert_eq!(
            judge.memo.hits,
            2 * variants.len() as u64,
            "every variant after its first judging came from the memo"
        );
        assert_eq!(
            base.clone().verdict,
            Verdict::Unknown,
            "the inputs are untouched"
        );
        let mut mtls_missing = plaintext.clone();
        judge.judge(&mut mtls_missing);
        assert_eq!(mtls_missing.verdict, Verdict::Violation);

        // A new version of the policy: asked again, with the new answer.
        std::fs::write(&file, POLICY).unwrap();
        let relaxed = load_initial(std::slice::from_ref(&file)).unwrap();
        tx.send(Arc::new(relaxed.policy)).unwrap();
        let hits = judge.memo.hits;
        let mut again = plaintext.clone();
        judge.judge(&mut again);
        assert_eq!(
            judge.memo.hits, hits,
            "a new policy version is not answered from the memo"
        );
        assert_eq!(again.verdict, Verdict::Compliant, "{:?}", again.findings);
    }

    #[test]
    fn judges_allowed_and_unintended_flows() {
        let (_dir, file) = dir_with(POLICY);
        let loaded = load_initial(std::slice::from_ref(&file)).unwrap();
        let mut judge = Judge::without_cilium(Some(watch::channel(Arc::new(loaded.policy)).1));
        let mut ok = flow("backend", 8000);
        judge.judge(&mut ok);
        assert_eq!(ok.verdict, Verdict::Compliant, "{:?}", ok.findings);
        assert_eq!(ok.policy_rule, "frontend-to-backend");
        let mut bad = flow("postgresql", 5432);
        judge.judge(&mut bad);
        assert_eq!(bad.verdict, Verdict::Violation);
        assert!(
            bad.findings
                .iter()
                .any(|f| f.kind == FindingKind::NoMatchingRule),
            "{:?}",
            bad.findings
        );
        let mut failed = flow("backend", 8000);
        failed.event = EventKind::Failed;
        judge.judge(&mut failed);
        assert!(
            failed
                .findings
                .iter()
                .any(|f| f.kind == FindingKind::IntendedFlowFailed),
            "{:?}",
            failed.findings
        );
    }

    #[test]
    fn encryption_decides_mtls_findings_and_certificates_are_checked() {
        let required = POLICY.replace("mtls: optional", "mtls: required");
        let (_dir, file) = dir_with(&required);
        let loaded = load_initial(std::slice::from_ref(&file)).unwrap();
        let mut judge = Judge::without_cilium(Some(watch::channel(Arc::new(loaded.policy)).1));
        let kinds = |f: &FlowEvent| f.findings.iter().map(|x| x.kind).collect::<Vec<_>>();
        let mut judged = |state, cert| {
            let mut f = flow("backend", 8000);
            std::sync::Arc::make_mut(&mut f.encryption).state = state;
            std::sync::Arc::make_mut(&mut f.encryption).client_certificate = cert;
            judge.judge(&mut f);
            f
        };
        let f = judged(EncryptionState::Plaintext, ClientCertificate::Unknown);
        assert_eq!(
            (f.verdict, kinds(&f)),
            (Verdict::Violation, vec![FindingKind::MtlsMissing])
        );
        let f = judged(EncryptionState::Tls, ClientCertificate::NotSent);
        assert_eq!(
            (f.verdict, kinds(&f)),
            (Verdict::Violation, vec![FindingKind::MtlsMissing])
        );
        let f = judged(EncryptionState::Tls, ClientCertificate::Unobservable);
        assert_eq!(
            (f.verdict, kinds(&f)),
            (Verdict::Compliant, vec![FindingKind::MtlsUnverified])
        );
        let f = judged(EncryptionState::Mtls, ClientCertificate::Sent);
        assert_eq!((f.verdict, kinds(&f)), (Verdict::Compliant, vec![]));
        // Not seen is never silently compliant: the finding says why, for
        // every reason the capture can give.
        for reason in crate::flow::UnknownReason::ALL {
            let mut f = flow("backend", 8000);
            std::sync::Arc::make_mut(&mut f.encryption).state = EncryptionState::Unknown;
            std::sync::Arc::make_mut(&mut f.encryption).unknown_reason = Some(reason);
            judge.judge(&mut f);
            assert_eq!(
                (f.verdict, kinds(&f)),
                (Verdict::Compliant, vec![FindingKind::MtlsUnverified]),
                "{reason:?}"
            );
            assert!(
                f.findings[0].message.contains(reason.describe()),
                "{reason:?}: {}",
                f.findings[0].message
            );
        }

        // The backend's port answered with the postgresql SVID.
        let mut f = flow("backend", 8000);
        std::sync::Arc::make_mut(&mut f.encryption).state = EncryptionState::Mtls;
        std::sync::Arc::make_mut(&mut f.encryption).client_certificate = ClientCertificate::Sent;
        std::sync::Arc::make_mut(&mut f.encryption).server_spiffe_id =
            "spiffe://demo.local/ns/99-apps/sa/postgresql".into();
        std::sync::Arc::make_mut(&mut f.encryption).client_spiffe_id =
            "spiffe://demo.local/ns/99-apps/sa/frontend".into();
        judge.judge(&mut f);
        assert_eq!(f.verdict, Verdict::Violation);
        assert_eq!(kinds(&f), vec![FindingKind::IdentityMismatch]);
        assert!(
            f.findings[0].message.contains("sa/postgresql")
                && f.findings[0].message.contains("sa/backend"),
            "{}",
            f.findings[0].message
        );
        // Without a policy, a mismatch is still flagged.
        let mut g = f.clone();
        g.findings = Default::default();
        g.verdict = Verdict::Unknown;
        Judge::without_cilium(None).judge(&mut g);
        assert_eq!(g.verdict, Verdict::Violation);
    }

    #[test]
    fn invalid_initial_policy_names_file_and_line() {
        let (_dir, file) = dir_with(
            "apiVersion: flowaudit.io/v1alpha1\nkind: FlowPolicy\nmetadata: {name: t}\nspec:\n  trustDomain: demo.local\n  rules:\n    - name: r\n      from: [spiffe://other.org/x]\n      to: [world]\n",
        );
        let e = load_initial(std::slice::from_ref(&file))
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.yaml:8:"), "{e}");
    }

    #[tokio::test]
    async fn reload_swaps_good_versions_and_keeps_the_last_good_one() {
        let (dir, file) = dir_with(POLICY);
        let loaded = load_initial(std::slice::from_ref(&file)).unwrap();
        let first = loaded.policy.version().to_owned();
        let (tx, mut rx) = watch::channel(Arc::new(loaded.policy));
        let results = Arc::new(std::sync::Mutex::new(Vec::new()));
        let r2 = results.clone();
        let strict = flowaudit_policy::EvalOptions {
            unverified_mtls_is_violation: true,
        };
        let task = tokio::spawn(watch_policies(
            vec![dir.to_path_buf()],
            strict,
            tx,
            Box::new(move |ok, _version: &str, rules, _why| r2.lock().unwrap().push((ok, rules))),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::write(&file, "kind: FlowPolicy\nspec: [broken\n").unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(
            rx.borrow().version(),
            first,
            "a broken version must not replace the good one"
        );
        assert_eq!(results.lock().unwrap().first(), Some(&(false, 1)));
        std::fs::write(&file, POLICY.replace("8000]", "8000, 8001]")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("reload")
            .unwrap();
        assert_ne!(rx.borrow().version(), first);
        assert_eq!(
            rx.borrow().options(),
            strict,
            "a reloaded version keeps the agent's options (--mtls-unverified)"
        );
        assert_eq!(results.lock().unwrap().last(), Some(&(true, 1)));
        task.abort();
    }

    /// An edit made between the first load and the watcher's start is
    /// taken; the same content again is no reload, except after a rejected
    /// one, whose error it clears; a rejection is told by its first error,
    /// not by a warning before it.
    #[tokio::test]
    async fn the_watcher_takes_edits_made_while_the_agent_started_and_reports_errors_not_warnings()
    {
        let (dir, file) = dir_with(POLICY);
        let loaded = load_initial(std::slice::from_ref(&file)).unwrap();
        let first = loaded.policy.version().to_owned();
        let (tx, mut rx) = watch::channel(Arc::new(loaded.policy));
        // Edited before the watcher runs (the agent attaches meanwhile).
        std::fs::write(&file, POLICY.replace("8000]", "8000, 8001]")).unwrap();
        let edited = load_initial(std::slice::from_ref(&file))
            .unwrap()
            .policy
            .version()
            .to_owned();
        let results = Arc::new(std::sync::Mutex::new(Vec::new()));
        let r2 = results.clone();
        let task = tokio::spawn(watch_policies(
            vec![dir.to_path_buf()],
            Default::default(),
            tx,
            Box::new(move |ok, version: &str, _rules, why| {
                r2.lock().unwrap().push((ok, version.to_owned(), why))
            }),
        ));
        tokio::time::timeout(Duration::from_secs(3), rx.changed())
            .await
            .expect("the edit made during start-up is taken")
            .unwrap();
        assert_eq!(rx.borrow_and_update().version(), edited);
        assert_ne!(edited, first);
        // A second trust domain (a warning) before an error.
        let broken = format!(
            "{}---\n{}",
            POLICY
                .replace("metadata: {name: t}", "metadata: {name: t2}")
                .replace("demo.local", "other.local")
                .replace("frontend-to-backend", "other"),
            POLICY.replace("ports: [8000]", "ports: [0]")
        );
        std::fs::write(&file, &broken).unwrap();
        until_results(&results, 2).await;
        // The same content as in force, after the rejection: told good again.
        std::fs::write(&file, POLICY.replace("8000]", "8000, 8001]")).unwrap();
        until_results(&results, 3).await;
        let results = results.lock().unwrap().clone();
        assert_eq!(results[0], (true, edited.clone(), None));
        let (ok, version, why) = &results[1];
        assert!(!ok);
        assert_eq!(version, &edited, "the version in force stays");
        let why = why.as_deref().unwrap_or_default();
        assert!(why.contains("port") && !why.contains("warning"), "{why}");
        assert_eq!(results[2], (true, edited, None));
        assert!(
            !rx.has_changed().unwrap(),
            "the same version is not sent again"
        );
        task.abort();
    }

    async fn until_results<T>(results: &std::sync::Mutex<Vec<T>>, n: usize) {
        for _ in 0..50 {
            if results.lock().unwrap().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the watcher did not report {n} loads within 5 s");
    }
}
