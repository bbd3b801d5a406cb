//! The export file's helper threads: what can wait for the disk, taken off
//! its writer (disk blocks allocated ahead and write-behind's calls on one
//! thread, the rotations' renames on another).
//!
//! A file system that allocates blocks when pages are written back (ext4's
//! delayed allocation) makes the writer allocate: its write-behind starts
//! the writeback, and a `write` waits for the inode's allocation lock while
//! a writeback holds it. Finding free blocks may read a block group's
//! bitmap from the disk, and behind a disk busy with writes that read took
//! seconds (2026-12-06, four 15 s pinned bench runs: the writer thread 17
//! to 238 samples of 10 ms in `ext4_wait_block_bitmap`, 319 to 401 block
//! allocations of its own, 1.9% to 31.7% of connections left out of the
//! file).
//! With the file's blocks allocated beforehand (`fallocate`, keeping its
//! size), the same runs had no allocation in the writer and no wait for a
//! bitmap.
//!
//! The same thread makes write-behind's calls (see `WriteBehind` in
//! `file.rs`): starting a writeback waits when the block layer throttles
//! writeback, and dropping pages from the page cache first drains every
//! CPU's page lists, which waits for a worker on each CPU; with the
//! workload's CPU busy, the writer waited there for seconds (later runs
//! of the same day: up to 456 samples in `wbt_wait`, 844 in
//! `__lru_add_drain_all`).
//!
//! So a helper thread allocates the rest of the file the agent starts on,
//! and then a spare: the next file, made under a hidden name with its
//! blocks allocated and its size 0. A rotation renames the spare into place
//! when it is ready (else it makes a new file as before, without waiting),
//! and the helper makes the next spare. Allocating inside the file being
//! written would not do: `fallocate` holds the inode's lock for as long as
//! it allocates, so the writer would wait for the bitmap all the same.
//!
//! A second thread, `export-file-rotate`, makes the rotations' renames.
//! They look names up in the directory, and behind a directory block the
//! journal is writing that lookup waited seconds (a 15 s pinned run of
//! 2026-12-06: 458 of the writer's 10 ms samples in `__ext4_find_entry`
//! under a rename, 49% of connections left out of the file). It is not the
//! first thread: a write-behind call there can wait far longer than a
//! rename (one `sync_file_range` took 12.6 s in a pinned run of
//! 2026-12-06), and a rotation queued behind it would wait as long. It
//! takes the spare when the spare's state says it is ready, and asks the
//! first thread for the next one only when none is being made, so a spare
//! is never made twice nor removed while it is renamed. At a rotation the
//! writer asks this thread, waits for its answer at most [`ROTATE_WAIT`]
//! (a rotation takes well under a millisecond when the disk is not stuck:
//! 15 µs on average, 73 µs at most, for 27 rotations of a pinned run), and
//! otherwise goes on appending to the current file until the answer
//! comes; the next line after it starts the new file. Then the file
//! renamed to `.1` takes lines for a while after the rotation, as a
//! program's log does under `logrotate` until it reopens, and the file
//! grows past its size by what came meanwhile.
//!
//! Nothing is allocated ahead on tmpfs or ramfs, whose blocks are memory
//! (the agent's memory limit); a file system without `fallocate` turns the
//! allocation off, once, with a debug line. There the helpers only make
//! the rotations and write-behind's calls. A file that is not a regular
//! file (a pipe, a device) gets no helpers.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Duration;

use super::file::{BehindStep, Names};

/// Of each file, at most this much is allocated ahead: a `--export-file-
/// max-size-mb` of gigabytes still gets its first part ahead, and the disk
/// holds at most this much more than the lines in it (the spare, and the
/// unwritten rest of the current file until the agent stops).
pub const AHEAD_MAX: u64 = 256 << 20;

/// The spare's state.
const NONE: u8 = 0;
const MAKING: u8 = 1;
const READY: u8 = 2;

/// The first thread's jobs.
enum Job {
    /// Write-behind's calls on the file being written (see
    /// [`super::file::BehindStep`]): starting a writeback can wait for the
    /// disk, so the writer hands them over.
    Behind(File, BehindStep),
    /// Allocate `[from, len)` of the file being written (the agent's first
    /// file, possibly partly written by an earlier run).
    Current(File, u64),
    /// Make the spare.
    Spare,
    /// Wait until the gate opens (tests: a write-behind call stuck on the
    /// disk).
    #[cfg(test)]
    Hold(Arc<super::file::Gate>),
}

/// How long the writer waits for a rotation it asked for before it goes on
/// appending to the current file (see the module's text).
pub const ROTATE_WAIT: Duration = Duration::from_millis(20);

/// Where the rotation the writer asked for stands.
enum Rotation {
    Idle,
    Asked,
    /// The new file, open for appending (already under the export file's
    /// name), or why the rotation failed.
    Done(std::io::Result<File>),
}

/// The rotation's state and its signal to the waiting writer.
type RotationSlot = (Mutex<Rotation>, Condvar);

/// Write-behind steps handed over and not made yet, at most: beyond, the
/// next steps are left out (each holds a descriptor of the file; the kernel
/// writes the pages back on its own), so a helper stuck on a dead disk
/// cannot pile them up.
const BEHIND_QUEUE: usize = 64;

pub struct Ahead {
    spare: PathBuf,
    /// The spare's state; the rotation thread takes the spare itself.
    #[cfg_attr(not(test), allow(dead_code))]
    state: Arc<AtomicU8>,
    rotation: Arc<RotationSlot>,
    /// Blocks are allocated ahead (not on tmpfs or ramfs).
    #[cfg_attr(not(test), allow(dead_code))]
    allocate: bool,
    /// Write-behind steps handed over, not made yet.
    behind_queued: Arc<AtomicUsize>,
    /// To the first thread (allocation, write-behind).
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// To the rotation thread.
    rotate_tx: Option<mpsc::Sender<Names>>,
    rotate_thread: Option<std::thread::JoinHandle<()>>,
}

/// Whether blocks of files in `dir` are memory (tmpfs, ramfs).
fn in_memory(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a zeroed statfs is a valid buffer for the call to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a buffer of the right type.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    let t = st.f_type as i64;
    t == TMPFS_MAGIC || t == RAMFS_MAGIC
}

/// `fallocate` keeping the size: `[from, from + len)` of `file` gets disk
/// blocks, its length stays.
fn allocate(file: &File, from: u64, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: a system call on an open descriptor; it changes no data.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            from as i64,
            len as i64,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Ahead {
    /// Starts the helper of the export file `path`, open as `current` with
    /// `on_disk` bytes, whose files grow to `max_bytes`: it allocates ahead
    /// where that helps (see the module's text); `None` for a file that is
    /// not a regular file, or when the thread could not start (the writer
    /// then does it all itself).
    pub fn start(path: &Path, current: &File, on_disk: u64, max_bytes: u64) -> Option<Self> {
        let regular = current.metadata().is_ok_and(|m| m.file_type().is_file());
        if !regular {
            return None;
        }
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let allocate = !in_memory(dir);
        let len = max_bytes.min(AHEAD_MAX);
        // Beside the file: a rename within one directory, one file system.
        let spare = super::file::hidden_beside(path, "spare");
        let state = Arc::new(AtomicU8::new(if allocate { MAKING } else { NONE }));
        let rotation = Arc::new((Mutex::new(Rotation::Idle), Condvar::new()));
        let (tx, rx) = mpsc::channel::<Job>();
        let (rotate_tx, rotate_rx) = mpsc::channel::<Names>();
        let behind_queued = Arc::new(AtomicUsize::new(0));
        let helper = Helper {
            spare: spare.clone(),
            state: state.clone(),
            behind_queued: behind_queued.clone(),
            len,
            off: !allocate,
        };
        let rotator = Rotator {
            spare: spare.clone(),
            state: state.clone(),
            rotation: rotation.clone(),
            spares: allocate.then(|| tx.clone()),
        };
        // The rotation thread holds a sender of the first thread's jobs: it
        // starts first, so that when the first cannot start, dropping the
        // senders ends it.
        let threads = std::thread::Builder::new()
            .name("export-file-rotate".into())
            .spawn(move || rotator.run(rotate_rx))
            .and_then(|r| {
                std::thread::Builder::new()
                    .name("export-file-ahead".into())
                    .spawn(move || helper.run(rx))
                    .map(|a| (a, r))
            });
        let (thread, rotate_thread) = match threads {
            Ok(t) => t,
            Err(error) => {
                tracing::debug!(%error, "export file: no helper threads; the writer allocates its blocks and rotates it itself");
                return None;
            }
        };
        if allocate {
            if on_disk < len
                && let Ok(f) = current.try_clone()
            {
                let _ = tx.send(Job::Current(f, on_disk));
            }
            let _ = tx.send(Job::Spare);
        }
        Some(Self {
            spare,
            state,
            rotation,
            allocate,
            behind_queued,
            tx: Some(tx),
            thread: Some(thread),
            rotate_tx: Some(rotate_tx),
            rotate_thread: Some(rotate_thread),
        })
    }

    /// The rotation of the files `names`: the new file when the helper has
    /// made it (already under the export file's name), or why it failed;
    /// `None` while it is under way. The first call asks the helper and
    /// waits for its answer at most `wait`; later ones only look.
    pub fn rotation(&self, names: &Names, wait: Duration) -> Option<std::io::Result<File>> {
        let (slot, done) = &*self.rotation;
        let mut r = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Rotation::Idle = *r {
            let sent = self
                .rotate_tx
                .as_ref()
                .is_some_and(|tx| tx.send(names.clone()).is_ok());
            if !sent {
                // The helper is gone: rotate here.
                return Some(names.rotate(None));
            }
            *r = Rotation::Asked;
            r = done
                .wait_timeout_while(r, wait, |r| matches!(r, Rotation::Asked))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        match std::mem::replace(&mut *r, Rotation::Idle) {
            Rotation::Done(made) => Some(made),
            other => {
                *r = other;
                None
            }
        }
    }

    /// Hands write-behind's `step` on `file` to the helper thread (or
    /// leaves it out while [`BEHIND_QUEUE`] steps wait); false when it
    /// cannot take it (the caller makes the calls itself).
    pub fn behind(&self, file: &File, step: BehindStep) -> bool {
        if self.behind_queued.load(Ordering::Acquire) >= BEHIND_QUEUE {
            return true;
        }
        let (Some(tx), Ok(file)) = (&self.tx, file.try_clone()) else {
            return false;
        };
        self.behind_queued.fetch_add(1, Ordering::AcqRel);
        if tx.send(Job::Behind(file, step)).is_ok() {
            return true;
        }
        self.behind_queued.fetch_sub(1, Ordering::AcqRel);
        false
    }

    #[cfg(test)]
    pub fn spare_ready(&self) -> bool {
        self.state.load(Ordering::Acquire) == READY
    }

    /// Whether the helper allocates ahead (not on tmpfs or ramfs).
    #[cfg(test)]
    pub fn allocates(&self) -> bool {
        self.allocate
    }

    /// Holds the first thread (allocation, write-behind) until `gate`
    /// opens, as a write-behind call stuck on the disk does (30 s at most).
    /// It counts as a write-behind step until it passes.
    #[cfg(test)]
    pub fn hold(&self, gate: Arc<super::file::Gate>) {
        let tx = self.tx.as_ref().expect("the first thread runs");
        self.behind_queued.fetch_add(1, Ordering::AcqRel);
        tx.send(Job::Hold(gate))
            .expect("the first thread takes jobs");
    }

    /// Write-behind steps (and holds) handed over and not made yet.
    #[cfg(test)]
    pub fn behind_pending(&self) -> usize {
        self.behind_queued.load(Ordering::Acquire)
    }

    /// Waits (at most 30 s) until the rotation asked for is answered.
    #[cfg(test)]
    pub fn wait_rotation(&self) {
        let (slot, done) = &*self.rotation;
        let r = slot.lock().unwrap();
        let (r, _) = done
            .wait_timeout_while(r, Duration::from_secs(30), |r| matches!(r, Rotation::Asked))
            .unwrap();
        assert!(
            !matches!(*r, Rotation::Asked),
            "the helper thread did not answer a rotation in 30 s"
        );
    }

    /// Waits (at most 30 s) until the write-behind steps handed over are made.
    #[cfg(test)]
    pub fn settle(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.behind_queued.load(Ordering::Acquire) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the helper thread made no write-behind step in 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

impl Drop for Ahead {
    /// Waits for a rotation, then an allocation, under way, then removes
    /// the spare. A new file the writer did not take yet (it is already in
    /// place, empty) gives back the blocks allocated ahead for it.
    fn drop(&mut self) {
        // The rotation thread first: it holds a sender of the first one's.
        self.rotate_tx = None;
        if let Some(t) = self.rotate_thread.take() {
            let _ = t.join();
        }
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.spare);
        let slot = &self.rotation.0;
        if let Rotation::Done(Ok(file)) = &*slot.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = file.set_len(0);
        }
    }
}

/// The first thread's side: allocation and write-behind.
struct Helper {
    spare: PathBuf,
    state: Arc<AtomicU8>,
    behind_queued: Arc<AtomicUsize>,
    /// Allocated ahead of each file, at most.
    len: u64,
    /// Nothing is allocated ahead: the file system's blocks are memory, or
    /// it has no `fallocate`.
    off: bool,
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    )
}

impl Helper {
    /// Runs the jobs until the sender is dropped.
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut behind_failed = false;
        while let Ok(job) = rx.recv() {
            match job {
                Job::Behind(file, step) => {
                    // Best effort, as on the writer (see `WriteBehind`).
                    let done = step.run(&file);
                    self.behind_queued.fetch_sub(1, Ordering::AcqRel);
                    if let Err(error) = done
                        && !std::mem::replace(&mut behind_failed, true)
                    {
                        tracing::debug!(%error, "export file: write-behind failed (its pages stay in the page cache until the kernel writes them)");
                    }
                }
                Job::Current(file, from) => {
                    if !self.off
                        && let Err(e) = allocate(&file, from, self.len.saturating_sub(from))
                    {
                        self.failed("the current file", e);
                    }
                }
                Job::Spare => self.make_spare(),
                #[cfg(test)]
                Job::Hold(gate) => {
                    gate.pass();
                    self.behind_queued.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    fn failed(&mut self, what: &str, e: std::io::Error) {
        if unsupported(&e) {
            self.off = true;
            tracing::debug!(error = %e, "export file: its file system cannot allocate blocks ahead (fallocate); the writer allocates them");
        } else {
            tracing::debug!(error = %e, "export file: could not allocate {what} ahead; the writer allocates its blocks");
        }
    }

    /// Makes the spare (unless nothing is allocated ahead): empty, its
    /// blocks allocated. One that fails (a full disk) is tried again at
    /// the next rotation. Asked for only while the state is `MAKING` (at
    /// the start, or by the rotation thread once it took the spare or
    /// found none), so no rotation renames the path it works on.
    fn make_spare(&mut self) {
        if self.off {
            self.state.store(NONE, Ordering::Release);
            return;
        }
        self.state.store(MAKING, Ordering::Release);
        let _ = std::fs::remove_file(&self.spare);
        let made = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&self.spare)
            .and_then(|f| allocate(&f, 0, self.len));
        match made {
            Ok(()) => self.state.store(READY, Ordering::Release),
            Err(e) => {
                let _ = std::fs::remove_file(&self.spare);
                self.state.store(NONE, Ordering::Release);
                self.failed("the next file", e);
            }
        }
    }
}

/// The rotation thread's side.
struct Rotator {
    spare: PathBuf,
    state: Arc<AtomicU8>,
    rotation: Arc<RotationSlot>,
    /// Where the next spare is asked for; `None` when nothing is allocated
    /// ahead (tmpfs, ramfs).
    spares: Option<mpsc::Sender<Job>>,
}

impl Rotator {
    /// Rotates the files as asked until the sender is dropped.
    fn run(self, rx: mpsc::Receiver<Names>) {
        while let Ok(names) = rx.recv() {
            let ready = self
                .state
                .compare_exchange(READY, NONE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            let made = names.rotate(ready.then_some(self.spare.as_path()));
            let (slot, done) = &*self.rotation;
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Rotation::Done(made);
            done.notify_all();
            // The next spare, unless one is being made (the first thread
            // may still be on it, or behind a write-behind call).
            if let Some(tx) = &self.spares
                && self
                    .state
                    .compare_exchange(NONE, MAKING, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                && tx.send(Job::Spare).is_err()
            {
                self.state.store(NONE, Ordering::Release);
            }
        }
    }
}
