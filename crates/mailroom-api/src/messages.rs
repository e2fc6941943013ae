//! `/api/v1/messages`: send, look up, list, cancel and retry.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use mailroom_core::time::{now_unix_millis, parse_rfc3339, rfc3339_millis};
use mailroom_core::{IdempotencyRecord, MessageId, MessageMeta, NewMessage, Origin};
use mailroom_store::{
    Account, ListQuery, RecipientState, RecipientUpdate, Store, StoreError, StoredMessage,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use crate::accounts::{limits, sender_allowed};
use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::send::{self, Built, QueuedRecipient, SendRequest};
use crate::state::AppState;

/// How long an idempotency key replays its first answer.
pub const IDEMPOTENCY_WINDOW_MS: i64 = 24 * 3600 * 1000;
const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// The `202` answer to a send.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Queued {
    pub id: String,
    /// Always `queued`.
    pub status: String,
    pub recipients: Vec<QueuedRecipient>,
}

/// Queue a message
///
/// Answers `202` once the message is durably stored. With an
/// `Idempotency-Key` header, the same key and body within 24 hours replay
/// the first answer (`Idempotent-Replayed: true`); the same key with
/// another body is `409`.
#[utoipa::path(
    post, path = "/api/v1/messages", tag = "messages",
    request_body = SendRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries of this request safe")),
    responses(
        (status = 202, description = "Durably queued", body = Queued),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 403, description = "Sender domain not allowed", body = ErrorBody),
        (status = 409, description = "Idempotency key reused with another body", body = ErrorBody),
        (status = 413, description = "Message or body too large", body = ErrorBody),
        (status = 422, description = "A field is invalid", body = ErrorBody),
        (status = 429, description = "An account rate limit; see Retry-After", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn send(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: SendRequest = parse_json(&headers, &body)?;
    let key = idempotency_key(&headers)?;
    let Some(key) = key else {
        let (status, queued) = accept(&state, &principal, &request, None).await?;
        return Ok((status, Json(queued)).into_response());
    };
    let scope = principal.scope().to_owned();
    let Some(_claim) = state.claim(&scope, &key) else {
        return Err(ApiError::conflict(
            "idempotency_key_in_use",
            "another request with this Idempotency-Key is in progress; retry later",
        ));
    };
    let request_hash = hex::encode(Sha256::digest(&body));
    if let Some(replay) = replay(&state, &scope, &key, &request_hash).await? {
        return Ok(replay);
    }
    let record = IdempotencyRecord {
        scope: scope.clone(),
        key: key.clone(),
        request_hash: request_hash.clone(),
        status: 202,
        response: String::new(),
    };
    match accept(&state, &principal, &request, Some(record)).await {
        Err(e) if e.code == "idempotency_key_taken" => {
            // Another node took the key between our look-up and commit.
            match replay(&state, &scope, &key, &request_hash).await? {
                Some(replay) => Ok(replay),
                None => Err(ApiError::internal("idempotency", "key taken but not found")),
            }
        }
        other => {
            let (status, queued) = other?;
            Ok((status, Json(queued)).into_response())
        }
    }
}

/// The stored first answer for this key, or `None` to go ahead.
async fn replay(
    state: &AppState,
    scope: &str,
    key: &str,
    request_hash: &str,
) -> Result<Option<Response>, ApiError> {
    let store = state.store.clone();
    let (s, k) = (scope.to_owned(), key.to_owned());
    let hit = blocking(move || store.idempotency(&s, &k)).await?;
    let Some(hit) = hit else { return Ok(None) };
    if hit.created_at < now_unix_millis() - IDEMPOTENCY_WINDOW_MS {
        // Expired: forget it (and any other stale key) and start afresh.
        state
            .store
            .expire_idempotency_keys(now_unix_millis() - IDEMPOTENCY_WINDOW_MS)
            .await?;
        return Ok(None);
    }
    if hit.request_hash != request_hash {
        return Err(ApiError::conflict(
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request body",
        ));
    }
    let status = StatusCode::from_u16(hit.status).unwrap_or(StatusCode::ACCEPTED);
    let mut response = (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        hit.response,
    )
        .into_response();
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(Some(response))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::bad_request("Idempotency-Key must be 1 to 255 printable ASCII characters")
                .with_field("Idempotency-Key")
        })?;
    Ok(Some(key.to_owned()))
}

/// Checks, builds and durably queues one message.
pub(crate) async fn accept(
    state: &AppState,
    principal: &Principal,
    request: &SendRequest,
    idempotency: Option<IdempotencyRecord>,
) -> Result<(StatusCode, Queued), ApiError> {
    let built = send::build(request, &state.limits)?;
    let account = principal.account_id().map(str::to_owned);
    if let Some(id) = &account {
        let Some(account) = state.tenants.account(id) else {
            return Err(ApiError::unauthorized());
        };
        check_sender(&account, &built)?;
        check_rate(state, &account, built.envelope.recipients.len())?;
    }
    let queued = Queued {
        id: built.id.to_string(),
        status: "queued".into(),
        recipients: built
            .envelope
            .recipients
            .iter()
            .map(|r| QueuedRecipient {
                address: r.address.as_str().to_owned(),
                status: "queued".into(),
            })
            .collect(),
    };
    let idempotency = match idempotency {
        Some(mut record) => {
            record.response = serde_json::to_string(&queued)
                .map_err(|e| ApiError::internal("encoding the answer", e))?;
            Some(record)
        }
        None => None,
    };
    let message = NewMessage {
        id: built.id,
        received_at: now_unix_millis(),
        envelope: built.envelope,
        origin: Origin {
            protocol: "http".into(),
            remote_ip: None,
            helo: None,
            auth_user: account.clone(),
            tls: None,
        },
        content: built.content,
        kept_locally: Vec::new(),
        meta: MessageMeta {
            account,
            tags: request.tags.clone(),
            metadata: request.metadata.clone(),
            not_before: built.not_before,
            idempotency,
            routes: Default::default(),
        },
    };
    match state.queue.submit(message).await {
        Ok(()) => Ok((StatusCode::ACCEPTED, queued)),
        Err(StoreError::IdempotencyKeyTaken) => Err(ApiError::conflict(
            "idempotency_key_taken",
            "the Idempotency-Key was taken by a concurrent request",
        )),
        Err(e) => Err(e.into()),
    }
}

/// An account may send only from its allowed domains (or their
/// subdomains), in the envelope and in From.
fn check_sender(account: &Account, built: &Built) -> Result<(), ApiError> {
    if account.allowed_sender_domains.is_empty() {
        return Ok(());
    }
    let senders = built
        .envelope
        .reverse_path
        .iter()
        .chain(built.sender.iter())
        .map(|a| a.domain().to_owned())
        .chain(send::header_from_domain(&built.content));
    for domain in senders {
        if !sender_allowed(account, &domain) {
            return Err(ApiError::forbidden(
                "sender_domain_not_allowed",
                format!("the account may not send from {domain}"),
            )
            .with_field("from"));
        }
    }
    Ok(())
}

/// Takes the message from the account's allowance, or answers 429 with
/// when to come back.
fn check_rate(state: &AppState, account: &Account, recipients: usize) -> Result<(), ApiError> {
    let recipients = u32::try_from(recipients).unwrap_or(u32::MAX);
    match state.rates.take(
        &account.id,
        limits(account),
        1,
        recipients,
        std::time::Instant::now(),
    ) {
        Ok(()) => Ok(()),
        Err(mailroom_policy::Refusal::Messages { retry_after }) => Err(ApiError::rate_limited(
            "the account's messages_per_minute limit is reached",
            retry_after.as_secs_f64().ceil() as u64,
        )),
        Err(mailroom_policy::Refusal::Recipients { retry_after }) => Err(match retry_after {
            Some(wait) => ApiError::rate_limited(
                "the account's recipients_per_day limit is reached",
                wait.as_secs_f64().ceil() as u64,
            ),
            None => ApiError::invalid(
                "to",
                "more recipients than the account's recipients_per_day allows",
            ),
        }),
    }
}

/// Parses a JSON body, mapping every failure to a JSON error.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    let json_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| {
            let t = t.trim();
            t.eq_ignore_ascii_case("application/json")
                || (t.starts_with("application/") && t.ends_with("+json"))
        });
    if !json_type {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send JSON with Content-Type: application/json",
        ));
    }
    // Two steps: serde_json reports some shape mismatches (an object where
    // an enum's string goes) as syntax errors, so JSON that parses at all
    // is 422 when it does not fit, and only text that is not JSON is 400.
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let error = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            e.inner().to_string(),
        );
        if path == "." {
            error
        } else {
            error.with_field(path)
        }
    })
}

/// `POST /api/v1/messages/batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1 to 1,000 messages, each as for `POST /api/v1/messages`.
    #[schema(value_type = Vec<SendRequest>)]
    pub messages: Vec<serde_json::Value>,
}

/// One item's fate: `status` 202 with the queued message, or an error.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchItem {
    pub index: usize,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<Vec<QueuedRecipient>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::error::ErrorDetail>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResult {
    pub accepted: usize,
    pub failed: usize,
    /// In request order.
    pub results: Vec<BatchItem>,
}

/// Largest batch.
pub const MAX_BATCH: usize = 1000;

/// Queue up to 1,000 messages
///
/// Partial success: every message is checked and queued on its own, and
/// `results[i]` says what became of `messages[i]` (202 and its id, or the
/// error it would have had alone). The call answers 200 whenever the batch
/// itself was readable, even if some or all items failed; each 202 item is
/// durable when the answer is sent. `Idempotency-Key` is not taken here.
#[utoipa::path(
    post, path = "/api/v1/messages/batch", tag = "messages",
    request_body = BatchRequest,
    responses(
        (status = 200, description = "Every item's result", body = BatchResult),
        (status = 400, description = "Not JSON, or an Idempotency-Key", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Not a batch, or more than 1,000 messages", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn send_batch(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<BatchResult>, ApiError> {
    if headers.contains_key(IDEMPOTENCY_HEADER) {
        return Err(ApiError::bad_request(
            "Idempotency-Key is not supported on batches; send messages one by one to use it",
        )
        .with_field("Idempotency-Key"));
    }
    let batch: BatchRequest = parse_json(&headers, &body)?;
    if batch.messages.is_empty() || batch.messages.len() > MAX_BATCH {
        return Err(ApiError::invalid(
            "messages",
            format!("must hold 1 to {MAX_BATCH} messages"),
        ));
    }
    // Every item is submitted at once, so the store commits them together
    // in a few group commits rather than one after another.
    let mut tasks = tokio::task::JoinSet::new();
    let n = batch.messages.len();
    for (index, item) in batch.messages.into_iter().enumerate() {
        let state = state.clone();
        let principal = principal.clone();
        tasks.spawn(async move {
            let result = match serde_json::from_value::<SendRequest>(item) {
                Ok(request) => accept(&state, &principal, &request, None).await,
                Err(e) => Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_field",
                    e.to_string(),
                )),
            };
            (index, result)
        });
    }
    let mut results: Vec<Option<BatchItem>> = (0..n).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (index, result) = joined.map_err(|e| ApiError::internal("batch item", e))?;
        results[index] = Some(match result {
            Ok((status, queued)) => BatchItem {
                index,
                status: status.as_u16(),
                id: Some(queued.id),
                recipients: Some(queued.recipients),
                error: None,
            },
            Err(e) => BatchItem {
                index,
                status: e.status.as_u16(),
                id: None,
                recipients: None,
                error: Some(e.detail()),
            },
        });
    }
    let results: Vec<BatchItem> = results.into_iter().flatten().collect();
    let accepted = results.iter().filter(|r| r.status == 202).count();
    Ok(Json(BatchResult {
        accepted,
        failed: results.len() - accepted,
        results,
    }))
}

/// A message with its recipients' delivery states.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageView {
    pub id: String,
    /// The least advanced recipient state: queued, deferred, held, failed, delivered.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    /// The reverse-path; `null` for `<>`.
    pub from: Option<String>,
    pub received_at: String,
    pub size: u64,
    pub tags: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub recipients: Vec<RecipientView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RecipientView {
    pub address: String,
    pub status: String,
    pub attempts: u32,
    pub next_attempt_at: Option<String>,
    pub last_reply: Option<String>,
    /// Every delivery attempt, oldest first.
    pub history: Vec<AttemptView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptView {
    pub at: String,
    /// The state the attempt left the recipient in.
    pub outcome: String,
    pub mx_host: Option<String>,
    pub ip: Option<String>,
    pub tls: Option<String>,
    pub code: Option<u16>,
    pub reply: String,
    pub duration_ms: u64,
}

/// Look up a message
#[utoipa::path(
    get, path = "/api/v1/messages/{id}", tag = "messages",
    params(("id" = String, Path, description = "Message id")),
    responses(
        (status = 200, description = "The message and its recipients", body = MessageView),
        (status = 404, description = "No such message (or another account's)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<MessageView>, ApiError> {
    let (message, attempts) = load(&state, &principal, &id).await?;
    Ok(Json(view(message, attempts)))
}

async fn load(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<(StoredMessage, Vec<mailroom_store::AttemptRecord>), ApiError> {
    let id: MessageId = id.parse().map_err(|_| ApiError::not_found("message"))?;
    let store = state.store.clone();
    let found = blocking(move || store.status(&id)).await?;
    match found {
        Some((m, a)) if principal.can_see(m.meta.account.as_deref()) => Ok((m, a)),
        _ => Err(ApiError::not_found("message")),
    }
}

fn view(message: StoredMessage, attempts: Vec<mailroom_store::AttemptRecord>) -> MessageView {
    let status = RecipientState::summary(message.recipients.iter().map(|r| r.state));
    let recipients = message
        .recipients
        .iter()
        .enumerate()
        .map(|(idx, r)| RecipientView {
            address: r.recipient.address.as_str().to_owned(),
            status: r.state.as_str().to_owned(),
            attempts: r.attempts,
            next_attempt_at: (!r.state.is_final())
                .then_some(r.next_attempt_at)
                .flatten()
                .map(rfc3339_millis),
            last_reply: r.last_reply.clone(),
            history: attempts
                .iter()
                .filter(|a| a.idx as usize == idx)
                .map(|a| AttemptView {
                    at: rfc3339_millis(a.attempt.at),
                    outcome: a.outcome.as_str().to_owned(),
                    mx_host: a.attempt.mx_host.clone(),
                    ip: a.attempt.ip.clone(),
                    tls: a.attempt.tls.clone(),
                    code: a.attempt.code,
                    reply: a.attempt.reply.clone(),
                    duration_ms: a.attempt.duration_ms,
                })
                .collect(),
        })
        .collect();
    MessageView {
        id: message.id.to_string(),
        status: status.as_str().to_owned(),
        account_id: message.meta.account,
        from: message.envelope.reverse_path.map(|a| a.as_str().to_owned()),
        received_at: rfc3339_millis(message.received_at),
        size: message.size,
        tags: message.meta.tags,
        metadata: message.meta.metadata,
        recipients,
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// queued, deferred, held, failed or delivered.
    pub status: Option<String>,
    pub tag: Option<String>,
    /// RFC 3339: only messages received at or after this time.
    #[param(format = DateTime)]
    pub since: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// 1 to 1000; 100 by default.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// Admin only: one account's messages.
    pub account_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessagePage {
    pub data: Vec<MessageSummaryView>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessageSummaryView {
    pub id: String,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    pub from: Option<String>,
    pub recipients: u32,
    pub size: u64,
    pub received_at: String,
    pub tags: Vec<String>,
}

/// List messages, newest first
#[utoipa::path(
    get, path = "/api/v1/messages", tag = "messages",
    params(ListParams),
    responses(
        (status = 200, description = "One page", body = MessagePage),
        (status = 400, description = "A bad parameter", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<MessagePage>, ApiError> {
    let Query(params) = query?;
    let state_filter = params
        .status
        .as_deref()
        .map(|s| {
            RecipientState::parse(s).ok_or_else(|| {
                ApiError::bad_request("status must be queued, deferred, held, failed or delivered")
                    .with_field("status")
            })
        })
        .transpose()?;
    let since = params
        .since
        .as_deref()
        .map(|s| {
            parse_rfc3339(s).ok_or_else(|| {
                ApiError::bad_request("since must be an RFC 3339 time").with_field("since")
            })
        })
        .transpose()?;
    let before = params
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<MessageId>()
                .map_err(|_| ApiError::bad_request("cursor is not valid").with_field("cursor"))
        })
        .transpose()?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 1000").with_field("limit"));
    }
    let account = match (&principal, params.account_id) {
        (Principal::Account(own), _) => Some(own.clone()),
        (Principal::Admin, wanted) => wanted,
    };
    let query = ListQuery {
        state: state_filter,
        limit: limit + 1,
        before,
        account,
        tag: params.tag,
        since,
    };
    let store = state.store.clone();
    let mut rows = blocking(move || store.list(&query)).await?;
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|r| r.id.to_string())
    } else {
        None
    };
    Ok(Json(MessagePage {
        data: rows
            .into_iter()
            .map(|r| MessageSummaryView {
                id: r.id.to_string(),
                status: r.state.as_str().to_owned(),
                account_id: r.account,
                from: r.reverse_path,
                recipients: r.recipients,
                size: r.size,
                received_at: rfc3339_millis(r.received_at),
                tags: r.tags,
            })
            .collect(),
        next_cursor,
    }))
}

/// What a cancel or retry changed.
#[derive(Debug, Serialize, ToSchema)]
pub struct Changed {
    pub id: String,
    /// Recipients whose state changed.
    pub recipients: u64,
}

/// Cancel a message
///
/// Recipients not yet delivered (or failed) become `failed` with the reply
/// "cancelled"; delivered ones stay delivered.
#[utoipa::path(
    delete, path = "/api/v1/messages/{id}", tag = "messages",
    params(("id" = String, Path, description = "Message id")),
    responses(
        (status = 200, description = "Cancelled", body = Changed),
        (status = 404, description = "No such message", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn cancel(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Changed>, ApiError> {
    let (message, _) = load(&state, &principal, &id).await?;
    let updates: Vec<RecipientUpdate> = message
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.state.is_final())
        .map(|(idx, _)| RecipientUpdate {
            message_id: message.id,
            idx: idx as u32,
            state: RecipientState::Failed,
            next_attempt_at: None,
            last_reply: Some("cancelled through the API".into()),
            attempt: None,
        })
        .collect();
    let changed = if updates.is_empty() {
        0
    } else {
        state.store.update(updates).await?
    };
    Ok(Json(Changed {
        id: message.id.to_string(),
        recipients: changed,
    }))
}

/// Retry a message now
///
/// Deferred and held recipients become due at once.
#[utoipa::path(
    post, path = "/api/v1/messages/{id}/retry", tag = "messages",
    params(("id" = String, Path, description = "Message id")),
    responses(
        (status = 200, description = "Rescheduled", body = Changed),
        (status = 404, description = "No such message", body = ErrorBody),
        (status = 409, description = "Nothing left to retry", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn retry(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Changed>, ApiError> {
    let (message, _) = load(&state, &principal, &id).await?;
    let now = now_unix_millis();
    let updates: Vec<RecipientUpdate> = message
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            matches!(
                r.state,
                RecipientState::Queued | RecipientState::Deferred | RecipientState::Held
            )
        })
        .map(|(idx, _)| RecipientUpdate {
            message_id: message.id,
            idx: idx as u32,
            state: RecipientState::Queued,
            next_attempt_at: Some(now),
            last_reply: None,
            attempt: None,
        })
        .collect();
    if updates.is_empty() {
        return Err(ApiError::conflict(
            "nothing_to_retry",
            "every recipient is delivered or failed",
        ));
    }
    let changed = state.store.update(updates).await?;
    state.queue.reschedule(&message.id);
    Ok(Json(Changed {
        id: message.id.to_string(),
        recipients: changed,
    }))
}

/// Store reads running at once. Each holds a pooled SQLite connection; more
/// at once would open fresh connections (a file open and a schema read,
/// far slower than the query) and only add contention on two to four
/// cores. Requests beyond this wait their turn without a thread.
const CONCURRENT_READS: usize = 4;

/// Runs a store read off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    static READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(CONCURRENT_READS);
    let _permit = READS
        .acquire()
        .await
        .map_err(|e| ApiError::internal("read permits", e))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("store read task", e))?
        .map_err(ApiError::from)
}
