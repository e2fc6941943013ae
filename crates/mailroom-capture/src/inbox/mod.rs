//! The inbox: captured messages kept in a SQLite file under
//! `[capture] data_dir`, newest first, with retention by count and by age,
//! search, read flags, and a broadcast of changes for the web UI's live
//! list.
//!
//! Only the raw message, a small summary and the lower-case text search
//! runs over are stored; the MIME view is parsed again when someone opens a
//! message. Nothing but two counters lives in memory, so a full inbox costs
//! disk, not RSS. The SQL, the writer thread and the read pool are in
//! [`sqlite`]; this module is the async face the intake and the HTTP layer
//! use, and the search syntax.

mod sqlite;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mailroom_core::MessageId;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::event::Authentication;
use crate::mime::{Addresses, Mime};

pub use sqlite::InboxError;
use sqlite::{Counts, Readers, Request};

/// The file under `data_dir`.
pub const FILE_NAME: &str = "inbox.sqlite3";

/// One captured message, without its content.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: MessageId,
    /// Unix milliseconds.
    pub received_at: i64,
    pub envelope_from: String,
    pub envelope_to: Vec<String>,
    pub helo: String,
    pub remote_addr: String,
    pub authentication: Authentication,
    pub from: String,
    pub to: String,
    pub subject: String,
    pub snippet: String,
    pub attachments: usize,
    /// For the Mailpit-compatible API.
    pub addresses: Addresses,
    pub message_id: String,
    pub read: bool,
    /// Octets of the message as received.
    pub size: usize,
}

/// Lower-case text the search runs over, per field.
#[derive(Debug, Default)]
struct SearchText {
    from: String,
    to: String,
    subject: String,
    text: String,
}

/// What the writer inserts: the summary, the search text and the content.
#[derive(Debug)]
struct NewRecord {
    stored: Stored,
    search: SearchText,
    /// As received, our trace header first.
    raw: Vec<u8>,
}

/// The list view of a message, and what live updates carry.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub id: String,
    pub received_at: String,
    pub from: String,
    pub to: String,
    pub envelope_from: String,
    pub envelope_to: Vec<String>,
    pub subject: String,
    pub snippet: String,
    pub size: usize,
    pub attachments: usize,
    pub read: bool,
}

/// A change, for the web UI's event stream.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Change {
    New { message: Summary },
    Deleted { id: String },
    Cleared,
    Read { id: String, read: bool },
}

/// Longest body text kept for search, per message.
const SEARCH_TEXT_MAX: usize = 16 * 1024;

/// Requests waiting for the writer before senders wait too.
const WRITER_QUEUE: usize = 1024;

/// The inbox. Reads run on the blocking pool, writes on the writer thread;
/// no method blocks the async runtime.
pub struct Inbox {
    requests: mpsc::Sender<Request>,
    readers: Arc<Readers>,
    counts: Arc<Counts>,
    max_age: Duration,
    changes: broadcast::Sender<Change>,
    writer_exited: tokio::sync::Mutex<Option<oneshot::Receiver<()>>>,
}

/// What the intake knows when it stores a message.
pub struct NewEntry<'a> {
    pub id: MessageId,
    pub received_at: i64,
    pub envelope_from: String,
    pub envelope_to: Vec<String>,
    pub helo: String,
    pub remote_addr: String,
    pub authentication: Authentication,
    pub mime: &'a Mime,
    pub raw: Vec<u8>,
}

impl Inbox {
    /// Opens (or creates) `dir/inbox.sqlite3`, migrates it, drops what is
    /// over `max_messages` and starts the writer thread.
    pub fn open(dir: &Path, max_messages: usize, max_age: Duration) -> Result<Inbox, InboxError> {
        std::fs::create_dir_all(dir).map_err(|source| InboxError::DataDir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let changes = broadcast::channel(256).0;
        let (requests, rx) = mpsc::channel(WRITER_QUEUE);
        let (exited_tx, exited_rx) = oneshot::channel();
        let counts =
            sqlite::start_writer(&path, max_messages.max(1), rx, changes.clone(), exited_tx)?;
        Ok(Inbox {
            requests,
            readers: Arc::new(Readers::new(path)),
            counts,
            max_age,
            changes,
            writer_exited: tokio::sync::Mutex::new(Some(exited_rx)),
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Stores a message; returns once it is committed (and the oldest
    /// messages over `max_messages` are gone).
    pub async fn insert(&self, entry: NewEntry<'_>) -> Result<(), InboxError> {
        let record = NewRecord::from(entry);
        self.write(|reply| Request::Insert(Box::new(record), reply))
            .await
            .map(|_| ())
    }

    /// Drops messages older than `max_age` (when set); how many.
    pub async fn expire(&self, now_millis: i64) -> Result<usize, InboxError> {
        if self.max_age.is_zero() {
            return Ok(0);
        }
        let cutoff = now_millis.saturating_sub(self.max_age.as_millis() as i64);
        self.write(|reply| Request::Expire(cutoff, reply))
            .await
            .map(|n| n as usize)
    }

    /// The message and its content.
    pub async fn message(&self, id: &str) -> Result<Option<(Stored, Vec<u8>)>, InboxError> {
        let Ok(id) = id.parse::<MessageId>() else {
            return Ok(None);
        };
        self.read(move |r| r.message(&id)).await
    }

    /// The message as received.
    pub async fn raw(&self, id: &str) -> Result<Option<Vec<u8>>, InboxError> {
        let Ok(id) = id.parse::<MessageId>() else {
            return Ok(None);
        };
        self.read(move |r| r.raw(&id)).await
    }

    /// Newest first, filtered by `query` (see [`Query`]); returns the page
    /// and the number of matches.
    pub async fn list(
        &self,
        query: &str,
        start: usize,
        limit: usize,
    ) -> Result<(Vec<Stored>, usize), InboxError> {
        let query = Query::parse(query);
        self.read(move |r| r.list(&query, start, limit)).await
    }

    pub fn len(&self) -> usize {
        self.counts.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn unread(&self) -> usize {
        self.counts.unread.load(Ordering::Acquire)
    }

    /// Whether there was such a message.
    pub async fn delete(&self, id: &str) -> Result<bool, InboxError> {
        let Ok(id) = id.parse::<MessageId>() else {
            return Ok(false);
        };
        self.write(|reply| Request::Delete(id, reply))
            .await
            .map(|n| n > 0)
    }

    pub async fn clear(&self) -> Result<(), InboxError> {
        self.write(Request::Clear).await.map(|_| ())
    }

    /// Whether there was such a message.
    pub async fn set_read(&self, id: &str, read: bool) -> Result<bool, InboxError> {
        let Ok(id) = id.parse::<MessageId>() else {
            return Ok(false);
        };
        self.write(|reply| Request::SetRead(id, read, reply))
            .await
            .map(|n| n > 0)
    }

    /// Lets the writer commit what it was given, stops it and folds the
    /// WAL into the file. Later writes fail with [`InboxError::Closed`];
    /// reads keep working.
    pub async fn close(&self) {
        let _ = self.requests.send(Request::Shutdown).await;
        if let Some(rx) = self.writer_exited.lock().await.take() {
            let _ = rx.await;
        }
    }

    async fn write(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<u64, InboxError>>) -> Request,
    ) -> Result<u64, InboxError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(request(reply))
            .await
            .map_err(|_| InboxError::Closed)?;
        answer.await.map_err(|_| InboxError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Readers) -> Result<T, InboxError> + Send + 'static,
    ) -> Result<T, InboxError> {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || f(&readers))
            .await
            .map_err(|e| InboxError::Task(e.to_string()))?
    }
}

impl From<NewEntry<'_>> for NewRecord {
    fn from(entry: NewEntry<'_>) -> Self {
        let mime = entry.mime;
        let to = mime
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("to"))
            .map(|(_, v)| v.join(", "))
            .unwrap_or_else(|| entry.envelope_to.join(", "));
        let from = mime
            .from
            .clone()
            .unwrap_or_else(|| entry.envelope_from.clone());
        let text = mime.text.as_deref().unwrap_or_default();
        let snippet: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let snippet: String = snippet.chars().take(200).collect();
        let search = SearchText {
            from: format!("{from} {}", entry.envelope_from).to_lowercase(),
            to: format!("{to} {}", entry.envelope_to.join(" ")).to_lowercase(),
            subject: mime.subject.as_deref().unwrap_or_default().to_lowercase(),
            text: text
                .chars()
                .take(SEARCH_TEXT_MAX)
                .collect::<String>()
                .to_lowercase(),
        };
        NewRecord {
            stored: Stored {
                id: entry.id,
                received_at: entry.received_at,
                envelope_from: entry.envelope_from,
                envelope_to: entry.envelope_to,
                helo: entry.helo,
                remote_addr: entry.remote_addr,
                authentication: entry.authentication,
                from,
                to,
                subject: mime.subject.clone().unwrap_or_default(),
                snippet,
                attachments: mime.attachments.len(),
                addresses: mime.addresses.clone(),
                message_id: mime.message_id.clone().unwrap_or_default(),
                read: false,
                size: entry.raw.len(),
            },
            search,
            raw: entry.raw,
        }
    }
}

impl Stored {
    pub fn summary(&self) -> Summary {
        Summary {
            id: self.id.to_string(),
            received_at: crate::event::rfc3339_millis(self.received_at),
            from: self.from.clone(),
            to: self.to.clone(),
            envelope_from: self.envelope_from.clone(),
            envelope_to: self.envelope_to.clone(),
            subject: self.subject.clone(),
            snippet: self.snippet.clone(),
            size: self.size,
            attachments: self.attachments,
            read: self.read,
        }
    }
}

/// Most search terms looked at; more are ignored (each is a bound SQL
/// parameter).
const MAX_TERMS: usize = 32;

/// A search: words separated by spaces, all of which must match
/// (case-insensitive, substring). `from:x`, `to:x`, `subject:x` look in
/// one field; a bare word looks in from, to, subject and text.
/// `"quoted words"` match as one phrase.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Query {
    terms: Vec<(Field, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Any,
    From,
    To,
    Subject,
}

impl Query {
    fn parse(query: &str) -> Query {
        let mut terms = Vec::new();
        let mut rest = query.trim();
        while !rest.is_empty() && terms.len() < MAX_TERMS {
            let (field, after) = [
                ("from:", Field::From),
                ("to:", Field::To),
                ("subject:", Field::Subject),
            ]
            .iter()
            .find_map(|(prefix, field)| {
                rest.get(..prefix.len())
                    .filter(|p| p.eq_ignore_ascii_case(prefix))
                    .map(|_| (*field, &rest[prefix.len()..]))
            })
            .unwrap_or((Field::Any, rest));
            let (word, next) = if let Some(quoted) = after.strip_prefix('"') {
                match quoted.find('"') {
                    Some(end) => (&quoted[..end], &quoted[end + 1..]),
                    None => (quoted, ""),
                }
            } else {
                match after.find(char::is_whitespace) {
                    Some(end) => (&after[..end], &after[end..]),
                    None => (after, ""),
                }
            };
            if !word.is_empty() {
                terms.push((field, word.to_lowercase()));
            }
            rest = next.trim_start();
        }
        Query { terms }
    }

    /// The SQL condition (empty: everything) and its parameters, `?1`…
    fn sql(&self) -> (String, Vec<&str>) {
        let condition = self
            .terms
            .iter()
            .enumerate()
            .map(|(i, (field, _))| {
                let n = i + 1;
                match field {
                    Field::From => format!("instr(search_from, ?{n}) > 0"),
                    Field::To => format!("instr(search_to, ?{n}) > 0"),
                    Field::Subject => format!("instr(search_subject, ?{n}) > 0"),
                    Field::Any => format!(
                        "(instr(search_from, ?{n}) > 0 OR instr(search_to, ?{n}) > 0 \
                         OR instr(search_subject, ?{n}) > 0 OR instr(search_text, ?{n}) > 0)"
                    ),
                }
            })
            .collect::<Vec<_>>()
            .join(" AND ");
        let params = self.terms.iter().map(|(_, w)| w.as_str()).collect();
        (condition, params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn add(inbox: &Inbox, from: &str, subject: &str, text: &str, at: i64) -> String {
        let mime = Mime {
            subject: Some(subject.into()),
            text: Some(text.into()),
            from: Some(from.into()),
            ..Mime::default()
        };
        let id = MessageId::new();
        inbox
            .insert(NewEntry {
                id,
                received_at: at,
                envelope_from: from.into(),
                envelope_to: vec!["dev@app.test".into()],
                helo: "client".into(),
                remote_addr: "127.0.0.1:1".into(),
                authentication: Authentication::default(),
                mime: &mime,
                raw: b"Subject: x\r\n\r\nbody".to_vec(),
            })
            .await
            .unwrap();
        id.to_string()
    }

    async fn subjects(inbox: &Inbox, q: &str) -> Vec<String> {
        inbox
            .list(q, 0, 10)
            .await
            .unwrap()
            .0
            .into_iter()
            .map(|m| m.subject)
            .collect()
    }

    #[tokio::test]
    async fn keeps_at_most_max_messages_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path(), 2, Duration::ZERO).unwrap();
        let mut changes = inbox.subscribe();
        add(&inbox, "a@x", "one", "", 1).await;
        add(&inbox, "b@x", "two", "", 2).await;
        add(&inbox, "c@x", "three", "", 3).await;
        let (page, total) = inbox.list("", 0, 10).await.unwrap();
        assert_eq!(total, 2);
        assert_eq!(page[0].subject, "three");
        assert_eq!(page[1].subject, "two");
        assert_eq!(inbox.len(), 2);
        assert!(matches!(changes.try_recv(), Ok(Change::New { .. })));
        assert_eq!(inbox.list("", 1, 10).await.unwrap().0.len(), 1);
        inbox.close().await;
    }

    #[tokio::test]
    async fn search_by_field_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path(), 10, Duration::ZERO).unwrap();
        add(
            &inbox,
            "Alice <alice@shop.test>",
            "Your invoice",
            "Total 12 EUR",
            1,
        )
        .await;
        add(
            &inbox,
            "bob@news.test",
            "Weekly news",
            "Nothing about invoices, 100% _really_",
            2,
        )
        .await;
        assert_eq!(subjects(&inbox, "from:alice").await, ["Your invoice"]);
        assert_eq!(
            subjects(&inbox, "invoice").await,
            ["Weekly news", "Your invoice"]
        );
        assert_eq!(subjects(&inbox, "subject:INVOICE").await, ["Your invoice"]);
        assert_eq!(subjects(&inbox, "\"total 12\"").await, ["Your invoice"]);
        assert_eq!(
            subjects(&inbox, "to:dev@app.test news").await,
            ["Weekly news"]
        );
        assert_eq!(subjects(&inbox, "100%").await, ["Weekly news"]);
        assert!(subjects(&inbox, "_e").await.is_empty(), "no LIKE wildcards");
        assert!(subjects(&inbox, "from:nobody").await.is_empty());
        inbox.close().await;
    }

    #[tokio::test]
    async fn expire_delete_clear_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path(), 10, Duration::from_secs(60)).unwrap();
        add(&inbox, "a@x", "old", "", 0).await;
        let new = add(&inbox, "b@x", "new", "", 100_000).await;
        assert_eq!(inbox.expire(100_000).await.unwrap(), 1);
        assert_eq!(inbox.len(), 1);
        assert_eq!(inbox.unread(), 1);
        assert!(inbox.set_read(&new, true).await.unwrap());
        assert_eq!(inbox.unread(), 0);
        let (stored, raw) = inbox.message(&new).await.unwrap().unwrap();
        assert!(stored.read);
        assert_eq!(raw, b"Subject: x\r\n\r\nbody");
        assert_eq!(stored.size, raw.len());
        assert!(inbox.delete(&new).await.unwrap());
        assert!(!inbox.delete(&new).await.unwrap());
        assert!(!inbox.delete("not-an-id").await.unwrap());
        assert!(inbox.raw(&new).await.unwrap().is_none());
        add(&inbox, "c@x", "c", "", 100_001).await;
        inbox.clear().await.unwrap();
        assert!(inbox.is_empty());
        assert_eq!(inbox.unread(), 0);
        inbox.close().await;
        assert!(matches!(inbox.clear().await, Err(InboxError::Closed)));
    }

    #[tokio::test]
    async fn survives_reopening_and_prunes_to_a_lower_limit() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path(), 10, Duration::ZERO).unwrap();
        let file = rusqlite::Connection::open(dir.path().join(FILE_NAME)).unwrap();
        let page_size: i64 = file
            .pragma_query_value(None, "page_size", |row| row.get(0))
            .unwrap();
        assert_eq!(page_size, 16 * 1024);
        drop(file);
        let first = add(&inbox, "alice@x", "first", "hello world", 1).await;
        add(&inbox, "bob@x", "second", "", 2).await;
        add(&inbox, "carol@x", "third", "", 3).await;
        inbox.set_read(&first, true).await.unwrap();
        inbox.close().await;
        drop(inbox);

        let inbox = Inbox::open(dir.path(), 10, Duration::ZERO).unwrap();
        assert_eq!((inbox.len(), inbox.unread()), (3, 2));
        assert_eq!(subjects(&inbox, "\"hello world\"").await, ["first"]);
        let (stored, _) = inbox.message(&first).await.unwrap().unwrap();
        assert!(stored.read);
        assert_eq!(stored.envelope_to, ["dev@app.test"]);
        inbox.close().await;
        drop(inbox);

        let inbox = Inbox::open(dir.path(), 2, Duration::ZERO).unwrap();
        assert_eq!((inbox.len(), inbox.unread()), (2, 2));
        assert_eq!(subjects(&inbox, "").await, ["third", "second"]);
        add(&inbox, "dave@x", "fourth", "", 4).await;
        assert_eq!(subjects(&inbox, "").await, ["fourth", "third"]);
        inbox.close().await;
    }

    #[test]
    fn queries_become_numbered_parameters() {
        let q = Query::parse("from:a \"b c\" subject:d");
        let (sql, params) = q.sql();
        assert_eq!(params, ["a", "b c", "d"]);
        assert!(sql.starts_with("instr(search_from, ?1) > 0 AND ("));
        assert!(sql.ends_with("instr(search_subject, ?3) > 0"));
        assert_eq!(Query::parse("  ").sql().0, "");
    }
}
