//! The inbox: captured messages kept in memory, newest last, with
//! retention by count and by age, search, read flags, and a broadcast of
//! changes for the web UI's live list.
//!
//! Only the raw message and a small summary are kept; the MIME view is
//! parsed again when someone opens a message, which keeps memory near the
//! size of the mail itself.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mailroom_core::MessageId;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::event::Authentication;
use crate::mime::{Addresses, Mime};

/// One captured message.
#[derive(Debug)]
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
    pub read: AtomicBool,
    /// As received, our trace header first.
    pub raw: Vec<u8>,
    /// Lower-case text the search runs over, per field.
    search: SearchText,
}

#[derive(Debug, Default)]
struct SearchText {
    from: String,
    to: String,
    subject: String,
    text: String,
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

pub struct Inbox {
    messages: RwLock<VecDeque<Arc<Stored>>>,
    max_messages: usize,
    max_age: Duration,
    changes: broadcast::Sender<Change>,
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
    pub fn new(max_messages: usize, max_age: Duration) -> Self {
        Inbox {
            messages: RwLock::new(VecDeque::new()),
            max_messages: max_messages.max(1),
            max_age,
            changes: broadcast::channel(256).0,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    pub fn insert(&self, entry: NewEntry<'_>) -> Arc<Stored> {
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
        let stored = Arc::new(Stored {
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
            read: AtomicBool::new(false),
            raw: entry.raw,
            search,
        });
        let mut dropped = Vec::new();
        {
            let mut messages = self.write();
            messages.push_back(stored.clone());
            while messages.len() > self.max_messages {
                if let Some(old) = messages.pop_front() {
                    dropped.push(old.id);
                }
            }
        }
        for id in dropped {
            let _ = self.changes.send(Change::Deleted { id: id.to_string() });
        }
        let _ = self.changes.send(Change::New {
            message: stored.summary(),
        });
        stored
    }

    /// Drops messages older than `max_age` (when set).
    pub fn expire(&self, now_millis: i64) -> usize {
        if self.max_age.is_zero() {
            return 0;
        }
        let cutoff = now_millis - self.max_age.as_millis() as i64;
        let mut dropped = Vec::new();
        {
            let mut messages = self.write();
            while messages.front().is_some_and(|m| m.received_at < cutoff) {
                if let Some(old) = messages.pop_front() {
                    dropped.push(old.id);
                }
            }
        }
        for id in &dropped {
            let _ = self.changes.send(Change::Deleted { id: id.to_string() });
        }
        dropped.len()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Stored>> {
        let id: MessageId = id.parse().ok()?;
        self.read_lock().iter().find(|m| m.id == id).cloned()
    }

    /// Newest first, filtered by `query` (see [`Query`]); returns the page
    /// and the number of matches.
    pub fn list(&self, query: &str, start: usize, limit: usize) -> (Vec<Arc<Stored>>, usize) {
        let query = Query::parse(query);
        let messages = self.read_lock();
        let mut total = 0;
        let mut page = Vec::new();
        for m in messages.iter().rev().filter(|m| query.matches(m)) {
            if total >= start && page.len() < limit {
                page.push(m.clone());
            }
            total += 1;
        }
        (page, total)
    }

    pub fn len(&self) -> usize {
        self.read_lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn unread(&self) -> usize {
        self.read_lock()
            .iter()
            .filter(|m| !m.read.load(Ordering::Relaxed))
            .count()
    }

    pub fn delete(&self, id: &str) -> bool {
        let Ok(id) = id.parse::<MessageId>() else {
            return false;
        };
        let removed = {
            let mut messages = self.write();
            let before = messages.len();
            messages.retain(|m| m.id != id);
            before != messages.len()
        };
        if removed {
            let _ = self.changes.send(Change::Deleted { id: id.to_string() });
        }
        removed
    }

    pub fn clear(&self) {
        self.write().clear();
        let _ = self.changes.send(Change::Cleared);
    }

    pub fn set_read(&self, id: &str, read: bool) -> bool {
        let Some(m) = self.get(id) else {
            return false;
        };
        m.read.store(read, Ordering::Relaxed);
        let _ = self.changes.send(Change::Read {
            id: m.id.to_string(),
            read,
        });
        true
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, VecDeque<Arc<Stored>>> {
        self.messages.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, VecDeque<Arc<Stored>>> {
        self.messages.write().unwrap_or_else(|e| e.into_inner())
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
            size: self.raw.len(),
            attachments: self.attachments,
            read: self.read.load(Ordering::Relaxed),
        }
    }
}

/// A search: words separated by spaces, all of which must match
/// (case-insensitive, substring). `from:x`, `to:x`, `subject:x` look in
/// one field; a bare word looks in from, to, subject and text.
/// `"quoted words"` match as one phrase.
#[derive(Debug, Default, PartialEq, Eq)]
struct Query {
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
        while !rest.is_empty() {
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

    fn matches(&self, m: &Stored) -> bool {
        let s = &m.search;
        self.terms.iter().all(|(field, word)| match field {
            Field::From => s.from.contains(word.as_str()),
            Field::To => s.to.contains(word.as_str()),
            Field::Subject => s.subject.contains(word.as_str()),
            Field::Any => [&s.from, &s.to, &s.subject, &s.text]
                .iter()
                .any(|f| f.contains(word.as_str())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(inbox: &Inbox, from: &str, subject: &str, text: &str, at: i64) -> Arc<Stored> {
        let mime = Mime {
            subject: Some(subject.into()),
            text: Some(text.into()),
            from: Some(from.into()),
            ..Mime::default()
        };
        inbox.insert(NewEntry {
            id: MessageId::new(),
            received_at: at,
            envelope_from: from.into(),
            envelope_to: vec!["dev@app.test".into()],
            helo: "client".into(),
            remote_addr: "127.0.0.1:1".into(),
            authentication: Authentication::default(),
            mime: &mime,
            raw: b"Subject: x\r\n\r\nbody".to_vec(),
        })
    }

    #[test]
    fn keeps_at_most_max_messages_newest_first() {
        let inbox = Inbox::new(2, Duration::ZERO);
        let mut changes = inbox.subscribe();
        add(&inbox, "a@x", "one", "", 1);
        add(&inbox, "b@x", "two", "", 2);
        add(&inbox, "c@x", "three", "", 3);
        let (page, total) = inbox.list("", 0, 10);
        assert_eq!(total, 2);
        assert_eq!(page[0].subject, "three");
        assert_eq!(page[1].subject, "two");
        assert!(matches!(changes.try_recv(), Ok(Change::New { .. })));
    }

    #[test]
    fn search_by_field_and_text() {
        let inbox = Inbox::new(10, Duration::ZERO);
        add(
            &inbox,
            "Alice <alice@shop.test>",
            "Your invoice",
            "Total 12 EUR",
            1,
        );
        add(
            &inbox,
            "bob@news.test",
            "Weekly news",
            "Nothing about invoices",
            2,
        );
        let subjects = |q: &str| -> Vec<String> {
            inbox
                .list(q, 0, 10)
                .0
                .iter()
                .map(|m| m.subject.clone())
                .collect()
        };
        assert_eq!(subjects("from:alice"), ["Your invoice"]);
        assert_eq!(subjects("invoice"), ["Weekly news", "Your invoice"]);
        assert_eq!(subjects("subject:invoice"), ["Your invoice"]);
        assert_eq!(subjects("\"total 12\""), ["Your invoice"]);
        assert_eq!(subjects("to:dev@app.test news"), ["Weekly news"]);
        assert!(subjects("from:nobody").is_empty());
    }

    #[test]
    fn expire_delete_clear_and_read() {
        let inbox = Inbox::new(10, Duration::from_secs(60));
        add(&inbox, "a@x", "old", "", 0);
        let new = add(&inbox, "b@x", "new", "", 100_000);
        assert_eq!(inbox.expire(100_000), 1);
        assert_eq!(inbox.len(), 1);
        assert_eq!(inbox.unread(), 1);
        assert!(inbox.set_read(&new.id.to_string(), true));
        assert_eq!(inbox.unread(), 0);
        assert!(inbox.delete(&new.id.to_string()));
        assert!(!inbox.delete("not-an-id"));
        add(&inbox, "c@x", "c", "", 100_001);
        inbox.clear();
        assert!(inbox.is_empty());
    }
}
