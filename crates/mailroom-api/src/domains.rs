//! `/api/v1/domains`: the domains an account sends from.
//!
//! A sending domain belongs to one account at a time. The list is the
//! account's `allowed_sender_domains`; these endpoints manage it one domain
//! at a time, and refuse a domain another account already has.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::messages::parse_json;
use crate::state::AppState;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DomainRequest {
    /// `example.com`; its subdomains are allowed too.
    pub domain: String,
    /// The account (admin only; an account's key always means its own).
    pub account_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DomainView {
    pub domain: String,
    pub account_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DomainList {
    pub data: Vec<DomainView>,
}

/// Add a sending domain to an account
#[utoipa::path(
    post, path = "/api/v1/domains", tag = "domains",
    request_body = DomainRequest,
    responses(
        (status = 201, description = "Added", body = DomainView),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 409, description = "Another account has the domain", body = ErrorBody),
        (status = 422, description = "Not a domain", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<DomainView>), ApiError> {
    let request: DomainRequest = parse_json(&headers, &body)?;
    let mut account = crate::accounts::target_account(&state, &principal, request.account_id)?;
    let domain = crate::accounts::check_domains(std::slice::from_ref(&request.domain))
        .map_err(|e| e.with_field("domain"))?
        .remove(0);
    match state.tenants.owner_of(&domain) {
        Some(owner) if owner == account.id => {
            return Err(
                ApiError::conflict("domain_exists", "the account already has this domain")
                    .with_field("domain"),
            );
        }
        Some(_) => {
            return Err(ApiError::conflict(
                "domain_taken",
                "another account sends from this domain",
            )
            .with_field("domain"));
        }
        None => {}
    }
    account.allowed_sender_domains.push(domain.clone());
    if !state.store.update_account(account.clone()).await? {
        return Err(ApiError::not_found("account"));
    }
    state.tenants.put_account(account.clone());
    Ok((
        StatusCode::CREATED,
        Json(DomainView {
            domain,
            account_id: account.id,
        }),
    ))
}

/// List sending domains
#[utoipa::path(
    get, path = "/api/v1/domains", tag = "domains",
    responses(
        (status = 200, description = "Domains the caller may see", body = DomainList),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<DomainList>, ApiError> {
    let mut data: Vec<DomainView> = state
        .tenants
        .all_accounts()
        .into_iter()
        .filter(|a| principal.can_see(Some(&a.id)))
        .flat_map(|a| {
            let id = a.id.clone();
            a.allowed_sender_domains
                .into_iter()
                .map(move |domain| DomainView {
                    domain,
                    account_id: id.clone(),
                })
        })
        .collect();
    data.sort_by(|a, b| a.domain.cmp(&b.domain));
    Ok(Json(DomainList { data }))
}

fn owned(state: &AppState, principal: &Principal, domain: &str) -> Result<String, ApiError> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    state
        .tenants
        .owner_of(&domain)
        .filter(|owner| principal.can_see(Some(owner)))
        .ok_or_else(|| ApiError::not_found("domain"))
}

/// Look up a sending domain
#[utoipa::path(
    get, path = "/api/v1/domains/{domain}", tag = "domains",
    params(("domain" = String, Path)),
    responses(
        (status = 200, description = "The domain and its account", body = DomainView),
        (status = 404, description = "No such domain (or not yours)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(domain): Path<String>,
) -> Result<Json<DomainView>, ApiError> {
    let account_id = owned(&state, &principal, &domain)?;
    Ok(Json(DomainView {
        domain: domain.trim_end_matches('.').to_ascii_lowercase(),
        account_id,
    }))
}

/// Remove a sending domain
#[utoipa::path(
    delete, path = "/api/v1/domains/{domain}", tag = "domains",
    params(("domain" = String, Path)),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such domain (or not yours)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    Path(domain): Path<String>,
) -> Result<StatusCode, ApiError> {
    let account_id = owned(&state, &principal, &domain)?;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let Some(mut account) = state.tenants.account(&account_id) else {
        return Err(ApiError::not_found("domain"));
    };
    account.allowed_sender_domains.retain(|d| *d != domain);
    state.store.update_account(account.clone()).await?;
    state.tenants.put_account(account);
    Ok(StatusCode::NO_CONTENT)
}
