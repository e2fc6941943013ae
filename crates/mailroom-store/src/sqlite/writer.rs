//! The writer thread: group commit of enqueued messages.
//!
//! Exactly one thread owns the write connection. Producers send requests over
//! a bounded channel; the thread takes whatever is waiting (up to a batch
//! limit), writes it in one `BEGIN IMMEDIATE ... COMMIT`, and only then
//! answers each producer. One fsync therefore covers every message that
//! arrived while the previous commit was on its way to disk, so throughput
//! grows with concurrency instead of being capped by the disk's sync latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use mailroom_core::{MessageId, NewMessage};
use rusqlite::{Connection, ErrorCode, Statement, ffi, params};
use tokio::sync::{mpsc, oneshot};

use super::checkpoint::Checkpointer;
use crate::{RecipientUpdate, StoreError};

/// Stop draining the channel once a batch holds this much content, so a
/// burst of large messages does not pin hundreds of MiB in memory at once.
const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// Longest wait for more producers before committing a batch smaller than
/// the previous one. Small next to an fsync (milliseconds on most disks), so
/// it costs little latency and saves whole commits.
const GATHER_WINDOW: Duration = Duration::from_micros(500);

/// Counts the messages handed to the writer, so that while it gathers a
/// batch it can sleep until the one that completes the batch arrives: one
/// wake-up per batch, where polling the channel would cost one per poll.
#[derive(Default)]
pub(crate) struct Arrivals {
    /// Enqueue requests placed in the channel, ever.
    sent: AtomicU64,
    /// The value of `sent` at which the gathering writer wants waking;
    /// `u64::MAX` while it is not gathering.
    wake_at: AtomicU64,
    writer: OnceLock<Thread>,
}

impl Arrivals {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Arrivals {
            wake_at: AtomicU64::new(u64::MAX),
            ..Arrivals::default()
        })
    }

    /// Called by a producer once its enqueue request is in the channel.
    pub(crate) fn sent(&self) {
        // SeqCst on both sides: either the writer sees this count before it
        // parks, or this producer sees the writer's `wake_at` and unparks it.
        let sent = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
        if sent == self.wake_at.load(Ordering::SeqCst)
            && let Some(writer) = self.writer.get()
        {
            writer.unpark();
        }
    }
}

pub(crate) type Reply = oneshot::Sender<Result<(), StoreError>>;
/// Answers a change with the number of rows it touched.
pub(crate) type ChangeReply = oneshot::Sender<Result<u64, StoreError>>;

/// A change to messages already stored.
pub(crate) enum Change {
    /// New recipient states, each with the attempt that led to it; with
    /// `only_pending`, recipients no longer queued or deferred (held or
    /// bounced by an operator meanwhile) are left alone.
    Update {
        updates: Vec<RecipientUpdate>,
        only_pending: bool,
    },
    /// Removes a message, its recipients and its attempts.
    Delete(String),
    /// Tenant data (accounts, keys): run inside a savepoint, so a broken
    /// constraint (a duplicate name) fails this change alone.
    Directory(DirectoryWrite),
}

/// A write to tenant data, run on the writer's connection.
pub(crate) type DirectoryWrite = Box<dyn Fn(&Connection) -> rusqlite::Result<u64> + Send>;

pub(crate) enum Request {
    /// Boxed: a `Pending` is a few hundred bytes, and every channel slot
    /// would otherwise be that large.
    Enqueue(Box<Pending>, Reply),
    /// Delivery results, holds, deletions: committed with the next batch.
    Change(Change, ChangeReply),
    /// Sent by `close`: stop taking requests, commit what is queued, exit.
    Shutdown,
}

/// A message prepared for the writer. The encoding work happens here, on the
/// producer's task, to keep the single writer thread busy only with SQLite.
pub(crate) struct Pending {
    id: String,
    origin: String,
    size: i64,
    /// JSON of the tags and metadata; `None` when empty, as most mail is.
    tags: Option<String>,
    metadata: Option<String>,
    message: NewMessage,
}

impl Pending {
    pub(crate) fn new(message: NewMessage) -> Result<Self, StoreError> {
        if message.envelope.recipients.is_empty() {
            return Err(StoreError::Invalid(format!(
                "message {} has no recipients",
                message.id
            )));
        }
        let origin = serde_json::to_string(&message.origin)
            .map_err(|e| StoreError::Invalid(format!("origin cannot be encoded: {e}")))?;
        let size = i64::try_from(message.content.len())
            .map_err(|_| StoreError::Invalid("message too large".into()))?;
        let meta = &message.meta;
        let encode = |what: &str, value: Result<String, serde_json::Error>| {
            value.map_err(|e| StoreError::Invalid(format!("{what} cannot be encoded: {e}")))
        };
        let tags = (!meta.tags.is_empty())
            .then(|| encode("tags", serde_json::to_string(&meta.tags)))
            .transpose()?;
        let metadata = (!meta.metadata.is_empty())
            .then(|| encode("metadata", serde_json::to_string(&meta.metadata)))
            .transpose()?;
        Ok(Pending {
            id: message.id.to_string(),
            origin,
            size,
            tags,
            metadata,
            message,
        })
    }

    fn message_id(&self) -> MessageId {
        self.message.id
    }
}

/// Starts the writer thread. `exited` is dropped when the thread ends (after
/// the final checkpoint), which is what `close` waits for.
pub(crate) fn spawn(
    conn: Connection,
    checkpoint_conn: Connection,
    rx: mpsc::Receiver<Request>,
    arrivals: Arc<Arrivals>,
    max_batch: usize,
    checkpoint_frames: u32,
    exited: oneshot::Sender<()>,
) -> std::io::Result<()> {
    thread::Builder::new()
        .name("mailroom-store-writer".into())
        .spawn(move || {
            let _ = arrivals.writer.set(thread::current());
            let checkpointer = match Checkpointer::start(&conn, checkpoint_conn, checkpoint_frames)
            {
                Ok(checkpointer) => Some(checkpointer),
                Err(e) => {
                    // SQLite's own checkpoint in the commit stays in place.
                    tracing::warn!(error = %e, "store: no checkpoint thread");
                    None
                }
            };
            run(&conn, rx, &arrivals, checkpointer, max_batch);
            // Close the connection before signalling, so `close` returns with
            // the database file closed by this thread.
            drop(conn);
            drop(exited);
        })?;
    Ok(())
}

fn run(
    conn: &Connection,
    mut rx: mpsc::Receiver<Request>,
    arrivals: &Arrivals,
    mut checkpointer: Option<Checkpointer>,
    max_batch: usize,
) {
    let mut batch = Batch {
        messages: Vec::with_capacity(max_batch),
        replies: Vec::with_capacity(max_batch),
        changes: Vec::new(),
        bytes: 0,
        received: 0,
    };
    let mut last_batch = 0;
    let mut wrote = false;
    let mut inserts = Inserts::default();
    // `None` once every sender is gone, or after `Shutdown` closed the channel
    // and everything already in it was taken.
    while let Some(first) = rx.blocking_recv() {
        batch.bytes = 0;
        batch.add(first, &mut rx);
        batch.drain(&mut rx, max_batch);
        // Producers wait for their answer before sending again, so right
        // after a commit only the quickest are back and a commit now would
        // carry a handful of messages, leaving the rest for the next fsync:
        // batches alternate large and small. Waiting briefly for as many
        // producers as the last batch answered keeps batches full. Under low
        // load the last batch was small and there is no wait.
        let target = last_batch.min(max_batch);
        if batch.replies.len() < target {
            batch.gather(&mut rx, arrivals, target, max_batch);
        }
        last_batch = batch.replies.len();
        if batch.replies.is_empty() && batch.changes.is_empty() {
            continue;
        }
        wrote = true;
        let started = Instant::now();
        let (changes, change_replies): (Vec<_>, Vec<_>) = batch.changes.drain(..).unzip();
        let (results, change_results) = write_all(conn, &mut inserts, &batch.messages, &changes);
        // SQLite has copied the content; free it before answering.
        batch.messages.clear();
        for (reply, result) in change_replies.into_iter().zip(change_results) {
            let _ = reply.send(result);
        }
        tracing::trace!(
            messages = last_batch,
            micros = started.elapsed().as_micros() as u64,
            "store: batch written"
        );
        for (reply, result) in batch.replies.drain(..).zip(results) {
            // The producer may have given up waiting; the message is stored
            // regardless, which is the safe side to err on.
            let _ = reply.send(result);
        }
        if let Some(checkpointer) = &checkpointer {
            checkpointer.after_commit(conn);
        }
    }
    drop(inserts);
    // Before the final checkpoint, which a pass under way would block.
    if let Some(checkpointer) = &mut checkpointer {
        checkpointer.stop();
    }
    // A store opened only to read (the CLI next to a running server) leaves
    // the WAL alone: a TRUNCATE checkpoint takes the write lock and would
    // stall the server's commits while it copies pages.
    if wrote {
        checkpoint(conn);
    }
}

/// The requests taken for the next commit; the vectors are reused.
struct Batch {
    messages: Vec<Pending>,
    replies: Vec<Reply>,
    changes: Vec<(Change, ChangeReply)>,
    bytes: usize,
    /// Enqueue requests taken from the channel, ever (see [`Arrivals`]).
    received: u64,
}

impl Batch {
    /// Takes what is already waiting, up to the batch limits.
    fn drain(&mut self, rx: &mut mpsc::Receiver<Request>, max_batch: usize) {
        while self.replies.len() < max_batch && self.bytes <= MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(request) => self.add(request, rx),
                Err(_) => break,
            }
        }
    }

    /// Sleeps until the batch holds `target` messages, it is as large as a
    /// batch may be, or [`GATHER_WINDOW`] has passed.
    fn gather(
        &mut self,
        rx: &mut mpsc::Receiver<Request>,
        arrivals: &Arrivals,
        target: usize,
        max_batch: usize,
    ) {
        let deadline = Instant::now() + GATHER_WINDOW;
        let wake_at = self.received + (target - self.replies.len()) as u64;
        arrivals.wake_at.store(wake_at, Ordering::SeqCst);
        loop {
            self.drain(rx, max_batch);
            if self.replies.len() >= target || self.bytes > MAX_BATCH_BYTES || rx.is_closed() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if arrivals.sent.load(Ordering::SeqCst) < wake_at {
                thread::park_timeout(deadline - now);
            }
        }
        arrivals.wake_at.store(u64::MAX, Ordering::SeqCst);
    }

    fn add(&mut self, request: Request, rx: &mut mpsc::Receiver<Request>) {
        match request {
            Request::Enqueue(pending, reply) => {
                self.received += 1;
                self.bytes += pending.message.content.len();
                self.messages.push(*pending);
                self.replies.push(reply);
            }
            Request::Change(change, reply) => self.changes.push((change, reply)),
            // Senders are refused from now on; requests already in the
            // channel are still received and committed.
            Request::Shutdown => rx.close(),
        }
    }
}

/// Writes `messages` in one transaction and returns one result per message,
/// in order. A message that breaks a constraint (a duplicate id) fails alone;
/// any other error fails the whole batch, since it means the transaction or
/// the disk is in trouble and nothing in it can be trusted to commit.
#[cfg(test)]
pub(crate) fn write_batch(conn: &Connection, messages: &[Pending]) -> Vec<Result<(), StoreError>> {
    write_all(conn, &mut Inserts::default(), messages, &[]).0
}

/// One result per message written, one per change applied.
pub(crate) type BatchResults = (Vec<Result<(), StoreError>>, Vec<Result<u64, StoreError>>);

/// Writes new messages and changes in one transaction: one result per
/// message and one per change, in order.
pub(crate) fn write_all<'c>(
    conn: &'c Connection,
    inserts: &mut Inserts<'c>,
    messages: &[Pending],
    changes: &[Change],
) -> BatchResults {
    let n = messages.len();
    let inserted = match begin(conn).and_then(|()| insert_all(conn, inserts, messages)) {
        Ok(results) => Ok(results),
        Err(Failure::Batch(e)) => Err(e),
        Err(Failure::Message(_)) => {
            // A message broke a constraint half way through its rows. Rare
            // (a duplicate id), so only then is the batch written again with
            // a savepoint around each message, which costs a copy of every
            // page a message touches.
            rollback(conn);
            exec(conn, "BEGIN IMMEDIATE").and_then(|()| insert_each(conn, inserts, messages))
        }
    };
    let (mut results, mut batch_error) = match inserted {
        Ok(results) => (results, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let mut change_results = Vec::with_capacity(changes.len());
    for change in changes {
        if batch_error.is_some() {
            break;
        }
        match apply_change(conn, change) {
            Ok(result) => change_results.push(result),
            Err(e) => batch_error = Some(e),
        }
    }
    let batch_error = match batch_error {
        Some(e) => Some(e),
        None => exec(conn, "COMMIT").err(),
    };
    if let Some(e) = batch_error {
        tracing::error!(error = %e, messages = n, "store: batch not committed");
        rollback(conn);
        let e = StoreError::from(e);
        results = vec![Err(e.clone()); n];
        change_results = vec![Err(e); changes.len()];
    }
    (results, change_results)
}

fn begin(conn: &Connection) -> Result<(), Failure> {
    exec(conn, "BEGIN IMMEDIATE").map_err(Failure::Batch)
}

/// The common case: every message goes in with no savepoint. A message whose
/// idempotency key is taken writes nothing and fails alone; any constraint
/// broken after a first row is written ends the attempt with
/// `Failure::Message`, and the caller starts over with [`insert_each`].
fn insert_all<'c>(
    conn: &'c Connection,
    inserts: &mut Inserts<'c>,
    messages: &[Pending],
) -> Result<Vec<Result<(), StoreError>>, Failure> {
    let mut results = Vec::with_capacity(messages.len());
    for pending in messages {
        if !claim_idempotency_key(conn, pending).map_err(Failure::Batch)? {
            results.push(Err(StoreError::IdempotencyKeyTaken));
            continue;
        }
        insert_rows(conn, inserts, pending).map_err(|e| constraint_failure(e, pending))?;
        results.push(Ok(()));
    }
    Ok(results)
}

/// Each message in its own savepoint, so one that breaks a constraint
/// leaves no trace and the rest of the batch still commits.
fn insert_each<'c>(
    conn: &'c Connection,
    inserts: &mut Inserts<'c>,
    messages: &[Pending],
) -> rusqlite::Result<Vec<Result<(), StoreError>>> {
    let mut results = Vec::with_capacity(messages.len());
    for pending in messages {
        match insert_one(conn, inserts, pending) {
            Ok(()) => results.push(Ok(())),
            Err(Failure::Message(e)) => {
                tracing::warn!(message_id = %pending.message_id(), error = %e, "store: message not stored");
                results.push(Err(e));
            }
            Err(Failure::Batch(e)) => return Err(e),
        }
    }
    Ok(results)
}

/// Outer `Err`: the batch cannot go on; inner `Err`: this change failed alone.
fn apply_change(conn: &Connection, change: &Change) -> rusqlite::Result<Result<u64, StoreError>> {
    match change {
        Change::Update {
            updates,
            only_pending,
        } => {
            let mut rows = 0;
            let mut state = conn.prepare_cached(if *only_pending {
                "UPDATE recipients SET state = ?3, next_attempt_at = ?4, \
                 last_reply = COALESCE(?5, last_reply), attempts = attempts + ?6 \
                 WHERE message_id = ?1 AND idx = ?2 AND state IN ('queued', 'deferred')"
            } else {
                "UPDATE recipients SET state = ?3, next_attempt_at = ?4, \
                 last_reply = COALESCE(?5, last_reply), attempts = attempts + ?6 \
                 WHERE message_id = ?1 AND idx = ?2"
            })?;
            let mut attempt = conn.prepare_cached(
                "INSERT INTO attempts (message_id, idx, at, outcome, mx_host, ip, tls, code, reply, duration_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for u in updates {
                let id = u.message_id.to_string();
                let changed = state.execute(params![
                    id,
                    u.idx,
                    u.state.as_str(),
                    u.next_attempt_at,
                    u.last_reply,
                    i64::from(u.attempt.is_some()),
                ])?;
                rows += changed as u64;
                if changed > 0
                    && let Some(a) = &u.attempt
                {
                    attempt.execute(params![
                        id,
                        u.idx,
                        a.at,
                        u.state.as_str(),
                        a.mx_host,
                        a.ip,
                        a.tls,
                        a.code,
                        a.reply,
                        a.duration_ms as i64,
                    ])?;
                }
            }
            Ok(Ok(rows))
        }
        Change::Delete(id) => {
            let rows = conn
                .prepare_cached("DELETE FROM messages WHERE id = ?1")?
                .execute(params![id])?;
            Ok(Ok(rows as u64))
        }
        Change::Directory(write) => apply_directory(conn, write),
    }
}

/// Runs a directory write in a savepoint: a broken constraint fails this
/// change alone (outer `Err`: the batch cannot go on).
fn apply_directory(
    conn: &Connection,
    write: &DirectoryWrite,
) -> rusqlite::Result<Result<u64, StoreError>> {
    exec(conn, "SAVEPOINT directory")?;
    match write(conn) {
        Ok(rows) => {
            exec(conn, "RELEASE directory")?;
            Ok(Ok(rows))
        }
        Err(e) if e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation) => {
            exec(conn, "ROLLBACK TO directory")?;
            exec(conn, "RELEASE directory")?;
            Ok(Err(StoreError::Conflict(e.to_string())))
        }
        Err(e) => Err(e),
    }
}

enum Failure {
    /// Only this message failed; the transaction goes on without it.
    Message(StoreError),
    /// The transaction cannot go on.
    Batch(rusqlite::Error),
}

/// Inserts one message inside a savepoint, so a failure half way through its
/// recipients leaves no trace of it and the rest of the batch still commits.
fn insert_one<'c>(
    conn: &'c Connection,
    inserts: &mut Inserts<'c>,
    pending: &Pending,
) -> Result<(), Failure> {
    exec(conn, "SAVEPOINT message").map_err(Failure::Batch)?;
    match claim_idempotency_key(conn, pending) {
        Ok(true) => {}
        Ok(false) => {
            exec(conn, "ROLLBACK TO message")
                .and_then(|()| exec(conn, "RELEASE message"))
                .map_err(Failure::Batch)?;
            return Err(Failure::Message(StoreError::IdempotencyKeyTaken));
        }
        Err(e) => return Err(Failure::Batch(e)),
    }
    match insert_rows(conn, inserts, pending).map_err(|e| constraint_failure(e, pending)) {
        Ok(()) => exec(conn, "RELEASE message").map_err(Failure::Batch),
        Err(Failure::Message(e)) => {
            exec(conn, "ROLLBACK TO message")
                .and_then(|()| exec(conn, "RELEASE message"))
                .map_err(Failure::Batch)?;
            Err(Failure::Message(e))
        }
        Err(batch) => Err(batch),
    }
}

/// A broken constraint fails the message (a taken primary key is a
/// duplicate id); any other error fails the batch.
fn constraint_failure(e: rusqlite::Error, pending: &Pending) -> Failure {
    if e.sqlite_error_code() != Some(ErrorCode::ConstraintViolation) {
        return Failure::Batch(e);
    }
    let primary_key = e
        .sqlite_error()
        .is_some_and(|f| f.extended_code == ffi::SQLITE_CONSTRAINT_PRIMARYKEY);
    Failure::Message(if primary_key {
        StoreError::DuplicateId(pending.message_id())
    } else {
        e.into()
    })
}

/// Records the message's idempotency key, if it has one; false when the key
/// is already taken (by a request that raced this one).
fn claim_idempotency_key(conn: &Connection, pending: &Pending) -> rusqlite::Result<bool> {
    let Some(record) = &pending.message.meta.idempotency else {
        return Ok(true);
    };
    let inserted = conn
        .prepare_cached(
            "INSERT INTO idempotency_keys (scope, key, request_hash, status, response, \
             message_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT DO NOTHING",
        )?
        .execute(params![
            record.scope,
            record.key,
            record.request_hash,
            record.status,
            record.response,
            pending.id,
            pending.message.received_at,
        ])?;
    Ok(inserted == 1)
}

/// The two statements every message runs, prepared on first use and kept
/// for the writer's life: looking them up in rusqlite's statement cache
/// (hashing the SQL, resetting on return) cost more than binding them.
#[derive(Default)]
pub(crate) struct Inserts<'c> {
    message: Option<Statement<'c>>,
    recipient: Option<Statement<'c>>,
}

impl<'c> Inserts<'c> {
    fn message(&mut self, conn: &'c Connection) -> rusqlite::Result<&mut Statement<'c>> {
        prepared(&mut self.message, conn, INSERT_MESSAGE)
    }

    fn recipient(&mut self, conn: &'c Connection) -> rusqlite::Result<&mut Statement<'c>> {
        prepared(&mut self.recipient, conn, INSERT_RECIPIENT)
    }
}

fn prepared<'s, 'c>(
    slot: &'s mut Option<Statement<'c>>,
    conn: &'c Connection,
    sql: &str,
) -> rusqlite::Result<&'s mut Statement<'c>> {
    match slot {
        Some(statement) => Ok(statement),
        empty @ None => Ok(empty.insert(conn.prepare(sql)?)),
    }
}

const INSERT_MESSAGE: &str = "INSERT INTO messages (id, received_at, reverse_path, env_id, ret, \
     body_type, smtputf8, priority, origin, size, content, account_id, tags, metadata) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";

const INSERT_RECIPIENT: &str = "INSERT INTO recipients (message_id, idx, address, orcpt, notify, \
     next_attempt_at, state, last_reply, route) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

fn insert_rows<'c>(
    conn: &'c Connection,
    inserts: &mut Inserts<'c>,
    pending: &Pending,
) -> rusqlite::Result<()> {
    let m = &pending.message;
    let env = &m.envelope;
    inserts.message(conn)?.execute(params![
        pending.id,
        m.received_at,
        env.reverse_path.as_ref().map(|a| a.as_str()),
        env.env_id,
        env.ret.map(|r| r.as_str()),
        env.body_type.as_str(),
        env.smtputf8,
        env.priority,
        pending.origin,
        pending.size,
        m.content.as_slice(),
        m.meta.account,
        pending.tags,
        pending.metadata,
    ])?;
    // New recipients are due at once (next_attempt_at = received_at) unless
    // the sender asked for later. Those kept in the local store are
    // delivered by being stored.
    let due = m
        .meta
        .not_before
        .unwrap_or(m.received_at)
        .max(m.received_at);
    let insert = inserts.recipient(conn)?;
    for (idx, r) in env.recipients.iter().enumerate() {
        let kept = m.kept_locally.contains(&(idx as u32));
        insert.execute(params![
            pending.id,
            idx,
            r.address.as_str(),
            r.orcpt,
            r.notify.bits(),
            (!kept).then_some(due),
            if kept { "delivered" } else { "queued" },
            kept.then_some(KEPT_LOCALLY),
            m.meta.routes.get(&(idx as u32)),
        ])?;
    }
    Ok(())
}

/// The last reply recorded for a recipient kept in the local store.
pub(crate) const KEPT_LOCALLY: &str = "250 2.0.0 Kept in the local mailbox";

fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Some errors (a full disk, an I/O error) make SQLite roll back on its own,
/// so only roll back when a transaction is still open.
fn rollback(conn: &Connection) {
    if !conn.is_autocommit()
        && let Err(e) = exec(conn, "ROLLBACK")
    {
        tracing::error!(error = %e, "store: rollback failed");
    }
}

/// Folds the WAL back into the database and truncates it, so a stopped server
/// leaves one self-contained file. Best effort: a reader holding a snapshot
/// only means the WAL stays until the next start.
fn checkpoint(conn: &Connection) {
    let result = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
        Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
    });
    match result {
        Ok((0, _)) => tracing::debug!("store: WAL checkpointed at shutdown"),
        Ok((_, frames)) => {
            tracing::debug!(
                frames,
                "store: WAL checkpoint at shutdown was blocked by a reader"
            )
        }
        Err(e) => tracing::warn!(error = %e, "store: WAL checkpoint at shutdown failed"),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use mailroom_core::{Address, BodyType, Envelope, Notify, Origin, Recipient};

    use super::*;

    fn message() -> NewMessage {
        NewMessage {
            id: MessageId::new(),
            received_at: 1,
            envelope: Envelope {
                reverse_path: None,
                recipients: vec![Recipient {
                    address: Address::parse("a@example.test").unwrap(),
                    orcpt: None,
                    notify: Notify::empty(),
                }],
                env_id: None,
                ret: None,
                body_type: BodyType::SevenBit,
                smtputf8: false,
                priority: 0,
            },
            origin: Origin {
                protocol: "http".into(),
                remote_ip: Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                helo: None,
                auth_user: None,
                tls: None,
            },
            content: b"x".to_vec(),
            kept_locally: Vec::new(),
            meta: Default::default(),
        }
    }

    /// A database with the schema in place, in `dir`.
    fn migrated(dir: &tempfile::TempDir) -> Connection {
        let mut conn = Connection::open(dir.path().join("db")).unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        conn
    }

    fn pending(messages: impl IntoIterator<Item = NewMessage>) -> Vec<Pending> {
        messages
            .into_iter()
            .map(|m| Pending::new(m).unwrap())
            .collect()
    }

    fn count(conn: &Connection, table: &str) -> i64 {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_duplicate_in_a_batch_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let conn = migrated(&dir);
        let stored = message();
        let results = write_batch(&conn, &[Pending::new(stored.clone()).unwrap()]);
        assert!(matches!(results[..], [Ok(())]));

        let mut duplicate = stored.clone();
        duplicate
            .envelope
            .recipients
            .push(duplicate.envelope.recipients[0].clone());
        let batch = pending([message(), duplicate, message()]);
        let results = write_batch(&conn, &batch);
        assert!(matches!(
            results[..],
            [Ok(()), Err(StoreError::DuplicateId(id)), Ok(())] if id == stored.id
        ));
        assert_eq!(count(&conn, "messages"), 3);
        // The duplicate's extra recipient was not added to the stored message.
        assert_eq!(count(&conn, "recipients"), 3);
        assert!(conn.is_autocommit());
    }

    fn keyed(key: &str) -> NewMessage {
        let mut m = message();
        m.meta.idempotency = Some(mailroom_core::IdempotencyRecord {
            scope: "admin".into(),
            key: key.into(),
            request_hash: "h".into(),
            status: 202,
            response: "{}".into(),
        });
        m
    }

    #[test]
    fn a_taken_idempotency_key_fails_alone_without_a_retry() {
        let dir = tempfile::tempdir().unwrap();
        let conn = migrated(&dir);
        let batch = pending([keyed("k1"), keyed("k1"), message()]);
        let results = write_batch(&conn, &batch);
        assert!(matches!(
            results[..],
            [Ok(()), Err(StoreError::IdempotencyKeyTaken), Ok(())]
        ));
        assert_eq!(count(&conn, "messages"), 2);
        assert_eq!(count(&conn, "idempotency_keys"), 1);
    }

    #[test]
    fn a_duplicate_after_a_claimed_key_leaves_the_rest_of_the_batch_intact() {
        let dir = tempfile::tempdir().unwrap();
        let conn = migrated(&dir);
        let stored = message();
        write_batch(&conn, &[Pending::new(stored.clone()).unwrap()]);

        // The duplicate claims a key before its row fails: the retry with
        // savepoints must not keep that key, and must keep everything else.
        let mut duplicate = keyed("dup");
        duplicate.id = stored.id;
        let batch = pending([keyed("k1"), keyed("k1"), duplicate, keyed("k2")]);
        let results = write_batch(&conn, &batch);
        assert!(matches!(
            results[..],
            [
                Ok(()),
                Err(StoreError::IdempotencyKeyTaken),
                Err(StoreError::DuplicateId(id)),
                Ok(())
            ] if id == stored.id
        ));
        assert_eq!(count(&conn, "messages"), 3);
        let keys: Vec<String> = conn
            .prepare("SELECT key FROM idempotency_keys ORDER BY key")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(keys, ["k1", "k2"]);
        assert!(conn.is_autocommit());
    }

    #[test]
    fn a_failed_commit_fails_every_message() {
        let dir = tempfile::tempdir().unwrap();
        let conn = migrated(&dir);
        // A read-only connection makes every insert fail the way a broken disk would.
        conn.pragma_update(None, "query_only", true).unwrap();
        let batch = pending([message(), message()]);
        let results = write_batch(&conn, &batch);
        assert_eq!(results.len(), 2);
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(StoreError::Sqlite(_))))
        );
        assert!(conn.is_autocommit());
        conn.pragma_update(None, "query_only", false).unwrap();
        assert_eq!(count(&conn, "messages"), 0);
    }
}
