//! flowaudit: an identity-aware flow auditor, as a library. The binary
//! (`main.rs`) is a thin command-line front; tests, benches and fuzz
//! targets use these modules' real types. Folders say what they hold:
//! `capture/` (kernel programs and records), `identity/` and `endpoints/`
//! (who each end is), `judge` (policy), `flow/` (the event vocabulary),
//! `export/` (metrics, gRPC, file), `cli/` (the commands).

/// The library's own test binary (which runs the pipeline and stream
/// benches) measures with the allocator the agent binary ships with.
#[cfg(test)]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod capture;
pub mod cilium;
pub mod cli;
pub mod endpoints;
pub mod export;
pub mod flow;
pub mod identity;
pub mod judge;
pub mod pipeline;
pub mod relay;
pub mod runtime;
