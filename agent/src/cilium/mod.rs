//! Cilium mutual authentication, read from Cilium's own pinned BPF maps,
//! read-only. In: a judged flow under a CiliumNetworkPolicy rule with
//! `authentication.mode: required`, and which node enforces it; out: what
//! this node's auth map held for the pair when the connection was made
//! ([`MutualAuth`]), and whether transparent encryption covers the path.
//!
//! Layouts, from Cilium's source (read at v1.15.7, the reference log's
//! release, and v1.18.3, the newest checked; the upstream "Prepare for
//! release" commits de06bcfb and c1601689):
//! - `cilium_auth_map` (bpf/lib/common.h `struct auth_key`/`struct
//!   auth_info`; bpf/lib/auth.h `auth_lookup`; pkg/maps/authmap): hash,
//!   key {u32 local_sec_label, u32 remote_sec_label, u16 remote_node_id (0
//!   for the local node), u8 auth_type (1 = spire, what `mode: required`
//!   gives: pkg/policy/api/rule.go, pkg/policy/types/auth.go), u8 pad},
//!   value {u64 expiration}, in Unix time in 512 ns units
//!   (pkg/datapath/linux/utime); valid while `now < expiration`.
//! - the ipcache, an LPM trie keyed {u32 prefixlen, u16 cluster_id, u8 pad,
//!   u8 family, 16 address bytes}, prefixlen counting from cluster_id (32 +
//!   the address bits): `cilium_ipcache` (1.15-1.17) holds {u32
//!   sec_identity, u32 tunnel_endpoint, u16 pad, u8 key, u8 flags} (12
//!   bytes); `cilium_ipcache_v2` (1.18) {u32 sec_identity, 16-byte
//!   tunnel_endpoint, u16 pad, u8 key, u8 flags} (24 bytes). The tunnel
//!   endpoint is the owning node's IP, zero for this node
//!   (pkg/datapath/ipcache/listener.go); `key` is non-zero when Cilium
//!   encrypts traffic to the address (0xFF WireGuard, 1..15 IPsec SPI).
//! - the node map, keyed {u16 pad, u8 pad, u8 family, 16 address bytes}:
//!   `cilium_node_map` (1.15) holds the u16 node id; `cilium_node_map_v2`
//!   (1.16+, what auth_lookup reads there) {u16 id, u8 spi, u8 pad}. Ids
//!   are this node's own numbering.

pub mod bpf;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flowaudit_policy::{AuthSide, MutualAuth, MutualAuthSource, MutualAuthState, PathEncryption};

use self::bpf::PinnedMap;
use crate::flow::{EventKind, FlowEvent, rfc3339_nanos};

/// Where Cilium pins its maps (pkg/defaults BPFFSRoot + TCGlobalsPath).
pub const DEFAULT_DIR: &str = "/sys/fs/bpf/tc/globals";

/// `AuthTypeSpire`: what `authentication.mode: required` asks for.
const AUTH_TYPE_SPIRE: u8 = 1;
/// `ENDPOINT_KEY_IPV4` / `ENDPOINT_KEY_IPV6`.
const FAMILY_V4: u8 = 1;
const FAMILY_V6: u8 = 2;
/// The encryption key index Cilium puts in the ipcache for WireGuard.
const WIREGUARD_KEY: u8 = 0xFF;
/// Nanoseconds per Cilium `utime` unit.
const UTIME_SHIFT: u32 = 9;
/// How often the maps are opened again (Cilium may start later, or
/// re-create them).
const RETRY: Duration = Duration::from_secs(10);
/// Connections whose CONNECT-time answer is kept for their CLOSE.
const REMEMBERED: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum CiliumError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: key {key} bytes and value {value} bytes match no Cilium release this agent reads ({expected}); the layout changed: report it with the Cilium version"
    )]
    Layout {
        path: PathBuf,
        key: u32,
        value: u32,
        expected: &'static str,
    },
}

/// The ipcache and node map layouts differ by release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IpcacheLayout {
    /// `cilium_ipcache`, 12-byte value (1.15-1.17).
    V1,
    /// `cilium_ipcache_v2`, 24-byte value (1.18+).
    V2,
}

/// Cilium's maps on this node, opened read-only.
#[derive(Debug)]
struct Maps {
    auth: PinnedMap,
    ipcache: PinnedMap,
    ipcache_layout: IpcacheLayout,
    node: PinnedMap,
}

/// What the ipcache says of one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Remote {
    identity: u32,
    /// The owning node's IPv4 address, None for this node.
    tunnel_endpoint: Option<[u8; 4]>,
    key: u8,
}

/// The map pinned as `newer`, else (only where no such map is pinned: a
/// release before it) the one pinned as `older`, with the name it has. Any
/// other failure to open `newer` (permission denied, not a map) is said
/// as such, not taken for an older release's layout.
fn newer_or_older<M>(
    open: &impl Fn(&str) -> Result<M, CiliumError>,
    newer: &'static str,
    older: &'static str,
) -> Result<(M, &'static str), CiliumError> {
    match open(newer) {
        Ok(m) => Ok((m, newer)),
        Err(CiliumError::Open { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok((open(older)?, older))
        }
        Err(e) => Err(e),
    }
}

impl Maps {
    fn open(dir: &Path) -> Result<Maps, CiliumError> {
        let open = |name: &str| {
            let path = dir.join(name);
            PinnedMap::open(&path).map_err(|source| CiliumError::Open { path, source })
        };
        let layout = |m: &PinnedMap, name: &str, ok: bool, expected: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(CiliumError::Layout {
                    path: dir.join(name),
                    key: m.info.key_size,
                    value: m.info.value_size,
                    expected,
                })
            }
        };
        let auth = open("cilium_auth_map")?;
        layout(
            &auth,
            "cilium_auth_map",
            (auth.info.key_size, auth.info.value_size) == (12, 8),
            "key 12, value 8",
        )?;
        let (ipcache, ipname) = newer_or_older(&open, "cilium_ipcache_v2", "cilium_ipcache")?;
        let ipcache_layout = match ipname {
            "cilium_ipcache_v2" => IpcacheLayout::V2,
            _ => IpcacheLayout::V1,
        };
        let want = match ipcache_layout {
            IpcacheLayout::V1 => 12,
            IpcacheLayout::V2 => 24,
        };
        layout(
            &ipcache,
            ipname,
            (ipcache.info.key_size, ipcache.info.value_size) == (24, want),
            "key 24, value 12 (cilium_ipcache) or 24 (cilium_ipcache_v2)",
        )?;
        // 1.16 and 1.17 have both node maps; their auth_lookup reads v2.
        let (node, nodename) = newer_or_older(&open, "cilium_node_map_v2", "cilium_node_map")?;
        let want = if nodename == "cilium_node_map_v2" {
            4
        } else {
            2
        };
        layout(
            &node,
            nodename,
            (node.info.key_size, node.info.value_size) == (20, want),
            "key 20, value 2 (cilium_node_map) or 4 (cilium_node_map_v2)",
        )?;
        Ok(Maps {
            auth,
            ipcache,
            ipcache_layout,
            node,
        })
    }

    fn describe(&self) -> &'static str {
        match self.ipcache_layout {
            IpcacheLayout::V1 => "cilium_ipcache (Cilium 1.15-1.17 layout)",
            IpcacheLayout::V2 => "cilium_ipcache_v2 (Cilium 1.18+ layout)",
        }
    }

    /// Longest-prefix match of one address, as the datapath does (cluster 0).
    fn ipcache(&self, ip: IpAddr) -> std::io::Result<Option<Remote>> {
        let mut key = [0u8; 24];
        let (bits, family) = match ip {
            IpAddr::V4(a) => {
                key[8..12].copy_from_slice(&a.octets());
                (32u32, FAMILY_V4)
            }
            IpAddr::V6(a) => {
                key[8..24].copy_from_slice(&a.octets());
                (128, FAMILY_V6)
            }
        };
        key[0..4].copy_from_slice(&(32 + bits).to_ne_bytes());
        key[7] = family;
        let mut v = vec![0u8; self.ipcache.info.value_size as usize];
        if !self.ipcache.lookup(&key, &mut v)? {
            return Ok(None);
        }
        let identity = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]);
        let tunnel = [v[4], v[5], v[6], v[7]];
        let key = match self.ipcache_layout {
            IpcacheLayout::V1 => v[10],
            IpcacheLayout::V2 => v[22],
        };
        Ok(Some(Remote {
            identity,
            tunnel_endpoint: (tunnel != [0; 4]).then_some(tunnel),
            key,
        }))
    }

    fn node_id(&self, ip4: [u8; 4]) -> std::io::Result<Option<u16>> {
        let mut key = [0u8; 20];
        key[3] = FAMILY_V4;
        key[4..8].copy_from_slice(&ip4);
        let mut v = vec![0u8; self.node.info.value_size as usize];
        if !self.node.lookup(&key, &mut v)? {
            return Ok(None);
        }
        let id = u16::from_ne_bytes([v[0], v[1]]);
        // auth_lookup (1.16+) treats id 0 as no id.
        Ok((id != 0).then_some(id))
    }

    /// The expiration (utime) of the pair's entry, if there is one.
    fn auth(&self, local: u32, remote: u32, node: u16) -> std::io::Result<Option<u64>> {
        let mut key = [0u8; 12];
        key[0..4].copy_from_slice(&local.to_ne_bytes());
        key[4..8].copy_from_slice(&remote.to_ne_bytes());
        key[8..10].copy_from_slice(&node.to_ne_bytes());
        key[10] = AUTH_TYPE_SPIRE;
        let mut v = [0u8; 8];
        Ok(self
            .auth
            .lookup(&key, &mut v)?
            .then(|| u64::from_ne_bytes(v)))
    }
}

/// Cilium's utime (512 ns units since the Unix epoch) as RFC 3339.
fn utime_rfc3339(u: u64) -> String {
    let per_sec = 1_000_000_000u64 >> UTIME_SHIFT;
    let t =
        std::time::UNIX_EPOCH + Duration::new(u / per_sec, ((u % per_sec) << UTIME_SHIFT) as u32);
    rfc3339_nanos(t)
}

/// Answers given, by state, for metrics: once per flow event and
/// enforcing side under a rule that requires mutual authentication; and
/// what the last look at the maps found, for `flowaudit status`.
#[derive(Debug, Default)]
pub struct CiliumStats {
    /// Indexed like `MutualAuthState::ALL`.
    pub by_state: [std::sync::atomic::AtomicU64; 4],
    /// (maps found, where and which layout or why not); None until a flow
    /// first needs them.
    pub last_look: Mutex<Option<(bool, String)>>,
}

impl CiliumStats {
    fn count(&self, s: MutualAuthState) {
        let i = MutualAuthState::ALL
            .iter()
            .position(|x| *x == s)
            .unwrap_or(0);
        self.by_state[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Inner {
    maps: Option<Maps>,
    /// Why the maps are not open (for answers and logs).
    absent: String,
    next_try: Instant,
    /// Answers at CONNECT, by socket cookie and side, for the CLOSE.
    remembered: HashMap<(u64, bool), MutualAuth>,
}

/// This node's Cilium state, opened when it appears.
#[derive(Debug)]
pub struct Cilium {
    dir: PathBuf,
    inner: Mutex<Inner>,
    pub stats: std::sync::Arc<CiliumStats>,
}

impl Cilium {
    pub fn new(dir: PathBuf, stats: std::sync::Arc<CiliumStats>) -> Cilium {
        let c = Cilium {
            dir,
            inner: Mutex::new(Inner {
                maps: None,
                absent: String::new(),
                next_try: Instant::now(),
                remembered: HashMap::new(),
            }),
            stats,
        };
        // Opened on the first flow that needs it: a node whose policies
        // never require mutual authentication never looks.
        c
    }

    fn try_open(&self, inner: &mut Inner) {
        inner.next_try = Instant::now() + RETRY;
        match Maps::open(&self.dir) {
            Ok(m) => {
                if inner.maps.as_ref().map(|o| o.ipcache_layout) != Some(m.ipcache_layout) {
                    tracing::info!(
                        dir = %self.dir.display(),
                        ipcache = m.describe(),
                        "Cilium's maps found: mutual authentication is audited from its auth map"
                    );
                }
                self.report(
                    true,
                    format!("maps found in {} ({})", self.dir.display(), m.describe()),
                );
                inner.maps = Some(m);
                inner.absent.clear();
            }
            Err(e) => {
                let why = match &e {
                    CiliumError::Open { source, .. }
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        format!(
                            "{}; Cilium mutual authentication not observable here (no Cilium on this node, or its BPF filesystem is not mounted at {})",
                            e,
                            self.dir.display()
                        )
                    }
                    _ => format!("{e}; Cilium mutual authentication not observable here"),
                };
                if why != inner.absent {
                    tracing::warn!("{why}");
                }
                self.report(false, why.clone());
                inner.maps = None;
                inner.absent = why;
            }
        }
    }

    fn report(&self, found: bool, detail: String) {
        if let Ok(mut l) = self.stats.last_look.lock() {
            *l = Some((found, detail));
        }
    }

    /// A source for one flow, for the policy engine.
    pub fn for_flow<'a>(&'a self, flow: &'a FlowEvent) -> FlowAuth<'a> {
        FlowAuth { cilium: self, flow }
    }

    fn observe(&self, flow: &FlowEvent, side: AuthSide) -> MutualAuth {
        let Ok(mut inner) = self.inner.lock() else {
            return MutualAuth::not_observable(side, "internal error: Cilium state lock poisoned");
        };
        let remember_key = (flow.socket.cookie, side == AuthSide::Ingress);
        if flow.event != EventKind::Connect
            && let Some(m) = inner.remembered.remove(&remember_key)
        {
            self.stats.count(m.state);
            return m;
        }
        // Opened on first use, then again every RETRY: Cilium may start
        // after the agent, and re-creates its maps on upgrades (1.18 moved
        // the ipcache to cilium_ipcache_v2), leaving an open fd on the old.
        let first = inner.maps.is_none() && inner.absent.is_empty();
        if first || Instant::now() >= inner.next_try {
            self.try_open(&mut inner);
        }
        let answer = match &inner.maps {
            Some(maps) => lookup(maps, flow, side).unwrap_or_else(|e| {
                MutualAuth::not_observable(
                    side,
                    format!(
                        "reading Cilium's maps in {} failed: {e}",
                        self.dir.display()
                    ),
                )
            }),
            None => MutualAuth::not_observable(side, inner.absent.clone()),
        };
        if flow.event == EventKind::Connect {
            // CLOSEs that never came (lost, or the agent stopped watching)
            // must not pin memory: past the bound, start over; a CLOSE
            // without its CONNECT's answer looks up again as of its start.
            if inner.remembered.len() >= REMEMBERED {
                inner.remembered.clear();
            }
            inner.remembered.insert(remember_key, answer.clone());
        }
        drop(inner);
        self.stats.count(answer.state);
        answer
    }
}

/// The connection's start in Cilium's utime: a CONNECT's own time, a
/// CLOSE's time less its duration.
fn connected_at(flow: &FlowEvent) -> Option<u64> {
    let ns = u64::try_from(flow.time.secs()).ok()? * 1_000_000_000 + u64::from(flow.time.nanos());
    let ns = match flow.event {
        EventKind::Close => ns.saturating_sub(flow.duration_ms * 1_000_000),
        _ => ns,
    };
    Some(ns >> UTIME_SHIFT)
}

fn lookup(maps: &Maps, flow: &FlowEvent, side: AuthSide) -> std::io::Result<MutualAuth> {
    let (enforcer, enforcer_role, peer, peer_role) = match side {
        AuthSide::Ingress => (
            flow.l4.destination_ip,
            "destination",
            flow.l4.source_ip,
            "source",
        ),
        AuthSide::Egress => (
            flow.l4.source_ip,
            "source",
            flow.l4.destination_ip,
            "destination",
        ),
    };
    let not = |d: String| Ok(MutualAuth::not_observable(side, d));
    let Some(local) = maps.ipcache(enforcer)? else {
        return not(format!(
            "Cilium has no identity for the {enforcer_role} {enforcer}"
        ));
    };
    // Each node's Cilium enforces for its own endpoints, with its own auth
    // map: an enforcing end on another node (the ipcache names its node) is
    // that node's to report.
    if let Some(node) = local.tunnel_endpoint {
        return not(format!(
            "enforced by Cilium on the {enforcer_role}'s node ({}); the flowaudit agent there reports it",
            std::net::Ipv4Addr::from(node)
        ));
    }
    let Some(remote) = maps.ipcache(peer)? else {
        return not(format!("Cilium has no identity for the {peer_role} {peer}"));
    };
    let mut m = MutualAuth {
        state: MutualAuthState::Missing,
        enforced_on: side,
        local_identity: local.identity,
        remote_identity: remote.identity,
        remote_node_id: 0,
        expires: String::new(),
        path_encryption: PathEncryption::SameNode,
        detail: String::new(),
    };
    if let Some(node_ip) = remote.tunnel_endpoint {
        m.path_encryption = match remote.key {
            0 => PathEncryption::Unencrypted,
            _ => PathEncryption::Encrypted,
        };
        match maps.node_id(node_ip)? {
            Some(id) => m.remote_node_id = id,
            None => {
                m.detail = format!(
                    "Cilium has no node id for the {peer_role}'s node {}, so it drops the flow (DROP_NO_NODE_ID)",
                    std::net::Ipv4Addr::from(node_ip)
                );
                return Ok(m);
            }
        }
    }
    let encryption = match (m.path_encryption, remote.key) {
        (PathEncryption::Encrypted, WIREGUARD_KEY) => ", path encrypted by WireGuard",
        (PathEncryption::Encrypted, _) => ", path encrypted by IPsec",
        _ => "",
    };
    match maps.auth(local.identity, remote.identity, m.remote_node_id)? {
        None => {
            m.detail = format!("auth type spire{encryption}");
        }
        Some(expiration) => {
            m.expires = utime_rfc3339(expiration);
            let Some(at) = connected_at(flow) else {
                return not(format!("the flow's time {} is before 1970", flow.time));
            };
            m.state = if at < expiration {
                MutualAuthState::Authenticated
            } else {
                MutualAuthState::Expired
            };
            if !encryption.is_empty() {
                m.detail = encryption.trim_start_matches(", ").to_string();
            }
        }
    }
    Ok(m)
}

/// [`Cilium`] for one flow: what the policy engine asks when a rule requires
/// mutual authentication.
#[derive(Debug)]
pub struct FlowAuth<'a> {
    cilium: &'a Cilium,
    flow: &'a FlowEvent,
}

impl MutualAuthSource for FlowAuth<'_> {
    fn observe(&self, side: AuthSide) -> MutualAuth {
        self.cilium.observe(self.flow, side)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::hub::tests::sample_flow;

    #[test]
    fn utime_is_unix_time_in_512_ns_units() {
        // pkg/datapath/linux/utime: secs * 1953125 + nanos >> 9.
        let secs = 1_795_867_201u64; // 2026-11-28T12:00:01Z
        let u = secs * 1_953_125 + (123_456_789 >> 9);
        assert_eq!(utime_rfc3339(u), "2026-11-28T12:00:01.123456512Z");
        assert_eq!(utime_rfc3339(0), "1970-01-01T00:00:00.000000000Z");
    }

    #[test]
    fn a_close_is_judged_as_of_its_connect() {
        let mut f = sample_flow();
        f.time = "2026-11-28T12:00:01Z".into();
        f.event = EventKind::Connect;
        let at_connect = connected_at(&f).unwrap();
        assert_eq!(at_connect, 1_795_867_201 * 1_953_125);
        f.event = EventKind::Close;
        f.duration_ms = 1_000;
        f.time = "2026-11-28T12:00:02Z".into();
        assert_eq!(connected_at(&f), Some(at_connect));
        // Before 1970 (only a relay's peer could send one): no utime.
        f.time = crate::flow::FlowTime::new(-5, 0);
        assert_eq!(connected_at(&f), None);
    }

    #[test]
    fn without_maps_every_answer_is_not_observable_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("flowaudit-no-cilium-{}", std::process::id()));
        let stats = std::sync::Arc::new(CiliumStats::default());
        let c = Cilium::new(dir.clone(), stats.clone());
        let f = sample_flow();
        let m = c.for_flow(&f).observe(AuthSide::Ingress);
        assert_eq!(m.state, MutualAuthState::NotObservable);
        assert!(
            m.detail
                .contains(&dir.join("cilium_auth_map").display().to_string())
                && m.detail.contains("not observable here"),
            "{}",
            m.detail
        );
        assert_eq!(
            stats.by_state[3].load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn only_a_newer_map_that_is_not_pinned_falls_back_to_the_older_name() {
        use std::io::ErrorKind;
        let opener = |newer: Option<ErrorKind>| {
            move |name: &str| match (name, newer) {
                ("v2", Some(kind)) => Err(CiliumError::Open {
                    path: name.into(),
                    source: kind.into(),
                }),
                _ => Ok(name.to_owned()),
            }
        };
        let pick = |newer| newer_or_older(&opener(newer), "v2", "v1");
        assert_eq!(pick(None).unwrap(), ("v2".to_owned(), "v2"));
        assert_eq!(
            pick(Some(ErrorKind::NotFound)).unwrap(),
            ("v1".to_owned(), "v1")
        );
        match pick(Some(ErrorKind::PermissionDenied)) {
            Err(CiliumError::Open { path, source }) => {
                assert_eq!(path, Path::new("v2"));
                assert_eq!(source.kind(), ErrorKind::PermissionDenied);
            }
            other => panic!("a newer map that cannot be opened is that error, got {other:?}"),
        }
    }

    #[test]
    fn a_map_of_another_layout_is_named_with_its_sizes() {
        let e = CiliumError::Layout {
            path: "/sys/fs/bpf/tc/globals/cilium_auth_map".into(),
            key: 16,
            value: 8,
            expected: "key 12, value 8",
        };
        let text = e.to_string();
        assert!(
            text.contains("cilium_auth_map")
                && text.contains("key 16 bytes")
                && text.contains("key 12, value 8"),
            "{text}"
        );
    }
}
