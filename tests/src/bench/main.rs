//! flowaudit-bench: the measurements of `cargo xtask bench` that need a
//! simulated node and the real agent (docs/benchmarks.md, items 1, 2, 3 and
//! 6): connection-rate and bulk-throughput overhead (bare and agent runs
//! alternating), capture completeness under a connection storm beside
//! `tcplife` and `conntrack -E`, and the delay from a connection to its
//! event on the gRPC stream. Each result is one `bench-result: {json}` line
//! on stdout; progress goes to stderr. Needs root; cleans up (pods,
//! namespaces, processes, a tracefs mount it made) on failure and on
//! Ctrl-C too. The hidden subcommands are the traffic generators it runs
//! inside the pods.

mod collect;
mod delay;
mod env;
mod floor;
mod grpc;
mod overhead;
mod report;
mod storm;
mod traffic;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::env::{AgentConfig, BenchNode, CLIENT_PORTS};
use crate::report::BenchResult;

#[derive(Parser)]
#[command(
    name = "flowaudit-bench",
    about = "flowaudit's node benchmarks (run by `cargo xtask bench`): overhead, storm completeness, event delay"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Item {
    /// 1: connection rate, bare vs agent.
    ConnRate,
    /// 2: iperf3 throughput, bare vs agent.
    Throughput,
    /// 3: sustained connection storm: flowaudit, tcplife, conntrack -E;
    /// the agent's CPU per connection, losses and peak RSS.
    Storm,
    /// 7: the DaemonSet case: agent pinned to one core, the load on another.
    Pinned,
    /// 6: connection -> event on the gRPC stream.
    Delay,
}

/// A tool that watches the storm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Watcher {
    Flowaudit,
    Tcplife,
    Conntrack,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the measurements (all by default) and print `bench-result:` lines.
    Run(RunArgs),
    /// Gather the results of a `cargo xtask bench` run into one table (and JSON, and the docs).
    Report(collect::ReportArgs),
    #[command(hide = true)]
    StormServer {
        #[arg(long)]
        ip: Ipv4Addr,
        #[arg(long, value_delimiter = ',')]
        ports: Vec<u16>,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    #[command(hide = true)]
    StormClient {
        #[arg(long)]
        server_ip: Ipv4Addr,
        #[arg(long, value_delimiter = ',')]
        ports: Vec<u16>,
        #[arg(long)]
        client_ip: Ipv4Addr,
        #[arg(long)]
        client_port_lo: u16,
        #[arg(long)]
        client_port_hi: u16,
        #[arg(long)]
        threads: usize,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value_t = 0)]
        first_index: u64,
        #[arg(long)]
        completed_file: Option<PathBuf>,
        #[arg(long)]
        pin_cpu: Option<usize>,
    },
    #[command(hide = true)]
    DelayClient {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        rate: f64,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Measurements to run (comma-separated); default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Item>,
    /// The agent binary (default: $FLOWAUDIT_BIN, else target/release/flowaudit).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Policy the agent judges with.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Extra argument for every agent run (repeatable).
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Agent flag that turns payload capture on for the throughput runs
    /// (default: found in `flowaudit agent --help`, if it has one).
    #[arg(long, allow_hyphen_values = true)]
    payload_flag: Option<String>,
    /// Bare/agent rounds of the overhead measurements. Ten, because the
    /// targets sit a point or two below bare: with five, the median of one
    /// mode's runs moved by that much between benches.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Seconds per overhead run.
    #[arg(long, default_value_t = 5.0)]
    run_secs: f64,
    /// Client threads of the connection-rate runs.
    #[arg(long, default_value_t = 4)]
    rate_threads: usize,
    /// Connections per second the storm aims at; 0 = flat out, the highest
    /// rate the generator reaches.
    #[arg(long, default_value_t = 0)]
    storm_rate: u64,
    /// Seconds the storm lasts (longer than the ring can absorb).
    #[arg(long, default_value_t = 30.0)]
    storm_secs: f64,
    /// Seconds of the pinned (DaemonSet) run, flat out.
    #[arg(long, default_value_t = 15.0)]
    pinned_secs: f64,
    /// The CPU the pinned run gives the agent (0 or 1); the load gets the
    /// other. Default: the CPU that takes most of the interrupts of the
    /// disk holding the export file, else 0. On the load's CPU, that
    /// disk's requests waited for the load's end (docs/benchmarks.md, item 7).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=1))]
    pinned_agent_cpu: Option<u8>,
    /// Client threads of the storm.
    #[arg(long, default_value_t = 8)]
    storm_threads: usize,
    /// Which watchers see the storm (comma-separated; default all three).
    #[arg(long, value_enum, value_delimiter = ',')]
    storm_watchers: Vec<Watcher>,
    /// Accepting threads of the storm server.
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
    /// Connections of the event-delay measurement.
    #[arg(long, default_value_t = 1000)]
    delay_count: u64,
    /// Their rate per second.
    #[arg(long, default_value_t = 200.0)]
    delay_rate: f64,
    /// The SPIRE release whose Delegated Identity API the agent attests
    /// through (`spire-double`, which reproduces 1.9.6, 1.10.2, 1.11.3 and
    /// 1.15.3), or `none` for an agent without SPIRE (every end DERIVED
    /// from the endpoint directory). Default: the reference log's release,
    /// as users run it.
    #[arg(long, default_value = "1.9.6")]
    spire: String,
    /// Simulated node index (10.213.<index>.0/24).
    #[arg(long, default_value_t = 210)]
    node_index: u8,
    /// Scratch directory (default: a fresh one under the temp dir).
    #[arg(long)]
    workdir: Option<PathBuf>,
}

/// What every measurement needs.
pub struct Ctx {
    pub agent: AgentConfig,
    pub dir: PathBuf,
    pub payload_flag: Option<String>,
    pub rounds: usize,
    pub run_secs: f64,
    pub rate_threads: usize,
    pub storm_rate: u64,
    pub storm_secs: f64,
    pub storm_threads: usize,
    pub storm_watchers: Vec<Watcher>,
    pub delay_count: u64,
    pub delay_rate: f64,
    pub pinned_secs: f64,
    /// The CPU the pinned run gives the agent; None = the disk's (see
    /// `pinned_cpus`).
    pub pinned_agent_cpu: Option<usize>,
    /// How the agent's ends get their identities, for the details.
    pub identity: String,
    /// The median bare connection rate of item 1, once measured.
    pub bare_rate: std::cell::Cell<Option<f64>>,
    /// The next unused 4-tuple index on the storm ports.
    pub storm_index: std::cell::Cell<u64>,
}

impl Ctx {
    /// Notes (and warns about) other processes busy right now: a build
    /// beside the bench takes CPU from whichever run it overlaps.
    pub fn note_other_load(&self) -> String {
        let mut notes = Vec::new();
        let agents = env::other_agents();
        if !agents.is_empty() {
            let text = format!(
                "another flowaudit agent was running (pid {agents:?}): its programs saw the \
                 bench's connections too, so bare runs were not bare"
            );
            eprintln!("bench: WARNING: {text}");
            notes.push(text);
        }
        let busy = env::busy_others(Duration::from_secs(1));
        if busy.is_empty() {
            notes.push("no other process busy before this measurement".into());
        } else {
            let text = format!(
                "busy beside the bench before this measurement: {}",
                busy.join(", ")
            );
            eprintln!("bench: WARNING: {text}: results will be noisy");
            notes.push(text);
        }
        notes.join("; ")
    }
}

/// `storm-client` arguments for a run from the client pod to the server pod.
pub fn storm_client_args(
    node: &BenchNode,
    ports: &[u16],
    threads: usize,
    duration: Duration,
    rate: u64,
    first_index: u64,
    completed_file: Option<&Path>,
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "storm-client".into(),
        "--server-ip".into(),
        node.server.ip4().to_string(),
        "--ports".into(),
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(","),
        "--client-ip".into(),
        node.client.ip4().to_string(),
        "--client-port-lo".into(),
        CLIENT_PORTS.0.to_string(),
        "--client-port-hi".into(),
        CLIENT_PORTS.1.to_string(),
        "--threads".into(),
        threads.to_string(),
        "--secs".into(),
        duration.as_secs_f64().to_string(),
        "--rate".into(),
        rate.to_string(),
        "--first-index".into(),
        first_index.to_string(),
    ];
    if let Some(f) = completed_file {
        a.push("--completed-file".into());
        a.push(f.display().to_string());
    }
    a
}

/// The same, with every generator thread pinned to `cpu`.
pub fn pinned_client_args(mut args: Vec<String>, cpu: Option<usize>) -> Vec<String> {
    if let Some(c) = cpu {
        args.push("--pin-cpu".into());
        args.push(c.to_string());
    }
    args
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(args) => run(args),
        Cmd::Report(args) => collect::report(args),
        Cmd::StormServer { ip, ports, threads } => traffic::storm_server(ip, &ports, threads),
        Cmd::StormClient {
            server_ip,
            ports,
            client_ip,
            client_port_lo,
            client_port_hi,
            threads,
            secs,
            rate,
            first_index,
            completed_file,
            pin_cpu,
        } => {
            if client_port_hi < client_port_lo {
                bail!("--client-port-hi must not be below --client-port-lo");
            }
            traffic::storm_client(traffic::StormOpts {
                server_ip,
                server_ports: ports,
                client_ip,
                client_ports: (client_port_lo, client_port_hi),
                threads,
                duration: Duration::from_secs_f64(secs),
                rate,
                first_index,
                completed_file,
                pin_cpu,
            })
        }
        Cmd::DelayClient { to, count, rate } => traffic::delay_client(to, count, rate),
    }
}

/// The pinned run's CPUs and why the agent has its CPU. By default the agent
/// gets the CPU that takes the interrupts of the disk its export file is
/// on: the load keeps its CPU busy with kernel network work, and the kernel
/// threads the file's writeback needs there (that CPU's softirq thread, its
/// kblockd worker) wait for seconds. With the disk's interrupts on the
/// load's CPU, 25 s runs wrote almost nothing to the disk: the file's pages
/// stayed dirty until the kernel's dirty limit made the writer wait
/// (2026-12-07: 83.9% to 89.9% of connections in the file in 14 runs; with
/// the agent on the disk's CPU, 100.00% in 2; docs/benchmarks.md, item 7).
fn pinned_cpus(ctx: &Ctx) -> storm::PinPlan {
    let disk = env::disk_interrupts(&ctx.dir);
    let disk_text = match &disk {
        Some((name, counts)) => format!(
            "the export file's disk ({name}) has taken its interrupts on CPUs {}",
            counts
                .iter()
                .enumerate()
                .map(|(cpu, n)| format!("{cpu}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "which CPU takes the export file's disk's interrupts could not be told".to_owned(),
    };
    let (agent, why) = match ctx.pinned_agent_cpu {
        Some(cpu) => (
            cpu,
            format!("CPU {cpu} chosen with --pinned-agent-cpu; {disk_text}"),
        ),
        None => {
            let busiest = disk.as_ref().and_then(|(_, counts)| {
                let (cpu, n) = counts.iter().enumerate().take(2).max_by_key(|(_, n)| **n)?;
                (*n > 0).then_some(cpu)
            });
            match busiest {
                Some(cpu) => (cpu, format!("the agent has the disk's CPU, {disk_text}")),
                None => (0, format!("CPU 0 by default; {disk_text}")),
            }
        }
    };
    storm::PinPlan {
        agent,
        load: 1 - agent,
        why,
    }
}

/// Item 3 (the sustained storm, all watchers) or item 7 (the agent alone,
/// pinned to one CPU while the load runs on the other: `pinned_cpus`).
fn run_storm(ctx: &Ctx, node: &BenchNode, pinned: bool) -> Result<Vec<BenchResult>> {
    let plan = if pinned {
        if storm::num_cpus() < 2 {
            return Ok(vec![BenchResult::not_run(
                "pinned_flowaudit",
                "DaemonSet (agent on one core): share flowaudit reported",
                "%",
                format!(
                    "not run: needs 2 CPUs (one for the agent, one for the load), this machine has {}",
                    storm::num_cpus()
                ),
            )]);
        }
        storm::StormPlan {
            id: "pinned",
            title: "DaemonSet (agent on one core)",
            secs: ctx.pinned_secs,
            rate: 0,
            threads: ctx.storm_threads,
            watchers: vec![Watcher::Flowaudit],
            pin: Some(pinned_cpus(ctx)),
            first_index: ctx.storm_index.get(),
        }
    } else {
        storm::StormPlan {
            id: "storm",
            title: "Storm",
            secs: ctx.storm_secs,
            rate: ctx.storm_rate,
            threads: ctx.storm_threads,
            watchers: ctx.storm_watchers.clone(),
            pin: None,
            first_index: ctx.storm_index.get(),
        }
    };
    let (results, next) = storm::storm(ctx, node, &plan)?;
    ctx.storm_index.set(next);
    Ok(results)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn run(args: RunArgs) -> Result<()> {
    env::install_signal_handlers();
    let items: Vec<Item> = if args.only.is_empty() {
        vec![
            Item::ConnRate,
            Item::Throughput,
            Item::Storm,
            Item::Pinned,
            Item::Delay,
        ]
    } else {
        args.only.clone()
    };
    let agent_bin = args
        .agent
        .clone()
        .or_else(|| std::env::var_os("FLOWAUDIT_BIN").map(PathBuf::from))
        .unwrap_or_else(|| repo_root().join("target/release/flowaudit"));
    let mut tools = Vec::new();
    if items.contains(&Item::Throughput) {
        tools.push(("iperf3", "iperf3"));
    }
    if items.contains(&Item::Storm) {
        // tcplife and conntrack are peers: when they cannot run on this
        // kernel the table says why, but a missing package is a setup gap.
        tools.extend([
            ("tcplife", "libbpf-tools"),
            ("conntrack", "conntrack"),
            ("nft", "nftables"),
        ]);
    }
    env::check_prerequisites(&agent_bin, &tools)?;
    let policy = args
        .policy
        .clone()
        .unwrap_or_else(|| repo_root().join("deploy/examples/precinct-99-flowpolicy.yaml"));
    if !policy.is_file() {
        bail!("the policy {} does not exist (--policy)", policy.display());
    }
    let dir = args.workdir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("flowaudit-bench-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let result = (|| -> Result<()> {
        let node = BenchNode::start(args.node_index, &dir, args.server_threads)?;
        let spire = match args.spire.as_str() {
            "none" => None,
            r if !flowaudit_tests::spire_double::RELEASES.contains(&r) => bail!(
                "--spire {r}: the SPIRE double reproduces the releases {:?}, or say `none`",
                flowaudit_tests::spire_double::RELEASES
            ),
            release => Some(env::BenchSpire::start(&node, release)?),
        };
        let identity = match &spire {
            Some(s) => format!(
                "identities from SPIRE {} (spire-double, pid {}: Delegated Identity API on a \
                 unix socket, entries by namespace and service account)",
                s.release,
                s.pid()
            ),
            None => "no SPIRE (--spire-admin-socket none: ends DERIVED from the endpoint \
                     directory)"
                .to_owned(),
        };
        let ctx = Ctx {
            agent: AgentConfig {
                binary: agent_bin.clone(),
                policy,
                endpoints: node.endpoints.clone(),
                spire_socket: spire.as_ref().map(|s| s.socket.clone()),
                extra: args.agent_args.clone(),
            },
            dir: dir.clone(),
            payload_flag: args.payload_flag.clone(),
            rounds: args.rounds.max(1),
            run_secs: args.run_secs,
            rate_threads: args.rate_threads.max(1),
            storm_rate: args.storm_rate,
            storm_secs: args.storm_secs,
            storm_threads: args.storm_threads.max(1),
            storm_watchers: if args.storm_watchers.is_empty() {
                vec![Watcher::Flowaudit, Watcher::Tcplife, Watcher::Conntrack]
            } else {
                args.storm_watchers.clone()
            },
            delay_count: args.delay_count.max(1),
            delay_rate: args.delay_rate,
            pinned_secs: args.pinned_secs,
            pinned_agent_cpu: args.pinned_agent_cpu.map(usize::from),
            identity,
            bare_rate: std::cell::Cell::new(None),
            storm_index: std::cell::Cell::new(0),
        };
        eprintln!(
            "bench: node {} with pods {} ({}) and {} ({}); agent {}; {}",
            node.node.index(),
            node.client.name(),
            node.client.ip4(),
            node.server.name(),
            node.server.ip4(),
            agent_bin.display(),
            ctx.identity
        );
        let mut conn_index = 0u64;
        for item in &items {
            env::check_interrupted()?;
            let results: Vec<BenchResult> = match item {
                Item::ConnRate => overhead::connection_rate(&ctx, &node, &mut conn_index)?,
                Item::Throughput => overhead::bulk_throughput(&ctx, &node)?,
                Item::Storm => run_storm(&ctx, &node, false)?,
                Item::Pinned => run_storm(&ctx, &node, true)?,
                Item::Delay => delay::event_delay(&ctx, &node)?,
            };
            for r in results {
                r.emit();
            }
        }
        drop(spire);
        node.shutdown()
    })();
    if args.workdir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}
