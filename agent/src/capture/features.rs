//! What the running kernel lets the programs do, found at load time. In: the
//! lockdown state and the verifier's answer to a load. Out: the feature
//! switches handed to the programs (read-only globals) and the named
//! degradations the agent reports at start-up, in `status` and as the
//! `flowaudit_kernel_degraded{name}` metric. A kernel that lacks something
//! makes the agent start with less, and say exactly what; a program that
//! fails to load is never the first sign a user sees.

use std::fmt;

/// Switches the programs read (see `agent-ebpf`: dead code when off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// `bpf_get_current_task` and `bpf_probe_read_kernel`.
    pub kernel_reads: bool,
    /// `bpf_get_netns_cookie` in `sock_ops` (Linux 5.15+).
    pub sock_ops_netns_cookie: bool,
}

impl Features {
    pub const ALL: Self = Self {
        kernel_reads: true,
        sock_ops_netns_cookie: true,
    };
}

/// Something this kernel does not give, and what the agent loses by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Degradation {
    /// Stable name: the metric label and what `status` prints.
    pub name: &'static str,
    /// Why: the kernel's own words where it gave some.
    pub reason: String,
    /// What events lack because of it.
    pub lost: &'static str,
}

impl fmt::Display for Degradation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.name, self.lost, self.reason)
    }
}

pub const KERNEL_READS: &str = "kernel_reads";
pub const NETNS_COOKIE: &str = "netns_cookie";
pub const LISTENER_SCAN: &str = "listener_scan";
pub const PID_NAMESPACE: &str = "pid_namespace";

/// The agent runs in a pid namespace of its own (a kind node's) and cannot
/// translate the kernel's pids into it.
pub fn pid_namespace_degradation(kernel_reads: bool, missing: &str) -> Degradation {
    Degradation {
        name: PID_NAMESPACE,
        reason: if kernel_reads {
            format!("the kernel's BTF lacks what pid translation reads: {missing}")
        } else {
            "the agent runs in a pid namespace of its own (a node's) and pids are translated by reading kernel memory, which is off (see kernel_reads)".into()
        },
        lost: "events carry no pid, and SPIRE is asked by the pod's selectors instead of by pid",
    }
}

/// The start-up scan cannot key listeners that predate the agent.
pub fn listener_scan_degradation(reason: String) -> Degradation {
    Degradation {
        name: LISTENER_SCAN,
        reason,
        lost: "servers already listening when the agent started: connections they accept have no owning process (servers started later are seen)",
    }
}

const KERNEL_READS_LOST: &str = "no process start times (a reused pid cannot be told apart, so SPIRE is asked by the pod's selectors instead of by pid), the connecting thread's name instead of its process's, no failure reasons (FAILED events say ERROR), and the byte count of the direction the socket received may include the peer's FIN (one byte high)";
const NETNS_COOKIE_LOST: &str = "sockets carry no network namespace cookie or inode, so accepted sockets cannot be matched to their listener: the server end of a connection has no owning process";

/// The lockdown mode from `/sys/kernel/security/lockdown` (`none [integrity]
/// confidentiality`: the bracketed one is in force), if the file exists.
pub fn lockdown_mode(text: &str) -> Option<&str> {
    let start = text.find('[')?;
    let end = text[start..].find(']')?;
    Some(&text[start + 1..start + end])
}

/// The switches to try first: everything, except kernel reads under a
/// confidentiality lockdown (the kernel refuses `bpf_probe_read_kernel`);
/// with the reason reads are off, if they are.
pub fn initial(lockdown: Option<&str>) -> (Features, Option<String>) {
    if lockdown == Some("confidentiality") {
        let features = Features {
            kernel_reads: false,
            ..Features::ALL
        };
        let why = "kernel lockdown is in confidentiality mode, which forbids bpf_probe_read_kernel";
        return (features, Some(why.into()));
    }
    (Features::ALL, None)
}

/// The helper a verifier log says this kernel does not offer to the
/// program: `unknown func bpf_get_netns_cookie#122`.
pub fn unknown_helper(verifier_log: &str) -> Option<&str> {
    let at = verifier_log.find("unknown func ")?;
    let rest = &verifier_log[at + "unknown func ".len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

/// After a load failed with `error`: the switches to try next and the helper
/// the kernel refused, or None when no switch explains the failure.
pub fn fall_back(features: Features, error: &str) -> Option<(Features, String)> {
    let helper = unknown_helper(error)?;
    let mut next = features;
    match helper {
        "bpf_get_netns_cookie" if features.sock_ops_netns_cookie => {
            next.sock_ops_netns_cookie = false
        }
        "bpf_probe_read_kernel" | "bpf_get_current_task" if features.kernel_reads => {
            next.kernel_reads = false
        }
        _ => return None,
    }
    Some((
        next,
        format!("the kernel does not offer {helper} to the program that calls it"),
    ))
}

/// Whether sockets carry no namespace name at all: no helper, and no
/// kernel reads to take the inode from the socket.
pub fn netns_lost(features: Features) -> bool {
    !features.sock_ops_netns_cookie && !features.kernel_reads
}

/// What the final switches cost. `reads_off` says why kernel reads are off.
pub fn degradations(features: Features, reads_off: Option<&str>) -> Vec<Degradation> {
    let mut out = Vec::new();
    if !features.kernel_reads {
        out.push(Degradation {
            name: KERNEL_READS,
            reason: reads_off.unwrap_or("kernel reads are off").to_string(),
            lost: KERNEL_READS_LOST,
        });
    }
    // Without the helper the namespace inode is read from the socket, which
    // needs reads.
    if netns_lost(features) {
        out.push(Degradation {
            name: NETNS_COOKIE,
            reason:
                "sock_ops lacks bpf_get_netns_cookie before Linux 5.15, and kernel reads are off"
                    .into(),
            lost: NETNS_COOKIE_LOST,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_lockdown_mode_in_force() {
        assert_eq!(
            lockdown_mode("[none] integrity confidentiality\n"),
            Some("none")
        );
        assert_eq!(
            lockdown_mode("none integrity [confidentiality]\n"),
            Some("confidentiality")
        );
        assert_eq!(lockdown_mode(""), None);
        assert_eq!(lockdown_mode("[unterminated"), None);
    }

    #[test]
    fn confidentiality_lockdown_turns_kernel_reads_off_up_front() {
        let (f, why) = initial(Some("confidentiality"));
        assert!(!f.kernel_reads && f.sock_ops_netns_cookie);
        let d = degradations(f, why.as_deref());
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].name, KERNEL_READS);
        assert!(d[0].reason.contains("lockdown"), "{}", d[0]);
        assert_eq!(initial(Some("integrity")), (Features::ALL, None));
        assert_eq!(initial(None), (Features::ALL, None));
        assert!(degradations(Features::ALL, None).is_empty());
    }

    #[test]
    fn finds_the_helper_in_a_verifier_log() {
        let log =
            "189: (85) call bpf_get_netns_cookie#122\nunknown func bpf_get_current_pid_tgid#14\n";
        assert_eq!(unknown_helper(log), Some("bpf_get_current_pid_tgid"));
        assert_eq!(unknown_helper("R1 invalid mem access 'scalar'"), None);
        assert_eq!(unknown_helper("unknown func #3"), None);
    }

    #[test]
    fn falls_back_one_switch_at_a_time_and_then_gives_up() {
        // Linux 5.10: sock_ops has no netns cookie helper; the namespace
        // inode, read from the socket, stands in, so nothing is lost yet.
        let (f, why) = fall_back(
            Features::ALL,
            "... unknown func bpf_get_netns_cookie#122 ...",
        )
        .expect("the netns cookie helper has a switch");
        assert!(!f.sock_ops_netns_cookie && f.kernel_reads);
        assert!(why.contains("bpf_get_netns_cookie"), "{why}");
        assert!(degradations(f, None).is_empty());
        // Then reads refused too: both facts gone, nothing left to switch.
        let (f2, why2) = fall_back(f, "unknown func bpf_probe_read_kernel#113").unwrap();
        assert!(!f2.kernel_reads);
        let names: Vec<_> = degradations(f2, Some(&why2))
            .iter()
            .map(|d| d.name)
            .collect();
        assert_eq!(names, [KERNEL_READS, NETNS_COOKIE]);
        assert_eq!(
            fall_back(f2, "unknown func bpf_probe_read_kernel#113"),
            None
        );
        assert_eq!(fall_back(f2, "unknown func bpf_get_netns_cookie#122"), None);
        // A helper no switch covers is a real failure.
        assert_eq!(
            fall_back(Features::ALL, "unknown func bpf_get_current_pid_tgid#14"),
            None
        );
        assert_eq!(fall_back(Features::ALL, "invalid mem access"), None);
    }
}
