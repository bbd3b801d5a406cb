//! `--export-file`: flow events as JSON lines, for log shippers (Fluent Bit,
//! Vector). When the file reaches `max_bytes` it is renamed to `PATH.1`
//! (older ones shift to `.2`, ...) and a new one starts; at most
//! `max_backups` old files are kept. Lines are whole: a reader never sees
//! half an event at a rotation. Where a helper thread makes the rotation's
//! renames (see [`super::ahead`]), a file can grow past `max_bytes` by the
//! lines that came while its renames waited for the disk.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::ahead::{Ahead, ROTATE_WAIT};
use crate::flow::FlowEvent;

/// After a rotation failed, the next is tried this much later; meanwhile
/// lines go on into the current file.
const ROTATE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("could not open export file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not write export file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not rotate export file {path}: {source}")]
    Rotate {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the export file failed to do; `/metrics` reads it
/// (`flowaudit_export_file_errors_total`,
/// `flowaudit_export_file_flows_lost_total{reason}`).
#[derive(Debug, Default)]
pub struct ExportFileStats {
    /// Writes and rotations that failed (a full disk, a missing directory).
    pub errors: AtomicU64,
    /// Flow events that never reached the file because of them
    /// (`reason="write_failed"`).
    pub flows_lost: AtomicU64,
    /// Flow events left out of the file because its writer was
    /// [`SINK_QUEUE_FLOWS`] behind the pipeline when they came
    /// (`reason="writer_behind"`).
    pub flows_behind: AtomicU64,
}

/// Whole lines are buffered up to this much before they are written.
const BUFFER: usize = 64 * 1024;

/// Write-behind: each time this much more has been written, the kernel is
/// asked to start writing it to disk (without waiting), and the window
/// before it, whose writing was started one window earlier, is dropped
/// from the page cache (the pages the disk has taken; the kernel keeps
/// any still being written). So the file's pages in the page cache, which
/// is charged to the agent's memory cgroup (the DaemonSet's memory limit),
/// are mostly clean, which reclaim frees without waiting for the disk, and
/// the pages freed are the ones the next writes reuse (2026-12-04, 15 s
/// flat-out pinned runs: the writer thread's CPU per connection 13.3 and
/// 9.7 µs before, 3.8 and 3.9 µs after; under a 512 MiB cgroup v1 memory
/// limit, 14% and 58% of connections lost before, none after).
const WRITE_BEHIND: u64 = 8 << 20;

/// Where write-behind stands in the current file.
#[derive(Debug, Default)]
struct WriteBehind {
    /// Writing to disk has been started up to here.
    started: u64,
    /// Pages before this offset have been dropped from the page cache
    /// (but for those the disk had not taken yet: the kernel's reclaim
    /// finds them clean later).
    dropped: u64,
    /// The file does not take it (a pipe, a character device): off for
    /// this file.
    off: bool,
}

/// One step of write-behind: the byte ranges (offset, length) to drop
/// from the page cache, then to start writing to disk. A length of 0 means
/// to the end of the file.
#[derive(Debug, Clone, Copy)]
pub(super) struct BehindStep {
    pub drop: Option<(u64, u64)>,
    pub start: Option<(u64, u64)>,
}

impl BehindStep {
    /// Makes the calls on `file`.
    pub(super) fn run(self, file: &File) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        if let Some((from, n)) = self.drop {
            // Pages still being written stay; the kernel drops only clean
            // ones. SAFETY: an advice on an open descriptor.
            let e = unsafe {
                libc::posix_fadvise(fd, from as i64, n as i64, libc::POSIX_FADV_DONTNEED)
            };
            if e != 0 {
                return Err(std::io::Error::from_raw_os_error(e));
            }
        }
        if let Some((from, n)) = self.start {
            // SAFETY: a system call on an open descriptor.
            if unsafe {
                libc::sync_file_range(fd, from as i64, n as i64, libc::SYNC_FILE_RANGE_WRITE)
            } != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

impl WriteBehind {
    /// The file is done with (rotated): what is on disk of it leaves the
    /// page cache too. On the helper thread when there is one.
    fn leave(&self, file: &File, ahead: Option<&Ahead>) {
        if self.off {
            return;
        }
        let step = BehindStep {
            drop: Some((0, 0)),
            start: None,
        };
        if ahead.is_none_or(|a| !a.behind(file, step)) {
            let _ = step.run(file);
        }
    }

    /// After the file grew to `len`: start writing the new window to disk,
    /// drop the one before from the page cache. Never waits for the disk
    /// itself: with a helper thread ([`Ahead`]), that thread makes the
    /// calls, since starting a writeback can wait for the disk (in a 15 s
    /// pinned bench run of 2026-12-06, 456 of the writer's 10 ms stack
    /// samples were in the block layer's writeback throttling). Best effort: a failure turns
    /// it off for this file and is not a write error (the lines are in the
    /// file).
    fn advance(&mut self, file: &File, len: u64, ahead: Option<&Ahead>) {
        if self.off || len < self.started + WRITE_BEHIND {
            return;
        }
        let step = BehindStep {
            drop: (self.started > self.dropped)
                .then(|| (self.dropped, self.started - self.dropped)),
            start: Some((self.started, len - self.started)),
        };
        let done = if ahead.is_some_and(|a| a.behind(file, step)) {
            Ok(())
        } else {
            step.run(file)
        };
        self.dropped = self.started;
        self.started = len;
        if let Err(error) = done {
            self.off = true;
            tracing::debug!(
                %error,
                "export file: no write-behind for this file (its pages stay in the page cache until the kernel writes them)"
            );
        }
    }
}

pub struct ExportFile {
    /// Its path (`names.path`) and its backups'.
    names: Names,
    file: File,
    /// Length of the file: whole lines only.
    on_disk: u64,
    /// Whole lines not written yet.
    pending: Vec<u8>,
    json: crate::flow::json::FlowWriter,
    /// A failed write left part of a line after `on_disk` that could not be
    /// cut off yet: nothing is appended until it is.
    torn: bool,
    max_bytes: u64,
    behind: WriteBehind,
    /// The helper thread: disk blocks of the next file allocated ahead,
    /// write-behind's calls and the rotations (`None` for a file that is
    /// not a regular file: see [`super::ahead`]).
    ahead: Option<Ahead>,
    /// How long a rotation is waited for before lines go on into the
    /// current file ([`ROTATE_WAIT`]).
    rotate_wait: std::time::Duration,
    /// A rotation failed: no other is tried before this.
    retry_at: Option<std::time::Instant>,
    /// Rotations fail now (told once, and again when one works).
    rotate_failing: bool,
    pub stats: Arc<ExportFileStats>,
}

fn append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The export file's name and its backups' (`PATH.1`, `PATH.2`, ...), and
/// the renames of a rotation. Made on the rotation thread when there is one
/// (see [`super::ahead`]).
#[derive(Debug, Clone)]
pub(super) struct Names {
    path: PathBuf,
    max_backups: u32,
    /// A rename onto this path fails (tests simulate a failing rotation).
    #[cfg(test)]
    fail_rename_to: Option<PathBuf>,
    /// Renames wait until this gate opens (tests simulate a stuck disk).
    #[cfg(test)]
    gate: Option<Arc<Gate>>,
}

/// A gate renames (or, in tests, the helper thread of allocation and
/// write-behind) wait at, at most 30 s; open when its flag is true.
#[cfg(test)]
#[derive(Debug, Default)]
pub(super) struct Gate(std::sync::Mutex<bool>, std::sync::Condvar);

#[cfg(test)]
impl Gate {
    pub(super) fn open(&self) {
        *self.0.lock().unwrap() = true;
        self.1.notify_all();
    }

    pub(super) fn pass(&self) {
        let open = self.0.lock().unwrap();
        let _ = self
            .1
            .wait_timeout_while(open, std::time::Duration::from_secs(30), |open| !*open)
            .unwrap();
    }
}

impl Names {
    fn backup(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        #[cfg(test)]
        {
            if let Some(g) = &self.gate {
                g.pass();
            }
            if self.fail_rename_to.as_deref() == Some(to) {
                return Err(std::io::Error::other("simulated rename failure"));
            }
        }
        std::fs::rename(from, to)
    }

    /// A rotation: the new file is made first, under a hidden name (or is
    /// `spare`, made ahead with its blocks allocated); then backups shift
    /// up into the first free slot (replacing the oldest only when every
    /// slot is taken), the current file becomes `.1` and the new one takes
    /// its name. Nothing is deleted, so a rotation that fails half-way
    /// loses at most the oldest backup, once; the next one fills the gap.
    /// Returns the new file, open for appending; on failure the new file
    /// is removed.
    pub(super) fn rotate(&self, spare: Option<&Path>) -> std::io::Result<File> {
        let fresh = match spare {
            Some(spare) => spare.to_path_buf(),
            None => {
                let fresh = hidden_beside(&self.path, "rotating");
                let _ = std::fs::remove_file(&fresh);
                fresh
            }
        };
        let shifted = append(&fresh).and_then(|file| {
            if self.max_backups > 0 {
                let top = (1..=self.max_backups)
                    .find(|&n| !self.backup(n).exists())
                    .unwrap_or(self.max_backups);
                for n in (1..top).rev() {
                    self.rename(&self.backup(n), &self.backup(n + 1))?;
                }
                self.rename(&self.path, &self.backup(1))?;
            }
            // Without backups this replaces the full file in one step.
            self.rename(&fresh, &self.path)?;
            Ok(file)
        });
        if shifted.is_err() {
            let _ = std::fs::remove_file(&fresh);
        }
        shifted
    }
}

/// `.NAME.what` beside the export file `path`: the hidden names of files
/// made for a rotation.
pub(super) fn hidden_beside(path: &Path, what: &str) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.{what}"))
}

fn lines_in(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

/// Opens `path` to append to (made with its directory when missing).
fn create(path: &Path) -> Result<File, ExportError> {
    let open_err = |source| ExportError::Open {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(open_err)?;
    }
    append(path).map_err(open_err)
}

/// Whether the export file can be opened (made where missing), so that a
/// wrong path stops the agent before it attaches anything.
pub fn check_path(path: &Path) -> Result<(), ExportError> {
    create(path).map(drop)
}

impl ExportFile {
    pub fn open(path: &Path, max_bytes: u64, max_backups: u32) -> Result<Self, ExportError> {
        let file = create(path)?;
        let on_disk = file.metadata().map(|m| m.len()).unwrap_or(0);
        let max_bytes = max_bytes.max(1);
        let ahead = Ahead::start(path, &file, on_disk, max_bytes);
        Ok(Self {
            names: Names {
                path: path.to_path_buf(),
                max_backups,
                #[cfg(test)]
                fail_rename_to: None,
                #[cfg(test)]
                gate: None,
            },
            file,
            on_disk,
            pending: Vec::with_capacity(BUFFER + 4096),
            json: Default::default(),
            torn: false,
            max_bytes,
            behind: WriteBehind::default(),
            ahead,
            rotate_wait: ROTATE_WAIT,
            retry_at: None,
            rotate_failing: false,
            stats: Arc::default(),
        })
    }

    /// Counts a failure and the flows it cost.
    fn failed<T>(&self, r: Result<T, ExportError>, lost: u64) -> Result<T, ExportError> {
        if r.is_err() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            self.stats.flows_lost.fetch_add(lost, Ordering::Relaxed);
        }
        r
    }

    pub fn write(&mut self, flow: &FlowEvent) -> Result<(), ExportError> {
        let start = self.pending.len();
        self.json.write(&mut self.pending, flow);
        self.pending.push(b'\n');
        let before = self.on_disk + start as u64;
        if before > 0
            && before + (self.pending.len() - start) as u64 > self.max_bytes
            && let Some(next) = self.next_file()
        {
            // This line starts the next file. The lines before it end the
            // current one (or are counted lost, when that write fails).
            let line = self.pending.split_off(start);
            let ended = self.write_out();
            self.switch_to(next);
            self.pending = line;
            ended?;
        }
        if self.pending.len() >= BUFFER {
            self.write_out()?;
        }
        Ok(())
    }

    /// Writes buffered lines to the file (called when the pipeline is idle);
    /// true when some reached it.
    pub fn flush(&mut self) -> Result<bool, ExportError> {
        self.write_out()
    }

    /// Appends the pending lines. A short or failed write (a full disk) is
    /// cut back to its last whole line, so a reader never sees a torn one,
    /// and the lines that did not fit are dropped and counted.
    fn write_out(&mut self) -> Result<bool, ExportError> {
        let err = |source| ExportError::Write {
            path: self.names.path.clone(),
            source,
        };
        if self.torn {
            if let Err(e) = self.file.set_len(self.on_disk) {
                let lost = lines_in(&self.pending);
                self.pending.clear();
                return self.failed(Err(err(e)), lost);
            }
            self.torn = false;
        }
        if self.pending.is_empty() {
            return Ok(false);
        }
        let mut done = 0;
        let result = loop {
            match self.file.write(&self.pending[done..]) {
                Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) if done + n == self.pending.len() => break Ok(()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        let Err(source) = result else {
            self.on_disk += self.pending.len() as u64;
            self.pending.clear();
            self.behind
                .advance(&self.file, self.on_disk, self.ahead.as_ref());
            return Ok(true);
        };
        let whole = self.pending[..done]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        self.on_disk += whole as u64;
        if done > whole {
            self.torn = self.file.set_len(self.on_disk).is_err();
        }
        let lost = lines_in(&self.pending[whole..]);
        self.pending.clear();
        self.failed(Err(err(source)), lost)
    }

    /// The file the next line starts, once the current one is full: the
    /// rotation's new file when it is made; `None` while it is under way
    /// (on the helper thread: see [`super::ahead`]) or after it failed
    /// (counted in `errors`, tried again [`ROTATE_RETRY`] later). Until
    /// then lines go on into the current file: none is lost.
    fn next_file(&mut self) -> Option<File> {
        if self.retry_at.is_some_and(|t| std::time::Instant::now() < t) {
            return None;
        }
        let made = match &self.ahead {
            Some(a) => a.rotation(&self.names, self.rotate_wait)?,
            None => self.names.rotate(None),
        };
        match made {
            Ok(file) => {
                self.retry_at = None;
                if std::mem::take(&mut self.rotate_failing) {
                    tracing::info!(path = %self.names.path.display(), "export file rotated again");
                }
                Some(file)
            }
            Err(source) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                self.retry_at = Some(std::time::Instant::now() + ROTATE_RETRY);
                if !std::mem::replace(&mut self.rotate_failing, true) {
                    let e = ExportError::Rotate {
                        path: self.names.path.clone(),
                        source,
                    };
                    tracing::error!(error = %e, "export file rotation failed: lines go on into the current file, past its size, and the rotation is tried again each second (counted in flowaudit_export_file_errors_total)");
                }
                None
            }
        }
    }

    /// Lines go on in `file`, the rotation's new file.
    fn switch_to(&mut self, file: File) {
        if std::mem::take(&mut self.torn) {
            // The last try to cut off what a failed write left.
            let _ = self.file.set_len(self.on_disk);
        }
        self.behind.leave(&self.file, self.ahead.as_ref());
        self.file = file;
        self.on_disk = 0;
        self.behind = WriteBehind::default();
    }
}

impl Drop for ExportFile {
    fn drop(&mut self) {
        let _ = self.write_out();
        if let Some(ahead) = self.ahead.take() {
            // Its thread is done first (an allocation under way ends).
            drop(ahead);
            // Blocks allocated ahead and not written go back to the disk
            // (a truncation to its own length frees those past the end).
            // Not after a failed write: its cut-off is pending (`torn`).
            if !self.torn {
                let _ = self.file.set_len(self.on_disk);
            }
        }
    }
}

/// Flows handed to the writer thread at once at most (a burst is cut in
/// batches of this many).
const SINK_BATCH: usize = 1024;

/// Flows handed to the writer thread and not written yet, at most: the
/// file's whole backlog, counted in flows whatever the batches' sizes (a
/// pass of the pipeline hands over what it has, often a few flows). When
/// the writer is this far behind (a disk or a CPU slower than the flows
/// come), the flows that do not fit are left out of the file and counted
/// (`flows_behind`); the pipeline never waits for the file, so the kernel
/// ring, the metrics and the stream are not held up by it. At the storm's
/// rate (about 84,000 flows a second) this is a fifth of a second of flows.
/// Memory decides the size: flows held here beyond what the stream hub
/// holds anyway cost about 0.6 KiB each (2026-12-05, pinned runs on a disk
/// slower than the flows: peak RSS 120 MiB with this backlog full, 149 MiB
/// with 65,536 flows), and the storm's peak RSS is held to 128 MiB.
/// Before, the pipeline waited for the writer here, so the kernel ring was
/// the file's buffer, and a slow disk cost every sink the records the ring
/// could not hold (same runs, before: 79% of connections in the file,
/// 233,360 kernel events lost; after: 16% in the file, none lost, metrics
/// and stream whole).
const SINK_QUEUE_FLOWS: usize = 16 * SINK_BATCH;

/// As a pipeline sink: the pipeline only hands flows over; a thread of its
/// own serializes and writes them, so JSON and disk never hold up capture.
/// Failures are counted (in [`ExportFileStats`]) and logged once, and again
/// only after a recovery; the other sinks go on. So is a writer that fell
/// [`SINK_QUEUE_FLOWS`] behind. Dropping the sink writes out everything
/// handed over before it returns.
pub struct ExportFileSink {
    batch: Vec<Arc<FlowEvent>>,
    stats: Arc<ExportFileStats>,
    /// Flows handed over and not written yet (the writer takes off what it
    /// wrote).
    queued: Arc<AtomicUsize>,
    /// Flows left out since the writer fell behind, while it still is;
    /// `None` while it keeps up.
    behind: Option<u64>,
    tx: Option<std::sync::mpsc::Sender<Vec<Arc<FlowEvent>>>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl ExportFileSink {
    pub fn new(file: ExportFile) -> std::io::Result<Self> {
        let stats = file.stats.clone();
        let queued = Arc::new(AtomicUsize::new(0));
        // Unbounded in batches: `queued` bounds it in flows.
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Arc<FlowEvent>>>();
        let written = queued.clone();
        let writer = std::thread::Builder::new()
            .name("export-file".into())
            .spawn(move || {
                let mut w = Writer {
                    file,
                    failing: false,
                };
                while let Ok(batch) = rx.recv() {
                    w.write_all(&batch, &written);
                    // Take what queued meanwhile, then write out once caught
                    // up: one write per burst.
                    while let Ok(more) = rx.try_recv() {
                        w.write_all(&more, &written);
                    }
                    w.flush();
                }
            })?;
        Ok(Self {
            batch: Vec::with_capacity(SINK_BATCH),
            stats,
            queued,
            behind: None,
            tx: Some(tx),
            writer: Some(writer),
        })
    }

    /// Hands the batch to the writer thread, what fits of it within
    /// [`SINK_QUEUE_FLOWS`] (all of it when `whole`: the sink is being
    /// dropped and no flow comes after).
    fn hand_over(&mut self, whole: bool) {
        if self.batch.is_empty() {
            return;
        }
        let mut batch = std::mem::replace(&mut self.batch, Vec::with_capacity(SINK_BATCH));
        if !whole {
            self.keep_what_fits(&mut batch);
            if batch.is_empty() {
                return;
            }
        }
        let n = batch.len();
        self.queued.fetch_add(n, Ordering::AcqRel);
        let lost = match &self.tx {
            Some(tx) => match tx.send(batch) {
                Ok(()) => return,
                // The writer thread is gone (it panicked).
                Err(e) => e.0.len() as u64,
            },
            None => n as u64,
        };
        self.queued.fetch_sub(n, Ordering::AcqRel);
        if self.tx.take().is_some() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                "export file writer thread is gone: flows are missing from the file from now on (counted in flowaudit_export_file_flows_lost_total)"
            );
        }
        self.stats.flows_lost.fetch_add(lost, Ordering::Relaxed);
    }

    /// Cuts `batch` to the writer's room, counting and telling what is left
    /// out: once when the writer falls behind, once when it has caught up,
    /// which is when half its backlog is written (a writer that only keeps
    /// pace with the flows frees room for a pass or two at a time; telling
    /// each of those would be a pair of log lines every few milliseconds).
    fn keep_what_fits(&mut self, batch: &mut Vec<Arc<FlowEvent>>) {
        let queued = self.queued.load(Ordering::Acquire);
        if queued <= SINK_QUEUE_FLOWS / 2
            && let Some(left_out) = self.behind.take()
        {
            tracing::info!(
                flows_left_out = left_out,
                "export file writer caught up: the file has every flow again from here"
            );
        }
        let room = SINK_QUEUE_FLOWS.saturating_sub(queued);
        if batch.len() <= room {
            return;
        }
        let left_out = (batch.len() - room) as u64;
        batch.truncate(room);
        self.stats
            .flows_behind
            .fetch_add(left_out, Ordering::Relaxed);
        match &mut self.behind {
            Some(n) => *n += left_out,
            None => {
                self.behind = Some(left_out);
                tracing::warn!(
                    backlog = SINK_QUEUE_FLOWS,
                    "export file writer fell behind (the disk or its CPU is slower than flows come): flows are left out of the file until it catches up, not held (counted in flowaudit_export_file_flows_lost_total{{reason=\"writer_behind\"}}); metrics and the stream still get every flow"
                );
            }
        }
    }
}

impl Drop for ExportFileSink {
    fn drop(&mut self) {
        self.hand_over(true);
        self.tx = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// The writer thread's side: the file, and whether it is failing now.
struct Writer {
    file: ExportFile,
    failing: bool,
}

impl Writer {
    /// Writes `flows` (lines may still wait in the buffer) and takes them
    /// off `queued`.
    fn write_all(&mut self, flows: &[Arc<FlowEvent>], queued: &AtomicUsize) {
        for flow in flows {
            if let Err(e) = self.file.write(flow) {
                self.failed(e);
            }
        }
        queued.fetch_sub(flows.len(), Ordering::AcqRel);
    }

    fn failed(&mut self, e: ExportError) {
        if !self.failing {
            self.failing = true;
            tracing::error!(error = %e, "export file write failed: flows are missing from it until a write succeeds (counted in flowaudit_export_file_flows_lost_total); other sinks still get every flow");
        }
    }

    fn flush(&mut self) {
        match self.file.flush() {
            Ok(true) if self.failing => {
                self.failing = false;
                let stats = &self.file.stats;
                tracing::info!(
                    errors = stats.errors.load(Ordering::Relaxed),
                    flows_lost = stats.flows_lost.load(Ordering::Relaxed),
                    "export file written again"
                );
            }
            Ok(_) => {}
            Err(e) => self.failed(e),
        }
    }
}

impl crate::pipeline::Sink for ExportFileSink {
    fn on_flow(&mut self, flow: &Arc<FlowEvent>) {
        self.batch.push(flow.clone());
        if self.batch.len() >= SINK_BATCH {
            self.hand_over(false);
        }
    }

    fn flush(&mut self) {
        self.hand_over(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Clock;
    use crate::capture::record::{KernelEvent, tests::sample};
    use flowaudit_tests::support::TestDir;

    fn flow() -> FlowEvent {
        FlowEvent::from_kernel(
            &KernelEvent::from_record(&sample()).unwrap(),
            &"n1".into(),
            &Clock::now(),
        )
    }

    #[test]
    fn rotates_by_size_keeps_whole_lines_and_bounded_backups() {
        let dir = TestDir::new("fa-export");
        let path = dir.join("flows.jsonl");
        let mut line = Vec::new();
        crate::flow::json::write_flow(&mut line, &flow());
        let line_len = line.len() as u64 + 1;
        // Room for 3 lines per file, 2 backups.
        let mut ex = open_waiting(&path, line_len * 3, 2);
        for _ in 0..10 {
            ex.write(&flow()).unwrap();
        }
        ex.flush().unwrap();
        let count = |p: &Path| {
            let text = std::fs::read_to_string(p).unwrap();
            for l in text.lines() {
                serde_json::from_str::<FlowEvent>(l).expect("every line is a whole event");
            }
            text.lines().count()
        };
        // 10 lines: files of 3,3,3,1; the oldest file of 3 was dropped.
        assert_eq!(count(&path), 1);
        assert_eq!(count(&dir.join("flows.jsonl.1")), 3);
        assert_eq!(count(&dir.join("flows.jsonl.2")), 3);
        assert!(!dir.join("flows.jsonl.3").exists());
        // Reopening appends to the current file.
        drop(ex);
        let mut ex = open_waiting(&path, line_len * 3, 2);
        ex.write(&flow()).unwrap();
        ex.flush().unwrap();
        assert_eq!(count(&path), 2);
    }

    fn scratch(name: &str) -> TestDir {
        TestDir::new(&format!("fa-export-{name}"))
    }

    /// Opens the export file; its rotations are waited for as long as
    /// they take (at most 30 s), so that each file ends where its size
    /// says (the agent waits [`ROTATE_WAIT`], then goes on).
    fn open_waiting(path: &Path, max_bytes: u64, max_backups: u32) -> ExportFile {
        let mut ex = ExportFile::open(path, max_bytes, max_backups).unwrap();
        ex.rotate_wait = std::time::Duration::from_secs(30);
        ex
    }

    /// A flow told apart by its source port.
    fn flow_n(n: u16) -> FlowEvent {
        let mut f = flow();
        f.l4.source_port = n;
        f
    }

    /// The source ports of the lines of `p`, all whole events.
    fn ports(p: &Path) -> Vec<u16> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str::<FlowEvent>(l)
                    .unwrap_or_else(|e| panic!("a torn line in {}: {e}: {l}", p.display()))
                    .l4
                    .source_port
            })
            .collect()
    }

    /// A rotation that fails loses no line (they go on into the current
    /// file), no backup but the oldest (which it drops anyway) and is told
    /// and counted once; the next try, a second later, fills the gap. The
    /// same with the helper thread making the renames and without (the
    /// writer's own, for a file that gets no helper).
    #[test]
    fn a_failing_rotation_keeps_the_backups_and_every_line() {
        for helper in [true, false] {
            let dir = scratch(if helper { "rotation" } else { "rotation-here" });
            let path = dir.join("flows.jsonl");
            let file = |suffix: &str| dir.join(format!("flows.jsonl{suffix}"));
            let current = serde_json::to_string(&flow_n(1)).unwrap() + "\n";
            for (suffix, text) in [
                ("", current.as_str()),
                (".1", "one"),
                (".2", "two"),
                (".3", "three"),
            ] {
                std::fs::write(file(suffix), text).unwrap();
            }
            // One byte per file: every line rotates; the last step of the
            // rotation (the current file becoming .1) fails.
            let mut ex = open_waiting(&path, 1, 3);
            if !helper {
                ex.ahead = None;
            }
            ex.names.fail_rename_to = Some(file(".1"));
            for n in 2..=4 {
                ex.write(&flow_n(n))
                    .expect("a failed rotation is no failed write");
            }
            ex.flush().unwrap();
            let backups = || -> Vec<String> {
                [".1", ".2", ".3"]
                    .iter()
                    .map(|s| std::fs::read_to_string(file(s)).unwrap_or_else(|_| "-".into()))
                    .collect()
            };
            assert_eq!(
                ex.stats.errors.load(Ordering::Relaxed),
                1,
                "one failure, then no other try within the second (helper: {helper})"
            );
            assert_eq!(ex.stats.flows_lost.load(Ordering::Relaxed), 0);
            // Only the oldest, which the rotation drops anyway, may be gone.
            assert_eq!(backups(), ["-", "one", "two"], "helper: {helper}");
            assert_eq!(
                ports(&path),
                [1, 2, 3, 4],
                "the lines went on into the current file"
            );
            // The next try (here without waiting the second) works.
            ex.names.fail_rename_to = None;
            ex.retry_at = None;
            ex.write(&flow_n(5)).unwrap();
            ex.flush().unwrap();
            assert_eq!(ports(&path), [5], "the new file holds the next line");
            assert_eq!(ports(&file(".1")), [1, 2, 3, 4]);
            assert_eq!(
                backups()[1..],
                ["one", "two"],
                "the next rotation fills the gap"
            );
        }
    }

    /// A rotation whose renames wait for the disk (held here at a gate)
    /// does not hold up the writer: after [`ROTATE_WAIT`] lines go on into
    /// the current file, and the first line after the rotation is done
    /// starts the new one. Nothing is lost or reordered.
    #[test]
    fn a_rotation_stuck_on_the_disk_never_holds_up_the_writer() {
        let dir = scratch("stuck");
        let path = dir.join("flows.jsonl");
        let line = serde_json::to_string(&flow_n(1)).unwrap().len() as u64 + 1;
        let mut ex = ExportFile::open(&path, 3 * line, 2).unwrap();
        assert!(ex.ahead.is_some(), "a regular file gets a helper thread");
        let gate = Arc::new(Gate::default());
        ex.names.gate = Some(gate.clone());
        // Three lines fill the file; the fourth asks for the rotation,
        // which waits at the gate (up to 30 s: a writer making the
        // renames itself would wait that long, and the rotation would be
        // done before the assertions below).
        for n in 1..=10 {
            ex.write(&flow_n(n)).unwrap();
        }
        ex.flush().unwrap();
        assert!(
            !dir.join("flows.jsonl.1").exists(),
            "the writer went on before the renames (still held)"
        );
        assert_eq!(ports(&path), (1..=10).collect::<Vec<_>>());
        gate.open();
        ex.ahead.as_ref().unwrap().wait_rotation();
        ex.write(&flow_n(11)).unwrap();
        ex.flush().unwrap();
        assert_eq!(
            ports(&dir.join("flows.jsonl.1")),
            (1..=10).collect::<Vec<_>>()
        );
        assert_eq!(ports(&path), [11]);
        assert_eq!(ex.stats.errors.load(Ordering::Relaxed), 0);
    }

    /// A write-behind call stuck on the disk (the helper thread that makes
    /// them held at a gate, up to 30 s) holds up no rotation: the renames
    /// are another thread's. The writer waits up to 30 s for the rotation
    /// here, so a rotation queued behind the held call would be answered
    /// only once the hold gave up, and the hold would not be pending.
    #[test]
    fn a_write_behind_call_stuck_on_the_disk_never_holds_up_a_rotation() {
        let dir = scratch("behind-stuck");
        let path = dir.join("flows.jsonl");
        let mut one = Vec::new();
        crate::flow::json::write_flow(&mut one, &flow_n(1));
        let line = one.len() as u64 + 1;
        let mut ex = open_waiting(&path, 3 * line, 2);
        let gate = Arc::new(Gate::default());
        let ahead = ex
            .ahead
            .as_ref()
            .expect("a regular file gets helper threads");
        ahead.hold(gate.clone());
        for n in 1..=4 {
            ex.write(&flow_n(n)).unwrap();
        }
        ex.flush().unwrap();
        let ahead = ex.ahead.as_ref().unwrap();
        // The hold, and any write-behind step the writes queued behind it.
        assert!(
            ahead.behind_pending() >= 1,
            "the write-behind thread was let go before the rotation was done"
        );
        assert_eq!(ports(&dir.join("flows.jsonl.1")), [1, 2, 3]);
        assert_eq!(ports(&path), [4]);
        gate.open();
        ahead.settle();
        assert_eq!(ex.stats.errors.load(Ordering::Relaxed), 0);
    }

    /// A tmpfs of `size` mounted on a fresh directory, unmounted on drop
    /// (also when the test fails). Needs root, which CI has: without it the
    /// test fails saying so, it never skips.
    struct Tmpfs(TestDir);

    impl Tmpfs {
        fn mount(name: &str, size: &str) -> Self {
            // SAFETY: geteuid has no preconditions.
            let uid = unsafe { libc::geteuid() };
            assert_eq!(
                uid, 0,
                "this test mounts a tmpfs to fill it: run it as root (CI does), not as uid {uid}"
            );
            let dir = scratch(name);
            let st = std::process::Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size}"),
                    "flowaudit-test",
                ])
                .arg(dir.path())
                .status()
                .expect("mount(8)");
            assert!(st.success(), "mount -t tmpfs on {}: {st}", dir.display());
            Self(dir)
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
            // The directory goes next, with the field.
        }
    }

    /// Every line of `p` is a whole flow event and the file ends with one.
    fn assert_whole_lines(p: &Path, when: &str) -> usize {
        let bytes = std::fs::read(p).unwrap();
        assert!(
            bytes.is_empty() || bytes.ends_with(b"\n"),
            "{when}: {} ends inside a line: ...{:?}",
            p.display(),
            String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(80)..])
        );
        let text = String::from_utf8(bytes).expect("UTF-8");
        for (i, l) in text.lines().enumerate() {
            serde_json::from_str::<FlowEvent>(l)
                .unwrap_or_else(|e| panic!("{when}: line {} is torn ({e}): {l:?}", i + 1));
        }
        text.lines().count()
    }

    #[test]
    fn a_full_disk_never_leaves_a_torn_line() {
        let fs = Tmpfs::mount("full", "64k");
        let path = fs.0.join("flows.jsonl");
        // Ballast, freed later to let writes succeed again.
        std::fs::write(fs.0.join("ballast"), vec![0u8; 16 * 1024]).unwrap();
        let mut ex = ExportFile::open(&path, 1 << 20, 2).unwrap();
        let mut failures = 0;
        for _ in 0..400 {
            failures += u64::from(ex.write(&flow()).is_err()) + u64::from(ex.flush().is_err());
        }
        assert!(failures > 0, "64 KiB should have filled up");
        assert_eq!(
            ex.stats.errors.load(Ordering::Relaxed),
            failures,
            "each failure counted"
        );
        assert!(
            ex.stats.flows_lost.load(Ordering::Relaxed) >= failures,
            "and the flows it cost"
        );
        let before = assert_whole_lines(&path, "disk full");
        // The agent stops while the disk is full: nothing torn stays behind.
        drop(ex);
        assert_eq!(assert_whole_lines(&path, "after the agent stopped"), before);
        // Room again: writing resumes, after whole lines only.
        std::fs::remove_file(fs.0.join("ballast")).unwrap();
        let mut ex = ExportFile::open(&path, 1 << 20, 2).unwrap();
        ex.write(&flow()).unwrap();
        ex.flush().unwrap();
        assert_eq!(assert_whole_lines(&path, "after recovery"), before + 1);
    }

    /// The sink hands flows to its writer thread: every one reaches the
    /// file, in order, across batches and bursts, by the time the sink is
    /// dropped (the agent stopping), and the pipeline's thread wrote none.
    #[test]
    fn the_sink_writes_every_flow_in_order_on_its_own_thread() {
        use crate::pipeline::Sink;
        let dir = TestDir::new("fa-export-sink");
        let path = dir.join("flows.jsonl");
        let mut sink = ExportFileSink::new(ExportFile::open(&path, u64::MAX, 0).unwrap()).unwrap();
        let n = 3 * SINK_BATCH as u64 + 7;
        for i in 0..n {
            let mut f = flow();
            f.socket.cookie = i;
            sink.on_flow(&Arc::new(f));
            if i % 500 == 0 {
                sink.flush();
            }
        }
        let writer = sink.writer.as_ref().unwrap().thread().id();
        assert_ne!(writer, std::thread::current().id());
        drop(sink);
        let text = std::fs::read_to_string(&path).unwrap();
        let cookies: Vec<u64> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("whole JSON lines");
                v["socket"]["cookie"].as_u64().expect("a cookie")
            })
            .collect();
        assert_eq!(cookies, (0..n).collect::<Vec<_>>(), "every flow, in order");
    }

    /// A writer that cannot keep up (here: writing into a pipe nobody
    /// reads) never holds up the pipeline: it takes a backlog of
    /// `SINK_QUEUE_FLOWS`, the flows after that are left out of the file
    /// and counted, and once the writer makes room again the file goes on
    /// with the flows that come then. Every flow is in the file or counted.
    /// The writer counts as caught up (and is logged so once) when half its
    /// backlog is written, not at the first pass it has room for.
    #[test]
    fn a_stalled_writer_costs_the_file_flows_and_never_holds_up_the_pipeline() {
        use crate::pipeline::Sink;
        use std::io::Read;
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::OpenOptionsExt;
        use std::time::{Duration, Instant};

        let dir = TestDir::new("fa-export-stalled");
        let path = dir.join("flows.pipe");
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; mkfifo creates the pipe's name only.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
        // The reading end, opened first so that the writer's open does not
        // wait for one; nothing reads it yet.
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let file = ExportFile::open(&path, u64::MAX, 0).unwrap();
        let stats = file.stats.clone();
        let mut sink = ExportFileSink::new(file).unwrap();
        // The pipe holds one page: the writer blocks within its first batch
        // (each batch is 1,000 flows, over a MiB of lines), so it finishes
        // none and the backlog it takes is exactly SINK_QUEUE_FLOWS.
        // SAFETY: fcntl on an open descriptor; it only sizes the pipe.
        let sized = unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
        assert!(
            sized >= 4096,
            "F_SETPIPE_SZ: {}",
            std::io::Error::last_os_error()
        );
        let n = (SINK_QUEUE_FLOWS + 3 * SINK_BATCH + 5) as u64;
        let flow_n = |i: u64| {
            let mut f = flow();
            f.socket.cookie = i;
            Arc::new(f)
        };
        // The pipeline's side, on a thread of its own so that a sink that
        // waits for its writer fails the test instead of hanging it.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let feeder = std::thread::spawn(move || {
            for i in 0..n {
                sink.on_flow(&flow_n(i));
                if i % 1000 == 999 {
                    sink.flush();
                }
            }
            sink.flush();
            let _ = done_tx.send(());
            sink
        });
        done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the pipeline handed over every flow without waiting for the stalled writer");
        let mut sink = feeder.join().unwrap();
        let (behind_then, lost_then) = (
            stats.flows_behind.load(Ordering::Relaxed),
            stats.flows_lost.load(Ordering::Relaxed),
        );
        // Read the pipe until the writer has finished one batch; a failing
        // check from here on drops the sink, which waits for its writer, so
        // the pipe is read to its end below before any check.
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(60);
        while sink.queued.load(Ordering::Acquire) >= SINK_QUEUE_FLOWS && Instant::now() < deadline {
            match (&reader).read(&mut chunk) {
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("reading the pipe: {e}"),
            }
        }
        let room_then =
            SINK_QUEUE_FLOWS - sink.queued.load(Ordering::Acquire).min(SINK_QUEUE_FLOWS);
        // Room for a pass, far from half the backlog written: still behind.
        for i in n..n + 10 {
            sink.on_flow(&flow_n(i));
        }
        sink.flush();
        let still_behind = sink.behind.is_some();
        // SAFETY: fcntl on an open descriptor; it clears O_NONBLOCK.
        unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, 0) };
        let rest = std::thread::spawn(move || {
            let mut rest = Vec::new();
            (&reader).read_to_end(&mut rest).map(|_| rest)
        });
        let behind = n - SINK_QUEUE_FLOWS as u64;
        assert_eq!(
            behind_then, behind,
            "what did not fit in the backlog is counted"
        );
        assert_eq!(lost_then, 0, "no write failed");
        assert!(
            room_then > 0,
            "the writer finished a batch once its pipe was read"
        );
        assert!(
            still_behind,
            "not caught up while more than half the backlog waits ({room_then} flows of room)"
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while sink.queued.load(Ordering::Acquire) > 0 {
            assert!(Instant::now() < deadline, "the writer never caught up");
            std::thread::sleep(Duration::from_millis(5));
        }
        for i in n + 10..n + 20 {
            sink.on_flow(&flow_n(i));
        }
        sink.flush();
        assert!(
            sink.behind.is_none(),
            "caught up once the backlog was written"
        );
        // The agent stopping: the writer writes what it has and closes the pipe.
        drop(sink);
        bytes.extend(rest.join().unwrap().expect("reading the pipe"));
        let cookies: Vec<u64> = bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_slice(l).expect("whole JSON lines");
                v["socket"]["cookie"].as_u64().expect("a cookie")
            })
            .collect();
        let expected: Vec<u64> = (0..SINK_QUEUE_FLOWS as u64).chain(n..n + 20).collect();
        assert_eq!(
            cookies.len(),
            expected.len(),
            "the backlog and the flows after the writer made room"
        );
        assert!(cookies == expected, "in order, the left-out ones missing");
        assert_eq!(
            stats.flows_behind.load(Ordering::Relaxed),
            behind,
            "nothing more left out once the writer had room"
        );
        assert_eq!(
            cookies.len() as u64 + behind,
            n + 20,
            "every flow in the file or counted"
        );
    }

    #[test]
    fn unwritable_path_is_a_clear_error() {
        let err = ExportFile::open(Path::new("/proc/flowaudit/flows.jsonl"), 1 << 20, 1)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("/proc/flowaudit/flows.jsonl"),
            "{err}"
        );
    }

    /// Pages of `file` in the page cache, per 1 MiB of `[from, to)` summed
    /// (mincore on a mapping of it; mapping reads nothing in).
    fn resident_pages(file: &File, from: u64, to: u64) -> usize {
        use std::os::fd::AsRawFd;
        let page = 4096usize;
        let len = (to - from) as usize;
        // SAFETY: a read-only shared mapping of an open file, unmapped below;
        // mincore writes one byte per page into a vector of that length.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                from as i64,
            );
            assert_ne!(map, libc::MAP_FAILED, "mmap the export file");
            let mut vec = vec![0u8; len.div_ceil(page)];
            let r = libc::mincore(map, len, vec.as_mut_ptr());
            libc::munmap(map, len);
            assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
            vec.iter().filter(|&&b| b & 1 != 0).count()
        }
    }

    /// A directory on the disk the workspace is on (/tmp may be a tmpfs,
    /// whose pages are the file and never leave).
    fn disk_dir(name: &str) -> TestDir {
        TestDir::under(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-export"),
            name,
        )
    }

    /// Waits until the helper thread made the write-behind steps handed to it.
    fn settle(ex: &ExportFile) {
        if let Some(a) = &ex.ahead {
            a.settle();
        }
    }

    /// Bytes of disk blocks `p` holds.
    fn allocated(p: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map_or(0, |m| m.blocks() * 512)
    }

    /// Waits (at most 30 s) until the helper thread made the spare.
    fn wait_spare(ex: &ExportFile, spare: &Path) {
        let a = ex.ahead.as_ref().unwrap_or_else(|| {
            panic!(
                "no helper thread allocates ahead for {}: is the test directory on tmpfs?",
                ex.names.path.display()
            )
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !a.spare_ready() {
            assert!(
                std::time::Instant::now() < deadline,
                "no spare at {} after 30 s (its file system may not take fallocate: the agent then allocates nothing ahead, but this test needs a disk that does, as CI's ext4)",
                spare.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn rotation_moves_onto_a_spare_whose_blocks_were_allocated_ahead() {
        use std::os::unix::fs::MetadataExt;
        let dir = disk_dir("ahead");
        let path = dir.join("flows.jsonl");
        let spare = dir.join(".flows.jsonl.spare");
        let max = 1u64 << 20;
        let mut ex = open_waiting(&path, max, 3);
        wait_spare(&ex, &spare);
        // The spare: empty, its blocks allocated; so is the current file
        // (allocated first).
        let meta = std::fs::metadata(&spare).expect("the spare file");
        assert_eq!(meta.len(), 0, "a spare is empty: readers see no bytes");
        assert!(
            allocated(&spare) >= max,
            "the spare holds {} bytes of blocks, not {max}",
            allocated(&spare)
        );
        assert!(
            allocated(&path) >= max,
            "the current file holds {} bytes of blocks ahead, not {max}",
            allocated(&path)
        );
        let spare_inode = meta.ino();
        // Write until the file rotates: the spare takes the file's name.
        while !dir.join("flows.jsonl.1").exists() {
            ex.write(&flow()).unwrap();
        }
        ex.flush().unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().ino(),
            spare_inode,
            "the rotation renamed the spare into place"
        );
        // The next spare is made for the next rotation.
        wait_spare(&ex, &spare);
        assert_ne!(std::fs::metadata(&spare).unwrap().ino(), spare_inode);
        assert_eq!(ex.stats.errors.load(Ordering::Relaxed), 0);
        // Stopping gives back what was allocated and not written, and the spare.
        drop(ex);
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len > 0 && len < max);
        assert!(
            allocated(&path) < len + (64 << 10),
            "after the agent stops, the current file holds {} bytes of blocks for {len} bytes of lines",
            allocated(&path)
        );
        assert!(!spare.exists(), "the spare is removed when the agent stops");
        let lines = assert_whole_lines(&dir.join("flows.jsonl.1"), "rotated")
            + assert_whole_lines(&path, "current");
        assert!(lines > 2);
    }

    #[test]
    fn nothing_is_allocated_ahead_on_tmpfs() {
        // tmpfs blocks are memory: the agent's memory limit.
        let fs = Tmpfs::mount("ahead-tmpfs", "8m");
        let path = fs.0.join("flows.jsonl");
        let line = serde_json::to_string(&flow()).unwrap().len() as u64 + 1;
        let mut ex = open_waiting(&path, line, 1);
        assert!(
            ex.ahead.as_ref().is_some_and(|a| !a.allocates()),
            "the helper thread allocates nothing ahead on tmpfs"
        );
        // It still makes the rotation.
        ex.write(&flow()).unwrap();
        ex.write(&flow()).unwrap();
        ex.flush().unwrap();
        assert!(!fs.0.join(".flows.jsonl.spare").exists());
        assert_eq!(assert_whole_lines(&path, "tmpfs"), 1);
        assert_eq!(
            assert_whole_lines(&fs.0.join("flows.jsonl.1"), "tmpfs .1"),
            1
        );
        drop(ex);
        assert!(!fs.0.join(".flows.jsonl.spare").exists());
    }

    #[test]
    fn written_windows_leave_the_page_cache_behind_the_writer() {
        let dir = disk_dir("behind");
        let path = dir.join("flows.jsonl");
        let mut ex = ExportFile::open(&path, 1 << 40, 1).unwrap();
        let window = WRITE_BEHIND;
        let fill = |ex: &mut ExportFile, to: u64| {
            while ex.on_disk + (ex.pending.len() as u64) < to {
                ex.write(&flow()).unwrap();
            }
            ex.flush().unwrap();
        };
        // The first window: its writing to disk starts; wait until it is on disk.
        fill(&mut ex, window + 1);
        settle(&ex);
        assert_eq!(
            ex.behind.started, ex.on_disk,
            "writing the first window was started"
        );
        File::open(&path).unwrap().sync_data().unwrap();
        let reader = File::open(&path).unwrap();
        let first = resident_pages(&reader, 0, window);
        assert!(first > 0, "the lines just written are in the page cache");
        // The second window: the first one (on disk by now) leaves the cache.
        fill(&mut ex, 2 * window + 2);
        settle(&ex);
        let total = (window / 4096) as usize;
        let first_after = resident_pages(&reader, 0, window);
        let second = resident_pages(&reader, window + 4096, 2 * window);
        assert!(
            first_after * 20 < total,
            "the first window is dropped once the file has grown past the second: {first_after} of {total} pages still cached (were {first})"
        );
        assert!(
            second * 2 > total,
            "the window being written stays cached: {second} of {total} pages"
        );
        assert_eq!(ex.stats.errors.load(Ordering::Relaxed), 0);
        // Every line is still there, whole.
        drop(ex);
        drop(reader);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() as u64 > 2 * window);
        for l in text.lines() {
            serde_json::from_str::<FlowEvent>(l).expect("every line is a whole event");
        }
    }

    #[test]
    fn a_device_without_a_page_cache_takes_the_lines_without_errors() {
        // /dev/null has no page cache to drop: write-behind turns itself off
        // (or does nothing) and no write fails.
        let mut ex = ExportFile::open(Path::new("/dev/null"), 1 << 40, 0).unwrap();
        let mut written = 0u64;
        while written < 3 * WRITE_BEHIND {
            let before = ex.on_disk + ex.pending.len() as u64;
            ex.write(&flow()).unwrap();
            written += ex.on_disk + ex.pending.len() as u64 - before;
        }
        ex.flush().unwrap();
        assert_eq!(ex.stats.errors.load(Ordering::Relaxed), 0);
        assert_eq!(ex.stats.flows_lost.load(Ordering::Relaxed), 0);
    }
}
