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
        namespace: some(&ep.namespace),
        service_account: some(&ep.service_account),
        labels: (ep.kind == EndKind::Pod).then_some(&ep.labels as &dyn flowaudit_policy::Labels),
        name: some(&ep.service_account).or(some(&ep.pod_name)),
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
        Judge {
            policy,
            cilium: None,
        }
    }

    pub fn judge(&self, flow: &mut FlowEvent) {
        let mismatches = identity_mismatches(flow);
        if let Some(rx) = &self.policy {
            let set = rx.borrow().clone();
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
            flow.verdict = decision.verdict;
            flow.findings = decision.findings;
            flow.policy_rule = decision.policy_rule;
            flow.mutual_auth = decision.mutual_auth;
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

/// Polls the policy paths every second; publishes each good new version.
pub async fn watch_policies(
    paths: Vec<PathBuf>,
    tx: watch::Sender<Arc<PolicySet>>,
    hook: ReloadHook,
) {
    let mut last = stamp(&paths);
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
                for w in &loaded.warnings {
                    tracing::warn!(%w, "policy warning");
                }
                let rules = loaded.policy.rule_count();
                tracing::info!(version = loaded.policy.version(), rules, "policy reloaded");
                hook(true, loaded.policy.version(), rules, None);
                if tx.send(Arc::new(loaded.policy)).is_err() {
                    return;
                }
            }
            Err(e) => {
                for d in e.diagnostics() {
                    tracing::error!(%d, "policy rejected");
                }
                if e.diagnostics().is_empty() {
                    tracing::error!(error = %e, "policy rejected");
                }
                tracing::error!(
                    version = tx.borrow().version(),
                    "the last good policy stays in force"
                );
                let why = e
                    .diagnostics()
                    .first()
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
            ep.namespace = "99-apps".into();
            ep.service_account = sa.into();
            ep.spiffe_id = format!("spiffe://demo.local/ns/99-apps/sa/{sa}").into();
            ep.identity_source = IdentitySource::Attested;
        }
        f
    }

    fn dir_with(policy: &str) -> (PathBuf, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("fa-judge-{}-{}", std::process::id(), policy.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("p.yaml");
        std::fs::write(&file, policy).unwrap();
        (dir, file)
    }

    #[test]
    fn judges_allowed_and_unintended_flows() {
        let (dir, file) = dir_with(POLICY);
        let loaded = load_initial(std::slice::from_ref(&file)).unwrap();
        let judge = Judge::without_cilium(Some(watch::channel(Arc::new(loaded.policy)).1));
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
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn encryption_decides_mtls_findings_and_certificates_are_checked() {
        let required = POLICY.replace("mtls: optional", "mtls: required");
        let (dir, file) = dir_with(&required);
        let loaded = load_initial(std::slice::from_ref(&file)).unwrap();
        let judge = Judge::without_cilium(Some(watch::channel(Arc::new(loaded.policy)).1));
        let kinds = |f: &FlowEvent| f.findings.iter().map(|x| x.kind).collect::<Vec<_>>();
        let judged = |state, cert| {
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
        g.findings.clear();
        g.verdict = Verdict::Unknown;
        Judge::without_cilium(None).judge(&mut g);
        assert_eq!(g.verdict, Verdict::Violation);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn invalid_initial_policy_names_file_and_line() {
        let (dir, file) = dir_with(
            "apiVersion: flowaudit.io/v1alpha1\nkind: FlowPolicy\nmetadata: {name: t}\nspec:\n  trustDomain: demo.local\n  rules:\n    - name: r\n      from: [spiffe://other.org/x]\n      to: [world]\n",
        );
        let e = load_initial(std::slice::from_ref(&file))
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.yaml:8:"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn reload_swaps_good_versions_and_keeps_the_last_good_one() {
        let (dir, file) = dir_with(POLICY);
        let loaded = load_initial(std::slice::from_ref(&file)).unwrap();
        let first = loaded.policy.version().to_owned();
        let (tx, mut rx) = watch::channel(Arc::new(loaded.policy));
        let results = Arc::new(std::sync::Mutex::new(Vec::new()));
        let r2 = results.clone();
        let task = tokio::spawn(watch_policies(
            vec![dir.clone()],
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
        assert_eq!(results.lock().unwrap().last(), Some(&(true, 1)));
        task.abort();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
