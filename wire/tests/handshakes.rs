//! Real OpenSSL handshakes (recorded by tests/fixtures/make.sh) replayed into
//! the classifier as the agent would: chunks of at most 1024 bytes in the
//! order the proxy received them, from the client's and the server's socket,
//! stopping at `is_final()` like the agent does.

use std::path::PathBuf;

use flowaudit_wire::{CAPTURE_BUDGET, Classifier, ClientCert, Dir, Observation, WireState};

const CHUNK: usize = 1024;
const BACKEND: &str = "spiffe://demo.local/ns/99-apps/sa/backend";
const FRONTEND: &str = "spiffe://demo.local/ns/99-apps/sa/frontend";
const OTHER: &str = "spiffe://demo.local/ns/99-apps/sa/other";

/// One recorded connection: both directions and the arrival order of segments.
struct Fixture {
    c2s: Vec<u8>,
    s2c: Vec<u8>,
    /// (client to server?, length) per segment received by the proxy.
    order: Vec<(bool, usize)>,
}

fn load(name: &str) -> Fixture {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let read = |ext: &str| {
        let path = dir.join(format!("{name}.{ext}"));
        std::fs::read(&path)
            .unwrap_or_else(|e| panic!("fixture {} unreadable: {e}", path.display()))
    };
    let order = String::from_utf8(read("order"))
        .expect("order file is ASCII")
        .lines()
        .map(|line| {
            let (dir, len) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("{name}.order: bad line {line:?}"));
            (
                dir == "c2s",
                len.parse()
                    .unwrap_or_else(|_| panic!("{name}.order: bad length in {line:?}")),
            )
        })
        .collect();
    Fixture {
        c2s: read("c2s"),
        s2c: read("s2c"),
        order,
    }
}

/// A chunk as the kernel side would send it: direction, offset, bytes.
type Chunk<'a> = (Dir, u32, &'a [u8]);

/// Splits the recorded segments into chunks of at most `size` bytes, in
/// arrival order, as seen from the client socket (`client_view`) or the server's.
fn chunks(f: &Fixture, client_view: bool, size: usize) -> Vec<Chunk<'_>> {
    let (mut c, mut s) = (0usize, 0usize);
    let mut out = Vec::new();
    for &(c2s, len) in &f.order {
        let (stream, pos) = if c2s {
            (&f.c2s, &mut c)
        } else {
            (&f.s2c, &mut s)
        };
        let dir = if c2s == client_view {
            Dir::Out
        } else {
            Dir::In
        };
        let segment = &stream[*pos..*pos + len];
        for (i, piece) in segment.chunks(size).enumerate() {
            out.push((dir, (*pos + i * size) as u32, piece));
        }
        *pos += len;
    }
    assert_eq!(
        (c, s),
        (f.c2s.len(), f.s2c.len()),
        "order file covers both streams"
    );
    out
}

/// Feeds chunks like the agent: stops once the classifier says it is final.
fn replay(chunks: &[Chunk<'_>]) -> (Observation, bool, usize) {
    let mut c = Classifier::new();
    for (used, &(dir, offset, bytes)) in chunks.iter().enumerate() {
        if c.is_final() {
            return (c.observation(), true, used);
        }
        c.feed(dir, offset, bytes);
        let _ = c.observation();
    }
    (c.observation(), c.is_final(), chunks.len())
}

/// Feeds everything, ignoring `is_final`.
fn feed_all(chunks: &[Chunk<'_>]) -> Observation {
    let mut c = Classifier::new();
    for &(dir, offset, bytes) in chunks {
        c.feed(dir, offset, bytes);
    }
    c.observation()
}

struct Case {
    name: &'static str,
    want: Observation,
}

fn tls(
    version: &'static str,
    cert: ClientCert,
    server_id: Option<&str>,
    client_id: Option<&str>,
) -> Observation {
    Observation {
        state: if cert == ClientCert::Sent {
            WireState::Mtls
        } else {
            WireState::Tls
        },
        protocol: Some("tls"),
        tls_version: Some(version),
        sni: Some("backend.demo.local".into()),
        alpn: vec!["h2".into(), "http/1.1".into()],
        client_cert: cert,
        client_cert_inferred: version == "TLS1.3"
            && matches!(cert, ClientCert::Sent | ClientCert::NotSent),
        server_spiffe_id: server_id.map(str::to_owned),
        client_spiffe_id: client_id.map(str::to_owned),
        ..Observation::default()
    }
}

fn plaintext(protocol: &'static str) -> Observation {
    Observation {
        state: WireState::Plaintext,
        protocol: Some(protocol),
        ..Observation::default()
    }
}

fn cases() -> Vec<Case> {
    use ClientCert::*;
    let mut cases = Vec::new();
    for (prefix, _key) in [("tls12", "ec"), ("tls12_rsa", "rsa")] {
        let name = |s: &str| -> &'static str { format!("{prefix}_{s}").leak() };
        cases.push(Case {
            name: name("nocert"),
            want: tls("TLS1.2", NotSent, Some(BACKEND), None),
        });
        cases.push(Case {
            name: name("cert"),
            want: tls("TLS1.2", Sent, Some(BACKEND), Some(FRONTEND)),
        });
        cases.push(Case {
            name: name("nocert_requested"),
            want: tls("TLS1.2", NotSent, Some(BACKEND), None),
        });
    }
    cases.push(Case {
        name: "tls12_other_server_cert",
        want: tls("TLS1.2", Sent, Some(OTHER), Some(FRONTEND)),
    });
    cases.push(Case {
        name: "tls12_resumed",
        want: Observation {
            resumed: true,
            ..tls("TLS1.2", Unobservable, None, None)
        },
    });
    // TLS 1.3: certificates are encrypted, the client certificate is inferred.
    for prefix in ["tls13", "tls13_rsa", "tls13_aes128"] {
        let name = |s: &str| -> &'static str { format!("{prefix}_{s}").leak() };
        cases.push(Case {
            name: name("nocert"),
            want: tls("TLS1.3", NotSent, None, None),
        });
        cases.push(Case {
            name: name("cert"),
            want: tls("TLS1.3", Sent, None, None),
        });
        cases.push(Case {
            name: name("nocert_requested"),
            want: tls("TLS1.3", NotSent, None, None),
        });
    }
    cases.push(Case {
        name: "tls13_other_server_cert",
        want: tls("TLS1.3", Sent, None, None),
    });
    cases.push(Case {
        name: "tls13_chacha_cert",
        want: tls("TLS1.3", Sent, None, None),
    });
    cases.push(Case {
        name: "tls13_chacha_nocert_requested",
        want: tls("TLS1.3", NotSent, None, None),
    });
    cases.push(Case {
        name: "tls13_hrr_cert",
        want: tls("TLS1.3", Sent, None, None),
    });
    cases.push(Case {
        name: "tls13_resumed",
        want: Observation {
            resumed: true,
            psk_offered: true,
            ..tls("TLS1.3", Unobservable, None, None)
        },
    });
    cases.push(Case {
        name: "http",
        want: plaintext("http"),
    });
    cases.push(Case {
        name: "postgresql",
        want: plaintext("postgresql"),
    });
    cases
}

/// The expected observation from one socket's point of view.
fn from_view(want: &Observation, client_view: bool) -> Observation {
    let mut want = want.clone();
    if want.state != WireState::Plaintext {
        want.this_socket_is_tls_client = Some(client_view);
    }
    want
}

#[test]
fn fixture_matrix_from_both_sockets() {
    let mut failures = Vec::new();
    let mut total = 0;
    for case in cases() {
        let f = load(case.name);
        assert!(f.c2s.len() <= CAPTURE_BUDGET && f.s2c.len() <= CAPTURE_BUDGET);
        for client_view in [true, false] {
            total += 1;
            let view = if client_view {
                "client socket"
            } else {
                "server socket"
            };
            let want = from_view(&case.want, client_view);
            let chunks = chunks(&f, client_view, CHUNK);
            let (got, fin, used) = replay(&chunks);
            if got != want || !fin {
                failures.push(format!(
                    "{} ({view}): final={fin} after {used}/{} chunks\n  want {want:?}\n  got  {got:?}",
                    case.name,
                    chunks.len()
                ));
                continue;
            }
            // Feeding the rest regardless (the classifier ignores it once
            // final; src/tests.rs checks without that freeze) changes nothing.
            let all = feed_all(&chunks);
            if all != want {
                failures.push(format!(
                    "{} ({view}): changed after is_final: {all:?}",
                    case.name
                ));
            }
        }
    }
    eprintln!(
        "fixture matrix: {}/{} classified right",
        total - failures.len(),
        total
    );
    assert!(
        failures.is_empty(),
        "{} of {total} wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The outcome does not depend on how the directions interleave or how the
/// kernel cuts chunks: one direction entirely first, or one byte at a time.
#[test]
fn fixture_matrix_in_other_orders() {
    for case in cases() {
        let f = load(case.name);
        for client_view in [true, false] {
            let want = from_view(&case.want, client_view);
            let realistic = chunks(&f, client_view, CHUNK);
            let out_first: Vec<_> = realistic
                .iter()
                .filter(|c| c.0 == Dir::Out)
                .chain(realistic.iter().filter(|c| c.0 == Dir::In))
                .copied()
                .collect();
            let in_first: Vec<_> = realistic
                .iter()
                .filter(|c| c.0 == Dir::In)
                .chain(realistic.iter().filter(|c| c.0 == Dir::Out))
                .copied()
                .collect();
            let bytewise = chunks(&f, client_view, 1);
            for (how, order) in [
                ("out first", &out_first),
                ("in first", &in_first),
                ("1-byte chunks", &bytewise),
            ] {
                assert_eq!(
                    feed_all(order),
                    want,
                    "{} client_view={client_view} {how}",
                    case.name
                );
            }
            // The agent's way (stop at is_final) with 1-byte chunks too.
            let (got, fin, _) = replay(&bytewise);
            assert!(
                fin && got == want,
                "{} client_view={client_view} bytewise replay: final={fin} {got:?}",
                case.name
            );
        }
    }
}

/// Losing the client's direction after its hello leaves TLS 1.3 undecided
/// rather than guessed, and says so with is_final once both sides are gone.
#[test]
fn gap_in_client_direction_leaves_client_cert_unknown() {
    let f = load("tls13_cert");
    let mut c = Classifier::new();
    let hello_len = f.order[0].1;
    c.feed(Dir::Out, 0, &f.c2s[..hello_len]);
    c.feed(Dir::In, 0, &f.s2c);
    // The client's second flight arrives after a lost chunk.
    c.feed(Dir::Out, (hello_len + 10) as u32, &f.c2s[hello_len + 10..]);
    let o = c.observation();
    assert_eq!(
        (o.state, o.client_cert, o.tls_version),
        (WireState::Tls, ClientCert::Unknown, Some("TLS1.3"))
    );
    assert!(
        c.is_final(),
        "client direction gone, TLS 1.3: nothing more can decide"
    );
}
