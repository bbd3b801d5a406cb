//! The flow hub: the pipeline sink behind the gRPC stream. It keeps the last
//! `--flow-buffer` flows (for `--last` and `--since`) and hands each new flow
//! to a bounded broadcast ring; every following subscriber has its own task
//! that reads the ring, applies its filters and queues what matches in a
//! bounded queue of its own.
//!
//! The pipeline never waits here and runs no filter: publishing is O(1). A
//! subscriber's task waits while its queue is full; one that falls behind
//! by more than the ring holds (256 entries of up to 64 flows: 16 Ki flows
//! of a burst) loses flows (for that subscriber only); the loss is counted
//! (`flowaudit_stream_dropped_total`) and told to the subscriber as a
//! `LostEvents` notice before its next flow (or as soon as it has drained its
//! queue). Kernel losses are told to every subscriber the same way. Filters
//! (the `observe` flags) are compiled here from `FlowFilter` messages and also
//! serve `observe --input-file`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;

use super::filter::FilterSet;
use super::proto;
use super::state::AgentState;
use crate::flow::FlowEvent;
use flowaudit_common::{LOSS_PLACES, LossPlace};

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("too many stream subscribers ({0}); close some `flowaudit observe -f` sessions")]
    TooManySubscribers(usize),
    /// The hub has ended its streams ([`Hub::close`]): the server is stopping.
    #[error("{0}")]
    Closed(Arc<str>),
}

/// What a subscriber's queue carries.
#[derive(Debug, Clone)]
pub enum Item {
    Flow(Arc<FlowEvent>),
    Lost {
        source: LostSource,
        count: u64,
    },
    /// A response made elsewhere and sent as it is, unfiltered, to every
    /// following subscriber (the relay's node status and per-node losses).
    Notice(Arc<proto::GetFlowsResponse>),
}

/// Who counts what the hub does to its subscribers (the agent's and the
/// relay's metrics: `flowaudit_stream_subscribers`,
/// `flowaudit_stream_dropped_total`).
pub trait StreamObserver: Send + Sync {
    fn subscriber_added(&self);
    fn subscriber_removed(&self);
    fn stream_dropped(&self, n: u64);
}

/// Notices a subscriber's full queue keeps for later, at most; beyond
/// that the oldest are counted as dropped flows' kin and forgotten.
const PENDING_NOTICES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostSource {
    /// This subscriber's queue stayed full until its filter task fell
    /// behind the hub's ring (counted before its filter).
    SubscriberQueue,
    /// The kernel side lost something at this place.
    Kernel(LossPlace),
}

impl LostSource {
    /// Kernel places first (they happened before the queue filled), then
    /// the queue: the order notices are told in.
    const ALL: [LostSource; LOSS_PLACES as usize + 1] = {
        let mut all = [LostSource::SubscriberQueue; LOSS_PLACES as usize + 1];
        let mut i = 0;
        while i < LOSS_PLACES as usize {
            all[i] = LostSource::Kernel(LossPlace::ALL[i]);
            i += 1;
        }
        all
    };
}

// ---------------------------------------------------------------- hub

/// How often a filter task waiting on a full queue looks whether the ring
/// has gone round past it (see `FilterTask::offer`).
const LAG_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Flows the ring between the pipeline and the subscribers' filter tasks
/// holds at least: a whole burst the pipeline drains at once (its input
/// channel holds 16 Ki records) fits while the tasks catch up.
const RING_MIN: usize = 16 * 1024;

/// Flows the pipeline sink hands over in one ring entry at most. Waking a
/// waiting filter task costs a futex call (and a thread switch); a burst
/// handed over in entries of this many wakes it once per entry instead of
/// once per flow.
const BATCH_MAX: usize = 64;

/// Flows the pipeline sink gathers before it hands them over (in entries
/// of [`BATCH_MAX`]) within one pass of the pipeline. A wake-up of a
/// waiting filter task is a futex call: per entry it cost the pipeline
/// thread a tenth of its time in the capacity bench. A pass hands over at
/// its end anyway; this bounds what a long pass holds back (16 entries, a
/// sixteenth of the smallest ring).
const HANDOVER: usize = 16 * BATCH_MAX;

/// Ring entries for `flows` flows in full batches, so the memory a lagging
/// filter task can hold up stays that of `flows` flows. In a burst (when a
/// task can fall behind) the entries are full; when flows trickle in one
/// per entry, the tasks have time to keep up.
fn ring_entries(flows: usize) -> usize {
    flows.div_ceil(BATCH_MAX).max(1)
}

/// What the ring carries to every subscriber's filter task.
#[derive(Debug, Clone)]
struct Entry {
    /// Entries sent so far, this one included (how far a task got).
    index: u64,
    /// Flows published so far, this one included: a gap tells a task that
    /// fell behind the ring how many it missed.
    flows: u64,
    what: Payload,
}

#[derive(Debug, Clone)]
enum Payload {
    /// Flows handed over together, in order.
    Flows(Arc<[Arc<FlowEvent>]>),
    /// The kernel side lost something (see [`Shared::kernel`]).
    KernelLoss,
    Notice(Arc<proto::GetFlowsResponse>),
    /// The last entry ([`Hub::close`]): every task ends its subscriber's
    /// stream after what it queued before.
    End,
}

/// What the hub and the subscribers' filter tasks share.
struct Shared {
    metrics: Arc<dyn StreamObserver>,
    /// Flows not delivered to some subscriber, all subscribers together.
    dropped: AtomicU64,
    /// Kernel losses reported to the hub so far, by place; each task tells
    /// its subscriber what grew since it last looked.
    kernel: [AtomicU64; LOSS_PLACES as usize],
}

impl Shared {
    fn dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
        self.metrics.stream_dropped(n);
    }
}

/// Losses not yet told to a subscriber, shared by its filter task (which
/// adds) and its stream (which tells them when its queue runs dry).
#[derive(Debug, Default)]
struct Pending {
    queue: AtomicU64,
    kernel: [AtomicU64; LOSS_PLACES as usize],
    /// The last ring entry the filter task finished with.
    processed: AtomicU64,
    /// Notices the queue had no room for, oldest first.
    notices: Mutex<VecDeque<Arc<proto::GetFlowsResponse>>>,
}

impl Pending {
    fn counter(&self, source: LostSource) -> &AtomicU64 {
        match source {
            LostSource::SubscriberQueue => &self.queue,
            LostSource::Kernel(place) => &self.kernel[place as usize],
        }
    }
}

enum Sent {
    Ok,
    Full,
    Closed,
}

/// One following subscriber's task: it reads every entry of the ring,
/// filters, and queues what matches, so its filter never runs on the
/// pipeline and its reading pace never holds anyone else up.
struct FilterTask {
    ring: broadcast::Receiver<Entry>,
    /// Entries the ring holds (its capacity as tokio rounds it).
    ring_entries: usize,
    filter: FilterSet,
    tx: mpsc::Sender<Item>,
    pending: Arc<Pending>,
    shared: Arc<Shared>,
    /// `Entry::flows` of the last entry seen.
    flows_seen: u64,
    /// `Shared::kernel` when last told.
    kernel_told: [u64; LOSS_PLACES as usize],
}

impl FilterTask {
    async fn run(mut self) {
        loop {
            let entry = match self.ring.recv().await {
                Ok(entry) => entry,
                // Fell behind the ring: the next entry's numbers say how many
                // flows were missed.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let carried = match &entry.what {
                Payload::Flows(flows) => flows.len() as u64,
                Payload::KernelLoss | Payload::Notice(_) | Payload::End => 0,
            };
            let missed = entry.flows - self.flows_seen - carried;
            self.flows_seen = entry.flows;
            if missed > 0 {
                // Told like a full queue: this subscriber fell behind. Counted
                // before its filter (the flows are gone, matching or not).
                self.pending.queue.fetch_add(missed, Ordering::Relaxed);
                self.shared.dropped(missed);
            }
            let sent = match &entry.what {
                Payload::Flows(flows) => {
                    let mut sent = Sent::Ok;
                    for flow in flows.iter() {
                        sent = self.offer(flow).await;
                        if matches!(sent, Sent::Closed) {
                            break;
                        }
                    }
                    sent
                }
                Payload::KernelLoss => self.tell_kernel_losses(),
                Payload::Notice(n) => self.notice(n),
                // Dropping the sender ends the stream once its queue, and
                // then the losses and notices kept for it, are told.
                Payload::End => Sent::Closed,
            };
            self.pending.processed.store(entry.index, Ordering::Release);
            if let Sent::Closed = sent {
                return;
            }
        }
    }

    /// Filters one flow and queues it if it matches. A full queue is waited
    /// on: meanwhile this task reads no more of the ring, which the
    /// pipeline keeps filling, so the subscriber falls behind by up to the
    /// ring's flows before it loses any (counted when the ring overtakes
    /// it, see `run`). The memory that costs is the ring's, which is there
    /// anyway; the queue stays as small as it is. (Before 2026-12-04 a full
    /// queue lost the flow at once: a burst of 12,000 flows lost 1,202 to
    /// 2,770 of them to one `observe -f -o json`, in 3 runs of 5.)
    ///
    /// Once the ring has gone round past this task, what it would read next
    /// is gone already: it stops waiting, and this flow (and the rest of its
    /// entry, while the queue is full) is lost and counted at once, so that
    /// `flowaudit_stream_dropped_total` rises while a subscriber is stalled,
    /// not only when it reads again. Looked at each [`LAG_CHECK`] of waiting.
    async fn offer(&self, flow: &Arc<FlowEvent>) -> Sent {
        if !self.filter.matches(flow) {
            return Sent::Ok;
        }
        loop {
            match self.deliver(flow) {
                // Only this task sends: a slot freed now is still free
                // when `deliver` tries again (kept notices and losses go
                // first, then the flow).
                Sent::Full => {
                    if self.ring.len() > self.ring_entries {
                        self.pending.queue.fetch_add(1, Ordering::Relaxed);
                        self.shared.dropped(1);
                        return Sent::Ok;
                    }
                    tokio::select! {
                        room = self.tx.reserve() => {
                            if room.is_err() {
                                return Sent::Closed;
                            }
                        }
                        () = tokio::time::sleep(LAG_CHECK) => {}
                    }
                }
                sent => return sent,
            }
        }
    }

    fn try_send(&self, item: Item) -> Sent {
        match self.tx.try_send(item) {
            Ok(()) => Sent::Ok,
            Err(mpsc::error::TrySendError::Full(_)) => Sent::Full,
            Err(mpsc::error::TrySendError::Closed(_)) => Sent::Closed,
        }
    }

    /// Queues a notice behind those still kept, or keeps it for the
    /// stream to tell when the queue drains (notices are rare: node status
    /// changes, per-node losses).
    fn notice(&self, n: &Arc<proto::GetFlowsResponse>) -> Sent {
        {
            let mut kept = self
                .pending
                .notices
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if kept.len() >= PENDING_NOTICES {
                kept.pop_front();
                self.shared.dropped(1);
            }
            kept.push_back(n.clone());
        }
        self.flush_notices()
    }

    /// Queues kept notices in order; `Full` when some are still kept.
    fn flush_notices(&self) -> Sent {
        let mut kept = self
            .pending
            .notices
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while let Some(first) = kept.front() {
            match self.try_send(Item::Notice(first.clone())) {
                Sent::Ok => {
                    kept.pop_front();
                }
                other => return other,
            }
        }
        Sent::Ok
    }

    /// Tells earlier losses first (so they arrive in order), then sends.
    fn deliver(&self, flow: &Arc<FlowEvent>) -> Sent {
        match self.flush_notices() {
            Sent::Ok => {}
            other => return other,
        }
        for source in LostSource::ALL {
            let counter = self.pending.counter(source);
            if counter.load(Ordering::Relaxed) > 0 {
                let count = counter.swap(0, Ordering::Relaxed);
                if count > 0 {
                    match self.try_send(Item::Lost { source, count }) {
                        Sent::Ok => {}
                        other => {
                            counter.fetch_add(count, Ordering::Relaxed);
                            return other;
                        }
                    }
                }
            }
        }
        self.try_send(Item::Flow(flow.clone()))
    }

    /// Queues a notice per place whose kernel losses grew; a full queue
    /// keeps them pending for the stream to tell when it drains.
    fn tell_kernel_losses(&mut self) -> Sent {
        for place in LossPlace::ALL {
            let now = self.shared.kernel[place as usize].load(Ordering::Relaxed);
            let count = now - self.kernel_told[place as usize];
            if count == 0 {
                continue;
            }
            self.kernel_told[place as usize] = now;
            let source = LostSource::Kernel(place);
            match self.try_send(Item::Lost { source, count }) {
                Sent::Ok => {}
                Sent::Full => {
                    self.pending
                        .counter(source)
                        .fetch_add(count, Ordering::Relaxed);
                }
                Sent::Closed => return Sent::Closed,
            }
        }
        Sent::Ok
    }
}

/// The history and the counts the ring's entries are numbered by: what the
/// pipeline and a new subscriber must see in one consistent state.
struct Inner {
    history: VecDeque<Arc<FlowEvent>>,
    subscribers: usize,
    entries: u64,
    flows: u64,
    /// Why the streams ended ([`Hub::close`]); none while serving.
    closed: Option<Arc<str>>,
}

/// Shared between the pipeline sink ([`HubSink`]) and the gRPC service.
/// Publishing is O(1) whatever the subscribers do: the flow joins the
/// history and the ring under a short lock; filters run on each
/// subscriber's own task.
pub struct Hub {
    inner: Mutex<Inner>,
    ring: broadcast::Sender<Entry>,
    /// What the ring holds: `broadcast::channel` rounds up to a power of two.
    ring_entries: usize,
    shared: Arc<Shared>,
    capacity: usize,
    queue: usize,
    max_subscribers: usize,
}

/// What a subscriber asks for (from `GetFlowsRequest`).
pub struct Subscribe {
    pub number: u64,
    pub follow: bool,
    /// Only buffered flows at or after this time.
    pub since: Option<crate::flow::FlowTime>,
    pub filter: FilterSet,
}

impl Hub {
    /// `capacity`: flows kept for `--last`/`--since`; `queue`: flows queued
    /// per subscriber (after its filter) before it loses them.
    pub fn new(
        capacity: usize,
        queue: usize,
        max_subscribers: usize,
        metrics: Arc<dyn StreamObserver>,
    ) -> Self {
        Self::with_ring(
            capacity,
            queue,
            ring_entries(queue.max(RING_MIN)),
            max_subscribers,
            metrics,
        )
    }

    /// `ring`: entries a filter task may fall behind the pipeline before it
    /// loses flows (an entry carries up to [`BATCH_MAX`] flows).
    fn with_ring(
        capacity: usize,
        queue: usize,
        ring: usize,
        max_subscribers: usize,
        metrics: Arc<dyn StreamObserver>,
    ) -> Self {
        Self {
            inner: Mutex::new(Inner {
                history: VecDeque::with_capacity(capacity.min(1 << 16)),
                subscribers: 0,
                entries: 0,
                flows: 0,
                closed: None,
            }),
            ring: broadcast::channel(ring.max(1)).0,
            ring_entries: ring.max(1).next_power_of_two(),
            shared: Arc::new(Shared {
                metrics,
                dropped: AtomicU64::new(0),
                kernel: Default::default(),
            }),
            capacity,
            queue: queue.max(1),
            max_subscribers,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (pushes and
        // counts only), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn buffered(&self) -> usize {
        self.lock().history.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn subscribers(&self) -> usize {
        self.lock().subscribers
    }

    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Buffered flows that match, then (with `follow`) a live subscription,
    /// whose filter task is spawned on the current Tokio runtime. The
    /// history is copied and the ring joined under one lock, so no flow is
    /// missed or repeated between the two; the copy is filtered after the
    /// lock is released, so the pipeline never waits for a replay.
    pub fn subscribe(self: &Arc<Self>, req: Subscribe) -> Result<FlowStream, HubError> {
        let replay_all = req.number == 0 && req.since.is_none() && !req.follow;
        let limit = if req.number > 0 {
            usize::try_from(req.number).unwrap_or(usize::MAX)
        } else {
            usize::MAX
        };
        let mut inner = self.lock();
        if req.follow {
            if let Some(why) = &inner.closed {
                return Err(HubError::Closed(why.clone()));
            }
            if inner.subscribers >= self.max_subscribers {
                return Err(HubError::TooManySubscribers(self.max_subscribers));
            }
        }
        // Newest first, so `number` keeps the last N.
        let mut candidates = Vec::new();
        if replay_all || req.number > 0 || req.since.is_some() {
            let enough = if req.filter.matches_all() {
                limit
            } else {
                usize::MAX
            };
            for f in inner.history.iter().rev() {
                if candidates.len() >= enough {
                    break;
                }
                if req.since.is_some_and(|since| f.time < since) {
                    break;
                }
                candidates.push(f.clone());
            }
        }
        let joined = req.follow.then(|| {
            inner.subscribers += 1;
            let kernel_told: [u64; LOSS_PLACES as usize] =
                std::array::from_fn(|i| self.shared.kernel[i].load(Ordering::Relaxed));
            (
                self.ring.subscribe(),
                inner.entries,
                inner.flows,
                kernel_told,
            )
        });
        drop(inner);
        let mut replay = VecDeque::new();
        for f in candidates {
            if replay.len() >= limit {
                break;
            }
            if req.filter.matches(&f) {
                replay.push_front(f);
            }
        }
        let live = joined.map(|(ring, entries, flows_seen, kernel_told)| {
            self.shared.metrics.subscriber_added();
            let (tx, rx) = mpsc::channel(self.queue);
            let pending = Arc::new(Pending::default());
            pending.processed.store(entries, Ordering::Relaxed);
            let task = tokio::spawn(
                FilterTask {
                    ring,
                    ring_entries: self.ring_entries,
                    filter: req.filter,
                    tx,
                    pending: pending.clone(),
                    shared: self.shared.clone(),
                    flows_seen,
                    kernel_told,
                }
                .run(),
            );
            Live {
                rx,
                pending,
                task: task.abort_handle(),
                hub: self.clone(),
            }
        });
        Ok(FlowStream { replay, live })
    }

    fn unsubscribe(&self) {
        self.lock().subscribers -= 1;
        self.shared.metrics.subscriber_removed();
    }

    /// Buffers a flow and hands it to the subscribers' filter tasks: O(1),
    /// no filter runs here. One flow per ring entry (tests); the pipeline
    /// and the relay use [`Hub::publish_all`], whose entries carry up to
    /// [`BATCH_MAX`] flows (the ring is sized for those).
    pub fn publish(&self, flow: &Arc<FlowEvent>) {
        self.publish_all(&mut vec![flow.clone()]);
    }

    /// Buffers flows and hands them to the subscribers' filter tasks in
    /// entries of up to [`BATCH_MAX`], in order; empties `flows`.
    pub fn publish_all(&self, flows: &mut Vec<Arc<FlowEvent>>) {
        if flows.is_empty() {
            return;
        }
        let mut inner = self.lock();
        // Subscribers join under this lock: none now, none before it is
        // released. Without one, the entries are only counted (their
        // numbers stay those a subscriber would see), and the flows move
        // into the history instead of being shared with a batch nobody reads.
        let followed = self.ring.receiver_count() > 0;
        let (total, chunks) = (flows.len(), flows.len().div_ceil(BATCH_MAX));
        if self.capacity > 0 {
            let keep = total.min(self.capacity);
            let room = self.capacity - inner.history.len().min(self.capacity);
            let evict = keep.saturating_sub(room).min(inner.history.len());
            inner.history.drain(..evict);
            if followed {
                inner.history.extend(flows[total - keep..].iter().cloned());
            } else {
                inner.history.extend(flows.drain(total - keep..));
            }
            // The flows the next publish evicts were written thousands of
            // flows ago, and the cache no longer holds them: have them
            // fetched now, while the pipeline builds the next flows, so
            // that dropping them then does not wait for memory.
            if inner.history.len() >= self.capacity {
                for f in inner.history.iter().take(keep) {
                    prefetch(f);
                }
            }
        }
        if followed {
            for batch in flows.chunks(BATCH_MAX) {
                inner.flows += batch.len() as u64;
                self.send(&mut inner, Payload::Flows(batch.into()));
            }
        } else {
            inner.flows += total as u64;
            inner.entries += chunks as u64;
        }
        drop(inner);
        flows.clear();
    }

    /// Sends a notice to every following subscriber, unfiltered (it is
    /// not kept in the history).
    pub fn notice(&self, notice: proto::GetFlowsResponse) {
        let mut inner = self.lock();
        self.send(&mut inner, Payload::Notice(Arc::new(notice)));
    }

    /// Tells every subscriber that the kernel side lost `count` at `place`.
    pub fn kernel_lost(&self, place: LossPlace, count: u64) {
        let mut inner = self.lock();
        self.shared.kernel[place as usize].fetch_add(count, Ordering::Relaxed);
        self.send(&mut inner, Payload::KernelLoss);
    }

    /// Ends every following stream, `why` being what its subscriber is
    /// told: each gets what was published before (as far as its queue
    /// holds), then the losses and notices still owed, then its end. New
    /// follow subscriptions are refused with `why`; publishing goes on
    /// into the history only. Closing twice keeps the first reason.
    pub fn close(&self, why: &str) {
        let mut inner = self.lock();
        if inner.closed.is_some() {
            return;
        }
        inner.closed = Some(why.into());
        self.send(&mut inner, Payload::End);
    }

    /// Why the streams ended, once [`Hub::close`] was called.
    pub fn closed(&self) -> Option<Arc<str>> {
        self.lock().closed.clone()
    }

    fn send(&self, inner: &mut Inner, what: Payload) {
        inner.entries += 1;
        // An error only says nobody follows.
        let _ = self.ring.send(Entry {
            index: inner.entries,
            flows: inner.flows,
            what,
        });
    }

    #[cfg(test)]
    fn entries(&self) -> u64 {
        self.lock().entries
    }
}

/// Asks the CPU to fetch a flow's memory into the cache (a hint: nothing
/// waits for it, and on other architectures it does nothing).
fn prefetch(flow: &Arc<FlowEvent>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let p = Arc::as_ptr(flow).cast::<i8>();
        for line in (0..size_of::<FlowEvent>()).step_by(64) {
            // SAFETY: a prefetch is a hint that never faults, whatever the
            // address (`wrapping_add`: it is never dereferenced here), and
            // SSE is part of every x86_64 CPU.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = flow;
}

struct Live {
    rx: mpsc::Receiver<Item>,
    pending: Arc<Pending>,
    task: tokio::task::AbortHandle,
    hub: Arc<Hub>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.task.abort();
        self.hub.unsubscribe();
    }
}

/// A subscriber's flows: the replayed buffer, then live flows. Dropping it
/// (the client went away) unsubscribes.
pub struct FlowStream {
    replay: VecDeque<Arc<FlowEvent>>,
    live: Option<Live>,
}

impl FlowStream {
    /// Waits until this subscriber's filter task has taken every entry
    /// published so far (tests: the hand-over is asynchronous).
    #[cfg(test)]
    async fn caught_up(&self) {
        let Some(live) = &self.live else { return };
        while live.pending.processed.load(Ordering::Acquire) < live.hub.entries() {
            tokio::task::yield_now().await;
        }
    }
}

impl Stream for FlowStream {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        if let Some(f) = self.replay.pop_front() {
            return Poll::Ready(Some(Item::Flow(f)));
        }
        let Some(live) = self.live.as_mut() else {
            return Poll::Ready(None);
        };
        match live.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(item)),
            // The filter task ended (the hub closed): what it owed the
            // subscriber, then the end.
            Poll::Ready(None) => Poll::Ready(live.owed()),
            // Queue drained: notices and losses the filter task could not
            // queue.
            Poll::Pending => live
                .owed()
                .map_or(Poll::Pending, |item| Poll::Ready(Some(item))),
        }
    }
}

impl Live {
    /// A notice or loss count kept for when the queue drains, if any.
    fn owed(&self) -> Option<Item> {
        let notice = self
            .pending
            .notices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        if let Some(n) = notice {
            return Some(Item::Notice(n));
        }
        LostSource::ALL.into_iter().find_map(|source| {
            let count = self.pending.counter(source).swap(0, Ordering::Relaxed);
            (count > 0).then_some(Item::Lost { source, count })
        })
    }
}

/// The hub as a pipeline sink. Also watches the kernel's loss counters,
/// so subscribers learn of every loss, place by place.
pub struct HubSink {
    hub: Arc<Hub>,
    state: Arc<AgentState>,
    kernel_lost: [u64; LOSS_PLACES as usize],
    /// Flows of this burst, handed over at `flush` (or once
    /// [`HANDOVER`] are waiting), so a burst wakes each filter task once
    /// per handover rather than once per ring entry.
    batch: Vec<Arc<FlowEvent>>,
}

impl HubSink {
    pub fn new(hub: Arc<Hub>, state: Arc<AgentState>) -> Self {
        let kernel_lost = state.capture.lost_by_place();
        Self {
            hub,
            state,
            kernel_lost,
            batch: Vec::with_capacity(HANDOVER),
        }
    }
}

impl crate::pipeline::Sink for HubSink {
    fn on_flow(&mut self, flow: &Arc<FlowEvent>) {
        self.batch.push(flow.clone());
        if self.batch.len() >= HANDOVER {
            self.hub.publish_all(&mut self.batch);
        }
    }

    fn flush(&mut self) {
        self.hub.publish_all(&mut self.batch);
        let lost = self.state.capture.lost_by_place();
        for place in LossPlace::ALL {
            let (now, told) = (lost[place as usize], &mut self.kernel_lost[place as usize]);
            if now > *told {
                self.hub.kernel_lost(place, now - *told);
                *told = now;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::capture::CaptureStats;
    use crate::capture::Clock;
    use crate::capture::record::{KernelEvent, tests::sample};
    use crate::export::filter::tests::Stall;
    use tokio_stream::StreamExt;

    pub(crate) fn sample_flow() -> FlowEvent {
        let mut f = FlowEvent::from_kernel(
            &KernelEvent::from_record(&sample()).unwrap(),
            &"n1".into(),
            &Clock::now(),
        );
        f.time = "2026-11-28T12:00:01.123456789Z".into();
        f
    }

    fn hub(capacity: usize, queue: usize) -> Arc<Hub> {
        let metrics = Arc::new(crate::export::metrics::Metrics::new(
            "0",
            Arc::new(CaptureStats::default()),
        ));
        Arc::new(Hub::new(capacity, queue, 1000, metrics))
    }

    /// A hub whose ring holds `ring` entries (tokio rounds it up to a
    /// power of two): small, so that a test can fall behind it.
    fn hub_with_ring(capacity: usize, queue: usize, ring: usize) -> Arc<Hub> {
        let metrics = Arc::new(crate::export::metrics::Metrics::new(
            "0",
            Arc::new(CaptureStats::default()),
        ));
        Arc::new(Hub::with_ring(capacity, queue, ring, 1000, metrics))
    }

    /// Every buffered flow, no live ones.
    fn history_only() -> Subscribe {
        Subscribe {
            number: 0,
            follow: false,
            since: None,
            filter: FilterSet::default(),
        }
    }

    /// Every live flow, from now on.
    fn follow_all() -> Subscribe {
        Subscribe {
            number: 0,
            follow: true,
            since: None,
            filter: FilterSet::default(),
        }
    }

    /// A stalled subscriber and a reading one on `h` (the tests give it a
    /// ring of 4 entries and queues of 4 flows); flows 0..20 published one
    /// at a time, each read by the reading one (so every filter task has
    /// run after each). Returns the stalled one.
    async fn stalled_behind_20_flows(h: &Arc<Hub>) -> FlowStream {
        let stalled = h.subscribe(follow_all()).unwrap();
        let mut reading = h.subscribe(follow_all()).unwrap();
        let mut read = Vec::new();
        for i in 0..20 {
            h.publish(&numbered(i));
            read.push(reading.next().await.unwrap());
        }
        assert_eq!(cookies(&read), (0..20).collect::<Vec<_>>());
        stalled
    }

    fn numbered(i: u64) -> Arc<FlowEvent> {
        let mut f = sample_flow();
        f.socket.cookie = i;
        f.time = crate::flow::FlowTime::new(1_795_867_200 + (i % 60) as i64, 0);
        Arc::new(f)
    }

    fn cookies(items: &[Item]) -> Vec<u64> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Flow(f) => Some(f.socket.cookie),
                Item::Lost { .. } | Item::Notice(_) => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn replays_the_last_n_then_follows_without_gap() {
        let h = hub(5, 100);
        for i in 0..8 {
            h.publish(&numbered(i));
        }
        let all = |h: &Arc<Hub>, number, since: Option<&str>| {
            let s = h
                .subscribe(Subscribe {
                    number,
                    follow: false,
                    since: since.map(Into::into),
                    filter: FilterSet::default(),
                })
                .unwrap();
            futures_collect(s)
        };
        assert_eq!(cookies(&all(&h, 0, None).await), vec![3, 4, 5, 6, 7]);
        assert_eq!(cookies(&all(&h, 2, None).await), vec![6, 7]);
        assert_eq!(
            cookies(&all(&h, 0, Some("2026-11-28T12:00:05.000000000Z")).await),
            vec![5, 6, 7]
        );
        let mut s = h
            .subscribe(Subscribe {
                number: 1,
                follow: true,
                since: None,
                filter: FilterSet::default(),
            })
            .unwrap();
        assert_eq!(h.subscribers(), 1);
        h.publish(&numbered(8));
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(s.next().await.unwrap());
        }
        assert_eq!(cookies(&got), vec![7, 8]);
        drop(s);
        assert_eq!(h.subscribers(), 0);
    }

    /// The pipeline sink hands a burst over in batches: subscribers get
    /// every flow in order, the history keeps the newest, and a filter
    /// task that falls behind the ring is told exactly how many flows it
    /// missed, batches or not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[expect(
        clippy::await_holding_lock,
        reason = "the guard is the stall: it blocks the stuck filter on a worker, never this task"
    )]
    async fn batches_keep_order_history_and_loss_counts() {
        let follow = |filter| Subscribe {
            number: 0,
            follow: true,
            since: None,
            filter,
        };
        let h = hub(5, 1000);
        let mut s = h.subscribe(follow(FilterSet::default())).unwrap();
        let mut burst: Vec<_> = (0..40).map(numbered).collect();
        h.publish_all(&mut burst);
        assert!(burst.is_empty(), "handed over");
        let mut got = Vec::new();
        for _ in 0..40 {
            got.push(s.next().await.unwrap());
        }
        assert_eq!(cookies(&got), (0..40).collect::<Vec<_>>());
        let mut more: Vec<_> = (40..43).map(numbered).collect();
        h.publish_all(&mut more);
        let last = h.subscribe(history_only()).unwrap();
        assert_eq!(
            cookies(&futures_collect(last).await),
            vec![38, 39, 40, 41, 42],
            "the history keeps the newest 5 across batches"
        );

        // A filter task stuck on flow 0 while 5 batches and 4 flows more
        // come, in 6 entries, and the ring holds the last 2.
        let b = BATCH_MAX as u64;
        let n = 5 * b + 4;
        let metrics = Arc::new(crate::export::metrics::Metrics::new(
            "0",
            Arc::new(CaptureStats::default()),
        ));
        let h = Arc::new(Hub::with_ring(10, 1000, 2, 1000, metrics));
        let stall = Arc::new(Stall::default());
        let held = stall.gate.lock().unwrap();
        let mut stuck = h
            .subscribe(follow(FilterSet::stalled(stall.clone())))
            .unwrap();
        h.publish_all(&mut vec![numbered(0)]);
        while stall.entered.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        h.publish_all(&mut (1..=n).map(numbered).collect());
        drop(held);
        let wait = std::time::Duration::from_secs(60);
        let mut items = Vec::new();
        while cookies(&items).last() != Some(&n) {
            let item = tokio::time::timeout(wait, stuck.next())
                .await
                .unwrap_or_else(|_| panic!("nothing more after {items:?}"))
                .expect("follows");
            items.push(item);
        }
        assert!(matches!(&items[0], Item::Flow(f) if f.socket.cookie == 0));
        assert!(
            matches!(
                &items[1],
                Item::Lost {
                    source: LostSource::SubscriberQueue,
                    count
                } if *count == 4 * b
            ),
            "flows 1 to {} fell out of the ring: {:?}",
            4 * b,
            items[1]
        );
        assert_eq!(cookies(&items[2..]), (4 * b + 1..=n).collect::<Vec<_>>());
        assert_eq!(h.dropped(), 4 * b);
    }

    /// Nobody follows: a burst moves into the history (the newest kept),
    /// and the entries are numbered as for a followed hub, so a follower
    /// that joins next gets the next flows, with no loss told.
    #[tokio::test]
    async fn an_unfollowed_burst_is_kept_and_numbered_as_a_followed_one() {
        let (alone, watched) = (hub(5, 1000), hub(5, 1000));
        let watcher = watched.subscribe(follow_all()).unwrap();
        let n = 2 * BATCH_MAX as u64 + 3;
        for h in [&alone, &watched] {
            let mut burst: Vec<_> = (0..n).map(numbered).collect();
            h.publish_all(&mut burst);
            assert!(burst.is_empty(), "handed over");
        }
        assert_eq!(alone.entries(), watched.entries());
        assert_eq!(alone.entries(), 3, "three batches");
        assert_eq!(alone.lock().flows, n);
        drop(watcher);
        let last = alone.subscribe(history_only()).unwrap();
        assert_eq!(
            cookies(&futures_collect(last).await),
            (n - 5..n).collect::<Vec<_>>(),
            "the history keeps the newest 5"
        );
        let mut s = alone.subscribe(follow_all()).unwrap();
        let mut more: Vec<_> = (n..n + 3).map(numbered).collect();
        alone.publish_all(&mut more);
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(s.next().await.unwrap());
        }
        assert!(
            got.iter().all(|i| matches!(i, Item::Flow(_))),
            "no loss told: {got:?}"
        );
        assert_eq!(cookies(&got), (n..n + 3).collect::<Vec<_>>());
    }

    async fn futures_collect(mut s: FlowStream) -> Vec<Item> {
        let mut v = Vec::new();
        while let Some(i) = s.next().await {
            v.push(i);
        }
        v
    }

    /// A server stopping: each follower gets what was published before,
    /// then what it is owed (here a loss: the slow one fell behind the
    /// ring), then the end; later followers are refused with the reason,
    /// while the history still answers.
    #[tokio::test(start_paused = true)]
    async fn closing_ends_each_stream_after_its_flows_and_losses() {
        let h = hub_with_ring(10, 4, 4);
        let follow = |follow| Subscribe {
            number: if follow { 0 } else { 3 },
            follow,
            since: None,
            filter: FilterSet::default(),
        };
        let slow = h.subscribe(follow(true)).unwrap();
        let mut reading = h.subscribe(follow(true)).unwrap();
        for i in 0..8 {
            h.publish(&numbered(i));
            let got = reading.next().await.unwrap();
            assert_eq!(cookies(&[got]), vec![i]);
        }
        // Published, not yet read, when the server stops.
        h.publish(&numbered(8));
        h.publish(&numbered(9));
        assert_eq!(h.closed(), None);
        h.close("the server is stopping (SIGTERM)");
        h.close("a second close keeps the first reason");
        let ended = |stream| async move {
            tokio::time::timeout(std::time::Duration::from_secs(10), futures_collect(stream))
                .await
                .expect("the stream ends once the hub closed")
        };
        // Its queue (4) took 0 to 3 and its task waited with 4; the ring
        // (4 entries) then kept 7, 8, 9 and the end: 5 and 6 are owed as
        // a loss.
        let slow = ended(slow).await;
        assert_eq!(cookies(&slow), vec![0, 1, 2, 3, 4, 7, 8, 9], "{slow:?}");
        assert!(
            matches!(
                slow[5],
                Item::Lost {
                    source: LostSource::SubscriberQueue,
                    count: 2
                }
            ),
            "the loss is told in its place: {slow:?}"
        );
        assert_eq!(slow.len(), 9, "{slow:?}");
        let rest = ended(reading).await;
        assert_eq!(cookies(&rest), vec![8, 9]);
        assert!(rest.iter().all(|i| matches!(i, Item::Flow(_))), "{rest:?}");
        assert_eq!(h.subscribers(), 0);
        assert_eq!(
            h.closed().as_deref(),
            Some("the server is stopping (SIGTERM)")
        );
        match h.subscribe(follow(true)) {
            Err(HubError::Closed(why)) => assert_eq!(&*why, "the server is stopping (SIGTERM)"),
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("a follow subscription after the close"),
        }
        let last = futures_collect(h.subscribe(follow(false)).unwrap()).await;
        assert_eq!(cookies(&last), vec![7, 8, 9]);
    }

    /// A subscriber that does not read holds its filter task at a full
    /// queue; the ring goes on (the pipeline never waits) and the task
    /// loses only what the ring overtook, told in order, for that
    /// subscriber only.
    #[tokio::test(start_paused = true)]
    async fn a_full_queue_waits_and_loses_only_what_the_ring_overtook_for_that_subscriber() {
        let h = hub_with_ring(10, 4, 4);
        let mut slow = stalled_behind_20_flows(&h).await;
        // The slow task queued 0..=3 and waits with 4; nothing lost yet.
        assert_eq!(h.dropped(), 0);
        let mut slow_got = Vec::new();
        for _ in 0..10 {
            slow_got.push(slow.next().await.unwrap());
        }
        // The ring (4 entries) kept 16..=19: 5..=15 were overtaken.
        assert_eq!(cookies(&slow_got), vec![0, 1, 2, 3, 4, 16, 17, 18, 19]);
        assert!(
            matches!(
                slow_got[5],
                Item::Lost {
                    source: LostSource::SubscriberQueue,
                    count: 11
                }
            ),
            "{:?}",
            slow_got[5]
        );
        assert_eq!(h.dropped(), 11);
        // After the notice, flows flow again.
        h.publish(&numbered(20));
        assert!(matches!(slow.next().await, Some(Item::Flow(f)) if f.socket.cookie == 20));
        h.kernel_lost(LossPlace::RingFullClose, 3);
        assert!(matches!(
            slow.next().await,
            Some(Item::Lost {
                source: LostSource::Kernel(LossPlace::RingFullClose),
                count: 3
            })
        ));
    }

    /// A subscriber that stays stalled: its losses are counted once the
    /// ring has gone round past its waiting task, not only when it reads
    /// again; what it reads later says the same.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_subscribers_losses_count_while_it_stalls() {
        let h = hub_with_ring(10, 4, 4);
        let mut stalled = stalled_behind_20_flows(&h).await;
        assert_eq!(h.dropped(), 0, "nothing overtaken is counted before a look");
        // Paused time: this runs the waiting task's next look at once.
        tokio::time::sleep(LAG_CHECK * 2).await;
        // 4 (the flow it waited with) and 5..=15 (gone from the ring).
        assert_eq!(h.dropped(), 12);
        let mut got = Vec::new();
        for _ in 0..9 {
            got.push(stalled.next().await.unwrap());
        }
        assert_eq!(cookies(&got), vec![0, 1, 2, 3, 16, 17, 18, 19]);
        assert!(
            matches!(
                got[4],
                Item::Lost {
                    source: LostSource::SubscriberQueue,
                    count: 12
                }
            ),
            "{got:?}"
        );
    }

    /// The queue alone no longer loses flows: a burst ten times the queue
    /// reaches a subscriber that reads late, in order, as long as the ring
    /// holds it.
    #[tokio::test]
    async fn a_burst_larger_than_the_queue_reaches_a_late_reader_whole() {
        let h = hub(10, 4);
        let mut s = h.subscribe(follow_all()).unwrap();
        for i in 0..40 {
            h.publish(&numbered(i));
        }
        let mut got = Vec::new();
        for _ in 0..40 {
            let next = tokio::time::timeout(std::time::Duration::from_secs(10), s.next());
            match next.await {
                Ok(Some(item)) => got.push(item),
                _ => panic!("the stream stalled or ended after {got:?}"),
            }
        }
        assert_eq!(cookies(&got), (0..40).collect::<Vec<_>>(), "{got:?}");
        assert_eq!(h.dropped(), 0);
    }

    #[tokio::test]
    async fn kernel_losses_are_told_place_by_place_even_when_the_queue_is_full() {
        let h = hub(10, 1);
        let mut s = h
            .subscribe(Subscribe {
                number: 0,
                follow: true,
                since: None,
                filter: FilterSet::default(),
            })
            .unwrap();
        h.publish(&numbered(1)); // fills the queue
        h.kernel_lost(LossPlace::PayloadMapFull, 2);
        h.kernel_lost(LossPlace::CloseUntracked, 1);
        h.kernel_lost(LossPlace::PayloadMapFull, 5);
        s.caught_up().await;
        assert!(matches!(s.next().await, Some(Item::Flow(f)) if f.socket.cookie == 1));
        // Queue drained: the pending losses come, summed per place.
        let mut told = Vec::new();
        for _ in 0..2 {
            match s.next().await {
                Some(Item::Lost { source, count }) => told.push((source, count)),
                other => panic!("expected a loss notice, got {other:?}"),
            }
        }
        told.sort_by_key(|(s, _)| format!("{s:?}"));
        assert_eq!(
            told,
            vec![
                (LostSource::Kernel(LossPlace::CloseUntracked), 1),
                (LostSource::Kernel(LossPlace::PayloadMapFull), 7),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn notices_reach_every_follower_unfiltered_in_order_even_past_a_full_queue() {
        let h = hub(10, 1);
        let follow = |filter| {
            h.subscribe(Subscribe {
                number: 0,
                follow: true,
                since: None,
                filter,
            })
            .unwrap()
        };
        let mut s = follow(FilterSet::default());
        // This follower's filter matches no flow: notices still come.
        let nowhere = proto::FlowFilter {
            namespace: vec!["nowhere".into()],
            ..Default::default()
        };
        let mut other = follow(FilterSet::compile(&[nowhere], &[]).unwrap());
        let notice = |n: &str| proto::GetFlowsResponse {
            node_name: n.into(),
            response: None,
        };
        h.publish(&numbered(1)); // fills the queue
        h.notice(notice("a"));
        h.notice(notice("b"));
        h.publish(&numbered(2)); // waits: the queue is full, notices go first
        assert!(matches!(s.next().await, Some(Item::Flow(f)) if f.socket.cookie == 1));
        let mut names = Vec::new();
        for _ in 0..2 {
            match s.next().await {
                Some(Item::Notice(n)) => names.push(n.node_name.clone()),
                other => panic!("expected a notice, got {other:?}"),
            }
        }
        assert_eq!(names, ["a", "b"], "kept notices come in order");
        other.caught_up().await;
        for want in ["a", "b"] {
            match other.next().await {
                Some(Item::Notice(n)) => assert_eq!(n.node_name, want),
                got => panic!("the filtered follower expected notice {want}, got {got:?}"),
            }
        }
        // The flow that waited comes after them, and no notice is in the
        // history.
        assert!(matches!(s.next().await, Some(Item::Flow(f)) if f.socket.cookie == 2));
        assert_eq!(h.dropped(), 0);
        let replay = h
            .subscribe(Subscribe {
                number: 100,
                follow: false,
                since: None,
                filter: FilterSet::default(),
            })
            .unwrap();
        let items: Vec<Item> = replay.collect().await;
        assert!(
            items.iter().all(|i| matches!(i, Item::Flow(_))),
            "{items:?}"
        );
        assert_eq!(items.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn losses_are_told_before_the_next_flow_in_order() {
        let h = hub_with_ring(10, 2, 2);
        let mut s = h.subscribe(follow_all()).unwrap();
        // Published before the task runs: the ring (2 entries) keeps 4 and 5.
        for i in 0..6 {
            h.publish(&numbered(i));
        }
        assert!(matches!(
            s.next().await,
            Some(Item::Lost {
                source: LostSource::SubscriberQueue,
                count: 4
            })
        ));
        assert!(matches!(s.next().await, Some(Item::Flow(f)) if f.socket.cookie == 4));
        assert!(matches!(s.next().await, Some(Item::Flow(f)) if f.socket.cookie == 5));
        h.publish(&numbered(6));
        assert!(matches!(s.next().await, Some(Item::Flow(f)) if f.socket.cookie == 6));
        assert_eq!(h.dropped(), 4);
    }

    /// The sink hands a burst over at `flush`, or as soon as `HANDOVER`
    /// flows wait (in full ring entries), never one entry per flow.
    #[test]
    fn the_sink_hands_over_at_flush_or_when_a_handover_is_full() {
        use crate::pipeline::{PipelineStats, Sink};
        let state = Arc::new(AgentState::new(
            "n1".into(),
            Arc::new(CaptureStats::default()),
            Arc::new(PipelineStats::default()),
        ));
        let h = hub(100, 1000);
        let mut sink = HubSink::new(h.clone(), state);
        for i in 0..HANDOVER as u64 - 1 {
            sink.on_flow(&numbered(i));
        }
        assert_eq!(
            h.entries(),
            0,
            "nothing handed over before a handover is full"
        );
        sink.on_flow(&numbered(HANDOVER as u64));
        assert_eq!(
            h.entries(),
            (HANDOVER / BATCH_MAX) as u64,
            "a full handover, in full entries"
        );
        for i in 0..3 {
            sink.on_flow(&numbered(i));
        }
        sink.flush();
        assert_eq!(
            h.entries(),
            (HANDOVER / BATCH_MAX) as u64 + 1,
            "the rest at flush"
        );
        sink.flush();
        assert_eq!(
            h.entries(),
            (HANDOVER / BATCH_MAX) as u64 + 1,
            "an empty flush sends nothing"
        );
    }

    /// On_flow hands the flow over and returns while a subscriber's filter
    /// is held up: the other subscriber gets every flow meanwhile, and the
    /// held-up one, once free, is told how many it lost behind the ring.
    /// Counted, not timed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[expect(
        clippy::await_holding_lock,
        reason = "the guard is the stall: it blocks the stuck filter on a worker, never this task"
    )]
    async fn a_stuck_filter_never_delays_on_flow_or_the_other_subscribers() {
        use crate::pipeline::PipelineStats;
        use crate::pipeline::Sink;
        let state = Arc::new(AgentState::new(
            "n1".into(),
            Arc::new(CaptureStats::default()),
            Arc::new(PipelineStats::default()),
        ));
        let ring = 64;
        let h = Arc::new(Hub::with_ring(10, 1000, ring, 1000, state.metrics.clone()));
        let stall = Arc::new(Stall::default());
        let held = stall.gate.lock().unwrap();
        let follow = |filter| Subscribe {
            number: 0,
            follow: true,
            since: None,
            filter,
        };
        let mut stuck = h
            .subscribe(follow(FilterSet::stalled(stall.clone())))
            .unwrap();
        let mut other = h.subscribe(follow(FilterSet::default())).unwrap();
        let mut sink = HubSink::new(h.clone(), state.clone());
        sink.on_flow(&numbered(0));
        sink.flush();
        while stall.entered.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // The stuck filter holds flow 0; every on_flow still returns. The
        // other subscriber's task is let catch up after each (a ring of 64
        // would otherwise race it: that is the stuck one's fate, not its).
        let flows = 500u64;
        let wait = std::time::Duration::from_secs(60);
        for i in 1..flows {
            sink.on_flow(&numbered(i));
            sink.flush();
            tokio::time::timeout(wait, other.caught_up())
                .await
                .expect("the other subscriber's filter task keeps up while one filter is stuck");
        }
        let mut got = Vec::new();
        for _ in 0..flows {
            let item = tokio::time::timeout(wait, other.next())
                .await
                .expect("the other subscriber's next flow within 60 s");
            got.push(item.expect("the other subscriber follows"));
        }
        assert_eq!(
            cookies(&got),
            (0..flows).collect::<Vec<_>>(),
            "the other subscriber got every flow, in order, while a filter was stuck"
        );
        assert_eq!(
            stall.entered.load(Ordering::SeqCst),
            1,
            "the stuck filter saw only flow 0 meanwhile"
        );
        drop(held);
        let mut items = Vec::new();
        let mut accounted = 0;
        while accounted < flows {
            let item = tokio::time::timeout(wait, stuck.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("the freed subscriber told of {accounted} of {flows} flows, then nothing for 60 s")
                })
                .expect("the stuck subscriber follows");
            accounted += match &item {
                Item::Flow(_) => 1,
                Item::Lost { count, .. } => *count,
                Item::Notice(_) => 0,
            };
            items.push(item);
        }
        assert!(
            matches!(&items[0], Item::Flow(f) if f.socket.cookie == 0),
            "first the flow its filter held: {:?}",
            items[0]
        );
        let lost = match &items[1] {
            Item::Lost {
                source: LostSource::SubscriberQueue,
                count,
            } => *count,
            other => panic!("expected the loss behind the ring next, got {other:?}"),
        };
        let rest = cookies(&items[2..]);
        assert!(
            lost >= flows - 1 - ring as u64,
            "at most a ring's worth ({ring}) kept, {lost} lost"
        );
        assert_eq!(
            rest,
            (1 + lost..flows).collect::<Vec<_>>(),
            "then the flows still in the ring, in order"
        );
        assert_eq!(
            h.dropped(),
            lost,
            "counted in flowaudit_stream_dropped_total"
        );
        assert!(
            state
                .metrics
                .encode_openmetrics()
                .contains(&format!("flowaudit_stream_dropped_total {lost}")),
            "the metric says so"
        );
    }
}
