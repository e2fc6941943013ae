//! An account's SMTP logins (`/api/v1/accounts/{id}/smtp-credentials`) and
//! the rules SMTP applies to them: the account's sender domains and rate
//! limits, as for mail sent over HTTP.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use mailroom_core::reply::{Enhanced, Reply};
use mailroom_core::time::{now_unix_millis, rfc3339_millis};
use mailroom_core::{Address, SessionPolicy};
use mailroom_smtp::auth::Login;
use mailroom_store::{AccountStatus, SmtpCredential, StoreError};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::accounts::{limits, sender_allowed, visible};
use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::messages::{blocking, parse_json};
use crate::state::AppState;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// Unique across the server; 1 to 64 printable ASCII characters.
    pub username: String,
    /// At least 12 characters; absent: one is generated and shown once.
    pub password: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoginView {
    pub id: String,
    pub account_id: String,
    pub username: String,
    pub created_at: String,
}

impl From<SmtpCredential> for LoginView {
    fn from(c: SmtpCredential) -> Self {
        LoginView {
            id: c.id,
            account_id: c.account_id,
            username: c.username,
            created_at: rfc3339_millis(c.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NewLoginView {
    #[serde(flatten)]
    pub login: LoginView,
    /// Only in this answer: it is stored as an argon2 hash.
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoginList {
    pub data: Vec<LoginView>,
}

/// Create an SMTP login
///
/// SMTP AUTH (PLAIN or LOGIN) with it sends as the account: the account's
/// sender domains and rate limits apply.
#[utoipa::path(
    post, path = "/api/v1/accounts/{id}/smtp-credentials", tag = "smtp",
    params(("id" = String, Path)),
    request_body = LoginRequest,
    responses(
        (status = 201, description = "Created; `password` is shown once", body = NewLoginView),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 409, description = "The username is taken", body = ErrorBody),
        (status = 422, description = "A field is invalid", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<NewLoginView>), ApiError> {
    let account = visible(&state, &principal, &id)?;
    let request: LoginRequest = parse_json(&headers, &body)?;
    let username = request.username;
    if username.is_empty() || username.len() > 64 || !username.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(ApiError::invalid(
            "username",
            "must be 1 to 64 printable ASCII characters",
        ));
    }
    let password = match request.password {
        Some(p) if p.chars().count() < 12 || p.len() > 256 => {
            return Err(ApiError::invalid(
                "password",
                "must be 12 to 256 characters",
            ));
        }
        Some(p) => p,
        None => {
            let mut bytes = [0u8; 18];
            rand::thread_rng().fill_bytes(&mut bytes);
            hex::encode(bytes)
        }
    };
    if state.logins.contains(&username) {
        return Err(taken());
    }
    let to_hash = password.clone();
    let hash = tokio::task::spawn_blocking(move || mailroom_smtp::auth::hash_password(&to_hash))
        .await
        .map_err(|e| ApiError::internal("hashing", e))?
        .map_err(|e| ApiError::internal("hashing", e))?;
    let credential = SmtpCredential {
        id: uuid::Uuid::now_v7().to_string(),
        account_id: account.id.clone(),
        username: username.clone(),
        password_hash: hash.clone(),
        created_at: now_unix_millis(),
    };
    match state.store.create_smtp_credential(credential.clone()).await {
        Ok(()) => {}
        Err(StoreError::Conflict(_)) => return Err(taken()),
        Err(e) => return Err(e.into()),
    }
    state.logins.insert(
        username.clone(),
        Login {
            password_hash: hash,
            account: Some(account.id.clone()),
        },
    );
    tracing::info!(account_id = %account.id, username, "SMTP login created");
    Ok((
        StatusCode::CREATED,
        Json(NewLoginView {
            login: credential.into(),
            password,
        }),
    ))
}

fn taken() -> ApiError {
    ApiError::conflict("username_taken", "this SMTP username is taken").with_field("username")
}

/// List an account's SMTP logins
#[utoipa::path(
    get, path = "/api/v1/accounts/{id}/smtp-credentials", tag = "smtp",
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "Logins (never their passwords)", body = LoginList),
        (status = 404, description = "No such account", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<LoginList>, ApiError> {
    let account = visible(&state, &principal, &id)?;
    let store = state.store.clone();
    let logins = blocking(move || store.smtp_credentials(Some(&account.id))).await?;
    Ok(Json(LoginList {
        data: logins.into_iter().map(LoginView::from).collect(),
    }))
}

/// Delete an SMTP login
#[utoipa::path(
    delete, path = "/api/v1/accounts/{id}/smtp-credentials/{credential_id}", tag = "smtp",
    params(("id" = String, Path), ("credential_id" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such login", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    Path((id, credential_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let account = visible(&state, &principal, &id)?;
    let store = state.store.clone();
    let account_id = account.id.clone();
    let logins = blocking(move || store.smtp_credentials(Some(&account_id))).await?;
    let Some(login) = logins.into_iter().find(|c| c.id == credential_id) else {
        return Err(ApiError::not_found("SMTP login"));
    };
    state
        .store
        .delete_smtp_credential(&account.id, &credential_id)
        .await?;
    state.logins.remove(&login.username);
    Ok(StatusCode::NO_CONTENT)
}

/// The account rules SMTP applies to a tenant's login; the operator's own
/// `[[smtp.users]]` logins pass untouched.
pub struct TenantPolicy {
    state: AppState,
}

impl std::fmt::Debug for TenantPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TenantPolicy")
    }
}

impl TenantPolicy {
    pub fn new(state: AppState) -> Self {
        TenantPolicy { state }
    }

    /// The login's account, if it is a tenant's and may send.
    fn account(&self, user: &str) -> Result<Option<mailroom_store::Account>, Reply> {
        let Some(id) = self.state.logins.account_of(user) else {
            return Ok(None);
        };
        match self.state.tenants.account(&id) {
            Some(a) if a.status == AccountStatus::Active => Ok(Some(a)),
            _ => Err(Reply::new(
                550,
                Enhanced(5, 7, 1),
                "The account is suspended",
            )),
        }
    }
}

impl SessionPolicy for TenantPolicy {
    fn mail(&self, user: &str, reverse_path: Option<&Address>) -> Result<(), Reply> {
        let Some(account) = self.account(user)? else {
            return Ok(());
        };
        if let Some(from) = reverse_path
            && !sender_allowed(&account, from.domain())
        {
            return Err(Reply::owned(
                553,
                Enhanced(5, 7, 1),
                format!("The account may not send from {}", from.domain()),
            ));
        }
        let now = std::time::Instant::now();
        match self
            .state
            .rates
            .take(&account.id, limits(&account), 1, 0, now)
        {
            Ok(()) => Ok(()),
            Err(refusal) => Err(rate_reply(refusal)),
        }
    }

    fn rcpt(&self, user: &str) -> Result<(), Reply> {
        let Some(account) = self.account(user)? else {
            return Ok(());
        };
        let now = std::time::Instant::now();
        match self
            .state
            .rates
            .take(&account.id, limits(&account), 0, 1, now)
        {
            Ok(()) => Ok(()),
            Err(refusal) => Err(rate_reply(refusal)),
        }
    }

    fn content(&self, user: &str, content: &[u8]) -> Result<(), Reply> {
        let Some(account) = self.account(user)? else {
            return Ok(());
        };
        match crate::send::header_from_domain(content) {
            Some(domain) if !sender_allowed(&account, &domain) => Err(Reply::owned(
                550,
                Enhanced(5, 7, 1),
                format!("The account may not send From: {domain}"),
            )),
            _ => Ok(()),
        }
    }
}

fn rate_reply(refusal: mailroom_policy::Refusal) -> Reply {
    match refusal {
        mailroom_policy::Refusal::Messages { retry_after } => Reply::owned(
            451,
            Enhanced(4, 7, 1),
            format!(
                "Message rate limit reached, try again in {} s",
                retry_after.as_secs_f64().ceil() as u64
            ),
        ),
        mailroom_policy::Refusal::Recipients { .. } => {
            Reply::new(452, Enhanced(4, 5, 3), "Daily recipient limit reached")
        }
    }
}
