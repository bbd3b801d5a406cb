//! Item 3: capture completeness under a connection storm. The agent
//! (writing an export file), libbpf-tools `tcplife` (on the host) and
//! `conntrack -E` (in the server pod, where an nftables `ct state` rule
//! turns connection tracking on) watch the same storm; afterwards each
//! tool's records are matched against the 4-tuples the generator completed.
//! A tool that cannot run here is reported as such, never as 0%.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::env::{self, BenchAgent, BenchNode, HostProcess, STORM_PORTS, Tracefs};
use crate::report::BenchResult;
use crate::traffic::StormSummary;
use crate::{Ctx, Watcher, pinned_client_args, storm_client_args};

/// The connections the generator completed, by (client port, server port).
struct Expected {
    index: HashMap<(u16, u16), usize>,
    client_ip: Ipv4Addr,
    server_ip: Ipv4Addr,
}

impl Expected {
    fn load(path: &Path, client_ip: Ipv4Addr, server_ip: Ipv4Addr) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read the completed connections {}", path.display()))?;
        let mut index = HashMap::new();
        for (no, line) in text.lines().enumerate() {
            let mut it = line.split_whitespace().map(str::parse::<u16>);
            let (Some(Ok(c)), Some(Ok(s))) = (it.next(), it.next()) else {
                bail!(
                    "{}:{}: not \"client_port server_port\": {line:?}",
                    path.display(),
                    no + 1
                );
            };
            let n = index.len();
            if index.insert((c, s), n).is_some() {
                // Records are matched by 4-tuple: two connections on one
                // would count as one.
                bail!(
                    "{}:{}: the generator used the 4-tuple {c} -> {s} twice in one run",
                    path.display(),
                    no + 1
                );
            }
        }
        Ok(Self {
            index,
            client_ip,
            server_ip,
        })
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    /// The connection a (source, destination) pair names, either way round.
    fn find(&self, a: (Ipv4Addr, u16), b: (Ipv4Addr, u16)) -> Option<(usize, bool)> {
        if a.0 == self.client_ip && b.0 == self.server_ip {
            self.index.get(&(a.1, b.1)).map(|i| (*i, true))
        } else if a.0 == self.server_ip && b.0 == self.client_ip {
            self.index.get(&(b.1, a.1)).map(|i| (*i, false))
        } else {
            None
        }
    }
}

const CONNECT_EGRESS: u8 = 1;
const CONNECT_INGRESS: u8 = 2;
const CLOSE_EGRESS: u8 = 4;
const CLOSE_INGRESS: u8 = 8;
const ALL_FOUR: u8 = 15;

#[derive(Deserialize)]
struct ExportLine<'a> {
    #[serde(borrow)]
    event: &'a str,
    #[serde(borrow)]
    direction: &'a str,
    #[serde(borrow)]
    l4: ExportL4<'a>,
    #[serde(borrow)]
    source: ExportEnd<'a>,
    #[serde(borrow)]
    destination: ExportEnd<'a>,
}

#[derive(Deserialize)]
struct ExportEnd<'a> {
    #[serde(borrow)]
    identity_source: &'a str,
}

/// The ends of the storm's flow events in the export file, by identity
/// source: with SPIRE every end is a pod on this node whose socket the
/// agent saw, so all should be ATTESTED; DERIVED ones are the fallback.
#[derive(Debug, Default)]
pub struct IdentityTally {
    pub attested: u64,
    pub derived: u64,
    pub unknown: u64,
}

impl IdentityTally {
    fn add(&mut self, source: &str) {
        match source {
            "ATTESTED" => self.attested += 1,
            "DERIVED" => self.derived += 1,
            _ => self.unknown += 1,
        }
    }

    pub fn text(&self) -> String {
        format!(
            "flow ends by identity source: ATTESTED {}, DERIVED {}, UNKNOWN {}",
            self.attested, self.derived, self.unknown
        )
    }
}

#[derive(Deserialize)]
struct ExportL4<'a> {
    #[serde(borrow)]
    source_ip: &'a str,
    source_port: u16,
    #[serde(borrow)]
    destination_ip: &'a str,
    destination_port: u16,
}

/// Per connection, which of its four flowaudit events the export file
/// holds; and the identity sources of their ends.
fn count_flowaudit(path: &Path, exp: &Expected) -> Result<(Vec<u8>, IdentityTally)> {
    let mut seen = vec![0u8; exp.len()];
    let mut ids = IdentityTally::default();
    for file in with_backups(path) {
        count_flowaudit_file(&file, exp, &mut seen, &mut ids)?;
    }
    Ok((seen, ids))
}

/// `count_flowaudit` of one of the export's files.
fn count_flowaudit_file(
    path: &Path,
    exp: &Expected,
    seen: &mut [u8],
    ids: &mut IdentityTally,
) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        let Ok(e) = serde_json::from_str::<ExportLine>(&line) else {
            continue;
        };
        let (Ok(src), Ok(dst)) = (
            e.l4.source_ip.parse::<Ipv4Addr>(),
            e.l4.destination_ip.parse::<Ipv4Addr>(),
        ) else {
            continue;
        };
        // Flow events name the client as source whichever side saw them.
        let Some((i, true)) = exp.find((src, e.l4.source_port), (dst, e.l4.destination_port))
        else {
            continue;
        };
        let bit = match (e.event, e.direction) {
            ("CONNECT", "EGRESS") => CONNECT_EGRESS,
            ("CONNECT", "INGRESS") => CONNECT_INGRESS,
            ("CLOSE", "EGRESS") => CLOSE_EGRESS,
            ("CLOSE", "INGRESS") => CLOSE_INGRESS,
            _ => 0,
        };
        seen[i] |= bit;
        ids.add(e.source.identity_source);
        ids.add(e.destination.identity_source);
    }
    Ok(())
}

/// Per connection: bit 1 client socket reported, bit 2 server socket.
fn count_tcplife(path: &Path, exp: &Expected) -> Result<Vec<u8>> {
    let mut seen = vec![0u8; exp.len()];
    let text = std::fs::read_to_string(path)?;
    for line in text.lines() {
        // PID COMM LADDR LPORT RADDR RPORT TX_KB RX_KB MS; COMM may hold spaces.
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 9 {
            continue;
        }
        let n = f.len();
        let (Ok(la), Ok(lp), Ok(ra), Ok(rp)) = (
            f[n - 7].parse::<Ipv4Addr>(),
            f[n - 6].parse::<u16>(),
            f[n - 5].parse::<Ipv4Addr>(),
            f[n - 4].parse::<u16>(),
        ) else {
            continue;
        };
        if let Some((i, client_side)) = exp.find((la, lp), (ra, rp)) {
            seen[i] |= if client_side { 1 } else { 2 };
        }
    }
    Ok(seen)
}

/// Per connection: 1 when conntrack printed its NEW event.
fn count_conntrack(path: &Path, exp: &Expected) -> Result<Vec<u8>> {
    let mut seen = vec![0u8; exp.len()];
    let text = std::fs::read_to_string(path)?;
    for line in text.lines() {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(str::to_owned)
        };
        let (Some(src), Some(dst), Some(sport), Some(dport)) = (
            field("src="),
            field("dst="),
            field("sport="),
            field("dport="),
        ) else {
            continue;
        };
        let (Ok(src), Ok(dst), Ok(sport), Ok(dport)) = (
            src.parse::<Ipv4Addr>(),
            dst.parse::<Ipv4Addr>(),
            sport.parse::<u16>(),
            dport.parse::<u16>(),
        ) else {
            continue;
        };
        if let Some((i, true)) = exp.find((src, sport), (dst, dport)) {
            seen[i] = 1;
        }
    }
    Ok(seen)
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// `p` and its rotated backups `p.1`, `p.2`, ... (those that exist): the
/// export file's lines, whatever rotation did with them.
fn with_backups(p: &Path) -> Vec<PathBuf> {
    let mut all = vec![p.to_path_buf()];
    for n in 1.. {
        let mut b = p.as_os_str().to_owned();
        b.push(format!(".{n}"));
        let b = PathBuf::from(b);
        if !b.exists() {
            break;
        }
        all.push(b);
    }
    all
}

/// Bytes in `p` and its rotated backups.
fn len_with_backups(p: &Path) -> u64 {
    with_backups(p).iter().map(|f| file_len(f)).sum()
}

/// Waits until every file stopped growing for `quiet` (at most `limit`).
fn wait_quiet(files: &[&Path], quiet: Duration, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut last: Vec<u64> = files.iter().map(|f| len_with_backups(f)).collect();
    let mut since = Instant::now();
    while Instant::now() < deadline {
        env::sleep(Duration::from_millis(250))?;
        let now: Vec<u64> = files.iter().map(|f| len_with_backups(f)).collect();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return Ok(());
        }
    }
    Ok(())
}

/// `tcplife` on the host, output to a file; Err(reason) when it cannot
/// attach on this kernel.
fn start_tcplife(dir: &Path) -> std::result::Result<(HostProcess, PathBuf, PathBuf), String> {
    let Some(bin) = env::on_path("tcplife") else {
        return Err("tcplife is not installed (Debian package libbpf-tools)".into());
    };
    let out = dir.join("tcplife.out");
    let err = dir.join("tcplife.err");
    let mut cmd = Command::new(bin);
    cmd.arg("-4")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).map_err(|e| e.to_string())?)
        .stderr(std::fs::File::create(&err).map_err(|e| e.to_string())?);
    let mut p = HostProcess::spawn(cmd, "tcplife").map_err(|e| format!("{e:#}"))?;
    // Attached once its tracepoint link and perf-buffer epoll exist (its
    // header line sits in a full stdout buffer, so it cannot be waited for).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(Ok(Some(status))) = p.child.as_mut().map(Child::try_wait) {
            p.child = None;
            let why = std::fs::read_to_string(&err).unwrap_or_default();
            return Err(format!(
                "tcplife exited at start ({status}): {}",
                why.trim().replace('\n', "; ")
            ));
        }
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", p.pid()))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .map(|l| l.display().to_string())
                    .collect()
            })
            .unwrap_or_default();
        if fds.iter().any(|l| l.contains("bpf_link")) && fds.iter().any(|l| l.contains("eventpoll"))
        {
            return Ok((p, out, err));
        }
        if Instant::now() > deadline {
            return Err("tcplife did not attach within 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// nftables `ct state` rule in the server pod (so conntrack tracks there),
/// then `conntrack -E -e NEW` in that pod. Err(reason) when it cannot run.
fn start_conntrack(
    node: &BenchNode,
    dir: &Path,
) -> std::result::Result<(flowaudit_tests::simnode::PodProcess, PathBuf, PathBuf), String> {
    let pod_cmd = |prog: &str, args: &[&str]| -> std::result::Result<(), String> {
        let mut c = Command::new(prog);
        c.args(args);
        let out = node.server.output(c).map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "{prog} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    };
    pod_cmd("nft", &["add", "table", "inet", "fabench"])?;
    pod_cmd(
        "nft",
        &[
            "add",
            "chain",
            "inet",
            "fabench",
            "input",
            "{ type filter hook input priority 0; policy accept; }",
        ],
    )?;
    pod_cmd(
        "nft",
        &[
            "add",
            "rule",
            "inet",
            "fabench",
            "input",
            "ct",
            "state",
            "established,related",
            "accept",
        ],
    )?;
    // Entries leave the table 1 s after the close instead of 120 s, so a
    // storm of a few hundred thousand connections never fills it.
    pod_cmd(
        "sysctl",
        &["-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1"],
    )?;
    let out = dir.join("conntrack.out");
    let err = dir.join("conntrack.err");
    let mut c = Command::new("conntrack");
    // A 64 MiB netlink buffer: conntrack's answer to event bursts (-b).
    c.args(["-E", "-e", "NEW", "-p", "tcp", "-b", "67108864"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).map_err(|e| e.to_string())?)
        .stderr(std::fs::File::create(&err).map_err(|e| e.to_string())?);
    let mut p = node.server.spawn_guarded(c).map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(300));
    if let Ok(Some(status)) = p.child_mut().try_wait() {
        return Err(format!(
            "conntrack -E exited at start ({status}): {}",
            std::fs::read_to_string(&err).unwrap_or_default().trim()
        ));
    }
    Ok((p, out, err))
}

/// A probe connection before the storm: conntrack must print its NEW
/// event within 5 s, or it is reported as unable to run here.
fn probe_conntrack(node: &BenchNode, out: &Path) -> std::result::Result<(), String> {
    // A connection-rate port: the storm's own 4-tuples stay untouched.
    let to = node.server_addr(env::CONN_RATE_PORTS.start);
    let mut c = Command::new("bash");
    c.args([
        "-c",
        &format!(
            "exec 3<>/dev/tcp/{}/{}; cat <&3 >/dev/null",
            to.ip(),
            to.port()
        ),
    ]);
    let _ = node.client.output(c);
    let needle = format!("dport={}", to.port());
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if std::fs::read_to_string(out)
            .unwrap_or_default()
            .contains(&needle)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("conntrack -E printed no event for a probe connection within 5 s".into())
}

fn pct(n: usize, of: usize) -> f64 {
    if of == 0 {
        0.0
    } else {
        100.0 * n as f64 / of as f64
    }
}

fn lost_in(stderr: &Path) -> u64 {
    // tcplife: "lost N events on CPU #c"; conntrack: ENOBUFS warnings.
    std::fs::read_to_string(stderr)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let at = w.iter().position(|x| x.eq_ignore_ascii_case("lost"))?;
            w.get(at + 1)?.parse::<u64>().ok()
        })
        .sum()
}

/// One storm: how long, how fast, who watches, and whether the agent is
/// pinned to one core with the load on another (the DaemonSet case).
pub struct StormPlan {
    /// Prefix of the result ids: `storm` (item 3) or `pinned` (item 7).
    pub id: &'static str,
    /// Prefix of the result names.
    pub title: &'static str,
    pub secs: f64,
    /// Connections per second; 0 = flat out.
    pub rate: u64,
    pub threads: usize,
    pub watchers: Vec<Watcher>,
    pub pin: Option<PinPlan>,
    /// Index of the first 4-tuple (after the previous storm's).
    pub first_index: u64,
}

/// Where a pinned run puts the agent and the load, and why.
#[derive(Debug, Clone)]
pub struct PinPlan {
    pub agent: usize,
    pub load: usize,
    pub why: String,
}

/// Runs one storm and matches every watcher's records to it; the results
/// and the next free 4-tuple index.
pub fn storm(ctx: &Ctx, node: &BenchNode, plan: &StormPlan) -> Result<(Vec<BenchResult>, u64)> {
    let dir = ctx.dir.join(plan.id);
    std::fs::create_dir_all(&dir)?;
    let want = |w: Watcher| plan.watchers.contains(&w);
    let id = |what: &str| format!("{}_{what}", plan.id);
    let name = |what: &str| format!("{}: {what}", plan.title);
    let mut results = Vec::new();
    let load = ctx.note_other_load();
    let bare = ctx.bare_rate.get().map_or(String::new(), |r| {
        format!("; the bare connection-rate runs (item 1, 4 threads, no watcher) reached {r:.0}/s")
    });

    // The watchers first, so they see the whole storm.
    let tracefs = want(Watcher::Tcplife).then(Tracefs::ensure);
    let mut tcplife = tracefs.as_ref().map(|t| match t {
        Ok(_) => start_tcplife(&dir),
        Err(e) => Err(format!("tracefs is not mounted and could not be: {e:#}")),
    });
    let mut conntrack = want(Watcher::Conntrack).then(|| -> std::result::Result<_, String> {
        let c = start_conntrack(node, &dir)?;
        probe_conntrack(node, &c.1)?;
        Ok(c)
    });
    let export = dir.join("flows.jsonl");
    let agent = match want(Watcher::Flowaudit) {
        true => Some(BenchAgent::start(
            &ctx.agent,
            &dir.join("agent"),
            &[
                "--export-file".into(),
                export.display().to_string(),
                // Rotated at the default size, as a node's file is; every
                // backup kept, so that every line can be counted.
                "--export-file-max-backups".into(),
                EXPORT_BACKUPS.to_string(),
            ],
        )?),
        false => None,
    };
    let mut pin_note = String::new();
    if let Some(pin) = &plan.pin {
        if let Some(a) = &agent {
            env::pin_process(a.pid(), Some(pin.agent)).context("pin the agent")?;
        }
        env::pin_process(node.server_proc.host_pid(), Some(pin.load))
            .context("pin the storm server")?;
        pin_note = format!(
            "; the agent (every thread) pinned to CPU {}, the generator and the server \
             to CPU {} (sched_setaffinity; {})",
            pin.agent, pin.load, pin.why
        );
    }
    env::sleep(Duration::from_secs(1))?;
    let before = match &agent {
        Some(a) => Some((
            a.metric("flowaudit_kernel_events_lost_total")?,
            a.cpu_and_peak_rss().0,
            (
                a.metric("flowaudit_kernel_events_total")?,
                a.metric(FILE_LOST)?,
            ),
            env::proc_thread_cpu(a.pid()),
        )),
        None => None,
    };

    let completed_file = dir.join("completed.txt");
    let ports: Vec<u16> = STORM_PORTS.collect();
    let running: Vec<&str> = [
        (agent.is_some(), "flowaudit"),
        (matches!(tcplife, Some(Ok(_))), "tcplife"),
        (matches!(conntrack, Some(Ok(_))), "conntrack -E"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| *n)
    .collect();
    let watching = if running.is_empty() {
        "nothing".to_owned()
    } else {
        running.join(", ")
    };
    let pace = match plan.rate {
        0 => "flat out".to_owned(),
        r => format!("{r} connections/s"),
    };
    eprintln!(
        "bench: {}: {pace} for {:.0} s, watched by {watching}{pin_note}",
        plan.id, plan.secs
    );
    let args = pinned_client_args(
        storm_client_args(
            node,
            &ports,
            plan.threads,
            Duration::from_secs_f64(plan.secs),
            plan.rate,
            plan.first_index,
            Some(&completed_file),
        ),
        plan.pin.as_ref().map(|p| p.load),
    );
    let out = node.run_in_client(&args);
    if plan.pin.is_some() {
        let _ = env::pin_process(node.server_proc.host_pid(), None);
    }
    let out = out?;
    let sum: StormSummary =
        serde_json::from_str(out.trim()).with_context(|| format!("storm summary: {out:?}"))?;
    eprintln!(
        "bench: {}: {} connections completed in {:.2} s ({:.0}/s), {} failed; waiting for the watchers to finish",
        plan.id, sum.completed, sum.elapsed_s, sum.per_sec, sum.errors
    );

    // Every watcher drains: the export file, tcplife's and conntrack's output.
    let mut watch: Vec<PathBuf> = Vec::new();
    if agent.is_some() {
        watch.push(export.clone());
    }
    if let Some(Ok((_, o, _))) = &tcplife {
        watch.push(o.clone());
    }
    if let Some(Ok((_, o, _))) = &conntrack {
        watch.push(o.clone());
    }
    let watch_refs: Vec<&Path> = watch.iter().map(PathBuf::as_path).collect();
    wait_quiet(&watch_refs, Duration::from_secs(2), Duration::from_secs(60))?;
    let agent_figures = match (agent, before) {
        (
            Some(a),
            Some((lost_before, cpu_before, (records_before, file_lost_before), threads_before)),
        ) => {
            let lost = a.metric("flowaudit_kernel_events_lost_total")? - lost_before;
            let records = (
                a.metric("flowaudit_kernel_events_total")? - records_before,
                a.metric(FILE_LOST)? - file_lost_before,
            );
            let (cpu_after, peak_rss) = a.cpu_and_peak_rss();
            let threads = env::thread_cpu_by_name(&threads_before, &env::proc_thread_cpu(a.pid()));
            // Ring pages, once touched, stay resident: what they add now
            // they added at the peak.
            let ring_rss = env::proc_bpf_map_rss(a.pid());
            let stopped = a.stop()?;
            let lost_at_stop = stopped["kernel_events_lost"].as_f64().unwrap_or(0.0);
            Some((
                lost.max(lost_at_stop),
                cpu_after - cpu_before,
                (peak_rss, ring_rss),
                records,
                threads,
            ))
        }
        _ => None,
    };
    // tcplife flushes its buffered output on SIGINT.
    if let Some(Ok((p, _, _))) = &mut tcplife {
        p.interrupt(Duration::from_secs(10));
    }
    if let Some(Ok((p, _, _))) = &mut conntrack {
        // SAFETY: a signal to our own child (conntrack prints its count on SIGINT).
        unsafe { libc::kill(p.node_exec_pid() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = p.child_mut().try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(tracefs);
    if conntrack.is_some() {
        // Connection tracking in the server pod costs every later run.
        let mut c = Command::new("nft");
        c.args(["delete", "table", "inet", "fabench"]);
        let _ = node.server.output(c);
    }

    let exp = Expected::load(&completed_file, node.client.ip4(), node.server.ip4())?;
    let n = exp.len();
    if n == 0 {
        bail!("the storm completed no connection: {:?}", sum.first_error);
    }
    let rate_target = plan.rate as f64;
    let (rate_text, rate_met) = match plan.rate {
        0 => (
            format!("flat out for {:.0} s (sustained)", plan.secs),
            sum.elapsed_s >= plan.secs * 0.99,
        ),
        _ => (
            format!("at least {rate_target:.0}/s for {:.0} s", plan.secs),
            sum.per_sec >= rate_target * 0.99 && sum.elapsed_s >= plan.secs * 0.99,
        ),
    };
    results.push(
        BenchResult::new(
            &id("rate"),
            &name("connections per second achieved"),
            sum.per_sec,
            "conn/s",
        )
        .target(&rate_text, rate_met)
        .detail(format!(
            "{} connections completed in {:.2} s ({} failed) by {} client threads, {pace} \
                 (paced runs go flat out when behind), {} server ports, unique 4-tuples{}; \
                 watched by {watching}, all on these {} cores{pin_note}{bare}; {load}",
            sum.completed,
            sum.elapsed_s,
            sum.errors,
            plan.threads,
            ports.len(),
            if sum.exhausted {
                " (STOPPED EARLY: every 4-tuple was used; fewer seconds or more server ports)"
            } else {
                ""
            },
            num_cpus()
        )),
    );

    if let Some((fa_lost, cpu, (peak_rss, ring_rss), (records, file_lost), threads)) = agent_figures
    {
        let (fa, ids) = count_flowaudit(&export, &exp)?;
        let all4 = fa.iter().filter(|s| **s == ALL_FOUR).count();
        let any = fa.iter().filter(|s| **s != 0).count();
        let count_bit = |b: u8| fa.iter().filter(|s| **s & b != 0).count();
        let export_mib = len_with_backups(&export) as f64 / (1 << 20) as f64;
        let (share_text, share_met) = match &plan.pin {
            None => (
                "100% (all four events of every connection), 0 lost",
                all4 == n && fa_lost == 0.0,
            ),
            Some(_) => ("at least 99% (all four events)", pct(all4, n) >= 99.0),
        };
        let figures = format!(
            "flowaudit_kernel_events_lost_total +{fa_lost:.0}, flowaudit_kernel_events_total \
             +{records:.0}, {FILE_LOST} +{file_lost:.0} (flows the export file lost: its writer \
             behind or a write failed) over the run; agent CPU {cpu:.2} s, peak RSS \
             {peak_rss:.0} MiB{pin_note}"
        );
        results.push(
            BenchResult::new(&id("flowaudit"), &name("share flowaudit reported"), pct(all4, n), "%")
                .target(share_text, share_met)
                .detail(format!(
                    "{all4} of {n} connections with CONNECT and CLOSE from both sockets ({any} with at least one); \
                     CONNECT egress {} ingress {}, CLOSE egress {} ingress {}; {figures}; \
                     counted from its export file ({export_mib:.0} MiB); {}; {}",
                    count_bit(CONNECT_EGRESS),
                    count_bit(CONNECT_INGRESS),
                    count_bit(CLOSE_EGRESS),
                    count_bit(CLOSE_INGRESS),
                    ids.text(),
                    ctx.identity,
                )),
        );
        results.push(
            BenchResult::new(
                &id("lost"),
                &name("kernel events the agent lost"),
                fa_lost,
                "events",
            )
            .target("0", fa_lost == 0.0)
            .detail(format!(
                "delta of flowaudit_kernel_events_lost_total from before the run to after its \
                     records drained (or the agent's count at stop, if larger); {figures}"
            )),
        );
        let cpu_id = id("agent_cpu_per_conn");
        let cpu_name = name("agent CPU per connection");
        results.push(if n == 0 || !cpu.is_finite() {
            BenchResult::not_run(&cpu_id, &cpu_name, "µs", "not run: no connection completed")
        } else {
            let us = cpu * 1e6 / n as f64;
            BenchResult::new(&cpu_id, &cpu_name, us, "µs")
                .target("at most 3 µs", us <= 3.0)
                .detail(format!(
                    "{cpu:.2} s of agent CPU (utime+stime of its process, /proc/PID/stat) from before the \
                     run until its records drained, over the {n} connections the run completed (each \
                     reached the agent: two sockets, four flow events, export file on; counted over \
                     them, not over those in the export file, which can leave flows out); by thread: \
                     {}; {figures}",
                    thread_split(&threads, n, export_mib)
                ))
        });
        // The export file's writer against the rest: where the row above goes.
        // With its helpers, which allocate the file's blocks, start its
        // writeback and rotate it (`agent/src/export/ahead.rs`).
        let writer = threads.get(WRITER_THREAD).map(|w| {
            w + [AHEAD_THREAD, ROTATE_THREAD]
                .iter()
                .map(|t| threads.get(*t).copied().unwrap_or(0.0))
                .sum::<f64>()
        });
        let rest_id = id("agent_cpu_per_conn_without_writer");
        let rest_name = name("agent CPU per connection, the export file's threads left out");
        results.push(match writer {
            Some(w) if n > 0 && cpu.is_finite() => {
                let rest = cpu - w;
                BenchResult::new(&rest_id, &rest_name, rest * 1e6 / n as f64, "µs").detail(format!(
                    "{rest:.2} s of the agent's {cpu:.2} s (every thread but `{WRITER_THREAD}`, \
                     `{AHEAD_THREAD}` and `{ROTATE_THREAD}`, /proc/PID/task/TID/stat) over the {n} connections the run \
                     completed: capture, identity, policy, metrics, stream; the writer thread, which \
                     serializes each flow as JSON and writes {export_mib:.0} MiB, and its helpers took \
                     {w:.2} s ({:.2} µs per connection, {:.2} µs per MiB written)",
                    w * 1e6 / n as f64,
                    w * 1e6 / export_mib.max(f64::MIN_POSITIVE)
                ))
            }
            _ => BenchResult::not_run(
                &rest_id,
                &rest_name,
                "µs",
                format!("not run: no `{WRITER_THREAD}` thread was seen in the agent, or no connection completed"),
            ),
        });
        if plan.pin.is_none() {
            results.push(
                BenchResult::new(&id("peak_rss"), &name("agent peak RSS"), peak_rss, "MiB")
                    .target("at most 128 MiB (default ring)", peak_rss <= 128.0)
                    .detail(format!(
                        "VmHWM of the agent process after the run (from its start); ring buffer as \
                         configured ({}); of it, {ring_rss:.0} MiB are the BPF ring's pages, whose \
                         data area is mapped twice (records wrap around its end) and so counts twice; \
                         {figures}",
                        ring_note(&ctx.agent.extra)
                    )),
            );
            let once = peak_rss - ring_rss / 2.0;
            results.push(
                BenchResult::new(
                    &id("peak_rss_ring_once"),
                    &name("agent peak RSS, ring counted once"),
                    once,
                    "MiB",
                )
                .detail(format!(
                    "the peak RSS above less the second mapping of the ring's pages ({:.0} MiB): \
                     the memory the node gives the agent (a memory cgroup charges each page once)",
                    ring_rss / 2.0
                )),
            );
        }
        // The export files can be large; nothing else needs them.
        for f in with_backups(&export) {
            let _ = std::fs::remove_file(f);
        }
    }

    match &tcplife {
        None => {}
        Some(Ok((_, out, err))) => {
            let t = count_tcplife(out, &exp)?;
            let any = t.iter().filter(|s| **s != 0).count();
            let both = t.iter().filter(|s| **s == 3).count();
            results.push(
                BenchResult::new(&id("tcplife"), &name("share tcplife reported"), pct(any, n), "%").detail(
                    format!(
                        "{any} of {n} connections reported (both sockets: {both}); it said it lost {} events; \
                         libbpf-tools tcplife -4 on the host (tracepoint sock/inet_sock_set_state, perf buffer), \
                         output to a file",
                        lost_in(err)
                    ),
                ),
            );
        }
        Some(Err(why)) => results.push(BenchResult::not_run(
            &id("tcplife"),
            &name("share tcplife reported"),
            "%",
            format!("could not run: {why}"),
        )),
    }
    match &conntrack {
        None => {}
        Some(Ok((_, out, err))) => {
            let c = count_conntrack(out, &exp)?;
            let got = c.iter().filter(|s| **s != 0).count();
            let errtext = std::fs::read_to_string(err).unwrap_or_default();
            let enobufs = errtext.matches("ENOBUFS").count();
            results.push(
                BenchResult::new(&id("conntrack"), &name("share conntrack -E reported"), pct(got, n), "%")
                    .detail(format!(
                        "{got} of {n} connections had a NEW event; conntrack -E -e NEW -b 64MiB in the server pod \
                         (nftables ct state rule there); ENOBUFS warnings: {enobufs}; its own count: {}",
                        errtext
                            .lines()
                            .filter(|l| l.contains("flow events"))
                            .collect::<Vec<_>>()
                            .join(" ")
                            .trim()
                    )),
            );
        }
        Some(Err(why)) => results.push(BenchResult::not_run(
            &id("conntrack"),
            &name("share conntrack -E reported"),
            "%",
            format!("could not run: {why}"),
        )),
    }
    Ok((results, sum.next_index))
}

/// The ring size the agent ran with: `--ring-buffer-mib` among the extra
/// agent arguments, else its default.
fn ring_note(extra: &[String]) -> String {
    let mut it = extra.iter();
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix("--ring-buffer-mib=") {
            return format!("--ring-buffer-mib {v}");
        }
        if a == "--ring-buffer-mib" {
            return format!(
                "--ring-buffer-mib {}",
                it.next().map_or("?", String::as_str)
            );
        }
    }
    "the default, 32 MiB".to_owned()
}

pub fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Backups of the export file the storms keep: more than a storm writes
/// (64 MiB each, the default size; a 30 s storm writes about 3.5 GiB).
const EXPORT_BACKUPS: u32 = 10_000;

/// The thread that serializes and writes the export file
/// (`agent/src/export/file.rs`).
const WRITER_THREAD: &str = "export-file";

/// The writer's helper thread, `export-file-ahead` (`agent/src/export/ahead.rs`),
/// as the kernel names it (15 bytes at most).
const AHEAD_THREAD: &str = "export-file-ahe";

/// The writer's rotation thread, `export-file-rotate`, as the kernel names it.
const ROTATE_THREAD: &str = "export-file-rot";

/// The agent's count of flows missing from its export file (both reasons).
const FILE_LOST: &str = "flowaudit_export_file_flows_lost_total";

/// "export-file 6.10 s (9.80 µs/conn), tokio-rt-worker 1.20 s (...)": each
/// thread name's CPU over the run, largest first.
pub fn thread_split(threads: &BTreeMap<String, f64>, conns: usize, export_mib: f64) -> String {
    let mut v: Vec<(&String, &f64)> = threads.iter().filter(|(_, c)| **c > 0.0).collect();
    v.sort_by(|a, b| b.1.total_cmp(a.1));
    let parts: Vec<String> = v
        .iter()
        .map(|(n, c)| {
            let mut t = format!(
                "{n} {c:.2} s ({:.2} µs/conn",
                **c * 1e6 / conns.max(1) as f64
            );
            if n.as_str() == WRITER_THREAD {
                t.push_str(&format!(", writing {export_mib:.0} MiB"));
            }
            t.push(')');
            t
        })
        .collect();
    if parts.is_empty() {
        "not read".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Expected> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "fa-bench-expected-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("completed.txt");
        std::fs::write(&path, text)?;
        let exp = Expected::load(
            &path,
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
        );
        std::fs::remove_dir_all(&dir)?;
        exp
    }

    #[test]
    fn completed_connections_are_found_either_way_round() {
        let exp = load("10000 9000\n10001 9000\n10000 9001\n").unwrap();
        assert_eq!(exp.len(), 3);
        let (c, s) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(exp.find((c, 10001), (s, 9000)), Some((1, true)));
        assert_eq!(exp.find((s, 9001), (c, 10000)), Some((2, false)));
        assert_eq!(exp.find((c, 10002), (s, 9000)), None);
    }

    #[test]
    fn a_tuple_used_twice_is_an_error_not_one_connection() {
        let e = load("10000 9000\n10001 9000\n10000 9000\n").err().unwrap();
        let text = format!("{e:#}");
        assert!(
            text.contains(":3: the generator used the 4-tuple 10000 -> 9000 twice"),
            "{text}"
        );
    }

    #[test]
    fn a_malformed_line_names_its_place() {
        let e = load("10000 9000\nnonsense\n").err().unwrap();
        assert!(
            format!("{e:#}").contains("completed.txt:2: not \"client_port server_port\""),
            "{e:#}"
        );
    }
}
