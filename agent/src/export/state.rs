//! What the running agent knows about itself, shared (read-only for
//! readers) by the stages that update it and the front ends that report it:
//! `flowaudit status`, `/metrics`, `/readyz`.
//!
//! Stages that land later report here: identity calls
//! [`AgentState::report_identity_cache`] and [`AgentState::report_spire`],
//! policy calls [`AgentState::report_policy`]; until they do, `status`
//! says "not available" for them. Their metric handles are in
//! [`AgentState::metrics`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::SystemTime;

use crate::capture::CaptureStats;
use crate::export::metrics::Metrics;
use crate::pipeline::PipelineStats;

/// The identity stage's cache, as `status` shows it.
#[derive(Debug, Clone, Default)]
pub struct IdentityCacheStatus {
    pub entries: u64,
}

/// The SPIRE Delegated Identity API connection.
#[derive(Debug, Clone, Default)]
pub struct SpireStatus {
    pub connected: bool,
    pub socket: String,
    /// "pid" or "selectors" once known; "disabled" without SPIRE.
    pub mode: String,
    /// Why not connected and what identities are meanwhile (empty when connected).
    pub detail: String,
}

/// The policy in force.
#[derive(Debug, Clone, Default)]
pub struct PolicyStatus {
    /// Identifies the version in force (e.g. a content hash); `None` while
    /// no valid policy has been loaded, which makes the agent not ready;
    /// empty when the agent runs without `--policy`.
    pub version: Option<String>,
    pub rules: u64,
    pub loaded: Option<SystemTime>,
    /// Why the last (re)load was rejected, if it was.
    pub last_error: Option<String>,
}

/// What later stages reported; `None` until they do.
#[derive(Debug, Clone, Default)]
pub struct StageStatus {
    pub identity_cache: Option<IdentityCacheStatus>,
    pub spire: Option<SpireStatus>,
    pub policy: Option<PolicyStatus>,
}

pub struct AgentState {
    pub node_name: String,
    pub version: &'static str,
    pub started: SystemTime,
    pub capture: Arc<CaptureStats>,
    pub pipeline: Arc<PipelineStats>,
    /// Programs attached (set once capture started).
    pub attached: AtomicBool,
    /// Every Prometheus metric handle (see `export::metrics`).
    pub metrics: Arc<Metrics>,
    stages: RwLock<StageStatus>,
}

#[allow(dead_code)] // `report_*` are called by the identity and policy stages
impl AgentState {
    pub fn new(
        node_name: String,
        capture: Arc<CaptureStats>,
        pipeline: Arc<PipelineStats>,
    ) -> Self {
        let version = env!("CARGO_PKG_VERSION");
        Self {
            node_name,
            version,
            started: SystemTime::now(),
            metrics: Arc::new(Metrics::new(version, capture.clone())),
            capture,
            pipeline,
            attached: AtomicBool::new(false),
            stages: RwLock::new(StageStatus::default()),
        }
    }

    /// Ready to serve: programs attached and, when a policy stage reports,
    /// a valid policy loaded.
    pub fn ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// `Err(reason)` when not ready, for `/readyz` and `status`.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.attached.load(Ordering::Relaxed) {
            return Err("kernel programs are not attached yet".into());
        }
        if let Some(p) = &self.stages().policy
            && p.version.is_none()
        {
            return Err(match &p.last_error {
                Some(e) => format!("no valid policy loaded: {e}"),
                None => "no valid policy loaded yet".into(),
            });
        }
        Ok(())
    }

    pub fn stages(&self) -> RwLockReadGuard<'_, StageStatus> {
        // Writers only replace whole values: a poisoned lock still holds a consistent one.
        self.stages.read().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut StageStatus)) {
        let mut g = self.stages.write().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
    }

    /// Identity stage: entries in its cache.
    pub fn report_identity_cache(&self, entries: u64) {
        self.update(|s| s.identity_cache = Some(IdentityCacheStatus { entries }));
    }

    /// Identity stage: SPIRE connection state (also sets `flowaudit_spire_connected`).
    pub fn report_spire(&self, status: SpireStatus) {
        self.metrics.set_spire_connected(status.connected);
        self.update(|s| s.spire = Some(status));
    }

    /// Policy stage: the policy in force (also sets `flowaudit_policy_rules`).
    /// Count each (re)load with `metrics.policy_reload(ok)` as well.
    pub fn report_policy(&self, status: PolicyStatus) {
        self.metrics.set_policy_rules(status.rules);
        self.update(|s| s.policy = Some(status));
    }
}
