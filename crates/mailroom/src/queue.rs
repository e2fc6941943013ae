//! `mailroom queue ...`: read-only views of the store for operators.

use std::fmt::Write as _;

use anyhow::Context;
use mailroom_core::MessageId;
use mailroom_core::config::Config;
use mailroom_core::reply::{Enhanced, Reply};
use mailroom_core::time::now_unix_millis;
use mailroom_store::{
    ListQuery, RecipientState, RecipientUpdate, SqliteOptions, SqliteStore, Store,
};

use crate::QueueCommand;
use crate::config_file::absolute;

pub fn run(config: &Config, command: QueueCommand) -> anyhow::Result<()> {
    let data_dir = absolute(&config.data_dir);
    let db = data_dir.join("mailroom.db");
    anyhow::ensure!(
        db.exists(),
        "no store at {} (is data_dir right? pass --config)",
        db.display()
    );
    let store = SqliteStore::open(&db, SqliteOptions::default())
        .with_context(|| format!("cannot open {}", db.display()))?;
    match command {
        QueueCommand::List { state, limit } => {
            let state = state
                .map(|s| {
                    RecipientState::parse(&s).with_context(|| {
                        format!(
                            "unknown state {s:?}: use queued, deferred, held, delivered or failed"
                        )
                    })
                })
                .transpose()?;
            let list = store.list(&ListQuery {
                state,
                limit,
                ..ListQuery::default()
            })?;
            println!(
                "{:<36}  {:<20}  {:<9}  {:>5}  {:>9}  FROM",
                "ID", "RECEIVED (UTC)", "STATE", "RCPTS", "SIZE"
            );
            for m in list {
                println!(
                    "{:<36}  {:<20}  {:<9}  {:>5}  {:>9}  <{}>",
                    m.id,
                    timestamp(m.received_at),
                    m.state.as_str(),
                    m.recipients,
                    m.size,
                    m.reverse_path.as_deref().unwrap_or("")
                );
            }
        }
        QueueCommand::Retry { id, all } => {
            let ids = match (id, all) {
                (Some(id), false) => vec![parse_id(&id)?],
                (None, true) => {
                    let mut ids: Vec<MessageId> =
                        store.pending()?.into_iter().map(|p| p.message_id).collect();
                    ids.sort_unstable();
                    ids.dedup();
                    ids
                }
                _ => anyhow::bail!("give a message id or --all"),
            };
            let mut total = 0;
            for id in &ids {
                total += change(
                    &store,
                    &data_dir,
                    id,
                    &[RecipientState::Queued, RecipientState::Deferred],
                    RecipientState::Queued,
                )?;
            }
            println!(
                "{total} recipient(s) of {} message(s) to be tried now",
                ids.len()
            );
        }
        QueueCommand::Hold { id } => {
            let id = parse_id(&id)?;
            let n = change(
                &store,
                &data_dir,
                &id,
                &[RecipientState::Queued, RecipientState::Deferred],
                RecipientState::Held,
            )?;
            println!("{n} recipient(s) held");
        }
        QueueCommand::Release { id } => {
            let id = parse_id(&id)?;
            let n = change(
                &store,
                &data_dir,
                &id,
                &[RecipientState::Held],
                RecipientState::Queued,
            )?;
            println!("{n} recipient(s) released");
        }
        QueueCommand::Delete { id } => {
            let id = parse_id(&id)?;
            let deleted = block_on(store.delete(id))??;
            anyhow::ensure!(deleted, "no message {id}");
            println!("deleted {id}");
        }
        QueueCommand::Bounce { id } => {
            let id = parse_id(&id)?;
            let message = store
                .get(&id)?
                .with_context(|| format!("no message {id}"))?;
            let reply = Reply::new(550, Enhanced(5, 0, 0), "Bounced by the mail administrator");
            let failed: Vec<(u32, Reply)> = message
                .recipients
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.state.is_final())
                .map(|(i, _)| (i as u32, reply.clone()))
                .collect();
            let updates = failed
                .iter()
                .map(|(idx, reply)| RecipientUpdate {
                    message_id: id,
                    idx: *idx,
                    state: RecipientState::Failed,
                    next_attempt_at: None,
                    last_reply: Some(mailroom_delivery::engine::one_line(reply)),
                    attempt: None,
                })
                .collect();
            block_on(store.update(updates))??;
            let now = now_unix_millis();
            let notice = mailroom_delivery::engine::bounce_message(
                &config.hostname,
                &message,
                &failed,
                None,
                now,
            );
            match notice {
                Some(dsn) => {
                    let dsn_id = dsn.id;
                    block_on(store.enqueue(dsn))??;
                    let told = crate::control::notify(&data_dir, &dsn_id)?;
                    println!(
                        "{} recipient(s) bounced; DSN {dsn_id} queued to the sender{}",
                        failed.len(),
                        if told { "" } else { NOT_RUNNING }
                    );
                }
                None => println!(
                    "{} recipient(s) bounced; no DSN (null sender or NOTIFY)",
                    failed.len()
                ),
            }
        }
        QueueCommand::Show { id, content } => {
            let id = parse_id(&id)?;
            let m = store
                .get(&id)?
                .with_context(|| format!("no message {id}"))?;
            let e = &m.envelope;
            let mut out = String::new();
            let _ = writeln!(out, "id:           {}", m.id);
            let _ = writeln!(out, "received:     {}", timestamp(m.received_at));
            let _ = writeln!(out, "size:         {}", m.size);
            let _ = writeln!(
                out,
                "reverse-path: <{}>",
                e.reverse_path.as_ref().map(|a| a.as_str()).unwrap_or("")
            );
            let _ = writeln!(out, "body:         {}", e.body_type.as_str());
            let _ = writeln!(out, "smtputf8:     {}", e.smtputf8);
            if let Some(env_id) = &e.env_id {
                let _ = writeln!(out, "envid:        {env_id}");
            }
            if let Some(ret) = e.ret {
                let _ = writeln!(out, "ret:          {}", ret.as_str());
            }
            let o = &m.origin;
            let _ = writeln!(
                out,
                "origin:       {} from {} helo={} auth={} tls={}",
                o.protocol,
                o.remote_ip
                    .map(|ip| ip.to_string())
                    .unwrap_or_else(|| "-".into()),
                o.helo.as_deref().unwrap_or("-"),
                o.auth_user.as_deref().unwrap_or("-"),
                o.tls.as_deref().unwrap_or("-"),
            );
            let _ = writeln!(out, "recipients:");
            for r in &m.recipients {
                let _ = write!(
                    out,
                    "  <{}>  {}  attempts={}",
                    r.recipient.address, r.state, r.attempts
                );
                if let Some(next) = r.next_attempt_at {
                    let _ = write!(out, "  next={}", timestamp(next));
                }
                if let Some(reply) = &r.last_reply {
                    let _ = write!(out, "  last={reply:?}");
                }
                out.push('\n');
            }
            let attempts = store.attempts(&id)?;
            if !attempts.is_empty() {
                let _ = writeln!(out, "attempts:");
                for a in &attempts {
                    let t = &a.attempt;
                    let _ = writeln!(
                        out,
                        "  {}  <{}>  {}  host={} ip={} tls={} {}ms  {:?}",
                        timestamp(t.at),
                        m.envelope
                            .recipients
                            .get(a.idx as usize)
                            .map(|r| r.address.as_str())
                            .unwrap_or("?"),
                        a.outcome.as_str(),
                        t.mx_host.as_deref().unwrap_or("-"),
                        t.ip.as_deref().unwrap_or("-"),
                        t.tls.as_deref().unwrap_or("-"),
                        t.duration_ms,
                        t.reply
                    );
                }
            }
            print!("{out}");
            println!();
            let shown = if content {
                &m.content[..]
            } else {
                headers(&m.content)
            };
            print!("{}", String::from_utf8_lossy(shown));
        }
    }
    Ok(())
}

const NOT_RUNNING: &str = " (no server running: it takes effect at the next start)";

fn parse_id(id: &str) -> anyhow::Result<MessageId> {
    id.parse()
        .with_context(|| format!("{id:?} is not a message id"))
}

/// Runs one store future to completion (the CLI has no runtime otherwise).
fn block_on<F: std::future::Future>(future: F) -> anyhow::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    Ok(runtime.block_on(future))
}

/// Moves the message's recipients that are in one of `from` to `to` (due
/// now), then tells a running server. Returns how many changed.
fn change(
    store: &SqliteStore,
    data_dir: &std::path::Path,
    id: &MessageId,
    from: &[RecipientState],
    to: RecipientState,
) -> anyhow::Result<usize> {
    let message = store.get(id)?.with_context(|| format!("no message {id}"))?;
    let now = now_unix_millis();
    let updates: Vec<RecipientUpdate> = message
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| from.contains(&r.state))
        .map(|(idx, r)| RecipientUpdate {
            message_id: *id,
            idx: idx as u32,
            state: to,
            next_attempt_at: (to != RecipientState::Held).then_some(now),
            last_reply: r.last_reply.clone(),
            attempt: None,
        })
        .collect();
    let n = updates.len();
    if n == 0 {
        return Ok(0);
    }
    block_on(store.update(updates))??;
    if to != RecipientState::Held && !crate::control::notify(data_dir, id)? {
        eprintln!("{id}:{NOT_RUNNING}");
    }
    Ok(n)
}

/// The header section of a message, up to and including the blank line.
fn headers(content: &[u8]) -> &[u8] {
    match content.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &content[..i + 4],
        None => content,
    }
}

/// `2026-11-21 09:30:00` from unix milliseconds, UTC.
fn timestamp(ms: i64) -> String {
    mailroom_core::time::iso_datetime(ms.div_euclid(1000))
}
