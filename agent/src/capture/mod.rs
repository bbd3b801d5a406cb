//! Kernel capture: loads the embedded eBPF object, hands it the struct
//! offsets of the running kernel, attaches the `sock_ops` program to the
//! cgroup v2 root, and turns ring-buffer records into `KernelRecord`s on a
//! channel. Records the kernel could not deliver are counted per place
//! (`LOST` per-CPU array) and read back here, never silently dropped.

pub mod btf;
pub mod features;
pub mod listeners;
pub mod reader;
pub mod record;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, SockOps,
};
use aya::{Ebpf, EbpfLoader};
use flowaudit_common::{LOSS_PLACES, Listener, ListenerKey, LossPlace, names};
use tokio::sync::mpsc;

use self::btf::{Btf, KernelOffsets};

use self::features::{Degradation, Features};
use self::record::KernelRecord;

/// The eBPF object built by build.rs from `agent-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flowaudit"));

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "flowaudit agent must run as root (effective uid is {0}): loading eBPF programs needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN; run it with sudo, or in the DaemonSet from deploy/"
    )]
    NotRoot(u32),
    #[error(
        "this kernel exposes no BTF ({0} is missing): flowaudit resolves kernel struct offsets from it; use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every mainstream distribution kernel since 5.4), or mount /sys/kernel/btf into the agent's container"
    )]
    NoBtf(PathBuf),
    #[error("could not parse the kernel BTF at {path}: {source}")]
    Btf {
        path: PathBuf,
        source: btf::BtfError,
    },
    #[error(
        "no cgroup v2 hierarchy is mounted (no `cgroup2` entry in /proc/self/mountinfo): mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`, or mount the host's into the agent's container"
    )]
    NoCgroup2,
    #[error("could not open the cgroup v2 root {path}: {source}")]
    CgroupOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the kernel rejected flowaudit's eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error(
        "the kernel rejected flowaudit's program {name} (even with every optional feature off: {features:?}): {source}"
    )]
    Program {
        name: &'static str,
        features: Features,
        source: aya::programs::ProgramError,
    },
    #[error("could not attach flowaudit's program {name} to the cgroup v2 root: {source}")]
    Attach {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("the eBPF object lacks {0}: the agent binary was built without its kernel programs")]
    Missing(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
}

/// Counters the capture stage keeps; read by status and metrics.
#[derive(Debug, Default)]
pub struct CaptureStats {
    /// Flow records (connect, close, failed) read from the ring buffer.
    pub records: AtomicU64,
    /// Payload records read from the ring buffer (first bytes of connections).
    pub payload_records: AtomicU64,
    /// Records that could not be decoded.
    pub malformed: AtomicU64,
    /// Times the ring reader stopped its timer to wait for the kernel
    /// (nothing came for a while).
    pub reader_sleeps: AtomicU64,
    /// Times a record's program woke the sleeping reader.
    pub reader_kernel_wakeups: AtomicU64,
    /// Per loss place, the kernel's count as last read.
    pub lost: [AtomicU64; LOSS_PLACES as usize],
    /// What this kernel does not give (fixed once the programs are loaded).
    pub degradations: Vec<Degradation>,
}

impl CaptureStats {
    /// Flow events never reported (ring buffer full, or a close the agent
    /// never saw open).
    pub fn events_lost(&self) -> u64 {
        LossPlace::ALL
            .iter()
            .filter(|p| p.loses_event())
            .map(|p| self.lost[*p as usize].load(Ordering::Relaxed))
            .sum()
    }

    /// Every place's count as last read.
    pub fn lost_by_place(&self) -> [u64; LOSS_PLACES as usize] {
        std::array::from_fn(|i| self.lost[i].load(Ordering::Relaxed))
    }
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on unified hosts (kind
/// nodes), `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_root() -> Result<PathBuf, CaptureError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    cgroup2_root_from(&mountinfo).ok_or(CaptureError::NoCgroup2)
}

fn cgroup2_root_from(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "... mount-point options - fstype source super-options"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// The attached programs. Dropping it (or [`Capture::detach`]) detaches them.
pub struct Capture {
    /// None once detached: the ring buffer and loss counters live on.
    ebpf: Option<Ebpf>,
    lost: PerCpuArray<MapData, u64>,
    pub stats: Arc<CaptureStats>,
    pub cgroup_root: PathBuf,
    pub offsets: KernelOffsets,
    /// The switches the programs run with.
    pub features: Features,
    /// Whether the payload programs (cgroup_skb) are attached; without
    /// them every CONNECT says its payload is `not_watched`.
    pub payload_capture: bool,
    ring: Option<RingBuf<MapData>>,
    /// The programs' `READER` slot (see `reader`).
    reader_slot: Option<Array<MapData, u32>>,
}

impl Capture {
    /// Checks prerequisites, loads and attaches, with a ring buffer of
    /// `ring_bytes` (a power of two, a multiple of the page size). Without
    /// `payload_capture` the cgroup_skb programs are loaded but never
    /// attached (what they cost the datapath is then zero), and `sock_ops`
    /// watches no socket's payload: every CONNECT says its payload is
    /// `not_watched`. Fails with the fix in the message.
    pub fn start(
        ring_bytes: u32,
        payload_sockets: u32,
        payload_capture: bool,
    ) -> Result<Self, CaptureError> {
        // SAFETY: a libc call with no pointer arguments.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(CaptureError::NotRoot(euid));
        }
        let btf_path = Path::new(Btf::SYS_FS_PATH);
        let btf_bytes =
            std::fs::read(btf_path).map_err(|_| CaptureError::NoBtf(btf_path.to_path_buf()))?;
        let btf = Btf::parse(&btf_bytes).map_err(|source| CaptureError::Btf {
            path: btf_path.to_path_buf(),
            source,
        })?;
        let (offsets, missing) = btf::resolve_offsets(&btf);
        for m in &missing {
            tracing::warn!(error = %m, "kernel struct offset not found; the field it feeds stays empty");
        }
        drop(btf);
        drop(btf_bytes);
        raise_memlock();

        let cgroup_root = cgroup2_root()?;
        let cgroup =
            std::fs::File::open(&cgroup_root).map_err(|source| CaptureError::CgroupOpen {
                path: cgroup_root.clone(),
                source,
            })?;

        let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").ok();
        let pidns_inum = agent_pid_namespace();
        let (mut features, mut reads_off) =
            features::initial(lockdown.as_deref().and_then(features::lockdown_mode));
        // Each failure the verifier explains with a helper this kernel lacks
        // turns that feature off; at most one retry per switch.
        let mut ebpf = loop {
            match load(
                &offsets,
                pidns_inum,
                features,
                (ring_bytes, payload_sockets),
                payload_capture,
            ) {
                Ok(ebpf) => break ebpf,
                Err(LoadFailure::Program { name, source }) => {
                    let text = source.to_string();
                    let Some((next, why)) = features::fall_back(features, &text) else {
                        return Err(CaptureError::Program {
                            name,
                            features,
                            source,
                        });
                    };
                    tracing::info!(program = name, %why, "retrying the load without that feature");
                    if next.kernel_reads != features.kernel_reads {
                        reads_off = Some(why);
                    }
                    features = next;
                }
                Err(LoadFailure::Other(e)) => return Err(e),
            }
        };
        let mut degradations = features::degradations(features, reads_off.as_deref());
        if pidns_inum != 0 && !(features.kernel_reads && offsets.pidns_ok == 1) {
            degradations.push(features::pid_namespace_degradation(
                features.kernel_reads,
                &missing_text(&missing),
            ));
        }
        // The listener entries must name namespaces as the programs do.
        let netns_key = if features.sock_ops_netns_cookie {
            listeners::NetnsKey::Cookie
        } else {
            listeners::NetnsKey::Inode
        };
        attach(&mut ebpf, &cgroup, payload_capture)?;

        // Servers that were listening before we attached: find them now that
        // listen() calls from here on are seen by the program. NOEXIST: an
        // entry the kernel just wrote is fresher than the scan.
        // Without any namespace name (the netns_cookie degradation) the
        // programs never look listeners up: nothing to register.
        let mut how = "iterator";
        let recovered = if features::netns_lost(features) {
            how = "none (no namespace names)";
            listeners::Recovered::default()
        } else {
            match recover_listeners(&mut ebpf, features, &offsets, netns_key, &cgroup_root) {
                Ok(found) => found,
                Err(why) => {
                    tracing::warn!(reason = %why, "the listener iterator could not run; scanning /proc instead");
                    if let Some(lack) = listeners::proc_scan_unavailable(netns_key) {
                        degradations.push(features::listener_scan_degradation(format!(
                            "{why}; the /proc fallback {lack}"
                        )));
                    }
                    how = "/proc scan";
                    listeners::Recovered {
                        entries: listeners::scan(&cgroup_root, netns_key),
                        unnamed: 0,
                    }
                }
            }
        };
        if recovered.unnamed > 0 {
            tracing::warn!(
                unnamed = recovered.unnamed,
                "listening sockets in network namespaces with no cookie yet (before Linux 5.12) were left out: connections they accept have no owner"
            );
        }
        let found = recovered.entries;
        let mut map: aya::maps::HashMap<_, ListenerKey, Listener> = aya::maps::HashMap::try_from(
            ebpf.map_mut(names::MAP_LISTENERS)
                .ok_or(CaptureError::Missing(names::MAP_LISTENERS))?,
        )
        .map_err(|source| CaptureError::Map {
            name: names::MAP_LISTENERS,
            source,
        })?;
        let mut added = 0;
        for (key, value) in &found {
            if map.insert(key, value, 1 /* BPF_NOEXIST */).is_ok() {
                added += 1;
            }
        }
        tracing::info!(
            found = found.len(),
            added,
            by = how,
            "listeners that predate the agent registered"
        );

        let ring = RingBuf::try_from(
            ebpf.take_map(names::MAP_EVENTS)
                .ok_or(CaptureError::Missing(names::MAP_EVENTS))?,
        )
        .map_err(|source| CaptureError::Map {
            name: names::MAP_EVENTS,
            source,
        })?;
        let reader_slot = ebpf
            .take_map(names::MAP_READER)
            .map(Array::try_from)
            .transpose()
            .map_err(|source| CaptureError::Map {
                name: names::MAP_READER,
                source,
            })?;
        let lost = PerCpuArray::try_from(
            ebpf.take_map(names::MAP_LOST)
                .ok_or(CaptureError::Missing(names::MAP_LOST))?,
        )
        .map_err(|source| CaptureError::Map {
            name: names::MAP_LOST,
            source,
        })?;
        Ok(Self {
            ebpf: Some(ebpf),
            lost,
            stats: Arc::new(CaptureStats {
                degradations,
                ..CaptureStats::default()
            }),
            cgroup_root,
            offsets,
            features,
            payload_capture,
            ring: Some(ring),
            reader_slot,
        })
    }

    /// Detaches every program; the ring buffer and loss counters stay
    /// readable. At shutdown this comes before the reader's final drain,
    /// so no record is written after it (and none is left unread).
    pub fn detach(&mut self) {
        self.ebpf = None;
    }

    /// Reads the kernel's per-CPU loss counters into `stats`; returns the
    /// places whose count grew since the last read, with the increase.
    pub fn poll_losses(&self) -> Vec<(LossPlace, u64)> {
        let mut grown = Vec::new();
        for place in LossPlace::ALL {
            let Ok(values) = self.lost.get(&(place as u32), 0) else {
                continue;
            };
            let total: u64 = values.iter().sum();
            let prev = self.stats.lost[place as usize].swap(total, Ordering::Relaxed);
            if total > prev {
                grown.push((place, total - prev));
            }
        }
        grown
    }

    /// The ring-buffer reader (`reader`), to run once (`Reader::run`): every
    /// poll it moves what the ring holds to `tx` (waiting when the pipeline
    /// is busy: the ring buffer holds the rest, and what it cannot hold is
    /// counted as lost by the kernel), until shutdown; then it drains what
    /// is left and returns. When nothing came for a while, it waits for the
    /// kernel to wake it instead of polling.
    pub fn reader(
        &mut self,
        tx: mpsc::Sender<Vec<KernelRecord>>,
    ) -> Result<reader::Reader, CaptureError> {
        let ring = self.ring.take().ok_or(CaptureError::Missing(
            "ring buffer (reader already started)",
        ))?;
        Ok(reader::Reader {
            ring,
            asleep: self.reader_slot.take(),
            tx,
            stats: self.stats.clone(),
        })
    }
}

/// Inode number of this process's pid namespace, 0 for the initial one
/// (whose pids the kernel reports as they are).
fn agent_pid_namespace() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    /// `PROC_PID_INIT_INO` (include/linux/proc_ns.h).
    const INITIAL: u64 = 0xEFFF_FFFC;
    match std::fs::metadata("/proc/self/ns/pid") {
        Ok(m) if m.ino() != INITIAL => m.ino() as u32,
        _ => 0,
    }
}

fn missing_text(missing: &[btf::BtfError]) -> String {
    missing
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Listeners that predate the agent, from the task_file iterator; the
/// error says why it could not run (the caller falls back to /proc).
fn recover_listeners(
    ebpf: &mut Ebpf,
    features: Features,
    offsets: &KernelOffsets,
    key: listeners::NetnsKey,
    cgroup_root: &Path,
) -> Result<listeners::Recovered, String> {
    if !features.kernel_reads {
        return Err("the listener iterator reads kernel memory, which this kernel forbids (see kernel_reads)".into());
    }
    if offsets.file_sock_ok != 1 || offsets.task_ok != 1 || offsets.net_ok != 1 {
        return Err("the kernel's BTF lacks struct members the listener iterator reads".into());
    }
    listeners::from_iterator(ebpf, key, cgroup_root)
}

enum LoadFailure {
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    Other(CaptureError),
}

/// Programs that see who owns a socket: (name, attach type).
const OWNER_PROGRAMS: [(&str, &str); 4] = [
    (names::PROG_CONNECT4, "connect4"),
    (names::PROG_CONNECT6, "connect6"),
    (names::PROG_POST_BIND4, "post_bind4"),
    (names::PROG_POST_BIND6, "post_bind6"),
];

/// Loads the object and every program into the kernel with these switches
/// (nothing attached yet, so a retry leaves no trace).
fn load(
    offsets: &KernelOffsets,
    pidns_inum: u32,
    f: Features,
    (ring_bytes, payload_sockets): (u32, u32),
    payload_capture: bool,
) -> Result<Ebpf, LoadFailure> {
    if EBPF_OBJECT.is_empty() {
        // agent/build.rs embeds nothing under `cargo fuzz`: never to be loaded.
        return Err(LoadFailure::Other(CaptureError::Missing(
            "every program (a `cargo fuzz` build)",
        )));
    }
    let kernel_reads = u32::from(f.kernel_reads);
    let netns_helper = u32::from(f.sock_ops_netns_cookie);
    let payload_capture = u32::from(payload_capture);
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(names::MAP_EVENTS, ring_bytes)
        .override_global(names::KERNEL_READS, &kernel_reads, true)
        .override_global(names::SOCK_OPS_NETNS_COOKIE, &netns_helper, true)
        .override_global(names::PAYLOAD_CAPTURE, &payload_capture, true)
        .override_global(names::PAYLOAD_SOCKETS, &payload_sockets, true)
        .override_global(names::OFFSETS, offsets, true)
        .override_global(names::PIDNS_INUM, &pidns_inum, true);
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .map_err(|e| LoadFailure::Other(CaptureError::Load(e)))?;
    let fail = |name| move |source| LoadFailure::Program { name, source };
    let missing = |name| LoadFailure::Other(CaptureError::Missing(name));
    let prog: &mut SockOps = ebpf
        .program_mut(names::PROG_SOCK_OPS)
        .ok_or(missing(names::PROG_SOCK_OPS))?
        .try_into()
        .map_err(fail(names::PROG_SOCK_OPS))?;
    prog.load().map_err(fail(names::PROG_SOCK_OPS))?;
    for name in [names::PROG_SKB_EGRESS, names::PROG_SKB_INGRESS] {
        let prog: &mut CgroupSkb = ebpf
            .program_mut(name)
            .ok_or(missing(name))?
            .try_into()
            .map_err(fail(name))?;
        prog.load().map_err(fail(name))?;
    }
    for (name, _) in OWNER_PROGRAMS {
        let prog = ebpf.program_mut(name).ok_or(missing(name))?;
        match prog {
            aya::programs::Program::CgroupSockAddr(p) => p.load(),
            aya::programs::Program::CgroupSock(p) => p.load(),
            _ => return Err(missing(name)),
        }
        .map_err(fail(name))?;
    }
    Ok(ebpf)
}

/// Attaches every program to the cgroup v2 root. On 5.7+ aya attaches
/// through a bpf_link, which always runs beside other programs on the
/// cgroup (Cilium's, another flowaudit's) and rejects explicit attach
/// flags: hence the default mode.
fn attach(
    ebpf: &mut Ebpf,
    cgroup: &std::fs::File,
    payload_capture: bool,
) -> Result<(), CaptureError> {
    let err = |name| move |source| CaptureError::Attach { name, source };
    let prog: &mut SockOps = ebpf
        .program_mut(names::PROG_SOCK_OPS)
        .ok_or(CaptureError::Missing(names::PROG_SOCK_OPS))?
        .try_into()
        .map_err(err(names::PROG_SOCK_OPS))?;
    prog.attach(cgroup, CgroupAttachMode::Single)
        .map_err(err(names::PROG_SOCK_OPS))?;
    // First payload bytes of each connection, both directions (mTLS).
    let skb = [
        (names::PROG_SKB_EGRESS, CgroupSkbAttachType::Egress),
        (names::PROG_SKB_INGRESS, CgroupSkbAttachType::Ingress),
    ];
    for (name, hook) in skb.into_iter().filter(|_| payload_capture) {
        let prog: &mut CgroupSkb = ebpf
            .program_mut(name)
            .ok_or(CaptureError::Missing(name))?
            .try_into()
            .map_err(err(name))?;
        prog.attach(cgroup, hook, CgroupAttachMode::Single)
            .map_err(err(name))?;
    }
    for (name, _) in OWNER_PROGRAMS {
        match ebpf.program_mut(name).ok_or(CaptureError::Missing(name))? {
            aya::programs::Program::CgroupSockAddr(p) => {
                let p: &mut CgroupSockAddr = p;
                p.attach(cgroup, CgroupAttachMode::Single).map(drop)
            }
            aya::programs::Program::CgroupSock(p) => {
                let p: &mut CgroupSock = p;
                p.attach(cgroup, CgroupAttachMode::Single).map(drop)
            }
            _ => return Err(CaptureError::Missing(name)),
        }
        .map_err(err(name))?;
    }
    Ok(())
}

/// Records handed to the pipeline at once at most: one channel message and
/// at most one wake-up per batch, instead of one per record.
pub const READ_BATCH: usize = 256;

/// Batches queued between the ring reader and the pipeline at most (16 Ki
/// records): beyond that a burst waits in the kernel ring, where what does
/// not fit is counted as lost.
pub const READ_QUEUE: usize = 64;

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK. Ask for no limit
/// (CAP_SYS_RESOURCE may raise the hard limit); without that capability,
/// raise the soft limit to the hard one, which needs no privilege.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit/getrlimit read or fill a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        return;
    }
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: every pointer is to a local of the right type, valid for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut now) } == 0 {
        now.rlim_cur = now.rlim_max;
        // SAFETY: every pointer is to a local of the right type, valid for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &now) } != 0 {
            tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
        } else {
            tracing::debug!(
                limit = now.rlim_max,
                "RLIMIT_MEMLOCK raised to its hard limit; kernels >= 5.11 do not use it for BPF"
            );
        }
    }
}

/// Converts CLOCK_MONOTONIC nanoseconds (the kernel's timestamps) to wall time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// realtime - monotonic, in nanoseconds.
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Self {
        let mono = monotonic_ns() as i128;
        let real = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        Self {
            offset_ns: real - mono,
        }
    }

    /// The wall-clock time of a kernel timestamp (CLOCK_MONOTONIC
    /// nanoseconds); one before the epoch is the epoch. Plain integer
    /// arithmetic: every flow's time is made here.
    pub fn flow_time(&self, mono_ns: u64) -> crate::flow::FlowTime {
        let ns = (i128::from(mono_ns) + self.offset_ns).clamp(0, i128::from(u64::MAX)) as u64;
        crate::flow::FlowTime::new((ns / 1_000_000_000) as i64, (ns % 1_000_000_000) as u32)
    }
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: every pointer is to a local of the right type, valid for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod stack;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw\n\
                      27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_root_from(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_root_from(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_root_from("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
        assert_eq!(cgroup2_root_from("garbage"), None);
    }

    #[test]
    fn clock_maps_monotonic_now_to_wall_now() {
        let clock = Clock::now();
        let t = clock.flow_time(monotonic_ns());
        let now = crate::flow::FlowTime::now();
        let diff = (i128::from(now.secs()) * 1_000_000_000 + i128::from(now.nanos()))
            - (i128::from(t.secs()) * 1_000_000_000 + i128::from(t.nanos()));
        // The offset comes from two clocks read one after the other: off
        // by a little either way.
        assert!(
            diff.abs() < 1_000_000_000,
            "{t:?} is {diff} ns before {now:?}"
        );
        // Before the epoch is the epoch.
        let early = Clock {
            offset_ns: -1_000_000_000_000,
        };
        assert_eq!(early.flow_time(5), crate::flow::FlowTime::new(0, 0));
    }
}
