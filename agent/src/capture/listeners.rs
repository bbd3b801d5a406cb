//! Listening sockets that existed before the agent attached. The kernel
//! learns a listener's owner when listen() runs; servers that were already
//! listening (every pod on a node where the agent restarts) would otherwise
//! accept connections with no owner. At start-up this module finds them and
//! the caller writes the owners into the kernel's `LISTENERS` map.
//!
//! The way that works with the DaemonSet's capabilities is the BPF iterator
//! `flowaudit_listeners` (`iter/task_file`): it walks every open file of
//! every process in the agent's pid namespace and reports the listening
//! TCP sockets with their namespace and owner ([`from_iterator`]). Without
//! kernel reads (a confidentiality lockdown) the fallback is /proc ([`scan`]:
//! per network namespace `net/tcp{,6}`, then the process holding the socket
//! inode, and each namespace's cookie from SO_NETNS_COOKIE), which needs
//! CAP_SYS_ADMIN (setns) and ptrace access to other processes' fd tables.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use flowaudit_common::{AF_INET, AF_INET6, Listener, ListenerKey, ListenerSeen, Owner, names};

/// A listening socket found in /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundListener {
    pub netns_inode: u64,
    pub family: u16,
    pub port: u16,
    pub socket_inode: u64,
}

/// Parses `/proc/<pid>/net/tcp` or `tcp6`: (local port, socket inode) of
/// every socket in state LISTEN (0A).
pub fn parse_proc_net_tcp(text: &str) -> Vec<(u16, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:tm retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "0A" {
                return None;
            }
            let port = u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()?;
            let inode = f[9].parse().ok()?;
            Some((port, inode))
        })
        .collect()
}

/// Start time of a process in nanoseconds since boot, from /proc/<pid>/stat
/// (field 22, in clock ticks): the same clock as the kernel's `start_boottime`.
pub fn process_start_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    // SAFETY: a libc call with no pointer arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * (1_000_000_000 / hz))
}

/// cgroup v2 id (directory inode) of a process.
pub fn process_cgroup_id(pid: u32, cgroup_root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    std::fs::metadata(cgroup_root.join(rel.trim_start_matches('/')))
        .ok()
        .map(|m| m.ino())
}

fn owner_of(pid: u32, cgroup_root: &Path) -> Owner {
    let mut comm = [0u8; 16];
    if let Ok(c) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        let c = c.trim_end().as_bytes();
        let n = c.len().min(15);
        comm[..n].copy_from_slice(&c[..n]);
    }
    Owner {
        tgid: pid,
        _pad: 0,
        start_boottime_ns: process_start_ns(pid).unwrap_or(0),
        cgroup_id: process_cgroup_id(pid, cgroup_root).unwrap_or(0),
        comm,
    }
}

/// The network namespace cookie of the namespace at `ns_path`, read from a
/// throw-away socket created inside it by a short-lived thread (setns only
/// moves that thread).
fn netns_cookie(ns_path: &Path) -> Option<u64> {
    let ns = std::fs::File::open(ns_path).ok()?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) on a descriptor we hold open; it changes only this thread's namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            own_netns_cookie().ok()
        })
        .join()
        .ok()
        .flatten()
    })
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`,
/// Linux 5.14+).
fn own_netns_cookie() -> std::io::Result<u64> {
    // SAFETY: plain-integer arguments; the descriptor, if any, is ours.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: `cookie` and `len` outlive the call and describe an 8-byte buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    let result = if rc == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    };
    // SAFETY: plain-integer arguments; the descriptor, if any, is ours.
    unsafe { libc::close(fd) };
    result
}

/// Why the /proc scan cannot see every listener here, if it cannot: it
/// joins each namespace (CAP_SYS_ADMIN) to read its cookie
/// (`SO_NETNS_COOKIE`, Linux 5.14+), and reads other processes' fd tables
/// (CAP_SYS_PTRACE).
pub fn proc_scan_unavailable(key: NetnsKey) -> Option<String> {
    let caps = effective_capabilities();
    let mut lacks = Vec::new();
    if caps & (1 << CAP_SYS_PTRACE) == 0 {
        lacks.push("needs CAP_SYS_PTRACE to read other processes' /proc/<pid>/fd".to_string());
    }
    if key == NetnsKey::Cookie {
        if caps & (1 << CAP_SYS_ADMIN) == 0 {
            lacks.push("needs CAP_SYS_ADMIN to join each network namespace".to_string());
        } else if let Err(e) = own_netns_cookie() {
            lacks.push(format!(
                "needs getsockopt(SO_NETNS_COOKIE), which fails on this kernel ({e}; it came in Linux 5.14)"
            ));
        }
    }
    (!lacks.is_empty()).then(|| lacks.join(", and "))
}

const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;

/// This process's effective capability set (`CapEff` in /proc/self/status).
fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// How the kernel programs name a network namespace in `ListenerKey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetnsKey {
    /// Its cookie (`bpf_get_netns_cookie`, `SO_NETNS_COOKIE`).
    Cookie,
    /// Its inode number (kernels whose `sock_ops` lacks the cookie helper).
    Inode,
}

/// Runs the listener iterator once and returns what it found, keyed the way
/// the programs key `LISTENERS` (`key`). The program must be in `ebpf`,
/// not yet loaded; it is loaded, run and unloaded here.
pub fn from_iterator(
    ebpf: &mut aya::Ebpf,
    key: NetnsKey,
    cgroup_root: &Path,
) -> Result<Recovered, String> {
    use std::io::Read as _;
    let btf = aya::Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
    let prog: &mut aya::programs::Iter = ebpf
        .program_mut(names::PROG_LISTENERS_ITER)
        .ok_or_else(|| format!("program {} missing", names::PROG_LISTENERS_ITER))?
        .try_into()
        .map_err(|e| format!("program {}: {e}", names::PROG_LISTENERS_ITER))?;
    prog.load("task_file", &btf)
        .map_err(|e| format!("loading the task_file iterator: {}", verifier_text(&e)))?;
    let link = prog
        .attach()
        .map_err(|e| format!("attaching the task_file iterator: {e}"))?;
    let link = prog
        .take_link(link)
        .map_err(|e| format!("task_file iterator link: {e}"))?;
    let mut file = link
        .into_file()
        .map_err(|e| format!("opening the task_file iterator: {e}"))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("reading the task_file iterator: {e}"))?;
    let _ = prog.unload();
    Ok(decode_seen(&bytes, key, cgroup_root))
}

fn verifier_text(e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(4).collect();
            format!(
                "{io_error}; verifier: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )
        }
        other => other.to_string(),
    }
}

/// What the start-up recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// `LISTENERS` entries to add.
    pub entries: Vec<(ListenerKey, Listener)>,
    /// Listening sockets left out because their namespace has no name the
    /// programs use (a cookie not assigned yet, before Linux 5.12): their
    /// accepted connections will have no owner.
    pub unnamed: usize,
}

/// Turns the iterator's records into `LISTENERS` entries. One socket may be
/// held by several processes (a forked server): the first one seen wins,
/// as in the /proc scan. A namespace the key cannot name (a cookie not yet
/// assigned) gives no entry rather than a wrong one, and is counted.
pub fn decode_seen(bytes: &[u8], key: NetnsKey, cgroup_root: &Path) -> Recovered {
    let size = std::mem::size_of::<ListenerSeen>();
    let mut seen_keys = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut unnamed = 0;
    for chunk in bytes.chunks_exact(size) {
        // SAFETY: ListenerSeen is plain old data (#[repr(C)], every bit
        // pattern valid) and the chunk holds exactly its size.
        let s: ListenerSeen = unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast()) };
        let netns_cookie = match key {
            NetnsKey::Cookie => s.netns_cookie,
            NetnsKey::Inode => u64::from(s.netns_inum),
        };
        if netns_cookie == 0 {
            unnamed += 1;
            continue;
        }
        let k = ListenerKey {
            netns_cookie,
            port: s.port,
            family: s.family,
            _pad: 0,
        };
        if !seen_keys.insert(k) {
            continue;
        }
        let mut owner = s.owner;
        if owner.cgroup_id == 0 && owner.tgid != 0 {
            owner.cgroup_id = process_cgroup_id(owner.tgid, cgroup_root).unwrap_or(0);
        }
        out.push((
            k,
            Listener {
                owner,
                sock_cookie: 0,
            },
        ));
    }
    Recovered {
        entries: out,
        unnamed,
    }
}

/// Finds every listening TCP socket on the node with its owning process.
pub fn scan(cgroup_root: &Path, netns_key: NetnsKey) -> Vec<(ListenerKey, Listener)> {
    // One /proc/<pid>/net view per network namespace.
    let mut namespaces: HashMap<u64, u32> = HashMap::new();
    let all = pids();
    for &pid in &all {
        if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
            namespaces.entry(m.ino()).or_insert(pid);
        }
    }
    let mut wanted: HashMap<u64, FoundListener> = HashMap::new();
    for (&netns_inode, &pid) in &namespaces {
        for (file, family) in [("tcp", AF_INET), ("tcp6", AF_INET6)] {
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
                continue;
            };
            for (port, socket_inode) in parse_proc_net_tcp(&text) {
                wanted.insert(
                    socket_inode,
                    FoundListener {
                        netns_inode,
                        family,
                        port,
                        socket_inode,
                    },
                );
            }
        }
    }
    if wanted.is_empty() {
        return Vec::new();
    }
    // Which process holds each listening socket.
    let mut holder: HashMap<u64, u32> = HashMap::new();
    for &pid in &all {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(ino) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if wanted.contains_key(&ino) {
                holder.entry(ino).or_insert(pid);
            }
        }
    }
    let mut cookies: HashMap<u64, Option<u64>> = HashMap::new();
    let mut out = Vec::new();
    for (ino, found) in &wanted {
        let Some(&pid) = holder.get(ino) else {
            continue;
        };
        let cookie = match netns_key {
            NetnsKey::Inode => Some(found.netns_inode),
            NetnsKey::Cookie => *cookies.entry(found.netns_inode).or_insert_with(|| {
                netns_cookie(Path::new(&format!(
                    "/proc/{}/ns/net",
                    namespaces[&found.netns_inode]
                )))
            }),
        };
        let Some(netns_cookie) = cookie else { continue };
        out.push((
            ListenerKey {
                netns_cookie,
                port: found.port,
                family: found.family,
                _pad: 0,
            },
            Listener {
                owner: owner_of(pid, cgroup_root),
                sock_cookie: 0,
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_sockets_only() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:9C4A 0100007F:1F40 01 00000000:00000000 00:00000000 00000000     0        0 23456 1 0000000000000000 20 4 30 10 -1\n\
   garbage line\n";
        assert_eq!(parse_proc_net_tcp(text), vec![(8000, 12345)]);
        let v6 = "header\n   0: 00000000000000000000000000000000:1538 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0 100 0 0 10 0\n";
        assert_eq!(parse_proc_net_tcp(v6), vec![(5432, 777)]);
    }

    fn seen(netns_cookie: u64, netns_inum: u32, port: u16, tgid: u32) -> ListenerSeen {
        ListenerSeen {
            owner: Owner {
                tgid,
                cgroup_id: 77,
                ..Owner::default()
            },
            netns_cookie,
            netns_inum,
            port,
            family: AF_INET,
        }
    }

    fn bytes(records: &[ListenerSeen]) -> Vec<u8> {
        records
            .iter()
            .flat_map(|r| {
                // SAFETY: ListenerSeen is #[repr(C)] plain old data.
                unsafe {
                    std::slice::from_raw_parts(
                        (r as *const ListenerSeen).cast::<u8>(),
                        std::mem::size_of::<ListenerSeen>(),
                    )
                }
                .to_vec()
            })
            .collect()
    }

    #[test]
    fn iterator_records_are_keyed_as_the_programs_key_listeners() {
        let records = [
            seen(4096, 4026531840, 8000, 12),
            // The same socket held by a forked child: the first holder wins.
            seen(4096, 4026531840, 8000, 13),
            // A namespace whose cookie is not assigned yet (before 5.12).
            seen(0, 4026532001, 5432, 14),
        ];
        let mut raw = bytes(&records);
        // A torn trailing record is ignored, not misread.
        raw.extend_from_slice(&[1, 2, 3]);
        let root = Path::new("/nonexistent");
        let recovered = decode_seen(&raw, NetnsKey::Cookie, root);
        assert_eq!(
            recovered.unnamed, 1,
            "the namespace without a cookie is counted"
        );
        let by_cookie = recovered.entries;
        assert_eq!(by_cookie.len(), 1, "{by_cookie:?}");
        assert_eq!(
            (by_cookie[0].0.netns_cookie, by_cookie[0].0.port),
            (4096, 8000)
        );
        assert_eq!(by_cookie[0].1.owner.tgid, 12);
        assert_eq!(by_cookie[0].1.owner.cgroup_id, 77);
        let recovered = decode_seen(&raw, NetnsKey::Inode, root);
        assert_eq!(recovered.unnamed, 0);
        let by_inode = recovered.entries;
        let keys: Vec<(u64, u16, u32)> = by_inode
            .iter()
            .map(|(k, v)| (k.netns_cookie, k.port, v.owner.tgid))
            .collect();
        assert_eq!(keys, vec![(4026531840, 8000, 12), (4026532001, 5432, 14)]);
    }

    #[test]
    fn own_process_facts_are_read_from_proc() {
        let me = std::process::id();
        let start = process_start_ns(me).expect("own start time");
        let uptime_ns = std::fs::read_to_string("/proc/uptime")
            .unwrap()
            .split('.')
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1_000_000_000;
        assert!(
            start > 0 && start <= uptime_ns + 1_000_000_000,
            "start {start} vs uptime {uptime_ns}"
        );
        let owner = owner_of(me, Path::new("/nonexistent"));
        assert_eq!(owner.tgid, me);
        assert!(owner.comm[0] != 0);
    }

    #[test]
    fn finds_a_listener_of_this_process_with_its_netns_cookie() {
        // SAFETY: a libc call with no pointer arguments.
        if unsafe { libc::geteuid() } != 0 {
            panic!(
                "this test reads other processes' /proc entries and joins network namespaces: run it as root"
            );
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let my_netns = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        for key in [NetnsKey::Cookie, NetnsKey::Inode] {
            let found = scan(Path::new("/sys/fs/cgroup"), key);
            let mine: Vec<_> = found
                .iter()
                .filter(|(k, _)| k.port == port && k.family == AF_INET)
                .collect();
            assert_eq!(mine.len(), 1, "{key:?}: {found:?}");
            assert_eq!(mine[0].1.owner.tgid, std::process::id());
            match key {
                NetnsKey::Cookie => assert_ne!(mine[0].0.netns_cookie, 0),
                // The inode, as the programs read it from `net->ns.inum`.
                NetnsKey::Inode => assert_eq!(mine[0].0.netns_cookie, my_netns),
            }
        }
    }
}
