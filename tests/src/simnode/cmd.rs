//! Running `ip` (iproute2): one place that turns a failed command into a
//! [`SimError`] naming the exact command line and what it printed.

use std::process::Command;

use super::SimError;

/// Why `ip ARGS` could not start: iproute2 missing, or the error.
fn spawn_failed(e: std::io::Error, args: &str) -> SimError {
    if e.kind() == std::io::ErrorKind::NotFound {
        SimError::IpMissing
    } else {
        SimError::Io {
            what: format!("spawn `ip {args}`"),
            source: e,
        }
    }
}

/// Runs `ip ARGS...` and fails with the command line and its stderr.
pub(crate) fn ip(args: &[&str]) -> Result<String, SimError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| spawn_failed(e, &args.join(" ")))?;
    if !out.status.success() {
        return Err(SimError::Command {
            cmd: format!("ip {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `lines` (each the arguments of one `ip` command, without global
/// options: an IPv6 address or prefix says the family) in network
/// namespace `netns` with one `ip -batch` process, which stops at the first
/// that fails; fails with that command's line and what `ip` printed. One
/// process instead of one per command: under QEMU without KVM, where the
/// kernel matrix runs, every process start costs about half a second
/// (2026-12-06, 5.10 guest: 10 `ip` runs 5.2 s, one batch of the same 10
/// commands 0.84 s).
pub(crate) fn ip_batch(netns: &str, lines: &[String]) -> Result<(), SimError> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| spawn_failed(e, &format!("-n {netns} -batch -")))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let fed = stdin.write_all((lines.join("\n") + "\n").as_bytes());
    drop(stdin);
    let out = child.wait_with_output().map_err(|e| SimError::Io {
        what: format!("wait for `ip -n {netns} -batch -`"),
        source: e,
    })?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if out.status.success() && fed.is_ok() {
        return Ok(());
    }
    // "Command failed -:N": the N-th line (from 1) is the one that failed.
    let failed = stderr
        .rsplit_once("Command failed -:")
        .and_then(|(_, n)| n.trim().parse::<usize>().ok())
        .and_then(|n| lines.get(n.checked_sub(1)?));
    Err(SimError::Command {
        cmd: match failed {
            Some(line) => format!("ip -n {netns} {line}"),
            None => format!("ip -n {netns} -batch - with:\n  {}", lines.join("\n  ")),
        },
        status: out.status.to_string(),
        stderr: match fed {
            Err(e) => format!("{stderr} (writing its commands: {e})"),
            Ok(()) => stderr,
        },
    })
}

/// One `ip_batch` command line from its words.
pub(crate) fn line(words: &[&str]) -> String {
    words.join(" ")
}

/// Checks once that we are root and that iproute2 is installed, so the
/// first error a test shows is the actionable one, not an obscure EPERM.
pub(crate) fn preflight() -> Result<(), SimError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(SimError::NotRoot);
    }
    ip(&["-V"]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_batch_names_the_command_that_failed() {
        crate::support::require_root();
        let name = format!("fa-batch-{}", std::process::id());
        super::super::netns::add(&name).expect("netns add");
        let got = ip_batch(
            &name,
            &[
                line(&["link", "set", "lo", "up"]),
                line(&["link", "set", "fa-no-such-dev", "up"]),
                line(&["link", "set", "lo", "down"]),
            ],
        );
        // The line before the failure ran; the one after did not.
        let lo = ip(&["-n", &name, "-o", "link", "show", "lo"]);
        super::super::netns::del(&name).expect("netns del");
        match got {
            Err(SimError::Command { cmd, stderr, .. }) => {
                assert_eq!(cmd, format!("ip -n {name} link set fa-no-such-dev up"));
                assert!(stderr.contains("fa-no-such-dev"), "{stderr}");
            }
            other => panic!("expected the failing command named, got {other:?}"),
        }
        assert!(lo.expect("ip link show lo").contains("UP"));
        // A namespace that does not exist: the whole batch is named.
        match ip_batch("fa-no-such-netns", &[line(&["link", "show"])]) {
            Err(SimError::Command { cmd, .. }) => {
                assert!(cmd.contains("-batch - with:\n  link show"), "{cmd}")
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }
}
