//! What happened to a tenant's message: the events webhooks report.

use serde::{Deserialize, Serialize};

use crate::MessageId;

/// The kinds of event an account can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// Accepted and durably queued.
    Queued,
    /// A recipient's server accepted it.
    Delivered,
    /// A temporary failure; it will be retried.
    Deferred,
    /// A recipient's server refused it for good (5xx).
    Bounced,
    /// Given up without a refusal from the recipient's server: expired,
    /// no such domain, cancelled.
    Failed,
}

impl EventKind {
    pub const ALL: [EventKind; 5] = [
        EventKind::Queued,
        EventKind::Delivered,
        EventKind::Deferred,
        EventKind::Bounced,
        EventKind::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Queued => "queued",
            EventKind::Delivered => "delivered",
            EventKind::Deferred => "deferred",
            EventKind::Bounced => "bounced",
            EventKind::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One event about one message (and, after an attempt, one recipient).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageEvent {
    pub kind: EventKind,
    pub message_id: MessageId,
    pub account: String,
    /// The recipient the event is about; `None` for `queued`, which is
    /// about the whole message.
    pub recipient: Option<String>,
    /// Unix milliseconds.
    pub at: i64,
    /// The reply that decided it, as one line.
    pub reply: Option<String>,
    pub mx_host: Option<String>,
}
