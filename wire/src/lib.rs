//! What a TCP connection carries on the wire, decided from one socket: the
//! agent feeds the first payload bytes of each direction ([`Dir::Out`] sent,
//! [`Dir::In`] received, at most [`CAPTURE_BUDGET`] bytes each) and reads an
//! [`Observation`] back: plaintext (with a protocol guess), TLS or mutual TLS,
//! with the version, SNI, ALPN, whether the client presented a certificate and
//! the SPIFFE IDs visible in clear. Pure std, bounded memory, never panics.
//!
//! How the client certificate is decided:
//! - TLS <= 1.2: a ServerHelloDone without CertificateRequest means NotSent;
//!   otherwise the client's Certificate message decides (empty list: NotSent),
//!   and a ClientKeyExchange without one means NotSent. An abbreviated
//!   (resumed) handshake shows none of this: Unobservable.
//! - TLS 1.3: everything after ServerHello is encrypted, so the size of the
//!   client's first encrypted record decides (see `tls::infer_client_cert`);
//!   PSK resumption, 0-RTT early data or an unknown cipher suite: Unobservable.
//!
//! Limits, on purpose: a stream whose first byte is not 0x16 is plaintext,
//! so STARTTLS-style upgrades (PostgreSQL SSLRequest, SMTP STARTTLS) and SSLv2
//! compatible hellos are reported as plaintext; bytes that start with 0x16 but
//! do not form a TLS record and hello are plaintext with no protocol, since
//! encryption cannot be claimed for them. TLS 1.3 record padding or
//! post-handshake client authentication defeat the size inference.

#![forbid(unsafe_code)]

mod der;
mod sniff;
mod tls;

use sniff::SNIFF_LEN;
use tls::{ClientHello, ServerHello};

/// Bytes per direction the classifier will ever look at or keep: the kernel
/// side captures no more than this, and a TLS 1.2 server flight with a short
/// certificate chain fits.
pub const CAPTURE_BUDGET: usize = 4096;

/// Largest TLS record (TLSCiphertext: 2^14 plus 2048 bytes of expansion).
const MAX_RECORD: usize = (1 << 14) + 2048;
const RECORD_HEADER: usize = 5;
const HANDSHAKE_HEADER: usize = 4;

/// Which way a chunk went, seen from the socket being classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Bytes this socket sent.
    Out,
    /// Bytes this socket received.
    In,
}

impl Dir {
    /// The other direction.
    pub fn opposite(self) -> Dir {
        match self {
            Dir::Out => Dir::In,
            Dir::In => Dir::Out,
        }
    }
}

/// What the connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WireState {
    /// No payload yet, or not enough to tell.
    #[default]
    Unknown,
    /// Not TLS: some direction did not open with a TLS handshake record.
    Plaintext,
    /// A TLS handshake, without (or not yet known with) a client certificate.
    Tls,
    /// A TLS handshake in which the client presented a certificate.
    Mtls,
}

/// Whether the TLS client presented a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ClientCert {
    /// Not known yet.
    #[default]
    Unknown,
    /// The client sent a non-empty Certificate message.
    Sent,
    /// No CertificateRequest, or the client answered it with an empty Certificate.
    NotSent,
    /// The handshake hides it: TLS 1.3 where the size inference cannot apply
    /// (PSK resumption, early data, unknown suite, unexpected record size),
    /// or a resumed TLS 1.2 session.
    Unobservable,
}

/// The classifier's best current knowledge about a connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observation {
    /// Plaintext, TLS or mutual TLS (Unknown until there is enough to tell).
    pub state: WireState,
    /// Best guess of the protocol: for plaintext "http", "http2" (prior
    /// knowledge preface), "postgresql", "ssh"; "tls" for TLS and mTLS;
    /// None if not recognised.
    pub protocol: Option<&'static str>,
    /// The version chosen in ServerHello ("TLS1.0" .. "TLS1.3", "SSL3.0").
    pub tls_version: Option<&'static str>,
    /// The server name the client asked for (ClientHello server_name).
    pub sni: Option<String>,
    /// Protocols offered by the client.
    pub alpn: Vec<String>,
    /// Whether the TLS client presented a certificate.
    pub client_cert: ClientCert,
    /// True when `client_cert` came from the TLS 1.3 record-size inference.
    pub client_cert_inferred: bool,
    /// The `spiffe://` URI SAN of the server's leaf certificate (TLS <= 1.2).
    pub server_spiffe_id: Option<String>,
    /// The `spiffe://` URI SAN of the client's leaf certificate (TLS <= 1.2).
    pub client_spiffe_id: Option<String>,
    /// Whether the ClientHello went out of (true) or came into (false) this socket.
    pub this_socket_is_tls_client: Option<bool>,
    /// The ClientHello offered a pre-shared key (session resumption).
    pub psk_offered: bool,
    /// The server resumed a session (TLS 1.3 PSK, TLS 1.2 abbreviated handshake).
    pub resumed: bool,
    /// The description code of the first alert seen in clear in either
    /// direction (e.g. 40 handshake_failure, 42 bad_certificate, 116
    /// certificate_required): the handshake most likely failed.
    pub alert: Option<u8>,
}

/// Per-socket classification state: two small stream parsers and the facts
/// they found. At most [`CAPTURE_BUDGET`] bytes per direction are buffered.
#[derive(Debug, Clone, Default)]
pub struct Classifier {
    out: Side,
    inn: Side,
    facts: Facts,
}

/// The TLS role of the peer that writes a direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Client,
    Server,
}

/// How a direction opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Start {
    /// No byte yet.
    #[default]
    Empty,
    /// First byte is a TLS content type, record header not complete yet.
    Pending,
    /// Valid TLS records.
    Record,
    /// Not a TLS record: plaintext.
    NotTls,
    /// TLS records whose first handshake message is not a usable hello.
    Broken,
}

/// Why a direction is no longer read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Gap,
    Budget,
    Corrupt,
}

/// What the body of the current record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Body {
    #[default]
    Opaque,
    Handshake,
    /// A handshake record after ChangeCipherSpec: encrypted (TLS 1.2
    /// Finished) unless its first bytes frame a whole hello (TLS 1.3 sends a
    /// compatibility ChangeCipherSpec before the hellos that follow a
    /// HelloRetryRequest).
    Probe,
    Alert,
    ChangeCipherSpec,
}

/// Stream parser for one direction.
#[derive(Debug, Clone, Default)]
struct Side {
    /// Stream offset of the next byte expected.
    next: u32,
    stop: Option<Stop>,
    start: Start,
    first_byte: Option<u8>,
    sniff: [u8; SNIFF_LEN],
    sniff_len: usize,
    header: [u8; RECORD_HEADER],
    header_len: usize,
    record_len: usize,
    body_left: usize,
    body: Body,
    role: Option<Role>,
    after_change_cipher_spec: bool,
    /// Complete handshake messages read so far.
    messages: u32,
    /// Handshake bytes of the message being reassembled (and any after it).
    handshake: Vec<u8>,
    alert: [u8; 2],
    alert_len: usize,
}

/// Everything learned about the handshake, from either direction.
#[derive(Debug, Clone, Default)]
struct Facts {
    client_dir: Option<Dir>,
    server_dir: Option<Dir>,
    client_hello: Option<ClientHello>,
    /// The latest ServerHello: a HelloRetryRequest until the real one comes.
    server_hello: Option<ServerHello>,
    // TLS <= 1.2 server flight.
    server_leaf_done: bool,
    server_spiffe_id: Option<String>,
    certificate_request: bool,
    server_hello_done: bool,
    server_ccs_before_done: bool,
    // TLS <= 1.2 client flight.
    client_certificate_nonempty: Option<bool>,
    client_leaf_done: bool,
    client_spiffe_id: Option<String>,
    client_key_exchange: bool,
    /// Payload length of the client's first application_data record.
    client_first_encrypted: Option<usize>,
    /// First alert seen in clear: (level, description).
    alert: Option<(u8, u8)>,
}

impl Facts {
    /// The ServerHello that settled the handshake (not a retry request, fully seen).
    fn server_hello(&self) -> Option<&ServerHello> {
        self.server_hello
            .as_ref()
            .filter(|sh| sh.complete && !sh.retry_request)
    }
}

impl Classifier {
    /// A classifier for a new socket: nothing seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one captured chunk of direction `dir` starting at stream `offset`.
    /// A chunk that skips ahead ends that direction (a gap); bytes already
    /// seen are ignored, so retransmitted or overlapping chunks are harmless.
    /// Once [`is_final`](Self::is_final), chunks are ignored: a final
    /// observation never changes, whatever a peer sends next.
    /// Never panics, whatever the bytes.
    pub fn feed(&mut self, dir: Dir, offset: u32, bytes: &[u8]) {
        if !self.is_final() {
            self.feed_unfrozen(dir, offset, bytes);
        }
    }

    /// `feed` without the freeze, so tests can check that `is_final` is honest.
    fn feed_unfrozen(&mut self, dir: Dir, offset: u32, bytes: &[u8]) {
        let side = match dir {
            Dir::Out => &mut self.out,
            Dir::In => &mut self.inn,
        };
        side.feed(dir, offset, bytes, &mut self.facts);
    }

    /// True when nothing more can change the observation.
    pub fn is_final(&self) -> bool {
        let both_stopped = self.out.stop.is_some() && self.inn.stop.is_some();
        let sides = [&self.out, &self.inn];
        match self.state() {
            // Waits only while a plaintext opening is too short to name its
            // protocol (a chunk cut mid-word); the kernel sends it whole.
            WireState::Plaintext if sides.iter().any(|s| s.start == Start::NotTls) => {
                self.plaintext_protocol().is_some()
                    || sides.iter().all(|s| {
                        s.start != Start::NotTls || s.sniff_len == SNIFF_LEN || s.stop.is_some()
                    })
            }
            // Plaintext for want of a hello: a hello from the other
            // direction would still make it TLS.
            WireState::Plaintext => !sides.iter().any(|s| s.could_bring_hello()),
            WireState::Unknown => both_stopped,
            WireState::Tls | WireState::Mtls => both_stopped || self.tls_settled(),
        }
    }

    /// Best current knowledge; cheap enough to call after every chunk.
    pub fn observation(&self) -> Observation {
        let state = self.state();
        let mut o = Observation {
            state,
            ..Observation::default()
        };
        match state {
            WireState::Unknown => return o,
            WireState::Plaintext => {
                o.protocol = self.plaintext_protocol();
            }
            WireState::Tls | WireState::Mtls => {
                o.protocol = Some("tls");
                (o.client_cert, o.client_cert_inferred) = self.client_cert();
            }
        }
        let f = &self.facts;
        if let Some(ch) = &f.client_hello {
            o.sni = ch.sni.clone();
            o.alpn = ch.alpn.clone();
            o.psk_offered = ch.psk_offered;
        }
        if let Some(sh) = f.server_hello() {
            o.tls_version = tls::version_name(sh.version());
        }
        o.resumed = self.resumed();
        o.server_spiffe_id = f.server_spiffe_id.clone();
        o.client_spiffe_id = f.client_spiffe_id.clone();
        o.this_socket_is_tls_client = f
            .client_dir
            .map(|d| d == Dir::Out)
            .or(f.server_dir.map(|d| d == Dir::In));
        o.alert = f.alert.map(|(_, description)| description);
        o
    }

    fn plaintext_protocol(&self) -> Option<&'static str> {
        [&self.out, &self.inn]
            .iter()
            .find_map(|s| sniff::protocol(s.sniffed()))
    }

    fn state(&self) -> WireState {
        let sides = [&self.out, &self.inn];
        if sides.iter().any(|s| s.start == Start::NotTls) {
            return WireState::Plaintext;
        }
        if self.facts.client_dir.is_some() || self.facts.server_dir.is_some() {
            return if self.client_cert().0 == ClientCert::Sent {
                WireState::Mtls
            } else {
                WireState::Tls
            };
        }
        // No hello recognised: a direction opening with anything but a
        // handshake record, or with a handshake that is no hello, is not TLS.
        if sides.iter().any(|s| {
            s.start == Start::Broken || s.first_byte.is_some_and(|b| b != tls::CONTENT_HANDSHAKE)
        }) {
            WireState::Plaintext
        } else {
            WireState::Unknown
        }
    }

    /// The client certificate decision and whether it was inferred.
    fn client_cert(&self) -> (ClientCert, bool) {
        let f = &self.facts;
        // Plaintext Certificate / ClientKeyExchange from the client only
        // exist in TLS <= 1.2, so they decide even before the ServerHello is seen.
        let client_flight = match (f.client_certificate_nonempty, f.client_key_exchange) {
            (Some(true), _) => Some(ClientCert::Sent),
            (Some(false), _) | (None, true) => Some(ClientCert::NotSent),
            (None, false) => None,
        };
        let Some(sh) = f.server_hello() else {
            return (client_flight.unwrap_or_default(), false);
        };
        if sh.version() >= tls::TLS13 {
            // Drafts (0x7fxx) and unknown later versions hide the handshake
            // too, but the sizes measured for TLS 1.3 say nothing about them.
            if sh.psk_accepted || sh.version() != tls::TLS13 {
                return (ClientCert::Unobservable, false);
            }
            let Some(ch) = &f.client_hello else {
                return (ClientCert::Unknown, false);
            };
            // Early data records would come first; a hello seen in part may
            // have offered it.
            if ch.early_data || !ch.complete {
                return (ClientCert::Unobservable, false);
            }
            return match f.client_first_encrypted {
                Some(len) => {
                    let cert = tls::infer_client_cert(len, sh.cipher_suite);
                    (cert, matches!(cert, ClientCert::Sent | ClientCert::NotSent))
                }
                None => (ClientCert::Unknown, false),
            };
        }
        let cert = if let Some(c) = client_flight {
            c
        } else if f.server_hello_done && !f.certificate_request {
            ClientCert::NotSent
        } else if f.server_ccs_before_done {
            ClientCert::Unobservable
        } else {
            ClientCert::Unknown
        };
        (cert, false)
    }

    fn resumed(&self) -> bool {
        let f = &self.facts;
        f.server_hello().is_some_and(|sh| {
            if sh.version() >= tls::TLS13 {
                sh.psk_accepted
            } else {
                f.server_ccs_before_done
            }
        })
    }

    /// A TLS connection whose observation can no longer change: the
    /// handshake failed, or the client certificate and everything visible
    /// alongside it are decided, or the directions that could decide are gone.
    fn tls_settled(&self) -> bool {
        let f = &self.facts;
        if f.alert.is_some_and(|(level, _)| level == 2) {
            return true;
        }
        let Some(sh) = f.server_hello() else {
            return false;
        };
        let tls13 = sh.version() >= tls::TLS13;
        let (client, server) = match f.client_dir {
            Some(Dir::Out) => (&self.out, &self.inn),
            Some(Dir::In) => (&self.inn, &self.out),
            None => return false,
        };
        match self.client_cert().0 {
            ClientCert::Unknown => {
                client.stop.is_some() && (tls13 || f.server_hello_done || server.stop.is_some())
            }
            // Nothing else is visible in clear after the ServerHello.
            _ if tls13 => true,
            cert => {
                let server_seen = f.server_leaf_done
                    || f.server_hello_done
                    || f.server_ccs_before_done
                    || server.stop.is_some();
                let client_seen =
                    cert != ClientCert::Sent || f.client_leaf_done || client.stop.is_some();
                server_seen && client_seen
            }
        }
    }
}

impl Side {
    fn feed(&mut self, dir: Dir, offset: u32, bytes: &[u8], facts: &mut Facts) {
        if self.stop.is_some() || bytes.is_empty() {
            return;
        }
        let next = u64::from(self.next);
        let start = u64::from(offset);
        let end = start.saturating_add(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
        if start > next {
            self.halt(Stop::Gap, dir, facts);
            return;
        }
        if end <= next {
            return;
        }
        let skip = usize::try_from(next.saturating_sub(start)).unwrap_or(usize::MAX);
        let Some(fresh) = bytes.get(skip..) else {
            return;
        };
        let room = CAPTURE_BUDGET.saturating_sub(usize::try_from(self.next).unwrap_or(usize::MAX));
        let fresh = fresh.get(..room.min(fresh.len())).unwrap_or_default();
        // fresh.len() <= CAPTURE_BUDGET, so this cannot truncate.
        self.next = self
            .next
            .saturating_add(u32::try_from(fresh.len()).unwrap_or(u32::MAX));
        self.consume(fresh, dir, facts);
        if usize::try_from(self.next).unwrap_or(usize::MAX) >= CAPTURE_BUDGET {
            self.halt(Stop::Budget, dir, facts);
        }
    }

    /// Stops reading this direction. A hello cut short by a gap or the
    /// budget still yields the fields that were fully seen.
    fn halt(&mut self, why: Stop, dir: Dir, facts: &mut Facts) {
        if self.stop.is_some() {
            return;
        }
        self.stop = Some(why);
        if why != Stop::Corrupt && self.role.is_none() && self.body == Body::Handshake {
            let pending = std::mem::take(&mut self.handshake);
            if let Some(&kind) = pending.first()
                && let Some(body) = pending.get(HANDSHAKE_HEADER..)
                && body.len() >= tls::MIN_HELLO_BODY
            {
                self.first_message(kind, body, false, dir, facts);
            }
        }
        self.handshake = Vec::new();
    }

    /// Whether this direction may still turn out to open with a hello.
    fn could_bring_hello(&self) -> bool {
        self.stop.is_none()
            && self.role.is_none()
            && self.first_byte.is_none_or(|b| b == tls::CONTENT_HANDSHAKE)
    }

    fn sniffed(&self) -> &[u8] {
        self.sniff.get(..self.sniff_len).unwrap_or_default()
    }

    fn consume(&mut self, mut data: &[u8], dir: Dir, facts: &mut Facts) {
        if self.start == Start::Empty {
            let Some(&first) = data.first() else {
                return;
            };
            self.first_byte = Some(first);
            self.start = if (tls::CONTENT_CHANGE_CIPHER_SPEC..=tls::CONTENT_APPLICATION_DATA)
                .contains(&first)
            {
                Start::Pending
            } else {
                Start::NotTls
            };
        }
        if self.start == Start::NotTls {
            // Plaintext: only the opening bytes matter, for the protocol guess.
            let take = SNIFF_LEN.saturating_sub(self.sniff_len).min(data.len());
            if let (Some(dst), Some(src)) = (
                self.sniff
                    .get_mut(self.sniff_len..self.sniff_len.saturating_add(take)),
                data.get(..take),
            ) {
                dst.copy_from_slice(src);
                self.sniff_len = self.sniff_len.saturating_add(take);
            }
            return;
        }
        while !data.is_empty() && self.stop.is_none() {
            if self.header_len < RECORD_HEADER {
                let take = RECORD_HEADER
                    .saturating_sub(self.header_len)
                    .min(data.len());
                let Some((head, rest)) = data.split_at_checked(take) else {
                    return;
                };
                if let Some(dst) = self
                    .header
                    .get_mut(self.header_len..self.header_len.saturating_add(take))
                {
                    dst.copy_from_slice(head);
                }
                self.header_len = self.header_len.saturating_add(take);
                data = rest;
                if self.header_len == RECORD_HEADER {
                    self.begin_record(dir, facts);
                    if self.stop.is_none() && self.body_left == 0 {
                        self.end_record(facts);
                    }
                }
            } else {
                let take = self.body_left.min(data.len());
                let Some((body, rest)) = data.split_at_checked(take) else {
                    return;
                };
                data = rest;
                self.body_left = self.body_left.saturating_sub(take);
                self.record_body(body, dir, facts);
                if self.stop.is_none() && self.body_left == 0 {
                    self.end_record(facts);
                }
            }
        }
    }

    fn begin_record(&mut self, dir: Dir, facts: &mut Facts) {
        let [kind, major, minor, hi, lo] = self.header;
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        let valid = (tls::CONTENT_CHANGE_CIPHER_SPEC..=tls::CONTENT_APPLICATION_DATA).contains(&kind)
            && major == 3
            && minor <= 4
            && len <= MAX_RECORD
            // Only application data may be empty.
            && (len > 0 || kind == tls::CONTENT_APPLICATION_DATA);
        if !valid {
            if self.start == Start::Pending {
                self.start = Start::NotTls;
            }
            self.halt(Stop::Corrupt, dir, facts);
            return;
        }
        if self.start == Start::Pending {
            self.start = Start::Record;
        }
        self.record_len = len;
        self.body_left = len;
        self.body = match kind {
            tls::CONTENT_CHANGE_CIPHER_SPEC => Body::ChangeCipherSpec,
            // After ChangeCipherSpec, TLS 1.2 alerts are encrypted.
            tls::CONTENT_ALERT if !self.after_change_cipher_spec => {
                self.alert_len = 0;
                Body::Alert
            }
            // A direction that opened with another record type is not one
            // whose hello we trust (see could_bring_hello).
            tls::CONTENT_HANDSHAKE
                if self.role.is_none() && self.first_byte != Some(tls::CONTENT_HANDSHAKE) =>
            {
                Body::Opaque
            }
            tls::CONTENT_HANDSHAKE if !self.after_change_cipher_spec => Body::Handshake,
            tls::CONTENT_HANDSHAKE => {
                self.handshake.clear();
                Body::Probe
            }
            tls::CONTENT_APPLICATION_DATA => {
                if self.role == Some(Role::Client) && facts.client_first_encrypted.is_none() {
                    facts.client_first_encrypted = Some(len);
                }
                Body::Opaque
            }
            _ => Body::Opaque,
        };
    }

    fn end_record(&mut self, facts: &mut Facts) {
        match self.body {
            Body::ChangeCipherSpec => {
                self.after_change_cipher_spec = true;
                // A message cannot span a ChangeCipherSpec.
                self.handshake.clear();
                if self.role == Some(Role::Server) && !facts.server_hello_done {
                    facts.server_ccs_before_done = true;
                }
            }
            Body::Alert => {
                if self.alert_len == 2 && facts.alert.is_none() {
                    let [level, description] = self.alert;
                    facts.alert = Some((level, description));
                }
            }
            Body::Probe => self.handshake.clear(),
            Body::Opaque | Body::Handshake => {}
        }
        self.header_len = 0;
    }

    fn record_body(&mut self, body: &[u8], dir: Dir, facts: &mut Facts) {
        match self.body {
            Body::Handshake => {
                self.push_handshake(body);
                self.process_handshake(dir, facts);
            }
            Body::Probe => {
                self.push_handshake(body);
                let Some(&[kind, a, b, c]) = self.handshake.first_chunk::<HANDSHAKE_HEADER>()
                else {
                    return;
                };
                let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                let hello = match self.role {
                    Some(Role::Client) => kind == tls::CLIENT_HELLO,
                    Some(Role::Server) => kind == tls::SERVER_HELLO,
                    None => false,
                };
                if hello && len.saturating_add(HANDSHAKE_HEADER) == self.record_len {
                    self.body = Body::Handshake;
                    self.process_handshake(dir, facts);
                } else {
                    self.handshake.clear();
                    self.body = Body::Opaque;
                }
            }
            Body::Alert => {
                for &b in body {
                    if let Some(slot) = self.alert.get_mut(self.alert_len) {
                        *slot = b;
                        self.alert_len = self.alert_len.saturating_add(1);
                    }
                }
            }
            Body::Opaque | Body::ChangeCipherSpec => {}
        }
    }

    fn push_handshake(&mut self, bytes: &[u8]) {
        // Bounded by the budget already; this keeps the bound local and obvious.
        let room = CAPTURE_BUDGET.saturating_sub(self.handshake.len());
        self.handshake
            .extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or_default());
    }

    /// Handles every complete message buffered, and a Certificate in progress.
    fn process_handshake(&mut self, dir: Dir, facts: &mut Facts) {
        while self.stop.is_none() {
            let Some(&[kind, a, b, c]) = self.handshake.first_chunk::<HANDSHAKE_HEADER>() else {
                return;
            };
            let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            let total = HANDSHAKE_HEADER.saturating_add(len);
            let buffer = std::mem::take(&mut self.handshake);
            let (body, complete) = match buffer.get(HANDSHAKE_HEADER..total) {
                Some(body) => (body, true),
                None => (buffer.get(HANDSHAKE_HEADER..).unwrap_or_default(), false),
            };
            if complete {
                self.message(kind, body, dir, facts);
                self.messages = self.messages.saturating_add(1);
            } else if kind == tls::CERTIFICATE && self.accepts_certificate(facts) {
                // The leaf comes first: it can be read before the chain ends,
                // which matters when the chain does not fit the budget.
                self.certificate(body, false, facts);
            }
            if self.stop.is_some() {
                // Halted by a bad first message: the buffer is dropped.
                return;
            }
            self.handshake = buffer;
            if !complete {
                return;
            }
            self.handshake.drain(..total.min(self.handshake.len()));
        }
    }

    fn message(&mut self, kind: u8, body: &[u8], dir: Dir, facts: &mut Facts) {
        match self.role {
            None => self.first_message(kind, body, true, dir, facts),
            Some(Role::Client) => match kind {
                // The second ClientHello after a HelloRetryRequest comes
                // right after the first; later ones are not believed.
                tls::CLIENT_HELLO if self.messages == 1 => {
                    let mut ch = ClientHello::default();
                    if tls::parse_client_hello(body, &mut ch).is_ok() {
                        ch.complete = true;
                        if let Some(first) = &facts.client_hello {
                            // Early data sent after the first hello is still in the stream.
                            ch.early_data |= first.early_data;
                        }
                        facts.client_hello = Some(ch);
                    }
                }
                tls::CERTIFICATE if self.accepts_certificate(facts) => {
                    self.certificate(body, true, facts);
                }
                tls::CLIENT_KEY_EXCHANGE => facts.client_key_exchange = true,
                _ => {}
            },
            // The server's flight ends with ServerHelloDone: later plaintext
            // messages would be a protocol violation, ignored.
            Some(Role::Server) if facts.server_hello_done => {}
            Some(Role::Server) => match kind {
                // The real ServerHello after a HelloRetryRequest.
                tls::SERVER_HELLO
                    if self.messages == 1
                        && facts.server_hello.is_some_and(|sh| sh.retry_request) =>
                {
                    let mut sh = ServerHello::default();
                    if tls::parse_server_hello(body, &mut sh).is_ok() {
                        sh.complete = true;
                        facts.server_hello = Some(sh);
                    }
                }
                tls::CERTIFICATE => self.certificate(body, true, facts),
                tls::CERTIFICATE_REQUEST => facts.certificate_request = true,
                tls::SERVER_HELLO_DONE => facts.server_hello_done = true,
                _ => {}
            },
        }
    }

    /// The first handshake message of a direction must be a hello; it gives
    /// the direction its role. `complete` is false for a hello cut short.
    fn first_message(
        &mut self,
        kind: u8,
        body: &[u8],
        complete: bool,
        dir: Dir,
        facts: &mut Facts,
    ) {
        let plausible_version = |v: u16| v >> 8 == 3;
        match kind {
            tls::CLIENT_HELLO if facts.client_dir.is_none() => {
                let mut ch = ClientHello::default();
                let parsed = tls::parse_client_hello(body, &mut ch);
                if (parsed.is_ok() || !complete) && plausible_version(ch.legacy_version) {
                    ch.complete = complete;
                    facts.client_hello = Some(ch);
                    facts.client_dir = Some(dir);
                    self.role = Some(Role::Client);
                    return;
                }
            }
            tls::SERVER_HELLO if facts.server_dir.is_none() => {
                let mut sh = ServerHello::default();
                let parsed = tls::parse_server_hello(body, &mut sh);
                if (parsed.is_ok() || !complete) && plausible_version(sh.legacy_version) {
                    sh.complete = complete;
                    facts.server_hello = Some(sh);
                    facts.server_dir = Some(dir);
                    self.role = Some(Role::Server);
                    return;
                }
            }
            _ => {}
        }
        if self.start == Start::Record {
            self.start = Start::Broken;
        }
        self.halt(Stop::Corrupt, dir, facts);
    }

    /// Whether a Certificate message from this direction is believed: the
    /// client's comes before its ClientKeyExchange, the server's before
    /// ServerHelloDone.
    fn accepts_certificate(&self, facts: &Facts) -> bool {
        match self.role {
            Some(Role::Client) => !facts.client_key_exchange,
            Some(Role::Server) => !facts.server_hello_done,
            None => false,
        }
    }

    /// A TLS <= 1.2 Certificate message (TLS 1.3 ones are encrypted), whole
    /// or its first `body.len()` bytes.
    fn certificate(&mut self, body: &[u8], complete: bool, facts: &mut Facts) {
        let mut r = tls::Reader::new(body);
        let Ok(list_len) = r.u24() else {
            return;
        };
        let (leaf_done, spiffe_id) = match self.role {
            Some(Role::Client) => {
                if facts.client_certificate_nonempty.is_none() {
                    facts.client_certificate_nonempty = Some(list_len > 0);
                }
                (&mut facts.client_leaf_done, &mut facts.client_spiffe_id)
            }
            Some(Role::Server) => (&mut facts.server_leaf_done, &mut facts.server_spiffe_id),
            None => return,
        };
        if *leaf_done {
            return;
        }
        let leaf = r
            .u24()
            .ok()
            .and_then(|len| body.get(6..len.saturating_add(6)));
        if let Some(der) = leaf {
            *spiffe_id = der::spiffe_id(der);
            *leaf_done = true;
        } else if complete {
            // Empty or malformed list: no leaf will ever come.
            *leaf_done = true;
        }
    }
}

#[cfg(test)]
mod tests;
