//! Host health as a small state machine, fed by what the orchestrator hears.
//!
//! * `unknown` → `healthy` on the first heartbeat, event or successful check.
//! * any → `unhealthy` on a failed check (with its error), or when nothing was heard for
//!   [`HealthConfig::unhealthy_after`] (10 s by default), checked on [`Observation::Tick`].
//! * `unhealthy` → `healthy` as soon as the host answers again.
//!
//! Pure logic: the caller passes the time, so every transition is unit-testable.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::clock;
use crate::model::HostState;

/// Health thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthConfig {
    /// Silence after which a host is unhealthy.
    pub unhealthy_after: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { unhealthy_after: Duration::from_secs(10) }
    }
}

/// Something learnt about a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// A keep-alive or any event from the host.
    Heartbeat,
    /// A health or hardware check answered.
    CheckSucceeded,
    /// A check or a call failed because the host is down or broken.
    CheckFailed(String),
    /// Time passed; detects silence.
    Tick,
}

/// A change of state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transition {
    /// Old state.
    pub from: HostState,
    /// New state.
    pub to: HostState,
    /// Why (the error, or how long the host was silent).
    pub reason: Option<String>,
}

/// One host's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostHealth {
    state: HostState,
    /// Last time the host was heard from.
    last_seen: Option<DateTime<Utc>>,
    /// When the machine started watching (registration or start-up).
    watching_since: DateTime<Utc>,
    last_error: Option<String>,
    config: HealthConfig,
}

impl HostHealth {
    /// A host nothing has been heard from yet, watched from `now`.
    pub fn new(now: DateTime<Utc>, config: HealthConfig) -> Self {
        HostHealth { state: HostState::Unknown, last_seen: None, watching_since: now, last_error: None, config }
    }

    /// Starts watching afresh at `now` (a replica that just became the leader): silence is
    /// counted from now, not from what it heard before it led, so a change of leader alone
    /// never makes a host unhealthy. The state stays.
    pub fn rewatch(&mut self, now: DateTime<Utc>) {
        self.last_seen = None;
        self.watching_since = now;
    }

    /// Current state.
    pub fn state(&self) -> HostState {
        self.state
    }

    /// Last time the host was heard from.
    pub fn last_seen(&self) -> Option<DateTime<Utc>> {
        self.last_seen
    }

    /// Why the host is unhealthy.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    fn to(&mut self, to: HostState, reason: Option<String>) -> Option<Transition> {
        if to == HostState::Healthy {
            self.last_error = None;
        } else {
            self.last_error.clone_from(&reason);
        }
        if self.state == to {
            return None;
        }
        let from = std::mem::replace(&mut self.state, to);
        Some(Transition { from, to, reason })
    }

    /// Feeds one observation made at `now`; returns the transition it caused, if any.
    pub fn observe(&mut self, now: DateTime<Utc>, obs: Observation) -> Option<Transition> {
        match obs {
            Observation::Heartbeat | Observation::CheckSucceeded => {
                // An observation older than the last one says nothing new.
                if self.last_seen.is_none_or(|s| now >= s) {
                    self.last_seen = Some(now);
                }
                self.to(HostState::Healthy, None)
            }
            Observation::CheckFailed(err) => self.to(HostState::Unhealthy, Some(err)),
            Observation::Tick => {
                let reference = self.last_seen.unwrap_or(self.watching_since);
                let silent = clock::since(now, reference);
                if silent < self.config.unhealthy_after || self.state == HostState::Unhealthy {
                    return None;
                }
                let why = match self.last_seen {
                    Some(_) => format!("nothing heard from the host for {} s", silent.as_secs()),
                    None => format!("the host has not answered since it was registered {} s ago", silent.as_secs()),
                };
                self.to(HostState::Unhealthy, Some(why))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&Utc)
    }

    fn at(s: u64) -> DateTime<Utc> {
        clock::add(t0(), Duration::from_secs(s))
    }

    #[test]
    fn unknown_until_heard_then_healthy() {
        let mut h = HostHealth::new(t0(), HealthConfig::default());
        assert_eq!(h.state(), HostState::Unknown);
        assert_eq!(h.observe(at(5), Observation::Tick), None, "still within the grace period");
        let t = h.observe(at(6), Observation::Heartbeat).unwrap();
        assert_eq!((t.from, t.to), (HostState::Unknown, HostState::Healthy));
        assert_eq!(h.last_seen(), Some(at(6)));
        assert_eq!(h.observe(at(7), Observation::Heartbeat), None, "no transition while healthy");
    }

    #[test]
    fn silence_longer_than_threshold_makes_unhealthy_exactly_once() {
        let mut h = HostHealth::new(t0(), HealthConfig::default());
        h.observe(at(0), Observation::Heartbeat);
        assert_eq!(h.observe(at(9), Observation::Tick), None);
        let t = h.observe(at(10), Observation::Tick).unwrap();
        assert_eq!((t.from, t.to), (HostState::Healthy, HostState::Unhealthy));
        assert!(t.reason.unwrap().contains("10 s"));
        assert_eq!(h.observe(at(20), Observation::Tick), None, "stays unhealthy without a new transition");
        assert!(h.last_error().unwrap().contains("nothing heard"));
    }

    #[test]
    fn never_answering_host_becomes_unhealthy() {
        let mut h = HostHealth::new(t0(), HealthConfig { unhealthy_after: Duration::from_secs(3) });
        let t = h.observe(at(3), Observation::Tick).unwrap();
        assert_eq!((t.from, t.to), (HostState::Unknown, HostState::Unhealthy));
        assert!(h.last_error().unwrap().contains("has not answered"));
    }

    #[test]
    fn failed_check_is_immediate_and_recovery_clears_the_error() {
        let mut h = HostHealth::new(t0(), HealthConfig::default());
        h.observe(at(0), Observation::Heartbeat);
        let t = h.observe(at(1), Observation::CheckFailed("connection refused".into())).unwrap();
        assert_eq!(t.to, HostState::Unhealthy);
        assert_eq!(h.last_error(), Some("connection refused"));
        // A second failure updates the error, no transition.
        assert_eq!(h.observe(at(2), Observation::CheckFailed("timed out".into())), None);
        assert_eq!(h.last_error(), Some("timed out"));
        let t = h.observe(at(3), Observation::CheckSucceeded).unwrap();
        assert_eq!((t.from, t.to), (HostState::Unhealthy, HostState::Healthy));
        assert_eq!(h.last_error(), None);
    }

    #[test]
    fn late_observation_does_not_move_last_seen_back() {
        let mut h = HostHealth::new(t0(), HealthConfig::default());
        h.observe(at(8), Observation::Heartbeat);
        h.observe(at(2), Observation::Heartbeat);
        assert_eq!(h.last_seen(), Some(at(8)));
        assert_eq!(h.observe(at(17), Observation::Tick), None, "silence counts from the newest observation");
        assert!(h.observe(at(18), Observation::Tick).is_some());
    }
}
