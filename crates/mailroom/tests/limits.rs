//! The driver-level limits, as transcripts over real sockets: timeouts,
//! connection limits, line and message size, recipients, errors, and the
//! STARTTLS plaintext-injection guard.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::{LOCAL_DOMAIN, Role, Setup, Smtp, Tls, assert_content, message, poll};
use mailroom_store::Store;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an IP address")
}

/// Connects from `from` and waits for a `220` greeting, retrying while the
/// server still counts an earlier connection (the start-up probe, or one
/// the test just closed) against a limit.
fn connect_greeted(from: &str, addr: SocketAddr) -> Smtp {
    poll(Duration::from_secs(5), || {
        let mut c = Smtp::connect_from(ip(from), addr);
        let reply = c.read_reply();
        (reply.code == 220).then_some(c)
    })
    .unwrap_or_else(|| panic!("no 220 greeting for a connection from {from}"))
}

/// Asserts the connection is refused with `421 4.7.0` and closed.
fn assert_refused(from: &str, addr: SocketAddr) {
    let mut c = Smtp::connect_from(ip(from), addr);
    c.expect("421 4.7.0 Too many connections");
    c.expect_closed();
}

fn assert_elapsed(start: Instant, min: Duration, max: Duration) {
    let elapsed = start.elapsed();
    assert!(
        elapsed >= min && elapsed <= max,
        "took {elapsed:?}, expected between {min:?} and {max:?}"
    );
}

#[test]
fn command_timeout_closes_an_idle_session() {
    let server = Setup::new()
        .listener(Role::Mx, Tls::None)
        .smtp("command_timeout = \"1s\"")
        .start();
    let mut c = Smtp::connect(server.addr(0));
    c.ehlo();
    let start = Instant::now();
    c.expect("421 4.4.2");
    assert_elapsed(start, Duration::from_millis(900), Duration::from_secs(5));
    c.expect_closed();
}

#[test]
fn data_timeout_closes_a_stalled_transfer() {
    let server = Setup::new()
        .listener(Role::Mx, Tls::None)
        .smtp("command_timeout = \"30s\"")
        .smtp("data_timeout = \"1s\"")
        .start();
    // DATA and BDAT side by side, so the test waits only once.
    let mut data = Smtp::connect(server.addr(0));
    data.ehlo();
    data.cmd("MAIL FROM:<a@client.test>", "250");
    data.cmd(&format!("RCPT TO:<b@{LOCAL_DOMAIN}>"), "250");
    data.cmd("DATA", "354");
    data.send(b"Subject: stalled\r\n\r\nsome data but no end");

    let mut bdat = Smtp::connect(server.addr(0));
    bdat.ehlo();
    bdat.cmd("MAIL FROM:<a@client.test>", "250");
    bdat.cmd(&format!("RCPT TO:<b@{LOCAL_DOMAIN}>"), "250");
    bdat.send(b"BDAT 100 LAST\r\nonly ten b");

    let start = Instant::now();
    data.expect("421 4.4.2");
    bdat.expect("421 4.4.2");
    // The data timeout (1 s), not the command timeout (30 s).
    assert_elapsed(start, Duration::from_millis(900), Duration::from_secs(5));
    data.expect_closed();
    bdat.expect_closed();
    assert_eq!(server.store().count().expect("count"), 0);
}

#[test]
fn connections_per_ip_are_limited() {
    let server = Setup::new()
        .listener(Role::Mx, Tls::None)
        .smtp("max_connections_per_ip = 2")
        .start();
    let addr = server.addr(0);
    let mut first = connect_greeted("127.0.0.1", addr);
    let _second = connect_greeted("127.0.0.1", addr);
    assert_refused("127.0.0.1", addr);
    // Another address has its own allowance.
    let mut other = connect_greeted("127.0.0.2", addr);
    other.ehlo();
    // A session that ends frees its slot.
    first.cmd("QUIT", "221");
    first.expect_closed();
    let mut again = connect_greeted("127.0.0.1", addr);
    again.ehlo();
}

#[test]
fn total_connections_are_limited() {
    let server = Setup::new()
        .listener(Role::Mx, Tls::None)
        .smtp("max_connections = 2")
        .start();
    let addr = server.addr(0);
    let mut a = connect_greeted("127.0.0.2", addr);
    let _b = connect_greeted("127.0.0.3", addr);
    assert_refused("127.0.0.1", addr);
    assert_refused("127.0.0.4", addr);
    a.cmd("QUIT", "221");
    a.expect_closed();
    let mut c = connect_greeted("127.0.0.4", addr);
    c.ehlo();
}

#[test]
fn overlong_command_lines_are_refused() {
    let server = Setup::new()
        .listener(Role::Mx, Tls::None)
        .smtp("max_line_length = 1000")
        .start();
    let mut c = Smtp::connect(server.addr(0));
    c.ehlo();
    // In one write.
    c.send(format!("NOOP {}\r\n", "x".repeat(1500)).as_bytes());
    c.expect("500 5.5.2");
    c.cmd("NOOP", "250 2.0.0");
    // Spread over two writes, the first already too long without a line end:
    // one reply, and the tail of the line is not read as a command.
    c.send(format!("NOOP {}", "y".repeat(1200)).as_bytes());
    c.expect("500 5.5.2");
    c.send(b"yyyy QUIT\r\n");
    c.cmd("NOOP", "250 2.0.0");
    // At the limit (CRLF included) is fine.
    let line = format!("NOOP {}", "z".repeat(1000 - 7));
    assert_eq!(line.len() + 2, 1000);
    c.cmd(&line, "250 2.0.0");
    // And the session still carries mail.
    let data = message("after-long-lines", 300);
    c.send_mail("a@client.test", &[&format!("b@{LOCAL_DOMAIN}")], &data);
}

#[test]
fn oversized_messages_are_refused_and_the_session_goes_on() {
    let server = Setup::new()
        .listener(Role::Mx, Tls::None)
        .smtp("max_message_size = 1024")
        .start();
    let rcpt = format!("b@{LOCAL_DOMAIN}");
    let mut c = Smtp::connect(server.addr(0));
    assert!(c.ehlo().has_line("SIZE 1024"));

    // Declared too big: refused at MAIL.
    c.cmd("MAIL FROM:<a@client.test> SIZE=1025", "552 5.3.4");

    // Too big in fact: refused after the end of data.
    c.cmd("MAIL FROM:<a@client.test>", "250");
    c.cmd(&format!("RCPT TO:<{rcpt}>"), "250");
    c.cmd("DATA", "354");
    let big = message("too-big", 5000);
    c.send(&common::dot_stuff(&big));
    c.send(b".\r\n");
    c.expect("552 5.3.4");
    c.cmd("NOOP", "250 2.0.0");
    // The transaction is gone.
    c.cmd(&format!("RCPT TO:<{rcpt}>"), "503 5.5.1");

    // Exactly the limit is accepted; one byte more is not.
    let mut exact = message("exact", 1100);
    exact.truncate(1024 - 2);
    exact.extend_from_slice(b"\r\n");
    assert_eq!(exact.len(), 1024);
    let id = c.send_mail("a@client.test", &[&rcpt], &exact);
    assert_content(&server.message(&id), &exact, "ESMTP");

    let mut over = exact.clone();
    over.insert(0, b'X');
    c.cmd("MAIL FROM:<a@client.test>", "250");
    c.cmd(&format!("RCPT TO:<{rcpt}>"), "250");
    c.cmd("DATA", "354");
    c.send(&common::dot_stuff(&over));
    c.send(b".\r\n");
    c.expect("552 5.3.4");

    // BDAT: a chunk that would pass the limit is refused and skipped (its
    // bytes are not read as commands).
    c.cmd("MAIL FROM:<a@client.test>", "250");
    c.cmd(&format!("RCPT TO:<{rcpt}>"), "250");
    let mut wire = b"BDAT 2000 LAST\r\n".to_vec();
    wire.extend(std::iter::repeat_n(b'Q', 1994));
    wire.extend_from_slice(b"QUIT\r\n");
    c.send(&wire);
    c.expect("552 5.3.4");
    c.cmd("NOOP", "250 2.0.0");

    assert_eq!(server.store().count().expect("count"), 1);
}

#[test]
fn too_many_recipients() {
    let server = Setup::new()
        .listener(Role::Mx, Tls::None)
        .smtp("max_recipients = 2")
        .start();
    let mut c = Smtp::connect(server.addr(0));
    c.ehlo();
    c.cmd("MAIL FROM:<a@client.test>", "250");
    c.cmd(&format!("RCPT TO:<r1@{LOCAL_DOMAIN}>"), "250 2.1.5");
    c.cmd(&format!("RCPT TO:<r2@{LOCAL_DOMAIN}>"), "250 2.1.5");
    c.cmd(&format!("RCPT TO:<r3@{LOCAL_DOMAIN}>"), "452 4.5.3");
    c.cmd("DATA", "354");
    let data = message("two-of-three", 200);
    let mut wire = common::dot_stuff(&data);
    wire.extend_from_slice(b".\r\n");
    c.send(&wire);
    let id = c.expect("250 2.0.0 Ok: queued as").queued_id();
    let m = server.message(&id);
    let rcpts: Vec<&str> = m
        .envelope
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(
        rcpts,
        [format!("r1@{LOCAL_DOMAIN}"), format!("r2@{LOCAL_DOMAIN}")]
    );
    assert_content(&m, &data, "ESMTP");
}

#[test]
fn too_many_errors_close_the_session() {
    let server = Setup::new()
        .listener(Role::Mx, Tls::None)
        .smtp("max_errors = 3")
        .start();
    let mut c = Smtp::connect(server.addr(0));
    c.ehlo();
    c.cmd("BOGUS 1", "500 5.5.1");
    c.cmd("MAIL FROM:<not an address>", "501");
    c.cmd("BOGUS 3", "500 5.5.1");
    c.expect("421 4.7.0");
    c.expect_closed();
}

#[test]
fn pipelined_commands_after_starttls_are_discarded() {
    let server = Setup::new().listener(Role::Mx, Tls::Starttls).start();
    let mut c = Smtp::connect(server.addr(0));
    c.ehlo();
    c.send(b"STARTTLS\r\nNOOP\r\n");
    c.expect("220 2.0.0");
    // The NOOP must not be answered in the clear ...
    c.expect_silence(Duration::from_millis(300));
    let mut c = c.into_tls(&server);
    // ... nor later over TLS: the first reply on the TLS session is the
    // EHLO's.
    c.ehlo();
    c.cmd("NOOP", "250 2.0.0");
    let data = message("after-starttls", 300);
    let id = c.send_mail("a@client.test", &[&format!("b@{LOCAL_DOMAIN}")], &data);
    c.cmd("QUIT", "221");
    let header = assert_content(&server.message(&id), &data, "ESMTPS");
    common::assert_tls_header(&header);
}

#[test]
fn pipelined_transaction_in_one_write() {
    let server = Setup::new().listener(Role::Mx, Tls::None).start();
    let mut c = Smtp::connect(server.addr(0));
    c.ehlo();
    let data = message("pipelined", 500);
    let mut wire = format!(
        "RSET\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@{LOCAL_DOMAIN}>\r\nRCPT TO:<c@elsewhere.test>\r\nDATA\r\n"
    )
    .into_bytes();
    wire.extend_from_slice(&common::dot_stuff(&data));
    wire.extend_from_slice(b".\r\nNOOP\r\nQUIT\r\n");
    c.send(&wire);
    c.expect("250 2.0.0");
    c.expect("250 2.1.0");
    c.expect("250 2.1.5");
    c.expect("554 5.7.1");
    c.expect("354");
    let id = c.expect("250 2.0.0 Ok: queued as").queued_id();
    c.expect("250 2.0.0");
    c.expect("221 2.0.0");
    c.expect_closed();
    assert_content(&server.message(&id), &data, "ESMTP");
}

#[test]
fn silent_client_on_implicit_tls_is_dropped() {
    // The TLS handshake timeout is min(30 s, command_timeout).
    let server = Setup::new()
        .listener(Role::Mx, Tls::Implicit)
        .smtp("command_timeout = \"1s\"")
        .start();
    let mut c = Smtp::connect_raw(server.addr(0));
    let start = Instant::now();
    c.expect_closed();
    assert_elapsed(start, Duration::from_millis(900), Duration::from_secs(5));
}
