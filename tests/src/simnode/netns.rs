//! Named network namespaces (`/run/netns/<name>`, as `ip netns` keeps them):
//! create, delete, inspect, and run code or a child process inside one.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;

use super::SimError;
use super::cmd::ip;

/// Where iproute2 bind-mounts named namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// The first `ip netns add` in a boot makes /run/netns a shared mount; two
/// racing first calls can stack mounts. Serialise within this process.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

pub(crate) fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

pub(crate) fn add(name: &str) -> Result<(), SimError> {
    let _g = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    ip(&["netns", "add", name]).map(|_| ())
}

/// Deletes the name; the namespace itself dies once no process or open fd
/// holds it (the pods' processes are killed before this is called).
pub(crate) fn del(name: &str) -> Result<(), SimError> {
    let _g = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if !path(name).exists() {
        return Ok(());
    }
    ip(&["netns", "del", name]).map(|_| ())
}

/// Inode of the namespace: the same number `/proc/<pid>/ns/net` shows for a
/// process inside it (what the agent may report as the netns).
pub(crate) fn inode(name: &str) -> Result<u64, SimError> {
    let p = path(name);
    std::fs::metadata(&p)
        .map(|m| m.ino())
        .map_err(|e| SimError::Io {
            what: format!("stat netns {}", p.display()),
            source: e,
        })
}

/// Every name in /run/netns (empty if the directory does not exist yet).
pub(crate) fn list() -> Result<Vec<String>, SimError> {
    let rd = match std::fs::read_dir(NETNS_DIR) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(SimError::Io {
                what: format!("list {NETNS_DIR}"),
                source: e,
            });
        }
    };
    Ok(rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect())
}

/// Opens the namespace file (close-on-exec), for `setns`.
pub(crate) fn open(name: &str) -> Result<File, SimError> {
    let p = path(name);
    File::open(&p).map_err(|e| SimError::Io {
        what: format!(
            "open netns {} (was the node or pod already cleaned up?)",
            p.display()
        ),
        source: e,
    })
}

/// Runs `f` on a fresh thread that has joined the namespace. `setns` of a
/// network namespace is per thread, so the caller's thread is left alone.
pub(crate) fn run_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T, SimError> + Send + 'static,
) -> Result<T, SimError> {
    let file = open(name)?;
    let name = name.to_string();
    std::thread::spawn(move || {
        // SAFETY: setns on a valid, open nsfs fd; affects this thread only.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(SimError::Io {
                what: format!("setns into netns {name}"),
                source: std::io::Error::last_os_error(),
            });
        }
        f()
    })
    .join()
    .map_err(|_| SimError::Other("thread running inside a netns panicked".into()))?
}

/// Writes a sysctl under /proc/sys of the calling thread's namespace.
pub(crate) fn write_sysctl(key: &str, value: &str) -> Result<(), SimError> {
    let p = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&p, value).map_err(|e| SimError::Io {
        what: format!("write {value} to {p}"),
        source: e,
    })
}
