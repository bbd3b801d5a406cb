//! Generates the server half of SPIRE's Delegated Identity API
//! (`spire.api.agent.delegatedidentity.v1.DelegatedIdentity`) for the
//! `spire-double` test server, from the .proto files that the `spire-api`
//! crate ships in its package (`spire-api-sdk/proto/...`). The messages are
//! not generated again: they are spire-api's own (`extern_path`), so the
//! double and the agent's client speak exactly the same types. Also the
//! server half of the SPIFFE Workload API (`SpiffeWorkloadAPI`) for
//! `workload_api_double`, from the `workload.proto` that the `spiffe` crate
//! (the agent's client) ships in `src/proto`. Needs `protoc` (Debian's
//! `protobuf-compiler`, or set PROTOC).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};

const DELEGATED_IDENTITY: &str = "spire/api/agent/delegatedidentity/v1/delegatedidentity.proto";
const WORKLOAD_API: &str = "workload.proto";

/// Where a crate's package keeps its .proto files.
struct ProtoSource {
    /// Overrides the search.
    env: &'static str,
    package: &'static str,
    /// Registry directory name prefix (`<package>-<version>`), for the fallback.
    dir_prefix: &'static str,
    /// The proto root inside the package.
    subdir: &'static str,
    /// A file that must be under the root.
    proto: &'static str,
}

const SPIRE_API: ProtoSource = ProtoSource {
    env: "SPIRE_API_PROTO_DIR",
    package: "spire-api",
    dir_prefix: "spire-api-0.11.",
    subdir: "spire-api-sdk/proto",
    proto: DELEGATED_IDENTITY,
};

const SPIFFE: ProtoSource = ProtoSource {
    env: "SPIFFE_PROTO_DIR",
    package: "spiffe",
    dir_prefix: "spiffe-0.19.",
    subdir: "src/proto",
    proto: WORKLOAD_API,
};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
    delegated_identity()?;
    workload_api()
}

fn workload_api() -> anyhow::Result<()> {
    let root = proto_root(&SPIFFE)?;
    let proto = root.join(WORKLOAD_API);
    println!("cargo:rerun-if-changed={}", proto.display());
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_protos(&[&proto], &[&root])
        .with_context(|| format!("compiling {}", proto.display()))
}

fn delegated_identity() -> anyhow::Result<()> {
    let root = proto_root(&SPIRE_API)?;
    let proto = root.join(DELEGATED_IDENTITY);
    println!("cargo:rerun-if-changed={}", proto.display());
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .extern_path(".spire.api.types", "::spire_api::pb::spire::api::types")
        .extern_path(
            ".spire.api.agent.delegatedidentity.v1",
            "::spire_api::pb::spire::api::agent::delegatedidentity::v1",
        )
        .compile_protos(&[&proto], &[&root])
        .with_context(|| {
            format!(
                "compiling {} (protoc must be installed: `apt-get install protobuf-compiler`, or set PROTOC)",
                proto.display()
            )
        })
}

/// `<package>/<subdir>` (e.g. `<spire-api package>/spire-api-sdk/proto`):
/// from the `env` variable if set, else from `cargo metadata`, else from the
/// registry sources in CARGO_HOME.
fn proto_root(src: &ProtoSource) -> anyhow::Result<PathBuf> {
    println!("cargo:rerun-if-env-changed={}", src.env);
    if let Some(dir) = std::env::var_os(src.env) {
        return Ok(PathBuf::from(dir));
    }
    let has_proto = |p: &Path| p.join(src.proto).is_file();
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("Cargo.toml");
    let mut cmd = cargo_metadata::MetadataCommand::new();
    cmd.manifest_path(&manifest);
    if let Ok(target) = std::env::var("TARGET") {
        cmd.other_options(vec!["--filter-platform".to_owned(), target]);
    }
    let meta_err = match cmd.exec() {
        Ok(meta) => {
            let found = meta
                .packages
                .iter()
                .filter(|p| p.name.as_str() == src.package)
                .filter_map(|p| {
                    p.manifest_path
                        .parent()
                        .map(|d| d.as_std_path().join(src.subdir))
                })
                .find(|d| has_proto(d));
            if let Some(dir) = found {
                return Ok(dir);
            }
            format!("the {} package has no {}", src.package, src.subdir)
        }
        Err(e) => e.to_string(),
    };
    // Fallback: ~/.cargo/registry/src/<index>/<dir_prefix>*/
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(registry) = cargo_home.map(|h| h.join("registry/src"))
        && let Ok(indexes) = std::fs::read_dir(&registry)
    {
        let mut found: Vec<PathBuf> = indexes
            .flatten()
            .filter_map(|i| std::fs::read_dir(i.path()).ok())
            .flat_map(|d| d.flatten())
            .filter(|e| e.file_name().to_string_lossy().starts_with(src.dir_prefix))
            .map(|e| e.path().join(src.subdir))
            .filter(|d| has_proto(d))
            .collect();
        found.sort();
        if let Some(dir) = found.pop() {
            return Ok(dir);
        }
    }
    Err(anyhow!(
        "cannot find the {} crate's protos ({meta_err}); set {} to <{}>/{}",
        src.package,
        src.env,
        src.package,
        src.subdir
    ))
}
