//! cgroup v2 directories for the simulated node: finding the v2 mount,
//! creating the kubelet-style tree, killing what runs in a subtree, and
//! removing it once empty.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::SimError;

/// The cgroup2 mount point from /proc/self/mountinfo: /sys/fs/cgroup on a
/// unified host (kind nodes), /sys/fs/cgroup/unified on a hybrid one (here).
pub fn cgroup2_mount() -> Result<PathBuf, SimError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| SimError::Io {
        what: "read /proc/self/mountinfo".into(),
        source: e,
    })?;
    parse_cgroup2_mount(&info).ok_or(SimError::NoCgroup2)
}

fn parse_cgroup2_mount(info: &str) -> Option<PathBuf> {
    info.lines().find_map(|line| {
        // Fields after the " - " separator: fstype, source, super options.
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace()
            .nth(4)
            .map(|mp| PathBuf::from(unescape_mount(mp)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as \ooo octal.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn create_all(p: &Path) -> Result<(), SimError> {
    std::fs::create_dir_all(p).map_err(|e| SimError::Io {
        what: format!("create cgroup {}", p.display()),
        source: e,
    })
}

/// Inode of a cgroup directory: the cgroup id `bpf_get_current_cgroup_id`
/// returns for a task in it.
pub(crate) fn id(p: &Path) -> Result<u64, SimError> {
    std::fs::metadata(p)
        .map(|m| m.ino())
        .map_err(|e| SimError::Io {
            what: format!("stat cgroup {}", p.display()),
            source: e,
        })
}

/// Pids in this cgroup and every cgroup below it.
pub(crate) fn pids_recursive(p: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    if let Ok(s) = std::fs::read_to_string(p.join("cgroup.procs")) {
        pids.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                pids.extend(pids_recursive(&e.path()));
            }
        }
    }
    pids
}

/// SIGKILLs everything in the subtree and waits until it is gone.
/// `cgroup.kill` (5.14+) is atomic against forks; older kernels get a
/// kill-and-recheck loop over cgroup.procs.
pub(crate) fn kill_all(p: &Path, timeout: Duration) -> Result<(), SimError> {
    if !p.exists() {
        return Ok(());
    }
    let kill_file = p.join("cgroup.kill");
    let use_kill_file = kill_file.exists();
    let deadline = Instant::now() + timeout;
    loop {
        let pids = pids_recursive(p);
        if pids.is_empty() {
            return Ok(());
        }
        if use_kill_file {
            std::fs::write(&kill_file, "1").map_err(|e| SimError::Io {
                what: format!("write 1 to {}", kill_file.display()),
                source: e,
            })?;
        } else {
            for pid in &pids {
                // SAFETY: plain kill(2); a pid that already exited gives ESRCH.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
        }
        if Instant::now() > deadline {
            return Err(SimError::Other(format!(
                "processes {pids:?} still in cgroup {} after SIGKILL for {timeout:?}",
                p.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes the subtree bottom-up. rmdir can briefly fail with EBUSY after the
/// last task exited (the kernel unlinks dying tasks asynchronously): retry.
pub(crate) fn remove_tree(p: &Path, timeout: Duration) -> Result<(), SimError> {
    if !p.exists() {
        return Ok(());
    }
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path(), timeout)?;
            }
        }
    }
    let deadline = Instant::now() + timeout;
    loop {
        match std::fs::remove_dir(p) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(SimError::Io {
                    what: format!("rmdir cgroup {}", p.display()),
                    source: e,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                      40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/sda rw\n"),
            None
        );
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
    }
}
