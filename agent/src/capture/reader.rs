//! The ring-buffer reader: reads the kernel's records on a timer while they
//! come, and sleeps until the kernel wakes it when none came for a while.
//! Records enter from the ring buffer and leave, decoded and in batches,
//! on the channel to the pipeline.
//!
//! Why both: the programs submit without waking the reader (a wake-up per
//! record took a third of the agent's CPU at 20,000 records a second), so
//! a timer reads them; but a timer that fires every few milliseconds on an
//! idle node costs the node too (on a busy 2-core node, 5% of a bulk
//! stream's throughput). So after `IDLE_POLLS` empty reads the reader
//! sets the `READER` slot and waits on the ring's descriptor instead; the
//! next record the kernel submits wakes it (and clears the slot), and the
//! timer resumes.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use aya::maps::{Array, MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use super::record::KernelRecord;
use super::{CaptureStats, READ_BATCH};

/// Timer reads in a row that found nothing before the reader sleeps.
pub const IDLE_POLLS: u32 = 20;

/// While asleep, the reader still looks this often. A record submitted in
/// the instant the reader went to sleep (its program read the slot just
/// before the reader set it) wakes no one: it is read late, never lost.
pub const ASLEEP_LOOK: Duration = Duration::from_millis(200);

/// When the reader should sleep: counts the empty timer reads.
#[derive(Debug, Default)]
pub struct Idle {
    empty_reads: u32,
}

impl Idle {
    /// After a timer read of `n` records: whether to sleep now.
    pub fn after_read(&mut self, n: usize) -> bool {
        if n > 0 {
            self.empty_reads = 0;
            return false;
        }
        self.empty_reads += 1;
        self.empty_reads >= IDLE_POLLS
    }

    /// The reader woke with records: count afresh.
    pub fn woke(&mut self) {
        self.empty_reads = 0;
    }
}

pub struct Reader {
    pub ring: RingBuf<MapData>,
    /// The programs' `READER` slot; None: this object has none, and the
    /// reader never sleeps.
    pub asleep: Option<Array<MapData, u32>>,
    pub tx: mpsc::Sender<Vec<KernelRecord>>,
    pub stats: std::sync::Arc<CaptureStats>,
}

/// How a sleep ended.
enum Woke {
    /// Records came (or setting the slot failed): back to the timer.
    Records,
    Shutdown,
    /// The pipeline is gone.
    Closed,
}

impl Reader {
    /// Reads until `shutdown` changes, then once more, to the end.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>, poll: Duration) {
        let mut tick = tokio::time::interval(poll);
        // A tick missed while the pipeline was busy is not made up in a
        // burst: the next drain takes everything anyway.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // SAFETY: the descriptor belongs to `self.ring`, which outlives this
        // registration (a local of this function, dropped before `self`)
        // and never closes or replaces it meanwhile.
        let registered = unsafe {
            AsyncFd::register_with_interest(
                RingFd(self.ring.as_raw_fd()),
                tokio::io::Interest::READABLE,
            )
        };
        let ring_fd = match registered {
            Ok(fd) => Some(fd),
            Err(error) => {
                let error = std::io::Error::from(error);
                tracing::warn!(%error, "cannot wait on the ring buffer's descriptor: the reader polls it on its timer only");
                None
            }
        };
        let mut idle = Idle::default();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let Ok(n) = self.drain().await else { return };
                    if !idle.after_read(n) {
                        continue;
                    }
                    let Some(fd) = &ring_fd else { continue };
                    match self.sleep(fd, &mut shutdown).await {
                        Woke::Records => {
                            idle.woke();
                            tick.reset();
                        }
                        Woke::Shutdown => break,
                        Woke::Closed => return,
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        let _ = self.drain().await;
    }

    fn set_asleep(&mut self, on: bool) -> bool {
        let Some(slot) = &mut self.asleep else {
            return false;
        };
        match slot.set(0, u32::from(on), 0) {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(%error, "could not set the ring reader's READER slot");
                false
            }
        }
    }

    /// Whether a program cleared the `READER` slot the reader set: only a
    /// program that woke the reader does.
    fn slot_cleared(&self) -> bool {
        self.asleep
            .as_ref()
            .is_some_and(|slot| matches!(slot.get(&0, 0), Ok(0)))
    }

    /// Sleeps until the kernel wakes the reader (or `ASLEEP_LOOK` finds a
    /// record that woke no one, or shutdown).
    async fn sleep(&mut self, fd: &AsyncFd<RingFd>, shutdown: &mut watch::Receiver<bool>) -> Woke {
        if !self.set_asleep(true) {
            return Woke::Records;
        }
        self.stats.reader_sleeps.fetch_add(1, Ordering::Relaxed);
        // A record submitted before the programs could see the slot woke
        // no one: look once more now that they can.
        let mut by_kernel = false;
        loop {
            match self.drain().await {
                Err(()) => return Woke::Closed,
                Ok(0) => {}
                Ok(_) => {
                    // The program that woke the reader cleared the slot. Its
                    // wake-up can still be on its way when the fallback look
                    // finds the record (a slow guest, where both are ready
                    // at once), so the slot says who woke the reader.
                    if by_kernel || self.slot_cleared() {
                        self.stats
                            .reader_kernel_wakeups
                            .fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.set_asleep(false);
                    }
                    return Woke::Records;
                }
            }
            by_kernel = tokio::select! {
                // A wake-up ready at the same time as the fallback look wins.
                biased;
                ready = fd.readable() => {
                    // The descriptor stays "ready" until told otherwise:
                    // clear it before reading, so a wake-up after this read
                    // is not missed.
                    if let Ok(mut guard) = ready {
                        guard.clear_ready();
                    }
                    true
                }
                _ = tokio::time::sleep(ASLEEP_LOOK) => false,
                _ = shutdown.changed() => {
                    self.set_asleep(false);
                    return Woke::Shutdown;
                }
            };
        }
    }

    /// Reads every record in the ring, in batches to the pipeline; how many.
    /// Err when the pipeline is gone.
    async fn drain(&mut self) -> Result<usize, ()> {
        let mut total = 0;
        loop {
            let mut batch = Vec::with_capacity(READ_BATCH);
            let mut empty = false;
            while batch.len() < READ_BATCH {
                let decoded = {
                    let Some(item) = self.ring.next() else {
                        empty = true;
                        break;
                    };
                    KernelRecord::from_bytes(&item)
                };
                total += 1;
                match &decoded {
                    Ok(KernelRecord::Payload(_)) => &self.stats.payload_records,
                    _ => &self.stats.records,
                }
                .fetch_add(1, Ordering::Relaxed);
                match decoded {
                    Ok(ev) => batch.push(ev),
                    Err(e) => {
                        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, "malformed kernel record");
                    }
                }
            }
            if !batch.is_empty() {
                self.tx.send(batch).await.map_err(|_| ())?;
            }
            if empty {
                return Ok(total);
            }
        }
    }
}

/// The ring buffer's descriptor, for the reactor (the ring itself stays
/// with the reader, which reads it while the descriptor is registered).
struct RingFd(std::os::fd::RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_sleeps_after_idle_polls_empty_reads_in_a_row() {
        let mut idle = Idle::default();
        for _ in 1..IDLE_POLLS {
            assert!(!idle.after_read(0));
        }
        // One read with records starts the count again.
        assert!(!idle.after_read(3));
        for _ in 1..IDLE_POLLS {
            assert!(!idle.after_read(0));
        }
        assert!(idle.after_read(0), "the {IDLE_POLLS}th empty read in a row");
        idle.woke();
        assert!(!idle.after_read(0), "woken: the count starts again");
    }
}
