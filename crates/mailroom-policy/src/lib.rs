//! Per-account rate limits, shared by every front door so an account's
//! SMTP and HTTP traffic count against the same allowance.
//!
//! Each limit is a token bucket: `messages_per_minute` holds that many
//! tokens and refills one every `60 s / limit`; `recipients_per_day` holds
//! that many and refills over a day. A bucket starts full, so a quiet
//! account may burst up to its whole allowance. A refused request consumes
//! nothing, and the refusal says how long until it would fit.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// An account's limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountLimits {
    pub messages_per_minute: Option<u32>,
    pub recipients_per_day: Option<u32>,
}

/// Which limit a request ran into, and when it would fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many messages this minute.
    Messages { retry_after: Duration },
    /// Too many recipients today; `retry_after` is `None` when the request
    /// alone exceeds the whole daily allowance.
    Recipients { retry_after: Option<Duration> },
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(capacity: u32, now: Instant) -> Self {
        Bucket {
            tokens: f64::from(capacity),
            at: now,
        }
    }

    /// Tokens available at `now`, refilling `capacity` per `period`.
    fn level(&self, capacity: u32, period: Duration, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        let rate = f64::from(capacity) / period.as_secs_f64();
        (self.tokens + elapsed * rate).min(f64::from(capacity))
    }

    /// How long until `need` tokens are there.
    fn wait(level: f64, need: f64, capacity: u32, period: Duration) -> Duration {
        let rate = f64::from(capacity) / period.as_secs_f64();
        Duration::from_secs_f64(((need - level) / rate).max(0.0))
    }
}

#[derive(Debug)]
struct Buckets {
    messages: Option<Bucket>,
    recipients: Option<Bucket>,
}

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

/// Rate limits for every account, in memory.
#[derive(Debug, Default)]
pub struct RateLimiter {
    accounts: Mutex<HashMap<String, Buckets>>,
}

impl RateLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `messages` messages and `recipients` recipients from
    /// `account`'s allowance, or says which limit refuses it (taking
    /// nothing). HTTP takes a message and its recipients at once; SMTP takes
    /// the message at MAIL and each recipient at RCPT.
    pub fn take(
        &self,
        account: &str,
        limits: AccountLimits,
        messages: u32,
        recipients: u32,
        now: Instant,
    ) -> Result<(), Refusal> {
        if limits == AccountLimits::default() {
            return Ok(());
        }
        let mut accounts = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        let buckets = accounts
            .entry(account.to_owned())
            .or_insert_with(|| Buckets {
                messages: None,
                recipients: None,
            });
        let messages_level = limits.messages_per_minute.map(|cap| {
            let bucket = *buckets
                .messages
                .get_or_insert_with(|| Bucket::full(cap, now));
            (cap, bucket.level(cap, MINUTE, now))
        });
        let rcpts = limits.recipients_per_day.map(|cap| {
            let bucket = *buckets
                .recipients
                .get_or_insert_with(|| Bucket::full(cap, now));
            (cap, bucket.level(cap, DAY, now))
        });
        let wanted = f64::from(messages);
        if let Some((cap, level)) = messages_level
            && level < wanted
        {
            return Err(Refusal::Messages {
                retry_after: Bucket::wait(level, wanted, cap, MINUTE),
            });
        }
        if let Some((cap, level)) = rcpts {
            let need = f64::from(recipients);
            if need > f64::from(cap) {
                return Err(Refusal::Recipients { retry_after: None });
            }
            if level < need {
                return Err(Refusal::Recipients {
                    retry_after: Some(Bucket::wait(level, need, cap, DAY)),
                });
            }
        }
        if let Some((_, level)) = messages_level {
            buckets.messages = Some(Bucket {
                tokens: level - wanted,
                at: now,
            });
        }
        if let Some((_, level)) = rcpts {
            buckets.recipients = Some(Bucket {
                tokens: level - f64::from(recipients),
                at: now,
            });
        }
        Ok(())
    }

    /// Forgets an account's buckets (its limits changed or it was deleted).
    pub fn reset(&self, account: &str) {
        self.accounts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(account);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_per_minute_bursts_then_refills() {
        let r = RateLimiter::new();
        let limits = AccountLimits {
            messages_per_minute: Some(3),
            recipients_per_day: None,
        };
        let t = Instant::now();
        for _ in 0..3 {
            r.take("a", limits, 1, 1, t).unwrap();
        }
        let Err(Refusal::Messages { retry_after }) = r.take("a", limits, 1, 1, t) else {
            panic!("the fourth message should be refused");
        };
        assert!(retry_after > Duration::from_secs(19) && retry_after <= Duration::from_secs(20));
        // Another account is not affected.
        r.take("b", limits, 1, 1, t).unwrap();
        // One refills every 20 s.
        r.take("a", limits, 1, 1, t + Duration::from_secs(20))
            .unwrap();
        assert!(
            r.take("a", limits, 1, 1, t + Duration::from_secs(21))
                .is_err()
        );
    }

    #[test]
    fn recipients_per_day_counts_recipients_and_refuses_without_taking() {
        let r = RateLimiter::new();
        let limits = AccountLimits {
            messages_per_minute: Some(100),
            recipients_per_day: Some(10),
        };
        let t = Instant::now();
        r.take("a", limits, 1, 8, t).unwrap();
        assert!(matches!(
            r.take("a", limits, 1, 3, t),
            Err(Refusal::Recipients {
                retry_after: Some(_)
            })
        ));
        // The refusal took nothing: two recipients still fit.
        r.take("a", limits, 1, 2, t).unwrap();
        assert_eq!(
            r.take("a", limits, 1, 11, t),
            Err(Refusal::Recipients { retry_after: None })
        );
    }

    #[test]
    fn no_limits_means_no_bookkeeping() {
        let r = RateLimiter::new();
        for _ in 0..1000 {
            r.take("a", AccountLimits::default(), 1, 1000, Instant::now())
                .unwrap();
        }
        assert!(r.accounts.lock().unwrap().is_empty());
    }
}
