//! Fuzzing the session state machine: arbitrary bytes, in arbitrary
//! pieces, with arbitrary answers to its events, must never make it panic,
//! and every byte it writes must be a well-formed reply.
//!
//! The default run is a quick proptest pass. For a long run:
//! `FUZZ_SECONDS=600 cargo test --release -p mailroom-smtp --test fuzz_session -- --ignored --nocapture`

use std::sync::Arc;
use std::time::{Duration, Instant};

use mailroom_core::config::{Role, TlsMode};
use mailroom_core::{MessageId, Receipt};
use mailroom_smtp::{Event, Session, SessionConfig, TlsInfo};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};

fn config(role: Role, tls_mode: TlsMode, insecure: bool) -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: "mx.test".into(),
        role,
        tls_mode,
        local_domains: vec!["example.test".into()],
        max_message_size: 2048,
        max_recipients: 5,
        max_line_length: 512,
        max_errors: 50,
        allow_insecure_auth: insecure,
        relay_networks: Vec::new(),
        policy: None,
    })
}

/// Pieces that steer the session into its deeper states; mixed with noise.
const FRAGMENTS: &[&[u8]] = &[
    b"EHLO a.test\r\n",
    b"HELO a.test\r\n",
    b"MAIL FROM:<a@b.test>\r\n",
    b"MAIL FROM:<> SMTPUTF8 BODY=8BITMIME SIZE=100 RET=FULL ENVID=x\r\n",
    b"MAIL FROM:<j\xc3\xb6rg@b.test> SMTPUTF8\r\n",
    b"RCPT TO:<u@example.test>\r\n",
    b"RCPT TO:<u@other.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u@x\r\n",
    b"RCPT TO:<Postmaster>\r\n",
    b"DATA\r\n",
    b"BDAT 10\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT 4294967296 LAST\r\n",
    b"\r\n.\r\n",
    b".\r\n",
    b"..\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH PLAIN AGFwcABzM2NyZXQ=\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH CRAM-MD5\r\n",
    b"dXNlciBiOTEzYTYwMmM3ZWRhN2E0OTViNGU2ZTczMzRkMzg5MA==\r\n",
    b"YXBw\r\n",
    b"*\r\n",
    b"STARTTLS\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b"\0",
    b"\xff\xfe",
];

#[derive(Debug, Clone)]
struct Case {
    role: Role,
    tls_mode: TlsMode,
    insecure: bool,
    /// A capture-mode session (AUTH recorded, receipts may close).
    capture: bool,
    input: Vec<u8>,
    /// Where the input is split into separate `feed` calls.
    splits: Vec<usize>,
    /// Answers to events, consumed in order (cycled).
    answers: Vec<bool>,
}

fn case() -> impl Strategy<Value = Case> {
    let piece = prop_oneof![
        3 => proptest::sample::select(FRAGMENTS).prop_map(|f| f.to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => (0usize..3000).prop_map(|n| vec![b'x'; n]),
    ];
    (
        prop_oneof![Just(Role::Mx), Just(Role::Submission)],
        prop_oneof![
            Just(TlsMode::None),
            Just(TlsMode::Starttls),
            Just(TlsMode::Implicit)
        ],
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(piece, 0..40),
        proptest::collection::vec(0usize..4096, 0..16),
        proptest::collection::vec(any::<bool>(), 1..8),
    )
        .prop_map(
            |(role, tls_mode, insecure, capture, pieces, splits, answers)| Case {
                role,
                tls_mode,
                insecure,
                capture,
                input: pieces.concat(),
                splits,
                answers,
            },
        )
}

fn tls() -> TlsInfo {
    TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
    }
}

fn run(case: &Case) -> Result<(), TestCaseError> {
    let initial_tls = (case.tls_mode == TlsMode::Implicit).then(tls);
    let config = config(case.role, case.tls_mode, case.insecure);
    let ip = "192.0.2.1".parse().unwrap();
    let mut session = if case.capture {
        Session::new_capture(config, ip, initial_tls)
    } else {
        Session::new(config, ip, initial_tls)
    };
    let mut output = session.output().to_vec();
    session.clear_output();
    let mut answers = case.answers.iter().cycle();

    let mut bounds: Vec<usize> = case
        .splits
        .iter()
        .map(|&s| s.min(case.input.len()))
        .collect();
    bounds.push(case.input.len());
    bounds.sort_unstable();
    let mut start = 0;
    'pieces: for end in bounds {
        let piece = &case.input[start..end.max(start)];
        start = end.max(start);
        let mut pos = 0;
        while pos < piece.len() {
            let (used, event) = session.feed(&piece[pos..]);
            prop_assert!(used <= piece.len() - pos);
            pos += used;
            match event {
                None if used == 0 => break 'pieces,
                None => {}
                Some(Event::Authenticate { .. }) => {
                    prop_assert!(!case.capture, "capture mode never asks to check AUTH");
                    session.auth_result(*answers.next().unwrap_or(&true))
                }
                Some(Event::Submit(message)) => {
                    prop_assert!(!message.envelope.recipients.is_empty());
                    prop_assert!(message.content.starts_with(b"Received: "));
                    let ok = *answers.next().unwrap_or(&true);
                    if case.capture {
                        // Capture mode: a worker may close the session.
                        let close = *answers.next().unwrap_or(&false);
                        let receipt = if close {
                            Receipt::Close
                        } else {
                            Receipt::Continue
                        };
                        session.accepted(message.id, receipt);
                        if session.is_closed() {
                            output.extend_from_slice(session.output());
                            session.clear_output();
                            break 'pieces;
                        }
                    } else {
                        session.queued(message.id, if ok { Ok(()) } else { Err(()) });
                    }
                }
                Some(Event::StartTls) => {
                    pos = piece.len();
                    session.tls_started(tls());
                }
                Some(Event::Close) => break 'pieces,
            }
        }
        output.extend_from_slice(session.output());
        session.clear_output();
    }
    session.timeout();
    output.extend_from_slice(session.output());
    session.queued(MessageId::new(), Ok(()));
    session.auth_result(true);
    check_replies(&output)
}

/// Every line is `DDD` then space or dash, and ends in CRLF.
fn check_replies(output: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(output.ends_with(b"\r\n"), "output ends mid-line");
    for line in output.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        prop_assert!(
            line.ends_with(b"\r"),
            "bare LF in {:?}",
            String::from_utf8_lossy(line)
        );
        prop_assert!(
            line.len() >= 5,
            "short line {:?}",
            String::from_utf8_lossy(line)
        );
        prop_assert!(line[..3].iter().all(u8::is_ascii_digit));
        prop_assert!(line[3] == b' ' || line[3] == b'-');
        let code = &line[..1];
        prop_assert!(matches!(code, b"2" | b"3" | b"4" | b"5"));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn session_never_panics(case in case()) {
        run(&case)?;
    }
}

#[test]
#[ignore = "long fuzz run; set FUZZ_SECONDS"]
fn fuzz_for_a_while() {
    let seconds: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut rounds = 0u64;
    while Instant::now() < deadline {
        let mut runner = TestRunner::new(RunnerConfig {
            cases: 2000,
            failure_persistence: None,
            ..RunnerConfig::default()
        });
        if let Err(err) = runner.run(&case(), |c| run(&c)) {
            panic!("fuzz failure after {rounds} rounds: {err}");
        }
        rounds += 1;
    }
    println!(
        "fuzzed {} cases in {seconds} s without a panic",
        rounds * 2000
    );
}
