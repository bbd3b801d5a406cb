#![no_main]
//! Any bytes as a policy file: loading must return diagnostics or a policy, never
//! panic; a loaded policy must evaluate a few flows without panicking.

use flowaudit_policy::{IdentitySource, ObservedEncryption, Flow, Peer, Source, check_sources};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let report = check_sources(&[Source { name: "fuzz.yaml".into(), text: text.to_string() }]);
    for d in &report.diagnostics {
        let _ = d.to_string();
    }
    if let Some(p) = report.policy {
        let ids = ["spiffe://demo.local/ns/99-apps/sa/frontend", "spiffe://demo.local/a/b/c/d", "spiffe://x"];
        for (i, a) in ids.iter().enumerate() {
            let src = Peer::spiffe(a, IdentitySource::Attested);
            for dst in [Peer::WORLD, Peer::HOST, Peer::UNKNOWN, Peer::spiffe(ids[(i + 1) % ids.len()], IdentitySource::Derived)] {
                let _ = p.evaluate(&Flow { source: src, destination: dst, port: 8000, encryption: ObservedEncryption::Plaintext, encryption_detail: "", failed: i == 1, mutual_auth: &flowaudit_policy::NoCilium });
            }
        }
    }
});
