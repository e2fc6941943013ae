//! Enqueue throughput: N concurrent producers each enqueue 1 KiB messages
//! and wait for each commit, like SMTP sessions waiting to send `250`.
//!
//! ```text
//! cargo run --release -p mailroom-store --example enqueue_bench -- [producers] [per_producer] [dir]
//! ```
//!
//! `dir` defaults to a temporary directory; pass one on the disk you care
//! about, since fsync latency is what group commit amortises.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Instant;

use mailroom_core::{
    Address, BodyType, Envelope, MessageId, NewMessage, Notify, Origin, Recipient,
};
use mailroom_store::{SqliteOptions, SqliteStore, Store};

fn message(content: &[u8]) -> NewMessage {
    NewMessage {
        id: MessageId::new(),
        received_at: 1_700_000_000_000,
        envelope: Envelope {
            reverse_path: Address::parse("sender@example.test").ok(),
            recipients: Address::parse("rcpt@example.test")
                .into_iter()
                .map(|address| Recipient {
                    address,
                    orcpt: None,
                    notify: Notify::empty(),
                })
                .collect(),
            env_id: None,
            ret: None,
            body_type: BodyType::SevenBit,
            smtputf8: false,
            priority: 0,
        },
        origin: Origin {
            protocol: "smtp".into(),
            remote_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            helo: Some("bench.test".into()),
            auth_user: None,
            tls: None,
        },
        content: content.to_vec(),
        kept_locally: Vec::new(),
        meta: Default::default(),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let producers: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(50);
    let per_producer: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let tmp;
    let dir = match args.next() {
        Some(dir) => PathBuf::from(dir),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    let path = dir.join(format!("enqueue-bench-{}.db", std::process::id()));

    // Two workers: the target machine has two cores, shared with the writer thread.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let store = SqliteStore::open(&path, SqliteOptions::default())?;
        let content: Vec<u8> = b"Subject: bench\r\n\r\n"
            .iter()
            .copied()
            .chain(std::iter::repeat_n(b'x', 1024 - 20))
            .chain(*b"\r\n")
            .collect();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..producers {
            let store = store.clone();
            let content = content.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..per_producer {
                    store.enqueue(message(&content)).await?;
                }
                Ok::<_, mailroom_store::StoreError>(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        let elapsed = start.elapsed();
        store.close().await;
        let total = producers * per_producer;
        assert_eq!(store.count()?, total as u64);
        println!(
            "{total} messages of {} bytes, {producers} producers: {:.2} s, {:.0} enqueues/s",
            content.len(),
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64()
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    });
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    result
}
