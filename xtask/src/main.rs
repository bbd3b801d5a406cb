//! flowaudit's task runner (`cargo xtask <task>`): setup, build, test, demo,
//! bench and ci. Each task runs `setup` first, so a fresh machine needs no
//! manual step; `cargo xtask ci` does exactly what `.ci/run` does.

mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "flowaudit development tasks",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (rust-src, bpf-linker, apt and pip packages); idempotent.
    Setup,
    /// Build the agent (with its eBPF programs) and the test tools, release profile.
    Build,
    /// Unit tests, privileged integration tests (root), fuzz smoke runs, manifest validation.
    Test {
        /// Skip the privileged integration tests (for a quick local loop only; CI never skips).
        #[arg(long)]
        unprivileged_only: bool,
        /// Seconds each fuzz target runs.
        #[arg(long, default_value_t = 15)]
        fuzz_seconds: u64,
    },
    /// Start a simulated node with the precinct-99 workloads, run the agent and print flows live.
    Demo {
        /// How long to run, e.g. 30s or 2m (default: until Ctrl-C).
        #[arg(long)]
        duration: Option<String>,
    },
    /// Benchmarks: policy evaluation cost (criterion) and gRPC stream capacity.
    Bench,
    /// Exactly what CI runs: `test`.
    Ci,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::setup(),
        Task::Build => {
            setup::setup()?;
            build()
        }
        Task::Test {
            unprivileged_only,
            fuzz_seconds,
        } => {
            setup::setup()?;
            test(unprivileged_only, fuzz_seconds)
        }
        Task::Ci => {
            setup::setup()?;
            test(false, 15)
        }
        Task::Demo { duration } => {
            setup::setup()?;
            build()?;
            demo(duration)
        }
        Task::Bench => {
            setup::setup()?;
            bench()
        }
    }
}

pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command, inheriting stdio; fails with the command line on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout.
pub fn cmd_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(project_root());
    cmd
}

fn build() -> Result<()> {
    let started = std::time::Instant::now();
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "flowaudit",
        "-p",
        "flowaudit-tests",
        "--bins",
    ]))?;
    eprintln!("build: done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn is_root() -> bool {
    cmd_output(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

fn test(unprivileged_only: bool, fuzz_seconds: u64) -> Result<()> {
    let root = project_root();
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "flowaudit",
        "-p",
        "flowaudit-tests",
        "--bins",
    ]))?;
    // Unit and host tests of every crate (no privileges needed).
    run(cargo().args([
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "flowaudit-ebpf",
        "--exclude",
        "flowaudit-tests",
    ]))?;
    if !unprivileged_only {
        if !is_root() {
            bail!(
                "the integration tests load eBPF programs and create network namespaces: run `cargo xtask test` as root (CI does)"
            );
        }
        // One at a time: every test's agent sees every connection on the node.
        run(cargo()
            .args([
                "test",
                "--release",
                "-p",
                "flowaudit-tests",
                "--",
                "--test-threads=1",
            ])
            .env("FLOWAUDIT_BIN", root.join("target/release/flowaudit"))
            .env("SIMPOD_BIN", root.join("target/release/simpod")))?;
    }
    fuzz(fuzz_seconds)?;
    let validate = root.join("deploy/validate.sh");
    if validate.exists() {
        run(Command::new("bash").arg(&validate).current_dir(&root))?;
    }
    eprintln!("test: all passed");
    Ok(())
}

/// Runs every cargo-fuzz target of the project briefly; a crash fails the run.
fn fuzz(seconds: u64) -> Result<()> {
    let root = project_root();
    for dir in ["policy/fuzz", "wire/fuzz"] {
        let fuzz_dir = root.join(dir);
        if !fuzz_dir.join("Cargo.toml").exists() {
            continue;
        }
        let crate_dir = fuzz_dir.parent().context("fuzz dir has a parent")?;
        let targets = cmd_output(
            Command::new("cargo")
                .args(["+nightly", "fuzz", "list"])
                .current_dir(crate_dir),
        )?;
        for target in targets.lines().map(str::trim).filter(|t| !t.is_empty()) {
            eprintln!("fuzz: {dir} {target} for {seconds}s");
            run(Command::new("cargo")
                .args([
                    "+nightly",
                    "fuzz",
                    "run",
                    target,
                    "--",
                    &format!("-max_total_time={seconds}"),
                ])
                .current_dir(crate_dir))?;
        }
    }
    Ok(())
}

fn demo(duration: Option<String>) -> Result<()> {
    if !is_root() {
        bail!(
            "the demo creates network namespaces and loads eBPF programs: run `cargo xtask demo` as root"
        );
    }
    let root = project_root();
    let mut cmd = Command::new(root.join("target/release/flowaudit-demo"));
    cmd.arg("--agent")
        .arg(root.join("target/release/flowaudit"))
        .arg("--simpod")
        .arg(root.join("target/release/simpod"))
        .arg("--workdir")
        .arg(root.join("target/demo"))
        .arg("--policy")
        .arg(root.join("deploy/examples/scenario/precinct-99-scenario.yaml"));
    if let Some(d) = duration {
        cmd.args(["--duration", &d]);
    }
    run(&mut cmd)
}

fn bench() -> Result<()> {
    // Policy evaluation cost at 10, 1,000 and 10,000 rules (criterion).
    run(cargo().args(["bench", "-p", "flowaudit-policy"]))?;
    // gRPC stream capacity to 1 and 100 subscribers (ignored in `test`: it
    // measures, it does not assert on time).
    run(cargo().args([
        "test",
        "--release",
        "-p",
        "flowaudit",
        "stream_throughput",
        "--",
        "--ignored",
        "--nocapture",
    ]))
}
