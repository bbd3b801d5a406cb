//! Listening sockets that existed before the agent attached. The kernel
//! learns a listener's owner when listen() runs; servers that were already
//! listening (every pod on a node where the agent restarts) would otherwise
//! accept connections with no owner. At start-up this module finds them in
//! /proc (per network namespace: `net/tcp{,6}`, then the process holding the
//! socket inode), gets each namespace's cookie from SO_NETNS_COOKIE, and
//! writes the owners into the kernel's `LISTENERS` map.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use flowaudit_common::{AF_INET, AF_INET6, Listener, ListenerKey, Owner};

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
    unsafe { libc::close(fd) };
    result
}

/// Why the start-up scan cannot name the namespaces of listeners on this
/// kernel, if it cannot (no `SO_NETNS_COOKIE` before Linux 5.14).
pub fn scan_unavailable() -> Option<String> {
    own_netns_cookie().err().map(|e| {
        format!("getsockopt(SO_NETNS_COOKIE) fails on this kernel ({e}); it came in Linux 5.14")
    })
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
