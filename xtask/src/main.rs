//! flowaudit's task runner (`cargo xtask <task>`): setup, build, test, demo,
//! bench and ci. Each task runs `setup` first, so a fresh machine needs no
//! manual step; `cargo xtask ci` does exactly what `.ci/run` does.

mod kernels;
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
    /// fmt and clippy (-D warnings), unit tests, privileged integration tests (root), fuzz smoke runs, manifest validation.
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
    /// Every benchmark in one go: one table, target/bench/results.json (see docs/benchmarks.md).
    Bench {
        /// Rewrite the results table in docs/benchmarks.md from this run.
        #[arg(long)]
        write_docs: bool,
        /// Only these parts (comma-separated): policy, pipeline, instructions, stream, relay, node.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Arguments for `flowaudit-bench run` (after `--`), e.g. `-- --storm-rate 30000`.
        #[arg(last = true)]
        node_args: Vec<String>,
    },
    /// The kernel-dependent integration tests on Debian's 5.10, 6.1 and 6.12
    /// kernels (and 6.1 under lockdown), each booted under QEMU (root).
    Kernels {
        /// Only these kernels (repeatable): 5.10, 6.1, 6.12, 6.1-lockdown.
        #[arg(long = "kernel")]
        kernel: Vec<String>,
    },
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
        Task::Kernels { kernel } => {
            setup::setup()?;
            if !is_root() {
                bail!(
                    "the kernel matrix boots kernels that load eBPF programs: run `cargo xtask kernels` as root"
                );
            }
            kernels::kernels(&kernel)
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
        Task::Bench {
            write_docs,
            only,
            node_args,
        } => {
            setup::setup()?;
            bench::bench(write_docs, &only, &node_args)
        }
    }
}

pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The Python virtual environment holding every PyPI package `setup`
/// installs (grpcio, virtme-ng, checkov, kubernetes-validate), so the
/// system Python is never touched: `$FLOWAUDIT_VENV`, else
/// `<repo>/target/venv`. Tests and deploy/validate.sh find it the same way.
pub fn venv_dir() -> PathBuf {
    venv_dir_from(&project_root(), std::env::var_os("FLOWAUDIT_VENV"))
}

fn venv_dir_from(root: &Path, env: Option<std::ffi::OsString>) -> PathBuf {
    match env.filter(|v| !v.is_empty()) {
        Some(v) => PathBuf::from(v),
        None => root.join("target/venv"),
    }
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

/// How every test build selects packages. One selection means one feature
/// set for every dependency, so each crate is compiled once: a build with
/// `-p`, a `cargo test --workspace` and a `cargo test -p flowaudit-tests`
/// resolve features differently, and CI paid three release builds of the
/// agent (32 of its 90 minutes compiling). `privileged` adds the
/// integration tests (flowaudit-tests), which need root.
pub fn test_selection(privileged: bool) -> Vec<&'static str> {
    let mut args = vec![
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "flowaudit-ebpf",
    ];
    if !privileged {
        args.extend(["--exclude", "flowaudit-tests"]);
    }
    args
}

/// Builds every test binary, and the binaries the tests run (`flowaudit`,
/// `simpod`, ...: cargo builds a package's binaries for its integration
/// tests), in the test selection.
fn build_tests(privileged: bool) -> Result<()> {
    let started = std::time::Instant::now();
    run(cargo().args(test_selection(privileged)).arg("--no-run"))?;
    eprintln!("build: done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn is_root() -> bool {
    cmd_output(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

/// Wall time of each step of `test`, printed as each one ends and as a
/// table at the end (also when a step fails), so a CI log that stops early
/// still says where the time went (CI has 90 minutes).
struct Steps {
    started: std::time::Instant,
    done: Vec<(&'static str, f64, bool)>,
}

impl Steps {
    fn new() -> Self {
        Steps {
            started: std::time::Instant::now(),
            done: Vec::new(),
        }
    }

    fn run(&mut self, name: &'static str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let at = self.started.elapsed().as_secs_f64();
        eprintln!("xtask: step `{name}` starts at {}", minutes(at));
        let t = std::time::Instant::now();
        let result = f();
        let secs = t.elapsed().as_secs_f64();
        self.done.push((name, secs, result.is_ok()));
        eprintln!(
            "xtask: step `{name}` {} after {secs:.0} s (at {})",
            if result.is_ok() { "done" } else { "FAILED" },
            minutes(self.started.elapsed().as_secs_f64())
        );
        if result.is_err() {
            self.print();
        }
        result
    }

    fn print(&self) {
        eprintln!("\nxtask test, wall time per step:");
        for (name, secs, ok) in &self.done {
            eprintln!(
                "  {name:<14} {secs:>6.0} s{}",
                if *ok { "" } else { "  FAILED" }
            );
        }
        eprintln!(
            "  {:<14} {:>6.0} s ({})",
            "total",
            self.started.elapsed().as_secs_f64(),
            minutes(self.started.elapsed().as_secs_f64())
        );
    }
}

fn minutes(secs: f64) -> String {
    let s = secs as u64;
    format!("{}m{:02}s", s / 60, s % 60)
}

fn test(unprivileged_only: bool, fuzz_seconds: u64) -> Result<()> {
    let root = project_root();
    let mut steps = Steps::new();
    steps.run("lint", lint)?;
    let privileged = !unprivileged_only;
    if privileged && !is_root() {
        bail!(
            "the integration tests load eBPF programs and create network namespaces: run `cargo xtask test` as root (CI does)"
        );
    }
    steps.run("build", || build_tests(privileged))?;
    // From here on the tests leave CPU idle now and then; the fuzz targets
    // build in it.
    let prebuild = FuzzPrebuild::start()?;
    // Unit tests of every crate and, as root, the integration tests: one at
    // a time, since every test's agent sees every connection on the node.
    steps.run("tests", || {
        run(cargo()
            .args(test_selection(privileged))
            .args(["--", "--test-threads=1"])
            .env("FLOWAUDIT_BIN", root.join("target/release/flowaudit"))
            .env("SIMPOD_BIN", root.join("target/release/simpod"))
            .env("FLOWAUDIT_VENV", venv_dir()))
    })?;
    if privileged {
        // The kernel-dependent tests on the kernels users run.
        steps.run("kernel matrix", || kernels::kernels(&[]))?;
    }
    steps.run("fuzz", || fuzz(fuzz_seconds, prebuild))?;
    let validate = root.join("deploy/validate.sh");
    if validate.exists() {
        steps.run("manifests", || {
            run(Command::new("bash")
                .arg(&validate)
                .current_dir(&root)
                .env("FLOWAUDIT_VENV", venv_dir()))
        })?;
    }
    steps.print();
    eprintln!("test: all passed");
    Ok(())
}

/// The gate, first because it is quick: formatting, then clippy with
/// warnings as errors on the host crates and on the eBPF crate (for its own
/// target, with the nightly toolchain that builds it). The workspace lints
/// include `undocumented_unsafe_blocks`: every `unsafe` says why it is sound.
fn lint() -> Result<()> {
    let started = std::time::Instant::now();
    run(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("`cargo fmt --all` would change files: run it and commit")?;
    run(cargo().args([
        "clippy",
        "--release",
        "--workspace",
        "--exclude",
        "flowaudit-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(Command::new("cargo").current_dir(project_root()).args([
        "+nightly",
        "clippy",
        "--release",
        "-p",
        "flowaudit-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))?;
    eprintln!("lint: done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The cargo-fuzz projects and the sanitizer each is built with. The
/// agent's targets link the whole agent library (tonic, kube, k8s-openapi):
/// built without AddressSanitizer, the cold build takes far less of CI's
/// time, and the code under test is safe Rust whose one `unsafe` (the
/// unaligned record read) is bounds-checked first.
const FUZZ_PROJECTS: [(&str, &str); 3] = [
    ("policy/fuzz", "address"),
    ("wire/fuzz", "address"),
    ("agent/fuzz", "none"),
];

/// Builds every fuzz target in the background at the lowest CPU priority,
/// while the integration tests and the kernel matrix run: cargo-fuzz builds
/// the agent's targets with one codegen unit (about 9 minutes of one core,
/// cold), which the tests' idle moments absorb, since `nice 19` yields to
/// them whenever they want the CPU. `fuzz` waits for it; dropping it
/// (a failed step) stops the build.
struct FuzzPrebuild {
    child: Option<std::process::Child>,
    log: PathBuf,
}

impl FuzzPrebuild {
    fn start() -> Result<Self> {
        let root = project_root();
        let log = root.join("target/fuzz-prebuild.log");
        let mut script = String::from("set -e\n");
        for (dir, sanitizer) in FUZZ_PROJECTS {
            let fuzz_dir = root.join(dir);
            if !fuzz_dir.join("Cargo.toml").exists() {
                continue;
            }
            let crate_dir = fuzz_dir.parent().context("fuzz dir has a parent")?;
            script.push_str(&format!(
                "echo \"== {dir} $(date +%T)\"\n\
                 cd '{}' && cargo +nightly fuzz build --sanitizer {sanitizer}\n",
                crate_dir.display()
            ));
        }
        script.push_str("echo \"== done $(date +%T)\"\n");
        let out = std::fs::File::create(&log)
            .with_context(|| format!("could not create {}", log.display()))?;
        use std::os::unix::process::CommandExt;
        let child = Command::new("nice")
            .args(["-n", "19", "bash", "-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Its own process group, so that a drop stops cargo and rustc too.
            .process_group(0)
            .spawn()
            .context("could not start the fuzz targets' build (nice, bash)")?;
        eprintln!(
            "xtask: building the fuzz targets in the background (nice 19), log in {}",
            log.display()
        );
        Ok(FuzzPrebuild {
            child: Some(child),
            log,
        })
    }

    /// Waits for the build; its log's end is the error when it failed.
    fn wait(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = child
            .wait()
            .context("waiting for the fuzz targets' build")?;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        for line in log.lines().filter(|l| l.starts_with("== ")) {
            eprintln!("fuzz: background build {}", &line[3..]);
        }
        if !status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "building the fuzz targets failed ({status}); the end of {}:\n{}",
                self.log.display(),
                tail.join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for FuzzPrebuild {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM to the whole group (bash, cargo, rustc), then reap.
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
    }
}

/// Runs every cargo-fuzz target of the project briefly; a crash fails the
/// run. The targets were built by `prebuild` (same options, so nothing is
/// rebuilt here).
fn fuzz(seconds: u64, prebuild: FuzzPrebuild) -> Result<()> {
    let root = project_root();
    prebuild.wait()?;
    for (dir, sanitizer) in FUZZ_PROJECTS {
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
                    "--sanitizer",
                    sanitizer,
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
        .arg(root.join("deploy/examples/scenario/precinct-99-scenario.yaml"))
        .arg("--cilium-policy")
        .arg(root.join("deploy/examples/cilium-mutual-auth/postgresql-ingress.yaml"));
    if let Some(d) = duration {
        cmd.args(["--duration", &d]);
    }
    run(&mut cmd)
}

/// `cargo xtask bench`: every measurement of docs/benchmarks.md in one go.
/// Runs each part, keeps its stdout in `target/bench/<part>.out`, then
/// `flowaudit-bench report` gathers the `bench-result: {json}` lines (and
/// criterion's estimates), prints one table, writes
/// `target/bench/results.json` and, with `--write-docs`, the table in
/// docs/benchmarks.md. A part that cannot run is a "not run" row with the
/// reason; the node measurements failing fails the bench (after the table).
mod bench {
    use std::io::{BufRead, BufReader, Write};
    use std::path::PathBuf;
    use std::process::{Command, Stdio};
    use std::time::{Instant, SystemTime};

    use anyhow::{Context, Result, bail};

    use super::{build, cargo, is_root, project_root, run};

    const PARTS: &[&str] = &[
        "policy",
        "pipeline",
        "instructions",
        "stream",
        "relay",
        "node",
    ];

    fn target_dir() -> PathBuf {
        match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
            Some(p) if p.is_absolute() => p,
            Some(p) => project_root().join(p),
            None => project_root().join("target"),
        }
    }

    /// Runs `cmd`, echoing its output as it comes and keeping stdout in
    /// `<part>.out` and stderr in `<part>.err` (the report quotes a
    /// compiler error from there when a part could not run).
    fn run_tee(cmd: &mut Command, dir: &std::path::Path, part: &str) -> Result<bool> {
        eprintln!("bench: running {cmd:?}");
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("could not start {cmd:?}"))?;
        let create = |ext: &str| {
            let p = dir.join(format!("{part}.{ext}"));
            std::fs::File::create(&p).with_context(|| format!("create {}", p.display()))
        };
        let (mut out, mut err) = (create("out")?, create("err")?);
        let stderr = child.stderr.take().context("stderr is piped")?;
        let errors = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let _ = writeln!(err, "{line}");
            }
        });
        let stdout = child.stdout.take().context("stdout is piped")?;
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            writeln!(out, "{line}")?;
        }
        let _ = errors.join();
        Ok(child.wait()?.success())
    }

    pub fn bench(write_docs: bool, only: &[String], node_args: &[String]) -> Result<()> {
        let started = Instant::now();
        let since = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_secs();
        for p in only {
            if !PARTS.contains(&p.as_str()) {
                bail!(
                    "unknown bench part `{p}`: expected some of {}",
                    PARTS.join(", ")
                );
            }
        }
        let wants = |p: &str| only.is_empty() || only.iter().any(|o| o == p);
        if wants("node") && !is_root() {
            bail!(
                "the node benchmarks load eBPF programs and build network namespaces: run \
                 `cargo xtask bench` as root (or `--only policy,pipeline,instructions,stream,relay` without root)"
            );
        }
        let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        build()?;
        let target = target_dir();
        let dir = target.join("bench");
        std::fs::create_dir_all(&dir)?;
        let mut parts: Vec<String> = Vec::new();
        let mut node_failed = false;
        if wants("policy") {
            // Item 5 (criterion); short times keep the whole bench near 10 minutes.
            let ok = run_tee(
                cargo().args([
                    "bench",
                    "-p",
                    "flowaudit-policy",
                    "--bench",
                    "eval",
                    "--",
                    "--warm-up-time",
                    "1",
                    "--measurement-time",
                    "3",
                ]),
                &dir,
                "policy",
            )?;
            parts.push(format!("policy={}", if ok { "ok" } else { "failed" }));
        }
        // Item 4 and the stream's capacity: #[ignore]d measurement tests of
        // the agent crate (tests never assert on time).
        for (part, test) in [
            ("pipeline", "pipeline_capacity"),
            // The same pipeline's instructions per record, and the export
            // file's JSON writer's per line, counted by callgrind: the
            // figures here the machine's load cannot move
            // (`pipeline_instructions`, `json_line_instructions`).
            ("instructions", "_instructions"),
            ("stream", "stream_throughput"),
            // Issue 17: the relay's added delay and its throughput, 3 nodes.
            ("relay", "relay_throughput"),
        ] {
            if wants(part) {
                let ok = run_tee(
                    cargo().args([
                        "test",
                        "--release",
                        "-p",
                        "flowaudit",
                        test,
                        "--",
                        "--ignored",
                        "--nocapture",
                    ]),
                    &dir,
                    part,
                )?;
                parts.push(format!("{part}={}", if ok { "ok" } else { "failed" }));
            }
        }
        if wants("node") {
            // Items 1, 2, 3 and 6: the simulated node with the real agent.
            let ok = run_tee(
                Command::new(target.join("release/flowaudit-bench"))
                    .arg("run")
                    .arg("--agent")
                    .arg(target.join("release/flowaudit"))
                    .args(node_args)
                    .current_dir(project_root()),
                &dir,
                "node",
            )?;
            node_failed = !ok;
            parts.push(format!("node={}", if ok { "ok" } else { "failed" }));
        }
        let mut report = Command::new(target.join("release/flowaudit-bench"));
        report
            .arg("report")
            .arg("--dir")
            .arg(&dir)
            .arg("--criterion")
            .arg(target.join("criterion"))
            .arg("--since")
            .arg(since.to_string())
            .arg("--seconds")
            .arg(format!("{:.0}", started.elapsed().as_secs_f64()))
            .arg("--load-before")
            .arg(
                load_before
                    .split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" "),
            )
            .current_dir(project_root());
        for p in &parts {
            report.arg("--part").arg(p);
        }
        if write_docs && !node_failed {
            report
                .arg("--write-docs")
                .arg(project_root().join("docs/benchmarks.md"));
        }
        run(&mut report)?;
        if node_failed {
            bail!("flowaudit-bench (items 1, 2, 3, 6) failed: see its error above");
        }
        eprintln!("bench: done in {:.0} s", started.elapsed().as_secs_f64());
        Ok(())
    }
}

#[cfg(test)]
mod venv_tests {
    use std::path::Path;

    use super::venv_dir_from;

    #[test]
    fn the_venv_is_under_target_unless_flowaudit_venv_says_otherwise() {
        let root = Path::new("/src/flowaudit");
        assert_eq!(venv_dir_from(root, None), root.join("target/venv"));
        assert_eq!(
            venv_dir_from(root, Some("".into())),
            root.join("target/venv")
        );
        assert_eq!(
            venv_dir_from(root, Some("/opt/fa-venv".into())),
            Path::new("/opt/fa-venv")
        );
    }
}
