//! A Cilium double: the pinned BPF maps Cilium's agent keeps for mutual
//! authentication, created in a simulated node's own BPF filesystem with
//! Cilium's exact names, types, flags and byte layouts, and filled by the
//! test. flowaudit reads them as it reads a real Cilium's: by pin path,
//! read-only.
//!
//! Derived from Cilium's source at two releases (the upstream "Prepare for
//! release" commits):
//! - v1.15.7 (de06bcfb, the reference log's release):
//!   - bpf/lib/common.h: `struct auth_key` {u32 local_sec_label, u32
//!     remote_sec_label, u16 remote_node_id, u8 auth_type, u8 pad} and
//!     `struct auth_info` {u64 expiration};
//!   - bpf/lib/maps.h: `AUTH_MAP` (hash, BPF_F_NO_PREALLOC, 524288 =
//!     `--bpf-auth-map-max`), `IPCACHE_MAP` (LPM trie, BPF_F_NO_PREALLOC,
//!     512000; `struct ipcache_key` {u32 prefixlen, u16 cluster_id, u8 pad1,
//!     u8 family, 16 address bytes}; `struct remote_endpoint_info` {u32
//!     sec_identity, u32 tunnel_endpoint, u16 pad, u8 key}, 12 bytes),
//!     `NODE_MAP` (hash, BPF_F_NO_PREALLOC, 16384; `struct node_key` {u16
//!     pad1, u8 pad2, u8 family, 16 address bytes}, value u16 node id);
//!   - pkg/maps/authmap/auth_map.go (`cilium_auth_map`),
//!     pkg/maps/ipcache (`cilium_ipcache`), pkg/maps/nodemap
//!     (`cilium_node_map`); pins under /sys/fs/bpf/tc/globals
//!     (pkg/defaults BPFFSRoot, TCGlobalsPath);
//!   - pkg/datapath/linux/utime: expiration in Unix time, 512 ns units;
//!   - pkg/policy/l4.go: AuthType disabled 0, spire 1, always-fail 2.
//! - v1.18.3 (c1601689): the same auth map (now declared in
//!   bpf/lib/auth.h), `cilium_ipcache_v2` (value {u32 sec_identity, 16-byte
//!   tunnel_endpoint, u16 pad, u8 key, u8 flags}, 24 bytes, flag 0x2 =
//!   has_tunnel_ep) and `cilium_node_map_v2` (value {u16 id, u8 spi, u8
//!   pad}).
//!
//! Odd corners kept: the local node has no node-map entry and is node 0 in
//! auth keys; a same-node peer's ipcache tunnel endpoint is zero
//! (pkg/datapath/ipcache/listener.go); WireGuard marks encrypted peers with
//! key 0xFF (pkg/wireguard/types), IPsec with its SPI.

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::simnode::SimNode;

/// The Cilium releases whose layouts the double reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    V1_15_7,
    V1_18_3,
}

/// `AuthType` values (pkg/policy/types/auth.go).
pub const AUTH_TYPE_SPIRE: u8 = 1;
pub const AUTH_TYPE_ALWAYS_FAIL: u8 = 2;
/// The ipcache `key` WireGuard uses (pkg/wireguard/types StaticEncryptKey).
pub const WIREGUARD_KEY: u8 = 0xFF;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
const BPF_F_NO_PREALLOC: u32 = 1;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<libc::c_long> {
    // SAFETY: a zeroed bpf_attr-sized buffer laid out for `cmd`, whose
    // pointers refer to memory alive for the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128u32) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn put(attr: &mut [u8; 128], off: usize, bytes: &[u8]) {
    attr[off..off + bytes.len()].copy_from_slice(bytes);
}

/// One map the double created and pinned.
#[derive(Debug)]
struct Map {
    fd: OwnedFd,
    pin: PathBuf,
}

impl Map {
    fn create(
        dir: &Path,
        name: &str,
        map_type: u32,
        key: u32,
        value: u32,
        max: u32,
    ) -> std::io::Result<Map> {
        let mut attr = [0u8; 128];
        put(&mut attr, 0, &map_type.to_ne_bytes());
        put(&mut attr, 4, &key.to_ne_bytes());
        put(&mut attr, 8, &value.to_ne_bytes());
        put(&mut attr, 12, &max.to_ne_bytes());
        put(&mut attr, 16, &BPF_F_NO_PREALLOC.to_ne_bytes());
        // map_name (16 bytes at 28): the kernel keeps 15 characters, as
        // Cilium's loader does for cilium_ipcache_v2.
        let short = &name.as_bytes()[..name.len().min(15)];
        put(&mut attr, 28, short);
        let fd = bpf(BPF_MAP_CREATE, &mut attr).map_err(|e| {
            std::io::Error::new(e.kind(), format!("creating {name} ({max} entries): {e}"))
        })?;
        // SAFETY: a new fd owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let pin = dir.join(name);
        let c = CString::new(pin.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let mut attr = [0u8; 128];
        put(&mut attr, 0, &(c.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 8, &(fd.as_raw_fd() as u32).to_ne_bytes());
        bpf(BPF_OBJ_PIN, &mut attr).map_err(|e| {
            std::io::Error::new(e.kind(), format!("pinning {}: {e}", pin.display()))
        })?;
        Ok(Map { fd, pin })
    }

    fn update(&self, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        let mut attr = [0u8; 128];
        put(&mut attr, 0, &(self.fd.as_raw_fd() as u32).to_ne_bytes());
        put(&mut attr, 8, &(key.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 16, &(value.as_ptr() as u64).to_ne_bytes());
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
    }

    fn delete(&self, key: &[u8]) -> std::io::Result<()> {
        let mut attr = [0u8; 128];
        put(&mut attr, 0, &(self.fd.as_raw_fd() as u32).to_ne_bytes());
        put(&mut attr, 8, &(key.as_ptr() as u64).to_ne_bytes());
        bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(drop)
    }
}

/// Cilium's mutual-authentication maps on one simulated node.
#[derive(Debug)]
pub struct CiliumDouble {
    release: Release,
    auth: Map,
    ipcache: Map,
    node: Map,
}

/// An auth map key (`struct auth_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthKey {
    pub local_identity: u32,
    pub remote_identity: u32,
    /// 0 for the local node.
    pub remote_node_id: u16,
    pub auth_type: u8,
}

impl AuthKey {
    fn bytes(&self) -> [u8; 12] {
        let mut k = [0u8; 12];
        k[0..4].copy_from_slice(&self.local_identity.to_ne_bytes());
        k[4..8].copy_from_slice(&self.remote_identity.to_ne_bytes());
        k[8..10].copy_from_slice(&self.remote_node_id.to_ne_bytes());
        k[10] = self.auth_type;
        k
    }
}

/// Unix time in Cilium's 512 ns units (utime.TimeToUTime).
pub fn utime(t: SystemTime) -> u64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    d.as_secs() * (1_000_000_000 >> 9) + u64::from(d.subsec_nanos() >> 9)
}

impl CiliumDouble {
    /// Creates and pins the maps of `release` in `node`'s BPF filesystem
    /// (/sys/fs/bpf/tc/globals inside the node), as Cilium's agent does at
    /// start. Pinned maps live until unpinned or the node goes.
    pub fn install(node: &SimNode, release: Release) -> std::io::Result<CiliumDouble> {
        // Cilium's agent lifts RLIMIT_MEMLOCK before it creates its maps
        // (pkg/rlimit RemoveMemlock): kernels before 5.11 charge a map's
        // whole size to it at creation, and these are sized as Cilium sizes
        // them (EPERM otherwise, seen on 5.10).
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: a valid rlimit for the calling process.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
            // Raising the hard limit needs CAP_SYS_RESOURCE, which root
            // lacks on some hosts (this one: memlock 8 MiB, no
            // CAP_SYS_RESOURCE). Kernels from 5.11 charge maps to the
            // memory cgroup, not to RLIMIT_MEMLOCK, so the limit does not
            // matter there; on older kernels the map creation below fails
            // with an error naming the map.
            let err = std::io::Error::last_os_error();
            eprintln!(
                "Cilium double: RLIMIT_MEMLOCK not lifted ({err}); raising it to its hard limit"
            );
            let mut now = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: both calls read or fill a local rlimit.
            unsafe {
                if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut now) == 0 {
                    now.rlim_cur = now.rlim_max;
                    libc::setrlimit(libc::RLIMIT_MEMLOCK, &now);
                }
            }
        }
        let dir = PathBuf::from(format!(
            "/proc/{}/root/sys/fs/bpf/tc/globals",
            node.init_pid()
        ));
        std::fs::create_dir_all(&dir)?;
        let (ipname, ipvalue, nodename, nodevalue) = match release {
            Release::V1_15_7 => ("cilium_ipcache", 12, "cilium_node_map", 2),
            Release::V1_18_3 => ("cilium_ipcache_v2", 24, "cilium_node_map_v2", 4),
        };
        Ok(CiliumDouble {
            release,
            auth: Map::create(&dir, "cilium_auth_map", BPF_MAP_TYPE_HASH, 12, 8, 524_288)?,
            ipcache: Map::create(&dir, ipname, BPF_MAP_TYPE_LPM_TRIE, 24, ipvalue, 512_000)?,
            node: Map::create(&dir, nodename, BPF_MAP_TYPE_HASH, 20, nodevalue, 16_384)?,
        })
    }

    /// Unpins every map, as uninstalling Cilium (or an upgrade that
    /// re-creates them) does.
    pub fn uninstall(self) -> std::io::Result<()> {
        for m in [&self.auth, &self.ipcache, &self.node] {
            std::fs::remove_file(&m.pin)?;
        }
        Ok(())
    }

    /// An ipcache entry for one address (/32 or /128): its security
    /// identity, the owning node's IP (None: this node) and the encryption
    /// key index (0 none, 0xFF WireGuard, 1..15 IPsec).
    pub fn set_identity(
        &self,
        ip: IpAddr,
        identity: u32,
        node: Option<Ipv4Addr>,
        key: u8,
    ) -> std::io::Result<()> {
        let mut k = [0u8; 24];
        let bits: u32 = match ip {
            IpAddr::V4(a) => {
                k[7] = 1;
                k[8..12].copy_from_slice(&a.octets());
                32
            }
            IpAddr::V6(a) => {
                k[7] = 2;
                k[8..24].copy_from_slice(&a.octets());
                128
            }
        };
        // prefixlen counts from cluster_id: IPCACHE_PREFIX_LEN(bits).
        k[0..4].copy_from_slice(&(32 + bits).to_ne_bytes());
        let tunnel = node.map_or([0; 4], |n| n.octets());
        let v: Vec<u8> = match self.release {
            Release::V1_15_7 => {
                let mut v = vec![0u8; 12];
                v[0..4].copy_from_slice(&identity.to_ne_bytes());
                v[4..8].copy_from_slice(&tunnel);
                v[10] = key;
                v
            }
            Release::V1_18_3 => {
                let mut v = vec![0u8; 24];
                v[0..4].copy_from_slice(&identity.to_ne_bytes());
                v[4..8].copy_from_slice(&tunnel);
                v[22] = key;
                if node.is_some() {
                    v[23] = 0x2; // flag_has_tunnel_ep
                }
                v
            }
        };
        self.ipcache.update(&k, &v)
    }

    /// A remote node's id in this node's numbering (never 0).
    pub fn set_node(&self, ip: Ipv4Addr, id: u16, ipsec_spi: u8) -> std::io::Result<()> {
        let mut k = [0u8; 20];
        k[3] = 1;
        k[4..8].copy_from_slice(&ip.octets());
        let v: Vec<u8> = match self.release {
            Release::V1_15_7 => id.to_ne_bytes().to_vec(),
            Release::V1_18_3 => {
                let mut v = vec![0u8; 4];
                v[0..2].copy_from_slice(&id.to_ne_bytes());
                v[2] = ipsec_spi;
                v
            }
        };
        self.node.update(&k, &v)
    }

    /// An auth entry, valid until `expires`, as Cilium's auth manager writes
    /// it after a successful handshake.
    pub fn authenticate(&self, key: AuthKey, expires: SystemTime) -> std::io::Result<()> {
        self.auth
            .update(&key.bytes(), &utime(expires).to_ne_bytes())
    }

    pub fn forget(&self, key: AuthKey) -> std::io::Result<()> {
        self.auth.delete(&key.bytes())
    }
}
