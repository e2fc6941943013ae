//! Folding the WAL back into the database off the writer's thread.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its
//! threshold, so that commit, and every session waiting on it, waits while
//! thousands of pages are copied and the database file is fsynced: 10 to
//! 20 ms per checkpoint under load on the benchmark machine, once 200 ms.
//! Here the writer only notices that the WAL has grown (its WAL hook) and
//! wakes a thread of its own that copies in PASSIVE mode, next to the
//! writer's commits. A passive checkpoint cannot catch up with a writer that
//! keeps committing, and the WAL starts over from its beginning only once
//! every frame is copied, so after each pass the writer copies the few
//! frames committed meanwhile itself, between two batches.

use std::cell::Cell;
use std::os::raw::c_int;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

use rusqlite::Connection;
use rusqlite::hooks::Wal;

/// The default for `SqliteOptions::checkpoint_bytes`.
pub(crate) const CHECKPOINT_BYTES: u64 = 16 * 1024 * 1024;

thread_local! {
    /// Frames in the WAL after the writer thread's last commit.
    static WAL_FRAMES: Cell<i32> = const { Cell::new(0) };
}

/// Installed on the writer's connection in place of SQLite's automatic
/// checkpoint; runs on the committing thread, after each commit.
fn record_wal_frames(_: &Wal, frames: c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(frames);
    Ok(())
}

/// The writer's handle on the checkpoint thread.
pub(crate) struct Checkpointer {
    /// WAL size, in frames, that starts a pass.
    frames: i32,
    wake: Option<mpsc::SyncSender<()>>,
    /// A pass is under way: the writer does not ask for another.
    running: Arc<AtomicBool>,
    /// A pass has finished: the writer should copy what was committed
    /// meanwhile, so the WAL can start over.
    passed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread with its own connection to the database, and takes
    /// over checkpointing from SQLite on `writer`.
    pub(crate) fn start(
        writer: &Connection,
        conn: Connection,
        frames: u32,
    ) -> std::io::Result<Self> {
        let (wake, woken) = mpsc::sync_channel(1);
        let running = Arc::new(AtomicBool::new(false));
        let passed = Arc::new(AtomicBool::new(false));
        let thread = thread::Builder::new()
            .name("mailroom-store-checkpoint".into())
            .spawn({
                let running = running.clone();
                let passed = passed.clone();
                move || {
                    // Ends when the writer drops its sender.
                    while woken.recv().is_ok() {
                        match passive(&conn) {
                            Ok(()) => passed.store(true, Ordering::Release),
                            Err(e) => tracing::warn!(error = %e, "store: WAL checkpoint failed"),
                        }
                        running.store(false, Ordering::Release);
                    }
                }
            })?;
        // Replaces SQLite's automatic checkpoint, now that the thread runs.
        writer.wal_hook(Some(record_wal_frames));
        Ok(Checkpointer {
            frames: i32::try_from(frames).unwrap_or(i32::MAX).max(1),
            wake: Some(wake),
            running,
            passed,
            thread: Some(thread),
        })
    }

    /// Called by the writer between batches.
    pub(crate) fn after_commit(&self, writer: &Connection) {
        if self.passed.swap(false, Ordering::AcqRel) {
            // Few frames, committed during the pass: quick, and with nothing
            // committing meanwhile this one reaches the end of the WAL.
            if let Err(e) = passive(writer) {
                tracing::warn!(error = %e, "store: WAL checkpoint failed");
            }
            return;
        }
        if WAL_FRAMES.get() >= self.frames && !self.running.swap(true, Ordering::AcqRel) {
            let woke = self.wake.as_ref().is_some_and(|w| w.try_send(()).is_ok());
            if !woke {
                self.running.store(false, Ordering::Release);
            }
        }
    }

    /// Stops the thread, after the pass it may be in.
    pub(crate) fn stop(&mut self) {
        self.wake = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One PASSIVE checkpoint: copies what it can without waiting for anyone.
fn passive(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}
