//! The `Received:` trace header (RFC 5321 §4.4) with the protocol keywords
//! of RFC 3848 (SMTP, ESMTP, ESMTPA, ESMTPS, ESMTPSA).

use std::fmt::Write;
use std::net::IpAddr;

use mailroom_core::time::push_rfc5322_date;
use mailroom_core::{Address, MessageId};

use crate::session::TlsInfo;

/// What the trace header records about a transaction.
pub struct Trace<'a> {
    pub helo: Option<&'a str>,
    pub esmtp: bool,
    /// The transaction used SMTPUTF8: the header may carry UTF-8 and says so.
    pub smtputf8: bool,
    pub remote_ip: IpAddr,
    pub hostname: &'a str,
    pub tls: Option<&'a TlsInfo>,
    pub authenticated: bool,
    pub id: &'a MessageId,
    /// Named only for single-recipient messages, so one copy of a message
    /// to many does not disclose the others.
    pub recipient: Option<&'a Address>,
    pub unix_time: i64,
}

/// The `with` keyword: RFC 3848, or RFC 6531 §4.3 for SMTPUTF8.
pub fn protocol(esmtp: bool, smtputf8: bool, tls: bool, authenticated: bool) -> &'static str {
    match (esmtp, smtputf8, tls, authenticated) {
        (false, _, _, _) => "SMTP",
        (true, false, false, false) => "ESMTP",
        (true, false, false, true) => "ESMTPA",
        (true, false, true, false) => "ESMTPS",
        (true, false, true, true) => "ESMTPSA",
        (true, true, false, false) => "UTF8SMTP",
        (true, true, false, true) => "UTF8SMTPA",
        (true, true, true, false) => "UTF8SMTPS",
        (true, true, true, true) => "UTF8SMTPSA",
    }
}

/// Builds the header, folded, ending in CRLF.
pub fn header(t: &Trace<'_>) -> String {
    // Pushed piece by piece: this runs for every message received, and
    // `format!` with a sanitised copy of each field cost several times more.
    let mut h = String::with_capacity(256);
    h.push_str("Received: from ");
    match t.helo {
        Some(helo) => push_sanitized(&mut h, helo, t.smtputf8),
        None => h.push_str("unknown"),
    }
    h.push_str(" ([");
    let _ = match t.remote_ip {
        IpAddr::V4(ip) => write!(h, "{ip}"),
        IpAddr::V6(ip) => write!(h, "IPv6:{ip}"),
    };
    h.push_str("])\r\n\tby ");
    h.push_str(t.hostname);
    h.push_str(" (mailroom) with ");
    h.push_str(protocol(
        t.esmtp,
        t.smtputf8,
        t.tls.is_some(),
        t.authenticated,
    ));
    h.push_str(" id ");
    let _ = write!(h, "{}", t.id);
    if let Some(tls) = t.tls {
        h.push_str("\r\n\t(using ");
        push_sanitized(&mut h, &tls.version, t.smtputf8);
        h.push_str(" with cipher ");
        push_sanitized(&mut h, &tls.cipher, t.smtputf8);
        h.push(')');
    }
    if let Some(rcpt) = t.recipient {
        h.push_str("\r\n\tfor <");
        push_sanitized(&mut h, rcpt.as_str(), t.smtputf8);
        h.push('>');
    }
    h.push_str(";\r\n\t");
    push_rfc5322_date(&mut h, t.unix_time);
    h.push_str("\r\n");
    h
}

/// Keeps client-supplied text from breaking the header: no controls, no
/// parentheses or semicolons that would end a comment or the clause, and
/// no 8-bit characters unless the transaction is SMTPUTF8 (a 7-bit message
/// must keep 7-bit headers).
fn push_sanitized(out: &mut String, text: &str, utf8: bool) {
    for c in text.chars() {
        if c.is_control() || matches!(c, '(' | ')' | ';' | '\\') || (!utf8 && !c.is_ascii()) {
            out.push('_');
        } else {
            out.push(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords() {
        assert_eq!(protocol(false, false, true, true), "SMTP");
        assert_eq!(protocol(true, false, true, true), "ESMTPSA");
        assert_eq!(protocol(true, false, true, false), "ESMTPS");
        assert_eq!(protocol(true, false, false, true), "ESMTPA");
        assert_eq!(protocol(true, true, false, false), "UTF8SMTP");
        assert_eq!(protocol(true, true, true, true), "UTF8SMTPSA");
    }

    #[test]
    fn folded_and_sanitized() {
        let id = MessageId::new();
        let rcpt = Address::parse("a@b.test").unwrap();
        let tls = TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
        };
        let h = header(&Trace {
            helo: Some("evil)\r\nX-Injected: 1 ä"),
            esmtp: true,
            smtputf8: false,
            remote_ip: "127.0.0.1".parse().unwrap(),
            hostname: "mx.test",
            tls: Some(&tls),
            authenticated: false,
            id: &id,
            recipient: Some(&rcpt),
            unix_time: 0,
        });
        assert!(
            h.starts_with("Received: from evil___X-Injected: 1 _ ([127.0.0.1])\r\n\tby mx.test")
        );
        assert!(h.contains("with ESMTPS id"));
        assert!(h.contains("(using TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256)"));
        assert!(h.ends_with("for <a@b.test>;\r\n\tThu, 1 Jan 1970 00:00:00 +0000\r\n"));
        assert_eq!(h.matches("\r\n").count(), h.matches("\r\n\t").count() + 1);
    }
}
