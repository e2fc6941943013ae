//! MIME parsing for capture mode: a raw message in, decoded headers,
//! subject, text, HTML and attachment parts out.
//!
//! mail-parser does the decoding (RFC 2047 words, transfer encodings,
//! charsets); this module only decides what a developer sees. Every value
//! comes out as UTF-8, whatever the message declared, so workers and the
//! web UI never have to care about charsets.

use std::collections::BTreeMap;

use mail_parser::{Address, Header, HeaderValue, Message, MessageParser, MimeHeaders, PartType};

/// What capture mode shows of a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mime {
    /// Header name (as written in the first occurrence) to every value, in
    /// order, decoded.
    pub headers: BTreeMap<String, Vec<String>>,
    pub subject: Option<String>,
    pub from: Option<String>,
    /// The text/plain body; derived from the HTML when there is no text part.
    pub text: Option<String>,
    /// The text/html body, when the message has one.
    pub html: Option<String>,
    pub attachments: Vec<Part>,
    pub addresses: Addresses,
    pub message_id: Option<String>,
    /// The Date header, RFC 3339.
    pub date: Option<String>,
}

/// The address headers, split into name and address (for the Mailpit API).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Addresses {
    pub from: Vec<Mailbox>,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub reply_to: Vec<Mailbox>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mailbox {
    pub name: String,
    pub address: String,
}

/// An attachment or inline part (an image referenced by `cid:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub filename: Option<String>,
    pub content_type: String,
    /// Without the angle brackets.
    pub content_id: Option<String>,
    pub inline: bool,
    /// The decoded content.
    pub content: Vec<u8>,
}

/// Parses `raw`. A message mail-parser cannot make sense of still yields a
/// (mostly empty) result: capture mode keeps whatever a client sends.
pub fn parse(raw: &[u8]) -> Mime {
    let Some(message) = MessageParser::default().parse(raw) else {
        return Mime::default();
    };
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for header in message.headers() {
        let value = header_text(header, raw);
        match headers
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(header.name()))
        {
            Some((_, values)) => values.push(value),
            None => {
                headers.insert(header.name().to_owned(), vec![value]);
            }
        }
    }
    let html = message
        .html_part(0)
        .filter(|p| p.is_text_html())
        .and_then(|p| p.text_contents())
        .map(str::to_owned);
    let text = match message.text_part(0) {
        Some(p) if !p.is_text_html() => p.text_contents().map(str::to_owned),
        Some(_) => message.body_text(0).map(|t| t.into_owned()),
        None => None,
    };
    Mime {
        subject: message.subject().map(str::to_owned),
        from: message.from().map(address_text),
        attachments: attachments(&message),
        addresses: Addresses {
            from: mailboxes(message.from()),
            to: mailboxes(message.to()),
            cc: mailboxes(message.cc()),
            reply_to: mailboxes(message.reply_to()),
        },
        message_id: message.message_id().map(str::to_owned),
        date: message.date().map(|d| d.to_rfc3339()),
        headers,
        text,
        html,
    }
}

fn attachments(message: &Message<'_>) -> Vec<Part> {
    message
        .attachments()
        .map(|part| {
            let content_type = part
                .content_type()
                .map(|ct| match ct.subtype() {
                    Some(sub) => format!("{}/{}", ct.ctype(), sub),
                    None => ct.ctype().to_owned(),
                })
                .unwrap_or_else(|| "application/octet-stream".into())
                .to_ascii_lowercase();
            // Mailpit's rule: a part is inline when it says so or when the
            // HTML can reference it by Content-ID.
            let inline = matches!(part.body, PartType::InlineBinary(_))
                || part.content_disposition().is_some_and(|d| d.is_inline())
                || part.content_id().is_some();
            Part {
                filename: part.attachment_name().map(str::to_owned),
                content_type,
                content_id: part.content_id().map(|id| {
                    id.trim()
                        .trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_owned()
                }),
                inline,
                content: part.contents().to_vec(),
            }
        })
        .collect()
}

/// A header's value as a person reads it: encoded words decoded, folding
/// removed. Structured headers mail-parser does not turn into text (dates,
/// content types, trace headers) are shown as sent, unfolded.
fn header_text(header: &Header<'_>, raw: &[u8]) -> String {
    match header.value() {
        HeaderValue::Text(text) => unfold(text),
        HeaderValue::TextList(list) => unfold(&list.join(", ")),
        HeaderValue::Address(address) => address_text(address),
        _ => {
            let start = header.offset_start() as usize;
            let end = (header.offset_end() as usize).min(raw.len());
            let bytes = raw.get(start..end).unwrap_or_default();
            unfold(&String::from_utf8_lossy(bytes))
        }
    }
}

fn unfold(value: &str) -> String {
    value
        .split(['\r', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn mailboxes(address: Option<&Address<'_>>) -> Vec<Mailbox> {
    let one = |a: &mail_parser::Addr<'_>| Mailbox {
        name: a.name.as_deref().unwrap_or_default().to_owned(),
        address: a.address.as_deref().unwrap_or_default().to_owned(),
    };
    match address {
        None => Vec::new(),
        Some(Address::List(list)) => list.iter().map(one).collect(),
        Some(Address::Group(groups)) => groups
            .iter()
            .flat_map(|g| g.addresses.iter().map(one))
            .collect(),
    }
}

/// `Name <addr>, other@example.test`.
pub(crate) fn address_text(address: &Address<'_>) -> String {
    let one = |name: Option<&str>, addr: Option<&str>| match (name, addr) {
        (Some(n), Some(a)) if !n.is_empty() => format!("{n} <{a}>"),
        (_, Some(a)) => a.to_owned(),
        (Some(n), None) => n.to_owned(),
        (None, None) => String::new(),
    };
    match address {
        Address::List(list) => list
            .iter()
            .map(|a| one(a.name.as_deref(), a.address.as_deref()))
            .collect::<Vec<_>>()
            .join(", "),
        Address::Group(groups) => groups
            .iter()
            .map(|g| {
                let members = g
                    .addresses
                    .iter()
                    .map(|a| one(a.name.as_deref(), a.address.as_deref()))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("{}: {members};", g.name.as_deref().unwrap_or(""))
            })
            .collect::<Vec<_>>()
            .join(" "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MULTIPART: &[u8] = b"From: =?UTF-8?B?SsO8cmdlbg==?= <j@example.test>\r\n\
To: a@example.test, \"B\" <b@example.test>\r\n\
Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe_=E2=9C=93?=\r\n\
X-Folded: one\r\n two\r\n\
Content-Type: multipart/mixed; boundary=\"b1\"\r\n\
\r\n\
--b1\r\n\
Content-Type: multipart/alternative; boundary=\"b2\"\r\n\
\r\n\
--b2\r\n\
Content-Type: text/plain; charset=iso-8859-1\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
Caf=E9 cr=E8me =\r\n\
soft break\r\n\
--b2\r\n\
Content-Type: text/html; charset=utf-8\r\n\
\r\n\
<p>Caf\xc3\xa9 <img src=\"cid:logo@x\"></p>\r\n\
--b2--\r\n\
--b1\r\n\
Content-Type: image/png\r\n\
Content-ID: <logo@x>\r\n\
Content-Disposition: inline; filename=\"logo.png\"\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
iVBORw0KGgo=\r\n\
--b1\r\n\
Content-Type: application/pdf; name=\"r.pdf\"\r\n\
Content-Disposition: attachment; filename=\"r.pdf\"\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
JVBERi0xLjQK\r\n\
--b1--\r\n";

    #[test]
    fn decodes_headers_bodies_and_parts() {
        let mime = parse(MULTIPART);
        assert_eq!(mime.subject.as_deref(), Some("Grüße ✓"));
        assert_eq!(mime.headers["Subject"], vec!["Grüße ✓".to_owned()]);
        assert_eq!(
            mime.headers["From"],
            vec!["Jürgen <j@example.test>".to_owned()]
        );
        assert_eq!(
            mime.headers["To"],
            vec!["a@example.test, B <b@example.test>".to_owned()]
        );
        assert_eq!(mime.headers["X-Folded"], vec!["one two".to_owned()]);
        assert_eq!(mime.text.as_deref(), Some("Café crème soft break"));
        assert_eq!(
            mime.html.as_deref(),
            Some("<p>Café <img src=\"cid:logo@x\"></p>")
        );
        assert_eq!(mime.attachments.len(), 2);
        let logo = &mime.attachments[0];
        assert_eq!(logo.content_id.as_deref(), Some("logo@x"));
        assert_eq!(logo.content_type, "image/png");
        assert!(logo.inline);
        assert_eq!(logo.content, b"\x89PNG\r\n\x1a\n");
        let pdf = &mime.attachments[1];
        assert_eq!(pdf.filename.as_deref(), Some("r.pdf"));
        assert_eq!(pdf.content, b"%PDF-1.4\n");
        assert!(!pdf.inline);
    }

    #[test]
    fn garbage_never_panics() {
        for input in [
            &b""[..],
            b"\r\n\r\n",
            b"\xff\xfe",
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x",
        ] {
            let _ = parse(input);
        }
    }
}
