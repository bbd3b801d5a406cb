//! Edge cases of the stream parser: truncation at every length, gaps,
//! overlapping chunks, garbage after 0x16, records split at every byte, the
//! memory bound, and hand-built hellos for paths OpenSSL does not take.

use super::*;

const TLS13_CERT_C2S: &[u8] = include_bytes!("../tests/fixtures/tls13_cert.c2s");
const TLS13_CERT_S2C: &[u8] = include_bytes!("../tests/fixtures/tls13_cert.s2c");
const TLS12_CERT_C2S: &[u8] = include_bytes!("../tests/fixtures/tls12_cert.c2s");
const TLS12_CERT_S2C: &[u8] = include_bytes!("../tests/fixtures/tls12_cert.s2c");

/// The first TLS record of a stream (a hello), header included.
fn first_record(stream: &[u8]) -> &[u8] {
    let len = usize::from(u16::from_be_bytes([stream[3], stream[4]]));
    &stream[..5 + len]
}

fn feed_all(c: &mut Classifier, dir: Dir, bytes: &[u8]) {
    c.feed(dir, 0, bytes);
}

fn record(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut r = vec![kind, 3, 3];
    r.extend_from_slice(&(body.len() as u16).to_be_bytes());
    r.extend_from_slice(body);
    r
}

fn handshake(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    m.extend_from_slice(body);
    m
}

fn extension(kind: u16, data: &[u8]) -> Vec<u8> {
    let mut e = kind.to_be_bytes().to_vec();
    e.extend_from_slice(&(data.len() as u16).to_be_bytes());
    e.extend_from_slice(data);
    e
}

fn client_hello(extensions: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend([7u8; 32]);
    body.push(0); // session id
    body.extend([0, 2, 0x13, 0x01]); // one cipher suite
    body.extend([1, 0]); // null compression
    let exts = extensions.concat();
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend(exts);
    record(tls::CONTENT_HANDSHAKE, &handshake(tls::CLIENT_HELLO, &body))
}

fn server_hello(cipher: u16, extensions: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend([9u8; 32]);
    body.push(0);
    body.extend(cipher.to_be_bytes());
    body.push(0);
    let exts = extensions.concat();
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend(exts);
    record(tls::CONTENT_HANDSHAKE, &handshake(tls::SERVER_HELLO, &body))
}

fn sni(name: &str) -> Vec<u8> {
    let mut entry = vec![0];
    entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
    entry.extend_from_slice(name.as_bytes());
    let mut list = (entry.len() as u16).to_be_bytes().to_vec();
    list.extend(entry);
    extension(0, &list)
}

fn tls13_selected() -> Vec<u8> {
    extension(43, &[3, 4])
}

fn offers_tls13() -> Vec<u8> {
    extension(43, &[2, 3, 4])
}

/// A small deterministic generator: tests stay reproducible without a crate.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn truncated_client_hello_never_claims_more_than_seen() {
    let hello = first_record(TLS13_CERT_C2S);
    let mut whole = Classifier::new();
    feed_all(&mut whole, Dir::Out, hello);
    let truth = whole.observation();
    assert_eq!(truth.state, WireState::Tls);
    assert_eq!(truth.sni.as_deref(), Some("backend.demo.local"));

    for n in 0..hello.len() {
        let mut c = Classifier::new();
        c.feed(Dir::Out, 0, &hello[..n]);
        let o = c.observation();
        assert_eq!(
            o,
            Observation::default(),
            "prefix {n}: an unfinished hello is Unknown"
        );
        assert!(!c.is_final(), "prefix {n}");

        // The rest is lost (gap): what was fully seen may be kept, nothing else.
        c.feed(Dir::Out, n as u32 + 1, b"x");
        let o = c.observation();
        assert!(
            matches!(o.state, WireState::Unknown | WireState::Tls),
            "prefix {n}: {o:?}"
        );
        assert!(o.sni.is_none() || o.sni == truth.sni, "prefix {n}: {o:?}");
        assert!(
            o.alpn.is_empty() || o.alpn == truth.alpn,
            "prefix {n}: {o:?}"
        );
        assert_eq!(o.client_cert, ClientCert::Unknown, "prefix {n}");
        if n < 5 + 4 + tls::MIN_HELLO_BODY {
            assert_eq!(
                o.state,
                WireState::Unknown,
                "prefix {n}: too short to be a hello"
            );
        }
    }
}

#[test]
fn truncated_server_hello_has_no_version() {
    let client = first_record(TLS13_CERT_C2S);
    let hello = first_record(TLS13_CERT_S2C);
    for n in 0..hello.len() {
        for gap in [false, true] {
            let mut c = Classifier::new();
            c.feed(Dir::Out, 0, client);
            c.feed(Dir::In, 0, &hello[..n]);
            if gap {
                c.feed(Dir::In, n as u32 + 7, b"x");
            }
            let o = c.observation();
            assert_eq!(o.tls_version, None, "prefix {n}, gap {gap}");
            assert_eq!(o.client_cert, ClientCert::Unknown, "prefix {n}, gap {gap}");
        }
    }
}

#[test]
fn records_split_at_every_byte() {
    let streams = [
        ("tls12_cert", TLS12_CERT_C2S, TLS12_CERT_S2C),
        ("tls13_cert", TLS13_CERT_C2S, TLS13_CERT_S2C),
    ];
    for (name, c2s, s2c) in streams {
        let mut whole = Classifier::new();
        whole.feed(Dir::Out, 0, c2s);
        whole.feed(Dir::In, 0, s2c);
        let want = whole.observation();
        assert_eq!(want.state, WireState::Mtls, "{name}");
        for at in 0..=c2s.len() {
            let mut c = Classifier::new();
            c.feed(Dir::Out, 0, &c2s[..at]);
            c.feed(Dir::In, 0, s2c);
            c.feed(Dir::Out, at as u32, &c2s[at..]);
            assert_eq!(c.observation(), want, "{name}: client stream split at {at}");
        }
        for at in (0..=s2c.len()).step_by(3) {
            let mut c = Classifier::new();
            c.feed(Dir::In, 0, &s2c[..at]);
            c.feed(Dir::Out, 0, c2s);
            c.feed(Dir::In, at as u32, &s2c[at..]);
            assert_eq!(c.observation(), want, "{name}: server stream split at {at}");
        }
    }
}

#[test]
fn overlapping_and_repeated_chunks_are_harmless() {
    let mut c = Classifier::new();
    c.feed(Dir::Out, 0, &TLS12_CERT_C2S[..300]);
    c.feed(Dir::Out, 0, &TLS12_CERT_C2S[..100]); // repeated
    c.feed(Dir::Out, 250, &TLS12_CERT_C2S[250..]); // overlapping
    c.feed(Dir::In, 0, TLS12_CERT_S2C);
    let o = c.observation();
    assert_eq!(
        (o.state, o.client_spiffe_id.as_deref()),
        (
            WireState::Mtls,
            Some("spiffe://demo.local/ns/99-apps/sa/frontend")
        )
    );
}

#[test]
fn gap_in_server_direction_keeps_what_was_learned() {
    // TLS 1.2: lose the server flight after its ServerHello; the client's
    // own Certificate message still decides.
    let server_hello = first_record(TLS12_CERT_S2C);
    let mut c = Classifier::new();
    c.feed(Dir::Out, 0, TLS12_CERT_C2S);
    c.feed(Dir::In, 0, server_hello);
    c.feed(
        Dir::In,
        server_hello.len() as u32 + 100,
        &TLS12_CERT_S2C[server_hello.len() + 100..],
    );
    let o = c.observation();
    assert_eq!(
        (o.state, o.tls_version, o.client_cert),
        (WireState::Mtls, Some("TLS1.2"), ClientCert::Sent)
    );
    assert_eq!(
        o.server_spiffe_id, None,
        "the server certificate was in the gap"
    );
    assert!(c.is_final());
    // Further chunks of a stopped direction are ignored.
    c.feed(Dir::In, 0, TLS12_CERT_S2C);
    assert_eq!(c.observation().server_spiffe_id, None);
}

#[test]
fn gap_at_the_start_is_unknown_then_final() {
    let mut c = Classifier::new();
    c.feed(Dir::Out, 10, b"GET / HTTP/1.1\r\n");
    assert_eq!(c.observation(), Observation::default());
    assert!(!c.is_final());
    c.feed(Dir::In, 3, b"xx");
    assert!(c.is_final(), "both directions lost: nothing more to learn");
}

#[test]
fn garbage_after_0x16_is_never_tls() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for round in 0..20_000 {
        let len = (rng.next() % 80) as usize;
        let mut bytes = vec![0x16];
        // Half the rounds keep a valid record header so the handshake layer gets garbage.
        if round % 2 == 0 {
            bytes.extend([3, (rng.next() % 5) as u8, 0, len as u8]);
        }
        bytes.extend(rng.bytes(len));
        let mut c = Classifier::new();
        c.feed(Dir::Out, 0, &bytes);
        let o = c.observation();
        assert!(
            matches!(o.state, WireState::Unknown | WireState::Plaintext),
            "{bytes:02x?}: {o:?}"
        );
        if o.state == WireState::Plaintext {
            assert_eq!(o.protocol, None);
            // Once the other direction is gone too, nothing can change.
            c.feed(Dir::In, 1, b"x");
            assert!(c.is_final(), "{bytes:02x?}");
        }
    }
    // A well-framed record whose handshake message is not a hello: not TLS,
    // unless the peer's direction still brings a hello.
    let mut c = Classifier::new();
    let not_a_hello = record(tls::CONTENT_HANDSHAKE, &handshake(9, &[0; 40]));
    c.feed(Dir::Out, 0, &not_a_hello);
    assert_eq!(c.observation().state, WireState::Plaintext);
    assert!(!c.is_final());
    c.feed(Dir::In, 0, &record(tls::CONTENT_ALERT, &[2, 10]));
    assert_eq!(c.observation().state, WireState::Plaintext);
    assert!(
        c.is_final(),
        "a direction opening with an alert brings no hello"
    );
    // 0x16 then no TLS version.
    let mut c = Classifier::new();
    c.feed(Dir::Out, 0, &[0x16, 0x00, 0x01, 0x02, 0x03, 0x04]);
    assert_eq!(c.observation().state, WireState::Plaintext);
}

#[test]
fn random_chunks_never_panic_and_stay_bounded() {
    let mut rng = XorShift(42);
    for _ in 0..3_000 {
        let mut c = Classifier::new();
        let mut offsets = [0u32; 2];
        for _ in 0..(rng.next() % 12) {
            let d = (rng.next() % 2) as usize;
            let dir = if d == 0 { Dir::Out } else { Dir::In };
            let len = (rng.next() % 1100) as usize;
            let mut bytes = rng.bytes(len);
            if offsets[d] == 0 && !bytes.is_empty() && rng.next().is_multiple_of(2) {
                bytes[0] = 0x16;
            }
            let offset = match rng.next() % 8 {
                0 => rng.next() as u32,
                1 => offsets[d].saturating_sub(3),
                _ => offsets[d],
            };
            c.feed(dir, offset, &bytes);
            offsets[d] = offset.saturating_add(len as u32);
            let _ = (c.observation(), c.is_final());
            for side in [&c.out, &c.inn] {
                assert!(side.handshake.len() <= CAPTURE_BUDGET);
                assert!(side.next as usize <= CAPTURE_BUDGET);
            }
        }
    }
}

#[test]
fn budget_bounds_a_huge_certificate() {
    let mut c = Classifier::new();
    c.feed(Dir::Out, 0, first_record(TLS12_CERT_C2S));
    let sh = server_hello(0xC02B, &[]);
    c.feed(Dir::In, 0, &sh);
    // A Certificate message declaring 16 MiB, fed in 1 KiB records.
    let mut offset = sh.len();
    let mut first = vec![tls::CERTIFICATE, 0xFF, 0xFF, 0xF0, 0xFF, 0xFF, 0xEC];
    first.resize(1000, 0xAB);
    let mut body = first;
    for _ in 0..8 {
        let rec = record(tls::CONTENT_HANDSHAKE, &body);
        c.feed(Dir::In, offset as u32, &rec);
        offset += rec.len();
        body = vec![0xAB; 1000];
        assert!(c.inn.handshake.len() <= CAPTURE_BUDGET);
    }
    assert_eq!(c.inn.stop, Some(Stop::Budget));
    assert!(
        c.inn.handshake.capacity() == 0,
        "a stopped direction keeps no buffer"
    );
    let o = c.observation();
    assert_eq!(
        (o.state, o.tls_version, o.client_cert),
        (WireState::Tls, Some("TLS1.2"), ClientCert::Unknown)
    );
}

#[test]
fn plaintext_openings() {
    let pg_ssl = [0, 0, 0, 8, 0x04, 0xD2, 0x16, 0x2F];
    let cases: [(&[u8], Dir, Option<&str>); 5] = [
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Dir::Out, Some("http2")),
        (b"POST /v1 HTTP/1.1\r\nHost: x\r\n", Dir::In, Some("http")),
        (&pg_ssl, Dir::Out, Some("postgresql")),
        (b"SSH-2.0-OpenSSH_9.6\r\n", Dir::In, Some("ssh")),
        (
            b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10 sslv2 hello",
            Dir::Out,
            None,
        ),
    ];
    for (bytes, dir, protocol) in cases {
        let mut c = Classifier::new();
        c.feed(dir, 0, bytes);
        let o = c.observation();
        assert_eq!(
            (o.state, o.protocol),
            (WireState::Plaintext, protocol),
            "{bytes:?}"
        );
        assert!(c.is_final());
    }
    // A plaintext opening cut before the protocol can be named waits for more.
    let mut c = Classifier::new();
    c.feed(Dir::Out, 0, b"GE");
    assert!(!c.is_final());
    c.feed(Dir::Out, 2, b"T / HTTP/1.1\r\n");
    assert_eq!(c.observation().protocol, Some("http"));
    assert!(c.is_final());
}

#[test]
fn tls_client_answered_in_plaintext_is_plaintext() {
    let mut c = Classifier::new();
    c.feed(Dir::Out, 0, first_record(TLS13_CERT_C2S));
    c.feed(Dir::In, 0, b"HTTP/1.1 400 Bad Request\r\n\r\n");
    let o = c.observation();
    assert_eq!((o.state, o.protocol), (WireState::Plaintext, Some("http")));
    assert!(c.is_final());
}

#[test]
fn fatal_alert_ends_the_handshake() {
    let mut c = Classifier::new();
    c.feed(Dir::In, 0, first_record(TLS13_CERT_C2S));
    assert!(!c.is_final());
    c.feed(Dir::Out, 0, &record(tls::CONTENT_ALERT, &[2, 40]));
    let o = c.observation();
    assert_eq!(
        (o.state, o.alert, o.this_socket_is_tls_client),
        (WireState::Tls, Some(40), Some(false))
    );
    assert!(c.is_final());
}

#[test]
fn tls13_early_data_or_psk_is_unobservable() {
    let finished = record(tls::CONTENT_APPLICATION_DATA, &[0; 53]);
    for (exts, sh_exts, want_resumed) in [
        (
            vec![offers_tls13(), extension(42, &[])],
            vec![tls13_selected()],
            false,
        ),
        (
            vec![offers_tls13(), extension(41, &[0; 8])],
            vec![tls13_selected(), extension(41, &[0, 0])],
            true,
        ),
    ] {
        let mut c = Classifier::new();
        let ch = client_hello(&exts);
        c.feed(Dir::Out, 0, &ch);
        c.feed(Dir::Out, ch.len() as u32, &finished);
        c.feed(Dir::In, 0, &server_hello(0x1301, &sh_exts));
        let o = c.observation();
        assert_eq!(
            (o.client_cert, o.client_cert_inferred, o.resumed),
            (ClientCert::Unobservable, false, want_resumed)
        );
        assert!(c.is_final());
    }
    // The same without either: the 53-byte Finished means no certificate.
    let mut c = Classifier::new();
    let ch = client_hello(&[offers_tls13(), sni("db.internal")]);
    c.feed(Dir::Out, 0, &ch);
    c.feed(Dir::Out, ch.len() as u32, &finished);
    c.feed(Dir::In, 0, &server_hello(0x1301, &[tls13_selected()]));
    let o = c.observation();
    assert_eq!(
        (o.client_cert, o.client_cert_inferred, o.sni.as_deref()),
        (ClientCert::NotSent, true, Some("db.internal"))
    );
}

#[test]
fn tls12_abbreviated_handshake_is_resumed() {
    let mut c = Classifier::new();
    c.feed(Dir::Out, 0, &client_hello(&[sni("a")]));
    let mut server = server_hello(0xC02F, &[]);
    server.extend(record(tls::CONTENT_CHANGE_CIPHER_SPEC, &[1]));
    c.feed(Dir::In, 0, &server);
    let o = c.observation();
    assert_eq!(
        (o.tls_version, o.client_cert, o.resumed),
        (Some("TLS1.2"), ClientCert::Unobservable, true)
    );
    assert!(c.is_final());
}

#[test]
fn huge_offsets_do_not_overflow() {
    let mut c = Classifier::new();
    c.feed(Dir::Out, u32::MAX, &[0x16; 10]);
    c.feed(Dir::In, 0, &[0x16, 3, 3]);
    c.feed(Dir::In, u32::MAX - 1, &[0; 5]);
    let _ = c.observation();
    assert!(c.is_final());
}

/// `is_final` is honest on every recorded handshake: with the freeze
/// bypassed, the rest of the capture does not change a final observation.
#[test]
fn is_final_is_honest_on_fixtures() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures directory")
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .into_string()
                .ok()?
                .strip_suffix(".order")
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 20, "fixtures found: {names:?}");
    for name in names {
        let read = |ext: &str| std::fs::read(dir.join(format!("{name}.{ext}"))).expect("fixture");
        let (c2s, s2c, order) = (read("c2s"), read("s2c"), read("order"));
        for client_view in [true, false] {
            let mut c = Classifier::new();
            let mut at_final = None;
            let (mut pos_c, mut pos_s) = (0usize, 0usize);
            for line in std::str::from_utf8(&order).expect("ascii").lines() {
                let (d, len) = line.split_once(' ').expect("order line");
                let len: usize = len.parse().expect("length");
                let to_server = d == "c2s";
                let (stream, pos) = if to_server {
                    (&c2s, &mut pos_c)
                } else {
                    (&s2c, &mut pos_s)
                };
                let dir = if to_server == client_view {
                    Dir::Out
                } else {
                    Dir::In
                };
                for (i, piece) in stream[*pos..*pos + len].chunks(1024).enumerate() {
                    c.feed_unfrozen(dir, (*pos + i * 1024) as u32, piece);
                    if at_final.is_none() && c.is_final() {
                        at_final = Some(c.observation());
                    }
                }
                *pos += len;
            }
            let at_final = at_final
                .unwrap_or_else(|| panic!("{name} (client view {client_view}) never final"));
            assert_eq!(
                c.observation(),
                at_final,
                "{name} (client view {client_view}) changed after is_final"
            );
        }
    }
}

#[test]
fn unknown_tls13_like_versions_are_not_inferred() {
    for version in [[0x7f, 0x1c], [0x03, 0x05]] {
        let mut c = Classifier::new();
        let ch = client_hello(&[offers_tls13()]);
        c.feed(Dir::Out, 0, &ch);
        c.feed(
            Dir::Out,
            ch.len() as u32,
            &record(tls::CONTENT_APPLICATION_DATA, &[0; 53]),
        );
        c.feed(
            Dir::In,
            0,
            &server_hello(0x1301, &[extension(43, &version)]),
        );
        let o = c.observation();
        assert_eq!(
            (
                o.state,
                o.tls_version,
                o.client_cert,
                o.client_cert_inferred
            ),
            (WireState::Tls, None, ClientCert::Unobservable, false),
            "{version:02x?}"
        );
    }
}

#[test]
fn classifier_stays_small() {
    // Per-socket state in the agent: the inline part is small, and the only
    // heap buffer (handshake reassembly) is freed when a direction stops.
    let size = std::mem::size_of::<Classifier>();
    eprintln!("size_of::<Classifier>() = {size}");
    assert!(size <= 512, "Classifier is {size} bytes");
}
