//! `cargo xtask setup`: installs what a fresh machine lacks to build and test
//! flowaudit (nightly rust-src, bpf-linker built against nightly's own
//! libLLVM, cargo-fuzz, Debian and PyPI packages). Every step first checks
//! whether its result is already there, so a second run takes seconds.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cmd_output, project_root, run, venv_dir};

/// Debian packages the build, tests, demo and benchmarks use.
const APT_PACKAGES: &[&str] = &[
    "iproute2",          // ip netns/link/addr: the simulated node
    "bpftool",           // inspecting loaded programs when debugging a failure
    "protobuf-compiler", // protoc for tonic-build / grpcio-tools
    "prometheus",        // a real Prometheus scraping /metrics, promtool
    "openssl",           // real TLS stacks for the mTLS tests
    "iperf3",            // bulk throughput benchmark
    "libbpf-tools",      // tcplife: a peer watching the same connection storm
    "conntrack",         // conntrack -E: another peer for the storm
    "netcat-openbsd",
    "python3-venv", // the virtual environment that holds every PyPI package
    "nftables",     // the demo's stand-in for a network policy that drops a flow
    "shellcheck",   // deploy/validate.sh lints the deploy scripts
    "valgrind",     // callgrind counts the pipeline's instructions (`cargo xtask bench`)
    // The kernel matrix (`cargo xtask kernels`): QEMU boots Debian's kernels,
    // kmod's depmod indexes their modules, virtme-ng (PyPI) shares this
    // machine's filesystem with the guest.
    "qemu-system-x86",
    "kmod",
    "busybox-static",
    // Stock grpc-go client on the agent's Unix socket (tests/tests/stock_clients.rs),
    // built offline in GOPATH mode against Debian's Go sources.
    "golang-go",
    "golang-google-grpc-dev",
];

/// Where cargo installs binaries (bpf-linker, cargo-fuzz).
fn cargo_bin_dir() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        });
    home.join("bin")
}

pub fn setup() -> Result<()> {
    let started = std::time::Instant::now();
    check_linux_prereqs()?;
    nightly_rust_src()?;
    lint_tools()?;
    bpf_linker()?;
    apt_packages()?;
    pip_packages()?;
    cargo_fuzz()?;
    eprintln!("setup: done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn check_linux_prereqs() -> Result<()> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "this kernel exposes no BTF (/sys/kernel/btf/vmlinux is missing); flowaudit needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
        );
    }
    // The manifests are rendered with the real kustomize inside kubectl
    // (deploy/validate.sh, tests/src/daemonset.rs); Debian packages no kubectl.
    cmd_output(Command::new("kubectl").args(["version", "--client"])).context(
        "kubectl (with its built-in kustomize) is needed: deploy/validate.sh and the node tests render the manifests with `kubectl kustomize`; install it from https://kubernetes.io/docs/tasks/tools/",
    )?;
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = cmd_output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("the nightly toolchain is needed to build the eBPF programs (-Z build-std); install it with `rustup toolchain install nightly`")?;
    Ok(PathBuf::from(out.trim()))
}

fn nightly_rust_src() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        eprintln!("setup: nightly rust-src present");
        return Ok(());
    }
    eprintln!("setup: installing rust-src for nightly");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// The gate's tools: rustfmt and clippy on the default toolchain, clippy on
/// nightly (for the eBPF crate). `rustup component add` is idempotent, but
/// it is skipped when the tool answers already (no network needed).
fn lint_tools() -> Result<()> {
    for (toolchain, component, probe) in [
        (None, "rustfmt", ["fmt", "--version"]),
        (None, "clippy", ["clippy", "--version"]),
        (Some("nightly"), "clippy", ["clippy", "--version"]),
    ] {
        let mut cmd = Command::new("cargo");
        if let Some(t) = toolchain {
            cmd.arg(format!("+{t}"));
        }
        if cmd_output(cmd.args(probe)).is_ok() {
            continue;
        }
        eprintln!(
            "setup: installing {component} for {}",
            toolchain.unwrap_or("the default toolchain")
        );
        let mut add = Command::new("rustup");
        add.args(["component", "add", component]);
        if let Some(t) = toolchain {
            add.args(["--toolchain", t]);
        }
        run(&mut add)?;
    }
    eprintln!("setup: rustfmt and clippy present");
    Ok(())
}

/// The LLVM major version of the nightly toolchain, e.g. 22.
fn nightly_llvm_major() -> Result<u32> {
    let out = cmd_output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let version = out
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("unexpected LLVM version {version:?}"))
}

fn bpf_linker() -> Result<()> {
    let bin = cargo_bin_dir().join("bpf-linker");
    if bin.exists()
        && Command::new(&bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        eprintln!("setup: bpf-linker present");
        return Ok(());
    }
    let major = nightly_llvm_major()?;
    let sysroot = nightly_sysroot()?;
    // bpf-linker must link the very libLLVM the nightly rustc emits bitcode
    // for; no prebuilt binary matches it, so build it against that library.
    let lib_dir = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        })
        .with_context(|| format!("no libLLVM.so.{major}* in {}", lib_dir.display()))?;
    let soname = libllvm
        .file_name()
        .context("libLLVM path has no file name")?;
    let prefix = project_root().join("target/llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in [std::ffi::OsStr::new("libLLVM.so"), soname] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), libllvm.display()))?;
    }
    eprintln!(
        "setup: building bpf-linker against {} (about a minute)",
        libllvm.display()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-args=-Wl,-rpath,{}", lib_dir.display()),
        ))
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        eprintln!("setup: apt packages present");
        return Ok(());
    }
    eprintln!("setup: installing apt packages {missing:?}");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// PyPI packages: pinned requirement files, installed into a virtual
/// environment ([`venv_dir`]) and never into the system Python, whose own
/// packages (awscli's botocore...) pip would otherwise up- or downgrade. A
/// stamp in the environment records the last install of each file's exact
/// content, so unchanged files cost nothing and a new environment gets all.
fn pip_packages() -> Result<()> {
    let root = project_root();
    let venv = venv_dir();
    let python = venv.join("bin/python3");
    if python.exists() {
        eprintln!("setup: Python virtual environment {}", venv.display());
    } else {
        eprintln!(
            "setup: creating the Python virtual environment {}",
            venv.display()
        );
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    for req in ["deploy/requirements.txt", "tests/requirements.txt"] {
        let path = root.join(req);
        let Ok(content) = std::fs::read(&path) else {
            continue;
        };
        let stamp = venv.join("flowaudit-stamps").join(format!(
            "pip-{}-{:016x}",
            req.replace('/', "_"),
            fnv1a(&content)
        ));
        if stamp.exists() {
            eprintln!("setup: {req} installed");
            continue;
        }
        eprintln!("setup: pip install -r {req} (into {})", venv.display());
        run(Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&path))?;
        std::fs::create_dir_all(stamp.parent().context("stamp has a parent")?)?;
        std::fs::write(&stamp, b"")?;
    }
    Ok(())
}

fn cargo_fuzz() -> Result<()> {
    let bin = cargo_bin_dir().join("cargo-fuzz");
    if bin.exists() {
        eprintln!("setup: cargo-fuzz present");
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}
