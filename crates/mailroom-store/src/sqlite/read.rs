//! Queries on a read connection, and turning rows back into domain types.
//!
//! Everything read from the file is checked: a value this build cannot
//! interpret becomes [`StoreError::Corrupt`] naming the table and column,
//! never a panic.

use std::str::FromStr;

use mailroom_core::{
    Address, BodyType, Envelope, MessageId, MessageMeta, Notify, Origin, Recipient, Ret,
};
use rusqlite::types::{FromSql, Value};
use rusqlite::{Connection, Row, params_from_iter};

use crate::{
    Attempt, AttemptRecord, ListQuery, MessageSummary, PendingRecipient, RecipientState,
    StoreError, StoredMessage, StoredRecipient,
};

/// The message with this id; with `content` false its content is left
/// empty (status views need only the envelope and the states, and the
/// content is most of the row).
pub(crate) fn get(
    conn: &mut Connection,
    id: &MessageId,
    content: bool,
) -> Result<Option<StoredMessage>, StoreError> {
    // One snapshot for the message row and its recipients, so a delivery
    // result committed between the two queries cannot tear the answer.
    let tx = conn.transaction()?;
    let id_text = id.to_string();
    let message = {
        let mut stmt = tx.prepare_cached(if content {
            "SELECT received_at, reverse_path, env_id, ret, body_type, smtputf8, priority, \
             origin, size, content, account_id, tags, metadata FROM messages WHERE id = ?1"
        } else {
            "SELECT received_at, reverse_path, env_id, ret, body_type, smtputf8, priority, \
             origin, size, x'', account_id, tags, metadata FROM messages WHERE id = ?1"
        })?;
        let mut rows = stmt.query([&id_text])?;
        match rows.next()? {
            Some(row) => message_row(*id, row)?,
            None => return Ok(None),
        }
    };
    let (recipients, stored) = {
        let mut stmt = tx.prepare_cached(
            "SELECT address, orcpt, notify, state, attempts, next_attempt_at, last_reply, route \
             FROM recipients WHERE message_id = ?1 ORDER BY idx",
        )?;
        let mut rows = stmt.query([&id_text])?;
        let mut recipients = Vec::new();
        let mut stored = Vec::new();
        while let Some(row) = rows.next()? {
            let r = recipient_row(row)?;
            recipients.push(r.recipient.clone());
            stored.push(r);
        }
        (recipients, stored)
    };
    tx.commit()?;
    let MessageRow {
        received_at,
        mut envelope,
        origin,
        size,
        content,
        meta,
    } = message;
    envelope.recipients = recipients;
    Ok(Some(StoredMessage {
        id: *id,
        received_at,
        envelope,
        origin,
        size,
        content,
        recipients: stored,
        meta,
    }))
}

struct MessageRow {
    received_at: i64,
    envelope: Envelope,
    origin: Origin,
    size: u64,
    content: Vec<u8>,
    meta: MessageMeta,
}

fn message_row(id: MessageId, row: &Row<'_>) -> Result<MessageRow, StoreError> {
    let corrupt = |column: &str, detail: String| {
        StoreError::Corrupt(format!("messages.{column} of {id}: {detail}"))
    };
    let reverse_path = column::<Option<String>>(row, 1, "messages.reverse_path")?
        .map(|text| Address::parse(&text).map_err(|e| corrupt("reverse_path", e.to_string())))
        .transpose()?;
    let ret = column::<Option<String>>(row, 3, "messages.ret")?
        .map(|text| Ret::parse(&text).ok_or_else(|| corrupt("ret", format!("{text:?}"))))
        .transpose()?;
    let body_type = column::<String>(row, 4, "messages.body_type")?;
    let body_type = BodyType::parse(&body_type)
        .ok_or_else(|| corrupt("body_type", format!("{body_type:?}")))?;
    let smtputf8 = match column::<i64>(row, 5, "messages.smtputf8")? {
        0 => false,
        1 => true,
        other => return Err(corrupt("smtputf8", other.to_string())),
    };
    let priority = column::<i64>(row, 6, "messages.priority")?;
    let priority = i8::try_from(priority).map_err(|_| corrupt("priority", priority.to_string()))?;
    let origin = column::<String>(row, 7, "messages.origin")?;
    let origin: Origin =
        serde_json::from_str(&origin).map_err(|e| corrupt("origin", e.to_string()))?;
    let size = column::<i64>(row, 8, "messages.size")?;
    let size = u64::try_from(size).map_err(|_| corrupt("size", size.to_string()))?;
    Ok(MessageRow {
        received_at: column(row, 0, "messages.received_at")?,
        envelope: Envelope {
            reverse_path,
            recipients: Vec::new(),
            env_id: column(row, 2, "messages.env_id")?,
            ret,
            body_type,
            smtputf8,
            priority,
        },
        origin,
        size,
        content: column(row, 9, "messages.content")?,
        meta: MessageMeta {
            account: column(row, 10, "messages.account_id")?,
            tags: json_column(row, 11, "messages.tags")?.unwrap_or_default(),
            metadata: json_column(row, 12, "messages.metadata")?.unwrap_or_default(),
            not_before: None,
            idempotency: None,
            routes: Default::default(),
        },
    })
}

/// A nullable column holding JSON.
fn json_column<T: serde::de::DeserializeOwned>(
    row: &Row<'_>,
    idx: usize,
    name: &str,
) -> Result<Option<T>, StoreError> {
    column::<Option<String>>(row, idx, name)?
        .map(|text| {
            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{name}: {e}")))
        })
        .transpose()
}

fn recipient_row(row: &Row<'_>) -> Result<StoredRecipient, StoreError> {
    let corrupt = |column: &str, detail: String| {
        StoreError::Corrupt(format!("recipients.{column}: {detail}"))
    };
    let address = column::<String>(row, 0, "recipients.address")?;
    let address = Address::parse(&address).map_err(|e| corrupt("address", e.to_string()))?;
    let notify = column::<i64>(row, 2, "recipients.notify")?;
    let notify = u8::try_from(notify)
        .ok()
        .filter(|bits| *bits <= 0x0f)
        .map(Notify::from_bits)
        .ok_or_else(|| corrupt("notify", notify.to_string()))?;
    let state = column::<String>(row, 3, "recipients.state")?;
    let state =
        RecipientState::parse(&state).ok_or_else(|| corrupt("state", format!("{state:?}")))?;
    let attempts = column::<i64>(row, 4, "recipients.attempts")?;
    let attempts =
        u32::try_from(attempts).map_err(|_| corrupt("attempts", attempts.to_string()))?;
    Ok(StoredRecipient {
        recipient: Recipient {
            address,
            orcpt: column(row, 1, "recipients.orcpt")?,
            notify,
        },
        state,
        attempts,
        next_attempt_at: column(row, 5, "recipients.next_attempt_at")?,
        last_reply: column(row, 6, "recipients.last_reply")?,
        route: column(row, 7, "recipients.route")?,
    })
}

/// Summary states by rank, as computed by [`RANK`]: least advanced first.
const BY_RANK: [RecipientState; 5] = [
    RecipientState::Queued,
    RecipientState::Deferred,
    RecipientState::Held,
    RecipientState::Failed,
    RecipientState::Delivered,
];

/// The summary state of a message as the lowest rank among its recipients;
/// an unknown state ranks -1 so it surfaces as corruption instead of hiding.
const RANK: &str = "MIN(CASE r.state WHEN 'queued' THEN 0 WHEN 'deferred' THEN 1 \
                    WHEN 'held' THEN 2 WHEN 'failed' THEN 3 WHEN 'delivered' THEN 4 \
                    ELSE -1 END)";

pub(crate) fn list(
    conn: &Connection,
    query: &ListQuery,
) -> Result<Vec<MessageSummary>, StoreError> {
    // Walks messages newest first by primary key and stops after `limit`
    // matches. With a state filter that matches few messages this scans far;
    // acceptable for an operator's listing, not for the scheduler.
    let mut sql = format!(
        "SELECT m.id, m.received_at, m.reverse_path, m.size, COUNT(*), {RANK} AS rank, \
         m.account_id, m.tags FROM messages m JOIN recipients r ON r.message_id = m.id \
         WHERE 1"
    );
    let mut params = Vec::new();
    if let Some(before) = &query.before {
        sql.push_str(" AND m.id < ?");
        params.push(Value::Text(before.to_string()));
    }
    if let Some(account) = &query.account {
        sql.push_str(" AND m.account_id = ?");
        params.push(Value::Text(account.clone()));
    }
    if let Some(tag) = &query.tag {
        sql.push_str(" AND EXISTS (SELECT 1 FROM json_each(m.tags) WHERE value = ?)");
        params.push(Value::Text(tag.clone()));
    }
    if let Some(since) = query.since {
        sql.push_str(" AND m.received_at >= ?");
        params.push(Value::Integer(since));
    }
    sql.push_str(" GROUP BY m.id");
    if let Some(state) = query.state {
        sql.push_str(" HAVING rank = ?");
        params.push(Value::Integer(i64::from(state.rank())));
    }
    sql.push_str(" ORDER BY m.id DESC LIMIT ?");
    params.push(Value::Integer(
        i64::try_from(query.limit).unwrap_or(i64::MAX),
    ));

    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let id = column::<String>(row, 0, "messages.id")?;
        let id = MessageId::from_str(&id)
            .map_err(|e| StoreError::Corrupt(format!("messages.id {id:?}: {e}")))?;
        let size = column::<i64>(row, 3, "messages.size")?;
        let recipients = column::<i64>(row, 4, "recipients")?;
        let rank = column::<i64>(row, 5, "recipients.state")?;
        out.push(MessageSummary {
            id,
            received_at: column(row, 1, "messages.received_at")?,
            reverse_path: column(row, 2, "messages.reverse_path")?,
            recipients: u32::try_from(recipients).map_err(|_| {
                StoreError::Corrupt(format!("message {id} has {recipients} recipients"))
            })?,
            size: u64::try_from(size)
                .map_err(|_| StoreError::Corrupt(format!("messages.size of {id}: {size}")))?,
            state: usize::try_from(rank)
                .ok()
                .and_then(|rank| BY_RANK.get(rank).copied())
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("recipients.state of {id}: unknown state"))
                })?,
            account: column(row, 6, "messages.account_id")?,
            tags: json_column(row, 7, "messages.tags")?.unwrap_or_default(),
        });
    }
    Ok(out)
}

pub(crate) fn pending(conn: &Connection) -> Result<Vec<PendingRecipient>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT r.message_id, r.idx, r.address, r.state, r.next_attempt_at, m.priority, \
         m.received_at, r.route FROM recipients r JOIN messages m ON m.id = r.message_id \
         WHERE r.state IN ('queued', 'deferred', 'held')",
    )?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let id: String = column(row, 0, "recipients.message_id")?;
        let message_id = MessageId::from_str(&id)
            .map_err(|e| StoreError::Corrupt(format!("recipients.message_id {id:?}: {e}")))?;
        let address: String = column(row, 2, "recipients.address")?;
        let domain = Address::parse(&address)
            .map_err(|e| StoreError::Corrupt(format!("recipients.address {address:?}: {e}")))?
            .domain()
            .to_ascii_lowercase();
        let state: String = column(row, 3, "recipients.state")?;
        let state = RecipientState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("recipients.state {state:?}")))?;
        let received_at: i64 = column(row, 6, "messages.received_at")?;
        let next: Option<i64> = column(row, 4, "recipients.next_attempt_at")?;
        out.push(PendingRecipient {
            message_id,
            idx: column(row, 1, "recipients.idx")?,
            route: column(row, 7, "recipients.route")?,
            domain,
            state,
            next_attempt_at: next.unwrap_or(received_at),
            priority: column(row, 5, "messages.priority")?,
            received_at,
        });
    }
    Ok(out)
}

pub(crate) fn attempts(
    conn: &Connection,
    id: &MessageId,
) -> Result<Vec<AttemptRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT idx, outcome, at, mx_host, ip, tls, code, reply, duration_ms FROM attempts \
         WHERE message_id = ?1 ORDER BY at, rowid",
    )?;
    let mut rows = stmt.query([id.to_string()])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let outcome: String = column(row, 1, "attempts.outcome")?;
        let duration: i64 = column(row, 8, "attempts.duration_ms")?;
        out.push(AttemptRecord {
            idx: column(row, 0, "attempts.idx")?,
            outcome: RecipientState::parse(&outcome)
                .ok_or_else(|| StoreError::Corrupt(format!("attempts.outcome {outcome:?}")))?,
            attempt: Attempt {
                at: column(row, 2, "attempts.at")?,
                mx_host: column(row, 3, "attempts.mx_host")?,
                ip: column(row, 4, "attempts.ip")?,
                tls: column(row, 5, "attempts.tls")?,
                code: column(row, 6, "attempts.code")?,
                reply: column(row, 7, "attempts.reply")?,
                duration_ms: u64::try_from(duration).unwrap_or(0),
            },
        });
    }
    Ok(out)
}

pub(crate) fn count(conn: &Connection) -> Result<u64, StoreError> {
    let n: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM messages")?
        .query_row([], |row| row.get(0))?;
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("message count {n}")))
}

/// Reads a column; a value of the wrong type is corruption, not a SQLite
/// failure, so callers can tell a bad row from a bad connection.
fn column<T: FromSql>(row: &Row<'_>, idx: usize, name: &str) -> Result<T, StoreError> {
    row.get(idx).map_err(|e| match e {
        rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(..) => StoreError::Corrupt(format!("{name}: {e}")),
        other => other.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_agree_with_by_rank() {
        for state in RecipientState::ALL {
            assert_eq!(BY_RANK[usize::from(state.rank())], state);
        }
    }
}
