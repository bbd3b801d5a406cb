//! The sort window: flows from every node come in as they arrive and go out
//! in time order. In: flows with their arrival instant. Out: the flow with
//! the oldest `time`, once the oldest *arrival* held has waited the window
//! (everything older in time goes out before it), or at once when more than
//! the buffer's size are held. Like Hubble Relay's sort buffer (its
//! `sortBufferMaxLen` 100 and `sortBufferDrainTimeout` 1 s), a flow that
//! arrives after a newer one already went out still goes out, counted as
//! out of order: a node whose flows reach the relay later than the window
//! never holds the others up.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::flow::FlowEvent;

struct Held {
    flow: Arc<FlowEvent>,
    seq: u64,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Held {}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Held {
    /// By time (RFC 3339 with nanoseconds, UTC, fixed width: text order is
    /// time order), then by arrival.
    fn cmp(&self, other: &Self) -> Ordering {
        self.flow
            .time
            .cmp(&other.flow.time)
            .then(self.seq.cmp(&other.seq))
    }
}

pub struct SortWindow {
    window: Duration,
    max: usize,
    heap: BinaryHeap<Reverse<Held>>,
    /// Arrival order: (seq, arrived) of every flow pushed and not yet
    /// known to be gone.
    arrivals: VecDeque<(u64, Instant)>,
    /// Flows gone out ahead of their turn in `arrivals`.
    gone: HashSet<u64>,
    seq: u64,
    /// The newest time gone out.
    newest_out: Option<Arc<FlowEvent>>,
    out_of_order: u64,
}

impl SortWindow {
    /// `window`: how long a flow waits for older ones from slower nodes;
    /// `max`: flows held at most (then the oldest goes out at once).
    pub fn new(window: Duration, max: usize) -> Self {
        Self {
            window,
            max: max.max(1),
            heap: BinaryHeap::new(),
            arrivals: VecDeque::new(),
            gone: HashSet::new(),
            seq: 0,
            newest_out: None,
            out_of_order: 0,
        }
    }

    pub fn push(&mut self, flow: Arc<FlowEvent>, now: Instant) {
        self.seq += 1;
        self.arrivals.push_back((self.seq, now));
        self.heap.push(Reverse(Held {
            flow,
            seq: self.seq,
        }));
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Flows that went out after a newer one had.
    pub fn out_of_order(&self) -> u64 {
        self.out_of_order
    }

    fn oldest_arrival(&mut self) -> Option<Instant> {
        while let Some(&(seq, at)) = self.arrivals.front() {
            if self.gone.remove(&seq) {
                self.arrivals.pop_front();
            } else {
                return Some(at);
            }
        }
        None
    }

    /// The next flow due at `now`, if any.
    pub fn pop_ready(&mut self, now: Instant) -> Option<Arc<FlowEvent>> {
        let due = self.heap.len() > self.max
            || self
                .oldest_arrival()
                .is_some_and(|at| now.saturating_duration_since(at) >= self.window);
        if !due {
            return None;
        }
        let Reverse(held) = self.heap.pop()?;
        self.gone.insert(held.seq);
        match &self.newest_out {
            Some(newest) if held.flow.time < newest.time => self.out_of_order += 1,
            _ => self.newest_out = Some(held.flow.clone()),
        }
        Some(held.flow)
    }

    /// Everything held, in time order (at shutdown).
    pub fn drain(&mut self) -> Vec<Arc<FlowEvent>> {
        let mut out = Vec::with_capacity(self.heap.len());
        while let Some(Reverse(h)) = self.heap.pop() {
            out.push(h.flow);
        }
        self.arrivals.clear();
        self.gone.clear();
        out
    }

    /// When the next flow falls due without anything new arriving.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        let window = self.window;
        self.oldest_arrival().map(|at| at + window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::hub::tests::sample_flow;
    use crate::flow::FlowTime;

    fn at(time: &FlowTime, node: &str) -> Arc<FlowEvent> {
        let mut f = sample_flow();
        f.time = *time;
        f.node_name = node.into();
        Arc::new(f)
    }

    fn t(ms: u64) -> FlowTime {
        format!("2026-12-02T10:00:00.{:09}Z", ms * 1_000_000)
            .as_str()
            .into()
    }

    #[test]
    fn flows_within_the_window_go_out_in_time_order() {
        let start = Instant::now();
        let mut w = SortWindow::new(Duration::from_millis(1000), 100);
        // Node b's flows arrive late but within the window.
        w.push(at(&t(100), "a"), start);
        w.push(at(&t(300), "a"), start + Duration::from_millis(10));
        w.push(at(&t(50), "b"), start + Duration::from_millis(400));
        w.push(at(&t(200), "b"), start + Duration::from_millis(500));
        assert!(w.pop_ready(start + Duration::from_millis(999)).is_none());
        assert_eq!(w.next_deadline(), Some(start + Duration::from_millis(1000)));
        let now = start + Duration::from_millis(1000);
        // The first arrival is due: it and everything older go out.
        let first: Vec<FlowTime> = std::iter::from_fn(|| w.pop_ready(now))
            .map(|f| f.time)
            .collect();
        assert_eq!(first, vec![t(50), t(100)], "{first:?}");
        let later = start + Duration::from_millis(1600);
        let rest: Vec<FlowTime> = std::iter::from_fn(|| w.pop_ready(later))
            .map(|f| f.time)
            .collect();
        assert_eq!(rest, vec![t(200), t(300)]);
        assert_eq!(w.out_of_order(), 0);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn a_full_buffer_releases_at_once_and_late_flows_are_counted() {
        let now = Instant::now();
        let mut w = SortWindow::new(Duration::from_secs(60), 2);
        w.push(at(&t(10), "a"), now);
        w.push(at(&t(20), "a"), now);
        assert!(w.pop_ready(now).is_none(), "2 held, the buffer takes 2");
        w.push(at(&t(30), "a"), now);
        assert_eq!(w.pop_ready(now).unwrap().time, t(10));
        assert!(w.pop_ready(now).is_none());
        // A slow node's flow older than what already went out: it still
        // goes out (nothing is lost), counted as out of order.
        w.push(at(&t(5), "slow"), now);
        assert_eq!(w.pop_ready(now).unwrap().time, t(5));
        assert_eq!(w.out_of_order(), 1);
        let rest: Vec<FlowTime> = w.drain().iter().map(|f| f.time).collect();
        assert_eq!(rest, vec![t(20), t(30)]);
    }

    #[test]
    fn equal_times_keep_their_arrival_order() {
        let now = Instant::now();
        let mut w = SortWindow::new(Duration::ZERO, 100);
        for node in ["a", "b", "c"] {
            w.push(at(&t(1), node), now);
        }
        let nodes: Vec<String> = std::iter::from_fn(|| w.pop_ready(now))
            .map(|f| f.node_name.to_string())
            .collect();
        assert_eq!(nodes, ["a", "b", "c"]);
    }
}
