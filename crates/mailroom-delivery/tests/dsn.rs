//! Delivery status notifications read back by an independent MIME parser:
//! Python's `email` package (policy `default`), which is what a great many
//! mail tools use. Each test builds a report with `dsn::build`, hands the
//! bytes to `python3`, and checks the structure it saw.

mod shared;

use mailroom_core::{Address, Notify, Ret};
use mailroom_delivery::dsn::{self, Action, DsnRecipient, DsnRequest};
use serde_json::Value;

/// Parses stdin as a message and prints what a reader would see, as JSON.
const PARSE: &str = r#"
import email, email.policy, json, sys
data = sys.stdin.buffer.read()
msg = email.message_from_bytes(data, policy=email.policy.default)

def fields(block):
    return [[k, str(v)] for k, v in block.items()]

def describe(part):
    out = {
        "content_type": part.get_content_type(),
        "cte": part.get("content-transfer-encoding"),
        "defects": [type(d).__name__ for d in part.defects],
    }
    ct = part.get_content_type()
    if ct == "message/delivery-status":
        out["blocks"] = [fields(b) for b in part.get_payload()]
    elif ct == "message/rfc822":
        inner = part.get_payload(0)
        out["subject"] = str(inner["subject"])
        out["headers"] = fields(inner)
        out["body"] = inner.get_payload(decode=True).decode("utf-8")
    else:
        out["text"] = part.get_content()
    return out

print(json.dumps({
    "content_type": msg.get_content_type(),
    "report_type": msg.get_param("report-type"),
    "subject": str(msg["subject"]),
    "from": str(msg["from"]),
    "to": str(msg["to"]),
    "date": msg["date"].datetime.isoformat(),
    "message_id": str(msg["message-id"]),
    "auto_submitted": str(msg["auto-submitted"]),
    "in_reply_to": msg.get("in-reply-to") and str(msg["in-reply-to"]),
    "header_names": [k for k in msg.keys()],
    "defects": [type(d).__name__ for d in msg.defects],
    "parts": [describe(p) for p in msg.iter_parts()],
}))
"#;

fn parse(message: &[u8]) -> Value {
    shared::python_json(PARSE, message)
}

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

const ORIGINAL: &[u8] = b"Received: from client.example.test ([192.0.2.1])\r\n\
    \tby mx.example.test with ESMTP id 1; Tue, 1 Jul 2003 10:52:37 +0000\r\n\
    From: Sender <sender@example.test>\r\n\
    To: bob@dest.test, carol@dest.test\r\n\
    Subject: Quarterly numbers\r\n\
    Message-ID: <orig-1@example.test>\r\n\
    \r\n\
    Secret body line one.\r\n\
    Line two.\r\n";

fn request<'a>(
    to: &'a Address,
    content: &'a [u8],
    ret: Option<Ret>,
    recipients: Vec<DsnRecipient>,
) -> DsnRequest<'a> {
    DsnRequest {
        reporting_mta: "mx.example.test",
        postmaster: "MAILER-DAEMON@mx.example.test",
        recipient: to,
        original_envelope_id: Some("QQ314159"),
        arrival_date: 1_057_056_757,
        ret,
        original_content: content,
        original_message_id: Some("<orig-1@example.test>"),
        recipients,
        message_id_domain: "mx.example.test",
    }
}

/// The value of `name` in a block of `[name, value]` pairs; panics when it
/// is missing or repeated.
fn get<'v>(block: &'v Value, name: &str) -> &'v str {
    let found: Vec<&str> = block
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f[0].as_str().unwrap().eq_ignore_ascii_case(name))
        .map(|f| f[1].as_str().unwrap())
        .collect();
    assert_eq!(found.len(), 1, "{name} in {block}");
    found[0]
}

/// The human-readable part with its line wrapping undone.
fn human_text(parsed: &Value) -> String {
    let text = parsed["parts"][0]["text"].as_str().unwrap();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn has(block: &Value, name: &str) -> bool {
    block
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f[0].as_str().unwrap().eq_ignore_ascii_case(name))
}

fn assert_no_defects(parsed: &Value) {
    assert_eq!(parsed["defects"], Value::Array(vec![]), "{parsed}");
    for part in parsed["parts"].as_array().unwrap() {
        assert_eq!(part["defects"], Value::Array(vec![]), "{part}");
    }
}

/// CRLF everywhere and no line over 998 octets.
fn assert_wire_clean(bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && bytes[i - 1] == b'\r', "bare LF at {i}");
        }
    }
    for line in bytes.split(|&b| b == b'\n') {
        assert!(line.len() <= 999, "line of {} octets", line.len());
    }
}

#[test]
fn failed_with_headers_only() {
    let to = address("sender@example.test");
    let mut bob = recipient("bob@dest.test", Action::Failed, "5.1.1");
    bob.original_recipient = Some("rfc822;Bob@Dest.test".into());
    bob.remote_mta = Some("mx.dest.test".into());
    bob.diagnostic = Some("550 5.1.1 <bob@dest.test>: No such user".into());
    bob.last_attempt = Some(1_057_056_800);
    let message = dsn::build(&request(&to, ORIGINAL, Some(Ret::Hdrs), vec![bob]));
    assert_wire_clean(&message);
    assert!(message.is_ascii());

    let p = parse(&message);
    assert_no_defects(&p);
    assert_eq!(p["content_type"], "multipart/report");
    assert_eq!(p["report_type"], "delivery-status");
    assert_eq!(p["subject"], "Undelivered Mail Returned to Sender");
    assert_eq!(p["auto_submitted"], "auto-replied");
    assert_eq!(
        p["from"],
        "Mail Delivery System <MAILER-DAEMON@mx.example.test>"
    );
    assert_eq!(p["to"], "sender@example.test");
    assert_eq!(p["in_reply_to"], "<orig-1@example.test>");
    assert!(
        p["message_id"]
            .as_str()
            .unwrap()
            .ends_with("@mx.example.test>")
    );
    assert!(p["date"].as_str().unwrap().ends_with("+00:00"));

    let parts = p["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[0]["content_type"], "text/plain");
    let text = human_text(&p);
    assert!(
        text.contains("<bob@dest.test> Status 5.1.1; host mx.dest.test said: 550 5.1.1"),
        "{text}"
    );
    assert!(text.contains("No such user"), "{text}");

    assert_eq!(parts[1]["content_type"], "message/delivery-status");
    let blocks = parts[1]["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    assert_eq!(get(&blocks[0], "Reporting-MTA"), "dns; mx.example.test");
    assert_eq!(get(&blocks[0], "Original-Envelope-Id"), "QQ314159");
    assert_eq!(
        get(&blocks[0], "Arrival-Date"),
        "Tue, 1 Jul 2003 10:52:37 +0000"
    );
    let b = &blocks[1];
    assert_eq!(get(b, "Original-Recipient"), "rfc822;Bob@Dest.test");
    assert_eq!(get(b, "Final-Recipient"), "rfc822; bob@dest.test");
    assert_eq!(get(b, "Action"), "failed");
    assert_eq!(get(b, "Status"), "5.1.1");
    assert_eq!(get(b, "Remote-MTA"), "dns; mx.dest.test");
    assert_eq!(
        get(b, "Diagnostic-Code"),
        "smtp; 550 5.1.1 <bob@dest.test>: No such user"
    );
    assert_eq!(
        get(b, "Last-Attempt-Date"),
        "Tue, 1 Jul 2003 10:53:20 +0000"
    );
    assert!(!has(b, "Will-Retry-Until"));

    assert_eq!(parts[2]["content_type"], "text/rfc822-headers");
    let headers = parts[2]["text"].as_str().unwrap();
    assert!(headers.contains("Subject: Quarterly numbers"), "{headers}");
    assert!(headers.starts_with("Received: from client.example.test"));
    assert!(!headers.contains("Secret body"), "{headers}");
}

#[test]
fn failed_with_full_message() {
    let to = address("sender@example.test");
    let message = dsn::build(&request(
        &to,
        ORIGINAL,
        Some(Ret::Full),
        vec![recipient("bob@dest.test", Action::Failed, "5.2.2")],
    ));
    assert_wire_clean(&message);
    let p = parse(&message);
    assert_no_defects(&p);
    let part = &p["parts"][2];
    assert_eq!(part["content_type"], "message/rfc822");
    assert_eq!(part["cte"], "7bit");
    assert_eq!(part["subject"], "Quarterly numbers");
    assert_eq!(part["body"], "Secret body line one.\r\nLine two.\r\n");
    // The original goes back byte for byte.
    let at = message
        .windows(ORIGINAL.len())
        .position(|w| w == ORIGINAL)
        .expect("original inside the report");
    assert!(message[at + ORIGINAL.len()..].starts_with(b"\r\n--"));
}

#[test]
fn several_recipients_with_different_outcomes() {
    let to = address("sender@example.test");
    let mut bob = recipient("bob@dest.test", Action::Failed, "5.1.1");
    bob.diagnostic = Some("550 5.1.1 No such user".into());
    let mut carol = recipient("carol@dest.test", Action::Delayed, "4.4.1");
    carol.diagnostic = Some("connect to mx.dest.test: Connection refused".into());
    carol.diagnostic = carol.diagnostic.map(|d| format!("x-mailroom; {d}"));
    carol.will_retry_until = Some(1_057_488_757);
    carol.original_recipient = Some("rfc822;carol@dest.test".into());
    let dave = recipient("dave@other.test", Action::Delivered, "2.0.0");
    let message = dsn::build(&request(&to, ORIGINAL, None, vec![bob, carol, dave]));
    let p = parse(&message);
    assert_no_defects(&p);
    assert_eq!(p["subject"], "Undelivered Mail Returned to Sender");
    let blocks = p["parts"][1]["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 4);
    let expect = [
        ("rfc822; bob@dest.test", "failed", "5.1.1"),
        ("rfc822; carol@dest.test", "delayed", "4.4.1"),
        ("rfc822; dave@other.test", "delivered", "2.0.0"),
    ];
    for (block, (fin, action, status)) in blocks[1..].iter().zip(expect) {
        assert_eq!(get(block, "Final-Recipient"), fin);
        assert_eq!(get(block, "Action"), action);
        assert_eq!(get(block, "Status"), status);
    }
    assert!(!has(&blocks[1], "Original-Recipient"));
    assert_eq!(
        get(&blocks[2], "Original-Recipient"),
        "rfc822;carol@dest.test"
    );
    assert_eq!(
        get(&blocks[2], "Diagnostic-Code"),
        "x-mailroom; connect to mx.dest.test: Connection refused"
    );
    assert_eq!(
        get(&blocks[2], "Will-Retry-Until"),
        "Sun, 6 Jul 2003 10:52:37 +0000"
    );
    assert!(!has(&blocks[3], "Diagnostic-Code"));
    // No RET: headers only.
    assert_eq!(p["parts"][2]["content_type"], "text/rfc822-headers");
    let text = human_text(&p);
    for who in ["bob@dest.test", "carol@dest.test", "dave@other.test"] {
        assert!(text.contains(who), "{text}");
    }
}

#[test]
fn subjects_follow_the_worst_outcome() {
    let to = address("sender@example.test");
    let subject = |actions: &[Action]| {
        let recipients = actions
            .iter()
            .map(|&a| recipient("bob@dest.test", a, ""))
            .collect();
        let p = parse(&dsn::build(&request(&to, ORIGINAL, None, recipients)));
        p["subject"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        subject(&[Action::Delayed]),
        "Delayed Mail (still being retried)"
    );
    assert_eq!(
        subject(&[Action::Delivered, Action::Relayed]),
        "Successful Mail Delivery Report"
    );
    assert_eq!(
        subject(&[Action::Delivered, Action::Delayed, Action::Failed]),
        "Undelivered Mail Returned to Sender"
    );
}

#[test]
fn eight_bit_original() {
    let to = address("sender@example.test");
    let original = "From: Jörg <jörg@example.test>\r\n\
        Subject: Grüße aus Köln\r\n\
        Content-Type: text/plain; charset=utf-8\r\n\
        Content-Transfer-Encoding: 8bit\r\n\
        \r\n\
        Schöne Grüße, ünd tschüß.\r\n"
        .as_bytes();
    for ret in [Ret::Full, Ret::Hdrs] {
        let message = dsn::build(&request(
            &to,
            original,
            Some(ret),
            vec![recipient("bob@dest.test", Action::Failed, "5.1.1")],
        ));
        assert_wire_clean(&message);
        let head_end = message.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&message[..head_end]);
        assert!(head.contains("Content-Transfer-Encoding: 8bit"), "{head}");
        assert!(!String::from_utf8_lossy(&message).contains("base64"));
        let p = parse(&message);
        assert_no_defects(&p);
        let part = &p["parts"][2];
        assert_eq!(part["cte"], "8bit");
        match ret {
            Ret::Full => {
                assert_eq!(part["content_type"], "message/rfc822");
                assert_eq!(part["subject"], "Grüße aus Köln");
                assert_eq!(part["body"], "Schöne Grüße, ünd tschüß.\r\n");
            }
            Ret::Hdrs => {
                assert_eq!(part["content_type"], "text/rfc822-headers");
                let text = part["text"].as_str().unwrap();
                assert!(text.contains("Subject: Grüße aus Köln"), "{text}");
                assert!(!text.contains("Schöne"));
            }
        }
    }
}

#[test]
fn utf8_recipient_addresses() {
    let to = address("sender@example.test");
    let mut r = recipient("jörg@dest.test", Action::Failed, "5.1.1");
    r.original_recipient = Some("rfc822;jörg@dest.test".into());
    r.diagnostic = Some("550 5.1.1 jörg: unknown".into());
    let message = dsn::build(&request(&to, ORIGINAL, None, vec![r]));
    let p = parse(&message);
    assert_no_defects(&p);
    let b = &p["parts"][1]["blocks"][1];
    assert_eq!(get(b, "Final-Recipient"), "utf-8; j\\x{F6}rg@dest.test");
    assert_eq!(get(b, "Original-Recipient"), "utf-8;j\\x{F6}rg@dest.test");
    assert_eq!(get(b, "Diagnostic-Code"), "smtp; 550 5.1.1 j?rg: unknown");
    // The human-readable part keeps the real address and reply.
    let text = human_text(&p);
    assert!(text.contains("<jörg@dest.test>"), "{text}");
    assert!(text.contains("550 5.1.1 jörg: unknown"), "{text}");
}

#[test]
fn hostile_values_cannot_inject_fields() {
    let to = address("sender@example.test");
    let mut bob = recipient("bob@dest.test", Action::Failed, "5.1.1");
    bob.diagnostic = Some(
        "550-5.1.1 first line\r\n550-Action: delivered\r\n\r\n\
         Final-Recipient: rfc822; evil@x\r\nBcc: victim@x\r\n550 5.1.1 last"
            .into(),
    );
    bob.remote_mta = Some("mx.dest.test\r\nX-Injected: 1".into());
    bob.original_recipient = Some("rfc822;bob@dest.test\r\nAction: delivered".into());
    let mut req = request(&to, ORIGINAL, None, vec![bob]);
    req.original_envelope_id = Some("ENV\r\nX-Injected: 2");
    req.original_message_id = Some("<a@b>\r\nBcc: victim@x");
    req.postmaster = "MAILER-DAEMON@mx.example.test>\r\nBcc: victim@x";
    let message = dsn::build(&req);
    assert_wire_clean(&message);
    let p = parse(&message);
    assert_no_defects(&p);
    let names: Vec<&str> = p["header_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(
        !names.iter().any(|n| n.eq_ignore_ascii_case("bcc")),
        "{names:?}"
    );
    assert!(!names.contains(&"In-Reply-To"));
    let blocks = p["parts"][1]["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    assert!(!has(&blocks[0], "X-Injected"));
    assert_eq!(
        get(&blocks[0], "Original-Envelope-Id"),
        "ENV+0D+0AX-Injected:+202"
    );
    let b = &blocks[1];
    assert_eq!(get(b, "Action"), "failed");
    assert_eq!(get(b, "Final-Recipient"), "rfc822; bob@dest.test");
    assert!(!has(b, "Bcc") && !has(b, "X-Injected"));
    assert_eq!(
        get(b, "Diagnostic-Code"),
        "smtp; 550-5.1.1 first line 550-Action: delivered \
         Final-Recipient: rfc822; evil@x Bcc: victim@x 550 5.1.1 last"
    );
    assert_eq!(get(b, "Remote-MTA"), "dns; mx.dest.test X-Injected: 1");
    assert_eq!(
        get(b, "Original-Recipient"),
        "rfc822;bob@dest.test Action: delivered"
    );
}

#[test]
fn long_diagnostics_are_folded() {
    let to = address("sender@example.test");
    let mut bob = recipient("bob@dest.test", Action::Failed, "5.7.1");
    let words = "policy ".repeat(300);
    bob.diagnostic = Some(format!("554 5.7.1 {}", words.trim_end()));
    let message = dsn::build(&request(&to, ORIGINAL, None, vec![bob]));
    assert_wire_clean(&message);
    for line in message.split(|&b| b == b'\n') {
        assert!(line.len() <= 80, "{}", String::from_utf8_lossy(line));
    }
    let p = parse(&message);
    assert_eq!(
        get(&p["parts"][1]["blocks"][1], "Diagnostic-Code"),
        format!("smtp; 554 5.7.1 {}", words.trim_end())
    );
}

#[test]
fn wants_truth_table() {
    use Action::*;
    let (s, f, d, n) = (
        Notify::SUCCESS,
        Notify::FAILURE,
        Notify::DELAY,
        Notify::NEVER,
    );
    // (notify, [failed, delayed, delivered, relayed, expanded])
    let table = [
        (Notify::empty(), [true, false, false, false, false]),
        (n, [false; 5]),
        (n.with(f).with(s), [false; 5]),
        (f, [true, false, false, false, false]),
        (d, [false, true, false, false, false]),
        (s, [false, false, true, true, true]),
        (f.with(d), [true, true, false, false, false]),
        (s.with(f), [true, false, true, true, true]),
        (s.with(d), [false, true, true, true, true]),
        (s.with(f).with(d), [true; 5]),
    ];
    for (notify, expected) in table {
        for (action, want) in [Failed, Delayed, Delivered, Relayed, Expanded]
            .into_iter()
            .zip(expected)
        {
            assert_eq!(
                dsn::wants(notify, action),
                want,
                "notify bits {:#06b}, {action:?}",
                notify.bits()
            );
        }
    }
}
