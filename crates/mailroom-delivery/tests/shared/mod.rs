//! Helpers the delivery test binaries share: addresses, client time
//! limits, reading past the trace header a receiving server added, and
//! asking Python's `email` package what it sees in a message.
#![allow(dead_code)]

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use mailroom_core::Address;
use mailroom_delivery::connection::Timeouts;

pub fn addr(text: &str) -> Address {
    Address::parse(text).unwrap()
}

/// Every client step with the same limit.
pub fn timeouts(limit: Duration) -> Timeouts {
    Timeouts {
        connect: limit,
        greeting: limit,
        ehlo: limit,
        mail: limit,
        rcpt: limit,
        data_init: limit,
        data_block: limit,
        data_done: limit,
        rset: limit,
        quit: limit,
    }
}

/// The content after the one `Received:` header (with its folded lines)
/// that the receiving server put on top.
pub fn after_received(content: &[u8]) -> &[u8] {
    assert!(
        content.starts_with(b"Received: "),
        "no Received header first"
    );
    let mut pos = 0;
    loop {
        let end = content[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|i| pos + i + 2)
            .expect("header line ends");
        pos = end;
        if !matches!(content.get(pos), Some(b' ' | b'\t')) {
            return &content[pos..];
        }
    }
}

/// Runs a Python `script` with `input` on its standard input and parses
/// the JSON it prints: how an independent MIME parser sees a message.
pub fn python_json(script: &str, input: &[u8]) -> serde_json::Value {
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 on PATH");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input)
        .expect("write to python3");
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "python3 failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(input)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}
