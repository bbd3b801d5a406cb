//! flowaudit's intended-flow policy: loading FlowPolicy documents (rules over SPIFFE
//! IDs) and imported CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy / Kubernetes
//! NetworkPolicy documents, compiling them into an index, and judging flows (source,
//! destination, port, encryption, failure) into a verdict with findings. The
//! `flowaudit policy` subcommands live in [`cli`]; the agent loads with
//! [`load_paths`], keeps the [`PolicySet`] behind an atomic pointer, and calls
//! [`PolicySet::evaluate`] per flow.

pub mod cli;
mod diag;
mod engine;
mod flowpolicy;
mod import;
mod index;
pub mod ir;
mod load;
mod model;
mod ports;
pub mod spiffe;
mod yaml;

pub use diag::{Diagnostic, PolicyError, Severity};
pub use engine::PolicySet;
pub use load::{
    CheckReport, Loaded, Source, Summary, check_paths, check_sources, expand_paths, load_paths,
    load_sources,
};
pub use model::{
    AuthSide, Decision, EncryptionState, EvalOptions, Finding, FindingKind, Flow, IdentitySource,
    Labels, MutualAuth, MutualAuthSource, MutualAuthState, NO_CILIUM, NoCilium, ObservedEncryption,
    PathEncryption, Peer, PeerKind, Verdict,
};
pub use ports::{PortRange, PortSet};
