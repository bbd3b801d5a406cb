//! The export file's disk blocks, allocated ahead of its writer on a thread
//! of their own.
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
//! Not on tmpfs or ramfs, whose blocks are memory (the agent's memory
//! limit), nor for a file that is not a regular file (a pipe, a device). A
//! file system without `fallocate` turns it off, once, with a debug line.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc;

use super::file::BehindStep;

/// Of each file, at most this much is allocated ahead: a `--export-file-
/// max-size-mb` of gigabytes still gets its first part ahead, and the disk
/// holds at most this much more than the lines in it (the spare, and the
/// unwritten rest of the current file until the agent stops).
pub const AHEAD_MAX: u64 = 256 << 20;

/// The spare's state.
const NONE: u8 = 0;
const MAKING: u8 = 1;
const READY: u8 = 2;

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
}

/// Write-behind steps handed over and not made yet, at most: beyond, the
/// next steps are left out (each holds a descriptor of the file; the kernel
/// writes the pages back on its own), so a helper stuck on a dead disk
/// cannot pile them up.
const BEHIND_QUEUE: usize = 64;

pub struct Ahead {
    spare: PathBuf,
    state: Arc<AtomicU8>,
    /// Write-behind steps handed over, not made yet.
    behind_queued: Arc<AtomicUsize>,
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
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
    /// Starts allocating ahead for the export file `path`, open as
    /// `current` with `on_disk` bytes, whose files grow to `max_bytes`;
    /// `None` where it would not help (see the module's text) or the
    /// thread could not start.
    pub fn start(path: &Path, current: &File, on_disk: u64, max_bytes: u64) -> Option<Self> {
        let regular = current.metadata().is_ok_and(|m| m.file_type().is_file());
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !regular || in_memory(dir) {
            return None;
        }
        let len = max_bytes.min(AHEAD_MAX);
        // Beside the file: a rename within one directory, one file system.
        let spare = super::file::hidden_beside(path, "spare");
        let state = Arc::new(AtomicU8::new(MAKING));
        let (tx, rx) = mpsc::channel::<Job>();
        let behind_queued = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (spare, state, queued) = (spare.clone(), state.clone(), behind_queued.clone());
            std::thread::Builder::new()
                .name("export-file-ahead".into())
                .spawn(move || helper(rx, &spare, &state, &queued, len))
        };
        let thread = match thread {
            Ok(t) => t,
            Err(error) => {
                tracing::debug!(%error, "export file: no thread to allocate its blocks ahead; the writer allocates them");
                return None;
            }
        };
        if on_disk < len
            && let Ok(f) = current.try_clone()
        {
            let _ = tx.send(Job::Current(f, on_disk));
        }
        let _ = tx.send(Job::Spare);
        Some(Self {
            spare,
            state,
            behind_queued,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// At a rotation: the spare's path when it is ready (the caller renames
    /// it into place, then asks for the next with [`Ahead::want_spare`]);
    /// `None` when it is still being made (the caller makes a plain file,
    /// without waiting).
    pub fn take_spare(&mut self) -> Option<PathBuf> {
        let taken = self
            .state
            .compare_exchange(READY, NONE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        taken.then(|| self.spare.clone())
    }

    /// After a rotation: asks for the next spare, unless one is being made.
    /// A spare whose making failed (a full disk) is asked for again here.
    pub fn want_spare(&self) {
        if self
            .state
            .compare_exchange(NONE, MAKING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            && let Some(tx) = &self.tx
        {
            let _ = tx.send(Job::Spare);
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
    /// Waits for an allocation under way, then removes the spare.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.spare);
    }
}

/// The helper thread: runs the jobs until the sender is dropped.
fn helper(
    rx: mpsc::Receiver<Job>,
    spare: &Path,
    state: &AtomicU8,
    behind_queued: &AtomicUsize,
    len: u64,
) {
    let off = AtomicBool::new(false);
    let unsupported = |e: &std::io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
        )
    };
    let failed = |what: &str, e: std::io::Error| {
        if unsupported(&e) {
            off.store(true, Ordering::Relaxed);
            tracing::debug!(error = %e, "export file: its file system cannot allocate blocks ahead (fallocate); the writer allocates them");
        } else {
            tracing::debug!(error = %e, "export file: could not allocate {what} ahead; the writer allocates its blocks");
        }
    };
    let mut behind_failed = false;
    while let Ok(job) = rx.recv() {
        if let Job::Behind(file, step) = &job {
            // Best effort, as on the writer (see `WriteBehind`).
            let done = step.run(file);
            behind_queued.fetch_sub(1, Ordering::AcqRel);
            if let Err(error) = done
                && !std::mem::replace(&mut behind_failed, true)
            {
                tracing::debug!(%error, "export file: write-behind failed (its pages stay in the page cache until the kernel writes them)");
            }
            continue;
        }
        if off.load(Ordering::Relaxed) {
            state.store(NONE, Ordering::Release);
            continue;
        }
        match job {
            Job::Behind(..) => {}
            Job::Current(file, from) => {
                if let Err(e) = allocate(&file, from, len.saturating_sub(from)) {
                    failed("the current file", e);
                }
            }
            Job::Spare => {
                let _ = std::fs::remove_file(spare);
                let made = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(spare)
                    .and_then(|f| allocate(&f, 0, len));
                match made {
                    Ok(()) => state.store(READY, Ordering::Release),
                    Err(e) => {
                        let _ = std::fs::remove_file(spare);
                        state.store(NONE, Ordering::Release);
                        failed("the next file", e);
                    }
                }
            }
        }
    }
}
