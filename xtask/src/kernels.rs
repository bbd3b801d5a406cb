//! `cargo xtask kernels`: the privileged integration tests that depend on
//! the kernel (capture, mTLS payload, identity ownership, scenario, two
//! nodes on one kernel, Cilium's pinned maps), run on
//! the kernels kind users' hosts run, each booted under QEMU with virtme-ng
//! and the host's filesystem shared. The binaries are built once, on the
//! host. Kernels are Debian's own packages (5.10 from bullseye, 6.1 from
//! bookworm, 6.12 from bookworm-backports), fetched with apt through a
//! private source list (the machine's apt setup is not touched), unpacked
//! under `target/kernels/` and kept there: a second run downloads nothing.
//!
//! One more entry boots 6.1 with `lockdown=confidentiality`, where the
//! kernel refuses `bpf_probe_read_kernel`: the agent must start degraded
//! and the tests assert the named degradation.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{cargo, cmd_output, project_root, run, venv_dir};

/// A kernel of the matrix.
pub struct Kernel {
    /// What `--kernel` names, e.g. "6.1" or "6.1-lockdown".
    pub name: &'static str,
    /// Debian package series: `linux-image-<series>.*-amd64`.
    series: &'static str,
    /// Debian suite that carries it.
    suite: &'static str,
    /// Extra kernel command line.
    append: &'static str,
    /// The test binaries run on it (each in `TESTS`), each optionally
    /// narrowed to the tests whose names contain a filter: `"identity"` or
    /// `"identity:local_ends"`. A filter that selects nothing fails the run.
    tests: &'static [&'static str],
}

/// Every kernel test binary; of identity, the attestation of local ends.
const EVERY_SUITE_LOCAL_ATTESTATION: &[&str] = &[
    "capture",
    "mtls",
    "identity:local_ends_and_same_node_peers_are_attested",
    "scenario",
    "nodes",
    "cilium",
];

pub const MATRIX: &[Kernel] = &[
    Kernel {
        name: "5.10",
        series: "5.10",
        suite: "bullseye",
        append: "",
        // Every suite; of identity, as on 6.1, the attestation of local
        // ends (the whole identity suite runs under the lockdown).
        tests: EVERY_SUITE_LOCAL_ATTESTATION,
    },
    Kernel {
        name: "6.1",
        series: "6.1",
        suite: "bookworm",
        append: "",
        // Every suite; of identity, the attestation of local ends. How the
        // agent rides out a SPIRE outage or an unauthorized delegate does
        // not depend on the kernel once attestation works: the lockdown
        // runs the whole identity suite.
        tests: EVERY_SUITE_LOCAL_ATTESTATION,
    },
    Kernel {
        name: "6.12",
        series: "6.12",
        suite: "bookworm-backports",
        append: "",
        // 6.12, like the hosts' 6.18, is past 6.10: the same helpers and
        // the same code paths as on the host, where every suite runs. Here
        // the programs load and capture, the DaemonSet's nodes work, and
        // local ends are attested; payload (mtls), verdicts (scenario) and
        // Cilium's maps (plain bpf(2)) are checked on 5.10 and 6.1.
        tests: &[
            "capture",
            "nodes",
            "identity:local_ends_and_same_node_peers_are_attested",
        ],
    },
    Kernel {
        name: "6.1-lockdown",
        series: "6.1",
        suite: "bookworm",
        append: "lockdown=confidentiality",
        // What lockdown takes away shows in owners, failures, bytes and pid
        // attestation; the payload and the verdicts do not depend on it.
        tests: &["capture", "identity", "nodes"],
    },
];

/// The test binaries (of `flowaudit-tests`) that depend on the kernel.
const TESTS: &[&str] = &["capture", "mtls", "identity", "scenario", "nodes", "cilium"];

fn cache_dir() -> PathBuf {
    std::env::var_os("FLOWAUDIT_KERNEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target/kernels"))
}

/// Options for apt-get/apt-cache that use our own source list, package
/// lists and cache, leaving the machine's apt configuration alone.
fn apt_options(dir: &Path) -> Vec<String> {
    vec![
        format!(
            "-oDir::Etc::sourcelist={}",
            dir.join("sources.list").display()
        ),
        "-oDir::Etc::sourceparts=-".into(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
        "-oAPT::Sandbox::User=root".into(),
    ]
}

/// The unpacked package of this series, if one is in the cache.
fn cached(series: &str) -> Option<PathBuf> {
    let prefix = format!("linux-image-{series}.");
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache_dir())
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
                && p.join(".complete").exists()
        })
        .collect();
    found.sort();
    found.pop()
}

/// Downloads (once) and unpacks the newest Debian kernel of `k.series`;
/// returns the unpacked package directory.
fn fetch(k: &Kernel) -> Result<PathBuf> {
    if let Some(dir) = cached(k.series) {
        return Ok(dir);
    }
    let cache = cache_dir();
    let apt = cache.join("apt");
    for d in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(apt.join(d))?;
    }
    let mirror = "http://deb.debian.org/debian";
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    let sources: String = ["bullseye", "bookworm", "bookworm-backports"]
        .iter()
        .map(|s| format!("deb [signed-by={keyring}] {mirror} {s} main\n"))
        .collect();
    std::fs::write(apt.join("sources.list"), sources)?;
    let opts = apt_options(&apt);
    eprintln!("kernels: looking up Debian's {} kernels", k.series);
    run(Command::new("apt-get").args(&opts).args(["update", "-qq"]))?;
    let names = cmd_output(Command::new("apt-cache").args(&opts).args([
        "search",
        "--names-only",
        &format!("^linux-image-{}\\.[0-9]", k.series.replace('.', "\\.")),
    ]))?;
    let package = newest_package(&names, k.series).with_context(|| {
        format!(
            "Debian's {} has no linux-image-{}.*-amd64 package",
            k.suite, k.series
        )
    })?;
    eprintln!("kernels: downloading {package}");
    run(Command::new("apt-get")
        .args(&opts)
        .args(["download", "-qq", &package])
        .current_dir(&apt))?;
    let deb = std::fs::read_dir(&apt)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .with_context(|| format!("apt-get download left no {package}_*.deb"))?;
    let dir = cache.join(&package);
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&dir))?;
    let _ = std::fs::remove_file(&deb);
    // Debian builds modules.dep in the package's postinst; without it the
    // guest cannot load bridge, veth or nf_tables.
    let release = package
        .strip_prefix("linux-image-")
        .context("package name")?;
    run(Command::new("depmod").arg("-b").arg(&dir).arg(release))?;
    std::fs::write(dir.join(".complete"), b"")?;
    Ok(dir)
}

/// The newest `linux-image-<series>.N...-amd64` in `apt-cache search`
/// output, leaving out debug, unsigned, cloud and realtime flavours.
fn newest_package(search: &str, series: &str) -> Option<String> {
    let mut names: Vec<&str> = search
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| {
            n.starts_with(&format!("linux-image-{series}."))
                && n.ends_with("-amd64")
                && !["-rt-", "-cloud-", "-dbg", "-unsigned"]
                    .iter()
                    .any(|x| n.contains(x))
        })
        .collect();
    names.sort_by_key(|n| version_key(n));
    names.last().map(|n| n.to_string())
}

/// Numbers in a package name, for ordering 6.1.0-9 before 6.1.0-10.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Builds the agent, simpod and the kernel-dependent test binaries on the
/// host; returns (test name, executable).
fn build_tests() -> Result<Vec<(String, PathBuf)>> {
    // The test selection (as `cargo xtask test` builds it: nothing is
    // compiled twice), which also builds the agent and simpod.
    let mut cmd = cargo();
    cmd.args(crate::test_selection(true))
        .args(["--no-run", "--message-format=json"]);
    for t in TESTS {
        cmd.args(["--test", t]);
    }
    let out = cmd_output(&mut cmd)?;
    let mut found = Vec::new();
    for line in out.lines() {
        // {"reason":"compiler-artifact","target":{"name":"capture",...},"executable":"/..."}
        if !line.contains("\"compiler-artifact\"") {
            continue;
        }
        let Some(exe) = json_str(line, "executable") else {
            continue;
        };
        let Some(target) = line
            .split("\"target\":")
            .nth(1)
            .and_then(|t| json_str(t, "name"))
        else {
            continue;
        };
        // Other packages have test targets of the same name (policy's
        // `scenario`): only flowaudit-tests' are the kernel tests.
        if TESTS.contains(&target.as_str()) && line.contains("#flowaudit-tests@") {
            found.push((target, PathBuf::from(exe)));
        }
    }
    found.sort_by_key(|(t, _)| TESTS.iter().position(|x| x == t));
    if found.len() != TESTS.len() {
        bail!("cargo built {found:?}, expected the test binaries {TESTS:?}");
    }
    Ok(found)
}

/// A matrix entry's test binary and name filter ("" for all its tests).
fn split_entry(entry: &str) -> (&str, &str) {
    entry.split_once(':').unwrap_or((entry, ""))
}

/// The number before " passed" in libtest's `test result:` line (0 if none).
fn passed_count(summary: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| part.trim().strip_suffix(" passed"))
        .and_then(|n| n.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// What CI must show of a failed test binary's log: libtest's `failures:`
/// section (each failed test's output and panic), else the log's tail; at
/// most `max` lines, the last ones kept (the panic messages come last).
fn failure_excerpt(log: &str, max: usize) -> Vec<&str> {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.iter().position(|l| *l == "failures:").unwrap_or(0);
    let section = &lines[start..];
    section[section.len().saturating_sub(max)..].to_vec()
}

/// The string value of `"key":"..."` in a line of cargo's JSON (paths and
/// names here carry no escapes).
fn json_str(line: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":\"");
    let start = line.find(&pat)? + pat.len();
    let end = line[start..].find('"')?;
    Some(line[start..start + end].to_string())
}

/// Whether QEMU can use KVM here (else it emulates, several times slower).
fn kvm_usable() -> bool {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
        && (cpu.contains(" vmx") || cpu.contains(" svm"))
}

/// The slowest test in a test binary's log and its seconds, from the lines
/// that `--report-time` writes: `test NAME ... ok <12.345s>`.
fn slowest_test(log: &str) -> Option<(&str, f64)> {
    log.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("test ")?;
            let (name, outcome) = rest.split_once(" ... ")?;
            let secs = outcome.split_once('<')?.1.strip_suffix("s>")?;
            Some((name, secs.parse::<f64>().ok()?))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

/// The outcome of one kernel.
pub struct Outcome {
    pub kernel: String,
    pub release: String,
    pub seconds: f64,
    /// (test, passed, seconds, summary line)
    pub tests: Vec<(String, bool, u64, String)>,
    /// The failed tests' output, as CI must show it (the logs stay in the
    /// run directory, which a CI machine does not keep).
    pub failures: Vec<String>,
}

impl Outcome {
    pub fn passed(&self, expected: usize) -> bool {
        self.tests.len() == expected && self.tests.iter().all(|t| t.1)
    }
}

/// Boots `k` and runs the tests in it.
fn run_one(k: &Kernel, tests: &[(String, PathBuf)]) -> Result<Outcome> {
    let pkg = fetch(k)?;
    let release = std::fs::read_dir(pkg.join("lib/modules"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .next()
        .with_context(|| format!("{} has no lib/modules/<release>", pkg.display()))?;
    let vmlinuz = pkg.join(format!("boot/vmlinuz-{release}"));
    let root = project_root();
    let out = cache_dir().join("runs").join(k.name);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let mut script = String::from(
        "#!/bin/bash\n\
         # Written by `cargo xtask kernels`; runs inside the guest.\n\
         # /tmp must be the guest's own: the agent's unix sockets cannot live on 9p.\n\
         mount -t tmpfs none /tmp\n",
    );
    script.push_str(&format!(
        "export FLOWAUDIT_BIN={bin}/flowaudit SIMPOD_BIN={bin}/simpod\n\
         # One SPIRE release per mode (selectors, pid): the releases' answers do\n\
         # not depend on the kernel, and the host run covers all of them.\n\
         export FLOWAUDIT_SPIRE_RELEASES=1.9.6,1.10.2\n\
         cd {root}\nout={out}\nuname -r > $out/release\n",
        bin = root.join("target/release").display(),
        root = root.display(),
        out = out.display(),
    ));
    // Each test's time goes into its line of the log (`--report-time`, a
    // libtest option that the test binary takes only as unstable: the
    // environment variable lets a stable build's test harness accept it),
    // so that the matrix's summary can name where its time goes.
    for entry in k.tests {
        let (name, filter) = split_entry(entry);
        let exe = tests
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, exe)| exe)
            .with_context(|| format!("kernel {}: `{name}` is not in TESTS", k.name))?;
        script.push_str(&format!(
            "s=$(date +%s); RUSTC_BOOTSTRAP=1 {exe} {filter} --test-threads=1 -Z unstable-options --report-time > $out/{name}.log 2>&1; rc=$?\n\
             echo \"{name} $rc $(( $(date +%s) - s ))\" >> $out/results\n",
            exe = exe.display(),
        ));
    }
    let guest = out.join("guest.sh");
    std::fs::write(&guest, script)?;
    run(Command::new("chmod").arg("+x").arg(&guest))?;

    eprintln!("kernels: booting {} ({release}) for {:?}", k.name, k.tests);
    let started = Instant::now();
    // A guest that never reached the script (it wrote no release) is a boot
    // that failed, not a test result: it is booted again, with the failed
    // boot's console shown. Seen here (2026-12-04): Debian's 6.12 under
    // QEMU without KVM (TCG) now and then dies early in boot with "Oops:
    // int3" (a breakpoint of the kernel's live code patching hit after the
    // patch was done), before any init runs; a CI run failed the same way
    // (vng 255 a few seconds in, no release written, 6.12 only).
    // A guest that started the tests is never booted again.
    let mut boots = 0;
    let status = loop {
        boots += 1;
        let status = boot(k, &vmlinuz, &guest, &out)?;
        if release_of(&out).is_some() || boots == BOOTS {
            break status;
        }
        eprintln!(
            "kernels: {} boot {boots} of {BOOTS} never ran the script (vng {status}); its console ends:\n{}",
            k.name,
            console_tail(&out, CONSOLE_TAIL)
        );
        // The failed boot's console stays beside the next one's.
        std::fs::rename(
            out.join("console.log"),
            out.join(format!("console-boot{boots}.log")),
        )?;
        for e in std::fs::read_dir(&out)?.filter_map(|e| e.ok()) {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if e.path() != guest && !name.starts_with("console") {
                std::fs::remove_file(e.path())?;
            }
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let results = std::fs::read_to_string(out.join("results")).unwrap_or_default();
    let mut outcome = Outcome {
        kernel: k.name.to_string(),
        release: release_of(&out).unwrap_or_default(),
        seconds,
        tests: Vec::new(),
        failures: Vec::new(),
    };
    for line in results.lines() {
        let mut f = line.split_whitespace();
        let (Some(name), Some(rc), Some(secs)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let log = std::fs::read_to_string(out.join(format!("{name}.log"))).unwrap_or_default();
        let mut summary = log
            .lines()
            .rfind(|l| l.starts_with("test result:"))
            .unwrap_or("no test result line")
            .to_string();
        if let Some((test, secs)) = slowest_test(&log) {
            summary.push_str(&format!("; slowest: {test} {secs:.0}s"));
        }
        // A filter that matched nothing passes with "0 passed": not a pass.
        let ok = rc == "0" && passed_count(&summary) > 0;
        if !ok {
            outcome
                .failures
                .push(format!("--- {} {name} (exit {rc}) ---", k.name));
            outcome
                .failures
                .extend(failure_excerpt(&log, 200).into_iter().map(str::to_string));
        }
        outcome
            .tests
            .push((name.to_string(), ok, secs.parse().unwrap_or(0), summary));
    }
    if outcome.release.is_empty() {
        bail!(
            "kernel {} did not run the tests in {boots} boots (vng {status}); the last console ({}) ends:\n{}",
            k.name,
            out.join("console.log").display(),
            console_tail(&out, CONSOLE_TAIL)
        );
    }
    Ok(outcome)
}

/// How often a kernel is booted when its guest never reaches the script.
const BOOTS: u32 = 3;
/// How much of a failed boot's console an error shows.
const CONSOLE_TAIL: usize = 40;

/// One boot of `k` running `guest`; the console (with the kernel's boot
/// messages, so that a panic shows) goes to `out/console.log`.
fn boot(k: &Kernel, vmlinuz: &Path, guest: &Path, out: &Path) -> Result<ExitStatus> {
    // virtme-ng lives in the setup's virtual environment, not the system Python.
    // vng runs its companion tools (virtme-run, virtme-ng-init) by name,
    // from PATH: put the environment's bin first (a fresh machine has them
    // nowhere else: "virtme-run: not found", exit 127).
    let bin = venv_dir().join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path =
        std::env::join_paths(std::iter::once(bin.clone()).chain(std::env::split_paths(&path)))?;
    let mut vng = Command::new(bin.join("vng"));
    // --verbose: the boot console goes to the log. vng's own status says
    // little: 255 whenever the guest could not hand back the script's code
    // (Debian's kernels build virtio-serial as a module, so it never can).
    vng.env("PATH", path)
        .arg("--run")
        .arg(vmlinuz)
        .args(["--force-9p", "--cpus", "2", "--memory", "4G", "--verbose"])
        .arg("--rwdir")
        .arg(out)
        .arg("--exec")
        .arg(guest)
        .current_dir(out);
    if !kvm_usable() {
        vng.arg("--disable-kvm");
    }
    if !k.append.is_empty() {
        vng.args(["--append", k.append]);
    }
    let log = std::fs::File::create(out.join("console.log"))?;
    // CI runs with no standard input; the guest must not wait for one.
    vng.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("could not start vng (virtme-ng): run `cargo xtask setup`")
}

/// The release the guest wrote first thing, if it got that far.
fn release_of(out: &Path) -> Option<String> {
    let r = std::fs::read_to_string(out.join("release")).ok()?;
    let r = r.trim();
    (!r.is_empty()).then(|| r.to_string())
}

/// The last `max` lines of a boot's console, or why there are none.
fn console_tail(out: &Path, max: usize) -> String {
    match std::fs::read_to_string(out.join("console.log")) {
        Ok(log) if log.trim().is_empty() => "  (the console is empty)".to_string(),
        Ok(log) => {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(max)..]
                .iter()
                .map(|l| format!("  {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        Err(e) => format!("  (no console: {e})"),
    }
}

/// Runs the matrix (or the kernels named); fails if any test failed.
pub fn kernels(only: &[String]) -> Result<()> {
    for o in only {
        if !MATRIX.iter().any(|k| k.name == o) {
            let names: Vec<_> = MATRIX.iter().map(|k| k.name).collect();
            bail!("unknown kernel `{o}`: the matrix has {}", names.join(", "));
        }
    }
    // The guest mounts its own tmpfs on /tmp (the agent's Unix sockets
    // cannot live on 9p), which would hide a checkout under /tmp.
    if project_root().starts_with("/tmp") {
        bail!(
            "the kernel matrix cannot run from a checkout under /tmp ({}): the guest's own /tmp hides it; clone the project elsewhere",
            project_root().display()
        );
    }
    let started = Instant::now();
    let tests = build_tests()?;
    let mut outcomes: Vec<(&Kernel, Outcome)> = Vec::new();
    for k in MATRIX
        .iter()
        .filter(|k| only.is_empty() || only.iter().any(|o| o == k.name))
    {
        let o = run_one(k, &tests)?;
        for (name, ok, secs, summary) in &o.tests {
            eprintln!(
                "kernels: {} {name}: {} in {secs}s ({summary})",
                k.name,
                if *ok { "passed" } else { "FAILED" }
            );
        }
        for line in &o.failures {
            eprintln!("  {line}");
        }
        outcomes.push((k, o));
    }
    eprintln!(
        "\nkernel matrix ({:.0} s in all):",
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "{:<14} {:<22} {:>8}  result",
        "kernel", "release", "boot+run"
    );
    for (_, o) in &outcomes {
        let per: Vec<String> = o
            .tests
            .iter()
            .map(|(n, ok, s, _)| format!("{n} {} {s}s", if *ok { "ok" } else { "FAILED" }))
            .collect();
        eprintln!(
            "{:<14} {:<22} {:>7.0}s  {}",
            o.kernel,
            o.release,
            o.seconds,
            per.join(", ")
        );
    }
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|(k, o)| !o.passed(k.tests.len()))
        .map(|(_, o)| o)
        .collect();
    if !failed.is_empty() {
        let logs = cache_dir().join("runs");
        bail!(
            "the kernel matrix failed on {}: the test logs are in {}/<kernel>/",
            failed
                .iter()
                .map(|o| o.kernel.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            logs.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_plain_amd64_image_of_a_series() {
        let search = "\
linux-image-6.1.0-9-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-50-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-50-rt-amd64 - Linux 6.1 for 64-bit PCs, PREEMPT_RT (signed)
linux-image-6.1.0-50-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-6.1.0-51-amd64-dbg - Debug symbols
linux-image-6.12.95+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
";
        assert_eq!(
            newest_package(search, "6.1").as_deref(),
            Some("linux-image-6.1.0-50-amd64")
        );
        assert_eq!(
            newest_package(search, "6.12").as_deref(),
            Some("linux-image-6.12.95+deb12-amd64")
        );
        assert_eq!(newest_package(search, "5.10"), None);
    }

    #[test]
    fn a_failed_boot_shows_its_consoles_tail_or_says_why_there_is_none() {
        let dir = std::env::temp_dir().join(format!("xtask-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(console_tail(&dir, 2).starts_with("  (no console: "));
        assert_eq!(release_of(&dir), None);
        std::fs::write(dir.join("console.log"), "\n").unwrap();
        assert_eq!(console_tail(&dir, 2), "  (the console is empty)");
        std::fs::write(
            dir.join("console.log"),
            "a\nb\nKernel panic - not syncing\n",
        )
        .unwrap();
        assert_eq!(console_tail(&dir, 2), "  b\n  Kernel panic - not syncing");
        std::fs::write(dir.join("release"), " \n").unwrap();
        assert_eq!(release_of(&dir), None);
        std::fs::write(dir.join("release"), "6.12.95+deb12-amd64\n").unwrap();
        assert_eq!(release_of(&dir).as_deref(), Some("6.12.95+deb12-amd64"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_log_shows_its_failures_section_or_its_tail() {
        let log = "running 2 tests\ntest a ... ok\ntest b ... FAILED\n\nfailures:\n\n---- b stdout ----\npanicked at tests/b.rs:9:5:\nlost 3\n\nfailures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed";
        let got = failure_excerpt(log, 200);
        assert_eq!(got[0], "failures:");
        assert!(got.contains(&"lost 3"), "{got:?}");
        assert!(!got.contains(&"test a ... ok"), "{got:?}");
        // A crash before libtest's summary has no section: the tail shows.
        let crashed = "running 2 tests\ntest a ... ok\nSegmentation fault";
        assert_eq!(
            failure_excerpt(crashed, 2),
            ["test a ... ok", "Segmentation fault"]
        );
    }

    #[test]
    fn names_the_slowest_test_from_report_time_lines() {
        let log = "running 3 tests\ntest a ... ok <3.500s>\ntest b_slow ... FAILED <120.250s>\ntest c ... ok <9.000s>\nsome output ... <not a time>\n\ntest result: FAILED. 2 passed; 1 failed";
        assert_eq!(slowest_test(log), Some(("b_slow", 120.25)));
        // Without --report-time (an older log) there is nothing to name.
        assert_eq!(
            slowest_test("test a ... ok\ntest result: ok. 1 passed"),
            None
        );
    }

    #[test]
    fn reads_cargo_json_fields() {
        let line = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"capture"},"executable":"/w/target/release/deps/capture-3a95"}"#;
        assert_eq!(
            json_str(line, "executable").as_deref(),
            Some("/w/target/release/deps/capture-3a95")
        );
        let target = line.split("\"target\":").nth(1).unwrap();
        assert_eq!(json_str(target, "name").as_deref(), Some("capture"));
        assert_eq!(json_str(line, "missing"), None);
    }

    #[test]
    fn a_filter_that_selects_nothing_is_not_a_pass() {
        assert_eq!(
            passed_count(
                "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out; finished in 61.2s"
            ),
            1
        );
        assert_eq!(
            passed_count(
                "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 4 filtered out; finished in 0.0s"
            ),
            0
        );
        assert_eq!(passed_count("no test result line"), 0);
    }

    #[test]
    fn every_matrix_entry_names_a_kernel_test_binary() {
        for k in MATRIX {
            for entry in k.tests {
                let (name, filter) = split_entry(entry);
                assert!(
                    TESTS.contains(&name),
                    "{}: `{entry}` names no binary in TESTS",
                    k.name
                );
                assert!(
                    !filter.contains(' '),
                    "{}: `{entry}`: one filter word",
                    k.name
                );
            }
        }
        assert_eq!(
            split_entry("identity:local_ends"),
            ("identity", "local_ends")
        );
        assert_eq!(split_entry("capture"), ("capture", ""));
    }
}
