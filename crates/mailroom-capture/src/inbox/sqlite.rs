//! The inbox file: schema, the writer thread and the read pool.
//!
//! The conventions are the store's (`mailroom-store`'s sqlite backend): WAL,
//! `synchronous=FULL`, migrations counted in `PRAGMA user_version`, one
//! writer thread that group-commits, read-only pooled connections for
//! reads, and every value read from the file checked (a row this build
//! cannot interpret is [`InboxError::Corrupt`], never a panic).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mailroom_core::MessageId;
use mailroom_store::sqlite::ReadPool;
use rusqlite::{Connection, Row, TransactionBehavior, params};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{Change, NewRecord, Query, Stored};

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("cannot create data_dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("inbox database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("inbox database: {0}")]
    Corrupt(String),
    #[error("the inbox file has schema version {found}; this build knows up to {supported}")]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("cannot start the inbox writer: {0}")]
    Thread(std::io::Error),
    #[error("inbox read failed: {0}")]
    Task(String),
    #[error("inbox database: {0}")]
    Write(String),
    #[error("the inbox is closed")]
    Closed,
}

const MIGRATIONS: &[&str] = &[
    // 1: one row per message. `seq` (the rowid) is the arrival order the
    // list and count retention use; the content is the last column so that
    // listing and searching never read its overflow pages. The search
    // columns hold lower-case text (Rust's Unicode lowering, which SQLite's
    // LIKE does not do) matched with instr(), so `%` and `_` in a search
    // are plain characters.
    r#"
    CREATE TABLE messages (
        seq            INTEGER PRIMARY KEY,
        id             TEXT    NOT NULL UNIQUE,
        received_at    INTEGER NOT NULL,
        envelope_from  TEXT    NOT NULL,
        envelope_to    TEXT    NOT NULL,
        helo           TEXT    NOT NULL,
        remote_addr    TEXT    NOT NULL,
        authentication TEXT    NOT NULL,
        from_header    TEXT    NOT NULL,
        to_header      TEXT    NOT NULL,
        subject        TEXT    NOT NULL,
        snippet        TEXT    NOT NULL,
        attachments    INTEGER NOT NULL,
        addresses      TEXT    NOT NULL,
        message_id     TEXT    NOT NULL,
        read           INTEGER NOT NULL,
        size           INTEGER NOT NULL,
        search_from    TEXT    NOT NULL,
        search_to      TEXT    NOT NULL,
        search_subject TEXT    NOT NULL,
        search_text    TEXT    NOT NULL,
        raw            BLOB    NOT NULL
    );
    CREATE INDEX messages_by_received_at ON messages(received_at);
    "#,
];

/// Waiting for a lock held by another connection (a checkpoint).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Rows here are whole messages: 16 KiB pages put a 1 KB message and its
/// summary on one page and a 100 KB one on seven overflow pages instead of
/// twenty-five, which took about a quarter more messages per second than
/// SQLite's 4 KiB in `bench/capture.sh` (C1 and C2).
const PAGE_SIZE: i64 = 16 * 1024;

/// Page cache per connection, in KiB: small, the OS caches the file anyway.
const WRITER_CACHE_KIB: i64 = 2048;
const READER_CACHE_KIB: i64 = 1024;

/// Idle read connections kept for reuse.
const MAX_IDLE_READERS: usize = 2;

/// Most requests committed in one transaction.
const MAX_BATCH: usize = 256;

/// The summary columns, in [`stored_row`]'s order.
const COLUMNS: &str = "id, received_at, envelope_from, envelope_to, helo, remote_addr, \
     authentication, from_header, to_header, subject, snippet, attachments, addresses, \
     message_id, read, size";

/// What the writer is asked to do; each answers with a number (rows
/// affected) once its transaction has committed.
pub(super) enum Request {
    Insert(Box<NewRecord>, Reply),
    Delete(MessageId, Reply),
    Clear(Reply),
    SetRead(MessageId, bool, Reply),
    /// Drop messages received before this (Unix milliseconds).
    Expire(i64, Reply),
    Shutdown,
}

type Reply = oneshot::Sender<Result<u64, InboxError>>;

/// Kept by the writer, read by anyone: the list answers `total` and
/// `unread` without a query.
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub(super) len: AtomicUsize,
    pub(super) unread: AtomicUsize,
}

/// Opens the file, migrates it, applies `max_messages` and starts the
/// writer thread on it.
pub(super) fn start_writer(
    path: &Path,
    max_messages: usize,
    rx: mpsc::Receiver<Request>,
    changes: broadcast::Sender<Change>,
    exited: oneshot::Sender<()>,
) -> Result<Arc<Counts>, InboxError> {
    let mut conn = Connection::open(path)?;
    configure_writer(&conn)?;
    let version = migrate(&mut conn)?;
    let mut writer = Writer {
        conn,
        max_messages,
        len: 0,
        unread: 0,
        counts: Arc::new(Counts::default()),
        changes,
    };
    writer.recount()?;
    let pruned = writer.prune_on_open()?;
    let counts = writer.counts.clone();
    tracing::info!(
        path = %path.display(),
        schema_version = version,
        messages = writer.len,
        pruned,
        "capture inbox opened"
    );
    std::thread::Builder::new()
        .name("mailroom-inbox".into())
        .spawn(move || {
            writer.run(rx);
            let _ = exited.send(());
        })
        .map_err(InboxError::Thread)?;
    Ok(counts)
}

fn configure_writer(conn: &Connection) -> Result<(), InboxError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Only takes effect on a new file (before WAL mode is set).
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(journal_mode = %mode, "capture inbox: WAL mode unavailable");
    }
    // `250` means the message is in the inbox: its commit must be on disk
    // when the client hears it. Group commit keeps the fsyncs affordable.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    Ok(())
}

/// Brings the file up to the last of [`MIGRATIONS`], one transaction each, the
/// way the queue's store migrates its own file.
fn migrate(conn: &mut Connection) -> Result<i64, InboxError> {
    use mailroom_store::StoreError;
    mailroom_store::sqlite::migrate_with(conn, MIGRATIONS).map_err(|e| match e {
        StoreError::SchemaTooNew { found, supported } => {
            InboxError::SchemaTooNew { found, supported }
        }
        StoreError::Sqlite(e) => InboxError::Corrupt(e.to_string()),
        other => InboxError::Corrupt(other.to_string()),
    })
}

struct Writer {
    conn: Connection,
    max_messages: usize,
    /// Committed counts; published to `counts` after each commit.
    len: usize,
    unread: usize,
    counts: Arc<Counts>,
    changes: broadcast::Sender<Change>,
}

/// What one request did inside the transaction, applied once it commits.
#[derive(Default)]
struct Effect {
    len: isize,
    unread: isize,
    changes: Vec<Change>,
}

impl Writer {
    fn run(&mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            let shutdown = batch.iter().any(|r| matches!(r, Request::Shutdown));
            self.commit(batch);
            if shutdown {
                break;
            }
        }
        // Anything sent after the shutdown gets `Closed` when rx drops.
        if let Err(err) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
            tracing::warn!(error = %err, "capture inbox: final checkpoint failed");
        }
    }

    /// Runs every request of `batch` in one transaction (each in its own
    /// savepoint, so one failure does not undo the others) and answers
    /// them once it is committed.
    fn commit(&mut self, batch: Vec<Request>) {
        let mut done: Vec<(Reply, Result<u64, InboxError>, Effect)> = Vec::new();
        let (mut len, mut unread) = (self.len, self.unread);
        let mut tx = match self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(err) => {
                let message = err.to_string();
                for (reply, _) in batch.into_iter().filter_map(split) {
                    let _ = reply.send(Err(InboxError::Write(message.clone())));
                }
                return;
            }
        };
        for (reply, work) in batch.into_iter().filter_map(split) {
            let mut effect = Effect::default();
            let result = (|| {
                let sp = tx.savepoint()?;
                let n = apply(&sp, work, (len, unread), self.max_messages, &mut effect)?;
                sp.commit()?;
                Ok(n)
            })();
            if result.is_ok() {
                len = len.saturating_add_signed(effect.len);
                unread = unread.saturating_add_signed(effect.unread);
            } else {
                effect = Effect::default();
            }
            done.push((reply, result, effect));
        }
        match tx.commit() {
            Ok(()) => {
                self.len = len;
                self.unread = unread;
                self.publish();
                for (reply, result, effect) in done {
                    for change in effect.changes {
                        let _ = self.changes.send(change);
                    }
                    let _ = reply.send(result);
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "capture inbox: commit failed");
                let message = err.to_string();
                for (reply, _, _) in done {
                    let _ = reply.send(Err(InboxError::Write(format!("commit failed: {message}"))));
                }
                if let Err(err) = self.recount() {
                    tracing::warn!(error = %err, "capture inbox: cannot recount");
                }
            }
        }
    }

    fn recount(&mut self) -> Result<(), InboxError> {
        let (len, unread): (i64, i64) = self.conn.query_row(
            "SELECT count(*), coalesce(sum(read = 0), 0) FROM messages",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        self.len = usize::try_from(len).unwrap_or(0);
        self.unread = usize::try_from(unread).unwrap_or(0);
        self.publish();
        Ok(())
    }

    /// `max_messages` may have been lowered since the last run.
    fn prune_on_open(&mut self) -> Result<usize, InboxError> {
        let over = self.len.saturating_sub(self.max_messages);
        if over == 0 {
            return Ok(0);
        }
        let tx = self.conn.transaction()?;
        let mut effect = Effect::default();
        drop_oldest(&tx, over, &mut effect)?;
        tx.commit()?;
        self.len = self.len.saturating_add_signed(effect.len);
        self.unread = self.unread.saturating_add_signed(effect.unread);
        self.publish();
        Ok(over)
    }

    fn publish(&self) {
        self.counts.len.store(self.len, Ordering::Release);
        self.counts.unread.store(self.unread, Ordering::Release);
    }
}

/// A request without its reply channel.
enum Work {
    Insert(Box<NewRecord>),
    Delete(MessageId),
    Clear,
    SetRead(MessageId, bool),
    Expire(i64),
}

fn split(request: Request) -> Option<(Reply, Work)> {
    Some(match request {
        Request::Insert(record, reply) => (reply, Work::Insert(record)),
        Request::Delete(id, reply) => (reply, Work::Delete(id)),
        Request::Clear(reply) => (reply, Work::Clear),
        Request::SetRead(id, read, reply) => (reply, Work::SetRead(id, read)),
        Request::Expire(cutoff, reply) => (reply, Work::Expire(cutoff)),
        Request::Shutdown => return None,
    })
}

/// `counts`: the inbox's (len, unread) before this request.
fn apply(
    tx: &Connection,
    work: Work,
    (len, unread): (usize, usize),
    max_messages: usize,
    effect: &mut Effect,
) -> Result<u64, InboxError> {
    match work {
        Work::Insert(record) => {
            let NewRecord {
                stored,
                search,
                raw,
            } = *record;
            let s = &stored;
            tx.prepare_cached(
                "INSERT INTO messages (id, received_at, envelope_from, envelope_to, helo, \
                 remote_addr, authentication, from_header, to_header, subject, snippet, \
                 attachments, addresses, message_id, read, size, search_from, search_to, \
                 search_subject, search_text, raw) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 0, ?15, \
                 ?16, ?17, ?18, ?19, ?20)",
            )?
            .execute(params![
                s.id.to_string(),
                s.received_at,
                s.envelope_from,
                to_json(&s.envelope_to)?,
                s.helo,
                s.remote_addr,
                to_json(&s.authentication)?,
                s.from,
                s.to,
                s.subject,
                s.snippet,
                s.attachments as i64,
                to_json(&s.addresses)?,
                s.message_id,
                s.size as i64,
                search.from,
                search.to,
                search.subject,
                search.text,
                raw,
            ])?;
            effect.len += 1;
            effect.unread += 1;
            let over = (len + 1).saturating_sub(max_messages);
            if over > 0 {
                drop_oldest(tx, over, effect)?;
            }
            effect.changes.push(Change::New {
                message: stored.summary(),
            });
            Ok(1)
        }
        Work::Delete(id) => {
            let removed: Option<bool> = tx
                .prepare_cached("DELETE FROM messages WHERE id = ?1 RETURNING read")?
                .query_row([id.to_string()], |row| row.get(0))
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })?;
            let Some(read) = removed else {
                return Ok(0);
            };
            effect.len -= 1;
            if !read {
                effect.unread -= 1;
            }
            effect.changes.push(Change::Deleted { id: id.to_string() });
            Ok(1)
        }
        Work::Clear => {
            let n = tx.execute("DELETE FROM messages", [])?;
            effect.len = -(len as isize);
            effect.unread = -(unread as isize);
            effect.changes.push(Change::Cleared);
            Ok(n as u64)
        }
        Work::SetRead(id, read) => {
            // `read != ?2` so that only a real change moves the counter;
            // an existing message already in that state still answers 1.
            let exists: bool = tx
                .prepare_cached("SELECT count(*) FROM messages WHERE id = ?1")?
                .query_row([id.to_string()], |row| row.get::<_, i64>(0))?
                > 0;
            if !exists {
                return Ok(0);
            }
            let changed = tx
                .prepare_cached("UPDATE messages SET read = ?2 WHERE id = ?1 AND read != ?2")?
                .execute(params![id.to_string(), read])?;
            if changed > 0 {
                effect.unread += if read { -1 } else { 1 };
            }
            effect.changes.push(Change::Read {
                id: id.to_string(),
                read,
            });
            Ok(1)
        }
        Work::Expire(cutoff) => {
            let mut stmt = tx
                .prepare_cached("DELETE FROM messages WHERE received_at < ?1 RETURNING id, read")?;
            let mut rows = stmt.query([cutoff])?;
            let mut n = 0;
            while let Some(row) = rows.next()? {
                let id: String = row.get(0)?;
                let read: bool = row.get(1)?;
                note_dropped(effect, id, read);
                n += 1;
            }
            Ok(n)
        }
    }
}

/// Deletes the `n` oldest messages.
fn drop_oldest(tx: &Connection, n: usize, effect: &mut Effect) -> Result<(), InboxError> {
    let mut stmt = tx.prepare_cached(
        "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages ORDER BY seq LIMIT ?1) \
         RETURNING id, read",
    )?;
    let mut rows = stmt.query([i64::try_from(n).unwrap_or(i64::MAX)])?;
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
        let read: bool = row.get(1)?;
        note_dropped(effect, id, read);
    }
    Ok(())
}

fn note_dropped(effect: &mut Effect, id: String, read: bool) {
    effect.len -= 1;
    if !read {
        effect.unread -= 1;
    }
    effect.changes.push(Change::Deleted { id });
}

/// A JSON column.
fn to_json<T: serde::Serialize>(value: &T) -> Result<String, InboxError> {
    serde_json::to_string(value).map_err(|e| InboxError::Write(e.to_string()))
}

/// Pooled read-only connections; used from the blocking pool.
pub(super) struct Readers {
    pool: ReadPool,
}

impl Readers {
    pub(super) fn new(path: PathBuf) -> Readers {
        Readers {
            pool: ReadPool::new(path, READER_CACHE_KIB, MAX_IDLE_READERS),
        }
    }

    pub(super) fn message(&self, id: &MessageId) -> Result<Option<(Stored, Vec<u8>)>, InboxError> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS}, raw FROM messages WHERE id = ?1"
            ))?;
            let mut rows = stmt.query([id.to_string()])?;
            let Some(row) = rows.next()? else {
                return Ok(None);
            };
            let stored = stored_row(row)?;
            let raw: Vec<u8> = row.get(16)?;
            Ok(Some((stored, raw)))
        })
    }

    pub(super) fn raw(&self, id: &MessageId) -> Result<Option<Vec<u8>>, InboxError> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached("SELECT raw FROM messages WHERE id = ?1")?;
            let mut rows = stmt.query([id.to_string()])?;
            match rows.next()? {
                Some(row) => Ok(Some(row.get(0)?)),
                None => Ok(None),
            }
        })
    }

    pub(super) fn list(
        &self,
        query: &Query,
        start: usize,
        limit: usize,
    ) -> Result<(Vec<Stored>, usize), InboxError> {
        let (condition, words) = query.sql();
        let filter = if condition.is_empty() {
            String::new()
        } else {
            format!("WHERE {condition}")
        };
        self.with(|conn| {
            // One snapshot for the count and the page.
            let tx = conn.transaction()?;
            let total: i64 = tx
                .prepare_cached(&format!("SELECT count(*) FROM messages {filter}"))?
                .query_row(rusqlite::params_from_iter(&words), |row| row.get(0))?;
            let n = words.len();
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM messages {filter} ORDER BY seq DESC LIMIT ?{} OFFSET ?{}",
                n + 1,
                n + 2
            ))?;
            let mut values: Vec<rusqlite::types::Value> = words
                .iter()
                .map(|w| rusqlite::types::Value::Text((*w).to_owned()))
                .collect();
            values.push(i64::try_from(limit).unwrap_or(i64::MAX).into());
            values.push(i64::try_from(start).unwrap_or(i64::MAX).into());
            let mut rows = stmt.query(rusqlite::params_from_iter(values))?;
            let mut page = Vec::new();
            while let Some(row) = rows.next()? {
                page.push(stored_row(row)?);
            }
            drop(rows);
            drop(stmt);
            tx.commit()?;
            Ok((page, usize::try_from(total).unwrap_or(0)))
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, InboxError>,
    ) -> Result<T, InboxError> {
        self.pool.with(f)
    }
}

/// A row of [`COLUMNS`], checked.
fn stored_row(row: &Row<'_>) -> Result<Stored, InboxError> {
    let id: String = row.get(0)?;
    let id = id.parse::<MessageId>().map_err(|_| corrupt("id", &id))?;
    let json = |i: usize, column: &str| -> Result<String, InboxError> {
        row.get::<_, String>(i)
            .map_err(|_| corrupt(column, "not text"))
    };
    let count = |i: usize, column: &str| -> Result<usize, InboxError> {
        let n: i64 = row.get(i)?;
        usize::try_from(n).map_err(|_| corrupt(column, &n.to_string()))
    };
    let envelope_to = json(3, "envelope_to")?;
    let authentication = json(6, "authentication")?;
    let addresses = json(12, "addresses")?;
    Ok(Stored {
        id,
        received_at: row.get(1)?,
        envelope_from: row.get(2)?,
        envelope_to: serde_json::from_str(&envelope_to)
            .map_err(|_| corrupt("envelope_to", &envelope_to))?,
        helo: row.get(4)?,
        remote_addr: row.get(5)?,
        authentication: serde_json::from_str(&authentication)
            .map_err(|_| corrupt("authentication", &authentication))?,
        from: row.get(7)?,
        to: row.get(8)?,
        subject: row.get(9)?,
        snippet: row.get(10)?,
        attachments: count(11, "attachments")?,
        addresses: serde_json::from_str(&addresses)
            .map_err(|_| corrupt("addresses", &addresses))?,
        message_id: row.get(13)?,
        read: row.get(14)?,
        size: count(15, "size")?,
    })
}

fn corrupt(column: &str, value: &str) -> InboxError {
    let value: String = value.chars().take(80).collect();
    InboxError::Corrupt(format!("messages.{column}: cannot read {value:?}"))
}
