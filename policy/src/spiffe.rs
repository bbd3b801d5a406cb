//! SPIFFE IDs and ID patterns: parsing and validation of `spiffe://<td>/<path>`, where
//! a pattern's path segment may be `*` (exactly one segment) or, last, `**` (one or
//! more remaining segments). Patterns are compiled into the segment trie of `index`.

/// A parsed SPIFFE ID pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdPattern {
    pub trust_domain: String,
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    Literal(String),
    /// `*`: any one segment.
    Any,
    /// `**`: one or more segments; only last.
    Rest,
}

impl IdPattern {
    pub fn is_exact(&self) -> bool {
        self.segments
            .iter()
            .all(|s| matches!(s, Segment::Literal(_)))
    }

    /// Direct (non-indexed) match, used by tests and as the reference semantics.
    pub fn matches(&self, id: &str) -> bool {
        let Some((td, path)) = split_id(id) else {
            return false;
        };
        if td != self.trust_domain {
            return false;
        }
        let segs: Vec<&str> = path_segments(path).collect();
        let mut i = 0;
        for (n, p) in self.segments.iter().enumerate() {
            match p {
                Segment::Rest => return n == self.segments.len() - 1 && segs.len() > i,
                Segment::Any => {
                    if i >= segs.len() {
                        return false;
                    }
                }
                Segment::Literal(l) => {
                    if segs.get(i) != Some(&l.as_str()) {
                        return false;
                    }
                }
            }
            i += 1;
        }
        i == segs.len()
    }
}

impl std::fmt::Display for IdPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "spiffe://{}", self.trust_domain)?;
        for s in &self.segments {
            match s {
                Segment::Literal(l) => write!(f, "/{l}")?,
                Segment::Any => f.write_str("/*")?,
                Segment::Rest => f.write_str("/**")?,
            }
        }
        Ok(())
    }
}

/// Splits `spiffe://td/path` into trust domain and path (without the leading `/`).
pub fn split_id(id: &str) -> Option<(&str, &str)> {
    let rest = id.strip_prefix("spiffe://")?;
    // A trust domain is short: a byte loop, not `split_once`'s `memchr`
    // (every flow the policy judges splits its two IDs).
    match rest.bytes().position(|b| b == b'/') {
        Some(slash) => Some((&rest[..slash], &rest[slash + 1..])),
        None => Some((rest, "")),
    }
}

pub fn path_segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

/// Trust domain names: lower-case letters, digits, `.`, `-`, `_` (SPIFFE spec).
pub fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

fn valid_segment(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        && s != "."
        && s != ".."
}

/// Parses a pattern; the error says what is wrong.
pub fn parse_pattern(text: &str) -> Result<IdPattern, String> {
    let Some((td, path)) = split_id(text) else {
        return Err(format!(
            "`{text}` is not a SPIFFE ID: expected `spiffe://<trust-domain>/<path>`, `world` or `host`"
        ));
    };
    if !valid_trust_domain(td) {
        return Err(format!(
            "`{td}` is not a valid trust domain (lower-case letters, digits, `.`, `-`, `_`)"
        ));
    }
    if path.is_empty() {
        return Err(format!(
            "`{text}` has no path; workload IDs look like spiffe://{td}/ns/<ns>/sa/<sa>"
        ));
    }
    if path.ends_with('/') || path.contains("//") {
        return Err(format!("`{text}` has an empty path segment"));
    }
    let parts: Vec<&str> = path.split('/').collect();
    let mut segments = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let seg = match *part {
            "**" if i + 1 == parts.len() => Segment::Rest,
            "**" => return Err(format!("`**` may only be the last segment, in `{text}`")),
            "*" => Segment::Any,
            p if p.contains('*') => {
                return Err(format!(
                    "`{p}` in `{text}`: `*` and `**` must be whole segments (no partial globs)"
                ));
            }
            p if valid_segment(p) => Segment::Literal(p.to_string()),
            p => {
                return Err(format!(
                    "path segment `{p}` of `{text}` has characters outside letters, digits, `.`, `-`, `_`"
                ));
            }
        };
        segments.push(seg);
    }
    Ok(IdPattern {
        trust_domain: td.to_string(),
        segments,
    })
}

/// The longest SPIFFE ID the SPIFFE standard allows, in bytes.
pub const MAX_ID_BYTES: usize = 2048;

/// Checks a workload's SPIFFE ID as the SPIFFE standard defines one: a
/// trust domain and a path of segments of letters, digits, `.`, `-` and `_`
/// (none empty, `.` or `..`), at most [`MAX_ID_BYTES`]. The error says what
/// is wrong, without repeating the ID.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.len() > MAX_ID_BYTES {
        return Err(format!("longer than {MAX_ID_BYTES} bytes"));
    }
    let Some((td, path)) = split_id(id) else {
        return Err("does not start with `spiffe://`".into());
    };
    if !valid_trust_domain(td) {
        return Err(format!(
            "`{td}` is not a valid trust domain (lower-case letters, digits, `.`, `-`, `_`)"
        ));
    }
    if path.is_empty() {
        return Err("has no path".into());
    }
    for segment in path.split('/') {
        if segment.is_empty() {
            return Err("has an empty path segment".into());
        }
        if !valid_segment(segment) {
            return Err(format!(
                "path segment `{segment}` is not letters, digits, `.`, `-`, `_` (or is `.` or `..`)"
            ));
        }
    }
    Ok(())
}

/// The DERIVED identity convention: `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub fn derive_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// Namespace and service account from an ID that follows the convention.
pub fn ns_sa_of(id: &str) -> Option<(&str, &str)> {
    let (_, path) = split_id(id)?;
    let mut it = path.split('/');
    match (it.next(), it.next(), it.next(), it.next(), it.next()) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None) if !ns.is_empty() && !sa.is_empty() => {
            Some((ns, sa))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_documented() {
        let cases = [
            (
                "spiffe://demo.local/ns/a/sa/b",
                "spiffe://demo.local/ns/a/sa/b",
                true,
            ),
            (
                "spiffe://demo.local/ns/a/sa/b",
                "spiffe://demo.local/ns/a/sa/c",
                false,
            ),
            (
                "spiffe://demo.local/ns/*/sa/b",
                "spiffe://demo.local/ns/x/sa/b",
                true,
            ),
            (
                "spiffe://demo.local/ns/*/sa/b",
                "spiffe://demo.local/ns/x/y/sa/b",
                false,
            ),
            (
                "spiffe://demo.local/ns/a/**",
                "spiffe://demo.local/ns/a/sa/b",
                true,
            ),
            (
                "spiffe://demo.local/ns/a/**",
                "spiffe://demo.local/ns/a",
                false,
            ),
            (
                "spiffe://demo.local/ns/a/**",
                "spiffe://other.local/ns/a/sa/b",
                false,
            ),
            (
                "spiffe://demo.local/**",
                "spiffe://demo.local/anything/at/all",
                true,
            ),
        ];
        for (pat, id, want) in cases {
            let p = parse_pattern(pat).unwrap_or_else(|e| panic!("{pat} should parse: {e}"));
            assert_eq!(p.matches(id), want, "pattern {pat} against {id}");
        }
    }

    #[test]
    fn ids_are_checked_as_the_spiffe_standard_defines_them() {
        for good in [
            "spiffe://demo.local/ns/99-apps/sa/frontend",
            "spiffe://example.org/Service_A/v1.2",
        ] {
            assert_eq!(check_id(good), Ok(()), "{good}");
        }
        let long = format!("spiffe://demo.local/{}", "a".repeat(MAX_ID_BYTES));
        for (bad, why) in [
            ("http://demo.local/x", "does not start with `spiffe://`"),
            (
                "spiffe://Demo.local/x",
                "`Demo.local` is not a valid trust domain (lower-case letters, digits, `.`, `-`, `_`)",
            ),
            ("spiffe://demo.local", "has no path"),
            ("spiffe://demo.local/", "has no path"),
            ("spiffe://demo.local/ns/a/", "has an empty path segment"),
            ("spiffe://demo.local/ns//sa/x", "has an empty path segment"),
            (
                "spiffe://demo.local/ns/a b",
                "path segment `a b` is not letters, digits, `.`, `-`, `_` (or is `.` or `..`)",
            ),
            (
                "spiffe://demo.local/ns/../sa/x",
                "path segment `..` is not letters, digits, `.`, `-`, `_` (or is `.` or `..`)",
            ),
            (long.as_str(), "longer than 2048 bytes"),
        ] {
            assert_eq!(check_id(bad), Err(why.to_string()), "{bad}");
        }
    }

    #[test]
    fn bad_patterns_are_explained() {
        for (pat, needle) in [
            ("http://x/y", "not a SPIFFE ID"),
            ("spiffe://Demo/x", "not a valid trust domain"),
            ("spiffe://demo.local", "has no path"),
            ("spiffe://demo.local/**/x", "last segment"),
            ("spiffe://demo.local/ns/fr*", "whole segments"),
            ("spiffe://demo.local/ns//x", "empty path segment"),
        ] {
            let err = parse_pattern(pat).expect_err(pat);
            assert!(
                err.contains(needle),
                "error for {pat} was {err:?}, expected to mention {needle:?}"
            );
        }
    }

    #[test]
    fn convention() {
        assert_eq!(
            ns_sa_of("spiffe://d/ns/99-apps/sa/frontend"),
            Some(("99-apps", "frontend"))
        );
        assert_eq!(ns_sa_of("spiffe://d/agent/x"), None);
        assert_eq!(derive_id("d", "n", "s"), "spiffe://d/ns/n/sa/s");
    }
}
