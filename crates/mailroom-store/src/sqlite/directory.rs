//! Accounts, API keys and idempotency keys in the SQLite file.
//!
//! Writes go through the writer thread like every other change (one writer,
//! committed with the next group commit); reads use the read pool.

use std::collections::BTreeMap;

use mailroom_core::time::now_unix_millis;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::SqliteStore;
use super::writer::Change;
use crate::{
    Account, AccountStats, AccountStatus, ApiKey, IdempotencyHit, NewApiKey, ProviderRecord,
    RoutingRuleRecord, STATS_WINDOWS, SmtpCredential, StoreError, Webhook, WebhookDelivery,
};

const ACCOUNT_COLUMNS: &str = "id, name, contact, allowed_sender_domains, \
     max_messages_per_minute, max_recipients_per_day, status, created_at";
const KEY_COLUMNS: &str = "id, account_id, name, prefix, created_at, last_used_at, revoked_at";

impl SqliteStore {
    /// Stores a new account; [`StoreError::Conflict`] when the name is taken.
    pub async fn create_account(&self, account: Account) -> Result<(), StoreError> {
        let domains = encode_domains(&account.allowed_sender_domains)?;
        self.directory(move |conn| {
            conn.prepare_cached(&format!(
                "INSERT INTO accounts ({ACCOUNT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            ))?
            .execute(params![
                account.id,
                account.name,
                account.contact,
                domains,
                account.max_messages_per_minute,
                account.max_recipients_per_day,
                account.status.as_str(),
                account.created_at,
            ])
            .map(|n| n as u64)
        })
        .await
        .map(drop)
    }

    /// Replaces an account's fields (not its id or creation time); false
    /// when there is no such account.
    pub async fn update_account(&self, account: Account) -> Result<bool, StoreError> {
        let domains = encode_domains(&account.allowed_sender_domains)?;
        self.directory(move |conn| {
            conn.prepare_cached(
                "UPDATE accounts SET name = ?2, contact = ?3, allowed_sender_domains = ?4, \
                 max_messages_per_minute = ?5, max_recipients_per_day = ?6, status = ?7 \
                 WHERE id = ?1",
            )?
            .execute(params![
                account.id,
                account.name,
                account.contact,
                domains,
                account.max_messages_per_minute,
                account.max_recipients_per_day,
                account.status.as_str(),
            ])
            .map(|n| n as u64)
        })
        .await
        .map(|n| n > 0)
    }

    /// Removes an account and its keys; its messages stay in the queue.
    pub async fn delete_account(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.directory(move |conn| {
            conn.prepare_cached("DELETE FROM api_keys WHERE account_id = ?1")?
                .execute([&id])?;
            conn.prepare_cached("DELETE FROM smtp_credentials WHERE account_id = ?1")?
                .execute([&id])?;
            conn.prepare_cached(
                "DELETE FROM webhook_deliveries WHERE webhook_id IN \
                 (SELECT id FROM webhooks WHERE account_id = ?1)",
            )?
            .execute([&id])?;
            conn.prepare_cached("DELETE FROM webhooks WHERE account_id = ?1")?
                .execute([&id])?;
            conn.prepare_cached("DELETE FROM routing_rules WHERE account_id = ?1")?
                .execute([&id])?;
            conn.prepare_cached("DELETE FROM providers WHERE account_id = ?1")?
                .execute([&id])?;
            conn.prepare_cached("DELETE FROM accounts WHERE id = ?1")?
                .execute([&id])
                .map(|n| n as u64)
        })
        .await
        .map(|n| n > 0)
    }

    pub fn account(&self, id: &str) -> Result<Option<Account>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached(&format!(
                "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?1"
            ))?
            .query_row([id], account_row)
            .optional()?
            .transpose()
        })
    }

    /// Every account, oldest first.
    pub fn accounts(&self) -> Result<Vec<Account>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map([], account_row)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row??);
            }
            Ok(out)
        })
    }

    pub async fn create_api_key(&self, new: NewApiKey) -> Result<(), StoreError> {
        self.directory(move |conn| {
            let k = &new.key;
            conn.prepare_cached(
                "INSERT INTO api_keys (id, account_id, name, prefix, hash, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                k.id,
                k.account_id,
                k.name,
                k.prefix,
                new.hash,
                k.created_at
            ])
            .map(|n| n as u64)
        })
        .await
        .map(drop)
    }

    /// An account's keys, revoked ones included, oldest first.
    pub fn api_keys(&self, account_id: &str) -> Result<Vec<ApiKey>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {KEY_COLUMNS} FROM api_keys WHERE account_id = ?1 ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map([account_id], key_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Every key not revoked, with its hash: what request authentication
    /// looks keys up in.
    pub fn active_api_keys(&self) -> Result<Vec<(String, ApiKey)>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {KEY_COLUMNS}, hash FROM api_keys WHERE revoked_at IS NULL"
            ))?;
            let rows = stmt.query_map([], |row| Ok((row.get(7)?, key_row(row)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Revokes one of an account's keys; false when the account has no
    /// such key or it was already revoked.
    pub async fn revoke_api_key(&self, account_id: &str, key_id: &str) -> Result<bool, StoreError> {
        let (account_id, key_id) = (account_id.to_owned(), key_id.to_owned());
        let now = now_unix_millis();
        self.directory(move |conn| {
            conn.prepare_cached(
                "UPDATE api_keys SET revoked_at = ?3 \
                 WHERE id = ?1 AND account_id = ?2 AND revoked_at IS NULL",
            )?
            .execute(params![key_id, account_id, now])
            .map(|n| n as u64)
        })
        .await
        .map(|n| n > 0)
    }

    /// Records when keys were last used (batched by the caller).
    pub async fn touch_api_keys(&self, used: Vec<(String, i64)>) -> Result<(), StoreError> {
        self.directory(move |conn| {
            let mut stmt = conn.prepare_cached(
                "UPDATE api_keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?2) \
                 WHERE id = ?1",
            )?;
            let mut n = 0;
            for (id, at) in &used {
                n += stmt.execute(params![id, at])? as u64;
            }
            Ok(n)
        })
        .await
        .map(drop)
    }

    /// The first answer given under `key`, if any.
    pub fn idempotency(
        &self,
        scope: &str,
        key: &str,
    ) -> Result<Option<IdempotencyHit>, StoreError> {
        self.read(|conn| {
            let hit = conn
                .prepare_cached(
                    "SELECT request_hash, status, response, created_at FROM idempotency_keys \
                     WHERE scope = ?1 AND key = ?2",
                )?
                .query_row([scope, key], |row| {
                    Ok(IdempotencyHit {
                        request_hash: row.get(0)?,
                        status: row.get(1)?,
                        response: row.get(2)?,
                        created_at: row.get(3)?,
                    })
                })
                .optional()?;
            Ok(hit)
        })
    }

    /// Forgets idempotency keys first used before `before` (unix ms).
    pub async fn expire_idempotency_keys(&self, before: i64) -> Result<u64, StoreError> {
        self.directory(move |conn| {
            conn.prepare_cached("DELETE FROM idempotency_keys WHERE created_at < ?1")?
                .execute([before])
                .map(|n| n as u64)
        })
        .await
    }

    /// Stores a tenant's SMTP login; [`StoreError::Conflict`] when the
    /// username is taken.
    pub async fn create_smtp_credential(&self, c: SmtpCredential) -> Result<(), StoreError> {
        self.directory(move |conn| {
            conn.prepare_cached(
                "INSERT INTO smtp_credentials (id, account_id, username, password_hash, \
                 created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                c.id,
                c.account_id,
                c.username,
                c.password_hash,
                c.created_at
            ])
            .map(|n| n as u64)
        })
        .await
        .map(drop)
    }

    /// Removes one of an account's SMTP logins; its username if it existed.
    pub async fn delete_smtp_credential(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<bool, StoreError> {
        let (account_id, id) = (account_id.to_owned(), id.to_owned());
        self.directory(move |conn| {
            conn.prepare_cached("DELETE FROM smtp_credentials WHERE id = ?1 AND account_id = ?2")?
                .execute(params![id, account_id])
                .map(|n| n as u64)
        })
        .await
        .map(|n| n > 0)
    }

    /// SMTP logins: one account's, or every account's when `None`.
    pub fn smtp_credentials(
        &self,
        account_id: Option<&str>,
    ) -> Result<Vec<SmtpCredential>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, account_id, username, password_hash, created_at \
                 FROM smtp_credentials WHERE ?1 IS NULL OR account_id = ?1 \
                 ORDER BY created_at, id",
            )?;
            let rows = stmt.query_map([account_id], |row| {
                Ok(SmtpCredential {
                    id: row.get(0)?,
                    account_id: row.get(1)?,
                    username: row.get(2)?,
                    password_hash: row.get(3)?,
                    created_at: row.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    pub async fn create_webhook(&self, w: Webhook) -> Result<(), StoreError> {
        let events = serde_json::to_string(&w.events)
            .map_err(|e| StoreError::Invalid(format!("webhook events: {e}")))?;
        self.directory(move |conn| {
            conn.prepare_cached(
                "INSERT INTO webhooks (id, account_id, url, secret, events, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                w.id,
                w.account_id,
                w.url,
                w.secret,
                events,
                w.created_at
            ])
            .map(|n| n as u64)
        })
        .await
        .map(drop)
    }

    /// Removes a webhook and its delivery log; false when there is none.
    pub async fn delete_webhook(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.directory(move |conn| {
            conn.prepare_cached("DELETE FROM webhook_deliveries WHERE webhook_id = ?1")?
                .execute([&id])?;
            conn.prepare_cached("DELETE FROM webhooks WHERE id = ?1")?
                .execute([&id])
                .map(|n| n as u64)
        })
        .await
        .map(|n| n > 0)
    }

    /// Every webhook, oldest first.
    pub fn webhooks(&self) -> Result<Vec<Webhook>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, account_id, url, secret, events, created_at FROM webhooks \
                 ORDER BY created_at, id",
            )?;
            let mut rows = stmt.query([])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let id: String = row.get(0)?;
                let events: String = row.get(4)?;
                let events = serde_json::from_str(&events)
                    .map_err(|e| StoreError::Corrupt(format!("webhooks.events of {id}: {e}")))?;
                out.push(Webhook {
                    id,
                    account_id: row.get(1)?,
                    url: row.get(2)?,
                    secret: row.get(3)?,
                    events,
                    created_at: row.get(5)?,
                });
            }
            Ok(out)
        })
    }

    /// Records new deliveries (state `pending`), all in one commit.
    pub async fn add_webhook_deliveries(
        &self,
        deliveries: Vec<WebhookDelivery>,
    ) -> Result<(), StoreError> {
        self.directory(move |conn| {
            let mut stmt = conn.prepare_cached(
                "INSERT INTO webhook_deliveries (id, webhook_id, event_id, event_type, payload, \
                 state, attempts, next_attempt_at, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, ?6, ?7)",
            )?;
            let mut n = 0;
            for d in &deliveries {
                n += stmt.execute(params![
                    d.id,
                    d.webhook_id,
                    d.event_id,
                    d.event_type,
                    d.payload,
                    d.next_attempt_at,
                    d.created_at
                ])? as u64;
            }
            Ok(n)
        })
        .await
        .map(drop)
    }

    /// Records an attempt's result for a delivery.
    pub async fn update_webhook_delivery(&self, d: WebhookDelivery) -> Result<(), StoreError> {
        self.directory(move |conn| {
            conn.prepare_cached(
                "UPDATE webhook_deliveries SET state = ?2, attempts = ?3, next_attempt_at = ?4, \
                 last_status = ?5, last_error = ?6, delivered_at = ?7 WHERE id = ?1",
            )?
            .execute(params![
                d.id,
                d.state,
                d.attempts,
                d.next_attempt_at,
                d.last_status,
                d.last_error,
                d.delivered_at
            ])
            .map(|n| n as u64)
        })
        .await
        .map(drop)
    }

    /// Deliveries still to make (after a restart).
    pub fn pending_webhook_deliveries(&self) -> Result<Vec<WebhookDelivery>, StoreError> {
        self.webhook_delivery_rows("WHERE state = 'pending' ORDER BY id", None, None)
    }

    /// A webhook's delivery log, newest first.
    pub fn webhook_deliveries(
        &self,
        webhook_id: &str,
        limit: usize,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        self.webhook_delivery_rows(
            "WHERE webhook_id = ?1 ORDER BY id DESC LIMIT ?2",
            Some(webhook_id),
            Some(limit),
        )
    }

    fn webhook_delivery_rows(
        &self,
        filter: &str,
        webhook_id: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT id, webhook_id, event_id, event_type, payload, state, attempts, \
                 next_attempt_at, last_status, last_error, created_at, delivered_at \
                 FROM webhook_deliveries {filter}"
            ))?;
            let map = |row: &Row<'_>| {
                Ok(WebhookDelivery {
                    id: row.get(0)?,
                    webhook_id: row.get(1)?,
                    event_id: row.get(2)?,
                    event_type: row.get(3)?,
                    payload: row.get(4)?,
                    state: row.get(5)?,
                    attempts: row.get(6)?,
                    next_attempt_at: row.get(7)?,
                    last_status: row.get(8)?,
                    last_error: row.get(9)?,
                    created_at: row.get(10)?,
                    delivered_at: row.get(11)?,
                })
            };
            let rows = match (webhook_id, limit) {
                (Some(id), Some(limit)) => stmt
                    .query_map(params![id, limit.min(10_000) as i64], map)?
                    .collect::<Result<Vec<_>, _>>()?,
                _ => stmt.query_map([], map)?.collect::<Result<Vec<_>, _>>()?,
            };
            Ok(rows)
        })
    }

    /// Stores a provider; [`StoreError::Conflict`] when the account has one
    /// of that name.
    pub async fn create_provider(&self, p: ProviderRecord) -> Result<(), StoreError> {
        self.directory(move |conn| {
            conn.prepare_cached(
                "INSERT INTO providers (id, account_id, name, kind, config, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                p.id,
                p.account_id,
                p.name,
                p.kind,
                p.config,
                p.created_at
            ])
            .map(|n| n as u64)
        })
        .await
        .map(drop)
    }

    /// Removes a provider; false when there is none. Rules that use it must
    /// be gone first ([`StoreError::Conflict`] otherwise).
    pub async fn delete_provider(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.directory(move |conn| {
            let used: i64 = conn
                .prepare_cached("SELECT COUNT(*) FROM routing_rules WHERE provider_id = ?1")?
                .query_row([&id], |row| row.get(0))?;
            if used > 0 {
                return Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT),
                    Some("routing rules use this provider".into()),
                ));
            }
            conn.prepare_cached("DELETE FROM providers WHERE id = ?1")?
                .execute([&id])
                .map(|n| n as u64)
        })
        .await
        .map(|n| n > 0)
    }

    /// Every provider, oldest first.
    pub fn providers(&self) -> Result<Vec<ProviderRecord>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, account_id, name, kind, config, created_at FROM providers \
                 ORDER BY created_at, id",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok(ProviderRecord {
                    id: row.get(0)?,
                    account_id: row.get(1)?,
                    name: row.get(2)?,
                    kind: row.get(3)?,
                    config: row.get(4)?,
                    created_at: row.get(5)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    pub async fn create_routing_rule(&self, r: RoutingRuleRecord) -> Result<(), StoreError> {
        self.directory(move |conn| {
            conn.prepare_cached(
                "INSERT INTO routing_rules (id, account_id, priority, conditions, provider_id, \
                 created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                r.id,
                r.account_id,
                r.priority,
                r.conditions,
                r.provider_id,
                r.created_at
            ])
            .map(|n| n as u64)
        })
        .await
        .map(drop)
    }

    pub async fn delete_routing_rule(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.directory(move |conn| {
            conn.prepare_cached("DELETE FROM routing_rules WHERE id = ?1")?
                .execute([&id])
                .map(|n| n as u64)
        })
        .await
        .map(|n| n > 0)
    }

    /// Every routing rule, by account, then priority, then age.
    pub fn routing_rules(&self) -> Result<Vec<RoutingRuleRecord>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, account_id, priority, conditions, provider_id, created_at \
                 FROM routing_rules ORDER BY account_id, priority, created_at, id",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok(RoutingRuleRecord {
                    id: row.get(0)?,
                    account_id: row.get(1)?,
                    priority: row.get(2)?,
                    conditions: row.get(3)?,
                    provider_id: row.get(4)?,
                    created_at: row.get(5)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Queue depth and recent activity per account, as of `now` (unix ms).
    ///
    /// Scans recipients and the last day's attempts: fine for a dashboard
    /// polled every few seconds, not for every request.
    pub fn stats(&self, now: i64) -> Result<Vec<AccountStats>, StoreError> {
        let [minute, hour, day] = STATS_WINDOWS.map(|w| now - w);
        self.read(|conn| {
            let mut by = BTreeMap::new();
            let mut stmt = conn.prepare_cached(
                "SELECT m.account_id, r.state, COUNT(*) FROM recipients r \
                 JOIN messages m ON m.id = r.message_id GROUP BY 1, 2",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let state: String = row.get(1)?;
                let n: i64 = row.get(2)?;
                slot(&mut by, row.get(0)?)
                    .queue
                    .insert(state, n.max(0) as u64);
            }
            // Message ids are UUIDv7: the primary key finds the last day.
            let day_id =
                uuid::Builder::from_unix_timestamp_millis(day.max(0) as u64, &[0; 10]).into_uuid();
            let mut stmt = conn.prepare_cached(
                "SELECT account_id, SUM(received_at >= ?1), SUM(received_at >= ?2), \
                 SUM(received_at >= ?3) FROM messages WHERE id >= ?4 GROUP BY 1",
            )?;
            let mut rows = stmt.query(params![minute, hour, day, day_id.to_string()])?;
            while let Some(row) = rows.next()? {
                let counts = [row.get::<_, i64>(1)?, row.get(2)?, row.get(3)?];
                slot(&mut by, row.get(0)?).accepted = counts.map(|n| n.max(0) as u64);
            }
            let mut stmt = conn.prepare_cached(
                "SELECT m.account_id, a.outcome, SUM(a.at >= ?1), SUM(a.at >= ?2), \
                 SUM(a.at >= ?3) FROM attempts a JOIN messages m ON m.id = a.message_id \
                 WHERE a.at >= ?3 GROUP BY 1, 2",
            )?;
            let mut rows = stmt.query(params![minute, hour, day])?;
            while let Some(row) = rows.next()? {
                let outcome: String = row.get(1)?;
                let counts = [row.get::<_, i64>(2)?, row.get(3)?, row.get(4)?];
                slot(&mut by, row.get(0)?)
                    .outcomes
                    .insert(outcome, counts.map(|n| n.max(0) as u64));
            }
            Ok(by.into_values().collect())
        })
    }

    async fn directory(
        &self,
        write: impl Fn(&Connection) -> rusqlite::Result<u64> + Send + 'static,
    ) -> Result<u64, StoreError> {
        self.change(Change::Directory(Box::new(write))).await
    }
}

fn slot(
    by: &mut BTreeMap<Option<String>, AccountStats>,
    account: Option<String>,
) -> &mut AccountStats {
    by.entry(account.clone()).or_insert_with(|| AccountStats {
        account,
        ..AccountStats::default()
    })
}

fn encode_domains(domains: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(domains)
        .map_err(|e| StoreError::Invalid(format!("allowed_sender_domains: {e}")))
}

/// Inner `Result`: a row this build cannot read is corruption, not a
/// SQLite failure.
fn account_row(row: &Row<'_>) -> rusqlite::Result<Result<Account, StoreError>> {
    let domains: String = row.get(3)?;
    let status: String = row.get(6)?;
    let id: String = row.get(0)?;
    let Ok(allowed_sender_domains) = serde_json::from_str(&domains) else {
        return Ok(Err(StoreError::Corrupt(format!(
            "accounts.allowed_sender_domains of {id}"
        ))));
    };
    let Some(status) = AccountStatus::parse(&status) else {
        return Ok(Err(StoreError::Corrupt(format!(
            "accounts.status of {id}: {status:?}"
        ))));
    };
    Ok(Ok(Account {
        id,
        name: row.get(1)?,
        contact: row.get(2)?,
        allowed_sender_domains,
        max_messages_per_minute: row.get(4)?,
        max_recipients_per_day: row.get(5)?,
        status,
        created_at: row.get(7)?,
    }))
}

fn key_row(row: &Row<'_>) -> rusqlite::Result<ApiKey> {
    Ok(ApiKey {
        id: row.get(0)?,
        account_id: row.get(1)?,
        name: row.get(2)?,
        prefix: row.get(3)?,
        created_at: row.get(4)?,
        last_used_at: row.get(5)?,
        revoked_at: row.get(6)?,
    })
}
