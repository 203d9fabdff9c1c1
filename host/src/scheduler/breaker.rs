//! A circuit breaker per agent: after `threshold` consecutive failures the
//! agent gets no tasks for `cool_down`; then one probe task is let through
//! (half-open). A probe that succeeds closes the breaker; one that fails
//! opens it again.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cool_down: Duration,
    consecutive_failures: u32,
    open_until: Option<Instant>,
    probe_in_flight: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cool_down: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cool_down,
            consecutive_failures: 0,
            open_until: None,
            probe_in_flight: false,
        }
    }

    /// When an open breaker lets the next probe through.
    pub fn open_until(&self) -> Option<Instant> {
        self.open_until
    }

    pub fn state(&self, now: Instant) -> State {
        match self.open_until {
            None => State::Closed,
            Some(until) if now < until => State::Open,
            Some(_) => State::HalfOpen,
        }
    }

    /// Whether a task may be sent now; in half-open state only one at a time.
    pub fn allows(&self, now: Instant) -> bool {
        match self.state(now) {
            State::Closed => true,
            State::Open => false,
            State::HalfOpen => !self.probe_in_flight,
        }
    }

    /// Records that a task was sent (marks the half-open probe).
    pub fn on_send(&mut self, now: Instant) {
        if self.state(now) == State::HalfOpen {
            self.probe_in_flight = true;
        }
    }

    pub fn on_success(&mut self) {
        self.consecutive_failures = 0;
        self.open_until = None;
        self.probe_in_flight = false;
    }

    /// An attempt that says nothing of the agent's health (bad input):
    /// a probe ends without closing or opening the breaker, and the next
    /// task is the probe.
    pub fn on_inconclusive(&mut self) {
        self.probe_in_flight = false;
    }

    pub fn on_failure(&mut self, now: Instant) {
        self.consecutive_failures += 1;
        let probing = self.probe_in_flight;
        self.probe_in_flight = false;
        if probing || self.consecutive_failures >= self.threshold {
            self.open_until = Some(now + self.cool_down);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_half_opens_and_closes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_secs(1));
        for _ in 0..2 {
            b.on_failure(t0);
        }
        assert_eq!(b.state(t0), State::Closed, "below the threshold");
        b.on_failure(t0);
        assert_eq!(b.state(t0), State::Open);
        assert!(!b.allows(t0 + Duration::from_millis(999)));

        let later = t0 + Duration::from_secs(1);
        assert_eq!(b.state(later), State::HalfOpen);
        assert!(b.allows(later));
        b.on_send(later);
        assert!(!b.allows(later), "one probe at a time");
        b.on_failure(later);
        assert_eq!(b.state(later), State::Open, "a failed probe opens it again");

        // A probe with bad input decides nothing: the next task probes.
        let next = later + Duration::from_secs(1);
        b.on_send(next);
        assert!(!b.allows(next));
        b.on_inconclusive();
        assert_eq!(b.state(next), State::HalfOpen);
        assert!(
            b.allows(next),
            "a probe with bad input lets the next one through"
        );

        let again = next;
        b.on_send(again);
        b.on_success();
        assert_eq!(b.state(again), State::Closed);
        assert!(b.allows(again));
    }
}
