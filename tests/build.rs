//! Generates the server half of SPIRE's Delegated Identity API
//! (`spire.api.agent.delegatedidentity.v1.DelegatedIdentity`) for the
//! `spire-double` test server, from the .proto files that the `spire-api`
//! crate ships in its package (`spire-api-sdk/proto/...`). The messages are
//! not generated again: they are spire-api's own (`extern_path`), so the
//! double and the agent's client speak exactly the same types. Needs
//! `protoc` (Debian's `protobuf-compiler`, or set PROTOC).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};

const DELEGATED_IDENTITY: &str = "spire/api/agent/delegatedidentity/v1/delegatedidentity.proto";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SPIRE_API_PROTO_DIR");
    let root = proto_root()?;
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

/// `<spire-api package>/spire-api-sdk/proto`: from SPIRE_API_PROTO_DIR if set,
/// else from `cargo metadata`, else from the registry sources in CARGO_HOME.
fn proto_root() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SPIRE_API_PROTO_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let has_proto = |p: &Path| p.join(DELEGATED_IDENTITY).is_file();
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
                .filter(|p| p.name.as_str() == "spire-api")
                .filter_map(|p| {
                    p.manifest_path
                        .parent()
                        .map(|d| d.as_std_path().join("spire-api-sdk/proto"))
                })
                .find(|d| has_proto(d));
            if let Some(dir) = found {
                return Ok(dir);
            }
            "the spire-api package has no spire-api-sdk/proto".to_owned()
        }
        Err(e) => e.to_string(),
    };
    // Fallback: ~/.cargo/registry/src/<index>/spire-api-0.11.*/
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(src) = cargo_home.map(|h| h.join("registry/src"))
        && let Ok(indexes) = std::fs::read_dir(&src)
    {
        let mut found: Vec<PathBuf> = indexes
            .flatten()
            .filter_map(|i| std::fs::read_dir(i.path()).ok())
            .flat_map(|d| d.flatten())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("spire-api-0.11.")
            })
            .map(|e| e.path().join("spire-api-sdk/proto"))
            .filter(|d| has_proto(d))
            .collect();
        found.sort();
        if let Some(dir) = found.pop() {
            return Ok(dir);
        }
    }
    Err(anyhow!(
        "cannot find the spire-api crate's protos ({meta_err}); set SPIRE_API_PROTO_DIR to <spire-api>/spire-api-sdk/proto"
    ))
}
