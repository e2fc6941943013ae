//! The durable queue: accepted messages and their per-recipient delivery state.
//!
//! A front door hands a [`NewMessage`] to [`Store::enqueue`] and may tell its
//! client the message is accepted only once that future resolves `Ok`: by then
//! the message is committed to disk. The message content is stored once; the
//! delivery state (queued, deferred, held, delivered, failed) is kept per
//! recipient, because one transaction's recipients succeed and fail apart.
//!
//! [`sqlite`] is the embedded backend ([`SqliteStore`]): one writer thread
//! commits enqueues in batches (group commit), so many concurrent sessions
//! share one fsync. This crate is not the scheduler and does not deliver:
//! it keeps messages and answers questions about them.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use mailroom_core::{Envelope, MessageId, MessageMeta, NewMessage, Origin, Recipient};

pub mod directory;
pub mod sqlite;

pub use directory::{
    Account, AccountStats, AccountStatus, ApiKey, IdempotencyHit, NewAccount, NewApiKey,
    ProviderRecord, RoutingRuleRecord, STATS_WINDOWS, SmtpCredential, Webhook, WebhookDelivery,
};
pub use sqlite::{SqliteOptions, SqliteStore};

/// Why the store could not do what was asked.
///
/// Cloneable because one failed group commit fails every message in the
/// batch with the same cause.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// `close` was called (or the last handle dropped); nothing new is taken.
    #[error("the store is shutting down")]
    ShuttingDown,
    /// The writer thread ended without answering; the message is not stored.
    #[error("the store writer stopped unexpectedly")]
    WriterStopped,
    #[error("sqlite: {0}")]
    Sqlite(#[source] Arc<rusqlite::Error>),
    /// A row that this build cannot read back; names the table and column.
    #[error("corrupt data in the store: {0}")]
    Corrupt(String),
    /// Another message already holds this idempotency key; this one was not
    /// stored.
    #[error("the idempotency key is already used")]
    IdempotencyKeyTaken,
    /// A write broke a uniqueness rule (a name already taken, say).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A message with this id is already stored; the new one was not.
    #[error("a message with id {0} is already stored")]
    DuplicateId(MessageId),
    /// The message breaks an invariant of the queue and was not stored.
    #[error("message rejected by the store: {0}")]
    Invalid(String),
    /// The database was migrated by a newer mailroom; writing to it with
    /// this build could corrupt it.
    #[error(
        "database schema version {found} is newer than this build supports ({supported}); \
         upgrade mailroom or point it at another database"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("i/o: {0}")]
    Io(#[source] Arc<std::io::Error>),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(Arc::new(e))
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Io(Arc::new(e))
    }
}

/// Where one recipient of a message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecipientState {
    /// Waiting for its first (or next scheduled) attempt.
    Queued,
    /// A temporary failure; retried at `next_attempt_at`.
    Deferred,
    /// Kept back by an operator; not attempted until released.
    Held,
    Delivered,
    /// A permanent failure, or retries ran out.
    Failed,
}

impl RecipientState {
    pub const ALL: [RecipientState; 5] = [
        RecipientState::Queued,
        RecipientState::Deferred,
        RecipientState::Held,
        RecipientState::Delivered,
        RecipientState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RecipientState::Queued => "queued",
            RecipientState::Deferred => "deferred",
            RecipientState::Held => "held",
            RecipientState::Delivered => "delivered",
            RecipientState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(RecipientState::Queued),
            "deferred" => Some(RecipientState::Deferred),
            "held" => Some(RecipientState::Held),
            "delivered" => Some(RecipientState::Delivered),
            "failed" => Some(RecipientState::Failed),
            _ => None,
        }
    }

    /// True once nothing more will be done for the recipient.
    pub fn is_final(self) -> bool {
        matches!(self, RecipientState::Delivered | RecipientState::Failed)
    }

    /// How far along a recipient is, for a message's summary state: queued,
    /// deferred, held, failed, delivered.
    pub fn rank(self) -> u8 {
        match self {
            RecipientState::Queued => 0,
            RecipientState::Deferred => 1,
            RecipientState::Held => 2,
            RecipientState::Failed => 3,
            RecipientState::Delivered => 4,
        }
    }

    /// A message's summary state: the least advanced of its recipients'
    /// (see [`MessageSummary::state`]); delivered when there are none.
    pub fn summary(states: impl IntoIterator<Item = RecipientState>) -> RecipientState {
        states
            .into_iter()
            .min_by_key(|s| s.rank())
            .unwrap_or(RecipientState::Delivered)
    }
}

impl fmt::Display for RecipientState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One recipient of a stored message with its delivery state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecipient {
    pub recipient: Recipient,
    pub state: RecipientState,
    pub attempts: u32,
    /// Unix time in milliseconds; `None` when no attempt is scheduled.
    pub next_attempt_at: Option<i64>,
    /// The last reply a delivery attempt got, as text, for operators and DSNs.
    pub last_reply: Option<String>,
    /// The provider a routing rule chose; `None`: the default route.
    pub route: Option<String>,
}

/// A message as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: MessageId,
    /// Unix time in milliseconds.
    pub received_at: i64,
    /// As submitted, recipients included (in their original order).
    pub envelope: Envelope,
    pub origin: Origin,
    /// Octets of `content`.
    pub size: u64,
    pub content: Vec<u8>,
    /// Delivery state, in the same order as `envelope.recipients`.
    pub recipients: Vec<StoredRecipient>,
    /// Account, tags and metadata (never the idempotency record).
    pub meta: MessageMeta,
}

/// One line of a queue listing; no content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSummary {
    pub id: MessageId,
    pub received_at: i64,
    /// `None` is the null reverse-path `<>`.
    pub reverse_path: Option<String>,
    /// How many recipients the message has.
    pub recipients: u32,
    pub size: u64,
    /// The least advanced state among the recipients: queued, then deferred,
    /// then held, then failed, then delivered. A message is "delivered" only
    /// when every recipient is; failed ranks before delivered so a partly
    /// failed message shows up as failed.
    pub state: RecipientState,
    pub account: Option<String>,
    pub tags: Vec<String>,
}

/// Which messages [`Store::list`] returns, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Only messages whose summary [`MessageSummary::state`] is this.
    pub state: Option<RecipientState>,
    /// At most this many messages.
    pub limit: usize,
    /// Only messages older than this one (ids are UUIDv7 and sort by time):
    /// pass the last id of a page to get the next page.
    pub before: Option<MessageId>,
    /// Only this account's messages.
    pub account: Option<String>,
    /// Only messages carrying this tag.
    pub tag: Option<String>,
    /// Only messages received at or after this unix millisecond.
    pub since: Option<i64>,
}

impl Default for ListQuery {
    fn default() -> Self {
        ListQuery {
            state: None,
            limit: 100,
            before: None,
            account: None,
            tag: None,
            since: None,
        }
    }
}

/// A recipient still to be delivered, as the scheduler needs it at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRecipient {
    pub message_id: MessageId,
    /// Position in the message's recipient list.
    pub idx: u32,
    /// The provider a routing rule chose; `None`: the default route.
    pub route: Option<String>,
    /// The recipient's domain, lowercased: what delivery is grouped by.
    pub domain: String,
    /// Queued, deferred or held.
    pub state: RecipientState,
    /// Unix milliseconds; due now or in the past means "send".
    pub next_attempt_at: i64,
    pub priority: i8,
    /// When the message arrived (unix ms), for expiry.
    pub received_at: i64,
}

/// One delivery attempt, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Unix milliseconds when the attempt started.
    pub at: i64,
    pub mx_host: Option<String>,
    pub ip: Option<String>,
    /// `TLSv1.3 TLS13_AES_128_GCM_SHA256`, when the session used TLS.
    pub tls: Option<String>,
    pub code: Option<u16>,
    /// The reply, or why there was none (connection refused, timeout...).
    pub reply: String,
    pub duration_ms: u64,
}

/// A recipient's new state after an attempt or an operator's action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientUpdate {
    pub message_id: MessageId,
    pub idx: u32,
    pub state: RecipientState,
    /// When to try next (deferred); `None` for final states and holds.
    pub next_attempt_at: Option<i64>,
    /// Replaces the recipient's last reply when set.
    pub last_reply: Option<String>,
    /// The attempt that led here; counted and recorded when present.
    pub attempt: Option<Attempt>,
}

/// An attempt as read back, with the state it left the recipient in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    pub idx: u32,
    pub outcome: RecipientState,
    pub attempt: Attempt,
}

/// The queue as the rest of mailroom sees it; one implementation per backend.
///
/// Reads are synchronous and may wait on the disk: call them from
/// `spawn_blocking` (or a thread) when on an async runtime's worker.
pub trait Store: Send + Sync + 'static {
    /// Resolves Ok only once the message is durably committed.
    fn enqueue(&self, message: NewMessage) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The message with this id, content and recipient states included.
    fn get(&self, id: &MessageId) -> Result<Option<StoredMessage>, StoreError>;

    /// Message summaries, newest first.
    fn list(&self, query: &ListQuery) -> Result<Vec<MessageSummary>, StoreError>;

    /// The number of messages stored.
    fn count(&self) -> Result<u64, StoreError>;

    /// Every recipient that is queued, deferred or held.
    fn pending(&self) -> Result<Vec<PendingRecipient>, StoreError>;

    /// Applies recipient updates durably (committed with the next group
    /// commit); resolves with how many recipients matched.
    fn update(
        &self,
        updates: Vec<RecipientUpdate>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// As [`update`](Self::update), but only recipients still queued or
    /// deferred change: delivery results never overwrite an operator's
    /// hold or bounce that happened meanwhile.
    fn update_pending(
        &self,
        updates: Vec<RecipientUpdate>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Removes a message with its recipients and attempts; true if it existed.
    fn delete(&self, id: MessageId) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The attempts made for a message, oldest first.
    fn attempts(&self, id: &MessageId) -> Result<Vec<AttemptRecord>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip() {
        for s in RecipientState::ALL {
            assert_eq!(RecipientState::parse(s.as_str()), Some(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!(RecipientState::parse("Queued"), None);
        assert_eq!(RecipientState::parse(""), None);
    }
}
