//! Parked flows: those waiting for an identity answer or for their
//! handshake to be classified. In: flows to park, and the news that may
//! release them (a socket woken, time passing); out: the sockets worth a
//! look in this pass, and their parked flows in order.
//!
//! A pass costs what changed, not what is parked: a socket is visited when
//! it is woken (its encryption settled, its CLOSE came), when one of its
//! flows' deadlines passes (each wait is one constant, so each deadline
//! queue is sorted by time), or while one of its flows awaits an identity
//! answer that can only be polled. When the kernel ring overflows and
//! CLOSEs are lost, thousands of CONNECTs wait out their time here; a pass
//! that walked all of them on every burst would make the overload worse.
//!
//! The flows of one socket form a chain in the order they were parked:
//! only its head can go, so a socket's CONNECT always precedes its CLOSE.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::capture::record::CookieMap;
use crate::flow::FlowEvent;
use crate::identity::PendingIdentity;

pub struct Parked {
    /// Boxed in its final `Arc` from the start: the parked flow is moved
    /// by pointer (into the slab, out, to the sinks), never copied.
    pub flow: Arc<FlowEvent>,
    /// The identity answers still awaited; None when answered or not needed.
    /// Boxed: most parked flows wait only for their handshake, and a
    /// parked flow is moved in and out of the slab.
    pub query: Option<Box<PendingIdentity>>,
    pub parked_at: Instant,
    /// Until when the identity answers are waited for.
    pub deadline: Instant,
    /// Until when a CONNECT waits for its handshake to be classified.
    pub encryption_deadline: Option<Instant>,
}

/// A slot of the slab and its generation when a flow was put there: a
/// queue entry that outlived its flow names an older generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    index: u32,
    generation: u32,
}

struct Entry {
    generation: u32,
    parked: Option<Parked>,
    /// Park order, for the last pass at shutdown.
    seq: u64,
    /// The next parked flow of the same socket.
    next: Option<u32>,
}

#[derive(Debug, Clone, Copy)]
struct Chain {
    head: u32,
    tail: u32,
}

#[derive(Default)]
pub struct Parking {
    slab: Vec<Entry>,
    free: Vec<u32>,
    sockets: CookieMap<Chain>,
    identity_deadlines: VecDeque<(Instant, Slot)>,
    encryption_deadlines: VecDeque<(Instant, Slot)>,
    /// Flows with an identity query: its answer comes from elsewhere (the
    /// SPIRE client, the peer socket's record) and is polled each pass.
    polled: Vec<Slot>,
    woken: Vec<u64>,
    len: usize,
    next_seq: u64,
}

impl Parking {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `cookie` has parked flows (a later flow of it must queue).
    pub fn holds(&self, cookie: u64) -> bool {
        self.sockets.contains_key(&cookie)
    }

    /// Ends the handshake waits of `cookie`'s parked flows (their answer
    /// is final, and the encryption tracker gives it without being told)
    /// and wakes the socket. Returns how many waits ended.
    pub fn end_encryption_waits(&mut self, cookie: u64) -> u64 {
        let Some(chain) = self.sockets.get(&cookie) else {
            return 0;
        };
        let mut ended = 0;
        let mut at = Some(chain.head);
        while let Some(i) = at {
            let e = &mut self.slab[i as usize];
            if let Some(p) = e.parked.as_mut()
                && p.encryption_deadline.take().is_some()
            {
                ended += 1;
            }
            at = e.next;
        }
        self.woken.push(cookie);
        ended
    }

    /// Something a parked flow of `cookie` waits for may have come.
    pub fn wake(&mut self, cookie: u64) {
        if self.holds(cookie) {
            self.woken.push(cookie);
        }
    }

    pub fn park(&mut self, p: Parked) {
        let cookie = p.flow.socket.cookie;
        let deadlines = (
            p.query.is_some().then_some(p.deadline),
            p.encryption_deadline,
        );
        let seq = self.next_seq;
        self.next_seq += 1;
        let index = match self.free.pop() {
            Some(i) => {
                let e = &mut self.slab[i as usize];
                e.parked = Some(p);
                e.seq = seq;
                e.next = None;
                i
            }
            None => {
                self.slab.push(Entry {
                    generation: 0,
                    parked: Some(p),
                    seq,
                    next: None,
                });
                u32::try_from(self.slab.len() - 1).expect("fewer than 2^32 parked flows")
            }
        };
        let slot = Slot {
            index,
            generation: self.slab[index as usize].generation,
        };
        match self.sockets.get_mut(&cookie) {
            Some(chain) => {
                self.slab[chain.tail as usize].next = Some(index);
                chain.tail = index;
            }
            None => {
                self.sockets.insert(
                    cookie,
                    Chain {
                        head: index,
                        tail: index,
                    },
                );
            }
        }
        if let Some(d) = deadlines.0 {
            self.identity_deadlines.push_back((d, slot));
            self.polled.push(slot);
        }
        if let Some(d) = deadlines.1 {
            self.encryption_deadlines.push_back((d, slot));
        }
        self.len += 1;
    }

    /// The sockets worth a look now, into `out` (possibly repeated): woken
    /// ones, those with an identity answer to poll, those whose deadline
    /// passed; with `all`, every socket, in the order their heads were
    /// parked. Takes what it reports: wake-ups and passed deadlines.
    /// Without `poll`, sockets that only have an answer to poll are left
    /// for a later pass.
    pub fn due(&mut self, now: Instant, all: bool, poll: bool, out: &mut Vec<u64>) {
        if all {
            let mut heads: Vec<(u64, u64)> = self
                .sockets
                .iter()
                .map(|(&cookie, chain)| (self.slab[chain.head as usize].seq, cookie))
                .collect();
            heads.sort_unstable();
            out.extend(heads.into_iter().map(|(_, cookie)| cookie));
            self.woken.clear();
            return;
        }
        out.append(&mut self.woken);
        let slab = &self.slab;
        if poll {
            out.extend(self.polled.iter().filter_map(|&s| cookie_at(slab, s)));
        }
        for queue in [&mut self.identity_deadlines, &mut self.encryption_deadlines] {
            while let Some(&(_, slot)) = queue.front().filter(|(d, _)| *d <= now) {
                queue.pop_front();
                out.extend(cookie_at(slab, slot));
            }
        }
    }

    /// The earliest parked flow of `cookie`, the only one that may go.
    pub fn head_mut(&mut self, cookie: u64) -> Option<&mut Parked> {
        let chain = self.sockets.get(&cookie)?;
        self.slab[chain.head as usize].parked.as_mut()
    }

    /// Takes the head of `cookie`'s chain (after `head_mut` found it ready).
    pub fn pop_head(&mut self, cookie: u64) -> Option<Parked> {
        let chain = self.sockets.get_mut(&cookie)?;
        let index = chain.head;
        let e = &mut self.slab[index as usize];
        let p = e.parked.take()?;
        e.generation = e.generation.wrapping_add(1);
        match e.next.take() {
            Some(next) => chain.head = next,
            None => {
                self.sockets.remove(&cookie);
            }
        }
        self.free.push(index);
        self.len -= 1;
        Some(p)
    }

    /// After a pass: forget polled flows that went or got their answer
    /// (after a pass that polled them).
    pub fn after_pass(&mut self, polled: bool) {
        let slab = &self.slab;
        if polled {
            self.polled.retain(|s| {
                let e = &slab[s.index as usize];
                e.generation == s.generation && e.parked.as_ref().is_some_and(|p| p.query.is_some())
            });
        }
        if self.len == 0 {
            // Nothing parked: stale deadline entries point at nothing.
            self.identity_deadlines.clear();
            self.encryption_deadlines.clear();
        }
    }
}

/// The socket of the flow in `slot`, if that flow is still parked there.
fn cookie_at(slab: &[Entry], slot: Slot) -> Option<u64> {
    let e = &slab[slot.index as usize];
    (e.generation == slot.generation)
        .then_some(e.parked.as_ref())
        .flatten()
        .map(|p| p.flow.socket.cookie)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::export::hub::tests::sample_flow;

    fn parked(cookie: u64, at: Instant, encryption_wait: Option<Duration>) -> Parked {
        let mut flow = sample_flow();
        flow.socket.cookie = cookie;
        let flow = Arc::new(flow);
        Parked {
            flow,
            query: None,
            parked_at: at,
            deadline: at + Duration::from_secs(3600),
            encryption_deadline: encryption_wait.map(|w| at + w),
        }
    }

    fn due(p: &mut Parking, now: Instant, all: bool) -> Vec<u64> {
        let mut out = Vec::new();
        p.due(now, all, true, &mut out);
        out
    }

    #[test]
    fn a_pass_visits_only_woken_sockets_and_passed_deadlines() {
        let t0 = Instant::now();
        let mut p = Parking::default();
        let wait = Duration::from_millis(250);
        for cookie in 1..=1000 {
            p.park(parked(cookie, t0, Some(wait)));
        }
        assert_eq!(p.len(), 1000);
        assert!(due(&mut p, t0, false).is_empty(), "nothing changed");
        p.wake(7);
        p.wake(5000); // holds nothing: ignored
        assert_eq!(due(&mut p, t0, false), [7]);
        assert!(due(&mut p, t0, false).is_empty(), "a wake-up is taken once");
        // Released by the pipeline: the flow goes, its deadline entry stays.
        assert_eq!(p.pop_head(7).map(|x| x.flow.socket.cookie), Some(7));
        assert!(!p.holds(7));
        p.after_pass(true);
        // The deadline passes: every socket but the one that went, in order.
        let at_deadline = due(&mut p, t0 + wait, false);
        let expected: Vec<u64> = (1..=1000).filter(|&c| c != 7).collect();
        assert_eq!(at_deadline, expected);
        assert!(due(&mut p, t0 + wait, false).is_empty(), "taken once");
    }

    #[test]
    fn a_socket_releases_in_park_order_and_a_reused_slot_is_not_mistaken() {
        let t0 = Instant::now();
        let mut p = Parking::default();
        let mut connect = parked(1, t0, Some(Duration::from_millis(10)));
        Arc::make_mut(&mut connect.flow).event = crate::flow::EventKind::Connect;
        p.park(connect);
        p.park(parked(2, t0, None));
        let mut close = parked(1, t0, None);
        Arc::make_mut(&mut close.flow).event = crate::flow::EventKind::Close;
        p.park(close);
        assert_eq!(
            p.head_mut(1).map(|x| x.flow.event),
            Some(crate::flow::EventKind::Connect)
        );
        let first = p.pop_head(1).unwrap();
        assert_eq!(first.flow.event, crate::flow::EventKind::Connect);
        assert_eq!(
            p.pop_head(1).map(|x| x.flow.event),
            Some(crate::flow::EventKind::Close)
        );
        assert!(!p.holds(1) && p.holds(2));
        // Socket 3 takes the CONNECT's slot; the CONNECT's old deadline
        // entry (10 ms) must not visit it.
        p.park(parked(3, t0, None));
        assert!(due(&mut p, t0 + Duration::from_millis(20), false).is_empty());
        // Shutdown: every socket, in the order its head was parked.
        assert_eq!(due(&mut p, t0, true), [2, 3]);
        assert_eq!(p.len(), 2);
    }
}
