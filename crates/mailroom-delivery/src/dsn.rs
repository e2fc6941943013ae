//! Delivery status notifications: the report a sender gets when mail fails,
//! is delayed, or (when asked) is delivered.
//!
//! [`build`] writes a complete RFC 5322 message: a `multipart/report`
//! (RFC 6522) with a human-readable part, a `message/delivery-status` part
//! (RFC 3464) and the returned original; [`wants`] says whether a recipient's
//! `NOTIFY=` (RFC 3461) asks for a report at all; [`status_from_reply`]
//! turns a remote reply into the `Status:` to report.
//!
//! The message is written by hand rather than with mail-builder: its shape
//! is fixed, and the returned original must go out byte for byte (a
//! `message/rfc822` part may only be 7bit, 8bit or binary, RFC 2046
//! §5.2.1), which a builder's automatic transfer encoding would fight.
//! Everything that comes from outside (addresses, remote replies, the
//! ENVID, the original's Message-ID) is folded onto one line before it
//! goes into a field, so it can neither start a field of its own nor a new
//! recipient block. The machine-readable part stays ASCII: non-ASCII
//! addresses use the `utf-8` address type with `\x{..}` escapes
//! (RFC 6533 `utf-8-addr-xtext`).
//!
//! This module does no I/O; it reads the clock for the `Date:` field.

use std::fmt::Write as _;

use base64::Engine as _;
use mailroom_core::reply::Enhanced;
use mailroom_core::time::{now_unix_millis, rfc5322_date};
use mailroom_core::{Address, MessageId, Notify, Reply, Ret};

/// What happened to one recipient (RFC 3464 §2.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Delivery failed and will not be tried again.
    Failed,
    /// Delivery has not succeeded yet and will be retried.
    Delayed,
    /// Delivered to the recipient's mailbox (or a DSN-aware next hop).
    Delivered,
    /// Handed to a next hop that will not send DSNs itself.
    Relayed,
    /// Delivered to a list or alias that passed it on to its members.
    Expanded,
}

impl Action {
    /// The lowercase token used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
            Action::Expanded => "expanded",
        }
    }
}

/// One recipient's block in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnRecipient {
    /// Written as `Final-Recipient: rfc822; addr`, or `utf-8; ...` when the
    /// address is not ASCII.
    pub final_recipient: Address,
    /// The stored ORCPT, `addr-type;addr` (already xtext-decoded by the
    /// SMTP parser), written as `Original-Recipient:`.
    pub original_recipient: Option<String>,
    pub action: Action,
    /// Enhanced status, e.g. `5.1.1`; see [`status_from_reply`]. A value
    /// that is not a valid status is replaced by the action's generic one
    /// (`5.0.0`, `4.0.0`, `2.0.0`).
    pub status: String,
    /// The host we talked to: `mx.example.test` becomes
    /// `Remote-MTA: dns; mx.example.test`; a value that already names a
    /// type (`dns; ...`) is kept.
    pub remote_mta: Option<String>,
    /// The remote reply, e.g. `550 5.1.1 No such user` (a multi-line
    /// reply's CR/LF are folded to spaces), written as
    /// `Diagnostic-Code: smtp; ...`; a value that already names a type
    /// (`x-unix; ...`) is kept.
    pub diagnostic: Option<String>,
    /// Unix seconds, written as `Last-Attempt-Date:`.
    pub last_attempt: Option<i64>,
    /// Unix seconds, written as `Will-Retry-Until:`; only for
    /// [`Action::Delayed`] (RFC 3464 §2.3.9), ignored otherwise.
    pub will_retry_until: Option<i64>,
}

/// Everything [`build`] needs to write one report.
#[derive(Debug, Clone)]
pub struct DsnRequest<'a> {
    /// Our hostname: `Reporting-MTA: dns; host`.
    pub reporting_mta: &'a str,
    /// The `From:` mailbox, e.g. `MAILER-DAEMON@host`.
    pub postmaster: &'a str,
    /// The original reverse-path: who gets the report (`To:`).
    pub recipient: &'a Address,
    /// ENVID from MAIL FROM: `Original-Envelope-Id:`.
    pub original_envelope_id: Option<&'a str>,
    /// Unix seconds the message arrived: `Arrival-Date:`.
    pub arrival_date: i64,
    /// `Full` returns the whole message in a failure report; anything else
    /// returns only its headers (RFC 3461 §4.3).
    pub ret: Option<Ret>,
    /// The message as we held it (starting with our Received header).
    pub original_content: &'a [u8],
    /// The original's Message-ID, for `In-Reply-To:` and `References:`.
    pub original_message_id: Option<&'a str>,
    pub recipients: Vec<DsnRecipient>,
    /// Right-hand side of the report's own Message-ID.
    pub message_id_domain: &'a str,
}

/// Longest header line we aim for before folding (RFC 5322 §2.1.1).
const FOLD_AT: usize = 78;
/// Longest line of body text we aim for.
const WRAP_AT: usize = 76;
/// The hard limit on a line, without its CRLF (RFC 5322 §2.1.1).
const MAX_LINE: usize = 998;
/// Longest run without white space written on one line; longer runs are
/// broken by force so no line passes [`MAX_LINE`].
const MAX_WORD: usize = 900;

/// Builds the complete RFC 5322 report message (CRLF line ends).
///
/// The result is 7bit unless the returned original (or its headers) holds
/// 8-bit octets; then the top level and that part say `8bit` and the
/// message must be sent with `BODY=8BITMIME`. An original that cannot
/// travel as 8bit (NUL octets, lines over 998 octets) is cut down to its
/// headers, or left out when even those cannot.
pub fn build(request: &DsnRequest<'_>) -> Vec<u8> {
    build_at(request, now_unix_millis().div_euclid(1000))
}

/// Whether a recipient that gave `notify` wants a report for `action`
/// (RFC 3461 §4.1). `NEVER` wins over anything given with it; no `NOTIFY`
/// means failures only (the RFC leaves delays to us, and we do not send
/// them); `SUCCESS` covers delivered, relayed and expanded.
pub fn wants(notify: Notify, action: Action) -> bool {
    if notify.contains(Notify::NEVER) {
        return false;
    }
    if notify.is_empty() {
        return action == Action::Failed;
    }
    match action {
        Action::Failed => notify.contains(Notify::FAILURE),
        Action::Delayed => notify.contains(Notify::DELAY),
        Action::Delivered | Action::Relayed | Action::Expanded => notify.contains(Notify::SUCCESS),
    }
}

/// The enhanced status to report for a reply: its enhanced code (or one at
/// the start of its text) when that agrees with the reply code's class,
/// else the class's generic `2.0.0`, `4.0.0` or `5.0.0`. A code outside
/// 2xx and 4xx counts as a permanent failure.
pub fn status_from_reply(reply: &Reply) -> String {
    let class = match reply.code {
        200..=299 => 2,
        400..=499 => 4,
        _ => 5,
    };
    match reply.enhanced.or_else(|| leading_status(&reply.text)) {
        Some(Enhanced(c, s, d)) if c == class && s <= 999 && d <= 999 => {
            format!("{c}.{s}.{d}")
        }
        _ => format!("{class}.0.0"),
    }
}

/// The report as of `now` (unix seconds).
fn build_at(request: &DsnRequest<'_>, now: i64) -> Vec<u8> {
    let returned = returned_part(request);
    let status = delivery_status(request);
    let (text, text_is_ascii) = human_text(request, returned.as_ref().map(|r| r.what));
    let text_body = if text_is_ascii {
        text.into_bytes()
    } else {
        base64_lines(text.as_bytes())
    };

    let boundary = boundary_for(&[
        &text_body,
        &status,
        returned.as_ref().map_or(&[][..], |r| &r.body),
    ]);
    let eight_bit = returned
        .as_ref()
        .is_some_and(|r| r.encoding == Encoding::EightBit);

    let mut out = Vec::with_capacity(
        2048 + text_body.len() + status.len() + returned.as_ref().map_or(0, |r| r.body.len()),
    );
    field(
        &mut out,
        "From",
        &format!(
            "Mail Delivery System <{}>",
            mailbox_text(request.postmaster)
        ),
    );
    field(
        &mut out,
        "To",
        &format!("<{}>", one_line(request.recipient.as_str())),
    );
    field(&mut out, "Subject", subject(&request.recipients));
    field(&mut out, "Date", &rfc5322_date(now));
    field(
        &mut out,
        "Message-ID",
        &format!(
            "<{}@{}>",
            MessageId::new(),
            id_domain(request.message_id_domain, request.reporting_mta)
        ),
    );
    if let Some(id) = request.original_message_id.and_then(message_id_text) {
        field(&mut out, "In-Reply-To", &id);
        field(&mut out, "References", &id);
    }
    field(&mut out, "Auto-Submitted", "auto-replied");
    field(&mut out, "MIME-Version", "1.0");
    out.extend_from_slice(
        format!(
            "Content-Type: multipart/report; report-type=delivery-status;\r\n\
             \tboundary=\"{boundary}\"\r\n"
        )
        .as_bytes(),
    );
    let top_encoding = if eight_bit { "8bit" } else { "7bit" };
    field(&mut out, "Content-Transfer-Encoding", top_encoding);
    out.extend_from_slice(b"\r\nThis is a MIME-encapsulated message.\r\n");

    part_start(&mut out, &boundary);
    if text_is_ascii {
        field(&mut out, "Content-Type", "text/plain; charset=us-ascii");
        field(&mut out, "Content-Transfer-Encoding", "7bit");
    } else {
        field(&mut out, "Content-Type", "text/plain; charset=utf-8");
        field(&mut out, "Content-Transfer-Encoding", "base64");
    }
    field(&mut out, "Content-Description", "Notification");
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&text_body);

    part_start(&mut out, &boundary);
    field(&mut out, "Content-Type", "message/delivery-status");
    field(&mut out, "Content-Transfer-Encoding", "7bit");
    field(&mut out, "Content-Description", "Delivery report");
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&status);

    if let Some(returned) = &returned {
        part_start(&mut out, &boundary);
        field(&mut out, "Content-Type", returned.content_type);
        field(
            &mut out,
            "Content-Transfer-Encoding",
            match returned.encoding {
                Encoding::SevenBit => "7bit",
                Encoding::EightBit => "8bit",
            },
        );
        field(&mut out, "Content-Description", returned.description);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&returned.body);
    }
    // Every body above ends in CRLF or is empty; the delimiter's own CRLF
    // (RFC 2046 §5.1.1) comes first so a body's last line break survives.
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

fn part_start(out: &mut Vec<u8>, boundary: &str) {
    out.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
}

fn subject(recipients: &[DsnRecipient]) -> &'static str {
    let any = |a: Action| recipients.iter().any(|r| r.action == a);
    if any(Action::Failed) {
        "Undelivered Mail Returned to Sender"
    } else if any(Action::Delayed) {
        "Delayed Mail (still being retried)"
    } else if recipients.is_empty() {
        "Delivery Status Notification"
    } else {
        "Successful Mail Delivery Report"
    }
}

/// The `message/delivery-status` body: per-message fields, then one block
/// per recipient, blocks separated by an empty line.
fn delivery_status(request: &DsnRequest<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    field(
        &mut out,
        "Reporting-MTA",
        &format!("dns; {}", ascii_line(request.reporting_mta)),
    );
    if let Some(id) = request.original_envelope_id {
        let id = envelope_id_text(id);
        if !id.is_empty() {
            field(&mut out, "Original-Envelope-Id", &id);
        }
    }
    field(
        &mut out,
        "Arrival-Date",
        &rfc5322_date(request.arrival_date),
    );
    for r in &request.recipients {
        out.extend_from_slice(b"\r\n");
        if let Some(orcpt) = r.original_recipient.as_deref().and_then(original_recipient) {
            field(&mut out, "Original-Recipient", &orcpt);
        }
        field(
            &mut out,
            "Final-Recipient",
            &typed_address(&r.final_recipient),
        );
        field(&mut out, "Action", r.action.as_str());
        field(&mut out, "Status", &status_text(&r.status, r.action));
        if let Some(mta) = r.remote_mta.as_deref() {
            let mta = ascii_line(mta);
            if !mta.is_empty() {
                field(&mut out, "Remote-MTA", &with_type("dns", &mta));
            }
        }
        if let Some(diagnostic) = r.diagnostic.as_deref() {
            let diagnostic = ascii_line(diagnostic);
            if !diagnostic.is_empty() {
                field(&mut out, "Diagnostic-Code", &with_type("smtp", &diagnostic));
            }
        }
        if let Some(at) = r.last_attempt {
            field(&mut out, "Last-Attempt-Date", &rfc5322_date(at));
        }
        if let (Action::Delayed, Some(until)) = (r.action, r.will_retry_until) {
            field(&mut out, "Will-Retry-Until", &rfc5322_date(until));
        }
    }
    out
}

/// What the third part carries, for the explanation in the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Returned {
    Message,
    Headers,
    /// RET=FULL was asked for but only the headers could be carried.
    HeadersInstead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    SevenBit,
    EightBit,
}

struct ReturnedPart {
    what: Returned,
    content_type: &'static str,
    description: &'static str,
    encoding: Encoding,
    body: Vec<u8>,
}

/// The third part: the whole original for RET=FULL in a failure report,
/// its headers otherwise; `None` when not even the headers can be carried
/// as 7bit or 8bit.
fn returned_part(request: &DsnRequest<'_>) -> Option<ReturnedPart> {
    let content = request.original_content;
    // RFC 3461 §4.3: RET=FULL is about "failed" reports; delay and success
    // reports carry only the headers, so a retry notice does not resend
    // the whole message every time.
    let full = request.ret == Some(Ret::Full)
        && request
            .recipients
            .iter()
            .any(|r| r.action == Action::Failed);
    if full {
        let body = crlf_lines(content);
        if let Some(encoding) = transfer_encoding(&body) {
            return Some(ReturnedPart {
                what: Returned::Message,
                content_type: "message/rfc822",
                description: "Undelivered Message",
                encoding,
                body,
            });
        }
    }
    let body = crlf_lines(&content[..header_end(content)]);
    let encoding = transfer_encoding(&body)?;
    let content_type = if encoding == Encoding::EightBit && std::str::from_utf8(&body).is_ok() {
        // RFC 6532 headers are UTF-8; saying so lets readers show them.
        "text/rfc822-headers; charset=utf-8"
    } else {
        "text/rfc822-headers"
    };
    Some(ReturnedPart {
        what: if full {
            Returned::HeadersInstead
        } else {
            Returned::Headers
        },
        content_type,
        description: "Undelivered Message Headers",
        encoding,
        body,
    })
}

/// Where the header section of `content` ends: just after the line break
/// that precedes the first empty line, or the whole content when there is
/// no empty line (a message without a body).
fn header_end(content: &[u8]) -> usize {
    if content.starts_with(b"\r\n") || content.starts_with(b"\n") {
        return 0;
    }
    let mut at = 0;
    while let Some(lf) = content[at..].iter().position(|&b| b == b'\n') {
        let next = at + lf + 1;
        let rest = &content[next..];
        if rest.starts_with(b"\r\n") || rest.starts_with(b"\n") {
            return next;
        }
        at = next;
    }
    content.len()
}

/// `bytes` with every line break made CRLF (a bare CR or LF included), as
/// SMTP needs them.
fn crlf_lines(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 64);
    let mut rest = bytes;
    while let Some(at) = rest.iter().position(|&b| b == b'\r' || b == b'\n') {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(b"\r\n");
        let crlf = rest[at] == b'\r' && rest.get(at + 1) == Some(&b'\n');
        rest = &rest[at + if crlf { 2 } else { 1 }..];
    }
    out.extend_from_slice(rest);
    out
}

/// How CRLF-normalised `bytes` can travel: 7bit, 8bit, or (NUL octets,
/// over-long lines) not at all without BINARYMIME, which we do not assume.
fn transfer_encoding(bytes: &[u8]) -> Option<Encoding> {
    if bytes.contains(&0) {
        return None;
    }
    if bytes
        .split(|&b| b == b'\n')
        .any(|line| line.strip_suffix(b"\r").unwrap_or(line).len() > MAX_LINE)
    {
        return None;
    }
    Some(if bytes.is_ascii() {
        Encoding::SevenBit
    } else {
        Encoding::EightBit
    })
}

/// The first part: what happened, in words, grouped by action. Returns the
/// text and whether it is ASCII.
fn human_text(request: &DsnRequest<'_>, returned: Option<Returned>) -> (String, bool) {
    let mut text = String::new();
    wrap(
        &mut text,
        "",
        &format!(
            "This is the mail system at host {}.",
            one_line(request.reporting_mta)
        ),
    );
    text.push('\n');
    for (action, heading) in [
        (
            Action::Failed,
            "Your message could not be delivered to the recipients below. \
             The mail system has given up on them.",
        ),
        (
            Action::Delayed,
            "Your message has not yet been delivered to the recipients below. \
             The mail system will keep trying; you do not need to send it again.",
        ),
        (
            Action::Delivered,
            "Your message was delivered to the recipients below.",
        ),
        (
            Action::Relayed,
            "Your message was passed on to the mail systems of the recipients \
             below, which will not report on its delivery.",
        ),
        (
            Action::Expanded,
            "Your message was delivered to the lists or aliases below, which \
             passed it on to their members.",
        ),
    ] {
        let mut group = request
            .recipients
            .iter()
            .filter(|r| r.action == action)
            .peekable();
        if group.peek().is_none() {
            continue;
        }
        wrap(&mut text, "", heading);
        text.push('\n');
        for r in group {
            wrap(
                &mut text,
                "  ",
                &format!("<{}>", one_line(r.final_recipient.as_str())),
            );
            let mta = r.remote_mta.as_deref().map(|m| without_type(&one_line(m)));
            let diagnostic = r
                .diagnostic
                .as_deref()
                .map(|d| without_type(&one_line(d)))
                .filter(|d| !d.is_empty());
            let status = status_text(&r.status, r.action);
            let line = match (mta, diagnostic) {
                (Some(mta), Some(d)) if !mta.is_empty() => {
                    format!("Status {status}; host {mta} said: {d}")
                }
                (_, Some(d)) => format!("Status {status}: {d}"),
                (Some(mta), None) if !mta.is_empty() => format!("Status {status}; host {mta}"),
                _ => format!("Status {status}"),
            };
            wrap(&mut text, "    ", &line);
            if let (Action::Delayed, Some(until)) = (r.action, r.will_retry_until) {
                wrap(
                    &mut text,
                    "    ",
                    &format!("Will keep trying until {}.", rfc5322_date(until)),
                );
            }
            text.push('\n');
        }
    }
    let note = match returned {
        Some(Returned::Message) => "The original message is attached.",
        Some(Returned::Headers) => "The headers of the original message are attached.",
        Some(Returned::HeadersInstead) => {
            "The original message cannot be carried in this report as it is, \
             so only its headers are attached."
        }
        None => "The original message cannot be carried in this report.",
    };
    wrap(&mut text, "", note);
    let ascii = text.is_ascii();
    (text.replace('\n', "\r\n"), ascii)
}

/// Appends `text` (one line, no line breaks) to `out` wrapped at
/// [`WRAP_AT`], each line starting with `indent` and ending in `\n`.
fn wrap(out: &mut String, indent: &str, text: &str) {
    let mut line_len = 0;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        for piece in pieces(word, MAX_WORD) {
            if line_len > 0 && line_len + 1 + piece.len() > WRAP_AT {
                out.push('\n');
                line_len = 0;
            }
            if line_len == 0 {
                out.push_str(indent);
                line_len = indent.len();
            } else {
                out.push(' ');
                line_len += 1;
            }
            out.push_str(piece);
            line_len += piece.len();
        }
    }
    if line_len > 0 {
        out.push('\n');
    }
}

/// Base64 in lines of 76 characters, CRLF after each (RFC 2045 §6.8).
fn base64_lines(bytes: &[u8]) -> Vec<u8> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut out = Vec::with_capacity(encoded.len() + encoded.len() / 38 + 2);
    for line in encoded.as_bytes().chunks(76) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Writes `name: value` with CRLF, folding at spaces so lines stay near
/// [`FOLD_AT`]. `value` must already be one line.
fn field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.push(b':');
    let mut line_len = name.len() + 1;
    // Nothing written after the name or the last fold yet: folding there
    // would leave a line of white space only.
    let mut fresh = true;
    for word in value.split(' ').filter(|w| !w.is_empty()) {
        for piece in pieces(word, MAX_WORD) {
            if !fresh && line_len + 1 + piece.len() > FOLD_AT {
                out.extend_from_slice(b"\r\n");
                line_len = 0;
            }
            out.push(b' ');
            out.extend_from_slice(piece.as_bytes());
            line_len += 1 + piece.len();
            fresh = false;
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// `word` in pieces of at most `max` bytes, split on character boundaries.
fn pieces(word: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = word;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(max);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

/// `text` on one line: control characters (CR and LF above all) and other
/// white space become single spaces, and the ends are trimmed.
fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut gap = false;
    for c in text.chars() {
        if c.is_whitespace() || c.is_control() {
            gap = !out.is_empty();
        } else {
            if gap {
                out.push(' ');
                gap = false;
            }
            out.push(c);
        }
    }
    out
}

/// [`one_line`], with anything outside ASCII as `?`: the fields of a
/// `message/delivery-status` are ASCII text.
fn ascii_line(text: &str) -> String {
    one_line(text)
        .chars()
        .map(|c| if c.is_ascii() { c } else { '?' })
        .collect()
}

/// Whether `value` starts with a type token and `;`, as in `dns; host` or
/// `smtp; 550 ...`.
fn has_type(value: &str) -> bool {
    value.split_once(';').is_some_and(|(kind, _)| {
        let kind = kind.trim_end();
        kind.starts_with(|c: char| c.is_ascii_alphabetic())
            && kind.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

fn with_type(kind: &str, value: &str) -> String {
    if has_type(value) {
        value.to_owned()
    } else {
        format!("{kind}; {value}")
    }
}

fn without_type(value: &str) -> String {
    match value.split_once(';') {
        Some((_, rest)) if has_type(value) => rest.trim_start().to_owned(),
        _ => value.to_owned(),
    }
}

/// `rfc822; addr`, or `utf-8; ...` with `\x{..}` escapes for an address
/// that is not ASCII (RFC 6533 §3).
fn typed_address(address: &Address) -> String {
    let text = one_line(address.as_str());
    if text.is_ascii() {
        format!("rfc822; {text}")
    } else {
        format!("utf-8; {}", utf8_addr_xtext(&text, true))
    }
}

/// The stored ORCPT (`addr-type;addr`) as an Original-Recipient value;
/// `None` when it has no usable type or address.
fn original_recipient(orcpt: &str) -> Option<String> {
    let (kind, address) = orcpt.split_once(';')?;
    let kind = kind.trim();
    if kind.is_empty() || !kind.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return None;
    }
    let address = one_line(address);
    if address.is_empty() {
        return None;
    }
    if kind.eq_ignore_ascii_case("utf-8") {
        // Already utf-8-addr-xtext or -unitext: escape only what is not
        // ASCII, keep the `\x{..}` escapes it already has.
        Some(format!("utf-8;{}", utf8_addr_xtext(&address, false)))
    } else if address.is_ascii() {
        Some(format!("{kind};{address}"))
    } else {
        Some(format!("utf-8;{}", utf8_addr_xtext(&address, true)))
    }
}

/// RFC 6533 `utf-8-addr-xtext`: QCHARs as they are, other characters as
/// `\x{HEX}`. With `all` false, ASCII is left alone and only non-ASCII is
/// escaped.
fn utf8_addr_xtext(address: &str, all: bool) -> String {
    let mut out = String::with_capacity(address.len() + 16);
    for c in address.chars() {
        let qchar = matches!(c, '!'..='*' | ','..='<' | '>'..='[' | ']'..='~');
        if qchar || (!all && c.is_ascii() && !c.is_ascii_control()) {
            out.push(c);
        } else {
            let _ = write!(out, "\\x{{{:02X}}}", u32::from(c));
        }
    }
    out
}

/// The ENVID for `Original-Envelope-Id:`: printable ASCII as it is,
/// anything else xtext-escaped (`+HH` per octet), so the field stays one
/// ASCII token whatever the client sent.
fn envelope_id_text(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if (0x21..=0x7e).contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
    out
}

/// A valid `class.subject.detail` status (RFC 3463) as given, or the
/// action's generic one.
fn status_text(status: &str, action: Action) -> String {
    match parse_status(status.trim()) {
        Some(Enhanced(c, s, d)) => format!("{c}.{s}.{d}"),
        None => match action {
            Action::Failed => "5.0.0",
            Action::Delayed => "4.0.0",
            Action::Delivered | Action::Relayed | Action::Expanded => "2.0.0",
        }
        .to_owned(),
    }
}

fn parse_status(text: &str) -> Option<Enhanced> {
    let mut parts = text.split('.');
    let class = parts.next()?;
    let subject = parts.next()?;
    let detail = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let number = |p: &str, max_len: usize| {
        if !p.is_empty() && p.len() <= max_len && p.bytes().all(|b| b.is_ascii_digit()) {
            p.parse::<u16>().ok()
        } else {
            None
        }
    };
    let class = number(class, 1)?;
    if !matches!(class, 2 | 4 | 5) {
        return None;
    }
    Some(Enhanced(
        class as u8,
        number(subject, 3)?,
        number(detail, 3)?,
    ))
}

/// An enhanced code at the start of reply text (`5.1.1 No such user`), for
/// replies whose parser left it there.
fn leading_status(text: &str) -> Option<Enhanced> {
    parse_status(text.split_whitespace().next()?)
}

/// The `From:` mailbox without anything that could end the angle address
/// or the line.
fn mailbox_text(mailbox: &str) -> String {
    one_line(mailbox)
        .chars()
        .filter(|&c| !matches!(c, '<' | '>' | ' ' | ',' | ';'))
        .collect()
}

/// The right-hand side for our Message-ID: the configured domain's
/// hostname characters, falling back to the reporting MTA's.
fn id_domain(domain: &str, fallback: &str) -> String {
    let clean = |d: &str| -> String {
        d.chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
            .collect()
    };
    let domain = clean(domain);
    if !domain.is_empty() {
        return domain;
    }
    let fallback = clean(fallback);
    if fallback.is_empty() {
        "localhost".to_owned()
    } else {
        fallback
    }
}

/// The original's Message-ID as `<id>`, or `None` when it is not something
/// we can repeat safely (white space inside, angle brackets inside, not
/// ASCII, absurdly long).
fn message_id_text(id: &str) -> Option<String> {
    let id = id.trim();
    let inner = id
        .strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(id);
    let ok = !inner.is_empty()
        && inner.len() <= MAX_WORD
        && inner
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'<' && b != b'>');
    ok.then(|| format!("<{inner}>"))
}

/// A random MIME boundary that occurs in none of `bodies`.
fn boundary_for(bodies: &[&[u8]]) -> String {
    loop {
        let mut random = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut random);
        let mut boundary = String::from("=_mailroom_report_");
        for b in random {
            let _ = write!(boundary, "{b:02x}");
        }
        let needle = boundary.as_bytes();
        if !bodies.iter().any(|body| {
            body.windows(needle.len())
                .any(|w| w[0] == needle[0] && w == needle)
        }) {
            return boundary;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(text: &str) -> Address {
        Address::parse(text).unwrap()
    }

    fn recipient(addr: &str, action: Action, status: &str) -> DsnRecipient {
        DsnRecipient {
            final_recipient: address(addr),
            original_recipient: None,
            action,
            status: status.to_owned(),
            remote_mta: None,
            diagnostic: None,
            last_attempt: None,
            will_retry_until: None,
        }
    }

    fn request<'a>(
        to: &'a Address,
        content: &'a [u8],
        recipients: Vec<DsnRecipient>,
    ) -> DsnRequest<'a> {
        DsnRequest {
            reporting_mta: "mx.example.test",
            postmaster: "MAILER-DAEMON@mx.example.test",
            recipient: to,
            original_envelope_id: None,
            arrival_date: 1_057_056_757,
            ret: None,
            original_content: content,
            original_message_id: None,
            recipients,
            message_id_domain: "mx.example.test",
        }
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// Every line ends in CRLF and none is over 998 octets.
    fn assert_wire_clean(bytes: &[u8]) {
        assert!(bytes.ends_with(b"\r\n"));
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(bytes.get(i.wrapping_sub(1)), Some(&b'\r'), "bare LF at {i}");
            }
            if b == b'\r' {
                assert_eq!(bytes.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
        }
        for line in bytes.split(|&b| b == b'\n') {
            assert!(line.len() <= MAX_LINE + 1, "line of {} octets", line.len());
        }
    }

    #[test]
    fn folds_long_values_and_keeps_every_word() {
        let mut out = Vec::new();
        let value = "word ".repeat(40);
        field(&mut out, "Diagnostic-Code", value.trim());
        let s = text(&out);
        assert!(s.lines().all(|l| l.len() <= FOLD_AT + 1));
        assert!(s.lines().skip(1).all(|l| l.starts_with(' ')));
        let unfolded = s.replace("\r\n", "");
        assert_eq!(unfolded, format!("Diagnostic-Code: {}", value.trim()));
    }

    #[test]
    fn breaks_words_longer_than_a_line() {
        let mut out = Vec::new();
        let long = "é".repeat(1500);
        field(&mut out, "X", &long);
        assert_wire_clean(&out);
        assert_eq!(
            text(&out).replace("\r\n ", "").replace(' ', ""),
            format!("X:{long}\r\n")
        );
    }

    #[test]
    fn one_line_removes_line_breaks_and_controls() {
        assert_eq!(
            one_line(" 550 a\r\nX-Evil: 1\r\n\r\n b\t\0c "),
            "550 a X-Evil: 1 b c"
        );
        assert_eq!(ascii_line("jörg\u{2028}x"), "j?rg x");
    }

    #[test]
    fn typed_addresses() {
        assert_eq!(typed_address(&address("a@b.test")), "rfc822; a@b.test");
        assert_eq!(
            typed_address(&address("jörg+x@b.test")),
            "utf-8; j\\x{F6}rg\\x{2B}x@b.test"
        );
        assert_eq!(
            original_recipient("rfc822;a@b.test").unwrap(),
            "rfc822;a@b.test"
        );
        assert_eq!(
            original_recipient("rfc822;jörg@b.test").unwrap(),
            "utf-8;j\\x{F6}rg@b.test"
        );
        assert_eq!(
            original_recipient("utf-8;j\\x{F6}rg@b.test").unwrap(),
            "utf-8;j\\x{F6}rg@b.test"
        );
        assert_eq!(
            original_recipient("rfc822;a@b\r\nAction: delivered").unwrap(),
            "rfc822;a@b Action: delivered"
        );
        assert_eq!(original_recipient("no-type"), None);
        assert_eq!(original_recipient("bad type;a@b"), None);
        assert_eq!(original_recipient("rfc822; "), None);
    }

    #[test]
    fn envelope_ids_stay_one_token() {
        assert_eq!(envelope_id_text("QQ314159"), "QQ314159");
        assert_eq!(envelope_id_text("a b\r\nc"), "a+20b+0D+0Ac");
    }

    #[test]
    fn statuses() {
        assert_eq!(status_text("5.1.1", Action::Failed), "5.1.1");
        assert_eq!(status_text(" 4.4.7 ", Action::Failed), "4.4.7");
        assert_eq!(status_text("", Action::Failed), "5.0.0");
        assert_eq!(status_text("550", Action::Failed), "5.0.0");
        assert_eq!(status_text("3.1.1", Action::Delayed), "4.0.0");
        assert_eq!(status_text("2.1.1000", Action::Delivered), "2.0.0");
        assert_eq!(status_text("5.1.1\r\nX: y", Action::Delivered), "2.0.0");

        let with = |code, e| Reply {
            code,
            enhanced: Some(e),
            text: "x".into(),
        };
        assert_eq!(status_from_reply(&with(550, Enhanced(5, 1, 1))), "5.1.1");
        assert_eq!(status_from_reply(&with(451, Enhanced(4, 7, 1))), "4.7.1");
        // An enhanced code of the wrong class is not believed.
        assert_eq!(status_from_reply(&with(550, Enhanced(4, 2, 2))), "5.0.0");
        assert_eq!(status_from_reply(&Reply::plain(554, "no")), "5.0.0");
        assert_eq!(status_from_reply(&Reply::plain(421, "busy")), "4.0.0");
        assert_eq!(status_from_reply(&Reply::plain(250, "ok")), "2.0.0");
        assert_eq!(status_from_reply(&Reply::plain(354, "odd")), "5.0.0");
        assert_eq!(
            status_from_reply(&Reply::plain(552, "5.2.2 Mailbox full")),
            "5.2.2"
        );
    }

    #[test]
    fn type_prefixes() {
        assert_eq!(with_type("smtp", "550 5.1.1 no"), "smtp; 550 5.1.1 no");
        assert_eq!(with_type("smtp", "x-unix; oops"), "x-unix; oops");
        assert_eq!(with_type("dns", "mx.example.test"), "dns; mx.example.test");
        assert_eq!(
            with_type("dns", "dns; mx.example.test"),
            "dns; mx.example.test"
        );
        assert_eq!(without_type("smtp; 550 no"), "550 no");
        assert_eq!(without_type("550 no; really"), "550 no; really");
    }

    #[test]
    fn header_section() {
        assert_eq!(header_end(b"A: 1\r\nB: 2\r\n\r\nbody\r\n"), 12);
        assert_eq!(header_end(b"A: 1\nB: 2\n\nbody\n"), 10);
        assert_eq!(header_end(b"A: 1\r\n"), 6);
        assert_eq!(header_end(b"\r\nbody"), 0);
        assert_eq!(header_end(b""), 0);
    }

    #[test]
    fn line_ends_and_encodings() {
        assert_eq!(crlf_lines(b"a\nb\rc\r\nd"), b"a\r\nb\r\nc\r\nd");
        assert_eq!(transfer_encoding(b"a\r\n"), Some(Encoding::SevenBit));
        assert_eq!(
            transfer_encoding("é\r\n".as_bytes()),
            Some(Encoding::EightBit)
        );
        assert_eq!(transfer_encoding(b"a\0b\r\n"), None);
        assert_eq!(transfer_encoding(&[b'a'; 999]), None);
        assert_eq!(transfer_encoding(&[b'a'; 998]), Some(Encoding::SevenBit));
    }

    #[test]
    fn message_ids() {
        assert_eq!(message_id_text("<a@b>").unwrap(), "<a@b>");
        assert_eq!(message_id_text(" a@b ").unwrap(), "<a@b>");
        assert_eq!(message_id_text("<a@b>\r\nBcc: x"), None);
        assert_eq!(message_id_text("<a<b>"), None);
        assert_eq!(message_id_text("<>"), None);
        assert_eq!(id_domain("", "mx.test\r\n"), "mx.test");
        assert_eq!(id_domain("a b>", "x"), "ab");
    }

    #[test]
    fn failed_report_shape() {
        let to = address("sender@example.test");
        let content = b"Received: from x\r\nSubject: hi\r\nMessage-ID: <m1@x>\r\n\r\nbody\r\n";
        let mut r = recipient("bob@dest.test", Action::Failed, "5.1.1");
        r.remote_mta = Some("mx.dest.test".into());
        r.diagnostic = Some("550 5.1.1 No such user".into());
        r.original_recipient = Some("rfc822;bob@dest.test".into());
        r.last_attempt = Some(1_057_056_800);
        r.will_retry_until = Some(1_057_100_000);
        let mut req = request(&to, content, vec![r]);
        req.original_envelope_id = Some("ENV1");
        req.original_message_id = Some("<m1@x>");
        let out = build_at(&req, 1_057_056_900);
        assert_wire_clean(&out);
        let s = text(&out);
        let head = &s[..s.find("\r\n\r\n").unwrap()];
        for want in [
            "From: Mail Delivery System <MAILER-DAEMON@mx.example.test>\r\n",
            "To: <sender@example.test>\r\n",
            "Subject: Undelivered Mail Returned to Sender\r\n",
            "Date: Tue, 1 Jul 2003 10:55:00 +0000\r\n",
            "In-Reply-To: <m1@x>\r\n",
            "References: <m1@x>\r\n",
            "Auto-Submitted: auto-replied\r\n",
            "MIME-Version: 1.0\r\n",
            "Content-Type: multipart/report; report-type=delivery-status;\r\n",
            "Content-Transfer-Encoding: 7bit",
        ] {
            assert!(head.contains(want), "missing {want:?} in\n{head}");
        }
        assert!(head.contains("Message-ID: <") && head.contains("@mx.example.test>"));
        let status = "Content-Description: Delivery report\r\n\r\n\
             Reporting-MTA: dns; mx.example.test\r\n\
             Original-Envelope-Id: ENV1\r\n\
             Arrival-Date: Tue, 1 Jul 2003 10:52:37 +0000\r\n\
             \r\n\
             Original-Recipient: rfc822;bob@dest.test\r\n\
             Final-Recipient: rfc822; bob@dest.test\r\n\
             Action: failed\r\n\
             Status: 5.1.1\r\n\
             Remote-MTA: dns; mx.dest.test\r\n\
             Diagnostic-Code: smtp; 550 5.1.1 No such user\r\n\
             Last-Attempt-Date: Tue, 1 Jul 2003 10:53:20 +0000\r\n\
             \r\n--";
        assert!(s.contains(status), "{s}");
        assert!(!s.contains("Will-Retry-Until"));
        assert!(s.contains("Content-Type: text/rfc822-headers\r\n"));
        assert!(s.contains("Subject: hi\r\nMessage-ID: <m1@x>\r\n\r\n--"));
        assert!(!s.contains("body"));
        assert!(s.contains("host mx.dest.test said: 550 5.1.1 No such user"));
    }

    #[test]
    fn full_return_keeps_the_original_byte_for_byte() {
        let to = address("sender@example.test");
        let content =
            "Subject: grüße\r\nContent-Transfer-Encoding: 8bit\r\n\r\nbödy\r\n".as_bytes();
        let mut req = request(
            &to,
            content,
            vec![recipient("bob@dest.test", Action::Failed, "5.0.0")],
        );
        req.ret = Some(Ret::Full);
        let out = build_at(&req, 0);
        assert_wire_clean(&out);
        let s = text(&out);
        let mut expected = String::from(
            "Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\
             Content-Description: Undelivered Message\r\n\r\n",
        );
        expected.push_str(std::str::from_utf8(content).unwrap());
        expected.push_str("\r\n--");
        assert!(s.contains(&expected), "{s}");
        let head = &s[..s.find("\r\n\r\n").unwrap()];
        assert!(head.contains("Content-Transfer-Encoding: 8bit"));
        assert!(!s.contains("base64"));
    }

    #[test]
    fn full_return_only_in_failure_reports() {
        let to = address("sender@example.test");
        let content = b"Subject: hi\r\n\r\nbody\r\n";
        let mut req = request(
            &to,
            content,
            vec![recipient("bob@dest.test", Action::Delayed, "4.4.1")],
        );
        req.ret = Some(Ret::Full);
        let s = text(&build_at(&req, 0));
        assert!(s.contains("Subject: Delayed Mail (still being retried)"));
        assert!(s.contains("Content-Type: text/rfc822-headers"));
        assert!(!s.contains("body"));
    }

    #[test]
    fn binary_original_falls_back_to_headers_then_nothing() {
        let to = address("sender@example.test");
        let long = format!("Subject: hi\r\n\r\n{}\r\n", "x".repeat(2000));
        let mut req = request(
            &to,
            long.as_bytes(),
            vec![recipient("bob@dest.test", Action::Failed, "5.0.0")],
        );
        req.ret = Some(Ret::Full);
        let s = text(&build_at(&req, 0));
        assert!(s.contains("Content-Type: text/rfc822-headers"));
        assert!(
            s.replace("\r\n", " ")
                .contains("only its headers are attached")
        );
        assert_wire_clean(s.as_bytes());

        let nul = b"Subject: a\0b\r\n\r\nx\r\n";
        let req = request(
            &to,
            nul,
            vec![recipient("bob@dest.test", Action::Failed, "5.0.0")],
        );
        let s = text(&build_at(&req, 0));
        assert!(!s.contains("rfc822-headers") && !s.contains("message/rfc822"));
        assert!(
            s.replace("\r\n", " ")
                .contains("cannot be carried in this report.")
        );
    }

    #[test]
    fn non_ascii_text_part_is_base64() {
        let to = address("sender@example.test");
        let req = request(
            &to,
            b"Subject: hi\r\n\r\nx\r\n",
            vec![recipient("jörg@dest.test", Action::Delivered, "2.0.0")],
        );
        let out = build_at(&req, 0);
        let s = text(&out);
        assert!(s.is_ascii());
        assert!(s.contains("text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64"));
        assert!(s.contains("Final-Recipient: utf-8; j\\x{F6}rg@dest.test"));
        assert!(s.contains("Subject: Successful Mail Delivery Report"));
    }

    #[test]
    fn boundary_avoids_the_bodies() {
        let b = boundary_for(&[b"abc"]);
        assert!(b.starts_with("=_mailroom_report_") && b.len() == 18 + 32);
        assert_ne!(b, boundary_for(&[b"abc"]));
    }

    #[test]
    fn wants_follows_notify() {
        assert!(wants(Notify::empty(), Action::Failed));
        assert!(!wants(Notify::empty(), Action::Delayed));
        assert!(!wants(Notify::NEVER, Action::Failed));
        assert!(!wants(Notify::NEVER.with(Notify::FAILURE), Action::Failed));
        assert!(wants(Notify::SUCCESS, Action::Relayed));
        assert!(!wants(Notify::DELAY, Action::Failed));
    }
}
