//! Items 1 and 2: what the attached agent costs the workloads. Bare and
//! agent runs alternate (bare, agent, ..., bare, agent, ...) on the same
//! pods in one process, with a floor run (programs that do nothing) in each
//! round, and the ratio of the medians is reported.
//!
//! - Connection rate: `storm-client` flat out (connect, read EOF, close; no
//!   payload) from the client pod to the storm server in the server pod.
//!   Each round also has the agent with its process stopped during the
//!   load: the kernel's side of its cost.
//! - Bulk throughput: one `iperf3` TCP stream between the pods; when the
//!   agent can leave its payload programs (cgroup_skb) unattached, a third
//!   run per round has the agent with `sock_ops` only, which isolates what
//!   payload capture costs.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::env::{self, BenchAgent, BenchNode, CONN_RATE_PORTS, IPERF_PORT, MachineCpu};
use crate::report::{BenchResult, median};
use crate::traffic::StormSummary;
use crate::{Ctx, storm_client_args};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Bare,
    Agent,
    /// The agent without payload capture (`sock_ops` and the owner
    /// programs; no cgroup_skb).
    SockOpsOnly,
    /// No agent: programs that do nothing, at the agent's attach points
    /// (`floor.rs`).
    Floor,
    /// The agent's programs as in `Agent` runs, its process stopped
    /// (SIGSTOP) while the load runs: its records wait in a ring sized to
    /// hold them all ([`ring_mib_for`]).
    Stopped,
}

/// Flow records per connection of the connection-rate load: CONNECT and
/// CLOSE of both sockets (no payload).
const RECORDS_PER_CONNECTION: f64 = 4.0;

/// The ring (MiB, a power of two, at least the default 32) that holds
/// every record of a run of `secs` at `rate` connections a second, with
/// half as much again to spare; `None` beyond the agent's largest ring
/// (1,024 MiB).
fn ring_mib_for(rate: f64, secs: f64) -> Option<u32> {
    // Each record in the ring: its 8-byte header, then the record.
    let record = (std::mem::size_of::<flowaudit_common::FlowRecord>() + 8) as f64;
    let mib = (1.5 * rate * secs * RECORDS_PER_CONNECTION * record / f64::from(1u32 << 20)).ceil();
    if !mib.is_finite() || mib > 1024.0 {
        return None;
    }
    Some((mib as u32).max(32).next_power_of_two())
}

/// SIGCONT on drop: a stopped agent goes on, also when a run fails.
struct StoppedProcess(i32);

impl StoppedProcess {
    fn stop(pid: u32) -> Result<Self> {
        let pid = i32::try_from(pid).context("agent pid")?;
        // SAFETY: a signal to our own child, which is still running.
        if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
            bail!(
                "SIGSTOP the agent (pid {pid}): {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self(pid))
    }
}

impl Drop for StoppedProcess {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// The alternating schedule: `round` (bare first) `rounds` times.
fn schedule(rounds: usize, round: &[Mode]) -> Vec<Mode> {
    (0..rounds).flat_map(|_| round.iter().copied()).collect()
}

fn fmt_runs(xs: &[f64], scale: f64) -> String {
    xs.iter()
        .map(|x| format!("{:.0}", x / scale))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Item 1, and where its cost is: the ratio of the medians, then the
/// agent's kernel programs' CPU per connection from one more agent run.
pub fn connection_rate(
    ctx: &Ctx,
    node: &BenchNode,
    first_index: &mut u64,
) -> Result<Vec<BenchResult>> {
    let ports: Vec<u16> = CONN_RATE_PORTS.collect();
    let run = |secs: f64, idx: &mut u64| -> Result<StormSummary> {
        let args = storm_client_args(
            node,
            &ports,
            ctx.rate_threads,
            Duration::from_secs_f64(secs),
            0,
            *idx,
            None,
        );
        let out = node.run_in_client(&args)?;
        let s: StormSummary = serde_json::from_str(out.trim())
            .with_context(|| format!("storm-client summary: {out:?}"))?;
        *idx = s.next_index;
        if s.completed == 0 {
            bail!(
                "the connection-rate client completed no connection: {:?}",
                s.first_error
            );
        }
        Ok(s)
    };
    let load = ctx.note_other_load();
    // Warm-up (not measured): fills the server's TIME_WAIT table as every
    // later run will find it.
    eprintln!("bench: connection rate: warm-up run");
    run(ctx.run_secs, first_index)?;
    let (mut bare, mut agent, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    let mut stopped = Vec::new();
    let (mut stopped_lost, mut stopped_ring) = (0.0, 0u32);
    let cgroup2 = flowaudit_tests::simnode::cgroup2_mount().context("find the cgroup v2 mount")?;
    let mut errors = 0;
    let mut lost = 0.0;
    let (mut lookups, mut attested) = (0.0, 0.0);
    let mut agent_cpu = Vec::new();
    let mut cpu_per_conn = Vec::new();
    // CPU seconds by thread name over all agent runs, and their connections.
    let mut by_thread: std::collections::BTreeMap<String, f64> = Default::default();
    let mut agent_conns = 0u64;
    let mut machine = Machine::default();
    // The floor of the agent's design runs in every round too, and so does
    // the agent with its process stopped: the kernel's side of its cost.
    let round = [Mode::Bare, Mode::Agent, Mode::Stopped, Mode::Floor];
    for (i, mode) in schedule(ctx.rounds, &round).into_iter().enumerate() {
        env::check_interrupted()?;
        let a = match mode {
            Mode::Agent => Some(BenchAgent::start(
                &ctx.agent,
                &ctx.dir.join(format!("agent-rate-{i}")),
                &[],
            )?),
            Mode::Stopped => {
                // Bare runs first in each round, so there is a rate to size by.
                let mib = ring_mib_for(median(&bare), ctx.run_secs).with_context(|| {
                    format!(
                        "no ring of at most 1,024 MiB holds a {} s run at {:.0} connections/s: \
                         shorten --run-secs",
                        ctx.run_secs,
                        median(&bare)
                    )
                })?;
                stopped_ring = stopped_ring.max(mib);
                Some(BenchAgent::start(
                    &ctx.agent,
                    &ctx.dir.join(format!("agent-rate-{i}")),
                    &["--ring-buffer-mib".to_owned(), mib.to_string()],
                )?)
            }
            Mode::Bare | Mode::SockOpsOnly | Mode::Floor => None,
        };
        let _floor = match mode {
            Mode::Floor => Some(crate::floor::Floor::attach(&cgroup2)?),
            _ => None,
        };
        if a.is_some() {
            env::sleep(Duration::from_secs(1))?; // let start-up work settle
        }
        let cpu0 = a.as_ref().map(|a| a.cpu_and_peak_rss().0);
        let threads0 = a.as_ref().map(|a| env::proc_thread_cpu(a.pid()));
        let frozen = match (&a, mode) {
            (Some(a), Mode::Stopped) => Some(StoppedProcess::stop(a.pid())?),
            _ => None,
        };
        let machine0 = MachineCpu::now()?;
        let s = run(ctx.run_secs, first_index)?;
        machine.add(mode, machine0.until(MachineCpu::now()?), s.completed);
        drop(frozen);
        errors += s.errors;
        eprintln!(
            "bench: connection rate, {mode:?} run: {:.0} connections/s ({} in {:.1} s, {} errors)",
            s.per_sec, s.completed, s.elapsed_s, s.errors
        );
        match a {
            Some(a) if mode == Mode::Stopped => {
                // What the ring could not hold the programs counted; the
                // agent reads those counters each second, and last when it
                // stops, after its records drained: its stop line has all.
                let at_stop = a.stop()?;
                stopped_lost += at_stop["kernel_events_lost"].as_f64().with_context(|| {
                    format!("the agent's stop line has no kernel_events_lost: {at_stop}")
                })?;
                stopped.push(s.per_sec);
            }
            Some(a) => {
                lost += a.metric("flowaudit_kernel_events_lost_total")?;
                // One scrape for both: the agent still counts between two.
                let text = a.metrics_text()?;
                lookups += env::metric_sum(&text, "flowaudit_identity_lookups_total");
                attested += env::metric_sum(
                    &text,
                    "flowaudit_identity_lookups_total{result=\"attested\"}",
                );
                if let Some(c0) = cpu0 {
                    let used = a.cpu_and_peak_rss().0 - c0;
                    agent_cpu.push(used / s.elapsed_s);
                    cpu_per_conn.push(used / s.completed as f64);
                }
                if let Some(t0) = &threads0 {
                    let after = env::proc_thread_cpu(a.pid());
                    for (name, cpu) in env::thread_cpu_by_name(t0, &after) {
                        *by_thread.entry(name).or_default() += cpu;
                    }
                    agent_conns += s.completed;
                }
                a.stop()?;
                agent.push(s.per_sec);
            }
            None if mode == Mode::Floor => floor.push(s.per_sec),
            None => bare.push(s.per_sec),
        }
    }
    let (mb, ma, mf) = (median(&bare), median(&agent), median(&floor));
    let ms = median(&stopped);
    ctx.bare_rate.set(Some(mb));
    let ratio = 100.0 * ma / mb;
    let floor_ratio = 100.0 * mf / mb;
    let stopped_ratio = 100.0 * ms / mb;
    let kernel = kernel_cost(ctx, &mut |idx| run(ctx.run_secs, idx), first_index)?;
    let per_conn_us = 1e6 * median(&cpu_per_conn);
    let machine_row = machine.row(per_conn_us, kernel.value);
    Ok(vec![
        BenchResult::new("connection_rate", "Connection rate with the agent (vs bare)", ratio, "%")
            .target("at least 95% of bare (stretch: 98%)", ratio >= 95.0)
            .detail(format!(
                "median {ma:.0} conn/s with the agent vs {mb:.0} bare; runs bare [{}], agent [{}] conn/s; \
                 {} rounds of {:.0} s, alternating; {} client threads, connect/accept/close without payload \
                 between two pods over the bridge; {errors} failed attempts; the agent used {:.0}% of a core \
                 while it ran (median), kernel events lost: {lost:.0}; {}: {lookups:.0} identity \
                 lookups settled in the agent runs, {attested:.0} attested; {load}",
                fmt_runs(&bare, 1.0),
                fmt_runs(&agent, 1.0),
                ctx.rounds,
                ctx.run_secs,
                ctx.rate_threads,
                100.0 * median(&agent_cpu),
                ctx.identity
            )),
        BenchResult::new(
            "connection_rate_floor",
            "Connection rate with programs that do nothing at the agent's attach points (vs bare)",
            floor_ratio,
            "%",
        )
        .detail(format!(
            "the floor of the agent's kernel design, in the same rounds as the row above: median \
             {mf:.0} conn/s vs {mb:.0} bare, runs [{}] conn/s; sock_ops (turns on the state \
             callbacks at ESTABLISHED, as the agent does), connect4/6, post_bind4/6 and cgroup_skb \
             ingress/egress, each returning at once, attached to the cgroup v2 root by BPF links; \
             no agent process. Beyond the runs' spread, the agent's figure can come no closer to bare than this one",
            fmt_runs(&floor, 1.0),
        )),
        BenchResult::new(
            "connection_rate_process_stopped",
            "Connection rate with the agent's programs and its process stopped (vs bare)",
            stopped_ratio,
            "%",
        )
        .detail(format!(
            "the kernel's side of the agent's cost, in the same rounds as the rows above: the agent \
             started as in its runs, then stopped (SIGSTOP) from before the load until after it, so \
             its programs run as in the agent runs and its process costs nothing; its records wait \
             in a ring of {stopped_ring} MiB (--ring-buffer-mib, sized to hold a whole run), and \
             kernel events lost: {stopped_lost:.0}{}; median {ms:.0} conn/s vs {mb:.0} bare, runs [{}] \
             conn/s. Between this row and the agent's: what its process costs the workload",
            if stopped_lost > 0.0 {
                " (records the ring could not hold cost the programs less than records \
                 written, so this ratio is then higher than the programs' true cost allows)"
            } else {
                ""
            },
            fmt_runs(&stopped, 1.0),
        )),
        kernel,
        BenchResult::new(
            "connection_rate_agent_cpu_per_conn",
            "Agent CPU per connection, no export file (the connection-rate runs)",
            per_conn_us,
            "µs",
        )
        .target(
            "at most 3 µs (the agent's own process; its kernel programs are the row above)",
            per_conn_us <= 3.0,
        )
        .detail(format!(
            "agent CPU (utime+stime of its process, /proc/PID/stat) over the connections of each \
             agent run of item 1, median of [{}] µs; by thread, over all those runs \
             (/proc/PID/task/TID/stat): {}; two sockets, four flow events per connection, \
             judged and counted, kept for the stream (no subscriber), no export file: the storm and \
             pinned rows below count the same with the export file on; {}",
            cpu_per_conn
                .iter()
                .map(|x| format!("{:.2}", x * 1e6))
                .collect::<Vec<_>>()
                .join(", "),
            crate::storm::thread_split(&by_thread, agent_conns as usize, 0.0),
            ctx.identity
        )),
        machine_row,
    ])
}

/// The whole machine's CPU in each kind of connection-rate run: busy CPU
/// seconds per connection made, and the share of the time the CPUs were
/// busy (`/proc/stat`).
#[derive(Default)]
struct Machine {
    bare: Vec<(f64, f64)>,
    agent: Vec<(f64, f64)>,
    floor: Vec<(f64, f64)>,
    stopped: Vec<(f64, f64)>,
}

impl Machine {
    fn add(&mut self, mode: Mode, spent: MachineCpu, connections: u64) {
        let runs = match mode {
            Mode::Bare => &mut self.bare,
            Mode::Agent => &mut self.agent,
            Mode::Floor => &mut self.floor,
            Mode::Stopped => &mut self.stopped,
            Mode::SockOpsOnly => return,
        };
        runs.push((spent.busy / connections.max(1) as f64, spent.busy_share()));
    }

    /// Medians of (µs per connection, busy %) of `runs`.
    fn medians(runs: &[(f64, f64)]) -> (f64, f64) {
        let per_conn: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let busy: Vec<f64> = runs.iter().map(|r| r.1).collect();
        (1e6 * median(&per_conn), 100.0 * median(&busy))
    }

    /// Where the connection-rate ratio goes, from the machine's side:
    /// what the agent adds to the machine's CPU per connection (its own
    /// process, its programs, and the rest: kernel work outside the
    /// programs, scheduling, caches), how busy the CPUs stayed, and what
    /// the 95% target leaves per connection on this workload.
    fn row(&self, agent_process_us: f64, programs_us: Option<f64>) -> BenchResult {
        const ID: &str = "connection_rate_machine_cpu_per_conn";
        const NAME: &str = "Connection rate: machine CPU per connection the agent adds (agent runs less bare runs)";
        if self.bare.is_empty() || self.agent.is_empty() {
            return BenchResult::not_run(ID, NAME, "µs", "not run: no bare or no agent run");
        }
        let (bare_us, bare_busy) = Self::medians(&self.bare);
        let (agent_us, agent_busy) = Self::medians(&self.agent);
        let extra = agent_us - bare_us;
        let split = match programs_us {
            Some(k) => format!(
                "of it, the agent process {agent_process_us:.2} µs (the agent CPU row), its programs \
                 {k:.2} µs (the kernel-programs row, measured in a run of its own) and the rest \
                 {:.2} µs: the kernel's work for the agent outside its programs (socket storage \
                 freed with each socket, the ring buffer), scheduling and caches",
                extra - agent_process_us - k
            ),
            None => format!(
                "of it, the agent process {agent_process_us:.2} µs (the agent CPU row); its \
                 programs' share was not measured (see the kernel-programs row)"
            ),
        };
        let others = |runs: &[(f64, f64)], what: &str| {
            if runs.is_empty() {
                return String::new();
            }
            let (us, busy) = Self::medians(runs);
            format!(
                "; {what} {us:.2} µs per connection ({:+.2} µs, CPUs {busy:.1}% busy)",
                us - bare_us
            )
        };
        let floor = others(&self.floor, "floor runs")
            + &others(
                &self.stopped,
                "runs with the agent's process stopped (its programs alone)",
            );
        // rate = busy CPU seconds per second / CPU seconds per connection,
        // so the ratio of the rates is the product of these two.
        let cpu_factor = 100.0 * bare_us / agent_us;
        let busy_factor = 100.0 * agent_busy / bare_busy;
        BenchResult::new(ID, NAME, extra, "µs").detail(format!(
            "the whole machine's busy CPU time (user, system, irq, softirq, steal: /proc/stat) over \
             the connections made, median of the runs of item 1: bare {bare_us:.2} µs per connection \
             (CPUs {bare_busy:.1}% busy), with the agent {agent_us:.2} µs ({agent_busy:.1}% busy): \
             {extra:.2} µs more per connection; {split}{floor}. The rate ratio is the product of \
             bare's CPU per connection over the agent's ({cpu_factor:.1}%) and how busy the CPUs \
             stayed with the agent against bare ({busy_factor:.1}%). With the CPUs as busy as in the \
             bare runs, 95% of bare leaves {:.2} µs per connection for the agent and its programs \
             together on this workload",
            bare_us * (1.0 / 0.95 - 1.0)
        ))
    }
}

/// Where the agent's kernel programs spend: one more agent run (not in the
/// ratio: the kernel's BPF statistics add two clock reads to every program
/// run) with `kernel.bpf_stats_enabled` on, and each `flowaudit_*`
/// program's runs and run time (`bpftool prog show`) over the connections
/// it made; then the same for the floor programs, which do nothing.
fn kernel_cost(
    ctx: &Ctx,
    run: &mut dyn FnMut(&mut u64) -> Result<StormSummary>,
    first_index: &mut u64,
) -> Result<BenchResult> {
    const ID: &str = "connection_rate_kernel_per_conn";
    const NAME: &str = "Connection rate: the agent's kernel programs' CPU per connection";
    if let Some(why) = no_bpftool() {
        return Ok(BenchResult::not_run(ID, NAME, "µs", why));
    }
    let _stats = BpfStats::enable()?;
    let a = BenchAgent::start(&ctx.agent, &ctx.dir.join("agent-rate-bpf-stats"), &[])?;
    env::sleep(Duration::from_secs(1))?;
    let agent = per_connection("flowaudit_", &mut *run, first_index);
    a.stop()?;
    let (s, total_us, parts) = agent?;
    if parts.is_empty() {
        return Ok(BenchResult::not_run(ID, NAME, "µs", no_run("flowaudit_")));
    }
    // The same for the programs that do nothing (`floor.rs`): what any
    // program at these attach points costs, whatever it does.
    let cgroup2 = flowaudit_tests::simnode::cgroup2_mount().context("find the cgroup v2 mount")?;
    let floor = crate::floor::Floor::attach(&cgroup2)?;
    let floor_cost = per_connection("floor_", &mut *run, first_index);
    drop(floor);
    let (_, floor_us, floor_parts) = floor_cost?;
    Ok(BenchResult::new(ID, NAME, total_us, "µs").detail(format!(
        "{} connections at {:.0}/s in one more agent run with kernel.bpf_stats_enabled=1 (not in \
         the ratio); per connection: {}; bpftool prog show, run_cnt and run_time_ns. The floor \
         programs, run the same way: {floor_us:.2} µs per connection ({})",
        s.completed,
        s.per_sec,
        parts.join(", "),
        floor_parts.join(", ")
    )))
}

/// One run of `run` with the BPF statistics on: the CPU time per
/// connection of the programs named `prefix*`, in all and per program.
fn per_connection(
    prefix: &str,
    run: &mut dyn FnMut(&mut u64) -> Result<StormSummary>,
    first_index: &mut u64,
) -> Result<(StormSummary, f64, Vec<String>)> {
    let (s, runs) = program_runs(prefix, || run(first_index))?;
    let conns = s.completed as f64;
    let mut total_ns = 0.0;
    let mut parts = Vec::new();
    for r in &runs {
        total_ns += r.ns;
        parts.push(format!(
            "{} {:.1} runs x {:.0} ns = {:.2} µs",
            r.name,
            r.runs / conns,
            r.ns / r.runs,
            r.ns / conns / 1000.0
        ));
    }
    Ok((s, total_ns / conns / 1000.0, parts))
}

/// Why the programs' run time cannot be read, if it cannot.
fn no_bpftool() -> Option<&'static str> {
    let found = Command::new("bpftool")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    (!found).then_some("not run: bpftool is not installed (cargo xtask setup installs it)")
}

/// Why a row has no figure when the statistics showed no run of its
/// programs.
fn no_run(prefix: &str) -> String {
    format!(
        "could not run: bpftool showed no run of a {prefix}* program (kernel.bpf_stats_enabled not honoured?)"
    )
}

/// What one program did during a run: how often it ran, for how long.
struct ProgramRuns {
    name: String,
    runs: f64,
    ns: f64,
}

/// Runs `run`; the programs named `prefix*` that ran meanwhile, with their
/// runs and run time (`bpftool prog show`; the statistics must be on).
fn program_runs<T>(prefix: &str, run: impl FnOnce() -> Result<T>) -> Result<(T, Vec<ProgramRuns>)> {
    let before = programs_named(prefix)?;
    let out = run()?;
    let after = programs_named(prefix)?;
    let mut runs = Vec::new();
    for (name, (cnt, ns)) in after {
        let (cnt0, ns0) = before.get(&name).copied().unwrap_or((0, 0));
        let n = cnt.saturating_sub(cnt0) as f64;
        if n > 0.0 {
            runs.push(ProgramRuns {
                name,
                runs: n,
                ns: ns.saturating_sub(ns0) as f64,
            });
        }
    }
    Ok((out, runs))
}

/// `kernel.bpf_stats_enabled` on while it lives, then as it was.
struct BpfStats {
    was: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<Self> {
        let was =
            std::fs::read_to_string(BPF_STATS).with_context(|| format!("read {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1").with_context(|| format!("write 1 to {BPF_STATS}"))?;
        Ok(Self { was })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, self.was.trim());
    }
}

/// Loaded programs named `prefix*`, by name: total runs and run time (ns).
fn programs_named(prefix: &str) -> Result<std::collections::BTreeMap<String, (u64, u64)>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("run bpftool prog show --json")?;
    if !out.status.success() {
        bail!(
            "bpftool prog show: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let progs: Vec<Value> =
        serde_json::from_slice(&out.stdout).context("bpftool prog show --json output")?;
    let mut by_name = std::collections::BTreeMap::new();
    for p in &progs {
        let Some(name) = p["name"].as_str().filter(|n| n.starts_with(prefix)) else {
            continue;
        };
        let e = by_name.entry(name.to_owned()).or_insert((0, 0));
        e.0 += p["run_cnt"].as_u64().unwrap_or(0);
        e.1 += p["run_time_ns"].as_u64().unwrap_or(0);
    }
    Ok(by_name)
}

/// The agent's switch that leaves its payload programs unattached.
const PAYLOAD_SWITCH: &str = "--payload-capture";

/// How the agent's payload capture (the first bytes of each connection,
/// behind the TLS/mTLS classification) is turned on for the throughput
/// runs, and off for the `sock_ops`-only runs (None: this agent cannot):
/// a flag given with `--payload-flag`, the agent's `--payload-capture`, a
/// flag of `flowaudit agent --help` named for it, or always on when the
/// help speaks of payload without such a flag; the note says which.
fn payload_capture(ctx: &Ctx) -> (Vec<String>, Option<Vec<String>>, String) {
    let help = Command::new(&ctx.agent.binary)
        .args(["agent", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let flags: Vec<&str> = help
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .collect();
    let off = flags
        .contains(&PAYLOAD_SWITCH)
        .then(|| vec![format!("{PAYLOAD_SWITCH}=false")]);
    if let Some(f) = &ctx.payload_flag {
        return (vec![f.clone()], off, format!("payload capture on ({f})"));
    }
    if off.is_some() {
        return (
            vec![format!("{PAYLOAD_SWITCH}=true")],
            off,
            format!("payload capture on ({PAYLOAD_SWITCH}=true, the default)"),
        );
    }
    // `--payload-sockets` bounds how many sockets are watched; it turns nothing on.
    let flag = flags.into_iter().find(|w| {
        *w != "--payload-sockets"
            && (w.contains("payload") || w.contains("capture") || w.contains("tls"))
    });
    let (on, note) = match flag {
        Some(f) => (vec![f.to_owned()], format!("payload capture on ({f})")),
        None if help.to_ascii_lowercase().contains("payload") => (
            Vec::new(),
            "payload capture on (this agent always copies each connection's first payload bytes \
             for the TLS/mTLS classification; no flag)"
                .to_owned(),
        ),
        None => (
            Vec::new(),
            "payload capture: this agent has none (`flowaudit agent --help` names no payload \
             capture), so it ran as it is"
                .to_owned(),
        ),
    };
    (on, off, note)
}

pub fn bulk_throughput(ctx: &Ctx, node: &BenchNode) -> Result<Vec<BenchResult>> {
    let load = ctx.note_other_load();
    let (agent_args, off_args, capture_note) = payload_capture(ctx);
    let mut server_cmd = Command::new("iperf3");
    server_cmd
        .args(["-s", "-p", &IPERF_PORT.to_string(), "-B"])
        .arg(node.server.ip4().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _server = node
        .server
        .spawn_guarded(server_cmd)
        .context("start iperf3 -s in the server pod")?;
    let run = || -> Result<f64> {
        for attempt in 0.. {
            env::check_interrupted()?;
            let mut c = Command::new("iperf3");
            c.args(["-c"])
                .arg(node.server.ip4().to_string())
                .args(["-p", &IPERF_PORT.to_string(), "-J", "-O", "1", "-t"])
                .arg(format!("{}", ctx.run_secs.ceil() as u64 + 1));
            let out = node.client.output(c)?;
            let text = String::from_utf8_lossy(&out.stdout);
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
                return Ok(bps);
            }
            let err = v["error"].as_str().unwrap_or("no JSON result").to_owned();
            // The server may still be starting.
            if attempt < 20 && err.contains("unable to connect") {
                env::sleep(Duration::from_millis(250))?;
                continue;
            }
            bail!(
                "iperf3 -c in the client pod: {err}; stderr: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        unreachable!()
    };
    let (mut bare, mut agent, mut sock_ops, mut floor) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let modes = match off_args {
        Some(_) => schedule(
            ctx.rounds,
            &[Mode::Bare, Mode::Agent, Mode::SockOpsOnly, Mode::Floor],
        ),
        None => schedule(ctx.rounds, &[Mode::Bare, Mode::Agent, Mode::Floor]),
    };
    let cgroup2 = flowaudit_tests::simnode::cgroup2_mount().context("find the cgroup v2 mount")?;
    for (i, mode) in modes.into_iter().enumerate() {
        env::check_interrupted()?;
        let args = match mode {
            Mode::Agent => Some(&agent_args),
            Mode::SockOpsOnly => off_args.as_ref(),
            Mode::Bare | Mode::Floor | Mode::Stopped => None,
        };
        let _floor = match mode {
            Mode::Floor => Some(crate::floor::Floor::attach(&cgroup2)?),
            _ => None,
        };
        let a = match args {
            Some(args) => Some(BenchAgent::start(
                &ctx.agent,
                &ctx.dir.join(format!("agent-iperf-{i}")),
                args,
            )?),
            None => None,
        };
        if a.is_some() {
            env::sleep(Duration::from_secs(1))?;
        }
        let bps = run()?;
        eprintln!(
            "bench: bulk throughput, {mode:?} run: {:.2} Gbit/s",
            bps / 1e9
        );
        if let Some(a) = a {
            a.stop()?;
        }
        match mode {
            Mode::Bare => bare.push(bps),
            Mode::Agent => agent.push(bps),
            Mode::SockOpsOnly => sock_ops.push(bps),
            Mode::Floor => floor.push(bps),
            Mode::Stopped => unreachable!("the throughput rounds have no stopped-agent runs"),
        }
    }
    let kernel = bulk_kernel_cost(ctx, &agent_args, &run)?;
    let (mb, ma, mf) = (median(&bare), median(&agent), median(&floor));
    let ratio = 100.0 * ma / mb;
    let method = format!(
        "one iperf3 TCP stream between two pods, {} rounds of {:.0} s (first second omitted), \
         alternating",
        ctx.rounds, ctx.run_secs
    );
    let mut results = vec![
        BenchResult::new(
            "bulk_throughput",
            "Bulk throughput with the agent (vs bare)",
            ratio,
            "%",
        )
        .target("at least 98% of bare (stretch: 99%)", ratio >= 98.0)
        .detail(format!(
            "median {:.2} Gbit/s with the agent vs {:.2} bare; runs bare [{}], agent [{}] Mbit/s; \
                 {method}; {capture_note}; {load}",
            ma / 1e9,
            mb / 1e9,
            fmt_runs(&bare, 1e6),
            fmt_runs(&agent, 1e6),
        )),
        BenchResult::new(
            "bulk_throughput_floor",
            "Bulk throughput with programs that do nothing at the agent's attach points (vs bare)",
            100.0 * mf / mb,
            "%",
        )
        .detail(format!(
            "the floor of the agent's kernel design (the programs of the connection-rate floor; \
             here the cgroup_skb pair runs on every packet), in the same rounds: median {:.2} \
             Gbit/s vs {:.2} bare, runs [{}] Mbit/s; {method}",
            mf / 1e9,
            mb / 1e9,
            fmt_runs(&floor, 1e6),
        )),
        kernel,
    ];
    const AB_ID: &str = "bulk_throughput_payload_ab";
    const AB_NAME: &str = "Bulk throughput, sock_ops + cgroup_skb vs sock_ops only";
    if sock_ops.is_empty() {
        results.push(BenchResult::not_run(
            AB_ID,
            AB_NAME,
            "%",
            format!(
                "not run: this agent has no {PAYLOAD_SWITCH} switch (`flowaudit agent --help`), so \
                 its payload programs cannot be left unattached"
            ),
        ));
        return Ok(results);
    }
    let ms = median(&sock_ops);
    let ab = 100.0 * ma / ms;
    let so = 100.0 * ms / mb;
    let runs = format!(
        "median {:.2} Gbit/s with payload capture, {:.2} with sock_ops only ({PAYLOAD_SWITCH}=false), \
         {:.2} bare; runs bare [{}], sock_ops only [{}], with payload capture [{}] Mbit/s; {method} \
         (bare, full agent, sock_ops only, floor in every round)",
        ma / 1e9,
        ms / 1e9,
        mb / 1e9,
        fmt_runs(&bare, 1e6),
        fmt_runs(&sock_ops, 1e6),
        fmt_runs(&agent, 1e6),
    );
    results.push(
        BenchResult::new(AB_ID, AB_NAME, ab, "%")
            .target(
                "at least 98% of sock_ops only (payload capture's share of the 98% budget)",
                ab >= 98.0,
            )
            .detail(format!("{runs}; {load}")),
    );
    results.push(
        BenchResult::new(
            "bulk_throughput_sock_ops",
            "Bulk throughput, agent with sock_ops only (vs bare)",
            so,
            "%",
        )
        .detail(format!("{runs}; {load}")),
    );
    Ok(results)
}

/// Where the bulk stream's cost is in the kernel: one more agent run and
/// one floor run (not in the ratios) with the BPF statistics on, and the
/// cgroup_skb programs' runs and run time in each.
fn bulk_kernel_cost(
    ctx: &Ctx,
    agent_args: &[String],
    run: &dyn Fn() -> Result<f64>,
) -> Result<BenchResult> {
    const ID: &str = "bulk_throughput_kernel_per_packet";
    const NAME: &str = "Bulk throughput: the agent's cgroup_skb programs' time per packet";
    if let Some(why) = no_bpftool() {
        return Ok(BenchResult::not_run(ID, NAME, "ns", why));
    }
    let _stats = BpfStats::enable()?;
    // One stream with its programs timed: ns per run in all, and the parts.
    let timed = |prefix: &str| -> Result<(f64, String)> {
        let start = std::time::Instant::now();
        let (bps, runs) = program_runs(prefix, run)?;
        let secs = start.elapsed().as_secs_f64();
        let (n, ns) = runs
            .iter()
            .fold((0.0, 0.0), |(n, ns), r| (n + r.runs, ns + r.ns));
        let parts = runs
            .iter()
            .map(|r| {
                format!(
                    "{} {:.0} runs/s x {:.0} ns",
                    r.name,
                    r.runs / secs,
                    r.ns / r.runs
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let per_run = if n > 0.0 { ns / n } else { f64::NAN };
        Ok((
            per_run,
            format!(
                "{:.2} Gbit/s; {parts}; {:.2}% of a CPU in all",
                bps / 1e9,
                100.0 * ns / (secs * 1e9)
            ),
        ))
    };
    let a = BenchAgent::start(
        &ctx.agent,
        &ctx.dir.join("agent-iperf-bpf-stats"),
        agent_args,
    )?;
    env::sleep(Duration::from_secs(1))?;
    let agent = timed("flowaudit_skb");
    a.stop()?;
    let (per_run, agent_detail) = agent?;
    if !per_run.is_finite() {
        return Ok(BenchResult::not_run(
            ID,
            NAME,
            "ns",
            no_run("flowaudit_skb"),
        ));
    }
    let cgroup2 = flowaudit_tests::simnode::cgroup2_mount().context("find the cgroup v2 mount")?;
    let floor = crate::floor::Floor::attach(&cgroup2)?;
    let floor_cost = timed("floor_skb");
    drop(floor);
    let (floor_per_run, floor_detail) = floor_cost?;
    Ok(BenchResult::new(ID, NAME, per_run, "ns").detail(format!(
        "one more iperf3 stream with the agent (payload capture on) and kernel.bpf_stats_enabled=1 \
         (not in the ratios; the statistics add two clock reads to every run): {agent_detail}. \
         The floor's cgroup_skb programs, which return at once, run the same way: \
         {floor_per_run:.0} ns per run; {floor_detail}; bpftool prog show, run_cnt and run_time_ns"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_alternate_bare_first() {
        use Mode::*;
        assert_eq!(schedule(2, &[Bare, Agent]), vec![Bare, Agent, Bare, Agent]);
        assert_eq!(
            schedule(2, &[Bare, Agent, Floor]),
            vec![Bare, Agent, Floor, Bare, Agent, Floor]
        );
    }

    #[test]
    fn the_stopped_agents_ring_holds_a_whole_run() {
        let record = (std::mem::size_of::<flowaudit_common::FlowRecord>() + 8) as f64;
        for (rate, secs) in [
            (60_000.0, 5.0),
            (45_000.0, 5.0),
            (1_000.0, 5.0),
            (100_000.0, 10.0),
        ] {
            let mib = ring_mib_for(rate, secs).expect("a ring that fits");
            assert!(mib.is_power_of_two() && mib >= 32, "{mib}");
            let needed = rate * secs * RECORDS_PER_CONNECTION * record;
            assert!(
                f64::from(mib) * f64::from(1u32 << 20) >= 1.5 * needed,
                "{mib} MiB for {needed} bytes"
            );
        }
        // The bench's usual run: 60,000 connections a second for 5 s.
        assert_eq!(ring_mib_for(60_000.0, 5.0), Some(512));
        // Beyond the agent's largest ring, or with no rate known yet.
        assert_eq!(ring_mib_for(200_000.0, 30.0), None);
        assert_eq!(ring_mib_for(f64::NAN, 5.0), None);
    }

    #[test]
    fn machine_row_splits_what_the_agent_adds() {
        let run = |busy: f64, idle: f64| MachineCpu { busy, idle };
        let mut m = Machine::default();
        // Bare: 2 CPUs for 5 s, 95% busy, 345,000 connections: 27.54 µs each.
        m.add(Mode::Bare, run(9.5, 0.5), 345_000);
        m.add(Mode::Bare, run(9.5, 0.5), 345_000);
        m.add(Mode::Bare, run(9.0, 1.0), 300_000);
        // With the agent: 90% busy, 35 µs each.
        m.add(Mode::Agent, run(9.0, 1.0), 257_143);
        m.add(Mode::Floor, run(9.5, 0.5), 330_000);
        // Its process stopped: 95% busy, 30 µs each.
        m.add(Mode::Stopped, run(9.5, 0.5), 316_667);
        m.add(Mode::SockOpsOnly, run(1.0, 9.0), 1);
        let r = m.row(3.0, Some(3.5));
        let extra = r.value.expect("a figure");
        assert!((extra - (35.0 - 27.536)).abs() < 0.01, "{extra}");
        let d = &r.detail;
        assert!(
            d.contains("bare 27.54 µs per connection (CPUs 95.0% busy)"),
            "{d}"
        );
        assert!(d.contains("with the agent 35.00 µs (90.0% busy)"), "{d}");
        // The rest is what neither the process nor the programs account for.
        assert!(d.contains("the rest 0.96 µs"), "{d}");
        assert!(
            d.contains("floor runs 28.79 µs per connection (+1.25 µs"),
            "{d}"
        );
        assert!(
            d.contains(
                "runs with the agent's process stopped (its programs alone) 30.00 µs per \
                 connection (+2.46 µs, CPUs 95.0% busy)"
            ),
            "{d}"
        );
        // The two factors multiply to the rate ratio: (0.9 / 35) / (0.95 / 27.536).
        assert!(d.contains("(78.7%)") && d.contains("(94.7%)"), "{d}");
        assert!(
            d.contains("95% of bare leaves 1.45 µs per connection"),
            "{d}"
        );
        // Without the programs' figure the rest is not made up.
        let r = m.row(3.0, None);
        assert!(!r.detail.contains("the rest"), "{}", r.detail);
        assert!(Machine::default().row(3.0, None).value.is_none());
    }
}
