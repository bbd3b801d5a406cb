//! Identity: joins both ends of a flow with who they are. In: a `FlowEvent`
//! with addresses and, for the end whose socket this node saw, the owning
//! process and cgroup. Out: each end's kind (pod, host, world), pod metadata
//! from the endpoint directory, and its SPIFFE ID with its source and, when
//! not ATTESTED, why (`identity_detail`).
//!
//! - `ATTESTED`: SPIRE's Delegated Identity API attested the socket's own
//!   process (by pid), or its pod found from kernel facts (cgroup -> pod UID,
//!   asked by that pod's selectors). For a same-node flow the peer's socket
//!   is on this node too: the kernel saw its owner, so the peer end is
//!   attested the same way (the two sockets are paired by their 4-tuples).
//! - `DERIVED`: reached from an address through the endpoint directory (pods
//!   on other nodes), or a local end SPIRE did not attest (absent, down, no
//!   entry, no answer in time), with the trust domain's `ns/<ns>/sa/<sa>`
//!   convention. An ID reached from an address is DERIVED even when SPIRE has
//!   an entry for that pod.
//! - `UNKNOWN`: neither SPIRE nor the directory knows the end.
//!
//! Never blocks: an answer still being fetched (SPIRE's, or the peer socket's
//! record) is reported as pending and the pipeline decides how long the flow
//! may wait ([`Enricher::resume`]).

pub mod cgroup;
pub mod spire;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flowaudit_policy::IdentitySource;
use tokio::sync::watch;

use self::cgroup::CgroupResolver;
use self::spire::{Lookup, LookupMemo, SpireClient, WorkloadQuery};
use crate::endpoints::{EndpointDirectory, Peer, PodInfo};
use crate::flow::{ArcStr, Direction, EndKind, Endpoint, EventKind, FlowEvent, FlowTime, PodMeta};

/// What to do with a flow after enrichment.
pub enum Enriched {
    Done,
    /// An end's attested identity is being fetched.
    Pending(Box<PendingIdentity>),
}

/// What a parked flow still waits for.
#[derive(Debug)]
pub struct PendingIdentity {
    /// SPIRE's answer for the local end.
    local: Option<OwnerWait>,
    peer: PeerWait,
}

/// SPIRE's answer awaited for a socket's owner, with what the owner memo
/// keeps once it settles.
#[derive(Debug)]
struct OwnerWait {
    query: WorkloadQuery,
    facts: SocketFacts,
    pod: Option<Arc<PodMeta>>,
    /// [`Enricher::owner_epoch`] when the query was made.
    epoch: OwnerEpoch,
}

#[derive(Debug)]
enum PeerWait {
    Done,
    /// The peer socket's own record (same node), by its key.
    Socket(SocketKey),
    /// SPIRE's answer for the peer socket's owner.
    Query(OwnerWait),
}

/// The outcome of [`Enricher::resume`].
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    Waiting,
    /// Settled; `timed_out` when an answer was still missing at the deadline.
    Done {
        timed_out: bool,
    },
}

/// (local address, remote address) of a socket seen on this node.
type SocketKey = (SocketAddr, SocketAddr);

/// The kernel's facts about a socket's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SocketFacts {
    pid: Option<u32>,
    start_ns: u64,
    cgroup_id: Option<u64>,
}

/// The sockets of this node by 4-tuple, so the two sockets of a same-node
/// connection find each other for as long as either is open. A socket
/// leaves once it and its peer have closed (or once it has, when its peer
/// is not on this node), at the end of the pipeline's pass
/// ([`Enricher::end_pass`]): a flow parked until the peer's socket showed
/// up is looked at in that pass, though both closed in it. Bounded all the
/// same: beyond `cap` sockets, the oldest goes first. (Until 2026-12-05
/// every socket stayed until 65,536 newer ones pushed it out: under 30,000
/// connections a second, a connection older than about a second found its
/// peer gone at its close and waited `--identity-wait-ms` for it.)
struct SocketTable {
    /// Hashed with a per-process random seed (foldhash): a remote peer can
    /// choose its port but not learn the seed, the table is bounded, and
    /// SipHash on every record cost more than the rest of the lookup.
    map: HashMap<PackedKey, Slot, foldhash::fast::RandomState>,
    /// Insertion order, with each slot's serial (a 4-tuple may leave and
    /// come back: only the entry with its current serial is its slot).
    order: VecDeque<(SocketKey, u64)>,
    /// Closed sockets that leave at the end of this pass.
    leaving: Vec<(SocketKey, u64)>,
    serial: u64,
    cap: usize,
}

#[derive(Clone, Copy)]
struct Slot {
    facts: SocketFacts,
    serial: u64,
    closed: bool,
}

/// A [`SocketKey`] hashed as one 128-bit word when both addresses are IPv4
/// (the derived hash of two `SocketAddr`s is eight writes, two of them
/// byte slices: a tenth of the identity stage with SPIRE on).
#[derive(Clone, Copy, PartialEq, Eq)]
struct PackedKey(SocketKey);

impl std::hash::Hash for PackedKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        match self.0 {
            (SocketAddr::V4(a), SocketAddr::V4(b)) => h.write_u128(
                (u128::from(a.ip().to_bits()) << 64)
                    | (u128::from(a.port()) << 48)
                    | (u128::from(b.ip().to_bits()) << 16)
                    | u128::from(b.port()),
            ),
            (a, b) => {
                a.hash(h);
                b.hash(h);
            }
        }
    }
}

impl SocketTable {
    fn new(cap: usize) -> Self {
        Self {
            map: HashMap::default(),
            order: VecDeque::new(),
            leaving: Vec::new(),
            serial: 0,
            cap: cap.max(1),
        }
    }

    fn insert(&mut self, key: SocketKey, facts: SocketFacts) {
        match self.map.entry(PackedKey(key)) {
            std::collections::hash_map::Entry::Occupied(mut o) => o.get_mut().facts = facts,
            std::collections::hash_map::Entry::Vacant(v) => {
                self.serial += 1;
                v.insert(Slot {
                    facts,
                    serial: self.serial,
                    closed: false,
                });
                self.order.push_back((key, self.serial));
                // Only a table over its bound has anything to trim here:
                // sockets leave at the pass's end, whose trim takes their
                // entries out of the order. Looking at the order's oldest
                // entry on every insert was a cache miss per socket (5% of
                // the agent in a connection-rate run with SPIRE).
                if self.map.len() > self.cap {
                    self.trim();
                }
            }
        }
    }

    fn get(&self, key: &SocketKey) -> Option<SocketFacts> {
        self.map.get(&PackedKey(*key)).map(|s| s.facts)
    }

    /// The socket `key` closed: it leaves with its peer once both have,
    /// or alone when `peer_here` is false and its peer was not seen (no
    /// socket of this node will ask for it).
    fn closed(&mut self, key: SocketKey, peer_here: bool) {
        let reverse = (key.1, key.0);
        let peer = self
            .map
            .get(&PackedKey(reverse))
            .map(|s| (s.closed, s.serial));
        let Some(me) = self.map.get_mut(&PackedKey(key)) else {
            return;
        };
        if me.closed {
            return;
        }
        me.closed = true;
        let serial = me.serial;
        match peer {
            Some((true, peer_serial)) => {
                self.leaving.push((reverse, peer_serial));
                self.leaving.push((key, serial));
            }
            None if !peer_here => self.leaving.push((key, serial)),
            // Stays until its peer closes.
            Some((false, _)) | None => {}
        }
    }

    /// The sockets that closed for good leave.
    fn end_pass(&mut self) {
        for (k, serial) in std::mem::take(&mut self.leaving) {
            if self.is_current(&k, serial) {
                self.map.remove(&PackedKey(k));
            }
        }
        self.trim();
    }

    fn is_current(&self, key: &SocketKey, serial: u64) -> bool {
        self.map
            .get(&PackedKey(*key))
            .is_some_and(|s| s.serial == serial)
    }

    /// Drops the order's entries of sockets that left, and the oldest
    /// sockets beyond `cap`.
    fn trim(&mut self) {
        while let Some(&(k, serial)) = self.order.front() {
            let current = self.is_current(&k, serial);
            if current && self.map.len() <= self.cap {
                break;
            }
            self.order.pop_front();
            if current {
                self.map.remove(&PackedKey(k));
            }
        }
        // A long-lived socket at the front holds back the entries behind
        // it: compact when they outnumber the sockets.
        if self.order.len() > 2 * self.map.len().max(1024) {
            let map = &self.map;
            self.order
                .retain(|(k, serial)| map.get(&PackedKey(*k)).is_some_and(|s| s.serial == *serial));
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// What a socket's owner resolved to: its pod (from its cgroup) and what
/// SPIRE says about it. Cloned out of the memo for a flow end, which takes
/// both strings as they are (no count is taken and given back).
#[derive(Clone)]
struct Owner {
    pod: Option<Arc<PodMeta>>,
    ask: Ask,
}

#[derive(Clone)]
enum Ask {
    /// Nothing to ask SPIRE by (no pid and no pod UID), or no SPIRE.
    Nothing,
    /// SPIRE's settled answer: the attested SPIFFE ID and its SVID's expiry,
    /// or no identity.
    Settled(Option<(ArcStr, FlowTime)>),
    /// Not known yet: ask by this.
    Query(WorkloadQuery),
}

/// (endpoint directory version, cgroup scans, SPIRE's answers changed):
/// what an [`Owner`] was read from.
type OwnerEpoch = (u64, u64, u64);

/// Socket owners resolved so far, by their kernel facts, so that the
/// sockets of a busy process cost one hash of three integers instead of a
/// cgroup lookup, a pod lookup by UID string and a SPIRE query whose
/// strings the SPIRE memo hashes (per flow end: 8 per connection with both
/// sockets on this node). Everything is forgotten when what it was read
/// from may have changed ([`OwnerEpoch`]), and an attested answer is
/// used only until its SVID expires; only answers that settled are kept,
/// and only for cgroups the resolver knows (an unknown one is looked for
/// again by the next flow).
#[derive(Default)]
struct OwnerMemo {
    owners: HashMap<SocketFacts, Owner, foldhash::fast::RandomState>,
    epoch: OwnerEpoch,
}

/// Owners kept at most; beyond it the memo starts over.
const OWNER_MEMO_CAP: usize = 4096;

impl OwnerMemo {
    /// Starts over when `epoch` differs from the one the owners were read in.
    fn sync(&mut self, epoch: OwnerEpoch) {
        if epoch != self.epoch || self.owners.len() >= OWNER_MEMO_CAP {
            self.owners.clear();
            self.epoch = epoch;
        }
    }

    fn get(&self, facts: &SocketFacts, at: FlowTime) -> Option<Owner> {
        match self.owners.get(facts) {
            Some(Owner {
                ask: Ask::Settled(Some((_, expires))),
                ..
            }) if *expires <= at => None,
            found => found.cloned(),
        }
    }

    /// Keeps `owner`, read in `epoch`, unless the memo has moved on since.
    fn put(&mut self, epoch: OwnerEpoch, facts: SocketFacts, owner: Owner) {
        if epoch == self.epoch {
            self.owners.insert(facts, owner);
        }
    }
}

/// Nodes whose pods' detail is kept at most (then it starts over).
const ELSEWHERE_DETAILS: usize = 4096;

/// How a peer's socket is remembered at most (sockets of this node).
const SOCKET_TABLE_CAP: usize = 65_536;

/// How an end's identity lookup ended (`flowaudit_identity_lookups_total`,
/// label `result`): counted once per flow end, when it is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookupResult {
    /// SPIRE attested the socket's process or pod.
    Attested,
    /// SPIRE answered, with no identity for it.
    NoIdentity,
    /// No answer within `--identity-wait-ms`.
    Timeout,
    /// The Delegated Identity API could not be asked.
    Unavailable,
    /// SPIRE answered with SVIDs, none of which could be read.
    Unreadable,
}

impl LookupResult {
    pub const ALL: [LookupResult; 5] = [
        LookupResult::Attested,
        LookupResult::NoIdentity,
        LookupResult::Timeout,
        LookupResult::Unavailable,
        LookupResult::Unreadable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            LookupResult::Attested => "attested",
            LookupResult::NoIdentity => "no_identity",
            LookupResult::Timeout => "timeout",
            LookupResult::Unavailable => "unavailable",
            LookupResult::Unreadable => "unreadable",
        }
    }
}

/// What the identity stage counts; metrics reads it on each scrape.
#[derive(Debug, Default)]
pub struct IdentityStats {
    lookups: [AtomicU64; LookupResult::ALL.len()],
}

impl IdentityStats {
    pub fn lookups(&self, result: LookupResult) -> u64 {
        self.lookups[result as usize].load(Ordering::Relaxed)
    }

    pub fn count(&self, result: LookupResult) {
        self.lookups[result as usize].fetch_add(1, Ordering::Relaxed);
    }
}

pub struct Enricher {
    /// The endpoint directory's updates.
    endpoints: Option<watch::Receiver<Arc<EndpointDirectory>>>,
    /// The directory now, taken from `endpoints` when it changes: a flow
    /// reads it without the channel's lock or a reference count of its own
    /// (four atomic operations per flow otherwise).
    directory: Option<Arc<EndpointDirectory>>,
    pub cgroups: CgroupResolver,
    pub spire: Option<SpireClient>,
    /// `spire`'s settled answers, asked for both ends of every flow.
    spire_memo: LookupMemo,
    /// Socket owners resolved so far (see [`OwnerMemo`]).
    owners: OwnerMemo,
    /// Bumped when `directory` is replaced by a newer one.
    directory_version: u64,
    /// See [`Enricher::elsewhere_detail`].
    elsewhere_details: HashMap<String, ArcStr, foldhash::fast::RandomState>,
    /// For DERIVED IDs, given (`--trust-domain`): it wins over the
    /// policy's and over what is learned.
    pub trust_domain: Option<String>,
    /// The policy's updates, followed for its trust domain (see
    /// [`Enricher::follow_policy`]).
    policy: Option<watch::Receiver<Arc<flowaudit_policy::PolicySet>>>,
    /// The trust domain of the policy in force (its first), if it has one.
    policy_trust_domain: Option<String>,
    /// Without either: the SPIRE agent's (its bundle's) or the first
    /// attested ID's trust domain.
    learned_trust_domain: Option<String>,
    /// This node: peers the directory places here are waited for (their
    /// socket's record) and attested; pods elsewhere are DERIVED.
    pub node_name: String,
    /// How long flows may wait (said in the detail of a timed-out end).
    pub wait_ms: u64,
    /// Lookups by result, read by metrics at scrape time.
    pub stats: Arc<IdentityStats>,
    sockets: SocketTable,
    /// The IDs derived so far, and the trust domain they are derived in
    /// (`trust_domain` or `learned_trust_domain`, once one is known).
    derived: DerivedIds,
}

impl Enricher {
    pub fn new(
        endpoints: Option<watch::Receiver<Arc<EndpointDirectory>>>,
        cgroups: CgroupResolver,
        spire: Option<SpireClient>,
        trust_domain: Option<String>,
    ) -> Self {
        let mut endpoints = endpoints;
        let directory = endpoints.as_mut().map(|rx| rx.borrow_and_update().clone());
        Self {
            endpoints,
            directory,
            cgroups,
            spire,
            trust_domain,
            policy: None,
            policy_trust_domain: None,
            learned_trust_domain: None,
            node_name: String::new(),
            wait_ms: 0,
            stats: Arc::default(),
            sockets: SocketTable::new(SOCKET_TABLE_CAP),
            spire_memo: LookupMemo::default(),
            owners: OwnerMemo::default(),
            directory_version: 0,
            elsewhere_details: HashMap::default(),
            derived: DerivedIds::default(),
        }
    }

    /// Takes the trust domain of DERIVED IDs from the policy in force
    /// (its `spec.trustDomain`), following its reloads, wherever no
    /// `trust_domain` was given. A reload that changes it renames the next
    /// flows' DERIVED ends; one that drops it keeps the last one known
    /// (or what is learned), rather than leave pods without names.
    pub fn follow_policy(&mut self, mut policy: watch::Receiver<Arc<flowaudit_policy::PolicySet>>) {
        self.policy_trust_domain = policy.borrow_and_update().trust_domains().first().cloned();
        self.policy = Some(policy);
    }

    /// The trust domain DERIVED IDs are made in, by precedence: the one
    /// given, the policy's, the one learned.
    fn known_trust_domain(&self) -> Option<&str> {
        self.trust_domain
            .as_deref()
            .or(self.policy_trust_domain.as_deref())
            .or(self.learned_trust_domain.as_deref())
    }

    /// Brings the trust domain of DERIVED IDs (`derived`) up to date. It
    /// changes from unknown to known once, and after that only with a
    /// policy that names another one; so once known, a flow pays a test of
    /// the policy channel's version for it.
    fn sync_trust_domain(&mut self) {
        if let Some(rx) = &mut self.policy
            && rx.has_changed().unwrap_or(false)
        {
            let td = rx.borrow_and_update().trust_domains().first().cloned();
            if td.is_some() {
                self.policy_trust_domain = td;
            }
        } else if self.derived.trust_domain.is_some() {
            return;
        }
        if self.known_trust_domain().is_none() {
            // The SPIRE agent's own bundle names it as soon as it is connected.
            self.learned_trust_domain = self.spire.as_ref().and_then(SpireClient::trust_domain);
        }
        if let Some(td) = self.known_trust_domain() {
            let td = td.to_owned();
            self.derived.set_trust_domain(&td);
        }
    }

    /// The endpoint directory now, if there is one (see `directory`). Taken
    /// out of `self` for the caller's use; [`Self::put_directory`] gives it back.
    fn take_directory(&mut self) -> Option<Arc<EndpointDirectory>> {
        if let Some(rx) = &mut self.endpoints
            // An error: the directory's source is gone; the last one stays.
            && rx.has_changed().unwrap_or(false)
        {
            self.directory = Some(rx.borrow_and_update().clone());
            self.directory_version += 1;
        }
        self.directory.take()
    }

    fn put_directory(&mut self, dir: Option<Arc<EndpointDirectory>>) {
        self.directory = dir;
    }

    /// Fills kinds, pod metadata and SPIFFE IDs of both ends.
    pub fn enrich(&mut self, flow: &mut FlowEvent) -> Enriched {
        let dir = self.take_directory();
        let mut pending = self.start(flow, dir.as_deref());
        self.put_directory(dir);
        match self.resume(flow, &mut pending, false) {
            Progress::Waiting => Enriched::Pending(Box::new(pending)),
            Progress::Done { .. } => Enriched::Done,
        }
    }

    /// `enrich` with the directory `dir`, up to the identity answers: what
    /// they are awaited for.
    fn start(&mut self, flow: &mut FlowEvent, dir: Option<&EndpointDirectory>) -> PendingIdentity {
        let local_is_source = flow.direction == Direction::Egress;
        let (src, dst) = (
            SocketAddr::new(flow.l4.source_ip, flow.l4.source_port),
            SocketAddr::new(flow.l4.destination_ip, flow.l4.destination_port),
        );
        let (local_addr, remote_addr) = if local_is_source {
            (src, dst)
        } else {
            (dst, src)
        };
        let facts = {
            let l = flow.local_end_mut();
            SocketFacts {
                pid: l.pid,
                start_ns: 0,
                cgroup_id: l.cgroup_id,
            }
        };
        let facts = SocketFacts {
            start_ns: flow.socket.process_start_ns,
            ..facts
        };
        // Unowned sockets too: a peer waiting for this one must learn at
        // once that it has no owner, rather than wait out its time. Only
        // SPIRE lookups read the table: without SPIRE it is not kept.
        if self.spire.is_some() {
            self.sockets.insert((local_addr, remote_addr), facts);
        }
        self.sync_trust_domain();

        // Local end: the pod its cgroup belongs to is authoritative (a
        // hostNetwork pod shares the node's address); else by address.
        let (owner, epoch) = self.owner(facts, dir, flow.time);
        {
            let local = flow.local_end_mut();
            match (&owner.pod, &dir) {
                (Some(p), _) => apply_meta(local, p.clone()),
                (None, Some(d)) => apply_peer(local, &d.peer(local_addr.ip())),
                (None, None) => {}
            }
        }

        // Remote end: named from its address; attested only from its own
        // socket's record, when that socket is on this node.
        let remote_peer = dir.as_ref().map(|d| d.peer(remote_addr.ip()));
        let failed = flow.event == EventKind::Failed;
        let remote = remote_end_mut(flow);
        if let Some(peer) = &remote_peer {
            apply_peer(remote, peer);
        }
        let reverse = (remote_addr, local_addr);
        // Whether the peer's socket may be on this node: a pod here (set
        // below), or this node itself (a host-network process).
        let mut peer_here = match &remote_peer {
            Some(Peer::Host(node)) => self.node_name.is_empty() || *node == self.node_name,
            _ => false,
        };
        let peer = match (&self.spire, remote.kind) {
            (None, _) => {
                derive(&mut self.derived, remote, DETAIL_NO_SPIRE_PEER);
                PeerWait::Done
            }
            (Some(_), EndKind::Host | EndKind::World) => {
                set_id(
                    remote,
                    ArcStr::new(),
                    IdentitySource::Unknown,
                    ArcStr::new(),
                );
                PeerWait::Done
            }
            (Some(_), _) => {
                let on_this_node = match &remote_peer {
                    Some(Peer::Pod(p)) => !self.node_name.is_empty() && p.node == self.node_name,
                    _ => false,
                };
                let detail = match &remote_peer {
                    Some(Peer::Pod(p)) if !p.node.is_empty() && !on_this_node => {
                        self.elsewhere_detail(&p.node)
                    }
                    _ if failed => arcstr::literal!(
                        "the connection never established, so no peer socket to attest: derived from its address through the endpoint directory"
                    ),
                    _ => {
                        arcstr::literal!("derived from its address through the endpoint directory")
                    }
                };
                // Provisional; replaced when the peer is attested.
                derive(&mut self.derived, remote, detail);
                peer_here = on_this_node;
                if let Some(f) = self.sockets.get(&reverse) {
                    self.peer_query(flow, f, dir)
                } else if on_this_node
                    && !failed
                    // Connected, or still connecting at start-up: answers can come.
                    && self.spire.as_ref().is_some_and(|s| !s.is_down())
                {
                    PeerWait::Socket(reverse)
                } else {
                    PeerWait::Done
                }
            }
        };
        if self.spire.is_some() && flow.event != EventKind::Connect {
            // A connection that never established has no peer socket to
            // wait for, on this node or any other.
            self.sockets
                .closed((local_addr, remote_addr), peer_here && !failed);
        }

        // Local end: ask SPIRE (by pid, checked against the process start
        // time; or by the pod's selectors).
        let local = match owner.ask {
            _ if self.spire.is_none() => {
                derive(
                    &mut self.derived,
                    flow.local_end_mut(),
                    DETAIL_NO_SPIRE_LOCAL,
                );
                None
            }
            Ask::Nothing => {
                derive(
                    &mut self.derived,
                    flow.local_end_mut(),
                    arcstr::literal!(
                        "the kernel did not see the socket's owner: derived from its address"
                    ),
                );
                None
            }
            Ask::Settled(answer) => {
                self.apply_settled(flow.local_end_mut(), answer, true);
                None
            }
            Ask::Query(query) => Some(OwnerWait {
                query,
                facts,
                pod: owner.pod,
                epoch,
            }),
        };
        PendingIdentity { local, peer }
    }

    /// What the memo's owners are read from, now.
    fn owner_epoch(&self) -> OwnerEpoch {
        (
            self.directory_version,
            self.cgroups.scans(),
            self.spire.as_ref().map_or(0, SpireClient::answers_changed),
        )
    }

    /// The pod of the socket owner with these facts (from its cgroup) and
    /// what to ask SPIRE about it, or SPIRE's settled answer; from the
    /// owner memo when it holds them. With the epoch it was read in.
    fn owner(
        &mut self,
        f: SocketFacts,
        dir: Option<&EndpointDirectory>,
        at: FlowTime,
    ) -> (Owner, OwnerEpoch) {
        // Read before the cgroups and SPIRE are: a change after this is
        // seen by the next call.
        let epoch = self.owner_epoch();
        self.owners.sync(epoch);
        if let Some(o) = self.owners.get(&f, at) {
            if let (Ask::Settled(answer), Some(s)) = (&o.ask, &self.spire) {
                // Counted as the SPIRE client counts its own answers.
                s.report_label(if answer.is_some() {
                    "attested"
                } else {
                    "no_identity"
                });
            }
            return (o, epoch);
        }
        let pod_uid = f.cgroup_id.and_then(|id| self.cgroups.pod_uid(id));
        let pod = match (&dir, &pod_uid) {
            (Some(d), Some(uid)) => d.pod_by_uid(uid).map(|p| p.meta.clone()),
            _ => None,
        };
        let ask = if self.spire.is_none() || (f.pid.is_none() && pod_uid.is_none()) {
            Ask::Nothing
        } else {
            // Selectors come only from the pod found from the socket's
            // cgroup: metadata reached from an address must not attest.
            let (namespace, service_account) = match &pod {
                Some(p) => (non_empty(&p.namespace), non_empty(&p.service_account)),
                None => (None, None),
            };
            Ask::Query(WorkloadQuery {
                pid: f.pid,
                pid_start_ns: f.start_ns,
                pod_uid,
                namespace,
                service_account,
            })
        };
        let owner = Owner { pod, ask };
        if matches!(owner.ask, Ask::Nothing) && self.cgroup_known(&f) {
            self.owners.put(epoch, f, owner.clone());
        }
        (owner, epoch)
    }

    /// Whether the resolver knows the owner's cgroup (or it has none): an
    /// owner is kept only then.
    fn cgroup_known(&self, f: &SocketFacts) -> bool {
        f.cgroup_id.is_none_or(|id| self.cgroups.knows(id))
    }

    /// Keeps SPIRE's answer for the owner `w` waited for, once it settled.
    fn remember(&mut self, w: &OwnerWait, answer: &Lookup) {
        let settled = match answer {
            Lookup::Attested(id) => {
                Some((id.spiffe_id.clone(), FlowTime::from_system(id.expires_at)))
            }
            Lookup::NoIdentity => None,
            Lookup::Pending | Lookup::Unavailable(_) | Lookup::Unreadable(_) => return,
        };
        if !self.cgroup_known(&w.facts) {
            return;
        }
        self.owners.sync(self.owner_epoch());
        let owner = Owner {
            pod: w.pod.clone(),
            ask: Ask::Settled(settled),
        };
        self.owners.put(w.epoch, w.facts, owner);
    }

    /// The query for a peer whose socket's record was found, applying its
    /// pod (from the owner's cgroup) to the remote end.
    fn peer_query(
        &mut self,
        flow: &mut FlowEvent,
        f: SocketFacts,
        dir: Option<&EndpointDirectory>,
    ) -> PeerWait {
        let (owner, epoch) = self.owner(f, dir, flow.time);
        let remote = remote_end_mut(flow);
        if let Some(p) = &owner.pod {
            apply_meta(remote, p.clone());
        }
        match owner.ask {
            Ask::Nothing => {
                if owner.pod.is_none() {
                    self.sync_trust_domain();
                    derive(&mut self.derived, remote, DETAIL_PEER_UNOWNED);
                }
                PeerWait::Done
            }
            Ask::Settled(answer) => {
                self.apply_settled(remote, answer, false);
                PeerWait::Done
            }
            Ask::Query(query) => PeerWait::Query(OwnerWait {
                query,
                facts: f,
                pod: owner.pod,
                epoch,
            }),
        }
    }

    /// Moves a flow's identity on: applies the answers that have come, and
    /// with `force` (its wait is over) settles what is still missing as
    /// DERIVED, saying why.
    pub fn resume(
        &mut self,
        flow: &mut FlowEvent,
        p: &mut PendingIdentity,
        force: bool,
    ) -> Progress {
        let mut timed_out = false;
        if let PeerWait::Socket(key) = &p.peer {
            if let Some(f) = self.sockets.get(key) {
                let dir = self.take_directory();
                p.peer = self.peer_query(flow, f, dir.as_deref());
                self.put_directory(dir);
            } else if force {
                let detail = arcstr::format!(
                    "the peer's socket was not seen on this node within {} ms: derived from its address through the endpoint directory",
                    self.wait_ms
                );
                self.sync_trust_domain();
                derive(&mut self.derived, remote_end_mut(flow), detail);
                p.peer = PeerWait::Done;
                timed_out = true;
            }
        }
        if let PeerWait::Query(w) = &p.peer {
            let answer = self.poll(&w.query, flow.time);
            if !matches!(answer, Lookup::Pending) || force {
                timed_out |= matches!(answer, Lookup::Pending);
                self.remember(w, &answer);
                self.apply_answer(remote_end_mut(flow), answer, false);
                p.peer = PeerWait::Done;
            }
        }
        if let Some(w) = &p.local {
            let answer = self.poll(&w.query, flow.time);
            if !matches!(answer, Lookup::Pending) || force {
                timed_out |= matches!(answer, Lookup::Pending);
                self.remember(w, &answer);
                self.apply_answer(flow.local_end_mut(), answer, true);
                p.local = None;
            }
        }
        if p.local.is_none() && matches!(p.peer, PeerWait::Done) {
            // A trust domain learned while the flow waited (SPIRE's bundle
            // arrives on connection) names the pods that had none.
            self.sync_trust_domain();
            if self.derived.trust_domain.is_some() {
                for ep in [&mut flow.source, &mut flow.destination] {
                    if ep.kind == EndKind::Pod && ep.identity_source == IdentitySource::Unknown {
                        derive(
                            &mut self.derived,
                            ep,
                            arcstr::literal!(
                                "derived from its pod's metadata (the trust domain became known while the flow waited)"
                            ),
                        );
                    }
                }
            }
            Progress::Done { timed_out }
        } else {
            Progress::Waiting
        }
    }

    /// Applies SPIRE's answer for an end whose socket this node saw.
    fn apply_answer(&mut self, ep: &mut Endpoint, result: Lookup, counted: bool) {
        let outcome = match result {
            Lookup::Attested(_) => LookupResult::Attested,
            Lookup::NoIdentity => LookupResult::NoIdentity,
            Lookup::Pending => LookupResult::Timeout,
            Lookup::Unavailable(_) => LookupResult::Unavailable,
            Lookup::Unreadable(_) => LookupResult::Unreadable,
        };
        self.sync_trust_domain();
        match result {
            Lookup::Attested(id) => {
                if self.known_trust_domain().is_none() {
                    self.learned_trust_domain = trust_domain_of(&id.spiffe_id);
                }
                set_id(
                    ep,
                    id.spiffe_id.clone(),
                    IdentitySource::Attested,
                    ArcStr::new(),
                );
            }
            Lookup::NoIdentity => derive(
                &mut self.derived,
                ep,
                arcstr::literal!(
                    "SPIRE gave no identity (no registration entry matches, or the kernel facts name no pod SPIRE could be asked about): derived from its pod's metadata"
                ),
            ),
            Lookup::Pending => derive(
                &mut self.derived,
                ep,
                arcstr::format!(
                    "SPIRE did not answer within {} ms: derived from its pod's metadata",
                    self.wait_ms
                ),
            ),
            Lookup::Unavailable(why) => {
                tracing::debug!(%why, "SPIRE unavailable: end DERIVED");
                derive(
                    &mut self.derived,
                    ep,
                    arcstr::literal!(
                        "SPIRE's Delegated Identity API is unavailable (see `flowaudit status`): derived from its pod's metadata"
                    ),
                )
            }
            // Rare (a certificate flowaudit cannot read): the reason is
            // written for each end.
            Lookup::Unreadable(why) => derive(
                &mut self.derived,
                ep,
                arcstr::format!("{why}: derived from its pod's metadata"),
            ),
        }
        if counted {
            self.stats.count(outcome);
        }
    }

    /// Applies an answer from the owner memo: as [`Self::apply_answer`]
    /// (the trust domain was learned when it was first applied).
    fn apply_settled(
        &mut self,
        ep: &mut Endpoint,
        answer: Option<(ArcStr, FlowTime)>,
        counted: bool,
    ) {
        match answer {
            Some((id, _)) => {
                set_id(ep, id, IdentitySource::Attested, ArcStr::new());
                if counted {
                    self.stats.count(LookupResult::Attested);
                }
            }
            None => self.apply_answer(ep, Lookup::NoIdentity, counted),
        }
    }

    /// The detail of a pod's end on node `node` (not this one), made once
    /// per node: with SPIRE, most of a node's flows have such an end.
    fn elsewhere_detail(&mut self, node: &str) -> ArcStr {
        if let Some(d) = self.elsewhere_details.get(node) {
            return d.clone();
        }
        if self.elsewhere_details.len() >= ELSEWHERE_DETAILS {
            self.elsewhere_details.clear();
        }
        let d = arcstr::format!(
            "pod on node {node}: derived from its address through the endpoint directory"
        );
        self.elsewhere_details.insert(node.to_owned(), d.clone());
        d
    }

    /// The pipeline's pass is over: the parked flows it could release have
    /// been looked at, so the sockets closed for good leave the same-node
    /// table.
    pub fn end_pass(&mut self) {
        self.sockets.end_pass();
    }

    /// SPIRE's answer for `q` now, if any.
    fn poll(&mut self, q: &WorkloadQuery, at: FlowTime) -> Lookup {
        match &self.spire {
            Some(s) => self.spire_memo.lookup(s, q, at),
            None => Lookup::NoIdentity,
        }
    }
}

const DETAIL_NO_SPIRE_LOCAL: ArcStr = arcstr::literal!(
    "no SPIRE (--spire-admin-socket none): derived from the pod of the socket's cgroup"
);
/// The peer's socket is on this node but the kernel never learned its owner.
const DETAIL_PEER_UNOWNED: ArcStr = arcstr::literal!(
    "the peer's socket on this node has no known owning process (a listener older than the agent that could not be recovered): derived from its address through the endpoint directory"
);
const DETAIL_NO_SPIRE_PEER: ArcStr = arcstr::literal!(
    "no SPIRE (--spire-admin-socket none): derived from its address through the endpoint directory"
);

fn remote_end_mut(flow: &mut FlowEvent) -> &mut Endpoint {
    match flow.direction {
        Direction::Egress => &mut flow.destination,
        Direction::Ingress => &mut flow.source,
    }
}

fn non_empty(s: &ArcStr) -> Option<ArcStr> {
    (!s.is_empty()).then(|| s.clone())
}

fn trust_domain_of(id: &str) -> Option<String> {
    id.strip_prefix("spiffe://")?
        .split('/')
        .next()
        .filter(|td| !td.is_empty())
        .map(str::to_owned)
}

fn set_id(ep: &mut Endpoint, id: impl Into<ArcStr>, source: IdentitySource, detail: ArcStr) {
    ep.spiffe_id = id.into();
    ep.identity_source = source;
    ep.identity_detail = detail;
}

fn apply_pod(ep: &mut Endpoint, p: &PodInfo) {
    apply_meta(ep, p.meta.clone());
}

fn apply_meta(ep: &mut Endpoint, meta: Arc<PodMeta>) {
    ep.kind = EndKind::Pod;
    ep.pod = meta.into();
}

fn apply_peer(ep: &mut Endpoint, peer: &Peer) {
    match peer {
        Peer::Pod(p) => apply_pod(ep, p),
        Peer::Host(_) => ep.kind = EndKind::Host,
        Peer::World => ep.kind = EndKind::World,
    }
}

/// Derived SPIFFE IDs already written, by (namespace, service account),
/// so that every flow of a pod shares one string instead of formatting its
/// own. Emptied when the trust domain changes, or when it holds
/// `DERIVED_IDS_CAP` pairs (a bound, whatever the cluster's churn).
#[derive(Debug, Default)]
struct DerivedIds {
    trust_domain: Option<ArcStr>,
    ids: HashMap<(ArcStr, ArcStr), ArcStr, foldhash::fast::RandomState>,
    /// Recent answers, found by where the names live: a pod's names are
    /// shared from the directory, so most lookups are two pointer
    /// comparisons instead of hashing and comparing both names. An entry
    /// holds its names, so their memory cannot be reused by other names
    /// while it is here. `RECENT_IDS` slots, made on first use.
    recent: Vec<Option<(ArcStr, ArcStr, ArcStr)>>,
}

const DERIVED_IDS_CAP: usize = 16_384;
/// Derived IDs made static at most over the agent's life (see
/// [`crate::flow::make_static`]): some 64 bytes each, 256 KiB in all.
const STATIC_IDS: usize = 4096;
const RECENT_IDS: usize = 256;

/// The `recent` slot of a pair of names, from their addresses.
fn recent_slot(namespace: &ArcStr, service_account: &ArcStr) -> usize {
    let key = (namespace.as_ptr() as u64).rotate_left(32) ^ service_account.as_ptr() as u64;
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize % RECENT_IDS
}

impl DerivedIds {
    /// The trust domain the IDs are derived in; those of another are dropped.
    fn set_trust_domain(&mut self, td: &str) {
        if self.trust_domain.as_deref() != Some(td) {
            self.trust_domain = Some(td.into());
            self.ids.clear();
            self.recent.clear();
        }
    }

    /// The ID of a pod's service account; `None` while no trust domain is known.
    fn get(&mut self, namespace: &ArcStr, service_account: &ArcStr) -> Option<ArcStr> {
        let td = self.trust_domain.as_deref()?;
        let slot = recent_slot(namespace, service_account);
        if let Some(Some((ns, sa, id))) = self.recent.get(slot)
            && ArcStr::ptr_eq(ns, namespace)
            && ArcStr::ptr_eq(sa, service_account)
        {
            return Some(id.clone());
        }
        // The key's names are shared with the pod's entry: cloning them for
        // the lookup copies no bytes.
        let key = (namespace.clone(), service_account.clone());
        let id = match self.ids.get(&key) {
            Some(id) => id.clone(),
            None => {
                if self.ids.len() >= DERIVED_IDS_CAP {
                    self.ids.clear();
                }
                let id: ArcStr =
                    flowaudit_policy::spiffe::derive_id(td, namespace, service_account).into();
                static MADE_STATIC: std::sync::atomic::AtomicUsize =
                    std::sync::atomic::AtomicUsize::new(0);
                crate::flow::make_static(&id, &MADE_STATIC, STATIC_IDS);
                self.ids.insert(key, id.clone());
                id
            }
        };
        if self.recent.is_empty() {
            self.recent.resize(RECENT_IDS, None);
        }
        self.recent[slot] = Some((namespace.clone(), service_account.clone(), id.clone()));
        Some(id)
    }
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>` from pod metadata, said as DERIVED with
/// `detail`; UNKNOWN for what is not a pod the directory knows.
fn derive(ids: &mut DerivedIds, ep: &mut Endpoint, detail: ArcStr) {
    let pod = ep.kind == EndKind::Pod;
    if pod && ids.trust_domain.is_none() {
        return set_id(
            ep,
            ArcStr::new(),
            IdentitySource::Unknown,
            arcstr::literal!(
                "no trust domain known to derive an ID: give --trust-domain or a policy with spec.trustDomain"
            ),
        );
    }
    let named = pod && !ep.pod.namespace.is_empty() && !ep.pod.service_account.is_empty();
    match named.then(|| ids.get(&ep.pod.namespace, &ep.pod.service_account)) {
        Some(Some(id)) => set_id(ep, id, IdentitySource::Derived, detail),
        _ => set_id(ep, ArcStr::new(), IdentitySource::Unknown, ArcStr::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Clock;
    use crate::capture::record::{KernelEvent, tests::sample};
    use flowaudit_common::FlowRecord;
    use std::path::Path;

    fn key(i: u32) -> SocketKey {
        let [a, b, c, d] = i.to_be_bytes();
        (
            SocketAddr::from(([10, a, b, c], 40_000 + u16::from(d))),
            SocketAddr::from(([10, 99, 0, 1], 8000)),
        )
    }

    #[test]
    fn the_socket_table_keeps_its_bound_and_its_order_short() {
        let facts = SocketFacts {
            pid: Some(7),
            start_ns: 1,
            cgroup_id: None,
        };
        // Beyond the bound the oldest sockets go first, at once.
        let mut t = SocketTable::new(100);
        for i in 0..250 {
            t.insert(key(i), facts);
            assert!(t.len() <= 100, "{} sockets after insert {i}", t.len());
        }
        assert!(t.get(&key(149)).is_none(), "an old socket stayed");
        assert!(t.get(&key(150)).is_some() && t.get(&key(249)).is_some());

        // A long-lived socket at the front, and passes of short ones that
        // close with no peer on this node: they leave at each pass's end,
        // and the order behind the old socket is compacted, not kept.
        let mut t = SocketTable::new(65_536);
        t.insert(key(0), facts);
        let mut longest = 0;
        for pass in 0..40u32 {
            for i in 0..500 {
                let k = key(1 + pass * 500 + i);
                t.insert(k, facts);
                t.closed(k, false);
            }
            t.end_pass();
            assert_eq!(t.len(), 1, "pass {pass}: only the long-lived socket stays");
            longest = longest.max(t.order.len());
        }
        assert!(t.get(&key(0)).is_some(), "the open socket stayed");
        assert!(longest <= 2 * 1024 + 500, "the order grew to {longest}");
    }

    #[test]
    fn derived_ids_are_written_once_per_pod_and_follow_the_trust_domain() {
        let mut ids = DerivedIds::default();
        let (ns, sa): (ArcStr, ArcStr) = ("99-apps".into(), "frontend".into());
        assert_eq!(ids.get(&ns, &sa), None, "no trust domain, no ID");
        ids.set_trust_domain("demo.local");
        let first = ids.get(&ns, &sa).unwrap();
        assert_eq!(first, "spiffe://demo.local/ns/99-apps/sa/frontend");
        // Equal names from elsewhere (another pod entry) find the same string.
        let again = ids.get(&"99-apps".into(), &"frontend".into()).unwrap();
        assert!(ArcStr::ptr_eq(&first, &again), "{again} was written anew");
        // The same names again: from the recent slots, the same string.
        let third = ids.get(&ns, &sa).unwrap();
        assert!(ArcStr::ptr_eq(&first, &third), "{third} was written anew");
        // The same trust domain again keeps what was written.
        ids.set_trust_domain("demo.local");
        assert!(ArcStr::ptr_eq(&first, &ids.get(&ns, &sa).unwrap()));
        ids.set_trust_domain("other.td");
        let other = ids.get(&ns, &sa).unwrap();
        assert_eq!(other, "spiffe://other.td/ns/99-apps/sa/frontend");
        // A recent slot never answers for the old trust domain.
        assert_eq!(
            ids.get(&ns, &sa).unwrap(),
            "spiffe://other.td/ns/99-apps/sa/frontend"
        );
        assert_eq!(ids.ids.len(), 1, "the old trust domain's IDs are dropped");
        // Many pairs share the recent slots: each still gets its own ID.
        let names: Vec<ArcStr> = (0..DERIVED_IDS_CAP + 10)
            .map(|i| format!("sa{i}").into())
            .collect();
        for round in 0..2 {
            for (i, sa) in names.iter().enumerate().skip(round * DERIVED_IDS_CAP) {
                let id = ids.get(&ns, sa).unwrap();
                assert_eq!(id, format!("spiffe://other.td/ns/99-apps/sa/sa{i}"));
            }
        }
        assert!(
            ids.ids.len() <= DERIVED_IDS_CAP,
            "{} entries",
            ids.ids.len()
        );
    }

    fn directory() -> watch::Receiver<Arc<EndpointDirectory>> {
        let yaml = "nodes:\n  - {name: n1, ips: [10.244.0.1]}\nendpoints:\n  - {ips: [10.244.1.5], namespace: 99-apps, pod: frontend-7d9f, uid: 11111111-2222-3333-4444-555555555555, serviceAccount: frontend, labels: {app: frontend}}\n  - {ips: [10.244.1.9], namespace: 99-apps, pod: postgresql-0, serviceAccount: postgresql}\n";
        let dir = EndpointDirectory::parse(Path::new("e.yaml"), yaml).unwrap();
        watch::channel(Arc::new(dir)).1
    }

    fn flow() -> FlowEvent {
        FlowEvent::from_kernel(
            &KernelEvent::from_record(&sample()).unwrap(),
            &"n1".into(),
            &Clock::now(),
        )
    }

    /// The directory is read once per change, not per flow: a new one
    /// (a watch update) names the next flow's ends; one whose source is
    /// gone stays in use.
    #[test]
    fn each_flow_is_named_from_the_latest_directory() {
        let parse = |pod: &str| {
            let yaml = format!(
                "endpoints:\n  - {{ips: [10.244.1.9], namespace: 99-apps, pod: {pod}, serviceAccount: postgresql}}\n"
            );
            Arc::new(EndpointDirectory::parse(Path::new("e.yaml"), &yaml).unwrap())
        };
        let (tx, rx) = watch::channel(parse("postgresql-0"));
        let mut e = Enricher::new(
            Some(rx),
            CgroupResolver::new("/nonexistent".into()),
            None,
            Some("demo.local".into()),
        );
        let mut name = || {
            let mut f = flow();
            assert!(matches!(e.enrich(&mut f), Enriched::Done));
            f.destination.pod.pod_name.to_string()
        };
        assert_eq!(name(), "postgresql-0");
        assert_eq!(name(), "postgresql-0");
        tx.send(parse("postgresql-1")).unwrap();
        assert_eq!(name(), "postgresql-1");
        drop(tx);
        assert_eq!(name(), "postgresql-1", "the last directory stays");
    }

    /// The sample directory, no cgroups, no SPIRE, trust domain demo.local.
    fn without_spire() -> Enricher {
        Enricher::new(
            Some(directory()),
            CgroupResolver::new("/nonexistent".into()),
            None,
            Some("demo.local".into()),
        )
    }

    #[test]
    fn without_spire_both_pod_ends_are_derived_from_metadata() {
        let mut e = without_spire();
        let mut f = flow();
        assert!(matches!(e.enrich(&mut f), Enriched::Done));
        assert_eq!(
            f.source.spiffe_id,
            "spiffe://demo.local/ns/99-apps/sa/frontend"
        );
        assert_eq!(f.source.identity_source, IdentitySource::Derived);
        assert_eq!(
            f.source.pod.labels.get("app").map(String::as_str),
            Some("frontend")
        );
        assert_eq!(
            f.destination.spiffe_id,
            "spiffe://demo.local/ns/99-apps/sa/postgresql"
        );
        assert_eq!(f.destination.pod.pod_name, "postgresql-0");
        assert_eq!(f.destination.kind, EndKind::Pod);
    }

    /// An answer SPIRE gave but flowaudit could not read: the end is
    /// DERIVED, its reason is that answer's, and it is counted apart from
    /// "no identity".
    #[test]
    fn an_unreadable_spire_answer_is_derived_with_its_reason() {
        let mut e = without_spire();
        let mut f = flow();
        assert!(matches!(e.enrich(&mut f), Enriched::Done));
        let why = "SPIRE answered with 1 SVID, none readable: its leaf certificate has no spiffe:// URI SAN, and no ID beside it";
        e.apply_answer(&mut f.source, Lookup::Unreadable(why.into()), true);
        assert_eq!(f.source.identity_source, IdentitySource::Derived);
        assert_eq!(
            f.source.spiffe_id,
            "spiffe://demo.local/ns/99-apps/sa/frontend"
        );
        assert_eq!(
            f.source.identity_detail,
            format!("{why}: derived from its pod's metadata")
        );
        let counted: Vec<(&str, u64)> = LookupResult::ALL
            .iter()
            .map(|r| (r.label(), e.stats.lookups(*r)))
            .filter(|(_, n)| *n > 0)
            .collect();
        assert_eq!(counted, [("unreadable", 1)]);
    }

    #[test]
    fn hosts_and_world_have_no_identity() {
        let mut e = without_spire();
        let mut f = flow();
        f.l4.destination_ip = "10.244.0.1".parse().unwrap();
        e.enrich(&mut f);
        assert_eq!(f.destination.kind, EndKind::Host);
        assert_eq!(f.destination.identity_source, IdentitySource::Unknown);
        let mut f = flow();
        f.l4.destination_ip = "93.184.216.34".parse().unwrap();
        e.enrich(&mut f);
        assert_eq!(f.destination.kind, EndKind::World);
        assert_eq!(f.destination.spiffe_id, "");
    }

    /// Both sockets of a same-node connection: each event's peer end is
    /// attested from the other socket's owner (its cgroup -> pod UID ->
    /// SPIRE, here 1.9.6 by selectors), and the trust domain comes from
    /// SPIRE's bundle when nothing else gives it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn same_node_peer_is_attested_from_its_own_socket() {
        use flowaudit_common::SocketSide;
        use std::time::Duration;
        const FRONTEND_UID: &str = "11111111-2222-3333-4444-555555555555";
        const BACKEND_UID: &str = "66666666-7777-8888-9999-000000000000";
        let base = flowaudit_tests::support::TestDir::new("fa-enrich");
        let (front_cg, back_cg) = (
            pod_cgroup(&base, FRONTEND_UID, "c0ffee"),
            pod_cgroup(&base, BACKEND_UID, "c0ffee"),
        );
        let yaml = format!(
            "nodes:\n  - {{name: n1, ips: [10.244.0.1]}}\nendpoints:\n  - {{ips: [10.244.1.5], namespace: 99-apps, pod: frontend-7d9f, uid: {FRONTEND_UID}, serviceAccount: frontend, node: n1}}\n  - {{ips: [10.244.1.9], namespace: 99-apps, pod: backend-0, uid: {BACKEND_UID}, serviceAccount: backend, node: n1}}\n"
        );
        let dir = EndpointDirectory::parse(Path::new("e.yaml"), &yaml).unwrap();
        let (double, spire) = spire_1_9_6(
            &base,
            &[
                (FRONTEND_UID, "frontend", "frontend-7d9f"),
                (BACKEND_UID, "backend", "backend-0"),
            ],
        )
        .await;
        let mut e = node_enricher(&base, dir, spire);
        let mut r = sample();
        r.kind = flowaudit_common::RecordKind::Connect as u8;
        r.owner.cgroup_id = front_cg;
        let mut egress = event_of(&r);
        // The server's accepted socket: the same 4-tuple seen from the other side.
        let mut r2 = r;
        r2.side = SocketSide::Passive as u8;
        std::mem::swap(&mut r2.local_addr, &mut r2.remote_addr);
        std::mem::swap(&mut r2.local_port, &mut r2.remote_port);
        r2.owner.cgroup_id = back_cg;
        r2.owner.tgid = 4321;
        r2.sock_cookie = 100;
        let mut ingress = event_of(&r2);
        let mut pending = Vec::new();
        for f in [&mut egress, &mut ingress] {
            pending.push(match e.enrich(f) {
                Enriched::Pending(p) => Some(p),
                Enriched::Done => None,
            });
        }
        for _ in 0..300 {
            let mut all = true;
            for (f, p) in [&mut egress, &mut ingress]
                .into_iter()
                .zip(pending.iter_mut())
            {
                if let Some(q) = p {
                    if e.resume(f, q, false) == Progress::Waiting {
                        all = false;
                    } else {
                        *p = None;
                    }
                }
            }
            if all {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for f in [&egress, &ingress] {
            for (end, id) in [(&f.source, "frontend"), (&f.destination, "backend")] {
                assert_eq!(end.identity_source, IdentitySource::Attested, "{f:#?}");
                assert_eq!(
                    end.spiffe_id,
                    format!("spiffe://demo.local/ns/99-apps/sa/{id}")
                );
                assert_eq!(end.identity_detail, "");
            }
        }
        // Counted once per socket's own end, when settled (the peer end
        // reuses its socket's answer and is not asked again).
        let counted: Vec<u64> = LookupResult::ALL
            .iter()
            .map(|&r| e.stats.lookups(r))
            .collect();
        assert_eq!(
            counted,
            [2, 0, 0, 0, 0],
            "attested, no_identity, timeout, unavailable, unreadable"
        );
        let event = |rec: &flowaudit_common::FlowRecord| {
            FlowEvent::from_kernel(
                &KernelEvent::from_record(rec).unwrap(),
                &"n1".into(),
                &Clock::now(),
            )
        };
        let close = |mut rec: flowaudit_common::FlowRecord| {
            rec.kind = flowaudit_common::RecordKind::Close as u8;
            rec
        };
        let assert_attested = |f: &FlowEvent| {
            for (end, id) in [(&f.source, "frontend"), (&f.destination, "backend")] {
                assert_eq!(end.identity_source, IdentitySource::Attested, "{f:#?}");
                assert_eq!(
                    end.spiffe_id,
                    format!("spiffe://demo.local/ns/99-apps/sa/{id}")
                );
            }
        };
        // The connection lives on while 70,000 later sockets (more than
        // the table holds) open and close, a pass each: at its close, each
        // socket still finds its peer at once, and then both leave.
        for i in 0..70_000u32 {
            let mut c = r;
            c.remote_addr[..4].copy_from_slice(&[192, 0, 2, 1]);
            c.local_port = 10_000 + (i % 50_000) as u16;
            c.remote_port = 443 + (i / 50_000) as u16;
            c.sock_cookie = 1_000 + u64::from(i);
            for rec in [c, close(c)] {
                let mut f = event(&rec);
                assert!(matches!(e.enrich(&mut f), Enriched::Done), "{f:#?}");
            }
            e.end_pass();
        }
        assert_eq!(e.sockets.len(), 2, "the open connection's two sockets");
        for rec in [close(r), close(r2)] {
            let mut f = event(&rec);
            assert!(
                matches!(e.enrich(&mut f), Enriched::Done),
                "a close waited for its peer: {f:#?}"
            );
            assert_attested(&f);
        }
        e.end_pass();
        assert_eq!(e.sockets.len(), 0, "both sockets closed");
        // A client's CONNECT comes before its peer's socket is seen and
        // waits for it; the peer connects and both close within the same
        // pass: the waiting CONNECT still finds the peer at the pass's end.
        let (mut a, mut b) = (r, r2);
        a.local_port = 43_200;
        b.remote_port = 43_200;
        a.sock_cookie = 500;
        b.sock_cookie = 501;
        let mut connect = event(&a);
        let Enriched::Pending(mut waiting) = e.enrich(&mut connect) else {
            panic!("the CONNECT did not wait for its peer's socket: {connect:#?}");
        };
        for rec in [b, close(b), close(a)] {
            let _ = e.enrich(&mut event(&rec));
        }
        assert_eq!(
            e.resume(&mut connect, &mut waiting, false),
            Progress::Done { timed_out: false },
            "{connect:#?}"
        );
        assert_attested(&connect);
        e.end_pass();
        assert_eq!(e.sockets.len(), 0);
        drop(e);
        double.stop().await;
    }

    /// A socket whose cgroup is in no pod, from an address the directory
    /// gives to a pod with an entry: SPIRE is not asked by that pod's
    /// selectors (an address attests nothing), so the end is DERIVED.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metadata_reached_from_an_address_is_never_attested() {
        use flowaudit_tests::spire_double::{SpireDouble, SpireDoubleConfig};
        use std::time::Duration;
        let base = flowaudit_tests::support::TestDir::new("fa-enrich-ip");
        let socket = base.join("admin.sock");
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let double = SpireDouble::start(
            SpireDoubleConfig::new(&socket, "demo.local")
                .version("1.9.6")
                .entry(
                    "spiffe://demo.local/ns/99-apps/sa/frontend",
                    &["k8s:ns:99-apps", "k8s:sa:frontend"],
                )
                .authorize_uid(me, "spiffe://demo.local/ns/flowaudit/sa/flowaudit"),
        )
        .await
        .unwrap();
        let spire = SpireClient::start(&socket, spire::SpireOptions::default());
        let mut e = Enricher::new(
            Some(directory()),
            CgroupResolver::new(base.to_path_buf()),
            Some(spire),
            Some("demo.local".into()),
        );
        e.wait_ms = 2000;
        let mut f = flow();
        let mut pending = match e.enrich(&mut f) {
            Enriched::Pending(p) => Some(p),
            Enriched::Done => None,
        };
        for _ in 0..300 {
            let Some(p) = pending.as_mut() else { break };
            if e.resume(&mut f, p, false) != Progress::Waiting {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(f.source.identity_source, IdentitySource::Derived, "{f:#?}");
        assert_eq!(
            f.source.spiffe_id,
            "spiffe://demo.local/ns/99-apps/sa/frontend"
        );
        assert!(!f.source.identity_detail.is_empty());
        drop(e);
        double.stop().await;
    }

    /// A container's cgroup directory in pod `uid` under `base`, and its
    /// inode: the cgroup id the kernel reports.
    fn pod_cgroup(base: &Path, uid: &str, container: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let d = base.join(format!("kubepods/besteffort/pod{uid}/{container}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::metadata(&d).unwrap().ino()
    }

    /// A SPIRE 1.9.6 double at `base/spire/admin.sock` that knows the
    /// `pods` (uid, service account, name) of namespace 99-apps, each with
    /// an entry `ns/99-apps/sa/<sa>` by its pod UID, and lets this process
    /// in as a delegate; with a client connected to it.
    async fn spire_1_9_6(
        base: &Path,
        pods: &[(&str, &str, &str)],
    ) -> (flowaudit_tests::spire_double::SpireDouble, SpireClient) {
        use flowaudit_tests::spire_double::{SpireDouble, SpireDoubleConfig};
        let socket = base.join("spire/admin.sock");
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let mut cfg = SpireDoubleConfig::new(&socket, "demo.local")
            .version("1.9.6")
            .authorize_uid(me, "spiffe://demo.local/ns/flowaudit/sa/flowaudit");
        for (uid, sa, name) in pods {
            cfg = cfg.pod(uid, "99-apps", sa, name).entry(
                &format!("spiffe://demo.local/ns/99-apps/sa/{sa}"),
                &[&format!("k8s:pod-uid:{uid}")],
            );
        }
        let double = SpireDouble::start(cfg).await.unwrap();
        let spire = SpireClient::start(&socket, spire::SpireOptions::default());
        for _ in 0..200 {
            if spire.status().connected {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(spire.status().connected, "{:?}", spire.status());
        (double, spire)
    }

    /// An enricher on node n1 with SPIRE and the pods of `dir`, whose
    /// cgroups are under `base`; flows wait up to 2 s.
    fn node_enricher(base: &Path, dir: EndpointDirectory, spire: SpireClient) -> Enricher {
        let mut e = Enricher::new(
            Some(watch::channel(Arc::new(dir)).1),
            CgroupResolver::new(base.to_path_buf()),
            Some(spire),
            None,
        );
        e.node_name = "n1".into();
        e.wait_ms = 2000;
        e
    }

    /// The flow of kernel record `r` on node n1.
    fn event_of(r: &FlowRecord) -> FlowEvent {
        FlowEvent::from_kernel(
            &KernelEvent::from_record(r).unwrap(),
            &"n1".into(),
            &Clock::now(),
        )
    }

    /// Enriches `f`, waiting up to 3 s for its answers; true when they
    /// were all there at once.
    async fn settle(e: &mut Enricher, f: &mut FlowEvent) -> bool {
        let mut p = match e.enrich(f) {
            Enriched::Done => return true,
            Enriched::Pending(p) => p,
        };
        for _ in 0..300 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            if e.resume(f, &mut p, false) != Progress::Waiting {
                return false;
            }
        }
        panic!("not settled within 3 s: {f:#?}")
    }

    /// A socket owner is resolved once and then answered from the owner
    /// memo, but never with what no longer holds: a pod relabelled in the
    /// directory, an entry removed from SPIRE, a cgroup the resolver did
    /// not know yet each reach the next flow of the same owner.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_owner_is_read_again_when_what_it_came_from_changes() {
        use std::time::Duration;
        const UID: &str = "11111111-2222-3333-4444-555555555555";
        const ID: &str = "spiffe://demo.local/ns/99-apps/sa/frontend";
        let base = flowaudit_tests::support::TestDir::new("fa-owners");
        let directory = |app: &str| {
            let yaml = format!(
                "nodes:\n  - {{name: n1, ips: [10.244.0.1]}}\nendpoints:\n  - {{ips: [10.244.1.5], namespace: 99-apps, pod: frontend-7d9f, uid: {UID}, serviceAccount: frontend, node: n1, labels: {{app: {app}}}}}\n"
            );
            Arc::new(EndpointDirectory::parse(Path::new("e.yaml"), &yaml).unwrap())
        };
        let cg = pod_cgroup(&base, UID, "c0ffee");
        let (double, spire) = spire_1_9_6(&base, &[(UID, "frontend", "frontend-7d9f")]).await;
        let (tx, rx) = watch::channel(directory("frontend"));
        let mut cgroups = CgroupResolver::new(base.to_path_buf());
        // Only the first miss scans: what the resolver knows stays put.
        cgroups.rescan_at_most_every(Duration::from_secs(3600));
        let mut e = Enricher::new(Some(rx), cgroups, Some(spire), None);
        e.node_name = "n1".into();
        e.wait_ms = 2000;
        let mut port = 40000;
        let mut flow_of = |cgroup_id: u64, tgid: u32| {
            port += 1;
            let mut r = sample();
            r.owner.cgroup_id = cgroup_id;
            r.owner.tgid = tgid;
            r.local_port = port;
            event_of(&r)
        };
        let facts = |f: &FlowEvent| SocketFacts {
            pid: f.source.pid,
            start_ns: f.socket.process_start_ns,
            cgroup_id: f.source.cgroup_id,
        };
        let app = |f: &FlowEvent| f.source.pod.labels.get("app").cloned();

        // The first flows ask SPIRE (the first waits for its subscription);
        // then the owner is remembered and answered at once.
        for _ in 0..2 {
            let mut f = flow_of(cg, 1234);
            settle(&mut e, &mut f).await;
            assert_eq!(f.source.spiffe_id, ID, "{f:#?}");
        }
        let mut f = flow_of(cg, 1234);
        assert!(
            settle(&mut e, &mut f).await,
            "a remembered owner waits for nothing"
        );
        assert_eq!(
            (f.source.identity_source, &*f.source.spiffe_id),
            (IdentitySource::Attested, ID)
        );
        assert_eq!(app(&f).as_deref(), Some("frontend"));
        assert!(e.owners.owners.contains_key(&facts(&f)), "not remembered");

        // The pod relabelled: the next flow has the new labels.
        tx.send(directory("frontend-v2")).unwrap();
        let mut f = flow_of(cg, 1234);
        settle(&mut e, &mut f).await;
        assert_eq!(app(&f).as_deref(), Some("frontend-v2"), "{f:#?}");
        assert_eq!(f.source.identity_source, IdentitySource::Attested);

        // The entry removed: SPIRE's "no identity" reaches the same owner.
        double.remove_entry(ID);
        let mut derived = false;
        for _ in 0..300 {
            let mut f = flow_of(cg, 1234);
            settle(&mut e, &mut f).await;
            if f.source.identity_source == IdentitySource::Derived {
                assert!(f.source.identity_detail.contains("SPIRE gave no identity"));
                derived = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            derived,
            "the removed entry still attests the remembered owner"
        );
        double.add_entry(ID, &[&format!("k8s:pod-uid:{UID}")]);

        // A container the resolver has not scanned yet: its pod is unknown,
        // and stays unknown only until a scan finds it.
        let new_cg = pod_cgroup(&base, UID, "c0ffee2");
        let mut f = flow_of(new_cg, 777);
        settle(&mut e, &mut f).await;
        assert_ne!(f.source.identity_source, IdentitySource::Attested, "{f:#?}");
        assert!(
            !e.owners.owners.contains_key(&facts(&f)),
            "an owner of an unknown cgroup was remembered"
        );
        e.cgroups.rescan_at_most_every(Duration::ZERO);
        let mut attested = false;
        for _ in 0..300 {
            let mut f = flow_of(new_cg, 777);
            settle(&mut e, &mut f).await;
            if f.source.identity_source == IdentitySource::Attested {
                attested = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(attested, "the new container's pod was never found");
    }

    /// A connection to a pod on this node that never established leaves
    /// the socket table at once: no peer socket will come to ask for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_connection_leaves_the_socket_table_at_once() {
        const FRONTEND_UID: &str = "11111111-2222-3333-4444-555555555555";
        let base = flowaudit_tests::support::TestDir::new("fa-failed");
        let cg = pod_cgroup(&base, FRONTEND_UID, "c0ffee");
        let yaml = format!(
            "endpoints:\n  - {{ips: [10.244.1.5], namespace: 99-apps, pod: frontend-7d9f, uid: {FRONTEND_UID}, serviceAccount: frontend, node: n1}}\n  - {{ips: [10.244.1.9], namespace: 99-apps, pod: backend-0, serviceAccount: backend, node: n1}}\n"
        );
        let dir = EndpointDirectory::parse(Path::new("e.yaml"), &yaml).unwrap();
        let (_double, spire) =
            spire_1_9_6(&base, &[(FRONTEND_UID, "frontend", "frontend-7d9f")]).await;
        let mut e = node_enricher(&base, dir, spire);
        let mut r = sample();
        r.kind = flowaudit_common::RecordKind::Failed as u8;
        r.owner.cgroup_id = cg;
        let mut f = event_of(&r);
        settle(&mut e, &mut f).await;
        assert_eq!(f.event, EventKind::Failed);
        assert_eq!(f.source.identity_source, IdentitySource::Attested, "{f:#?}");
        assert!(
            f.destination.identity_detail.contains("never established"),
            "{f:#?}"
        );
        e.end_pass();
        assert_eq!(e.sockets.len(), 0, "the failed socket stayed in the table");
    }

    #[test]
    fn a_peer_on_another_node_is_derived_and_says_so() {
        let yaml = "endpoints:\n  - {ips: [10.244.1.5], namespace: 99-apps, pod: frontend-7d9f, serviceAccount: frontend, node: n1}\n  - {ips: [10.244.1.9], namespace: 99-apps, pod: postgresql-0, serviceAccount: postgresql, node: n2}\n";
        let dir = EndpointDirectory::parse(Path::new("e.yaml"), yaml).unwrap();
        let mut e = Enricher::new(
            Some(watch::channel(Arc::new(dir)).1),
            CgroupResolver::new("/nonexistent".into()),
            None,
            Some("demo.local".into()),
        );
        e.node_name = "n1".into();
        let mut f = flow();
        e.enrich(&mut f);
        assert_eq!(f.destination.identity_source, IdentitySource::Derived);
        assert!(
            f.destination.identity_detail.contains("endpoint directory"),
            "{f:?}"
        );
        assert!(f.source.identity_detail.contains("no SPIRE"), "{f:?}");
        // With SPIRE, such an end says which node its pod is on; the
        // sentence is made once per node and shared by its flows.
        let n2 = e.elsewhere_detail("n2");
        assert_eq!(
            n2,
            "pod on node n2: derived from its address through the endpoint directory"
        );
        assert!(ArcStr::ptr_eq(&n2, &e.elsewhere_detail("n2")));
        assert!(e.elsewhere_detail("n3").starts_with("pod on node n3:"));
    }

    /// The policy in force names the trust domain of DERIVED IDs, also
    /// after a reload that changes it; `--trust-domain` wins over it; a
    /// policy that names none keeps the last one.
    #[test]
    fn derived_ids_follow_the_policys_trust_domain_across_reloads() {
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/examples/precinct-99-flowpolicy.yaml"),
        )
        .expect("the example policy");
        let policy = |text: &str| {
            let loaded = flowaudit_policy::load_sources(&[flowaudit_policy::Source {
                name: "policy.yaml".into(),
                text: text.into(),
            }])
            .expect("a valid policy");
            Arc::new(loaded.policy)
        };
        let renamed = example.replace("demo.local", "precinct.example");
        let unnamed = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: 99-apps}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";
        let source_id = |e: &mut Enricher| {
            let mut f = flow();
            e.enrich(&mut f);
            assert_eq!(f.source.identity_source, IdentitySource::Derived, "{f:?}");
            f.source.spiffe_id.to_string()
        };

        let (tx, rx) = watch::channel(policy(&example));
        let mut e = Enricher::new(
            Some(directory()),
            CgroupResolver::new("/nonexistent".into()),
            None,
            None,
        );
        e.follow_policy(rx.clone());
        assert_eq!(
            source_id(&mut e),
            "spiffe://demo.local/ns/99-apps/sa/frontend"
        );
        tx.send(policy(&renamed)).unwrap();
        assert_eq!(
            source_id(&mut e),
            "spiffe://precinct.example/ns/99-apps/sa/frontend",
            "the reloaded policy's trust domain"
        );
        tx.send(policy(unnamed)).unwrap();
        assert_eq!(
            source_id(&mut e),
            "spiffe://precinct.example/ns/99-apps/sa/frontend",
            "a policy without one keeps the last"
        );

        let mut given = Enricher::new(
            Some(directory()),
            CgroupResolver::new("/nonexistent".into()),
            None,
            Some("given.example".into()),
        );
        given.follow_policy(rx);
        tx.send(policy(&example)).unwrap();
        assert_eq!(
            source_id(&mut given),
            "spiffe://given.example/ns/99-apps/sa/frontend",
            "--trust-domain wins over the policy's"
        );
    }

    #[test]
    fn no_trust_domain_means_no_derived_id() {
        let mut e = Enricher::new(
            Some(directory()),
            CgroupResolver::new("/nonexistent".into()),
            None,
            None,
        );
        let mut f = flow();
        e.enrich(&mut f);
        assert_eq!(f.source.identity_source, IdentitySource::Unknown);
        assert_eq!(f.source.pod.pod_name, "frontend-7d9f");
        assert_eq!(
            trust_domain_of("spiffe://demo.local/ns/a/sa/b").as_deref(),
            Some("demo.local")
        );
        assert_eq!(trust_domain_of("http://x"), None);
    }
}
