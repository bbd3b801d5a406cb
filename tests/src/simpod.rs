//! The `simpod` traffic tool's JSON lines (shared by the binary and its
//! callers) and drivers that run it inside a [`Pod`]: [`Pod::serve`] starts a
//! server and waits for its `ready` line, [`Pod::connect`] runs a client to
//! completion and parses one [`ConnRecord`] per connection plus a [`Summary`].

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::simnode::{Pod, PodProcess, SimError};

/// Outcome of one client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnResult {
    /// Connected, sent, read the reply to EOF, closed.
    Ok,
    /// RST in answer to the SYN (ECONNREFUSED).
    Refused,
    /// No answer within `--timeout-ms` (connect or transfer).
    Timeout,
    /// EHOSTUNREACH/ENETUNREACH (e.g. ARP for the peer failed).
    Unreachable,
    /// Anything else; see `error`.
    Error,
}

/// One line of `simpod connect` output per connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnRecord {
    /// Local `ip:port`; known even for failed attempts (taken right after the
    /// SYN was queued). `None` only when the socket could not be created.
    pub local: Option<SocketAddr>,
    pub remote: SocketAddr,
    pub result: ConnResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Payload bytes written (0 unless connected).
    pub sent: u64,
    /// Reply bytes read.
    pub received: u64,
    /// The simpod process (tgid) that owned the socket.
    pub pid: u32,
    /// From connect() call to close, milliseconds.
    pub duration_ms: f64,
}

/// Last line of `simpod connect` output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub summary: bool,
    pub total: u64,
    pub ok: u64,
    pub refused: u64,
    pub timeout: u64,
    pub unreachable: u64,
    pub error: u64,
    pub elapsed_ms: f64,
    pub pid: u32,
}

/// `simpod serve`'s first line, once every listener is bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    pub ready: bool,
    /// Actual bound addresses (port 0 resolved), in `--listen` order.
    pub listen: Vec<SocketAddr>,
    pub pid: u32,
}

/// One line per served connection with `--log-connections`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Served {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub received: u64,
    pub sent: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Options of `simpod serve`.
#[derive(Debug, Clone, Default)]
pub struct ServeOpts {
    pub listen: Vec<SocketAddr>,
    pub reply_bytes: u64,
}

/// Options of `simpod connect`. `Default` gives 1 connection, no payload,
/// concurrency 1, 10 s timeout, no hold.
///
/// The timeout is long because the kernel matrix runs under QEMU without
/// KVM on a 2-core machine, where a server's answer now and then takes
/// seconds (a CI run on 5.10, 2026-12-07: one of two connections of an
/// idle node got no answer in 2 s; locally the same test's answers took
/// 8 to 56 ms). A test that expects a timeout sets its own, short one.
#[derive(Debug, Clone)]
pub struct ConnectOpts {
    pub to: SocketAddr,
    pub count: u64,
    pub send_bytes: u64,
    pub concurrency: u32,
    pub timeout_ms: u64,
    pub hold_ms: u64,
}

impl ConnectOpts {
    pub fn new(to: SocketAddr) -> Self {
        ConnectOpts {
            to,
            count: 1,
            send_bytes: 0,
            concurrency: 1,
            timeout_ms: 10_000,
            hold_ms: 0,
        }
    }
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "connect".into(),
            "--to".into(),
            self.to.to_string(),
            "--count".into(),
            self.count.to_string(),
            "--send-bytes".into(),
            self.send_bytes.to_string(),
            "--concurrency".into(),
            self.concurrency.to_string(),
            "--timeout-ms".into(),
            self.timeout_ms.to_string(),
            "--hold-ms".into(),
            self.hold_ms.to_string(),
        ]
    }
}

/// Everything a `simpod connect` run printed.
#[derive(Debug, Clone)]
pub struct ConnectReport {
    pub records: Vec<ConnRecord>,
    pub summary: Summary,
}

/// A running `simpod serve`; killed when dropped.
#[derive(Debug)]
pub struct Server {
    pub process: PodProcess,
    pub ready: Ready,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.ready.pid
    }
}

/// Path of the `simpod` binary: `$SIMPOD` if set, else next to the running
/// executable (target/<profile>/simpod), also from target/<profile>/deps/
/// where test binaries live. Integration tests of this package can use
/// `env!("CARGO_BIN_EXE_simpod")` instead.
pub fn binary_path() -> Result<PathBuf, SimError> {
    crate::simnode::sibling_binary("simpod", "SIMPOD")
}

impl Pod {
    /// Starts `simpod serve` in the pod and waits for its `ready` line.
    pub fn serve(&self, opts: &ServeOpts) -> Result<Server, SimError> {
        let mut cmd = Command::new(binary_path()?);
        cmd.arg("serve")
            .arg("--reply-bytes")
            .arg(opts.reply_bytes.to_string());
        for l in &opts.listen {
            cmd.arg("--listen").arg(l.to_string());
        }
        // Only the ready line is read; the rest of stdout goes nowhere so a
        // busy server can never block on a full pipe.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut process = self.spawn_guarded(cmd)?;
        let stdout = process
            .child_mut()
            .stdout
            .take()
            .ok_or_else(|| SimError::Other("no stdout pipe".into()))?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| SimError::Io {
                what: format!("read simpod serve's ready line in pod {}", self.name()),
                source: e,
            })?;
        let ready: Ready = serde_json::from_str(line.trim()).map_err(|e| {
            SimError::Other(format!(
                "simpod serve in pod {} did not print a ready line (got {line:?}): {e}; see its stderr above",
                self.name()
            ))
        })?;
        Ok(Server { process, ready })
    }

    /// Runs `simpod connect` in the pod to completion.
    pub fn connect(&self, opts: &ConnectOpts) -> Result<ConnectReport, SimError> {
        let mut cmd = Command::new(binary_path()?);
        cmd.args(opts.to_args());
        let out = self.output(cmd)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(SimError::Other(format!(
                "simpod {} in pod {} failed ({}): {}",
                opts.to_args().join(" "),
                self.name(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        parse_connect_output(&stdout)
    }
}

/// Parses `simpod connect` stdout: records, then one summary line.
pub fn parse_connect_output(stdout: &str) -> Result<ConnectReport, SimError> {
    let mut records = Vec::new();
    let mut summary = None;
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        if line.contains("\"summary\"") {
            summary =
                Some(serde_json::from_str(line).map_err(|e| {
                    SimError::Other(format!("bad simpod summary line {line:?}: {e}"))
                })?);
        } else {
            records.push(
                serde_json::from_str(line).map_err(|e| {
                    SimError::Other(format!("bad simpod record line {line:?}: {e}"))
                })?,
            );
        }
    }
    let summary =
        summary.ok_or_else(|| SimError::Other("simpod connect printed no summary line".into()))?;
    Ok(ConnectReport { records, summary })
}
