//! `flowaudit observe`: prints flow events, one per line, in `compact`
//! (identities and verdict first, violations highlighted on a terminal) or
//! `json` (the PRODUCT.md shape). Source: a running agent's gRPC stream
//! (`--server`; the filters travel to the agent, which sends only what
//! matches), or a JSON-lines file written by `--export-file`
//! (`--input-file`, like `hubble observe --input-file`; the same filters
//! apply here), optionally followed as it grows and across rotations.

use std::cell::Cell;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Args, ValueEnum};
use flowaudit_policy::Verdict;
use tokio_stream::StreamExt;

use crate::export::filter::FilterSet;
use crate::export::filter::arg as filter_arg;
use crate::export::proto;
use crate::export::{convert, grpc};
use crate::flow::{Direction, Endpoint, FlowEvent};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Compact,
    Json,
}

/// Flows printed from the agent when neither `--last`, `--since` nor
/// `--follow` is given (as `hubble observe` does).
pub const DEFAULT_LAST: u64 = 20;

/// What `identity_source` on each end means (shown by `observe --help`).
pub const IDENTITY_SOURCES_HELP: &str = "\
Identity of each end (identity_source, with identity_detail saying why when not ATTESTED):
  ATTESTED  SPIRE's Delegated Identity API attested the socket's own process (by pid,
            SPIRE 1.10.2+), or its pod found from kernel facts (the socket owner's
            cgroup -> pod UID, asked by that pod's selectors). Both ends of a same-node
            connection qualify: the peer's socket is on this node too.
  DERIVED   Reached from an address through the endpoint directory (pods on other
            nodes; the peer of a connection that never established), or an end SPIRE
            did not attest (SPIRE absent or down, no registration entry, no answer in
            time): spiffe://<trust-domain>/ns/<ns>/sa/<sa> from the pod's metadata. An ID
            reached from an address is DERIVED even when SPIRE has an entry for the pod.
  UNKNOWN   Neither SPIRE nor the endpoint directory knows the end.";

#[derive(Debug, Args)]
pub struct ObserveArgs {
    /// The agent's gRPC address: unix:///PATH or HOST:PORT.
    #[arg(long, env = "FLOWAUDIT_SERVER", default_value = grpc::DEFAULT_ADDR, value_name = "ADDR", value_parser = grpc::addr_arg)]
    pub server: String,
    #[command(flatten)]
    pub tls: crate::export::mtls::TlsArgs,
    /// Read flows from this JSON-lines file (as written by `flowaudit agent --export-file`) instead of an agent; `-` reads standard input.
    #[arg(long, value_name = "PATH")]
    pub input_file: Option<PathBuf>,
    /// Keep printing flows as they happen (from a file: as it grows, across rotations).
    #[arg(short, long)]
    pub follow: bool,
    /// Print only the last N matching flows already recorded (then follow, with -f). From an agent, the default without -f is 20.
    #[arg(long, value_name = "N")]
    pub last: Option<u64>,
    /// Only flows since this long ago (30s, 5m, 1h30m, 2d) or this RFC 3339 time.
    #[arg(long, value_name = "DURATION|TIME", value_parser = parse_since)]
    pub since: Option<prost_types::Timestamp>,
    /// Only flows with this verdict: COMPLIANT, VIOLATION, UNKNOWN (repeatable: any of them).
    #[arg(long, value_name = "V", value_parser = |s: &str| enum_value(s, "VERDICT", proto::Verdict::from_str_name))]
    pub verdict: Vec<i32>,
    /// Only flows with this finding: NO_MATCHING_RULE, DENIED_BY_RULE, MTLS_MISSING, MTLS_UNVERIFIED, UNKNOWN_IDENTITY, INTENDED_FLOW_FAILED, IDENTITY_MISMATCH, MUTUAL_AUTH_MISSING, MUTUAL_AUTH_UNENCRYPTED.
    #[arg(long, value_name = "KIND", value_parser = |s: &str| enum_value(s, "FINDING_KIND", proto::FindingKind::from_str_name))]
    pub finding: Vec<i32>,
    /// Source SPIFFE ID glob (`*` one segment, `**` the rest), e.g. 'spiffe://demo.local/ns/99-apps/**'.
    #[arg(long, value_name = "GLOB", value_parser = filter_arg::identity)]
    pub from_identity: Vec<String>,
    /// Destination SPIFFE ID glob.
    #[arg(long, value_name = "GLOB", value_parser = filter_arg::identity)]
    pub to_identity: Vec<String>,
    /// Either end in this namespace.
    #[arg(long, value_name = "NS")]
    pub namespace: Vec<String>,
    /// Source in this namespace.
    #[arg(long, value_name = "NS")]
    pub from_namespace: Vec<String>,
    /// Destination in this namespace.
    #[arg(long, value_name = "NS")]
    pub to_namespace: Vec<String>,
    /// Source pod name prefix, optionally in a namespace: [NS/]PREFIX.
    #[arg(long, value_name = "[NS/]PREFIX", value_parser = filter_arg::pod)]
    pub from_pod: Vec<String>,
    /// Destination pod name prefix: [NS/]PREFIX.
    #[arg(long, value_name = "[NS/]PREFIX", value_parser = filter_arg::pod)]
    pub to_pod: Vec<String>,
    /// Source labels, Kubernetes selector syntax: app=frontend, 'app in (a,b)', '!canary'.
    #[arg(long, value_name = "SELECTOR", value_parser = filter_arg::labels)]
    pub from_label: Vec<String>,
    /// Destination labels, Kubernetes selector syntax.
    #[arg(long, value_name = "SELECTOR", value_parser = filter_arg::labels)]
    pub to_label: Vec<String>,
    /// Destination (server) port.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Vec<u16>,
    /// Only these events: CONNECT, CLOSE, FAILED.
    #[arg(long, value_name = "E", value_parser = |s: &str| enum_value(s, "EVENT_KIND", proto::EventKind::from_str_name))]
    pub event: Vec<i32>,
    /// Only this encryption state: PLAINTEXT, TLS, MTLS, UNKNOWN.
    #[arg(long, value_name = "S", value_parser = |s: &str| enum_value(s, "ENCRYPTION_STATE", proto::EncryptionState::from_str_name))]
    pub encryption: Vec<i32>,
    /// From `flowaudit relay`: one flow per connection seen on two nodes,
    /// its two halves (EGRESS on the client's node, INGRESS on the
    /// server's) joined, each end as its own node attested it. A relay's
    /// work: not with --input-file.
    #[arg(long, conflicts_with = "input_file")]
    pub join: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Compact)]
    pub output: Output,
    /// Colour violations: auto (when stdout is a terminal), always, never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    pub color: String,
}

/// `violation` -> VERDICT_VIOLATION's number; the error lists what is valid.
fn enum_value<E: Copy + Into<i32>>(
    s: &str,
    prefix: &str,
    from: impl Fn(&str) -> Option<E>,
) -> Result<i32, String> {
    let name = format!(
        "{prefix}_{}",
        s.trim().to_ascii_uppercase().replace('-', "_")
    );
    match from(&name) {
        Some(e) if !name.ends_with("_UNSPECIFIED") => Ok(e.into()),
        _ => Err(format!("unknown value `{s}`")),
    }
}

/// `30s`, `5m`, `1h30m`, `2d`, `500ms` ago, or an RFC 3339 time.
pub fn parse_since(s: &str) -> Result<prost_types::Timestamp, String> {
    if let Some(t) = convert::parse_rfc3339(s) {
        return Ok(t);
    }
    let d = parse_duration(s).ok_or_else(|| {
        format!("`{s}` is neither a duration (30s, 5m, 1h30m, 2d) nor an RFC 3339 time (2026-11-28T12:00:00Z)")
    })?;
    let t = SystemTime::now()
        .checked_sub(d)
        .unwrap_or(SystemTime::UNIX_EPOCH)
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Ok(prost_types::Timestamp {
        seconds: i64::try_from(t.as_secs()).unwrap_or(0),
        nanos: t.subsec_nanos() as i32,
    })
}

fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            "d" => Duration::from_secs(n.checked_mul(86_400)?),
            _ => return None,
        };
        total = total.checked_add(unit)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

impl ObserveArgs {
    /// The filter flags as one `FlowFilter` (sent to the agent, or applied
    /// to a file).
    pub fn filter(&self) -> proto::FlowFilter {
        proto::FlowFilter {
            verdict: self.verdict.clone(),
            finding: self.finding.clone(),
            source_identity: self.from_identity.clone(),
            destination_identity: self.to_identity.clone(),
            namespace: self.namespace.clone(),
            source_namespace: self.from_namespace.clone(),
            destination_namespace: self.to_namespace.clone(),
            source_pod: self.from_pod.clone(),
            destination_pod: self.to_pod.clone(),
            source_label: self.from_label.clone(),
            destination_label: self.to_label.clone(),
            port: self.port.iter().map(|&p| u32::from(p)).collect(),
            event: self.event.clone(),
            encryption: self.encryption.clone(),
        }
    }
}

/// Writes flows in the chosen format; a closed stdout (`| head`) ends quietly.
struct Printer {
    output: Output,
    color: bool,
}

impl Printer {
    fn print(&self, flow: &FlowEvent, out: &mut dyn Write) -> std::io::Result<()> {
        match self.output {
            Output::Json => {
                let mut line = Vec::with_capacity(2048);
                crate::flow::json::write_flow(&mut line, flow);
                line.push(b'\n');
                out.write_all(&line)
            }
            Output::Compact => writeln!(out, "{}", compact(flow, self.color)),
        }
    }
}

fn quiet_pipe(r: std::io::Result<()>) -> anyhow::Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

pub fn run(args: &ObserveArgs) -> anyhow::Result<()> {
    let color = match args.color.as_str() {
        "always" => true,
        "never" => false,
        // SAFETY: a libc call with no pointer arguments.
        _ => unsafe { libc::isatty(1) == 1 },
    };
    let printer = Printer {
        output: args.output,
        color,
    };
    // Check the filters here too, so a typo fails before connecting.
    let filter = FilterSet::compile(std::slice::from_ref(&args.filter()), &[])?;
    match &args.input_file {
        Some(path) => run_file(args, path, &filter, &printer, &mut std::io::stdout().lock()),
        None => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(run_server(args, &printer))
        }
    }
}

fn is_empty(f: &proto::FlowFilter) -> bool {
    *f == proto::FlowFilter::default()
}

/// From the agent's stream. With `--follow`, a lost connection (agent
/// restarted) is retried until Ctrl-C, asking for what happened since the
/// last flow printed.
async fn run_server(args: &ObserveArgs, printer: &Printer) -> anyhow::Result<()> {
    let filter = args.filter();
    let mut request = proto::GetFlowsRequest {
        number: match (args.last, &args.since, args.follow) {
            (Some(n), _, _) => n,
            (None, None, false) => DEFAULT_LAST,
            _ => 0,
        },
        follow: args.follow,
        since: args.since,
        allow: if is_empty(&filter) {
            vec![]
        } else {
            vec![filter]
        },
        deny: vec![],
        join: args.join,
    };
    let tls = super::client_tls(&args.tls).await?;
    let mut client = super::connect_server(&args.server, &tls).await?;
    if args.last == Some(0) && !args.follow {
        // The last 0 flows: none, as from a file (the protocol's 0 would
        // ask for the whole buffer).
        return Ok(());
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let mut last_time: Option<prost_types::Timestamp> = None;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut backoff =
        crate::runtime::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let asked_at = tokio::time::Instant::now();
        // The server's answer when it refused the call (not a broken
        // connection): retrying the same request would only be refused again.
        let mut refused = None;
        // A server that takes the connection and never answers (not an
        // agent, or a stuck one) must not hold the command for ever, and
        // Ctrl-C must work meanwhile (its handler is in place).
        let answer = tokio::select! {
            biased;
            _ = &mut ctrl_c => return Ok(()),
            a = tokio::time::timeout(grpc::ANSWER_WAIT, client.get_flows(request.clone())) => a,
        };
        let reason = match answer {
            Err(_) => format!("no answer within {} s", grpc::ANSWER_WAIT.as_secs()),
            Ok(Err(status)) => {
                refused = refuses_for_good(&status);
                super::call_error(&status)
            }
            Ok(Ok(response)) => {
                let mut stream = response.into_inner();
                loop {
                    let next = tokio::select! {
                        biased;
                        _ = &mut ctrl_c => {
                            let _ = out.flush();
                            return Ok(());
                        }
                        m = stream.next() => m,
                        // Nothing ready right now: push out what is printed.
                        _ = std::future::ready(()) => {
                            if !quiet_pipe(out.flush())? {
                                return Ok(());
                            }
                            tokio::select! {
                                _ = &mut ctrl_c => return Ok(()),
                                m = stream.next() => m,
                            }
                        }
                    };
                    match next {
                        Some(Ok(r)) => match r.response {
                            Some(proto::get_flows_response::Response::Flow(f)) => {
                                last_time = f.time;
                                match convert::flow_from_proto(f) {
                                    Ok(flow) => {
                                        if !quiet_pipe(printer.print(&flow, &mut out))? {
                                            return Ok(());
                                        }
                                    }
                                    Err(e) => eprintln!(
                                        "flowaudit observe: skipping a flow the agent sent malformed: {}",
                                        super::printable(&e.to_string())
                                    ),
                                }
                            }
                            Some(proto::get_flows_response::Response::LostEvents(l)) => {
                                let _ = out.flush();
                                eprintln!("flowaudit observe: {}", super::printable(&l.message));
                            }
                            Some(proto::get_flows_response::Response::NodeStatus(n)) => {
                                let _ = out.flush();
                                eprintln!("flowaudit observe: {}", node_status_line(&n));
                            }
                            None => {}
                        },
                        Some(Err(status)) => {
                            refused = refuses_for_good(&status);
                            break super::printable(status.message()).into_owned();
                        }
                        None => break "the agent ended the stream".to_owned(),
                    }
                }
            }
        };
        let _ = out.flush();
        if !args.follow {
            if reason == "the agent ended the stream" {
                return Ok(());
            }
            anyhow::bail!("the stream from {} failed: {reason}", args.server);
        }
        if let Some(code) = refused {
            anyhow::bail!(
                "{} refused the stream ({code:?}: {reason}); asking again would not change that",
                args.server
            );
        }
        eprintln!(
            "flowaudit observe: lost the connection to {} ({reason}); reconnecting",
            args.server
        );
        // Resume after the last flow printed (or from now): a restarted
        // agent's buffer has what happened meanwhile.
        request.number = 0;
        request.since = Some(match last_time {
            Some(t) if t.nanos < 999_999_999 => prost_types::Timestamp {
                seconds: t.seconds,
                nanos: t.nanos + 1,
            },
            Some(t) => prost_types::Timestamp {
                seconds: t.seconds + 1,
                nanos: 0,
            },
            None => parse_since("0s").unwrap_or_default(),
        });
        // A stream refused or ended at once (a server at its subscriber
        // limit, one that restarts in a loop) is asked again ever more
        // slowly, up to every 5 s.
        let mut delay = backoff.next(Some(asked_at.elapsed()));
        client = loop {
            tokio::select! {
                _ = &mut ctrl_c => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
            let connected = tokio::select! {
                biased;
                _ = &mut ctrl_c => return Ok(()),
                c = grpc::connect_tls(&args.server, &tls) => c,
            };
            match connected {
                Ok(c) => break c,
                Err(_) => delay = backoff.next(None),
            }
        };
        eprintln!("flowaudit observe: reconnected to {}", args.server);
    }
}

/// The code of a refusal that asking again cannot change (a request the
/// server cannot take, a client it does not allow, a server that is no
/// flowaudit agent or relay); None for what may pass (the server stopping,
/// a broken connection, a full subscriber list).
fn refuses_for_good(status: &tonic::Status) -> Option<tonic::Code> {
    use tonic::Code;
    matches!(
        status.code(),
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
    )
    .then(|| status.code())
}

/// One line for a relay's node status notice.
pub fn node_status_line(n: &proto::NodeStatusEvent) -> String {
    let state = match proto::NodeState::try_from(n.state) {
        Ok(proto::NodeState::Connected) => "connected",
        Ok(proto::NodeState::Unavailable) => "unavailable",
        Ok(proto::NodeState::Gone) => "gone",
        Ok(proto::NodeState::Back) => "back",
        Ok(proto::NodeState::Connecting) => "connecting",
        _ => "in an unknown state",
    };
    let mut line = format!(
        "node {} ({}) {state}",
        super::printable(&n.node_name),
        super::printable(&n.address)
    );
    if !n.message.is_empty() {
        line.push_str(": ");
        line.push_str(&super::printable(&n.message));
    }
    line
}

fn run_file(
    args: &ObserveArgs,
    input: &std::path::Path,
    filter: &FilterSet,
    printer: &Printer,
    mut out: &mut dyn Write,
) -> anyhow::Result<()> {
    let since = args.since.as_ref().map(convert::flow_time);
    let name = if input.as_os_str() == "-" {
        "standard input".to_owned()
    } else {
        input.display().to_string()
    };
    // Lines of the file now read (from 1 again after a rotation), and how
    // many were flows and how many were skipped, over the whole run.
    let (lineno, flows, skipped) = (Cell::new(0u64), Cell::new(0u64), Cell::new(0u64));
    // Some(flow) when the line is a flow that passes the filters.
    let parse = |line: &str| -> Option<FlowEvent> {
        lineno.set(lineno.get() + 1);
        // A byte order mark (an editor's) before the first line.
        let line = match lineno.get() {
            1 => line.strip_prefix('\u{feff}').unwrap_or(line),
            _ => line,
        };
        match serde_json::from_str::<FlowEvent>(line) {
            Ok(flow) => {
                flows.set(flows.get() + 1);
                (filter.matches(&flow) && since.is_none_or(|s| flow.time >= s)).then_some(flow)
            }
            Err(e) if !line.trim().is_empty() => {
                skipped.set(skipped.get() + 1);
                // serde_json places it in the line (always line 1 of it):
                // the file's line is said instead, with the column.
                let mut why = e.to_string();
                if let Some(at) = why.rfind(" at line ") {
                    why.truncate(at);
                }
                eprintln!(
                    "flowaudit observe: {}:{}:{}: skipping a line that is not a flow event: {}",
                    super::printable(&name),
                    lineno.get(),
                    e.column(),
                    super::printable(&why)
                );
                None
            }
            Err(_) => None,
        }
    };
    let emit = |line: &str, out: &mut dyn Write| -> anyhow::Result<bool> {
        match parse(line) {
            Some(flow) => quiet_pipe(printer.print(&flow, out)),
            None => Ok(true),
        }
    };
    // Without --follow: lines that were all something else are an error
    // (the wrong file), not an empty answer.
    let none_read = || -> anyhow::Result<()> {
        if flows.get() == 0 && skipped.get() > 0 {
            anyhow::bail!(
                "no flow events in {name}: its {} non-empty lines are not flow events (JSON lines as `flowaudit agent --export-file` writes them)",
                skipped.get()
            );
        }
        Ok(())
    };
    // A read that fails (not text, a directory) names the file and line.
    let unreadable = |e: std::io::Error| {
        anyhow::anyhow!(
            "cannot read {}{}: {e}",
            super::printable(&name),
            match lineno.get() {
                0 => String::new(),
                n => format!(" after line {n}"),
            }
        )
    };
    if input.as_os_str() == "-" {
        for line in std::io::stdin().lock().lines() {
            if !emit(&line.map_err(unreadable)?, &mut out)? {
                return Ok(());
            }
        }
        return none_read();
    }
    let open = || {
        std::fs::File::open(input)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", input.display()))
    };
    let mut reader = BufReader::new(open()?);
    let mut existing: Vec<FlowEvent> = Vec::new();
    let mut line = String::new();
    while reader.read_line(&mut line).map_err(unreadable)? > 0 {
        // A last line with no newline is a whole one when the file is
        // read once; with --follow it may be one still being written,
        // which following picks up.
        if line.ends_with('\n') || !args.follow {
            existing.extend(parse(&line));
            line.clear();
        } else {
            break;
        }
    }
    let last = args.last.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let skip = last.map_or(0, |n| existing.len().saturating_sub(n));
    for f in &existing[skip..] {
        if !quiet_pipe(printer.print(f, &mut out))? {
            return Ok(());
        }
    }
    out.flush()?;
    if !args.follow {
        return none_read();
    }
    let mut inode = inode_of(input);
    // Once the file was found rotated away: whether lines came from the
    // old file since the last wait.
    let mut rotated: Option<bool> = None;
    loop {
        let n = reader.read_line(&mut line).map_err(unreadable)?;
        if n > 0 && line.ends_with('\n') {
            if !emit(&line, &mut out)? {
                return Ok(());
            }
            line.clear();
            if rotated.is_some() {
                rotated = Some(true);
            }
            continue;
        }
        if !quiet_pipe(out.flush())? {
            return Ok(());
        }
        match rotated {
            // The old file takes lines for a moment after its rename (the
            // agent's writer goes on until the rotation is done): it is
            // read to its end until a wait brings nothing more, then the
            // next one from its start.
            Some(false) => {
                if !line.is_empty() {
                    // A line the writer never finished: said and skipped.
                    if !emit(&line, &mut out)? {
                        return Ok(());
                    }
                    line.clear();
                }
                // The next file is the one rotated away after it, when
                // the file rotated again meanwhile, else the file at `input`.
                match rotated_after(input, inode_of_file(reader.get_ref())) {
                    Some(next) => {
                        reader = BufReader::new(next);
                        lineno.set(0);
                        rotated = Some(true);
                    }
                    None => {
                        reader = BufReader::new(open()?);
                        lineno.set(0);
                        // The file now read (the path may have moved on again).
                        inode = inode_of_file(reader.get_ref());
                        rotated = None;
                    }
                }
            }
            Some(true) => {
                rotated = Some(false);
                std::thread::sleep(FOLLOW_POLL);
            }
            None => {
                // At the end: wait, then check whether the file was rotated away.
                std::thread::sleep(FOLLOW_POLL);
                let now = inode_of(input);
                if now.is_some() && now != inode {
                    rotated = Some(true);
                }
            }
        }
    }
}

/// How often `observe -f --input-file` looks for more lines at the end of
/// the file, and whether it was rotated.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// Backups looked at, at most, for the file being read.
const BACKUPS_LOOKED_AT: u32 = 100_000;

/// The backup of `input` (`INPUT.1`, `INPUT.2`, ...) rotated away right
/// after the file `ours` (an inode), opened: there is one when the file
/// rotated more than once while observe read the older ones. `None` when
/// `ours` is `INPUT.1` or not among them (deleted: no backups kept, or the
/// oldest); the file at `input` is next then.
fn rotated_after(input: &Path, ours: Option<u64>) -> Option<std::fs::File> {
    let mut newer = None;
    for n in 1..=BACKUPS_LOOKED_AT {
        let mut p = input.as_os_str().to_owned();
        p.push(format!(".{n}"));
        let f = std::fs::File::open(&p).ok()?;
        if inode_of_file(&f) == ours {
            return newer;
        }
        newer = Some(f);
    }
    None
}

fn inode_of(p: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| m.ino())
}

fn inode_of_file(f: &std::fs::File) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    f.metadata().ok().map(|m| m.ino())
}

/// How an end is named: its SPIFFE ID, else namespace/pod, else its address;
/// then the process when this node saw it.
fn end(ep: &Endpoint, ip: std::net::IpAddr, port: Option<u16>) -> String {
    let mut s = if !ep.spiffe_id.is_empty() {
        ep.spiffe_id.to_string()
    } else if !ep.pod.pod_name.is_empty() {
        format!("{}/{}", ep.pod.namespace, ep.pod.pod_name)
    } else if ep.kind == crate::flow::EndKind::World {
        format!("world({ip})")
    } else if ep.kind == crate::flow::EndKind::Host {
        format!("host({ip})")
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
    let full = f.time.rfc3339();
    let time = full.get(11..23).unwrap_or(&full);
    let src = end(
        &f.source,
        f.l4.source_ip,
        (f.direction == Direction::Egress || f.source.pod.pod_name.is_empty())
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
    let enc = &f.encryption;
    if !enc.tls_version.is_empty() {
        let inferred = if enc.client_certificate_inferred {
            ",client-cert-inferred"
        } else {
            ""
        };
        line.push_str(&format!("({}{inferred})", enc.tls_version));
    } else if !enc.protocol.is_empty() {
        line.push_str(&format!("({})", enc.protocol));
    }
    if let Some(m) = &f.mutual_auth {
        // What Cilium's auth map said, e.g. `cilium-auth=AUTHENTICATED(ENCRYPTED)`.
        line.push_str(&format!(
            " cilium-auth={}({})",
            m.state.as_str(),
            m.path_encryption.as_str()
        ));
    }
    if let Some(j) = &f.joined {
        // From a relay with --join: which node saw which half, e.g.
        // `joined=worker>worker2` (client's node > server's node).
        let node = |d: Direction| {
            j.halves
                .iter()
                .find(|h| h.direction == d)
                .map_or("?", |h| h.node_name.as_str())
        };
        match j.halves.as_slice() {
            [_, _] => line.push_str(&format!(
                " joined={}>{}",
                node(Direction::Egress),
                node(Direction::Ingress)
            )),
            [one] => line.push_str(&format!(
                " joined={}:{}-only",
                one.node_name,
                one.direction.as_str()
            )),
            _ => {}
        }
    }
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
    // Everything above may come from the wire; only our colour may drive the terminal.
    let line = super::printable(&line);
    if color && f.verdict == Verdict::Violation {
        format!("\x1b[1;31m{line}\x1b[0m")
    } else if color && f.verdict == Verdict::Unknown && !f.findings.is_empty() {
        format!("\x1b[33m{line}\x1b[0m")
    } else {
        line.into_owned()
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
            &"n1".into(),
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

    #[test]
    fn compact_line_names_the_nodes_of_a_joined_flow() {
        let half = |direction, node: &str| crate::flow::JoinedHalf {
            direction,
            node_name: node.into(),
            time: "2026-11-28T12:00:01.123456789Z".into(),
            verdict: Verdict::Compliant,
            findings: vec![],
            source_identity: flowaudit_policy::IdentitySource::Attested,
            destination_identity: flowaudit_policy::IdentitySource::Attested,
            bytes_sent: 0,
            bytes_received: 0,
            encryption: flowaudit_policy::EncryptionState::Unknown,
            cookie: 1,
        };
        let mut f = flow();
        f.joined = Some(Box::new(crate::flow::Joined {
            halves: vec![
                half(Direction::Egress, "worker"),
                half(Direction::Ingress, "worker2"),
            ],
        }));
        assert!(
            compact(&f, false).contains(" EGRESS UNKNOWN joined=worker>worker2 sent="),
            "{}",
            compact(&f, false)
        );
        f.joined = Some(Box::new(crate::flow::Joined {
            halves: vec![half(Direction::Ingress, "worker2")],
        }));
        assert!(
            compact(&f, false).contains(" joined=worker2:INGRESS-only "),
            "{}",
            compact(&f, false)
        );
    }

    #[test]
    fn since_parses_durations_and_times_and_rejects_the_rest_without_panicking() {
        let t = parse_since("2026-11-28T12:00:00+01:00").expect("an RFC 3339 time");
        assert_eq!(
            t.seconds,
            parse_since("2026-11-28T11:00:00Z").unwrap().seconds
        );
        assert!(parse_since("5m").is_ok());
        for bad in [
            "2026-11-28T12:00:00+0é:0", // a multi-byte character across the offset's colon
            "2026-11-28T12:00:00+é0:00",
            "2026-11-28T12:00:00é",
            "2026-11-28T12:00:00.é",
            "2026-11-28T12:é0:00Z",
            "é026-11-28T12:00:00Z",
            "2026-11-28T12:00:00+01:0é",
            "1é",
            "é",
            "9999999999999999999999d",
            "18446744073709551615d",
        ] {
            let e = parse_since(bad).expect_err(bad);
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn compact_line_escapes_hostile_strings_from_the_wire() {
        let mut f = flow();
        f.event = crate::flow::EventKind::Connect;
        f.verdict = Verdict::Violation;
        // The time is written from integers: nothing hostile can hide in it.
        f.time = "2026-11-28T12:00:01.123Z".into();
        // A comm that hides the lines after it, a pod name that rewrites the
        // line, a SPIFFE ID that reverses itself, a protocol that rings.
        f.source.process = Some("node\x1b[8m".into());
        f.source.spiffe_id = "spiffe://demo.local/ns/a/sa/\u{202e}dnetnorf".into();
        let pod = f.destination.pod.make_mut();
        pod.namespace = "99-apps".into();
        pod.pod_name = "db\r\x1b[1Aok\u{9b}".into();
        std::sync::Arc::make_mut(&mut f.encryption).state =
            flowaudit_policy::EncryptionState::Plaintext;
        std::sync::Arc::make_mut(&mut f.encryption).protocol = "pg\x07\n".into();
        f.findings.push(crate::flow::Finding {
            kind: FindingKind::NoMatchingRule,
            message: "x\x1b]0;owned\x07".into(),
        });
        let plain = compact(&f, false);
        assert_eq!(
            plain,
            "12:00:01.123 VIOLATION CONNECT spiffe://demo.local/ns/a/sa/\\u{202e}dnetnorf:43122 (node\\x1b[8m[1234]) -> 99-apps/db\\x0d\\x1b[1Aok\\u{9b}:5432 EGRESS PLAINTEXT(pg\\x07\\x0a) NO_MATCHING_RULE"
        );
        // Only the colour we add is a control sequence.
        let colored = compact(&f, true);
        assert_eq!(colored, format!("\x1b[1;31m{plain}\x1b[0m"));
    }

    #[test]
    fn compact_line_names_the_tls_version_or_plaintext_protocol() {
        let mut f = flow();
        f.event = crate::flow::EventKind::Connect;
        std::sync::Arc::make_mut(&mut f.encryption).state = flowaudit_policy::EncryptionState::Mtls;
        std::sync::Arc::make_mut(&mut f.encryption).tls_version = "TLS1.3".into();
        std::sync::Arc::make_mut(&mut f.encryption).client_certificate_inferred = true;
        assert!(
            compact(&f, false).contains(" EGRESS MTLS(TLS1.3,client-cert-inferred)"),
            "{}",
            compact(&f, false)
        );
        f.encryption = Default::default();
        std::sync::Arc::make_mut(&mut f.encryption).state =
            flowaudit_policy::EncryptionState::Plaintext;
        std::sync::Arc::make_mut(&mut f.encryption).protocol = "postgresql".into();
        assert!(
            compact(&f, false).ends_with(" EGRESS PLAINTEXT(postgresql)"),
            "{}",
            compact(&f, false)
        );
    }

    #[derive(clap::Parser)]
    struct ObserveArgsCli {
        #[command(flatten)]
        args: ObserveArgs,
    }

    /// `observe` as parsed from its command line.
    fn observe_args(args: &[&str]) -> ObserveArgs {
        <ObserveArgsCli as clap::Parser>::try_parse_from(
            std::iter::once("observe").chain(args.iter().copied()),
        )
        .unwrap()
        .args
    }

    /// PRODUCT.md's example event, as the contract writes it (no `socket`).
    const CONTRACT_EVENT: &str = r#"{"time":"2026-11-28T12:00:01.123456789Z","node_name":"precinct-99-worker","event":"CONNECT","verdict":"VIOLATION","findings":[{"kind":"NO_MATCHING_RULE","message":"no rule allows frontend -> postgresql:5432"}],"policy_rule":"","l4":{"protocol":"TCP","source_ip":"10.244.1.5","source_port":43122,"destination_ip":"10.244.1.9","destination_port":5432},"source":{"spiffe_id":"spiffe://demo.local/ns/99-apps/sa/frontend","identity_source":"ATTESTED","namespace":"99-apps","pod_name":"frontend-7d9f","service_account":"frontend","labels":{"app":"frontend"},"pid":1234,"process":"node"},"destination":{"spiffe_id":"spiffe://demo.local/ns/99-apps/sa/postgresql","identity_source":"DERIVED","namespace":"99-apps","pod_name":"postgresql-0","service_account":"postgresql","labels":{"app":"postgresql"}},"direction":"EGRESS","encryption":{"state":"PLAINTEXT","tls_version":"","sni":"","alpn":[]},"bytes_sent":0,"bytes_received":0,"duration_ms":0,"summary":"frontend -> postgresql:5432 plaintext: no rule allows this flow"}"#;

    #[test]
    fn input_files_in_the_contracts_json_form_are_read_and_other_files_are_an_error() {
        let f: FlowEvent = serde_json::from_str(CONTRACT_EVENT).unwrap();
        assert_eq!(f.source.pod.pod_name.as_str(), "frontend-7d9f");
        assert_eq!(f.l4.destination_port, 5432);
        assert_eq!(f.socket, crate::flow::Socket::default());
        let dir = std::env::temp_dir().join(format!("fa-observe-input-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.jsonl");
        std::fs::write(&good, format!("not a flow\n{CONTRACT_EVENT}\n")).unwrap();
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, "not a flow\n{}\n\n").unwrap();
        let join = <ObserveArgsCli as clap::Parser>::try_parse_from([
            "observe",
            "--input-file",
            "x",
            "--join",
        ]);
        assert!(
            join.is_err_and(|e| e.to_string().contains("cannot be used with")),
            "--join takes a relay, not a file"
        );
        let good_run = run(&observe_args(&["--input-file", good.to_str().unwrap()]));
        let bad_run = run(&observe_args(&["--input-file", bad.to_str().unwrap()]));
        let _ = std::fs::remove_dir_all(&dir);
        good_run.unwrap();
        let e = bad_run.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "no flow events in {}: its 2 non-empty lines",
                bad.display()
            )),
            "{e}"
        );
    }

    /// A file read once: its last line counts without a newline, a byte
    /// order mark does not hide the first, and a read that fails names
    /// the file.
    #[test]
    fn an_input_file_is_read_to_its_last_byte_and_its_failures_are_named() {
        let dir = flowaudit_tests::support::TestDir::new("fa-observe-edges");
        let second = CONTRACT_EVENT.replace("43122", "43123");
        let printed = |path: &Path| {
            let args = observe_args(&["--input-file", path.to_str().unwrap(), "-o", "json"]);
            let filter = FilterSet::compile(std::slice::from_ref(&args.filter()), &[]).unwrap();
            let printer = Printer {
                output: args.output,
                color: false,
            };
            let mut out = Vec::new();
            run_file(&args, path, &filter, &printer, &mut out).map(|()| {
                String::from_utf8(out)
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str::<FlowEvent>(l).unwrap().l4.source_port)
                    .collect::<Vec<u16>>()
            })
        };
        let no_newline = dir.path().join("no-newline.jsonl");
        std::fs::write(&no_newline, format!("{CONTRACT_EVENT}\n{second}")).unwrap();
        assert_eq!(printed(&no_newline).unwrap(), [43122, 43123]);
        let bom = dir.path().join("bom.jsonl");
        std::fs::write(&bom, format!("\u{feff}{CONTRACT_EVENT}\n{second}\n")).unwrap();
        assert_eq!(printed(&bom).unwrap(), [43122, 43123]);
        let e = printed(dir.path()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "cannot read {}: Is a directory (os error 21)",
                dir.path().display()
            )
        );
        let binary = dir.path().join("binary.jsonl");
        std::fs::write(&binary, b"{CONTRACT}\n\xff\xfe\n").unwrap();
        let e = printed(&binary).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot read {} after line 1: ", binary.display())),
            "{e}"
        );
    }

    #[test]
    fn a_server_that_never_answers_ends_observe_with_an_error() {
        // The kernel completes the handshake from the backlog; nobody reads.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap().to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        let args = observe_args(&["--server", &server]);
        std::thread::spawn(move || {
            let _ = tx.send(run(&args).map_err(|e| e.to_string()));
        });
        let ended = rx
            .recv_timeout(grpc::ANSWER_WAIT * 4)
            .expect("observe still waits on a server that never answers");
        drop(listener);
        let e = ended.unwrap_err();
        assert!(
            e.contains(&format!("the stream from {server} failed")) && e.contains("within 10 s"),
            "{e}"
        );
    }

    /// A server that refuses the call ends `observe -f` at once with its
    /// answer (it asked again 5 times a second, for ever), once per kind of
    /// refusal that asking again cannot change.
    #[test]
    fn a_stream_refused_for_good_ends_observe_follow_with_the_refusal() {
        use crate::export::proto::flow_audit_server::{FlowAudit, FlowAuditServer};
        use std::sync::atomic::{AtomicU32, Ordering};
        struct Refusing(tonic::Code, Arc<AtomicU32>);
        #[tonic::async_trait]
        impl FlowAudit for Refusing {
            type GetFlowsStream = grpc::FlowResponseStream;
            async fn get_flows(
                &self,
                _: tonic::Request<proto::GetFlowsRequest>,
            ) -> Result<tonic::Response<Self::GetFlowsStream>, tonic::Status> {
                self.1.fetch_add(1, Ordering::SeqCst);
                Err(tonic::Status::new(self.0, "not for you"))
            }
            async fn server_status(
                &self,
                _: tonic::Request<proto::ServerStatusRequest>,
            ) -> Result<tonic::Response<proto::ServerStatusResponse>, tonic::Status> {
                Err(tonic::Status::unimplemented("no status here"))
            }
        }
        use std::sync::Arc;
        let rt = tokio::runtime::Runtime::new().unwrap();
        for code in [tonic::Code::PermissionDenied, tonic::Code::Unimplemented] {
            let calls = Arc::new(AtomicU32::new(0));
            let listener = rt
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            let server = listener.local_addr().unwrap().to_string();
            let service = FlowAuditServer::new(Refusing(code, calls.clone()));
            rt.spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            let (tx, rx) = std::sync::mpsc::channel();
            let args = observe_args(&["--server", &server, "-f"]);
            std::thread::spawn(move || {
                let _ = tx.send(run(&args).map_err(|e| e.to_string()));
            });
            let ended = rx.recv_timeout(grpc::ANSWER_WAIT * 2).unwrap_or_else(|_| {
                panic!("observe -f still asks a server that refuses ({code:?})")
            });
            assert_eq!(
                ended.unwrap_err(),
                format!(
                    "{server} refused the stream ({code:?}: not for you); asking again would not change that"
                )
            );
            assert_eq!(calls.load(Ordering::SeqCst), 1, "asked once");
        }
    }
}
