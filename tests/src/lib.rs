//! Test support for flowaudit: a simulated Kubernetes node ([`simnode`]) whose
//! "pods" are network namespaces plus kubelet-style cgroup v2 directories, and
//! the wire types and drivers of the `simpod` traffic tool ([`simpod`]) that
//! runs inside those pods. Everything here needs root; nothing here skips.

pub mod agent;
pub mod cilium_double;
pub mod daemonset;
pub mod kube_standin;
pub mod scenario;
pub mod simnode;
pub mod simpod;
pub mod spire_double;
pub mod support;
pub mod tls;
pub mod workload_api_double;

pub use simnode::{Pod, PodSpec, SimError, SimNode, cleanup_stale};
