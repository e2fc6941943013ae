//! The SQLite store against real files: round trips, group commit under
//! concurrency, listing, shutdown, migrations and damaged rows.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use mailroom_core::{
    Address, BodyType, Envelope, Intake, IntakeError, MessageId, NewMessage, Notify, Origin,
    Recipient, Ret,
};
use mailroom_store::{
    Attempt, ListQuery, RecipientState, RecipientUpdate, SqliteOptions, SqliteStore, Store,
    StoreError,
};

fn db(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("mailroom.db")
}

fn open(path: &Path) -> SqliteStore {
    SqliteStore::open(path, SqliteOptions::default()).unwrap()
}

fn recipient(address: &str) -> Recipient {
    Recipient {
        address: Address::parse(address).unwrap(),
        orcpt: None,
        notify: Notify::empty(),
    }
}

fn message(recipients: &[&str]) -> NewMessage {
    NewMessage {
        id: MessageId::new(),
        received_at: 1_700_000_000_123,
        envelope: Envelope {
            reverse_path: Some(Address::parse("sender@example.test").unwrap()),
            recipients: recipients.iter().map(|r| recipient(r)).collect(),
            env_id: None,
            ret: None,
            body_type: BodyType::SevenBit,
            smtputf8: false,
            priority: 0,
        },
        origin: Origin {
            protocol: "smtp".into(),
            remote_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            helo: Some("client.test".into()),
            auth_user: None,
            tls: None,
        },
        content: b"Subject: hi\r\n\r\nhello\r\n".to_vec(),
        kept_locally: Vec::new(),
        meta: Default::default(),
    }
}

/// Sets a recipient's state behind the store's back, as the delivery side
/// will once it exists.
fn set_state(path: &Path, id: &MessageId, idx: i64, state: &str) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    let n = conn
        .execute(
            "UPDATE recipients SET state = ?1 WHERE message_id = ?2 AND idx = ?3",
            rusqlite::params![state, id.to_string(), idx],
        )
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn enqueue_then_get_round_trips_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db(&dir));
    let mut m = message(&["a@example.test", "jörg@example.test"]);
    m.envelope.recipients[0].orcpt = Some("rfc822;a@example.test".into());
    m.envelope.recipients[0].notify = Notify::SUCCESS.with(Notify::DELAY);
    m.envelope.recipients[1].notify = Notify::NEVER;
    m.envelope.env_id = Some("ENV+2B1".into());
    m.envelope.ret = Some(Ret::Hdrs);
    m.envelope.body_type = BodyType::BinaryMime;
    m.envelope.smtputf8 = true;
    m.envelope.priority = -9;
    m.origin.auth_user = Some("alice".into());
    m.origin.tls = Some("TLSv1.3 TLS13_AES_256_GCM_SHA384".into());
    // Not UTF-8, with NULs and bare CR/LF: content is bytes, not text.
    m.content = (0..=255u8).cycle().take(5000).collect();
    store.enqueue(m.clone()).await.unwrap();

    let got = store.get(&m.id).unwrap().unwrap();
    assert_eq!(got.id, m.id);
    assert_eq!(got.received_at, m.received_at);
    assert_eq!(got.envelope, m.envelope);
    assert_eq!(got.origin, m.origin);
    assert_eq!(got.content, m.content);
    assert_eq!(got.size, 5000);
    assert_eq!(got.recipients.len(), 2);
    for (stored, sent) in got.recipients.iter().zip(&m.envelope.recipients) {
        assert_eq!(&stored.recipient, sent);
        assert_eq!(stored.state, RecipientState::Queued);
        assert_eq!(stored.attempts, 0);
        assert_eq!(stored.next_attempt_at, Some(m.received_at));
        assert_eq!(stored.last_reply, None);
    }
    assert!(store.get(&MessageId::new()).unwrap().is_none());
    store.close().await;
}

#[tokio::test]
async fn null_reverse_path_round_trips_as_none() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db(&dir));
    let mut m = message(&["postmaster@example.test"]);
    m.envelope.reverse_path = None;
    store.enqueue(m.clone()).await.unwrap();
    let got = store.get(&m.id).unwrap().unwrap();
    assert_eq!(got.envelope.reverse_path, None);
    let listed = store.list(&ListQuery::default()).unwrap();
    assert_eq!(listed[0].reverse_path, None);
    store.close().await;
}

fn page_size(path: &Path) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .pragma_query_value(None, "page_size", |row| row.get(0))
        .unwrap()
}

#[tokio::test]
async fn a_new_database_has_16_kib_pages_and_an_older_one_keeps_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let store = open(&path);
    store.close().await;
    drop(store);
    assert_eq!(page_size(&path), 16 * 1024);

    // A database created by an earlier build, with SQLite's 4 KiB pages.
    let older = dir.path().join("older.db");
    {
        let conn = rusqlite::Connection::open(&older).unwrap();
        conn.pragma_update(None, "page_size", 4096).unwrap();
        conn.pragma_update_and_check(None, "journal_mode", "wal", |_| Ok(()))
            .unwrap();
        conn.execute_batch("CREATE TABLE before_mailroom (x)")
            .unwrap();
    }
    let store = open(&older);
    let m = message(&["a@example.test"]);
    store.enqueue(m.clone()).await.unwrap();
    store.close().await;
    drop(store);
    assert_eq!(page_size(&older), 4096);
    let store = open(&older);
    assert_eq!(store.get(&m.id).unwrap().unwrap().content, m.content);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_is_folded_back_and_starts_over_while_commits_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let store = SqliteStore::open(
        &path,
        SqliteOptions {
            checkpoint_bytes: 256 * 1024,
            ..SqliteOptions::default()
        },
    )
    .unwrap();
    // 8 producers without pause: the checkpoint thread must copy while the
    // writer keeps committing, and the WAL must still start over.
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..150 {
                let mut m = message(&["a@example.test"]);
                m.content = format!("task {t} message {i}\r\n{}", "x".repeat(8000)).into_bytes();
                store.enqueue(m).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // 1,200 messages of 8 KB: about 10 MB of WAL frames had it never
    // started over.
    let wal = std::fs::metadata(dir.path().join("mailroom.db-wal"))
        .unwrap()
        .len();
    assert!(wal < 4 * 1024 * 1024, "the WAL grew to {wal} bytes");
    assert_eq!(store.count().unwrap(), 1200);
    store.close().await;
    drop(store);
    assert_eq!(open(&path).count().unwrap(), 1200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueues_all_survive_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    // A small batch limit and queue make batching and backpressure both happen.
    let store = SqliteStore::open(
        &path,
        SqliteOptions {
            max_batch: 16,
            queue_depth: 8,
            ..SqliteOptions::default()
        },
    )
    .unwrap();
    let mut tasks = Vec::new();
    for t in 0..50 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..40 {
                let mut m = message(&["a@example.test"]);
                m.content = format!("task {t} message {i}\r\n").into_bytes();
                ids.push((m.id, m.content.clone()));
                store.enqueue(m).await.unwrap();
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    store.close().await;
    assert_eq!(store.count().unwrap(), 2000);
    drop(store);

    let store = open(&path);
    assert_eq!(store.count().unwrap(), 2000);
    for (id, content) in &all {
        assert_eq!(&store.get(id).unwrap().unwrap().content, content);
    }
    store.close().await;
}

#[tokio::test]
async fn dropping_the_last_handle_keeps_what_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let store = open(&path);
    for _ in 0..10 {
        store.enqueue(message(&["a@example.test"])).await.unwrap();
    }
    drop(store);
    let store = open(&path);
    assert_eq!(store.count().unwrap(), 10);
    store.close().await;
}

#[tokio::test]
async fn list_filters_limits_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let store = open(&path);
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut m = message(&["a@example.test", "b@example.test"]);
        m.received_at += i;
        m.content = vec![b'x'; 10 + i as usize];
        ids.push(m.id);
        store.enqueue(m).await.unwrap();
    }
    assert_eq!(store.count().unwrap(), 5);

    let all = store.list(&ListQuery::default()).unwrap();
    let listed: Vec<_> = all.iter().map(|s| s.id).collect();
    let newest_first: Vec<_> = ids.iter().rev().copied().collect();
    assert_eq!(listed, newest_first);
    assert_eq!(all[0].recipients, 2);
    assert_eq!(all[0].size, 14);
    assert_eq!(all[0].received_at, 1_700_000_000_127);
    assert_eq!(all[0].reverse_path.as_deref(), Some("sender@example.test"));
    assert!(all.iter().all(|s| s.state == RecipientState::Queued));

    // Pages of two, following the cursor.
    let page = |before| {
        store
            .list(&ListQuery {
                state: None,
                limit: 2,
                before,
                ..ListQuery::default()
            })
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(page(None), vec![ids[4], ids[3]]);
    assert_eq!(page(Some(ids[3])), vec![ids[2], ids[1]]);
    assert_eq!(page(Some(ids[1])), vec![ids[0]]);
    assert_eq!(page(Some(ids[0])), vec![]);

    // Summary state is the least advanced recipient's.
    set_state(&path, &ids[0], 0, "delivered");
    set_state(&path, &ids[0], 1, "delivered");
    set_state(&path, &ids[1], 0, "delivered");
    set_state(&path, &ids[1], 1, "failed");
    set_state(&path, &ids[2], 0, "delivered");
    set_state(&path, &ids[2], 1, "deferred");
    set_state(&path, &ids[3], 0, "held");
    let by_state = |state| {
        store
            .list(&ListQuery {
                state: Some(state),
                limit: 10,
                before: None,
                ..ListQuery::default()
            })
            .unwrap()
            .iter()
            .map(|s| (s.id, s.state))
            .collect::<Vec<_>>()
    };
    use RecipientState::*;
    assert_eq!(by_state(Delivered), vec![(ids[0], Delivered)]);
    assert_eq!(by_state(Failed), vec![(ids[1], Failed)]);
    assert_eq!(by_state(Deferred), vec![(ids[2], Deferred)]);
    assert_eq!(by_state(Queued), vec![(ids[4], Queued), (ids[3], Queued)]);
    assert_eq!(by_state(Held), vec![]);

    let filtered_page = store
        .list(&ListQuery {
            state: Some(Queued),
            limit: 1,
            before: Some(ids[4]),
            ..ListQuery::default()
        })
        .unwrap();
    assert_eq!(filtered_page.len(), 1);
    assert_eq!(filtered_page[0].id, ids[3]);
    assert!(
        store
            .list(&ListQuery {
                limit: 0,
                ..ListQuery::default()
            })
            .unwrap()
            .is_empty()
    );
    store.close().await;
}

#[tokio::test]
async fn close_refuses_new_mail_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db(&dir));
    let other = store.clone();
    store.enqueue(message(&["a@example.test"])).await.unwrap();
    store.close().await;
    other.close().await;
    store.close().await;
    assert!(matches!(
        other.enqueue(message(&["a@example.test"])).await,
        Err(StoreError::ShuttingDown)
    ));
    assert!(matches!(
        store.submit(message(&["a@example.test"])).await,
        Err(IntakeError::ShuttingDown)
    ));
    // Reads still work after close.
    assert_eq!(store.count().unwrap(), 1);
}

#[tokio::test]
async fn enqueues_racing_close_are_either_stored_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let store = open(&path);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let m = message(&["a@example.test"]);
            let id = m.id;
            (id, store.enqueue(m).await)
        }));
    }
    store.close().await;
    let mut accepted = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (id, Ok(())) => accepted.push(id),
            (_, Err(StoreError::ShuttingDown)) => {}
            (_, Err(e)) => panic!("unexpected error {e}"),
        }
    }
    drop(store);
    let store = open(&path);
    assert_eq!(store.count().unwrap(), accepted.len() as u64);
    for id in accepted {
        assert!(store.get(&id).unwrap().is_some());
    }
    store.close().await;
}

#[tokio::test]
async fn opening_twice_does_not_migrate_twice() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let store = open(&path);
    let m = message(&["a@example.test"]);
    store.enqueue(m.clone()).await.unwrap();
    store.close().await;
    drop(store);
    let store = open(&path);
    assert!(store.get(&m.id).unwrap().is_some());
    store.close().await;
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 6);
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn refuses_a_database_from_a_newer_build() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    match SqliteStore::open(&path, SqliteOptions::default()) {
        Err(e @ StoreError::SchemaTooNew { found: 99, .. }) => {
            assert!(e.to_string().contains("newer than this build"), "{e}");
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

#[tokio::test]
async fn duplicate_id_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db(&dir));
    let first = message(&["a@example.test"]);
    store.enqueue(first.clone()).await.unwrap();

    let mut again = first.clone();
    again.content = b"other content".to_vec();
    let others: Vec<_> = (0..20).map(|_| message(&["b@example.test"])).collect();
    let mut tasks = Vec::new();
    for m in others.iter().cloned().chain([again]) {
        let store = store.clone();
        tasks.push(tokio::spawn(async move { store.enqueue(m).await }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    let (dup, rest) = results.split_last().unwrap();
    assert!(matches!(dup, Err(StoreError::DuplicateId(id)) if *id == first.id));
    assert!(rest.iter().all(Result::is_ok));
    assert_eq!(
        store.get(&first.id).unwrap().unwrap().content,
        first.content
    );
    assert_eq!(store.count().unwrap(), 21);
    store.close().await;
}

#[tokio::test]
async fn rejects_a_message_without_recipients() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db(&dir));
    assert!(matches!(
        store.enqueue(message(&[])).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(store.count().unwrap(), 0);
    store.close().await;
}

#[tokio::test]
async fn a_damaged_row_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let store = open(&path);
    let m = message(&["a@example.test"]);
    store.enqueue(m.clone()).await.unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("UPDATE messages SET body_type = 'bogus'", [])
        .unwrap();
    assert!(matches!(store.get(&m.id), Err(StoreError::Corrupt(_))));
    conn.execute(
        "UPDATE messages SET body_type = '7bit', origin = 'not json'",
        [],
    )
    .unwrap();
    assert!(matches!(store.get(&m.id), Err(StoreError::Corrupt(_))));
    conn.execute("UPDATE messages SET origin = 42", []).unwrap();
    assert!(matches!(store.get(&m.id), Err(StoreError::Corrupt(_))));
    set_state(&path, &m.id, 0, "lost");
    assert!(matches!(
        store.list(&ListQuery::default()),
        Err(StoreError::Corrupt(_))
    ));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_round_trip_across_batches() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db(&dir));
    // Together over the 32 MiB batch bound, so they cannot share one commit.
    let messages: Vec<_> = (0..3u8)
        .map(|i| {
            let mut m = message(&["a@example.test"]);
            m.content = vec![b'a' + i; 12 * 1024 * 1024];
            m
        })
        .collect();
    let tasks: Vec<_> = messages
        .iter()
        .cloned()
        .map(|m| {
            let store = store.clone();
            tokio::spawn(async move { store.enqueue(m).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    for m in &messages {
        let got = store.get(&m.id).unwrap().unwrap();
        assert_eq!(got.size, m.content.len() as u64);
        assert!(got.content == m.content);
    }
    store.close().await;
}

#[tokio::test]
async fn delivery_updates_attempts_pending_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db(&dir));
    let m = message(&["a@Example.TEST", "b@other.test"]);
    store.enqueue(m.clone()).await.unwrap();

    let pending = store.pending().unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(pending[0].domain, "example.test");
    assert_eq!(pending[0].next_attempt_at, m.received_at);
    assert!(pending.iter().all(|p| p.state == RecipientState::Queued));

    let attempt = |code, reply: &str| Attempt {
        at: 1_000,
        mx_host: Some("mx.example.test".into()),
        ip: Some("127.0.0.2".into()),
        tls: None,
        code: Some(code),
        reply: reply.into(),
        duration_ms: 12,
    };
    let rows = store
        .update(vec![
            RecipientUpdate {
                message_id: m.id,
                idx: 0,
                state: RecipientState::Delivered,
                next_attempt_at: None,
                last_reply: Some("250 2.0.0 ok".into()),
                attempt: Some(attempt(250, "250 2.0.0 ok")),
            },
            RecipientUpdate {
                message_id: m.id,
                idx: 1,
                state: RecipientState::Deferred,
                next_attempt_at: Some(61_000),
                last_reply: Some("451 4.3.0 later".into()),
                attempt: Some(attempt(451, "451 4.3.0 later")),
            },
        ])
        .await
        .unwrap();
    assert_eq!(rows, 2);

    let pending = store.pending().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].idx, 1);
    assert_eq!(pending[0].state, RecipientState::Deferred);
    assert_eq!(pending[0].next_attempt_at, 61_000);

    let stored = store.get(&m.id).unwrap().unwrap();
    assert_eq!(stored.recipients[0].state, RecipientState::Delivered);
    assert_eq!(stored.recipients[0].attempts, 1);
    assert_eq!(
        stored.recipients[1].last_reply.as_deref(),
        Some("451 4.3.0 later")
    );
    let attempts = store.attempts(&m.id).unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[1].outcome, RecipientState::Deferred);
    assert_eq!(attempts[1].attempt.code, Some(451));

    // An update for a message that does not exist touches nothing.
    let rows = store
        .update(vec![RecipientUpdate {
            message_id: MessageId::new(),
            idx: 0,
            state: RecipientState::Held,
            next_attempt_at: None,
            last_reply: None,
            attempt: None,
        }])
        .await
        .unwrap();
    assert_eq!(rows, 0);

    assert!(store.delete(m.id).await.unwrap());
    assert!(!store.delete(m.id).await.unwrap());
    assert!(store.get(&m.id).unwrap().is_none());
    assert!(store.attempts(&m.id).unwrap().is_empty());
    assert!(store.pending().unwrap().is_empty());
    store.close().await;
}

#[tokio::test]
async fn recipients_kept_locally_are_delivered_on_arrival() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db(&dir));
    let mut m = message(&["local@example.test", "remote@other.test"]);
    m.kept_locally = vec![0];
    store.enqueue(m.clone()).await.unwrap();
    let stored = store.get(&m.id).unwrap().unwrap();
    assert_eq!(stored.recipients[0].state, RecipientState::Delivered);
    assert_eq!(stored.recipients[0].next_attempt_at, None);
    assert!(
        stored.recipients[0]
            .last_reply
            .as_deref()
            .unwrap()
            .contains("local mailbox")
    );
    assert_eq!(stored.recipients[1].state, RecipientState::Queued);
    let pending = store.pending().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].idx, 1);
    store.close().await;
}

#[tokio::test]
async fn tenant_meta_round_trips_and_idempotency_keys_are_claimed_once() {
    use mailroom_core::{IdempotencyRecord, MessageMeta};
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db(&dir));
    let record = |hash: &str| IdempotencyRecord {
        scope: "acct".into(),
        key: "k1".into(),
        request_hash: hash.into(),
        status: 202,
        response: "{}".into(),
    };
    let mut first = message(&["a@example.test"]);
    first.meta = MessageMeta {
        account: Some("acct".into()),
        tags: vec!["welcome".into()],
        metadata: [("user".to_owned(), "42".to_owned())].into(),
        not_before: Some(first.received_at + 60_000),
        idempotency: Some(record("h1")),
        routes: [(0, "provider-1".to_owned())].into(),
    };
    let mut second = message(&["b@example.test"]);
    second.meta.idempotency = Some(record("h2"));
    // Both in flight at once: one commit, one key, one winner.
    let (a, b) = tokio::join!(store.enqueue(first.clone()), store.enqueue(second.clone()));
    a.unwrap();
    assert!(matches!(b, Err(StoreError::IdempotencyKeyTaken)), "{b:?}");
    assert!(store.get(&second.id).unwrap().is_none());

    let got = store.get(&first.id).unwrap().unwrap();
    assert_eq!(got.meta.account.as_deref(), Some("acct"));
    assert_eq!(got.meta.tags, ["welcome"]);
    assert_eq!(got.meta.metadata["user"], "42");
    assert_eq!(got.recipients[0].next_attempt_at, first.meta.not_before);
    assert_eq!(got.recipients[0].route.as_deref(), Some("provider-1"));
    let pending = store.pending().unwrap();
    assert_eq!(pending[0].route.as_deref(), Some("provider-1"));
    let hit = store.idempotency("acct", "k1").unwrap().unwrap();
    assert_eq!(hit.request_hash, "h1");
    assert!(store.idempotency("other", "k1").unwrap().is_none());
    let listed = store
        .list(&ListQuery {
            account: Some("acct".into()),
            tag: Some("welcome".into()),
            ..ListQuery::default()
        })
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(store.expire_idempotency_keys(i64::MAX).await.unwrap(), 1);
    assert!(store.idempotency("acct", "k1").unwrap().is_none());
}
