//! Webhooks: an account's message events POSTed to its URLs, signed, with
//! retries, and a delivery log readable over the API.
//!
//! Every event for a subscribed webhook becomes a delivery row first (so a
//! restart resumes what was not yet delivered), then a POST:
//! `X-Mailroom-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "t.body")>`.
//! A non-2xx answer or a network error is retried with exponential backoff
//! until `http.webhook_max_attempts`; the event id stays the same across
//! retries so receivers can de-duplicate.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use mailroom_core::time::{now_unix_millis, rfc3339_millis};
use mailroom_core::{EventKind, MessageEvent};
use mailroom_store::{Webhook, WebhookDelivery};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::messages::{blocking, parse_json};
use crate::state::AppState;

/// Calls in flight at once, over every webhook.
const MAX_IN_FLIGHT: usize = 16;
/// The longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// How webhook calls are made and retried (from `[http]`).
#[derive(Debug, Clone, Copy)]
pub struct WebhookSettings {
    pub retry_initial: Duration,
    pub max_attempts: u32,
    pub timeout: Duration,
}

/// The webhooks in memory, mirrored from the store.
#[derive(Debug, Default)]
pub struct Hooks {
    all: RwLock<Vec<Webhook>>,
}

impl Hooks {
    fn snapshot(&self) -> Vec<Webhook> {
        self.all
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn replace(&self, hooks: Vec<Webhook>) {
        *self.all.write().unwrap_or_else(PoisonError::into_inner) = hooks;
    }

    fn add(&self, hook: Webhook) {
        self.all
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(hook);
    }

    fn remove(&self, id: &str) {
        self.all
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|h| h.id != id);
    }

    pub(crate) fn remove_account(&self, account: &str) {
        self.all
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|h| h.account_id != account);
    }

    fn get(&self, id: &str) -> Option<Webhook> {
        self.all
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|h| h.id == id)
            .cloned()
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    /// `https://...` or `http://...`.
    pub url: String,
    /// Any of queued, delivered, deferred, bounced, failed; absent: all.
    pub events: Option<Vec<String>>,
    /// The account (admin only; an account's key always means its own).
    pub account_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookView {
    pub id: String,
    pub account_id: String,
    pub url: String,
    pub events: Vec<String>,
    pub created_at: String,
}

impl From<Webhook> for WebhookView {
    fn from(w: Webhook) -> Self {
        WebhookView {
            id: w.id,
            account_id: w.account_id,
            url: w.url,
            events: w.events,
            created_at: rfc3339_millis(w.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NewWebhookView {
    #[serde(flatten)]
    pub webhook: WebhookView,
    /// The signing secret, shown only here.
    pub secret: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    pub data: Vec<WebhookView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    pub id: String,
    pub event_id: String,
    pub event_type: String,
    /// pending, delivered or failed.
    pub state: String,
    pub attempts: u32,
    pub next_attempt_at: Option<String>,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub delivered_at: Option<String>,
    /// The body that is (or was) sent.
    pub payload: serde_json::Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    pub data: Vec<DeliveryView>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveryParams {
    /// 1 to 1000; 100 by default.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

fn check_url(url: &str) -> Result<(), ApiError> {
    match mailroom_delivery::http::parse_url(url) {
        Ok(_) => Ok(()),
        Err(e) => Err(ApiError::invalid("url", e)),
    }
}

/// Add a webhook
#[utoipa::path(
    post, path = "/api/v1/webhooks", tag = "webhooks",
    request_body = WebhookRequest,
    responses(
        (status = 201, description = "Created; `secret` is shown once", body = NewWebhookView),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 422, description = "A field is invalid", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<NewWebhookView>), ApiError> {
    let request: WebhookRequest = parse_json(&headers, &body)?;
    let account_id = crate::accounts::target_account(&state, &principal, request.account_id)?.id;
    check_url(&request.url)?;
    let events = match request.events {
        None => EventKind::ALL
            .iter()
            .map(|k| k.as_str().to_owned())
            .collect(),
        Some(list) if list.is_empty() => {
            return Err(ApiError::invalid("events", "name at least one event"));
        }
        Some(list) => {
            for (i, e) in list.iter().enumerate() {
                if EventKind::parse(e).is_none() {
                    return Err(ApiError::invalid(
                        format!("events[{i}]"),
                        "must be queued, delivered, deferred, bounced or failed",
                    ));
                }
            }
            list
        }
    };
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let hook = Webhook {
        id: uuid::Uuid::now_v7().to_string(),
        account_id,
        url: request.url,
        secret: format!("whsec_{}", hex::encode(bytes)),
        events,
        created_at: now_unix_millis(),
    };
    state.store.create_webhook(hook.clone()).await?;
    state.hooks.add(hook.clone());
    let secret = hook.secret.clone();
    Ok((
        StatusCode::CREATED,
        Json(NewWebhookView {
            webhook: hook.into(),
            secret,
        }),
    ))
}

/// List webhooks
#[utoipa::path(
    get, path = "/api/v1/webhooks", tag = "webhooks",
    responses(
        (status = 200, description = "Webhooks the caller may see", body = WebhookList),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<WebhookList>, ApiError> {
    Ok(Json(WebhookList {
        data: state
            .hooks
            .snapshot()
            .into_iter()
            .filter(|h| principal.can_see(Some(&h.account_id)))
            .map(WebhookView::from)
            .collect(),
    }))
}

fn visible(state: &AppState, principal: &Principal, id: &str) -> Result<Webhook, ApiError> {
    state
        .hooks
        .get(id)
        .filter(|h| principal.can_see(Some(&h.account_id)))
        .ok_or_else(|| ApiError::not_found("webhook"))
}

/// Look up a webhook
#[utoipa::path(
    get, path = "/api/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "The webhook", body = WebhookView),
        (status = 404, description = "No such webhook", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<WebhookView>, ApiError> {
    Ok(Json(visible(&state, &principal, &id)?.into()))
}

/// Delete a webhook and its delivery log
#[utoipa::path(
    delete, path = "/api/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such webhook", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let hook = visible(&state, &principal, &id)?;
    state.hooks.remove(&hook.id);
    state.store.delete_webhook(&hook.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A webhook's delivery log, newest first
#[utoipa::path(
    get, path = "/api/v1/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = String, Path), DeliveryParams),
    responses(
        (status = 200, description = "Deliveries", body = DeliveryList),
        (status = 400, description = "A bad parameter", body = ErrorBody),
        (status = 404, description = "No such webhook", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn deliveries(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    query: Result<Query<DeliveryParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeliveryList>, ApiError> {
    let Query(params) = query?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 1000").with_field("limit"));
    }
    let hook = visible(&state, &principal, &id)?;
    let store = state.store.clone();
    let rows = blocking(move || store.webhook_deliveries(&hook.id, limit)).await?;
    Ok(Json(DeliveryList {
        data: rows
            .into_iter()
            .map(|d| DeliveryView {
                payload: serde_json::from_str(&d.payload).unwrap_or(serde_json::Value::Null),
                id: d.id,
                event_id: d.event_id,
                event_type: d.event_type,
                state: d.state,
                attempts: d.attempts,
                next_attempt_at: d.next_attempt_at.map(rfc3339_millis),
                last_status: d.last_status,
                last_error: d.last_error,
                created_at: rfc3339_millis(d.created_at),
                delivered_at: d.delivered_at.map(rfc3339_millis),
            })
            .collect(),
    }))
}

/// Turns events into deliveries and makes them, until `events` closes.
/// Resumes the deliveries a previous run left pending.
pub async fn dispatch(state: AppState, mut events: mpsc::Receiver<MessageEvent>) {
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let store = state.store.clone();
    match blocking(move || store.pending_webhook_deliveries()).await {
        Ok(pending) => {
            if !pending.is_empty() {
                tracing::info!(deliveries = pending.len(), "resuming webhook deliveries");
            }
            for d in pending {
                tokio::spawn(deliver(state.clone(), permits.clone(), d));
            }
        }
        Err(e) => tracing::warn!(error = %e.message, "cannot load pending webhook deliveries"),
    }
    let mut batch = Vec::new();
    while events.recv_many(&mut batch, 256).await > 0 {
        let hooks = state.hooks.snapshot();
        let now = now_unix_millis();
        let mut new = Vec::new();
        for event in batch.drain(..) {
            let kind = event.kind.as_str();
            let subscribed = hooks
                .iter()
                .filter(|h| h.account_id == event.account && h.events.iter().any(|e| e == kind));
            let mut payload = None;
            for hook in subscribed {
                let (event_id, body) = payload.get_or_insert_with(|| body_of(&event)).clone();
                new.push(WebhookDelivery {
                    id: uuid::Uuid::now_v7().to_string(),
                    webhook_id: hook.id.clone(),
                    event_id,
                    event_type: kind.to_owned(),
                    payload: body,
                    state: "pending".into(),
                    attempts: 0,
                    next_attempt_at: Some(now),
                    last_status: None,
                    last_error: None,
                    created_at: now,
                    delivered_at: None,
                });
            }
        }
        if new.is_empty() {
            continue;
        }
        if let Err(e) = state.store.add_webhook_deliveries(new.clone()).await {
            tracing::warn!(error = %e, "cannot record webhook deliveries; sending them anyway");
        }
        for d in new {
            tokio::spawn(deliver(state.clone(), permits.clone(), d));
        }
    }
}

/// The event's id and JSON body.
fn body_of(event: &MessageEvent) -> (String, String) {
    let id = uuid::Uuid::now_v7().to_string();
    let body = json!({
        "id": id,
        "type": event.kind.as_str(),
        "created_at": rfc3339_millis(event.at),
        "account_id": event.account,
        "data": {
            "message_id": event.message_id.to_string(),
            "recipient": event.recipient,
            "reply": event.reply,
            "mx_host": event.mx_host,
        },
    });
    (id, body.to_string())
}

/// Makes one delivery, retrying until it succeeds or runs out of attempts.
async fn deliver(state: AppState, permits: Arc<Semaphore>, mut d: WebhookDelivery) {
    let settings = state.webhook_settings;
    loop {
        if let Some(at) = d.next_attempt_at {
            let wait = at - now_unix_millis();
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
            }
        }
        // The webhook may have been deleted meanwhile.
        let Some(hook) = state.hooks.get(&d.webhook_id) else {
            return;
        };
        let result = {
            let Ok(_permit) = permits.acquire().await else {
                return;
            };
            let signature = mailroom_delivery::http::signature(
                &hook.secret,
                now_unix_millis() / 1000,
                &d.payload,
            );
            mailroom_delivery::http::post_json(
                &hook.url,
                &d.payload,
                &[
                    ("X-Mailroom-Signature", signature),
                    ("X-Mailroom-Event-Id", d.event_id.clone()),
                ],
                settings.timeout,
            )
            .await
        };
        d.attempts += 1;
        match result {
            Ok(status) if (200..300).contains(&status) => {
                d.state = "delivered".into();
                d.last_status = Some(status);
                d.last_error = None;
                d.next_attempt_at = None;
                d.delivered_at = Some(now_unix_millis());
            }
            outcome => {
                match outcome {
                    Ok(status) => {
                        d.last_status = Some(status);
                        d.last_error = Some(format!("answered {status}"));
                    }
                    Err(e) => {
                        d.last_status = None;
                        d.last_error = Some(e);
                    }
                }
                if d.attempts >= settings.max_attempts {
                    d.state = "failed".into();
                    d.next_attempt_at = None;
                    tracing::warn!(
                        webhook_id = %d.webhook_id,
                        event_id = %d.event_id,
                        attempts = d.attempts,
                        error = d.last_error.as_deref().unwrap_or(""),
                        "webhook delivery failed for good"
                    );
                } else {
                    let backoff = settings
                        .retry_initial
                        .saturating_mul(1 << (d.attempts - 1).min(20))
                        .min(MAX_BACKOFF);
                    d.next_attempt_at = Some(now_unix_millis() + backoff.as_millis() as i64);
                }
            }
        }
        if let Err(e) = state.store.update_webhook_delivery(d.clone()).await {
            tracing::warn!(error = %e, "cannot record a webhook delivery");
        }
        if d.state != "pending" {
            return;
        }
    }
}
