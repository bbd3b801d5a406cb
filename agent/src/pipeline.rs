//! The userspace pipeline: kernel events in, flow events out to every sink.
//! Capture -> build flow (orientation, owner, timing) -> sinks (export
//! file, metrics, stream). Joined by a bounded channel, so a burst waits in
//! the kernel ring buffer rather than in unbounded memory, and every loss is
//! counted there.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::capture::Clock;
use crate::capture::record::KernelEvent;
use crate::export::Sink;
use crate::flow::FlowEvent;

#[derive(Debug, Default)]
pub struct PipelineStats {
    /// Flow events that went out to the sinks.
    pub flows: AtomicU64,
}

pub struct Pipeline {
    pub node_name: String,
    pub sinks: Vec<Box<dyn Sink>>,
    pub stats: Arc<PipelineStats>,
}

impl Pipeline {
    /// Runs until the capture side closes the channel, then flushes.
    pub async fn run(mut self, mut rx: mpsc::Receiver<KernelEvent>) {
        let mut clock = Clock::now();
        let mut clock_at = Instant::now();
        while let Some(ev) = rx.recv().await {
            // Re-anchor monotonic->wall now and then: NTP may step the wall clock.
            if clock_at.elapsed() > Duration::from_secs(10) {
                clock = Clock::now();
                clock_at = Instant::now();
            }
            self.handle(&ev, &clock);
            // Drain what is queued, then flush once: one write per burst.
            while let Ok(ev) = rx.try_recv() {
                self.handle(&ev, &clock);
            }
            self.flush();
        }
        self.flush();
    }

    fn handle(&mut self, ev: &KernelEvent, clock: &Clock) {
        let flow = Arc::new(FlowEvent::from_kernel(ev, &self.node_name, clock));
        self.stats.flows.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(summary = %flow.summary, "flow");
        for sink in &mut self.sinks {
            sink.on_flow(&flow);
        }
    }

    fn flush(&mut self) {
        for sink in &mut self.sinks {
            sink.flush();
        }
    }
}
