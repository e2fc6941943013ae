//! Tenant data kept beside the queue: accounts and their API keys, and the
//! idempotency keys that remember a request's first answer.
//!
//! These types are what every backend stores; the SQLite backend's queries
//! live in `sqlite::directory`. Secrets never appear here in the clear: an
//! API key is kept as the SHA-256 of its value, plus a short visible prefix
//! so operators can tell keys apart.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Whether an account may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountStatus {
    Active,
    /// Its keys and logins are refused; its queued mail stays queued.
    Suspended,
}

impl AccountStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::Active => "active",
            AccountStatus::Suspended => "suspended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(AccountStatus::Active),
            "suspended" => Some(AccountStatus::Suspended),
            _ => None,
        }
    }
}

impl fmt::Display for AccountStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: String,
    /// Unique across the installation.
    pub name: String,
    pub contact: Option<String>,
    /// Domains the account may use in MAIL FROM and From; empty: any.
    pub allowed_sender_domains: Vec<String>,
    pub max_messages_per_minute: Option<u32>,
    pub max_recipients_per_day: Option<u32>,
    pub status: AccountStatus,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// What is stored for a new account (the caller makes the id).
pub type NewAccount = Account;

/// An API key as listed: never its value or hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub account_id: String,
    pub name: String,
    /// The first characters of the key, shown so keys can be told apart.
    pub prefix: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// A key to store: its hash, never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApiKey {
    pub key: ApiKey,
    /// SHA-256 of the key's value, lowercase hex.
    pub hash: String,
}

/// A request answered before under the same idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyHit {
    pub request_hash: String,
    pub status: u16,
    pub response: String,
    /// Unix milliseconds of the first request.
    pub created_at: i64,
}

/// Counts for `/stats`, for one account (`None`: mail without an account).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountStats {
    pub account: Option<String>,
    /// Recipients by their current state.
    pub queue: std::collections::BTreeMap<String, u64>,
    /// Messages accepted in the last minute, hour and day.
    pub accepted: [u64; 3],
    /// Delivery attempts by outcome (delivered, deferred, failed) in the
    /// last minute, hour and day.
    pub outcomes: std::collections::BTreeMap<String, [u64; 3]>,
}

/// The windows [`AccountStats`] counts over, in milliseconds.
pub const STATS_WINDOWS: [i64; 3] = [60_000, 3_600_000, 86_400_000];

/// A tenant's SMTP login; the hash is only handed to SMTP AUTH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpCredential {
    pub id: String,
    pub account_id: String,
    /// Unique across the installation (and the config's `[[smtp.users]]`).
    pub username: String,
    /// argon2 PHC string.
    pub password_hash: String,
    pub created_at: i64,
}

/// An account's webhook: where its events are POSTed, signed with `secret`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub id: String,
    pub account_id: String,
    pub url: String,
    /// The HMAC-SHA256 key for `X-Mailroom-Signature`.
    pub secret: String,
    /// Event kinds sent (`delivered`, `bounced`, ...).
    pub events: Vec<String>,
    pub created_at: i64,
}

/// One event's delivery to one webhook: the log, and the retry queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDelivery {
    pub id: String,
    pub webhook_id: String,
    /// Stable across retries: receivers de-duplicate on it.
    pub event_id: String,
    pub event_type: String,
    /// The JSON body sent.
    pub payload: String,
    /// `pending`, `delivered` or `failed` (retries ran out).
    pub state: String,
    pub attempts: u32,
    pub next_attempt_at: Option<i64>,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub delivered_at: Option<i64>,
}

/// A tenant's provider: where routing rules may send mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderRecord {
    pub id: String,
    pub account_id: String,
    /// Unique within the account.
    pub name: String,
    /// `mx`, `smtp` or `webhook`.
    pub kind: String,
    /// The kind's settings as JSON, secrets included: never returned as is.
    pub config: String,
    pub created_at: i64,
}

/// A routing rule: when its conditions hold, the provider delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingRuleRecord {
    pub id: String,
    pub account_id: String,
    /// Lower first.
    pub priority: i64,
    /// The conditions as JSON.
    pub conditions: String,
    pub provider_id: String,
    pub created_at: i64,
}
