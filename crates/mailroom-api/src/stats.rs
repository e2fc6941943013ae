//! `GET /api/v1/stats`: queue depth by state and recent activity.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use mailroom_core::time::now_unix_millis;
use mailroom_store::AccountStats;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::messages::blocking;
use crate::state::AppState;

/// Counts over the last minute, hour and day.
#[derive(Debug, Default, Clone, Copy, Serialize, ToSchema)]
pub struct Windows {
    #[serde(rename = "1m")]
    pub minute: u64,
    #[serde(rename = "1h")]
    pub hour: u64,
    #[serde(rename = "24h")]
    pub day: u64,
}

impl Windows {
    fn from(counts: [u64; 3]) -> Self {
        Windows {
            minute: counts[0],
            hour: counts[1],
            day: counts[2],
        }
    }

    fn add(&mut self, other: Windows) {
        self.minute += other.minute;
        self.hour += other.hour;
        self.day += other.day;
    }
}

#[derive(Debug, Default, Clone, Serialize, ToSchema)]
pub struct Stats {
    /// Recipients by state: queued, deferred, held, delivered, failed.
    pub queue: BTreeMap<String, u64>,
    /// Messages accepted.
    pub accepted: Windows,
    /// Delivery attempts that delivered.
    pub delivered: Windows,
    /// Delivery attempts that were deferred (a temporary failure).
    pub deferred: Windows,
    /// Delivery attempts that failed for good (a bounce).
    pub bounced: Windows,
}

impl Stats {
    fn add(&mut self, row: &AccountStats) {
        for (state, n) in &row.queue {
            *self.queue.entry(state.clone()).or_default() += n;
        }
        self.accepted.add(Windows::from(row.accepted));
        let outcome =
            |name: &str| Windows::from(row.outcomes.get(name).copied().unwrap_or_default());
        self.delivered.add(outcome("delivered"));
        self.deferred.add(outcome("deferred"));
        self.bounced.add(outcome("failed"));
    }

    fn with_every_state(mut self) -> Self {
        for state in mailroom_store::RecipientState::ALL {
            self.queue.entry(state.as_str().to_owned()).or_default();
        }
        self
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatsView {
    #[serde(flatten)]
    pub totals: Stats,
    /// Admin only: the same per account id (`none` for mail without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accounts: Option<BTreeMap<String, Stats>>,
}

/// Queue depth and activity
///
/// An account's key sees its own mail; the admin sees every account's,
/// with a breakdown per account.
#[utoipa::path(
    get, path = "/api/v1/stats", tag = "messages",
    responses(
        (status = 200, description = "Counts", body = StatsView),
    ),
    security(("bearer" = []))
)]
pub async fn stats(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<StatsView>, ApiError> {
    let store = state.store.clone();
    let rows = blocking(move || store.stats(now_unix_millis())).await?;
    let mut totals = Stats::default();
    let mut accounts = BTreeMap::new();
    for row in rows
        .iter()
        .filter(|r| principal.can_see(r.account.as_deref()))
    {
        totals.add(row);
        let name = row.account.clone().unwrap_or_else(|| "none".into());
        accounts.entry(name).or_insert_with(Stats::default).add(row);
    }
    Ok(Json(StatsView {
        totals: totals.with_every_state(),
        accounts: matches!(principal, Principal::Admin).then(|| {
            accounts
                .into_iter()
                .map(|(k, v)| (k, v.with_every_state()))
                .collect()
        }),
    }))
}
