//! SMTP replies (RFC 5321 §4.2) with enhanced status codes (RFC 3463).
//!
//! Every reply the server sends is built here, so the wording and the codes
//! stay consistent and a reader can audit them in one place.

use std::borrow::Cow;
use std::fmt;

use crate::decimal::Decimal;

/// An enhanced status code `class.subject.detail` (RFC 3463).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enhanced(pub u8, pub u16, pub u16);

/// One SMTP reply: a three-digit code, an optional enhanced code, and text
/// (several lines become a multi-line reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<Enhanced>,
    pub text: Cow<'static, str>,
}

impl Reply {
    pub const fn new(code: u16, enhanced: Enhanced, text: &'static str) -> Self {
        Reply {
            code,
            enhanced: Some(enhanced),
            text: Cow::Borrowed(text),
        }
    }

    pub fn owned(code: u16, enhanced: Enhanced, text: String) -> Self {
        Reply {
            code,
            enhanced: Some(enhanced),
            text: Cow::Owned(text),
        }
    }

    /// A reply without an enhanced code (greeting and EHLO/HELO answers,
    /// which RFC 2034 §3 leaves bare).
    pub fn plain(code: u16, text: impl Into<Cow<'static, str>>) -> Self {
        Reply {
            code,
            enhanced: None,
            text: text.into(),
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// Appends the wire form (CRLF line ends, `-` continuation) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut lines = self.text.split('\n').peekable();
        if lines.peek().is_none() {
            lines = "".split('\n').peekable();
        }
        while let Some(line) = lines.next() {
            let line = line.trim_end_matches('\r');
            let sep = if lines.peek().is_some() { b'-' } else { b' ' };
            out.extend_from_slice(itoa3(self.code).as_slice());
            out.push(sep);
            // By hand rather than with `format!`: a session writes several
            // replies per message, an EHLO reply ten lines.
            if let Some(Enhanced(c, s, d)) = self.enhanced {
                push_decimal(out, c.into());
                out.push(b'.');
                push_decimal(out, s);
                out.push(b'.');
                push_decimal(out, d);
                out.push(b' ');
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
}

fn push_decimal(out: &mut Vec<u8>, n: u16) {
    out.extend_from_slice(Decimal::new(n.into(), 1).as_str().as_bytes());
}

fn itoa3(code: u16) -> [u8; 3] {
    let code = code.min(999);
    [
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ]
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Vec::new();
        self.write_to(&mut out);
        f.write_str(&String::from_utf8_lossy(&out))
    }
}

macro_rules! replies {
    ($($(#[$m:meta])* $name:ident = $code:literal $c:literal $s:literal $d:literal $text:literal;)*) => {
        $( $(#[$m])* pub const $name: Reply = Reply::new($code, Enhanced($c, $s, $d), $text); )*
    };
}

replies! {
    OK = 250 2 0 0 "Ok";
    SENDER_OK = 250 2 1 0 "Sender ok";
    RECIPIENT_OK = 250 2 1 5 "Recipient ok";
    RESET_OK = 250 2 0 0 "Reset state";
    NOOP_OK = 250 2 0 0 "Ok";
    BYE = 221 2 0 0 "Bye";
    VRFY_CANNOT = 252 2 5 0 "Cannot VRFY user, but will accept message and attempt delivery";
    HELP = 214 2 0 0 "See RFC 5321 and https://www.rfc-editor.org/rfc/rfc5321";
    START_DATA = 354 2 0 0 "End data with <CR><LF>.<CR><LF>";
    READY_TLS = 220 2 0 0 "Ready to start TLS";
    AUTH_OK = 235 2 7 0 "Authentication successful";

    BAD_SEQUENCE = 503 5 5 1 "Bad sequence of commands";
    NEED_MAIL = 503 5 5 1 "Need MAIL before RCPT";
    NEED_RCPT = 503 5 5 1 "Need RCPT before DATA";
    NESTED_MAIL = 503 5 5 1 "Nested MAIL command";
    NEED_EHLO = 503 5 5 1 "Send EHLO/HELO first";
    ALREADY_AUTH = 503 5 5 1 "Already authenticated";
    AUTH_IN_TRANSACTION = 503 5 5 1 "AUTH not allowed during a mail transaction";
    ALREADY_TLS = 503 5 5 1 "TLS already active";
    BDAT_AFTER_DATA_MIX = 503 5 5 1 "DATA not allowed after BDAT";
    UNKNOWN_COMMAND = 500 5 5 1 "Command unrecognized";
    LINE_TOO_LONG = 500 5 5 2 "Line too long";
    SYNTAX_EHLO = 501 5 5 2 "Syntax: EHLO domain";
    SYNTAX_HELO = 501 5 5 2 "Syntax: HELO domain";
    BAD_SENDER = 501 5 1 7 "Bad sender address syntax";
    BAD_RECIPIENT = 501 5 1 3 "Bad recipient address syntax";
    BAD_BASE64 = 501 5 5 2 "Invalid base64 data";
    AUTH_CANCELLED = 501 5 0 0 "Authentication cancelled";
    AUTH_UNSUPPORTED = 504 5 5 4 "Unrecognized authentication type";
    AUTH_NOT_AVAILABLE = 503 5 5 1 "AUTH not available";
    ENCRYPTION_REQUIRED = 538 5 7 11 "Encryption required for requested authentication mechanism";
    AUTH_FAILED = 535 5 7 8 "Authentication credentials invalid";
    AUTH_REQUIRED = 530 5 7 0 "Authentication required";
    TLS_NOT_AVAILABLE = 454 4 7 0 "TLS not available";
    RELAY_DENIED = 554 5 7 1 "Relay access denied";
    TOO_MANY_RECIPIENTS = 452 4 5 3 "Too many recipients";
    SIZE_EXCEEDED = 552 5 3 4 "Message size exceeds fixed maximum message size";
    UTF8_SENDER = 553 5 6 7 "Non-ASCII address requires SMTPUTF8";
    UTF8_RECIPIENT = 553 5 6 7 "Non-ASCII address requires SMTPUTF8";
    NO_VALID_RECIPIENTS = 554 5 5 1 "No valid recipients";
    QUEUE_FAILED = 451 4 3 0 "Temporary failure, please try again later";
    TOO_MANY_ERRORS = 421 4 7 0 "Too many errors, closing connection";
    TOO_MANY_CONNECTIONS = 421 4 7 0 "Too many connections, try again later";
    TIMEOUT = 421 4 4 2 "Timeout waiting for input, closing connection";
    SHUTTING_DOWN = 421 4 3 2 "Service shutting down, closing connection";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line() {
        let mut out = Vec::new();
        OK.write_to(&mut out);
        assert_eq!(out, b"250 2.0.0 Ok\r\n");
    }

    #[test]
    fn multi_line() {
        let mut out = Vec::new();
        Reply::plain(250, "mx.test\nPIPELINING\nSIZE 10").write_to(&mut out);
        assert_eq!(out, b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n");
    }

    #[test]
    fn enhanced_codes_of_several_digits() {
        let mut out = Vec::new();
        Reply::new(554, Enhanced(5, 123, 40), "a\nb").write_to(&mut out);
        assert_eq!(out, b"554-5.123.40 a\r\n554 5.123.40 b\r\n");
        out.clear();
        Reply::new(250, Enhanced(2, 0, 0), "").write_to(&mut out);
        assert_eq!(out, b"250 2.0.0 \r\n");
    }
}
