//! TLS handshake message bodies: ClientHello and ServerHello fields, and the
//! TLS 1.3 client-certificate inference from the size of the client's first
//! encrypted record. Parsers fill their output field by field, so a hello cut
//! short by a gap still yields what was fully seen.

use crate::ClientCert;

pub(crate) const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
pub(crate) const CONTENT_ALERT: u8 = 21;
pub(crate) const CONTENT_HANDSHAKE: u8 = 22;
pub(crate) const CONTENT_APPLICATION_DATA: u8 = 23;

pub(crate) const CLIENT_HELLO: u8 = 1;
pub(crate) const SERVER_HELLO: u8 = 2;
pub(crate) const CERTIFICATE: u8 = 11;
pub(crate) const CERTIFICATE_REQUEST: u8 = 13;
pub(crate) const SERVER_HELLO_DONE: u8 = 14;
pub(crate) const CLIENT_KEY_EXCHANGE: u8 = 16;

pub(crate) const TLS13: u16 = 0x0304;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_PRE_SHARED_KEY: u16 = 41;
const EXT_EARLY_DATA: u16 = 42;
const EXT_SUPPORTED_VERSIONS: u16 = 43;

/// Legacy version, random and the shortest session id, cipher suite and
/// compression fields: a shorter body cannot be a hello.
pub(crate) const MIN_HELLO_BODY: usize = 2 + 32 + 1 + 2 + 1;

/// ALPN names kept: bounds memory against a hostile hello.
const MAX_ALPN: usize = 16;
/// A DNS name is at most 253 characters.
const MAX_SNI: usize = 255;

/// The ServerHello random that marks a HelloRetryRequest (RFC 8446 4.1.3).
const HELLO_RETRY_REQUEST: [u8; 32] = [
    0xCF, 0x21, 0xAD, 0x74, 0xE5, 0x9A, 0x61, 0x11, 0xBE, 0x1D, 0x8C, 0x02, 0x1E, 0x65, 0xB8, 0x91,
    0xC2, 0xA2, 0x11, 0x16, 0x7A, 0xBB, 0x8C, 0x5E, 0x07, 0x9E, 0x09, 0xE2, 0xC8, 0xA8, 0x33, 0x9C,
];

/// The input ended before the structure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Short;

/// A cursor over a byte slice whose reads fail instead of panicking.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Short> {
        let (head, rest) = self.buf.split_at_checked(n).ok_or(Short)?;
        self.buf = rest;
        Ok(head)
    }

    /// Up to `n` bytes: all of them, or what is left of a truncated input.
    fn up_to(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.buf.split_at_checked(n).unwrap_or((self.buf, &[]));
        self.buf = rest;
        head
    }

    fn u8(&mut self) -> Result<u8, Short> {
        let (&b, rest) = self.buf.split_first().ok_or(Short)?;
        self.buf = rest;
        Ok(b)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, Short> {
        let (b, rest) = self.buf.split_first_chunk::<2>().ok_or(Short)?;
        self.buf = rest;
        Ok(u16::from_be_bytes(*b))
    }

    pub(crate) fn u24(&mut self) -> Result<usize, Short> {
        let (&[a, b, c], rest) = self.buf.split_first_chunk::<3>().ok_or(Short)?;
        self.buf = rest;
        Ok(usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c))
    }

    fn vec8(&mut self) -> Result<&'a [u8], Short> {
        let n = self.u8()?;
        self.bytes(usize::from(n))
    }

    fn vec16(&mut self) -> Result<&'a [u8], Short> {
        let n = self.u16()?;
        self.bytes(usize::from(n))
    }
}

/// What a ClientHello offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ClientHello {
    pub(crate) legacy_version: u16,
    pub(crate) sni: Option<String>,
    pub(crate) alpn: Vec<String>,
    pub(crate) offers_tls13: bool,
    pub(crate) psk_offered: bool,
    pub(crate) early_data: bool,
    /// False when parsed from a prefix: absent extensions may just be unseen.
    pub(crate) complete: bool,
}

/// What a ServerHello (or HelloRetryRequest) chooses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ServerHello {
    pub(crate) legacy_version: u16,
    pub(crate) selected_version: Option<u16>,
    pub(crate) cipher_suite: u16,
    pub(crate) psk_accepted: bool,
    pub(crate) retry_request: bool,
    /// False when parsed from a prefix: the version may be in an unseen extension.
    pub(crate) complete: bool,
}

impl ServerHello {
    /// The negotiated version: supported_versions when present (TLS 1.3
    /// keeps 0x0303 in the legacy field).
    pub(crate) fn version(&self) -> u16 {
        self.selected_version.unwrap_or(self.legacy_version)
    }
}

/// Calls `f` for each extension of an extensions block; a block cut short
/// yields the complete extensions before the cut, then `Short`.
fn extensions<'a>(r: &mut Reader<'a>, mut f: impl FnMut(u16, &'a [u8])) -> Result<(), Short> {
    if r.is_empty() {
        // Hellos without extensions are legal (SSL 3.0, old TLS 1.0 clients).
        return Ok(());
    }
    let declared = usize::from(r.u16()?);
    let block = r.up_to(declared);
    let cut = block.len() < declared;
    let mut exts = Reader::new(block);
    while !exts.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        f(kind, data);
    }
    if cut { Err(Short) } else { Ok(()) }
}

/// Parses a ClientHello body into `out`, field by field.
pub(crate) fn parse_client_hello(body: &[u8], out: &mut ClientHello) -> Result<(), Short> {
    let mut r = Reader::new(body);
    out.legacy_version = r.u16()?;
    r.bytes(32)?; // random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    extensions(&mut r, |kind, data| match kind {
        // Malformed extension contents are skipped: the framing around them
        // is intact, and one odd extension says nothing about the others.
        EXT_SERVER_NAME if out.sni.is_none() => out.sni = server_name(data),
        EXT_ALPN => out.alpn = alpn(data),
        EXT_SUPPORTED_VERSIONS => {
            out.offers_tls13 = supported_versions(data).contains(&TLS13);
        }
        EXT_PRE_SHARED_KEY => out.psk_offered = true,
        EXT_EARLY_DATA => out.early_data = true,
        _ => {}
    })
}

fn server_name(data: &[u8]) -> Option<String> {
    let mut r = Reader::new(data);
    let mut list = Reader::new(r.vec16().ok()?);
    while !list.is_empty() {
        let kind = list.u8().ok()?;
        let name = list.vec16().ok()?;
        // host_name(0) is the only name type ever defined.
        if kind == 0 {
            if name.is_empty() || name.len() > MAX_SNI {
                return None;
            }
            return std::str::from_utf8(name).ok().map(str::to_owned);
        }
    }
    None
}

fn alpn(data: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut r = Reader::new(data);
    let Ok(list) = r.vec16() else { return names };
    let mut list = Reader::new(list);
    while let Ok(name) = list.vec8() {
        if names.len() == MAX_ALPN {
            break;
        }
        // Protocol ids are opaque bytes; registered ones are ASCII.
        names.push(String::from_utf8_lossy(name).into_owned());
    }
    names
}

fn supported_versions(data: &[u8]) -> Vec<u16> {
    let mut r = Reader::new(data);
    let Ok(list) = r.vec8() else {
        return Vec::new();
    };
    list.chunks_exact(2)
        .filter_map(|v| v.first_chunk::<2>())
        .map(|v| u16::from_be_bytes(*v))
        .collect()
}

/// Parses a ServerHello body into `out`, field by field.
pub(crate) fn parse_server_hello(body: &[u8], out: &mut ServerHello) -> Result<(), Short> {
    let mut r = Reader::new(body);
    out.legacy_version = r.u16()?;
    out.retry_request = r.bytes(32)? == HELLO_RETRY_REQUEST;
    r.vec8()?; // legacy_session_id_echo
    out.cipher_suite = r.u16()?;
    r.u8()?; // legacy_compression_method
    extensions(&mut r, |kind, data| match kind {
        EXT_SUPPORTED_VERSIONS => {
            if let Some(v) = data.first_chunk::<2>() {
                out.selected_version = Some(u16::from_be_bytes(*v));
            }
        }
        EXT_PRE_SHARED_KEY => out.psk_accepted = true,
        _ => {}
    })
}

/// The name of a negotiated protocol version.
pub(crate) fn version_name(version: u16) -> Option<&'static str> {
    match version {
        0x0300 => Some("SSL3.0"),
        0x0301 => Some("TLS1.0"),
        0x0302 => Some("TLS1.1"),
        0x0303 => Some("TLS1.2"),
        0x0304 => Some("TLS1.3"),
        _ => None,
    }
}

/// Finished verify_data and AEAD tag lengths of a TLS 1.3 cipher suite.
fn suite_sizes(cipher_suite: u16) -> Option<(usize, usize)> {
    match cipher_suite {
        0x1302 => Some((48, 16)), // TLS_AES_256_GCM_SHA384
        // AES_128_GCM, CHACHA20_POLY1305, AES_128_CCM, SM4_GCM, SM4_CCM
        0x1301 | 0x1303 | 0x1304 | 0x00C6 | 0x00C7 => Some((32, 16)),
        0x1305 => Some((32, 8)), // TLS_AES_128_CCM_8_SHA256
        _ => None,
    }
}

/// The smallest DER certificate we expect in a Certificate message; real
/// X.509 leaves are several hundred bytes.
const MIN_CERTIFICATE: usize = 100;

/// Decides from the payload length of the client's first encrypted TLS 1.3
/// record whether it carries a client certificate.
///
/// The client's second flight is Certificate (if asked), CertificateVerify
/// (if the Certificate is not empty) and Finished. Without a certificate the
/// first record can only hold Finished (4 + hash bytes), an empty Certificate
/// (4 + 1 context + 3 list bytes), or both; each sealed adds one content-type
/// byte and the AEAD tag. Those exact sizes mean NotSent; a record too large
/// for any of them must start with a non-empty Certificate. Anything between
/// (record padding, a fragmenting record_size_limit, an encrypted alert) is
/// not decided. Measured on OpenSSL 3.0 with the recorded fixtures: 69 (SHA-384)
/// and 53 (SHA-256) without a request, 25 when asked with no certificate,
/// 1008 (P-256 chain) and 1218 (RSA-2048 chain) with one.
pub(crate) fn infer_client_cert(first_record: usize, cipher_suite: u16) -> ClientCert {
    let Some((hash, tag)) = suite_sizes(cipher_suite) else {
        return ClientCert::Unobservable;
    };
    let sealed = |inner: usize| inner + 1 + tag;
    let finished = 4 + hash;
    let empty_certificate = 4 + 1 + 3;
    let without = [
        sealed(finished),
        sealed(empty_certificate),
        sealed(empty_certificate + finished),
    ];
    if without.contains(&first_record) {
        ClientCert::NotSent
    } else if first_record >= sealed(empty_certificate + 3 + MIN_CERTIFICATE + 2) {
        ClientCert::Sent
    } else {
        ClientCert::Unobservable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_sizes() {
        use ClientCert::*;
        let cases = [
            (69, 0x1302, NotSent),
            (53, 0x1301, NotSent),
            (53, 0x1303, NotSent),
            (45, 0x1305, NotSent),
            (25, 0x1302, NotSent),
            (61, 0x1301, NotSent),
            (77, 0x1302, NotSent),
            (1008, 0x1302, Sent),
            (1218, 0x1301, Sent),
            (19, 0x1301, Unobservable), // an encrypted alert
            (90, 0x1301, Unobservable),
            (1008, 0x9999, Unobservable),
        ];
        for (len, suite, want) in cases {
            assert_eq!(
                infer_client_cert(len, suite),
                want,
                "record of {len} bytes, suite {suite:#06x}"
            );
        }
    }

    #[test]
    fn reader_never_reads_past_the_end() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16(), Ok(0x0102));
        assert_eq!(r.u16(), Err(Short));
        assert_eq!(r.u24(), Err(Short));
        assert_eq!(r.u8(), Ok(3));
        assert_eq!(r.vec8(), Err(Short));
        assert_eq!(r.up_to(10), &[] as &[u8]);
    }
}
