//! The embedded backend: one SQLite file in WAL mode, written by one thread.
//!
//! [`SqliteStore::open`] applies the schema migrations and starts the writer
//! thread, which group-commits enqueued messages (see `writer`). Reads run on
//! a small pool of separate connections; WAL lets them proceed while the
//! writer commits, and lets a second process (the CLI) read the same file.
//!
//! This backend assumes it is the only writer of its file. Several nodes
//! sharing one queue is the postgres backend's job.

mod checkpoint;
mod directory;
mod read;
mod read_pool;
mod schema;
mod writer;

pub use read_pool::ReadPool;
pub use schema::migrate_with;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mailroom_core::config::StoreConfig;
use mailroom_core::{Intake, IntakeError, MessageId, NewMessage};
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::{
    AttemptRecord, ListQuery, MessageSummary, PendingRecipient, RecipientUpdate, Store, StoreError,
    StoredMessage,
};
use writer::{Arrivals, Change, Pending, Request};

/// How long a connection waits for a lock held by another connection (the
/// CLI reading while the server writes, a checkpoint) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Page cache per connection, in KiB. SQLite's default is 2 MiB; the writer
/// gets a little more because it touches the hot index pages on every
/// commit. Kept small so the whole server fits its memory budget: the OS page
/// cache holds the file anyway.
const WRITER_CACHE_KIB: i64 = 4096;
const READER_CACHE_KIB: i64 = 2048;

/// Idle read connections kept for reuse; more are opened when needed and
/// closed after use.
const MAX_IDLE_READERS: usize = 4;

/// Page size of a new database. Bodies are stored inline, so a message of
/// 100 KB spans 25 pages of SQLite's default 4 KiB, each its own WAL frame
/// (two writes, a checksum) and each copied again by the checkpoint; at
/// 16 KiB the same message costs a quarter of that. Measured with
/// `bench/smtp.sh` (W3, 100 KB): 25 % less server CPU per message, 17 % more
/// messages per second; W1 (1 KB) measured the same at 4, 16 and 32 KiB.
/// An existing database keeps the page size it was created with.
const PAGE_SIZE: i64 = 16 * 1024;

/// After a checkpoint, truncate the WAL file back to this size, so one burst
/// does not leave a large file behind.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Tuning for [`SqliteStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Most messages committed in one transaction.
    pub max_batch: usize,
    /// Enqueue requests waiting for the writer before `enqueue` waits too:
    /// backpressure instead of an unbounded buffer.
    pub queue_depth: usize,
    /// WAL size, in bytes, at which it is folded back into the database.
    /// Four times SQLite's default (1000 pages of 4 KiB), so hot pages
    /// written by many commits are copied back once per checkpoint, not
    /// once per few commits.
    pub checkpoint_bytes: u64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            max_batch: 512,
            queue_depth: 4096,
            checkpoint_bytes: checkpoint::CHECKPOINT_BYTES,
        }
    }
}

impl From<&StoreConfig> for SqliteOptions {
    fn from(config: &StoreConfig) -> Self {
        SqliteOptions {
            max_batch: config.max_batch,
            ..SqliteOptions::default()
        }
    }
}

/// The SQLite store. Cheap to clone: every clone shares one writer thread
/// and one read pool. The writer ends after [`close`](Self::close), or once
/// the last clone is dropped (after committing what was already sent).
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    requests: mpsc::Sender<Request>,
    arrivals: Arc<Arrivals>,
    closing: AtomicBool,
    /// Resolves (with an error: the sender is dropped) when the writer thread
    /// has finished. `None` once a `close` has seen it.
    writer_exited: tokio::sync::Mutex<Option<oneshot::Receiver<()>>>,
    readers: ReadPool,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("closing", &self.inner.closing.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (or creates) the database file at `path`, migrates it to this
    /// build's schema and starts the writer thread. The directory must exist.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path)?;
        let checkpoint_frames = configure_writer(&conn, &options)?;
        let version = schema::migrate(&mut conn)?;
        let (requests, rx) = mpsc::channel(options.queue_depth.max(1));
        let (exited_tx, exited_rx) = oneshot::channel();
        let arrivals = Arrivals::new();
        let checkpoint_conn = Connection::open(path)?;
        checkpoint_conn.busy_timeout(BUSY_TIMEOUT)?;
        // A checkpoint fsyncs the WAL before copying and the database after.
        checkpoint_conn.pragma_update(None, "synchronous", "FULL")?;
        writer::spawn(
            conn,
            checkpoint_conn,
            rx,
            arrivals.clone(),
            options.max_batch.max(1),
            checkpoint_frames,
            exited_tx,
        )?;
        tracing::info!(path = %path.display(), schema_version = version, "store opened");
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                requests,
                arrivals,
                closing: AtomicBool::new(false),
                writer_exited: tokio::sync::Mutex::new(Some(exited_rx)),
                readers: ReadPool::new(path.to_owned(), READER_CACHE_KIB, MAX_IDLE_READERS),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Stops taking new messages (they get [`StoreError::ShuttingDown`]),
    /// waits until everything already handed over is committed and the
    /// writer thread has exited, and folds the WAL into the database.
    /// Reads keep working afterwards. Safe to call more than once and from
    /// several clones; every call returns only after the writer is gone.
    pub async fn close(&self) {
        self.inner.closing.store(true, Ordering::Release);
        // Other clones keep the channel open, so the writer is told in-band;
        // it fails if the writer is already gone, which is what we want.
        let _ = self.inner.requests.send(Request::Shutdown).await;
        let mut exited = self.inner.writer_exited.lock().await;
        if let Some(rx) = exited.take() {
            let _ = rx.await;
        }
    }

    /// A message's envelope, recipient states and attempts, without its
    /// content (which stays empty): what a status view needs, in one read.
    pub fn status(
        &self,
        id: &MessageId,
    ) -> Result<Option<(StoredMessage, Vec<AttemptRecord>)>, StoreError> {
        self.read(|conn| {
            let Some(message) = read::get(conn, id, false)? else {
                return Ok(None);
            };
            Ok(Some((message, read::attempts(conn, id)?)))
        })
    }

    /// Runs `f` on a pooled read connection.
    fn read<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.inner.readers.with(f)
    }
}

impl Store for SqliteStore {
    async fn enqueue(&self, message: NewMessage) -> Result<(), StoreError> {
        if self.inner.closing.load(Ordering::Acquire) {
            return Err(StoreError::ShuttingDown);
        }
        let pending = Box::new(Pending::new(message)?);
        let (reply, answer) = oneshot::channel();
        if self
            .inner
            .requests
            .send(Request::Enqueue(pending, reply))
            .await
            .is_err()
        {
            return Err(self.gone());
        }
        self.inner.arrivals.sent();
        answer.await.unwrap_or_else(|_| Err(self.gone()))
    }

    fn get(&self, id: &MessageId) -> Result<Option<StoredMessage>, StoreError> {
        self.read(|conn| read::get(conn, id, true))
    }

    fn list(&self, query: &ListQuery) -> Result<Vec<MessageSummary>, StoreError> {
        self.read(|conn| read::list(conn, query))
    }

    fn count(&self) -> Result<u64, StoreError> {
        self.read(|conn| read::count(conn))
    }

    fn pending(&self) -> Result<Vec<PendingRecipient>, StoreError> {
        self.read(|conn| read::pending(conn))
    }

    async fn update(&self, updates: Vec<RecipientUpdate>) -> Result<u64, StoreError> {
        self.change(Change::Update {
            updates,
            only_pending: false,
        })
        .await
    }

    async fn update_pending(&self, updates: Vec<RecipientUpdate>) -> Result<u64, StoreError> {
        self.change(Change::Update {
            updates,
            only_pending: true,
        })
        .await
    }

    async fn delete(&self, id: MessageId) -> Result<bool, StoreError> {
        Ok(self.change(Change::Delete(id.to_string())).await? > 0)
    }

    fn attempts(&self, id: &MessageId) -> Result<Vec<AttemptRecord>, StoreError> {
        self.read(|conn| read::attempts(conn, id))
    }
}

impl SqliteStore {
    /// Hands a change to the writer and waits for its commit.
    async fn change(&self, change: Change) -> Result<u64, StoreError> {
        if self.inner.closing.load(Ordering::Acquire) {
            return Err(StoreError::ShuttingDown);
        }
        let (reply, answer) = oneshot::channel();
        if self
            .inner
            .requests
            .send(Request::Change(change, reply))
            .await
            .is_err()
        {
            return Err(self.gone());
        }
        answer.await.unwrap_or_else(|_| Err(self.gone()))
    }

    /// Why the writer is not answering: closed on purpose, or it died.
    fn gone(&self) -> StoreError {
        if self.inner.closing.load(Ordering::Acquire) {
            StoreError::ShuttingDown
        } else {
            StoreError::WriterStopped
        }
    }
}

impl Intake for SqliteStore {
    async fn submit(&self, message: NewMessage) -> Result<(), IntakeError> {
        self.enqueue(message).await.map_err(|e| match e {
            StoreError::ShuttingDown => IntakeError::ShuttingDown,
            other => IntakeError::Store(other.to_string()),
        })
    }
}

/// Sets up the write connection; returns the WAL size, in frames, at which
/// a checkpoint starts.
fn configure_writer(conn: &Connection, options: &SqliteOptions) -> Result<u32, StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Only takes effect on a new file (before WAL mode is set).
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    let page_size: i64 = conn.pragma_query_value(None, "page_size", |row| row.get(0))?;
    let page_size = u64::try_from(page_size).unwrap_or(4096).max(512);
    let checkpoint_frames = u32::try_from(options.checkpoint_bytes / page_size)
        .unwrap_or(u32::MAX)
        .max(1);
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        // Still durable with a rollback journal and synchronous=FULL, only
        // slower and without concurrent readers.
        tracing::warn!(journal_mode = %mode, "store: WAL mode unavailable");
    }
    // Durability: a message is acknowledged once its COMMIT returns, so the
    // commit must be on stable storage by then. In WAL mode synchronous=NORMAL
    // only fsyncs at checkpoints: a power loss can drop the last commits, i.e.
    // mail we already answered 250 for. FULL fsyncs the WAL on every commit;
    // group commit is what makes that affordable.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
    // Savepoint journals (one per message in a batch) stay in memory.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Until the checkpoint thread takes over (see `checkpoint`).
    conn.pragma_update(None, "wal_autocheckpoint", i64::from(checkpoint_frames))?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;
    Ok(checkpoint_frames)
}
