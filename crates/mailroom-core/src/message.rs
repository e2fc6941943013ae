//! Message identity and the unit handed from a front door to the store.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::Envelope;

/// A message id: a UUIDv7, so ids sort by arrival time and index well.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(uuid::Uuid);

impl MessageId {
    pub fn new() -> Self {
        // uuid's own generator reads the OS random source with one syscall
        // per id; a thread-local CSPRNG gives the same uniqueness without
        // it, on the hot path of every accepted message.
        let mut random = [0u8; 10];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut random);
        let millis = crate::time::now_unix_millis().max(0) as u64;
        let candidate = uuid::Builder::from_unix_timestamp_millis(millis, &random)
            .into_uuid()
            .as_u128();
        // Ids made by this process sort in the order they were made, also
        // within one millisecond (RFC 9562 §6.2, method 2): when the clock
        // has not moved past the last id, count on from it in the random
        // low bits, which keeps version and variant intact.
        const RAND_B: u128 = (1 << 62) - 1;
        static LAST: Mutex<u128> = Mutex::new(0);
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        let id = if candidate > *last || *last & RAND_B == RAND_B {
            candidate
        } else {
            *last + 1
        };
        *last = id;
        MessageId(uuid::Uuid::from_u128(id))
    }

    pub fn as_uuid(&self) -> &uuid::Uuid {
        &self.0
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v7_and_distinct() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert!(a < b, "ids made later sort later");
        assert_eq!(a.as_uuid().get_version_num(), 7);
        assert_eq!(b.as_uuid().get_variant(), uuid::Variant::RFC4122);
        let many: Vec<MessageId> = (0..1000).map(|_| MessageId::new()).collect();
        assert!(many.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(a.to_string().parse::<MessageId>().unwrap(), a);
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.as_hyphenated().fmt(f)
    }
}

impl FromStr for MessageId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(MessageId)
    }
}

/// Where and how a message came in; kept with it for operators and policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// `smtp` or `http`.
    pub protocol: String,
    pub remote_ip: Option<IpAddr>,
    /// EHLO/HELO name for SMTP.
    pub helo: Option<String>,
    /// The authenticated identity, if any.
    pub auth_user: Option<String>,
    /// e.g. `TLSv1.3 TLS13_AES_256_GCM_SHA384`, if the session used TLS.
    pub tls: Option<String>,
}

/// An accepted transaction, ready to be made durable.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: MessageId,
    /// Unix time in milliseconds.
    pub received_at: i64,
    pub envelope: Envelope,
    pub origin: Origin,
    /// The message as it will be delivered: trace headers we added, then the
    /// content as received (dot-unstuffed, CRLF line ends kept as sent).
    pub content: Vec<u8>,
    /// Recipients (by index) whose route is this server's own store (the
    /// local domains): their delivery is done when the message is stored.
    /// Decided by the router at intake; empty from the front doors.
    pub kept_locally: Vec<u32>,
    /// Who sent it and how they labelled it; empty for anonymous SMTP mail.
    pub meta: MessageMeta,
}

/// What a tenant's submission carries besides the envelope and content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageMeta {
    /// The account that submitted the message, if any.
    pub account: Option<String>,
    /// Free labels for filtering and routing (`tags` in the API).
    pub tags: Vec<String>,
    /// Free key-value pairs, returned as given and usable by routing rules.
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Unix milliseconds before which no delivery is attempted (`send_at`).
    pub not_before: Option<i64>,
    /// Committed in the same transaction as the message, so a replayed
    /// request finds it exactly when the message exists.
    pub idempotency: Option<IdempotencyRecord>,
    /// Recipients (by index) that a routing rule sends through a provider,
    /// with the provider's id; the others take the default route.
    pub routes: std::collections::BTreeMap<u32, String>,
}

/// The first answer to a request made with an `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// Whose key it is: an account id, or `admin`.
    pub scope: String,
    pub key: String,
    /// SHA-256 of the request body, hex: the same key with another body is
    /// a conflict, not a replay.
    pub request_hash: String,
    pub status: u16,
    /// The response body as sent the first time.
    pub response: String,
}
