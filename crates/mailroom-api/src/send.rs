//! The send request: its JSON shape, its checks, and the MIME message and
//! envelope built from it.
//!
//! A structured request becomes a MIME message built with mail-builder
//! (Message-ID and Date included); a `raw` request is taken as the client
//! wrote it, with an explicit envelope. Either way the result is the same
//! [`Built`]: an envelope and the octets to deliver.

use std::collections::BTreeMap;

use base64::Engine as _;
use mail_builder::MessageBuilder;
use mail_builder::headers::address::Address as HeaderAddress;
use mail_builder::headers::text::Text;
use mailroom_core::time::{now_unix_millis, parse_rfc3339};
use mailroom_core::{Address, BodyType, Envelope, MessageId, Notify, Recipient};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;

/// `POST /api/v1/messages`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// The sender: `"a@example.com"` or `{"name":"A","address":"a@example.com"}`.
    pub from: Option<Mailbox>,
    pub to: Option<Mailboxes>,
    pub cc: Option<Mailboxes>,
    /// Recipients not shown in the headers.
    pub bcc: Option<Mailboxes>,
    pub reply_to: Option<Mailboxes>,
    pub subject: Option<String>,
    pub text: Option<String>,
    pub html: Option<String>,
    /// Extra header fields (`X-Campaign`, `List-Unsubscribe`, ...).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub attachments: Vec<AttachmentRequest>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// MT-PRIORITY (RFC 6710), -9 (lowest) to 9 (highest); 0 by default.
    pub priority: Option<i8>,
    /// RFC 3339 time before which the message is not sent.
    pub send_at: Option<String>,
    /// A whole RFC 5322 message, sent as is; needs `envelope`.
    pub raw: Option<String>,
    /// With `raw`: the SMTP envelope.
    pub envelope: Option<EnvelopeRequest>,
}

/// An address, alone or with a display name.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Mailbox {
    Address(String),
    Named {
        #[serde(default)]
        name: Option<String>,
        address: String,
    },
}

impl Mailbox {
    fn address(&self) -> &str {
        match self {
            Mailbox::Address(a) | Mailbox::Named { address: a, .. } => a,
        }
    }

    fn name(&self) -> Option<&str> {
        match self {
            Mailbox::Address(_) => None,
            Mailbox::Named { name, .. } => name.as_deref().filter(|n| !n.is_empty()),
        }
    }
}

/// One mailbox or a list of them.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Mailboxes {
    One(Mailbox),
    Many(Vec<Mailbox>),
}

impl Mailboxes {
    fn as_slice(&self) -> &[Mailbox] {
        match self {
            Mailboxes::One(m) => std::slice::from_ref(m),
            Mailboxes::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachmentRequest {
    pub filename: Option<String>,
    /// `application/pdf`; `application/octet-stream` when absent.
    pub content_type: Option<String>,
    /// The bytes, base64.
    pub content: String,
    /// Makes the part inline, referable from the HTML as `cid:<content_id>`.
    pub content_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeRequest {
    /// The reverse-path; `""` or absent for the null sender `<>`.
    pub from: Option<String>,
    pub to: Vec<String>,
}

/// One recipient as the `202` answer lists it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QueuedRecipient {
    pub address: String,
    pub status: String,
}

/// What a send request becomes.
#[derive(Debug)]
pub struct Built {
    pub id: MessageId,
    pub envelope: Envelope,
    pub content: Vec<u8>,
    /// The From header's address (structured) or the envelope's sender.
    pub sender: Option<Address>,
    pub not_before: Option<i64>,
}

/// Limits a request is checked against.
pub struct Limits {
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub hostname: String,
}

/// Headers a client may not set: the API writes them from the fields.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
];

pub fn build(request: &SendRequest, limits: &Limits) -> Result<Built, ApiError> {
    let priority = request.priority.unwrap_or(0);
    if !(-9..=9).contains(&priority) {
        return Err(ApiError::invalid("priority", "must be between -9 and 9"));
    }
    let not_before = match &request.send_at {
        None => None,
        Some(text) => {
            let at = parse_rfc3339(text).ok_or_else(|| {
                ApiError::invalid(
                    "send_at",
                    "must be an RFC 3339 time, e.g. 2030-01-02T03:04:05Z",
                )
            })?;
            // More than a year ahead is a mistake, not a schedule.
            if at > now_unix_millis() + 366 * 86_400_000 {
                return Err(ApiError::invalid("send_at", "must be within a year"));
            }
            Some(at)
        }
    };
    check_labels(request)?;
    let id = MessageId::new();
    let mut built = if let Some(raw) = &request.raw {
        build_raw(request, raw, id, limits)?
    } else {
        build_structured(request, id, limits)?
    };
    if built.envelope.recipients.len() > limits.max_recipients {
        return Err(ApiError::invalid(
            "to",
            format!("more than {} recipients", limits.max_recipients),
        ));
    }
    if built.content.len() > limits.max_message_size {
        return Err(ApiError::too_large(format!(
            "the message is {} octets; the limit is {}",
            built.content.len(),
            limits.max_message_size
        )));
    }
    built.envelope.priority = priority;
    built.not_before = not_before;
    Ok(built)
}

fn check_labels(request: &SendRequest) -> Result<(), ApiError> {
    if request.tags.len() > 20 {
        return Err(ApiError::invalid("tags", "at most 20 tags"));
    }
    for (i, tag) in request.tags.iter().enumerate() {
        if tag.is_empty() || tag.len() > 100 || tag.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                format!("tags[{i}]"),
                "must be 1 to 100 characters, no control characters",
            ));
        }
    }
    if request.metadata.len() > 50 {
        return Err(ApiError::invalid("metadata", "at most 50 keys"));
    }
    for (k, v) in &request.metadata {
        if k.is_empty() || k.len() > 100 || v.len() > 1000 {
            return Err(ApiError::invalid(
                format!("metadata.{k}"),
                "keys are 1 to 100 characters, values at most 1000",
            ));
        }
    }
    Ok(())
}

fn build_structured(
    request: &SendRequest,
    id: MessageId,
    limits: &Limits,
) -> Result<Built, ApiError> {
    if request.envelope.is_some() {
        return Err(ApiError::invalid("envelope", "is only used with raw"));
    }
    let from = request
        .from
        .as_ref()
        .ok_or_else(|| ApiError::invalid("from", "is required"))?;
    let sender = mailbox_address(from, "from")?;
    let mut recipients = Vec::new();
    let mut builder = MessageBuilder::new()
        .from(header_address(from, "from")?)
        .message_id(format!("{id}@{}", limits.hostname))
        .date(now_unix_millis() / 1000);
    let lists = [
        ("to", &request.to),
        ("cc", &request.cc),
        ("bcc", &request.bcc),
    ];
    for (field, list) in lists {
        let Some(list) = list else { continue };
        let mut shown = Vec::new();
        for (i, m) in list.as_slice().iter().enumerate() {
            let name = format!("{field}[{i}]");
            recipients.push(mailbox_address(m, &name)?);
            shown.push(header_address(m, &name)?);
        }
        if shown.is_empty() {
            continue;
        }
        let value = HeaderAddress::new_list(shown);
        builder = match field {
            "to" => builder.to(value),
            "cc" => builder.cc(value),
            _ => builder, // Bcc recipients are not written in the headers.
        };
    }
    if recipients.is_empty() {
        return Err(ApiError::invalid("to", "at least one recipient is needed"));
    }
    if let Some(list) = &request.reply_to {
        let mut shown = Vec::new();
        for (i, m) in list.as_slice().iter().enumerate() {
            let name = format!("reply_to[{i}]");
            mailbox_address(m, &name)?;
            shown.push(header_address(m, &name)?);
        }
        if !shown.is_empty() {
            builder = builder.reply_to(HeaderAddress::new_list(shown));
        }
    }
    if let Some(subject) = &request.subject {
        one_line(subject, "subject")?;
        builder = builder.subject(subject.as_str());
    }
    if request.text.is_none() && request.html.is_none() && request.attachments.is_empty() {
        return Err(ApiError::invalid(
            "text",
            "one of text, html or attachments is needed",
        ));
    }
    if let Some(text) = &request.text {
        builder = builder.text_body(text.as_str());
    }
    if let Some(html) = &request.html {
        builder = builder.html_body(html.as_str());
    }
    for (name, value) in &request.headers {
        let field = format!("headers.{name}");
        if name.is_empty()
            || name.len() > 76
            || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        {
            return Err(ApiError::invalid(field, "is not a valid header field name"));
        }
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(ApiError::invalid(
                field,
                "is set from the request's fields, not from headers",
            ));
        }
        one_line(value, &field)?;
        builder = builder.header(name.clone(), Text::new(value.clone()));
    }
    let engine = base64::engine::general_purpose::STANDARD;
    for (i, a) in request.attachments.iter().enumerate() {
        let field = format!("attachments[{i}]");
        let bytes = engine.decode(a.content.trim()).map_err(|e| {
            ApiError::invalid(format!("{field}.content"), format!("not base64: {e}"))
        })?;
        let content_type = a
            .content_type
            .clone()
            .unwrap_or_else(|| "application/octet-stream".into());
        if !valid_content_type(&content_type) {
            return Err(ApiError::invalid(
                format!("{field}.content_type"),
                "must be type/subtype, e.g. application/pdf",
            ));
        }
        if let Some(name) = &a.filename {
            one_line(name, &format!("{field}.filename"))?;
        }
        builder = match &a.content_id {
            Some(cid) => {
                if cid.is_empty()
                    || !cid
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>')
                {
                    return Err(ApiError::invalid(
                        format!("{field}.content_id"),
                        "must be printable ASCII without <>",
                    ));
                }
                builder.inline(content_type, cid.clone(), bytes)
            }
            None => builder.attachment(
                content_type,
                a.filename
                    .clone()
                    .unwrap_or_else(|| format!("attachment-{}", i + 1)),
                bytes,
            ),
        };
    }
    let content = builder
        .write_to_vec()
        .map_err(|e| ApiError::internal("building MIME", e))?;
    let smtputf8 = !sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii());
    Ok(Built {
        id,
        envelope: envelope(Some(sender.clone()), recipients, smtputf8, &content),
        content,
        sender: Some(sender),
        not_before: None,
    })
}

fn build_raw(
    request: &SendRequest,
    raw: &str,
    id: MessageId,
    limits: &Limits,
) -> Result<Built, ApiError> {
    let structured = request.from.is_some()
        || request.to.is_some()
        || request.cc.is_some()
        || request.bcc.is_some()
        || request.reply_to.is_some()
        || request.subject.is_some()
        || request.text.is_some()
        || request.html.is_some()
        || !request.headers.is_empty()
        || !request.attachments.is_empty();
    if structured {
        return Err(ApiError::invalid(
            "raw",
            "raw carries the whole message: leave out from, to, subject, text, html, headers and attachments",
        ));
    }
    let envelope_request = request
        .envelope
        .as_ref()
        .ok_or_else(|| ApiError::invalid("envelope", "is required with raw"))?;
    let reverse_path = match envelope_request.from.as_deref() {
        None | Some("") => None,
        Some(text) => Some(parse_address(text, "envelope.from")?),
    };
    let mut recipients = Vec::new();
    for (i, to) in envelope_request.to.iter().enumerate() {
        recipients.push(parse_address(to, &format!("envelope.to[{i}]"))?);
    }
    if recipients.is_empty() {
        return Err(ApiError::invalid(
            "envelope.to",
            "at least one recipient is needed",
        ));
    }
    let content = normalize_raw(raw, id, &limits.hostname)?;
    let smtputf8 = reverse_path.as_ref().is_some_and(|a| !a.is_ascii())
        || recipients.iter().any(|r| !r.is_ascii());
    Ok(Built {
        id,
        envelope: envelope(reverse_path.clone(), recipients, smtputf8, &content),
        content,
        sender: reverse_path,
        not_before: None,
    })
}

/// CRLF line ends, and the Date and Message-ID a submission server adds
/// when the client left them out (RFC 6409 §8).
fn normalize_raw(raw: &str, id: MessageId, hostname: &str) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::with_capacity(raw.len() + 128);
    let mut header_end = None;
    for (n, line) in raw.split_inclusive('\n').enumerate() {
        let line = line.trim_end_matches('\n').trim_end_matches('\r');
        if line.len() > 998 {
            return Err(ApiError::invalid(
                "raw",
                format!("line {} is longer than 998 octets (RFC 5322 §2.1.1)", n + 1),
            ));
        }
        if header_end.is_none() && line.is_empty() {
            header_end = Some(out.len());
        }
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let head_len = header_end.unwrap_or(out.len());
    let head = &out[..head_len];
    if head.is_empty() || !head.contains(&b':') {
        return Err(ApiError::invalid("raw", "must start with header fields"));
    }
    let has = |name: &str| {
        head.split(|&b| b == b'\n').any(|line| {
            line.len() > name.len()
                && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
                && line[name.len()] == b':'
        })
    };
    let mut prefix = String::new();
    if !has("Date") {
        prefix.push_str(&format!(
            "Date: {}\r\n",
            mailroom_core::time::rfc5322_date(now_unix_millis() / 1000)
        ));
    }
    if !has("Message-ID") {
        prefix.push_str(&format!("Message-ID: <{id}@{hostname}>\r\n"));
    }
    if !prefix.is_empty() {
        out.splice(0..0, prefix.into_bytes());
    }
    Ok(out)
}

/// The domain of the first address in the From header, if there is one:
/// `From: "Ann" <ann@example.com>` gives `example.com`.
pub fn header_from_domain(content: &[u8]) -> Option<String> {
    let fields = header_fields(content);
    let (_, value) = fields
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("from"))?;
    let address = match (value.rfind('<'), value.rfind('>')) {
        (Some(open), Some(close)) if open < close => &value[open + 1..close],
        _ => value.split(',').next().unwrap_or(value).trim(),
    };
    let domain = address.rsplit_once('@')?.1.trim();
    (!domain.is_empty()).then(|| domain.to_ascii_lowercase())
}

/// A message's header fields (up to the blank line), unfolded (RFC 5322
/// §2.2.3), as (name, value) with the name trimmed.
pub fn header_fields(content: &[u8]) -> Vec<(String, String)> {
    let end = content
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(content.len());
    let head = String::from_utf8_lossy(&content[..end]);
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    unfolded
        .split("\r\n")
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name.trim().to_owned(), value.to_owned()))
        })
        .collect()
}

fn envelope(
    reverse_path: Option<Address>,
    recipients: Vec<Address>,
    smtputf8: bool,
    content: &[u8],
) -> Envelope {
    Envelope {
        reverse_path,
        recipients: recipients
            .into_iter()
            .map(|address| Recipient {
                address,
                orcpt: None,
                notify: Notify::empty(),
            })
            .collect(),
        env_id: None,
        ret: None,
        body_type: if content.is_ascii() {
            BodyType::SevenBit
        } else {
            BodyType::EightBitMime
        },
        smtputf8,
        priority: 0,
    }
}

fn mailbox_address(m: &Mailbox, field: &str) -> Result<Address, ApiError> {
    let field = match m {
        Mailbox::Address(_) => field.to_owned(),
        Mailbox::Named { .. } => format!("{field}.address"),
    };
    parse_address(m.address(), &field)
}

fn header_address(m: &Mailbox, field: &str) -> Result<HeaderAddress<'static>, ApiError> {
    let address = m.address().to_owned();
    Ok(match m.name() {
        Some(name) => {
            one_line(name, &format!("{field}.name"))?;
            HeaderAddress::new_address(Some(name.to_owned()), address)
        }
        None => HeaderAddress::new_address(None::<String>, address),
    })
}

/// An address as SMTP carries it: `local@domain`, nothing around it.
pub fn parse_address(text: &str, field: &str) -> Result<Address, ApiError> {
    let bad = text
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || "<>(),;:\"[]\\".contains(c));
    if bad {
        return Err(ApiError::invalid(
            field,
            format!("{text:?} is not an address (local@domain, no name or brackets)"),
        ));
    }
    let address = Address::parse(text)
        .map_err(|e| ApiError::invalid(field, format!("{text:?} is not an address: {e}")))?;
    let domain = address.domain();
    if domain.starts_with('.') || domain.ends_with('.') || domain.contains("..") {
        return Err(ApiError::invalid(
            field,
            format!("{text:?} has a bad domain"),
        ));
    }
    Ok(address)
}

fn one_line(text: &str, field: &str) -> Result<(), ApiError> {
    if text.contains(['\r', '\n']) || text.len() > 998 {
        return Err(ApiError::invalid(
            field,
            "must be one line of at most 998 octets",
        ));
    }
    Ok(())
}

fn valid_content_type(text: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    let essence = text.split(';').next().unwrap_or("").trim();
    matches!(essence.split_once('/'), Some((t, s)) if token(t) && token(s))
        && !text.contains(['\r', '\n'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_message_size: 1 << 20,
            max_recipients: 100,
            hostname: "mx.test".into(),
        }
    }

    fn request(json: &str) -> SendRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn structured_mail_has_headers_and_bcc_only_in_the_envelope() {
        let r = request(
            r#"{"from":{"name":"Ann","address":"ann@a.test"},"to":"bob@b.test",
                "bcc":["eve@c.test"],"subject":"Grüße","text":"hello","tags":["t"]}"#,
        );
        let built = build(&r, &limits()).unwrap();
        let text = String::from_utf8(built.content.clone()).unwrap();
        assert!(text.contains("Message-ID: <"), "{text}");
        assert!(text.contains("@mx.test>"), "{text}");
        assert!(text.contains("Date: "), "{text}");
        assert!(
            text.contains("To: <bob@b.test>") || text.contains("To: bob@b.test"),
            "{text}"
        );
        assert!(!text.contains("eve@c.test"), "{text}");
        assert!(
            text.contains("=?utf-8?"),
            "subject is RFC 2047 encoded: {text}"
        );
        let rcpts: Vec<&str> = built
            .envelope
            .recipients
            .iter()
            .map(|r| r.address.as_str())
            .collect();
        assert_eq!(rcpts, ["bob@b.test", "eve@c.test"]);
        assert_eq!(built.envelope.reverse_path.unwrap().as_str(), "ann@a.test");
    }

    #[test]
    fn header_injection_is_refused() {
        for json in [
            r#"{"from":"a@a.test","to":"b@b.test","subject":"x\r\nBcc: x@x.test","text":"t"}"#,
            r#"{"from":"a@a.test","to":"b@b.test","headers":{"X-A":"1\nBcc: x@x.test"},"text":"t"}"#,
            r#"{"from":"a@a.test","to":"b@b.test","headers":{"Bcc":"x@x.test"},"text":"t"}"#,
            r#"{"from":"a@a.test","to":"b@b.test>, <x@x.test","text":"t"}"#,
            r#"{"from":{"name":"A\r\nBcc: x","address":"a@a.test"},"to":"b@b.test","text":"t"}"#,
        ] {
            let e = build(&request(json), &limits()).unwrap_err();
            assert_eq!(e.status.as_u16(), 422, "{json}");
        }
    }

    #[test]
    fn raw_gets_crlf_date_and_message_id() {
        let r = request(
            r#"{"raw":"Subject: hi\nFrom: a@a.test\n\nbody\n","envelope":{"from":"a@a.test","to":["b@b.test"]}}"#,
        );
        let built = build(&r, &limits()).unwrap();
        let text = String::from_utf8(built.content).unwrap();
        assert!(text.starts_with("Date: "), "{text}");
        assert!(text.contains("Message-ID: <"), "{text}");
        assert!(
            text.ends_with("Subject: hi\r\nFrom: a@a.test\r\n\r\nbody\r\n"),
            "{text}"
        );
    }

    #[test]
    fn from_header_domain() {
        let m = b"Subject: x\r\nFrom: \"Ann, A\" <ann@Example.COM>\r\n\r\nFrom: x@y.z\r\n";
        assert_eq!(header_from_domain(m).as_deref(), Some("example.com"));
        let m = b"FROM:\r\n bob@b.test\r\n\r\n";
        assert_eq!(header_from_domain(m).as_deref(), Some("b.test"));
        assert_eq!(header_from_domain(b"Subject: x\r\n\r\n"), None);
    }

    #[test]
    fn limits_are_enforced() {
        let mut l = limits();
        l.max_recipients = 1;
        let r = request(r#"{"from":"a@a.test","to":["b@b.test","c@c.test"],"text":"t"}"#);
        assert_eq!(build(&r, &l).unwrap_err().status.as_u16(), 422);
        let mut l = limits();
        l.max_message_size = 100;
        let r = request(r#"{"from":"a@a.test","to":"b@b.test","text":"t"}"#);
        assert_eq!(build(&r, &l).unwrap_err().status.as_u16(), 413);
        let r = request(r#"{"from":"a@a.test","to":"b@b.test","text":"t","priority":10}"#);
        assert_eq!(
            build(&r, &limits()).unwrap_err().field.as_deref(),
            Some("priority")
        );
        let r = request(r#"{"from":"a@a.test","to":"b@b.test","text":"t","send_at":"tomorrow"}"#);
        assert_eq!(
            build(&r, &limits()).unwrap_err().field.as_deref(),
            Some("send_at")
        );
    }
}
