//! node-exec: the tiny container runtime of the simulated node. With
//! `--new-node NAME` it becomes a node: it joins the node's cgroup, unshares
//! pid, mount, UTS and cgroup namespaces and forks the node's init (pid 1),
//! which mounts a fresh /proc and cgroup2 on /sys/fs/cgroup, sets the
//! hostname and reaps orphans; the init's host pid is printed on stdout once
//! it is ready. With `--node-pid PID` it runs a command in that node: it joins
//! a cgroup, enters the init's namespaces (or another netns), optionally makes
//! the root read-only, forks, and the child drops capabilities the way a
//! container runtime does for uid 0 before it execs. In both modes this
//! process stays as the parent: it forwards termination signals to the child,
//! waits, and exits as the child did (same code, or the same signal).
//! Exit code 125 means node-exec itself failed (message on stderr).

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "node-exec",
    about = "Run a command inside a simulated node (or become a new node's init)"
)]
struct Cli {
    /// Host pid of the node's init: enter its pid, mount, UTS, cgroup and
    /// network namespaces.
    #[arg(
        long,
        required_unless_present = "new_node",
        conflicts_with = "new_node"
    )]
    node_pid: Option<i32>,
    /// Become a new node named NAME (its hostname): print the init's host
    /// pid on stdout when ready, then wait for the init.
    #[arg(long, value_name = "NAME")]
    new_node: Option<String>,
    /// With --new-node: the cgroup leaf the init moves to after unsharing
    /// the cgroup namespace at --cgroup (e.g. <node>/init.scope).
    #[arg(long, requires = "new_node", value_name = "HOSTDIR")]
    init_cgroup: Option<PathBuf>,
    /// Network namespace to enter instead of the init's (a /run/netns path).
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// cgroup v2 directory (host path) to join before entering the node.
    #[arg(long, value_name = "HOSTDIR")]
    cgroup: Option<PathBuf>,
    /// Capabilities the command keeps: `all`, or NAME,NAME (BPF, CAP_BPF).
    #[arg(long, default_value = "all")]
    caps: String,
    /// Set no_new_privs (allowPrivilegeEscalation: false).
    #[arg(long)]
    no_new_privs: bool,
    /// Make / read-only in a mount namespace of the command's own.
    #[arg(long)]
    ro_root: bool,
    /// With --ro-root: a directory that stays writable (repeatable).
    #[arg(long = "rw", value_name = "DIR", requires = "ro_root")]
    rw: Vec<PathBuf>,
    /// With --ro-root: a mount point that is made read-only as well
    /// (a hostPath volume with readOnly: true); repeatable.
    #[arg(long = "ro", value_name = "DIR", requires = "ro_root")]
    ro: Vec<PathBuf>,
    /// RLIMIT_MEMLOCK infinity, as containerd runs containers.
    #[arg(long)]
    memlock_unlimited: bool,
    /// The command and its arguments (after `--`).
    #[arg(last = true)]
    cmd: Vec<OsString>,
}

/// Signals passed on to the child, as a container runtime's shim does.
const FORWARDED: [i32; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

const FAILED: i32 = 125;

fn main() {
    let cli = Cli::parse();
    let r = if let Some(name) = &cli.new_node {
        new_node(&cli, name)
    } else {
        exec_in_node(&cli)
    };
    if let Err(e) = r {
        eprintln!("node-exec: {e}");
        std::process::exit(FAILED);
    }
}

type Res<T> = Result<T, String>;

fn os_err(what: impl std::fmt::Display) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn check(rc: libc::c_int, what: impl std::fmt::Display) -> Res<()> {
    if rc < 0 { Err(os_err(what)) } else { Ok(()) }
}

fn join_cgroup(dir: &Path) -> Res<()> {
    let procs = dir.join("cgroup.procs");
    // "0" means the writing process itself.
    std::fs::write(&procs, "0").map_err(|e| format!("join cgroup {}: {e}", procs.display()))
}

fn open_ns(path: &Path) -> Res<File> {
    File::open(path).map_err(|e| format!("open namespace {}: {e}", path.display()))
}

fn setns(f: &File, kind: libc::c_int, what: &str) -> Res<()> {
    check(
        // SAFETY: setns on an open nsfs fd.
        unsafe { libc::setns(f.as_raw_fd(), kind) },
        format!("setns {what}"),
    )
}

fn mount(src: Option<&str>, target: &str, fstype: Option<&str>, flags: libc::c_ulong) -> Res<()> {
    let c = |s: &str| CString::new(s).expect("mount arguments have no NUL");
    let (src_c, target_c, fstype_c) = (src.map(c), c(target), fstype.map(c));
    // SAFETY: valid C strings or NULL; no data argument.
    let rc = unsafe {
        libc::mount(
            src_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            fstype_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            std::ptr::null(),
        )
    };
    check(
        rc,
        format!("mount {src:?} on {target} (type {fstype:?}, flags {flags:#x})"),
    )
}

fn pipe() -> Res<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    check(
        // SAFETY: fds has room for two descriptors.
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
        "pipe2",
    )?;
    // SAFETY: both are fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset on valid numbers.
    unsafe {
        let mut set = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

/// Blocks the forwarded signals and SIGCHLD (so the parent can sigwait them
/// and none is lost before the loop); returns the mask to restore in the child.
fn block_signals() -> Res<libc::sigset_t> {
    let mut all: Vec<i32> = FORWARDED.to_vec();
    all.push(libc::SIGCHLD);
    let set = sigset(&all);
    // SAFETY: a zeroed sigset_t is a valid out-parameter.
    let mut old = unsafe { std::mem::zeroed() };
    // SAFETY: single-threaded; valid sets.
    check(
        // SAFETY: every pointer is to a local of the right type, valid for the call.
        unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old) },
        "sigprocmask",
    )?;
    Ok(old)
}

fn fork() -> Res<libc::pid_t> {
    // SAFETY: node-exec is single-threaded, so the child may do anything.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os_err("fork"));
    }
    Ok(pid)
}

/// In the parent: forwards signals to `child` until it exits, then exits
/// the same way (code, or by re-raising its signal).
fn forward_and_wait(child: libc::pid_t) -> ! {
    let mut all: Vec<i32> = FORWARDED.to_vec();
    all.push(libc::SIGCHLD);
    let set = sigset(&all);
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if r == child {
            exit_like(status);
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            eprintln!("node-exec: {}", os_err("waitpid"));
            std::process::exit(FAILED);
        }
        // SAFETY: valid set; the signals are blocked, so they queue for us.
        let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if sig > 0 && sig != libc::SIGCHLD {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(child, sig) };
        }
    }
}

fn exit_like(status: libc::c_int) -> ! {
    if libc::WIFEXITED(status) {
        std::process::exit(libc::WEXITSTATUS(status));
    }
    let sig = libc::WTERMSIG(status);
    // SAFETY: restore the default action, no core file, unblock, re-raise.
    unsafe {
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::signal(sig, libc::SIG_DFL);
        let set = sigset(&[sig]);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig);
    }
    std::process::exit(128 + sig);
}

fn new_node(cli: &Cli, name: &str) -> Res<()> {
    let cgroup = cli
        .cgroup
        .as_ref()
        .ok_or("--new-node needs --cgroup (the node's cgroup)")?;
    let init_cgroup = cli
        .init_cgroup
        .as_ref()
        .ok_or("--new-node needs --init-cgroup (a leaf below --cgroup)")?;
    join_cgroup(cgroup)?;
    if let Some(p) = &cli.netns {
        setns(&open_ns(p)?, libc::CLONE_NEWNET, "net")?;
    }
    // The cgroup namespace's root is our cgroup at this moment: the node's.
    check(
        // SAFETY: plain unshare; single-threaded.
        unsafe {
            libc::unshare(
                libc::CLONE_NEWCGROUP | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWPID,
            )
        },
        "unshare pid, mount, uts, cgroup namespaces",
    )?;
    // A leaf, so the node's root cgroup holds no process (as on a real node).
    join_cgroup(init_cgroup)?;
    let (ready_r, ready_w) = pipe()?;
    block_signals()?;
    let pid = fork()?;
    if pid == 0 {
        drop(ready_r);
        // SAFETY: the init dies with this parent (the test's handle on it).
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        if let Err(e) = setup_node(name) {
            eprintln!("node-exec: node init: {e}");
            // SAFETY: plain _exit in a forked child.
            unsafe { libc::_exit(FAILED) };
        }
        let mut w = File::from(ready_w);
        let _ = w.write_all(b"ready\n");
        drop(w);
        init_loop();
    }
    drop(ready_w);
    let mut buf = String::new();
    let _ = std::io::Read::read_to_string(&mut File::from(ready_r), &mut buf);
    if buf.trim() == "ready" {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{pid}");
        let _ = out.flush();
    }
    forward_and_wait(pid)
}

/// In the init (pid 1 of the new pid namespace, in the new mount namespace).
fn setup_node(name: &str) -> Res<()> {
    // Nothing mounted here propagates back to the host; host mounts (new
    // /run/netns entries) still reach the node.
    mount(None, "/", None, libc::MS_REC | libc::MS_SLAVE)?;
    let hard = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(Some("proc"), "/proc", Some("proc"), hard)?;
    // A kind node's /run is a tmpfs of its own: what the node's daemons put
    // there (the SPIRE agent's admin socket directory, a DaemonSet's
    // DirectoryOrCreate hostPath) is the node's, not the machine's. Paths are
    // opened by node-exec before it enters the node, so /run/netns is not
    // needed in here.
    mount(
        Some("tmpfs"),
        "/run",
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
    )?;
    // The host's cgroup mounts (here a hybrid tmpfs with v1 hierarchies and
    // v2 at /sys/fs/cgroup/unified) go: a kind node has exactly one cgroup2
    // mount, at /sys/fs/cgroup. Detached in this mount namespace only.
    let target = CString::new("/sys/fs/cgroup").expect("no NUL");
    // SAFETY: a valid path; EINVAL (not a mount point) is fine.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    // Inside the cgroup namespace this shows the node's subtree as the root.
    mount(Some("cgroup2"), "/sys/fs/cgroup", Some("cgroup2"), hard)?;
    // A BPF filesystem of the node's own, as a kind node with Cilium has
    // (Cilium's mount-bpf-fs init container): what a test pins there (the
    // Cilium double's maps) is the node's, and the machine's /sys/fs/bpf is
    // never written. A new bpf mount is a new, empty instance.
    mount(Some("bpf"), "/sys/fs/bpf", Some("bpf"), hard)?;
    check(
        // SAFETY: a valid buffer and length.
        unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) },
        format!("sethostname {name}"),
    )
}

/// pid 1 of the node: reaps every orphan until it is killed.
fn init_loop() -> ! {
    extern "C" fn noop(_: libc::c_int) {}
    // SAFETY: a no-op handler makes SIGCHLD wake sigsuspend; SIGCHLD is
    // blocked (block_signals) except during sigsuspend, so none is missed.
    unsafe {
        libc::signal(libc::SIGCHLD, noop as *const () as libc::sighandler_t);
        let empty = sigset(&[]);
        loop {
            let mut status = 0;
            while libc::waitpid(-1, &mut status, libc::WNOHANG) > 0 {}
            libc::sigsuspend(&empty);
        }
    }
}

fn exec_in_node(cli: &Cli) -> Res<()> {
    let init = cli.node_pid.expect("clap requires --node-pid");
    if cli.cmd.is_empty() {
        return Err("no command given (after --)".into());
    }
    let caps = parse_caps(&cli.caps)?;
    let ns = |kind: &str| open_ns(&PathBuf::from(format!("/proc/{init}/ns/{kind}")));
    // Every namespace is opened before the first setns changes what paths mean.
    let net = match &cli.netns {
        Some(p) => open_ns(p)?,
        None => ns("net")?,
    };
    let (cg, uts, mnt, pidns) = (ns("cgroup")?, ns("uts")?, ns("mnt")?, ns("pid")?);
    if let Some(dir) = &cli.cgroup {
        join_cgroup(dir)?;
    }
    let cwd = std::env::current_dir().ok();
    setns(&net, libc::CLONE_NEWNET, "net")?;
    setns(&cg, libc::CLONE_NEWCGROUP, "cgroup")?;
    setns(&uts, libc::CLONE_NEWUTS, "uts")?;
    setns(&mnt, libc::CLONE_NEWNS, "mnt")?;
    setns(&pidns, libc::CLONE_NEWPID, "pid")?;
    drop((net, cg, uts, mnt, pidns));
    if let Some(d) = cwd {
        // The node shares the host's files: keep relative paths meaning the same.
        let _ = std::env::set_current_dir(d);
    }
    if cli.ro_root {
        read_only_root(&cli.rw, &cli.ro)?;
    }
    let argv: Vec<CString> = cli
        .cmd
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| format!("argument {a:?} has a NUL byte")))
        .collect::<Res<_>>()?;
    let (alive_r, alive_w) = pipe()?;
    let old_mask = block_signals()?;
    let pid = fork()?;
    if pid == 0 {
        drop(alive_w);
        let e = child_exec(&argv, &caps, cli, &alive_r, &old_mask);
        eprintln!("node-exec: {:?}: {e}", cli.cmd[0]);
        // SAFETY: plain _exit in a forked child.
        unsafe { libc::_exit(127) };
    }
    drop(alive_r);
    // alive_w stays open (close-on-exec is irrelevant here) until we exit.
    std::mem::forget(alive_w);
    forward_and_wait(pid)
}

/// A mount namespace of our own whose / is read-only, `rw` dirs excepted
/// (readOnlyRootFilesystem with emptyDir volumes).
fn read_only_root(rw: &[PathBuf], ro: &[PathBuf]) -> Res<()> {
    check(
        // SAFETY: plain unshare; single-threaded.
        unsafe { libc::unshare(libc::CLONE_NEWNS) },
        "unshare mount namespace",
    )?;
    mount(None, "/", None, libc::MS_REC | libc::MS_SLAVE)?;
    for d in rw {
        let s = d
            .to_str()
            .ok_or_else(|| format!("--rw {} is not UTF-8", d.display()))?;
        mount(Some(s), s, None, libc::MS_BIND | libc::MS_REC)?;
    }
    for d in ro {
        let s = d
            .to_str()
            .ok_or_else(|| format!("--ro {} is not UTF-8", d.display()))?;
        mount(Some(s), s, None, libc::MS_BIND | libc::MS_REC)?;
        mount(
            None,
            s,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
        )?;
    }
    mount(
        None,
        "/",
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
    )
}

/// None: keep every capability.
fn parse_caps(s: &str) -> Res<Option<u64>> {
    if s == "all" {
        return Ok(None);
    }
    let mut mask = 0u64;
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let n = flowaudit_tests::daemonset::capability_number(name)
            .ok_or_else(|| format!("unknown capability {name:?} in --caps"))?;
        mask |= 1u64 << n;
    }
    Ok(Some(mask))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// In the forked child: die with the parent, limits, capabilities,
/// no_new_privs, the caller's signal mask, exec. Returns only on failure.
fn child_exec(
    argv: &[CString],
    caps: &Option<u64>,
    cli: &Cli,
    alive: &OwnedFd,
    mask: &libc::sigset_t,
) -> String {
    // SAFETY: prctl/poll/setrlimit/signal calls with valid arguments in a
    // single-threaded child.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        // The parent is outside our pid namespace (getppid() is 0): its end
        // of the pipe closing says it already died.
        let mut pfd = libc::pollfd {
            fd: alive.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        if libc::poll(&mut pfd, 1, 0) > 0 && pfd.revents & libc::POLLHUP != 0 {
            libc::_exit(FAILED);
        }
        if cli.memlock_unlimited {
            let inf = libc::rlimit {
                rlim_cur: libc::RLIM_INFINITY,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &inf) != 0 {
                // Raising the hard limit needs CAP_SYS_RESOURCE, which some
                // sandboxes withhold even from root: keep the hard limit.
                let mut cur = std::mem::zeroed::<libc::rlimit>();
                libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut cur);
                eprintln!(
                    "node-exec: {}; RLIMIT_MEMLOCK stays at {} bytes (kernels before 5.11 charge BPF maps to it)",
                    os_err("setrlimit RLIMIT_MEMLOCK infinity"),
                    cur.rlim_max
                );
                cur.rlim_cur = cur.rlim_max;
                libc::setrlimit(libc::RLIMIT_MEMLOCK, &cur);
            }
        }
    }
    if let Some(keep) = caps
        && let Err(e) = drop_caps(*keep)
    {
        return e;
    }
    // SAFETY: as above.
    unsafe {
        if cli.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return os_err("prctl PR_SET_NO_NEW_PRIVS");
        }
        // Rust ignores SIGPIPE; a command expects the default.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::sigprocmask(libc::SIG_SETMASK, mask, std::ptr::null_mut());
        let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        libc::execvp(ptrs[0], ptrs.as_ptr());
    }
    os_err("execvp")
}

/// What runc does for a uid-0 container: the bounding set keeps only `keep`,
/// inheritable and ambient are empty, effective = permitted = `keep`; after
/// execve root's permitted is the bounding set, i.e. exactly `keep`.
fn drop_caps(keep: u64) -> Res<()> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .map_err(|e| format!("read /proc/sys/kernel/cap_last_cap: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("parse cap_last_cap: {e}"))?;
    for cap in 0..=last {
        if keep & (1u64 << cap) == 0 {
            // SAFETY: prctl with a capability number.
            check(
                // SAFETY: plain-integer arguments; the descriptor, if any, is ours.
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) },
                format!("drop capability {cap} from the bounding set"),
            )?;
        }
    }
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let lo = keep as u32;
    let hi = (keep >> 32) as u32;
    let data = [
        CapData {
            effective: lo,
            permitted: lo,
            inheritable: 0,
        },
        CapData {
            effective: hi,
            permitted: hi,
            inheritable: 0,
        },
    ];
    check(
        // SAFETY: capset with a v3 header and two data words.
        unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) as libc::c_int },
        "capset",
    )?;
    check(
        // SAFETY: prctl without pointers.
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        },
        "clear ambient capabilities",
    )
}
