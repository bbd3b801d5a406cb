//! Builds a `FlowEvent` from a `KernelEvent`: orients the 4-tuple from the
//! client (source) to the server (destination), puts the owning process on
//! the end whose socket the kernel saw, and computes bytes and duration.
//! Identity and verdict start UNKNOWN; later stages fill them.

use std::sync::Arc;

use flowaudit_common::SocketSide;
use flowaudit_policy::Verdict;

use crate::capture::Clock;
use crate::capture::record::KernelEvent;
use crate::flow::{
    ArcStr, Direction, Endpoint, EventKind, FailureReason, FlowEvent, L4, Socket, Summary,
};

impl FlowEvent {
    /// `from_kernel`, written straight into its `Arc`: the pipeline's flows
    /// live there from the start, and building one on the stack first cost
    /// a copy of the whole event into memory the cache no longer held (the
    /// stream's buffer keeps thousands of flows, so a new flow lands where
    /// one dropped long ago lived).
    pub fn shared_from_kernel(ev: &KernelEvent, node_name: &ArcStr, clock: &Clock) -> Arc<Self> {
        let mut slot = Arc::<Self>::new_uninit();
        Arc::get_mut(&mut slot)
            .expect("a new Arc has no other owner")
            .write(Self::from_kernel(ev, node_name, clock));
        // SAFETY: the value was written just above.
        unsafe { slot.assume_init() }
    }

    #[inline(always)]
    pub fn from_kernel(ev: &KernelEvent, node_name: &ArcStr, clock: &Clock) -> Self {
        let event = ev.kind;
        let mut local = Endpoint::unknown();
        if let Some(owner) = &ev.owner {
            // 0: the process is not numbered in the agent's pid namespace,
            // or pids cannot be translated (the pid_namespace degradation).
            local.pid = (owner.tgid != 0).then_some(owner.tgid);
            local.process = Some(owner.comm.clone());
            local.cgroup_id = Some(owner.cgroup_id);
        }
        let remote = Endpoint::unknown();
        // bytes_sent/received are from the source's point of view: what the
        // client sent to the server and got back.
        let (direction, source, destination, src, dst, bytes_sent, bytes_received) = match ev.side {
            SocketSide::Active => (
                Direction::Egress,
                local,
                remote,
                ev.local,
                ev.remote,
                ev.bytes_sent,
                ev.bytes_received,
            ),
            SocketSide::Passive => (
                Direction::Ingress,
                remote,
                local,
                ev.remote,
                ev.local,
                ev.bytes_received,
                ev.bytes_sent,
            ),
        };
        let duration_ns = match ev.kind {
            EventKind::Connect => 0,
            EventKind::Close => ev.ts_ns.saturating_sub(ev.established_ns),
            EventKind::Failed => ev.ts_ns.saturating_sub(ev.start_ns),
        };
        // The summary is written once, when the flow is judged (pipeline `emit`).
        FlowEvent {
            time: clock.flow_time(ev.ts_ns),
            node_name: node_name.clone(),
            event,
            verdict: Verdict::Unknown,
            findings: Default::default(),
            policy_rule: ArcStr::new(),
            l4: L4 {
                protocol: arcstr::literal!("TCP"),
                source_ip: src.ip(),
                source_port: src.port(),
                destination_ip: dst.ip(),
                destination_port: dst.port(),
            },
            source,
            destination,
            direction,
            encryption: super::encryption::not_seen_yet(),
            bytes_sent,
            bytes_received,
            duration_ms: duration_ns / 1_000_000,
            summary: Summary::default(),
            socket: Socket {
                cookie: ev.sock_cookie,
                netns_cookie: ev.netns_cookie,
                process_start_ns: ev.owner.as_ref().map_or(0, |o| o.start_boottime_ns),
                failure_reason: (ev.kind == EventKind::Failed)
                    .then(|| FailureReason::classify(ev.error)),
                error: ev.error,
                retransmits: ev.retransmits,
            },
            mutual_auth: None,
            joined: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::record::tests::sample;
    use flowaudit_common::RecordKind;

    #[test]
    fn egress_close_puts_the_process_on_the_source() {
        let ev = KernelEvent::from_record(&sample()).unwrap();
        let f = FlowEvent::from_kernel(&ev, &"n1".into(), &Clock::now());
        assert_eq!(f.event, EventKind::Close);
        assert_eq!(f.direction, Direction::Egress);
        assert_eq!(f.source.pid, Some(1234));
        assert_eq!(f.destination.pid, None);
        assert_eq!((f.l4.source_port, f.l4.destination_port), (43122, 5432));
        assert_eq!((f.bytes_sent, f.bytes_received), (10, 20));
        assert_eq!(f.duration_ms, 1); // 3.0 ms - 1.5 ms
        assert_eq!(f.verdict, Verdict::Unknown);
    }

    #[test]
    fn ingress_swaps_ends_and_byte_directions() {
        let mut r = sample();
        r.side = SocketSide::Passive as u8;
        let ev = KernelEvent::from_record(&r).unwrap();
        let f = FlowEvent::from_kernel(&ev, &"n1".into(), &Clock::now());
        assert_eq!(f.direction, Direction::Ingress);
        // The passive socket's local end is the server: the destination.
        assert_eq!(
            f.l4.destination_ip,
            "10.244.1.5".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(f.destination.pid, Some(1234));
        assert_eq!((f.bytes_sent, f.bytes_received), (20, 10));
    }

    #[test]
    fn failed_attempt_carries_reason_and_json_shape() {
        let mut r = sample();
        r.kind = RecordKind::Failed as u8;
        r.error = libc::ECONNREFUSED as u32;
        let ev = KernelEvent::from_record(&r).unwrap();
        let f = FlowEvent::from_kernel(&ev, &"n1".into(), &Clock::now());
        assert_eq!(f.socket.failure_reason, Some(FailureReason::Refused));
        assert_eq!(f.duration_ms, 2);
        // Written when first asked for, as a sink would.
        let summary = f.summary();
        assert!(summary.contains("failed: refused"), "{summary}");
        let v: serde_json::Value = serde_json::to_value(&f).unwrap();
        for key in [
            "time",
            "node_name",
            "event",
            "verdict",
            "findings",
            "policy_rule",
            "l4",
            "source",
            "destination",
            "direction",
            "encryption",
            "bytes_sent",
            "bytes_received",
            "duration_ms",
            "summary",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        assert_eq!(v["event"], "FAILED");
        assert_eq!(v["verdict"], "UNKNOWN");
        assert_eq!(v["l4"]["protocol"], "TCP");
        assert_eq!(v["source"]["identity_source"], "UNKNOWN");
        assert_eq!(v["encryption"]["state"], "UNKNOWN");
        assert_eq!(v["summary"], f.make_summary());
        let back: FlowEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, f);
    }
}
