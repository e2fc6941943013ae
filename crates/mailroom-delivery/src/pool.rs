//! Idle SMTP connections kept for the next message to the same host.
//!
//! Connections are keyed by the address they reach and the route they were
//! opened for (a relay's credentials differ from MX delivery), so domains
//! that share MX hosts share connections. A connection goes back to the
//! pool after a transaction while it is usable and has carried fewer than
//! `max_messages` transactions; it is checked with RSET when taken, and
//! closed with QUIT after `idle_timeout` unused.
//!
//! Every connection, busy or idle, holds a permit of its host's semaphore,
//! so at most `per_host` connections reach one MX host however many domains
//! share it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::connection::SmtpConnection;

/// Where a pooled connection goes: the peer, and which route opened it
/// (`None` for MX delivery, else the index of the configured route).
pub type PoolKey = (SocketAddr, Option<usize>);

/// A connection with its share of its host's connection limit.
pub struct Held {
    pub conn: SmtpConnection,
    pub permit: OwnedSemaphorePermit,
}

type Idle = HashMap<PoolKey, Vec<(Held, Instant)>>;

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    idle: Mutex<Idle>,
    idle_timeout: Duration,
    max_messages: u32,
    /// Connections allowed per host address.
    per_host: usize,
    hosts: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
}

impl Pool {
    pub fn new(idle_timeout: Duration, max_messages: u32, per_host: usize) -> Self {
        Pool {
            inner: Arc::new(Inner {
                idle: Mutex::new(HashMap::new()),
                idle_timeout,
                max_messages: max_messages.max(1),
                per_host: per_host.max(1),
                hosts: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A permit to open one more connection to `ip`: at once if the host is
    /// below its limit, else after closing an idle connection to it, else
    /// once a busy one is done.
    pub async fn permit(&self, ip: IpAddr) -> OwnedSemaphorePermit {
        let semaphore = {
            let mut hosts = self
                .inner
                .hosts
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if hosts.len() > 10_000 {
                // Forget hosts nobody holds a connection to.
                let per_host = self.inner.per_host;
                hosts.retain(|_, s| s.available_permits() < per_host);
            }
            hosts
                .entry(ip)
                .or_insert_with(|| Arc::new(Semaphore::new(self.inner.per_host)))
                .clone()
        };
        loop {
            if let Ok(permit) = semaphore.clone().try_acquire_owned() {
                return permit;
            }
            // An idle connection holds a permit too: close one to make room.
            if self.evict_one(ip).await {
                continue;
            }
            // Every permit is on a busy connection. Wait for one to be
            // released, but look again now and then: a connection that
            // goes idle keeps its permit until evicted.
            tokio::select! {
                permit = semaphore.clone().acquire_owned() => {
                    if let Ok(permit) = permit {
                        return permit;
                    }
                }
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    /// Closes one idle connection to `ip`; false if there was none.
    async fn evict_one(&self, ip: IpAddr) -> bool {
        let victim = {
            let mut idle = self.idle();
            let key = idle.keys().find(|(addr, _)| addr.ip() == ip).copied();
            key.and_then(|key| {
                let list = idle.get_mut(&key)?;
                let found = list.pop().map(|(held, _)| held);
                if list.is_empty() {
                    idle.remove(&key);
                }
                found
            })
        };
        match victim {
            Some(held) => {
                held.conn.quit().await;
                true
            }
            None => false,
        }
    }

    /// An idle connection to `key` that is still live (it answered RSET).
    pub async fn take(&self, key: &PoolKey) -> Option<Held> {
        loop {
            let candidate = {
                let mut idle = self.idle();
                let list = idle.get_mut(key)?;
                let found = list.pop();
                if list.is_empty() {
                    idle.remove(key);
                }
                found
            };
            let (mut held, since) = candidate?;
            if since.elapsed() > self.inner.idle_timeout {
                tokio::spawn(held.conn.quit());
                continue;
            }
            if held.conn.reset().await.is_ok() && held.conn.is_usable() {
                return Some(held);
            }
        }
    }

    /// Keeps the connection for reuse, or closes it when it has done its
    /// share (its permit goes with it).
    pub async fn put(&self, key: PoolKey, held: Held) {
        if !held.conn.is_usable() || held.conn.transactions() >= self.inner.max_messages {
            held.conn.quit().await;
            return;
        }
        self.idle()
            .entry(key)
            .or_default()
            .push((held, Instant::now()));
    }

    /// Connections now idle.
    pub fn len(&self) -> usize {
        self.idle().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes connections idle longer than the timeout; run periodically.
    pub async fn reap(&self) {
        let expired: Vec<Held> = {
            let mut idle = self.idle();
            let timeout = self.inner.idle_timeout;
            let mut expired = Vec::new();
            idle.retain(|_, list| {
                let (old, fresh): (Vec<_>, Vec<_>) = list
                    .drain(..)
                    .partition(|(_, since)| since.elapsed() > timeout);
                expired.extend(old.into_iter().map(|(held, _)| held));
                *list = fresh;
                !list.is_empty()
            });
            expired
        };
        for held in expired {
            held.conn.quit().await;
        }
    }

    /// Closes every idle connection (at shutdown).
    pub async fn close_all(&self) {
        let all: Vec<Held> = self
            .idle()
            .drain()
            .flat_map(|(_, list)| list.into_iter().map(|(held, _)| held))
            .collect();
        for held in all {
            held.conn.quit().await;
        }
    }
}
