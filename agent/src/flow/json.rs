//! The JSON line of a flow event, written straight into a byte buffer: the
//! export file writes one per flow, and serde's derived serializer (a call
//! per field, and an escape-table lookup per byte of every string) was a
//! fifth of the agent's CPU in a connection storm. The bytes are exactly
//! `serde_json::to_vec(&flow)` once the flow's summary is written (these
//! writers write it when the flow has none yet; serde prints it as it
//! stands): the derive stays the
//! definition of the form (and what reads it back), and the tests hold this
//! writer to it.
//! The rare parts (Cilium mutual authentication, joined halves) still go
//! through serde; compact output of a part is the same bytes inside the
//! whole.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::IpAddr;

use super::{
    ClientCertificate, Encryption, EndKind, Endpoint, FlowEvent, PodMeta, PodRef, UnknownReason,
};

/// Appends `flow` as one compact JSON object (no newline).
pub fn write_flow(out: &mut Vec<u8>, flow: &FlowEvent) {
    write_with(out, flow, &mut Afresh);
}

/// Pods pointed to by more flows than this at once (the export file's
/// writer): beyond it the cache starts over.
const POD_CACHE: usize = 4096;

/// Ends kept at most (see [`EndKey`]): beyond it the cache starts over.
const END_CACHE: usize = 4096;

/// Writes JSON lines like [`write_flow`], keeping what the next line can
/// reuse:
/// - each end's whole part (`{"kind":…,"cgroup_id":…}`), written once and
///   copied after: the ends of a busy pair of workloads repeat from flow to
///   flow (the same pod, SPIFFE ID, process and cgroup), and the two ends
///   are most of a line's bytes. A storm-like line went from 4,538 to
///   3,572 instructions (the `json_line_instructions` measurement,
///   2026-12-07);
/// - each pod's names and labels, written once and copied after, for an
///   end not cached yet: one pod (the endpoint directory's `Arc`) is behind
///   many flows (340 to 260 ns for the bench's event);
/// - the time's text up to the second, so a flow in the same second as the
///   one before only writes its nanoseconds;
/// - one buffer for the summaries it writes (a flow's own summary, when a
///   sink already asked for it, is copied as it is; the writer does not
///   keep one in the flow).
///
/// The cache holds the pod's `Arc`, so the address it is keyed by stays
/// that pod's: a pod changed through `Arc::make_mut` (shared with the
/// cache, so copied first) is a new address.
pub struct FlowWriter {
    /// By the pod's address.
    pods: HashMap<usize, CachedPod, foldhash::fast::RandomState>,
    /// Ends (held, so the addresses in their keys stay theirs) and their
    /// parts of a line.
    ends: HashMap<EndKey, (Endpoint, Box<[u8]>), foldhash::fast::RandomState>,
    /// The last time written: its seconds and its text.
    time: (i64, super::Rfc3339),
    summary: String,
}

impl Default for FlowWriter {
    fn default() -> Self {
        Self {
            pods: HashMap::default(),
            ends: HashMap::default(),
            // No flow's seconds: the first time is written whole.
            time: (i64::MIN, super::FlowTime::new(0, 0).rfc3339()),
            summary: String::new(),
        }
    }
}

/// A pod (held, so its address stays its own) and its part of a line.
type CachedPod = (PodRef, Box<[u8]>);

/// Everything an end's part of a line is written from: its shared parts
/// (SPIFFE ID, detail, pod, process name: `Arc`s of the identity cache, the
/// endpoint directory and the decoder's names) by address, the rest by
/// value. The cache holds the end, so an address it is keyed by cannot be
/// freed and reused for other text while it is there; a different address
/// for the same text is only a miss.
#[derive(PartialEq, Eq, Hash)]
struct EndKey {
    kind: EndKind,
    identity_source: flowaudit_policy::IdentitySource,
    spiffe_id: usize,
    identity_detail: usize,
    pod: usize,
    pid: Option<u32>,
    /// 0: no process name.
    process: usize,
    cgroup_id: Option<u64>,
}

impl EndKey {
    fn of(ep: &Endpoint) -> Self {
        EndKey {
            kind: ep.kind,
            identity_source: ep.identity_source,
            spiffe_id: ep.spiffe_id.as_ptr() as usize,
            identity_detail: ep.identity_detail.as_ptr() as usize,
            pod: ep.pod.as_ptr() as usize,
            pid: ep.pid,
            process: ep.process.as_ref().map_or(0, |p| p.as_ptr() as usize),
            cgroup_id: ep.cgroup_id,
        }
    }
}

impl FlowWriter {
    /// Appends `flow` as one compact JSON object (no newline).
    pub fn write(&mut self, out: &mut Vec<u8>, flow: &FlowEvent) {
        write_with(out, flow, self);
    }
}

/// How the parts of a line that repeat between lines are written.
trait Parts {
    /// An end's part: `{"kind":…}`.
    fn endpoint(&mut self, out: &mut Vec<u8>, ep: &Endpoint);
    /// An end's pod part: `,"namespace":…,"labels":{…}`.
    fn pod(&mut self, out: &mut Vec<u8>, pod: &PodRef);
    fn time(&mut self, out: &mut Vec<u8>, time: super::FlowTime);
    fn summary(&mut self, out: &mut Vec<u8>, flow: &FlowEvent);
}

/// Each part written from the flow, nothing kept ([`write_flow`]).
struct Afresh;

impl Parts for Afresh {
    fn endpoint(&mut self, out: &mut Vec<u8>, ep: &Endpoint) {
        endpoint(out, ep, self);
    }

    fn pod(&mut self, out: &mut Vec<u8>, pod: &PodRef) {
        pod_fields(out, pod);
    }

    fn time(&mut self, out: &mut Vec<u8>, time: super::FlowTime) {
        string(out, &time.rfc3339());
    }

    fn summary(&mut self, out: &mut Vec<u8>, flow: &FlowEvent) {
        string(out, flow.summary());
    }
}

impl Parts for FlowWriter {
    fn endpoint(&mut self, out: &mut Vec<u8>, ep: &Endpoint) {
        let key = EndKey::of(ep);
        if let Some((_, bytes)) = self.ends.get(&key) {
            out.extend_from_slice(bytes);
            return;
        }
        if self.ends.len() >= END_CACHE {
            self.ends.clear();
        }
        let start = out.len();
        endpoint(out, ep, self);
        let bytes = out[start..].into();
        self.ends.insert(key, (ep.clone(), bytes));
    }

    fn pod(&mut self, out: &mut Vec<u8>, pod: &PodRef) {
        let key = pod.as_ptr() as usize;
        if let Some((_, bytes)) = self.pods.get(&key) {
            out.extend_from_slice(bytes);
            return;
        }
        if self.pods.len() >= POD_CACHE {
            self.pods.clear();
        }
        let mut bytes = Vec::new();
        pod_fields(&mut bytes, pod);
        out.extend_from_slice(&bytes);
        self.pods
            .insert(key, (pod.clone(), bytes.into_boxed_slice()));
    }

    fn time(&mut self, out: &mut Vec<u8>, time: super::FlowTime) {
        let (secs, text) = &mut self.time;
        // Within a second only the nanoseconds change.
        if *secs != time.secs() || !text.set_nanos(time.nanos()) {
            *secs = time.secs();
            *text = time.rfc3339();
        }
        // Digits and ASCII punctuation: nothing to escape.
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    }

    fn summary(&mut self, out: &mut Vec<u8>, flow: &FlowEvent) {
        match flow.summary.get() {
            Some(known) => string(out, known),
            None => {
                self.summary.clear();
                flow.write_summary(&mut self.summary);
                string(out, &self.summary);
            }
        }
    }
}

fn write_with(out: &mut Vec<u8>, flow: &FlowEvent, parts: &mut impl Parts) {
    out.extend_from_slice(b"{\"time\":");
    parts.time(out, flow.time);
    out.extend_from_slice(b",\"node_name\":");
    string(out, &flow.node_name);
    out.extend_from_slice(b",\"event\":\"");
    out.extend_from_slice(flow.event.as_str().as_bytes());
    out.extend_from_slice(b"\",\"verdict\":\"");
    out.extend_from_slice(flow.verdict.as_str().as_bytes());
    out.extend_from_slice(b"\",\"findings\":[");
    for (i, f) in flow.findings.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"kind\":\"");
        out.extend_from_slice(f.kind.as_str().as_bytes());
        out.extend_from_slice(b"\",\"message\":");
        string(out, &f.message);
        out.push(b'}');
    }
    out.push(b']');
    out.extend_from_slice(b",\"policy_rule\":");
    string(out, &flow.policy_rule);
    out.extend_from_slice(b",\"l4\":{\"protocol\":");
    string(out, &flow.l4.protocol);
    out.extend_from_slice(b",\"source_ip\":");
    ip(out, flow.l4.source_ip);
    out.extend_from_slice(b",\"source_port\":");
    number(out, u64::from(flow.l4.source_port));
    out.extend_from_slice(b",\"destination_ip\":");
    ip(out, flow.l4.destination_ip);
    out.extend_from_slice(b",\"destination_port\":");
    number(out, u64::from(flow.l4.destination_port));
    out.extend_from_slice(b"},\"source\":");
    parts.endpoint(out, &flow.source);
    out.extend_from_slice(b",\"destination\":");
    parts.endpoint(out, &flow.destination);
    out.extend_from_slice(b",\"direction\":\"");
    out.extend_from_slice(flow.direction.as_str().as_bytes());
    out.extend_from_slice(b"\",\"encryption\":");
    encryption(out, &flow.encryption);
    out.extend_from_slice(b",\"bytes_sent\":");
    number(out, flow.bytes_sent);
    out.extend_from_slice(b",\"bytes_received\":");
    number(out, flow.bytes_received);
    out.extend_from_slice(b",\"duration_ms\":");
    number(out, flow.duration_ms);
    out.extend_from_slice(b",\"summary\":");
    parts.summary(out, flow);
    let s = &flow.socket;
    out.extend_from_slice(b",\"socket\":{\"cookie\":");
    number(out, s.cookie);
    out.extend_from_slice(b",\"netns_cookie\":");
    number(out, s.netns_cookie);
    out.extend_from_slice(b",\"process_start_ns\":");
    number(out, s.process_start_ns);
    if let Some(r) = s.failure_reason {
        out.extend_from_slice(b",\"failure_reason\":\"");
        out.extend_from_slice(r.as_str().as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b",\"error\":");
    number(out, u64::from(s.error));
    out.extend_from_slice(b",\"retransmits\":");
    number(out, u64::from(s.retransmits));
    out.push(b'}');
    if let Some(m) = &flow.mutual_auth {
        out.extend_from_slice(b",\"mutual_auth\":");
        serde_part(out, m);
    }
    if let Some(j) = &flow.joined {
        out.extend_from_slice(b",\"joined\":");
        serde_part(out, j);
    }
    out.push(b'}');
}

fn endpoint(out: &mut Vec<u8>, ep: &Endpoint, parts: &mut impl Parts) {
    out.extend_from_slice(b"{\"kind\":\"");
    out.extend_from_slice(end_kind(ep.kind).as_bytes());
    out.extend_from_slice(b"\",\"spiffe_id\":");
    string(out, &ep.spiffe_id);
    out.extend_from_slice(b",\"identity_source\":\"");
    out.extend_from_slice(ep.identity_source.as_str().as_bytes());
    out.push(b'"');
    if !ep.identity_detail.is_empty() {
        out.extend_from_slice(b",\"identity_detail\":");
        string(out, &ep.identity_detail);
    }
    parts.pod(out, &ep.pod);
    if let Some(pid) = ep.pid {
        out.extend_from_slice(b",\"pid\":");
        number(out, u64::from(pid));
    }
    if let Some(p) = &ep.process {
        out.extend_from_slice(b",\"process\":");
        string(out, p);
    }
    if let Some(c) = ep.cgroup_id {
        out.extend_from_slice(b",\"cgroup_id\":");
        number(out, c);
    }
    out.push(b'}');
}

/// An end's pod part: `,"namespace":…,"labels":{…}`.
fn pod_fields(out: &mut Vec<u8>, pod: &PodMeta) {
    out.extend_from_slice(b",\"namespace\":");
    string(out, &pod.namespace);
    out.extend_from_slice(b",\"pod_name\":");
    string(out, &pod.pod_name);
    out.extend_from_slice(b",\"service_account\":");
    string(out, &pod.service_account);
    out.extend_from_slice(b",\"labels\":{");
    for (i, (k, v)) in pod.labels.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, k);
        out.push(b':');
        string(out, v);
    }
    out.push(b'}');
}

fn encryption(out: &mut Vec<u8>, e: &Encryption) {
    out.extend_from_slice(b"{\"state\":\"");
    out.extend_from_slice(e.state.as_str().as_bytes());
    out.extend_from_slice(b"\",\"tls_version\":");
    string(out, &e.tls_version);
    out.extend_from_slice(b",\"sni\":");
    string(out, &e.sni);
    out.extend_from_slice(b",\"alpn\":[");
    for (i, a) in e.alpn.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, a);
    }
    out.push(b']');
    if !e.protocol.is_empty() {
        out.extend_from_slice(b",\"protocol\":");
        string(out, &e.protocol);
    }
    let cert = match e.client_certificate {
        ClientCertificate::Unknown => None,
        ClientCertificate::Sent => Some("SENT"),
        ClientCertificate::NotSent => Some("NOT_SENT"),
        ClientCertificate::Unobservable => Some("UNOBSERVABLE"),
    };
    if let Some(c) = cert {
        out.extend_from_slice(b",\"client_certificate\":\"");
        out.extend_from_slice(c.as_bytes());
        out.push(b'"');
    }
    if e.client_certificate_inferred {
        out.extend_from_slice(b",\"client_certificate_inferred\":true");
    }
    if !e.server_spiffe_id.is_empty() {
        out.extend_from_slice(b",\"server_spiffe_id\":");
        string(out, &e.server_spiffe_id);
    }
    if !e.client_spiffe_id.is_empty() {
        out.extend_from_slice(b",\"client_spiffe_id\":");
        string(out, &e.client_spiffe_id);
    }
    if let Some(reason) = e.unknown_reason {
        out.extend_from_slice(b",\"unknown_reason\":\"");
        out.extend_from_slice(unknown_reason(reason).as_bytes());
        out.push(b'"');
    }
    out.push(b'}');
}

fn unknown_reason(r: UnknownReason) -> &'static str {
    match r {
        UnknownReason::NoPayloadSeen => "no_payload_seen",
        UnknownReason::NotWatched => "not_watched",
        UnknownReason::PayloadLost => "payload_lost",
        UnknownReason::StreamGap => "stream_gap",
        UnknownReason::NotObservable => "not_observable",
    }
}

fn end_kind(k: EndKind) -> &'static str {
    match k {
        EndKind::Pod => "POD",
        EndKind::Host => "HOST",
        EndKind::World => "WORLD",
        EndKind::Unknown => "UNKNOWN",
    }
}

/// A part of the event through serde (compact, the same bytes as inside
/// the whole).
fn serde_part<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, part: &T) {
    // Writing into a Vec cannot fail, and these parts hold no map with
    // non-string keys (the only way serde_json fails).
    serde_json::to_writer(&mut *out, part).expect("a flow event part serialises");
}

fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn ip(out: &mut Vec<u8>, addr: IpAddr) {
    out.push(b'"');
    match addr {
        IpAddr::V4(a) => {
            for (i, octet) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                number(out, u64::from(octet));
            }
        }
        // Display's compression rules; an address has nothing to escape.
        IpAddr::V6(a) => {
            let _ = write!(out, "{a}");
        }
    }
    out.push(b'"');
}

/// A JSON string as serde_json writes it: `"` and `\` escaped, control
/// characters as `\b \t \n \f \r` or `\u00XX`, everything else as is.
fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Nearly every string has nothing to escape: one pass that the
    // compiler can vectorise (no early exit), then one copy.
    let plain = bytes
        .iter()
        .fold(true, |ok, &b| ok & (b >= 0x20 && b != b'"' && b != b'\\'));
    if plain {
        out.extend_from_slice(bytes);
    } else {
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let escape: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                0x08 => b"\\b",
                0x09 => b"\\t",
                0x0a => b"\\n",
                0x0c => b"\\f",
                0x0d => b"\\r",
                0x00..=0x1f => b"",
                _ => continue,
            };
            out.extend_from_slice(&bytes[start..i]);
            if escape.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            } else {
                out.extend_from_slice(escape);
            }
            start = i + 1;
        }
        out.extend_from_slice(&bytes[start..]);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use flowaudit_policy::{EncryptionState, Finding, FindingKind, IdentitySource, Verdict};

    use super::*;
    use crate::capture::Clock;
    use crate::capture::record::KernelEvent;
    use crate::capture::record::tests::sample;
    use crate::flow::{
        Encryption, EventKind, FailureReason, Joined, JoinedHalf, PodMeta, UnknownReason,
    };

    fn same_as_serde(flow: &FlowEvent) {
        let mut ours = Vec::new();
        write_flow(&mut ours, flow);
        let serde = serde_json::to_vec(flow).expect("serialises");
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&serde),
            "the writer and serde's derive disagree"
        );
    }

    fn base() -> FlowEvent {
        let ev = KernelEvent::from_record(&sample()).expect("sample record");
        FlowEvent::from_kernel(&ev, &"precinct-99-worker".into(), &Clock::now())
    }

    #[test]
    fn strings_escape_as_serde_does() {
        let mut all = String::new();
        for c in (0u32..0x80).chain([0xe9, 0x2028, 0x1f600]) {
            all.push(char::from_u32(c).expect("valid char"));
        }
        for s in [
            "",
            "plain",
            "a\"b\\c",
            "\u{7f}",
            all.as_str(),
            "\n",
            "tab\tend",
        ] {
            let mut ours = Vec::new();
            string(&mut ours, s);
            assert_eq!(
                String::from_utf8(ours).expect("utf-8"),
                serde_json::to_string(s).expect("serialises"),
                "{s:?}"
            );
        }
    }

    #[test]
    fn numbers_and_addresses_as_serde_writes_them() {
        for n in [0, 1, 9, 10, 99, 65_535, u64::from(u32::MAX), u64::MAX] {
            let mut ours = Vec::new();
            number(&mut ours, n);
            assert_eq!(String::from_utf8(ours).expect("utf-8"), n.to_string());
        }
        for a in [
            "0.0.0.0",
            "10.244.1.5",
            "255.255.255.255",
            "::",
            "::1",
            "fd00:10:244:1::5",
            "::ffff:10.0.0.1",
            "2001:db8::8a2e:370:7334",
        ] {
            let a: IpAddr = a.parse().expect("address");
            let mut ours = Vec::new();
            ip(&mut ours, a);
            assert_eq!(
                String::from_utf8(ours).expect("utf-8"),
                serde_json::to_string(&a).expect("serialises")
            );
        }
    }

    /// The encryption object and findings in every variant of their enums
    /// and optional fields.
    #[test]
    fn encryption_and_findings_in_every_variant_match_serde() {
        let reasons = [
            None,
            Some(UnknownReason::NoPayloadSeen),
            Some(UnknownReason::NotWatched),
            Some(UnknownReason::PayloadLost),
            Some(UnknownReason::StreamGap),
            Some(UnknownReason::NotObservable),
        ];
        let certs = [
            crate::flow::ClientCertificate::Unknown,
            crate::flow::ClientCertificate::Sent,
            crate::flow::ClientCertificate::NotSent,
            crate::flow::ClientCertificate::Unobservable,
        ];
        let states = [
            EncryptionState::Plaintext,
            EncryptionState::Tls,
            EncryptionState::Mtls,
            EncryptionState::Unknown,
        ];
        let mut f = base();
        let mut n = 0;
        for (i, state) in states.into_iter().enumerate() {
            for (j, cert) in certs.into_iter().enumerate() {
                for (k, reason) in reasons.into_iter().enumerate() {
                    let odd = (i + j + k) % 2 == 1;
                    f.encryption = Arc::new(Encryption {
                        state,
                        tls_version: if odd { "1.2".into() } else { String::new() },
                        sni: if odd {
                            "db.\"x\"".into()
                        } else {
                            String::new()
                        },
                        alpn: (0..k).map(|a| format!("p{a}")).collect(),
                        protocol: if odd {
                            String::new()
                        } else {
                            "postgresql".into()
                        },
                        client_certificate: cert,
                        client_certificate_inferred: odd,
                        server_spiffe_id: if k % 2 == 0 {
                            "spiffe://demo.local/ns/a/sa/s".into()
                        } else {
                            String::new()
                        },
                        client_spiffe_id: if j % 2 == 0 {
                            "spiffe://demo.local/ns/a/sa/c".into()
                        } else {
                            String::new()
                        },
                        unknown_reason: reason,
                    });
                    f.findings = FindingKind::ALL
                        .iter()
                        .take(n % (FindingKind::ALL.len() + 1))
                        .map(|&kind| Finding {
                            kind,
                            message: format!("{kind:?} \u{1}"),
                        })
                        .collect();
                    n += 1;
                    same_as_serde(&f);
                }
            }
        }
        assert_eq!(n, 4 * 4 * 6);
    }

    /// `f` through the caching writer `w`: serde's bytes for `f` with its
    /// summary, and no summary left in `f`.
    fn check(w: &mut FlowWriter, f: &FlowEvent) {
        let mut ours = Vec::new();
        w.write(&mut ours, f);
        assert!(
            f.summary.get().is_none(),
            "the writer keeps no summary in the flow"
        );
        let mut with_summary = f.clone();
        with_summary.summary = f.make_summary().into();
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&serde_json::to_vec(&with_summary).expect("serialises"))
        );
    }

    /// The export file's writer copies each pod's part after its first
    /// line: still serde's bytes, for the same pod again, for a pod changed
    /// after it was cached, and past the cache's size.
    #[test]
    fn the_caching_writer_writes_what_serde_writes_as_pods_change() {
        let mut w = FlowWriter::default();
        let mut f = base();
        f.source.pod = PodMeta {
            namespace: "99-apps".into(),
            pod_name: "frontend-7d9f".into(),
            service_account: "frontend".into(),
            labels: BTreeMap::from([("app".to_string(), "front\"end".to_string())]),
        }
        .into();
        check(&mut w, &f);
        check(&mut w, &f);
        assert_eq!(
            w.pods.len(),
            2,
            "the source's pod and the destination's (the shared empty one)"
        );
        // The cache shares the Arc: make_mut copies the pod first.
        f.source
            .pod
            .make_mut()
            .labels
            .insert("tier".into(), "web".into());
        check(&mut w, &f);
        for i in 0..POD_CACHE + 10 {
            f.destination.pod = PodMeta {
                pod_name: format!("p-{i}").into(),
                ..PodMeta::default()
            }
            .into();
            check(&mut w, &f);
            assert!(w.pods.len() <= POD_CACHE);
        }
    }

    /// The writer copies each end's part after its first line: still
    /// serde's bytes as each thing an end is written from changes (a new
    /// `Arc` for the same text too), and past the cache's size.
    #[test]
    fn the_caching_writer_writes_what_serde_writes_as_ends_change() {
        let mut w = FlowWriter::default();
        let mut f = base();
        check(&mut w, &f);
        check(&mut w, &f);
        assert_eq!(w.ends.len(), 2, "each end once");
        let changes: [&dyn Fn(&mut Endpoint); 9] = [
            &|e| e.kind = EndKind::Pod,
            &|e| e.identity_source = IdentitySource::Attested,
            &|e| e.spiffe_id = "spiffe://demo.local/ns/a/sa/b".into(),
            &|e| e.spiffe_id = "spiffe://demo.local/ns/a/sa/c".into(),
            &|e| e.identity_detail = "derived \"here\"".into(),
            &|e| e.pid = Some(e.pid.map_or(1, |p| p + 1)),
            &|e| e.process = Some("other".into()),
            &|e| e.cgroup_id = Some(e.cgroup_id.map_or(1, |c| c + 1)),
            &|e| e.pod.make_mut().pod_name = "p-0".into(),
        ];
        for change in changes {
            change(&mut f.source);
            check(&mut w, &f);
            change(&mut f.destination);
            check(&mut w, &f);
            check(&mut w, &f);
        }
        for i in 0..END_CACHE as u32 + 10 {
            f.source.pid = Some(i);
            check(&mut w, &f);
            assert!(w.ends.len() <= END_CACHE);
        }
    }

    /// The writer keeps the last time's text: flows in the same second, a
    /// second later, a day and a year apart, back in time, and past the
    /// fixed form's years, each written as serde writes them.
    #[test]
    fn the_caching_writer_writes_each_time_as_serde_does() {
        let mut w = FlowWriter::default();
        let mut f = base();
        for (secs, nanos) in [
            (1_764_950_400, 0),
            (1_764_950_400, 999_999_999),
            (1_764_950_400, 5),
            (1_764_950_401, 5),
            (1_764_950_401, 120_000_000),
            (1_764_950_401 + 86_400, 1),
            (1_764_950_401 + 86_400 * 366, 1),
            (1_764_950_400, 7),
            (-1, 999_999_999),
            (-1, 0),
            (253_402_300_800, 3),
            (253_402_300_800, 4),
            (0, 0),
        ] {
            f.time = crate::flow::FlowTime::new(secs, nanos);
            let mut ours = Vec::new();
            w.write(&mut ours, &f);
            let line: serde_json::Value = serde_json::from_slice(&ours).expect("a JSON line");
            assert_eq!(
                line["time"],
                serde_json::to_value(f.time).expect("serialises"),
                "{secs} s {nanos} ns"
            );
        }
    }

    /// A summary the flow already has (asked for by another sink, or
    /// received with it) is written as it is, escaped.
    #[test]
    fn the_caching_writer_copies_a_summary_the_flow_has() {
        let mut w = FlowWriter::default();
        let mut f = base();
        f.summary = String::from("as \"received\"").into();
        let mut ours = Vec::new();
        w.write(&mut ours, &f);
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&serde_json::to_vec(&f).expect("serialises"))
        );
        let line: serde_json::Value = serde_json::from_slice(&ours).expect("a JSON line");
        assert_eq!(line["summary"], "as \"received\"");
    }

    /// Every optional part, absent and present, and strings that need
    /// escaping, written byte for byte as serde's derive writes them.
    #[test]
    fn events_match_serde_byte_for_byte() {
        let plain = base();
        same_as_serde(&plain);

        let mut full = base();
        full.event = EventKind::Failed;
        full.verdict = Verdict::Violation;
        full.findings = vec![
            Finding {
                kind: FindingKind::NoMatchingRule,
                message: "no rule allows \"frontend\" -> postgresql:5432".into(),
            },
            Finding {
                kind: FindingKind::MtlsMissing,
                message: "plaintext\nwhere mTLS is required".into(),
            },
        ]
        .into();
        full.policy_rule = "frontend-to-backend".into();
        full.l4.source_ip = "fd00:10:244:1::5".parse().expect("address");
        full.l4.destination_ip = "fd00:10:244:1::9".parse().expect("address");
        full.source.kind = EndKind::Pod;
        full.source.spiffe_id = "spiffe://demo.local/ns/99-apps/sa/frontend".into();
        full.source.identity_source = IdentitySource::Attested;
        full.source.pod = PodMeta {
            namespace: "99-apps".into(),
            pod_name: "frontend-7d9f".into(),
            service_account: "frontend".into(),
            labels: BTreeMap::from([
                ("app".to_string(), "frontend".to_string()),
                ("tier\\x".to_string(), "web \u{1}".to_string()),
            ]),
        }
        .into();
        full.destination.kind = EndKind::World;
        full.destination.identity_source = IdentitySource::Derived;
        full.destination.identity_detail = "derived from pod metadata".into();
        full.destination.pid = Some(4321);
        full.destination.process = Some("post\"gres".into());
        full.destination.cgroup_id = Some(77);
        let mut enc = Encryption {
            state: EncryptionState::Tls,
            tls_version: "1.3".into(),
            sni: "backend.99-apps".into(),
            alpn: vec!["h2".into(), "http/1.1".into()],
            protocol: "tls".into(),
            ..Encryption::default()
        };
        enc.unknown_reason = Some(UnknownReason::StreamGap);
        full.encryption = Arc::new(enc);
        full.bytes_sent = u64::MAX;
        full.duration_ms = 12;
        full.summary = full.make_summary().into();
        full.socket.failure_reason = Some(FailureReason::TimedOut);
        full.socket.error = 110;
        full.socket.retransmits = 3;
        full.joined = Some(Box::new(Joined {
            halves: vec![JoinedHalf {
                direction: full.direction,
                node_name: "precinct-99-worker2".into(),
                time: full.time,
                verdict: Verdict::Compliant,
                findings: Vec::new(),
                source_identity: IdentitySource::Attested,
                destination_identity: IdentitySource::Derived,
                bytes_sent: 1,
                bytes_received: 2,
                encryption: EncryptionState::Mtls,
                cookie: 9,
            }],
        }));
        same_as_serde(&full);
        full.mutual_auth = Some(Box::new(flowaudit_policy::MutualAuth::not_observable(
            flowaudit_policy::AuthSide::Ingress,
            "no Cilium maps",
        )));
        same_as_serde(&full);

        for kind in [EndKind::Host, EndKind::Unknown] {
            let mut f = full.clone();
            f.source.kind = kind;
            f.source.pod.make_mut().labels.clear();
            f.source.pid = None;
            f.event = EventKind::Close;
            f.verdict = Verdict::Unknown;
            f.joined = None;
            same_as_serde(&f);
        }
    }

    /// A typical storm line for [`json_line_workload`]: both ends pods
    /// with labels and attested IDs, a plaintext flow, its summary written
    /// by the writer. `i` varies the ports, the time and the byte counts.
    /// The shared parts are shared, as in the agent (the decoder's process
    /// names, the identity cache's IDs, the directory's pods).
    fn typical(
        i: u64,
        pods: &[PodRef; 2],
        ids: &[crate::flow::ArcStr; 2],
        process: &crate::flow::ArcStr,
    ) -> FlowEvent {
        let mut f = base();
        f.time = crate::flow::FlowTime::new(
            1_796_600_000 + (i / 20_000) as i64,
            (i * 50_000 % 1_000_000_000) as u32,
        );
        f.l4.source_port = 30_000 + (i % 30_000) as u16;
        f.bytes_sent = 200 + i % 300;
        f.bytes_received = 10 + i % 50;
        f.duration_ms = i % 40;
        for (ep, (pod, id)) in [&mut f.source, &mut f.destination]
            .into_iter()
            .zip(pods.iter().zip(ids))
        {
            ep.kind = EndKind::Pod;
            ep.identity_source = IdentitySource::Attested;
            ep.spiffe_id = id.clone();
            ep.pod = pod.clone();
            ep.pid = Some(4000 + (i % 100) as u32);
            ep.process = Some(process.clone());
            ep.cgroup_id = Some(12_345);
        }
        f.verdict = Verdict::Compliant;
        f.policy_rule = "frontend-to-backend".into();
        f
    }

    /// Lines of [`json_line_workload`].
    const COUNTED_LINES: u64 = 100_000;

    /// 100,000 storm-like lines through one caching writer: the workload
    /// whose instructions [`json_line_instructions`] counts.
    #[test]
    #[ignore = "run by `json_line_instructions` under callgrind"]
    fn json_line_workload() {
        let pod = |name: &str, sa: &str| -> PodRef {
            PodMeta {
                namespace: "99-apps".into(),
                pod_name: name.into(),
                service_account: sa.into(),
                labels: BTreeMap::from([
                    ("app".to_string(), sa.to_string()),
                    ("pod-template-hash".to_string(), "7d9f6c5b4".to_string()),
                ]),
            }
            .into()
        };
        let pods = [
            pod("frontend-7d9f6c5b4-x2x9q", "frontend"),
            pod("backend-5c8d7-kq4m2", "backend"),
        ];
        let ids: [crate::flow::ArcStr; 2] = [
            "spiffe://demo.local/ns/99-apps/sa/frontend".into(),
            "spiffe://demo.local/ns/99-apps/sa/backend".into(),
        ];
        let process = crate::flow::ArcStr::from("simpod");
        let flows: Vec<FlowEvent> = (0..COUNTED_LINES)
            .map(|i| typical(i, &pods, &ids, &process))
            .collect();
        let mut w = FlowWriter::default();
        let mut out = Vec::with_capacity(1 << 20);
        let mut total = 0;
        for f in &flows {
            if out.len() > (1 << 20) - 4096 {
                total += out.len();
                out.clear();
            }
            w.write(&mut out, f);
            out.push(b'\n');
        }
        total += out.len();
        assert!(total as u64 > COUNTED_LINES * 500, "{total} bytes");
    }

    /// Instructions of the export file's JSON writer per line: a count, not
    /// a time (callgrind, inside `FlowWriter::write`, over
    /// [`json_line_workload`]). Run with `cargo test --release -p flowaudit
    /// json_line_instructions -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, run by `cargo xtask bench`"]
    fn json_line_instructions() {
        let counted = crate::pipeline::bench::callgrind_count(
            "flow::json::tests::json_line_workload",
            &["flowaudit::flow::json::FlowWriter::write"],
        );
        assert!(
            counted > COUNTED_LINES * 100,
            "callgrind counted {counted} instructions for {COUNTED_LINES} lines: FlowWriter::write was not found by name (inlined or renamed?)"
        );
        crate::pipeline::bench::result(
            "json_line_instructions",
            "export file: JSON writer instructions per flow line",
            counted as f64 / COUNTED_LINES as f64,
            "instructions",
            "",
            true,
            &format!(
                "{counted} instructions (valgrind callgrind, inside FlowWriter::write) for {COUNTED_LINES} storm-like lines (both ends pods with labels and attested IDs, repeating as a busy pair's do); a count, not a time: it does not move with the machine's load"
            ),
        );
    }
}
