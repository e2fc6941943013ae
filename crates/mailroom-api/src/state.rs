//! What every handler shares: the store, the queue to submit to, the
//! tenants in memory, and the settings the API enforces.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use mailroom_core::{MessageId, NewMessage};
use mailroom_store::{SqliteStore, StoreError};

use crate::auth::Tenants;

/// Where accepted mail goes: the binary wires this to the store and the
/// delivery engine, so mail from the API is routed and scheduled exactly
/// like mail from SMTP.
pub trait Queue: Send + Sync + 'static {
    /// Resolves `Ok` only once the message is durable.
    fn submit(
        &self,
        message: NewMessage,
    ) -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + '_>>;

    /// Tells delivery that a stored message changed (retried, cancelled).
    fn reschedule(&self, id: &MessageId);
}

/// Settings from `[http]` and the rest of the config that the API needs.
/// Not `Debug`: it holds the admin key.
#[derive(Clone)]
pub struct ApiSettings {
    pub hostname: String,
    pub admin_key: Option<String>,
    pub max_body_size: usize,
    /// Largest message the API builds or accepts (`smtp.max_message_size`).
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub cors_origins: Vec<String>,
    pub webhooks: crate::webhooks::WebhookSettings,
}

pub struct Shared {
    pub(crate) store: SqliteStore,
    pub(crate) queue: Arc<dyn Queue>,
    pub(crate) tenants: Tenants,
    pub(crate) admin_key: Option<String>,
    pub(crate) settings: ApiSettings,
    /// What every send is checked against (from `settings`).
    pub(crate) limits: crate::send::Limits,
    /// Idempotency keys with a request in progress: a second request with
    /// the same key waits for the first instead of racing it.
    pub(crate) in_flight: Mutex<HashSet<(String, String)>>,
    /// Per-account limits; shared with the SMTP side when it is given the
    /// same limiter.
    pub(crate) rates: Arc<mailroom_policy::RateLimiter>,
    /// SMTP logins, shared with the SMTP server's AUTH.
    pub(crate) logins: Arc<mailroom_smtp::auth::Logins>,
    pub(crate) hooks: crate::webhooks::Hooks,
    /// Delivery's provider registry, kept current with the providers.
    pub(crate) providers: Arc<mailroom_delivery::providers::Providers>,
    pub(crate) routing: Arc<crate::routing::Routing>,
    pub(crate) webhook_settings: crate::webhooks::WebhookSettings,
}

/// Cheap to clone: handlers get it by value.
pub type AppState = Arc<Shared>;

impl Shared {
    /// Claims an idempotency key for one request; `None` when another
    /// request holds it right now.
    pub fn claim(&self, scope: &str, key: &str) -> Option<InFlight<'_>> {
        let entry = (scope.to_owned(), key.to_owned());
        let mut set = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        set.insert(entry.clone()).then_some(InFlight {
            shared: self,
            entry,
        })
    }
}

/// Releases an idempotency key's claim when the request ends.
pub struct InFlight<'a> {
    shared: &'a Shared,
    entry: (String, String),
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.shared
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.entry);
    }
}
