//! Freshness and single use of session requests: a request is accepted only if its timestamp is
//! within the skew window of the daemon's clock and its id was not seen before. Ids are kept for
//! twice the window, after which the timestamp check alone refuses them, so memory is bounded by
//! the request rate.

use std::collections::HashMap;

/// Why a request is not fresh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stale {
    /// Too old or from the future.
    #[error("request timestamp is {0} ms away from the device's clock (allowed ±{1} ms): check both clocks")]
    Skew(i64, u64),
    /// Seen before.
    #[error("replayed request (this request id was already used)")]
    Replayed,
    /// Too many requests in the window.
    #[error("too many requests; try again shortly")]
    Full,
}

/// Remembers recent request ids.
pub struct ReplayGuard {
    window_ms: u64,
    max: usize,
    seen: HashMap<[u8; 16], u64>,
}

impl ReplayGuard {
    /// Accepts timestamps within ±`window_ms`; remembers at most `max` ids.
    pub fn new(window_ms: u64, max: usize) -> Self {
        ReplayGuard { window_ms, max, seen: HashMap::new() }
    }

    /// Checks and records a request.
    pub fn check(&mut self, id: [u8; 16], timestamp_ms: u64, now_ms: u64) -> Result<(), Stale> {
        let skew = timestamp_ms as i64 - now_ms as i64;
        if skew.unsigned_abs() > self.window_ms {
            return Err(Stale::Skew(skew, self.window_ms));
        }
        let keep = 2 * self.window_ms;
        self.seen.retain(|_, t| t.saturating_add(keep) >= now_ms);
        if self.seen.contains_key(&id) {
            return Err(Stale::Replayed);
        }
        if self.seen.len() >= self.max {
            return Err(Stale::Full);
        }
        self.seen.insert(id, now_ms);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_once_then_replayed_and_skew() {
        let mut g = ReplayGuard::new(30_000, 4);
        assert_eq!(g.check([1; 16], 100_000, 100_000), Ok(()));
        assert_eq!(g.check([1; 16], 100_000, 100_500), Err(Stale::Replayed));
        assert!(matches!(g.check([2; 16], 10_000, 100_000), Err(Stale::Skew(..))));
        assert!(matches!(g.check([2; 16], 200_000, 100_000), Err(Stale::Skew(..))));
        // Still refused much later: the timestamp is then out of the window.
        assert!(matches!(g.check([1; 16], 100_000, 1_000_000), Err(Stale::Skew(..))));
        assert_eq!(g.check([3; 16], 100_000, 100_000), Ok(()));
        assert_eq!(g.check([4; 16], 100_000, 100_000), Ok(()));
        assert_eq!(g.check([5; 16], 100_000, 100_000), Ok(()));
        assert_eq!(g.check([6; 16], 100_000, 100_000), Err(Stale::Full));
        // Old ids are forgotten after twice the window.
        assert_eq!(g.check([7; 16], 200_000, 200_000), Ok(()));
    }
}
