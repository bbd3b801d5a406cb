//! Property tests of the engine's invariants over generated FlowPolicies and flows:
//! a matching deny always wins; adding an allow never takes compliance away (for an
//! mTLS-required allow, the only thing it can add is MTLS_MISSING/MTLS_UNVERIFIED);
//! evaluation is deterministic. Each generated policy is also checked against a
//! direct, unindexed reading of the rules.

use flowaudit_policy::{
    Decision, FindingKind, Flow, IdentitySource, ObservedEncryption, Peer, PolicySet, Source,
    Verdict, load_sources,
};
use proptest::prelude::*;

const NS: [&str; 3] = ["a", "b", "c"];
const SA: [&str; 3] = ["x", "y", "z"];

#[derive(Debug, Clone)]
struct GenRule {
    from: String,
    to: String,
    port: Option<(u16, u16)>,
    mtls_required: bool,
}

fn pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        (0..3usize, 0..3usize)
            .prop_map(|(n, s)| format!("spiffe://t.local/ns/{}/sa/{}", NS[n], SA[s])),
        (0..3usize).prop_map(|n| format!("spiffe://t.local/ns/{}/**", NS[n])),
        (0..3usize).prop_map(|s| format!("spiffe://t.local/ns/*/sa/{}", SA[s])),
        Just("world".to_string()),
        Just("host".to_string()),
    ]
}

fn rule() -> impl Strategy<Value = GenRule> {
    (
        pattern(),
        pattern(),
        proptest::option::of((1u16..20, 0u16..5)),
        any::<bool>(),
    )
        .prop_map(|(from, to, port, m)| GenRule {
            from,
            to,
            port: port.map(|(lo, w)| (lo, lo + w)),
            mtls_required: m,
        })
}

fn yaml(allows: &[GenRule], denies: &[GenRule]) -> String {
    let mut s = String::from(
        "apiVersion: flowaudit.io/v1alpha1\nkind: FlowPolicy\nmetadata: {name: p}\nspec:\n  trustDomain: t.local\n",
    );
    let body = |s: &mut String, i: usize, prefix: &str, r: &GenRule, allow: bool| {
        s.push_str(&format!(
            "    - name: {prefix}{i}\n      from: [\"{}\"]\n      to: [\"{}\"]\n",
            r.from, r.to
        ));
        if let Some((lo, hi)) = r.port {
            s.push_str(&format!("      ports: [\"{lo}-{hi}\"]\n"));
        }
        if allow {
            s.push_str(&format!(
                "      mtls: {}\n",
                if r.mtls_required {
                    "required"
                } else {
                    "optional"
                }
            ));
        }
    };
    s.push_str("  rules:\n");
    for (i, r) in allows.iter().enumerate() {
        body(&mut s, i, "allow", r, true);
    }
    if allows.is_empty() {
        s.push_str("    []\n");
    }
    if !denies.is_empty() {
        s.push_str("  deny:\n");
        for (i, r) in denies.iter().enumerate() {
            body(&mut s, i, "deny", r, false);
        }
    }
    s
}

fn compile(allows: &[GenRule], denies: &[GenRule]) -> PolicySet {
    let text = yaml(allows, denies);
    match load_sources(&[Source {
        name: "gen.yaml".into(),
        text: text.clone(),
    }]) {
        Ok(l) => l.policy,
        Err(e) => panic!("generated policy should load: {e}\n{text}"),
    }
}

#[derive(Debug, Clone)]
enum GenPeer {
    Id(String),
    World,
    Host,
}

fn peer() -> impl Strategy<Value = GenPeer> {
    prop_oneof![
        4 => (0..3usize, 0..3usize).prop_map(|(n, s)| GenPeer::Id(format!("spiffe://t.local/ns/{}/sa/{}", NS[n], SA[s]))),
        1 => Just(GenPeer::World),
        1 => Just(GenPeer::Host),
    ]
}

fn as_peer(p: &GenPeer) -> Peer<'_> {
    match p {
        GenPeer::Id(id) => Peer::spiffe(id, IdentitySource::Attested),
        GenPeer::World => Peer::WORLD,
        GenPeer::Host => Peer::HOST,
    }
}

fn encryption() -> impl Strategy<Value = ObservedEncryption> {
    prop_oneof![
        Just(ObservedEncryption::Plaintext),
        Just(ObservedEncryption::TlsNoClientCert),
        Just(ObservedEncryption::TlsUnverified),
        Just(ObservedEncryption::Mtls),
        Just(ObservedEncryption::Unknown),
    ]
}

/// Reference semantics, rule by rule without the index.
fn matches(r: &GenRule, src: &GenPeer, dst: &GenPeer, port: u16) -> bool {
    let m = |pat: &str, p: &GenPeer| match (pat, p) {
        ("world", GenPeer::World) | ("host", GenPeer::Host) => true,
        (pat, GenPeer::Id(id)) if pat.starts_with("spiffe://") => {
            flowaudit_policy::spiffe::parse_pattern(pat).is_ok_and(|p| p.matches(id))
        }
        _ => false,
    };
    m(&r.from, src) && m(&r.to, dst) && r.port.is_none_or(|(lo, hi)| lo <= port && port <= hi)
}

fn eval(
    p: &PolicySet,
    src: &GenPeer,
    dst: &GenPeer,
    port: u16,
    enc: ObservedEncryption,
    failed: bool,
) -> Decision {
    p.evaluate(&Flow {
        source: as_peer(src),
        destination: as_peer(dst),
        port,
        encryption: enc,
        encryption_detail: "",
        failed,
        mutual_auth: &flowaudit_policy::NoCilium,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn index_agrees_with_direct_reading(
        allows in proptest::collection::vec(rule(), 0..8),
        denies in proptest::collection::vec(rule(), 0..3),
        src in peer(), dst in peer(), port in 1u16..25,
    ) {
        let p = compile(&allows, &denies);
        let d = eval(&p, &src, &dst, port, ObservedEncryption::Mtls, false);
        let denied = denies.iter().any(|r| matches(r, &src, &dst, port));
        let allowed = allows.iter().any(|r| matches(r, &src, &dst, port));
        let want = if denied { Verdict::Violation } else if allowed { Verdict::Compliant } else { Verdict::Violation };
        prop_assert_eq!(d.verdict, want, "decision {:?}", d);
        prop_assert_eq!(d.has(FindingKind::DeniedByRule), denied);
        prop_assert_eq!(d.has(FindingKind::NoMatchingRule), !denied && !allowed);
    }

    #[test]
    fn a_matching_deny_always_wins(
        allows in proptest::collection::vec(rule(), 0..8),
        src in peer(), dst in peer(), port in 1u16..25,
        wide in any::<bool>(),
        enc in encryption(), failed in any::<bool>(),
    ) {
        // A deny built to match the flow: exact ends (or `**` wide), its port or any.
        let pat = |p: &GenPeer| match p {
            GenPeer::Id(id) if wide => format!("{}/**", id.rsplit_once("/sa/").map_or(id.as_str(), |(ns, _)| ns)),
            GenPeer::Id(id) => id.clone(),
            GenPeer::World => "world".into(),
            GenPeer::Host => "host".into(),
        };
        let deny = GenRule { from: pat(&src), to: pat(&dst), port: (!wide).then_some((port, port)), mtls_required: false };
        prop_assert!(matches(&deny, &src, &dst, port), "constructed deny must match: {:?}", deny);
        let p = compile(&allows, &[deny]);
        let d = eval(&p, &src, &dst, port, enc, failed);
        prop_assert_eq!(d.verdict, Verdict::Violation);
        prop_assert!(d.has(FindingKind::DeniedByRule));
        prop_assert!(!d.has(FindingKind::IntendedFlowFailed));
    }

    #[test]
    fn adding_an_allow_never_takes_compliance_away(
        allows in proptest::collection::vec(rule(), 0..8),
        denies in proptest::collection::vec(rule(), 0..3),
        extra in rule(),
        src in peer(), dst in peer(), port in 1u16..25,
        enc in encryption(), failed in any::<bool>(),
    ) {
        let before = eval(&compile(&allows, &denies), &src, &dst, port, enc, failed);
        let mut more = allows.clone();
        more.push(extra.clone());
        let after = eval(&compile(&more, &denies), &src, &dst, port, enc, failed);
        if before.verdict == Verdict::Compliant {
            if extra.mtls_required {
                // The strictest mTLS intent wins, so the only new finding may be about mTLS.
                for f in &after.findings {
                    prop_assert!(
                        before.findings.contains(f) || matches!(f.kind, FindingKind::MtlsMissing | FindingKind::MtlsUnverified | FindingKind::IntendedFlowFailed),
                        "new finding {:?}", f
                    );
                }
            } else {
                prop_assert_eq!(after.verdict, Verdict::Compliant, "before {:?} after {:?}", before, after);
            }
        }
        // Reachability never shrinks.
        prop_assert!(!after.has(FindingKind::NoMatchingRule) || before.has(FindingKind::NoMatchingRule));
    }

    #[test]
    fn evaluation_is_deterministic(
        allows in proptest::collection::vec(rule(), 0..8),
        denies in proptest::collection::vec(rule(), 0..3),
        src in peer(), dst in peer(), port in 1u16..25,
        enc in encryption(), failed in any::<bool>(),
    ) {
        let a = compile(&allows, &denies);
        let b = compile(&allows, &denies);
        let d1 = eval(&a, &src, &dst, port, enc, failed);
        prop_assert_eq!(&d1, &eval(&a, &src, &dst, port, enc, failed));
        prop_assert_eq!(&d1, &eval(&b, &src, &dst, port, enc, failed));
    }
}
