//! `flowaudit observe`: prints flow events, one per line, in `compact`
//! (identities and verdict first, violations highlighted on a terminal) or
//! `json` (the PRODUCT.md shape). Source: a JSON-lines file written by
//! `--export-file` (`--input-file`, like `hubble observe --input-file`),
//! optionally followed as it grows and across rotations.

use std::io::{BufRead, BufReader, Seek, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use flowaudit_policy::Verdict;

use crate::flow::{Direction, Endpoint, FlowEvent};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Compact,
    Json,
}

#[derive(Debug, Args)]
pub struct ObserveArgs {
    /// Read flows from this JSON-lines file (as written by `flowaudit agent --export-file`); `-` reads standard input.
    #[arg(long, value_name = "PATH")]
    pub input_file: PathBuf,
    /// Keep printing flows as they are appended (follows rotations).
    #[arg(short, long)]
    pub follow: bool,
    /// Print only the last N flows already in the file (then follow, with -f).
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Compact)]
    pub output: Output,
    /// Colour violations: auto (when stdout is a terminal), always, never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    pub color: String,
}

pub fn run(args: &ObserveArgs) -> anyhow::Result<()> {
    let color = match args.color.as_str() {
        "always" => true,
        "never" => false,
        _ => unsafe { libc::isatty(1) == 1 },
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let emit = |line: &str, out: &mut dyn Write| -> anyhow::Result<()> {
        match serde_json::from_str::<FlowEvent>(line) {
            Ok(flow) => match args.output {
                Output::Json => writeln!(out, "{}", serde_json::to_string(&flow)?)?,
                Output::Compact => writeln!(out, "{}", compact(&flow, color))?,
            },
            Err(e) if !line.trim().is_empty() => {
                eprintln!("flowaudit observe: skipping a line that is not a flow event: {e}")
            }
            Err(_) => {}
        }
        Ok(())
    };
    if args.input_file.as_os_str() == "-" {
        for line in std::io::stdin().lock().lines() {
            emit(&line?, &mut out)?;
        }
        return Ok(());
    }
    let open = || {
        std::fs::File::open(&args.input_file)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", args.input_file.display()))
    };
    let mut reader = BufReader::new(open()?);
    let mut existing: Vec<String> = Vec::new();
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        if line.ends_with('\n') {
            existing.push(std::mem::take(&mut line));
        } else {
            break; // a line still being written: follow picks it up
        }
    }
    let skip = args.last.map_or(0, |n| existing.len().saturating_sub(n));
    for l in &existing[skip..] {
        emit(l, &mut out)?;
    }
    out.flush()?;
    if !args.follow {
        return Ok(());
    }
    let mut inode = inode_of(&args.input_file);
    loop {
        let n = reader.read_line(&mut line)?;
        if n > 0 && line.ends_with('\n') {
            emit(&line, &mut out)?;
            line.clear();
            continue;
        }
        out.flush()?;
        // At the end: wait, then check whether the file was rotated away.
        std::thread::sleep(Duration::from_millis(100));
        let now = inode_of(&args.input_file);
        if now.is_some() && now != inode {
            // Finish the old file, then continue on the new one from its start.
            reader = BufReader::new(open()?);
            reader.rewind()?;
            inode = now;
        }
    }
}

fn inode_of(p: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| m.ino())
}

/// How an end is named: its SPIFFE ID, else namespace/pod, else its address;
/// then the process when this node saw it.
fn end(ep: &Endpoint, ip: std::net::IpAddr, port: Option<u16>) -> String {
    let mut s = if !ep.spiffe_id.is_empty() {
        ep.spiffe_id.clone()
    } else if !ep.pod_name.is_empty() {
        format!("{}/{}", ep.namespace, ep.pod_name)
    } else {
        match ip {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        }
    };
    if let Some(port) = port {
        s.push_str(&format!(":{port}"));
    }
    if let (Some(pid), Some(p)) = (ep.pid, &ep.process) {
        s.push_str(&format!(" ({p}[{pid}])"));
    }
    s
}

/// One line per flow, e.g.
/// `12:00:01.123 VIOLATION CONNECT spiffe://…/frontend -> spiffe://…/postgresql:5432 EGRESS PLAINTEXT NO_MATCHING_RULE`.
pub fn compact(f: &FlowEvent, color: bool) -> String {
    let time = f.time.get(11..23).unwrap_or(&f.time);
    let src = end(
        &f.source,
        f.l4.source_ip,
        (f.direction == Direction::Egress || f.source.pod_name.is_empty())
            .then_some(f.l4.source_port),
    );
    let dst = end(
        &f.destination,
        f.l4.destination_ip,
        Some(f.l4.destination_port),
    );
    let mut line = format!(
        "{time} {:<9} {:<7} {src} -> {dst} {} {}",
        f.verdict.to_string(),
        f.event.as_str(),
        f.direction.as_str(),
        f.encryption.state,
    );
    for finding in &f.findings {
        line.push(' ');
        line.push_str(&finding.kind.to_string());
    }
    match (f.event, f.socket.failure_reason) {
        (crate::flow::EventKind::Failed, Some(reason)) => {
            line.push_str(&format!(" reason={}", reason.as_str()))
        }
        (crate::flow::EventKind::Close, _) => line.push_str(&format!(
            " sent={}B received={}B duration={}ms",
            f.bytes_sent, f.bytes_received, f.duration_ms
        )),
        _ => {}
    }
    if color && f.verdict == Verdict::Violation {
        format!("\x1b[1;31m{line}\x1b[0m")
    } else if color && f.verdict == Verdict::Unknown && !f.findings.is_empty() {
        format!("\x1b[33m{line}\x1b[0m")
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Clock;
    use crate::capture::record::{KernelEvent, tests::sample};
    use flowaudit_policy::FindingKind;

    fn flow() -> FlowEvent {
        let mut f = FlowEvent::from_kernel(
            &KernelEvent::from_record(&sample()).unwrap(),
            "n1",
            &Clock::now(),
        );
        f.time = "2026-11-28T12:00:01.123456789Z".into();
        f
    }

    #[test]
    fn compact_line_for_a_capture_only_flow() {
        assert_eq!(
            compact(&flow(), false),
            "12:00:01.123 UNKNOWN   CLOSE   10.244.1.5:43122 (node[1234]) -> 10.244.1.9:5432 EGRESS UNKNOWN sent=10B received=20B duration=1ms"
        );
    }

    #[test]
    fn compact_line_with_identities_and_a_violation_is_highlighted() {
        let mut f = flow();
        f.event = crate::flow::EventKind::Connect;
        f.verdict = Verdict::Violation;
        f.source.spiffe_id = "spiffe://demo.local/ns/99-apps/sa/frontend".into();
        f.destination.spiffe_id = "spiffe://demo.local/ns/99-apps/sa/postgresql".into();
        f.findings.push(crate::flow::Finding {
            kind: FindingKind::NoMatchingRule,
            message: "x".into(),
        });
        let plain = compact(&f, false);
        assert_eq!(
            plain,
            "12:00:01.123 VIOLATION CONNECT spiffe://demo.local/ns/99-apps/sa/frontend:43122 (node[1234]) -> spiffe://demo.local/ns/99-apps/sa/postgresql:5432 EGRESS UNKNOWN NO_MATCHING_RULE"
        );
        assert_eq!(compact(&f, true), format!("\x1b[1;31m{plain}\x1b[0m"));
    }
}
