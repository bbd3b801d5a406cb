//! From a socket owner's cgroup id (what the kernel records) to its pod UID,
//! the way the kubelet lays cgroups out: cgroupfs
//! (`.../kubepods/besteffort/pod<uid>/<container>`) or systemd
//! (`.../kubepods-besteffort-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`).
//! The cgroup v2 tree is scanned once and again on a miss (rate limited), so
//! a pod created after the last scan is found on its first flow.

use crate::capture::record::CookieMap;
use crate::flow::ArcStr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The pod UID in a cgroup path, if the path is inside a pod.
pub fn pod_uid_from_path(path: &str) -> Option<String> {
    for comp in path.split('/').rev() {
        // systemd driver: kubepods-burstable-pod1234_5678.slice
        if let Some(rest) = comp.strip_suffix(".slice")
            && let Some(idx) = rest.rfind("-pod")
            && looks_like_uid(&rest[idx + 4..])
        {
            return Some(rest[idx + 4..].replace('_', "-"));
        }
        // cgroupfs driver: pod1234-5678
        if let Some(uid) = comp.strip_prefix("pod")
            && looks_like_uid(uid)
        {
            return Some(uid.to_owned());
        }
    }
    None
}

fn looks_like_uid(s: &str) -> bool {
    s.len() >= 32
        && s.chars()
            .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
}

/// Cache of cgroup id -> pod UID (None: a cgroup outside any pod). Keyed
/// by the kernel's cgroup ids (see `CookieMap`); the UIDs are shared, not
/// copied, per flow.
pub struct CgroupResolver {
    root: PathBuf,
    cache: CookieMap<Option<ArcStr>>,
    last_scan: Option<Instant>,
    min_rescan: Duration,
    /// Scans so far: what was read from `cache` may differ after one.
    scans: u64,
}

impl CgroupResolver {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            cache: CookieMap::default(),
            last_scan: None,
            min_rescan: Duration::from_millis(250),
            scans: 0,
        }
    }

    /// The pod UID of the cgroup with this id, scanning the tree on a miss.
    pub fn pod_uid(&mut self, cgroup_id: u64) -> Option<ArcStr> {
        if let Some(hit) = self.cache.get(&cgroup_id) {
            return hit.clone();
        }
        if self
            .last_scan
            .is_none_or(|t| t.elapsed() >= self.min_rescan)
        {
            self.scan();
        }
        self.cache.get(&cgroup_id).cloned().flatten()
    }

    /// Whether the cgroup with this id was found in the last scan (inside a
    /// pod or not): `pod_uid` answers it without scanning.
    pub fn knows(&self, cgroup_id: u64) -> bool {
        self.cache.contains_key(&cgroup_id)
    }

    /// Changes with every scan of the tree (see `knows`).
    pub fn scans(&self) -> u64 {
        self.scans
    }

    fn scan(&mut self) {
        self.last_scan = Some(Instant::now());
        self.scans += 1;
        let mut fresh =
            CookieMap::with_capacity_and_hasher(self.cache.len().max(64), Default::default());
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(ft) = e.file_type() else { continue };
                if !ft.is_dir() {
                    continue;
                }
                let path = e.path();
                if let Ok(m) = e.metadata() {
                    let rel = path.strip_prefix(&self.root).unwrap_or(&path);
                    fresh.insert(
                        m.ino(),
                        pod_uid_from_path(&rel.to_string_lossy()).map(ArcStr::from),
                    );
                }
                stack.push(path);
            }
        }
        if let Ok(m) = std::fs::metadata(&self.root) {
            fresh.insert(m.ino(), None);
        }
        self.cache = fresh;
    }

    /// Scans at most once per `every` on a miss (250 ms by default).
    #[cfg(test)]
    pub(crate) fn rescan_at_most_every(&mut self, every: Duration) {
        self.min_rescan = every;
    }

    #[cfg(test)]
    fn root(&self) -> &std::path::Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_pod_uids_in_both_kubelet_layouts() {
        let uid = "3f1c2a9e-5b7d-4c1e-9a0b-2d6f8e4c1a77";
        assert_eq!(
            pod_uid_from_path(&format!("/kubepods/besteffort/pod{uid}/0123456789abcdef")),
            Some(uid.to_owned())
        );
        assert_eq!(
            pod_uid_from_path(&format!("/kubepods/pod{uid}/abc")),
            Some(uid.to_owned())
        );
        assert_eq!(
            pod_uid_from_path(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-ab12.scope",
                uid.replace('-', "_")
            )),
            Some(uid.to_owned())
        );
        assert_eq!(pod_uid_from_path("/system.slice/sshd.service"), None);
        assert_eq!(pod_uid_from_path("/kubepods/besteffort"), None);
        assert_eq!(pod_uid_from_path("/user.slice/podman-123.scope"), None);
    }

    #[test]
    fn resolves_a_cgroup_created_after_the_first_scan() {
        let base = flowaudit_tests::support::TestDir::new("fa-cg");
        let uid = "11111111-2222-3333-4444-555555555555";
        let mut r = CgroupResolver::new(base.to_path_buf());
        r.min_rescan = Duration::ZERO;
        assert_eq!(r.pod_uid(1), None);
        let dir = base.join(format!("kubepods/besteffort/pod{uid}/abcdef"));
        std::fs::create_dir_all(&dir).unwrap();
        let ino = std::fs::metadata(&dir).unwrap().ino();
        assert_eq!(r.pod_uid(ino).as_deref(), Some(uid));
        assert_eq!(r.root(), base.path());
    }
}
