//! `/api/v1/accounts` and their API keys.
//!
//! The admin key manages every account; an account's key sees only its own
//! account and keys. Another account's id answers 404, never 403, so ids
//! cannot be probed.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use mailroom_core::time::{now_unix_millis, rfc3339_millis};
use mailroom_store::{Account, AccountStatus, ApiKey, NewApiKey};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Principal, mint_key};
use crate::error::{ApiError, ErrorBody};
use crate::messages::{blocking, parse_json};
use crate::state::AppState;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountRequest {
    /// Unique; 1 to 100 characters.
    pub name: String,
    pub contact: Option<String>,
    /// Domains the account may send from (and their subdomains); empty: any.
    #[serde(default)]
    pub allowed_sender_domains: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    /// `active` (default) or `suspended`.
    #[schema(value_type = Option<String>)]
    pub status: Option<AccountStatus>,
}

/// Fields to change; absent ones stay as they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountPatch {
    pub name: Option<String>,
    pub contact: Option<String>,
    pub allowed_sender_domains: Option<Vec<String>>,
    pub limits: Option<Limits>,
    #[schema(value_type = Option<String>)]
    pub status: Option<AccountStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Messages accepted per minute; `null`: no limit.
    pub messages_per_minute: Option<u32>,
    /// Recipients accepted per day; `null`: no limit.
    pub recipients_per_day: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AccountView {
    pub id: String,
    pub name: String,
    pub contact: Option<String>,
    pub allowed_sender_domains: Vec<String>,
    pub limits: Limits,
    #[schema(value_type = String)]
    pub status: AccountStatus,
    pub created_at: String,
}

impl From<Account> for AccountView {
    fn from(a: Account) -> Self {
        AccountView {
            id: a.id,
            name: a.name,
            contact: a.contact,
            allowed_sender_domains: a.allowed_sender_domains,
            limits: Limits {
                messages_per_minute: a.max_messages_per_minute,
                recipients_per_day: a.max_recipients_per_day,
            },
            status: a.status,
            created_at: rfc3339_millis(a.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AccountList {
    pub data: Vec<AccountView>,
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid("name", "must be 1 to 100 characters"));
    }
    Ok(())
}

pub(crate) fn check_domains(domains: &[String]) -> Result<Vec<String>, ApiError> {
    domains
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
            let ok = !d.is_empty()
                && d.len() <= 253
                && d.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if ok {
                Ok(d)
            } else {
                Err(ApiError::invalid(
                    format!("allowed_sender_domains[{i}]"),
                    "is not a domain name",
                ))
            }
        })
        .collect()
}

/// Create an account (admin)
#[utoipa::path(
    post, path = "/api/v1/accounts", tag = "accounts",
    request_body = AccountRequest,
    responses(
        (status = 201, description = "Created", body = AccountView),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
        (status = 422, description = "A field is invalid", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<AccountView>), ApiError> {
    principal.require_admin()?;
    let request: AccountRequest = parse_json(&headers, &body)?;
    check_name(&request.name)?;
    let account = Account {
        id: uuid::Uuid::now_v7().to_string(),
        name: request.name.trim().to_owned(),
        contact: request.contact,
        allowed_sender_domains: check_domains(&request.allowed_sender_domains)?,
        max_messages_per_minute: request.limits.messages_per_minute,
        max_recipients_per_day: request.limits.recipients_per_day,
        status: request.status.unwrap_or(AccountStatus::Active),
        created_at: now_unix_millis(),
    };
    state
        .store
        .create_account(account.clone())
        .await
        .map_err(name_taken)?;
    state.tenants.put_account(account.clone());
    tracing::info!(account_id = %account.id, name = %account.name, "account created");
    Ok((StatusCode::CREATED, Json(account.into())))
}

fn name_taken(e: mailroom_store::StoreError) -> ApiError {
    match e {
        mailroom_store::StoreError::Conflict(_) => {
            ApiError::conflict("name_taken", "an account with this name exists").with_field("name")
        }
        other => other.into(),
    }
}

/// List accounts
///
/// The admin sees every account; an account's key sees its own.
#[utoipa::path(
    get, path = "/api/v1/accounts", tag = "accounts",
    responses(
        (status = 200, description = "Accounts", body = AccountList),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<AccountList>, ApiError> {
    let store = state.store.clone();
    let accounts = blocking(move || store.accounts()).await?;
    Ok(Json(AccountList {
        data: accounts
            .into_iter()
            .filter(|a| principal.can_see(Some(&a.id)))
            .map(AccountView::from)
            .collect(),
    }))
}

/// True when the account may send from `domain` (one of its sending
/// domains or a subdomain of one; any domain when it has none). The same
/// rule for HTTP and SMTP.
pub(crate) fn sender_allowed(account: &Account, domain: &str) -> bool {
    let domain = domain.to_ascii_lowercase();
    account.allowed_sender_domains.is_empty()
        || account
            .allowed_sender_domains
            .iter()
            .any(|d| domain == *d || domain.ends_with(&format!(".{d}")))
}

/// The account's limits as the rate limiter takes them.
pub(crate) fn limits(account: &Account) -> mailroom_policy::AccountLimits {
    mailroom_policy::AccountLimits {
        messages_per_minute: account.max_messages_per_minute,
        recipients_per_day: account.max_recipients_per_day,
    }
}

/// The account an object being made belongs to: an account's own (naming
/// another is 404, as if it did not exist), or the one the admin names.
pub(crate) fn target_account(
    state: &AppState,
    principal: &Principal,
    requested: Option<String>,
) -> Result<Account, ApiError> {
    let id = match (principal, requested) {
        (Principal::Account(own), Some(other)) if *own != other => {
            return Err(ApiError::not_found("account"));
        }
        (Principal::Account(own), _) => own.clone(),
        (Principal::Admin, Some(id)) => id,
        (Principal::Admin, None) => {
            return Err(ApiError::invalid(
                "account_id",
                "the admin key must name the account",
            ));
        }
    };
    state
        .tenants
        .account(&id)
        .ok_or_else(|| ApiError::not_found("account"))
}

/// The account if the caller may see it; 404 otherwise.
pub(crate) fn visible(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<Account, ApiError> {
    state
        .tenants
        .account(id)
        .filter(|a| principal.can_see(Some(&a.id)))
        .ok_or_else(|| ApiError::not_found("account"))
}

/// Look up an account
#[utoipa::path(
    get, path = "/api/v1/accounts/{id}", tag = "accounts",
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "The account", body = AccountView),
        (status = 404, description = "No such account (or not yours)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<AccountView>, ApiError> {
    Ok(Json(visible(&state, &principal, &id)?.into()))
}

/// Change an account (admin)
#[utoipa::path(
    patch, path = "/api/v1/accounts/{id}", tag = "accounts",
    params(("id" = String, Path)),
    request_body = AccountPatch,
    responses(
        (status = 200, description = "Changed", body = AccountView),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
        (status = 422, description = "A field is invalid", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn update(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<AccountView>, ApiError> {
    let mut account = visible(&state, &principal, &id)?;
    principal.require_admin()?;
    let patch: AccountPatch = parse_json(&headers, &body)?;
    if let Some(name) = patch.name {
        check_name(&name)?;
        account.name = name.trim().to_owned();
    }
    if let Some(contact) = patch.contact {
        account.contact = Some(contact);
    }
    if let Some(domains) = patch.allowed_sender_domains {
        account.allowed_sender_domains = check_domains(&domains)?;
    }
    if let Some(limits) = patch.limits {
        account.max_messages_per_minute = limits.messages_per_minute;
        account.max_recipients_per_day = limits.recipients_per_day;
    }
    if let Some(status) = patch.status {
        account.status = status;
    }
    if !state
        .store
        .update_account(account.clone())
        .await
        .map_err(name_taken)?
    {
        return Err(ApiError::not_found("account"));
    }
    state.tenants.put_account(account.clone());
    state.rates.reset(&account.id);
    Ok(Json(account.into()))
}

/// Delete an account and its keys (admin)
///
/// Its messages stay in the queue and are still delivered.
#[utoipa::path(
    delete, path = "/api/v1/accounts/{id}", tag = "accounts",
    params(("id" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    visible(&state, &principal, &id)?;
    principal.require_admin()?;
    state.store.delete_account(&id).await?;
    state.tenants.remove_account(&id);
    state.rates.reset(&id);
    state.logins.remove_account(&id);
    state.hooks.remove_account(&id);
    state.routing.remove_account(&id, &state.providers);
    tracing::info!(account_id = %id, "account deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// What the key is for (`production`, `ci`); shown in listings.
    pub name: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    pub id: String,
    pub account_id: String,
    pub name: String,
    /// The key's first characters, to tell keys apart.
    pub prefix: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

impl From<ApiKey> for KeyView {
    fn from(k: ApiKey) -> Self {
        KeyView {
            id: k.id,
            account_id: k.account_id,
            name: k.name,
            prefix: k.prefix,
            created_at: rfc3339_millis(k.created_at),
            last_used_at: k.last_used_at.map(rfc3339_millis),
            revoked_at: k.revoked_at.map(rfc3339_millis),
        }
    }
}

/// A new key: the only time its value is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct NewKeyView {
    #[serde(flatten)]
    pub key: KeyView,
    /// The secret itself: store it now, it cannot be shown again.
    pub secret: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub data: Vec<KeyView>,
}

async fn mint(state: &AppState, account_id: &str, name: String) -> Result<NewKeyView, ApiError> {
    let minted = mint_key();
    let key = ApiKey {
        id: uuid::Uuid::now_v7().to_string(),
        account_id: account_id.to_owned(),
        name,
        prefix: minted.prefix,
        created_at: now_unix_millis(),
        last_used_at: None,
        revoked_at: None,
    };
    state
        .store
        .create_api_key(NewApiKey {
            key: key.clone(),
            hash: minted.hash.clone(),
        })
        .await?;
    state.tenants.put_key(minted.hash, &key);
    tracing::info!(account_id, key_id = %key.id, prefix = %key.prefix, "API key created");
    Ok(NewKeyView {
        key: key.into(),
        secret: minted.value,
    })
}

/// Create an API key
///
/// The answer holds the key's value; it is stored only as a hash and
/// cannot be shown again.
#[utoipa::path(
    post, path = "/api/v1/accounts/{id}/keys", tag = "keys",
    params(("id" = String, Path)),
    request_body = KeyRequest,
    responses(
        (status = 201, description = "Created; `secret` is shown once", body = NewKeyView),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 422, description = "A field is invalid", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_key(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<NewKeyView>), ApiError> {
    let account = visible(&state, &principal, &id)?;
    let request: KeyRequest = if body.is_empty() {
        KeyRequest::default()
    } else {
        parse_json(&headers, &body)?
    };
    let name = request.name.unwrap_or_else(|| "default".into());
    if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid("name", "must be 1 to 100 characters"));
    }
    Ok((
        StatusCode::CREATED,
        Json(mint(&state, &account.id, name).await?),
    ))
}

/// List an account's API keys
#[utoipa::path(
    get, path = "/api/v1/accounts/{id}/keys", tag = "keys",
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "Keys, revoked ones included", body = KeyList),
        (status = 404, description = "No such account", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_keys(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<KeyList>, ApiError> {
    let account = visible(&state, &principal, &id)?;
    let store = state.store.clone();
    let keys = blocking(move || store.api_keys(&account.id)).await?;
    Ok(Json(KeyList {
        data: keys.into_iter().map(KeyView::from).collect(),
    }))
}

/// Revoke an API key
#[utoipa::path(
    delete, path = "/api/v1/accounts/{id}/keys/{key_id}", tag = "keys",
    params(("id" = String, Path), ("key_id" = String, Path)),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No such key, or already revoked", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn revoke_key(
    State(state): State<AppState>,
    principal: Principal,
    Path((id, key_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let account = visible(&state, &principal, &id)?;
    if !state.store.revoke_api_key(&account.id, &key_id).await? {
        return Err(ApiError::not_found("key"));
    }
    state.tenants.remove_key(&key_id);
    tracing::info!(account_id = %account.id, key_id, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// Rotate an API key
///
/// Revokes the key and answers with a new one of the same name.
#[utoipa::path(
    post, path = "/api/v1/accounts/{id}/keys/{key_id}/rotate", tag = "keys",
    params(("id" = String, Path), ("key_id" = String, Path)),
    responses(
        (status = 201, description = "The new key; `secret` is shown once", body = NewKeyView),
        (status = 404, description = "No such key, or already revoked", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn rotate_key(
    State(state): State<AppState>,
    principal: Principal,
    Path((id, key_id)): Path<(String, String)>,
) -> Result<(StatusCode, Json<NewKeyView>), ApiError> {
    let account = visible(&state, &principal, &id)?;
    let store = state.store.clone();
    let account_id = account.id.clone();
    let keys = blocking(move || store.api_keys(&account_id)).await?;
    let Some(old) = keys
        .into_iter()
        .find(|k| k.id == key_id && k.revoked_at.is_none())
    else {
        return Err(ApiError::not_found("key"));
    };
    let new = mint(&state, &account.id, old.name).await?;
    state.store.revoke_api_key(&account.id, &key_id).await?;
    state.tenants.remove_key(&key_id);
    Ok((StatusCode::CREATED, Json(new)))
}
