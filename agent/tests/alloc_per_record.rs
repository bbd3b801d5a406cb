//! The hot path does not allocate per kernel record (issue 15): a counting
//! global allocator measures heap allocations per record while the real
//! pipeline (decode, flow build, identity join against an endpoint
//! directory, encryption tracking, policy, and the metrics and stream hub
//! sinks that run on the pipeline task) handles connections whose
//! identities are cached. A count, never a timing: deterministic on any
//! machine. The export file's writer, which runs on a thread of its own, is
//! measured apart: it writes each flow's JSON line without allocating. Run
//! with `--nocapture` to see the figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flowaudit::capture::record::KernelRecord;
use flowaudit::capture::{CaptureStats, Clock};
use flowaudit::endpoints::EndpointDirectory;
use flowaudit::export::hub::{Hub, HubSink};
use flowaudit::export::metrics::MetricsSink;
use flowaudit::export::state::AgentState;
use flowaudit::identity::Enricher;
use flowaudit::identity::cgroup::CgroupResolver;
use flowaudit::judge::{Judge, load_initial};
use flowaudit::pipeline::Sink;
use flowaudit::pipeline::{Pipeline, PipelineStats};
use flowaudit_common::{
    AF_INET, DIR_OUT, FlowRecord, Owner, PayloadHeader, RecordKind, SocketSide,
};
use tokio::sync::watch;

/// Allocations per kernel record allowed in the steady state: measured
/// 1.11 (40.52 at first, 27.58 in session 7, 6.95 in session 8, 5.96 in
/// session 12, 4.12 in session 13, 1.76 in session 14). Issue 15 asks for at
/// most 2; the budget holds what was reached since, with some room. Shared
/// now: pod names and labels (`ArcStr`, `Labels` from the endpoint
/// directory), derived and attested SPIFFE IDs, the node name, the process
/// name (each decoding thread remembers the last names it decoded), the
/// encryption answer (`Arc`, one per distinct answer), the policy rule's
/// name and the findings with their messages (with the judge's memo); the
/// policy lookup runs on the stack; the stream hub takes flows in batches;
/// the summary is written only when a flow is serialized (not here: no
/// subscriber, no file), and so is the time (an integer in the event). A
/// payload record allocates nothing when it opens a plaintext connection:
/// its bytes are kept in place, and a socket's first chunk is classified on
/// the stack (session 29). What remains: per flow event, the `Arc` around
/// the event; on a miss of the judge's memo (this test's 50 pods make
/// thousands of pairs, which 16,384 slots hold: 0.70 per record on
/// 2026-12-07, 1.05 with 4,096 slots), the decision's findings; per TLS
/// handshake, its bytes and the classifier that waits for the other
/// direction.
const BUDGET: f64 = 1.0;

struct Counting;

thread_local! {
    /// Allocations of this thread while it measures, or `None`: each test
    /// counts its own thread only (the harness runs tests, and its own
    /// threads, side by side).
    static MEASURED: Cell<Option<u64>> = const { Cell::new(None) };
}

fn count() {
    // `try_with`: the thread-local may be gone while a thread exits.
    let _ = MEASURED.try_with(|m| m.set(m.get().map(|n| n + 1)));
}

/// Runs `f`, counting the heap allocations this thread makes meanwhile.
fn allocations_in<R>(f: impl FnOnce() -> R) -> (R, u64) {
    MEASURED.with(|m| m.set(Some(0)));
    let r = f();
    let n = MEASURED.with(|m| m.take()).unwrap_or(0);
    (r, n)
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the
// `GlobalAlloc` contract; counting touches no heap memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's layout contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A growing buffer allocates again: it counts.
        count();
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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
    EndpointDirectory::parse(Path::new("alloc.yaml"), &y).expect("test directory")
}

fn bytes_of<T>(v: &T) -> Vec<u8> {
    // SAFETY: plain-old-data `#[repr(C)]` records, read as bytes.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

/// Raw ring-buffer items of connection `i` between two directory pods:
/// CONNECT, the first payload (plaintext HTTP), CLOSE.
fn connection(i: u32) -> Vec<Vec<u8>> {
    let mut comm = [0u8; 16];
    comm[..4].copy_from_slice(b"curl");
    let client = 2 + i % PODS;
    let server = 2 + (i / PODS + 1 + i) % PODS;
    let mut local_addr = [0u8; 16];
    local_addr[..4].copy_from_slice(&[10, 244, 1, client as u8]);
    let mut remote_addr = [0u8; 16];
    remote_addr[..4].copy_from_slice(&[10, 244, 1, server as u8]);
    let mut r = FlowRecord {
        kind: RecordKind::Connect as u8,
        side: SocketSide::Active as u8,
        family: AF_INET as u8,
        owner_known: 1,
        old_state: 1,
        seq_flags: 0,
        capture: 0,
        _pad: 0,
        local_port: 10_000 + (i % 50_000) as u16,
        remote_port: [8000, 5432, 8200, 3000][i as usize % 4],
        error: 0,
        local_addr,
        remote_addr,
        netns_cookie: 7,
        sock_cookie: 1_000_000 + u64::from(i),
        owner: Owner {
            tgid: 1234,
            _pad: 0,
            start_boottime_ns: 5,
            cgroup_id: 42,
            comm,
        },
        ts_ns: 3_000_000,
        start_ns: 1_000_000,
        established_ns: 1_500_000,
        bytes_sent: 10,
        bytes_received: 20,
        retransmits: 0,
        _pad2: 0,
    };
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
        b"GET /api/orders HTTP/1.1\r\nHost: backend\r\nUser-Agent: alloc\r\n\r\n".to_vec();
    req.resize(64, b' ');
    p.extend_from_slice(&req);
    items.push(p);
    r.kind = RecordKind::Close as u8;
    r.ts_ns = 9_000_000;
    items.push(bytes_of(&r));
    items
}

/// Feeds connections `range` in bursts of 1,024 records, as the ring reader
/// hands them over; returns how many records went in.
fn feed(p: &mut Pipeline, clock: &Clock, items: &[Vec<u8>]) -> usize {
    for chunk in items.chunks(1024) {
        for raw in chunk {
            let rec = KernelRecord::from_bytes(raw).expect("synthetic record");
            p.record(rec, clock);
        }
        p.release(false);
        p.flush();
    }
    items.len()
}

/// A runtime for the pipeline's timers (nothing runs on it meanwhile).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The real pipeline (identities from the endpoint directory, the example
/// policy) with these sinks, and its stats.
fn pipeline(sinks: Vec<Box<dyn Sink>>) -> (Pipeline, Arc<PipelineStats>) {
    let policy = load_initial(&[Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/precinct-99-flowpolicy.yaml")])
    .expect("example policy");
    let judge = Judge::without_cilium(Some(watch::channel(Arc::new(policy.policy)).1));
    // SPIRE off: identities come from the endpoint directory (DERIVED).
    let enricher = Enricher::new(
        Some(watch::channel(Arc::new(directory())).1),
        CgroupResolver::new("/nonexistent".into()),
        None,
        Some("demo.local".into()),
    );
    let stats = Arc::new(PipelineStats::default());
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

#[test]
fn steady_state_allocations_per_record_stay_within_budget() {
    let rt = runtime();
    let _guard = rt.enter();
    let state = Arc::new(AgentState::new(
        "n1".into(),
        Arc::new(CaptureStats::default()),
        Arc::new(PipelineStats::default()),
    ));
    let metrics = state.metrics.clone();
    // The stream hub buffers recent flows for new subscribers; none is
    // connected (a subscriber filters on its own task).
    let hub = Arc::new(Hub::new(8192, 1 << 16, 16, metrics.clone()));
    let (mut p, stats) = pipeline(vec![
        Box::new(MetricsSink::new(metrics)),
        Box::new(HubSink::new(hub.clone(), state.clone())),
    ]);
    let clock = Clock::now();

    // Warm up: caches, the metrics' label sets, the hub's ring (filled
    // past its capacity, so it recycles), the pipeline's buffers.
    let warm: Vec<Vec<u8>> = (0..4_000).flat_map(connection).collect();
    feed(&mut p, &clock, &warm);
    let connections = 7_000u32;
    let items: Vec<Vec<u8>> = (4_000..4_000 + connections).flat_map(connection).collect();
    let flows0 = stats.flows.load(Ordering::Relaxed);

    let (records, allocations) = allocations_in(|| feed(&mut p, &clock, &items));

    let flows = stats.flows.load(Ordering::Relaxed) - flows0;
    assert_eq!(
        flows,
        u64::from(connections) * 2,
        "expected every CONNECT and CLOSE of the measured connections to go out, {flows} did"
    );
    let per_record = allocations as f64 / records as f64;
    println!(
        "alloc_per_record: {allocations} heap allocations for {records} kernel records ({flows} flow events): {per_record:.2} per record (budget {BUDGET})"
    );
    assert!(
        per_record <= BUDGET,
        "expected at most {BUDGET} heap allocations per kernel record in the steady state, measured {per_record:.2} ({allocations} for {records} records)"
    );
    drop(p);
}

/// Keeps every flow the pipeline sends out.
struct Keep(Arc<std::sync::Mutex<Vec<Arc<flowaudit::flow::FlowEvent>>>>);

impl Sink for Keep {
    fn on_flow(&mut self, flow: &Arc<flowaudit::flow::FlowEvent>) {
        self.0.lock().expect("not poisoned").push(flow.clone());
    }
}

/// The export file's writer (its thread's side: JSON lines into its
/// buffer, written out to a real file every 64 KiB) allocates nothing per
/// flow once it has seen the pods: the pod parts, the time's text and the
/// summary buffer are kept from line to line.
#[test]
fn the_export_file_writes_lines_without_allocating() {
    let rt = runtime();
    let _guard = rt.enter();
    let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (mut p, _) = pipeline(vec![Box::new(Keep(kept.clone()))]);
    let clock = Clock::now();
    let items: Vec<Vec<u8>> = (0..6_000).flat_map(connection).collect();
    feed(&mut p, &clock, &items);
    drop(p);
    let flows = std::mem::take(&mut *kept.lock().expect("not poisoned"));
    assert_eq!(flows.len(), 12_000, "every CONNECT and CLOSE went out");
    assert!(
        flows.iter().all(|f| f.summary.get().is_none()),
        "no sink wrote a summary: the writer writes each"
    );

    let dir = flowaudit_tests::support::TestDir::new("fa-alloc-export");
    let path = dir.join("flows.jsonl");
    let mut file =
        flowaudit::export::file::ExportFile::open(&path, 1 << 30, 1).expect("export file");
    // Warm up: every pod of the directory, the buffers.
    let (warm, measured) = flows.split_at(2_000);
    for f in warm {
        file.write(f).expect("written");
    }
    let ((), allocations) = allocations_in(|| {
        for f in measured {
            file.write(f).expect("written");
        }
        file.flush().expect("written out");
    });
    let written = std::fs::read_to_string(&path).expect("export file");
    assert_eq!(written.lines().count(), flows.len(), "a line per flow");
    let last: serde_json::Value =
        serde_json::from_str(written.lines().last().expect("a line")).expect("JSON");
    assert!(
        last["summary"]
            .as_str()
            .is_some_and(|s| s.contains(" closed after ")),
        "the line has its summary: {last}"
    );
    println!(
        "export_file: {allocations} heap allocations for {} flow lines",
        measured.len()
    );
    assert_eq!(
        allocations,
        0,
        "expected the export file to write {} lines without a heap allocation",
        measured.len()
    );
}
