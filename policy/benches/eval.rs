//! Cost of one evaluation with 10, 1,000 and 10,000 FlowPolicy rules: each rule allows
//! one distinct workload pair, plus a share of pattern rules, so the index, not a scan,
//! must find the match.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use flowaudit_policy::{
    Flow, IdentitySource, ObservedEncryption, Peer, PolicySet, Source, load_sources,
};

fn policy(n: usize) -> PolicySet {
    let mut s = String::from(
        "apiVersion: flowaudit.io/v1alpha1\nkind: FlowPolicy\nmetadata: {name: bench}\nspec:\n  trustDomain: demo.local\n  rules:\n",
    );
    for i in 0..n {
        if i % 10 == 9 {
            s.push_str(&format!(
                "    - name: r{i}\n      from: [\"spiffe://demo.local/ns/ns{i}/**\"]\n      to: [\"spiffe://demo.local/ns/*/sa/svc{i}\"]\n      ports: [\"8000-8100\"]\n"
            ));
        } else {
            s.push_str(&format!(
                "    - name: r{i}\n      from: [spiffe://demo.local/ns/ns{i}/sa/client]\n      to: [spiffe://demo.local/ns/ns{i}/sa/server]\n      ports: [{}]\n",
                8000 + (i % 100)
            ));
        }
    }
    s.push_str("  deny:\n    - name: d\n      from: [world]\n      to: [\"spiffe://demo.local/ns/secret/**\"]\n");
    match load_sources(&[Source {
        name: "bench.yaml".into(),
        text: s,
    }]) {
        Ok(l) => l.policy,
        Err(e) => panic!("bench policy should load: {e}"),
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("evaluate");
    for n in [10usize, 1_000, 10_000] {
        let p = policy(n);
        let i = n / 2 - (n / 2) % 10; // an exact-ID rule in the middle
        let src = format!("spiffe://demo.local/ns/ns{i}/sa/client");
        let dst = format!("spiffe://demo.local/ns/ns{i}/sa/server");
        let port = 8000 + (i % 100) as u16;
        let flow = Flow {
            source: Peer::spiffe(&src, IdentitySource::Attested),
            destination: Peer::spiffe(&dst, IdentitySource::Attested),
            port,
            encryption: ObservedEncryption::Mtls,
            encryption_detail: "",
            failed: false,
            mutual_auth: &flowaudit_policy::NoCilium,
        };
        assert_eq!(
            p.evaluate(&flow).policy_rule,
            format!("r{i}"),
            "bench flow must hit its rule"
        );
        g.bench_with_input(BenchmarkId::new("allowed", n), &flow, |b, f| {
            b.iter(|| std::hint::black_box(p.evaluate(f)))
        });
        let miss = Flow { port: 9, ..flow };
        g.bench_with_input(BenchmarkId::new("no_match", n), &miss, |b, f| {
            b.iter(|| std::hint::black_box(p.evaluate(f)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
