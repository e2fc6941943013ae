//! When to try a deferred recipient again, and when to give up.
//!
//! Exponential backoff from `initial`, doubling, capped at `max`, with
//! ±20 % jitter so a destination that comes back is not hit by every
//! deferred message in the same second. Past `max_lifetime` since arrival a
//! recipient is bounced instead (DESIGN.md: 1 min, ×2, 1 h cap, 5 days).

use std::time::Duration;

use mailroom_core::config::DeliveryConfig;
use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub max_lifetime: Duration,
}

impl From<&DeliveryConfig> for RetryPolicy {
    fn from(c: &DeliveryConfig) -> Self {
        RetryPolicy {
            initial: c.retry_initial,
            max: c.retry_max,
            max_lifetime: c.max_lifetime,
        }
    }
}

impl RetryPolicy {
    /// The delay before the next attempt, after `attempts` have failed.
    pub fn delay(&self, attempts: u32) -> Duration {
        let base = self.delay_without_jitter(attempts);
        let factor = rand::thread_rng().gen_range(0.8..1.2);
        base.mul_f64(factor).min(self.max.mul_f64(1.2))
    }

    fn delay_without_jitter(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(30);
        self.initial
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// True once a message that arrived at `received_at` (unix ms) has been
    /// in the queue longer than `max_lifetime` at `now`.
    pub fn expired(&self, received_at: i64, now: i64) -> bool {
        let age = now.saturating_sub(received_at).max(0) as u128;
        age > self.max_lifetime.as_millis()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(60),
            max: Duration::from_secs(3600),
            max_lifetime: Duration::from_secs(5 * 86_400),
        }
    }

    #[test]
    fn doubles_then_caps() {
        let p = policy();
        let secs: Vec<u64> = (1..=9)
            .map(|a| p.delay_without_jitter(a).as_secs())
            .collect();
        assert_eq!(secs, [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]);
        assert_eq!(p.delay_without_jitter(1000).as_secs(), 3600);
        for a in 1..20 {
            let d = p.delay(a).as_secs_f64();
            let base = p.delay_without_jitter(a).as_secs_f64();
            assert!(
                d >= base * 0.8 - 0.001 && d <= base * 1.2 + 0.001,
                "{a}: {d}"
            );
        }
    }

    #[test]
    fn expiry() {
        let p = policy();
        assert!(!p.expired(0, 5 * 86_400_000));
        assert!(p.expired(0, 5 * 86_400_000 + 1));
    }
}
