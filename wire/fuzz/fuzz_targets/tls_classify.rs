#![no_main]
//! Any bytes as a capture: the input is cut into chunks (direction, offset,
//! bytes) that mostly follow on from each other, with occasional gaps,
//! repeats and wild offsets. Feeding must never panic, the observation must
//! stay consistent with itself, and a final observation must never change.

use flowaudit_wire::{Classifier, ClientCert, Dir, WireState};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut c = Classifier::new();
    let mut next = [0u32; 2];
    let mut rest = data;
    let mut settled = None;
    // Each chunk: a control byte (bit 0 direction, bits 1-4 gap or overlap
    // size, bits 5-6 offset mode, bit 7 length times 8), a length byte, bytes.
    while let [control, len, tail @ ..] = rest {
        let scale = if control & 0x80 != 0 { 8 } else { 1 };
        let len = (usize::from(*len) * scale).min(tail.len());
        let (bytes, after) = tail.split_at(len);
        rest = after;
        let d = usize::from(control & 1);
        let dir = if d == 0 { Dir::Out } else { Dir::In };
        let offset = match control >> 5 & 0b11 {
            0 | 1 => next[d],
            2 => next[d].saturating_sub(u32::from(control & 0x1E)),
            _ => next[d].saturating_add(u32::from(control & 0x1E)),
        };
        c.feed(dir, offset, bytes);
        next[d] = next[d].max(offset.saturating_add(len as u32));

        let o = c.observation();
        assert_eq!(
            o.state == WireState::Mtls,
            o.client_cert == ClientCert::Sent
        );
        if !matches!(o.state, WireState::Tls | WireState::Mtls) {
            assert_eq!(o.client_cert, ClientCert::Unknown);
        }
        if o.client_cert_inferred {
            assert!(matches!(
                o.client_cert,
                ClientCert::Sent | ClientCert::NotSent
            ));
            assert_eq!(o.tls_version, Some("TLS1.3"));
        }
        if o.state == WireState::Unknown {
            assert_eq!(o.protocol, None);
        }
        if c.is_final() {
            match &settled {
                None => settled = Some(o),
                Some(before) => assert_eq!(before, &o, "a final observation changed"),
            }
        }
    }
});
