//! The delivery loop: take a due job from the [`Scheduler`], find the
//! destination's MX hosts, hand the message over, and record per recipient
//! what happened: delivered, deferred (retried later with backoff) or
//! failed (bounced to the reverse-path with an RFC 3464 DSN).
//!
//! A job's results are made durable before the job counts as done; a
//! delivery cut short by a crash is simply tried again after restart
//! (at-least-once, only that transaction can repeat).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mailroom_core::config::{DeliveryConfig, RouteConfig};
use mailroom_core::reply::{Enhanced, Reply};
use mailroom_core::time::now_unix_millis;
use mailroom_core::{Envelope, EventKind, MessageEvent, MessageId, NewMessage, Origin, Recipient};
use mailroom_store::{Attempt, RecipientState, RecipientUpdate, Store, StoreError, StoredMessage};
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::connection::{
    ClientOptions, DeliveryError, OutboundEnvelope, RecipientOutcome, SmtpConnection,
};
use crate::dns::{DnsError, MxResolver};
use crate::dsn::{self, Action, DsnRecipient, DsnRequest};
use crate::pool::{Held, Pool, PoolKey};
use crate::providers::{Provider, Providers, destination, split_destination};
use crate::retry::RetryPolicy;
use crate::scheduler::{Entry, Job, Scheduler};

/// One call to a webhook provider may take this long.
const WEBHOOK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Everything the engine needs; cheap to clone.
pub struct Engine<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Engine<S> {
    fn clone(&self) -> Self {
        Engine {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<S> {
    store: S,
    scheduler: Scheduler,
    dns: MxResolver,
    client: ClientOptions,
    policy: RetryPolicy,
    routes: Vec<RouteConfig>,
    local_domains: Vec<String>,
    delay_warning: Option<std::time::Duration>,
    smtp_port: u16,
    hostname: String,
    concurrency: Arc<Semaphore>,
    pool: Pool,
    /// Total permits of `concurrency`, to know when nothing is in flight.
    permits: u32,
    /// Where tenants' delivery events go (webhooks), once wired.
    events: std::sync::OnceLock<tokio::sync::mpsc::Sender<MessageEvent>>,
    /// Tenants' providers, chosen per recipient by routing rules.
    providers: Arc<Providers>,
}

/// What became of one recipient in one attempt.
#[derive(Debug, Clone)]
struct Outcome {
    state: RecipientState,
    reply: Reply,
}

/// Where an attempt went, for the attempt record.
#[derive(Debug, Clone, Default)]
struct Route {
    mx_host: Option<String>,
    ip: Option<String>,
    tls: Option<String>,
    /// The receiving server offered DSN, so NOTIFY went on with the
    /// message and success reports are its job (RFC 3461 §6.2).
    dsn_passed: bool,
}

impl<S: Store + Clone> Engine<S> {
    pub fn new(
        store: S,
        scheduler: Scheduler,
        dns: MxResolver,
        client: ClientOptions,
        config: &DeliveryConfig,
        hostname: String,
        local_domains: Vec<String>,
    ) -> Self {
        Engine {
            inner: Arc::new(Inner {
                store,
                scheduler,
                dns,
                client,
                policy: RetryPolicy::from(config),
                routes: config.routes.clone(),
                delay_warning: config.delay_warning,
                local_domains: local_domains
                    .into_iter()
                    .map(|d| d.to_ascii_lowercase())
                    .collect(),
                smtp_port: config.smtp_port,
                hostname,
                concurrency: Arc::new(Semaphore::new(config.concurrency.max(1))),
                permits: config.concurrency.clamp(1, u32::MAX as usize) as u32,
                pool: Pool::new(
                    config.idle_timeout,
                    config.max_messages_per_connection,
                    config.connection_limit,
                ),
                events: std::sync::OnceLock::new(),
                providers: Arc::new(Providers::default()),
            }),
        }
    }

    /// The provider registry the API keeps current.
    pub fn providers(&self) -> Arc<Providers> {
        self.inner.providers.clone()
    }

    /// Sends an event for every recorded outcome of a tenant's message to
    /// `events`. The channel is bounded: a slow consumer slows delivery
    /// down rather than losing events or growing without limit.
    pub fn report_to(&self, events: tokio::sync::mpsc::Sender<MessageEvent>) {
        let _ = self.inner.events.set(events);
    }

    /// Schedules every recipient the store still has to deliver; returns
    /// how many. Held recipients stay out until released.
    pub fn load(&self) -> Result<usize, StoreError> {
        let pending = self.inner.store.pending()?;
        let entries: Vec<Entry> = pending
            .into_iter()
            .filter(|p| p.state != RecipientState::Held)
            .map(|p| Entry {
                message_id: p.message_id,
                idx: p.idx,
                domain: destination(&p.domain, p.route.as_deref()),
                due: p.next_attempt_at,
                priority: p.priority,
            })
            .collect();
        let n = entries.len();
        self.inner.scheduler.add(entries);
        Ok(n)
    }

    /// At shutdown, after the [`run`](Self::run) task is stopped: waits up
    /// to `grace` for deliveries in flight to finish and record their
    /// results, then closes pooled connections. Returns false if some were
    /// still running (they are tried again after the next start).
    pub async fn drain(&self, grace: std::time::Duration) -> bool {
        let all = self.inner.concurrency.acquire_many(self.inner.permits);
        let finished = match tokio::time::timeout(grace, all).await {
            Ok(Ok(permits)) => {
                // Keep them: nothing new may start now.
                permits.forget();
                true
            }
            _ => false,
        };
        self.inner.pool.close_all().await;
        finished
    }

    /// Marks the recipients in local domains as kept in the store: the
    /// router's decision, made before the message is stored.
    pub fn route_locally(&self, message: &mut NewMessage) {
        message.kept_locally = message
            .envelope
            .recipients
            .iter()
            .enumerate()
            .filter(|(i, r)| {
                let domain = r.address.domain();
                // A tenant's routing rule outranks the local store.
                !message.meta.routes.contains_key(&(*i as u32))
                    && self
                        .inner
                        .local_domains
                        .iter()
                        .any(|d| d.eq_ignore_ascii_case(domain))
            })
            .map(|(i, _)| i as u32)
            .collect();
    }

    /// Schedules recipients of a message that was just made durable.
    pub fn schedule(&self, entries: Vec<Entry>) {
        self.inner.scheduler.add(entries);
    }

    /// Runs deliveries until the task is dropped.
    pub async fn run(self) {
        let reaper = {
            let pool = self.inner.pool.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    pool.reap().await;
                }
            })
        };
        let _reaper = AbortOnDrop(reaper);
        loop {
            let Ok(permit) = self.inner.concurrency.clone().acquire_owned().await else {
                return;
            };
            let job = self.inner.scheduler.next().await;
            let engine = self.clone();
            let span = info_span!("delivery", message_id = %job.message_id, domain = %job.domain);
            tokio::spawn(
                async move {
                    let domain = job.domain.clone();
                    engine.deliver(job).await;
                    engine.inner.scheduler.done(&domain);
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }

    async fn deliver(&self, job: Job) {
        let (domain, provider) = split_destination(&job.domain);
        if provider.is_none() && self.inner.local_domains.iter().any(|d| d == domain) {
            return self.keep_locally(job).await;
        }
        let store = self.inner.store.clone();
        let id = job.message_id;
        let message = match tokio::task::spawn_blocking(move || store.get(&id)).await {
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) => {
                debug!("message gone (deleted); nothing to deliver");
                return;
            }
            Ok(Err(err)) => {
                warn!(error = %err, "cannot read the message; retrying later");
                self.retry_soon(&job);
                return;
            }
            Err(_) => return,
        };
        // Only recipients still waiting: an operator may have held or
        // bounced some since the job was scheduled.
        let idxs: Vec<u32> = job
            .recipients
            .iter()
            .copied()
            .filter(|&i| {
                message.recipients.get(i as usize).is_some_and(|r| {
                    matches!(r.state, RecipientState::Queued | RecipientState::Deferred)
                })
            })
            .collect();
        if idxs.is_empty() {
            return;
        }
        let started = now_unix_millis();
        let clock = Instant::now();
        let (route, outcomes) = if self.inner.policy.expired(message.received_at, started) {
            let reply = Reply::new(
                554,
                Enhanced(5, 4, 7),
                "Delivery time expired: the message stayed in the queue too long",
            );
            (Route::default(), vec![failed(reply); idxs.len()])
        } else {
            self.attempt(&message, domain, provider, &idxs).await
        };
        let duration_ms = clock.elapsed().as_millis() as u64;
        self.record(&message, &idxs, outcomes, route, started, duration_ms)
            .await;
    }

    /// One attempt: MX hosts in order, the first that takes the
    /// transaction decides.
    async fn attempt(
        &self,
        message: &StoredMessage,
        domain: &str,
        provider: Option<&str>,
        idxs: &[u32],
    ) -> (Route, Vec<Outcome>) {
        let all = |o: Outcome| vec![o; idxs.len()];
        let chosen = provider.and_then(|id| {
            let found = self.inner.providers.get(id);
            if found.is_none() {
                warn!(
                    provider = id,
                    "the rule's provider is gone; taking the default route"
                );
            }
            found
        });
        let (route_index, relay) = match chosen {
            Some((_, Provider::Webhook { url, secret })) => {
                return self.to_webhook(message, idxs, &url, &secret).await;
            }
            // Pooled connections to a provider's relay are kept apart from
            // the config routes' (indexes past the end of that list).
            Some((slot, Provider::Relay(route))) => {
                (Some(self.inner.routes.len() + slot), Some(route))
            }
            Some((_, Provider::Mx)) => (None, None),
            None => {
                let i = self.inner.routes.iter().position(|r| r.matches(domain));
                (i, i.map(|i| self.inner.routes[i].clone()))
            }
        };
        let (targets, client) = match &relay {
            Some(route) => match relay_targets(route).await {
                Ok(targets) => (targets, self.relay_client(route)),
                Err(reply) => return (Route::default(), all(deferred(reply))),
            },
            None => match self.inner.dns.resolve(domain).await {
                Ok(hosts) => (
                    hosts
                        .into_iter()
                        .flat_map(|h| {
                            let port = self.inner.smtp_port;
                            h.addrs
                                .into_iter()
                                .map(move |ip| (h.name.clone(), SocketAddr::new(ip, port)))
                                .collect::<Vec<_>>()
                        })
                        .collect(),
                    self.inner.client.clone(),
                ),
                Err(err) => {
                    let reply = dns_reply(&err);
                    let outcome = if err.is_permanent() {
                        failed(reply)
                    } else {
                        deferred(reply)
                    };
                    return (Route::default(), all(outcome));
                }
            },
        };
        let recipients: Vec<Recipient> = idxs
            .iter()
            .filter_map(|&i| message.envelope.recipients.get(i as usize).cloned())
            .collect();
        let envelope = OutboundEnvelope {
            reverse_path: message.envelope.reverse_path.as_ref(),
            recipients: &recipients,
            env_id: message.envelope.env_id.as_deref(),
            ret: message.envelope.ret,
            body_type: message.envelope.body_type,
            smtputf8: message.envelope.smtputf8,
        };
        let mut last_error: Option<DeliveryError> = None;
        let mut route = Route::default();
        for (host, addr) in &targets {
            route = Route {
                mx_host: Some(host.clone()),
                ip: Some(addr.ip().to_string()),
                ..Route::default()
            };
            let key: PoolKey = (*addr, route_index);
            let mut held = match self.inner.pool.take(&key).await {
                Some(held) => held,
                None => {
                    // Domains sharing this MX host share its connection limit.
                    let permit = self.inner.pool.permit(addr.ip()).await;
                    match SmtpConnection::connect(*addr, host, &client).await {
                        Ok(conn) => Held { conn, permit },
                        Err(err) => {
                            debug!(%host, %addr, error = %err, "host failed; trying the next");
                            last_error = Some(err);
                            continue;
                        }
                    }
                }
            };
            let conn = &mut held.conn;
            route.tls = conn.tls().map(|t| format!("{} {}", t.version, t.cipher));
            route.dsn_passed = conn.capabilities().dsn();
            let result = conn.send(&envelope, &message.content).await;
            self.inner.pool.put(key, held).await;
            return match result {
                Ok(results) => (route, results.into_iter().map(outcome_of).collect()),
                Err(err) => (route, all(error_outcome(&err))),
            };
        }
        let outcome = match &last_error {
            Some(err) => error_outcome(err),
            None => deferred(Reply::new(
                451,
                Enhanced(4, 4, 4),
                "No MX host address to try",
            )),
        };
        (route, all(outcome))
    }

    async fn record(
        &self,
        message: &StoredMessage,
        idxs: &[u32],
        outcomes: Vec<Outcome>,
        route: Route,
        started: i64,
        duration_ms: u64,
    ) {
        let now = now_unix_millis();
        // One delay for the whole attempt, so recipients deferred together
        // are retried together, in one transaction.
        let previous_attempts = idxs
            .iter()
            .filter_map(|&i| message.recipients.get(i as usize).map(|r| r.attempts))
            .max()
            .unwrap_or(0);
        let retry_at = now + self.inner.policy.delay(previous_attempts + 1).as_millis() as i64;
        let mut updates = Vec::with_capacity(idxs.len());
        let mut retry = Vec::new();
        let mut bounced = Vec::new();
        let mut notices: Vec<(u32, Reply, Action)> = Vec::new();
        let mut events = Vec::new();
        for (&idx, outcome) in idxs.iter().zip(outcomes) {
            let mut state = outcome.state;
            let mut reply = outcome.reply;
            let mut expired = false;
            if state == RecipientState::Deferred
                && self.inner.policy.expired(message.received_at, now)
            {
                expired = true;
                state = RecipientState::Failed;
                reply = Reply::owned(
                    554,
                    Enhanced(5, 4, 7),
                    format!("Delivery time expired; last reply: {}", one_line(&reply)),
                );
            }
            let next = (state == RecipientState::Deferred).then_some(retry_at);
            let text = one_line(&reply);
            match state {
                RecipientState::Delivered => info!(recipient = idx, reply = %text, "delivered"),
                RecipientState::Deferred => info!(recipient = idx, reply = %text, "deferred"),
                _ => warn!(recipient = idx, reply = %text, "failed"),
            }
            if let Some(due) = next {
                retry.push(Entry {
                    message_id: message.id,
                    idx,
                    domain: domain_of(message, idx),
                    due,
                    priority: message.envelope.priority,
                });
            }
            match state {
                RecipientState::Failed => bounced.push((idx, reply.clone())),
                // RFC 3461 §6.2: "relayed" when the next hop cannot carry
                // the request on; if it could, the report is its job.
                RecipientState::Delivered if !route.dsn_passed => {
                    notices.push((idx, reply.clone(), Action::Relayed))
                }
                RecipientState::Deferred if self.delay_warning_due(message, idx, now) => {
                    notices.push((idx, reply.clone(), Action::Delayed))
                }
                _ => {}
            }
            if let Some(account) = &message.meta.account {
                let kind = match state {
                    RecipientState::Delivered => EventKind::Delivered,
                    RecipientState::Deferred => EventKind::Deferred,
                    // A refusal by the recipient's own server is a bounce;
                    // giving up for any other reason is a failure.
                    RecipientState::Failed if !expired && route.ip.is_some() => EventKind::Bounced,
                    _ => EventKind::Failed,
                };
                events.push(MessageEvent {
                    kind,
                    message_id: message.id,
                    account: account.clone(),
                    recipient: message
                        .recipients
                        .get(idx as usize)
                        .map(|r| r.recipient.address.as_str().to_owned()),
                    at: now,
                    reply: Some(text.clone()),
                    mx_host: route.mx_host.clone(),
                });
            }
            updates.push(RecipientUpdate {
                message_id: message.id,
                idx,
                state,
                next_attempt_at: next,
                last_reply: Some(text.clone()),
                attempt: Some(Attempt {
                    at: started,
                    mx_host: route.mx_host.clone(),
                    ip: route.ip.clone(),
                    tls: route.tls.clone(),
                    code: Some(reply.code),
                    reply: text,
                    duration_ms,
                }),
            });
        }
        if let Err(err) = self.inner.store.update_pending(updates).await {
            // Not recorded: the recipients stay as they were in the store
            // and are tried again after a restart; keep them scheduled now.
            warn!(error = %err, "cannot record delivery results");
        } else if let Some(tx) = self.inner.events.get() {
            for event in events {
                if tx.send(event).await.is_err() {
                    break;
                }
            }
        }
        self.inner.scheduler.add(retry);
        if !bounced.is_empty() {
            self.bounce(message, &bounced, &route, now).await;
        }
        if !notices.is_empty() {
            self.notify(message, &notices, &route, now).await;
        }
    }

    /// True when a deferral now crosses the `delay_warning` age: the
    /// previous attempt was before it, this one after, so exactly one
    /// warning goes out per recipient.
    fn delay_warning_due(&self, message: &StoredMessage, idx: u32, now: i64) -> bool {
        let Some(after) = self.inner.delay_warning else {
            return false;
        };
        let threshold = message.received_at + after.as_millis() as i64;
        if now < threshold {
            return false;
        }
        let previous = self.inner.store.attempts(&message.id).ok().and_then(|all| {
            all.iter()
                .filter(|a| a.idx == idx)
                .map(|a| a.attempt.at)
                .max()
        });
        previous.is_none_or(|at| at < threshold)
    }

    /// Success and delay reports, for recipients that asked (NOTIFY).
    async fn notify(
        &self,
        message: &StoredMessage,
        notices: &[(u32, Reply, Action)],
        route: &Route,
        now: i64,
    ) {
        let Some(reverse_path) = &message.envelope.reverse_path else {
            return;
        };
        let will_retry_until =
            (message.received_at + self.inner.policy.max_lifetime.as_millis() as i64) / 1000;
        let recipients: Vec<DsnRecipient> = notices
            .iter()
            .filter_map(|(idx, reply, action)| {
                let r = message.envelope.recipients.get(*idx as usize)?;
                dsn::wants(r.notify, *action).then(|| DsnRecipient {
                    final_recipient: r.address.clone(),
                    original_recipient: r.orcpt.clone(),
                    action: *action,
                    status: dsn::status_from_reply(reply),
                    remote_mta: route.mx_host.clone(),
                    diagnostic: Some(one_line(reply)),
                    last_attempt: Some(now / 1000),
                    will_retry_until: (*action == Action::Delayed).then_some(will_retry_until),
                })
            })
            .collect();
        if recipients.is_empty() {
            return;
        }
        let Some(report) =
            report_message(&self.inner.hostname, message, reverse_path, recipients, now)
        else {
            return;
        };
        let entries = entries_of(&report);
        let id = report.id;
        match self.inner.store.enqueue(report).await {
            Ok(()) => {
                info!(report_id = %id, "delivery status notification queued");
                self.inner.scheduler.add(entries);
            }
            Err(err) => warn!(error = %err, "cannot queue the delivery status notification"),
        }
    }

    /// Sends a DSN for failed recipients to the reverse-path, through the
    /// queue like any other message. Never to the null reverse-path.
    async fn bounce(
        &self,
        message: &StoredMessage,
        failed: &[(u32, Reply)],
        route: &Route,
        now: i64,
    ) {
        let Some(bounce) = bounce_message(
            &self.inner.hostname,
            message,
            failed,
            route.mx_host.clone(),
            now,
        ) else {
            return;
        };
        let entries = entries_of(&bounce);
        let id = bounce.id;
        match self.inner.store.enqueue(bounce).await {
            Ok(()) => {
                info!(bounce_id = %id, "bounce queued");
                self.inner.scheduler.add(entries);
            }
            Err(err) => warn!(error = %err, "cannot queue the bounce"),
        }
    }

    /// Hands recipients to a webhook provider: one signed JSON POST with
    /// the envelope and the message. 2xx delivers; 408, 429, 5xx and
    /// network errors defer; any other answer fails.
    async fn to_webhook(
        &self,
        message: &StoredMessage,
        idxs: &[u32],
        url: &str,
        secret: &str,
    ) -> (Route, Vec<Outcome>) {
        use base64::Engine as _;
        let to: Vec<&str> = idxs
            .iter()
            .filter_map(|&i| message.envelope.recipients.get(i as usize))
            .map(|r| r.address.as_str())
            .collect();
        let body = serde_json::json!({
            "message_id": message.id.to_string(),
            "from": message.envelope.reverse_path.as_ref().map(|a| a.as_str()),
            "to": to,
            "account_id": message.meta.account,
            "tags": message.meta.tags,
            "metadata": message.meta.metadata,
            "raw_base64": base64::engine::general_purpose::STANDARD.encode(&message.content),
        })
        .to_string();
        let signature = crate::http::signature(secret, now_unix_millis() / 1000, &body);
        let host = crate::http::parse_url(url).map(|u| u.host).ok();
        let route = Route {
            mx_host: host,
            ..Route::default()
        };
        let headers = [
            ("X-Mailroom-Signature", signature),
            ("X-Mailroom-Message-Id", message.id.to_string()),
        ];
        let outcome = match crate::http::post_json(url, &body, &headers, WEBHOOK_TIMEOUT).await {
            Ok(status) if (200..300).contains(&status) => Outcome {
                state: RecipientState::Delivered,
                reply: Reply::owned(
                    250,
                    Enhanced(2, 0, 0),
                    format!("Accepted by the webhook (HTTP {status})"),
                ),
            },
            Ok(status) if status == 408 || status == 429 || status >= 500 => {
                deferred(Reply::owned(
                    451,
                    Enhanced(4, 4, 1),
                    format!("The webhook answered HTTP {status}"),
                ))
            }
            Ok(status) => failed(Reply::owned(
                554,
                Enhanced(5, 0, 0),
                format!("The webhook refused the message (HTTP {status})"),
            )),
            Err(e) => deferred(Reply::owned(
                451,
                Enhanced(4, 4, 1),
                format!("The webhook could not be reached: {e}"),
            )),
        };
        (route, vec![outcome; idxs.len()])
    }

    /// Schedules what a message still has to deliver, as the store says
    /// now: after an operator's retry or release from another process.
    pub fn reschedule(&self, id: &MessageId) -> Result<usize, StoreError> {
        let Some(message) = self.inner.store.get(id)? else {
            return Ok(0);
        };
        let now = now_unix_millis();
        let entries: Vec<Entry> = message
            .recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r.state, RecipientState::Queued | RecipientState::Deferred))
            .map(|(idx, r)| Entry {
                message_id: message.id,
                idx: idx as u32,
                domain: destination(
                    &r.recipient.address.domain().to_ascii_lowercase(),
                    r.route.as_deref(),
                ),
                due: r.next_attempt_at.unwrap_or(now),
                priority: message.envelope.priority,
            })
            .collect();
        let n = entries.len();
        self.inner.scheduler.add(entries);
        Ok(n)
    }

    /// Mail for a local domain is kept here, readable from the store: that
    /// is its delivery. No need to read the message for it.
    async fn keep_locally(&self, job: Job) {
        let updates = job
            .recipients
            .iter()
            .map(|&idx| RecipientUpdate {
                message_id: job.message_id,
                idx,
                state: RecipientState::Delivered,
                next_attempt_at: None,
                last_reply: Some("250 2.0.0 Kept in the local mailbox".into()),
                attempt: None,
            })
            .collect();
        if let Err(err) = self.inner.store.update_pending(updates).await {
            warn!(error = %err, "cannot record local delivery");
        }
    }

    fn relay_client(&self, route: &RouteConfig) -> ClientOptions {
        let mut client = self.inner.client.clone();
        client.tls = route.tls;
        client.credentials = route.username.clone().zip(route.password.clone());
        client
    }

    fn retry_soon(&self, job: &Job) {
        let due = now_unix_millis() + self.inner.policy.initial.as_millis() as i64;
        self.inner
            .scheduler
            .add(job.recipients.iter().map(|&idx| Entry {
                message_id: job.message_id,
                idx,
                domain: job.domain.clone(),
                due,
                priority: job.priority,
            }));
    }
}

/// Aborts the task when dropped, so a helper task ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The addresses of a route's relay host (an IP literal, or a name looked
/// up with the system resolver).
async fn relay_targets(route: &RouteConfig) -> Result<Vec<(String, SocketAddr)>, Reply> {
    let Some((host, port)) = route.relay_host_port() else {
        return Err(Reply::owned(
            451,
            Enhanced(4, 3, 5),
            format!("Relay {:?} is not host:port", route.relay),
        ));
    };
    match tokio::net::lookup_host((host, port)).await {
        Ok(addrs) => {
            let targets: Vec<(String, SocketAddr)> = addrs.map(|a| (host.to_owned(), a)).collect();
            if targets.is_empty() {
                Err(Reply::owned(
                    451,
                    Enhanced(4, 4, 3),
                    format!("Relay host {host} has no address"),
                ))
            } else {
                Ok(targets)
            }
        }
        Err(err) => Err(Reply::owned(
            451,
            Enhanced(4, 4, 3),
            format!("Cannot resolve relay host {host}: {err}"),
        )),
    }
}

/// The DSN (RFC 3464) telling `message`'s sender that `failed` recipients
/// could not be delivered, as a message ready to queue; `None` when there
/// is nobody to tell (null reverse-path, or NOTIFY says no).
pub fn bounce_message(
    hostname: &str,
    message: &StoredMessage,
    failed: &[(u32, Reply)],
    remote_mta: Option<String>,
    now: i64,
) -> Option<NewMessage> {
    let reverse_path = message.envelope.reverse_path.as_ref()?;
    let recipients: Vec<DsnRecipient> = failed
        .iter()
        .filter_map(|(idx, reply)| {
            let r = message.envelope.recipients.get(*idx as usize)?;
            dsn::wants(r.notify, Action::Failed).then(|| DsnRecipient {
                final_recipient: r.address.clone(),
                original_recipient: r.orcpt.clone(),
                action: Action::Failed,
                status: dsn::status_from_reply(reply),
                remote_mta: remote_mta.clone(),
                diagnostic: Some(one_line(reply)),
                last_attempt: Some(now / 1000),
                will_retry_until: None,
            })
        })
        .collect();
    report_message(hostname, message, reverse_path, recipients, now)
}

/// A DSN about `recipients` of `message`, addressed to `reverse_path`.
fn report_message(
    hostname: &str,
    message: &StoredMessage,
    reverse_path: &mailroom_core::Address,
    recipients: Vec<DsnRecipient>,
    now: i64,
) -> Option<NewMessage> {
    if recipients.is_empty() {
        return None;
    }
    let postmaster = format!("MAILER-DAEMON@{hostname}");
    let content = dsn::build(&DsnRequest {
        reporting_mta: hostname,
        postmaster: &postmaster,
        recipient: reverse_path,
        original_envelope_id: message.envelope.env_id.as_deref(),
        arrival_date: message.received_at / 1000,
        ret: message.envelope.ret,
        original_content: &message.content,
        original_message_id: None,
        recipients,
        message_id_domain: hostname,
    });
    let body_type = if content.is_ascii() {
        mailroom_core::BodyType::SevenBit
    } else {
        mailroom_core::BodyType::EightBitMime
    };
    Some(NewMessage {
        id: MessageId::new(),
        received_at: now,
        envelope: Envelope {
            reverse_path: None,
            recipients: vec![Recipient {
                address: reverse_path.clone(),
                orcpt: None,
                notify: mailroom_core::Notify::NEVER,
            }],
            env_id: None,
            ret: None,
            body_type,
            smtputf8: !reverse_path.is_ascii(),
            priority: 0,
        },
        origin: Origin {
            protocol: "dsn".into(),
            remote_ip: None,
            helo: None,
            auth_user: None,
            tls: None,
        },
        content,
        kept_locally: Vec::new(),
        meta: Default::default(),
    })
}

/// Scheduler entries for a message's recipients still to deliver, due now.
pub fn entries_of(message: &NewMessage) -> Vec<Entry> {
    message
        .envelope
        .recipients
        .iter()
        .enumerate()
        .filter(|(idx, _)| !message.kept_locally.contains(&(*idx as u32)))
        .map(|(idx, r)| Entry {
            message_id: message.id,
            idx: idx as u32,
            domain: destination(
                &r.address.domain().to_ascii_lowercase(),
                message.meta.routes.get(&(idx as u32)).map(String::as_str),
            ),
            due: message
                .meta
                .not_before
                .map_or(message.received_at, |t| t.max(message.received_at)),
            priority: message.envelope.priority,
        })
        .collect()
}

/// The scheduler destination of a stored recipient (domain and route).
fn domain_of(message: &StoredMessage, idx: u32) -> String {
    let domain = message
        .envelope
        .recipients
        .get(idx as usize)
        .map(|r: &Recipient| r.address.domain().to_ascii_lowercase())
        .unwrap_or_default();
    let route = message
        .recipients
        .get(idx as usize)
        .and_then(|r| r.route.as_deref());
    destination(&domain, route)
}

fn failed(reply: Reply) -> Outcome {
    Outcome {
        state: RecipientState::Failed,
        reply,
    }
}

fn deferred(reply: Reply) -> Outcome {
    Outcome {
        state: RecipientState::Deferred,
        reply,
    }
}

fn outcome_of(result: RecipientOutcome) -> Outcome {
    match result {
        RecipientOutcome::Delivered(reply) => Outcome {
            state: RecipientState::Delivered,
            reply,
        },
        RecipientOutcome::Deferred(reply) => deferred(reply),
        RecipientOutcome::Failed(reply) => failed(reply),
    }
}

fn error_outcome(err: &DeliveryError) -> Outcome {
    // Without a server reply (a refused connection, a policy refusal made
    // here), keep the precise enhanced code the client chose.
    let reply = err.reply().cloned().unwrap_or_else(|| {
        let code = if err.is_permanent() { 554 } else { 451 };
        Reply::owned(code, err.enhanced(), err.message().to_owned())
    });
    if err.is_permanent() {
        failed(reply)
    } else {
        deferred(reply)
    }
}

fn dns_reply(err: &DnsError) -> Reply {
    match err {
        DnsError::NullMx { domain } => Reply::owned(
            556,
            Enhanced(5, 1, 10),
            format!("Domain {domain} does not accept mail (null MX)"),
        ),
        DnsError::NoSuchDomain { domain } => Reply::owned(
            550,
            Enhanced(5, 1, 2),
            format!("Domain {domain} does not exist"),
        ),
        DnsError::NoMailHosts { domain } => Reply::owned(
            550,
            Enhanced(5, 1, 2),
            format!("Domain {domain} has no mail hosts"),
        ),
        DnsError::Temporary { domain, reason } => Reply::owned(
            451,
            Enhanced(4, 4, 3),
            format!("DNS lookup for {domain} failed: {reason}"),
        ),
    }
}

/// A reply on one line, as stored and shown to operators.
pub fn one_line(reply: &Reply) -> String {
    reply.to_string().replace("\r\n", " ").trim_end().to_owned()
}
