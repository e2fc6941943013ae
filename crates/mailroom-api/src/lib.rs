//! The HTTP API: applications send mail and read its fate over JSON;
//! operators manage tenants.
//!
//! Every response carries `X-Request-Id`; every error is
//! `{"error":{"code","message","field"}}`; the OpenAPI 3.1 document is
//! generated from the handlers and served at `/api/v1/openapi.json`.

pub mod accounts;
pub mod auth;
pub mod domains;
pub mod error;
pub mod messages;
pub mod routing;
pub mod send;
pub mod smtp_logins;
pub mod state;
pub mod stats;
pub mod webhooks;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use mailroom_store::{SqliteStore, StoreError};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use utoipa::OpenApi;

pub use auth::Tenants;
pub use error::ApiError;
pub use routing::Routing;
pub use smtp_logins::TenantPolicy;
pub use state::{ApiSettings, AppState, Queue};

/// The generated OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "mailroom",
        description = "Send mail, follow its delivery, and manage tenants.",
    ),
    paths(
        messages::send,
        messages::send_batch,
        messages::list,
        messages::get,
        messages::cancel,
        messages::retry,
        stats::stats,
        accounts::create,
        accounts::list,
        accounts::get,
        accounts::update,
        accounts::delete,
        accounts::create_key,
        accounts::list_keys,
        accounts::revoke_key,
        accounts::rotate_key,
        smtp_logins::create,
        smtp_logins::list,
        smtp_logins::delete,
        routing::create_provider,
        routing::list_providers,
        routing::get_provider,
        routing::delete_provider,
        routing::create_rule,
        routing::list_rules,
        routing::get_rule,
        routing::delete_rule,
        domains::create,
        domains::list,
        domains::get,
        domains::delete,
        webhooks::create,
        webhooks::list,
        webhooks::get,
        webhooks::delete,
        webhooks::deliveries,
    ),
    // The shared error body, referenced by the common error responses.
    components(schemas(error::ErrorBody, error::ErrorDetail)),
    modifiers(&Security, &CommonErrors),
    tags(
        (name = "messages", description = "Send and follow mail"),
        (name = "accounts", description = "Tenants"),
        (name = "keys", description = "An account's API keys"),
        (name = "smtp", description = "An account's SMTP logins"),
        (name = "domains", description = "The domains an account sends from"),
        (name = "routing", description = "Providers and the rules that choose them"),
        (name = "webhooks", description = "Events POSTed to an account's URLs, signed"),
    )
)]
pub struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The errors any operation can answer, documented once instead of on each
/// handler: authentication on every secured operation, body problems on
/// every operation that takes one, and 503 while shutting down.
struct CommonErrors;

impl utoipa::Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for op in operations.into_iter().flatten() {
                let mut add = |code: &str, description: &str| {
                    op.responses
                        .responses
                        .entry(code.to_owned())
                        .or_insert_with(|| error(description).into());
                };
                if op.request_body.is_some() {
                    add("400", "The body is not JSON");
                    add("413", "The body is larger than http.max_body_size");
                    add("415", "The body is not application/json");
                    add("422", "A field has the wrong type or value");
                }
                add("401", "No valid key");
                add(
                    "403",
                    "The account is suspended, or the action needs the admin key",
                );
                add("503", "The server is shutting down");
            }
        }
    }
}

/// Builds the shared state: loads the tenants from the store.
pub fn state(
    store: SqliteStore,
    queue: Arc<dyn Queue>,
    settings: ApiSettings,
    rates: Arc<mailroom_policy::RateLimiter>,
    logins: Arc<mailroom_smtp::auth::Logins>,
    providers: Arc<mailroom_delivery::providers::Providers>,
    routing: Arc<routing::Routing>,
) -> Result<AppState, StoreError> {
    let tenants = Tenants::load(&store)?;
    let hooks = webhooks::Hooks::default();
    hooks.replace(store.webhooks()?);
    let webhook_settings = settings.webhooks;
    for c in store.smtp_credentials(None)? {
        if logins.contains(&c.username) {
            tracing::warn!(
                username = %c.username,
                "an [[smtp.users]] login shadows an account's SMTP login of the same name"
            );
            continue;
        }
        logins.insert(
            c.username,
            mailroom_smtp::auth::Login {
                password_hash: c.password_hash,
                account: Some(c.account_id),
            },
        );
    }
    Ok(Arc::new(state::Shared {
        store,
        queue,
        tenants,
        admin_key: settings.admin_key.clone(),
        limits: send::Limits {
            max_message_size: settings.max_message_size,
            max_recipients: settings.max_recipients,
            hostname: settings.hostname.clone(),
        },
        settings,
        in_flight: Mutex::new(Default::default()),
        rates,
        logins,
        hooks,
        webhook_settings,
        providers,
        routing,
    }))
}

/// Every route, with request ids, CORS and the body limit.
pub fn router(state: AppState) -> Router {
    let x_request_id = HeaderName::from_static("x-request-id");
    let settings = &state.settings;
    let cors = cors(&settings.cors_origins);
    let api = Router::new()
        .route("/api/v1/messages", post(messages::send).get(messages::list))
        .route(
            "/api/v1/messages/{id}",
            get(messages::get).delete(messages::cancel),
        )
        .route("/api/v1/messages/batch", post(messages::send_batch))
        .route("/api/v1/messages/{id}/retry", post(messages::retry))
        .route("/api/v1/stats", get(stats::stats))
        .route(
            "/api/v1/accounts",
            post(accounts::create).get(accounts::list),
        )
        .route(
            "/api/v1/accounts/{id}",
            get(accounts::get)
                .patch(accounts::update)
                .delete(accounts::delete),
        )
        .route(
            "/api/v1/accounts/{id}/keys",
            post(accounts::create_key).get(accounts::list_keys),
        )
        .route(
            "/api/v1/accounts/{id}/keys/{key_id}",
            axum::routing::delete(accounts::revoke_key),
        )
        .route(
            "/api/v1/accounts/{id}/keys/{key_id}/rotate",
            post(accounts::rotate_key),
        )
        .route(
            "/api/v1/accounts/{id}/smtp-credentials",
            post(smtp_logins::create).get(smtp_logins::list),
        )
        .route(
            "/api/v1/accounts/{id}/smtp-credentials/{credential_id}",
            axum::routing::delete(smtp_logins::delete),
        )
        .route(
            "/api/v1/providers",
            post(routing::create_provider).get(routing::list_providers),
        )
        .route(
            "/api/v1/providers/{id}",
            get(routing::get_provider).delete(routing::delete_provider),
        )
        .route(
            "/api/v1/routing-rules",
            post(routing::create_rule).get(routing::list_rules),
        )
        .route(
            "/api/v1/routing-rules/{id}",
            get(routing::get_rule).delete(routing::delete_rule),
        )
        .route("/api/v1/domains", post(domains::create).get(domains::list))
        .route(
            "/api/v1/domains/{domain}",
            get(domains::get).delete(domains::delete),
        )
        .route(
            "/api/v1/webhooks",
            post(webhooks::create).get(webhooks::list),
        )
        .route(
            "/api/v1/webhooks/{id}",
            get(webhooks::get).delete(webhooks::delete),
        )
        .route(
            "/api/v1/webhooks/{id}/deliveries",
            get(webhooks::deliveries),
        )
        // The short paths of the first plan.
        .route("/send", post(messages::send))
        .route("/send/batch", post(messages::send_batch))
        .route("/status/{id}", get(messages::get))
        .route("/stats", get(stats::stats))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(settings.max_body_size))
        .layer(axum::middleware::map_response(json_errors));
    let api = match cors {
        Some(cors) => api.layer(cors),
        None => api,
    };
    api.layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
        .with_state(state)
}

/// Errors made below the handlers (a body over the limit, a malformed
/// path) come as plain text from axum; clients get the JSON shape anyway.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (code, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            "too_large",
            "the request body is larger than http.max_body_size",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported_media_type",
            "send JSON with Content-Type: application/json",
        ),
        StatusCode::NOT_FOUND => ("not_found", "no such endpoint"),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "this endpoint does not take that method",
        ),
        s if s.is_server_error() => ("internal", "internal error"),
        _ => ("bad_request", "the request is malformed"),
    };
    let mut json = ApiError::new(status, code, message).into_response();
    for name in [header::RETRY_AFTER, header::ALLOW] {
        if let Some(value) = response.headers().get(&name) {
            json.headers_mut().insert(name, value.clone());
        }
    }
    json
}

async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi().to_json().unwrap_or_default(),
    )
}

async fn not_found() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
            ])
            .expose_headers([
                HeaderName::from_static("x-request-id"),
                HeaderName::from_static("idempotent-replayed"),
                header::RETRY_AFTER,
            ])
            .max_age(Duration::from_secs(3600)),
    )
}

/// Writes API key "last used" times now and then, in one batch, and
/// forgets idempotency keys older than their 24 hours.
pub async fn flush_key_use(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    let mut ticks: u64 = 0;
    loop {
        tick.tick().await;
        ticks += 1;
        let used = state.tenants.take_used();
        if !used.is_empty()
            && let Err(e) = state.store.touch_api_keys(used).await
        {
            tracing::warn!(error = %e, "cannot record API key use");
        }
        // Expired keys are also caught when reused; this only keeps the
        // table small, so every ten minutes is plenty.
        if ticks % 60 == 1 {
            let cutoff = mailroom_core::time::now_unix_millis() - messages::IDEMPOTENCY_WINDOW_MS;
            if let Err(e) = state.store.expire_idempotency_keys(cutoff).await {
                tracing::warn!(error = %e, "cannot expire idempotency keys");
            }
        }
    }
}
