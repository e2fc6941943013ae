//! The JSON event capture mode hands to workers and webhooks, one per
//! message. Its field names are an interface: worker code in other
//! languages reads them, so add fields freely but never rename one.

use std::collections::BTreeMap;

use mailroom_core::{NewMessage, SessionFacts};
use serde::{Deserialize, Serialize};

use crate::attachments::AttachmentStore;
use crate::mime::Mime;

/// `{"event":"EMAIL_RECEIVED", ...}`: see docs/capture.md for every field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureEvent {
    pub event: String,
    pub uuid: String,
    pub remote_addr: String,
    /// RFC 3339, UTC, milliseconds.
    pub received_at: String,
    pub envelope: EventEnvelope,
    pub authentication: Authentication,
    pub message: EventMessage,
    pub attachments: Vec<EventAttachment>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// MAIL FROM; empty for the null reverse path.
    pub from: String,
    /// RCPT TO, in order.
    pub to: Vec<String>,
    /// The EHLO/HELO name.
    pub helo: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Authentication {
    pub attempted: bool,
    pub mechanism: Option<String>,
    pub username: Option<String>,
    /// The password as sent; for CRAM-MD5 the client's digest.
    pub password: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMessage {
    pub headers: BTreeMap<String, Vec<String>>,
    pub subject: Option<String>,
    pub text: Option<String>,
    pub html: Option<String>,
    /// The whole message as received, only with `include_raw = true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventAttachment {
    pub filename: Option<String>,
    pub content_type: String,
    pub content_id: Option<String>,
    pub size: usize,
    /// Base64, in `memory` mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// An absolute file path, in `tempfile` mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Builds the event; in `tempfile` mode this writes the attachments.
pub(crate) fn build(
    message: &NewMessage,
    facts: &SessionFacts,
    mime: &Mime,
    include_raw: bool,
    attachments: &AttachmentStore,
) -> Result<CaptureEvent, std::io::Error> {
    let uuid = message.id.to_string();
    let remote_addr = match (facts.remote_addr, message.origin.remote_ip) {
        (Some(addr), _) => addr.to_string(),
        (None, Some(ip)) => ip.to_string(),
        (None, None) => String::new(),
    };
    let authentication = match &facts.auth_attempt {
        Some(a) => Authentication {
            attempted: true,
            mechanism: Some(a.mechanism.clone()),
            username: Some(a.username.clone()),
            password: Some(a.password.clone()),
        },
        None => Authentication::default(),
    };
    let stored = attachments.store(&uuid, &mime.attachments)?;
    Ok(CaptureEvent {
        event: "EMAIL_RECEIVED".into(),
        uuid,
        remote_addr,
        received_at: rfc3339_millis(message.received_at),
        envelope: EventEnvelope {
            from: message
                .envelope
                .reverse_path
                .as_ref()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            to: message
                .envelope
                .recipients
                .iter()
                .map(|r| r.address.to_string())
                .collect(),
            helo: message.origin.helo.clone().unwrap_or_default(),
        },
        authentication,
        message: EventMessage {
            headers: mime.headers.clone(),
            subject: mime.subject.clone(),
            text: mime.text.clone(),
            html: mime.html.clone(),
            raw: include_raw.then(|| String::from_utf8_lossy(&message.content).into_owned()),
        },
        attachments: stored,
    })
}

/// `2026-11-21T03:45:00.123Z`.
pub fn rfc3339_millis(unix_millis: i64) -> String {
    let date = mailroom_core::time::iso_datetime(unix_millis.div_euclid(1000));
    format!(
        "{}.{:03}Z",
        date.replacen(' ', "T", 1),
        unix_millis.rem_euclid(1000)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
    }
}
