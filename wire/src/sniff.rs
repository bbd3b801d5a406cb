//! Names the plaintext protocol a connection opens with, from the first bytes
//! of one direction (the kernel sends 64 of them for non-TLS streams).

/// Bytes of each direction kept for recognition; the longest signature
/// ("PRI * HTTP/2.0") is 14 bytes.
pub(crate) const SNIFF_LEN: usize = 16;

const HTTP_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// PostgreSQL codes in the int32 after the length of the first message.
const PG_PROTOCOL_3: u32 = 0x0003_0000;
const PG_CANCEL_REQUEST: u32 = 80_877_102;
const PG_SSL_REQUEST: u32 = 80_877_103;
const PG_GSSENC_REQUEST: u32 = 80_877_104;
/// Startup packets larger than this are rejected by the server itself.
const PG_MAX_STARTUP: u32 = 10_000;

/// The protocol these first bytes start, if recognised.
pub(crate) fn protocol(first: &[u8]) -> Option<&'static str> {
    if first.starts_with(b"PRI * HTTP/2.0") {
        Some("http2")
    } else if first.starts_with(b"HTTP/1.") || HTTP_METHODS.iter().any(|m| first.starts_with(m)) {
        Some("http")
    } else if first.starts_with(b"SSH-") {
        Some("ssh")
    } else if is_postgres_startup(first) {
        Some("postgresql")
    } else {
        None
    }
}

/// A startup, SSLRequest, GSSENCRequest or CancelRequest message: the only
/// untyped messages of the protocol, so their length and code must agree.
fn is_postgres_startup(first: &[u8]) -> bool {
    let Some((len, rest)) = first.split_first_chunk::<4>() else {
        return false;
    };
    let Some(code) = rest.first_chunk::<4>() else {
        return false;
    };
    let len = u32::from_be_bytes(*len);
    match u32::from_be_bytes(*code) {
        PG_PROTOCOL_3 => (9..=PG_MAX_STARTUP).contains(&len),
        PG_SSL_REQUEST | PG_GSSENC_REQUEST => len == 8,
        PG_CANCEL_REQUEST => len == 16,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_openings() {
        let pg_ssl = [0, 0, 0, 8, 0x04, 0xD2, 0x16, 0x2F];
        let pg_start = [0, 0, 0, 40, 0, 3, 0, 0, b'u'];
        let cases: [(&[u8], Option<&str>); 9] = [
            (b"GET / HTTP/1.1\r\n", Some("http")),
            (b"HTTP/1.1 200 OK\r\n", Some("http")),
            (b"PRI * HTTP/2.0\r\n\r\nSM", Some("http2")),
            (b"SSH-2.0-OpenSSH_9", Some("ssh")),
            (&pg_ssl, Some("postgresql")),
            (&pg_start, Some("postgresql")),
            (&[0, 0, 0, 9, 0x04, 0xD2, 0x16, 0x2F], None),
            (b"GE", None),
            (b"hello world", None),
        ];
        for (bytes, want) in cases {
            assert_eq!(protocol(bytes), want, "for {bytes:?}");
        }
    }
}
