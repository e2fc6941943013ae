//! The web UI and the JSON API over the inbox, plus a Mailpit-compatible
//! subset (Mailpit's paths and field names) so existing test helpers work.
//!
//! Handlers are thin: look the message up, parse it when a detail view
//! needs the MIME structure, map to JSON. The UI is one static page built
//! into the binary; live updates come over Server-Sent Events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::inbox::{Inbox, InboxError, Stored};
use crate::mime::{self, Mailbox};

const INDEX: &str = include_str!("ui/index.html");

/// Every route, over `inbox`.
pub fn router(inbox: Arc<Inbox>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(INDEX) }))
        .route("/api/messages", get(list).delete(delete_all))
        .route("/api/messages/{id}", get(detail).delete(delete_one))
        .route("/api/messages/{id}/raw", get(raw))
        .route("/api/messages/{id}/html", get(html_view))
        .route("/api/messages/{id}/parts/{index}", get(part))
        .route("/api/messages/{id}/cid/{cid}", get(cid_part))
        .route("/api/messages/{id}/read", post(set_read))
        .route("/api/events", get(events))
        .route("/api/v1/messages", get(mailpit_list).delete(mailpit_delete))
        .route("/api/v1/search", get(mailpit_list))
        .route("/api/v1/message/{id}", get(mailpit_message))
        .route("/api/v1/message/{id}/raw", get(raw))
        .route("/api/v1/message/{id}/part/{index}", get(part))
        .with_state(inbox)
}

type Inboxes = State<Arc<Inbox>>;

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    query: String,
    #[serde(default)]
    start: usize,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    50
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": "no such message"})),
    )
        .into_response()
}

/// The inbox file failed: logged here, a bare 500 for the client.
fn unavailable(err: InboxError) -> Response {
    tracing::warn!(error = %err, "capture inbox request failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({"error": "inbox unavailable"})),
    )
        .into_response()
}

/// The message and its content, or the response to give instead.
async fn load(inbox: &Inbox, id: &str) -> Result<(Stored, Vec<u8>), Response> {
    match inbox.message(id).await {
        Ok(Some(found)) => Ok(found),
        Ok(None) => Err(not_found()),
        Err(err) => Err(unavailable(err)),
    }
}

async fn load_raw(inbox: &Inbox, id: &str) -> Result<Vec<u8>, Response> {
    match inbox.raw(id).await {
        Ok(Some(raw)) => Ok(raw),
        Ok(None) => Err(not_found()),
        Err(err) => Err(unavailable(err)),
    }
}

async fn list(State(inbox): Inboxes, Query(q): Query<ListQuery>) -> Response {
    let (page, total) = match inbox.list(&q.query, q.start, q.limit.min(1000)).await {
        Ok(found) => found,
        Err(err) => return unavailable(err),
    };
    Json(json!({
        "total": total,
        "unread": inbox.unread(),
        "start": q.start,
        "count": page.len(),
        "messages": page.iter().map(|m| m.summary()).collect::<Vec<_>>(),
    }))
    .into_response()
}

#[derive(Serialize)]
struct PartInfo {
    index: usize,
    filename: Option<String>,
    content_type: String,
    content_id: Option<String>,
    inline: bool,
    size: usize,
}

async fn detail(State(inbox): Inboxes, Path(id): Path<String>) -> Response {
    let (mut m, raw) = match load(&inbox, &id).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    m.read = mark_read(&inbox, &id).await || m.read;
    let mime = parse(raw).await;
    let parts: Vec<PartInfo> = mime
        .attachments
        .iter()
        .enumerate()
        .map(|(index, p)| PartInfo {
            index,
            filename: p.filename.clone(),
            content_type: p.content_type.clone(),
            content_id: p.content_id.clone(),
            inline: p.inline,
            size: p.content.len(),
        })
        .collect();
    Json(json!({
        "summary": m.summary(),
        "remote_addr": m.remote_addr,
        "helo": m.helo,
        "authentication": m.authentication,
        "headers": mime.headers,
        "text": mime.text,
        "html": mime.html,
        "attachments": parts,
    }))
    .into_response()
}

/// Opening a message marks it read; a failure to do so is logged, the
/// message is shown anyway.
async fn mark_read(inbox: &Inbox, id: &str) -> bool {
    match inbox.set_read(id, true).await {
        Ok(found) => found,
        Err(err) => {
            tracing::warn!(error = %err, "cannot mark a capture message read");
            false
        }
    }
}

/// MIME parsing is CPU work; a large message must not stall the reactor.
async fn parse(raw: Vec<u8>) -> mime::Mime {
    tokio::task::spawn_blocking(move || mime::parse(&raw))
        .await
        .unwrap_or_default()
}

async fn raw(State(inbox): Inboxes, Path(id): Path<String>) -> Response {
    match load_raw(&inbox, &id).await {
        Ok(raw) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], raw).into_response(),
        Err(response) => response,
    }
}

#[derive(Deserialize)]
struct HtmlQuery {
    #[serde(default)]
    remote: bool,
}

/// The message's HTML, for a sandboxed iframe. The Content-Security-Policy
/// blocks scripts always and remote content unless `?remote=true`: opening a
/// mail must not tell a tracker it was read.
async fn html_view(
    State(inbox): Inboxes,
    Path(id): Path<String>,
    Query(q): Query<HtmlQuery>,
) -> Response {
    let mime = match load_raw(&inbox, &id).await {
        Ok(raw) => parse(raw).await,
        Err(response) => return response,
    };
    let html = mime.html.unwrap_or_default();
    let base = format!("/api/messages/{id}/cid/");
    let html = html
        .replace("\"cid:", &format!("\"{base}"))
        .replace("'cid:", &format!("'{base}"));
    let csp = if q.remote {
        "default-src 'none'; img-src * data:; style-src * 'unsafe-inline'; font-src * data:"
    } else {
        "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; font-src data:"
    };
    let mut response = Html(html).into_response();
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(csp),
    );
    response
}

async fn part(State(inbox): Inboxes, Path((id, index)): Path<(String, usize)>) -> Response {
    let mime = match load_raw(&inbox, &id).await {
        Ok(raw) => parse(raw).await,
        Err(response) => return response,
    };
    match mime.attachments.into_iter().nth(index) {
        Some(p) => download(p, true),
        None => not_found(),
    }
}

async fn cid_part(State(inbox): Inboxes, Path((id, cid)): Path<(String, String)>) -> Response {
    let mime = match load_raw(&inbox, &id).await {
        Ok(raw) => parse(raw).await,
        Err(response) => return response,
    };
    match mime
        .attachments
        .into_iter()
        .find(|p| p.content_id.as_deref() == Some(cid.as_str()))
    {
        Some(p) => download(p, false),
        None => not_found(),
    }
}

fn download(p: mime::Part, attachment: bool) -> Response {
    let content_type = HeaderValue::from_str(&p.content_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let original = p.filename.as_deref().unwrap_or("attachment");
    // The sender chose the name: a plain ASCII fallback, and the real name
    // in RFC 5987 encoding for browsers that read it (RFC 6266).
    let ascii: String = original
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded: String = original
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let disposition = if attachment {
        format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
    } else {
        "inline".to_owned()
    };
    let disposition =
        HeaderValue::from_str(&disposition).unwrap_or(HeaderValue::from_static("attachment"));
    let mut response = p.content.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CONTENT_DISPOSITION, disposition);
    // Attachments are the sender's bytes: never let the browser run them
    // as our origin's HTML.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

async fn delete_one(State(inbox): Inboxes, Path(id): Path<String>) -> Response {
    match inbox.delete(&id).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => not_found(),
        Err(err) => unavailable(err),
    }
}

async fn delete_all(State(inbox): Inboxes) -> Response {
    match inbox.clear().await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(err) => unavailable(err),
    }
}

#[derive(Deserialize)]
struct ReadBody {
    read: bool,
}

async fn set_read(
    State(inbox): Inboxes,
    Path(id): Path<String>,
    Json(body): Json<ReadBody>,
) -> Response {
    match inbox.set_read(&id, body.read).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => not_found(),
        Err(err) => unavailable(err),
    }
}

/// Server-Sent Events: one `change` event per inbox change. A client that
/// falls behind gets `resync` and reloads the list.
async fn events(
    State(inbox): Inboxes,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let rx = inbox.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = match rx.recv().await {
            Ok(change) => Event::default()
                .event("change")
                .json_data(&change)
                .unwrap_or_else(|_| Event::default().event("resync").data("{}")),
            Err(broadcast::error::RecvError::Lagged(_)) => {
                Event::default().event("resync").data("{}")
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

// ---- Mailpit-compatible subset -------------------------------------------

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct MailpitAddress {
    name: String,
    address: String,
}

fn mailpit_addresses(list: &[Mailbox]) -> Vec<MailpitAddress> {
    list.iter()
        .map(|m| MailpitAddress {
            name: m.name.clone(),
            address: m.address.clone(),
        })
        .collect()
}

fn mailpit_summary(m: &Stored) -> Value {
    let a = &m.addresses;
    json!({
        "ID": m.id.to_string(),
        "MessageID": m.message_id,
        "Read": m.read,
        "From": a.from.first().map(|f| MailpitAddress { name: f.name.clone(), address: f.address.clone() }),
        "To": mailpit_addresses(&a.to),
        "Cc": mailpit_addresses(&a.cc),
        "Bcc": [],
        "ReplyTo": mailpit_addresses(&a.reply_to),
        "Subject": m.subject,
        "Created": crate::event::rfc3339_millis(m.received_at),
        "Tags": [],
        "Size": m.size,
        "Attachments": m.attachments,
        "Snippet": m.snippet,
    })
}

async fn mailpit_list(State(inbox): Inboxes, Query(q): Query<ListQuery>) -> Response {
    let (page, total) = match inbox.list(&q.query, q.start, q.limit.min(1000)).await {
        Ok(found) => found,
        Err(err) => return unavailable(err),
    };
    Json(json!({
        "total": inbox.len(),
        "unread": inbox.unread(),
        "count": page.len(),
        "messages_count": total,
        "start": q.start,
        "tags": [],
        "messages": page.iter().map(mailpit_summary).collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn mailpit_message(State(inbox): Inboxes, Path(id): Path<String>) -> Response {
    let (m, raw) = match load(&inbox, &id).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    mark_read(&inbox, &id).await;
    let mime = parse(raw).await;
    let parts = |inline: bool| -> Vec<Value> {
        mime.attachments
            .iter()
            .enumerate()
            .filter(|(_, p)| p.inline == inline)
            .map(|(i, p)| {
                json!({
                    "PartID": i.to_string(),
                    "FileName": p.filename.clone().unwrap_or_default(),
                    "ContentType": p.content_type,
                    "ContentID": p.content_id.clone().unwrap_or_default(),
                    "Size": p.content.len(),
                })
            })
            .collect()
    };
    let a = &mime.addresses;
    Json(json!({
        "ID": m.id.to_string(),
        "MessageID": mime.message_id.clone().unwrap_or_default(),
        "From": a.from.first().map(|f| MailpitAddress { name: f.name.clone(), address: f.address.clone() }),
        "To": mailpit_addresses(&a.to),
        "Cc": mailpit_addresses(&a.cc),
        "Bcc": [],
        "ReplyTo": mailpit_addresses(&a.reply_to),
        "ReturnPath": m.envelope_from,
        "Subject": mime.subject.clone().unwrap_or_default(),
        "Date": mime.date.clone().unwrap_or_else(|| crate::event::rfc3339_millis(m.received_at)),
        "Tags": [],
        "Text": mime.text.clone().unwrap_or_default(),
        "HTML": mime.html.clone().unwrap_or_default(),
        "Size": m.size,
        "Inline": parts(true),
        "Attachments": parts(false),
    }))
    .into_response()
}

#[derive(Deserialize, Default)]
struct MailpitDelete {
    #[serde(rename = "IDs", default)]
    ids: Vec<String>,
}

/// Mailpit: a JSON body `{"IDs": [...]}` deletes those; no body (or no
/// IDs) deletes everything.
async fn mailpit_delete(State(inbox): Inboxes, body: axum::body::Bytes) -> Response {
    let request: MailpitDelete = if body.is_empty() {
        MailpitDelete::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(_) => return StatusCode::BAD_REQUEST.into_response(),
        }
    };
    let result = if request.ids.is_empty() {
        inbox.clear().await
    } else {
        let mut result = Ok(());
        for id in &request.ids {
            if let Err(err) = inbox.delete(id).await {
                result = Err(err);
                break;
            }
        }
        result
    };
    match result {
        Ok(()) => StatusCode::OK.into_response(),
        Err(err) => unavailable(err),
    }
}
