//! The userspace pipeline: kernel events in, flow events out to every sink.
//! capture -> build flow (orientation, owner, timing) -> enrich (endpoints,
//! SPIFFE IDs) -> judge (policy) -> sinks (export file, metrics, stream).
//! Joined by a bounded channel, so a burst waits in the kernel ring buffer
//! rather than in unbounded memory, and every loss is counted there.
//!
//! A flow whose local end's attested identity is still being fetched is
//! parked for at most `identity_wait`, then goes out with what is known
//! (UNKNOWN, counted). A CONNECT whose handshake bytes are not yet
//! classified is parked likewise for at most `encryption_wait`. Later flows
//! of a parked socket queue behind it, so a socket's CONNECT always precedes
//! its CLOSE; other flows do not wait.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::capture::Clock;
use crate::capture::record::{KernelEvent, KernelRecord};
use crate::export::Sink;
use crate::flow::encryption::EncryptionTracker;
use crate::flow::{EventKind, FlowEvent};
use crate::identity::spire::{Lookup, WorkloadQuery};
use crate::identity::{Enriched, Enricher};
use crate::judge::Judge;

#[derive(Debug, Default)]
pub struct PipelineStats {
    /// Flow events that went out to the sinks.
    pub flows: AtomicU64,
    /// Flows that waited for SPIRE and went out without its answer.
    pub identity_timeouts: AtomicU64,
    /// Flows that waited for SPIRE's answer, and how long (microseconds).
    pub identity_waits: AtomicU64,
    pub identity_wait_us_total: AtomicU64,
    pub identity_wait_us_max: AtomicU64,
    /// CONNECTs that waited for their handshake to be classified, and those
    /// that went out before it was (encryption not final).
    pub encryption_waits: AtomicU64,
    pub encryption_timeouts: AtomicU64,
}

struct Parked {
    flow: FlowEvent,
    /// The identity lookup still awaited; None when answered, not needed,
    /// or when only queued behind an earlier parked flow of the same socket.
    query: Option<WorkloadQuery>,
    parked_at: Instant,
    deadline: Instant,
    /// Until when a CONNECT waits for its handshake to be classified.
    encryption_deadline: Option<Instant>,
}

pub struct Pipeline {
    pub node_name: String,
    pub enricher: Option<Enricher>,
    pub judge: Judge,
    pub sinks: Vec<Box<dyn Sink>>,
    pub stats: Arc<PipelineStats>,
    pub identity_wait: Duration,
    pub encryption_wait: Duration,
    pub encryption: EncryptionTracker,
    parked: VecDeque<Parked>,
    parked_sockets: HashSet<u64>,
}

impl Pipeline {
    pub fn new(
        node_name: String,
        enricher: Option<Enricher>,
        judge: Judge,
        sinks: Vec<Box<dyn Sink>>,
        stats: Arc<PipelineStats>,
        identity_wait: Duration,
        encryption_wait: Duration,
    ) -> Self {
        Self {
            node_name,
            enricher,
            judge,
            sinks,
            stats,
            identity_wait,
            encryption_wait,
            encryption: EncryptionTracker::default(),
            parked: VecDeque::new(),
            parked_sockets: HashSet::new(),
        }
    }

    /// Runs until the capture side closes the channel, then releases what is
    /// parked and flushes.
    pub async fn run(mut self, mut rx: mpsc::Receiver<KernelRecord>) {
        let mut clock = Clock::now();
        let mut clock_at = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    // Re-anchor monotonic->wall now and then: NTP may step the wall clock.
                    if clock_at.elapsed() > Duration::from_secs(10) {
                        clock = Clock::now();
                        clock_at = Instant::now();
                    }
                    self.record(ev, &clock);
                    // Drain what is queued, then flush once: one write per burst.
                    while let Ok(ev) = rx.try_recv() {
                        self.record(ev, &clock);
                    }
                    self.release(false);
                    self.flush();
                }
                _ = tick.tick(), if !self.parked.is_empty() => {
                    self.release(false);
                    self.flush();
                }
            }
        }
        // Shutting down: parked flows still get their bounded wait.
        let until = Instant::now() + self.identity_wait.max(self.encryption_wait);
        while !self.parked.is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.release(false);
        }
        self.release(true);
        self.flush();
    }

    fn record(&mut self, rec: KernelRecord, clock: &Clock) {
        match rec {
            KernelRecord::Flow(ev) => self.handle(&ev, clock),
            KernelRecord::Payload(p) => self.encryption.on_chunk(&p),
        }
    }

    fn handle(&mut self, ev: &KernelEvent, clock: &Clock) {
        let mut flow = FlowEvent::from_kernel(ev, &self.node_name, clock);
        let cookie = flow.socket.cookie;
        let query = match &mut self.enricher {
            Some(e) => match e.enrich(&mut flow) {
                Enriched::Done => None,
                Enriched::Pending(q) => Some(q),
            },
            None => None,
        };
        let now = Instant::now();
        let encryption_deadline = (flow.event == EventKind::Connect
            && !self.encryption_wait.is_zero()
            && !self.encryption.is_settled(cookie))
        .then(|| now + self.encryption_wait);
        if query.is_some() || encryption_deadline.is_some() || self.parked_sockets.contains(&cookie)
        {
            self.parked_sockets.insert(cookie);
            self.parked.push_back(Parked {
                flow,
                query,
                parked_at: now,
                deadline: now + self.identity_wait,
                encryption_deadline,
            });
            return;
        }
        self.emit(flow);
    }

    /// Sends out parked flows whose identity arrived or whose wait is over.
    /// `all`: at shutdown, everything goes.
    fn release(&mut self, all: bool) {
        if self.parked.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut still = VecDeque::with_capacity(self.parked.len());
        let mut blocked: HashSet<u64> = HashSet::new();
        while let Some(mut p) = self.parked.pop_front() {
            let cookie = p.flow.socket.cookie;
            if blocked.contains(&cookie) {
                still.push_back(p);
                continue;
            }
            let identified = match (p.query.take(), &mut self.enricher) {
                (Some(q), Some(e)) => {
                    let answer = e.poll(&q);
                    let done = !matches!(answer, Lookup::Pending) || all || now >= p.deadline;
                    if !done {
                        p.query = Some(q);
                    } else {
                        if matches!(answer, Lookup::Pending) {
                            self.stats.identity_timeouts.fetch_add(1, Ordering::Relaxed);
                        }
                        let waited = p.parked_at.elapsed().as_micros() as u64;
                        self.stats.identity_waits.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .identity_wait_us_total
                            .fetch_add(waited, Ordering::Relaxed);
                        self.stats
                            .identity_wait_us_max
                            .fetch_max(waited, Ordering::Relaxed);
                        e.apply_lookup(p.flow.local_end_mut(), answer);
                    }
                    done
                }
                // Answered, not needed, or queued behind an earlier flow of
                // its socket, which has gone.
                _ => true,
            };
            let classified = match p.encryption_deadline {
                None => true,
                Some(deadline) => {
                    let settled = self.encryption.is_settled(cookie);
                    let done = settled || all || now >= deadline;
                    if done {
                        self.stats.encryption_waits.fetch_add(1, Ordering::Relaxed);
                        if !settled {
                            self.stats
                                .encryption_timeouts
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        p.encryption_deadline = None;
                    }
                    done
                }
            };
            if identified && classified {
                self.emit(p.flow);
            } else {
                blocked.insert(cookie);
                still.push_back(p);
            }
        }
        self.parked_sockets = still.iter().map(|p| p.flow.socket.cookie).collect();
        self.parked = still;
    }

    fn emit(&mut self, mut flow: FlowEvent) {
        let cookie = flow.socket.cookie;
        flow.encryption = self.encryption.current(cookie);
        if flow.event != EventKind::Connect {
            self.encryption.forget(cookie);
        }
        self.judge.judge(&mut flow);
        flow.summary = flow.make_summary();
        let flow = Arc::new(flow);
        self.stats.flows.fetch_add(1, Ordering::Relaxed);
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
