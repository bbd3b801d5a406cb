//! Compiled lookup structures, so that judging a flow costs the same with 10 or 10,000
//! rules. FlowPolicy rules go into a two-level peer index (destination, then source),
//! each level a per-trust-domain trie over SPIFFE path segments (literal, `*`, `**`)
//! plus `world`/`host` slots and an "any SPIFFE ID" projection used when an end's ID is
//! unknown; its leaves are [`PortMap`]s. Imported policies are bucketed by namespace
//! and by one required `label=value`.

/// Keys here are the policy's own names (trust domains, path segments,
/// namespaces, labels): a fast fold hash, not SipHash, for every lookup a
/// flow makes. Lookups never insert, so a flow's IDs cannot grow a map.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use smallvec::SmallVec;

use crate::ir::{ImportedPolicy, PeerPattern, Tri};
use crate::model::{Peer, PeerKind};
use crate::ports::{PortMap, PortSet};
use crate::spiffe::{Segment, split_id};

/// Segments of a SPIFFE path that a lookup reads; more are ignored (IDs
/// have few, and a fixed cap keeps hostile input cheap).
const MAX_SEGMENTS: usize = 64;

/// Rule ids with certainty, as `RuleIndex::lookup` hands them out.
pub type RuleHits = SmallVec<[(u32, Tri); INLINE_HITS]>;
type Hits<'s, T> = SmallVec<[(&'s T, Tri); INLINE_HITS]>;
const INLINE_HITS: usize = 8;
/// Branches of a trie walk kept on the call stack (see `TrieNode::lookup`).
const INLINE_PENDING: usize = 16;

/// Trie over path segments.
#[derive(Debug, Default)]
struct TrieNode<T> {
    lits: HashMap<String, TrieNode<T>>,
    any: Option<Box<TrieNode<T>>>,
    /// Patterns ending exactly here.
    here: Option<T>,
    /// Patterns ending here with `/**`.
    rest: Option<T>,
}

impl<T: Default> TrieNode<T> {
    fn slot(&mut self, segs: &[Segment]) -> &mut T {
        let mut node = self;
        for (i, s) in segs.iter().enumerate() {
            match s {
                Segment::Literal(l) => node = node.lits.entry(l.clone()).or_default(),
                Segment::Any => node = node.any.get_or_insert_with(Default::default),
                // `**` is only ever last (the parser guarantees it); anything after is moot.
                Segment::Rest => {
                    let _ = i;
                    return node.rest.get_or_insert_with(T::default);
                }
            }
        }
        node.here.get_or_insert_with(T::default)
    }
}

impl<T> TrieNode<T> {
    /// Calls `found` with every pattern that matches the segments of
    /// `path` (empty segments skipped, at most `MAX_SEGMENTS` read: IDs
    /// have few, and a fixed cap keeps hostile input cheap). Depth-first,
    /// reading the path as it goes, not split up front: no recursion, and
    /// the pending branches, at most one per level of the trie, are bounded
    /// by the policy's deepest pattern, never by the ID, which comes from
    /// the network side. They stay on the call stack for patterns of up to
    /// `INLINE_PENDING - 1` segments, so judging a flow allocates nothing
    /// here.
    fn lookup<'s>(&'s self, path: &str, found: &mut dyn FnMut(&'s T)) {
        let mut pending: SmallVec<[(&TrieNode<T>, &str, usize); INLINE_PENDING]> = SmallVec::new();
        pending.push((self, path, 0));
        while let Some((node, rest, read)) = pending.pop() {
            // Segments are short: a byte loop, not the `memchr` of
            // `split_once`, which costs more to set up than to scan them.
            let rest = &rest[rest.bytes().take_while(|&b| b == b'/').count()..];
            if rest.is_empty() || read == MAX_SEGMENTS {
                if let Some(t) = &node.here {
                    found(t);
                }
                continue;
            }
            if let Some(t) = &node.rest {
                found(t);
            }
            let end = rest.bytes().position(|b| b == b'/').unwrap_or(rest.len());
            let (seg, after) = rest.split_at(end);
            if let Some(next) = node.lits.get(seg) {
                pending.push((next, after, read + 1));
            }
            if let Some(next) = &node.any {
                pending.push((next, after, read + 1));
            }
        }
    }

    fn for_each_mut(&mut self, f: &mut dyn FnMut(&mut T)) {
        let mut stack: Vec<&mut TrieNode<T>> = vec![self];
        while let Some(node) = stack.pop() {
            if let Some(t) = &mut node.here {
                f(t);
            }
            if let Some(t) = &mut node.rest {
                f(t);
            }
            if let Some(a) = &mut node.any {
                stack.push(a);
            }
            stack.extend(node.lits.values_mut());
        }
    }
}

/// One level of the FlowPolicy index: where a peer can land.
#[derive(Debug)]
pub struct PeerIndex<T> {
    tds: HashMap<String, TrieNode<T>>,
    world: Option<T>,
    host: Option<T>,
    /// Everything under any SPIFFE pattern, for ends whose ID is unknown.
    any_spiffe: Option<T>,
}

impl<T> Default for PeerIndex<T> {
    fn default() -> Self {
        PeerIndex {
            tds: HashMap::default(),
            world: None,
            host: None,
            any_spiffe: None,
        }
    }
}

/// How a peer is looked up: by its ID, or as "could be any ID" or "could be anything".
#[derive(Clone, Copy)]
enum PeerKey<'a> {
    World,
    Host,
    Id(&'a str, &'a str),
    UnknownId,
    Unknown,
}

fn key_of<'a>(p: &Peer<'a>) -> PeerKey<'a> {
    match p.kind {
        PeerKind::World => PeerKey::World,
        PeerKind::Host => PeerKey::Host,
        PeerKind::Unknown => PeerKey::Unknown,
        PeerKind::Workload => match p.spiffe_id.and_then(split_id) {
            Some((td, path)) => PeerKey::Id(td, path),
            None => PeerKey::UnknownId,
        },
    }
}

impl<T: Default> PeerIndex<T> {
    /// The slots a pattern is stored in.
    fn slots(&mut self, p: &PeerPattern) -> Vec<&mut T> {
        match p {
            PeerPattern::World => vec![self.world.get_or_insert_with(T::default)],
            PeerPattern::Host => vec![self.host.get_or_insert_with(T::default)],
            PeerPattern::Spiffe(id) => {
                let trie = self.tds.entry(id.trust_domain.clone()).or_default();
                vec![
                    trie.slot(&id.segments),
                    self.any_spiffe.get_or_insert_with(T::default),
                ]
            }
        }
    }
}

impl<T> PeerIndex<T> {
    fn lookup<'s>(&'s self, key: PeerKey<'_>, out: &mut Hits<'s, T>) {
        match key {
            PeerKey::World => out.extend(self.world.iter().map(|t| (t, Tri::Yes))),
            PeerKey::Host => out.extend(self.host.iter().map(|t| (t, Tri::Yes))),
            PeerKey::Id(td, path) => {
                if let Some(trie) = self.tds.get(td) {
                    trie.lookup(path, &mut |t| out.push((t, Tri::Yes)));
                }
            }
            PeerKey::UnknownId => out.extend(self.any_spiffe.iter().map(|t| (t, Tri::Unknown))),
            PeerKey::Unknown => {
                for t in [&self.world, &self.host, &self.any_spiffe]
                    .into_iter()
                    .flatten()
                {
                    out.push((t, Tri::Unknown));
                }
            }
        }
    }

    fn for_each_mut(&mut self, f: &mut dyn FnMut(&mut T)) {
        for trie in self.tds.values_mut() {
            trie.for_each_mut(f);
        }
        for t in [&mut self.world, &mut self.host, &mut self.any_spiffe]
            .into_iter()
            .flatten()
        {
            f(t);
        }
    }
}

type SrcIndex = PeerIndex<PortMap<u32>>;

/// The FlowPolicy rule index: destination -> source -> port -> rule ids.
#[derive(Debug, Default)]
pub struct RuleIndex {
    dst: PeerIndex<SrcIndex>,
}

impl RuleIndex {
    pub fn insert(&mut self, id: u32, from: &[PeerPattern], to: &[PeerPattern], ports: &PortSet) {
        for t in to {
            for src in self.dst.slots(t) {
                for f in from {
                    for leaf in src.slots(f) {
                        leaf.insert(ports, id);
                    }
                }
            }
        }
    }

    pub fn build(&mut self) {
        self.dst.for_each_mut(&mut |src: &mut SrcIndex| {
            src.for_each_mut(&mut |pm: &mut PortMap<u32>| pm.build())
        });
    }

    /// Matching rule ids with certainty (`Yes`, or `Unknown` when an ID is missing).
    /// Sorted by id, one entry per rule, strongest certainty kept.
    /// Inline up to `INLINE_HITS` entries: no heap for a flow that a few
    /// rules match.
    pub fn lookup(&self, src: &Peer<'_>, dst: &Peer<'_>, port: u16) -> RuleHits {
        let mut dsts = Hits::new();
        self.dst.lookup(key_of(dst), &mut dsts);
        let skey = key_of(src);
        let mut out = RuleHits::new();
        let mut srcs = Hits::new();
        for (sidx, dt) in dsts {
            srcs.clear();
            sidx.lookup(skey, &mut srcs);
            for (pm, st) in &srcs {
                let t = dt.and(*st);
                out.extend(pm.get(port).iter().map(|id| (*id, t)));
            }
        }
        // Strongest certainty first per id, then keep the first of each id.
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        out.dedup_by_key(|e| e.0);
        out
    }
}

/// Imported policies bucketed by namespace and by one required label.
#[derive(Debug, Default)]
pub struct ImportIndex {
    by_ns: HashMap<String, Bucket>,
    global: Bucket,
    count: usize,
}

#[derive(Debug, Default)]
struct Bucket {
    /// label key -> value -> policy ids.
    by_label: HashMap<String, HashMap<String, Vec<u32>>>,
    scan: Vec<u32>,
}

impl Bucket {
    fn insert(&mut self, id: u32, p: &ImportedPolicy) {
        match p.subject.index_pair() {
            Some((k, v)) => self
                .by_label
                .entry(k.to_string())
                .or_default()
                .entry(v.to_string())
                .or_default()
                .push(id),
            None => self.scan.push(id),
        }
    }

    fn candidates(&self, peer: &Peer<'_>, out: &mut Vec<u32>) {
        out.extend_from_slice(&self.scan);
        for (k, values) in &self.by_label {
            match peer.labels {
                Some(l) => {
                    if let Some(ids) = l.label(k).and_then(|v| values.get(v)) {
                        out.extend_from_slice(ids);
                    }
                }
                // Labels unknown: every policy could select the peer.
                None => values.values().for_each(|ids| out.extend_from_slice(ids)),
            }
        }
    }
}

impl ImportIndex {
    pub fn new(policies: &[ImportedPolicy]) -> Self {
        let mut idx = ImportIndex {
            count: policies.len(),
            ..Default::default()
        };
        for (i, p) in policies.iter().enumerate() {
            let id = i as u32;
            match p.subject.namespace() {
                Some(ns) => idx.by_ns.entry(ns.to_string()).or_default().insert(id, p),
                None => idx.global.insert(id, p),
            }
        }
        idx
    }

    /// Policies that may select `peer` (a superset; callers evaluate the selector).
    pub fn candidates(&self, peer: &Peer<'_>) -> Vec<u32> {
        let mut out = Vec::new();
        match (peer.kind, peer.namespace) {
            (PeerKind::World | PeerKind::Host, _) => return out,
            (PeerKind::Workload, Some(ns)) => {
                if let Some(b) = self.by_ns.get(ns) {
                    b.candidates(peer, &mut out);
                }
                self.global.candidates(peer, &mut out);
            }
            // Namespace unknown: any policy could apply.
            _ => out.extend(0..self.count as u32),
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::PortRange;
    use crate::spiffe::parse_pattern;

    fn index(rules: &[(&str, &str)]) -> RuleIndex {
        let mut idx = RuleIndex::default();
        let ports = PortSet::of(vec![PortRange { lo: 80, hi: 80 }]);
        for (id, (from, to)) in rules.iter().enumerate() {
            let pat = |p: &str| PeerPattern::Spiffe(parse_pattern(p).expect(p));
            idx.insert(id as u32, &[pat(from)], &[pat(to)], &ports);
        }
        idx.build();
        idx
    }

    fn workload(id: &str) -> Peer<'_> {
        Peer {
            kind: PeerKind::Workload,
            spiffe_id: Some(id),
            identity_source: crate::model::IdentitySource::Attested,
            namespace: None,
            service_account: None,
            labels: None,
            name: None,
        }
    }

    fn ids(idx: &RuleIndex, src: &str, dst: &str) -> Vec<u32> {
        idx.lookup(&workload(src), &workload(dst), 80)
            .into_iter()
            .map(|(id, t)| {
                assert_eq!(t, Tri::Yes, "{src} -> {dst}: rule {id} matched with {t:?}");
                id
            })
            .collect()
    }

    #[test]
    fn the_walk_reads_literals_one_segment_wildcards_and_a_rest() {
        let idx = index(&[
            ("spiffe://td/ns/a/sa/x", "spiffe://td/ns/b/sa/y"),
            ("spiffe://td/ns/*/sa/x", "spiffe://td/ns/b/**"),
            ("spiffe://td/**", "spiffe://td/ns/b/sa/*"),
            ("spiffe://other/ns/a/sa/x", "spiffe://td/ns/b/sa/y"),
        ]);
        assert_eq!(
            ids(&idx, "spiffe://td/ns/a/sa/x", "spiffe://td/ns/b/sa/y"),
            [0, 1, 2]
        );
        // Empty segments are skipped, as the reference reading does.
        assert_eq!(
            ids(&idx, "spiffe://td//ns/a/sa/x/", "spiffe://td/ns//b/sa/y"),
            [0, 1, 2]
        );
        // `**` needs at least one more segment; `*` exactly one.
        assert_eq!(
            ids(&idx, "spiffe://td/ns/c/sa/x", "spiffe://td/ns/b"),
            [0u32; 0]
        );
        assert_eq!(
            ids(&idx, "spiffe://td/ns/c/sa/x", "spiffe://td/ns/b/sa/y/z"),
            [1]
        );
        assert_eq!(ids(&idx, "spiffe://td/x", "spiffe://td/ns/b/sa/q"), [2]);
        assert_eq!(
            ids(&idx, "spiffe://other/ns/a/sa/x", "spiffe://td/ns/b/sa/y"),
            [3]
        );
    }

    #[test]
    fn a_hostile_id_is_read_only_as_far_as_the_cap() {
        let idx = index(&[
            ("spiffe://td/a/**", "spiffe://td/b"),
            ("spiffe://td/a/a/a", "spiffe://td/b"),
        ]);
        let long = format!("spiffe://td{}", "/a".repeat(100_000));
        assert_eq!(ids(&idx, &long, "spiffe://td/b"), [0]);
        // Past `MAX_SEGMENTS` segments the rest is not read: the ID is taken
        // as its first 64 (as before the walk read the path lazily).
        let capped = format!("spiffe://td{}", "/a".repeat(MAX_SEGMENTS));
        let idx = index(&[(capped.as_str(), "spiffe://td/b")]);
        assert_eq!(ids(&idx, &format!("{capped}/more"), "spiffe://td/b"), [0]);
    }

    #[test]
    fn patterns_deeper_than_the_inline_branches_still_match() {
        // Every level has a literal and a `*` branch, so the walk keeps one
        // pending branch per level: more than fit inline.
        let depth = INLINE_PENDING + 4;
        let lit = format!("spiffe://td{}", "/s".repeat(depth));
        let mut rules = vec![(lit.clone(), "spiffe://td/b".to_string())];
        for level in 0..depth {
            let mut segs = vec!["s"; depth];
            segs[level] = "*";
            rules.push((
                format!("spiffe://td/{}", segs.join("/")),
                "spiffe://td/b".into(),
            ));
        }
        let borrowed: Vec<(&str, &str)> = rules
            .iter()
            .map(|(f, t)| (f.as_str(), t.as_str()))
            .collect();
        let idx = index(&borrowed);
        let all: Vec<u32> = (0..=depth as u32).collect();
        assert_eq!(ids(&idx, &lit, "spiffe://td/b"), all);
        let mut other = vec!["s"; depth];
        other[3] = "t";
        assert_eq!(
            ids(
                &idx,
                &format!("spiffe://td/{}", other.join("/")),
                "spiffe://td/b"
            ),
            [4]
        );
    }
}
