//! Builds the kernel programs (`agent-ebpf`) for `bpfel-unknown-none` with
//! the nightly toolchain and bpf-linker, so one `cargo build` of the agent
//! produces a binary with its eBPF object embedded. `cargo xtask setup`
//! installs what this needs.
//!
//! It also generates the gRPC service (`flowaudit.v1`) from
//! `proto/flowaudit/v1/flowaudit.proto` with tonic-prost-build, plus the
//! descriptor set that server reflection serves.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    build_proto()?;
    // `cargo fuzz` (`--cfg fuzzing`) builds the library for its parsers and
    // never loads programs: an empty object spares the nested nightly
    // `build-std` eBPF build, which CI's fuzz budget cannot afford. Loading
    // it fails clearly (capture/mod.rs `load`).
    println!("cargo:rerun-if-env-changed=CARGO_CFG_FUZZING");
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out_dir = std::env::var("OUT_DIR").context("OUT_DIR is not set")?;
        std::fs::write(std::path::Path::new(&out_dir).join("flowaudit"), [])
            .context("writing the empty eBPF object of a fuzz build")?;
        return Ok(());
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .iter()
        .find(|p| p.name.as_str() == "flowaudit-ebpf")
        .ok_or_else(|| anyhow!("package flowaudit-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("flowaudit-ebpf manifest has no parent directory"))?;
    if which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker is not on PATH: run `cargo xtask setup` (it builds bpf-linker against the nightly toolchain's LLVM)"
        ));
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}

/// Generates the `flowaudit.v1` messages, server and client into OUT_DIR,
/// and the encoded descriptor set that server reflection serves. protox
/// compiles the .proto in Rust, so no protoc or system include files are
/// needed (Debian's protoc lacks google/protobuf/timestamp.proto without
/// libprotobuf-dev).
fn build_proto() -> anyhow::Result<()> {
    use prost::Message as _;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR is not set")?);
    let proto = "../proto/flowaudit/v1/flowaudit.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../proto"])
        .map_err(|e| anyhow!("{proto} does not compile: {e:?}"))?;
    std::fs::write(
        out_dir.join("flowaudit_descriptor.bin"),
        fds.encode_to_vec(),
    )
    .context("writing the descriptor set")?;
    tonic_prost_build::configure()
        .compile_fds(fds)
        .with_context(|| format!("generating Rust code from {proto}"))
}
