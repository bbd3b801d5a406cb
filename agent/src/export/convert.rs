//! Conversions between [`FlowEvent`] and `flowaudit.v1.Flow` (which mirrors
//! the JSON form field for field, so a flow survives the round trip
//! unchanged), the enums both ways, and protobuf timestamps as RFC 3339.

use std::net::IpAddr;

use flowaudit_policy::{
    AuthSide, EncryptionState, FindingKind, IdentitySource, MutualAuth, MutualAuthState,
    PathEncryption, Verdict,
};

use super::proto;
use crate::flow::{
    ClientCertificate, Direction, Encryption, EndKind, Endpoint, EventKind, FailureReason, Finding,
    FlowEvent, FlowTime, Joined, JoinedHalf, L4, Socket,
};
use crate::flow::{PodMeta, UnknownReason};

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("flow message has no {0}")]
    Missing(&'static str),
    #[error("flow message has an invalid {what}: {value}")]
    Invalid { what: &'static str, value: String },
}

pub fn verdict_to(v: Verdict) -> proto::Verdict {
    match v {
        Verdict::Compliant => proto::Verdict::Compliant,
        Verdict::Violation => proto::Verdict::Violation,
        Verdict::Unknown => proto::Verdict::Unknown,
    }
}

pub fn verdict_from(v: i32) -> Option<Verdict> {
    match proto::Verdict::try_from(v).ok()? {
        proto::Verdict::Compliant => Some(Verdict::Compliant),
        proto::Verdict::Violation => Some(Verdict::Violation),
        proto::Verdict::Unknown => Some(Verdict::Unknown),
        proto::Verdict::Unspecified => None,
    }
}

pub fn finding_to(k: FindingKind) -> proto::FindingKind {
    match k {
        FindingKind::NoMatchingRule => proto::FindingKind::NoMatchingRule,
        FindingKind::DeniedByRule => proto::FindingKind::DeniedByRule,
        FindingKind::MtlsMissing => proto::FindingKind::MtlsMissing,
        FindingKind::MtlsUnverified => proto::FindingKind::MtlsUnverified,
        FindingKind::UnknownIdentity => proto::FindingKind::UnknownIdentity,
        FindingKind::IntendedFlowFailed => proto::FindingKind::IntendedFlowFailed,
        FindingKind::IdentityMismatch => proto::FindingKind::IdentityMismatch,
        FindingKind::MutualAuthMissing => proto::FindingKind::MutualAuthMissing,
        FindingKind::MutualAuthUnencrypted => proto::FindingKind::MutualAuthUnencrypted,
    }
}

pub fn finding_from(k: i32) -> Option<FindingKind> {
    Some(match proto::FindingKind::try_from(k).ok()? {
        proto::FindingKind::NoMatchingRule => FindingKind::NoMatchingRule,
        proto::FindingKind::DeniedByRule => FindingKind::DeniedByRule,
        proto::FindingKind::MtlsMissing => FindingKind::MtlsMissing,
        proto::FindingKind::MtlsUnverified => FindingKind::MtlsUnverified,
        proto::FindingKind::UnknownIdentity => FindingKind::UnknownIdentity,
        proto::FindingKind::IntendedFlowFailed => FindingKind::IntendedFlowFailed,
        proto::FindingKind::IdentityMismatch => FindingKind::IdentityMismatch,
        proto::FindingKind::MutualAuthMissing => FindingKind::MutualAuthMissing,
        proto::FindingKind::MutualAuthUnencrypted => FindingKind::MutualAuthUnencrypted,
        proto::FindingKind::Unspecified => return None,
    })
}

pub fn event_to(e: EventKind) -> proto::EventKind {
    match e {
        EventKind::Connect => proto::EventKind::Connect,
        EventKind::Close => proto::EventKind::Close,
        EventKind::Failed => proto::EventKind::Failed,
    }
}

pub fn event_from(e: i32) -> Option<EventKind> {
    Some(match proto::EventKind::try_from(e).ok()? {
        proto::EventKind::Connect => EventKind::Connect,
        proto::EventKind::Close => EventKind::Close,
        proto::EventKind::Failed => EventKind::Failed,
        proto::EventKind::Unspecified => return None,
    })
}

pub fn encryption_to(s: EncryptionState) -> proto::EncryptionState {
    match s {
        EncryptionState::Plaintext => proto::EncryptionState::Plaintext,
        EncryptionState::Tls => proto::EncryptionState::Tls,
        EncryptionState::Mtls => proto::EncryptionState::Mtls,
        EncryptionState::Unknown => proto::EncryptionState::Unknown,
    }
}

pub fn client_cert_to(c: ClientCertificate) -> proto::ClientCertificate {
    match c {
        ClientCertificate::Unknown => proto::ClientCertificate::Unknown,
        ClientCertificate::Sent => proto::ClientCertificate::Sent,
        ClientCertificate::NotSent => proto::ClientCertificate::NotSent,
        ClientCertificate::Unobservable => proto::ClientCertificate::Unobservable,
    }
}

/// Unset or unknown values read as UNKNOWN (older agents do not send it).
pub fn client_cert_from(c: i32) -> ClientCertificate {
    match proto::ClientCertificate::try_from(c) {
        Ok(proto::ClientCertificate::Sent) => ClientCertificate::Sent,
        Ok(proto::ClientCertificate::NotSent) => ClientCertificate::NotSent,
        Ok(proto::ClientCertificate::Unobservable) => ClientCertificate::Unobservable,
        _ => ClientCertificate::Unknown,
    }
}

pub fn encryption_from(s: i32) -> Option<EncryptionState> {
    Some(match proto::EncryptionState::try_from(s).ok()? {
        proto::EncryptionState::Plaintext => EncryptionState::Plaintext,
        proto::EncryptionState::Tls => EncryptionState::Tls,
        proto::EncryptionState::Mtls => EncryptionState::Mtls,
        proto::EncryptionState::Unknown => EncryptionState::Unknown,
        proto::EncryptionState::Unspecified => return None,
    })
}

fn identity_source_to(s: IdentitySource) -> proto::IdentitySource {
    match s {
        IdentitySource::Attested => proto::IdentitySource::Attested,
        IdentitySource::Derived => proto::IdentitySource::Derived,
        IdentitySource::Unknown => proto::IdentitySource::Unknown,
    }
}

fn identity_source_from(s: i32) -> IdentitySource {
    match proto::IdentitySource::try_from(s) {
        Ok(proto::IdentitySource::Attested) => IdentitySource::Attested,
        Ok(proto::IdentitySource::Derived) => IdentitySource::Derived,
        _ => IdentitySource::Unknown,
    }
}

fn failure_to(r: Option<FailureReason>) -> proto::FailureReason {
    match r {
        None => proto::FailureReason::Unspecified,
        Some(FailureReason::Refused) => proto::FailureReason::Refused,
        Some(FailureReason::Reset) => proto::FailureReason::Reset,
        Some(FailureReason::TimedOut) => proto::FailureReason::TimedOut,
        Some(FailureReason::Unreachable) => proto::FailureReason::Unreachable,
        Some(FailureReason::Aborted) => proto::FailureReason::Aborted,
        Some(FailureReason::Error) => proto::FailureReason::Error,
        Some(FailureReason::Unknown) => proto::FailureReason::Unknown,
    }
}

fn failure_from(r: i32) -> Option<FailureReason> {
    Some(match proto::FailureReason::try_from(r).ok()? {
        proto::FailureReason::Unspecified => return None,
        proto::FailureReason::Refused => FailureReason::Refused,
        proto::FailureReason::Reset => FailureReason::Reset,
        proto::FailureReason::TimedOut => FailureReason::TimedOut,
        proto::FailureReason::Unreachable => FailureReason::Unreachable,
        proto::FailureReason::Aborted => FailureReason::Aborted,
        proto::FailureReason::Error => FailureReason::Error,
        proto::FailureReason::Unknown => FailureReason::Unknown,
    })
}

fn end_kind_to(k: EndKind) -> proto::EndKind {
    match k {
        EndKind::Pod => proto::EndKind::Pod,
        EndKind::Host => proto::EndKind::Host,
        EndKind::World => proto::EndKind::World,
        EndKind::Unknown => proto::EndKind::Unknown,
    }
}

fn end_kind_from(k: i32) -> EndKind {
    match proto::EndKind::try_from(k) {
        Ok(proto::EndKind::Pod) => EndKind::Pod,
        Ok(proto::EndKind::Host) => EndKind::Host,
        Ok(proto::EndKind::World) => EndKind::World,
        _ => EndKind::Unknown,
    }
}

fn endpoint_to(e: &Endpoint) -> proto::Endpoint {
    proto::Endpoint {
        kind: end_kind_to(e.kind) as i32,
        spiffe_id: e.spiffe_id.to_string(),
        identity_source: identity_source_to(e.identity_source) as i32,
        identity_detail: e.identity_detail.to_string(),
        namespace: e.pod.namespace.to_string(),
        pod_name: e.pod.pod_name.to_string(),
        service_account: e.pod.service_account.to_string(),
        labels: e
            .pod
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        pid: e.pid,
        process: e.process.as_ref().map(|p| p.to_string()),
        cgroup_id: e.cgroup_id,
    }
}

fn endpoint_from(e: proto::Endpoint) -> Endpoint {
    Endpoint {
        kind: end_kind_from(e.kind),
        identity_source: identity_source_from(e.identity_source),
        identity_detail: e.identity_detail.into(),
        spiffe_id: e.spiffe_id.into(),
        pod: PodMeta {
            namespace: e.namespace.into(),
            pod_name: e.pod_name.into(),
            service_account: e.service_account.into(),
            labels: e.labels.into_iter().collect(),
        }
        .into(),
        pid: e.pid,
        process: e.process.map(Into::into),
        cgroup_id: e.cgroup_id,
    }
}

/// Parses RFC 3339 (see [`crate::flow::parse_rfc3339`]) into a
/// protobuf timestamp.
pub fn parse_rfc3339(text: &str) -> Option<prost_types::Timestamp> {
    let (seconds, nanos) = crate::flow::parse_rfc3339(text)?;
    Some(prost_types::Timestamp {
        seconds,
        nanos: nanos as i32,
    })
}

/// A flow time from a timestamp: one before the epoch is the epoch, and
/// nanoseconds out of range are cut into it.
pub fn flow_time(t: &prost_types::Timestamp) -> FlowTime {
    FlowTime::new(
        t.seconds.max(0),
        u32::try_from(t.nanos).unwrap_or(0).min(999_999_999),
    )
}

/// A timestamp's RFC 3339 text (see [`flow_time`]).
pub fn timestamp_to_rfc3339(t: &prost_types::Timestamp) -> String {
    flow_time(t).to_string()
}

fn timestamp(t: FlowTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.secs(),
        nanos: t.nanos() as i32,
    }
}

fn mutual_auth_to(m: &MutualAuth) -> proto::MutualAuth {
    proto::MutualAuth {
        state: match m.state {
            MutualAuthState::Authenticated => proto::MutualAuthState::Authenticated,
            MutualAuthState::Expired => proto::MutualAuthState::Expired,
            MutualAuthState::Missing => proto::MutualAuthState::Missing,
            MutualAuthState::NotObservable => proto::MutualAuthState::NotObservable,
        } as i32,
        enforced_on: match m.enforced_on {
            AuthSide::Ingress => proto::Direction::Ingress,
            AuthSide::Egress => proto::Direction::Egress,
        } as i32,
        local_identity: m.local_identity,
        remote_identity: m.remote_identity,
        remote_node_id: u32::from(m.remote_node_id),
        expires: parse_rfc3339(&m.expires),
        path_encryption: match m.path_encryption {
            PathEncryption::SameNode => proto::PathEncryption::SameNode,
            PathEncryption::Encrypted => proto::PathEncryption::Encrypted,
            PathEncryption::Unencrypted => proto::PathEncryption::Unencrypted,
            PathEncryption::Unknown => proto::PathEncryption::Unknown,
        } as i32,
        detail: m.detail.clone(),
    }
}

fn mutual_auth_from(m: proto::MutualAuth) -> Result<MutualAuth, ConvertError> {
    let invalid = |what: &'static str, value: i32| ConvertError::Invalid {
        what,
        value: value.to_string(),
    };
    Ok(MutualAuth {
        state: match proto::MutualAuthState::try_from(m.state) {
            Ok(proto::MutualAuthState::Authenticated) => MutualAuthState::Authenticated,
            Ok(proto::MutualAuthState::Expired) => MutualAuthState::Expired,
            Ok(proto::MutualAuthState::Missing) => MutualAuthState::Missing,
            Ok(proto::MutualAuthState::NotObservable) => MutualAuthState::NotObservable,
            _ => return Err(invalid("mutual_auth.state", m.state)),
        },
        enforced_on: match proto::Direction::try_from(m.enforced_on) {
            Ok(proto::Direction::Ingress) => AuthSide::Ingress,
            Ok(proto::Direction::Egress) => AuthSide::Egress,
            _ => return Err(invalid("mutual_auth.enforced_on", m.enforced_on)),
        },
        local_identity: m.local_identity,
        remote_identity: m.remote_identity,
        remote_node_id: u16::try_from(m.remote_node_id).map_err(|_| ConvertError::Invalid {
            what: "mutual_auth.remote_node_id",
            value: m.remote_node_id.to_string(),
        })?,
        expires: m
            .expires
            .as_ref()
            .map(timestamp_to_rfc3339)
            .unwrap_or_default(),
        // A newer agent's value reads as unknown.
        path_encryption: match proto::PathEncryption::try_from(m.path_encryption) {
            Ok(proto::PathEncryption::SameNode) => PathEncryption::SameNode,
            Ok(proto::PathEncryption::Encrypted) => PathEncryption::Encrypted,
            Ok(proto::PathEncryption::Unencrypted) => PathEncryption::Unencrypted,
            _ => PathEncryption::Unknown,
        },
        detail: m.detail,
    })
}

pub fn flow_to_proto(f: &FlowEvent) -> proto::Flow {
    proto::Flow {
        time: Some(timestamp(f.time)),
        node_name: f.node_name.to_string(),
        event: event_to(f.event) as i32,
        verdict: verdict_to(f.verdict) as i32,
        findings: findings_to(&f.findings),
        policy_rule: f.policy_rule.to_string(),
        l4: Some(proto::L4 {
            protocol: f.l4.protocol.to_string(),
            source_ip: f.l4.source_ip.to_string(),
            source_port: u32::from(f.l4.source_port),
            destination_ip: f.l4.destination_ip.to_string(),
            destination_port: u32::from(f.l4.destination_port),
        }),
        source: Some(endpoint_to(&f.source)),
        destination: Some(endpoint_to(&f.destination)),
        direction: direction_to(f.direction) as i32,
        encryption: Some(proto::Encryption {
            state: encryption_to(f.encryption.state) as i32,
            tls_version: f.encryption.tls_version.clone(),
            sni: f.encryption.sni.clone(),
            alpn: f.encryption.alpn.clone(),
            protocol: f.encryption.protocol.clone(),
            client_certificate: client_cert_to(f.encryption.client_certificate) as i32,
            client_certificate_inferred: f.encryption.client_certificate_inferred,
            server_spiffe_id: f.encryption.server_spiffe_id.clone(),
            client_spiffe_id: f.encryption.client_spiffe_id.clone(),
            unknown_reason: f
                .encryption
                .unknown_reason
                .map_or("", UnknownReason::as_str)
                .to_owned(),
        }),
        bytes_sent: f.bytes_sent,
        bytes_received: f.bytes_received,
        duration_ms: f.duration_ms,
        summary: f.summary().to_owned(),
        socket: Some(proto::Socket {
            cookie: f.socket.cookie,
            netns_cookie: f.socket.netns_cookie,
            process_start_ns: f.socket.process_start_ns,
            failure_reason: failure_to(f.socket.failure_reason) as i32,
            error: f.socket.error,
            retransmits: f.socket.retransmits,
        }),
        mutual_auth: f.mutual_auth.as_deref().map(mutual_auth_to),
        joined: f.joined.as_ref().map(|j| proto::Joined {
            halves: j.halves.iter().map(half_to).collect(),
        }),
    }
}

fn findings_to(findings: &[Finding]) -> Vec<proto::Finding> {
    findings
        .iter()
        .map(|x| proto::Finding {
            kind: finding_to(x.kind) as i32,
            message: x.message.clone(),
        })
        .collect()
}

fn findings_from(findings: Vec<proto::Finding>) -> Result<Vec<Finding>, ConvertError> {
    findings
        .into_iter()
        .map(|x| {
            Ok(Finding {
                kind: finding_from(x.kind).ok_or_else(|| ConvertError::Invalid {
                    what: "finding kind",
                    value: x.kind.to_string(),
                })?,
                message: x.message,
            })
        })
        .collect()
}

fn direction_to(d: Direction) -> proto::Direction {
    match d {
        Direction::Egress => proto::Direction::Egress,
        Direction::Ingress => proto::Direction::Ingress,
    }
}

fn direction_from(d: i32) -> Result<Direction, ConvertError> {
    match proto::Direction::try_from(d) {
        Ok(proto::Direction::Egress) => Ok(Direction::Egress),
        Ok(proto::Direction::Ingress) => Ok(Direction::Ingress),
        _ => Err(ConvertError::Invalid {
            what: "direction",
            value: d.to_string(),
        }),
    }
}

fn half_to(h: &JoinedHalf) -> proto::JoinedHalf {
    proto::JoinedHalf {
        direction: direction_to(h.direction) as i32,
        node_name: h.node_name.to_string(),
        time: Some(timestamp(h.time)),
        verdict: verdict_to(h.verdict) as i32,
        findings: findings_to(&h.findings),
        source_identity: identity_source_to(h.source_identity) as i32,
        destination_identity: identity_source_to(h.destination_identity) as i32,
        bytes_sent: h.bytes_sent,
        bytes_received: h.bytes_received,
        encryption: encryption_to(h.encryption) as i32,
        cookie: h.cookie,
    }
}

fn half_from(h: proto::JoinedHalf) -> Result<JoinedHalf, ConvertError> {
    Ok(JoinedHalf {
        direction: direction_from(h.direction)?,
        node_name: h.node_name.into(),
        time: h
            .time
            .as_ref()
            .map(flow_time)
            .ok_or(ConvertError::Missing("joined half time"))?,
        verdict: verdict_from(h.verdict).ok_or_else(|| ConvertError::Invalid {
            what: "joined half verdict",
            value: h.verdict.to_string(),
        })?,
        findings: findings_from(h.findings)?,
        source_identity: identity_source_from(h.source_identity),
        destination_identity: identity_source_from(h.destination_identity),
        bytes_sent: h.bytes_sent,
        bytes_received: h.bytes_received,
        encryption: encryption_from(h.encryption).unwrap_or(EncryptionState::Unknown),
        cookie: h.cookie,
    })
}

pub fn flow_from_proto(f: proto::Flow) -> Result<FlowEvent, ConvertError> {
    let invalid = |what: &'static str, value: String| ConvertError::Invalid { what, value };
    let l4 = f.l4.ok_or(ConvertError::Missing("l4"))?;
    let ip = |what, s: &str| s.parse::<IpAddr>().map_err(|_| invalid(what, s.to_owned()));
    let port = |what, p: u32| u16::try_from(p).map_err(|_| invalid(what, p.to_string()));
    let enc = f.encryption.unwrap_or_default();
    let socket = f.socket.unwrap_or_default();
    Ok(FlowEvent {
        time: f
            .time
            .as_ref()
            .map(flow_time)
            .ok_or(ConvertError::Missing("time"))?,
        node_name: f.node_name.into(),
        event: event_from(f.event).ok_or_else(|| invalid("event", f.event.to_string()))?,
        verdict: verdict_from(f.verdict)
            .ok_or_else(|| invalid("verdict", f.verdict.to_string()))?,
        findings: findings_from(f.findings)?.into(),
        policy_rule: f.policy_rule.into(),
        l4: L4 {
            protocol: l4.protocol.into(),
            source_ip: ip("source_ip", &l4.source_ip)?,
            source_port: port("source_port", l4.source_port)?,
            destination_ip: ip("destination_ip", &l4.destination_ip)?,
            destination_port: port("destination_port", l4.destination_port)?,
        },
        source: endpoint_from(f.source.ok_or(ConvertError::Missing("source"))?),
        destination: endpoint_from(f.destination.ok_or(ConvertError::Missing("destination"))?),
        direction: direction_from(f.direction)?,
        encryption: std::sync::Arc::new(Encryption {
            state: encryption_from(enc.state).unwrap_or(EncryptionState::Unknown),
            tls_version: enc.tls_version,
            sni: enc.sni,
            alpn: enc.alpn,
            protocol: enc.protocol,
            client_certificate: client_cert_from(enc.client_certificate),
            client_certificate_inferred: enc.client_certificate_inferred,
            server_spiffe_id: enc.server_spiffe_id,
            client_spiffe_id: enc.client_spiffe_id,
            // An unknown name (a newer agent) reads as no reason.
            unknown_reason: UnknownReason::from_name(&enc.unknown_reason),
        }),
        bytes_sent: f.bytes_sent,
        bytes_received: f.bytes_received,
        duration_ms: f.duration_ms,
        summary: f.summary.into(),
        socket: Socket {
            cookie: socket.cookie,
            netns_cookie: socket.netns_cookie,
            process_start_ns: socket.process_start_ns,
            failure_reason: failure_from(socket.failure_reason),
            error: socket.error,
            retransmits: socket.retransmits,
        },
        mutual_auth: f
            .mutual_auth
            .map(|m| mutual_auth_from(m).map(Box::new))
            .transpose()?,
        joined: f
            .joined
            .map(|j| {
                Ok::<_, ConvertError>(Box::new(Joined {
                    halves: j
                        .halves
                        .into_iter()
                        .map(half_from)
                        .collect::<Result<_, _>>()?,
                }))
            })
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::hub::tests::sample_flow;

    #[test]
    fn a_flow_survives_the_protobuf_round_trip() {
        let mut f = sample_flow();
        f.source
            .pod
            .make_mut()
            .labels
            .insert("app".into(), "frontend".into());
        f.source.spiffe_id = "spiffe://demo.local/ns/99-apps/sa/frontend".into();
        f.findings.push(crate::flow::Finding {
            kind: flowaudit_policy::FindingKind::MtlsMissing,
            message: "plaintext".into(),
        });
        f.socket.failure_reason = Some(crate::flow::FailureReason::TimedOut);
        std::sync::Arc::make_mut(&mut f.encryption).alpn = vec!["h2".into()];
        std::sync::Arc::make_mut(&mut f.encryption).state = flowaudit_policy::EncryptionState::Mtls;
        std::sync::Arc::make_mut(&mut f.encryption).protocol = "tls".into();
        std::sync::Arc::make_mut(&mut f.encryption).client_certificate =
            crate::flow::ClientCertificate::Sent;
        std::sync::Arc::make_mut(&mut f.encryption).client_certificate_inferred = true;
        std::sync::Arc::make_mut(&mut f.encryption).server_spiffe_id =
            "spiffe://demo.local/ns/99-apps/sa/backend".into();
        std::sync::Arc::make_mut(&mut f.encryption).client_spiffe_id =
            "spiffe://demo.local/ns/99-apps/sa/frontend".into();
        let back = flow_from_proto(flow_to_proto(&f)).unwrap();
        assert_eq!(back, f);
        // Cilium's answer, every state, both sides.
        for (i, state) in flowaudit_policy::MutualAuthState::ALL
            .into_iter()
            .enumerate()
        {
            f.mutual_auth = Some(Box::new(flowaudit_policy::MutualAuth {
                state,
                enforced_on: if i % 2 == 0 {
                    flowaudit_policy::AuthSide::Ingress
                } else {
                    flowaudit_policy::AuthSide::Egress
                },
                local_identity: 20_001,
                remote_identity: 30_001,
                remote_node_id: 5,
                expires: "2026-12-02T08:00:00.000000512Z".into(),
                path_encryption: flowaudit_policy::PathEncryption::Encrypted,
                detail: "path encrypted by WireGuard".into(),
            }));
            f.findings[0].kind = flowaudit_policy::FindingKind::MutualAuthMissing;
            let back = flow_from_proto(flow_to_proto(&f)).unwrap();
            assert_eq!(back, f, "{state:?}");
        }
    }

    #[test]
    fn rfc3339_parses_offsets_and_fractions() {
        let t = parse_rfc3339("2026-11-28T12:00:01.123456789Z").unwrap();
        assert_eq!((t.seconds, t.nanos), (1_795_867_201, 123_456_789));
        let t = parse_rfc3339("2026-11-28T14:00:01.5+02:00").unwrap();
        assert_eq!((t.seconds, t.nanos), (1_795_867_201, 500_000_000));
        assert_eq!(timestamp_to_rfc3339(&t), "2026-11-28T12:00:01.500000000Z");
        for bad in [
            "2026-11-28",
            "2026-13-01T00:00:00Z",
            "2026-11-28T12:00:01",
            "x026-11-28T12:00:01Z",
            "2026-11-28T12:00:01.Z",
        ] {
            assert!(parse_rfc3339(bad).is_none(), "{bad}");
        }
    }
}
