//! Table-driven evaluation of the precinct-99 reference scenario, against the
//! FlowPolicy of PRODUCT.md, the six Phase 4D Cilium policies, and both together.

use std::collections::BTreeMap;
use std::path::PathBuf;

use flowaudit_policy::{
    AuthSide, Decision, EvalOptions, FindingKind as F, Flow, IdentitySource, MutualAuth,
    MutualAuthSource, MutualAuthState, ObservedEncryption as E, PathEncryption, Peer, PeerKind,
    PolicySet, Severity, Verdict as V, check_paths, load_paths,
};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

fn load(files: &[&str]) -> PolicySet {
    let paths: Vec<PathBuf> = files.iter().map(|f| examples().join(f)).collect();
    match load_paths(&paths) {
        Ok(l) => l.policy,
        Err(e) => panic!("loading {files:?} should succeed, got: {e}"),
    }
}

/// A pod of the scenario: (namespace, service account, labels).
struct Pod {
    ns: &'static str,
    sa: &'static str,
    id: String,
    labels: BTreeMap<String, String>,
}

fn pod(ns: &'static str, sa: &'static str, labels: &[(&str, &str)]) -> Pod {
    Pod {
        ns,
        sa,
        id: format!("spiffe://demo.local/ns/{ns}/sa/{sa}"),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

impl Pod {
    fn peer(&self) -> Peer<'_> {
        Peer {
            kind: PeerKind::Workload,
            spiffe_id: Some(&self.id),
            identity_source: IdentitySource::Attested,
            namespace: Some(self.ns),
            service_account: Some(self.sa),
            labels: Some(&self.labels),
            name: None,
        }
    }
    fn without_id(&self) -> Peer<'_> {
        Peer {
            spiffe_id: None,
            identity_source: IdentitySource::Unknown,
            ..self.peer()
        }
    }
}

struct Cast {
    frontend: Pod,
    backend: Pod,
    postgresql: Pod,
    openbao: Pod,
    spire: Pod,
    agent: Pod,
    other: Pod,
}

fn cast() -> Cast {
    Cast {
        frontend: pod("99-apps", "frontend", &[("app", "frontend")]),
        backend: pod("99-apps", "backend", &[("app", "backend")]),
        postgresql: pod("99-apps", "postgresql", &[("app", "postgresql")]),
        openbao: pod(
            "openbao",
            "openbao",
            &[("app.kubernetes.io/name", "openbao")],
        ),
        spire: pod("spire-system", "spire-server", &[("app", "spire-server")]),
        agent: pod("spire-system", "spire-agent", &[("app", "spire-agent")]),
        other: pod("default", "curl", &[("app", "curl")]),
    }
}

fn eval(p: &PolicySet, src: Peer<'_>, dst: Peer<'_>, port: u16, enc: E, failed: bool) -> Decision {
    p.evaluate(&Flow {
        source: src,
        destination: dst,
        port,
        encryption: enc,
        encryption_detail: "",
        failed,
        mutual_auth: &flowaudit_policy::NoCilium,
    })
}

#[track_caller]
fn expect(d: &Decision, verdict: V, findings: &[F], rule: &str, case: &str) {
    let kinds: Vec<F> = d.findings.iter().map(|f| f.kind).collect();
    assert!(
        d.verdict == verdict && kinds == findings && (rule == "*" || d.policy_rule == rule),
        "{case}: expected {verdict} {findings:?} rule {rule:?}, got {} {kinds:?} rule {:?}\n{:#?}",
        d.verdict,
        d.policy_rule,
        d.findings
    );
}

#[test]
fn flowpolicy_reference_scenario() {
    let p = load(&["precinct-99-flowpolicy.yaml"]);
    let c = cast();
    let (fe, be, pg, ob, sp) = (
        c.frontend.peer(),
        c.backend.peer(),
        c.postgresql.peer(),
        c.openbao.peer(),
        c.spire.peer(),
    );
    // (case, source, destination, port, encryption, failed, verdict, findings, rule)
    type Case<'a> = (
        &'a str,
        Peer<'a>,
        Peer<'a>,
        u16,
        E,
        bool,
        V,
        &'a [F],
        &'a str,
    );
    let table: &[Case] = &[
        (
            "frontend->postgresql is denied",
            fe,
            pg,
            5432,
            E::Plaintext,
            false,
            V::Violation,
            &[F::DeniedByRule],
            "nothing-to-postgresql-from-frontend",
        ),
        (
            "denied even when it fails",
            fe,
            pg,
            5432,
            E::Unknown,
            true,
            V::Violation,
            &[F::DeniedByRule],
            "nothing-to-postgresql-from-frontend",
        ),
        (
            "frontend->backend mTLS",
            fe,
            be,
            8000,
            E::Mtls,
            false,
            V::Compliant,
            &[],
            "frontend-to-backend",
        ),
        (
            "frontend->backend plaintext",
            fe,
            be,
            8000,
            E::Plaintext,
            false,
            V::Violation,
            &[F::MtlsMissing],
            "frontend-to-backend",
        ),
        (
            "frontend->backend TLS1.2 no client cert",
            fe,
            be,
            8000,
            E::TlsNoClientCert,
            false,
            V::Violation,
            &[F::MtlsMissing],
            "frontend-to-backend",
        ),
        (
            "frontend->backend TLS1.3",
            fe,
            be,
            8000,
            E::TlsUnverified,
            false,
            V::Compliant,
            &[F::MtlsUnverified],
            "frontend-to-backend",
        ),
        (
            // Not seen is never silently compliant (issue 16).
            "frontend->backend no payload",
            fe,
            be,
            8000,
            E::Unknown,
            false,
            V::Compliant,
            &[F::MtlsUnverified],
            "frontend-to-backend",
        ),
        (
            "frontend->backend failed",
            fe,
            be,
            8000,
            E::Unknown,
            true,
            V::Compliant,
            &[F::IntendedFlowFailed],
            "frontend-to-backend",
        ),
        (
            "frontend->backend wrong port",
            fe,
            be,
            8001,
            E::Mtls,
            false,
            V::Violation,
            &[F::NoMatchingRule],
            "",
        ),
        (
            "backend->frontend reverse",
            be,
            fe,
            3000,
            E::Mtls,
            false,
            V::Violation,
            &[F::NoMatchingRule],
            "",
        ),
        (
            "backend->postgresql plaintext ok",
            be,
            pg,
            5432,
            E::Plaintext,
            false,
            V::Compliant,
            &[],
            "backend-to-postgresql",
        ),
        (
            "frontend->openbao via **",
            fe,
            ob,
            8200,
            E::Mtls,
            false,
            V::Compliant,
            &[],
            "apps-to-openbao",
        ),
        (
            "spire->openbao not in 99-apps",
            sp,
            ob,
            8200,
            E::Mtls,
            false,
            V::Violation,
            &[F::NoMatchingRule],
            "",
        ),
        (
            "world->frontend not in FlowPolicy",
            Peer::WORLD,
            fe,
            3000,
            E::Plaintext,
            false,
            V::Violation,
            &[F::NoMatchingRule],
            "",
        ),
        (
            "unknown source, allow hinges on it",
            c.backend.without_id(),
            pg,
            5432,
            E::Plaintext,
            false,
            V::Unknown,
            &[F::UnknownIdentity],
            "",
        ),
        (
            "unknown source, no rule for port at all",
            c.backend.without_id(),
            pg,
            1,
            E::Plaintext,
            false,
            V::Violation,
            &[F::NoMatchingRule, F::UnknownIdentity],
            "",
        ),
        (
            "unknown peer kind",
            Peer::UNKNOWN,
            be,
            8000,
            E::Mtls,
            false,
            V::Unknown,
            &[F::UnknownIdentity],
            "",
        ),
    ];
    for (case, src, dst, port, enc, failed, v, f, rule) in table {
        expect(
            &eval(&p, *src, *dst, *port, *enc, *failed),
            *v,
            f,
            rule,
            case,
        );
    }
}

#[test]
fn unverified_mtls_can_be_made_a_violation() {
    let p = load(&["precinct-99-flowpolicy.yaml"]).with_options(EvalOptions {
        unverified_mtls_is_violation: true,
    });
    let c = cast();
    let d = eval(
        &p,
        c.frontend.peer(),
        c.backend.peer(),
        8000,
        E::TlsUnverified,
        false,
    );
    expect(
        &d,
        V::Violation,
        &[F::MtlsUnverified],
        "frontend-to-backend",
        "TLS 1.3 with the strict setting",
    );
}

#[test]
fn phase_4d_cilium_policies_give_the_intended_outcome() {
    let p = load(&["network-policies.yaml"]);
    assert_eq!(p.imported().len(), 6, "six Phase 4D policies");
    let c = cast();
    let (fe, be, pg, ob, sp, ag, other) = (
        c.frontend.peer(),
        c.backend.peer(),
        c.postgresql.peer(),
        c.openbao.peer(),
        c.spire.peer(),
        c.agent.peer(),
        c.other.peer(),
    );
    // (case, source, destination, port, verdict, findings, rule)
    type Case<'a> = (&'a str, Peer<'a>, Peer<'a>, u16, V, &'a [F], &'a str);
    let table: &[Case] = &[
        (
            "frontend->backend:8000",
            fe,
            be,
            8000,
            V::Compliant,
            &[],
            "cnp:99-apps/backend-ingress-policy",
        ),
        (
            "frontend->backend:8001",
            fe,
            be,
            8001,
            V::Violation,
            &[F::NoMatchingRule],
            "",
        ),
        (
            "frontend->postgresql blocked (log test 2)",
            fe,
            pg,
            5432,
            V::Violation,
            &[F::NoMatchingRule],
            "",
        ),
        (
            "backend->postgresql",
            be,
            pg,
            5432,
            V::Compliant,
            &[],
            "cnp:99-apps/postgresql-ingress-policy",
        ),
        (
            "openbao->postgresql cross-namespace",
            ob,
            pg,
            5432,
            V::Compliant,
            &[],
            "cnp:99-apps/postgresql-ingress-policy",
        ),
        (
            "backend->openbao:8200",
            be,
            ob,
            8200,
            V::Compliant,
            &[],
            "cnp:openbao/openbao-ingress-policy",
        ),
        (
            "frontend->openbao:8200",
            fe,
            ob,
            8200,
            V::Compliant,
            &[],
            "cnp:openbao/openbao-ingress-policy",
        ),
        (
            "default ns->openbao",
            other,
            ob,
            8200,
            V::Violation,
            &[F::NoMatchingRule],
            "",
        ),
        (
            "backend->spire-server:8081",
            be,
            sp,
            8081,
            V::Compliant,
            &[],
            "cnp:spire-system/spire-server-ingress-policy",
        ),
        (
            "spire-agent->spire-server:8081",
            ag,
            sp,
            8081,
            V::Compliant,
            &[],
            "cnp:spire-system/spire-server-ingress-policy",
        ),
        (
            "default ns->spire-server",
            other,
            sp,
            8081,
            V::Violation,
            &[F::NoMatchingRule],
            "",
        ),
        (
            "world->frontend:3000",
            Peer::WORLD,
            fe,
            3000,
            V::Compliant,
            &[],
            "cnp:99-apps/frontend-ingress-policy",
        ),
        (
            "host->frontend:3000",
            Peer::HOST,
            fe,
            3000,
            V::Compliant,
            &[],
            "cnp:99-apps/frontend-ingress-policy",
        ),
        (
            "backend->frontend:3000 same-ns health check",
            be,
            fe,
            3000,
            V::Compliant,
            &[],
            "cnp:99-apps/frontend-ingress-policy",
        ),
        (
            "world->backend default deny",
            Peer::WORLD,
            be,
            8000,
            V::Violation,
            &[F::NoMatchingRule],
            "",
        ),
        (
            "postgresql->backend default deny",
            pg,
            be,
            8000,
            V::Violation,
            &[F::NoMatchingRule],
            "",
        ),
        // Nothing selects the egress of 99-apps pods or world's ingress: no intent at all.
        (
            "frontend->world unselected",
            fe,
            Peer::WORLD,
            443,
            V::Violation,
            &[F::NoMatchingRule],
            "",
        ),
    ];
    for (case, src, dst, port, v, f, rule) in table {
        expect(
            &eval(&p, *src, *dst, *port, E::Plaintext, false),
            *v,
            f,
            rule,
            case,
        );
    }
    let d = eval(&p, fe, pg, 5432, E::Plaintext, false);
    assert!(
        d.findings[0].message.contains("ingress of postgresql is restricted by cnp:99-apps/postgresql-ingress-policy, cnp:99-apps/default-deny-all"),
        "message should name the restricting policies: {}",
        d.findings[0].message
    );
    // Labels unknown: the default-deny policy selects everything in 99-apps, but whether
    // the backend rule admits the source cannot be told.
    let be_nolabels = Peer { labels: None, ..be };
    let d = eval(&p, be_nolabels, pg, 5432, E::Plaintext, false);
    expect(
        &d,
        V::Unknown,
        &[F::UnknownIdentity],
        "",
        "source labels unknown",
    );
}

#[test]
fn flowpolicy_and_cilium_together() {
    let p = load(&["precinct-99-flowpolicy.yaml", "network-policies.yaml"]);
    let c = cast();
    let (fe, be, pg, ob) = (
        c.frontend.peer(),
        c.backend.peer(),
        c.postgresql.peer(),
        c.openbao.peer(),
    );
    // mTLS stays required where the FlowPolicy says so, though Cilium also allows it.
    expect(
        &eval(&p, fe, be, 8000, E::Plaintext, false),
        V::Violation,
        &[F::MtlsMissing],
        "frontend-to-backend",
        "plaintext frontend->backend",
    );
    expect(
        &eval(&p, fe, pg, 5432, E::Plaintext, false),
        V::Violation,
        &[F::DeniedByRule],
        "nothing-to-postgresql-from-frontend",
        "deny wins",
    );
    expect(
        &eval(&p, ob, pg, 5432, E::Plaintext, false),
        V::Compliant,
        &[],
        "cnp:99-apps/postgresql-ingress-policy",
        "openbao->postgresql from Cilium intent",
    );
    expect(
        &eval(&p, Peer::WORLD, fe, 3000, E::Plaintext, false),
        V::Compliant,
        &[],
        "cnp:99-apps/frontend-ingress-policy",
        "world->frontend",
    );
    expect(
        &eval(&p, ob, pg, 5432, E::Unknown, true),
        V::Compliant,
        &[F::IntendedFlowFailed],
        "cnp:99-apps/postgresql-ingress-policy",
        "blocked intended flow",
    );
}

#[test]
fn wrong_namespace_label_is_warned_and_read_as_intent() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/postgresql-wrong-namespace-label.yaml");
    let report = check_paths(&[&path]).expect("fixture is readable");
    let warnings: Vec<_> = report
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Warning)
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning expected, got {:#?}",
        report.diagnostics
    );
    let w = warnings[0];
    assert!(
        w.message.contains("k8s:io.kubernetes.pod.namespace"),
        "warning must name the working label: {}",
        w.message
    );
    assert_eq!(
        (w.line, w.col),
        (17, 13),
        "warning must point at the label key"
    );
    let p = report.policy.expect("warnings do not block loading");
    let c = cast();
    // Cilium drops OpenBao -> PostgreSQL because of the label; flowaudit knows it was meant.
    let d = eval(
        &p,
        c.openbao.peer(),
        c.postgresql.peer(),
        5432,
        E::Unknown,
        true,
    );
    expect(
        &d,
        V::Compliant,
        &[F::IntendedFlowFailed],
        "cnp:99-apps/postgresql-ingress-policy",
        "label bug blocks intended flow",
    );
}

#[test]
fn kubernetes_networkpolicy_import() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/netpol.yaml");
    let p = load_paths(&[path])
        .unwrap_or_else(|e| panic!("netpol fixture should load: {e}"))
        .policy;
    let web = pod("shop", "web", &[("app", "web")]);
    let api = pod("shop", "api", &[("app", "api")]);
    let db = pod("shop", "db", &[("app", "db")]);
    let prom = pod("monitoring", "prometheus", &[("app", "prometheus")]);
    let prom_elsewhere = pod("shop", "prometheus", &[("app", "prometheus")]);
    let table: &[(&str, Peer, Peer, u16, V)] = &[
        ("web->api:8080", web.peer(), api.peer(), 8080, V::Compliant),
        (
            "web->api:9050 range",
            web.peer(),
            api.peer(),
            9050,
            V::Compliant,
        ),
        (
            "web->api:9101 outside range",
            web.peer(),
            api.peer(),
            9101,
            V::Violation,
        ),
        (
            "prometheus in monitoring ->api",
            prom.peer(),
            api.peer(),
            8080,
            V::Compliant,
        ),
        (
            "prometheus in shop ->api",
            prom_elsewhere.peer(),
            api.peer(),
            8080,
            V::Violation,
        ),
        (
            "api->db egress allowed, db ingress unselected",
            api.peer(),
            db.peer(),
            5432,
            V::Compliant,
        ),
        (
            "api->web egress not allowed",
            api.peer(),
            web.peer(),
            80,
            V::Violation,
        ),
    ];
    for (case, src, dst, port, v) in table {
        let d = eval(&p, *src, *dst, *port, E::Plaintext, false);
        assert_eq!(d.verdict, *v, "{case}: {d:#?}");
    }
}

/// A Cilium answer for the tests: every side reads the same entry.
fn cilium(state: MutualAuthState, path: PathEncryption) -> MutualAuth {
    MutualAuth {
        state,
        enforced_on: AuthSide::Ingress,
        local_identity: 24001,
        remote_identity: 24002,
        remote_node_id: 0,
        expires: "2026-12-02T08:00:00Z".into(),
        path_encryption: path,
        detail: String::new(),
    }
}

fn eval_auth(
    p: &PolicySet,
    src: Peer<'_>,
    dst: Peer<'_>,
    enc: E,
    failed: bool,
    seen: &dyn MutualAuthSource,
) -> Decision {
    p.evaluate(&Flow {
        source: src,
        destination: dst,
        port: 8000,
        encryption: enc,
        encryption_detail: "",
        failed,
        mutual_auth: seen,
    })
}

/// A `{who} asked` source that counts, to prove mTLS on the wire needs no
/// lookup and that flows outside such rules never ask.
#[derive(Debug, Default)]
struct Counting(std::cell::Cell<u32>);

impl MutualAuthSource for Counting {
    fn observe(&self, side: AuthSide) -> MutualAuth {
        self.0.set(self.0.get() + 1);
        MutualAuth::not_observable(side, "counted")
    }
}

/// (case, encryption, failed, Cilium's answer, verdict, findings, words of
/// the first finding).
type AuthCase<'a> = (
    &'static str,
    E,
    bool,
    &'a dyn MutualAuthSource,
    V,
    &'static [F],
    &'static str,
);

#[test]
fn cilium_mutual_authentication_is_audited_as_cilium_enforces_it() {
    let p = load(&["cilium-mutual-auth/backend-ingress.yaml"]);
    let c = cast();
    let (fe, be) = (c.frontend.peer(), c.backend.peer());
    let rule = "cnp:99-apps/backend-ingress-policy";
    use MutualAuthState as S;
    use PathEncryption as P;
    let no_cilium = flowaudit_policy::NoCilium;
    let seen = |s, p| cilium(s, p);
    let (ok_wg, ok_plain, ok_same, ok_unknown) = (
        seen(S::Authenticated, P::Encrypted),
        seen(S::Authenticated, P::Unencrypted),
        seen(S::Authenticated, P::SameNode),
        seen(S::Authenticated, P::Unknown),
    );
    let (expired, missing) = (seen(S::Expired, P::SameNode), seen(S::Missing, P::SameNode));
    let table: [AuthCase<'_>; 9] = [
        // Before, this was VIOLATION [MTLS_MISSING]: a false alarm on every
        // flow Cilium authenticated.
        (
            "authenticated, WireGuard",
            E::Plaintext,
            false,
            &ok_wg,
            V::Compliant,
            &[],
            "",
        ),
        // The bytes cross the network unencrypted: reported, still compliant.
        (
            "authenticated, unencrypted",
            E::Plaintext,
            false,
            &ok_plain,
            V::Compliant,
            &[F::MutualAuthUnencrypted],
            "no WireGuard or IPsec",
        ),
        // Same node (the bytes never leave the kernel) or path not known.
        (
            "authenticated, same node",
            E::Plaintext,
            false,
            &ok_same,
            V::Compliant,
            &[],
            "",
        ),
        (
            "authenticated, path unknown",
            E::Plaintext,
            false,
            &ok_unknown,
            V::Compliant,
            &[],
            "",
        ),
        (
            "expired",
            E::Plaintext,
            false,
            &expired,
            V::Violation,
            &[F::MutualAuthMissing],
            "had expired at 2026-12-02T08:00:00Z when the connection was made; cnp:99-apps/backend-ingress-policy",
        ),
        (
            "missing",
            E::Plaintext,
            false,
            &missing,
            V::Violation,
            &[F::MutualAuthMissing],
            "no Cilium auth entry for the pair (identities 24001 -> 24002, remote node 0)",
        ),
        // TLS is not mutual authentication: the entry still decides.
        (
            "TLS, no entry",
            E::TlsNoClientCert,
            false,
            &missing,
            V::Violation,
            &[F::MutualAuthMissing],
            "",
        ),
        // Without Cilium: unverified with the reason, never MTLS_MISSING.
        (
            "no Cilium",
            E::Plaintext,
            false,
            &no_cilium,
            V::Compliant,
            &[F::MtlsUnverified],
            flowaudit_policy::NO_CILIUM,
        ),
        // An intended flow that failed with no entry: the failure says why.
        (
            "failed, missing",
            E::Unknown,
            true,
            &missing,
            V::Compliant,
            &[F::IntendedFlowFailed],
            "no Cilium auth entry",
        ),
    ];
    for (case, enc, failed, answer, verdict, findings, words) in table {
        let d = eval_auth(&p, fe, be, enc, failed, answer);
        expect(&d, verdict, findings, rule, case);
        assert!(d.mutual_auth_required && !d.mtls_required, "{case}: {d:?}");
        assert!(
            d.findings.first().is_none_or(|f| f.message.contains(words)),
            "{case}: the finding should say {words:?}: {:?}",
            d.findings
        );
    }

    // mTLS on the wire satisfies the rule without asking Cilium.
    let counting = Counting::default();
    let d = eval_auth(&p, fe, be, E::Mtls, false, &counting);
    expect(&d, V::Compliant, &[], rule, "mTLS on the wire");
    assert_eq!(counting.0.get(), 0, "mTLS seen: Cilium must not be asked");
    assert!(d.mutual_auth.is_none());
    // A flow the rule does not cover never asks.
    let d = eval_auth(&p, c.openbao.peer(), be, E::Plaintext, false, &counting);
    assert_eq!(d.verdict, V::Violation, "{d:?}");
    assert_eq!(
        counting.0.get(),
        0,
        "no auth rule: Cilium must not be asked"
    );
}

/// The words of each finding, as users read them in events and in
/// `policy check --explain`: both ends, the port, and the rule.
#[test]
fn finding_messages_name_the_ends_the_port_and_the_rule() {
    let p = load(&["precinct-99-flowpolicy.yaml"]);
    let c = cast();
    let (fe, be, pg) = (c.frontend.peer(), c.backend.peer(), c.postgresql.peer());
    let message = |d: Decision, kind: F| match d.findings.iter().find(|f| f.kind == kind) {
        Some(f) => f.message.clone(),
        None => panic!("expected a {kind:?} finding, got {:#?}", d.findings),
    };
    let cases = [
        (
            message(eval(&p, fe, pg, 5432, E::Plaintext, false), F::DeniedByRule),
            "deny rule nothing-to-postgresql-from-frontend matches frontend -> postgresql:5432",
        ),
        (
            message(
                eval(&p, pg, fe, 3000, E::Plaintext, false),
                F::NoMatchingRule,
            ),
            "no rule allows postgresql -> frontend:3000",
        ),
        (
            message(eval(&p, fe, be, 8000, E::Plaintext, false), F::MtlsMissing),
            "frontend -> backend:8000 is plaintext, but frontend-to-backend requires mTLS",
        ),
        (
            message(
                eval(&p, fe, be, 8000, E::TlsNoClientCert, false),
                F::MtlsMissing,
            ),
            "frontend -> backend:8000 is TLS without a client certificate, but frontend-to-backend requires mTLS",
        ),
        (
            message(
                eval(&p, be, pg, 5432, E::Plaintext, true),
                F::IntendedFlowFailed,
            ),
            "backend -> postgresql:5432 is allowed by backend-to-postgresql but failed to connect; something (a network policy, a firewall, the peer) blocks an intended flow",
        ),
        (
            message(eval(&p, fe, be, 65535, E::Mtls, false), F::NoMatchingRule),
            "no rule allows frontend -> backend:65535",
        ),
    ];
    for (got, want) in cases {
        assert_eq!(got, want);
    }
    // An end whose labels are unknown, under imported policies that select
    // by label: the decision cannot be made, and the message says why.
    let cnp = load(&["network-policies.yaml"]);
    let unlabelled = Peer {
        labels: None,
        ..c.frontend.peer()
    };
    let d = eval(&cnp, unlabelled, c.backend.peer(), 8000, E::Mtls, false);
    assert_eq!(
        message(d, F::UnknownIdentity),
        "cannot judge frontend -> backend:8000: labels or namespace of an end are unknown"
    );
}
