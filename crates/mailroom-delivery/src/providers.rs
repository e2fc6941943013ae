//! Tenants' providers: where a routing rule can send a recipient instead of
//! the default route (MX, or the config's static routes).
//!
//! The API owns the providers and keeps this registry current; the engine
//! reads it at each attempt, so a changed provider applies to the next one.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use mailroom_core::config::RouteConfig;

/// How a provider delivers.
#[derive(Debug, Clone)]
pub enum Provider {
    /// Straight to the recipients' MX hosts (as the default route does,
    /// but skipping the config's static routes).
    Mx,
    /// An SMTP relay (a smarthost, an email provider's SMTP endpoint).
    Relay(RouteConfig),
    /// An HTTP endpoint that takes the message as signed JSON.
    Webhook { url: String, secret: String },
}

/// Providers by id, each with a number that keeps its pooled connections
/// apart from every other route's.
#[derive(Debug, Default)]
pub struct Providers {
    by_id: RwLock<HashMap<String, (usize, Provider)>>,
}

impl Providers {
    pub fn put(&self, id: String, provider: Provider) {
        let mut map = self.by_id.write().unwrap_or_else(PoisonError::into_inner);
        // Ids are never reused, so one more than the largest slot is new.
        let slot = map
            .get(&id)
            .map(|(slot, _)| *slot)
            .unwrap_or_else(|| map.values().map(|(slot, _)| slot + 1).max().unwrap_or(0));
        map.insert(id, (slot, provider));
    }

    pub fn remove(&self, id: &str) {
        self.by_id
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    pub fn get(&self, id: &str) -> Option<(usize, Provider)> {
        self.by_id
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }
}

/// The scheduler's destination for a recipient: its domain, and the
/// provider a rule chose, if any. Recipients of one domain that go different
/// ways are queued (and limited) apart.
pub fn destination(domain: &str, route: Option<&str>) -> String {
    match route {
        Some(provider) => format!("{domain} via {provider}"),
        None => domain.to_owned(),
    }
}

/// The inverse of [`destination`].
pub fn split_destination(destination: &str) -> (&str, Option<&str>) {
    match destination.split_once(" via ") {
        Some((domain, provider)) => (domain, Some(provider)),
        None => (destination, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_round_trip() {
        assert_eq!(
            split_destination(&destination("a.test", None)),
            ("a.test", None)
        );
        assert_eq!(
            split_destination(&destination("a.test", Some("p1"))),
            ("a.test", Some("p1"))
        );
    }

    #[test]
    fn slots_are_distinct_and_stable() {
        let p = Providers::default();
        p.put("a".into(), Provider::Mx);
        p.put("b".into(), Provider::Mx);
        let (a, _) = p.get("a").unwrap();
        let (b, _) = p.get("b").unwrap();
        assert_ne!(a, b);
        p.put("a".into(), Provider::Mx);
        assert_eq!(p.get("a").unwrap().0, a);
    }
}
