//! Joining the halves of a connection: the client's node reports it
//! EGRESS, the server's node INGRESS, each with its own end ATTESTED. In:
//! the merged flows of every node, in time order. Out: for each flow, one
//! of: the flow unchanged (nothing to join: a FAILED attempt, which the
//! server never saw, or an end outside the cluster), a joined flow once
//! the other half arrived, or the half alone once the join window closed
//! without the other (its `joined` names the one half it has). So every
//! flow in reaches the joined stream exactly once, alone or in a pair.
//!
//! Halves are matched by event (CONNECT with CONNECT, CLOSE with CLOSE)
//! and the 4-tuple, which both nodes see the same for pod-to-pod TCP (pod
//! addresses are routed, not translated). The joined flow takes source
//! facts from the EGRESS half and destination facts from the INGRESS half,
//! so each end is described by the node that saw its socket.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowaudit_policy::{EncryptionState, Verdict};

use crate::flow::{Direction, EndKind, EventKind, Finding, FlowEvent, Joined, JoinedHalf};

type Key = (EventKind, IpAddr, u16, IpAddr, u16);

struct Waiting {
    flow: Arc<FlowEvent>,
    generation: u64,
}

pub struct Joiner {
    window: Duration,
    max: usize,
    waiting: HashMap<Key, Waiting>,
    /// Arrival order of what waits: (key, generation, arrived).
    order: VecDeque<(Key, u64, Instant)>,
    generation: u64,
    joined: u64,
    alone: u64,
}

/// What happened to a flow given to the joiner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to join it with: out unchanged.
    Passed,
    /// Both halves: out as one.
    Joined,
    /// The other half never came: out alone.
    Alone,
}

impl Joiner {
    /// `window`: how long a half waits for the other; `max`: halves
    /// waiting at most (then the oldest goes out alone).
    pub fn new(window: Duration, max: usize) -> Self {
        Self {
            window,
            max: max.max(1),
            waiting: HashMap::new(),
            order: VecDeque::new(),
            generation: 0,
            joined: 0,
            alone: 0,
        }
    }

    /// (joined, alone) so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.joined, self.alone)
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Takes a flow; returns what goes out now (the flow itself, a joined
    /// pair, or a half pushed out by this one) with what happened to it.
    pub fn push(&mut self, flow: Arc<FlowEvent>, now: Instant) -> Vec<(Arc<FlowEvent>, Outcome)> {
        let Some(key) = key_of(&flow) else {
            return vec![(flow, Outcome::Passed)];
        };
        let mut out = Vec::new();
        match self.waiting.remove(&key) {
            Some(other) if other.flow.direction != flow.direction => {
                self.joined += 1;
                out.push((Arc::new(join(&other.flow, &flow)), Outcome::Joined));
                return out;
            }
            // The same half twice (a reused 4-tuple): the older goes alone.
            Some(older) => out.push(self.alone(&older.flow)),
            None => {}
        }
        self.generation += 1;
        self.waiting.insert(
            key,
            Waiting {
                flow,
                generation: self.generation,
            },
        );
        self.order.push_back((key, self.generation, now));
        if self.waiting.len() > self.max {
            out.extend(self.pop_oldest());
        }
        out
    }

    fn alone(&mut self, flow: &FlowEvent) -> (Arc<FlowEvent>, Outcome) {
        self.alone += 1;
        (Arc::new(single(flow)), Outcome::Alone)
    }

    fn pop_oldest(&mut self) -> Option<(Arc<FlowEvent>, Outcome)> {
        while let Some((key, generation, _)) = self.order.pop_front() {
            if self
                .waiting
                .get(&key)
                .is_some_and(|w| w.generation == generation)
            {
                let w = self.waiting.remove(&key)?;
                return Some(self.alone(&w.flow));
            }
        }
        None
    }

    /// Halves whose window closed at `now`, alone.
    pub fn expire(&mut self, now: Instant) -> Vec<(Arc<FlowEvent>, Outcome)> {
        let mut out = Vec::new();
        while let Some(&(key, generation, at)) = self.order.front() {
            let current = self
                .waiting
                .get(&key)
                .is_some_and(|w| w.generation == generation);
            if !current {
                self.order.pop_front();
                continue;
            }
            if now.saturating_duration_since(at) < self.window {
                break;
            }
            out.extend(self.pop_oldest());
        }
        out
    }

    /// Every half still waiting, alone (at shutdown).
    pub fn drain(&mut self) -> Vec<(Arc<FlowEvent>, Outcome)> {
        let mut out = Vec::new();
        while let Some(x) = self.pop_oldest() {
            out.push(x);
        }
        out
    }

    /// When the oldest waiting half's window closes.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&(key, generation, at)) = self.order.front() {
            if self
                .waiting
                .get(&key)
                .is_some_and(|w| w.generation == generation)
            {
                return Some(at + self.window);
            }
            self.order.pop_front();
        }
        None
    }
}

/// The join key, or `None` for a flow with no other half to wait for.
fn key_of(f: &FlowEvent) -> Option<Key> {
    let remote = match f.direction {
        Direction::Egress => &f.destination,
        Direction::Ingress => &f.source,
    };
    if f.event == EventKind::Failed || remote.kind == EndKind::World || f.joined.is_some() {
        return None;
    }
    Some((
        f.event,
        f.l4.source_ip,
        f.l4.source_port,
        f.l4.destination_ip,
        f.l4.destination_port,
    ))
}

fn half(f: &FlowEvent) -> JoinedHalf {
    JoinedHalf {
        direction: f.direction,
        node_name: f.node_name.clone(),
        time: f.time,
        verdict: f.verdict,
        findings: f.findings.to_vec(),
        source_identity: f.source.identity_source,
        destination_identity: f.destination.identity_source,
        bytes_sent: f.bytes_sent,
        bytes_received: f.bytes_received,
        encryption: f.encryption.state,
        cookie: f.socket.cookie,
    }
}

/// A half whose other half never came.
fn single(f: &FlowEvent) -> FlowEvent {
    let mut out = f.clone();
    out.joined = Some(Box::new(Joined {
        halves: vec![half(f)],
    }));
    out
}

/// The connection as both nodes saw it: source from the EGRESS half (its
/// node saw the client's socket), destination from the INGRESS half.
fn join(a: &FlowEvent, b: &FlowEvent) -> FlowEvent {
    let (egress, ingress) = match a.direction {
        Direction::Egress => (a, b),
        Direction::Ingress => (b, a),
    };
    let mut out = egress.clone();
    out.destination = ingress.destination.clone();
    out.time = egress.time.min(ingress.time);
    if out.encryption.state == EncryptionState::Unknown
        && ingress.encryption.state != EncryptionState::Unknown
    {
        out.encryption = ingress.encryption.clone();
    }
    // A node that could not tell one end's identity judged UNKNOWN; the
    // other node's verdict, which knew both, stands. Two verdicts: the
    // worse one, with the findings of both.
    let judged: Vec<&FlowEvent> = [egress, ingress]
        .into_iter()
        .filter(|f| f.verdict != Verdict::Unknown)
        .collect();
    let from: &[&FlowEvent] = if judged.is_empty() {
        &[egress, ingress]
    } else {
        &judged
    };
    out.verdict = if from.iter().any(|f| f.verdict == Verdict::Violation) {
        Verdict::Violation
    } else {
        from[0].verdict
    };
    out.policy_rule = from
        .iter()
        .map(|f| &f.policy_rule)
        .find(|r| !r.is_empty())
        .cloned()
        .unwrap_or_default();
    let mut findings: Vec<Finding> = Vec::new();
    for f in from {
        for finding in &f.findings {
            if !findings.iter().any(|x| x.kind == finding.kind) {
                findings.push(finding.clone());
            }
        }
    }
    out.findings = findings.into();
    out.joined = Some(Box::new(Joined {
        halves: vec![half(egress), half(ingress)],
    }));
    // Built from a half, whose summary may have been written already.
    out.summary = crate::flow::Summary::default();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::hub::tests::sample_flow;
    use flowaudit_policy::{FindingKind, IdentitySource};

    /// One half of 10.244.1.5:43122 -> 10.244.2.9:8000 as `node` saw it.
    fn half_of(direction: Direction, event: EventKind, node: &str) -> Arc<FlowEvent> {
        let mut f = sample_flow();
        f.node_name = node.into();
        f.direction = direction;
        f.event = event;
        f.l4.source_ip = "10.244.1.5".parse().unwrap();
        f.l4.source_port = 43122;
        f.l4.destination_ip = "10.244.2.9".parse().unwrap();
        f.l4.destination_port = 8000;
        for end in [&mut f.source, &mut f.destination] {
            end.kind = EndKind::Pod;
            end.identity_source = IdentitySource::Derived;
        }
        f.source.spiffe_id = "spiffe://demo.local/ns/99-apps/sa/frontend".into();
        f.destination.spiffe_id = "spiffe://demo.local/ns/99-apps/sa/backend".into();
        match direction {
            Direction::Egress => {
                f.source.identity_source = IdentitySource::Attested;
                f.source.pid = Some(100);
                f.bytes_sent = 10;
            }
            Direction::Ingress => {
                f.destination.identity_source = IdentitySource::Attested;
                f.destination.pid = Some(200);
                f.bytes_sent = 20;
            }
        }
        f.verdict = Verdict::Compliant;
        f.socket.cookie = if direction == Direction::Egress { 1 } else { 2 };
        Arc::new(f)
    }

    #[test]
    fn two_halves_become_one_flow_with_both_ends_attested() {
        let now = Instant::now();
        let mut j = Joiner::new(Duration::from_secs(2), 100);
        let client = half_of(Direction::Egress, EventKind::Connect, "worker");
        let mut server = (*half_of(Direction::Ingress, EventKind::Connect, "worker2")).clone();
        server.time = "2026-11-28T12:00:01.000000001Z".into();
        std::sync::Arc::make_mut(&mut server.encryption).state = EncryptionState::Mtls;
        assert!(
            j.push(client.clone(), now).is_empty(),
            "the first half waits"
        );
        let out = j.push(Arc::new(server), now);
        assert_eq!(out.len(), 1);
        let (f, outcome) = &out[0];
        assert_eq!(*outcome, Outcome::Joined);
        assert_eq!(f.source.identity_source, IdentitySource::Attested);
        assert_eq!(f.source.pid, Some(100));
        assert_eq!(f.destination.identity_source, IdentitySource::Attested);
        assert_eq!(f.destination.pid, Some(200));
        assert_eq!(f.direction, Direction::Egress);
        assert_eq!(f.node_name, "worker");
        assert_eq!(
            f.time,
            "2026-11-28T12:00:01.000000001Z".into(),
            "the earlier half's time"
        );
        assert_eq!(
            f.encryption.state,
            EncryptionState::Mtls,
            "known beats UNKNOWN"
        );
        let halves = &f.joined.as_ref().unwrap().halves;
        assert_eq!(halves.len(), 2);
        assert_eq!(
            (
                halves[0].direction,
                halves[0].node_name.as_str(),
                halves[0].bytes_sent
            ),
            (Direction::Egress, "worker", 10)
        );
        assert_eq!(
            (
                halves[1].direction,
                halves[1].node_name.as_str(),
                halves[1].bytes_sent
            ),
            (Direction::Ingress, "worker2", 20)
        );
        assert_eq!(j.waiting(), 0);
        assert_eq!(j.counts(), (1, 0));
    }

    #[test]
    fn a_half_alone_goes_out_when_its_window_closes() {
        let now = Instant::now();
        let mut j = Joiner::new(Duration::from_secs(2), 100);
        assert!(
            j.push(half_of(Direction::Egress, EventKind::Close, "worker"), now)
                .is_empty()
        );
        assert_eq!(j.next_deadline(), Some(now + Duration::from_secs(2)));
        assert!(j.expire(now + Duration::from_millis(1999)).is_empty());
        let out = j.expire(now + Duration::from_secs(2));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1, Outcome::Alone);
        let halves = &out[0].0.joined.as_ref().unwrap().halves;
        assert_eq!(halves.len(), 1, "it says it has one half");
        assert_eq!(halves[0].direction, Direction::Egress);
        assert_eq!(j.next_deadline(), None);
        assert_eq!(j.counts(), (0, 1));
    }

    #[test]
    fn events_pair_with_their_kind_only_and_failed_or_world_flows_pass() {
        let now = Instant::now();
        let mut j = Joiner::new(Duration::from_secs(2), 100);
        assert!(
            j.push(half_of(Direction::Egress, EventKind::Connect, "a"), now)
                .is_empty()
        );
        // A CLOSE does not pair with a CONNECT.
        assert!(
            j.push(half_of(Direction::Ingress, EventKind::Close, "b"), now)
                .is_empty()
        );
        assert_eq!(j.waiting(), 2);
        let failed = half_of(Direction::Egress, EventKind::Failed, "a");
        assert_eq!(j.push(failed, now)[0].1, Outcome::Passed);
        let mut world = (*half_of(Direction::Egress, EventKind::Connect, "a")).clone();
        world.destination.kind = EndKind::World;
        world.l4.destination_port = 443;
        let out = j.push(Arc::new(world), now);
        assert_eq!(out[0].1, Outcome::Passed);
        assert!(out[0].0.joined.is_none());
        // Every flow in comes out once: the two waiting ones alone.
        assert_eq!(j.drain().len(), 2);
    }

    #[test]
    fn the_verdict_of_the_node_that_knew_both_ends_stands() {
        let now = Instant::now();
        let mut j = Joiner::new(Duration::from_secs(2), 100);
        let mut client = (*half_of(Direction::Egress, EventKind::Connect, "a")).clone();
        client.verdict = Verdict::Unknown;
        client.findings = vec![Finding {
            kind: FindingKind::UnknownIdentity,
            message: "unknown destination".into(),
        }]
        .into();
        let mut server = (*half_of(Direction::Ingress, EventKind::Connect, "b")).clone();
        server.verdict = Verdict::Violation;
        server.policy_rule = crate::flow::ArcStr::new();
        server.findings = vec![Finding {
            kind: FindingKind::NoMatchingRule,
            message: "no rule allows frontend -> backend:8000".into(),
        }]
        .into();
        // Halves come from the agents with their own summaries: the joined
        // flow must not keep either.
        client.summary = "client half".to_owned().into();
        server.summary = "server half".to_owned().into();
        j.push(Arc::new(client), now);
        let out = j.push(Arc::new(server), now);
        let f = &out[0].0;
        assert_eq!(f.verdict, Verdict::Violation);
        assert_eq!(
            f.findings.iter().map(|x| x.kind).collect::<Vec<_>>(),
            [FindingKind::NoMatchingRule]
        );
        assert!(f.summary().contains("no rule allows"), "{}", f.summary());
    }

    #[test]
    fn a_full_joiner_lets_the_oldest_half_go_alone() {
        let now = Instant::now();
        let mut j = Joiner::new(Duration::from_secs(60), 1);
        assert!(
            j.push(half_of(Direction::Egress, EventKind::Connect, "a"), now)
                .is_empty()
        );
        let out = j.push(half_of(Direction::Egress, EventKind::Close, "a"), now);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1, Outcome::Alone);
        assert_eq!(out[0].0.event, EventKind::Connect);
        assert_eq!(j.waiting(), 1);
    }
}
