//! Starting processes inside a simulated node through the `node-exec`
//! binary (the node's tiny container runtime): the node's init itself, and
//! commands in the node's namespaces with a pod's netns and cgroup. A
//! caller's `Command` keeps its stdio, environment and working directory:
//! its child execs `node-exec ... -- <program> <args>` instead of the
//! program. Also: from node-exec's pid to the real process's host pid and
//! node-namespace pid.

use std::ffi::{CString, OsString};
use std::io::BufRead;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::SimError;

/// How a command runs in the node, as a container spec would say it. The
/// default is a privileged container: every capability, root writable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOpts {
    /// Capabilities kept (drop ALL, add these); `None` keeps all.
    pub caps: Option<Vec<String>>,
    /// no_new_privs (`allowPrivilegeEscalation: false`).
    pub no_new_privs: bool,
    /// `readOnlyRootFilesystem: true`, with `rw` staying writable (emptyDirs).
    pub ro_root: bool,
    pub rw: Vec<PathBuf>,
    /// With `ro_root`: mounts under / that are made read-only too (hostPath
    /// volumes with `readOnly: true`, which are mounts of their own).
    pub ro: Vec<PathBuf>,
    /// RLIMIT_MEMLOCK infinity (containerd's default for containers).
    pub memlock_unlimited: bool,
}

impl ExecOpts {
    fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        if let Some(caps) = &self.caps {
            a.push("--caps".into());
            a.push(caps.join(",").into());
        }
        if self.no_new_privs {
            a.push("--no-new-privs".into());
        }
        if self.ro_root {
            a.push("--ro-root".into());
            for d in &self.rw {
                a.push("--rw".into());
                a.push(d.into());
            }
            for d in &self.ro {
                a.push("--ro".into());
                a.push(d.into());
            }
        }
        if self.memlock_unlimited {
            a.push("--memlock-unlimited".into());
        }
        a
    }
}

/// A binary of this package: `$<env_var>` if set, else next to the running
/// executable (target/<profile>/NAME), also from target/<profile>/deps/
/// where test binaries live.
pub fn sibling_binary(name: &str, env_var: &str) -> Result<PathBuf, SimError> {
    if let Some(p) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| SimError::Io {
        what: "find current executable".into(),
        source: e,
    })?;
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let cand = d.join(name);
        if cand.is_file() {
            return Ok(cand);
        }
        dir = d.parent();
    }
    Err(SimError::Other(format!(
        "{name} binary not found next to {} nor in its parent: build it \
         (cargo build -p flowaudit-tests --bin {name}, or cargo xtask build) or set {env_var}=/path/to/{name}",
        exe.display()
    )))
}

/// `$NODE_EXEC`, else next to the running executable.
pub fn node_exec_path() -> Result<PathBuf, SimError> {
    sibling_binary("node-exec", "NODE_EXEC")
}

/// Starts a node's init: returns node-exec's handle and the init's host pid.
pub(crate) fn start_init(
    hostname: &str,
    node_cgroup: &Path,
    init_cgroup: &Path,
    netns: &Path,
) -> Result<(Child, u32), SimError> {
    let bin = node_exec_path()?;
    let mut child = Command::new(&bin)
        .arg("--new-node")
        .arg(hostname)
        .arg("--cgroup")
        .arg(node_cgroup)
        .arg("--init-cgroup")
        .arg(init_cgroup)
        .arg("--netns")
        .arg(netns)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| SimError::Io {
            what: format!("spawn {} --new-node {hostname}", bin.display()),
            source: e,
        })?;
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout is piped");
    let _ = std::io::BufReader::new(stdout).read_line(&mut line);
    match line.trim().parse::<u32>() {
        Ok(pid) => Ok((child, pid)),
        Err(_) => {
            let _ = child.kill();
            let out = child.wait_with_output().ok();
            let stderr = out
                .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
                .unwrap_or_default();
            Err(SimError::Other(format!(
                "node init for {hostname} did not start (printed {line:?}): {stderr}"
            )))
        }
    }
}

/// Makes `cmd`'s child exec `node-exec --node-pid <init> [--netns] [--cgroup]
/// <opts> -- <program> <args>` with `cmd`'s stdio, cwd and environment.
pub(crate) fn spawn(
    mut cmd: Command,
    init_pid: u32,
    netns: Option<&Path>,
    cgroup: Option<&Path>,
    opts: &ExecOpts,
    what: &str,
) -> Result<Child, SimError> {
    let bin = node_exec_path()?;
    let mut argv: Vec<OsString> = vec![
        bin.clone().into(),
        "--node-pid".into(),
        init_pid.to_string().into(),
    ];
    if let Some(n) = netns {
        argv.extend(["--netns".into(), n.into()]);
    }
    if let Some(c) = cgroup {
        argv.extend(["--cgroup".into(), c.into()]);
    }
    argv.extend(opts.args());
    argv.push("--".into());
    argv.push(cmd.get_program().to_owned());
    argv.extend(cmd.get_args().map(|a| a.to_owned()));
    // The environment the child would have had (env_clear cannot be seen).
    let mut env: std::collections::BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => env.insert(k.to_owned(), v.to_owned()),
            None => env.remove(k),
        };
    }
    let to_c = |s: OsString| {
        CString::new(s.into_vec())
            .map_err(|_| SimError::Other(format!("{what}: an argument has a NUL byte")))
    };
    let bin_c = to_c(bin.clone().into())?;
    let argv_c: Vec<CString> = argv.into_iter().map(to_c).collect::<Result<_, _>>()?;
    let env_c: Vec<CString> = env
        .into_iter()
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            to_c(kv)
        })
        .collect::<Result<_, _>>()?;
    // Pointer arrays for execve, kept as usize (raw pointers are not Send);
    // they point into the CStrings the closure owns.
    let ptrs = |v: &[CString]| -> Vec<usize> {
        v.iter()
            .map(|a| a.as_ptr() as usize)
            .chain(std::iter::once(0))
            .collect()
    };
    let (argv_p, env_p) = (ptrs(&argv_c), ptrs(&env_c));
    let keep = (bin_c, argv_c, env_c, argv_p, env_p);
    // SAFETY: runs between fork and exec (stdio, cwd already set up) and only
    // calls execve on memory prepared before the fork and kept alive by `keep`.
    unsafe {
        cmd.pre_exec(move || {
            libc::execve(
                keep.0.as_ptr(),
                keep.3.as_ptr().cast::<*const libc::c_char>(),
                keep.4.as_ptr().cast::<*const libc::c_char>(),
            );
            Err(std::io::Error::last_os_error())
        });
    }
    let mut child = cmd.spawn().map_err(|e| SimError::Io {
        what: format!("spawn {what} via {}", bin.display()),
        source: e,
    })?;
    // node-exec forks only once it is in the cgroup and namespaces: from
    // here on, nothing the command does is attributed elsewhere.
    if let Err(e) = real_process(child.id()) {
        // node-exec exits as its child did: a command quicker than two looks
        // for it ran and is done (125 is node-exec's own failure to set up).
        if let Ok(Some(status)) = child.try_wait()
            && status.code().is_some_and(|c| c != NODE_EXEC_FAILED)
        {
            return Ok(child);
        }
        let _ = child.kill();
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        return Err(SimError::Other(format!(
            "{what}: node-exec exited ({status}) before starting it (its stderr says why): {e}"
        )));
    }
    Ok(child)
}

/// node-exec's exit code when it could not start the command (its
/// `FAILED`); any other code is the command's own.
const NODE_EXEC_FAILED: i32 = 125;

/// The host pid of the process node-exec `node_exec` started (its only
/// child), waiting up to 10 s for the fork.
pub fn real_process(node_exec: u32) -> Result<u32, SimError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = child_of(node_exec) {
            return Ok(pid);
        }
        // A zombie (exited, not yet reaped) never forks again.
        let alive = std::fs::read_to_string(format!("/proc/{node_exec}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| !r.trim_start().starts_with('Z'))
            })
            .unwrap_or(false);
        if !alive || Instant::now() > deadline {
            return Err(SimError::Other(format!(
                "node-exec {node_exec} has no child process (alive: {alive})"
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn child_of(parent: u32) -> Option<u32> {
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")) {
        return s.split_whitespace().next().and_then(|p| p.parse().ok());
    }
    // Without CONFIG_PROC_CHILDREN: scan every process's PPid.
    let want = parent.to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let status = std::fs::read_to_string(e.path().join("status")).ok()?;
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:"))?;
        (ppid.trim() == want).then_some(pid)
    })
}

/// The pid of host process `host_pid` in its innermost pid namespace (the
/// last NSpid field of /proc/<pid>/status, read on the host).
pub fn node_pid_of(host_pid: u32) -> Result<u32, SimError> {
    let p = format!("/proc/{host_pid}/status");
    let status = std::fs::read_to_string(&p).map_err(|e| SimError::Io {
        what: format!("read {p}"),
        source: e,
    })?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| SimError::Other(format!("no NSpid line in {p}")))
}

/// `cmd` in `what`, to completion: stdout captured, stderr too.
pub(crate) fn output(child: Child, what: &str) -> Result<std::process::Output, SimError> {
    child.wait_with_output().map_err(|e| SimError::Io {
        what: format!("wait for {what}"),
        source: e,
    })
}

/// Sets `cmd` up for [`output`]: no stdin, stdout and stderr piped.
pub(crate) fn piped(mut cmd: Command) -> Command {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}
