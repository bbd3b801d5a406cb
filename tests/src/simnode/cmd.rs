//! Running `ip` (iproute2): one place that turns a failed command into a
//! [`SimError`] naming the exact command line and what it printed.

use std::process::Command;

use super::SimError;

/// Runs `ip ARGS...` and fails with the command line and its stderr.
pub(crate) fn ip(args: &[&str]) -> Result<String, SimError> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            SimError::IpMissing
        } else {
            SimError::Io {
                what: format!("spawn `ip {}`", args.join(" ")),
                source: e,
            }
        }
    })?;
    if !out.status.success() {
        return Err(SimError::Command {
            cmd: format!("ip {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
