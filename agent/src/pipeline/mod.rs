//! The userspace pipeline: kernel events in, flow events out to every sink.
//! capture -> build flow (orientation, owner, timing) -> enrich (endpoints,
//! SPIFFE IDs) -> judge (policy) -> sinks (export file, metrics, stream).
//! Joined by a bounded channel, so a burst waits in the kernel ring buffer
//! rather than in unbounded memory, and every loss is counted there.
//!
//! A flow whose ends' attested identities are still being fetched (SPIRE's
//! answer, or for a same-node peer its own socket's record) is parked for at
//! most `identity_wait`, then goes out with what is known (DERIVED, saying
//! why; counted). A CONNECT whose handshake bytes are not yet
//! classified is parked likewise for at most `encryption_wait`. Later flows
//! of a parked socket queue behind it, so a socket's CONNECT always precedes
//! its CLOSE; other flows do not wait.

mod build;
pub mod encryption;
mod parking;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::capture::Clock;
use crate::capture::record::{KernelEvent, KernelRecord};
use crate::flow::{EventKind, FlowEvent, UnknownReason};
use crate::identity::{Enriched, Enricher, Progress};
use crate::judge::Judge;
use encryption::EncryptionTracker;
use parking::{Parked, Parking};

/// Where flows leave the pipeline (the export file, metrics, the stream hub).
/// Every sink gets each flow once, in order, from the pipeline's single
/// task; a sink must not block it.
pub trait Sink: Send {
    fn on_flow(&mut self, flow: &Arc<FlowEvent>);
    /// Called when the pipeline has drained its queue: push buffered output.
    fn flush(&mut self) {}
}

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

pub struct Pipeline {
    pub node_name: crate::flow::ArcStr,
    pub enricher: Option<Enricher>,
    pub judge: Judge,
    pub sinks: Vec<Box<dyn Sink>>,
    pub stats: Arc<PipelineStats>,
    pub identity_wait: Duration,
    pub encryption_wait: Duration,
    pub encryption: EncryptionTracker,
    parked: Parking,
    /// The sockets a `release` pass visits (a buffer kept between passes).
    visit: Vec<u64>,
}

impl Pipeline {
    pub fn new(
        node_name: crate::flow::ArcStr,
        enricher: Option<Enricher>,
        judge: Judge,
        sinks: Vec<Box<dyn Sink>>,
        stats: Arc<PipelineStats>,
        identity_wait: Duration,
        encryption_wait: Duration,
    ) -> Self {
        // Every flow holds the node's name: made static (kept for the
        // agent's life), a flow shares it without touching a reference
        // count (an atomic add and subtract per flow otherwise).
        node_name.leak();
        Self {
            node_name,
            enricher,
            judge,
            sinks,
            stats,
            identity_wait,
            encryption_wait,
            encryption: EncryptionTracker::default(),
            parked: Parking::default(),
            visit: Vec::new(),
        }
    }

    /// Runs until the capture side closes the channel, then releases what is
    /// parked and flushes.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Vec<KernelRecord>>) {
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
                    self.batch(ev, &clock);
                    // Drain what is queued, then flush once: one write per
                    // burst. At most a queue's worth per pass: under a
                    // sustained overload the reader refills the queue as
                    // fast as it is drained, and a drain without end would
                    // never release a parked flow (they piled up to a GiB).
                    for _ in 1..crate::capture::READ_QUEUE {
                        let Ok(batch) = rx.try_recv() else { break };
                        self.batch(batch, &clock);
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
        let until = later(Instant::now(), self.identity_wait.max(self.encryption_wait));
        while !self.parked.is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.release(false);
        }
        self.release(true);
        self.flush();
    }

    /// One batch of the ring reader: its records, then what they released.
    /// Released after each batch rather than once per pass: a short
    /// connection's CONNECT waits for its CLOSE, usually in the same batch,
    /// and goes while its memory is still in the cache. After a pass of 64
    /// batches, 8,000 parked flows later, every one of them was a cache
    /// miss (a sixth of the pipeline's time in a storm).
    fn batch(&mut self, records: Vec<KernelRecord>, clock: &Clock) {
        // One reading of the clock for the batch (a few hundred µs of
        // work at most): the waits it starts are milliseconds long.
        let now = Instant::now();
        for rec in records {
            self.take(rec, clock, now);
        }
        // Identity answers that can only be polled wait for the pass's
        // end: polling all of them after every batch would cost more than
        // the batch.
        self.release_some(false, false);
    }

    /// Takes one kernel record (as `run` does for each record it receives):
    /// a flow event is built, enriched and judged, and goes out to the sinks
    /// or is parked; a payload chunk feeds the encryption tracker. Public so
    /// tests and benches drive the real pipeline without a channel.
    pub fn record(&mut self, rec: KernelRecord, clock: &Clock) {
        self.take(rec, clock, Instant::now());
    }

    /// `record`, at `now`.
    fn take(&mut self, rec: KernelRecord, clock: &Clock, now: Instant) {
        match rec {
            KernelRecord::Flow(ev) => self.handle(&ev, clock, now),
            KernelRecord::Payload(p) => {
                if self.encryption.on_chunk(&p) {
                    self.parked.wake(p.sock_cookie);
                }
            }
        }
    }

    fn handle(&mut self, ev: &KernelEvent, clock: &Clock, now: Instant) {
        if let Some(reason) = ev.capture {
            // Not watched (CONNECT) or bytes lost (CLOSE): nothing more will
            // come, so the answer settles now, with the reason.
            self.encryption.mark(ev.sock_cookie, reason);
        }
        // In its final `Arc` at once: parked, released and handed to the
        // sinks by pointer. Nothing else holds it until `emit` is done with
        // it, so `make_mut` never copies.
        let mut flow = FlowEvent::shared_from_kernel(ev, &self.node_name, clock);
        let cookie = flow.socket.cookie;
        if flow.event != EventKind::Connect
            && self.parked.holds(cookie)
            && !self.encryption.is_settled(cookie)
        {
            // The socket is gone, and its payload records came before this
            // one in the ring: its answer is what is known now, so a CONNECT
            // waiting for its handshake goes out at once (with the same
            // answer its wait would have ended with) instead of holding
            // memory until `encryption_wait` runs out.
            if self.encryption.knows(cookie) {
                self.encryption.mark(cookie, UnknownReason::NoPayloadSeen);
                self.parked.wake(cookie);
            } else {
                // Nothing was seen: the tracker answers "no payload seen"
                // for a socket it does not know, so the waits just end
                // (no entry made for a socket about to be forgotten).
                let ended = self.parked.end_encryption_waits(cookie);
                self.stats
                    .encryption_waits
                    .fetch_add(ended, Ordering::Relaxed);
            }
        }
        let query = match &mut self.enricher {
            Some(e) => match e.enrich(Arc::make_mut(&mut flow)) {
                Enriched::Done => None,
                Enriched::Pending(q) => Some(q),
            },
            None => None,
        };
        let encryption_deadline = (flow.event == EventKind::Connect
            && !self.encryption_wait.is_zero()
            && !self.encryption.is_settled(cookie))
        .then(|| later(now, self.encryption_wait));
        if query.is_some() || encryption_deadline.is_some() || self.parked.holds(cookie) {
            self.parked.park(Parked {
                flow,
                query,
                parked_at: now,
                deadline: later(now, self.identity_wait),
                encryption_deadline,
            });
            return;
        }
        self.emit(flow);
    }

    /// Sends out parked flows whose identity arrived or whose wait is over,
    /// visiting only the sockets where something changed (see `parking`).
    /// `all`: at shutdown, everything goes. `run` calls it after each burst.
    pub fn release(&mut self, all: bool) {
        self.release_some(all, true);
        if let Some(e) = &mut self.enricher {
            e.end_pass();
        }
    }

    /// `release`; without `poll`, flows whose identity answer can only be
    /// polled are not looked at.
    fn release_some(&mut self, all: bool, poll: bool) {
        if self.parked.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut visit = std::mem::take(&mut self.visit);
        self.parked.due(now, all, poll, &mut visit);
        for &cookie in &visit {
            while let Some(p) = self.parked.head_mut(cookie) {
                let ready = ready(
                    p,
                    self.enricher.as_mut(),
                    &self.encryption,
                    &self.stats,
                    now,
                    all,
                );
                if !ready {
                    break;
                }
                if let Some(p) = self.parked.pop_head(cookie) {
                    self.emit(p.flow);
                }
            }
        }
        visit.clear();
        self.visit = visit;
        self.parked.after_pass(poll);
    }

    fn emit(&mut self, mut flow: Arc<FlowEvent>) {
        let f = Arc::make_mut(&mut flow);
        let cookie = f.socket.cookie;
        f.encryption = self.encryption.current(cookie);
        if f.event != EventKind::Connect {
            self.encryption.forget(cookie);
        }
        self.judge.judge(f);
        self.stats.flows.fetch_add(1, Ordering::Relaxed);
        for sink in &mut self.sinks {
            sink.on_flow(&flow);
        }
    }

    /// Lets every sink push what it buffered; `run` calls it once per burst.
    pub fn flush(&mut self) {
        for sink in &mut self.sinks {
            sink.flush();
        }
    }
}

/// Whether a parked flow may go now: its identity answers came (or its
/// wait is over) and, for a CONNECT, its handshake was classified (or that
/// wait is over). Counts the waits as they end.
fn ready(
    p: &mut Parked,
    enricher: Option<&mut Enricher>,
    encryption: &EncryptionTracker,
    stats: &PipelineStats,
    now: Instant,
    all: bool,
) -> bool {
    let identified = match (p.query.as_mut(), enricher) {
        (Some(q), Some(e)) => {
            let force = all || now >= p.deadline;
            let progress = e.resume(Arc::make_mut(&mut p.flow), q, force);
            if progress == Progress::Waiting {
                false
            } else {
                p.query = None;
                if progress == (Progress::Done { timed_out: true }) {
                    stats.identity_timeouts.fetch_add(1, Ordering::Relaxed);
                }
                let waited = p.parked_at.elapsed().as_micros() as u64;
                stats.identity_waits.fetch_add(1, Ordering::Relaxed);
                stats
                    .identity_wait_us_total
                    .fetch_add(waited, Ordering::Relaxed);
                stats
                    .identity_wait_us_max
                    .fetch_max(waited, Ordering::Relaxed);
                true
            }
        }
        // Answered, or not needed.
        _ => true,
    };
    if !identified {
        return false;
    }
    match p.encryption_deadline {
        None => true,
        Some(deadline) => {
            let settled = encryption.is_settled(p.flow.socket.cookie);
            let done = settled || all || now >= deadline;
            if done {
                stats.encryption_waits.fetch_add(1, Ordering::Relaxed);
                if !settled {
                    stats.encryption_timeouts.fetch_add(1, Ordering::Relaxed);
                }
                p.encryption_deadline = None;
            }
            done
        }
    }
}

/// `now + wait`, saturating: a wait past what the clock can hold (the CLI
/// bounds it, a library caller may not) is a century, never a panic.
fn later(now: Instant, wait: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 86_400);
    now.checked_add(wait)
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}

#[cfg(test)]
pub(crate) mod bench {
    //! Capacity of the userspace pipeline, fed synthetic kernel records:
    //! decode -> flow -> identity join (endpoint directory) -> encryption ->
    //! policy -> metrics and the stream hub with one live subscriber.
    //! Prints `bench-result:` lines; asserts only that nothing was lost.

    use std::path::Path;

    use flowaudit_common::{DIR_OUT, FlowRecord, PayloadHeader, RecordKind};
    use tokio::sync::watch;
    use tokio_stream::StreamExt;

    use super::*;
    use crate::capture::record::tests::sample;
    use crate::capture::{CaptureStats, record::KernelRecord};
    use crate::endpoints::EndpointDirectory;
    use crate::export::filter::FilterSet;
    use crate::export::hub::{Hub, HubSink, Item, Subscribe};
    use crate::export::metrics::MetricsSink;
    use crate::export::state::AgentState;
    use crate::identity::cgroup::CgroupResolver;

    const PODS: u32 = 50;

    fn directory() -> EndpointDirectory {
        let mut y = String::from("nodes:\n  - {name: n1, ips: [10.244.0.1]}\nendpoints:\n");
        let apps = ["frontend", "backend", "postgresql", "openbao"];
        for i in 0..PODS {
            let app = apps[i as usize % apps.len()];
            y.push_str(&format!(
                "  - {{ips: [10.244.1.{}], namespace: 99-apps, pod: {app}-{i}, serviceAccount: {app}, labels: {{app: {app}}}}}\n",
                i + 2
            ));
        }
        EndpointDirectory::parse(Path::new("bench.yaml"), &y).expect("bench directory")
    }

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: plain-old-data records, read as bytes.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    /// Raw ring-buffer items for connection `i`: CONNECT, the first payload
    /// (plaintext HTTP), and CLOSE unless `open`.
    fn connection(i: u32, open: bool) -> Vec<Vec<u8>> {
        let mut r: FlowRecord = sample();
        let client = 2 + i % PODS;
        let server = 2 + (i / PODS + 1 + i) % PODS;
        r.local_addr[..4].copy_from_slice(&[10, 244, 1, client as u8]);
        r.remote_addr[..4].copy_from_slice(&[10, 244, 1, server as u8]);
        r.remote_port = [8000, 5432, 8200, 3000][i as usize % 4];
        r.local_port = 10_000 + (i % 50_000) as u16;
        r.sock_cookie = 1_000_000 + u64::from(i);
        r.kind = RecordKind::Connect as u8;
        let mut items = vec![bytes_of(&r)];
        let hdr = PayloadHeader {
            kind: RecordKind::Payload as u8,
            dir: DIR_OUT,
            len: 64,
            sock_cookie: r.sock_cookie,
            ..Default::default()
        };
        let mut p = bytes_of(&hdr);
        let mut req =
            b"GET /api/orders HTTP/1.1\r\nHost: backend\r\nUser-Agent: bench\r\n\r\n".to_vec();
        req.resize(64, b' ');
        p.extend_from_slice(&req);
        items.push(p);
        if !open {
            r.kind = RecordKind::Close as u8;
            items.push(bytes_of(&r));
        }
        items
    }

    fn thread_cpu_secs() -> f64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    }

    fn rss_mib() -> f64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    pub(crate) fn result(
        id: &str,
        name: &str,
        value: f64,
        unit: &str,
        target: &str,
        met: bool,
        detail: &str,
    ) {
        println!(
            "bench-result: {}",
            serde_json::json!({"id": id, "name": name, "value": value, "unit": unit,
                "target": target, "met": met, "detail": detail})
        );
        if !met {
            println!("bench: {name}: {value:.0} {unit} misses the target ({target})");
        }
    }

    /// The pipeline the measurements feed: the endpoint directory of
    /// [`directory`], the reference scenario's policy, metrics and `hub`.
    fn pipeline(state: &Arc<AgentState>, hub: &Arc<Hub>) -> (Pipeline, Arc<PipelineStats>) {
        let policy = crate::judge::load_initial(&[Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/examples/precinct-99-flowpolicy.yaml")])
        .expect("example policy");
        let judge = Judge::without_cilium(Some(watch::channel(Arc::new(policy.policy)).1));
        let enricher = Enricher::new(
            Some(watch::channel(Arc::new(directory())).1),
            CgroupResolver::new("/nonexistent".into()),
            None,
            Some("demo.local".into()),
        );
        let stats = Arc::new(PipelineStats::default());
        let sinks: Vec<Box<dyn Sink>> = vec![
            Box::new(MetricsSink::new(state.metrics.clone())),
            Box::new(HubSink::new(hub.clone(), state.clone())),
        ];
        let p = Pipeline::new(
            "n1".into(),
            Some(enricher),
            judge,
            sinks,
            stats.clone(),
            Duration::from_millis(500),
            Duration::from_millis(250),
        );
        (p, stats)
    }

    /// One batch of raw ring-buffer items through the pipeline, as the
    /// ring reader hands them over: decoded, taken, released, flushed.
    fn feed(p: &mut Pipeline, items: &[Vec<u8>], clock: &Clock) {
        for raw in items {
            let rec = KernelRecord::from_bytes(raw).expect("synthetic record");
            p.record(rec, clock);
        }
        p.release(false);
        p.flush();
    }

    fn agent_state() -> Arc<AgentState> {
        Arc::new(AgentState::new(
            "bench".into(),
            Arc::new(CaptureStats::default()),
            Arc::new(PipelineStats::default()),
        ))
    }

    /// Connections of [`pipeline_instructions`]' workload.
    const COUNTED_CONNECTIONS: u32 = 100_000;

    /// The workload whose instructions [`pipeline_instructions`] counts: the
    /// throughput part of [`pipeline_capacity`] (whole connections in
    /// batches of 1,024 records), without its subscriber and on one thread,
    /// so that nothing in it depends on how threads are scheduled.
    #[tokio::test(flavor = "current_thread")]
    #[ignore = "run by `pipeline_instructions` under callgrind"]
    async fn pipeline_instructions_workload() {
        let state = agent_state();
        let hub = Arc::new(Hub::new(8192, 1 << 16, 16, state.metrics.clone()));
        let (mut p, stats) = pipeline(&state, &hub);
        let clock = Clock::now();
        let items: Vec<Vec<u8>> = (0..COUNTED_CONNECTIONS)
            .flat_map(|i| connection(i, false))
            .collect();
        for chunk in items.chunks(1024) {
            feed(&mut p, chunk, &clock);
        }
        p.release(true);
        p.flush();
        assert_eq!(
            stats.flows.load(Ordering::Relaxed),
            u64::from(COUNTED_CONNECTIONS) * 2,
            "every CONNECT and CLOSE went out"
        );
    }

    /// Instructions of the pipeline per kernel record: a count, not a time,
    /// so it does not move with the machine's load (the records-per-second
    /// rows of [`pipeline_capacity`] do, by a third between nights). Runs
    /// this binary's [`pipeline_instructions_workload`] under valgrind's
    /// callgrind, counting only inside `Pipeline::take` (decode, flow,
    /// identity join, encryption) and `Pipeline::release_some` (policy,
    /// metrics, the stream hub), not the test's own making of records.
    /// Run with `cargo test --release -p flowaudit pipeline_instructions -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, run by `cargo xtask bench`"]
    fn pipeline_instructions() {
        let counted = callgrind_count(
            "pipeline::bench::pipeline_instructions_workload",
            &[
                "flowaudit::pipeline::Pipeline::take",
                "flowaudit::pipeline::Pipeline::release_some",
            ],
        );
        let records = u64::from(COUNTED_CONNECTIONS) * 3;
        assert!(
            counted > records,
            "callgrind counted {counted} instructions for {records} records: the pipeline's functions were not found by name (inlined or renamed?)"
        );
        let per_record = counted as f64 / records as f64;
        result(
            "pipeline_instructions_per_record",
            "userspace pipeline: instructions per kernel record",
            per_record,
            "instructions",
            "",
            true,
            &format!(
                "{counted} instructions (valgrind callgrind, inside Pipeline::take and Pipeline::release_some) for {records} records ({COUNTED_CONNECTIONS} connections: CONNECT, first payload, CLOSE), as in the row above but on one thread and without a subscriber; a count, not a time: it does not move with the machine's load"
            ),
        );
    }

    /// Runs this test binary's ignored test `test` (its full path) under
    /// valgrind's callgrind and returns the instructions counted inside the
    /// functions `inside` (and what they call).
    pub(crate) fn callgrind_count(test: &str, inside: &[&str]) -> u64 {
        let exe = std::env::current_exe().expect("the test binary's path");
        let out = std::env::temp_dir().join(format!(
            "fa-callgrind-{}-{}.out",
            std::process::id(),
            test.rsplit("::").next().unwrap_or(test)
        ));
        let run = std::process::Command::new("valgrind")
            .arg("--tool=callgrind")
            .args(inside.iter().map(|f| format!("--toggle-collect={f}")))
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(&exe)
            .args([test, "--exact", "--ignored", "--test-threads=1"])
            .output();
        let run = match run {
            Ok(r) => r,
            Err(e) => panic!(
                "could not run valgrind ({e}): it counts the instructions; `cargo xtask setup` installs it (Debian package valgrind)"
            ),
        };
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let _ = std::fs::remove_file(&out);
        assert!(
            run.status.success(),
            "the workload under callgrind failed ({}):\n{}\n{}",
            run.status,
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        callgrind_total(&text).unwrap_or_else(|| {
            panic!(
                "no `summary:` or `totals:` line in callgrind's output {}:\n{}",
                out.display(),
                text.lines().take(30).collect::<Vec<_>>().join("\n")
            )
        })
    }

    /// The instructions counted in a callgrind output file.
    fn callgrind_total(text: &str) -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix("summary:").or(l.strip_prefix("totals:")))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    #[test]
    fn reads_callgrinds_total() {
        let text = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nfn=(1) main\n5 10\nsummary: 123456\n\ntotals: 123456\n";
        assert_eq!(callgrind_total(text), Some(123_456));
        assert_eq!(callgrind_total("events: Ir\n"), None);
    }

    /// Run with `cargo test --release -p flowaudit pipeline_capacity -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, run by `cargo xtask bench`; tests do not assert on time"]
    async fn pipeline_capacity() {
        let state = agent_state();
        let hub = Arc::new(Hub::new(8192, 1 << 16, 16, state.metrics.clone()));
        let mut stream = hub
            .subscribe(Subscribe {
                number: 0,
                follow: true,
                since: None,
                filter: FilterSet::default(),
            })
            .expect("subscribe");
        let received = Arc::new(AtomicU64::new(0));
        let lost = Arc::new(AtomicU64::new(0));
        let (r2, l2) = (received.clone(), lost.clone());
        let consumer = tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                match item {
                    Item::Flow(_) => r2.fetch_add(1, Ordering::Relaxed),
                    Item::Lost { count, .. } => l2.fetch_add(count, Ordering::Relaxed),
                    Item::Notice(_) => 0,
                };
            }
        });
        let (mut p, stats) = pipeline(&state, &hub);
        let clock = Clock::now();

        // Memory: 100,000 connections left open.
        let open = 100_000u32;
        let rss_before = rss_mib();
        for i in 0..open {
            for raw in connection(10_000_000 + i, true) {
                let rec = KernelRecord::from_bytes(&raw).expect("synthetic record");
                p.record(rec, &clock);
            }
            if i % 1024 == 0 {
                p.release(false);
                p.flush();
                tokio::task::yield_now().await;
            }
        }
        p.release(false);
        p.flush();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rss = rss_mib();
        result(
            "pipeline_rss_100k_open",
            "resident memory with 100,000 open flows",
            rss,
            "MiB",
            "<= 64",
            rss <= 64.0,
            &format!(
                "whole test process (pipeline, metrics, stream hub with 8,192 flows buffered, one subscriber); {:.1} MiB before the 100,000 connections were opened; {} sockets followed for encryption",
                rss_before,
                p.encryption.followed()
            ),
        );
        // Throughput: whole connections, in batches as the ring reader hands
        // them over; the consumer drains the hub on another thread.
        let connections = 200_000u32;
        let items: Vec<Vec<u8>> = (0..connections)
            .flat_map(|i| connection(i, false))
            .collect();
        let records = items.len() as f64;
        let flows0 = stats.flows.load(Ordering::Relaxed);
        let hits0 = p.judge.memo_hits();
        let cpu0 = thread_cpu_secs();
        let wall0 = Instant::now();
        for chunk in items.chunks(1024) {
            feed(&mut p, chunk, &clock);
            tokio::task::yield_now().await;
        }
        let cpu = thread_cpu_secs() - cpu0;
        let wall = wall0.elapsed().as_secs_f64();
        let flows = stats.flows.load(Ordering::Relaxed) - flows0;
        assert_eq!(
            flows,
            u64::from(connections) * 2,
            "every CONNECT and CLOSE went out"
        );
        let per_core = records / cpu;
        let memo_hits = p.judge.memo_hits() - hits0;
        result(
            "pipeline_records_per_core",
            "userspace pipeline: kernel records per CPU-second",
            per_core,
            "records/s",
            ">= 1000000",
            per_core >= 1_000_000.0,
            &format!(
                "{records} records ({connections} connections: CONNECT, first payload, CLOSE) through decode, identity join, encryption, policy, metrics and the stream hub with one subscriber; {cpu:.2} s CPU on the pipeline thread, {wall:.2} s wall; {memo_hits} of {flows} policy decisions from the judge's memo"
            ),
        );
        let flows_per_core = flows as f64 / cpu;
        result(
            "pipeline_flows_per_core",
            "userspace pipeline: flow events per CPU-second",
            flows_per_core,
            "flows/s",
            "",
            true,
            "the same run counted in flow events (CONNECT and CLOSE)",
        );

        drop(p);
        drop(hub);
        consumer.abort();
        assert_eq!(lost.load(Ordering::Relaxed), 0, "the subscriber lost flows");
        assert!(received.load(Ordering::Relaxed) > 0);
    }
}

#[cfg(test)]
mod tests {
    use flowaudit_common::RecordKind;

    use super::*;
    use crate::capture::record::tests::sample;

    fn pipeline(identity_wait: Duration, encryption_wait: Duration) -> Pipeline {
        Pipeline::new(
            "n1".into(),
            None,
            Judge::without_cilium(None),
            Vec::new(),
            Arc::new(PipelineStats::default()),
            identity_wait,
            encryption_wait,
        )
    }

    /// Keeps what reaches the sinks.
    struct Collect(Arc<std::sync::Mutex<Vec<Arc<FlowEvent>>>>);

    impl Sink for Collect {
        fn on_flow(&mut self, flow: &Arc<FlowEvent>) {
            self.0.lock().expect("collector").push(flow.clone());
        }
    }

    /// A socket that closes before sending anything (a storm of short
    /// connections) must not hold its CONNECT for the whole encryption
    /// wait: its CLOSE settles the answer, and both go out at once, in
    /// order, with the answer the wait would have ended with.
    #[test]
    fn a_close_releases_its_connect_waiting_for_a_handshake() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut p = pipeline(Duration::from_secs(3600), Duration::from_secs(3600));
        p.sinks.push(Box::new(Collect(seen.clone())));
        let clock = Clock::now();
        let mut rec = sample();
        rec.kind = RecordKind::Connect as u8;
        let connect = KernelEvent::from_record(&rec).expect("sample record");
        p.record(KernelRecord::Flow(connect), &clock);
        p.release(false);
        assert_eq!(p.parked.len(), 1, "the CONNECT waits for its handshake");
        assert!(seen.lock().unwrap().is_empty());

        rec.kind = RecordKind::Close as u8;
        let close = KernelEvent::from_record(&rec).expect("sample record");
        p.record(KernelRecord::Flow(close), &clock);
        p.release(false);
        let out = seen.lock().unwrap().clone();
        let kinds: Vec<EventKind> = out.iter().map(|f| f.event).collect();
        assert_eq!(
            kinds,
            [EventKind::Connect, EventKind::Close],
            "both released by the CLOSE, long before the hour-long wait"
        );
        for f in &out {
            assert_eq!(
                (f.encryption.state, f.encryption.unknown_reason),
                (
                    flowaudit_policy::EncryptionState::Unknown,
                    Some(UnknownReason::NoPayloadSeen)
                ),
                "{:?}: nothing was sent, as a timed-out wait would say",
                f.event
            );
        }
        assert!(p.parked.is_empty());
        assert_eq!(
            p.stats.encryption_timeouts.load(Ordering::Relaxed),
            0,
            "settled, not timed out"
        );
        assert_eq!(
            p.stats.encryption_waits.load(Ordering::Relaxed),
            1,
            "the CONNECT's wait is counted once"
        );
        assert_eq!(p.encryption.followed(), 0, "the socket is forgotten");
    }

    /// Under a sustained overload the reader refills the queue as fast as
    /// the pipeline drains it. A pass still ends after a queue's worth of
    /// batches, so a parked flow whose CLOSE came goes out then, not when
    /// the storm is over (an endless drain piled parked flows up to a GiB).
    #[tokio::test]
    async fn a_drain_pass_ends_after_a_queue_of_batches_and_releases() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let flushes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut p = pipeline(Duration::from_secs(3600), Duration::from_secs(3600));
        p.sinks.push(Box::new(Collect(seen.clone())));
        p.sinks.push(Box::new(CountFlushes {
            since: 0,
            flushes: flushes.clone(),
        }));
        let mut rec = sample();
        let parked_cookie = rec.sock_cookie;
        let mut first = Vec::new();
        for kind in [RecordKind::Connect, RecordKind::Close] {
            rec.kind = kind as u8;
            first.push(KernelRecord::Flow(
                KernelEvent::from_record(&rec).expect("sample record"),
            ));
        }
        // Four queues' worth of batches, all queued before the pipeline
        // runs: as if the reader kept the queue full.
        const BATCHES: usize = 4 * crate::capture::READ_QUEUE;
        let (tx, rx) = mpsc::channel(BATCHES + 1);
        tx.send(first).await.unwrap();
        rec.kind = RecordKind::Failed as u8;
        for b in 0..BATCHES {
            let batch = (0..4)
                .map(|i| {
                    rec.sock_cookie = 1_000_000 + (b * 4 + i) as u64;
                    KernelRecord::Flow(KernelEvent::from_record(&rec).expect("sample record"))
                })
                .collect();
            tx.send(batch).await.unwrap();
        }
        drop(tx);
        tokio::time::timeout(Duration::from_secs(30), p.run(rx))
            .await
            .expect("the pipeline drains and stops");
        let out = seen.lock().unwrap().clone();
        assert_eq!(out.len(), 2 + 4 * BATCHES, "every flow went out");
        let at = out
            .iter()
            .position(|f| f.socket.cookie == parked_cookie)
            .expect("the parked CONNECT went out");
        assert_eq!(out[at].event, EventKind::Connect);
        assert_eq!(out[at + 1].event, EventKind::Close, "then its CLOSE");
        // Released after its own batch, before the batches behind it.
        assert_eq!(at, 0, "the parked CONNECT waited behind {at} flows");
        // The sinks are flushed at the end of each pass: after at most one
        // queue's worth of batches, not after all of them.
        let flushes = flushes.lock().unwrap().clone();
        assert!(
            flushes[0] <= 2 + 4 * (crate::capture::READ_QUEUE - 1),
            "the first flush came after {} flows; a pass takes at most {} batches of 4 (flushes: {flushes:?})",
            flushes[0],
            crate::capture::READ_QUEUE
        );
        assert_eq!(flushes.iter().sum::<usize>(), out.len(), "{flushes:?}");
    }

    /// Notes how many flows came between flushes.
    struct CountFlushes {
        since: usize,
        flushes: Arc<std::sync::Mutex<Vec<usize>>>,
    }

    impl Sink for CountFlushes {
        fn on_flow(&mut self, _: &Arc<FlowEvent>) {
            self.since += 1;
        }

        fn flush(&mut self) {
            if self.since > 0 {
                self.flushes.lock().expect("flushes").push(self.since);
                self.since = 0;
            }
        }
    }

    /// A wait no clock can add (a library caller, or a CLI bound that
    /// slipped) parks the flow "for ever" instead of panicking.
    #[tokio::test]
    async fn huge_waits_do_not_overflow_the_clock() {
        let mut p = pipeline(Duration::MAX, Duration::MAX);
        let mut rec = sample();
        rec.kind = RecordKind::Connect as u8;
        let ev = KernelEvent::from_record(&rec).expect("sample record");
        p.record(KernelRecord::Flow(ev), &Clock::now());
        assert_eq!(p.parked.len(), 1, "a CONNECT waits for its handshake");
        p.release(true);
        assert_eq!(
            p.stats.flows.load(Ordering::Relaxed),
            1,
            "released at shutdown"
        );

        // Shutting down with nothing parked returns at once.
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        tokio::time::timeout(
            Duration::from_secs(5),
            pipeline(Duration::MAX, Duration::MAX).run(rx),
        )
        .await
        .expect("an idle pipeline shuts down at once, whatever its waits");
    }
}
