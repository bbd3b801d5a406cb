//! SPIRE Delegated Identity client: asks the SPIRE agent, on its admin unix
//! socket, which SPIFFE IDs a workload on this node holds
//! (`spire.api.agent.delegatedidentity.v1`, SubscribeToX509SVIDs). In: a
//! [`WorkloadQuery`] (pid and its start time from the kernel record, pod UID
//! from the cgroup path, namespace and service account). Out: a [`Lookup`],
//! answered at once from a cache that the SPIRE stream keeps current
//! (rotation, removed entries) and that holds each answer until the SVID
//! expires. It asks by `pid` when the agent supports it (SPIRE 1.10.2+) and
//! the pid still names the process that owned the socket, else by the pod's
//! selectors. Private keys arrive with every SVID; they are wiped on receipt.
//! Connection, reconnection with backoff and the subscriptions run in
//! background tasks: nothing here blocks the caller.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::flow::{ArcStr, FlowTime};

use hyper_util::rt::TokioIo;
use prost::bytes::Bytes;
use spire_api::pb::spire::api::agent::delegatedidentity::v1::delegated_identity_client::DelegatedIdentityClient;
use spire_api::pb::spire::api::agent::delegatedidentity::v1::{
    SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse, SubscribeToX509sviDsRequest,
    SubscribeToX509sviDsResponse,
};
use spire_api::pb::spire::api::types::Selector;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status, Streaming};
use tracing::{debug, info, warn};
use zeroize::Zeroize as _;

/// Where SPIRE's docs (and the sprint log's fix) put the admin socket: a
/// directory of its own, apart from the Workload API socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/spire/admin-sockets/admin.sock";

/// Who to ask about: the owner of a socket seen by the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkloadQuery {
    pub pid: Option<u32>,
    /// The process start time in ns since boot (`task_struct.start_boottime`);
    /// 0 if unknown, and then the pid is not trusted.
    pub pid_start_ns: u64,
    /// Shared with the cgroup resolver's cache and the endpoint directory's
    /// pod: a query costs no allocation.
    pub pod_uid: Option<ArcStr>,
    pub namespace: Option<ArcStr>,
    pub service_account: Option<ArcStr>,
}

/// What SPIRE attested: the first SVID's SPIFFE ID and expiry, and every ID
/// the workload holds. Never carries key material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestedIdentity {
    /// Shared with every flow of the workload (issue 15).
    pub spiffe_id: crate::flow::ArcStr,
    pub expires_at: SystemTime,
    pub all_ids: Vec<String>,
}

#[derive(Clone, Debug)]
pub enum Lookup {
    Attested(Arc<AttestedIdentity>),
    /// SPIRE answered: no registration entry matches this workload (or the
    /// query has nothing SPIRE can be asked by).
    NoIdentity,
    /// A subscription is in flight; [`SpireClient::wait`] may wait for it.
    Pending,
    /// SPIRE is down, refuses flowaudit, or failed; the reason says which and
    /// what to do.
    Unavailable(String),
    /// SPIRE answered with SVIDs, and none could be read (a certificate
    /// that does not parse or names no valid SPIFFE ID); the reason says
    /// why. Not "no identity": SPIRE has an entry for the workload.
    Unreadable(String),
}

impl Lookup {
    /// The `result` label of `flowaudit_identity_lookups_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Lookup::Attested(_) => "attested",
            Lookup::NoIdentity => "no_identity",
            Lookup::Pending => "pending",
            Lookup::Unavailable(_) => "unavailable",
            Lookup::Unreadable(_) => "unreadable",
        }
    }
}

/// How workloads are asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpireMode {
    /// Not known yet (never connected, or the agent did not say).
    Unknown,
    /// By pid: SPIRE 1.10.2 and later attest the process themselves.
    Pid,
    /// By selectors (`k8s:pod-uid`, `k8s:ns`, `k8s:sa`): older agents.
    Selectors,
}

impl std::fmt::Display for SpireMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SpireMode::Unknown => "unknown",
            SpireMode::Pid => "pid",
            SpireMode::Selectors => "selectors",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpireStatus {
    pub socket_path: PathBuf,
    pub connected: bool,
    pub mode: SpireMode,
    pub cached_workloads: usize,
    /// The last connection failure, with what to do about it; None once
    /// connected again.
    pub last_error: Option<String>,
    /// The agent's trust domain when its bundle stream names exactly one.
    pub trust_domain: Option<String>,
}

/// Hooks for metrics. Each `lookup` or `wait` call reports its result once
/// ([`Lookup::label`]); connection changes report the new state.
pub trait SpireObserver: Send + Sync {
    fn on_lookup(&self, _result: &str) {}
    fn on_connected(&self, _connected: bool) {}
}

#[derive(Clone)]
pub struct SpireOptions {
    /// Workloads cached at most; the least recently used one is dropped and
    /// its subscription cancelled.
    pub max_workloads: usize,
    /// Reconnect backoff: first delay, doubled after each failure up to the cap.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long connecting (and SPIRE's first answer) may take.
    pub connect_timeout: Duration,
    /// tonic's default is 4 MiB; a workload with many SVIDs and federated
    /// bundles can exceed it.
    pub max_decoding_message_size: usize,
    /// Where /proc is (the host's, with hostPID).
    pub proc_root: PathBuf,
    /// Keep answers already cached (until their SVIDs expire) while SPIRE is
    /// unreachable; false makes every lookup `Unavailable` during an outage.
    pub keep_during_outage: bool,
    /// How often workloads keyed by a pid are checked for having exited.
    pub sweep_interval: Duration,
    /// Ask by selectors even where the agent accepts pid (`Some(Selectors)`);
    /// None: by pid where the agent accepts it.
    pub force_mode: Option<SpireMode>,
    pub observer: Option<Arc<dyn SpireObserver>>,
}

impl Default for SpireOptions {
    fn default() -> Self {
        Self {
            max_workloads: 4096,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            max_decoding_message_size: 64 << 20,
            proc_root: PathBuf::from("/proc"),
            keep_during_outage: true,
            sweep_interval: Duration::from_secs(15),
            force_mode: None,
            observer: None,
        }
    }
}

impl std::fmt::Debug for SpireOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpireOptions")
            .field("max_workloads", &self.max_workloads)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_decoding_message_size", &self.max_decoding_message_size)
            .field("proc_root", &self.proc_root)
            .field("keep_during_outage", &self.keep_during_outage)
            .field("sweep_interval", &self.sweep_interval)
            .field("force_mode", &self.force_mode)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

/// Handle to the client; cheap to clone. The background tasks stop when the
/// last clone is dropped.
#[derive(Clone)]
pub struct SpireClient {
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
}

impl std::fmt::Debug for SpireClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpireClient")
            .field("status", &self.status())
            .finish()
    }
}

impl SpireClient {
    /// Starts connecting to the admin socket in the background and returns
    /// at once, even if the socket does not exist yet. Needs a tokio runtime.
    pub fn start(socket_path: impl Into<PathBuf>, options: SpireOptions) -> SpireClient {
        let socket: PathBuf = socket_path.into();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let (conn, _) = watch::channel(Conn {
            generation: 0,
            channel: None,
            mode: SpireMode::Unknown,
        });
        let shared = Arc::new(Shared {
            socket,
            opts: options,
            answers_changed: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                tick: 0,
                phase: Phase::Connecting,
                mode: SpireMode::Unknown,
                last_error: None,
                trust_domains: Vec::new(),
            }),
            conn,
            tick_ns: 1_000_000_000 / if hz > 0 { hz as u64 } else { 100 },
            runtime: tokio::runtime::Handle::current(),
        });
        let connection = tokio::spawn(run_connection(shared.clone())).abort_handle();
        let sweeper = tokio::spawn(run_sweeper(shared.clone())).abort_handle();
        let tasks = Arc::new(Tasks {
            shared: shared.clone(),
            handles: vec![connection, sweeper],
        });
        SpireClient {
            shared,
            _tasks: tasks,
        }
    }

    /// The answer known now; never blocks. Starts a subscription for a
    /// workload not seen before (then `Pending`).
    pub fn lookup(&self, q: &WorkloadQuery) -> Lookup {
        let (r, _) = self.shared.resolve(q);
        self.shared.report(r.label());
        r
    }

    /// Counts one answer with this `result` label (see [`Lookup::label`])
    /// to the observer, for an answer kept outside the client (what
    /// `lookup` does for its own).
    pub(super) fn report_label(&self, label: &'static str) {
        self.shared.report(label);
    }

    /// Changes whenever an answer may have changed (see [`LookupMemo`]).
    pub(super) fn answers_changed(&self) -> u64 {
        self.shared.answers_changed.load(Ordering::Acquire)
    }

    /// Like `lookup`, but while the answer is `Pending` waits for it, never
    /// longer than `timeout` (then `Pending`).
    #[cfg_attr(
        not(test),
        allow(
            dead_code,
            reason = "the pipeline polls lookup(); wait() serves callers that can block"
        )
    )]
    pub async fn wait(&self, q: &WorkloadQuery, timeout: Duration) -> Lookup {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (r, rx) = self.shared.resolve(q);
            let (Lookup::Pending, Some(mut rx)) = (&r, rx) else {
                self.shared.report(r.label());
                return r;
            };
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Err(_) => {
                    self.shared.report(Lookup::Pending.label());
                    return Lookup::Pending;
                }
                // Changed, or the entry was evicted: ask again.
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    tokio::time::sleep_until(
                        deadline.min(tokio::time::Instant::now() + Duration::from_millis(5)),
                    )
                    .await
                }
            }
        }
    }

    /// Whether the last connection attempt failed (not merely still
    /// connecting): answers will not come soon.
    pub fn is_down(&self) -> bool {
        matches!(self.shared.lock().phase, Phase::Down(_))
    }

    /// The SPIRE agent's trust domain, once its bundle stream named exactly one.
    pub fn trust_domain(&self) -> Option<String> {
        match self.shared.lock().trust_domains.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        }
    }

    pub fn status(&self) -> SpireStatus {
        let inner = self.shared.lock();
        SpireStatus {
            socket_path: self.shared.socket.clone(),
            connected: matches!(inner.phase, Phase::Connected),
            mode: inner.mode,
            cached_workloads: inner.entries.len(),
            last_error: inner.last_error.clone(),
            trust_domain: match inner.trust_domains.as_slice() {
                [one] => Some(one.clone()),
                _ => None,
            },
        }
    }
}

/// Aborts the background tasks when the last `SpireClient` goes.
struct Tasks {
    shared: Arc<Shared>,
    handles: Vec<tokio::task::AbortHandle>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for h in &self.handles {
            h.abort();
        }
        // Entries' tasks hold the shared state: dropping them breaks the cycle.
        let entries = std::mem::take(&mut self.shared.lock().entries);
        drop(entries);
    }
}

/// The settled answers of recent queries, kept by their caller (the
/// pipeline's identity stage asks for both ends of every flow, a few
/// workloads for thousands of flows a second). A hit costs one hash of the
/// query and no lock: [`SpireClient::lookup`] builds the query's selectors
/// (six strings), locks the cache twice and hashes the selectors with
/// SipHash twice, which with SPIRE on was most of the agent's CPU per
/// connection. Only attested identities (until their SVID expires) and "no
/// identity" answers are kept, and all are forgotten when the client's
/// answers may have changed (a subscription's update, an entry dropped, the
/// mode or the connection), so a hit is what `lookup` would answer.
#[derive(Default)]
pub struct LookupMemo {
    /// An attested identity with its SVID's expiry, or none (no identity).
    answers: HashMap<
        WorkloadQuery,
        Option<(Arc<AttestedIdentity>, FlowTime)>,
        foldhash::fast::RandomState,
    >,
    /// [`SpireClient::answers_changed`] when `answers` was started.
    changed: u64,
}

/// Queries remembered at most; beyond it the memo starts over.
const MEMO_CAP: usize = 4096;

impl LookupMemo {
    /// `client.lookup(q)`, from the memo when it holds `q` and its SVID is
    /// still valid `at` (the flow's time: no clock read per lookup).
    pub fn lookup(&mut self, client: &SpireClient, q: &WorkloadQuery, at: FlowTime) -> Lookup {
        // Read before asking: a change after this makes the next call
        // start over, whatever this one stores.
        let changed = client.answers_changed();
        if changed != self.changed || self.answers.len() >= MEMO_CAP {
            self.answers.clear();
            self.changed = changed;
        }
        let hit = match self.answers.get(q) {
            Some(Some((id, expires))) if *expires > at => Some(Lookup::Attested(id.clone())),
            Some(None) => Some(Lookup::NoIdentity),
            // Expired: `lookup` decides (pending rotation, or unavailable).
            Some(Some(_)) | None => None,
        };
        if let Some(r) = hit {
            client.report_label(r.label());
            return r;
        }
        let r = client.lookup(q);
        match &r {
            Lookup::Attested(id) => {
                let expires = FlowTime::from_system(id.expires_at);
                self.answers.insert(q.clone(), Some((id.clone(), expires)));
            }
            Lookup::NoIdentity => {
                self.answers.insert(q.clone(), None);
            }
            Lookup::Pending | Lookup::Unavailable(_) | Lookup::Unreadable(_) => {}
        }
        r
    }
}

/// A cached workload. Pid keys carry the start time, so a reused pid is a
/// different key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Pid {
        pid: u32,
        start_ns: u64,
    },
    /// Sorted, deduplicated `(type, value)`.
    Selectors(Vec<(String, String)>),
}

#[derive(Clone, Debug)]
enum State {
    Pending,
    Attested(Arc<AttestedIdentity>),
    NoIdentity,
    Unavailable(String),
    /// SVIDs came, none readable (see [`Lookup::Unreadable`]).
    Unreadable(String),
    /// This pid cannot be asked by pid: look at the selectors key instead
    /// (None: there is none, so no identity).
    Redirect(Option<Key>),
}

struct Entry {
    state: State,
    /// Bumped on every state change; `wait` listens.
    notify: watch::Sender<u64>,
    task: Option<tokio::task::AbortHandle>,
    last_used: u64,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

#[derive(Clone, Debug)]
enum Phase {
    /// The first attempt has not finished: lookups say `Pending`.
    Connecting,
    Connected,
    Down(String),
}

#[derive(Clone)]
struct Conn {
    generation: u64,
    channel: Option<Channel>,
    /// How this connection's agent is asked, found before the channel is
    /// published (an agent may come back from a restart as another release).
    mode: SpireMode,
}

struct Inner {
    entries: HashMap<Key, Entry>,
    tick: u64,
    phase: Phase,
    mode: SpireMode,
    last_error: Option<String>,
    /// The trust domains of the agent's X.509 bundles (its own, and those it
    /// federates with), from the bundle stream.
    trust_domains: Vec<String>,
}

struct Shared {
    socket: PathBuf,
    opts: SpireOptions,
    inner: Mutex<Inner>,
    /// Bumped after every change that can change an answer (an entry's
    /// state, an entry dropped, the mode, the connection): what a
    /// [`LookupMemo`] checks its answers against.
    answers_changed: AtomicU64,
    conn: watch::Sender<Conn>,
    tick_ns: u64,
    runtime: tokio::runtime::Handle,
}

#[derive(Debug, PartialEq, Eq)]
enum StartCheck {
    Same,
    Different,
    Gone,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called with the change made (the lock still held or just dropped).
    fn changed(&self) {
        self.answers_changed.fetch_add(1, Ordering::Release);
    }

    fn report(&self, label: &'static str) {
        if let Some(o) = &self.opts.observer {
            o.on_lookup(label);
        }
    }

    fn client(&self, channel: Channel) -> DelegatedIdentityClient<Channel> {
        DelegatedIdentityClient::new(channel)
            .max_decoding_message_size(self.opts.max_decoding_message_size)
    }

    /// Does `pid` still name the process that started at `start_ns`? Compared
    /// to the clock tick, the resolution of /proc/<pid>/stat field 22.
    fn check_start(&self, pid: u32, start_ns: u64) -> StartCheck {
        let path = self.opts.proc_root.join(pid.to_string()).join("stat");
        let Ok(stat) = std::fs::read_to_string(path) else {
            return StartCheck::Gone;
        };
        match stat_start_ticks(&stat) {
            Some(ticks) if start_ns != 0 && ticks == start_ns / self.tick_ns => StartCheck::Same,
            Some(_) => StartCheck::Different,
            None => StartCheck::Gone,
        }
    }

    /// The key a query is asked by, or None if it has nothing to ask by.
    fn key_for(&self, q: &WorkloadQuery) -> (Option<Key>, Option<Key>) {
        let selectors = selector_key(q);
        let mode = self.lock().mode;
        if let Some(pid) = q.pid
            && mode != SpireMode::Selectors
            && q.pid_start_ns != 0
        {
            let key = Key::Pid {
                pid,
                start_ns: q.pid_start_ns,
            };
            if self.lock().entries.contains_key(&key) {
                return (Some(key), selectors);
            }
            match self.check_start(pid, q.pid_start_ns) {
                StartCheck::Same => return (Some(key), selectors),
                other => debug!(
                    pid,
                    ?other,
                    "pid no longer names the socket's owner: not asking SPIRE by pid"
                ),
            }
        }
        (selectors.clone(), None)
    }

    /// The current answer for `q`, and a receiver that fires when it changes.
    fn resolve(self: &Arc<Self>, q: &WorkloadQuery) -> (Lookup, Option<watch::Receiver<u64>>) {
        let (key, fallback) = self.key_for(q);
        let Some(mut key) = key else {
            return (Lookup::NoIdentity, None);
        };
        let mut fallback = fallback;
        let mut inner = self.lock();
        for _ in 0..3 {
            inner.tick += 1;
            let tick = inner.tick;
            if !inner.entries.contains_key(&key) {
                self.create(&mut inner, key.clone(), fallback.take());
            }
            let phase = inner.phase.clone();
            let entry = inner.entries.get_mut(&key).expect("just created");
            entry.last_used = tick;
            let rx = entry.notify.subscribe();
            let r = match &entry.state {
                State::Redirect(Some(next)) => {
                    key = next.clone();
                    continue;
                }
                State::Redirect(None) | State::NoIdentity => Lookup::NoIdentity,
                State::Pending => Lookup::Pending,
                State::Unavailable(why) => Lookup::Unavailable(why.clone()),
                State::Unreadable(why) => Lookup::Unreadable(why.clone()),
                State::Attested(id) if id.expires_at > SystemTime::now() => {
                    Lookup::Attested(id.clone())
                }
                State::Attested(id) => match phase {
                    // The stream should bring the rotated SVID any moment.
                    Phase::Connected | Phase::Connecting => Lookup::Pending,
                    Phase::Down(why) => Lookup::Unavailable(format!(
                        "the SVID of {} expired while SPIRE is unreachable: {why}",
                        id.spiffe_id
                    )),
                },
            };
            return (r, Some(rx));
        }
        (Lookup::NoIdentity, None)
    }

    fn create(self: &Arc<Self>, inner: &mut Inner, key: Key, fallback: Option<Key>) {
        while inner.entries.len() >= self.opts.max_workloads.max(1) {
            let Some(oldest) = inner
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            debug!(
                ?oldest,
                "identity cache full: dropping the least recently used workload"
            );
            inner.entries.remove(&oldest);
            self.changed();
        }
        let state = match &inner.phase {
            Phase::Connecting | Phase::Connected => State::Pending,
            Phase::Down(why) => State::Unavailable(why.clone()),
        };
        let task = self
            .runtime
            .spawn(run_entry(self.clone(), key.clone(), fallback))
            .abort_handle();
        let (notify, _) = watch::channel(0);
        inner.entries.insert(
            key,
            Entry {
                state,
                notify,
                task: Some(task),
                last_used: inner.tick,
            },
        );
    }

    fn set_state(&self, key: &Key, state: State) {
        let mut inner = self.lock();
        if let Some(e) = inner.entries.get_mut(key) {
            e.state = state;
            e.notify.send_modify(|v| *v += 1);
            self.changed();
        }
    }

    /// A subscription failed: pending lookups learn why; cached answers stay
    /// if the options say so.
    fn fail(&self, key: &Key, why: String) {
        let keep = self.opts.keep_during_outage;
        let mut inner = self.lock();
        if let Some(e) = inner.entries.get_mut(key) {
            if keep
                && matches!(
                    e.state,
                    State::Attested(_) | State::NoIdentity | State::Unreadable(_)
                )
            {
                return;
            }
            e.state = State::Unavailable(why);
            e.notify.send_modify(|v| *v += 1);
            self.changed();
        }
    }

    fn redirect(&self, key: &Key, to: Option<Key>, why: &str) {
        debug!(?key, ?to, why, "not asking SPIRE by pid");
        self.set_state(key, State::Redirect(to));
    }

    fn learn_mode(&self, mode: SpireMode, why: &str) {
        let mut inner = self.lock();
        if inner.mode != mode {
            inner.mode = mode;
            self.changed();
            match mode {
                SpireMode::Pid => {
                    info!(socket = %self.socket.display(), mode = %mode, why, "SPIRE agent attests by pid (SPIRE 1.10.2+): asking by pid, checked against the process start time")
                }
                SpireMode::Selectors => {
                    info!(socket = %self.socket.display(), mode = %mode, why, "SPIRE agent does not accept pid (SPIRE before 1.10.2): asking by selectors k8s:pod-uid, k8s:ns, k8s:sa of the pod found from the socket's cgroup")
                }
                SpireMode::Unknown => info!(
                    why,
                    "SPIRE agent's attestation mode unknown: trying pid first"
                ),
            }
        }
    }

    fn set_connected(&self, channel: Channel, mode: SpireMode, trust_domains: Vec<String>) {
        let mut inner = self.lock();
        let was = matches!(inner.phase, Phase::Connected);
        inner.phase = Phase::Connected;
        inner.last_error = None;
        inner.trust_domains = trust_domains;
        for e in inner.entries.values_mut() {
            if matches!(e.state, State::Unavailable(_)) {
                e.state = State::Pending;
                e.notify.send_modify(|v| *v += 1);
            }
        }
        self.conn.send_modify(|c| {
            c.generation += 1;
            c.channel = Some(channel);
            c.mode = mode;
        });
        self.changed();
        drop(inner);
        info!(socket = %self.socket.display(), "connected to the SPIRE agent's Delegated Identity API");
        if !was && let Some(o) = &self.opts.observer {
            o.on_connected(true);
        }
    }

    fn set_down(&self, why: String) {
        let mut inner = self.lock();
        let was = matches!(inner.phase, Phase::Connected);
        let repeated = inner.last_error.as_deref() == Some(why.as_str());
        inner.phase = Phase::Down(why.clone());
        inner.last_error = Some(why.clone());
        let keep = self.opts.keep_during_outage;
        for e in inner.entries.values_mut() {
            let drop_answer = match e.state {
                State::Pending | State::Unavailable(_) => true,
                State::Attested(_) | State::NoIdentity | State::Unreadable(_) => !keep,
                State::Redirect(_) => false,
            };
            if drop_answer {
                e.state = State::Unavailable(why.clone());
                e.notify.send_modify(|v| *v += 1);
            }
        }
        if self.conn.borrow().channel.is_some() {
            self.conn.send_modify(|c| {
                c.generation += 1;
                c.channel = None;
                c.mode = SpireMode::Unknown;
            });
        }
        self.changed();
        drop(inner);
        if !repeated {
            // The agent's status loop logs it once, with what it means for flows.
            debug!(socket = %self.socket.display(), error = %why, "SPIRE Delegated Identity API unavailable");
        }
        if was && let Some(o) = &self.opts.observer {
            o.on_connected(false);
        }
    }

    /// Connects, and proves the connection (and flowaudit's authorization)
    /// with SPIRE's first answer on the bundle stream, which then stays open
    /// as the liveness signal.
    async fn connect_once(
        &self,
    ) -> Result<
        (
            Channel,
            Streaming<SubscribeToX509BundlesResponse>,
            Vec<String>,
        ),
        String,
    > {
        let path = self.socket.clone();
        match tokio::fs::metadata(&path).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(socket_absent(&path)),
            _ => {}
        }
        let connector = tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move { tokio::net::UnixStream::connect(p).await.map(TokioIo::new) }
        });
        // The authority is never used on a unix socket.
        let channel = Endpoint::from_static("http://spire-agent.admin")
            .connect_timeout(self.opts.connect_timeout)
            .connect_with_connector(connector)
            .await
            .map_err(|e| describe_transport(&self.socket, &e))?;
        let t = self.opts.connect_timeout;
        let mut client = self.client(channel.clone());
        let mut stream = tokio::time::timeout(
            t,
            client.subscribe_to_x509_bundles(SubscribeToX509BundlesRequest {}),
        )
        .await
        .map_err(|_| {
            format!(
                "the SPIRE agent on {} did not answer within {t:?}",
                self.socket.display()
            )
        })?
        .map_err(|s| describe_status(&self.socket, &s))?
        .into_inner();
        match tokio::time::timeout(t, stream.message()).await {
            Ok(Ok(Some(bundles))) => {
                let mut tds: Vec<String> = bundles
                    .ca_certificates
                    .keys()
                    .filter_map(|k| trust_domain_name(k))
                    .collect();
                tds.sort();
                tds.dedup();
                Ok((channel, stream, tds))
            }
            Ok(Ok(None)) => Err(format!(
                "the SPIRE agent on {} closed the bundle stream at once",
                self.socket.display()
            )),
            Ok(Err(s)) => Err(describe_status(&self.socket, &s)),
            Err(_) => Err(format!(
                "the SPIRE agent on {} sent no trust bundle within {t:?}",
                self.socket.display()
            )),
        }
    }

    /// Whether this agent knows `pid`, from the status code alone: a request
    /// carrying both a pid and a selector is `InvalidArgument` on every
    /// release that has the field (1.10.2+: "either selectors or non-zero
    /// PID, but not both"), while a release without it (1.9.6) drops the
    /// unknown field and serves the selector. The selector matches no entry,
    /// so no SVID (and no key) comes back: SPIRE answers such a set at once
    /// with an empty list. Asking by pid alone cannot tell: 1.9.6 answers
    /// that with an empty list too.
    async fn detect_mode(&self, channel: Channel) -> Result<SpireMode, String> {
        let req = SubscribeToX509sviDsRequest {
            selectors: vec![Selector {
                r#type: "k8s".into(),
                value: format!("pod-uid:{PROBE_POD_UID}"),
            }],
            pid: std::process::id() as i32,
        };
        let mut client = self.client(channel);
        let probe = async {
            let mut s = client.subscribe_to_x509svi_ds(req).await?.into_inner();
            if let Some(resp) = s.message().await? {
                drop(take_answer(resp));
            }
            Ok::<(), Status>(())
        };
        match tokio::time::timeout(self.opts.connect_timeout, probe).await {
            Ok(Ok(())) => Ok(SpireMode::Selectors),
            Ok(Err(s)) if s.code() == Code::InvalidArgument => Ok(SpireMode::Pid),
            Ok(Err(s)) => Err(describe_status(&self.socket, &s)),
            Err(_) => Err(format!(
                "the SPIRE agent on {} did not answer the mode probe within {:?}",
                self.socket.display(),
                self.opts.connect_timeout
            )),
        }
    }
}

/// A pod UID no pod has: the mode probe's selector.
const PROBE_POD_UID: &str = "00000000-0000-0000-0000-000000000000";

/// `spiffe://demo.local` (a bundle map key) -> `demo.local`.
fn trust_domain_name(key: &str) -> Option<String> {
    let td = key.strip_prefix("spiffe://").unwrap_or(key);
    let td = td.trim_end_matches('/');
    (!td.is_empty() && !td.contains('/')).then(|| td.to_owned())
}

/// Field 22 of /proc/<pid>/stat (start time in clock ticks since boot). The
/// command (field 2) may hold spaces and parentheses: split after the last ')'.
fn stat_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn selector_key(q: &WorkloadQuery) -> Option<Key> {
    let mut sel: Vec<(String, String)> = Vec::new();
    let mut add = |k: &str, v: &Option<ArcStr>| {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            sel.push(("k8s".into(), format!("{k}:{v}")));
        }
    };
    add("pod-uid", &q.pod_uid);
    add("ns", &q.namespace);
    add("sa", &q.service_account);
    sel.sort();
    sel.dedup();
    (!sel.is_empty()).then_some(Key::Selectors(sel))
}

fn request_for(key: &Key) -> SubscribeToX509sviDsRequest {
    match key {
        Key::Pid { pid, .. } => SubscribeToX509sviDsRequest {
            selectors: Vec::new(),
            pid: *pid as i32,
        },
        Key::Selectors(sel) => SubscribeToX509sviDsRequest {
            selectors: sel
                .iter()
                .map(|(t, v)| Selector {
                    r#type: t.clone(),
                    value: v.clone(),
                })
                .collect(),
            pid: 0,
        },
    }
}

/// Turns an answer into cache state. The private keys are taken out and
/// wiped first (where the buffer is ours alone; otherwise just dropped).
/// SVIDs that cannot be read are left out; when none can, the state says
/// why. SPIRE sends an SVID only for a matching entry, with its `Id`,
/// `CertChain` and `ExpiresAt` all set (spiffe/spire
/// `pkg/agent/api/delegatedidentity/v1/service.go`,
/// `composeX509SVIDBySelectors`; an identity without a certificate fails
/// the whole answer there), so such an answer is a certificate flowaudit
/// cannot read, not one without an entry.
fn take_answer(mut resp: SubscribeToX509sviDsResponse) -> State {
    let mut ids: Vec<(String, SystemTime)> = Vec::new();
    let mut unreadable: Vec<String> = Vec::new();
    for s in &mut resp.x509_svids {
        wipe(std::mem::take(&mut s.x509_svid_key));
        let read = match &s.x509_svid {
            Some(svid) => read_svid(svid),
            None => Err("an SVID without its certificate or ID".into()),
        };
        match read {
            Ok(p) if ids.iter().any(|(i, _)| *i == p.0) => {}
            Ok(p) => ids.push(p),
            Err(why) => unreadable.push(why),
        }
    }
    let svids = resp.x509_svids.len();
    drop(resp);
    match (ids.first(), unreadable.first()) {
        (Some((id, exp)), _) => State::Attested(Arc::new(AttestedIdentity {
            spiffe_id: shared_id(id),
            expires_at: *exp,
            all_ids: ids.iter().map(|(i, _)| i.clone()).collect(),
        })),
        (None, Some(why)) => State::Unreadable(format!(
            "SPIRE answered with {svids} SVID{}, none readable: {why}",
            if svids == 1 { "" } else { "s" }
        )),
        (None, None) => State::NoIdentity,
    }
}

/// An SVID's SPIFFE ID and expiry: from its leaf certificate (the URI SAN,
/// `notAfter`), else from the answer's `id` and `expires_at`; the ID must
/// be a valid SPIFFE ID. The error says what could not be read.
fn read_svid(
    svid: &spire_api::pb::spire::api::types::X509svid,
) -> Result<(String, SystemTime), String> {
    let from_der = match svid.cert_chain.first() {
        Some(der) => leaf_id_and_expiry(der),
        None => Err("no certificate".to_owned()),
    };
    let (id, exp) = match (from_der, &svid.id) {
        (Ok(p), _) => p,
        (Err(_), Some(id)) => {
            let exp = u64::try_from(svid.expires_at)
                .map_err(|_| format!("its expiry {} is before 1970", svid.expires_at))?;
            (
                format!("spiffe://{}{}", id.trust_domain, id.path),
                UNIX_EPOCH + Duration::from_secs(exp),
            )
        }
        (Err(why), None) => return Err(format!("{why}, and no ID beside it")),
    };
    flowaudit_policy::spiffe::check_id(&id).map_err(|why| {
        let shown: String = id.chars().take(120).collect();
        format!("its SPIFFE ID `{shown}` is not valid: {why}")
    })?;
    Ok((id, exp))
}

/// Attested IDs made static at most over the agent's life: an ID of the
/// usual 60 characters takes about 100 bytes with the set's entry, 400 KiB
/// for all of them (SPIFFE bounds an ID at 2,048 bytes).
const STATIC_ATTESTED_IDS: usize = 4096;

/// The one copy of an attested SPIFFE ID that every answer naming it
/// shares: static (copied and dropped without touching a reference count,
/// on the pipeline and on the threads that drop flows alike), and the same
/// pointer for every process and pod SPIRE attests with it, so that the
/// judge's memo, keyed by pointer, knows their flows as one pair. Fresh and
/// counted once `STATIC_ATTESTED_IDS` texts were made static: a bound
/// whatever the cluster registers. Called once per SPIRE answer, not per
/// flow.
fn shared_id(id: &str) -> ArcStr {
    use std::collections::HashSet;
    use std::sync::LazyLock;
    static IDS: LazyLock<Mutex<HashSet<ArcStr>>> = LazyLock::new(Mutex::default);
    let mut ids = IDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(known) = ids.get(id) {
        return known.clone();
    }
    let fresh = ArcStr::from(id);
    if ids.len() < STATIC_ATTESTED_IDS {
        fresh.leak();
        ids.insert(fresh.clone());
    }
    fresh
}

fn wipe(key: Bytes) {
    if let Ok(mut m) = key.try_into_mut() {
        m[..].zeroize();
    }
}

/// The SPIFFE ID (URI SAN) and NotAfter of an X.509-SVID leaf.
fn leaf_id_and_expiry(der: &[u8]) -> Result<(String, SystemTime), String> {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("its leaf certificate does not parse ({e})"))?;
    let not_after = u64::try_from(cert.validity().not_after.timestamp())
        .map_err(|_| "its leaf certificate expires before 1970".to_owned())?;
    let no_id = || "its leaf certificate has no spiffe:// URI SAN".to_owned();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("its leaf certificate's SAN does not parse ({e})"))?
        .ok_or_else(no_id)?;
    let id = san
        .value
        .general_names
        .iter()
        .find_map(|g| match g {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some((*u).to_owned()),
            _ => None,
        })
        .ok_or_else(no_id)?;
    Ok((id, UNIX_EPOCH + Duration::from_secs(not_after)))
}

fn socket_absent(path: &Path) -> String {
    format!(
        "SPIRE admin socket {p} does not exist: run the SPIRE agent with `admin_socket_path = \"{p}\"` in its agent block \
         (in a directory of its own, not the Workload API socket's) and mount that directory into flowaudit's pod; \
         --spire-admin-socket sets the path flowaudit uses",
        p = path.display()
    )
}

fn describe_transport(path: &Path, e: &tonic::transport::Error) -> String {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::NotFound => socket_absent(path),
                std::io::ErrorKind::PermissionDenied => format!(
                    "cannot open SPIRE admin socket {}: permission denied; flowaudit must run as root or as the socket's owner",
                    path.display()
                ),
                std::io::ErrorKind::ConnectionRefused => format!(
                    "nothing listens on SPIRE admin socket {}: the SPIRE agent is stopped or restarting",
                    path.display()
                ),
                _ => format!("connecting to SPIRE admin socket {}: {io}", path.display()),
            };
        }
        src = s.source();
    }
    format!("connecting to SPIRE admin socket {}: {e}", path.display())
}

fn describe_status(path: &Path, s: &Status) -> String {
    match s.code() {
        Code::PermissionDenied => permission_denied_fix(path, s.message()),
        Code::Unavailable => format!(
            "the SPIRE agent on {} is unavailable: {}",
            path.display(),
            s.message()
        ),
        Code::Unimplemented => format!(
            "{} does not serve the Delegated Identity API ({}): is this the SPIRE agent's admin socket, not the Workload API one?",
            path.display(),
            s.message()
        ),
        c => format!(
            "the SPIRE agent on {} answered {c:?}: {}",
            path.display(),
            s.message()
        ),
    }
}

/// What PermissionDenied means and how to fix it, in the SPIRE agent's terms.
pub fn permission_denied_fix(path: &Path, message: &str) -> String {
    let mut s = format!(
        "the SPIRE agent on {p} refused flowaudit (PermissionDenied: {message}): flowaudit is not an authorized delegate. \
         Fix: add flowaudit's SPIFFE ID to `authorized_delegates` in the SPIRE agent config, \
         e.g. agent {{ admin_socket_path = \"{p}\" authorized_delegates = [\"spiffe://<trust-domain>/ns/<namespace>/sa/flowaudit\"] }}, \
         and restart the agent",
        p = path.display()
    );
    let m = message.to_ascii_lowercase();
    if m.contains("no identity issued") {
        s.push_str(
            "; SPIRE found no registration entry for flowaudit itself: register it with that SPIFFE ID, \
             e.g. `spire-server entry create -parentID <agent-id> -spiffeID spiffe://<trust-domain>/ns/<namespace>/sa/flowaudit \
             -selector k8s:ns:<namespace> -selector k8s:sa:flowaudit`",
        );
    }
    if m.contains("director") || m.contains("admin socket") || m.contains("admin_socket") {
        s.push_str(
            "; and set admin_socket_path in a directory of its own, apart from the Workload API socket \
             (e.g. /run/spire/admin-sockets/admin.sock, not /run/spire/sockets/admin.sock)",
        );
    }
    s
}

fn jitter(d: Duration) -> Duration {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d + d.mul_f64(f64::from(n % 250) / 1000.0)
}

async fn run_connection(shared: Arc<Shared>) {
    let mut backoff =
        crate::runtime::Backoff::new(shared.opts.backoff_initial, shared.opts.backoff_max);
    loop {
        let lasted = match shared.connect_once().await {
            Ok((channel, mut bundles, trust_domains)) => {
                let connected_at = tokio::time::Instant::now();
                let mode = match shared.detect_mode(channel.clone()).await {
                    Ok(SpireMode::Pid) if shared.opts.force_mode == Some(SpireMode::Selectors) => {
                        shared.learn_mode(SpireMode::Selectors, "--spire-attest-by selectors");
                        SpireMode::Selectors
                    }
                    Ok(mode) => {
                        shared.learn_mode(
                            mode,
                            "answer to a request carrying both pid and a selector",
                        );
                        mode
                    }
                    Err(why) => {
                        // Selectors work on every release: ask by them.
                        warn!(error = %why, "SPIRE attestation mode unknown: asking by selectors");
                        shared.learn_mode(SpireMode::Selectors, &why);
                        SpireMode::Selectors
                    }
                };
                shared.set_connected(channel, mode, trust_domains);
                let why = loop {
                    match bundles.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => {
                            break format!(
                                "the SPIRE agent on {} closed the connection",
                                shared.socket.display()
                            );
                        }
                        Err(s) => break describe_status(&shared.socket, &s),
                    }
                };
                shared.set_down(why);
                // Only a connection that lasted starts the backoff again:
                // one dropped at once (a SPIRE agent that flaps) backs off
                // as a failed connect does, since each reconnect has SPIRE
                // send every watched workload's SVID again.
                Some(connected_at.elapsed())
            }
            Err(why) => {
                shared.set_down(why);
                None
            }
        };
        tokio::time::sleep(jitter(backoff.next(lasted))).await;
    }
}

/// Drops workloads keyed by a pid whose process has exited (or whose pid now
/// names another process), which also closes their streams as SPIRE asks.
async fn run_sweeper(shared: Arc<Shared>) {
    let mut tick =
        tokio::time::interval(shared.opts.sweep_interval.max(Duration::from_millis(100)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let pids: Vec<Key> = shared
            .lock()
            .entries
            .keys()
            .filter(|k| matches!(k, Key::Pid { .. }))
            .cloned()
            .collect();
        let gone: Vec<Key> = pids
            .into_iter()
            .filter(|k| match k {
                Key::Pid { pid, start_ns } => {
                    shared.check_start(*pid, *start_ns) != StartCheck::Same
                }
                Key::Selectors(_) => false,
            })
            .collect();
        if !gone.is_empty() {
            let mut inner = shared.lock();
            for k in &gone {
                inner.entries.remove(k);
            }
            shared.changed();
        }
    }
}

enum Outcome {
    /// Ask by selectors instead (pid unsupported, gone or reused).
    Redirect(String),
    /// The connection went away; wait for the next one.
    ConnectionLost,
    Failed(String),
}

async fn run_entry(shared: Arc<Shared>, key: Key, fallback: Option<Key>) {
    let mut conn_rx = shared.conn.subscribe();
    let mut retry = shared.opts.backoff_initial;
    loop {
        let Ok(conn) = conn_rx
            .wait_for(|c| c.channel.is_some())
            .await
            .map(|c| c.clone())
        else {
            return;
        };
        let (generation, Some(channel)) = (conn.generation, conn.channel) else {
            continue;
        };
        if let Key::Pid { pid, start_ns } = key {
            // Asked by pid alone, an agent without the field (1.9.6) would
            // answer with an empty list as if the process had no entry.
            if conn.mode != SpireMode::Pid {
                return shared.redirect(&key, fallback, "the SPIRE agent does not accept pid");
            }
            if shared.check_start(pid, start_ns) != StartCheck::Same {
                return shared.redirect(
                    &key,
                    fallback,
                    "the pid exited or names another process now",
                );
            }
        }
        match follow(&shared, &key, channel, generation, &mut conn_rx).await {
            Outcome::Redirect(why) => return shared.redirect(&key, fallback, &why),
            Outcome::ConnectionLost => retry = shared.opts.backoff_initial,
            Outcome::Failed(why) => {
                shared.fail(&key, why);
                tokio::select! {
                    _ = tokio::time::sleep(jitter(retry)) => {}
                    _ = lost(&mut conn_rx, generation) => {}
                }
                retry = (retry * 2).min(shared.opts.backoff_max);
            }
        }
    }
}

/// Resolves when the connection of `generation` is replaced or gone.
async fn lost(rx: &mut watch::Receiver<Conn>, generation: u64) {
    let _ = rx.wait_for(|c| c.generation != generation).await;
}

/// One subscription: applies every answer until the stream ends.
async fn follow(
    shared: &Shared,
    key: &Key,
    channel: Channel,
    generation: u64,
    conn_rx: &mut watch::Receiver<Conn>,
) -> Outcome {
    let mut client = shared.client(channel);
    let opened = tokio::select! {
        r = client.subscribe_to_x509svi_ds(request_for(key)) => r,
        _ = lost(conn_rx, generation) => return Outcome::ConnectionLost,
    };
    let mut stream = match opened {
        Ok(r) => r.into_inner(),
        Err(s) => {
            if let Key::Pid { pid, start_ns } = key {
                // A short-lived process may exit before SPIRE attests it:
                // then ask by its pod's selectors instead.
                if shared.check_start(*pid, *start_ns) != StartCheck::Same {
                    return Outcome::Redirect(format!(
                        "pid {pid} exited before SPIRE attested it: {}",
                        s.message()
                    ));
                }
                // Internal (k8s plugin errors reported as such before
                // 1.11) or Unavailable (1.15.2+: every plugin failed): SPIRE
                // could not attest this process; its pod's selectors may do.
                if matches!(
                    s.code(),
                    Code::Internal | Code::Unavailable | Code::DeadlineExceeded
                ) && !matches!(shared.lock().phase, Phase::Down(_))
                {
                    return Outcome::Redirect(format!(
                        "SPIRE could not attest pid {pid}: {:?} {}",
                        s.code(),
                        s.message()
                    ));
                }
            }
            return Outcome::Failed(describe_status(&shared.socket, &s));
        }
    };
    let mut first = true;
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = lost(conn_rx, generation) => return Outcome::ConnectionLost,
        };
        match msg {
            Ok(Some(resp)) => {
                let state = take_answer(resp);
                if first && let Key::Pid { pid, start_ns } = key {
                    // The pid could have been reused between our check and SPIRE's attestation.
                    if shared.check_start(*pid, *start_ns) != StartCheck::Same {
                        return Outcome::Redirect(format!(
                            "pid {pid} exited or was reused while SPIRE attested it"
                        ));
                    }
                }
                first = false;
                if let State::Unreadable(why) = &state {
                    warn!(?key, %why, "SPIRE's answer for a workload could not be read: its ends are DERIVED");
                }
                shared.set_state(key, state);
            }
            Ok(None) => {
                return Outcome::Failed(format!(
                    "the SPIRE agent on {} ended the subscription",
                    shared.socket.display()
                ));
            }
            Err(s) => {
                if first
                    && let Key::Pid { pid, start_ns } = key
                    && shared.check_start(*pid, *start_ns) != StartCheck::Same
                {
                    return Outcome::Redirect(format!(
                        "pid {pid} exited while SPIRE attested it: {}",
                        s.message()
                    ));
                }
                return Outcome::Failed(describe_status(&shared.socket, &s));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowaudit_tests::spire_double::{
        PodProcess, RELEASES, Release, SpireDouble, SpireDoubleConfig, VERSION_WITH_PID,
        VERSION_WITHOUT_PID,
    };
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    const TD: &str = "demo.local";
    const FRONTEND_UID: &str = "3f1c2a9e-5b7d-4c1e-9a0b-2d6f8e4c1a77";
    const BACKEND_UID: &str = "7a0e5c3d-1b2f-4e6a-8c9d-0f1e2d3c4b5a";
    const FRONTEND: &str = "spiffe://demo.local/ns/99-apps/sa/frontend";
    const BACKEND: &str = "spiffe://demo.local/ns/99-apps/sa/backend";
    const FLOWAUDIT: &str = "spiffe://demo.local/ns/kube-system/sa/flowaudit";

    static N: AtomicUsize = AtomicUsize::new(0);

    fn socket() -> PathBuf {
        std::env::temp_dir()
            .join(format!(
                "fa-spire-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ))
            .join("admin.sock")
    }

    fn uid() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }

    /// precinct-99's frontend and backend; entries by ns+sa (as in the sprint
    /// log) for the frontend, by pod UID (spire-controller-manager style) for
    /// the backend; this test process is the authorized delegate.
    fn config(version: &str) -> SpireDoubleConfig {
        SpireDoubleConfig::new(socket(), TD)
            .version(version)
            .pod(FRONTEND_UID, "99-apps", "frontend", "frontend-7d9f")
            .pod(BACKEND_UID, "99-apps", "backend", "backend-5c4b")
            .entry(FRONTEND, &["k8s:ns:99-apps", "k8s:sa:frontend"])
            .entry(BACKEND, &[&format!("k8s:pod-uid:{BACKEND_UID}")])
            .authorize_uid(uid(), FLOWAUDIT)
    }

    fn fast() -> SpireOptions {
        SpireOptions {
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(2),
            sweep_interval: Duration::from_millis(200),
            ..SpireOptions::default()
        }
    }

    fn by_pod(uid: &str, ns: &str, sa: &str) -> WorkloadQuery {
        WorkloadQuery {
            pod_uid: Some(uid.into()),
            namespace: Some(ns.into()),
            service_account: Some(sa.into()),
            ..Default::default()
        }
    }

    async fn until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let end = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return v;
            }
            if Instant::now() > end {
                panic!("waited {timeout:?} for {what}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn connected(c: &SpireClient) {
        until("the client to connect", Duration::from_secs(5), || {
            c.status().connected.then_some(())
        })
        .await;
    }

    async fn attested(c: &SpireClient, q: &WorkloadQuery) -> Arc<AttestedIdentity> {
        match c.wait(q, Duration::from_secs(5)).await {
            Lookup::Attested(id) => id,
            other => panic!(
                "expected an attested identity for {q:?}, got {other:?}; status {:?}",
                c.status()
            ),
        }
    }

    fn root_or_panic() {
        assert_eq!(
            uid(),
            0,
            "this test attests a process in a kubepods cgroup: run as root"
        );
    }

    #[test]
    fn stat_field_22_even_with_odd_command_names() {
        let stat = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        assert_eq!(stat_start_ticks(stat), Some(987654));
        assert_eq!(stat_start_ticks("garbage"), None);
    }

    #[test]
    fn selectors_from_what_is_known() {
        let q = WorkloadQuery {
            namespace: Some("ns1".into()),
            service_account: Some("sa1".into()),
            ..Default::default()
        };
        assert_eq!(
            selector_key(&q),
            Some(Key::Selectors(vec![
                ("k8s".into(), "ns:ns1".into()),
                ("k8s".into(), "sa:sa1".into())
            ]))
        );
        assert_eq!(selector_key(&WorkloadQuery::default()), None);
    }

    #[test]
    fn permission_denied_names_the_fix() {
        let m = permission_denied_fix(
            Path::new("/run/spire/sockets/admin.sock"),
            "caller not configured as an authorized delegate",
        );
        assert!(
            m.contains("authorized_delegates") && m.contains("not an authorized delegate"),
            "{m}"
        );
        let m = permission_denied_fix(
            Path::new("/x"),
            "admin socket must be in a separate directory",
        );
        assert!(m.contains("directory of its own"), "{m}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attested_by_selectors_on_spire_1_9_6() {
        let double = SpireDouble::start(config(VERSION_WITHOUT_PID))
            .await
            .unwrap();
        let c = SpireClient::start(double.socket_path(), fast());
        connected(&c).await;
        until("mode detection", Duration::from_secs(3), || {
            (c.status().mode == SpireMode::Selectors).then_some(())
        })
        .await;
        let id = attested(&c, &by_pod(FRONTEND_UID, "99-apps", "frontend")).await;
        assert_eq!(id.spiffe_id, FRONTEND);
        assert_eq!(id.all_ids, vec![FRONTEND.to_owned()]);
        assert!(id.expires_at > SystemTime::now());
        // An entry by pod UID is found with the UID alone.
        let id = attested(
            &c,
            &WorkloadQuery {
                pod_uid: Some(BACKEND_UID.into()),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(id.spiffe_id, BACKEND);
        // A pid query against 1.9.6 falls back to the pod's selectors.
        let q = WorkloadQuery {
            pid: Some(std::process::id()),
            pid_start_ns: 1,
            ..by_pod(FRONTEND_UID, "99-apps", "frontend")
        };
        assert_eq!(attested(&c, &q).await.spiffe_id, FRONTEND);
        assert_eq!(double.stats().pid_requests, 0, "1.9.6 never attests by pid");
        assert!(matches!(
            c.wait(
                &by_pod("00000000-0000-0000-0000-000000000000", "other", "x"),
                Duration::from_secs(3)
            )
            .await,
            Lookup::NoIdentity
        ));
    }

    /// A raw Delegated Identity client on the double's socket.
    async fn raw_client(path: &Path) -> DelegatedIdentityClient<Channel> {
        let path = path.to_path_buf();
        let connector = tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move { tokio::net::UnixStream::connect(p).await.map(TokioIo::new) }
        });
        let ch = Endpoint::from_static("http://spire-agent.admin")
            .connect_with_connector(connector)
            .await
            .expect("connect to the double");
        DelegatedIdentityClient::new(ch)
    }

    /// The first answer to a request: the SPIFFE IDs sent (and how long it
    /// took), or the status code.
    async fn first_answer(
        c: &mut DelegatedIdentityClient<Channel>,
        pid: i32,
        selectors: &[(&str, &str)],
    ) -> Result<(Vec<String>, Duration), Code> {
        let t = Instant::now();
        let req = SubscribeToX509sviDsRequest {
            selectors: selectors
                .iter()
                .map(|(t, v)| Selector {
                    r#type: (*t).into(),
                    value: (*v).into(),
                })
                .collect(),
            pid,
        };
        let mut s = c
            .subscribe_to_x509svi_ds(req)
            .await
            .map_err(|s| s.code())?
            .into_inner();
        let resp = tokio::time::timeout(Duration::from_secs(5), s.message())
            .await
            .expect("an answer within 5 s")
            .map_err(|s| s.code())?
            .expect("a message before the stream ends");
        let ids = resp
            .x509_svids
            .iter()
            .filter_map(|w| w.x509_svid.as_ref()?.id.as_ref())
            .map(|id| format!("spiffe://{}{}", id.trust_domain, id.path))
            .collect();
        Ok((ids, t.elapsed()))
    }

    /// The double answers each kind of request as the release's source says
    /// (see `Release` in tests/src/spire_double.rs for tags and files).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_release_answers_as_its_source_says() {
        let me = std::process::id() as i32;
        // Above any pid_max: a process that is gone.
        let gone = i32::MAX - 1;
        let frontend = [("k8s", "ns:99-apps"), ("k8s", "sa:frontend")];
        for v in RELEASES {
            let r = Release::parse(v).unwrap();
            let double = SpireDouble::start(config(v)).await.unwrap();
            let mut c = raw_client(double.socket_path()).await;
            let at_once = |a: &Result<(Vec<String>, Duration), Code>| match a {
                Ok((ids, t)) => ids.is_empty() && *t < Duration::from_millis(500),
                Err(_) => false,
            };
            // Neither pid nor selectors.
            let a = first_answer(&mut c, 0, &[]).await;
            if r.has_pid() {
                assert_eq!(a, Err(Code::InvalidArgument), "{v} neither");
            } else {
                assert!(at_once(&a), "{v} neither: an empty list at once, got {a:?}");
            }
            // Pid only (our own process, registered by unix:uid).
            let a = first_answer(&mut c, me, &[]).await;
            if r.has_pid() {
                assert_eq!(a.map(|x| x.0), Ok(vec![FLOWAUDIT.to_owned()]), "{v} pid");
            } else {
                assert!(at_once(&a), "{v} pid is dropped: empty at once, got {a:?}");
            }
            // Both.
            let a = first_answer(&mut c, me, &frontend).await;
            if r.has_pid() {
                assert_eq!(a, Err(Code::InvalidArgument), "{v} both");
            } else {
                assert_eq!(a.map(|x| x.0), Ok(vec![FRONTEND.to_owned()]), "{v} both");
            }
            // Selectors only.
            let a = first_answer(&mut c, 0, &frontend).await;
            assert_eq!(
                a.map(|x| x.0),
                Ok(vec![FRONTEND.to_owned()]),
                "{v} selectors"
            );
            // Selectors that match no entry: empty at once.
            let a = first_answer(&mut c, 0, &[("k8s", "ns:nowhere")]).await;
            assert!(at_once(&a), "{v} no entry: got {a:?}");
            // Selectors SPIRE cannot parse.
            let a = first_answer(&mut c, 0, &[("k8s:ns", "x")]).await;
            assert_eq!(a, Err(Code::InvalidArgument), "{v} bad selector");
            // A pid that is gone.
            let a = first_answer(&mut c, gone, &[]).await;
            if r.attestation_failure_is_unavailable() {
                assert_eq!(a, Err(Code::Unavailable), "{v} gone pid");
            } else {
                assert!(at_once(&a), "{v} gone pid: empty at once, got {a:?}");
            }
            // Not an authorized delegate: refused first, whatever is asked.
            double.set_authorized(false);
            for (pid, sel) in [(0, &frontend[..]), (me, &[][..])] {
                let a = first_answer(&mut c, pid, sel).await;
                assert_eq!(a, Err(Code::PermissionDenied), "{v} unauthorized");
            }
            double.clear_authorized_override();
            // Restart: the connection is cut under an open stream.
            let mut s = c
                .subscribe_to_x509svi_ds(SubscribeToX509sviDsRequest {
                    selectors: vec![Selector {
                        r#type: "k8s".into(),
                        value: "sa:frontend".into(),
                    }],
                    pid: 0,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(s.message().await.unwrap().is_some());
            double.stop().await;
            assert!(!double.socket_path().exists(), "{v}: socket removed");
            let end = tokio::time::timeout(Duration::from_secs(3), s.message())
                .await
                .expect("the stream ends when the agent stops");
            assert!(
                !matches!(end, Ok(Some(_))),
                "{v}: no answer after stop, got {end:?}"
            );
        }
    }

    /// Mode detection and attestation by each release, through the client.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_release_is_asked_the_way_it_understands() {
        root_or_panic();
        for v in RELEASES {
            let r = Release::parse(v).unwrap();
            let double = SpireDouble::start(config(v)).await.unwrap();
            let c = SpireClient::start(double.socket_path(), fast());
            connected(&c).await;
            let want = if r.has_pid() {
                SpireMode::Pid
            } else {
                SpireMode::Selectors
            };
            assert_eq!(c.status().mode, want, "{v}");
            assert_eq!(c.trust_domain().as_deref(), Some(TD), "{v}");
            let pod = PodProcess::spawn(FRONTEND_UID).unwrap();
            // What the kernel knows of a socket's owner: pid, start, pod UID.
            let q = WorkloadQuery {
                pid: Some(pod.pid()),
                pid_start_ns: pod.start_ns() + 3_000_000,
                pod_uid: Some(FRONTEND_UID.into()),
                namespace: Some("99-apps".into()),
                service_account: Some("frontend".into()),
            };
            assert_eq!(attested(&c, &q).await.spiffe_id, FRONTEND, "{v}");
            let stats = double.stats();
            if r.has_pid() {
                assert!(stats.pid_requests >= 1, "{v}: asked by pid: {stats:?}");
            } else {
                assert_eq!(stats.pid_requests, 0, "{v}: never by pid: {stats:?}");
            }
            // By the pod alone (selector mode on every release).
            let id = attested(&c, &by_pod(BACKEND_UID, "99-apps", "backend")).await;
            assert_eq!(id.spiffe_id, BACKEND, "{v}");
            assert!(matches!(
                c.wait(
                    &by_pod("00000000-0000-0000-0000-0000000000aa", "nowhere", "x"),
                    Duration::from_secs(3)
                )
                .await,
                Lookup::NoIdentity
            ));
        }
    }

    /// An agent that comes back from a restart as another release is asked
    /// the way the new one understands.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mode_is_found_again_after_an_upgrade() {
        let double = SpireDouble::start(config("1.9.6")).await.unwrap();
        let c = SpireClient::start(double.socket_path(), fast());
        connected(&c).await;
        assert_eq!(c.status().mode, SpireMode::Selectors);
        double.stop().await;
        double.set_version("1.15.3");
        double.restart().await.unwrap();
        until("pid mode after the upgrade", Duration::from_secs(5), || {
            (c.status().connected && c.status().mode == SpireMode::Pid).then_some(())
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attested_by_pid_on_spire_1_10_2() {
        root_or_panic();
        let double = SpireDouble::start(config(VERSION_WITH_PID)).await.unwrap();
        let pod = PodProcess::spawn(FRONTEND_UID).unwrap();
        let c = SpireClient::start(double.socket_path(), fast());
        connected(&c).await;
        until("mode detection", Duration::from_secs(3), || {
            (c.status().mode == SpireMode::Pid).then_some(())
        })
        .await;
        // No pod metadata at all: only the pid can have said who this is.
        let q = WorkloadQuery {
            pid: Some(pod.pid()),
            pid_start_ns: pod.start_ns() + 3_000_000,
            ..Default::default()
        };
        assert_eq!(attested(&c, &q).await.spiffe_id, FRONTEND);
        assert!(
            double.stats().pid_requests >= 1,
            "the workload asked by pid: {:?}",
            double.stats()
        );
        // Cached: a second lookup answers at once.
        assert!(matches!(c.lookup(&q), Lookup::Attested(_)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reused_pid_is_not_trusted() {
        root_or_panic();
        let double = SpireDouble::start(config(VERSION_WITH_PID)).await.unwrap();
        // The pid now belongs to a frontend process; the socket's owner (per
        // the kernel record) started earlier and lived in the backend pod.
        let pod = PodProcess::spawn(FRONTEND_UID).unwrap();
        let c = SpireClient::start(double.socket_path(), fast());
        connected(&c).await;
        let stale = pod.start_ns().saturating_sub(5_000_000_000).max(1);
        let q = WorkloadQuery {
            pid: Some(pod.pid()),
            pid_start_ns: stale,
            pod_uid: Some(BACKEND_UID.into()),
            ..Default::default()
        };
        assert_eq!(
            attested(&c, &q).await.spiffe_id,
            BACKEND,
            "must fall back to the pod UID, not attest the new process"
        );
        // And with nothing else to ask by, no identity rather than the wrong one.
        let q = WorkloadQuery {
            pid: Some(pod.pid()),
            pid_start_ns: stale,
            ..Default::default()
        };
        assert!(matches!(
            c.wait(&q, Duration::from_secs(2)).await,
            Lookup::NoIdentity
        ));
        // A pid whose process is gone: also by selectors.
        let q = WorkloadQuery {
            pid: Some(u32::MAX - 7),
            pid_start_ns: 123,
            ..by_pod(FRONTEND_UID, "99-apps", "frontend")
        };
        assert_eq!(attested(&c, &q).await.spiffe_id, FRONTEND);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotation_and_removed_entries_apply_at_once() {
        let double = SpireDouble::start(config(VERSION_WITHOUT_PID).ttl(2))
            .await
            .unwrap();
        let c = SpireClient::start(double.socket_path(), fast());
        let q = by_pod(FRONTEND_UID, "99-apps", "frontend");
        let first = attested(&c, &q).await;
        let rotated = until(
            "an SVID rotated at half its 2 s TTL",
            Duration::from_secs(5),
            || match c.lookup(&q) {
                Lookup::Attested(id) if id.expires_at > first.expires_at => Some(id),
                _ => None,
            },
        )
        .await;
        assert_eq!(rotated.spiffe_id, FRONTEND);
        double.set_ttl(Duration::from_secs(3600));
        double.rotate_now();
        until(
            "rotate_now to bring a one-hour SVID",
            Duration::from_secs(3),
            || match c.lookup(&q) {
                Lookup::Attested(id)
                    if id.expires_at > SystemTime::now() + Duration::from_secs(1800) =>
                {
                    Some(())
                }
                _ => None,
            },
        )
        .await;
        double.remove_entry(FRONTEND);
        until(
            "the removed entry to become NoIdentity",
            Duration::from_secs(3),
            || matches!(c.lookup(&q), Lookup::NoIdentity).then_some(()),
        )
        .await;
    }

    /// The memo the pipeline asks through answers as the client does: a
    /// rotated SVID, a removed entry and an entry added back reach it at
    /// once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_memo_answers_as_the_client_does() {
        let double = SpireDouble::start(config(VERSION_WITHOUT_PID).ttl(3600))
            .await
            .unwrap();
        let c = SpireClient::start(double.socket_path(), fast());
        let q = by_pod(FRONTEND_UID, "99-apps", "frontend");
        let first = attested(&c, &q).await;
        let mut memo = LookupMemo::default();
        let now = || FlowTime::now();
        let expiry = |r: Lookup| match r {
            Lookup::Attested(id) => Some(id.expires_at),
            _ => None,
        };
        assert_eq!(expiry(memo.lookup(&c, &q, now())), Some(first.expires_at));
        double.set_ttl(Duration::from_secs(7200));
        double.rotate_now();
        let rotated = until("the rotated SVID", Duration::from_secs(3), || {
            expiry(c.lookup(&q)).filter(|e| *e != first.expires_at)
        })
        .await;
        assert_eq!(expiry(memo.lookup(&c, &q, now())), Some(rotated));
        double.remove_entry(FRONTEND);
        until(
            "the removed entry to become NoIdentity",
            Duration::from_secs(3),
            || matches!(c.lookup(&q), Lookup::NoIdentity).then_some(()),
        )
        .await;
        assert!(
            matches!(memo.lookup(&c, &q, now()), Lookup::NoIdentity),
            "the memo kept an answer the client no longer gives"
        );
        // A "no identity" is kept too, until the client's answers change.
        double.add_entry(FRONTEND, &["k8s:ns:99-apps", "k8s:sa:frontend"]);
        until("the entry back", Duration::from_secs(3), || {
            matches!(c.lookup(&q), Lookup::Attested(_)).then_some(())
        })
        .await;
        assert!(matches!(memo.lookup(&c, &q, now()), Lookup::Attested(_)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spire_down_then_up() {
        let connections = Arc::new(Recorder::default());
        let double = SpireDouble::start(config(VERSION_WITHOUT_PID))
            .await
            .unwrap();
        let c = SpireClient::start(
            double.socket_path(),
            SpireOptions {
                observer: Some(connections.clone()),
                ..fast()
            },
        );
        let q = by_pod(FRONTEND_UID, "99-apps", "frontend");
        attested(&c, &q).await;
        double.stop().await;
        until("the client to see SPIRE go", Duration::from_secs(3), || {
            (!c.status().connected).then_some(())
        })
        .await;
        // A workload first seen during the outage: Unavailable at once, with the reason.
        let q2 = WorkloadQuery {
            pod_uid: Some(BACKEND_UID.into()),
            ..Default::default()
        };
        let t = Instant::now();
        match c.wait(&q2, Duration::from_secs(2)).await {
            Lookup::Unavailable(why) => assert!(why.contains("admin.sock"), "{why}"),
            other => panic!("expected Unavailable during the outage, got {other:?}"),
        }
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "an outage must not make callers wait"
        );
        // Known before the outage and still valid: kept.
        assert!(matches!(c.lookup(&q), Lookup::Attested(_)));
        double.restart().await.unwrap();
        connected(&c).await;
        assert_eq!(attested(&c, &q2).await.spiffe_id, BACKEND);
        assert_eq!(attested(&c, &q).await.spiffe_id, FRONTEND);
        assert_eq!(
            *connections.connected.lock().unwrap(),
            vec![true, false, true]
        );
        assert!(connections.lookups.load(Ordering::Relaxed) > 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_absent_at_start() {
        let path = socket();
        let t = Instant::now();
        let c = SpireClient::start(&path, fast());
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "start must not wait for SPIRE"
        );
        let err = until("the first failure", Duration::from_secs(3), || {
            c.status().last_error
        })
        .await;
        assert!(
            err.contains("does not exist") && err.contains("admin_socket_path"),
            "{err}"
        );
        let q = by_pod(FRONTEND_UID, "99-apps", "frontend");
        assert!(matches!(c.lookup(&q), Lookup::Unavailable(_)));
        let mut cfg = config(VERSION_WITHOUT_PID);
        cfg.socket = path;
        let _double = SpireDouble::start(cfg).await.unwrap();
        connected(&c).await;
        assert_eq!(attested(&c, &q).await.spiffe_id, FRONTEND);
        assert_eq!(c.status().last_error, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn permission_denied_says_authorized_delegates() {
        // Registered but not a delegate.
        let mut cfg = config(VERSION_WITH_PID);
        cfg.authorized_delegates.clear();
        let double = SpireDouble::start(cfg).await.unwrap();
        let c = SpireClient::start(double.socket_path(), fast());
        let err = until("PermissionDenied", Duration::from_secs(3), || {
            c.status().last_error
        })
        .await;
        assert!(
            err.contains("PermissionDenied") && err.contains("authorized_delegates"),
            "{err}"
        );
        assert!(!c.status().connected);
        match c
            .wait(
                &by_pod(FRONTEND_UID, "99-apps", "frontend"),
                Duration::from_secs(1),
            )
            .await
        {
            Lookup::Unavailable(why) => assert!(why.contains("authorized_delegates"), "{why}"),
            other => panic!("expected Unavailable naming authorized_delegates, got {other:?}"),
        }
        // Once authorized, it connects by itself.
        double.set_authorized(true);
        connected(&c).await;
        // Not registered at all: SPIRE says so, and so do we.
        let cfg = SpireDoubleConfig::new(socket(), TD);
        let double = SpireDouble::start(cfg).await.unwrap();
        let c = SpireClient::start(double.socket_path(), fast());
        let err = until("PermissionDenied", Duration::from_secs(3), || {
            c.status().last_error
        })
        .await;
        assert!(
            err.contains("no identity issued") && err.contains("spire-server entry create"),
            "{err}"
        );
        assert!(double.stats().denied > 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_spire_is_bounded_by_the_wait_timeout() {
        let double = SpireDouble::start(config(VERSION_WITHOUT_PID))
            .await
            .unwrap();
        let c = SpireClient::start(double.socket_path(), fast());
        connected(&c).await;
        double.set_delay(Duration::from_secs(2));
        let q = by_pod(FRONTEND_UID, "99-apps", "frontend");
        let t = Instant::now();
        let r = c.wait(&q, Duration::from_millis(300)).await;
        let took = t.elapsed();
        assert!(
            matches!(r, Lookup::Pending),
            "expected Pending after the timeout, got {r:?}"
        );
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_millis(600),
            "wait took {took:?}"
        );
        assert!(matches!(c.lookup(&q), Lookup::Pending));
        // The answer lands later, in the cache.
        assert_eq!(attested(&c, &q).await.spiffe_id, FRONTEND);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bounded_cache_cancels_evicted_subscriptions() {
        let double = SpireDouble::start(config(VERSION_WITHOUT_PID))
            .await
            .unwrap();
        let c = SpireClient::start(
            double.socket_path(),
            SpireOptions {
                max_workloads: 2,
                ..fast()
            },
        );
        connected(&c).await;
        for (uid, ns, sa) in [
            (FRONTEND_UID, "99-apps", "frontend"),
            (BACKEND_UID, "99-apps", "backend"),
            (FRONTEND_UID, "99-apps", "x"),
        ] {
            c.wait(&by_pod(uid, ns, sa), Duration::from_secs(3)).await;
        }
        assert_eq!(c.status().cached_workloads, 2);
        until(
            "the evicted stream to close",
            Duration::from_secs(3),
            || (double.stats().active_svid_streams <= 2).then_some(()),
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn key_material_never_shows_in_debug_output() {
        let double = SpireDouble::start(config(VERSION_WITHOUT_PID).ttl(2))
            .await
            .unwrap();
        let c = SpireClient::start(double.socket_path(), fast());
        let q = by_pod(FRONTEND_UID, "99-apps", "frontend");
        let r = c.wait(&q, Duration::from_secs(5)).await;
        let Lookup::Attested(id) = &r else {
            panic!("expected Attested, got {r:?}")
        };
        let keys = double.recent_private_keys();
        assert!(!keys.is_empty(), "the double sent keys");
        let out = format!(
            "{c:?}\n{r:?}\n{id:?}\n{:?}\n{:?}\n{:#?}",
            c.status(),
            fast(),
            c.status()
        );
        for k in &keys {
            let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
            let list = format!("{:?}", &k[..]);
            let tail = format!("{:?}", &k[k.len() - 12..]);
            for needle in [&hex, &list, &tail[1..tail.len() - 1]] {
                assert!(
                    !out.contains(needle),
                    "private key bytes in Debug output:\n{out}"
                );
            }
        }
        assert!(!out.to_ascii_lowercase().contains("private"), "{out}");
        // spire-api's own Debug of a response redacts the key as well.
        let resp = SubscribeToX509sviDsResponse {
            x509_svids: vec![
                spire_api::pb::spire::api::agent::delegatedidentity::v1::X509svidWithKey {
                    x509_svid: None,
                    x509_svid_key: keys[0].clone().into(),
                },
            ],
            federates_with: vec![],
        };
        let dbg = format!("{resp:?}");
        assert!(
            !dbg.contains(&format!("{:?}", &keys[0][keys[0].len() - 12..])[1..30]),
            "{dbg}"
        );
        assert!(matches!(take_answer(resp), State::Unreadable(_)));
    }

    /// SVIDs that cannot be read are not "no identity" (SPIRE sends one
    /// only for a matching entry): the answer says which and why; a
    /// readable SVID beside them is the identity; an empty answer is none.
    #[test]
    fn an_answer_whose_svids_cannot_be_read_says_why() {
        use spire_api::pb::spire::api::agent::delegatedidentity::v1::X509svidWithKey;
        use spire_api::pb::spire::api::types::X509svid;
        let garbage = || X509svidWithKey {
            x509_svid: Some(X509svid {
                cert_chain: vec![Bytes::from_static(b"not DER")],
                expires_at: 4_000_000_000,
                ..Default::default()
            }),
            x509_svid_key: Bytes::from_static(b"not a key"),
        };
        let unreadable = |resp| match take_answer(resp) {
            State::Unreadable(why) => why,
            other => panic!("expected an unreadable answer, got {other:?}"),
        };
        let why = unreadable(answer_for("spiffe://demo.local/ns//sa/frontend"));
        assert_eq!(
            why,
            "SPIRE answered with 1 SVID, none readable: its SPIFFE ID `spiffe://demo.local/ns//sa/frontend` is not valid: has an empty path segment"
        );
        let why = unreadable(answer_for("spiffe://Demo.local/ns/a/sa/b"));
        assert!(why.ends_with("is not valid: `Demo.local` is not a valid trust domain (lower-case letters, digits, `.`, `-`, `_`)"), "{why}");
        let mut two = SubscribeToX509sviDsResponse {
            x509_svids: vec![garbage(), garbage()],
            federates_with: vec![],
        };
        let why = unreadable(two.clone());
        assert!(
            why.starts_with(
                "SPIRE answered with 2 SVIDs, none readable: its leaf certificate does not parse ("
            ) && why.ends_with("), and no ID beside it"),
            "{why}"
        );
        two.x509_svids
            .extend(answer_for("spiffe://demo.local/ns/99-apps/sa/frontend").x509_svids);
        assert_eq!(
            attested_id(take_answer(two)),
            "spiffe://demo.local/ns/99-apps/sa/frontend"
        );
        let empty = SubscribeToX509sviDsResponse::default();
        assert!(matches!(take_answer(empty), State::NoIdentity));
    }

    /// An answer naming `id` through the SVID's id field (no certificate).
    fn answer_for(id: &str) -> SubscribeToX509sviDsResponse {
        use spire_api::pb::spire::api::agent::delegatedidentity::v1::X509svidWithKey;
        use spire_api::pb::spire::api::types::{Spiffeid, X509svid};
        let (td, path) = id
            .strip_prefix("spiffe://")
            .and_then(|r| r.split_once('/'))
            .expect("a SPIFFE ID with a path");
        SubscribeToX509sviDsResponse {
            x509_svids: vec![X509svidWithKey {
                x509_svid: Some(X509svid {
                    id: Some(Spiffeid {
                        trust_domain: td.into(),
                        path: format!("/{path}"),
                    }),
                    expires_at: 4_000_000_000,
                    ..Default::default()
                }),
                x509_svid_key: Bytes::from_static(b"not a key"),
            }],
            federates_with: vec![],
        }
    }

    fn attested_id(state: State) -> ArcStr {
        match state {
            State::Attested(a) => a.spiffe_id.clone(),
            other => panic!("expected an attested answer, got {other:?}"),
        }
    }

    #[test]
    fn answers_naming_one_id_share_one_static_copy() {
        let id = "spiffe://shared.example/ns/99-apps/sa/frontend";
        let first = attested_id(take_answer(answer_for(id)));
        let again = attested_id(take_answer(answer_for(id)));
        assert_eq!(first, id);
        assert!(ArcStr::ptr_eq(&first, &again), "one copy for both answers");
        assert!(
            ArcStr::is_static(&first),
            "copied without a reference count"
        );
        let other = attested_id(take_answer(answer_for(
            "spiffe://shared.example/ns/99-apps/sa/backend",
        )));
        assert_eq!(other, "spiffe://shared.example/ns/99-apps/sa/backend");
        assert!(!ArcStr::ptr_eq(&first, &other));
        // Past the bound, IDs are still right, only counted.
        for i in 0..STATIC_ATTESTED_IDS {
            shared_id(&format!("spiffe://bound.example/ns/n/sa/{i}"));
        }
        let late = shared_id("spiffe://bound.example/ns/n/sa/late");
        assert_eq!(late, "spiffe://bound.example/ns/n/sa/late");
        assert!(
            !ArcStr::is_static(&late),
            "no more than the bound made static"
        );
        assert!(
            ArcStr::ptr_eq(&shared_id(id), &first),
            "kept ones stay shared"
        );
    }

    #[derive(Default)]
    struct Recorder {
        connected: Mutex<Vec<bool>>,
        lookups: AtomicUsize,
    }

    impl SpireObserver for Recorder {
        fn on_lookup(&self, _result: &str) {
            self.lookups.fetch_add(1, Ordering::Relaxed);
        }
        fn on_connected(&self, connected: bool) {
            self.connected.lock().unwrap().push(connected);
        }
    }
}
