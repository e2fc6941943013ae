//! The SQLite schema as an ordered list of migrations, tracked with
//! `PRAGMA user_version`.
//!
//! Migration `i` takes the database from version `i` to `i + 1`. Entries are
//! only ever appended: an applied migration is never edited, because
//! databases in the field already ran it.

use rusqlite::{Connection, TransactionBehavior};

use crate::StoreError;

const MIGRATIONS: &[&str] = &[
    // 1: messages and per-recipient delivery state.
    //
    // The content sits in `messages`, once per message, as the last column so
    // that listing reads the small columns without touching overflow pages.
    // `messages` keeps its rowid: WITHOUT ROWID tables store rows inside the
    // index b-tree and do badly with kilobyte-sized blobs. `recipients` rows
    // are small and always read by message, so clustering them on
    // (message_id, idx) saves the separate primary-key index. There is no
    // index on (state, next_attempt_at): on this backend the scheduler keeps
    // what is due in memory (loaded by one scan at start), and every index
    // is one more b-tree written by each commit on the intake path.
    r#"
    CREATE TABLE messages (
        id           TEXT    PRIMARY KEY NOT NULL,
        received_at  INTEGER NOT NULL,
        reverse_path TEXT,
        env_id       TEXT,
        ret          TEXT,
        body_type    TEXT    NOT NULL,
        smtputf8     INTEGER NOT NULL,
        priority     INTEGER NOT NULL,
        origin       TEXT    NOT NULL,
        size         INTEGER NOT NULL,
        content      BLOB    NOT NULL
    );

    CREATE TABLE recipients (
        message_id      TEXT    NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        idx             INTEGER NOT NULL,
        address         TEXT    NOT NULL,
        orcpt           TEXT,
        notify          INTEGER NOT NULL,
        state           TEXT    NOT NULL DEFAULT 'queued',
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER,
        last_reply      TEXT,
        PRIMARY KEY (message_id, idx)
    ) WITHOUT ROWID;
    "#,
    // 2: every delivery attempt, for operators and bounces.
    r#"
    CREATE TABLE attempts (
        message_id  TEXT    NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        idx         INTEGER NOT NULL,
        at          INTEGER NOT NULL,
        outcome     TEXT    NOT NULL,
        mx_host     TEXT,
        ip          TEXT,
        tls         TEXT,
        code        INTEGER,
        reply       TEXT    NOT NULL,
        duration_ms INTEGER NOT NULL
    );
    CREATE INDEX attempts_by_message ON attempts(message_id, idx);
    "#,
    // 3: tenants. Accounts with their API keys, what a tenant's message
    // carries (account, tags, metadata), and idempotency keys committed with
    // the message they created. The account index is partial so anonymous
    // SMTP mail (no account) costs no index write.
    r#"
    ALTER TABLE messages ADD COLUMN account_id TEXT;
    ALTER TABLE messages ADD COLUMN tags TEXT;
    ALTER TABLE messages ADD COLUMN metadata TEXT;
    CREATE INDEX messages_by_account ON messages(account_id, id)
        WHERE account_id IS NOT NULL;

    CREATE TABLE idempotency_keys (
        scope        TEXT    NOT NULL,
        key          TEXT    NOT NULL,
        request_hash TEXT    NOT NULL,
        status       INTEGER NOT NULL,
        response     TEXT    NOT NULL,
        message_id   TEXT    NOT NULL,
        created_at   INTEGER NOT NULL,
        PRIMARY KEY (scope, key)
    ) WITHOUT ROWID;

    CREATE TABLE accounts (
        id                      TEXT    PRIMARY KEY NOT NULL,
        name                    TEXT    NOT NULL UNIQUE,
        contact                 TEXT,
        allowed_sender_domains  TEXT    NOT NULL,
        max_messages_per_minute INTEGER,
        max_recipients_per_day  INTEGER,
        status                  TEXT    NOT NULL,
        created_at              INTEGER NOT NULL
    );

    CREATE TABLE api_keys (
        id           TEXT    PRIMARY KEY NOT NULL,
        account_id   TEXT    NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        name         TEXT    NOT NULL,
        prefix       TEXT    NOT NULL,
        hash         TEXT    NOT NULL UNIQUE,
        created_at   INTEGER NOT NULL,
        last_used_at INTEGER,
        revoked_at   INTEGER
    );
    CREATE INDEX api_keys_by_account ON api_keys(account_id);
    "#,
    // 4: SMTP logins of tenants (argon2 hashes; the operator's own logins
    // stay in the config file).
    r#"
    CREATE TABLE smtp_credentials (
        id            TEXT    PRIMARY KEY NOT NULL,
        account_id    TEXT    NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        username      TEXT    NOT NULL UNIQUE,
        password_hash TEXT    NOT NULL,
        created_at    INTEGER NOT NULL
    );
    CREATE INDEX smtp_credentials_by_account ON smtp_credentials(account_id);
    "#,
    // 5: webhooks per account and every delivery of an event to one, kept
    // as the delivery log and as the retry queue (pending rows).
    r#"
    CREATE TABLE webhooks (
        id         TEXT    PRIMARY KEY NOT NULL,
        account_id TEXT    NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        url        TEXT    NOT NULL,
        secret     TEXT    NOT NULL,
        events     TEXT    NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX webhooks_by_account ON webhooks(account_id);

    CREATE TABLE webhook_deliveries (
        id              TEXT    PRIMARY KEY NOT NULL,
        webhook_id      TEXT    NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
        event_id        TEXT    NOT NULL,
        event_type      TEXT    NOT NULL,
        payload         TEXT    NOT NULL,
        state           TEXT    NOT NULL,
        attempts        INTEGER NOT NULL,
        next_attempt_at INTEGER,
        last_status     INTEGER,
        last_error      TEXT,
        created_at      INTEGER NOT NULL,
        delivered_at    INTEGER
    );
    CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries(webhook_id, id);
    CREATE INDEX webhook_deliveries_pending ON webhook_deliveries(state)
        WHERE state = 'pending';
    "#,
    // 6: providers and routing rules per account, and the provider a rule
    // chose for each recipient (NULL: the default route).
    r#"
    CREATE TABLE providers (
        id         TEXT    PRIMARY KEY NOT NULL,
        account_id TEXT    NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        name       TEXT    NOT NULL,
        kind       TEXT    NOT NULL,
        config     TEXT    NOT NULL,
        created_at INTEGER NOT NULL,
        UNIQUE (account_id, name)
    );
    CREATE TABLE routing_rules (
        id          TEXT    PRIMARY KEY NOT NULL,
        account_id  TEXT    NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        priority    INTEGER NOT NULL,
        conditions  TEXT    NOT NULL,
        provider_id TEXT    NOT NULL REFERENCES providers(id) ON DELETE CASCADE,
        created_at  INTEGER NOT NULL
    );
    ALTER TABLE recipients ADD COLUMN route TEXT;
    "#,
];

/// Brings the database up to the last of [`MIGRATIONS`], one transaction
/// per migration.
pub(crate) fn migrate(conn: &mut Connection) -> Result<i64, StoreError> {
    migrate_with(conn, MIGRATIONS)
}

/// Applies `migrations[user_version..]`, one transaction each, and returns
/// the version reached; for any SQLite file kept the way this store keeps
/// its own (the capture inbox uses it too).
///
/// The version is read inside each write transaction, so two processes
/// opening a fresh database at once cannot both apply the same step.
pub fn migrate_with(conn: &mut Connection, migrations: &[&str]) -> Result<i64, StoreError> {
    let latest = migrations.len() as i64;
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if version > latest {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported: latest,
            });
        }
        let Ok(step) = usize::try_from(version) else {
            return Err(StoreError::Corrupt(format!(
                "negative schema version {version}"
            )));
        };
        let Some(sql) = migrations.get(step) else {
            return Ok(version);
        };
        tx.execute_batch(sql)?;
        // user_version lives in the database header, which is written as part
        // of this transaction: the step and its version number commit together.
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
        tracing::info!(version = version + 1, "applied store schema migration");
    }
}
