//! No acknowledged message is lost when the server is killed mid-run: 50
//! clients send continuously, the server gets `kill -9`, it restarts on the
//! same data directory, and every message that got a `250 ... queued as`
//! is in the store with its full content. The same holds for a graceful
//! stop (SIGTERM) under load.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{LOCAL_DOMAIN, Role, Setup, Smtp, Tls, assert_content, dot_stuff, queued_id};
use mailroom_core::MessageId;
use mailroom_store::Store;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

const CLIENTS: usize = 50;
const MESSAGE_SIZE: usize = 1024;
const RUN_BEFORE_KILL: Duration = Duration::from_millis(1500);

/// What the clients saw.
#[derive(Default)]
struct Tally {
    /// (id, data as sent before dot-stuffing) for every `250 queued as`.
    acked: Mutex<Vec<(String, Vec<u8>)>>,
    /// Messages whose final dot was sent but whose reply never came.
    in_flight: AtomicUsize,
}

/// Reads one reply: its code and its last line. `None` on EOF or error.
async fn reply(reader: &mut BufReader<OwnedReadHalf>) -> Option<(u16, String)> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let code: u16 = line.get(..3)?.parse().ok()?;
        if line.as_bytes().get(3) != Some(&b'-') {
            return Some((code, line.trim_end().to_owned()));
        }
    }
}

/// One ~1 KB message, unique per client and sequence number.
fn body(client: usize, seq: usize) -> Vec<u8> {
    let mut m = format!(
        "From: <load{client}@client.test>\r\nTo: <sink@{LOCAL_DOMAIN}>\r\nSubject: crash test {client}-{seq}\r\n\r\n.dot-stuffed line {client}-{seq}\r\n"
    )
    .into_bytes();
    let mut i = 0;
    while m.len() < MESSAGE_SIZE - 80 {
        m.extend_from_slice(
            format!("{client:03}-{seq:06}-{i:02} the quick brown fox jumps over the lazy dog\r\n")
                .as_bytes(),
        );
        i += 1;
    }
    m
}

/// Sends one message per transaction until an I/O error (the kill) or
/// the deadline.
async fn client(addr: SocketAddr, n: usize, tally: Arc<Tally>, deadline: Instant) {
    let Ok(stream) = TcpStream::connect(addr).await else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    if reply(&mut read).await.map(|r| r.0) != Some(220) {
        return;
    }
    if write.write_all(b"EHLO load.client.test\r\n").await.is_err()
        || reply(&mut read).await.map(|r| r.0) != Some(250)
    {
        return;
    }
    let envelope =
        format!("MAIL FROM:<load{n}@client.test>\r\nRCPT TO:<sink@{LOCAL_DOMAIN}>\r\nDATA\r\n");
    for seq in 0.. {
        if Instant::now() > deadline {
            return;
        }
        // MAIL, RCPT and DATA pipelined; the content waits for the 354.
        if write.write_all(envelope.as_bytes()).await.is_err() {
            return;
        }
        for expected in [250, 250, 354] {
            match reply(&mut read).await {
                Some((code, _)) if code == expected => {}
                // Shutting down (the graceful variant): stop here.
                Some((421, _)) => return,
                Some((_, text)) => panic!("client {n}: unexpected reply {text:?}"),
                None => return,
            }
        }
        let data = body(n, seq);
        let mut wire = dot_stuff(&data);
        wire.extend_from_slice(b".\r\n");
        if write.write_all(&wire).await.is_err() {
            return;
        }
        match reply(&mut read).await {
            Some((250, text)) => {
                let id = queued_id(&text);
                tally.acked.lock().unwrap().push((id, data));
            }
            Some((421, _)) => {
                tally.in_flight.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Some((_, text)) => panic!("client {n}: message refused: {text:?}"),
            None => {
                tally.in_flight.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

#[test]
fn no_acknowledged_message_is_lost_on_kill9() {
    let mut server = Setup::new().listener(Role::Mx, Tls::None).start();
    let addr = server.addr(0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + Duration::from_secs(15);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|n| runtime.spawn(client(addr, n, tally.clone(), deadline)))
        .collect();

    std::thread::sleep(RUN_BEFORE_KILL);
    server.kill9();
    runtime.block_on(async {
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("a client did not notice the kill")
                .expect("client task panicked");
        }
    });
    let acked = std::mem::take(&mut *tally.acked.lock().unwrap());

    // The server must come back cleanly on the same data.
    server.restart();
    let store = server.store();
    let mut lost = Vec::new();
    for (id, data) in &acked {
        let message_id: MessageId = id.parse().expect("message id");
        match store.get(&message_id).expect("read the store") {
            Some(m) => {
                assert_content(&m, data, "ESMTP");
            }
            None => lost.push(id.clone()),
        }
    }
    let stored = store.count().expect("count");
    println!(
        "acknowledged: {}, found: {}, lost: {}, in flight at the kill: {}, stored in total: {stored}",
        acked.len(),
        acked.len() - lost.len(),
        lost.len(),
        tally.in_flight.load(Ordering::Relaxed),
    );
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    assert!(
        acked.len() > 500,
        "only {} messages acknowledged before the kill; the test proves little",
        acked.len()
    );
    assert!(stored >= acked.len() as u64);

    // And it takes mail again.
    let mut c = Smtp::connect(addr);
    c.ehlo();
    let data = common::message("after-restart", 500);
    let id = c.send_mail("a@client.test", &[&format!("b@{LOCAL_DOMAIN}")], &data);
    c.cmd("QUIT", "221");
    assert_content(&server.message(&id), &data, "ESMTP");
    server.stop_ok();
}

#[test]
fn sigterm_under_load_loses_nothing_and_exits_0() {
    let mut server = Setup::new()
        .listener(Role::Mx, Tls::None)
        .shutdown_timeout("10s")
        .start();
    let addr = server.addr(0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + Duration::from_secs(15);
    let tasks: Vec<_> = (0..20)
        .map(|n| runtime.spawn(client(addr, n, tally.clone(), deadline)))
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let signalled = Instant::now();
    server.sigterm();
    runtime.block_on(async {
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("a client was not stopped by the shutdown")
                .expect("client task panicked");
        }
    });
    let status = server
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("no exit after SIGTERM\n{}", server.log()));
    assert!(status.success(), "exit status {status}\n{}", server.log());
    assert!(
        signalled.elapsed() < Duration::from_secs(8),
        "open transactions should finish long before the 10 s grace period"
    );
    let acked = std::mem::take(&mut *tally.acked.lock().unwrap());
    let store = server.store();
    let mut lost = 0;
    for (id, data) in &acked {
        let message_id: MessageId = id.parse().expect("message id");
        match store.get(&message_id).expect("read the store") {
            Some(m) => {
                assert_content(&m, data, "ESMTP");
            }
            None => lost += 1,
        }
    }
    println!(
        "graceful: acknowledged: {}, lost: {lost}, stored in total: {}",
        acked.len(),
        store.count().expect("count")
    );
    assert_eq!(lost, 0);
    assert!(acked.len() > 100, "only {} acknowledged", acked.len());
}
