//! What is due, for which destination, in which order.
//!
//! The scheduler keeps every recipient still to deliver in memory, grouped
//! into jobs (one message, one destination domain, at most
//! [`MAX_RECIPIENTS_PER_JOB`] recipients) and queued per destination. It is
//! loaded from the store once at start and fed by new mail and by deferred
//! results; it never polls the database. A destination is handed out only
//! while it has fewer jobs in flight than its connection limit, so one slow
//! or huge destination cannot starve the others. Within a destination, jobs
//! that are due go out highest priority first, then oldest first.
//!
//! The structure is plain data behind one mutex; [`Scheduler::next`] waits
//! on a [`Notify`] and a timer for the earliest due time, so an idle queue
//! costs nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mailroom_core::MessageId;
use mailroom_core::time::now_unix_millis;
use tokio::sync::Notify;

/// RFC 5321 §4.5.3.1.8 asks servers to take at least 100 recipients; 50 per
/// transaction keeps one slow recipient list from holding a connection long.
pub const MAX_RECIPIENTS_PER_JOB: usize = 50;

/// Recipients of one message for one destination, delivered in one
/// transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub message_id: MessageId,
    pub domain: String,
    pub recipients: Vec<u32>,
    /// MT-PRIORITY, -9 (lowest) to 9.
    pub priority: i8,
    /// Per recipient, the schedule generation this job was made for; a
    /// recipient scheduled again since (an operator's retry) is dropped
    /// from the older job when it comes due.
    generations: Vec<u64>,
}

/// A recipient to schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub message_id: MessageId,
    pub idx: u32,
    /// Lowercased recipient domain.
    pub domain: String,
    /// Unix milliseconds.
    pub due: i64,
    pub priority: i8,
}

#[derive(Default)]
struct Destination {
    /// Due jobs by (priority rank, sequence): highest priority, then FIFO.
    ready: BTreeMap<(u8, u64), Job>,
    /// Not yet due, by (due time, sequence).
    later: BTreeMap<(i64, u64), Job>,
    /// Jobs handed out and not yet finished.
    active: usize,
    /// With a message rate: no job before this time (unix ms).
    not_before: i64,
}

impl Destination {
    fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.later.is_empty()
    }

    /// When this destination next has work: now if anything is ready
    /// (and its rate allows).
    fn next_due(&self) -> Option<i64> {
        let due = if !self.ready.is_empty() {
            Some(i64::MIN)
        } else {
            self.later.keys().next().map(|(due, _)| *due)
        };
        due.map(|d| d.max(self.not_before))
    }

    fn promote(&mut self, now: i64) {
        while let Some(entry) = self.later.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, seq), job) = entry.remove_entry();
            self.ready.insert((rank(job.priority), seq), job);
        }
    }
}

fn rank(priority: i8) -> u8 {
    (9 - i16::from(priority.clamp(-9, 9))) as u8
}

struct State {
    destinations: HashMap<String, Destination>,
    /// The current schedule generation of every recipient waiting in a job.
    generation: HashMap<(MessageId, u32), u64>,
    /// (next due, domain) for every destination below its connection limit
    /// that has work; `i64::MIN` means ready now.
    timers: BTreeSet<(i64, String)>,
    seq: u64,
    connection_limit: usize,
    /// Milliseconds between two jobs for one destination; 0: no limit.
    spacing_ms: i64,
    queued_jobs: usize,
}

impl State {
    fn reindex(&mut self, domain: &str, old: Option<i64>) {
        if let Some(old) = old {
            self.timers.remove(&(old, domain.to_owned()));
        }
        let Some(dest) = self.destinations.get(domain) else {
            return;
        };
        if dest.active < self.connection_limit
            && let Some(due) = dest.next_due()
        {
            self.timers.insert((due, domain.to_owned()));
        }
        if dest.is_empty() && dest.active == 0 {
            self.destinations.remove(domain);
        }
    }

    fn timer_of(&self, domain: &str) -> Option<i64> {
        let dest = self.destinations.get(domain)?;
        if dest.active < self.connection_limit {
            dest.next_due()
        } else {
            None
        }
    }

    fn insert(&mut self, job: Job, due: i64, now: i64) {
        let domain = job.domain.clone();
        let old = self.timer_of(&domain);
        self.seq += 1;
        let seq = self.seq;
        let dest = self.destinations.entry(domain.clone()).or_default();
        if due <= now {
            dest.ready.insert((rank(job.priority), seq), job);
        } else {
            dest.later.insert((due, seq), job);
        }
        self.queued_jobs += 1;
        self.reindex(&domain, old);
    }

    fn take(&mut self, now: i64) -> Result<Job, Option<i64>> {
        loop {
            let Some((due, domain)) = self.timers.first().cloned() else {
                return Err(None);
            };
            if due > now {
                return Err(Some(due));
            }
            let Some(dest) = self.destinations.get_mut(&domain) else {
                self.timers.remove(&(due, domain));
                continue;
            };
            dest.promote(now);
            let Some((_, mut job)) = dest.ready.pop_first() else {
                // Its due time came but promote found nothing: re-file it.
                self.reindex(&domain, Some(due));
                continue;
            };
            self.queued_jobs -= 1;
            // Drop recipients scheduled again by a newer job.
            let mut keep = Vec::with_capacity(job.recipients.len());
            for (&idx, &generation) in job.recipients.iter().zip(&job.generations) {
                let key = (job.message_id, idx);
                if self.generation.get(&key) == Some(&generation) {
                    self.generation.remove(&key);
                    keep.push(idx);
                }
            }
            if keep.is_empty() {
                self.reindex(&domain, Some(due));
                continue;
            }
            job.recipients = keep;
            job.generations.clear();
            let spacing = self.spacing_ms;
            if let Some(dest) = self.destinations.get_mut(&domain) {
                dest.active += 1;
                if spacing > 0 {
                    dest.not_before = now.max(dest.not_before) + spacing;
                }
            }
            self.reindex(&domain, Some(due));
            return Ok(job);
        }
    }
}

/// The in-memory delivery queue. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
}

impl Scheduler {
    /// `connection_limit`: jobs in flight per destination domain.
    pub fn new(connection_limit: usize) -> Self {
        Self::with_rate(connection_limit, 0.0)
    }

    /// As [`new`](Self::new), and at most `rate` jobs per second start for
    /// one destination (0: no limit).
    pub fn with_rate(connection_limit: usize, rate: f64) -> Self {
        let spacing_ms = if rate > 0.0 {
            (1000.0 / rate).ceil() as i64
        } else {
            0
        };
        Scheduler {
            state: Arc::new(Mutex::new(State {
                destinations: HashMap::new(),
                generation: HashMap::new(),
                timers: BTreeSet::new(),
                seq: 0,
                connection_limit: connection_limit.max(1),
                spacing_ms,
                queued_jobs: 0,
            })),
            wake: Arc::new(Notify::new()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Schedules recipients: those of one message and domain with the same
    /// due time become one job (split at [`MAX_RECIPIENTS_PER_JOB`]).
    pub fn add(&self, entries: impl IntoIterator<Item = Entry>) {
        let mut groups: BTreeMap<(MessageId, String, i64), (i8, Vec<u32>)> = BTreeMap::new();
        for e in entries {
            groups
                .entry((e.message_id, e.domain, e.due))
                .or_insert_with(|| (e.priority, Vec::new()))
                .1
                .push(e.idx);
        }
        if groups.is_empty() {
            return;
        }
        let now = now_unix_millis();
        let mut state = self.state();
        for ((message_id, domain, due), (priority, mut idxs)) in groups {
            idxs.sort_unstable();
            idxs.dedup();
            for chunk in idxs.chunks(MAX_RECIPIENTS_PER_JOB) {
                let generations = chunk
                    .iter()
                    .map(|&idx| {
                        state.seq += 1;
                        let generation = state.seq;
                        state.generation.insert((message_id, idx), generation);
                        generation
                    })
                    .collect();
                let job = Job {
                    message_id,
                    domain: domain.clone(),
                    recipients: chunk.to_vec(),
                    priority,
                    generations,
                };
                state.insert(job, due, now);
            }
        }
        drop(state);
        self.wake.notify_one();
    }

    /// A job handed out by [`next`](Self::next) is finished: its
    /// destination may get another.
    pub fn done(&self, domain: &str) {
        let mut state = self.state();
        let old = state.timer_of(domain);
        if let Some(dest) = state.destinations.get_mut(domain) {
            dest.active = dest.active.saturating_sub(1);
        }
        state.reindex(domain, old);
        drop(state);
        self.wake.notify_one();
    }

    /// A job that is due now, if any; else when to look again.
    pub fn try_next(&self) -> Result<Job, Option<i64>> {
        self.state().take(now_unix_millis())
    }

    /// Waits for the next due job. Call [`done`](Self::done) when it is
    /// finished.
    pub async fn next(&self) -> Job {
        loop {
            let notified = self.wake.notified();
            match self.try_next() {
                Ok(job) => return job,
                Err(None) => notified.await,
                Err(Some(due)) => {
                    let wait = (due - now_unix_millis()).clamp(1, 60_000) as u64;
                    let _ = tokio::time::timeout(Duration::from_millis(wait), notified).await;
                }
            }
        }
    }

    /// Jobs waiting (not in flight).
    pub fn queued(&self) -> usize {
        self.state().queued_jobs
    }

    /// Jobs in flight.
    pub fn active(&self) -> usize {
        self.state().destinations.values().map(|d| d.active).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: MessageId, idx: u32, domain: &str, due: i64, priority: i8) -> Entry {
        Entry {
            message_id: id,
            idx,
            domain: domain.into(),
            due,
            priority,
        }
    }

    #[test]
    fn groups_recipients_per_message_and_domain() {
        let s = Scheduler::new(10);
        let id = MessageId::new();
        let mut entries: Vec<Entry> = (0..120).map(|i| entry(id, i, "a.test", 0, 0)).collect();
        entries.push(entry(id, 200, "b.test", 0, 0));
        s.add(entries);
        let mut jobs = Vec::new();
        while let Ok(job) = s.try_next() {
            jobs.push(job);
        }
        let sizes: Vec<(String, usize)> = jobs
            .iter()
            .map(|j| (j.domain.clone(), j.recipients.len()))
            .collect();
        assert_eq!(sizes.iter().filter(|(d, _)| d == "a.test").count(), 3);
        assert!(sizes.contains(&("a.test".into(), 50)));
        assert!(sizes.contains(&("a.test".into(), 20)));
        assert!(sizes.contains(&("b.test".into(), 1)));
    }

    #[test]
    fn connection_limit_per_destination() {
        let s = Scheduler::new(2);
        for _ in 0..5 {
            s.add([entry(MessageId::new(), 0, "slow.test", 0, 0)]);
        }
        s.add([entry(MessageId::new(), 0, "fast.test", 0, 0)]);
        let a = s.try_next().unwrap();
        let b = s.try_next().unwrap();
        let c = s.try_next().unwrap();
        let domains = [a.domain, b.domain, c.domain];
        assert_eq!(domains.iter().filter(|d| *d == "slow.test").count(), 2);
        assert!(domains.contains(&"fast.test".to_string()));
        assert!(s.try_next().is_err(), "slow.test is at its limit");
        s.done("slow.test");
        assert_eq!(s.try_next().unwrap().domain, "slow.test");
        assert_eq!(s.queued(), 2);
        assert_eq!(s.active(), 3);
    }

    #[test]
    fn priority_then_age_within_a_destination() {
        let s = Scheduler::new(1);
        let low = MessageId::new();
        let normal = MessageId::new();
        let high = MessageId::new();
        s.add([entry(low, 0, "d.test", 0, -5)]);
        s.add([entry(normal, 0, "d.test", 0, 0)]);
        s.add([entry(high, 0, "d.test", 0, 7)]);
        let mut order = Vec::new();
        while let Ok(job) = s.try_next() {
            order.push(job.message_id);
            s.done("d.test");
        }
        assert_eq!(order, vec![high, normal, low]);
    }

    #[test]
    fn scheduling_again_replaces_the_older_entry() {
        let s = Scheduler::new(5);
        let id = MessageId::new();
        let later = now_unix_millis() + 60_000;
        s.add([
            entry(id, 0, "d.test", later, 0),
            entry(id, 1, "d.test", later, 0),
        ]);
        // An operator's retry: recipient 0 is due now.
        s.add([entry(id, 0, "d.test", 0, 0)]);
        let job = s.try_next().unwrap();
        assert_eq!(job.recipients, vec![0]);
        s.done("d.test");
        assert!(s.try_next().is_err(), "recipient 1 still waits");
        // When the old job comes due it carries only recipient 1.
        let mut state = s.state();
        let dest = state.destinations.get_mut("d.test").unwrap();
        let old = std::mem::take(&mut dest.later);
        for ((_, seq), job) in old {
            dest.ready.insert((rank(job.priority), seq), job);
        }
        state.timers.clear();
        state.timers.insert((i64::MIN, "d.test".into()));
        drop(state);
        let job = s.try_next().unwrap();
        assert_eq!(job.recipients, vec![1]);
    }

    #[test]
    fn message_rate_spaces_jobs_per_destination() {
        let s = Scheduler::with_rate(10, 2.0);
        for _ in 0..3 {
            s.add([entry(MessageId::new(), 0, "rated.test", 0, 0)]);
        }
        s.add([entry(MessageId::new(), 0, "free.test", 0, 0)]);
        let first = s.try_next().unwrap();
        let second = s.try_next().unwrap();
        let domains = [first.domain, second.domain];
        assert!(domains.contains(&"rated.test".to_string()));
        assert!(domains.contains(&"free.test".to_string()));
        match s.try_next() {
            Err(Some(due)) => {
                let wait = due - now_unix_millis();
                assert!((400..=500).contains(&wait), "next rated job in {wait} ms");
            }
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    #[test]
    fn future_jobs_wait_for_their_time() {
        let s = Scheduler::new(5);
        let later = now_unix_millis() + 60_000;
        s.add([entry(MessageId::new(), 0, "d.test", later, 0)]);
        match s.try_next() {
            Err(Some(due)) => assert_eq!(due, later),
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn next_wakes_on_new_work() {
        let s = Scheduler::new(5);
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.next().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.add([entry(MessageId::new(), 3, "d.test", 0, 0)]);
        let job = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("woken")
            .expect("joined");
        assert_eq!(job.recipients, vec![3]);
    }
}
