//! Providers and routing rules (`/api/v1/providers`, `/api/v1/routing-rules`)
//! and the router that applies the rules to each message at intake.
//!
//! A rule's conditions (sender domain, recipient domain glob, a header, a
//! tag, metadata) must all hold; an account's rules are tried by priority
//! (lower first, then oldest) and the first that matches a recipient sends
//! it through the rule's provider. No match: the default route (MX, or the
//! config's static routes). The same rules apply to SMTP and API mail.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use mailroom_core::NewMessage;
use mailroom_core::config::{RouteConfig, TlsPolicy};
use mailroom_core::time::{now_unix_millis, rfc3339_millis};
use mailroom_delivery::providers::{Provider, Providers};
use mailroom_store::{ProviderRecord, RoutingRuleRecord, StoreError};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::accounts::target_account;
use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::messages::parse_json;
use crate::send::header_fields;
use crate::state::AppState;

/// A provider's settings as stored (secrets included).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ProviderConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<TlsPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderRequest {
    /// Unique within the account.
    pub name: String,
    /// `mx`, `smtp` (a relay) or `webhook`.
    pub kind: String,
    /// smtp: the relay's host and port (587 by default).
    pub host: Option<String>,
    pub port: Option<u16>,
    /// smtp: none, opportunistic, required (default) or verify.
    #[schema(value_type = Option<String>)]
    pub tls: Option<TlsPolicy>,
    /// smtp: AUTH credentials; never returned.
    pub username: Option<String>,
    pub password: Option<String>,
    /// webhook: where messages are POSTed as signed JSON.
    pub url: Option<String>,
    /// The account (admin only).
    pub account_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProviderView {
    pub id: String,
    pub account_id: String,
    pub name: String,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NewProviderView {
    #[serde(flatten)]
    pub provider: ProviderView,
    /// webhook: the signing secret, shown only here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProviderList {
    pub data: Vec<ProviderView>,
}

fn view(p: &ProviderRecord) -> ProviderView {
    let config: ProviderConfig = serde_json::from_str(&p.config).unwrap_or_default();
    ProviderView {
        id: p.id.clone(),
        account_id: p.account_id.clone(),
        name: p.name.clone(),
        kind: p.kind.clone(),
        host: config.host,
        port: config.port,
        tls: config.tls.map(|t| {
            serde_json::to_value(t)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        }),
        username: config.username,
        url: config.url,
        created_at: rfc3339_millis(p.created_at),
    }
}

/// What delivery needs of a stored provider.
fn to_delivery(p: &ProviderRecord) -> Option<Provider> {
    let c: ProviderConfig = serde_json::from_str(&p.config).ok()?;
    match p.kind.as_str() {
        "mx" => Some(Provider::Mx),
        "smtp" => Some(Provider::Relay(RouteConfig {
            domain: "*".into(),
            relay: format!("{}:{}", c.host?, c.port.unwrap_or(587)),
            tls: c.tls.unwrap_or(TlsPolicy::Required),
            username: c.username,
            password: c.password,
        })),
        "webhook" => Some(Provider::Webhook {
            url: c.url?,
            secret: c.secret?,
        }),
        _ => None,
    }
}

/// Add a provider
#[utoipa::path(
    post, path = "/api/v1/providers", tag = "routing",
    request_body = ProviderRequest,
    responses(
        (status = 201, description = "Created; a webhook's `secret` is shown once", body = NewProviderView),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
        (status = 422, description = "A field is invalid", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_provider(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<NewProviderView>), ApiError> {
    let r: ProviderRequest = parse_json(&headers, &body)?;
    let account_id = target_account(&state, &principal, r.account_id.clone())?.id;
    if r.name.trim().is_empty() || r.name.len() > 100 || r.name.chars().any(char::is_control) {
        return Err(ApiError::invalid("name", "must be 1 to 100 characters"));
    }
    let mut secret = None;
    let config = match r.kind.as_str() {
        "mx" => ProviderConfig::default(),
        "smtp" => {
            let host = r
                .host
                .filter(|h| {
                    !h.is_empty()
                        && h.len() <= 253
                        && h.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
                })
                .ok_or_else(|| ApiError::invalid("host", "an smtp provider needs a host name"))?;
            if r.port == Some(0) {
                return Err(ApiError::invalid("port", "must be 1 to 65535"));
            }
            if r.username.is_some() != r.password.is_some() {
                return Err(ApiError::invalid(
                    "password",
                    "username and password go together",
                ));
            }
            ProviderConfig {
                host: Some(host),
                port: Some(r.port.unwrap_or(587)),
                tls: Some(r.tls.unwrap_or(TlsPolicy::Required)),
                username: r.username,
                password: r.password,
                ..ProviderConfig::default()
            }
        }
        "webhook" => {
            let url = r
                .url
                .ok_or_else(|| ApiError::invalid("url", "a webhook provider needs a url"))?;
            mailroom_delivery::http::parse_url(&url).map_err(|e| ApiError::invalid("url", e))?;
            let mut bytes = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut bytes);
            let value = format!("whsec_{}", hex::encode(bytes));
            secret = Some(value.clone());
            ProviderConfig {
                url: Some(url),
                secret: Some(value),
                ..ProviderConfig::default()
            }
        }
        _ => {
            return Err(ApiError::invalid("kind", "must be mx, smtp or webhook"));
        }
    };
    let record = ProviderRecord {
        id: uuid::Uuid::now_v7().to_string(),
        account_id,
        name: r.name.trim().to_owned(),
        kind: r.kind,
        config: serde_json::to_string(&config)
            .map_err(|e| ApiError::internal("encoding a provider", e))?,
        created_at: now_unix_millis(),
    };
    match state.store.create_provider(record.clone()).await {
        Ok(()) => {}
        Err(StoreError::Conflict(_)) => {
            return Err(ApiError::conflict(
                "name_taken",
                "the account has a provider of this name",
            )
            .with_field("name"));
        }
        Err(e) => return Err(e.into()),
    }
    if let Some(provider) = to_delivery(&record) {
        state.providers.put(record.id.clone(), provider);
    }
    state.routing.put_provider(record.clone());
    Ok((
        StatusCode::CREATED,
        Json(NewProviderView {
            provider: view(&record),
            secret,
        }),
    ))
}

/// List providers
#[utoipa::path(
    get, path = "/api/v1/providers", tag = "routing",
    responses(
        (status = 200, description = "Providers the caller may see (no secrets)", body = ProviderList),
    ),
    security(("bearer" = []))
)]
pub async fn list_providers(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<ProviderList>, ApiError> {
    Ok(Json(ProviderList {
        data: state
            .routing
            .providers()
            .iter()
            .filter(|p| principal.can_see(Some(&p.account_id)))
            .map(view)
            .collect(),
    }))
}

fn visible_provider(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<ProviderRecord, ApiError> {
    state
        .routing
        .provider(id)
        .filter(|p| principal.can_see(Some(&p.account_id)))
        .ok_or_else(|| ApiError::not_found("provider"))
}

/// Look up a provider
#[utoipa::path(
    get, path = "/api/v1/providers/{id}", tag = "routing",
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "The provider (no secrets)", body = ProviderView),
        (status = 404, description = "No such provider", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_provider(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<ProviderView>, ApiError> {
    Ok(Json(view(&visible_provider(&state, &principal, &id)?)))
}

/// Delete a provider
///
/// Refused (409) while routing rules use it.
#[utoipa::path(
    delete, path = "/api/v1/providers/{id}", tag = "routing",
    params(("id" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such provider", body = ErrorBody),
        (status = 409, description = "Rules use it", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_provider(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let provider = visible_provider(&state, &principal, &id)?;
    match state.store.delete_provider(&provider.id).await {
        Ok(_) => {}
        Err(StoreError::Conflict(_)) => {
            return Err(ApiError::conflict(
                "provider_in_use",
                "routing rules use this provider; delete them first",
            ));
        }
        Err(e) => return Err(e.into()),
    }
    state.routing.remove_provider(&provider.id);
    // Mail already routed to it falls back to the default route.
    state.providers.remove(&provider.id);
    Ok(StatusCode::NO_CONTENT)
}

/// When a rule applies; every condition given must hold.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Conditions {
    /// The sender's domain (envelope), a glob: `shop.example`, `*.example`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_domain: Option<String>,
    /// The recipient's domain, a glob: `gmail.com`, `*.edu`, `*`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient_domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderCondition>,
    /// The message carries this tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The message's metadata has these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// A header field with a value (case-insensitive), or containing a text.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderCondition {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contains: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleRequest {
    /// Lower is tried first; 100 by default.
    pub priority: Option<i64>,
    #[serde(default)]
    pub conditions: Conditions,
    /// The provider that delivers what matches (one of the account's).
    pub provider_id: String,
    /// The account (admin only).
    pub account_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RuleView {
    pub id: String,
    pub account_id: String,
    pub priority: i64,
    pub conditions: Conditions,
    pub provider_id: String,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RuleList {
    pub data: Vec<RuleView>,
}

fn rule_view(r: &Rule) -> RuleView {
    RuleView {
        id: r.record.id.clone(),
        account_id: r.record.account_id.clone(),
        priority: r.record.priority,
        conditions: r.conditions.clone(),
        provider_id: r.record.provider_id.clone(),
        created_at: rfc3339_millis(r.record.created_at),
    }
}

/// Add a routing rule
#[utoipa::path(
    post, path = "/api/v1/routing-rules", tag = "routing",
    request_body = RuleRequest,
    responses(
        (status = 201, description = "Created", body = RuleView),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 422, description = "A field is invalid (or the provider is not the account's)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_rule(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<RuleView>), ApiError> {
    let r: RuleRequest = parse_json(&headers, &body)?;
    let account_id = target_account(&state, &principal, r.account_id.clone())?.id;
    match state.routing.provider(&r.provider_id) {
        Some(p) if p.account_id == account_id => {}
        _ => {
            return Err(ApiError::invalid(
                "provider_id",
                "not one of the account's providers",
            ));
        }
    }
    let c = &r.conditions;
    for (field, glob) in [
        ("conditions.sender_domain", &c.sender_domain),
        ("conditions.recipient_domain", &c.recipient_domain),
    ] {
        if let Some(g) = glob
            && (g.is_empty() || g.len() > 253 || g.contains(['@', ' ']))
        {
            return Err(ApiError::invalid(
                field,
                "must be a domain glob like *.example.com",
            ));
        }
    }
    if let Some(h) = &c.header
        && (h.name.is_empty()
            || h.name.contains([':', ' '])
            || (h.value.is_none() && h.contains.is_none()))
    {
        return Err(ApiError::invalid(
            "conditions.header",
            "needs a name and a value or contains",
        ));
    }
    let record = RoutingRuleRecord {
        id: uuid::Uuid::now_v7().to_string(),
        account_id,
        priority: r.priority.unwrap_or(100),
        conditions: serde_json::to_string(c)
            .map_err(|e| ApiError::internal("encoding a rule", e))?,
        provider_id: r.provider_id,
        created_at: now_unix_millis(),
    };
    state.store.create_routing_rule(record.clone()).await?;
    let rule = Rule {
        conditions: r.conditions,
        record,
    };
    let view = rule_view(&rule);
    state.routing.put_rule(rule);
    Ok((StatusCode::CREATED, Json(view)))
}

/// List routing rules, in the order they are tried
#[utoipa::path(
    get, path = "/api/v1/routing-rules", tag = "routing",
    responses(
        (status = 200, description = "Rules the caller may see", body = RuleList),
    ),
    security(("bearer" = []))
)]
pub async fn list_rules(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<RuleList>, ApiError> {
    Ok(Json(RuleList {
        data: state
            .routing
            .rules()
            .iter()
            .filter(|r| principal.can_see(Some(&r.record.account_id)))
            .map(rule_view)
            .collect(),
    }))
}

fn visible_rule(state: &AppState, principal: &Principal, id: &str) -> Result<Rule, ApiError> {
    state
        .routing
        .rules()
        .into_iter()
        .find(|r| r.record.id == id && principal.can_see(Some(&r.record.account_id)))
        .ok_or_else(|| ApiError::not_found("routing rule"))
}

/// Look up a routing rule
#[utoipa::path(
    get, path = "/api/v1/routing-rules/{id}", tag = "routing",
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "The rule", body = RuleView),
        (status = 404, description = "No such rule", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_rule(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<RuleView>, ApiError> {
    Ok(Json(rule_view(&visible_rule(&state, &principal, &id)?)))
}

/// Delete a routing rule
#[utoipa::path(
    delete, path = "/api/v1/routing-rules/{id}", tag = "routing",
    params(("id" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such rule", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_rule(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let rule = visible_rule(&state, &principal, &id)?;
    state.store.delete_routing_rule(&rule.record.id).await?;
    state.routing.remove_rule(&rule.record.id);
    Ok(StatusCode::NO_CONTENT)
}

/// A rule with its parsed conditions.
#[derive(Debug, Clone)]
pub struct Rule {
    record: RoutingRuleRecord,
    conditions: Conditions,
}

/// Every provider and rule, in memory; applies the rules at intake.
#[derive(Debug, Default)]
pub struct Routing {
    providers: RwLock<Vec<ProviderRecord>>,
    /// Sorted by account, priority, age: the order they are tried.
    rules: RwLock<Vec<Rule>>,
}

impl Routing {
    /// Loads providers and rules, and fills delivery's provider registry.
    pub fn load(
        store: &mailroom_store::SqliteStore,
        registry: &Providers,
    ) -> Result<Arc<Self>, StoreError> {
        let routing = Routing::default();
        for p in store.providers()? {
            if let Some(provider) = to_delivery(&p) {
                registry.put(p.id.clone(), provider);
            }
            routing.put_provider(p);
        }
        for record in store.routing_rules()? {
            let conditions = serde_json::from_str(&record.conditions).map_err(|e| {
                StoreError::Corrupt(format!("routing_rules.conditions of {}: {e}", record.id))
            })?;
            routing.put_rule(Rule { record, conditions });
        }
        Ok(Arc::new(routing))
    }

    fn providers(&self) -> Vec<ProviderRecord> {
        self.providers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn provider(&self, id: &str) -> Option<ProviderRecord> {
        self.providers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|p| p.id == id)
            .cloned()
    }

    fn put_provider(&self, p: ProviderRecord) {
        let mut all = self
            .providers
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        all.retain(|q| q.id != p.id);
        all.push(p);
    }

    fn remove_provider(&self, id: &str) {
        self.providers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|p| p.id != id);
    }

    fn rules(&self) -> Vec<Rule> {
        self.rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn put_rule(&self, rule: Rule) {
        let mut all = self.rules.write().unwrap_or_else(PoisonError::into_inner);
        all.push(rule);
        all.sort_by(|a, b| {
            (
                &a.record.account_id,
                a.record.priority,
                a.record.created_at,
                &a.record.id,
            )
                .cmp(&(
                    &b.record.account_id,
                    b.record.priority,
                    b.record.created_at,
                    &b.record.id,
                ))
        });
    }

    fn remove_rule(&self, id: &str) {
        self.rules
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|r| r.record.id != id);
    }

    /// Forgets an account's providers and rules (the account is gone).
    pub(crate) fn remove_account(&self, account: &str, registry: &Providers) {
        self.rules
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|r| r.record.account_id != account);
        let mut providers = self
            .providers
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for p in providers.iter().filter(|p| p.account_id == account) {
            registry.remove(&p.id);
        }
        providers.retain(|p| p.account_id != account);
    }

    /// Chooses a provider for each recipient of a tenant's message.
    pub fn route(&self, message: &mut NewMessage) {
        let Some(account) = message.meta.account.as_deref() else {
            return;
        };
        let rules = self.rules.read().unwrap_or_else(PoisonError::into_inner);
        let mine: Vec<&Rule> = rules
            .iter()
            .filter(|r| r.record.account_id == account)
            .collect();
        if mine.is_empty() {
            return;
        }
        let sender = message
            .envelope
            .reverse_path
            .as_ref()
            .map(|a| a.domain().to_ascii_lowercase());
        // Read once per message, and only if a rule looks at a header.
        let fields = std::cell::OnceCell::new();
        for (idx, recipient) in message.envelope.recipients.iter().enumerate() {
            let domain = recipient.address.domain().to_ascii_lowercase();
            let chosen = mine.iter().find(|r| {
                let c = &r.conditions;
                c.sender_domain
                    .as_ref()
                    .is_none_or(|g| sender.as_deref().is_some_and(|s| glob(g, s)))
                    && c.recipient_domain.as_ref().is_none_or(|g| glob(g, &domain))
                    && c.tag.as_ref().is_none_or(|t| message.meta.tags.contains(t))
                    && c.metadata
                        .iter()
                        .all(|(k, v)| message.meta.metadata.get(k) == Some(v))
                    && c.header.as_ref().is_none_or(|h| {
                        header_matches(fields.get_or_init(|| header_fields(&message.content)), h)
                    })
            });
            if let Some(rule) = chosen {
                message
                    .meta
                    .routes
                    .insert(idx as u32, rule.record.provider_id.clone());
            }
        }
    }
}

/// `*` matches any run of characters; case-insensitive.
fn glob(pattern: &str, text: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

/// True when one of the (unfolded) fields meets the condition; runs of
/// white space compare as one.
fn header_matches(fields: &[(String, String)], condition: &HeaderCondition) -> bool {
    let normal = |text: &str| {
        text.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    fields.iter().any(|(name, value)| {
        if !name.eq_ignore_ascii_case(&condition.name) {
            return false;
        }
        let value = normal(value);
        condition.value.as_ref().is_none_or(|v| value == normal(v))
            && condition
                .contains
                .as_ref()
                .is_none_or(|c| value.contains(&normal(c)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*", "a.test"));
        assert!(glob("gmail.com", "gmail.com"));
        assert!(glob("GMAIL.com", "gmail.com"));
        assert!(!glob("gmail.com", "xgmail.com"));
        assert!(glob("*.edu", "mit.edu"));
        assert!(!glob("*.edu", "edu"));
        assert!(glob("mail.*.test", "mail.a.test"));
        assert!(!glob("mail.*.test", "mail.a.org"));
    }

    #[test]
    fn header_conditions() {
        let m = b"Subject: Hi\r\nX-Campaign:  Spring\r\n  sale\r\n\r\nX-Campaign: body\r\n";
        let h = |value: Option<&str>, contains: Option<&str>| HeaderCondition {
            name: "x-campaign".into(),
            value: value.map(Into::into),
            contains: contains.map(Into::into),
        };
        let m = &header_fields(m);
        assert!(header_matches(m, &h(Some("spring sale"), None)));
        assert!(header_matches(m, &h(None, Some("SALE"))));
        assert!(!header_matches(m, &h(Some("body"), None)));
    }
}
