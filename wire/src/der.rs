//! Just enough DER to read a leaf certificate's SPIFFE ID: the first
//! `uniformResourceIdentifier` of the subjectAltName extension that starts
//! with `spiffe://`. Every read is bounds-checked; malformed input yields `None`.

const SEQUENCE: u8 = 0x30;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
/// `[3] EXPLICIT Extensions` inside TBSCertificate.
const EXTENSIONS: u8 = 0xA3;
/// `uniformResourceIdentifier [6] IMPLICIT IA5String` in GeneralName.
const URI: u8 = 0x86;
/// 2.5.29.17, id-ce-subjectAltName.
const SUBJECT_ALT_NAME: [u8; 3] = [0x55, 0x1D, 0x11];
/// The SPIFFE specification caps an ID at 2048 bytes.
const MAX_SPIFFE_ID: usize = 2048;

/// One DER element: its (single-byte) tag and contents.
struct Tlv<'a> {
    tag: u8,
    body: &'a [u8],
}

/// Reads one element from the front of `input`, returning it and the rest.
fn read(input: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let (&tag, rest) = input.split_first()?;
    // High tag numbers never occur on the path we walk.
    if tag & 0x1F == 0x1F {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // Long form; indefinite length (0x80) is not DER. Four length bytes
        // are far more than a certificate needs and cannot overflow usize.
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 {
            return None;
        }
        let (octets, rest) = rest.split_at_checked(n)?;
        let len = octets
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    let (body, rest) = rest.split_at_checked(len)?;
    Some((Tlv { tag, body }, rest))
}

/// Iterates over the elements of a constructed value's contents; stops at the
/// first malformed one.
fn elements(mut input: &[u8]) -> impl Iterator<Item = Tlv<'_>> {
    std::iter::from_fn(move || {
        let (tlv, rest) = read(input)?;
        input = rest;
        Some(tlv)
    })
}

/// Reads one element that must carry `tag`.
fn expect(input: &[u8], tag: u8) -> Option<&[u8]> {
    let (tlv, _) = read(input)?;
    (tlv.tag == tag).then_some(tlv.body)
}

/// The SPIFFE ID of a DER X.509 certificate, if its subjectAltName has one.
pub(crate) fn spiffe_id(certificate: &[u8]) -> Option<String> {
    let cert = expect(certificate, SEQUENCE)?;
    let tbs = expect(cert, SEQUENCE)?;
    let extensions = elements(tbs).find(|f| f.tag == EXTENSIONS)?;
    let list = expect(extensions.body, SEQUENCE)?;
    for extension in elements(list).filter(|e| e.tag == SEQUENCE) {
        let mut fields = elements(extension.body);
        let Some(oid) = fields.next() else { continue };
        if oid.tag != OID || oid.body != SUBJECT_ALT_NAME {
            continue;
        }
        // `critical BOOLEAN DEFAULT FALSE` may precede the value.
        let value = fields.find(|f| f.tag != BOOLEAN)?;
        if value.tag != OCTET_STRING {
            return None;
        }
        let names = expect(value.body, SEQUENCE)?;
        return elements(names)
            .filter(|name| name.tag == URI)
            .find(|name| name.body.starts_with(b"spiffe://") && name.body.len() <= MAX_SPIFFE_ID)
            .and_then(|name| std::str::from_utf8(name.body).ok())
            .map(str::to_owned);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wraps contents in a DER element, long-form length when needed.
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = body.len();
        if len < 0x80 {
            out.push(len as u8);
        } else if len < 0x100 {
            out.extend([0x81, len as u8]);
        } else {
            out.extend([0x82, (len >> 8) as u8, len as u8]);
        }
        out.extend_from_slice(body);
        out
    }

    fn cert_with_names(names: &[(u8, &[u8])], critical: bool) -> Vec<u8> {
        let general_names: Vec<u8> = names.iter().flat_map(|(t, v)| tlv(*t, v)).collect();
        let mut ext = tlv(OID, &SUBJECT_ALT_NAME);
        if critical {
            ext.extend(tlv(BOOLEAN, &[0xFF]));
        }
        ext.extend(tlv(OCTET_STRING, &tlv(SEQUENCE, &general_names)));
        let other_ext = [
            tlv(OID, &[0x55, 0x1D, 0x13]),
            tlv(OCTET_STRING, &[0x30, 0x00]),
        ]
        .concat();
        let exts = tlv(
            SEQUENCE,
            &[tlv(SEQUENCE, &other_ext), tlv(SEQUENCE, &ext)].concat(),
        );
        let tbs = [
            tlv(0xA0, &tlv(0x02, &[2])),
            tlv(0x02, &[1, 2, 3]),
            tlv(SEQUENCE, &[]),
            tlv(SEQUENCE, &[0u8; 200]),
            tlv(EXTENSIONS, &exts),
        ]
        .concat();
        tlv(
            SEQUENCE,
            &[tlv(SEQUENCE, &tbs), tlv(SEQUENCE, &[]), tlv(0x03, &[0, 1])].concat(),
        )
    }

    #[test]
    fn finds_the_spiffe_uri_among_other_names() {
        let der = cert_with_names(
            &[
                (0x82, b"backend.demo.local"),
                (URI, b"https://x"),
                (URI, b"spiffe://demo.local/sa/b"),
            ],
            true,
        );
        assert_eq!(spiffe_id(&der).as_deref(), Some("spiffe://demo.local/sa/b"));
    }

    #[test]
    fn no_spiffe_uri_is_none() {
        let der = cert_with_names(&[(0x82, b"backend.demo.local")], false);
        assert_eq!(spiffe_id(&der), None);
    }

    #[test]
    fn every_truncation_and_corruption_is_handled() {
        let der = cert_with_names(&[(URI, b"spiffe://demo.local/sa/b")], false);
        for n in 0..der.len() {
            assert_eq!(spiffe_id(&der[..n]), None, "prefix of {n} bytes");
        }
        for i in 0..der.len() {
            for v in [0x00, 0x7F, 0x80, 0x84, 0x85, 0xFF] {
                let mut bad = der.clone();
                bad[i] = v;
                let _ = spiffe_id(&bad);
            }
        }
    }
}
