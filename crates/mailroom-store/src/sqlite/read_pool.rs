//! Read-only connections to one SQLite file in WAL mode, kept for reuse.
//! Used by the queue store and by the capture inbox, each next to the one
//! writer thread that owns its file.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use rusqlite::{Connection, OpenFlags};

use super::BUSY_TIMEOUT;

/// A pool of read connections: one is taken per call and put back after,
/// unless `max_idle` are already waiting.
pub struct ReadPool {
    path: PathBuf,
    cache_kib: i64,
    max_idle: usize,
    idle: Mutex<Vec<Connection>>,
}

impl ReadPool {
    /// No connection is opened until the first call; `cache_kib` is each
    /// connection's page cache.
    pub fn new(path: PathBuf, cache_kib: i64, max_idle: usize) -> Self {
        ReadPool {
            path,
            cache_kib,
            max_idle,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` on a pooled connection, opening one if none is idle.
    pub fn with<T, E: From<rusqlite::Error>>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        let pooled = self.idle().pop();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => self.open()?,
        };
        let result = f(&mut conn);
        // A connection left inside a transaction by a failure is not reused.
        if conn.is_autocommit() {
            let mut idle = self.idle();
            if idle.len() < self.max_idle {
                idle.push(conn);
            }
        }
        result
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Connection>> {
        // A plain Vec: a panic elsewhere while holding the lock cannot leave
        // it inconsistent.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        // No CREATE: the writer created the file; a missing file is an error.
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Read-write at the file level (it must use the WAL's shared memory),
        // but refused any write, so a bug here cannot race the writer thread.
        conn.pragma_update(None, "query_only", true)?;
        conn.pragma_update(None, "cache_size", -self.cache_kib)?;
        Ok(conn)
    }
}
