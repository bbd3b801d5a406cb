//! What the running agent knows about itself, shared (read-only for
//! readers) by the stages that update it and the front ends that report it:
//! `flowaudit status`, `/metrics`, `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use crate::capture::CaptureStats;
use crate::pipeline::PipelineStats;

pub struct AgentState {
    pub node_name: String,
    pub version: &'static str,
    pub started: SystemTime,
    pub capture: Arc<CaptureStats>,
    pub pipeline: Arc<PipelineStats>,
    /// Programs attached (set once capture started).
    pub attached: AtomicBool,
}

impl AgentState {
    pub fn new(
        node_name: String,
        capture: Arc<CaptureStats>,
        pipeline: Arc<PipelineStats>,
    ) -> Self {
        Self {
            node_name,
            version: env!("CARGO_PKG_VERSION"),
            started: SystemTime::now(),
            capture,
            pipeline,
            attached: AtomicBool::new(false),
        }
    }

    /// Ready to serve: programs attached (and, once policy lands, a policy loaded).
    pub fn ready(&self) -> bool {
        self.attached.load(Ordering::Relaxed)
    }
}
