//! The delivery engine end to end: a SQLite store in a temporary
//! directory, a real DNS server on 127.0.0.1, and SMTP sinks on other
//! loopback addresses sharing the engine's `smtp_port`: mailroom's own
//! server, or a scripted sink whose RCPT replies each test decides.
//! Results are read back from the store, as an operator would.

mod dns_support;
mod engine_support;
mod shared;

use std::time::Duration;

use dns_support::TestDns;
use engine_support::{
    EngineSetup, HOSTNAME, Harness, MailSink, MailSinkSetup, Net, PASSWORD, PATIENCE, ScriptedSink,
    USER, addr, after_received, all_in, content, field, header, message, open_store, parse_report,
    wait_until,
};
use mailroom_core::Notify;
use mailroom_core::config::{RouteConfig, TlsMode, TlsPolicy};
use mailroom_core::time::now_unix_millis;
use mailroom_store::{RecipientState, RecipientUpdate, Store, StoredMessage};
use serde_json::Value;

use RecipientState::{Deferred, Delivered, Failed, Held, Queued};

const SENDER: &str = "app@sender.test";

/// A DNS with `sender.test` (the senders' domain, where bounces go) at
/// 127.0.0.`sender_host`, plus whatever `more` adds.
async fn dns_with(
    sender_host: u8,
    more: impl FnOnce(dns_support::TestDnsBuilder) -> dns_support::TestDnsBuilder,
) -> TestDns {
    let builder = TestDns::builder()
        .mx("sender.test", 10, "mx.sender.test")
        .a("mx.sender.test", Net::ip(sender_host));
    more(builder).start().await.unwrap()
}

/// The one DSN in the store, once it is delivered, with what the sender's
/// sink received for it.
async fn delivered_bounce(h: &Harness, sender_sink: &MailSink) -> (StoredMessage, Vec<u8>) {
    let bounce = wait_until("a bounce in the store", PATIENCE, || {
        h.bounces().into_iter().next()
    })
    .await;
    assert_eq!(bounce.envelope.reverse_path, None, "bounces use <>");
    let to: Vec<&str> = bounce
        .envelope
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(to, [SENDER], "the bounce goes to the original sender");
    assert_eq!(bounce.origin.protocol, "dsn");
    let bounce = h.wait_all(bounce.id, Delivered).await;
    let received = sender_sink.wait_messages(1).await;
    assert_eq!(received.len(), 1, "one bounce at the sender's MX");
    let got = &received[0];
    assert_eq!(got.envelope.reverse_path, None, "MAIL FROM:<>");
    assert_eq!(got.envelope.recipients[0].address, addr(SENDER));
    assert_eq!(
        after_received(&got.content),
        bounce.content.as_slice(),
        "the DSN arrives as stored"
    );
    (bounce, got.content.clone())
}

/// The per-recipient blocks of a parsed report (the first block is the
/// per-message one).
fn recipient_blocks(report: &Value) -> Vec<Value> {
    let status = &report["parts"][1];
    assert_eq!(status["content_type"], "message/delivery-status");
    let blocks = status["blocks"].as_array().expect("blocks");
    assert!(blocks.len() >= 2, "a per-message block and recipients");
    assert_eq!(
        field(&blocks[0], "Reporting-MTA"),
        Some(format!("dns; {HOSTNAME}").as_str())
    );
    blocks[1..].to_vec()
}

/// Checks the report's outer shape: multipart/report with
/// report-type=delivery-status, three parts, no parse defects.
fn check_report_shape(report: &Value) {
    assert_eq!(report["content_type"], "multipart/report", "{report:#}");
    assert_eq!(report["report_type"], "delivery-status", "{report:#}");
    assert_eq!(report["defects"], serde_json::json!([]), "{report:#}");
    let parts = report["parts"].as_array().expect("parts");
    assert_eq!(parts.len(), 3, "text, status, original: {report:#}");
    for part in parts {
        assert_eq!(part["defects"], serde_json::json!([]), "{part:#}");
    }
    assert_eq!(parts[0]["content_type"], "text/plain");
}

// ---------------------------------------------------------------------------
// 1. MX fallback
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_mx_down_second_mx_takes_the_message() {
    // 127.0.0.2 is bound but not listening: connection refused.
    let mut net = Net::bind(&[3], &[2]).await;
    let sink = MailSink::start(
        net.take(3),
        MailSinkSetup {
            tls: TlsMode::Starttls,
            ..MailSinkSetup::mx(&["dest.test"])
        },
    )
    .await;
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx1.dest.test")
        .a("mx1.dest.test", Net::ip(2))
        .mx("dest.test", 20, "mx2.dest.test")
        .a("mx2.dest.test", Net::ip(3))
        .start()
        .await
        .unwrap();
    let h = Harness::new(&EngineSetup::new(net.port, &dns));
    h.run();

    // Dot-stuffing territory: leading dots, a lone dot, a dot and space.
    let original = b"From: <app@sender.test>\r\nTo: <someone@dest.test>\r\n\
        Subject: fallback\r\nMessage-ID: <fallback@sender.test>\r\n\r\n\
        .leading dot\r\n..two dots\r\n.\r\n. \r\nlast line\r\n";
    let id = h
        .submit(message(Some(SENDER), &["someone@dest.test"], original))
        .await;
    let stored = h.wait_all(id, Delivered).await;
    assert_eq!(stored.recipients[0].attempts, 1);
    assert!(
        stored.recipients[0]
            .last_reply
            .as_deref()
            .is_some_and(|r| r.starts_with("250")),
        "{stored:#?}"
    );

    let attempts = h.attempts(id);
    assert_eq!(attempts.len(), 1, "{attempts:#?}");
    let a = &attempts[0];
    assert_eq!(a.outcome, Delivered);
    assert_eq!(a.attempt.mx_host.as_deref(), Some("mx2.dest.test"));
    assert_eq!(a.attempt.ip.as_deref(), Some("127.0.0.3"));
    assert_eq!(a.attempt.code, Some(250));
    assert!(
        a.attempt
            .tls
            .as_deref()
            .is_some_and(|t| t.starts_with("TLS")),
        "opportunistic STARTTLS was used: {a:#?}"
    );

    let received = sink.wait_messages(1).await;
    assert_eq!(received.len(), 1);
    let got = &received[0];
    assert_eq!(
        String::from_utf8_lossy(after_received(&got.content)),
        String::from_utf8_lossy(original),
        "content byte-identical"
    );
    assert!(after_received(&got.content) == original.as_slice());
    assert_eq!(got.envelope.reverse_path, Some(addr(SENDER)));
    assert_eq!(
        got.envelope.recipients[0].address,
        addr("someone@dest.test")
    );
    assert_eq!(got.origin.helo.as_deref(), Some(HOSTNAME));
    assert!(got.origin.tls.is_some(), "received over TLS");
}

// ---------------------------------------------------------------------------
// 2. 4xx, then success on retry
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_failure_is_retried_then_delivered() {
    let mut net = Net::bind(&[2], &[]).await;
    let sink = ScriptedSink::start(
        net.take(2),
        |_, nth| {
            if nth == 1 {
                "451 4.3.0 Mailbox busy, come back later".into()
            } else {
                "250 2.1.5 Recipient ok".into()
            }
        },
        Duration::ZERO,
    );
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", Net::ip(2))
        .start()
        .await
        .unwrap();
    let mut setup = EngineSetup::new(net.port, &dns);
    setup.delivery.retry_initial = Duration::from_millis(500);
    let h = Harness::new(&setup);
    h.run();

    let before = now_unix_millis();
    let id = h
        .submit(message(
            Some(SENDER),
            &["someone@dest.test"],
            &content("retry"),
        ))
        .await;
    let deferred = h
        .wait_for(id, "deferred after the first attempt", |m| {
            m.recipients[0].attempts >= 1
        })
        .await;
    let r = &deferred.recipients[0];
    assert_eq!(r.state, Deferred, "{deferred:#?}");
    assert_eq!(r.attempts, 1);
    let reply = r.last_reply.as_deref().unwrap_or("");
    assert!(
        reply.starts_with("451") && reply.contains("Mailbox busy, come back later"),
        "{reply}"
    );
    let next = r.next_attempt_at.expect("a retry is scheduled");
    // 500 ms with ±20 % jitter.
    assert!(next >= before + 400, "next attempt {next} vs {before}");

    let delivered = h.wait_all(id, Delivered).await;
    assert_eq!(delivered.recipients[0].attempts, 2);
    assert_eq!(delivered.recipients[0].next_attempt_at, None);
    let attempts = h.attempts(id);
    let summary: Vec<(RecipientState, Option<u16>)> = attempts
        .iter()
        .map(|a| (a.outcome, a.attempt.code))
        .collect();
    assert_eq!(summary, [(Deferred, Some(451)), (Delivered, Some(250))]);
    assert!(attempts[0].attempt.reply.contains("Mailbox busy"));
    assert_eq!(sink.rcpt_count("someone@dest.test"), 2);
    assert_eq!(sink.messages().len(), 1, "delivered once");
    assert!(h.bounces().is_empty(), "no bounce for a delivered message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_that_cannot_queue_defers_then_recovers() {
    let mut net = Net::bind(&[2], &[]).await;
    let sink = MailSink::start(net.take(2), MailSinkSetup::mx(&["dest.test"])).await;
    sink.set_failing(true);
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", Net::ip(2))
        .start()
        .await
        .unwrap();
    let h = Harness::new(&EngineSetup::new(net.port, &dns));
    h.run();

    let id = h
        .submit(message(
            Some(SENDER),
            &["a@dest.test", "b@dest.test"],
            &content("intake"),
        ))
        .await;
    let deferred = h
        .wait_for(id, "a first attempt", |m| m.recipients[0].attempts >= 1)
        .await;
    for r in &deferred.recipients {
        assert_eq!(r.state, Deferred, "{deferred:#?}");
        assert!(
            r.last_reply.as_deref().is_some_and(|t| t.starts_with('4')),
            "{deferred:#?}"
        );
    }
    sink.set_failing(false);
    let delivered = h.wait_all(id, Delivered).await;
    assert!(delivered.recipients.iter().all(|r| r.attempts >= 2));
    let mut rcpts: Vec<String> = sink
        .messages()
        .iter()
        .flat_map(|m| m.envelope.recipients.iter().map(|r| r.address.to_string()))
        .collect();
    rcpts.sort();
    assert_eq!(rcpts, ["a@dest.test", "b@dest.test"], "each recipient once");
}

/// Recipients of one message deferred by one attempt are retried
/// together, in one transaction, as they were first sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_deferred_together_are_retried_together() {
    let mut net = Net::bind(&[2], &[]).await;
    let sink = ScriptedSink::start(
        net.take(2),
        |_, nth| {
            if nth == 1 {
                "451 4.3.0 Try again later".into()
            } else {
                "250 2.1.5 Recipient ok".into()
            }
        },
        Duration::ZERO,
    );
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", Net::ip(2))
        .start()
        .await
        .unwrap();
    let h = Harness::new(&EngineSetup::new(net.port, &dns));
    h.run();

    let to = ["a@dest.test", "b@dest.test", "c@dest.test", "d@dest.test"];
    let id = h
        .submit(message(Some(SENDER), &to, &content("together")))
        .await;
    let deferred = h
        .wait_for(id, "a first attempt", |m| {
            m.recipients.iter().all(|r| r.attempts >= 1)
        })
        .await;
    let due: Vec<Option<i64>> = deferred
        .recipients
        .iter()
        .map(|r| r.next_attempt_at)
        .collect();
    h.wait_all(id, Delivered).await;
    let per_transaction: Vec<Vec<String>> = sink.messages().into_iter().map(|m| m.to).collect();
    assert_eq!(
        per_transaction,
        [to.map(String::from).to_vec()],
        "one retry transaction; retries were due at {due:?}"
    );
}

// ---------------------------------------------------------------------------
// 3. 5xx, bounces
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_bounces_to_the_sender() {
    let mut net = Net::bind(&[2, 3], &[]).await;
    let dest = ScriptedSink::start(
        net.take(2),
        |address, _| {
            if address.starts_with("nobody@") {
                "550 5.1.1 <nobody@dest.test>: no such user here".into()
            } else {
                "250 2.1.5 Recipient ok".into()
            }
        },
        Duration::ZERO,
    );
    let sender_sink = MailSink::start(net.take(3), MailSinkSetup::mx(&["sender.test"])).await;
    let dns = dns_with(3, |b| {
        b.mx("dest.test", 10, "mx.dest.test")
            .a("mx.dest.test", Net::ip(2))
    })
    .await;
    let h = Harness::new(&EngineSetup::new(net.port, &dns));
    h.run();

    let original = content("original-for-bounce");
    let id = h
        .submit(message(
            Some(SENDER),
            &["nobody@dest.test", "someone@dest.test"],
            &original,
        ))
        .await;
    let stored = h
        .wait_for(id, "one failed, one delivered", |m| {
            m.recipients.iter().all(|r| r.state.is_final())
        })
        .await;
    assert_eq!(stored.recipients[0].state, Failed, "{stored:#?}");
    assert_eq!(stored.recipients[1].state, Delivered, "{stored:#?}");
    assert_eq!(stored.recipients[0].attempts, 1, "a 5xx is not retried");
    let reply = stored.recipients[0].last_reply.as_deref().unwrap();
    assert!(reply.starts_with("550 5.1.1"), "{reply}");
    assert_eq!(dest.messages().len(), 1);
    assert_eq!(dest.messages()[0].to, ["someone@dest.test"]);

    let (bounce, received) = delivered_bounce(&h, &sender_sink).await;
    assert_eq!(bounce.recipients[0].state, Delivered);

    let report = parse_report(&received);
    check_report_shape(&report);
    assert!(
        report["to"].as_str().unwrap().contains(SENDER),
        "{report:#}"
    );
    let blocks = recipient_blocks(&report);
    assert_eq!(blocks.len(), 1, "only the failed recipient: {report:#}");
    let block = &blocks[0];
    assert_eq!(field(block, "Action"), Some("failed"), "{block:#}");
    assert_eq!(field(block, "Status"), Some("5.1.1"), "{block:#}");
    assert_eq!(
        field(block, "Final-Recipient"),
        Some("rfc822; nobody@dest.test"),
        "{block:#}"
    );
    assert_eq!(
        field(block, "Remote-MTA"),
        Some("dns; mx.dest.test"),
        "{block:#}"
    );
    assert!(
        field(block, "Diagnostic-Code").is_some_and(|d| d.contains("550 5.1.1")),
        "{block:#}"
    );
    let third = &report["parts"][2];
    assert!(
        matches!(
            third["content_type"].as_str(),
            Some("text/rfc822-headers" | "message/rfc822")
        ),
        "{third:#}"
    );
    assert_eq!(
        field(&third["headers"], "Subject"),
        Some("original-for-bounce"),
        "{third:#}"
    );
    assert_eq!(
        field(&third["headers"], "Message-ID"),
        header(&original, "Message-ID").as_deref(),
        "{third:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_bounce_for_the_null_sender_or_notify_never() {
    let mut net = Net::bind(&[2, 3], &[]).await;
    let _dest = ScriptedSink::replying(net.take(2), "550 5.1.1 No such user");
    let sender_sink = MailSink::start(net.take(3), MailSinkSetup::mx(&["sender.test"])).await;
    let dns = dns_with(3, |b| {
        b.mx("dest.test", 10, "mx.dest.test")
            .a("mx.dest.test", Net::ip(2))
    })
    .await;
    let mut setup = EngineSetup::new(net.port, &dns);
    // One job at a time for dest.test, first come first served: when the
    // last message's bounce exists, the others' bounce decisions are made.
    setup.delivery.connection_limit = 1;
    let h = Harness::new(&setup);

    let null_sender = h
        .submit(message(None, &["a@dest.test"], &content("null-sender")))
        .await;
    let mut never = message(Some(SENDER), &["b@dest.test"], &content("notify-never"));
    never.envelope.recipients[0].notify = Notify::NEVER;
    let never = h.submit(never).await;
    let control = h
        .submit(message(Some(SENDER), &["c@dest.test"], &content("control")))
        .await;
    h.run();

    for id in [null_sender, never, control] {
        h.wait_all(id, Failed).await;
    }
    let (bounce, _) = delivered_bounce(&h, &sender_sink).await;
    let text = String::from_utf8_lossy(&bounce.content);
    assert!(text.contains("c@dest.test"), "{text}");
    let bounces = h.bounces();
    assert_eq!(
        bounces.len(),
        1,
        "only the control message bounced: {bounces:#?}"
    );
    assert_eq!(sender_sink.messages().len(), 1);
}

// ---------------------------------------------------------------------------
// 4. Expiry
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_fails_with_5_4_7_and_bounces() {
    let mut net = Net::bind(&[2, 3], &[]).await;
    let dest = ScriptedSink::replying(net.take(2), "451 4.3.0 Try again later");
    let sender_sink = MailSink::start(net.take(3), MailSinkSetup::mx(&["sender.test"])).await;
    let dns = dns_with(3, |b| {
        b.mx("dest.test", 10, "mx.dest.test")
            .a("mx.dest.test", Net::ip(2))
    })
    .await;
    let mut setup = EngineSetup::new(net.port, &dns);
    setup.delivery.max_lifetime = Duration::from_secs(1);
    setup.delivery.retry_max = Duration::from_millis(400);
    let h = Harness::new(&setup);
    h.run();

    let id = h
        .submit(message(
            Some(SENDER),
            &["someone@dest.test"],
            &content("expiry"),
        ))
        .await;
    let stored = h.wait_all(id, Failed).await;
    let r = &stored.recipients[0];
    let reply = r.last_reply.as_deref().unwrap();
    assert!(reply.starts_with("554 5.4.7"), "{reply}");
    assert!(r.attempts >= 2, "retried before giving up: {stored:#?}");
    assert_eq!(r.next_attempt_at, None);
    assert!(dest.rcpt_count("someone@dest.test") >= 2);
    let attempts = h.attempts(id);
    assert_eq!(attempts.last().map(|a| a.outcome), Some(Failed));
    assert!(
        attempts[..attempts.len() - 1]
            .iter()
            .all(|a| a.outcome == Deferred && a.attempt.code == Some(451)),
        "{attempts:#?}"
    );

    let (_, received) = delivered_bounce(&h, &sender_sink).await;
    let report = parse_report(&received);
    check_report_shape(&report);
    let blocks = recipient_blocks(&report);
    assert_eq!(blocks.len(), 1);
    assert_eq!(field(&blocks[0], "Action"), Some("failed"));
    assert_eq!(field(&blocks[0], "Status"), Some("5.4.7"), "{report:#}");
}

// ---------------------------------------------------------------------------
// 5. STARTTLS required
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_required_but_not_offered_defers() {
    let mut net = Net::bind(&[2], &[]).await;
    let sink = MailSink::start(net.take(2), MailSinkSetup::mx(&["dest.test"])).await;
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", Net::ip(2))
        .start()
        .await
        .unwrap();
    let mut setup = EngineSetup::new(net.port, &dns);
    setup.delivery.tls = TlsPolicy::Required;
    setup.client.tls = TlsPolicy::Required;
    let h = Harness::new(&setup);
    h.run();

    let id = h
        .submit(message(
            Some(SENDER),
            &["someone@dest.test"],
            &content("tls-required"),
        ))
        .await;
    let stored = h
        .wait_for(id, "a first attempt", |m| m.recipients[0].attempts >= 1)
        .await;
    let r = &stored.recipients[0];
    assert_eq!(r.state, Deferred, "a TLS refusal is temporary: {stored:#?}");
    let reply = r.last_reply.as_deref().unwrap();
    assert!(reply.starts_with("451 4.7.4"), "{reply}");
    assert!(
        reply.contains("STARTTLS required but not offered by mx.dest.test"),
        "{reply}"
    );
    let attempts = h.attempts(id);
    let a = &attempts[0];
    assert_eq!(a.outcome, Deferred);
    assert!(
        a.attempt
            .reply
            .contains("STARTTLS required but not offered"),
        "{a:#?}"
    );
    assert_eq!(a.attempt.mx_host.as_deref(), Some("mx.dest.test"));
    assert_eq!(a.attempt.tls, None);
    assert!(sink.messages().is_empty(), "nothing sent in plaintext");
}

/// The reply recorded for a failure decided on our side carries its
/// enhanced status code once, like a server's reply would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_failure_reply_has_one_status_code() {
    let mut net = Net::bind(&[2], &[3]).await;
    let _sink = MailSink::start(net.take(2), MailSinkSetup::mx(&["dest.test"])).await;
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", Net::ip(2))
        .mx("down.test", 10, "mx.down.test")
        .a("mx.down.test", Net::ip(3))
        .start()
        .await
        .unwrap();
    let mut setup = EngineSetup::new(net.port, &dns);
    setup.client.tls = TlsPolicy::Required;
    let h = Harness::new(&setup);
    h.run();
    let tls = h
        .submit(message(Some(SENDER), &["a@dest.test"], &content("tls")))
        .await;
    let refused = h
        .submit(message(Some(SENDER), &["a@down.test"], &content("down")))
        .await;
    for id in [tls, refused] {
        let stored = h
            .wait_for(id, "a first attempt", |m| m.recipients[0].attempts >= 1)
            .await;
        let reply = stored.recipients[0].last_reply.clone().unwrap();
        let words: Vec<&str> = reply.split(' ').collect();
        assert!(
            words.len() > 2 && words[1] != words[2],
            "enhanced code repeated: {reply}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_required_and_offered_delivers_over_tls() {
    let mut net = Net::bind(&[2], &[]).await;
    let sink = MailSink::start(
        net.take(2),
        MailSinkSetup {
            tls: TlsMode::Starttls,
            ..MailSinkSetup::mx(&["dest.test"])
        },
    )
    .await;
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", Net::ip(2))
        .start()
        .await
        .unwrap();
    let mut setup = EngineSetup::new(net.port, &dns);
    setup.delivery.tls = TlsPolicy::Required;
    setup.client.tls = TlsPolicy::Required;
    let h = Harness::new(&setup);
    h.run();
    let id = h
        .submit(message(Some(SENDER), &["a@dest.test"], &content("tls-ok")))
        .await;
    h.wait_all(id, Delivered).await;
    let attempts = h.attempts(id);
    assert!(
        attempts[0]
            .attempt
            .tls
            .as_deref()
            .is_some_and(|t| t.starts_with("TLSv1.")),
        "{attempts:#?}"
    );
    assert!(sink.wait_messages(1).await[0].origin.tls.is_some());
}

// ---------------------------------------------------------------------------
// 6. Relay with AUTH
// ---------------------------------------------------------------------------

fn relay_route(port: u16, password: &str) -> RouteConfig {
    RouteConfig {
        domain: "*".into(),
        relay: format!("127.0.0.5:{port}"),
        tls: TlsPolicy::Required,
        username: Some(USER.into()),
        password: Some(password.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_route_with_auth_delivers() {
    let mut net = Net::bind(&[5], &[]).await;
    let relay = MailSink::start(net.take(5), MailSinkSetup::submission()).await;
    let dns = TestDns::builder().start().await.unwrap();
    let mut setup = EngineSetup::new(net.port, &dns);
    setup.delivery.routes = vec![relay_route(net.port, PASSWORD)];
    let h = Harness::new(&setup);
    h.run();

    let original = content("via-relay");
    let id = h
        .submit(message(Some(SENDER), &["someone@far.test"], &original))
        .await;
    h.wait_all(id, Delivered).await;
    let received = relay.wait_messages(1).await;
    let got = &received[0];
    assert_eq!(got.origin.auth_user.as_deref(), Some(USER));
    assert!(got.origin.tls.is_some(), "AUTH went over STARTTLS");
    assert_eq!(got.envelope.recipients[0].address, addr("someone@far.test"));
    assert!(after_received(&got.content) == original.as_slice());
    let attempts = h.attempts(id);
    assert_eq!(attempts[0].attempt.mx_host.as_deref(), Some("127.0.0.5"));
    assert_eq!(attempts[0].attempt.ip.as_deref(), Some("127.0.0.5"));
    assert!(attempts[0].attempt.tls.is_some());
    assert_eq!(dns.total_queries(), 0, "a route needs no MX lookup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_route_with_a_wrong_password_fails_permanently() {
    let mut net = Net::bind(&[5], &[]).await;
    let relay = MailSink::start(net.take(5), MailSinkSetup::submission()).await;
    let dns = TestDns::builder().start().await.unwrap();
    let mut setup = EngineSetup::new(net.port, &dns);
    setup.delivery.routes = vec![relay_route(net.port, "not-the-password")];
    let h = Harness::new(&setup);
    h.run();

    let id = h
        .submit(message(
            Some(SENDER),
            &["someone@far.test"],
            &content("bad-auth"),
        ))
        .await;
    let stored = h.wait_all(id, Failed).await;
    let r = &stored.recipients[0];
    assert_eq!(r.attempts, 1, "not retried: {stored:#?}");
    let reply = r.last_reply.as_deref().unwrap();
    assert!(reply.starts_with("535"), "{reply}");
    assert!(
        !reply.contains("not-the-password"),
        "no secret in replies: {reply}"
    );
    assert!(relay.messages().is_empty());
    // The bounce takes the same route and fails the same way; a bounce of
    // a bounce never happens.
    let bounce = wait_until("a bounce in the store", PATIENCE, || {
        h.bounces().into_iter().next()
    })
    .await;
    h.wait_all(bounce.id, Failed).await;
    assert_eq!(h.bounces().len(), 1);
}

// ---------------------------------------------------------------------------
// 7. Null MX, and other DNS answers
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_mx_fails_with_5_1_10_and_bounces() {
    let mut net = Net::bind(&[2], &[]).await;
    let sender_sink = MailSink::start(net.take(2), MailSinkSetup::mx(&["sender.test"])).await;
    let dns = dns_with(2, |b| b.null_mx("nomail.test")).await;
    let h = Harness::new(&EngineSetup::new(net.port, &dns));
    h.run();

    let id = h
        .submit(message(
            Some(SENDER),
            &["someone@nomail.test"],
            &content("null-mx"),
        ))
        .await;
    let stored = h.wait_all(id, Failed).await;
    let r = &stored.recipients[0];
    assert_eq!(r.attempts, 1);
    let reply = r.last_reply.as_deref().unwrap();
    assert!(reply.starts_with("556 5.1.10"), "{reply}");
    let attempts = h.attempts(id);
    assert_eq!(attempts[0].attempt.mx_host, None, "no host was tried");

    let (_, received) = delivered_bounce(&h, &sender_sink).await;
    let report = parse_report(&received);
    check_report_shape(&report);
    let blocks = recipient_blocks(&report);
    assert_eq!(field(&blocks[0], "Status"), Some("5.1.10"), "{report:#}");
    assert_eq!(
        field(&blocks[0], "Final-Recipient"),
        Some("rfc822; someone@nomail.test")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_decide_defer_or_fail() {
    let net = Net::bind(&[2], &[]).await;
    let dns = TestDns::builder()
        .servfail("broken.test")
        .start()
        .await
        .unwrap();
    let h = Harness::new(&EngineSetup::new(net.port, &dns));
    h.run();

    let broken = h
        .submit(message(
            Some(SENDER),
            &["a@broken.test"],
            &content("servfail"),
        ))
        .await;
    let missing = h
        .submit(message(None, &["a@missing.test"], &content("nxdomain")))
        .await;
    let stored = h
        .wait_for(broken, "a first attempt", |m| m.recipients[0].attempts >= 1)
        .await;
    assert_eq!(stored.recipients[0].state, Deferred, "{stored:#?}");
    assert!(
        stored.recipients[0]
            .last_reply
            .as_deref()
            .is_some_and(|r| r.starts_with("451 4.4.3")),
        "{stored:#?}"
    );
    let stored = h.wait_all(missing, Failed).await;
    assert!(
        stored.recipients[0]
            .last_reply
            .as_deref()
            .is_some_and(|r| r.starts_with("550 5.1.2")),
        "{stored:#?}"
    );
}

// ---------------------------------------------------------------------------
// 8. Local domains
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_domain_is_delivered_without_network() {
    let dns = TestDns::builder().start().await.unwrap();
    // No sink anywhere: any connection attempt would fail.
    let mut setup = EngineSetup::new(9, &dns);
    setup.local_domains = vec!["Local.Test".into()];
    let h = Harness::new(&setup);
    h.run();

    let id = h
        .submit(message(
            Some(SENDER),
            &["someone@local.test", "Other@LOCAL.TEST"],
            &content("local"),
        ))
        .await;
    let stored = h.wait_all(id, Delivered).await;
    for r in &stored.recipients {
        assert_eq!(
            r.last_reply.as_deref(),
            Some("250 2.0.0 Kept in the local mailbox")
        );
        assert_eq!(r.next_attempt_at, None);
    }
    assert!(h.attempts(id).is_empty(), "no delivery attempt was made");
    assert_eq!(dns.total_queries(), 0, "not even a DNS query");
}

/// A recipient an operator holds after its job was scheduled is left alone
/// when the job comes up: the job's other recipients go, it does not.
async fn held_after_scheduling_stays_held(local: bool) {
    let mut net = Net::bind(&[2], &[]).await;
    let sink = MailSink::start(net.take(2), MailSinkSetup::mx(&["dest.test"])).await;
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", Net::ip(2))
        .start()
        .await
        .unwrap();
    let mut setup = EngineSetup::new(net.port, &dns);
    setup.local_domains = vec!["local.test".into()];
    let h = Harness::new(&setup);
    let domain = if local { "local.test" } else { "dest.test" };
    let to = [format!("held@{domain}"), format!("free@{domain}")];
    let to: Vec<&str> = to.iter().map(String::as_str).collect();
    let id = h.submit(message(Some(SENDER), &to, &content("hold"))).await;
    // Held by an operator between scheduling and delivery.
    let matched = h
        .store
        .update(vec![RecipientUpdate {
            message_id: id,
            idx: 0,
            state: Held,
            next_attempt_at: None,
            last_reply: None,
            attempt: None,
        }])
        .await
        .unwrap();
    assert_eq!(matched, 1);
    h.run();
    let stored = h
        .wait_for(id, "the free recipient delivered", |m| {
            m.recipients[1].state == Delivered
        })
        .await;
    assert_eq!(stored.recipients[0].state, Held, "{stored:#?}");
    if !local {
        let received = sink.wait_messages(1).await;
        assert_eq!(received[0].envelope.recipients.len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_remote_recipient_is_not_delivered() {
    held_after_scheduling_stays_held(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_local_recipient_is_not_delivered() {
    held_after_scheduling_stays_held(true).await;
}

// ---------------------------------------------------------------------------
// 9. Crash safety
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_before_a_restart_goes_out_after_it() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let mut ids = Vec::new();
    {
        // Before the "crash": accepted, durable, never delivered.
        let store = open_store(&dir);
        for (subject, to) in [
            ("restart-1", vec!["a@dest.test"]),
            ("restart-2", vec!["b@dest.test", "c@other.test"]),
            ("restart-3", vec!["d@dest.test"]),
        ] {
            let m = message(Some(SENDER), &to, &content(subject));
            ids.push(m.id);
            store.enqueue(m).await.unwrap();
        }
        // Dropped without close().
    }

    let mut net = Net::bind(&[2], &[]).await;
    let sink = MailSink::start(net.take(2), MailSinkSetup::mx(&["dest.test", "other.test"])).await;
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .mx("other.test", 10, "mx.dest.test")
        .a("mx.dest.test", Net::ip(2))
        .start()
        .await
        .unwrap();
    let h = Harness::with_dir(dir, &EngineSetup::new(net.port, &dns));
    for &id in &ids {
        assert!(all_in(&h.get(id), Queued), "still queued after reopening");
    }
    assert_eq!(h.engine.load().unwrap(), 4, "every recipient is scheduled");
    h.run();
    for &id in &ids {
        h.wait_all(id, Delivered).await;
    }
    let received = sink.wait_messages(4).await;
    let mut rcpts: Vec<String> = received
        .iter()
        .flat_map(|m| m.envelope.recipients.iter().map(|r| r.address.to_string()))
        .collect();
    rcpts.sort();
    assert_eq!(
        rcpts,
        ["a@dest.test", "b@dest.test", "c@other.test", "d@dest.test"],
        "each recipient once"
    );
}

// ---------------------------------------------------------------------------
// 10. Limits and priority
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_one_means_one_connection_in_priority_order() {
    let mut net = Net::bind(&[2], &[]).await;
    let sink = ScriptedSink::start(
        net.take(2),
        |_, _| "250 2.1.5 Ok".into(),
        Duration::from_millis(100),
    );
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", Net::ip(2))
        .start()
        .await
        .unwrap();
    let mut setup = EngineSetup::new(net.port, &dns);
    setup.delivery.connection_limit = 1;
    let h = Harness::new(&setup);

    let mut ids = Vec::new();
    for (n, priority) in [0i8, -5, 7, 3, 0].into_iter().enumerate() {
        let mut m = message(
            Some(SENDER),
            &["someone@dest.test"],
            &content(&format!("limit-{n}-prio-{priority}")),
        );
        m.envelope.priority = priority;
        ids.push(h.submit(m).await);
    }
    h.run();
    for &id in &ids {
        h.wait_all(id, Delivered).await;
    }
    assert_eq!(sink.max_concurrent(), 1, "never two connections at once");
    let order: Vec<String> = sink
        .messages()
        .iter()
        .map(|m| header(&m.data, "Subject").unwrap())
        .collect();
    assert_eq!(
        order,
        [
            "limit-2-prio-7",
            "limit-3-prio-3",
            "limit-0-prio-0",
            "limit-4-prio-0",
            "limit-1-prio--5"
        ],
        "highest priority first, then oldest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_sharing_an_mx_host_share_its_connection_limit() {
    let mut net = Net::bind(&[2], &[]).await;
    let sink = ScriptedSink::start(
        net.take(2),
        |_, _| "250 2.1.5 Ok".into(),
        Duration::from_millis(100),
    );
    let mut dns = TestDns::builder();
    for d in ["one.test", "two.test", "three.test"] {
        dns = dns.mx(d, 10, "mx.shared.test");
    }
    let dns = dns.a("mx.shared.test", Net::ip(2)).start().await.unwrap();
    let mut setup = EngineSetup::new(net.port, &dns);
    setup.delivery.connection_limit = 1;
    let h = Harness::new(&setup);
    let mut ids = Vec::new();
    for (n, domain) in ["one.test", "two.test", "three.test", "one.test", "two.test"]
        .into_iter()
        .enumerate()
    {
        let m = message(
            Some(SENDER),
            &[&format!("someone@{domain}")],
            &content(&format!("shared-{n}")),
        );
        ids.push(h.submit(m).await);
    }
    h.run();
    for &id in &ids {
        h.wait_all(id, Delivered).await;
    }
    assert_eq!(
        sink.max_concurrent(),
        1,
        "three domains, one MX host, limit 1: never two connections at once"
    );
    assert_eq!(sink.messages().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_allows_parallel_connections() {
    // The control for the test above: the sink does see overlap when the
    // limit allows it.
    let mut net = Net::bind(&[2], &[]).await;
    let sink = ScriptedSink::start(
        net.take(2),
        |_, _| "250 2.1.5 Ok".into(),
        Duration::from_millis(300),
    );
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", Net::ip(2))
        .start()
        .await
        .unwrap();
    let mut setup = EngineSetup::new(net.port, &dns);
    setup.delivery.connection_limit = 3;
    let h = Harness::new(&setup);
    let mut ids = Vec::new();
    for n in 0..5 {
        let m = message(
            Some(SENDER),
            &["someone@dest.test"],
            &content(&format!("parallel-{n}")),
        );
        ids.push(h.submit(m).await);
    }
    h.run();
    for &id in &ids {
        h.wait_all(id, Delivered).await;
    }
    let max = sink.max_concurrent();
    assert!((2..=3).contains(&max), "max concurrent {max}");
}

// ---------------------------------------------------------------------------
// 11. Many messages to one destination
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_messages_to_one_destination() {
    const N: usize = 20;
    let mut net = Net::bind(&[2], &[]).await;
    let sink = ScriptedSink::start(net.take(2), |_, _| "250 2.1.5 Ok".into(), Duration::ZERO);
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", Net::ip(2))
        .start()
        .await
        .unwrap();
    let h = Harness::new(&EngineSetup::new(net.port, &dns));
    h.run();

    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    for n in 0..N {
        let m = message(
            Some(SENDER),
            &[&format!("user{n}@dest.test")],
            &content(&format!("bulk-{n}")),
        );
        ids.push(h.submit(m).await);
    }
    for &id in &ids {
        let stored = h.wait_all(id, Delivered).await;
        assert_eq!(stored.recipients[0].attempts, 1);
    }
    let elapsed = started.elapsed();
    let messages = sink.messages();
    assert_eq!(messages.len(), N, "each message once");
    let mut subjects: Vec<String> = messages
        .iter()
        .map(|m| header(&m.data, "Subject").unwrap())
        .collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), N, "no duplicates");
    println!(
        "{N} messages to one destination: {} connection(s) at the sink, \
         at most {} at once, {elapsed:?}",
        sink.connections(),
        sink.max_concurrent()
    );
    assert!(sink.connections() >= 1);
    assert!(sink.max_concurrent() <= 4, "connection_limit is 4");
}
