//! Encryption of each connection, from its first payload bytes. In: the
//! kernel's payload chunks, per socket; out: the `encryption` object of that
//! socket's flow events. A socket's handshake is classified by
//! `flowaudit-wire` until the answer is final; then only the small answer is
//! kept (never the bytes), until the socket's CLOSE or FAILED event.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use flowaudit_policy::EncryptionState;
use flowaudit_wire::{Classifier, ClientCert, Dir, Observation, WireState};

use crate::capture::record::{CookieMap, PayloadChunk};
use crate::flow::{ClientCertificate, Encryption, UnknownReason};

/// Sockets followed at once at most; beyond that new ones stay UNKNOWN
/// (counted). The default of `--payload-sockets`, the kernel's limit.
const MAX_SOCKETS: usize = flowaudit_common::SOCKETS_MAX as usize;

/// Distinct answers kept for sharing at most (they are few: plaintext per
/// protocol, TLS per version, SNI and peer identities).
const MAX_SHARED: usize = 4096;

enum Entry {
    /// Still classifying: the handshake so far (bounded by the wire crate).
    Open(Box<Classifier>),
    /// The answer, final; shared between the many sockets that have the
    /// same one, so an open connection costs a map slot and a pointer.
    Settled(Arc<Encryption>),
}

#[derive(Default)]
pub struct EncryptionTracker {
    sockets: CookieMap<Entry>,
    answers: Answers,
    /// Sockets not followed because `MAX_SOCKETS` were.
    pub overflow: u64,
}

/// The answers given so far, shared between the sockets that have them.
#[derive(Default)]
struct Answers {
    shared: HashMap<Encryption, Arc<Encryption>>,
    /// Plaintext answers by protocol: most connections, found without
    /// building, hashing and comparing a whole answer.
    plaintext: Vec<(Option<&'static str>, Arc<Encryption>)>,
    /// UNKNOWN with each reason, for sockets nothing was seen of.
    nothing_seen: [Option<Arc<Encryption>>; UnknownReason::ALL.len()],
}

impl Answers {
    /// Feeds `chunk` to its socket's classifier `c`: the socket's answer
    /// if that made it final.
    fn after(&mut self, c: &mut Classifier, chunk: &PayloadChunk) -> Option<Arc<Encryption>> {
        if let Some(reason) = chunk.mark {
            // The kernel stopped following the stream: what is known now
            // is all there will be, with the reason for what is missing.
            return Some(self.share(with_reason(encryption_of(&c.observation()), reason)));
        }
        let dir = if chunk.outbound { Dir::Out } else { Dir::In };
        c.feed(dir, chunk.offset, &chunk.data);
        // The kernel sends nothing more once a connection opened with
        // anything but a TLS handshake record: plaintext is final here.
        let o = c.observation();
        if o.state == WireState::Plaintext {
            return Some(self.plaintext(&o));
        }
        c.is_final().then(|| self.share(encryption_of(&o)))
    }

    /// The one shared copy of an answer.
    fn share(&mut self, e: Encryption) -> Arc<Encryption> {
        if let Some(a) = self.shared.get(&e) {
            return a.clone();
        }
        let a = Arc::new(e);
        if self.shared.len() < MAX_SHARED {
            self.shared.insert((*a).clone(), a.clone());
        }
        a
    }

    /// The shared answer for plaintext `o`: by its protocol alone when that
    /// is all it says (a plaintext observation carries no TLS facts), else
    /// as any other answer.
    fn plaintext(&mut self, o: &Observation) -> Arc<Encryption> {
        let only_protocol = o.tls_version.is_none()
            && o.sni.is_none()
            && o.alpn.is_empty()
            && o.client_cert == ClientCert::Unknown
            && !o.client_cert_inferred
            && o.server_spiffe_id.is_none()
            && o.client_spiffe_id.is_none();
        if !only_protocol {
            return self.share(encryption_of(o));
        }
        if let Some((_, a)) = self.plaintext.iter().find(|(p, _)| *p == o.protocol) {
            return a.clone();
        }
        let a = self.share(encryption_of(o));
        if self.plaintext.len() < 64 {
            self.plaintext.push((o.protocol, a.clone()));
        }
        a
    }

    /// UNKNOWN with `reason`, for a socket nothing was seen of: one shared
    /// answer per reason.
    fn nothing_seen(&mut self, reason: UnknownReason) -> Arc<Encryption> {
        if let Some(a) = &self.nothing_seen[reason as usize] {
            return a.clone();
        }
        let a = self.share(with_reason(Encryption::default(), reason));
        self.nothing_seen[reason as usize] = Some(a.clone());
        a
    }
}

impl EncryptionTracker {
    /// Feeds one chunk of a socket's payload; true when this chunk made
    /// the socket's answer final.
    pub fn on_chunk(&mut self, chunk: &PayloadChunk) -> bool {
        if let Some(entry) = self.sockets.get_mut(&chunk.sock_cookie) {
            // Already final: later bytes change nothing.
            let Entry::Open(c) = entry else {
                return false;
            };
            let Some(answer) = self.answers.after(c, chunk) else {
                return false;
            };
            *entry = Entry::Settled(answer);
            return true;
        }
        if self.sockets.len() >= MAX_SOCKETS {
            self.overflow += 1;
            return false;
        }
        // The socket's first chunk is classified on the stack: most (a
        // plaintext opening, a mark) settle with it, and only a handshake
        // still going on is kept, boxed.
        let mut c = Classifier::default();
        let (entry, settled) = match self.answers.after(&mut c, chunk) {
            Some(answer) => (Entry::Settled(answer), true),
            None => (Entry::Open(Box::new(c)), false),
        };
        self.sockets.insert(chunk.sock_cookie, entry);
        settled
    }

    /// The kernel says the socket's payload was not (fully) captured:
    /// settles an unfinished answer with that reason. A final answer stays.
    pub fn mark(&mut self, cookie: u64, reason: UnknownReason) {
        let answer = match self.sockets.get(&cookie) {
            Some(Entry::Settled(_)) => return,
            Some(Entry::Open(c)) => self
                .answers
                .share(with_reason(encryption_of(&c.observation()), reason)),
            None if self.sockets.len() >= MAX_SOCKETS => return,
            None => self.answers.nothing_seen(reason),
        };
        self.sockets.insert(cookie, Entry::Settled(answer));
    }

    /// Whether any payload of the socket was seen, or its answer given.
    pub fn knows(&self, cookie: u64) -> bool {
        self.sockets.contains_key(&cookie)
    }

    /// Whether the socket's answer is final (nothing more will change it).
    pub fn is_settled(&self, cookie: u64) -> bool {
        matches!(self.sockets.get(&cookie), Some(Entry::Settled(_)))
    }

    /// What is known about the socket now (UNKNOWN, with the reason
    /// `no_payload_seen`, if nothing): a shared answer, copied by pointer.
    pub fn current(&self, cookie: u64) -> Arc<Encryption> {
        match self.sockets.get(&cookie) {
            Some(Entry::Settled(e)) => e.clone(),
            Some(Entry::Open(c)) => Arc::new(with_reason(
                encryption_of(&c.observation()),
                UnknownReason::NoPayloadSeen,
            )),
            None => NO_PAYLOAD_SEEN.clone(),
        }
    }

    /// The socket is gone: forget it.
    pub fn forget(&mut self, cookie: u64) {
        self.sockets.remove(&cookie);
    }

    /// Sockets followed now.
    #[cfg(test)]
    pub(crate) fn followed(&self) -> usize {
        self.sockets.len()
    }
}

static NOT_SEEN_YET: LazyLock<Arc<Encryption>> = LazyLock::new(Arc::default);
static NO_PAYLOAD_SEEN: LazyLock<Arc<Encryption>> = LazyLock::new(|| {
    Arc::new(with_reason(
        Encryption::default(),
        UnknownReason::NoPayloadSeen,
    ))
});

/// The answer of a flow event before the pipeline asks the tracker
/// (UNKNOWN, no reason yet): one shared copy.
pub fn not_seen_yet() -> Arc<Encryption> {
    NOT_SEEN_YET.clone()
}

/// Attaches `reason` where something could not be seen: the encryption
/// itself (UNKNOWN), or a TLS client certificate left undecided.
fn with_reason(mut e: Encryption, reason: UnknownReason) -> Encryption {
    let undecided = match e.state {
        EncryptionState::Unknown => true,
        EncryptionState::Tls => e.client_certificate == ClientCertificate::Unknown,
        EncryptionState::Plaintext | EncryptionState::Mtls => false,
    };
    if undecided {
        e.unknown_reason = Some(reason);
    }
    e
}

/// The event form of an observation.
pub fn encryption_of(o: &Observation) -> Encryption {
    Encryption {
        state: match o.state {
            WireState::Unknown => EncryptionState::Unknown,
            WireState::Plaintext => EncryptionState::Plaintext,
            WireState::Tls => EncryptionState::Tls,
            WireState::Mtls => EncryptionState::Mtls,
        },
        tls_version: o.tls_version.unwrap_or_default().to_owned(),
        sni: o.sni.clone().unwrap_or_default(),
        alpn: o.alpn.clone(),
        protocol: o.protocol.unwrap_or_default().to_owned(),
        client_certificate: match o.client_cert {
            ClientCert::Unknown => ClientCertificate::Unknown,
            ClientCert::Sent => ClientCertificate::Sent,
            ClientCert::NotSent => ClientCertificate::NotSent,
            ClientCert::Unobservable => ClientCertificate::Unobservable,
        },
        client_certificate_inferred: o.client_cert_inferred,
        server_spiffe_id: o.server_spiffe_id.clone().unwrap_or_default(),
        client_spiffe_id: o.client_spiffe_id.clone().unwrap_or_default(),
        unknown_reason: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(cookie: u64, outbound: bool, offset: u32, data: &[u8]) -> PayloadChunk {
        PayloadChunk {
            sock_cookie: cookie,
            outbound,
            offset,
            data: data.into(),
            mark: None,
        }
    }

    /// Plaintext answers are found by protocol, shared, and equal to what
    /// the general path builds.
    #[test]
    fn plaintext_answers_are_shared_by_protocol() {
        let mut t = EncryptionTracker::default();
        let http = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n";
        for cookie in [1, 2] {
            assert!(
                t.on_chunk(&chunk(cookie, true, 0, http)),
                "plaintext is final"
            );
        }
        let (a, b) = (t.current(1), t.current(2));
        assert!(Arc::ptr_eq(&a, &b), "one shared copy");
        let mut c = Classifier::default();
        c.feed(Dir::Out, 0, http);
        assert_eq!(
            *a,
            encryption_of(&c.observation()),
            "as the general path says"
        );
        assert_eq!(a.state, EncryptionState::Plaintext);
        assert_eq!(a.protocol, "http");
        assert_eq!(a.unknown_reason, None);
        assert!(t.on_chunk(&chunk(3, true, 0, b"SSH-2.0-OpenSSH_9.2\r\n")));
        assert_eq!(
            t.current(3).protocol,
            "ssh",
            "another protocol, another answer"
        );
        assert!(Arc::ptr_eq(&t.current(1), &a), "http's copy is unchanged");
    }

    #[test]
    fn unknown_always_carries_its_reason() {
        let mut t = EncryptionTracker::default();
        // Nothing seen at all.
        let e = t.current(5);
        assert_eq!(
            (e.state, e.unknown_reason),
            (EncryptionState::Unknown, Some(UnknownReason::NoPayloadSeen))
        );
        // A gap before anything could be classified settles at once.
        let gap = PayloadChunk {
            mark: Some(UnknownReason::StreamGap),
            ..chunk(5, false, 0, &[])
        };
        assert!(t.on_chunk(&gap), "a gap must settle the answer at once");
        assert_eq!(t.current(5).unknown_reason, Some(UnknownReason::StreamGap));
        // The kernel never watched this one (map full).
        t.mark(6, UnknownReason::NotWatched);
        assert!(t.is_settled(6));
        assert_eq!(t.current(6).unknown_reason, Some(UnknownReason::NotWatched));
        // A half-seen TLS handshake keeps what it saw, with the reason for
        // the undecided client certificate.
        t.on_chunk(&chunk(
            7,
            true,
            0,
            &[0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00],
        ));
        t.mark(7, UnknownReason::PayloadLost);
        let e = t.current(7);
        assert_eq!(e.unknown_reason, Some(UnknownReason::PayloadLost));
        // A final answer is not changed by a later loss.
        t.on_chunk(&chunk(8, true, 0, b"GET / HTTP/1.1\r\n\r\n"));
        t.mark(8, UnknownReason::PayloadLost);
        let e = t.current(8);
        assert_eq!(
            (e.state, e.unknown_reason),
            (EncryptionState::Plaintext, None)
        );
    }

    #[test]
    fn plaintext_settles_at_once_and_is_forgotten_at_close() {
        let mut t = EncryptionTracker::default();
        assert_eq!(t.current(1).state, EncryptionState::Unknown);
        assert!(!t.is_settled(1));
        t.on_chunk(&chunk(
            1,
            true,
            0,
            b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n",
        ));
        assert!(t.is_settled(1));
        let e = t.current(1);
        assert_eq!(e.state, EncryptionState::Plaintext);
        assert_eq!(e.protocol, "http");
        t.forget(1);
        assert_eq!(t.followed(), 0);
        assert_eq!(t.current(1).state, EncryptionState::Unknown);
    }

    #[test]
    fn a_client_hello_alone_is_not_final() {
        let mut t = EncryptionTracker::default();
        // A TLS 1.2 handshake record header and the start of a ClientHello.
        t.on_chunk(&chunk(
            2,
            true,
            0,
            &[0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00],
        ));
        assert!(!t.is_settled(2));
        assert_eq!(t.followed(), 1);
    }
}
