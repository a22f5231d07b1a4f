//! Failed-login throttling per source address and account.
//!
//! The lockout applies to one (source address, account) pair, never to the account as a
//! whole: an attacker who sends bad passwords for `root` only locks himself out of `root`,
//! and `root` still logs in from any other address. After `max_attempts` failures in a row
//! from one address, that address waits `duration` before its next try for that account;
//! with `incremental`, each further lockout of the pair doubles the wait (up to 1024 times).
//! An attempt counts when it starts, so a burst of parallel tries cannot pass the limit.
//! A success from the address clears its record; an administrator's unlock clears every
//! address's record for the user. The table lives in memory and is bounded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::service::LockoutPolicy;

/// At most this many (address, account) records are kept.
const MAX_ENTRIES: usize = 100_000;
/// A record with no lockout in force is forgotten this long after its last failure.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Default)]
struct Entry {
    failures: u32,
    in_flight: u32,
    lockouts: u32,
    locked_until: Option<Instant>,
    last: Option<Instant>,
}

type Key = (String, String);

#[derive(Debug)]
pub(crate) struct Throttle {
    policy: LockoutPolicy,
    entries: Mutex<HashMap<Key, Entry>>,
    /// Password checks running or waiting, per source address.
    checking: Mutex<HashMap<String, usize>>,
}

/// A source address's place among its password checks under way, given back when dropped.
pub(crate) struct Checking {
    throttle: Arc<Throttle>,
    source: String,
}

impl Drop for Checking {
    fn drop(&mut self) {
        let mut m = self.throttle.checking.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.source);
            }
        }
    }
}

/// An attempt under way; [`Attempt::finish`] records its outcome. Dropping it unfinished
/// (the client went away) only releases its place.
pub(crate) struct Attempt {
    throttle: Arc<Throttle>,
    key: Option<Key>,
}

impl Throttle {
    pub(crate) fn new(policy: LockoutPolicy) -> Self {
        Throttle { policy, entries: Mutex::new(HashMap::new()), checking: Mutex::new(HashMap::new()) }
    }

    /// Take one of `limit` places for a password check from `source`; `None` when the
    /// address already has `limit` under way (a flood from one address cannot take every
    /// hasher's queue).
    pub(crate) fn checking(self: &Arc<Self>, source: &str, limit: usize) -> Option<Checking> {
        let mut m = self.checking.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(source.to_string()).or_insert(0);
        if *n >= limit.max(1) {
            return None;
        }
        *n += 1;
        Some(Checking { throttle: self.clone(), source: source.to_string() })
    }

    fn max_attempts(&self) -> u32 {
        self.policy.max_attempts.max(1)
    }

    /// Start an attempt from `source` for `account`; `Err(seconds to wait)` when the pair
    /// is locked, or when the attempts already under way would reach the limit.
    pub(crate) fn begin(self: &Arc<Self>, source: &str, account: &str) -> Result<Attempt, Duration> {
        let now = Instant::now();
        let key = (source.to_string(), account.to_string());
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(&key) {
            prune(&mut entries, now);
        }
        let e = entries.entry(key.clone()).or_default();
        if let Some(until) = e.locked_until {
            if until > now {
                return Err(until - now);
            }
            e.locked_until = None;
        }
        if e.failures + e.in_flight >= self.max_attempts() {
            return Err(Duration::from_secs(1));
        }
        e.in_flight += 1;
        Ok(Attempt { throttle: self.clone(), key: Some(key) })
    }

    /// Forget every address's record for `account` (an administrator's unlock).
    pub(crate) fn clear_account(&self, account: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(_, a), e| a != account || e.in_flight > 0);
        for ((_, a), e) in entries.iter_mut() {
            if a == account {
                *e = Entry { in_flight: e.in_flight, ..Entry::default() };
            }
        }
    }

    fn lock_for(&self, lockouts: u32) -> Duration {
        let factor = if self.policy.incremental { 1u32 << lockouts.min(10) } else { 1 };
        self.policy.duration.saturating_mul(factor).max(Duration::from_secs(1))
    }
}

fn prune(entries: &mut HashMap<Key, Entry>, now: Instant) {
    entries.retain(|_, e| {
        e.in_flight > 0
            || e.locked_until.is_some_and(|u| u > now)
            || e.last.is_some_and(|l| now.duration_since(l) < FORGET_AFTER && e.lockouts > 0)
    });
    if entries.len() >= MAX_ENTRIES {
        // Still full: keep only what is in force now.
        entries.retain(|_, e| e.in_flight > 0 || e.locked_until.is_some_and(|u| u > now));
    }
}

impl Attempt {
    /// Record the outcome; on a failure that reaches the limit, the wait now in force.
    pub(crate) fn finish(mut self, ok: bool) -> Option<Duration> {
        let key = self.key.take()?;
        let t = &self.throttle;
        let now = Instant::now();
        let mut entries = t.entries.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            entries.remove(&key);
            return None;
        }
        let e = entries.entry(key).or_default();
        e.in_flight = e.in_flight.saturating_sub(1);
        e.failures += 1;
        e.last = Some(now);
        if e.failures >= t.max_attempts() {
            let wait = t.lock_for(e.lockouts);
            e.locked_until = Some(now + wait);
            e.lockouts = e.lockouts.saturating_add(1);
            e.failures = 0;
            return Some(wait);
        }
        None
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut entries = self.throttle.entries.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = entries.get_mut(&key) {
                e.in_flight = e.in_flight.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(max: u32, secs: u64, incremental: bool) -> Arc<Throttle> {
        Arc::new(Throttle::new(LockoutPolicy { max_attempts: max, duration: Duration::from_secs(secs), incremental }))
    }

    #[test]
    fn a_lockout_is_per_address_and_doubles() {
        let t = throttle(2, 10, true);
        t.begin("a", "root").unwrap().finish(false);
        let wait = t.begin("a", "root").unwrap().finish(false);
        assert_eq!(wait, Some(Duration::from_secs(10)));
        assert!(t.begin("a", "root").is_err(), "the attacker's address is locked");
        // Another address is not affected, and its success does not unlock the first.
        assert_eq!(t.begin("b", "root").unwrap().finish(true), None);
        assert!(t.begin("a", "root").is_err());
        // The next lockout of the same pair doubles.
        t.entries.lock().unwrap().get_mut(&("a".into(), "root".into())).unwrap().locked_until = None;
        t.begin("a", "root").unwrap().finish(false);
        assert_eq!(t.begin("a", "root").unwrap().finish(false), Some(Duration::from_secs(20)));
        t.clear_account("root");
        assert!(t.begin("a", "root").is_ok());
    }

    #[test]
    fn password_checks_per_address_are_bounded() {
        let t = throttle(3, 10, false);
        let held: Vec<_> = (0..4).map(|_| t.checking("a", 4).unwrap()).collect();
        assert!(t.checking("a", 4).is_none());
        assert!(t.checking("b", 4).is_some(), "another address is not affected");
        drop(held);
        assert!(t.checking("a", 4).is_some());
        assert!(t.checking.lock().unwrap().is_empty(), "no record is left behind");
    }

    #[test]
    fn parallel_attempts_count_when_they_start() {
        let t = throttle(3, 10, false);
        let held: Vec<_> = (0..3).map(|_| t.begin("a", "x").unwrap()).collect();
        assert!(t.begin("a", "x").is_err(), "a fourth parallel try is refused");
        drop(held);
        assert!(t.begin("a", "x").is_ok(), "dropped attempts free their places");
    }
}
